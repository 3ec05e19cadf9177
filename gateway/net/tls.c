/* SPDX-License-Identifier: MIT */

/* The TLS server side of gateway/net, on mbedtls 2.28.
 *
 * One mbedtls_ssl_config per gw_tls_server, shared (read-only) by all its connections.
 * Choices:
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
#include <sys/random.h>
#include <sys/stat.h>

#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

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

const char *gw_tls_strerror(int err, char *buf, size_t size) {
        mbedtls_strerror(err, buf, size);
        return buf;
}

static int entropy_getrandom(void *p, unsigned char *out, size_t len) {
        while (len > 0) {
                ssize_t n = getrandom(out, len, 0);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return MBEDTLS_ERR_CTR_DRBG_ENTROPY_SOURCE_FAILED;
                }
                out += n;
                len -= (size_t) n;
        }
        return 0;
}

int gw_net_drbg_seed(mbedtls_ctr_drbg_context *drbg, const char *pers) {
        return mbedtls_ctr_drbg_seed(drbg, entropy_getrandom, NULL, (const unsigned char *) pers, strlen(pers));
}

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

/* Read-ahead. mbedtls 2.28 reads a record as two exact reads (5 header bytes, then the
 * body) and then a third that says EAGAIN: three recv() calls per record. Instead, one
 * recv() takes what the socket has into a buffer shared by all connections (the loop is
 * single-threaded and reads one connection at a time), and mbedtls is served from there.
 * Bytes still unread when another connection needs the buffer move to a buffer of their
 * owner's (rare: a record split across TCP segments, or reading stopped by a budget, a
 * pause or a close), so an idle connection holds nothing. */
#define RA_SIZE (32u * 1024u)
static uint8_t ra_shared[RA_SIZE];
static struct gw_net_conn *ra_owner; /* whose unread bytes are in ra_shared, or NULL */

static size_t ra_avail(const struct gw_net_conn *c) {
        return c->ra_len - c->ra_off;
}

static void ra_reset(struct gw_net_conn *c) {
        if (ra_owner == c)
                ra_owner = NULL;
        free(c->ra_own);
        c->ra = c->ra_own = NULL;
        c->ra_off = c->ra_len = 0;
}

/* Moves the owner's unread bytes out of the shared buffer. */
static int ra_evict(void) {
        struct gw_net_conn *o = ra_owner;
        size_t n = ra_avail(o);
        uint8_t *b = malloc(n);
        if (!b)
                return -ENOMEM;
        memcpy(b, o->ra + o->ra_off, n);
        o->ra = o->ra_own = b;
        o->ra_off = 0;
        o->ra_len = n;
        ra_owner = NULL;
        return 0;
}

void gw_tls_conn_forget(struct gw_net_conn *c) {
        ra_reset(c);
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len) {
        struct gw_net_conn *c = ctx;
        size_t n;

        if (ra_avail(c) == 0) {
                ra_reset(c);
                if (c->ra_drained) {
                        c->ra_drained = false;
                        return MBEDTLS_ERR_SSL_WANT_READ;
                }
                if (ra_owner && ra_evict() < 0)
                        return MBEDTLS_ERR_SSL_ALLOC_FAILED;
                for (;;) {
                        ssize_t k = recv(c->fd, ra_shared, sizeof ra_shared, MSG_DONTWAIT);
                        if (k > 0) {
                                c->ra = ra_shared;
                                c->ra_len = (size_t) k;
                                ra_owner = c;
                                c->ra_drained = (size_t) k < sizeof ra_shared;
                                break;
                        }
                        if (k == 0)
                                return 0; /* EOF: mbedtls turns it into MBEDTLS_ERR_SSL_CONN_EOF */
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK)
                                return MBEDTLS_ERR_SSL_WANT_READ;
                        if (errno == ECONNRESET || errno == EPIPE)
                                return MBEDTLS_ERR_NET_CONN_RESET;
                        return MBEDTLS_ERR_NET_RECV_FAILED;
                }
        }
        n = MIN(len, ra_avail(c));
        memcpy(buf, c->ra + c->ra_off, n);
        c->ra_off += n;
        if (ra_avail(c) == 0)
                ra_reset(c);
        return (int) n;
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
        mbedtls_ssl_context *ssl = malloc(sizeof(*ssl));
        if (!ssl)
                return -ENOMEM;
        mbedtls_ssl_init(ssl);
        int r = mbedtls_ssl_setup(ssl, &c->tls->conf);
        if (r != 0) {
                mbedtls_ssl_free(ssl);
                free(ssl);
                return r == MBEDTLS_ERR_SSL_ALLOC_FAILED ? -ENOMEM : -EIO;
        }
        mbedtls_ssl_set_bio(ssl, c, bio_send, bio_recv, NULL);
        c->ssl = ssl;
        return 0;
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
        mbedtls_x509_crt_free(&s->chain);
        mbedtls_x509_crt_free(&s->client_ca);
        mbedtls_pk_free(&s->key);
        free(s);
        return NULL;
}

DEFINE_CLEANUP_FUNC(struct gw_tls_server *, gw_tls_server_unref)

static int mbedtls_file_error(const char *what, const char *path, int r) {
        char buf[128];
        int e = EBADMSG;
        if (r == MBEDTLS_ERR_PK_FILE_IO_ERROR || r == MBEDTLS_ERR_X509_FILE_IO_ERROR)
                e = EIO;
        if (r == MBEDTLS_ERR_PK_PASSWORD_REQUIRED || r == MBEDTLS_ERR_PK_PASSWORD_MISMATCH)
                e = EACCES;
        return gw_log_full(LOG_ERR, e, NET_FIELDS, "cannot load %s %s: %s", what, path,
                           gw_tls_strerror(r, buf, sizeof(buf)));
}

int gw_tls_server_new(const struct gw_tls_server_config *cfg, struct gw_tls_server **ret) {
        _cleanup_(gw_tls_server_unrefp) struct gw_tls_server *s = NULL;
        struct stat st;
        int r;

        if (!cfg || !cfg->cert_file || !cfg->key_file || !ret || cfg->client_cert >= _GW_TLS_CLIENT_CERT_MAX)
                return -EINVAL;

        /* Readable files first, so the error names the real problem. */
        if (stat(cfg->cert_file, &st) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "TLS certificate %s: %m", cfg->cert_file);
        if (stat(cfg->key_file, &st) < 0)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "TLS key %s: %m", cfg->key_file);
        if (st.st_mode & (S_IROTH | S_IWOTH))
                return gw_log_full(LOG_ERR, EPERM, NET_FIELDS,
                                   "TLS key %s is accessible by other users (mode %04o): "
                                   "refusing to use it; run chmod o-rwx on it",
                                   cfg->key_file, (unsigned) (st.st_mode & 07777));

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->n_ref = 1;
        s->client_cert = cfg->client_cert;
        mbedtls_ssl_config_init(&s->conf);
        mbedtls_ctr_drbg_init(&s->drbg);
        mbedtls_x509_crt_init(&s->chain);
        mbedtls_x509_crt_init(&s->client_ca);
        mbedtls_pk_init(&s->key);

        r = gw_net_drbg_seed(&s->drbg, "fieldhub-tls-server");
        if (r != 0)
                return gw_log_full(LOG_ERR, EIO, NET_FIELDS, "cannot seed the TLS random generator (-0x%04x)",
                                   (unsigned) -r);

        r = mbedtls_x509_crt_parse_file(&s->chain, cfg->cert_file);
        if (r != 0)
                return mbedtls_file_error("TLS certificate", cfg->cert_file, r);
        r = mbedtls_pk_parse_keyfile(&s->key, cfg->key_file, cfg->key_password);
        if (r != 0)
                return mbedtls_file_error("TLS key", cfg->key_file, r);
        r = mbedtls_pk_check_pair(&s->chain.pk, &s->key);
        if (r != 0)
                return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS, "TLS key %s does not belong to certificate %s",
                                   cfg->key_file, cfg->cert_file);
        if (mbedtls_x509_time_is_past(&s->chain.valid_to))
                gw_log_full(LOG_WARNING, 0, NET_FIELDS, "TLS certificate %s has expired; clients will refuse it",
                            cfg->cert_file);

        if (cfg->client_ca_file) {
                r = mbedtls_x509_crt_parse_file(&s->client_ca, cfg->client_ca_file);
                if (r != 0)
                        return mbedtls_file_error("client CA bundle", cfg->client_ca_file, r);
                s->has_client_ca = true;
        }

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
        r = mbedtls_ssl_conf_own_cert(&s->conf, &s->chain, &s->key);
        if (r != 0)
                return -ENOMEM;
        if (s->client_cert == GW_TLS_CLIENT_CERT_OPTIONAL) {
                mbedtls_ssl_conf_authmode(&s->conf, MBEDTLS_SSL_VERIFY_OPTIONAL);
                if (s->has_client_ca)
                        mbedtls_ssl_conf_ca_chain(&s->conf, &s->client_ca, NULL);
        } else
                mbedtls_ssl_conf_authmode(&s->conf, MBEDTLS_SSL_VERIFY_NONE);

        *ret = TAKE_PTR(s);
        return 0;
}
