/* SPDX-License-Identifier: MIT */
#pragma once

/* The IoT Hub service REST API (reference §5) over HTTPS, and the metrics listener.
 *
 * One router serves three callers:
 *  - HTTPS (or plain TCP on loopback / with allow_plaintext) connections on the
 *    service_api.listen addresses, authorised per request with a shared access policy SAS
 *    token in Authorization (permissions per route as reference §5.1);
 *  - the loopback metrics listener (metrics.listen): only GET /metrics and GET /health,
 *    without authentication (the one documented exception);
 *  - gw_api_call_internal(): the admin socket, with the rights of iothubowner (the admin
 *    socket's peer credentials are the authentication).
 *
 * Answers that need the store or a device (twin writes, C2D, methods) are sent from their
 * completions, so a request may be answered long after it arrived; an HTTP connection
 * answers its pipelined requests strictly in order.
 *
 * Everything runs on the daemon's event loop thread. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <systemd/sd-event.h>

struct gw_api;
struct gw_hub;
struct gw_config;

/* Creates the API on the event loop: the TLS material (configured, or generated with
 * gw_cert_ensure() into state_dir), the service listeners and the metrics listener as cfg
 * says (either may be disabled), serving hub (borrowed; must outlive the API). host_names
 * (NULL-terminated, borrowed until the next gw_api_reconfigure()) are the names SAS tokens
 * may be scoped to. Logs and returns -errno when a listener cannot be opened. */
int gw_api_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, const char *state_dir,
               char *const *host_names, struct gw_api **ret);

/* Applies a new configuration on reload: host names, limits, TLS material (new connections
 * use it), listen addresses (listeners whose address is unchanged are kept with their
 * connections; new ones are opened first, and on failure nothing changes). Returns 0 or
 * -errno after logging (the running setup is kept). */
int gw_api_reconfigure(struct gw_api *api, const struct gw_config *cfg, const char *state_dir,
                       char *const *host_names);

/* Closes the listeners and every connection, and fails requests still waiting for the store
 * or a device (their completions find them detached). Accepts NULL. Returns NULL. */
struct gw_api *gw_api_free(struct gw_api *api);

/* The port of the i-th service listener (0 when there is none), for tests and status. */
uint16_t gw_api_service_port(const struct gw_api *api, size_t i);
/* The port of the metrics listener, 0 when disabled. */
uint16_t gw_api_metrics_port(const struct gw_api *api);
/* A JSON summary for `fieldhubctl status` (new reference): listeners, connections, requests. */
json_t *gw_api_status(struct gw_api *api);

/* Completion of an internal call. status: the HTTP status; headers: a JSON object of
 * response header name -> string (borrowed for the call; includes iothub-errorcode on
 * errors, ETag, x-ms-continuation, ...); body/len: the response body (JSON text for every
 * route but GET /metrics; may be empty), borrowed for the call. */
typedef void (*gw_api_reply_fn)(void *ud, int status, json_t *headers, const char *body, size_t len);

/* Runs exactly the same router as the HTTPS listeners, with the rights of iothubowner.
 * method: "GET", "PUT", ...; target: "/path?query" (raw, percent-encoded as on the wire; an
 * api-version is added when absent); headers: object name -> string (may be NULL), e.g.
 * If-Match, x-ms-continuation, iothub-app-*; body may be NULL when body_len is 0.
 * reply runs exactly once, possibly from inside this call (most routes), possibly later
 * (twin writes, C2D, methods: after the store or the device answered). Returns 0 when reply
 * will run / has run, or -EINVAL (bad arguments), -ENOMEM, -ESHUTDOWN (API stopping) without
 * calling it. */
int gw_api_call_internal(struct gw_api *api, const char *method, const char *target, const json_t *headers,
                         const char *body, size_t body_len, gw_api_reply_fn reply, void *ud);
