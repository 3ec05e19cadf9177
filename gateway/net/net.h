/* SPDX-License-Identifier: MIT */
#pragma once

/* gateway/net: the network layer every front-end shares (MQTT, HTTP, AMQP, the service API).
 *
 * Everything here runs on the one sd-event loop of the daemon and never blocks:
 *
 *  - A listener (listener.c) binds one address:port, IPv4 or IPv6, and accepts with accept4()
 *    while the loop says the socket is readable. It enforces the connection bounds (global
 *    and per source address) at accept, and owns one timer for the handshake and idle
 *    deadlines of all its connections (kept in two lists ordered by deadline, so a connection
 *    costs no timer of its own: 10,000 idle connections are one armed timer).
 *  - A connection (conn.c) is a non-blocking socket, optionally wrapped in TLS (tls.c). Input
 *    is handed to the front-end as it arrives; what it does not consume stays buffered up to
 *    max_input_bytes. Output is copied into a queue and written when the socket is writable.
 *    When the queue passes max_output_bytes the connection stops reading from the peer until
 *    it drains below half of that (a peer that does not read its responses cannot make us
 *    buffer without bound); past hard_max_output_bytes it is closed.
 *  - The TLS server (tls.c, and the backend chosen at build time with the meson option
 *    tls_backend: tls-openssl.c, OpenSSL 3, the default, or tls-mbedtls.c, mbedtls 2.28):
 *    TLS 1.2 only, AEAD suites with ECDHE, no session tickets and no session cache, an
 *    optional client-certificate request whose result (certificate as an mbedtls_x509_crt and
 *    mbedtls verify flags, whatever the backend) is surfaced for the device layer to judge.
 *  - Certificates (cert.c): a local CA and a server certificate generated into the state
 *    directory when none is configured.
 *
 * Threading: none of these functions is thread-safe; call them from the loop thread. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <mbedtls/x509_crt.h>
#include <systemd/sd-event.h>

struct gw_net_listener;
struct gw_net_conn;
struct gw_tls_server;

/* ---- TLS server configuration (tls.c) ------------------------------------------------- */

enum gw_tls_client_cert {
        GW_TLS_CLIENT_CERT_NONE,     /* no CertificateRequest */
        GW_TLS_CLIENT_CERT_OPTIONAL, /* request one; the handshake succeeds with or without it,
                                      * whatever the verify result: the caller judges */
        _GW_TLS_CLIENT_CERT_MAX,
};

struct gw_tls_server_config {
        const char *cert_file;       /* PEM: server certificate first, then its chain */
        const char *key_file;        /* PEM private key; must not be accessible by "others" */
        const char *key_password;    /* optional */
        enum gw_tls_client_cert client_cert;
        const char *client_ca_file;  /* optional PEM bundle used to verify client certificates;
                                      * without it every client certificate is "not trusted"
                                      * in the verify flags (thumbprint authentication) */
};

/* Loads the certificate chain and key, checks that they belong together and that the key
 * file is not readable or writable by others, and builds the shared TLS configuration.
 * Returns 0 and a new server (one reference) in *ret, or -errno after logging the reason
 * (-ENOENT / -EACCES for files, -EPERM for a key file open to others, -EBADMSG for PEM that
 * does not parse, -EINVAL for a key that does not match the certificate). May block on file
 * reads (call at start-up or reload). */
int gw_tls_server_new(const struct gw_tls_server_config *cfg, struct gw_tls_server **ret);
/* Connections hold a reference, so a server swapped out on reload stays alive until its last
 * connection is gone. Both accept NULL; unref returns NULL. */
struct gw_tls_server *gw_tls_server_ref(struct gw_tls_server *s);
struct gw_tls_server *gw_tls_server_unref(struct gw_tls_server *s);

/* ---- listeners (listener.c) ----------------------------------------------------------- */

/* Why a connection ended; the value given to on_close (0 or -errno). */
#define GW_NET_CLOSED_BY_PEER       0             /* EOF or TLS close_notify from the peer */
/* -ETIMEDOUT  handshake or idle timeout        -ECONNRESET  reset by the peer
 * -EPROTO     TLS failure (handshake or record) -ENOBUFS     input or hard output cap exceeded
 * -ECANCELED  closed locally (gw_net_conn_close or listener freed)   other -errno: socket error */

struct gw_net_handler {
        /* Called once the connection is usable: right after accept for plain TCP, after the
         * handshake for TLS. A negative return closes the connection (reason = that value). */
        int (*on_open)(struct gw_net_conn *c);
        /* Bytes from the peer (decrypted). Returns how many were consumed (0..len); the rest
         * stays buffered and is offered again, followed by new bytes, next time. A negative
         * return closes the connection with that reason. If the buffer reaches
         * max_input_bytes with nothing consumed, the connection is closed (-ENOBUFS). */
        ssize_t (*on_data)(struct gw_net_conn *c, const uint8_t *data, size_t len);
        /* Optional: the output queue fell below half of max_output_bytes after having been
         * above it, or emptied (a good moment to produce more). */
        void (*on_drain)(struct gw_net_conn *c);
        /* Optional: reading from the peer was paused (true) or resumed (false). */
        void (*on_flow)(struct gw_net_conn *c, bool paused);
        /* Called exactly once for every accepted connection, with the reason above: also for
         * one that failed before on_open (a TLS handshake that failed or timed out; its
         * userdata is then still the listener's). Called from the loop, never from inside
         * gw_net_conn_close() or gw_net_conn_send(); the connection is freed when it returns.
         * Do not free the listener from inside any of these callbacks. */
        void (*on_close)(struct gw_net_conn *c, int reason);
};

struct gw_net_listener_config {
        const char *address;          /* "0.0.0.0:8883", "[::]:443", "127.0.0.1:0", "localhost:443":
                                       * an IP literal or "localhost" (= 127.0.0.1); port 0 = any */
        const char *config_path;      /* optional, for error messages, e.g. "mqtt.listen[0]" */
        struct gw_tls_server *tls;    /* NULL = plain TCP; borrowed (the listener takes a ref) */
        bool allow_plaintext;         /* plain TCP on a non-loopback address needs this */
        int backlog;                  /* 0 = 511 */
        unsigned max_connections;     /* 0 = 10000 */
        unsigned max_connections_per_address;   /* 0 = 100 */
        uint64_t handshake_timeout_usec;        /* 0 = 10 s (TLS handshake; plain: until on_open) */
        uint64_t idle_timeout_usec;             /* 0 = 5 min; no byte in either direction */
        size_t max_input_bytes;       /* 0 = 256 KiB, unconsumed input kept per connection */
        size_t max_output_bytes;      /* 0 = 1 MiB; reading pauses above, resumes below half */
        size_t hard_max_output_bytes; /* 0 = 4 * max_output_bytes; closed above (-ENOBUFS) */
};

/* Parses cfg->address, refuses plain TCP on a non-loopback address unless allow_plaintext,
 * binds (SO_REUSEADDR, IPV6_V6ONLY for IPv6), listens and starts accepting on e.
 * Returns 0 and the listener in *ret, or -errno after logging why: -EINVAL (address syntax),
 * -EPERM (plaintext refused), -EADDRINUSE / -EACCES / -EADDRNOTAVAIL (bind). userdata is
 * given to every connection as its initial userdata. */
int gw_net_listener_new(sd_event *e, const struct gw_net_listener_config *cfg,
                        const struct gw_net_handler *h, void *userdata,
                        struct gw_net_listener **ret);
/* Closes the socket and every connection (each gets on_close(-ECANCELED), synchronously).
 * Accepts NULL, returns NULL. */
struct gw_net_listener *gw_net_listener_free(struct gw_net_listener *l);
/* The bound port (useful with port 0). */
uint16_t gw_net_listener_get_port(const struct gw_net_listener *l);
/* Number of live connections. */
unsigned gw_net_listener_get_n_connections(const struct gw_net_listener *l);
/* Replaces the TLS server for new connections (reload); existing ones keep theirs.
 * Refused with -EINVAL when the listener is plain TCP. */
int gw_net_listener_set_tls(struct gw_net_listener *l, struct gw_tls_server *tls);

/* Parses "host:port" / "[v6]:port" into a sockaddr (IP literals and "localhost" only, so
 * no DNS lookup ever blocks the loop). Returns 0 or -EINVAL. */
struct sockaddr_storage;
int gw_net_parse_address(const char *s, struct sockaddr_storage *ret_sa, socklen_t *ret_len);
/* Whether the address is a loopback address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104). */
bool gw_net_sockaddr_is_loopback(const struct sockaddr_storage *sa);

/* ---- connections (conn.c) ------------------------------------------------------------- */

/* Copies len bytes into the output queue and writes what the socket takes. Returns 0, or
 * -ENOTCONN after close (or before a TLS handshake completed), -ENOBUFS when the queue would
 * pass hard_max_output_bytes (the connection is then closed with -ENOBUFS). */
int gw_net_conn_send(struct gw_net_conn *c, const void *data, size_t len);
/* graceful: stop reading, write what is queued, send TLS close_notify, shutdown(SHUT_WR) and
 * close (bounded by the idle timeout); otherwise close at once. on_close(-ECANCELED) follows
 * from the loop, never from inside this call. Idempotent. */
void gw_net_conn_close(struct gw_net_conn *c, bool graceful);

/* Stops (hold) or resumes reading from the peer on the front-end's behalf, e.g. when its
 * window of unacknowledged requests is full: what was received but not consumed stays
 * buffered and is offered again after the release. Independent of the output backpressure
 * (reading resumes only when neither holds it). May be called from inside on_data. */
void gw_net_conn_hold_input(struct gw_net_conn *c, bool hold);

void *gw_net_conn_get_userdata(const struct gw_net_conn *c);
void gw_net_conn_set_userdata(struct gw_net_conn *c, void *userdata);
struct gw_net_listener *gw_net_conn_get_listener(const struct gw_net_conn *c);
/* "192.0.2.1:50000" or "[2001:db8::1]:50000"; valid for the life of the connection. */
const char *gw_net_conn_get_peer(const struct gw_net_conn *c);
bool gw_net_conn_is_tls(const struct gw_net_conn *c);
bool gw_net_conn_is_open(const struct gw_net_conn *c);
bool gw_net_conn_is_paused(const struct gw_net_conn *c);
size_t gw_net_conn_get_output_bytes(const struct gw_net_conn *c);
/* The server name the client asked for with SNI, or NULL. */
const char *gw_net_conn_get_sni(const struct gw_net_conn *c);
/* The client's certificate (leaf, with the chain it sent linked by ->next), or NULL when none
 * was sent or none requested. Borrowed; valid for the life of the connection. */
const mbedtls_x509_crt *gw_net_conn_get_peer_cert(const struct gw_net_conn *c);
/* The DER of the client's leaf certificate; returns 0 or -ENOENT. Borrowed. */
int gw_net_conn_get_peer_cert_der(const struct gw_net_conn *c, const uint8_t **ret_der, size_t *ret_len);
/* mbedtls verify flags (MBEDTLS_X509_BADCERT_*) of the client certificate against
 * client_ca_file; 0 = chain trusted and valid now. (uint32_t)-1 when there is no certificate. */
uint32_t gw_net_conn_get_peer_cert_verify_flags(const struct gw_net_conn *c);
/* The negotiated cipher suite name ("TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"), or NULL. */
const char *gw_net_conn_get_ciphersuite(const struct gw_net_conn *c);

/* ---- certificate generation (cert.c) -------------------------------------------------- */

/* Makes sure state_dir holds a local CA (ca.crt, ca.key) and a server certificate signed by it
 * (server.crt, server.key) whose subject alternative names are exactly dns_names (the first is
 * the CN: hub.host_name, then the aliases) and ip_addrs (IP literals; unspecified addresses
 * 0.0.0.0 and :: are skipped), generating what is missing: the server certificate is made
 * again when the names changed, when it does not chain to the CA or match its key, or when it
 * expires within 30 days; the CA is made again only when missing, broken or expiring within
 * 30 days (then the server certificate too). EC P-256 keys, CA valid 10 years, server
 * certificate 825 days. Files are written atomically, keys with mode 0600; state_dir is
 * created 0700 when missing. Logs where the CA is. dns_names must hold at least one name.
 * Returns 0 and newly allocated paths (each ret_* may be NULL), or -errno after logging.
 * Blocks (key generation, fsync): call at start-up or reload. */
int gw_cert_ensure(const char *state_dir, const char *const *dns_names, const char *const *ip_addrs,
                   char **ret_cert_path, char **ret_key_path, char **ret_ca_path);
