/* SPDX-License-Identifier: MIT */
/* hub_json_dump*(): byte-identical to jansson's json_dump*() on trees without reals (random
 * trees, every supported flag combination, the failure cases), and reals written as the
 * shortest round-tripping decimal, never longer than jansson's. */

#include <float.h>
#include <locale.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/json-dump.h"
#include "json-exact.h"
#include "test-util.h"

/* xorshift64*: a fixed seed makes every run check the same trees. */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void) {
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        return rng_state * 0x2545F4914F6CDD1Dull;
}

static unsigned rnd_below(unsigned n) {
        return (unsigned) (rnd() % n);
}

/* Appends the UTF-8 encoding of cp. */
static size_t put_utf8(char *p, uint32_t cp) {
        if (cp < 0x80) {
                p[0] = (char) cp;
                return 1;
        }
        if (cp < 0x800) {
                p[0] = (char) (0xC0 | (cp >> 6));
                p[1] = (char) (0x80 | (cp & 0x3F));
                return 2;
        }
        if (cp < 0x10000) {
                p[0] = (char) (0xE0 | (cp >> 12));
                p[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
                p[2] = (char) (0x80 | (cp & 0x3F));
                return 3;
        }
        p[0] = (char) (0xF0 | (cp >> 18));
        p[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
        p[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
        p[3] = (char) (0x80 | (cp & 0x3F));
        return 4;
}

/* A random valid UTF-8 string of up to 24 code points: plain ASCII, the escaped characters,
 * control characters including NUL, '/', and 2-, 3- and 4-byte sequences. */
static size_t random_text(char *buf) {
        static const char specials[] = "\"\\/\b\f\n\r\t\x01\x1f\x7f ";
        unsigned n = rnd_below(25);
        size_t len = 0;

        for (unsigned i = 0; i < n; i++) {
                uint32_t cp;
                switch (rnd_below(8)) {
                case 0:
                        cp = (uint32_t) specials[rnd_below(sizeof specials - 1)];
                        break;
                case 1:
                        cp = rnd_below(0x20); /* control characters, NUL included */
                        break;
                case 2:
                        cp = 0x80 + rnd_below(0x800 - 0x80);
                        break;
                case 3:
                        do
                                cp = 0x800 + rnd_below(0x10000 - 0x800);
                        while (cp >= 0xD800 && cp <= 0xDFFF);
                        break;
                case 4:
                        cp = 0x10000 + rnd_below(0x110000 - 0x10000);
                        break;
                default:
                        cp = 0x20 + rnd_below(0x5F);
                        break;
                }
                len += put_utf8(buf + len, cp);
        }
        buf[len] = '\0';
        return len;
}

static json_t *random_tree(unsigned depth, bool reals);

static json_t *random_scalar(bool reals) {
        static const json_int_t ints[] = { 0, -1, 1, 42, INT64_MAX, INT64_MIN, 1000000007, -987654321 };
        char buf[25 * 4 + 1];
        size_t len;

        switch (rnd_below(reals ? 7 : 6)) {
        case 0:
                return json_null();
        case 1:
                return json_boolean(rnd_below(2));
        case 2:
                return json_integer(rnd_below(2) ? ints[rnd_below(ELEMENTSOF(ints))] : (json_int_t) rnd());
        case 6: {
                double d;
                do {
                        uint64_t bits = rnd();
                        memcpy(&d, &bits, sizeof d);
                } while (!isfinite(d));
                return json_real(rnd_below(2) ? d : (double) (int) rnd_below(2000) / 10.0);
        }
        default:
                len = random_text(buf);
                return json_stringn(buf, len);
        }
}

static json_t *random_tree(unsigned depth, bool reals) {
        unsigned kind = depth >= 5 ? 0 : rnd_below(4);
        char key[25 * 4 + 1];
        json_t *j;

        if (kind < 2)
                return random_scalar(reals);
        if (kind == 2) {
                unsigned n = rnd_below(6);
                j = json_array();
                ASSERT_NOT_NULL(j);
                for (unsigned i = 0; i < n; i++)
                        ASSERT_OK(json_array_append_new(j, random_tree(depth + 1, reals)));
                return j;
        }
        j = json_object();
        ASSERT_NOT_NULL(j);
        for (unsigned i = 0, n = rnd_below(6); i < n; i++) {
                size_t len = random_text(key);
                /* Short keys collide now and then: replacing a member keeps its place. */
                if (rnd_below(3) == 0)
                        len = (size_t) snprintf(key, sizeof key, "k%u", rnd_below(4));
                /* These trees are parsed back, and jansson's parser refuses a NUL in a key. */
                if (reals)
                        for (size_t c = 0; c < len; c++)
                                if (key[c] == '\0')
                                        key[c] = '0';
                ASSERT_OK(json_object_setn_new(j, key, len, random_tree(depth + 1, reals)));
        }
        return j;
}

static const size_t indents[] = { 0, 1, 2, 3, 4, 8, 31 };

/* The i-th of every combination of the supported flags. */
#define N_FLAG_COMBOS (ELEMENTSOF(indents) << 6)
static size_t flag_combo(size_t i) {
        size_t f = JSON_INDENT(indents[i % ELEMENTSOF(indents)]);
        i /= ELEMENTSOF(indents);
        f |= (i & 1 ? JSON_COMPACT : 0) | (i & 2 ? JSON_ENSURE_ASCII : 0) | (i & 4 ? JSON_SORT_KEYS : 0) |
             (i & 8 ? JSON_PRESERVE_ORDER : 0) | (i & 16 ? JSON_ENCODE_ANY : 0) |
             (i & 32 ? JSON_ESCAPE_SLASH : 0);
        return f;
}

struct capture {
        char buf[1 << 16];
        size_t len;
        int calls_left; /* fail the call after this many; -1: never */
};

static int capture_cb(const char *b, size_t n, void *data) {
        struct capture *c = data;

        if (c->calls_left == 0)
                return -1;
        if (c->calls_left > 0)
                c->calls_left--;
        ASSERT_TRUE(n > 0);
        ASSERT_TRUE(c->len + n <= sizeof c->buf);
        memcpy(c->buf + c->len, b, n);
        c->len += n;
        return 0;
}

/* Every entry point agrees with jansson on json and flags. */
static void check_same(const json_t *json, size_t flags) {
        char *want = json_dumps(json, flags), *got = hub_json_dumps(json, flags);

        if (!want != !got || (want && strcmp(want, got) != 0))
                TEST_FAIL("flags 0x%zx: jansson \"%s\", hub \"%s\"", flags, want ? want : "(null)",
                          got ? got : "(null)");

        /* json_dumpb: measuring, an exact buffer and a short one (a prefix is written). */
        size_t n = json_dumpb(json, NULL, 0, flags);
        ASSERT_EQ(hub_json_dumpb(json, NULL, 0, flags), n);
        if (want) {
                char *a = malloc(n + 1), *b = malloc(n + 1);
                ASSERT_TRUE(a && b);
                ASSERT_EQ(hub_json_dumpb(json, b, n, flags), json_dumpb(json, a, n, flags));
                ASSERT_TRUE(memcmp(a, b, n) == 0);
                if (n > 1) {
                        size_t k = 1 + rnd_below((unsigned) n - 1);
                        memset(a, '#', n);
                        memset(b, '#', n);
                        ASSERT_EQ(hub_json_dumpb(json, b, k, flags), json_dumpb(json, a, k, flags));
                        ASSERT_TRUE(memcmp(a, b, n) == 0);
                }
                free(a);
                free(b);
        }

        /* json_dump_callback: the same pieces' bytes, also when the callback fails midway. */
        static struct capture ca, cb;
        int limit = rnd_below(3) ? -1 : (int) rnd_below(20);
        ca = (struct capture) { .calls_left = limit };
        cb = (struct capture) { .calls_left = limit };
        ASSERT_EQ(hub_json_dump_callback(json, capture_cb, &cb, flags),
                  json_dump_callback(json, capture_cb, &ca, flags));
        ASSERT_EQ(ca.len, cb.len);
        ASSERT_TRUE(memcmp(ca.buf, cb.buf, ca.len) == 0);

        free(want);
        free(got);
}

static void test_random_trees(void) {
        for (unsigned t = 0; t < 4000; t++) {
                json_t *j = random_tree(0, false);
                ASSERT_NOT_NULL(j);
                if (t < 40)
                        for (size_t i = 0; i < N_FLAG_COMBOS; i++)
                                check_same(j, flag_combo(i));
                else
                        for (unsigned i = 0; i < 8; i++)
                                check_same(j, flag_combo(rnd_below(N_FLAG_COMBOS)));
                json_decref(j);
        }
}

static void test_fixed_trees(void) {
        static const char *const docs[] = {
                "{}", "[]", "{\"a\":{}}", "[[],{}]", "{\"a\":[1,2,{\"b\":null}],\"c\":true,\"d\":false}",
                "[\"\\u0000\\u001f\\\"\\\\/\\b\\f\\n\\r\\t\"]", "{\"\\u00e9t\\u00e9\":\"\\ud83d\\ude00 \\u20ac\"}",
                "{\"z\":1,\"a\":2,\"m\":{\"y\":[],\"b\":[[[]]]}}", "[\"a/b</script>\"]", "\"scalar\"", "42", "null",
                "{\"b\":1,\"\":3,\"a\":4,\"ab\":5,\"A\":[{\"\\u00e9\":1,\"e\":2}]}",
        };

        for (size_t d = 0; d < ELEMENTSOF(docs); d++) {
                json_t *j = json_loads(docs[d], JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
                ASSERT_NOT_NULL(j);
                for (size_t i = 0; i < N_FLAG_COMBOS; i++)
                        check_same(j, flag_combo(i));
                json_decref(j);
        }

        /* Keys with NUL bytes (json_object_setn), sorted by memcmp then length. */
        json_t *k = json_object();
        ASSERT_OK(json_object_setn_new(k, "\0a", 2, json_integer(1)));
        ASSERT_OK(json_object_setn_new(k, "\0", 1, json_integer(2)));
        ASSERT_OK(json_object_setn_new(k, "", 0, json_integer(3)));
        ASSERT_OK(json_object_setn_new(k, "a\0", 2, json_integer(4)));
        ASSERT_OK(json_object_setn_new(k, "a", 1, json_integer(5)));
        for (size_t i = 0; i < N_FLAG_COMBOS; i++)
                check_same(k, flag_combo(i));
        char *out = hub_json_dumps(k, JSON_COMPACT | JSON_SORT_KEYS);
        ASSERT_STREQ(out, "{\"\":3,\"\\u0000\":2,\"\\u0000a\":1,\"a\":5,\"a\\u0000\":4}");
        free(out);
        json_decref(k);
}

static void test_failures(void) {
        json_t *a = json_array(), *o = json_object(), *s;
        char *out;

        /* NULL, and a scalar without JSON_ENCODE_ANY. */
        ASSERT_NULL(hub_json_dumps(NULL, JSON_ENCODE_ANY));
        ASSERT_NULL(hub_json_dumps(NULL, 0));
        s = json_string("x");
        ASSERT_NULL(hub_json_dumps(s, JSON_COMPACT));
        out = hub_json_dumps(s, JSON_COMPACT | JSON_ENCODE_ANY);
        ASSERT_STREQ(out, "\"x\"");
        free(out);
        ASSERT_EQ(hub_json_dumpb(s, NULL, 0, 0), 0);
        json_decref(s);

        /* Flags it does not implement. */
        ASSERT_NULL(hub_json_dumps(a, JSON_REAL_PRECISION(5)));
        ASSERT_NULL(hub_json_dumps(a, JSON_EMBED));
        ASSERT_NULL(hub_json_dumps(a, (size_t) 1 << 20));
        ASSERT_EQ(hub_json_dump_callback(a, capture_cb, NULL, JSON_EMBED), -1);

        /* Circular references (jansson refuses a direct self-append), array in array and
         * array in object. */
        {
                json_t *b = json_array();
                ASSERT_OK(json_array_append(a, b));
                ASSERT_OK(json_array_append(b, a));
                check_same(a, JSON_COMPACT);
                check_same(b, JSON_INDENT(1));
                ASSERT_NULL(hub_json_dumps(a, JSON_COMPACT));
                ASSERT_OK(json_array_clear(b));
                ASSERT_OK(json_array_clear(a));
                json_decref(b);
        }
        ASSERT_OK(json_object_set(o, "a", a));
        ASSERT_OK(json_array_append(a, o));
        check_same(o, JSON_COMPACT | JSON_SORT_KEYS);
        ASSERT_NULL(hub_json_dumps(o, 0));
        ASSERT_OK(json_array_clear(a));
        /* The same container twice, side by side, is not a loop. */
        ASSERT_OK(json_object_set(o, "b", a));
        check_same(o, JSON_INDENT(2));
        out = hub_json_dumps(o, JSON_COMPACT);
        ASSERT_STREQ(out, "{\"a\":[],\"b\":[]}");
        free(out);
        json_decref(a);
        json_decref(o);

        /* Invalid UTF-8 smuggled in with the nocheck functions: a value fails the whole
         * dump, a key is written up to the bad byte and the dump goes on (both as jansson). */
        static const char *const bad[] = { "\xff", "a\x80", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
                                           "ok\xe2\x82", "\xe0\x80\x80" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                json_t *v = json_array(), *k = json_object();
                ASSERT_OK(json_array_append_new(v, json_string_nocheck(bad[i])));
                ASSERT_OK(json_object_set_new_nocheck(k, bad[i], json_integer(1)));
                ASSERT_OK(json_object_set_new(k, "b", json_integer(2)));
                for (size_t f = 0; f < N_FLAG_COMBOS; f += 7) {
                        check_same(v, flag_combo(f));
                        check_same(k, flag_combo(f));
                }
                ASSERT_NULL(hub_json_dumps(v, 0));
                json_decref(v);
                json_decref(k);
        }

        /* dumpf: the same bytes into a file. */
        {
                char *mem = NULL;
                size_t memlen = 0;
                FILE *f = open_memstream(&mem, &memlen);
                json_t *j = json_loads("{\"a\":[1,\"\\u00e9\"],\"b\":{}}", 0, NULL);
                ASSERT_TRUE(f && j);
                ASSERT_EQ(hub_json_dumpf(j, f, JSON_INDENT(3) | JSON_ENSURE_ASCII), 0);
                ASSERT_EQ(hub_json_dumpf(NULL, f, 0), -1);
                ASSERT_EQ(fclose(f), 0);
                out = json_dumps(j, JSON_INDENT(3) | JSON_ENSURE_ASCII);
                ASSERT_STREQ(mem, out);
                free(out);
                free(mem);
                json_decref(j);
        }
}

static char *dump_real(double d) {
        json_t *j = json_real(d);
        char *s;

        ASSERT_NOT_NULL(j);
        s = hub_json_dumps(j, JSON_ENCODE_ANY | JSON_COMPACT);
        ASSERT_NOT_NULL(s);
        json_decref(j);
        return s;
}

/* The output is a JSON real that strtod() turns back into d, bit for bit, no longer than
 * jansson's. */
static void check_real(double d) {
        json_t *j = json_real(d), *back;
        char *got, *want, *end;
        double v;

        ASSERT_NOT_NULL(j);
        got = hub_json_dumps(j, JSON_ENCODE_ANY);
        want = json_dumps(j, JSON_ENCODE_ANY);
        ASSERT_TRUE(got && want);
        v = strtod(got, &end);
        if (*end != '\0' || memcmp(&v, &d, sizeof d) != 0)
                TEST_FAIL("%.17g written as \"%s\" reads back as %.17g", d, got, v);
        if (strlen(got) > strlen(want))
                TEST_FAIL("%.17g: \"%s\" longer than jansson's \"%s\"", d, got, want);
        back = json_loads(got, JSON_DECODE_ANY, NULL);
        ASSERT_TRUE(json_is_real(back));
        v = json_real_value(back);
        ASSERT_TRUE(memcmp(&v, &d, sizeof d) == 0);
        json_decref(back);
        json_decref(j);
        free(got);
        free(want);
}

static void expect_real(double d, const char *text) {
        char *s = dump_real(d);
        ASSERT_STREQ(s, text);
        free(s);
        check_real(d);
}

/* Significant digits of a decimal's mantissa: leading and trailing zeros do not count. */
static size_t sig_digits(const char *s) {
        char digits[64];
        size_t n = 0, first = 0;

        for (; *s && *s != 'e' && *s != 'E' && n < sizeof digits; s++)
                if (*s >= '0' && *s <= '9')
                        digits[n++] = *s;
        while (first < n && digits[first] == '0')
                first++;
        while (n > first && digits[n - 1] == '0')
                n--;
        return n - first;
}

static void test_reals(void) {
        double d;

        expect_real(18.9, "18.9");
        expect_real(0.1 + 0.2, "0.30000000000000004");
        expect_real(0.1, "0.1");
        expect_real(1e300, "1e300");
        expect_real(-0.0, "-0.0");
        expect_real(0.0, "0.0");
        expect_real(1.0, "1.0");
        expect_real(-1.0, "-1.0");
        expect_real(100.0, "100.0");
        expect_real(1e22, "1e22");
        expect_real(1e15, "1e15");
        expect_real(1e-7, "1e-7");
        expect_real(1.5e-10, "1.5e-10");
        expect_real(123456.789, "123456.789");
        expect_real(-273.15, "-273.15");
        expect_real(DBL_MAX, "1.7976931348623157e308");
        expect_real(2.2250738585072014e-308, "2.2250738585072014e-308");
        /* Integers past 1e15 keep jansson's shorter fixed notation. */
        expect_real(1234567890123450.0, "1234567890123450.0");
        expect_real(9007199254740993.0, "9007199254740992.0");
        d = 5e-324;
        check_real(d);
        check_real(-5e-324);
        check_real(DBL_MIN);
        check_real(nextafter(1.0, 2.0));
        check_real(nextafter(0.1, 1.0));

        /* Inside a tree, with the formatting flags around it. */
        {
                json_t *j = json_pack("{s:f,s:[f,f,i]}", "t", 18.9, "a", 0.5, 1e-5, 3);
                char *s = hub_json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
                ASSERT_STREQ(s, "{\n  \"a\": [\n    0.5,\n    1e-5,\n    3\n  ],\n  \"t\": 18.9\n}");
                free(s);
                json_decref(j);
        }

        /* A decimal of up to 15 significant digits comes back as itself. */
        for (unsigned i = 0; i < 20000; i++) {
                char text[64], *s;
                unsigned digits = 1 + rnd_below(15);
                long long m = (long long) (rnd() % 1000000000000000ull);
                int e = (int) rnd_below(40) - 20;
                while (m >= 10 && (unsigned) snprintf(text, sizeof text, "%lld", m) > digits)
                        m /= 10;
                snprintf(text, sizeof text, "%lldE%d", m, e);
                d = strtod(text, NULL);
                s = dump_real(d);
                double a = strtod(s, NULL);
                ASSERT_TRUE(memcmp(&a, &d, sizeof d) == 0);
                /* No more significant digits than the decimal written. */
                ASSERT_TRUE(sig_digits(s) <= sig_digits(text));
                free(s);
        }

        /* Random bit patterns: every finite double round-trips. */
        for (unsigned i = 0; i < 200000; i++) {
                uint64_t bits = rnd();
                memcpy(&d, &bits, sizeof d);
                if (isfinite(d))
                        check_real(d);
        }
        /* Random values of the usual magnitudes, sensor-like. */
        for (unsigned i = 0; i < 100000; i++) {
                d = ((double) (rnd() >> 11) / 9007199254740992.0 - 0.5) * pow(10.0, (int) rnd_below(30) - 10);
                check_real(d);
                d = (double) (int64_t) (rnd() % 2000001 - 1000000) / 100.0;
                check_real(d);
        }
}

static void test_trees_with_reals(void) {
        for (unsigned t = 0; t < 3000; t++) {
                json_t *j = random_tree(0, true), *back;
                size_t flags = flag_combo(rnd_below(N_FLAG_COMBOS)) | JSON_ENCODE_ANY;
                char *s = hub_json_dumps(j, flags), *w = json_dumps(j, flags);

                ASSERT_TRUE(s && w);
                ASSERT_TRUE(strlen(s) <= strlen(w));
                back = json_loads(s, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
                ASSERT_NOT_NULL(back);
                ASSERT_TRUE(json_exact_equal(j, back, NULL));
                json_decref(back);
                json_decref(j);
                free(s);
                free(w);
        }
}

/* A locale with a decimal comma still writes a '.' (as jansson does). */
static void test_locale(void) {
        char *s;

        if (!setlocale(LC_NUMERIC, "de_DE.UTF-8") && !setlocale(LC_NUMERIC, "fr_FR.UTF-8")) {
                fprintf(stderr, "   (no decimal-comma locale installed, skipped)\n");
                return;
        }
        s = dump_real(18.9);
        ASSERT_STREQ(s, "18.9");
        free(s);
        s = dump_real(1.0);
        ASSERT_STREQ(s, "1.0");
        free(s);
        setlocale(LC_NUMERIC, "C");
}

int main(void) {
        TEST_RUN(test_fixed_trees);
        TEST_RUN(test_random_trees);
        TEST_RUN(test_failures);
        TEST_RUN(test_reals);
        TEST_RUN(test_trees_with_reals);
        TEST_RUN(test_locale);
        return 0;
}
