/* SPDX-License-Identifier: MIT */
/* The endpoint framework and the set of configured endpoints (endpoint.h, uplink.h). */

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "endpoint.h"
#include "hub.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/random.h"
#include "hub/route.h"
#include "hub/twin.h"
#include "log-ids.h"
#include "log.h"
#include "uplink.h"

enum ep_state { EP_STOPPED, EP_CONNECTING, EP_UP, EP_BACKOFF, _EP_STATE_MAX };
static const char *const state_names[] = { "stopped", "connecting", "up", "down" };

struct inflight {
        uint64_t seq;   /* last sequence number of the entry */
        bool done;      /* confirmed (or skipped: not routed here) */
};

struct gw_endpoint {
        struct gw_uplink *u;
        char *name;
        struct gw_endpoint_conf conf_copy; /* only scalar settings are used: pointers borrowed from u->cfg */
        char *fingerprint;
        const struct gw_endpoint_ops *ops;
        void *t;
        struct hub_outbox_endpoint *oep;
        enum ep_state state;
        bool was_up, down_logged, in_pump, pump_again;
        /* The reachability probe while down (endpoint.h); spent: it answered once in this
         * outage (the outage ends when the endpoint is up again); reachable_again: it answered
         * after an outage while a connection attempt was under way (if that attempt fails, the
         * next one starts at once). */
        struct gw_tcp_probe *probe;
        bool probe_spent, reachable_again;
        unsigned failures;
        char *last_error;
        uint64_t read_pos;   /* last seq handed out (or skipped) */
        uint64_t confirmed;  /* last seq confirmed in order */
        uint64_t acked;      /* last seq handed to hub_outbox_ack() (or the cursor it had) */
        struct inflight *ring;
        size_t ring_cap, ring_head, ring_n, unconfirmed;
        sd_event_source *retry_timer, *pump_source;
        /* stats */
        uint64_t poison, oversize, sent, last_delivered, last_drops, last_expiries, last_rejected;
        uint64_t last_tick_mono;
        double drain_rate;
};

struct gw_uplink {
        sd_event *event;
        struct gw_hub *hub;
        struct hub_router *router;
        struct gw_endpoint **eps;
        size_t n_eps;
        sd_event_source *tick;
};

static uint64_t mono_now(void) {
        return hub_clock_mono(hub_clock_system());
}

static const struct gw_endpoint_ops *ops_of(enum gw_endpoint_type t) {
        switch (t) {
        case GW_ENDPOINT_MQTT:
                return &gw_endpoint_mqtt_ops;
        case GW_ENDPOINT_FILE:
                return &gw_endpoint_file_ops;
        case GW_ENDPOINT_HTTP:
                return &gw_endpoint_http_ops;
        case GW_ENDPOINT_UPSTREAM:
                return &gw_endpoint_upstream_ops;
        default:
                return NULL;
        }
}

const char *gw_endpoint_name(const struct gw_endpoint *ep) {
        return ep->name;
}

struct sd_event *gw_endpoint_event(const struct gw_endpoint *ep) {
        return ep->u->event;
}

struct gw_hub *gw_endpoint_hub(const struct gw_endpoint *ep) {
        return ep->u->hub;
}

/* ---- the TCP reachability probe (endpoint.h) ---------------------------------------------- */

struct gw_tcp_probe {
        sd_event *event;
        char *host, *port, *target;
        gw_tcp_probe_reachable_fn reachable;
        bool (*wanted)(void *ud);
        void *ud;
        sd_event_source *timer, *io;
        int fd;
        bool running, saw_down, gai_busy, have_addr;
        uint64_t sent;                 /* when the pending probe connect started */
        struct gaicb gai;
        struct addrinfo gai_hints;
        struct sockaddr_storage addr;
        socklen_t addrlen;
};

static void probe_close(struct gw_tcp_probe *p) {
        p->io = sd_event_source_disable_unref(p->io);
        if (p->fd >= 0)
                close(p->fd);
        p->fd = -1;
}

void gw_tcp_probe_stop(struct gw_tcp_probe *p) {
        if (!p)
                return;
        probe_close(p);
        (void) sd_event_source_set_enabled(p->timer, SD_EVENT_OFF);
        p->running = false;
}

static void probe_arm(struct gw_tcp_probe *p, uint64_t usec) {
        if (sd_event_source_set_time(p->timer, mono_now() + usec) >= 0)
                (void) sd_event_source_set_enabled(p->timer, SD_EVENT_ONESHOT);
}

void gw_tcp_probe_start(struct gw_tcp_probe *p) {
        if (!p || p->running)
                return;
        p->running = true;
        p->saw_down = false;
        p->have_addr = false; /* resolved again for every run */
        probe_arm(p, GW_TCP_PROBE_PERIOD_USEC);
}

bool gw_tcp_probe_running(const struct gw_tcp_probe *p) {
        return p && p->running;
}

const char *gw_tcp_probe_target(const struct gw_tcp_probe *p) {
        return p ? p->target : "";
}

static void probe_answered(struct gw_tcp_probe *p) {
        bool was_down = p->saw_down;
        gw_tcp_probe_stop(p);
        p->reachable(p->ud, was_down); /* last: it may free or restart the probe */
}

static int on_probe_io(sd_event_source *s, int fd, uint32_t revents, void *ud) {
        struct gw_tcp_probe *p = ud;
        int err = 0;
        socklen_t l = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
                err = errno;
        probe_close(p);
        if (err != 0)
                p->saw_down = true;
        else if (p->running)
                probe_answered(p);
        return 0;
}

/* 0: p->addr is set; 1: resolving (getaddrinfo_a, polled); -errno: failed. */
static int probe_resolve(struct gw_tcp_probe *p) {
        if (!p->gai_busy) {
                struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV },
                                *res = NULL;
                if (getaddrinfo(p->host, p->port, &hints, &res) == 0 && res && res->ai_addrlen <= sizeof p->addr) {
                        memcpy(&p->addr, res->ai_addr, res->ai_addrlen);
                        p->addrlen = res->ai_addrlen;
                        p->have_addr = true;
                        freeaddrinfo(res);
                        return 0;
                }
                if (res)
                        freeaddrinfo(res);
                p->gai_hints = (struct addrinfo) { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV };
                p->gai = (struct gaicb) { .ar_name = p->host, .ar_service = p->port, .ar_request = &p->gai_hints };
                struct gaicb *list[1] = { &p->gai };
                if (getaddrinfo_a(GAI_NOWAIT, list, 1, NULL) != 0)
                        return -EAGAIN;
                p->gai_busy = true;
        }
        int r = gai_error(&p->gai);
        if (r == EAI_INPROGRESS)
                return 1;
        p->gai_busy = false;
        if (r == 0 && p->gai.ar_result && p->gai.ar_result->ai_addrlen <= sizeof p->addr) {
                memcpy(&p->addr, p->gai.ar_result->ai_addr, p->gai.ar_result->ai_addrlen);
                p->addrlen = p->gai.ar_result->ai_addrlen;
                p->have_addr = true;
        }
        if (p->gai.ar_result)
                freeaddrinfo(p->gai.ar_result);
        p->gai.ar_result = NULL;
        return p->have_addr ? 0 : -EHOSTUNREACH;
}

static int on_probe_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct gw_tcp_probe *p = ud;
        if (!p->running)
                return 0;
        if (p->wanted && !p->wanted(p->ud)) {
                gw_tcp_probe_stop(p);
                return 0;
        }
        if (p->fd >= 0) {
                if (mono_now() - p->sent < GW_TCP_PROBE_TIMEOUT_USEC) {
                        probe_arm(p, GW_TCP_PROBE_PERIOD_USEC); /* a long round trip: let it answer */
                        return 0;
                }
                probe_close(p);
                p->saw_down = true;
        }
        int r = p->have_addr ? 0 : probe_resolve(p);
        if (r == 1) {
                probe_arm(p, GW_TCP_PROBE_PERIOD_USEC);
                return 0;
        }
        if (r < 0)
                p->saw_down = true;
        else {
                int fd = socket(p->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                if (fd >= 0) {
                        if (connect(fd, (struct sockaddr *) &p->addr, p->addrlen) == 0) {
                                close(fd);
                                probe_answered(p);
                                return 0;
                        }
                        if (errno == EINPROGRESS &&
                            sd_event_add_io(p->event, &p->io, fd, EPOLLOUT, on_probe_io, p) >= 0) {
                                p->fd = fd;
                                p->sent = mono_now();
                        } else {
                                close(fd); /* refused at once: still down */
                                p->saw_down = true;
                        }
                }
        }
        probe_arm(p, GW_TCP_PROBE_PERIOD_USEC);
        return 0;
}

int gw_tcp_probe_new(sd_event *e, const char *host, const char *port, gw_tcp_probe_reachable_fn reachable,
                     bool (*wanted)(void *ud), void *ud, struct gw_tcp_probe **ret) {
        struct gw_tcp_probe *p;
        int r;
        if (!e || !host || !port || !reachable || !ret)
                return -EINVAL;
        p = calloc(1, sizeof *p);
        if (!p)
                return -ENOMEM;
        p->fd = -1;
        p->event = sd_event_ref(e);
        p->reachable = reachable;
        p->wanted = wanted;
        p->ud = ud;
        p->host = strdup(host);
        p->port = strdup(port);
        if (!p->host || !p->port ||
            asprintf(&p->target, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port) < 0) {
                p->target = NULL;
                gw_tcp_probe_free(p);
                return -ENOMEM;
        }
        r = sd_event_add_time(e, &p->timer, CLOCK_BOOTTIME, UINT64_MAX, 10 * USEC_PER_MSEC, on_probe_timer, p);
        if (r < 0) {
                gw_tcp_probe_free(p);
                return r;
        }
        (void) sd_event_source_set_enabled(p->timer, SD_EVENT_OFF);
        *ret = p;
        return 0;
}

struct gw_tcp_probe *gw_tcp_probe_free(struct gw_tcp_probe *p) {
        if (!p)
                return NULL;
        probe_close(p);
        sd_event_source_disable_unref(p->timer);
        if (p->gai_busy && gai_cancel(&p->gai) == EAI_NOTCANCELED) {
                /* A name lookup is running on glibc's thread: wait for it (the resolver's
                 * timeouts bound it) so that it never writes into freed memory. */
                const struct gaicb *list[1] = { &p->gai };
                while (gai_error(&p->gai) == EAI_INPROGRESS)
                        (void) gai_suspend(list, 1, NULL);
        }
        if (p->gai.ar_result)
                freeaddrinfo(p->gai.ar_result);
        sd_event_unref(p->event);
        free(p->host);
        free(p->port);
        free(p->target);
        free(p);
        return NULL;
}

int gw_address_host_port(const char *address, char **ret_host, char **ret_port) {
        static const struct {
                const char *scheme, *port;
        } defaults[] = {
                { "tcp", "1883" }, { "mqtt", "1883" }, { "ssl", "8883" }, { "mqtts", "8883" },
                { "ws", "80" },    { "wss", "443" },   { "http", "80" },  { "https", "443" },
        };
        const char *p = address, *def = NULL, *host, *host_end, *port = NULL;
        size_t port_len = 0;
        if (!address || !ret_host || !ret_port)
                return -EINVAL;
        const char *sep = strstr(address, "://");
        if (sep) {
                for (size_t i = 0; i < ELEMENTSOF(defaults); i++)
                        if (strlen(defaults[i].scheme) == (size_t) (sep - address) &&
                            strncasecmp(address, defaults[i].scheme, (size_t) (sep - address)) == 0)
                                def = defaults[i].port;
                p = sep + 3;
        }
        /* user:password@ (http URLs) */
        const char *at = strchr(p, '@'), *slash = strpbrk(p, "/?#");
        if (at && (!slash || at < slash))
                p = at + 1;
        if (*p == '[') {
                host = p + 1;
                host_end = strchr(host, ']');
                if (!host_end)
                        return -EINVAL;
                p = host_end + 1;
        } else {
                host = p;
                host_end = p + strcspn(p, ":/?#");
                p = host_end;
        }
        if (*p == ':') {
                port = p + 1;
                port_len = strspn(port, "0123456789");
                if (port_len == 0 || port_len > 5)
                        return -EINVAL;
        }
        if (host_end == host || (!port && !def))
                return -EINVAL;
        char *h = strndup(host, (size_t) (host_end - host)), *pt = port ? strndup(port, port_len) : strdup(def);
        if (!h || !pt) {
                free(h);
                free(pt);
                return -ENOMEM;
        }
        *ret_host = h;
        *ret_port = pt;
        return 0;
}

/* ---- the in-flight ring ----------------------------------------------------------------- */

static struct inflight *ring_at(struct gw_endpoint *ep, size_t i) {
        return &ep->ring[(ep->ring_head + i) % ep->ring_cap];
}

static int ring_push(struct gw_endpoint *ep, uint64_t seq, bool done) {
        if (done && ep->ring_n > 0 && ring_at(ep, ep->ring_n - 1)->done) {
                ring_at(ep, ep->ring_n - 1)->seq = seq; /* extend a run of skipped / confirmed */
                return 0;
        }
        if (done && ep->ring_n == 0) {
                ep->confirmed = seq;
                return 0;
        }
        if (ep->ring_n == ep->ring_cap) {
                size_t cap = ep->ring_cap ? ep->ring_cap * 2 : 256;
                struct inflight *n = malloc(cap * sizeof *n);
                if (!n)
                        return -ENOMEM;
                for (size_t i = 0; i < ep->ring_n; i++)
                        n[i] = *ring_at(ep, i);
                free(ep->ring);
                ep->ring = n;
                ep->ring_cap = cap;
                ep->ring_head = 0;
        }
        *ring_at(ep, ep->ring_n++) = (struct inflight) { .seq = seq, .done = done };
        if (!done)
                ep->unconfirmed++;
        return 0;
}

static void ack_done(int result, void *ud) {
        if (result < 0)
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "uplink"),
                            "Cannot store an endpoint cursor: %m (messages may be sent again)");
}

static void advance(struct gw_endpoint *ep) {
        while (ep->ring_n > 0 && ring_at(ep, 0)->done) {
                ep->confirmed = ring_at(ep, 0)->seq;
                ep->ring_head = (ep->ring_head + 1) % ep->ring_cap;
                ep->ring_n--;
        }
        /* Compared with what was last acknowledged, not with confirmed before this call:
         * ring_push() moves confirmed itself over skipped messages when nothing is in flight. */
        if (ep->confirmed > ep->acked && ep->oep) {
                ep->acked = ep->confirmed;
                int r = hub_outbox_ack(ep->u->hub->outbox, ep->oep, ep->confirmed, ack_done, NULL);
                if (r < 0)
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "uplink", .endpoint = ep->name),
                                    "Cannot move the cursor of endpoint %s: %m", ep->name);
        }
}

static void ring_clear(struct gw_endpoint *ep) {
        ep->ring_head = ep->ring_n = ep->unconfirmed = 0;
}

/* ---- state machine ---------------------------------------------------------------------- */

static void schedule_pump(struct gw_endpoint *ep) {
        if (ep->pump_source)
                (void) sd_event_source_set_enabled(ep->pump_source, SD_EVENT_ONESHOT);
}

static void retry_now(struct gw_endpoint *ep) {
        if (ep->state != EP_BACKOFF)
                return;
        (void) sd_event_source_set_enabled(ep->retry_timer, SD_EVENT_OFF);
        ep->state = EP_CONNECTING;
        int r = ep->ops->connect(ep->t);
        if (r < 0 && ep->state == EP_CONNECTING)
                gw_endpoint_down(ep, r, "connect failed");
}

static int on_retry(sd_event_source *s, uint64_t usec, void *ud) {
        retry_now(ud);
        return 0;
}

static bool probe_wanted(void *ud) {
        struct gw_endpoint *ep = ud;
        return ep->state == EP_BACKOFF || ep->state == EP_CONNECTING;
}

/* The far side's host:port answers TCP connects again. */
static void on_reachable(void *ud, bool was_down) {
        struct gw_endpoint *ep = ud;
        ep->probe_spent = true;
        if (!was_down) {
                /* Answered from the first probe on: the far side is there and dropped or refused
                 * the connection above TCP; the backoff stays, so that it is not hammered. */
                gw_log_full(LOG_DEBUG, 0, GW_FIELDS(.component = "uplink", .endpoint = ep->name),
                            "Endpoint %s: %s answers; the retries keep their backoff", ep->name,
                            gw_tcp_probe_target(ep->probe));
                return;
        }
        gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "uplink", .endpoint = ep->name),
                    "Endpoint %s: %s answers again; reconnecting now", ep->name, gw_tcp_probe_target(ep->probe));
        ep->failures = 0;
        if (ep->state == EP_CONNECTING)
                ep->reachable_again = true; /* an attempt is under way; if it fails, retry at once */
        else
                retry_now(ep);
}

static uint64_t backoff_delay(struct gw_endpoint *ep) {
        uint64_t d = ep->conf_copy.retry_initial_usec;
        for (unsigned i = 1; i < ep->failures && d < ep->conf_copy.retry_max_usec; i++)
                d *= 2;
        if (d > ep->conf_copy.retry_max_usec)
                d = ep->conf_copy.retry_max_usec;
        uint32_t rnd = 0;
        (void) hub_random_bytes(&rnd, sizeof rnd);
        /* ±25% jitter, so that many gateways do not reconnect in step; never past retry.max,
         * which is what bounds the time from the far side's return to the drain's start. */
        uint64_t span = d / 2;
        d = d - d / 4 + (span ? rnd % span : 0);
        return MIN(d, ep->conf_copy.retry_max_usec);
}

void gw_endpoint_down(struct gw_endpoint *ep, int error, const char *why) {
        if (ep->state == EP_STOPPED || ep->state == EP_BACKOFF)
                return;
        free(ep->last_error);
        ep->last_error = strdup(why ? why : "unknown error");
        ep->failures++;
        if (!ep->down_logged) {
                ep->down_logged = true;
                gw_log_full(LOG_WARNING, error,
                            GW_FIELDS(.component = "uplink", .endpoint = ep->name, .message_id = GW_MSG_ENDPOINT_DOWN,
                                      .event = "endpoint-down", .no_ratelimit = true),
                            "Endpoint %s is unreachable (%s: %m); messages are kept and sent once it is back",
                            ep->name, ep->last_error);
        } else
                gw_log_full(LOG_DEBUG, error, GW_FIELDS(.component = "uplink", .endpoint = ep->name),
                            "Endpoint %s: retry failed (%s: %m)", ep->name, ep->last_error);
        ep->state = EP_BACKOFF;
        ep->ops->disconnect(ep->t);
        advance(ep); /* confirmations not yet taken by pump() */
        /* Everything unconfirmed is resent from the cursor on the next connection. */
        ring_clear(ep);
        ep->read_pos = ep->confirmed;
        /* An attempt that started before the probe saw the far side return: once more now. */
        uint64_t at = mono_now() + (ep->reachable_again ? 0 : backoff_delay(ep));
        ep->reachable_again = false;
        if (sd_event_source_set_time(ep->retry_timer, at) >= 0)
                (void) sd_event_source_set_enabled(ep->retry_timer, SD_EVENT_ONESHOT);
        if (ep->probe && !ep->probe_spent)
                gw_tcp_probe_start(ep->probe);
}

void gw_endpoint_up(struct gw_endpoint *ep) {
        if (ep->state != EP_CONNECTING)
                return;
        ep->state = EP_UP;
        ep->failures = 0;
        ep->probe_spent = ep->reachable_again = false; /* the next outage is probed again */
        gw_tcp_probe_stop(ep->probe);
        if (ep->down_logged)
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "uplink", .endpoint = ep->name, .message_id = GW_MSG_ENDPOINT_UP,
                                      .event = "endpoint-up", .no_ratelimit = true),
                            "Endpoint %s is reachable again; sending what it missed", ep->name);
        else
                gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "uplink", .endpoint = ep->name),
                            "Endpoint %s connected", ep->name);
        ep->down_logged = false;
        ep->was_up = true;
        free(ep->last_error);
        ep->last_error = NULL;
        schedule_pump(ep);
}

void gw_endpoint_confirm(struct gw_endpoint *ep, uint64_t seq, int result) {
        if (ep->state != EP_UP)
                return;
        if (result < 0) {
                gw_endpoint_down(ep, result, "the far side refused a message");
                return;
        }
        /* The ring is in ascending seq order: binary search for the entry (confirmations
         * pile up at the front until pump() advances, so a scan would be quadratic). */
        size_t lo = 0, hi = ep->ring_n;
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (ring_at(ep, mid)->seq < seq)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        if (lo < ep->ring_n) {
                struct inflight *f = ring_at(ep, lo);
                if (f->seq == seq && !f->done) {
                        f->done = true;
                        ep->unconfirmed--;
                        ep->sent++;
                }
        }
        /* The cursor moves in pump(), once for every confirmation that arrived meanwhile (a
         * transport confirms message by message; one cursor write covers them all). */
        schedule_pump(ep);
}

void gw_endpoint_count_poison(struct gw_endpoint *ep, uint64_t seq, const char *why) {
        ep->poison++;
        gw_log_full(LOG_ERR, 0,
                    GW_FIELDS(.component = "uplink", .endpoint = ep->name, .message_id = GW_MSG_QUEUE_OVERFLOW,
                              .event = "poison", .ratelimit_key = ep->name),
                    "Endpoint %s refused message %llu for good (%s); it is skipped (poison count %llu)", ep->name,
                    (unsigned long long) seq, why, (unsigned long long) ep->poison);
}

/* ---- the reader -------------------------------------------------------------------------- */

struct twin_cache {
        char *device;
        json_t *twin;
};

static const json_t *twin_of(struct gw_uplink *u, struct twin_cache *c, const char *device) {
        if (c->device && streq(c->device, device))
                return c->twin;
        free(c->device);
        json_decref(c->twin);
        c->twin = NULL;
        c->device = strdup(device);
        if (hub_twin_get(u->hub->twins, device, &c->twin) < 0)
                c->twin = NULL;
        return c->twin;
}

static void pump(struct gw_endpoint *ep) {
        struct gw_uplink *u = ep->u;
        struct hub_outbox *o = u->hub->outbox;
        int idx = hub_router_endpoint_index(u->router, ep->name);
        bool need_twin = hub_router_needs_twin(u->router);
        struct twin_cache tc = { 0 };

        if (ep->in_pump) {
                ep->pump_again = true;
                return;
        }
        ep->in_pump = true;
        advance(ep);
        while (ep->state == EP_UP && ep->unconfirmed < ep->conf_copy.inflight) {
                struct hub_outbox_entry *es = NULL;
                size_t n = 0, room = ep->conf_copy.inflight - ep->unconfirmed;
                size_t max = MIN(room, (size_t) ep->conf_copy.batch_max);
                if (ep->read_pos >= hub_outbox_head(o))
                        break;
                int r = hub_outbox_read(o, ep->oep, ep->read_pos, max, 4 * 1024 * 1024, &es, &n);
                if (r < 0) {
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "uplink", .endpoint = ep->name),
                                    "Cannot read the outbox for endpoint %s: %m", ep->name);
                        break;
                }
                if (n == 0) {
                        /* Everything left expired or was dropped: the cursor moved past it. */
                        struct hub_outbox_endpoint_stats st;
                        hub_outbox_endpoint_get_stats(ep->oep, &st);
                        if (st.cursor > ep->read_pos && ep->ring_n == 0)
                                ep->read_pos = ep->confirmed = ep->acked = st.cursor;
                        break;
                }
                struct gw_ep_item *items = calloc(n, sizeof *items);
                size_t ni = 0;
                if (!items) {
                        hub_outbox_entries_free(es, n);
                        break;
                }
                /* A message the cursor already moved past (drop-oldest, TTL) is not ours. */
                for (size_t i = 0; i < n; i++) {
                        struct hub_outbox_entry *x = &es[i];
                        struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(
                                x->msg, need_twin && x->device_id ? twin_of(u, &tc, x->device_id) : NULL);
                        uint64_t set = idx >= 0 ? hub_router_route(u->router, &ctx, NULL) : 0;
                        bool mine = idx >= 0 && (set & (UINT64_C(1) << idx));
                        if (mine) {
                                r = hub_router_enrich(u->router, ep->name, x->msg, &ctx);
                                if (r == -E2BIG) {
                                        ep->oversize++;
                                        gw_log_full(LOG_WARNING, 0,
                                                    GW_FIELDS(.component = "uplink", .endpoint = ep->name,
                                                              .device = x->device_id,
                                                              .message_id = GW_MSG_QUEUE_OVERFLOW,
                                                              .event = "oversize", .ratelimit_key = ep->name),
                                                    "Message %llu of %s is over 256 KB after enrichment for "
                                                    "endpoint %s: dropped (%llu so far)",
                                                    (unsigned long long) x->seq, x->device_id, ep->name,
                                                    (unsigned long long) ep->oversize);
                                        mine = false;
                                }
                        }
                        hub_cond_ctx_done(&ctx);
                        if (ring_push(ep, x->seq, !mine) < 0) {
                                n = i; /* out of memory: hand out what is recorded */
                                break;
                        }
                        if (mine)
                                items[ni++] = (struct gw_ep_item) { .seq = x->seq, .enqueued_usec = x->enqueued_usec,
                                                                    .device_id = x->device_id,
                                                                    .module_id = x->module_id, .msg = x->msg };
                }
                if (n > 0)
                        ep->read_pos = es[n - 1].seq;
                if (ni > 0) {
                        r = ep->ops->send(ep->t, items, ni);
                        if (r < 0 && ep->state == EP_UP)
                                gw_endpoint_down(ep, r, "send failed");
                }
                free(items);
                hub_outbox_entries_free(es, n ? n : 0);
                advance(ep);
                if (n == 0)
                        break;
        }
        free(tc.device);
        json_decref(tc.twin);
        ep->in_pump = false;
        if (ep->pump_again) {
                ep->pump_again = false;
                schedule_pump(ep);
        }
}

static int on_pump(sd_event_source *s, void *ud) {
        pump(ud);
        return 0;
}

static void on_appended(void *ud, uint64_t seq) {
        struct gw_uplink *u = ud;
        for (size_t i = 0; i < u->n_eps; i++)
                if (u->eps[i]->state == EP_UP && u->eps[i]->unconfirmed < u->eps[i]->conf_copy.inflight)
                        schedule_pump(u->eps[i]);
}

/* ---- statistics and the drop / expiry log -------------------------------------------------- */

static void ep_tick(struct gw_endpoint *ep, uint64_t now) {
        struct hub_outbox_endpoint_stats st;
        /* One rate limit per endpoint and kind: a burst of drops must not hide an expiry. */
        char key_drop[HUB_OUTBOX_ENDPOINT_NAME_MAX + 16], key_full[sizeof key_drop], key_ttl[sizeof key_drop];
        snprintf(key_drop, sizeof key_drop, "%s/overflow", ep->name);
        snprintf(key_full, sizeof key_full, "%s/full", ep->name);
        snprintf(key_ttl, sizeof key_ttl, "%s/expired", ep->name);
        hub_outbox_endpoint_get_stats(ep->oep, &st);
        if (ep->last_tick_mono) {
                double dt = (double) (now - ep->last_tick_mono) / 1e6;
                double rate = dt > 0 ? (double) (st.delivered - ep->last_delivered) / dt : 0;
                ep->drain_rate = ep->drain_rate * 0.5 + rate * 0.5;
        }
        if (st.drops > ep->last_drops)
                gw_log_full(LOG_WARNING, 0,
                            GW_FIELDS(.component = "uplink", .endpoint = ep->name, .message_id = GW_MSG_QUEUE_OVERFLOW,
                                      .event = "queue-overflow", .ratelimit_key = key_drop,
                                      .queue_depth = (long long) st.backlog_count, .has_queue_depth = true),
                            "Endpoint %s is over capacity: dropped the %llu oldest messages (%llu in all)", ep->name,
                            (unsigned long long) (st.drops - ep->last_drops), (unsigned long long) st.drops);
        if (st.rejected > ep->last_rejected)
                gw_log_full(LOG_WARNING, 0,
                            GW_FIELDS(.component = "uplink", .endpoint = ep->name, .message_id = GW_MSG_QUEUE_OVERFLOW,
                                      .event = "queue-full", .ratelimit_key = key_full,
                                      .queue_depth = (long long) st.backlog_count, .has_queue_depth = true),
                            "Endpoint %s is full: refused %llu new messages (publishers keep them; %llu in all)",
                            ep->name, (unsigned long long) (st.rejected - ep->last_rejected),
                            (unsigned long long) st.rejected);
        if (st.expiries > ep->last_expiries)
                gw_log_full(LOG_WARNING, 0,
                            GW_FIELDS(.component = "uplink", .endpoint = ep->name, .event = "expired",
                                      .ratelimit_key = key_ttl),
                            "Endpoint %s: %llu messages expired (TTL) before they could be sent (%llu in all)",
                            ep->name, (unsigned long long) (st.expiries - ep->last_expiries),
                            (unsigned long long) st.expiries);
        /* Dropped or expired messages move the cursor: the reader follows. */
        if (st.cursor > ep->read_pos && ep->ring_n == 0)
                ep->read_pos = ep->confirmed = ep->acked = st.cursor;
        ep->last_delivered = st.delivered;
        ep->last_drops = st.drops;
        ep->last_expiries = st.expiries;
        ep->last_rejected = st.rejected;
        ep->last_tick_mono = now;
        if (ep->state == EP_UP)
                schedule_pump(ep); /* also covers an appended hook taken by someone else */
}

static int on_tick(sd_event_source *s, uint64_t usec, void *ud) {
        struct gw_uplink *u = ud;
        uint64_t now = mono_now();
        for (size_t i = 0; i < u->n_eps; i++)
                ep_tick(u->eps[i], now);
        (void) sd_event_source_set_time(s, now + USEC_PER_SEC);
        return 0;
}

/* ---- endpoints ------------------------------------------------------------------------- */

static struct gw_endpoint *ep_free(struct gw_endpoint *ep) {
        if (!ep)
                return NULL;
        if (ep->t) {
                ep->ops->disconnect(ep->t);
                ep->ops->destroy(ep->t);
        }
        sd_event_source_disable_unref(ep->retry_timer);
        sd_event_source_disable_unref(ep->pump_source);
        gw_tcp_probe_free(ep->probe);
        free(ep->ring);
        free(ep->name);
        free(ep->fingerprint);
        free(ep->last_error);
        free(ep);
        return NULL;
}

static void ep_start(struct gw_endpoint *ep) {
        ep->state = EP_CONNECTING;
        int r = ep->ops->connect(ep->t);
        if (r < 0 && ep->state == EP_CONNECTING)
                gw_endpoint_down(ep, r, "connect failed");
}

/* Creates the endpoint (its transport and outbox cursor), not started. */
static int ep_new(struct gw_uplink *u, const struct gw_endpoint_conf *c, struct gw_endpoint **ret) {
        struct gw_endpoint *ep = calloc(1, sizeof *ep);
        int r;
        if (!ep)
                return -ENOMEM;
        ep->u = u;
        ep->ops = ops_of(c->type);
        ep->name = strdup(c->name);
        ep->fingerprint = strdup(c->fingerprint);
        ep->conf_copy = (struct gw_endpoint_conf) {
                .batch_max = c->batch_max, .inflight = c->inflight,
                .retry_initial_usec = c->retry_initial_usec, .retry_max_usec = c->retry_max_usec,
        };
        if (!ep->ops || !ep->name || !ep->fingerprint) {
                ep_free(ep);
                return -ENOMEM;
        }
        r = hub_outbox_endpoint_open(u->hub->outbox, c->name, &c->queue, &ep->oep);
        if (r < 0) {
                ep_free(ep);
                return gw_log_errno(LOG_ERR, r, "Cannot open the outbox cursor of endpoint %s: %m", c->name);
        }
        struct hub_outbox_endpoint_stats st;
        hub_outbox_endpoint_get_stats(ep->oep, &st);
        ep->read_pos = ep->confirmed = ep->acked = st.cursor;
        ep->last_delivered = st.delivered;
        ep->last_drops = st.drops;
        ep->last_expiries = st.expiries;
        ep->last_rejected = st.rejected;
        if ((r = sd_event_add_time(u->event, &ep->retry_timer, CLOCK_BOOTTIME, UINT64_MAX, 10 * USEC_PER_MSEC, on_retry,
                                   ep)) < 0 ||
            (r = sd_event_add_defer(u->event, &ep->pump_source, on_pump, ep)) < 0) {
                ep_free(ep);
                return gw_log_errno(LOG_ERR, r, "Cannot add the event sources of endpoint %s: %m", c->name);
        }
        (void) sd_event_source_set_enabled(ep->retry_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(ep->pump_source, SD_EVENT_OFF);
        r = ep->ops->create(ep, c, &ep->t);
        if (r < 0) {
                ep_free(ep);
                return gw_log_errno(LOG_ERR, r, "Cannot set up endpoint %s (%s): %m", c->name,
                                    gw_endpoint_type_to_string(c->type));
        }
        /* Endpoints with a host:port are probed while down (upstream probes for its devices). */
        const char *addr = c->type == GW_ENDPOINT_MQTT ? c->address : c->type == GW_ENDPOINT_HTTP ? c->url : NULL;
        if (addr) {
                _cleanup_free_ char *host = NULL, *port = NULL;
                r = gw_address_host_port(addr, &host, &port);
                if (r >= 0)
                        r = gw_tcp_probe_new(u->event, host, port, on_reachable, probe_wanted, ep, &ep->probe);
                if (r < 0)
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "uplink", .endpoint = c->name),
                                    "Endpoint %s: no reachability probe for %s (%m): retries follow the backoff only",
                                    c->name, addr);
        }
        *ret = ep;
        return 0;
}

/* Deletes outbox cursors that no configured endpoint uses any more. */
static void delete_stale_cursors(struct gw_uplink *u, const struct gw_routing_conf *rc) {
        struct hub_outbox *o = u->hub->outbox;
        for (bool again = true; again;) {
                again = false;
                for (size_t i = 0;; i++) {
                        struct hub_outbox_endpoint *x = hub_outbox_endpoint_at(o, i);
                        if (!x)
                                break;
                        const char *name = hub_outbox_endpoint_name(x);
                        if (streq(name, HUB_OUTBOX_EVENTS) || gw_routing_conf_endpoint(rc, name))
                                continue;
                        _cleanup_free_ char *copy = strdup(name);
                        int r = hub_outbox_endpoint_delete(o, name);
                        if (r < 0)
                                gw_log_errno(LOG_WARNING, r, "Cannot delete the cursor of removed endpoint %s: %m",
                                             copy ? copy : "?");
                        else {
                                gw_log_info("Endpoint %s is no longer configured: its cursor was deleted",
                                            copy ? copy : "?");
                                again = true;
                                break;
                        }
                }
        }
}

static int apply(struct gw_uplink *u, const struct gw_config *cfg) {
        const struct gw_routing_conf *rc = cfg->routing;
        _cleanup_(hub_router_freep) struct hub_router *router = NULL;
        struct gw_endpoint **eps = NULL;
        size_t n = 0;
        int r;

        r = gw_routing_conf_router(rc, cfg->host_name, &router);
        if (r < 0)
                return gw_log_errno(LOG_ERR, r, "Cannot build the routes: %m");
        eps = calloc(rc->n_endpoints + 1, sizeof *eps);
        if (!eps)
                return gw_log_errno(LOG_ERR, ENOMEM, "Out of memory");
        for (size_t i = 0; i < rc->n_endpoints; i++) {
                const struct gw_endpoint_conf *c = &rc->endpoints[i];
                struct gw_endpoint *old = NULL;
                for (size_t j = 0; j < u->n_eps; j++)
                        if (u->eps[j] && streq(u->eps[j]->name, c->name)) {
                                old = u->eps[j];
                                if (streq(old->fingerprint, c->fingerprint)) {
                                        /* Same transport: keep the connection, update the rest. */
                                        r = hub_outbox_endpoint_open(u->hub->outbox, c->name, &c->queue, &old->oep);
                                        if (r < 0)
                                                gw_log_errno(LOG_WARNING, r,
                                                             "Cannot update the queue settings of endpoint %s: %m",
                                                             c->name);
                                        old->conf_copy.batch_max = c->batch_max;
                                        old->conf_copy.inflight = c->inflight;
                                        old->conf_copy.retry_initial_usec = c->retry_initial_usec;
                                        old->conf_copy.retry_max_usec = c->retry_max_usec;
                                        eps[n++] = old;
                                        u->eps[j] = NULL;
                                } else
                                        old = NULL; /* changed: replaced below, the cursor stays */
                                break;
                        }
                if (old)
                        continue;
                for (size_t j = 0; j < u->n_eps; j++)
                        if (u->eps[j] && streq(u->eps[j]->name, c->name))
                                u->eps[j] = ep_free(u->eps[j]);
                struct gw_endpoint *ep = NULL;
                if (ep_new(u, c, &ep) < 0)
                        continue; /* logged; the others still run */
                eps[n++] = ep;
        }
        /* Whatever is left is no longer configured. */
        for (size_t j = 0; j < u->n_eps; j++)
                u->eps[j] = ep_free(u->eps[j]);
        free(u->eps);
        u->eps = eps;
        u->n_eps = n;
        hub_router_free(u->router);
        u->router = TAKE_PTR(router);
        delete_stale_cursors(u, rc);
        for (size_t i = 0; i < n; i++)
                if (eps[i]->state == EP_STOPPED)
                        ep_start(eps[i]);
                else
                        schedule_pump(eps[i]);
        return 0;
}

int gw_uplink_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, struct gw_uplink **ret) {
        struct gw_uplink *u = calloc(1, sizeof *u);
        int r;
        if (!u)
                return gw_log_errno(LOG_ERR, ENOMEM, "Out of memory");
        u->event = sd_event_ref(e);
        u->hub = hub;
        r = sd_event_add_time(e, &u->tick, CLOCK_BOOTTIME, mono_now() + USEC_PER_SEC, 50 * USEC_PER_MSEC, on_tick, u);
        if (r >= 0)
                r = sd_event_source_set_enabled(u->tick, SD_EVENT_ON);
        if (r < 0) {
                gw_uplink_free(u);
                return gw_log_errno(LOG_ERR, r, "Cannot add the endpoint timer: %m");
        }
        r = apply(u, cfg);
        if (r < 0) {
                gw_uplink_free(u);
                return r;
        }
        hub_outbox_set_appended_hook(hub->outbox, on_appended, u);
        hub->uplink = u;
        *ret = u;
        return 0;
}

int gw_uplink_reload(struct gw_uplink *u, const struct gw_config *cfg) {
        return u ? apply(u, cfg) : 0;
}

struct gw_uplink *gw_uplink_free(struct gw_uplink *u) {
        if (!u)
                return NULL;
        if (u->hub && u->hub->outbox)
                hub_outbox_set_appended_hook(u->hub->outbox, NULL, NULL);
        if (u->hub && u->hub->uplink == u)
                u->hub->uplink = NULL;
        for (size_t i = 0; i < u->n_eps; i++)
                ep_free(u->eps[i]);
        free(u->eps);
        hub_router_free(u->router);
        sd_event_source_disable_unref(u->tick);
        sd_event_unref(u->event);
        free(u);
        return NULL;
}

json_t *gw_uplink_status(struct gw_uplink *u) {
        json_t *arr = json_array();
        for (size_t i = 0; u && arr && i < u->n_eps; i++) {
                struct gw_endpoint *ep = u->eps[i];
                struct hub_outbox_endpoint_stats st;
                hub_outbox_endpoint_get_stats(ep->oep, &st);
                json_array_append_new(
                        arr, json_pack("{s:s, s:s, s:s, s:{s:I, s:I}, s:f, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:s?}",
                                       "name", ep->name, "type", ep->ops->type, "state", state_names[ep->state],
                                       "backlog", "count", (json_int_t) st.backlog_count, "bytes",
                                       (json_int_t) st.backlog_bytes, "oldestAgeSeconds",
                                       (double) st.oldest_age_usec / 1e6, "drainRatePerSecond", ep->drain_rate,
                                       "delivered", (json_int_t) st.delivered, "drops", (json_int_t) st.drops,
                                       "expiries", (json_int_t) st.expiries, "rejected", (json_int_t) st.rejected,
                                       "poison", (json_int_t) ep->poison, "oversize", (json_int_t) ep->oversize,
                                       "cursor", (json_int_t) st.cursor, "lastError", ep->last_error));
        }
        return arr;
}
