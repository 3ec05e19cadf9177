/* SPDX-License-Identifier: MIT */
/* The adapters' shared helpers (adapters/common/adp-util.c): reals written as short as they
 * read back, and IEEE singles taken as the decimal the device meant. */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adp-util.h"
#include "test-util.h"

static void expect_dump(json_t *v, const char *want) {
        char *got = adp_json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
        ASSERT_NOT_NULL(got);
        if (strcmp(got, want) != 0)
                TEST_FAIL("got %s, want %s", got, want);
        free(got);
        json_decref(v);
}

static void test_dumps(void) {
        expect_dump(json_pack("{s:f, s:f, s:i, s:s}", "a", 0.1, "b", 21.7, "n", 5, "s", "x"),
                    "{\"a\":0.1,\"b\":21.7,\"n\":5,\"s\":\"x\"}");
        expect_dump(json_real(18.9), "18.9");
        expect_dump(json_real(100.0), "100.0");
        expect_dump(json_real(1e300), "1e300");
        expect_dump(json_real(0.30000000000000004), "0.30000000000000004");
        /* One real that needs 17 digits sets the precision of the whole text: every real
         * still reads back exactly. */
        expect_dump(json_pack("[f, [f]]", 0.1, 0.30000000000000004), "[0.10000000000000001,[0.30000000000000004]]");
        expect_dump(json_pack("{s:{s:[f]}}", "deep", "er", 2.5), "{\"deep\":{\"er\":[2.5]}}");
        expect_dump(json_pack("[]"), "[]");
        /* A caller's own JSON_REAL_PRECISION is replaced. */
        json_t *v = json_real(0.1);
        char *s = adp_json_dumps(v, JSON_ENCODE_ANY | JSON_REAL_PRECISION(3));
        ASSERT_STREQ(s, "0.1");
        free(s);
        json_decref(v);
        ASSERT_NULL(adp_json_dumps(NULL, 0));

        /* Random doubles over the whole range: read back exactly. */
        srand(4711);
        for (int i = 0; i < 20000; i++) {
                uint64_t bits = 0;
                for (int k = 0; k < 4; k++)
                        bits = bits << 16 | (uint64_t) (rand() & 0xffff);
                double d;
                memcpy(&d, &bits, sizeof d);
                if (!isfinite(d))
                        continue;
                json_t *r = json_real(d);
                char *ours = adp_json_dumps(r, JSON_ENCODE_ANY);
                ASSERT_NOT_NULL(ours);
                if (strtod(ours, NULL) != d)
                        TEST_FAIL("%s does not read back as %.17g", ours, d);
                free(ours);
                json_decref(r);
        }
}

static void test_f32(void) {
        ASSERT_TRUE(adp_f32_value(21.7f) == 21.7);
        ASSERT_TRUE(adp_f32_value(0.1f) == 0.1);
        ASSERT_TRUE(adp_f32_value(-1234.5f) == -1234.5);
        ASSERT_TRUE(adp_f32_value(16777217.0f) == 16777216.0);
        ASSERT_TRUE(isnan(adp_f32_value(NAN)));
        ASSERT_TRUE(isinf(adp_f32_value(INFINITY)));
        /* Every single comes back as itself, through the shortest decimal. */
        srand(815);
        for (int i = 0; i < 100000; i++) {
                uint32_t bits = (uint32_t) rand() << 16 ^ (uint32_t) rand();
                float f;
                memcpy(&f, &bits, sizeof f);
                if (!isfinite(f))
                        continue;
                double d = adp_f32_value(f);
                if ((float) d != f)
                        TEST_FAIL("%.9g came back as %.9g", (double) f, (double) (float) d);
        }
}

int main(void) {
        TEST_RUN(test_dumps);
        TEST_RUN(test_f32);
        return 0;
}
