/* SPDX-License-Identifier: MIT */
/* gateway/log.c: levels, %m and return values, secret masking, rate limiting with the
 * suppression report. Output goes to stderr, which the test points at a file. */

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "test-util.h"

static char tmp[256];
static char path[300];
static int saved_stderr;

static void capture_begin(void) {
        snprintf(path, sizeof path, "%s/stderr", tmp);
        fflush(stderr);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        ASSERT_TRUE(fd >= 0);
        ASSERT_TRUE(dup2(fd, STDERR_FILENO) >= 0);
        close(fd);
}

static char *capture_end(void) {
        static char buf[65536];
        fflush(stderr);
        ASSERT_TRUE(dup2(saved_stderr, STDERR_FILENO) >= 0);
        FILE *f = fopen(path, "re");
        ASSERT_NOT_NULL(f);
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
        return buf;
}

static int count(const char *hay, const char *needle) {
        int n = 0;
        for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
                n++;
        return n;
}

static void test_levels_and_errno(void) {
        gw_log_setup(GW_LOG_TO_STDERR, LOG_INFO);
        capture_begin();
        int r = gw_log_errno(LOG_ERR, ENOENT, "open %s: %m", "x.yaml");
        gw_log_debug("hidden debug line");
        gw_log_full(LOG_WARNING, 0, GW_FIELDS(.component = "store", .device = "dev7"), "careful");
        char *out = capture_end();
        ASSERT_EQ(r, -ENOENT);
        ASSERT_TRUE(strstr(out, "<3>open x.yaml: No such file or directory\n") != NULL);
        ASSERT_TRUE(strstr(out, "hidden debug line") == NULL);
        ASSERT_TRUE(strstr(out, "<4>store: careful [device=dev7]\n") != NULL);
        ASSERT_EQ(gw_log_errno(LOG_DEBUG, -EIO, "x"), -EIO);
        ASSERT_EQ(gw_log_errno(LOG_DEBUG, 0, "x"), 0);
}

static void test_secrets_masked(void) {
        char s1[] = "token SharedAccessSignature sr=h%2Fdevices%2Fd&sig=AbC%2Bdef%3D&se=17";
        gw_log_scrub(s1);
        ASSERT_STREQ(s1, "token SharedAccessSignature sr=h%2Fdevices%2Fd&sig=***&se=17");
        char s2[] = "HostName=h.x;DeviceId=d;SharedAccessKey=QUJDREVGR0hJSktMTU5PUA==";
        gw_log_scrub(s2);
        ASSERT_STREQ(s2, "HostName=h.x;DeviceId=d;SharedAccessKey=***");
        char s3[] = "{\"primaryKey\":\"abcdefgh\",\"secondaryKey\": \"ijklmnop\"}";
        gw_log_scrub(s3);
        ASSERT_STREQ(s3, "{\"primaryKey\":\"***\",\"secondaryKey\": \"***\"}");

        ASSERT_OK(gw_log_add_secret("s3cr3t-value-1234"));
        gw_log_setup(GW_LOG_TO_STDERR, LOG_DEBUG);
        capture_begin();
        gw_log_info("the key is s3cr3t-value-1234, twice: s3cr3t-value-1234.");
        char *out = capture_end();
        ASSERT_TRUE(strstr(out, "s3cr3t") == NULL);
        ASSERT_TRUE(strstr(out, "the key is ***, twice: ***.") != NULL);
        gw_log_clear_secrets();
        char s4[] = "s3cr3t-value-1234";
        gw_log_scrub(s4);
        ASSERT_STREQ(s4, "s3cr3t-value-1234");
}

static void emit_many(int n, const char *dev) {
        for (int i = 0; i < n; i++)
                gw_log_full(LOG_ERR, 0, GW_FIELDS(.device = dev), "sensor %s timed out (%d)", dev, i);
}

static void test_rate_limit(void) {
        gw_log_setup(GW_LOG_TO_STDERR, LOG_INFO);
        gw_log_set_rate_limit(200 * 1000, 3);
        capture_begin();
        emit_many(10, "flappy");
        emit_many(2, "calm"); /* another device: its own budget */
        gw_log_event(LOG_NOTICE, 0, "00000000000000000000000000000000", "x", "operator event %d", 1);
        gw_log_event(LOG_NOTICE, 0, "00000000000000000000000000000000", "x", "operator event %d", 2);
        gw_log_event(LOG_NOTICE, 0, "00000000000000000000000000000000", "x", "operator event %d", 3);
        gw_log_event(LOG_NOTICE, 0, "00000000000000000000000000000000", "x", "operator event %d", 4);
        usleep(250 * 1000);
        gw_log_flush_suppressed();
        char *out = capture_end();
        ASSERT_EQ(count(out, "sensor flappy timed out"), 3 + 1 /* the sample in the report */);
        ASSERT_EQ(count(out, "sensor calm timed out"), 2);
        ASSERT_EQ(count(out, "operator event"), 4); /* never rate-limited */
        ASSERT_TRUE(strstr(out, "Suppressed 7 messages like: sensor flappy timed out (0)") != NULL);

        /* A new window starts afresh. */
        capture_begin();
        emit_many(2, "flappy");
        out = capture_end();
        ASSERT_EQ(count(out, "sensor flappy timed out"), 2);
        gw_log_set_rate_limit(30 * 1000 * 1000, 10);
}

int main(void) {
        saved_stderr = dup(STDERR_FILENO);
        test_tmpdir(tmp, sizeof tmp);
        TEST_RUN(test_levels_and_errno);
        TEST_RUN(test_secrets_masked);
        TEST_RUN(test_rate_limit);
        test_rmdir(tmp);
        return 0;
}
