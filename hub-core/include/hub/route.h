/* SPDX-License-Identifier: MIT */
#pragma once

/* Message routing (reference §8.1, §8.6): a route table compiled once from the
 * configuration and then evaluated, read-only, against each message leaving the outbox.
 *
 * - A route has a name (1..64 of [A-Za-z0-9._-], unique), a source (DeviceMessages,
 *   TwinChangeEvents, DeviceLifecycleEvents, DeviceConnectionStateEvents), a condition in the
 *   routing language of hub/query.h (missing = true), endpoint names and an enabled flag.
 * - A message's source is its iothub-message-source system property (absent or "Telemetry"
 *   means DeviceMessages). Routes of other sources never see it.
 * - The fallback route applies only to DeviceMessages that matched no enabled route (of any
 *   endpoint) and sends them to its endpoints (default: "events"). Non-telemetry sources
 *   produce nothing unless a route for that source exists.
 * - hub_router_route() returns a *set* of endpoints: a message matching several routes to the
 *   same endpoint is delivered there once.
 * - Enrichments (key, value, endpoint names) stamp application properties on messages
 *   leaving to those endpoints: a static string, `$iothubname` (the hub's name), or a twin
 *   path (`$twin.tags.*`, `$twin.properties.desired.*`, `$twin.properties.reported.*`) whose
 *   value is stamped as text (strings as they are, anything else as compact JSON); when the
 *   path does not exist the literal path itself is stamped. A message over 256 KB after
 *   enrichment is refused (-E2BIG): the caller drops it and counts it (IoT Hub does the same).
 *
 * A router is immutable once built (after the last hub_router_add_*() call) and may then be
 * evaluated from several threads. Nothing blocks. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "hub/macro.h"
#include "hub/query.h"

struct hub_msg;
struct hub_router;

#define HUB_ROUTE_NAME_MAX 64u
#define HUB_ROUTER_MAX_ROUTES 100u      /* IoT Hub's limit (paid tiers) */
#define HUB_ROUTER_MAX_ENRICHMENTS 10u  /* IoT Hub's limit */
#define HUB_ROUTER_MAX_ENDPOINTS 64u    /* distinct endpoint names (the result is a 64-bit set) */
#define HUB_ROUTER_FALLBACK_NAME "$fallback"

enum hub_route_source {
        HUB_ROUTE_SOURCE_DEVICE_MESSAGES,
        HUB_ROUTE_SOURCE_TWIN_CHANGE_EVENTS,
        HUB_ROUTE_SOURCE_DEVICE_LIFECYCLE_EVENTS,
        HUB_ROUTE_SOURCE_DEVICE_CONNECTION_STATE_EVENTS,
        _HUB_ROUTE_SOURCE_MAX,
};

/* "DeviceMessages", ... ; NULL out of range. */
HUB_EXPORT const char *hub_route_source_to_string(enum hub_route_source s);
/* Exact (case-sensitive) configuration names. -EINVAL when unknown. */
HUB_EXPORT int hub_route_source_from_string(const char *s, enum hub_route_source *ret);
/* The source of a message, from its iothub-message-source. -EINVAL for an unknown value. */
HUB_EXPORT int hub_route_source_of_msg(const struct hub_msg *m, enum hub_route_source *ret);

/* Route names and enrichment keys: 1..64 of [A-Za-z0-9._-]. */
HUB_EXPORT bool hub_route_name_is_valid(const char *s);

struct hub_route_def {
        const char *name;
        enum hub_route_source source;
        const char *condition;            /* NULL or empty = true */
        const char *const *endpoints;     /* endpoint names, at least one */
        size_t n_endpoints;
        bool enabled;
};

struct hub_enrichment_def {
        const char *key;
        const char *value;                /* static text, "$iothubname" or "$twin.<path>" */
        const char *const *endpoints;
        size_t n_endpoints;
};

/* A new, empty router for the hub called hub_name (for `$iothubname`), with the fallback
 * route enabled to "events". -EINVAL, -ENOMEM. */
HUB_EXPORT int hub_router_new(const char *hub_name, struct hub_router **ret);
HUB_EXPORT struct hub_router *hub_router_free(struct hub_router *r); /* accepts NULL, returns NULL */
DEFINE_CLEANUP_FUNC(struct hub_router *, hub_router_free);

/* Adds a route (copies everything). Returns 0; -EINVAL for a bad name, source or empty
 * endpoint list; -EEXIST for a duplicate name; -EBADMSG when the condition does not parse,
 * with *err filled (err may be NULL: offset, line and column are inside the condition text);
 * -E2BIG over HUB_ROUTER_MAX_ROUTES routes or HUB_ROUTER_MAX_ENDPOINTS endpoint names;
 * -ENOMEM. */
HUB_EXPORT int hub_router_add_route(struct hub_router *r, const struct hub_route_def *def, struct hub_query_error *err);

/* Configures the fallback route: enabled or not, and its endpoints (NULL/0 = "events").
 * -E2BIG, -ENOMEM, -EINVAL (an empty or invalid endpoint name). */
HUB_EXPORT int hub_router_set_fallback(struct hub_router *r, bool enabled, const char *const *endpoints, size_t n);

/* Adds an enrichment. -EINVAL (bad key, empty endpoint list, a `$twin` value outside tags /
 * properties.desired / properties.reported, a `$`-value that is neither `$iothubname` nor a
 * twin path), -EEXIST (the same key twice for one endpoint), -E2BIG, -ENOMEM. */
HUB_EXPORT int hub_router_add_enrichment(struct hub_router *r, const struct hub_enrichment_def *def);

/* The index (0..HUB_ROUTER_MAX_ENDPOINTS-1) of an endpoint name in hub_router_route()'s set,
 * or -ENOENT when no route, fallback or enrichment names it. */
HUB_EXPORT int hub_router_endpoint_index(const struct hub_router *r, const char *endpoint);
/* Number of distinct endpoint names, and the name of index i (NULL out of range). */
HUB_EXPORT size_t hub_router_n_endpoints(const struct hub_router *r);
HUB_EXPORT const char *hub_router_endpoint_name(const struct hub_router *r, size_t i);
HUB_EXPORT size_t hub_router_n_routes(const struct hub_router *r);

/* Whether any condition or enrichment may refer to `$twin` (then the caller loads the
 * sender's twin into the context before routing; otherwise it may pass NULL). */
HUB_EXPORT bool hub_router_needs_twin(const struct hub_router *r);

/* Evaluates every enabled route of the message's source against ctx (its msg must be set;
 * its twin is the sender's twin or NULL) and the fallback. Returns the set of endpoint
 * indices (bit i = hub_router_endpoint_index() i) the message goes to; 0 when it goes
 * nowhere (or its source is unknown). ret_matched_route, when not NULL, receives the number
 * of enabled routes (not the fallback) that matched. Never fails. */
HUB_EXPORT uint64_t hub_router_route(const struct hub_router *r, struct hub_cond_ctx *ctx, unsigned *ret_matched_routes);

/* Applies the enrichments of endpoint to m (which the caller owns privately: it is
 * modified) using the twin of ctx. Returns the number of properties stamped, -E2BIG when the
 * message would exceed 256 KB (m is then left partially enriched: drop it), -ENOMEM. */
HUB_EXPORT int hub_router_enrich(const struct hub_router *r, const char *endpoint, struct hub_msg *m,
                                 struct hub_cond_ctx *ctx);
