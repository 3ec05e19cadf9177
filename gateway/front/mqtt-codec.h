/* SPDX-License-Identifier: MIT */
#pragma once

/* MQTT 3.1.1 packet codec (OASIS standard, protocol level 4): a strict, bounded decoder and
 * the encoders for every packet fieldhub sends or a test client sends. No I/O.
 *
 * Decoding is stateless and incremental: the network layer keeps the bytes received so far in
 * its own buffer and calls gw_mqtt_decode() on them after each read:
 *
 *         r == 0   the buffer holds no complete packet yet (nothing consumed); read more.
 *                  Violations visible in the fixed header (reserved packet type or flags, a
 *                  remaining length of more than 4 bytes, a declared size above max_packet)
 *                  are reported as soon as those bytes are there, before the body arrives.
 *         r == 1   one packet decoded into *ret; *ret_consumed bytes (its whole size) belong
 *                  to it. Drop them from the buffer only after being done with *ret.
 *         r < 0    a protocol violation: gw_mqtt_strerror(r) names it for the log line
 *                  ("closing: <reason>"), and the connection must be closed. Two violations
 *                  call for a CONNACK before closing (MQTT 3.1.1 §3.1.2.2, §3.1.3.3):
 *                  GW_MQTT_E_PROTOCOL_LEVEL -> CONNACK 0x01, GW_MQTT_E_CLIENT_ID -> 0x02.
 *                  GW_MQTT_E_QOS2 is a PUBLISH with QoS 2, which IoT Hub answers by closing
 *                  the connection (reference §2.4); it is reported as soon as the fixed header
 *                  is complete, without waiting for (or checking) the body.
 *
 * Zero copy: every string and byte field of a decoded packet points into the caller's buffer
 * (struct gw_mqtt_str, not NUL-terminated). They stay valid as long as those bytes are neither
 * freed, moved nor overwritten, i.e. until the caller compacts its buffer.
 *
 * The decoder accepts packets of both directions (the server rejects client-bound ones
 * itself): tests and load generators decode what the server sends with the same code.
 * UTF-8 strings (MQTT §1.5.3) are checked: well-formed, no overlong forms, no surrogates,
 * nothing above U+10FFFF, no U+0000. Topic names carry no wildcard; topic filters place
 * them correctly (MQTT §4.7.1). Every length is checked against the remaining length, and a
 * packet must end exactly where its remaining length says. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum gw_mqtt_type {
        GW_MQTT_CONNECT = 1,
        GW_MQTT_CONNACK = 2,
        GW_MQTT_PUBLISH = 3,
        GW_MQTT_PUBACK = 4,
        GW_MQTT_PUBREC = 5,
        GW_MQTT_PUBREL = 6,
        GW_MQTT_PUBCOMP = 7,
        GW_MQTT_SUBSCRIBE = 8,
        GW_MQTT_SUBACK = 9,
        GW_MQTT_UNSUBSCRIBE = 10,
        GW_MQTT_UNSUBACK = 11,
        GW_MQTT_PINGREQ = 12,
        GW_MQTT_PINGRESP = 13,
        GW_MQTT_DISCONNECT = 14,
};

/* Protocol violations returned (negated) by gw_mqtt_decode(). Their values lie above every
 * errno value, so they are never mistaken for one. */
enum gw_mqtt_error {
        GW_MQTT_E_BASE = 4096,
        GW_MQTT_E_PACKET_TYPE = GW_MQTT_E_BASE, /* reserved packet type 0 or 15 */
        GW_MQTT_E_HEADER_FLAGS,      /* reserved bits of the fixed header not as required */
        GW_MQTT_E_REMAINING_LENGTH,  /* remaining length longer than 4 bytes */
        GW_MQTT_E_TOO_LARGE,         /* packet larger than the limit */
        GW_MQTT_E_MALFORMED,         /* truncated field, bad length, trailing bytes */
        GW_MQTT_E_UTF8,              /* a string is not well-formed UTF-8 or contains U+0000 */
        GW_MQTT_E_PROTOCOL_NAME,     /* CONNECT protocol name is not "MQTT" */
        GW_MQTT_E_PROTOCOL_LEVEL,    /* CONNECT protocol level is not 4: answer CONNACK 0x01 */
        GW_MQTT_E_CONNECT_FLAGS,     /* reserved flag, will QoS/retain or password flag wrong */
        GW_MQTT_E_CLIENT_ID,         /* empty client id without clean session: CONNACK 0x02 */
        GW_MQTT_E_QOS,               /* QoS 3, or DUP set on a QoS 0 PUBLISH */
        GW_MQTT_E_QOS2,              /* a PUBLISH with QoS 2 (IoT Hub closes the connection) */
        GW_MQTT_E_TOPIC,             /* empty topic name, or a wildcard in a topic name */
        GW_MQTT_E_TOPIC_FILTER,      /* empty or malformed topic filter */
        GW_MQTT_E_PACKET_ID,         /* packet identifier 0 */
        GW_MQTT_E_NO_FILTERS,        /* SUBSCRIBE/UNSUBSCRIBE without any topic filter */
        GW_MQTT_E_SUBSCRIBE_QOS,     /* requested QoS above 2 or reserved bits set */
        GW_MQTT_E_RETURN_CODE,       /* CONNACK/SUBACK return code not defined by the spec */
        _GW_MQTT_E_MAX,
};

/* Fixed sizes. */
#define GW_MQTT_MAX_REMAINING_LENGTH 268435455u /* 4 length bytes, MQTT §2.2.3 */
#define GW_MQTT_FIXED_HEADER_MAX 5u
/* Largest PUBLISH header (fixed header, topic, packet id) for a topic of n bytes. */
#define GW_MQTT_PUBLISH_HEADER_MAX(n) (GW_MQTT_FIXED_HEADER_MAX + 2u + (n) + 2u)
/* A D2C PUBLISH carries at most 256 KB of message (reference §2.4, §10) plus its topic (at most
 * 65535 bytes) and framing: the packet limit for device connections is the exact size of a QoS 1
 * PUBLISH with a 256 KB payload and the longest topic (its remaining length takes 3 bytes).
 * The message limit itself (body + properties) is enforced on the decoded message. */
#define GW_MQTT_DEVICE_MAX_PACKET (1u + 3u + 2u + 65535u + 2u + 256u * 1024u)

/* CONNACK return codes (MQTT §3.2.2.3, reference §2.3). */
enum {
        GW_MQTT_CONNACK_ACCEPTED = 0x00,
        GW_MQTT_CONNACK_BAD_PROTOCOL_VERSION = 0x01,
        GW_MQTT_CONNACK_IDENTIFIER_REJECTED = 0x02,
        GW_MQTT_CONNACK_SERVER_UNAVAILABLE = 0x03,
        GW_MQTT_CONNACK_BAD_USERNAME_PASSWORD = 0x04,
        GW_MQTT_CONNACK_NOT_AUTHORIZED = 0x05,
};
#define GW_MQTT_SUBACK_FAILURE 0x80

/* A string or byte field: len bytes at ptr, not NUL-terminated. ptr is NULL when absent. */
struct gw_mqtt_str {
        const char *ptr;
        size_t len;
};
#define GW_MQTT_STR(lit) ((struct gw_mqtt_str) { (lit), sizeof(lit) - 1 })
static inline struct gw_mqtt_str gw_mqtt_str_from(const char *s) {
        return (struct gw_mqtt_str) { s, s ? strlen(s) : 0 };
}
static inline bool gw_mqtt_str_eq(struct gw_mqtt_str a, const char *s) {
        size_t n = strlen(s);
        return a.len == n && (n == 0 || memcmp(a.ptr, s, n) == 0);
}

struct gw_mqtt_connect {
        uint8_t protocol_level;  /* always 4 after a successful decode */
        bool clean_session;
        uint16_t keep_alive;     /* seconds, 0 = none */
        struct gw_mqtt_str client_id;
        bool will;
        uint8_t will_qos;
        bool will_retain;
        struct gw_mqtt_str will_topic;
        struct gw_mqtt_str will_payload; /* binary */
        bool has_username;
        struct gw_mqtt_str username;
        bool has_password;
        struct gw_mqtt_str password;     /* binary */
};

struct gw_mqtt_publish {
        uint8_t qos;
        bool dup;
        bool retain;
        struct gw_mqtt_str topic;
        uint16_t packet_id;      /* 0 for QoS 0 */
        const uint8_t *payload;
        size_t payload_len;
};

/* One SUBSCRIBE entry, for the encoder. */
struct gw_mqtt_subscription {
        struct gw_mqtt_str filter;
        uint8_t qos;
};

struct gw_mqtt_packet {
        enum gw_mqtt_type type;
        uint8_t flags;           /* low nibble of the first byte */
        union {
                struct gw_mqtt_connect connect;
                struct {
                        bool session_present;
                        uint8_t return_code;
                } connack;
                struct gw_mqtt_publish publish;
                /* PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK */
                struct {
                        uint16_t packet_id;
                } ack;
                /* SUBSCRIBE, UNSUBSCRIBE: the validated entries, read with
                 * gw_mqtt_filter_next(); SUBACK: return codes. */
                struct {
                        uint16_t packet_id;
                        size_t count;
                        const uint8_t *entries;
                        size_t entries_len;
                } list;
        };
};

/* Decodes one packet from the start of buf (see the top of this file). max_packet is the
 * largest whole packet (fixed header included) accepted, at most 5 + 268435455; use
 * GW_MQTT_DEVICE_MAX_PACKET for device connections. Returns 1 and writes *ret and
 * *ret_consumed, 0 when more bytes are needed, -GW_MQTT_E_* on a violation, -EINVAL on bad
 * arguments. Never allocates, never blocks. */
int gw_mqtt_decode(const uint8_t *buf, size_t len, size_t max_packet, struct gw_mqtt_packet *ret,
                   size_t *ret_consumed);

/* Iterates the entries of a decoded SUBSCRIBE (filter + requested QoS), UNSUBSCRIBE (filter,
 * *ret_qos set to 0) or SUBACK (*ret_filter empty, *ret_qos = the return code). *cursor
 * starts at 0. Returns true and the next entry, false after the last one. */
bool gw_mqtt_filter_next(const struct gw_mqtt_packet *p, size_t *cursor, struct gw_mqtt_str *ret_filter,
                         uint8_t *ret_qos);

/* A static string describing a value returned by gw_mqtt_decode() (or any -errno). */
const char *gw_mqtt_strerror(int r);

/* Validation used by the decoder, for other layers: MQTT UTF-8 string rules; a topic name
 * (non-empty, valid UTF-8, no '+' or '#'); a topic filter (MQTT §4.7.1). */
bool gw_mqtt_utf8_valid(const char *s, size_t len);
bool gw_mqtt_topic_name_valid(const char *s, size_t len);
bool gw_mqtt_topic_filter_valid(const char *s, size_t len);

/* ---- Encoders --------------------------------------------------------------------------
 * Every encoder writes one packet to buf and returns its length. Those of variable size
 * compute the length only when buf is NULL; they return -ENOBUFS when size is too small
 * (nothing useful is left in buf then), -EINVAL for a field the spec forbids (invalid UTF-8,
 * a wildcard in a topic name, QoS > 2, packet id 0 where one is required, a field longer
 * than 65535 bytes) and -EMSGSIZE when the packet would exceed the maximum remaining length.
 * Fixed-size encoders write into a caller array of the stated size and cannot fail. */

/* Server → client. */
size_t gw_mqtt_encode_connack(uint8_t buf[4], bool session_present, uint8_t return_code);
/* PUBACK, PUBREC, PUBREL (flags 0010 set here), PUBCOMP and UNSUBACK: a packet id only.
 * type must be one of those. */
size_t gw_mqtt_encode_ack(uint8_t buf[4], enum gw_mqtt_type type, uint16_t packet_id);
static inline size_t gw_mqtt_encode_puback(uint8_t buf[4], uint16_t packet_id) {
        return gw_mqtt_encode_ack(buf, GW_MQTT_PUBACK, packet_id);
}
/* SUBACK with n return codes (0, 1, 2 or 0x80 each; n >= 1). */
int gw_mqtt_encode_suback(uint16_t packet_id, const uint8_t *codes, size_t n, uint8_t *buf, size_t size);
size_t gw_mqtt_encode_pingresp(uint8_t buf[2]);

/* PUBLISH, in two parts for scatter-gather output: the header (fixed header, topic, packet id;
 * at most GW_MQTT_PUBLISH_HEADER_MAX(topic.len) bytes) goes to buf, and the caller sends
 * p->payload_len payload bytes after it from wherever they are (p->payload is not read).
 * qos 0..2; packet_id must be non-zero for qos > 0 and is not written for qos 0. */
int gw_mqtt_encode_publish_header(const struct gw_mqtt_publish *p, uint8_t *buf, size_t size);
/* The whole PUBLISH, payload included, into one buffer. */
int gw_mqtt_encode_publish(const struct gw_mqtt_publish *p, uint8_t *buf, size_t size);

/* Client → server (tests, load generators). c->protocol_level 0 means 4; other values are
 * written as given (to test version refusal). The will, user name and password are written
 * when their flags are set. */
int gw_mqtt_encode_connect(const struct gw_mqtt_connect *c, uint8_t *buf, size_t size);
int gw_mqtt_encode_subscribe(uint16_t packet_id, const struct gw_mqtt_subscription *subs, size_t n,
                             uint8_t *buf, size_t size);
int gw_mqtt_encode_unsubscribe(uint16_t packet_id, const struct gw_mqtt_str *filters, size_t n, uint8_t *buf,
                               size_t size);
size_t gw_mqtt_encode_pingreq(uint8_t buf[2]);
size_t gw_mqtt_encode_disconnect(uint8_t buf[2]);
