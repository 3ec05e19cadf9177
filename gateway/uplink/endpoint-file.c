/* SPDX-License-Identifier: MIT */
/* The file endpoint: one JSON object per line (JSON lines) appended to a file under the logs
 * directory, rotated by size (file → file.1 → … → file.<max_files-1>, the oldest removed).
 * With fsync: batch (the default) each batch is fsynced before it is confirmed, so the cursor
 * never passes a line that a power cut could lose.
 *
 * A batch is formatted into one buffer and leaves in one write() (one per file when it
 * rotates), then one fdatasync(). The lines are written by gw_endpoint_json_append() below,
 * a direct formatter of uplink-json.h's shape (jansson's object building and dumping cost
 * ~140,000 instructions per message; this costs a few thousand): same keys, same order, same
 * escaping and UTF-8 rule as jansson's compact dump. Only a JSON body (application/json) still
 * goes through jansson, to be parsed and re-emitted compactly. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/base64.h>

#include "endpoint.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/msg.h"
#include "log.h"
#include "uplink-json.h"

/* ---- JSON lines ------------------------------------------------------------------------- */

struct jbuf {
        char *p;
        size_t n, cap;
        bool oom;
};

static bool jb_reserve(struct jbuf *b, size_t extra) {
        if (b->oom)
                return false;
        if (b->n + extra <= b->cap)
                return true;
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + extra)
                cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) {
                b->oom = true;
                return false;
        }
        b->p = np;
        b->cap = cap;
        return true;
}

static void jb_put(struct jbuf *b, const char *s, size_t len) {
        if (!jb_reserve(b, len))
                return;
        memcpy(b->p + b->n, s, len);
        b->n += len;
}

#define JB_LIT(b, lit) jb_put((b), "" lit, sizeof(lit) - 1)

/* The length of the valid UTF-8 sequence at s (n bytes left), 0 when invalid: jansson's
 * rule (no overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const unsigned char *s, size_t n) {
        unsigned c = s[0], len, v;
        if (c < 0x80)
                return 1;
        if (c < 0xC2)
                return 0;
        if (c < 0xE0)
                len = 2, v = c & 0x1F;
        else if (c < 0xF0)
                len = 3, v = c & 0x0F;
        else if (c < 0xF5)
                len = 4, v = c & 0x07;
        else
                return 0;
        if (n < len)
                return 0;
        for (unsigned i = 1; i < len; i++) {
                if (s[i] < 0x80 || s[i] > 0xBF)
                        return 0;
                v = (v << 6) | (s[i] & 0x3F);
        }
        if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) || (len == 3 && v < 0x800) || (len == 4 && v < 0x10000))
                return 0;
        return len;
}

static bool utf8_valid(const char *s, size_t n) {
        const unsigned char *p = (const unsigned char *) s;
        size_t i = 0;
        /* ASCII runs 8 bytes at a time. */
        while (i + 8 <= n) {
                uint64_t w;
                memcpy(&w, p + i, 8);
                if (w & UINT64_C(0x8080808080808080))
                        break;
                i += 8;
        }
        while (i < n) {
                if (p[i] < 0x80) {
                        i++;
                        continue;
                }
                size_t l = utf8_seq(p + i, n - i);
                if (l == 0)
                        return false;
                i += l;
        }
        return true;
}

/* A JSON string of n bytes of valid UTF-8, escaped as jansson's dump does (", \, and
 * control characters; \b \f \n \r \t short, the others \u00XX; nothing else). */
static void jb_str(struct jbuf *b, const char *s, size_t n) {
        static const char hex[] = "0123456789ABCDEF";
        /* Room for the worst case (every byte \u00XX), so the loop writes without checks. */
        if (!jb_reserve(b, 6 * n + 2))
                return;
        char *o = b->p + b->n;
        *o++ = '"';
        for (size_t i = 0; i < n; i++) {
                /* 8 bytes at a time while none needs an escape (no byte < 0x20, '"' or '\\'). */
                while (i + 8 <= n) {
                        uint64_t w, q, bs;
                        const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
                        memcpy(&w, s + i, 8);
                        q = w ^ (ones * '"');
                        bs = w ^ (ones * '\\');
                        /* (x - ones) & ~x & highs is non-zero iff some byte of x is 0 (or < 0x20
                         * for x - 0x20 * ones): exact for bytes < 0x80, and the bytes >= 0x80
                         * never trigger it because of the & ~x. */
                        if ((((w - ones * 0x20) & ~w) | ((q - ones) & ~q) | ((bs - ones) & ~bs)) & highs)
                                break;
                        memcpy(o, s + i, 8);
                        o += 8;
                        i += 8;
                }
                if (i >= n)
                        break;
                unsigned char c = (unsigned char) s[i];
                if (c >= 0x20 && c != '"' && c != '\\') {
                        *o++ = (char) c;
                        continue;
                }
                *o++ = '\\';
                switch (c) {
                case '"': *o++ = '"'; break;
                case '\\': *o++ = '\\'; break;
                case '\b': *o++ = 'b'; break;
                case '\f': *o++ = 'f'; break;
                case '\n': *o++ = 'n'; break;
                case '\r': *o++ = 'r'; break;
                case '\t': *o++ = 't'; break;
                default:
                        *o++ = 'u';
                        *o++ = '0';
                        *o++ = '0';
                        *o++ = hex[c >> 4];
                        *o++ = hex[c & 15];
                }
        }
        *o++ = '"';
        b->n = (size_t) (o - b->p);
}

static void jb_u64(struct jbuf *b, uint64_t v) {
        char t[24];
        size_t i = sizeof t;
        do {
                t[--i] = (char) ('0' + v % 10);
                v /= 10;
        } while (v);
        jb_put(b, t + i, sizeof t - i);
}

static void jb_body(struct jbuf *b, const struct hub_msg *m) {
        size_t len;
        const char *body = hub_msg_body(m, &len);
        if (gw_uplink_is_json_message(m)) {
                json_t *v = json_loadb(body, len, JSON_DECODE_ANY, NULL);
                if (v) {
                        size_t need = hub_json_dumpb(v, NULL, 0, JSON_COMPACT | JSON_ENCODE_ANY);
                        JB_LIT(b, "\"body\":");
                        if (need > 0 && jb_reserve(b, need))
                                b->n += hub_json_dumpb(v, b->p + b->n, need, JSON_COMPACT | JSON_ENCODE_ANY);
                        else if (need == 0)
                                b->oom = true;
                        json_decref(v);
                        return;
                }
        }
        if (body && utf8_valid(body, len)) { /* (json_stringn(NULL, 0) is NULL: base64 "") */
                JB_LIT(b, "\"bodyText\":");
                jb_str(b, body, len);
                return;
        }
        size_t olen = 0;
        (void) mbedtls_base64_encode(NULL, 0, &olen, (const unsigned char *) body, len);
        JB_LIT(b, "\"bodyBase64\":\"");
        if (jb_reserve(b, olen + 1) &&
            mbedtls_base64_encode((unsigned char *) b->p + b->n, olen + 1, &olen, (const unsigned char *) body, len) == 0)
                b->n += olen;
        else
                b->oom = true;
        JB_LIT(b, "\"");
}

int gw_endpoint_json_append(const struct gw_ep_item *it, const char *endpoint, char **buf, size_t *len,
                            size_t *cap) {
        struct jbuf b = { .p = *buf, .n = *len, .cap = *cap };
        char ts[32];
        bool first;

        JB_LIT(&b, "{\"endpoint\":");
        jb_str(&b, endpoint, strlen(endpoint));
        JB_LIT(&b, ",\"sequenceNumber\":");
        jb_u64(&b, it->seq);
        JB_LIT(&b, ",\"enqueuedTime\":");
        const char *t = hub_time_format_iso8601(it->enqueued_usec, ts);
        jb_str(&b, t, strlen(t));
        JB_LIT(&b, ",\"deviceId\":");
        jb_str(&b, it->device_id, strlen(it->device_id));
        JB_LIT(&b, ",\"moduleId\":");
        if (it->module_id)
                jb_str(&b, it->module_id, strlen(it->module_id));
        else
                JB_LIT(&b, "null");
        /* Values that are not valid UTF-8 are left out, as json_string() refuses them. */
        JB_LIT(&b, ",\"systemProperties\":{");
        first = true;
        for (unsigned p = 0; p < _HUB_SYS_MAX; p++) {
                const char *v = hub_msg_get_sys(it->msg, p), *n = hub_sys_prop_wire_name(p);
                size_t vl;
                if (!v || !n || !utf8_valid(v, vl = strlen(v)))
                        continue;
                if (!first)
                        JB_LIT(&b, ",");
                first = false;
                jb_str(&b, n, strlen(n));
                JB_LIT(&b, ":");
                jb_str(&b, v, vl);
        }
        JB_LIT(&b, "},\"properties\":{");
        first = true;
        for (size_t i = 0; i < hub_msg_n_props(it->msg); i++) {
                const struct hub_msg_prop *p = hub_msg_prop_at(it->msg, i);
                size_t nl = strlen(p->name), vl = p->value ? strlen(p->value) : 0;
                if (!utf8_valid(p->name, nl) || (p->value && !utf8_valid(p->value, vl)))
                        continue;
                if (!first)
                        JB_LIT(&b, ",");
                first = false;
                jb_str(&b, p->name, nl);
                JB_LIT(&b, ":");
                if (p->value)
                        jb_str(&b, p->value, vl);
                else
                        JB_LIT(&b, "null");
        }
        JB_LIT(&b, "},");
        jb_body(&b, it->msg);
        JB_LIT(&b, "}\n");
        *buf = b.p;
        *cap = b.cap;
        if (b.oom)
                return -ENOMEM; /* *len unchanged: the partial line is not part of the buffer */
        *len = b.n;
        return 0;
}

struct file_ep {
        struct gw_endpoint *ep;
        char *path;
        uint64_t max_size;
        unsigned max_files;
        enum gw_file_fsync fsync;
        int fd;
        uint64_t size;
        char *buf; /* the batch being formatted */
        size_t buf_cap;
};

static int file_create(struct gw_endpoint *ep, const struct gw_endpoint_conf *c, void **ret) {
        struct file_ep *f = calloc(1, sizeof *f);
        if (!f)
                return -ENOMEM;
        f->ep = ep;
        f->fd = -1;
        f->path = strdup(c->path);
        f->max_size = c->max_size;
        f->max_files = c->max_files;
        f->fsync = c->fsync;
        if (!f->path) {
                free(f);
                return -ENOMEM;
        }
        *ret = f;
        return 0;
}

static void file_disconnect(void *t) {
        struct file_ep *f = t;
        if (f->fd >= 0)
                close(f->fd);
        f->fd = -1;
}

static void file_destroy(void *t) {
        struct file_ep *f = t;
        file_disconnect(f);
        free(f->buf);
        free(f->path);
        free(f);
}

static int file_open(struct file_ep *f) {
        struct stat st;
        f->fd = open(f->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (f->fd < 0)
                return -errno;
        if (fstat(f->fd, &st) < 0)
                return -errno;
        f->size = (uint64_t) st.st_size;
        return 0;
}

static int file_connect(void *t) {
        struct file_ep *f = t;
        int r = file_open(f);
        if (r < 0) {
                char why[512];
                snprintf(why, sizeof why, "cannot open %s", f->path);
                gw_endpoint_down(f->ep, r, why);
                return 0;
        }
        gw_endpoint_up(f->ep);
        return 0;
}

static int rotate(struct file_ep *f) {
        char from[4200], to[4200];
        if (f->fsync == GW_FILE_FSYNC_BATCH && fsync(f->fd) < 0)
                return -errno;
        close(f->fd);
        f->fd = -1;
        if (f->max_files <= 1) {
                if (unlink(f->path) < 0 && errno != ENOENT)
                        return -errno;
        } else {
                for (unsigned i = f->max_files - 1; i >= 1; i--) {
                        if (i == 1)
                                snprintf(from, sizeof from, "%s", f->path);
                        else
                                snprintf(from, sizeof from, "%s.%u", f->path, i - 1);
                        snprintf(to, sizeof to, "%s.%u", f->path, i);
                        if (rename(from, to) < 0 && errno != ENOENT)
                                return -errno;
                }
        }
        return file_open(f);
}

static int write_all(int fd, const char *p, size_t n) {
        while (n > 0) {
                ssize_t w = write(fd, p, n);
                if (w < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += w;
                n -= (size_t) w;
        }
        return 0;
}

static int file_send(void *t, const struct gw_ep_item *items, size_t n) {
        struct file_ep *f = t;
        const char *name = gw_endpoint_name(f->ep);
        size_t len = 0; /* formatted, not yet written */
        int r;
        for (size_t i = 0; i < n; i++) {
                size_t start = len;
                r = gw_endpoint_json_append(&items[i], name, &f->buf, &len, &f->buf_cap);
                if (r < 0)
                        return r;
                /* The line that would overflow the file goes to the next one: write what
                 * precedes it, rotate, and keep it at the front of the buffer. */
                if (f->size + start > 0 && f->size + len > f->max_size) {
                        if (start > 0) {
                                if ((r = write_all(f->fd, f->buf, start)) < 0)
                                        return r;
                                f->size += start;
                                memmove(f->buf, f->buf + start, len - start);
                                len -= start;
                        }
                        if ((r = rotate(f)) < 0)
                                return r;
                }
        }
        if (len > 0 && (r = write_all(f->fd, f->buf, len)) < 0)
                return r;
        f->size += len;
        if (f->fsync == GW_FILE_FSYNC_BATCH && fdatasync(f->fd) < 0)
                return -errno;
        for (size_t i = 0; i < n; i++)
                gw_endpoint_confirm(f->ep, items[i].seq, 0);
        return 0;
}

const struct gw_endpoint_ops gw_endpoint_file_ops = {
        .type = "file",
        .create = file_create,
        .connect = file_connect,
        .send = file_send,
        .disconnect = file_disconnect,
        .destroy = file_destroy,
};
