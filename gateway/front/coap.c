/* SPDX-License-Identifier: MIT */
/* CoAP server mode (see coap.h).
 *
 * Objects:
 *   struct cdev  — a device known to the front-end: its resources (d/{id}/...), the command
 *                  fetched ahead for an observer, the method calls waiting for the device.
 *                  Created when the device first authenticates (or at start for plain-UDP
 *                  devices) and kept until the front-end stops.
 *   struct csess — one libcoap server session authenticated as a device (libcoap's app data
 *                  of the session), with its hub session. Freed on COAP_EVENT_SERVER_SESSION_DEL.
 *   struct op    — an asynchronous request (telemetry append, queue receive/settle, reported
 *                  patch): the request is parked with coap_register_async(); the store
 *                  completion triggers it and libcoap calls the handler again, which answers
 *                  from the op. An op whose session went away meanwhile is orphaned and freed
 *                  by its completion.
 *
 * Duplicates: each session remembers the message ids of its last requests (RFC 7252 §4.5):
 * a retransmitted CON or NON is never appended twice. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <netinet/in.h>

#include <coap3/coap.h>
#include <jansson.h>

#include "config.h"
#include "front/coap-config.h"
#include "front/coap.h"
#include "front/mqtt-topic.h"
#include "hub.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/method.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/queue.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/twin.h"
#include "log-ids.h"
#include "log.h"
#include "net/net.h"

#define COAP_MAX_ENDPOINTS 16
#define CSESS_MAGIC 0x436f4150u /* "CoAP" */
#define DEDUP_SLOTS 32
#define DEDUP_LIFETIME_USEC (247 * USEC_PER_SEC) /* EXCHANGE_LIFETIME */
#define RATE_SLOTS 1024
#define MAX_PENDING_CALLS 16

enum op_kind { OP_TELEMETRY, OP_RECEIVE, OP_SETTLE, OP_REPORTED };

struct cdev;
struct csess;

struct op {
        enum op_kind kind;
        struct csess *cs;          /* NULL once orphaned */
        struct op *next;           /* in cs->ops */
        uint8_t token[8];
        size_t token_len;
        bool triggered;
        /* Answered by op_send_separate() (no libcoap async): a telemetry POST that cannot
         * carry a command back. con: the request was CON (the answer is CON too). */
        bool direct, con;
        int result;
        uint16_t mid;
        /* a command fetched for the answer (telemetry piggy-back, GET commands) */
        struct hub_msg *cmd;
        char lock[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
        char *error;               /* reported patch: error text */
        int64_t version;
};

struct dedup {
        uint16_t mid;
        bool used;
        uint64_t at_usec;
};

struct call {
        char *name, *payload, *rid;
        bool delivered;
};

struct cdev {
        struct gw_coap *co;
        struct cdev *next;
        char *id;
        bool plaintext;
        coap_resource_t *r_tel, *r_cmd, *r_twin, *r_rep, *r_des, *r_meth;
        struct csess *cs;          /* the live session, NULL while asleep */
        bool cmd_observed, des_observed, meth_observed;
        /* the command fetched ahead for the commands observer */
        struct hub_msg *ahead;
        char ahead_lock[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
        bool receiving, queue_empty;
        /* The queue may hold a deliverable command (cleared by an empty receive, set by the
         * queue's on_available hook and at each new session): a telemetry POST only tries a
         * piggy-back receive when it is set. */
        bool c2d_maybe;
        struct fetch *fetch;       /* the queue read in flight (outlives the cdev) */
        struct call calls[MAX_PENDING_CALLS];
        size_t n_calls;
};

struct fetch {
        struct cdev *d; /* NULL once the cdev is gone */
};

struct csess {
        uint32_t magic;
        struct gw_coap *co;
        coap_session_t *session;
        struct csess *next;        /* in co->sessions */
        struct cdev *dev;
        char identity[HUB_DEVICE_ID_MAX + 8];
        char peer[80];
        char generation_id[24];
        bool dtls, authenticated, revoked, disconnect_pending, handshake_logged;
        uint64_t identified_usec;  /* when the PSK identity was accepted (handshake under way) */
        struct hub_session *hs;
        unsigned caps;
        struct op *ops;
        struct dedup dedup[DEDUP_SLOTS];
        unsigned dedup_next;
        unsigned c2d_locked;       /* commands handed out in this session and not settled through it */
};

struct rate_slot {
        uint8_t addr[16];
        bool used;
        double tokens;
        uint64_t at_usec, logged_usec;
};

struct gw_coap {
        sd_event *event;
        struct gw_hub *hub;
        struct gw_coap_conf *conf; /* a private copy of the parts we use */
        coap_context_t *ctx;
        sd_event_source *io, *timer, *kick;
        coap_endpoint_t *eps[COAP_MAX_ENDPOINTS];
        uint16_t ports[COAP_MAX_ENDPOINTS];
        size_t n_eps;
        struct cdev *devs;
        struct csess *sessions;
        struct rate_slot *rate;
        uint8_t psk[GW_COAP_PSK_BYTES];
        coap_bin_const_t psk_bin;
        struct gw_coap_stats stats;
        unsigned n_disconnect_pending; /* sessions with disconnect_pending set (0: nothing to walk) */
        unsigned batch;            /* copies of a readable socket's event per coap_io_do_epoll() (see on_io) */
        bool freeing;
};

static uint64_t now_mono(void) {
        return hub_clock_mono(hub_clock_system());
}

static uint64_t now_wall(void) {
        return hub_clock_now(hub_clock_system());
}

static void kick(struct gw_coap *co) {
        if (co->kick)
                (void) sd_event_source_set_enabled(co->kick, SD_EVENT_ONESHOT);
}

static struct csess *csess_of(coap_session_t *s) {
        struct csess *cs = s ? coap_session_get_app_data(s) : NULL;
        return cs && cs->magic == CSESS_MAGIC ? cs : NULL;
}

static const char *dev_name(const struct csess *cs) {
        return cs && cs->dev ? cs->dev->id : cs && cs->identity[0] ? cs->identity : "-";
}

static void peer_string(coap_session_t *s, char *buf, size_t size) {
        const coap_address_t *a = coap_session_get_addr_remote(s);
        char host[INET6_ADDRSTRLEN] = "?";
        unsigned port = 0;
        if (a && a->addr.sa.sa_family == AF_INET) {
                inet_ntop(AF_INET, &a->addr.sin.sin_addr, host, sizeof host);
                port = ntohs(a->addr.sin.sin_port);
        } else if (a && a->addr.sa.sa_family == AF_INET6) {
                inet_ntop(AF_INET6, &a->addr.sin6.sin6_addr, host, sizeof host);
                port = ntohs(a->addr.sin6.sin6_port);
        }
        snprintf(buf, size, "%s:%u (%s)", host, port,
                 coap_session_get_proto(s) == COAP_PROTO_DTLS ? "DTLS" : "UDP");
}

/* ---- flood protection: a token bucket per IP address ------------------------------------- */

/* Whether a request from s may go on; false when its address is over the rate (logged once
 * a second per address). */
static bool rate_take(struct gw_coap *co, coap_session_t *s) {
        uint32_t rate = co->conf->max_requests_per_second;
        if (rate == 0 || !co->rate)
                return true;
        const coap_address_t *a = coap_session_get_addr_remote(s);
        uint8_t key[16] = {};
        if (a->addr.sa.sa_family == AF_INET)
                memcpy(key, &a->addr.sin.sin_addr, 4);
        else if (a->addr.sa.sa_family == AF_INET6)
                memcpy(key, &a->addr.sin6.sin6_addr, 16);
        uint32_t h = 2166136261u;
        for (size_t i = 0; i < 16; i++)
                h = (h ^ key[i]) * 16777619u;
        struct rate_slot *sl = &co->rate[h % RATE_SLOTS];
        uint64_t now = now_mono();
        if (!sl->used || memcmp(sl->addr, key, 16) != 0) {
                memcpy(sl->addr, key, 16);
                sl->used = true;
                sl->tokens = rate;
                sl->at_usec = now;
                sl->logged_usec = 0;
        }
        sl->tokens += (double) (now - sl->at_usec) * rate / USEC_PER_SEC;
        if (sl->tokens > rate)
                sl->tokens = rate;
        sl->at_usec = now;
        if (sl->tokens >= 1) {
                sl->tokens -= 1;
                return true;
        }
        co->stats.throttled++;
        if (now - sl->logged_usec >= USEC_PER_SEC || sl->logged_usec == 0) {
                char peer[80];
                sl->logged_usec = now;
                peer_string(s, peer, sizeof peer);
                gw_log_full(LOG_WARNING, 0, GW_FIELDS(.component = "coap", .event = "coap-throttled"),
                            "CoAP %s: more than %u requests/s from this address; answering 5.03 Service Unavailable",
                            peer, rate);
        }
        return false;
}

/* ---- responses ------------------------------------------------------------------------------ */

static void free_app_ptr(coap_session_t *s, void *p) {
        free(p);
}

/* Sets code and an optional body (copied; sent block-wise when large). */
static void respond(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                    coap_pdu_t *resp, coap_pdu_code_t code, uint16_t media, const void *body, size_t len) {
        coap_pdu_set_code(resp, code);
        if (!body || len == 0)
                return;
        void *copy = malloc(len);
        if (!copy) {
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR);
                return;
        }
        memcpy(copy, body, len);
        if (!coap_add_data_large_response(r, s, req, resp, query, media, -1, 0, len, copy, free_app_ptr, copy))
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR);
}

/* An error answer with a diagnostic payload (RFC 7252 §5.5.2). */
static void respond_error(coap_pdu_t *resp, coap_pdu_code_t code, const char *diag) {
        coap_pdu_set_code(resp, code);
        if (diag)
                (void) coap_add_data(resp, strlen(diag), (const uint8_t *) diag);
}

static void respond_json(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                         coap_pdu_t *resp, coap_pdu_code_t code, const json_t *j) {
        _cleanup_free_ char *text = hub_json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (!text) {
                respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                return;
        }
        respond(r, s, req, query, resp, code, COAP_MEDIATYPE_APPLICATION_JSON, text, strlen(text));
}

static uint16_t media_of_content_type(const char *ct) {
        if (!ct)
                return COAP_MEDIATYPE_APPLICATION_OCTET_STREAM;
        if (strncmp(ct, "application/json", 16) == 0)
                return COAP_MEDIATYPE_APPLICATION_JSON;
        if (strncmp(ct, "application/cbor", 16) == 0)
                return COAP_MEDIATYPE_APPLICATION_CBOR;
        if (strncmp(ct, "text/plain", 10) == 0)
                return COAP_MEDIATYPE_TEXT_PLAIN;
        return COAP_MEDIATYPE_APPLICATION_OCTET_STREAM;
}

/* A command as the answer: Lock-Token and Properties options, the body. */
static void respond_command(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                            coap_pdu_t *resp, coap_pdu_code_t code, const char *device_id, struct hub_msg *m,
                            const char *lock) {
        _cleanup_free_ char *topic = NULL;
        (void) coap_add_option(resp, GW_COAP_OPTION_LOCK_TOKEN, strlen(lock), (const uint8_t *) lock);
        if (gw_mqtt_topic_c2d(device_id, m, &topic) >= 0) {
                const char *bag = strstr(topic, "/messages/devicebound/");
                bag = bag ? bag + strlen("/messages/devicebound/") : "";
                if (*bag)
                        (void) coap_add_option(resp, GW_COAP_OPTION_PROPERTIES, strlen(bag), (const uint8_t *) bag);
        }
        size_t len;
        const void *body = hub_msg_body(m, &len);
        uint16_t media = media_of_content_type(hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE));
        if (len == 0) {
                coap_pdu_set_code(resp, code);
                uint8_t buf[4];
                (void) coap_add_option(resp, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof buf, media),
                                       buf);
                return;
        }
        respond(r, s, req, query, resp, code, media, body, len);
}

/* ---- sessions ------------------------------------------------------------------------------ */

static void op_free(struct op *o) {
        if (!o)
                return;
        hub_msg_unref(o->cmd);
        free(o->error);
        free(o);
}

static void ops_unlink(struct csess *cs, struct op *o) {
        for (struct op **p = &cs->ops; *p; p = &(*p)->next)
                if (*p == o) {
                        *p = o->next;
                        break;
                }
        o->cs = NULL;
        o->next = NULL;
}

static void calls_clear(struct cdev *d) {
        for (size_t i = 0; i < d->n_calls; i++) {
                free(d->calls[i].name);
                free(d->calls[i].payload);
                free(d->calls[i].rid);
        }
        d->n_calls = 0;
}

/* The end of a device session (libcoap session gone, or closed by the hub). */
static void csess_detach(struct csess *cs, bool release) {
        struct cdev *d = cs->dev;
        struct hub_session *hs = cs->hs;
        cs->hs = NULL;
        if (d && d->cs == cs) {
                d->cs = NULL;
                d->cmd_observed = d->des_observed = d->meth_observed = false;
                calls_clear(d);
                /* Commands the device took stay locked until settled or until the lock
                 * expires, as with HTTP polling: a sleepy device may settle them after its
                 * next wake-up, in another session. The one fetched ahead for an observer
                 * and never handed out goes back at once. */
                if (d->ahead && release && !cs->co->freeing)
                        (void) hub_queue_abandon(cs->co->hub->queue, d->id, d->ahead_lock, now_wall(), NULL, NULL);
                d->ahead = hub_msg_unref(d->ahead);
                d->queue_empty = false;
        }
        if (hs) {
                if (cs->authenticated && cs->co->stats.sessions_open > 0)
                        cs->co->stats.sessions_open--;
                gw_log_full(LOG_INFO, 0,
                            GW_FIELDS(.component = "coap", .device = dev_name(cs),
                                      .message_id = GW_MSG_DEVICE_DISCONNECTED, .event = "device-disconnected"),
                            "CoAP %s: device %s disconnected (%s)", cs->peer, dev_name(cs),
                            cs->revoked ? "closed by the hub" : "session ended");
                hub_session_unregister(hs);
        }
}

static void csess_free(struct csess *cs) {
        struct gw_coap *co = cs->co;
        for (struct csess **p = &co->sessions; *p; p = &(*p)->next)
                if (*p == cs) {
                        *p = cs->next;
                        break;
                }
        while (cs->ops) {
                struct op *o = cs->ops;
                bool triggered = o->triggered;
                ops_unlink(cs, o);
                if (triggered) /* its completion ran: nobody else holds it */
                        op_free(o);
        }
        csess_detach(cs, true);
        cs->magic = 0;
        free(cs);
}

static struct csess *csess_new(struct gw_coap *co, coap_session_t *s) {
        struct csess *cs = calloc(1, sizeof *cs);
        if (!cs)
                return NULL;
        cs->magic = CSESS_MAGIC;
        cs->co = co;
        cs->session = s;
        cs->dtls = coap_session_get_proto(s) == COAP_PROTO_DTLS;
        peer_string(s, cs->peer, sizeof cs->peer);
        cs->next = co->sessions;
        co->sessions = cs;
        coap_session_set_app_data(s, cs);
        return cs;
}

/* Disconnects sessions the hub closed (outside of libcoap's callbacks). */
static void disconnect_pending(struct gw_coap *co) {
        if (co->n_disconnect_pending == 0)
                return;
        co->n_disconnect_pending = 0;
        for (bool again = true; again;) {
                again = false;
                for (struct csess *cs = co->sessions; cs; cs = cs->next)
                        if (cs->disconnect_pending) {
                                cs->disconnect_pending = false;
                                /* May free cs (SERVER_SESSION_DEL): restart the walk. */
                                coap_session_disconnected(cs->session, COAP_NACK_NOT_DELIVERABLE);
                                again = true;
                                break;
                        }
        }
}

/* ---- hub session ops ------------------------------------------------------------------------- */

static void c2d_fetch(struct cdev *d);

static int op_deliver_c2d(void *ud, struct hub_msg *m, const char *lock_token) {
        return -ENOTCONN; /* CoAP devices pull (GET, Observe): see c2d_fetch() */
}

static int op_desired_patch(void *ud, const char *json_patch, int64_t version) {
        struct csess *cs = ud;
        if (cs->revoked || !cs->dev || !cs->dev->des_observed)
                return -ENOTCONN;
        coap_resource_notify_observers(cs->dev->r_des, NULL);
        kick(cs->co);
        return 0;
}

static int op_method_request(void *ud, const char *name, const char *json_payload, const char *request_id) {
        struct csess *cs = ud;
        struct cdev *d = cs->dev;
        if (cs->revoked || !d || !d->meth_observed)
                return -ENOTCONN;
        if (d->n_calls >= MAX_PENDING_CALLS)
                return -EAGAIN;
        struct call *c = &d->calls[d->n_calls];
        c->name = strdup(name);
        c->payload = strdup(json_payload ? json_payload : "null");
        c->rid = strdup(request_id);
        c->delivered = false;
        if (!c->name || !c->payload || !c->rid) {
                free(c->name);
                free(c->payload);
                free(c->rid);
                return -ENOMEM;
        }
        d->n_calls++;
        coap_resource_notify_observers(d->r_meth, NULL);
        kick(cs->co);
        return 0;
}

static void op_close(void *ud, int reason_errno, const char *why) {
        struct csess *cs = ud;
        cs->revoked = true;
        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "coap", .device = dev_name(cs), .event = "coap-closed"),
                    "CoAP %s (device %s): %s; closing the session", cs->peer, dev_name(cs),
                    why ? why : strerror(-reason_errno));
        csess_detach(cs, true);
        cs->disconnect_pending = true;
        cs->co->n_disconnect_pending++;
        kick(cs->co);
}

static const struct hub_session_ops session_ops = {
        .version = HUB_SESSION_OPS_VERSION,
        .deliver_c2d = op_deliver_c2d,
        .desired_patch = op_desired_patch,
        .method_request = op_method_request,
        .close = op_close,
};

static void set_caps(struct csess *cs) {
        struct cdev *d = cs->dev;
        unsigned caps = 0;
        if (!d || !cs->hs)
                return;
        if (d->cmd_observed)
                caps |= HUB_SESSION_C2D;
        if (d->des_observed)
                caps |= HUB_SESSION_DESIRED;
        if (d->meth_observed)
                caps |= HUB_SESSION_METHODS;
        if (caps != cs->caps && hub_session_set_capabilities(cs->hs, caps) >= 0)
                cs->caps = caps;
}

/* The session became a device's: registers it with the hub. */
static int csess_register(struct csess *cs, struct cdev *d) {
        struct gw_coap *co = cs->co;
        struct hub_device dev = {};
        int r = hub_registry_get(co->hub->registry, d->id, &dev);
        if (r >= 0) {
                snprintf(cs->generation_id, sizeof cs->generation_id, "%s", dev.generation_id);
                if (dev.status != HUB_DEVICE_ENABLED)
                        r = -EPERM;
        }
        hub_device_done(&dev);
        if (r < 0)
                return r;
        cs->dev = d;
        if (d->cs && d->cs != cs) /* the device is back from another address: the hub takes over */
                d->cs = NULL;
        r = hub_sessions_register(co->hub->sessions, d->id, NULL, cs->generation_id[0] ? cs->generation_id : NULL,
                                  &session_ops, cs, &cs->hs);
        if (r < 0)
                return r;
        d->cs = cs;
        d->c2d_maybe = true;
        cs->authenticated = true;
        co->stats.sessions_open++;
        gw_log_full(LOG_INFO, 0,
                    GW_FIELDS(.component = "coap", .device = d->id, .message_id = GW_MSG_DEVICE_CONNECTED,
                              .event = "device-connected"),
                    "CoAP %s: device %s connected (%s)", cs->peer, d->id, cs->dtls ? "DTLS-PSK" : "plain UDP");
        return 0;
}

/* ---- devices and their resources ------------------------------------------------------------ */

static void hnd_telemetry(coap_resource_t *, coap_session_t *, const coap_pdu_t *, const coap_string_t *, coap_pdu_t *);
static void hnd_commands(coap_resource_t *, coap_session_t *, const coap_pdu_t *, const coap_string_t *, coap_pdu_t *);
static void hnd_twin(coap_resource_t *, coap_session_t *, const coap_pdu_t *, const coap_string_t *, coap_pdu_t *);
static void hnd_reported(coap_resource_t *, coap_session_t *, const coap_pdu_t *, const coap_string_t *, coap_pdu_t *);
static void hnd_desired(coap_resource_t *, coap_session_t *, const coap_pdu_t *, const coap_string_t *, coap_pdu_t *);
static void hnd_methods(coap_resource_t *, coap_session_t *, const coap_pdu_t *, const coap_string_t *, coap_pdu_t *);

static coap_resource_t *add_resource(struct gw_coap *co, struct cdev *d, const char *suffix, bool observable) {
        char path[HUB_DEVICE_ID_MAX + 32];
        snprintf(path, sizeof path, "d/%s/%s", d->id, suffix);
        coap_str_const_t *p = coap_new_str_const((const uint8_t *) path, strlen(path));
        if (!p)
                return NULL;
        coap_resource_t *r = coap_resource_init(p, COAP_RESOURCE_FLAGS_RELEASE_URI | COAP_RESOURCE_FLAGS_NOTIFY_CON);
        if (!r)
                return NULL;
        coap_resource_set_userdata(r, d);
        if (observable)
                coap_resource_set_get_observable(r, 1);
        coap_add_resource(co->ctx, r);
        return r;
}

static struct cdev *dev_find(struct gw_coap *co, const char *id) {
        for (struct cdev *d = co->devs; d; d = d->next)
                if (streq(d->id, id))
                        return d;
        return NULL;
}

static struct cdev *dev_get(struct gw_coap *co, const char *id, bool plaintext) {
        struct cdev *d = dev_find(co, id);
        if (d)
                return d;
        d = calloc(1, sizeof *d);
        if (!d || !(d->id = strdup(id))) {
                free(d);
                return NULL;
        }
        d->co = co;
        d->plaintext = plaintext;
        d->r_tel = add_resource(co, d, "telemetry", false);
        d->r_cmd = add_resource(co, d, "commands", true);
        d->r_twin = add_resource(co, d, "twin", false);
        d->r_rep = add_resource(co, d, "twin/reported", false);
        d->r_des = add_resource(co, d, "twin/desired", true);
        d->r_meth = add_resource(co, d, "methods", true);
        if (!d->r_tel || !d->r_cmd || !d->r_twin || !d->r_rep || !d->r_des || !d->r_meth) {
                /* Resources already added stay with the context (freed with it). */
                free(d->id);
                free(d);
                return NULL;
        }
        coap_register_handler(d->r_tel, COAP_REQUEST_POST, hnd_telemetry);
        coap_register_handler(d->r_cmd, COAP_REQUEST_GET, hnd_commands);
        coap_register_handler(d->r_cmd, COAP_REQUEST_DELETE, hnd_commands);
        coap_register_handler(d->r_cmd, COAP_REQUEST_POST, hnd_commands);
        coap_register_handler(d->r_twin, COAP_REQUEST_GET, hnd_twin);
        coap_register_handler(d->r_rep, COAP_REQUEST_POST, hnd_reported);
        coap_register_handler(d->r_rep, COAP_REQUEST_PATCH, hnd_reported);
        coap_register_handler(d->r_des, COAP_REQUEST_GET, hnd_desired);
        coap_register_handler(d->r_meth, COAP_REQUEST_GET, hnd_methods);
        coap_register_handler(d->r_meth, COAP_REQUEST_POST, hnd_methods);
        d->next = co->devs;
        co->devs = d;
        return d;
}

/* Who is asking: the session's device, when it is the resource's. Answers 4.01 / 4.03 / 5.03
 * itself and returns NULL otherwise. Plain-UDP sessions of a configured device bind here. */
static struct csess *authorize(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, coap_pdu_t *resp) {
        struct cdev *d = coap_resource_get_userdata(r);
        struct gw_coap *co = d->co;
        struct csess *cs = csess_of(s);

        if (!cs && coap_session_get_proto(s) == COAP_PROTO_UDP) {
                if (!d->plaintext) {
                        co->stats.rejected++;
                        respond_error(resp, COAP_RESPONSE_CODE_UNAUTHORIZED, "DTLS required");
                        return NULL;
                }
                cs = csess_new(co, s);
                if (!cs) {
                        respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                        return NULL;
                }
                snprintf(cs->identity, sizeof cs->identity, "%s", d->id);
                int rr = csess_register(cs, d);
                if (rr < 0) {
                        gw_log_full(LOG_NOTICE, 0,
                                    GW_FIELDS(.component = "coap", .device = d->id, .message_id = GW_MSG_AUTH_FAILED,
                                              .event = "auth-failed"),
                                    "CoAP %s: plain-UDP device %s refused: %s", cs->peer, d->id,
                                    rr == -ENOENT ? "unknown device" : rr == -EPERM ? "the device is disabled" : strerror(-rr));
                        cs->revoked = true;
                        co->stats.rejected++;
                        respond_error(resp, COAP_RESPONSE_CODE_UNAUTHORIZED, "device unknown or disabled");
                        return NULL;
                }
        }
        if (!cs || !cs->authenticated || cs->revoked || cs->dev != d) {
                co->stats.rejected++;
                if (cs && cs->dev && cs->dev != d)
                        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                                    "CoAP %s: device %s asked for another device's resource, answering 4.03",
                                    cs->peer, dev_name(cs));
                respond_error(resp, cs && cs->dev && !cs->revoked ? COAP_RESPONSE_CODE_FORBIDDEN
                                                                  : COAP_RESPONSE_CODE_UNAUTHORIZED,
                              cs && cs->dev && !cs->revoked ? "not this device's resource" : "not authenticated");
                return NULL;
        }
        if (!rate_take(co, s)) {
                uint8_t buf[4];
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE);
                (void) coap_add_option(resp, COAP_OPTION_MAXAGE, coap_encode_var_safe(buf, sizeof buf, 1), buf);
                return NULL;
        }
        if (cs->hs)
                hub_session_touch(cs->hs);
        return cs;
}

/* ---- asynchronous requests -------------------------------------------------------------------- */

static struct op *op_new(struct csess *cs, enum op_kind kind, const coap_pdu_t *req) {
        struct op *o = calloc(1, sizeof *o);
        if (!o)
                return NULL;
        coap_bin_const_t t = coap_pdu_get_token(req);
        o->kind = kind;
        o->cs = cs;
        o->token_len = MIN(t.length, sizeof o->token);
        memcpy(o->token, t.s, o->token_len);
        o->mid = (uint16_t) coap_pdu_get_mid(req);
        return o;
}

/* Parks the request: libcoap sends an empty ACK for a CON and calls the handler again when
 * op_trigger() runs. */
static int op_park(struct op *o, coap_session_t *s, const coap_pdu_t *req) {
        coap_async_t *a = coap_register_async(s, req, 0);
        if (!a)
                return -ENOMEM;
        coap_async_set_app_data(a, o);
        o->next = o->cs->ops;
        o->cs->ops = o;
        return 0;
}

static void dedup_forget(struct csess *cs, uint16_t mid);

/* The separate response of a direct op (RFC 7252 §5.2.2), sent at once from the store's
 * completion — no libcoap async, so no second pass of the request through libcoap and no
 * coap_io_process() per completion round: CON for a CON request (libcoap retransmits it
 * until the device ACKs it), NON for a NON one; a new message id, the request's token. */
static void op_send_separate(struct op *o) {
        struct csess *cs = o->cs;
        coap_session_t *s = cs->session;
        const char *diag = NULL;
        coap_pdu_code_t code = COAP_RESPONSE_CODE_CHANGED;
        if (o->result < 0) {
                code = o->result == -ENOBUFS ? COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE : COAP_RESPONSE_CODE_INTERNAL_ERROR;
                diag = "the message could not be stored";
                dedup_forget(cs, o->mid);
        }
        coap_pdu_t *pdu = coap_pdu_init(o->con ? COAP_MESSAGE_CON : COAP_MESSAGE_NON, code, coap_new_message_id(s),
                                        coap_session_max_pdu_size(s));
        bool ok = pdu && coap_add_token(pdu, o->token_len, o->token) &&
                  (!diag || coap_add_data(pdu, strlen(diag), (const uint8_t *) diag));
        ops_unlink(cs, o);
        op_free(o);
        if (!ok) {
                coap_delete_pdu(pdu);
                gw_log_full(LOG_WARNING, -ENOMEM, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: cannot build the answer to a telemetry POST of device %s: out of memory", cs->peer,
                            dev_name(cs));
                return;
        }
        /* libcoap owns the PDU from here, sent or not. */
        if (coap_send(s, pdu) == COAP_INVALID_MID)
                gw_log_full(LOG_WARNING, 0, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: cannot send the answer to a telemetry POST of device %s", cs->peer, dev_name(cs));
}

/* Whether a direct op for the request with message id mid is being stored (a retransmission
 * of it gets one more empty ACK, and no second copy in the store). */
static bool op_in_progress(const struct csess *cs, uint16_t mid) {
        for (const struct op *o = cs->ops; o; o = o->next)
                if (o->direct && o->mid == mid)
                        return true;
        return false;
}

/* The store answered: wake the parked request (or free an orphan). */
static void op_trigger(struct op *o) {
        struct csess *cs = o->cs;
        if (!cs) {
                if (o->cmd && o->lock[0]) {
                        /* Nobody to give it to: the lock expires, or is released below. */
                }
                op_free(o);
                return;
        }
        if (o->direct) {
                op_send_separate(o);
                return;
        }
        coap_bin_const_t t = { .length = o->token_len, .s = o->token };
        coap_async_t *a = coap_find_async(cs->session, t);
        o->triggered = true;
        if (!a) {
                ops_unlink(cs, o);
                op_free(o);
                return;
        }
        coap_async_trigger(a);
        kick(cs->co);
}

/* The handler runs again for a parked request: returns its op (unlinked: the caller frees
 * it) when it is complete, NULL when the request is new. *ret_pending: a retransmission of
 * a request still in progress. */
static struct op *op_resume(coap_session_t *s, const coap_pdu_t *req, bool *ret_pending) {
        coap_async_t *a = coap_find_async(s, coap_pdu_get_token(req));
        *ret_pending = false;
        if (!a)
                return NULL;
        struct op *o = coap_async_get_app_data(a);
        if (!o || !o->triggered) {
                *ret_pending = true;
                return NULL;
        }
        if (o->cs)
                ops_unlink(o->cs, o);
        /* libcoap removes a fired async itself once the handler returns. */
        coap_async_set_app_data(a, NULL);
        return o;
}

/* ---- duplicates ------------------------------------------------------------------------------ */

/* 1 when mid was seen on this session within EXCHANGE_LIFETIME, else records it and returns 0. */
static int dedup_check(struct csess *cs, uint16_t mid) {
        uint64_t now = now_mono();
        for (unsigned i = 0; i < DEDUP_SLOTS; i++)
                if (cs->dedup[i].used && cs->dedup[i].mid == mid && now - cs->dedup[i].at_usec < DEDUP_LIFETIME_USEC)
                        return 1;
        struct dedup *dd = &cs->dedup[cs->dedup_next++ % DEDUP_SLOTS];
        dd->used = true;
        dd->mid = mid;
        dd->at_usec = now;
        return 0;
}

/* A request that was not stored: a retransmission of it must be stored, not answered 2.04. */
static void dedup_forget(struct csess *cs, uint16_t mid) {
        for (unsigned i = 0; i < DEDUP_SLOTS; i++)
                if (cs->dedup[i].used && cs->dedup[i].mid == mid)
                        cs->dedup[i].used = false;
}

/* ---- telemetry ------------------------------------------------------------------------------ */

static const char *content_type_of(unsigned cf, const char **ret_encoding) {
        *ret_encoding = NULL;
        switch (cf) {
        case COAP_MEDIATYPE_TEXT_PLAIN:
                *ret_encoding = "utf-8";
                return "text/plain";
        case COAP_MEDIATYPE_APPLICATION_JSON:
                *ret_encoding = "utf-8";
                return "application/json";
        case COAP_MEDIATYPE_APPLICATION_CBOR:
                return "application/cbor";
        case COAP_MEDIATYPE_APPLICATION_OCTET_STREAM:
                return "application/octet-stream";
        case COAP_MEDIATYPE_APPLICATION_XML:
                return "application/xml";
        default:
                return NULL;
        }
}

/* Fills msg's properties from the Uri-Query options: "$.mid=", "$.cid=", "$.ct=", "$.ce=" are
 * system properties, anything else an application property. -EINVAL for a malformed one. */
static int query_props(const coap_pdu_t *req, struct hub_msg *msg, bool *ret_has_ct) {
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        coap_opt_filter_t f;
        coap_option_filter_clear(&f);
        coap_option_filter_set(&f, COAP_OPTION_URI_QUERY);
        coap_option_iterator_init(req, &it, &f);
        *ret_has_ct = false;
        while ((opt = coap_option_next(&it))) {
                size_t len = coap_opt_length(opt);
                const char *v = (const char *) coap_opt_value(opt);
                char buf[512];
                if (len >= sizeof buf || memchr(v, 0, len))
                        return -EINVAL;
                memcpy(buf, v, len);
                buf[len] = 0;
                char *eq = strchr(buf, '=');
                const char *val = "";
                if (eq) {
                        *eq = 0;
                        val = eq + 1;
                }
                if (!buf[0])
                        return -EINVAL;
                int r;
                if (streq(buf, "$.mid"))
                        r = hub_msg_set_sys(msg, HUB_SYS_MESSAGE_ID, val);
                else if (streq(buf, "$.cid"))
                        r = hub_msg_set_sys(msg, HUB_SYS_CORRELATION_ID, val);
                else if (streq(buf, "$.ct")) {
                        r = hub_msg_set_sys(msg, HUB_SYS_CONTENT_TYPE, val);
                        *ret_has_ct = true;
                } else if (streq(buf, "$.ce"))
                        r = hub_msg_set_sys(msg, HUB_SYS_CONTENT_ENCODING, val);
                else if (buf[0] == '$')
                        r = -EINVAL;
                else
                        r = hub_msg_set_prop(msg, buf, val);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int stamp(struct csess *cs, struct hub_msg *msg) {
        int r;
        const char *method = cs->dtls
                ? "{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}"
                : "{\"scope\":\"device\",\"type\":\"none\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
        if ((r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_DEVICE_ID, cs->dev->id)) < 0 ||
            (cs->generation_id[0] &&
             (r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_AUTH_GENERATION_ID, cs->generation_id)) < 0) ||
            (r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_AUTH_METHOD, method)) < 0 ||
            (r = hub_msg_set_sys(msg, HUB_SYS_MESSAGE_SOURCE, "Telemetry")) < 0)
                return r;
        char t[32];
        return hub_msg_set_sys(msg, HUB_SYS_ENQUEUED_TIME, hub_time_format_iso8601(now_wall(), t));
}

static void receive_for_op_done(int r, const struct hub_queue_delivery *dl, void *ud) {
        struct op *o = ud;
        if (r >= 0 && !dl && o->cs && o->cs->dev)
                o->cs->dev->c2d_maybe = false;
        if (r >= 0 && dl) {
                if (o->cs && !o->cs->co->freeing) {
                        o->cmd = hub_msg_ref(dl->msg);
                        snprintf(o->lock, sizeof o->lock, "%s", dl->lock_token);
                        o->cs->c2d_locked++;
                        o->cs->co->stats.c2d_delivered++;
                } else if (o->cs == NULL && dl->device_id)
                        (void) 0; /* orphan: the lock simply expires */
        }
        if (o->kind == OP_RECEIVE)
                o->result = r;
        op_trigger(o);
}

static void telemetry_done(int result, uint64_t seq, void *ud) {
        struct op *o = ud;
        o->result = result;
        if (result < 0)
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "coap", .device = o->cs ? dev_name(o->cs) : NULL),
                            "CoAP: a message of device %s could not be stored: %m", o->cs ? dev_name(o->cs) : "-");
        /* Piggy-back: a device that only wakes to send gets its next command in the answer. */
        if (result >= 0 && !o->direct && o->cs && o->cs->dev && o->cs->dev->c2d_maybe && !o->cs->revoked &&
            !o->cs->co->freeing &&
            hub_queue_receive(o->cs->co->hub->queue, o->cs->dev->id, 0, now_wall(), receive_for_op_done, o) >= 0)
                return;
        op_trigger(o);
}

static void hnd_telemetry(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                          coap_pdu_t *resp) {
        bool pending;
        struct op *o = op_resume(s, req, &pending);
        if (o) {
                if (o->result < 0 && o->cs)
                        dedup_forget(o->cs, o->mid);
                if (o->result < 0)
                        respond_error(resp, o->result == -ENOBUFS ? COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE
                                                                  : COAP_RESPONSE_CODE_INTERNAL_ERROR,
                                      "the message could not be stored");
                else if (o->cmd)
                        respond_command(r, s, req, query, resp, COAP_RESPONSE_CODE_CHANGED, o->cs ? dev_name(o->cs) :
                                        ((struct cdev *) coap_resource_get_userdata(r))->id, o->cmd, o->lock);
                else
                        coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CHANGED);
                op_free(o);
                return;
        }
        if (pending)
                return; /* a retransmission while the first copy is being stored */

        struct csess *cs = authorize(r, s, req, resp);
        if (!cs)
                return;
        struct gw_coap *co = cs->co;
        if (op_in_progress(cs, (uint16_t) coap_pdu_get_mid(req))) {
                co->stats.duplicates++;
                return; /* no code: libcoap sends one more empty ACK for a CON */
        }
        if (dedup_check(cs, (uint16_t) coap_pdu_get_mid(req))) {
                co->stats.duplicates++;
                gw_log_full(LOG_DEBUG, 0, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: duplicate message id %u from %s, stored once", cs->peer,
                            (unsigned) coap_pdu_get_mid(req), dev_name(cs));
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CHANGED);
                return;
        }

        size_t len = 0, offset = 0, total = 0;
        const uint8_t *data = NULL;
        (void) coap_get_data_large(req, &len, &data, &offset, &total);
        if (total > co->conf->max_message_bytes || len > co->conf->max_message_bytes) {
                uint8_t buf[4];
                gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: device %s sent %zu bytes, more than the limit of %llu; answering 4.13", cs->peer,
                            dev_name(cs), MAX(total, len), (unsigned long long) co->conf->max_message_bytes);
                respond_error(resp, COAP_RESPONSE_CODE_REQUEST_TOO_LARGE, "message too large");
                (void) coap_add_option(resp, COAP_OPTION_SIZE1,
                                       coap_encode_var_safe(buf, sizeof buf, (unsigned) co->conf->max_message_bytes), buf);
                return;
        }

        _cleanup_(hub_msg_unrefp) struct hub_msg *msg = NULL;
        int rr = hub_msg_new(data, len, HUB_MSG_D2C_MAX_SIZE, &msg);
        bool has_ct = false;
        if (rr >= 0)
                rr = query_props(req, msg, &has_ct);
        if (rr >= 0 && !has_ct) {
                coap_opt_iterator_t it;
                coap_opt_t *cf = coap_check_option(req, COAP_OPTION_CONTENT_FORMAT, &it);
                if (cf) {
                        const char *enc, *ct = content_type_of(coap_decode_var_bytes(coap_opt_value(cf),
                                                                                       coap_opt_length(cf)), &enc);
                        if (ct)
                                rr = hub_msg_set_sys(msg, HUB_SYS_CONTENT_TYPE, ct);
                        if (rr >= 0 && enc)
                                rr = hub_msg_set_sys(msg, HUB_SYS_CONTENT_ENCODING, enc);
                }
        }
        if (rr >= 0)
                rr = stamp(cs, msg);
        if (rr < 0) {
                gw_log_full(LOG_NOTICE, rr, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: telemetry of device %s refused: %s", cs->peer, dev_name(cs),
                            rr == -E2BIG ? "message larger than 256 KB" : "malformed properties in the query");
                respond_error(resp, rr == -E2BIG ? COAP_RESPONSE_CODE_REQUEST_TOO_LARGE : COAP_RESPONSE_CODE_BAD_REQUEST,
                              rr == -E2BIG ? "message too large" : "malformed query property");
                return;
        }
        /* A device that may have a command waiting is answered through a libcoap async (the
         * 2.04 can then carry the command, block-wise if large); any other one directly. */
        o = op_new(cs, OP_TELEMETRY, req);
        if (o && !cs->dev->c2d_maybe) {
                o->direct = true;
                o->con = coap_pdu_get_type(req) == COAP_MESSAGE_CON;
                o->next = cs->ops;
                cs->ops = o;
        } else if (!o || op_park(o, s, req) < 0) {
                free(o);
                respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                return;
        }
        rr = hub_outbox_append(co->hub->outbox, msg, telemetry_done, o);
        if (rr < 0 && o->direct) {
                /* Not stored: answered at once (5.03 asks the device to retry later). */
                dedup_forget(cs, o->mid);
                ops_unlink(cs, o);
                op_free(o);
                gw_log_full(LOG_WARNING, rr, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: cannot store a message of device %s: %m", cs->peer, dev_name(cs));
                respond_error(resp, rr == -ENOBUFS ? COAP_RESPONSE_CODE_SERVICE_UNAVAILABLE
                                                   : COAP_RESPONSE_CODE_INTERNAL_ERROR,
                              "the message could not be stored");
                return;
        }
        if (rr < 0) {
                /* Not stored: the device keeps its copy (5.03 asks it to retry later). */
                o->result = rr;
                op_trigger(o);
                gw_log_full(LOG_WARNING, rr, GW_FIELDS(.component = "coap", .device = dev_name(cs)),
                            "CoAP %s: cannot store a message of device %s: %m", cs->peer, dev_name(cs));
                return;
        }
        co->stats.messages_in++;
        co->stats.messages_in_bytes += len;
}

/* ---- commands --------------------------------------------------------------------------------- */

static bool query_get(const coap_pdu_t *req, const char *key, char *buf, size_t size, bool *ret_present) {
        coap_opt_iterator_t it;
        coap_opt_t *opt;
        coap_opt_filter_t f;
        size_t kl = strlen(key);
        coap_option_filter_clear(&f);
        coap_option_filter_set(&f, COAP_OPTION_URI_QUERY);
        coap_option_iterator_init(req, &it, &f);
        if (ret_present)
                *ret_present = false;
        while ((opt = coap_option_next(&it))) {
                size_t len = coap_opt_length(opt);
                const char *v = (const char *) coap_opt_value(opt);
                if (len < kl || memcmp(v, key, kl) != 0 || (len > kl && v[kl] != '='))
                        continue;
                if (ret_present)
                        *ret_present = true;
                size_t vl = len > kl ? len - kl - 1 : 0;
                if (vl >= size || (vl && memchr(v + kl + 1, 0, vl)))
                        return false;
                memcpy(buf, v + kl + 1, vl);
                buf[vl] = 0;
                return true;
        }
        return false;
}

static void c2d_fetch_done(int r, const struct hub_queue_delivery *dl, void *ud) {
        struct fetch *f = ud;
        struct cdev *d = f->d;
        free(f);
        if (!d)
                return; /* the front-end stopped: the lock expires */
        d->fetch = NULL;
        d->receiving = false;
        if (d->co->freeing)
                return;
        if (r < 0 || !dl) {
                if (r < 0)
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "coap", .device = d->id),
                                    "CoAP: cannot read the C2D queue of %s: %m", d->id);
                d->queue_empty = true;
                if (r >= 0)
                        d->c2d_maybe = false;
                return;
        }
        if (!d->cs || !d->cmd_observed) {
                (void) hub_queue_abandon(d->co->hub->queue, d->id, dl->lock_token, now_wall(), NULL, NULL);
                return;
        }
        d->ahead = hub_msg_ref(dl->msg);
        snprintf(d->ahead_lock, sizeof d->ahead_lock, "%s", dl->lock_token);
        coap_resource_notify_observers(d->r_cmd, NULL);
        kick(d->co);
}

/* Fetches the next command for the commands observer. */
static void c2d_fetch(struct cdev *d) {
        if (!d->cs || !d->cmd_observed || d->ahead || d->receiving || d->queue_empty || d->co->freeing)
                return;
        struct fetch *f = malloc(sizeof *f);
        if (!f)
                return;
        f->d = d;
        if (hub_queue_receive(d->co->hub->queue, d->id, 0, now_wall(), c2d_fetch_done, f) < 0) {
                free(f);
                return;
        }
        d->fetch = f;
        d->receiving = true;
}

static void on_c2d_available(void *ud, const char *device_id) {
        struct gw_coap *co = ud;
        struct cdev *d = dev_find(co, device_id);
        if (!d)
                return;
        d->queue_empty = false;
        d->c2d_maybe = true;
        c2d_fetch(d);
}

static void settle_done(int r, void *ud) {
        struct op *o = ud;
        o->result = r;
        op_trigger(o);
}

static void hnd_commands(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                         coap_pdu_t *resp) {
        struct cdev *d = coap_resource_get_userdata(r);
        coap_pdu_code_t method = coap_pdu_get_code(req);
        bool pending;
        struct op *o = op_resume(s, req, &pending);
        if (o) {
                if (o->kind == OP_RECEIVE) {
                        if (o->result < 0)
                                respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "cannot read the queue");
                        else if (o->cmd)
                                respond_command(r, s, req, query, resp, COAP_RESPONSE_CODE_CONTENT, d->id, o->cmd,
                                                o->lock);
                        else
                                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CONTENT);
                } else if (o->result == -ENOLCK || o->result == -ESTALE)
                        respond_error(resp, COAP_RESPONSE_CODE_PRECONDITION_FAILED, "lock lost");
                else if (o->result == -ENOENT)
                        respond_error(resp, COAP_RESPONSE_CODE_NOT_FOUND, "unknown device");
                else if (o->result < 0)
                        respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "cannot settle the message");
                else
                        coap_pdu_set_code(resp, method == COAP_REQUEST_CODE_DELETE ? COAP_RESPONSE_CODE_DELETED
                                                                                   : COAP_RESPONSE_CODE_CHANGED);
                op_free(o);
                return;
        }
        if (pending)
                return;
        struct csess *cs = authorize(r, s, req, resp);
        if (!cs)
                return;
        struct gw_coap *co = cs->co;

        if (method == COAP_REQUEST_CODE_GET) {
                coap_opt_iterator_t it;
                coap_opt_t *ob = coap_check_option(req, COAP_OPTION_OBSERVE, &it);
                if (ob) {
                        /* Observe (and every notification): the command fetched ahead, or empty. */
                        unsigned v = coap_decode_var_bytes(coap_opt_value(ob), coap_opt_length(ob));
                        bool was = d->cmd_observed;
                        d->cmd_observed = v == COAP_OBSERVE_ESTABLISH;
                        if (d->cmd_observed != was)
                                set_caps(cs);
                        if (d->ahead) {
                                respond_command(r, s, req, query, resp, COAP_RESPONSE_CODE_CONTENT, d->id, d->ahead,
                                                d->ahead_lock);
                                d->ahead = hub_msg_unref(d->ahead);
                                cs->c2d_locked++;
                                co->stats.c2d_delivered++;
                        } else
                                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CONTENT);
                        if (d->cmd_observed) {
                                d->queue_empty = false;
                                c2d_fetch(d);
                        }
                        return;
                }
                o = op_new(cs, OP_RECEIVE, req);
                if (!o || op_park(o, s, req) < 0) {
                        free(o);
                        respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                        return;
                }
                int rr = hub_queue_receive(co->hub->queue, d->id, 0, now_wall(), receive_for_op_done, o);
                if (rr < 0) {
                        o->result = rr;
                        op_trigger(o);
                }
                return;
        }

        /* DELETE ?lock=T (complete), DELETE ?lock=T&reject, POST ?lock=T&abandon */
        char lock[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
        bool reject = false, abandon = false;
        if (!query_get(req, "lock", lock, sizeof lock, NULL) || !lock[0]) {
                respond_error(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "expected ?lock=<lock token>");
                return;
        }
        char dummy[8];
        (void) query_get(req, "reject", dummy, sizeof dummy, &reject);
        (void) query_get(req, "abandon", dummy, sizeof dummy, &abandon);
        if ((method == COAP_REQUEST_CODE_POST) != abandon) {
                respond_error(resp, COAP_RESPONSE_CODE_BAD_REQUEST,
                              "expected DELETE ?lock=T (complete), DELETE ?lock=T&reject or POST ?lock=T&abandon");
                return;
        }
        o = op_new(cs, OP_SETTLE, req);
        if (!o || op_park(o, s, req) < 0) {
                free(o);
                respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                return;
        }
        int rr = abandon ? hub_queue_abandon(co->hub->queue, d->id, lock, now_wall(), settle_done, o)
                 : reject ? hub_queue_reject(co->hub->queue, d->id, lock, now_wall(), settle_done, o)
                          : hub_queue_complete(co->hub->queue, d->id, lock, now_wall(), settle_done, o);
        if (rr < 0) {
                o->result = rr == -EINVAL ? -ENOLCK : rr;
                op_trigger(o);
        } else if (cs->c2d_locked > 0)
                cs->c2d_locked--;
}

/* ---- twin ---------------------------------------------------------------------------------- */

static void hnd_twin(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                     coap_pdu_t *resp) {
        struct csess *cs = authorize(r, s, req, resp);
        if (!cs)
                return;
        json_t *view = NULL;
        int rr = hub_twin_get_device_view(cs->co->hub->twins, cs->dev->id, &view);
        if (rr < 0) {
                respond_error(resp, rr == -ENOENT ? COAP_RESPONSE_CODE_NOT_FOUND : COAP_RESPONSE_CODE_INTERNAL_ERROR,
                              strerror(-rr));
                return;
        }
        respond_json(r, s, req, query, resp, COAP_RESPONSE_CODE_CONTENT, view);
        json_decref(view);
}

static void hnd_desired(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                        coap_pdu_t *resp) {
        struct cdev *d = coap_resource_get_userdata(r);
        struct csess *cs = authorize(r, s, req, resp);
        if (!cs)
                return;
        coap_opt_iterator_t it;
        coap_opt_t *ob = coap_check_option(req, COAP_OPTION_OBSERVE, &it);
        if (ob) {
                bool was = d->des_observed;
                d->des_observed = coap_decode_var_bytes(coap_opt_value(ob), coap_opt_length(ob)) == COAP_OBSERVE_ESTABLISH;
                if (was != d->des_observed)
                        set_caps(cs);
        }
        json_t *view = NULL;
        int rr = hub_twin_get_device_view(cs->co->hub->twins, d->id, &view);
        if (rr < 0) {
                respond_error(resp, rr == -ENOENT ? COAP_RESPONSE_CODE_NOT_FOUND : COAP_RESPONSE_CODE_INTERNAL_ERROR,
                              strerror(-rr));
                return;
        }
        respond_json(r, s, req, query, resp, COAP_RESPONSE_CODE_CONTENT, json_object_get(view, "desired"));
        json_decref(view);
}

static void reported_done(int result, json_t *twin, const char *error, void *ud) {
        struct op *o = ud;
        o->result = result;
        if (result < 0 && error)
                o->error = strdup(error);
        if (result >= 0)
                o->version = json_integer_value(
                        json_object_get(json_object_get(json_object_get(twin, "properties"), "reported"), "$version"));
        op_trigger(o);
}

static void hnd_reported(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                         coap_pdu_t *resp) {
        bool pending;
        struct op *o = op_resume(s, req, &pending);
        if (o) {
                if (o->result >= 0) {
                        uint8_t buf[8];
                        coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CHANGED);
                        /* The new reported version as the ETag. */
                        (void) coap_add_option(resp, COAP_OPTION_ETAG,
                                               coap_encode_var_safe8(buf, sizeof buf, (uint64_t) o->version), buf);
                } else
                        respond_error(resp,
                                      o->result == -ESTALE ? COAP_RESPONSE_CODE_PRECONDITION_FAILED
                                      : o->result == -EINVAL || o->result == -E2BIG || o->result == -EBADMSG
                                              ? COAP_RESPONSE_CODE_BAD_REQUEST
                                      : o->result == -ENOENT ? COAP_RESPONSE_CODE_NOT_FOUND
                                                             : COAP_RESPONSE_CODE_INTERNAL_ERROR,
                                      o->error ? o->error : strerror(-o->result));
                op_free(o);
                return;
        }
        if (pending)
                return;
        struct csess *cs = authorize(r, s, req, resp);
        if (!cs)
                return;
        size_t len = 0, offset = 0, total = 0;
        const uint8_t *data = NULL;
        (void) coap_get_data_large(req, &len, &data, &offset, &total);
        json_error_t je;
        json_t *patch = len ? json_loadb((const char *) data, len, 0, &je) : NULL;
        if (!patch || !json_is_object(patch)) {
                json_decref(patch);
                respond_error(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "the reported properties patch must be a JSON object");
                return;
        }
        o = op_new(cs, OP_REPORTED, req);
        if (!o || op_park(o, s, req) < 0) {
                free(o);
                json_decref(patch);
                respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                return;
        }
        int rr = hub_twin_update_reported(cs->co->hub->twins, cs->dev->id, patch, -1, reported_done, o);
        json_decref(patch);
        if (rr < 0) {
                o->result = rr;
                op_trigger(o);
        }
}

/* ---- methods ---------------------------------------------------------------------------------- */

static void hnd_methods(coap_resource_t *r, coap_session_t *s, const coap_pdu_t *req, const coap_string_t *query,
                        coap_pdu_t *resp) {
        struct cdev *d = coap_resource_get_userdata(r);
        struct csess *cs = authorize(r, s, req, resp);
        if (!cs)
                return;
        struct gw_coap *co = cs->co;
        if (coap_pdu_get_code(req) == COAP_REQUEST_CODE_GET) {
                coap_opt_iterator_t it;
                coap_opt_t *ob = coap_check_option(req, COAP_OPTION_OBSERVE, &it);
                if (ob) {
                        bool was = d->meth_observed;
                        d->meth_observed =
                                coap_decode_var_bytes(coap_opt_value(ob), coap_opt_length(ob)) == COAP_OBSERVE_ESTABLISH;
                        if (was != d->meth_observed)
                                set_caps(cs);
                }
                /* The oldest call not yet handed out. */
                for (size_t i = 0; i < d->n_calls; i++) {
                        struct call *c = &d->calls[i];
                        if (c->delivered)
                                continue;
                        json_error_t je;
                        json_t *payload = json_loads(c->payload, JSON_DECODE_ANY, &je);
                        json_t *j = json_pack("{s:s, s:s, s:o}", "method", c->name, "rid", c->rid, "payload",
                                              payload ? payload : json_null());
                        c->delivered = true;
                        co->stats.methods_delivered++;
                        respond_json(r, s, req, query, resp, COAP_RESPONSE_CODE_CONTENT, j);
                        json_decref(j);
                        for (size_t k = i + 1; k < d->n_calls; k++)
                                if (!d->calls[k].delivered) {
                                        /* More waiting: the next notification follows this one. */
                                        coap_resource_notify_observers(d->r_meth, NULL);
                                        kick(co);
                                        break;
                                }
                        return;
                }
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CONTENT);
                return;
        }
        /* POST ?rid=R&status=S with the response body */
        char rid[HUB_METHOD_REQUEST_ID_MAX + 1], status[16];
        if (!query_get(req, "rid", rid, sizeof rid, NULL) || !query_get(req, "status", status, sizeof status, NULL)) {
                respond_error(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "expected ?rid=<request id>&status=<status>");
                return;
        }
        char *end;
        long st = strtol(status, &end, 10);
        if (*end || end == status || st < 0 || st > 2147483647L) {
                respond_error(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "status must be a non-negative integer");
                return;
        }
        size_t len = 0, offset = 0, total = 0;
        const uint8_t *data = NULL;
        (void) coap_get_data_large(req, &len, &data, &offset, &total);
        _cleanup_free_ char *body = NULL;
        if (len > 0) {
                if (memchr(data, 0, len)) {
                        respond_error(resp, COAP_RESPONSE_CODE_BAD_REQUEST, "method response with a NUL byte");
                        return;
                }
                body = strndup((const char *) data, len);
                if (!body) {
                        respond_error(resp, COAP_RESPONSE_CODE_INTERNAL_ERROR, "out of memory");
                        return;
                }
        }
        int rr = cs->hs ? hub_method_response(co->hub->methods, cs->hs, rid, (int) st, body) : -ENOENT;
        /* The call is answered (or unknown): forget it. */
        for (size_t i = 0; i < d->n_calls; i++)
                if (streq(d->calls[i].rid, rid)) {
                        free(d->calls[i].name);
                        free(d->calls[i].payload);
                        free(d->calls[i].rid);
                        memmove(&d->calls[i], &d->calls[i + 1], (d->n_calls - i - 1) * sizeof d->calls[0]);
                        d->n_calls--;
                        break;
                }
        if (rr == -ENOENT) {
                gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "coap", .device = d->id),
                            "CoAP: device %s answered an unknown method request %s, ignoring", d->id, rid);
                respond_error(resp, COAP_RESPONSE_CODE_NOT_FOUND, "no such method request");
        } else if (rr < 0)
                respond_error(resp, rr == -E2BIG ? COAP_RESPONSE_CODE_REQUEST_TOO_LARGE : COAP_RESPONSE_CODE_BAD_REQUEST,
                              strerror(-rr));
        else
                coap_pdu_set_code(resp, COAP_RESPONSE_CODE_CHANGED);
}

/* ---- DTLS-PSK --------------------------------------------------------------------------------- */

/* libcoap asks for the key of a PSK identity: "{id}" (primary key) or "{id}#2" (secondary). */
static const coap_bin_const_t *psk_for_identity(coap_bin_const_t *identity, coap_session_t *s, void *arg) {
        struct gw_coap *co = arg;
        char id[HUB_DEVICE_ID_MAX + 3], peer[80];
        struct hub_device dev = {};
        const char *why = NULL;
        bool secondary = false;

        peer_string(s, peer, sizeof peer);
        if (!identity || identity->length == 0 || identity->length >= sizeof id ||
            memchr(identity->s, 0, identity->length)) {
                co->stats.unknown_identities++;
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "coap", .message_id = GW_MSG_AUTH_FAILED, .event = "auth-failed"),
                            "CoAP %s: DTLS handshake refused: malformed PSK identity", peer);
                return NULL;
        }
        memcpy(id, identity->s, identity->length);
        id[identity->length] = 0;
        char *hash = strstr(id, "#2");
        if (hash && hash[2] == 0) {
                *hash = 0;
                secondary = true;
        }
        int r = hub_device_id_valid(id) ? hub_registry_get(co->hub->registry, id, &dev) : -ENOENT;
        if (r == -ENOENT)
                why = "unknown PSK identity";
        else if (r < 0)
                why = "the registry cannot be read";
        else if (dev.status != HUB_DEVICE_ENABLED)
                why = "the device is disabled";
        else if (dev.auth_type != HUB_AUTH_TYPE_SAS)
                why = "the device does not use symmetric keys";
        else if (gw_coap_psk_derive(secondary ? dev.secondary_key : dev.primary_key, co->psk) < 0)
                why = "the device has no usable key";
        hub_device_done(&dev);
        if (why) {
                if (r == -ENOENT)
                        co->stats.unknown_identities++;
                co->stats.handshakes_failed++;
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "coap", .device = id, .message_id = GW_MSG_AUTH_FAILED,
                                      .event = "auth-failed"),
                            "CoAP %s: DTLS handshake of identity \"%s%s\" refused: %s", peer, id, secondary ? "#2" : "",
                            why);
                return NULL;
        }
        struct cdev *d = dev_get(co, id, gw_coap_conf_plaintext_device(co->conf, id));
        struct csess *cs = csess_of(s);
        if (!d || (!cs && !(cs = csess_new(co, s))))
                return NULL;
        if (cs->hs) /* a new handshake on a live session: start over */
                csess_detach(cs, false);
        cs->dev = d;
        cs->authenticated = false;
        cs->revoked = false;
        snprintf(cs->identity, sizeof cs->identity, "%s%s", id, secondary ? "#2" : "");
        cs->identified_usec = now_mono();
        cs->handshake_logged = false;
        co->psk_bin.s = co->psk;
        co->psk_bin.length = sizeof co->psk;
        return &co->psk_bin; /* copied by libcoap before the next call */
}

/* A DTLS session that ends before its handshake completed: the identity was known but the
 * key did not match (or the peer gave up). */
static void log_failed_handshake(struct csess *cs) {
        if (!cs || !cs->dtls || cs->authenticated || !cs->identity[0] || cs->handshake_logged)
                return;
        cs->handshake_logged = true;
        cs->co->stats.handshakes_failed++;
        gw_log_full(LOG_NOTICE, 0,
                    GW_FIELDS(.component = "coap", .device = dev_name(cs), .message_id = GW_MSG_AUTH_FAILED,
                              .event = "auth-failed"),
                    "CoAP %s: DTLS handshake of identity \"%s\" failed (wrong key?)", cs->peer, cs->identity);
}

static int on_event(coap_session_t *s, const coap_event_t ev) {
        struct gw_coap *co = coap_get_app_data(coap_session_get_context(s));
        struct csess *cs = csess_of(s);
        if (!co)
                return 0;
        switch (ev) {
        case COAP_EVENT_DTLS_CONNECTED:
                if (cs && cs->dev && !cs->authenticated) {
                        co->stats.handshakes_ok++;
                        int r = csess_register(cs, cs->dev);
                        if (r < 0) {
                                gw_log_full(LOG_NOTICE, r, GW_FIELDS(.component = "coap", .device = cs->dev->id),
                                            "CoAP %s: cannot register the session of %s: %m", cs->peer, cs->dev->id);
                                cs->revoked = true;
                                cs->disconnect_pending = true;
                                co->n_disconnect_pending++;
                                kick(co);
                        }
                }
                break;
        case COAP_EVENT_DTLS_ERROR:
        case COAP_EVENT_DTLS_CLOSED:
                log_failed_handshake(cs);
                if (cs)
                        csess_detach(cs, true);
                break;
        case COAP_EVENT_SERVER_SESSION_DEL:
                if (cs) {
                        log_failed_handshake(cs);
                        coap_session_set_app_data(s, NULL);
                        csess_free(cs);
                }
                break;
        default:
                break;
        }
        return 0;
}

/* ---- libcoap's log ------------------------------------------------------------------------- */

static void on_coap_log(coap_log_t level, const char *message) {
        /* A copy of a socket's event that found it empty (on_io): libcoap reports the EAGAIN
         * and then "read failed"; neither is a failure. */
        static bool eagain;
        if (strstr(message, "coap_network_read: ") && strstr(message, strerror(EAGAIN))) {
                eagain = true;
                return;
        }
        if (eagain) {
                eagain = false;
                if (strstr(message, "read failed"))
                        return;
        }
        size_t n = strlen(message);
        while (n > 0 && (message[n - 1] == '\n' || message[n - 1] == '\r'))
                n--;
        gw_log_full(level <= LOG_WARNING ? LOG_WARNING : LOG_NOTICE, 0, GW_FIELDS(.component = "coap"),
                    "CoAP (libcoap): %.*s", (int) n, message);
}

/* ---- the loop ------------------------------------------------------------------------------- */

/* OpenSSL reports no event when a handshake fails on a wrong key (the peer gets a
 * decrypt_error alert, the session just idles out): a handshake that has not completed
 * HANDSHAKE_LOG_USEC after the identity was accepted is logged as failed. */
#define HANDSHAKE_LOG_USEC (2 * USEC_PER_SEC)

static void check_handshakes(struct gw_coap *co) {
        uint64_t now = now_mono();
        for (struct csess *cs = co->sessions; cs; cs = cs->next)
                if (cs->dtls && !cs->authenticated && !cs->handshake_logged && cs->identified_usec &&
                    now - cs->identified_usec >= HANDSHAKE_LOG_USEC)
                        log_failed_handshake(cs);
}

static void run(struct gw_coap *co) {
        if (!co->ctx)
                return;
        /* libcoap's own timers (retransmissions, session timeouts, asyncs) are a timerfd
         * inside its epoll fd: no re-arming here (timerfd_settime per request was the largest
         * cost under load). */
        (void) coap_io_process(co->ctx, COAP_IO_NO_WAIT);
        disconnect_pending(co);
}

#define IO_MAX_EVENTS 64
#define IO_MAX_BATCH 8
#define IO_MAX_ROUNDS 4

/* Datagrams: handled straight from libcoap's epoll set (coap_io_do_epoll). The full
 * coap_io_process() — asyncs to fire, observers to notify, the timer to re-arm — runs only
 * when libcoap's timer fired or after a kick, not per datagram. */
static int on_io(sd_event_source *s, int fd, uint32_t revents, void *ud) {
        struct gw_coap *co = ud;
        struct epoll_event ev[IO_MAX_EVENTS];
        bool timer = false;
        for (unsigned round = 0; round < IO_MAX_ROUNDS; round++) {
                int n = epoll_wait(fd, ev, IO_MAX_EVENTS / IO_MAX_BATCH, 0);
                if (n <= 0) {
                        if (round == 0)
                                timer = true; /* nothing from libcoap's set: let coap_io_process() look */
                        else if (round == 1 && co->batch > 1)
                                co->batch /= 2; /* all read at the first go: fewer copies next time */
                        break;
                }
                if (round > 0 && co->batch < IO_MAX_BATCH)
                        co->batch *= 2; /* still more queued: read more per call */
                /* libcoap reads one datagram per event of a socket, and re-arms its timerfd
                 * (timerfd_settime, the costliest system call on the path) once per
                 * coap_io_do_epoll(): copies of a readable socket's event read a burst of
                 * datagrams for one re-arm. An extra copy finds the socket empty (EAGAIN,
                 * which libcoap reports at debug level only). */
                size_t m = (size_t) n;
                for (int i = 0; i < n; i++) {
                        if (!ev[i].data.ptr) {
                                timer = true; /* libcoap's timerfd */
                                continue;
                        }
                        for (unsigned k = 1; k < co->batch && m < IO_MAX_EVENTS; k++)
                                ev[m++] = ev[i];
                }
                coap_io_do_epoll(co->ctx, ev, m);
        }
        if (timer)
                run(co);
        else
                disconnect_pending(co);
        return 0;
}

/* Once a second: a backstop for libcoap's timers, and check_handshakes(). */
static int on_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct gw_coap *co = ud;
        run(co);
        check_handshakes(co);
        (void) sd_event_source_set_time(s, usec + USEC_PER_SEC);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ON);
        return 0;
}

static int on_kick(sd_event_source *s, void *ud) {
        struct gw_coap *co = ud;
        run(co);
        for (struct cdev *d = co->devs; d; d = d->next)
                c2d_fetch(d);
        return 0;
}

/* ---- set-up ----------------------------------------------------------------------------------- */

static int add_endpoint(struct gw_coap *co, const char *address, coap_proto_t proto, const char *path) {
        struct sockaddr_storage sa;
        socklen_t len;
        coap_address_t a;
        if (co->n_eps >= COAP_MAX_ENDPOINTS)
                return gw_log_errno(LOG_ERR, -E2BIG, "%s: more than %d CoAP endpoints", path, COAP_MAX_ENDPOINTS);
        int r = gw_net_parse_address(address, &sa, &len);
        if (r < 0)
                return gw_log_errno(LOG_ERR, r, "%s: \"%s\" is not an address:port", path, address);
        coap_address_init(&a);
        memcpy(&a.addr, &sa, len);
        a.size = len;
        coap_endpoint_t *ep = coap_new_endpoint(co->ctx, &a, proto);
        if (!ep)
                return gw_log_errno(LOG_ERR, -EADDRNOTAVAIL, "Cannot listen for CoAP on %s (%s): see the libcoap message above",
                                    address, path);
        /* The bound port: libcoap prints "addr:port" for the endpoint. */
        const char *str = coap_endpoint_str(ep);
        const char *colon = str ? strrchr(str, ':') : NULL;
        uint16_t port = colon ? (uint16_t) strtoul(colon + 1, NULL, 10) : 0;
        co->eps[co->n_eps] = ep;
        co->ports[co->n_eps++] = port;
        gw_log_info("CoAP listening on %s (port %u, %s)", address, port, proto == COAP_PROTO_DTLS ? "DTLS" : "UDP");
        return 0;
}

static int conf_copy(const struct gw_coap_conf *in, struct gw_coap_conf **ret) {
        struct gw_coap_conf *c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        *c = *in;
        c->listen = c->dtls_listen = NULL;
        size_t n = 0;
        while (in->plaintext_devices && in->plaintext_devices[n])
                n++;
        c->plaintext_devices = calloc(n + 1, sizeof(char *));
        if (!c->plaintext_devices) {
                free(c);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++)
                if (!(c->plaintext_devices[i] = strdup(in->plaintext_devices[i]))) {
                        gw_coap_conf_free(c);
                        return -ENOMEM;
                }
        *ret = c;
        return 0;
}

int gw_coap_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, struct gw_coap **ret) {
        int r;
        if (!cfg->coap) {
                *ret = NULL;
                return 0;
        }
        struct gw_coap *co = calloc(1, sizeof *co);
        if (!co)
                return -ENOMEM;
        co->event = sd_event_ref(e);
        co->hub = hub;
        co->batch = 1;
        co->rate = calloc(RATE_SLOTS, sizeof *co->rate);
        if (!co->rate || conf_copy(cfg->coap, &co->conf) < 0) {
                gw_coap_free(co);
                return -ENOMEM;
        }

        coap_startup();
        coap_set_log_handler(on_coap_log);
        coap_set_log_level(LOG_WARNING);
        co->ctx = coap_new_context(NULL);
        if (!co->ctx) {
                gw_coap_free(co);
                return gw_log_errno(LOG_ERR, -ENOMEM, "Cannot create the CoAP context");
        }
        coap_set_app_data(co->ctx, co);
        coap_context_set_block_mode(co->ctx, COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
        coap_context_set_max_idle_sessions(co->ctx, co->conf->max_sessions);
        coap_context_set_max_handshake_sessions(co->ctx, co->conf->max_handshakes);
        coap_context_set_session_timeout(co->ctx, (unsigned) (co->conf->session_timeout_usec / USEC_PER_SEC));
        coap_register_event_handler(co->ctx, on_event);
        coap_register_option(co->ctx, GW_COAP_OPTION_LOCK_TOKEN);
        coap_register_option(co->ctx, GW_COAP_OPTION_PROPERTIES);

        if (cfg->coap->dtls_listen && cfg->coap->dtls_listen[0]) {
                if (!coap_dtls_is_supported()) {
                        gw_coap_free(co);
                        return gw_log_errno(LOG_ERR, -EOPNOTSUPP, "libcoap was built without DTLS: coap.dtls_listen cannot be served");
                }
                coap_dtls_spsk_t spsk = {
                        .version = COAP_DTLS_SPSK_SETUP_VERSION,
                        .validate_id_call_back = psk_for_identity,
                        .id_call_back_arg = co,
                        .psk_info.hint = { .length = 8, .s = (const uint8_t *) "fieldhub" },
                };
                if (!coap_context_set_psk2(co->ctx, &spsk)) {
                        gw_coap_free(co);
                        return gw_log_errno(LOG_ERR, -EIO, "Cannot set up DTLS-PSK for CoAP");
                }
        }
        for (size_t i = 0; cfg->coap->listen && cfg->coap->listen[i]; i++) {
                char path[48];
                snprintf(path, sizeof path, "coap.listen[%zu]", i);
                if ((r = add_endpoint(co, cfg->coap->listen[i], COAP_PROTO_UDP, path)) < 0) {
                        gw_coap_free(co);
                        return r;
                }
        }
        for (size_t i = 0; cfg->coap->dtls_listen && cfg->coap->dtls_listen[i]; i++) {
                char path[48];
                snprintf(path, sizeof path, "coap.dtls_listen[%zu]", i);
                if ((r = add_endpoint(co, cfg->coap->dtls_listen[i], COAP_PROTO_DTLS, path)) < 0) {
                        gw_coap_free(co);
                        return r;
                }
        }
        for (size_t i = 0; co->conf->plaintext_devices[i]; i++)
                if (!dev_get(co, co->conf->plaintext_devices[i], true)) {
                        gw_coap_free(co);
                        return -ENOMEM;
                }

        int fd = coap_context_get_coap_fd(co->ctx);
        if (fd < 0) {
                gw_coap_free(co);
                return gw_log_errno(LOG_ERR, -EOPNOTSUPP, "libcoap was built without epoll support: no fd to watch");
        }
        r = sd_event_add_io(e, &co->io, fd, EPOLLIN, on_io, co);
        if (r >= 0)
                r = sd_event_add_time(e, &co->timer, CLOCK_BOOTTIME, now_mono() + USEC_PER_SEC, 100 * USEC_PER_MSEC,
                                      on_timer, co);
        if (r >= 0)
                r = sd_event_add_defer(e, &co->kick, on_kick, co);
        if (r >= 0)
                r = sd_event_source_set_enabled(co->kick, SD_EVENT_OFF);
        if (r < 0) {
                gw_coap_free(co);
                return gw_log_errno(LOG_ERR, r, "Cannot watch the CoAP context: %m");
        }
        hub->coap_c2d_available = on_c2d_available;
        hub->coap_c2d_available_ud = co;
        *ret = co;
        return 0;
}

struct gw_coap *gw_coap_free(struct gw_coap *co) {
        if (!co)
                return NULL;
        if (co->hub && co->hub->coap_c2d_available_ud == co) {
                co->hub->coap_c2d_available = NULL;
                co->hub->coap_c2d_available_ud = NULL;
        }
        /* Sessions end first (they unregister from the hub); then the context. */
        for (struct csess *cs = co->sessions; cs; cs = cs->next)
                csess_detach(cs, true);
        co->freeing = true;
        co->io = sd_event_source_disable_unref(co->io);
        co->timer = sd_event_source_disable_unref(co->timer);
        co->kick = sd_event_source_disable_unref(co->kick);
        if (co->ctx) {
                coap_free_context(co->ctx); /* SERVER_SESSION_DEL frees every csess */
                co->ctx = NULL;
                coap_cleanup();
        }
        while (co->sessions)
                csess_free(co->sessions);
        while (co->devs) {
                struct cdev *d = co->devs;
                co->devs = d->next;
                hub_msg_unref(d->ahead);
                if (d->fetch)
                        d->fetch->d = NULL;
                calls_clear(d);
                free(d->id);
                free(d);
        }
        free(co->rate);
        gw_coap_conf_free(co->conf);
        hub_explicit_bzero(co->psk, sizeof co->psk);
        co->event = sd_event_unref(co->event);
        free(co);
        return NULL;
}

uint16_t gw_coap_get_port(const struct gw_coap *co, size_t i) {
        return co && i < co->n_eps ? co->ports[i] : 0;
}

const struct gw_coap_stats *gw_coap_get_stats(const struct gw_coap *co) {
        return &co->stats;
}
