/* SPDX-License-Identifier: MIT */

/* TCP listeners on the sd-event loop.
 *
 * Accepting is bounded: at most 64 accepts per wakeup (fairness with the other sources),
 * the global and per-source-address connection limits are checked before a connection
 * object exists (a refused socket is closed at once and the refusal logged, rate-limited
 * per call site), and when the process runs out of descriptors the listening socket is
 * parked for 100 ms instead of spinning on EMFILE.
 *
 * Deadlines: the listener keeps its connections in two lists, one for TLS handshakes
 * (deadline = accept time + handshake timeout) and one for established connections
 * (deadline = last activity + idle timeout). Because every connection in a list has the same
 * timeout, appending at the tail keeps a list ordered, and activity just moves a connection
 * to the tail: O(1), no per-connection timer. One sd-event timer is armed at the earlier of
 * the two heads.
 *
 * Deferred work (re-reading after a pause, flushing after a graceful close request, and
 * on_close delivery) goes through one defer source per listener, so that on_close is never
 * called from inside a front-end's own call into this layer.
 *
 * Readiness: the connections' sockets are not sd-event sources each but sit in one private
 * epoll set per listener (level-triggered), which is a single io source on the loop. sd-event
 * dispatches one source per loop iteration and its epoll_wait re-polls every ready
 * level-triggered descriptor each time, so with one source per connection the kernel work per
 * dispatched event grew with the number of ready connections; here one dispatch takes up to
 * POLL_BATCH ready connections with one epoll_wait and handles them all (the set stays readable
 * while more are ready, so the rest follow on the next iteration). Connections are only freed
 * by the defer source (on_close, after the batch) or gw_net_listener_free, which stops a
 * running batch (batch_alive); a connection closed by a handler earlier in the same batch
 * is DEAD and its stale event is ignored (gw_conn_io). */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

#define DEFAULT_BACKLOG 511
#define DEFAULT_MAX_CONNECTIONS 10000u
#define DEFAULT_MAX_PER_ADDRESS 100u
#define DEFAULT_HANDSHAKE_TIMEOUT_USEC (10ULL * 1000000ULL)
#define DEFAULT_IDLE_TIMEOUT_USEC (300ULL * 1000000ULL)
#define DEFAULT_MAX_INPUT (256u * 1024u)
#define DEFAULT_MAX_OUTPUT (1024u * 1024u)
#define ACCEPT_BUDGET 64
#define ACCEPT_RETRY_USEC (100ULL * 1000ULL)
#define TIMER_ACCURACY_USEC (50ULL * 1000ULL)
#define POLL_BATCH 256

int gw_net_parse_address(const char *s, struct sockaddr_storage *ret_sa, socklen_t *ret_len) {
        struct sockaddr_storage sa = {};
        char host[INET6_ADDRSTRLEN + 1];
        const char *port_s;
        size_t hl;

        if (!s || !*s)
                return -EINVAL;
        if (s[0] == '[') {
                const char *end = strchr(s, ']');
                if (!end || end[1] != ':')
                        return -EINVAL;
                hl = (size_t) (end - s - 1);
                if (hl == 0 || hl >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s + 1, hl);
                host[hl] = 0;
                port_s = end + 2;
        } else {
                const char *colon = strrchr(s, ':');
                if (!colon || strchr(s, ':') != colon) /* a bare IPv6 literal needs brackets */
                        return -EINVAL;
                hl = (size_t) (colon - s);
                if (hl == 0 || hl >= sizeof(host))
                        return -EINVAL;
                memcpy(host, s, hl);
                host[hl] = 0;
                port_s = colon + 1;
        }

        if (!*port_s || strlen(port_s) > 5)
                return -EINVAL;
        unsigned long port = 0;
        for (const char *p = port_s; *p; p++) {
                if (*p < '0' || *p > '9')
                        return -EINVAL;
                port = port * 10 + (unsigned long) (*p - '0');
        }
        if (port > 65535)
                return -EINVAL;

        if (s[0] == '[') {
                struct sockaddr_in6 *a6 = (struct sockaddr_in6 *) &sa;
                if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
                        return -EINVAL;
                a6->sin6_family = AF_INET6;
                a6->sin6_port = htons((uint16_t) port);
                *ret_len = sizeof(*a6);
        } else {
                struct sockaddr_in *a4 = (struct sockaddr_in *) &sa;
                if (strcmp(host, "localhost") == 0)
                        a4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
                else if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
                        return -EINVAL;
                a4->sin_family = AF_INET;
                a4->sin_port = htons((uint16_t) port);
                *ret_len = sizeof(*a4);
        }
        *ret_sa = sa;
        return 0;
}

bool gw_net_sockaddr_is_loopback(const struct sockaddr_storage *sa) {
        if (sa->ss_family == AF_INET) {
                const struct sockaddr_in *a4 = (const struct sockaddr_in *) sa;
                return (ntohl(a4->sin_addr.s_addr) >> 24) == 127;
        }
        if (sa->ss_family == AF_INET6) {
                const struct in6_addr *a = &((const struct sockaddr_in6 *) sa)->sin6_addr;
                if (IN6_IS_ADDR_LOOPBACK(a))
                        return true;
                if (IN6_IS_ADDR_V4MAPPED(a))
                        return a->s6_addr[12] == 127;
        }
        return false;
}

/* ---- per-address counts ---------------------------------------------------------------- */

static void sockaddr_key(const struct sockaddr_storage *sa, uint8_t *ret_family, uint8_t key[16]) {
        memset(key, 0, 16);
        if (sa->ss_family == AF_INET6) {
                const struct in6_addr *a = &((const struct sockaddr_in6 *) sa)->sin6_addr;
                if (IN6_IS_ADDR_V4MAPPED(a)) { /* the same host whichever socket it used */
                        memcpy(key, a->s6_addr + 12, 4);
                        *ret_family = AF_INET;
                        return;
                }
                memcpy(key, a->s6_addr, 16);
                *ret_family = AF_INET6;
        } else {
                memcpy(key, &((const struct sockaddr_in *) sa)->sin_addr, 4);
                *ret_family = AF_INET;
        }
}

static unsigned addr_hash(uint8_t family, const uint8_t key[16]) {
        uint32_t h = 2166136261u ^ family;
        for (unsigned i = 0; i < 16; i++)
                h = (h ^ key[i]) * 16777619u;
        return h % GW_ADDR_BUCKETS;
}

static struct gw_addr_count *addr_get(struct gw_net_listener *l, const struct sockaddr_storage *sa) {
        uint8_t fam, key[16];
        sockaddr_key(sa, &fam, key);
        unsigned b = addr_hash(fam, key);
        for (struct gw_addr_count *a = l->buckets[b]; a; a = a->next)
                if (a->family == fam && memcmp(a->addr, key, 16) == 0)
                        return a;
        struct gw_addr_count *a = calloc(1, sizeof(*a));
        if (!a)
                return NULL;
        a->family = fam;
        memcpy(a->addr, key, 16);
        a->next = l->buckets[b];
        l->buckets[b] = a;
        return a;
}

static void addr_put(struct gw_net_listener *l, struct gw_addr_count *ac) {
        if (!ac)
                return;
        if (ac->n > 0)
                ac->n--;
        if (ac->n > 0)
                return;
        unsigned b = addr_hash(ac->family, ac->addr);
        for (struct gw_addr_count **p = &l->buckets[b]; *p; p = &(*p)->next)
                if (*p == ac) {
                        *p = ac->next;
                        free(ac);
                        return;
                }
}

/* ---- deadline lists --------------------------------------------------------------------- */

static void timer_arm(struct gw_net_listener *l) {
        uint64_t when = UINT64_MAX;
        if (l->hs_list.head)
                when = l->hs_list.head->since + l->hs_list.timeout_usec;
        if (l->idle_list.head)
                when = MIN(when, l->idle_list.head->since + l->idle_list.timeout_usec);
        if (when == UINT64_MAX) {
                (void) sd_event_source_set_enabled(l->timer_src, SD_EVENT_OFF);
                return;
        }
        (void) sd_event_source_set_time(l->timer_src, when);
        (void) sd_event_source_set_enabled(l->timer_src, SD_EVENT_ONESHOT);
}

void gw_listener_list_add(struct gw_conn_list *list, struct gw_net_conn *c, uint64_t now) {
        gw_listener_list_remove(c);
        bool was_empty = !list->head;
        c->since = now;
        c->list = list;
        c->prev = list->tail;
        c->next = NULL;
        if (list->tail)
                list->tail->next = c;
        else
                list->head = c;
        list->tail = c;
        if (was_empty)
                timer_arm(c->l);
}

void gw_listener_list_remove(struct gw_net_conn *c) {
        struct gw_conn_list *list = c->list;
        if (!list)
                return;
        if (c->prev)
                c->prev->next = c->next;
        else
                list->head = c->next;
        if (c->next)
                c->next->prev = c->prev;
        else
                list->tail = c->prev;
        c->prev = c->next = NULL;
        c->list = NULL;
}

void gw_listener_touch(struct gw_net_conn *c) {
        uint64_t now;
        if (c->list != &c->l->idle_list || c->state != GW_CONN_OPEN)
                return;
        if (sd_event_now(c->l->event, CLOCK_MONOTONIC, &now) < 0)
                return;
        if (c->l->idle_list.tail == c) {
                c->since = now;
                return;
        }
        gw_listener_list_add(&c->l->idle_list, c, now);
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_net_listener *l = userdata;
        uint64_t now;
        if (sd_event_now(l->event, CLOCK_MONOTONIC, &now) < 0)
                now = usec;
        while (l->hs_list.head && l->hs_list.head->since + l->hs_list.timeout_usec <= now)
                gw_conn_timeout(l->hs_list.head);
        /* An idle connection moves to the tail as it starts draining; stop at the first one
         * seen twice to stay bounded. */
        struct gw_net_conn *first_moved = NULL;
        while (l->idle_list.head && l->idle_list.head != first_moved &&
               l->idle_list.head->since + l->idle_list.timeout_usec <= now) {
                struct gw_net_conn *c = l->idle_list.head;
                gw_conn_timeout(c);
                if (c->list == &l->idle_list && !first_moved)
                        first_moved = c;
        }
        timer_arm(l);
        return 0;
}

/* ---- deferred work ---------------------------------------------------------------------- */

void gw_listener_schedule(struct gw_net_conn *c, unsigned flags) {
        struct gw_net_listener *l = c->l;
        if (c->pend_flags == 0) {
                c->pend_next = NULL;
                if (l->pending_tail)
                        l->pending_tail->pend_next = c;
                else
                        l->pending_head = c;
                l->pending_tail = c;
                (void) sd_event_source_set_enabled(l->defer_src, SD_EVENT_ONESHOT);
        }
        c->pend_flags |= flags;
}

static int on_defer(sd_event_source *s, void *userdata) {
        struct gw_net_listener *l = userdata;
        /* Take the current list; work scheduled while running lands on a fresh one. */
        struct gw_net_conn *c = l->pending_head;
        l->pending_head = l->pending_tail = NULL;
        while (c) {
                struct gw_net_conn *next = c->pend_next;
                unsigned flags = c->pend_flags;
                c->pend_flags = 0;
                c->pend_next = NULL;
                gw_conn_run_pending(c, flags); /* may free c */
                c = next;
        }
        return 0;
}

void gw_listener_conn_gone(struct gw_net_conn *c) {
        struct gw_net_listener *l = c->l;
        gw_listener_list_remove(c);
        addr_put(l, c->addr);
        c->addr = NULL;
        if (l->n_conns > 0)
                l->n_conns--;
}

/* ---- readiness of the connections ------------------------------------------------------- */

static int on_poll(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct gw_net_listener *l = userdata;
        struct epoll_event evs[POLL_BATCH];

        int n = epoll_wait(l->epfd, evs, POLL_BATCH, 0);
        if (n < 0) {
                if (errno == EINTR)
                        return 0;
                /* Cannot happen short of a bug (EBADF, EINVAL); sd-event disables the source
                 * rather than spin. */
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: epoll_wait on the connections: %m",
                                   l->address);
        }
        bool alive = true;
        l->batch_alive = &alive;
        for (int i = 0; i < n; i++) {
                gw_conn_io(evs[i].data.ptr, evs[i].events);
                if (!alive)
                        return 0; /* the listener (and its connections) was freed by a handler */
        }
        l->batch_alive = NULL;
        return 0;
}

/* ---- accept ----------------------------------------------------------------------------- */

static void format_sockaddr(const struct sockaddr_storage *sa, char *buf, size_t size) {
        char a[INET6_ADDRSTRLEN] = "?";
        if (sa->ss_family == AF_INET6) {
                const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *) sa;
                (void) inet_ntop(AF_INET6, &a6->sin6_addr, a, sizeof(a));
                (void) snprintf(buf, size, "[%s]:%u", a, ntohs(a6->sin6_port));
        } else {
                const struct sockaddr_in *a4 = (const struct sockaddr_in *) sa;
                (void) inet_ntop(AF_INET, &a4->sin_addr, a, sizeof(a));
                (void) snprintf(buf, size, "%s:%u", a, ntohs(a4->sin_port));
        }
}

static int on_retry(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_net_listener *l = userdata;
        (void) sd_event_source_set_enabled(l->accept_src, SD_EVENT_ON);
        return 0;
}

static int on_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct gw_net_listener *l = userdata;

        for (int i = 0; i < ACCEPT_BUDGET; i++) {
                struct sockaddr_storage sa = {};
                socklen_t salen = sizeof(sa);
                int cfd = accept4(l->fd, (struct sockaddr *) &sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) {
                        int e = errno;
                        if (e == EAGAIN || e == EWOULDBLOCK)
                                break;
                        if (e == EINTR || e == ECONNABORTED || e == EPROTO || e == EPERM)
                                continue;
                        if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
                                gw_log_full(LOG_WARNING, e, NET_FIELDS,
                                            "%s: cannot accept: %m; pausing accept for 100 ms", l->address);
                                uint64_t now = 0;
                                (void) sd_event_now(l->event, CLOCK_MONOTONIC, &now);
                                (void) sd_event_source_set_enabled(l->accept_src, SD_EVENT_OFF);
                                (void) sd_event_source_set_time(l->retry_src, now + ACCEPT_RETRY_USEC);
                                (void) sd_event_source_set_enabled(l->retry_src, SD_EVENT_ONESHOT);
                                break;
                        }
                        gw_log_full(LOG_ERR, e, NET_FIELDS, "%s: accept failed: %m", l->address);
                        break;
                }

                char peer[INET6_ADDRSTRLEN + 8];
                format_sockaddr(&sa, peer, sizeof(peer));

                if (l->n_conns >= l->max_connections) {
                        gw_log_full(LOG_WARNING, 0, NET_FIELDS,
                                    "%s: refusing connection from %s: %u connections open (limit %u)",
                                    l->address, peer, l->n_conns, l->max_connections);
                        (void) close(cfd);
                        continue;
                }
                struct gw_addr_count *ac = addr_get(l, &sa);
                if (!ac) {
                        gw_log_full(LOG_ERR, ENOMEM, NET_FIELDS, "%s: refusing connection from %s: %m",
                                    l->address, peer);
                        (void) close(cfd);
                        continue;
                }
                if (ac->n >= l->max_per_address) {
                        gw_log_full(LOG_WARNING, 0, NET_FIELDS,
                                    "%s: refusing connection from %s: %u connections open from that address (limit %u)",
                                    l->address, peer, ac->n, l->max_per_address);
                        (void) close(cfd);
                        continue;
                }
                ac->n++;
                l->n_conns++;

                struct gw_net_conn *c;
                int r = gw_conn_new(l, cfd, &sa, ac, &c);
                if (r < 0) {
                        addr_put(l, ac);
                        l->n_conns--;
                        (void) close(cfd);
                        gw_log_full(LOG_ERR, r, NET_FIELDS, "%s: cannot set up connection from %s: %m",
                                    l->address, peer);
                        continue;
                }
                memcpy(c->peer, peer, sizeof(c->peer));
                if (!c->ssl) {
                        /* plain TCP: usable at once */
                        c->opened = true;
                        r = l->h.on_open ? l->h.on_open(c) : 0;
                        if (r < 0)
                                gw_conn_fail(c, r);
                }
        }
        return 0;
}

/* ---- lifecycle ------------------------------------------------------------------------- */

struct gw_net_listener *gw_net_listener_free(struct gw_net_listener *l) {
        if (!l)
                return NULL;
        if (l->batch_alive) {
                *l->batch_alive = false; /* called from a handler of on_poll: stop the batch */
                l->batch_alive = NULL;
        }
        /* Pending work first (on_close of already-dead connections), then the live ones. */
        while (l->pending_head) {
                struct gw_net_conn *c = l->pending_head;
                l->pending_head = c->pend_next;
                if (!l->pending_head)
                        l->pending_tail = NULL;
                unsigned flags = c->pend_flags;
                c->pend_flags = 0;
                if (flags & GW_PEND_CLOSE)
                        gw_conn_run_pending(c, GW_PEND_CLOSE);
        }
        struct gw_conn_list *lists[] = { &l->hs_list, &l->idle_list };
        for (size_t i = 0; i < ELEMENTSOF(lists); i++)
                while (lists[i]->head) {
                        struct gw_net_conn *c = lists[i]->head;
                        gw_conn_fail(c, -ECANCELED);
                        /* gw_conn_fail scheduled on_close; deliver it now */
                        while (l->pending_head) {
                                struct gw_net_conn *p = l->pending_head;
                                l->pending_head = p->pend_next;
                                if (!l->pending_head)
                                        l->pending_tail = NULL;
                                unsigned flags = p->pend_flags;
                                p->pend_flags = 0;
                                if (flags & GW_PEND_CLOSE)
                                        gw_conn_run_pending(p, GW_PEND_CLOSE);
                        }
                }
        sd_event_source_disable_unref(l->accept_src);
        sd_event_source_disable_unref(l->timer_src);
        sd_event_source_disable_unref(l->defer_src);
        sd_event_source_disable_unref(l->retry_src);
        sd_event_source_disable_unref(l->poll_src);
        if (l->epfd >= 0)
                (void) close(l->epfd);
        if (l->fd >= 0)
                (void) close(l->fd);
        for (unsigned b = 0; b < GW_ADDR_BUCKETS; b++)
                while (l->buckets[b]) {
                        struct gw_addr_count *a = l->buckets[b];
                        l->buckets[b] = a->next;
                        free(a);
                }
        gw_tls_server_unref(l->tls);
        sd_event_unref(l->event);
        free(l->address);
        free(l);
        return NULL;
}

DEFINE_CLEANUP_FUNC(struct gw_net_listener *, gw_net_listener_free)

int gw_net_listener_new(sd_event *e, const struct gw_net_listener_config *cfg,
                        const struct gw_net_handler *h, void *userdata,
                        struct gw_net_listener **ret) {
        _cleanup_(gw_net_listener_freep) struct gw_net_listener *l = NULL;
        struct sockaddr_storage sa;
        socklen_t salen;
        const char *where = cfg && cfg->config_path ? cfg->config_path : "listen";
        int r;

        if (!e || !cfg || !h || !h->on_data || !h->on_close || !ret)
                return -EINVAL;

        r = gw_net_parse_address(cfg->address, &sa, &salen);
        if (r < 0)
                return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS,
                                   "%s: invalid listen address '%s': expected IPV4:PORT, [IPV6]:PORT or localhost:PORT",
                                   where, cfg->address ? cfg->address : "");

        if (!cfg->tls && !cfg->allow_plaintext && !gw_net_sockaddr_is_loopback(&sa))
                return gw_log_full(LOG_ERR, EPERM, NET_FIELDS,
                                   "%s: refusing plain TCP (no TLS) on non-loopback address %s: "
                                   "configure TLS, or set %s.allow_plaintext: true to allow it explicitly",
                                   where, cfg->address, where);

        l = calloc(1, sizeof(*l));
        if (!l)
                return -ENOMEM;
        l->fd = -EBADF;
        l->epfd = -EBADF;
        l->event = sd_event_ref(e);
        l->h = *h;
        l->userdata = userdata;
        l->address = strdup(cfg->address);
        if (!l->address)
                return -ENOMEM;
        l->tls = gw_tls_server_ref(cfg->tls);
        l->max_connections = cfg->max_connections ?: DEFAULT_MAX_CONNECTIONS;
        l->max_per_address = cfg->max_connections_per_address ?: DEFAULT_MAX_PER_ADDRESS;
        l->hs_list.timeout_usec = cfg->handshake_timeout_usec ?: DEFAULT_HANDSHAKE_TIMEOUT_USEC;
        l->idle_list.timeout_usec = cfg->idle_timeout_usec ?: DEFAULT_IDLE_TIMEOUT_USEC;
        l->max_input = cfg->max_input_bytes ?: DEFAULT_MAX_INPUT;
        l->max_output = cfg->max_output_bytes ?: DEFAULT_MAX_OUTPUT;
        l->hard_max_output = cfg->hard_max_output_bytes ?: 4 * l->max_output;
        if (l->hard_max_output < l->max_output)
                l->hard_max_output = l->max_output;

        l->fd = socket(sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (l->fd < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: socket for %s: %m", where, cfg->address);
        int one = 1;
        if (setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: SO_REUSEADDR: %m", where);
        if (sa.ss_family == AF_INET6 &&
            setsockopt(l->fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one)) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: IPV6_V6ONLY: %m", where);
        if (bind(l->fd, (struct sockaddr *) &sa, salen) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: cannot bind %s: %m", where, cfg->address);
        if (listen(l->fd, cfg->backlog > 0 ? cfg->backlog : DEFAULT_BACKLOG) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: cannot listen on %s: %m", where, cfg->address);

        struct sockaddr_storage bound = {};
        socklen_t blen = sizeof(bound);
        if (getsockname(l->fd, (struct sockaddr *) &bound, &blen) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: getsockname: %m", where);
        l->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *) &bound)->sin6_port
                                                    : ((struct sockaddr_in *) &bound)->sin_port);

        l->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (l->epfd < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "%s: epoll_create1: %m", where);
        /* Default priority, as the per-connection io sources had. */
        r = sd_event_add_io(e, &l->poll_src, l->epfd, EPOLLIN, on_poll, l);
        if (r < 0)
                return r;
        (void) sd_event_source_set_description(l->poll_src, "net-conns");

        r = sd_event_add_io(e, &l->accept_src, l->fd, EPOLLIN, on_accept, l);
        if (r < 0)
                return r;
        (void) sd_event_source_set_description(l->accept_src, "net-accept");
        r = sd_event_add_time(e, &l->timer_src, CLOCK_MONOTONIC, UINT64_MAX, TIMER_ACCURACY_USEC, on_timer, l);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(l->timer_src, SD_EVENT_OFF);
        r = sd_event_add_time(e, &l->retry_src, CLOCK_MONOTONIC, UINT64_MAX, 0, on_retry, l);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(l->retry_src, SD_EVENT_OFF);
        r = sd_event_add_defer(e, &l->defer_src, on_defer, l);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(l->defer_src, SD_EVENT_OFF);

        gw_log_full(LOG_INFO, 0, NET_FIELDS, "listening on %s port %u (%s)", cfg->address, l->port,
                    l->tls ? "TLS" : "plain TCP");
        *ret = TAKE_PTR(l);
        return 0;
}

uint16_t gw_net_listener_get_port(const struct gw_net_listener *l) {
        return l->port;
}

unsigned gw_net_listener_get_n_connections(const struct gw_net_listener *l) {
        return l->n_conns;
}

int gw_net_listener_set_tls(struct gw_net_listener *l, struct gw_tls_server *tls) {
        if (!l->tls || !tls)
                return -EINVAL;
        gw_tls_server_ref(tls);
        gw_tls_server_unref(l->tls);
        l->tls = tls;
        return 0;
}
