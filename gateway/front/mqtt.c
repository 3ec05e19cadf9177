/* SPDX-License-Identifier: MIT */
/* The hub's MQTT 3.1.1 device interface (reference §2; see mqtt.h).
 *
 * One struct mconn per network connection. Input is decoded packet by packet straight from
 * the network layer's buffer (zero copy); what an asynchronous completion needs later is
 * copied. D2C QoS 1 PUBLISHes take a slot in an ordered window of max_inflight (16)
 * acknowledgements: a slot is filled when the outbox append is durable, and PUBACKs leave
 * strictly in arrival order. With the window full, reading from the peer is held
 * (gw_net_conn_hold_input) until a PUBACK frees a slot.
 *
 * C2D: while the device is subscribed to devicebound, the connection pulls from its durable
 * queue (hub_queue_receive) up to max_inflight locked messages; a device PUBACK completes
 * one. On disconnect the device's locks are released, so what was in flight is redelivered
 * at once on reconnect; a lock that times out (no PUBACK) comes back through the queue's
 * on_available hook.
 *
 * Completions may outlive the network connection: they hold a reference on the mconn. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <mbedtls/md.h>
#include <mbedtls/oid.h>
#include <mbedtls/x509_crt.h>

#include "auth-x509.h"
#include "config.h"
#include "front/mqtt-codec.h"
#include "front/mqtt-topic.h"
#include "front/mqtt.h"
#include "hub.h"
#include "hub/auth.h"
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

#define MQTT_MAX_LISTENERS 8
#define MQTT_MAX_SUBSCRIPTIONS 5
#define MQTT_KEEP_ALIVE_FACTOR_NUM 3 /* 1.5 x */
#define MQTT_KEEP_ALIVE_FACTOR_DEN 2
#define MCONN_MAGIC 0x4d51544cu /* "MQTL" */

struct gw_mqtt {
        sd_event *event;
        struct gw_hub *hub;
        char *const *host_names;
        struct gw_tls_server *tls;
        struct gw_net_listener *listeners[MQTT_MAX_LISTENERS];
        mbedtls_x509_crt ca_chain; /* hub.x509_ca_files */
        bool have_ca;
        unsigned max_inflight;
        size_t max_packet;
        uint64_t max_ka_timeout_usec, connect_timeout_usec;
        uint32_t rate; /* messages per second per connection, 0 = unlimited */
        struct gw_mqtt_stats stats;
        bool freeing;  /* gw_mqtt_free() ran: the hub may be gone, touch nothing of it */
        /* PUBACKs made sendable by store completions are flushed once per loop iteration,
         * so one group commit costs each connection one TLS record, not one per message. */
        sd_event_source *flush_src;
        struct mconn **dirty;
        size_t n_dirty, dirty_cap;
        size_t n_mconn; /* connection objects alive (completions may keep them after close) */
};

/* A slot of the inbound window. It is also the completion context of the outbox append of
 * its PUBLISH (no allocation per message): a slot is reused only once its PUBACK left, that
 * is after its completion ran. QoS 0 messages and the Will share the connection's qos0 slot
 * (never in the window). Each pending append holds a reference on the mconn. */
struct ack_slot {
        struct mconn *mc;
        uint16_t packet_id;
        bool done;
};

struct c2d_slot {
        uint16_t packet_id;
        char lock_token[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
};

struct mconn {
        uint32_t magic;
        unsigned n_ref;
        struct gw_mqtt *m;
        struct gw_net_conn *c; /* NULL once closed */
        char peer[64];
        bool connected;        /* CONNACK 0 sent */
        bool disconnecting;    /* DISCONNECT received or closing: ignore further input */
        bool clean_disconnect; /* DISCONNECT received: no Will */
        bool closed_by_hub;
        char *device_id, *module_id;
        char generation_id[24];
        const char *auth_method; /* static JSON */
        char *model_id;
        struct hub_session *session;
        sd_event_source *timer;
        uint64_t ka_timeout_usec, last_rx_usec, expiry_mono_usec, connect_deadline_usec;
        /* Will */
        bool will;
        bool will_retain;
        char *will_topic;
        uint8_t *will_payload;
        size_t will_len;
        /* inbound acknowledgements, in arrival order */
        struct ack_slot *acks;
        struct ack_slot qos0; /* completion context of QoS 0 appends and the Will */
        unsigned ack_head, ack_n;
        bool held;
        bool ack_dirty; /* in m->dirty, waiting for the flush */
        /* throttling (token bucket) */
        double tokens;
        uint64_t tokens_at_usec, throttle_until_usec;
        /* subscriptions */
        unsigned sub_kinds; /* 1u << enum gw_mqtt_filter_kind */
        uint8_t c2d_qos;
        struct c2d_slot *c2d;
        unsigned c2d_n, c2d_receiving;
        bool c2d_empty;
        uint16_t next_packet_id;
};

static uint64_t now_mono(void) {
        return hub_clock_mono(hub_clock_system());
}

static uint64_t now_wall(void) {
        return hub_clock_now(hub_clock_system());
}

static const char *dev_name(const struct mconn *mc) {
        return mc->device_id ? mc->device_id : "-";
}

static struct mconn *mconn_ref(struct mconn *mc) {
        mc->n_ref++;
        return mc;
}

static void mconn_unref(struct mconn *mc) {
        if (!mc || --mc->n_ref > 0)
                return;
        struct gw_mqtt *m = mc->m;
        if (--m->n_mconn == 0 && m->freeing)
                free(m);
        mc->timer = sd_event_source_disable_unref(mc->timer);
        free(mc->device_id);
        free(mc->module_id);
        free(mc->model_id);
        free(mc->will_topic);
        free(mc->will_payload);
        free(mc->acks);
        free(mc->c2d);
        mc->magic = 0;
        free(mc);
}

static bool mconn_alive(const struct mconn *mc) {
        return mc->c && !mc->disconnecting;
}

/* Closes the connection for a reason worth a log line (rate-limited per device and site). */
static int mconn_fail(struct mconn *mc, int prio, const char *fmt, ...) _printf_(3, 4);
static int mconn_fail(struct mconn *mc, int prio, const char *fmt, ...) {
        char why[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, sizeof why, fmt, ap);
        va_end(ap);
        gw_log_full(prio, 0, GW_FIELDS(.component = "mqtt", .device = mc->device_id, .event = "mqtt-closed"),
                    "MQTT %s (device %s): %s; closing the connection", mc->peer, dev_name(mc), why);
        if (mc->c) {
                mc->disconnecting = true;
                gw_net_conn_close(mc->c, false);
        }
        return -ECONNABORTED;
}

static int mconn_send(struct mconn *mc, const void *p, size_t n) {
        if (!mc->c)
                return -ENOTCONN;
        return gw_net_conn_send(mc->c, p, n);
}

/* A hub → device PUBLISH. */
static int mconn_publish(struct mconn *mc, const char *topic, uint8_t qos, uint16_t packet_id, const void *body,
                         size_t len) {
        struct gw_mqtt_publish p = {
                .qos = qos,
                .topic = gw_mqtt_str_from(topic),
                .packet_id = packet_id,
                .payload = body,
                .payload_len = len,
        };
        uint8_t hdr[GW_MQTT_PUBLISH_HEADER_MAX(0) + 1024];
        _cleanup_free_ uint8_t *big = NULL;
        uint8_t *buf = hdr;
        size_t need = GW_MQTT_PUBLISH_HEADER_MAX(strlen(topic));
        if (need > sizeof hdr) {
                big = malloc(need);
                if (!big)
                        return -ENOMEM;
                buf = big;
        }
        int n = gw_mqtt_encode_publish_header(&p, buf, need);
        if (n < 0)
                return n;
        int r = mconn_send(mc, buf, (size_t) n);
        if (r >= 0 && len > 0)
                r = mconn_send(mc, body, len);
        if (r >= 0)
                mc->m->stats.messages_out++;
        return r;
}

/* ---- timers: CONNECT deadline, keep-alive, token expiry, throttling ------------------------ */

static int on_timer(sd_event_source *s, uint64_t usec, void *ud);

static void mconn_arm(struct mconn *mc) {
        uint64_t when = UINT64_MAX;
        if (!mc->connected)
                when = mc->connect_deadline_usec;
        else {
                if (mc->ka_timeout_usec > 0)
                        when = mc->last_rx_usec + mc->ka_timeout_usec;
                if (mc->expiry_mono_usec && mc->expiry_mono_usec < when)
                        when = mc->expiry_mono_usec;
        }
        if (mc->throttle_until_usec && mc->throttle_until_usec < when)
                when = mc->throttle_until_usec;
        if (when == UINT64_MAX) {
                if (mc->timer)
                        (void) sd_event_source_set_enabled(mc->timer, SD_EVENT_OFF);
                return;
        }
        if (!mc->timer) {
                if (sd_event_add_time(mc->m->event, &mc->timer, CLOCK_BOOTTIME, when, 50 * USEC_PER_MSEC, on_timer,
                                      mc) < 0)
                        return;
        } else
                (void) sd_event_source_set_time(mc->timer, when);
        (void) sd_event_source_set_enabled(mc->timer, SD_EVENT_ONESHOT);
}

static void update_hold(struct mconn *mc);

static int on_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct mconn *mc = ud;
        uint64_t now = now_mono();
        if (!mc->c)
                return 0;
        if (!mc->connected) {
                if (now >= mc->connect_deadline_usec)
                        return mconn_fail(mc, LOG_INFO, "no CONNECT within %llu ms",
                                          (unsigned long long) (mc->m->connect_timeout_usec / USEC_PER_MSEC)), 0;
        } else {
                if (mc->ka_timeout_usec > 0 && now >= mc->last_rx_usec + mc->ka_timeout_usec)
                        return mconn_fail(mc, LOG_INFO, "keep-alive timeout (nothing received for %llu s)",
                                          (unsigned long long) (mc->ka_timeout_usec / USEC_PER_SEC)), 0;
                if (mc->expiry_mono_usec && now >= mc->expiry_mono_usec)
                        return mconn_fail(mc, LOG_INFO, "the SAS token expired"), 0;
        }
        if (mc->throttle_until_usec && now >= mc->throttle_until_usec) {
                mc->throttle_until_usec = 0;
                update_hold(mc);
        }
        mconn_arm(mc);
        return 0;
}

/* ---- inbound acknowledgements ------------------------------------------------------------- */

static bool window_full(const struct mconn *mc) {
        return mc->ack_n >= mc->m->max_inflight;
}

static void update_hold(struct mconn *mc) {
        bool hold = window_full(mc) || mc->throttle_until_usec != 0;
        if (!mc->c || hold == mc->held)
                return;
        mc->held = hold;
        gw_net_conn_hold_input(mc->c, hold);
}

static struct ack_slot *ack_push(struct mconn *mc, uint16_t packet_id) {
        struct ack_slot *a = &mc->acks[(mc->ack_head + mc->ack_n) % mc->m->max_inflight];
        a->packet_id = packet_id;
        a->done = false;
        mc->ack_n++;
        return a;
}

/* Sends the PUBACKs that are due, in order. */
static void ack_flush(struct mconn *mc) {
        uint8_t buf[4 * 256]; /* a whole window of the default 16 leaves as one record */
        size_t n = 0;
        while (mc->ack_n > 0 && mc->acks[mc->ack_head].done) {
                struct ack_slot *a = &mc->acks[mc->ack_head];
                if (a->packet_id != 0) {
                        n += gw_mqtt_encode_puback(buf + n, a->packet_id);
                        mc->m->stats.messages_acked++;
                }
                mc->ack_head = (mc->ack_head + 1) % mc->m->max_inflight;
                mc->ack_n--;
                if (n + 4 > sizeof buf) {
                        (void) mconn_send(mc, buf, n);
                        n = 0;
                }
        }
        if (n > 0)
                (void) mconn_send(mc, buf, n);
        update_hold(mc);
}

/* Sends the due PUBACKs of every connection marked dirty: from the hub's after_dispatch hook
 * (right after the store completions that made them due, without another loop iteration),
 * or else from the flush_src defer source. */
static void flush_dirty(struct gw_mqtt *m) {
        struct mconn **list = m->dirty;
        size_t n = m->n_dirty;

        if (n == 0)
                return;
        if (m->flush_src)
                (void) sd_event_source_set_enabled(m->flush_src, SD_EVENT_OFF);
        m->dirty = NULL;
        m->n_dirty = m->dirty_cap = 0;
        for (size_t i = 0; i < n; i++) {
                struct mconn *mc = list[i];
                mc->ack_dirty = false;
                if (mc->c)
                        ack_flush(mc);
                mconn_unref(mc);
        }
        free(list);
}

static int on_ack_flush(sd_event_source *s, void *userdata) {
        flush_dirty(userdata);
        return 0;
}

static void after_dispatch(void *userdata) {
        flush_dirty(userdata);
}

static void schedule_ack_flush(struct mconn *mc) {
        struct gw_mqtt *m = mc->m;
        if (mc->ack_dirty)
                return;
        if (m->freeing || !m->flush_src)
                goto now;
        if (m->n_dirty == m->dirty_cap) {
                size_t cap = m->dirty_cap ? m->dirty_cap * 2 : 64;
                struct mconn **d = realloc(m->dirty, cap * sizeof *d);
                if (!d)
                        goto now;
                m->dirty = d;
                m->dirty_cap = cap;
        }
        if (sd_event_source_set_enabled(m->flush_src, SD_EVENT_ONESHOT) < 0)
                goto now;
        mc->ack_dirty = true;
        m->dirty[m->n_dirty++] = mconn_ref(mc);
        return;
now:
        ack_flush(mc);
}

/* ud: the message's ack_slot (see struct ack_slot). */
static void append_done(int result, uint64_t seq, void *ud) {
        struct ack_slot *a = ud;
        struct mconn *mc = a->mc;
        if (a == &mc->qos0) {
                if (result < 0)
                        gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                                    "A QoS 0 message of device %s could not be stored: %m", dev_name(mc));
        } else if (mc->c) {
                if (result < 0)
                        (void) mconn_fail(mc, LOG_WARNING, "the message could not be stored: %s", strerror(-result));
                else {
                        a->done = true;
                        schedule_ack_flush(mc);
                }
        }
        mconn_unref(mc);
}

/* ---- X.509 -------------------------------------------------------------------------------- */

/* Checks the client certificate of the connection against the registry entry d (reference
 * §1.8, gateway/auth-x509.c). Returns NULL when it is accepted, else the reason (for the log). */
static const char *check_x509(struct mconn *mc, const struct hub_device *d) {
        const uint8_t *der = NULL;
        size_t der_len = 0;
        const mbedtls_x509_crt *crt = gw_net_conn_get_peer_cert(mc->c);

        if (!crt || gw_net_conn_get_peer_cert_der(mc->c, &der, &der_len) < 0)
                return "no password and no client certificate";
        return gw_auth_x509_check(crt, der, der_len, d, mc->module_id, mc->m->have_ca ? &mc->m->ca_chain : NULL);
}

/* ---- session ops -------------------------------------------------------------------------- */

static uint16_t next_packet_id(struct mconn *mc) {
        for (;;) {
                uint16_t id = ++mc->next_packet_id;
                if (id == 0)
                        continue;
                bool used = false;
                for (unsigned i = 0; i < mc->c2d_n; i++)
                        if (mc->c2d[i].packet_id == id)
                                used = true;
                if (!used)
                        return id;
        }
}

static void c2d_pull(struct mconn *mc);

static int send_c2d(struct mconn *mc, struct hub_msg *msg, const char *lock_token) {
        _cleanup_free_ char *topic = NULL;
        int r = gw_mqtt_topic_c2d(mc->device_id, msg, &topic);
        if (r < 0)
                return r;
        size_t len;
        const void *body = hub_msg_body(msg, &len);
        if (mc->c2d_qos == 0) {
                r = mconn_publish(mc, topic, 0, 0, body, len);
                if (r >= 0) /* at most once: delivered = completed */
                        (void) hub_queue_complete(mc->m->hub->queue, mc->device_id, lock_token, now_wall(), NULL, NULL);
                return r;
        }
        struct c2d_slot *slot = &mc->c2d[mc->c2d_n];
        slot->packet_id = next_packet_id(mc);
        snprintf(slot->lock_token, sizeof slot->lock_token, "%s", lock_token);
        r = mconn_publish(mc, topic, 1, slot->packet_id, body, len);
        if (r >= 0)
                mc->c2d_n++;
        return r;
}

static int op_deliver_c2d(void *ud, struct hub_msg *msg, const char *lock_token) {
        struct mconn *mc = ud;
        if (!mconn_alive(mc))
                return -ENOTCONN;
        if (mc->c2d_n + mc->c2d_receiving >= mc->m->max_inflight)
                return -EAGAIN;
        return send_c2d(mc, msg, lock_token);
}

static void receive_done(int r, const struct hub_queue_delivery *d, void *ud) {
        struct mconn *mc = ud;
        mc->c2d_receiving--;
        if (!mconn_alive(mc) || !(mc->sub_kinds & (1u << GW_MQTT_FILTER_C2D))) {
                /* Gone or unsubscribed meanwhile: let the message go back at once (when the hub
                 * is stopping, its lock simply expires). */
                if (r >= 0 && d && mc->device_id && !mc->m->freeing)
                        (void) hub_queue_abandon(mc->m->hub->queue, mc->device_id, d->lock_token, now_wall(), NULL, NULL);
                mconn_unref(mc);
                return;
        }
        if (r < 0) {
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                            "Cannot read the C2D queue of %s: %m", dev_name(mc));
                mc->c2d_empty = true;
        } else if (!d)
                mc->c2d_empty = true;
        else {
                int s = send_c2d(mc, d->msg, d->lock_token);
                if (s < 0)
                        gw_log_full(LOG_WARNING, s, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                                    "Cannot deliver a C2D message to %s: %m", dev_name(mc));
                else
                        c2d_pull(mc);
        }
        mconn_unref(mc);
}

/* Keeps up to max_inflight C2D messages locked and in flight while subscribed. */
static void c2d_pull(struct mconn *mc) {
        while (mconn_alive(mc) && mc->connected && (mc->sub_kinds & (1u << GW_MQTT_FILTER_C2D)) && !mc->c2d_empty &&
               mc->c2d_n + mc->c2d_receiving < mc->m->max_inflight &&
               gw_net_conn_get_output_bytes(mc->c) < 256 * 1024) {
                int r = hub_queue_receive(mc->m->hub->queue, mc->device_id, 0, now_wall(), receive_done, mc);
                if (r < 0) {
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                                    "Cannot read the C2D queue of %s: %m", dev_name(mc));
                        return;
                }
                mconn_ref(mc);
                mc->c2d_receiving++;
                /* One at a time until the queue says it has more: an empty queue costs one read. */
                if (mc->c2d_n == 0)
                        break;
        }
}

void gw_mqtt_c2d_available(struct gw_mqtt *m, const char *device_id) {
        struct hub_session *s = hub_sessions_find(m->hub->sessions, device_id, NULL);
        struct mconn *mc = s ? hub_session_userdata(s) : NULL;
        if (!mc || mc->magic != MCONN_MAGIC || mc->m != m)
                return; /* not an MQTT session */
        mc->c2d_empty = false;
        c2d_pull(mc);
}

static int op_desired_patch(void *ud, const char *json_patch, int64_t version) {
        struct mconn *mc = ud;
        _cleanup_free_ char *topic = NULL;
        if (!mconn_alive(mc))
                return -ENOTCONN;
        int r = gw_mqtt_topic_twin_desired((uint64_t) version, &topic);
        if (r < 0)
                return r;
        return mconn_publish(mc, topic, 0, 0, json_patch, strlen(json_patch));
}

static int op_method_request(void *ud, const char *name, const char *json_payload, const char *request_id) {
        struct mconn *mc = ud;
        _cleanup_free_ char *topic = NULL;
        if (!mconn_alive(mc))
                return -ENOTCONN;
        int r = gw_mqtt_topic_method_request(name, request_id, &topic);
        if (r < 0)
                return r;
        return mconn_publish(mc, topic, 0, 0, json_payload, json_payload ? strlen(json_payload) : 0);
}

static void op_close(void *ud, int reason_errno, const char *why) {
        struct mconn *mc = ud;
        struct hub_session *s = mc->session;
        mc->session = NULL;
        mc->closed_by_hub = true;
        mc->m->stats.closed_by_hub++;
        if (mc->c)
                (void) mconn_fail(mc, LOG_NOTICE, "%s", why ? why : strerror(-reason_errno));
        hub_session_unregister(s);
}

static const struct hub_session_ops session_ops = {
        .version = HUB_SESSION_OPS_VERSION,
        .deliver_c2d = op_deliver_c2d,
        .desired_patch = op_desired_patch,
        .method_request = op_method_request,
        .close = op_close,
};

/* ---- CONNECT ------------------------------------------------------------------------------ */

static int connack(struct mconn *mc, uint8_t code) {
        uint8_t buf[4];
        size_t n = gw_mqtt_encode_connack(buf, false, code);
        return mconn_send(mc, buf, n);
}

static int refuse(struct mconn *mc, uint8_t code, const char *fmt, ...) _printf_(3, 4);
static int refuse(struct mconn *mc, uint8_t code, const char *fmt, ...) {
        char why[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, sizeof why, fmt, ap);
        va_end(ap);
        mc->m->stats.connects_refused++;
        if (code == GW_MQTT_CONNACK_BAD_USERNAME_PASSWORD || code == GW_MQTT_CONNACK_NOT_AUTHORIZED)
                mc->m->stats.auth_failures++;
        gw_log_full(LOG_NOTICE, 0,
                    GW_FIELDS(.component = "mqtt", .device = mc->device_id, .message_id = GW_MSG_AUTH_FAILED,
                              .event = "auth-failed"),
                    "MQTT %s: connection of device %s refused (CONNACK 0x%02x): %s", mc->peer, dev_name(mc), code, why);
        (void) connack(mc, code);
        mc->disconnecting = true;
        gw_net_conn_close(mc->c, true);
        return -ECONNABORTED;
}

static char *strndup_str(struct gw_mqtt_str s) {
        if (memchr(s.ptr, 0, s.len))
                return NULL;
        return strndup(s.ptr ? s.ptr : "", s.len);
}

static bool host_known(struct gw_mqtt *m, const char *host) {
        for (char *const *h = m->host_names; h && *h; h++)
                if (strcasecmp(*h, host) == 0)
                        return true;
        return false;
}

/* Whether a Will topic is the identity's own events topic. */
static bool will_topic_ok(struct mconn *mc, struct gw_mqtt_str topic) {
        struct gw_mqtt_topic t;
        _cleanup_free_ char *s = strndup_str(topic);
        if (!s || gw_mqtt_topic_parse(s, strlen(s), &t) < 0 || t.kind != GW_MQTT_TOPIC_EVENTS)
                return false;
        if (!gw_mqtt_str_eq(t.device_id, mc->device_id))
                return false;
        if (mc->module_id ? !t.module_id.ptr || !gw_mqtt_str_eq(t.module_id, mc->module_id) : t.module_id.ptr != NULL)
                return false;
        return true;
}

static int handle_connect(struct mconn *mc, const struct gw_mqtt_connect *cp) {
        struct gw_mqtt *m = mc->m;
        struct gw_mqtt_username u = {};
        struct hub_device dev = {};
        int r;

        if (!cp->has_username)
                return refuse(mc, GW_MQTT_CONNACK_BAD_USERNAME_PASSWORD, "no user name");
        r = gw_mqtt_username_parse(cp->username.ptr, cp->username.len, &u);
        if (r == -ENOMEM)
                return mconn_fail(mc, LOG_WARNING, "out of memory");
        if (r < 0)
                return refuse(mc, GW_MQTT_CONNACK_BAD_USERNAME_PASSWORD, "unparsable user name");
        mc->device_id = strdup(u.device_id);
        mc->module_id = u.module_id ? strdup(u.module_id) : NULL;
        mc->model_id = u.model_id ? strdup(u.model_id) : NULL;
        if (!mc->device_id || (u.module_id && !mc->module_id) || (u.model_id && !mc->model_id)) {
                gw_mqtt_username_done(&u);
                return mconn_fail(mc, LOG_WARNING, "out of memory");
        }
        bool host_ok = host_known(m, u.host);
        gw_mqtt_username_done(&u);
        if (!gw_mqtt_client_id_matches(cp->client_id, mc->device_id, mc->module_id))
                return refuse(mc, GW_MQTT_CONNACK_IDENTIFIER_REJECTED, "the client id is not the user name's identity");
        if (!hub_device_id_valid(mc->device_id) || (mc->module_id && !hub_device_id_valid(mc->module_id)))
                return refuse(mc, GW_MQTT_CONNACK_IDENTIFIER_REJECTED, "invalid device or module id");
        if (!host_ok)
                return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "the user name's host is not this hub's name");
        if (cp->will && !will_topic_ok(mc, cp->will_topic))
                return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "the Will topic is not the device's events topic");

        r = hub_registry_get(m->hub->registry, mc->device_id, &dev);
        bool known = r >= 0;
        if (r < 0 && r != -ENOENT) {
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                            "Cannot read the registry: %m");
                return refuse(mc, GW_MQTT_CONNACK_SERVER_UNAVAILABLE, "registry unavailable");
        }

        uint64_t expiry_usec = 0;
        if (cp->has_password) {
                _cleanup_free_ char *token = strndup_str(cp->password);
                if (!token || cp->password.len > HUB_SAS_TOKEN_MAX) {
                        hub_device_done(&dev);
                        return refuse(mc, GW_MQTT_CONNACK_BAD_USERNAME_PASSWORD, "malformed password");
                }
                struct hub_auth_request req = {
                        .token = token,
                        .host_names = (const char *const *) m->host_names,
                        .device_id = mc->device_id,
                        .module_id = mc->module_id,
                        .required_rights = HUB_RIGHT_DEVICE_CONNECT,
                        .now_usec = now_wall(),
                };
                struct hub_auth_result res = {};
                r = hub_auth_check_sas(m->hub->registry, &req, &res);
                hub_explicit_bzero(token, strlen(token));
                if (r < 0 && r != -EACCES) {
                        hub_device_done(&dev);
                        return refuse(mc, GW_MQTT_CONNACK_SERVER_UNAVAILABLE, "cannot check the token: %s", strerror(-r));
                }
                if (r == -EACCES) {
                        hub_device_done(&dev);
                        return refuse(mc,
                                      res.failure == HUB_AUTH_MALFORMED ? GW_MQTT_CONNACK_BAD_USERNAME_PASSWORD
                                                                        : GW_MQTT_CONNACK_NOT_AUTHORIZED,
                                      "SAS token refused: %s", hub_auth_failure_to_string(res.failure));
                }
                if (res.policy) {
                        /* A policy token acts for the device, which must exist and be enabled. */
                        if (!known || dev.status != HUB_DEVICE_ENABLED) {
                                hub_device_done(&dev);
                                return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "%s",
                                              known ? "the device is disabled" : "unknown device");
                        }
                        mc->auth_method = "{\"scope\":\"hub\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
                } else
                        mc->auth_method = mc->module_id
                                ? "{\"scope\":\"module\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}"
                                : "{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
                expiry_usec = res.expiry_usec;
        } else {
                if (!known) {
                        hub_device_done(&dev);
                        return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "unknown device");
                }
                if (dev.status != HUB_DEVICE_ENABLED) {
                        hub_device_done(&dev);
                        return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "the device is disabled");
                }
                if (mc->module_id) {
                        hub_device_done(&dev);
                        return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "X.509 is not supported for modules");
                }
                const char *why = check_x509(mc, &dev);
                if (why) {
                        hub_device_done(&dev);
                        return refuse(mc, GW_MQTT_CONNACK_NOT_AUTHORIZED, "X.509: %s", why);
                }
                mc->auth_method = "{\"scope\":\"device\",\"type\":\"x509\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
        }
        if (known)
                snprintf(mc->generation_id, sizeof mc->generation_id, "%s", dev.generation_id);
        hub_device_done(&dev);

        if (cp->will) {
                mc->will_topic = strndup_str(cp->will_topic);
                mc->will_payload = malloc(cp->will_payload.len ? cp->will_payload.len : 1);
                if (!mc->will_topic || !mc->will_payload)
                        return mconn_fail(mc, LOG_WARNING, "out of memory");
                if (cp->will_payload.len)
                        memcpy(mc->will_payload, cp->will_payload.ptr, cp->will_payload.len);
                mc->will_len = cp->will_payload.len;
                mc->will_retain = cp->will_retain;
                mc->will = true;
        }

        r = hub_sessions_register(m->hub->sessions, mc->device_id, mc->module_id,
                                  mc->generation_id[0] ? mc->generation_id : NULL, &session_ops, mc, &mc->session);
        if (r < 0)
                return refuse(mc, GW_MQTT_CONNACK_SERVER_UNAVAILABLE, "cannot register the session: %s", strerror(-r));

        /* Keep-alive: 1.5 x, capped (reference §2.2). */
        uint64_t now = now_mono();
        if (cp->keep_alive > 0) {
                uint64_t t = (uint64_t) cp->keep_alive * USEC_PER_SEC * MQTT_KEEP_ALIVE_FACTOR_NUM /
                             MQTT_KEEP_ALIVE_FACTOR_DEN;
                mc->ka_timeout_usec = t < m->max_ka_timeout_usec ? t : m->max_ka_timeout_usec;
        } else
                mc->ka_timeout_usec = m->max_ka_timeout_usec; /* 0 = "no keep-alive": still bounded */
        mc->last_rx_usec = now;
        if (expiry_usec && expiry_usec != UINT64_MAX) {
                uint64_t wall = now_wall();
                mc->expiry_mono_usec = expiry_usec <= wall ? now : now + (expiry_usec - wall);
        }
        mc->connected = true;
        m->stats.connects_accepted++;
        m->stats.sessions_open++;
        gw_log_full(LOG_INFO, 0,
                    GW_FIELDS(.component = "mqtt", .device = mc->device_id, .message_id = GW_MSG_DEVICE_CONNECTED,
                              .event = "device-connected"),
                    "MQTT %s: device %s%s%s connected (%s, keep-alive %u s)", mc->peer, mc->device_id,
                    mc->module_id ? "/" : "", mc->module_id ? mc->module_id : "",
                    cp->has_password ? "SAS" : "X.509", cp->keep_alive);
        mconn_arm(mc);
        return connack(mc, GW_MQTT_CONNACK_ACCEPTED);
}

/* ---- PUBLISH from the device ---------------------------------------------------------- */

static int stamp(struct mconn *mc, struct hub_msg *msg) {
        int r;
        if ((r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_DEVICE_ID, mc->device_id)) < 0 ||
            (mc->module_id && (r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_MODULE_ID, mc->module_id)) < 0) ||
            (mc->generation_id[0] &&
             (r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_AUTH_GENERATION_ID, mc->generation_id)) < 0) ||
            (r = hub_msg_set_sys(msg, HUB_SYS_CONNECTION_AUTH_METHOD, mc->auth_method)) < 0 ||
            (r = hub_msg_set_sys(msg, HUB_SYS_MESSAGE_SOURCE, "Telemetry")) < 0 ||
            (mc->model_id && (r = hub_msg_set_sys(msg, HUB_SYS_DATA_SCHEMA, mc->model_id)) < 0))
                return r;
        char t[32];
        return hub_msg_set_sys(msg, HUB_SYS_ENQUEUED_TIME, hub_time_format_iso8601(now_wall(), t));
}

/* Takes one token of the connection's rate; false when it must slow down. */
static bool throttle_take(struct mconn *mc) {
        uint32_t rate = mc->m->rate;
        if (rate == 0)
                return true;
        uint64_t now = now_mono();
        if (mc->tokens_at_usec == 0) {
                mc->tokens = rate;
                mc->tokens_at_usec = now;
        }
        mc->tokens += (double) (now - mc->tokens_at_usec) * rate / USEC_PER_SEC;
        if (mc->tokens > rate)
                mc->tokens = rate;
        mc->tokens_at_usec = now;
        mc->tokens -= 1;
        if (mc->tokens >= 0)
                return true;
        /* Traffic shaping (reference §10): stop reading until the bucket refills. */
        mc->throttle_until_usec = now + (uint64_t) (-mc->tokens * USEC_PER_SEC / rate) + 1;
        mc->m->stats.throttled++;
        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "mqtt", .device = mc->device_id, .event = "throttled"),
                    "MQTT: device %s sends more than %u messages/s; slowing it down", dev_name(mc), rate);
        update_hold(mc);
        mconn_arm(mc);
        return false;
}

static int d2c(struct mconn *mc, const struct gw_mqtt_topic *t, const struct gw_mqtt_publish *p) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *msg = NULL;
        int r = gw_mqtt_d2c_message(t, p->payload, p->payload_len, p->retain, &msg);
        if (r == -E2BIG)
                return mconn_fail(mc, LOG_NOTICE, "message larger than 256 KB");
        if (r == -ENOMEM)
                return mconn_fail(mc, LOG_WARNING, "out of memory");
        if (r < 0)
                return mconn_fail(mc, LOG_NOTICE, "malformed property bag");
        r = stamp(mc, msg);
        if (r < 0)
                return mconn_fail(mc, LOG_NOTICE, "message larger than 256 KB with the hub's properties");

        struct ack_slot *a = p->qos == 1 ? ack_push(mc, p->packet_id) : &mc->qos0;
        r = hub_outbox_append(mc->m->hub->outbox, msg, append_done, a);
        if (r < 0) {
                if (p->qos == 1)
                        mc->ack_n--;
                if (r == -ENOBUFS)
                        return mconn_fail(mc, LOG_WARNING, "the hub's message store is full");
                return mconn_fail(mc, LOG_WARNING, "cannot store the message: %s", strerror(-r));
        }
        mconn_ref(mc);
        mc->m->stats.messages_in++;
        mc->m->stats.messages_in_bytes += p->payload_len;
        return 0;
}

struct twin_ctx {
        struct mconn *mc;
        char *rid;
};

static void twin_error_body(int status, int code, const char *message, char **ret) {
        char t[32];
        json_t *j = json_pack("{s:i, s:s, s:s, s:s}", "errorCode", code, "trackingId", "", "message",
                              message ? message : "", "timestampUtc", hub_time_format_iso8601(now_wall(), t));
        *ret = j ? hub_json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        (void) status;
}

static void twin_respond(struct mconn *mc, int status, const char *rid, bool has_version, uint64_t version,
                         const char *body) {
        _cleanup_free_ char *topic = NULL;
        if (!mconn_alive(mc))
                return;
        if (gw_mqtt_topic_twin_response(status, gw_mqtt_str_from(rid), has_version, version, &topic) < 0)
                return;
        (void) mconn_publish(mc, topic, 0, 0, body, body ? strlen(body) : 0);
}

static void twin_fail(struct mconn *mc, const char *rid, int r, const char *error) {
        int status = 500, code = 500001;
        switch (r) {
        case -ENOENT: status = 404; code = 404001; break;
        case -EINVAL: case -EBADMSG: status = 400; code = 400004; break;
        case -E2BIG: status = 400; code = 400004; break;
        case -ESTALE: status = 412; code = 412002; break;
        case -EAGAIN: status = 429; code = 429001; break;
        }
        _cleanup_free_ char *body = NULL;
        twin_error_body(status, code, error ? error : strerror(-r), &body);
        twin_respond(mc, status, rid, false, 0, body);
}

static void reported_done(int result, json_t *twin, const char *error, void *ud) {
        struct twin_ctx *tc = ud;
        if (result < 0)
                twin_fail(tc->mc, tc->rid, result, error);
        else {
                json_t *v = json_object_get(json_object_get(json_object_get(twin, "properties"), "reported"), "$version");
                twin_respond(tc->mc, 204, tc->rid, true, (uint64_t) json_integer_value(v), NULL);
        }
        mconn_unref(tc->mc);
        free(tc->rid);
        free(tc);
}

static int twin_op(struct mconn *mc, const struct gw_mqtt_topic *t, const struct gw_mqtt_publish *p) {
        _cleanup_free_ char *rid = strndup_str(t->rid);
        if (!rid)
                return mconn_fail(mc, LOG_NOTICE, "malformed $rid");
        if (mc->module_id) {
                /* Module twins are not kept by this hub yet. */
                twin_fail(mc, rid, -ENOENT, "module twins are not supported");
                return 0;
        }
        if (t->kind == GW_MQTT_TOPIC_TWIN_GET) {
                json_t *view = NULL;
                int r = hub_twin_get_device_view(mc->m->hub->twins, mc->device_id, &view);
                if (r < 0) {
                        twin_fail(mc, rid, r, NULL);
                        return 0;
                }
                _cleanup_free_ char *body = hub_json_dumps(view, JSON_COMPACT | JSON_PRESERVE_ORDER);
                json_decref(view);
                if (!body)
                        return mconn_fail(mc, LOG_WARNING, "out of memory");
                twin_respond(mc, 200, rid, false, 0, body);
                return 0;
        }
        json_error_t je;
        json_t *patch = json_loadb((const char *) p->payload, p->payload_len, 0, &je);
        if (!patch || !json_is_object(patch)) {
                json_decref(patch);
                twin_fail(mc, rid, -EINVAL, "the reported properties patch must be a JSON object");
                return 0;
        }
        struct twin_ctx *tc = malloc(sizeof *tc);
        if (!tc) {
                json_decref(patch);
                return mconn_fail(mc, LOG_WARNING, "out of memory");
        }
        tc->mc = mconn_ref(mc);
        tc->rid = TAKE_PTR(rid);
        int r = hub_twin_update_reported(mc->m->hub->twins, mc->device_id, patch,
                                         t->has_version ? (int64_t) t->version : -1, reported_done, tc);
        json_decref(patch);
        if (r < 0) {
                twin_fail(mc, tc->rid, r, NULL);
                mconn_unref(mc);
                free(tc->rid);
                free(tc);
        }
        return 0;
}

static int method_response(struct mconn *mc, const struct gw_mqtt_topic *t, const struct gw_mqtt_publish *p) {
        _cleanup_free_ char *rid = strndup_str(t->rid);
        _cleanup_free_ char *body = NULL;
        if (!rid)
                return mconn_fail(mc, LOG_NOTICE, "malformed $rid");
        if (t->status < 0)
                return mconn_fail(mc, LOG_NOTICE, "negative method status");
        if (p->payload_len > 0) {
                body = strndup_str((struct gw_mqtt_str) { (const char *) p->payload, p->payload_len });
                if (!body)
                        return mconn_fail(mc, LOG_NOTICE, "method response with a NUL byte");
        }
        int r = hub_method_response(mc->m->hub->methods, mc->session, rid, t->status, body);
        if (r == -ENOENT)
                gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                            "MQTT: device %s answered an unknown method request %s, ignoring", dev_name(mc), rid);
        else if (r < 0)
                gw_log_full(LOG_NOTICE, r, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                            "MQTT: method response of device %s refused: %m", dev_name(mc));
        return 0;
}

static int handle_publish(struct mconn *mc, const struct gw_mqtt_publish *p) {
        struct gw_mqtt_topic t;
        int r = gw_mqtt_topic_parse(p->topic.ptr, p->topic.len, &t);
        if (r == -ENOENT)
                return mconn_fail(mc, LOG_NOTICE, "PUBLISH to an unknown topic \"%.*s\"", (int) MIN(p->topic.len, 200u),
                                  p->topic.ptr);
        if (r < 0)
                return mconn_fail(mc, LOG_NOTICE, "malformed topic \"%.*s\"", (int) MIN(p->topic.len, 200u), p->topic.ptr);
        if (mc->session)
                hub_session_touch(mc->session);

        if (t.kind == GW_MQTT_TOPIC_EVENTS) {
                if (!gw_mqtt_str_eq(t.device_id, mc->device_id) ||
                    (mc->module_id ? !t.module_id.ptr || !gw_mqtt_str_eq(t.module_id, mc->module_id)
                                   : t.module_id.ptr != NULL))
                        return mconn_fail(mc, LOG_NOTICE, "PUBLISH to another identity's topic \"%.*s\"",
                                          (int) MIN(p->topic.len, 200u), p->topic.ptr);
                if (!throttle_take(mc)) {
                        /* Still accepted: shaping holds further input, it does not drop this one. */
                }
                return d2c(mc, &t, p);
        }
        if (p->qos == 1) { /* twin / method topics: acknowledged at once, in order */
                struct ack_slot *a = ack_push(mc, p->packet_id);
                a->done = true;
        }
        if (t.kind == GW_MQTT_TOPIC_METHOD_RESPONSE)
                r = method_response(mc, &t, p);
        else
                r = twin_op(mc, &t, p);
        if (r >= 0 && p->qos == 1)
                ack_flush(mc);
        return r;
}

/* ---- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------- */

static unsigned caps_of(unsigned kinds) {
        unsigned caps = 0;
        if (kinds & (1u << GW_MQTT_FILTER_C2D))
                caps |= HUB_SESSION_C2D;
        if (kinds & (1u << GW_MQTT_FILTER_TWIN_DESIRED))
                caps |= HUB_SESSION_DESIRED;
        if (kinds & (1u << GW_MQTT_FILTER_METHODS))
                caps |= HUB_SESSION_METHODS;
        return caps;
}

static int handle_subscribe(struct mconn *mc, const struct gw_mqtt_packet *pk) {
        uint8_t codes[64];
        size_t n = 0, cursor = 0;
        struct gw_mqtt_str f;
        uint8_t qos;
        unsigned kinds = mc->sub_kinds;

        while (gw_mqtt_filter_next(pk, &cursor, &f, &qos)) {
                struct gw_mqtt_filter flt;
                if (n >= sizeof codes || gw_mqtt_filter_parse(f.ptr, f.len, &flt) < 0)
                        return mconn_fail(mc, LOG_NOTICE, "SUBSCRIBE to an unsupported filter \"%.*s\"",
                                          (int) MIN(f.len, 200u), f.ptr);
                bool own = true;
                switch (flt.kind) {
                case GW_MQTT_FILTER_C2D:
                        own = !mc->module_id && gw_mqtt_str_eq(flt.device_id, mc->device_id);
                        break;
                case GW_MQTT_FILTER_MODULE:
                case GW_MQTT_FILTER_MODULE_INPUTS:
                        own = mc->module_id && gw_mqtt_str_eq(flt.device_id, mc->device_id) &&
                              gw_mqtt_str_eq(flt.module_id, mc->module_id);
                        break;
                default:
                        break;
                }
                if (!own)
                        return mconn_fail(mc, LOG_NOTICE, "SUBSCRIBE to another identity's filter \"%.*s\"",
                                          (int) MIN(f.len, 200u), f.ptr);
                kinds |= 1u << flt.kind;
                if (flt.kind == GW_MQTT_FILTER_C2D)
                        mc->c2d_qos = gw_mqtt_granted_qos(qos);
                codes[n++] = gw_mqtt_granted_qos(qos);
        }
        if ((unsigned) __builtin_popcount(kinds) > MQTT_MAX_SUBSCRIPTIONS)
                return mconn_fail(mc, LOG_NOTICE, "more than %d subscriptions", MQTT_MAX_SUBSCRIPTIONS);
        bool c2d_new = !(mc->sub_kinds & (1u << GW_MQTT_FILTER_C2D)) && (kinds & (1u << GW_MQTT_FILTER_C2D));
        mc->sub_kinds = kinds;

        uint8_t buf[5 + 2 + sizeof codes];
        int len = gw_mqtt_encode_suback(pk->list.packet_id, codes, n, buf, sizeof buf);
        if (len < 0)
                return mconn_fail(mc, LOG_WARNING, "cannot encode SUBACK");
        int r = mconn_send(mc, buf, (size_t) len);
        if (r < 0)
                return r;
        /* After the SUBACK, so that a method call or a desired patch cannot overtake it. */
        if (mc->session)
                (void) hub_session_set_capabilities(mc->session, caps_of(kinds));
        if (c2d_new) {
                mc->c2d_empty = false;
                c2d_pull(mc);
        }
        return 0;
}

static int handle_unsubscribe(struct mconn *mc, const struct gw_mqtt_packet *pk) {
        size_t cursor = 0;
        struct gw_mqtt_str f;
        uint8_t qos;
        while (gw_mqtt_filter_next(pk, &cursor, &f, &qos)) {
                struct gw_mqtt_filter flt;
                if (gw_mqtt_filter_parse(f.ptr, f.len, &flt) == 0)
                        mc->sub_kinds &= ~(1u << flt.kind);
        }
        if (mc->session)
                (void) hub_session_set_capabilities(mc->session, caps_of(mc->sub_kinds));
        uint8_t buf[4];
        size_t n = gw_mqtt_encode_ack(buf, GW_MQTT_UNSUBACK, pk->list.packet_id);
        return mconn_send(mc, buf, n);
}

static int handle_puback(struct mconn *mc, uint16_t packet_id) {
        for (unsigned i = 0; i < mc->c2d_n; i++) {
                if (mc->c2d[i].packet_id != packet_id)
                        continue;
                int r = hub_queue_complete(mc->m->hub->queue, mc->device_id, mc->c2d[i].lock_token, now_wall(), NULL,
                                           NULL);
                if (r < 0)
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                                    "Cannot complete a C2D message of %s: %m", dev_name(mc));
                else
                        mc->m->stats.c2d_completed++;
                mc->c2d[i] = mc->c2d[--mc->c2d_n];
                c2d_pull(mc);
                return 0;
        }
        /* A PUBACK for a message whose lock was lost or that was already completed: harmless. */
        return 0;
}

/* ---- the connection ---------------------------------------------------------------------- */

static int handle_packet(struct mconn *mc, const struct gw_mqtt_packet *pk) {
        if (!mc->connected) {
                if (pk->type != GW_MQTT_CONNECT)
                        return mconn_fail(mc, LOG_NOTICE, "first packet is not CONNECT");
                return handle_connect(mc, &pk->connect);
        }
        mc->last_rx_usec = now_mono();
        switch (pk->type) {
        case GW_MQTT_PUBLISH:
                return handle_publish(mc, &pk->publish);
        case GW_MQTT_PUBACK:
                return handle_puback(mc, pk->ack.packet_id);
        case GW_MQTT_SUBSCRIBE:
                return handle_subscribe(mc, pk);
        case GW_MQTT_UNSUBSCRIBE:
                return handle_unsubscribe(mc, pk);
        case GW_MQTT_PINGREQ: {
                uint8_t buf[2];
                if (mc->session)
                        hub_session_touch(mc->session);
                return mconn_send(mc, buf, gw_mqtt_encode_pingresp(buf));
        }
        case GW_MQTT_DISCONNECT:
                mc->clean_disconnect = true;
                mc->disconnecting = true;
                gw_net_conn_close(mc->c, true);
                return 0;
        case GW_MQTT_CONNECT:
                return mconn_fail(mc, LOG_NOTICE, "second CONNECT");
        default:
                return mconn_fail(mc, LOG_NOTICE, "unexpected packet type %d", (int) pk->type);
        }
}

static int on_open(struct gw_net_conn *c) {
        struct gw_mqtt *m = gw_net_conn_get_userdata(c);
        struct mconn *mc = calloc(1, sizeof *mc);
        if (!mc)
                return -ENOMEM;
        mc->magic = MCONN_MAGIC;
        mc->n_ref = 1;
        mc->m = m;
        m->n_mconn++;
        mc->c = c;
        snprintf(mc->peer, sizeof mc->peer, "%s", gw_net_conn_get_peer(c));
        mc->acks = calloc(m->max_inflight, sizeof *mc->acks);
        mc->c2d = calloc(m->max_inflight, sizeof *mc->c2d);
        if (!mc->acks || !mc->c2d) {
                mconn_unref(mc);
                return -ENOMEM;
        }
        for (unsigned i = 0; i < m->max_inflight; i++)
                mc->acks[i].mc = mc;
        mc->qos0.mc = mc;
        mc->connect_deadline_usec = now_mono() + m->connect_timeout_usec;
        gw_net_conn_set_userdata(c, mc);
        m->stats.connections_accepted++;
        m->stats.connections_open++;
        mconn_arm(mc);
        return 0;
}

static ssize_t on_data(struct gw_net_conn *c, const uint8_t *data, size_t len) {
        struct mconn *mc = gw_net_conn_get_userdata(c);
        size_t used = 0;

        while (used < len) {
                if (mc->disconnecting)
                        return (ssize_t) len; /* closing: whatever follows is ignored */
                if (mc->connected && (window_full(mc) || mc->throttle_until_usec)) {
                        update_hold(mc);
                        break;
                }
                struct gw_mqtt_packet pk;
                size_t n = 0;
                int r = gw_mqtt_decode(data + used, len - used, mc->m->max_packet, &pk, &n);
                if (r == 0)
                        break;
                if (r < 0) {
                        mc->m->stats.protocol_errors++;
                        if (!mc->connected && r == -GW_MQTT_E_PROTOCOL_LEVEL)
                                return refuse(mc, GW_MQTT_CONNACK_BAD_PROTOCOL_VERSION, "protocol level is not 4"), (ssize_t) len;
                        if (!mc->connected && r == -GW_MQTT_E_CLIENT_ID)
                                return refuse(mc, GW_MQTT_CONNACK_IDENTIFIER_REJECTED, "empty client id"), (ssize_t) len;
                        (void) mconn_fail(mc, LOG_NOTICE, "%s", gw_mqtt_strerror(r));
                        return (ssize_t) len;
                }
                r = handle_packet(mc, &pk);
                used += n;
                if (r < 0 && r != -ECONNABORTED)
                        return r;
        }
        return (ssize_t) used;
}

static void inject_will(struct mconn *mc) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *msg = NULL;
        struct gw_mqtt_topic t;
        if (gw_mqtt_topic_parse(mc->will_topic, strlen(mc->will_topic), &t) < 0 ||
            gw_mqtt_d2c_message(&t, mc->will_payload, mc->will_len, mc->will_retain, &msg) < 0 ||
            hub_msg_set_prop(msg, "iothub-MessageType", "Will") < 0 || stamp(mc, msg) < 0) {
                gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "mqtt", .device = mc->device_id),
                            "MQTT: the Will message of device %s is invalid, dropping it", dev_name(mc));
                return;
        }
        mconn_ref(mc);
        if (hub_outbox_append(mc->m->hub->outbox, msg, append_done, &mc->qos0) < 0) {
                mconn_unref(mc);
                return;
        }
        mc->m->stats.wills++;
}

static void on_close(struct gw_net_conn *c, int reason) {
        struct mconn *mc = gw_net_conn_get_userdata(c);
        /* Before on_open (a failed or never-started TLS handshake) the userdata is still the
         * listener's, the struct gw_mqtt: nothing of ours to tear down. */
        if (!mc || mc->magic != MCONN_MAGIC)
                return;
        struct gw_mqtt *m = mc->m;
        mc->c = NULL;
        m->stats.connections_open--;
        mc->timer = sd_event_source_disable_unref(mc->timer);
        if (mc->connected) {
                m->stats.sessions_open--;
                if (!mc->clean_disconnect && !mc->closed_by_hub && mc->will && !m->freeing)
                        inject_will(mc);
                if (mc->c2d_n > 0 || mc->c2d_receiving > 0)
                        (void) hub_queue_release_device(m->hub->queue, mc->device_id, now_wall(), NULL, NULL);
                mc->c2d_n = 0;
                gw_log_full(LOG_INFO, reason,
                            GW_FIELDS(.component = "mqtt", .device = mc->device_id,
                                      .message_id = GW_MSG_DEVICE_DISCONNECTED, .event = "device-disconnected"),
                            "MQTT %s: device %s disconnected (%s)", mc->peer, dev_name(mc),
                            mc->clean_disconnect ? "DISCONNECT"
                            : reason == 0        ? "closed by the device"
                                                 : strerror(reason < 0 ? -reason : reason));
        }
        struct hub_session *s = mc->session;
        mc->session = NULL;
        hub_session_unregister(s);
        mconn_unref(mc);
}

static const struct gw_net_handler handler = {
        .on_open = on_open,
        .on_data = on_data,
        .on_close = on_close,
};

/* ---- set-up ------------------------------------------------------------------------------ */

/* The same IP list the service API gives gw_cert_ensure(), so that both share one certificate
 * (it is made again whenever its names change). */
static void cert_ips(char *const *listen, const char *ips[static 9], char hosts[8][64]) {
        size_t n = 0;
        for (size_t i = 0; listen && listen[i] && n < 8; i++) {
                const char *a = listen[i];
                const char *colon = strrchr(a, ':');
                if (!colon)
                        continue;
                size_t l = (size_t) (colon - a);
                if (a[0] == '[' && l >= 2) {
                        a++;
                        l -= 2;
                }
                if (l == 0 || l >= 64 || strncmp(a, "localhost", l) == 0)
                        continue;
                memcpy(hosts[n], a, l);
                hosts[n][l] = 0;
                ips[n] = hosts[n];
                n++;
        }
        ips[n] = NULL;
}

static int load_tls(struct gw_mqtt *m, const struct gw_config *cfg, const char *state_dir, char *const *host_names) {
        _cleanup_free_ char *cert = NULL, *key = NULL, *ca = NULL;
        const char *cert_file = cfg->mqtt_cert_file, *key_file = cfg->mqtt_key_file;
        if (!cert_file) {
                const char *ips[9];
                char hosts[8][64];
                cert_ips(cfg->api_enabled ? cfg->api_listen : cfg->mqtt_listen, ips, hosts);
                int r = gw_cert_ensure(state_dir, (const char *const *) host_names, ips, &cert, &key, &ca);
                if (r < 0)
                        return r;
                cert_file = cert;
                key_file = key;
                gw_log_info("MQTT uses the generated certificate %s; devices trust the CA in %s", cert, ca);
        }
        struct gw_tls_server_config tc = {
                .cert_file = cert_file,
                .key_file = key_file,
                .client_cert = GW_TLS_CLIENT_CERT_OPTIONAL, /* X.509 devices; judged at CONNECT */
        };
        return gw_tls_server_new(&tc, &m->tls);
}

int gw_mqtt_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, const char *state_dir,
                char *const *host_names, struct gw_mqtt **ret) {
        struct gw_mqtt *m = calloc(1, sizeof *m);
        int r;
        if (!m)
                return -ENOMEM;
        m->event = sd_event_ref(e);
        m->hub = hub;
        m->host_names = host_names;
        /* Off until a completion makes a PUBACK sendable (then one-shot). Without it every
         * PUBACK is sent at once; that is correct, only slower. */
        if (sd_event_add_defer(e, &m->flush_src, on_ack_flush, m) >= 0) {
                (void) sd_event_source_set_enabled(m->flush_src, SD_EVENT_OFF);
                /* Right after the store completions that made PUBACKs due, before the input
                 * of other connections already waiting in the same loop iteration. */
                (void) sd_event_source_set_priority(m->flush_src, SD_EVENT_PRIORITY_IMPORTANT);
        }
        m->max_inflight = cfg->mqtt_max_inflight ? cfg->mqtt_max_inflight : GW_CONFIG_MQTT_MAX_INFLIGHT_DEFAULT;
        m->max_packet = cfg->mqtt_max_packet_bytes ? cfg->mqtt_max_packet_bytes : GW_MQTT_DEVICE_MAX_PACKET;
        m->max_ka_timeout_usec = cfg->mqtt_max_keep_alive_timeout_usec;
        m->connect_timeout_usec = cfg->mqtt_connect_timeout_usec;
        m->rate = cfg->mqtt_max_messages_per_second;
        mbedtls_x509_crt_init(&m->ca_chain);

        for (size_t i = 0; cfg->x509_ca_files && cfg->x509_ca_files[i]; i++) {
                r = mbedtls_x509_crt_parse_file(&m->ca_chain, cfg->x509_ca_files[i]);
                if (r != 0) {
                        gw_log_error("Cannot load the X.509 CA file %s (hub.x509_ca_files[%zu]): mbedtls error -0x%04x",
                                     cfg->x509_ca_files[i], i, (unsigned) -r);
                        gw_mqtt_free(m);
                        return -EBADMSG;
                }
                m->have_ca = true;
        }

        if (cfg->mqtt_enabled) {
                if (!cfg->mqtt_allow_plaintext || cfg->mqtt_cert_file) {
                        r = load_tls(m, cfg, state_dir, host_names);
                        if (r < 0) {
                                gw_log_errno(LOG_ERR, r, "Cannot set up TLS for MQTT: %m");
                                gw_mqtt_free(m);
                                return r;
                        }
                }
                for (size_t i = 0; cfg->mqtt_listen && cfg->mqtt_listen[i] && i < MQTT_MAX_LISTENERS; i++) {
                        char path[64];
                        snprintf(path, sizeof path, "mqtt.listen[%zu]", i);
                        struct gw_net_listener_config lc = {
                                .address = cfg->mqtt_listen[i],
                                .config_path = path,
                                .tls = m->tls,
                                .allow_plaintext = cfg->mqtt_allow_plaintext,
                                .max_connections = cfg->mqtt_max_connections,
                                .max_connections_per_address = cfg->mqtt_max_connections_per_address,
                                .handshake_timeout_usec = cfg->mqtt_handshake_timeout_usec,
                                /* Keep-alive is ours (1.5 x, capped); the network idle timer is the backstop. */
                                .idle_timeout_usec = m->max_ka_timeout_usec + 30 * USEC_PER_SEC,
                                .max_input_bytes = m->max_packet + 64 * 1024,
                                .max_output_bytes = 512 * 1024,
                        };
                        r = gw_net_listener_new(e, &lc, &handler, m, &m->listeners[i]);
                        if (r < 0) {
                                gw_mqtt_free(m);
                                return r;
                        }
                        gw_log_info("MQTT listening on %s (port %u, %s)", cfg->mqtt_listen[i],
                                    gw_net_listener_get_port(m->listeners[i]), m->tls ? "TLS" : "plain TCP");
                }
        }
        hub->c2d_available = (void (*)(void *, const char *)) gw_mqtt_c2d_available;
        hub->c2d_available_ud = m;
        hub->after_dispatch = after_dispatch;
        hub->after_dispatch_ud = m;
        hub->mqtt_stats = &m->stats;
        *ret = m;
        return 0;
}

static struct mconn **mfree_dirty(struct mconn **d) {
        free(d);
        return NULL;
}

struct gw_mqtt *gw_mqtt_free(struct gw_mqtt *m) {
        if (!m)
                return NULL;
        m->freeing = true;
        m->n_mconn++; /* the connections closed below must not free m under us */
        m->flush_src = sd_event_source_disable_unref(m->flush_src);
        for (size_t i = 0; i < m->n_dirty; i++) {
                m->dirty[i]->ack_dirty = false;
                mconn_unref(m->dirty[i]);
        }
        m->dirty = mfree_dirty(m->dirty);
        m->n_dirty = m->dirty_cap = 0;
        if (m->hub && m->hub->after_dispatch_ud == m) {
                m->hub->after_dispatch = NULL;
                m->hub->after_dispatch_ud = NULL;
        }
        if (m->hub && m->hub->c2d_available_ud == m) {
                m->hub->c2d_available = NULL;
                m->hub->c2d_available_ud = NULL;
                m->hub->mqtt_stats = NULL;
        }
        for (size_t i = 0; i < MQTT_MAX_LISTENERS; i++)
                m->listeners[i] = gw_net_listener_free(m->listeners[i]);
        m->tls = gw_tls_server_unref(m->tls);
        mbedtls_x509_crt_free(&m->ca_chain);
        m->event = sd_event_unref(m->event);
        m->hub = NULL;
        if (--m->n_mconn == 0)
                free(m); /* else the last connection object frees it */
        return NULL;
}

uint16_t gw_mqtt_get_port(const struct gw_mqtt *m, size_t i) {
        return m && i < MQTT_MAX_LISTENERS && m->listeners[i] ? gw_net_listener_get_port(m->listeners[i]) : 0;
}

const struct gw_mqtt_stats *gw_mqtt_get_stats(const struct gw_mqtt *m) {
        return &m->stats;
}

void gw_mqtt_reconfigure(struct gw_mqtt *m, const struct gw_config *cfg, char *const *host_names) {
        m->host_names = host_names;
        if (cfg->mqtt_max_messages_per_second != m->rate) {
                m->rate = cfg->mqtt_max_messages_per_second;
                gw_log_info("MQTT: max_messages_per_second is now %u", m->rate);
        }
        gw_log_info("MQTT: listeners, TLS material and the other limits change only after a restart");
}
