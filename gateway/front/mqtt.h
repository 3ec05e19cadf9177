/* SPDX-License-Identifier: MIT */
#pragma once

/* The hub's MQTT 3.1.1 device interface (reference §2): listeners on gateway/net (TLS by
 * default, port 8883), CONNECT with SAS tokens or X.509 client certificates, D2C telemetry
 * acknowledged only once durable in the outbox, C2D from the durable per-device queues, twins
 * and direct methods through the device-session interface of hub-core (hub/session.h).
 *
 * Runs on the daemon's loop thread; nothing here blocks except gw_mqtt_new() (certificate
 * generation, CA files). */

#include <stddef.h>
#include <stdint.h>

#include <systemd/sd-event.h>

struct gw_hub;
struct gw_config;
struct gw_mqtt;

/* Counters for the metrics endpoint (monotonic unless marked gauge). */
struct gw_mqtt_stats {
        uint64_t connections_accepted;  /* TCP/TLS connections opened */
        uint64_t connections_open;      /* gauge: connections currently open */
        uint64_t sessions_open;         /* gauge: authenticated (CONNACK 0) connections */
        uint64_t connects_accepted;     /* CONNACK 0 */
        uint64_t connects_refused;      /* CONNACK != 0 */
        uint64_t auth_failures;         /* CONNACK 0x04 / 0x05 */
        uint64_t protocol_errors;       /* connections closed for a protocol violation */
        uint64_t messages_in;           /* D2C telemetry PUBLISHes accepted (QoS 0 and 1) */
        uint64_t messages_in_bytes;     /* their payload bytes */
        uint64_t messages_acked;        /* PUBACKs sent for durable D2C messages */
        uint64_t messages_out;          /* hub -> device PUBLISHes (C2D, twin, methods) */
        uint64_t c2d_completed;         /* C2D messages completed by a device PUBACK */
        uint64_t throttled;             /* times a connection was slowed down (rate limit) */
        uint64_t closed_by_hub;         /* takeover, disabled, deleted, keys changed */
        uint64_t wills;                 /* Will messages injected */
};

/* Starts the MQTT listeners of cfg (mqtt.listen; none when the section is absent or
 * listen is empty) with TLS from mqtt.tls, or the generated certificate of state_dir shared
 * with the service API, and the X.509 CA files of hub.x509_ca_files. host_names (NULL
 * terminated: host_name then the aliases) is borrowed and must outlive the front-end.
 * Returns 0 and *ret, or -errno after logging why. Blocks (files, key generation). */
int gw_mqtt_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, const char *state_dir,
                char *const *host_names, struct gw_mqtt **ret);
/* Closes every connection (their sessions unregister, C2D locks are released) and the
 * listeners. Must run before the hub is freed. Accepts NULL; returns NULL. */
struct gw_mqtt *gw_mqtt_free(struct gw_mqtt *m);

/* Reload: takes the new host names (borrowed, as for gw_mqtt_new()); listeners, TLS and
 * limits keep their values until a restart (logged when they changed). */
void gw_mqtt_reconfigure(struct gw_mqtt *m, const struct gw_config *cfg, char *const *host_names);

/* The C2D queue of device_id has something deliverable again (queue hook on_available). */
void gw_mqtt_c2d_available(struct gw_mqtt *m, const char *device_id);

/* Bound port of listener i (0 when there is none). */
uint16_t gw_mqtt_get_port(const struct gw_mqtt *m, size_t i);
/* Borrowed; valid until gw_mqtt_free(). */
const struct gw_mqtt_stats *gw_mqtt_get_stats(const struct gw_mqtt *m);
