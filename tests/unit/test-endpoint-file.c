/* SPDX-License-Identifier: MIT */
/* The file endpoint (gateway/uplink/endpoint-file.c), built into this test with
 * uplink-json.c and stand-ins for the framework's callbacks: its direct JSON-lines formatter
 * gives the same JSON as jansson's (uplink-json.h) for every body kind, escapes and skipped
 * values; a batch is written, fsynced and confirmed in order; rotation by size. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "hub/msg.h"
#include "test-util.h"
#include "uplink/endpoint.h"
#include "uplink/uplink-json.h"

/* ---- stand-ins for the framework (uplink.c) ---------------------------------------------- */

static uint64_t confirmed[4096];
static size_t n_confirmed;
static int n_up, n_down;

void gw_endpoint_up(struct gw_endpoint *ep) {
        n_up++;
}
void gw_endpoint_down(struct gw_endpoint *ep, int error, const char *why) {
        n_down++;
}
void gw_endpoint_confirm(struct gw_endpoint *ep, uint64_t seq, int result) {
        ASSERT_EQ(result, 0);
        if (n_confirmed < sizeof confirmed / sizeof confirmed[0])
                confirmed[n_confirmed++] = seq;
}
void gw_endpoint_count_poison(struct gw_endpoint *ep, uint64_t seq, const char *why) {
}
const char *gw_endpoint_name(const struct gw_endpoint *ep) {
        return "arch";
}

/* ---- the formatter against jansson -------------------------------------------------------- */

static struct hub_msg *msg(const void *body, size_t len) {
        struct hub_msg *m = NULL;
        ASSERT_OK(hub_msg_new(body, len, HUB_MSG_D2C_MAX_SIZE, &m));
        return m;
}

/* The line parses, equals jansson's object, and ends with exactly one newline. */
static void check_same(const struct gw_ep_item *it) {
        char *buf = NULL;
        size_t len = 0, cap = 0;
        ASSERT_OK(gw_endpoint_json_append(it, "arch", &buf, &len, &cap));
        ASSERT_TRUE(len > 2 && buf[len - 1] == '\n' && memchr(buf, '\n', len) == buf + len - 1);
        json_error_t err;
        json_t *mine = json_loadb(buf, len - 1, 0, &err);
        if (!mine)
                TEST_FAIL("not JSON: %s: %.*s", err.text, (int) len, buf);
        json_t *ref = gw_uplink_item_to_json(it, "arch");
        ASSERT_NOT_NULL(ref);
        if (!json_equal(mine, ref)) {
                char *a = json_dumps(ref, JSON_COMPACT);
                TEST_FAIL("differs:\n  mine: %.*s  jansson: %s", (int) len, buf, a);
        }
        /* Same text too (key order, escaping, number format). */
        char *txt = NULL;
        size_t tl = 0;
        ASSERT_OK(gw_uplink_item_json(it, "arch", &txt, &tl));
        if (tl != len - 1 || memcmp(txt, buf, tl) != 0)
                TEST_FAIL("text differs:\n  mine:    %.*s  jansson: %s", (int) len, buf, txt);
        free(txt);
        json_decref(mine);
        json_decref(ref);
        free(buf);
}

static void test_format(void) {
        static const char bin[] = { 'a', 0, (char) 0xff, (char) 0xc0, 'z' };
        static const char ctl[] = "tab\there \"q\" back\\slash nl\n cr\r bs\b ff\f bell\a esc\x1b del\x7f / é € 😀";
        static const char bad_utf8[] = { (char) 0xed, (char) 0xa0, (char) 0x80, 0 }; /* a surrogate */
        static const char overlong[] = { (char) 0xe0, (char) 0x80, (char) 0xaf, 0 };
        struct hub_msg *m;

        /* Text body, no properties. */
        m = msg("hello", 5);
        check_same(&(struct gw_ep_item) { .seq = 1, .enqueued_usec = 1700000000123456, .device_id = "d1", .msg = m });
        hub_msg_unref(m);

        /* Escapes everywhere, module id, system and application properties, a NULL value. */
        m = msg(ctl, sizeof ctl - 1);
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "mid-\"1\""));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "text/plain"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "d2"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, "2026-11-26T05:00:00.000000Z"));
        ASSERT_OK(hub_msg_set_prop(m, "a", "b\nc"));
        ASSERT_OK(hub_msg_set_prop(m, "empty", ""));
        ASSERT_OK(hub_msg_set_prop(m, "novalue", NULL));
        ASSERT_OK(hub_msg_set_prop(m, "ünï", "€"));
        check_same(&(struct gw_ep_item) { .seq = UINT64_C(18446744073709551615) / 2, .enqueued_usec = 0,
                                          .device_id = "dev-2", .module_id = "mod.1", .msg = m });
        /* Values that are not UTF-8 are left out, like json_string() does. */
        ASSERT_OK(hub_msg_set_prop(m, "bad", bad_utf8));
        ASSERT_OK(hub_msg_set_prop(m, overlong, "x"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, bad_utf8));
        /* ... also after a long ASCII run (the 8-byte fast path), and valid ones there are kept. */
        ASSERT_OK(hub_msg_set_prop(m, "long-bad", "0123456789abcdefghij\xed\xa0\x80"));
        ASSERT_OK(hub_msg_set_prop(m, "long-bad2", "0123456789abcdef\xc3"));
        ASSERT_OK(hub_msg_set_prop(m, "long-good", "0123456789abcdef\xc3\xa9 and more text \xf0\x9f\x98\x80"));
        check_same(&(struct gw_ep_item) { .seq = 3, .enqueued_usec = 1, .device_id = "d", .msg = m });
        hub_msg_unref(m);

        /* Binary body: base64. Empty body: an empty text. */
        m = msg(bin, sizeof bin);
        check_same(&(struct gw_ep_item) { .seq = 4, .enqueued_usec = 5, .device_id = "d", .msg = m });
        hub_msg_unref(m);
        m = msg("", 0);
        check_same(&(struct gw_ep_item) { .seq = 5, .enqueued_usec = 5, .device_id = "d", .msg = m });
        hub_msg_unref(m);

        /* JSON bodies: parsed and re-emitted compactly; invalid JSON falls back to text. */
        static const char *const jsons[] = { "{ \"t\" : 21.5, \"a\": [1, 2, {\"x\": null}], \"s\": \"\\u00e9\\n\" }",
                                             "  42 ", "\"str\"", "{\"broken\": ", "[1e400]" };
        for (size_t i = 0; i < sizeof jsons / sizeof jsons[0]; i++) {
                m = msg(jsons[i], strlen(jsons[i]));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, i % 2 ? "application/json; charset=utf-8" :
                                                                               "application/json"));
                if (i == 2)
                        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "UTF-8"));
                check_same(&(struct gw_ep_item) { .seq = 10 + i, .enqueued_usec = 7, .device_id = "d", .msg = m });
                hub_msg_unref(m);
        }
        /* A JSON body in another encoding is not parsed. */
        m = msg("{\"a\":1}", 7);
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-16"));
        check_same(&(struct gw_ep_item) { .seq = 20, .enqueued_usec = 7, .device_id = "d", .msg = m });
        hub_msg_unref(m);

        /* Random bodies and property values from an alphabet rich in what must be escaped
         * (and in UTF-8 pieces, valid or not): always the same text as jansson's. */
        static const char *const atoms[] = { "a", "bcdefgh", "\"", "\\", "\n", "\x01", "\x1f", " ", "/",
                                             "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80", "\x7f", "\xc3",
                                             "0123456789ABCDEF" };
        srand(42);
        for (unsigned k = 0; k < 2000; k++) {
                char body[200];
                size_t bl = 0;
                unsigned parts = (unsigned) rand() % 24;
                for (unsigned j = 0; j < parts; j++) {
                        const char *a = atoms[(unsigned) rand() % (sizeof atoms / sizeof atoms[0])];
                        size_t al = strlen(a);
                        if (bl + al >= sizeof body)
                                break;
                        memcpy(body + bl, a, al);
                        bl += al;
                }
                body[bl] = 0;
                m = msg(body, bl);
                if (k % 3 == 0)
                        ASSERT_OK(hub_msg_set_prop(m, "p", body[0] ? body : "x"));
                check_same(&(struct gw_ep_item) { .seq = k, .enqueued_usec = k, .device_id = "d", .msg = m });
                hub_msg_unref(m);
        }

        /* Lines append to what the buffer holds. */
        char *buf = NULL;
        size_t len = 0, cap = 0;
        m = msg("x", 1);
        for (unsigned i = 0; i < 200; i++)
                ASSERT_OK(gw_endpoint_json_append(&(struct gw_ep_item) { .seq = i, .device_id = "d", .msg = m }, "arch",
                                                  &buf, &len, &cap));
        size_t lines = 0;
        for (size_t i = 0; i < len; i++)
                lines += buf[i] == '\n';
        ASSERT_EQ(lines, 200);
        ASSERT_TRUE(cap >= len);
        free(buf);
        hub_msg_unref(m);
}

/* ---- the transport: batches, fsync, confirmations, rotation --------------------------------- */

static size_t count_lines(const char *path, uint64_t *ret_first_seq) {
        FILE *f = fopen(path, "re");
        char line[4096];
        size_t n = 0;
        if (!f)
                return 0;
        while (fgets(line, sizeof line, f)) {
                ASSERT_TRUE(line[strlen(line) - 1] == '\n');
                json_t *j = json_loads(line, 0, NULL);
                ASSERT_NOT_NULL(j);
                if (n == 0 && ret_first_seq)
                        *ret_first_seq = (uint64_t) json_integer_value(json_object_get(j, "sequenceNumber"));
                json_decref(j);
                n++;
        }
        fclose(f);
        return n;
}

static void test_send_and_rotate(void) {
        char dir[256], path[300], p1[320], p2[320];
        void *t = NULL;
        test_tmpdir(dir, sizeof dir);
        snprintf(path, sizeof path, "%s/arch.jsonl", dir);
        snprintf(p1, sizeof p1, "%s.1", path);
        snprintf(p2, sizeof p2, "%s.2", path);
        struct gw_endpoint_conf c = { .name = "arch", .type = GW_ENDPOINT_FILE, .path = path, .max_size = 4096,
                                      .max_files = 2, .fsync = GW_FILE_FSYNC_BATCH };
        ASSERT_OK(gw_endpoint_file_ops.create(NULL, &c, &t));
        ASSERT_OK(gw_endpoint_file_ops.connect(t));
        ASSERT_EQ(n_up, 1);

        /* 3 batches of 40 lines of ~190 bytes: 22,800 bytes through files of at most 4 KiB. */
        char body[64];
        memset(body, 'b', sizeof body);
        struct hub_msg *m = msg(body, sizeof body);
        struct gw_ep_item items[40];
        uint64_t seq = 100;
        n_confirmed = 0;
        for (int b = 0; b < 3; b++) {
                for (size_t i = 0; i < 40; i++)
                        items[i] = (struct gw_ep_item) { .seq = seq++, .enqueued_usec = 1700000000000000, .device_id = "d",
                                                         .msg = m };
                ASSERT_OK(gw_endpoint_file_ops.send(t, items, 40));
        }
        ASSERT_EQ(n_confirmed, 120);
        for (size_t i = 0; i < n_confirmed; i++)
                ASSERT_EQ(confirmed[i], 100 + i);
        struct stat st;
        ASSERT_OK(stat(path, &st) < 0 ? -errno : 0);
        ASSERT_TRUE(st.st_size > 0 && st.st_size <= 4096);
        ASSERT_OK(stat(p1, &st) < 0 ? -errno : 0);
        ASSERT_TRUE(st.st_size > 3500 && st.st_size <= 4096); /* full, and never over the bound */
        ASSERT_TRUE(access(p2, F_OK) < 0);                     /* max_files 2: the oldest removed */
        /* The newest file ends with the last message, and the two files hold a contiguous run. */
        uint64_t first0 = 0, first1 = 0;
        size_t n0 = count_lines(path, &first0), n1 = count_lines(p1, &first1);
        ASSERT_EQ(first1 + n1, first0);
        ASSERT_EQ(first0 + n0, seq);

        /* A single line larger than max_size still goes out (alone in its file). */
        static char big[6000];
        memset(big, 'x', sizeof big);
        struct hub_msg *mb = msg(big, sizeof big);
        items[0] = (struct gw_ep_item) { .seq = seq, .enqueued_usec = 1, .device_id = "d", .msg = mb };
        items[1] = (struct gw_ep_item) { .seq = seq + 1, .enqueued_usec = 1, .device_id = "d", .msg = m };
        ASSERT_OK(gw_endpoint_file_ops.send(t, items, 2));
        ASSERT_EQ(count_lines(path, &first0), 1);
        ASSERT_EQ(first0, seq + 1);
        ASSERT_OK(stat(p1, &st) < 0 ? -errno : 0);
        ASSERT_TRUE(st.st_size > 6000);
        ASSERT_EQ(n_confirmed, 122);
        ASSERT_EQ(n_down, 0);

        gw_endpoint_file_ops.disconnect(t);
        gw_endpoint_file_ops.destroy(t);
        hub_msg_unref(m);
        hub_msg_unref(mb);
        test_rmdir(dir);
}

int main(void) {
        TEST_RUN(test_format);
        TEST_RUN(test_send_and_rotate);
        return 0;
}
