/* SPDX-License-Identifier: MIT */
/* The outbox on a real store in a temporary directory with a fake clock: append / read / ack
 * ordering, grouped commits, independent endpoint cursors, persistence across reopen, garbage
 * collection, capacity with both overflow policies, TTLs under the time rule, the events
 * stream with a device filter. */

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>

#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/store.h"
#include "store-internal.h"
#include "test-util.h"

#define T0 (UINT64_C(1700000000) * USEC_PER_SEC)
#define SEC USEC_PER_SEC

struct env {
        char dir[256];
        struct hub_fake_clock clock;
        struct hub_store *store;
        struct hub_outbox *o;
        const char *boot_id;
        bool synced;
        struct hub_outbox_endpoint_options events;
        /* completions */
        unsigned n_done, n_ok;
        int last_r;
        uint64_t last_seq;
        unsigned n_hook;
        uint64_t last_hook_seq;
};

static void env_open(struct env *e) {
        char err[256] = "";
        struct hub_store_options so = {
                .dir = e->dir,
                .clock = &e->clock.clock,
                .errbuf = err,
                .errbuf_size = sizeof err,
        };
        int r = hub_store_open(&so, &e->store);
        if (r < 0)
                TEST_FAIL("hub_store_open: %s: %s", strerror(-r), err);
        struct hub_outbox_options oo = {
                .store = e->store,
                .clock = &e->clock.clock,
                .boot_id = e->boot_id,
                .clock_synchronized = e->synced,
                .events = e->events,
        };
        ASSERT_OK(hub_outbox_new(&oo, &e->o));
}

static void env_close(struct env *e) {
        e->o = hub_outbox_free(e->o);
        ASSERT_NULL(e->o);
        e->store = hub_store_close(e->store);
}

static void env_init(struct env *e) {
        memset(e, 0, sizeof *e);
        test_tmpdir(e->dir, sizeof e->dir);
        hub_fake_clock_init(&e->clock, T0);
        e->boot_id = "boot-a";
        env_open(e);
}

static void env_done(struct env *e) {
        env_close(e);
        test_rmdir(e->dir);
}

static void set_clock(struct env *e, uint64_t realtime, uint64_t monotonic) {
        __atomic_store_n(&e->clock.realtime, realtime, __ATOMIC_RELAXED);
        __atomic_store_n(&e->clock.monotonic, monotonic, __ATOMIC_RELAXED);
}

/* Dispatches store completions until *counter reaches target. */
static void wait_for(struct env *e, unsigned *counter, unsigned target) {
        for (unsigned spins = 0; *counter < target; spins++) {
                struct pollfd p = { .fd = hub_store_get_fd(e->store), .events = POLLIN };
                if (spins > 10000)
                        TEST_FAIL("timed out waiting for completions (%u of %u)", *counter, target);
                (void) poll(&p, 1, 100);
                (void) hub_store_dispatch(e->store);
        }
}

static struct hub_msg *mkmsg(const char *dev, const char *body) {
        struct hub_msg *m = NULL;
        ASSERT_OK(hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, dev));
        ASSERT_OK(hub_msg_set_prop(m, "k", "v"));
        return m;
}

static void append_done(int r, uint64_t seq, void *ud) {
        struct env *e = ud;
        e->n_done++;
        e->last_r = r;
        if (r >= 0) {
                e->n_ok++;
                if (seq <= e->last_seq)
                        TEST_FAIL("sequence numbers not increasing: %" PRIu64 " after %" PRIu64, seq, e->last_seq);
                e->last_seq = seq;
        }
}

/* Appends one message and waits until it is durable. Returns its seq. */
static uint64_t append1(struct env *e, const char *dev, const char *body) {
        struct hub_msg *m = mkmsg(dev, body);
        unsigned target = e->n_done + 1;
        ASSERT_OK(hub_outbox_append(e->o, m, append_done, e));
        hub_msg_unref(m);
        wait_for(e, &e->n_done, target);
        ASSERT_OK(e->last_r);
        return e->last_seq;
}

struct ack_ctx {
        unsigned n;
        int r;
};

static void ack_done(int r, void *ud) {
        struct ack_ctx *a = ud;
        a->n++;
        a->r = r;
}

static void ack_wait(struct env *e, struct hub_outbox_endpoint *ep, uint64_t seq) {
        struct ack_ctx a = { 0 };
        int r = hub_outbox_ack(e->o, ep, seq, ack_done, &a);
        ASSERT_OK(r);
        if (r == 1) {
                wait_for(e, &a.n, 1);
                ASSERT_OK(a.r);
        }
}

static const char *body_of(const struct hub_outbox_entry *x, char *buf, size_t n) {
        size_t len;
        const void *b = hub_msg_body(x->msg, &len);
        snprintf(buf, n, "%.*s", (int) len, (const char *) b);
        return buf;
}

static void stats(struct hub_outbox_endpoint *ep, struct hub_outbox_endpoint_stats *st) {
        hub_outbox_endpoint_get_stats(ep, st);
}

/* ---------------------------------------------------------------------------------------- */

static void test_append_read_ack(void) {
        struct env e;
        struct hub_outbox_endpoint *ep, *ev;
        struct hub_outbox_entry *v = NULL;
        struct hub_outbox_endpoint_stats st;
        size_t n = 0;
        char buf[64];

        env_init(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "ep1", NULL, &ep));
        ASSERT_OK(hub_outbox_endpoint_get(e.o, HUB_OUTBOX_EVENTS, &ev));
        ASSERT_EQ(hub_outbox_head(e.o), 0);

        for (int i = 1; i <= 5; i++) {
                char b[16];
                snprintf(b, sizeof b, "m%d", i);
                ASSERT_EQ(append1(&e, i % 2 ? "dev1" : "dev2", b), (uint64_t) i);
        }
        ASSERT_EQ(hub_outbox_head(e.o), 5);

        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 5);
        for (size_t i = 0; i < n; i++) {
                char b[32];
                snprintf(b, sizeof b, "m%zu", i + 1);
                ASSERT_EQ(v[i].seq, i + 1);
                ASSERT_STREQ(body_of(&v[i], buf, sizeof buf), b);
                ASSERT_STREQ(v[i].device_id, i % 2 ? "dev2" : "dev1");
                ASSERT_NULL(v[i].module_id);
                ASSERT_EQ(v[i].enqueued_usec, T0);
                ASSERT_NOT_NULL(hub_msg_get_sys(v[i].msg, HUB_SYS_ENQUEUED_TIME));
                ASSERT_STREQ(hub_msg_get_prop(v[i].msg, "k", NULL), "v");
        }
        v = hub_outbox_entries_free(v, n);

        /* max_count and max_bytes bounds; at least one message whatever its size. */
        ASSERT_OK(hub_outbox_read(e.o, ep, 1, 2, 0, &v, &n));
        ASSERT_EQ(n, 2);
        ASSERT_EQ(v[0].seq, 2);
        v = hub_outbox_entries_free(v, n);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 1, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);

        stats(ep, &st);
        ASSERT_EQ(st.backlog_count, 5);
        ASSERT_EQ(st.cursor, 0);

        ack_wait(&e, ep, 3);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 2);
        ASSERT_EQ(v[0].seq, 4);
        ASSERT_EQ(v[1].seq, 5);
        v = hub_outbox_entries_free(v, n);

        /* A cursor only moves forward: behind it is a no-op, beyond the head an error. */
        struct ack_ctx a = { 0 };
        ASSERT_ERR(hub_outbox_ack(e.o, ep, 2, ack_done, &a), 0);
        ASSERT_ERR(hub_outbox_ack(e.o, ep, 99, ack_done, &a), -EINVAL);
        ASSERT_ERR(hub_outbox_ack(e.o, ev, 1, ack_done, &a), -EPERM);
        ASSERT_EQ(a.n, 0);

        stats(ep, &st);
        ASSERT_EQ(st.cursor, 3);
        ASSERT_EQ(st.delivered, 3);
        ASSERT_EQ(st.backlog_count, 2);
        ASSERT_TRUE(st.backlog_bytes > 0);

        /* Bad input. */
        struct hub_msg *m = NULL;
        ASSERT_OK(hub_msg_new("x", 1, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_ERR(hub_outbox_append(e.o, m, append_done, &e), -EINVAL); /* no device id */
        hub_msg_unref(m);
        ASSERT_ERR(hub_outbox_read(e.o, ep, 0, 0, 0, &v, &n), -EINVAL);
        ASSERT_ERR(hub_outbox_endpoint_open(e.o, "bad name", NULL, NULL), -EINVAL);
        ASSERT_ERR(hub_outbox_endpoint_open(e.o, "", NULL, NULL), -EINVAL);
        ASSERT_ERR(hub_outbox_endpoint_get(e.o, "nope", &ep), -ENOENT);
        ASSERT_ERR(hub_outbox_endpoint_delete(e.o, HUB_OUTBOX_EVENTS), -EPERM);
        env_done(&e);
}

static void test_batch(void) {
        struct env e;
        struct hub_store_stats ss0, ss1;
        struct hub_outbox_stats os;
        const unsigned N = 10000;

        env_init(&e);
        hub_store_get_stats(e.store, &ss0);
        for (unsigned i = 0; i < N; i++) {
                char b[32];
                snprintf(b, sizeof b, "{\"i\":%u}", i);
                struct hub_msg *m = mkmsg(i % 3 ? "dev1" : "dev2", b);
                ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
                hub_msg_unref(m);
        }
        wait_for(&e, &e.n_done, N);
        ASSERT_EQ(e.n_ok, N);
        ASSERT_EQ(e.last_seq, N);
        hub_store_get_stats(e.store, &ss1);
        fprintf(stderr, "%u appends in %" PRIu64 " commits (max batch %" PRIu64 ")\n", N, ss1.commits - ss0.commits,
                ss1.max_batch);
        ASSERT_TRUE(ss1.commits - ss0.commits < N / 10);
        hub_outbox_get_stats(e.o, &os);
        ASSERT_EQ(os.stored_count, N);
        ASSERT_EQ(os.head, N);
        ASSERT_EQ(os.pending, 0);
        ASSERT_EQ(os.appended, N);
        env_done(&e);
}

static void test_endpoints_persist(void) {
        struct env e;
        struct hub_outbox_endpoint *a, *b;
        struct hub_outbox_entry *v = NULL;
        struct hub_outbox_endpoint_stats st;
        size_t n = 0;

        env_init(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "a", NULL, &a));
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "b", NULL, &b));
        for (int i = 0; i < 10; i++)
                append1(&e, "dev1", "x");
        ack_wait(&e, a, 7);
        ack_wait(&e, b, 3);

        env_close(&e);
        env_open(&e);

        ASSERT_EQ(hub_outbox_head(e.o), 10);
        ASSERT_OK(hub_outbox_endpoint_get(e.o, "a", &a));
        ASSERT_OK(hub_outbox_endpoint_get(e.o, "b", &b));
        stats(a, &st);
        ASSERT_EQ(st.cursor, 7);
        ASSERT_EQ(st.delivered, 7);
        ASSERT_EQ(st.backlog_count, 3);
        stats(b, &st);
        ASSERT_EQ(st.cursor, 3);
        ASSERT_EQ(st.backlog_count, 7);

        ASSERT_OK(hub_outbox_read(e.o, a, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 3);
        ASSERT_EQ(v[0].seq, 8);
        v = hub_outbox_entries_free(v, n);
        ASSERT_OK(hub_outbox_read(e.o, b, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 7);
        ASSERT_EQ(v[0].seq, 4);
        v = hub_outbox_entries_free(v, n);

        /* Numbering continues. */
        e.last_seq = 10;
        ASSERT_EQ(append1(&e, "dev1", "y"), 11);

        /* A newly opened endpoint starts at the head. */
        struct hub_outbox_endpoint *c;
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "c", NULL, &c));
        stats(c, &st);
        ASSERT_EQ(st.cursor, 11);
        ASSERT_EQ(st.backlog_count, 0);

        /* Endpoints are listed. */
        size_t count = 0;
        for (size_t i = 0; hub_outbox_endpoint_at(e.o, i); i++)
                count++;
        ASSERT_EQ(count, 4);
        env_done(&e);
}

struct gc_ctx {
        unsigned n;
        int r;
        uint64_t deleted;
};

static void gc_done(int r, uint64_t n, void *ud) {
        struct gc_ctx *g = ud;
        g->n++;
        g->r = r;
        g->deleted = n;
}

static uint64_t gc_wait(struct env *e) {
        struct gc_ctx g = { 0 };
        int r = hub_outbox_gc(e->o, gc_done, &g);
        ASSERT_OK(r);
        if (r == 0)
                return 0;
        wait_for(e, &g.n, 1);
        ASSERT_OK(g.r);
        return g.deleted;
}

static void test_gc(void) {
        struct env e;
        struct hub_outbox_endpoint *a, *ev;
        struct hub_outbox_stats os;
        struct hub_outbox_endpoint_stats st;

        env_init(&e);
        e.events.ttl_usec = 3600 * SEC; /* retention */
        env_close(&e);
        env_open(&e);

        ASSERT_OK(hub_outbox_endpoint_open(e.o, "a", NULL, &a));
        ASSERT_OK(hub_outbox_endpoint_get(e.o, HUB_OUTBOX_EVENTS, &ev));
        for (int i = 0; i < 10; i++)
                append1(&e, "dev1", "x");

        /* Cursor passed, retention not elapsed: nothing goes. */
        ack_wait(&e, a, 10);
        ASSERT_EQ(gc_wait(&e), 0);
        hub_outbox_get_stats(e.o, &os);
        ASSERT_EQ(os.stored_count, 10);

        /* Retention elapsed, but "a" lags behind: only what it passed goes. */
        for (int i = 0; i < 5; i++)
                append1(&e, "dev1", "y");
        hub_fake_clock_advance(&e.clock, 3601 * SEC);
        ASSERT_EQ(gc_wait(&e), 10);
        hub_outbox_get_stats(e.o, &os);
        ASSERT_EQ(os.stored_count, 5);
        stats(ev, &st);
        ASSERT_EQ(st.expiries, 15); /* retention moved the events stream past all 15 */
        ASSERT_EQ(st.backlog_count, 0);

        ack_wait(&e, a, 15);
        ASSERT_EQ(gc_wait(&e), 5);
        hub_outbox_get_stats(e.o, &os);
        ASSERT_EQ(os.stored_count, 0);
        ASSERT_EQ(os.deleted, 15);

        /* Everything was deleted: numbers still do not repeat after a restart. */
        env_close(&e);
        env_open(&e);
        ASSERT_EQ(hub_outbox_head(e.o), 15);
        e.last_seq = 15;
        ASSERT_EQ(append1(&e, "dev1", "z"), 16);

        /* A deleted endpoint no longer holds messages back. */
        struct hub_outbox_endpoint *slow;
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "slow", NULL, &slow));
        append1(&e, "dev1", "z");
        ASSERT_OK(hub_outbox_endpoint_get(e.o, "a", &a));
        ack_wait(&e, a, 17);
        hub_fake_clock_advance(&e.clock, 3601 * SEC);
        (void) gc_wait(&e);
        (void) gc_wait(&e);
        hub_outbox_get_stats(e.o, &os);
        ASSERT_EQ(os.stored_count, 1); /* 16 went (before slow existed), 17 is held by "slow" */
        ASSERT_OK(hub_outbox_endpoint_delete(e.o, "slow"));
        ASSERT_ERR(hub_outbox_endpoint_get(e.o, "slow", &a), -ENOENT);
        ASSERT_EQ(gc_wait(&e), 1);
        env_done(&e);
}

static void test_capacity_drop_oldest(void) {
        struct env e;
        struct hub_outbox_endpoint *ep;
        struct hub_outbox_entry *v = NULL;
        struct hub_outbox_endpoint_stats st;
        size_t n = 0;

        env_init(&e);
        struct hub_outbox_endpoint_options opts = { .max_count = 5, .overflow = HUB_OUTBOX_DROP_OLDEST };
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "d", &opts, &ep));
        for (int i = 0; i < 8; i++)
                append1(&e, "dev1", "x");
        stats(ep, &st);
        ASSERT_EQ(st.drops, 3);
        ASSERT_EQ(st.backlog_count, 5);
        ASSERT_EQ(st.cursor, 3);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 5);
        ASSERT_EQ(v[0].seq, 4);
        v = hub_outbox_entries_free(v, n);
        ASSERT_EQ(e.n_ok, 8); /* every publisher was acknowledged */

        /* Byte bound: reconfigured on the fly. */
        size_t one = (size_t) st.backlog_bytes / 5;
        opts = (struct hub_outbox_endpoint_options) { .max_bytes = 2 * one, .overflow = HUB_OUTBOX_DROP_OLDEST };
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "d", &opts, &ep));
        stats(ep, &st);
        ASSERT_EQ(st.drops, 6);
        ASSERT_EQ(st.backlog_count, 2);

        /* Drops are durable. */
        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_outbox_endpoint_get(e.o, "d", &ep));
        stats(ep, &st);
        ASSERT_EQ(st.drops, 6);
        ASSERT_EQ(st.cursor, 6);
        env_done(&e);
}

static void test_capacity_reject_new(void) {
        struct env e;
        struct hub_outbox_endpoint *ep;
        struct hub_outbox_endpoint_stats st;
        struct hub_outbox_stats os;

        env_init(&e);
        struct hub_outbox_endpoint_options opts = { .max_count = 3, .overflow = HUB_OUTBOX_REJECT_NEW };
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "r", &opts, &ep));

        /* Queued (not yet durable) appends count. */
        for (int i = 0; i < 3; i++) {
                struct hub_msg *m = mkmsg("dev1", "x");
                ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
                hub_msg_unref(m);
        }
        struct hub_msg *m = mkmsg("dev1", "x");
        ASSERT_ERR(hub_outbox_append(e.o, m, append_done, &e), -ENOBUFS);
        wait_for(&e, &e.n_done, 3);
        ASSERT_ERR(hub_outbox_append(e.o, m, append_done, &e), -ENOBUFS);
        ASSERT_EQ(e.n_done, 3); /* no completion for refused appends */
        hub_outbox_get_stats(e.o, &os);
        ASSERT_EQ(os.stored_count, 3); /* nothing stored */
        ASSERT_EQ(os.head, 3);
        stats(ep, &st);
        ASSERT_EQ(st.rejected, 2);
        ASSERT_EQ(st.drops, 0);

        /* Room again once the endpoint delivered. */
        ack_wait(&e, ep, 1);
        ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
        wait_for(&e, &e.n_done, 4);
        ASSERT_EQ(e.last_seq, 4);
        hub_msg_unref(m);

        /* Bytes bound too. */
        stats(ep, &st);
        opts = (struct hub_outbox_endpoint_options) { .max_bytes = st.backlog_bytes, .overflow = HUB_OUTBOX_REJECT_NEW };
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "r", &opts, &ep));
        m = mkmsg("dev1", "x");
        ASSERT_ERR(hub_outbox_append(e.o, m, append_done, &e), -ENOBUFS);
        hub_msg_unref(m);
        env_done(&e);
}

static void test_ttl_time_rule(void) {
        struct env e;
        struct hub_outbox_endpoint *ep;
        struct hub_outbox_entry *v = NULL;
        struct hub_outbox_endpoint_stats st;
        struct hub_outbox_endpoint_options opts = { .ttl_usec = 60 * SEC };
        size_t n = 0;

        /* Within a boot: the boot clock counts, the wall clock does not. */
        env_init(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "t", &opts, &ep));
        append1(&e, "dev1", "m1");
        hub_fake_clock_advance(&e.clock, 30 * SEC);
        append1(&e, "dev1", "m2");
        hub_fake_clock_advance(&e.clock, 40 * SEC); /* m1 is 70 s old, m2 40 s */
        stats(ep, &st);
        ASSERT_EQ(st.oldest_age_usec, 70 * SEC);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 1);
        ASSERT_EQ(v[0].seq, 2);
        v = hub_outbox_entries_free(v, n);
        stats(ep, &st);
        ASSERT_EQ(st.expiries, 1);
        ASSERT_EQ(st.cursor, 1);

        /* A backward wall-clock jump changes nothing... */
        set_clock(&e, T0 - 86400 * SEC, e.clock.monotonic);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);
        /* ...nor does a forward one; the boot clock does. */
        set_clock(&e, T0 + 365 * 86400 * SEC, e.clock.monotonic);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);
        hub_fake_clock_advance(&e.clock, 20 * SEC);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 0);
        stats(ep, &st);
        ASSERT_EQ(st.expiries, 2);

        /* A read stops before an expired message that is not at the front. */
        append1(&e, "dev1", "m3");
        set_clock(&e, e.clock.realtime, e.clock.monotonic + 30 * SEC);
        append1(&e, "dev1", "m4");
        /* m3 30 s, m4 0 s: in the range. Now an earlier in-flight window: read after m3. */
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 2);
        v = hub_outbox_entries_free(v, n);
        hub_fake_clock_advance(&e.clock, 45 * SEC); /* m3 75 s (expired), m4 45 s */
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n)); /* m3 at the front: moved past */
        ASSERT_EQ(n, 1);
        ASSERT_EQ(v[0].seq, 4);
        v = hub_outbox_entries_free(v, n);
        stats(ep, &st);
        ASSERT_EQ(st.expiries, 3);
        env_done(&e);

        /* Across boots, with the wall clock not synchronised: ages are unknown, nothing
         * expires, however far the wall clock moves. */
        env_init(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "t", &opts, &ep));
        append1(&e, "dev1", "old");
        env_close(&e);
        e.boot_id = "boot-b";
        set_clock(&e, T0 + 86400 * SEC, 5 * SEC);
        env_open(&e);
        ASSERT_OK(hub_outbox_endpoint_get(e.o, "t", &ep));
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "t", &opts, &ep));
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);
        /* Synchronised now, but it was not when the message was stored: still unknown. */
        hub_outbox_set_clock_synchronized(e.o, true);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);
        stats(ep, &st);
        ASSERT_EQ(st.expiries, 0);
        env_done(&e);

        /* Across boots with a synchronised clock both times: wall-clock age counts, and a
         * backward jump gives age 0. */
        env_init(&e);
        e.synced = true;
        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "t", &opts, &ep));
        append1(&e, "dev1", "a");
        env_close(&e);
        e.boot_id = "boot-c";
        set_clock(&e, T0 - 3600 * SEC, 2 * SEC); /* backward */
        env_open(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "t", &opts, &ep));
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);
        set_clock(&e, T0 + 61 * SEC, 3 * SEC);
        ASSERT_OK(hub_outbox_read(e.o, ep, 0, 100, 0, &v, &n));
        ASSERT_EQ(n, 0);
        stats(ep, &st);
        ASSERT_EQ(st.expiries, 1);
        env_done(&e);
}

static void hook(void *ud, uint64_t seq) {
        struct env *e = ud;
        e->n_hook++;
        e->last_hook_seq = seq;
}

static void test_events_read(void) {
        struct env e;
        struct hub_outbox_entry *v = NULL;
        size_t n = 0;
        char buf[32];

        env_init(&e);
        hub_outbox_set_appended_hook(e.o, hook, &e);
        append1(&e, "dev1", "a");
        append1(&e, "dev2", "b");
        append1(&e, "dev1", "c");
        ASSERT_EQ(e.n_hook, 3);
        ASSERT_EQ(e.last_hook_seq, 3);

        ASSERT_OK(hub_events_read(e.o, 0, 100, NULL, &v, &n));
        ASSERT_EQ(n, 3);
        v = hub_outbox_entries_free(v, n);
        ASSERT_OK(hub_events_read(e.o, 0, 100, "dev1", &v, &n));
        ASSERT_EQ(n, 2);
        ASSERT_STREQ(body_of(&v[0], buf, sizeof buf), "a");
        ASSERT_STREQ(body_of(&v[1], buf, sizeof buf), "c");
        ASSERT_EQ(v[1].seq, 3);
        v = hub_outbox_entries_free(v, n);
        ASSERT_OK(hub_events_read(e.o, 1, 100, "dev1", &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);
        ASSERT_OK(hub_events_read(e.o, 0, 100, "nobody", &v, &n));
        ASSERT_EQ(n, 0);
        ASSERT_NULL(v);
        ASSERT_OK(hub_events_read(e.o, hub_outbox_head(e.o), 100, NULL, &v, &n));
        ASSERT_EQ(n, 0);
        ASSERT_OK(hub_events_read(e.o, 0, 1, NULL, &v, &n));
        ASSERT_EQ(n, 1);
        v = hub_outbox_entries_free(v, n);

        /* Module messages keep their module id. */
        struct hub_msg *m = mkmsg("dev3", "mod");
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_MODULE_ID, "m1"));
        ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
        hub_msg_unref(m);
        wait_for(&e, &e.n_done, 4);
        ASSERT_OK(hub_events_read(e.o, 3, 100, "dev3", &v, &n));
        ASSERT_EQ(n, 1);
        ASSERT_STREQ(v[0].module_id, "m1");
        v = hub_outbox_entries_free(v, n);
        ASSERT_ERR(hub_events_read(e.o, 0, 0, NULL, &v, &n), -EINVAL);
        env_done(&e);
}

/* The index summarises chunks of rows and looks at single rows only where a question falls
 * inside a chunk: its answers must equal the log's, row for row, over several chunks, with
 * cursors, capacity cuts, TTL cuts and collections in the middle of chunks, and after a
 * reopen. */
static uint64_t sql_u64(struct env *e, const char *sql, uint64_t arg) {
        sqlite3 *db = hub_store_read_db(e->store);
        sqlite3_stmt *st = NULL;
        uint64_t v = 0;

        ASSERT_EQ(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_int64(st, 1, (sqlite3_int64) arg);
        ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
        v = (uint64_t) sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        return v;
}

static uint64_t sql_u64_db(sqlite3 *db, const char *sql) {
        sqlite3_stmt *st = NULL;
        uint64_t v = 0;
        if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
                v = (uint64_t) sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        return v;
}

static void check_backlog(struct env *e, struct hub_outbox_endpoint *ep) {
        struct hub_outbox_endpoint_stats st;
        struct hub_outbox_stats os;

        stats(ep, &st);
        ASSERT_EQ(st.backlog_count, sql_u64(e, "SELECT count(*) FROM outbox WHERE seq > ?1", st.cursor));
        ASSERT_EQ(st.backlog_bytes, sql_u64(e, "SELECT ifnull(sum(size), 0) FROM outbox WHERE seq > ?1", st.cursor));
        hub_outbox_get_stats(e->o, &os);
        ASSERT_EQ(os.stored_count, sql_u64(e, "SELECT count(*) FROM outbox WHERE seq > ?1", 0));
        ASSERT_EQ(os.stored_bytes, sql_u64(e, "SELECT ifnull(sum(size), 0) FROM outbox WHERE seq > ?1", 0));
}

static int limit_pages(struct hub_store_txn *txn, void *ud) {
        sqlite3 *db = hub_store_txn_db(txn);
        char sql[96];
        (void) ud;
        snprintf(sql, sizeof sql, "PRAGMA max_page_count = %" PRIu64,
                 sql_u64_db(db, "PRAGMA page_count"));
        return sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK ? 0 : -EIO;
}

static int exec_sql_fn(struct hub_store_txn *txn, void *ud) {
        return sqlite3_exec(hub_store_txn_db(txn), ud, NULL, NULL, NULL) == SQLITE_OK ? 0 : -EIO;
}

static int unlimit_pages(struct hub_store_txn *txn, void *ud) {
        (void) ud;
        return sqlite3_exec(hub_store_txn_db(txn), "PRAGMA max_page_count = 1073741823", NULL, NULL, NULL) == SQLITE_OK
                       ? 0
                       : -EIO;
}

static void gc_count_done(int r, uint64_t n_deleted, void *ud) {
        ASSERT_OK(r);
        (void) n_deleted;
        (*(unsigned *) ud)++;
}

/* test_index_chunks: close and open the outbox again, with its endpoints a, b (ob), c (oc) and
 * the events stream. */
static void reopen_abc(struct env *e, const struct hub_outbox_endpoint_options *ob,
                       const struct hub_outbox_endpoint_options *oc, struct hub_outbox_endpoint **a,
                       struct hub_outbox_endpoint **b, struct hub_outbox_endpoint **c, struct hub_outbox_endpoint **ev) {
        env_close(e);
        env_open(e);
        ASSERT_OK(hub_outbox_endpoint_open(e->o, "a", NULL, a));
        ASSERT_OK(hub_outbox_endpoint_open(e->o, "b", ob, b));
        ASSERT_OK(hub_outbox_endpoint_open(e->o, "c", oc, c));
        ASSERT_OK(hub_outbox_endpoint_get(e->o, HUB_OUTBOX_EVENTS, ev));
}

static void test_index_chunks(void) {
        const unsigned ROUNDS = 7, PER = 700; /* rounds cut across the index's 1,024-row chunks */
        struct hub_outbox_endpoint *a, *b, *c, *ev;
        struct hub_outbox_endpoint_stats st;
        struct env e;
        uint64_t base_mono;
        char body[200];

        memset(&e, 0, sizeof e);
        test_tmpdir(e.dir, sizeof e.dir);
        hub_fake_clock_init(&e.clock, T0);
        e.boot_id = "boot-a";
        e.events = (struct hub_outbox_endpoint_options) { .ttl_usec = 10 * SEC };
        env_open(&e);
        base_mono = e.clock.monotonic;

        ASSERT_OK(hub_outbox_endpoint_open(e.o, "a", NULL, &a));
        struct hub_outbox_endpoint_options ob = { .max_count = 1500, .overflow = HUB_OUTBOX_DROP_OLDEST };
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "b", &ob, &b));
        struct hub_outbox_endpoint_options oc = { .max_bytes = 100000, .overflow = HUB_OUTBOX_DROP_OLDEST };
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "c", &oc, &c));
        ASSERT_OK(hub_outbox_endpoint_get(e.o, HUB_OUTBOX_EVENTS, &ev));

        for (unsigned r = 0; r < ROUNDS; r++) {
                set_clock(&e, T0 + r * SEC, base_mono + r * SEC);
                for (unsigned i = 0; i < PER; i++) {
                        unsigned k = r * PER + i;
                        memset(body, 'x', sizeof body);
                        snprintf(body, sizeof body, "%u", k);
                        body[strlen(body)] = 'x';
                        body[10 + k % 150] = 0; /* sizes vary */
                        struct hub_msg *m = mkmsg(k % 2 ? "dev1" : "dev2", body);
                        ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
                        hub_msg_unref(m);
                }
                wait_for(&e, &e.n_done, (r + 1) * PER);
        }
        ASSERT_EQ(e.n_ok, ROUNDS * PER);

        /* Capacity: exactly 1,500 left after b's cursor; c within its bytes, one more over. */
        stats(b, &st);
        ASSERT_EQ(st.backlog_count, 1500);
        ASSERT_EQ(st.drops, ROUNDS * PER - 1500);
        ASSERT_EQ(st.cursor, ROUNDS * PER - 1500);
        stats(c, &st);
        ASSERT_TRUE(st.backlog_bytes <= 100000);
        ASSERT_TRUE(sql_u64(&e, "SELECT sum(size) FROM outbox WHERE seq >= ?1", st.cursor) > 100000);
        ASSERT_EQ(st.drops, st.cursor);
        check_backlog(&e, a);
        check_backlog(&e, b);
        check_backlog(&e, c);
        check_backlog(&e, ev);

        /* Acks inside chunks count exactly what they pass. */
        ack_wait(&e, a, 1234);
        stats(a, &st);
        ASSERT_EQ(st.delivered, 1234);
        check_backlog(&e, a);
        ack_wait(&e, a, 3333);
        stats(a, &st);
        ASSERT_EQ(st.delivered, 3333);
        check_backlog(&e, a);

        /* The events TTL expires rounds 0..2 (2,100 messages, the cut inside a chunk). */
        set_clock(&e, T0 + 12 * SEC, base_mono + 12 * SEC);
        stats(ev, &st);
        ASSERT_EQ(st.oldest_age_usec, 12 * SEC);
        unsigned n_gc = 0, gc_runs = 0;
        for (unsigned i = 0; i < 10; i++) {
                int r = hub_outbox_gc(e.o, gc_count_done, &n_gc);
                ASSERT_TRUE(r >= 0);
                if (r == 1)
                        wait_for(&e, &n_gc, ++gc_runs);
        }
        stats(ev, &st);
        ASSERT_EQ(st.expiries, 3 * PER);
        ASSERT_EQ(st.cursor, 3 * PER);
        ASSERT_EQ(st.oldest_age_usec, 9 * SEC);
        /* Everything up to the smallest cursor (events, 2,100) is collected. */
        ASSERT_EQ(sql_u64(&e, "SELECT min(seq) FROM outbox WHERE seq > ?1", 0), 3 * PER + 1);
        check_backlog(&e, a);
        check_backlog(&e, b);
        check_backlog(&e, c);
        check_backlog(&e, ev);

        /* Reopened: the index is rebuilt from the chunk summaries (closed chunks were saved;
         * the collection deleted those of the chunks it deleted entirely) and the rows no
         * summary covers, counters kept. */
        ASSERT_EQ(sql_u64(&e, "SELECT count(*) FROM outbox_chunks WHERE last > ?1", 3 * PER), 2); /* of 4 closed */
        ASSERT_EQ(sql_u64(&e, "SELECT count(*) FROM outbox_chunks WHERE last <= ?1", 3 * PER), 0);
        reopen_abc(&e, &ob, &oc, &a, &b, &c, &ev);
        stats(a, &st);
        ASSERT_EQ(st.delivered, 3333);
        check_backlog(&e, a);
        check_backlog(&e, b);
        check_backlog(&e, c);
        check_backlog(&e, ev);
        /* Appends that fail (the database cannot grow) leave gaps inside a chunk. */
        ASSERT_OK(hub_store_submit_wait(e.store, limit_pages, NULL));
        static char big[200000];
        memset(big, 'y', sizeof big - 1);
        unsigned ok0 = e.n_ok, done0 = e.n_done, fails = 0;
        /* The free pages the collection left fill up first. */
        for (unsigned i = 0; i < 40 && fails < 4; i++) {
                struct hub_msg *m = mkmsg("dev3", big);
                ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
                hub_msg_unref(m);
                wait_for(&e, &e.n_done, e.n_done + 1);
                if (e.last_r < 0) {
                        ASSERT_ERR(e.last_r, -ENOSPC);
                        fails++;
                }
        }
        ASSERT_EQ(fails, 4);
        unsigned big_ok = e.n_ok - ok0;
        done0 = e.n_done;
        ok0 = e.n_ok;
        ASSERT_OK(hub_store_submit_wait(e.store, unlimit_pages, NULL));
        for (unsigned i = 0; i < 300; i++) {
                snprintf(body, sizeof body, "after-gap-%u", i);
                struct hub_msg *m = mkmsg("dev1", body);
                ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
                hub_msg_unref(m);
        }
        wait_for(&e, &e.n_done, done0 + 300);
        ASSERT_EQ(e.n_ok, ok0 + 300);
        ASSERT_EQ(sql_u64(&e, "SELECT count(*) FROM outbox WHERE seq > ?1", ROUNDS * PER), big_ok + 300);
        check_backlog(&e, a);
        check_backlog(&e, b);
        check_backlog(&e, c);
        check_backlog(&e, ev);
        /* A count cut across the gap: the rows passed are exactly the drops. */
        stats(b, &st);
        uint64_t cur0 = st.cursor, drops0 = st.drops;
        ob.max_count = 250;
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "b", &ob, &b));
        stats(b, &st);
        ASSERT_EQ(st.backlog_count, 250);
        ASSERT_EQ(st.drops - drops0, sql_u64(&e, "SELECT count(*) FROM outbox WHERE seq > ?1", cur0) - 250);
        check_backlog(&e, b);
        ob.max_count = 1500;
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "b", &ob, &b));
        /* An ack just after the gap counts the rows it passes, not the sequence numbers. */
        uint64_t target = ROUNDS * PER + big_ok + 4 + 50;
        ASSERT_EQ(sql_u64(&e, "SELECT count(*) FROM outbox WHERE seq > ?1", target), 250);
        stats(a, &st);
        uint64_t del0 = st.delivered;
        ack_wait(&e, a, ROUNDS * PER); /* just before the gap, in the same chunk */
        stats(a, &st);
        ASSERT_EQ(st.delivered - del0, ROUNDS * PER - 3333);
        ack_wait(&e, a, target);
        stats(a, &st);
        ASSERT_EQ(st.delivered - del0, sql_u64(&e, "SELECT count(*) FROM outbox WHERE seq > ?1", 3333) - 250);
        check_backlog(&e, a);

        /* The same answers whatever the summaries: none (a store from before them), a stale
         * one for collected rows, implausible ones, one overlapping the next. */
        static const char *const summaries[] = {
                "DELETE FROM outbox_chunks",
                "INSERT INTO outbox_chunks VALUES (1, 5, 5, 999, 0, 0, 0, 0, 1, 1)",
                "UPDATE outbox_chunks SET count = 5000 WHERE first = (SELECT max(first) FROM outbox_chunks)",
                "UPDATE outbox_chunks SET last = first - 1 WHERE first = (SELECT min(first) FROM outbox_chunks)",
        };
        for (size_t i = 0; i < ELEMENTSOF(summaries); i++) {
                env_close(&e);
                env_open(&e);
                ASSERT_OK(hub_store_submit_wait(e.store, exec_sql_fn, (void *) summaries[i]));
                reopen_abc(&e, &ob, &oc, &a, &b, &c, &ev);
                check_backlog(&e, a);
                check_backlog(&e, b);
                check_backlog(&e, c);
                check_backlog(&e, ev);
        }

        /* A drop-oldest cut inside a chunk after the reopen. */
        env_close(&e);
        env_open(&e);
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "a", NULL, &a));
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "c", &oc, &c));
        check_backlog(&e, a);
        check_backlog(&e, c);
        ob.max_count = 77;
        ASSERT_OK(hub_outbox_endpoint_open(e.o, "b", &ob, &b));
        stats(b, &st);
        ASSERT_EQ(st.backlog_count, 77);
        check_backlog(&e, b);
        env_done(&e);
}

/* Drop-oldest under a fast ingest collects by itself once a collection's worth of rows is
 * behind every cursor: the log stays bounded without the caller's once-a-second calls. */
static void test_gc_kick(void) {
        struct hub_outbox_stats os;
        struct env e;

        memset(&e, 0, sizeof e);
        test_tmpdir(e.dir, sizeof e.dir);
        hub_fake_clock_init(&e.clock, T0);
        e.boot_id = "boot-a";
        e.events = (struct hub_outbox_endpoint_options) { .max_count = 100, .overflow = HUB_OUTBOX_DROP_OLDEST };
        env_open(&e);
        for (unsigned r = 0; r < 30; r++) {
                for (unsigned i = 0; i < 1000; i++) {
                        struct hub_msg *m = mkmsg("dev1", "{\"v\":1}");
                        ASSERT_OK(hub_outbox_append(e.o, m, append_done, &e));
                        hub_msg_unref(m);
                }
                wait_for(&e, &e.n_done, (r + 1) * 1000);
        }
        ASSERT_EQ(e.n_ok, 30000);
        hub_outbox_get_stats(e.o, &os);
        fprintf(stderr, "  stored %" PRIu64 ", deleted %" PRIu64 "\n", os.stored_count, os.deleted);
        ASSERT_TRUE(os.deleted >= 10000);
        ASSERT_TRUE(os.stored_count <= 100 + 10000 + 2 * 1000 + 20000);
        ASSERT_EQ(os.stored_count + os.deleted, 30000);
        env_done(&e);
}

int main(void) {
        TEST_RUN(test_append_read_ack);
        TEST_RUN(test_batch);
        TEST_RUN(test_endpoints_persist);
        TEST_RUN(test_gc);
        TEST_RUN(test_capacity_drop_oldest);
        TEST_RUN(test_capacity_reject_new);
        TEST_RUN(test_ttl_time_rule);
        TEST_RUN(test_events_read);
        TEST_RUN(test_index_chunks);
        TEST_RUN(test_gc_kick);
        return 0;
}
