/* SPDX-License-Identifier: MIT */

/* The backend-neutral part of the TLS server side of gateway/net.
 *
 * Two backends implement the handshake and the records, chosen at build time with the meson
 * option tls_backend: tls-openssl.c (OpenSSL 3, the default: its stitched AES-GCM costs a
 * tenth of mbedtls 2.28's per record) and tls-mbedtls.c (mbedtls 2.28). Both apply the same
 * policy (TLS 1.2 only, ECDHE with AES-GCM or ChaCha20-Poly1305, no resumption, no
 * renegotiation, an optional client certificate judged by the device layer) and accept the
 * same files: certificates and keys are always parsed here with mbedtls, which also keeps
 * everything else (the X.509 rules of the device layer, the client CA bundle, cert.c).
 *
 * Shared here: the DRBG seeding of cert.c, the loading of the certificate material, and the
 * read-ahead through which both backends read the socket. */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <mbedtls/error.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

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

/* Read-ahead. A TLS library reads a record as two exact reads (5 header bytes, then the
 * body) and then a third that says EAGAIN: three recv() calls per record. Instead, one
 * recv() takes what the socket has into a buffer shared by all connections (the loop is
 * single-threaded and reads one connection at a time), and the library is served from there.
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

ssize_t gw_tls_ra_recv(struct gw_net_conn *c, void *buf, size_t len) {
        size_t n;

        if (ra_avail(c) == 0) {
                ra_reset(c);
                if (c->ra_drained) {
                        c->ra_drained = false;
                        return -EAGAIN;
                }
                if (ra_owner && ra_evict() < 0)
                        return -ENOMEM;
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
                                return 0;
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK)
                                return -EAGAIN;
                        if (errno == EPIPE)
                                return -ECONNRESET;
                        return -errno;
                }
        }
        n = MIN(len, ra_avail(c));
        memcpy(buf, c->ra + c->ra_off, n);
        c->ra_off += n;
        if (ra_avail(c) == 0)
                ra_reset(c);
        return (ssize_t) n;
}

static int file_error(const char *what, const char *path, int r) {
        char buf[128];
        int e = EBADMSG;
        if (r == MBEDTLS_ERR_PK_FILE_IO_ERROR || r == MBEDTLS_ERR_X509_FILE_IO_ERROR)
                e = EIO;
        if (r == MBEDTLS_ERR_PK_PASSWORD_REQUIRED || r == MBEDTLS_ERR_PK_PASSWORD_MISMATCH)
                e = EACCES;
        mbedtls_strerror(r, buf, sizeof(buf));
        return gw_log_full(LOG_ERR, e, NET_FIELDS, "cannot load %s %s: %s", what, path, buf);
}

void gw_tls_material_free(struct gw_tls_material *m) {
        mbedtls_x509_crt_free(&m->chain);
        mbedtls_x509_crt_free(&m->client_ca);
        mbedtls_pk_free(&m->key);
        m->has_client_ca = false;
}

int gw_tls_material_load(const struct gw_tls_server_config *cfg, struct gw_tls_material *m) {
        struct stat st;
        int r;

        mbedtls_x509_crt_init(&m->chain);
        mbedtls_x509_crt_init(&m->client_ca);
        mbedtls_pk_init(&m->key);
        m->has_client_ca = false;

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

        r = mbedtls_x509_crt_parse_file(&m->chain, cfg->cert_file);
        if (r != 0)
                return file_error("TLS certificate", cfg->cert_file, r);
        r = mbedtls_pk_parse_keyfile(&m->key, cfg->key_file, cfg->key_password);
        if (r != 0)
                return file_error("TLS key", cfg->key_file, r);
        r = mbedtls_pk_check_pair(&m->chain.pk, &m->key);
        if (r != 0)
                return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS, "TLS key %s does not belong to certificate %s",
                                   cfg->key_file, cfg->cert_file);
        if (mbedtls_x509_time_is_past(&m->chain.valid_to))
                gw_log_full(LOG_WARNING, 0, NET_FIELDS, "TLS certificate %s has expired; clients will refuse it",
                            cfg->cert_file);

        if (cfg->client_ca_file) {
                r = mbedtls_x509_crt_parse_file(&m->client_ca, cfg->client_ca_file);
                if (r != 0)
                        return file_error("client CA bundle", cfg->client_ca_file, r);
                m->has_client_ca = true;
        }
        return 0;
}
