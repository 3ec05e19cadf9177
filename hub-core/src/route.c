/* SPDX-License-Identifier: MIT */
/* Message routing: the route table, the fallback route and enrichments (see hub/route.h). */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/json-dump.h"
#include "hub/msg.h"
#include "hub/query.h"
#include "hub/route.h"

struct route {
        char *name;
        enum hub_route_source source;
        struct hub_condition *cond;
        uint64_t endpoints; /* set of endpoint indices */
        bool enabled;
        bool always;        /* no condition, or the literal `true`: not evaluated per message */
};

enum enrich_kind { ENRICH_STATIC, ENRICH_HUB_NAME, ENRICH_TWIN };

struct enrichment {
        char *key;
        char *value;
        enum enrich_kind kind;
        struct hub_condition *path; /* ENRICH_TWIN: the parsed `$twin.…` reference */
        uint64_t endpoints;
};

struct hub_router {
        char *hub_name;
        struct route *routes;
        size_t n_routes;
        struct enrichment *enrich;
        size_t n_enrich;
        char *endpoint_names[HUB_ROUTER_MAX_ENDPOINTS];
        size_t n_endpoints;
        bool fallback_enabled;
        uint64_t fallback_endpoints;
        uint64_t enriched;  /* endpoints that have at least one enrichment */
        bool needs_twin;
};

static const char *const source_names[_HUB_ROUTE_SOURCE_MAX] = {
        [HUB_ROUTE_SOURCE_DEVICE_MESSAGES] = "DeviceMessages",
        [HUB_ROUTE_SOURCE_TWIN_CHANGE_EVENTS] = "TwinChangeEvents",
        [HUB_ROUTE_SOURCE_DEVICE_LIFECYCLE_EVENTS] = "DeviceLifecycleEvents",
        [HUB_ROUTE_SOURCE_DEVICE_CONNECTION_STATE_EVENTS] = "DeviceConnectionStateEvents",
};

/* iothub-message-source values (reference §8.3, §8.7). */
static const char *const source_wire[_HUB_ROUTE_SOURCE_MAX] = {
        [HUB_ROUTE_SOURCE_DEVICE_MESSAGES] = "Telemetry",
        [HUB_ROUTE_SOURCE_TWIN_CHANGE_EVENTS] = "twinChangeEvents",
        [HUB_ROUTE_SOURCE_DEVICE_LIFECYCLE_EVENTS] = "deviceLifecycleEvents",
        [HUB_ROUTE_SOURCE_DEVICE_CONNECTION_STATE_EVENTS] = "deviceConnectionStateEvents",
};

const char *hub_route_source_to_string(enum hub_route_source s) {
        if ((unsigned) s >= _HUB_ROUTE_SOURCE_MAX)
                return NULL;
        return source_names[s];
}

int hub_route_source_from_string(const char *s, enum hub_route_source *ret) {
        if (!s || !ret)
                return -EINVAL;
        for (unsigned i = 0; i < _HUB_ROUTE_SOURCE_MAX; i++)
                if (strcmp(s, source_names[i]) == 0) {
                        *ret = (enum hub_route_source) i;
                        return 0;
                }
        return -EINVAL;
}

int hub_route_source_of_msg(const struct hub_msg *m, enum hub_route_source *ret) {
        if (!m || !ret)
                return -EINVAL;
        const char *v = hub_msg_get_sys(m, HUB_SYS_MESSAGE_SOURCE);
        if (!v) {
                *ret = HUB_ROUTE_SOURCE_DEVICE_MESSAGES;
                return 0;
        }
        /* Older documents spell module lifecycle events separately; they are lifecycle events. */
        if (strcmp(v, "moduleLifecycleEvents") == 0) {
                *ret = HUB_ROUTE_SOURCE_DEVICE_LIFECYCLE_EVENTS;
                return 0;
        }
        for (unsigned i = 0; i < _HUB_ROUTE_SOURCE_MAX; i++)
                if (strcmp(v, source_wire[i]) == 0) {
                        *ret = (enum hub_route_source) i;
                        return 0;
                }
        return -EINVAL;
}

bool hub_route_name_is_valid(const char *s) {
        if (!s)
                return false;
        size_t n = strlen(s);
        if (n == 0 || n > HUB_ROUTE_NAME_MAX)
                return false;
        for (size_t i = 0; i < n; i++) {
                char c = s[i];
                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                      c == '_' || c == '-'))
                        return false;
        }
        return true;
}

int hub_router_new(const char *hub_name, struct hub_router **ret) {
        if (!hub_name || !ret)
                return -EINVAL;
        struct hub_router *r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        r->hub_name = strdup(hub_name);
        if (!r->hub_name) {
                free(r);
                return -ENOMEM;
        }
        r->fallback_enabled = true;
        const char *ev = "events";
        int k = hub_router_set_fallback(r, true, &ev, 1);
        if (k < 0) {
                hub_router_free(r);
                return k;
        }
        *ret = r;
        return 0;
}

struct hub_router *hub_router_free(struct hub_router *r) {
        if (!r)
                return NULL;
        for (size_t i = 0; i < r->n_routes; i++) {
                free(r->routes[i].name);
                hub_condition_free(r->routes[i].cond);
        }
        free(r->routes);
        for (size_t i = 0; i < r->n_enrich; i++) {
                free(r->enrich[i].key);
                free(r->enrich[i].value);
                hub_condition_free(r->enrich[i].path);
        }
        free(r->enrich);
        for (size_t i = 0; i < r->n_endpoints; i++)
                free(r->endpoint_names[i]);
        free(r->hub_name);
        free(r);
        return NULL;
}

/* Endpoint names follow the outbox's rule (1..64 of [A-Za-z0-9_.-]). */
static int endpoint_intern(struct hub_router *r, const char *name) {
        if (!hub_route_name_is_valid(name))
                return -EINVAL;
        for (size_t i = 0; i < r->n_endpoints; i++)
                if (strcmp(r->endpoint_names[i], name) == 0)
                        return (int) i;
        if (r->n_endpoints >= HUB_ROUTER_MAX_ENDPOINTS)
                return -E2BIG;
        char *c = strdup(name);
        if (!c)
                return -ENOMEM;
        r->endpoint_names[r->n_endpoints] = c;
        return (int) r->n_endpoints++;
}

/* Interns every name; on failure the names added stay interned (harmless: unreferenced). */
static int endpoint_set(struct hub_router *r, const char *const *names, size_t n, uint64_t *ret) {
        uint64_t set = 0;
        if (!names || n == 0)
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                int k = endpoint_intern(r, names[i]);
                if (k < 0)
                        return k;
                set |= UINT64_C(1) << k;
        }
        *ret = set;
        return 0;
}

/* Whether a condition text may refer to the twin: conservative (a string literal that
 * contains "$twin" only costs a twin load). */
static bool mentions_twin(const char *text) {
        for (const char *p = text; p && (p = strchr(p, '$')); p++)
                if (strncasecmp(p, "$twin", 5) == 0)
                        return true;
        return false;
}

/* Whether a condition text is empty or the literal `true` (any case, blanks and parentheses
 * around it): such a route matches every message of its source without an evaluation. */
static bool always_true(const char *text) {
        size_t open = 0, close = 0;
        const char *p = text ? text : "";
        for (;; p++) {
                if (*p == '(')
                        open++;
                else if (!(*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
                        break;
        }
        if (*p == 0)
                return open == 0;
        if (strncasecmp(p, "true", 4) != 0)
                return false;
        for (p += 4; *p; p++) {
                if (*p == ')')
                        close++;
                else if (!(*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
                        return false;
        }
        return open == close;
}

int hub_router_add_route(struct hub_router *r, const struct hub_route_def *def, struct hub_query_error *err) {
        _cleanup_(hub_condition_freep) struct hub_condition *cond = NULL;
        uint64_t set;
        int k;

        if (!r || !def || !hub_route_name_is_valid(def->name) || (unsigned) def->source >= _HUB_ROUTE_SOURCE_MAX)
                return -EINVAL;
        for (size_t i = 0; i < r->n_routes; i++)
                if (strcmp(r->routes[i].name, def->name) == 0)
                        return -EEXIST;
        if (r->n_routes >= HUB_ROUTER_MAX_ROUTES)
                return -E2BIG;
        k = hub_condition_parse(def->condition ? def->condition : "", &cond, err);
        if (k == -EINVAL || k == -E2BIG)
                return -EBADMSG;
        if (k < 0)
                return k;
        k = endpoint_set(r, def->endpoints, def->n_endpoints, &set);
        if (k < 0)
                return k;
        struct route *n = realloc(r->routes, (r->n_routes + 1) * sizeof *n);
        if (!n)
                return -ENOMEM;
        r->routes = n;
        char *name = strdup(def->name);
        if (!name)
                return -ENOMEM;
        r->routes[r->n_routes++] = (struct route) {
                .name = name,
                .source = def->source,
                .cond = TAKE_PTR(cond),
                .endpoints = set,
                .enabled = def->enabled,
                .always = always_true(def->condition),
        };
        if (def->enabled && mentions_twin(def->condition))
                r->needs_twin = true;
        return 0;
}

int hub_router_set_fallback(struct hub_router *r, bool enabled, const char *const *endpoints, size_t n) {
        static const char *const events[] = { "events" };
        uint64_t set;
        if (!r)
                return -EINVAL;
        if (!endpoints || n == 0) {
                endpoints = events;
                n = 1;
        }
        int k = endpoint_set(r, endpoints, n, &set);
        if (k < 0)
                return k;
        r->fallback_enabled = enabled;
        r->fallback_endpoints = set;
        return 0;
}

static bool twin_path_is_valid(const char *v) {
        static const char *const prefixes[] = { "$twin.tags.", "$twin.properties.desired.",
                                                "$twin.properties.reported." };
        for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
                size_t l = strlen(prefixes[i]);
                if (strncmp(v, prefixes[i], l) == 0 && v[l])
                        return true;
        }
        return false;
}

int hub_router_add_enrichment(struct hub_router *r, const struct hub_enrichment_def *def) {
        _cleanup_(hub_condition_freep) struct hub_condition *path = NULL;
        enum enrich_kind kind = ENRICH_STATIC;
        uint64_t set;
        int k;

        if (!r || !def || !def->value || !hub_route_name_is_valid(def->key))
                return -EINVAL;
        if (r->n_enrich >= HUB_ROUTER_MAX_ENRICHMENTS)
                return -E2BIG;
        if (def->value[0] == '$') {
                if (strcmp(def->value, "$iothubname") == 0)
                        kind = ENRICH_HUB_NAME;
                else if (twin_path_is_valid(def->value)) {
                        kind = ENRICH_TWIN;
                        k = hub_condition_parse(def->value, &path, NULL);
                        if (k == -ENOMEM)
                                return k;
                        if (k < 0)
                                return -EINVAL;
                } else
                        return -EINVAL;
        }
        k = endpoint_set(r, def->endpoints, def->n_endpoints, &set);
        if (k < 0)
                return k;
        for (size_t i = 0; i < r->n_enrich; i++)
                if (strcmp(r->enrich[i].key, def->key) == 0 && (r->enrich[i].endpoints & set))
                        return -EEXIST;
        struct enrichment *n = realloc(r->enrich, (r->n_enrich + 1) * sizeof *n);
        if (!n)
                return -ENOMEM;
        r->enrich = n;
        char *key = strdup(def->key), *value = strdup(def->value);
        if (!key || !value) {
                free(key);
                free(value);
                return -ENOMEM;
        }
        r->enrich[r->n_enrich++] = (struct enrichment) {
                .key = key,
                .value = value,
                .kind = kind,
                .path = TAKE_PTR(path),
                .endpoints = set,
        };
        r->enriched |= set;
        if (kind == ENRICH_TWIN)
                r->needs_twin = true;
        return 0;
}

int hub_router_endpoint_index(const struct hub_router *r, const char *endpoint) {
        if (!r || !endpoint)
                return -ENOENT;
        for (size_t i = 0; i < r->n_endpoints; i++)
                if (strcmp(r->endpoint_names[i], endpoint) == 0)
                        return (int) i;
        return -ENOENT;
}

size_t hub_router_n_endpoints(const struct hub_router *r) {
        return r ? r->n_endpoints : 0;
}

const char *hub_router_endpoint_name(const struct hub_router *r, size_t i) {
        return r && i < r->n_endpoints ? r->endpoint_names[i] : NULL;
}

size_t hub_router_n_routes(const struct hub_router *r) {
        return r ? r->n_routes : 0;
}

bool hub_router_needs_twin(const struct hub_router *r) {
        return r && r->needs_twin;
}

uint64_t hub_router_route(const struct hub_router *r, struct hub_cond_ctx *ctx, unsigned *ret_matched_routes) {
        enum hub_route_source src;
        uint64_t set = 0;
        unsigned matched = 0;

        if (ret_matched_routes)
                *ret_matched_routes = 0;
        if (!r || !ctx || !ctx->msg || hub_route_source_of_msg(ctx->msg, &src) < 0)
                return 0;
        for (size_t i = 0; i < r->n_routes; i++) {
                const struct route *rt = &r->routes[i];
                if (!rt->enabled || rt->source != src)
                        continue;
                if (rt->always || hub_condition_eval(rt->cond, ctx) == HUB_TRUE) {
                        set |= rt->endpoints;
                        matched++;
                }
        }
        if (matched == 0 && src == HUB_ROUTE_SOURCE_DEVICE_MESSAGES && r->fallback_enabled)
                set |= r->fallback_endpoints;
        if (ret_matched_routes)
                *ret_matched_routes = matched;
        return set;
}

static char *value_text(const json_t *v) {
        if (json_is_string(v))
                return strdup(json_string_value(v));
        return hub_json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
}

int hub_router_enrich(const struct hub_router *r, const char *endpoint, struct hub_msg *m, struct hub_cond_ctx *ctx) {
        int idx = hub_router_endpoint_index(r, endpoint), n = 0;
        if (!m)
                return -EINVAL;
        if (idx < 0 || !(r->enriched & (UINT64_C(1) << idx)))
                return 0; /* nothing stamped: the message is as it was accepted, within the limit */
        for (size_t i = 0; i < r->n_enrich; i++) {
                const struct enrichment *en = &r->enrich[i];
                _cleanup_free_ char *text = NULL;
                const char *v = en->value;
                int k;

                if (!(en->endpoints & (UINT64_C(1) << idx)))
                        continue;
                if (en->kind == ENRICH_HUB_NAME)
                        v = r->hub_name;
                else if (en->kind == ENRICH_TWIN) {
                        json_t *val = hub_condition_value(en->path, ctx);
                        if (val) {
                                text = value_text(val);
                                json_decref(val);
                                if (!text)
                                        return -ENOMEM;
                                v = text;
                        } /* else: the literal path, as IoT Hub does */
                }
                k = hub_msg_set_prop(m, en->key, v);
                if (k < 0)
                        return k;
                n++;
        }
        if (hub_msg_size(m) > HUB_MSG_D2C_MAX_SIZE)
                return -E2BIG;
        return n;
}
