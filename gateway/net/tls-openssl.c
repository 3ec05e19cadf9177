/* SPDX-License-Identifier: MIT */

/* The TLS server side of gateway/net on OpenSSL 3 (meson -Dtls_backend=openssl, the default).
 *
 * Why: at saturation mbedtls 2.28's AES-GCM record processing was three quarters of the
 * loop thread's instructions per MQTT message; OpenSSL's stitched AES-NI/PCLMUL GCM costs a
 * fraction of that. Everything else stays on mbedtls: the certificate files are parsed and
 * checked with mbedtls (tls.c) and handed to OpenSSL as DER, and the client's certificate is
 * handed to the device layer as an mbedtls_x509_crt parsed from the DER OpenSSL received, with
 * mbedtls verify flags computed against the client CA bundle as mbedtls' own handshake does.
 *
 * Policy, the same as tls-mbedtls.c (see there for the reasons):
 *  - TLS 1.2 only (min = max = 1.2: 1.0/1.1/1.3 get a protocol_version alert);
 *  - ECDHE with AES-GCM or ChaCha20-Poly1305, ECDSA or RSA server keys, server preference;
 *    groups x25519, P-256, P-384, server preference;
 *  - no session tickets, no session cache, no renegotiation;
 *  - an optional client certificate: SSL_VERIFY_PEER with a verify callback that accepts
 *    anything (OpenSSL still checks CertificateVerify, i.e. possession of the key); trust is
 *    judged by the device layer (auth-x509.c) with the certificate and the verify flags.
 *
 * I/O: a custom BIO with no buffer of its own: reads come from the read-ahead of tls.c (one
 * recv() per wakeup into a buffer shared by all connections), writes go straight to send().
 * SSL_MODE_RELEASE_BUFFERS frees OpenSSL's record buffers whenever they are empty, so an idle
 * connection holds only its SSL object and session. The loop is single-threaded, so the BIO
 * reports a socket error or EOF through two file-level variables read right after the call. */

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <mbedtls/error.h>
#include <mbedtls/oid.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/x509_crt.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

struct gw_tls_server {
        unsigned n_ref;
        SSL_CTX *ctx;
        struct gw_tls_material m; /* the client CA bundle is used for the verify flags */
        enum gw_tls_client_cert client_cert;
};

struct gw_tls_conn {
        SSL *ssl;
        mbedtls_x509_crt *peer; /* the client's certificate and chain, or NULL */
};

/* TLS 1.2 suites, in server preference order (the same as tls-mbedtls.c). */
static const char cipher_list[] =
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
        "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305";
static const char groups_list[] = "X25519:P-256:P-384";

/* Their names as mbedtls (and the logs and front-ends) spell them: IANA names with dashes. */
static const char *const suite_names[] = {
        "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256",
        "TLS-ECDHE-ECDSA-WITH-AES-256-GCM-SHA384",
        "TLS-ECDHE-ECDSA-WITH-CHACHA20-POLY1305-SHA256",
        "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256",
        "TLS-ECDHE-RSA-WITH-AES-256-GCM-SHA384",
        "TLS-ECDHE-RSA-WITH-CHACHA20-POLY1305-SHA256",
};

/* ---- the BIO ------------------------------------------------------------------------------ */

static BIO_METHOD *bio_method;
static int bio_errno;   /* errno of the last failed socket call of an SSL_* call, or 0 */
static bool bio_eof;    /* the last SSL_* call met the end of the stream */

static int bio_write(BIO *b, const char *buf, int len) {
        struct gw_net_conn *c = BIO_get_data(b);

        BIO_clear_retry_flags(b);
        for (;;) {
                ssize_t n = send(c->fd, buf, (size_t) len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n >= 0)
                        return (int) n;
                if (errno == EINTR)
                        continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                        BIO_set_retry_write(b);
                        return -1;
                }
                bio_errno = errno == EPIPE ? ECONNRESET : errno;
                return -1;
        }
}

static int bio_read(BIO *b, char *buf, int len) {
        struct gw_net_conn *c = BIO_get_data(b);

        BIO_clear_retry_flags(b);
        if (len <= 0)
                return 0;
        ssize_t n = gw_tls_ra_recv(c, buf, (size_t) len);
        if (n > 0)
                return (int) n;
        if (n == 0) {
                bio_eof = true;
                return 0;
        }
        if (n == -EAGAIN) {
                BIO_set_retry_read(b);
                return -1;
        }
        bio_errno = (int) -n;
        return -1;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
        switch (cmd) {
        case BIO_CTRL_FLUSH:
                return 1; /* nothing buffered here */
        default:
                return 0;
        }
}

static int bio_method_init(void) {
        if (bio_method)
                return 0;
        BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "fieldhub-conn");
        if (!m)
                return -ENOMEM;
        if (BIO_meth_set_write(m, bio_write) != 1 || BIO_meth_set_read(m, bio_read) != 1 ||
            BIO_meth_set_ctrl(m, bio_ctrl) != 1) {
                BIO_meth_free(m);
                return -ENOMEM;
        }
        bio_method = m; /* kept for the life of the process */
        return 0;
}

/* ---- connections -------------------------------------------------------------------------- */

static int verify_accept(int preverify_ok, X509_STORE_CTX *x) {
        return 1; /* any client certificate: the device layer judges it (above) */
}

int gw_tls_conn_setup(struct gw_net_conn *c) {
        struct gw_tls_conn *t = calloc(1, sizeof(*t));
        BIO *b;

        if (!t)
                return -ENOMEM;
        t->ssl = SSL_new(c->tls->ctx);
        b = BIO_new(bio_method);
        if (!t->ssl || !b) {
                BIO_free(b);
                SSL_free(t->ssl);
                free(t);
                ERR_clear_error();
                return -ENOMEM;
        }
        BIO_set_data(b, c);
        BIO_set_init(b, 1);
        SSL_set_bio(t->ssl, b, b); /* one reference, owned by the SSL */
        SSL_set_accept_state(t->ssl);
        c->ssl = t;
        return 0;
}

void gw_tls_conn_free(struct gw_net_conn *c) {
        struct gw_tls_conn *t = c->ssl;
        if (!t)
                return;
        SSL_free(t->ssl);
        if (t->peer) {
                mbedtls_x509_crt_free(t->peer);
                free(t->peer);
        }
        free(t);
        c->ssl = NULL;
}

static void op_begin(void) {
        ERR_clear_error(); /* SSL_get_error() looks at this thread's error queue */
        bio_errno = 0;
        bio_eof = false;
}

/* Maps a failed SSL_* call; logs a failure. */
static int map_result(struct gw_net_conn *c, int r, const char *what) {
        int e = SSL_get_error(c->ssl->ssl, r);
        char buf[256];

        switch (e) {
        case SSL_ERROR_WANT_READ:
                return GW_TLS_WANT_READ;
        case SSL_ERROR_WANT_WRITE:
                return GW_TLS_WANT_WRITE;
        case SSL_ERROR_ZERO_RETURN:
                return GW_TLS_EOF;
        }
        if (bio_errno == ECONNRESET) {
                ERR_clear_error();
                return GW_TLS_RESET;
        }
        if (bio_eof && (ERR_peek_error() == 0 ||
                        ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)) {
                /* end of stream without close_notify (in or before the handshake) */
                ERR_clear_error();
                return GW_TLS_EOF;
        }
        unsigned long err = ERR_get_error();
        if (err != 0)
                ERR_error_string_n(err, buf, sizeof(buf));
        else if (bio_errno != 0)
                snprintf(buf, sizeof(buf), "%s", strerror(bio_errno));
        else
                snprintf(buf, sizeof(buf), "SSL error %d", e);
        ERR_clear_error();
        gw_log_full(LOG_INFO, 0, NET_FIELDS, "%s: TLS %s failed: %s", c->peer, what, buf);
        return GW_TLS_FAILED;
}

/* The peer's certificate (and the chain it sent) as mbedtls certificates, and the flags
 * mbedtls' handshake would have computed: the chain against the client CA bundle (or none:
 * not trusted), the key usage and extended key usage of a client certificate, and the curve
 * of an EC key among the groups we accept. */
static int take_peer_cert(struct gw_net_conn *c) {
        struct gw_tls_conn *t = c->ssl;
        X509 *leaf = SSL_get0_peer_certificate(t->ssl);
        STACK_OF(X509) *chain;
        uint32_t flags = 0;
        int r;

        c->verify_flags = UINT32_MAX;
        if (!leaf)
                return 0;
        t->peer = malloc(sizeof(*t->peer));
        if (!t->peer)
                return -ENOMEM;
        mbedtls_x509_crt_init(t->peer);

        chain = SSL_get_peer_cert_chain(t->ssl); /* server side: without the leaf */
        for (int i = -1; i < (chain ? sk_X509_num(chain) : 0); i++) {
                X509 *x = i < 0 ? leaf : sk_X509_value(chain, i);
                unsigned char *der = NULL;
                int len = i2d_X509(x, &der);
                if (len <= 0)
                        return -ENOMEM;
                r = mbedtls_x509_crt_parse_der(t->peer, der, (size_t) len);
                OPENSSL_free(der);
                if (r != 0) {
                        char buf[128];
                        mbedtls_strerror(r, buf, sizeof(buf));
                        gw_log_full(LOG_INFO, 0, NET_FIELDS, "%s: TLS handshake failed: client certificate: %s",
                                    c->peer, buf);
                        return -EBADMSG;
                }
        }

        (void) mbedtls_x509_crt_verify(t->peer, c->tls->m.has_client_ca ? &c->tls->m.client_ca : NULL, NULL,
                                       NULL, &flags, NULL, NULL);
        if (mbedtls_x509_crt_check_key_usage(t->peer, MBEDTLS_X509_KU_DIGITAL_SIGNATURE) != 0)
                flags |= MBEDTLS_X509_BADCERT_KEY_USAGE;
        if (mbedtls_x509_crt_check_extended_key_usage(t->peer, MBEDTLS_OID_CLIENT_AUTH,
                                                      MBEDTLS_OID_SIZE(MBEDTLS_OID_CLIENT_AUTH)) != 0)
                flags |= MBEDTLS_X509_BADCERT_EXT_KEY_USAGE;
        if (mbedtls_pk_can_do(&t->peer->pk, MBEDTLS_PK_ECKEY)) {
                mbedtls_ecp_group_id g = mbedtls_pk_ec(t->peer->pk)->grp.id;
                if (g != MBEDTLS_ECP_DP_SECP256R1 && g != MBEDTLS_ECP_DP_SECP384R1 && g != MBEDTLS_ECP_DP_CURVE25519)
                        flags |= MBEDTLS_X509_BADCERT_BAD_KEY;
        }
        c->verify_flags = flags;
        return 0;
}

static void take_sni(struct gw_net_conn *c) {
        const char *name = SSL_get_servername(c->ssl->ssl, TLSEXT_NAMETYPE_host_name);
        size_t len = name ? strlen(name) : 0;

        if (len == 0 || len > 253 || c->sni)
                return;
        for (size_t i = 0; i < len; i++)
                if ((unsigned char) name[i] < 0x21 || (unsigned char) name[i] > 0x7e)
                        return; /* not a host name: ignore, it is only recorded */
        c->sni = strndup(name, len);
}

int gw_tls_conn_handshake(struct gw_net_conn *c) {
        op_begin();
        int r = SSL_do_handshake(c->ssl->ssl);
        if (r != 1)
                return map_result(c, r, "handshake");
        r = take_peer_cert(c);
        if (r == -ENOMEM)
                gw_log_full(LOG_ERR, ENOMEM, NET_FIELDS, "%s: TLS handshake failed: out of memory", c->peer);
        if (r < 0)
                return GW_TLS_FAILED;
        take_sni(c);
        return 0;
}

int gw_tls_conn_read(struct gw_net_conn *c, uint8_t *buf, size_t len) {
        op_begin();
        int r = SSL_read(c->ssl->ssl, buf, (int) MIN(len, (size_t) INT_MAX));
        if (r > 0)
                return r;
        return map_result(c, r, "read");
}

int gw_tls_conn_write(struct gw_net_conn *c, const uint8_t *buf, size_t len) {
        if (len == 0)
                return 0;
        op_begin();
        int r = SSL_write(c->ssl->ssl, buf, (int) MIN(len, (size_t) INT_MAX));
        if (r > 0)
                return r;
        return map_result(c, r, "write");
}

int gw_tls_conn_close_notify(struct gw_net_conn *c) {
        op_begin();
        int r = SSL_shutdown(c->ssl->ssl);
        if (r >= 0)
                return 0; /* sent (1: the peer's was received too) */
        switch (SSL_get_error(c->ssl->ssl, r)) {
        case SSL_ERROR_WANT_READ:
                return GW_TLS_WANT_READ;
        case SSL_ERROR_WANT_WRITE:
                return GW_TLS_WANT_WRITE;
        default:
                ERR_clear_error();
                return 0; /* an error here: nothing more to say anyway */
        }
}

const char *gw_tls_conn_get_version(const struct gw_net_conn *c) {
        return SSL_get_version(c->ssl->ssl);
}

const char *gw_tls_conn_get_ciphersuite(const struct gw_net_conn *c) {
        const SSL_CIPHER *ci = SSL_get_current_cipher(c->ssl->ssl);
        const char *std;

        if (!ci)
                return NULL;
        std = SSL_CIPHER_standard_name(ci);
        if (std)
                for (size_t i = 0; i < ELEMENTSOF(suite_names); i++) {
                        const char *a = std, *b = suite_names[i];
                        while (*a && (*a == *b || (*a == '_' && *b == '-'))) {
                                a++;
                                b++;
                        }
                        if (!*a && !*b)
                                return suite_names[i];
                }
        return SSL_CIPHER_get_name(ci);
}

const mbedtls_x509_crt *gw_tls_conn_get_peer_cert(const struct gw_net_conn *c) {
        return c->ssl->peer;
}

/* ---- the server --------------------------------------------------------------------------- */

struct gw_tls_server *gw_tls_server_ref(struct gw_tls_server *s) {
        if (s)
                s->n_ref++;
        return s;
}

struct gw_tls_server *gw_tls_server_unref(struct gw_tls_server *s) {
        if (!s || --s->n_ref > 0)
                return NULL;
        SSL_CTX_free(s->ctx);
        gw_tls_material_free(&s->m);
        free(s);
        return NULL;
}

DEFINE_CLEANUP_FUNC(struct gw_tls_server *, gw_tls_server_unref)

static int openssl_error(const char *what) {
        char buf[256] = "unknown error";
        unsigned long e = ERR_get_error();
        if (e != 0)
                ERR_error_string_n(e, buf, sizeof(buf));
        ERR_clear_error();
        return gw_log_full(LOG_ERR, EIO, NET_FIELDS, "TLS (OpenSSL): cannot %s: %s", what, buf);
}

static X509 *crt_to_x509(const mbedtls_x509_crt *crt) {
        const unsigned char *p = crt->raw.p;
        return d2i_X509(NULL, &p, (long) crt->raw.len);
}

/* Hands the mbedtls-parsed chain, key and client CA names to the SSL_CTX. */
static int ctx_load(struct gw_tls_server *s, const struct gw_tls_material *m) {
        unsigned char *buf;
        const unsigned char *p;
        EVP_PKEY *pkey;
        int len;
        const size_t size = 16384;

        for (const mbedtls_x509_crt *crt = &m->chain; crt && crt->raw.p; crt = crt->next) {
                X509 *x = crt_to_x509(crt);
                if (!x)
                        return openssl_error("read the server certificate");
                if (crt == &m->chain) {
                        int ok = SSL_CTX_use_certificate(s->ctx, x);
                        X509_free(x);
                        if (ok != 1)
                                return openssl_error("use the server certificate");
                } else if (SSL_CTX_add0_chain_cert(s->ctx, x) != 1) {
                        X509_free(x);
                        return openssl_error("add a chain certificate");
                }
        }

        buf = malloc(size);
        if (!buf)
                return -ENOMEM;
        len = mbedtls_pk_write_key_der((mbedtls_pk_context *) &m->key, buf, size); /* at the end of buf */
        if (len <= 0) {
                free(buf);
                return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS, "TLS: cannot convert the server key (-0x%04x)",
                                   (unsigned) -len);
        }
        p = buf + size - (size_t) len;
        pkey = d2i_AutoPrivateKey(NULL, &p, len);
        mbedtls_platform_zeroize(buf, size);
        free(buf);
        if (!pkey)
                return openssl_error("read the server key");
        len = SSL_CTX_use_PrivateKey(s->ctx, pkey);
        EVP_PKEY_free(pkey);
        if (len != 1 || SSL_CTX_check_private_key(s->ctx) != 1)
                return openssl_error("use the server key");

        if (s->client_cert == GW_TLS_CLIENT_CERT_OPTIONAL && m->has_client_ca) {
                /* The CertificateRequest names the CAs of the bundle, as mbedtls does. */
                STACK_OF(X509_NAME) *names = sk_X509_NAME_new_null();
                if (!names)
                        return -ENOMEM;
                for (const mbedtls_x509_crt *crt = &m->client_ca; crt && crt->raw.p; crt = crt->next) {
                        X509 *x = crt_to_x509(crt);
                        X509_NAME *n = x ? X509_NAME_dup(X509_get_subject_name(x)) : NULL;
                        X509_free(x);
                        if (!n || !sk_X509_NAME_push(names, n)) {
                                X509_NAME_free(n);
                                sk_X509_NAME_pop_free(names, X509_NAME_free);
                                return openssl_error("read the client CA bundle");
                        }
                }
                SSL_CTX_set_client_CA_list(s->ctx, names);
        }
        return 0;
}

int gw_tls_server_new(const struct gw_tls_server_config *cfg, struct gw_tls_server **ret) {
        _cleanup_(gw_tls_server_unrefp) struct gw_tls_server *s = NULL;
        int r;

        if (!cfg || !cfg->cert_file || !cfg->key_file || !ret || cfg->client_cert >= _GW_TLS_CLIENT_CERT_MAX)
                return -EINVAL;

        r = bio_method_init();
        if (r < 0)
                return r;
        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->n_ref = 1;
        s->client_cert = cfg->client_cert;

        r = gw_tls_material_load(cfg, &s->m);
        if (r < 0)
                return r;

        s->ctx = SSL_CTX_new(TLS_server_method());
        if (!s->ctx)
                return openssl_error("create the TLS context");
        if (SSL_CTX_set_min_proto_version(s->ctx, TLS1_2_VERSION) != 1 ||
            SSL_CTX_set_max_proto_version(s->ctx, TLS1_2_VERSION) != 1 ||
            SSL_CTX_set_cipher_list(s->ctx, cipher_list) != 1 ||
            SSL_CTX_set1_groups_list(s->ctx, groups_list) != 1)
                return openssl_error("set the TLS policy");
        SSL_CTX_set_options(s->ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET | SSL_OP_NO_COMPRESSION |
                                    SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_IGNORE_UNEXPECTED_EOF);
        SSL_CTX_set_session_cache_mode(s->ctx, SSL_SESS_CACHE_OFF);
        (void) SSL_CTX_set_num_tickets(s->ctx, 0);
        SSL_CTX_set_mode(s->ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        SSL_CTX_clear_mode(s->ctx, SSL_MODE_AUTO_RETRY);
        SSL_CTX_set_read_ahead(s->ctx, 0); /* tls.c reads ahead, into a shared buffer */
        if (s->client_cert == GW_TLS_CLIENT_CERT_OPTIONAL)
                SSL_CTX_set_verify(s->ctx, SSL_VERIFY_PEER, verify_accept);
        else
                SSL_CTX_set_verify(s->ctx, SSL_VERIFY_NONE, NULL);

        r = ctx_load(s, &s->m);
        if (r < 0)
                return r;

        *ret = TAKE_PTR(s);
        return 0;
}
