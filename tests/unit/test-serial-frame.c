/* SPDX-License-Identifier: MIT */
/* The serial framers: every framing, one byte at a time and several frames per read,
 * oversize and garbage, resynchronisation without losing the next good frame, the
 * inter-character timeout, and encode/decode round trips. */

#include <string.h>

#include "serial-internal.h"
#include "test-util.h"

struct got {
        char frames[32][128];
        size_t lens[32];
        size_t n;
        const struct adp_serial_check *check; /* refuse frames that fail it */
};

static int collect(void *ud, const uint8_t *f, size_t len) {
        struct got *g = ud;
        if (g->check && adp_serial_check_verify(g->check, f, len) < 0)
                return -EBADMSG;
        ASSERT_TRUE(g->n < 32 && len < 128);
        memcpy(g->frames[g->n], f, len);
        g->frames[g->n][len] = 0;
        g->lens[g->n++] = len;
        return 0;
}

static void feed(struct adp_serial_stream *s, const void *p, size_t n, bool bytewise, struct got *g) {
        if (bytewise)
                for (size_t i = 0; i < n; i++)
                        ASSERT_OK(adp_serial_stream_feed(s, (const uint8_t *) p + i, 1, collect, g));
        else
                ASSERT_OK(adp_serial_stream_feed(s, p, n, collect, g));
}

static void test_line(void) {
        for (int bw = 0; bw < 2; bw++) {
                struct adp_serial_framing f = { .type = ADP_SERIAL_FRAME_LINE, .max_length = 10, .delim = "\r\n",
                                                .delim_len = 2 };
                struct adp_serial_stream s;
                struct got g = { 0 };
                ASSERT_OK(adp_serial_stream_init(&s, &f, NULL));
                const char in[] = "one\r\ntwo\r\n\r\nthree\r\nthis line is too long\r\nfour\rx\r\n";
                feed(&s, in, strlen(in), bw, &g);
                ASSERT_EQ(g.n, 4);
                ASSERT_STREQ(g.frames[0], "one");
                ASSERT_STREQ(g.frames[1], "two");
                ASSERT_STREQ(g.frames[2], "three");
                ASSERT_STREQ(g.frames[3], "four\rx");
                ASSERT_EQ(s.st.oversize, 1);
                /* A long run without delimiter: dropped, the next frame survives. */
                char junk[100];
                memset(junk, 'j', sizeof junk);
                feed(&s, junk, sizeof junk, bw, &g);
                feed(&s, "\r\nok\r\n", 6, bw, &g);
                ASSERT_EQ(g.n, 5);
                ASSERT_STREQ(g.frames[4], "ok");
                adp_serial_stream_done(&s);
        }
}

static void test_fixed_and_length(void) {
        /* Fixed length with a sync byte and a sum8 check; garbage that contains the sync byte
         * ahead of a good frame. */
        struct adp_serial_framing f = { .type = ADP_SERIAL_FRAME_FIXED, .max_length = 16, .fixed_length = 4,
                                        .sync = { 0x7E }, .sync_len = 1 };
        struct adp_serial_check c = { .type = ADP_SERIAL_CHECK_SUM8, .position = -1 };
        struct adp_serial_stream s;
        struct got g = { .check = &c };
        ASSERT_OK(adp_serial_stream_init(&s, &f, NULL));
        const uint8_t in[] = { 0x01, 0x7E, 0x02, 0x7E, 0x01, 0x02, 0x81, 0x7E, 0x05, 0x06, 0x89 };
        feed(&s, in, sizeof in, false, &g);
        ASSERT_EQ(g.n, 2);
        ASSERT_EQ((uint8_t) g.frames[0][1], 0x01);
        ASSERT_EQ((uint8_t) g.frames[1][1], 0x05);
        adp_serial_stream_done(&s);

        /* Length prefixed: AA 55 len(LE16) payload crc16-modbus; len counts payload after the
         * field, plus 2 for the CRC. */
        struct adp_serial_framing l = { .type = ADP_SERIAL_FRAME_LENGTH, .max_length = 64, .sync = { 0xAA, 0x55 },
                                        .sync_len = 2, .len_offset = 2, .len_size = 2, .len_little_endian = true,
                                        .len_adjust = 2 };
        struct adp_serial_check crc = { .type = ADP_SERIAL_CHECK_CRC16_MODBUS, .position = -2, .little_endian = true };
        uint8_t fr[16] = { 0xAA, 0x55, 3, 0, 'a', 'b', 'c' };
        ASSERT_EQ(adp_serial_check_append(&crc, fr, 7, sizeof fr), 9);
        uint8_t stream[64];
        size_t n = 0;
        const uint8_t noise[] = { 0xAA, 0x55, 0x30, 0x00, 0x12, 0xAA }; /* a fake header with a huge length */
        memcpy(stream + n, noise, sizeof noise), n += sizeof noise;
        memcpy(stream + n, fr, 9), n += 9;
        memcpy(stream + n, fr, 9), n += 9;
        for (int bw = 0; bw < 2; bw++) {
                struct got h = { .check = &crc };
                ASSERT_OK(adp_serial_stream_init(&s, &l, NULL));
                feed(&s, stream, n, bw, &h);
                /* The fake header announces 54 bytes: nothing until the line goes quiet,
                 * then the inter-character timeout resynchronises past it. */
                ASSERT_EQ(h.n, 0);
                adp_serial_stream_idle(&s, collect, &h);
                ASSERT_EQ(h.n, 2);
                ASSERT_EQ(h.lens[0], 9);
                ASSERT_TRUE(memcmp(h.frames[1], fr, 9) == 0);
                adp_serial_stream_done(&s);
        }
        /* With max_length below the fake length, resync is immediate. */
        l.max_length = 40;
        struct got h2 = { .check = &crc };
        ASSERT_OK(adp_serial_stream_init(&s, &l, NULL));
        feed(&s, stream, n, false, &h2);
        ASSERT_EQ(h2.n, 2);
        adp_serial_stream_done(&s);
        /* "frame" counting: the length is the whole frame, 1-byte field at offset 0. */
        struct adp_serial_framing w = { .type = ADP_SERIAL_FRAME_LENGTH, .max_length = 64, .len_offset = 0,
                                        .len_size = 1, .len_counts_frame = true };
        struct got k = { 0 };
        ASSERT_OK(adp_serial_stream_init(&s, &w, NULL));
        feed(&s, "\x03" "xy\x02" "z\x00\x04" "abc", 10, false, &k);
        ASSERT_EQ(k.n, 3);
        ASSERT_STREQ(k.frames[2], "\x04" "abc");
        ASSERT_EQ(s.st.bad_encoding, 1);
        adp_serial_stream_done(&s);
}

static void test_markers_slip_cobs(void) {
        /* STX/ETX with DLE escaping (xor 0x20). */
        struct adp_serial_framing f = { .type = ADP_SERIAL_FRAME_MARKERS, .max_length = 32, .start = 0x02, .end = 0x03,
                                        .has_start = true, .escape = 0x10, .escape_xor = 0x20, .has_escape = true };
        uint8_t enc[64];
        const uint8_t payload[] = { 'a', 0x02, 'b', 0x03, 0x10, 'c' };
        ssize_t n = adp_serial_frame_encode(&f, payload, sizeof payload, enc, sizeof enc);
        ASSERT_EQ(n, 1 + 6 + 3 + 1);
        for (int bw = 0; bw < 2; bw++) {
                struct adp_serial_stream s;
                struct got g = { 0 };
                ASSERT_OK(adp_serial_stream_init(&s, &f, NULL));
                feed(&s, "zz\x02trunc", 8, bw, &g); /* truncated: the next start restarts */
                feed(&s, enc, (size_t) n, bw, &g);
                feed(&s, "\x02ok\x03", 4, bw, &g);
                ASSERT_EQ(g.n, 2);
                ASSERT_TRUE(g.lens[0] == 6 && memcmp(g.frames[0], payload, 6) == 0);
                ASSERT_STREQ(g.frames[1], "ok");
                adp_serial_stream_done(&s);
        }
        /* SLIP */
        struct adp_serial_framing sl = { .type = ADP_SERIAL_FRAME_SLIP, .max_length = 32 };
        const uint8_t sp[] = { 0xC0, 1, 0xDB, 2 };
        n = adp_serial_frame_encode(&sl, sp, sizeof sp, enc, sizeof enc);
        ASSERT_EQ(n, 8);
        struct adp_serial_stream s;
        struct got g = { 0 };
        ASSERT_OK(adp_serial_stream_init(&s, &sl, NULL));
        feed(&s, "\xDB\x01\xC0", 3, false, &g); /* bad escape: dropped */
        feed(&s, enc, (size_t) n, true, &g);
        ASSERT_EQ(g.n, 1);
        ASSERT_TRUE(g.lens[0] == 4 && memcmp(g.frames[0], sp, 4) == 0);
        ASSERT_EQ(s.st.bad_encoding, 1);
        adp_serial_stream_done(&s);
        /* COBS: known vectors and a round trip through the stream. */
        uint8_t out[300], back[300];
        ASSERT_EQ(adp_serial_cobs_encode((const uint8_t *) "\x11\x22\x00\x33", 4, out, sizeof out), 5);
        ASSERT_TRUE(memcmp(out, "\x03\x11\x22\x02\x33", 5) == 0);
        ASSERT_EQ(adp_serial_cobs_encode((const uint8_t *) "\x00", 1, out, sizeof out), 2);
        ASSERT_TRUE(memcmp(out, "\x01\x01", 2) == 0);
        uint8_t big[254];
        for (size_t i = 0; i < sizeof big; i++)
                big[i] = (uint8_t) (i + 1);
        n = adp_serial_cobs_encode(big, sizeof big, out, sizeof out);
        ASSERT_EQ(n, 256);
        ASSERT_EQ(adp_serial_cobs_decode(out, (size_t) n, back, sizeof back), 254);
        ASSERT_TRUE(memcmp(back, big, 254) == 0);
        ASSERT_ERR(adp_serial_cobs_decode((const uint8_t *) "\x05\x11", 2, back, sizeof back), -EBADMSG);
        struct adp_serial_framing cf = { .type = ADP_SERIAL_FRAME_COBS, .max_length = 32 };
        struct got c = { 0 };
        ASSERT_OK(adp_serial_stream_init(&s, &cf, NULL));
        n = adp_serial_frame_encode(&cf, (const uint8_t *) "\x00hi\x00", 4, enc, sizeof enc);
        feed(&s, "\x07\x01", 2, false, &c); /* garbage then the delimiter of the encoded frame */
        feed(&s, "\x00", 1, false, &c);
        feed(&s, enc, (size_t) n, false, &c);
        feed(&s, enc, (size_t) n, false, &c);
        ASSERT_EQ(c.n, 2);
        ASSERT_TRUE(c.lens[1] == 4 && memcmp(c.frames[1], "\x00hi\x00", 4) == 0);
        adp_serial_stream_done(&s);
}

static void test_idle(void) {
        struct adp_serial_framing f = { .type = ADP_SERIAL_FRAME_IDLE, .max_length = 8, .idle_usec = 1000 };
        struct adp_serial_stream s;
        struct got g = { 0 };
        ASSERT_OK(adp_serial_stream_init(&s, &f, NULL));
        feed(&s, "abc", 3, true, &g);
        ASSERT_EQ(g.n, 0);
        adp_serial_stream_idle(&s, collect, &g);
        ASSERT_EQ(g.n, 1);
        ASSERT_STREQ(g.frames[0], "abc");
        feed(&s, "0123456789", 10, false, &g); /* max_length cuts */
        ASSERT_EQ(g.n, 2);
        adp_serial_stream_idle(&s, collect, &g);
        ASSERT_STREQ(g.frames[2], "89");
        adp_serial_stream_done(&s);
        /* On a line framer the timeout drops a partial line. */
        struct adp_serial_framing lf = { .type = ADP_SERIAL_FRAME_LINE, .max_length = 8, .delim = "\n", .delim_len = 1,
                                         .idle_usec = 1000 };
        struct got h = { 0 };
        ASSERT_OK(adp_serial_stream_init(&s, &lf, NULL));
        feed(&s, "part", 4, false, &h);
        adp_serial_stream_idle(&s, collect, &h);
        feed(&s, "whole\n", 6, false, &h);
        ASSERT_EQ(h.n, 1);
        ASSERT_STREQ(h.frames[0], "whole");
        ASSERT_EQ(s.st.idle_flushes, 1);
        adp_serial_stream_done(&s);
}

static void test_parse_bytes(void) {
        uint8_t b[8];
        size_t n;
        ASSERT_OK(adp_serial_parse_bytes("\\r\\n\\xAa\\0\\\\", b, sizeof b, &n));
        ASSERT_EQ(n, 5);
        ASSERT_TRUE(memcmp(b, "\r\n\xAA\0\\", 5) == 0);
        ASSERT_ERR(adp_serial_parse_bytes("\\xZ1", b, sizeof b, &n), -EINVAL);
        ASSERT_ERR(adp_serial_parse_bytes("\\q", b, sizeof b, &n), -EINVAL);
        ASSERT_ERR(adp_serial_parse_bytes("123456789", b, sizeof b, &n), -E2BIG);
}

int main(void) {
        test_line();
        test_fixed_and_length();
        test_markers_slip_cobs();
        test_idle();
        test_parse_bytes();
        return 0;
}
