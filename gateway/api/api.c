/* SPDX-License-Identifier: MIT */
/* The service REST API: HTTP server on gw_net listeners, routing, authorisation, api-version,
 * errors in IoT Hub's shape, internal calls. See api.h. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "api/api-internal.h"
#include "config.h"
#include "hub/auth.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/registry.h"
#include "log-ids.h"
#include "log.h"
#include "net/net.h"

#define API_MAX_LISTENERS 16
#define API_INPUT_MAX (256u * 1024u) /* pipelined bytes kept while a request is answered */

#define API_MAGIC 0x41504931u  /* the userdata of a connection before on_open is the API */
#define CONN_MAGIC 0x434f4e31u

struct api_conn {
        uint32_t magic;
        struct gw_api *api;
        struct gw_net_conn *nc;
        struct gw_http_parser *parser;
        struct api_conn *prev, *next;
        bool metrics;          /* the unauthenticated metrics listener */
        bool processing;
        bool closing;
        struct api_req *pending; /* the request being answered */
        uint8_t *in;
        size_t in_len;
        uint64_t request_started_mono; /* first byte of the request in progress, 0 = none */
        uint64_t last_rx_mono;
};

struct gw_api {
        uint32_t magic;
        sd_event *event;
        struct gw_hub *hub;
        char *const *host_names;
        struct gw_net_listener *listeners[API_MAX_LISTENERS];
        char *listen_addrs[API_MAX_LISTENERS];
        size_t n_listeners;
        struct gw_net_listener *metrics_listener;
        char *metrics_addr;
        struct gw_tls_server *tls;
        struct gw_http_limits limits;
        uint64_t request_timeout_usec, idle_timeout_usec;
        sd_event_source *sweep;
        struct api_conn *conns;
        unsigned n_conns;
        struct api_req *reqs;
        bool stopping;
        struct api_counters ctr;
        struct api_route_stats *route_stats; /* n_routes + 1 */
        struct api_device *device;           /* the device routes' state (api-device.c) */
};

/* ---- routes --------------------------------------------------------------------------- */

#define R_NONE 0u
#define R_ANY_TOKEN (1u << 8) /* any valid policy token */
#define R_DEVICE (1u << 9)    /* device credentials for seg[1] (api-device.c): device SAS, policy, X.509 */
#define R_BLOB (1u << 10)     /* the blob SAS of a file upload in the query (api-device.c) */
#define R_DC HUB_RIGHT_DEVICE_CONNECT
#define R_READ HUB_RIGHT_REGISTRY_READ
#define R_WRITE HUB_RIGHT_REGISTRY_WRITE
#define R_SERVICE HUB_RIGHT_SERVICE_CONNECT

struct api_route {
        const char *name;      /* metrics label */
        enum gw_http_method method;
        const char *pattern;   /* segments; "*" = any one segment */
        unsigned rights;
        bool no_api_version;   /* /health, /metrics */
        bool on_metrics;       /* also served, without a token, by the metrics listener */
        void (*handler)(struct api_req *req);
};

static const struct api_route routes[] = {
        { "device_list", GW_HTTP_METHOD_GET, "devices", R_READ, false, false, api_device_list },
        { "device_bulk", GW_HTTP_METHOD_POST, "devices", R_READ | R_WRITE, false, false, api_device_bulk },
        { "query", GW_HTTP_METHOD_POST, "devices/query", R_SERVICE, false, false, api_query },
        { "device_get", GW_HTTP_METHOD_GET, "devices/*", R_READ, false, false, api_device_get },
        { "device_put", GW_HTTP_METHOD_PUT, "devices/*", R_READ | R_WRITE, false, false, api_device_put },
        { "device_delete", GW_HTTP_METHOD_DELETE, "devices/*", R_READ | R_WRITE, false, false, api_device_delete },
        { "c2d_purge", GW_HTTP_METHOD_DELETE, "devices/*/commands", R_SERVICE, false, false, api_c2d_purge },
        { "stats_devices", GW_HTTP_METHOD_GET, "statistics/devices", R_READ, false, false, api_stats_devices },
        { "stats_service", GW_HTTP_METHOD_GET, "statistics/service", R_READ, false, false, api_stats_service },
        { "twin_get", GW_HTTP_METHOD_GET, "twins/*", R_SERVICE, false, false, api_twin_get },
        { "twin_patch", GW_HTTP_METHOD_PATCH, "twins/*", R_SERVICE, false, false, api_twin_patch },
        { "twin_put", GW_HTTP_METHOD_PUT, "twins/*", R_SERVICE, false, false, api_twin_put },
        { "method_invoke", GW_HTTP_METHOD_POST, "twins/*/methods", R_SERVICE, false, false, api_method_invoke },
        { "c2d_send", GW_HTTP_METHOD_POST, "messages/devicebound/*", R_SERVICE, false, false, api_c2d_send },
        { "feedback_receive", GW_HTTP_METHOD_GET, "messages/serviceBound/feedback", R_SERVICE, false, false,
          api_feedback_receive },
        { "feedback_complete", GW_HTTP_METHOD_DELETE, "messages/serviceBound/feedback/*", R_SERVICE, false, false,
          api_feedback_complete },
        { "feedback_abandon", GW_HTTP_METHOD_POST, "messages/serviceBound/feedback/*/abandon", R_SERVICE, false,
          false, api_feedback_abandon },
        /* The device side (reference §3; api-device.c). */
        { "device_events", GW_HTTP_METHOD_POST, "devices/*/messages/events", R_DEVICE | R_DC, false, false,
          api_dev_events },
        { "module_events", GW_HTTP_METHOD_POST, "devices/*/modules/*/messages/events", R_DEVICE | R_DC, false, false,
          api_dev_events },
        { "device_c2d_receive", GW_HTTP_METHOD_GET, "devices/*/messages/deviceBound", R_DEVICE | R_DC, false, false,
          api_dev_c2d_receive },
        { "device_c2d_complete", GW_HTTP_METHOD_DELETE, "devices/*/messages/deviceBound/*", R_DEVICE | R_DC, false,
          false, api_dev_c2d_settle },
        { "device_c2d_abandon", GW_HTTP_METHOD_POST, "devices/*/messages/deviceBound/*/abandon", R_DEVICE | R_DC,
          false, false, api_dev_c2d_settle },
        { "device_file_init", GW_HTTP_METHOD_POST, "devices/*/files", R_DEVICE | R_DC, false, false,
          api_dev_file_init },
        { "device_file_notify", GW_HTTP_METHOD_POST, "devices/*/files/notifications", R_DEVICE | R_DC, false, false,
          api_dev_file_notify },
        { "device_file_notify_legacy", GW_HTTP_METHOD_POST, "devices/*/files/notifications/*", R_DEVICE | R_DC, false,
          false, api_dev_file_notify },
        { "blob_put", GW_HTTP_METHOD_PUT, "uploads/*/**", R_BLOB, true, false, api_dev_blob_put },
        { "health", GW_HTTP_METHOD_GET, "health", R_ANY_TOKEN, true, true, api_health },
        { "metrics", GW_HTTP_METHOD_GET, "metrics", R_ANY_TOKEN, true, true, api_metrics },
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

size_t api_n_routes(void) {
        return N_ROUTES;
}
const char *api_route_name(size_t i) {
        return i < N_ROUTES ? routes[i].name : "unmatched";
}
const struct api_route_stats *api_route_stats(struct gw_api *api, size_t i) {
        return i <= N_ROUTES ? &api->route_stats[i] : NULL;
}
const struct api_counters *api_get_counters(struct gw_api *api) {
        return &api->ctr;
}
unsigned api_open_connections(struct gw_api *api) {
        return api->n_conns;
}
sd_event *api_event(struct api_req *req) {
        return req->api->event;
}
struct gw_hub *api_get_hub(struct gw_api *api) {
        return api->hub;
}
struct gw_hub *api_hub(struct api_req *req) {
        return req->api->hub;
}
struct gw_net_conn *api_req_net_conn(struct api_req *req) {
        return req->conn && !req->detached ? req->conn->nc : NULL;
}
char *const *api_host_names(struct gw_api *api) {
        return api->host_names;
}
struct api_device *api_get_device(struct gw_api *api) {
        return api ? api->device : NULL;
}


/* Whether the decoded segments match pattern; literal segments case-insensitively (IoT Hub
 * clients write serviceBound / servicebound). A final "**" matches one or more segments. */
static bool route_matches(const char *pattern, char **seg, size_t n) {
        size_t i = 0;
        const char *p = pattern;
        while (*p) {
                const char *slash = strchr(p, '/');
                size_t l = slash ? (size_t) (slash - p) : strlen(p);
                if (i >= n)
                        return false;
                if (l == 2 && p[0] == '*' && p[1] == '*' && !slash)
                        return true;
                if (!(l == 1 && p[0] == '*') && (strlen(seg[i]) != l || strncasecmp(seg[i], p, l) != 0))
                        return false;
                i++;
                p += l;
                if (*p == '/')
                        p++;
        }
        return i == n;
}

/* ---- time ------------------------------------------------------------------------------ */

uint64_t api_now(void) {
        return hub_clock_now(hub_clock_system());
}
uint64_t api_mono(void) {
        return hub_clock_mono(hub_clock_system());
}

/* ---- request objects ------------------------------------------------------------------- */

static void req_unlink(struct api_req *req) {
        if (!req->api)
                return;
        if (req->prev)
                req->prev->next = req->next;
        else if (req->api->reqs == req)
                req->api->reqs = req->next;
        if (req->next)
                req->next->prev = req->prev;
        req->prev = req->next = NULL;
}

static void req_free(struct api_req *req) {
        req_unlink(req);
        for (size_t i = 0; i < req->n_seg; i++)
                free(req->seg[i]);
        free(req->seg);
        free(req->request_id);
        free(req->device_id);
        if (req->state_free && req->state)
                req->state_free(req->state);
        gw_http_parser_free(req->own_parser);
        free(req);
}

const char *api_header(struct api_req *req, const char *name) {
        return req->hr ? gw_http_header_get(req->hr, name) : NULL;
}
const char *api_param(struct api_req *req, const char *key) {
        return req->hr ? gw_http_query_get(req->hr, key) : NULL;
}

int api_req_go_async(struct api_req *req, const char *device_id) {
        if (device_id) {
                req->device_id = strdup(device_id);
                if (!req->device_id)
                        return -ENOMEM;
        }
        req->hr = NULL;
        return 0;
}

json_t *api_etag_header(json_t *headers, const char *etag) {
        char q[64];
        if (!headers)
                headers = json_object();
        snprintf(q, sizeof q, "\"%s\"", etag);
        json_object_set_new(headers, "ETag", json_string(q));
        return headers;
}

/* ---- answering -------------------------------------------------------------------------- */

static void conn_process(struct api_conn *c);

static void count_status(struct gw_api *api, int route, int status) {
        struct api_route_stats *st = &api->route_stats[route < 0 ? (int) N_ROUTES : route];
        for (size_t i = 0; i < API_MAX_ROUTE_STATUSES; i++) {
                if (st->status[i] == status) {
                        st->count[i]++;
                        return;
                }
                if (st->status[i] == 0) {
                        st->status[i] = status;
                        st->count[i] = 1;
                        return;
                }
        }
        st->other++;
}

static void count_latency(struct gw_api *api, uint64_t usec) {
        static const uint64_t le[8] = { 1000, 5000, 10000, 50000, 100000, 500000, 1000000, 5000000 };
        api->ctr.latency_usec_sum += usec;
        api->ctr.latency_count++;
        for (size_t i = 0; i < 8; i++)
                if (usec <= le[i])
                        api->ctr.latency_bucket[i]++;
}

static void conn_answered(struct api_conn *c, bool close_after) {
        c->pending = NULL;
        gw_http_parser_next(c->parser);
        if (close_after) {
                c->closing = true;
                gw_net_conn_close(c->nc, true);
                return;
        }
        if (!c->processing)
                conn_process(c);
}

void api_reply(struct api_req *req, int status, json_t *headers, const char *content_type, const void *body,
               size_t len) {
        struct gw_api *api = req->api;

        if (req->detached || !api) {
                json_decref(headers);
                req_free(req);
                return;
        }
        count_status(api, req->route, status);
        count_latency(api, api_mono() - req->started_mono);

        if (!headers)
                headers = json_object();
        if (req->request_id)
                json_object_set_new(headers, "Request-Id", json_string(req->request_id));
        if (content_type && len > 0)
                json_object_set_new(headers, "Content-Type", json_string(content_type));

        if (req->internal) {
                gw_api_reply_fn fn = req->reply;
                void *ud = req->reply_ud;
                req_free(req);
                fn(ud, status, headers, body ? body : "", body ? len : 0);
                json_decref(headers);
                return;
        }

        struct api_conn *c = req->conn;
        struct gw_http_buf b = { 0 };
        const char *k;
        json_t *v;
        /* The request (for keep-alive) is still in the connection's parser. */
        const struct gw_http_request *hr = gw_http_parser_request(c->parser);

        gw_http_response_begin(&b, status, NULL);
        gw_http_response_date(&b, api_now());
        json_object_foreach (headers, k, v)
                if (json_is_string(v))
                        gw_http_response_header(&b, k, json_string_value(v));
        int closing = gw_http_response_connection(&b, hr, api->stopping);
        if (status == 204 || status == 304)
                gw_http_response_end(&b, NULL, 0);
        else
                gw_http_response_end(&b, body, len);
        json_decref(headers);
        req_free(req);

        if (b.error < 0 || closing < 0) {
                gw_http_buf_done(&b);
                c->closing = true;
                gw_net_conn_close(c->nc, false);
                return;
        }
        int r = gw_net_conn_send(c->nc, b.data, b.len);
        gw_http_buf_done(&b);
        conn_answered(c, r < 0 || closing > 0);
}

void api_reply_json(struct api_req *req, int status, json_t *body, json_t *headers) {
        char *text = NULL;
        if (body) {
                text = hub_json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
                json_decref(body);
                if (!text) {
                        json_decref(headers);
                        api_reply_error(req, 500, "ServerError", "out of memory");
                        return;
                }
        }
        api_reply(req, status, headers, "application/json; charset=utf-8", text, text ? strlen(text) : 0);
        free(text);
}

static void reply_errorv(struct api_req *req, int status, const char *name, bool log, const char *fmt, va_list ap)
        _printf_(5, 0);
static void reply_errorv(struct api_req *req, int status, const char *name, bool log, const char *fmt, va_list ap) {
        char msg[768];
        _cleanup_free_ char *body = NULL;

        vsnprintf(msg, sizeof msg, fmt, ap);
        if (log && !req->detached)
                gw_log_full(status >= 500 ? LOG_WARNING : LOG_INFO, 0,
                            GW_FIELDS(.component = "api", .device = req->device_id, .event = "api-error",
                                      .ratelimit_key = "api-error"),
                            "Service API %s %s: %d %s: %s", req->internal ? "internal" : "request",
                            req->route >= 0 ? routes[req->route].name : "(no route)", status, name, msg);
        struct gw_http_error e = { .status = status, .name = name, .message = msg };
        if (gw_http_error_body(&e, api_now(), &body) < 0) {
                e.name = gw_http_error_name(status);
                e.message = "error";
                if (gw_http_error_body(&e, api_now(), &body) < 0)
                        body = NULL;
        }
        json_t *h = json_pack("{s:s}", "iothub-errorcode", name);
        api_reply(req, status, h, "application/json; charset=utf-8", body, body ? strlen(body) : 0);
}

void api_reply_error(struct api_req *req, int status, const char *name, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        reply_errorv(req, status, name, true, fmt, ap);
        va_end(ap);
}

static void reply_error_nolog(struct api_req *req, int status, const char *name, const char *fmt, ...) _printf_(4, 5);
static void reply_error_nolog(struct api_req *req, int status, const char *name, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        reply_errorv(req, status, name, false, fmt, ap);
        va_end(ap);
}

void api_reply_errno(struct api_req *req, int r, const char *what) {
        const char *id = req->device_id ? req->device_id : (req->n_seg > 1 ? req->seg[1] : "");
        switch (r) {
        case -ENOENT:
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", id);
                break;
        case -EEXIST:
                api_reply_error(req, 409, "DeviceAlreadyExists", "Device %s already exists", id);
                break;
        case -ESTALE:
                api_reply_error(req, 412, "PreconditionFailed", "%s: the etag in If-Match does not match", what);
                break;
        case -EINVAL:
                api_reply_error(req, 400, "ArgumentInvalid", "%s: invalid argument", what);
                break;
        case -E2BIG:
                api_reply_error(req, 413, "MessageTooLarge", "%s: too large", what);
                break;
        case -ESHUTDOWN:
                api_reply_error(req, 503, "ServiceUnavailable", "%s: the hub is stopping", what);
                break;
        default:
                api_reply_error(req, 500, "ServerError", "%s failed: %s", what, strerror(r < 0 ? -r : r));
                break;
        }
}

static bool content_type_is_json(const char *ct) {
        size_t l = strcspn(ct, ";");
        while (l > 0 && (ct[l - 1] == ' ' || ct[l - 1] == '\t'))
                l--;
        return l == strlen("application/json") && strncasecmp(ct, "application/json", l) == 0;
}

int api_body_json(struct api_req *req, json_t **ret) {
        json_error_t err;
        const char *ct = api_header(req, "Content-Type");

        if (ct && !content_type_is_json(ct)) {
                api_reply_error(req, 400, "InvalidContentEncodingOrType",
                                "Content-Type %.64s is not supported, expected application/json", ct);
                return -EINVAL;
        }
        if (!req->hr || req->hr->body_len == 0) {
                api_reply_error(req, 400, "ArgumentNull", "The request body is empty, expected a JSON document");
                return -EINVAL;
        }
        json_t *j = json_loadb((const char *) req->hr->body, req->hr->body_len, JSON_REJECT_DUPLICATES, &err);
        if (!j) {
                api_reply_error(req, 400, "IotHubFormatError", "The body is not valid JSON: %s at line %d column %d",
                                err.text, err.line, err.column);
                return -EINVAL;
        }
        *ret = j;
        return 0;
}

int api_check_fields(struct api_req *req, const json_t *obj, const char *const allowed[], const char *what) {
        const char *k;
        json_t *v;
        json_object_foreach ((json_t *) obj, k, v) {
                bool ok = false;
                for (size_t i = 0; allowed[i] && !ok; i++)
                        ok = streq(allowed[i], k);
                if (!ok) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Unknown field '%.128s' in %s", k, what);
                        return -EINVAL;
                }
        }
        return 0;
}

/* ---- dispatch --------------------------------------------------------------------------- */

/* api-version: a date version "YYYY-MM-DD" optionally followed by "-" and a label
 * ("2020-10-01-preview"). Any well-formed one is accepted (reference: never reject an
 * unknown-but-well-formed value). */
static bool api_version_valid(const char *v) {
        if (!v || strlen(v) < 10)
                return false;
        for (int i = 0; i < 10; i++) {
                if (i == 4 || i == 7) {
                        if (v[i] != '-')
                                return false;
                } else if (v[i] < '0' || v[i] > '9')
                        return false;
        }
        int mon = (v[5] - '0') * 10 + (v[6] - '0'), day = (v[8] - '0') * 10 + (v[9] - '0');
        if (mon < 1 || mon > 12 || day < 1 || day > 31)
                return false;
        if (v[10] == 0)
                return true;
        if (v[10] != '-' || v[11] == 0 || strlen(v) > 40)
                return false;
        for (const char *p = v + 11; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-'))
                        return false;
        return true;
}

static int split_path(const char *path, char ***ret, size_t *ret_n) {
        char **v = NULL;
        size_t n = 0;
        const char *p = path;

        if (*p == '/')
                p++;
        while (*p) {
                size_t l = strcspn(p, "/");
                char *s = NULL;
                int r = gw_http_path_decode(p, l, false, &s);
                if (r < 0)
                        goto fail;
                char **nv = realloc(v, (n + 1) * sizeof(char *));
                if (!nv) {
                        free(s);
                        r = -ENOMEM;
                        goto fail;
                }
                v = nv;
                v[n++] = s;
                p += l;
                if (*p == '/')
                        p++;
                if (n > 16) {
                        r = -EINVAL;
                        goto fail;
                }
                continue;
        fail:
                for (size_t i = 0; i < n; i++)
                        free(v[i]);
                free(v);
                return r;
        }
        *ret = v;
        *ret_n = n;
        return 0;
}

static void log_auth_failure(struct api_req *req, enum hub_auth_failure f) {
        const char *peer = req->conn ? gw_net_conn_get_peer(req->conn->nc) : "internal";
        req->api->ctr.auth_failures[f < 16 ? f : 15]++;
        gw_log_full(LOG_WARNING, 0,
                    GW_FIELDS(.component = "api", .event = "auth-failed", .message_id = GW_MSG_AUTH_FAILED,
                              .ratelimit_key = "api-auth-failed"),
                    "Service API authentication failed from %s: %s", peer, hub_auth_failure_to_string(f));
}

/* Routes, authorises and runs one request; the handler answers (now or later). */
static void dispatch(struct api_req *req, bool metrics_listener) {
        struct gw_api *api = req->api;
        const struct gw_http_request *hr = req->hr;
        struct hub_auth_result ar = { 0 };
        int r;

        api->ctr.requests++;
        const char *rid = gw_http_header_get(hr, "Request-Id");
        if (rid && strlen(rid) <= 128)
                req->request_id = strdup(rid);

        if (streq(hr->path, "*") || split_path(hr->path, &req->seg, &req->n_seg) < 0) {
                api_reply_error(req, 400, "ArgumentInvalid", "The request path is not valid");
                return;
        }

        /* Find the route: path first (404), then method (405). */
        bool path_found = false, device_path = false;
        for (size_t i = 0; i < N_ROUTES; i++) {
                if (!route_matches(routes[i].pattern, req->seg, req->n_seg))
                        continue;
                if (metrics_listener && !routes[i].on_metrics)
                        continue;
                path_found = true;
                device_path = device_path || (routes[i].rights & (R_DEVICE | R_BLOB));
                if (routes[i].method == hr->method) {
                        req->route = (int) i;
                        break;
                }
        }

        if (metrics_listener) {
                /* No authentication: only /metrics and /health. */
                if (req->route < 0) {
                        if (path_found)
                                api_reply_error(req, 405, "MethodNotAllowed", "Method %s not allowed here",
                                                hr->method_str);
                        else
                                api_reply_error(req, 404, "NotFound", "Only /metrics and /health are served here");
                        return;
                }
                routes[req->route].handler(req);
                return;
        }

        if (req->route < 0 && device_path) {
                /* A device-side path (reference §3) with another method: no policy token to ask for. */
                api_reply_error(req, 405, "MethodNotAllowed", "Method %s is not allowed on %.200s", hr->method_str,
                                hr->path);
                return;
        }
        if (req->route >= 0 && (routes[req->route].rights & (R_DEVICE | R_BLOB))) {
                /* Device credentials (api-device.c): answered there when refused. */
                if (!api_device_authorize(req, (routes[req->route].rights & R_BLOB) != 0))
                        return;
                req->rights = req->internal ? HUB_RIGHTS_ALL : HUB_RIGHT_DEVICE_CONNECT;
        } else if (req->internal) {
                req->rights = HUB_RIGHTS_ALL;
        } else {
                const char *auth = gw_http_header_get(hr, "Authorization");
                if (!auth) {
                        api->ctr.auth_failures[HUB_AUTH_MALFORMED]++;
                        gw_log_full(LOG_INFO, 0,
                                    GW_FIELDS(.component = "api", .event = "auth-failed",
                                              .message_id = GW_MSG_AUTH_FAILED, .ratelimit_key = "api-auth-failed"),
                                    "Service API request from %s without Authorization",
                                    gw_net_conn_get_peer(req->conn->nc));
                        reply_error_nolog(req, 401, "IotHubUnauthorized",
                                          "Authorization header missing, expected a SharedAccessSignature policy token");
                        return;
                }
                struct hub_auth_request areq = {
                        .token = auth,
                        .host_names = (const char *const *) api->host_names,
                        .required_rights = 0,
                        .now_usec = api_now(),
                };
                r = hub_auth_check_sas(api->hub->registry, &areq, &ar);
                if (r == -EACCES || (r >= 0 && !ar.policy)) {
                        enum hub_auth_failure f = r >= 0 ? HUB_AUTH_WRONG_SCOPE : ar.failure;
                        log_auth_failure(req, f);
                        reply_error_nolog(req, 401, "IotHubUnauthorized", "Unauthorized: %s",
                                          hub_auth_failure_to_string(f));
                        return;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "Authentication");
                        return;
                }
                req->rights = ar.rights;
        }

        if (req->route < 0) {
                if (path_found)
                        api_reply_error(req, 405, "MethodNotAllowed", "Method %s is not allowed on %.200s",
                                        hr->method_str, hr->path);
                else
                        api_reply_error(req, 404, "NotFound", "No such resource: %.200s", hr->path);
                return;
        }
        const struct api_route *rt = &routes[req->route];
        unsigned need = rt->rights & HUB_RIGHTS_ALL;
        if ((req->rights & need) != need) {
                log_auth_failure(req, HUB_AUTH_INSUFFICIENT_RIGHTS);
                reply_error_nolog(req, 401, "IotHubUnauthorizedAccess",
                                  "Unauthorized: policy %s lacks the %s permission", ar.policy_name,
                                  need & HUB_RIGHT_REGISTRY_WRITE ? "RegistryWrite" :
                                  need & HUB_RIGHT_REGISTRY_READ ? "RegistryRead" : "ServiceConnect");
                return;
        }
        if (!rt->no_api_version) {
                const char *v = gw_http_query_get(hr, "api-version");
                if (!api_version_valid(v)) {
                        api_reply_error(req, 400, "InvalidProtocolVersion",
                                        v ? "api-version %.64s is not a valid version, expected a date version such as 2021-04-12"
                                          : "api-version is missing, expected ?api-version=2021-04-12 or another date version",
                                        v);
                        return;
                }
        }
        rt->handler(req);
}

static struct api_req *req_new(struct gw_api *api) {
        struct api_req *req = calloc(1, sizeof *req);
        if (!req)
                return NULL;
        req->api = api;
        req->route = -1;
        req->started_mono = api_mono();
        req->next = api->reqs;
        if (api->reqs)
                api->reqs->prev = req;
        api->reqs = req;
        return req;
}

/* ---- connections ------------------------------------------------------------------------ */

static void send_codec_error(struct api_conn *c, int status, const char *why) {
        struct gw_http_buf b = { 0 };
        struct gw_http_error e = { .status = status, .message = why };
        c->api->ctr.http_errors++;
        count_status(c->api, -1, status);
        gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "api", .event = "http-error", .ratelimit_key = "api-http-error"),
                    "Service API: refusing a request from %s: %d %s", gw_net_conn_get_peer(c->nc), status, why);
        if (gw_http_error_response(&b, NULL, true, &e, api_now()) >= 0)
                (void) gw_net_conn_send(c->nc, b.data, b.len);
        gw_http_buf_done(&b);
        c->closing = true;
        gw_net_conn_close(c->nc, true);
}

/* Before "100 Continue": a request whose token does not authenticate is refused at once (401,
 * connection closed) instead of having its body sent for nothing. */
static bool continue_allowed(struct api_conn *c, const struct gw_http_request *hr) {
        struct hub_auth_result ar = { 0 };
        const char *auth = gw_http_header_get(hr, "Authorization");
        enum hub_auth_failure f = HUB_AUTH_MALFORMED;

        if (auth) {
                struct hub_auth_request areq = {
                        .token = auth,
                        .host_names = (const char *const *) c->api->host_names,
                        .now_usec = api_now(),
                };
                int r = hub_auth_check_sas(c->api->hub->registry, &areq, &ar);
                if (r >= 0 && ar.policy)
                        return true;
                if (r < 0 && r != -EACCES)
                        return true; /* internal trouble: let the request proper report it */
                f = r >= 0 ? HUB_AUTH_WRONG_SCOPE : ar.failure;
        }
        c->api->ctr.auth_failures[f < 16 ? f : 15]++;
        count_status(c->api, -1, 401);
        gw_log_full(LOG_WARNING, 0,
                    GW_FIELDS(.component = "api", .event = "auth-failed", .message_id = GW_MSG_AUTH_FAILED,
                              .ratelimit_key = "api-auth-failed"),
                    "Service API authentication failed from %s: %s", gw_net_conn_get_peer(c->nc),
                    auth ? hub_auth_failure_to_string(f) : "no Authorization header");
        struct gw_http_buf b = { 0 };
        struct gw_http_error e = { .status = 401, .name = "IotHubUnauthorized",
                                   .message = auth ? hub_auth_failure_to_string(f) : "Authorization header missing" };
        if (gw_http_error_response(&b, hr, true, &e, api_now()) >= 0)
                (void) gw_net_conn_send(c->nc, b.data, b.len);
        gw_http_buf_done(&b);
        c->closing = true;
        gw_net_conn_close(c->nc, true);
        return false;
}

static void conn_process(struct api_conn *c) {
        c->processing = true;
        while (!c->closing && !c->pending) {
                size_t used = 0;
                int r = gw_http_parser_feed(c->parser, c->in, c->in_len, &used);
                if (r < 0) {
                        send_codec_error(c, 500, "internal error");
                        break;
                }
                if (used > 0) {
                        memmove(c->in, c->in + used, c->in_len - used);
                        c->in_len -= used;
                }
                if (r == GW_HTTP_NEED_MORE) {
                        if (gw_http_parser_in_progress(c->parser)) {
                                if (!c->request_started_mono)
                                        c->request_started_mono = api_mono();
                        } else
                                c->request_started_mono = 0;
                        break;
                }
                if (r == GW_HTTP_ERROR) {
                        const char *why = NULL;
                        int st = gw_http_parser_error(c->parser, &why);
                        send_codec_error(c, st ? st : 400, why ? why : "bad request");
                        break;
                }
                if (r == GW_HTTP_HEADERS) {
                        if (!c->request_started_mono)
                                c->request_started_mono = api_mono();
                        const struct gw_http_request *hr = gw_http_parser_request(c->parser);
                        /* Device routes: their own body limits, and their own credentials
                         * (checked with the request, not before 100 Continue). */
                        int dr = api_device_on_headers(c->api, c->parser, hr, c->metrics);
                        if (dr < 0) {
                                send_codec_error(c, -dr, "the request body is over this route's limit");
                                break;
                        }
                        if (hr->expect_continue && !c->metrics && dr == 0 && !continue_allowed(c, hr))
                                break;
                        if (hr->expect_continue) {
                                struct gw_http_buf b = { 0 };
                                gw_http_response_continue(&b);
                                if (b.error >= 0)
                                        (void) gw_net_conn_send(c->nc, b.data, b.len);
                                gw_http_buf_done(&b);
                        }
                        continue;
                }
                /* GW_HTTP_REQUEST */
                c->request_started_mono = 0;
                struct api_req *req = req_new(c->api);
                if (!req) {
                        send_codec_error(c, 503, "out of memory");
                        break;
                }
                req->conn = c;
                req->hr = gw_http_parser_request(c->parser);
                c->pending = req;
                dispatch(req, c->metrics);
        }
        c->processing = false;
}

static ssize_t on_data(struct gw_net_conn *nc, const uint8_t *data, size_t len) {
        struct api_conn *c = gw_net_conn_get_userdata(nc);
        if (c->closing)
                return (ssize_t) len;
        c->last_rx_mono = api_mono();
        size_t room = API_INPUT_MAX - c->in_len;
        size_t take = MIN(room, len);
        if (take > 0) {
                if (!c->in)
                        c->in = malloc(API_INPUT_MAX);
                if (!c->in)
                        return -ENOMEM;
                memcpy(c->in + c->in_len, data, take);
                c->in_len += take;
        }
        if (!c->processing)
                conn_process(c);
        return (ssize_t) take;
}

static int on_open(struct gw_net_conn *nc) {
        struct gw_net_listener *l = gw_net_conn_get_listener(nc);
        struct gw_api *api = gw_net_conn_get_userdata(nc);
        struct api_conn *c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->magic = CONN_MAGIC;
        c->api = api;
        c->nc = nc;
        c->metrics = l == api->metrics_listener;
        c->last_rx_mono = api_mono();
        int r = gw_http_parser_new(&api->limits, &c->parser);
        if (r < 0) {
                free(c);
                return r;
        }
        c->next = api->conns;
        if (api->conns)
                api->conns->prev = c;
        api->conns = c;
        api->n_conns++;
        api->ctr.connections_accepted++;
        if (c->metrics)
                api->ctr.connections_metrics++;
        gw_net_conn_set_userdata(nc, c);
        int enabled = SD_EVENT_OFF;
        if (api->sweep && sd_event_source_get_enabled(api->sweep, &enabled) >= 0 && enabled == SD_EVENT_OFF) {
                (void) sd_event_source_set_time(api->sweep, api_mono() + USEC_PER_SEC / 4);
                (void) sd_event_source_set_enabled(api->sweep, SD_EVENT_ON);
        }
        return 0;
}

static void on_close(struct gw_net_conn *nc, int reason) {
        struct api_conn *c = gw_net_conn_get_userdata(nc);
        /* Before on_open (e.g. a failed handshake) the userdata is still the API. */
        if (!c || c->magic != CONN_MAGIC)
                return;
        struct gw_api *api = c->api;
        if (c->pending) {
                c->pending->conn = NULL;
                c->pending->detached = true;
        }
        if (c->prev)
                c->prev->next = c->next;
        else
                api->conns = c->next;
        if (c->next)
                c->next->prev = c->prev;
        api->n_conns--;
        api->ctr.connections_closed++;
        c->magic = 0;
        gw_http_parser_free(c->parser);
        free(c->in);
        free(c);
}

static const struct gw_net_handler handler = {
        .on_open = on_open,
        .on_data = on_data,
        .on_close = on_close,
};

/* Half-received requests past their time get 408 and the connection closes. */
static int on_sweep(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_api *api = userdata;
        uint64_t now = api_mono();
        for (struct api_conn *c = api->conns, *next; c; c = next) {
                next = c->next;
                if (c->closing || c->pending || !gw_http_parser_in_progress(c->parser))
                        continue;
                if (!c->request_started_mono)
                        c->request_started_mono = now;
                if (now - c->request_started_mono >= api->request_timeout_usec ||
                    now - c->last_rx_mono >= api->idle_timeout_usec) {
                        api->ctr.timeouts++;
                        send_codec_error(c, 408, "the request was not received in time");
                }
        }
        if (api->n_conns == 0)
                return sd_event_source_set_enabled(s, SD_EVENT_OFF); /* on_open turns it on again */
        (void) sd_event_source_set_time(s, usec + USEC_PER_SEC / 4);
        return 0;
}

/* ---- internal calls --------------------------------------------------------------------- */

static bool header_text_ok(const char *s) {
        for (; *s; s++)
                if (*s == '\r' || *s == '\n')
                        return false;
        return true;
}

int gw_api_call_internal(struct gw_api *api, const char *method, const char *target, const json_t *headers,
                         const char *body, size_t body_len, gw_api_reply_fn reply, void *ud) {
        struct gw_http_buf b = { 0 };
        const char *k;
        json_t *v;
        char len[32];
        int r;

        if (!api || !method || !target || target[0] != '/' || !reply || (!body && body_len > 0))
                return -EINVAL;
        if (api->stopping)
                return -ESHUTDOWN;
        if (!header_text_ok(method) || strchr(method, ' ') || !header_text_ok(target) || strchr(target, ' '))
                return -EINVAL;
        if (headers && !json_is_object(headers))
                return -EINVAL;

        bool has_version = strstr(target, "api-version=") != NULL;
        gw_http_buf_append(&b, method, strlen(method));
        gw_http_buf_append(&b, " ", 1);
        gw_http_buf_append(&b, target, strlen(target));
        if (!has_version) {
                const char *sep = strchr(target, '?') ? "&" : "?";
                gw_http_buf_append(&b, sep, 1);
                gw_http_buf_append(&b, "api-version=2021-04-12", strlen("api-version=2021-04-12"));
        }
        gw_http_buf_append(&b, " HTTP/1.1\r\nHost: ", strlen(" HTTP/1.1\r\nHost: "));
        gw_http_buf_append(&b, api->host_names[0], strlen(api->host_names[0]));
        gw_http_buf_append(&b, "\r\n", 2);
        json_object_foreach ((json_t *) headers, k, v) {
                if (!json_is_string(v) || !header_text_ok(k) || !header_text_ok(json_string_value(v)) ||
                    strcasecmp(k, "Content-Length") == 0 || strcasecmp(k, "Transfer-Encoding") == 0 ||
                    strcasecmp(k, "Host") == 0 || strcasecmp(k, "Expect") == 0) {
                        gw_http_buf_done(&b);
                        return -EINVAL;
                }
                gw_http_buf_append(&b, k, strlen(k));
                gw_http_buf_append(&b, ": ", 2);
                gw_http_buf_append(&b, json_string_value(v), strlen(json_string_value(v)));
                gw_http_buf_append(&b, "\r\n", 2);
        }
        snprintf(len, sizeof len, "Content-Length: %zu\r\n\r\n", body_len);
        gw_http_buf_append(&b, len, strlen(len));
        if (body_len)
                gw_http_buf_append(&b, body, body_len);
        if (b.error < 0) {
                r = b.error;
                gw_http_buf_done(&b);
                return r;
        }

        struct gw_http_limits lim = api->limits;
        lim.body_max = MAX(lim.body_max, (size_t) 64 * 1024 * 1024);
        struct gw_http_parser *p = NULL;
        r = gw_http_parser_new(&lim, &p);
        if (r < 0) {
                gw_http_buf_done(&b);
                return r;
        }
        size_t off = 0, used = 0;
        do {
                r = gw_http_parser_feed(p, (const uint8_t *) b.data + off, b.len - off, &used);
                off += r >= 0 ? used : 0;
        } while (r == GW_HTTP_HEADERS || (r == GW_HTTP_NEED_MORE && off < b.len && used > 0));
        gw_http_buf_done(&b);
        if (r != GW_HTTP_REQUEST) {
                gw_http_parser_free(p);
                return r == -ENOMEM ? -ENOMEM : -EINVAL;
        }
        struct api_req *req = req_new(api);
        if (!req) {
                gw_http_parser_free(p);
                return -ENOMEM;
        }
        api->ctr.requests_internal++;
        req->internal = true;
        req->own_parser = p;
        req->hr = gw_http_parser_request(p);
        req->reply = reply;
        req->reply_ud = ud;
        dispatch(req, false);
        return 0;
}

/* ---- listeners, TLS ------------------------------------------------------------------- */

static int load_tls(const struct gw_config *cfg, const char *state_dir, char *const *host_names,
                    struct gw_tls_server **ret) {
        _cleanup_free_ char *cert = NULL, *key = NULL, *ca = NULL;
        int r;

        if (cfg->api_cert_file) {
                cert = strdup(cfg->api_cert_file);
                key = strdup(cfg->api_key_file);
                if (!cert || !key)
                        return -ENOMEM;
        } else {
                const char *ips[API_MAX_LISTENERS + 1] = { 0 };
                char hosts[API_MAX_LISTENERS][64];
                size_t n = 0;
                for (size_t i = 0; cfg->api_listen && cfg->api_listen[i] && n < API_MAX_LISTENERS; i++) {
                        const char *a = cfg->api_listen[i];
                        const char *colon = strrchr(a, ':');
                        if (!colon)
                                continue;
                        size_t l = (size_t) (colon - a);
                        if (a[0] == '[' && l >= 2) {
                                a++;
                                l -= 2;
                        }
                        if (l == 0 || l >= sizeof hosts[0] || strncmp(a, "localhost", l) == 0)
                                continue;
                        memcpy(hosts[n], a, l);
                        hosts[n][l] = 0;
                        ips[n] = hosts[n];
                        n++;
                }
                r = gw_cert_ensure(state_dir, (const char *const *) host_names, ips, &cert, &key, &ca);
                if (r < 0)
                        return r;
                gw_log_info("Service API uses the generated certificate %s; clients trust the CA in %s", cert, ca);
        }
        struct gw_tls_server_config tc = {
                .cert_file = cert,
                .key_file = key,
                /* X.509 devices on the HTTP device API (judged per request, api-device.c). */
                .client_cert = cfg->api_client_cert_optional && cfg->http_device_enabled ? GW_TLS_CLIENT_CERT_OPTIONAL
                                                                                        : GW_TLS_CLIENT_CERT_NONE,
                .client_ca_file = cfg->api_client_ca_file,
        };
        return gw_tls_server_new(&tc, ret);
}

static void apply_limits(struct gw_api *api, const struct gw_config *cfg) {
        gw_http_limits_default(&api->limits);
        api->limits.header_bytes_max = cfg->api_max_header_bytes;
        /* The largest any route takes (file upload); lowered per request at HEADERS. */
        api->limits.body_max = api_device_parser_body_max(cfg);
        api->request_timeout_usec = cfg->api_request_timeout_usec;
        api->idle_timeout_usec = cfg->api_idle_timeout_usec;
}

static int open_listener(struct gw_api *api, const struct gw_config *cfg, const char *addr, const char *path,
                         struct gw_tls_server *tls, bool metrics, struct gw_net_listener **ret) {
        struct gw_net_listener_config lc = {
                .address = addr,
                .config_path = path,
                .tls = tls,
                .allow_plaintext = metrics ? cfg->metrics_allow_non_loopback : cfg->api_allow_plaintext,
                .max_connections = metrics ? 64 : cfg->api_max_connections,
                .max_connections_per_address = metrics ? 16 : cfg->api_max_connections_per_address,
                .handshake_timeout_usec = cfg->api_handshake_timeout_usec,
                /* Our own sweep answers 408 first; the network layer's idle timer is the backstop. */
                .idle_timeout_usec = cfg->api_idle_timeout_usec + 2 * USEC_PER_SEC,
                .max_input_bytes = 64 * 1024,
        };
        int r = gw_net_listener_new(api->event, &lc, &handler, api, ret);
        if (r >= 0)
                gw_log_info("%s listening on %s (port %u, %s)", metrics ? "Metrics endpoint" : "Service API", addr,
                            gw_net_listener_get_port(*ret), tls ? "TLS" : "plain TCP");
        return r;
}

int gw_api_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, const char *state_dir,
               char *const *host_names, struct gw_api **ret) {
        struct gw_api *api = calloc(1, sizeof *api);
        char path[64];
        int r;

        if (!api)
                return -ENOMEM;
        api->magic = API_MAGIC;
        api->event = sd_event_ref(e);
        api->hub = hub;
        api->host_names = host_names;
        api->route_stats = calloc(N_ROUTES + 1, sizeof(struct api_route_stats));
        if (!api->route_stats) {
                gw_api_free(api);
                return -ENOMEM;
        }
        apply_limits(api, cfg);
        r = api_device_new(api, cfg, state_dir, &api->device);
        if (r < 0) {
                gw_api_free(api);
                return r;
        }

        if (cfg->api_enabled) {
                if (!cfg->api_allow_plaintext || cfg->api_cert_file) {
                        r = load_tls(cfg, state_dir, host_names, &api->tls);
                        if (r < 0) {
                                gw_log_errno(LOG_ERR, r, "Cannot set up TLS for the service API: %m");
                                gw_api_free(api);
                                return r;
                        }
                }
                for (size_t i = 0; cfg->api_listen && cfg->api_listen[i] && i < API_MAX_LISTENERS; i++) {
                        snprintf(path, sizeof path, "service_api.listen[%zu]", i);
                        r = open_listener(api, cfg, cfg->api_listen[i], path, api->tls, false, &api->listeners[i]);
                        if (r < 0) {
                                gw_log_errno(LOG_ERR, r, "Cannot listen on %s for the service API: %m",
                                             cfg->api_listen[i]);
                                gw_api_free(api);
                                return r;
                        }
                        api->listen_addrs[i] = strdup(cfg->api_listen[i]);
                        api->n_listeners++;
                }
        }
        if (cfg->metrics_listen) {
                r = open_listener(api, cfg, cfg->metrics_listen, "metrics.listen", NULL, true, &api->metrics_listener);
                if (r < 0) {
                        gw_log_errno(LOG_ERR, r, "Cannot listen on %s for metrics: %m", cfg->metrics_listen);
                        gw_api_free(api);
                        return r;
                }
                api->metrics_addr = strdup(cfg->metrics_listen);
        }
        r = sd_event_add_time(e, &api->sweep, CLOCK_BOOTTIME, api_mono() + USEC_PER_SEC / 4, USEC_PER_SEC / 10,
                              on_sweep, api);
        if (r >= 0)
                r = sd_event_source_set_enabled(api->sweep, SD_EVENT_ON);
        if (r < 0) {
                gw_api_free(api);
                return r;
        }
        *ret = api;
        return 0;
}

int gw_api_reconfigure(struct gw_api *api, const struct gw_config *cfg, const char *state_dir,
                       char *const *host_names) {
        struct gw_net_listener *nl[API_MAX_LISTENERS] = { 0 };
        char *naddr[API_MAX_LISTENERS] = { 0 };
        struct gw_tls_server *tls = NULL;
        struct gw_net_listener *nm = NULL;
        bool keep_metrics;
        size_t n = 0;
        char path[64];
        int r = 0;

        if (cfg->api_enabled && (!cfg->api_allow_plaintext || cfg->api_cert_file)) {
                r = load_tls(cfg, state_dir, host_names, &tls);
                if (r < 0)
                        return gw_log_errno(LOG_ERR, r, "Reload: cannot set up TLS for the service API: %m; keeping the running listeners");
        }
        /* Open what is new first; keep listeners whose address did not change. */
        for (size_t i = 0; cfg->api_enabled && cfg->api_listen && cfg->api_listen[i] && i < API_MAX_LISTENERS; i++) {
                for (size_t j = 0; j < api->n_listeners; j++)
                        if (api->listeners[j] && api->listen_addrs[j] && streq(api->listen_addrs[j], cfg->api_listen[i]) &&
                            (tls != NULL) == (api->tls != NULL)) {
                                nl[n] = api->listeners[j];
                                naddr[n] = api->listen_addrs[j];
                                api->listeners[j] = NULL;
                                api->listen_addrs[j] = NULL;
                                if (tls)
                                        (void) gw_net_listener_set_tls(nl[n], tls);
                                break;
                        }
                if (!nl[n]) {
                        snprintf(path, sizeof path, "service_api.listen[%zu]", i);
                        r = open_listener(api, cfg, cfg->api_listen[i], path, tls, false, &nl[n]);
                        if (r < 0) {
                                gw_log_errno(LOG_ERR, r, "Reload: cannot listen on %s: %m", cfg->api_listen[i]);
                                goto rollback;
                        }
                        naddr[n] = strdup(cfg->api_listen[i]);
                }
                n++;
        }
        keep_metrics = api->metrics_addr && cfg->metrics_listen && streq(api->metrics_addr, cfg->metrics_listen);
        if (cfg->metrics_listen && !keep_metrics) {
                r = open_listener(api, cfg, cfg->metrics_listen, "metrics.listen", NULL, true, &nm);
                if (r < 0) {
                        gw_log_errno(LOG_ERR, r, "Reload: cannot listen on %s for metrics: %m", cfg->metrics_listen);
                        goto rollback;
                }
        }
        /* Commit. */
        for (size_t j = 0; j < api->n_listeners; j++) {
                api->listeners[j] = gw_net_listener_free(api->listeners[j]);
                free(api->listen_addrs[j]);
                api->listen_addrs[j] = NULL;
        }
        memcpy(api->listeners, nl, sizeof nl);
        memcpy(api->listen_addrs, naddr, sizeof naddr);
        api->n_listeners = n;
        if (!keep_metrics) {
                api->metrics_listener = gw_net_listener_free(api->metrics_listener);
                free(api->metrics_addr);
                api->metrics_addr = NULL;
                if (nm) {
                        api->metrics_listener = nm;
                        api->metrics_addr = strdup(cfg->metrics_listen);
                }
        }
        gw_tls_server_unref(api->tls);
        api->tls = tls;
        api->host_names = host_names;
        apply_limits(api, cfg);
        api_device_reconfigure(api->device, cfg);
        return 0;

rollback:
        /* Put kept listeners back where they were; close the new ones. */
        for (size_t i = 0; i < n + 1 && i < API_MAX_LISTENERS; i++) {
                if (!nl[i])
                        continue;
                bool returned = false;
                for (size_t j = 0; j < api->n_listeners && !returned; j++)
                        if (!api->listeners[j]) {
                                api->listeners[j] = nl[i];
                                api->listen_addrs[j] = naddr[i];
                                returned = true;
                        }
                if (!returned) {
                        gw_net_listener_free(nl[i]);
                        free(naddr[i]);
                }
        }
        /* Kept listeners whose TLS was swapped keep the new server for new connections only
         * when the reload commits: restore the running one. */
        for (size_t j = 0; j < api->n_listeners; j++)
                if (api->listeners[j] && api->tls)
                        (void) gw_net_listener_set_tls(api->listeners[j], api->tls);
        gw_net_listener_free(nm);
        gw_tls_server_unref(tls);
        return r;
}

struct gw_api *gw_api_free(struct gw_api *api) {
        if (!api)
                return NULL;
        api->stopping = true;
        api->sweep = sd_event_source_disable_unref(api->sweep);
        for (size_t i = 0; i < API_MAX_LISTENERS; i++) {
                api->listeners[i] = gw_net_listener_free(api->listeners[i]);
                free(api->listen_addrs[i]);
        }
        api->metrics_listener = gw_net_listener_free(api->metrics_listener);
        free(api->metrics_addr);
        /* Requests still waiting for the store or a device: internal callers get 503 now;
         * the completions find them detached. */
        while (api->reqs) {
                struct api_req *req = api->reqs;
                req_unlink(req);
                if (req->internal && !req->detached) {
                        json_t *h = json_pack("{s:s}", "iothub-errorcode", "ServiceUnavailable");
                        req->reply(req->reply_ud, 503, h, "", 0);
                        json_decref(h);
                }
                req->detached = true;
                req->api = NULL;
                req->conn = NULL;
                /* Every other request in the list has a hub-core completion still to run,
                 * which finds it detached and frees it. */
                if (req->loop_driven)
                        req_free(req);
        }
        api->device = api_device_free(api->device);
        gw_tls_server_unref(api->tls);
        free(api->route_stats);
        sd_event_unref(api->event);
        free(api);
        return NULL;
}

uint16_t gw_api_service_port(const struct gw_api *api, size_t i) {
        return api && i < api->n_listeners && api->listeners[i] ? gw_net_listener_get_port(api->listeners[i]) : 0;
}

uint16_t gw_api_metrics_port(const struct gw_api *api) {
        return api && api->metrics_listener ? gw_net_listener_get_port(api->metrics_listener) : 0;
}

json_t *gw_api_status(struct gw_api *api) {
        json_t *ls = json_array();
        for (size_t i = 0; i < api->n_listeners; i++)
                json_array_append_new(ls, json_pack("{s:s, s:i, s:b}", "address", api->listen_addrs[i] ? api->listen_addrs[i] : "",
                                                    "port", (int) gw_api_service_port(api, i), "tls", api->tls != NULL));
        return json_pack("{s:o, s:s?, s:i, s:I, s:I, s:I}", "listeners", ls, "metrics", api->metrics_addr,
                         "connections", (int) api->n_conns, "requests", (json_int_t) api->ctr.requests,
                         "requestsInternal", (json_int_t) api->ctr.requests_internal, "connectionsAccepted",
                         (json_int_t) api->ctr.connections_accepted);
}
