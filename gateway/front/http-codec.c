/* SPDX-License-Identifier: MIT */
/* HTTP/1.1 server codec: see http-codec.h for the contract and the accepted grammar.
 *
 * The parser is a byte-driven state machine. Request line, header and trailer lines are
 * collected into bounded buffers (CRLF replaced by a NUL), and each line is parsed when its
 * LF arrives; bodies are copied with memcpy. Everything that decides a status depends only
 * on the byte sequence, never on where the input was split, so feeding a request one byte
 * at a time gives the same result as feeding it whole (the fuzz target checks this).
 * Header fields are indexed by offset while the head buffer may still grow; pointers are
 * made once the header section is complete, and stay valid until the next request. */

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#include "front/http-codec.h"
#include "hub/json-dump.h"
#include "hub/macro.h"
#include "hub/random.h"

static inline void *mfree(void *p) {
        free(p);
        return NULL;
}

#define METHOD_MAX 32u
#define EMPTY_LINES_MAX 4u
#define KEEP_BUF_MAX 4096u /* buffers up to this size are kept between requests */

enum state {
        ST_START,         /* before a request line; leading CRLFs skipped */
        ST_START_LF,      /* CR of an empty leading line seen */
        ST_REQ_LINE,
        ST_HEADER_LINE,
        ST_HEADERS_DONE,  /* GW_HTTP_HEADERS returned, body not started */
        ST_BODY_CL,
        ST_CHUNK_SIZE,
        ST_CHUNK_BWS,     /* whitespace after the chunk size: only ";" may follow */
        ST_CHUNK_EXT,
        ST_CHUNK_SIZE_LF,
        ST_CHUNK_DATA,
        ST_CHUNK_DATA_CR,
        ST_CHUNK_DATA_LF,
        ST_TRAILER_LINE,
        ST_DONE,          /* GW_HTTP_REQUEST returned */
        ST_ERROR,
};

struct field_ix {
        size_t name;
        size_t value;
        size_t value_len;
};

/* A bounded, growable line store (head or trailers) plus its field index. */
struct block {
        char *buf;
        size_t len, cap, max;
        struct field_ix *ix;
        size_t n_ix, ix_cap;
};

struct gw_http_parser {
        struct gw_http_limits limits;
        size_t body_max; /* this request's limit */
        enum state state;

        unsigned empty_lines;
        bool cr;                /* the previous byte of the current line was CR */
        size_t line_start;      /* offset of the current line in its block */
        unsigned req_sp;        /* SPs seen in the request line */
        size_t target_off, version_off;
        size_t section_bytes;   /* header (or trailer) section bytes so far */

        struct block head;
        struct block trl;

        /* request line results (offsets into head.buf) */
        size_t path_off, query_off;
        bool has_query, path_static_slash, path_star;
        size_t host_off, host_len; /* absolute-form authority */
        bool has_abs_host;

        /* body */
        uint8_t *body;
        size_t body_len, body_cap;
        uint64_t remaining;
        uint64_t chunk_size;
        bool chunk_digits;
        size_t chunk_line_len;

        char *aux; /* host copy and decoded query */
        struct gw_http_header *headers, *trailers;
        struct gw_http_param *params;
        struct gw_http_request req;

        int error_status;
        const char *error_message;
};

void gw_http_limits_default(struct gw_http_limits *l) {
        *l = (struct gw_http_limits) {
                .request_line_max = GW_HTTP_REQUEST_LINE_MAX_DEFAULT,
                .header_bytes_max = GW_HTTP_HEADER_BYTES_MAX_DEFAULT,
                .header_count_max = GW_HTTP_HEADER_COUNT_MAX_DEFAULT,
                .body_max = GW_HTTP_BODY_MAX_DEFAULT,
                .chunk_line_max = GW_HTTP_CHUNK_LINE_MAX_DEFAULT,
                .trailer_bytes_max = GW_HTTP_TRAILER_BYTES_MAX_DEFAULT,
        };
}

/* ---- character classes --------------------------------------------------------------- */

static bool is_tchar(uint8_t c) {
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
                return true;
        return c && strchr("!#$%&'*+-.^_`|~", c);
}

static bool is_ows(uint8_t c) {
        return c == ' ' || c == '\t';
}

/* field-vchar / SP / HTAB / obs-text */
static bool is_field_char(uint8_t c) {
        return c == '\t' || (c >= 0x20 && c != 0x7f);
}

static bool is_unreserved(uint8_t c) {
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               c == '-' || c == '.' || c == '_' || c == '~';
}

static bool is_sub_delim(uint8_t c) {
        return c && strchr("!$&'()*+,;=", c);
}

static bool is_pchar(uint8_t c) {
        return is_unreserved(c) || is_sub_delim(c) || c == ':' || c == '@';
}

static int hexval(uint8_t c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

/* Checks n bytes of s: pchar, "/" (and "?" when in_query), well-formed %HH. */
static bool valid_uri_part(const char *s, size_t n, bool in_query) {
        for (size_t i = 0; i < n; i++) {
                uint8_t c = (uint8_t) s[i];
                if (c == '%') {
                        if (n - i < 3 || hexval((uint8_t) s[i + 1]) < 0 || hexval((uint8_t) s[i + 2]) < 0)
                                return false;
                        i += 2;
                } else if (!(is_pchar(c) || c == '/' || (in_query && c == '?')))
                        return false;
        }
        return true;
}

/* Percent-decodes n bytes of s into out (room for n + 1 bytes), NUL-terminated. -EINVAL on a
 * malformed escape or a decoded NUL. */
static int pct_decode(const char *s, size_t n, bool plus_is_space, char *out, size_t *ret_len) {
        size_t o = 0;
        for (size_t i = 0; i < n; i++) {
                uint8_t c = (uint8_t) s[i];
                if (c == '%') {
                        if (n - i < 3)
                                return -EINVAL;
                        int h = hexval((uint8_t) s[i + 1]), l = hexval((uint8_t) s[i + 2]);
                        if (h < 0 || l < 0)
                                return -EINVAL;
                        c = (uint8_t) (h << 4 | l);
                        if (c == 0)
                                return -EINVAL;
                        i += 2;
                } else if (c == '+' && plus_is_space)
                        c = ' ';
                else if (c == 0)
                        return -EINVAL;
                out[o++] = (char) c;
        }
        out[o] = '\0';
        if (ret_len)
                *ret_len = o;
        return 0;
}

/* ---- small helpers --------------------------------------------------------------------- */

static int set_error(struct gw_http_parser *p, int status, const char *message) {
        p->state = ST_ERROR;
        p->error_status = status;
        p->error_message = message;
        return GW_HTTP_ERROR;
}

static int set_enomem(struct gw_http_parser *p) {
        (void) set_error(p, 500, "Out of memory");
        return -ENOMEM;
}

/* Makes room for one more byte in b (never beyond b->max). -ENOBUFS over the bound. */
static int block_reserve(struct block *b, size_t extra) {
        if (b->len + extra <= b->cap)
                return 0;
        if (b->len + extra > b->max)
                return -ENOBUFS;
        size_t cap = b->cap ? b->cap * 2 : 256;
        if (cap < b->len + extra)
                cap = b->len + extra;
        if (cap > b->max)
                cap = b->max;
        char *n = realloc(b->buf, cap);
        if (!n)
                return -ENOMEM;
        b->buf = n;
        b->cap = cap;
        return 0;
}

static void block_reset(struct block *b) {
        if (b->cap > KEEP_BUF_MAX) {
                b->buf = mfree(b->buf);
                b->cap = 0;
        }
        b->len = 0;
        if (b->ix_cap > 32) {
                free(b->ix);
                b->ix = NULL;
                b->ix_cap = 0;
        }
        b->n_ix = 0;
}

static void block_done(struct block *b) {
        free(b->buf);
        free(b->ix);
        *b = (struct block) {};
}

static bool ci_eq(const char *a, size_t alen, const char *b) {
        size_t blen = strlen(b);
        return alen == blen && strncasecmp(a, b, alen) == 0;
}

/* Iterates over the comma-separated elements of a list value, OWS trimmed. Returns false at
 * the end. Empty elements are returned too (len 0). */
static bool list_next(const char **cursor, const char **ret_elem, size_t *ret_len) {
        const char *s = *cursor;
        if (!s)
                return false;
        const char *comma = strchr(s, ',');
        const char *end = comma ? comma : s + strlen(s);
        const char *a = s, *z = end;
        while (a < z && is_ows((uint8_t) *a))
                a++;
        while (z > a && is_ows((uint8_t) z[-1]))
                z--;
        *ret_elem = a;
        *ret_len = (size_t) (z - a);
        *cursor = comma ? comma + 1 : NULL;
        return true;
}

/* ---- lifecycle ------------------------------------------------------------------------- */

int gw_http_parser_new(const struct gw_http_limits *limits, struct gw_http_parser **ret) {
        struct gw_http_limits l;

        if (!ret)
                return -EINVAL;
        gw_http_limits_default(&l);
        if (limits) {
                if (limits->request_line_max)
                        l.request_line_max = limits->request_line_max;
                if (limits->header_bytes_max)
                        l.header_bytes_max = limits->header_bytes_max;
                if (limits->header_count_max)
                        l.header_count_max = limits->header_count_max;
                if (limits->body_max)
                        l.body_max = limits->body_max;
                if (limits->chunk_line_max)
                        l.chunk_line_max = limits->chunk_line_max;
                if (limits->trailer_bytes_max)
                        l.trailer_bytes_max = limits->trailer_bytes_max;
        }
        if (l.request_line_max > GW_HTTP_HEAD_MAX_LIMIT || l.header_bytes_max > GW_HTTP_HEAD_MAX_LIMIT ||
            l.request_line_max + l.header_bytes_max > GW_HTTP_HEAD_MAX_LIMIT ||
            l.trailer_bytes_max > GW_HTTP_HEAD_MAX_LIMIT || l.chunk_line_max > GW_HTTP_HEAD_MAX_LIMIT ||
            l.header_count_max > GW_HTTP_HEAD_MAX_LIMIT || l.body_max > GW_HTTP_BODY_MAX_LIMIT)
                return -EINVAL;

        struct gw_http_parser *p = calloc(1, sizeof *p);
        if (!p)
                return -ENOMEM;
        p->limits = l;
        p->body_max = l.body_max;
        p->state = ST_START;
        /* request line + NUL, then header lines whose CRLF becomes one NUL */
        p->head.max = l.request_line_max + 1 + l.header_bytes_max;
        p->trl.max = l.trailer_bytes_max;
        *ret = p;
        return 0;
}

static void request_release(struct gw_http_parser *p) {
        block_reset(&p->head);
        block_reset(&p->trl);
        if (p->body_cap > KEEP_BUF_MAX) {
                p->body = mfree(p->body);
                p->body_cap = 0;
        }
        p->body_len = 0;
        p->aux = mfree(p->aux);
        p->headers = mfree(p->headers);
        p->trailers = mfree(p->trailers);
        p->params = mfree(p->params);
        p->req = (struct gw_http_request) {};
        p->body_max = p->limits.body_max;
        p->empty_lines = 0;
        p->cr = false;
        p->line_start = 0;
        p->req_sp = 0;
        p->target_off = p->version_off = 0;
        p->section_bytes = 0;
        p->path_off = p->query_off = 0;
        p->has_query = p->path_static_slash = p->path_star = false;
        p->host_off = p->host_len = 0;
        p->has_abs_host = false;
        p->remaining = 0;
        p->chunk_size = 0;
        p->chunk_digits = false;
        p->chunk_line_len = 0;
}

struct gw_http_parser *gw_http_parser_free(struct gw_http_parser *p) {
        if (!p)
                return NULL;
        request_release(p);
        block_done(&p->head);
        block_done(&p->trl);
        free(p->body);
        free(p);
        return NULL;
}

void gw_http_parser_next(struct gw_http_parser *p) {
        if (!p || p->state != ST_DONE)
                return;
        request_release(p);
        p->state = ST_START;
}

const struct gw_http_request *gw_http_parser_request(const struct gw_http_parser *p) {
        if (!p)
                return NULL;
        switch (p->state) {
        case ST_HEADERS_DONE:
        case ST_BODY_CL:
        case ST_CHUNK_SIZE:
        case ST_CHUNK_BWS:
        case ST_CHUNK_EXT:
        case ST_CHUNK_SIZE_LF:
        case ST_CHUNK_DATA:
        case ST_CHUNK_DATA_CR:
        case ST_CHUNK_DATA_LF:
        case ST_TRAILER_LINE:
        case ST_DONE:
                return &p->req;
        default:
                return NULL;
        }
}

int gw_http_parser_error(const struct gw_http_parser *p, const char **ret_message) {
        if (!p || p->state != ST_ERROR)
                return 0;
        if (ret_message)
                *ret_message = p->error_message;
        return p->error_status;
}

bool gw_http_parser_in_progress(const struct gw_http_parser *p) {
        if (!p)
                return false;
        switch (p->state) {
        case ST_START:
        case ST_START_LF:
        case ST_DONE:
        case ST_ERROR:
                return false;
        default:
                return true;
        }
}

int gw_http_parser_set_body_max(struct gw_http_parser *p, size_t max) {
        if (!p || p->state != ST_HEADERS_DONE || max > GW_HTTP_BODY_MAX_LIMIT)
                return -EINVAL;
        if (p->req.content_length > max)
                return -E2BIG;
        p->body_max = max;
        return 0;
}

int gw_http_parser_take_body(struct gw_http_parser *p, uint8_t **ret_body, size_t *ret_len) {
        if (!p || !ret_body || p->state != ST_DONE)
                return -EINVAL;
        uint8_t *b = p->body;
        size_t n = p->body_len;
        if (!b) {
                b = malloc(1);
                if (!b)
                        return -ENOMEM;
                b[0] = 0;
        }
        p->body = NULL;
        p->body_cap = 0;
        p->body_len = 0;
        p->req.body = (const uint8_t *) "";
        p->req.body_len = 0;
        *ret_body = b;
        if (ret_len)
                *ret_len = n;
        return 0;
}

/* ---- request line ---------------------------------------------------------------------- */

static enum gw_http_method method_from_string(const char *m) {
        static const char *const names[_GW_HTTP_METHOD_MAX] = {
                [GW_HTTP_METHOD_GET] = "GET",         [GW_HTTP_METHOD_HEAD] = "HEAD",
                [GW_HTTP_METHOD_POST] = "POST",       [GW_HTTP_METHOD_PUT] = "PUT",
                [GW_HTTP_METHOD_PATCH] = "PATCH",     [GW_HTTP_METHOD_DELETE] = "DELETE",
                [GW_HTTP_METHOD_OPTIONS] = "OPTIONS",
        };
        for (int i = 1; i < _GW_HTTP_METHOD_MAX; i++)
                if (streq(m, names[i]))
                        return (enum gw_http_method) i;
        return GW_HTTP_METHOD_OTHER;
}

/* Splits the target [t, t+n) (NUL at t[n]) into path and query, in place. */
static int parse_path_query(struct gw_http_parser *p, size_t off, size_t n) {
        char *t = p->head.buf + off;
        char *q = memchr(t, '?', n);
        size_t plen = q ? (size_t) (q - t) : n;

        if (!valid_uri_part(t, plen, false))
                return set_error(p, 400, "Invalid character or escape in request path");
        if (q && !valid_uri_part(q + 1, n - plen - 1, true))
                return set_error(p, 400, "Invalid character or escape in query string");
        if (q) {
                *q = '\0';
                p->has_query = true;
                p->query_off = off + plen + 1;
        }
        if (plen == 0)
                p->path_static_slash = true; /* absolute-form without path */
        else
                p->path_off = off;
        return 0;
}

static int parse_target(struct gw_http_parser *p, const char *method) {
        size_t off = p->target_off;
        char *t = p->head.buf + off;
        size_t n = strlen(t);

        if (n == 1 && t[0] == '*') {
                if (!streq(method, "OPTIONS"))
                        return set_error(p, 400, "Request target \"*\" is only allowed with OPTIONS");
                p->path_star = true;
                return 0;
        }
        if (t[0] == '/')
                return parse_path_query(p, off, n);

        /* absolute-form */
        size_t skip;
        if (n >= 7 && strncasecmp(t, "http://", 7) == 0)
                skip = 7;
        else if (n >= 8 && strncasecmp(t, "https://", 8) == 0)
                skip = 8;
        else
                return set_error(p, 400, "Invalid request target");
        size_t a = skip, z = skip;
        while (z < n && t[z] != '/' && t[z] != '?')
                z++;
        if (z == a)
                return set_error(p, 400, "Empty authority in absolute-form request target");
        for (size_t i = a; i < z; i++) {
                uint8_t c = (uint8_t) t[i];
                if (c == '@')
                        return set_error(p, 400, "User information in request target");
                if (!(is_unreserved(c) || is_sub_delim(c) || c == ':' || c == '[' || c == ']' || c == '%'))
                        return set_error(p, 400, "Invalid character in request target authority");
        }
        p->has_abs_host = true;
        p->host_off = off + a;
        p->host_len = z - a;
        /* the path starts at the "/" (or is empty, meaning "/") */
        if (z < n && t[z] == '?') {
                /* "http://h?q": no path; the query follows */
                if (!valid_uri_part(t + z + 1, n - z - 1, true))
                        return set_error(p, 400, "Invalid character or escape in query string");
                p->path_static_slash = true;
                p->has_query = true;
                p->query_off = off + z + 1;
                return 0;
        }
        return parse_path_query(p, off + z, n - z);
}

static int parse_request_line(struct gw_http_parser *p) {
        char *line = p->head.buf;

        if (p->req_sp != 2)
                return set_error(p, 400, "Malformed request line");
        /* SPs were recorded at target_off - 1 and version_off - 1 */
        line[p->target_off - 1] = '\0';
        line[p->version_off - 1] = '\0';
        const char *method = line, *target = line + p->target_off, *version = line + p->version_off;
        if (!*target)
                return set_error(p, 400, "Empty request target");
        for (const char *c = target; *c; c++)
                if ((uint8_t) *c <= 0x20 || (uint8_t) *c >= 0x7f)
                        return set_error(p, 400, "Invalid character in request target");

        size_t vlen = strlen(version);
        if (vlen != 8 || strncmp(version, "HTTP/", 5) != 0 || version[5] < '0' || version[5] > '9' ||
            version[6] != '.' || version[7] < '0' || version[7] > '9')
                return set_error(p, 400, "Malformed HTTP version");
        if (version[5] != '1' || (version[7] != '0' && version[7] != '1'))
                return set_error(p, 505, "HTTP version not supported (HTTP/1.1 and HTTP/1.0 are)");
        p->req.version_minor = version[7] - '0';
        p->req.method = method_from_string(method);
        return parse_target(p, method);
}

/* ---- header and trailer fields --------------------------------------------------------- */

/* Parses the complete field line at b->buf + line_start (NUL-terminated, line_len bytes). */
static int parse_field_line(struct gw_http_parser *p, struct block *b, size_t line_len, bool trailer) {
        char *line = b->buf + p->line_start;

        if (is_ows((uint8_t) line[0]))
                return set_error(p, 400, trailer ? "Obsolete line folding in trailer" : "Obsolete line folding in header");
        char *colon = memchr(line, ':', line_len);
        if (!colon)
                return set_error(p, 400, trailer ? "Trailer line without colon" : "Header line without colon");
        if (colon == line)
                return set_error(p, 400, "Empty header field name");
        if (is_ows((uint8_t) colon[-1]))
                return set_error(p, 400, "Whitespace between header field name and colon");
        for (char *c = line; c < colon; c++)
                if (!is_tchar((uint8_t) *c))
                        return set_error(p, 400, "Invalid character in header field name");
        char *v = colon + 1, *end = line + line_len;
        while (v < end && is_ows((uint8_t) *v))
                v++;
        while (end > v && is_ows((uint8_t) end[-1]))
                end--;
        for (char *c = v; c < end; c++)
                if (!is_field_char((uint8_t) *c))
                        return set_error(p, 400, "Invalid character in header field value");

        if (b->n_ix >= p->limits.header_count_max)
                return set_error(p, 431, trailer ? "Too many trailer fields" : "Too many header fields");
        if (b->n_ix == b->ix_cap) {
                size_t cap = b->ix_cap ? b->ix_cap * 2 : 16;
                if (cap > p->limits.header_count_max)
                        cap = p->limits.header_count_max;
                struct field_ix *n = reallocarray(b->ix, cap, sizeof *n);
                if (!n)
                        return set_enomem(p);
                b->ix = n;
                b->ix_cap = cap;
        }
        *colon = '\0';
        *end = '\0';
        b->ix[b->n_ix++] = (struct field_ix) {
                .name = p->line_start,
                .value = (size_t) (v - b->buf),
                .value_len = (size_t) (end - v),
        };
        return 0;
}

static struct gw_http_header *make_fields(const struct block *b) {
        struct gw_http_header *h = calloc(b->n_ix ? b->n_ix : 1, sizeof *h);
        if (!h)
                return NULL;
        for (size_t i = 0; i < b->n_ix; i++)
                h[i] = (struct gw_http_header) {
                        .name = b->buf + b->ix[i].name,
                        .value = b->buf + b->ix[i].value,
                        .value_len = b->ix[i].value_len,
                };
        return h;
}

/* Splits and decodes the query into p->params, using p->aux from offset at. */
static int parse_query(struct gw_http_parser *p, const char *q, char *out) {
        size_t n = 1;
        for (const char *c = q; *c; c++)
                n += *c == '&';
        p->params = calloc(n, sizeof *p->params);
        if (!p->params)
                return set_enomem(p);

        size_t k = 0;
        const char *s = q;
        for (;;) {
                const char *amp = strchr(s, '&');
                size_t len = amp ? (size_t) (amp - s) : strlen(s);
                if (len > 0) {
                        const char *eq = memchr(s, '=', len);
                        size_t klen = eq ? (size_t) (eq - s) : len, dl;
                        if (pct_decode(s, klen, true, out, &dl) < 0)
                                return set_error(p, 400, "Malformed percent-encoding in query string");
                        p->params[k].key = out;
                        out += dl + 1;
                        if (eq) {
                                if (pct_decode(eq + 1, len - klen - 1, true, out, &dl) < 0)
                                        return set_error(p, 400, "Malformed percent-encoding in query string");
                                p->params[k].value = out;
                                out += dl + 1;
                        } else
                                p->params[k].value = "";
                        k++;
                }
                if (!amp)
                        break;
                s = amp + 1;
        }
        p->req.n_params = k;
        return 0;
}

/* Content-Length: one value, or a list of identical values; saturates at UINT64_MAX. */
static int parse_content_length(const char *v, bool *have, uint64_t *value) {
        const char *cur = v, *e;
        size_t len;
        while (list_next(&cur, &e, &len)) {
                if (len == 0)
                        return -EINVAL;
                uint64_t x = 0;
                for (size_t i = 0; i < len; i++) {
                        if (e[i] < '0' || e[i] > '9')
                                return -EINVAL;
                        unsigned d = (unsigned) (e[i] - '0');
                        x = x > (UINT64_MAX - d) / 10 ? UINT64_MAX : x * 10 + d;
                }
                if (*have && *value != x)
                        return -EEXIST;
                *have = true;
                *value = x;
        }
        return 0;
}

static int finish_head(struct gw_http_parser *p) {
        struct gw_http_request *r = &p->req;
        struct block *h = &p->head;
        unsigned n_host = 0;
        const char *host = NULL;
        bool have_cl = false, have_te = false, te_chunked_last = false, conn_close = false,
             conn_keep_alive = false, conn_upgrade = false, expect_continue = false, expect_other = false;
        unsigned te_codings = 0, te_chunked = 0;
        uint64_t cl = 0;
        int cl_err = 0;

        p->headers = make_fields(h);
        if (!p->headers)
                return set_enomem(p);
        r->headers = p->headers;
        r->n_headers = h->n_ix;
        r->method_str = h->buf;
        if (p->path_star)
                r->path = "*";
        else if (p->path_static_slash)
                r->path = "/";
        else
                r->path = h->buf + p->path_off;
        r->query = p->has_query ? h->buf + p->query_off : NULL;

        for (size_t i = 0; i < r->n_headers; i++) {
                const char *name = r->headers[i].name, *value = r->headers[i].value, *cur, *e;
                size_t len;

                if (strcasecmp(name, "host") == 0) {
                        n_host++;
                        host = value;
                } else if (strcasecmp(name, "content-length") == 0) {
                        int k = parse_content_length(value, &have_cl, &cl);
                        if (k < 0 && !cl_err)
                                cl_err = k;
                        if (k == -EINVAL)
                                have_cl = true;
                } else if (strcasecmp(name, "transfer-encoding") == 0) {
                        have_te = true;
                        cur = value;
                        while (list_next(&cur, &e, &len)) {
                                if (len == 0)
                                        continue;
                                te_codings++;
                                te_chunked_last = ci_eq(e, len, "chunked");
                                te_chunked += te_chunked_last;
                        }
                } else if (strcasecmp(name, "connection") == 0) {
                        cur = value;
                        while (list_next(&cur, &e, &len)) {
                                if (ci_eq(e, len, "close"))
                                        conn_close = true;
                                else if (ci_eq(e, len, "keep-alive"))
                                        conn_keep_alive = true;
                                else if (ci_eq(e, len, "upgrade"))
                                        conn_upgrade = true;
                        }
                } else if (strcasecmp(name, "expect") == 0) {
                        cur = value;
                        while (list_next(&cur, &e, &len)) {
                                if (len == 0)
                                        continue;
                                if (ci_eq(e, len, "100-continue"))
                                        expect_continue = true;
                                else
                                        expect_other = true;
                        }
                        if (!*value)
                                expect_other = true;
                } else if (strcasecmp(name, "upgrade") == 0) {
                        if (!r->upgrade_protocol)
                                r->upgrade_protocol = value;
                }
        }

        if (r->version_minor == 1 && n_host != 1)
                return set_error(p, 400, n_host ? "More than one Host header" : "Missing Host header");
        if (n_host > 1)
                return set_error(p, 400, "More than one Host header");
        if (have_te) {
                if (r->version_minor == 0)
                        return set_error(p, 400, "Transfer-Encoding in an HTTP/1.0 request");
                if (have_cl)
                        return set_error(p, 400, "Both Transfer-Encoding and Content-Length");
                if (te_codings == 0 || !te_chunked_last)
                        return set_error(p, 400, "Transfer-Encoding does not end with chunked");
                if (te_chunked > 1)
                        return set_error(p, 400, "Transfer-Encoding chunked applied more than once");
                if (te_codings > 1)
                        return set_error(p, 501, "Transfer coding not implemented (only chunked is)");
                r->chunked = true;
        }
        if (cl_err == -EEXIST)
                return set_error(p, 400, "Conflicting Content-Length values");
        if (cl_err < 0)
                return set_error(p, 400, "Malformed Content-Length");
        if (have_cl && cl > p->body_max)
                return set_error(p, 413, "Request body too large");
        if (!have_cl && !have_te &&
            (r->method == GW_HTTP_METHOD_POST || r->method == GW_HTTP_METHOD_PUT || r->method == GW_HTTP_METHOD_PATCH))
                return set_error(p, 411, "Content-Length or chunked Transfer-Encoding required");
        if (expect_other)
                return set_error(p, 417, "Unsupported expectation (only 100-continue is)");

        r->content_length = have_cl ? cl : 0;
        r->has_body = r->chunked || r->content_length > 0;
        r->expect_continue = expect_continue && r->version_minor == 1 && r->has_body;
        if (r->version_minor == 1)
                r->keep_alive = !conn_close;
        else
                r->keep_alive = conn_keep_alive && !conn_close;
        r->upgrade = r->version_minor == 1 && conn_upgrade && r->upgrade_protocol;
        if (!r->upgrade)
                r->upgrade_protocol = NULL;

        /* host copy and decoded query; both are bounded by the request line */
        size_t qlen = r->query ? strlen(r->query) : 0;
        size_t need = (p->has_abs_host ? p->host_len + 1 : 0) + (r->query ? 2 * qlen + 2 : 0);
        if (need) {
                p->aux = malloc(need);
                if (!p->aux)
                        return set_enomem(p);
        }
        char *out = p->aux;
        if (p->has_abs_host) {
                memcpy(out, h->buf + p->host_off, p->host_len);
                out[p->host_len] = '\0';
                r->host = out;
                out += p->host_len + 1;
        } else
                r->host = host;
        if (r->query) {
                int k = parse_query(p, r->query, out);
                if (k != 0)
                        return k;
                r->params = p->params;
        }

        p->state = ST_HEADERS_DONE;
        return GW_HTTP_HEADERS;
}

/* ---- body ------------------------------------------------------------------------------ */

static int body_reserve(struct gw_http_parser *p, size_t need) {
        if (need <= p->body_cap)
                return 0;
        assert(need <= p->body_max + 1);
        size_t cap = p->body_cap ? p->body_cap * 2 : 4096;
        if (cap < need)
                cap = need;
        if (cap > p->body_max + 1)
                cap = p->body_max + 1;
        uint8_t *n = realloc(p->body, cap);
        if (!n)
                return -ENOMEM;
        p->body = n;
        p->body_cap = cap;
        return 0;
}

static int finish_request(struct gw_http_parser *p) {
        struct gw_http_request *r = &p->req;

        if (p->trl.n_ix > 0) {
                p->trailers = make_fields(&p->trl);
                if (!p->trailers)
                        return set_enomem(p);
        }
        r->trailers = p->trailers;
        r->n_trailers = p->trl.n_ix;
        if (p->body) {
                p->body[p->body_len] = 0;
                r->body = p->body;
        } else
                r->body = (const uint8_t *) "";
        r->body_len = p->body_len;
        p->state = ST_DONE;
        return GW_HTTP_REQUEST;
}

static int start_body(struct gw_http_parser *p) {
        if (p->req.chunked) {
                p->state = ST_CHUNK_SIZE;
                return GW_HTTP_NEED_MORE;
        }
        if (p->req.content_length > 0) {
                if (body_reserve(p, (size_t) p->req.content_length + 1) < 0)
                        return set_enomem(p);
                p->remaining = p->req.content_length;
                p->state = ST_BODY_CL;
                return GW_HTTP_NEED_MORE;
        }
        return finish_request(p);
}

/* ---- the state machine ----------------------------------------------------------------- */

static int request_line_byte(struct gw_http_parser *p, uint8_t c) {
        struct block *h = &p->head;

        if (p->cr) {
                if (c != '\n')
                        return set_error(p, 400, "Bare CR in request line");
                p->cr = false;
                h->buf[h->len++] = '\0'; /* room was reserved with the CR */
                int k = parse_request_line(p);
                if (k != 0)
                        return k;
                p->state = ST_HEADER_LINE;
                p->line_start = h->len;
                return 0;
        }
        if (c == '\n')
                return set_error(p, 400, "Bare LF in request line (CRLF required)");
        if (c == '\r') {
                if (block_reserve(h, 1) < 0)
                        return set_enomem(p);
                p->cr = true;
                return 0;
        }
        if (h->len >= p->limits.request_line_max) {
                if (p->req_sp == 0)
                        return set_error(p, 501, "Method too long");
                if (p->req_sp == 1)
                        return set_error(p, 414, "Request target too long");
                return set_error(p, 400, "Request line too long");
        }
        if (p->req_sp == 0) {
                if (c == ' ') {
                        if (h->len == 0)
                                return set_error(p, 400, "Empty method");
                        p->req_sp = 1;
                        p->target_off = h->len + 1;
                } else if (!is_tchar(c))
                        return set_error(p, 400, "Invalid character in method");
                else if (h->len >= METHOD_MAX)
                        return set_error(p, 501, "Method too long");
        } else if (c == ' ') {
                if (++p->req_sp == 2)
                        p->version_off = h->len + 1;
                else
                        return set_error(p, 400, "Malformed request line");
        }
        int k = block_reserve(h, 2); /* this byte and a possible CR -> NUL */
        if (k < 0)
                return k == -ENOMEM ? set_enomem(p) : set_error(p, 414, "Request target too long");
        h->buf[h->len++] = (char) c;
        return 0;
}

/* One byte of a header (trailer == false) or trailer line. */
static int field_byte(struct gw_http_parser *p, uint8_t c, bool trailer) {
        struct block *b = trailer ? &p->trl : &p->head;
        size_t max = trailer ? p->limits.trailer_bytes_max : p->limits.header_bytes_max;

        if (++p->section_bytes > max)
                return set_error(p, 431, trailer ? "Trailer section too large" : "Header section too large");
        if (p->cr) {
                if (c != '\n')
                        return set_error(p, 400, trailer ? "Bare CR in trailer" : "Bare CR in header");
                p->cr = false;
                size_t line_len = b->len - p->line_start;
                b->buf[b->len++] = '\0';
                int k;
                if (line_len == 0) {
                        if (trailer)
                                return finish_request(p);
                        return finish_head(p);
                }
                k = parse_field_line(p, b, line_len, trailer);
                if (k != 0)
                        return k;
                p->line_start = b->len;
                return 0;
        }
        if (c == '\n')
                return set_error(p, 400, trailer ? "Bare LF in trailer (CRLF required)" : "Bare LF in header (CRLF required)");
        int k = block_reserve(b, 1);
        if (k < 0)
                return k == -ENOMEM ? set_enomem(p) : set_error(p, 431, "Header section too large");
        if (c == '\r') {
                p->cr = true;
                return 0;
        }
        b->buf[b->len++] = (char) c;
        return 0;
}

static int chunk_line_count(struct gw_http_parser *p) {
        if (++p->chunk_line_len > p->limits.chunk_line_max)
                return set_error(p, 400, "Chunk size line too long");
        return 0;
}

int gw_http_parser_feed(struct gw_http_parser *p, const uint8_t *data, size_t len, size_t *ret_consumed) {
        size_t i = 0;
        int r = GW_HTTP_NEED_MORE;

        if (!p || !ret_consumed || (!data && len > 0))
                return -EINVAL;
        if (p->state == ST_DONE)
                return -EBUSY;
        if (p->state == ST_ERROR) {
                *ret_consumed = 0;
                return GW_HTTP_ERROR;
        }
        if (p->state == ST_HEADERS_DONE)
                r = start_body(p);

        while (r == GW_HTTP_NEED_MORE && i < len) {
                uint8_t c;
                switch (p->state) {
                case ST_START:
                        c = data[i++];
                        if (c == '\r')
                                p->state = ST_START_LF;
                        else if (c == '\n')
                                r = set_error(p, 400, "Bare LF before request line (CRLF required)");
                        else {
                                p->state = ST_REQ_LINE;
                                r = request_line_byte(p, c);
                        }
                        break;
                case ST_START_LF:
                        c = data[i++];
                        if (c != '\n')
                                r = set_error(p, 400, "Bare CR before request line");
                        else if (++p->empty_lines > EMPTY_LINES_MAX)
                                r = set_error(p, 400, "Too many empty lines before request line");
                        else
                                p->state = ST_START;
                        break;
                case ST_REQ_LINE:
                        r = request_line_byte(p, data[i++]);
                        break;
                case ST_HEADER_LINE:
                        r = field_byte(p, data[i++], false);
                        break;
                case ST_BODY_CL: {
                        size_t n = len - i;
                        if (n > p->remaining)
                                n = (size_t) p->remaining;
                        memcpy(p->body + p->body_len, data + i, n);
                        p->body_len += n;
                        p->remaining -= n;
                        i += n;
                        if (p->remaining == 0)
                                r = finish_request(p);
                        break;
                }
                case ST_CHUNK_SIZE:
                        c = data[i++];
                        if ((r = chunk_line_count(p)) != 0)
                                break;
                        if (hexval(c) >= 0) {
                                p->chunk_size = p->chunk_size * 16 + (unsigned) hexval(c);
                                p->chunk_digits = true;
                                if (p->chunk_size > p->body_max - p->body_len)
                                        r = set_error(p, 413, "Request body too large");
                        } else if (!p->chunk_digits)
                                r = set_error(p, 400, "Malformed chunk size");
                        else if (c == ';')
                                p->state = ST_CHUNK_EXT;
                        else if (is_ows(c))
                                p->state = ST_CHUNK_BWS;
                        else if (c == '\r')
                                p->state = ST_CHUNK_SIZE_LF;
                        else
                                r = set_error(p, 400, "Malformed chunk size");
                        break;
                case ST_CHUNK_BWS:
                        c = data[i++];
                        if ((r = chunk_line_count(p)) != 0)
                                break;
                        if (c == ';')
                                p->state = ST_CHUNK_EXT;
                        else if (!is_ows(c))
                                r = set_error(p, 400, "Malformed chunk size");
                        break;
                case ST_CHUNK_EXT:
                        c = data[i++];
                        if (c == '\r')
                                p->state = ST_CHUNK_SIZE_LF;
                        else if (!is_field_char(c))
                                r = set_error(p, 400, "Invalid character in chunk extension");
                        else
                                r = chunk_line_count(p);
                        break;
                case ST_CHUNK_SIZE_LF:
                        c = data[i++];
                        if (c != '\n')
                                r = set_error(p, 400, "Bare CR in chunk size line");
                        else if (p->chunk_size == 0) {
                                p->state = ST_TRAILER_LINE;
                                p->section_bytes = 0;
                                p->line_start = 0;
                        } else {
                                if (body_reserve(p, p->body_len + (size_t) p->chunk_size + 1) < 0) {
                                        r = set_enomem(p);
                                        break;
                                }
                                p->remaining = p->chunk_size;
                                p->state = ST_CHUNK_DATA;
                        }
                        break;
                case ST_CHUNK_DATA: {
                        size_t n = len - i;
                        if (n > p->remaining)
                                n = (size_t) p->remaining;
                        memcpy(p->body + p->body_len, data + i, n);
                        p->body_len += n;
                        p->remaining -= n;
                        i += n;
                        if (p->remaining == 0)
                                p->state = ST_CHUNK_DATA_CR;
                        break;
                }
                case ST_CHUNK_DATA_CR:
                        if (data[i++] != '\r')
                                r = set_error(p, 400, "Chunk data not followed by CRLF");
                        else
                                p->state = ST_CHUNK_DATA_LF;
                        break;
                case ST_CHUNK_DATA_LF:
                        if (data[i++] != '\n')
                                r = set_error(p, 400, "Chunk data not followed by CRLF");
                        else {
                                p->state = ST_CHUNK_SIZE;
                                p->chunk_size = 0;
                                p->chunk_digits = false;
                                p->chunk_line_len = 0;
                        }
                        break;
                case ST_TRAILER_LINE:
                        r = field_byte(p, data[i++], true);
                        break;
                case ST_HEADERS_DONE:
                case ST_DONE:
                case ST_ERROR:
                        assert(false);
                        return -EINVAL;
                }
        }
        if (r == -ENOMEM)
                return r;
        *ret_consumed = i;
        return r;
}

/* ---- request accessors ----------------------------------------------------------------- */

const char *gw_http_header_get(const struct gw_http_request *req, const char *name) {
        if (!req || !name)
                return NULL;
        for (size_t i = 0; i < req->n_headers; i++)
                if (strcasecmp(req->headers[i].name, name) == 0)
                        return req->headers[i].value;
        return NULL;
}

const char *gw_http_query_get(const struct gw_http_request *req, const char *key) {
        if (!req || !key)
                return NULL;
        for (size_t i = 0; i < req->n_params; i++)
                if (streq(req->params[i].key, key))
                        return req->params[i].value;
        return NULL;
}

int gw_http_path_decode(const char *path, size_t len, bool refuse_dot_segments, char **ret) {
        if (!path || !ret)
                return -EINVAL;
        _cleanup_free_ char *out = malloc(len + 1);
        if (!out)
                return -ENOMEM;
        size_t n;
        int k = pct_decode(path, len, false, out, &n);
        if (k < 0)
                return k;
        if (refuse_dot_segments) {
                const char *s = out;
                for (;;) {
                        const char *slash = strchr(s, '/');
                        size_t sl = slash ? (size_t) (slash - s) : strlen(s);
                        if ((sl == 1 && s[0] == '.') || (sl == 2 && s[0] == '.' && s[1] == '.'))
                                return -EINVAL;
                        if (!slash)
                                break;
                        s = slash + 1;
                }
        }
        *ret = TAKE_PTR(out);
        return 0;
}

/* ---- response builder ------------------------------------------------------------------ */

void gw_http_buf_done(struct gw_http_buf *b) {
        if (!b)
                return;
        free(b->data);
        *b = (struct gw_http_buf) {};
}

void gw_http_buf_reset(struct gw_http_buf *b) {
        b->len = 0;
        b->error = 0;
        b->status = 0;
        b->close = false;
}

int gw_http_buf_append(struct gw_http_buf *b, const void *data, size_t len) {
        if (b->error)
                return b->error;
        if (len == 0)
                return 0;
        if (len > SIZE_MAX / 2 - b->len)
                return (b->error = -ENOMEM);
        if (b->len + len > b->cap) {
                size_t cap = b->cap ? b->cap * 2 : 512;
                while (cap < b->len + len)
                        cap *= 2;
                char *n = realloc(b->data, cap);
                if (!n)
                        return (b->error = -ENOMEM);
                b->data = n;
                b->cap = cap;
        }
        memcpy(b->data + b->len, data, len);
        b->len += len;
        return 0;
}

static int buf_puts(struct gw_http_buf *b, const char *s) {
        return gw_http_buf_append(b, s, strlen(s));
}

_printf_(2, 3) static int buf_printf(struct gw_http_buf *b, const char *fmt, ...) {
        char tmp[128];
        va_list ap;

        if (b->error)
                return b->error;
        va_start(ap, fmt);
        int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
        va_end(ap);
        assert(n >= 0 && (size_t) n < sizeof tmp);
        return gw_http_buf_append(b, tmp, (size_t) n);
}

const char *gw_http_status_reason(int status) {
        switch (status) {
        case 100: return "Continue";
        case 101: return "Switching Protocols";
        case 200: return "OK";
        case 201: return "Created";
        case 202: return "Accepted";
        case 204: return "No Content";
        case 206: return "Partial Content";
        case 301: return "Moved Permanently";
        case 302: return "Found";
        case 304: return "Not Modified";
        case 307: return "Temporary Redirect";
        case 308: return "Permanent Redirect";
        case 400: return "Bad Request";
        case 401: return "Unauthorized";
        case 403: return "Forbidden";
        case 404: return "Not Found";
        case 405: return "Method Not Allowed";
        case 406: return "Not Acceptable";
        case 408: return "Request Timeout";
        case 409: return "Conflict";
        case 410: return "Gone";
        case 411: return "Length Required";
        case 412: return "Precondition Failed";
        case 413: return "Content Too Large";
        case 414: return "URI Too Long";
        case 415: return "Unsupported Media Type";
        case 416: return "Range Not Satisfiable";
        case 417: return "Expectation Failed";
        case 422: return "Unprocessable Content";
        case 426: return "Upgrade Required";
        case 428: return "Precondition Required";
        case 429: return "Too Many Requests";
        case 431: return "Request Header Fields Too Large";
        case 500: return "Internal Server Error";
        case 501: return "Not Implemented";
        case 502: return "Bad Gateway";
        case 503: return "Service Unavailable";
        case 504: return "Gateway Timeout";
        case 505: return "HTTP Version Not Supported";
        case 507: return "Insufficient Storage";
        default: return "Unknown";
        }
}

static bool has_crlf_or_ctl(const char *s) {
        for (; *s; s++)
                if ((uint8_t) *s < 0x20 && *s != '\t')
                        return true;
        return false;
}

int gw_http_response_begin(struct gw_http_buf *b, int status, const char *reason) {
        if (b->error)
                return b->error;
        if (status < 100 || status > 599)
                return (b->error = -EINVAL);
        if (!reason)
                reason = gw_http_status_reason(status);
        if (has_crlf_or_ctl(reason))
                return (b->error = -EINVAL);
        b->status = status;
        b->close = false;
        (void) buf_printf(b, "HTTP/1.1 %d ", status);
        (void) buf_puts(b, reason);
        return buf_puts(b, "\r\n");
}

int gw_http_response_header(struct gw_http_buf *b, const char *name, const char *value) {
        if (b->error)
                return b->error;
        if (!name || !*name || !value)
                return (b->error = -EINVAL);
        for (const char *c = name; *c; c++)
                if (!is_tchar((uint8_t) *c))
                        return (b->error = -EINVAL);
        if (has_crlf_or_ctl(value))
                return (b->error = -EINVAL);
        (void) buf_puts(b, name);
        (void) buf_puts(b, ": ");
        (void) buf_puts(b, value);
        return buf_puts(b, "\r\n");
}

int gw_http_response_connection(struct gw_http_buf *b, const struct gw_http_request *req, bool closing) {
        if (b->error)
                return b->error;
        if (closing || !req || !req->keep_alive) {
                b->close = true;
                int k = buf_puts(b, "Connection: close\r\n");
                return k < 0 ? k : 1;
        }
        b->close = false;
        if (req->version_minor == 0) {
                int k = buf_puts(b, "Connection: keep-alive\r\n");
                if (k < 0)
                        return k;
        }
        return 0;
}

char *gw_http_format_date(uint64_t usec, char buf[static 32]) {
        static const char days[7][4] = { "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat" };
        static const char months[12][4] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                            "Jul", "Aug", "Sep", "Oct", "Nov", "Dec" };
        time_t t = (time_t) (usec / 1000000);
        struct tm tm;

        if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 > 9999) {
                t = 0;
                (void) gmtime_r(&t, &tm);
        }
        snprintf(buf, 32, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday], tm.tm_mday,
                 months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        return buf;
}

int gw_http_response_date(struct gw_http_buf *b, uint64_t now_usec) {
        char d[32];
        return gw_http_response_header(b, "Date", gw_http_format_date(now_usec, d));
}

static bool status_has_no_body(int status) {
        return (status >= 100 && status < 200) || status == 204 || status == 304;
}

int gw_http_response_end(struct gw_http_buf *b, const void *body, size_t len) {
        if (b->error)
                return b->error;
        if (status_has_no_body(b->status)) {
                if (len > 0)
                        return (b->error = -EINVAL);
                return buf_puts(b, "\r\n");
        }
        (void) buf_printf(b, "Content-Length: %zu\r\n\r\n", len);
        return gw_http_buf_append(b, body, len);
}

int gw_http_response_end_headers(struct gw_http_buf *b, uint64_t length) {
        return buf_printf(b, "Content-Length: %" PRIu64 "\r\n\r\n", length);
}

int gw_http_response_end_chunked(struct gw_http_buf *b) {
        return buf_puts(b, "Transfer-Encoding: chunked\r\n\r\n");
}

int gw_http_chunk(struct gw_http_buf *b, const void *data, size_t len) {
        if (b->error || len == 0)
                return b->error;
        (void) buf_printf(b, "%zx\r\n", len);
        (void) gw_http_buf_append(b, data, len);
        return buf_puts(b, "\r\n");
}

int gw_http_chunk_end(struct gw_http_buf *b) {
        return buf_puts(b, "0\r\n\r\n");
}

int gw_http_response_continue(struct gw_http_buf *b) {
        return buf_puts(b, "HTTP/1.1 100 Continue\r\n\r\n");
}

/* ---- IoT Hub error responses ----------------------------------------------------------- */

const char *gw_http_error_name(int status) {
        switch (status) {
        case 400: case 411: case 414: case 417: return "ArgumentInvalid";
        case 401: return "IotHubUnauthorized";
        case 404: return "NotFound";
        case 405: return "MethodNotAllowed";
        case 408: return "RequestTimeout";
        case 409: return "Conflict";
        case 412: return "PreconditionFailed";
        case 413: case 431: return "MessageTooLarge";
        case 415: return "UnsupportedMediaType";
        case 429: return "ThrottlingException";
        case 500: return "ServerError";
        case 501: return "NotImplemented";
        case 503: return "ServiceUnavailable";
        case 504: return "GatewayTimeout";
        case 505: return "InvalidProtocolVersion";
        default: return status >= 500 ? "ServerError" : "ArgumentInvalid";
        }
}

static bool valid_error_name(const char *s) {
        if (!*s)
                return false;
        for (; *s; s++)
                if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z')))
                        return false;
        return true;
}

int gw_http_error_body(const struct gw_http_error *e, uint64_t now_usec, char **ret) {
        char tracking[33], stamp[80];

        if (!e || !ret || e->status < 400 || e->status > 599)
                return -EINVAL;
        const char *name = e->name ?: gw_http_error_name(e->status);
        const char *message = e->message ?: gw_http_status_reason(e->status);
        const char *id = e->tracking_id;
        if (!valid_error_name(name) || (id && has_crlf_or_ctl(id)))
                return -EINVAL;
        if (!id) {
                if (hub_random_hex(tracking, 16) < 0)
                        return -EIO;
                id = tracking;
        }
        time_t t = (time_t) (now_usec / 1000000);
        struct tm tm;
        if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 > 9999) {
                t = 0;
                (void) gmtime_r(&t, &tm);
        }
        snprintf(stamp, sizeof stamp, "%02d/%02d/%04d %02d:%02d:%02d", tm.tm_mon + 1, tm.tm_mday,
                 tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);

        size_t mlen = strlen("ErrorCode:;") + strlen(name) + strlen(message) + 1;
        size_t elen = strlen("Tracking ID:-TimeStamp:") + strlen(id) + strlen(stamp) + 1;
        _cleanup_free_ char *msg = malloc(mlen), *exc = malloc(elen);
        if (!msg || !exc)
                return -ENOMEM;
        snprintf(msg, mlen, "ErrorCode:%s;%s", name, message);
        snprintf(exc, elen, "Tracking ID:%s-TimeStamp:%s", id, stamp);
        json_t *jm = json_string(msg);
        if (!jm) {
                /* not UTF-8: replace every non-ASCII byte, keep the text readable */
                for (char *c = msg; *c; c++)
                        if ((uint8_t) *c >= 0x80)
                                *c = '?';
                jm = json_string(msg);
        }
        json_t *je = jm ? json_string(exc) : NULL;
        if (!je) {
                for (char *c = exc; *c; c++)
                        if ((uint8_t) *c >= 0x80)
                                *c = '?';
                je = jm ? json_string(exc) : NULL;
        }
        json_t *o = json_object();
        if (!jm || !je || !o || json_object_set_new(o, "Message", jm) < 0) {
                json_decref(jm);
                json_decref(je);
                json_decref(o);
                return -ENOMEM;
        }
        if (json_object_set_new(o, "ExceptionMessage", je) < 0) {
                json_decref(o);
                return -ENOMEM;
        }
        char *s = hub_json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

int gw_http_error_response(struct gw_http_buf *b, const struct gw_http_request *req, bool closing,
                           const struct gw_http_error *e, uint64_t now_usec) {
        _cleanup_free_ char *body = NULL;

        if (b->error)
                return b->error;
        int k = gw_http_error_body(e, now_usec, &body);
        if (k < 0)
                return (b->error = k);
        (void) gw_http_response_begin(b, e->status, NULL);
        (void) gw_http_response_date(b, now_usec);
        (void) gw_http_response_header(b, "Content-Type", "application/json; charset=utf-8");
        (void) gw_http_response_header(b, "iothub-errorcode", e->name ?: gw_http_error_name(e->status));
        int c = gw_http_response_connection(b, req, closing);
        k = gw_http_response_end(b, body, strlen(body));
        if (k < 0)
                return k;
        return c;
}
