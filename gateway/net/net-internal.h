/* SPDX-License-Identifier: MIT */
#pragma once

/* Shared between listener.c, conn.c, tls.c and cert.c; not for front-ends. */

#include <netinet/in.h>
#include <sys/socket.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

#include "net/net.h"

/* struct gw_tls_server and struct gw_tls_conn (one per TLS connection, c->ssl) are defined by
 * the TLS backend chosen at build time (meson option tls_backend): tls-openssl.c (OpenSSL 3)
 * or tls-mbedtls.c (mbedtls 2.28). conn.c drives them through the gw_tls_conn_* calls below. */
struct gw_tls_conn;

/* One source address and how many connections it has open (per-address limit). */
struct gw_addr_count {
        struct gw_addr_count *next;
        uint8_t family;
        uint8_t addr[16];
        unsigned n;
};

#define GW_ADDR_BUCKETS 512u

/* Seeds a CTR-DRBG from getrandom(2) with the personalization string @pers (tls.c).
 * Returns mbedtls_ctr_drbg_seed()'s result: 0 or an mbedtls error code. */
int gw_net_drbg_seed(mbedtls_ctr_drbg_context *drbg, const char *pers);

/* A list of connections ordered by deadline (all with the same timeout). */
struct gw_conn_list {
        struct gw_net_conn *head, *tail;
        uint64_t timeout_usec;
};

struct gw_net_listener {
        sd_event *event;
        int fd;
        uint16_t port;
        char *address;
        sd_event_source *accept_src, *timer_src, *defer_src, *retry_src;
        /* The listener's connections are not sd-event sources: they live in this private
         * epoll set (epoll_ctl from conn.c), which is ONE io source on the loop (poll_src);
         * its dispatch handles up to a batch of ready connections (see on_poll). */
        int epfd;
        sd_event_source *poll_src;
        bool *batch_alive; /* set while on_poll runs; gw_net_listener_free clears *batch_alive */
        struct gw_tls_server *tls;
        struct gw_net_handler h;
        void *userdata;

        unsigned max_connections, max_per_address;
        size_t max_input, max_output, hard_max_output;

        unsigned n_conns;
        struct gw_conn_list hs_list, idle_list;
        struct gw_net_conn *pending_head, *pending_tail; /* work for the defer source */
        struct gw_addr_count *buckets[GW_ADDR_BUCKETS];
};

enum gw_conn_state {
        GW_CONN_HANDSHAKE, /* TLS handshake running */
        GW_CONN_OPEN,
        GW_CONN_DRAINING,  /* graceful close: flushing output, then close_notify */
        GW_CONN_LINGER,    /* shut down for writing, discarding input until EOF */
        GW_CONN_DEAD,      /* socket closed, on_close pending */
};

struct gw_out_chunk {
        struct gw_out_chunk *next;
        size_t off, len, cap;
        uint8_t data[];
};

enum {
        GW_PEND_READ = 1u << 0,  /* re-offer buffered input, read what TLS holds */
        GW_PEND_FLUSH = 1u << 1, /* write (graceful close requested) */
        GW_PEND_CLOSE = 1u << 2, /* deliver on_close and free */
};

struct gw_net_conn {
        struct gw_net_listener *l;
        int fd;
        enum gw_conn_state state;
        bool io_registered; /* fd is in l->epfd with the events io_events */
        uint32_t io_events;

        struct gw_tls_conn *ssl;   /* NULL for plain TCP */
        struct gw_tls_server *tls;
        size_t tls_write_pending;  /* length of a TLS write to be repeated (WANT_WRITE) */
        bool tls_want_read, tls_want_write;
        bool close_notify_done;
        /* TLS read-ahead (tls.c): bytes received but not yet taken by the TLS library, which
         * asks for a record header, then its body. ra points into the listener-wide buffer, or
         * into ra_own once they had to be moved out of it. ra_drained: the last recv()
         * returned less than asked, so the socket is empty and the next read would only
         * say EAGAIN (epoll, level-triggered, reports anything newer). */
        uint8_t *ra, *ra_own;
        size_t ra_off, ra_len;
        bool ra_drained;
        uint32_t verify_flags;
        char *sni;

        bool paused, above_low_mark, reason_set, opened;
        bool held; /* input held by the front-end (gw_net_conn_hold_input) */
        /* Paused, but EPOLLIN still registered: it is dropped only when it fires, so that a
         * short pause (the MQTT window filling and emptying with every group commit) costs
         * no epoll_ctl() calls. */
        bool lazy_in;
        int close_reason;

        uint8_t *in;
        size_t in_len, in_cap;
        struct gw_out_chunk *out_head, *out_tail;
        size_t out_bytes;

        /* deadline list */
        struct gw_conn_list *list;
        struct gw_net_conn *prev, *next;
        uint64_t since;

        unsigned pend_flags;
        struct gw_net_conn *pend_next;

        struct gw_addr_count *addr;
        char peer[INET6_ADDRSTRLEN + 8];
        void *userdata;
};

/* listener.c */
void gw_listener_list_add(struct gw_conn_list *list, struct gw_net_conn *c, uint64_t now);
void gw_listener_list_remove(struct gw_net_conn *c);
void gw_listener_touch(struct gw_net_conn *c);
void gw_listener_schedule(struct gw_net_conn *c, unsigned flags);
void gw_listener_conn_gone(struct gw_net_conn *c);

/* conn.c */
int gw_conn_new(struct gw_net_listener *l, int fd, const struct sockaddr_storage *sa,
                struct gw_addr_count *ac, struct gw_net_conn **ret);
void gw_conn_run_pending(struct gw_net_conn *c, unsigned flags);
void gw_conn_timeout(struct gw_net_conn *c);
void gw_conn_fail(struct gw_net_conn *c, int reason);
void gw_conn_free(struct gw_net_conn *c);
/* Handles the readiness revents that l->epfd reported for c (the connection is not freed). */
void gw_conn_io(struct gw_net_conn *c, uint32_t revents);

/* tls.c: backend-neutral parts. */

/* Checks that cfg names readable files and a key file not accessible by others, then parses
 * the chain, the key (with cfg->key_password), checks that they match, and the client CA
 * bundle if any, with mbedtls (both backends accept exactly the same files). Returns 0 with
 * *m filled (free it with gw_tls_material_free), or -errno after logging (see
 * gw_tls_server_new). */
struct gw_tls_material {
        mbedtls_x509_crt chain;
        mbedtls_pk_context key;
        mbedtls_x509_crt client_ca;
        bool has_client_ca;
};
int gw_tls_material_load(const struct gw_tls_server_config *cfg, struct gw_tls_material *m);
void gw_tls_material_free(struct gw_tls_material *m);

/* Read-ahead: one recv() into a buffer shared by all connections, the TLS library's reads
 * served from there (see tls.c). Returns the bytes copied (> 0), 0 at EOF, -EAGAIN when the
 * socket has nothing more now, -ECONNRESET, -ENOMEM or another -errno. */
ssize_t gw_tls_ra_recv(struct gw_net_conn *c, void *buf, size_t len);
/* Forgets the connection's read-ahead (it is being freed). */
void gw_tls_conn_forget(struct gw_net_conn *c);

/* The backend (tls-openssl.c or tls-mbedtls.c). The I/O calls return >= 0 on success or one
 * of these; GW_TLS_FAILED has been logged by the backend ("<peer>: TLS <what> failed: ..."). */
enum {
        GW_TLS_WANT_READ = -1,  /* repeat when the socket is readable */
        GW_TLS_WANT_WRITE = -2, /* repeat when the socket is writable (a write: same length) */
        GW_TLS_EOF = -3,        /* close_notify or end of stream from the peer */
        GW_TLS_RESET = -4,      /* connection reset by the peer */
        GW_TLS_FAILED = -5,     /* protocol error, bad record, internal error */
};
/* Creates c->ssl for a new connection of c->tls. Returns 0 or -ENOMEM / -EIO. */
int gw_tls_conn_setup(struct gw_net_conn *c);
/* Frees c->ssl (accepts NULL) and sets it to NULL. */
void gw_tls_conn_free(struct gw_net_conn *c);
/* Drives the handshake. On completion returns 0 with c->verify_flags (the client certificate
 * checked against the client CA bundle, mbedtls flags; UINT32_MAX without one) and c->sni set. */
int gw_tls_conn_handshake(struct gw_net_conn *c);
/* Decrypted bytes (> 0) into buf. */
int gw_tls_conn_read(struct gw_net_conn *c, uint8_t *buf, size_t len);
/* Encrypts and sends len (<= 16 KiB) bytes: returns len, or an error; after
 * GW_TLS_WANT_WRITE / GW_TLS_WANT_READ repeat with the same length and bytes (the buffer may
 * have moved). */
int gw_tls_conn_write(struct gw_net_conn *c, const uint8_t *buf, size_t len);
/* Sends close_notify: 0 when done (or failed: nothing more to say), or WANT_READ/WANT_WRITE. */
int gw_tls_conn_close_notify(struct gw_net_conn *c);
/* After the handshake: "TLSv1.2"; the suite in IANA form with dashes
 * ("TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256", as mbedtls names them); the client's
 * certificate (leaf, then the chain it sent, linked by ->next) or NULL. */
const char *gw_tls_conn_get_version(const struct gw_net_conn *c);
const char *gw_tls_conn_get_ciphersuite(const struct gw_net_conn *c);
const mbedtls_x509_crt *gw_tls_conn_get_peer_cert(const struct gw_net_conn *c);
