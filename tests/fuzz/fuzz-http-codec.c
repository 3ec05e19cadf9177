/* SPDX-License-Identifier: MIT */
/* HTTP/1.1 codec: the bytes a peer sends on a connection. The input is parsed twice, fed
 * whole and fed in pieces of pseudo-random sizes (derived from the input), handling every
 * event as a connection would (pipelining included); both runs must give the same events,
 * requests and errors, or we abort(). Every parsed request is checked against the parser's
 * contract and answered through the response builder; every error through the error
 * response. The limits too are derived from the input, so the bounds get exercised. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "front/http-codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x)                                                                 \
        do {                                                                     \
                if (!(x)) {                                                      \
                        fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #x); \
                        abort();                                                 \
                }                                                                \
        } while (0)

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
        const uint8_t *b = p;
        for (size_t i = 0; i < n; i++) {
                h ^= b[i];
                h *= UINT64_C(0x100000001b3);
        }
        return h;
}

static uint64_t fnv_str(uint64_t h, const char *s) {
        return s ? fnv(h, s, strlen(s) + 1) : fnv(h, "\xff", 1);
}

static uint64_t fnv_u64(uint64_t h, uint64_t v) {
        return fnv(h, &v, sizeof v);
}

static void check_fields(const struct gw_http_header *f, size_t n, size_t max) {
        CHECK(n <= max);
        for (size_t i = 0; i < n; i++) {
                CHECK(f[i].name && *f[i].name);
                CHECK(f[i].value && strlen(f[i].value) == f[i].value_len);
                CHECK(!strpbrk(f[i].value, "\r\n"));
                CHECK(!strpbrk(f[i].name, " \t:\r\n"));
        }
}

static uint64_t digest_request(uint64_t h, const struct gw_http_request *r, const struct gw_http_limits *l) {
        /* the contract */
        CHECK(r->method_str && *r->method_str && r->path && *r->path);
        CHECK(r->version_minor == 0 || r->version_minor == 1);
        CHECK(r->path[0] == '/' || (r->path[0] == '*' && r->method == GW_HTTP_METHOD_OPTIONS));
        CHECK(r->body);
        CHECK(r->body_len <= l->body_max);
        CHECK(r->body[r->body_len] == 0);
        CHECK(!(r->chunked && r->content_length));
        CHECK(r->chunked || r->body_len == r->content_length);
        CHECK(!r->expect_continue || (r->has_body && r->version_minor == 1));
        CHECK(!r->upgrade || r->upgrade_protocol);
        check_fields(r->headers, r->n_headers, l->header_count_max);
        check_fields(r->trailers, r->n_trailers, l->header_count_max);
        CHECK(!r->n_params || r->query);
        for (size_t i = 0; i < r->n_params; i++)
                CHECK(gw_http_query_get(r, r->params[i].key) != NULL);
        for (size_t i = 0; i < r->n_headers; i++)
                CHECK(gw_http_header_get(r, r->headers[i].name) != NULL);

        h = fnv_u64(h, (uint64_t) r->method);
        h = fnv_str(h, r->method_str);
        h = fnv_u64(h, (uint64_t) r->version_minor);
        h = fnv_str(h, r->path);
        h = fnv_str(h, r->query);
        h = fnv_str(h, r->host);
        for (size_t i = 0; i < r->n_headers; i++)
                h = fnv_str(fnv_str(h, r->headers[i].name), r->headers[i].value);
        for (size_t i = 0; i < r->n_params; i++)
                h = fnv_str(fnv_str(h, r->params[i].key), r->params[i].value);
        for (size_t i = 0; i < r->n_trailers; i++)
                h = fnv_str(fnv_str(h, r->trailers[i].name), r->trailers[i].value);
        h = fnv(h, r->body, r->body_len);
        h = fnv_u64(h, r->body_len);
        h = fnv_u64(h, r->content_length);
        h = fnv_u64(h, (uint64_t) r->has_body | (uint64_t) r->chunked << 1 | (uint64_t) r->keep_alive << 2 |
                               (uint64_t) r->expect_continue << 3 | (uint64_t) r->upgrade << 4);
        h = fnv_str(h, r->upgrade_protocol);

        char *dec = NULL;
        if (gw_http_path_decode(r->path, strlen(r->path), true, &dec) == 0) {
                CHECK(strlen(dec) <= strlen(r->path));
                free(dec);
        }
        return h;
}

static void respond(const struct gw_http_request *r) {
        struct gw_http_buf b = {};
        int k;

        (void) gw_http_response_begin(&b, r->has_body ? 204 : 200, NULL);
        (void) gw_http_response_date(&b, 1700000000ULL * 1000000);
        (void) gw_http_response_header(&b, "X-Path", r->path);
        k = gw_http_response_connection(&b, r, false);
        CHECK(k == 0 || k == 1);
        CHECK(k == !r->keep_alive);
        if (r->has_body)
                (void) gw_http_response_end(&b, NULL, 0);
        else if (r->version_minor == 1) {
                (void) gw_http_response_end_chunked(&b);
                (void) gw_http_chunk(&b, r->body, r->body_len);
                (void) gw_http_chunk(&b, r->method_str, strlen(r->method_str));
                (void) gw_http_chunk_end(&b);
        } else
                (void) gw_http_response_end(&b, r->path, strlen(r->path));
        CHECK(b.error == 0);
        CHECK(b.len > 12 && memcmp(b.data, "HTTP/1.1 ", 9) == 0);
        gw_http_buf_done(&b);
}

static void respond_error(int status, const char *message) {
        struct gw_http_buf b = {};
        struct gw_http_error e = { .status = status, .message = message, .tracking_id = "fuzz" };

        CHECK(status >= 400 && status <= 599 && message);
        int k = gw_http_error_response(&b, NULL, true, &e, 0);
        CHECK(k == 1);
        CHECK(b.close);
        gw_http_buf_done(&b);
}

/* Runs the input through one parser; piece sizes come from *rng (0: whole). Returns a digest
 * of every event. */
static uint64_t run(const struct gw_http_limits *l, const uint8_t *data, size_t size, uint64_t rng, size_t *ret_off) {
        struct gw_http_parser *p = NULL;
        uint64_t h = UINT64_C(0xcbf29ce484222325);
        size_t off = 0, avail = 0;

        if (gw_http_parser_new(l, &p) < 0)
                abort();
        for (;;) {
                if (off == avail && avail < size) {
                        size_t step = size;
                        if (rng) {
                                rng ^= rng << 13;
                                rng ^= rng >> 7;
                                rng ^= rng << 17;
                                step = (rng & 3) == 0 ? 1 + (size_t) (rng >> 8) % 512 : 1 + (size_t) (rng >> 8) % 7;
                        }
                        avail = avail + step < size ? avail + step : size;
                }
                size_t consumed = 0;
                int r = gw_http_parser_feed(p, data + off, avail - off, &consumed);
                CHECK(r >= 0);
                CHECK(consumed <= avail - off);
                off += consumed;
                if (r != GW_HTTP_NEED_MORE) /* how often more is needed depends on the split */
                        h = fnv_u64(h, (uint64_t) r);
                if (r == GW_HTTP_HEADERS) {
                        const struct gw_http_request *req = gw_http_parser_request(p);
                        CHECK(req && req->body_len == 0);
                        CHECK(gw_http_parser_in_progress(p));
                        h = fnv_str(h, req->path);
                } else if (r == GW_HTTP_REQUEST) {
                        const struct gw_http_request *req = gw_http_parser_request(p);
                        CHECK(req);
                        CHECK(!gw_http_parser_in_progress(p));
                        h = digest_request(h, req, l);
                        respond(req);
                        gw_http_parser_next(p);
                } else if (r == GW_HTTP_ERROR) {
                        const char *msg = NULL;
                        int st = gw_http_parser_error(p, &msg);
                        h = fnv_u64(h, (uint64_t) st);
                        h = fnv_str(h, msg);
                        respond_error(st, msg);
                        break;
                } else {
                        CHECK(off == avail);
                        if (avail == size) {
                                h = fnv_u64(h, gw_http_parser_in_progress(p));
                                break;
                        }
                }
        }
        gw_http_parser_free(p);
        *ret_off = off;
        return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct gw_http_limits l;
        uint64_t seed = fnv(UINT64_C(0xcbf29ce484222325), data, size);
        size_t off_whole, off_pieces;

        if (size > 256 * 1024)
                return 0;
        gw_http_limits_default(&l);
        if (seed & 1) {
                /* small limits, so the 413 / 414 / 431 paths are reachable */
                l.request_line_max = 16 + (seed >> 8) % 200;
                l.header_bytes_max = 16 + (seed >> 16) % 400;
                l.header_count_max = 1 + (seed >> 24) % 8;
                l.body_max = 1 + (seed >> 32) % 300;
                l.chunk_line_max = 1 + (seed >> 40) % 40;
                l.trailer_bytes_max = 1 + (seed >> 48) % 100;
        }
        uint64_t whole = run(&l, data, size, 0, &off_whole);
        uint64_t pieces = run(&l, data, size, seed | 1, &off_pieces);
        if (whole != pieces || off_whole != off_pieces) {
                fprintf(stderr, "whole and split parses differ\n");
                abort();
        }
        return 0;
}
