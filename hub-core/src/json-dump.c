/* SPDX-License-Identifier: MIT */
/* jansson 2.14's encoder (src/dump.c) rebuilt on its public API, byte for byte, with one
 * change: reals are written as the shortest round-tripping decimal (see hub/json-dump.h). */

#include <locale.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hub/json-dump.h"

/* A container on the path from the root, for jansson's circular reference check. */
struct parent {
        const json_t *json;
        const struct parent *up;
};

struct dump_ctx {
        json_dump_callback_t cb;
        void *data;
        size_t flags;
};

static int emit(const struct dump_ctx *c, const char *buf, size_t n) {
        return c->cb(buf, n, c->data) ? -1 : 0;
}

/* 32 spaces: the largest indentation step. */
static const char whitespace[] = "                                ";

static int dump_indent(const struct dump_ctx *c, unsigned depth, bool space) {
        unsigned step = (unsigned) (c->flags & JSON_MAX_INDENT);

        if (step > 0) {
                size_t n = (size_t) depth * step;

                if (emit(c, "\n", 1) < 0)
                        return -1;
                while (n > 0) {
                        size_t k = MIN(n, sizeof whitespace - 1);
                        if (emit(c, whitespace, k) < 0)
                                return -1;
                        n -= k;
                }
        } else if (space && !(c->flags & JSON_COMPACT))
                return emit(c, " ", 1);
        return 0;
}

/* jansson's utf8_iterate(): the next UTF-8 sequence of [p, lim) (non-empty), rejecting
 * continuation bytes first, overlong forms, surrogates and values above U+10FFFF. Returns
 * the end of the sequence and its code point in *ret_cp, or NULL. */
static const char *utf8_next(const char *p, const char *lim, int32_t *ret_cp) {
        unsigned char u = (unsigned char) p[0];
        size_t count;
        int32_t v;

        if (u < 0x80) {
                *ret_cp = u;
                return p + 1;
        }
        if (u >= 0xC2 && u <= 0xDF) {
                count = 2;
                v = u & 0x1F;
        } else if (u >= 0xE0 && u <= 0xEF) {
                count = 3;
                v = u & 0x0F;
        } else if (u >= 0xF0 && u <= 0xF4) {
                count = 4;
                v = u & 0x07;
        } else
                return NULL;
        if (count > (size_t) (lim - p))
                return NULL;
        for (size_t i = 1; i < count; i++) {
                u = (unsigned char) p[i];
                if (u < 0x80 || u > 0xBF)
                        return NULL;
                v = (v << 6) + (u & 0x3F);
        }
        if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF) || (count == 2 && v < 0x80) ||
            (count == 3 && v < 0x800) || (count == 4 && v < 0x10000))
                return NULL;
        *ret_cp = v;
        return p + count;
}

/* jansson's dump_string(): runs of characters that need no escape are handed over as they
 * are; on invalid UTF-8 it fails after having handed over the valid runs before it. */
static int dump_string(const struct dump_ctx *c, const char *str, size_t len) {
        const char *pos, *end, *lim = str + len;
        int32_t cp = 0;

        if (emit(c, "\"", 1) < 0)
                return -1;
        end = pos = str;
        for (;;) {
                char seq[13];
                const char *text;
                size_t length = 2;

                while (end < lim) {
                        end = utf8_next(pos, lim, &cp);
                        if (!end)
                                return -1;
                        if (cp == '\\' || cp == '"' || cp < 0x20)
                                break;
                        if ((c->flags & JSON_ESCAPE_SLASH) && cp == '/')
                                break;
                        if ((c->flags & JSON_ENSURE_ASCII) && cp > 0x7F)
                                break;
                        pos = end;
                }
                if (pos != str && emit(c, str, (size_t) (pos - str)) < 0)
                        return -1;
                if (end == pos)
                        break;

                switch (cp) {
                case '\\':
                        text = "\\\\";
                        break;
                case '"':
                        text = "\\\"";
                        break;
                case '\b':
                        text = "\\b";
                        break;
                case '\f':
                        text = "\\f";
                        break;
                case '\n':
                        text = "\\n";
                        break;
                case '\r':
                        text = "\\r";
                        break;
                case '\t':
                        text = "\\t";
                        break;
                case '/':
                        text = "\\/";
                        break;
                default:
                        if (cp < 0x10000) {
                                snprintf(seq, sizeof seq, "\\u%04X", (unsigned) cp);
                                length = 6;
                        } else {
                                int32_t v = cp - 0x10000;
                                snprintf(seq, sizeof seq, "\\u%04X\\u%04X", (unsigned) (0xD800 | ((v & 0xFFC00) >> 10)),
                                         (unsigned) (0xDC00 | (v & 0x3FF)));
                                length = 12;
                        }
                        text = seq;
                        break;
                }
                if (emit(c, text, length) < 0)
                        return -1;
                str = pos = end;
        }
        return emit(c, "\"", 1);
}

/* One "%.<precision>g" rendering of value in jansson's form; returns its length, or -1 when
 * it does not parse back to the identical double. */
static int real_candidate(double value, int precision, char *buf, size_t size) {
        const char *point = localeconv()->decimal_point;
        char *start, *end, *p;
        double back;
        size_t length;
        int r;

        r = snprintf(buf, size, "%.*g", precision, value);
        if (r < 0 || (size_t) r + 3 >= size)
                return -1;
        length = (size_t) r;

        /* strtod() reads the locale's decimal point, as snprintf() wrote it. */
        back = strtod(buf, &end);
        if (end != buf + length || memcmp(&back, &value, sizeof value) != 0)
                return -1;

        if (point[0] != '.' && point[0] != '\0' && (p = strchr(buf, point[0])))
                *p = '.';
        if (!strchr(buf, '.') && !strchr(buf, 'e')) {
                buf[length++] = '.';
                buf[length++] = '0';
                buf[length] = '\0';
        }
        /* Drop the exponent's '+' and leading zeros. */
        start = strchr(buf, 'e');
        if (start) {
                start++;
                end = start + 1;
                if (*start == '-')
                        start++;
                while (*end == '0')
                        end++;
                if (end != start) {
                        memmove(start, end, length + 1 - (size_t) (end - buf));
                        length -= (size_t) (end - start);
                }
        }
        return (int) length;
}

static int dump_real(const struct dump_ctx *c, double value) {
        char best[64], cand[64];
        int best_len = -1;

        if (!isfinite(value))
                return -1;
        for (int precision = 15; precision <= 17; precision++) {
                int n = real_candidate(value, precision, cand, sizeof cand);
                if (n < 0 || (best_len >= 0 && n >= best_len))
                        continue;
                memcpy(best, cand, (size_t) n + 1);
                best_len = n;
                /* Without an exponent a higher precision only adds digits; with one, it may
                 * switch to the (shorter) fixed notation jansson's "%.17g" uses, e.g.
                 * 1234567890123450.0 rather than 1.23456789012345e15. */
                if (!strchr(best, 'e'))
                        break;
        }
        if (best_len < 0)
                return -1;
        return emit(c, best, (size_t) best_len);
}

struct key_item {
        const char *key;
        size_t len;
        json_t *value;
};

static int compare_keys(const void *a, const void *b) {
        const struct key_item *x = a, *y = b;
        int r = memcmp(x->key, y->key, MIN(x->len, y->len));

        if (r)
                return r;
        return x->len < y->len ? -1 : x->len > y->len;
}

static int do_dump(const struct dump_ctx *c, const json_t *json, unsigned depth, const struct parent *up);

/* One member: key (an error there is ignored, as jansson does), separator, value, then the
 * comma and indentation or the closing indentation. */
static int dump_member(const struct dump_ctx *c, const char *key, size_t key_len, const json_t *value, bool last,
                       unsigned depth, const struct parent *self) {
        bool compact = c->flags & JSON_COMPACT;

        (void) dump_string(c, key, key_len);
        if (emit(c, compact ? ":" : ": ", compact ? 1 : 2) < 0 || do_dump(c, value, depth + 1, self) < 0)
                return -1;
        if (!last)
                return emit(c, ",", 1) < 0 ? -1 : dump_indent(c, depth + 1, true);
        return dump_indent(c, depth, false);
}

static int dump_object(const struct dump_ctx *c, const json_t *json, unsigned depth, const struct parent *self) {
        size_t size = json_object_size(json);
        void *iter = json_object_iter((json_t *) json);
        int r = 0;

        if (emit(c, "{", 1) < 0)
                return -1;
        if (!iter)
                return emit(c, "}", 1);
        if (dump_indent(c, depth + 1, false) < 0)
                return -1;

        if (c->flags & JSON_SORT_KEYS) {
                _cleanup_free_ struct key_item *keys = calloc(size, sizeof *keys);
                size_t n = 0;

                if (!keys)
                        return -1;
                for (; iter && n < size; iter = json_object_iter_next((json_t *) json, iter), n++)
                        keys[n] = (struct key_item) { json_object_iter_key(iter), json_object_iter_key_len(iter),
                                                      json_object_iter_value(iter) };
                if (iter || n != size)
                        return -1;
                qsort(keys, n, sizeof *keys, compare_keys);
                for (size_t i = 0; i < n && r >= 0; i++)
                        r = dump_member(c, keys[i].key, keys[i].len, keys[i].value, i + 1 == n, depth, self);
        } else
                while (iter && r >= 0) {
                        void *next = json_object_iter_next((json_t *) json, iter);
                        r = dump_member(c, json_object_iter_key(iter), json_object_iter_key_len(iter),
                                        json_object_iter_value(iter), !next, depth, self);
                        iter = next;
                }
        if (r < 0)
                return -1;
        return emit(c, "}", 1);
}

static int dump_array(const struct dump_ctx *c, const json_t *json, unsigned depth, const struct parent *self) {
        size_t n = json_array_size(json);

        if (emit(c, "[", 1) < 0)
                return -1;
        if (n == 0)
                return emit(c, "]", 1);
        if (dump_indent(c, depth + 1, false) < 0)
                return -1;
        for (size_t i = 0; i < n; i++) {
                if (do_dump(c, json_array_get(json, i), depth + 1, self) < 0)
                        return -1;
                if (i + 1 < n) {
                        if (emit(c, ",", 1) < 0 || dump_indent(c, depth + 1, true) < 0)
                                return -1;
                } else if (dump_indent(c, depth, false) < 0)
                        return -1;
        }
        return emit(c, "]", 1);
}

static int do_dump(const struct dump_ctx *c, const json_t *json, unsigned depth, const struct parent *up) {
        if (!json)
                return -1;

        switch (json_typeof(json)) {
        case JSON_NULL:
                return emit(c, "null", 4);
        case JSON_TRUE:
                return emit(c, "true", 4);
        case JSON_FALSE:
                return emit(c, "false", 5);
        case JSON_INTEGER: {
                char buf[32];
                int n = snprintf(buf, sizeof buf, "%" JSON_INTEGER_FORMAT, json_integer_value(json));
                if (n < 0 || (size_t) n >= sizeof buf)
                        return -1;
                return emit(c, buf, (size_t) n);
        }
        case JSON_REAL:
                return dump_real(c, json_real_value(json));
        case JSON_STRING:
                return dump_string(c, json_string_value(json), json_string_length(json));
        case JSON_ARRAY:
        case JSON_OBJECT: {
                const struct parent self = { .json = json, .up = up };

                /* A container inside itself: jansson refuses it. */
                for (const struct parent *p = up; p; p = p->up)
                        if (p->json == json)
                                return -1;
                return json_is_array(json) ? dump_array(c, json, depth, &self) : dump_object(c, json, depth, &self);
        }
        default:
                return -1;
        }
}

int hub_json_dump_callback(const json_t *json, json_dump_callback_t callback, void *data, size_t flags) {
        const struct dump_ctx c = { .cb = callback, .data = data, .flags = flags };

        if (!callback || (flags & ~HUB_JSON_DUMP_FLAGS))
                return -1;
        if (!(flags & JSON_ENCODE_ANY) && !json_is_array(json) && !json_is_object(json))
                return -1;
        return do_dump(&c, json, 0, NULL);
}

struct strbuf {
        char *p;
        size_t len, cap;
};

static int to_strbuf(const char *buf, size_t n, void *data) {
        struct strbuf *s = data;

        if (n >= s->cap - s->len) {
                size_t cap = MAX(s->cap * 2, s->len + n + 1);
                char *p;

                if (cap < s->len + n + 1)
                        return -1;
                p = realloc(s->p, cap);
                if (!p)
                        return -1;
                s->p = p;
                s->cap = cap;
        }
        memcpy(s->p + s->len, buf, n);
        s->len += n;
        s->p[s->len] = '\0';
        return 0;
}

char *hub_json_dumps(const json_t *json, size_t flags) {
        struct strbuf s = { .cap = 64 };
        char *shrunk;

        s.p = malloc(s.cap);
        if (!s.p)
                return NULL;
        s.p[0] = '\0';
        if (hub_json_dump_callback(json, to_strbuf, &s, flags) < 0) {
                free(s.p);
                return NULL;
        }
        shrunk = realloc(s.p, s.len + 1);
        return shrunk ? shrunk : s.p;
}

struct fixed_buf {
        char *p;
        size_t size, used;
};

static int to_fixed_buf(const char *buf, size_t n, void *data) {
        struct fixed_buf *b = data;

        if (n > SIZE_MAX - b->used)
                return -1;
        if (b->used + n <= b->size)
                memcpy(b->p + b->used, buf, n);
        b->used += n;
        return 0;
}

size_t hub_json_dumpb(const json_t *json, char *buffer, size_t size, size_t flags) {
        struct fixed_buf b = { .p = buffer, .size = buffer ? size : 0 };

        if (hub_json_dump_callback(json, to_fixed_buf, &b, flags) < 0)
                return 0;
        return b.used;
}

static int to_file(const char *buf, size_t n, void *data) {
        return fwrite(buf, n, 1, data) == 1 ? 0 : -1;
}

int hub_json_dumpf(const json_t *json, FILE *output, size_t flags) {
        if (!output)
                return -1;
        return hub_json_dump_callback(json, to_file, output, flags);
}
