/* SPDX-License-Identifier: MIT */
/* Identity registry on a real store in a temporary directory, with a fake clock: CRUD,
 * etags, persistence, id rules, generated keys, default policies, key rotation, paging,
 * statistics, lifecycle events and the Device JSON of reference §5.2. */

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "hub/auth.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/store.h"
#include "hub/urlenc.h"
#include "test-util.h"

#define T0 (UINT64_C(1700000000) * USEC_PER_SEC)
#define THUMB40 "0123456789abcdef0123456789ABCDEF01234567"
#define THUMB64 "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

struct env {
        char dir[256];
        struct hub_fake_clock clock;
        struct hub_store *store;
        struct hub_registry *reg;
        /* lifecycle events seen */
        unsigned n_events;
        char last_op[64], last_id[HUB_DEVICE_ID_MAX + 1];
};

static void env_open(struct env *e) {
        char err[256] = "";
        struct hub_store_options o = {
                .dir = e->dir,
                .clock = &e->clock.clock,
                .errbuf = err,
                .errbuf_size = sizeof err,
        };
        int r = hub_store_open(&o, &e->store);
        if (r < 0)
                TEST_FAIL("hub_store_open: %s: %s", strerror(-r), err);
        ASSERT_OK(hub_registry_new(e->store, &e->clock.clock, NULL, &e->reg));
}

static void env_close(struct env *e) {
        e->reg = hub_registry_free(e->reg);
        ASSERT_NULL(e->reg);
        e->store = hub_store_close(e->store);
}

static void env_init(struct env *e) {
        memset(e, 0, sizeof *e);
        test_tmpdir(e->dir, sizeof e->dir);
        hub_fake_clock_init(&e->clock, T0);
        env_open(e);
}

static void env_done(struct env *e) {
        env_close(e);
        test_rmdir(e->dir);
}

static void dev_init(struct hub_device *d, const char *id) {
        memset(d, 0, sizeof *d);
        snprintf(d->device_id, sizeof d->device_id, "%s", id);
}

static void assert_key(const char *k) {
        uint8_t raw[64];
        size_t n = 0;
        ASSERT_EQ(strlen(k), 44u);
        ASSERT_OK(hub_base64_decode_buf(k, strlen(k), raw, sizeof raw, &n));
        ASSERT_EQ(n, 32u);
}

/* ---------------------------------------------------------------------------------------- */

static void test_ids(void) {
        char id[200];

        ASSERT_TRUE(hub_device_id_valid("dev1"));
        ASSERT_TRUE(hub_device_id_valid("a-:.+%_#*?!(),=@;$'Z9"));
        ASSERT_FALSE(hub_device_id_valid(""));
        ASSERT_FALSE(hub_device_id_valid(NULL));
        ASSERT_FALSE(hub_device_id_valid("a b"));
        ASSERT_FALSE(hub_device_id_valid("a/b"));
        ASSERT_FALSE(hub_device_id_valid("a&b"));
        ASSERT_FALSE(hub_device_id_valid("a\"b"));
        ASSERT_FALSE(hub_device_id_valid("caf\xc3\xa9"));
        memset(id, 'x', 128);
        id[128] = '\0';
        ASSERT_TRUE(hub_device_id_valid(id));
        ASSERT_TRUE(hub_device_id_valid_strict(id));
        id[128] = 'x';
        id[129] = '\0';
        ASSERT_FALSE(hub_device_id_valid(id));
        ASSERT_FALSE(hub_device_id_valid_strict(id));
        ASSERT_TRUE(hub_device_id_valid_strict("Pump-01_a.b"));
        ASSERT_FALSE(hub_device_id_valid_strict("pump:1"));
        ASSERT_FALSE(hub_device_id_valid_strict("pump+1"));
        ASSERT_FALSE(hub_device_id_valid_strict(""));
}

static void test_default_policies(void) {
        static const struct {
                const char *name;
                unsigned rights;
        } expect[] = {
                { "device", HUB_RIGHT_DEVICE_CONNECT },
                { "iothubowner", HUB_RIGHT_REGISTRY_READ | HUB_RIGHT_REGISTRY_WRITE | HUB_RIGHT_SERVICE_CONNECT |
                                         HUB_RIGHT_DEVICE_CONNECT },
                { "registryRead", HUB_RIGHT_REGISTRY_READ },
                { "registryReadWrite", HUB_RIGHT_REGISTRY_READ | HUB_RIGHT_REGISTRY_WRITE },
                { "service", HUB_RIGHT_SERVICE_CONNECT },
        };
        struct hub_policy *pol = NULL, *pol2 = NULL, p;
        size_t n = 0, n2 = 0;
        struct env e;

        env_init(&e);
        ASSERT_OK(hub_registry_policy_list(e.reg, &pol, &n));
        ASSERT_EQ(n, ELEMENTSOF(expect));
        for (size_t i = 0; i < n; i++) {
                ASSERT_STREQ(pol[i].name, expect[i].name);
                ASSERT_EQ(pol[i].rights, expect[i].rights);
                assert_key(pol[i].primary_key);
                assert_key(pol[i].secondary_key);
                ASSERT_TRUE(strcmp(pol[i].primary_key, pol[i].secondary_key) != 0);
                for (size_t j = 0; j < i; j++)
                        ASSERT_TRUE(strcmp(pol[i].primary_key, pol[j].primary_key) != 0);
        }
        ASSERT_ERR(hub_registry_policy_get(e.reg, "nosuch", &p), -ENOENT);
        ASSERT_ERR(hub_registry_policy_get(e.reg, "IOTHUBOWNER", &p), -ENOENT);

        /* keys survive a restart unchanged (not regenerated) */
        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_registry_policy_list(e.reg, &pol2, &n2));
        ASSERT_EQ(n2, n);
        for (size_t i = 0; i < n; i++) {
                ASSERT_STREQ(pol2[i].primary_key, pol[i].primary_key);
                ASSERT_STREQ(pol2[i].secondary_key, pol[i].secondary_key);
        }

        /* keys from configuration */
        char k[45];
        ASSERT_OK(hub_random_key(k));
        ASSERT_OK(hub_registry_policy_set_keys(e.reg, "service", k, NULL));
        ASSERT_OK(hub_registry_policy_get(e.reg, "service", &p));
        ASSERT_STREQ(p.primary_key, k);
        ASSERT_STREQ(p.secondary_key, pol[4].secondary_key);
        hub_policy_done(&p);
        ASSERT_EQ(p.primary_key[0], 0);
        ASSERT_OK(hub_registry_policy_set_keys(e.reg, "service", NULL, k));
        ASSERT_OK(hub_registry_policy_get(e.reg, "service", &p));
        ASSERT_STREQ(p.secondary_key, k);
        hub_policy_done(&p);
        ASSERT_ERR(hub_registry_policy_set_keys(e.reg, "nosuch", k, NULL), -ENOENT);
        ASSERT_ERR(hub_registry_policy_set_keys(e.reg, "service", "short", NULL), -EINVAL);
        ASSERT_ERR(hub_registry_policy_set_keys(e.reg, "service", "AAAAAAAAAAAAAAAAAAAA", NULL), -EINVAL); /* 15 bytes */
        ASSERT_ERR(hub_registry_policy_set_keys(e.reg, "service", NULL, NULL), -EINVAL);

        hub_policy_array_free(pol, n);
        hub_policy_array_free(pol2, n2);
        ASSERT_NULL(hub_policy_array_free(NULL, 0));
        env_done(&e);
}

static void on_event(void *ud, struct hub_msg *m) {
        struct env *e = ud;
        const char *op = hub_msg_get_prop(m, "opType", NULL);
        const char *id = hub_msg_get_prop(m, "deviceId", NULL);
        size_t len = 0;
        const char *body = hub_msg_body(m, &len);
        char ts[32];
        uint64_t t = 0;

        ASSERT_NOT_NULL(op);
        ASSERT_NOT_NULL(id);
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE), "application/json");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_ENCODING), "utf-8");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_SOURCE), "deviceLifecycleEvents");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_SCHEMA), "deviceLifecycleNotification");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONNECTION_DEVICE_ID), id);
        ASSERT_STREQ(hub_msg_get_prop(m, "iothub-message-schema", NULL), "deviceLifecycleNotification");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_ENQUEUED_TIME), hub_time_format_iso8601(hub_clock_now(&e->clock.clock), ts));
        ASSERT_OK(hub_time_parse_iso8601(hub_msg_get_prop(m, "operationTimestamp", NULL), &t));
        ASSERT_EQ(t, hub_clock_now(&e->clock.clock));
        const char *cid = hub_msg_get_sys(m, HUB_SYS_CORRELATION_ID);
        ASSERT_NOT_NULL(cid);
        ASSERT_EQ(strlen(cid), 32u);
        ASSERT_NULL(hub_msg_get_sys(m, HUB_SYS_USER_ID)); /* the gateway stamps the hub name */

        json_error_t err;
        json_t *j = json_loadb(body, len, 0, &err);
        ASSERT_NOT_NULL(j);
        ASSERT_STREQ(json_string_value(json_object_get(j, "deviceId")), id);
        ASSERT_STREQ(json_string_value(json_object_get(j, "etag")), "AAAAAAAAAAE=");
        ASSERT_EQ(json_integer_value(json_object_get(j, "version")), 2);
        json_t *des = json_object_get(json_object_get(j, "properties"), "desired");
        ASSERT_EQ(json_integer_value(json_object_get(des, "$version")), 1);
        ASSERT_STREQ(json_string_value(json_object_get(json_object_get(des, "$metadata"), "$lastUpdated")),
                     "0001-01-01T00:00:00Z");
        ASSERT_NOT_NULL(json_object_get(json_object_get(j, "properties"), "reported"));
        json_decref(j);

        e->n_events++;
        snprintf(e->last_op, sizeof e->last_op, "%s", op);
        snprintf(e->last_id, sizeof e->last_id, "%s", id);
}

static void test_crud(void) {
        struct hub_device in, d, d2, d3;
        char etag[32], quoted[40];
        struct env e;

        env_init(&e);
        hub_registry_set_event_sink(e.reg, on_event, &e);

        /* create with empty keys: generated */
        dev_init(&in, "dev1");
        in.generation_id[0] = 'x';  /* read-only: ignored */
        in.etag_version = 77;
        in.c2d_count = 5;
        in.connection_state = HUB_CONNECTED;
        ASSERT_OK(hub_registry_create(e.reg, &in, &d));
        ASSERT_EQ(e.n_events, 1u);
        ASSERT_STREQ(e.last_op, "createDeviceIdentity");
        ASSERT_STREQ(e.last_id, "dev1");
        ASSERT_STREQ(d.device_id, "dev1");
        ASSERT_EQ(strlen(d.generation_id), 18u);
        ASSERT_EQ(strspn(d.generation_id, "0123456789"), 18u);
        ASSERT_TRUE(d.generation_id[0] != '0');
        ASSERT_EQ(d.etag_version, 1u);
        ASSERT_EQ(d.status, HUB_DEVICE_ENABLED);
        ASSERT_FALSE(d.has_status_reason);
        ASSERT_EQ(d.status_updated_usec, 0u);
        ASSERT_EQ(d.auth_type, HUB_AUTH_TYPE_SAS);
        assert_key(d.primary_key);
        assert_key(d.secondary_key);
        ASSERT_TRUE(strcmp(d.primary_key, d.secondary_key) != 0);
        ASSERT_EQ(d.connection_state, HUB_DISCONNECTED);
        ASSERT_EQ(d.c2d_count, 0u);
        ASSERT_EQ(d.created_usec, T0);
        ASSERT_STREQ(hub_device_etag(d.etag_version, etag), "MQ==");

        /* get returns the same */
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d2));
        ASSERT_EQ(memcmp(&d, &d2, sizeof d), 0);
        hub_device_done(&d2);
        ASSERT_ERR(hub_registry_get(e.reg, "DEV1", &d2), -ENOENT); /* case-sensitive */
        ASSERT_ERR(hub_registry_get(e.reg, "nosuch", &d2), -ENOENT);
        ASSERT_ERR(hub_registry_get(e.reg, "bad id", &d2), -EINVAL);

        /* a second device gets different keys and generation id */
        dev_init(&in, "dev2");
        ASSERT_OK(hub_registry_create(e.reg, &in, &d2));
        ASSERT_TRUE(strcmp(d.primary_key, d2.primary_key) != 0);
        ASSERT_TRUE(strcmp(d.generation_id, d2.generation_id) != 0);
        hub_device_done(&d2);
        ASSERT_EQ(e.n_events, 2u);

        /* exists */
        dev_init(&in, "dev1");
        ASSERT_ERR(hub_registry_create(e.reg, &in, &d2), -EEXIST);
        ASSERT_EQ(e.n_events, 2u);

        /* given keys are kept; only the empty one is generated */
        char k[45];
        ASSERT_OK(hub_random_key(k));
        dev_init(&in, "dev3");
        snprintf(in.primary_key, sizeof in.primary_key, "%s", k);
        in.status = HUB_DEVICE_DISABLED;
        in.has_status_reason = true;
        snprintf(in.status_reason, sizeof in.status_reason, "maintenance \xc3\xa9t\xc3\xa9");
        in.iot_edge = true;
        ASSERT_OK(hub_registry_create(e.reg, &in, &d3));
        ASSERT_STREQ(d3.primary_key, k);
        assert_key(d3.secondary_key);
        ASSERT_EQ(d3.status, HUB_DEVICE_DISABLED);
        ASSERT_TRUE(d3.has_status_reason);
        ASSERT_STREQ(d3.status_reason, "maintenance \xc3\xa9t\xc3\xa9");
        ASSERT_TRUE(d3.iot_edge);

        /* invalid input */
        static const char *const bad_keys[] = { "short", "AAAAAAAAAAAAAAAAAAAA" /* 15 bytes */, "not base64 at all!!!!!!!",
                                                 "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8" /* unpadded */ };
        for (size_t i = 0; i < ELEMENTSOF(bad_keys); i++) {
                dev_init(&in, "devbad");
                snprintf(in.secondary_key, sizeof in.secondary_key, "%s", bad_keys[i]);
                ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        }
        dev_init(&in, "bad/id");
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        dev_init(&in, "");
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        dev_init(&in, "devbad");
        in.auth_type = HUB_AUTH_TYPE_SELF_SIGNED; /* no thumbprint */
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        snprintf(in.primary_thumbprint, sizeof in.primary_thumbprint, "%s", "abc");
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        snprintf(in.primary_thumbprint, sizeof in.primary_thumbprint, "%s", THUMB40);
        snprintf(in.secondary_thumbprint, sizeof in.secondary_thumbprint, "%s",
                 "g123456789abcdef0123456789abcdef01234567");
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        dev_init(&in, "devbad");
        in.has_status_reason = true;
        memset(in.status_reason, 'r', 129);
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        in.status_reason[128] = '\0';
        ASSERT_OK(hub_registry_create(e.reg, &in, NULL)); /* exactly 128 */
        dev_init(&in, "devbad2");
        in.has_status_reason = true;
        snprintf(in.status_reason, sizeof in.status_reason, "bad \xff utf8");
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        dev_init(&in, "devbad2");
        in.status = 7;
        ASSERT_ERR(hub_registry_create(e.reg, &in, NULL), -EINVAL);
        ASSERT_ERR(hub_registry_get(e.reg, "devbad2", &d2), -ENOENT);

        /* x509 devices keep thumbprints, drop keys */
        dev_init(&in, "x1");
        in.auth_type = HUB_AUTH_TYPE_SELF_SIGNED;
        snprintf(in.primary_thumbprint, sizeof in.primary_thumbprint, "%s", THUMB40);
        snprintf(in.secondary_thumbprint, sizeof in.secondary_thumbprint, "%s", THUMB64);
        snprintf(in.primary_key, sizeof in.primary_key, "%s", k);
        ASSERT_OK(hub_registry_create(e.reg, &in, &d2));
        ASSERT_EQ(d2.auth_type, HUB_AUTH_TYPE_SELF_SIGNED);
        ASSERT_STREQ(d2.primary_thumbprint, THUMB40);
        ASSERT_STREQ(d2.secondary_thumbprint, THUMB64);
        ASSERT_STREQ(d2.primary_key, "");
        hub_device_done(&d2);

        /* update: etag conditions */
        in = d;
        in.status = HUB_DEVICE_DISABLED;
        in.has_status_reason = true;
        snprintf(in.status_reason, sizeof in.status_reason, "stolen");
        in.c2d_count = 99; /* read-only */
        hub_fake_clock_advance(&e.clock, 10 * USEC_PER_SEC);
        ASSERT_ERR(hub_registry_update(e.reg, &in, "\"Mg==\"", &d2), -ESTALE);
        ASSERT_ERR(hub_registry_update(e.reg, &in, "garbage", &d2), -ESTALE);
        ASSERT_OK(hub_registry_update(e.reg, &in, "\"MQ==\"", &d2));
        ASSERT_EQ(d2.etag_version, 2u);
        ASSERT_EQ(d2.status, HUB_DEVICE_DISABLED);
        ASSERT_STREQ(d2.status_reason, "stolen");
        ASSERT_EQ(d2.status_updated_usec, T0 + 10 * USEC_PER_SEC);
        ASSERT_EQ(d2.c2d_count, 0u);
        ASSERT_STREQ(d2.generation_id, d.generation_id);
        ASSERT_STREQ(d2.primary_key, d.primary_key); /* keys kept */
        ASSERT_EQ(d2.created_usec, T0);
        ASSERT_ERR(hub_registry_update(e.reg, &in, "MQ==", NULL), -ESTALE); /* now stale */
        hub_fake_clock_advance(&e.clock, 10 * USEC_PER_SEC);
        /* unquoted etag; same status: status_updated unchanged; empty keys keep the stored ones */
        in = d2;
        in.primary_key[0] = in.secondary_key[0] = '\0';
        in.has_status_reason = false;
        snprintf(quoted, sizeof quoted, "%s", hub_device_etag(d2.etag_version, etag));
        ASSERT_OK(hub_registry_update(e.reg, &in, quoted, &d3));
        ASSERT_EQ(d3.etag_version, 3u);
        ASSERT_EQ(d3.status_updated_usec, T0 + 10 * USEC_PER_SEC);
        ASSERT_FALSE(d3.has_status_reason);
        ASSERT_STREQ(d3.primary_key, d.primary_key);
        ASSERT_STREQ(d3.secondary_key, d.secondary_key);
        hub_device_done(&d3);
        /* "*" and NULL match anything */
        in.status = HUB_DEVICE_ENABLED;
        ASSERT_OK(hub_registry_update(e.reg, &in, "*", &d3));
        ASSERT_EQ(d3.etag_version, 4u);
        ASSERT_EQ(d3.status_updated_usec, T0 + 20 * USEC_PER_SEC);
        hub_device_done(&d3);
        ASSERT_OK(hub_registry_update(e.reg, &in, "\"*\"", NULL));
        ASSERT_OK(hub_registry_update(e.reg, &in, NULL, &d3));
        ASSERT_EQ(d3.etag_version, 6u);
        hub_device_done(&d3);
        /* new keys through update */
        ASSERT_OK(hub_random_key(in.secondary_key));
        ASSERT_OK(hub_registry_update(e.reg, &in, NULL, &d3));
        ASSERT_STREQ(d3.secondary_key, in.secondary_key);
        ASSERT_STREQ(d3.primary_key, d.primary_key);
        hub_device_done(&d3);
        /* switch to x509 and back: keys are generated again */
        in.auth_type = HUB_AUTH_TYPE_SELF_SIGNED;
        snprintf(in.primary_thumbprint, sizeof in.primary_thumbprint, "%s", THUMB64);
        ASSERT_OK(hub_registry_update(e.reg, &in, NULL, &d3));
        ASSERT_EQ(d3.auth_type, HUB_AUTH_TYPE_SELF_SIGNED);
        ASSERT_STREQ(d3.primary_key, "");
        in = d3;
        in.auth_type = HUB_AUTH_TYPE_SAS;
        hub_device_done(&d3);
        ASSERT_OK(hub_registry_update(e.reg, &in, NULL, &d3));
        assert_key(d3.primary_key);
        ASSERT_TRUE(strcmp(d3.primary_key, d.primary_key) != 0);
        ASSERT_STREQ(d3.primary_thumbprint, "");
        hub_device_done(&d3);
        /* unknown / invalid */
        dev_init(&in, "nosuch");
        ASSERT_ERR(hub_registry_update(e.reg, &in, "*", NULL), -ENOENT);
        ASSERT_ERR(hub_registry_update(e.reg, &in, "MQ==", NULL), -ENOENT);
        in.status = 3;
        ASSERT_ERR(hub_registry_update(e.reg, &in, "*", NULL), -EINVAL);

        /* delete */
        ASSERT_ERR(hub_registry_delete(e.reg, "dev2", "\"Mg==\""), -ESTALE);
        ASSERT_OK(hub_registry_get(e.reg, "dev2", &d3));
        hub_device_done(&d3);
        ASSERT_EQ(e.n_events, 5u); /* dev1, dev2, dev3, devbad, x1 */
        ASSERT_OK(hub_registry_delete(e.reg, "dev2", "\"MQ==\""));
        ASSERT_STREQ(e.last_op, "deleteDeviceIdentity");
        ASSERT_STREQ(e.last_id, "dev2");
        ASSERT_ERR(hub_registry_get(e.reg, "dev2", &d3), -ENOENT);
        ASSERT_ERR(hub_registry_delete(e.reg, "dev2", "*"), -ENOENT);
        ASSERT_ERR(hub_registry_delete(e.reg, "dev2", NULL), -ENOENT);
        ASSERT_OK(hub_registry_delete(e.reg, "dev3", "*"));
        ASSERT_ERR(hub_registry_delete(e.reg, "a b", "*"), -EINVAL);
        unsigned before = e.n_events;
        hub_registry_set_event_sink(e.reg, NULL, NULL);
        ASSERT_OK(hub_registry_delete(e.reg, "x1", NULL));
        ASSERT_EQ(e.n_events, before);

        /* persistence across close/reopen */
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d2));
        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d3));
        ASSERT_EQ(memcmp(&d2, &d3, sizeof d2), 0);
        ASSERT_ERR(hub_registry_get(e.reg, "dev2", &d3), -ENOENT);
        hub_device_done(&d2);
        hub_device_done(&d3);

        hub_device_done(&d);
        env_done(&e);
}

static void test_regenerate(void) {
        struct hub_device in, d, d2;
        struct env e;

        env_init(&e);
        dev_init(&in, "dev1");
        ASSERT_OK(hub_registry_create(e.reg, &in, &d));

        ASSERT_OK(hub_registry_regenerate_key(e.reg, "dev1", HUB_KEY_PRIMARY, &d2));
        assert_key(d2.primary_key);
        ASSERT_TRUE(strcmp(d2.primary_key, d.primary_key) != 0);
        ASSERT_STREQ(d2.secondary_key, d.secondary_key);
        ASSERT_EQ(d2.etag_version, 2u);
        hub_device_done(&d);
        d = d2;

        ASSERT_OK(hub_registry_regenerate_key(e.reg, "dev1", HUB_KEY_SECONDARY, &d2));
        ASSERT_STREQ(d2.primary_key, d.primary_key);
        ASSERT_TRUE(strcmp(d2.secondary_key, d.secondary_key) != 0);
        hub_device_done(&d);
        d = d2;

        ASSERT_OK(hub_registry_regenerate_key(e.reg, "dev1", HUB_KEY_SWAP, &d2));
        ASSERT_STREQ(d2.primary_key, d.secondary_key);
        ASSERT_STREQ(d2.secondary_key, d.primary_key);
        ASSERT_EQ(d2.etag_version, 4u);
        hub_device_done(&d2);

        ASSERT_ERR(hub_registry_regenerate_key(e.reg, "nosuch", HUB_KEY_PRIMARY, NULL), -ENOENT);
        ASSERT_ERR(hub_registry_regenerate_key(e.reg, "dev1", 9, NULL), -EINVAL);
        dev_init(&in, "ca1");
        in.auth_type = HUB_AUTH_TYPE_CA;
        ASSERT_OK(hub_registry_create(e.reg, &in, NULL));
        ASSERT_ERR(hub_registry_regenerate_key(e.reg, "ca1", HUB_KEY_PRIMARY, NULL), -EINVAL);

        hub_device_done(&d);
        env_done(&e);
}

static void test_list_count(void) {
        struct hub_device in, *arr = NULL;
        uint64_t total = 9, enabled = 9, disabled = 9;
        size_t n = 0, seen = 0;
        char after[HUB_DEVICE_ID_MAX + 1] = "", prev[HUB_DEVICE_ID_MAX + 1] = "";
        struct env e;

        env_init(&e);
        ASSERT_OK(hub_registry_count(e.reg, &total, &enabled, &disabled));
        ASSERT_EQ(total, 0u);
        ASSERT_EQ(enabled, 0u);
        ASSERT_EQ(disabled, 0u);
        ASSERT_OK(hub_registry_list(e.reg, NULL, 10, &arr, &n));
        ASSERT_EQ(n, 0u);
        ASSERT_NULL(arr);

        /* created in a scrambled order */
        for (unsigned i = 0; i < 250; i++) {
                unsigned k = (i * 97) % 250;
                char id[32];
                snprintf(id, sizeof id, "dev%03u", k);
                dev_init(&in, id);
                in.status = k % 5 == 0 ? HUB_DEVICE_DISABLED : HUB_DEVICE_ENABLED;
                ASSERT_OK(hub_registry_create(e.reg, &in, NULL));
        }
        ASSERT_OK(hub_registry_count(e.reg, &total, &enabled, &disabled));
        ASSERT_EQ(total, 250u);
        ASSERT_EQ(disabled, 50u);
        ASSERT_EQ(enabled, 200u);
        ASSERT_OK(hub_registry_count(e.reg, &total, NULL, NULL));

        size_t pages = 0;
        for (;;) {
                ASSERT_OK(hub_registry_list(e.reg, seen ? after : NULL, 100, &arr, &n));
                if (n == 0)
                        break;
                pages++;
                ASSERT_TRUE(n <= 100);
                for (size_t i = 0; i < n; i++) {
                        char expect[32];
                        snprintf(expect, sizeof expect, "dev%03zu", seen + i);
                        ASSERT_STREQ(arr[i].device_id, expect);
                        ASSERT_TRUE(strcmp(prev, arr[i].device_id) < 0);
                        assert_key(arr[i].primary_key);
                        snprintf(prev, sizeof prev, "%s", arr[i].device_id);
                }
                seen += n;
                snprintf(after, sizeof after, "%s", arr[n - 1].device_id);
                arr = hub_device_array_free(arr, n);
        }
        ASSERT_EQ(seen, 250u);
        ASSERT_EQ(pages, 3u);

        /* after an id that does not exist, max clamp, bad args */
        ASSERT_OK(hub_registry_list(e.reg, "dev1", 5, &arr, &n));
        ASSERT_EQ(n, 5u);
        ASSERT_STREQ(arr[0].device_id, "dev100");
        arr = hub_device_array_free(arr, n);
        ASSERT_OK(hub_registry_list(e.reg, NULL, 100000, &arr, &n));
        ASSERT_EQ(n, 250u);
        arr = hub_device_array_free(arr, n);
        ASSERT_ERR(hub_registry_list(e.reg, NULL, 0, &arr, &n), -EINVAL);

        ASSERT_OK(hub_registry_delete(e.reg, "dev000", "*"));
        ASSERT_OK(hub_registry_count(e.reg, &total, &enabled, &disabled));
        ASSERT_EQ(total, 249u);
        ASSERT_EQ(disabled, 49u);
        env_done(&e);
}

static void test_json(void) {
        struct hub_device d = {}, back;
        const char *err = NULL;
        json_t *j;
        char *s;

        snprintf(d.device_id, sizeof d.device_id, "dev1");
        snprintf(d.generation_id, sizeof d.generation_id, "638012345678901234");
        d.etag_version = 1;
        snprintf(d.primary_key, sizeof d.primary_key, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        snprintf(d.secondary_key, sizeof d.secondary_key, "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=");

        j = hub_device_to_json(&d, false);
        ASSERT_NOT_NULL(j);
        s = json_dumps(j, JSON_COMPACT);
        ASSERT_STREQ(s,
                     "{\"deviceId\":\"dev1\",\"generationId\":\"638012345678901234\",\"etag\":\"MQ==\","
                     "\"connectionState\":\"Disconnected\",\"connectionStateUpdatedTime\":\"0001-01-01T00:00:00Z\","
                     "\"status\":\"enabled\",\"statusReason\":null,\"statusUpdatedTime\":\"0001-01-01T00:00:00Z\","
                     "\"lastActivityTime\":\"0001-01-01T00:00:00Z\",\"cloudToDeviceMessageCount\":0,"
                     "\"authentication\":{\"type\":\"sas\",\"symmetricKey\":{\"primaryKey\":null,\"secondaryKey\":null},"
                     "\"x509Thumbprint\":{\"primaryThumbprint\":null,\"secondaryThumbprint\":null}},"
                     "\"capabilities\":{\"iotEdge\":false},\"deviceScope\":null,\"parentScopes\":[]}");
        free(s);
        json_decref(j);

        /* with keys, disabled, reason, connected, times, x509 fields */
        d.status = HUB_DEVICE_DISABLED;
        d.has_status_reason = true;
        snprintf(d.status_reason, sizeof d.status_reason, "why \"not\"");
        d.connection_state = HUB_CONNECTED;
        d.connection_state_updated_usec = UINT64_C(1464816163799688) * 10 / 10;
        d.status_updated_usec = T0;
        d.last_activity_usec = T0 + 1;
        d.c2d_count = 3;
        d.iot_edge = true;
        d.etag_version = 186001083;
        j = hub_device_to_json(&d, true);
        ASSERT_NOT_NULL(j);
        ASSERT_STREQ(json_string_value(json_object_get(j, "etag")), "MTg2MDAxMDgz");
        ASSERT_STREQ(json_string_value(json_object_get(j, "status")), "disabled");
        ASSERT_STREQ(json_string_value(json_object_get(j, "statusReason")), "why \"not\"");
        ASSERT_STREQ(json_string_value(json_object_get(j, "connectionState")), "Connected");
        ASSERT_STREQ(json_string_value(json_object_get(j, "connectionStateUpdatedTime")), "2016-06-01T21:22:43.7996880Z");
        ASSERT_EQ(json_integer_value(json_object_get(j, "cloudToDeviceMessageCount")), 3);
        json_t *auth = json_object_get(j, "authentication");
        ASSERT_STREQ(json_string_value(json_object_get(json_object_get(auth, "symmetricKey"), "primaryKey")),
                     d.primary_key);
        ASSERT_TRUE(json_is_true(json_object_get(json_object_get(j, "capabilities"), "iotEdge")));

        /* round trip */
        if (hub_device_from_json(j, &back, &err) < 0)
                TEST_FAIL("round trip: %s", err);
        ASSERT_STREQ(back.device_id, d.device_id);
        ASSERT_EQ(back.status, d.status);
        ASSERT_TRUE(back.has_status_reason);
        ASSERT_STREQ(back.status_reason, d.status_reason);
        ASSERT_EQ(back.auth_type, HUB_AUTH_TYPE_SAS);
        ASSERT_STREQ(back.primary_key, d.primary_key);
        ASSERT_STREQ(back.secondary_key, d.secondary_key);
        ASSERT_TRUE(back.iot_edge);
        ASSERT_EQ(back.etag_version, 0u); /* read-only fields are not taken */
        ASSERT_STREQ(back.generation_id, "");
        json_decref(j);

        /* x509 round trip */
        d.auth_type = HUB_AUTH_TYPE_SELF_SIGNED;
        d.primary_key[0] = d.secondary_key[0] = '\0';
        snprintf(d.primary_thumbprint, sizeof d.primary_thumbprint, THUMB40);
        j = hub_device_to_json(&d, true);
        ASSERT_STREQ(json_string_value(json_object_get(json_object_get(j, "authentication"), "type")), "selfSigned");
        ASSERT_OK(hub_device_from_json(j, &back, &err));
        ASSERT_EQ(back.auth_type, HUB_AUTH_TYPE_SELF_SIGNED);
        ASSERT_STREQ(back.primary_thumbprint, THUMB40);
        ASSERT_STREQ(back.secondary_thumbprint, "");
        json_decref(j);

        /* normalisation */
        static const struct {
                const char *json;
                enum hub_auth_type type;
        } good[] = {
                { "{\"deviceId\":\"a\"}", HUB_AUTH_TYPE_SAS },
                { "{\"deviceId\":\"a\",\"authentication\":null}", HUB_AUTH_TYPE_SAS },
                { "{\"deviceId\":\"a\",\"authentication\":{}}", HUB_AUTH_TYPE_SAS },
                { "{\"deviceId\":\"a\",\"authentication\":{\"symmetricKey\":{\"primaryKey\":\"\",\"secondaryKey\":\"\"}}}",
                  HUB_AUTH_TYPE_SAS },
                { "{\"deviceId\":\"a\",\"authentication\":{\"x509Thumbprint\":{\"primaryThumbprint\":\"" THUMB64 "\"}}}",
                  HUB_AUTH_TYPE_SELF_SIGNED },
                { "{\"deviceId\":\"a\",\"authentication\":{\"type\":\"certificateAuthority\"}}", HUB_AUTH_TYPE_CA },
                { "{\"deviceId\":\"a\",\"authentication\":{\"type\":\"none\"},\"status\":\"disabled\",\"etag\":5,"
                  "\"deviceScope\":\"x\",\"capabilities\":null}",
                  HUB_AUTH_TYPE_NONE },
        };
        for (size_t i = 0; i < ELEMENTSOF(good); i++) {
                json_error_t jerr;
                j = json_loads(good[i].json, 0, &jerr);
                ASSERT_NOT_NULL(j);
                err = NULL;
                if (hub_device_from_json(j, &back, &err) < 0)
                        TEST_FAIL("%s: %s", good[i].json, err);
                ASSERT_EQ(back.auth_type, good[i].type);
                ASSERT_STREQ(back.device_id, "a");
                ASSERT_STREQ(back.primary_key, "");
                json_decref(j);
        }

        static const struct {
                const char *json, *error_prefix;
        } bad[] = {
                { "[]", "device:" },
                { "{}", "deviceId:" },
                { "{\"deviceId\":5}", "deviceId:" },
                { "{\"deviceId\":\"a b\"}", "deviceId:" },
                { "{\"deviceId\":\"\"}", "deviceId:" },
                { "{\"deviceId\":\"a\",\"status\":\"on\"}", "status:" },
                { "{\"deviceId\":\"a\",\"status\":1}", "status:" },
                { "{\"deviceId\":\"a\",\"statusReason\":5}", "statusReason:" },
                { "{\"deviceId\":\"a\",\"authentication\":\"sas\"}", "authentication:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"type\":\"foo\"}}", "authentication.type:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"type\":7}}", "authentication.type:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"symmetricKey\":[]}}", "authentication.symmetricKey:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"symmetricKey\":{\"primaryKey\":12}}}",
                  "authentication.symmetricKey.primaryKey:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"symmetricKey\":{\"secondaryKey\":\"abc\"}}}",
                  "authentication.symmetricKey.secondaryKey:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"type\":\"selfSigned\"}}",
                  "authentication.x509Thumbprint.primaryThumbprint:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"x509Thumbprint\":{\"primaryThumbprint\":\"xyz\"}}}",
                  "authentication.x509Thumbprint.primaryThumbprint:" },
                { "{\"deviceId\":\"a\",\"authentication\":{\"x509Thumbprint\":{\"primaryThumbprint\":\"" THUMB40
                  "\",\"secondaryThumbprint\":\"" THUMB64 "00\"}}}",
                  "authentication.x509Thumbprint.secondaryThumbprint:" },
                { "{\"deviceId\":\"a\",\"capabilities\":{\"iotEdge\":\"yes\"}}", "capabilities.iotEdge:" },
                { "{\"deviceId\":\"a\",\"capabilities\":1}", "capabilities:" },
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                json_error_t jerr;
                j = json_loads(bad[i].json, JSON_DECODE_ANY, &jerr);
                ASSERT_NOT_NULL(j);
                err = NULL;
                memset(&back, 0x5a, sizeof back);
                ASSERT_ERR(hub_device_from_json(j, &back, &err), -EINVAL);
                ASSERT_NOT_NULL(err);
                if (strncmp(err, bad[i].error_prefix, strlen(bad[i].error_prefix)) != 0)
                        TEST_FAIL("%s: error \"%s\", expected it to start with \"%s\"", bad[i].json, err,
                                  bad[i].error_prefix);
                ASSERT_EQ((unsigned char) back.device_id[0], 0x5a); /* untouched */
                json_decref(j);
        }

        /* long values */
        {
                char id[200], reason[600];
                memset(id, 'x', 129);
                id[129] = '\0';
                j = json_pack("{s:s}", "deviceId", id);
                ASSERT_ERR(hub_device_from_json(j, &back, &err), -EINVAL);
                ASSERT_NOT_NULL(strstr(err, "128"));
                json_decref(j);
                memset(reason, 'r', 129);
                reason[129] = '\0';
                j = json_pack("{s:s, s:s}", "deviceId", "a", "statusReason", reason);
                ASSERT_ERR(hub_device_from_json(j, &back, &err), -EINVAL);
                ASSERT_STREQ(err, "statusReason: longer than 128 characters");
                json_decref(j);
                memset(reason, 'r', 599);
                reason[599] = '\0';
                j = json_pack("{s:s, s:s}", "deviceId", "a", "statusReason", reason);
                ASSERT_ERR(hub_device_from_json(j, &back, &err), -EINVAL);
                json_decref(j);
                /* 128 two-byte characters are fine */
                for (int i = 0; i < 128; i++)
                        memcpy(reason + 2 * i, "\xc3\xa9", 2);
                reason[256] = '\0';
                j = json_pack("{s:s, s:s}", "deviceId", "a", "statusReason", reason);
                ASSERT_OK(hub_device_from_json(j, &back, &err));
                ASSERT_STREQ(back.status_reason, reason);
                json_decref(j);
                memset(reason, 'A', 92);
                reason[92] = '\0';
                j = json_pack("{s:s, s:{s:{s:s}}}", "deviceId", "a", "authentication", "symmetricKey", "primaryKey",
                              reason);
                ASSERT_ERR(hub_device_from_json(j, &back, &err), -EINVAL);
                ASSERT_STREQ(err, "authentication.symmetricKey.primaryKey: longer than 88 characters");
                json_decref(j);
        }
        hub_device_done(&back);
        hub_device_done(&d);
}

/* A device created from the JSON an SDK sends, then returned as JSON. */
static void test_json_registry(void) {
        struct hub_device in, out;
        const char *err = NULL;
        json_error_t jerr;
        struct env e;
        json_t *j;

        env_init(&e);
        j = json_loads("{\"deviceId\":\"sdk-dev\",\"status\":\"enabled\",\"authentication\":{\"symmetricKey\":"
                       "{\"primaryKey\":\"\",\"secondaryKey\":\"\"}}}",
                       0, &jerr);
        ASSERT_NOT_NULL(j);
        ASSERT_OK(hub_device_from_json(j, &in, &err));
        json_decref(j);
        ASSERT_OK(hub_registry_create(e.reg, &in, &out));
        j = hub_device_to_json(&out, true);
        ASSERT_STREQ(json_string_value(json_object_get(j, "etag")), "MQ==");
        ASSERT_STREQ(json_string_value(json_object_get(j, "generationId")), out.generation_id);
        const char *pk = json_string_value(
                json_object_get(json_object_get(json_object_get(j, "authentication"), "symmetricKey"), "primaryKey"));
        ASSERT_NOT_NULL(pk);
        assert_key(pk);
        json_decref(j);
        hub_device_done(&in);
        hub_device_done(&out);
        env_done(&e);
}

int main(void) {
        TEST_RUN(test_ids);
        TEST_RUN(test_json);
        TEST_RUN(test_default_policies);
        TEST_RUN(test_crud);
        TEST_RUN(test_regenerate);
        TEST_RUN(test_list_count);
        TEST_RUN(test_json_registry);
        return 0;
}
