/* SPDX-License-Identifier: MIT */
/* MQTT 3.1.1 codec and the IoT Hub topic layer (reference §2). */

#include <stdlib.h>
#include <string.h>

#include "front/mqtt-codec.h"
#include "front/mqtt-topic.h"
#include "hub/msg.h"
#include "test-util.h"

#define MAXP GW_MQTT_DEVICE_MAX_PACKET

#define ASSERT_MEMEQ(a, alen, b, blen)                                                          \
        do {                                                                                    \
                size_t _al = (alen), _bl = (blen);                                              \
                if (_al != _bl || memcmp((a), (b), _al) != 0) {                                  \
                        fprintf(stderr, "got:     ");                                           \
                        for (size_t _i = 0; _i < _al && _i < 200; _i++)                                     \
                                fprintf(stderr, "%02x ", ((const uint8_t *) (a))[_i]);          \
                        fprintf(stderr, "\nexpected:");                                         \
                        for (size_t _i = 0; _i < _bl && _i < 200; _i++)                                     \
                                fprintf(stderr, "%02x ", ((const uint8_t *) (b))[_i]);          \
                        fprintf(stderr, "\n");                                                  \
                        TEST_FAIL("%s != %s", #a, #b);                                          \
                }                                                                               \
        } while (0)

#define ASSERT_STR(s, lit) ASSERT_MEMEQ((s).ptr, (s).len, lit, strlen(lit))

/* Decodes exactly one packet that fills buf. */
static struct gw_mqtt_packet decode_one(const uint8_t *buf, size_t len) {
        struct gw_mqtt_packet p;
        size_t used = 0;

        ASSERT_EQ(gw_mqtt_decode(buf, len, MAXP, &p, &used), 1);
        ASSERT_EQ(used, len);
        /* Every proper prefix needs more bytes. */
        for (size_t i = 0; i < len; i++) {
                struct gw_mqtt_packet q;
                size_t u2 = 0;
                ASSERT_EQ(gw_mqtt_decode(buf, i, MAXP, &q, &u2), 0);
        }
        return p;
}

/* Decodes a malformed packet: the verdict must be err, whole or byte by byte. */
static void expect_error(const uint8_t *buf, size_t len, size_t maxp, int err) {
        struct gw_mqtt_packet p;
        size_t used = 0;
        int r = 0;

        ASSERT_ERR(gw_mqtt_decode(buf, len, maxp, &p, &used), err);
        for (size_t i = 0; i <= len && r == 0; i++)
                r = gw_mqtt_decode(buf, i, maxp, &p, &used);
        ASSERT_ERR(r, err);
        ASSERT_NOT_NULL(gw_mqtt_strerror(err));
}

/* ---- packet round trips ------------------------------------------------------------------ */

static void test_connect_roundtrip(void) {
        uint8_t buf[512];
        struct gw_mqtt_connect c = {
                .clean_session = false, .keep_alive = 180,
                .client_id = GW_MQTT_STR("dev1"),
                .will = true, .will_qos = 1, .will_retain = true,
                .will_topic = GW_MQTT_STR("devices/dev1/messages/events/"),
                .will_payload = GW_MQTT_STR("bye\0x"),
                .has_username = true, .username = GW_MQTT_STR("h/dev1/?api-version=2021-04-12"),
                .has_password = true, .password = GW_MQTT_STR("SharedAccessSignature sr=x"),
        };
        int n = gw_mqtt_encode_connect(&c, NULL, 0);
        ASSERT_TRUE(n > 0 && (size_t) n < sizeof buf);
        ASSERT_EQ(gw_mqtt_encode_connect(&c, buf, sizeof buf), n);
        ASSERT_ERR(gw_mqtt_encode_connect(&c, buf, (size_t) n - 1), -ENOBUFS);

        struct gw_mqtt_packet p = decode_one(buf, (size_t) n);
        ASSERT_EQ(p.type, GW_MQTT_CONNECT);
        ASSERT_EQ(p.connect.protocol_level, 4);
        ASSERT_FALSE(p.connect.clean_session);
        ASSERT_EQ(p.connect.keep_alive, 180);
        ASSERT_STR(p.connect.client_id, "dev1");
        ASSERT_TRUE(p.connect.will);
        ASSERT_EQ(p.connect.will_qos, 1);
        ASSERT_TRUE(p.connect.will_retain);
        ASSERT_STR(p.connect.will_topic, "devices/dev1/messages/events/");
        ASSERT_MEMEQ(p.connect.will_payload.ptr, p.connect.will_payload.len, "bye\0x", 5);
        ASSERT_TRUE(p.connect.has_username);
        ASSERT_STR(p.connect.username, "h/dev1/?api-version=2021-04-12");
        ASSERT_TRUE(p.connect.has_password);
        ASSERT_STR(p.connect.password, "SharedAccessSignature sr=x");
        /* Zero copy: fields point into the buffer. */
        ASSERT_TRUE(p.connect.client_id.ptr > (const char *) buf && p.connect.client_id.ptr < (const char *) buf + n);

        /* Minimal CONNECT: clean session, empty client id, no user name. */
        struct gw_mqtt_connect m = { .clean_session = true };
        n = gw_mqtt_encode_connect(&m, buf, sizeof buf);
        static const uint8_t minimal[] = { 0x10, 0x0c, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0x02, 0x00, 0x00, 0x00, 0x00 };
        ASSERT_MEMEQ(buf, (size_t) n, minimal, sizeof minimal);
        p = decode_one(buf, (size_t) n);
        ASSERT_TRUE(p.connect.clean_session);
        ASSERT_EQ(p.connect.client_id.len, 0);
        ASSERT_FALSE(p.connect.has_username || p.connect.has_password || p.connect.will);

        /* Encoder refuses what the spec forbids. */
        struct gw_mqtt_connect bad = { .has_password = true, .password = GW_MQTT_STR("x") };
        ASSERT_ERR(gw_mqtt_encode_connect(&bad, buf, sizeof buf), -EINVAL);
        bad = (struct gw_mqtt_connect) { .will = true, .will_topic = GW_MQTT_STR("a/#") };
        ASSERT_ERR(gw_mqtt_encode_connect(&bad, buf, sizeof buf), -EINVAL);
        bad = (struct gw_mqtt_connect) { .client_id = GW_MQTT_STR("\xc0\x80") };
        ASSERT_ERR(gw_mqtt_encode_connect(&bad, buf, sizeof buf), -EINVAL);
}

static void test_connack_roundtrip(void) {
        uint8_t buf[4];
        static const uint8_t exp[] = { 0x20, 0x02, 0x01, 0x05 };
        ASSERT_EQ(gw_mqtt_encode_connack(buf, true, GW_MQTT_CONNACK_NOT_AUTHORIZED), 4);
        ASSERT_MEMEQ(buf, 4, exp, 4);
        struct gw_mqtt_packet p = decode_one(buf, 4);
        ASSERT_EQ(p.type, GW_MQTT_CONNACK);
        ASSERT_TRUE(p.connack.session_present);
        ASSERT_EQ(p.connack.return_code, 5);
}

static void test_publish_roundtrip(void) {
        uint8_t buf[512], hdr[64];
        static const uint8_t payload[] = { 0x00, 0xff, 'x' };
        struct gw_mqtt_publish pub = {
                .qos = 1, .dup = true, .retain = true, .topic = GW_MQTT_STR("a/b"), .packet_id = 0x1234,
                .payload = payload, .payload_len = sizeof payload,
        };
        int n = gw_mqtt_encode_publish(&pub, buf, sizeof buf);
        static const uint8_t exp[] = { 0x3b, 0x0a, 0x00, 0x03, 'a', '/', 'b', 0x12, 0x34, 0x00, 0xff, 'x' };
        ASSERT_MEMEQ(buf, (size_t) n, exp, sizeof exp);

        /* Scatter form: header then payload gives the same bytes. */
        int h = gw_mqtt_encode_publish_header(&pub, hdr, sizeof hdr);
        ASSERT_EQ(h, n - (int) sizeof payload);
        ASSERT_MEMEQ(hdr, (size_t) h, exp, (size_t) h);
        ASSERT_TRUE((size_t) h <= GW_MQTT_PUBLISH_HEADER_MAX(3));
        ASSERT_ERR(gw_mqtt_encode_publish_header(&pub, hdr, (size_t) h - 1), -ENOBUFS);

        struct gw_mqtt_packet p = decode_one(buf, (size_t) n);
        ASSERT_EQ(p.type, GW_MQTT_PUBLISH);
        ASSERT_EQ(p.publish.qos, 1);
        ASSERT_TRUE(p.publish.dup && p.publish.retain);
        ASSERT_STR(p.publish.topic, "a/b");
        ASSERT_EQ(p.publish.packet_id, 0x1234);
        ASSERT_MEMEQ(p.publish.payload, p.publish.payload_len, payload, sizeof payload);

        /* QoS 0: no packet id, empty payload allowed. */
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("t") };
        n = gw_mqtt_encode_publish(&pub, buf, sizeof buf);
        static const uint8_t exp0[] = { 0x30, 0x03, 0x00, 0x01, 't' };
        ASSERT_MEMEQ(buf, (size_t) n, exp0, sizeof exp0);
        p = decode_one(buf, (size_t) n);
        ASSERT_EQ(p.publish.qos, 0);
        ASSERT_EQ(p.publish.packet_id, 0);
        ASSERT_EQ(p.publish.payload_len, 0);

        /* Encoder checks. */
        pub = (struct gw_mqtt_publish) { .qos = 1, .topic = GW_MQTT_STR("t") };
        ASSERT_ERR(gw_mqtt_encode_publish(&pub, buf, sizeof buf), -EINVAL); /* packet id 0 */
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("t/+") };
        ASSERT_ERR(gw_mqtt_encode_publish(&pub, buf, sizeof buf), -EINVAL);
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("") };
        ASSERT_ERR(gw_mqtt_encode_publish(&pub, buf, sizeof buf), -EINVAL);
        pub = (struct gw_mqtt_publish) { .qos = 3, .packet_id = 1, .topic = GW_MQTT_STR("t") };
        ASSERT_ERR(gw_mqtt_encode_publish(&pub, buf, sizeof buf), -EINVAL);
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("t"), .payload_len = GW_MQTT_MAX_REMAINING_LENGTH };
        ASSERT_ERR(gw_mqtt_encode_publish_header(&pub, hdr, sizeof hdr), -EMSGSIZE);
}

static void test_acks_roundtrip(void) {
        static const enum gw_mqtt_type types[] = { GW_MQTT_PUBACK, GW_MQTT_PUBREC, GW_MQTT_PUBREL, GW_MQTT_PUBCOMP,
                                                   GW_MQTT_UNSUBACK };
        for (size_t i = 0; i < ELEMENTSOF(types); i++) {
                uint8_t buf[4];
                ASSERT_EQ(gw_mqtt_encode_ack(buf, types[i], 0xbeef), 4);
                ASSERT_EQ(buf[0], (types[i] << 4) | (types[i] == GW_MQTT_PUBREL ? 2 : 0));
                ASSERT_EQ(buf[1], 2);
                struct gw_mqtt_packet p = decode_one(buf, 4);
                ASSERT_EQ(p.type, types[i]);
                ASSERT_EQ(p.ack.packet_id, 0xbeef);
        }
        uint8_t b2[2];
        static const uint8_t pingreq[] = { 0xc0, 0x00 }, pingresp[] = { 0xd0, 0x00 }, disc[] = { 0xe0, 0x00 };
        gw_mqtt_encode_pingreq(b2);
        ASSERT_MEMEQ(b2, 2, pingreq, 2);
        ASSERT_EQ(decode_one(b2, 2).type, GW_MQTT_PINGREQ);
        gw_mqtt_encode_pingresp(b2);
        ASSERT_MEMEQ(b2, 2, pingresp, 2);
        ASSERT_EQ(decode_one(b2, 2).type, GW_MQTT_PINGRESP);
        gw_mqtt_encode_disconnect(b2);
        ASSERT_MEMEQ(b2, 2, disc, 2);
        ASSERT_EQ(decode_one(b2, 2).type, GW_MQTT_DISCONNECT);
}

static void test_subscribe_roundtrip(void) {
        uint8_t buf[256];
        struct gw_mqtt_subscription subs[] = {
                { GW_MQTT_STR("a/+/c"), 0 }, { GW_MQTT_STR("#"), 1 }, { GW_MQTT_STR("x/#"), 2 },
        };
        int n = gw_mqtt_encode_subscribe(7, subs, 3, buf, sizeof buf);
        ASSERT_TRUE(n > 0);
        ASSERT_EQ(buf[0], 0x82);
        struct gw_mqtt_packet p = decode_one(buf, (size_t) n);
        ASSERT_EQ(p.type, GW_MQTT_SUBSCRIBE);
        ASSERT_EQ(p.list.packet_id, 7);
        ASSERT_EQ(p.list.count, 3);
        size_t cur = 0, i = 0;
        struct gw_mqtt_str f;
        uint8_t q;
        while (gw_mqtt_filter_next(&p, &cur, &f, &q)) {
                ASSERT_MEMEQ(f.ptr, f.len, subs[i].filter.ptr, subs[i].filter.len);
                ASSERT_EQ(q, subs[i].qos);
                i++;
        }
        ASSERT_EQ(i, 3);

        /* SUBACK including 0x80. */
        static const uint8_t codes[] = { 0, 1, 2, 0x80 };
        n = gw_mqtt_encode_suback(7, codes, 4, buf, sizeof buf);
        static const uint8_t exp[] = { 0x90, 0x06, 0x00, 0x07, 0x00, 0x01, 0x02, 0x80 };
        ASSERT_MEMEQ(buf, (size_t) n, exp, sizeof exp);
        p = decode_one(buf, (size_t) n);
        ASSERT_EQ(p.type, GW_MQTT_SUBACK);
        ASSERT_EQ(p.list.count, 4);
        cur = 0;
        i = 0;
        while (gw_mqtt_filter_next(&p, &cur, NULL, &q))
                ASSERT_EQ(q, codes[i++]);
        ASSERT_EQ(i, 4);
        static const uint8_t badcodes[] = { 3 };
        ASSERT_ERR(gw_mqtt_encode_suback(7, badcodes, 1, buf, sizeof buf), -EINVAL);
        ASSERT_ERR(gw_mqtt_encode_suback(7, codes, 0, buf, sizeof buf), -EINVAL);

        /* UNSUBSCRIBE. */
        struct gw_mqtt_str fl[] = { GW_MQTT_STR("a/b"), GW_MQTT_STR("c/#") };
        n = gw_mqtt_encode_unsubscribe(9, fl, 2, buf, sizeof buf);
        static const uint8_t uexp[] = { 0xa2, 0x0c, 0x00, 0x09, 0x00, 0x03, 'a', '/', 'b', 0x00, 0x03, 'c', '/', '#' };
        ASSERT_MEMEQ(buf, (size_t) n, uexp, sizeof uexp);
        p = decode_one(buf, (size_t) n);
        ASSERT_EQ(p.type, GW_MQTT_UNSUBSCRIBE);
        ASSERT_EQ(p.list.count, 2);
        cur = 0;
        ASSERT_TRUE(gw_mqtt_filter_next(&p, &cur, &f, &q));
        ASSERT_STR(f, "a/b");
        ASSERT_TRUE(gw_mqtt_filter_next(&p, &cur, &f, &q));
        ASSERT_STR(f, "c/#");
        ASSERT_FALSE(gw_mqtt_filter_next(&p, &cur, &f, &q));

        /* Encoder refuses bad filters. */
        struct gw_mqtt_subscription bad[] = { { GW_MQTT_STR("a/#/b"), 0 } };
        ASSERT_ERR(gw_mqtt_encode_subscribe(1, bad, 1, buf, sizeof buf), -EINVAL);
        ASSERT_ERR(gw_mqtt_encode_subscribe(0, subs, 1, buf, sizeof buf), -EINVAL);
}

static void test_remaining_length_forms(void) {
        /* 127, 128, 16383, 16384 byte bodies: 1, 2, 2, 3 length bytes. */
        static const size_t sizes[] = { 127, 128, 16383, 16384, 2097151, 2097152 };
        static const size_t lenbytes[] = { 1, 2, 2, 3, 3, 4 };
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                size_t plen = sizes[i] - 3; /* topic "t" = 3 bytes */
                uint8_t *payload = calloc(1, plen), *buf = malloc(plen + 16);
                ASSERT_NOT_NULL(payload);
                ASSERT_NOT_NULL(buf);
                struct gw_mqtt_publish pub = { .topic = GW_MQTT_STR("t"), .payload = payload, .payload_len = plen };
                int n = gw_mqtt_encode_publish(&pub, buf, plen + 16);
                ASSERT_EQ((size_t) n, 1 + lenbytes[i] + sizes[i]);
                struct gw_mqtt_packet p;
                size_t used;
                ASSERT_EQ(gw_mqtt_decode(buf, (size_t) n, (size_t) n, &p, &used), 1);
                ASSERT_EQ(used, (size_t) n);
                ASSERT_EQ(p.publish.payload_len, plen);
                /* One byte under the limit: refused on the header alone. */
                ASSERT_ERR(gw_mqtt_decode(buf, 1 + lenbytes[i], (size_t) n - 1, &p, &used), -GW_MQTT_E_TOO_LARGE);
                free(payload);
                free(buf);
        }
        /* Non-minimal encoding is accepted: PINGREQ with remaining length 0x80 0x00. */
        static const uint8_t nonmin[] = { 0xc0, 0x80, 0x00 };
        struct gw_mqtt_packet p;
        size_t used;
        ASSERT_EQ(gw_mqtt_decode(nonmin, 3, MAXP, &p, &used), 1);
        ASSERT_EQ(used, 3);
}

/* ---- malformed packets ----------------------------------------------------------------- */

static void test_malformed(void) {
        /* Remaining length of 5 bytes. */
        static const uint8_t rl5[] = { 0x30, 0x80, 0x80, 0x80, 0x80, 0x01 };
        expect_error(rl5, sizeof rl5, SIZE_MAX, -GW_MQTT_E_REMAINING_LENGTH);
        /* Reserved packet types. */
        static const uint8_t t0[] = { 0x00, 0x00 }, t15[] = { 0xf0, 0x00 };
        expect_error(t0, 2, MAXP, -GW_MQTT_E_PACKET_TYPE);
        expect_error(t15, 2, MAXP, -GW_MQTT_E_PACKET_TYPE);
        /* Reserved flags. */
        static const uint8_t sub_flags[] = { 0x80, 0x06, 0x00, 0x01, 0x00, 0x01, 'a', 0x00 };
        expect_error(sub_flags, sizeof sub_flags, MAXP, -GW_MQTT_E_HEADER_FLAGS);
        static const uint8_t puback_flags[] = { 0x41, 0x02, 0x00, 0x01 };
        expect_error(puback_flags, sizeof puback_flags, MAXP, -GW_MQTT_E_HEADER_FLAGS);
        static const uint8_t pubrel_flags[] = { 0x60, 0x02, 0x00, 0x01 };
        expect_error(pubrel_flags, sizeof pubrel_flags, MAXP, -GW_MQTT_E_HEADER_FLAGS);
        static const uint8_t ping_flags[] = { 0xc8, 0x00 };
        expect_error(ping_flags, 2, MAXP, -GW_MQTT_E_HEADER_FLAGS);
        /* QoS 3, DUP on QoS 0, QoS 2. */
        static const uint8_t qos3[] = { 0x36, 0x05, 0x00, 0x01, 't', 0x00, 0x01 };
        expect_error(qos3, sizeof qos3, MAXP, -GW_MQTT_E_QOS);
        static const uint8_t dup0[] = { 0x38, 0x03, 0x00, 0x01, 't' };
        expect_error(dup0, sizeof dup0, MAXP, -GW_MQTT_E_QOS);
        static const uint8_t qos2[] = { 0x34, 0x05, 0x00, 0x01, 't', 0x00, 0x01 };
        expect_error(qos2, sizeof qos2, MAXP, -GW_MQTT_E_QOS2);
        /* Zero packet ids. */
        static const uint8_t pub_id0[] = { 0x32, 0x05, 0x00, 0x01, 't', 0x00, 0x00 };
        expect_error(pub_id0, sizeof pub_id0, MAXP, -GW_MQTT_E_PACKET_ID);
        static const uint8_t puback_id0[] = { 0x40, 0x02, 0x00, 0x00 };
        expect_error(puback_id0, sizeof puback_id0, MAXP, -GW_MQTT_E_PACKET_ID);
        static const uint8_t sub_id0[] = { 0x82, 0x06, 0x00, 0x00, 0x00, 0x01, 'a', 0x00 };
        expect_error(sub_id0, sizeof sub_id0, MAXP, -GW_MQTT_E_PACKET_ID);
        /* Wildcards in a topic name, empty topic. */
        static const uint8_t wild1[] = { 0x30, 0x05, 0x00, 0x03, 'a', '/', '#' };
        expect_error(wild1, sizeof wild1, MAXP, -GW_MQTT_E_TOPIC);
        static const uint8_t wild2[] = { 0x30, 0x05, 0x00, 0x03, 'a', '+', 'b' };
        expect_error(wild2, sizeof wild2, MAXP, -GW_MQTT_E_TOPIC);
        static const uint8_t empty_topic[] = { 0x30, 0x02, 0x00, 0x00 };
        expect_error(empty_topic, sizeof empty_topic, MAXP, -GW_MQTT_E_TOPIC);
        /* Bad UTF-8: overlong NUL, U+0000, surrogate, truncated sequence, > U+10FFFF, lone continuation. */
        static const uint8_t u1[] = { 0x30, 0x04, 0x00, 0x02, 0xc0, 0x80 };
        static const uint8_t u2[] = { 0x30, 0x03, 0x00, 0x01, 0x00 };
        static const uint8_t u3[] = { 0x30, 0x05, 0x00, 0x03, 0xed, 0xa0, 0x80 };
        static const uint8_t u4[] = { 0x30, 0x04, 0x00, 0x02, 0xe2, 0x82 };
        static const uint8_t u5[] = { 0x30, 0x06, 0x00, 0x04, 0xf4, 0x90, 0x80, 0x80 };
        static const uint8_t u6[] = { 0x30, 0x03, 0x00, 0x01, 0x80 };
        static const uint8_t u7[] = { 0x30, 0x05, 0x00, 0x03, 0xe0, 0x80, 0x80 }; /* overlong 3-byte */
        expect_error(u1, sizeof u1, MAXP, -GW_MQTT_E_UTF8);
        expect_error(u2, sizeof u2, MAXP, -GW_MQTT_E_UTF8);
        expect_error(u3, sizeof u3, MAXP, -GW_MQTT_E_UTF8);
        expect_error(u4, sizeof u4, MAXP, -GW_MQTT_E_UTF8);
        expect_error(u5, sizeof u5, MAXP, -GW_MQTT_E_UTF8);
        expect_error(u6, sizeof u6, MAXP, -GW_MQTT_E_UTF8);
        expect_error(u7, sizeof u7, MAXP, -GW_MQTT_E_UTF8);
        /* Valid multi-byte UTF-8 is fine: "é€😀". */
        static const uint8_t ok8[] = { 0x30, 0x0b, 0x00, 0x09, 0xc3, 0xa9, 0xe2, 0x82, 0xac, 0xf0, 0x9f, 0x98, 0x80 };
        ASSERT_STR(decode_one(ok8, sizeof ok8).publish.topic, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
        /* Truncated fields: topic length beyond the packet, ack with 1 byte, trailing bytes. */
        static const uint8_t trunc[] = { 0x30, 0x03, 0x00, 0x05, 't' };
        expect_error(trunc, sizeof trunc, MAXP, -GW_MQTT_E_MALFORMED);
        static const uint8_t short_ack[] = { 0x40, 0x01, 0x01 };
        expect_error(short_ack, sizeof short_ack, MAXP, -GW_MQTT_E_MALFORMED);
        static const uint8_t long_ping[] = { 0xc0, 0x01, 0x00 };
        expect_error(long_ping, sizeof long_ping, MAXP, -GW_MQTT_E_MALFORMED);
        static const uint8_t qos1_no_id[] = { 0x32, 0x04, 0x00, 0x01, 't', 0x00 };
        expect_error(qos1_no_id, sizeof qos1_no_id, MAXP, -GW_MQTT_E_MALFORMED);
        /* SUBSCRIBE without filters, with requested QoS 3, with reserved bits, bad filter. */
        static const uint8_t sub_none[] = { 0x82, 0x02, 0x00, 0x01 };
        expect_error(sub_none, sizeof sub_none, MAXP, -GW_MQTT_E_NO_FILTERS);
        static const uint8_t unsub_none[] = { 0xa2, 0x02, 0x00, 0x01 };
        expect_error(unsub_none, sizeof unsub_none, MAXP, -GW_MQTT_E_NO_FILTERS);
        static const uint8_t sub_q3[] = { 0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 'a', 0x03 };
        expect_error(sub_q3, sizeof sub_q3, MAXP, -GW_MQTT_E_SUBSCRIBE_QOS);
        static const uint8_t sub_res[] = { 0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 'a', 0x04 };
        expect_error(sub_res, sizeof sub_res, MAXP, -GW_MQTT_E_SUBSCRIBE_QOS);
        static const uint8_t sub_nofilterqos[] = { 0x82, 0x05, 0x00, 0x01, 0x00, 0x01, 'a' };
        expect_error(sub_nofilterqos, sizeof sub_nofilterqos, MAXP, -GW_MQTT_E_MALFORMED);
        static const uint8_t sub_badf[] = { 0x82, 0x07, 0x00, 0x01, 0x00, 0x02, 'a', '#', 0x00 };
        expect_error(sub_badf, sizeof sub_badf, MAXP, -GW_MQTT_E_TOPIC_FILTER);
        static const uint8_t sub_emptyf[] = { 0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00 };
        expect_error(sub_emptyf, sizeof sub_emptyf, MAXP, -GW_MQTT_E_TOPIC_FILTER);
        /* SUBACK with an undefined code, CONNACK with reserved bits / code 6. */
        static const uint8_t suback_bad[] = { 0x90, 0x03, 0x00, 0x01, 0x03 };
        expect_error(suback_bad, sizeof suback_bad, MAXP, -GW_MQTT_E_RETURN_CODE);
        static const uint8_t connack_res[] = { 0x20, 0x02, 0x02, 0x00 };
        expect_error(connack_res, sizeof connack_res, MAXP, -GW_MQTT_E_MALFORMED);
        static const uint8_t connack_rc[] = { 0x20, 0x02, 0x00, 0x06 };
        expect_error(connack_rc, sizeof connack_rc, MAXP, -GW_MQTT_E_RETURN_CODE);
        /* Oversize packet refused on the header alone (no body bytes given). */
        static const uint8_t big[] = { 0x32, 0xff, 0xff, 0xff, 0x7f };
        struct gw_mqtt_packet p;
        size_t used;
        ASSERT_ERR(gw_mqtt_decode(big, sizeof big, MAXP, &p, &used), -GW_MQTT_E_TOO_LARGE);
        ASSERT_ERR(gw_mqtt_decode(big, 4, MAXP, &p, &used), -GW_MQTT_E_TOO_LARGE); /* even before the last length byte */
        ASSERT_EQ(gw_mqtt_decode(big, 3, MAXP, &p, &used), 0);
        ASSERT_EQ(gw_mqtt_decode(big, sizeof big, SIZE_MAX, &p, &used), 0);
        /* Bad arguments. */
        ASSERT_ERR(gw_mqtt_decode(NULL, 3, MAXP, &p, &used), -EINVAL);
        ASSERT_ERR(gw_mqtt_decode(big, 3, MAXP, NULL, &used), -EINVAL);
}

static void put_connect_header(uint8_t *b, size_t *n, const char *name, uint8_t level, uint8_t flags) {
        size_t nl = strlen(name);
        b[(*n)++] = 0x10;
        b[(*n)++] = 0; /* patched */
        b[(*n)++] = 0;
        b[(*n)++] = (uint8_t) nl;
        memcpy(b + *n, name, nl);
        *n += nl;
        b[(*n)++] = level;
        b[(*n)++] = flags;
        b[(*n)++] = 0;
        b[(*n)++] = 60;
}

static void connect_case(const char *name, uint8_t level, uint8_t flags, const char *rest, size_t rest_len, int err) {
        uint8_t b[256];
        size_t n = 0;
        put_connect_header(b, &n, name, level, flags);
        memcpy(b + n, rest, rest_len);
        n += rest_len;
        b[1] = (uint8_t) (n - 2);
        if (err == 1) {
                (void) decode_one(b, n);
                return;
        }
        expect_error(b, n, MAXP, err);
}

static void test_connect_malformed(void) {
        /* Client id "d" */
        connect_case("MQTT", 4, 0x02, "\0\1d", 3, 1);
        connect_case("MQTT", 3, 0x02, "\0\1d", 3, -GW_MQTT_E_PROTOCOL_LEVEL);
        connect_case("MQTT", 5, 0x02, "\0\1d", 3, -GW_MQTT_E_PROTOCOL_LEVEL);
        connect_case("MQIsdp", 3, 0x02, "\0\1d", 3, -GW_MQTT_E_PROTOCOL_LEVEL);
        connect_case("MQTX", 4, 0x02, "\0\1d", 3, -GW_MQTT_E_PROTOCOL_NAME);
        connect_case("MQTT", 4, 0x03, "\0\1d", 3, -GW_MQTT_E_CONNECT_FLAGS);  /* reserved bit */
        connect_case("MQTT", 4, 0x0a, "\0\1d", 3, -GW_MQTT_E_CONNECT_FLAGS);  /* will QoS without will */
        connect_case("MQTT", 4, 0x22, "\0\1d", 3, -GW_MQTT_E_CONNECT_FLAGS);  /* will retain without will */
        connect_case("MQTT", 4, 0x1e, "\0\1d\0\1t\0\0", 8, -GW_MQTT_E_CONNECT_FLAGS); /* will QoS 3 */
        connect_case("MQTT", 4, 0x42, "\0\1d\0\1p", 6, -GW_MQTT_E_CONNECT_FLAGS); /* password without user name */
        connect_case("MQTT", 4, 0x00, "\0\0", 2, -GW_MQTT_E_CLIENT_ID);      /* empty id, clean session 0 */
        connect_case("MQTT", 4, 0x02, "\0\0", 2, 1);                         /* empty id, clean session 1 */
        connect_case("MQTT", 4, 0x02, "\0\1d\0", 4, -GW_MQTT_E_MALFORMED);   /* trailing byte */
        connect_case("MQTT", 4, 0x82, "\0\1d", 3, -GW_MQTT_E_MALFORMED);     /* user name flag, no user name */
        connect_case("MQTT", 4, 0x06, "\0\1d\0\3a/#\0\0", 10, -GW_MQTT_E_TOPIC); /* will topic wildcard */
        connect_case("MQTT", 4, 0x82, "\0\1d\0\2\xc3\x28", 7, -GW_MQTT_E_UTF8); /* bad UTF-8 user name */
        connect_case("MQTT", 4, 0xc2, "\0\1d\0\1u\0\2\xff\x00", 10, 1);      /* binary password is not UTF-8 checked */
}

/* ---- byte-at-a-time feeding ------------------------------------------------------------- */

struct decoded {
        struct gw_mqtt_packet p[32];
        size_t offset[32];
        size_t n;
        int last;
};

/* Feeds data in chunks of `chunk` bytes into a growing buffer, as a network layer would. */
static void feed(const uint8_t *data, size_t len, size_t chunk, struct decoded *out) {
        size_t have = 0, start = 0;

        out->n = 0;
        out->last = 0;
        while (start < len) {
                struct gw_mqtt_packet p;
                size_t used;
                int r = gw_mqtt_decode(data + start, have - start, MAXP, &p, &used);
                if (r < 0) {
                        out->last = r;
                        return;
                }
                if (r == 1) {
                        out->p[out->n] = p;
                        out->offset[out->n++] = start;
                        start += used;
                        continue;
                }
                if (have == len)
                        return;
                have = MIN(len, have + chunk);
        }
}

static void assert_same_packets(const struct decoded *a, const struct decoded *b) {
        ASSERT_EQ(a->n, b->n);
        ASSERT_EQ(a->last, b->last);
        for (size_t i = 0; i < a->n; i++) {
                ASSERT_EQ(a->offset[i], b->offset[i]);
                ASSERT_TRUE(memcmp(&a->p[i], &b->p[i], sizeof a->p[i]) == 0);
        }
}

/* ---- the example session of reference §2.12 --------------------------------------------- */

static const char d2c_topic[] = "devices/dev1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8";
static const char c2d_topic[] =
        "devices/dev1/messages/devicebound/%24.mid=m-1&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&iothub-ack=full&cmd=open";

static size_t append(uint8_t *stream, size_t at, const uint8_t *b, int n) {
        ASSERT_TRUE(n > 0);
        memcpy(stream + at, b, (size_t) n);
        return at + (size_t) n;
}

static void test_example_session(void) {
        uint8_t stream[2048], tmp[512];
        size_t slen = 0;
        int n;

        /* C→S: the client packets, built with the client encoders. */
        struct gw_mqtt_connect c = {
                .clean_session = false, .keep_alive = 180, .client_id = GW_MQTT_STR("dev1"),
                .has_username = true,
                .username = GW_MQTT_STR("gw.example.local/dev1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v18)"),
                .has_password = true,
                .password = GW_MQTT_STR("SharedAccessSignature sr=gw.example.local%2Fdevices%2Fdev1&sig=abc&se=1"),
        };
        n = gw_mqtt_encode_connect(&c, tmp, sizeof tmp);
        /* Fixed and variable header by hand (MQTT §3.1): 0x10, remaining length (2 bytes,
         * > 127), "MQTT", level 4, flags user+password, clean 0 = 0xc0, keep-alive 180. */
        static const uint8_t connect_hdr[] = { 0x10, 0x00, 0x01, 0x00, 0x04, 'M', 'Q', 'T', 'T', 0x04, 0xc0, 0x00, 0xb4, 0x00, 0x04, 'd', 'e', 'v', '1' };
        ASSERT_EQ(n, 3 + 10 + 6 + 2 + (int) c.username.len + 2 + (int) c.password.len);
        ASSERT_EQ(tmp[0], 0x10);
        ASSERT_EQ(tmp[1], (uint8_t) (0x80 | ((n - 3) & 0x7f)));
        ASSERT_EQ(tmp[2], (uint8_t) ((n - 3) >> 7));
        ASSERT_MEMEQ(tmp + 3, sizeof connect_hdr - 3, connect_hdr + 3, sizeof connect_hdr - 3);
        slen = append(stream, slen, tmp, n);

        struct gw_mqtt_subscription subs[] = {
                { GW_MQTT_STR("devices/dev1/messages/devicebound/#"), 1 },
                { GW_MQTT_STR("$iothub/methods/POST/#"), 0 },
                { GW_MQTT_STR("$iothub/twin/res/#"), 0 },
                { GW_MQTT_STR("$iothub/twin/PATCH/properties/desired/#"), 0 },
        };
        n = gw_mqtt_encode_subscribe(1, subs, 4, tmp, sizeof tmp);
        slen = append(stream, slen, tmp, n);

        struct gw_mqtt_publish pub = { .qos = 1, .packet_id = 2, .topic = gw_mqtt_str_from(d2c_topic),
                                       .payload = (const uint8_t *) "{\"t\":21.5}", .payload_len = 10 };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        slen = append(stream, slen, tmp, n);
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("$iothub/twin/GET/?$rid=1") };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        slen = append(stream, slen, tmp, n);
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("$iothub/twin/PATCH/properties/reported/?$rid=2"),
                                         .payload = (const uint8_t *) "{\"interval\":5}", .payload_len = 14 };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        slen = append(stream, slen, tmp, n);
        pub = (struct gw_mqtt_publish) { .topic = GW_MQTT_STR("$iothub/methods/res/200/?$rid=a1"),
                                         .payload = (const uint8_t *) "{\"ok\":true}", .payload_len = 11 };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        slen = append(stream, slen, tmp, n);
        n = (int) gw_mqtt_encode_puback(tmp, 1);
        slen = append(stream, slen, tmp, n);
        n = (int) gw_mqtt_encode_disconnect(tmp);
        slen = append(stream, slen, tmp, n);

        /* Whole and byte at a time give the same packets at the same offsets. */
        static struct decoded whole, bytewise, sevens;
        feed(stream, slen, slen, &whole);
        feed(stream, slen, 1, &bytewise);
        feed(stream, slen, 7, &sevens);
        ASSERT_EQ(whole.n, 8);
        ASSERT_EQ(whole.last, 0);
        assert_same_packets(&whole, &bytewise);
        assert_same_packets(&whole, &sevens);

        /* The server's view of each packet. */
        const struct gw_mqtt_packet *p = whole.p;
        ASSERT_EQ(p[0].type, GW_MQTT_CONNECT);
        struct gw_mqtt_username u;
        ASSERT_OK(gw_mqtt_username_parse(p[0].connect.username.ptr, p[0].connect.username.len, &u));
        ASSERT_STREQ(u.host, "gw.example.local");
        ASSERT_STREQ(u.device_id, "dev1");
        ASSERT_NULL(u.module_id);
        ASSERT_STREQ(u.api_version, "2021-04-12");
        ASSERT_STREQ(u.client_type, "azure-iot-device/1.18.4 (node v18)");
        ASSERT_TRUE(gw_mqtt_client_id_matches(p[0].connect.client_id, u.device_id, u.module_id));
        ASSERT_FALSE(p[0].connect.clean_session);
        ASSERT_EQ(p[0].connect.keep_alive, 180);
        gw_mqtt_username_done(&u);

        ASSERT_EQ(p[1].type, GW_MQTT_SUBSCRIBE);
        ASSERT_EQ(p[1].list.count, 4);
        uint8_t granted[4];
        size_t cur = 0, k = 0;
        struct gw_mqtt_str f;
        uint8_t q;
        static const enum gw_mqtt_filter_kind kinds[] = { GW_MQTT_FILTER_C2D, GW_MQTT_FILTER_METHODS,
                                                          GW_MQTT_FILTER_TWIN_RESPONSE, GW_MQTT_FILTER_TWIN_DESIRED };
        while (gw_mqtt_filter_next(&p[1], &cur, &f, &q)) {
                struct gw_mqtt_filter fl;
                ASSERT_OK(gw_mqtt_filter_parse(f.ptr, f.len, &fl));
                ASSERT_EQ(fl.kind, kinds[k]);
                granted[k++] = gw_mqtt_granted_qos(q);
        }
        ASSERT_EQ(k, 4);

        ASSERT_EQ(p[2].type, GW_MQTT_PUBLISH);
        ASSERT_EQ(p[2].publish.qos, 1);
        struct gw_mqtt_topic t;
        ASSERT_OK(gw_mqtt_topic_parse(p[2].publish.topic.ptr, p[2].publish.topic.len, &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_EVENTS);
        ASSERT_STR(t.device_id, "dev1");
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        ASSERT_OK(gw_mqtt_d2c_message(&t, p[2].publish.payload, p[2].publish.payload_len, false, &m));
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE), "application/json");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_ENCODING), "utf-8");
        size_t blen = 0;
        const void *body = hub_msg_body(m, &blen);
        ASSERT_MEMEQ(body, blen, "{\"t\":21.5}", 10);

        ASSERT_OK(gw_mqtt_topic_parse(p[3].publish.topic.ptr, p[3].publish.topic.len, &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_TWIN_GET);
        ASSERT_STR(t.rid, "1");
        ASSERT_OK(gw_mqtt_topic_parse(p[4].publish.topic.ptr, p[4].publish.topic.len, &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_TWIN_PATCH_REPORTED);
        ASSERT_STR(t.rid, "2");
        ASSERT_FALSE(t.has_version);
        ASSERT_OK(gw_mqtt_topic_parse(p[5].publish.topic.ptr, p[5].publish.topic.len, &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_METHOD_RESPONSE);
        ASSERT_EQ(t.status, 200);
        ASSERT_STR(t.rid, "a1");
        ASSERT_EQ(p[6].type, GW_MQTT_PUBACK);
        ASSERT_EQ(p[6].ack.packet_id, 1);
        ASSERT_EQ(p[7].type, GW_MQTT_DISCONNECT);

        /* S→C: the server's replies, to the exact bytes (MQTT §3.2, §3.9, §3.4, §3.3). */
        static const uint8_t connack[] = { 0x20, 0x02, 0x00, 0x00 };
        ASSERT_EQ(gw_mqtt_encode_connack(tmp, false, GW_MQTT_CONNACK_ACCEPTED), 4);
        ASSERT_MEMEQ(tmp, 4, connack, 4);

        static const uint8_t suback[] = { 0x90, 0x06, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00 };
        n = gw_mqtt_encode_suback(p[1].list.packet_id, granted, 4, tmp, sizeof tmp);
        ASSERT_MEMEQ(tmp, (size_t) n, suback, sizeof suback);

        static const uint8_t puback[] = { 0x40, 0x02, 0x00, 0x02 };
        ASSERT_EQ(gw_mqtt_encode_puback(tmp, p[2].publish.packet_id), 4);
        ASSERT_MEMEQ(tmp, 4, puback, 4);

        /* Twin GET response: topic from the builder, rid echoed. */
        _cleanup_free_ char *topic = NULL;
        struct gw_mqtt_topic get;
        ASSERT_OK(gw_mqtt_topic_parse(p[3].publish.topic.ptr, p[3].publish.topic.len, &get));
        ASSERT_OK(gw_mqtt_topic_twin_response(200, get.rid, false, 0, &topic));
        static const char twin_body[] = "{\"desired\":{\"interval\":5,\"$version\":3},\"reported\":{\"$version\":7}}";
        pub = (struct gw_mqtt_publish) { .topic = gw_mqtt_str_from(topic), .payload = (const uint8_t *) twin_body,
                                         .payload_len = strlen(twin_body) };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        static const uint8_t twin_res_hdr[] = { 0x30, 0x5f, 0x00, 0x1c };
        ASSERT_MEMEQ(tmp, 4, twin_res_hdr, 4);
        ASSERT_MEMEQ(tmp + 4, 28, "$iothub/twin/res/200/?$rid=1", 28);
        ASSERT_MEMEQ(tmp + 32, (size_t) n - 32, twin_body, strlen(twin_body));
        ASSERT_EQ(n, 2 + 0x5f);
        free(TAKE_PTR(topic));

        /* Reported PATCH response with the new version, empty body. */
        struct gw_mqtt_topic patch;
        ASSERT_OK(gw_mqtt_topic_parse(p[4].publish.topic.ptr, p[4].publish.topic.len, &patch));
        ASSERT_OK(gw_mqtt_topic_twin_response(204, patch.rid, true, 8, &topic));
        pub = (struct gw_mqtt_publish) { .topic = gw_mqtt_str_from(topic) };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        static const uint8_t patch_res[] = "\x30\x29\x00\x27$iothub/twin/res/204/?$rid=2&$version=8";
        ASSERT_MEMEQ(tmp, (size_t) n, patch_res, sizeof patch_res - 1);
        free(TAKE_PTR(topic));

        /* Desired notification. */
        ASSERT_OK(gw_mqtt_topic_twin_desired(4, &topic));
        static const char desired_body[] = "{\"interval\":10,\"$version\":4}";
        pub = (struct gw_mqtt_publish) { .topic = gw_mqtt_str_from(topic), .payload = (const uint8_t *) desired_body,
                                         .payload_len = strlen(desired_body) };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        static const uint8_t desired[] =
                "\x30\x4f\x00\x31$iothub/twin/PATCH/properties/desired/?$version=4{\"interval\":10,\"$version\":4}";
        ASSERT_MEMEQ(tmp, (size_t) n, desired, sizeof desired - 1);
        free(TAKE_PTR(topic));

        /* Method request. */
        ASSERT_OK(gw_mqtt_topic_method_request("reboot", "a1", &topic));
        pub = (struct gw_mqtt_publish) { .topic = gw_mqtt_str_from(topic), .payload = (const uint8_t *) "{\"delay\":5}",
                                         .payload_len = 11 };
        n = gw_mqtt_encode_publish(&pub, tmp, sizeof tmp);
        static const uint8_t method[] = "\x30\x31\x00\x24$iothub/methods/POST/reboot/?$rid=a1{\"delay\":5}";
        ASSERT_MEMEQ(tmp, (size_t) n, method, sizeof method - 1);
        free(TAKE_PTR(topic));

        /* C2D delivery at QoS 1, packet id 1, the bag built from a hub message; header sent
         * apart from the payload (remaining length 129 = 0x81 0x01). */
        _cleanup_(hub_msg_unrefp) struct hub_msg *c2d = NULL;
        ASSERT_OK(hub_msg_new("open!", 5, HUB_MSG_C2D_MAX_SIZE, &c2d));
        ASSERT_OK(hub_msg_set_prop(c2d, "cmd", "open"));
        ASSERT_OK(hub_msg_set_sys(c2d, HUB_SYS_ACK, "full"));
        ASSERT_OK(hub_msg_set_sys(c2d, HUB_SYS_TO, "/devices/dev1/messages/deviceBound"));
        ASSERT_OK(hub_msg_set_sys(c2d, HUB_SYS_MESSAGE_ID, "m-1"));
        ASSERT_OK(gw_mqtt_topic_c2d("dev1", c2d, &topic));
        ASSERT_STREQ(topic, c2d_topic);
        pub = (struct gw_mqtt_publish) { .qos = 1, .packet_id = 1, .topic = gw_mqtt_str_from(topic), .payload_len = 5 };
        n = gw_mqtt_encode_publish_header(&pub, tmp, sizeof tmp);
        static const uint8_t c2d_hdr[] = { 0x32, 0x81, 0x01, 0x00, 0x78 };
        ASSERT_EQ(n, 5 + 120 + 2);
        ASSERT_MEMEQ(tmp, 5, c2d_hdr, 5);
        ASSERT_MEMEQ(tmp + 5, 120, c2d_topic, 120);
        ASSERT_EQ(tmp[125], 0x00);
        ASSERT_EQ(tmp[126], 0x01);

        /* The client side decodes that delivery back into the same properties. */
        memcpy(tmp + n, "open!", 5);
        struct gw_mqtt_packet d = decode_one(tmp, (size_t) n + 5);
        ASSERT_EQ(d.publish.qos, 1);
        ASSERT_STR(d.publish.topic, c2d_topic);
        const char *bag = d.publish.topic.ptr + strlen("devices/dev1/messages/devicebound/");
        _cleanup_(hub_msg_unrefp) struct hub_msg *back = NULL;
        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_C2D_MAX_SIZE, &back));
        ASSERT_OK(gw_mqtt_bag_decode(bag, (size_t) (d.publish.topic.ptr + d.publish.topic.len - bag),
                                     GW_MQTT_BAG_DOWNSTREAM, back));
        ASSERT_STREQ(hub_msg_get_sys(back, HUB_SYS_MESSAGE_ID), "m-1");
        ASSERT_STREQ(hub_msg_get_sys(back, HUB_SYS_TO), "/devices/dev1/messages/deviceBound");
        ASSERT_STREQ(hub_msg_get_sys(back, HUB_SYS_ACK), "full");
        ASSERT_STREQ(hub_msg_get_prop(back, "cmd", NULL), "open");
        ASSERT_EQ(hub_msg_n_props(back), 1);
}

/* ---- user names (reference §2.2) ------------------------------------------------------ */

static void username_ok(const char *s, const char *host, const char *dev, const char *mod, const char *api,
                        const char *type, const char *model) {
        struct gw_mqtt_username u;
        ASSERT_OK(gw_mqtt_username_parse(s, strlen(s), &u));
        ASSERT_STREQ(u.host, host);
        ASSERT_STREQ(u.device_id, dev);
        if (mod)
                ASSERT_STREQ(u.module_id, mod);
        else
                ASSERT_NULL(u.module_id);
        ASSERT_STREQ(u.api_version, api);
        if (type)
                ASSERT_STREQ(u.client_type, type);
        else
                ASSERT_NULL(u.client_type);
        if (model)
                ASSERT_STREQ(u.model_id, model);
        else
                ASSERT_NULL(u.model_id);
        gw_mqtt_username_done(&u);
}

static void username_bad(const char *s) {
        struct gw_mqtt_username u;
        ASSERT_ERR(gw_mqtt_username_parse(s, strlen(s), &u), -EBADMSG);
}

static void test_username(void) {
        /* C SDK module shape and Node shape quoted in §2.2. */
        username_ok("gw.example.local/dev1/DeviceUpdate/?api-version=2020-09-30&DeviceClientType=iothubclient%2f1.9.0%20(native%3b%20Linux%3b%20aarch64)",
                    "gw.example.local", "dev1", "DeviceUpdate", "2020-09-30", "iothubclient/1.9.0 (native; Linux; aarch64)", NULL);
        username_ok("gw.example.local/dev1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20...)",
                    "gw.example.local", "dev1", NULL, "2021-04-12", "azure-iot-device/1.18.4 (node ...)", NULL);
        /* Old form without "?". */
        username_ok("gw.example.local/dev1/api-version=2016-11-14&DeviceClientType=iothubclient%2f1.1.0",
                    "gw.example.local", "dev1", NULL, "2016-11-14", "iothubclient/1.1.0", NULL);
        username_ok("h.x/d/m/api-version=2016-11-14", "h.x", "d", "m", "2016-11-14", NULL, NULL);
        /* model-id (PnP), unknown parameters ignored (even malformed ones), any order. */
        username_ok("h.x/dev1/?model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1&api-version=2021-04-12&auth-chain=a;b&x=%zz&flag",
                    "h.x", "dev1", NULL, "2021-04-12", NULL, "dtmi:com:example:Thermostat;1");
        username_ok("h.x/dev1/?api-version=2020-09-30&model-id=dtmi:com:example:Thermostat;1",
                    "h.x", "dev1", NULL, "2020-09-30", NULL, "dtmi:com:example:Thermostat;1");
        /* Device ids may hold "=", "?", "$" (IoT Hub id characters): taken verbatim. */
        username_ok("h.x/a=b?$/?api-version=1", "h.x", "a=b?$", NULL, "1", NULL, NULL);
        /* "+" stays "+". */
        username_ok("h.x/d/?api-version=1&DeviceClientType=a+b", "h.x", "d", NULL, "1", "a+b", NULL);

        username_bad("");
        username_bad("h.x/dev1/?DeviceClientType=x");          /* api-version missing */
        username_bad("h.x/dev1/?api-version=");                /* empty */
        username_bad("h.x/dev1/?api-version");                 /* no value */
        username_bad("h.x/dev1/");                             /* no params */
        username_bad("h.x/dev1");                              /* two segments */
        username_bad("h.x/d/m/x/?api-version=1");              /* five segments */
        username_bad("/dev1/?api-version=1");                  /* empty host */
        username_bad("h.x//?api-version=1");                   /* empty device */
        username_bad("h.x/d//?api-version=1");                 /* empty module */
        username_bad("h.x/d/?api-version=1&api-version=2");    /* duplicate */
        username_bad("h.x/d/?api-version=1&DeviceClientType=%4");  /* malformed escape */
        username_bad("h.x/d/?api-version=1&DeviceClientType=%00"); /* escaped NUL */
        username_bad("h.x/d/?api-version=1&DeviceClientType=a/b"); /* raw "/" makes a 4th segment... */
        struct gw_mqtt_username u;
        ASSERT_ERR(gw_mqtt_username_parse("h.x/d/?api-version=1\0", 21, &u), -EBADMSG);

        /* Client id helper. */
        ASSERT_TRUE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev1"), "dev1", NULL));
        ASSERT_TRUE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev1/m1"), "dev1", "m1"));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev1/m1"), "dev1", NULL));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev1"), "dev1", "m1"));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev12"), "dev1", NULL));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev"), "dev1", NULL));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev1/m2"), "dev1", "m1"));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR("dev1:m1"), "dev1", "m1"));
        ASSERT_FALSE(gw_mqtt_client_id_matches(GW_MQTT_STR(""), "", NULL));
}

/* ---- device → hub topics (reference §2.7, §2.9, §2.10) ------------------------------- */

static void events_ok(const char *topic, const char *dev, const char *mod, const char *bag) {
        struct gw_mqtt_topic t;
        ASSERT_OK(gw_mqtt_topic_parse(topic, strlen(topic), &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_EVENTS);
        ASSERT_STR(t.device_id, dev);
        if (mod)
                ASSERT_STR(t.module_id, mod);
        else
                ASSERT_NULL(t.module_id.ptr);
        ASSERT_STR(t.bag, bag);
}

static void topic_err(const char *topic, int err) {
        struct gw_mqtt_topic t;
        ASSERT_ERR(gw_mqtt_topic_parse(topic, strlen(topic), &t), err);
}

static void test_topics(void) {
        events_ok("devices/dev1/messages/events/", "dev1", NULL, "");
        events_ok("devices/dev1/messages/events", "dev1", NULL, "");
        events_ok("devices/dev1/messages/events/a=b&c", "dev1", NULL, "a=b&c");
        events_ok("devices/dev1/messages/events/a=b&c/", "dev1", NULL, "a=b&c");
        events_ok("devices/dev1/messages/events/?a=b", "dev1", NULL, "a=b");
        events_ok("devices/d1/messages/events/?a=b/", "d1", NULL, "a=b");
        events_ok("devices/edge1/modules/m1/messages/events/%24.on=alert/", "edge1", "m1", "%24.on=alert");
        events_ok("devices/edge1/modules/m1/messages/events", "edge1", "m1", "");
        events_ok("devices/edge1/modules/m1/messages/events/", "edge1", "m1", "");
        events_ok("devices/edge1/modules/m1/messages/events/$.on=out1", "edge1", "m1", "$.on=out1");

        struct gw_mqtt_topic t;
        ASSERT_OK(gw_mqtt_topic_parse("$iothub/twin/GET/?$rid=42", 25, &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_TWIN_GET);
        ASSERT_STR(t.rid, "42");
        const char *s = "$iothub/twin/PATCH/properties/reported/?$rid=7f1b-2c&$version=12";
        ASSERT_OK(gw_mqtt_topic_parse(s, strlen(s), &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_TWIN_PATCH_REPORTED);
        ASSERT_STR(t.rid, "7f1b-2c");
        ASSERT_TRUE(t.has_version);
        ASSERT_EQ(t.version, 12);
        s = "$iothub/twin/PATCH/properties/reported/?$version=3&$rid=x";
        ASSERT_OK(gw_mqtt_topic_parse(s, strlen(s), &t));
        ASSERT_STR(t.rid, "x");
        ASSERT_EQ(t.version, 3);
        s = "$iothub/methods/res/-5/?$rid=505e09bb-0076-4b9f-b4a3-529430f1593f";
        ASSERT_OK(gw_mqtt_topic_parse(s, strlen(s), &t));
        ASSERT_EQ(t.kind, GW_MQTT_TOPIC_METHOD_RESPONSE);
        ASSERT_EQ(t.status, -5);
        ASSERT_STR(t.rid, "505e09bb-0076-4b9f-b4a3-529430f1593f");

        topic_err("devices/dev1/messages/events/a/b", -ENOENT);
        topic_err("devices/dev1/messages/events//", -ENOENT);
        topic_err("devices/dev1/messages/eventsX", -ENOENT);
        topic_err("devices//messages/events/", -ENOENT);
        topic_err("devices/dev1/modules//messages/events/", -ENOENT);
        topic_err("devices/dev1/messages/devicebound/", -ENOENT);
        topic_err("devices/dev1", -ENOENT);
        topic_err("devices/dev1/modules/m1/inputs/x/", -ENOENT);
        topic_err("foo/bar", -ENOENT);
        topic_err("", -ENOENT);
        topic_err("$iothub/twin/GET", -ENOENT);
        topic_err("$iothub/twin/res/200/?$rid=1", -ENOENT);
        topic_err("$iothub/twin/GET/?$rid=1/x", -ENOENT);
        topic_err("$iothub/twin/GET/?x=1", -EBADMSG);
        topic_err("$iothub/twin/GET/?$rid=", -EBADMSG);
        topic_err("$iothub/twin/GET/?$rid=1&$rid=2", -EBADMSG);
        topic_err("$iothub/twin/PATCH/properties/reported/?$rid=1&$version=x", -EBADMSG);
        topic_err("$iothub/twin/PATCH/properties/reported/?$rid=1&$version=99999999999999999999", -EBADMSG);
        topic_err("$iothub/methods/res/abc/?$rid=1", -EBADMSG);
        topic_err("$iothub/methods/res/2147483648/?$rid=1", -EBADMSG);
        topic_err("$iothub/methods/res/200", -ENOENT);
        topic_err("$iothub/methods/POST/x/?$rid=1", -ENOENT);
}

/* ---- property bags (reference §2.5–2.7) ------------------------------------------------- */

static struct hub_msg *d2c(const char *topic, const char *body) {
        struct gw_mqtt_topic t;
        struct hub_msg *m = NULL;
        ASSERT_OK(gw_mqtt_topic_parse(topic, strlen(topic), &t));
        ASSERT_OK(gw_mqtt_d2c_message(&t, body, strlen(body), false, &m));
        return m;
}

static void test_bags(void) {
        /* The Node example of §2.7. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m =
                d2c("devices/dev1/messages/events/%24.mid=42&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21", "{}");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID), "42");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE), "application/json");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_ENCODING), "utf-8");
        ASSERT_EQ(hub_msg_n_props(m), 1);
        ASSERT_STREQ(hub_msg_get_prop(m, "temp", NULL), "21");

        /* "$." raw is the same as "%24."; leading "?", trailing "/". */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m2 =
                d2c("devices/dev1/messages/events/?$.mid=42&$.ct=application%2Fjson&%24.ce=utf-8&temp=21/", "{}");
        ASSERT_STREQ(hub_msg_get_sys(m2, HUB_SYS_MESSAGE_ID), "42");
        ASSERT_STREQ(hub_msg_get_sys(m2, HUB_SYS_CONTENT_TYPE), "application/json");
        ASSERT_STREQ(hub_msg_get_prop(m2, "temp", NULL), "21");
        ASSERT_EQ(hub_msg_n_props(m2), 1);

        /* Null and empty values, escaped names, unknown $. names, stamped ones dropped,
         * iothub-ack from a device is an application property, empty items skipped. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m3 = d2c(
                "devices/dev1/modules/m1/messages/events/k&e=&a%20b=c%26d&&%24.on=alert&%24.cdid=evil&$.cmid=evil&$.zz=1&iothub-ack=full&$.mid",
                "");
        bool found = false;
        ASSERT_NULL(hub_msg_get_prop(m3, "k", &found));
        ASSERT_TRUE(found);
        ASSERT_STREQ(hub_msg_get_prop(m3, "e", NULL), "");
        ASSERT_STREQ(hub_msg_get_prop(m3, "a b", NULL), "c&d");
        ASSERT_STREQ(hub_msg_get_sys(m3, HUB_SYS_OUTPUT_NAME), "alert");
        ASSERT_NULL(hub_msg_get_sys(m3, HUB_SYS_CONNECTION_DEVICE_ID));
        ASSERT_NULL(hub_msg_get_sys(m3, HUB_SYS_CONNECTION_MODULE_ID));
        ASSERT_STREQ(hub_msg_get_prop(m3, "$.zz", NULL), "1");
        ASSERT_STREQ(hub_msg_get_prop(m3, "iothub-ack", NULL), "full");
        ASSERT_NULL(hub_msg_get_sys(m3, HUB_SYS_ACK));
        ASSERT_NULL(hub_msg_get_sys(m3, HUB_SYS_MESSAGE_ID));
        ASSERT_EQ(hub_msg_n_props(m3), 5);

        /* RETAIN → mqtt-retain=true. */
        struct gw_mqtt_topic t;
        ASSERT_OK(gw_mqtt_topic_parse("devices/d/messages/events/", 26, &t));
        _cleanup_(hub_msg_unrefp) struct hub_msg *m4 = NULL;
        ASSERT_OK(gw_mqtt_d2c_message(&t, "x", 1, true, &m4));
        ASSERT_STREQ(hub_msg_get_prop(m4, "mqtt-retain", NULL), "true");

        /* Malformed bags. */
        static const char *const bad[] = { "a=%zz", "a%=1", "%2=1", "=v", "a=%00", "%24.mid=%G1" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                _cleanup_(hub_msg_unrefp) struct hub_msg *x = NULL;
                ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_D2C_MAX_SIZE, &x));
                ASSERT_ERR(gw_mqtt_bag_decode(bad[i], strlen(bad[i]), 0, x), -EBADMSG);
        }
        /* Message id over 128 characters. */
        char longid[200] = "$.mid=";
        memset(longid + 6, 'a', 129);
        _cleanup_(hub_msg_unrefp) struct hub_msg *x = NULL;
        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_D2C_MAX_SIZE, &x));
        ASSERT_ERR(gw_mqtt_bag_decode(longid, strlen(longid), 0, x), -E2BIG);

        /* Encoding: §2.8 real Azure example. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *c = NULL;
        ASSERT_OK(hub_msg_new("hi", 2, HUB_MSG_C2D_MAX_SIZE, &c));
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_ACK, "none"));
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_CONTENT_ENCODING, "utf-8"));
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_TO, "/devices/pubsub/messages/devicebound"));
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_MESSAGE_ID, "2c2db32a-9c41-4073-baa4-db584e021573"));
        _cleanup_free_ char *topic = NULL;
        ASSERT_OK(gw_mqtt_topic_c2d("pubsub", c, &topic));
        ASSERT_STREQ(topic, "devices/pubsub/messages/devicebound/%24.mid=2c2db32a-9c41-4073-baa4-db584e021573&%24.to=%2Fdevices%2Fpubsub%2Fmessages%2Fdevicebound&%24.ce=utf-8&iothub-ack=none");
        /* Older shape: exp, cid, then application properties incl. a null one and reserved chars. */
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_EXPIRY_TIME, "2017-05-04T20:07:30.000Z"));
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_CORRELATION_ID, "c 1"));
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_ACK, "full"));
        ASSERT_OK(hub_msg_set_prop(c, "property1", "value1"));
        ASSERT_OK(hub_msg_set_prop(c, "n$", NULL));
        ASSERT_OK(hub_msg_set_prop(c, "u", "~-._ä&=/?"));
        _cleanup_free_ char *bag = NULL;
        ASSERT_OK(gw_mqtt_bag_encode(c, &bag));
        ASSERT_STREQ(bag, "%24.mid=2c2db32a-9c41-4073-baa4-db584e021573&%24.to=%2Fdevices%2Fpubsub%2Fmessages%2Fdevicebound"
                          "&%24.exp=2017-05-04T20%3A07%3A30.000Z&%24.cid=c%201&%24.ce=utf-8&iothub-ack=full"
                          "&property1=value1&n%24&u=~-._%C3%A4%26%3D%2F%3F");
        /* ... and decodes back to the same properties. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *back = NULL;
        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_C2D_MAX_SIZE, &back));
        ASSERT_OK(gw_mqtt_bag_decode(bag, strlen(bag), GW_MQTT_BAG_DOWNSTREAM, back));
        for (int p = 0; p < _HUB_SYS_MAX; p++) {
                const char *a = hub_msg_get_sys(c, (enum hub_sys_prop) p), *b = hub_msg_get_sys(back, (enum hub_sys_prop) p);
                ASSERT_TRUE((!a && !b) || (a && b && strcmp(a, b) == 0));
        }
        ASSERT_EQ(hub_msg_n_props(back), 3);
        ASSERT_STREQ(hub_msg_get_prop(back, "u", NULL), "~-._ä&=/?");
        found = false;
        ASSERT_NULL(hub_msg_get_prop(back, "n$", &found));
        ASSERT_TRUE(found);

        /* No properties: topic ends with "devicebound/". */
        _cleanup_(hub_msg_unrefp) struct hub_msg *e = NULL;
        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_C2D_MAX_SIZE, &e));
        _cleanup_free_ char *t2 = NULL, *t3 = NULL, *empty = NULL;
        ASSERT_OK(gw_mqtt_topic_c2d("d", e, &t2));
        ASSERT_STREQ(t2, "devices/d/messages/devicebound/");
        ASSERT_OK(gw_mqtt_bag_encode(e, &empty));
        ASSERT_STREQ(empty, "");
        /* Module input with the sender's identity. */
        ASSERT_OK(hub_msg_set_sys(e, HUB_SYS_CONNECTION_DEVICE_ID, "edge1"));
        ASSERT_OK(hub_msg_set_sys(e, HUB_SYS_CONNECTION_MODULE_ID, "m0"));
        ASSERT_OK(gw_mqtt_topic_module_input("edge1", "m1", "in1", e, &t3));
        ASSERT_STREQ(t3, "devices/edge1/modules/m1/inputs/in1/%24.cdid=edge1&%24.cmid=m0");

        /* Builders refuse what cannot be in a topic. */
        char *r = NULL;
        ASSERT_ERR(gw_mqtt_topic_c2d("a/b", e, &r), -EINVAL);
        ASSERT_ERR(gw_mqtt_topic_c2d("", e, &r), -EINVAL);
        ASSERT_ERR(gw_mqtt_topic_method_request("a/b", "1", &r), -EINVAL);
        ASSERT_ERR(gw_mqtt_topic_method_request("m", "1&x", &r), -EINVAL);
        ASSERT_ERR(gw_mqtt_topic_twin_response(200, GW_MQTT_STR("a/b"), false, 0, &r), -EINVAL);
        ASSERT_ERR(gw_mqtt_topic_twin_response(200, GW_MQTT_STR(""), false, 0, &r), -EINVAL);
        ASSERT_NULL(r);
}

static void test_d2c_limit(void) {
        const size_t L = HUB_MSG_D2C_MAX_SIZE;
        char *body = malloc(L + 1);
        ASSERT_NOT_NULL(body);
        memset(body, 'x', L + 1);
        struct gw_mqtt_topic t;
        const char *plain = "devices/d/messages/events/";
        const char *with = "devices/d/messages/events/abcde=fghij";       /* 10 bytes of property */
        const char *sys = "devices/d/messages/events/%24.mid=0123456789"; /* 10 bytes of system value */
        struct hub_msg *m = NULL;

        ASSERT_OK(gw_mqtt_topic_parse(plain, strlen(plain), &t));
        ASSERT_OK(gw_mqtt_d2c_message(&t, body, L, false, &m));
        m = hub_msg_unref(m);
        ASSERT_ERR(gw_mqtt_d2c_message(&t, body, L + 1, false, &m), -E2BIG);

        ASSERT_OK(gw_mqtt_topic_parse(with, strlen(with), &t));
        ASSERT_OK(gw_mqtt_d2c_message(&t, body, L - 10, false, &m));
        m = hub_msg_unref(m);
        ASSERT_ERR(gw_mqtt_d2c_message(&t, body, L - 9, false, &m), -E2BIG);

        ASSERT_OK(gw_mqtt_topic_parse(sys, strlen(sys), &t));
        ASSERT_OK(gw_mqtt_d2c_message(&t, body, L - 10, false, &m));
        m = hub_msg_unref(m);
        ASSERT_ERR(gw_mqtt_d2c_message(&t, body, L - 9, false, &m), -E2BIG);

        /* The packet limit lets a full 256 KB message with a long topic through, and refuses
         * anything larger on the header. */
        size_t tlen = 65535;
        char *topic = malloc(tlen);
        ASSERT_NOT_NULL(topic);
        memset(topic, 'a', tlen);
        struct gw_mqtt_publish pub = { .qos = 1, .packet_id = 1, .topic = { topic, tlen },
                                       .payload = (const uint8_t *) body, .payload_len = L };
        int n = gw_mqtt_encode_publish(&pub, NULL, 0);
        uint8_t *buf = malloc((size_t) n + 1);
        ASSERT_NOT_NULL(buf);
        ASSERT_EQ(gw_mqtt_encode_publish(&pub, buf, (size_t) n), n);
        ASSERT_EQ((size_t) n, GW_MQTT_DEVICE_MAX_PACKET);
        struct gw_mqtt_packet p;
        size_t used;
        ASSERT_EQ(gw_mqtt_decode(buf, (size_t) n, GW_MQTT_DEVICE_MAX_PACKET, &p, &used), 1);
        pub.payload_len = L + 1;
        ASSERT_EQ(gw_mqtt_encode_publish_header(&pub, buf, (size_t) n), 1 + 3 + 2 + (int) tlen + 2);
        ASSERT_ERR(gw_mqtt_decode(buf, 4, GW_MQTT_DEVICE_MAX_PACKET, &p, &used), -GW_MQTT_E_TOO_LARGE);
        free(buf);
        free(topic);
        free(body);
}

/* ---- subscription filters ------------------------------------------------------------- */

static void test_filters(void) {
        struct gw_mqtt_filter f;
        const char *s;

#define FILTER_OK(str, k)                                                  \
        do {                                                               \
                s = (str);                                                 \
                ASSERT_OK(gw_mqtt_filter_parse(s, strlen(s), &f));         \
                ASSERT_EQ(f.kind, (k));                                    \
        } while (0)
        FILTER_OK("devices/dev1/messages/devicebound/#", GW_MQTT_FILTER_C2D);
        ASSERT_STR(f.device_id, "dev1");
        FILTER_OK("devices/edge1/modules/m1/#", GW_MQTT_FILTER_MODULE);
        ASSERT_STR(f.device_id, "edge1");
        ASSERT_STR(f.module_id, "m1");
        FILTER_OK("devices/edge1/modules/m1/inputs/#", GW_MQTT_FILTER_MODULE_INPUTS);
        ASSERT_STR(f.module_id, "m1");
        FILTER_OK("$iothub/twin/res/#", GW_MQTT_FILTER_TWIN_RESPONSE);
        FILTER_OK("$iothub/twin/PATCH/properties/desired/#", GW_MQTT_FILTER_TWIN_DESIRED);
        FILTER_OK("$iothub/methods/POST/#", GW_MQTT_FILTER_METHODS);

        static const char *const bad[] = {
                "#", "devices/+/messages/devicebound/#", "devices/dev1/messages/devicebound",
                "devices/dev1/messages/devicebound/", "devices/dev1/messages/devicebound/+",
                "devices/dev1/messages/#", "devices//messages/devicebound/#", "$iothub/twin/res",
                "$iothub/twin/res/200", "$iothub/methods/POST/", "$iothub/methods/POST/+",
                "$iothub/twin/PATCH/properties/desired", "devices/e/modules/+/#", "devices/e/modules/m/inputs/x/#",
                "$iothub/#", "",
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                ASSERT_ERR(gw_mqtt_filter_parse(bad[i], strlen(bad[i]), &f), -ENOENT);
        ASSERT_EQ(gw_mqtt_granted_qos(0), 0);
        ASSERT_EQ(gw_mqtt_granted_qos(1), 1);
        ASSERT_EQ(gw_mqtt_granted_qos(2), 1);
}

/* UTF-8 validation (§1.5.3), also through its 8-bytes-at-a-time ASCII path: a NUL, a
 * multi-byte character or a bad byte at every position of a long string. */
static void test_utf8(void) {
        char s[40];
        for (size_t len = 0; len <= 24; len++) {
                memset(s, 'a', sizeof s);
                ASSERT_TRUE(gw_mqtt_utf8_valid(s, len));
                for (size_t i = 0; i < len; i++) {
                        memset(s, 'a', sizeof s);
                        s[i] = 0;
                        ASSERT_FALSE(gw_mqtt_utf8_valid(s, len));
                        s[i] = (char) 0x80; /* lone continuation byte */
                        ASSERT_FALSE(gw_mqtt_utf8_valid(s, len));
                        s[i] = (char) 0xff;
                        ASSERT_FALSE(gw_mqtt_utf8_valid(s, len));
                        s[i] = 0x7f;
                        ASSERT_TRUE(gw_mqtt_utf8_valid(s, len));
                        if (i + 2 <= len) { /* U+00E9 */
                                s[i] = (char) 0xc3;
                                s[i + 1] = (char) 0xa9;
                                ASSERT_TRUE(gw_mqtt_utf8_valid(s, len));
                                s[i + 1] = 'a'; /* truncated sequence */
                                ASSERT_FALSE(gw_mqtt_utf8_valid(s, len));
                        }
                        if (i + 3 <= len) { /* U+D800, a surrogate */
                                memcpy(s + i, "\xed\xa0\x80", 3);
                                ASSERT_FALSE(gw_mqtt_utf8_valid(s, len));
                                memcpy(s + i, "\xe2\x82\xac", 3); /* U+20AC */
                                ASSERT_TRUE(gw_mqtt_utf8_valid(s, len));
                        }
                }
        }
        ASSERT_TRUE(gw_mqtt_utf8_valid("devices/d1/messages/events/%24.ct=application%2Fjson", 52));
        ASSERT_FALSE(gw_mqtt_utf8_valid("devices/d1/messages/events/\0abcdefgh", 36));
}

static void test_strerror(void) {
        for (int e = GW_MQTT_E_BASE; e < _GW_MQTT_E_MAX; e++) {
                ASSERT_NOT_NULL(gw_mqtt_strerror(-e));
                ASSERT_TRUE(strlen(gw_mqtt_strerror(-e)) > 5);
        }
        ASSERT_STREQ(gw_mqtt_strerror(-ENOMEM), strerror(ENOMEM));
}

int main(void) {
        TEST_RUN(test_connect_roundtrip);
        TEST_RUN(test_connack_roundtrip);
        TEST_RUN(test_publish_roundtrip);
        TEST_RUN(test_acks_roundtrip);
        TEST_RUN(test_subscribe_roundtrip);
        TEST_RUN(test_remaining_length_forms);
        TEST_RUN(test_malformed);
        TEST_RUN(test_connect_malformed);
        TEST_RUN(test_example_session);
        TEST_RUN(test_username);
        TEST_RUN(test_topics);
        TEST_RUN(test_bags);
        TEST_RUN(test_d2c_limit);
        TEST_RUN(test_filters);
        TEST_RUN(test_utf8);
        TEST_RUN(test_strerror);
        return 0;
}
