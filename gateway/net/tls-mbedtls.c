/* SPDX-License-Identifier: MIT */

/* The TLS server side of gateway/net on mbedtls 2.28 (meson -Dtls_backend=mbedtls).
 *
 * One mbedtls_ssl_config per gw_tls_server, shared (read-only) by all its connections.
 * Choices (the same in tls-openssl.c):
 *  - TLS 1.2 only (Debian's mbedtls 2.28 has no 1.3; 1.0 and 1.1 are refused with a
 *    protocol_version alert).
 *  - AEAD suites with ephemeral ECDH only: AES-GCM and ChaCha20-Poly1305 with ECDSA or RSA
 *    server keys (the key type picks the half that applies). ECDHE groups x25519, P-256, P-384.
 *  - No session tickets and no session cache. Tickets would need a ticket key that rotates
 *    and is kept secret for as long as a ticket lives (it protects the session secrets: forward
 *    secrecy ends at the key's lifetime), and a resumed session skips the client-certificate
 *    exchange, so device authentication would rest on a ticket instead of a fresh proof of
 *    possession. Devices reconnect seldom, and a full ECDHE-P-256 handshake costs ~1 ms of CPU.
 *  - Renegotiation disabled (mbedtls' default; it is an old source of bugs and DoS).
 *  - Client certificates (optional request): MBEDTLS_SSL_VERIFY_OPTIONAL, with the CA bundle
 *    of the config if any. The handshake still proves possession of the key (CertificateVerify);
 *    trust is left to the device layer, which gets the certificate and the verify flags.
 *  - The DRBG is CTR-DRBG seeded from getrandom(2).
 *  - SNI: the name the client asked for is recorded on the connection (same certificate). */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/ssl.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

struct gw_tls_server {
        unsigned n_ref;
        mbedtls_ssl_config conf;
        mbedtls_ctr_drbg_context drbg;
        struct gw_tls_material m;
        enum gw_tls_client_cert client_cert;
};

struct gw_tls_conn {
        mbedtls_ssl_context ssl;
};

static const int ciphersuites[] = {
        MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        0,
};

static const mbedtls_ecp_group_id curves[] = {
        MBEDTLS_ECP_DP_CURVE25519,
        MBEDTLS_ECP_DP_SECP256R1,
        MBEDTLS_ECP_DP_SECP384R1,
        MBEDTLS_ECP_DP_NONE,
};

static int bio_send(void *ctx, const unsigned char *buf, size_t len) {
        struct gw_net_conn *c = ctx;
        for (;;) {
                ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n >= 0)
                        return (int) n;
                if (errno == EINTR)
                        continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                        return MBEDTLS_ERR_SSL_WANT_WRITE;
                if (errno == EPIPE || errno == ECONNRESET)
                        return MBEDTLS_ERR_NET_CONN_RESET;
                return MBEDTLS_ERR_NET_SEND_FAILED;
        }
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len) {
        ssize_t n = gw_tls_ra_recv(ctx, buf, len);
        if (n >= 0)
                return (int) n; /* 0: EOF, mbedtls turns it into MBEDTLS_ERR_SSL_CONN_EOF */
        switch (n) {
        case -EAGAIN:
                return MBEDTLS_ERR_SSL_WANT_READ;
        case -ENOMEM:
                return MBEDTLS_ERR_SSL_ALLOC_FAILED;
        case -ECONNRESET:
                return MBEDTLS_ERR_NET_CONN_RESET;
        default:
                return MBEDTLS_ERR_NET_RECV_FAILED;
        }
}

static int on_sni(void *p, mbedtls_ssl_context *ssl, const unsigned char *name, size_t len) {
        /* In mbedtls 2.28 the bio pointer is a plain field: it is our connection. */
        struct gw_net_conn *c = ssl->p_bio;
        if (!c || len == 0 || len > 253 || c->sni)
                return 0;
        for (size_t i = 0; i < len; i++)
                if (name[i] < 0x21 || name[i] > 0x7e)
                        return 0; /* not a host name: ignore, it is only recorded */
        c->sni = strndup((const char *) name, len);
        return 0;
}

int gw_tls_conn_setup(struct gw_net_conn *c) {
        struct gw_tls_conn *t = malloc(sizeof(*t));
        if (!t)
                return -ENOMEM;
        mbedtls_ssl_init(&t->ssl);
        int r = mbedtls_ssl_setup(&t->ssl, &c->tls->conf);
        if (r != 0) {
                mbedtls_ssl_free(&t->ssl);
                free(t);
                return r == MBEDTLS_ERR_SSL_ALLOC_FAILED ? -ENOMEM : -EIO;
        }
        mbedtls_ssl_set_bio(&t->ssl, c, bio_send, bio_recv, NULL);
        c->ssl = t;
        return 0;
}

void gw_tls_conn_free(struct gw_net_conn *c) {
        if (!c->ssl)
                return;
        mbedtls_ssl_free(&c->ssl->ssl);
        free(c->ssl);
        c->ssl = NULL;
}

/* Maps an mbedtls result; logs a failure. */
static int map_result(struct gw_net_conn *c, int r, const char *what) {
        char buf[128];

        switch (r) {
        case MBEDTLS_ERR_SSL_WANT_READ:
                return GW_TLS_WANT_READ;
        case MBEDTLS_ERR_SSL_WANT_WRITE:
                return GW_TLS_WANT_WRITE;
        case MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY:
        case MBEDTLS_ERR_SSL_CONN_EOF:
                return GW_TLS_EOF;
        case MBEDTLS_ERR_NET_CONN_RESET:
                return GW_TLS_RESET;
        }
        mbedtls_strerror(r, buf, sizeof(buf));
        gw_log_full(LOG_INFO, 0, NET_FIELDS, "%s: TLS %s failed: %s (-0x%04x)", c->peer, what, buf,
                    (unsigned) -r);
        return GW_TLS_FAILED;
}

int gw_tls_conn_handshake(struct gw_net_conn *c) {
        mbedtls_ssl_context *ssl = &c->ssl->ssl;
        int r = mbedtls_ssl_handshake(ssl);
        if (r < 0)
                return map_result(c, r, "handshake");
        c->verify_flags = mbedtls_ssl_get_peer_cert(ssl) ? mbedtls_ssl_get_verify_result(ssl) : UINT32_MAX;
        return 0;
}

int gw_tls_conn_read(struct gw_net_conn *c, uint8_t *buf, size_t len) {
        int r = mbedtls_ssl_read(&c->ssl->ssl, buf, len);
        if (r > 0)
                return r;
        if (r == 0)
                return GW_TLS_EOF;
        return map_result(c, r, "read");
}

int gw_tls_conn_write(struct gw_net_conn *c, const uint8_t *buf, size_t len) {
        /* mbedtls 2.28 keeps the encrypted record in its own buffer after WANT_WRITE and only
         * checks the length it is given again. */
        int r = mbedtls_ssl_write(&c->ssl->ssl, buf, len);
        if (r >= 0)
                return r;
        return map_result(c, r, "write");
}

int gw_tls_conn_close_notify(struct gw_net_conn *c) {
        int r = mbedtls_ssl_close_notify(&c->ssl->ssl);
        if (r == MBEDTLS_ERR_SSL_WANT_READ)
                return GW_TLS_WANT_READ;
        if (r == MBEDTLS_ERR_SSL_WANT_WRITE)
                return GW_TLS_WANT_WRITE;
        return 0; /* an error here: nothing more to say anyway */
}

const char *gw_tls_conn_get_version(const struct gw_net_conn *c) {
        return mbedtls_ssl_get_version(&c->ssl->ssl);
}

const char *gw_tls_conn_get_ciphersuite(const struct gw_net_conn *c) {
        return mbedtls_ssl_get_ciphersuite(&c->ssl->ssl);
}

const mbedtls_x509_crt *gw_tls_conn_get_peer_cert(const struct gw_net_conn *c) {
        return mbedtls_ssl_get_peer_cert(&c->ssl->ssl);
}

struct gw_tls_server *gw_tls_server_ref(struct gw_tls_server *s) {
        if (s)
                s->n_ref++;
        return s;
}

struct gw_tls_server *gw_tls_server_unref(struct gw_tls_server *s) {
        if (!s || --s->n_ref > 0)
                return NULL;
        mbedtls_ssl_config_free(&s->conf);
        mbedtls_ctr_drbg_free(&s->drbg);
        gw_tls_material_free(&s->m);
        free(s);
        return NULL;
}

DEFINE_CLEANUP_FUNC(struct gw_tls_server *, gw_tls_server_unref)

int gw_tls_server_new(const struct gw_tls_server_config *cfg, struct gw_tls_server **ret) {
        _cleanup_(gw_tls_server_unrefp) struct gw_tls_server *s = NULL;
        int r;

        if (!cfg || !cfg->cert_file || !cfg->key_file || !ret || cfg->client_cert >= _GW_TLS_CLIENT_CERT_MAX)
                return -EINVAL;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->n_ref = 1;
        s->client_cert = cfg->client_cert;
        mbedtls_ssl_config_init(&s->conf);
        mbedtls_ctr_drbg_init(&s->drbg);

        r = gw_tls_material_load(cfg, &s->m);
        if (r < 0)
                return r;

        r = gw_net_drbg_seed(&s->drbg, "fieldhub-tls-server");
        if (r != 0)
                return gw_log_full(LOG_ERR, EIO, NET_FIELDS, "cannot seed the TLS random generator (-0x%04x)",
                                   (unsigned) -r);

        r = mbedtls_ssl_config_defaults(&s->conf, MBEDTLS_SSL_IS_SERVER, MBEDTLS_SSL_TRANSPORT_STREAM,
                                        MBEDTLS_SSL_PRESET_DEFAULT);
        if (r != 0)
                return -EIO;
        mbedtls_ssl_conf_rng(&s->conf, mbedtls_ctr_drbg_random, &s->drbg);
        mbedtls_ssl_conf_min_version(&s->conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
        mbedtls_ssl_conf_max_version(&s->conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
        mbedtls_ssl_conf_ciphersuites(&s->conf, ciphersuites);
        mbedtls_ssl_conf_curves(&s->conf, curves);
        mbedtls_ssl_conf_renegotiation(&s->conf, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
        /* no mbedtls_ssl_conf_session_tickets_cb / conf_session_cache: no resumption (above) */
        mbedtls_ssl_conf_sni(&s->conf, on_sni, s);
        r = mbedtls_ssl_conf_own_cert(&s->conf, &s->m.chain, &s->m.key);
        if (r != 0)
                return -ENOMEM;
        if (s->client_cert == GW_TLS_CLIENT_CERT_OPTIONAL) {
                mbedtls_ssl_conf_authmode(&s->conf, MBEDTLS_SSL_VERIFY_OPTIONAL);
                if (s->m.has_client_ca)
                        mbedtls_ssl_conf_ca_chain(&s->conf, &s->m.client_ca, NULL);
        } else
                mbedtls_ssl_conf_authmode(&s->conf, MBEDTLS_SSL_VERIFY_NONE);

        *ret = TAKE_PTR(s);
        return 0;
}
