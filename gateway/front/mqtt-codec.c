/* SPDX-License-Identifier: MIT */
/* MQTT 3.1.1 codec. Section numbers below refer to the OASIS MQTT 3.1.1 standard. */

#include <errno.h>
#include <string.h>

#include "front/mqtt-codec.h"

/* ---- validation ------------------------------------------------------------------------ */

bool gw_mqtt_utf8_valid(const char *s, size_t len) {
        const uint8_t *p = (const uint8_t *) s;
        size_t i = 0;

        if (len > 0 && !s)
                return false;
        while (i < len) {
                uint8_t c = p[i];
                uint32_t cp;
                size_t n;

                /* Topics are mostly ASCII: 8 bytes at a time while none is NUL or >= 0x80. */
                if (len - i >= 8) {
                        uint64_t w;
                        memcpy(&w, p + i, 8);
                        if (((w | ((w - UINT64_C(0x0101010101010101)) & ~w)) & UINT64_C(0x8080808080808080)) == 0) {
                                i += 8;
                                continue;
                        }
                }
                if (c == 0)
                        return false; /* U+0000, §1.5.3-2 */
                if (c < 0x80) {
                        i++;
                        continue;
                }
                if (c >= 0xc2 && c <= 0xdf) {
                        n = 1;
                        cp = c & 0x1f;
                } else if (c >= 0xe0 && c <= 0xef) {
                        n = 2;
                        cp = c & 0x0f;
                } else if (c >= 0xf0 && c <= 0xf4) {
                        n = 3;
                        cp = c & 0x07;
                } else
                        return false; /* continuation byte, 0xc0/0xc1 overlong lead, > U+10FFFF */
                if (len - i - 1 < n)
                        return false;
                for (size_t k = 1; k <= n; k++) {
                        if ((p[i + k] & 0xc0) != 0x80)
                                return false;
                        cp = (cp << 6) | (p[i + k] & 0x3f);
                }
                if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
                        return false; /* overlong or out of range */
                if (cp >= 0xd800 && cp <= 0xdfff)
                        return false; /* surrogate, §1.5.3-1 */
                i += n + 1;
        }
        return true;
}

bool gw_mqtt_topic_name_valid(const char *s, size_t len) {
        if (len == 0 || !gw_mqtt_utf8_valid(s, len))
                return false;
        return !memchr(s, '+', len) && !memchr(s, '#', len);
}

bool gw_mqtt_topic_filter_valid(const char *s, size_t len) {
        if (len == 0 || !gw_mqtt_utf8_valid(s, len))
                return false;
        for (size_t i = 0; i < len; i++) {
                bool level_start = i == 0 || s[i - 1] == '/';
                bool level_end = i + 1 == len || s[i + 1] == '/';

                if (s[i] == '+' && !(level_start && level_end))
                        return false; /* §4.7.1.3 */
                if (s[i] == '#' && !(level_start && i + 1 == len))
                        return false; /* §4.7.1.2 */
        }
        return true;
}

/* ---- decoding -------------------------------------------------------------------------- */

struct reader {
        const uint8_t *p;
        size_t len;
        size_t pos;
};

static size_t reader_left(const struct reader *r) {
        return r->len - r->pos;
}

static int read_u8(struct reader *r, uint8_t *ret) {
        if (reader_left(r) < 1)
                return -GW_MQTT_E_MALFORMED;
        *ret = r->p[r->pos++];
        return 0;
}

static int read_u16(struct reader *r, uint16_t *ret) {
        if (reader_left(r) < 2)
                return -GW_MQTT_E_MALFORMED;
        *ret = (uint16_t) ((r->p[r->pos] << 8) | r->p[r->pos + 1]);
        r->pos += 2;
        return 0;
}

/* A two-byte length followed by that many bytes (§1.5.3 for strings, binary data likewise). */
static int read_bytes(struct reader *r, struct gw_mqtt_str *ret) {
        uint16_t n;
        int k = read_u16(r, &n);

        if (k < 0)
                return k;
        if (reader_left(r) < n)
                return -GW_MQTT_E_MALFORMED;
        ret->ptr = (const char *) r->p + r->pos;
        ret->len = n;
        r->pos += n;
        return 0;
}

static int read_string(struct reader *r, struct gw_mqtt_str *ret) {
        int k = read_bytes(r, ret);

        if (k < 0)
                return k;
        if (!gw_mqtt_utf8_valid(ret->ptr, ret->len))
                return -GW_MQTT_E_UTF8;
        return 0;
}

/* Required low-nibble flags per packet type (§2.2.2); -1 = any (PUBLISH). */
static int required_flags(unsigned type) {
        switch (type) {
        case GW_MQTT_PUBLISH:
                return -1;
        case GW_MQTT_PUBREL:
        case GW_MQTT_SUBSCRIBE:
        case GW_MQTT_UNSUBSCRIBE:
                return 0x2;
        default:
                return 0x0;
        }
}

static int decode_connect(struct reader *r, struct gw_mqtt_connect *c) {
        struct gw_mqtt_str name;
        uint8_t flags;
        int k;

        k = read_string(r, &name);
        if (k < 0)
                return k;
        k = read_u8(r, &c->protocol_level);
        if (k < 0)
                return k;
        if (gw_mqtt_str_eq(name, "MQIsdp"))
                return -GW_MQTT_E_PROTOCOL_LEVEL; /* MQTT 3.1: answer as an unsupported version */
        if (!gw_mqtt_str_eq(name, "MQTT"))
                return -GW_MQTT_E_PROTOCOL_NAME; /* §3.1.2.1 */
        if (c->protocol_level != 4)
                return -GW_MQTT_E_PROTOCOL_LEVEL; /* §3.1.2.2: CONNACK 0x01 */

        k = read_u8(r, &flags);
        if (k < 0)
                return k;
        if (flags & 0x01)
                return -GW_MQTT_E_CONNECT_FLAGS; /* §3.1.2-3 reserved */
        c->clean_session = flags & 0x02;
        c->will = flags & 0x04;
        c->will_qos = (flags >> 3) & 0x03;
        c->will_retain = flags & 0x20;
        c->has_password = flags & 0x40;
        c->has_username = flags & 0x80;
        if (!c->will && (c->will_qos != 0 || c->will_retain))
                return -GW_MQTT_E_CONNECT_FLAGS; /* §3.1.2-13, -15 */
        if (c->will_qos == 3)
                return -GW_MQTT_E_CONNECT_FLAGS; /* §3.1.2-14 */
        if (c->has_password && !c->has_username)
                return -GW_MQTT_E_CONNECT_FLAGS; /* §3.1.2-22 */

        k = read_u16(r, &c->keep_alive);
        if (k < 0)
                return k;

        /* Payload, §3.1.3: client id, will topic, will message, user name, password. */
        k = read_string(r, &c->client_id);
        if (k < 0)
                return k;
        if (c->will) {
                k = read_string(r, &c->will_topic);
                if (k < 0)
                        return k;
                if (!gw_mqtt_topic_name_valid(c->will_topic.ptr, c->will_topic.len))
                        return -GW_MQTT_E_TOPIC;
                k = read_bytes(r, &c->will_payload);
                if (k < 0)
                        return k;
        }
        if (c->has_username) {
                k = read_string(r, &c->username);
                if (k < 0)
                        return k;
        }
        if (c->has_password) {
                k = read_bytes(r, &c->password);
                if (k < 0)
                        return k;
        }
        if (reader_left(r) != 0)
                return -GW_MQTT_E_MALFORMED;
        if (c->client_id.len == 0 && !c->clean_session)
                return -GW_MQTT_E_CLIENT_ID; /* §3.1.3-8: CONNACK 0x02 */
        return 0;
}

static int decode_publish(struct reader *r, uint8_t flags, struct gw_mqtt_publish *p) {
        int k;

        p->retain = flags & 0x01;
        p->qos = (flags >> 1) & 0x03;
        p->dup = flags & 0x08;
        if (p->qos == 0 && p->dup)
                return -GW_MQTT_E_QOS; /* §3.3.1-2 */

        k = read_string(r, &p->topic);
        if (k < 0)
                return k;
        if (!gw_mqtt_topic_name_valid(p->topic.ptr, p->topic.len))
                return -GW_MQTT_E_TOPIC; /* §3.3.2-2, §4.7.3-1 */
        if (p->qos > 0) {
                k = read_u16(r, &p->packet_id);
                if (k < 0)
                        return k;
                if (p->packet_id == 0)
                        return -GW_MQTT_E_PACKET_ID; /* §2.3.1-1 */
        }
        p->payload = r->p + r->pos;
        p->payload_len = reader_left(r);
        r->pos = r->len;
        return 0;
}

static int decode_list(struct reader *r, enum gw_mqtt_type type, struct gw_mqtt_packet *p) {
        int k;

        k = read_u16(r, &p->list.packet_id);
        if (k < 0)
                return k;
        if (p->list.packet_id == 0)
                return -GW_MQTT_E_PACKET_ID;
        p->list.entries = r->p + r->pos;
        p->list.entries_len = reader_left(r);
        p->list.count = 0;

        while (reader_left(r) > 0) {
                if (type == GW_MQTT_SUBACK) {
                        uint8_t rc = r->p[r->pos++];

                        if (rc > 2 && rc != GW_MQTT_SUBACK_FAILURE)
                                return -GW_MQTT_E_RETURN_CODE; /* §3.9.3 */
                } else {
                        struct gw_mqtt_str f;

                        k = read_string(r, &f);
                        if (k < 0)
                                return k;
                        if (!gw_mqtt_topic_filter_valid(f.ptr, f.len))
                                return -GW_MQTT_E_TOPIC_FILTER;
                        if (type == GW_MQTT_SUBSCRIBE) {
                                uint8_t qos;

                                k = read_u8(r, &qos);
                                if (k < 0)
                                        return k;
                                if (qos > 2)
                                        return -GW_MQTT_E_SUBSCRIBE_QOS; /* §3.8.3-4 */
                        }
                }
                p->list.count++;
        }
        if (p->list.count == 0)
                return type == GW_MQTT_SUBACK ? -GW_MQTT_E_MALFORMED : -GW_MQTT_E_NO_FILTERS; /* §3.8.3-3, §3.10.3-2 */
        return 0;
}

static int decode_body(struct reader *r, struct gw_mqtt_packet *p) {
        switch (p->type) {
        case GW_MQTT_CONNECT:
                return decode_connect(r, &p->connect);
        case GW_MQTT_CONNACK:
                if (r->len != 2)
                        return -GW_MQTT_E_MALFORMED;
                if (r->p[0] & 0xfe)
                        return -GW_MQTT_E_MALFORMED; /* §3.2.2.1 reserved */
                p->connack.session_present = r->p[0] & 0x01;
                p->connack.return_code = r->p[1];
                if (p->connack.return_code > 5)
                        return -GW_MQTT_E_RETURN_CODE;
                return 0;
        case GW_MQTT_PUBLISH:
                return decode_publish(r, p->flags, &p->publish);
        case GW_MQTT_PUBACK:
        case GW_MQTT_PUBREC:
        case GW_MQTT_PUBREL:
        case GW_MQTT_PUBCOMP:
        case GW_MQTT_UNSUBACK:
                if (r->len != 2)
                        return -GW_MQTT_E_MALFORMED;
                p->ack.packet_id = (uint16_t) ((r->p[0] << 8) | r->p[1]);
                if (p->ack.packet_id == 0)
                        return -GW_MQTT_E_PACKET_ID;
                return 0;
        case GW_MQTT_SUBSCRIBE:
        case GW_MQTT_UNSUBSCRIBE:
        case GW_MQTT_SUBACK:
                return decode_list(r, p->type, p);
        case GW_MQTT_PINGREQ:
        case GW_MQTT_PINGRESP:
        case GW_MQTT_DISCONNECT:
                return r->len == 0 ? 0 : -GW_MQTT_E_MALFORMED;
        }
        return -GW_MQTT_E_PACKET_TYPE;
}

int gw_mqtt_decode(const uint8_t *buf, size_t len, size_t max_packet, struct gw_mqtt_packet *ret,
                   size_t *ret_consumed) {
        struct gw_mqtt_packet p = {};
        size_t remaining = 0, nlen = 0, total;
        unsigned type, flags;
        int req, k;

        if ((!buf && len > 0) || !ret || !ret_consumed)
                return -EINVAL;
        if (len == 0)
                return 0;

        type = buf[0] >> 4;
        flags = buf[0] & 0x0f;
        if (type == 0 || type == 15)
                return -GW_MQTT_E_PACKET_TYPE; /* §2.2.1 reserved */
        req = required_flags(type);
        if (req >= 0 && (int) flags != req)
                return -GW_MQTT_E_HEADER_FLAGS; /* §2.2.2-2 */
        if (type == GW_MQTT_PUBLISH && ((flags >> 1) & 0x03) == 3)
                return -GW_MQTT_E_QOS; /* §3.3.1-4 */

        /* Remaining length, §2.2.3: at most 4 bytes, 7 bits each, little-endian groups. */
        for (;;) {
                uint8_t b;

                if (nlen == 4)
                        return -GW_MQTT_E_REMAINING_LENGTH;
                /* Refuse as soon as even the value so far is too large. Checked before each
                 * byte whether or not it is there yet, so that the verdict does not depend on
                 * how the bytes were split. */
                if (1 + nlen + 1 + remaining > max_packet)
                        return -GW_MQTT_E_TOO_LARGE;
                if (1 + nlen >= len)
                        return 0;
                b = buf[1 + nlen];
                remaining |= (size_t) (b & 0x7f) << (7 * nlen);
                nlen++;
                if (!(b & 0x80))
                        break;
        }
        total = 1 + nlen + remaining;
        if (total > max_packet)
                return -GW_MQTT_E_TOO_LARGE;
        if (type == GW_MQTT_PUBLISH && ((flags >> 1) & 0x03) == 2)
                return -GW_MQTT_E_QOS2; /* reference §2.4: close; no need to wait for the body */
        if (len < total)
                return 0;

        p.type = (enum gw_mqtt_type) type;
        p.flags = (uint8_t) flags;
        struct reader r = { .p = buf + 1 + nlen, .len = remaining };
        k = decode_body(&r, &p);
        if (k < 0)
                return k;

        *ret = p;
        *ret_consumed = total;
        return 1;
}

bool gw_mqtt_filter_next(const struct gw_mqtt_packet *p, size_t *cursor, struct gw_mqtt_str *ret_filter,
                         uint8_t *ret_qos) {
        struct reader r;
        struct gw_mqtt_str f = {};
        uint8_t qos = 0;

        if (!p || !cursor)
                return false;
        if (p->type != GW_MQTT_SUBSCRIBE && p->type != GW_MQTT_UNSUBSCRIBE && p->type != GW_MQTT_SUBACK)
                return false;
        r = (struct reader) { .p = p->list.entries, .len = p->list.entries_len, .pos = *cursor };
        if (r.pos >= r.len)
                return false;
        /* The decoder validated every entry, so these reads cannot fail. */
        if (p->type == GW_MQTT_SUBACK)
                qos = r.p[r.pos++];
        else {
                if (read_bytes(&r, &f) < 0)
                        return false;
                if (p->type == GW_MQTT_SUBSCRIBE && read_u8(&r, &qos) < 0)
                        return false;
        }
        *cursor = r.pos;
        if (ret_filter)
                *ret_filter = f;
        if (ret_qos)
                *ret_qos = qos;
        return true;
}

const char *gw_mqtt_strerror(int r) {
        static const char *const table[_GW_MQTT_E_MAX - GW_MQTT_E_BASE] = {
                [GW_MQTT_E_PACKET_TYPE - GW_MQTT_E_BASE] = "reserved MQTT packet type",
                [GW_MQTT_E_HEADER_FLAGS - GW_MQTT_E_BASE] = "reserved fixed header flags set",
                [GW_MQTT_E_REMAINING_LENGTH - GW_MQTT_E_BASE] = "remaining length longer than 4 bytes",
                [GW_MQTT_E_TOO_LARGE - GW_MQTT_E_BASE] = "packet larger than the limit",
                [GW_MQTT_E_MALFORMED - GW_MQTT_E_BASE] = "malformed packet (bad length, truncated field or trailing bytes)",
                [GW_MQTT_E_UTF8 - GW_MQTT_E_BASE] = "string is not valid MQTT UTF-8",
                [GW_MQTT_E_PROTOCOL_NAME - GW_MQTT_E_BASE] = "CONNECT protocol name is not \"MQTT\"",
                [GW_MQTT_E_PROTOCOL_LEVEL - GW_MQTT_E_BASE] = "unsupported protocol level (only MQTT 3.1.1, level 4)",
                [GW_MQTT_E_CONNECT_FLAGS - GW_MQTT_E_BASE] = "invalid CONNECT flags",
                [GW_MQTT_E_CLIENT_ID - GW_MQTT_E_BASE] = "empty client identifier without clean session",
                [GW_MQTT_E_QOS - GW_MQTT_E_BASE] = "invalid QoS (3, or DUP on QoS 0)",
                [GW_MQTT_E_QOS2 - GW_MQTT_E_BASE] = "PUBLISH with QoS 2 is not supported",
                [GW_MQTT_E_TOPIC - GW_MQTT_E_BASE] = "invalid topic name (empty or wildcard)",
                [GW_MQTT_E_TOPIC_FILTER - GW_MQTT_E_BASE] = "invalid topic filter",
                [GW_MQTT_E_PACKET_ID - GW_MQTT_E_BASE] = "packet identifier 0",
                [GW_MQTT_E_NO_FILTERS - GW_MQTT_E_BASE] = "SUBSCRIBE/UNSUBSCRIBE without topic filters",
                [GW_MQTT_E_SUBSCRIBE_QOS - GW_MQTT_E_BASE] = "invalid requested QoS in SUBSCRIBE",
                [GW_MQTT_E_RETURN_CODE - GW_MQTT_E_BASE] = "undefined return code",
        };
        int e = -r;

        if (r == 0)
                return "need more data";
        if (r > 0)
                return "ok";
        if (e >= GW_MQTT_E_BASE && e < _GW_MQTT_E_MAX)
                return table[e - GW_MQTT_E_BASE];
        return strerror(e);
}

/* ---- encoding -------------------------------------------------------------------------- */

struct writer {
        uint8_t *p;   /* NULL: count only */
        size_t size;
        size_t pos;
};

static void put_u8(struct writer *w, uint8_t b) {
        if (w->p && w->pos < w->size)
                w->p[w->pos] = b;
        w->pos++;
}

static void put_u16(struct writer *w, uint16_t v) {
        put_u8(w, (uint8_t) (v >> 8));
        put_u8(w, (uint8_t) v);
}

static void put_raw(struct writer *w, const void *d, size_t n) {
        if (w->p && n > 0 && w->pos <= w->size && w->size - w->pos >= n)
                memcpy(w->p + w->pos, d, n);
        w->pos += n;
}

static void put_str(struct writer *w, struct gw_mqtt_str s) {
        put_u16(w, (uint16_t) s.len);
        put_raw(w, s.ptr, s.len);
}

static size_t remaining_length_size(size_t remaining) {
        return remaining < 128 ? 1 : remaining < 16384 ? 2 : remaining < 2097152 ? 3 : 4;
}

static void put_fixed_header(struct writer *w, uint8_t first, size_t remaining) {
        put_u8(w, first);
        do {
                uint8_t b = remaining & 0x7f;
                remaining >>= 7;
                put_u8(w, (uint8_t) (b | (remaining ? 0x80 : 0)));
        } while (remaining);
}

/* Runs the body writer twice: once to measure, once to write. */
static int finish(struct writer *w, uint8_t *buf, size_t size) {
        if (!buf)
                return (int) w->pos;
        if (w->pos > size)
                return -ENOBUFS;
        return (int) w->pos;
}

static bool str_ok(struct gw_mqtt_str s) {
        return s.len <= 65535 && (s.ptr || s.len == 0) && gw_mqtt_utf8_valid(s.ptr, s.len);
}

static bool bin_ok(struct gw_mqtt_str s) {
        return s.len <= 65535 && (s.ptr || s.len == 0);
}

size_t gw_mqtt_encode_connack(uint8_t buf[4], bool session_present, uint8_t return_code) {
        buf[0] = GW_MQTT_CONNACK << 4;
        buf[1] = 2;
        buf[2] = session_present ? 1 : 0;
        buf[3] = return_code;
        return 4;
}

size_t gw_mqtt_encode_ack(uint8_t buf[4], enum gw_mqtt_type type, uint16_t packet_id) {
        buf[0] = (uint8_t) ((type << 4) | (type == GW_MQTT_PUBREL ? 0x2 : 0));
        buf[1] = 2;
        buf[2] = (uint8_t) (packet_id >> 8);
        buf[3] = (uint8_t) packet_id;
        return 4;
}

size_t gw_mqtt_encode_pingresp(uint8_t buf[2]) {
        buf[0] = GW_MQTT_PINGRESP << 4;
        buf[1] = 0;
        return 2;
}

size_t gw_mqtt_encode_pingreq(uint8_t buf[2]) {
        buf[0] = GW_MQTT_PINGREQ << 4;
        buf[1] = 0;
        return 2;
}

size_t gw_mqtt_encode_disconnect(uint8_t buf[2]) {
        buf[0] = GW_MQTT_DISCONNECT << 4;
        buf[1] = 0;
        return 2;
}

int gw_mqtt_encode_suback(uint16_t packet_id, const uint8_t *codes, size_t n, uint8_t *buf, size_t size) {
        struct writer w = { buf, size, 0 };

        if (packet_id == 0 || n == 0 || !codes)
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if (codes[i] > 2 && codes[i] != GW_MQTT_SUBACK_FAILURE)
                        return -EINVAL;
        if (2 + n > GW_MQTT_MAX_REMAINING_LENGTH)
                return -EMSGSIZE;
        put_fixed_header(&w, GW_MQTT_SUBACK << 4, 2 + n);
        put_u16(&w, packet_id);
        put_raw(&w, codes, n);
        return finish(&w, buf, size);
}

static int publish_check(const struct gw_mqtt_publish *p, size_t *ret_remaining) {
        size_t remaining;

        if (!p || p->qos > 2 || (p->qos > 0 && p->packet_id == 0) || (p->qos == 0 && p->dup))
                return -EINVAL;
        if (!str_ok(p->topic) || !gw_mqtt_topic_name_valid(p->topic.ptr, p->topic.len))
                return -EINVAL;
        remaining = 2 + p->topic.len + (p->qos > 0 ? 2 : 0);
        if (p->payload_len > GW_MQTT_MAX_REMAINING_LENGTH - remaining)
                return -EMSGSIZE;
        *ret_remaining = remaining + p->payload_len;
        return 0;
}

static void put_publish_header(struct writer *w, const struct gw_mqtt_publish *p, size_t remaining) {
        put_fixed_header(w, (uint8_t) ((GW_MQTT_PUBLISH << 4) | (p->dup ? 0x08 : 0) | (p->qos << 1) | (p->retain ? 1 : 0)),
                         remaining);
        put_str(w, p->topic);
        if (p->qos > 0)
                put_u16(w, p->packet_id);
}

int gw_mqtt_encode_publish_header(const struct gw_mqtt_publish *p, uint8_t *buf, size_t size) {
        struct writer w = { buf, size, 0 };
        size_t remaining;
        int k = publish_check(p, &remaining);

        if (k < 0)
                return k;
        put_publish_header(&w, p, remaining);
        return finish(&w, buf, size);
}

int gw_mqtt_encode_publish(const struct gw_mqtt_publish *p, uint8_t *buf, size_t size) {
        struct writer w = { buf, size, 0 };
        size_t remaining;
        int k = publish_check(p, &remaining);

        if (k < 0)
                return k;
        if (p->payload_len > 0 && !p->payload)
                return -EINVAL;
        if (1 + remaining_length_size(remaining) + remaining > (size_t) INT32_MAX)
                return -EMSGSIZE;
        put_publish_header(&w, p, remaining);
        put_raw(&w, p->payload, p->payload_len);
        return finish(&w, buf, size);
}

int gw_mqtt_encode_connect(const struct gw_mqtt_connect *c, uint8_t *buf, size_t size) {
        struct writer w = { buf, size, 0 };
        size_t remaining;
        uint8_t flags = 0;

        if (!c || c->will_qos > 2 || (c->has_password && !c->has_username))
                return -EINVAL;
        if (!str_ok(c->client_id))
                return -EINVAL;
        if (c->will && (!str_ok(c->will_topic) || !gw_mqtt_topic_name_valid(c->will_topic.ptr, c->will_topic.len) ||
                        !bin_ok(c->will_payload)))
                return -EINVAL;
        if (!c->will && (c->will_qos || c->will_retain))
                return -EINVAL;
        if (c->has_username && !str_ok(c->username))
                return -EINVAL;
        if (c->has_password && !bin_ok(c->password))
                return -EINVAL;

        remaining = 2 + 4 + 1 + 1 + 2 + 2 + c->client_id.len;
        if (c->will)
                remaining += 2 + c->will_topic.len + 2 + c->will_payload.len;
        if (c->has_username)
                remaining += 2 + c->username.len;
        if (c->has_password)
                remaining += 2 + c->password.len;

        flags |= c->clean_session ? 0x02 : 0;
        flags |= c->will ? 0x04 : 0;
        flags |= (uint8_t) (c->will_qos << 3);
        flags |= c->will_retain ? 0x20 : 0;
        flags |= c->has_password ? 0x40 : 0;
        flags |= c->has_username ? 0x80 : 0;

        put_fixed_header(&w, GW_MQTT_CONNECT << 4, remaining);
        put_str(&w, GW_MQTT_STR("MQTT"));
        put_u8(&w, c->protocol_level ? c->protocol_level : 4);
        put_u8(&w, flags);
        put_u16(&w, c->keep_alive);
        put_str(&w, c->client_id);
        if (c->will) {
                put_str(&w, c->will_topic);
                put_str(&w, c->will_payload);
        }
        if (c->has_username)
                put_str(&w, c->username);
        if (c->has_password)
                put_str(&w, c->password);
        return finish(&w, buf, size);
}

static int encode_filter_list(enum gw_mqtt_type type, uint16_t packet_id, const struct gw_mqtt_subscription *subs,
                              const struct gw_mqtt_str *filters, size_t n, uint8_t *buf, size_t size) {
        struct writer w = { buf, size, 0 };
        size_t remaining = 2;

        if (packet_id == 0 || n == 0 || (!subs && !filters))
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                struct gw_mqtt_str f = subs ? subs[i].filter : filters[i];

                if (!str_ok(f) || !gw_mqtt_topic_filter_valid(f.ptr, f.len))
                        return -EINVAL;
                if (subs && subs[i].qos > 2)
                        return -EINVAL;
                if (remaining > GW_MQTT_MAX_REMAINING_LENGTH - 3 - f.len)
                        return -EMSGSIZE;
                remaining += 2 + f.len + (subs ? 1 : 0);
        }
        put_fixed_header(&w, (uint8_t) ((type << 4) | 0x2), remaining);
        put_u16(&w, packet_id);
        for (size_t i = 0; i < n; i++) {
                put_str(&w, subs ? subs[i].filter : filters[i]);
                if (subs)
                        put_u8(&w, subs[i].qos);
        }
        return finish(&w, buf, size);
}

int gw_mqtt_encode_subscribe(uint16_t packet_id, const struct gw_mqtt_subscription *subs, size_t n,
                             uint8_t *buf, size_t size) {
        if (!subs)
                return -EINVAL;
        return encode_filter_list(GW_MQTT_SUBSCRIBE, packet_id, subs, NULL, n, buf, size);
}

int gw_mqtt_encode_unsubscribe(uint16_t packet_id, const struct gw_mqtt_str *filters, size_t n, uint8_t *buf,
                               size_t size) {
        if (!filters)
                return -EINVAL;
        return encode_filter_list(GW_MQTT_UNSUBSCRIBE, packet_id, NULL, filters, n, buf, size);
}
