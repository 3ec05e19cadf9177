/* SPDX-License-Identifier: MIT */

/* One non-blocking connection, plain or TLS, on the sd-event loop.
 *
 * Readiness: the socket is in its listener's private epoll set (l->epfd, level-triggered,
 * epoll_event.data.ptr = the connection); that set is one sd-event io source, whose dispatch
 * runs gw_conn_io() for every ready connection of a batch (listener.c, on_poll).
 *
 * Input: bytes are read (and decrypted) into one static scratch buffer and handed straight to
 * on_data; only what the front-end leaves unconsumed is copied into a per-connection buffer,
 * which is freed again once it empties, so an idle connection holds no input buffer.
 *
 * Output: gw_net_conn_send() copies into a chain of chunks and writes at once what the socket
 * takes; the rest waits for EPOLLOUT. With TLS, a write that the backend answered with
 * WANT_WRITE must be repeated with the same length (both mbedtls 2.28 and OpenSSL keep the
 * encrypted record in their own buffer and expect the same bytes again), so that length is
 * remembered.
 *
 * Backpressure: above max_output_bytes queued, EPOLLIN is switched off (the peer's own TCP
 * window then stops it); below half of that, reading resumes. Input that was already
 * decrypted inside the TLS library (or read ahead, tls.c) when reading paused does not wake
 * epoll again, so resuming schedules a read through the listener's defer source; the same is
 * done when a read budget runs out.
 *
 * TLS goes through the backend interface of net-internal.h (tls-openssl.c or tls-mbedtls.c):
 * nothing here depends on the library. */

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

#define SCRATCH_SIZE (16u * 1024u)
#define READ_BUDGET 8          /* reads per wakeup before yielding to other connections */
#define CHUNK_MIN (16u * 1024u)
#define TLS_MAX_WRITE (16u * 1024u)

static uint8_t scratch[SCRATCH_SIZE];

static void conn_process(struct gw_net_conn *c);

static void update_events(struct gw_net_conn *c) {
        uint32_t ev = 0;

        switch (c->state) {
        case GW_CONN_HANDSHAKE:
                if (c->tls_want_read)
                        ev |= EPOLLIN;
                if (c->tls_want_write)
                        ev |= EPOLLOUT;
                break;
        case GW_CONN_OPEN:
                if (!c->paused || c->lazy_in)
                        ev |= EPOLLIN;
                if (c->out_bytes > 0 || c->tls_want_write)
                        ev |= EPOLLOUT;
                break;
        case GW_CONN_DRAINING:
                ev |= EPOLLOUT;
                if (c->tls_want_read)
                        ev |= EPOLLIN;
                break;
        case GW_CONN_LINGER:
                ev |= EPOLLIN;
                break;
        case GW_CONN_DEAD:
                return;
        }
        if (ev != c->io_events && c->io_registered) {
                struct epoll_event e = { .events = ev, .data.ptr = c };
                if (epoll_ctl(c->l->epfd, EPOLL_CTL_MOD, c->fd, &e) >= 0)
                        c->io_events = ev;
        }
}

/* Takes the socket out of the listener's epoll set (before it is closed). */
static void io_unregister(struct gw_net_conn *c) {
        if (!c->io_registered)
                return;
        if (c->fd >= 0)
                (void) epoll_ctl(c->l->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        c->io_registered = false;
}

static void set_reason(struct gw_net_conn *c, int reason) {
        if (!c->reason_set) {
                c->close_reason = reason;
                c->reason_set = true;
        }
}

static void out_free_all(struct gw_net_conn *c) {
        while (c->out_head) {
                struct gw_out_chunk *k = c->out_head;
                c->out_head = k->next;
                free(k);
        }
        c->out_tail = NULL;
        c->out_bytes = 0;
}

/* Closes the socket now; on_close follows from the defer source. */
void gw_conn_fail(struct gw_net_conn *c, int reason) {
        if (c->state == GW_CONN_DEAD)
                return;
        set_reason(c, reason);
        c->state = GW_CONN_DEAD;
        io_unregister(c);
        if (c->fd >= 0) {
                (void) close(c->fd);
                c->fd = -EBADF;
        }
        /* The buffers stay until gw_conn_free(): the front-end may be inside on_data with a
         * pointer into c->in when it closes the connection (or a send hits the hard cap). */
        gw_listener_conn_gone(c);
        gw_listener_schedule(c, GW_PEND_CLOSE);
}

void gw_conn_free(struct gw_net_conn *c) {
        if (!c)
                return;
        io_unregister(c);
        if (c->fd >= 0)
                (void) close(c->fd);
        out_free_all(c);
        free(c->in);
        gw_tls_conn_free(c);
        gw_tls_conn_forget(c);
        gw_tls_server_unref(c->tls);
        free(c->sni);
        free(c);
}

/* A TLS write failed (r: GW_TLS_EOF, _RESET or _FAILED, the latter already logged). */
static void tls_write_failed(struct gw_net_conn *c, int r) {
        gw_conn_fail(c, r == GW_TLS_FAILED ? -EPROTO : -ECONNRESET);
}

/* Starts a graceful close: no more reading, flush, close_notify, shutdown, linger. */
static void begin_drain(struct gw_net_conn *c, int reason) {
        if (c->state != GW_CONN_OPEN && c->state != GW_CONN_HANDSHAKE)
                return;
        set_reason(c, reason);
        if (c->state == GW_CONN_HANDSHAKE) {
                gw_conn_fail(c, reason);
                return;
        }
        c->state = GW_CONN_DRAINING;
        c->paused = false;
        uint64_t now = 0;
        (void) sd_event_now(c->l->event, CLOCK_MONOTONIC, &now);
        gw_listener_list_add(&c->l->idle_list, c, now); /* bounded by one idle timeout from now */
        update_events(c);
}

static void set_paused(struct gw_net_conn *c, bool paused) {
        if (c->paused == paused || c->state != GW_CONN_OPEN)
                return;
        c->paused = paused;
        /* Pausing leaves EPOLLIN registered until it fires (see lazy_in). */
        c->lazy_in = paused && (c->io_events & EPOLLIN);
        gw_log_full(LOG_DEBUG, 0, NET_FIELDS, "%s: %s reading (%zu bytes queued for output)", c->peer,
                    paused ? "pausing" : "resuming", c->out_bytes);
        if (!paused)
                gw_listener_schedule(c, GW_PEND_READ);
        update_events(c);
        if (c->l->h.on_flow)
                c->l->h.on_flow(c, paused);
}

/* Called after output shrank. */
static void output_shrunk(struct gw_net_conn *c) {
        if (c->state != GW_CONN_OPEN)
                return;
        if (c->out_bytes < c->l->max_output / 2 || c->out_bytes == 0) {
                if (c->paused && !c->held)
                        set_paused(c, false);
                if (c->above_low_mark) {
                        c->above_low_mark = false;
                        if (c->l->h.on_drain)
                                c->l->h.on_drain(c);
                }
        }
}

/* One write of at most len bytes: with TLS one record of exactly len bytes (len <=
 * TLS_MAX_WRITE). Returns the bytes taken; 0 when the socket or the TLS layer would block (a
 * TLS record is then pending with this length, see tls_write_pending: the next write must
 * repeat it); < 0 when the connection failed (logged, gw_conn_fail() done). */
static ssize_t write_once(struct gw_net_conn *c, const uint8_t *p, size_t len) {
        if (c->ssl) {
                int r = gw_tls_conn_write(c, p, len);
                if (r == GW_TLS_WANT_WRITE || r == GW_TLS_WANT_READ) {
                        c->tls_write_pending = len;
                        c->tls_want_write = r == GW_TLS_WANT_WRITE;
                        return 0;
                }
                if (r < 0) {
                        tls_write_failed(c, r);
                        return -EPROTO;
                }
                c->tls_write_pending = 0;
                return r;
        }
        for (;;) {
                ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n >= 0)
                        return n;
                if (errno == EINTR)
                        continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                        return 0;
                int e = -errno;
                gw_log_full(LOG_DEBUG, e, NET_FIELDS, "%s: send: %m", c->peer);
                gw_conn_fail(c, e == -EPIPE ? -ECONNRESET : e);
                return e;
        }
}

/* Writes what the socket takes. Returns 0, or < 0 when the connection failed. */
static int flush_output(struct gw_net_conn *c) {
        bool progress = false;

        c->tls_want_write = false;
        while (c->out_head && c->state != GW_CONN_DEAD) {
                struct gw_out_chunk *k = c->out_head;
                size_t avail = k->len - k->off;
                size_t len = !c->ssl ? avail : c->tls_write_pending ?: MIN(avail, (size_t) TLS_MAX_WRITE);
                ssize_t n = write_once(c, k->data + k->off, len);
                if (n < 0)
                        return (int) n;
                if (n == 0)
                        break;
                progress = true;
                k->off += (size_t) n;
                c->out_bytes -= (size_t) n;
                if (k->off == k->len) {
                        c->out_head = k->next;
                        if (!c->out_head)
                                c->out_tail = NULL;
                        free(k);
                }
        }
        if (progress) {
                gw_listener_touch(c);
                output_shrunk(c);
        }
        return 0;
}

/* With nothing queued, writes straight from the caller's buffer (no chunk, no copy): TLS one
 * record per 16 KiB. Returns the bytes the socket took (the rest is for the queue), or < 0
 * when the connection failed. A TLS record that the backend answered with WANT_WRITE is already
 * encrypted inside the TLS library: those bytes are reported as not taken, so that they go to the
 * head of the queue and the write is repeated with the same length (tls_write_pending). */
static ssize_t write_direct(struct gw_net_conn *c, const uint8_t *p, size_t len) {
        size_t done = 0;

        while (done < len) {
                size_t k = c->ssl ? MIN(len - done, (size_t) TLS_MAX_WRITE) : len - done;
                ssize_t n = write_once(c, p + done, k);
                if (n < 0)
                        return n;
                if (n == 0)
                        break;
                done += (size_t) n;
        }
        if (done > 0)
                gw_listener_touch(c);
        return (ssize_t) done;
}

/* Offers input to the front-end. data/len: new bytes (may be the connection's own buffer
 * when len == 0 and only buffered input is re-offered). Returns 0, or < 0 if it failed. */
static int deliver(struct gw_net_conn *c, const uint8_t *data, size_t len) {
        struct gw_net_listener *l = c->l;
        const uint8_t *p;
        size_t n;

        if (c->in_len > 0 && len > 0) {
                if (c->in_len + len > l->max_input) {
                        gw_log_full(LOG_NOTICE, 0, NET_FIELDS,
                                    "%s: more than %zu bytes of unconsumed input, closing", c->peer, l->max_input);
                        gw_conn_fail(c, -ENOBUFS);
                        return -ENOBUFS;
                }
                if (c->in_len + len > c->in_cap) {
                        size_t cap = MAX(c->in_cap * 2, c->in_len + len);
                        cap = MIN(cap, l->max_input);
                        uint8_t *b = realloc(c->in, cap);
                        if (!b) {
                                gw_conn_fail(c, -ENOMEM);
                                return -ENOMEM;
                        }
                        c->in = b;
                        c->in_cap = cap;
                }
                memcpy(c->in + c->in_len, data, len);
                c->in_len += len;
                len = 0;
        }
        if (c->in_len > 0) {
                p = c->in;
                n = c->in_len;
        } else {
                p = data;
                n = len;
        }

        /* Offer until the front-end stops making progress, pauses or closes. */
        while (n > 0 && c->state == GW_CONN_OPEN && !c->paused) {
                ssize_t used = l->h.on_data(c, p, n);
                if (used < 0) {
                        if (c->state != GW_CONN_DEAD)
                                gw_conn_fail(c, (int) used);
                        return (int) used;
                }
                if ((size_t) used > n)
                        used = (ssize_t) n;
                p += used;
                n -= (size_t) used;
                if (used == 0)
                        break;
        }
        if (c->state == GW_CONN_DEAD)
                return -ECANCELED;
        if (c->state != GW_CONN_OPEN) { /* closing: input no longer matters */
                free(c->in);
                c->in = NULL;
                c->in_len = c->in_cap = 0;
                return 0;
        }

        if (n == 0) {
                free(c->in);
                c->in = NULL;
                c->in_len = c->in_cap = 0;
                return 0;
        }
        if (n >= l->max_input && !c->paused) {
                gw_log_full(LOG_NOTICE, 0, NET_FIELDS,
                            "%s: %zu bytes of input not consumed (limit %zu), closing", c->peer, n, l->max_input);
                gw_conn_fail(c, -ENOBUFS);
                return -ENOBUFS;
        }
        if (p != c->in) {
                if (c->in && p >= c->in && p < c->in + c->in_cap) {
                        memmove(c->in, p, n);
                } else {
                        if (n > c->in_cap) {
                                uint8_t *b = realloc(c->in, MAX(n, (size_t) 4096));
                                if (!b) {
                                        gw_conn_fail(c, -ENOMEM);
                                        return -ENOMEM;
                                }
                                c->in = b;
                                c->in_cap = MAX(n, (size_t) 4096);
                        }
                        memcpy(c->in, p, n);
                }
        }
        c->in_len = n;
        return 0;
}

static void read_input(struct gw_net_conn *c) {
        for (int i = 0; i < READ_BUDGET; i++) {
                if (c->state != GW_CONN_OPEN || c->paused)
                        return;
                ssize_t n;
                if (c->ssl) {
                        int r = gw_tls_conn_read(c, scratch, sizeof(scratch));
                        if (r == GW_TLS_WANT_READ)
                                return;
                        if (r == GW_TLS_WANT_WRITE) {
                                c->tls_want_write = true;
                                return;
                        }
                        if (r == GW_TLS_EOF) {
                                begin_drain(c, GW_NET_CLOSED_BY_PEER);
                                return;
                        }
                        if (r == GW_TLS_RESET) {
                                gw_conn_fail(c, -ECONNRESET);
                                return;
                        }
                        if (r < 0) {
                                gw_conn_fail(c, -EPROTO); /* logged by the backend */
                                return;
                        }
                        n = r;
                } else {
                        n = recv(c->fd, scratch, sizeof(scratch), MSG_DONTWAIT);
                        if (n < 0) {
                                if (errno == EAGAIN || errno == EWOULDBLOCK)
                                        return;
                                if (errno == EINTR)
                                        continue;
                                gw_conn_fail(c, -errno);
                                return;
                        }
                        if (n == 0) {
                                begin_drain(c, GW_NET_CLOSED_BY_PEER);
                                return;
                        }
                }
                gw_listener_touch(c);
                if (deliver(c, scratch, (size_t) n) < 0)
                        return;
        }
        /* Budget spent: come back soon even if epoll has nothing new (TLS may hold bytes). */
        if (c->state == GW_CONN_OPEN && !c->paused)
                gw_listener_schedule(c, GW_PEND_READ);
}

static void do_handshake(struct gw_net_conn *c) {
        int r = gw_tls_conn_handshake(c);
        c->tls_want_read = c->tls_want_write = false;
        if (r == GW_TLS_WANT_READ) {
                c->tls_want_read = true;
                return;
        }
        if (r == GW_TLS_WANT_WRITE) {
                c->tls_want_write = true;
                return;
        }
        if (r < 0) {
                if (r == GW_TLS_EOF || r == GW_TLS_RESET) {
                        gw_log_full(LOG_DEBUG, 0, NET_FIELDS, "%s: closed during the TLS handshake", c->peer);
                        gw_conn_fail(c, r == GW_TLS_RESET ? -ECONNRESET : -EPROTO);
                        return;
                }
                gw_conn_fail(c, -EPROTO); /* logged by the backend */
                return;
        }

        c->state = GW_CONN_OPEN;
        c->opened = true;
        uint64_t now = 0;
        (void) sd_event_now(c->l->event, CLOCK_MONOTONIC, &now);
        gw_listener_list_add(&c->l->idle_list, c, now);
        gw_log_full(LOG_DEBUG, 0, NET_FIELDS, "%s: TLS established (%s, %s)", c->peer,
                    gw_tls_conn_get_version(c), gw_tls_conn_get_ciphersuite(c));
        r = c->l->h.on_open ? c->l->h.on_open(c) : 0;
        if (r < 0 && c->state != GW_CONN_DEAD)
                gw_conn_fail(c, r);
}

/* Drives a closing connection: flush, close_notify, shutdown, then wait for EOF. */
static void do_drain(struct gw_net_conn *c) {
        if (c->state == GW_CONN_DRAINING) {
                if (flush_output(c) < 0)
                        return;
                if (c->out_head) {
                        update_events(c);
                        return;
                }
                if (c->ssl && !c->close_notify_done) {
                        int r = gw_tls_conn_close_notify(c);
                        if (r == GW_TLS_WANT_WRITE || r == GW_TLS_WANT_READ) {
                                c->tls_want_read = r == GW_TLS_WANT_READ;
                                update_events(c);
                                return;
                        }
                        c->close_notify_done = true; /* an error here: nothing more to say anyway */
                }
                (void) shutdown(c->fd, SHUT_WR);
                c->state = GW_CONN_LINGER;
                update_events(c);
        }
        if (c->state == GW_CONN_LINGER) {
                /* Read and drop until EOF, so that closing does not reset the connection
                 * (and lose our last bytes) because of input we never read. */
                for (int i = 0; i < READ_BUDGET; i++) {
                        ssize_t n = recv(c->fd, scratch, sizeof(scratch), MSG_DONTWAIT);
                        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                                return;
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n <= 0) {
                                gw_conn_fail(c, c->close_reason);
                                return;
                        }
                }
        }
}

static void conn_process(struct gw_net_conn *c) {
        switch (c->state) {
        case GW_CONN_HANDSHAKE:
                do_handshake(c);
                if (c->state != GW_CONN_OPEN)
                        break;
                __attribute__((fallthrough));
        case GW_CONN_OPEN:
                if (flush_output(c) < 0)
                        return;
                read_input(c);
                if (c->state == GW_CONN_OPEN && c->out_head && !c->tls_want_write)
                        if (flush_output(c) < 0)
                                return;
                if (c->state == GW_CONN_DRAINING || c->state == GW_CONN_LINGER)
                        do_drain(c);
                break;
        case GW_CONN_DRAINING:
        case GW_CONN_LINGER:
                do_drain(c);
                break;
        case GW_CONN_DEAD:
                return;
        }
        if (c->state != GW_CONN_DEAD)
                update_events(c);
}

void gw_conn_io(struct gw_net_conn *c, uint32_t revents) {
        /* Closed by an earlier connection of the same batch: the event is stale (the memory
         * stays valid until the defer source delivers on_close, after the batch). */
        if (c->state == GW_CONN_DEAD)
                return;
        if (c->lazy_in && (revents & EPOLLIN))
                c->lazy_in = false; /* input while paused: stop polling for it (update_events) */
        conn_process(c);
}

void gw_conn_run_pending(struct gw_net_conn *c, unsigned flags) {
        if (flags & GW_PEND_CLOSE) {
                if (c->l->h.on_close)
                        c->l->h.on_close(c, c->close_reason);
                gw_conn_free(c);
                return;
        }
        if (c->state == GW_CONN_DEAD)
                return;
        if ((flags & GW_PEND_READ) && c->state == GW_CONN_OPEN && !c->paused && c->in_len > 0)
                if (deliver(c, NULL, 0) < 0)
                        return;
        conn_process(c);
}

void gw_conn_timeout(struct gw_net_conn *c) {
        if (c->state == GW_CONN_HANDSHAKE) {
                gw_log_full(LOG_INFO, 0, NET_FIELDS, "%s: TLS handshake timed out, closing", c->peer);
                gw_conn_fail(c, -ETIMEDOUT);
        } else if (c->state == GW_CONN_OPEN) {
                gw_log_full(LOG_INFO, 0, NET_FIELDS, "%s: idle timeout, closing", c->peer);
                begin_drain(c, -ETIMEDOUT);
                do_drain(c);
        } else {
                gw_log_full(LOG_INFO, 0, NET_FIELDS, "%s: peer did not finish closing in time", c->peer);
                gw_conn_fail(c, c->close_reason);
        }
}

int gw_conn_new(struct gw_net_listener *l, int fd, const struct sockaddr_storage *sa,
                struct gw_addr_count *ac, struct gw_net_conn **ret) {
        struct gw_net_conn *c;
        int r, one = 1;

        c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->l = l;
        c->fd = fd;
        c->userdata = l->userdata;
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

        c->state = l->tls ? GW_CONN_HANDSHAKE : GW_CONN_OPEN;
        c->io_events = EPOLLIN;
        struct epoll_event e = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
                r = -errno;
                c->fd = -EBADF;
                gw_conn_free(c);
                return r;
        }
        c->io_registered = true;
        if (l->tls) {
                c->tls = gw_tls_server_ref(l->tls);
                r = gw_tls_conn_setup(c);
                if (r < 0) {
                        io_unregister(c);
                        c->fd = -EBADF; /* the caller closes it */
                        gw_conn_free(c);
                        return r;
                }
                c->tls_want_read = true;
        }
        c->addr = ac;
        uint64_t now = 0;
        (void) sd_event_now(l->event, CLOCK_MONOTONIC, &now);
        gw_listener_list_add(l->tls ? &l->hs_list : &l->idle_list, c, now);
        *ret = c;
        return 0;
}

/* ---- public ----------------------------------------------------------------------------- */

int gw_net_conn_send(struct gw_net_conn *c, const void *data, size_t len) {
        struct gw_net_listener *l = c->l;

        if (c->state != GW_CONN_OPEN)
                return -ENOTCONN;
        if (len == 0)
                return 0;
        if (c->out_bytes + len > l->hard_max_output) {
                gw_log_full(LOG_NOTICE, 0, NET_FIELDS,
                            "%s: peer does not read: %zu bytes queued for output (limit %zu), closing",
                            c->peer, c->out_bytes + len, l->hard_max_output);
                gw_conn_fail(c, -ENOBUFS);
                return -ENOBUFS;
        }

        const uint8_t *p = data;
        if (!c->out_head && !c->tls_write_pending && !c->tls_want_write) {
                ssize_t n = write_direct(c, p, len);
                if (n < 0)
                        return -ECONNRESET;
                p += n;
                len -= (size_t) n;
                if (len == 0)
                        return 0;
        }
        struct gw_out_chunk *t = c->out_tail;
        if (t && t->cap > t->len && !(c->ssl && c->tls_write_pending && t == c->out_head)) {
                size_t k = MIN(t->cap - t->len, len);
                memcpy(t->data + t->len, p, k);
                t->len += k;
                p += k;
                len -= k;
                c->out_bytes += k;
        }
        if (len > 0) {
                size_t cap = MAX(len, (size_t) CHUNK_MIN);
                struct gw_out_chunk *k = malloc(sizeof(*k) + cap);
                if (!k)
                        return -ENOMEM;
                k->next = NULL;
                k->off = 0;
                k->len = len;
                k->cap = cap;
                memcpy(k->data, p, len);
                if (c->out_tail)
                        c->out_tail->next = k;
                else
                        c->out_head = k;
                c->out_tail = k;
                c->out_bytes += len;
        }

        if (c->out_bytes >= l->max_output / 2)
                c->above_low_mark = true;
        if (!c->tls_want_write && flush_output(c) < 0)
                return -ECONNRESET;
        if (c->state != GW_CONN_OPEN)
                return 0;
        if (c->out_bytes > l->max_output)
                set_paused(c, true);
        update_events(c);
        return 0;
}

void gw_net_conn_hold_input(struct gw_net_conn *c, bool hold) {
        if (c->held == hold)
                return;
        c->held = hold;
        if (hold)
                set_paused(c, true);
        else if (c->out_bytes <= c->l->max_output)
                set_paused(c, false);
}

void gw_net_conn_close(struct gw_net_conn *c, bool graceful) {
        if (c->state == GW_CONN_DEAD || c->state == GW_CONN_DRAINING || c->state == GW_CONN_LINGER) {
                if (!graceful && c->state != GW_CONN_DEAD)
                        gw_conn_fail(c, -ECANCELED);
                return;
        }
        if (!graceful || c->state == GW_CONN_HANDSHAKE) {
                gw_conn_fail(c, -ECANCELED);
                return;
        }
        begin_drain(c, -ECANCELED);
        gw_listener_schedule(c, GW_PEND_FLUSH);
}

void *gw_net_conn_get_userdata(const struct gw_net_conn *c) {
        return c->userdata;
}

void gw_net_conn_set_userdata(struct gw_net_conn *c, void *userdata) {
        c->userdata = userdata;
}

struct gw_net_listener *gw_net_conn_get_listener(const struct gw_net_conn *c) {
        return c->l;
}

const char *gw_net_conn_get_peer(const struct gw_net_conn *c) {
        return c->peer;
}

bool gw_net_conn_is_tls(const struct gw_net_conn *c) {
        return c->ssl != NULL;
}

bool gw_net_conn_is_open(const struct gw_net_conn *c) {
        return c->state == GW_CONN_OPEN;
}

bool gw_net_conn_is_paused(const struct gw_net_conn *c) {
        return c->paused;
}

size_t gw_net_conn_get_output_bytes(const struct gw_net_conn *c) {
        return c->out_bytes;
}

const char *gw_net_conn_get_sni(const struct gw_net_conn *c) {
        return c->sni;
}

const mbedtls_x509_crt *gw_net_conn_get_peer_cert(const struct gw_net_conn *c) {
        if (!c->ssl || !c->opened)
                return NULL;
        return gw_tls_conn_get_peer_cert(c);
}

int gw_net_conn_get_peer_cert_der(const struct gw_net_conn *c, const uint8_t **ret_der, size_t *ret_len) {
        const mbedtls_x509_crt *crt = gw_net_conn_get_peer_cert(c);
        if (!crt || !crt->raw.p)
                return -ENOENT;
        *ret_der = crt->raw.p;
        *ret_len = crt->raw.len;
        return 0;
}

uint32_t gw_net_conn_get_peer_cert_verify_flags(const struct gw_net_conn *c) {
        if (!gw_net_conn_get_peer_cert(c))
                return UINT32_MAX;
        return c->verify_flags;
}

const char *gw_net_conn_get_ciphersuite(const struct gw_net_conn *c) {
        if (!c->ssl || !c->opened)
                return NULL;
        return gw_tls_conn_get_ciphersuite(c);
}
