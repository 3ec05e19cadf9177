/* SPDX-License-Identifier: MIT */
/* Cloud-to-device queues and feedback (reference §7, §5.7) on a real store in a temporary
 * directory with a fake clock: FIFO order, locks, abandon / reject / complete, delivery
 * count, expiry, depth and size limits, purge, device deletion, feedback records and their
 * batching, the feedback queue, persistence across reopen, c2d_count and the hooks. */

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/queue.h"
#include "hub/registry.h"
#include "hub/store.h"
#include "test-util.h"

#define T0 (UINT64_C(1700000000) * USEC_PER_SEC)
#define SEC USEC_PER_SEC
#define MINUTE (60 * SEC)
#define HOUR (60 * MINUTE)

struct env {
        char dir[256];
        struct hub_fake_clock clock;
        struct hub_store *store;
        struct hub_registry *reg;
        struct hub_queue *q;
        struct hub_queue_options opts;
        /* hooks seen */
        unsigned n_available, n_fb_available;
        char last_available[HUB_DEVICE_ID_MAX + 1];
};

static void on_available(void *ud, const char *device_id) {
        struct env *e = ud;
        e->n_available++;
        snprintf(e->last_available, sizeof e->last_available, "%s", device_id);
}

static void on_fb_available(void *ud) {
        struct env *e = ud;
        e->n_fb_available++;
}

static void env_open(struct env *e) {
        char err[256] = "";
        struct hub_store_options o = {
                .dir = e->dir,
                .clock = &e->clock.clock,
                .errbuf = err,
                .errbuf_size = sizeof err,
        };
        struct hub_queue_hooks h = {
                .on_available = on_available,
                .on_feedback_available = on_fb_available,
                .userdata = e,
        };
        int r = hub_store_open(&o, &e->store);
        if (r < 0)
                TEST_FAIL("hub_store_open: %s: %s", strerror(-r), err);
        ASSERT_OK(hub_registry_new(e->store, &e->clock.clock, NULL, &e->reg));
        ASSERT_OK(hub_queue_new(e->store, &e->opts, &h, NULL, &e->q));
}

static void env_close(struct env *e) {
        e->q = hub_queue_free(e->q);
        e->reg = hub_registry_free(e->reg);
        e->store = hub_store_close(e->store);
}

static void env_init_opts(struct env *e, const struct hub_queue_options *o) {
        memset(e, 0, sizeof *e);
        if (o)
                e->opts = *o;
        test_tmpdir(e->dir, sizeof e->dir);
        hub_fake_clock_init(&e->clock, T0);
        env_open(e);
}

static void env_init(struct env *e) {
        env_init_opts(e, NULL);
}

static void env_done(struct env *e) {
        env_close(e);
        test_rmdir(e->dir);
}

static uint64_t now(struct env *e) {
        return hub_clock_now(&e->clock.clock);
}

static void advance(struct env *e, uint64_t usec) {
        hub_fake_clock_advance(&e->clock, usec);
}

static void add_device(struct env *e, const char *id) {
        struct hub_device d;
        memset(&d, 0, sizeof d);
        snprintf(d.device_id, sizeof d.device_id, "%s", id);
        ASSERT_OK(hub_registry_create(e->reg, &d, NULL));
        hub_device_done(&d);
}

static uint32_t c2d_count(struct env *e, const char *id) {
        struct hub_device d;
        ASSERT_OK(hub_registry_get(e->reg, id, &d));
        uint32_t n = d.c2d_count;
        hub_device_done(&d);
        return n;
}

static uint64_t depth(struct env *e, const char *id) {
        uint64_t n = 0;
        ASSERT_OK(hub_queue_depth(e->q, id, &n));
        ASSERT_EQ(c2d_count(e, id), n); /* cloudToDeviceMessageCount kept equal */
        return n;
}

/* Runs completions until *flag is set. */
static void wait_for(struct env *e, const bool *flag) {
        for (int i = 0; i < 10000 && !*flag; i++) {
                struct pollfd p = { .fd = hub_store_get_fd(e->store), .events = POLLIN };
                (void) poll(&p, 1, 10);
                (void) hub_store_dispatch(e->store);
        }
        ASSERT_TRUE(*flag);
}

/* ---- synchronous wrappers -------------------------------------------------------------------- */

struct res {
        bool done;
        int r;
        uint64_t n;
        bool got;
        char token[64];
        uint64_t seq;
        uint32_t dc;
        uint64_t enqueued, expiry, lock_until;
        struct hub_msg *msg;
};

static void res_done(struct res *x) {
        x->msg = hub_msg_unref(x->msg);
}

static void send_cb(int r, uint64_t seq, void *ud) {
        struct res *x = ud;
        x->r = r;
        x->seq = seq;
        x->done = true;
}

static void recv_cb(int r, const struct hub_queue_delivery *d, void *ud) {
        struct res *x = ud;
        x->r = r;
        x->got = d != NULL;
        if (d) {
                snprintf(x->token, sizeof x->token, "%s", d->lock_token);
                x->seq = d->sequence_number;
                x->dc = d->delivery_count;
                x->enqueued = d->enqueued_usec;
                x->expiry = d->expiry_usec;
                x->lock_until = d->lock_until_usec;
                x->msg = hub_msg_ref(d->msg);
        }
        x->done = true;
}

static void plain_cb(int r, void *ud) {
        struct res *x = ud;
        x->r = r;
        x->done = true;
}

static void count_cb(int r, uint64_t n, void *ud) {
        struct res *x = ud;
        x->r = r;
        x->n = n;
        x->done = true;
}

static struct hub_msg *mk(const char *body, const char *mid, const char *ack) {
        struct hub_msg *m = NULL;
        ASSERT_OK(hub_msg_new(body, strlen(body), HUB_MSG_C2D_MAX_SIZE, &m));
        if (mid)
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, mid));
        if (ack)
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_ACK, ack));
        return m;
}

/* Sends; returns the completion's result, sequence number in *ret_seq. */
static int send_msg(struct env *e, const char *dev, struct hub_msg *m, uint64_t *ret_seq) {
        struct res x = { 0 };
        int r = hub_queue_send(e->q, dev, m, now(e), send_cb, &x);
        if (r < 0)
                return r;
        wait_for(e, &x.done);
        if (ret_seq)
                *ret_seq = x.seq;
        return x.r;
}

static uint64_t send_ok(struct env *e, const char *dev, const char *body, const char *mid, const char *ack) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = mk(body, mid, ack);
        uint64_t seq = 0;
        ASSERT_OK(send_msg(e, dev, m, &seq));
        return seq;
}

static struct res receive(struct env *e, const char *dev, uint64_t lock) {
        struct res x = { 0 };
        ASSERT_OK(hub_queue_receive(e->q, dev, lock, now(e), recv_cb, &x));
        wait_for(e, &x.done);
        return x;
}

static struct res receive_ok(struct env *e, const char *dev) {
        struct res x = receive(e, dev, 0);
        ASSERT_OK(x.r);
        ASSERT_TRUE(x.got);
        return x;
}

static void receive_none(struct env *e, const char *dev) {
        struct res x = receive(e, dev, 0);
        ASSERT_OK(x.r);
        ASSERT_FALSE(x.got);
}

static const char *body_of(const struct res *x, char *buf, size_t n) {
        size_t len = 0;
        const void *b = hub_msg_body(x->msg, &len);
        snprintf(buf, n, "%.*s", (int) len, (const char *) b);
        return buf;
}

typedef int (*settle_fn)(struct hub_queue *, const char *, const char *, uint64_t, hub_queue_done_fn, void *);

static int settle(struct env *e, settle_fn fn, const char *dev, const char *token) {
        struct res x = { 0 };
        ASSERT_OK(fn(e->q, dev, token, now(e), plain_cb, &x));
        wait_for(e, &x.done);
        return x.r;
}

static void tick(struct env *e) {
        struct res x = { 0 };
        ASSERT_OK(hub_queue_tick(e->q, now(e), plain_cb, &x));
        wait_for(e, &x.done);
        ASSERT_OK(x.r);
}

static int purge(struct env *e, const char *dev, uint64_t *ret_n) {
        struct res x = { 0 };
        ASSERT_OK(hub_queue_purge(e->q, dev, now(e), count_cb, &x));
        wait_for(e, &x.done);
        if (ret_n)
                *ret_n = x.n;
        return x.r;
}

static struct res fb_receive(struct env *e, uint64_t lock) {
        struct res x = { 0 };
        ASSERT_OK(hub_queue_feedback_receive(e->q, lock, now(e), recv_cb, &x));
        wait_for(e, &x.done);
        ASSERT_OK(x.r);
        return x;
}

typedef int (*fb_settle_fn)(struct hub_queue *, const char *, uint64_t, hub_queue_done_fn, void *);

static int fb_settle(struct env *e, fb_settle_fn fn, const char *token) {
        struct res x = { 0 };
        ASSERT_OK(fn(e->q, token, now(e), plain_cb, &x));
        wait_for(e, &x.done);
        return x.r;
}

/* Flushes pending feedback records (15 s of fake time + tick), then receives and completes
 * every feedback message, appending all records to *ret (a JSON array). */
static json_t *collect_feedback(struct env *e) {
        json_t *all = json_array();
        uint64_t pending = 0;

        ASSERT_OK(hub_queue_feedback_depth(e->q, NULL, &pending));
        if (pending > 0) {
                advance(e, HUB_QUEUE_FEEDBACK_BATCH_USEC);
                tick(e);
        }
        for (;;) {
                struct res x = fb_receive(e, 0);
                if (!x.got)
                        break;
                ASSERT_STREQ(hub_msg_get_sys(x.msg, HUB_SYS_CONTENT_TYPE),
                             "application/vnd.microsoft.iothub.feedback.json");
                ASSERT_STREQ(hub_msg_get_sys(x.msg, HUB_SYS_CONTENT_ENCODING), "utf-8");
                ASSERT_NOT_NULL(hub_msg_get_sys(x.msg, HUB_SYS_MESSAGE_ID));
                size_t len;
                const char *b = hub_msg_body(x.msg, &len);
                json_error_t err;
                json_t *arr = json_loadb(b, len, 0, &err);
                ASSERT_NOT_NULL(arr);
                ASSERT_TRUE(json_is_array(arr));
                ASSERT_OK(json_array_extend(all, arr));
                json_decref(arr);
                ASSERT_EQ(fb_settle(e, hub_queue_feedback_complete, x.token), 0);
                res_done(&x);
        }
        return all;
}

/* Checks one record: status, original message id and device. */
static void assert_record(json_t *rec, const char *status, const char *mid, const char *dev) {
        ASSERT_STREQ(json_string_value(json_object_get(rec, "statusCode")), status);
        if (mid)
                ASSERT_STREQ(json_string_value(json_object_get(rec, "originalMessageId")), mid);
        ASSERT_STREQ(json_string_value(json_object_get(rec, "deviceId")), dev);
        ASSERT_NOT_NULL(json_string_value(json_object_get(rec, "description")));
        ASSERT_NOT_NULL(json_string_value(json_object_get(rec, "enqueuedTimeUtc")));
        ASSERT_NOT_NULL(json_string_value(json_object_get(rec, "deviceGenerationId")));
        ASSERT_EQ(json_object_size(rec), 6u);
}

/* ---- tests --------------------------------------------------------------------------------- */

static void test_options(void) {
        struct hub_queue_options o = { 0 };
        const char *err = NULL;

        ASSERT_OK(hub_queue_options_validate(NULL, NULL));
        ASSERT_OK(hub_queue_options_validate(&o, NULL));
        o.default_ttl_usec = 30 * SEC;
        ASSERT_ERR(hub_queue_options_validate(&o, &err), -EINVAL);
        ASSERT_TRUE(strstr(err, "default TTL") != NULL);
        o.default_ttl_usec = 49 * HOUR;
        ASSERT_ERR(hub_queue_options_validate(&o, NULL), -EINVAL);
        o = (struct hub_queue_options) { .default_ttl_usec = 2 * HOUR, .max_ttl_usec = HOUR };
        ASSERT_ERR(hub_queue_options_validate(&o, &err), -EINVAL);
        o = (struct hub_queue_options) { .max_delivery_count = 101 };
        ASSERT_ERR(hub_queue_options_validate(&o, &err), -EINVAL);
        ASSERT_TRUE(strstr(err, "delivery count") != NULL);
        o = (struct hub_queue_options) { .lock_timeout_usec = 4 * SEC };
        ASSERT_ERR(hub_queue_options_validate(&o, NULL), -EINVAL);
        o = (struct hub_queue_options) { .feedback_lock_timeout_usec = 301 * SEC };
        ASSERT_ERR(hub_queue_options_validate(&o, NULL), -EINVAL);
        o = (struct hub_queue_options) { .feedback_ttl_usec = 49 * HOUR };
        ASSERT_ERR(hub_queue_options_validate(&o, NULL), -EINVAL);
        o = (struct hub_queue_options) { .feedback_max_delivery_count = 1000 };
        ASSERT_ERR(hub_queue_options_validate(&o, NULL), -EINVAL);
        o = (struct hub_queue_options) { .max_depth = HUB_QUEUE_MAX_DEPTH_LIMIT + 1 };
        ASSERT_ERR(hub_queue_options_validate(&o, NULL), -EINVAL);
        o = (struct hub_queue_options) { .default_ttl_usec = MINUTE, .max_ttl_usec = 48 * HOUR,
                                         .max_delivery_count = 100, .max_depth = 1, .lock_timeout_usec = 300 * SEC,
                                         .max_lock_expiries = 5 };
        ASSERT_OK(hub_queue_options_validate(&o, NULL));

        enum hub_queue_ack a;
        ASSERT_OK(hub_queue_ack_from_string("full", &a));
        ASSERT_EQ(a, HUB_QUEUE_ACK_FULL);
        ASSERT_OK(hub_queue_ack_from_string(NULL, &a));
        ASSERT_EQ(a, HUB_QUEUE_ACK_NONE);
        ASSERT_ERR(hub_queue_ack_from_string("Full", &a), -EINVAL);
        ASSERT_STREQ(hub_feedback_status_to_string(HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED), "DeliveryCountExceeded");
        ASSERT_NULL(hub_feedback_status_to_string(_HUB_FEEDBACK_STATUS_MAX));
}

static void test_send_receive_complete(void) {
        struct env e;
        char buf[128];
        env_init(&e);
        add_device(&e, "d1");

        ASSERT_EQ(depth(&e, "d1"), 0u);
        receive_none(&e, "d1");
        ASSERT_EQ(send_ok(&e, "d1", "one", "m1", NULL), 1u);
        ASSERT_EQ(send_ok(&e, "d1", "two", "m2", NULL), 2u);
        ASSERT_EQ(send_ok(&e, "d1", "three", "m3", NULL), 3u);
        ASSERT_EQ(depth(&e, "d1"), 3u);

        struct res a = receive_ok(&e, "d1");
        ASSERT_EQ(a.seq, 1u);
        ASSERT_STREQ(body_of(&a, buf, sizeof buf), "one");
        ASSERT_EQ(a.dc, 0u);
        ASSERT_EQ(strlen(a.token), 36u);
        ASSERT_EQ(a.enqueued, T0);
        ASSERT_EQ(a.expiry, T0 + HOUR); /* default TTL */
        ASSERT_EQ(a.lock_until, T0 + MINUTE);
        ASSERT_STREQ(hub_msg_get_sys(a.msg, HUB_SYS_MESSAGE_ID), "m1");
        ASSERT_STREQ(hub_msg_get_sys(a.msg, HUB_SYS_ACK), "none");
        ASSERT_STREQ(hub_msg_get_sys(a.msg, HUB_SYS_TO), "/devices/d1/messages/deviceBound");
        ASSERT_NOT_NULL(hub_msg_get_sys(a.msg, HUB_SYS_ENQUEUED_TIME));
        ASSERT_NOT_NULL(hub_msg_get_sys(a.msg, HUB_SYS_EXPIRY_TIME));

        /* A window: successive receives hand out successive messages. */
        struct res b = receive_ok(&e, "d1");
        ASSERT_EQ(b.seq, 2u);
        ASSERT_TRUE(strcmp(a.token, b.token) != 0);
        ASSERT_EQ(depth(&e, "d1"), 3u); /* invisible ones still count */

        ASSERT_EQ(settle(&e, hub_queue_complete, "d1", a.token), 0);
        ASSERT_EQ(depth(&e, "d1"), 2u);
        /* Settled: the token is gone. */
        ASSERT_ERR(settle(&e, hub_queue_complete, "d1", a.token), -ENOLCK);
        ASSERT_ERR(settle(&e, hub_queue_abandon, "d1", "not-a-token"), -ENOLCK);
        /* Another device's token does not settle this one. */
        add_device(&e, "d2");
        ASSERT_ERR(settle(&e, hub_queue_complete, "d2", b.token), -ENOLCK);
        ASSERT_EQ(settle(&e, hub_queue_complete, "d1", b.token), 0);

        struct res c = receive_ok(&e, "d1");
        ASSERT_EQ(c.seq, 3u);
        ASSERT_EQ(settle(&e, hub_queue_complete, "d1", c.token), 0);
        receive_none(&e, "d1");
        ASSERT_EQ(depth(&e, "d1"), 0u);
        /* Numbers keep growing after the queue emptied. */
        ASSERT_EQ(send_ok(&e, "d1", "four", "m4", NULL), 4u);
        ASSERT_EQ(send_ok(&e, "d2", "x", "m", NULL), 1u); /* per device */

        /* Unknown device. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = mk("x", "mx", NULL);
        ASSERT_ERR(send_msg(&e, "nobody", m, NULL), -ENOENT);
        struct res n = receive(&e, "nobody", 0);
        ASSERT_ERR(n.r, -ENOENT);
        uint64_t d;
        ASSERT_ERR(hub_queue_depth(e.q, "nobody", &d), -ENOENT);
        ASSERT_ERR(purge(&e, "nobody", NULL), -ENOENT);

        /* Bad arguments. */
        ASSERT_ERR(hub_queue_send(e.q, "", m, now(&e), send_cb, NULL), -EINVAL);
        ASSERT_ERR(hub_queue_send(e.q, NULL, m, now(&e), send_cb, NULL), -EINVAL);
        _cleanup_(hub_msg_unrefp) struct hub_msg *bad = mk("x", "m", "sometimes");
        ASSERT_ERR(send_msg(&e, "d1", bad, NULL), -EINVAL);
        _cleanup_(hub_msg_unrefp) struct hub_msg *badexp = mk("x", "m", NULL);
        ASSERT_OK(hub_msg_set_sys(badexp, HUB_SYS_EXPIRY_TIME, "tomorrow"));
        ASSERT_ERR(send_msg(&e, "d1", badexp, NULL), -EINVAL);

        res_done(&a);
        res_done(&b);
        res_done(&c);
        env_done(&e);
}

static void test_order_across_abandon(void) {
        struct env e;
        char buf[64];
        env_init(&e);
        add_device(&e, "d");
        for (int i = 1; i <= 4; i++) {
                snprintf(buf, sizeof buf, "m%d", i);
                send_ok(&e, "d", buf, buf, NULL);
        }
        struct res a = receive_ok(&e, "d"), b = receive_ok(&e, "d");
        ASSERT_EQ(a.seq, 1u);
        ASSERT_EQ(b.seq, 2u);
        /* Abandon 2 then 1: 1 comes first again, then 2, then 3. */
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", b.token), 0);
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a.token), 0);
        struct res a2 = receive_ok(&e, "d"), b2 = receive_ok(&e, "d"), c = receive_ok(&e, "d");
        ASSERT_EQ(a2.seq, 1u);
        ASSERT_EQ(a2.dc, 1u);
        ASSERT_STREQ(body_of(&a2, buf, sizeof buf), "m1");
        ASSERT_EQ(b2.seq, 2u);
        ASSERT_EQ(b2.dc, 1u);
        ASSERT_EQ(c.seq, 3u);
        ASSERT_EQ(c.dc, 0u);
        /* The old token is no longer valid. */
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", a.token), -ENOLCK);
        ASSERT_EQ(settle(&e, hub_queue_complete, "d", a2.token), 0);
        res_done(&a);
        res_done(&b);
        res_done(&a2);
        res_done(&b2);
        res_done(&c);
        env_done(&e);
}

static void test_lock_timeout(void) {
        struct env e;
        uint64_t dl = 0;
        env_init(&e);
        add_device(&e, "d");
        send_ok(&e, "d", "a", "ma", "full");
        send_ok(&e, "d", "b", "mb", NULL);

        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_EQ(dl, T0 + HOUR); /* message expiry */

        struct res a = receive_ok(&e, "d");
        ASSERT_EQ(a.seq, 1u);
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_EQ(dl, T0 + MINUTE); /* the lock */

        /* Lock expired, tick not run yet: the lock is lost (stale). */
        advance(&e, MINUTE);
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", a.token), -ESTALE);
        unsigned avail = e.n_available;
        struct res b = receive_ok(&e, "d"); /* message 1 still invisible: 2 comes */
        ASSERT_EQ(b.seq, 2u);
        tick(&e);
        /* Back in the queue, delivery count unchanged; nothing else deliverable -> hook. */
        ASSERT_EQ(e.n_available, avail + 1);
        ASSERT_STREQ(e.last_available, "d");
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", a.token), -ENOLCK);
        struct res a2 = receive_ok(&e, "d");
        ASSERT_EQ(a2.seq, 1u);
        ASSERT_EQ(a2.dc, 0u);

        /* A requested lock timeout, clamped to 5 … 300 s. */
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a2.token), 0);
        struct res a3 = receive(&e, "d", 10 * SEC);
        ASSERT_EQ(a3.lock_until, now(&e) + 10 * SEC);
        ASSERT_EQ(a3.dc, 1u);
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a3.token), 0);
        struct res a4 = receive(&e, "d", 1);
        ASSERT_EQ(a4.lock_until, now(&e) + 5 * SEC);
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a4.token), 0);
        struct res a5 = receive(&e, "d", 3600 * SEC);
        ASSERT_EQ(a5.lock_until, now(&e) + 300 * SEC);
        ASSERT_EQ(a5.dc, 3u);
        ASSERT_EQ(settle(&e, hub_queue_complete, "d", a5.token), 0);

        /* Lock expiry produced no feedback; complete gave Success (ack full). */
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        assert_record(json_array_get(fb, 0), "Success", "ma", "d");
        json_decref(fb);

        res_done(&a);
        res_done(&b);
        res_done(&a2);
        res_done(&a3);
        res_done(&a4);
        res_done(&a5);
        env_done(&e);
}

static void test_max_delivery_count(void) {
        struct env e;
        env_init(&e);
        add_device(&e, "d");
        send_ok(&e, "d", "x", "mx", "negative");
        send_ok(&e, "d", "y", "my", NULL);
        for (unsigned i = 0; i < HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT; i++) {
                struct res a = receive_ok(&e, "d");
                ASSERT_EQ(a.seq, 1u);
                ASSERT_EQ(a.dc, i);
                int r = settle(&e, hub_queue_abandon, "d", a.token);
                ASSERT_EQ(r, i + 1 == HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT ? 1 : 0);
                res_done(&a);
        }
        /* Dead-lettered: the next one is message 2. */
        struct res b = receive_ok(&e, "d");
        ASSERT_EQ(b.seq, 2u);
        ASSERT_EQ(depth(&e, "d"), 1u);
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        assert_record(json_array_get(fb, 0), "DeliveryCountExceeded", "mx", "d");
        json_decref(fb);
        res_done(&b);
        env_done(&e);

        /* Configured to 2. */
        struct hub_queue_options o = { .max_delivery_count = 2 };
        env_init_opts(&e, &o);
        add_device(&e, "d");
        send_ok(&e, "d", "x", "mx", NULL);
        struct res a = receive_ok(&e, "d");
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a.token), 0);
        res_done(&a);
        a = receive_ok(&e, "d");
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a.token), 1);
        res_done(&a);
        receive_none(&e, "d");
        ASSERT_EQ(depth(&e, "d"), 0u);
        env_done(&e);
}

static void test_lock_expiry_limit(void) {
        struct env e;
        struct hub_queue_options o = { .max_lock_expiries = 2 };
        env_init_opts(&e, &o);
        add_device(&e, "d");
        send_ok(&e, "d", "x", "mx", "negative");
        struct res a = receive_ok(&e, "d");
        advance(&e, MINUTE);
        tick(&e);
        res_done(&a);
        a = receive_ok(&e, "d");
        ASSERT_EQ(a.dc, 0u);
        advance(&e, MINUTE);
        tick(&e);
        res_done(&a);
        receive_none(&e, "d");
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        assert_record(json_array_get(fb, 0), "DeliveryCountExceeded", "mx", "d");
        json_decref(fb);
        env_done(&e);
}

static void test_feedback_by_ack(void) {
        struct env e;
        const char *acks[] = { NULL, "none", "positive", "negative", "full" };
        env_init(&e);
        add_device(&e, "d");

        /* complete: Success for positive and full only. */
        for (size_t i = 0; i < ELEMENTSOF(acks); i++) {
                char mid[16];
                snprintf(mid, sizeof mid, "c%zu", i);
                send_ok(&e, "d", "x", mid, acks[i]);
                struct res a = receive_ok(&e, "d");
                ASSERT_STREQ(hub_msg_get_sys(a.msg, HUB_SYS_ACK), acks[i] ? acks[i] : "none");
                ASSERT_EQ(settle(&e, hub_queue_complete, "d", a.token), 0);
                res_done(&a);
        }
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 2u);
        assert_record(json_array_get(fb, 0), "Success", "c2", "d");
        assert_record(json_array_get(fb, 1), "Success", "c4", "d");
        ASSERT_STREQ(json_string_value(json_object_get(json_array_get(fb, 0), "description")), "Success");
        json_decref(fb);

        /* reject: Rejected for negative and full only. */
        for (size_t i = 0; i < ELEMENTSOF(acks); i++) {
                char mid[16];
                snprintf(mid, sizeof mid, "r%zu", i);
                send_ok(&e, "d", "x", mid, acks[i]);
                struct res a = receive_ok(&e, "d");
                ASSERT_EQ(settle(&e, hub_queue_reject, "d", a.token), 0);
                res_done(&a);
        }
        ASSERT_EQ(depth(&e, "d"), 0u);
        fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 2u);
        assert_record(json_array_get(fb, 0), "Rejected", "r3", "d");
        assert_record(json_array_get(fb, 1), "Rejected", "r4", "d");
        json_decref(fb);

        /* The record's generation id is the device's. */
        send_ok(&e, "d", "x", "g", "full");
        struct res a = receive_ok(&e, "d");
        ASSERT_EQ(settle(&e, hub_queue_complete, "d", a.token), 0);
        res_done(&a);
        fb = collect_feedback(&e);
        struct hub_device dev;
        ASSERT_OK(hub_registry_get(e.reg, "d", &dev));
        ASSERT_STREQ(json_string_value(json_object_get(json_array_get(fb, 0), "deviceGenerationId")),
                     dev.generation_id);
        hub_device_done(&dev);
        json_decref(fb);

        /* Without a message-id the record says null. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = mk("x", NULL, "full");
        ASSERT_OK(send_msg(&e, "d", m, NULL));
        a = receive_ok(&e, "d");
        ASSERT_EQ(settle(&e, hub_queue_reject, "d", a.token), 0);
        res_done(&a);
        fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        ASSERT_TRUE(json_is_null(json_object_get(json_array_get(fb, 0), "originalMessageId")));
        json_decref(fb);
        env_done(&e);
}

static void test_expiry(void) {
        struct env e;
        uint64_t dl = 0;
        struct hub_queue_options o = { .default_ttl_usec = 10 * MINUTE, .max_ttl_usec = 2 * HOUR };
        char t[32];
        env_init_opts(&e, &o);
        add_device(&e, "d");

        /* Absolute expiry in 2 minutes, negative ack. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = mk("x", "short", "negative");
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_EXPIRY_TIME, hub_time_format_iso8601(T0 + 2 * MINUTE, t)));
        ASSERT_OK(send_msg(&e, "d", m, NULL));
        /* Default TTL from the options. */
        send_ok(&e, "d", "y", "dflt", "full");
        /* Far expiry: clamped to the maximum TTL. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *far = mk("z", "far", NULL);
        ASSERT_OK(hub_msg_set_sys(far, HUB_SYS_EXPIRY_TIME, hub_time_format_iso8601(T0 + 100 * HOUR, t)));
        ASSERT_OK(send_msg(&e, "d", far, NULL));

        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_EQ(dl, T0 + 2 * MINUTE);

        /* An expired message is not delivered, even before a tick, and a locked one expires too. */
        struct res a = receive_ok(&e, "d");
        ASSERT_EQ(a.seq, 1u);
        ASSERT_EQ(a.expiry, T0 + 2 * MINUTE);
        advance(&e, 2 * MINUTE);
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", a.token), -ESTALE);
        tick(&e);
        ASSERT_EQ(depth(&e, "d"), 2u);
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", a.token), -ENOLCK);
        struct res b = receive_ok(&e, "d");
        ASSERT_EQ(b.seq, 2u);
        ASSERT_EQ(b.expiry, T0 + 10 * MINUTE);
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", b.token), 0);
        advance(&e, 8 * MINUTE);
        /* Without a tick, receive itself dead-letters the expired message first. */
        struct res c = receive_ok(&e, "d");
        ASSERT_EQ(c.seq, 3u);
        ASSERT_EQ(c.expiry, T0 + 2 * HOUR);
        ASSERT_EQ(depth(&e, "d"), 1u);

        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 2u);
        assert_record(json_array_get(fb, 0), "Expired", "short", "d");
        assert_record(json_array_get(fb, 1), "Expired", "dflt", "d");
        json_decref(fb);

        /* An expiry already in the past: accepted, expires at the next tick. */
        _cleanup_(hub_msg_unrefp) struct hub_msg *past = mk("p", "past", "negative");
        ASSERT_OK(hub_msg_set_sys(past, HUB_SYS_EXPIRY_TIME, hub_time_format_iso8601(T0, t)));
        ASSERT_OK(send_msg(&e, "d", past, NULL));
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_TRUE(dl <= now(&e));
        tick(&e);
        ASSERT_EQ(depth(&e, "d"), 1u);
        fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        assert_record(json_array_get(fb, 0), "Expired", "past", "d");
        json_decref(fb);

        res_done(&a);
        res_done(&b);
        res_done(&c);
        env_done(&e);
}

static void test_depth_limit(void) {
        struct env e;
        char t[32];
        env_init(&e);
        add_device(&e, "d");
        add_device(&e, "other");

        for (unsigned i = 0; i < HUB_QUEUE_DEFAULT_MAX_DEPTH; i++) {
                _cleanup_(hub_msg_unrefp) struct hub_msg *m = mk("x", "m", NULL);
                /* The first ten expire in 2 minutes. */
                if (i < 10)
                        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_EXPIRY_TIME,
                                                  hub_time_format_iso8601(T0 + 2 * MINUTE, t)));
                ASSERT_OK(send_msg(&e, "d", m, NULL));
        }
        ASSERT_EQ(depth(&e, "d"), 50u);
        _cleanup_(hub_msg_unrefp) struct hub_msg *m51 = mk("x", "m51", NULL);
        ASSERT_ERR(send_msg(&e, "d", m51, NULL), -ENOBUFS);
        ASSERT_EQ(depth(&e, "d"), 50u);
        /* Another device is unaffected. */
        ASSERT_OK(send_msg(&e, "other", m51, NULL));
        /* Invisible messages count too. */
        struct res a = receive_ok(&e, "d");
        ASSERT_ERR(send_msg(&e, "d", m51, NULL), -ENOBUFS);
        /* Expired ones do not count: they are dead-lettered first. */
        advance(&e, 2 * MINUTE);
        for (int i = 0; i < 10; i++)
                ASSERT_OK(send_msg(&e, "d", m51, NULL));
        ASSERT_ERR(send_msg(&e, "d", m51, NULL), -ENOBUFS);
        ASSERT_EQ(depth(&e, "d"), 50u);
        res_done(&a);
        env_done(&e);

        /* Configurable. */
        struct hub_queue_options o = { .max_depth = 3 };
        env_init_opts(&e, &o);
        add_device(&e, "d");
        for (int i = 0; i < 3; i++)
                ASSERT_OK(send_msg(&e, "d", m51, NULL));
        ASSERT_ERR(send_msg(&e, "d", m51, NULL), -ENOBUFS);
        env_done(&e);
}

static void test_size_limit(void) {
        struct env e;
        env_init(&e);
        add_device(&e, "d");
        char *big = malloc(HUB_MSG_C2D_MAX_SIZE + 1);
        ASSERT_NOT_NULL(big);
        memset(big, 'a', HUB_MSG_C2D_MAX_SIZE + 1);
        struct hub_msg *m = NULL;
        /* Exactly 64 KB: accepted. */
        ASSERT_OK(hub_msg_new(big, HUB_MSG_C2D_MAX_SIZE, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(send_msg(&e, "d", m, NULL));
        /* One byte more (here a property): refused. */
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "x"));
        ASSERT_ERR(hub_queue_send(e.q, "d", m, now(&e), send_cb, NULL), -E2BIG);
        m = hub_msg_unref(m);
        ASSERT_OK(hub_msg_new(big, HUB_MSG_C2D_MAX_SIZE + 1, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_ERR(hub_queue_send(e.q, "d", m, now(&e), send_cb, NULL), -E2BIG);
        m = hub_msg_unref(m);
        ASSERT_EQ(depth(&e, "d"), 1u);
        struct res a = receive_ok(&e, "d");
        size_t len = 0;
        (void) hub_msg_body(a.msg, &len);
        ASSERT_EQ(len, HUB_MSG_C2D_MAX_SIZE);
        res_done(&a);
        free(big);
        env_done(&e);
}

static void test_purge(void) {
        struct env e;
        uint64_t n = 0;
        env_init(&e);
        add_device(&e, "d");
        add_device(&e, "keep");
        send_ok(&e, "d", "1", "p1", "full");
        send_ok(&e, "d", "2", "p2", "positive");
        send_ok(&e, "d", "3", "p3", "negative");
        send_ok(&e, "d", "4", "p4", NULL);
        send_ok(&e, "keep", "k", "k1", "full");
        struct res a = receive_ok(&e, "d"); /* one is invisible */
        ASSERT_EQ(purge(&e, "d", &n), 0);
        ASSERT_EQ(n, 4u);
        ASSERT_EQ(depth(&e, "d"), 0u);
        ASSERT_EQ(depth(&e, "keep"), 1u);
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", a.token), -ENOLCK);
        receive_none(&e, "d");
        ASSERT_EQ(purge(&e, "d", &n), 0);
        ASSERT_EQ(n, 0u);
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 2u);
        assert_record(json_array_get(fb, 0), "Purged", "p1", "d");
        assert_record(json_array_get(fb, 1), "Purged", "p3", "d");
        json_decref(fb);
        /* Sequence numbers continue after a purge. */
        ASSERT_EQ(send_ok(&e, "d", "5", "p5", NULL), 5u);
        res_done(&a);
        env_done(&e);
}

static void test_device_delete(void) {
        struct env e;
        uint64_t msgs = 0, pending = 0;
        env_init(&e);
        add_device(&e, "gone");
        add_device(&e, "stays");
        send_ok(&e, "gone", "1", "g1", "full");
        send_ok(&e, "gone", "2", "g2", "full");
        send_ok(&e, "stays", "s", "s1", "full");
        struct res a = receive_ok(&e, "gone");
        ASSERT_EQ(settle(&e, hub_queue_complete, "gone", a.token), 0); /* pending Success record */
        res_done(&a);
        a = receive_ok(&e, "gone");
        struct res s = receive_ok(&e, "stays");
        ASSERT_EQ(settle(&e, hub_queue_complete, "stays", s.token), 0);
        ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, &pending));
        ASSERT_EQ(pending, 2u);

        ASSERT_OK(hub_registry_delete(e.reg, "gone", NULL));
        uint64_t d;
        ASSERT_ERR(hub_queue_depth(e.q, "gone", &d), -ENOENT);
        ASSERT_ERR(settle(&e, hub_queue_complete, "gone", a.token), -ENOLCK);
        ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, &pending));
        ASSERT_EQ(pending, 1u); /* only the other device's record is left */
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        assert_record(json_array_get(fb, 0), "Success", "s1", "stays");
        json_decref(fb);

        /* Re-created with the same id: a fresh queue. */
        add_device(&e, "gone");
        ASSERT_EQ(depth(&e, "gone"), 0u);
        ASSERT_EQ(send_ok(&e, "gone", "n", "n1", NULL), 1u);
        uint64_t dl;
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        res_done(&a);
        res_done(&s);
        env_done(&e);
}

static void test_feedback_batching(void) {
        struct env e;
        uint64_t msgs = 0, pending = 0, dl = 0;
        struct hub_queue_options o = { .max_depth = 200 };
        env_init_opts(&e, &o);
        add_device(&e, "d");

        for (unsigned i = 0; i < HUB_QUEUE_FEEDBACK_BATCH_MAX + 1; i++) {
                char mid[16];
                snprintf(mid, sizeof mid, "b%u", i);
                send_ok(&e, "d", "x", mid, "positive");
        }
        unsigned fb_avail = e.n_fb_available;
        for (unsigned i = 0; i < HUB_QUEUE_FEEDBACK_BATCH_MAX + 1; i++) {
                struct res a = receive_ok(&e, "d");
                ASSERT_EQ(settle(&e, hub_queue_complete, "d", a.token), 0);
                res_done(&a);
                advance(&e, 10 * USEC_PER_MSEC);
                ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, &pending));
                if (i + 1 < HUB_QUEUE_FEEDBACK_BATCH_MAX) {
                        ASSERT_EQ(msgs, 0u);
                        ASSERT_EQ(pending, i + 1);
                } else if (i + 1 == HUB_QUEUE_FEEDBACK_BATCH_MAX) {
                        /* The 64th record makes a message at once, without a tick. */
                        ASSERT_EQ(msgs, 1u);
                        ASSERT_EQ(pending, 0u);
                }
        }
        /* The 64th record made a message at once, without a tick; the 65th waits. */
        ASSERT_EQ(msgs, 1u);
        ASSERT_EQ(pending, 1u);
        ASSERT_EQ(e.n_fb_available, fb_avail + 1);

        struct res f = fb_receive(&e, 0);
        ASSERT_TRUE(f.got);
        size_t len;
        const char *b = hub_msg_body(f.msg, &len);
        json_t *arr = json_loadb(b, len, 0, NULL);
        ASSERT_EQ(json_array_size(arr), 64u);
        assert_record(json_array_get(arr, 0), "Success", "b0", "d");
        assert_record(json_array_get(arr, 63), "Success", "b63", "d");
        /* Field order as reference §5.7. */
        ASSERT_TRUE(strncmp(b, "[{\"originalMessageId\":\"b0\",\"enqueuedTimeUtc\":\"", 46) == 0);
        ASSERT_TRUE(strstr(b, "\"statusCode\":\"Success\",\"description\":\"Success\",\"deviceId\":\"d\","
                              "\"deviceGenerationId\":\"") != NULL);
        json_decref(arr);
        ASSERT_EQ(fb_settle(&e, hub_queue_feedback_complete, f.token), 0);
        res_done(&f);

        /* The 65th record: released 15 s after it was written, not before. */
        uint64_t rec_time = now(&e) - 10 * USEC_PER_MSEC;
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_EQ(dl, rec_time + HUB_QUEUE_FEEDBACK_BATCH_USEC);
        advance(&e, dl - now(&e) - 1);
        tick(&e);
        f = fb_receive(&e, 0);
        ASSERT_FALSE(f.got);
        advance(&e, 1);
        tick(&e);
        ASSERT_EQ(e.n_fb_available, fb_avail + 2);
        f = fb_receive(&e, 0);
        ASSERT_TRUE(f.got);
        b = hub_msg_body(f.msg, &len);
        arr = json_loadb(b, len, 0, NULL);
        ASSERT_EQ(json_array_size(arr), 1u);
        assert_record(json_array_get(arr, 0), "Success", "b64", "d");
        json_decref(arr);
        ASSERT_EQ(fb_settle(&e, hub_queue_feedback_complete, f.token), 0);
        res_done(&f);
        ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, &pending));
        ASSERT_EQ(msgs, 0u);
        ASSERT_EQ(pending, 0u);
        env_done(&e);
}

/* Makes one feedback message (one Success record). */
static void make_feedback_message(struct env *e, const char *mid) {
        send_ok(e, "d", "x", mid, "full");
        struct res a = receive_ok(e, "d");
        ASSERT_EQ(settle(e, hub_queue_complete, "d", a.token), 0);
        res_done(&a);
        advance(e, HUB_QUEUE_FEEDBACK_BATCH_USEC);
        tick(e);
}

static void test_feedback_queue(void) {
        struct env e;
        uint64_t dl = 0, msgs = 0;
        env_init(&e);
        add_device(&e, "d");

        struct res none = fb_receive(&e, 0);
        ASSERT_FALSE(none.got);
        make_feedback_message(&e, "f1");
        struct res f = fb_receive(&e, 0);
        ASSERT_TRUE(f.got);
        ASSERT_EQ(f.dc, 0u);
        ASSERT_EQ(f.lock_until, now(&e) + MINUTE);
        ASSERT_EQ(f.expiry, now(&e) + HOUR);
        ASSERT_EQ(strlen(f.token), 36u);
        /* Locked: nothing else to get. */
        none = fb_receive(&e, 0);
        ASSERT_FALSE(none.got);
        ASSERT_ERR(fb_settle(&e, hub_queue_feedback_complete, "bogus"), -ENOLCK);

        /* Abandon: redelivered with delivery count 1. */
        ASSERT_EQ(fb_settle(&e, hub_queue_feedback_abandon, f.token), 0);
        ASSERT_ERR(fb_settle(&e, hub_queue_feedback_complete, f.token), -ENOLCK);
        res_done(&f);
        f = fb_receive(&e, 30 * SEC);
        ASSERT_EQ(f.dc, 1u);
        ASSERT_EQ(f.lock_until, now(&e) + 30 * SEC);

        /* Lock expiry: back without a count increase. */
        advance(&e, 30 * SEC);
        ASSERT_ERR(fb_settle(&e, hub_queue_feedback_complete, f.token), -ESTALE);
        tick(&e);
        res_done(&f);
        f = fb_receive(&e, 0);
        ASSERT_TRUE(f.got);
        ASSERT_EQ(f.dc, 1u);

        /* Abandoned up to the maximum delivery count (10): dropped. */
        for (unsigned i = 1; i < HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT; i++) {
                int r = fb_settle(&e, hub_queue_feedback_abandon, f.token);
                ASSERT_EQ(r, i + 1 == HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT ? 1 : 0);
                res_done(&f);
                f = fb_receive(&e, 0);
                if (r == 1)
                        ASSERT_FALSE(f.got);
                else
                        ASSERT_EQ(f.dc, i + 1);
        }
        ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, NULL));
        ASSERT_EQ(msgs, 0u);
        res_done(&f);

        /* Reject drops it. */
        make_feedback_message(&e, "f2");
        f = fb_receive(&e, 0);
        ASSERT_EQ(fb_settle(&e, hub_queue_feedback_reject, f.token), 0);
        res_done(&f);
        ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, NULL));
        ASSERT_EQ(msgs, 0u);

        /* Feedback TTL (1 h): an unread feedback message expires. */
        make_feedback_message(&e, "f3");
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_EQ(dl, now(&e) + HOUR);
        advance(&e, HOUR);
        none = fb_receive(&e, 0);
        ASSERT_FALSE(none.got);
        tick(&e);
        ASSERT_OK(hub_queue_feedback_depth(e.q, &msgs, NULL));
        ASSERT_EQ(msgs, 0u);
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 0);
        env_done(&e);

        /* Configured feedback options. */
        struct hub_queue_options o = { .feedback_ttl_usec = 2 * HOUR, .feedback_lock_timeout_usec = 5 * SEC,
                                       .feedback_max_delivery_count = 1 };
        env_init_opts(&e, &o);
        add_device(&e, "d");
        make_feedback_message(&e, "f4");
        f = fb_receive(&e, 0);
        ASSERT_EQ(f.lock_until, now(&e) + 5 * SEC);
        ASSERT_EQ(f.expiry, now(&e) + 2 * HOUR);
        ASSERT_EQ(fb_settle(&e, hub_queue_feedback_abandon, f.token), 1);
        res_done(&f);
        env_done(&e);
}

static void test_persistence(void) {
        struct env e;
        char buf[64];
        env_init(&e);
        add_device(&e, "d");
        send_ok(&e, "d", "first", "p1", "full");
        send_ok(&e, "d", "second", "p2", NULL);
        struct res a = receive_ok(&e, "d");
        ASSERT_EQ(a.seq, 1u);
        env_close(&e);

        advance(&e, 10 * SEC);
        env_open(&e);
        ASSERT_EQ(depth(&e, "d"), 2u);
        /* The lock survived: message 1 is still invisible, and its token still works. */
        struct res b = receive_ok(&e, "d");
        ASSERT_EQ(b.seq, 2u);
        ASSERT_STREQ(body_of(&b, buf, sizeof buf), "second");
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a.token), 0);
        ASSERT_EQ(send_ok(&e, "d", "third", "p3", NULL), 3u); /* numbering continues */
        env_close(&e);

        env_open(&e);
        struct res a2 = receive_ok(&e, "d");
        ASSERT_EQ(a2.seq, 1u);
        ASSERT_EQ(a2.dc, 1u);
        ASSERT_STREQ(body_of(&a2, buf, sizeof buf), "first");
        ASSERT_STREQ(hub_msg_get_sys(a2.msg, HUB_SYS_MESSAGE_ID), "p1");
        ASSERT_EQ(a2.enqueued, T0);
        /* Locks expire across a restart as scheduled. */
        env_close(&e);
        advance(&e, MINUTE);
        env_open(&e);
        uint64_t dl;
        ASSERT_EQ(hub_queue_next_deadline(e.q, &dl), 1);
        ASSERT_TRUE(dl <= now(&e));
        tick(&e);
        struct res a3 = receive_ok(&e, "d");
        ASSERT_EQ(a3.seq, 1u);
        ASSERT_EQ(settle(&e, hub_queue_complete, "d", a3.token), 0);
        /* A pending feedback record survives too. */
        env_close(&e);
        env_open(&e);
        json_t *fb = collect_feedback(&e);
        ASSERT_EQ(json_array_size(fb), 1u);
        assert_record(json_array_get(fb, 0), "Success", "p1", "d");
        json_decref(fb);
        ASSERT_EQ(depth(&e, "d"), 2u);

        res_done(&a);
        res_done(&b);
        res_done(&a2);
        res_done(&a3);
        env_done(&e);
}

static void test_available_hook_and_release(void) {
        struct env e;
        uint64_t n_rel = 0;
        env_init(&e);
        add_device(&e, "d");

        send_ok(&e, "d", "1", "a1", NULL);
        ASSERT_EQ(e.n_available, 1u); /* empty -> something */
        ASSERT_STREQ(e.last_available, "d");
        send_ok(&e, "d", "2", "a2", NULL);
        ASSERT_EQ(e.n_available, 1u); /* already something deliverable */
        struct res a = receive_ok(&e, "d"), b = receive_ok(&e, "d");
        send_ok(&e, "d", "3", "a3", NULL);
        ASSERT_EQ(e.n_available, 2u); /* nothing deliverable before (both invisible) */
        ASSERT_EQ(settle(&e, hub_queue_abandon, "d", a.token), 0);
        ASSERT_EQ(e.n_available, 2u); /* 3 was deliverable */
        struct res c = receive_ok(&e, "d"), d = receive_ok(&e, "d");
        ASSERT_EQ(c.seq, 1u);
        ASSERT_EQ(d.seq, 3u);

        /* A session closes with messages in flight: released at once, count unchanged. */
        struct res x = { 0 };
        ASSERT_OK(hub_queue_release_device(e.q, "d", now(&e), plain_cb, &x));
        wait_for(&e, &x.done);
        ASSERT_EQ(x.r, 3);
        ASSERT_EQ(e.n_available, 3u);
        (void) n_rel;
        struct res r1 = receive_ok(&e, "d"), r2 = receive_ok(&e, "d"), r3 = receive_ok(&e, "d");
        ASSERT_EQ(r1.seq, 1u);
        ASSERT_EQ(r1.dc, 1u);
        ASSERT_EQ(r2.seq, 2u);
        ASSERT_EQ(r2.dc, 0u);
        ASSERT_EQ(r3.seq, 3u);
        ASSERT_ERR(settle(&e, hub_queue_complete, "d", b.token), -ENOLCK);
        ASSERT_EQ(settle(&e, hub_queue_complete, "d", r2.token), 0);

        /* Hooks stop after free, but completions still run. */
        struct res y = { 0 };
        ASSERT_OK(hub_queue_abandon(e.q, "d", r1.token, now(&e), plain_cb, &y));
        e.q = hub_queue_free(e.q);
        wait_for(&e, &y.done);
        ASSERT_EQ(y.r, 0);
        ASSERT_EQ(e.n_available, 3u);

        res_done(&a);
        res_done(&b);
        res_done(&c);
        res_done(&d);
        res_done(&r1);
        res_done(&r2);
        res_done(&r3);
        env_done(&e);
}

int main(void) {
        TEST_RUN(test_options);
        TEST_RUN(test_send_receive_complete);
        TEST_RUN(test_order_across_abandon);
        TEST_RUN(test_lock_timeout);
        TEST_RUN(test_max_delivery_count);
        TEST_RUN(test_lock_expiry_limit);
        TEST_RUN(test_feedback_by_ack);
        TEST_RUN(test_expiry);
        TEST_RUN(test_depth_limit);
        TEST_RUN(test_size_limit);
        TEST_RUN(test_purge);
        TEST_RUN(test_device_delete);
        TEST_RUN(test_feedback_batching);
        TEST_RUN(test_feedback_queue);
        TEST_RUN(test_persistence);
        TEST_RUN(test_available_hook_and_release);
        return 0;
}
