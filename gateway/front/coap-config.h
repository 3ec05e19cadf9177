/* SPDX-License-Identifier: MIT */
#pragma once

/* The `coap:` section of the configuration (CoAP server mode, front/coap.c) and the DTLS-PSK
 * derivation shared by the daemon and fieldhubctl (`device show-coap-psk`). Part of gwcore:
 * config-schema.c validates the section through gw_coap_conf_parse(). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapter/conf.h"
#include "hub/macro.h"

#define GW_COAP_LISTEN_DEFAULT "127.0.0.1:5683"
#define GW_COAP_DTLS_LISTEN_DEFAULT "0.0.0.0:5684"
#define GW_COAP_SESSION_TIMEOUT_DEFAULT_USEC (UINT64_C(60) * 1000000)
#define GW_COAP_MAX_SESSIONS_DEFAULT 10000u
#define GW_COAP_MAX_HANDSHAKES_DEFAULT 100u
#define GW_COAP_MAX_REQUESTS_PER_SECOND_DEFAULT 200u
#define GW_COAP_MAX_MESSAGE_BYTES_DEFAULT (UINT64_C(256) * 1024)
/* The label of the PSK derivation: PSK = HMAC-SHA256(base64-decoded device key, label). */
#define GW_COAP_PSK_LABEL "fieldhub-coap-psk"
#define GW_COAP_PSK_BYTES 32

struct gw_coap_conf {
        char **listen;              /* coap.listen: plain UDP, NULL-terminated (may be empty) */
        char **dtls_listen;         /* coap.dtls_listen: DTLS, NULL-terminated (may be empty) */
        bool allow_plaintext;       /* coap.allow_plaintext: plain UDP on non-loopback addresses */
        char **plaintext_devices;   /* coap.plaintext_devices: ids allowed on plain UDP, NULL-terminated */
        uint64_t session_timeout_usec;     /* coap.limits.session_timeout: idle session lifetime */
        unsigned max_sessions;             /* coap.limits.max_sessions */
        unsigned max_handshakes;           /* coap.limits.max_handshakes (DTLS, in progress) */
        uint32_t max_requests_per_second;  /* coap.limits.max_requests_per_second per IP address (0 = off) */
        uint64_t max_message_bytes;        /* coap.limits.max_message_bytes (block-wise bodies) */
};

/* Reads and validates root's `coap:` mapping, adding every problem to e. Returns 0 with *ret
 * (NULL when the section is absent, or `listen: []` and `dtls_listen: []`), -EINVAL after
 * errors, -ENOMEM. */
int gw_coap_conf_parse(const struct adp_conf_node *root, struct adp_conf_errors *e, struct gw_coap_conf **ret);
/* Accepts NULL; returns NULL. */
struct gw_coap_conf *gw_coap_conf_free(struct gw_coap_conf *c);
DEFINE_CLEANUP_FUNC(struct gw_coap_conf *, gw_coap_conf_free);

/* Whether id is in c->plaintext_devices. */
bool gw_coap_conf_plaintext_device(const struct gw_coap_conf *c, const char *id);

/* The device's DTLS pre-shared key: HMAC-SHA256(base64-decode(key_b64), GW_COAP_PSK_LABEL).
 * -EINVAL when key_b64 is not base64 of 16..64 bytes. Does not block. */
int gw_coap_psk_derive(const char *key_b64, uint8_t ret_psk[static GW_COAP_PSK_BYTES]);
