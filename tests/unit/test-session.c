/* SPDX-License-Identifier: MIT */
/* Device sessions and direct methods on a real store, registry and outbox with a fake clock.
 * The test plays the protocol side with fake session ops. */

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "hub/clock.h"
#include "hub/method.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/store.h"
#include "store-internal.h"
#include "test-util.h"

#define T0 (UINT64_C(1700000000) * USEC_PER_SEC)
#define SEC USEC_PER_SEC

struct env {
        char dir[256];
        struct hub_fake_clock clock;
        struct hub_store *store;
        struct hub_registry *reg;
        struct hub_outbox *o;
        struct hub_sessions *hs;
        struct hub_methods *m;
};

/* The protocol side of one connection. */
struct conn {
        struct hub_session *s;
        unsigned n_close;
        int close_reason;
        char close_why[128];
        bool unregister_in_close;
        int method_rc;
        unsigned n_methods;
        char method_name[160], method_payload[256], rid[80];
        unsigned n_desired;
        int64_t desired_version;
};

static int op_c2d(void *ud, struct hub_msg *m, const char *lock_token) {
        (void) ud;
        (void) m;
        (void) lock_token;
        return 0;
}

static int op_desired(void *ud, const char *patch, int64_t version) {
        struct conn *c = ud;
        (void) patch;
        c->n_desired++;
        c->desired_version = version;
        return 0;
}

static int op_method(void *ud, const char *name, const char *payload, const char *rid) {
        struct conn *c = ud;
        if (c->method_rc < 0)
                return c->method_rc;
        c->n_methods++;
        snprintf(c->method_name, sizeof c->method_name, "%s", name);
        snprintf(c->method_payload, sizeof c->method_payload, "%s", payload);
        snprintf(c->rid, sizeof c->rid, "%s", rid);
        return 0;
}

static void op_close(void *ud, int reason, const char *why) {
        struct conn *c = ud;
        c->n_close++;
        c->close_reason = reason;
        snprintf(c->close_why, sizeof c->close_why, "%s", why);
        if (c->unregister_in_close) {
                hub_session_unregister(c->s);
                c->s = NULL;
        }
}

static const struct hub_session_ops ops = {
        .version = HUB_SESSION_OPS_VERSION,
        .deliver_c2d = op_c2d,
        .desired_patch = op_desired,
        .method_request = op_method,
        .close = op_close,
};

static void env_open(struct env *e) {
        char err[256] = "";
        struct hub_store_options so = { .dir = e->dir, .clock = &e->clock.clock, .errbuf = err, .errbuf_size = sizeof err };
        int r = hub_store_open(&so, &e->store);
        if (r < 0)
                TEST_FAIL("hub_store_open: %s: %s", strerror(-r), err);
        ASSERT_OK(hub_registry_new(e->store, &e->clock.clock, NULL, &e->reg));
        struct hub_outbox_options oo = { .store = e->store, .clock = &e->clock.clock, .boot_id = "b1" };
        ASSERT_OK(hub_outbox_new(&oo, &e->o));
        struct hub_sessions_options ho = {
                .store = e->store, .outbox = e->o, .clock = &e->clock.clock, .hub_name = "hub.example.net",
        };
        ASSERT_OK(hub_sessions_new(&ho, &e->hs));
        ASSERT_OK(hub_methods_new(e->hs, e->reg, &e->clock.clock, NULL, &e->m));
}

static void env_close(struct env *e) {
        e->m = hub_methods_free(e->m);
        e->hs = hub_sessions_free(e->hs);
        e->o = hub_outbox_free(e->o);
        e->reg = hub_registry_free(e->reg);
        e->store = hub_store_close(e->store);
}

static void mkdev(struct env *e, const char *id) {
        struct hub_device d;
        memset(&d, 0, sizeof d);
        snprintf(d.device_id, sizeof d.device_id, "%s", id);
        ASSERT_OK(hub_registry_create(e->reg, &d, NULL));
}

static void env_init(struct env *e) {
        memset(e, 0, sizeof *e);
        test_tmpdir(e->dir, sizeof e->dir);
        hub_fake_clock_init(&e->clock, T0);
        env_open(e);
        mkdev(e, "dev1");
        mkdev(e, "dev2");
}

static void env_done(struct env *e) {
        env_close(e);
        test_rmdir(e->dir);
}

/* Dispatches store completions until the outbox head reaches seq. */
static void settle(struct env *e, uint64_t head) {
        for (unsigned spins = 0; hub_outbox_head(e->o) < head; spins++) {
                struct pollfd p = { .fd = hub_store_get_fd(e->store), .events = POLLIN };
                if (spins > 10000)
                        TEST_FAIL("outbox head stuck at %" PRIu64 ", want %" PRIu64, hub_outbox_head(e->o), head);
                (void) poll(&p, 1, 100);
                (void) hub_store_dispatch(e->store);
        }
}

/* Dispatches whatever is queued (the registry writes) by a round trip through the store. */
static int noop_write(struct hub_store_txn *txn, void *ud) {
        (void) txn;
        (void) ud;
        return 0;
}
static void flush(struct env *e) {
        ASSERT_OK(hub_store_submit_wait(e->store, noop_write, NULL));
        (void) hub_store_dispatch(e->store);
}

struct event {
        char op[32], dev[64], mod[64], seqnum[80], source[64];
};

/* Reads connection-state events after `after`. */
static size_t read_events(struct env *e, uint64_t after, struct event *ev, size_t max) {
        struct hub_outbox_entry *v = NULL;
        size_t n = 0;

        ASSERT_OK(hub_events_read(e->o, after, max, NULL, &v, &n));
        for (size_t i = 0; i < n; i++) {
                size_t len;
                const char *body = hub_msg_body(v[i].msg, &len);
                json_t *j = json_loadb(body, len, 0, NULL);
                ASSERT_NOT_NULL(j);
                const char *sn = json_string_value(json_object_get(j, "sequenceNumber"));
                ASSERT_NOT_NULL(sn);
                snprintf(ev[i].seqnum, sizeof ev[i].seqnum, "%s", sn);
                json_decref(j);
                snprintf(ev[i].op, sizeof ev[i].op, "%s", hub_msg_get_prop(v[i].msg, "opType", NULL));
                snprintf(ev[i].dev, sizeof ev[i].dev, "%s", hub_msg_get_prop(v[i].msg, "deviceId", NULL));
                const char *mod = hub_msg_get_prop(v[i].msg, "moduleId", NULL);
                snprintf(ev[i].mod, sizeof ev[i].mod, "%s", mod ? mod : "");
                snprintf(ev[i].source, sizeof ev[i].source, "%s", hub_msg_get_sys(v[i].msg, HUB_SYS_MESSAGE_SOURCE));
                ASSERT_STREQ(hub_msg_get_sys(v[i].msg, HUB_SYS_MESSAGE_SCHEMA), "deviceConnectionStateNotification");
                ASSERT_STREQ(hub_msg_get_prop(v[i].msg, "iothub-message-schema", NULL), "deviceConnectionStateNotification");
                ASSERT_STREQ(hub_msg_get_prop(v[i].msg, "hubName", NULL), "hub.example.net");
                ASSERT_STREQ(hub_msg_get_sys(v[i].msg, HUB_SYS_USER_ID), "hub.example.net");
                ASSERT_STREQ(hub_msg_get_sys(v[i].msg, HUB_SYS_CONTENT_TYPE), "application/json");
                ASSERT_STREQ(hub_msg_get_sys(v[i].msg, HUB_SYS_CONNECTION_DEVICE_ID), ev[i].dev);
                ASSERT_NOT_NULL(hub_msg_get_prop(v[i].msg, "operationTimestamp", NULL));
                ASSERT_NOT_NULL(hub_msg_get_sys(v[i].msg, HUB_SYS_CORRELATION_ID));
                ASSERT_EQ(strlen(ev[i].seqnum), 64);
        }
        hub_outbox_entries_free(v, n);
        return n;
}

static struct hub_session *reg_conn(struct env *e, struct conn *c, const char *dev, const char *mod) {
        ASSERT_OK(hub_sessions_register(e->hs, dev, mod, NULL, &ops, c, &c->s));
        return c->s;
}

/* ---------------------------------------------------------------------------------------- */

static void test_register_unregister(void) {
        struct env e;
        struct conn c = { 0 };
        struct hub_device d;
        struct event ev[8];
        struct hub_sessions_stats st;

        env_init(&e);
        hub_fake_clock_advance(&e.clock, 5 * SEC);
        reg_conn(&e, &c, "dev1", NULL);
        ASSERT_TRUE(hub_sessions_find(e.hs, "dev1", NULL) == c.s);
        ASSERT_NULL(hub_sessions_find(e.hs, "dev2", NULL));
        ASSERT_NULL(hub_sessions_find(e.hs, "dev1", "m1"));
        ASSERT_STREQ(hub_session_device_id(c.s), "dev1");
        ASSERT_NULL(hub_session_module_id(c.s));
        ASSERT_TRUE(hub_session_userdata(c.s) == &c);
        settle(&e, 1);
        flush(&e);

        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d));
        ASSERT_EQ(d.connection_state, HUB_CONNECTED);
        ASSERT_EQ(d.connection_state_updated_usec, T0 + 5 * SEC);
        ASSERT_EQ(d.last_activity_usec, T0 + 5 * SEC);
        hub_device_done(&d);

        hub_sessions_get_stats(e.hs, &st);
        ASSERT_EQ(st.live, 1);
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_METHODS | HUB_SESSION_C2D));
        ASSERT_ERR(hub_session_set_capabilities(c.s, 1u << 10), -EINVAL);
        hub_sessions_get_stats(e.hs, &st);
        ASSERT_EQ(st.with_methods, 1);
        ASSERT_EQ(st.with_c2d, 1);
        ASSERT_EQ(st.with_desired, 0);

        /* Deliveries check the capability. */
        ASSERT_ERR(hub_sessions_deliver_desired(e.hs, "dev1", NULL, "{}", 2), -ENOTCONN);
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_DESIRED));
        ASSERT_OK(hub_sessions_deliver_desired(e.hs, "dev1", NULL, "{\"$version\":3}", 3));
        ASSERT_EQ(c.n_desired, 1);
        ASSERT_EQ(c.desired_version, 3);
        ASSERT_ERR(hub_sessions_deliver_desired(e.hs, "dev2", NULL, "{}", 2), -ENOTCONN);

        hub_fake_clock_advance(&e.clock, 3 * SEC);
        hub_session_unregister(c.s);
        ASSERT_NULL(hub_sessions_find(e.hs, "dev1", NULL));
        settle(&e, 2);
        flush(&e);
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d));
        ASSERT_EQ(d.connection_state, HUB_DISCONNECTED);
        ASSERT_EQ(d.connection_state_updated_usec, T0 + 8 * SEC);
        hub_device_done(&d);
        ASSERT_EQ(c.n_close, 0);

        ASSERT_EQ(read_events(&e, 0, ev, 8), 2);
        ASSERT_STREQ(ev[0].op, "deviceConnected");
        ASSERT_STREQ(ev[1].op, "deviceDisconnected");
        ASSERT_STREQ(ev[0].source, "deviceConnectionStateEvents");
        ASSERT_STREQ(ev[0].dev, "dev1");
        ASSERT_TRUE(strcmp(ev[0].seqnum, ev[1].seqnum) < 0);

        /* Module sessions: events carry the module; no registry row. */
        struct conn cm = { 0 };
        reg_conn(&e, &cm, "dev1", "mod1");
        ASSERT_STREQ(hub_session_module_id(cm.s), "mod1");
        settle(&e, 3);
        ASSERT_EQ(read_events(&e, 2, ev, 8), 1);
        ASSERT_STREQ(ev[0].mod, "mod1");
        ASSERT_TRUE(strcmp(ev[0].seqnum, "") > 0);

        /* Sequence numbers keep increasing across a restart, whatever the wall clock does. */
        char last[80];
        snprintf(last, sizeof last, "%s", ev[0].seqnum);
        env_close(&e); /* closes mod1's session: disconnected event */
        ASSERT_EQ(cm.n_close, 1);
        ASSERT_EQ(cm.close_reason, -ESHUTDOWN);
        hub_session_unregister(cm.s); /* detached: only freed */
        __atomic_store_n(&e.clock.realtime, T0 - 86400 * SEC, __ATOMIC_RELAXED);
        env_open(&e);
        uint64_t head = hub_outbox_head(e.o);
        ASSERT_EQ(head, 4);
        reg_conn(&e, &c, "dev2", NULL);
        settle(&e, head + 1);
        ASSERT_EQ(read_events(&e, 2, ev, 8), 3);
        ASSERT_STREQ(ev[1].op, "deviceDisconnected");
        ASSERT_STREQ(ev[2].op, "deviceConnected");
        ASSERT_TRUE(strcmp(last, ev[1].seqnum) < 0);
        ASSERT_TRUE(strcmp(ev[1].seqnum, ev[2].seqnum) < 0);
        hub_session_unregister(c.s);

        /* Bad input. */
        ASSERT_ERR(hub_sessions_register(e.hs, "bad/id", NULL, NULL, &ops, &c, &c.s), -EINVAL);
        struct hub_session_ops bad = ops;
        bad.version = 99;
        ASSERT_ERR(hub_sessions_register(e.hs, "dev1", NULL, NULL, &bad, &c, &c.s), -EINVAL);
        bad = ops;
        bad.close = NULL;
        ASSERT_ERR(hub_sessions_register(e.hs, "dev1", NULL, NULL, &bad, &c, &c.s), -EINVAL);
        env_done(&e);
}

static int mark_connected(struct hub_store_txn *txn, void *ud) {
        (void) ud;
        return sqlite3_exec(hub_store_txn_db(txn), "UPDATE devices SET connection_state = 1", NULL, NULL, NULL) ==
                               SQLITE_OK
                       ? 0
                       : -EIO;
}

static void test_restart_resets_registry(void) {
        struct env e;
        struct hub_device d;

        env_init(&e);
        /* What a crash leaves behind: devices marked connected. */
        ASSERT_OK(hub_store_submit_wait(e.store, mark_connected, NULL));
        ASSERT_OK(hub_registry_get(e.reg, "dev2", &d));
        ASSERT_EQ(d.connection_state, HUB_CONNECTED);
        hub_device_done(&d);
        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_registry_get(e.reg, "dev2", &d));
        ASSERT_EQ(d.connection_state, HUB_DISCONNECTED);
        hub_device_done(&d);
        env_done(&e);
}

static void test_takeover(void) {
        struct env e;
        struct conn a = { 0 }, b = { 0 };
        struct event ev[8];
        struct hub_sessions_stats st;

        env_init(&e);
        reg_conn(&e, &a, "dev1", NULL);
        struct hub_session *old = a.s;
        reg_conn(&e, &b, "dev1", NULL);
        ASSERT_EQ(a.n_close, 1);
        ASSERT_EQ(a.close_reason, -EEXIST);
        ASSERT_STREQ(a.close_why, "taken over by a new connection");
        ASSERT_FALSE(hub_session_is_live(old));
        ASSERT_TRUE(hub_sessions_find(e.hs, "dev1", NULL) == b.s);
        ASSERT_ERR(hub_session_set_capabilities(old, HUB_SESSION_C2D), -ENOTCONN);
        /* The old connection's protocol unregisters later: no further event. */
        hub_session_unregister(old);
        ASSERT_TRUE(hub_sessions_find(e.hs, "dev1", NULL) == b.s);
        settle(&e, 3);
        ASSERT_EQ(read_events(&e, 0, ev, 8), 3);
        ASSERT_STREQ(ev[0].op, "deviceConnected");
        ASSERT_STREQ(ev[1].op, "deviceDisconnected");
        ASSERT_STREQ(ev[2].op, "deviceConnected");
        hub_sessions_get_stats(e.hs, &st);
        ASSERT_EQ(st.taken_over, 1);
        ASSERT_EQ(st.live, 1);
        flush(&e);
        struct hub_device d;
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d));
        ASSERT_EQ(d.connection_state, HUB_CONNECTED);
        hub_device_done(&d);
        hub_session_unregister(b.s);
        env_done(&e);
}

static void test_close_device(void) {
        struct env e;
        struct conn d1 = { .unregister_in_close = true }, m1 = { 0 }, d2 = { 0 };

        env_init(&e);
        reg_conn(&e, &d1, "dev1", NULL);
        reg_conn(&e, &m1, "dev1", "m1");
        reg_conn(&e, &d2, "dev2", NULL);
        ASSERT_EQ(hub_sessions_close_device(e.hs, "dev1", -EPERM, "device disabled"), 2);
        ASSERT_EQ(d1.n_close, 1);
        ASSERT_NULL(d1.s); /* unregistered from inside close */
        ASSERT_EQ(m1.n_close, 1);
        ASSERT_EQ(m1.close_reason, -EPERM);
        ASSERT_STREQ(m1.close_why, "device disabled");
        ASSERT_EQ(d2.n_close, 0);
        ASSERT_NULL(hub_sessions_find(e.hs, "dev1", NULL));
        ASSERT_NULL(hub_sessions_find(e.hs, "dev1", "m1"));
        ASSERT_NOT_NULL(hub_sessions_find(e.hs, "dev2", NULL));
        ASSERT_EQ(hub_sessions_close_device(e.hs, "dev1", -EPERM, "again"), 0);
        hub_session_unregister(m1.s);
        hub_session_unregister(d2.s);
        settle(&e, 6);
        env_done(&e);
}

static void test_touch(void) {
        struct env e;
        struct conn c = { 0 };
        struct hub_device d;

        env_init(&e);
        reg_conn(&e, &c, "dev1", NULL);
        hub_fake_clock_advance(&e.clock, 5 * SEC);
        hub_session_touch(c.s); /* within 10 s of the last write: not written */
        flush(&e);
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d));
        ASSERT_EQ(d.last_activity_usec, T0);
        hub_device_done(&d);
        hub_fake_clock_advance(&e.clock, 6 * SEC);
        hub_session_touch(c.s);
        flush(&e);
        ASSERT_OK(hub_registry_get(e.reg, "dev1", &d));
        ASSERT_EQ(d.last_activity_usec, T0 + 11 * SEC);
        ASSERT_EQ(d.connection_state_updated_usec, T0);
        hub_device_done(&d);
        hub_session_unregister(c.s);
        env_done(&e);
}

/* ---- methods ------------------------------------------------------------------------------- */

struct call_result {
        unsigned n;
        int status;
        char payload[256];
        bool has_payload;
};

static void call_done(int status, const char *payload, void *ud) {
        struct call_result *r = ud;
        r->n++;
        r->status = status;
        r->has_payload = payload != NULL;
        snprintf(r->payload, sizeof r->payload, "%s", payload ? payload : "");
}

static uint64_t mono(struct env *e) {
        return hub_clock_mono(&e->clock.clock);
}

static void test_method_success_and_timeout(void) {
        struct env e;
        struct conn c = { 0 }, other = { 0 };
        struct call_result r = { 0 }, r2 = { 0 };
        const char *err = NULL;

        env_init(&e);
        reg_conn(&e, &c, "dev1", NULL);
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_METHODS));
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "reboot", "{\"delay\":5}", HUB_METHOD_TIMEOUT_DEFAULT,
                                    HUB_METHOD_TIMEOUT_DEFAULT, mono(&e), call_done, &r, &err));
        ASSERT_EQ(c.n_methods, 1);
        ASSERT_STREQ(c.method_name, "reboot");
        ASSERT_STREQ(c.method_payload, "{\"delay\":5}");
        ASSERT_TRUE(strlen(c.rid) >= 1 && strlen(c.rid) <= 64);
        for (const char *p = c.rid; *p; p++)
                ASSERT_TRUE((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '-');
        ASSERT_EQ(hub_method_next_deadline(e.m), mono(&e) + 30 * SEC);
        ASSERT_EQ(r.n, 0);

        /* Another device cannot answer it; an unknown rid is ignored. */
        reg_conn(&e, &other, "dev2", NULL);
        ASSERT_ERR(hub_method_response(e.m, other.s, c.rid, 200, "{}"), -ENOENT);
        ASSERT_ERR(hub_method_response(e.m, c.s, "nope", 200, "{}"), -ENOENT);
        ASSERT_EQ(r.n, 0);

        ASSERT_OK(hub_method_response(e.m, c.s, c.rid, 200, "{\"ok\":true}"));
        ASSERT_EQ(r.n, 1);
        ASSERT_EQ(r.status, 200);
        ASSERT_STREQ(r.payload, "{\"ok\":true}");
        ASSERT_ERR(hub_method_response(e.m, c.s, c.rid, 200, "{}"), -ENOENT); /* duplicate */
        ASSERT_EQ(hub_method_pending(e.m), 0);
        ASSERT_EQ(hub_method_next_deadline(e.m), UINT64_MAX);

        /* No body from the device. */
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "m", NULL, 5, 0, mono(&e), call_done, &r2, &err));
        ASSERT_STREQ(c.method_payload, "null");
        ASSERT_OK(hub_method_response(e.m, c.s, c.rid, 404, ""));
        ASSERT_EQ(r2.status, 404);
        ASSERT_FALSE(r2.has_payload);

        /* Response timeout. */
        r = (struct call_result) { 0 };
        uint64_t t = mono(&e);
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "slow", "1", 5, 0, t, call_done, &r, &err));
        ASSERT_EQ(hub_method_next_deadline(e.m), t + 5 * SEC);
        ASSERT_EQ(hub_method_tick(e.m, t + 4 * SEC), 0);
        ASSERT_EQ(r.n, 0);
        ASSERT_EQ(hub_method_tick(e.m, t + 5 * SEC), 1);
        ASSERT_EQ(r.n, 1);
        ASSERT_EQ(r.status, -ETIMEDOUT);
        /* A late answer is ignored. */
        ASSERT_ERR(hub_method_response(e.m, c.s, c.rid, 200, "{}"), -ENOENT);

        /* The session refusing the request now. */
        c.method_rc = -EAGAIN;
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "1", 5, 0, mono(&e), call_done, &r, &err), -EAGAIN);
        c.method_rc = 0;

        /* Shutdown fails what is pending. */
        r = (struct call_result) { 0 };
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "m", "1", 5, 0, mono(&e), call_done, &r, &err));
        e.m = hub_methods_free(e.m);
        ASSERT_EQ(r.status, -ESHUTDOWN);
        hub_session_unregister(c.s);
        hub_session_unregister(other.s);
        env_done(&e);
}

static void test_method_not_online(void) {
        struct env e;
        struct conn c = { 0 };
        struct call_result r = { 0 };
        const char *err = NULL;

        env_init(&e);
        /* Unknown device. */
        ASSERT_ERR(hub_method_invoke(e.m, "ghost", NULL, "m", "{}", 30, 0, mono(&e), call_done, &r, &err), -ENOENT);
        ASSERT_STREQ(err, "device not found");
        /* Known, not connected. */
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{}", 30, 0, mono(&e), call_done, &r, &err), -ENOTCONN);
        /* Connected, not subscribed to methods. */
        reg_conn(&e, &c, "dev1", NULL);
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_C2D | HUB_SESSION_DESIRED));
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{}", 30, 0, mono(&e), call_done, &r, &err), -ENOTCONN);
        ASSERT_STREQ(err, "the device is not subscribed to direct methods");
        /* A module session is another identity. */
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_METHODS));
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", "mod1", "m", "{}", 30, 0, mono(&e), call_done, &r, &err),
                   -ENOTCONN);
        ASSERT_EQ(r.n, 0);
        ASSERT_EQ(c.n_methods, 0);
        hub_session_unregister(c.s);
        env_done(&e);
}

static void test_method_connect_timeout(void) {
        struct env e;
        struct conn c = { 0 };
        struct call_result r = { 0 }, r2 = { 0 }, r3 = { 0 };
        const char *err = NULL;

        env_init(&e);
        uint64_t t = mono(&e);
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "wake", "{\"a\":1}", 10, 20, t, call_done, &r, &err));
        ASSERT_OK(hub_method_invoke(e.m, "dev2", NULL, "wake", "{}", 10, 3, t, call_done, &r3, &err));
        ASSERT_EQ(hub_method_next_deadline(e.m), t + 3 * SEC);
        ASSERT_EQ(hub_method_pending(e.m), 2);

        /* dev2 never connects: DeviceNotOnline after its connect timeout. */
        ASSERT_EQ(hub_method_tick(e.m, t + 3 * SEC), 1);
        ASSERT_EQ(r3.status, -ENOTCONN);

        /* dev1 connects, then subscribes: the call goes out, with a fresh response deadline. */
        hub_fake_clock_advance(&e.clock, 5 * SEC);
        reg_conn(&e, &c, "dev1", NULL);
        ASSERT_EQ(c.n_methods, 0);
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_METHODS));
        ASSERT_EQ(c.n_methods, 1);
        ASSERT_STREQ(c.method_name, "wake");
        ASSERT_EQ(hub_method_next_deadline(e.m), mono(&e) + 10 * SEC);
        ASSERT_OK(hub_method_response(e.m, c.s, c.rid, 201, "\"done\""));
        ASSERT_EQ(r.n, 1);
        ASSERT_EQ(r.status, 201);
        ASSERT_STREQ(r.payload, "\"done\"");

        /* Device drops mid-call. */
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "m", "[]", 30, 0, mono(&e), call_done, &r2, &err));
        hub_session_unregister(c.s);
        ASSERT_EQ(r2.n, 1);
        ASSERT_EQ(r2.status, -ECONNRESET);
        ASSERT_EQ(hub_method_pending(e.m), 0);

        /* Taken over mid-call: the old connection is gone too. */
        struct conn a = { 0 }, b = { 0 };
        r2 = (struct call_result) { 0 };
        reg_conn(&e, &a, "dev1", NULL);
        ASSERT_OK(hub_session_set_capabilities(a.s, HUB_SESSION_METHODS));
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "m", "[]", 30, 0, mono(&e), call_done, &r2, &err));
        reg_conn(&e, &b, "dev1", NULL);
        ASSERT_EQ(r2.status, -ECONNRESET);
        hub_session_unregister(a.s);
        hub_session_unregister(b.s);
        env_done(&e);
}

static void test_method_bad_input(void) {
        struct env e;
        struct conn c = { 0 };
        struct call_result r = { 0 };
        const char *err = NULL;
        char longname[200];

        env_init(&e);
        reg_conn(&e, &c, "dev1", NULL);
        ASSERT_OK(hub_session_set_capabilities(c.s, HUB_SESSION_METHODS));
        uint64_t t = mono(&e);

        static const char *const bad_names[] = { "", "a b", "a\tb", "$m", "a(b", "a)b", "a<b", "a>b", "a@b", "a,b",
                                                 "a;b", "a:b", "a\\b", "a\"b", "a/b", "a[b", "a]b", "a?b", "a=b",
                                                 "a{b", "a}b", "caf\xc3\xa9", "a\x7f" };
        for (size_t i = 0; i < ELEMENTSOF(bad_names); i++) {
                err = NULL;
                ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, bad_names[i], "{}", 30, 0, t, call_done, &r, &err),
                           -EINVAL);
                ASSERT_NOT_NULL(err);
        }
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, NULL, "{}", 30, 0, t, call_done, &r, &err), -EINVAL);
        memset(longname, 'a', 129);
        longname[129] = 0;
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, longname, "{}", 30, 0, t, call_done, &r, &err), -EINVAL);
        longname[128] = 0;
        ASSERT_TRUE(hub_method_name_valid(longname));
        ASSERT_TRUE(hub_method_name_valid("get-Status_1.2!#%&*+'^`|~"));

        /* Timeouts. */
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{}", 4, 0, t, call_done, &r, &err), -EINVAL);
        ASSERT_STREQ(err, "responseTimeoutInSeconds must be between 5 and 300");
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{}", 301, 0, t, call_done, &r, &err), -EINVAL);
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{}", 30, 301, t, call_done, &r, &err), -EINVAL);
        ASSERT_STREQ(err, "connectTimeoutInSeconds must be between 0 and 300");
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{}", 30, -2, t, call_done, &r, &err), -EINVAL);

        /* Payloads: JSON of at most 128 KB. */
        size_t big = HUB_METHOD_PAYLOAD_MAX + 1;
        char *p = malloc(big + 1);
        ASSERT_NOT_NULL(p);
        p[0] = '"';
        memset(p + 1, 'x', big - 2);
        p[big - 1] = '"';
        p[big] = 0;
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", p, 30, 0, t, call_done, &r, &err), -EINVAL);
        ASSERT_STREQ(err, "payload is larger than 128 KB");
        /* Exactly 128 KB is fine. */
        p[big - 2] = '"';
        p[big - 1] = 0;
        ASSERT_OK(hub_method_invoke(e.m, "dev1", NULL, "m", p, 30, 0, t, call_done, &r, &err));
        /* An oversize answer fails the call. */
        p[big - 2] = 'x';
        p[big - 1] = '"';
        ASSERT_ERR(hub_method_response(e.m, c.s, c.rid, 200, p), -E2BIG);
        ASSERT_EQ(r.status, -E2BIG);
        free(p);
        ASSERT_ERR(hub_method_invoke(e.m, "dev1", NULL, "m", "{bad", 30, 0, t, call_done, &r, &err), -EINVAL);
        ASSERT_STREQ(err, "payload is not valid JSON");
        ASSERT_ERR(hub_method_invoke(e.m, "bad/id", NULL, "m", "{}", 30, 0, t, call_done, &r, &err), -EINVAL);
        ASSERT_ERR(hub_method_response(e.m, c.s, c.rid, -1, "{}"), -EINVAL);
        ASSERT_EQ(c.n_methods, 1);
        hub_session_unregister(c.s);
        env_done(&e);
}

int main(void) {
        TEST_RUN(test_register_unregister);
        TEST_RUN(test_restart_resets_registry);
        TEST_RUN(test_takeover);
        TEST_RUN(test_close_device);
        TEST_RUN(test_touch);
        TEST_RUN(test_method_success_and_timeout);
        TEST_RUN(test_method_not_online);
        TEST_RUN(test_method_connect_timeout);
        TEST_RUN(test_method_bad_input);
        return 0;
}
