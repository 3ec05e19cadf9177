/* SPDX-License-Identifier: MIT */
#pragma once

/* CoAP server mode (RFC 7252, 7641, 7959): the hub front-end for constrained and sleepy devices
 * that push to fieldhub, over plain UDP (configured devices, loopback unless allowed) and DTLS
 * with per-device pre-shared keys (identity "{id}" or "{id}#2", PSK = HMAC-SHA256 of the
 * base64-decoded registry key over "fieldhub-coap-psk": front/coap-config.h).
 *
 * Resources of device {id} (README "CoAP devices"):
 *   d/{id}/telemetry      POST          CON answered with an empty ACK, then a separate 2.04
 *                                       once durable (possibly carrying a pending command)
 *   d/{id}/commands       GET, Observe  next C2D message (Lock-Token option) or 2.05 empty;
 *                         DELETE ?lock=T[&reject], POST ?lock=T&abandon
 *   d/{id}/twin           GET           the device view of the twin
 *   d/{id}/twin/reported  POST          reported-properties patch
 *   d/{id}/twin/desired   GET, Observe  desired properties
 *   d/{id}/methods        GET, Observe  method calls; POST ?rid=R&status=S answers one
 *
 * libcoap is driven from the sd-event loop through coap_context_get_coap_fd(). Runs on the
 * loop thread; only gw_coap_new() blocks (socket set-up). */

#include <stdint.h>

#include <systemd/sd-event.h>

struct gw_hub;
struct gw_config;
struct gw_coap;

/* CoAP option numbers of our own (experimental range, elective: devices may ignore them). */
#define GW_COAP_OPTION_LOCK_TOKEN 65000 /* C2D lock token (text) */
#define GW_COAP_OPTION_PROPERTIES 65004 /* C2D property bag, as in the MQTT devicebound topic */

struct gw_coap_stats {
        uint64_t sessions_open;      /* gauge: authenticated sessions */
        uint64_t handshakes_ok, handshakes_failed, unknown_identities;
        uint64_t messages_in, messages_in_bytes, duplicates;
        uint64_t c2d_delivered, methods_delivered;
        uint64_t throttled, rejected;
};

/* Starts CoAP server mode when cfg->coap is set (else *ret = NULL and 0). Logs and returns
 * -errno (-EINVAL / -EADDRINUSE ... for a bad listen address). */
int gw_coap_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, struct gw_coap **ret);
/* Closes every session (they unregister) and the endpoints. Before the hub is freed.
 * Accepts NULL; returns NULL. */
struct gw_coap *gw_coap_free(struct gw_coap *c);

/* Bound port of endpoint i (plain UDP endpoints first, then DTLS), 0 when there is none. */
uint16_t gw_coap_get_port(const struct gw_coap *c, size_t i);
const struct gw_coap_stats *gw_coap_get_stats(const struct gw_coap *c);
