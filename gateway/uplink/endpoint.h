/* SPDX-License-Identifier: MIT */
#pragma once

/* The endpoint framework: every route endpoint (mqtt, http, file, and later the cloud
 * `upstream`) reads the outbox through its own durable cursor and only differs in its
 * transport, an ops table below.
 *
 * The framework (uplink.c) owns the reading: it reads batches after what it has already
 * handed out, routes each message (the route conditions, with the sender's twin for `$twin`
 * references), applies the endpoint's enrichments, and hands the messages routed to this
 * endpoint to the transport's send(). The transport reports each message's outcome with
 * gw_endpoint_confirm() once the far side confirmed it; the cursor moves (durably, through
 * hub_outbox_ack()) over every message up to the first one not yet confirmed, so delivery is
 * at-least-once and in order. The in-flight window bounds what is sent and not confirmed.
 *
 * State machine:   STOPPED → CONNECTING → UP ⇄ (send, confirm)
 *                                  ↑         ↓ gw_endpoint_down()
 *                                  └─ BACKOFF (retry.initial doubling to retry.max, ±25% jitter capped at retry.max)
 * While in BACKOFF an endpoint with a host:port is probed (gw_tcp_probe below): when its far
 * side accepts TCP connections again after an outage, the next attempt starts at once instead
 * of at the end of the backoff; a far side that answers TCP but refuses above it keeps the
 * backoff.
 * Going down forgets everything unconfirmed: the next connection resends from the cursor
 * (duplicates possible, nothing lost). An endpoint that is down never blocks the others:
 * each has its own cursor, and the outbox's capacity policy (drop-oldest / reject-new)
 * bounds what it holds.
 *
 * Every callback runs on the loop thread. A transport whose library calls back from its own
 * threads (paho) hands results to the loop itself (an eventfd inbox) before calling these. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "uplink-config.h"

struct gw_endpoint;
struct gw_hub;
struct hub_msg;
struct sd_event;

/* One message handed to a transport; borrowed for the duration of send() only. */
struct gw_ep_item {
        uint64_t seq;
        uint64_t enqueued_usec;   /* wall clock */
        const char *device_id;
        const char *module_id;    /* NULL for devices */
        struct hub_msg *msg;      /* enriched */
};

struct gw_endpoint_ops {
        const char *type;
        /* Creates the transport's state for ep from conf (borrowed during the call). No I/O
         * yet. -errno (logged by the framework). */
        int (*create)(struct gw_endpoint *ep, const struct gw_endpoint_conf *conf, void **ret);
        /* Starts connecting. Later (or from within) calls gw_endpoint_up() or
         * gw_endpoint_down(). A negative return counts as down. */
        int (*connect)(void *t);
        /* Sends n >= 1 items in order. Each gets gw_endpoint_confirm() later (or from within).
         * A negative return means the connection is unusable (the framework goes down). */
        int (*send)(void *t, const struct gw_ep_item *items, size_t n);
        /* Drops the connection (after gw_endpoint_down(), or before destroy). Outstanding
         * confirmations may still arrive and are ignored. */
        void (*disconnect)(void *t);
        void (*destroy)(void *t);
};

/* Appends the JSON line of it (uplink-json.h's shape, compact, with its '\n') to the growable
 * buffer *buf (capacity *cap, *len bytes used; realloc'd as needed, the caller frees it).
 * -ENOMEM leaves *len as it was. (endpoint-file.c) */
int gw_endpoint_json_append(const struct gw_ep_item *it, const char *endpoint, char **buf, size_t *len, size_t *cap);

extern const struct gw_endpoint_ops gw_endpoint_file_ops;
extern const struct gw_endpoint_ops gw_endpoint_mqtt_ops;
extern const struct gw_endpoint_ops gw_endpoint_http_ops;
extern const struct gw_endpoint_ops gw_endpoint_upstream_ops;

/* For transports. */
void gw_endpoint_up(struct gw_endpoint *ep);
/* error: -errno; why: a short text for the log and `fieldhubctl endpoints` (copied). */
void gw_endpoint_down(struct gw_endpoint *ep, int error, const char *why);
/* The far side confirmed (result >= 0) or refused (result < 0: the framework goes down and
 * resends later; a transport that knows a message will never be accepted logs it and
 * confirms it with 0 after counting it as poison, see gw_endpoint_count_poison()). */
void gw_endpoint_confirm(struct gw_endpoint *ep, uint64_t seq, int result);
void gw_endpoint_count_poison(struct gw_endpoint *ep, uint64_t seq, const char *why);
const char *gw_endpoint_name(const struct gw_endpoint *ep);
struct sd_event *gw_endpoint_event(const struct gw_endpoint *ep);
/* The hub the endpoint's uplink serves (for transports that also carry traffic down: upstream). */
struct gw_hub *gw_endpoint_hub(const struct gw_endpoint *ep);

/* ---- the TCP reachability probe (uplink.c) -------------------------------------------------
 *
 * While an endpoint cannot reach its far side, its retries wait for a backoff of up to
 * retry.max; the probe shortens the wait after an outage: every GW_TCP_PROBE_PERIOD_USEC a
 * non-blocking TCP connect to the far side's host:port on the event loop, closed as soon as it
 * is answered (no TLS, no MQTT / HTTP: nothing the far side counts as a connection attempt).
 * The framework runs one for every endpoint with a host:port (mqtt `address`, http `url`)
 * while it is down; upstream runs one for its devices.
 *
 * The first probe that succeeds calls reachable(ud, was_down) and stops the probe. was_down
 * is true when an earlier probe of this run had failed (a real outage that is now over: retry
 * at once) and false when the address answered from the first probe on (the far side is
 * there but dropped or refused the connection above TCP, a CONNACK refusal or a TLS error:
 * keep the backoff, so a far side that refuses is not hammered). A probe connect unanswered
 * for GW_TCP_PROBE_TIMEOUT_USEC counts as failed. Host names are resolved without blocking
 * (getaddrinfo_a) once per start. Loop thread only. */
#define GW_TCP_PROBE_PERIOD_USEC UINT64_C(100000)  /* 100 ms */
#define GW_TCP_PROBE_TIMEOUT_USEC UINT64_C(3000000) /* 3 s */

struct gw_tcp_probe;
typedef void (*gw_tcp_probe_reachable_fn)(void *ud, bool was_down);
/* wanted (optional) is asked before every probe: false stops the probe quietly. host and port
 * are copied. -errno (memory, sd-event). */
int gw_tcp_probe_new(struct sd_event *e, const char *host, const char *port, gw_tcp_probe_reachable_fn reachable,
                     bool (*wanted)(void *ud), void *ud, struct gw_tcp_probe **ret);
/* Starts probing (the first probe one period from now); nothing if it already runs. */
void gw_tcp_probe_start(struct gw_tcp_probe *p);
void gw_tcp_probe_stop(struct gw_tcp_probe *p);
bool gw_tcp_probe_running(const struct gw_tcp_probe *p);
/* "host:port", for logs. */
const char *gw_tcp_probe_target(const struct gw_tcp_probe *p);
/* Accepts NULL; returns NULL. Waits for a name lookup under way (bounded by the resolver's
 * timeouts) so that it never writes into freed memory. */
struct gw_tcp_probe *gw_tcp_probe_free(struct gw_tcp_probe *p);
/* Host and port of an endpoint address or URL: scheme://host[:port][/...] or host:port, with
 * [v6] literals; the port defaults by scheme (tcp, mqtt: 1883; ssl, mqtts: 8883; ws, http: 80;
 * wss, https: 443). -EINVAL if there is no host or no known default port; -ENOMEM. */
int gw_address_host_port(const char *address, char **ret_host, char **ret_port);
