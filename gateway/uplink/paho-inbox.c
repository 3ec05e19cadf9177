/* SPDX-License-Identifier: MIT */
/* paho's threads → the event loop (paho-inbox.h). */

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <MQTTAsync.h>

#include "hub/clock.h"
#include "hub/random.h"
#include "log.h"
#include "paho-inbox.h"

/* When paho's receive thread is woken after gw_paho_inbox_wake_receiver(), in ms: a TCP
 * connect completes after one round trip, which may be long. */
static const unsigned wake_at_ms[] = { 1, 5, 15, 30, 60, 100, 170, 270, 420, 650 };

struct gw_paho_inbox {
        pthread_mutex_t lock;
        struct gw_paho_item *head, *tail;
        int efd;
        sd_event_source *source;
        gw_paho_inbox_fn handler;
        void (*free_item)(struct gw_paho_item *item);
        void *ud;
        sd_event_source *wake_timer;
        uint64_t wake_start;
        unsigned wake_step;
        bool has_waker_ref;
};

/* ---- the waker (paho-inbox.h) -----------------------------------------------------------------
 *
 * One per process, shared by the inboxes (reference counted), loop thread only: a listening
 * socket on 127.0.0.1 (any port), the one connection of our own paho client to it (its
 * CONNECT must carry the random client id: anybody else who connects is closed), answered
 * with a CONNACK; a wake writes a PINGRESP (2 bytes) to it. */

struct waker {
        sd_event *event;
        unsigned refs;
        int lfd, cfd;                 /* listener; our client's connection (-1: none yet) */
        sd_event_source *lsrc;
        MQTTAsync client;
        char client_id[48];
        char uri[48];
        struct pending_conn {
                int fd;
                sd_event_source *src;
                size_t n;
                char buf[256];
                struct waker *w;
        } pend[4];                    /* accepted, CONNECT not yet read */
        sd_event_source *csrc;
        uint64_t connect_at;          /* when waker_connect() last asked paho (monotonic) */
};

static struct waker *the_waker;

static void pend_close(struct pending_conn *p) {
        p->src = sd_event_source_disable_unref(p->src);
        if (p->fd >= 0)
                close(p->fd);
        p->fd = -1;
        p->n = 0;
}

static void waker_drop_conn(struct waker *w) {
        w->csrc = sd_event_source_disable_unref(w->csrc);
        if (w->cfd >= 0)
                close(w->cfd);
        w->cfd = -1;
}

/* Our client's connection: whatever paho sends (a DISCONNECT at the end) is read and ignored. */
static int on_conn_io(sd_event_source *s, int fd, uint32_t revents, void *ud) {
        struct waker *w = ud;
        char buf[256];
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                waker_drop_conn(w);
        return 0;
}

static int on_pend_io(sd_event_source *s, int fd, uint32_t revents, void *ud) {
        struct pending_conn *p = ud;
        struct waker *w = p->w;
        ssize_t n = read(fd, p->buf + p->n, sizeof p->buf - p->n);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                pend_close(p);
                return 0;
        }
        if (n < 0)
                return 0;
        p->n += (size_t) n;
        /* The client id is the CONNECT's last field (no will, user name, password). */
        if (memmem(p->buf, p->n, w->client_id, strlen(w->client_id))) {
                static const char connack[] = { 0x20, 0x02, 0x00, 0x00 };
                if (write(fd, connack, sizeof connack) != (ssize_t) sizeof connack) {
                        pend_close(p);
                        return 0;
                }
                waker_drop_conn(w);
                w->cfd = p->fd;
                p->fd = -1;
                p->src = sd_event_source_disable_unref(p->src);
                p->n = 0;
                if (sd_event_add_io(w->event, &w->csrc, w->cfd, EPOLLIN, on_conn_io, w) < 0)
                        waker_drop_conn(w);
        } else if (p->n == sizeof p->buf)
                pend_close(p);
        return 0;
}

static int on_accept(sd_event_source *s, int fd, uint32_t revents, void *ud) {
        struct waker *w = ud;
        int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0)
                return 0;
        struct pending_conn *p = NULL;
        for (size_t i = 0; i < sizeof w->pend / sizeof w->pend[0] && !p; i++)
                if (w->pend[i].fd < 0)
                        p = &w->pend[i];
        if (!p)
                p = &w->pend[0]; /* somebody else keeps connecting: the oldest goes */
        pend_close(p);
        p->fd = c;
        p->w = w;
        if (sd_event_add_io(w->event, &p->src, c, EPOLLIN, on_pend_io, p) < 0)
                pend_close(p);
        return 0;
}

/* A connect still under way is not asked for again before 5 s: paho would restart it (and its
 * timeout) with every call. */
#define WAKER_RECONNECT_USEC (5 * USEC_PER_SEC)

static void waker_connect(struct waker *w) {
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer;
        uint64_t now = hub_clock_mono(hub_clock_system());
        if (w->connect_at && now - w->connect_at < WAKER_RECONNECT_USEC)
                return;
        w->connect_at = now;
        o.keepAliveInterval = 0; /* no PINGREQ: the PINGRESPs it gets are the wakes */
        o.cleansession = 1;
        o.connectTimeout = 5;
        o.MQTTVersion = MQTTVERSION_3_1_1;
        (void) MQTTAsync_connect(w->client, &o);
}

static void waker_unref(void) {
        struct waker *w = the_waker;
        if (!w || --w->refs > 0)
                return;
        the_waker = NULL;
        if (w->client) {
                if (MQTTAsync_isConnected(w->client)) {
                        MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
                        d.timeout = 0;
                        (void) MQTTAsync_disconnect(w->client, &d);
                }
                MQTTAsync_destroy(&w->client);
        }
        waker_drop_conn(w);
        for (size_t i = 0; i < sizeof w->pend / sizeof w->pend[0]; i++)
                pend_close(&w->pend[i]);
        sd_event_source_disable_unref(w->lsrc);
        if (w->lfd >= 0)
                close(w->lfd);
        sd_event_unref(w->event);
        free(w);
}

/* Takes a reference on the process's waker (created on first use). -errno. */
static int waker_ref(sd_event *e) {
        struct waker *w = the_waker;
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t sl = sizeof sa;
        uint8_t rnd[12];
        int r;
        if (w) {
                w->refs++;
                return 0;
        }
        w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        w->refs = 1;
        w->cfd = -1;
        for (size_t i = 0; i < sizeof w->pend / sizeof w->pend[0]; i++)
                w->pend[i].fd = -1;
        w->event = sd_event_ref(e);
        the_waker = w;
        w->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (w->lfd < 0 || bind(w->lfd, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(w->lfd, 4) < 0 ||
            getsockname(w->lfd, (struct sockaddr *) &sa, &sl) < 0) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_io(e, &w->lsrc, w->lfd, EPOLLIN, on_accept, w);
        if (r < 0)
                goto fail;
        r = hub_random_bytes(rnd, sizeof rnd);
        if (r < 0)
                goto fail;
        int o = snprintf(w->client_id, sizeof w->client_id, "fieldhub-waker-");
        for (size_t i = 0; i < sizeof rnd; i++)
                o += snprintf(w->client_id + o, sizeof w->client_id - (size_t) o, "%02x", rnd[i]);
        snprintf(w->uri, sizeof w->uri, "tcp://127.0.0.1:%u", (unsigned) ntohs(sa.sin_port));
        MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
        co.MQTTVersion = MQTTVERSION_3_1_1;
        if (MQTTAsync_createWithOptions(&w->client, w->uri, w->client_id, MQTTCLIENT_PERSISTENCE_NONE, NULL, &co) !=
            MQTTASYNC_SUCCESS) {
                w->client = NULL;
                r = -EIO;
                goto fail;
        }
        waker_connect(w);
        return 0;
fail:
        waker_unref();
        return r;
}

static void waker_kick(void) {
        static const char pingresp[] = { (char) 0xd0, 0x00 };
        struct waker *w = the_waker;
        if (!w)
                return;
        if (w->cfd < 0) {
                /* Not (or no longer) connected: try again; this wake is lost. */
                if (w->client && !MQTTAsync_isConnected(w->client))
                        waker_connect(w);
                return;
        }
        /* Both bytes or none: a lone 0xd0 would make paho read the next one as a length. */
        ssize_t n = send(w->cfd, pingresp, sizeof pingresp, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n != (ssize_t) sizeof pingresp && !(n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
                waker_drop_conn(w);
}

static int on_wake_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_paho_inbox *ib = userdata;
        waker_kick();
        if (++ib->wake_step < sizeof wake_at_ms / sizeof wake_at_ms[0] &&
            sd_event_source_set_time(s, ib->wake_start + wake_at_ms[ib->wake_step] * USEC_PER_MSEC) >= 0)
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

void gw_paho_inbox_wake_receiver(struct gw_paho_inbox *ib) {
        if (!ib || !ib->wake_timer || !ib->has_waker_ref)
                return;
        ib->wake_start = hub_clock_mono(hub_clock_system());
        ib->wake_step = 0;
        if (sd_event_source_set_time(ib->wake_timer, ib->wake_start + wake_at_ms[0] * USEC_PER_MSEC) >= 0)
                (void) sd_event_source_set_enabled(ib->wake_timer, SD_EVENT_ONESHOT);
}

/* ---- the inbox --------------------------------------------------------------------------- */

static int on_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct gw_paho_inbox *ib = userdata;
        uint64_t v;
        (void) !read(ib->efd, &v, sizeof v);
        pthread_mutex_lock(&ib->lock);
        struct gw_paho_item *it = ib->head;
        ib->head = ib->tail = NULL;
        pthread_mutex_unlock(&ib->lock);
        while (it) {
                struct gw_paho_item *next = it->next;
                ib->handler(ib->ud, it);
                ib->free_item(it);
                it = next;
        }
        return 0;
}

int gw_paho_inbox_new(sd_event *e, gw_paho_inbox_fn handler, void (*free_item)(struct gw_paho_item *item), void *ud,
                      struct gw_paho_inbox **ret) {
        struct gw_paho_inbox *ib;
        int r;
        if (!e || !handler || !free_item || !ret)
                return -EINVAL;
        ib = calloc(1, sizeof *ib);
        if (!ib)
                return -ENOMEM;
        pthread_mutex_init(&ib->lock, NULL);
        ib->handler = handler;
        ib->free_item = free_item;
        ib->ud = ud;
        ib->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (ib->efd < 0) {
                r = -errno;
                gw_paho_inbox_free(ib);
                return r;
        }
        r = sd_event_add_io(e, &ib->source, ib->efd, EPOLLIN, on_ready, ib);
        if (r >= 0)
                r = sd_event_add_time(e, &ib->wake_timer, CLOCK_BOOTTIME, UINT64_MAX, 1, on_wake_timer, ib);
        if (r < 0) {
                gw_paho_inbox_free(ib);
                return r;
        }
        (void) sd_event_source_set_enabled(ib->wake_timer, SD_EVENT_OFF);
        /* Without the waker, connections only take paho's second longer. */
        r = waker_ref(e);
        if (r < 0)
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "uplink"),
                            "Cannot set up the wake-up connection of paho's receive thread (%m): MQTT connections "
                            "may take a second longer");
        else
                ib->has_waker_ref = true;
        *ret = ib;
        return 0;
}

void gw_paho_inbox_post(struct gw_paho_inbox *ib, struct gw_paho_item *item) {
        uint64_t one = 1;
        item->next = NULL;
        pthread_mutex_lock(&ib->lock);
        if (ib->tail)
                ib->tail->next = item;
        else
                ib->head = item;
        ib->tail = item;
        pthread_mutex_unlock(&ib->lock);
        (void) !write(ib->efd, &one, sizeof one);
}

struct gw_paho_inbox *gw_paho_inbox_free(struct gw_paho_inbox *ib) {
        if (!ib)
                return NULL;
        sd_event_source_disable_unref(ib->source);
        sd_event_source_disable_unref(ib->wake_timer);
        if (ib->has_waker_ref)
                waker_unref();
        if (ib->efd >= 0)
                close(ib->efd);
        for (struct gw_paho_item *it = ib->head, *n; it; it = n) {
                n = it->next;
                ib->free_item(it);
        }
        pthread_mutex_destroy(&ib->lock);
        free(ib);
        return NULL;
}

/* ---- paho clients (paho-inbox.h) ------------------------------------------------------------- */

int gw_paho_client_new(const struct gw_paho_client_conf *c, MQTTAsync *ret) {
        MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
        MQTTAsync client = NULL;
        co.sendWhileDisconnected = 0;
        co.maxBufferedMessages = c->max_buffered;
        co.MQTTVersion = c->mqtt_version;
        int r = MQTTAsync_createWithOptions(&client, c->uri, c->client_id, MQTTCLIENT_PERSISTENCE_NONE, NULL, &co);
        if (r != MQTTASYNC_SUCCESS)
                return r;
        r = MQTTAsync_setCallbacks(client, c->context, c->lost, c->arrived, NULL);
        if (r != MQTTASYNC_SUCCESS) {
                MQTTAsync_destroy(&client);
                return r;
        }
        *ret = client;
        return MQTTASYNC_SUCCESS;
}

int gw_paho_client_renew(const struct gw_paho_client_conf *c, MQTTAsync *client) {
        MQTTAsync fresh;
        int r = gw_paho_client_new(c, &fresh);
        if (r != MQTTASYNC_SUCCESS)
                return r;
        if (*client)
                MQTTAsync_destroy(client);
        *client = fresh;
        return MQTTASYNC_SUCCESS;
}
