/* SPDX-License-Identifier: MIT */
#pragma once

/* HTTP/1.1 server codec: a strict, bounded request parser and a response builder. No I/O.
 *
 * The network layer (gateway/net) reads bytes from a connection and hands them to
 * gw_http_parser_feed(); it writes out the bytes that the response builder produces. The
 * same codec serves the service REST API, the HTTP device API and file upload, and later the
 * WebSocket Upgrade handshake of MQTT-over-WebSocket (WebSocket framing itself is not here).
 *
 * Driving the parser, one request at a time (pipelining is the caller keeping the bytes that
 * were not consumed and feeding them again after answering):
 *
 *         feed() -> GW_HTTP_NEED_MORE   every byte consumed; read more and feed again.
 *         feed() -> GW_HTTP_HEADERS     request line and header section complete, nothing of
 *                                       the body read yet. gw_http_parser_request() is valid
 *                                       from now on. If req->expect_continue, answer
 *                                       "100 Continue" (gw_http_response_continue()), or
 *                                       refuse with a final status (413, 417, 401, ...) and
 *                                       close the connection. The caller may lower or raise
 *                                       the body limit of this one request here
 *                                       (gw_http_parser_set_body_max()). Feed again to read
 *                                       the body; HEADERS is returned for every request, even
 *                                       one without a body (the next feed then returns
 *                                       REQUEST at once, also with len == 0).
 *         feed() -> GW_HTTP_REQUEST     the whole request, body and trailers included, has
 *                                       been consumed; *ret_consumed stops exactly at its
 *                                       end, so the bytes after it are the next pipelined
 *                                       request (or, after an accepted Upgrade, the new
 *                                       protocol's, which the caller takes over). Answer it,
 *                                       then call gw_http_parser_next() before feeding the
 *                                       rest. Feeding before next() is refused (-EBUSY).
 *         feed() -> GW_HTTP_ERROR       the peer sent something this codec refuses.
 *                                       gw_http_parser_error() gives the status (400, 411,
 *                                       413, 414, 417, 431, 501, 505) and a fixed one-line
 *                                       reason. Send the error (gw_http_error_response() with
 *                                       closing = true) and close the connection: after an
 *                                       error the framing of what follows is unknown, so the
 *                                       parser stays in the error state (every later feed
 *                                       returns GW_HTTP_ERROR and consumes nothing).
 *         feed() -> -ENOMEM             allocation failed (within the limits); the parser is
 *                                       in the error state with status 500. -EBUSY: called
 *                                       after REQUEST without next(). -EINVAL: bad arguments.
 *
 * 408 Request Timeout belongs to the network layer, which knows time: when its idle timer
 * fires it asks gw_http_parser_in_progress() and sends 408 if a request was half received,
 * or closes silently if the connection was idle between requests.
 *
 * What is accepted (RFC 9110/9112, strict on purpose — this parser faces the network and
 * its decisions must not differ from those of any proxy in front of it):
 *   - Lines end with CRLF. A bare LF or a bare CR anywhere in the request line, a header
 *     line, a chunk-size line, after chunk data or in a trailer is refused with 400 (RFC 9112
 *     §2.2 allows bare LF; we do not, to leave no room for framing disagreements). Up to four
 *     empty lines (CRLF) before the request line are ignored (RFC 9112 §2.2).
 *   - Request line: method (token, at most 32 characters, else 501), one SP, request-target,
 *     one SP, HTTP-version. The target is origin-form ("/path?query", RFC 3986 characters
 *     only, well-formed %HH escapes, no fragment), "*" (OPTIONS only) or absolute-form
 *     ("http[s]://authority/path?query", reduced to path and query; the authority, without
 *     userinfo, becomes req->host). "HTTP/1.1" and "HTTP/1.0" are served; any other
 *     well-formed "HTTP/d.d" gets 505; anything that is not an HTTP-version gets 400. A
 *     request line longer than limits.request_line_max gets 414 when the target is what
 *     overflowed, 400 otherwise.
 *   - Header fields: token name, ":" with no whitespace before it, OWS trimmed around the
 *     value, value characters VCHAR / SP / HTAB / obs-text (other control bytes: 400). Line
 *     folding (a line starting with SP or HTAB) is refused with 400. More than
 *     header_count_max fields or more than header_bytes_max bytes of header section gives
 *     431. HTTP/1.1 requires exactly one Host (else 400); HTTP/1.0 at most one.
 *   - Body framing (request smuggling defence): Transfer-Encoding and Content-Length together
 *     -> 400; Transfer-Encoding in an HTTP/1.0 request -> 400; Transfer-Encoding whose last
 *     coding is not "chunked" (e.g. "chunked, gzip", "gzip") -> 400, as RFC 9112 §6.3 says;
 *     "chunked" last but preceded by another coding (e.g. "gzip, chunked") -> 501 (a coding
 *     we do not implement); "chunked" twice -> 400. Content-Length must be 1*DIGIT; several
 *     Content-Length fields (or a list) with one identical value are accepted, different
 *     values -> 400. A declared length above the body limit -> 413 before the body is read;
 *     a chunked body that grows above it -> 413 as soon as the chunk size says so. POST, PUT
 *     and PATCH without Content-Length or chunked -> 411; other methods without either have
 *     no body.
 *   - Chunked bodies: hex chunk-size (no sign, no 0x), extensions ignored (only checked for
 *     control bytes), the size line bounded by chunk_line_max (else 400), data followed by
 *     CRLF, then trailer fields parsed like header fields into req->trailers (never merged
 *     into the headers), bounded by trailer_bytes_max and header_count_max (431).
 *   - Expect: "100-continue" (case-insensitive) sets expect_continue on an HTTP/1.1 request
 *     that has a body (ignored for HTTP/1.0, RFC 9110 §10.1.1); any other expectation ->
 *     417.
 *   - Keep-alive: HTTP/1.1 keeps the connection unless "Connection: close"; HTTP/1.0 closes it
 *     unless "Connection: keep-alive" (and no "close").
 *   - Upgrade: req->upgrade when an HTTP/1.1 request has an Upgrade field and "upgrade" among
 *     its Connection options; req->upgrade_protocol is the Upgrade value. Nothing else is
 *     done about it.
 *   - The query string is split at "&" and "=" and percent-decoded ("+" is a space), into
 *     req->params; a malformed escape or an escaped NUL in it -> 400.
 *
 * Memory: the parser allocates only as bytes arrive, and never more than the limits allow:
 * the head buffer holds at most request_line_max + header_bytes_max (+ CRLF) bytes, the
 * header index header_count_max entries, the body body_max (+1) bytes, the trailers
 * trailer_bytes_max bytes; the decoded query and host copy are bounded by the request line.
 * Between requests large buffers are released, so an idle keep-alive connection costs only
 * the parser struct. The parser never reads past len, never recurses, and is not
 * thread-safe (one parser per connection, used from the event loop).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct gw_http_limits {
        size_t request_line_max;  /* bytes, CRLF excluded (default 8192) -> 414 / 400 */
        size_t header_bytes_max;  /* bytes of all header lines, CRLFs included (32768) -> 431 */
        size_t header_count_max;  /* header fields; also trailer fields (100) -> 431 */
        size_t body_max;          /* body bytes after de-chunking (1 MiB) -> 413 */
        size_t chunk_line_max;    /* one chunk-size line with extensions, CRLF excluded (256) */
        size_t trailer_bytes_max; /* bytes of all trailer lines (4096) -> 431 */
};

#define GW_HTTP_REQUEST_LINE_MAX_DEFAULT 8192u
#define GW_HTTP_HEADER_BYTES_MAX_DEFAULT 32768u
#define GW_HTTP_HEADER_COUNT_MAX_DEFAULT 100u
#define GW_HTTP_BODY_MAX_DEFAULT (1024u * 1024u)
#define GW_HTTP_CHUNK_LINE_MAX_DEFAULT 256u
#define GW_HTTP_TRAILER_BYTES_MAX_DEFAULT 4096u
/* Upper bounds accepted by gw_http_parser_new() (-EINVAL above them). */
#define GW_HTTP_HEAD_MAX_LIMIT (4u * 1024u * 1024u)   /* request_line_max + header_bytes_max */
#define GW_HTTP_BODY_MAX_LIMIT ((size_t) 1 << 30)  /* 1 GiB */

/* Fills l with the defaults above. */
void gw_http_limits_default(struct gw_http_limits *l);

enum gw_http_method {
        GW_HTTP_METHOD_OTHER, /* any other token: see method_str */
        GW_HTTP_METHOD_GET,
        GW_HTTP_METHOD_HEAD,
        GW_HTTP_METHOD_POST,
        GW_HTTP_METHOD_PUT,
        GW_HTTP_METHOD_PATCH,
        GW_HTTP_METHOD_DELETE,
        GW_HTTP_METHOD_OPTIONS,
        _GW_HTTP_METHOD_MAX,
};

/* One header or trailer field. name and value are NUL-terminated (a field can hold no NUL
 * byte), value has its surrounding whitespace trimmed; value_len == strlen(value). */
struct gw_http_header {
        const char *name;
        const char *value;
        size_t value_len;
};

/* One query parameter, percent-decoded ("+" -> space). value is "" for "?key" and "?key=". */
struct gw_http_param {
        const char *key;
        const char *value;
};

/* A request, owned by its parser. Every pointer stays valid until gw_http_parser_next(),
 * gw_http_parser_free(), or (for body) only from the GW_HTTP_REQUEST event on. Read-only. */
struct gw_http_request {
        enum gw_http_method method;
        const char *method_str;           /* as received (methods are case-sensitive) */
        int version_minor;                /* 0 (HTTP/1.0) or 1 (HTTP/1.1) */
        const char *path;                 /* raw (still percent-encoded) path, "/..." or "*" */
        const char *query;                /* raw query without "?", NULL when there is none */
        const char *host;                 /* absolute-form authority, else Host value, else NULL */
        const struct gw_http_header *headers;
        size_t n_headers;
        const struct gw_http_param *params;
        size_t n_params;
        const struct gw_http_header *trailers; /* valid from GW_HTTP_REQUEST on */
        size_t n_trailers;
        const uint8_t *body;              /* from GW_HTTP_REQUEST on; NUL-terminated, not counted */
        size_t body_len;
        uint64_t content_length;          /* declared Content-Length (0 if none or chunked) */
        bool has_body;                    /* Content-Length > 0 or chunked */
        bool chunked;
        bool keep_alive;
        bool expect_continue;
        bool upgrade;
        const char *upgrade_protocol;     /* the Upgrade value when upgrade, else NULL */
};

enum gw_http_event {
        GW_HTTP_NEED_MORE = 0,
        GW_HTTP_HEADERS = 1,
        GW_HTTP_REQUEST = 2,
        GW_HTTP_ERROR = 3,
};

struct gw_http_parser;

/* Creates a parser. limits may be NULL (defaults); a zero field means its default. Returns
 * 0, -EINVAL when a limit is above GW_HTTP_HEAD_MAX_LIMIT / GW_HTTP_BODY_MAX_LIMIT, or
 * -ENOMEM. The limits are copied. */
int gw_http_parser_new(const struct gw_http_limits *limits, struct gw_http_parser **ret);

/* Frees the parser and the request it holds. Accepts NULL; returns NULL. */
struct gw_http_parser *gw_http_parser_free(struct gw_http_parser *p);

/* Parses up to len bytes of data (borrowed; may be NULL when len == 0) and stops right after
 * an event. Returns an enum gw_http_event (>= 0) and sets *ret_consumed to the number of
 * bytes used (the caller keeps the rest), or -ENOMEM / -EBUSY / -EINVAL (see above; on
 * those *ret_consumed is not written). Never blocks. */
int gw_http_parser_feed(struct gw_http_parser *p, const uint8_t *data, size_t len, size_t *ret_consumed);

/* The request being parsed, from the GW_HTTP_HEADERS event until gw_http_parser_next();
 * NULL otherwise. Borrowed from the parser. */
const struct gw_http_request *gw_http_parser_request(const struct gw_http_parser *p);

/* After GW_HTTP_ERROR (or -ENOMEM): the HTTP status to answer with, and (if ret_message is
 * not NULL) a static one-line reason suitable for the error body. 0 when not in error. */
int gw_http_parser_error(const struct gw_http_parser *p, const char **ret_message);

/* Whether part of a request has been received and not yet all of it: true from the first
 * byte of a request line (leading empty lines do not count) until GW_HTTP_REQUEST. False
 * between requests (an idle keep-alive connection), while the caller holds a complete
 * request, and in the error state (the caller is closing anyway). */
bool gw_http_parser_in_progress(const struct gw_http_parser *p);

/* Releases the current request after GW_HTTP_REQUEST, so the next one can be fed. Large
 * buffers are freed. Does nothing in any other state (in particular it does not abandon a
 * half-read request or body: that would take the rest of the body for the next request). */
void gw_http_parser_next(struct gw_http_parser *p);

/* Changes the body limit for the current request only (call at GW_HTTP_HEADERS, e.g. a file
 * upload route allowing more than the listener default, an events route allowing less).
 * Returns 0, -E2BIG when the declared Content-Length already exceeds max (answer 413), or
 * -EINVAL when max > GW_HTTP_BODY_MAX_LIMIT or not at the HEADERS stage. */
int gw_http_parser_set_body_max(struct gw_http_parser *p, size_t max);

/* After GW_HTTP_REQUEST: moves the body buffer to the caller (no copy, e.g. into a hub
 * message). *ret_body is malloc'd and NUL-terminated after *ret_len (may be NULL) bytes; the
 * caller frees it. req->body becomes "" and req->body_len 0. -EINVAL in any other state,
 * -ENOMEM. */
int gw_http_parser_take_body(struct gw_http_parser *p, uint8_t **ret_body, size_t *ret_len);

/* Case-insensitive lookup of the first header field called name; NULL when absent. */
const char *gw_http_header_get(const struct gw_http_request *req, const char *name);

/* Decoded value of the first query parameter called key (exact, case-sensitive match, as
 * IoT Hub's "api-version"); NULL when absent. */
const char *gw_http_query_get(const struct gw_http_request *req, const char *key);

/* Percent-decodes a raw path (req->path, or a segment of it: len bytes) into a new string
 * ("+" stays "+"). -EINVAL on a malformed escape or an escaped NUL ("%00"); with
 * refuse_dot_segments also when a decoded segment is "." or ".." (directory escapes when a
 * path names files). -ENOMEM. Remember that "%2F" decodes to "/": split the raw path on "/"
 * first when segments matter. */
int gw_http_path_decode(const char *path, size_t len, bool refuse_dot_segments, char **ret);

/* ---- response builder ------------------------------------------------------------------ */

/* A growable output buffer with a sticky error: after a failure every later call returns the
 * same error and appends nothing, so a response can be built without checking each step.
 * Zero-initialize it ({}); gw_http_buf_done() frees it. data is not NUL-terminated. */
struct gw_http_buf {
        char *data;
        size_t len;
        size_t cap;
        int error;      /* 0 or the first -errno */
        int status;     /* status of the response being built */
        bool close;     /* set by gw_http_response_connection(): close after sending */
};

void gw_http_buf_done(struct gw_http_buf *b);
/* Empties the buffer (keeps its memory) and clears the error. */
void gw_http_buf_reset(struct gw_http_buf *b);
/* Appends raw bytes. */
int gw_http_buf_append(struct gw_http_buf *b, const void *data, size_t len);

/* Standard reason phrase for a status ("Not Found"), or "Unknown" for codes we do not know. */
const char *gw_http_status_reason(int status);

/* "HTTP/1.1 <status> <reason>\r\n". reason NULL -> gw_http_status_reason(). status must be
 * 100..599 and reason free of CR/LF, else -EINVAL. */
int gw_http_response_begin(struct gw_http_buf *b, int status, const char *reason);

/* "<name>: <value>\r\n". name must be a token and value free of CR, LF and NUL (-EINVAL). */
int gw_http_response_header(struct gw_http_buf *b, const char *name, const char *value);

/* Adds the Connection field a response needs: "Connection: close" when closing (the server
 * is going away), req is NULL (no request could be parsed) or !req->keep_alive, and
 * "Connection: keep-alive" for a keep-alive HTTP/1.0 request; nothing for a plain HTTP/1.1
 * keep-alive. Sets b->close accordingly. Returns 1 when the connection must be closed after
 * this response, 0 when it stays open, or the buffer's error. */
int gw_http_response_connection(struct gw_http_buf *b, const struct gw_http_request *req, bool closing);

/* Formats usec since the epoch as an IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT"). */
char *gw_http_format_date(uint64_t usec, char buf[static 32]);
/* "Date: <IMF-fixdate>\r\n". */
int gw_http_response_date(struct gw_http_buf *b, uint64_t now_usec);

/* Ends the header section with "Content-Length: <len>" (not for 1xx, 204 and 304 responses,
 * which have no body: len must then be 0) and appends the body (may be NULL when len 0). */
int gw_http_response_end(struct gw_http_buf *b, const void *body, size_t len);
/* Ends the header section with "Content-Length: <length>" and no body: for HEAD answers, or a
 * body the caller sends separately. */
int gw_http_response_end_headers(struct gw_http_buf *b, uint64_t length);
/* Ends the header section with "Transfer-Encoding: chunked" (streaming, long-poll). Only for
 * HTTP/1.1 requests: an HTTP/1.0 peer cannot read it (send Content-Length, or close). */
int gw_http_response_end_chunked(struct gw_http_buf *b);
/* One chunk ("<hex len>\r\n<data>\r\n"); len 0 appends nothing (a zero chunk would end the
 * body). */
int gw_http_chunk(struct gw_http_buf *b, const void *data, size_t len);
/* The last chunk, no trailers: "0\r\n\r\n". */
int gw_http_chunk_end(struct gw_http_buf *b);

/* "HTTP/1.1 100 Continue\r\n\r\n" (interim response; the final one follows later). */
int gw_http_response_continue(struct gw_http_buf *b);

/* ---- errors in IoT Hub's shape (reference §5.1) ----------------------------------------- */

/* The IoT Hub error name used for a status when the caller has no more specific one. The
 * codec-level statuses map as: 400, 411, 414, 417 -> ArgumentInvalid; 413, 431 ->
 * MessageTooLarge; 505 -> InvalidProtocolVersion; and 401 -> IotHubUnauthorized,
 * 412 -> PreconditionFailed, 429 -> ThrottlingException, 500 -> ServerError,
 * 503 -> ServiceUnavailable, 504 -> GatewayTimeout, per the reference. Statuses the reference
 * has no name for get local names: 404 NotFound, 405 MethodNotAllowed, 408 RequestTimeout,
 * 409 Conflict, 415 UnsupportedMediaType, 501 NotImplemented; any other 4xx ArgumentInvalid,
 * any other 5xx ServerError. Never NULL. */
const char *gw_http_error_name(int status);

struct gw_http_error {
        int status;              /* 400..599 */
        const char *name;        /* IoT Hub error name ([A-Za-z0-9]+); NULL -> gw_http_error_name() */
        const char *message;     /* human text (UTF-8; other bytes become '?'); NULL -> reason */
        const char *tracking_id; /* NULL -> 32 random hex digits */
};

/* The legacy IoT Hub error body, compact JSON:
 * {"Message":"ErrorCode:<Name>;<message>","ExceptionMessage":"Tracking ID:<id>-TimeStamp:<MM/dd/yyyy HH:mm:ss>"}
 * (time in UTC). *ret is a new malloc'd string. -EINVAL (bad name/status), -ENOMEM, -EIO
 * (no randomness for the tracking id). */
int gw_http_error_body(const struct gw_http_error *e, uint64_t now_usec, char **ret);

/* A whole error response: status line, Date, Content-Type: application/json; charset=utf-8,
 * iothub-errorcode: <Name>, the Connection field (gw_http_response_connection(b, req,
 * closing); codec errors pass req = NULL), Content-Length and the body above. Returns as
 * gw_http_response_connection() (1: close after sending), or a negative error. */
int gw_http_error_response(struct gw_http_buf *b, const struct gw_http_request *req, bool closing,
                           const struct gw_http_error *e, uint64_t now_usec);
