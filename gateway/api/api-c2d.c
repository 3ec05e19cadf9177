/* SPDX-License-Identifier: MIT */
/* Cloud-to-device messages over REST (a fieldhub route: IoT Hub sends C2D only over AMQP,
 * reference §5.6), the purge of a device queue (§5.2) and the feedback routes (§5.7).
 *
 *   POST /messages/devicebound/{id}?api-version=...[&ttl=<seconds>]
 *        body = the message payload (any bytes, at most 64 KB with the properties)
 *        iothub-messageid, iothub-correlationid, iothub-userid, iothub-ack (none | positive |
 *        negative | full), iothub-expiry (ISO 8601 absolute expiry; or ttl= seconds),
 *        Content-Type / Content-Encoding (the message's content-type / content-encoding),
 *        iothub-app-<name>: <value> (application properties)
 *   -> 200 {"deviceId":..., "messageId":..., "sequenceNumber":n, "expiryTimeUtc":...}
 *      404 DeviceNotFound, 403 DeviceMaximumQueueDepthExceeded, 413 MessageTooLarge,
 *      400 ArgumentInvalid (bad ack / expiry / ttl / property). */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "api/api-internal.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/queue.h"
#include "hub/registry.h"

struct send_state {
        char *message_id;
        char expiry[32];
};

static void send_state_free(void *p) {
        struct send_state *s = p;
        free(s->message_id);
        free(s);
}

static void send_done(int r, uint64_t seq, void *ud) {
        struct api_req *req = ud;
        struct send_state *s = req->state;
        switch (r) {
        case 0:
                api_reply_json(req, 200,
                               json_pack("{s:s, s:s?, s:I, s:s}", "deviceId", req->device_id, "messageId",
                                         s->message_id, "sequenceNumber", (json_int_t) seq, "expiryTimeUtc",
                                         s->expiry[0] ? s->expiry : "0001-01-01T00:00:00Z"),
                               NULL);
                break;
        case -ENOENT:
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", req->device_id);
                break;
        case -ENOBUFS:
                api_reply_error(req, 403, "DeviceMaximumQueueDepthExceeded",
                                "The C2D queue of device %s is full", req->device_id);
                break;
        default:
                api_reply_errno(req, r, "C2D send");
                break;
        }
}

void api_c2d_send(struct api_req *req) {
        struct gw_hub *h = api_hub(req);
        const struct gw_http_request *hr = req->hr;
        const char *id = req->seg[2];
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        struct send_state *st;
        int r;

        if (!hub_device_id_valid(id)) {
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", id);
                return;
        }
        r = hub_msg_new(hr->body, hr->body_len, HUB_MSG_C2D_MAX_SIZE, &m);
        if (r == -E2BIG) {
                api_reply_error(req, 413, "MessageTooLarge", "The message is over the C2D limit of %u bytes",
                                HUB_MSG_C2D_MAX_SIZE);
                return;
        }
        if (r < 0) {
                api_reply_errno(req, r, "C2D send");
                return;
        }

        static const struct {
                const char *header;
                enum hub_sys_prop prop;
        } sys[] = {
                { "iothub-messageid", HUB_SYS_MESSAGE_ID },
                { "iothub-correlationid", HUB_SYS_CORRELATION_ID },
                { "iothub-userid", HUB_SYS_USER_ID },
                { "iothub-ack", HUB_SYS_ACK },
                { "Content-Type", HUB_SYS_CONTENT_TYPE },
                { "Content-Encoding", HUB_SYS_CONTENT_ENCODING },
        };
        for (size_t i = 0; i < ELEMENTSOF(sys); i++) {
                const char *v = gw_http_header_get(hr, sys[i].header);
                if (!v)
                        continue;
                if (sys[i].prop == HUB_SYS_ACK) {
                        enum hub_queue_ack a;
                        if (hub_queue_ack_from_string(v, &a) < 0) {
                                api_reply_error(req, 400, "ArgumentInvalid",
                                                "iothub-ack %.32s is not valid, expected none, positive, negative or full", v);
                                return;
                        }
                }
                r = hub_msg_set_sys(m, sys[i].prop, v);
                if (r == -E2BIG) {
                        api_reply_error(req, 413, "MessageTooLarge", "%s is too long or the message is over %u bytes",
                                        sys[i].header, HUB_MSG_C2D_MAX_SIZE);
                        return;
                }
                if (r < 0) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Invalid %s", sys[i].header);
                        return;
                }
        }
        for (size_t i = 0; i < hr->n_headers; i++) {
                const char *n = hr->headers[i].name;
                if (strncasecmp(n, "iothub-app-", 11) != 0)
                        continue;
                if (n[11] == 0) {
                        api_reply_error(req, 400, "ArgumentInvalid", "An iothub-app- header needs a property name");
                        return;
                }
                r = hub_msg_set_prop(m, n + 11, hr->headers[i].value);
                if (r == -E2BIG) {
                        api_reply_error(req, 413, "MessageTooLarge", "The message with its properties is over %u bytes",
                                        HUB_MSG_C2D_MAX_SIZE);
                        return;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "C2D send");
                        return;
                }
        }

        uint64_t now = api_now(), expiry = 0;
        const char *exp = gw_http_header_get(hr, "iothub-expiry");
        const char *ttl = gw_http_query_get(hr, "ttl");
        if (exp && ttl) {
                api_reply_error(req, 400, "ArgumentInvalid", "Give either iothub-expiry or ttl, not both");
                return;
        }
        if (exp && (hub_time_parse_iso8601(exp, &expiry) < 0 || expiry == 0)) {
                api_reply_error(req, 400, "ArgumentInvalid",
                                "iothub-expiry %.64s is not an ISO 8601 UTC time such as 2024-02-20T16:24:48Z", exp);
                return;
        }
        if (ttl) {
                char *end;
                errno = 0;
                unsigned long long t = strtoull(ttl, &end, 10);
                if (!*ttl || *ttl == '-' || *end || errno || t < 1 || t > 48 * 3600) {
                        api_reply_error(req, 400, "ArgumentInvalid", "ttl must be a number of seconds from 1 to 172800");
                        return;
                }
                expiry = now + t * USEC_PER_SEC;
        }
        st = calloc(1, sizeof *st);
        if (!st) {
                api_reply_errno(req, -ENOMEM, "C2D send");
                return;
        }
        req->state = st;
        req->state_free = send_state_free;
        if (expiry) {
                hub_time_format_iso8601(expiry, st->expiry);
                r = hub_msg_set_sys(m, HUB_SYS_EXPIRY_TIME, st->expiry);
                if (r < 0) {
                        api_reply_errno(req, r, "C2D send");
                        return;
                }
        }
        const char *mid = hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID);
        if (mid && !(st->message_id = strdup(mid))) {
                api_reply_errno(req, -ENOMEM, "C2D send");
                return;
        }
        r = api_req_go_async(req, id);
        if (r < 0) {
                api_reply_errno(req, r, "C2D send");
                return;
        }
        r = hub_queue_send(h->queue, id, m, now, send_done, req);
        if (r == -E2BIG)
                api_reply_error(req, 413, "MessageTooLarge", "The message is over the C2D limit of %u bytes",
                                HUB_MSG_C2D_MAX_SIZE);
        else if (r == -EINVAL)
                api_reply_error(req, 400, "ArgumentInvalid", "The message has an invalid iothub-ack or expiry");
        else if (r < 0)
                api_reply_errno(req, r, "C2D send");
}

static void purge_done(int r, uint64_t count, void *ud) {
        struct api_req *req = ud;
        if (r < 0) {
                api_reply_errno(req, r, "Purge");
                return;
        }
        api_reply_json(req, 200,
                       json_pack("{s:I, s:s, s:n}", "totalMessagesPurged", (json_int_t) count, "deviceId",
                                 req->device_id, "moduleId"),
                       NULL);
}

void api_c2d_purge(struct api_req *req) {
        const char *id = req->seg[1];
        if (!hub_device_id_valid(id)) {
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", id);
                return;
        }
        int r = api_req_go_async(req, id);
        if (r >= 0)
                r = hub_queue_purge(api_hub(req)->queue, id, api_now(), purge_done, req);
        if (r < 0)
                api_reply_errno(req, r, "Purge");
}

/* ---- feedback ------------------------------------------------------------------------- */

static void feedback_received(int r, const struct hub_queue_delivery *d, void *ud) {
        struct api_req *req = ud;
        char t[32];
        if (r < 0) {
                api_reply_errno(req, r, "Feedback receive");
                return;
        }
        if (!d) {
                api_reply(req, 204, NULL, NULL, NULL, 0);
                return;
        }
        size_t len = 0;
        const void *body = hub_msg_body(d->msg, &len);
        json_t *h = api_etag_header(NULL, d->lock_token);
        const char *mid = hub_msg_get_sys(d->msg, HUB_SYS_MESSAGE_ID);
        if (mid)
                json_object_set_new(h, "iothub-messageid", json_string(mid));
        json_object_set_new(h, "iothub-enqueuedtime", json_string(hub_time_format_iso8601(d->enqueued_usec, t)));
        json_object_set_new(h, "iothub-expiry", json_string(hub_time_format_iso8601(d->expiry_usec, t)));
        char dc[24];
        snprintf(dc, sizeof dc, "%u", d->delivery_count);
        json_object_set_new(h, "iothub-deliverycount", json_string(dc));
        api_reply(req, 200, h, HUB_QUEUE_FEEDBACK_CONTENT_TYPE "; charset=utf-8", body, len);
}

static uint64_t lock_timeout_param(struct api_req *req) {
        const char *v = api_header(req, "iothub-messagelocktimeout");
        if (!v)
                v = api_param(req, "lockTimeout");
        if (!v)
                return 0;
        char *end;
        unsigned long t = strtoul(v, &end, 10);
        if (*end || t == 0)
                return 0;
        return (uint64_t) t * USEC_PER_SEC;
}

void api_feedback_receive(struct api_req *req) {
        uint64_t lt = lock_timeout_param(req);
        int r = api_req_go_async(req, NULL);
        if (r >= 0)
                r = hub_queue_feedback_receive(api_hub(req)->queue, lt, api_now(), feedback_received, req);
        if (r < 0)
                api_reply_errno(req, r, "Feedback receive");
}

static void settle_done(int r, void *ud) {
        struct api_req *req = ud;
        if (r == -ENOLCK || r == -ESTALE) {
                api_reply_error(req, 412, "DeviceMessageLockLost", "The lock token is unknown or its lock has expired");
                return;
        }
        if (r < 0) {
                api_reply_errno(req, r, "Feedback settlement");
                return;
        }
        api_reply(req, 204, NULL, NULL, NULL, 0);
}

/* The lock token of the path, unquoted (some clients send the ETag with its quotes). */
static int settle(struct api_req *req, int which) {
        char token[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
        const char *t = req->seg[3];
        size_t l = strlen(t);
        if (l >= 2 && t[0] == '"' && t[l - 1] == '"') {
                t++;
                l -= 2;
        }
        if (l == 0 || l > HUB_QUEUE_LOCK_TOKEN_MAX) {
                api_reply_error(req, 412, "DeviceMessageLockLost", "The lock token is unknown or its lock has expired");
                return 0;
        }
        memcpy(token, t, l);
        token[l] = 0;
        bool reject = api_param(req, "reject") != NULL;
        int r = api_req_go_async(req, NULL);
        if (r < 0)
                return r;
        struct hub_queue *q = api_hub(req)->queue;
        if (which == 1)
                return hub_queue_feedback_abandon(q, token, api_now(), settle_done, req);
        if (reject)
                return hub_queue_feedback_reject(q, token, api_now(), settle_done, req);
        return hub_queue_feedback_complete(q, token, api_now(), settle_done, req);
}

void api_feedback_complete(struct api_req *req) {
        int r = settle(req, 0);
        if (r < 0)
                api_reply_errno(req, r, "Feedback settlement");
}

void api_feedback_abandon(struct api_req *req) {
        int r = settle(req, 1);
        if (r < 0)
                api_reply_errno(req, r, "Feedback settlement");
}
