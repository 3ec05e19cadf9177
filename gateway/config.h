/* SPDX-License-Identifier: MIT */
#pragma once

/* fieldhub's configuration: /etc/fieldhub/fieldhub.yaml plus conf.d/<name>.yaml fragments, read
 * into a positioned tree (adapter/conf.h) and validated completely, every error collected,
 * before anything starts. configs/README.md documents every key. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <syslog.h>

#include "adapter/conf.h"
#include "hub/macro.h"

enum gw_log_target {
        GW_LOG_TARGET_AUTO,     /* journald when $JOURNAL_STREAM says so, else stderr */
        GW_LOG_TARGET_JOURNAL,
        GW_LOG_TARGET_STDERR,
        _GW_LOG_TARGET_MAX,
};

/* A shared access policy's keys (base64 text, as read from the key files). */
struct gw_policy_key {
        char *name;             /* iothubowner, service, device, registryRead, registryReadWrite */
        char *primary_key;
        char *secondary_key;    /* may be NULL */
};

/* One item of `adapters:`. node borrows from gw_config.tree: the whole item, type and name
 * included, for the adapter to read its own keys from. */
struct gw_adapter_conf {
        char *type;
        char *name;
        const struct adp_conf_node *node;
};

/* An adapter type compiled into this build: validate() checks the item's keys (it must
 * allow `type` and `name`) and adds every problem to e; returns 0 or -EINVAL. */
struct gw_adapter_type {
        const char *name;
        int (*validate)(const struct adp_conf_node *item, struct adp_conf_errors *e);
};

/* NULL-terminated (a sentinel with name == NULL) table of the adapter types in this build. */
extern const struct gw_adapter_type gw_adapter_types[];

struct gw_routing_conf;
struct gw_coap_conf;

struct gw_config {
        char *host_name;                        /* hub.host_name (required) */
        char **host_aliases;                    /* hub.host_aliases, NULL-terminated, never NULL */
        char *state_dir;                        /* state_dir */
        int log_level;                          /* log.level, syslog priority */
        enum gw_log_target log_target;          /* log.target */
        uint64_t log_rate_interval_usec;        /* log.rate_limit.interval */
        unsigned log_rate_burst;                /* log.rate_limit.burst */
        uint64_t store_stall_timeout_usec;      /* store.stall_timeout */
        uint64_t store_group_interval_usec;     /* store.group_interval */
        bool store_check_on_start;              /* store.check_on_start */
        uint64_t store_max_size;                /* store.max_size: disk budget in bytes, 0 = none */
        char *admin_socket;                     /* admin.socket */
        struct gw_policy_key *policy_keys;      /* hub.policies */
        size_t n_policy_keys;
        struct gw_adapter_conf *adapters;       /* adapters */
        size_t n_adapters;
        /* service_api: (absent = disabled) */
        bool api_enabled;
        char **api_listen;                      /* service_api.listen, NULL-terminated */
        char *api_cert_file;                    /* service_api.tls.cert_file (NULL: generated) */
        char *api_key_file;                     /* service_api.tls.key_file */
        char *api_client_ca_file;               /* service_api.tls.client_ca_file */
        bool api_allow_plaintext;               /* service_api.allow_plaintext (false: TLS) */
        unsigned api_max_connections;           /* service_api.limits.max_connections */
        unsigned api_max_connections_per_address;
        uint64_t api_handshake_timeout_usec;
        uint64_t api_idle_timeout_usec;
        uint64_t api_request_timeout_usec;
        uint64_t api_max_header_bytes;
        uint64_t api_max_body_bytes;
        /* mqtt: (absent = disabled; gateway/front/mqtt.c) */
        bool mqtt_enabled;
        char **mqtt_listen;                     /* mqtt.listen, NULL-terminated */
        char *mqtt_cert_file;                   /* mqtt.tls.cert_file (NULL: the generated one) */
        char *mqtt_key_file;                    /* mqtt.tls.key_file */
        bool mqtt_allow_plaintext;              /* mqtt.allow_plaintext */
        unsigned mqtt_max_connections;          /* mqtt.limits.max_connections */
        unsigned mqtt_max_connections_per_address;
        unsigned mqtt_max_inflight;             /* mqtt.limits.max_inflight (inbound QoS 1 and C2D window) */
        uint64_t mqtt_max_packet_bytes;         /* mqtt.limits.max_packet_bytes */
        uint64_t mqtt_max_keep_alive_timeout_usec; /* mqtt.limits.max_keep_alive_timeout */
        uint64_t mqtt_handshake_timeout_usec;   /* mqtt.limits.handshake_timeout */
        uint64_t mqtt_connect_timeout_usec;     /* mqtt.limits.connect_timeout */
        uint32_t mqtt_max_messages_per_second;  /* mqtt.limits.max_messages_per_second (0 = no limit) */
        char **x509_ca_files;                   /* hub.x509_ca_files, NULL-terminated, never NULL */
        /* service_api.tls.client_cert: request client certificates (X.509 devices over HTTP) */
        bool api_client_cert_optional;          /* "optional" (default) or "none" */
        /* http_device: (device routes of reference §3 on the service_api listeners; api/api-device.c) */
        bool http_device_enabled;               /* http_device.enabled (default true) */
        uint32_t http_device_max_messages_per_second; /* http_device.limits.max_messages_per_second (0 = no limit) */
        uint64_t http_device_max_shaping_delay_usec;  /* http_device.limits.max_shaping_delay */
        /* file_upload: (reference §3.5; api/api-device.c) */
        uint64_t file_upload_quota_bytes;       /* file_upload.quota */
        uint64_t file_upload_max_file_bytes;    /* file_upload.max_file */
        uint64_t file_upload_sas_ttl_usec;      /* file_upload.sas_ttl */
        uint32_t file_upload_max_concurrent;    /* file_upload.max_concurrent (per device) */
        /* metrics: */
        char *metrics_listen;                   /* metrics.listen (NULL: disabled) */
        bool metrics_allow_non_loopback;        /* metrics.allow_non_loopback */
        /* c2d: and feedback: (queue options; 0 = hub-core's default) */
        uint64_t c2d_default_ttl_usec, c2d_max_ttl_usec, c2d_lock_timeout_usec;
        uint32_t c2d_max_delivery_count, c2d_max_queue_depth, c2d_max_lock_expiries;
        uint64_t feedback_ttl_usec, feedback_lock_timeout_usec;
        uint32_t feedback_max_delivery_count;
        struct gw_routing_conf *routing;        /* endpoints, routes, fallback_route, enrichments, logs_dir (uplink/uplink-config.h) */
        struct gw_coap_conf *coap;              /* coap: CoAP server mode (front/coap-config.h); NULL = off */
        struct adp_conf_node *tree;             /* the merged tree, kept for the adapters' subtrees */
        char **sources;                         /* files read, in order (main, then conf.d), NULL-terminated */
};

/* Defaults and limits (configs/README.md states the same). */
#define GW_CONFIG_LOG_RATE_INTERVAL_DEFAULT_USEC (UINT64_C(30) * 1000000)
#define GW_CONFIG_LOG_RATE_INTERVAL_MIN_USEC (UINT64_C(1) * 1000000)
#define GW_CONFIG_LOG_RATE_INTERVAL_MAX_USEC (UINT64_C(3600) * 1000000)
#define GW_CONFIG_LOG_RATE_BURST_DEFAULT 10u
#define GW_CONFIG_LOG_RATE_BURST_MAX 10000u
#define GW_CONFIG_STALL_TIMEOUT_DEFAULT_USEC (UINT64_C(10) * 1000000)
#define GW_CONFIG_STALL_TIMEOUT_MIN_USEC (UINT64_C(1) * 1000000)
#define GW_CONFIG_STALL_TIMEOUT_MAX_USEC (UINT64_C(600) * 1000000)
#define GW_CONFIG_GROUP_INTERVAL_DEFAULT_USEC UINT64_C(2000)
#define GW_CONFIG_GROUP_INTERVAL_MAX_USEC (UINT64_C(100) * 1000)
#define GW_CONFIG_API_LISTEN_DEFAULT "0.0.0.0:443"
#define GW_CONFIG_API_MAX_CONNECTIONS_DEFAULT 1000u
#define GW_CONFIG_API_MAX_CONNECTIONS_PER_ADDRESS_DEFAULT 100u
#define GW_CONFIG_API_HANDSHAKE_TIMEOUT_DEFAULT_USEC (UINT64_C(10) * 1000000)
#define GW_CONFIG_API_IDLE_TIMEOUT_DEFAULT_USEC (UINT64_C(120) * 1000000)
#define GW_CONFIG_API_REQUEST_TIMEOUT_DEFAULT_USEC (UINT64_C(30) * 1000000)
#define GW_CONFIG_API_MAX_HEADER_BYTES_DEFAULT (UINT64_C(32) * 1024)
#define GW_CONFIG_API_MAX_BODY_BYTES_DEFAULT (UINT64_C(1024) * 1024)
#define GW_CONFIG_MQTT_LISTEN_DEFAULT "0.0.0.0:8883"
#define GW_CONFIG_MQTT_MAX_CONNECTIONS_DEFAULT 10000u
#define GW_CONFIG_MQTT_MAX_CONNECTIONS_PER_ADDRESS_DEFAULT 100u
#define GW_CONFIG_MQTT_MAX_INFLIGHT_DEFAULT 16u
/* = GW_MQTT_DEVICE_MAX_PACKET of front/mqtt-codec.h: a QoS 1 PUBLISH of 256 KB with the longest topic */
#define GW_CONFIG_MQTT_MAX_PACKET_DEFAULT (UINT64_C(1) + 3 + 2 + 65535 + 2 + 256 * 1024)
#define GW_CONFIG_MQTT_MAX_PACKET_LIMIT (UINT64_C(16) * 1024 * 1024)
#define GW_CONFIG_MQTT_MAX_KEEP_ALIVE_TIMEOUT_DEFAULT_USEC (UINT64_C(1767) * 1000000)
#define GW_CONFIG_MQTT_HANDSHAKE_TIMEOUT_DEFAULT_USEC (UINT64_C(10) * 1000000)
#define GW_CONFIG_MQTT_CONNECT_TIMEOUT_DEFAULT_USEC (UINT64_C(10) * 1000000)
#define GW_CONFIG_HTTP_DEVICE_MAX_MESSAGES_PER_SECOND_DEFAULT 100u
#define GW_CONFIG_HTTP_DEVICE_MAX_SHAPING_DELAY_DEFAULT_USEC (UINT64_C(1) * 1000000)
#define GW_CONFIG_FILE_UPLOAD_QUOTA_DEFAULT (UINT64_C(1) << 30)
#define GW_CONFIG_FILE_UPLOAD_MAX_FILE_DEFAULT (UINT64_C(256) << 20)
#define GW_CONFIG_FILE_UPLOAD_SAS_TTL_DEFAULT_USEC (UINT64_C(3600) * 1000000)
#define GW_CONFIG_FILE_UPLOAD_MAX_CONCURRENT_DEFAULT 10u
#define GW_CONFIG_POLICY_KEY_MIN_BYTES 16
#define GW_CONFIG_POLICY_KEY_MAX_BYTES 64

/* Loads path, then every *.yaml in confd_dir (NULL = "<dirname(path)>/conf.d"; a missing
 * directory is fine) in lexical order, merged on top; validates everything, collecting
 * all errors into e; reads the secrets. Returns 0 with *ret a new config; -EINVAL with the
 * errors in e; another -errno (-ENOENT, -EACCES, ...) with an error line in e when the main
 * file or the conf.d directory cannot be read; -ENOMEM. Blocks on file reads only. */
int gw_config_load(const char *path, const char *confd_dir, struct gw_config **ret, struct adp_conf_errors *e);

/* Validates an already parsed (and merged) tree. Always takes tree: on success it is kept in
 * (*ret)->tree, on failure freed. sources stays NULL-terminated-empty. Returns 0, -EINVAL
 * with errors in e, -ENOMEM. (Used by gw_config_load() and the fuzzer.) */
int gw_config_from_tree(struct adp_conf_node *tree, struct gw_config **ret, struct adp_conf_errors *e);

/* Wipes the secrets and frees everything. NULL-safe; returns NULL. */
struct gw_config *gw_config_free(struct gw_config *c);
DEFINE_CLEANUP_FUNC(struct gw_config *, gw_config_free);

/* "info" → LOG_INFO (names: emerg alert crit err warning notice info debug), also "0".."7".
 * Returns the level or -EINVAL. */
int gw_log_level_from_string(const char *s);
/* LOG_INFO → "info"; NULL when out of range. */
const char *gw_log_level_to_string(int level);

/* A DNS host name as the hub answers to: labels of 1..63 of [A-Za-z0-9-] not starting or
 * ending with '-', total at most 253. Does not require a dot. */
bool gw_host_name_is_valid(const char *s);
