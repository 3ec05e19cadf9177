/* SPDX-License-Identifier: MIT */
/* fieldhub's configuration schema: which keys exist, their types, defaults and ranges, and
 * how conf.d fragments are found and merged. Every check adds to the error collector and
 * carries on, so that one --check-config run lists every problem. configs/README.md is the
 * user-facing description of the same schema: keep them in step. */

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <mbedtls/base64.h>

#include "adp-modbus.h"
#include "adp-serial.h"
#include "adp-coap.h"
#include "config.h"
#include "hub/store.h"
#include "uplink/uplink-config.h"
#include "front/coap-config.h"
#include "fieldhub-paths.h"
#include "hub/clock.h"
#include "hub/queue.h"
#include "net/net.h"

/* No adapter is compiled in yet; the Modbus, CoAP and serial adapters add their entries. */
const struct gw_adapter_type gw_adapter_types[] = {
        { "modbus", adp_modbus_validate },
        { "serial", adp_serial_validate },
        { "coap", adp_coap_validate },
        { NULL, NULL },
};

static const char *const log_level_names[] = {
        [LOG_EMERG] = "emerg", [LOG_ALERT] = "alert",   [LOG_CRIT] = "crit", [LOG_ERR] = "err",
        [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice", [LOG_INFO] = "info", [LOG_DEBUG] = "debug",
        NULL,
};

int gw_log_level_from_string(const char *s) {
        if (!s)
                return -EINVAL;
        for (int i = 0; log_level_names[i]; i++)
                if (streq(s, log_level_names[i]))
                        return i;
        if (s[0] >= '0' && s[0] <= '7' && s[1] == 0)
                return s[0] - '0';
        return -EINVAL;
}

const char *gw_log_level_to_string(int level) {
        if (level < LOG_EMERG || level > LOG_DEBUG)
                return NULL;
        return log_level_names[level];
}

bool gw_host_name_is_valid(const char *s) {
        size_t label = 0, total = 0;
        char prev = 0;

        if (!s || !*s)
                return false;
        for (const char *p = s; *p; p++, total++) {
                char c = *p;
                if (c == '.') {
                        if (label == 0 || prev == '-')
                                return false;
                        label = 0;
                } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-') {
                        if (label == 0 && c == '-')
                                return false;
                        if (++label > 63)
                                return false;
                } else
                        return false;
                prev = c;
        }
        return label > 0 && prev != '-' && total <= 253;
}

static void strv_free(char **v) {
        for (size_t i = 0; v && v[i]; i++)
                free(v[i]);
        free(v);
}

static int strv_push(char ***v, size_t *n, const char *s) {
        char *d = strdup(s);
        if (!d)
                return -ENOMEM;
        char **nv = realloc(*v, (*n + 2) * sizeof(char *));
        if (!nv) {
                free(d);
                return -ENOMEM;
        }
        nv[(*n)++] = d;
        nv[*n] = NULL;
        *v = nv;
        return 0;
}

static void wipe_string(char *s) {
        if (s) {
                hub_explicit_bzero(s, strlen(s));
                free(s);
        }
}

struct gw_config *gw_config_free(struct gw_config *c) {
        if (!c)
                return NULL;
        free(c->host_name);
        strv_free(c->host_aliases);
        free(c->state_dir);
        free(c->admin_socket);
        strv_free(c->api_listen);
        free(c->api_cert_file);
        free(c->api_key_file);
        free(c->api_client_ca_file);
        free(c->metrics_listen);
        strv_free(c->mqtt_listen);
        free(c->mqtt_cert_file);
        free(c->mqtt_key_file);
        strv_free(c->x509_ca_files);
        for (size_t i = 0; i < c->n_policy_keys; i++) {
                free(c->policy_keys[i].name);
                wipe_string(c->policy_keys[i].primary_key);
                wipe_string(c->policy_keys[i].secondary_key);
        }
        free(c->policy_keys);
        for (size_t i = 0; i < c->n_adapters; i++) {
                free(c->adapters[i].type);
                free(c->adapters[i].name);
        }
        free(c->adapters);
        gw_routing_conf_free(c->routing);
        gw_coap_conf_free(c->coap);
        adp_conf_node_free(c->tree);
        strv_free(c->sources);
        free(c);
        return NULL;
}

/* ---- the schema ------------------------------------------------------------------------- */

static const char *const top_keys[] = { "hub",      "state_dir", "log",      "store", "admin",
                                        "adapters", "service_api", "metrics", "c2d",   "feedback", "mqtt", "coap",
                                        "endpoints", "routes", "fallback_route", "enrichments", "logs_dir",
                                        "http_device", "file_upload", NULL };
static const char *const mqtt_keys[] = { "listen", "tls", "allow_plaintext", "limits", NULL };
static const char *const mqtt_tls_keys[] = { "cert_file", "key_file", NULL };
static const char *const mqtt_limit_keys[] = { "max_connections", "max_connections_per_address", "max_inflight",
                                               "max_packet_bytes", "max_keep_alive_timeout", "handshake_timeout",
                                               "connect_timeout", "max_messages_per_second", NULL };
static const char *const api_keys[] = { "listen", "tls", "allow_plaintext", "limits", NULL };
static const char *const api_tls_keys[] = { "cert_file", "key_file", "client_ca_file", "client_cert", NULL };
static const char *const api_client_cert_modes[] = { "none", "optional", NULL };
static const char *const http_device_keys[] = { "enabled", "limits", NULL };
static const char *const http_device_limit_keys[] = { "max_messages_per_second", "max_shaping_delay", NULL };
static const char *const file_upload_keys[] = { "quota", "max_file", "sas_ttl", "max_concurrent", NULL };
static const char *const api_limit_keys[] = { "max_connections", "max_connections_per_address",
                                              "handshake_timeout", "idle_timeout", "request_timeout",
                                              "max_header_bytes", "max_body_bytes", NULL };
static const char *const metrics_keys[] = { "listen", "allow_non_loopback", NULL };
static const char *const c2d_keys[] = { "default_ttl", "max_ttl", "max_delivery_count", "max_queue_depth",
                                        "lock_timeout", "max_lock_expiries", NULL };
static const char *const feedback_keys[] = { "ttl", "lock_timeout", "max_delivery_count", NULL };
static const char *const hub_keys[] = { "host_name", "host_aliases", "policies", "x509_ca_files", NULL };
static const char *const log_keys[] = { "level", "target", "rate_limit", NULL };
static const char *const rate_keys[] = { "interval", "burst", NULL };
static const char *const store_keys[] = { "stall_timeout", "check_on_start", "max_size", "group_interval", NULL };
static const char *const admin_keys[] = { "socket", NULL };
static const char *const policy_item_keys[] = { "name", "key_file", "key_credential", "secondary_key_file",
                                                "secondary_key_credential", NULL };
static const char *const policy_names[] = { "iothubowner", "service", "device", "registryRead",
                                            "registryReadWrite", NULL };
static const char *const log_targets[] = { [GW_LOG_TARGET_AUTO] = "auto", [GW_LOG_TARGET_JOURNAL] = "journal",
                                           [GW_LOG_TARGET_STDERR] = "stderr", NULL };

#define HOST_NAME_RULES \
        "labels of 1 to 63 letters, digits or '-' (not starting or ending with '-'), at most 253 characters"

/* Validates a host name at n; 0 or -EINVAL after an error. */
static int check_host_name(const struct adp_conf_node *n, const char *s, struct adp_conf_errors *e) {
        char found[128];

        if (!gw_host_name_is_valid(s)) {
                adp_conf_error(e, n, "found %s, expected a host name: " HOST_NAME_RULES,
                               adp_conf_describe(n, found, sizeof found));
                return -EINVAL;
        }
        if (!strchr(s, '.')) {
                adp_conf_error(e, n, "found %s, expected a host name containing at least one dot",
                               adp_conf_describe(n, found, sizeof found));
                return -EINVAL;
        }
        return 0;
}

static int check_abs_path(const struct adp_conf_node *map, const char *key, size_t max_len,
                          struct adp_conf_errors *e, char **field) {
        const struct adp_conf_node *n = adp_conf_get(map, key);
        const char *s;
        char found[128];
        int r;

        r = adp_conf_get_string(map, key, false, e, &s);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        if (s[0] != '/') {
                adp_conf_error(e, n, "found %s, expected an absolute path", adp_conf_describe(n, found, sizeof found));
                return -EINVAL;
        }
        if (strlen(s) > max_len) {
                adp_conf_error(e, n, "found a path of %zu characters, expected at most %zu", strlen(s), max_len);
                return -EINVAL;
        }
        char *d = strdup(s);
        if (!d)
                return -ENOMEM;
        free(*field);
        *field = d;
        return 0;
}

/* Reads one policy key (base "key" or "secondary_key") and checks that it is base64 of
 * 16..64 bytes. Messages name the file, never the content. */
static int read_policy_key(const struct adp_conf_node *item, const char *base, bool required,
                           struct adp_conf_errors *e, char **ret) {
        _cleanup_free_ char *origin = NULL;
        const struct adp_conf_node *at = NULL;
        char *secret = NULL;
        unsigned char raw[GW_CONFIG_POLICY_KEY_MAX_BYTES + 4];
        size_t olen = 0;
        int r;

        r = adp_conf_get_secret_full(item, base, required, e, &secret, &at, &origin);
        if (r < 0)
                return r;

        size_t l = strlen(secret);
        if (strpbrk(secret, " \t\r\n") || l == 0 || l % 4 != 0) {
                r = -EINVAL;
        } else {
                r = mbedtls_base64_decode(raw, sizeof raw, &olen, (const unsigned char *) secret, l);
                if (r == MBEDTLS_ERR_BASE64_BUFFER_TOO_SMALL)
                        r = -E2BIG;
                else if (r != 0)
                        r = -EINVAL;
        }
        hub_explicit_bzero(raw, sizeof raw);
        if (r == -EINVAL) {
                adp_conf_error(e, at, "the key in %s is not valid base64, expected a base64 key of %d to %d bytes",
                               origin, GW_CONFIG_POLICY_KEY_MIN_BYTES, GW_CONFIG_POLICY_KEY_MAX_BYTES);
        } else if (r == -E2BIG || olen > GW_CONFIG_POLICY_KEY_MAX_BYTES) {
                adp_conf_error(e, at, "the key in %s is longer than %d bytes, expected a base64 key of %d to %d bytes",
                               origin, GW_CONFIG_POLICY_KEY_MAX_BYTES, GW_CONFIG_POLICY_KEY_MIN_BYTES,
                               GW_CONFIG_POLICY_KEY_MAX_BYTES);
                r = -EINVAL;
        } else if (olen < GW_CONFIG_POLICY_KEY_MIN_BYTES) {
                adp_conf_error(e, at, "the key in %s is %zu bytes once decoded, expected a base64 key of %d to %d bytes",
                               origin, olen, GW_CONFIG_POLICY_KEY_MIN_BYTES, GW_CONFIG_POLICY_KEY_MAX_BYTES);
                r = -EINVAL;
        }
        if (r < 0) {
                wipe_string(secret);
                return r;
        }
        *ret = secret;
        return 0;
}

static int parse_policies(struct gw_config *c, const struct adp_conf_node *hub, struct adp_conf_errors *e) {
        const struct adp_conf_node *seq;
        int r;

        r = adp_conf_get_seq(hub, "policies", false, e, &seq);
        if (r < 0)
                return r == -ENOENT ? 0 : r;

        size_t n = adp_conf_len(seq);
        c->policy_keys = calloc(n ? n : 1, sizeof(struct gw_policy_key));
        if (!c->policy_keys)
                return -ENOMEM;

        for (size_t i = 0; i < n; i++) {
                const struct adp_conf_node *item = adp_conf_at(seq, i);
                int idx;

                if (adp_conf_kind(item) != ADP_CONF_MAP) {
                        char found[128];
                        adp_conf_error(e, item, "found %s, expected a mapping with the keys: name, key_file or key_credential, and optionally secondary_key_file or secondary_key_credential",
                                       adp_conf_describe(item, found, sizeof found));
                        continue;
                }
                (void) adp_conf_check_keys(item, policy_item_keys, e);

                r = adp_conf_get_enum(item, "name", true, policy_names, e, &idx);
                if (r == 0) {
                        for (size_t j = 0; j < c->n_policy_keys; j++)
                                if (streq(c->policy_keys[j].name, policy_names[idx])) {
                                        adp_conf_error(e, adp_conf_get(item, "name"),
                                                       "duplicate policy \"%s\", expected each policy once",
                                                       policy_names[idx]);
                                        r = -EINVAL;
                                }
                }

                char *primary = NULL, *secondary = NULL;
                int rk = read_policy_key(item, "key", true, e, &primary);
                int rs = read_policy_key(item, "secondary_key", false, e, &secondary);
                if (rk == -ENOMEM || rs == -ENOMEM) {
                        wipe_string(primary);
                        wipe_string(secondary);
                        return -ENOMEM;
                }
                if (r < 0 || rk < 0 || (rs < 0 && rs != -ENOENT)) {
                        wipe_string(primary);
                        wipe_string(secondary);
                        continue;
                }
                struct gw_policy_key *p = &c->policy_keys[c->n_policy_keys];
                p->name = strdup(policy_names[idx]);
                p->primary_key = primary;
                p->secondary_key = secondary;
                c->n_policy_keys++;
                if (!p->name)
                        return -ENOMEM;
        }
        return 0;
}

static int parse_hub(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *hub, *aliases;
        const char *s;
        size_t n_aliases = 0;
        int r;

        r = adp_conf_get_map(root, "hub", true, e, &hub);
        if (r < 0)
                return r == -ENOMEM ? r : 0;
        (void) adp_conf_check_keys(hub, hub_keys, e);

        r = adp_conf_get_string(hub, "host_name", true, e, &s);
        if (r == 0 && check_host_name(adp_conf_get(hub, "host_name"), s, e) == 0) {
                c->host_name = strdup(s);
                if (!c->host_name)
                        return -ENOMEM;
        }

        r = adp_conf_get_seq(hub, "host_aliases", false, e, &aliases);
        for (size_t i = 0; r == 0 && i < adp_conf_len(aliases); i++) {
                const struct adp_conf_node *a = adp_conf_at(aliases, i);
                if (adp_conf_parse_string(a, e, &s) < 0 || check_host_name(a, s, e) < 0)
                        continue;
                const char *dup = NULL;
                if (c->host_name && strcasecmp(c->host_name, s) == 0)
                        dup = "hub.host_name";
                for (size_t j = 0; !dup && j < i; j++) {
                        const struct adp_conf_node *o = adp_conf_at(aliases, j);
                        if (adp_conf_scalar(o) && strcasecmp(adp_conf_scalar(o), s) == 0)
                                dup = adp_conf_path(o);
                }
                if (dup) {
                        adp_conf_error(e, a, "duplicate host name \"%s\" (already given as %s), expected each name once",
                                       s, dup);
                        continue;
                }
                if (strv_push(&c->host_aliases, &n_aliases, s) < 0)
                        return -ENOMEM;
        }

        const struct adp_conf_node *cas;
        size_t n_cas = 0;
        r = adp_conf_get_seq(hub, "x509_ca_files", false, e, &cas);
        for (size_t i = 0; r == 0 && i < adp_conf_len(cas); i++) {
                const struct adp_conf_node *a = adp_conf_at(cas, i);
                if (adp_conf_parse_string(a, e, &s) < 0)
                        continue;
                if (s[0] != '/') {
                        adp_conf_error(e, a, "found \"%s\", expected an absolute path to a PEM CA certificate file", s);
                        continue;
                }
                if (strv_push(&c->x509_ca_files, &n_cas, s) < 0)
                        return -ENOMEM;
        }

        return parse_policies(c, hub, e);
}

static int parse_log(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *log, *rl;
        const char *s;
        int r, idx;

        r = adp_conf_get_map(root, "log", false, e, &log);
        if (r < 0)
                return 0;
        (void) adp_conf_check_keys(log, log_keys, e);

        if (adp_conf_get_string(log, "level", false, e, &s) == 0) {
                int level = gw_log_level_from_string(s);
                if (level < 0) {
                        char found[128];
                        adp_conf_error(e, adp_conf_get(log, "level"),
                                       "found %s, expected one of: emerg, alert, crit, err, warning, notice, info, debug",
                                       adp_conf_describe(adp_conf_get(log, "level"), found, sizeof found));
                } else
                        c->log_level = level;
        }
        if (adp_conf_get_enum(log, "target", false, log_targets, e, &idx) == 0)
                c->log_target = (enum gw_log_target) idx;

        r = adp_conf_get_map(log, "rate_limit", false, e, &rl);
        if (r == 0) {
                uint64_t v;
                (void) adp_conf_check_keys(rl, rate_keys, e);
                (void) adp_conf_get_duration(rl, "interval", false, GW_CONFIG_LOG_RATE_INTERVAL_MIN_USEC,
                                             GW_CONFIG_LOG_RATE_INTERVAL_MAX_USEC, e, &c->log_rate_interval_usec);
                if (adp_conf_get_uint(rl, "burst", false, 1, GW_CONFIG_LOG_RATE_BURST_MAX, e, &v) == 0)
                        c->log_rate_burst = (unsigned) v;
        }
        return 0;
}

static int parse_store(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *store;

        if (adp_conf_get_map(root, "store", false, e, &store) < 0)
                return 0;
        (void) adp_conf_check_keys(store, store_keys, e);
        (void) adp_conf_get_duration(store, "stall_timeout", false, GW_CONFIG_STALL_TIMEOUT_MIN_USEC,
                                     GW_CONFIG_STALL_TIMEOUT_MAX_USEC, e, &c->store_stall_timeout_usec);
        (void) adp_conf_get_bool(store, "check_on_start", false, e, &c->store_check_on_start);
        (void) adp_conf_get_duration(store, "group_interval", false, 0, GW_CONFIG_GROUP_INTERVAL_MAX_USEC, e,
                                     &c->store_group_interval_usec);
        (void) adp_conf_get_size(store, "max_size", false, HUB_STORE_MAX_SIZE_MIN, UINT64_C(1) << 50, e,
                                 &c->store_max_size);
        return 0;
}

static int parse_admin(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *admin;

        if (adp_conf_get_map(root, "admin", false, e, &admin) < 0)
                return 0;
        (void) adp_conf_check_keys(admin, admin_keys, e);
        /* sun_path holds 108 bytes with the NUL. */
        int r = check_abs_path(admin, "socket", 107, e, &c->admin_socket);
        return r == -ENOMEM ? r : 0;
}

/* A listen address as gw_net_parse_address() takes it: an IP literal or "localhost", ":port". */
static int check_listen_address(const struct adp_conf_node *n, const char *s, bool *ret_loopback,
                                struct adp_conf_errors *e) {
        struct sockaddr_storage sa;
        socklen_t len;
        char found[128];

        if (gw_net_parse_address(s, &sa, &len) < 0) {
                adp_conf_error(e, n, "found %s, expected an address:port with an IP literal or localhost, "
                               "e.g. \"0.0.0.0:443\", \"[::]:443\" or \"127.0.0.1:9100\"",
                               adp_conf_describe(n, found, sizeof found));
                return -EINVAL;
        }
        if (ret_loopback)
                *ret_loopback = gw_net_sockaddr_is_loopback(&sa);
        return 0;
}

/* `listen:` of a listener section: a list of distinct addresses (each checked), or the
 * default when the key is absent. *ret_listen gets a NULL-terminated list, left NULL for `[]`
 * (which turns the listener off). Returns 0 or -ENOMEM; errors go to e. */
static int parse_listen(const struct adp_conf_node *section, const char *def, struct adp_conf_errors *e,
                        char ***ret_listen) {
        const struct adp_conf_node *seq;
        size_t n = 0;
        int r = adp_conf_get_seq(section, "listen", false, e, &seq);

        if (r == -ENOENT)
                return strv_push(ret_listen, &n, def) < 0 ? -ENOMEM : 0;
        if (r < 0)
                return 0;
        for (size_t i = 0; i < adp_conf_len(seq); i++) {
                const struct adp_conf_node *a = adp_conf_at(seq, i);
                const char *s;
                if (adp_conf_parse_string(a, e, &s) < 0 || check_listen_address(a, s, NULL, e) < 0)
                        continue;
                for (size_t j = 0; j < i; j++)
                        if (adp_conf_scalar(adp_conf_at(seq, j)) && streq(adp_conf_scalar(adp_conf_at(seq, j)), s))
                                adp_conf_error(e, a, "duplicate listen address \"%s\", expected each address once", s);
                if (strv_push(ret_listen, &n, s) < 0)
                        return -ENOMEM;
        }
        return 0;
}

static int parse_service_api(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *api, *tls, *lim;
        uint64_t v;
        int r;

        r = adp_conf_get_map(root, "service_api", false, e, &api);
        if (r < 0)
                return 0;
        (void) adp_conf_check_keys(api, api_keys, e);
        c->api_enabled = true;
        (void) adp_conf_get_bool(api, "allow_plaintext", false, e, &c->api_allow_plaintext);

        r = parse_listen(api, GW_CONFIG_API_LISTEN_DEFAULT, e, &c->api_listen);
        if (r == -ENOMEM)
                return r;
        if (!c->api_listen || !c->api_listen[0])
                c->api_enabled = false; /* listen: [] turns the service API off */

        r = adp_conf_get_map(api, "tls", false, e, &tls);
        if (r == 0) {
                (void) adp_conf_check_keys(tls, api_tls_keys, e);
                if (check_abs_path(tls, "cert_file", 4000, e, &c->api_cert_file) == -ENOMEM ||
                    check_abs_path(tls, "key_file", 4000, e, &c->api_key_file) == -ENOMEM ||
                    check_abs_path(tls, "client_ca_file", 4000, e, &c->api_client_ca_file) == -ENOMEM)
                        return -ENOMEM;
                int mode;
                if (adp_conf_get_enum(tls, "client_cert", false, api_client_cert_modes, e, &mode) == 0)
                        c->api_client_cert_optional = mode == 1;
                if (!!c->api_cert_file != !!c->api_key_file)
                        adp_conf_error(e, tls, "found only %s, expected both cert_file and key_file (or neither: "
                                       "a certificate is then generated in the state directory)",
                                       c->api_cert_file ? "cert_file" : "key_file");
        }

        r = adp_conf_get_map(api, "limits", false, e, &lim);
        if (r == 0) {
                (void) adp_conf_check_keys(lim, api_limit_keys, e);
                if (adp_conf_get_uint(lim, "max_connections", false, 1, 100000, e, &v) == 0)
                        c->api_max_connections = (unsigned) v;
                if (adp_conf_get_uint(lim, "max_connections_per_address", false, 1, 100000, e, &v) == 0)
                        c->api_max_connections_per_address = (unsigned) v;
                (void) adp_conf_get_duration(lim, "handshake_timeout", false, USEC_PER_SEC / 10, 300 * USEC_PER_SEC,
                                             e, &c->api_handshake_timeout_usec);
                (void) adp_conf_get_duration(lim, "idle_timeout", false, USEC_PER_SEC, 3600 * USEC_PER_SEC, e,
                                             &c->api_idle_timeout_usec);
                (void) adp_conf_get_duration(lim, "request_timeout", false, USEC_PER_SEC / 10, 3600 * USEC_PER_SEC,
                                             e, &c->api_request_timeout_usec);
                (void) adp_conf_get_size(lim, "max_header_bytes", false, 1024, 1024 * 1024, e,
                                         &c->api_max_header_bytes);
                (void) adp_conf_get_size(lim, "max_body_bytes", false, 1024, 64 * 1024 * 1024, e,
                                         &c->api_max_body_bytes);
        }
        return 0;
}

static int parse_mqtt(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *m, *tls, *lim;
        uint64_t v;
        int r;

        r = adp_conf_get_map(root, "mqtt", false, e, &m);
        if (r < 0)
                return 0;
        (void) adp_conf_check_keys(m, mqtt_keys, e);
        c->mqtt_enabled = true;
        (void) adp_conf_get_bool(m, "allow_plaintext", false, e, &c->mqtt_allow_plaintext);

        r = parse_listen(m, GW_CONFIG_MQTT_LISTEN_DEFAULT, e, &c->mqtt_listen);
        if (r == -ENOMEM)
                return r;
        if (!c->mqtt_listen || !c->mqtt_listen[0])
                c->mqtt_enabled = false; /* listen: [] turns MQTT off */

        r = adp_conf_get_map(m, "tls", false, e, &tls);
        if (r == 0) {
                (void) adp_conf_check_keys(tls, mqtt_tls_keys, e);
                if (check_abs_path(tls, "cert_file", 4000, e, &c->mqtt_cert_file) == -ENOMEM ||
                    check_abs_path(tls, "key_file", 4000, e, &c->mqtt_key_file) == -ENOMEM)
                        return -ENOMEM;
                if (!!c->mqtt_cert_file != !!c->mqtt_key_file)
                        adp_conf_error(e, tls, "found only %s, expected both cert_file and key_file (or neither: "
                                       "the certificate generated in the state directory is used)",
                                       c->mqtt_cert_file ? "cert_file" : "key_file");
        }

        r = adp_conf_get_map(m, "limits", false, e, &lim);
        if (r == 0) {
                (void) adp_conf_check_keys(lim, mqtt_limit_keys, e);
                if (adp_conf_get_uint(lim, "max_connections", false, 1, 1000000, e, &v) == 0)
                        c->mqtt_max_connections = (unsigned) v;
                if (adp_conf_get_uint(lim, "max_connections_per_address", false, 1, 1000000, e, &v) == 0)
                        c->mqtt_max_connections_per_address = (unsigned) v;
                if (adp_conf_get_uint(lim, "max_inflight", false, 1, 1024, e, &v) == 0)
                        c->mqtt_max_inflight = (unsigned) v;
                if (adp_conf_get_uint(lim, "max_messages_per_second", false, 0, 1000000, e, &v) == 0)
                        c->mqtt_max_messages_per_second = (uint32_t) v;
                (void) adp_conf_get_size(lim, "max_packet_bytes", false, 1024, GW_CONFIG_MQTT_MAX_PACKET_LIMIT, e,
                                         &c->mqtt_max_packet_bytes);
                (void) adp_conf_get_duration(lim, "max_keep_alive_timeout", false, USEC_PER_SEC,
                                             1767 * USEC_PER_SEC, e, &c->mqtt_max_keep_alive_timeout_usec);
                (void) adp_conf_get_duration(lim, "handshake_timeout", false, USEC_PER_SEC / 10, 300 * USEC_PER_SEC,
                                             e, &c->mqtt_handshake_timeout_usec);
                (void) adp_conf_get_duration(lim, "connect_timeout", false, USEC_PER_SEC / 10, 300 * USEC_PER_SEC,
                                             e, &c->mqtt_connect_timeout_usec);
        }
        return 0;
}

/* http_device: and file_upload: (gateway/api/api-device.c). */
static int parse_http_device(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *m, *lim;
        uint64_t v;

        if (adp_conf_get_map(root, "http_device", false, e, &m) == 0) {
                (void) adp_conf_check_keys(m, http_device_keys, e);
                (void) adp_conf_get_bool(m, "enabled", false, e, &c->http_device_enabled);
                if (adp_conf_get_map(m, "limits", false, e, &lim) == 0) {
                        (void) adp_conf_check_keys(lim, http_device_limit_keys, e);
                        if (adp_conf_get_uint(lim, "max_messages_per_second", false, 0, 1000000, e, &v) == 0)
                                c->http_device_max_messages_per_second = (uint32_t) v;
                        (void) adp_conf_get_duration(lim, "max_shaping_delay", false, 0, 60 * USEC_PER_SEC, e,
                                                     &c->http_device_max_shaping_delay_usec);
                }
        }
        if (adp_conf_get_map(root, "file_upload", false, e, &m) == 0) {
                (void) adp_conf_check_keys(m, file_upload_keys, e);
                (void) adp_conf_get_size(m, "quota", false, 0, UINT64_C(1) << 50, e, &c->file_upload_quota_bytes);
                (void) adp_conf_get_size(m, "max_file", false, 1, UINT64_C(1) << 50, e, &c->file_upload_max_file_bytes);
                (void) adp_conf_get_duration(m, "sas_ttl", false, 10 * USEC_PER_SEC, 48 * 3600 * USEC_PER_SEC, e,
                                             &c->file_upload_sas_ttl_usec);
                if (adp_conf_get_uint(m, "max_concurrent", false, 1, 100, e, &v) == 0)
                        c->file_upload_max_concurrent = (uint32_t) v;
        }
        return 0;
}

static int parse_metrics(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *m;
        const char *s;
        bool loopback = true;

        if (adp_conf_get_map(root, "metrics", false, e, &m) < 0)
                return 0;
        (void) adp_conf_check_keys(m, metrics_keys, e);
        (void) adp_conf_get_bool(m, "allow_non_loopback", false, e, &c->metrics_allow_non_loopback);
        if (adp_conf_get_string(m, "listen", false, e, &s) < 0)
                return 0;
        if (check_listen_address(adp_conf_get(m, "listen"), s, &loopback, e) < 0)
                return 0;
        if (!loopback && !c->metrics_allow_non_loopback) {
                adp_conf_error(e, adp_conf_get(m, "listen"),
                               "found the non-loopback address \"%s\", expected a loopback address (the metrics "
                               "listener has no authentication; set allow_non_loopback: true to expose it anyway)", s);
                return 0;
        }
        c->metrics_listen = strdup(s);
        return c->metrics_listen ? 0 : -ENOMEM;
}

static int parse_c2d(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *m;
        uint64_t v;

        if (adp_conf_get_map(root, "c2d", false, e, &m) == 0) {
                (void) adp_conf_check_keys(m, c2d_keys, e);
                (void) adp_conf_get_duration(m, "default_ttl", false, HUB_QUEUE_TTL_MIN_USEC, HUB_QUEUE_TTL_MAX_USEC, e,
                                             &c->c2d_default_ttl_usec);
                (void) adp_conf_get_duration(m, "max_ttl", false, HUB_QUEUE_TTL_MIN_USEC, HUB_QUEUE_TTL_MAX_USEC, e,
                                             &c->c2d_max_ttl_usec);
                (void) adp_conf_get_duration(m, "lock_timeout", false, HUB_QUEUE_LOCK_MIN_USEC,
                                             HUB_QUEUE_LOCK_MAX_USEC, e, &c->c2d_lock_timeout_usec);
                if (adp_conf_get_uint(m, "max_delivery_count", false, 1, HUB_QUEUE_MAX_DELIVERY_COUNT_LIMIT, e, &v) == 0)
                        c->c2d_max_delivery_count = (uint32_t) v;
                if (adp_conf_get_uint(m, "max_queue_depth", false, 1, HUB_QUEUE_MAX_DEPTH_LIMIT, e, &v) == 0)
                        c->c2d_max_queue_depth = (uint32_t) v;
                if (adp_conf_get_uint(m, "max_lock_expiries", false, 0, 1000, e, &v) == 0)
                        c->c2d_max_lock_expiries = (uint32_t) v;
                uint64_t def = c->c2d_default_ttl_usec ? c->c2d_default_ttl_usec : HUB_QUEUE_DEFAULT_TTL_USEC;
                if (c->c2d_max_ttl_usec && c->c2d_max_ttl_usec < def)
                        adp_conf_error(e, adp_conf_get(m, "max_ttl"),
                                       "found a max_ttl shorter than default_ttl (%llu s), expected at least default_ttl",
                                       (unsigned long long) (def / USEC_PER_SEC));
        }
        if (adp_conf_get_map(root, "feedback", false, e, &m) == 0) {
                (void) adp_conf_check_keys(m, feedback_keys, e);
                (void) adp_conf_get_duration(m, "ttl", false, HUB_QUEUE_TTL_MIN_USEC, HUB_QUEUE_TTL_MAX_USEC, e,
                                             &c->feedback_ttl_usec);
                (void) adp_conf_get_duration(m, "lock_timeout", false, HUB_QUEUE_LOCK_MIN_USEC,
                                             HUB_QUEUE_LOCK_MAX_USEC, e, &c->feedback_lock_timeout_usec);
                if (adp_conf_get_uint(m, "max_delivery_count", false, 1, HUB_QUEUE_MAX_DELIVERY_COUNT_LIMIT, e, &v) == 0)
                        c->feedback_max_delivery_count = (uint32_t) v;
        }
        return 0;
}

static bool adapter_name_is_valid(const char *s) {
        size_t l = strlen(s);
        if (l == 0 || l > 64)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '_' || *p == '-' || *p == '.'))
                        return false;
        return true;
}

static int parse_adapters(struct gw_config *c, const struct adp_conf_node *root, struct adp_conf_errors *e) {
        const struct adp_conf_node *seq;
        char types[512];
        size_t o = 0;

        if (adp_conf_get_seq(root, "adapters", false, e, &seq) < 0)
                return 0;

        types[0] = 0;
        for (size_t t = 0; gw_adapter_types[t].name; t++) {
                int k = snprintf(types + o, sizeof types - o, "%s%s", t ? ", " : "", gw_adapter_types[t].name);
                if (k < 0 || (size_t) k >= sizeof types - o)
                        break;
                o += (size_t) k;
        }

        size_t n = adp_conf_len(seq);
        c->adapters = calloc(n ? n : 1, sizeof(struct gw_adapter_conf));
        if (!c->adapters)
                return -ENOMEM;

        for (size_t i = 0; i < n; i++) {
                const struct adp_conf_node *item = adp_conf_at(seq, i);
                const struct gw_adapter_type *type = NULL;
                const char *type_s, *name;
                char found[128];
                bool ok = true;

                if (adp_conf_kind(item) != ADP_CONF_MAP) {
                        adp_conf_error(e, item, "found %s, expected a mapping with the keys type, name and the adapter's own",
                                       adp_conf_describe(item, found, sizeof found));
                        continue;
                }

                if (adp_conf_get_string(item, "type", true, e, &type_s) == 0) {
                        for (size_t t = 0; gw_adapter_types[t].name; t++)
                                if (streq(gw_adapter_types[t].name, type_s))
                                        type = &gw_adapter_types[t];
                        if (!type)
                                adp_conf_error(e, adp_conf_get(item, "type"), "found %s, expected one of: %s",
                                               adp_conf_describe(adp_conf_get(item, "type"), found, sizeof found),
                                               types[0] ? types : "(none in this build)");
                }
                if (!type)
                        ok = false;

                if (adp_conf_get_string(item, "name", true, e, &name) == 0) {
                        const struct adp_conf_node *nn = adp_conf_get(item, "name");
                        if (!adapter_name_is_valid(name)) {
                                adp_conf_error(e, nn, "found %s, expected an adapter name of 1 to 64 letters, digits, '_', '-' or '.'",
                                               adp_conf_describe(nn, found, sizeof found));
                                ok = false;
                        }
                        for (size_t j = 0; j < i; j++) {
                                const struct adp_conf_node *other = adp_conf_get(adp_conf_at(seq, j), "name");
                                if (adp_conf_scalar(other) && streq(adp_conf_scalar(other), name)) {
                                        adp_conf_error(e, nn, "duplicate adapter name \"%s\" (already given at %s), expected each name once",
                                                       name, adp_conf_path(adp_conf_at(seq, j)));
                                        ok = false;
                                        break;
                                }
                        }
                } else
                        ok = false;

                if (type && type->validate && type->validate(item, e) < 0)
                        ok = false;
                if (!ok)
                        continue;

                struct gw_adapter_conf *a = &c->adapters[c->n_adapters++];
                a->type = strdup(type_s);
                a->name = strdup(name);
                a->node = item;
                if (!a->type || !a->name)
                        return -ENOMEM;
        }
        return 0;
}

int gw_config_from_tree(struct adp_conf_node *tree, struct gw_config **ret, struct adp_conf_errors *e) {
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *t = tree;
        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        size_t before = adp_conf_errors_total(e);
        int r;

        if (!ret || !tree)
                return -EINVAL;

        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->log_level = LOG_INFO;
        c->log_target = GW_LOG_TARGET_AUTO;
        c->log_rate_interval_usec = GW_CONFIG_LOG_RATE_INTERVAL_DEFAULT_USEC;
        c->log_rate_burst = GW_CONFIG_LOG_RATE_BURST_DEFAULT;
        c->store_stall_timeout_usec = GW_CONFIG_STALL_TIMEOUT_DEFAULT_USEC;
        c->store_check_on_start = false;
        c->store_group_interval_usec = GW_CONFIG_GROUP_INTERVAL_DEFAULT_USEC;
        c->api_max_connections = GW_CONFIG_API_MAX_CONNECTIONS_DEFAULT;
        c->api_max_connections_per_address = GW_CONFIG_API_MAX_CONNECTIONS_PER_ADDRESS_DEFAULT;
        c->api_handshake_timeout_usec = GW_CONFIG_API_HANDSHAKE_TIMEOUT_DEFAULT_USEC;
        c->api_idle_timeout_usec = GW_CONFIG_API_IDLE_TIMEOUT_DEFAULT_USEC;
        c->api_request_timeout_usec = GW_CONFIG_API_REQUEST_TIMEOUT_DEFAULT_USEC;
        c->api_max_header_bytes = GW_CONFIG_API_MAX_HEADER_BYTES_DEFAULT;
        c->api_max_body_bytes = GW_CONFIG_API_MAX_BODY_BYTES_DEFAULT;
        c->mqtt_max_connections = GW_CONFIG_MQTT_MAX_CONNECTIONS_DEFAULT;
        c->mqtt_max_connections_per_address = GW_CONFIG_MQTT_MAX_CONNECTIONS_PER_ADDRESS_DEFAULT;
        c->mqtt_max_inflight = GW_CONFIG_MQTT_MAX_INFLIGHT_DEFAULT;
        c->mqtt_max_packet_bytes = GW_CONFIG_MQTT_MAX_PACKET_DEFAULT;
        c->mqtt_max_keep_alive_timeout_usec = GW_CONFIG_MQTT_MAX_KEEP_ALIVE_TIMEOUT_DEFAULT_USEC;
        c->mqtt_handshake_timeout_usec = GW_CONFIG_MQTT_HANDSHAKE_TIMEOUT_DEFAULT_USEC;
        c->mqtt_connect_timeout_usec = GW_CONFIG_MQTT_CONNECT_TIMEOUT_DEFAULT_USEC;
        c->api_client_cert_optional = true;
        c->http_device_enabled = true;
        c->http_device_max_messages_per_second = GW_CONFIG_HTTP_DEVICE_MAX_MESSAGES_PER_SECOND_DEFAULT;
        c->http_device_max_shaping_delay_usec = GW_CONFIG_HTTP_DEVICE_MAX_SHAPING_DELAY_DEFAULT_USEC;
        c->file_upload_quota_bytes = GW_CONFIG_FILE_UPLOAD_QUOTA_DEFAULT;
        c->file_upload_max_file_bytes = GW_CONFIG_FILE_UPLOAD_MAX_FILE_DEFAULT;
        c->file_upload_sas_ttl_usec = GW_CONFIG_FILE_UPLOAD_SAS_TTL_DEFAULT_USEC;
        c->file_upload_max_concurrent = GW_CONFIG_FILE_UPLOAD_MAX_CONCURRENT_DEFAULT;
        c->state_dir = strdup(FIELDHUB_STATE_DIR);
        c->admin_socket = strdup(FIELDHUB_ADMIN_SOCKET);
        c->host_aliases = calloc(1, sizeof(char *));
        c->x509_ca_files = calloc(1, sizeof(char *));
        if (!c->x509_ca_files)
                return -ENOMEM;
        c->sources = calloc(1, sizeof(char *));
        if (!c->state_dir || !c->admin_socket || !c->host_aliases || !c->sources)
                return -ENOMEM;

        if (adp_conf_kind(t) != ADP_CONF_MAP && adp_conf_kind(t) != ADP_CONF_NULL) {
                (void) adp_conf_check_keys(t, top_keys, e); /* "found ..., expected a mapping with the keys: ..." */
                return -EINVAL;
        }
        (void) adp_conf_check_keys(t, top_keys, e);

        r = parse_hub(c, t, e);
        if (r < 0)
                return r;
        r = check_abs_path(t, "state_dir", 4000, e, &c->state_dir);
        if (r == -ENOMEM)
                return r;
        r = parse_log(c, t, e);
        if (r < 0)
                return r;
        r = parse_store(c, t, e);
        if (r < 0)
                return r;
        r = parse_admin(c, t, e);
        if (r < 0)
                return r;
        r = parse_adapters(c, t, e);
        if (r < 0)
                return r;
        r = parse_service_api(c, t, e);
        if (r < 0)
                return r;
        r = parse_metrics(c, t, e);
        if (r < 0)
                return r;
        r = gw_coap_conf_parse(t, e, &c->coap);
        if (r == -ENOMEM)
                return r;
        r = parse_mqtt(c, t, e);
        if (r < 0)
                return r;
        r = parse_c2d(c, t, e);
        if (r < 0)
                return r;
        r = parse_http_device(c, t, e);
        if (r < 0)
                return r;
        r = gw_routing_conf_parse(t, &c->routing, e);
        if (r == -ENOMEM)
                return r;

        if (adp_conf_errors_total(e) != before)
                return -EINVAL;

        c->tree = TAKE_PTR(t);
        *ret = TAKE_PTR(c);
        return 0;
}

/* ---- files ------------------------------------------------------------------------------ */

static int yaml_filter(const struct dirent *d) {
        size_t l = strlen(d->d_name);
        return d->d_name[0] != '.' && l > 5 && streq(d->d_name + l - 5, ".yaml");
}

static int byte_sort(const struct dirent **a, const struct dirent **b) {
        return strcmp((*a)->d_name, (*b)->d_name);
}

int gw_config_load(const char *path, const char *confd_dir, struct gw_config **ret, struct adp_conf_errors *e) {
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *tree = NULL;
        _cleanup_free_ char *confd = NULL;
        char **sources = NULL;
        size_t n_sources = 0;
        struct dirent **ents = NULL;
        struct gw_config *c = NULL;
        bool failed = false;
        int r, k;

        if (!path || !ret)
                return -EINVAL;

        r = adp_conf_load_file(path, &tree, e);
        if (r < 0)
                return r;
        if (strv_push(&sources, &n_sources, path) < 0)
                return -ENOMEM;

        if (confd_dir)
                confd = strdup(confd_dir);
        else {
                const char *slash = strrchr(path, '/');
                if (!slash)
                        confd = strdup("conf.d");
                else if (asprintf(&confd, "%.*s/conf.d", (int) (slash - path), path) < 0)
                        confd = NULL;
        }
        if (!confd) {
                strv_free(sources);
                return -ENOMEM;
        }

        k = scandir(confd, &ents, yaml_filter, byte_sort);
        if (k < 0) {
                r = -errno;
                if (r != -ENOENT) {
                        adp_conf_error_file(e, confd, 0, 0, "cannot read the conf.d directory: %s", strerror(-r));
                        strv_free(sources);
                        return r;
                }
                k = 0;
                r = 0;
        }
        for (int i = 0; i < k; i++) {
                _cleanup_(adp_conf_node_freep) struct adp_conf_node *ov = NULL;
                _cleanup_free_ char *frag = NULL;

                if (asprintf(&frag, "%s/%s", confd, ents[i]->d_name) < 0) {
                        r = -ENOMEM;
                        break;
                }
                r = adp_conf_load_file(frag, &ov, e);
                if (r == -ENOMEM)
                        break;
                if (r < 0) {
                        failed = true;
                        r = 0;
                        continue;
                }
                if (strv_push(&sources, &n_sources, frag) < 0) {
                        r = -ENOMEM;
                        break;
                }
                r = adp_conf_merge(tree, TAKE_PTR(ov), e);
                if (r == -ENOMEM)
                        break;
                if (r < 0)
                        failed = true;
                r = 0;
        }
        for (int i = 0; i < k; i++)
                free(ents[i]);
        free(ents);
        if (r < 0) {
                strv_free(sources);
                return r;
        }
        if (failed) {
                /* Validating a tree with a fragment missing would report misleading errors. */
                strv_free(sources);
                return -EINVAL;
        }

        r = gw_config_from_tree(TAKE_PTR(tree), &c, e);
        if (r < 0) {
                strv_free(sources);
                return r;
        }
        strv_free(c->sources);
        c->sources = sources;
        *ret = c;
        return 0;
}
