/* SPDX-License-Identifier: MIT */
/* Modbus value codecs: every type in every byte/word order, with values chosen so that a
 * swapped byte, a swapped word or a lost sign gives a different result; encode/decode round
 * trips; range checks; exact JSON; exception names. */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "modbus-internal.h"
#include "test-util.h"

/* Registers of a big-endian byte string in an order, built here independently of the codec. */
static void regs_of(const uint8_t *b, unsigned n, const char *order, uint16_t *r) {
        for (unsigned i = 0; i < n; i++) {
                if (!strcmp(order, "ABCD"))
                        r[i] = (uint16_t) (b[2 * i] << 8 | b[2 * i + 1]);
                else if (!strcmp(order, "BADC"))
                        r[i] = (uint16_t) (b[2 * i + 1] << 8 | b[2 * i]);
                else if (!strcmp(order, "CDAB"))
                        r[i] = (uint16_t) (b[2 * (n - 1 - i)] << 8 | b[2 * (n - 1 - i) + 1]);
                else
                        r[i] = (uint16_t) (b[2 * n - 1 - 2 * i] << 8 | b[2 * n - 2 - 2 * i]);
        }
}

static void be(uint64_t v, unsigned nbytes, uint8_t *b) {
        for (unsigned i = 0; i < nbytes; i++)
                b[i] = (uint8_t) (v >> (8 * (nbytes - 1 - i)));
}

static void test_known_registers(void) {
        struct adp_modbus_value v;
        /* 0x1234 0x5678 read as ABCD = 0x12345678; CDAB = 0x56781234; BADC = 0x34127856; DCBA = 0x78563412 */
        uint16_t r[2] = { 0x1234, 0x5678 };
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT32, ADP_MODBUS_ABCD, r, 2, 0, &v));
        ASSERT_EQ(v.u, 0x12345678u);
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT32, ADP_MODBUS_CDAB, r, 2, 0, &v));
        ASSERT_EQ(v.u, 0x56781234u);
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT32, ADP_MODBUS_BADC, r, 2, 0, &v));
        ASSERT_EQ(v.u, 0x34127856u);
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT32, ADP_MODBUS_DCBA, r, 2, 0, &v));
        ASSERT_EQ(v.u, 0x78563412u);

        uint16_t s[1] = { 0xFFFE };
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_INT16, ADP_MODBUS_ABCD, s, 1, 0, &v));
        ASSERT_EQ(v.kind, ADP_MODBUS_V_INT);
        ASSERT_EQ(v.i, -2);
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT16, ADP_MODBUS_ABCD, s, 1, 0, &v));
        ASSERT_EQ(v.u, 65534);
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_INT16, ADP_MODBUS_BADC, s, 1, 0, &v));
        ASSERT_EQ(v.i, (int16_t) 0xFEFF);
        /* A 16-bit value ignores the word swap. */
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_INT16, ADP_MODBUS_CDAB, s, 1, 0, &v));
        ASSERT_EQ(v.i, -2);

        uint16_t b[1] = { 0xA005 };
        unsigned on[] = { 0, 2, 13, 15 };
        for (unsigned bit = 0; bit < 16; bit++) {
                bool expect = false;
                for (unsigned k = 0; k < 4; k++)
                        expect = expect || on[k] == bit;
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_BIT, ADP_MODBUS_ABCD, b, 1, bit, &v));
                ASSERT_EQ(v.b, expect);
        }
        ASSERT_ERR(adp_modbus_decode(ADP_MODBUS_BIT, ADP_MODBUS_ABCD, b, 1, 16, &v), -EINVAL);
        ASSERT_ERR(adp_modbus_decode(ADP_MODBUS_INT32, ADP_MODBUS_ABCD, b, 1, 0, &v), -EINVAL);
        ASSERT_ERR(adp_modbus_decode(ADP_MODBUS_BOOL, ADP_MODBUS_ABCD, b, 1, 0, &v), -EINVAL);
}

static void test_every_type_and_order(void) {
        const char *orders[] = { "ABCD", "BADC", "CDAB", "DCBA" };
        for (int o = 0; o < 4; o++) {
                uint8_t bb[8];
                uint16_t r[4], back[4];
                struct adp_modbus_value v;

                be((uint32_t) -123456789, 4, bb);
                regs_of(bb, 2, orders[o], r);
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_INT32, (enum adp_modbus_order) o, r, 2, 0, &v));
                ASSERT_EQ(v.i, -123456789);
                ASSERT_OK(adp_modbus_encode(ADP_MODBUS_INT32, (enum adp_modbus_order) o, &v, 2, back));
                ASSERT_TRUE(memcmp(r, back, 4) == 0);

                be(3000000000u, 4, bb);
                regs_of(bb, 2, orders[o], r);
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT32, (enum adp_modbus_order) o, r, 2, 0, &v));
                ASSERT_EQ(v.u, 3000000000u);

                float f = -1234.5f;
                uint32_t fu;
                memcpy(&fu, &f, 4);
                be(fu, 4, bb);
                regs_of(bb, 2, orders[o], r);
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_FLOAT32, (enum adp_modbus_order) o, r, 2, 0, &v));
                ASSERT_TRUE(v.d == -1234.5);
                ASSERT_OK(adp_modbus_encode(ADP_MODBUS_FLOAT32, (enum adp_modbus_order) o, &v, 2, back));
                ASSERT_TRUE(memcmp(r, back, 4) == 0);

                be((uint64_t) INT64_C(-1234567890123456789), 8, bb);
                regs_of(bb, 4, orders[o], r);
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_INT64, (enum adp_modbus_order) o, r, 4, 0, &v));
                ASSERT_TRUE(v.i == INT64_C(-1234567890123456789));
                ASSERT_OK(adp_modbus_encode(ADP_MODBUS_INT64, (enum adp_modbus_order) o, &v, 4, back));
                ASSERT_TRUE(memcmp(r, back, 8) == 0);

                be(UINT64_C(18446744073709551000), 8, bb);
                regs_of(bb, 4, orders[o], r);
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_UINT64, (enum adp_modbus_order) o, r, 4, 0, &v));
                ASSERT_TRUE(v.u == UINT64_C(18446744073709551000));

                double d = 3.141592653589793;
                uint64_t du;
                memcpy(&du, &d, 8);
                be(du, 8, bb);
                regs_of(bb, 4, orders[o], r);
                ASSERT_OK(adp_modbus_decode(ADP_MODBUS_FLOAT64, (enum adp_modbus_order) o, r, 4, 0, &v));
                ASSERT_TRUE(v.d == 3.141592653589793);
                ASSERT_OK(adp_modbus_encode(ADP_MODBUS_FLOAT64, (enum adp_modbus_order) o, &v, 4, back));
                ASSERT_TRUE(memcmp(r, back, 8) == 0);
        }
}

static void test_string(void) {
        uint16_t r[6] = { 0x4649, 0x454C, 0x4448, 0x5542, 0x2D30, 0x3100 }; /* "FIELDHUB-01" */
        struct adp_modbus_value v;
        char json[64];
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_STRING, ADP_MODBUS_ABCD, r, 6, 0, &v));
        ASSERT_STREQ(v.s, "FIELDHUB-01");
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_STRING, ADP_MODBUS_BADC, r, 6, 0, &v));
        ASSERT_STREQ(v.s, "IFLEHDBU0-"); /* stops at the NUL now in the 11th byte */
        uint16_t q[2] = { 0x2241, 0x5C01 };  /* '"' 'A' '\\' 0x01 */
        ASSERT_OK(adp_modbus_decode(ADP_MODBUS_STRING, ADP_MODBUS_ABCD, q, 2, 0, &v));
        adp_modbus_value_json(&v, json, sizeof json);
        ASSERT_STREQ(json, "\"\\\"A\\\\?\"");
        uint16_t back[6];
        snprintf(v.s, sizeof v.s, "FIELDHUB-01");
        ASSERT_OK(adp_modbus_encode(ADP_MODBUS_STRING, ADP_MODBUS_ABCD, &v, 6, back));
        ASSERT_TRUE(memcmp(back, r, sizeof r) == 0);
        ASSERT_ERR(adp_modbus_encode(ADP_MODBUS_STRING, ADP_MODBUS_ABCD, &v, 5, back), -ERANGE);
}

static void test_encode_ranges(void) {
        uint16_t r[4];
        struct adp_modbus_value v = { .kind = ADP_MODBUS_V_INT, .i = 32768 };
        ASSERT_ERR(adp_modbus_encode(ADP_MODBUS_INT16, ADP_MODBUS_ABCD, &v, 1, r), -ERANGE);
        v.i = -32768;
        ASSERT_OK(adp_modbus_encode(ADP_MODBUS_INT16, ADP_MODBUS_ABCD, &v, 1, r));
        ASSERT_EQ(r[0], 0x8000);
        v.i = -1;
        ASSERT_ERR(adp_modbus_encode(ADP_MODBUS_UINT16, ADP_MODBUS_ABCD, &v, 1, r), -ERANGE);
        v.i = 65535;
        ASSERT_OK(adp_modbus_encode(ADP_MODBUS_UINT16, ADP_MODBUS_BADC, &v, 1, r));
        ASSERT_EQ(r[0], 0xFFFF);
        v.i = 0x1234;
        ASSERT_OK(adp_modbus_encode(ADP_MODBUS_UINT16, ADP_MODBUS_BADC, &v, 1, r));
        ASSERT_EQ(r[0], 0x3412);
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_DOUBLE, .d = 12.5 };
        ASSERT_ERR(adp_modbus_encode(ADP_MODBUS_INT32, ADP_MODBUS_ABCD, &v, 2, r), -ERANGE);
        v.d = -70000;
        ASSERT_OK(adp_modbus_encode(ADP_MODBUS_INT32, ADP_MODBUS_CDAB, &v, 2, r));
        ASSERT_EQ(r[0], 0xEE90); /* -70000 = 0xFFFEEE90, low word first */
        ASSERT_EQ(r[1], 0xFFFE);
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_UINT, .u = UINT64_MAX };
        ASSERT_ERR(adp_modbus_encode(ADP_MODBUS_INT64, ADP_MODBUS_ABCD, &v, 4, r), -ERANGE);
        ASSERT_OK(adp_modbus_encode(ADP_MODBUS_UINT64, ADP_MODBUS_ABCD, &v, 4, r));
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_DOUBLE, .d = 1e39 };
        ASSERT_ERR(adp_modbus_encode(ADP_MODBUS_FLOAT32, ADP_MODBUS_ABCD, &v, 2, r), -ERANGE);
}

static void test_json_and_scale(void) {
        char buf[64];
        struct adp_modbus_value v = { .kind = ADP_MODBUS_V_UINT, .u = UINT64_C(18446744073709551000) };
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "18446744073709551000");
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_INT, .i = 1234 };
        adp_modbus_scale(&v, 0.1, 0);
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "123.4"); /* shortest form, not 123.40000000000001 */
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_INT, .i = 219 };
        adp_modbus_scale(&v, 0.1, 0);
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "21.9"); /* divided by 10, not multiplied by 0.1 (21.900000000000002) */
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_INT, .i = -12345 };
        adp_modbus_scale(&v, 0.01, 0);
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "-123.45");
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_DOUBLE, .d = (float) -1234.5f };
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "-1234.5");
        float f = 1.013f;
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_DOUBLE, .d = f, .f32 = true };
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "1.013");
        v.f32 = false; /* the same double as a float64: every digit it has */
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "1.0130000114440918");
        v.d = 0.1;
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "0.1");
        v.d = NAN;
        adp_modbus_value_json(&v, buf, sizeof buf);
        ASSERT_STREQ(buf, "null");
        v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_INT, .i = 7 };
        adp_modbus_scale(&v, 1.0, 0.0);
        ASSERT_EQ(v.kind, ADP_MODBUS_V_INT); /* identity keeps integers exact */
        adp_modbus_scale(&v, 2.0, -1.0);
        ASSERT_TRUE(v.d == 13.0);
}

static void test_names(void) {
        ASSERT_STREQ(adp_modbus_exception_name(2), "ILLEGAL DATA ADDRESS");
        ASSERT_STREQ(adp_modbus_exception_name(11), "GATEWAY TARGET DEVICE FAILED TO RESPOND");
        ASSERT_NULL(adp_modbus_exception_name(9));
        ASSERT_NULL(adp_modbus_exception_name(200));
        ASSERT_EQ(adp_modbus_errno(ETIMEDOUT), -ETIMEDOUT);
}

static void test_rtu_timing(void) {
        struct adp_modbus_line_conf lc = { .baud = 9600, .data_bits = 8, .stop_bits = 1, .parity = 'E' };
        ASSERT_EQ(adp_modbus_rtu_char_usec(&lc), 1146);     /* 11 bits at 9600 */
        ASSERT_EQ(adp_modbus_rtu_silence_usec(&lc), 4011);  /* 3.5 characters */
        lc.baud = 115200;
        ASSERT_EQ(adp_modbus_rtu_silence_usec(&lc), 1750);  /* fixed above 19200 */
        lc.parity = 'N';
        lc.baud = 19200;
        ASSERT_EQ(adp_modbus_rtu_char_usec(&lc), 521);      /* 10 bits */
}

/* The float32 formatter (a fast path without printf) against the definition: the shortest
 * %.Ng, N = 6..9, that strtof() reads back as the same float. Random bit patterns (every
 * exponent), and the awkward ones: powers of ten, integers, halves, the extremes. */
static void test_float32_json(void) {
        uint32_t x = 0x12345678u;
        char got[64], want[64];
        unsigned n_checked = 0;
        for (unsigned i = 0; i < 300000; i++) {
                float f;
                uint32_t bits;
                if (i < 40) {
                        static const float special[] = { 0.0f, -0.0f, 1.0f, -1.0f, 10.0f, 100.0f, 1e6f, 1e7f, 1e9f,
                                                         1e-4f, 1e-5f, 0.1f, 0.5f, 9.9999999f, 99999.99f, 999999.5f,
                                                         1234567.5f, 16777216.0f, 3.4028235e38f, 1.17549435e-38f,
                                                         1.4e-45f, 1e-10f, 123456.78f, 0.00012345f, 1.013f,
                                                         -1234.5f, 65535.0f, 4294967296.0f, 1e22f, 1e23f };
                        f = i < ELEMENTSOF(special) ? special[i] : (float) (i * 1000001);
                } else {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        bits = x;
                        memcpy(&f, &bits, sizeof f);
                        if (!isfinite(f))
                                continue;
                }
                for (int prec = 6; prec <= 9; prec++) {
                        snprintf(want, sizeof want, "%.*g", prec, (double) f);
                        if (strtof(want, NULL) == f)
                                break;
                }
                struct adp_modbus_value v = { .kind = ADP_MODBUS_V_DOUBLE, .d = f, .f32 = true };
                int n = adp_modbus_value_json(&v, got, sizeof got);
                if (strcmp(got, want) != 0)
                        fprintf(stderr, "float32 %a: got %s, want %s\n", (double) f, got, want);
                ASSERT_STREQ(got, want);
                ASSERT_EQ(n, (int) strlen(want));
                n_checked++;
        }
        ASSERT_TRUE(n_checked > 250000);
        /* Truncation reports the full length, like snprintf. */
        struct adp_modbus_value v = { .kind = ADP_MODBUS_V_DOUBLE, .d = -1234.5f, .f32 = true };
        ASSERT_EQ(adp_modbus_value_json(&v, got, 4), 7);
        ASSERT_STREQ(got, "-12");
}

int main(void) {
        TEST_RUN(test_known_registers);
        TEST_RUN(test_every_type_and_order);
        TEST_RUN(test_string);
        TEST_RUN(test_encode_ranges);
        TEST_RUN(test_json_and_scale);
        TEST_RUN(test_names);
        TEST_RUN(test_rtu_timing);
        TEST_RUN(test_float32_json);
        return 0;
}
