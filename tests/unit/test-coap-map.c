/* SPDX-License-Identifier: MIT */
/* The CoAP client adapter's payload mapping: raw, JSON and CBOR payloads into named points,
 * and point values into payloads for writes (adapters/coap/coap-map.c). */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "coap-map.h"
#include "test-util.h"

static json_t *map(enum adp_coap_format f, const struct adp_coap_point *p, size_t n, const void *data, size_t len,
                   size_t *missing) {
        json_t *out = NULL;
        ASSERT_OK(adp_coap_map(f, p, n, data, len, &out, missing));
        return out;
}

static void expect_json(json_t *got, const char *want) {
        json_error_t je;
        json_t *w = json_loads(want, JSON_DECODE_ANY, &je);
        ASSERT_NOT_NULL(w);
        if (!json_equal(got, w)) {
                char *g = json_dumps(got, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
                TEST_FAIL("got %s, want %s", g, want);
        }
        json_decref(w);
        json_decref(got);
}

static void test_raw(void) {
        struct adp_coap_point p = { .name = "v" };
        expect_json(map(ADP_COAP_FORMAT_RAW, &p, 1, " 21.5\n", 6, NULL), "{\"v\":21.5}");
        expect_json(map(ADP_COAP_FORMAT_RAW, &p, 1, "-42", 3, NULL), "{\"v\":-42}");
        expect_json(map(ADP_COAP_FORMAT_RAW, &p, 1, "on", 2, NULL), "{\"v\":\"on\"}");
        expect_json(map(ADP_COAP_FORMAT_RAW, &p, 1, "1e999", 5, NULL), "{\"v\":\"1e999\"}"); /* not finite: text */
        expect_json(map(ADP_COAP_FORMAT_RAW, &p, 1, "", 0, NULL), "{\"v\":\"\"}");
        json_t *out = NULL;
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_RAW, &p, 1, (const uint8_t *) "\xff\xfe", 2, &out, NULL), -EBADMSG);
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_RAW, &p, 1, (const uint8_t *) "a\0b", 3, &out, NULL), -EBADMSG);
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_RAW, &p, 1, (const uint8_t *) "\xc3", 1, &out, NULL), -EBADMSG); /* truncated UTF-8 */
        expect_json(map(ADP_COAP_FORMAT_RAW, &p, 1, "\xc3\xa9t\xc3\xa9", 5, NULL), "{\"v\":\"\xc3\xa9t\xc3\xa9\"}");
}

static void test_json(void) {
        static const char doc[] = "{\"temp\":21.5,\"hum\":{\"rel\":40},\"list\":[1,{\"x\":true}],\"s\":\"ok\"}";
        struct adp_coap_point p[] = {
                { "t", "temp" }, { "h", "hum.rel" }, { "x", "list.1.x" }, { "first", "list.0" },
                { "gone", "nope.deeper" }, { "bad_index", "list.7" }, { "all_hum", "hum" },
        };
        size_t missing = 99;
        expect_json(map(ADP_COAP_FORMAT_JSON, p, 7, doc, strlen(doc), &missing),
                    "{\"t\":21.5,\"h\":40,\"x\":true,\"first\":1,\"all_hum\":{\"rel\":40}}");
        ASSERT_EQ(missing, 2u);
        json_t *out = NULL;
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_JSON, p, 1, (const uint8_t *) "{\"temp\":", 8, &out, NULL), -EBADMSG);
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_JSON, p, 1, (const uint8_t *) "{\"a\":1,\"a\":2}", 13, &out, NULL), -EBADMSG);
        char deep[64] = "";
        for (int i = 0; i < 20; i++)
                strcat(deep, "[");
        for (int i = 0; i < 20; i++)
                strcat(deep, "]");
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_JSON, p, 1, (const uint8_t *) deep, strlen(deep), &out, NULL), -E2BIG);
        ASSERT_TRUE(adp_coap_path_valid("a.b.0"));
        ASSERT_FALSE(adp_coap_path_valid("a..b"));
        ASSERT_FALSE(adp_coap_path_valid(".a"));
        ASSERT_FALSE(adp_coap_path_valid(""));
}

static void test_cbor(void) {
        /* {"temp": 21.5 (float64), "n": -5, "big": 2^64-1, "b": h'0102', "ok": true, 1: null,
         *  "tag": 1(1700000000), "arr": [_ "ab", "cd"] (indefinite text in an array)} */
        static const uint8_t doc[] = {
                0xa8, 0x64, 't', 'e', 'm', 'p', 0xfb, 0x40, 0x35, 0x80, 0, 0, 0, 0, 0,
                0x61, 'n', 0x24,
                0x63, 'b', 'i', 'g', 0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0x61, 'b', 0x42, 0x01, 0x02,
                0x62, 'o', 'k', 0xf5,
                0x01, 0xf6,
                0x63, 't', 'a', 'g', 0xc1, 0x1a, 0x65, 0x53, 0xf1, 0x00,
                0x63, 'a', 'r', 'r', 0x81, 0x7f, 0x62, 'a', 'b', 0x62, 'c', 'd', 0xff,
        };
        struct adp_coap_point p[] = {
                { "t", "temp" }, { "n", "n" }, { "big", "big" }, { "b", "b" }, { "ok", "ok" }, { "one", "1" },
                { "tag", "tag" }, { "s", "arr.0" },
        };
        expect_json(map(ADP_COAP_FORMAT_CBOR, p, 8, doc, sizeof doc, NULL),
                    "{\"t\":21.5,\"n\":-5,\"big\":18446744073709551615.0,\"b\":\"AQI=\",\"ok\":true,\"one\":null,"
                    "\"tag\":1700000000,\"s\":\"abcd\"}");
        /* Half and single floats mean their shortest decimal as a single: {"s": 21.7f, "h": 0.1 as a half
         * (0.0999755859375), "d": 0.1 as a double}. */
        static const uint8_t floats[] = {
                0xa3, 0x61, 's', 0xfa, 0x41, 0xad, 0x99, 0x9a,
                0x61, 'h', 0xf9, 0x2e, 0x66,
                0x61, 'd', 0xfb, 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a,
        };
        struct adp_coap_point fp[] = { { "s", "s" }, { "h", "h" }, { "d", "d" } };
        json_t *fl = map(ADP_COAP_FORMAT_CBOR, fp, 3, floats, sizeof floats, NULL);
        ASSERT_TRUE(json_real_value(json_object_get(fl, "s")) == 21.7);
        ASSERT_TRUE(json_real_value(json_object_get(fl, "h")) == 0.099975586); /* a single's shortest */
        ASSERT_TRUE(json_real_value(json_object_get(fl, "d")) == 0.1);
        json_decref(fl);
        json_t *out = NULL;
        static const uint8_t trailing[] = { 0x01, 0x02 };
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_CBOR, p, 1, trailing, 2, &out, NULL), -EBADMSG);
        static const uint8_t truncated[] = { 0xa1, 0x61, 'a' };
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_CBOR, p, 1, truncated, 3, &out, NULL), -EBADMSG);
        static const uint8_t array_key[] = { 0xa1, 0x80, 0x01 };
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_CBOR, p, 1, array_key, 3, &out, NULL), -EBADMSG);
        static const uint8_t bad_utf8[] = { 0x62, 0xff, 0xfe };
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_CBOR, p, 1, bad_utf8, 3, &out, NULL), -EBADMSG);
        uint8_t deep[40];
        memset(deep, 0x81, sizeof deep - 1);
        deep[sizeof deep - 1] = 0x01;
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_CBOR, p, 1, deep, sizeof deep, &out, NULL), -E2BIG);
        ASSERT_ERR(adp_coap_map(ADP_COAP_FORMAT_CBOR, p, 1, deep, 0, &out, NULL), -EBADMSG);
}

static void test_encode(void) {
        uint8_t *b = NULL;
        size_t n = 0;
        json_t *v = json_pack("{s:i, s:[b, n], s:f}", "a", -3, "l", 1, "f", 1.5);
        ASSERT_OK(adp_coap_encode(ADP_COAP_FORMAT_CBOR, v, &b, &n));
        json_t *back = NULL;
        ASSERT_OK(adp_coap_decode(ADP_COAP_FORMAT_CBOR, b, n, &back));
        ASSERT_TRUE(json_equal(back, v));
        json_decref(back);
        free(b);
        ASSERT_OK(adp_coap_encode(ADP_COAP_FORMAT_JSON, v, &b, &n));
        ASSERT_EQ(n, strlen("{\"a\":-3,\"l\":[true,null],\"f\":1.5}"));
        free(b);
        /* Reals as short as they read back (jansson alone writes 0.10000000000000001). */
        json_t *tenth = json_pack("{s:f}", "f", 0.1);
        ASSERT_OK(adp_coap_encode(ADP_COAP_FORMAT_JSON, tenth, &b, &n));
        ASSERT_TRUE(n == strlen("{\"f\":0.1}") && memcmp(b, "{\"f\":0.1}", n) == 0);
        free(b);
        json_decref(tenth);
        ASSERT_ERR(adp_coap_encode(ADP_COAP_FORMAT_RAW, v, &b, &n), -EINVAL);
        json_decref(v);
        v = json_real(22.5);
        ASSERT_OK(adp_coap_encode(ADP_COAP_FORMAT_RAW, v, &b, &n));
        ASSERT_TRUE(n == 4 && memcmp(b, "22.5", 4) == 0);
        free(b);
        json_decref(v);
        v = json_string("open");
        ASSERT_OK(adp_coap_encode(ADP_COAP_FORMAT_RAW, v, &b, &n));
        ASSERT_TRUE(n == 4 && memcmp(b, "open", 4) == 0);
        free(b);
        json_decref(v);
        ASSERT_EQ(adp_coap_format_from_string("cbor"), (int) ADP_COAP_FORMAT_CBOR);
        ASSERT_EQ(adp_coap_format_from_string("xml"), -EINVAL);
        ASSERT_EQ(adp_coap_format_content_format(ADP_COAP_FORMAT_JSON), 50u);
}

int main(void) {
        TEST_RUN(test_raw);
        TEST_RUN(test_json);
        TEST_RUN(test_cbor);
        TEST_RUN(test_encode);
        return 0;
}
