/* SPDX-License-Identifier: MIT */
/* GET /metrics (Prometheus text exposition 0.0.4) and GET /health, on the service API (with a
 * token) and on the loopback metrics listener (without). */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/api-internal.h"
#include "front/mqtt.h"
#include "hub/auth.h"
#include "hub/method.h"
#include "hub/outbox.h"
#include "hub/queue.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/store.h"
#include "uplink/uplink.h"

struct out {
        char *buf;
        size_t len, cap;
        bool oom;
};

static void outf(struct out *o, const char *fmt, ...) _printf_(2, 3);
static void outf(struct out *o, const char *fmt, ...) {
        va_list ap;
        for (;;) {
                if (o->oom)
                        return;
                va_start(ap, fmt);
                int n = vsnprintf(o->buf ? o->buf + o->len : NULL, o->buf ? o->cap - o->len : 0, fmt, ap);
                va_end(ap);
                if (n < 0) {
                        o->oom = true;
                        return;
                }
                if (o->buf && o->len + (size_t) n < o->cap) {
                        o->len += (size_t) n;
                        return;
                }
                size_t ncap = MAX(o->cap * 2, o->len + (size_t) n + 4096);
                char *nb = realloc(o->buf, ncap);
                if (!nb) {
                        o->oom = true;
                        return;
                }
                o->buf = nb;
                o->cap = ncap;
        }
}

static void metric(struct out *o, const char *name, const char *type, const char *help, uint64_t v) {
        outf(o, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", name, help, name, type, name, (unsigned long long) v);
}

/* Per route endpoint, from `fieldhubctl endpoints`' view (uplink.h). */
static void endpoint_metrics(struct out *o, struct gw_uplink *u) {
        static const struct {
                const char *name, *type, *help, *key, *sub;
        } m[] = {
                { "fieldhub_endpoint_up", "gauge", "1 while the endpoint is connected.", NULL, NULL },
                { "fieldhub_endpoint_backlog_messages", "gauge", "Messages the endpoint has not confirmed.", "backlog",
                  "count" },
                { "fieldhub_endpoint_backlog_bytes", "gauge", "Bytes the endpoint has not confirmed.", "backlog",
                  "bytes" },
                { "fieldhub_endpoint_oldest_age_seconds", "gauge", "Age of the oldest unconfirmed message.",
                  "oldestAgeSeconds", NULL },
                { "fieldhub_endpoint_drain_rate", "gauge", "Messages confirmed per second (smoothed).",
                  "drainRatePerSecond", NULL },
                { "fieldhub_endpoint_delivered_total", "counter", "Messages confirmed by the far side.", "delivered",
                  NULL },
                { "fieldhub_endpoint_dropped_total", "counter", "Messages dropped by overflow: drop-oldest.", "drops",
                  NULL },
                { "fieldhub_endpoint_expired_total", "counter", "Messages expired (queue.ttl).", "expiries", NULL },
                { "fieldhub_endpoint_rejected_total", "counter", "Appends refused by overflow: reject-new.",
                  "rejected", NULL },
                { "fieldhub_endpoint_poison_total", "counter", "Messages the far side refused for good (skipped).",
                  "poison", NULL },
                { "fieldhub_endpoint_oversize_total", "counter", "Messages over 256 KB after enrichment (skipped).",
                  "oversize", NULL },
        };
        json_t *arr = gw_uplink_status(u), *ep;
        size_t i;
        if (!arr)
                return;
        for (size_t k = 0; k < sizeof m / sizeof m[0]; k++) {
                outf(o, "# HELP %s %s\n# TYPE %s %s\n", m[k].name, m[k].help, m[k].name, m[k].type);
                json_array_foreach(arr, i, ep) {
                        const char *name = json_string_value(json_object_get(ep, "name"));
                        const char *type = json_string_value(json_object_get(ep, "type"));
                        const char *state = json_string_value(json_object_get(ep, "state"));
                        json_t *v = m[k].key ? json_object_get(ep, m[k].key) : NULL;
                        if (v && m[k].sub)
                                v = json_object_get(v, m[k].sub);
                        double x = m[k].key ? json_number_value(v) : (state && streq(state, "up") ? 1 : 0);
                        outf(o, "%s{endpoint=\"%s\",type=\"%s\"} %.15g\n", m[k].name, name ? name : "",
                             type ? type : "", x);
                }
        }
        json_decref(arr);
}

int api_metrics_text(struct gw_api *api, char **ret, size_t *ret_len) {
        struct gw_hub *h = NULL;
        const struct api_counters *c = api_get_counters(api);
        struct out o = { 0 };

        h = api_get_hub(api);

        metric(&o, "fieldhub_api_connections", "gauge", "Open service API and metrics connections.",
               api_open_connections(api));
        metric(&o, "fieldhub_api_connections_accepted_total", "counter", "Connections accepted.",
               c->connections_accepted);
        metric(&o, "fieldhub_api_requests_internal_total", "counter", "Requests from the admin socket.",
               c->requests_internal);
        metric(&o, "fieldhub_api_malformed_requests_total", "counter", "Requests refused by the HTTP codec.",
               c->http_errors);
        metric(&o, "fieldhub_api_request_timeouts_total", "counter", "Requests answered 408.", c->timeouts);

        outf(&o, "# HELP fieldhub_api_requests_total Service API requests by route and status.\n"
                 "# TYPE fieldhub_api_requests_total counter\n");
        for (size_t i = 0; i <= api_n_routes(); i++) {
                const struct api_route_stats *st = api_route_stats(api, i);
                for (size_t k = 0; k < API_MAX_ROUTE_STATUSES && st->status[k]; k++)
                        outf(&o, "fieldhub_api_requests_total{route=\"%s\",status=\"%d\"} %llu\n", api_route_name(i),
                             st->status[k], (unsigned long long) st->count[k]);
        }
        outf(&o, "# HELP fieldhub_api_request_duration_seconds Service API request latency.\n"
                 "# TYPE fieldhub_api_request_duration_seconds histogram\n");
        static const char *const le[8] = { "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "5" };
        for (size_t i = 0; i < 8; i++)
                outf(&o, "fieldhub_api_request_duration_seconds_bucket{le=\"%s\"} %llu\n", le[i],
                     (unsigned long long) c->latency_bucket[i]);
        outf(&o, "fieldhub_api_request_duration_seconds_bucket{le=\"+Inf\"} %llu\n",
             (unsigned long long) c->latency_count);
        outf(&o, "fieldhub_api_request_duration_seconds_sum %.6f\n", (double) c->latency_usec_sum / 1e6);
        outf(&o, "fieldhub_api_request_duration_seconds_count %llu\n", (unsigned long long) c->latency_count);

        outf(&o, "# HELP fieldhub_auth_failures_total Service API authentication failures by reason.\n"
                 "# TYPE fieldhub_auth_failures_total counter\n");
        for (int f = 1; f < _HUB_AUTH_FAILURE_MAX && f < 16; f++)
                outf(&o, "fieldhub_auth_failures_total{reason=\"%s\"} %llu\n",
                     hub_auth_failure_to_string((enum hub_auth_failure) f), (unsigned long long) c->auth_failures[f]);

        if (h) {
                uint64_t total = 0, enabled = 0, disabled = 0;
                (void) hub_registry_count(h->registry, &total, &enabled, &disabled);
                metric(&o, "fieldhub_registry_devices", "gauge", "Device identities.", total);
                metric(&o, "fieldhub_registry_devices_enabled", "gauge", "Enabled device identities.", enabled);

                uint64_t fb_msgs = 0, fb_pending = 0;
                (void) hub_queue_feedback_depth(h->queue, &fb_msgs, &fb_pending);
                metric(&o, "fieldhub_feedback_messages", "gauge", "Feedback messages waiting.", fb_msgs);
                metric(&o, "fieldhub_feedback_pending_records", "gauge", "Feedback records not yet batched.", fb_pending);
                metric(&o, "fieldhub_c2d_queue_ticks_total", "counter", "C2D queue maintenance runs.", h->queue_ticks);

                struct hub_store_stats ss;
                hub_store_get_stats(h->store, &ss);
                metric(&o, "fieldhub_store_commits_total", "counter", "Store transactions committed.", ss.commits);
                metric(&o, "fieldhub_store_writes_total", "counter", "Store writes committed.", ss.writes);
                metric(&o, "fieldhub_store_failed_commits_total", "counter", "Store transactions that failed.",
                       ss.failed_commits);
                metric(&o, "fieldhub_store_pending_writes", "gauge", "Store writes submitted, not committed.", ss.pending);
                metric(&o, "fieldhub_store_last_batch_writes", "gauge", "Writes in the last transaction.", ss.last_batch);
                metric(&o, "fieldhub_store_max_batch_writes", "gauge", "Most writes in one transaction.", ss.max_batch);
                outf(&o, "# HELP fieldhub_store_commit_seconds Store commit duration.\n"
                         "# TYPE fieldhub_store_commit_seconds summary\n"
                         "fieldhub_store_commit_seconds_sum %.6f\nfieldhub_store_commit_seconds_count %llu\n",
                     (double) ss.total_commit_usec / 1e6, (unsigned long long) ss.commits);
                metric(&o, "fieldhub_store_last_commit_microseconds", "gauge", "Duration of the last commit.",
                       ss.last_commit_usec);
                metric(&o, "fieldhub_store_db_bytes", "gauge", "Database file size.", ss.db_bytes);
                metric(&o, "fieldhub_store_wal_bytes", "gauge", "WAL file size.", ss.wal_bytes);
                metric(&o, "fieldhub_store_max_bytes", "gauge", "Disk budget (store.max_size; 0 = none).", ss.max_size);
                metric(&o, "fieldhub_store_full", "gauge", "1 while writes are refused for lack of space.",
                       h->store_full);
                metric(&o, "fieldhub_store_full_failures_total", "counter",
                       "Writes refused for lack of space (budget or disk).", ss.full_failures);
                metric(&o, "fieldhub_store_idle_checkpoints_total", "counter", "WAL truncations while idle.",
                       ss.checkpoints);
                if (h->uplink)
                        endpoint_metrics(&o, h->uplink);

                if (h->outbox) {
                        struct hub_outbox_stats os;
                        hub_outbox_get_stats(h->outbox, &os);
                        metric(&o, "fieldhub_outbox_stored_messages", "gauge", "Messages in the outbox.", os.stored_count);
                        metric(&o, "fieldhub_outbox_stored_bytes", "gauge", "Bytes in the outbox.", os.stored_bytes);
                        metric(&o, "fieldhub_outbox_appended_total", "counter", "Messages appended.", os.appended);
                        outf(&o, "# HELP fieldhub_outbox_backlog_messages Messages after each endpoint's cursor.\n"
                                 "# TYPE fieldhub_outbox_backlog_messages gauge\n");
                        struct hub_outbox_endpoint *ep;
                        for (size_t i = 0; (ep = hub_outbox_endpoint_at(h->outbox, i)); i++) {
                                struct hub_outbox_endpoint_stats es;
                                hub_outbox_endpoint_get_stats(ep, &es);
                                outf(&o, "fieldhub_outbox_backlog_messages{endpoint=\"%s\"} %llu\n",
                                     hub_outbox_endpoint_name(ep), (unsigned long long) es.backlog_count);
                        }
                }
                if (h->sessions) {
                        struct hub_sessions_stats st;
                        hub_sessions_get_stats(h->sessions, &st);
                        metric(&o, "fieldhub_sessions", "gauge", "Connected device sessions.", st.live);
                }
                if (h->methods)
                        metric(&o, "fieldhub_method_calls_pending", "gauge", "Direct method calls in flight.",
                               hub_method_pending(h->methods));
                metric(&o, "fieldhub_events_appended_total", "counter", "Hub events stored.", h->events_appended);
                if (h->mqtt_stats) {
                        const struct gw_mqtt_stats *m = h->mqtt_stats;
                        outf(&o, "# HELP fieldhub_connections Open device connections by protocol.\n"
                                 "# TYPE fieldhub_connections gauge\nfieldhub_connections{protocol=\"mqtt\"} %llu\n",
                             (unsigned long long) m->connections_open);
                        outf(&o, "# HELP fieldhub_messages_in_total Device-to-cloud messages accepted by protocol.\n"
                                 "# TYPE fieldhub_messages_in_total counter\nfieldhub_messages_in_total{protocol=\"mqtt\"} %llu\n",
                             (unsigned long long) m->messages_in);
                        outf(&o, "# HELP fieldhub_messages_out_total Hub-to-device messages sent by protocol.\n"
                                 "# TYPE fieldhub_messages_out_total counter\nfieldhub_messages_out_total{protocol=\"mqtt\"} %llu\n",
                             (unsigned long long) m->messages_out);
                        outf(&o, "# HELP fieldhub_device_auth_failures_total Device authentication failures by protocol.\n"
                                 "# TYPE fieldhub_device_auth_failures_total counter\n"
                                 "fieldhub_device_auth_failures_total{protocol=\"mqtt\"} %llu\n",
                             (unsigned long long) m->auth_failures);
                }
        }
        if (o.oom) {
                free(o.buf);
                return -ENOMEM;
        }
        *ret = o.buf;
        *ret_len = o.len;
        return 0;
}

void api_metrics(struct api_req *req) {
        char *text = NULL;
        size_t len = 0;
        int r = api_metrics_text(req->api, &text, &len);
        if (r < 0) {
                api_reply_errno(req, r, "Metrics");
                return;
        }
        api_reply(req, 200, NULL, "text/plain; version=0.0.4; charset=utf-8", text, len);
        free(text);
}

void api_health(struct api_req *req) {
        struct gw_hub *h = api_hub(req);
        struct hub_store_stats ss;
        bool healthy = hub_store_healthy(h->store, api_mono());
        hub_store_get_stats(h->store, &ss);
        api_reply_json(req, healthy ? 200 : 503,
                       json_pack("{s:s, s:b, s:I}", "status", healthy ? "healthy" : "unhealthy", "store", healthy,
                                 "pendingWrites", (json_int_t) ss.pending),
                       NULL);
}
