/* SPDX-License-Identifier: MIT */
/* IoT Hub topics, user names and property bags over MQTT (reference §2). */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "front/mqtt-topic.h"
#include "hub/macro.h"
#include "hub/urlenc.h"

/* ---- small string helpers --------------------------------------------------------------- */

static struct gw_mqtt_str sub(const char *s, size_t from, size_t to) {
        return (struct gw_mqtt_str) { s + from, to - from };
}

static bool str_is(struct gw_mqtt_str a, const char *lit) {
        return gw_mqtt_str_eq(a, lit);
}

/* If s starts with prefix, advances past it and returns true. */
static bool eat(struct gw_mqtt_str *s, const char *prefix) {
        size_t n = strlen(prefix);

        if (s->len < n || memcmp(s->ptr, prefix, n) != 0)
                return false;
        s->ptr += n;
        s->len -= n;
        return true;
}

/* Takes the next "/"-terminated segment off s (the "/" is consumed). false if there is no "/". */
static bool next_segment(struct gw_mqtt_str *s, struct gw_mqtt_str *ret) {
        const char *slash = s->len ? memchr(s->ptr, '/', s->len) : NULL;

        if (!slash)
                return false;
        *ret = sub(s->ptr, 0, (size_t) (slash - s->ptr));
        s->len -= ret->len + 1;
        s->ptr = slash + 1;
        return true;
}

static bool has_char(struct gw_mqtt_str s, char c) {
        return s.len > 0 && memchr(s.ptr, c, s.len);
}

static int decode(struct gw_mqtt_str s, char **ret) {
        int r = hub_url_decode(s.len ? s.ptr : "", s.len, false, ret);
        return r == -EINVAL ? -EBADMSG : r;
}

static char *strndup_str(struct gw_mqtt_str s) {
        return strndup(s.len ? s.ptr : "", s.len);
}

/* Iterates "&"-separated items: name (up to the first "="), has_value, value. */
struct param_iter {
        struct gw_mqtt_str rest;
        bool done;
};

static bool param_next(struct param_iter *it, struct gw_mqtt_str *name, bool *has_value, struct gw_mqtt_str *value) {
        struct gw_mqtt_str item;
        const char *amp, *eq;

        if (it->done)
                return false;
        amp = it->rest.len ? memchr(it->rest.ptr, '&', it->rest.len) : NULL;
        if (amp) {
                item = sub(it->rest.ptr, 0, (size_t) (amp - it->rest.ptr));
                it->rest.len -= item.len + 1;
                it->rest.ptr = amp + 1;
        } else {
                item = it->rest;
                it->done = true;
        }
        eq = item.len ? memchr(item.ptr, '=', item.len) : NULL;
        if (eq) {
                *name = sub(item.ptr, 0, (size_t) (eq - item.ptr));
                *value = sub(item.ptr, name->len + 1, item.len);
                *has_value = true;
        } else {
                *name = item;
                *value = (struct gw_mqtt_str) { item.ptr + item.len, 0 };
                *has_value = false;
        }
        return true;
}

/* ---- user name ------------------------------------------------------------------------ */

void gw_mqtt_username_done(struct gw_mqtt_username *u) {
        if (!u)
                return;
        free(u->host);
        free(u->device_id);
        free(u->module_id);
        free(u->api_version);
        free(u->client_type);
        free(u->model_id);
        *u = (struct gw_mqtt_username) {};
}

int gw_mqtt_username_parse(const char *s, size_t len, struct gw_mqtt_username *ret) {
        _cleanup_(gw_mqtt_username_done) struct gw_mqtt_username u = {};
        struct gw_mqtt_str seg[4], rest, params, name, value;
        struct param_iter it;
        size_t n = 0;
        bool has_value;
        int r;

        if ((!s && len > 0) || !ret)
                return -EINVAL;
        if (len == 0 || memchr(s, '\0', len))
                return -EBADMSG;

        rest = (struct gw_mqtt_str) { s, len };
        while (n < 4 && next_segment(&rest, &seg[n]))
                n++;
        /* rest is now the last segment: the parameters. */
        if (has_char(rest, '/') || n < 2 || n > 3)
                return -EBADMSG;
        for (size_t i = 0; i < n; i++)
                if (seg[i].len == 0)
                        return -EBADMSG;
        params = rest;
        (void) eat(&params, "?");

        u.host = strndup_str(seg[0]);
        u.device_id = strndup_str(seg[1]);
        if (!u.host || !u.device_id)
                return -ENOMEM;
        if (n == 3) {
                u.module_id = strndup_str(seg[2]);
                if (!u.module_id)
                        return -ENOMEM;
        }

        it = (struct param_iter) { .rest = params };
        while (param_next(&it, &name, &has_value, &value)) {
                char **target;

                if (str_is(name, "api-version"))
                        target = &u.api_version;
                else if (str_is(name, "DeviceClientType"))
                        target = &u.client_type;
                else if (str_is(name, "model-id"))
                        target = &u.model_id;
                else
                        continue; /* unknown: ignored */
                if (!has_value || *target)
                        return -EBADMSG;
                r = decode(value, target);
                if (r < 0)
                        return r;
        }
        if (!u.api_version || u.api_version[0] == '\0')
                return -EBADMSG;

        *ret = u;
        u = (struct gw_mqtt_username) {};
        return 0;
}

bool gw_mqtt_client_id_matches(struct gw_mqtt_str client_id, const char *device_id, const char *module_id) {
        struct gw_mqtt_str c = client_id;
        size_t n;

        if (!device_id || (client_id.len > 0 && !client_id.ptr))
                return false;
        n = strlen(device_id);
        if (n == 0 || c.len < n || memcmp(c.ptr, device_id, n) != 0)
                return false;
        c.ptr += n;
        c.len -= n;
        if (!module_id)
                return c.len == 0;
        if (module_id[0] == '\0' || !eat(&c, "/"))
                return false;
        return str_is(c, module_id);
}

/* ---- device → hub topics -------------------------------------------------------------- */

static int parse_uint64(struct gw_mqtt_str s, uint64_t *ret) {
        uint64_t v = 0;

        if (s.len == 0 || s.len > 20)
                return -EBADMSG;
        for (size_t i = 0; i < s.len; i++) {
                unsigned d;

                if (s.ptr[i] < '0' || s.ptr[i] > '9')
                        return -EBADMSG;
                d = (unsigned) (s.ptr[i] - '0');
                if (v > (UINT64_MAX - d) / 10)
                        return -EBADMSG;
                v = v * 10 + d;
        }
        *ret = v;
        return 0;
}

static int parse_status(struct gw_mqtt_str s, int *ret) {
        bool neg = eat(&s, "-");
        uint64_t v;
        int r = parse_uint64(s, &v);

        if (r < 0)
                return r;
        if (v > (neg ? (uint64_t) INT32_MAX + 1 : (uint64_t) INT32_MAX))
                return -EBADMSG;
        *ret = neg ? (int) (-(int64_t) v) : (int) v;
        return 0;
}

/* The "?$rid=...&$version=..." tail of twin and method topics. */
static int parse_request_params(struct gw_mqtt_str s, bool allow_version, struct gw_mqtt_topic *t) {
        struct gw_mqtt_str name, value;
        struct param_iter it;
        bool has_value, has_rid = false;
        int r;

        if (has_char(s, '/'))
                return -ENOENT;
        (void) eat(&s, "?");
        it = (struct param_iter) { .rest = s };
        while (param_next(&it, &name, &has_value, &value)) {
                if (str_is(name, "$rid") || str_is(name, "%24rid")) {
                        if (has_rid || !has_value || value.len == 0)
                                return -EBADMSG;
                        t->rid = value;
                        has_rid = true;
                } else if (allow_version && (str_is(name, "$version") || str_is(name, "%24version"))) {
                        if (t->has_version || !has_value)
                                return -EBADMSG;
                        r = parse_uint64(value, &t->version);
                        if (r < 0)
                                return r;
                        t->has_version = true;
                }
        }
        return has_rid ? 0 : -EBADMSG;
}

static int parse_events(struct gw_mqtt_str s, struct gw_mqtt_topic *t) {
        struct gw_mqtt_str seg;

        if (!next_segment(&s, &t->device_id) || t->device_id.len == 0)
                return -ENOENT;
        if (eat(&s, "modules/")) {
                if (!next_segment(&s, &t->module_id) || t->module_id.len == 0)
                        return -ENOENT;
        }
        if (!eat(&s, "messages/"))
                return -ENOENT;
        if (str_is(s, "events")) {
                t->bag = (struct gw_mqtt_str) { s.ptr + s.len, 0 };
                return 0;
        }
        if (!next_segment(&s, &seg) || !str_is(seg, "events"))
                return -ENOENT;
        /* s: "" | "[?]bag" | "[?]bag/" */
        if (s.len > 0 && s.ptr[s.len - 1] == '/') {
                s.len--;
                if (s.len == 0)
                        return -ENOENT; /* "events//" */
        }
        (void) eat(&s, "?");
        if (has_char(s, '/'))
                return -ENOENT;
        t->bag = s;
        return 0;
}

int gw_mqtt_topic_parse(const char *topic, size_t len, struct gw_mqtt_topic *ret) {
        struct gw_mqtt_topic t = {};
        struct gw_mqtt_str s = { topic, len }, seg;
        int r;

        if ((!topic && len > 0) || !ret)
                return -EINVAL;

        if (eat(&s, "devices/")) {
                t.kind = GW_MQTT_TOPIC_EVENTS;
                r = parse_events(s, &t);
        } else if (eat(&s, "$iothub/twin/GET/")) {
                t.kind = GW_MQTT_TOPIC_TWIN_GET;
                r = parse_request_params(s, false, &t);
        } else if (eat(&s, "$iothub/twin/PATCH/properties/reported/")) {
                t.kind = GW_MQTT_TOPIC_TWIN_PATCH_REPORTED;
                r = parse_request_params(s, true, &t);
        } else if (eat(&s, "$iothub/methods/res/")) {
                t.kind = GW_MQTT_TOPIC_METHOD_RESPONSE;
                if (!next_segment(&s, &seg))
                        return -ENOENT;
                r = parse_status(seg, &t.status);
                if (r < 0)
                        return r;
                r = parse_request_params(s, false, &t);
        } else
                return -ENOENT;
        if (r < 0)
                return r;

        *ret = t;
        return 0;
}

/* ---- property bags -------------------------------------------------------------------- */

int gw_mqtt_bag_decode(const char *bag, size_t len, unsigned flags, struct hub_msg *m) {
        struct gw_mqtt_str name, value;
        struct param_iter it;
        bool has_value;
        int r;

        if ((!bag && len > 0) || !m)
                return -EINVAL;
        it = (struct param_iter) { .rest = { bag, len } };
        while (param_next(&it, &name, &has_value, &value)) {
                _cleanup_free_ char *n = NULL, *v = NULL;
                enum hub_sys_prop p;

                if (name.len == 0 && !has_value)
                        continue; /* empty item ("a=1&&b=2", or an empty bag) */
                r = decode(name, &n);
                if (r < 0)
                        return r;
                if (n[0] == '\0')
                        return -EBADMSG;
                if (has_value) {
                        r = decode(value, &v);
                        if (r < 0)
                                return r;
                }
                if (hub_sys_prop_from_mqtt_name(n, &p) >= 0 &&
                    (p != HUB_SYS_ACK || (flags & GW_MQTT_BAG_DOWNSTREAM))) {
                        if (!hub_sys_prop_settable(p) && !(flags & GW_MQTT_BAG_DOWNSTREAM))
                                continue; /* hub-stamped ($.cdid, $.cmid): never from a device */
                        if (!v)
                                continue;
                        r = hub_msg_set_sys(m, p, v);
                } else
                        r = hub_msg_set_prop(m, n, v);
                if (r < 0)
                        return r == -EINVAL ? -EBADMSG : r;
        }
        return 0;
}

int gw_mqtt_d2c_message(const struct gw_mqtt_topic *t, const void *body, size_t len, bool retain,
                        struct hub_msg **ret_msg) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        int r;

        if (!t || t->kind != GW_MQTT_TOPIC_EVENTS || (!body && len > 0) || !ret_msg)
                return -EINVAL;
        r = hub_msg_new(body, len, HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0)
                return r;
        r = gw_mqtt_bag_decode(t->bag.ptr, t->bag.len, 0, m);
        if (r < 0)
                return r;
        if (retain) {
                r = hub_msg_set_prop(m, "mqtt-retain", "true");
                if (r < 0)
                        return r;
        }
        *ret_msg = TAKE_PTR(m);
        return 0;
}

/* A growing string. */
struct sbuf {
        char *p;
        size_t len, cap;
        bool oom;
};

static void sb_add(struct sbuf *b, const char *s, size_t n) {
        if (b->oom)
                return;
        if (b->len + n + 1 > b->cap) {
                size_t cap = MAX(b->cap * 2, b->len + n + 1);
                char *p = realloc(b->p, MAX(cap, (size_t) 64));

                if (!p) {
                        b->oom = true;
                        return;
                }
                b->p = p;
                b->cap = MAX(cap, (size_t) 64);
        }
        memcpy(b->p + b->len, s, n);
        b->len += n;
        b->p[b->len] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s) {
        sb_add(b, s, strlen(s));
}

static void sb_encoded(struct sbuf *b, const char *s) {
        _cleanup_free_ char *e = NULL;

        if (b->oom)
                return;
        if (hub_url_encode(s, &e) < 0) {
                b->oom = true;
                return;
        }
        sb_puts(b, e);
}

static void sb_prop(struct sbuf *b, const char *name, const char *value) {
        if (b->len > 0)
                sb_puts(b, "&");
        sb_encoded(b, name);
        if (value) {
                sb_puts(b, "=");
                sb_encoded(b, value);
        }
}

static int sb_finish(struct sbuf *b, char **ret) {
        if (!b->oom && !b->p)
                sb_puts(b, "");
        if (b->oom) {
                free(b->p);
                return -ENOMEM;
        }
        *ret = b->p;
        return 0;
}

static void bag_encode_into(struct sbuf *b, const struct hub_msg *m) {
        static const enum hub_sys_prop first[] = {
                HUB_SYS_MESSAGE_ID, HUB_SYS_TO, HUB_SYS_EXPIRY_TIME, HUB_SYS_CORRELATION_ID,
                HUB_SYS_USER_ID, HUB_SYS_CONTENT_TYPE, HUB_SYS_CONTENT_ENCODING,
        };
        bool done[_HUB_SYS_MAX] = {};
        /* sb_prop() separates items with "&" once its buffer is non-empty, so the bag is built
         * apart from the topic prefix already in b. */
        struct sbuf bag = {};

        for (size_t i = 0; i < ELEMENTSOF(first) + _HUB_SYS_MAX; i++) {
                enum hub_sys_prop p = i < ELEMENTSOF(first) ? first[i] : (enum hub_sys_prop) (i - ELEMENTSOF(first));
                const char *name = hub_sys_prop_mqtt_name(p), *v;

                if (done[p] || !name || p == HUB_SYS_ACK)
                        continue;
                done[p] = true;
                v = hub_msg_get_sys(m, p);
                if (v)
                        sb_prop(&bag, name, v);
        }
        if (hub_msg_get_sys(m, HUB_SYS_ACK))
                sb_prop(&bag, hub_sys_prop_mqtt_name(HUB_SYS_ACK), hub_msg_get_sys(m, HUB_SYS_ACK));
        for (size_t i = 0; i < hub_msg_n_props(m); i++) {
                const struct hub_msg_prop *pr = hub_msg_prop_at(m, i);
                sb_prop(&bag, pr->name, pr->value);
        }
        if (bag.oom)
                b->oom = true;
        else if (bag.p)
                sb_add(b, bag.p, bag.len);
        free(bag.p);
}

int gw_mqtt_bag_encode(const struct hub_msg *m, char **ret) {
        struct sbuf b = {};

        if (!m || !ret)
                return -EINVAL;
        bag_encode_into(&b, m);
        return sb_finish(&b, ret);
}

/* ---- hub → device topics -------------------------------------------------------------- */

static bool topic_segment_ok(const char *s, const char *forbidden) {
        if (!s || s[0] == '\0')
                return false;
        if (!gw_mqtt_utf8_valid(s, strlen(s)))
                return false;
        return strpbrk(s, forbidden) == NULL;
}

int gw_mqtt_topic_c2d(const char *device_id, const struct hub_msg *m, char **ret) {
        struct sbuf b = {};

        if (!topic_segment_ok(device_id, "/+#") || !m || !ret)
                return -EINVAL;
        sb_puts(&b, "devices/");
        sb_puts(&b, device_id);
        sb_puts(&b, "/messages/devicebound/");
        bag_encode_into(&b, m);
        return sb_finish(&b, ret);
}

int gw_mqtt_topic_module_input(const char *device_id, const char *module_id, const char *input,
                               const struct hub_msg *m, char **ret) {
        struct sbuf b = {};

        if (!topic_segment_ok(device_id, "/+#") || !topic_segment_ok(module_id, "/+#") ||
            !topic_segment_ok(input, "/+#") || !m || !ret)
                return -EINVAL;
        sb_puts(&b, "devices/");
        sb_puts(&b, device_id);
        sb_puts(&b, "/modules/");
        sb_puts(&b, module_id);
        sb_puts(&b, "/inputs/");
        sb_puts(&b, input);
        sb_puts(&b, "/");
        bag_encode_into(&b, m);
        return sb_finish(&b, ret);
}

int gw_mqtt_topic_twin_response(int status, struct gw_mqtt_str rid, bool has_version, uint64_t version,
                                char **ret) {
        char num[64];
        struct sbuf b = {};

        if (!ret || rid.len == 0 || !rid.ptr || !gw_mqtt_utf8_valid(rid.ptr, rid.len))
                return -EINVAL;
        for (size_t i = 0; i < rid.len; i++)
                if (strchr("&#+/", rid.ptr[i]))
                        return -EINVAL;
        snprintf(num, sizeof num, "%d", status);
        sb_puts(&b, "$iothub/twin/res/");
        sb_puts(&b, num);
        sb_puts(&b, "/?$rid=");
        sb_add(&b, rid.ptr, rid.len);
        if (has_version) {
                snprintf(num, sizeof num, "&$version=%" PRIu64, version);
                sb_puts(&b, num);
        }
        return sb_finish(&b, ret);
}

int gw_mqtt_topic_twin_desired(uint64_t version, char **ret) {
        char buf[96];

        if (!ret)
                return -EINVAL;
        snprintf(buf, sizeof buf, "$iothub/twin/PATCH/properties/desired/?$version=%" PRIu64, version);
        *ret = strdup(buf);
        return *ret ? 0 : -ENOMEM;
}

int gw_mqtt_topic_method_request(const char *name, const char *rid, char **ret) {
        struct sbuf b = {};

        if (!topic_segment_ok(name, "/&?#+") || !topic_segment_ok(rid, "/&?#+") || !ret)
                return -EINVAL;
        sb_puts(&b, "$iothub/methods/POST/");
        sb_puts(&b, name);
        sb_puts(&b, "/?$rid=");
        sb_puts(&b, rid);
        return sb_finish(&b, ret);
}

/* ---- subscription filters ------------------------------------------------------------- */

static bool id_segment(struct gw_mqtt_str *s, struct gw_mqtt_str *ret) {
        if (!next_segment(s, ret) || ret->len == 0)
                return false;
        return !has_char(*ret, '+') && !has_char(*ret, '#');
}

int gw_mqtt_filter_parse(const char *filter, size_t len, struct gw_mqtt_filter *ret) {
        struct gw_mqtt_filter f = {};
        struct gw_mqtt_str s = { filter, len };

        if ((!filter && len > 0) || !ret)
                return -EINVAL;
        if (str_is(s, "$iothub/twin/res/#"))
                f.kind = GW_MQTT_FILTER_TWIN_RESPONSE;
        else if (str_is(s, "$iothub/twin/PATCH/properties/desired/#"))
                f.kind = GW_MQTT_FILTER_TWIN_DESIRED;
        else if (str_is(s, "$iothub/methods/POST/#"))
                f.kind = GW_MQTT_FILTER_METHODS;
        else if (eat(&s, "devices/")) {
                if (!id_segment(&s, &f.device_id))
                        return -ENOENT;
                if (str_is(s, "messages/devicebound/#"))
                        f.kind = GW_MQTT_FILTER_C2D;
                else if (eat(&s, "modules/")) {
                        if (!id_segment(&s, &f.module_id))
                                return -ENOENT;
                        if (str_is(s, "#"))
                                f.kind = GW_MQTT_FILTER_MODULE;
                        else if (str_is(s, "inputs/#"))
                                f.kind = GW_MQTT_FILTER_MODULE_INPUTS;
                        else
                                return -ENOENT;
                } else
                        return -ENOENT;
        } else
                return -ENOENT;

        *ret = f;
        return 0;
}
