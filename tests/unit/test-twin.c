/* SPDX-License-Identifier: MIT */
/* Device twins on a real store in a temporary directory with a fake clock: the §6.1 document,
 * the device view, merge / replace semantics, versions, etags and $metadata, If-Match and
 * expected versions, every limit at its boundary (pure functions and through the store),
 * twin-change events, desired notifications, persistence, cascade on device delete,
 * ordering of back-to-back changes and the scan for the query engine. */

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/registry.h"
#include "hub/store.h"
#include "hub/twin.h"
#include "store-internal.h"
#include "test-util.h"

#define T0 (UINT64_C(1700000000) * USEC_PER_SEC)
#define T0_ISO "2023-11-14T22:13:20.0000000Z"

struct env {
        char dir[256];
        struct hub_fake_clock clock;
        struct hub_store *store;
        struct hub_registry *reg;
        struct hub_twins *twins;
        /* events and notifications seen */
        unsigned n_events;
        struct hub_msg *last_event;
        unsigned n_desired;
        char desired_id[HUB_DEVICE_ID_MAX + 1];
        char *desired_body;
        int64_t desired_version;
};

static void on_event(void *ud, struct hub_msg *ev) {
        struct env *e = ud;
        e->n_events++;
        hub_msg_unref(e->last_event);
        e->last_event = hub_msg_ref(ev);
}

static void on_desired(void *ud, const char *device_id, const json_t *patch, int64_t version) {
        struct env *e = ud;
        e->n_desired++;
        snprintf(e->desired_id, sizeof e->desired_id, "%s", device_id);
        free(e->desired_body);
        e->desired_body = json_dumps(patch, JSON_COMPACT);
        e->desired_version = version;
}

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
        ASSERT_OK(hub_twins_new(e->store, &e->clock.clock, NULL, &e->twins));
        hub_twins_set_event_sink(e->twins, on_event, e);
        hub_twins_set_desired_handler(e->twins, on_desired, e);
}

static void env_close(struct env *e) {
        e->twins = hub_twins_free(e->twins);
        e->reg = hub_registry_free(e->reg);
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
        e->last_event = hub_msg_unref(e->last_event);
        free(e->desired_body);
        test_rmdir(e->dir);
}

static void add_device(struct env *e, const char *id) {
        struct hub_device d;
        memset(&d, 0, sizeof d);
        snprintf(d.device_id, sizeof d.device_id, "%s", id);
        ASSERT_OK(hub_registry_create(e->reg, &d, NULL));
}

/* ---- running changes synchronously ------------------------------------------------------- */

struct result {
        bool done;
        int r;
        json_t *twin;
        char error[HUB_TWIN_ERROR_MAX];
};

static void result_done(struct result *res) {
        json_decref(res->twin);
        memset(res, 0, sizeof *res);
}

static void on_done(int r, json_t *twin, const char *error, void *ud) {
        struct result *res = ud;
        ASSERT_FALSE(res->done);
        res->done = true;
        res->r = r;
        res->twin = json_incref(twin);
        if (r < 0) {
                ASSERT_NULL(twin);
                ASSERT_NOT_NULL(error);
                snprintf(res->error, sizeof res->error, "%s", error);
        } else {
                ASSERT_NOT_NULL(twin);
                ASSERT_NULL(error);
        }
}

static void wait_for(struct env *e, struct result *res) {
        while (!res->done) {
                struct pollfd p = { .fd = hub_store_get_fd(e->store), .events = POLLIN };
                ASSERT_TRUE(poll(&p, 1, 10000) == 1);
                (void) hub_store_dispatch(e->store);
        }
}

static json_t *parse(const char *s) {
        json_error_t err;
        json_t *j = json_loads(s, 0, &err);
        if (!j)
                TEST_FAIL("bad test JSON %s: %s", s, err.text);
        return j;
}

enum op { UPDATE, REPLACE, REPORTED, DESIRED };

/* Runs one change and returns its result (twin kept in res). */
static int change(struct env *e, enum op op, const char *id, const char *json, const char *if_match,
                  int64_t expected, struct result *res) {
        json_t *body = parse(json);
        int r;

        memset(res, 0, sizeof *res);
        switch (op) {
        case UPDATE: r = hub_twin_update(e->twins, id, body, if_match, on_done, res); break;
        case REPLACE: r = hub_twin_replace(e->twins, id, body, if_match, on_done, res); break;
        case DESIRED: r = hub_twin_update_desired(e->twins, id, body, if_match, on_done, res); break;
        default: r = hub_twin_update_reported(e->twins, id, body, expected, on_done, res); break;
        }
        json_decref(body);
        ASSERT_OK(r);
        wait_for(e, res);
        return res->r;
}

/* Runs a change expected to succeed and returns nothing; the twin is discarded. */
static void change_ok(struct env *e, enum op op, const char *id, const char *json) {
        struct result res;
        int r = change(e, op, id, json, NULL, -1, &res);
        if (r < 0)
                TEST_FAIL("change %s on %s: %s: %s", json, id, strerror(-r), res.error);
        result_done(&res);
}

static char *dump(const json_t *j) {
        char *s = json_dumps(j, JSON_COMPACT);
        ASSERT_NOT_NULL(s);
        return s;
}

static void assert_json(const json_t *j, const char *expected) {
        char *s = dump(j);
        if (!streq(s, expected))
                TEST_FAIL("JSON mismatch:\n  got      %s\n  expected %s", s, expected);
        free(s);
}

static const json_t *path_get(const json_t *j, const char *path) {
        char buf[256], *save = NULL;
        snprintf(buf, sizeof buf, "%s", path);
        for (char *tok = strtok_r(buf, ".", &save); tok && j; tok = strtok_r(NULL, ".", &save))
                j = json_object_get(j, tok);
        return j;
}

static int64_t path_int(const json_t *j, const char *path) {
        const json_t *v = path_get(j, path);
        if (!json_is_integer(v))
                TEST_FAIL("%s is not an integer", path);
        return json_integer_value(v);
}

static const char *path_str(const json_t *j, const char *path) {
        const json_t *v = path_get(j, path);
        if (!json_is_string(v))
                TEST_FAIL("%s is not a string", path);
        return json_string_value(v);
}

/* ---- tests -------------------------------------------------------------------------------- */

static void test_etag(void) {
        char buf[16];
        ASSERT_STREQ(hub_twin_etag(1, buf), "AAAAAAAAAAE=");
        ASSERT_STREQ(hub_twin_etag(7, buf), "AAAAAAAAAAc=");
        ASSERT_STREQ(hub_twin_etag(UINT64_C(0x0102030405060708), buf), "AQIDBAUGBwg=");
}

static void test_initial_twin(void) {
        struct env e;
        json_t *j = NULL;

        env_init(&e);
        add_device(&e, "devA");
        ASSERT_OK(hub_twin_get(e.twins, "devA", &j));
        assert_json(j, "{\"deviceId\":\"devA\",\"etag\":\"AAAAAAAAAAE=\",\"deviceEtag\":\"MQ==\","
                       "\"status\":\"enabled\",\"statusReason\":null,\"statusUpdateTime\":\"0001-01-01T00:00:00Z\","
                       "\"connectionState\":\"Disconnected\",\"lastActivityTime\":\"0001-01-01T00:00:00Z\","
                       "\"cloudToDeviceMessageCount\":0,\"authenticationType\":\"sas\","
                       "\"x509Thumbprint\":{\"primaryThumbprint\":null,\"secondaryThumbprint\":null},"
                       "\"modelId\":\"\",\"version\":1,\"capabilities\":{\"iotEdge\":false},\"tags\":{},"
                       "\"properties\":{\"desired\":{\"$metadata\":{\"$lastUpdated\":\"" T0_ISO "\","
                       "\"$lastUpdatedVersion\":1},\"$version\":1},"
                       "\"reported\":{\"$metadata\":{\"$lastUpdated\":\"" T0_ISO "\"},\"$version\":1}}}");
        json_decref(j);

        ASSERT_OK(hub_twin_get_device_view(e.twins, "devA", &j));
        assert_json(j, "{\"desired\":{\"$version\":1},\"reported\":{\"$version\":1}}");
        json_decref(j);

        /* unknown / invalid ids */
        ASSERT_ERR(hub_twin_get(e.twins, "nope", &j), -ENOENT);
        ASSERT_ERR(hub_twin_get_device_view(e.twins, "nope", &j), -ENOENT);
        ASSERT_ERR(hub_twin_get(e.twins, "bad/id", &j), -EINVAL);
        ASSERT_ERR(hub_twin_get(e.twins, NULL, &j), -EINVAL);

        /* a change on an unknown device fails through done, with a message */
        struct result res;
        ASSERT_ERR(change(&e, DESIRED, "nope", "{\"a\":1}", NULL, -1, &res), -ENOENT);
        ASSERT_TRUE(strstr(res.error, "nope") != NULL);
        result_done(&res);
        /* bad arguments are refused at submission, done never runs */
        json_t *p = parse("{}");
        ASSERT_ERR(hub_twin_update(e.twins, "bad/id", p, NULL, on_done, &res), -EINVAL);
        ASSERT_ERR(hub_twin_update(e.twins, "devA", NULL, NULL, on_done, &res), -EINVAL);
        ASSERT_ERR(hub_twin_update(NULL, "devA", p, NULL, on_done, &res), -EINVAL);
        json_decref(p);
        ASSERT_EQ(e.n_events, 0u);
        env_done(&e);
}

static void test_identity_fields(void) {
        struct env e;
        struct hub_device d;
        json_t *j = NULL;

        env_init(&e);
        memset(&d, 0, sizeof d);
        snprintf(d.device_id, sizeof d.device_id, "x509dev");
        d.auth_type = HUB_AUTH_TYPE_SELF_SIGNED;
        snprintf(d.primary_thumbprint, sizeof d.primary_thumbprint, "0123456789abcdef0123456789ABCDEF01234567");
        d.status = HUB_DEVICE_DISABLED;
        d.has_status_reason = true;
        snprintf(d.status_reason, sizeof d.status_reason, "maintenance");
        d.iot_edge = true;
        ASSERT_OK(hub_registry_create(e.reg, &d, NULL));
        ASSERT_OK(hub_twin_get(e.twins, "x509dev", &j));
        ASSERT_STREQ(path_str(j, "status"), "disabled");
        ASSERT_STREQ(path_str(j, "statusReason"), "maintenance");
        ASSERT_STREQ(path_str(j, "authenticationType"), "selfSigned");
        ASSERT_STREQ(path_str(j, "x509Thumbprint.primaryThumbprint"), "0123456789abcdef0123456789ABCDEF01234567");
        ASSERT_TRUE(json_is_null(path_get(j, "x509Thumbprint.secondaryThumbprint")));
        ASSERT_TRUE(json_is_true(path_get(j, "capabilities.iotEdge")));
        json_decref(j);

        /* the device etag follows the registry, the twin etag does not */
        ASSERT_OK(hub_registry_update(e.reg, &d, NULL, NULL));
        ASSERT_OK(hub_twin_get(e.twins, "x509dev", &j));
        ASSERT_STREQ(path_str(j, "deviceEtag"), "Mg==");
        ASSERT_STREQ(path_str(j, "etag"), "AAAAAAAAAAE=");
        json_decref(j);
        env_done(&e);
}

static void test_merge_semantics(void) {
        struct env e;
        struct result res;
        json_t *j = NULL;

        env_init(&e);
        add_device(&e, "d1");
        change_ok(&e, DESIRED, "d1", "{\"a\":{\"b\":1,\"c\":{\"d\":\"x\"}},\"arr\":[1,2,3],\"s\":\"v\"}");
        /* nested merge, null deletes (present and missing keys), arrays replaced wholesale */
        change_ok(&e, DESIRED, "d1", "{\"a\":{\"c\":{\"e\":true},\"b\":null},\"arr\":[9],\"missing\":null,\"s\":null}");
        ASSERT_OK(hub_twin_get_device_view(e.twins, "d1", &j));
        assert_json(j, "{\"desired\":{\"a\":{\"c\":{\"d\":\"x\",\"e\":true}},\"arr\":[9],\"$version\":3},"
                       "\"reported\":{\"$version\":1}}");
        json_decref(j);

        /* a scalar replaced by an object and back; an object in a patch over nothing */
        change_ok(&e, DESIRED, "d1", "{\"arr\":{\"k\":{\"z\":null}},\"a\":5}");
        ASSERT_OK(hub_twin_get_device_view(e.twins, "d1", &j));
        assert_json(j, "{\"desired\":{\"a\":5,\"arr\":{\"k\":{}},\"$version\":4},\"reported\":{\"$version\":1}}");
        json_decref(j);

        /* tags merge the same way and do not touch desired's $version */
        change_ok(&e, UPDATE, "d1", "{\"tags\":{\"site\":{\"b\":\"43\",\"f\":\"1\"}}}");
        change_ok(&e, UPDATE, "d1", "{\"tags\":{\"site\":{\"f\":null,\"r\":2}}}");
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        assert_json(json_object_get(j, "tags"), "{\"site\":{\"b\":\"43\",\"r\":2}}");
        ASSERT_EQ(path_int(j, "properties.desired.$version"), 4);
        ASSERT_EQ(path_int(j, "version"), 6);
        json_decref(j);

        /* $version / $metadata at the top of a patch are ignored, elsewhere rejected */
        change_ok(&e, DESIRED, "d1", "{\"$version\":99,\"$metadata\":{\"x\":1},\"n\":1}");
        ASSERT_OK(hub_twin_get_device_view(e.twins, "d1", &j));
        ASSERT_EQ(path_int(j, "desired.$version"), 5);
        ASSERT_EQ(path_int(j, "desired.n"), 1);
        json_decref(j);
        ASSERT_ERR(change(&e, DESIRED, "d1", "{\"o\":{\"$version\":1}}", NULL, -1, &res), -EINVAL);
        ASSERT_STREQ(res.error, "properties.desired.o.$version: keys starting with '$' are reserved");
        result_done(&res);

        /* an empty PATCH changes nothing: no new version, no event */
        unsigned n = e.n_events;
        ASSERT_OK(change(&e, UPDATE, "d1", "{}", NULL, -1, &res));
        ASSERT_EQ(path_int(res.twin, "version"), 7);
        ASSERT_EQ(e.n_events, n);
        result_done(&res);

        /* wrong shapes */
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"tags\":5}", NULL, -1, &res), -EINVAL);
        ASSERT_STREQ(res.error, "tags: must be a JSON object");
        result_done(&res);
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"bogus\":1}", NULL, -1, &res), -EINVAL);
        ASSERT_STREQ(res.error, "bogus: unknown field");
        result_done(&res);
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"deviceId\":\"other\",\"tags\":{}}", NULL, -1, &res), -EINVAL);
        result_done(&res);
        ASSERT_ERR(change(&e, UPDATE, "d1", "[1]", NULL, -1, &res), -EINVAL);
        result_done(&res);
        ASSERT_ERR(change(&e, REPORTED, "d1", "[1]", NULL, -1, &res), -EINVAL);
        result_done(&res);
        /* read-only root fields are ignored */
        change_ok(&e, UPDATE, "d1", "{\"deviceId\":\"d1\",\"etag\":\"x\",\"version\":3,\"status\":\"disabled\","
                                    "\"tags\":{\"t\":1}}");
        env_done(&e);
}

static void test_reported_rejected_from_service(void) {
        struct env e;
        struct result res;
        json_t *j = NULL;

        env_init(&e);
        add_device(&e, "d1");
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"properties\":{\"reported\":{\"x\":1}}}", NULL, -1, &res), -EINVAL);
        ASSERT_STREQ(res.error, "properties.reported: the service cannot write reported properties");
        result_done(&res);
        ASSERT_ERR(change(&e, REPLACE, "d1", "{\"tags\":{},\"properties\":{\"desired\":{},\"reported\":{}}}", NULL, -1,
                          &res),
                   -EINVAL);
        result_done(&res);
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"properties\":{\"other\":{}}}", NULL, -1, &res), -EINVAL);
        result_done(&res);
        ASSERT_EQ(e.n_events, 0u);
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        ASSERT_EQ(path_int(j, "version"), 1);
        json_decref(j);
        env_done(&e);
}

static void test_versions_etags_metadata(void) {
        struct env e;
        struct result res;
        json_t *j = NULL;
        const char *t1 = "2023-11-14T22:13:21.0000000Z", *t2 = "2023-11-14T22:13:22.0000000Z";

        env_init(&e);
        add_device(&e, "d1");
        hub_fake_clock_advance(&e.clock, USEC_PER_SEC);
        ASSERT_OK(change(&e, DESIRED, "d1", "{\"tc\":{\"f\":\"5m\",\"g\":1}}", "*", -1, &res));
        ASSERT_EQ(path_int(res.twin, "version"), 2);
        ASSERT_STREQ(path_str(res.twin, "etag"), "AAAAAAAAAAI=");
        ASSERT_EQ(path_int(res.twin, "properties.desired.$version"), 2);
        ASSERT_EQ(path_int(res.twin, "properties.reported.$version"), 1);
        assert_json(path_get(res.twin, "properties.desired.$metadata"),
                    "{\"$lastUpdated\":\"2023-11-14T22:13:21.0000000Z\",\"$lastUpdatedVersion\":2,"
                    "\"tc\":{\"$lastUpdated\":\"2023-11-14T22:13:21.0000000Z\",\"$lastUpdatedVersion\":2,"
                    "\"f\":{\"$lastUpdated\":\"2023-11-14T22:13:21.0000000Z\",\"$lastUpdatedVersion\":2},"
                    "\"g\":{\"$lastUpdated\":\"2023-11-14T22:13:21.0000000Z\",\"$lastUpdatedVersion\":2}}}");
        result_done(&res);

        /* change one leaf: its parents are stamped, its sibling keeps its metadata */
        hub_fake_clock_advance(&e.clock, USEC_PER_SEC);
        ASSERT_OK(change(&e, DESIRED, "d1", "{\"tc\":{\"g\":2}}", "\"AAAAAAAAAAI=\"", -1, &res));
        ASSERT_STREQ(path_str(res.twin, "properties.desired.$metadata.$lastUpdated"), t2);
        ASSERT_EQ(path_int(res.twin, "properties.desired.$metadata.$lastUpdatedVersion"), 3);
        ASSERT_STREQ(path_str(res.twin, "properties.desired.$metadata.tc.$lastUpdated"), t2);
        ASSERT_STREQ(path_str(res.twin, "properties.desired.$metadata.tc.g.$lastUpdated"), t2);
        ASSERT_EQ(path_int(res.twin, "properties.desired.$metadata.tc.g.$lastUpdatedVersion"), 3);
        ASSERT_STREQ(path_str(res.twin, "properties.desired.$metadata.tc.f.$lastUpdated"), t1);
        ASSERT_EQ(path_int(res.twin, "properties.desired.$metadata.tc.f.$lastUpdatedVersion"), 2);
        result_done(&res);

        /* deleting a leaf removes its metadata and stamps its parent */
        ASSERT_OK(change(&e, DESIRED, "d1", "{\"tc\":{\"f\":null}}", NULL, -1, &res));
        ASSERT_NULL(path_get(res.twin, "properties.desired.$metadata.tc.f"));
        ASSERT_EQ(path_int(res.twin, "properties.desired.$metadata.tc.$lastUpdatedVersion"), 4);
        result_done(&res);

        /* If-Match: a stale etag fails with -ESTALE and changes nothing */
        ASSERT_ERR(change(&e, DESIRED, "d1", "{\"x\":1}", "\"AAAAAAAAAAI=\"", -1, &res), -ESTALE);
        ASSERT_TRUE(strstr(res.error, "AAAAAAAAAAQ=") != NULL);
        result_done(&res);
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"tags\":{\"x\":1}}", "garbage-etag-that-is-much-too-long-to-be-real",
                          -1, &res),
                   -ESTALE);
        result_done(&res);
        ASSERT_ERR(change(&e, REPLACE, "d1", "{}", "AAAAAAAAAAE=", -1, &res), -ESTALE);
        result_done(&res);
        ASSERT_OK(change(&e, DESIRED, "d1", "{\"x\":1}", "AAAAAAAAAAQ=", -1, &res));
        ASSERT_EQ(path_int(res.twin, "version"), 5);
        result_done(&res);

        /* reported: metadata without $lastUpdatedVersion, own $version, optional expected version */
        hub_fake_clock_advance(&e.clock, USEC_PER_SEC);
        ASSERT_OK(change(&e, REPORTED, "d1", "{\"battery\":55,\"cfg\":{\"s\":\"ok\"}}", NULL, -1, &res));
        ASSERT_EQ(path_int(res.twin, "properties.reported.$version"), 2);
        ASSERT_EQ(path_int(res.twin, "properties.desired.$version"), 5);
        ASSERT_EQ(path_int(res.twin, "version"), 6);
        assert_json(path_get(res.twin, "properties.reported.$metadata"),
                    "{\"$lastUpdated\":\"2023-11-14T22:13:23.0000000Z\","
                    "\"battery\":{\"$lastUpdated\":\"2023-11-14T22:13:23.0000000Z\"},"
                    "\"cfg\":{\"$lastUpdated\":\"2023-11-14T22:13:23.0000000Z\","
                    "\"s\":{\"$lastUpdated\":\"2023-11-14T22:13:23.0000000Z\"}}}");
        result_done(&res);
        ASSERT_ERR(change(&e, REPORTED, "d1", "{\"battery\":54}", NULL, 1, &res), -ESTALE);
        result_done(&res);
        ASSERT_OK(change(&e, REPORTED, "d1", "{\"battery\":54,\"cfg\":null}", NULL, 2, &res));
        ASSERT_EQ(path_int(res.twin, "properties.reported.$version"), 3);
        result_done(&res);
        ASSERT_OK(hub_twin_get_device_view(e.twins, "d1", &j));
        assert_json(j, "{\"desired\":{\"tc\":{\"g\":2},\"x\":1,\"$version\":5},"
                       "\"reported\":{\"battery\":54,\"$version\":3}}");
        json_decref(j);
        env_done(&e);
}

static void test_replace(void) {
        struct env e;
        struct result res;
        const char *t0 = T0_ISO, *t1 = "2023-11-14T22:13:21.0000000Z";

        env_init(&e);
        add_device(&e, "d1");
        change_ok(&e, UPDATE, "d1", "{\"tags\":{\"a\":1,\"b\":2},\"properties\":{\"desired\":{\"k\":{\"x\":1},\"j\":2}}}");
        ASSERT_EQ(e.n_desired, 1u);
        hub_fake_clock_advance(&e.clock, USEC_PER_SEC);
        ASSERT_OK(change(&e, REPLACE, "d1",
                         "{\"tags\":{\"c\":3},\"properties\":{\"desired\":{\"k\":{\"x\":1},\"n\":null,"
                         "\"$version\":7,\"$metadata\":{}}}}",
                         NULL, -1, &res));
        assert_json(path_get(res.twin, "tags"), "{\"c\":3}");
        ASSERT_EQ(path_int(res.twin, "properties.desired.$version"), 3);
        ASSERT_EQ(path_int(res.twin, "version"), 3);
        /* unchanged k keeps its metadata, the root is stamped, j's metadata is gone */
        ASSERT_STREQ(path_str(res.twin, "properties.desired.$metadata.k.$lastUpdated"), t0);
        ASSERT_EQ(path_int(res.twin, "properties.desired.$metadata.k.$lastUpdatedVersion"), 2);
        ASSERT_STREQ(path_str(res.twin, "properties.desired.$metadata.$lastUpdated"), t1);
        ASSERT_NULL(path_get(res.twin, "properties.desired.$metadata.j"));
        ASSERT_NULL(path_get(res.twin, "properties.desired.j"));
        ASSERT_NULL(path_get(res.twin, "properties.desired.n"));

        /* the event is a replaceTwin with the full twin; the notification is the new document */
        ASSERT_EQ(e.n_events, 2u);
        ASSERT_STREQ(hub_msg_get_prop(e.last_event, "opType", NULL), "replaceTwin");
        size_t len;
        const char *body = hub_msg_body(e.last_event, &len);
        char *expected = dump(res.twin);
        ASSERT_EQ(len, strlen(expected));
        ASSERT_TRUE(memcmp(body, expected, len) == 0);
        free(expected);
        ASSERT_EQ(e.n_desired, 2u);
        ASSERT_STREQ(e.desired_body, "{\"k\":{\"x\":1},\"$version\":3}");
        ASSERT_EQ(e.desired_version, 3);
        result_done(&res);

        /* an empty replace empties both sections */
        ASSERT_OK(change(&e, REPLACE, "d1", "{}", NULL, -1, &res));
        assert_json(path_get(res.twin, "tags"), "{}");
        ASSERT_EQ(json_object_size(path_get(res.twin, "properties.desired")), 2u); /* $metadata, $version */
        ASSERT_STREQ(e.desired_body, "{\"$version\":4}");
        result_done(&res);
        env_done(&e);
}

static void test_events_and_notifications(void) {
        struct env e;
        struct result res;
        size_t len;
        const char *body;
        const char *ts = "2023-11-14T22:13:20.0000000Z";
        char expected[1024];

        env_init(&e);
        add_device(&e, "dev1");
        change_ok(&e, DESIRED, "dev1", "{\"keep\":{\"me\":1}}");
        ASSERT_EQ(e.n_events, 1u);
        ASSERT_OK(change(&e, UPDATE, "dev1",
                         "{\"tags\":{\"site\":\"a\",\"old\":null},\"properties\":{\"desired\":{\"telemetry\":"
                         "{\"freq\":\"5m\"},\"route\":null,\"$version\":1}}}",
                         NULL, -1, &res));
        result_done(&res);
        ASSERT_EQ(e.n_events, 2u);
        struct hub_msg *m = e.last_event;
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE), "application/json");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONTENT_ENCODING), "utf-8");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_SOURCE), "twinChangeEvents");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_MESSAGE_SCHEMA), "twinChangeNotification");
        ASSERT_STREQ(hub_msg_get_sys(m, HUB_SYS_CONNECTION_DEVICE_ID), "dev1");
        ASSERT_NOT_NULL(hub_msg_get_sys(m, HUB_SYS_CORRELATION_ID));
        ASSERT_STREQ(hub_msg_get_prop(m, "deviceId", NULL), "dev1");
        ASSERT_STREQ(hub_msg_get_prop(m, "opType", NULL), "updateTwin");
        ASSERT_STREQ(hub_msg_get_prop(m, "operationTimestamp", NULL), ts);
        ASSERT_STREQ(hub_msg_get_prop(m, "iothub-message-schema", NULL), "twinChangeNotification");
        body = hub_msg_body(m, &len);
        snprintf(expected, sizeof expected,
                 "{\"version\":3,\"tags\":{\"site\":\"a\",\"old\":null},\"properties\":{\"desired\":{"
                 "\"telemetry\":{\"freq\":\"5m\"},\"route\":null,\"$metadata\":{\"$lastUpdated\":\"%s\","
                 "\"$lastUpdatedVersion\":3,\"telemetry\":{\"$lastUpdated\":\"%s\",\"$lastUpdatedVersion\":3,"
                 "\"freq\":{\"$lastUpdated\":\"%s\",\"$lastUpdatedVersion\":3}}},\"$version\":3}}}",
                 ts, ts, ts);
        if (len != strlen(expected) || memcmp(body, expected, len) != 0)
                TEST_FAIL("event body\n  got      %.*s\n  expected %s", (int) len, body, expected);

        /* desired notification: exactly the applied patch (nulls kept) + $version */
        ASSERT_EQ(e.n_desired, 2u);
        ASSERT_STREQ(e.desired_id, "dev1");
        ASSERT_STREQ(e.desired_body, "{\"telemetry\":{\"freq\":\"5m\"},\"route\":null,\"$version\":3}");
        ASSERT_EQ(e.desired_version, 3);

        /* tags only: event without properties, no desired notification */
        change_ok(&e, UPDATE, "dev1", "{\"tags\":{\"x\":1}}");
        ASSERT_EQ(e.n_desired, 2u);
        body = hub_msg_body(e.last_event, &len);
        ASSERT_TRUE(len == strlen("{\"version\":4,\"tags\":{\"x\":1}}") &&
                    memcmp(body, "{\"version\":4,\"tags\":{\"x\":1}}", len) == 0);

        /* reported change: event under properties.reported, no desired notification */
        change_ok(&e, REPORTED, "dev1", "{\"b\":5}");
        ASSERT_EQ(e.n_desired, 2u);
        ASSERT_EQ(e.n_events, 4u);
        body = hub_msg_body(e.last_event, &len);
        snprintf(expected, sizeof expected,
                 "{\"version\":5,\"properties\":{\"reported\":{\"b\":5,\"$metadata\":{\"$lastUpdated\":\"%s\","
                 "\"b\":{\"$lastUpdated\":\"%s\"}},\"$version\":2}}}",
                 ts, ts);
        if (len != strlen(expected) || memcmp(body, expected, len) != 0)
                TEST_FAIL("event body\n  got      %.*s\n  expected %s", (int) len, body, expected);

        /* failed changes emit nothing */
        ASSERT_ERR(change(&e, DESIRED, "dev1", "{\"a.b\":1}", NULL, -1, &res), -EINVAL);
        result_done(&res);
        ASSERT_EQ(e.n_events, 4u);
        ASSERT_EQ(e.n_desired, 2u);
        env_done(&e);
}

/* ---- limits --------------------------------------------------------------------------------- */

static json_t *nested(unsigned levels) {
        /* {"l1":{"l2":...{"lN":{"leaf":1}}}} : lN's object is at level N */
        json_t *j = json_pack("{s:i}", "leaf", 1);
        for (unsigned i = levels; i >= 1; i--) {
                char k[16];
                snprintf(k, sizeof k, "l%u", i);
                j = json_pack("{s:o}", k, j);
        }
        return j;
}

/* A section of exactly size bytes by the §6.2 measure: key "k" + a string of size-1 bytes
 * (or several keys when larger than a string may be). */
static json_t *sized(size_t size) {
        json_t *j = json_object();
        unsigned i = 0;
        while (size > 0) {
                char key[16];
                int kl = snprintf(key, sizeof key, "k%u", i++);
                size_t v = MIN(size - (size_t) kl, (size_t) HUB_TWIN_STRING_MAX);
                char *s = malloc(v + 1);
                memset(s, 'x', v);
                s[v] = '\0';
                json_object_set_new(j, key, json_string(s));
                free(s);
                size -= (size_t) kl + v;
        }
        return j;
}

static void check(const json_t *section, enum hub_twin_section which, int expected, const char *msg_part) {
        char err[HUB_TWIN_ERROR_MAX] = "";
        int r = hub_twin_check_limits(section, which, err, sizeof err);
        if (r != expected)
                TEST_FAIL("check_limits = %d (%s), expected %d", r, err, expected);
        if (msg_part && !strstr(err, msg_part))
                TEST_FAIL("message \"%s\" lacks \"%s\"", err, msg_part);
}

static void test_limits_pure(void) {
        json_t *j;
        char big[HUB_TWIN_KEY_MAX + 2];

        /* size: exactly at each limit OK, one more byte fails */
        const struct { enum hub_twin_section s; size_t limit; } sizes[] = {
                { HUB_TWIN_SECTION_TAGS, HUB_TWIN_TAGS_MAX },
                { HUB_TWIN_SECTION_DESIRED, HUB_TWIN_DESIRED_MAX },
                { HUB_TWIN_SECTION_REPORTED, HUB_TWIN_REPORTED_MAX },
        };
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                j = sized(sizes[i].limit);
                ASSERT_EQ(hub_twin_section_size(j), sizes[i].limit);
                check(j, sizes[i].s, 0, NULL);
                json_decref(j);
                j = sized(sizes[i].limit + 1);
                check(j, sizes[i].s, -E2BIG, "exceeds the limit");
                json_decref(j);
        }
        /* the §6.2 measure: numbers 8, booleans 4, control characters not counted */
        j = parse("{\"ab\":1,\"c\":true,\"d\":1.5,\"e\":\"x\\ny\",\"f\":{\"g\":[1,\"zz\"]},\"$version\":5}");
        ASSERT_EQ(hub_twin_section_size(j), (2 + 8) + (1 + 4) + (1 + 8) + (1 + 2) + (1 + 1 + 8 + 2));
        json_decref(j);
        /* local safeguard: control characters count nothing by §6.2 but their JSON encoding does */
        j = json_object();
        for (unsigned i = 0; i < 8; i++) {
                char key[8], *s = malloc(HUB_TWIN_STRING_MAX + 1);
                memset(s, '\x01', HUB_TWIN_STRING_MAX);
                s[HUB_TWIN_STRING_MAX] = '\0';
                snprintf(key, sizeof key, "k%u", i);
                json_object_set_new(j, key, json_string(s));
                free(s);
        }
        ASSERT_TRUE(hub_twin_section_size(j) < HUB_TWIN_DESIRED_MAX);
        check(j, HUB_TWIN_SECTION_DESIRED, -E2BIG, "JSON encoding");
        json_decref(j);

        /* depth: 10 levels OK, 11 fail; arrays count as levels */
        j = nested(10);
        check(j, HUB_TWIN_SECTION_DESIRED, 0, NULL);
        json_decref(j);
        j = nested(11);
        check(j, HUB_TWIN_SECTION_DESIRED, -E2BIG, "properties.desired.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.l11: nesting");
        json_decref(j);
        j = parse("{\"a\":[[[[[[[[[1]]]]]]]]]}"); /* the innermost array is at level 9 */
        check(j, HUB_TWIN_SECTION_TAGS, 0, NULL);
        json_decref(j);
        j = parse("{\"a\":[[[[[[[[[[[1]]]]]]]]]]]}");
        check(j, HUB_TWIN_SECTION_TAGS, -E2BIG, "tags.a[0][0][0][0][0][0][0][0][0]");
        json_decref(j);

        /* key length: 1024 bytes OK, 1025 fail */
        memset(big, 'k', HUB_TWIN_KEY_MAX);
        big[HUB_TWIN_KEY_MAX] = '\0';
        j = json_pack("{s:i}", big, 1);
        check(j, HUB_TWIN_SECTION_REPORTED, 0, NULL);
        json_decref(j);
        big[HUB_TWIN_KEY_MAX] = 'k';
        big[HUB_TWIN_KEY_MAX + 1] = '\0';
        j = json_pack("{s:{s:i}}", "p", big, 1);
        check(j, HUB_TWIN_SECTION_REPORTED, -E2BIG, "properties.reported.p.kkkk");
        check(j, HUB_TWIN_SECTION_REPORTED, -E2BIG, "key of 1025 bytes exceeds the limit of 1024 bytes");
        json_decref(j);

        /* string values: 4096 bytes OK, 4097 fail; multi-byte characters count in bytes */
        char *s = malloc(HUB_TWIN_STRING_MAX + 2);
        memset(s, 'v', HUB_TWIN_STRING_MAX);
        s[HUB_TWIN_STRING_MAX] = '\0';
        j = json_pack("{s:s}", "s", s);
        check(j, HUB_TWIN_SECTION_TAGS, 0, NULL);
        json_decref(j);
        s[HUB_TWIN_STRING_MAX] = 'v';
        s[HUB_TWIN_STRING_MAX + 1] = '\0';
        j = json_pack("{s:[s]}", "s", s);
        check(j, HUB_TWIN_SECTION_TAGS, -E2BIG, "tags.s[0]: string of 4097 bytes");
        json_decref(j);
        memset(s, 'v', HUB_TWIN_STRING_MAX);
        memcpy(s + HUB_TWIN_STRING_MAX - 2, "\xc3\xa9", 3); /* 4094 + 2 bytes + NUL */
        j = json_pack("{s:s}", "s", s);
        check(j, HUB_TWIN_SECTION_TAGS, 0, NULL);
        json_decref(j);
        free(s);

        /* integers */
        j = parse("{\"max\":4503599627370495,\"min\":-4503599627370496,\"real\":1e300}");
        check(j, HUB_TWIN_SECTION_DESIRED, 0, NULL);
        json_decref(j);
        j = parse("{\"a\":{\"n\":4503599627370496}}");
        check(j, HUB_TWIN_SECTION_DESIRED, -EINVAL, "properties.desired.a.n: integer 4503599627370496 outside");
        json_decref(j);
        j = parse("{\"n\":-4503599627370497}");
        check(j, HUB_TWIN_SECTION_DESIRED, -EINVAL, "properties.desired.n");
        json_decref(j);

        /* key names */
        const char *bad_keys[] = { "a.b", "a b", "$x", "a$", "tab\tkey", "del\x7f", "c1\xc2\x85", "" };
        for (size_t i = 0; i < ELEMENTSOF(bad_keys); i++) {
                j = json_pack("{s:i}", bad_keys[i], 1);
                check(j, HUB_TWIN_SECTION_TAGS, -EINVAL, "tags");
                json_decref(j);
        }
        j = json_pack("{s:i, s:i, s:i}", "caf\xc3\xa9", 1, "under_score-dash:colon", 2, "UPPER", 3);
        check(j, HUB_TWIN_SECTION_TAGS, 0, NULL);
        json_decref(j);
        /* stored sections never hold null or system keys */
        j = parse("{\"a\":null}");
        check(j, HUB_TWIN_SECTION_TAGS, -EINVAL, "tags.a");
        json_decref(j);
        j = parse("{\"$version\":1}");
        check(j, HUB_TWIN_SECTION_TAGS, -EINVAL, "reserved");
        json_decref(j);
        /* arrays are values: nulls and objects inside are fine */
        j = parse("{\"a\":[null,{\"b\":1},[true]]}");
        check(j, HUB_TWIN_SECTION_TAGS, 0, NULL);
        json_decref(j);
        j = parse("{\"a\":[{\"b.c\":1}]}");
        check(j, HUB_TWIN_SECTION_TAGS, -EINVAL, "tags.a[0].b.c: key contains '.'");
        json_decref(j);
}

static void test_patch_apply_pure(void) {
        char err[HUB_TWIN_ERROR_MAX];
        struct hub_twin_stamp st = { .time = "T1", .version = 2 };
        json_t *sec = parse("{\"a\":1,\"o\":{\"x\":1}}");
        json_t *meta = parse("{\"$lastUpdated\":\"T0\",\"a\":{\"$lastUpdated\":\"T0\"},"
                             "\"o\":{\"$lastUpdated\":\"T0\",\"x\":{\"$lastUpdated\":\"T0\"}}}");
        json_t *p;

        /* a failing patch leaves section and metadata untouched */
        p = parse("{\"a\":2,\"o\":{\"y\":4503599627370496}}");
        ASSERT_ERR(hub_twin_patch_apply(sec, meta, p, HUB_TWIN_SECTION_DESIRED, &st, err, sizeof err), -EINVAL);
        ASSERT_STREQ(err, "properties.desired.o.y: integer 4503599627370496 outside -4503599627370496 .. "
                          "4503599627370495");
        assert_json(sec, "{\"a\":1,\"o\":{\"x\":1}}");
        ASSERT_STREQ(path_str(meta, "a.$lastUpdated"), "T0");
        json_decref(p);

        /* result over the size limit: rejected, untouched */
        p = sized(HUB_TWIN_TAGS_MAX - 2);
        ASSERT_ERR(hub_twin_patch_apply(sec, NULL, p, HUB_TWIN_SECTION_TAGS, &st, err, sizeof err), -E2BIG);
        ASSERT_STREQ(err, "tags: size 8209 bytes exceeds the limit of 8192 bytes");
        assert_json(sec, "{\"a\":1,\"o\":{\"x\":1}}");
        json_decref(p);

        /* deleting keys makes room: the size is checked on the result */
        json_t *big = sized(HUB_TWIN_TAGS_MAX - 2);
        json_object_set_new(big, "a", json_null());
        json_object_set_new(big, "o", json_null());
        ASSERT_OK(hub_twin_patch_apply(sec, NULL, big, HUB_TWIN_SECTION_TAGS, &st, err, sizeof err));
        ASSERT_EQ(hub_twin_section_size(sec), HUB_TWIN_TAGS_MAX - 2);
        json_decref(big);

        /* metadata restricted to a patch */
        json_decref(sec);
        sec = parse("{\"a\":1,\"o\":{\"x\":1}}");
        p = parse("{\"o\":{\"y\":2},\"gone\":null}");
        ASSERT_OK(hub_twin_patch_apply(sec, meta, p, HUB_TWIN_SECTION_DESIRED, &st, err, sizeof err));
        json_t *r = hub_twin_meta_restrict(meta, p);
        assert_json(r, "{\"$lastUpdated\":\"T1\",\"$lastUpdatedVersion\":2,\"o\":{\"$lastUpdated\":\"T1\","
                       "\"$lastUpdatedVersion\":2,\"y\":{\"$lastUpdated\":\"T1\",\"$lastUpdatedVersion\":2}}}");
        ASSERT_STREQ(path_str(meta, "o.x.$lastUpdated"), "T0");
        json_decref(r);
        json_decref(p);

        /* the patch itself: depth and keys are checked even for deletions */
        p = parse("{\"a.b\":null}");
        ASSERT_ERR(hub_twin_check_patch(p, HUB_TWIN_SECTION_REPORTED, err, sizeof err), -EINVAL);
        json_decref(p);
        p = nested(11);
        ASSERT_ERR(hub_twin_patch_apply(sec, meta, p, HUB_TWIN_SECTION_DESIRED, &st, err, sizeof err), -E2BIG);
        json_decref(p);
        p = parse("[]");
        ASSERT_ERR(hub_twin_patch_apply(sec, meta, p, HUB_TWIN_SECTION_DESIRED, &st, err, sizeof err), -EINVAL);
        json_decref(p);
        json_decref(sec);
        json_decref(meta);
}

static void test_limits_through_store(void) {
        struct env e;
        struct result res;
        json_t *j, *body;
        char *s;

        env_init(&e);
        add_device(&e, "d1");
        /* desired exactly at 32 KB: accepted */
        j = sized(HUB_TWIN_DESIRED_MAX);
        body = json_pack("{s:{s:O}}", "properties", "desired", j);
        s = dump(body);
        ASSERT_OK(change(&e, UPDATE, "d1", s, NULL, -1, &res));
        result_done(&res);
        free(s);
        json_decref(body);
        /* one more byte: rejected, nothing written, no event */
        unsigned n = e.n_events;
        ASSERT_ERR(change(&e, DESIRED, "d1", "{\"z\":\"\"}", NULL, -1, &res), -E2BIG);
        ASSERT_STREQ(res.error, "properties.desired: size 32769 bytes exceeds the limit of 32768 bytes");
        result_done(&res);
        ASSERT_EQ(e.n_events, n);
        json_t *t = NULL;
        ASSERT_OK(hub_twin_get(e.twins, "d1", &t));
        ASSERT_EQ(path_int(t, "version"), 2);
        ASSERT_EQ(path_int(t, "properties.desired.$version"), 2);
        json_decref(t);
        json_decref(j);

        /* reported at the limit from the device; over it rejected */
        j = sized(HUB_TWIN_REPORTED_MAX);
        s = dump(j);
        ASSERT_OK(change(&e, REPORTED, "d1", s, NULL, -1, &res));
        result_done(&res);
        free(s);
        json_decref(j);
        ASSERT_ERR(change(&e, REPORTED, "d1", "{\"k0\":null,\"zz\":\"\",\"big\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                                              "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                                              "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                                              "\"}",
                                     NULL, -1, &res),
                   0); /* k0 (4096+2) deleted: fits */
        result_done(&res);

        /* tags: a 10-level document OK, 11 levels rejected with the path */
        j = nested(10);
        body = json_pack("{s:O}", "tags", j);
        s = dump(body);
        ASSERT_OK(change(&e, UPDATE, "d1", s, NULL, -1, &res));
        result_done(&res);
        free(s);
        json_decref(body);
        json_decref(j);
        ASSERT_ERR(change(&e, UPDATE, "d1", "{\"tags\":{\"l1\":{\"l2\":{\"l3\":{\"l4\":{\"l5\":{\"l6\":{\"l7\":"
                                            "{\"l8\":{\"l9\":{\"l10\":{\"deeper\":{}}}}}}}}}}}}}",
                          NULL, -1, &res),
                   -E2BIG);
        ASSERT_STREQ(res.error, "tags.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.deeper: nesting deeper than 10 levels");
        result_done(&res);
        env_done(&e);
}

/* ---- persistence, cascade, ordering, scan ---------------------------------------------- */

static void test_persistence_and_cascade(void) {
        struct env e;
        json_t *j = NULL;
        char *before, *after;

        env_init(&e);
        add_device(&e, "d1");
        add_device(&e, "d2");
        change_ok(&e, UPDATE, "d1", "{\"tags\":{\"a\":1},\"properties\":{\"desired\":{\"b\":[1,2]}}}");
        change_ok(&e, REPORTED, "d1", "{\"c\":{\"d\":true}}");
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        before = dump(j);
        json_decref(j);

        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        after = dump(j);
        json_decref(j);
        ASSERT_STREQ(before, after);
        free(before);
        free(after);

        /* deleting the device deletes the twin row; a new device of the same id starts afresh */
        ASSERT_OK(hub_registry_delete(e.reg, "d1", NULL));
        ASSERT_ERR(hub_twin_get(e.twins, "d1", &j), -ENOENT);
        {
                sqlite3 *db = hub_store_read_db(e.store);
                sqlite3_stmt *st;
                ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT COUNT(*) FROM twins WHERE device_id = 'd1'", -1, &st, NULL),
                          SQLITE_OK);
                ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
                ASSERT_EQ(sqlite3_column_int(st, 0), 0);
                sqlite3_finalize(st);
        }
        add_device(&e, "d1");
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        ASSERT_EQ(path_int(j, "version"), 1);
        ASSERT_EQ(json_object_size(json_object_get(j, "tags")), 0u);
        json_decref(j);
        env_done(&e);
}

static void test_ordering(void) {
        struct env e;
        struct result res[100];
        json_t *j = NULL;

        env_init(&e);
        add_device(&e, "d1");
        for (int i = 0; i < 100; i++) {
                char s[64];
                snprintf(s, sizeof s, "{\"n\":%d,\"k%d\":%d}", i, i, i);
                json_t *p = parse(s);
                memset(&res[i], 0, sizeof res[i]);
                ASSERT_OK(hub_twin_update_desired(e.twins, "d1", p, NULL, on_done, &res[i]));
                json_decref(p);
        }
        for (int i = 0; i < 100; i++) {
                wait_for(&e, &res[i]);
                ASSERT_OK(res[i].r);
                ASSERT_EQ(path_int(res[i].twin, "version"), i + 2);
                ASSERT_EQ(path_int(res[i].twin, "properties.desired.$version"), i + 2);
                ASSERT_EQ(path_int(res[i].twin, "properties.desired.n"), i);
                result_done(&res[i]);
        }
        ASSERT_EQ(e.n_desired, 100u);
        ASSERT_EQ(e.desired_version, 101);
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        ASSERT_EQ(path_int(j, "version"), 101);
        ASSERT_EQ(json_object_size(path_get(j, "properties.desired")), 101u + 2u);
        json_decref(j);

        /* freeing waits for submitted changes */
        json_t *p = parse("{\"last\":1}");
        ASSERT_OK(hub_twin_update_desired(e.twins, "d1", p, NULL, NULL, NULL));
        json_decref(p);
        e.twins = hub_twins_free(e.twins);
        ASSERT_OK(hub_twins_new(e.store, &e.clock.clock, NULL, &e.twins));
        ASSERT_OK(hub_twin_get(e.twins, "d1", &j));
        ASSERT_EQ(path_int(j, "version"), 102);
        json_decref(j);
        env_done(&e);
}

struct scan_ctx {
        unsigned n;
        char ids[8][32];
        int stop_after;
};

static int scan_cb(void *ud, const json_t *twin) {
        struct scan_ctx *c = ud;
        snprintf(c->ids[c->n % 8], sizeof c->ids[0], "%s", json_string_value(json_object_get(twin, "deviceId")));
        ASSERT_NOT_NULL(path_get(twin, "properties.desired.$metadata"));
        c->n++;
        return c->stop_after && (int) c->n >= c->stop_after ? 1 : 0;
}

static void test_scan(void) {
        struct env e;
        struct scan_ctx c = {};

        env_init(&e);
        add_device(&e, "c");
        add_device(&e, "a");
        add_device(&e, "b");
        change_ok(&e, UPDATE, "b", "{\"tags\":{\"site\":\"x\"}}");
        ASSERT_EQ(hub_twin_scan(e.twins, NULL, 10, scan_cb, &c), 3);
        ASSERT_STREQ(c.ids[0], "a");
        ASSERT_STREQ(c.ids[1], "b");
        ASSERT_STREQ(c.ids[2], "c");
        c = (struct scan_ctx) {};
        ASSERT_EQ(hub_twin_scan(e.twins, "a", 1, scan_cb, &c), 1);
        ASSERT_STREQ(c.ids[0], "b");
        c = (struct scan_ctx) { .stop_after = 2 };
        ASSERT_EQ(hub_twin_scan(e.twins, NULL, 10, scan_cb, &c), 2);
        c = (struct scan_ctx) {};
        ASSERT_EQ(hub_twin_scan(e.twins, "c", 10, scan_cb, &c), 0);
        ASSERT_ERR(hub_twin_scan(e.twins, NULL, 0, scan_cb, &c), -EINVAL);
        env_done(&e);
}

int main(void) {
        TEST_RUN(test_etag);
        TEST_RUN(test_initial_twin);
        TEST_RUN(test_identity_fields);
        TEST_RUN(test_merge_semantics);
        TEST_RUN(test_reported_rejected_from_service);
        TEST_RUN(test_versions_etags_metadata);
        TEST_RUN(test_replace);
        TEST_RUN(test_events_and_notifications);
        TEST_RUN(test_limits_pure);
        TEST_RUN(test_patch_apply_pure);
        TEST_RUN(test_limits_through_store);
        TEST_RUN(test_persistence_and_cascade);
        TEST_RUN(test_ordering);
        TEST_RUN(test_scan);
        return 0;
}
