/* SPDX-License-Identifier: MIT */
/* Framers: turn the byte stream of a serial port into frames. Every framer resynchronises
 * after garbage without losing the next good frame: delimiter framers restart at the next
 * delimiter, positional framers (fixed length, length prefix) slide one byte on when a
 * candidate is refused (bad length, failed check), marker framers restart at the next start
 * marker. The stream keeps unframed bytes in one buffer (at most max_length plus one read)
 * and never copies a frame but to unescape it. */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "serial-internal.h"

#define SLIP_END 0xC0
#define SLIP_ESC 0xDB
#define SLIP_ESC_END 0xDC
#define SLIP_ESC_ESC 0xDD

const char *const adp_serial_framing_names[] = {
        [ADP_SERIAL_FRAME_LINE] = "line",
        [ADP_SERIAL_FRAME_FIXED] = "fixed",
        [ADP_SERIAL_FRAME_LENGTH] = "length",
        [ADP_SERIAL_FRAME_MARKERS] = "markers",
        [ADP_SERIAL_FRAME_SLIP] = "slip",
        [ADP_SERIAL_FRAME_COBS] = "cobs",
        [ADP_SERIAL_FRAME_IDLE] = "idle",
        [ADP_SERIAL_FRAME_PLUGIN] = "plugin",
        NULL,
};

int adp_serial_parse_bytes(const char *s, uint8_t *out, size_t cap, size_t *ret_len) {
        size_t n = 0;
        for (const char *p = s; *p; p++) {
                uint8_t b = (uint8_t) *p;
                if (*p == '\\') {
                        p++;
                        switch (*p) {
                        case 'r': b = '\r'; break;
                        case 'n': b = '\n'; break;
                        case 't': b = '\t'; break;
                        case '0': b = 0; break;
                        case '\\': b = '\\'; break;
                        case 'x': {
                                int v = 0;
                                for (int i = 1; i <= 2; i++) {
                                        char c = p[i];
                                        int d = c >= '0' && c <= '9' ? c - '0'
                                                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                                : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
                                        if (d < 0)
                                                return -EINVAL;
                                        v = v * 16 + d;
                                }
                                p += 2;
                                b = (uint8_t) v;
                                break;
                        }
                        default:
                                return -EINVAL;
                        }
                }
                if (n >= cap)
                        return -E2BIG;
                out[n++] = b;
        }
        *ret_len = n;
        return 0;
}

int adp_serial_stream_init(struct adp_serial_stream *s, const struct adp_serial_framing *f, void *plugin_state) {
        *s = (struct adp_serial_stream){ .f = f, .plugin_state = plugin_state };
        s->cap = 2 * f->max_length + 8192;
        s->buf = malloc(s->cap);
        s->out = malloc(f->max_length + 1);
        if (!s->buf || !s->out) {
                adp_serial_stream_done(s);
                return -ENOMEM;
        }
        return 0;
}

void adp_serial_stream_done(struct adp_serial_stream *s) {
        free(s->buf);
        free(s->out);
        s->buf = s->out = NULL;
}

void adp_serial_stream_reset(struct adp_serial_stream *s) {
        s->head = s->len = s->scan = 0;
        s->discarding = false;
}

static void drop(struct adp_serial_stream *s, size_t n, bool garbage) {
        s->head += n;
        s->scan = s->scan > n ? s->scan - n : 0;
        if (garbage)
                s->st.garbage_bytes += n;
}

static int hand(struct adp_serial_stream *s, const uint8_t *p, size_t n, adp_serial_frame_fn cb, void *ud) {
        int r = cb(ud, p, n);
        if (r < 0)
                s->st.rejected++;
        else
                s->st.frames++;
        return r;
}

/* Finds the sync word at or after the window start; drops what precedes it. false: not
 * there yet (a partial sync at the end is kept). */
static bool find_sync(struct adp_serial_stream *s) {
        const struct adp_serial_framing *f = s->f;
        const uint8_t *w = s->buf + s->head;
        size_t n = s->len - s->head;
        if (f->sync_len == 0)
                return true;
        for (size_t i = 0; i < n; i++) {
                size_t k = MIN(f->sync_len, n - i);
                if (memcmp(w + i, f->sync, k) == 0) {
                        drop(s, i, true);
                        return k == f->sync_len;
                }
        }
        drop(s, n, true);
        return false;
}

static uint64_t read_uint(const uint8_t *p, size_t n, bool le) {
        uint64_t v = 0;
        for (size_t i = 0; i < n; i++)
                v |= (uint64_t) p[le ? i : n - 1 - i] << (8 * i);
        return v;
}

/* One step of the framer. Returns 1 when it made progress (call again), 0 when it needs
 * more bytes. */
static int step(struct adp_serial_stream *s, adp_serial_frame_fn cb, void *ud) {
        const struct adp_serial_framing *f = s->f;
        const uint8_t *w = s->buf + s->head;
        size_t n = s->len - s->head;

        if (n == 0)
                return 0;

        switch (f->type) {
        case ADP_SERIAL_FRAME_LINE: {
                size_t dl = f->delim_len, from = s->scan > dl ? s->scan - dl + 1 : 0;
                const uint8_t *hit = n >= dl ? memmem(w + from, n - from, f->delim, dl) : NULL;
                if (!hit) {
                        s->scan = n;
                        if (n > f->max_length + dl) {
                                /* Too long: drop it all but a possible partial delimiter, and
                                 * keep dropping up to the next delimiter. */
                                if (!s->discarding)
                                        s->st.oversize++;
                                s->discarding = true;
                                drop(s, n - (dl - 1), true);
                        }
                        return 0;
                }
                size_t i = (size_t) (hit - w);
                if (s->discarding) {
                        s->discarding = false;
                        drop(s, i + dl, true);
                        return 1;
                }
                if (i > f->max_length)
                        s->st.oversize++;
                else if (i > 0)
                        (void) hand(s, w, i, cb, ud);
                drop(s, i + dl, false);
                s->scan = 0;
                return 1;
        }
        case ADP_SERIAL_FRAME_FIXED:
        case ADP_SERIAL_FRAME_LENGTH: {
                if (!find_sync(s))
                        return 0;
                w = s->buf + s->head;
                n = s->len - s->head;
                size_t total;
                if (f->type == ADP_SERIAL_FRAME_FIXED)
                        total = f->fixed_length;
                else {
                        if (n < f->len_offset + f->len_size)
                                return 0;
                        int64_t v = (int64_t) read_uint(w + f->len_offset, f->len_size, f->len_little_endian) + f->len_adjust;
                        if (!f->len_counts_frame)
                                v += (int64_t) (f->len_offset + f->len_size);
                        if (v < (int64_t) (f->len_offset + f->len_size) || v < 1 || (uint64_t) v > f->max_length) {
                                s->st.bad_encoding++;
                                drop(s, 1, true);
                                return 1;
                        }
                        total = (size_t) v;
                }
                if (n < total)
                        return 0;
                int r = hand(s, w, total, cb, ud);
                drop(s, r < 0 ? 1 : total, r < 0);
                return 1;
        }
        case ADP_SERIAL_FRAME_MARKERS: {
                if (f->has_start && w[0] != f->start) {
                        const uint8_t *st = memchr(w, f->start, n);
                        drop(s, st ? (size_t) (st - w) : n, true);
                        return st ? 1 : 0;
                }
                size_t begin = f->has_start ? 1 : 0, o = 0;
                for (size_t i = begin; i < n; i++) {
                        uint8_t b = w[i];
                        if (f->has_escape && b == f->escape) {
                                if (i + 1 >= n)
                                        return 0;
                                b = (uint8_t) (w[++i] ^ f->escape_xor);
                        } else if (b == f->end) {
                                size_t used = f->has_start && f->start == f->end ? i : i + 1;
                                if (o > 0)
                                        (void) hand(s, s->out, o, cb, ud);
                                drop(s, used ? used : 1, false);
                                return 1;
                        } else if (f->has_start && b == f->start) {
                                /* A new start before the end: what came before was a
                                 * truncated frame. Restart here. */
                                s->st.bad_encoding++;
                                drop(s, i, true);
                                return 1;
                        }
                        if (o >= f->max_length) {
                                s->st.oversize++;
                                drop(s, i + 1, true);
                                return 1;
                        }
                        s->out[o++] = b;
                }
                return 0;
        }
        case ADP_SERIAL_FRAME_SLIP:
        case ADP_SERIAL_FRAME_COBS: {
                uint8_t delim = f->type == ADP_SERIAL_FRAME_SLIP ? SLIP_END : 0;
                size_t from = s->scan;
                const uint8_t *hit = memchr(w + from, delim, n - from);
                if (!hit) {
                        s->scan = n;
                        if (n > 2 * f->max_length + 2) {
                                if (!s->discarding)
                                        s->st.oversize++;
                                s->discarding = true;
                                drop(s, n, true);
                        }
                        return 0;
                }
                size_t i = (size_t) (hit - w);
                s->scan = 0;
                if (s->discarding) {
                        s->discarding = false;
                        drop(s, i + 1, true);
                        return 1;
                }
                if (i == 0) {
                        drop(s, 1, false);
                        return 1;
                }
                ssize_t o;
                if (f->type == ADP_SERIAL_FRAME_COBS)
                        o = adp_serial_cobs_decode(w, i, s->out, f->max_length);
                else {
                        o = 0;
                        for (size_t k = 0; k < i && o >= 0; k++) {
                                uint8_t b = w[k];
                                if (b == SLIP_ESC) {
                                        if (k + 1 >= i || (w[k + 1] != SLIP_ESC_END && w[k + 1] != SLIP_ESC_ESC)) {
                                                o = -EBADMSG;
                                                break;
                                        }
                                        b = w[++k] == SLIP_ESC_END ? SLIP_END : SLIP_ESC;
                                }
                                if ((size_t) o >= f->max_length) {
                                        o = -ENOBUFS;
                                        break;
                                }
                                s->out[o++] = b;
                        }
                }
                if (o == -ENOBUFS)
                        s->st.oversize++;
                else if (o < 0)
                        s->st.bad_encoding++;
                else if (o > 0)
                        (void) hand(s, s->out, (size_t) o, cb, ud);
                drop(s, i + 1, o < 0);
                return 1;
        }
        case ADP_SERIAL_FRAME_IDLE:
                if (n >= f->max_length) {
                        (void) hand(s, w, f->max_length, cb, ud);
                        drop(s, f->max_length, false);
                        return 1;
                }
                return 0;
        case ADP_SERIAL_FRAME_PLUGIN: {
                size_t skip = 0;
                ssize_t r = f->plugin && f->plugin->frame ? f->plugin->frame(s->plugin_state, w, n, &skip) : -ENOSYS;
                if (r < 0) {
                        s->st.bad_encoding++;
                        drop(s, MAX(MIN(skip, n), (size_t) 1), true);
                        return 1;
                }
                if (skip > n || (r > 0 && skip + (size_t) r > n)) {
                        s->st.bad_encoding++;
                        drop(s, n, true);
                        return 0;
                }
                if (r == 0) {
                        drop(s, skip, true);
                        if (n - skip > f->max_length) {
                                s->st.oversize++;
                                drop(s, n - skip, true);
                        }
                        return skip > 0;
                }
                (void) hand(s, w + skip, (size_t) r, cb, ud);
                drop(s, skip, true);
                drop(s, (size_t) r, false);
                return 1;
        }
        default:
                return 0;
        }
}

static void compact(struct adp_serial_stream *s) {
        if (s->head == 0)
                return;
        memmove(s->buf, s->buf + s->head, s->len - s->head);
        s->len -= s->head;
        s->head = 0;
}

int adp_serial_stream_feed(struct adp_serial_stream *s, const uint8_t *data, size_t n, adp_serial_frame_fn cb, void *ud) {
        while (n > 0) {
                compact(s);
                size_t k = MIN(n, s->cap - s->len);
                if (k == 0) {
                        /* The framer keeps more than it should (cannot happen with the built-in
                         * framers): drop the oldest byte rather than stall. */
                        drop(s, 1, true);
                        continue;
                }
                memcpy(s->buf + s->len, data, k);
                s->len += k;
                data += k;
                n -= k;
                while (step(s, cb, ud) > 0)
                        ;
        }
        compact(s);
        return 0;
}

void adp_serial_stream_idle(struct adp_serial_stream *s, adp_serial_frame_fn cb, void *ud) {
        size_t n = s->len - s->head;
        if (n == 0)
                return;
        if (s->f->type == ADP_SERIAL_FRAME_IDLE) {
                (void) hand(s, s->buf + s->head, n, cb, ud);
                drop(s, n, false);
        } else if (s->f->type == ADP_SERIAL_FRAME_FIXED || s->f->type == ADP_SERIAL_FRAME_LENGTH) {
                /* The line is quiet, so the frame in the buffer will never complete: its
                 * header was garbage. Slide past it and rescan, so that good frames behind
                 * a false header are not lost. */
                s->st.idle_flushes++;
                while (s->len > s->head) {
                        drop(s, 1, true);
                        while (step(s, cb, ud) > 0)
                                ;
                }
        } else {
                s->st.idle_flushes++;
                drop(s, n, true);
        }
        s->discarding = false;
        s->scan = 0;
        compact(s);
}

ssize_t adp_serial_cobs_encode(const uint8_t *p, size_t n, uint8_t *out, size_t cap) {
        size_t o = 1, code_at = 0;
        uint8_t code = 1;
        if (cap < 1)
                return -ENOBUFS;
        for (size_t i = 0; i < n; i++) {
                if (p[i] == 0) {
                        out[code_at] = code;
                        code = 1;
                        code_at = o++;
                        if (o > cap)
                                return -ENOBUFS;
                        continue;
                }
                if (o >= cap)
                        return -ENOBUFS;
                out[o++] = p[i];
                if (++code == 0xff) {
                        out[code_at] = code;
                        code = 1;
                        code_at = o++;
                        if (o > cap)
                                return -ENOBUFS;
                }
        }
        out[code_at] = code;
        return (ssize_t) o;
}

ssize_t adp_serial_cobs_decode(const uint8_t *p, size_t n, uint8_t *out, size_t cap) {
        size_t o = 0, i = 0;
        while (i < n) {
                uint8_t code = p[i++];
                if (code == 0 || i + code - 1 > n)
                        return -EBADMSG;
                for (unsigned k = 1; k < code; k++) {
                        if (p[i] == 0)
                                return -EBADMSG;
                        if (o >= cap)
                                return -ENOBUFS;
                        out[o++] = p[i++];
                }
                if (code != 0xff && i < n) {
                        if (o >= cap)
                                return -ENOBUFS;
                        out[o++] = 0;
                }
        }
        return (ssize_t) o;
}

ssize_t adp_serial_frame_encode(const struct adp_serial_framing *f, const uint8_t *p, size_t n, uint8_t *out, size_t cap) {
        size_t o = 0;
#define PUT(b)                                  \
        do {                                    \
                if (o >= cap)                   \
                        return -ENOBUFS;        \
                out[o++] = (uint8_t) (b);       \
        } while (0)
        switch (f->type) {
        case ADP_SERIAL_FRAME_LINE:
                if (n + f->delim_len > cap)
                        return -ENOBUFS;
                memcpy(out, p, n);
                memcpy(out + n, f->delim, f->delim_len);
                return (ssize_t) (n + f->delim_len);
        case ADP_SERIAL_FRAME_SLIP:
                PUT(SLIP_END);
                for (size_t i = 0; i < n; i++) {
                        if (p[i] == SLIP_END) {
                                PUT(SLIP_ESC);
                                PUT(SLIP_ESC_END);
                        } else if (p[i] == SLIP_ESC) {
                                PUT(SLIP_ESC);
                                PUT(SLIP_ESC_ESC);
                        } else
                                PUT(p[i]);
                }
                PUT(SLIP_END);
                return (ssize_t) o;
        case ADP_SERIAL_FRAME_COBS: {
                ssize_t r = adp_serial_cobs_encode(p, n, out, cap > 0 ? cap - 1 : 0);
                if (r < 0)
                        return r;
                o = (size_t) r;
                PUT(0);
                return (ssize_t) o;
        }
        case ADP_SERIAL_FRAME_MARKERS:
                if (f->has_start)
                        PUT(f->start);
                for (size_t i = 0; i < n; i++) {
                        bool special = p[i] == f->end || (f->has_start && p[i] == f->start) ||
                                       (f->has_escape && p[i] == f->escape);
                        if (special && f->has_escape) {
                                PUT(f->escape);
                                PUT(p[i] ^ f->escape_xor);
                        } else
                                PUT(p[i]);
                }
                PUT(f->end);
                return (ssize_t) o;
        default:
                if (n > cap)
                        return -ENOBUFS;
                memcpy(out, p, n);
                return (ssize_t) n;
        }
#undef PUT
}
