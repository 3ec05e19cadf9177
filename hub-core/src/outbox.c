/* SPDX-License-Identifier: MIT */
/* The outbox: durable D2C log with per-endpoint cursors, the events stream (hub/outbox.h).
 *
 * Storage (store migration 4): `outbox` holds one row per message, keyed by its sequence
 * number, with the serialized hub_msg, its device and module, its size and its enqueue
 * times: the wall clock, the boot it was stored in (`outbox_boots`) and that boot's
 * monotonic clock. `outbox_endpoints` holds each endpoint's cursor and counters.
 *
 * Sequence numbers are assigned here, on the owner's thread, when an append is queued: the
 * store runs writes in submission order and dispatches their completions in that order, so
 * the log is in sequence order and completions arrive in sequence order. A failed append
 * leaves a gap, which readers never notice (they ask for "after seq"). Rows are deleted only
 * up to every endpoint's durable cursor, and the events endpoint always exists, so the
 * largest cursor or row gives the high-water mark after a restart: numbers never repeat.
 *
 * In memory, an index (a ring of small entries, one per stored row, in sequence order, with
 * running byte totals) answers every accounting question without a query: an endpoint's
 * backlog is the entries after its cursor (binary search), its bytes a difference of running
 * totals, its oldest age the first of them. */

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/registry.h"
#include "hub/store.h"
#include "store-internal.h"
#include "store-schema.h"

const char hub_outbox_schema_sql[] =
        "CREATE TABLE outbox_boots (\n"
        "  id INTEGER PRIMARY KEY,\n"
        "  boot_id TEXT NOT NULL UNIQUE\n"
        ");\n"
        "CREATE TABLE outbox (\n"
        "  seq INTEGER PRIMARY KEY,\n"
        "  device_id TEXT NOT NULL,\n"
        "  module_id TEXT,\n"
        "  enqueued INTEGER NOT NULL,\n"  /* wall clock, usec */
        "  boot INTEGER NOT NULL,\n"      /* outbox_boots.id */
        "  boot_time INTEGER NOT NULL,\n" /* CLOCK_BOOTTIME of that boot, usec */
        "  flags INTEGER NOT NULL,\n"     /* 1 = wall clock was synchronised */
        "  size INTEGER NOT NULL,\n"
        "  msg BLOB NOT NULL\n"
        ");\n"
        "CREATE INDEX outbox_by_device ON outbox (device_id, seq);\n"
        "CREATE TABLE outbox_endpoints (\n"
        "  name TEXT PRIMARY KEY NOT NULL,\n"
        "  cursor INTEGER NOT NULL,\n"
        "  drops INTEGER NOT NULL DEFAULT 0,\n"
        "  expiries INTEGER NOT NULL DEFAULT 0,\n"
        "  delivered INTEGER NOT NULL DEFAULT 0\n"
        ") WITHOUT ROWID;\n";

#define ENTRY_SYNCED 1u
#define GC_BATCH 20000u
#define READ_MAX 10000u
#define BOOT_ID_MAX 64u

struct ring_entry {
        uint64_t seq;
        uint64_t cum_bytes; /* running total of sizes, this entry included */
        uint64_t enq_wall;
        uint64_t boot_time;
        uint32_t boot;
        uint32_t size;
        uint32_t flags;
};

struct ring {
        struct ring_entry *v;
        size_t start, n, cap;
};

struct ack_waiter {
        struct ack_waiter *next;
        uint64_t seq;
        hub_outbox_done_fn done;
        void *ud;
};

struct hub_outbox_endpoint {
        struct hub_outbox *o;
        char name[HUB_OUTBOX_ENDPOINT_NAME_MAX + 1];
        bool events;
        bool deleted;
        struct hub_outbox_endpoint_options opts;
        uint64_t cursor;         /* in memory; only moves forward */
        uint64_t durable_cursor; /* last value known committed */
        uint64_t queued_cursor;  /* the value the queued write carries */
        uint64_t drops, expiries, delivered, rejected;
        bool writing; /* a cursor write is queued */
        bool dirty;   /* the cursor or counters changed since the queued write's snapshot */
        struct ack_waiter *waiters, *waiters_tail; /* ascending seq */
        struct hub_outbox_endpoint *next_dead;
};

struct hub_outbox {
        struct hub_store *store;
        const struct hub_clock *clock;
        const struct hub_log *log;
        uint32_t boot;
        bool synced;

        struct ring ring;
        uint64_t head;     /* last seq whose append completed */
        uint64_t next_seq; /* next seq to assign */
        uint64_t pending_count, pending_bytes;
        unsigned n_pending; /* our writes queued in the store (appends, cursors, gc) */
        bool gc_running;
        uint64_t appended, append_failures, deleted;

        struct hub_outbox_endpoint **eps;
        size_t n_eps;
        struct hub_outbox_endpoint *events;
        struct hub_outbox_endpoint *dead; /* deleted endpoints, freed with the outbox */

        void (*appended_fn)(void *ud, uint64_t seq);
        void *appended_ud;

        /* Commit thread only. */
        sqlite3_stmt *w_insert;
        /* Read connection (owner's thread). */
        sqlite3_stmt *st_range, *st_range_dev;
};

/* ---- in-memory index ---------------------------------------------------------------------- */

static struct ring_entry *ring_at(const struct ring *r, size_t i) {
        return &r->v[r->start + i];
}

static int ring_push(struct ring *r, const struct ring_entry *e) {
        if (r->start + r->n == r->cap) {
                if (r->start > 0 && r->start >= r->cap / 2) {
                        memmove(r->v, r->v + r->start, r->n * sizeof *r->v);
                        r->start = 0;
                } else {
                        size_t cap = r->cap ? r->cap * 2 : 1024;
                        struct ring_entry *v = realloc(r->v, cap * sizeof *v);
                        if (!v)
                                return -ENOMEM;
                        r->v = v;
                        r->cap = cap;
                }
        }
        struct ring_entry x = *e;
        x.cum_bytes = (r->n > 0 ? ring_at(r, r->n - 1)->cum_bytes : 0) + e->size;
        r->v[r->start + r->n++] = x;
        return 0;
}

static void ring_pop(struct ring *r, size_t k) {
        k = MIN(k, r->n);
        r->start += k;
        r->n -= k;
        if (r->n == 0)
                r->start = 0;
}

/* Index of the first entry with seq > s (r->n when none). */
static size_t ring_after(const struct ring *r, uint64_t s) {
        size_t lo = 0, hi = r->n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (ring_at(r, mid)->seq <= s)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

/* Bytes of entries [i, n). */
static uint64_t ring_bytes_from(const struct ring *r, size_t i) {
        if (i >= r->n)
                return 0;
        const struct ring_entry *f = ring_at(r, i);
        return ring_at(r, r->n - 1)->cum_bytes - (f->cum_bytes - f->size);
}

/* ---- the time rule ---------------------------------------------------------------------- */

/* The age of a message stored at (enq_wall, boot, boot_time, flags), or false when it is
 * unknown (another boot, and the wall clock was not synchronised then or is not now). */
static bool message_age(const struct hub_outbox *o, uint64_t enq_wall, uint32_t boot, uint64_t boot_time,
                        uint32_t flags, uint64_t now_wall, uint64_t now_mono, uint64_t *ret_age) {
        if (boot == o->boot) {
                *ret_age = now_mono > boot_time ? now_mono - boot_time : 0;
                return true;
        }
        if (!o->synced || !(flags & ENTRY_SYNCED))
                return false;
        *ret_age = now_wall > enq_wall ? now_wall - enq_wall : 0; /* backward jump: age 0 */
        return true;
}

static bool expired(const struct hub_outbox *o, const struct hub_outbox_endpoint *ep, uint64_t enq_wall,
                    uint32_t boot, uint64_t boot_time, uint32_t flags, uint64_t now_wall, uint64_t now_mono) {
        uint64_t age;

        if (ep->opts.ttl_usec == 0)
                return false;
        if (!message_age(o, enq_wall, boot, boot_time, flags, now_wall, now_mono, &age))
                return false;
        return age >= ep->opts.ttl_usec;
}

/* ---- cursor persistence ------------------------------------------------------------------- */

struct cursor_write {
        struct hub_outbox_endpoint *ep;
        char name[HUB_OUTBOX_ENDPOINT_NAME_MAX + 1];
        uint64_t cursor, drops, expiries, delivered;
};

static int cursor_write_fn(struct hub_store_txn *txn, void *ud) {
        struct cursor_write *w = ud;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db,
                                "INSERT INTO outbox_endpoints (name, cursor, drops, expiries, delivered) "
                                "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET "
                                "cursor = MAX(cursor, excluded.cursor), drops = excluded.drops, "
                                "expiries = excluded.expiries, delivered = excluded.delivered",
                                -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(st, 1, w->name, -1, SQLITE_STATIC);
                sqlite3_bind_int64(st, 2, (sqlite3_int64) w->cursor);
                sqlite3_bind_int64(st, 3, (sqlite3_int64) w->drops);
                sqlite3_bind_int64(st, 4, (sqlite3_int64) w->expiries);
                sqlite3_bind_int64(st, 5, (sqlite3_int64) w->delivered);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static int persist(struct hub_outbox_endpoint *ep);

static void fire_waiters(struct hub_outbox_endpoint *ep, uint64_t upto, int r) {
        while (ep->waiters && ep->waiters->seq <= upto) {
                struct ack_waiter *a = ep->waiters;
                ep->waiters = a->next;
                if (!ep->waiters)
                        ep->waiters_tail = NULL;
                a->done(r, a->ud);
                free(a);
        }
}

static void cursor_write_done(int r, void *ud) {
        struct cursor_write *w = ud;
        struct hub_outbox_endpoint *ep = w->ep;
        struct hub_outbox *o = ep->o;

        o->n_pending--;
        ep->writing = false;
        if (r >= 0 && w->cursor > ep->durable_cursor)
                ep->durable_cursor = w->cursor;
        if (r < 0) {
                ep->dirty = true;
                hub_log_debug(o->log, "outbox: cursor of endpoint %s not saved: %s", ep->name, strerror(-r));
        }
        fire_waiters(ep, w->cursor, r);
        if (ep->deleted)
                fire_waiters(ep, UINT64_MAX, -ECANCELED);
        else if (ep->waiters || (ep->dirty && r >= 0)) {
                int k = persist(ep);
                if (k < 0)
                        fire_waiters(ep, UINT64_MAX, k);
        }
        free(w);
}

/* Queues a write of the endpoint's cursor and counters, or marks it dirty when one is
 * already queued (its completion queues the next). */
static int persist(struct hub_outbox_endpoint *ep) {
        struct hub_outbox *o = ep->o;
        struct cursor_write *w;
        int r;

        if (ep->deleted)
                return -ECANCELED;
        if (ep->writing) {
                ep->dirty = true;
                return 0;
        }
        w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        w->ep = ep;
        memcpy(w->name, ep->name, sizeof w->name);
        w->cursor = ep->cursor;
        w->drops = ep->drops;
        w->expiries = ep->expiries;
        w->delivered = ep->delivered;
        r = hub_store_submit(o->store, cursor_write_fn, cursor_write_done, w);
        if (r < 0) {
                free(w);
                ep->dirty = true;
                return r;
        }
        o->n_pending++;
        ep->writing = true;
        ep->dirty = false;
        ep->queued_cursor = w->cursor;
        return 0;
}

/* ---- cursor movement ---------------------------------------------------------------------- */

static void now_times(const struct hub_outbox *o, uint64_t *ret_wall, uint64_t *ret_mono) {
        *ret_wall = hub_clock_now(o->clock);
        *ret_mono = hub_clock_mono(o->clock);
}

/* Moves the cursor past expired messages at the front of the backlog. */
static bool ep_expire_front(struct hub_outbox *o, struct hub_outbox_endpoint *ep, uint64_t now_wall,
                            uint64_t now_mono) {
        bool moved = false;

        if (ep->opts.ttl_usec == 0)
                return false;
        for (size_t i = ring_after(&o->ring, ep->cursor); i < o->ring.n; i++) {
                const struct ring_entry *e = ring_at(&o->ring, i);
                if (!expired(o, ep, e->enq_wall, e->boot, e->boot_time, e->flags, now_wall, now_mono))
                        break;
                ep->cursor = e->seq;
                ep->expiries++;
                moved = true;
        }
        return moved;
}

static bool has_capacity_bound(const struct hub_outbox_endpoint *ep) {
        return ep->opts.max_count > 0 || ep->opts.max_bytes > 0;
}

/* drop-oldest: moves the cursor past the oldest messages while over capacity. */
static bool ep_enforce_capacity(struct hub_outbox *o, struct hub_outbox_endpoint *ep) {
        bool moved = false;

        if (ep->opts.overflow != HUB_OUTBOX_DROP_OLDEST || !has_capacity_bound(ep))
                return false;
        size_t i = ring_after(&o->ring, ep->cursor);
        uint64_t count = o->ring.n - i, bytes = ring_bytes_from(&o->ring, i);
        while (i < o->ring.n && ((ep->opts.max_count > 0 && count > ep->opts.max_count) ||
                                 (ep->opts.max_bytes > 0 && bytes > ep->opts.max_bytes))) {
                const struct ring_entry *e = ring_at(&o->ring, i);
                count--;
                bytes -= e->size;
                ep->cursor = e->seq;
                ep->drops++;
                moved = true;
                i++;
        }
        return moved;
}

/* ---- appends ------------------------------------------------------------------------------ */

struct append_rec {
        struct hub_outbox *o;
        uint64_t seq, enq_wall, boot_time;
        uint32_t flags;
        char *device_id, *module_id;
        uint8_t *blob;
        size_t blob_len;
        hub_outbox_append_done_fn done;
        void *ud;
};

static void append_rec_free(struct append_rec *a) {
        if (!a)
                return;
        free(a->device_id);
        free(a->module_id);
        free(a->blob);
        free(a);
}

static int append_write_fn(struct hub_store_txn *txn, void *ud) {
        struct append_rec *a = ud;
        struct hub_outbox *o = a->o;
        sqlite3 *db = hub_store_txn_db(txn);
        int rc;

        /* The statement lives on the writer connection: prepared and used on the commit
         * thread only (and finalized there by hub_outbox_free()). */
        if (!o->w_insert) {
                rc = sqlite3_prepare_v3(db,
                                        "INSERT INTO outbox (seq, device_id, module_id, enqueued, boot, boot_time, "
                                        "flags, size, msg) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                                        -1, SQLITE_PREPARE_PERSISTENT, &o->w_insert, NULL);
                if (rc != SQLITE_OK) {
                        o->w_insert = NULL;
                        return hub_store_errno(rc);
                }
        }
        sqlite3_stmt *st = o->w_insert;
        sqlite3_bind_int64(st, 1, (sqlite3_int64) a->seq);
        sqlite3_bind_text(st, 2, a->device_id, -1, SQLITE_STATIC);
        if (a->module_id)
                sqlite3_bind_text(st, 3, a->module_id, -1, SQLITE_STATIC);
        else
                sqlite3_bind_null(st, 3);
        sqlite3_bind_int64(st, 4, (sqlite3_int64) a->enq_wall);
        sqlite3_bind_int64(st, 5, (sqlite3_int64) o->boot);
        sqlite3_bind_int64(st, 6, (sqlite3_int64) a->boot_time);
        sqlite3_bind_int64(st, 7, a->flags);
        sqlite3_bind_int64(st, 8, (sqlite3_int64) a->blob_len);
        sqlite3_bind_blob(st, 9, a->blob, (int) a->blob_len, SQLITE_STATIC);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static void append_done(int r, void *ud) {
        struct append_rec *a = ud;
        struct hub_outbox *o = a->o;

        o->n_pending--;
        o->pending_count--;
        o->pending_bytes -= a->blob_len;

        if (r >= 0) {
                struct ring_entry e = {
                        .seq = a->seq,
                        .enq_wall = a->enq_wall,
                        .boot_time = a->boot_time,
                        .boot = o->boot,
                        .size = (uint32_t) a->blob_len,
                        .flags = a->flags,
                };
                /* The row is durable whatever happens here: on -ENOMEM only the in-memory
                 * index misses it (its accounting is low by one) until the next start. */
                if (ring_push(&o->ring, &e) < 0)
                        hub_log_debug(o->log, "outbox: out of memory indexing message %llu",
                                      (unsigned long long) a->seq);
                o->head = MAX(o->head, a->seq);
                o->appended++;
                for (size_t i = 0; i < o->n_eps; i++)
                        if (ep_enforce_capacity(o, o->eps[i]))
                                (void) persist(o->eps[i]);
                if (o->appended_fn)
                        o->appended_fn(o->appended_ud, a->seq);
                if (a->done)
                        a->done(0, a->seq, a->ud);
        } else {
                o->append_failures++;
                hub_log_debug(o->log, "outbox: append of message %llu from %s failed: %s",
                              (unsigned long long) a->seq, a->device_id, strerror(-r));
                if (a->done)
                        a->done(r, 0, a->ud);
        }
        append_rec_free(a);
}

int hub_outbox_append(struct hub_outbox *o, struct hub_msg *m, hub_outbox_append_done_fn done, void *ud) {
        struct append_rec *a = NULL;
        const char *dev, *mod;
        uint8_t *blob = NULL;
        size_t len = 0;
        int r;

        if (!o || !m)
                return -EINVAL;
        dev = hub_msg_get_sys(m, HUB_SYS_CONNECTION_DEVICE_ID);
        mod = hub_msg_get_sys(m, HUB_SYS_CONNECTION_MODULE_ID);
        if (!dev || !hub_device_id_valid(dev) || (mod && !hub_device_id_valid(mod)))
                return -EINVAL;

        r = hub_msg_serialize(m, &blob, &len);
        if (r < 0)
                return r;
        if (len > UINT32_MAX || len > INT32_MAX) {
                free(blob);
                return -E2BIG;
        }

        /* reject-new: refuse before anything is stored. Queued appends count too. */
        for (size_t i = 0; i < o->n_eps; i++) {
                struct hub_outbox_endpoint *ep = o->eps[i];
                if (ep->opts.overflow != HUB_OUTBOX_REJECT_NEW || !has_capacity_bound(ep))
                        continue;
                size_t j = ring_after(&o->ring, ep->cursor);
                uint64_t count = o->ring.n - j + o->pending_count + 1;
                uint64_t bytes = ring_bytes_from(&o->ring, j) + o->pending_bytes + len;
                if ((ep->opts.max_count > 0 && count > ep->opts.max_count) ||
                    (ep->opts.max_bytes > 0 && bytes > ep->opts.max_bytes)) {
                        ep->rejected++;
                        free(blob);
                        return -ENOBUFS;
                }
        }

        a = calloc(1, sizeof *a);
        if (!a) {
                free(blob);
                return -ENOMEM;
        }
        a->o = o;
        a->blob = blob;
        a->blob_len = len;
        a->device_id = strdup(dev);
        a->module_id = mod ? strdup(mod) : NULL;
        if (!a->device_id || (mod && !a->module_id)) {
                append_rec_free(a);
                return -ENOMEM;
        }
        now_times(o, &a->enq_wall, &a->boot_time);
        a->flags = o->synced ? ENTRY_SYNCED : 0;
        a->done = done;
        a->ud = ud;
        a->seq = o->next_seq;

        r = hub_store_submit(o->store, append_write_fn, append_done, a);
        if (r < 0) {
                append_rec_free(a);
                return r;
        }
        o->next_seq++;
        o->n_pending++;
        o->pending_count++;
        o->pending_bytes += len;
        return 0;
}

/* ---- acknowledgements --------------------------------------------------------------------- */

int hub_outbox_ack(struct hub_outbox *o, struct hub_outbox_endpoint *ep, uint64_t seq, hub_outbox_done_fn done,
                   void *ud) {
        struct ack_waiter *a;
        int r;

        if (!o || !ep || ep->o != o || !done || ep->deleted)
                return -EINVAL;
        if (ep->events)
                return -EPERM;
        if (seq > o->head)
                return -EINVAL;
        if (seq <= ep->cursor && seq <= ep->durable_cursor)
                return 0;

        if (seq > ep->cursor) {
                size_t i = ring_after(&o->ring, ep->cursor), j = ring_after(&o->ring, seq);
                ep->delivered += j - i;
                ep->cursor = seq;
        }

        a = calloc(1, sizeof *a);
        if (!a)
                return -ENOMEM;
        *a = (struct ack_waiter) { .seq = seq, .done = done, .ud = ud };
        if (ep->waiters_tail)
                ep->waiters_tail->next = a;
        else
                ep->waiters = a;
        ep->waiters_tail = a;

        r = persist(ep);
        if (r < 0) {
                /* Take the waiter back (it is the tail; nothing else was queued meanwhile). */
                struct ack_waiter **p = &ep->waiters;
                while (*p != a)
                        p = &(*p)->next;
                *p = NULL;
                ep->waiters_tail = NULL;
                for (struct ack_waiter *x = ep->waiters; x; x = x->next)
                        ep->waiters_tail = x;
                free(a);
                return r;
        }
        return 1;
}

/* ---- reads -------------------------------------------------------------------------------- */

struct hub_outbox_entry *hub_outbox_entries_free(struct hub_outbox_entry *e, size_t n) {
        if (!e)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                free(e[i].device_id);
                free(e[i].module_id);
                hub_msg_unref(e[i].msg);
        }
        free(e);
        return NULL;
}

#define ROW_COLUMNS "seq, device_id, module_id, enqueued, boot, boot_time, flags, size, msg"

static int prepare_read(struct hub_outbox *o, sqlite3_stmt **st, const char *sql) {
        int rc;

        if (*st)
                return 0;
        sqlite3 *db = hub_store_read_db(o->store);
        if (!db)
                return -EIO;
        rc = sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
        if (rc != SQLITE_OK) {
                *st = NULL;
                return hub_store_errno(rc);
        }
        return 0;
}

/* Decodes the current row into *e. -EBADMSG for an undecodable message. */
static int row_to_entry(struct hub_outbox *o, sqlite3_stmt *st, struct hub_outbox_entry *e) {
        const void *blob = sqlite3_column_blob(st, 8);
        size_t len = (size_t) sqlite3_column_bytes(st, 8);
        const char *dev = (const char *) sqlite3_column_text(st, 1);
        const char *mod = (const char *) sqlite3_column_text(st, 2);
        struct hub_msg *m = NULL;
        int r;

        *e = (struct hub_outbox_entry) {
                .seq = (uint64_t) sqlite3_column_int64(st, 0),
                .enqueued_usec = (uint64_t) sqlite3_column_int64(st, 3),
                .size = len,
        };
        r = hub_msg_deserialize(blob ? blob : (const void *) "", len, HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0) {
                hub_log_debug(o->log, "outbox: stored message %llu cannot be decoded (%s), skipping it",
                              (unsigned long long) e->seq, strerror(-r));
                return -EBADMSG;
        }
        if (!hub_msg_get_sys(m, HUB_SYS_ENQUEUED_TIME)) {
                char buf[32];
                (void) hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, hub_time_format_iso8601(e->enqueued_usec, buf));
        }
        e->msg = m;
        e->device_id = strdup(dev ? dev : "");
        e->module_id = mod ? strdup(mod) : NULL;
        if (!e->device_id || (mod && !e->module_id)) {
                free(e->device_id);
                free(e->module_id);
                hub_msg_unref(m);
                return -ENOMEM;
        }
        return 0;
}

/* Reads rows after `after` (up to the head) into a new array. ep (may be NULL) stops the
 * batch before an expired message. */
static int read_rows(struct hub_outbox *o, struct hub_outbox_endpoint *ep, uint64_t after, size_t max_count,
                     size_t max_bytes, const char *device, struct hub_outbox_entry **ret_entries, size_t *ret_n) {
        struct hub_outbox_entry *v = NULL;
        size_t n = 0, bytes = 0;
        uint64_t now_wall, now_mono;
        sqlite3_stmt *st;
        int r, rc;

        if (max_count == 0 || max_count > READ_MAX)
                return -EINVAL;
        if (after >= o->head) {
                *ret_entries = NULL;
                *ret_n = 0;
                return 0;
        }
        if (device) {
                r = prepare_read(o, &o->st_range_dev,
                                 "SELECT " ROW_COLUMNS " FROM outbox WHERE device_id = ?4 AND seq > ?1 AND seq <= ?2 "
                                 "ORDER BY seq LIMIT ?3");
                st = o->st_range_dev;
        } else {
                r = prepare_read(o, &o->st_range,
                                 "SELECT " ROW_COLUMNS " FROM outbox WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3");
                st = o->st_range;
        }
        if (r < 0)
                return r;

        v = calloc(MIN(max_count, (size_t) 256), sizeof *v);
        size_t cap = MIN(max_count, (size_t) 256);
        if (!v)
                return -ENOMEM;
        now_times(o, &now_wall, &now_mono);

        sqlite3_bind_int64(st, 1, (sqlite3_int64) after);
        sqlite3_bind_int64(st, 2, (sqlite3_int64) o->head);
        /* Undecodable rows are skipped, so ask for a few more than needed. */
        sqlite3_bind_int64(st, 3, (sqlite3_int64) max_count + 16);
        if (device)
                sqlite3_bind_text(st, 4, device, -1, SQLITE_STATIC);

        r = 0;
        while (n < max_count && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                size_t size = (size_t) sqlite3_column_int64(st, 7);

                if (ep && expired(o, ep, (uint64_t) sqlite3_column_int64(st, 3), (uint32_t) sqlite3_column_int64(st, 4),
                                  (uint64_t) sqlite3_column_int64(st, 5), (uint32_t) sqlite3_column_int64(st, 6),
                                  now_wall, now_mono))
                        break;
                if (max_bytes > 0 && n > 0 && bytes + size > max_bytes)
                        break;
                if (n == cap) {
                        size_t ncap = MIN(cap * 2, max_count);
                        struct hub_outbox_entry *nv = realloc(v, ncap * sizeof *nv);
                        if (!nv) {
                                r = -ENOMEM;
                                break;
                        }
                        v = nv;
                        cap = ncap;
                }
                r = row_to_entry(o, st, &v[n]);
                if (r == -EBADMSG) {
                        r = 0;
                        continue;
                }
                if (r < 0)
                        break;
                bytes += size;
                n++;
        }
        if (r == 0 && n < max_count && rc != SQLITE_ROW && rc != SQLITE_DONE)
                r = hub_store_errno(rc);
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        if (r < 0) {
                hub_outbox_entries_free(v, n);
                return r;
        }
        if (n == 0)
                v = hub_outbox_entries_free(v, 0);
        *ret_entries = v;
        *ret_n = n;
        return 0;
}

int hub_outbox_read(struct hub_outbox *o, struct hub_outbox_endpoint *ep, uint64_t after_seq, size_t max_count,
                    size_t max_bytes, struct hub_outbox_entry **ret_entries, size_t *ret_n) {
        uint64_t now_wall, now_mono;

        if (!o || !ep || ep->o != o || ep->deleted || !ret_entries || !ret_n)
                return -EINVAL;
        now_times(o, &now_wall, &now_mono);
        if (ep_expire_front(o, ep, now_wall, now_mono))
                (void) persist(ep);
        return read_rows(o, ep, MAX(after_seq, ep->cursor), max_count, max_bytes, NULL, ret_entries, ret_n);
}

int hub_events_read(struct hub_outbox *o, uint64_t after_seq, size_t max, const char *device_filter,
                    struct hub_outbox_entry **ret_entries, size_t *ret_n) {
        if (!o || !ret_entries || !ret_n || (device_filter && !hub_device_id_valid(device_filter)))
                return -EINVAL;
        return read_rows(o, NULL, MAX(after_seq, o->events->cursor), max, 0, device_filter, ret_entries, ret_n);
}

/* ---- garbage collection ------------------------------------------------------------------- */

struct gc_job {
        struct hub_outbox *o;
        uint64_t upto;
        uint64_t n_deleted; /* set on the commit thread */
        void (*done)(int result, uint64_t n_deleted, void *ud);
        void *ud;
};

static int gc_write_fn(struct hub_store_txn *txn, void *ud) {
        struct gc_job *g = ud;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "DELETE FROM outbox WHERE seq <= ?1", -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_int64(st, 1, (sqlite3_int64) g->upto);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        g->n_deleted = (uint64_t) sqlite3_changes(db);
        return 0;
}

static void gc_done(int r, void *ud) {
        struct gc_job *g = ud;
        struct hub_outbox *o = g->o;

        o->n_pending--;
        o->gc_running = false;
        if (r >= 0) {
                ring_pop(&o->ring, ring_after(&o->ring, g->upto));
                o->deleted += g->n_deleted;
        }
        if (g->done)
                g->done(r, r >= 0 ? g->n_deleted : 0, g->ud);
        free(g);
}

int hub_outbox_gc(struct hub_outbox *o, void (*done)(int result, uint64_t n_deleted, void *ud), void *ud) {
        uint64_t now_wall, now_mono, frontier;
        struct gc_job *g;
        int r;

        if (!o)
                return -EINVAL;
        now_times(o, &now_wall, &now_mono);
        frontier = o->head;
        for (size_t i = 0; i < o->n_eps; i++) {
                struct hub_outbox_endpoint *ep = o->eps[i];
                if (ep_expire_front(o, ep, now_wall, now_mono) || ep->dirty)
                        (void) persist(ep);
                /* A queued cursor write commits no later than a delete queued after it (the
                 * store applies writes in order), so its value may be used already. */
                frontier = MIN(frontier, ep->writing ? MAX(ep->durable_cursor, ep->queued_cursor)
                                                     : ep->durable_cursor);
        }
        if (o->gc_running)
                return 0;

        size_t k = MIN(ring_after(&o->ring, frontier), (size_t) GC_BATCH);
        if (k == 0)
                return 0;

        g = calloc(1, sizeof *g);
        if (!g)
                return -ENOMEM;
        *g = (struct gc_job) { .o = o, .upto = ring_at(&o->ring, k - 1)->seq, .done = done, .ud = ud };
        r = hub_store_submit(o->store, gc_write_fn, gc_done, g);
        if (r < 0) {
                free(g);
                return r;
        }
        o->n_pending++;
        o->gc_running = true;
        return 1;
}

/* ---- endpoints ---------------------------------------------------------------------------- */

static bool endpoint_name_valid(const char *name) {
        size_t n = 0;

        if (!name)
                return false;
        for (const char *p = name; *p; p++, n++) {
                char c = *p;
                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                      c == '.' || c == '-'))
                        return false;
        }
        return n >= 1 && n <= HUB_OUTBOX_ENDPOINT_NAME_MAX;
}

static bool endpoint_options_valid(const struct hub_outbox_endpoint_options *opts) {
        return !opts || (unsigned) opts->overflow < _HUB_OUTBOX_OVERFLOW_MAX;
}

static int endpoint_add(struct hub_outbox *o, const char *name, uint64_t cursor, uint64_t drops, uint64_t expiries,
                        uint64_t delivered, struct hub_outbox_endpoint **ret) {
        struct hub_outbox_endpoint *ep, **eps;

        eps = realloc(o->eps, (o->n_eps + 1) * sizeof *eps);
        if (!eps)
                return -ENOMEM;
        o->eps = eps;
        ep = calloc(1, sizeof *ep);
        if (!ep)
                return -ENOMEM;
        ep->o = o;
        snprintf(ep->name, sizeof ep->name, "%s", name);
        ep->events = streq(name, HUB_OUTBOX_EVENTS);
        ep->cursor = ep->durable_cursor = cursor;
        ep->drops = drops;
        ep->expiries = expiries;
        ep->delivered = delivered;
        o->eps[o->n_eps++] = ep;
        if (ep->events)
                o->events = ep;
        *ret = ep;
        return 0;
}

int hub_outbox_endpoint_get(struct hub_outbox *o, const char *name, struct hub_outbox_endpoint **ret) {
        if (!o || !name || !ret)
                return -EINVAL;
        for (size_t i = 0; i < o->n_eps; i++)
                if (streq(o->eps[i]->name, name)) {
                        *ret = o->eps[i];
                        return 0;
                }
        return -ENOENT;
}

struct ep_create {
        const char *name;
        uint64_t cursor;
};

static int ep_create_fn(struct hub_store_txn *txn, void *ud) {
        struct ep_create *c = ud;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO outbox_endpoints (name, cursor) VALUES (?1, ?2)", -1, &st,
                                NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(st, 1, c->name, -1, SQLITE_STATIC);
                sqlite3_bind_int64(st, 2, (sqlite3_int64) c->cursor);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static void ep_configure(struct hub_outbox_endpoint *ep, const struct hub_outbox_endpoint_options *opts) {
        if (opts)
                ep->opts = *opts;
        else
                ep->opts = (struct hub_outbox_endpoint_options) { .overflow = HUB_OUTBOX_DROP_OLDEST };
        if (ep->events && ep->opts.ttl_usec == 0)
                ep->opts.ttl_usec = HUB_OUTBOX_EVENTS_DEFAULT_RETENTION_USEC;
        if (ep_enforce_capacity(ep->o, ep))
                (void) persist(ep);
}

int hub_outbox_endpoint_open(struct hub_outbox *o, const char *name, const struct hub_outbox_endpoint_options *opts,
                             struct hub_outbox_endpoint **ret) {
        struct hub_outbox_endpoint *ep;
        int r;

        if (!o || !endpoint_name_valid(name) || !endpoint_options_valid(opts))
                return -EINVAL;
        if (hub_outbox_endpoint_get(o, name, &ep) < 0) {
                struct ep_create c = { .name = name, .cursor = o->head };
                r = hub_store_submit_wait(o->store, ep_create_fn, &c);
                if (r < 0)
                        return r;
                r = endpoint_add(o, name, o->head, 0, 0, 0, &ep);
                if (r < 0)
                        return r;
        }
        ep_configure(ep, opts);
        if (ret)
                *ret = ep;
        return 0;
}

static int ep_delete_fn(struct hub_store_txn *txn, void *ud) {
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "DELETE FROM outbox_endpoints WHERE name = ?1", -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(st, 1, ud, -1, SQLITE_STATIC);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

int hub_outbox_endpoint_delete(struct hub_outbox *o, const char *name) {
        struct hub_outbox_endpoint *ep;
        int r;

        if (!o || !name)
                return -EINVAL;
        r = hub_outbox_endpoint_get(o, name, &ep);
        if (r < 0)
                return r;
        if (ep->events)
                return -EPERM;
        r = hub_store_submit_wait(o->store, ep_delete_fn, ep->name);
        if (r < 0)
                return r;
        for (size_t i = 0; i < o->n_eps; i++)
                if (o->eps[i] == ep) {
                        memmove(o->eps + i, o->eps + i + 1, (o->n_eps - i - 1) * sizeof *o->eps);
                        o->n_eps--;
                        break;
                }
        ep->deleted = true;
        if (!ep->writing)
                fire_waiters(ep, UINT64_MAX, -ECANCELED);
        ep->next_dead = o->dead;
        o->dead = ep;
        return 0;
}

struct hub_outbox_endpoint *hub_outbox_endpoint_at(struct hub_outbox *o, size_t i) {
        return o && i < o->n_eps ? o->eps[i] : NULL;
}

const char *hub_outbox_endpoint_name(const struct hub_outbox_endpoint *ep) {
        return ep ? ep->name : NULL;
}

void hub_outbox_endpoint_get_stats(struct hub_outbox_endpoint *ep, struct hub_outbox_endpoint_stats *ret) {
        if (!ep || !ret)
                return;
        struct hub_outbox *o = ep->o;
        size_t i = ring_after(&o->ring, ep->cursor);
        uint64_t now_wall, now_mono, age = 0;

        now_times(o, &now_wall, &now_mono);
        if (i < o->ring.n) {
                const struct ring_entry *e = ring_at(&o->ring, i);
                if (!message_age(o, e->enq_wall, e->boot, e->boot_time, e->flags, now_wall, now_mono, &age))
                        age = 0;
        }
        *ret = (struct hub_outbox_endpoint_stats) {
                .cursor = ep->cursor,
                .head = o->head,
                .backlog_count = ep->deleted ? 0 : o->ring.n - i,
                .backlog_bytes = ep->deleted ? 0 : ring_bytes_from(&o->ring, i),
                .oldest_age_usec = ep->deleted ? 0 : age,
                .drops = ep->drops,
                .expiries = ep->expiries,
                .delivered = ep->delivered,
                .rejected = ep->rejected,
        };
}

void hub_outbox_get_stats(struct hub_outbox *o, struct hub_outbox_stats *ret) {
        if (!o || !ret)
                return;
        *ret = (struct hub_outbox_stats) {
                .head = o->head,
                .stored_count = o->ring.n,
                .stored_bytes = ring_bytes_from(&o->ring, 0),
                .pending = o->pending_count,
                .appended = o->appended,
                .append_failures = o->append_failures,
                .deleted = o->deleted,
        };
}

uint64_t hub_outbox_head(struct hub_outbox *o) {
        return o ? o->head : 0;
}

void hub_outbox_set_clock_synchronized(struct hub_outbox *o, bool synchronized) {
        if (o)
                o->synced = synchronized;
}

void hub_outbox_set_appended_hook(struct hub_outbox *o, void (*fn)(void *ud, uint64_t seq), void *ud) {
        if (!o)
                return;
        o->appended_fn = fn;
        o->appended_ud = ud;
}

/* ---- open and free ------------------------------------------------------------------------ */

static int setup_fn(struct hub_store_txn *txn, void *ud) {
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, "INSERT OR IGNORE INTO outbox_boots (boot_id) VALUES (?1)", -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(st, 1, ud, -1, SQLITE_STATIC);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        rc = sqlite3_exec(db, "INSERT OR IGNORE INTO outbox_endpoints (name, cursor) VALUES ('" HUB_OUTBOX_EVENTS "', 0)",
                          NULL, NULL, NULL);
        return rc == SQLITE_OK ? 0 : hub_store_errno(rc);
}

static int load(struct hub_outbox *o, const char *boot_id) {
        sqlite3 *db = hub_store_read_db(o->store);
        sqlite3_stmt *st = NULL;
        uint64_t high = 0;
        int rc, r = 0;

        if (!db)
                return -EIO;

        rc = sqlite3_prepare_v2(db, "SELECT id FROM outbox_boots WHERE boot_id = ?1", -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(st, 1, boot_id, -1, SQLITE_STATIC);
                rc = sqlite3_step(st);
        }
        if (rc != SQLITE_ROW) {
                sqlite3_finalize(st);
                return rc == SQLITE_DONE ? -EIO : hub_store_errno(rc);
        }
        o->boot = (uint32_t) sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);

        rc = sqlite3_prepare_v2(db, "SELECT name, cursor, drops, expiries, delivered FROM outbox_endpoints ORDER BY name",
                                -1, &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                struct hub_outbox_endpoint *ep;
                const char *name = (const char *) sqlite3_column_text(st, 0);
                uint64_t cursor = (uint64_t) sqlite3_column_int64(st, 1);

                rc = SQLITE_OK;
                if (!endpoint_name_valid(name))
                        continue;
                r = endpoint_add(o, name, cursor, (uint64_t) sqlite3_column_int64(st, 2),
                                 (uint64_t) sqlite3_column_int64(st, 3), (uint64_t) sqlite3_column_int64(st, 4), &ep);
                if (r < 0)
                        break;
                high = MAX(high, cursor);
        }
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        if (!o->events)
                return -EIO;

        rc = sqlite3_prepare_v2(db, "SELECT seq, enqueued, boot, boot_time, flags, size FROM outbox ORDER BY seq", -1,
                                &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                struct ring_entry e = {
                        .seq = (uint64_t) sqlite3_column_int64(st, 0),
                        .enq_wall = (uint64_t) sqlite3_column_int64(st, 1),
                        .boot = (uint32_t) sqlite3_column_int64(st, 2),
                        .boot_time = (uint64_t) sqlite3_column_int64(st, 3),
                        .flags = (uint32_t) sqlite3_column_int64(st, 4),
                        .size = (uint32_t) sqlite3_column_int64(st, 5),
                };
                rc = SQLITE_OK;
                r = ring_push(&o->ring, &e);
                if (r < 0)
                        break;
                high = MAX(high, e.seq);
        }
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);

        o->head = high;
        o->next_seq = high + 1;
        return 0;
}

int hub_outbox_new(const struct hub_outbox_options *opts, struct hub_outbox **ret) {
        struct hub_outbox *o;
        int r;

        if (!opts || !opts->store || !opts->clock || !ret || !opts->boot_id || !*opts->boot_id ||
            strlen(opts->boot_id) > BOOT_ID_MAX || !endpoint_options_valid(&opts->events))
                return -EINVAL;

        o = calloc(1, sizeof *o);
        if (!o)
                return -ENOMEM;
        o->store = opts->store;
        o->clock = opts->clock;
        o->log = opts->log;
        o->synced = opts->clock_synchronized;

        r = hub_store_submit_wait(o->store, setup_fn, (void *) opts->boot_id);
        if (r >= 0)
                r = load(o, opts->boot_id);
        if (r < 0) {
                hub_outbox_free(o);
                return r;
        }
        ep_configure(o->events, &opts->events);
        hub_log_debug(o->log, "outbox: %zu messages stored, head %llu, %zu endpoints", o->ring.n,
                      (unsigned long long) o->head, o->n_eps);
        *ret = o;
        return 0;
}

static int finalize_fn(struct hub_store_txn *txn, void *ud) {
        struct hub_outbox *o = ud;
        (void) txn;
        sqlite3_finalize(o->w_insert);
        o->w_insert = NULL;
        return 0;
}

static void endpoint_free(struct hub_outbox_endpoint *ep) {
        fire_waiters(ep, UINT64_MAX, -ECANCELED);
        free(ep);
}

struct hub_outbox *hub_outbox_free(struct hub_outbox *o) {
        if (!o)
                return NULL;
        while (o->n_pending > 0) {
                struct pollfd p = { .fd = hub_store_get_fd(o->store), .events = POLLIN };
                if (p.fd < 0 || (poll(&p, 1, -1) < 0 && errno != EINTR))
                        break; /* cannot happen with a live store; do not spin */
                (void) hub_store_dispatch(o->store);
        }
        if (o->w_insert)
                (void) hub_store_submit_wait(o->store, finalize_fn, o);
        sqlite3_finalize(o->st_range);
        sqlite3_finalize(o->st_range_dev);
        for (size_t i = 0; i < o->n_eps; i++)
                endpoint_free(o->eps[i]);
        free(o->eps);
        while (o->dead) {
                struct hub_outbox_endpoint *ep = o->dead;
                o->dead = ep->next_dead;
                endpoint_free(ep);
        }
        free(o->ring.v);
        free(o);
        return NULL;
}
