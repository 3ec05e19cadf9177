/* SPDX-License-Identifier: MIT */
#pragma once

/* Shared between the service API's files: the request object, the reply helpers, the route
 * handlers. */

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "api/api.h"
#include "front/http-codec.h"
#include "hub.h"
#include "hub/macro.h"

struct api_conn;

#define API_MAX_ROUTE_STATUSES 16

struct api_route_stats {
        int status[API_MAX_ROUTE_STATUSES];
        uint64_t count[API_MAX_ROUTE_STATUSES];
        uint64_t other; /* statuses past the table */
};

struct api_req {
        struct gw_api *api;
        struct api_conn *conn;                /* HTTP: the connection (NULL once detached) */
        struct api_req *prev, *next;          /* api->reqs: every request not yet answered */
        bool internal;
        bool detached;                        /* nobody to answer any more */
        gw_api_reply_fn reply;                /* internal calls */
        void *reply_ud;
        struct gw_http_parser *own_parser;    /* internal calls: the parser holding hr */
        const struct gw_http_request *hr;     /* valid until the first asynchronous step */
        char *request_id;                     /* Request-Id to echo, or NULL */
        char **seg;                           /* decoded path segments */
        size_t n_seg;
        int route;                            /* index in the route table, -1 = none */
        unsigned rights;                      /* granted */
        uint64_t started_mono;
        /* for asynchronous handlers */
        char *device_id;
        void *state;                          /* handler-owned, freed by state_free */
        bool loop_driven;                     /* answered from an event source of its own (no
                                               * hub-core completion): gw_api_free() frees it */
        void (*state_free)(void *);
};

/* ---- replies (api.c) -------------------------------------------------------------------- */

/* Sends the answer (or hands it to the internal caller) and frees req. headers: JSON object
 * name -> string, stolen, may be NULL. content_type NULL: none (no body). */
void api_reply(struct api_req *req, int status, json_t *headers, const char *content_type, const void *body,
               size_t len);
/* JSON body (stolen; NULL -> no body), Content-Type application/json; charset=utf-8. */
void api_reply_json(struct api_req *req, int status, json_t *body, json_t *headers);
/* IoT Hub error (legacy body + iothub-errorcode). Logged once, rate-limited. */
void api_reply_error(struct api_req *req, int status, const char *name, const char *fmt, ...) _printf_(4, 5);
/* Maps the common errno values (-ENOENT DeviceNotFound, -ESTALE PreconditionFailed,
 * -EEXIST DeviceAlreadyExists, -EINVAL ArgumentInvalid, -E2BIG, -ENOMEM, -ESHUTDOWN,
 * store errors ServerError) with what as context. */
void api_reply_errno(struct api_req *req, int r, const char *what);

/* ---- request helpers (api.c) ------------------------------------------------------------ */

const char *api_header(struct api_req *req, const char *name);
const char *api_param(struct api_req *req, const char *key);
/* Parses the body as JSON (Content-Type, when present, must be JSON). On failure the error
 * answer is sent (req is gone) and -EINVAL returned. */
int api_body_json(struct api_req *req, json_t **ret);
/* Reports the first key of obj not in allowed (NULL-terminated) as 400 ArgumentInvalid and
 * returns -EINVAL (req is gone). */
int api_check_fields(struct api_req *req, const json_t *obj, const char *const allowed[], const char *what);
/* Keeps req alive past the handler's return with device_id copied and hr dropped. */
int api_req_go_async(struct api_req *req, const char *device_id);
struct gw_hub *api_hub(struct api_req *req);
struct gw_hub *api_get_hub(struct gw_api *api);
sd_event *api_event(struct api_req *req);
uint64_t api_now(void);      /* wall clock, usec */
uint64_t api_mono(void);     /* CLOCK_BOOTTIME, usec */
/* Quoted etag: "\"<etag>\"". */
json_t *api_etag_header(json_t *headers, const char *etag);

/* ---- route handlers --------------------------------------------------------------------- */

void api_device_get(struct api_req *req);
void api_device_put(struct api_req *req);
void api_device_delete(struct api_req *req);
void api_device_list(struct api_req *req);
void api_device_bulk(struct api_req *req);
void api_stats_devices(struct api_req *req);
void api_stats_service(struct api_req *req);
void api_twin_get(struct api_req *req);
void api_twin_patch(struct api_req *req);
void api_twin_put(struct api_req *req);
void api_query(struct api_req *req);
void api_method_invoke(struct api_req *req);
void api_c2d_send(struct api_req *req);
void api_c2d_purge(struct api_req *req);
void api_feedback_receive(struct api_req *req);
void api_feedback_complete(struct api_req *req);
void api_feedback_abandon(struct api_req *req);
void api_health(struct api_req *req);
/* The device side (api-device.c). */
void api_dev_events(struct api_req *req);
void api_dev_c2d_receive(struct api_req *req);
void api_dev_c2d_settle(struct api_req *req);
void api_dev_file_init(struct api_req *req);
void api_dev_file_notify(struct api_req *req);
void api_dev_blob_put(struct api_req *req);

/* ---- device routes' state (api-device.c) ------------------------------------------------ */

struct api_device;
struct gw_http_parser;
struct gw_config;
/* Creates the state of the device routes: configuration, the upload directory
 * <state_dir>/uploads (its key file and the quota accounting). Logs and returns -errno. */
int api_device_new(struct gw_api *api, const struct gw_config *cfg, const char *state_dir, struct api_device **ret);
void api_device_reconfigure(struct api_device *d, const struct gw_config *cfg);
struct api_device *api_device_free(struct api_device *d); /* accepts NULL, returns NULL */
struct api_device *api_get_device(struct gw_api *api);
char *const *api_host_names(struct gw_api *api); /* NULL-terminated: host_name, then aliases */
struct gw_net_conn;
struct gw_net_conn *api_req_net_conn(struct api_req *req); /* NULL: internal, or the connection closed */
/* Authenticates a request to a device route (blob: the upload SAS in the query instead of the
 * device's credentials). Returns true to go on; false when the answer (401/404/...) was sent
 * (req is gone). */
bool api_device_authorize(struct api_req *req, bool blob);
/* At the HEADERS stage of every request: sets this request's body limit on p (the parsers are
 * created with api_device_parser_body_max(), the largest any route takes: blob PUTs; every
 * other request gets service_api.limits.max_body_bytes, D2C events at least 512 KiB).
 * Returns 1 when hr is a device route, 0 when it is not, -<HTTP status> (-413) to refuse it
 * at once. */
int api_device_on_headers(struct gw_api *api, struct gw_http_parser *p, const struct gw_http_request *hr,
                          bool metrics);
size_t api_device_parser_body_max(const struct gw_config *cfg);
void api_metrics(struct api_req *req);

/* ---- metrics (metrics.c) ---------------------------------------------------------------- */

/* The Prometheus text exposition of the API's and the hub's counters. */
int api_metrics_text(struct gw_api *api, char **ret, size_t *ret_len);

/* Route table access for metrics. */
size_t api_n_routes(void);
const char *api_route_name(size_t i);
const struct api_route_stats *api_route_stats(struct gw_api *api, size_t i); /* i == n: unmatched */

struct api_counters {
        uint64_t connections_accepted, connections_closed, connections_metrics;
        uint64_t requests, requests_internal;
        uint64_t auth_failures[16]; /* by enum hub_auth_failure */
        uint64_t http_errors;       /* malformed requests (codec errors) */
        uint64_t timeouts;          /* 408 */
        uint64_t latency_usec_sum, latency_count;
        uint64_t latency_bucket[8]; /* le 1ms, 5ms, 10ms, 50ms, 100ms, 500ms, 1s, 5s (+Inf = count) */
};
const struct api_counters *api_get_counters(struct gw_api *api);
unsigned api_open_connections(struct gw_api *api);
