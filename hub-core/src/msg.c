/* SPDX-License-Identifier: MIT */
/* The hub message (reference §2.6, §2.7, §4.4, §8.3, §10): body bytes, the IoT Hub system
 * properties, application properties, IoT Hub size accounting, and the binary encoding the
 * store keeps on disk.
 *
 * Encoding, version 1 (all integers little-endian):
 *
 *   "FHM" 0x01                          magic + version
 *   u32 body_len, body bytes
 *   u8  n_sys, then n_sys x { u8 id, u32 len, bytes }        ids strictly ascending
 *   u32 n_props, then n_props x { u32 name_len, name bytes,
 *                                 u8 has_value (0/1), [u32 value_len, value bytes] }
 *
 * Strings hold no NUL byte. The encoding is canonical: every message has exactly one, and a
 * buffer that decodes re-encodes to the same bytes (duplicate or unordered entries, unknown
 * ids, flags other than 0/1 and trailing bytes are rejected). */

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/msg.h"

/* Bytes kept inside the message for its strings (system values, property names and values),
 * so that building a typical message costs one allocation: the body follows the struct, and
 * strings are carved from the arena until it is used up (then each is malloc'd). A replaced
 * string's arena bytes are not reused. */
#define MSG_ARENA_SIZE 320u

struct hub_msg {
        unsigned n_ref;
        size_t limit;
        size_t size; /* IoT Hub size, kept up to date by every setter */
        uint8_t *body; /* body_inline, or NULL when empty */
        size_t body_len;
        char *sys[_HUB_SYS_MAX];
        struct hub_msg_prop *props;
        size_t n_props, props_cap;
        size_t arena_used;
        char arena[MSG_ARENA_SIZE];
        uint8_t body_inline[];
};

struct sys_prop_names {
        const char *mqtt;
        const char *query;
        const char *wire;
        bool settable;
};

static const struct sys_prop_names sys_names[_HUB_SYS_MAX] = {
        [HUB_SYS_MESSAGE_ID] = { "$.mid", "$messageId", "message-id", true },
        [HUB_SYS_CORRELATION_ID] = { "$.cid", "$correlationId", "correlation-id", true },
        [HUB_SYS_USER_ID] = { "$.uid", "$userId", "user-id", true },
        [HUB_SYS_TO] = { "$.to", "$to", "to", true },
        [HUB_SYS_EXPIRY_TIME] = { "$.exp", NULL, "absolute-expiry-time", true },
        [HUB_SYS_CONTENT_TYPE] = { "$.ct", "$contentType", "content-type", true },
        [HUB_SYS_CONTENT_ENCODING] = { "$.ce", "$contentEncoding", "content-encoding", true },
        [HUB_SYS_CREATION_TIME] = { "$.ctime", NULL, "iothub-creation-time-utc", true },
        [HUB_SYS_OUTPUT_NAME] = { "$.on", NULL, "iothub-outputname", true },
        [HUB_SYS_MESSAGE_SCHEMA] = { "$.schema", NULL, "iothub-message-schema", true },
        [HUB_SYS_INTERFACE_ID] = { "$.ifid", NULL, "iothub-interface-id", true },
        [HUB_SYS_COMPONENT_NAME] = { "$.sub", "$dt-subject", "dt-subject", true },
        [HUB_SYS_DIAG_ID] = { "$.diagid", NULL, "Diagnostic-Id", true },
        [HUB_SYS_DIAG_CONTEXT] = { "$.diagctx", NULL, "Correlation-Context", true },
        /* Sent over MQTT without "$." (reference §2.6). */
        [HUB_SYS_ACK] = { "iothub-ack", "$ack", "iothub-ack", true },
        [HUB_SYS_CONNECTION_DEVICE_ID] = { "$.cdid", "$connectionDeviceId", "iothub-connection-device-id", false },
        [HUB_SYS_CONNECTION_MODULE_ID] = { "$.cmid", "$connectionModuleId", "iothub-connection-module-id", false },
        [HUB_SYS_CONNECTION_AUTH_GENERATION_ID] = { NULL, "$connectionDeviceGenerationId",
                                                    "iothub-connection-auth-generation-id", false },
        [HUB_SYS_CONNECTION_AUTH_METHOD] = { NULL, "$connectionAuthMethod", "iothub-connection-auth-method", false },
        [HUB_SYS_ENQUEUED_TIME] = { NULL, "$enqueuedTime", "iothub-enqueuedtime", false },
        /* Selected by a route's source, not queryable (reference §8.3). */
        [HUB_SYS_MESSAGE_SOURCE] = { NULL, NULL, "iothub-message-source", false },
        [HUB_SYS_DATA_SCHEMA] = { NULL, "$dt-dataschema", "dt-dataschema", false },
};

static bool in_arena(const struct hub_msg *m, const char *p) {
        return p >= m->arena && p < m->arena + sizeof m->arena;
}

/* A copy of s[0..n) (NUL-terminated) owned by m: in the arena while it has room. */
static char *msg_strndup(struct hub_msg *m, const char *s, size_t n) {
        char *p;
        if (n < sizeof m->arena - m->arena_used) {
                p = m->arena + m->arena_used;
                m->arena_used += n + 1;
        } else {
                p = malloc(n + 1);
                if (!p)
                        return NULL;
        }
        memcpy(p, s, n);
        p[n] = 0;
        return p;
}

static void msg_strfree(struct hub_msg *m, char *p) {
        if (p && !in_arena(m, p))
                free(p);
}

static bool sys_prop_valid(enum hub_sys_prop p) {
        return (unsigned) p < _HUB_SYS_MAX;
}

const char *hub_sys_prop_mqtt_name(enum hub_sys_prop p) {
        return sys_prop_valid(p) ? sys_names[p].mqtt : NULL;
}

const char *hub_sys_prop_query_name(enum hub_sys_prop p) {
        return sys_prop_valid(p) ? sys_names[p].query : NULL;
}

const char *hub_sys_prop_wire_name(enum hub_sys_prop p) {
        return sys_prop_valid(p) ? sys_names[p].wire : NULL;
}

bool hub_sys_prop_settable(enum hub_sys_prop p) {
        return sys_prop_valid(p) && sys_names[p].settable;
}

int hub_sys_prop_from_mqtt_name(const char *name, enum hub_sys_prop *ret) {
        if (!name || !ret)
                return -EINVAL;
        for (unsigned i = 0; i < _HUB_SYS_MAX; i++)
                if (sys_names[i].mqtt && streq(sys_names[i].mqtt, name)) {
                        *ret = (enum hub_sys_prop) i;
                        return 0;
                }
        return -ENOENT;
}

int hub_sys_prop_from_query_name(const char *name, enum hub_sys_prop *ret) {
        if (!name || !ret)
                return -EINVAL;
        for (unsigned i = 0; i < _HUB_SYS_MAX; i++)
                if (sys_names[i].query && strcasecmp(sys_names[i].query, name) == 0) {
                        *ret = (enum hub_sys_prop) i;
                        return 0;
                }
        return -ENOENT;
}

int hub_msg_new(const void *body, size_t len, size_t limit, struct hub_msg **ret_msg) {
        struct hub_msg *m;

        if (!ret_msg || (len > 0 && !body))
                return -EINVAL;
        if (len > limit)
                return -E2BIG;

        m = malloc(sizeof *m + len);
        if (!m)
                return -ENOMEM;
        /* Everything but the arena's bytes starts zeroed. */
        memset(m, 0, offsetof(struct hub_msg, arena));
        if (len > 0) {
                m->body = m->body_inline;
                memcpy(m->body, body, len);
        }
        m->n_ref = 1;
        m->limit = limit;
        m->body_len = len;
        m->size = len;

        *ret_msg = m;
        return 0;
}

struct hub_msg *hub_msg_ref(struct hub_msg *m) {
        if (m)
                __atomic_add_fetch(&m->n_ref, 1, __ATOMIC_RELAXED);
        return m;
}

static void msg_free(struct hub_msg *m) {
        for (unsigned i = 0; i < _HUB_SYS_MAX; i++)
                msg_strfree(m, m->sys[i]);
        for (size_t i = 0; i < m->n_props; i++) {
                msg_strfree(m, m->props[i].name);
                msg_strfree(m, m->props[i].value);
        }
        free(m->props);
        free(m);
}

struct hub_msg *hub_msg_unref(struct hub_msg *m) {
        if (!m)
                return NULL;
        if (__atomic_sub_fetch(&m->n_ref, 1, __ATOMIC_ACQ_REL) == 0)
                msg_free(m);
        return NULL;
}

/* new_size = size - old + add, or -E2BIG over the limit. */
static int size_after(const struct hub_msg *m, size_t old, size_t add, size_t *ret) {
        size_t base = m->size - old;

        if (add > m->limit || base > m->limit - add)
                return -E2BIG;
        *ret = base + add;
        return 0;
}

int hub_msg_set_sys(struct hub_msg *m, enum hub_sys_prop p, const char *value) {
        size_t old, add = 0, new_size;
        char *copy = NULL;
        int r;

        if (!m || !sys_prop_valid(p))
                return -EINVAL;

        old = m->sys[p] ? strlen(m->sys[p]) : 0;
        if (value) {
                add = strlen(value);
                if ((p == HUB_SYS_MESSAGE_ID || p == HUB_SYS_CORRELATION_ID) && add > HUB_MSG_ID_MAX_LEN)
                        return -E2BIG;
        }
        r = size_after(m, old, add, &new_size);
        if (r < 0)
                return r;
        if (value) {
                copy = msg_strndup(m, value, add);
                if (!copy)
                        return -ENOMEM;
        }

        msg_strfree(m, m->sys[p]);
        m->sys[p] = copy;
        m->size = new_size;
        return 0;
}

const char *hub_msg_get_sys(const struct hub_msg *m, enum hub_sys_prop p) {
        if (!m || !sys_prop_valid(p))
                return NULL;
        return m->sys[p];
}

static struct hub_msg_prop *prop_find(const struct hub_msg *m, const char *name) {
        for (size_t i = 0; i < m->n_props; i++)
                if (streq(m->props[i].name, name))
                        return &m->props[i];
        return NULL;
}

int hub_msg_set_prop(struct hub_msg *m, const char *name, const char *value) {
        struct hub_msg_prop *p;
        size_t old = 0, add, new_size;
        char *vcopy = NULL;
        int r;

        if (!m || !name || !*name)
                return -EINVAL;

        p = prop_find(m, name);
        if (p)
                old = strlen(p->value ? p->value : "");
        else if (m->n_props >= HUB_MSG_MAX_PROPS)
                return -E2BIG;

        size_t vl = value ? strlen(value) : 0, nl = 0;
        add = vl;
        if (!p) {
                nl = strlen(name);
                if (nl > m->limit || add > m->limit - nl)
                        return -E2BIG;
                add += nl;
        }
        r = size_after(m, old, add, &new_size);
        if (r < 0)
                return r;

        if (value) {
                vcopy = msg_strndup(m, value, vl);
                if (!vcopy)
                        return -ENOMEM;
        }

        if (!p) {
                char *ncopy = msg_strndup(m, name, nl);
                if (!ncopy) {
                        msg_strfree(m, vcopy);
                        return -ENOMEM;
                }
                if (m->n_props == m->props_cap) {
                        size_t cap = m->props_cap ? m->props_cap * 2 : 4;
                        struct hub_msg_prop *np = realloc(m->props, cap * sizeof *np);
                        if (!np) {
                                msg_strfree(m, ncopy);
                                msg_strfree(m, vcopy);
                                return -ENOMEM;
                        }
                        m->props = np;
                        m->props_cap = cap;
                }
                p = &m->props[m->n_props++];
                *p = (struct hub_msg_prop) { .name = ncopy, .value = NULL };
        }

        msg_strfree(m, p->value);
        p->value = vcopy;
        m->size = new_size;
        return 0;
}

const char *hub_msg_get_prop(const struct hub_msg *m, const char *name, bool *ret_found) {
        const struct hub_msg_prop *p = m && name ? prop_find(m, name) : NULL;

        if (ret_found)
                *ret_found = p != NULL;
        return p ? p->value : NULL;
}

size_t hub_msg_n_props(const struct hub_msg *m) {
        return m ? m->n_props : 0;
}

const struct hub_msg_prop *hub_msg_prop_at(const struct hub_msg *m, size_t i) {
        if (!m || i >= m->n_props)
                return NULL;
        return &m->props[i];
}

const void *hub_msg_body(const struct hub_msg *m, size_t *ret_len) {
        if (ret_len)
                *ret_len = m ? m->body_len : 0;
        return m ? m->body : NULL;
}

size_t hub_msg_size(const struct hub_msg *m) {
        return m ? m->size : 0;
}

/* ---- binary encoding ------------------------------------------------------------------ */

static const uint8_t msg_magic[3] = { 'F', 'H', 'M' };
#define MSG_FORMAT_VERSION 1u

struct wbuf {
        uint8_t *p;
        size_t len;
};

static void put_bytes(struct wbuf *w, const void *d, size_t n) {
        if (n)
                memcpy(w->p + w->len, d, n);
        w->len += n;
}

static void put_u8(struct wbuf *w, uint8_t v) {
        w->p[w->len++] = v;
}

static void put_u32(struct wbuf *w, uint32_t v) {
        uint8_t b[4] = { (uint8_t) v, (uint8_t) (v >> 8), (uint8_t) (v >> 16), (uint8_t) (v >> 24) };
        put_bytes(w, b, 4);
}

static void put_str(struct wbuf *w, const char *s, size_t n) {
        put_u32(w, (uint32_t) n);
        put_bytes(w, s, n);
}

int hub_msg_serialize(const struct hub_msg *m, uint8_t **ret_buf, size_t *ret_len) {
        size_t total, n_sys = 0;
        struct wbuf w;

        if (!m || !ret_buf || !ret_len)
                return -EINVAL;
        /* Every length is bounded by the message limit; a u32 must hold them. */
        if (m->body_len > UINT32_MAX || m->size > UINT32_MAX)
                return -E2BIG;

        total = sizeof msg_magic + 1 + 4 + m->body_len + 1 + 4;
        for (unsigned i = 0; i < _HUB_SYS_MAX; i++)
                if (m->sys[i]) {
                        total += 1 + 4 + strlen(m->sys[i]);
                        n_sys++;
                }
        for (size_t i = 0; i < m->n_props; i++) {
                total += 4 + strlen(m->props[i].name) + 1;
                if (m->props[i].value)
                        total += 4 + strlen(m->props[i].value);
        }

        w = (struct wbuf) { .p = malloc(total), .len = 0 };
        if (!w.p)
                return -ENOMEM;

        put_bytes(&w, msg_magic, sizeof msg_magic);
        put_u8(&w, MSG_FORMAT_VERSION);
        put_u32(&w, (uint32_t) m->body_len);
        put_bytes(&w, m->body, m->body_len);
        put_u8(&w, (uint8_t) n_sys);
        for (unsigned i = 0; i < _HUB_SYS_MAX; i++)
                if (m->sys[i]) {
                        put_u8(&w, (uint8_t) i);
                        put_str(&w, m->sys[i], strlen(m->sys[i]));
                }
        put_u32(&w, (uint32_t) m->n_props);
        for (size_t i = 0; i < m->n_props; i++) {
                const struct hub_msg_prop *p = &m->props[i];
                put_str(&w, p->name, strlen(p->name));
                put_u8(&w, p->value ? 1 : 0);
                if (p->value)
                        put_str(&w, p->value, strlen(p->value));
        }

        if (w.len != total) { /* cannot happen: sizes computed above */
                free(w.p);
                return -EIO;
        }
        *ret_buf = w.p;
        *ret_len = w.len;
        return 0;
}

struct rbuf {
        const uint8_t *p;
        size_t left;
};

static bool get_u8(struct rbuf *r, uint8_t *ret) {
        if (r->left < 1)
                return false;
        *ret = *r->p++;
        r->left--;
        return true;
}

static bool get_u32(struct rbuf *r, uint32_t *ret) {
        if (r->left < 4)
                return false;
        *ret = (uint32_t) r->p[0] | (uint32_t) r->p[1] << 8 | (uint32_t) r->p[2] << 16 |
               (uint32_t) r->p[3] << 24;
        r->p += 4;
        r->left -= 4;
        return true;
}

static bool get_raw(struct rbuf *r, size_t n, const uint8_t **ret) {
        if (r->left < n)
                return false;
        *ret = r->p;
        r->p += n;
        r->left -= n;
        return true;
}

/* Reads a length-prefixed string (no NUL inside, at most limit bytes) into a new C string. */
static int get_str(struct rbuf *r, size_t limit, char **ret) {
        const uint8_t *d;
        uint32_t n;
        char *s;

        if (!get_u32(r, &n) || n > limit || !get_raw(r, n, &d))
                return -EBADMSG;
        if (n && memchr(d, 0, n))
                return -EBADMSG;
        s = malloc((size_t) n + 1);
        if (!s)
                return -ENOMEM;
        if (n)
                memcpy(s, d, n);
        s[n] = 0;
        *ret = s;
        return 0;
}

/* Setter failures on decoded data mean the data was invalid (-E2BIG, -EINVAL). */
static int decode_err(int r) {
        return r == -ENOMEM ? r : -EBADMSG;
}

int hub_msg_deserialize(const uint8_t *buf, size_t len, size_t limit, struct hub_msg **ret_msg) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        struct rbuf rb = { .p = buf, .left = len };
        const uint8_t *magic, *body;
        uint8_t version, n_sys;
        uint32_t body_len, n_props;
        int last_id = -1, r;

        if ((!buf && len > 0) || !ret_msg)
                return -EINVAL;

        if (!get_raw(&rb, sizeof msg_magic, &magic) || memcmp(magic, msg_magic, sizeof msg_magic) != 0)
                return -EBADMSG;
        if (!get_u8(&rb, &version) || version != MSG_FORMAT_VERSION)
                return -EBADMSG;

        if (!get_u32(&rb, &body_len) || body_len > limit || !get_raw(&rb, body_len, &body))
                return -EBADMSG;
        r = hub_msg_new(body, body_len, limit, &m);
        if (r < 0)
                return decode_err(r);

        if (!get_u8(&rb, &n_sys) || n_sys > _HUB_SYS_MAX)
                return -EBADMSG;
        for (unsigned i = 0; i < n_sys; i++) {
                _cleanup_free_ char *v = NULL;
                uint8_t id;

                if (!get_u8(&rb, &id) || id >= _HUB_SYS_MAX || (int) id <= last_id)
                        return -EBADMSG;
                last_id = id;
                r = get_str(&rb, limit, &v);
                if (r < 0)
                        return r;
                r = hub_msg_set_sys(m, (enum hub_sys_prop) id, v);
                if (r < 0)
                        return decode_err(r);
        }

        if (!get_u32(&rb, &n_props) || n_props > HUB_MSG_MAX_PROPS)
                return -EBADMSG;
        for (uint32_t i = 0; i < n_props; i++) {
                _cleanup_free_ char *name = NULL, *value = NULL;
                uint8_t has_value;
                bool found;

                r = get_str(&rb, limit, &name);
                if (r < 0)
                        return r;
                if (!get_u8(&rb, &has_value) || has_value > 1)
                        return -EBADMSG;
                if (has_value) {
                        r = get_str(&rb, limit, &value);
                        if (r < 0)
                                return r;
                }
                (void) hub_msg_get_prop(m, name, &found);
                if (found)
                        return -EBADMSG; /* duplicate name: not canonical */
                r = hub_msg_set_prop(m, name, value);
                if (r < 0)
                        return decode_err(r);
        }

        if (rb.left != 0)
                return -EBADMSG;

        *ret_msg = TAKE_PTR(m);
        return 0;
}
