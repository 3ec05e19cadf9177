/* SPDX-License-Identifier: MIT */
/* The `coap:` configuration section and the DTLS-PSK derivation (see coap-config.h). */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <mbedtls/base64.h>
#include <mbedtls/md.h>

#include "front/coap-config.h"
#include "hub/registry.h"
#include "net/net.h"

static const char *const coap_keys[] = { "listen", "dtls_listen", "allow_plaintext", "plaintext_devices", "limits",
                                         NULL };
static const char *const coap_limit_keys[] = { "session_timeout", "max_sessions", "max_handshakes",
                                               "max_requests_per_second", "max_message_bytes", NULL };

static void strv_free(char **v) {
        for (size_t i = 0; v && v[i]; i++)
                free(v[i]);
        free(v);
}

static int strv_push(char ***v, size_t *n, const char *s) {
        char **nv = realloc(*v, (*n + 2) * sizeof(char *));
        if (!nv)
                return -ENOMEM;
        *v = nv;
        nv[*n] = strdup(s);
        if (!nv[*n])
                return -ENOMEM;
        nv[++*n] = NULL;
        return 0;
}

struct gw_coap_conf *gw_coap_conf_free(struct gw_coap_conf *c) {
        if (!c)
                return NULL;
        strv_free(c->listen);
        strv_free(c->dtls_listen);
        strv_free(c->plaintext_devices);
        free(c);
        return NULL;
}

bool gw_coap_conf_plaintext_device(const struct gw_coap_conf *c, const char *id) {
        for (size_t i = 0; c && c->plaintext_devices && c->plaintext_devices[i]; i++)
                if (strcmp(c->plaintext_devices[i], id) == 0)
                        return true;
        return false;
}

/* Reads a listen list; an absent key gives def. plain: loopback check for plain UDP. */
static int parse_listen(const struct adp_conf_node *m, const char *key, const char *def, bool plain,
                        bool allow_plaintext, struct adp_conf_errors *e, char ***ret) {
        const struct adp_conf_node *seq;
        size_t n = 0;
        char found[128];
        int r;

        *ret = calloc(1, sizeof(char *));
        if (!*ret)
                return -ENOMEM;
        r = adp_conf_get_seq(m, key, false, e, &seq);
        if (r == -ENOENT)
                return strv_push(ret, &n, def);
        if (r < 0)
                return 0;
        for (size_t i = 0; i < adp_conf_len(seq); i++) {
                const struct adp_conf_node *a = adp_conf_at(seq, i);
                struct sockaddr_storage sa;
                socklen_t len;
                const char *s;
                if (adp_conf_parse_string(a, e, &s) < 0)
                        continue;
                if (gw_net_parse_address(s, &sa, &len) < 0) {
                        adp_conf_error(e, a, "found %s, expected an address:port with an IP literal or localhost, "
                                       "e.g. \"0.0.0.0:5684\", \"[::]:5684\" or \"127.0.0.1:5683\"",
                                       adp_conf_describe(a, found, sizeof found));
                        continue;
                }
                if (plain && !allow_plaintext && !gw_net_sockaddr_is_loopback(&sa)) {
                        adp_conf_error(e, a, "found %s, expected a loopback address: plain UDP (no DTLS) on other "
                                       "addresses needs coap.allow_plaintext: true",
                                       adp_conf_describe(a, found, sizeof found));
                        continue;
                }
                for (size_t j = 0; j < i; j++)
                        if (adp_conf_scalar(adp_conf_at(seq, j)) && strcmp(adp_conf_scalar(adp_conf_at(seq, j)), s) == 0)
                                adp_conf_error(e, a, "duplicate listen address \"%s\", expected each address once", s);
                if (strv_push(ret, &n, s) < 0)
                        return -ENOMEM;
        }
        return 0;
}

int gw_coap_conf_parse(const struct adp_conf_node *root, struct adp_conf_errors *e, struct gw_coap_conf **ret) {
        _cleanup_(gw_coap_conf_freep) struct gw_coap_conf *c = NULL;
        const struct adp_conf_node *m, *seq, *lim;
        size_t before = adp_conf_errors_total(e), n = 0;
        uint64_t v;
        int r;

        r = adp_conf_get_map(root, "coap", false, e, &m);
        if (r == -ENOENT) {
                *ret = NULL;
                return 0;
        }
        if (r < 0)
                return -EINVAL;
        (void) adp_conf_check_keys(m, coap_keys, e);
        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->session_timeout_usec = GW_COAP_SESSION_TIMEOUT_DEFAULT_USEC;
        c->max_sessions = GW_COAP_MAX_SESSIONS_DEFAULT;
        c->max_handshakes = GW_COAP_MAX_HANDSHAKES_DEFAULT;
        c->max_requests_per_second = GW_COAP_MAX_REQUESTS_PER_SECOND_DEFAULT;
        c->max_message_bytes = GW_COAP_MAX_MESSAGE_BYTES_DEFAULT;

        (void) adp_conf_get_bool(m, "allow_plaintext", false, e, &c->allow_plaintext);
        if (parse_listen(m, "listen", GW_COAP_LISTEN_DEFAULT, true, c->allow_plaintext, e, &c->listen) < 0 ||
            parse_listen(m, "dtls_listen", GW_COAP_DTLS_LISTEN_DEFAULT, false, true, e, &c->dtls_listen) < 0)
                return -ENOMEM;

        c->plaintext_devices = calloc(1, sizeof(char *));
        if (!c->plaintext_devices)
                return -ENOMEM;
        if (adp_conf_get_seq(m, "plaintext_devices", false, e, &seq) == 0)
                for (size_t i = 0; i < adp_conf_len(seq); i++) {
                        const struct adp_conf_node *a = adp_conf_at(seq, i);
                        char found[128];
                        const char *s;
                        if (adp_conf_parse_string(a, e, &s) < 0)
                                continue;
                        if (!hub_device_id_valid(s)) {
                                adp_conf_error(e, a, "found %s, expected a device id (up to 128 letters, digits "
                                               "and -.%%_*?!(),:=@$')", adp_conf_describe(a, found, sizeof found));
                                continue;
                        }
                        if (strv_push(&c->plaintext_devices, &n, s) < 0)
                                return -ENOMEM;
                }

        if (adp_conf_get_map(m, "limits", false, e, &lim) == 0) {
                (void) adp_conf_check_keys(lim, coap_limit_keys, e);
                (void) adp_conf_get_duration(lim, "session_timeout", false, USEC_PER_SEC, 24 * 3600 * USEC_PER_SEC, e,
                                             &c->session_timeout_usec);
                if (adp_conf_get_uint(lim, "max_sessions", false, 1, 1000000, e, &v) == 0)
                        c->max_sessions = (unsigned) v;
                if (adp_conf_get_uint(lim, "max_handshakes", false, 1, 100000, e, &v) == 0)
                        c->max_handshakes = (unsigned) v;
                if (adp_conf_get_uint(lim, "max_requests_per_second", false, 0, 1000000, e, &v) == 0)
                        c->max_requests_per_second = (uint32_t) v;
                (void) adp_conf_get_size(lim, "max_message_bytes", false, 1024, 256 * 1024, e,
                                         &c->max_message_bytes);
        }
        if (adp_conf_errors_total(e) != before)
                return -EINVAL;
        if (!c->listen[0] && !c->dtls_listen[0]) {
                *ret = NULL; /* listen: [] and dtls_listen: [] turn CoAP off */
                return 0;
        }
        *ret = TAKE_PTR(c);
        return 0;
}

int gw_coap_psk_derive(const char *key_b64, uint8_t ret_psk[static GW_COAP_PSK_BYTES]) {
        uint8_t raw[HUB_KEY_MAX_BYTES + 3];
        uint8_t out[GW_COAP_PSK_BYTES];
        size_t olen = 0;
        int r;

        if (!key_b64)
                return -EINVAL;
        size_t l = strlen(key_b64);
        if (l == 0 || l > 4 * ((HUB_KEY_MAX_BYTES + 2) / 3) ||
            mbedtls_base64_decode(raw, sizeof raw, &olen, (const unsigned char *) key_b64, l) != 0 ||
            olen < HUB_KEY_MIN_BYTES || olen > HUB_KEY_MAX_BYTES) {
                hub_explicit_bzero(raw, sizeof raw);
                return -EINVAL;
        }
        r = mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), raw, olen,
                            (const unsigned char *) GW_COAP_PSK_LABEL, strlen(GW_COAP_PSK_LABEL), out);
        hub_explicit_bzero(raw, sizeof raw);
        if (r != 0)
                return -EIO;
        memcpy(ret_psk, out, sizeof out);
        hub_explicit_bzero(out, sizeof out);
        return 0;
}
