/* SPDX-License-Identifier: MIT */
/* Fuzzes the MQTT codec and the IoT Hub topic layer.
 *
 * Input: one configuration byte (bits 0-1 pick the packet limit), then a stream of MQTT
 * packets. The stream is decoded whole and again in pieces whose sizes come from the input;
 * both must give the same packets at the same offsets and the same final verdict. Every
 * decoded PUBLISH and CONNECT is re-encoded and decoded again (the fields must survive), and
 * the topic, filter, user-name and property-bag parsers run on the decoded strings, with a
 * bag encode/decode round trip on every D2C message. Any mismatch abort()s. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "front/mqtt-codec.h"
#include "front/mqtt-topic.h"
#include "hub/msg.h"

#define MAX_PACKETS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(x)                                                                  \
        do {                                                                      \
                if (!(x)) {                                                       \
                        fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #x); \
                        abort();                                                  \
                }                                                                 \
        } while (0)

struct result {
        struct gw_mqtt_packet p[MAX_PACKETS];
        size_t offset[MAX_PACKETS];
        size_t n;
        int verdict; /* 0 = ran out of bytes, < 0 = violation */
};

static bool str_same(struct gw_mqtt_str a, struct gw_mqtt_str b) {
        if (a.len != b.len)
                return false;
        return a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0;
}

static bool connect_same(const struct gw_mqtt_connect *a, const struct gw_mqtt_connect *b) {
        return a->protocol_level == b->protocol_level && a->clean_session == b->clean_session &&
               a->keep_alive == b->keep_alive && str_same(a->client_id, b->client_id) && a->will == b->will &&
               a->will_qos == b->will_qos && a->will_retain == b->will_retain &&
               str_same(a->will_topic, b->will_topic) && str_same(a->will_payload, b->will_payload) &&
               a->has_username == b->has_username && str_same(a->username, b->username) &&
               a->has_password == b->has_password && str_same(a->password, b->password);
}

static bool publish_same(const struct gw_mqtt_publish *a, const struct gw_mqtt_publish *b) {
        return a->qos == b->qos && a->dup == b->dup && a->retain == b->retain && str_same(a->topic, b->topic) &&
               a->packet_id == b->packet_id && a->payload_len == b->payload_len &&
               (a->payload_len == 0 || memcmp(a->payload, b->payload, a->payload_len) == 0);
}

static bool packet_same(const struct gw_mqtt_packet *a, const struct gw_mqtt_packet *b) {
        if (a->type != b->type || a->flags != b->flags)
                return false;
        switch (a->type) {
        case GW_MQTT_CONNECT:
                return connect_same(&a->connect, &b->connect);
        case GW_MQTT_CONNACK:
                return a->connack.session_present == b->connack.session_present &&
                       a->connack.return_code == b->connack.return_code;
        case GW_MQTT_PUBLISH:
                return publish_same(&a->publish, &b->publish);
        case GW_MQTT_SUBSCRIBE:
        case GW_MQTT_UNSUBSCRIBE:
        case GW_MQTT_SUBACK:
                return a->list.packet_id == b->list.packet_id && a->list.count == b->list.count &&
                       a->list.entries_len == b->list.entries_len &&
                       (a->list.entries_len == 0 || memcmp(a->list.entries, b->list.entries, a->list.entries_len) == 0);
        case GW_MQTT_PINGREQ:
        case GW_MQTT_PINGRESP:
        case GW_MQTT_DISCONNECT:
                return true;
        default:
                return a->ack.packet_id == b->ack.packet_id;
        }
}

/* chunk == 0: whole; else chunk sizes taken from sizes[]. */
static void run(const uint8_t *s, size_t len, size_t maxp, const uint8_t *sizes, size_t nsizes, struct result *out) {
        size_t have = nsizes ? 0 : len, start = 0, k = 0;

        out->n = 0;
        out->verdict = 0;
        while (out->n < MAX_PACKETS) {
                struct gw_mqtt_packet p;
                size_t used = 0;
                int r = gw_mqtt_decode(s + start, have - start, maxp, &p, &used);

                if (r < 0) {
                        out->verdict = r;
                        return;
                }
                if (r == 1) {
                        CHECK(used >= 2 && used <= have - start && used <= maxp);
                        out->p[out->n] = p;
                        out->offset[out->n++] = start;
                        start += used;
                        continue;
                }
                CHECK(r == 0);
                if (have == len)
                        return;
                size_t chunk = (size_t) (sizes[k++ % nsizes] & 0x1f) + 1;
                have += MIN(len - have, chunk);
        }
}

static void check_strings(const struct gw_mqtt_packet *p) {
        if (p->type == GW_MQTT_CONNECT && p->connect.has_username) {
                struct gw_mqtt_username u;
                if (gw_mqtt_username_parse(p->connect.username.ptr, p->connect.username.len, &u) >= 0) {
                        CHECK(u.host && u.device_id && u.api_version && u.api_version[0]);
                        (void) gw_mqtt_client_id_matches(p->connect.client_id, u.device_id, u.module_id);
                        gw_mqtt_username_done(&u);
                }
        }
        if (p->type == GW_MQTT_SUBSCRIBE || p->type == GW_MQTT_UNSUBSCRIBE) {
                size_t cur = 0, n = 0;
                struct gw_mqtt_str f;
                uint8_t q;
                while (gw_mqtt_filter_next(p, &cur, &f, &q)) {
                        struct gw_mqtt_filter fl;
                        CHECK(q <= 2);
                        CHECK(gw_mqtt_topic_filter_valid(f.ptr, f.len));
                        if (gw_mqtt_filter_parse(f.ptr, f.len, &fl) >= 0)
                                CHECK(fl.kind < _GW_MQTT_FILTER_MAX);
                        n++;
                }
                CHECK(n == p->list.count);
        }
        if (p->type == GW_MQTT_PUBLISH) {
                struct gw_mqtt_topic t;
                if (gw_mqtt_topic_parse(p->publish.topic.ptr, p->publish.topic.len, &t) < 0)
                        return;
                if (t.kind != GW_MQTT_TOPIC_EVENTS) {
                        char *reply = NULL;
                        CHECK(t.rid.len > 0);
                        CHECK(gw_mqtt_topic_twin_response(200, t.rid, t.has_version, t.version, &reply) >= 0);
                        free(reply);
                        return;
                }
                CHECK(t.device_id.len > 0);
                struct hub_msg *m = NULL, *back = NULL;
                if (gw_mqtt_d2c_message(&t, p->publish.payload, p->publish.payload_len, p->publish.retain, &m) < 0)
                        return;
                /* Bag round trip: encode what was decoded, decode again, same properties. */
                char *bag = NULL;
                CHECK(gw_mqtt_bag_encode(m, &bag) >= 0);
                CHECK(hub_msg_new(NULL, 0, HUB_MSG_D2C_MAX_SIZE, &back) >= 0);
                CHECK(gw_mqtt_bag_decode(bag, strlen(bag), 0, back) >= 0);
                for (int s = 0; s < _HUB_SYS_MAX; s++) {
                        const char *a = hub_msg_get_sys(m, (enum hub_sys_prop) s);
                        const char *b = hub_msg_get_sys(back, (enum hub_sys_prop) s);
                        CHECK((!a && !b) || (a && b && strcmp(a, b) == 0));
                }
                CHECK(hub_msg_n_props(m) == hub_msg_n_props(back));
                for (size_t i = 0; i < hub_msg_n_props(m); i++) {
                        const struct hub_msg_prop *a = hub_msg_prop_at(m, i), *b = hub_msg_prop_at(back, i);
                        CHECK(strcmp(a->name, b->name) == 0);
                        CHECK((!a->value && !b->value) || (a->value && b->value && strcmp(a->value, b->value) == 0));
                }
                free(bag);
                hub_msg_unref(back);
                hub_msg_unref(m);
        }
}

static void check_reencode(const struct gw_mqtt_packet *p) {
        uint8_t *buf;
        int n;
        struct gw_mqtt_packet q;
        size_t used;

        if (p->type == GW_MQTT_PUBLISH)
                n = gw_mqtt_encode_publish(&p->publish, NULL, 0);
        else if (p->type == GW_MQTT_CONNECT)
                n = gw_mqtt_encode_connect(&p->connect, NULL, 0);
        else
                return;
        CHECK(n > 0);
        buf = malloc((size_t) n);
        CHECK(buf);
        if (p->type == GW_MQTT_PUBLISH)
                CHECK(gw_mqtt_encode_publish(&p->publish, buf, (size_t) n) == n);
        else
                CHECK(gw_mqtt_encode_connect(&p->connect, buf, (size_t) n) == n);
        CHECK(gw_mqtt_decode(buf, (size_t) n, (size_t) n, &q, &used) == 1);
        CHECK(used == (size_t) n);
        CHECK(packet_same(p, &q));
        free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const size_t limits[] = { GW_MQTT_DEVICE_MAX_PACKET, 64, 1024, 5 + GW_MQTT_MAX_REMAINING_LENGTH };
        static struct result whole, pieces;
        size_t maxp;

        if (size < 1)
                return 0;
        maxp = limits[data[0] & 3];
        data++;
        size--;

        run(data, size, maxp, NULL, 0, &whole);
        run(data, size, maxp, size ? data : (const uint8_t *) "\1", size ? size : 1, &pieces);
        if (whole.n < MAX_PACKETS) {
                CHECK(whole.n == pieces.n);
                CHECK(whole.verdict == pieces.verdict);
        }
        for (size_t i = 0; i < MIN(whole.n, pieces.n); i++) {
                CHECK(whole.offset[i] == pieces.offset[i]);
                CHECK(packet_same(&whole.p[i], &pieces.p[i]));
        }
        if (whole.verdict < 0)
                CHECK(gw_mqtt_strerror(whole.verdict) != NULL);

        for (size_t i = 0; i < whole.n; i++) {
                check_reencode(&whole.p[i]);
                check_strings(&whole.p[i]);
        }
        return 0;
}
