/* SPDX-License-Identifier: MIT */
#pragma once

/* Assertions for the C unit tests: each prints the expression, both values and errno,
 * then aborts the test binary (meson counts it failed). */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TEST_FAIL(...)                                                                 \
        do {                                                                           \
                fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, __func__);          \
                fprintf(stderr, __VA_ARGS__);                                          \
                fprintf(stderr, " (errno=%d %s)\n", errno, strerror(errno));           \
                abort();                                                               \
        } while (0)

#define ASSERT_TRUE(expr)                                                              \
        do {                                                                           \
                if (!(expr))                                                           \
                        TEST_FAIL("assertion failed: %s", #expr);                      \
        } while (0)
#define ASSERT_FALSE(expr) ASSERT_TRUE(!(expr))

#define ASSERT_OK(expr)                                                                \
        do {                                                                           \
                long long _r = (long long) (expr);                                     \
                if (_r < 0)                                                            \
                        TEST_FAIL("%s failed: %lld (%s)", #expr, _r, strerror((int) -_r)); \
        } while (0)

#define ASSERT_ERR(expr, err)                                                          \
        do {                                                                           \
                long long _r = (long long) (expr);                                     \
                if (_r != (long long) (err))                                           \
                        TEST_FAIL("%s = %lld (%s), expected %s = %lld", #expr, _r,     \
                                  _r < 0 ? strerror((int) -_r) : "ok", #err, (long long) (err)); \
        } while (0)

#define ASSERT_EQ(a, b)                                                                \
        do {                                                                           \
                long long _a = (long long) (a), _b = (long long) (b);                  \
                if (_a != _b)                                                          \
                        TEST_FAIL("%s == %s: %lld != %lld", #a, #b, _a, _b);           \
        } while (0)

#define ASSERT_STREQ(a, b)                                                             \
        do {                                                                           \
                const char *_a = (a), *_b = (b);                                       \
                if (!_a || !_b || strcmp(_a, _b) != 0)                                 \
                        TEST_FAIL("%s == %s: \"%s\" != \"%s\"", #a, #b, _a ? _a : "(null)", \
                                  _b ? _b : "(null)");                                 \
        } while (0)

#define ASSERT_NOT_NULL(p) ASSERT_TRUE((p) != NULL)
#define ASSERT_NULL(p) ASSERT_TRUE((p) == NULL)

/* Runs one test function, printing its name (TAP-like, readable in meson's log). */
#define TEST_RUN(fn)                                                                   \
        do {                                                                           \
                fprintf(stderr, "== %s\n", #fn);                                       \
                fn();                                                                  \
        } while (0)

/* Makes a fresh temporary directory (mkdtemp under $TMPDIR or /tmp) into buf. */
static inline char *test_tmpdir(char *buf, size_t n) {
        const char *t = getenv("TMPDIR");
        snprintf(buf, n, "%s/fieldhub-test-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(buf))
                TEST_FAIL("mkdtemp(%s)", buf);
        return buf;
}

/* rm -rf of a test directory (only under our own prefix). */
static inline void test_rmdir(const char *dir) {
        char cmd[4200];
        if (!strstr(dir, "fieldhub-test-"))
                return;
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0)
                fprintf(stderr, "warning: could not remove %s\n", dir);
}
