/* SPDX-License-Identifier: MIT */
/* HTTP/1.1 codec: every status the parser answers with, pipelining, byte-at-a-time feeding,
 * chunked bodies, 100-continue, keep-alive, smuggling attempts, query decoding, and the
 * response builder byte for byte. */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "front/http-codec.h"
#include "hub/macro.h"
#include "test-util.h"

/* ---- helpers ------------------------------------------------------------------------- */

struct sbuf {
        char s[16384];
        size_t n;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->s + b->n, sizeof b->s - b->n, fmt, ap);
        va_end(ap);
        ASSERT_TRUE(k >= 0 && (size_t) k < sizeof b->s - b->n);
        b->n += (size_t) k;
}

static void describe_request(struct sbuf *b, const struct gw_http_request *r) {
        sb_printf(b, "REQ %d %s v%d path=%s query=%s host=%s ka=%d ec=%d up=%d/%s ch=%d cl=%llu hb=%d",
                  r->method, r->method_str, r->version_minor, r->path, r->query ?: "-", r->host ?: "-",
                  r->keep_alive, r->expect_continue, r->upgrade, r->upgrade_protocol ?: "-", r->chunked,
                  (unsigned long long) r->content_length, r->has_body);
        for (size_t i = 0; i < r->n_headers; i++)
                sb_printf(b, " [%s=%s]", r->headers[i].name, r->headers[i].value);
        for (size_t i = 0; i < r->n_params; i++)
                sb_printf(b, " {%s=%s}", r->params[i].key, r->params[i].value);
        for (size_t i = 0; i < r->n_trailers; i++)
                sb_printf(b, " <%s=%s>", r->trailers[i].name, r->trailers[i].value);
        sb_printf(b, " body(%zu)=%.*s;\n", r->body_len, (int) r->body_len, (const char *) r->body);
}

/* Feeds in to a fresh parser in pieces of step bytes (0: whole), handling every event like a
 * connection would, and describes what came out. Returns the number of bytes consumed. */
static size_t run(const struct gw_http_limits *l, const char *in, size_t len, size_t step, struct sbuf *out) {
        struct gw_http_parser *p = NULL;
        size_t off = 0, avail = 0;

        out->n = 0;
        out->s[0] = '\0';
        ASSERT_OK(gw_http_parser_new(l, &p));
        for (;;) {
                /* bytes made available so far: the caller "reads" step bytes at a time */
                if (off == avail && avail < len)
                        avail = step ? (avail + step < len ? avail + step : len) : len;
                size_t consumed = 0;
                int r = gw_http_parser_feed(p, (const uint8_t *) in + off, avail - off, &consumed);
                ASSERT_OK(r);
                ASSERT_TRUE(consumed <= avail - off);
                off += consumed;
                if (r == GW_HTTP_HEADERS) {
                        const struct gw_http_request *req = gw_http_parser_request(p);
                        ASSERT_NOT_NULL(req);
                        ASSERT_TRUE(gw_http_parser_in_progress(p));
                        sb_printf(out, "HDR ");
                } else if (r == GW_HTTP_REQUEST) {
                        describe_request(out, gw_http_parser_request(p));
                        ASSERT_FALSE(gw_http_parser_in_progress(p));
                        gw_http_parser_next(p);
                } else if (r == GW_HTTP_ERROR) {
                        const char *msg = NULL;
                        int st = gw_http_parser_error(p, &msg);
                        sb_printf(out, "ERR %d %s\n", st, msg);
                        break;
                } else {
                        ASSERT_EQ(off, avail);
                        if (avail == len) {
                                if (gw_http_parser_in_progress(p))
                                        sb_printf(out, "PARTIAL\n");
                                break;
                        }
                }
        }
        gw_http_parser_free(p);
        return off;
}

/* Parses one whole request and returns its status: 200 when it parsed, else the error. */
static int status_of(const struct gw_http_limits *l, const char *in) {
        struct sbuf b;
        (void) run(l, in, strlen(in), 0, &b);
        if (strncmp(b.s, "HDR REQ", 7) == 0)
                return 200;
        const char *e = strstr(b.s, "ERR ");
        if (e)
                return atoi(e + 4);
        return 0; /* incomplete */
}

/* Parses one whole request; the parser is returned at GW_HTTP_REQUEST. */
static struct gw_http_parser *parse_one(const struct gw_http_limits *l, const char *in) {
        struct gw_http_parser *p = NULL;
        size_t off = 0, len = strlen(in), n;
        int r;

        ASSERT_OK(gw_http_parser_new(l, &p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) in, len, &n), GW_HTTP_HEADERS);
        off += n;
        r = gw_http_parser_feed(p, (const uint8_t *) in + off, len - off, &n);
        ASSERT_EQ(r, GW_HTTP_REQUEST);
        off += n;
        ASSERT_EQ(off, len);
        return p;
}

/* ---- tests ----------------------------------------------------------------------------- */

static void test_simple_get(void) {
        struct gw_http_parser *p = parse_one(NULL,
                "GET /devices/dev1/messages/deviceBound?api-version=2021-04-12 HTTP/1.1\r\n"
                "Host: hub.example.local\r\n"
                "Authorization:   SharedAccessSignature sr=x&sig=y   \r\n"
                "\r\n");
        const struct gw_http_request *r = gw_http_parser_request(p);
        ASSERT_EQ(r->method, GW_HTTP_METHOD_GET);
        ASSERT_STREQ(r->method_str, "GET");
        ASSERT_EQ(r->version_minor, 1);
        ASSERT_STREQ(r->path, "/devices/dev1/messages/deviceBound");
        ASSERT_STREQ(r->query, "api-version=2021-04-12");
        ASSERT_STREQ(r->host, "hub.example.local");
        ASSERT_STREQ(gw_http_query_get(r, "api-version"), "2021-04-12");
        ASSERT_NULL(gw_http_query_get(r, "API-VERSION"));
        ASSERT_STREQ(gw_http_header_get(r, "authorization"), "SharedAccessSignature sr=x&sig=y");
        ASSERT_EQ(r->n_headers, 2);
        ASSERT_TRUE(r->keep_alive);
        ASSERT_FALSE(r->has_body);
        ASSERT_EQ(r->body_len, 0);
        ASSERT_NOT_NULL(r->body);
        ASSERT_FALSE(r->expect_continue);
        ASSERT_FALSE(r->upgrade);
        ASSERT_EQ(gw_http_parser_error(p, NULL), 0);

        /* feeding before next() is refused */
        size_t n = 99;
        ASSERT_ERR(gw_http_parser_feed(p, (const uint8_t *) "GET", 3, &n), -EBUSY);
        ASSERT_EQ(n, 99);
        gw_http_parser_next(p);
        ASSERT_NULL(gw_http_parser_request(p));
        ASSERT_FALSE(gw_http_parser_in_progress(p));
        gw_http_parser_free(p);

        /* methods */
        static const struct {
                const char *m;
                enum gw_http_method e;
        } methods[] = {
                { "GET", GW_HTTP_METHOD_GET },       { "HEAD", GW_HTTP_METHOD_HEAD },
                { "DELETE", GW_HTTP_METHOD_DELETE }, { "OPTIONS", GW_HTTP_METHOD_OPTIONS },
                { "PROPFIND", GW_HTTP_METHOD_OTHER }, { "get", GW_HTTP_METHOD_OTHER },
        };
        for (size_t i = 0; i < ELEMENTSOF(methods); i++) {
                char req[128];
                snprintf(req, sizeof req, "%s / HTTP/1.1\r\nHost: h\r\n\r\n", methods[i].m);
                p = parse_one(NULL, req);
                ASSERT_EQ(gw_http_parser_request(p)->method, methods[i].e);
                ASSERT_STREQ(gw_http_parser_request(p)->method_str, methods[i].m);
                gw_http_parser_free(p);
        }
}

static void test_statuses(void) {
        struct gw_http_limits small;
        gw_http_limits_default(&small);
        small.request_line_max = 64;
        small.header_bytes_max = 128;
        small.header_count_max = 4;
        small.body_max = 16;
        small.chunk_line_max = 16;
        small.trailer_bytes_max = 32;

        static const struct {
                const char *in;
                int status;
        } cases[] = {
                /* good */
                { "GET / HTTP/1.1\r\nHost: h\r\n\r\n", 200 },
                { "GET / HTTP/1.0\r\n\r\n", 200 },
                { "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 200 },
                { "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", 200 },
                { "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc", 200 },
                { "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 200 },
                { "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\nabc", 200 },
                { "POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n", 200 },
                { "GET /%41%2f HTTP/1.1\r\nHost: h\r\nX-Obs: caf\xc3\xa9\r\n\r\n", 200 },
                { "GET /x HTTP/1.1\r\nHost:\r\n\r\n", 200 },
                /* 400: malformed request lines */
                { "GET /\r\n\r\n", 400 },
                { "GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { " GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400 },
                { "GET / http/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET / HTTP/1.10\r\nHost: h\r\n\r\n", 400 },
                { "GET / HTTP/1\r\nHost: h\r\n\r\n", 400 },
                { "G\x01T / HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400 }, /* TLS on a plain port */
                { "GET x HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /a%zz HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /a% HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /a?b=%4 HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /a?b=%00 HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /a\"b HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                { "\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                /* 400: line endings */
                { "GET / HTTP/1.1\nHost: h\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\n\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400 },
                { "GET / HTTP/1.1\rHost: h\r\n\r\n", 400 },
                { "\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400 },
                /* 400: header fields */
                { "GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n  continued\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\n X: a\r\nHost: h\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\n: empty\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\nX(y): z\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\nX: a\x01z\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fz\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\n\r\n", 400 },                        /* 1.1 without Host */
                { "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400 },  /* two Hosts */
                { "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400 },
                /* 400: body framing (smuggling) */
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3x\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 400 },
                { "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400 },
                { "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400 },
                /* 400: chunked body */
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nx\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3 4\r\nabc\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;a\x01\r\nabc\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX : y\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n", 400 },
                /* 411 */
                { "POST / HTTP/1.1\r\nHost: h\r\n\r\n", 411 },
                { "PUT /devices/d HTTP/1.1\r\nHost: h\r\n\r\n", 411 },
                { "PATCH /twins/d HTTP/1.0\r\n\r\n", 411 },
                /* 417 */
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nExpect: 200-ok\r\n\r\nx", 417 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nExpect: 100-continue, x\r\n\r\nx", 417 },
                /* 501 */
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501 },
                { "GETGETGETGETGETGETGETGETGETGETGETGET / HTTP/1.1\r\nHost: h\r\n\r\n", 501 },
                /* 505 */
                { "GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505 },
                { "GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505 },
                { "GET / HTTP/0.9\r\n\r\n", 505 },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                int st = status_of(NULL, cases[i].in);
                if (st != cases[i].status)
                        TEST_FAIL("case %zu \"%s\": status %d, expected %d", i, cases[i].in, st, cases[i].status);
        }

        /* with small limits */
        static const struct {
                const char *in;
                int status;
        } limited[] = {
                { "GET /0123456789012345678901234567890123456789 HTTP/1.1\r\nHost: h\r\n\r\n", 200 },
                { "GET /01234567890123456789012345678901234567890123456789012345678 HTTP/1.1\r\nHost: h\r\n\r\n", 414 },
                { "GET /0123456789012345678901234567890123456789012345 HTTP/1.1111\r\nHost: h\r\n\r\n", 400 },
                { "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", 200 },
                { "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 431 },
                { "GET / HTTP/1.1\r\nHost: h\r\nA: 01234567890123456789012345678901234567890123456789"
                  "0123456789012345678901234567890123456789012345678901234567890123456789\r\n\r\n", 431 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 16\r\n\r\n0123456789abcdef", 200 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\n\r\n", 413 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999999\r\n\r\n", 413 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n", 200 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n", 413 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n9\r\n", 413 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\n", 413 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\nx\r\n0\r\n\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;a=b\r\nx\r\n0\r\n\r\n", 200 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;abcdefghijklmnop\r\nx\r\n", 400 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 0123456789012345678901234567\r\n\r\n", 431 },
                { "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n", 431 },
                { "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\nExpect: 100-continue\r\n\r\n", 413 },
        };
        for (size_t i = 0; i < ELEMENTSOF(limited); i++) {
                int st = status_of(&small, limited[i].in);
                if (st != limited[i].status)
                        TEST_FAIL("limited case %zu \"%s\": status %d, expected %d", i, limited[i].in, st,
                                  limited[i].status);
        }

        /* the error state is sticky and consumes nothing */
        struct gw_http_parser *p = NULL;
        size_t n;
        const char *msg = NULL;
        ASSERT_OK(gw_http_parser_new(NULL, &p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "GET / HTTP/1.1\r\nHost : h\r\n\r\n", 28, &n), GW_HTTP_ERROR);
        ASSERT_EQ(gw_http_parser_error(p, &msg), 400);
        ASSERT_STREQ(msg, "Whitespace between header field name and colon");
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "GET", 3, &n), GW_HTTP_ERROR);
        ASSERT_EQ(n, 0);
        ASSERT_FALSE(gw_http_parser_in_progress(p));
        ASSERT_NULL(gw_http_parser_request(p));
        gw_http_parser_next(p); /* no-op */
        ASSERT_EQ(gw_http_parser_error(p, NULL), 400);
        gw_http_parser_free(p);
}

/* A table of requests (good and bad) that must give the same result whatever the split. */
static const char *const split_table[] = {
        "GET / HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET /a/b?x=1&y=%2F+z&flag HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        "HEAD /h HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "\r\nPOST /devices/d/messages/events?api-version=2021-04-12 HTTP/1.1\r\nHost: hub\r\n"
        "iothub-app-temp: 21\r\nContent-Length: 11\r\n\r\n{\"t\":21.5}\n",
        "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5;name=\"va lue\"\r\nhello\r\n6 ; x\r\n world\r\n0\r\nX-Sum: 11\r\nX-Other:  z \r\n\r\n",
        "PUT /devices/d HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
        "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "GET http://Hub.Example:8080/x/y?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\nPOST /3 HTTP/1.1\r\nHost: h\r\n"
        "Content-Length: 3\r\n\r\nabcGET /4 HTTP/1.0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\nHost: h\n\n",
        "GET / HTTP/2.0\r\nHost: h\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        "GET / HTTP/1.1\r\nHost: h\r\n\r\nGARBAGE\x01\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nshort",
        "GET /half HTTP/1.1\r\nHost: h\r\nX-Partial: y",
        "POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        "POST /y HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\nT: v\r\n\r\n",
};

static void test_byte_at_a_time(void) {
        static const size_t steps[] = { 1, 2, 3, 5, 7, 13, 64 };
        struct sbuf whole, piece;

        for (size_t i = 0; i < ELEMENTSOF(split_table); i++) {
                size_t len = strlen(split_table[i]);
                size_t cw = run(NULL, split_table[i], len, 0, &whole);
                ASSERT_TRUE(whole.n > 0);
                if (getenv("FIELDHUB_TEST_VERBOSE"))
                        fprintf(stderr, "%zu: %s", i, whole.s);
                for (size_t s = 0; s < ELEMENTSOF(steps); s++) {
                        size_t cp = run(NULL, split_table[i], len, steps[s], &piece);
                        if (!streq(whole.s, piece.s))
                                TEST_FAIL("request %zu, step %zu:\nwhole: %s\npieces: %s", i, steps[s], whole.s, piece.s);
                        if (!strstr(whole.s, "ERR"))
                                ASSERT_EQ(cp, cw);
                }
        }
}

static void test_pipelined(void) {
        const char *in = split_table[9];
        size_t len = strlen(in), off = 0, n;
        struct gw_http_parser *p = NULL;
        static const char *const paths[] = { "/", "/2", "/3", "/4" };

        ASSERT_OK(gw_http_parser_new(NULL, &p));
        for (size_t k = 0; k < ELEMENTSOF(paths); k++) {
                ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) in + off, len - off, &n), GW_HTTP_HEADERS);
                off += n;
                ASSERT_STREQ(gw_http_parser_request(p)->path, paths[k]);
                ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) in + off, len - off, &n), GW_HTTP_REQUEST);
                off += n;
                const struct gw_http_request *r = gw_http_parser_request(p);
                ASSERT_STREQ(r->path, paths[k]);
                if (k == 2) {
                        ASSERT_EQ(r->body_len, 3);
                        ASSERT_STREQ((const char *) r->body, "abc");
                        /* the next request starts right after the body */
                        ASSERT_TRUE(strncmp(in + off, "GET /4", 6) == 0);
                }
                if (k == 3)
                        ASSERT_FALSE(r->keep_alive);
                gw_http_parser_next(p);
        }
        ASSERT_EQ(off, len);
        ASSERT_EQ(gw_http_parser_feed(p, NULL, 0, &n), GW_HTTP_NEED_MORE);
        ASSERT_EQ(n, 0);
        gw_http_parser_free(p);

        /* the whole summary */
        struct sbuf b;
        (void) run(NULL, in, len, 0, &b);
        ASSERT_EQ(strstr(b.s, "REQ") != NULL, 1);
        size_t count = 0;
        for (const char *c = b.s; (c = strstr(c, "HDR REQ")); c++)
                count++;
        ASSERT_EQ(count, 4);
}

static void test_chunked(void) {
        struct gw_http_parser *p = parse_one(NULL, split_table[4]);
        const struct gw_http_request *r = gw_http_parser_request(p);
        ASSERT_TRUE(r->chunked);
        ASSERT_TRUE(r->has_body);
        ASSERT_EQ(r->content_length, 0);
        ASSERT_EQ(r->body_len, 11);
        ASSERT_STREQ((const char *) r->body, "hello world");
        ASSERT_EQ(r->n_trailers, 2);
        ASSERT_STREQ(r->trailers[0].name, "X-Sum");
        ASSERT_STREQ(r->trailers[0].value, "11");
        ASSERT_STREQ(r->trailers[1].value, "z");
        /* trailers never show up as headers */
        ASSERT_NULL(gw_http_header_get(r, "X-Sum"));
        gw_http_parser_free(p);

        /* a chunked body with no chunks, then a big one (grows the buffer) */
        p = parse_one(NULL, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        ASSERT_EQ(gw_http_parser_request(p)->body_len, 0);
        ASSERT_EQ(gw_http_parser_request(p)->n_trailers, 0);
        gw_http_parser_free(p);

        char *big = malloc(200000);
        ASSERT_NOT_NULL(big);
        int o = snprintf(big, 200000, "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
        for (int c = 0; c < 20; c++) {
                o += snprintf(big + o, 200000 - (size_t) o, "%x\r\n", 5000 + c);
                memset(big + o, 'a' + c, (size_t) (5000 + c));
                o += 5000 + c;
                o += snprintf(big + o, 200000 - (size_t) o, "\r\n");
        }
        o += snprintf(big + o, 200000 - (size_t) o, "0\r\n\r\n");
        p = parse_one(NULL, big);
        r = gw_http_parser_request(p);
        ASSERT_EQ(r->body_len, 20 * 5000 + 190);
        ASSERT_EQ(r->body[0], 'a');
        ASSERT_EQ(r->body[r->body_len - 1], 'a' + 19);
        gw_http_parser_free(p);
        free(big);
}

static void test_expect_continue(void) {
        const char *head = "PUT /devices/d HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n";
        struct gw_http_parser *p = NULL;
        size_t n;

        ASSERT_OK(gw_http_parser_new(NULL, &p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) head, strlen(head), &n), GW_HTTP_HEADERS);
        ASSERT_EQ(n, strlen(head));
        const struct gw_http_request *r = gw_http_parser_request(p);
        ASSERT_TRUE(r->expect_continue);
        ASSERT_EQ(r->content_length, 2);
        ASSERT_TRUE(gw_http_parser_in_progress(p));
        /* the server answers 100 Continue, then the body arrives */
        struct gw_http_buf b = {};
        ASSERT_OK(gw_http_response_continue(&b));
        ASSERT_EQ(b.len, strlen("HTTP/1.1 100 Continue\r\n\r\n"));
        ASSERT_TRUE(memcmp(b.data, "HTTP/1.1 100 Continue\r\n\r\n", b.len) == 0);
        gw_http_buf_done(&b);
        ASSERT_EQ(gw_http_parser_feed(p, NULL, 0, &n), GW_HTTP_NEED_MORE);
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "{", 1, &n), GW_HTTP_NEED_MORE);
        ASSERT_TRUE(gw_http_parser_in_progress(p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "}", 1, &n), GW_HTTP_REQUEST);
        ASSERT_STREQ((const char *) gw_http_parser_request(p)->body, "{}");
        gw_http_parser_free(p);

        /* or refuses it for this route: the limit is lowered below the declared length */
        ASSERT_OK(gw_http_parser_new(NULL, &p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) head, strlen(head), &n), GW_HTTP_HEADERS);
        ASSERT_ERR(gw_http_parser_set_body_max(p, 1), -E2BIG);
        ASSERT_OK(gw_http_parser_set_body_max(p, 2));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "{}", 2, &n), GW_HTTP_REQUEST);
        ASSERT_ERR(gw_http_parser_set_body_max(p, 10), -EINVAL); /* too late */
        gw_http_parser_free(p);

        /* a raised limit for a chunked upload */
        struct gw_http_limits l = { .body_max = 4 };
        const char *up = "PUT /blob HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n";
        ASSERT_EQ(status_of(&l, up), 413);
        ASSERT_OK(gw_http_parser_new(&l, &p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) up, strlen(up), &n), GW_HTTP_HEADERS);
        ASSERT_OK(gw_http_parser_set_body_max(p, 6));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) up + n, strlen(up) - n, &n), GW_HTTP_REQUEST);
        ASSERT_EQ(gw_http_parser_request(p)->body_len, 6);
        gw_http_parser_next(p);
        /* the raised limit applied to that request only */
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) up, strlen(up), &n), GW_HTTP_HEADERS);
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) up + n, strlen(up) - n, &n), GW_HTTP_ERROR);
        ASSERT_EQ(gw_http_parser_error(p, NULL), 413);
        gw_http_parser_free(p);

        /* 1.0: ignored; no body: nothing to continue */
        p = parse_one(NULL, "PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx");
        ASSERT_FALSE(gw_http_parser_request(p)->expect_continue);
        gw_http_parser_free(p);
        p = parse_one(NULL, "PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n");
        ASSERT_FALSE(gw_http_parser_request(p)->expect_continue);
        gw_http_parser_free(p);

        /* taking the body out of a request */
        p = parse_one(NULL, "POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello");
        uint8_t *body = NULL;
        size_t blen = 0;
        ASSERT_OK(gw_http_parser_take_body(p, &body, &blen));
        ASSERT_EQ(blen, 5);
        ASSERT_STREQ((const char *) body, "hello");
        ASSERT_EQ(gw_http_parser_request(p)->body_len, 0);
        ASSERT_STREQ((const char *) gw_http_parser_request(p)->body, "");
        free(body);
        gw_http_parser_next(p);
        ASSERT_ERR(gw_http_parser_take_body(p, &body, &blen), -EINVAL);
        const char *get = "GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) get, strlen(get), &n), GW_HTTP_HEADERS);
        ASSERT_EQ(gw_http_parser_feed(p, NULL, 0, &n), GW_HTTP_REQUEST);
        ASSERT_OK(gw_http_parser_take_body(p, &body, NULL));
        ASSERT_STREQ((const char *) body, "");
        free(body);
        gw_http_parser_free(p);
}

static void test_keep_alive(void) {
        static const struct {
                const char *in;
                bool keep_alive;
        } cases[] = {
                { "GET / HTTP/1.1\r\nHost: h\r\n\r\n", true },
                { "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", false },
                { "GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", false },
                { "GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n", true },
                { "GET / HTTP/1.1\r\nHost: h\r\nConnection: closed\r\n\r\n", true },
                { "GET / HTTP/1.0\r\n\r\n", false },
                { "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true },
                { "GET / HTTP/1.0\r\nconnection: x,Keep-Alive\r\n\r\n", true },
                { "GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", false },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                struct gw_http_parser *p = parse_one(NULL, cases[i].in);
                if (gw_http_parser_request(p)->keep_alive != cases[i].keep_alive)
                        TEST_FAIL("case %zu: keep_alive %d", i, gw_http_parser_request(p)->keep_alive);
                gw_http_parser_free(p);
        }
}

static void test_upgrade_and_forms(void) {
        struct gw_http_parser *p = parse_one(NULL, split_table[6]);
        const struct gw_http_request *r = gw_http_parser_request(p);
        ASSERT_TRUE(r->upgrade);
        ASSERT_STREQ(r->upgrade_protocol, "websocket");
        ASSERT_TRUE(r->keep_alive);
        ASSERT_STREQ(gw_http_header_get(r, "sec-websocket-key"), "dGhlIHNhbXBsZSBub25jZQ==");
        gw_http_parser_free(p);

        /* Upgrade without Connection: upgrade, or in 1.0, is not an upgrade */
        p = parse_one(NULL, "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n");
        ASSERT_FALSE(gw_http_parser_request(p)->upgrade);
        ASSERT_NULL(gw_http_parser_request(p)->upgrade_protocol);
        gw_http_parser_free(p);
        p = parse_one(NULL, "GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n");
        ASSERT_FALSE(gw_http_parser_request(p)->upgrade);
        gw_http_parser_free(p);

        /* bytes after an upgrade request are left to the caller */
        const char *ws = "GET /$iothub/websocket HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x82\x05hello";
        size_t n, off;
        ASSERT_OK(gw_http_parser_new(NULL, &p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) ws, strlen(ws), &off), GW_HTTP_HEADERS);
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) ws + off, strlen(ws) - off, &n), GW_HTTP_REQUEST);
        ASSERT_EQ(n, 0);
        ASSERT_EQ((uint8_t) ws[off], 0x82);
        ASSERT_STREQ(gw_http_parser_request(p)->path, "/$iothub/websocket");
        gw_http_parser_free(p);

        /* absolute-form */
        p = parse_one(NULL, split_table[7]);
        r = gw_http_parser_request(p);
        ASSERT_STREQ(r->path, "/x/y");
        ASSERT_STREQ(r->query, "q=1");
        ASSERT_STREQ(r->host, "Hub.Example:8080");
        gw_http_parser_free(p);
        p = parse_one(NULL, "GET HTTPS://[::1]:443?a=b HTTP/1.1\r\nHost: x\r\n\r\n");
        r = gw_http_parser_request(p);
        ASSERT_STREQ(r->path, "/");
        ASSERT_STREQ(r->host, "[::1]:443");
        ASSERT_STREQ(gw_http_query_get(r, "a"), "b");
        gw_http_parser_free(p);
        p = parse_one(NULL, "GET http://h HTTP/1.1\r\nHost: h\r\n\r\n");
        ASSERT_STREQ(gw_http_parser_request(p)->path, "/");
        ASSERT_NULL(gw_http_parser_request(p)->query);
        gw_http_parser_free(p);

        /* asterisk-form */
        p = parse_one(NULL, "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
        ASSERT_STREQ(gw_http_parser_request(p)->path, "*");
        gw_http_parser_free(p);
}

static void test_headers(void) {
        struct gw_http_parser *p = parse_one(NULL,
                "GET / HTTP/1.1\r\nhOsT: h\r\nIoTHub-MessageId: m1\r\nX-Empty:\r\nX-Tab:\tv\t\r\n"
                "x-dup: 1\r\nX-Dup: 2\r\nX-Inner: a  b\r\n\r\n");
        const struct gw_http_request *r = gw_http_parser_request(p);
        ASSERT_STREQ(gw_http_header_get(r, "iothub-messageid"), "m1");
        ASSERT_STREQ(gw_http_header_get(r, "IOTHUB-MESSAGEID"), "m1");
        ASSERT_STREQ(gw_http_header_get(r, "Host"), "h");
        ASSERT_STREQ(gw_http_header_get(r, "x-empty"), "");
        ASSERT_STREQ(gw_http_header_get(r, "x-tab"), "v");
        ASSERT_STREQ(gw_http_header_get(r, "x-dup"), "1");
        ASSERT_STREQ(gw_http_header_get(r, "x-inner"), "a  b");
        ASSERT_NULL(gw_http_header_get(r, "x-missing"));
        ASSERT_NULL(gw_http_header_get(r, "x-"));
        ASSERT_EQ(r->n_headers, 7);
        /* iteration keeps order and original spelling */
        ASSERT_STREQ(r->headers[0].name, "hOsT");
        ASSERT_STREQ(r->headers[1].name, "IoTHub-MessageId");
        ASSERT_STREQ(r->headers[4].name, "x-dup");
        ASSERT_STREQ(r->headers[5].value, "2");
        ASSERT_EQ(r->headers[6].value_len, 4);
        gw_http_parser_free(p);
}

static void test_query(void) {
        struct gw_http_parser *p = parse_one(NULL,
                "GET /p?api-version=2021-04-12&sr=hub%2Fdevices%2Fd1&msg=a+b%20c&&flag&empty=&eq=a=b&k%2B=v%2b&dup=1&dup=2 HTTP/1.1\r\n"
                "Host: h\r\n\r\n");
        const struct gw_http_request *r = gw_http_parser_request(p);
        ASSERT_STREQ(gw_http_query_get(r, "api-version"), "2021-04-12");
        ASSERT_STREQ(gw_http_query_get(r, "sr"), "hub/devices/d1");
        ASSERT_STREQ(gw_http_query_get(r, "msg"), "a b c");
        ASSERT_STREQ(gw_http_query_get(r, "flag"), "");
        ASSERT_STREQ(gw_http_query_get(r, "empty"), "");
        ASSERT_STREQ(gw_http_query_get(r, "eq"), "a=b");
        ASSERT_STREQ(gw_http_query_get(r, "k+"), "v+");
        ASSERT_STREQ(gw_http_query_get(r, "dup"), "1");
        ASSERT_NULL(gw_http_query_get(r, "missing"));
        ASSERT_EQ(r->n_params, 9);
        ASSERT_STREQ(r->params[8].value, "2");
        ASSERT_STREQ(r->path, "/p");
        gw_http_parser_free(p);

        p = parse_one(NULL, "GET /p? HTTP/1.1\r\nHost: h\r\n\r\n");
        ASSERT_STREQ(gw_http_parser_request(p)->query, "");
        ASSERT_EQ(gw_http_parser_request(p)->n_params, 0);
        gw_http_parser_free(p);

        /* path decoding */
        char *s = NULL;
        ASSERT_OK(gw_http_path_decode("/a%2Fb/c+d%41", strlen("/a%2Fb/c+d%41"), false, &s));
        ASSERT_STREQ(s, "/a/b/c+dA");
        free(s);
        ASSERT_OK(gw_http_path_decode("/a/..b/.c", 9, true, &s));
        free(s);
        ASSERT_ERR(gw_http_path_decode("/a/../b", 7, true, &s), -EINVAL);
        ASSERT_ERR(gw_http_path_decode("/a/%2e%2E/b", 11, true, &s), -EINVAL);
        ASSERT_ERR(gw_http_path_decode("/a/.", 4, true, &s), -EINVAL);
        ASSERT_ERR(gw_http_path_decode("/a%00b", 6, false, &s), -EINVAL);
        ASSERT_ERR(gw_http_path_decode("/a%4", 4, false, &s), -EINVAL);
        ASSERT_OK(gw_http_path_decode("/a/../b", 7, false, &s));
        ASSERT_STREQ(s, "/a/../b");
        free(s);
        /* a segment only */
        const char *raw = "/devices/d%3A1/x";
        ASSERT_OK(gw_http_path_decode(&raw[9], 5, false, &s));
        ASSERT_STREQ(s, "d:1");
        free(s);
}

static void test_in_progress(void) {
        struct gw_http_parser *p = NULL;
        size_t n;

        ASSERT_OK(gw_http_parser_new(NULL, &p));
        ASSERT_FALSE(gw_http_parser_in_progress(p));
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "\r\n", 2, &n), GW_HTTP_NEED_MORE);
        ASSERT_FALSE(gw_http_parser_in_progress(p)); /* idle: empty lines do not count */
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) "G", 1, &n), GW_HTTP_NEED_MORE);
        ASSERT_TRUE(gw_http_parser_in_progress(p)); /* half a request: 408 on timeout */
        const char *rest = "ET / HTTP/1.1\r\nHost: h\r\n\r\n";
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) rest, strlen(rest), &n), GW_HTTP_HEADERS);
        ASSERT_EQ(gw_http_parser_feed(p, NULL, 0, &n), GW_HTTP_REQUEST);
        ASSERT_FALSE(gw_http_parser_in_progress(p));
        gw_http_parser_next(p);
        ASSERT_FALSE(gw_http_parser_in_progress(p));
        gw_http_parser_free(p);

        /* bad arguments and limits */
        ASSERT_ERR(gw_http_parser_new(NULL, NULL), -EINVAL);
        struct gw_http_limits l = { .request_line_max = GW_HTTP_HEAD_MAX_LIMIT, .header_bytes_max = 1 };
        ASSERT_ERR(gw_http_parser_new(&l, &p), -EINVAL);
        l = (struct gw_http_limits) { .body_max = GW_HTTP_BODY_MAX_LIMIT + 1 };
        ASSERT_ERR(gw_http_parser_new(&l, &p), -EINVAL);
        ASSERT_OK(gw_http_parser_new(NULL, &p));
        ASSERT_ERR(gw_http_parser_feed(p, NULL, 1, &n), -EINVAL);
        ASSERT_ERR(gw_http_parser_feed(p, (const uint8_t *) "x", 1, NULL), -EINVAL);
        ASSERT_ERR(gw_http_parser_set_body_max(p, 5), -EINVAL);
        ASSERT_NULL(gw_http_parser_free(p));
        ASSERT_NULL(gw_http_parser_free(NULL));
}

static void assert_buf(const struct gw_http_buf *b, const char *expected) {
        if (b->len != strlen(expected) || memcmp(b->data, expected, b->len) != 0)
                TEST_FAIL("got \"%.*s\", expected \"%s\"", (int) b->len, b->data, expected);
}

static void test_response_builder(void) {
        struct gw_http_buf b = {};
        char d[32];

        ASSERT_STREQ(gw_http_format_date(784111777ULL * 1000000 + 123, d), "Sun, 06 Nov 1994 08:49:37 GMT");
        ASSERT_STREQ(gw_http_format_date(0, d), "Thu, 01 Jan 1970 00:00:00 GMT");
        ASSERT_STREQ(gw_http_format_date(1700000000ULL * 1000000, d), "Tue, 14 Nov 2023 22:13:20 GMT");

        ASSERT_OK(gw_http_response_begin(&b, 200, NULL));
        ASSERT_OK(gw_http_response_date(&b, 784111777ULL * 1000000));
        ASSERT_OK(gw_http_response_header(&b, "Content-Type", "application/json; charset=utf-8"));
        ASSERT_EQ(gw_http_response_connection(&b, NULL, false), 1);
        ASSERT_TRUE(b.close);
        ASSERT_OK(gw_http_response_end(&b, "{\"a\":1}", 7));
        assert_buf(&b, "HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                       "Content-Type: application/json; charset=utf-8\r\nConnection: close\r\n"
                       "Content-Length: 7\r\n\r\n{\"a\":1}");

        /* 204: no Content-Length; keep-alive 1.1 adds nothing */
        struct gw_http_parser *p = parse_one(NULL, "POST /e HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx");
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 204, NULL));
        ASSERT_EQ(gw_http_response_connection(&b, gw_http_parser_request(p), false), 0);
        ASSERT_FALSE(b.close);
        ASSERT_OK(gw_http_response_end(&b, NULL, 0));
        assert_buf(&b, "HTTP/1.1 204 No Content\r\n\r\n");
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 204, NULL));
        ASSERT_EQ(gw_http_response_connection(&b, gw_http_parser_request(p), true), 1);
        ASSERT_ERR(gw_http_response_end(&b, "x", 1), -EINVAL);
        ASSERT_ERR(gw_http_response_header(&b, "A", "b"), -EINVAL); /* sticky */
        gw_http_parser_free(p);

        /* 1.0 keep-alive */
        p = parse_one(NULL, "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 404, "Nope"));
        ASSERT_EQ(gw_http_response_connection(&b, gw_http_parser_request(p), false), 0);
        ASSERT_OK(gw_http_response_end(&b, "", 0));
        assert_buf(&b, "HTTP/1.1 404 Nope\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        gw_http_parser_free(p);

        /* HEAD-style and chunked streaming */
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 200, NULL));
        ASSERT_OK(gw_http_response_end_headers(&b, 1234));
        assert_buf(&b, "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 200, NULL));
        ASSERT_OK(gw_http_response_header(&b, "Content-Type", "text/event-stream"));
        ASSERT_OK(gw_http_response_end_chunked(&b));
        ASSERT_OK(gw_http_chunk(&b, "hello", 5));
        ASSERT_OK(gw_http_chunk(&b, "", 0));
        char big[300];
        memset(big, 'x', sizeof big);
        ASSERT_OK(gw_http_chunk(&b, big, 26));
        ASSERT_OK(gw_http_chunk_end(&b));
        assert_buf(&b, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "5\r\nhello\r\n1a\r\nxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n0\r\n\r\n");

        /* the chunked output parses back */
        static const char req_head[] = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
        const char *chunks = (const char *) memmem(b.data, b.len, "\r\n\r\n", 4) + 4;
        size_t clen = b.len - (size_t) (chunks - b.data);
        char *req = malloc(sizeof req_head + clen);
        ASSERT_NOT_NULL(req);
        memcpy(req, req_head, sizeof req_head - 1);
        memcpy(req + sizeof req_head - 1, chunks, clen);
        req[sizeof req_head - 1 + clen] = '\0';
        p = parse_one(NULL, req);
        ASSERT_STREQ((const char *) gw_http_parser_request(p)->body, "helloxxxxxxxxxxxxxxxxxxxxxxxxxx");
        gw_http_parser_free(p);
        free(req);

        /* invalid input */
        gw_http_buf_reset(&b);
        ASSERT_ERR(gw_http_response_begin(&b, 99, NULL), -EINVAL);
        gw_http_buf_reset(&b);
        ASSERT_ERR(gw_http_response_begin(&b, 200, "O\r\nK"), -EINVAL);
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 200, NULL));
        ASSERT_ERR(gw_http_response_header(&b, "Bad Name", "v"), -EINVAL);
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_begin(&b, 200, NULL));
        ASSERT_ERR(gw_http_response_header(&b, "X", "a\r\nInjected: 1"), -EINVAL);
        gw_http_buf_reset(&b);
        ASSERT_OK(gw_http_response_continue(&b));
        assert_buf(&b, "HTTP/1.1 100 Continue\r\n\r\n");

        ASSERT_STREQ(gw_http_status_reason(414), "URI Too Long");
        ASSERT_STREQ(gw_http_status_reason(431), "Request Header Fields Too Large");
        ASSERT_STREQ(gw_http_status_reason(799), "Unknown");
        gw_http_buf_done(&b);
        gw_http_buf_done(&b);
}

static void test_error_response(void) {
        char *s = NULL;
        struct gw_http_error e = {
                .status = 404, .name = "DeviceNotFound", .message = "Device dev1 not found", .tracking_id = "4f1e0a",
        };

        ASSERT_OK(gw_http_error_body(&e, 1468627961ULL * 1000000, &s));
        ASSERT_STREQ(s, "{\"Message\":\"ErrorCode:DeviceNotFound;Device dev1 not found\","
                        "\"ExceptionMessage\":\"Tracking ID:4f1e0a-TimeStamp:07/16/2016 00:12:41\"}");
        free(s);

        /* escaping: quotes, backslashes, control characters, non-UTF-8 */
        e = (struct gw_http_error) { .status = 400, .message = "bad \"x\"\\\n\x01 caf\xc3\xa9 \xff", .tracking_id = "t" };
        ASSERT_OK(gw_http_error_body(&e, 0, &s));
        ASSERT_STREQ(s, "{\"Message\":\"ErrorCode:ArgumentInvalid;bad \\\"x\\\"\\\\\\n\\u0001 caf?? ?\","
                        "\"ExceptionMessage\":\"Tracking ID:t-TimeStamp:01/01/1970 00:00:00\"}");
        json_error_t err;
        json_t *j = json_loads(s, 0, &err);
        ASSERT_NOT_NULL(j);
        json_decref(j);
        free(s);
        e.message = "bad \"x\" caf\xc3\xa9";
        ASSERT_OK(gw_http_error_body(&e, 0, &s));
        j = json_loads(s, 0, &err);
        ASSERT_NOT_NULL(j);
        ASSERT_STREQ(json_string_value(json_object_get(j, "Message")), "ErrorCode:ArgumentInvalid;bad \"x\" caf\xc3\xa9");
        json_decref(j);
        free(s);

        /* random tracking id */
        e = (struct gw_http_error) { .status = 500 };
        ASSERT_OK(gw_http_error_body(&e, 0, &s));
        ASSERT_TRUE(strncmp(s, "{\"Message\":\"ErrorCode:ServerError;Internal Server Error\",\"ExceptionMessage\":\"Tracking ID:", 89) == 0);
        ASSERT_EQ(strlen(s), 89 + 32 + strlen("-TimeStamp:01/01/1970 00:00:00\"}"));
        free(s);

        e = (struct gw_http_error) { .status = 400, .name = "Bad;Name" };
        ASSERT_ERR(gw_http_error_body(&e, 0, &s), -EINVAL);
        e = (struct gw_http_error) { .status = 200 };
        ASSERT_ERR(gw_http_error_body(&e, 0, &s), -EINVAL);

        /* the status -> name mapping */
        static const struct {
                int status;
                const char *name;
        } names[] = {
                { 400, "ArgumentInvalid" },     { 408, "RequestTimeout" }, { 411, "ArgumentInvalid" },
                { 413, "MessageTooLarge" },     { 414, "ArgumentInvalid" }, { 417, "ArgumentInvalid" },
                { 431, "MessageTooLarge" },     { 501, "NotImplemented" }, { 505, "InvalidProtocolVersion" },
                { 401, "IotHubUnauthorized" },  { 412, "PreconditionFailed" }, { 429, "ThrottlingException" },
                { 418, "ArgumentInvalid" },     { 599, "ServerError" },
        };
        for (size_t i = 0; i < ELEMENTSOF(names); i++)
                ASSERT_STREQ(gw_http_error_name(names[i].status), names[i].name);

        /* a codec error answered whole */
        struct gw_http_parser *p = NULL;
        size_t n;
        const char *msg;
        ASSERT_OK(gw_http_parser_new(NULL, &p));
        const char *bad = "POST /x HTTP/1.1\r\nHost: h\r\n\r\n";
        ASSERT_EQ(gw_http_parser_feed(p, (const uint8_t *) bad, strlen(bad), &n), GW_HTTP_ERROR);
        struct gw_http_buf b = {};
        e = (struct gw_http_error) { .status = gw_http_parser_error(p, &msg), .tracking_id = "abc" };
        e.message = msg;
        ASSERT_EQ(gw_http_error_response(&b, NULL, true, &e, 1700000000ULL * 1000000), 1);
        const char *body = "{\"Message\":\"ErrorCode:ArgumentInvalid;Content-Length or chunked Transfer-Encoding required\","
                           "\"ExceptionMessage\":\"Tracking ID:abc-TimeStamp:11/14/2023 22:13:20\"}";
        char expected[1024];
        snprintf(expected, sizeof expected,
                 "HTTP/1.1 411 Length Required\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
                 "Content-Type: application/json; charset=utf-8\r\niothub-errorcode: ArgumentInvalid\r\n"
                 "Connection: close\r\nContent-Length: %zu\r\n\r\n%s", strlen(body), body);
        assert_buf(&b, expected);
        gw_http_buf_done(&b);
        gw_http_parser_free(p);

        /* an API error on a keep-alive request keeps the connection */
        p = parse_one(NULL, "GET /devices/x HTTP/1.1\r\nHost: h\r\n\r\n");
        e = (struct gw_http_error) { .status = 404, .name = "DeviceNotFound", .message = "Device x not found", .tracking_id = "q" };
        ASSERT_EQ(gw_http_error_response(&b, gw_http_parser_request(p), false, &e, 0), 0);
        ASSERT_NOT_NULL(memmem(b.data, b.len, "iothub-errorcode: DeviceNotFound\r\n", 34));
        ASSERT_NULL(memmem(b.data, b.len, "Connection:", 11));
        gw_http_buf_done(&b);
        gw_http_parser_free(p);
}

int main(void) {
        TEST_RUN(test_simple_get);
        TEST_RUN(test_statuses);
        TEST_RUN(test_byte_at_a_time);
        TEST_RUN(test_pipelined);
        TEST_RUN(test_chunked);
        TEST_RUN(test_expect_continue);
        TEST_RUN(test_keep_alive);
        TEST_RUN(test_upgrade_and_forms);
        TEST_RUN(test_headers);
        TEST_RUN(test_query);
        TEST_RUN(test_in_progress);
        TEST_RUN(test_response_builder);
        TEST_RUN(test_error_response);
        return 0;
}
