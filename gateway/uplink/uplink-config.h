/* SPDX-License-Identifier: MIT */
#pragma once

/* The routing part of the configuration: `endpoints:`, `routes:`, `fallback_route:`,
 * `enrichments:` and `logs_dir:` (configs/README.md, "Routing and endpoints"). Parsed and
 * validated completely at configuration time — every condition is parsed, every endpoint
 * name checked, secrets read — so that the daemon only builds what was validated. Lives in
 * gwcore (no transport libraries), so `fieldhubd --check-config` and the fuzzer see it. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapter/conf.h"
#include "hub/outbox.h"
#include "hub/route.h"

#define GW_LOGS_DIR_DEFAULT "/var/log/fieldhub"
#define GW_ENDPOINTS_MAX 10u /* custom endpoints, as IoT Hub */

enum gw_endpoint_type {
        GW_ENDPOINT_MQTT,
        GW_ENDPOINT_HTTP,
        GW_ENDPOINT_FILE,
        GW_ENDPOINT_UPSTREAM,
        _GW_ENDPOINT_TYPE_MAX,
};

enum gw_file_fsync {
        GW_FILE_FSYNC_BATCH,  /* fsync after each batch, before the cursor moves (default) */
        GW_FILE_FSYNC_NEVER,  /* the page cache is trusted: a power cut may lose acknowledged lines */
        _GW_FILE_FSYNC_MAX,
};

struct gw_header {
        char *name;
        char *value;          /* secret values are wiped on free */
        bool secret;
};

/* An upstream identity: a local device that connects to the cloud hub as itself. */
struct gw_upstream_device {
        char *id;
        char *key;            /* base64 SAS key (secret, wiped on free) */
};

struct gw_endpoint_conf {
        char *name;
        enum gw_endpoint_type type;
        struct hub_outbox_endpoint_options queue; /* queue.{max_messages,max_bytes,overflow,ttl} */
        unsigned batch_max;           /* batch.max_messages */
        uint64_t batch_delay_usec;    /* batch.max_delay (http) */
        unsigned inflight;            /* messages sent and not yet confirmed */
        uint64_t retry_initial_usec, retry_max_usec;
        uint64_t timeout_usec;        /* connect / request timeout */
        /* mqtt */
        char *address;                /* tcp://host:port, ssl://host:port */
        char *client_id;
        char *topic;                  /* template: {deviceId} {moduleId} {endpoint} and {<property>} */
        unsigned qos;
        char *username;
        char *password;               /* secret */
        char *ca_file, *cert_file, *key_file;
        uint64_t keep_alive_usec;
        /* http */
        char *url;
        struct gw_header *headers;
        size_t n_headers;
        bool tls_insecure_skip_verify; /* http: tls.verify: false (tests only; logged) */
        bool client_error_skip;       /* http: on_client_error: skip (else retry) */
        unsigned client_error_tries;  /* http: client_error_tries (tries of one message before skip) */
        /* file */
        char *path;                   /* absolute: logs_dir/<file> */
        uint64_t max_size;
        unsigned max_files;
        enum gw_file_fsync fsync;
        /* upstream (also uses ca_file, keep_alive_usec, timeout_usec) */
        char *host_name;              /* the cloud hub's name: SAS sr, MQTT user name */
        char *gateway_host;           /* where to connect (default host_name) */
        unsigned port;                /* default 8883 */
        uint64_t token_ttl_usec;      /* SAS tokens' lifetime; renewed at 80% by reconnecting */
        struct gw_upstream_device *devices;
        size_t n_devices;
        char *create_policy;          /* create_missing.policy: a policy with RegistryWrite (NULL: off) */
        char *create_key;             /* its key (secret) */
        unsigned create_port;         /* create_missing.port: the cloud's HTTPS port (default 443) */
        /* Everything that requires a new transport when it changes, as text. */
        char *fingerprint;
};

struct gw_route_conf {
        char *name;
        enum hub_route_source source;
        char *condition;
        char **endpoints;
        size_t n_endpoints;
        bool enabled;
};

struct gw_enrichment_conf {
        char *key;
        char *value;
        char **endpoints;
        size_t n_endpoints;
};

struct gw_routing_conf {
        struct gw_endpoint_conf *endpoints;
        size_t n_endpoints;
        struct gw_route_conf *routes;
        size_t n_routes;
        struct gw_enrichment_conf *enrichments;
        size_t n_enrichments;
        bool fallback_enabled;
        char **fallback_endpoints;
        size_t n_fallback_endpoints;
        char *logs_dir;
};

/* Reads the routing keys of the root mapping, adding every problem to e. Returns 0 with *ret
 * (always set on success, also when no key is present), -EINVAL after errors, -ENOMEM. */
int gw_routing_conf_parse(const struct adp_conf_node *root, struct gw_routing_conf **ret, struct adp_conf_errors *e);
struct gw_routing_conf *gw_routing_conf_free(struct gw_routing_conf *c);
DEFINE_CLEANUP_FUNC(struct gw_routing_conf *, gw_routing_conf_free);

/* Builds the router of a validated configuration. -errno (not expected after validation). */
int gw_routing_conf_router(const struct gw_routing_conf *c, const char *hub_name, struct hub_router **ret);

const char *gw_endpoint_type_to_string(enum gw_endpoint_type t);
const struct gw_endpoint_conf *gw_routing_conf_endpoint(const struct gw_routing_conf *c, const char *name);
