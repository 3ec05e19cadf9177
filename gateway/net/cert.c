/* SPDX-License-Identifier: MIT */

/* Generated TLS material for a box that has no certificate configured.
 *
 * The state directory gets a local CA (ca.crt / ca.key) and a server certificate signed by
 * it (server.crt / server.key). Operators make their clients trust ca.crt once; the server
 * certificate can then be re-made (new names, close to expiry) without touching the clients.
 *
 * mbedtls 2.28 has no writer for subjectAltName or extendedKeyUsage, so both extensions are
 * built here with the ASN.1 writer (which writes backwards, from the end of a buffer) and
 * added with mbedtls_x509write_crt_set_extension(). The same builder makes the expected
 * subjectAltName when an existing certificate is checked, so "the names changed" is a byte
 * comparison with the extension inside the certificate.
 *
 * Validity: CA 10 years; server 825 days (the longest that Apple platforms accept for a
 * server certificate, also under a locally trusted root). Keys: EC P-256. */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <mbedtls/asn1write.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/ecp.h>
#include <mbedtls/error.h>
#include <mbedtls/oid.h>
#include <mbedtls/pk.h>
#include <mbedtls/x509_crt.h>

#include "log.h"
#include "net/net-internal.h"

#define NET_FIELDS GW_FIELDS(.component = "net")

#define CA_DAYS (3650)
#define SERVER_DAYS (825)
#define RENEW_DAYS (30)
#define PEM_MAX 8192
#define SAN_MAX 4096

struct certgen {
        mbedtls_ctr_drbg_context drbg;
};

static char *path_join(const char *dir, const char *name) {
        char *p;
        if (asprintf(&p, "%s/%s", dir, name) < 0)
                return NULL;
        return p;
}

/* temp file, fsync, rename, fsync dir */
static int write_file_atomic(const char *dir, const char *name, const void *data, size_t len, mode_t mode) {
        _cleanup_free_ char *tmp = NULL, *final = NULL;
        _cleanup_close_ int fd = -EBADF, dfd = -EBADF;

        if (asprintf(&tmp, "%s/.%s.tmp%ld", dir, name, (long) getpid()) < 0)
                return -ENOMEM;
        final = path_join(dir, name);
        if (!final)
                return -ENOMEM;
        (void) unlink(tmp);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, mode) < 0)
                goto fail;
        const uint8_t *p = data;
        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        goto fail;
                }
                p += n;
                len -= (size_t) n;
        }
        if (fsync(fd) < 0)
                goto fail;
        if (rename(tmp, final) < 0)
                goto fail;
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) < 0)
                return -errno;
        return 0;
fail:;
        int e = -errno;
        (void) unlink(tmp);
        return e;
}

static bool dns_name_valid(const char *s) {
        size_t n = strlen(s);
        if (n == 0 || n > 253)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '-' || *p == '.' || *p == '*' || *p == '_'))
                        return false;
        return true;
}

/* Writes one element backwards: tag, length, bytes. */
static int asn1_write_tagged(unsigned char **p, unsigned char *start, unsigned char tag,
                             const void *data, size_t len) {
        int r, n = 0;
        if ((r = mbedtls_asn1_write_raw_buffer(p, start, data, len)) < 0)
                return r;
        n += r;
        if ((r = mbedtls_asn1_write_len(p, start, (size_t) n)) < 0)
                return r;
        n += r;
        if ((r = mbedtls_asn1_write_tag(p, start, tag)) < 0)
                return r;
        return n + r;
}

/* SubjectAltName ::= SEQUENCE OF GeneralName; dNSName [2] IA5String, iPAddress [7] OCTET
 * STRING (both implicit). Returns the length; the DER ends at buf + size. */
static int build_san(const char *const *dns, const char *const *ips, unsigned char *buf, size_t size,
                     const unsigned char **ret_start) {
        unsigned char *p = buf + size;
        size_t n_dns = 0, n_ip = 0;
        int r, total = 0;

        while (dns && dns[n_dns])
                n_dns++;
        while (ips && ips[n_ip])
                n_ip++;

        for (size_t i = n_ip; i-- > 0;) {
                uint8_t a[16];
                size_t alen;
                if (inet_pton(AF_INET, ips[i], a) == 1) {
                        if (memcmp(a, "\0\0\0\0", 4) == 0)
                                continue;
                        alen = 4;
                } else if (inet_pton(AF_INET6, ips[i], a) == 1) {
                        static const uint8_t any6[16] = {};
                        if (memcmp(a, any6, 16) == 0)
                                continue;
                        alen = 16;
                } else
                        return -EINVAL;
                r = asn1_write_tagged(&p, buf, MBEDTLS_ASN1_CONTEXT_SPECIFIC | 7, a, alen);
                if (r < 0)
                        return -E2BIG;
                total += r;
        }
        for (size_t i = n_dns; i-- > 0;) {
                r = asn1_write_tagged(&p, buf, MBEDTLS_ASN1_CONTEXT_SPECIFIC | 2, dns[i], strlen(dns[i]));
                if (r < 0)
                        return -E2BIG;
                total += r;
        }
        if ((r = mbedtls_asn1_write_len(&p, buf, (size_t) total)) < 0)
                return -E2BIG;
        total += r;
        if ((r = mbedtls_asn1_write_tag(&p, buf, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE)) < 0)
                return -E2BIG;
        total += r;
        *ret_start = p;
        return total;
}

static time_t x509_time_to_time(const mbedtls_x509_time *t) {
        struct tm tm = {
                .tm_year = t->year - 1900, .tm_mon = t->mon - 1, .tm_mday = t->day,
                .tm_hour = t->hour, .tm_min = t->min, .tm_sec = t->sec,
        };
        return timegm(&tm);
}

static bool expires_soon(const mbedtls_x509_crt *crt) {
        return x509_time_to_time(&crt->valid_to) < time(NULL) + (time_t) RENEW_DAYS * 86400;
}

static void format_x509_time(time_t t, char buf[16]) {
        struct tm tm;
        gmtime_r(&t, &tm);
        (void) strftime(buf, 16, "%Y%m%d%H%M%S", &tm);
}

static int gen_key(struct certgen *g, mbedtls_pk_context *key) {
        int r = mbedtls_pk_setup(key, mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY));
        if (r != 0)
                return -ENOMEM;
        r = mbedtls_ecp_gen_key(MBEDTLS_ECP_DP_SECP256R1, mbedtls_pk_ec(*key), mbedtls_ctr_drbg_random, &g->drbg);
        return r == 0 ? 0 : -EIO;
}

/* Issues a certificate for subject_key, signed by issuer_key (self-signed when they are the
 * same). Writes PEM into out. */
static int issue(struct certgen *g, mbedtls_pk_context *subject_key, const char *subject,
                 mbedtls_pk_context *issuer_key, const char *issuer, int days, bool is_ca,
                 const unsigned char *san, size_t san_len, unsigned char *out, size_t out_size) {
        mbedtls_x509write_cert w;
        mbedtls_mpi serial;
        unsigned char sbytes[16];
        char from[16], to[16];
        int r;

        mbedtls_x509write_crt_init(&w);
        mbedtls_mpi_init(&serial);

        if (getrandom(sbytes, sizeof(sbytes), 0) != (ssize_t) sizeof(sbytes)) {
                r = -EIO;
                goto out;
        }
        sbytes[0] &= 0x7f; /* positive */
        sbytes[0] |= 0x01; /* and 16 bytes long */
        time_t now = time(NULL);
        format_x509_time(now - 3600, from); /* an hour of slack for clocks a bit behind */
        format_x509_time(now + (time_t) days * 86400, to);

        mbedtls_x509write_crt_set_version(&w, MBEDTLS_X509_CRT_VERSION_3);
        mbedtls_x509write_crt_set_md_alg(&w, MBEDTLS_MD_SHA256);
        mbedtls_x509write_crt_set_subject_key(&w, subject_key);
        mbedtls_x509write_crt_set_issuer_key(&w, issuer_key);
        r = -EINVAL;
        if (mbedtls_mpi_read_binary(&serial, sbytes, sizeof(sbytes)) != 0 ||
            mbedtls_x509write_crt_set_serial(&w, &serial) != 0 ||
            mbedtls_x509write_crt_set_subject_name(&w, subject) != 0 ||
            mbedtls_x509write_crt_set_issuer_name(&w, issuer) != 0 ||
            mbedtls_x509write_crt_set_validity(&w, from, to) != 0 ||
            mbedtls_x509write_crt_set_basic_constraints(&w, is_ca, is_ca ? 0 : -1) != 0 ||
            mbedtls_x509write_crt_set_subject_key_identifier(&w) != 0 ||
            mbedtls_x509write_crt_set_authority_key_identifier(&w) != 0)
                goto out;
        if (is_ca) {
                if (mbedtls_x509write_crt_set_key_usage(&w, MBEDTLS_X509_KU_KEY_CERT_SIGN | MBEDTLS_X509_KU_CRL_SIGN) != 0)
                        goto out;
        } else {
                unsigned char eku[64], *p = eku + sizeof(eku);
                int n = 0, k;
                if ((k = mbedtls_asn1_write_oid(&p, eku, MBEDTLS_OID_SERVER_AUTH,
                                                MBEDTLS_OID_SIZE(MBEDTLS_OID_SERVER_AUTH))) < 0)
                        goto out;
                n += k;
                if ((k = mbedtls_asn1_write_len(&p, eku, (size_t) n)) < 0)
                        goto out;
                n += k;
                if ((k = mbedtls_asn1_write_tag(&p, eku, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE)) < 0)
                        goto out;
                n += k;
                if (mbedtls_x509write_crt_set_key_usage(&w, MBEDTLS_X509_KU_DIGITAL_SIGNATURE |
                                                                    MBEDTLS_X509_KU_KEY_AGREEMENT) != 0 ||
                    mbedtls_x509write_crt_set_extension(&w, MBEDTLS_OID_EXTENDED_KEY_USAGE,
                                                        MBEDTLS_OID_SIZE(MBEDTLS_OID_EXTENDED_KEY_USAGE), 0,
                                                        p, (size_t) n) != 0 ||
                    mbedtls_x509write_crt_set_extension(&w, MBEDTLS_OID_SUBJECT_ALT_NAME,
                                                        MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME), 0,
                                                        san, san_len) != 0)
                        goto out;
        }
        r = mbedtls_x509write_crt_pem(&w, out, out_size, mbedtls_ctr_drbg_random, &g->drbg);
        r = r == 0 ? 0 : -EIO;
out:
        mbedtls_x509write_crt_free(&w);
        mbedtls_mpi_free(&serial);
        return r;
}

/* Loads a certificate + key pair; -ENOENT if either is missing, -EBADMSG if unusable. */
static int load_pair(const char *crt_path, const char *key_path, mbedtls_x509_crt *crt, mbedtls_pk_context *key) {
        if (access(crt_path, F_OK) < 0 || access(key_path, F_OK) < 0)
                return -ENOENT;
        if (mbedtls_x509_crt_parse_file(crt, crt_path) != 0)
                return -EBADMSG;
        if (mbedtls_pk_parse_keyfile(key, key_path, NULL) != 0)
                return -EBADMSG;
        if (mbedtls_pk_check_pair(&crt->pk, key) != 0)
                return -EBADMSG;
        return 0;
}

static int write_key(const char *dir, const char *name, mbedtls_pk_context *key) {
        unsigned char pem[PEM_MAX];
        if (mbedtls_pk_write_key_pem(key, pem, sizeof(pem)) != 0)
                return -EIO;
        int r = write_file_atomic(dir, name, pem, strlen((char *) pem), 0600);
        hub_explicit_bzero(pem, sizeof(pem));
        return r;
}

int gw_cert_ensure(const char *state_dir, const char *const *dns_names, const char *const *ip_addrs,
                   char **ret_cert_path, char **ret_key_path, char **ret_ca_path) {
        _cleanup_free_ char *ca_crt_path = NULL, *ca_key_path = NULL, *srv_crt_path = NULL, *srv_key_path = NULL;
        unsigned char san_buf[SAN_MAX], pem[PEM_MAX];
        const unsigned char *san;
        mbedtls_x509_crt ca, srv;
        mbedtls_pk_context ca_key, srv_key;
        struct certgen g;
        char ca_subject[512], srv_subject[300];
        bool new_ca = false;
        int r, san_len;

        if (!state_dir || !dns_names || !dns_names[0])
                return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS, "certificate generation needs a host name");
        for (size_t i = 0; dns_names[i]; i++)
                if (!dns_name_valid(dns_names[i]))
                        return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS,
                                           "cannot put '%s' in a certificate: not a valid DNS name", dns_names[i]);
        san_len = build_san(dns_names, ip_addrs, san_buf, sizeof(san_buf), &san);
        if (san_len == -EINVAL)
                return gw_log_full(LOG_ERR, EINVAL, NET_FIELDS,
                                   "cannot put a listen address in a certificate: not an IP address");
        if (san_len < 0)
                return gw_log_full(LOG_ERR, E2BIG, NET_FIELDS, "too many names for one certificate");

        if (mkdir(state_dir, 0700) < 0 && errno != EEXIST)
                return gw_log_full(LOG_ERR, errno, NET_FIELDS, "cannot create %s: %m", state_dir);

        ca_crt_path = path_join(state_dir, "ca.crt");
        ca_key_path = path_join(state_dir, "ca.key");
        srv_crt_path = path_join(state_dir, "server.crt");
        srv_key_path = path_join(state_dir, "server.key");
        if (!ca_crt_path || !ca_key_path || !srv_crt_path || !srv_key_path)
                return -ENOMEM;

        mbedtls_x509_crt_init(&ca);
        mbedtls_x509_crt_init(&srv);
        mbedtls_pk_init(&ca_key);
        mbedtls_pk_init(&srv_key);
        mbedtls_ctr_drbg_init(&g.drbg);
        r = gw_net_drbg_seed(&g.drbg, "fieldhub-certgen");
        if (r != 0) {
                r = gw_log_full(LOG_ERR, EIO, NET_FIELDS, "cannot seed the random generator");
                goto out;
        }

        /* The CA: reuse unless missing, broken, not a CA or expiring. */
        r = load_pair(ca_crt_path, ca_key_path, &ca, &ca_key);
        if (r == 0 && (!ca.ca_istrue || expires_soon(&ca))) {
                gw_log_full(LOG_WARNING, 0, NET_FIELDS,
                            "local CA %s is not usable (expired, expiring or not a CA): making a new one; "
                            "clients must trust the new CA", ca_crt_path);
                r = -EBADMSG;
        } else if (r == -EBADMSG)
                gw_log_full(LOG_WARNING, 0, NET_FIELDS,
                            "local CA %s or its key %s is unreadable or they do not match: making a new CA; "
                            "clients must trust the new CA", ca_crt_path, ca_key_path);
        if (r < 0) {
                char host[256] = "";
                if (gethostname(host, sizeof(host) - 1) < 0 || !dns_name_valid(host))
                        snprintf(host, sizeof(host), "%s", dns_names[0]);
                mbedtls_x509_crt_free(&ca);
                mbedtls_x509_crt_init(&ca);
                mbedtls_pk_free(&ca_key);
                mbedtls_pk_init(&ca_key);
                snprintf(ca_subject, sizeof(ca_subject), "CN=fieldhub local CA %s,O=fieldhub", host);
                if ((r = gen_key(&g, &ca_key)) < 0 ||
                    (r = issue(&g, &ca_key, ca_subject, &ca_key, ca_subject, CA_DAYS, true, NULL, 0, pem, sizeof(pem))) < 0) {
                        r = gw_log_full(LOG_ERR, r, NET_FIELDS, "cannot generate the local CA: %m");
                        goto out;
                }
                if ((r = write_key(state_dir, "ca.key", &ca_key)) < 0 ||
                    (r = write_file_atomic(state_dir, "ca.crt", pem, strlen((char *) pem), 0644)) < 0) {
                        r = gw_log_full(LOG_ERR, r, NET_FIELDS, "cannot write the local CA into %s: %m", state_dir);
                        goto out;
                }
                if (mbedtls_x509_crt_parse(&ca, pem, strlen((char *) pem) + 1) != 0) {
                        r = -EIO;
                        goto out;
                }
                new_ca = true;
                gw_log_full(LOG_NOTICE, 0, NET_FIELDS, "generated a local CA: %s", ca_crt_path);
        }

        /* The server certificate: reuse when it matches the names, chains to the CA, matches
         * its key and is not expiring. */
        bool reuse = false;
        if (!new_ca && load_pair(srv_crt_path, srv_key_path, &srv, &srv_key) == 0) {
                uint32_t flags = 0;
                bool names_ok = srv.v3_ext.p && memmem(srv.v3_ext.p, srv.v3_ext.len, san, (size_t) san_len);
                bool chain_ok = mbedtls_x509_crt_verify(&srv, &ca, NULL, NULL, &flags, NULL, NULL) == 0;
                bool time_ok = !expires_soon(&srv);
                reuse = names_ok && chain_ok && time_ok;
                if (!reuse)
                        gw_log_full(LOG_NOTICE, 0, NET_FIELDS, "renewing the server certificate %s: %s", srv_crt_path,
                                    !names_ok ? "host names or addresses changed" :
                                    !chain_ok ? "it does not chain to the local CA" :
                                                "it expires within 30 days");
        }
        if (!reuse) {
                int n = mbedtls_x509_dn_gets(ca_subject, sizeof(ca_subject), &ca.subject);
                if (n < 0) {
                        r = -EIO;
                        goto out;
                }
                /* dn_gets separates with ", "; the name parser wants "," */
                for (char *s = ca_subject, *d = ca_subject;; s++) {
                        if (s[0] == ',' && s[1] == ' ') {
                                *d++ = ',';
                                s++;
                                continue;
                        }
                        *d++ = *s;
                        if (!*s)
                                break;
                }
                snprintf(srv_subject, sizeof(srv_subject), "CN=%s,O=fieldhub", dns_names[0]);
                mbedtls_pk_free(&srv_key);
                mbedtls_pk_init(&srv_key);
                if ((r = gen_key(&g, &srv_key)) < 0 ||
                    (r = issue(&g, &srv_key, srv_subject, &ca_key, ca_subject, SERVER_DAYS, false, san,
                               (size_t) san_len, pem, sizeof(pem))) < 0) {
                        r = gw_log_full(LOG_ERR, r, NET_FIELDS, "cannot generate the server certificate: %m");
                        goto out;
                }
                if ((r = write_key(state_dir, "server.key", &srv_key)) < 0 ||
                    (r = write_file_atomic(state_dir, "server.crt", pem, strlen((char *) pem), 0644)) < 0) {
                        r = gw_log_full(LOG_ERR, r, NET_FIELDS, "cannot write the server certificate into %s: %m",
                                        state_dir);
                        goto out;
                }
                gw_log_full(LOG_NOTICE, 0, NET_FIELDS, "generated server certificate %s for %s", srv_crt_path,
                            dns_names[0]);
        }
        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "net", .no_ratelimit = true),
                    "TLS uses the generated local CA %s: make clients trust it "
                    "(e.g. copy it to /usr/local/share/ca-certificates/ and run update-ca-certificates)",
                    ca_crt_path);

        if (ret_cert_path)
                *ret_cert_path = TAKE_PTR(srv_crt_path);
        if (ret_key_path)
                *ret_key_path = TAKE_PTR(srv_key_path);
        if (ret_ca_path)
                *ret_ca_path = TAKE_PTR(ca_crt_path);
        r = 0;
out:
        hub_explicit_bzero(pem, sizeof(pem));
        mbedtls_x509_crt_free(&ca);
        mbedtls_x509_crt_free(&srv);
        mbedtls_pk_free(&ca_key);
        mbedtls_pk_free(&srv_key);
        mbedtls_ctr_drbg_free(&g.drbg);
        return r;
}
