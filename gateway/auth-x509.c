/* SPDX-License-Identifier: MIT */
/* X.509 device authentication (reference §1.8); see auth-x509.h. */

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <mbedtls/md.h>
#include <mbedtls/oid.h>

#include "auth-x509.h"
#include "hub/macro.h"
#include "hub/registry.h"
#include "log.h"

static bool hex_eq(const uint8_t *digest, size_t n, const char *hex) {
        static const char digits[] = "0123456789abcdef";
        if (strlen(hex) != 2 * n)
                return false;
        for (size_t i = 0; i < n; i++) {
                char h = (char) (hex[2 * i] | 0x20), l = (char) (hex[2 * i + 1] | 0x20);
                if (h != digits[digest[i] >> 4] || l != digits[digest[i] & 15])
                        return false;
        }
        return true;
}

const char *gw_auth_x509_check(const mbedtls_x509_crt *crt, const uint8_t *der, size_t der_len,
                               const struct hub_device *d, const char *module_id, mbedtls_x509_crt *ca_chain) {
        if (!crt || !der || der_len == 0)
                return "no client certificate";
        if (!d)
                return "unknown device";
        if (mbedtls_x509_time_is_future(&crt->valid_from))
                return "the client certificate is not valid yet";
        if (mbedtls_x509_time_is_past(&crt->valid_to))
                return "the client certificate has expired";

        if (d->auth_type == HUB_AUTH_TYPE_SELF_SIGNED) {
                uint8_t sha1[20], sha256[32];
                if (mbedtls_md(mbedtls_md_info_from_type(MBEDTLS_MD_SHA1), der, der_len, sha1) != 0 ||
                    mbedtls_md(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), der, der_len, sha256) != 0)
                        return "cannot hash the client certificate";
                const char *tp[2] = { d->primary_thumbprint, d->secondary_thumbprint };
                for (int i = 0; i < 2; i++)
                        if (tp[i][0] && (hex_eq(sha1, sizeof sha1, tp[i]) || hex_eq(sha256, sizeof sha256, tp[i])))
                                return NULL;
                return "the client certificate's thumbprint matches neither registered thumbprint";
        }
        if (d->auth_type == HUB_AUTH_TYPE_CA) {
                if (!ca_chain)
                        return "no CA certificate is configured (hub.x509_ca_files)";
                uint32_t flags = 0;
                /* The chain the device sent is linked behind the leaf. */
                if (mbedtls_x509_crt_verify((mbedtls_x509_crt *) crt, ca_chain, NULL, NULL, &flags, NULL, NULL) != 0)
                        return (flags & MBEDTLS_X509_BADCERT_EXPIRED) ? "the certificate chain has expired"
                                                                      : "the client certificate does not chain to a configured CA";
                char cn[HUB_DEVICE_ID_MAX * 2 + 2] = "";
                for (const mbedtls_x509_name *n = &crt->subject; n; n = n->next)
                        if (n->oid.p && MBEDTLS_OID_CMP(MBEDTLS_OID_AT_CN, &n->oid) == 0) {
                                if (n->val.len >= sizeof cn)
                                        return "the client certificate's CN is too long";
                                memcpy(cn, n->val.p, n->val.len);
                                cn[n->val.len] = 0;
                        }
                char want[HUB_DEVICE_ID_MAX * 2 + 2];
                snprintf(want, sizeof want, "%s%s%s", d->device_id, module_id ? "/" : "", module_id ? module_id : "");
                if (!streq(cn, want))
                        return "the client certificate's subject CN is not the device id";
                return NULL;
        }
        return "the device does not use X.509 authentication";
}

int gw_auth_x509_load_ca(char *const *files, mbedtls_x509_crt *chain, bool *ret_loaded) {
        bool loaded = false;
        for (size_t i = 0; files && files[i]; i++) {
                int r = mbedtls_x509_crt_parse_file(chain, files[i]);
                if (r != 0) { /* > 0: certificates of a bundle that did not parse */
                        gw_log_error("Cannot load the X.509 CA file %s (hub.x509_ca_files[%zu]): mbedtls error -0x%04x",
                                     files[i], i, (unsigned) (r < 0 ? -r : r));
                        return r == MBEDTLS_ERR_X509_ALLOC_FAILED ? -ENOMEM : -EBADMSG;
                }
                loaded = true;
        }
        *ret_loaded = loaded;
        return 0;
}
