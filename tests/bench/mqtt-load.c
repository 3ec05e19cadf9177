/* SPDX-License-Identifier: MIT */
/* mqtt-load: an MQTT 3.1.1 over TLS load generator for by-hand benchmarks (tests/bench/README.md).
 *
 * N device connections (client id, IoT Hub user name and SAS token per device, or one fixed
 * user name / password), QoS 0 or 1 PUBLISHes of a given payload size with an in-flight window
 * per connection, at an offered total rate or at saturation, for a duration after a warm-up.
 * Reports the acknowledged messages per second, publish -> PUBACK latency percentiles (written
 * to the socket -> read from it), the server's CPU time per message and its RSS (from
 * /proc/<pid>/stat and status of --server-pid) and its own CPU use (to show its headroom).
 * --idle only connects and holds the connections (keep-alive PINGREQs), to measure the
 * server's memory per idle TLS connection.
 *
 * Design: W = procs x threads workers, each a non-blocking epoll loop over its slice of the
 * connections, TLS through OpenSSL. Counters, histograms and the run phase live in one shared
 * anonymous mapping, so workers in forked processes (--procs: the open-file limit is per
 * process) are driven and summed exactly like threads. Packet ids are the in-flight slots
 * (1..window), so each slot keeps its send time. With --rate, every worker sends its share of
 * the rate on a 1 ms tick, round-robin over its connections that have a free slot; at
 * saturation a connection refills its window as soon as PUBACKs free slots, and the PUBLISHes
 * queued in one pass leave in one TLS record.
 *
 * Output: a human summary on stderr, and one line "RESULT {json}" on stdout. Exit 0 when the
 * run was clean, 1 when connections failed or closed during the run, 2 on usage errors. */

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>

#include "bench-common.h"
#include "front/mqtt-codec.h"

#define RBUF_SIZE 16384
#define MAX_WINDOW 1024
#define CONNECT_TIMEOUT_SEC 180

enum phase { PH_CONNECT, PH_WARMUP, PH_MEASURE, PH_STOP, PH_QUIT };
enum cstate { CS_TCP, CS_TLS, CS_MQTT, CS_READY, CS_DEAD };

struct opts {
        const char *host, *cafile, *prefix, *hub, *key, *username, *password, *topic_fmt, *ciphers, *timeline;
        uint16_t port;
        unsigned connections, start, threads, procs, window, payload, qos, keepalive, connect_concurrency;
        double rate, duration, warmup;
        bool idle, tls13, insecure;
        int server_pid;
        int sas_ttl;
};

/* One worker's counters, in the shared mapping. */
struct wstats {
        _Atomic uint64_t sent, acked, connected, failed, closed, handshakes;
        _Atomic uint64_t hist[HIST_BUCKETS]; /* only written by its worker, during PH_MEASURE */
        char cipher[64];
        char error[160];
};

/* --timeline: per TL_SLOT_USEC of the measurement, the largest publish->PUBACK latency and the
 * number of PUBACKs, to see whether a p99 comes from a few stalls or from everywhere. */
#define TL_SLOT_USEC 10000u
#define TL_SLOTS 60000u /* 600 s */

struct shared {
        _Atomic int phase;
        _Atomic uint64_t t0; /* now_usec() when PH_MEASURE began */
        _Atomic uint32_t tl_max[TL_SLOTS], tl_n[TL_SLOTS];
        struct wstats w[];
};

struct conn {
        int fd;
        SSL *ssl;
        enum cstate st;
        unsigned idx; /* device number */
        uint8_t rbuf[RBUF_SIZE];
        size_t rlen;
        uint8_t *wbuf;
        size_t wlen, wcap;
        bool want_out, dirty;
        uint32_t ev; /* registered epoll events */
        uint64_t *sent_at;   /* per slot (packet id - 1) */
        uint16_t *free_ids;
        unsigned n_free;
        uint64_t last_tx;
        uint8_t *pkt; /* this connection's PUBLISH */
        size_t pkt_len, pid_off;
};

struct worker {
        unsigned id, first, count;
        int ep;
        SSL_CTX *ctx;
        struct conn *conns;
        struct conn **dirty;
        unsigned n_dirty;
        unsigned next_open, pending; /* connections opened so far, handshakes in progress */
        unsigned rr;
        double rate; /* this worker's share of --rate */
        uint64_t rate_t0, rate_sent;
        struct wstats *s;
};

static struct opts o = {
        .host = "127.0.0.1",
        .prefix = "bench-",
        .topic_fmt = "devices/%s/messages/events/",
        .port = 8883,
        .connections = 100,
        .threads = 1,
        .procs = 1,
        .window = 16,
        .payload = 256,
        .qos = 1,
        .keepalive = 60,
        .connect_concurrency = 64,
        .duration = 10,
        .warmup = 2,
        .sas_ttl = 86400,
};
static struct shared *sh;
static uint8_t *payload_bytes;
static uint8_t key_raw[128];
static int key_len;

static uint64_t now_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        fputs("mqtt-load: ", stderr);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
        exit(2);
}

static void werror(struct worker *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void werror(struct worker *w, const char *fmt, ...) {
        if (w->s->error[0])
                return; /* keep the first one */
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->s->error, sizeof w->s->error, fmt, ap);
        va_end(ap);
}

/* ---- SAS tokens (bench-common.h) ------------------------------------------------------------ */

static void sas_token(const char *dev, char *out, size_t size) {
        if (!bench_sas_token(o.hub, key_raw, key_len, o.sas_ttl, dev, out, size))
                die("HMAC failed");
}

/* ---- connections ------------------------------------------------------------------------ */

static void dev_name(unsigned idx, char *out, size_t size) {
        snprintf(out, size, "%s%06u", o.prefix, idx);
}

static void set_events(struct worker *w, struct conn *c, uint32_t ev) {
        if (c->ev == ev)
                return;
        struct epoll_event e = { .events = ev, .data.ptr = c };
        if (epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &e) == 0)
                c->ev = ev;
}

static void conn_kill(struct worker *w, struct conn *c, const char *why) {
        if (c->st == CS_DEAD)
                return;
        int ph = atomic_load(&sh->phase);
        if (c->st != CS_READY) {
                atomic_fetch_add(&w->s->failed, 1);
                w->pending--;
                werror(w, "device %u: %s", c->idx, why);
        } else if (ph < PH_STOP) {
                atomic_fetch_add(&w->s->closed, 1);
                werror(w, "device %u closed during the run: %s", c->idx, why);
        }
        c->st = CS_DEAD;
        epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        if (c->ssl)
                SSL_free(c->ssl);
        c->ssl = NULL;
        close(c->fd);
        c->fd = -1;
}

static void wbuf_add(struct worker *w, struct conn *c, const uint8_t *p, size_t n) {
        if (c->wlen + n > c->wcap) {
                size_t cap = c->wcap ? c->wcap : 4096;
                while (cap < c->wlen + n)
                        cap *= 2;
                c->wbuf = realloc(c->wbuf, cap);
                if (!c->wbuf)
                        die("out of memory");
                c->wcap = cap;
        }
        memcpy(c->wbuf + c->wlen, p, n);
        c->wlen += n;
        if (!c->dirty) {
                c->dirty = true;
                w->dirty[w->n_dirty++] = c;
        }
}

static void send_connect(struct worker *w, struct conn *c) {
        char id[128], user[512], pass[2048], *pw = NULL;
        dev_name(c->idx, id, sizeof id);
        if (o.hub) {
                snprintf(user, sizeof user, "%s/%s/?api-version=2021-04-12", o.hub, id);
                sas_token(id, pass, sizeof pass);
                pw = pass;
        } else if (o.username) {
                snprintf(user, sizeof user, "%s", o.username);
                pw = (char *) o.password;
        }
        struct gw_mqtt_connect cp = {
                .clean_session = true,
                .keep_alive = (uint16_t) o.keepalive,
                .client_id = gw_mqtt_str_from(id),
                .has_username = o.hub || o.username,
                .username = gw_mqtt_str_from(user),
                .has_password = pw != NULL,
                .password = gw_mqtt_str_from(pw),
        };
        uint8_t buf[4096];
        int n = gw_mqtt_encode_connect(&cp, buf, sizeof buf);
        if (n < 0)
                die("cannot encode CONNECT: %s", gw_mqtt_strerror(n));
        wbuf_add(w, c, buf, (size_t) n);
}

/* Builds the connection's PUBLISH once (topic and payload never change); publish() only
 * patches the packet id. */
static void build_publish(struct conn *c) {
        char id[128], topic[256];
        dev_name(c->idx, id, sizeof id);
        const char *pct = strstr(o.topic_fmt, "%s");
        snprintf(topic, sizeof topic, "%.*s%s%s", (int) (pct - o.topic_fmt), o.topic_fmt, id, pct + 2);
        struct gw_mqtt_publish p = {
                .qos = (uint8_t) o.qos,
                .topic = gw_mqtt_str_from(topic),
                .packet_id = o.qos ? 1 : 0,
                .payload_len = o.payload,
        };
        size_t cap = GW_MQTT_PUBLISH_HEADER_MAX(strlen(topic)) + o.payload;
        c->pkt = malloc(cap);
        if (!c->pkt)
                die("out of memory");
        int n = gw_mqtt_encode_publish_header(&p, c->pkt, cap);
        if (n < 0)
                die("cannot encode PUBLISH: %s", gw_mqtt_strerror(n));
        memcpy(c->pkt + n, payload_bytes, o.payload);
        c->pkt_len = (size_t) n + o.payload;
        c->pid_off = (size_t) n - 2; /* the packet id ends the variable header */
}

static void publish(struct worker *w, struct conn *c, uint64_t now) {
        if (!c->pkt)
                build_publish(c);
        if (o.qos > 0) {
                uint16_t pid = c->free_ids[--c->n_free];
                c->sent_at[pid - 1] = now;
                c->pkt[c->pid_off] = (uint8_t) (pid >> 8);
                c->pkt[c->pid_off + 1] = (uint8_t) pid;
        }
        wbuf_add(w, c, c->pkt, c->pkt_len);
        atomic_fetch_add_explicit(&w->s->sent, 1, memory_order_relaxed);
        if (o.qos == 0)
                atomic_fetch_add_explicit(&w->s->acked, 1, memory_order_relaxed);
}

/* Writes what is queued; returns false when the connection died. */
static bool conn_flush(struct worker *w, struct conn *c) {
        while (c->wlen > 0 && c->st >= CS_MQTT && c->st != CS_DEAD) {
                int r = SSL_write(c->ssl, c->wbuf, (int) c->wlen);
                if (r > 0) {
                        memmove(c->wbuf, c->wbuf + r, c->wlen - (size_t) r);
                        c->wlen -= (size_t) r;
                        c->last_tx = now_usec();
                        continue;
                }
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                        c->want_out = e == SSL_ERROR_WANT_WRITE;
                        break;
                }
                conn_kill(w, c, "TLS write failed");
                return false;
        }
        if (c->st != CS_DEAD)
                set_events(w, c, EPOLLIN | (c->want_out ? EPOLLOUT : 0));
        return c->st != CS_DEAD;
}

static void fill_window(struct worker *w, struct conn *c, uint64_t now) {
        while (c->n_free > 0)
                publish(w, c, now);
}

static void open_next(struct worker *w) {
        while (w->next_open < w->count && w->pending < o.connect_concurrency) {
                struct conn *c = &w->conns[w->next_open++];
                c->idx = o.start + w->first + (unsigned) (c - w->conns);
                c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                if (c->fd < 0) {
                        c->st = CS_DEAD;
                        atomic_fetch_add(&w->s->failed, 1);
                        werror(w, "socket: %s", strerror(errno));
                        continue;
                }
                int one = 1;
                setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(o.port) };
                inet_pton(AF_INET, o.host, &sa.sin_addr);
                w->pending++;
                c->st = CS_TCP;
                int r = connect(c->fd, (struct sockaddr *) &sa, sizeof sa);
                if (r < 0 && errno != EINPROGRESS) {
                        c->st = CS_TCP;
                        c->ev = 0;
                        close(c->fd);
                        c->fd = -1;
                        c->st = CS_DEAD;
                        w->pending--;
                        atomic_fetch_add(&w->s->failed, 1);
                        werror(w, "connect: %s", strerror(errno));
                        continue;
                }
                struct epoll_event e = { .events = EPOLLOUT, .data.ptr = c };
                c->ev = EPOLLOUT;
                epoll_ctl(w->ep, EPOLL_CTL_ADD, c->fd, &e);
        }
}

static void on_ready(struct worker *w, struct conn *c) {
        c->st = CS_READY;
        w->pending--;
        atomic_fetch_add(&w->s->connected, 1);
        if (!w->s->cipher[0] && c->ssl)
                snprintf(w->s->cipher, sizeof w->s->cipher, "%s %s", SSL_get_version(c->ssl),
                         SSL_get_cipher_name(c->ssl));
}

static void on_packet(struct worker *w, struct conn *c, const struct gw_mqtt_packet *pk, uint64_t now, int ph) {
        switch (pk->type) {
        case GW_MQTT_CONNACK:
                if (c->st != CS_MQTT) {
                        conn_kill(w, c, "unexpected CONNACK");
                        return;
                }
                if (pk->connack.return_code != 0) {
                        char why[64];
                        snprintf(why, sizeof why, "CONNACK return code %u", pk->connack.return_code);
                        conn_kill(w, c, why);
                        return;
                }
                on_ready(w, c);
                return;
        case GW_MQTT_PUBACK: {
                uint16_t id = pk->ack.packet_id;
                if (id == 0 || id > o.window) {
                        conn_kill(w, c, "PUBACK for an unknown packet id");
                        return;
                }
                if (ph == PH_MEASURE) {
                        uint64_t lat = now - c->sent_at[id - 1];
                        atomic_fetch_add_explicit(&w->s->hist[hist_index(lat)], 1, memory_order_relaxed);
                        if (o.timeline) {
                                uint64_t slot = (now - atomic_load(&sh->t0)) / TL_SLOT_USEC;
                                if (slot < TL_SLOTS) {
                                        uint32_t l = lat > UINT32_MAX ? UINT32_MAX : (uint32_t) lat;
                                        uint32_t cur = atomic_load_explicit(&sh->tl_max[slot], memory_order_relaxed);
                                        while (l > cur && !atomic_compare_exchange_weak(&sh->tl_max[slot], &cur, l))
                                                ;
                                        atomic_fetch_add_explicit(&sh->tl_n[slot], 1, memory_order_relaxed);
                                }
                        }
                }
                c->free_ids[c->n_free++] = id;
                atomic_fetch_add_explicit(&w->s->acked, 1, memory_order_relaxed);
                return;
        }
        case GW_MQTT_PINGRESP:
                return;
        default:
                return; /* nothing else is expected; ignore */
        }
}

static void conn_read(struct worker *w, struct conn *c, int ph) {
        for (;;) {
                int r = SSL_read(c->ssl, c->rbuf + c->rlen, (int) (sizeof c->rbuf - c->rlen));
                if (r <= 0) {
                        int e = SSL_get_error(c->ssl, r);
                        if (e == SSL_ERROR_WANT_READ)
                                return;
                        if (e == SSL_ERROR_WANT_WRITE) {
                                c->want_out = true;
                                return;
                        }
                        conn_kill(w, c, e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL
                                                ? "the server closed the connection"
                                                : "TLS read failed");
                        return;
                }
                c->rlen += (size_t) r;
                uint64_t now = now_usec();
                size_t used = 0;
                while (used < c->rlen) {
                        struct gw_mqtt_packet pk;
                        size_t n;
                        int d = gw_mqtt_decode(c->rbuf + used, c->rlen - used, sizeof c->rbuf, &pk, &n);
                        if (d == 0)
                                break;
                        if (d < 0) {
                                conn_kill(w, c, gw_mqtt_strerror(d));
                                return;
                        }
                        on_packet(w, c, &pk, now, ph);
                        if (c->st == CS_DEAD)
                                return;
                        used += n;
                }
                memmove(c->rbuf, c->rbuf + used, c->rlen - used);
                c->rlen -= used;
                /* With read-ahead, OpenSSL read what the socket had; level-triggered epoll
                 * reports anything newer, which saves a read() that would say EAGAIN. */
                if (!SSL_has_pending(c->ssl) && c->rlen < sizeof c->rbuf)
                        return;
        }
}

static void conn_handshake(struct worker *w, struct conn *c) {
        int r = SSL_connect(c->ssl);
        if (r == 1) {
                c->st = CS_MQTT;
                atomic_fetch_add(&w->s->handshakes, 1);
                send_connect(w, c);
                return;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ)
                set_events(w, c, EPOLLIN);
        else if (e == SSL_ERROR_WANT_WRITE)
                set_events(w, c, EPOLLIN | EPOLLOUT);
        else {
                char why[160];
                unsigned long err = ERR_get_error();
                snprintf(why, sizeof why, "TLS handshake failed: %s",
                         err ? ERR_reason_error_string(err) : "connection closed");
                ERR_clear_error();
                conn_kill(w, c, why);
        }
}

static void on_event(struct worker *w, struct conn *c, uint32_t ev, int ph) {
        if (c->st == CS_TCP) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err) {
                        conn_kill(w, c, strerror(err));
                        return;
                }
                c->ssl = SSL_new(w->ctx);
                if (!c->ssl)
                        die("SSL_new failed");
                SSL_set_fd(c->ssl, c->fd);
                if (!o.insecure)
                        SSL_set1_host(c->ssl, o.host);
                c->st = CS_TLS;
                conn_handshake(w, c);
                return;
        }
        if (c->st == CS_TLS) {
                conn_handshake(w, c);
                return;
        }
        if (ev & EPOLLOUT)
                c->want_out = false;
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))
                conn_read(w, c, ph);
        if (c->st == CS_READY && ph >= PH_WARMUP && ph < PH_STOP && w->rate <= 0 && !o.idle)
                fill_window(w, c, now_usec());
        if (c->st != CS_DEAD && !c->dirty) {
                c->dirty = true;
                w->dirty[w->n_dirty++] = c;
        }
}

/* Offered rate: sends what is due now, round-robin over the connections with a free slot. */
static void rate_tick(struct worker *w, uint64_t now) {
        if (!w->rate_t0) {
                w->rate_t0 = now;
                return;
        }
        double due = w->rate * (double) (now - w->rate_t0) / 1e6 - (double) w->rate_sent;
        /* Never build up more than 100 ms of backlog: the rate is an offered one. */
        if (due > w->rate / 10 + 1) {
                w->rate_sent += (uint64_t) (due - (w->rate / 10 + 1));
                due = w->rate / 10 + 1;
        }
        unsigned tried = 0;
        while (due >= 1 && tried < w->count) {
                struct conn *c = &w->conns[w->rr];
                w->rr = (w->rr + 1) % w->count;
                if (c->st != CS_READY || (o.qos > 0 && c->n_free == 0)) {
                        tried++;
                        continue;
                }
                tried = 0;
                publish(w, c, now);
                w->rate_sent++;
                due -= 1;
        }
}

static void keepalive_tick(struct worker *w, uint64_t now) {
        if (o.keepalive == 0)
                return;
        uint64_t period = (uint64_t) o.keepalive * 1000000u / 2;
        for (unsigned i = 0; i < w->next_open; i++) {
                struct conn *c = &w->conns[i];
                if (c->st == CS_READY && now - c->last_tx > period) {
                        uint8_t b[2];
                        wbuf_add(w, c, b, gw_mqtt_encode_pingreq(b));
                        c->last_tx = now;
                }
        }
}

static void *worker_main(void *ud) {
        struct worker *w = ud;
        struct epoll_event evs[256];
        uint64_t stop_at = 0, last_ka = now_usec();

        w->ep = epoll_create1(EPOLL_CLOEXEC);
        if (w->ep < 0)
                die("epoll_create1: %s", strerror(errno));
        for (;;) {
                int ph = atomic_load_explicit(&sh->phase, memory_order_acquire);
                if (ph == PH_QUIT)
                        break;
                if (ph == PH_CONNECT)
                        open_next(w);
                int timeout = (w->rate > 0 && ph >= PH_WARMUP && ph < PH_STOP) ? 1 : 20;
                int n = epoll_wait(w->ep, evs, 256, timeout);
                uint64_t now = now_usec();
                for (int i = 0; i < n; i++) {
                        struct conn *c = evs[i].data.ptr;
                        if (c->st != CS_DEAD)
                                on_event(w, c, evs[i].events, ph);
                }
                if (ph >= PH_WARMUP && ph < PH_STOP && !o.idle) {
                        if (w->rate > 0)
                                rate_tick(w, now);
                        else if (ph == PH_WARMUP && !w->rate_t0) {
                                w->rate_t0 = now; /* saturation: prime every window once */
                                for (unsigned i = 0; i < w->count; i++)
                                        if (w->conns[i].st == CS_READY)
                                                fill_window(w, &w->conns[i], now);
                        }
                }
                if (now - last_ka > 1000000) {
                        keepalive_tick(w, now);
                        last_ka = now;
                }
                for (unsigned i = 0; i < w->n_dirty; i++) {
                        struct conn *c = w->dirty[i];
                        c->dirty = false;
                        if (c->st != CS_DEAD)
                                (void) conn_flush(w, c);
                }
                w->n_dirty = 0;
                if (ph == PH_STOP) {
                        /* Let the PUBACKs of what is in flight come back (at most 2 s), then leave. */
                        if (!stop_at)
                                stop_at = now;
                        bool busy = false;
                        for (unsigned i = 0; i < w->count && !busy; i++)
                                busy = w->conns[i].st == CS_READY && w->conns[i].n_free < o.window && o.qos > 0;
                        if (!busy || now - stop_at > 2000000)
                                break;
                }
        }
        for (unsigned i = 0; i < w->count; i++) {
                struct conn *c = &w->conns[i];
                if (c->st == CS_READY) {
                        uint8_t b[2];
                        size_t n = gw_mqtt_encode_disconnect(b);
                        (void) SSL_write(c->ssl, b, (int) n);
                        (void) SSL_shutdown(c->ssl);
                }
                if (c->st != CS_DEAD && c->fd >= 0) {
                        if (c->ssl)
                                SSL_free(c->ssl);
                        close(c->fd);
                }
                c->st = CS_DEAD;
                free(c->wbuf);
                free(c->sent_at);
                free(c->free_ids);
                free(c->pkt);
        }
        close(w->ep);
        return NULL;
}

static SSL_CTX *make_ctx(void) {
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx)
                die("SSL_CTX_new failed");
        SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
        if (!o.tls13)
                SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION);
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_read_ahead(ctx, 1);
        if (o.ciphers && SSL_CTX_set_cipher_list(ctx, o.ciphers) != 1)
                die("--ciphers %s: no usable cipher", o.ciphers);
        if (o.insecure)
                SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        else {
                if (!o.cafile)
                        die("--cafile is required (or --insecure)");
                if (SSL_CTX_load_verify_locations(ctx, o.cafile, NULL) != 1)
                        die("cannot load the CA file %s", o.cafile);
                SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        }
        return ctx;
}

/* Runs the workers [first_w, first_w + n) of this process as threads, until PH_QUIT. */
static void run_workers(unsigned first_w, unsigned n, unsigned total_w) {
        struct worker *ws = calloc(n, sizeof *ws);
        pthread_t *th = calloc(n, sizeof *th);
        if (!ws || !th)
                die("out of memory");
        for (unsigned i = 0; i < n; i++) {
                struct worker *w = &ws[i];
                unsigned g = first_w + i;
                w->id = g;
                w->first = (unsigned) ((uint64_t) o.connections * g / total_w);
                w->count = (unsigned) ((uint64_t) o.connections * (g + 1) / total_w) - w->first;
                w->s = &sh->w[g];
                w->rate = o.rate * w->count / o.connections;
                w->ctx = make_ctx();
                w->conns = calloc(w->count ? w->count : 1, sizeof *w->conns);
                w->dirty = calloc(w->count ? w->count : 1, sizeof *w->dirty);
                if (!w->conns || !w->dirty)
                        die("out of memory");
                for (unsigned k = 0; k < w->count; k++) {
                        struct conn *c = &w->conns[k];
                        c->fd = -1;
                        c->st = CS_DEAD;
                        if (o.qos > 0) {
                                c->sent_at = calloc(o.window, sizeof *c->sent_at);
                                c->free_ids = calloc(o.window, sizeof *c->free_ids);
                                if (!c->sent_at || !c->free_ids)
                                        die("out of memory");
                                for (unsigned j = 0; j < o.window; j++)
                                        c->free_ids[j] = (uint16_t) (o.window - j);
                                c->n_free = o.window;
                        }
                }
                if (pthread_create(&th[i], NULL, worker_main, w) != 0)
                        die("pthread_create failed");
        }
        for (unsigned i = 0; i < n; i++) {
                pthread_join(th[i], NULL);
                SSL_CTX_free(ws[i].ctx);
                free(ws[i].conns);
                free(ws[i].dirty);
        }
        free(ws);
        free(th);
}

static void *runner_main(void *ud) {
        (void) ud;
        run_workers(0, o.threads, o.threads);
        return NULL;
}

/* ---- the orchestrator ------------------------------------------------------------------- */

struct pstat {
        double cpu_sec;
        long rss_kb, hwm_kb;
};

static bool read_pstat(int pid, struct pstat *ret) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
        FILE *f = fopen(path, "re");
        if (!f)
                return false;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (!p)
                return false;
        unsigned long long ut = 0, st = 0;
        /* after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15) */
        if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
                return false;
        ret->cpu_sec = (double) (ut + st) / (double) sysconf(_SC_CLK_TCK);
        snprintf(path, sizeof path, "/proc/%d/status", pid);
        f = fopen(path, "re");
        if (!f)
                return false;
        ret->rss_kb = ret->hwm_kb = 0;
        while (fgets(buf, sizeof buf, f)) {
                if (strncmp(buf, "VmRSS:", 6) == 0)
                        ret->rss_kb = atol(buf + 6);
                else if (strncmp(buf, "VmHWM:", 6) == 0)
                        ret->hwm_kb = atol(buf + 6);
        }
        fclose(f);
        return true;
}

/* Busy CPU time of the whole machine (all cores), in seconds: what is neither ours nor the
 * server's shows how much else competed for the cores during the measurement. */
static double machine_busy(void) {
        FILE *f = fopen("/proc/stat", "re");
        unsigned long long v[10] = {};
        if (!f)
                return 0;
        int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                       &v[5], &v[6], &v[7], &v[8], &v[9]);
        fclose(f);
        if (n < 8)
                return 0;
        /* user nice system idle iowait irq softirq steal: busy = all but idle and iowait (guest
         * time is already counted in user). */
        unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        return (double) busy / (double) sysconf(_SC_CLK_TCK);
}

static double self_cpu(void) { /* this process and its waited-for children (the --procs workers) */
        struct rusage a, b;
        getrusage(RUSAGE_SELF, &a);
        getrusage(RUSAGE_CHILDREN, &b);
        return (double) (a.ru_utime.tv_sec + a.ru_stime.tv_sec + b.ru_utime.tv_sec + b.ru_stime.tv_sec) +
               (double) (a.ru_utime.tv_usec + a.ru_stime.tv_usec + b.ru_utime.tv_usec + b.ru_stime.tv_usec) / 1e6;
}

/* CPU of the worker processes while they still run: /proc/<pid>/stat of each. */
static double procs_cpu(const pid_t *pids, unsigned n) {
        double s = 0;
        for (unsigned i = 0; i < n; i++) {
                struct pstat p;
                if (read_pstat(pids[i], &p))
                        s += p.cpu_sec;
        }
        return s;
}

static uint64_t sum(size_t off, unsigned nw) {
        uint64_t s = 0;
        for (unsigned i = 0; i < nw; i++)
                s += atomic_load((_Atomic uint64_t *) ((char *) &sh->w[i] + off));
        return s;
}
#define SUM(field, nw) sum(offsetof(struct wstats, field), nw)

static void sleep_sec(double s) {
        struct timespec ts = { (time_t) s, (long) ((s - (double) (time_t) s) * 1e9) };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

static void usage(void) {
        fprintf(stderr,
                "Usage: mqtt-load [OPTIONS]\n"
                "  --host IP --port N          server (127.0.0.1:8883)\n"
                "  --cafile FILE | --insecure  trust FILE for the server certificate (name = --host)\n"
                "  --tls13                     allow TLS 1.3 (default: TLS 1.2 only, as IoT Hub)\n"
                "  --ciphers LIST              OpenSSL TLS 1.2 cipher list (default: OpenSSL's)\n"
                "  --connections N             device connections (100)\n"
                "  --prefix P --start K        device ids P%%06u from K (bench-, 0)\n"
                "  --hub HOST --key BASE64     IoT Hub user names and SAS tokens signed with KEY\n"
                "  --username U --password P   fixed credentials instead (none: anonymous)\n"
                "  --topic FMT                 topic, %%s = device id (devices/%%s/messages/events/)\n"
                "  --qos 0|1 --window W        QoS and in-flight PUBLISHes per connection (1, 16)\n"
                "  --payload BYTES             payload size (256)\n"
                "  --rate R                    offered total messages/s (0 = saturation)\n"
                "  --warmup S --duration S     seconds before and of the measurement (2, 10)\n"
                "  --idle                      connect, hold for --duration, publish nothing\n"
                "  --threads T --procs P       event loops per process, processes (1, 1)\n"
                "  --connect-concurrency N     handshakes in progress per loop (64)\n"
                "  --keepalive S               MQTT keep-alive (60)\n"
                "  --server-pid PID            report this process's CPU per message and RSS\n"
                "  --timeline FILE             write \"ms max_latency_us pubacks\" per 10 ms of the measurement\n");
        exit(2);
}

int main(int argc, char **argv) {
        enum { O_HOST = 256, O_PORT, O_CAFILE, O_INSECURE, O_TLS13, O_CONNS, O_PREFIX, O_START, O_HUB, O_KEY,
               O_USER, O_PASS, O_TOPIC, O_QOS, O_WINDOW, O_PAYLOAD, O_RATE, O_WARMUP, O_DURATION, O_IDLE,
               O_THREADS, O_PROCS, O_CC, O_KA, O_PID, O_CIPHERS, O_TIMELINE };
        static const struct option lo[] = {
                { "host", 1, NULL, O_HOST },       { "port", 1, NULL, O_PORT },
                { "cafile", 1, NULL, O_CAFILE },   { "insecure", 0, NULL, O_INSECURE },
                { "tls13", 0, NULL, O_TLS13 },     { "connections", 1, NULL, O_CONNS },
                { "prefix", 1, NULL, O_PREFIX },   { "start", 1, NULL, O_START },
                { "hub", 1, NULL, O_HUB },         { "key", 1, NULL, O_KEY },
                { "username", 1, NULL, O_USER },   { "password", 1, NULL, O_PASS },
                { "topic", 1, NULL, O_TOPIC },     { "qos", 1, NULL, O_QOS },
                { "window", 1, NULL, O_WINDOW },   { "payload", 1, NULL, O_PAYLOAD },
                { "rate", 1, NULL, O_RATE },       { "warmup", 1, NULL, O_WARMUP },
                { "duration", 1, NULL, O_DURATION }, { "idle", 0, NULL, O_IDLE },
                { "threads", 1, NULL, O_THREADS }, { "procs", 1, NULL, O_PROCS },
                { "connect-concurrency", 1, NULL, O_CC }, { "keepalive", 1, NULL, O_KA },
                { "server-pid", 1, NULL, O_PID },  { "ciphers", 1, NULL, O_CIPHERS },
                { "timeline", 1, NULL, O_TIMELINE },
                { "help", 0, NULL, 'h' },
                {},
        };
        int c;
        while ((c = getopt_long(argc, argv, "h", lo, NULL)) >= 0) {
                switch (c) {
                case O_HOST: o.host = optarg; break;
                case O_PORT: o.port = (uint16_t) atoi(optarg); break;
                case O_CAFILE: o.cafile = optarg; break;
                case O_INSECURE: o.insecure = true; break;
                case O_TLS13: o.tls13 = true; break;
                case O_CONNS: o.connections = (unsigned) atoi(optarg); break;
                case O_PREFIX: o.prefix = optarg; break;
                case O_START: o.start = (unsigned) atoi(optarg); break;
                case O_HUB: o.hub = optarg; break;
                case O_KEY: o.key = optarg; break;
                case O_USER: o.username = optarg; break;
                case O_PASS: o.password = optarg; break;
                case O_TOPIC: o.topic_fmt = optarg; break;
                case O_QOS: o.qos = (unsigned) atoi(optarg); break;
                case O_WINDOW: o.window = (unsigned) atoi(optarg); break;
                case O_PAYLOAD: o.payload = (unsigned) atoi(optarg); break;
                case O_RATE: o.rate = atof(optarg); break;
                case O_WARMUP: o.warmup = atof(optarg); break;
                case O_DURATION: o.duration = atof(optarg); break;
                case O_IDLE: o.idle = true; break;
                case O_THREADS: o.threads = (unsigned) atoi(optarg); break;
                case O_PROCS: o.procs = (unsigned) atoi(optarg); break;
                case O_CC: o.connect_concurrency = (unsigned) atoi(optarg); break;
                case O_KA: o.keepalive = (unsigned) atoi(optarg); break;
                case O_PID: o.server_pid = atoi(optarg); break;
                case O_CIPHERS: o.ciphers = optarg; break;
                case O_TIMELINE: o.timeline = optarg; break;
                default: usage();
                }
        }
        if (optind != argc || o.connections == 0 || o.threads == 0 || o.procs == 0 || o.qos > 1 ||
            o.window == 0 || o.window > MAX_WINDOW || o.port == 0 || o.duration <= 0 || o.warmup < 0 ||
            o.rate < 0 || o.connect_concurrency == 0 || o.keepalive > 65535 || o.payload > 1024 * 1024)
                usage();
        if (!!o.hub != !!o.key)
                die("--hub and --key go together");
        if (o.hub && o.username)
                die("--hub/--key and --username are exclusive");
        if (strstr(o.topic_fmt, "%s") == NULL || strchr(strstr(o.topic_fmt, "%s") + 2, '%'))
                die("--topic must contain exactly one %%s and no other %%");
        if (o.key) {
                size_t kl = strlen(o.key);
                if (kl == 0 || kl % 4 || kl * 3 / 4 > sizeof key_raw)
                        die("--key is not base64 of at most 96 bytes");
                key_len = EVP_DecodeBlock(key_raw, (const unsigned char *) o.key, (int) kl);
                if (key_len < 0)
                        die("--key is not base64");
                key_len -= (o.key[kl - 1] == '=') + (o.key[kl - 2] == '=');
        }
        struct in_addr ia;
        if (inet_pton(AF_INET, o.host, &ia) != 1)
                die("--host must be an IPv4 address");
        if (o.server_pid) {
                struct pstat p;
                if (!read_pstat(o.server_pid, &p))
                        die("cannot read /proc/%d/stat", o.server_pid);
        }
        signal(SIGPIPE, SIG_IGN);
        payload_bytes = malloc(o.payload ? o.payload : 1);
        if (!payload_bytes)
                die("out of memory");
        for (unsigned i = 0; i < o.payload; i++)
                payload_bytes[i] = (uint8_t) ("{\"temperature\":21.5,\"humidity\":40,\"seq\":0123456789}"[i % 50]);

        unsigned nw = o.threads * o.procs;
        if (nw > o.connections)
                die("more event loops than connections");
        size_t shsize = sizeof(struct shared) + nw * sizeof(struct wstats);
        sh = mmap(NULL, shsize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (sh == MAP_FAILED)
                die("mmap: %s", strerror(errno));
        atomic_store(&sh->phase, PH_CONNECT);

        pid_t *pids = calloc(o.procs, sizeof *pids);
        pthread_t runner;
        if (!pids)
                die("out of memory");
        if (o.procs > 1) {
                fflush(NULL);
                for (unsigned p = 0; p < o.procs; p++) {
                        pid_t pid = fork();
                        if (pid < 0)
                                die("fork: %s", strerror(errno));
                        if (pid == 0) {
                                run_workers(p * o.threads, o.threads, nw);
                                _exit(0);
                        }
                        pids[p] = pid;
                }
        } else if (pthread_create(&runner, NULL, runner_main, NULL) != 0)
                die("pthread_create failed");

        /* Connect everything. */
        struct pstat srv_start = {}, srv0 = {}, srv1 = {}, srv_conn = {};
        if (o.server_pid)
                read_pstat(o.server_pid, &srv_start);
        uint64_t t_conn0 = now_usec();
        for (;;) {
                uint64_t done = SUM(connected, nw) + SUM(failed, nw);
                if (done >= o.connections)
                        break;
                if (now_usec() - t_conn0 > (uint64_t) CONNECT_TIMEOUT_SEC * 1000000u) {
                        fprintf(stderr, "mqtt-load: connecting took longer than %d s\n", CONNECT_TIMEOUT_SEC);
                        break;
                }
                sleep_sec(0.05);
        }
        double connect_sec = (double) (now_usec() - t_conn0) / 1e6;
        uint64_t connected = SUM(connected, nw), failed = SUM(failed, nw);
        fprintf(stderr, "mqtt-load: %" PRIu64 " connected, %" PRIu64 " failed in %.1f s\n", connected, failed,
                connect_sec);
        if (connected == 0) {
                const char *err = "";
                for (unsigned i = 0; i < nw && !err[0]; i++)
                        err = sh->w[i].error;
                atomic_store(&sh->phase, PH_STOP);
                if (o.procs > 1)
                        for (unsigned p = 0; p < o.procs; p++)
                                waitpid(pids[p], NULL, 0);
                else
                        pthread_join(runner, NULL);
                fprintf(stderr, "mqtt-load: no connection succeeded (first error: %s)\n", err);
                return 1;
        }
        if (o.server_pid) {
                sleep_sec(0.5); /* let the server settle after the last CONNACK */
                read_pstat(o.server_pid, &srv_conn);
        }

        /* Warm up, then measure. */
        atomic_store(&sh->phase, PH_WARMUP);
        sleep_sec(o.warmup);
        uint64_t acked0 = SUM(acked, nw), sent0 = SUM(sent, nw);
        double self0 = o.procs > 1 ? procs_cpu(pids, o.procs) : self_cpu();
        double busy0 = machine_busy();
        if (o.server_pid)
                read_pstat(o.server_pid, &srv0);
        uint64_t t0 = now_usec();
        atomic_store(&sh->t0, t0);
        atomic_store(&sh->phase, PH_MEASURE);
        sleep_sec(o.duration);
        atomic_store(&sh->phase, PH_STOP);
        uint64_t t1 = now_usec();
        uint64_t acked1 = SUM(acked, nw), sent1 = SUM(sent, nw);
        if (o.timeline) {
                FILE *f = fopen(o.timeline, "we");
                if (!f)
                        die("%s: %s", o.timeline, strerror(errno));
                for (uint64_t i = 0; i < TL_SLOTS && i * TL_SLOT_USEC < t1 - t0; i++)
                        fprintf(f, "%" PRIu64 " %u %u\n", i * TL_SLOT_USEC / 1000, atomic_load(&sh->tl_max[i]),
                                atomic_load(&sh->tl_n[i]));
                fclose(f);
        }
        double self1 = o.procs > 1 ? procs_cpu(pids, o.procs) : self_cpu();
        double busy1 = machine_busy();
        if (o.server_pid)
                read_pstat(o.server_pid, &srv1);
        uint64_t closed = SUM(closed, nw);

        /* Wind down. */
        if (o.procs > 1) {
                for (unsigned p = 0; p < o.procs; p++)
                        waitpid(pids[p], NULL, 0);
        } else {
                pthread_join(runner, NULL);
        }

        double secs = (double) (t1 - t0) / 1e6;
        uint64_t acked = acked1 - acked0;
        double rate = (double) acked / secs;
        uint64_t hist[HIST_BUCKETS] = {}, n_lat = 0;
        for (unsigned i = 0; i < nw; i++)
                for (unsigned b = 0; b < HIST_BUCKETS; b++) {
                        uint64_t v = atomic_load(&sh->w[i].hist[b]);
                        hist[b] += v;
                        n_lat += v;
                }
        double pct[4] = { 0.50, 0.90, 0.99, 0.999 };
        double lat_ms[4] = { 0 };
        for (int k = 0; k < 4 && n_lat > 0; k++) {
                uint64_t target = (uint64_t) ceil(pct[k] * (double) n_lat), acc = 0;
                for (unsigned b = 0; b < HIST_BUCKETS; b++) {
                        acc += hist[b];
                        if (acc >= target) {
                                lat_ms[k] = (double) hist_value(b) / 1000.0;
                                break;
                        }
                }
        }
        double self_cores = (self1 - self0) / secs;
        double srv_cpu = o.server_pid ? srv1.cpu_sec - srv0.cpu_sec : 0;
        double other_cores = (busy1 - busy0 - (self1 - self0) - srv_cpu) / secs;
        if (other_cores < 0)
                other_cores = 0;
        const char *cipher = "";
        for (unsigned i = 0; i < nw && !cipher[0]; i++)
                cipher = sh->w[i].cipher;
        const char *err = "";
        for (unsigned i = 0; i < nw && !err[0]; i++)
                err = sh->w[i].error;

        fprintf(stderr, "mqtt-load: %s, %u connections, QoS %u, window %u, %u B, %s\n", cipher, o.connections,
                o.qos, o.window, o.payload, o.idle ? "idle" : o.rate > 0 ? "offered rate" : "saturation");
        if (!o.idle) {
                fprintf(stderr, "  offered %.0f msg/s, sent %.0f msg/s, acknowledged %.0f msg/s over %.1f s\n", o.rate,
                        (double) (sent1 - sent0) / secs, rate, secs);
                fprintf(stderr, "  publish->PUBACK latency: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, p99.9 %.3f ms (%" PRIu64
                                " samples)\n",
                        lat_ms[0], lat_ms[1], lat_ms[2], lat_ms[3], n_lat);
        }
        fprintf(stderr, "  generator CPU: %.2f cores (%.2f us/msg); other processes and the kernel: %.2f cores\n",
                self_cores, acked ? (self1 - self0) * 1e6 / (double) acked : 0.0, other_cores);
        if (o.server_pid)
                fprintf(stderr,
                        "  server pid %d: CPU %.2f cores, %.2f us/msg; RSS %ld KiB (%ld KiB before connecting, %ld KiB "
                        "once connected), peak (VmHWM) %ld KiB\n",
                        o.server_pid, srv_cpu / secs, acked ? srv_cpu * 1e6 / (double) acked : 0.0, srv1.rss_kb,
                        srv_start.rss_kb, srv_conn.rss_kb, srv1.hwm_kb);
        if (err[0])
                fprintf(stderr, "  first error: %s\n", err);
        printf("RESULT {\"connections\":%u,\"connected\":%" PRIu64 ",\"failed\":%" PRIu64 ",\"closed\":%" PRIu64
               ",\"connect_sec\":%.3f,\"qos\":%u,\"window\":%u,\"payload\":%u,\"offered\":%.1f,\"seconds\":%.3f,"
               "\"sent\":%" PRIu64 ",\"acked\":%" PRIu64 ",\"msgs_per_sec\":%.1f,\"p50_ms\":%.3f,\"p90_ms\":%.3f,"
               "\"p99_ms\":%.3f,\"p999_ms\":%.3f,\"gen_cores\":%.3f,\"server_cores\":%.3f,\"server_us_per_msg\":%.3f,"
               "\"server_rss_kb_start\":%ld,\"server_rss_kb_connected\":%ld,\"server_rss_kb\":%ld,"
               "\"server_hwm_kb\":%ld,\"other_cores\":%.3f,\"cipher\":\"%s\"}\n",
               o.connections, connected, failed, closed, connect_sec, o.qos, o.window, o.payload, o.rate, secs,
               sent1 - sent0, acked, rate, lat_ms[0], lat_ms[1], lat_ms[2], lat_ms[3], self_cores,
               o.server_pid ? srv_cpu / secs : 0.0, acked ? srv_cpu * 1e6 / (double) acked : 0.0, srv_start.rss_kb,
               srv_conn.rss_kb, srv1.rss_kb, srv1.hwm_kb, other_cores, cipher);
        free(pids);
        free(payload_bytes);
        return failed || closed ? 1 : 0;
}
