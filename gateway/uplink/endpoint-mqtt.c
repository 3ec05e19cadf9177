/* SPDX-License-Identifier: MIT */
/* The mqtt endpoint: any MQTT 3.1.1 broker through paho.mqtt.c's MQTTAsync, with
 * MQTTCLIENT_PERSISTENCE_NONE (the outbox is the persistence), QoS 1, optional TLS with a
 * CA file and a client certificate, user name + password from a key file. The topic is a
 * template: {deviceId}, {moduleId}, {endpoint}, or {name} for an application property
 * (an absent one expands to nothing; '/', '+', '#' in values become '_').
 *
 * paho calls back from its own threads. Those callbacks only post a small record to the
 * shared paho inbox (paho-inbox.h: a mutex-protected list and an eventfd); the loop takes the
 * records and calls the framework. A publish's token maps back to its sequence number on the
 * loop thread, and the cursor moves only on the publish's success callback (PUBACK). Every
 * connection after the first gets a new paho client (gw_paho_client_renew(), paho-inbox.h):
 * paho would send what an old client still had queued ahead of the resend from the cursor.
 *
 * Publish confirmations are the hot path (one per message): the success callback only
 * appends the token to an array under the lock, and posts one EV_ACKS record (one eventfd
 * write, one wakeup of the loop) when the array was empty; the loop takes the whole array.
 * Tokens in flight are kept in send order (a ring): the broker acknowledges in order, so the
 * token looked up is nearly always the oldest. */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <MQTTAsync.h>
#include <systemd/sd-event.h>

#include "endpoint.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "log.h"
#include "paho-inbox.h"

enum ev_kind { EV_CONNECTED, EV_CONNECT_FAILED, EV_LOST, EV_ACKS, EV_PUB_FAILED };

struct mqtt_ev {
        struct gw_paho_item item;
        enum ev_kind kind;
        unsigned gen;
        int token, code;
};

#define MQTT_CTX_RING 64u

struct pending {
        int token;
        uint64_t seq;
};

struct mqtt_ep {
        struct gw_endpoint *ep;
        MQTTAsync client;
        char *address, *client_id, *topic, *username, *password, *ca_file, *cert_file, *key_file;
        unsigned qos, window;
        int keep_alive_sec, timeout_sec;
        unsigned gen;      /* connection generation: stale connect / lost events are ignored */
        bool connected;
        bool client_used;  /* client has made a connection attempt (the next one gets a new client) */
        struct gw_paho_inbox *inbox;
        pthread_mutex_t lock;
        struct conn_ctx {
                struct mqtt_ep *m;
                unsigned gen;
        } ctx[MQTT_CTX_RING];  /* connect and publish callbacks' contexts, see on_connect_ok() */
        unsigned ack_gen;      /* under lock: the connection whose PUBACKs are recorded */
        int *acks;             /* under lock: tokens of PUBACKs not yet taken by the loop */
        size_t n_acks, cap_acks;
        bool acks_oom;         /* under lock: an ack could not be recorded */
        /* token → seq of publishes in flight, in send order (loop thread only): a ring */
        struct pending *pend;
        size_t pend_head, n_pend, cap_pend;
};

static void post(struct mqtt_ep *m, enum ev_kind kind, unsigned gen, int token, int code) {
        struct mqtt_ev *e = malloc(sizeof *e);
        if (!e)
                return; /* the connection is then considered stuck by keep-alive / resend */
        *e = (struct mqtt_ev) { .kind = kind, .gen = gen, .token = token, .code = code };
        gw_paho_inbox_post(m->inbox, &e->item);
}

/* ---- paho's threads --------------------------------------------------------------------- */

/* The connect callbacks' context (struct conn_ctx, in mqtt_ep) carries the attempt's
 * generation. It lives as long as the client: paho 1.3.12 may call a connect's callbacks more
 * than once (onSuccess and later onFailure, or onFailure twice: eclipse-paho/paho.mqtt.c
 * #972, #1341), so a context freed in the first callback would be used after free by the
 * second. The contexts are a ring reused MQTT_CTX_RING attempts later, long after paho
 * forgot the attempt; a repeated callback carries its attempt's generation and is ignored
 * by the loop unless it is the current attempt's. */

static void on_connect_ok(void *context, MQTTAsync_successData *resp) {
        struct conn_ctx *c = context;
        post(c->m, EV_CONNECTED, c->gen, 0, 0);
}

static void on_connect_fail(void *context, MQTTAsync_failureData *resp) {
        struct conn_ctx *c = context;
        post(c->m, EV_CONNECT_FAILED, c->gen, 0, resp ? resp->code : -1);
}

static void on_lost(void *context, char *cause) {
        struct mqtt_ep *m = context;
        post(m, EV_LOST, 0, 0, 0); /* gen 0: applies to the current connection */
}

static int on_arrived(void *context, char *topic, int topic_len, MQTTAsync_message *msg) {
        MQTTAsync_freeMessage(&msg);
        MQTTAsync_free(topic);
        return 1;
}

/* A publish's context is its connection's conn_ctx: paho numbers publishes (the tokens) per
 * connection from 1 again, so a late confirmation of an earlier connection would otherwise
 * confirm whatever the current one sent under the same number. */
static void on_pub_ok(void *context, MQTTAsync_successData *resp) {
        struct conn_ctx *c = context;
        struct mqtt_ep *m = c->m;
        bool first;
        pthread_mutex_lock(&m->lock);
        if (c->gen != m->ack_gen) {
                pthread_mutex_unlock(&m->lock);
                return;
        }
        first = m->n_acks == 0 && !m->acks_oom;
        if (m->n_acks == m->cap_acks) {
                size_t cap = m->cap_acks ? m->cap_acks * 2 : 256;
                int *a = realloc(m->acks, cap * sizeof *a);
                if (a) {
                        m->acks = a;
                        m->cap_acks = cap;
                }
        }
        if (m->n_acks < m->cap_acks)
                m->acks[m->n_acks++] = resp ? resp->token : 0;
        else
                m->acks_oom = true; /* the loop treats it as a lost connection: resent */
        pthread_mutex_unlock(&m->lock);
        if (first)
                post(m, EV_ACKS, 0, 0, 0);
}

static void on_pub_fail(void *context, MQTTAsync_failureData *resp) {
        struct conn_ctx *c = context;
        post(c->m, EV_PUB_FAILED, c->gen, resp ? resp->token : 0, resp ? resp->code : -1);
}

/* ---- the loop ---------------------------------------------------------------------------- */

static struct pending *pend_at(struct mqtt_ep *m, size_t i) {
        return &m->pend[(m->pend_head + i) & (m->cap_pend - 1)];
}

/* Finds and removes token (a taken entry becomes token 0, and the taken entries at the front
 * are dropped). paho's tokens are the MQTT packet ids: 1..65535, unique while in flight. */
static bool take_pending(struct mqtt_ep *m, int token, uint64_t *ret_seq) {
        if (token == 0)
                return false;
        for (size_t i = 0; i < m->n_pend; i++) {
                struct pending *p = pend_at(m, i);
                if (p->token != token)
                        continue;
                *ret_seq = p->seq;
                p->token = 0;
                while (m->n_pend > 0 && pend_at(m, 0)->token == 0) {
                        m->pend_head = (m->pend_head + 1) & (m->cap_pend - 1);
                        m->n_pend--;
                }
                return true;
        }
        return false;
}

static int push_pending(struct mqtt_ep *m, int token, uint64_t seq) {
        if (m->n_pend == m->cap_pend) {
                size_t cap = m->cap_pend ? m->cap_pend * 2 : 256; /* a power of two */
                struct pending *p = malloc(cap * sizeof *p);
                if (!p)
                        return -ENOMEM;
                for (size_t i = 0; i < m->n_pend; i++)
                        p[i] = *pend_at(m, i);
                free(m->pend);
                m->pend = p;
                m->cap_pend = cap;
                m->pend_head = 0;
        }
        *pend_at(m, m->n_pend++) = (struct pending) { .token = token, .seq = seq };
        return 0;
}

static void take_acks(struct mqtt_ep *m) {
        int *acks;
        size_t n;
        bool oom;
        pthread_mutex_lock(&m->lock);
        acks = m->acks;
        n = m->n_acks;
        oom = m->acks_oom;
        m->acks = NULL;
        m->n_acks = m->cap_acks = 0;
        m->acks_oom = false;
        pthread_mutex_unlock(&m->lock);
        for (size_t i = 0; i < n; i++) {
                uint64_t seq;
                if (take_pending(m, acks[i], &seq))
                        gw_endpoint_confirm(m->ep, seq, 0);
        }
        free(acks);
        if (oom && m->connected) {
                m->connected = false;
                gw_endpoint_down(m->ep, -ENOMEM, "out of memory recording a confirmation");
        }
}

static void free_ev(struct gw_paho_item *it) {
        free(it);
}

static void on_inbox(void *ud, struct gw_paho_item *it) {
        struct mqtt_ep *m = ud;
        struct mqtt_ev *e = (struct mqtt_ev *) it;
        uint64_t seq;
        char why[128];
        switch (e->kind) {
        case EV_CONNECTED:
                if (e->gen == m->gen) {
                        m->connected = true;
                        gw_endpoint_up(m->ep);
                }
                break;
        case EV_CONNECT_FAILED:
                /* (Once connected, a late failure callback of the same attempt is paho's double
                 * callback: a lost connection comes as EV_LOST.) */
                if (e->gen == m->gen && !m->connected) {
                        snprintf(why, sizeof why, "cannot connect to %s (paho code %d)", m->address, e->code);
                        gw_endpoint_down(m->ep, -ECONNREFUSED, why);
                }
                break;
        case EV_LOST:
                if (m->connected) {
                        m->connected = false;
                        snprintf(why, sizeof why, "connection to %s lost", m->address);
                        gw_endpoint_down(m->ep, -ECONNRESET, why);
                }
                break;
        case EV_ACKS:
                take_acks(m);
                break;
        case EV_PUB_FAILED:
                if (e->gen == m->gen && take_pending(m, e->token, &seq) && m->connected) {
                        snprintf(why, sizeof why, "publish failed (paho code %d)", e->code);
                        m->connected = false;
                        gw_endpoint_down(m->ep, -EIO, why);
                }
                break;
        }
}

static char *dup_or_null(const char *s) {
        return s ? strdup(s) : NULL;
}

static void mqtt_destroy(void *t);

static struct gw_paho_client_conf client_conf(struct mqtt_ep *m) {
        return (struct gw_paho_client_conf) {
                .uri = m->address,
                .client_id = m->client_id,
                .mqtt_version = MQTTVERSION_DEFAULT,
                .max_buffered = (int) m->window,
                .context = m,
                .lost = on_lost,
                .arrived = on_arrived,
        };
}

static int mqtt_create(struct gw_endpoint *ep, const struct gw_endpoint_conf *c, void **ret) {
        struct mqtt_ep *m = calloc(1, sizeof *m);
        char cid[96];
        int r;
        if (!m)
                return -ENOMEM;
        m->ep = ep;
        pthread_mutex_init(&m->lock, NULL);
        if (!c->client_id) {
                char host[64] = "fieldhub";
                (void) gethostname(host, sizeof host - 1);
                host[sizeof host - 1] = 0;
                snprintf(cid, sizeof cid, "fieldhub-%s-%s", host, c->name);
        }
        /* Accept mqtt:// and mqtts:// as spellings of tcp:// and ssl://. */
        if (strncmp(c->address, "mqtts://", 8) == 0)
                r = asprintf(&m->address, "ssl://%s", c->address + 8);
        else if (strncmp(c->address, "mqtt://", 7) == 0)
                r = asprintf(&m->address, "tcp://%s", c->address + 7);
        else
                r = (m->address = strdup(c->address)) ? 0 : -1;
        m->client_id = strdup(c->client_id ? c->client_id : cid);
        m->topic = strdup(c->topic);
        m->username = dup_or_null(c->username);
        m->password = dup_or_null(c->password);
        m->ca_file = dup_or_null(c->ca_file);
        m->cert_file = dup_or_null(c->cert_file);
        m->key_file = dup_or_null(c->key_file);
        m->qos = c->qos;
        m->window = c->inflight;
        m->keep_alive_sec = (int) (c->keep_alive_usec / USEC_PER_SEC);
        m->timeout_sec = (int) ((c->timeout_usec + USEC_PER_SEC - 1) / USEC_PER_SEC);
        if (r < 0 || !m->address || !m->client_id || !m->topic || (c->username && !m->username) ||
            (c->password && !m->password)) {
                mqtt_destroy(m);
                return -ENOMEM;
        }
        if (m->password)
                (void) gw_log_add_secret(m->password);
        r = gw_paho_inbox_new(gw_endpoint_event(ep), on_inbox, free_ev, m, &m->inbox);
        if (r < 0) {
                mqtt_destroy(m);
                return r;
        }
        struct gw_paho_client_conf pc = client_conf(m);
        r = gw_paho_client_new(&pc, &m->client);
        if (r != MQTTASYNC_SUCCESS) {
                gw_log_error("Endpoint %s: paho cannot create a client for %s (code %d)", c->name, m->address, r);
                mqtt_destroy(m);
                return -EINVAL;
        }
        /* paho formats every packet it sends or receives into its in-memory trace (a vsnprintf
         * and a time stamp, ~15 % of its cost per message) at its default level; nobody reads
         * that trace unless MQTT_C_CLIENT_TRACE* asks for it. (Process-wide; paho's own
         * initialisation in the first create honours the environment, so this comes after.) */
        if (!getenv("MQTT_C_CLIENT_TRACE") && !getenv("MQTT_C_CLIENT_TRACE_LEVEL"))
                MQTTAsync_setTraceLevel(MQTTASYNC_TRACE_ERROR);
        *ret = m;
        return 0;
}

/* Whatever is under way belongs to an earlier connection from now on: its publishes are
 * forgotten and its confirmations dropped (loop thread). */
static void new_generation(struct mqtt_ep *m) {
        m->gen++;
        m->n_pend = 0;
        pthread_mutex_lock(&m->lock);
        m->ack_gen = m->gen;
        m->n_acks = 0;
        m->acks_oom = false;
        pthread_mutex_unlock(&m->lock);
}

static int mqtt_connect(void *t) {
        struct mqtt_ep *m = t;
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer;
        MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
        new_generation(m);
        if (m->client_used) {
                /* A new client, so nothing the last one still had queued goes out first
                 * (paho-inbox.h). */
                struct gw_paho_client_conf pc = client_conf(m);
                int r = gw_paho_client_renew(&pc, &m->client);
                if (r != MQTTASYNC_SUCCESS) {
                        char why[128];
                        snprintf(why, sizeof why, "paho cannot create a client for %s (code %d)", m->address, r);
                        gw_endpoint_down(m->ep, -ENOMEM, why);
                        return 0;
                }
        }
        m->client_used = true;
        struct conn_ctx *c = &m->ctx[m->gen % MQTT_CTX_RING];
        *c = (struct conn_ctx) { .m = m, .gen = m->gen };
        o.keepAliveInterval = m->keep_alive_sec;
        o.cleansession = 1;
        o.connectTimeout = m->timeout_sec;
        o.maxInflight = (int) m->window;
        o.onSuccess = on_connect_ok;
        o.onFailure = on_connect_fail;
        o.context = c;
        o.username = m->username;
        o.password = m->password;
        if (strncmp(m->address, "ssl://", 6) == 0) {
                ssl.trustStore = m->ca_file;
                ssl.keyStore = m->cert_file;
                ssl.privateKey = m->key_file;
                ssl.enableServerCertAuth = 1;
                ssl.verify = 1;
                o.ssl = &ssl;
        }
        gw_log_full(LOG_DEBUG, 0, GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name(m->ep)),
                    "Endpoint %s: connecting to %s", gw_endpoint_name(m->ep), m->address);
        int r = MQTTAsync_connect(m->client, &o);
        if (r != MQTTASYNC_SUCCESS) {
                char why[128];
                snprintf(why, sizeof why, "paho refused to connect to %s (code %d)", m->address, r);
                gw_endpoint_down(m->ep, -EIO, why);
        } else
                gw_paho_inbox_wake_receiver(m->inbox); /* else paho notices the socket up to 1 s later */
        return 0;
}

static void expand_topic(const struct mqtt_ep *m, const struct gw_ep_item *it, char *out, size_t size) {
        size_t o = 0;
        for (const char *p = m->topic; *p && o + 1 < size; p++) {
                if (*p != '{') {
                        out[o++] = *p;
                        continue;
                }
                const char *end = strchr(p, '}');
                char field[128];
                size_t fl = (size_t) (end - p - 1);
                if (fl >= sizeof field)
                        fl = sizeof field - 1;
                memcpy(field, p + 1, fl);
                field[fl] = 0;
                const char *v = NULL;
                if (streq(field, "deviceId"))
                        v = it->device_id;
                else if (streq(field, "moduleId"))
                        v = it->module_id;
                else if (streq(field, "endpoint"))
                        v = gw_endpoint_name(m->ep);
                else
                        v = hub_msg_get_prop(it->msg, field, NULL);
                for (; v && *v && o + 1 < size; v++)
                        out[o++] = (*v == '/' || *v == '+' || *v == '#') ? '_' : *v;
                p = end;
        }
        out[o] = 0;
}

/* The framework logs "send failed: %m" for what MQTTAsync_send() refused: paho already saw the
 * connection go (its loss callback is on the way), or its window is full. */
static int send_errno(int paho_code) {
        switch (paho_code) {
        case MQTTASYNC_DISCONNECTED:
                return -ENOTCONN;
        case MQTTASYNC_MAX_MESSAGES_INFLIGHT:
        case MQTTASYNC_MAX_BUFFERED_MESSAGES:
                return -ENOBUFS;
        default:
                return -EIO;
        }
}

static int mqtt_send(void *t, const struct gw_ep_item *items, size_t n) {
        struct mqtt_ep *m = t;
        char topic[1024];
        if (!m->connected)
                return -ENOTCONN;
        for (size_t i = 0; i < n; i++) {
                MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
                size_t len;
                const void *body = hub_msg_body(items[i].msg, &len);
                ro.onSuccess = on_pub_ok;
                ro.onFailure = on_pub_fail;
                ro.context = &m->ctx[m->gen % MQTT_CTX_RING];
                expand_topic(m, &items[i], topic, sizeof topic);
                int r = MQTTAsync_send(m->client, topic, (int) len, body, (int) m->qos, 0, &ro);
                if (r != MQTTASYNC_SUCCESS) {
                        gw_log_full(LOG_DEBUG, 0, GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name(m->ep)),
                                    "paho refused a publish (code %d)", r);
                        m->connected = false;
                        return send_errno(r);
                }
                if (push_pending(m, ro.token, items[i].seq) < 0) {
                        m->connected = false; /* its confirmation could not be matched: resend */
                        return -ENOMEM;
                }
        }
        return 0;
}

static void mqtt_disconnect(void *t) {
        struct mqtt_ep *m = t;
        m->connected = false;
        if (m->client && MQTTAsync_isConnected(m->client)) {
                MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
                d.timeout = 0;
                (void) MQTTAsync_disconnect(m->client, &d);
        }
        new_generation(m);
}

static void mqtt_destroy(void *t) {
        struct mqtt_ep *m = t;
        if (m->client)
                MQTTAsync_destroy(&m->client);
        m->inbox = gw_paho_inbox_free(m->inbox);
        pthread_mutex_destroy(&m->lock);
        free(m->address);
        free(m->client_id);
        free(m->topic);
        free(m->username);
        if (m->password) {
                hub_explicit_bzero(m->password, strlen(m->password));
                free(m->password);
        }
        free(m->ca_file);
        free(m->cert_file);
        free(m->key_file);
        free(m->pend);
        free(m->acks);
        free(m);
}

const struct gw_endpoint_ops gw_endpoint_mqtt_ops = {
        .type = "mqtt",
        .create = mqtt_create,
        .connect = mqtt_connect,
        .send = mqtt_send,
        .disconnect = mqtt_disconnect,
        .destroy = mqtt_destroy,
};
