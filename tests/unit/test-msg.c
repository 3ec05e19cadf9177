/* SPDX-License-Identifier: MIT */
/* hub_msg: setters, IoT Hub size accounting and limits, name tables, the binary encoding,
 * plus the ISO 8601 helpers of clock.c and the log hook.
 *
 * `test-msg --write-corpus DIR` writes the fuzz-msg seed corpus (tests/fuzz/corpus/fuzz-msg). */

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/msg.h"
#include "test-util.h"

static char *repeat(char c, size_t n) {
        char *s = malloc(n + 1);
        ASSERT_NOT_NULL(s);
        memset(s, c, n);
        s[n] = 0;
        return s;
}

static void test_new_and_body(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        size_t len = 99;

        ASSERT_OK(hub_msg_new("hello", 5, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_TRUE(memcmp(hub_msg_body(m, &len), "hello", 5) == 0);
        ASSERT_EQ(len, 5);
        ASSERT_EQ(hub_msg_size(m), 5);
        ASSERT_EQ(hub_msg_n_props(m), 0);
        ASSERT_NULL(hub_msg_prop_at(m, 0));

        /* Reference counting. */
        ASSERT_TRUE(hub_msg_ref(m) == m);
        ASSERT_NULL(hub_msg_unref(m));
        ASSERT_EQ(hub_msg_size(m), 5);
        ASSERT_NULL(hub_msg_unref(NULL));

        struct hub_msg *e = NULL;
        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_C2D_MAX_SIZE, &e));
        ASSERT_EQ(hub_msg_size(e), 0);
        hub_msg_body(e, &len);
        ASSERT_EQ(len, 0);
        hub_msg_unref(e);

        ASSERT_ERR(hub_msg_new(NULL, 3, 100, &e), -EINVAL);
        ASSERT_ERR(hub_msg_new(NULL, 0, 100, NULL), -EINVAL);
}

static void test_sys_props(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;

        ASSERT_OK(hub_msg_new("ab", 2, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_NULL(hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "42"));
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID), "42");
        ASSERT_EQ(hub_msg_size(m), 4);
        /* Replace. */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "12345"));
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID), "12345");
        ASSERT_EQ(hub_msg_size(m), 7);
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json"));
        ASSERT_EQ(hub_msg_size(m), 7 + 16);
        /* Clear. */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, NULL));
        ASSERT_NULL(hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID));
        ASSERT_EQ(hub_msg_size(m), 2 + 16);
        /* Empty string is a value, distinct from absent. */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_TO, ""));
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_TO), "");

        ASSERT_ERR(hub_msg_set_sys(m, _HUB_SYS_MAX, "x"), -EINVAL);
        ASSERT_ERR(hub_msg_set_sys(m, (enum hub_sys_prop) -1, "x"), -EINVAL);
        ASSERT_NULL(hub_msg_get_sys(m, _HUB_SYS_MAX));
}

static void test_id_lengths(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        _cleanup_free_ char *id128 = repeat('i', 128), *id129 = repeat('i', 129);

        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, id128));
        ASSERT_ERR(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, id129), -E2BIG);
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_ID), id128); /* unchanged on failure */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, id128));
        ASSERT_ERR(hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, id129), -E2BIG);
        /* Other properties are bounded only by the message size. */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_USER_ID, id129));
        ASSERT_EQ(hub_msg_size(m), 128 + 128 + 129);
}

static void test_app_props(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        bool found = true;

        ASSERT_OK(hub_msg_new("x", 1, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_NULL(hub_msg_get_prop(m, "temp", &found));
        ASSERT_FALSE(found);

        ASSERT_OK(hub_msg_set_prop(m, "temp", "21"));
        ASSERT_EQ(hub_msg_size(m), 1 + 4 + 2);
        ASSERT_STREQ(hub_msg_get_prop(m, "temp", &found), "21");
        ASSERT_TRUE(found);
        /* Case-sensitive names. */
        ASSERT_NULL(hub_msg_get_prop(m, "Temp", &found));
        ASSERT_FALSE(found);

        /* NULL value: present, no value; counts the name only. */
        ASSERT_OK(hub_msg_set_prop(m, "flag", NULL));
        ASSERT_EQ(hub_msg_size(m), 1 + 4 + 2 + 4);
        ASSERT_NULL(hub_msg_get_prop(m, "flag", &found));
        ASSERT_TRUE(found);
        ASSERT_NULL(hub_msg_get_prop(m, "flag", NULL));

        /* Replace keeps position and recounts. */
        ASSERT_OK(hub_msg_set_prop(m, "temp", "21.5"));
        ASSERT_EQ(hub_msg_size(m), 1 + 4 + 4 + 4);
        ASSERT_OK(hub_msg_set_prop(m, "flag", "yes"));
        ASSERT_EQ(hub_msg_size(m), 1 + 4 + 4 + 4 + 3);
        ASSERT_OK(hub_msg_set_prop(m, "temp", NULL));
        ASSERT_EQ(hub_msg_size(m), 1 + 4 + 4 + 3);
        ASSERT_EQ(hub_msg_n_props(m), 2);
        ASSERT_STREQ(hub_msg_prop_at(m, 0)->name, "temp");
        ASSERT_NULL(hub_msg_prop_at(m, 0)->value);
        ASSERT_STREQ(hub_msg_prop_at(m, 1)->name, "flag");
        ASSERT_STREQ(hub_msg_prop_at(m, 1)->value, "yes");

        ASSERT_ERR(hub_msg_set_prop(m, "", "v"), -EINVAL);
        ASSERT_ERR(hub_msg_set_prop(m, NULL, "v"), -EINVAL);

        /* At most HUB_MSG_MAX_PROPS. */
        for (unsigned i = hub_msg_n_props(m); i < HUB_MSG_MAX_PROPS; i++) {
                char name[16];
                snprintf(name, sizeof name, "p%u", i);
                ASSERT_OK(hub_msg_set_prop(m, name, "v"));
        }
        ASSERT_EQ(hub_msg_n_props(m), HUB_MSG_MAX_PROPS);
        ASSERT_ERR(hub_msg_set_prop(m, "onemore", "v"), -E2BIG);
        ASSERT_OK(hub_msg_set_prop(m, "p10", "replaced")); /* replacing still works */
}

/* Strings live in the message's own arena until it is full, then in their own allocations:
 * every mix must read back right, survive replacement and free cleanly (ASan). */
static void test_string_storage(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        _cleanup_free_ char *big = repeat('v', 1000), *mid = repeat('m', 100);
        char name[32], value[32];

        ASSERT_OK(hub_msg_new("x", 1, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "dev-1"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, mid));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, big));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json")); /* replaces an arena string */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "Telemetry"));     /* replaces a malloc'd one */
        for (unsigned i = 0; i < 40; i++) {
                snprintf(name, sizeof name, "p%u", i);
                snprintf(value, sizeof value, "value-%u", i);
                ASSERT_OK(hub_msg_set_prop(m, name, i % 7 == 3 ? NULL : value));
        }
        ASSERT_OK(hub_msg_set_prop(m, "p5", big));
        ASSERT_OK(hub_msg_set_prop(m, "p6", "short"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, NULL));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "dev-2"));

        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONNECTION_DEVICE_ID), "dev-2");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE), "application/json");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_SOURCE), "Telemetry");
        ASSERT_EQ(hub_msg_n_props(m), 40);
        for (unsigned i = 0; i < 40; i++) {
                bool found;
                snprintf(name, sizeof name, "p%u", i);
                snprintf(value, sizeof value, "value-%u", i);
                const char *v = hub_msg_get_prop(m, name, &found);
                ASSERT_TRUE(found);
                ASSERT_STREQ(hub_msg_prop_at(m, i)->name, name);
                if (i == 5)
                        ASSERT_STREQ(v, big);
                else if (i == 6)
                        ASSERT_STREQ(v, "short");
                else if (i % 7 == 3)
                        ASSERT_NULL(v);
                else
                        ASSERT_STREQ(v, value);
        }
        /* The size counts what is set now, not what the arena once held. */
        size_t want = 1 + strlen("dev-2") + strlen("application/json") + strlen("Telemetry");
        for (unsigned i = 0; i < 40; i++) {
                snprintf(name, sizeof name, "p%u", i);
                const char *v = hub_msg_get_prop(m, name, NULL);
                want += strlen(name) + (v ? strlen(v) : 0);
        }
        ASSERT_EQ(hub_msg_size(m), want);

        /* And the encoding round-trips. */
        _cleanup_free_ uint8_t *buf = NULL;
        size_t len;
        _cleanup_(hub_msg_unrefp) struct hub_msg *back = NULL;
        ASSERT_OK(hub_msg_serialize(m, &buf, &len));
        ASSERT_OK(hub_msg_deserialize(buf, len, HUB_MSG_D2C_MAX_SIZE, &back));
        ASSERT_STREQ(hub_msg_get_prop(back, "p5", NULL), big);
        ASSERT_STREQ(hub_msg_get_sys(back, HUB_SYS_CONNECTION_DEVICE_ID), "dev-2");
        ASSERT_EQ(hub_msg_size(back), want);

        /* An empty body. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *e = NULL;
        size_t blen = 7;
        ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_D2C_MAX_SIZE, &e));
        ASSERT_NULL(hub_msg_body(e, &blen));
        ASSERT_EQ(blen, 0);
}

static void test_limits(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        _cleanup_free_ char *body = repeat('b', 1000);
        const size_t limit = 1100;

        ASSERT_ERR(hub_msg_new(body, 1000, 999, &m), -E2BIG);
        ASSERT_OK(hub_msg_new(body, 1000, 1000, &m));
        ASSERT_EQ(hub_msg_size(m), 1000);
        ASSERT_ERR(hub_msg_set_sys(m, HUB_SYS_TO, "x"), -E2BIG); /* limit + 1 */
        m = hub_msg_unref(m);

        ASSERT_OK(hub_msg_new(body, 1000, limit, &m));
        /* 1000 + 40 = 1040 */
        _cleanup_free_ char *v40 = repeat('v', 40), *v10 = repeat('w', 10), *v11 = repeat('w', 11);
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, v40));
        /* name 10 + value 40 = 1090 */
        ASSERT_OK(hub_msg_set_prop(m, "nnnnnnnnnn", v40));
        ASSERT_EQ(hub_msg_size(m), 1090);
        /* exactly the limit: 1090 + 10 = 1100 */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_USER_ID, v10));
        ASSERT_EQ(hub_msg_size(m), limit);
        /* limit + 1 bytes: refused, nothing changed */
        ASSERT_ERR(hub_msg_set_sys(m, HUB_SYS_USER_ID, v11), -E2BIG);
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_USER_ID), v10);
        ASSERT_ERR(hub_msg_set_prop(m, "a", NULL), -E2BIG); /* a name counts too */
        ASSERT_FALSE(hub_msg_get_prop(m, "a", NULL) != NULL);
        ASSERT_EQ(hub_msg_n_props(m), 1);
        /* Replacing with a shorter value makes room: 1100 - 40 + 11 = 1071. */
        ASSERT_OK(hub_msg_set_prop(m, "nnnnnnnnnn", v11));
        ASSERT_EQ(hub_msg_size(m), 1071);
        ASSERT_OK(hub_msg_set_prop(m, "x", NULL));
        ASSERT_EQ(hub_msg_size(m), 1072);
        m = hub_msg_unref(m);

        /* The real limits. */
        _cleanup_free_ char *big = repeat('z', HUB_MSG_D2C_MAX_SIZE);
        ASSERT_OK(hub_msg_new(big, HUB_MSG_D2C_MAX_SIZE, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_ERR(hub_msg_set_prop(m, "k", NULL), -E2BIG);
        m = hub_msg_unref(m);
        ASSERT_ERR(hub_msg_new(big, HUB_MSG_C2D_MAX_SIZE + 1, HUB_MSG_C2D_MAX_SIZE, &m), -E2BIG);
        ASSERT_OK(hub_msg_new(big, HUB_MSG_C2D_MAX_SIZE - 3, HUB_MSG_C2D_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_prop(m, "ab", "c"));
        ASSERT_ERR(hub_msg_set_sys(m, HUB_SYS_ACK, "f"), -E2BIG);
}

static void test_name_tables(void) {
        unsigned n_mqtt = 0, n_query = 0;

        for (unsigned i = 0; i < _HUB_SYS_MAX; i++) {
                enum hub_sys_prop p = (enum hub_sys_prop) i, back;
                const char *mq = hub_sys_prop_mqtt_name(p), *q = hub_sys_prop_query_name(p),
                           *w = hub_sys_prop_wire_name(p);

                ASSERT_NOT_NULL(w); /* every property has a wire name */
                if (mq) {
                        ASSERT_OK(hub_sys_prop_from_mqtt_name(mq, &back));
                        ASSERT_EQ(back, p);
                        n_mqtt++;
                }
                if (q) {
                        ASSERT_OK(hub_sys_prop_from_query_name(q, &back));
                        ASSERT_EQ(back, p);
                        n_query++;
                }
                /* names are unique in each vocabulary */
                for (unsigned j = 0; j < i; j++) {
                        const char *w2 = hub_sys_prop_wire_name((enum hub_sys_prop) j);
                        ASSERT_TRUE(strcmp(w, w2) != 0);
                }
        }
        ASSERT_EQ(n_mqtt, 17);
        ASSERT_EQ(n_query, 14);

        ASSERT_STREQ(hub_sys_prop_mqtt_name(HUB_SYS_MESSAGE_ID), "$.mid");
        ASSERT_STREQ(hub_sys_prop_mqtt_name(HUB_SYS_CONTENT_TYPE), "$.ct");
        ASSERT_STREQ(hub_sys_prop_mqtt_name(HUB_SYS_CREATION_TIME), "$.ctime");
        ASSERT_STREQ(hub_sys_prop_mqtt_name(HUB_SYS_DIAG_CONTEXT), "$.diagctx");
        ASSERT_STREQ(hub_sys_prop_mqtt_name(HUB_SYS_CONNECTION_DEVICE_ID), "$.cdid");
        ASSERT_STREQ(hub_sys_prop_mqtt_name(HUB_SYS_ACK), "iothub-ack");
        ASSERT_NULL(hub_sys_prop_mqtt_name(HUB_SYS_ENQUEUED_TIME));
        ASSERT_STREQ(hub_sys_prop_query_name(HUB_SYS_CONNECTION_AUTH_GENERATION_ID), "$connectionDeviceGenerationId");
        ASSERT_STREQ(hub_sys_prop_query_name(HUB_SYS_DATA_SCHEMA), "$dt-dataschema");
        ASSERT_NULL(hub_sys_prop_query_name(HUB_SYS_MESSAGE_SOURCE));
        ASSERT_STREQ(hub_sys_prop_wire_name(HUB_SYS_EXPIRY_TIME), "absolute-expiry-time");
        ASSERT_STREQ(hub_sys_prop_wire_name(HUB_SYS_ENQUEUED_TIME), "iothub-enqueuedtime");
        ASSERT_STREQ(hub_sys_prop_wire_name(HUB_SYS_DIAG_ID), "Diagnostic-Id");
        ASSERT_STREQ(hub_sys_prop_wire_name(HUB_SYS_COMPONENT_NAME), "dt-subject");
        ASSERT_NULL(hub_sys_prop_wire_name(_HUB_SYS_MAX));

        enum hub_sys_prop p;
        ASSERT_OK(hub_sys_prop_from_query_name("$MESSAGEID", &p)); /* case-insensitive */
        ASSERT_EQ(p, HUB_SYS_MESSAGE_ID);
        ASSERT_ERR(hub_sys_prop_from_mqtt_name("$.MID", &p), -ENOENT); /* MQTT: exact */
        ASSERT_ERR(hub_sys_prop_from_mqtt_name("%24.mid", &p), -ENOENT);
        ASSERT_ERR(hub_sys_prop_from_mqtt_name("temp", &p), -ENOENT);
        ASSERT_ERR(hub_sys_prop_from_query_name("$nope", &p), -ENOENT);
        ASSERT_ERR(hub_sys_prop_from_query_name(NULL, &p), -EINVAL);

        ASSERT_TRUE(hub_sys_prop_settable(HUB_SYS_MESSAGE_ID));
        ASSERT_TRUE(hub_sys_prop_settable(HUB_SYS_ACK));
        ASSERT_FALSE(hub_sys_prop_settable(HUB_SYS_CONNECTION_DEVICE_ID));
        ASSERT_FALSE(hub_sys_prop_settable(HUB_SYS_ENQUEUED_TIME));
        ASSERT_FALSE(hub_sys_prop_settable(HUB_SYS_DATA_SCHEMA));
        ASSERT_FALSE(hub_sys_prop_settable(_HUB_SYS_MAX));
}

/* ---- encoding ------------------------------------------------------------------------- */

static struct hub_msg *make_msg(unsigned variant) {
        struct hub_msg *m = NULL;
        static const uint8_t bin[] = { 0, 1, 2, 0xff, 0, 0x80 };

        switch (variant) {
        case 0: /* empty */
                ASSERT_OK(hub_msg_new(NULL, 0, HUB_MSG_D2C_MAX_SIZE, &m));
                break;
        case 1: /* typical telemetry */
                ASSERT_OK(hub_msg_new("{\"temp\":21.5}", 13, HUB_MSG_D2C_MAX_SIZE, &m));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "42"));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json"));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8"));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "dev1"));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, "2016-06-01T21:22:43.7996883Z"));
                ASSERT_OK(hub_msg_set_prop(m, "temperatureAlert", "true"));
                break;
        case 2: /* binary body, props with null and empty values */
                ASSERT_OK(hub_msg_new(bin, sizeof bin, HUB_MSG_C2D_MAX_SIZE, &m));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_ACK, "full"));
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_TO, "/devices/d1/messages/devicebound"));
                ASSERT_OK(hub_msg_set_prop(m, "nullprop", NULL));
                ASSERT_OK(hub_msg_set_prop(m, "empty", ""));
                ASSERT_OK(hub_msg_set_prop(m, "ünïcode", "välue"));
                break;
        case 3: /* every system property */
                ASSERT_OK(hub_msg_new("b", 1, HUB_MSG_D2C_MAX_SIZE, &m));
                for (unsigned i = 0; i < _HUB_SYS_MAX; i++) {
                        char v[32];
                        snprintf(v, sizeof v, "value-%u", i);
                        ASSERT_OK(hub_msg_set_sys(m, (enum hub_sys_prop) i, v));
                }
                break;
        case 4: /* many properties */
                ASSERT_OK(hub_msg_new("many", 4, HUB_MSG_D2C_MAX_SIZE, &m));
                for (unsigned i = 0; i < 40; i++) {
                        char k[16], v[16];
                        snprintf(k, sizeof k, "k%u", i);
                        snprintf(v, sizeof v, "%u", i * 7);
                        ASSERT_OK(hub_msg_set_prop(m, k, i % 5 == 0 ? NULL : v));
                }
                break;
        default:
                abort();
        }
        return m;
}
#define N_VARIANTS 5

static void assert_msg_equal(const struct hub_msg *a, const struct hub_msg *b) {
        size_t la, lb;
        const void *ba = hub_msg_body(a, &la), *bb = hub_msg_body(b, &lb);

        ASSERT_EQ(la, lb);
        ASSERT_TRUE(la == 0 || memcmp(ba, bb, la) == 0);
        for (unsigned i = 0; i < _HUB_SYS_MAX; i++) {
                const char *x = hub_msg_get_sys(a, (enum hub_sys_prop) i),
                           *y = hub_msg_get_sys(b, (enum hub_sys_prop) i);
                ASSERT_TRUE((x == NULL) == (y == NULL));
                if (x)
                        ASSERT_STREQ(x, y);
        }
        ASSERT_EQ(hub_msg_n_props(a), hub_msg_n_props(b));
        for (size_t i = 0; i < hub_msg_n_props(a); i++) {
                const struct hub_msg_prop *p = hub_msg_prop_at(a, i), *q = hub_msg_prop_at(b, i);
                ASSERT_STREQ(p->name, q->name);
                ASSERT_TRUE((p->value == NULL) == (q->value == NULL));
                if (p->value)
                        ASSERT_STREQ(p->value, q->value);
        }
        ASSERT_EQ(hub_msg_size(a), hub_msg_size(b));
}

static void test_roundtrip(void) {
        for (unsigned v = 0; v < N_VARIANTS; v++) {
                _cleanup_(hub_msg_unrefp) struct hub_msg *m = make_msg(v), *d = NULL;
                _cleanup_free_ uint8_t *buf = NULL, *buf2 = NULL;
                size_t len, len2;

                ASSERT_OK(hub_msg_serialize(m, &buf, &len));
                ASSERT_OK(hub_msg_deserialize(buf, len, HUB_MSG_D2C_MAX_SIZE, &d));
                assert_msg_equal(m, d);
                ASSERT_OK(hub_msg_serialize(d, &buf2, &len2));
                ASSERT_EQ(len, len2);
                ASSERT_TRUE(memcmp(buf, buf2, len) == 0);

                /* Every truncation is rejected, and so is a trailing byte. */
                for (size_t cut = 0; cut < len; cut++) {
                        struct hub_msg *x = NULL;
                        uint8_t *copy = malloc(cut ? cut : 1);
                        ASSERT_NOT_NULL(copy);
                        memcpy(copy, buf, cut);
                        ASSERT_ERR(hub_msg_deserialize(copy, cut, HUB_MSG_D2C_MAX_SIZE, &x), -EBADMSG);
                        ASSERT_NULL(x);
                        free(copy);
                }
                uint8_t *longer = malloc(len + 1);
                ASSERT_NOT_NULL(longer);
                memcpy(longer, buf, len);
                longer[len] = 0;
                struct hub_msg *x = NULL;
                ASSERT_ERR(hub_msg_deserialize(longer, len + 1, HUB_MSG_D2C_MAX_SIZE, &x), -EBADMSG);
                free(longer);

                /* A limit below the message's size is enforced on decode. */
                if (hub_msg_size(m) > 0)
                        ASSERT_ERR(hub_msg_deserialize(buf, len, hub_msg_size(m) - 1, &x), -EBADMSG);
                ASSERT_OK(hub_msg_deserialize(buf, len, hub_msg_size(m), &x));
                hub_msg_unref(x);
        }
}

static void test_corrupt(void) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = make_msg(1);
        _cleanup_free_ uint8_t *buf = NULL;
        struct hub_msg *x = NULL;
        size_t len;

        ASSERT_OK(hub_msg_serialize(m, &buf, &len));
        /* layout: FHM 01 | u32 13 | body(13) | u8 n_sys=5 | u8 id ... */
        ASSERT_EQ(buf[0], 'F');
        ASSERT_EQ(buf[3], 1);
        ASSERT_EQ(buf[4], 13);
        ASSERT_EQ(buf[8 + 13], 5);

        uint8_t *c = malloc(len);
        ASSERT_NOT_NULL(c);
#define MUTATE(off, val)                                                                    \
        do {                                                                                \
                memcpy(c, buf, len);                                                        \
                c[off] = (val);                                                             \
                ASSERT_ERR(hub_msg_deserialize(c, len, HUB_MSG_D2C_MAX_SIZE, &x), -EBADMSG); \
        } while (0)
        MUTATE(0, 'X');              /* magic */
        MUTATE(3, 2);                /* unknown version */
        MUTATE(4, 14);               /* body length past its field */
        MUTATE(7, 0x80);             /* huge body length */
        MUTATE(8 + 13, 6);           /* one more system property than present */
        MUTATE(8 + 13, 0xff);        /* more than exist */
        MUTATE(8 + 13 + 1, 0x7f);    /* unknown system property id */
        size_t id2 = 8 + 13 + 1 + 1 + 4 + 2; /* second id (after "42") */
        ASSERT_EQ(buf[id2], HUB_SYS_CONTENT_TYPE);
        MUTATE(id2, HUB_SYS_MESSAGE_ID); /* duplicate / not ascending */
        MUTATE(8 + 13 + 1 + 1 + 4, 0); /* NUL inside a string */
        MUTATE(len - 1 - 4 - 4, 2);  /* has_value flag other than 0/1 */
#undef MUTATE
        free(c);

        /* A message id over 128 bytes in the encoding; exactly 128 is fine. */
        for (unsigned idlen = 128; idlen <= 129; idlen++) {
                uint8_t b[4 + 4 + 1 + 1 + 4 + 129 + 4];
                size_t o = 0;

                memcpy(b, "FHM\1", 4), o = 4;
                memset(b + o, 0, 4), o += 4;                  /* empty body */
                b[o++] = 1;                                   /* n_sys */
                b[o++] = HUB_SYS_MESSAGE_ID;
                b[o++] = (uint8_t) idlen, b[o++] = 0, b[o++] = 0, b[o++] = 0;
                memset(b + o, 'm', idlen), o += idlen;
                memset(b + o, 0, 4), o += 4;                  /* n_props */
                if (idlen == 128) {
                        ASSERT_OK(hub_msg_deserialize(b, o, HUB_MSG_D2C_MAX_SIZE, &x));
                        ASSERT_EQ(strlen(hub_msg_get_sys(x, HUB_SYS_MESSAGE_ID)), 128);
                        x = hub_msg_unref(x);
                } else
                        ASSERT_ERR(hub_msg_deserialize(b, o, HUB_MSG_D2C_MAX_SIZE, &x), -EBADMSG);
        }

        /* Duplicate application property names. */
        {
                _cleanup_(hub_msg_unrefp) struct hub_msg *d = NULL;
                _cleanup_free_ uint8_t *b = NULL;
                size_t n;

                ASSERT_OK(hub_msg_new(NULL, 0, 100, &d));
                ASSERT_OK(hub_msg_set_prop(d, "aa", "1"));
                ASSERT_OK(hub_msg_set_prop(d, "ab", "2"));
                ASSERT_OK(hub_msg_serialize(d, &b, &n));
                ASSERT_OK(hub_msg_deserialize(b, n, 100, &x));
                x = hub_msg_unref(x);
                b[n - 1 - 4 - 1 - 2 + 1] = 'a'; /* "ab" -> "aa" */
                ASSERT_ERR(hub_msg_deserialize(b, n, 100, &x), -EBADMSG);
        }

        ASSERT_ERR(hub_msg_deserialize(NULL, 0, 100, &x), -EBADMSG);
        ASSERT_ERR(hub_msg_deserialize((const uint8_t *) "FHM", 3, 100, &x), -EBADMSG);
        ASSERT_ERR(hub_msg_deserialize(buf, len, 100, NULL), -EINVAL);
}

/* ---- clock and log -------------------------------------------------------------------- */

static void test_iso8601(void) {
        char buf[32];
        uint64_t t;

        ASSERT_STREQ(hub_time_format_iso8601(0, buf), "0001-01-01T00:00:00Z");
        ASSERT_STREQ(hub_time_format_iso8601(1, buf), "1970-01-01T00:00:00.0000010Z");
        ASSERT_OK(hub_time_parse_iso8601("2016-06-01T21:22:43Z", &t));
        ASSERT_EQ(t, UINT64_C(1464816163) * USEC_PER_SEC);
        ASSERT_STREQ(hub_time_format_iso8601(t + 799688, buf), "2016-06-01T21:22:43.7996880Z");
        ASSERT_OK(hub_time_parse_iso8601("2016-06-01T21:22:43.7996883Z", &t));
        ASSERT_EQ(t, UINT64_C(1464816163799688));
        ASSERT_OK(hub_time_parse_iso8601("2016-06-01T21:22:43.7", &t));
        ASSERT_EQ(t, UINT64_C(1464816163700000));
        ASSERT_OK(hub_time_parse_iso8601("2016-06-01T21:22:43.12345678901Z", &t));
        ASSERT_EQ(t, UINT64_C(1464816163123456));
        ASSERT_OK(hub_time_parse_iso8601("2016-06-01T21:22:43+00:00", &t));
        ASSERT_EQ(t, UINT64_C(1464816163) * USEC_PER_SEC);
        ASSERT_OK(hub_time_parse_iso8601("2016-06-01T23:22:43.5+02:00", &t));
        ASSERT_EQ(t, UINT64_C(1464816163500000));
        ASSERT_OK(hub_time_parse_iso8601("2024-02-29T00:00:00Z", &t));
        ASSERT_STREQ(hub_time_format_iso8601(t, buf), "2024-02-29T00:00:00.0000000Z");
        ASSERT_OK(hub_time_parse_iso8601("0001-01-01T00:00:00Z", &t));
        ASSERT_EQ(t, 0);
        ASSERT_STREQ(hub_time_format_iso8601(UINT64_MAX, buf), "9999-12-31T23:59:59.9999990Z");

        /* Format then parse is the identity. */
        for (uint64_t v = 1; v < UINT64_C(4000000000) * USEC_PER_SEC; v = v * 3 + 12345) {
                ASSERT_OK(hub_time_parse_iso8601(hub_time_format_iso8601(v, buf), &t));
                ASSERT_EQ(t, v);
        }

        /* The formatted second is cached: calls within one second, into the next one, and
         * back to an earlier one must each give the exact text. */
        t = UINT64_C(1464816163) * USEC_PER_SEC;
        ASSERT_STREQ(hub_time_format_iso8601(t + 1, buf), "2016-06-01T21:22:43.0000010Z");
        ASSERT_STREQ(hub_time_format_iso8601(t + 999999, buf), "2016-06-01T21:22:43.9999990Z");
        ASSERT_STREQ(hub_time_format_iso8601(t + 1000000, buf), "2016-06-01T21:22:44.0000000Z");
        ASSERT_STREQ(hub_time_format_iso8601(t + 86400 * USEC_PER_SEC + 5, buf), "2016-06-02T21:22:43.0000050Z");
        ASSERT_STREQ(hub_time_format_iso8601(t + 120, buf), "2016-06-01T21:22:43.0001200Z");
        ASSERT_STREQ(hub_time_format_iso8601(0, buf), "0001-01-01T00:00:00Z");
        ASSERT_STREQ(hub_time_format_iso8601(t + 120, buf), "2016-06-01T21:22:43.0001200Z");

        static const char *const bad[] = {
                "", "2016", "2016-06-01", "2016-06-01T21:22", "2016-06-01 21:22:43Z",
                "2016-13-01T00:00:00Z", "2016-02-30T00:00:00Z", "2015-02-29T00:00:00Z",
                "2016-06-01T24:00:00Z", "2016-06-01T21:60:00Z", "2016-06-01T21:22:43.Z",
                "2016-06-01T21:22:43ZZ", "2016-06-01T21:22:43+0000", "2016-06-01T21:22:43 ",
                "x016-06-01T21:22:43Z", "2016-06-01T21:22:43.5x",
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                if (hub_time_parse_iso8601(bad[i], &t) != -EINVAL)
                        TEST_FAIL("accepted \"%s\"", bad[i]);
        ASSERT_ERR(hub_time_parse_iso8601("1969-12-31T23:59:59Z", &t), -ERANGE);
        ASSERT_ERR(hub_time_parse_iso8601(NULL, &t), -EINVAL);
}

static void test_clocks(void) {
        struct hub_fake_clock fc;
        const struct hub_clock *sys = hub_clock_system();

        hub_fake_clock_init(&fc, 1000);
        ASSERT_EQ(hub_clock_now(&fc.clock), 1000);
        uint64_t m0 = hub_clock_mono(&fc.clock);
        hub_fake_clock_advance(&fc, 5 * USEC_PER_SEC);
        ASSERT_EQ(hub_clock_now(&fc.clock), 1000 + 5 * USEC_PER_SEC);
        ASSERT_EQ(hub_clock_mono(&fc.clock), m0 + 5 * USEC_PER_SEC);

        ASSERT_TRUE(hub_clock_now(sys) > UINT64_C(1600000000) * USEC_PER_SEC);
        uint64_t a = hub_clock_mono(sys), b = hub_clock_mono(sys);
        ASSERT_TRUE(a > 0 && b >= a);
}

static int log_calls;
static char log_last[128];
_printf_(6, 0) static void log_fn(void *userdata, int level, const char *file, int line, const char *func, const char *fmt,
                   va_list ap) {
        ASSERT_EQ(level, LOG_DEBUG);
        ASSERT_TRUE(userdata == &log_calls);
        ASSERT_TRUE(file && line > 0 && func);
        vsnprintf(log_last, sizeof log_last, fmt, ap);
        log_calls++;
}

static void test_log(void) {
        struct hub_log l = { .fn = log_fn, .userdata = &log_calls };
        struct hub_log none = { 0 };

        hub_log_debug(&l, "x=%d %s", 7, "y");
        ASSERT_EQ(log_calls, 1);
        ASSERT_STREQ(log_last, "x=7 y");
        hub_log_debug(NULL, "nothing %d", 1);
        hub_log_debug(&none, "nothing %d", 2);
        ASSERT_EQ(log_calls, 1);
}

/* ---- seed corpus for fuzz-msg ----------------------------------------------------------- */

static void write_file(const char *dir, const char *name, const uint8_t *d, size_t n) {
        char path[4096];
        FILE *f;

        snprintf(path, sizeof path, "%s/%s", dir, name);
        f = fopen(path, "wb");
        if (!f || fwrite(d, 1, n, f) != n || fclose(f) != 0)
                TEST_FAIL("writing %s", path);
}

static int write_corpus(const char *dir) {
        for (unsigned v = 0; v < N_VARIANTS; v++) {
                _cleanup_(hub_msg_unrefp) struct hub_msg *m = make_msg(v);
                _cleanup_free_ uint8_t *buf = NULL;
                char name[32];
                size_t len;

                ASSERT_OK(hub_msg_serialize(m, &buf, &len));
                snprintf(name, sizeof name, "valid-%u", v);
                write_file(dir, name, buf, len);
                if (v == 1) {
                        write_file(dir, "truncated", buf, len / 2);
                        buf[len / 3] ^= 0x5a;
                        write_file(dir, "flipped", buf, len);
                        buf[len / 3] ^= 0x5a;
                        buf[3] = 9;
                        write_file(dir, "bad-version", buf, len);
                }
        }
        write_file(dir, "empty", (const uint8_t *) "", 0);
        write_file(dir, "magic-only", (const uint8_t *) "FHM\1", 4);
        static const uint8_t huge_len[] = { 'F', 'H', 'M', 1, 0xff, 0xff, 0xff, 0x7f, 'a' };
        write_file(dir, "huge-length", huge_len, sizeof huge_len);
        return 0;
}

int main(int argc, char **argv) {
        if (argc == 3 && streq(argv[1], "--write-corpus"))
                return write_corpus(argv[2]);

        TEST_RUN(test_new_and_body);
        TEST_RUN(test_sys_props);
        TEST_RUN(test_id_lengths);
        TEST_RUN(test_app_props);
        TEST_RUN(test_string_storage);
        TEST_RUN(test_limits);
        TEST_RUN(test_name_tables);
        TEST_RUN(test_roundtrip);
        TEST_RUN(test_corrupt);
        TEST_RUN(test_iso8601);
        TEST_RUN(test_clocks);
        TEST_RUN(test_log);
        return 0;
}
