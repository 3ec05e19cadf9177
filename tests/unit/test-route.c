/* SPDX-License-Identifier: MIT */
/* Routing: route names and sources, conditions on properties / $body / $twin, the fallback
 * route, non-telemetry sources, one delivery per endpoint, enrichments and their limits. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/msg.h"
#include "hub/route.h"
#include "test-util.h"

static struct hub_msg *mkmsg(const char *body, const char *ct, const char *ce) {
        struct hub_msg *m = NULL;
        ASSERT_OK(hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "dev1"));
        if (ct)
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, ct));
        if (ce)
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, ce));
        return m;
}

static uint64_t route_of(struct hub_router *r, struct hub_msg *m, const json_t *twin, unsigned *matched) {
        struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(m, twin);
        uint64_t set = hub_router_route(r, &ctx, matched);
        hub_cond_ctx_done(&ctx);
        return set;
}

static uint64_t bit(struct hub_router *r, const char *ep) {
        int i = hub_router_endpoint_index(r, ep);
        ASSERT_TRUE(i >= 0);
        return UINT64_C(1) << i;
}

static void add(struct hub_router *r, const char *name, enum hub_route_source src, const char *cond, const char *ep,
                bool enabled) {
        const char *eps[] = { ep };
        struct hub_route_def d = { name, src, cond, eps, 1, enabled };
        struct hub_query_error err;
        int k = hub_router_add_route(r, &d, &err);
        if (k < 0)
                TEST_FAIL("add_route(%s): %d %s", name, k, k == -EBADMSG ? err.message : "");
}

static void test_names_sources(void) {
        enum hub_route_source s;
        ASSERT_TRUE(hub_route_name_is_valid("alerts.v1_a-b"));
        ASSERT_FALSE(hub_route_name_is_valid(""));
        ASSERT_FALSE(hub_route_name_is_valid("a b"));
        ASSERT_FALSE(hub_route_name_is_valid("$fallback"));
        char longname[66];
        memset(longname, 'a', 65);
        longname[65] = 0;
        ASSERT_FALSE(hub_route_name_is_valid(longname));
        longname[64] = 0;
        ASSERT_TRUE(hub_route_name_is_valid(longname));

        ASSERT_OK(hub_route_source_from_string("TwinChangeEvents", &s));
        ASSERT_EQ(s, HUB_ROUTE_SOURCE_TWIN_CHANGE_EVENTS);
        ASSERT_ERR(hub_route_source_from_string("devicemessages", &s), -EINVAL);
        ASSERT_STREQ(hub_route_source_to_string(HUB_ROUTE_SOURCE_DEVICE_CONNECTION_STATE_EVENTS),
                     "DeviceConnectionStateEvents");

        _cleanup_(hub_msg_unrefp) struct hub_msg *m = mkmsg("x", NULL, NULL);
        ASSERT_OK(hub_route_source_of_msg(m, &s));
        ASSERT_EQ(s, HUB_ROUTE_SOURCE_DEVICE_MESSAGES);
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "deviceLifecycleEvents"));
        ASSERT_OK(hub_route_source_of_msg(m, &s));
        ASSERT_EQ(s, HUB_ROUTE_SOURCE_DEVICE_LIFECYCLE_EVENTS);
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "somethingElse"));
        ASSERT_ERR(hub_route_source_of_msg(m, &s), -EINVAL);
}

static void test_add_errors(void) {
        _cleanup_(hub_router_freep) struct hub_router *r = NULL;
        struct hub_query_error err;
        const char *eps[] = { "ep1" };
        ASSERT_OK(hub_router_new("hub.example.net", &r));

        struct hub_route_def d = { "r1", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, "level = 'x' AND", eps, 1, true };
        ASSERT_ERR(hub_router_add_route(r, &d, &err), -EBADMSG);
        ASSERT_EQ(err.line, 1);
        ASSERT_TRUE(err.column >= 15);
        ASSERT_EQ(hub_router_n_routes(r), 0);

        d.condition = "level = 'x'";
        ASSERT_OK(hub_router_add_route(r, &d, &err));
        ASSERT_ERR(hub_router_add_route(r, &d, &err), -EEXIST);
        d.name = "bad name";
        ASSERT_ERR(hub_router_add_route(r, &d, &err), -EINVAL);
        d.name = "r2";
        d.n_endpoints = 0;
        ASSERT_ERR(hub_router_add_route(r, &d, &err), -EINVAL);
        const char *bad_ep[] = { "a/b" };
        d.endpoints = bad_ep;
        d.n_endpoints = 1;
        ASSERT_ERR(hub_router_add_route(r, &d, &err), -EINVAL);

        /* Enrichment values. */
        struct hub_enrichment_def en = { "site", "$twin.tags.site", eps, 1 };
        ASSERT_OK(hub_router_add_enrichment(r, &en));
        ASSERT_ERR(hub_router_add_enrichment(r, &en), -EEXIST);
        en.key = "k2";
        en.value = "$twin.deviceId";
        ASSERT_ERR(hub_router_add_enrichment(r, &en), -EINVAL);
        en.value = "$body.x";
        ASSERT_ERR(hub_router_add_enrichment(r, &en), -EINVAL);
        en.value = "$twin.tags.";
        ASSERT_ERR(hub_router_add_enrichment(r, &en), -EINVAL);
        en.key = "bad key";
        en.value = "static";
        ASSERT_ERR(hub_router_add_enrichment(r, &en), -EINVAL);
        for (unsigned i = 1; i < HUB_ROUTER_MAX_ENRICHMENTS; i++) {
                char key[16];
                snprintf(key, sizeof key, "k%u", i);
                en.key = key;
                ASSERT_OK(hub_router_add_enrichment(r, &en));
        }
        en.key = "one-too-many";
        ASSERT_ERR(hub_router_add_enrichment(r, &en), -E2BIG);
}

static void test_routing(void) {
        _cleanup_(hub_router_freep) struct hub_router *r = NULL;
        unsigned matched;
        ASSERT_OK(hub_router_new("hub.example.net", &r));
        add(r, "alarms", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, "severity = 'high'", "alarmq", true);
        add(r, "hot", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, "$body.temp > 30", "alarmq", true);
        add(r, "site", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, "$twin.tags.site = 'berlin'", "berlin", true);
        add(r, "off", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, "true", "disabledep", false);
        add(r, "twins", HUB_ROUTE_SOURCE_TWIN_CHANGE_EVENTS, NULL, "twinlog", true);
        ASSERT_TRUE(hub_router_needs_twin(r));
        ASSERT_EQ(hub_router_route(r, NULL, NULL), 0);

        json_t *twin = json_pack("{s:{s:s}}", "tags", "site", "berlin");
        ASSERT_NOT_NULL(twin);

        /* By application property (names case-insensitive), both routes to alarmq: once. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m1 = mkmsg("{\"temp\": 35}", "application/json", "utf-8");
        ASSERT_OK(hub_msg_set_prop(m1, "Severity", "high"));
        ASSERT_EQ(route_of(r, m1, NULL, &matched), bit(r, "alarmq"));
        ASSERT_EQ(matched, 2);
        /* With the twin: also the berlin endpoint. */
        ASSERT_EQ(route_of(r, m1, twin, &matched), bit(r, "alarmq") | bit(r, "berlin"));
        ASSERT_EQ(matched, 3);

        /* $body only under the content type / encoding rule. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m2 = mkmsg("{\"temp\": 35}", "application/json", NULL);
        ASSERT_EQ(route_of(r, m2, NULL, &matched), bit(r, "events")); /* no match: fallback */
        ASSERT_EQ(matched, 0);
        _cleanup_(hub_msg_unrefp) struct hub_msg *m3 = mkmsg("{\"temp\": 35}", "application/json; charset=utf-8",
                                                              "UTF-8");
        ASSERT_EQ(route_of(r, m3, NULL, NULL), bit(r, "alarmq"));
        _cleanup_(hub_msg_unrefp) struct hub_msg *m4 = mkmsg("{\"temp\": 35}", "text/plain", "utf-8");
        ASSERT_EQ(route_of(r, m4, NULL, NULL), bit(r, "events"));
        /* Not JSON at all: undefined, no match, fallback. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m5 = mkmsg("{temp", "application/json", "utf-8");
        ASSERT_EQ(route_of(r, m5, NULL, NULL), bit(r, "events"));
        /* Undefined comparison: a missing property never matches (no NOT trick either). */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m6 = mkmsg("{\"temp\": 20}", "application/json", "utf-8");
        ASSERT_EQ(route_of(r, m6, twin, NULL), bit(r, "berlin"));

        /* Non-telemetry: only routes of that source; never the fallback. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *t = mkmsg("{}", "application/json", "utf-8");
        ASSERT_OK(hub_msg_set_sys(t, HUB_SYS_MESSAGE_SOURCE, "twinChangeEvents"));
        ASSERT_OK(hub_msg_set_prop(t, "severity", "high"));
        ASSERT_EQ(route_of(r, t, twin, NULL), bit(r, "twinlog"));
        _cleanup_(hub_msg_unrefp) struct hub_msg *c = mkmsg("{}", "application/json", "utf-8");
        ASSERT_OK(hub_msg_set_sys(c, HUB_SYS_MESSAGE_SOURCE, "deviceConnectionStateEvents"));
        ASSERT_EQ(route_of(r, c, twin, NULL), 0);

        /* Fallback disabled: unmatched telemetry goes nowhere. */
        ASSERT_OK(hub_router_set_fallback(r, false, NULL, 0));
        ASSERT_EQ(route_of(r, m2, NULL, NULL), 0);
        /* Fallback to another endpoint. */
        const char *fb[] = { "archive" };
        ASSERT_OK(hub_router_set_fallback(r, true, fb, 1));
        ASSERT_EQ(route_of(r, m2, NULL, NULL), bit(r, "archive"));
        /* A disabled route does not count as a match. */
        ASSERT_EQ(hub_router_endpoint_index(r, "nowhere"), -ENOENT);
        json_decref(twin);
}

static void test_enrich(void) {
        _cleanup_(hub_router_freep) struct hub_router *r = NULL;
        const char *both[] = { "events", "ep2" }, *ep2[] = { "ep2" };
        ASSERT_OK(hub_router_new("myhub.example.net", &r));
        struct hub_enrichment_def e1 = { "site", "$twin.tags.site", both, 2 };
        struct hub_enrichment_def e2 = { "hub", "$iothubname", ep2, 1 };
        struct hub_enrichment_def e3 = { "fixed", "static value", ep2, 1 };
        struct hub_enrichment_def e4 = { "cfg", "$twin.properties.desired.cfg", ep2, 1 };
        ASSERT_OK(hub_router_add_enrichment(r, &e1));
        ASSERT_OK(hub_router_add_enrichment(r, &e2));
        ASSERT_OK(hub_router_add_enrichment(r, &e3));
        ASSERT_OK(hub_router_add_enrichment(r, &e4));
        ASSERT_TRUE(hub_router_needs_twin(r));

        json_t *twin = json_pack("{s:{s:s}, s:{s:{s:{s:i}}}}", "tags", "site", "berlin", "properties", "desired",
                                 "cfg", "rate", 5);
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = mkmsg("x", NULL, NULL);
        struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(m, twin);
        ASSERT_EQ(hub_router_enrich(r, "ep2", m, &ctx), 4);
        hub_cond_ctx_done(&ctx);
        ASSERT_STREQ(hub_msg_get_prop(m, "site", NULL), "berlin");
        ASSERT_STREQ(hub_msg_get_prop(m, "hub", NULL), "myhub.example.net");
        ASSERT_STREQ(hub_msg_get_prop(m, "fixed", NULL), "static value");
        ASSERT_STREQ(hub_msg_get_prop(m, "cfg", NULL), "{\"rate\":5}");

        /* events gets only "site"; without a twin the literal path is stamped. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m2 = mkmsg("x", NULL, NULL);
        struct hub_cond_ctx ctx2 = HUB_COND_CTX_INIT(m2, NULL);
        ASSERT_EQ(hub_router_enrich(r, "events", m2, &ctx2), 1);
        ASSERT_STREQ(hub_msg_get_prop(m2, "site", NULL), "$twin.tags.site");
        ASSERT_EQ(hub_msg_n_props(m2), 1);
        /* An endpoint without enrichments. */
        ASSERT_EQ(hub_router_enrich(r, "other", m2, &ctx2), 0);
        hub_cond_ctx_done(&ctx2);

        /* 256 KB after enrichment: refused. */
        size_t big = HUB_MSG_D2C_MAX_SIZE - 20;
        char *body = malloc(big + 1);
        ASSERT_NOT_NULL(body);
        memset(body, 'a', big);
        body[big] = 0;
        _cleanup_(hub_msg_unrefp) struct hub_msg *m3 = mkmsg(body, NULL, NULL);
        free(body);
        struct hub_cond_ctx ctx3 = HUB_COND_CTX_INIT(m3, twin);
        ASSERT_ERR(hub_router_enrich(r, "ep2", m3, &ctx3), -E2BIG);
        hub_cond_ctx_done(&ctx3);
        json_decref(twin);
}

/* Routes with no condition or the literal `true` match without an evaluation; anything that
 * only looks like it is still evaluated. */
static void test_always(void) {
        static const struct {
                const char *cond;
                bool match;
        } cases[] = {
                { NULL, true },           { "", true },           { "true", true },         { " TRUE ", true },
                { "((true))", true },     { "\ttrue\n", true },   { "false", false },       { "true AND false", false },
                { "NOT true", false },    { "(true) AND false", false }, { "true OR false", true },
                { "x = 'true'", false },  { "trueish = 1", false },
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
                _cleanup_(hub_router_freep) struct hub_router *r = NULL;
                unsigned matched = 0;
                ASSERT_OK(hub_router_new("hub.example.net", &r));
                add(r, "r1", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, cases[i].cond, "ep", true);
                add(r, "off", HUB_ROUTE_SOURCE_DEVICE_MESSAGES, cases[i].cond, "offep", false);
                _cleanup_(hub_msg_unrefp) struct hub_msg *m = mkmsg("{}", NULL, NULL);
                uint64_t set = route_of(r, m, NULL, &matched);
                if (set != (cases[i].match ? bit(r, "ep") : bit(r, "events")))
                        TEST_FAIL("condition \"%s\": set %llx", cases[i].cond ? cases[i].cond : "(none)",
                                  (unsigned long long) set);
                ASSERT_EQ(matched, cases[i].match ? 1u : 0u);
                /* Still only its own source. */
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "twinChangeEvents"));
                ASSERT_EQ(route_of(r, m, NULL, NULL), 0);
                /* No enrichment for ep: the message is left as it is. */
                struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(m, NULL);
                ASSERT_EQ(hub_router_enrich(r, "ep", m, &ctx), 0);
                hub_cond_ctx_done(&ctx);
                ASSERT_EQ(hub_msg_n_props(m), 0);
        }
}

int main(void) {
        TEST_RUN(test_always);
        TEST_RUN(test_names_sources);
        TEST_RUN(test_add_errors);
        TEST_RUN(test_routing);
        TEST_RUN(test_enrich);
        return 0;
}
