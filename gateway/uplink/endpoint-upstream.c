/* SPDX-License-Identifier: MIT */
/* The upstream endpoint: a cloud IoT hub (IoT Hub itself, or anything that speaks its MQTT
 * device protocol, reference §2) to which every configured local device connects as itself,
 * over TLS, with its upstream key (transparent gateway, reference §9).
 *
 * One paho MQTTAsync client per device (client id = device id, user name
 * `{host}/{id}/?api-version=2021-04-12&DeviceClientType=fieldhub%2F0.1`, password a SAS token
 * for `{host}/devices/{id}` valid for token_ttl and renewed at 80% of it by reconnecting),
 * MQTTCLIENT_PERSISTENCE_NONE (the outbox is the persistence), clean session. The devices'
 * connections open when the endpoint starts and stay open: a device must be reachable from
 * the cloud (C2D into its local queue, methods, desired properties) also while it is offline
 * here. Each connection retries on its own with exponential backoff and ±25% jitter, and
 * each attempt after the first gets a new paho client (gw_paho_client_renew(), paho-inbox.h:
 * paho would send what an old client still had queued ahead of the resend).
 *
 * Reconnecting after an outage: retry.max is long (10 s by default: one connection per device
 * to a cloud that throttles new connections), so while devices wait after a transport failure
 * (not a CONNACK refusal) the endpoint probes the cloud's address every 100 ms with a
 * non-blocking TCP connect on the loop, closed as soon as it is answered (no TLS, no MQTT:
 * nothing the cloud counts as a connection attempt; the probe is the framework's,
 * gw_tcp_probe in endpoint.h). Once a probe that had failed succeeds, every waiting device
 * retries at once (the first at once, the others spread over 20 ms per device, at most
 * 500 ms) and "upstream NAME reachable again after Xs" is logged: once per outage (the next
 * outage begins after a device connected again). An address that answers from the first
 * probe on (the cloud dropped a connection, or refuses above TCP) leaves the backoff alone.
 * paho's receive thread would notice a new connection's socket only after its 1 s poll
 * returns (when none of the process's paho connections has traffic); every connect therefore
 * wakes it (gw_paho_inbox_wake_receiver(), paho-inbox.h), so the first message reaches the
 * cloud a few tens of milliseconds after the TLS handshake and CONNACK, and at most one probe
 * period plus that after the cloud is back.
 *
 * Up (the framework hands messages in order; each device has its own queue):
 *   - device messages (iothub-message-source Telemetry): QoS 1 publish to
 *     devices/{id}/messages/events/{bag}; confirmed on paho's success callback (PUBACK);
 *   - twin-change events (route `source: TwinChangeEvents` to this endpoint): their
 *     properties.reported part (without `$` keys) is sent, in order, as
 *     $iothub/twin/PATCH/properties/reported/?$rid=r{n}; confirmed by the 2xx twin response.
 *     Events with no reported change (desired, tags) are skipped;
 *   - anything else (module messages, other sources, devices without an upstream identity)
 *     can never be sent upstream as its device: counted as poison and skipped.
 *   A device whose connection drops keeps its queue; what was sent and not confirmed is sent
 *   again once it is back (at-least-once, in order per device).
 *
 * Down:
 *   - C2D (devices/{id}/messages/devicebound/#, QoS 1): the message goes into the device's
 *     durable local queue (hub_queue_send) and reaches the device when it next connects.
 *     C2D durability: paho.mqtt.c 1.3.x calls the arrival callback from its receive thread
 *     *before* it sends the PUBACK (MQTTProtocol_handlePublishes: Protocol_processPublication,
 *     then the PUBACK, whatever the callback returned: 0 only makes paho call it again from
 *     its memory), and with its global mutex held, which every paho call of the process
 *     (the loop's too) waits for. So the callback cannot wait for the loop's enqueue (a
 *     deadlock) but can make the message durable itself: it writes it to its own file in
 *     the endpoint's spool (<state>/upstream-NAME.c2d/, file and directory fsync'ed) before
 *     returning, and only then does the PUBACK leave. The loop queues it and removes the file
 *     once committed; the next start queues whatever is left (a crash or stop in between;
 *     a torn file was never acknowledged and is removed). A store failure that may pass
 *     (disk full, I/O, busy) leaves the file, queued again 5 s later (and at the next start;
 *     the device's C2D order may then change); a refusal that never passes
 *     (unknown device, queue full) is logged as a loss. Redeliveries (the PUBACK lost on a
 *     dropped connection, or a crash between the spool and the PUBACK) carry the same
 *     message id: the last 64 ids per device are remembered (also those queued from the
 *     spool) and a repeat is dropped; beyond that, at-least-once. The two fsyncs hold paho's
 *     mutex for their duration, once per C2D message (which IoT Hub limits to a few per
 *     device and minute);
 *   - direct methods ($iothub/methods/POST/#): invoked on the local session; its answer is
 *     published as $iothub/methods/res/{status}/?$rid=. A device that is not online here is
 *     answered like the Edge hub does: status 404 with {"errorCode":404103,...DeviceNotOnline};
 *     no answer in time: 504 with 504101 GatewayTimeout;
 *   - desired properties belong to the cloud: after every (re)connect the twin is fetched
 *     ($iothub/twin/GET) and the difference to the local desired properties applied locally
 *     (keys missing upstream are deleted locally); live notifications newer than the fetched
 *     version are applied as they come.
 *
 * Start-up also makes the local identity of every configured device use the same key (created
 * when missing), so one connection string works both here and in the cloud. With
 * create_missing, a device the cloud refuses (CONNACK 5) is created there once through the
 * registry REST API (PUT /devices/{id}, reference §5.2, a policy token) on a short-lived
 * thread (blocking libcurl, 10 s at most, joined on destroy), then reconnects. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <MQTTAsync.h>
#include <curl/curl.h>
#include <jansson.h>
#include <systemd/sd-event.h>

#include "endpoint.h"
#include "front/mqtt-topic.h"
#include "hub.h"
#include "hub/auth.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/method.h"
#include "hub/msg.h"
#include "hub/queue.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/store.h"
#include "hub/twin.h"
#include "hub/urlenc.h"
#include "log.h"
#include "paho-inbox.h"

#define UP_API_VERSION "2021-04-12"
#define UP_CLIENT_TYPE "fieldhub%2F0.1"
#define UP_CTX_RING 16u
#define UP_SEEN_RING 64u                        /* C2D message ids remembered per device */
#define UP_SPOOL_MAGIC "FHC2D1"

enum ev_kind { EV_CONNECTED, EV_CONNECT_FAILED, EV_LOST, EV_SUBSCRIBED, EV_PUB_OK, EV_PUB_FAILED, EV_ARRIVED,
               EV_CREATED };
enum dev_state { DEV_IDLE, DEV_CONNECTING, DEV_UP, DEV_BACKOFF };

struct up_ep;
struct up_dev;

/* One connection attempt of a device: the paho callbacks' context, so that events of an
 * older connection are recognised (a ring: a context is reused UP_CTX_RING connections
 * later, long after paho forgot it). */
struct conn_ctx {
        struct up_dev *d;
        unsigned gen;
};

struct up_ev {
        struct gw_paho_item item;
        enum ev_kind kind;
        struct up_dev *d;
        unsigned gen;
        int token, code;
        char *topic;
        void *payload;
        size_t len;
        char *spool_path;       /* C2D: its spool file (NULL: not spooled, spool_error says why) */
        int spool_error;
};

struct up_item {
        uint64_t seq;
        struct hub_msg *msg;   /* D2C */
        char *patch;           /* reported patch (JSON text) */
        bool sent, done;
        int token;             /* paho token (D2C) */
        unsigned rid;          /* twin request id (patch) */
};

struct up_dev {
        struct up_ep *u;
        char *id, *key, *password;
        MQTTAsync client;
        bool client_used;              /* client has made a connection attempt (the next one gets a new client) */
        enum dev_state state;
        unsigned gen;
        struct conn_ctx ctx[UP_CTX_RING];
        unsigned failures;
        bool down_logged;
        bool refused;                  /* the last attempt got a CONNACK refusal: not probed */
        sd_event_source *timer;        /* backoff retry, or token renewal while up */
        struct up_item *q;             /* in order; [0, next_send) handed to paho */
        size_t q_head, q_n, q_cap, next_send;
        unsigned rid;
        unsigned get_rid;              /* rid of the twin GET under way (0: none) */
        bool twin_synced;
        int64_t cloud_desired_version;
        char *seen[UP_SEEN_RING];      /* recent C2D message ids (redeliveries are dropped) */
        unsigned seen_next;
        /* create_missing: one registry request at a time, on its own thread */
        pthread_t create_thread;
        bool creating, create_tried;
};

struct up_ep {
        struct gw_endpoint *ep;
        struct gw_hub *hub;
        char *host_name, *address, *username_tail, *ca_file;
        int keep_alive_sec, timeout_sec;
        unsigned window;
        uint64_t token_ttl_usec, retry_initial_usec, retry_max_usec;
        struct up_dev *devs;
        size_t n_devs;
        struct gw_paho_inbox *inbox;
        struct method_ctx *calls;
        char *create_policy, *create_key, *registry_url;
        bool active;
        /* The C2D spool (see "C2D durability" above): one fsync'ed file per message received
         * and not yet committed to the local queue. spool_lock guards spool_last (paho's
         * threads and the loop). */
        char *spool_dir;
        int spool_dirfd;
        pthread_mutex_t spool_lock;
        uint64_t spool_last;
        sd_event_source *spool_timer;  /* queues the spool again after a failure that may pass */
        struct up_ep *spool_next_ep;   /* in up_eps */
        /* The reachability probe (see "Reconnecting after an outage" above; endpoint.h). */
        struct gw_tcp_probe *probe;
        bool probe_spent;
        uint64_t outage_start;
};

#define UP_LOG(d, lvl, err, ...) \
        gw_log_full((lvl), (err), GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name((d)->u->ep), \
                                            .device = (d)->id), __VA_ARGS__)

static uint64_t mono_now(void) {
        return hub_clock_mono(hub_clock_system());
}

/* ---- paho's threads ------------------------------------------------------------------------ */

static void free_ev(struct gw_paho_item *it) {
        struct up_ev *e = (struct up_ev *) it;
        free(e->topic);
        free(e->payload);
        free(e->spool_path);
        free(e);
}

static struct up_ev *ev_new(enum ev_kind kind, struct up_dev *d, unsigned gen) {
        struct up_ev *e = calloc(1, sizeof *e);
        if (e)
                *e = (struct up_ev) { .kind = kind, .d = d, .gen = gen };
        return e;
}

static void post(struct up_dev *d, enum ev_kind kind, unsigned gen, int token, int code) {
        struct up_ev *e = ev_new(kind, d, gen);
        if (!e)
                return; /* the connection is then repaired by keep-alive / resend */
        e->token = token;
        e->code = code;
        gw_paho_inbox_post(d->u->inbox, &e->item);
}

static void on_connect_ok(void *context, MQTTAsync_successData *resp) {
        struct conn_ctx *c = context;
        post(c->d, EV_CONNECTED, c->gen, 0, 0);
}

static void on_connect_fail(void *context, MQTTAsync_failureData *resp) {
        struct conn_ctx *c = context;
        post(c->d, EV_CONNECT_FAILED, c->gen, 0, resp ? resp->code : -1);
}

static void on_lost(void *context, char *cause) {
        struct up_dev *d = context;
        post(d, EV_LOST, 0, 0, 0);
}

static void on_sub_ok(void *context, MQTTAsync_successData *resp) {
        struct conn_ctx *c = context;
        post(c->d, EV_SUBSCRIBED, c->gen, 0, 0);
}

static void on_sub_fail(void *context, MQTTAsync_failureData *resp) {
        struct conn_ctx *c = context;
        post(c->d, EV_LOST, c->gen, 0, resp ? resp->code : -1);
}

static void on_pub_ok(void *context, MQTTAsync_successData *resp) {
        struct conn_ctx *c = context;
        post(c->d, EV_PUB_OK, c->gen, resp ? resp->token : 0, 0);
}

static void on_pub_fail(void *context, MQTTAsync_failureData *resp) {
        struct conn_ctx *c = context;
        post(c->d, EV_PUB_FAILED, c->gen, resp ? resp->token : 0, resp ? resp->code : -1);
}

static bool is_c2d_topic(const char *topic) {
        return strncmp(topic, "devices/", 8) == 0 && strstr(topic, "/messages/devicebound");
}

/* ---- the C2D spool -------------------------------------------------------------------------- */

/* FNV-1a 64: detects a spool file torn by a crash before its fsync completed (such a file was
 * never acknowledged to the cloud). */
static uint64_t fnv64(uint64_t h, const void *p, size_t n) {
        const unsigned char *b = p;
        for (size_t i = 0; i < n; i++) {
                h ^= b[i];
                h *= 0x100000001b3ULL;
        }
        return h;
}

static uint64_t spool_hash(const char *device, const char *topic, const void *payload, size_t len) {
        uint64_t h = fnv64(0xcbf29ce484222325ULL, device, strlen(device) + 1);
        h = fnv64(h, topic, strlen(topic) + 1);
        return fnv64(h, payload, len);
}

static int write_all(int fd, const void *p, size_t n) {
        const char *b = p;
        while (n > 0) {
                ssize_t k = write(fd, b, n);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                b += k;
                n -= (size_t) k;
        }
        return 0;
}

/* Any thread (paho's). Writes one C2D message to its own file in the spool and makes it
 * durable (file and directory fsync'ed) before returning; *ret_path is its path. -errno. */
static int spool_write(struct up_ep *u, const char *device, const char *topic, const void *payload, size_t len,
                       char **ret_path) {
        _cleanup_free_ char *head = NULL, *path = NULL;
        char name[32];
        uint64_t id;
        int fd, r, hl;

        if (u->spool_dirfd < 0)
                return -EBADF;
        /* A name another run of the endpoint took meanwhile (a reload) is skipped. */
        for (int tries = 0;; tries++) {
                pthread_mutex_lock(&u->spool_lock);
                id = ++u->spool_last;
                pthread_mutex_unlock(&u->spool_lock);
                snprintf(name, sizeof name, "%020" PRIu64 ".c2d", id);
                fd = openat(u->spool_dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
                if (fd >= 0)
                        break;
                if (errno != EEXIST || tries >= 100)
                        return -errno;
        }
        hl = asprintf(&head, UP_SPOOL_MAGIC " %zu %zu %zu %016" PRIx64 "\n", strlen(device), strlen(topic), len,
                      spool_hash(device, topic, payload, len));
        if (hl < 0)
                head = NULL;
        if (asprintf(&path, "%s/%s", u->spool_dir, name) < 0)
                path = NULL;
        r = head && path ? write_all(fd, head, (size_t) hl) : -ENOMEM;
        if (r >= 0)
                r = write_all(fd, device, strlen(device) + 1);
        if (r >= 0)
                r = write_all(fd, topic, strlen(topic) + 1);
        if (r >= 0)
                r = write_all(fd, payload, len);
        if (r >= 0 && fdatasync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r >= 0)
                r = -errno;
        if (r >= 0 && fsync(u->spool_dirfd) < 0)
                r = -errno;
        if (r < 0) {
                (void) unlinkat(u->spool_dirfd, name, 0);
                return r;
        }
        *ret_path = TAKE_PTR(path);
        return 0;
}

/* paho's thread, with paho's global mutex held (every other paho call of the process, the
 * loop's included, waits meanwhile): copy, make a C2D message durable in the spool, hand it
 * to the loop. paho sends the PUBACK of a QoS 1 message only once this returns (whatever it
 * returns: 0 makes paho call again later from its memory, it does not withhold the PUBACK),
 * so the cloud counts a C2D message delivered only once it is on disk here. Never waits for
 * the loop (which calls paho, so it would wait for this callback: a deadlock). Returns 1, or
 * 0 when out of memory. */
static int on_arrived(void *context, char *topic, int topic_len, MQTTAsync_message *msg) {
        struct up_dev *d = context;
        size_t tl = topic_len > 0 ? (size_t) topic_len : strlen(topic);
        struct up_ev *e = ev_new(EV_ARRIVED, d, 0);

        if (!e)
                return 0;
        e->topic = strndup(topic, tl);
        e->len = msg->payloadlen > 0 ? (size_t) msg->payloadlen : 0;
        e->payload = malloc(e->len + 1);
        if (!e->topic || !e->payload) {
                free_ev(&e->item);
                return 0;
        }
        if (e->len)
                memcpy(e->payload, msg->payload, e->len);
        ((char *) e->payload)[e->len] = 0;
        if (is_c2d_topic(e->topic))
                e->spool_error = spool_write(d->u, d->id, e->topic, e->payload, e->len, &e->spool_path);
        gw_paho_inbox_post(d->u->inbox, &e->item);
        MQTTAsync_freeMessage(&msg);
        MQTTAsync_free(topic);
        return 1;
}

/* ---- the device queue ---------------------------------------------------------------------- */

static struct up_item *q_at(struct up_dev *d, size_t i) {
        return &d->q[(d->q_head + i) % d->q_cap];
}

static void item_done(struct up_item *it) {
        hub_msg_unref(it->msg);
        free(it->patch);
        *it = (struct up_item) { 0 };
}

static int q_push(struct up_dev *d, const struct up_item *it) {
        if (d->q_n == d->q_cap) {
                size_t cap = d->q_cap ? d->q_cap * 2 : 64;
                struct up_item *n = malloc(cap * sizeof *n);
                if (!n)
                        return -ENOMEM;
                for (size_t i = 0; i < d->q_n; i++)
                        n[i] = *q_at(d, i);
                free(d->q);
                d->q = n;
                d->q_cap = cap;
                d->q_head = 0;
        }
        *q_at(d, d->q_n++) = *it;
        return 0;
}

static void q_pop_done(struct up_dev *d) {
        while (d->q_n > 0 && q_at(d, 0)->done) {
                item_done(q_at(d, 0));
                d->q_head = (d->q_head + 1) % d->q_cap;
                d->q_n--;
                if (d->next_send > 0)
                        d->next_send--;
        }
}

static void q_clear(struct up_dev *d) {
        for (size_t i = 0; i < d->q_n; i++)
                item_done(q_at(d, i));
        d->q_head = d->q_n = d->next_send = 0;
}

/* Everything handed to paho and not confirmed is sent again on the next connection. */
static void q_rewind(struct up_dev *d) {
        for (size_t i = 0; i < d->q_n; i++)
                q_at(d, i)->sent = false;
        d->next_send = 0;
}

/* ---- connections --------------------------------------------------------------------------- */

static void dev_connect(struct up_dev *d);
static struct up_dev *find_dev(struct up_ep *u, const char *id);
static void probe_start(struct up_ep *u);
static void create_identity(struct up_dev *d);
static void on_created(struct up_dev *d, int status);

static int on_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct up_dev *d = ud;
        if (d->state == DEV_BACKOFF)
                dev_connect(d);
        else if (d->state == DEV_UP) {
                /* The token is about to expire: reconnect with a new one (IoT Hub closes the
                 * connection at expiry). */
                UP_LOG(d, LOG_INFO, 0, "Upstream: renewing the SAS token of %s (reconnecting)", d->id);
                MQTTAsync_disconnectOptions o = MQTTAsync_disconnectOptions_initializer;
                o.timeout = 0;
                (void) MQTTAsync_disconnect(d->client, &o);
                d->gen++;
                q_rewind(d);
                d->state = DEV_BACKOFF;
                d->failures = 0;
                (void) sd_event_source_set_time(s, mono_now() + 200 * USEC_PER_MSEC);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static void arm_timer(struct up_dev *d, uint64_t at) {
        if (sd_event_source_set_time(d->timer, at) >= 0)
                (void) sd_event_source_set_enabled(d->timer, SD_EVENT_ONESHOT);
}

static uint64_t backoff_delay(struct up_dev *d) {
        uint64_t v = d->u->retry_initial_usec;
        for (unsigned i = 1; i < d->failures && v < d->u->retry_max_usec; i++)
                v *= 2;
        if (v > d->u->retry_max_usec)
                v = d->u->retry_max_usec;
        uint32_t rnd = 0;
        (void) hub_random_bytes(&rnd, sizeof rnd);
        uint64_t span = v / 2;
        return v - v / 4 + (span ? rnd % span : 0); /* ±25% jitter */
}

/* The connection failed or was lost: keep the queue, retry later. */
static void dev_down(struct up_dev *d, const char *why) {
        if (d->state == DEV_IDLE || d->state == DEV_BACKOFF)
                return;
        d->failures++;
        if (!d->down_logged) {
                d->down_logged = true;
                UP_LOG(d, LOG_WARNING, 0,
                       "Upstream: %s cannot reach %s (%s); its messages are kept and sent once it is back", d->id,
                       d->u->address, why);
        } else
                UP_LOG(d, LOG_DEBUG, 0, "Upstream: %s: retry failed (%s)", d->id, why);
        if (MQTTAsync_isConnected(d->client)) {
                MQTTAsync_disconnectOptions o = MQTTAsync_disconnectOptions_initializer;
                o.timeout = 0;
                (void) MQTTAsync_disconnect(d->client, &o);
        }
        d->gen++;
        d->state = DEV_BACKOFF;
        d->get_rid = 0;
        q_rewind(d);
        arm_timer(d, mono_now() + backoff_delay(d));
        if (!d->refused)
                probe_start(d->u);
}

/* ---- the reachability probe ------------------------------------------------------------------ */

/* Devices waiting for their retry after a transport failure (not a refusal by the cloud). */
static size_t probe_waiting(struct up_ep *u) {
        size_t n = 0;
        for (size_t i = 0; i < u->n_devs; i++)
                if (u->devs[i].state == DEV_BACKOFF && !u->devs[i].refused && !u->devs[i].creating)
                        n++;
        return n;
}

/* A device went down with a transport failure: probe the cloud's address until it answers,
 * once per outage (an outage ends when a device connects again). */
static void probe_start(struct up_ep *u) {
        if (!u->active || !u->probe || u->probe_spent || gw_tcp_probe_running(u->probe))
                return;
        if (!u->outage_start)
                u->outage_start = mono_now();
        gw_tcp_probe_start(u->probe);
}

static bool probe_wanted(void *ud) {
        struct up_ep *u = ud;
        if (u->active && probe_waiting(u) > 0)
                return true;
        u->outage_start = 0; /* they connected (or only refused devices wait) */
        return false;
}

/* The cloud accepts TCP connections again: every device waiting after a transport failure
 * retries now (the first at once, the others spread over 20 ms each, at most half a second),
 * instead of at the end of its backoff (up to retry.max). */
static void probe_reachable(void *ud, bool was_down) {
        struct up_ep *u = ud;
        uint64_t now = mono_now();
        size_t n = probe_waiting(u);
        u->probe_spent = true;
        if (!was_down) {
                /* Reachable from the first probe on: no network outage (the cloud closed a
                 * connection, or refuses above TCP): the devices keep their backoff, so that
                 * a cloud that keeps dropping them is not hammered. */
                gw_log_full(LOG_DEBUG, 0, GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name(u->ep)),
                            "Upstream %s: the cloud's address answers; the devices keep their backoff",
                            gw_endpoint_name(u->ep));
                u->outage_start = 0;
                return;
        }
        uint64_t span = n * 20 * USEC_PER_MSEC;
        if (span < 20 * USEC_PER_MSEC)
                span = 20 * USEC_PER_MSEC;
        if (span > 500 * USEC_PER_MSEC)
                span = 500 * USEC_PER_MSEC;
        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name(u->ep)),
                    "upstream %s reachable again after %.1fs (%s answers); reconnecting %zu device%s now",
                    gw_endpoint_name(u->ep), (double) (now - u->outage_start) / USEC_PER_SEC,
                    gw_tcp_probe_target(u->probe), n, n == 1 ? "" : "s");
        bool first = true;
        for (size_t i = 0; i < u->n_devs; i++) {
                struct up_dev *d = &u->devs[i];
                if (d->state != DEV_BACKOFF || d->refused || d->creating)
                        continue;
                uint32_t rnd = 0;
                (void) hub_random_bytes(&rnd, sizeof rnd);
                d->failures = 0;
                arm_timer(d, first ? now : now + rnd % span);
                first = false;
        }
        u->outage_start = 0;
}

static struct gw_paho_client_conf client_conf(struct up_dev *d) {
        return (struct gw_paho_client_conf) {
                .uri = d->u->address,
                .client_id = d->id,
                .mqtt_version = MQTTVERSION_3_1_1,
                .max_buffered = (int) d->u->window,
                .context = d,
                .lost = on_lost,
                .arrived = on_arrived,
        };
}

static void dev_connect(struct up_dev *d) {
        struct up_ep *u = d->u;
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer;
        MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
        _cleanup_free_ char *resource = NULL, *user = NULL;
        char *token = NULL;
        uint64_t ttl_sec = u->token_ttl_usec / USEC_PER_SEC;
        int r;

        if (!u->active)
                return;
        if (d->client_used) {
                /* A new client, so nothing the last one still had queued goes out first
                 * (paho-inbox.h). */
                struct gw_paho_client_conf pc = client_conf(d);
                r = gw_paho_client_renew(&pc, &d->client);
                if (r != MQTTASYNC_SUCCESS) {
                        char why[96];
                        snprintf(why, sizeof why, "paho cannot create a client (code %d)", r);
                        d->gen++;
                        d->state = DEV_CONNECTING;
                        dev_down(d, why);
                        return;
                }
        }
        d->client_used = true;
        d->gen++;
        d->state = DEV_CONNECTING;
        struct conn_ctx *c = &d->ctx[d->gen % UP_CTX_RING];
        *c = (struct conn_ctx) { .d = d, .gen = d->gen };
        if (asprintf(&resource, "%s/devices/%s", u->host_name, d->id) < 0 ||
            asprintf(&user, "%s/%s/%s", u->host_name, d->id, u->username_tail) < 0) {
                resource = user = NULL;
                dev_down(d, "out of memory");
                return;
        }
        r = hub_sas_generate(resource, d->key, (uint64_t) time(NULL) + ttl_sec, NULL, &token);
        if (r < 0) {
                dev_down(d, "cannot sign a SAS token with its key");
                return;
        }
        if (d->password) {
                hub_explicit_bzero(d->password, strlen(d->password));
                free(d->password);
        }
        d->password = token; /* never logged (not registered as a log secret: one per connection would pile up) */
        o.keepAliveInterval = u->keep_alive_sec;
        o.cleansession = 1;
        o.connectTimeout = u->timeout_sec;
        o.maxInflight = (int) u->window;
        o.onSuccess = on_connect_ok;
        o.onFailure = on_connect_fail;
        o.context = c;
        o.username = user;
        o.password = d->password;
        o.MQTTVersion = MQTTVERSION_3_1_1;
        ssl.trustStore = u->ca_file;
        ssl.enableServerCertAuth = 1;
        ssl.verify = 1;
        ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
        o.ssl = &ssl;
        r = MQTTAsync_connect(d->client, &o);
        if (r != MQTTASYNC_SUCCESS) {
                char why[96];
                snprintf(why, sizeof why, "paho refused to connect (code %d)", r);
                dev_down(d, why);
        } else
                gw_paho_inbox_wake_receiver(u->inbox); /* else paho notices the socket up to 1 s later */
}

static void publish_raw(struct up_dev *d, const char *topic, const void *body, size_t len, int qos) {
        MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
        int r = MQTTAsync_send(d->client, topic, (int) len, body, qos, 0, &ro);
        if (r != MQTTASYNC_SUCCESS)
                UP_LOG(d, LOG_WARNING, 0, "Upstream: %s: cannot publish on %s (paho code %d)", d->id, topic, r);
}

/* Appends "name[=value]" percent-encoded (reference §2.5) to f, "&"-separated. */
static void bag_item(FILE *f, bool *first, const char *name, const char *value) {
        _cleanup_free_ char *n = NULL, *v = NULL;
        if (hub_url_encode(name, &n) < 0 || (value && hub_url_encode(value, &v) < 0))
                return; /* out of memory: the caller sees the stream's error */
        fprintf(f, "%s%s%s%s", *first ? "" : "&", n, v ? "=" : "", v ? v : "");
        *first = false;
}

/* devices/{id}/messages/events/{bag}: what the device itself would send — the system
 * properties a device may set (not the ones this hub stamped: connection ids, enqueued
 * time, source; the cloud stamps its own), then the application properties (enrichments
 * included). */
static int d2c_topic(const char *device_id, const struct hub_msg *m, char **ret) {
        size_t size = 0;
        char *buf = NULL;
        bool first = true;
        FILE *f = open_memstream(&buf, &size);
        if (!f)
                return -ENOMEM;
        fprintf(f, "devices/%s/messages/events/", device_id);
        for (int p = 0; p < _HUB_SYS_MAX; p++) {
                const char *name = hub_sys_prop_mqtt_name((enum hub_sys_prop) p);
                const char *v = hub_msg_get_sys(m, (enum hub_sys_prop) p);
                if (v && name && p != HUB_SYS_ACK && hub_sys_prop_settable((enum hub_sys_prop) p))
                        bag_item(f, &first, name, v);
        }
        for (size_t i = 0; i < hub_msg_n_props(m); i++) {
                const struct hub_msg_prop *pr = hub_msg_prop_at(m, i);
                bag_item(f, &first, pr->name, pr->value);
        }
        if (fclose(f) != 0 || !buf) {
                free(buf);
                return -ENOMEM;
        }
        *ret = buf;
        return 0;
}

/* Hands the queue's unsent items to paho, in order. */
static void dev_flush(struct up_dev *d) {
        if (d->state != DEV_UP)
                return;
        while (d->next_send < d->q_n) {
                struct up_item *it = q_at(d, d->next_send);
                MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
                _cleanup_free_ char *topic = NULL;
                int r;
                if (it->done || it->sent) {
                        d->next_send++;
                        continue;
                }
                if (it->msg) {
                        size_t len;
                        const void *body = hub_msg_body(it->msg, &len);
                        if (d2c_topic(d->id, it->msg, &topic) < 0)
                                return; /* out of memory: the next confirmation retries */
                        ro.onSuccess = on_pub_ok;
                        ro.onFailure = on_pub_fail;
                        ro.context = &d->ctx[d->gen % UP_CTX_RING];
                        r = MQTTAsync_send(d->client, topic, (int) len, body, 1, 0, &ro);
                        if (r == MQTTASYNC_MAX_MESSAGES_INFLIGHT || r == MQTTASYNC_MAX_BUFFERED_MESSAGES)
                                return; /* window full: the next PUBACK continues */
                        if (r != MQTTASYNC_SUCCESS) {
                                char why[96];
                                snprintf(why, sizeof why, "paho refused a publish (code %d)", r);
                                dev_down(d, why);
                                return;
                        }
                        it->token = ro.token;
                } else {
                        it->rid = ++d->rid;
                        if (asprintf(&topic, "$iothub/twin/PATCH/properties/reported/?$rid=r%u", it->rid) < 0)
                                return;
                        r = MQTTAsync_send(d->client, topic, (int) strlen(it->patch), it->patch, 0, 0, &ro);
                        if (r == MQTTASYNC_MAX_MESSAGES_INFLIGHT || r == MQTTASYNC_MAX_BUFFERED_MESSAGES)
                                return;
                        if (r != MQTTASYNC_SUCCESS) {
                                char why[96];
                                snprintf(why, sizeof why, "paho refused a twin patch (code %d)", r);
                                dev_down(d, why);
                                return;
                        }
                }
                it->sent = true;
                d->next_send++;
        }
}

static void confirm_item(struct up_dev *d, struct up_item *it) {
        uint64_t seq = it->seq;
        it->done = true;
        q_pop_done(d);
        gw_endpoint_confirm(d->u->ep, seq, 0);
}

/* ---- downstream ------------------------------------------------------------------------------ */

/* A local enqueue under way. Independent of the endpoint (its completion may run after the
 * endpoint is gone, when the store closes). */
struct c2d_ctx {
        char *device;
        char *spool_path; /* removed once the message is in the local queue (or can never be) */
        struct c2d_ctx *prev, *next;
};

/* Loop thread: the enqueues under way with a spool file, of every upstream endpoint of the
 * process, so that an endpoint created again by a reload does not queue those files twice. */
static struct c2d_ctx *c2d_inflight;
/* Loop thread: the upstream endpoints alive, to retry their spools after a failure that may
 * pass (a completion may outlive its endpoint, so it does not point to it). */
static struct up_ep *up_eps;

#define UP_SPOOL_RETRY_USEC (5 * USEC_PER_SEC)

static void spool_retry_soon(void) {
        for (struct up_ep *u = up_eps; u; u = u->spool_next_ep)
                if (u->spool_timer && sd_event_source_set_time(u->spool_timer, mono_now() + UP_SPOOL_RETRY_USEC) >= 0)
                        (void) sd_event_source_set_enabled(u->spool_timer, SD_EVENT_ONESHOT);
}

static bool c2d_spool_busy(const char *path) {
        for (struct c2d_ctx *c = c2d_inflight; c; c = c->next)
                if (streq(c->spool_path, path))
                        return true;
        return false;
}

static void c2d_ctx_free(struct c2d_ctx *c) {
        if (!c)
                return;
        if (c->spool_path) {
                if (c->prev)
                        c->prev->next = c->next;
                else if (c2d_inflight == c)
                        c2d_inflight = c->next;
                if (c->next)
                        c->next->prev = c->prev;
        }
        free(c->device);
        free(c->spool_path);
        free(c);
}

/* Failures that may pass (the store): the spooled message is kept and queued again after
 * UP_SPOOL_RETRY_USEC (or at the next start). Any other failure (unknown device, queue full,
 * invalid message) never passes. */
static bool c2d_transient(int r) {
        return r == -ENOSPC || r == -EIO || r == -EBUSY || r == -ESHUTDOWN || r == -ENOMEM || r == -EAGAIN ||
               r == -ENOLCK || r == -EDQUOT;
}

static void c2d_done(int r, uint64_t sequence_number, void *userdata) {
        struct c2d_ctx *c = userdata;
        if (r < 0 && c->spool_path && c2d_transient(r)) {
                gw_log_full(LOG_WARNING, r,
                            GW_FIELDS(.component = "uplink", .device = c->device, .event = "c2d-spooled",
                                      .ratelimit_key = "upstream-c2d"),
                            "Upstream: a cloud-to-device message for %s cannot be queued here yet: %m; it stays in "
                            "the spool %s and is queued again in %u s (or at the next start)", c->device,
                            c->spool_path, (unsigned) (UP_SPOOL_RETRY_USEC / USEC_PER_SEC));
                c2d_ctx_free(c);
                spool_retry_soon();
                return;
        }
        if (r < 0)
                gw_log_full(LOG_ERR, r,
                            GW_FIELDS(.component = "uplink", .device = c->device, .event = "c2d-lost",
                                      .ratelimit_key = "upstream-c2d"),
                            "Upstream: a cloud-to-device message for %s was acknowledged to the cloud but cannot be "
                            "queued here: %m; it is lost", c->device);
        else
                gw_log_full(LOG_DEBUG, 0, GW_FIELDS(.component = "uplink", .device = c->device),
                            "Upstream: C2D message for %s queued locally (sequence number %" PRIu64 ")", c->device,
                            sequence_number);
        if (c->spool_path && unlink(c->spool_path) < 0 && errno != ENOENT)
                gw_log_errno(LOG_WARNING, -errno, "Upstream: cannot remove %s: %m (its message may be queued again "
                             "at the next start)", c->spool_path);
        c2d_ctx_free(c);
}

/* Whether d has seen the message id lately; remembers it. */
static bool c2d_seen(struct up_dev *d, const char *mid) {
        for (unsigned i = 0; i < UP_SEEN_RING; i++)
                if (d->seen[i] && streq(d->seen[i], mid))
                        return true;
        char *copy = strdup(mid);
        if (copy) {
                free(d->seen[d->seen_next]);
                d->seen[d->seen_next] = copy;
                d->seen_next = (d->seen_next + 1) % UP_SEEN_RING;
        }
        return false;
}

/* Queues a C2D message from the cloud (topic devices/{id}/messages/devicebound/{bag}) in the
 * device's local queue. d: the device's connection (NULL for a spooled message of a device no
 * longer configured). Takes spool_path. from_spool: a message the spool still holds, so not
 * yet queued (but for a crash between commit and removal): its id is remembered, never
 * dropped as a repeat. */
static void c2d_enqueue(struct up_ep *u, struct up_dev *d, const char *device_id, const char *topic,
                        const void *payload, size_t len, char *spool_path, bool from_spool) {
        struct hub_msg *m = NULL;
        struct c2d_ctx *c = calloc(1, sizeof *c);
        const char *bag = strstr(topic, "/messages/devicebound");
        int r = 0;

        if (spool_path && c2d_spool_busy(spool_path)) {
                /* Already being queued: a spool retry took the file before its arrival event
                 * was handled, or the other way round. */
                free(spool_path);
                free(c);
                return;
        }
        if (!c || !(c->device = strdup(device_id))) {
                free(c);
                free(spool_path);
                gw_log_full(LOG_ERR, -ENOMEM, GW_FIELDS(.component = "uplink", .device = device_id),
                            "Upstream: out of memory queueing a cloud-to-device message for %s", device_id);
                return;
        }
        c->spool_path = spool_path;
        if (spool_path) {
                c->next = c2d_inflight;
                if (c2d_inflight)
                        c2d_inflight->prev = c;
                c2d_inflight = c;
        }
        if (!bag)
                r = -EINVAL;
        else {
                bag += strlen("/messages/devicebound");
                if (*bag == '/')
                        bag++;
                r = hub_msg_new(payload, len, HUB_MSG_C2D_MAX_SIZE, &m);
        }
        if (r >= 0)
                r = gw_mqtt_bag_decode(bag, strlen(bag), GW_MQTT_BAG_DOWNSTREAM, m);
        if (r >= 0 && d) {
                /* The cloud offers a message again when our PUBACK did not reach it (the
                 * connection dropped, or this process died after the spool and before the
                 * PUBACK: then the spool queued it already). */
                const char *mid = hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID);
                if (mid && c2d_seen(d, mid) && !from_spool) {
                        UP_LOG(d, LOG_INFO, 0, "Upstream: %s: the cloud sent C2D message %s again; already queued "
                               "here, dropped", d->id, mid);
                        hub_msg_unref(m);
                        if (c->spool_path)
                                (void) unlink(c->spool_path);
                        c2d_ctx_free(c);
                        return;
                }
        }
        if (r >= 0)
                r = hub_queue_send(u->hub->queue, device_id, m, hub_clock_now(hub_clock_system()), c2d_done, c);
        hub_msg_unref(m);
        if (r < 0)
                c2d_done(r, 0, c);
}

static void handle_c2d(struct up_dev *d, struct up_ev *e) {
        if (!e->spool_path)
                UP_LOG(d, LOG_WARNING, e->spool_error, "Upstream: a cloud-to-device message for %s could not be "
                       "written to the spool before it was acknowledged (%m); queueing it from memory", d->id);
        c2d_enqueue(d->u, d, d->id, e->topic, e->payload, e->len, TAKE_PTR(e->spool_path), false);
}

/* Loop thread, at creation: queues what the spool holds (messages acknowledged to the cloud
 * by a run that stopped before they were committed here), in arrival order, and sets
 * spool_last after the highest file number. */
static int spool_cmp(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static void spool_replay(struct up_ep *u) {
        int dfd = dup(u->spool_dirfd);
        DIR *dir = dfd >= 0 ? fdopendir(dfd) : NULL;
        char **names = NULL;
        size_t n = 0, cap = 0, queued = 0;
        struct dirent *de;

        if (!dir) {
                if (dfd >= 0)
                        close(dfd);
                gw_log_errno(LOG_ERR, -errno, "Upstream endpoint %s: cannot read the spool %s: %m",
                             gw_endpoint_name(u->ep), u->spool_dir);
                return;
        }
        rewinddir(dir); /* the dup shares its offset with spool_dirfd, at the end after a first scan */
        while ((de = readdir(dir))) {
                uint64_t id;
                char tail[8];
                if (strlen(de->d_name) != 24 || sscanf(de->d_name, "%20" SCNu64 "%5s", &id, tail) != 2 ||
                    !streq(tail, ".c2d"))
                        continue;
                if (id > u->spool_last)
                        u->spool_last = id;
                if (n == cap) {
                        size_t nc = cap ? cap * 2 : 16;
                        char **nn = realloc(names, nc * sizeof *nn);
                        if (!nn)
                                break;
                        names = nn;
                        cap = nc;
                }
                if (!(names[n] = strdup(de->d_name)))
                        break;
                n++;
        }
        closedir(dir);
        if (n > 0)
                qsort(names, n, sizeof *names, spool_cmp);
        for (size_t i = 0; i < n; i++) {
                _cleanup_free_ char *buf = NULL, *path = NULL;
                size_t dl, tl, pl, got = 0;
                uint64_t h;
                int hn = 0;
                struct stat st = { 0 };
                int fd = openat(u->spool_dirfd, names[i], O_RDONLY | O_CLOEXEC);
                bool ok = false;

                if (fd >= 0 && fstat(fd, &st) >= 0 && st.st_size < 1024 * 1024 &&
                    (buf = malloc((size_t) st.st_size + 1))) {
                        while (got < (size_t) st.st_size) {
                                ssize_t k = read(fd, buf + got, (size_t) st.st_size - got);
                                if (k <= 0)
                                        break;
                                got += (size_t) k;
                        }
                        buf[got] = 0;
                        if (sscanf(buf, UP_SPOOL_MAGIC " %zu %zu %zu %" SCNx64 "%*[\n]%n", &dl, &tl, &pl, &h, &hn) == 4 &&
                            hn > 0 && dl < got && tl < got && pl < got && (size_t) hn + dl + 1 + tl + 1 + pl == got) {
                                const char *dev = buf + hn, *topic = dev + dl + 1, *payload = topic + tl + 1;
                                ok = dev[dl] == 0 && topic[tl] == 0 && strlen(dev) == dl && strlen(topic) == tl &&
                                     spool_hash(dev, topic, payload, pl) == h;
                        }
                }
                if (fd >= 0)
                        close(fd);
                if (!ok && st.st_mtime + 10 > time(NULL))
                        continue; /* perhaps still being written (a reload): left for the next start */
                if (!ok) {
                        /* Torn by a crash before its fsync completed: never acknowledged to the
                         * cloud, which offers the message again. */
                        gw_log_notice("Upstream endpoint %s: removing the incomplete spool file %s/%s (never "
                                      "acknowledged to the cloud)", gw_endpoint_name(u->ep), u->spool_dir, names[i]);
                        (void) unlinkat(u->spool_dirfd, names[i], 0);
                        continue;
                }
                const char *dev = buf + hn, *topic = dev + dl + 1, *payload = topic + tl + 1;
                if (asprintf(&path, "%s/%s", u->spool_dir, names[i]) < 0) {
                        path = NULL;
                        continue; /* stays for the next start */
                }
                if (c2d_spool_busy(path))
                        continue; /* being queued by the endpoint this one replaces (a reload) */
                c2d_enqueue(u, find_dev(u, dev), dev, topic, payload, pl, TAKE_PTR(path), true);
                queued++;
        }
        for (size_t i = 0; i < n; i++)
                free(names[i]);
        free(names);
        if (queued > 0)
                gw_log_notice("Upstream endpoint %s: queueing %zu cloud-to-device messages from the spool (received "
                              "and acknowledged to the cloud, not queued here yet)", gw_endpoint_name(u->ep), queued);
}

static int on_spool_timer(sd_event_source *s, uint64_t usec, void *ud) {
        spool_replay(ud);
        return 0;
}

/* A method call under way; detached (u = NULL) when the endpoint goes away first. */
struct method_ctx {
        struct up_ep *u;
        char *device, *rid;
        struct method_ctx *prev, *next;
};

static void method_ctx_free(struct method_ctx *c) {
        if (c->u) {
                if (c->prev)
                        c->prev->next = c->next;
                else
                        c->u->calls = c->next;
                if (c->next)
                        c->next->prev = c->prev;
        }
        free(c->device);
        free(c->rid);
        free(c);
}

static struct up_dev *find_dev(struct up_ep *u, const char *id) {
        for (size_t i = 0; i < u->n_devs; i++)
                if (streq(u->devs[i].id, id))
                        return &u->devs[i];
        return NULL;
}

static void method_answer(struct up_dev *d, const char *rid, int status, const char *payload) {
        _cleanup_free_ char *topic = NULL;
        if (!d || d->state != DEV_UP)
                return; /* the cloud times the call out */
        if (asprintf(&topic, "$iothub/methods/res/%d/?$rid=%s", status, rid) < 0)
                return;
        publish_raw(d, topic, payload ? payload : "", payload ? strlen(payload) : 0, 0);
}

static void method_error(struct up_dev *d, const char *rid, int r) {
        const char *body;
        int status;
        switch (r) {
        case -ETIMEDOUT:
                status = 504;
                body = "{\"errorCode\":504101,\"message\":\"Timed out waiting for the response from device.\"}";
                break;
        case -EINVAL:
                status = 400;
                body = "{\"errorCode\":400004,\"message\":\"Invalid method name or payload.\"}";
                break;
        case -E2BIG:
                status = 413;
                body = "{\"errorCode\":413001,\"message\":\"The device's response is too large.\"}";
                break;
        default: /* -ENOTCONN, -ENOENT, -ESHUTDOWN: not online here (reference §2.10, §5.4) */
                status = 404;
                body = "{\"errorCode\":404103,\"message\":\"The device is not online at the gateway: "
                       "DeviceNotOnline.\"}";
                break;
        }
        method_answer(d, rid, status, body);
}

static void method_done(int status, const char *json_payload, void *ud) {
        struct method_ctx *c = ud;
        struct up_dev *d = c->u && c->u->active ? find_dev(c->u, c->device) : NULL;
        if (status >= 0)
                method_answer(d, c->rid, status, json_payload);
        else if (d)
                method_error(d, c->rid, status);
        method_ctx_free(c);
}

static void handle_method(struct up_dev *d, struct up_ev *e) {
        struct up_ep *u = d->u;
        const char *p = e->topic + strlen("$iothub/methods/POST/");
        const char *slash = strchr(p, '/');
        const char *rid = strstr(e->topic, "$rid=");
        const char *err = NULL;
        if (!slash || !rid) {
                UP_LOG(d, LOG_WARNING, 0, "Upstream: %s: malformed method topic %s ignored", d->id, e->topic);
                return;
        }
        rid += 5;
        _cleanup_free_ char *name = strndup(p, (size_t) (slash - p));
        struct method_ctx *c = calloc(1, sizeof *c);
        if (!name || !c || !(c->rid = strndup(rid, strcspn(rid, "&"))) || !(c->device = strdup(d->id))) {
                if (c) {
                        free(c->rid);
                        free(c);
                }
                return;
        }
        int r = hub_method_invoke(u->hub->methods, d->id, NULL, name, e->len ? e->payload : NULL,
                                  HUB_METHOD_TIMEOUT_DEFAULT, 0, mono_now(), method_done, c, &err);
        if (r < 0) {
                UP_LOG(d, LOG_INFO, r, "Upstream: method %s from the cloud for %s: %m%s%s", name, d->id,
                       err ? ": " : "", err ? err : "");
                method_error(d, c->rid, r);
                method_ctx_free(c);
                return;
        }
        c->u = u;
        c->next = u->calls;
        if (u->calls)
                u->calls->prev = c;
        u->calls = c;
        gw_hub_rearm(u->hub);
}

/* The merge patch that turns local into cloud (keys starting with '$' are the twin's own). */
static json_t *desired_diff(const json_t *local, const json_t *cloud) {
        json_t *patch = json_object();
        const char *k;
        json_t *v;
        if (!patch)
                return NULL;
        json_object_foreach ((json_t *) cloud, k, v) {
                if (k[0] == '$')
                        continue;
                json_t *lv = local ? json_object_get(local, k) : NULL;
                if (lv && json_is_object(lv) && json_is_object(v)) {
                        json_t *sub = desired_diff(lv, v);
                        if (sub && json_object_size(sub) > 0)
                                json_object_set_new(patch, k, sub);
                        else
                                json_decref(sub);
                } else if (!lv || !json_equal(lv, v))
                        json_object_set(patch, k, v);
        }
        json_object_foreach ((json_t *) local, k, v) {
                if (k[0] != '$' && !json_object_get(cloud, k))
                        json_object_set_new(patch, k, json_null());
        }
        return patch;
}

struct desired_ctx {
        char *device;
};

static void desired_done(int result, json_t *twin, const char *error, void *ud) {
        struct desired_ctx *c = ud;
        if (result < 0)
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "uplink", .device = c->device),
                            "Upstream: cannot apply the cloud's desired properties to %s locally: %m%s%s", c->device,
                            error ? ": " : "", error ? error : "");
        free(c->device);
        free(c);
}

static void apply_desired(struct up_dev *d, json_t *patch) {
        struct desired_ctx *c = calloc(1, sizeof *c);
        if (!c || !(c->device = strdup(d->id))) {
                free(c);
                return;
        }
        int r = hub_twin_update_desired(d->u->hub->twins, d->id, patch, NULL, desired_done, c);
        if (r < 0) {
                UP_LOG(d, LOG_WARNING, r, "Upstream: cannot apply the cloud's desired properties to %s: %m", d->id);
                free(c->device);
                free(c);
        }
}

static void handle_twin_get(struct up_dev *d, int status, struct up_ev *e) {
        _cleanup_(json_decrefp) json_t *doc = NULL, *view = NULL, *patch = NULL;
        d->get_rid = 0;
        if (status != 200) {
                UP_LOG(d, LOG_WARNING, 0, "Upstream: the cloud answered %d to the twin GET of %s", status, d->id);
                return;
        }
        doc = json_loadb(e->payload, e->len, 0, NULL);
        json_t *cloud = doc ? json_object_get(doc, "desired") : NULL;
        if (!json_is_object(cloud)) {
                UP_LOG(d, LOG_WARNING, 0, "Upstream: the cloud's twin of %s has no desired properties", d->id);
                return;
        }
        if (hub_twin_get_device_view(d->u->hub->twins, d->id, &view) < 0)
                return;
        json_t *local = json_object_get(view, "desired");
        patch = desired_diff(local, cloud);
        json_t *ver = json_object_get(cloud, "$version");
        d->cloud_desired_version = json_is_integer(ver) ? json_integer_value(ver) : 0;
        d->twin_synced = true;
        if (patch && json_object_size(patch) > 0) {
                UP_LOG(d, LOG_INFO, 0, "Upstream: %s: applying %zu desired-property changes from the cloud "
                       "(cloud $version %" PRId64 ")", d->id, json_object_size(patch), d->cloud_desired_version);
                apply_desired(d, patch);
        }
}

static void handle_twin_res(struct up_dev *d, struct up_ev *e) {
        const char *p = e->topic + strlen("$iothub/twin/res/");
        int status = atoi(p);
        const char *rid = strstr(e->topic, "$rid=");
        if (!rid)
                return;
        rid += 5;
        if (rid[0] == 'g' && d->get_rid && (unsigned) strtoul(rid + 1, NULL, 10) == d->get_rid) {
                handle_twin_get(d, status, e);
                return;
        }
        if (rid[0] != 'r')
                return;
        unsigned n = (unsigned) strtoul(rid + 1, NULL, 10);
        for (size_t i = 0; i < d->q_n; i++) {
                struct up_item *it = q_at(d, i);
                if (!it->patch || !it->sent || it->done || it->rid != n)
                        continue;
                if (status >= 200 && status < 300)
                        confirm_item(d, it);
                else if (status == 429 || status >= 500) {
                        char why[64];
                        snprintf(why, sizeof why, "the cloud answered %d to a reported patch", status);
                        dev_down(d, why);
                } else {
                        gw_endpoint_count_poison(d->u->ep, it->seq, "the cloud refused the reported patch");
                        confirm_item(d, it);
                }
                return;
        }
}

static void handle_desired_patch(struct up_dev *d, struct up_ev *e) {
        _cleanup_(json_decrefp) json_t *patch = json_loadb(e->payload, e->len, 0, NULL);
        const char *v = strstr(e->topic, "$version=");
        int64_t version = v ? strtoll(v + 9, NULL, 10) : 0;
        if (!json_is_object(patch))
                return;
        if (d->twin_synced && version > 0 && version <= d->cloud_desired_version)
                return; /* already in the fetched twin */
        if (version > d->cloud_desired_version)
                d->cloud_desired_version = version;
        json_object_del(patch, "$version");
        if (json_object_size(patch) > 0)
                apply_desired(d, patch);
}

static void handle_arrived(struct up_dev *d, struct up_ev *e) {
        if (is_c2d_topic(e->topic))
                handle_c2d(d, e);
        else if (strncmp(e->topic, "$iothub/methods/POST/", 21) == 0)
                handle_method(d, e);
        else if (strncmp(e->topic, "$iothub/twin/res/", 17) == 0)
                handle_twin_res(d, e);
        else if (strncmp(e->topic, "$iothub/twin/PATCH/properties/desired", 37) == 0)
                handle_desired_patch(d, e);
        else
                UP_LOG(d, LOG_DEBUG, 0, "Upstream: %s: ignored a publish on %s", d->id, e->topic);
}

static void subscribe(struct up_dev *d) {
        char c2d[300];
        char *topics[4] = { c2d, "$iothub/methods/POST/#", "$iothub/twin/res/#",
                            "$iothub/twin/PATCH/properties/desired/#" };
        int qos[4] = { 1, 0, 0, 0 };
        MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
        snprintf(c2d, sizeof c2d, "devices/%s/messages/devicebound/#", d->id);
        ro.onSuccess = on_sub_ok;
        ro.onFailure = on_sub_fail;
        ro.context = &d->ctx[d->gen % UP_CTX_RING];
        int r = MQTTAsync_subscribeMany(d->client, 4, topics, qos, &ro);
        if (r != MQTTASYNC_SUCCESS)
                dev_down(d, "cannot subscribe");
}

static void twin_get(struct up_dev *d) {
        char topic[64];
        d->get_rid = ++d->rid;
        snprintf(topic, sizeof topic, "$iothub/twin/GET/?$rid=g%u", d->get_rid);
        publish_raw(d, topic, "", 0, 0);
}

static void on_event(void *ud, struct gw_paho_item *item) {
        struct up_ep *u = ud;
        struct up_ev *e = (struct up_ev *) item;
        struct up_dev *d = e->d;
        char why[96];

        if (!u->active)
                return; /* (a creation thread is joined by destroy) */
        switch (e->kind) {
        case EV_CONNECTED:
                if (e->gen != d->gen || d->state != DEV_CONNECTING)
                        break;
                d->state = DEV_UP;
                d->failures = 0;
                if (d->down_logged)
                        UP_LOG(d, LOG_NOTICE, 0, "Upstream: %s is connected to %s again; sending what it missed",
                               d->id, u->address);
                else
                        UP_LOG(d, LOG_INFO, 0, "Upstream: %s connected to %s as %s", d->id, u->address,
                               u->host_name);
                d->down_logged = false;
                d->refused = false;
                u->probe_spent = false; /* a later outage is probed again */
                d->twin_synced = false;
                subscribe(d);
                /* Renew the token at 80% of its lifetime. */
                arm_timer(d, mono_now() + u->token_ttl_usec / 5 * 4);
                dev_flush(d);
                break;
        case EV_CONNECT_FAILED:
                if (e->gen != d->gen || d->state != DEV_CONNECTING)
                        break;
                snprintf(why, sizeof why, "connect failed, paho code %d%s", e->code,
                         e->code == 5 ? ": not authorized" : e->code == 4 ? ": bad user name or password" : "");
                /* A CONNACK refusal (1..5): the cloud is there and said no; only its backoff
                 * retries, the probe never hurries it. */
                d->refused = e->code > 0;
                dev_down(d, why);
                if (e->code == 5 && u->create_policy && !d->create_tried && !d->creating)
                        create_identity(d);
                break;
        case EV_LOST:
                if ((e->gen && e->gen != d->gen) || d->state != DEV_UP)
                        break;
                d->refused = false;
                dev_down(d, "connection lost");
                break;
        case EV_SUBSCRIBED:
                if (e->gen == d->gen && d->state == DEV_UP)
                        twin_get(d);
                break;
        case EV_PUB_OK:
                if (e->gen != d->gen)
                        break;
                for (size_t i = 0; i < d->next_send && i < d->q_n; i++) {
                        struct up_item *it = q_at(d, i);
                        if (it->msg && it->sent && !it->done && it->token == e->token) {
                                confirm_item(d, it);
                                break;
                        }
                }
                dev_flush(d);
                break;
        case EV_PUB_FAILED:
                if (e->gen != d->gen || d->state != DEV_UP)
                        break;
                snprintf(why, sizeof why, "publish failed (paho code %d)", e->code);
                dev_down(d, why);
                break;
        case EV_ARRIVED:
                handle_arrived(d, e);
                break;
        case EV_CREATED:
                on_created(d, e->code);
                break;
        }
}

/* ---- create_missing: the cloud's registry REST API (reference §5.2) ------------------------ */

struct create_req {
        struct up_dev *d;
        char *url, *body, *auth, *ca_file;
};

static void create_req_free(struct create_req *c) {
        if (!c)
                return;
        free(c->url);
        if (c->body) {
                hub_explicit_bzero(c->body, strlen(c->body));
                free(c->body);
        }
        if (c->auth) {
                hub_explicit_bzero(c->auth, strlen(c->auth));
                free(c->auth);
        }
        free(c->ca_file);
        free(c);
}

static size_t discard(char *p, size_t size, size_t n, void *ud) {
        return size * n;
}

/* Its own thread (a blocking request, 10 s at most): PUT /devices/{id}. Posts EV_CREATED with
 * the HTTP status (or -1 when no answer). */
static void *create_thread(void *arg) {
        struct create_req *c = arg;
        struct curl_slist *h = NULL;
        long status = -1;
        CURL *curl = curl_easy_init();
        if (curl) {
                h = curl_slist_append(h, "Content-Type: application/json");
                h = curl_slist_append(h, c->auth);
                curl_easy_setopt(curl, CURLOPT_URL, c->url);
                curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "PUT");
                curl_easy_setopt(curl, CURLOPT_POSTFIELDS, c->body);
                curl_easy_setopt(curl, CURLOPT_HTTPHEADER, h);
                curl_easy_setopt(curl, CURLOPT_TIMEOUT, 10L);
                curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
                curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "https");
                curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, discard);
                if (c->ca_file)
                        curl_easy_setopt(curl, CURLOPT_CAINFO, c->ca_file);
                if (curl_easy_perform(curl) == CURLE_OK)
                        curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
                curl_slist_free_all(h);
                curl_easy_cleanup(curl);
        }
        struct up_ev *e = ev_new(EV_CREATED, c->d, 0);
        if (e) {
                e->code = (int) status;
                gw_paho_inbox_post(c->d->u->inbox, &e->item);
        }
        create_req_free(c);
        return NULL;
}

/* The cloud refused the device's credentials: create its identity there, once. */
static void create_identity(struct up_dev *d) {
        struct up_ep *u = d->u;
        struct create_req *c = calloc(1, sizeof *c);
        _cleanup_free_ char *token = NULL;
        _cleanup_(json_decrefp) json_t *body = NULL;
        int r;

        if (!c)
                return;
        c->d = d;
        body = json_pack("{s:s, s:{s:s, s:{s:s, s:s}}}", "deviceId", d->id, "authentication", "type", "sas",
                         "symmetricKey", "primaryKey", d->key, "secondaryKey", d->key);
        r = hub_sas_generate(u->host_name, u->create_key, (uint64_t) time(NULL) + 300, u->create_policy, &token);
        if (r < 0 || !body || asprintf(&c->url, "%s/devices/%s?api-version=" UP_API_VERSION, u->registry_url, d->id) < 0 ||
            asprintf(&c->auth, "Authorization: %s", token) < 0 || !(c->body = hub_json_dumps(body, JSON_COMPACT)) ||
            (u->ca_file && !(c->ca_file = strdup(u->ca_file)))) {
                UP_LOG(d, LOG_WARNING, r < 0 ? r : -ENOMEM, "Upstream: cannot prepare the creation of %s in the cloud",
                       d->id);
                create_req_free(c);
                return;
        }
        d->create_tried = true;
        r = -pthread_create(&d->create_thread, NULL, create_thread, c);
        if (r < 0) {
                UP_LOG(d, LOG_WARNING, r, "Upstream: cannot start the creation of %s in the cloud: %m", d->id);
                create_req_free(c);
                return;
        }
        d->creating = true;
        UP_LOG(d, LOG_NOTICE, 0, "Upstream: the cloud refused %s; creating its identity there (policy %s)", d->id,
               u->create_policy);
}

static void on_created(struct up_dev *d, int status) {
        (void) pthread_join(d->create_thread, NULL);
        d->creating = false;
        if (status == 200 || status == 201) {
                UP_LOG(d, LOG_NOTICE, 0, "Upstream: created the identity of %s in the cloud with its key", d->id);
                d->failures = 0;
                if (d->state == DEV_BACKOFF)
                        arm_timer(d, mono_now() + 100 * USEC_PER_MSEC);
        } else if (status == 409)
                UP_LOG(d, LOG_ERR, 0, "Upstream: %s exists in the cloud with other credentials: give it the key "
                       "configured here", d->id);
        else
                UP_LOG(d, LOG_ERR, 0, "Upstream: the cloud's registry answered %d to the creation of %s", status,
                       d->id);
}

/* ---- the transport ops -------------------------------------------------------------------- */

/* The local identity uses the same key as upstream (created when missing). */
static void sync_local_identity(struct up_ep *u, const struct gw_upstream_device *ud) {
        struct hub_device dev = { 0 }, out = { 0 };
        int r = hub_registry_get(u->hub->registry, ud->id, &dev);
        if (r == -ENOENT) {
                struct hub_device in = { .status = HUB_DEVICE_ENABLED, .auth_type = HUB_AUTH_TYPE_SAS };
                snprintf(in.device_id, sizeof in.device_id, "%s", ud->id);
                snprintf(in.primary_key, sizeof in.primary_key, "%s", ud->key);
                snprintf(in.secondary_key, sizeof in.secondary_key, "%s", ud->key);
                r = hub_registry_create(u->hub->registry, &in, &out);
                hub_device_done(&in);
                if (r >= 0)
                        gw_log_info("Upstream endpoint %s: created the local identity %s with its upstream key",
                                    gw_endpoint_name(u->ep), ud->id);
        } else if (r >= 0 && !streq(dev.primary_key, ud->key)) {
                snprintf(dev.primary_key, sizeof dev.primary_key, "%s", ud->key);
                dev.auth_type = HUB_AUTH_TYPE_SAS;
                r = hub_registry_update(u->hub->registry, &dev, NULL, &out);
                if (r >= 0)
                        gw_log_info("Upstream endpoint %s: the local identity %s now uses its upstream key",
                                    gw_endpoint_name(u->ep), ud->id);
        }
        if (r < 0)
                gw_log_errno(LOG_WARNING, r, "Upstream endpoint %s: cannot give the local identity %s its upstream "
                             "key: %m", gw_endpoint_name(u->ep), ud->id);
        hub_device_done(&dev);
        hub_device_done(&out);
}

static void up_destroy(void *t);

/* The spool: <state directory>/upstream-<endpoint>.c2d/ (0700), next to the store. */
static int spool_open(struct up_ep *u, const char *name) {
        const char *store_path = hub_store_path(u->hub->store);
        if (!store_path) {
                gw_log_error("Endpoint %s: the store has no directory for the C2D spool", name);
                return -EINVAL;
        }
        _cleanup_free_ char *db = strdup(store_path), *safe = strdup(name);
        if (!db || !safe)
                return -ENOMEM;
        for (char *p = safe; *p; p++)
                if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", *p) ||
                    (p == safe && *p == '.'))
                        *p = '_';
        if (asprintf(&u->spool_dir, "%s/upstream-%s.c2d", dirname(db), safe) < 0) {
                u->spool_dir = NULL;
                return -ENOMEM;
        }
        if (mkdir(u->spool_dir, 0700) < 0 && errno != EEXIST) {
                int r = -errno;
                gw_log_errno(LOG_ERR, r, "Endpoint %s: cannot create the C2D spool %s: %m", name, u->spool_dir);
                return r;
        }
        u->spool_dirfd = open(u->spool_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (u->spool_dirfd < 0) {
                int r = -errno;
                gw_log_errno(LOG_ERR, r, "Endpoint %s: cannot open the C2D spool %s: %m", name, u->spool_dir);
                return r;
        }
        return 0;
}

static int up_create(struct gw_endpoint *ep, const struct gw_endpoint_conf *c, void **ret) {
        struct up_ep *u = calloc(1, sizeof *u);
        int r;
        if (!u)
                return -ENOMEM;
        u->spool_dirfd = -1;
        pthread_mutex_init(&u->spool_lock, NULL);
        u->ep = ep;
        u->hub = gw_endpoint_hub(ep);
        u->window = c->inflight;
        u->keep_alive_sec = (int) (c->keep_alive_usec / USEC_PER_SEC);
        u->timeout_sec = (int) ((c->timeout_usec + USEC_PER_SEC - 1) / USEC_PER_SEC);
        u->token_ttl_usec = c->token_ttl_usec;
        u->retry_initial_usec = c->retry_initial_usec;
        u->retry_max_usec = c->retry_max_usec;
        u->host_name = strdup(c->host_name);
        u->ca_file = c->ca_file ? strdup(c->ca_file) : NULL;
        u->username_tail = strdup("?api-version=" UP_API_VERSION "&DeviceClientType=" UP_CLIENT_TYPE);
        if (asprintf(&u->address, "ssl://%s:%u", c->gateway_host ? c->gateway_host : c->host_name, c->port) < 0)
                u->address = NULL;
        if (c->create_policy) {
                (void) curl_global_init(CURL_GLOBAL_DEFAULT); /* before any request thread */
                u->create_policy = strdup(c->create_policy);
                u->create_key = strdup(c->create_key);
                if (asprintf(&u->registry_url, "https://%s:%u", c->gateway_host ? c->gateway_host : c->host_name,
                             c->create_port) < 0)
                        u->registry_url = NULL;
                if (!u->create_policy || !u->create_key || !u->registry_url) {
                        up_destroy(u);
                        return -ENOMEM;
                }
        }
        u->devs = calloc(c->n_devices, sizeof *u->devs);
        if (!u->host_name || !u->username_tail || !u->address || !u->devs || (c->ca_file && !u->ca_file)) {
                up_destroy(u);
                return -ENOMEM;
        }
        char port[8];
        snprintf(port, sizeof port, "%u", c->port);
        r = gw_tcp_probe_new(gw_endpoint_event(ep), c->gateway_host ? c->gateway_host : c->host_name, port,
                             probe_reachable, probe_wanted, u, &u->probe);
        if (r < 0) {
                up_destroy(u);
                return r;
        }
        r = spool_open(u, c->name);
        if (r >= 0)
                r = sd_event_add_time(gw_endpoint_event(ep), &u->spool_timer, CLOCK_BOOTTIME, UINT64_MAX,
                                      100 * USEC_PER_MSEC, on_spool_timer, u);
        if (r < 0) {
                up_destroy(u);
                return r;
        }
        (void) sd_event_source_set_enabled(u->spool_timer, SD_EVENT_OFF);
        u->spool_next_ep = up_eps;
        up_eps = u;
        r = gw_paho_inbox_new(gw_endpoint_event(ep), on_event, free_ev, u, &u->inbox);
        if (r < 0) {
                up_destroy(u);
                return r;
        }
        for (size_t i = 0; i < c->n_devices; i++) {
                struct up_dev *d = &u->devs[i];
                d->u = u;
                d->id = strdup(c->devices[i].id);
                d->key = strdup(c->devices[i].key);
                u->n_devs++;
                if (!d->id || !d->key) {
                        up_destroy(u);
                        return -ENOMEM;
                }
                r = sd_event_add_time(gw_endpoint_event(ep), &d->timer, CLOCK_BOOTTIME, UINT64_MAX,
                                      10 * USEC_PER_MSEC, on_timer, d);
                if (r < 0) {
                        up_destroy(u);
                        return r;
                }
                (void) sd_event_source_set_enabled(d->timer, SD_EVENT_OFF);
                struct gw_paho_client_conf pc = client_conf(d);
                r = gw_paho_client_new(&pc, &d->client);
                if (r != MQTTASYNC_SUCCESS) {
                        gw_log_error("Endpoint %s: paho cannot create a client for %s at %s (code %d)", c->name,
                                     d->id, u->address, r);
                        up_destroy(u);
                        return -EINVAL;
                }
                sync_local_identity(u, &c->devices[i]);
        }
        spool_replay(u);
        *ret = u;
        return 0;
}

static int up_connect(void *t) {
        struct up_ep *u = t;
        u->active = true;
        /* The endpoint hands out messages at once; each device's connection comes up on its own
         * and keeps its messages until then. */
        gw_endpoint_up(u->ep);
        for (size_t i = 0; i < u->n_devs; i++)
                if (u->devs[i].state == DEV_IDLE)
                        dev_connect(&u->devs[i]);
        return 0;
}

static bool twin_patch_of(const struct hub_msg *m, char **ret) {
        size_t len;
        const char *body = hub_msg_body(m, &len);
        _cleanup_(json_decrefp) json_t *doc = json_loadb(body, len, 0, NULL);
        json_t *rep = json_object_get(json_object_get(doc, "properties"), "reported");
        const char *k;
        json_t *v;
        void *tmp;
        *ret = NULL;
        if (!json_is_object(rep))
                return true;
        json_object_foreach_safe (rep, tmp, k, v)
                if (k[0] == '$')
                        json_object_del(rep, k);
        if (json_object_size(rep) == 0)
                return true;
        *ret = hub_json_dumps(rep, JSON_COMPACT);
        return *ret != NULL;
}

static int up_send(void *t, const struct gw_ep_item *items, size_t n) {
        struct up_ep *u = t;
        for (size_t i = 0; i < n; i++) {
                const struct gw_ep_item *x = &items[i];
                struct up_dev *d = x->module_id ? NULL : find_dev(u, x->device_id);
                const char *src = hub_msg_get_sys(x->msg, HUB_SYS_MESSAGE_SOURCE);
                struct up_item it = { .seq = x->seq };
                if (!d) {
                        gw_endpoint_count_poison(u->ep, x->seq, x->module_id ? "modules have no upstream identity here"
                                                                             : "the device has no upstream identity");
                        gw_endpoint_confirm(u->ep, x->seq, 0);
                        continue;
                }
                if (src && streq(src, "twinChangeEvents")) {
                        if (!twin_patch_of(x->msg, &it.patch))
                                return -ENOMEM;
                        if (!it.patch) { /* no reported change: nothing for the cloud */
                                gw_endpoint_confirm(u->ep, x->seq, 0);
                                continue;
                        }
                } else if (!src || streq(src, "Telemetry"))
                        it.msg = hub_msg_ref(x->msg);
                else {
                        gw_endpoint_count_poison(u->ep, x->seq, "only device messages and reported properties go "
                                                                "upstream");
                        gw_endpoint_confirm(u->ep, x->seq, 0);
                        continue;
                }
                if (q_push(d, &it) < 0) {
                        item_done(&it);
                        return -ENOMEM;
                }
        }
        for (size_t i = 0; i < u->n_devs; i++)
                dev_flush(&u->devs[i]);
        return 0;
}

static void up_disconnect(void *t) {
        struct up_ep *u = t;
        /* The framework resends from its cursor: forget the queues, keep the connections (the
         * cloud must still reach the devices). Confirmations of what was handed out are
         * ignored (tokens no longer in a queue). */
        for (size_t i = 0; i < u->n_devs; i++)
                q_clear(&u->devs[i]);
}

static void up_destroy(void *t) {
        struct up_ep *u = t;
        if (!u)
                return;
        u->active = false;
        for (size_t i = 0; i < u->n_devs; i++) {
                struct up_dev *d = &u->devs[i];
                if (d->client) {
                        if (MQTTAsync_isConnected(d->client)) {
                                MQTTAsync_disconnectOptions o = MQTTAsync_disconnectOptions_initializer;
                                o.timeout = 0;
                                (void) MQTTAsync_disconnect(d->client, &o);
                        }
                        MQTTAsync_destroy(&d->client);
                }
        }
        for (size_t i = 0; i < u->n_devs; i++)
                if (u->devs[i].creating)
                        (void) pthread_join(u->devs[i].create_thread, NULL); /* at most its 10 s timeout */
        /* (C2D messages still in the inbox stay in the spool: see below.) */
        u->inbox = gw_paho_inbox_free(u->inbox);
        u->probe = gw_tcp_probe_free(u->probe);
        for (struct up_ep **p = &up_eps; *p; p = &(*p)->spool_next_ep)
                if (*p == u) {
                        *p = u->spool_next_ep;
                        /* What its inbox still held is in the spool: the endpoint that replaces
                         * this one (a reload) queues it. */
                        spool_retry_soon();
                        break;
                }
        sd_event_source_disable_unref(u->spool_timer);
        if (u->spool_dirfd >= 0)
                close(u->spool_dirfd);
        free(u->spool_dir);
        pthread_mutex_destroy(&u->spool_lock);
        for (struct method_ctx *c = u->calls; c; c = c->next)
                c->u = NULL; /* their completions only free them */
        for (size_t i = 0; i < u->n_devs; i++) {
                struct up_dev *d = &u->devs[i];
                q_clear(d);
                free(d->q);
                sd_event_source_disable_unref(d->timer);
                for (unsigned k = 0; k < UP_SEEN_RING; k++)
                        free(d->seen[k]);
                free(d->id);
                if (d->key) {
                        hub_explicit_bzero(d->key, strlen(d->key));
                        free(d->key);
                }
                if (d->password) {
                        hub_explicit_bzero(d->password, strlen(d->password));
                        free(d->password);
                }
        }
        free(u->devs);
        free(u->host_name);
        free(u->address);
        free(u->username_tail);
        free(u->ca_file);
        free(u->create_policy);
        if (u->create_key) {
                hub_explicit_bzero(u->create_key, strlen(u->create_key));
                free(u->create_key);
        }
        if (u->registry_url)
                curl_global_cleanup();
        free(u->registry_url);
        free(u);
}

const struct gw_endpoint_ops gw_endpoint_upstream_ops = {
        .type = "upstream",
        .create = up_create,
        .connect = up_connect,
        .send = up_send,
        .disconnect = up_disconnect,
        .destroy = up_destroy,
};
