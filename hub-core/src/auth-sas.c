/* SPDX-License-Identifier: MIT */
/* SAS tokens (reference §1.3–1.5). The HMAC is always computed over sr exactly as received:
 * clients differ in the case of their percent escapes, so decoding and re-encoding would
 * break valid tokens. sr is decoded separately, once, only to decide what it is scoped to.
 *
 * Secrets (keys, decoded keys, signatures, token copies) live on the stack or in buffers that
 * are wiped before they are freed, and never appear in results or logs. */

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <mbedtls/md.h>

#include "hub/auth.h"
#include "hub/registry.h"
#include "hub/urlenc.h"

#define SAS_PREFIX "SharedAccessSignature"
#define SHA256_LEN 32

static void free_secret(char *s) {
        if (s) {
                hub_explicit_bzero(s, strlen(s));
                free(s);
        }
}

void hub_sas_token_done(struct hub_sas_token *t) {
        if (!t)
                return;
        free(t->sr);
        free_secret(t->sig);
        free(t->skn);
        *t = (struct hub_sas_token) {};
}

static int parse_se(const char *s, uint64_t *ret) {
        uint64_t v = 0;

        if (!*s || strlen(s) > 20)
                return -EBADMSG;
        for (; *s; s++) {
                if (*s < '0' || *s > '9')
                        return -EBADMSG;
                if (v > (UINT64_MAX - (uint64_t) (*s - '0')) / 10)
                        return -EBADMSG;
                v = v * 10 + (uint64_t) (*s - '0');
        }
        *ret = v;
        return 0;
}

/* Percent-decodes a field value; a malformed escape makes the token malformed. */
static int decode_field(const char *v, size_t len, char **ret) {
        int r = hub_url_decode(v, len, false, ret);
        return r == -EINVAL ? -EBADMSG : r;
}

int hub_sas_parse(const char *token, struct hub_sas_token *ret) {
        _cleanup_(hub_sas_token_done) struct hub_sas_token t = {};
        bool have_se = false;
        const char *p;
        size_t len;
        int r;

        if (!token || !ret)
                return -EINVAL;
        len = strnlen(token, HUB_SAS_TOKEN_MAX + 1);
        if (len > HUB_SAS_TOKEN_MAX)
                return -EBADMSG;
        if (strncmp(token, SAS_PREFIX, strlen(SAS_PREFIX)) != 0)
                return -EBADMSG;
        p = token + strlen(SAS_PREFIX);
        /* exactly one whitespace character */
        if (!(*p == ' ' || *p == '\t'))
                return -EBADMSG;
        p++;
        if (*p == '\0' || isspace((unsigned char) *p))
                return -EBADMSG;

        for (;;) {
                const char *end = strchrnul(p, '&');
                const char *eq = memchr(p, '=', (size_t) (end - p));
                const char *val;
                size_t nlen, vlen;

                if (!eq || eq == p)
                        return -EBADMSG; /* empty field, or no "=", or no name */
                nlen = (size_t) (eq - p);
                val = eq + 1;
                vlen = (size_t) (end - val);

                if (nlen == 2 && strncasecmp(p, "sr", 2) == 0) {
                        if (t.sr || vlen == 0)
                                return -EBADMSG;
                        t.sr = strndup(val, vlen);
                        if (!t.sr)
                                return -ENOMEM;
                        if (strlen(t.sr) != vlen)
                                return -EBADMSG;
                } else if (nlen == 3 && strncasecmp(p, "sig", 3) == 0) {
                        if (t.sig || vlen == 0)
                                return -EBADMSG;
                        r = decode_field(val, vlen, &t.sig);
                        if (r < 0)
                                return r;
                } else if (nlen == 2 && strncasecmp(p, "se", 2) == 0) {
                        _cleanup_free_ char *se = NULL;
                        if (have_se)
                                return -EBADMSG;
                        r = decode_field(val, vlen, &se);
                        if (r < 0)
                                return r;
                        r = parse_se(se, &t.se);
                        if (r < 0)
                                return r;
                        have_se = true;
                } else if (nlen == 3 && strncasecmp(p, "skn", 3) == 0) {
                        if (t.skn || vlen == 0)
                                return -EBADMSG;
                        r = decode_field(val, vlen, &t.skn);
                        if (r < 0)
                                return r;
                }
                /* other fields: ignored */

                if (*end == '\0')
                        break;
                p = end + 1;
        }

        if (!t.sr || !t.sig || !have_se)
                return -EBADMSG;

        *ret = t;
        t = (struct hub_sas_token) {};
        return 0;
}

/* Decodes a key into buf (HUB_KEY_MAX_BYTES). -EINVAL unless strict base64 of 16..64 bytes. */
static int key_decode(const char *key_b64, uint8_t buf[static HUB_KEY_MAX_BYTES], size_t *ret_len) {
        size_t n = 0;
        int r;

        if (!key_b64)
                return -EINVAL;
        r = hub_base64_decode_buf(key_b64, strlen(key_b64), buf, HUB_KEY_MAX_BYTES, &n);
        if (r < 0)
                return -EINVAL;
        if (n < HUB_KEY_MIN_BYTES) {
                hub_explicit_bzero(buf, HUB_KEY_MAX_BYTES);
                return -EINVAL;
        }
        *ret_len = n;
        return 0;
}

static int sas_hmac(const char *sr_raw, uint64_t se, const char *key_b64, uint8_t ret_mac[static SHA256_LEN]) {
        const mbedtls_md_info_t *md = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
        uint8_t key[HUB_KEY_MAX_BYTES];
        mbedtls_md_context_t ctx;
        char se_str[24];
        size_t klen = 0;
        int r;

        if (!sr_raw || !md)
                return -EINVAL;
        r = key_decode(key_b64, key, &klen);
        if (r < 0)
                return r;
        (void) snprintf(se_str, sizeof se_str, "%" PRIu64, se);

        mbedtls_md_init(&ctx);
        r = mbedtls_md_setup(&ctx, md, 1);
        if (r == 0)
                r = mbedtls_md_hmac_starts(&ctx, key, klen);
        if (r == 0)
                r = mbedtls_md_hmac_update(&ctx, (const unsigned char *) sr_raw, strlen(sr_raw));
        if (r == 0)
                r = mbedtls_md_hmac_update(&ctx, (const unsigned char *) "\n", 1);
        if (r == 0)
                r = mbedtls_md_hmac_update(&ctx, (const unsigned char *) se_str, strlen(se_str));
        if (r == 0)
                r = mbedtls_md_hmac_finish(&ctx, ret_mac);
        mbedtls_md_free(&ctx); /* wipes the HMAC state */
        hub_explicit_bzero(key, sizeof key);
        if (r != 0)
                return r == MBEDTLS_ERR_MD_ALLOC_FAILED ? -ENOMEM : -EIO;
        return 0;
}

int hub_sas_sign(const char *sr_raw, uint64_t se, const char *key_b64, char ret_sig_b64[static 45]) {
        uint8_t mac[SHA256_LEN];
        char *b64 = NULL;
        int r;

        r = sas_hmac(sr_raw, se, key_b64, mac);
        if (r < 0)
                return r;
        r = hub_base64_encode(mac, sizeof mac, &b64);
        hub_explicit_bzero(mac, sizeof mac);
        if (r < 0)
                return r;
        if (strlen(b64) != 44) {
                free_secret(b64);
                return -EIO;
        }
        memcpy(ret_sig_b64, b64, 45);
        free_secret(b64);
        return 0;
}

int hub_sas_generate(const char *resource_uri, const char *key_b64, uint64_t se, const char *policy,
                     char **ret_token) {
        _cleanup_free_ char *sr = NULL, *sig_enc = NULL, *skn_enc = NULL;
        char sig[45];
        char *token = NULL;
        int r, n;

        if (!resource_uri || !*resource_uri || !key_b64 || !ret_token || (policy && !*policy))
                return -EINVAL;
        r = hub_url_encode(resource_uri, &sr);
        if (r < 0)
                return r;
        r = hub_sas_sign(sr, se, key_b64, sig);
        if (r < 0)
                return r;
        r = hub_url_encode(sig, &sig_enc);
        hub_explicit_bzero(sig, sizeof sig);
        if (r < 0)
                return r;
        if (policy) {
                r = hub_url_encode(policy, &skn_enc);
                if (r < 0) {
                        free_secret(TAKE_PTR(sig_enc));
                        return r;
                }
        }
        n = asprintf(&token, SAS_PREFIX " sr=%s&sig=%s&se=%" PRIu64 "%s%s", sr, sig_enc, se,
                     skn_enc ? "&skn=" : "", skn_enc ?: "");
        free_secret(TAKE_PTR(sig_enc));
        if (n < 0)
                return -ENOMEM;
        *ret_token = token;
        return 0;
}

const char *hub_auth_failure_to_string(enum hub_auth_failure f) {
        static const char *const table[_HUB_AUTH_FAILURE_MAX] = {
                [HUB_AUTH_OK] = "ok",
                [HUB_AUTH_MALFORMED] = "malformed token",
                [HUB_AUTH_EXPIRED] = "expired",
                [HUB_AUTH_WRONG_HOST] = "wrong host",
                [HUB_AUTH_WRONG_SCOPE] = "wrong scope",
                [HUB_AUTH_UNKNOWN_POLICY] = "unknown policy",
                [HUB_AUTH_UNKNOWN_DEVICE] = "unknown device",
                [HUB_AUTH_DEVICE_DISABLED] = "device disabled",
                [HUB_AUTH_WRONG_AUTH_TYPE] = "device does not use SAS",
                [HUB_AUTH_BAD_SIGNATURE] = "bad signature",
                [HUB_AUTH_INSUFFICIENT_RIGHTS] = "insufficient rights",
        };
        if ((unsigned) f >= _HUB_AUTH_FAILURE_MAX)
                return "unknown failure";
        return table[f];
}

/* Constant-time comparison of two equally long buffers. */
static bool ct_equal(const uint8_t *a, const uint8_t *b, size_t n) {
        volatile uint8_t diff = 0;
        for (size_t i = 0; i < n; i++)
                diff |= a[i] ^ b[i];
        return diff == 0;
}

/* What a decoded sr names. */
struct sas_scope {
        char *buf;          /* decoded sr, split in place */
        const char *host;
        const char *device; /* NULL for hub scope */
        const char *module; /* NULL unless module scope */
};

static void sas_scope_done(struct sas_scope *s) {
        free(s->buf);
        *s = (struct sas_scope) {};
}

/* Decodes and splits sr. Returns the failure (OK, MALFORMED, WRONG_HOST, WRONG_SCOPE) or
 * -ENOMEM. */
static int sas_scope_parse(const char *sr, const char *const *host_names, struct sas_scope *ret) {
        char *seg[6];
        size_t n = 0;
        char *p;
        bool host_ok = false;
        int r;

        r = hub_url_decode(sr, strlen(sr), false, &ret->buf);
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                return HUB_AUTH_MALFORMED;
        p = ret->buf;
        for (;;) {
                char *slash = strchr(p, '/');
                if (n == ELEMENTSOF(seg))
                        return HUB_AUTH_WRONG_SCOPE;
                seg[n++] = p;
                if (!slash)
                        break;
                *slash = '\0';
                p = slash + 1;
        }
        for (size_t i = 0; host_names && host_names[i]; i++)
                if (strcasecmp(seg[0], host_names[i]) == 0) {
                        host_ok = true;
                        break;
                }
        if (!host_ok || seg[0][0] == '\0')
                return HUB_AUTH_WRONG_HOST;
        ret->host = seg[0];
        /* "host", "host/devices", "host/devices/{id}", "host/devices/{id}/modules/{mid}" */
        if (n >= 2 && strcasecmp(seg[1], "devices") != 0)
                return HUB_AUTH_WRONG_SCOPE;
        if (n >= 3) {
                if (seg[2][0] == '\0')
                        return HUB_AUTH_WRONG_SCOPE;
                ret->device = seg[2];
        }
        if (n == 4)
                return HUB_AUTH_WRONG_SCOPE;
        if (n == 5) {
                if (strcasecmp(seg[3], "modules") != 0 || seg[4][0] == '\0')
                        return HUB_AUTH_WRONG_SCOPE;
                ret->module = seg[4];
        }
        if (n > 5)
                return HUB_AUTH_WRONG_SCOPE;
        return HUB_AUTH_OK;
}

/* Whether the scope covers the claimed identity, by whole segments. */
static bool sas_scope_covers(const struct sas_scope *s, const char *device_id, const char *module_id) {
        if (!s->device)
                return true; /* hub scope */
        if (!device_id || strcasecmp(s->device, device_id) != 0)
                return false;
        if (!s->module)
                return true; /* device scope covers the device and its modules */
        return module_id && strcasecmp(s->module, module_id) == 0;
}

/* HMAC check against primary then secondary. Returns 1 primary, 2 secondary, 0 neither, or
 * -errno. An unusable stored key counts as not matching. */
static int sas_match(const char *sr, uint64_t se, const uint8_t sig[static SHA256_LEN], const char *primary,
                     const char *secondary) {
        const char *keys[2] = { primary, secondary };
        int found = 0;

        for (size_t i = 0; i < 2; i++) {
                uint8_t mac[SHA256_LEN];
                int r;

                if (!keys[i] || !*keys[i])
                        continue;
                r = sas_hmac(sr, se, keys[i], mac);
                if (r == -EINVAL)
                        continue;
                if (r < 0)
                        return r;
                if (ct_equal(mac, sig, SHA256_LEN) && found == 0)
                        found = (int) i + 1;
                hub_explicit_bzero(mac, sizeof mac);
        }
        return found;
}

static int deny(struct hub_auth_result *ret, struct hub_auth_result *res, enum hub_auth_failure f) {
        res->failure = f;
        res->rights = 0;
        res->policy = false;
        res->policy_name[0] = '\0';
        res->secondary_key = false;
        *ret = *res;
        return -EACCES;
}

int hub_auth_check_sas(struct hub_registry *reg, const struct hub_auth_request *req, struct hub_auth_result *ret) {
        _cleanup_(hub_sas_token_done) struct hub_sas_token t = {};
        _cleanup_(sas_scope_done) struct sas_scope scope = {};
        struct hub_auth_result res = {};
        uint8_t sig[SHA256_LEN];
        size_t siglen = 0;
        const char *primary, *secondary;
        struct hub_policy pol = {};
        struct hub_device dev = {};
        unsigned granted;
        int r, m;

        if (!reg || !req || !ret || !req->token)
                return -EINVAL;

        r = hub_sas_parse(req->token, &t);
        if (r == -EBADMSG)
                return deny(ret, &res, HUB_AUTH_MALFORMED);
        if (r < 0)
                return r;
        if (hub_base64_decode_buf(t.sig, strlen(t.sig), sig, sizeof sig, &siglen) < 0 || siglen != SHA256_LEN)
                return deny(ret, &res, HUB_AUTH_MALFORMED);

        /* se is seconds: saturate instead of overflowing for absurdly far expiries */
        res.expiry_usec = t.se > (UINT64_MAX - HUB_SAS_EXPIRY_SKEW_USEC) / UINT64_C(1000000)
                                  ? UINT64_MAX
                                  : t.se * UINT64_C(1000000);
        if (res.expiry_usec != UINT64_MAX && res.expiry_usec + HUB_SAS_EXPIRY_SKEW_USEC < req->now_usec)
                return deny(ret, &res, HUB_AUTH_EXPIRED);

        r = sas_scope_parse(t.sr, req->host_names, &scope);
        if (r < 0)
                return r;
        if (r != HUB_AUTH_OK)
                return deny(ret, &res, (enum hub_auth_failure) r);
        if (!sas_scope_covers(&scope, req->device_id, req->module_id))
                return deny(ret, &res, HUB_AUTH_WRONG_SCOPE);

        if (t.skn) {
                if (strlen(t.skn) > HUB_POLICY_NAME_MAX)
                        return deny(ret, &res, HUB_AUTH_UNKNOWN_POLICY);
                r = hub_registry_policy_get(reg, t.skn, &pol);
                if (r == -ENOENT)
                        return deny(ret, &res, HUB_AUTH_UNKNOWN_POLICY);
                if (r < 0)
                        return r;
                primary = pol.primary_key;
                secondary = pol.secondary_key;
        } else {
                /* A device key grants DeviceConnect for its own device only (req->device_id is
                 * set: a device scope covers no request without one). */
                if (!scope.device || scope.module || req->module_id || !req->device_id)
                        return deny(ret, &res, HUB_AUTH_WRONG_SCOPE);
                r = hub_registry_get(reg, req->device_id, &dev);
                if (r == -ENOENT || r == -EINVAL)
                        return deny(ret, &res, HUB_AUTH_UNKNOWN_DEVICE);
                if (r < 0)
                        return r;
                if (dev.status != HUB_DEVICE_ENABLED) {
                        hub_device_done(&dev);
                        return deny(ret, &res, HUB_AUTH_DEVICE_DISABLED);
                }
                if (dev.auth_type != HUB_AUTH_TYPE_SAS) {
                        hub_device_done(&dev);
                        return deny(ret, &res, HUB_AUTH_WRONG_AUTH_TYPE);
                }
                primary = dev.primary_key;
                secondary = dev.secondary_key;
        }

        m = sas_match(t.sr, t.se, sig, primary, secondary);
        hub_explicit_bzero(sig, sizeof sig);
        if (t.skn) {
                granted = pol.rights & HUB_RIGHTS_ALL;
                (void) snprintf(res.policy_name, sizeof res.policy_name, "%s", pol.name);
        } else
                granted = HUB_RIGHT_DEVICE_CONNECT;
        hub_policy_done(&pol);
        hub_device_done(&dev);
        if (m < 0)
                return m;
        if (m == 0)
                return deny(ret, &res, HUB_AUTH_BAD_SIGNATURE);

        if ((granted & req->required_rights) != req->required_rights)
                return deny(ret, &res, HUB_AUTH_INSUFFICIENT_RIGHTS);

        res.failure = HUB_AUTH_OK;
        res.rights = granted;
        res.policy = t.skn != NULL;
        res.secondary_key = m == 2;
        *ret = res;
        return 0;
}
