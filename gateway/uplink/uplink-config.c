/* SPDX-License-Identifier: MIT */
/* `endpoints:`, `routes:`, `fallback_route:`, `enrichments:`, `logs_dir:` (uplink-config.h). */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/auth.h"
#include "hub/clock.h"
#include "hub/query.h"
#include "hub/registry.h"
#include "uplink-config.h"

static const char *const type_names[] = { [GW_ENDPOINT_MQTT] = "mqtt", [GW_ENDPOINT_HTTP] = "http",
                                          [GW_ENDPOINT_FILE] = "file", [GW_ENDPOINT_UPSTREAM] = "upstream", NULL };
static const char *const overflow_names[] = { [HUB_OUTBOX_DROP_OLDEST] = "drop-oldest",
                                              [HUB_OUTBOX_REJECT_NEW] = "reject-new", NULL };
static const char *const fsync_names[] = { [GW_FILE_FSYNC_BATCH] = "batch", [GW_FILE_FSYNC_NEVER] = "never", NULL };
static const char *const source_names[] = { "DeviceMessages", "TwinChangeEvents", "DeviceLifecycleEvents",
                                            "DeviceConnectionStateEvents", NULL };

static const char *const common_keys[] = { "name", "type", "queue", "batch", "inflight", "retry", "timeout" };
static const char *const mqtt_keys[] = { "address", "client_id", "topic", "qos", "username", "password_file",
                                         "password_credential", "tls", "keep_alive", NULL };
static const char *const http_keys[] = { "url", "headers", "tls", "on_client_error", "client_error_tries", NULL };
static const char *const client_error_names[] = { "retry", "skip", NULL };
static const char *const file_keys[] = { "file", "max_size", "max_files", "fsync", NULL };
static const char *const upstream_keys[] = { "host_name", "gateway_host", "port", "tls", "keep_alive", "token_ttl",
                                             "devices", "create_missing", NULL };
static const char *const create_missing_keys[] = { "policy", "key_file", "key_credential", "port", NULL };
static const char *const upstream_tls_keys[] = { "ca_file", NULL };
static const char *const upstream_device_keys[] = { "id", "key_file", "key_credential", NULL };
static const char *const queue_keys[] = { "max_messages", "max_bytes", "overflow", "ttl", NULL };
static const char *const batch_keys[] = { "max_messages", "max_delay", NULL };
static const char *const retry_keys[] = { "initial", "max", NULL };
static const char *const mqtt_tls_keys[] = { "ca_file", "cert_file", "key_file", NULL };
static const char *const http_tls_keys[] = { "ca_file", "verify", NULL };
static const char *const header_keys[] = { "name", "value", "value_file", "value_credential", NULL };
static const char *const route_keys[] = { "name", "source", "condition", "endpoint", "endpoints", "enabled", NULL };
static const char *const fallback_keys[] = { "enabled", "endpoints", NULL };
static const char *const enrich_keys[] = { "key", "value", "endpoints", NULL };

const char *gw_endpoint_type_to_string(enum gw_endpoint_type t) {
        return (unsigned) t < _GW_ENDPOINT_TYPE_MAX ? type_names[t] : NULL;
}

static const char *strempty(const char *s) {
        return s ? s : "";
}

static void strv_free_n(char **v, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

static void wipe_free(char *s) {
        if (s) {
                hub_explicit_bzero(s, strlen(s));
                free(s);
        }
}

static void endpoint_done(struct gw_endpoint_conf *ep) {
        free(ep->name);
        free(ep->address);
        free(ep->client_id);
        free(ep->topic);
        free(ep->username);
        wipe_free(ep->password);
        free(ep->ca_file);
        free(ep->cert_file);
        free(ep->key_file);
        free(ep->url);
        for (size_t i = 0; i < ep->n_headers; i++) {
                free(ep->headers[i].name);
                if (ep->headers[i].secret)
                        wipe_free(ep->headers[i].value);
                else
                        free(ep->headers[i].value);
        }
        free(ep->headers);
        free(ep->path);
        free(ep->host_name);
        free(ep->gateway_host);
        for (size_t i = 0; i < ep->n_devices; i++) {
                free(ep->devices[i].id);
                wipe_free(ep->devices[i].key);
        }
        free(ep->devices);
        free(ep->create_policy);
        wipe_free(ep->create_key);
        wipe_free(ep->fingerprint);
}

struct gw_routing_conf *gw_routing_conf_free(struct gw_routing_conf *c) {
        if (!c)
                return NULL;
        for (size_t i = 0; i < c->n_endpoints; i++)
                endpoint_done(&c->endpoints[i]);
        free(c->endpoints);
        for (size_t i = 0; i < c->n_routes; i++) {
                free(c->routes[i].name);
                free(c->routes[i].condition);
                strv_free_n(c->routes[i].endpoints, c->routes[i].n_endpoints);
        }
        free(c->routes);
        for (size_t i = 0; i < c->n_enrichments; i++) {
                free(c->enrichments[i].key);
                free(c->enrichments[i].value);
                strv_free_n(c->enrichments[i].endpoints, c->enrichments[i].n_endpoints);
        }
        free(c->enrichments);
        strv_free_n(c->fallback_endpoints, c->n_fallback_endpoints);
        free(c->logs_dir);
        free(c);
        return NULL;
}

const struct gw_endpoint_conf *gw_routing_conf_endpoint(const struct gw_routing_conf *c, const char *name) {
        for (size_t i = 0; c && i < c->n_endpoints; i++)
                if (streq(c->endpoints[i].name, name))
                        return &c->endpoints[i];
        return NULL;
}

/* Optional string copied into *field (left alone when absent). -ENOMEM only. */
static int get_str(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                   char **field) {
        const char *s;
        int r = adp_conf_get_string(map, key, required, e, &s);
        if (r < 0)
                return 0;
        char *d = strdup(s);
        if (!d)
                return -ENOMEM;
        free(*field);
        *field = d;
        return 0;
}

static int get_abs_path(const struct adp_conf_node *map, const char *key, struct adp_conf_errors *e, char **field) {
        const char *s;
        char found[128];
        if (adp_conf_get_string(map, key, false, e, &s) < 0)
                return 0;
        if (s[0] != '/') {
                const struct adp_conf_node *n = adp_conf_get(map, key);
                adp_conf_error(e, n, "found %s, expected an absolute path", adp_conf_describe(n, found, sizeof found));
                return 0;
        }
        char *d = strdup(s);
        if (!d)
                return -ENOMEM;
        free(*field);
        *field = d;
        return 0;
}

/* A list of endpoint names: a scalar or a sequence of scalars. */
static int get_names(const struct adp_conf_node *map, const char *key, struct adp_conf_errors *e, char ***ret,
                     size_t *ret_n) {
        const struct adp_conf_node *n = adp_conf_get(map, key);
        char found[128];
        if (!n || adp_conf_is_null(n))
                return -ENOENT;
        size_t cnt = adp_conf_kind(n) == ADP_CONF_SEQ ? adp_conf_len(n) : 1;
        if (adp_conf_kind(n) != ADP_CONF_SEQ && adp_conf_kind(n) != ADP_CONF_SCALAR) {
                adp_conf_error(e, n, "found %s, expected an endpoint name or a list of them",
                               adp_conf_describe(n, found, sizeof found));
                return -EINVAL;
        }
        if (cnt == 0) {
                adp_conf_error(e, n, "found an empty list, expected at least one endpoint name");
                return -EINVAL;
        }
        char **v = calloc(cnt, sizeof(char *));
        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < cnt; i++) {
                const struct adp_conf_node *it = adp_conf_kind(n) == ADP_CONF_SEQ ? adp_conf_at(n, i) : n;
                const char *s;
                if (adp_conf_parse_string(it, e, &s) < 0) {
                        strv_free_n(v, cnt);
                        return -EINVAL;
                }
                if (!hub_route_name_is_valid(s)) {
                        adp_conf_error(e, it, "found %s, expected an endpoint name of 1 to 64 letters, digits, '.', "
                                       "'_' or '-'", adp_conf_describe(it, found, sizeof found));
                        strv_free_n(v, cnt);
                        return -EINVAL;
                }
                v[i] = strdup(s);
                if (!v[i]) {
                        strv_free_n(v, cnt);
                        return -ENOMEM;
                }
        }
        *ret = v;
        *ret_n = cnt;
        return 0;
}

static int check_keys_of(const struct adp_conf_node *item, enum gw_endpoint_type t, struct adp_conf_errors *e) {
        const char *allowed[32];
        size_t n = 0;
        const char *const *specific = t == GW_ENDPOINT_MQTT ? mqtt_keys : t == GW_ENDPOINT_HTTP ? http_keys :
                                      t == GW_ENDPOINT_UPSTREAM ? upstream_keys : file_keys;
        for (size_t i = 0; i < sizeof common_keys / sizeof common_keys[0]; i++)
                allowed[n++] = common_keys[i];
        for (size_t i = 0; specific[i]; i++)
                allowed[n++] = specific[i];
        allowed[n] = NULL;
        return adp_conf_check_keys(item, allowed, e);
}

static int parse_headers(struct gw_endpoint_conf *ep, const struct adp_conf_node *item, struct adp_conf_errors *e) {
        const struct adp_conf_node *hs;
        char found[128];
        if (adp_conf_get_seq(item, "headers", false, e, &hs) < 0)
                return 0;
        ep->headers = calloc(adp_conf_len(hs) + 1, sizeof *ep->headers);
        if (!ep->headers)
                return -ENOMEM;
        for (size_t i = 0; i < adp_conf_len(hs); i++) {
                const struct adp_conf_node *h = adp_conf_at(hs, i);
                struct gw_header *out = &ep->headers[ep->n_headers];
                const char *name, *value;
                if (adp_conf_check_keys(h, header_keys, e) < 0 || adp_conf_get_string(h, "name", true, e, &name) < 0)
                        continue;
                if (!*name || strpbrk(name, " \t\r\n:")) {
                        adp_conf_error(e, adp_conf_get(h, "name"), "found %s, expected an HTTP header name",
                                       adp_conf_describe(adp_conf_get(h, "name"), found, sizeof found));
                        continue;
                }
                int r = adp_conf_get_string(h, "value", false, e, &value);
                char *secret = NULL;
                if (r == 0) {
                        if (adp_conf_get(h, "value_file") || adp_conf_get(h, "value_credential")) {
                                adp_conf_error(e, h, "found both value and value_file/value_credential, expected one");
                                continue;
                        }
                        if (strpbrk(value, "\r\n")) {
                                adp_conf_error(e, adp_conf_get(h, "value"), "found a line break, expected one line");
                                continue;
                        }
                        out->value = strdup(value);
                } else if (r == -ENOENT) {
                        r = adp_conf_get_secret(h, "value", true, e, &secret);
                        if (r == -ENOMEM)
                                return r;
                        if (r < 0)
                                continue;
                        if (strpbrk(secret, "\r\n")) {
                                adp_conf_error(e, h, "the header value file holds a line break, expected one line");
                                wipe_free(secret);
                                continue;
                        }
                        out->value = secret;
                        out->secret = true;
                } else
                        continue;
                out->name = strdup(name);
                if (!out->name || !out->value)
                        return -ENOMEM;
                ep->n_headers++;
        }
        return 0;
}

/* Topic templates: {deviceId}, {moduleId}, {endpoint}, or {name} of an application
 * property; no wildcards. */
static void check_topic(const struct adp_conf_node *n, const char *t, struct adp_conf_errors *e) {
        if (!*t || strpbrk(t, "+#")) {
                adp_conf_error(e, n, "found a topic with wildcards or an empty topic, expected a topic template");
                return;
        }
        for (const char *p = t; *p; p++) {
                if (*p == '}') {
                        adp_conf_error(e, n, "unbalanced '}' at character %zu, expected {field}", (size_t) (p - t) + 1);
                        return;
                }
                if (*p != '{')
                        continue;
                const char *end = strchr(p, '}');
                if (!end || end == p + 1) {
                        adp_conf_error(e, n, "unterminated or empty '{' at character %zu, expected {field}",
                                       (size_t) (p - t) + 1);
                        return;
                }
                p = end;
        }
}

/* Whether the authority after "http://" names the loopback interface. */
static bool url_is_loopback(const char *a) {
        size_t n = strcspn(a, "/?#");
        const char *at = memchr(a, '@', n);
        if (at) {
                n -= (size_t) (at + 1 - a);
                a = at + 1;
        }
        if (n >= 5 && strncmp(a, "[::1]", 5) == 0)
                return n == 5 || a[5] == ':';
        size_t h = strcspn(a, ":/?#");
        if (h > n)
                h = n;
        if (h == 9 && strncasecmp(a, "localhost", 9) == 0)
                return true;
        if (h < 4 || strncmp(a, "127.", 4) != 0)
                return false;
        for (size_t i = 4; i < h; i++)
                if (!(a[i] == '.' || (a[i] >= '0' && a[i] <= '9')))
                        return false;
        return true;
}

static int fingerprint(struct gw_endpoint_conf *ep) {
        size_t sz = 0;
        char *buf = NULL;
        FILE *f = open_memstream(&buf, &sz);
        if (!f)
                return -ENOMEM;
        fprintf(f, "%d|%s|%s|%s|%u|%s|%s|%s|%s|%s|%" PRIu64 "|%s|%d|%s|%" PRIu64 "|%u|%d|%" PRIu64, ep->type,
                strempty(ep->address), strempty(ep->client_id), strempty(ep->topic), ep->qos, strempty(ep->username),
                strempty(ep->password), strempty(ep->ca_file), strempty(ep->cert_file), strempty(ep->key_file),
                ep->keep_alive_usec, strempty(ep->url), ep->tls_insecure_skip_verify, strempty(ep->path),
                ep->max_size, ep->max_files, ep->fsync, ep->timeout_usec);
        fprintf(f, "|%s|%s|%u|%" PRIu64, strempty(ep->host_name), strempty(ep->gateway_host), ep->port,
                ep->token_ttl_usec);
        for (size_t i = 0; i < ep->n_devices; i++)
                fprintf(f, "|%s=%s", ep->devices[i].id, ep->devices[i].key);
        fprintf(f, "|%s|%s|%u", strempty(ep->create_policy), strempty(ep->create_key), ep->create_port);
        fprintf(f, "|%d|%u", ep->client_error_skip, ep->client_error_tries);
        for (size_t i = 0; i < ep->n_headers; i++)
                fprintf(f, "|%s=%s", ep->headers[i].name, ep->headers[i].value);
        if (fclose(f) != 0) {
                free(buf);
                return -ENOMEM;
        }
        ep->fingerprint = buf;
        return 0;
}

/* A host name for the SAS sr and the user name: at least one dot (IoT Hub SDKs split it). */
static bool host_name_valid(const char *h) {
        if (!*h || strlen(h) > 253 || !strchr(h, '.'))
                return false;
        for (const char *p = h; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
                      *p == '.'))
                        return false;
        return true;
}

/* type: upstream (endpoint-upstream.c): the cloud hub, and the devices that connect to it as
 * themselves with their upstream keys. */
static int parse_upstream(struct gw_endpoint_conf *ep, const struct adp_conf_node *item, struct adp_conf_errors *e) {
        const struct adp_conf_node *sub, *devs;
        const char *s;
        char found[128];
        uint64_t v;
        int r;

        if (adp_conf_get_string(item, "host_name", true, e, &s) == 0) {
                if (!host_name_valid(s))
                        adp_conf_error(e, adp_conf_get(item, "host_name"),
                                       "found %s, expected the cloud hub's DNS name with at least one dot "
                                       "(e.g. myhub.azure-devices.net)",
                                       adp_conf_describe(adp_conf_get(item, "host_name"), found, sizeof found));
                else if (!(ep->host_name = strdup(s)))
                        return -ENOMEM;
        }
        if (adp_conf_get_string(item, "gateway_host", false, e, &s) == 0) {
                if (!*s || strpbrk(s, "/:@ \t"))
                        adp_conf_error(e, adp_conf_get(item, "gateway_host"),
                                       "found %s, expected a host name or IPv4 address (no port, no scheme)",
                                       adp_conf_describe(adp_conf_get(item, "gateway_host"), found, sizeof found));
                else if (!(ep->gateway_host = strdup(s)))
                        return -ENOMEM;
        }
        if (adp_conf_get_uint(item, "port", false, 1, 65535, e, &v) == 0)
                ep->port = (unsigned) v;
        (void) adp_conf_get_duration(item, "keep_alive", false, 5 * USEC_PER_SEC, 1177 * USEC_PER_SEC, e,
                                     &ep->keep_alive_usec);
        (void) adp_conf_get_duration(item, "token_ttl", false, 10 * USEC_PER_SEC, UINT64_C(365) * 86400 * USEC_PER_SEC,
                                     e, &ep->token_ttl_usec);
        if (adp_conf_get_map(item, "tls", false, e, &sub) == 0) {
                (void) adp_conf_check_keys(sub, upstream_tls_keys, e);
                if ((r = get_abs_path(sub, "ca_file", e, &ep->ca_file)) < 0)
                        return r;
        }
        if (adp_conf_get_map(item, "create_missing", false, e, &sub) == 0) {
                (void) adp_conf_check_keys(sub, create_missing_keys, e);
                if ((r = get_str(sub, "policy", true, e, &ep->create_policy)) < 0)
                        return r;
                r = adp_conf_get_secret(sub, "key", true, e, &ep->create_key);
                if (r == -ENOMEM)
                        return r;
                ep->create_port = 443;
                if (adp_conf_get_uint(sub, "port", false, 1, 65535, e, &v) == 0)
                        ep->create_port = (unsigned) v;
        }
        if (adp_conf_get_seq(item, "devices", true, e, &devs) < 0)
                return 0;
        if (adp_conf_len(devs) == 0) {
                adp_conf_error(e, devs, "found an empty list, expected at least one device with its upstream key");
                return 0;
        }
        ep->devices = calloc(adp_conf_len(devs), sizeof *ep->devices);
        if (!ep->devices)
                return -ENOMEM;
        for (size_t i = 0; i < adp_conf_len(devs); i++) {
                const struct adp_conf_node *d = adp_conf_at(devs, i);
                const char *id;
                char *key = NULL;
                bool dup = false;
                char sig[45];
                if (adp_conf_kind(d) != ADP_CONF_MAP) {
                        adp_conf_error(e, d, "found %s, expected a mapping with id and key_file or key_credential",
                                       adp_conf_describe(d, found, sizeof found));
                        continue;
                }
                (void) adp_conf_check_keys(d, upstream_device_keys, e);
                if (adp_conf_get_string(d, "id", true, e, &id) < 0)
                        continue;
                if (!hub_device_id_valid(id)) {
                        adp_conf_error(e, adp_conf_get(d, "id"), "found %s, expected a device id",
                                       adp_conf_describe(adp_conf_get(d, "id"), found, sizeof found));
                        continue;
                }
                for (size_t j = 0; j < ep->n_devices; j++)
                        dup = dup || streq(ep->devices[j].id, id);
                if (dup) {
                        adp_conf_error(e, adp_conf_get(d, "id"), "found \"%s\" again, expected unique ids", id);
                        continue;
                }
                r = adp_conf_get_secret(d, "key", true, e, &key);
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        continue;
                if (hub_sas_sign("x", 1, key, sig) < 0) {
                        adp_conf_error(e, d, "the key of device \"%s\" is not the base64 of 16 to 64 bytes", id);
                        wipe_free(key);
                        continue;
                }
                ep->devices[ep->n_devices].key = key;
                if (!(ep->devices[ep->n_devices].id = strdup(id)))
                        return -ENOMEM;
                ep->n_devices++;
        }
        return 0;
}

static int parse_endpoint(struct gw_routing_conf *c, const struct adp_conf_node *item, struct adp_conf_errors *e) {
        struct gw_endpoint_conf *ep = &c->endpoints[c->n_endpoints];
        const struct adp_conf_node *sub;
        const char *name;
        char found[128];
        int type, r;
        uint64_t v;

        if (adp_conf_kind(item) != ADP_CONF_MAP) {
                adp_conf_error(e, item, "found %s, expected a mapping with name and type",
                               adp_conf_describe(item, found, sizeof found));
                return 0;
        }
        if (adp_conf_get_string(item, "name", true, e, &name) < 0 ||
            adp_conf_get_enum(item, "type", true, type_names, e, &type) < 0)
                return 0;
        if (!hub_route_name_is_valid(name) || streq(name, HUB_OUTBOX_EVENTS)) {
                adp_conf_error(e, adp_conf_get(item, "name"),
                               "found %s, expected 1 to 64 letters, digits, '.', '_' or '-' other than \"events\" "
                               "(the built-in endpoint)", adp_conf_describe(adp_conf_get(item, "name"), found,
                                                                             sizeof found));
                return 0;
        }
        for (size_t i = 0; i < c->n_endpoints; i++)
                if (streq(c->endpoints[i].name, name)) {
                        adp_conf_error(e, adp_conf_get(item, "name"), "found \"%s\" again, expected unique names",
                                       name);
                        return 0;
                }
        *ep = (struct gw_endpoint_conf) {
                .type = type,
                .queue = { .overflow = HUB_OUTBOX_DROP_OLDEST },
                .batch_max = type == GW_ENDPOINT_HTTP ? 100 : 500,
                .batch_delay_usec = 50 * USEC_PER_MSEC,
                .inflight = 1000,
                .retry_initial_usec = 250 * USEC_PER_MSEC,
                .retry_max_usec = 10 * USEC_PER_SEC,
                .timeout_usec = 10 * USEC_PER_SEC,
                .qos = 1,
                .keep_alive_usec = 30 * USEC_PER_SEC,
                .max_size = 16 * 1024 * 1024,
                .max_files = 5,
                .fsync = GW_FILE_FSYNC_BATCH,
                .port = 8883,
                .token_ttl_usec = 3600 * USEC_PER_SEC,
                .client_error_tries = 3,
        };
        ep->name = strdup(name);
        if (!ep->name)
                return -ENOMEM;
        c->n_endpoints++; /* owned from here on: freed with the configuration */
        if (type == GW_ENDPOINT_UPSTREAM)
                ep->keep_alive_usec = 240 * USEC_PER_SEC;
        else
                /* One connection to a broker, webhook or file: retrying every second at most
                 * lets a drain start within a second of the far side coming back. The upstream
                 * endpoint keeps 10 s: it opens one connection per device to a cloud hub that
                 * throttles new connections. */
                ep->retry_max_usec = USEC_PER_SEC;
        (void) check_keys_of(item, type, e);

        if (adp_conf_get_map(item, "queue", false, e, &sub) == 0) {
                int ov;
                (void) adp_conf_check_keys(sub, queue_keys, e);
                (void) adp_conf_get_uint(sub, "max_messages", false, 0, UINT64_C(1) << 40, e, &ep->queue.max_count);
                (void) adp_conf_get_size(sub, "max_bytes", false, 0, UINT64_C(1) << 50, e, &ep->queue.max_bytes);
                if (adp_conf_get_enum(sub, "overflow", false, overflow_names, e, &ov) == 0)
                        ep->queue.overflow = ov;
                (void) adp_conf_get_duration(sub, "ttl", false, 0, UINT64_C(3650) * 86400 * USEC_PER_SEC, e,
                                             &ep->queue.ttl_usec);
        }
        if (adp_conf_get_map(item, "batch", false, e, &sub) == 0) {
                (void) adp_conf_check_keys(sub, batch_keys, e);
                if (adp_conf_get_uint(sub, "max_messages", false, 1, 10000, e, &v) == 0)
                        ep->batch_max = (unsigned) v;
                (void) adp_conf_get_duration(sub, "max_delay", false, 0, 60 * USEC_PER_SEC, e, &ep->batch_delay_usec);
        }
        if (adp_conf_get_uint(item, "inflight", false, 1, 65535, e, &v) == 0)
                ep->inflight = (unsigned) v;
        if (adp_conf_get_map(item, "retry", false, e, &sub) == 0) {
                (void) adp_conf_check_keys(sub, retry_keys, e);
                (void) adp_conf_get_duration(sub, "initial", false, 10 * USEC_PER_MSEC, 3600 * USEC_PER_SEC, e,
                                             &ep->retry_initial_usec);
                (void) adp_conf_get_duration(sub, "max", false, 10 * USEC_PER_MSEC, 3600 * USEC_PER_SEC, e,
                                             &ep->retry_max_usec);
                if (ep->retry_max_usec < ep->retry_initial_usec)
                        adp_conf_error(e, sub, "retry.max is shorter than retry.initial, expected max >= initial");
        }
        (void) adp_conf_get_duration(item, "timeout", false, 100 * USEC_PER_MSEC, 600 * USEC_PER_SEC, e,
                                     &ep->timeout_usec);

        switch (type) {
        case GW_ENDPOINT_MQTT: {
                const char *addr;
                if ((r = get_str(item, "client_id", false, e, &ep->client_id)) < 0 ||
                    (r = get_str(item, "topic", true, e, &ep->topic)) < 0 ||
                    (r = get_str(item, "username", false, e, &ep->username)) < 0)
                        return r;
                if (adp_conf_get_string(item, "address", true, e, &addr) == 0) {
                        if (strncmp(addr, "tcp://", 6) != 0 && strncmp(addr, "ssl://", 6) != 0 &&
                            strncmp(addr, "mqtt://", 7) != 0 && strncmp(addr, "mqtts://", 8) != 0)
                                adp_conf_error(e, adp_conf_get(item, "address"),
                                               "found %s, expected tcp://host:port or ssl://host:port",
                                               adp_conf_describe(adp_conf_get(item, "address"), found, sizeof found));
                        else if (!(ep->address = strdup(addr)))
                                return -ENOMEM;
                }
                if (ep->topic)
                        check_topic(adp_conf_get(item, "topic"), ep->topic, e);
                if (adp_conf_get_uint(item, "qos", false, 1, 1, e, &v) == 0)
                        ep->qos = (unsigned) v;
                r = adp_conf_get_secret(item, "password", false, e, &ep->password);
                if (r == -ENOMEM)
                        return r;
                if (ep->password && !ep->username)
                        adp_conf_error(e, item, "a password is given without a username, expected both");
                (void) adp_conf_get_duration(item, "keep_alive", false, USEC_PER_SEC, 3600 * USEC_PER_SEC, e,
                                             &ep->keep_alive_usec);
                if (adp_conf_get_map(item, "tls", false, e, &sub) == 0) {
                        (void) adp_conf_check_keys(sub, mqtt_tls_keys, e);
                        if ((r = get_abs_path(sub, "ca_file", e, &ep->ca_file)) < 0 ||
                            (r = get_abs_path(sub, "cert_file", e, &ep->cert_file)) < 0 ||
                            (r = get_abs_path(sub, "key_file", e, &ep->key_file)) < 0)
                                return r;
                        if (!ep->cert_file != !ep->key_file)
                                adp_conf_error(e, sub, "only one of cert_file and key_file is given, expected both");
                }
                break;
        }
        case GW_ENDPOINT_HTTP: {
                const char *url;
                bool verify = true;
                if (adp_conf_get_string(item, "url", true, e, &url) == 0) {
                        if (strncmp(url, "https://", 8) != 0 && strncmp(url, "http://", 7) != 0)
                                adp_conf_error(e, adp_conf_get(item, "url"), "found %s, expected an https:// URL",
                                               adp_conf_describe(adp_conf_get(item, "url"), found, sizeof found));
                        else if (strncmp(url, "http://", 7) == 0 && !url_is_loopback(url + 7))
                                adp_conf_error(e, adp_conf_get(item, "url"),
                                               "found %s, expected an https:// URL (plain http:// only to "
                                               "127.0.0.0/8, [::1] or localhost)",
                                               adp_conf_describe(adp_conf_get(item, "url"), found, sizeof found));
                        else if (!(ep->url = strdup(url)))
                                return -ENOMEM;
                }
                if ((r = parse_headers(ep, item, e)) < 0)
                        return r;
                int ce;
                if (adp_conf_get_enum(item, "on_client_error", false, client_error_names, e, &ce) == 0)
                        ep->client_error_skip = ce == 1;
                if (adp_conf_get_uint(item, "client_error_tries", false, 1, 1000, e, &v) == 0)
                        ep->client_error_tries = (unsigned) v;
                if (adp_conf_get_map(item, "tls", false, e, &sub) == 0) {
                        (void) adp_conf_check_keys(sub, http_tls_keys, e);
                        if ((r = get_abs_path(sub, "ca_file", e, &ep->ca_file)) < 0)
                                return r;
                        if (adp_conf_get_bool(sub, "verify", false, e, &verify) == 0)
                                ep->tls_insecure_skip_verify = !verify;
                }
                break;
        }
        case GW_ENDPOINT_FILE: {
                const char *file;
                int fs;
                if (adp_conf_get_string(item, "file", true, e, &file) == 0) {
                        if (!*file || strchr(file, '/') || streq(file, ".") || streq(file, ".."))
                                adp_conf_error(e, adp_conf_get(item, "file"),
                                               "found %s, expected a file name (no '/') under logs_dir",
                                               adp_conf_describe(adp_conf_get(item, "file"), found, sizeof found));
                        else if (!(ep->path = strdup(file)))
                                return -ENOMEM;
                }
                (void) adp_conf_get_size(item, "max_size", false, 4096, UINT64_C(1) << 40, e, &ep->max_size);
                if (adp_conf_get_uint(item, "max_files", false, 1, 1000, e, &v) == 0)
                        ep->max_files = (unsigned) v;
                if (adp_conf_get_enum(item, "fsync", false, fsync_names, e, &fs) == 0)
                        ep->fsync = fs;
                break;
        }
        case GW_ENDPOINT_UPSTREAM:
                if ((r = parse_upstream(ep, item, e)) < 0)
                        return r;
                break;
        default:
                break;
        }
        return 0;
}

static bool endpoint_known(const struct gw_routing_conf *c, const char *name) {
        return streq(name, HUB_OUTBOX_EVENTS) || gw_routing_conf_endpoint(c, name);
}

static void check_names_known(const struct gw_routing_conf *c, const struct adp_conf_node *at, char **names,
                              size_t n, struct adp_conf_errors *e) {
        for (size_t i = 0; i < n; i++)
                if (!endpoint_known(c, names[i]))
                        adp_conf_error(e, at, "unknown endpoint \"%s\", expected \"events\" or a name from endpoints",
                                       names[i]);
}

static int parse_route(struct gw_routing_conf *c, const struct adp_conf_node *item, struct adp_conf_errors *e) {
        struct gw_route_conf *rt = &c->routes[c->n_routes];
        const char *name, *cond = NULL;
        char found[128];
        int src = 0, r;

        if (adp_conf_kind(item) != ADP_CONF_MAP) {
                adp_conf_error(e, item, "found %s, expected a mapping with name, condition and endpoint",
                               adp_conf_describe(item, found, sizeof found));
                return 0;
        }
        (void) adp_conf_check_keys(item, route_keys, e);
        if (adp_conf_get_string(item, "name", true, e, &name) < 0)
                return 0;
        if (!hub_route_name_is_valid(name)) {
                adp_conf_error(e, adp_conf_get(item, "name"),
                               "found %s, expected 1 to 64 letters, digits, '.', '_' or '-'",
                               adp_conf_describe(adp_conf_get(item, "name"), found, sizeof found));
                return 0;
        }
        for (size_t i = 0; i < c->n_routes; i++)
                if (streq(c->routes[i].name, name)) {
                        adp_conf_error(e, adp_conf_get(item, "name"), "found \"%s\" again, expected unique names",
                                       name);
                        return 0;
                }
        *rt = (struct gw_route_conf) { .enabled = true };
        if (!(rt->name = strdup(name)))
                return -ENOMEM;
        c->n_routes++;
        (void) adp_conf_get_enum(item, "source", false, source_names, e, &src);
        rt->source = src;
        (void) adp_conf_get_bool(item, "enabled", false, e, &rt->enabled);
        if (adp_conf_get_string(item, "condition", false, e, &cond) == 0) {
                struct hub_condition *hc = NULL;
                struct hub_query_error qe = { 0 };
                r = hub_condition_parse(cond, &hc, &qe);
                hub_condition_free(hc);
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        adp_conf_error(e, adp_conf_get(item, "condition"),
                                       "the condition does not parse at line %u, column %u of the condition "
                                       "(character %u): %s",
                                       qe.line, qe.column, qe.offset + 1, qe.message);
                if (!(rt->condition = strdup(cond)))
                        return -ENOMEM;
        }
        bool has_one = adp_conf_get(item, "endpoint") != NULL, has_many = adp_conf_get(item, "endpoints") != NULL;
        if (has_one && has_many) {
                adp_conf_error(e, item, "found both endpoint and endpoints, expected one of them");
                return 0;
        }
        if (!has_one && !has_many) {
                adp_conf_error(e, item, "missing key endpoint, expected the endpoint the route sends to");
                return 0;
        }
        const char *key = has_one ? "endpoint" : "endpoints";
        r = get_names(item, key, e, &rt->endpoints, &rt->n_endpoints);
        if (r == -ENOMEM)
                return r;
        if (r == 0)
                check_names_known(c, adp_conf_get(item, key), rt->endpoints, rt->n_endpoints, e);
        return 0;
}

static int parse_enrichment(struct gw_routing_conf *c, const struct adp_conf_node *item, struct adp_conf_errors *e) {
        struct gw_enrichment_conf *en = &c->enrichments[c->n_enrichments];
        const char *key, *value;
        char found[128];
        int r;

        if (adp_conf_kind(item) != ADP_CONF_MAP) {
                adp_conf_error(e, item, "found %s, expected a mapping with key, value and endpoints",
                               adp_conf_describe(item, found, sizeof found));
                return 0;
        }
        (void) adp_conf_check_keys(item, enrich_keys, e);
        if (adp_conf_get_string(item, "key", true, e, &key) < 0 || adp_conf_get_string(item, "value", true, e, &value) < 0)
                return 0;
        *en = (struct gw_enrichment_conf) { 0 };
        if (!(en->key = strdup(key)) || !(en->value = strdup(value))) {
                free(en->key);
                return -ENOMEM;
        }
        c->n_enrichments++;
        r = get_names(item, "endpoints", e, &en->endpoints, &en->n_endpoints);
        if (r == -ENOMEM)
                return r;
        if (r == -ENOENT)
                adp_conf_error(e, item, "missing key endpoints, expected the endpoints the enrichment applies to");
        if (r == 0)
                check_names_known(c, adp_conf_get(item, "endpoints"), en->endpoints, en->n_endpoints, e);
        return 0;
}

int gw_routing_conf_router(const struct gw_routing_conf *c, const char *hub_name, struct hub_router **ret) {
        _cleanup_(hub_router_freep) struct hub_router *rt = NULL;
        int r = hub_router_new(hub_name, &rt);
        if (r < 0)
                return r;
        for (size_t i = 0; i < c->n_routes; i++) {
                const struct gw_route_conf *x = &c->routes[i];
                struct hub_route_def d = { x->name, x->source, x->condition, (const char *const *) x->endpoints,
                                           x->n_endpoints, x->enabled };
                r = hub_router_add_route(rt, &d, NULL);
                if (r < 0)
                        return r;
        }
        r = hub_router_set_fallback(rt, c->fallback_enabled, (const char *const *) c->fallback_endpoints,
                                    c->n_fallback_endpoints);
        if (r < 0)
                return r;
        for (size_t i = 0; i < c->n_enrichments; i++) {
                const struct gw_enrichment_conf *x = &c->enrichments[i];
                struct hub_enrichment_def d = { x->key, x->value, (const char *const *) x->endpoints, x->n_endpoints };
                r = hub_router_add_enrichment(rt, &d);
                if (r < 0)
                        return r;
        }
        *ret = TAKE_PTR(rt);
        return 0;
}

int gw_routing_conf_parse(const struct adp_conf_node *root, struct gw_routing_conf **ret, struct adp_conf_errors *e) {
        _cleanup_(gw_routing_conf_freep) struct gw_routing_conf *c = calloc(1, sizeof *c);
        const struct adp_conf_node *seq, *fb;
        size_t before = adp_conf_errors_total(e);
        int r;

        if (!c)
                return -ENOMEM;
        c->fallback_enabled = true;
        c->logs_dir = strdup(GW_LOGS_DIR_DEFAULT);
        if (!c->logs_dir)
                return -ENOMEM;
        if ((r = get_abs_path(root, "logs_dir", e, &c->logs_dir)) < 0)
                return r;

        if (adp_conf_get_seq(root, "endpoints", false, e, &seq) == 0) {
                if (adp_conf_len(seq) > GW_ENDPOINTS_MAX)
                        adp_conf_error(e, seq, "found %zu endpoints, expected at most %u", adp_conf_len(seq),
                                       GW_ENDPOINTS_MAX);
                c->endpoints = calloc(adp_conf_len(seq) + 1, sizeof *c->endpoints);
                if (!c->endpoints)
                        return -ENOMEM;
                for (size_t i = 0; i < adp_conf_len(seq); i++)
                        if ((r = parse_endpoint(c, adp_conf_at(seq, i), e)) < 0)
                                return r;
                for (size_t i = 0; i < c->n_endpoints; i++) {
                        struct gw_endpoint_conf *ep = &c->endpoints[i];
                        if (ep->type == GW_ENDPOINT_FILE && ep->path) {
                                char *p = NULL;
                                if (asprintf(&p, "%s/%s", c->logs_dir, ep->path) < 0)
                                        return -ENOMEM;
                                free(ep->path);
                                ep->path = p;
                        }
                        if ((r = fingerprint(ep)) < 0)
                                return r;
                }
        }
        if (adp_conf_get_seq(root, "routes", false, e, &seq) == 0) {
                if (adp_conf_len(seq) > HUB_ROUTER_MAX_ROUTES)
                        adp_conf_error(e, seq, "found %zu routes, expected at most %u", adp_conf_len(seq),
                                       HUB_ROUTER_MAX_ROUTES);
                c->routes = calloc(adp_conf_len(seq) + 1, sizeof *c->routes);
                if (!c->routes)
                        return -ENOMEM;
                for (size_t i = 0; i < adp_conf_len(seq); i++)
                        if ((r = parse_route(c, adp_conf_at(seq, i), e)) < 0)
                                return r;
        }
        if (adp_conf_get_map(root, "fallback_route", false, e, &fb) == 0) {
                (void) adp_conf_check_keys(fb, fallback_keys, e);
                (void) adp_conf_get_bool(fb, "enabled", false, e, &c->fallback_enabled);
                r = get_names(fb, "endpoints", e, &c->fallback_endpoints, &c->n_fallback_endpoints);
                if (r == -ENOMEM)
                        return r;
                if (r == 0)
                        check_names_known(c, adp_conf_get(fb, "endpoints"), c->fallback_endpoints,
                                          c->n_fallback_endpoints, e);
        }
        if (adp_conf_get_seq(root, "enrichments", false, e, &seq) == 0) {
                if (adp_conf_len(seq) > HUB_ROUTER_MAX_ENRICHMENTS)
                        adp_conf_error(e, seq, "found %zu enrichments, expected at most %u", adp_conf_len(seq),
                                       HUB_ROUTER_MAX_ENRICHMENTS);
                c->enrichments = calloc(adp_conf_len(seq) + 1, sizeof *c->enrichments);
                if (!c->enrichments)
                        return -ENOMEM;
                for (size_t i = 0; i < adp_conf_len(seq); i++)
                        if ((r = parse_enrichment(c, adp_conf_at(seq, i), e)) < 0)
                                return r;
        }
        if (adp_conf_errors_total(e) != before)
                return -EINVAL;

        /* What only the router knows (enrichment values, duplicate keys per endpoint). */
        for (size_t i = 0; i < c->n_enrichments; i++) {
                _cleanup_(hub_router_freep) struct hub_router *rt = NULL;
                const struct gw_enrichment_conf *x = &c->enrichments[i];
                struct hub_enrichment_def d = { x->key, x->value, (const char *const *) x->endpoints, x->n_endpoints };
                const struct adp_conf_node *item = adp_conf_at(adp_conf_get(root, "enrichments"), i);
                if (hub_router_new("x", &rt) < 0)
                        return -ENOMEM;
                for (size_t j = 0; j < i; j++) {
                        const struct gw_enrichment_conf *y = &c->enrichments[j];
                        struct hub_enrichment_def dy = { y->key, y->value, (const char *const *) y->endpoints,
                                                         y->n_endpoints };
                        (void) hub_router_add_enrichment(rt, &dy);
                }
                r = hub_router_add_enrichment(rt, &d);
                if (r == -EEXIST)
                        adp_conf_error(e, adp_conf_get(item, "key"),
                                       "key \"%s\" is enriched twice for one endpoint, expected once", x->key);
                else if (r == -EINVAL)
                        adp_conf_error(e, adp_conf_get(item, "value"),
                                       "found \"%s\", expected a static value, $iothubname, $twin.tags.<path>, "
                                       "$twin.properties.desired.<path> or $twin.properties.reported.<path> "
                                       "(and a key of letters, digits, '.', '_' or '-')", x->value);
                else if (r < 0)
                        return r;
        }
        if (adp_conf_errors_total(e) != before)
                return -EINVAL;
        *ret = TAKE_PTR(c);
        return 0;
}
