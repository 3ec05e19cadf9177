/* SPDX-License-Identifier: MIT */
/* The outbox: durable D2C log with per-endpoint cursors, the events stream (hub/outbox.h).
 *
 * Storage (store migrations 4 and 5): `outbox` holds one row per message, keyed by its sequence
 * number, with the serialized hub_msg, its device and module, its size and its enqueue
 * times: the wall clock, the boot it was stored in (`outbox_boots`) and that boot's
 * monotonic clock. `outbox_endpoints` holds each endpoint's cursor and counters.
 *
 * Sequence numbers are assigned here, on the owner's thread, when an append is queued: the
 * store runs writes in submission order and dispatches their completions in that order, so
 * the log is in sequence order and completions arrive in sequence order (appends that join
 * an open append batch have higher numbers than every row of earlier batches). A failed append
 * leaves a gap, which readers never notice (they ask for "after seq"). Rows are deleted only
 * up to every endpoint's durable cursor, and the events endpoint always exists, so the
 * largest cursor or row gives the high-water mark after a restart: numbers never repeat.
 *
 * In memory, an index of chunks answers the accounting questions (backlog counts and
 * bytes, ages, capacity and TTL moves, what the collection deletes) with a bounded memory:
 * a chunk summarises up to CHUNK_ROWS consecutive rows of one boot (seq range, count,
 * bytes, running totals, oldest and youngest times), ~100 bytes per 1,024 messages. Where a
 * question falls inside a chunk (a cursor in its middle, a partly expired front, a
 * drop-oldest cut) the chunk's rows are looked at one by one: those of the last chunk
 * (still filling) are kept in memory, those of older chunks are read back from the log
 * (seq, size and times only; a few chunks are cached). So the answers stay exact per
 * message, and memory no longer grows with the retained log (it was 48 bytes per
 * message).
 */

#include <errno.h>
#include <poll.h>
#include <pthread.h>
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

/* Version 5: the per-device index cost every append a second b-tree insert; the one read
 * that used it (hub_events_read() with a device filter) scans the sequence range instead. */
const char hub_outbox_schema_v5_sql[] = "DROP INDEX IF EXISTS outbox_by_device;\n";

/* The summaries of the in-memory index's closed chunks (see "Chunk summaries" below), so that
 * a start reads one row per 1,024 messages instead of every message. */
const char hub_outbox_schema_v6_sql[] =
        "CREATE TABLE outbox_chunks (\n"
        "  first INTEGER PRIMARY KEY,\n"
        "  last INTEGER NOT NULL,\n"
        "  count INTEGER NOT NULL,\n"
        "  bytes INTEGER NOT NULL,\n"
        "  min_bt INTEGER NOT NULL,\n"
        "  max_bt INTEGER NOT NULL,\n"
        "  min_wall INTEGER NOT NULL,\n"
        "  max_wall INTEGER NOT NULL,\n"
        "  boot INTEGER NOT NULL,\n"
        "  flags INTEGER NOT NULL\n"
        ");\n";

#define ENTRY_SYNCED 1u
#define GC_BATCH 20000u
#define READ_MAX 10000u
#define BOOT_ID_MAX 64u

#define CHUNK_ROWS 1024u
#define DETAIL_SLOTS 4u

/* One row as the index sees it. cum: bytes of its chunk's rows up to it, itself included
 * (differences stay right when the front of the chunk is trimmed). */
struct row_info {
        uint64_t seq, enq_wall, boot_time, cum;
        uint32_t size;
};

/* Rows [first, last] of the log (every row in that range belongs to it; failed appends
 * leave gaps, so count may be smaller than the range). cum_*: totals of all chunks up to
 * and including this one since the index began; trimming the front of the first chunk
 * lowers count and bytes only. min/max: bounds of the rows' times (after a trim, min may
 * be older than the oldest row left: still a bound). */
struct chunk {
        uint64_t first, last;
        uint64_t count, bytes;
        uint64_t cum_count, cum_bytes;
        uint64_t min_bt, max_bt, min_wall, max_wall;
        uint32_t boot, flags;
};

struct detail {
        uint64_t first, last; /* the chunk it was read for (0, 0 = empty slot) */
        struct row_info *v;
        size_t n, cap;
};

struct chunk_index {
        struct chunk *v;
        size_t start, n, cap;
        /* The rows of the last chunk while it can still grow (tail_open). */
        struct row_info *tail;
        size_t tail_n, tail_cap;
        bool tail_open;
        uint64_t persisted_last; /* `last` of the newest chunk whose summary was submitted */
        struct detail cache[DETAIL_SLOTS];
        unsigned cache_next;
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

struct append_batch;

struct hub_outbox {
        struct hub_store *store;
        const struct hub_clock *clock;
        const struct hub_log *log;
        uint32_t boot;
        bool synced;

        struct chunk_index idx;
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

        struct append_batch *cur_batch;   /* accepting appends until the commit thread seals it */
        struct append_batch *spare_batch; /* a finished one, for reuse */

        /* Commit thread only. */
        sqlite3_stmt *w_insert;
        /* Read connection (owner's thread). */
        sqlite3_stmt *st_range, *st_range_dev, *st_detail;
};

/* ---- in-memory index ---------------------------------------------------------------------- */

static int prepare_read(struct hub_outbox *o, sqlite3_stmt **st, const char *sql);

static struct chunk *chunk_at(const struct chunk_index *x, size_t i) {
        return &x->v[x->start + i];
}

static void cache_clear(struct chunk_index *x) {
        for (size_t i = 0; i < DETAIL_SLOTS; i++)
                x->cache[i].first = x->cache[i].last = x->cache[i].n = 0;
}

static int row_append(struct row_info **v, size_t *n, size_t *cap, const struct row_info *r) {
        if (*n == *cap) {
                size_t ncap = *cap ? *cap * 2 : 64;
                struct row_info *nv = realloc(*v, ncap * sizeof *nv);
                if (!nv)
                        return -ENOMEM;
                *v = nv;
                *cap = ncap;
        }
        (*v)[(*n)++] = *r;
        return 0;
}

/* Room for one more chunk at the end. -ENOMEM. */
static int index_reserve(struct chunk_index *x) {
        if (x->start + x->n < x->cap)
                return 0;
        if (x->start > 0 && x->start >= x->cap / 2) {
                memmove(x->v, x->v + x->start, x->n * sizeof *x->v);
                x->start = 0;
                return 0;
        }
        size_t cap = x->cap ? x->cap * 2 : 64;
        struct chunk *v = realloc(x->v, cap * sizeof *v);
        if (!v)
                return -ENOMEM;
        x->v = v;
        x->cap = cap;
        return 0;
}

/* Adds a stored row (in sequence order). */
static int index_push(struct hub_outbox *o, uint64_t seq, uint64_t enq_wall, uint32_t boot, uint64_t boot_time,
                      uint32_t flags, uint32_t size) {
        struct chunk_index *x = &o->idx;
        struct chunk *last = x->n > 0 ? chunk_at(x, x->n - 1) : NULL;
        struct row_info ri = { .seq = seq, .enq_wall = enq_wall, .boot_time = boot_time, .size = size };

        if (last && x->tail_open && last->boot == boot && last->flags == flags && last->count < CHUNK_ROWS) {
                ri.cum = (x->tail_n > 0 ? x->tail[x->tail_n - 1].cum : 0) + size;
                if (row_append(&x->tail, &x->tail_n, &x->tail_cap, &ri) < 0) {
                        /* The chunk ends here; the row stays out of every chunk's range. */
                        x->tail_open = false;
                        return -ENOMEM;
                }
                last->last = seq;
                last->count++;
                last->bytes += size;
                last->cum_count++;
                last->cum_bytes += size;
                last->min_bt = MIN(last->min_bt, boot_time);
                last->max_bt = MAX(last->max_bt, boot_time);
                last->min_wall = MIN(last->min_wall, enq_wall);
                last->max_wall = MAX(last->max_wall, enq_wall);
                return 0;
        }

        if (index_reserve(x) < 0)
                return -ENOMEM;
        last = x->n > 0 ? chunk_at(x, x->n - 1) : NULL;
        x->tail_n = 0;
        ri.cum = size;
        if (row_append(&x->tail, &x->tail_n, &x->tail_cap, &ri) < 0) {
                x->tail_open = false; /* the last chunk's rows are gone from memory */
                return -ENOMEM;
        }
        x->tail_open = true;
        x->v[x->start + x->n++] = (struct chunk) {
                .first = seq,
                .last = seq,
                .count = 1,
                .bytes = size,
                .cum_count = (last ? last->cum_count : 0) + 1,
                .cum_bytes = (last ? last->cum_bytes : 0) + size,
                .min_bt = boot_time,
                .max_bt = boot_time,
                .min_wall = enq_wall,
                .max_wall = enq_wall,
                .boot = boot,
                .flags = flags,
        };
        return 0;
}

/* Adds a chunk read back from outbox_chunks after every row and chunk before it (load()):
 * the chunk before it is closed, the next index_push() starts a new one. -ENOMEM. */
static int index_add_summary(struct hub_outbox *o, const struct chunk *c) {
        struct chunk_index *x = &o->idx;
        struct chunk *last;

        if (index_reserve(x) < 0)
                return -ENOMEM;
        last = x->n > 0 ? chunk_at(x, x->n - 1) : NULL;
        x->tail_open = false;
        x->tail_n = 0;
        x->v[x->start + x->n] = *c;
        x->v[x->start + x->n].cum_count = (last ? last->cum_count : 0) + c->count;
        x->v[x->start + x->n].cum_bytes = (last ? last->cum_bytes : 0) + c->bytes;
        x->n++;
        x->persisted_last = MAX(x->persisted_last, c->last);
        return 0;
}

/* Index of the first chunk holding a row after s (x->n when none). */
static size_t chunk_after(const struct chunk_index *x, uint64_t s) {
        size_t lo = 0, hi = x->n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (chunk_at(x, mid)->last <= s)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

/* The rows of chunk k, in order: from memory for the last chunk while it fills, else read
 * back from the log through the read connection (and cached). */
static int chunk_rows(struct hub_outbox *o, size_t k, const struct row_info **ret, size_t *ret_n) {
        struct chunk_index *x = &o->idx;
        const struct chunk *c = chunk_at(x, k);
        struct detail *d;
        int r, rc;

        if (k == x->n - 1 && x->tail_open) {
                *ret = x->tail;
                *ret_n = x->tail_n;
                return 0;
        }
        for (size_t i = 0; i < DETAIL_SLOTS; i++)
                if (x->cache[i].last == c->last && x->cache[i].first == c->first && x->cache[i].last != 0) {
                        *ret = x->cache[i].v;
                        *ret_n = x->cache[i].n;
                        return 0;
                }

        r = prepare_read(o, &o->st_detail,
                         "SELECT seq, enqueued, boot_time, size FROM outbox WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq");
        if (r < 0)
                return r;
        d = &x->cache[x->cache_next];
        x->cache_next = (x->cache_next + 1) % DETAIL_SLOTS;
        d->first = d->last = d->n = 0;
        sqlite3_bind_int64(o->st_detail, 1, (sqlite3_int64) c->first);
        sqlite3_bind_int64(o->st_detail, 2, (sqlite3_int64) c->last);
        while ((rc = sqlite3_step(o->st_detail)) == SQLITE_ROW) {
                struct row_info ri = {
                        .seq = (uint64_t) sqlite3_column_int64(o->st_detail, 0),
                        .enq_wall = (uint64_t) sqlite3_column_int64(o->st_detail, 1),
                        .boot_time = (uint64_t) sqlite3_column_int64(o->st_detail, 2),
                        .size = (uint32_t) sqlite3_column_int64(o->st_detail, 3),
                };
                ri.cum = (d->n > 0 ? d->v[d->n - 1].cum : 0) + ri.size;
                r = row_append(&d->v, &d->n, &d->cap, &ri);
                if (r < 0)
                        break;
        }
        sqlite3_reset(o->st_detail);
        sqlite3_clear_bindings(o->st_detail);
        if (r >= 0 && rc != SQLITE_DONE)
                r = hub_store_errno(rc);
        if (r < 0) {
                d->n = 0;
                hub_log_debug(o->log, "outbox: cannot read the index of messages %llu..%llu: %s",
                              (unsigned long long) c->first, (unsigned long long) c->last, strerror(-r));
                return r;
        }
        d->first = c->first;
        d->last = c->last;
        *ret = d->v;
        *ret_n = d->n;
        return 0;
}

/* Index of the first row with seq > s in rows[0, n) (n when none). */
static size_t rows_after(const struct row_info *rows, size_t n, uint64_t s) {
        size_t lo = 0, hi = n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (rows[mid].seq <= s)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

/* Rows and bytes of chunk k after seq s (ret_bytes NULL: only the rows, which a chunk
 * without gaps answers by itself). When its rows cannot be read, the whole chunk (an
 * over-estimate) and -errno. */
static int chunk_part(struct hub_outbox *o, size_t k, uint64_t s, uint64_t *ret_count, uint64_t *ret_bytes) {
        const struct chunk *c = chunk_at(&o->idx, k);
        const struct row_info *rows;
        size_t n, i;
        int r;

        *ret_count = c->count;
        if (ret_bytes)
                *ret_bytes = c->bytes;
        if (s < c->first)
                return 0;
        if (!ret_bytes && c->count == c->last - c->first + 1) {
                *ret_count = c->last - s;
                return 0;
        }
        r = chunk_rows(o, k, &rows, &n);
        if (r < 0)
                return r;
        i = rows_after(rows, n, s);
        *ret_count = n - i;
        if (ret_bytes)
                *ret_bytes = i < n ? rows[n - 1].cum - (i > 0 ? rows[i - 1].cum : 0) : 0;
        return 0;
}

/* Messages and bytes (ret_bytes may be NULL) stored after seq s. */
static void index_backlog(struct hub_outbox *o, uint64_t s, uint64_t *ret_count, uint64_t *ret_bytes) {
        struct chunk_index *x = &o->idx;
        size_t k = chunk_after(x, s);
        uint64_t pc, pb;

        if (k == x->n) {
                *ret_count = 0;
                if (ret_bytes)
                        *ret_bytes = 0;
                return;
        }
        const struct chunk *c = chunk_at(x, k), *l = chunk_at(x, x->n - 1);
        (void) chunk_part(o, k, s, &pc, ret_bytes ? &pb : NULL);
        *ret_count = l->cum_count - c->cum_count + pc;
        if (ret_bytes)
                *ret_bytes = l->cum_bytes - c->cum_bytes + pb;
}

static uint64_t index_count(const struct chunk_index *x) {
        return x->n ? chunk_at(x, x->n - 1)->cum_count - (chunk_at(x, 0)->cum_count - chunk_at(x, 0)->count) : 0;
}

static uint64_t index_bytes(const struct chunk_index *x) {
        return x->n ? chunk_at(x, x->n - 1)->cum_bytes - (chunk_at(x, 0)->cum_bytes - chunk_at(x, 0)->bytes) : 0;
}

/* Forgets the rows up to seq upto (deleted by the collection). The chunk holding upto
 * keeps le_count rows and le_bytes bytes fewer: what it held up to upto when the delete
 * was chosen (it may have grown since, as the last chunk). */
static void index_trim(struct hub_outbox *o, uint64_t upto, uint64_t last_first, uint64_t le_count, uint64_t le_bytes) {
        struct chunk_index *x = &o->idx;

        while (x->n > 0) {
                struct chunk *c = chunk_at(x, 0);
                if (c->first == last_first && c->last > upto) {
                        c->count -= MIN(le_count, c->count);
                        c->bytes -= MIN(le_bytes, c->bytes);
                        c->first = upto + 1;
                        if (x->n == 1 && x->tail_open) {
                                size_t i = rows_after(x->tail, x->tail_n, upto);
                                memmove(x->tail, x->tail + i, (x->tail_n - i) * sizeof *x->tail);
                                x->tail_n -= i;
                        }
                        break;
                }
                if (c->last > upto)
                        break;
                x->start++;
                x->n--;
                if (x->n == 0) {
                        x->start = 0;
                        x->tail_open = false;
                        x->tail_n = 0;
                }
                if (c->first == last_first)
                        break;
        }
        cache_clear(x);
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

static const char CURSOR_WRITE_SQL[] =
        "INSERT INTO outbox_endpoints (name, cursor, drops, expiries, delivered) "
        "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET "
        "cursor = MAX(cursor, excluded.cursor), drops = excluded.drops, "
        "expiries = excluded.expiries, delivered = excluded.delivered";

static int cursor_write_fn(struct hub_store_txn *txn, void *ud) {
        struct cursor_write *w = ud;
        sqlite3_stmt *st = NULL;
        int r, rc;

        r = hub_store_txn_prepare(txn, CURSOR_WRITE_SQL, &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, w->name, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (sqlite3_int64) w->cursor);
        sqlite3_bind_int64(st, 3, (sqlite3_int64) w->drops);
        sqlite3_bind_int64(st, 4, (sqlite3_int64) w->expiries);
        sqlite3_bind_int64(st, 5, (sqlite3_int64) w->delivered);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
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
        r = hub_store_submit_flags(o->store, cursor_write_fn, cursor_write_done, w, HUB_STORE_WRITE_SINGLE);
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
        struct chunk_index *x = &o->idx;
        bool moved = false;

        if (ep->opts.ttl_usec == 0)
                return false;
        for (;;) {
                size_t k = chunk_after(x, ep->cursor);
                const struct row_info *rows;
                uint64_t pc;
                size_t n;

                if (k == x->n)
                        break;
                const struct chunk *c = chunk_at(x, k);
                /* Its youngest expired: all of it did (ages only grow with age order). */
                if (expired(o, ep, c->max_wall, c->boot, c->max_bt, c->flags, now_wall, now_mono)) {
                        if (chunk_part(o, k, ep->cursor, &pc, NULL) < 0)
                                break;
                        ep->expiries += pc;
                        ep->cursor = c->last;
                        moved = true;
                        continue;
                }
                /* Not even its oldest (a bound): the front message is not expired. */
                if (!expired(o, ep, c->min_wall, c->boot, c->min_bt, c->flags, now_wall, now_mono))
                        break;
                if (chunk_rows(o, k, &rows, &n) < 0)
                        break;
                for (size_t i = rows_after(rows, n, ep->cursor); i < n; i++) {
                        if (!expired(o, ep, rows[i].enq_wall, c->boot, rows[i].boot_time, c->flags, now_wall, now_mono))
                                break;
                        ep->cursor = rows[i].seq;
                        ep->expiries++;
                        moved = true;
                }
                break;
        }
        return moved;
}

static bool has_capacity_bound(const struct hub_outbox_endpoint *ep) {
        return ep->opts.max_count > 0 || ep->opts.max_bytes > 0;
}

static bool over_capacity(const struct hub_outbox_endpoint *ep, uint64_t count, uint64_t bytes) {
        return (ep->opts.max_count > 0 && count > ep->opts.max_count) ||
               (ep->opts.max_bytes > 0 && bytes > ep->opts.max_bytes);
}

/* drop-oldest: moves the cursor past the oldest messages while over capacity. */
static bool ep_enforce_capacity(struct hub_outbox *o, struct hub_outbox_endpoint *ep) {
        struct chunk_index *x = &o->idx;
        uint64_t count, bytes;
        bool moved = false;

        if (ep->opts.overflow != HUB_OUTBOX_DROP_OLDEST || !has_capacity_bound(ep))
                return false;
        /* Without a byte bound, counts alone (no row reads for chunks without gaps). */
        bool by_bytes = ep->opts.max_bytes > 0;
        bytes = 0;
        index_backlog(o, ep->cursor, &count, by_bytes ? &bytes : NULL);
        while (over_capacity(ep, count, bytes)) {
                size_t k = chunk_after(x, ep->cursor);
                const struct row_info *rows;
                uint64_t pc, pb;
                size_t n;

                if (k == x->n)
                        break;
                const struct chunk *c = chunk_at(x, k);
                pb = 0;
                if (chunk_part(o, k, ep->cursor, &pc, by_bytes ? &pb : NULL) < 0)
                        break;
                if (over_capacity(ep, count - MIN(pc, count), bytes - MIN(pb, bytes))) {
                        /* Still over without all of them: each of them goes. */
                        ep->drops += pc;
                        ep->cursor = c->last;
                        count -= MIN(pc, count);
                        bytes -= MIN(pb, bytes);
                        moved = true;
                        continue;
                }
                if (!by_bytes && c->count == c->last - c->first + 1) {
                        /* Counts only, no gaps: the cut is where the excess ends. */
                        uint64_t excess = count - ep->opts.max_count;
                        ep->cursor = MAX(ep->cursor, c->first - 1) + excess;
                        ep->drops += excess;
                        moved = true;
                        break;
                }
                if (chunk_rows(o, k, &rows, &n) < 0)
                        break;
                for (size_t i = rows_after(rows, n, ep->cursor); i < n && over_capacity(ep, count, bytes); i++) {
                        ep->cursor = rows[i].seq;
                        ep->drops++;
                        count--;
                        bytes -= MIN((uint64_t) rows[i].size, bytes);
                        moved = true;
                }
                break;
        }
        return moved;
}

/* ---- appends ------------------------------------------------------------------------------ */

/* Appends queued while the commit thread is busy travel as one store write (an append
 * batch): one record, one submission, one completion for all of them, still one INSERT and
 * one completion callback per message. The first append of a batch submits it; later ones
 * join it until the commit thread starts running it (it "seals" the batch under the batch's
 * mutex, the only state both threads touch), then the next append starts a new batch. The
 * rows keep their order: seqs are assigned in append order and batches run in submission
 * order. A finished batch is kept for reuse (its arrays keep their capacity). */

struct append_row {
        uint64_t seq, enq_wall, boot_time;
        uint8_t *blob; /* from hub_msg_serialize() */
        uint32_t blob_len;
        uint32_t flags;
        uint32_t dev_off, mod_off; /* into ids; mod_off = UINT32_MAX: no module */
        int result;                /* set on the commit thread */
        hub_outbox_append_done_fn done;
        void *ud;
};

struct append_batch {
        struct hub_outbox *o;
        pthread_mutex_t mu;
        bool sealed; /* under mu */
        struct append_row *rows;
        size_t n, cap;
        char *ids; /* NUL-terminated device and module ids of the rows */
        size_t ids_len, ids_cap;
};

static void append_batch_reset(struct append_batch *b) {
        for (size_t i = 0; i < b->n; i++)
                free(b->rows[i].blob);
        b->n = 0;
        b->ids_len = 0;
        b->sealed = false;
}

static struct append_batch *append_batch_free(struct append_batch *b) {
        if (!b)
                return NULL;
        append_batch_reset(b);
        pthread_mutex_destroy(&b->mu);
        free(b->rows);
        free(b->ids);
        free(b);
        return NULL;
}

static int append_batch_write_fn(struct hub_store_txn *txn, void *ud) {
        struct append_batch *b = ud;
        struct hub_outbox *o = b->o;
        sqlite3 *db = hub_store_txn_db(txn);
        size_t n;
        int rc;

        pthread_mutex_lock(&b->mu);
        b->sealed = true; /* from now on the loop starts a new batch */
        n = b->n;
        pthread_mutex_unlock(&b->mu);

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
        /* Each INSERT is one statement: SQLite undoes a failing one by itself, the others
         * stay (HUB_STORE_WRITE_SINGLE); each row reports its own result. */
        for (size_t i = 0; i < n; i++) {
                struct append_row *a = &b->rows[i];

                sqlite3_bind_int64(st, 1, (sqlite3_int64) a->seq);
                sqlite3_bind_text(st, 2, b->ids + a->dev_off, -1, SQLITE_STATIC);
                if (a->mod_off != UINT32_MAX)
                        sqlite3_bind_text(st, 3, b->ids + a->mod_off, -1, SQLITE_STATIC);
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
                a->result = rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
                if (a->result < 0 && sqlite3_get_autocommit(db)) {
                        /* SQLite lost the transaction: nothing of the group is left, and
                         * the rest must not run outside it. The store fails them all. */
                        sqlite3_clear_bindings(st);
                        return a->result;
                }
        }
        sqlite3_clear_bindings(st);
        return 0;
}

/* Drop-oldest moved a cursor: when a collection's worth of rows (GC_BATCH / 2) waits
 * below every cursor, collect now rather than at the caller's next call, or a fast ingest
 * into a capacity-bound endpoint would fill a disk budget between two calls. */
static void gc_kick(struct hub_outbox *o) {
        uint64_t frontier = o->head, after = 0;

        if (o->gc_running)
                return;
        for (size_t i = 0; i < o->n_eps; i++) {
                const struct hub_outbox_endpoint *ep = o->eps[i];
                frontier = MIN(frontier, ep->writing ? MAX(ep->durable_cursor, ep->queued_cursor) : ep->durable_cursor);
        }
        index_backlog(o, frontier, &after, NULL);
        if (index_count(&o->idx) - MIN(after, index_count(&o->idx)) >= GC_BATCH / 2)
                (void) hub_outbox_gc(o, NULL, NULL);
}

/* ---- chunk summaries -----------------------------------------------------------------------
 *
 * A start used to rebuild the index from every row of the log (0.3 s per million retained
 * messages: minutes for a day's event stream at high rates). So each chunk's summary is
 * written to outbox_chunks once the chunk is closed (its rows are committed and no row joins
 * it any more), one small write per 1,024 messages, and load() reads the summaries and only
 * the rows no summary covers. The collection deletes the summaries of the chunks it deleted
 * entirely, in its own transaction. Nothing relies on a summary being there: rows without
 * one are read at the next start, a summary written late for rows already collected is
 * ignored and deleted with the next collection, and the chunk holding the oldest row left
 * (its front may have been collected) is always read row by row. Invariant behind it: the
 * collection deletes a prefix of the log (seq <= upto), so a chunk that starts above the
 * oldest row left has all its rows. */

struct chunk_write {
        struct hub_outbox *o;
        struct chunk c;
};

static int chunk_write_fn(struct hub_store_txn *txn, void *ud) {
        const struct chunk *c = &((struct chunk_write *) ud)->c;
        sqlite3_stmt *st = NULL;
        int r, rc;

        r = hub_store_txn_prepare(txn,
                                  "INSERT OR REPLACE INTO outbox_chunks (first, last, count, bytes, min_bt, max_bt, "
                                  "min_wall, max_wall, boot, flags) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                                  &st);
        if (r < 0)
                return r;
        sqlite3_bind_int64(st, 1, (sqlite3_int64) c->first);
        sqlite3_bind_int64(st, 2, (sqlite3_int64) c->last);
        sqlite3_bind_int64(st, 3, (sqlite3_int64) c->count);
        sqlite3_bind_int64(st, 4, (sqlite3_int64) c->bytes);
        sqlite3_bind_int64(st, 5, (sqlite3_int64) c->min_bt);
        sqlite3_bind_int64(st, 6, (sqlite3_int64) c->max_bt);
        sqlite3_bind_int64(st, 7, (sqlite3_int64) c->min_wall);
        sqlite3_bind_int64(st, 8, (sqlite3_int64) c->max_wall);
        sqlite3_bind_int64(st, 9, c->boot);
        sqlite3_bind_int64(st, 10, c->flags);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static void chunk_write_done(int r, void *ud) {
        struct chunk_write *w = ud;

        w->o->n_pending--;
        if (r < 0)
                hub_log_debug(w->o->log,
                              "outbox: cannot save the summary of messages %llu..%llu (%s): the next start reads them",
                              (unsigned long long) w->c.first, (unsigned long long) w->c.last, strerror(-r));
        free(w);
}

/* Submits the summaries of the chunks closed since the last call (the last chunk is closed
 * once the next one began, or when it could not take a row). */
static void index_persist(struct hub_outbox *o) {
        struct chunk_index *x = &o->idx;

        for (size_t k = chunk_after(x, x->persisted_last); k < x->n; k++) {
                const struct chunk *c = chunk_at(x, k);
                if (k == x->n - 1 && x->tail_open)
                        break; /* still filling */
                struct chunk_write *w = malloc(sizeof *w);
                if (!w)
                        return;
                *w = (struct chunk_write) { .o = o, .c = *c };
                if (hub_store_submit_flags(o->store, chunk_write_fn, chunk_write_done, w, HUB_STORE_WRITE_SINGLE) < 0) {
                        free(w);
                        return;
                }
                o->n_pending++;
                x->persisted_last = c->last;
        }
}

static void append_batch_done(int r, void *ud) {
        struct append_batch *b = ud;
        struct hub_outbox *o = b->o;
        bool any = false, dropped = false;

        o->n_pending--;
        if (o->cur_batch == b)
                o->cur_batch = NULL;

        /* Index every stored row first, then apply capacities once, then the completions
         * in order (capacity drops are the same as one row at a time: the oldest go). */
        for (size_t i = 0; i < b->n; i++) {
                struct append_row *a = &b->rows[i];
                int res = r < 0 ? r : a->result;

                o->pending_count--;
                o->pending_bytes -= a->blob_len;
                if (res < 0)
                        continue;
                /* The row is durable whatever happens here: on -ENOMEM only the in-memory
                 * index misses it (its accounting is low by one) until the next start. */
                if (index_push(o, a->seq, a->enq_wall, o->boot, a->boot_time, a->flags, a->blob_len) < 0)
                        hub_log_debug(o->log, "outbox: out of memory indexing message %llu",
                                      (unsigned long long) a->seq);
                o->head = MAX(o->head, a->seq);
                o->appended++;
                any = true;
        }
        if (any)
                index_persist(o);
        if (any)
                for (size_t i = 0; i < o->n_eps; i++)
                        if (ep_enforce_capacity(o, o->eps[i])) {
                                (void) persist(o->eps[i]);
                                dropped = true;
                        }
        for (size_t i = 0; i < b->n; i++) {
                struct append_row *a = &b->rows[i];
                int res = r < 0 ? r : a->result;

                if (res >= 0) {
                        if (o->appended_fn)
                                o->appended_fn(o->appended_ud, a->seq);
                        if (a->done)
                                a->done(0, a->seq, a->ud);
                } else {
                        o->append_failures++;
                        hub_log_debug(o->log, "outbox: append of message %llu from %s failed: %s",
                                      (unsigned long long) a->seq, b->ids + a->dev_off, strerror(-res));
                        if (a->done)
                                a->done(res, 0, a->ud);
                }
        }
        append_batch_reset(b);
        if (!o->spare_batch)
                o->spare_batch = b;
        else
                append_batch_free(b);
        if (dropped)
                gc_kick(o);
}

static struct append_batch *append_batch_new(struct hub_outbox *o) {
        struct append_batch *b = o->spare_batch;

        if (b) {
                o->spare_batch = NULL;
                return b;
        }
        b = calloc(1, sizeof *b);
        if (!b)
                return NULL;
        if (pthread_mutex_init(&b->mu, NULL) != 0) {
                free(b);
                return NULL;
        }
        b->o = o;
        return b;
}

static int ids_add(struct append_batch *b, const char *id, uint32_t *ret_off) {
        size_t len = strlen(id) + 1;

        if (b->ids_len + len > b->ids_cap) {
                size_t cap = MAX(b->ids_cap * 2, MAX(b->ids_len + len, (size_t) 4096));
                char *v = realloc(b->ids, cap);
                if (!v)
                        return -ENOMEM;
                b->ids = v;
                b->ids_cap = cap;
        }
        if (b->ids_len + len > UINT32_MAX - 1)
                return -E2BIG;
        memcpy(b->ids + b->ids_len, id, len);
        *ret_off = (uint32_t) b->ids_len;
        b->ids_len += len;
        return 0;
}

/* Adds a row to b unless the commit thread has sealed it. Returns 1 when added, 0 when
 * sealed, -ENOMEM. */
static int append_batch_add(struct append_batch *b, const struct append_row *row, const char *dev, const char *mod) {
        size_t n0, ids0;
        int r = 1;

        pthread_mutex_lock(&b->mu);
        if (b->sealed) {
                pthread_mutex_unlock(&b->mu);
                return 0;
        }
        n0 = b->n;
        ids0 = b->ids_len;
        if (b->n == b->cap) {
                size_t cap = b->cap ? b->cap * 2 : 64;
                struct append_row *v = realloc(b->rows, cap * sizeof *v);
                if (!v)
                        r = -ENOMEM;
                else {
                        b->rows = v;
                        b->cap = cap;
                }
        }
        if (r > 0) {
                struct append_row x = *row;
                x.mod_off = UINT32_MAX;
                r = ids_add(b, dev, &x.dev_off);
                if (r >= 0 && mod)
                        r = ids_add(b, mod, &x.mod_off);
                if (r >= 0) {
                        b->rows[b->n++] = x;
                        r = 1;
                }
        }
        if (r < 0) {
                b->n = n0;
                b->ids_len = ids0;
        }
        pthread_mutex_unlock(&b->mu);
        return r;
}

int hub_outbox_append(struct hub_outbox *o, struct hub_msg *m, hub_outbox_append_done_fn done, void *ud) {
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
                uint64_t count = 0, bytes = 0;
                index_backlog(o, ep->cursor, &count, ep->opts.max_bytes ? &bytes : NULL);
                count += o->pending_count + 1;
                bytes += o->pending_bytes + len;
                if ((ep->opts.max_count > 0 && count > ep->opts.max_count) ||
                    (ep->opts.max_bytes > 0 && bytes > ep->opts.max_bytes)) {
                        ep->rejected++;
                        free(blob);
                        return -ENOBUFS;
                }
        }

        struct append_row row = {
                .seq = o->next_seq,
                .blob = blob,
                .blob_len = (uint32_t) len,
                .flags = o->synced ? ENTRY_SYNCED : 0,
                .done = done,
                .ud = ud,
        };
        now_times(o, &row.enq_wall, &row.boot_time);

        r = o->cur_batch ? append_batch_add(o->cur_batch, &row, dev, mod) : 0;
        if (r == 0) {
                /* No open batch (or the commit thread took it): start and submit one. */
                struct append_batch *b = append_batch_new(o);
                if (!b) {
                        free(blob);
                        return -ENOMEM;
                }
                r = append_batch_add(b, &row, dev, mod);
                if (r > 0) {
                        r = hub_store_submit_flags(o->store, append_batch_write_fn, append_batch_done, b,
                                                   HUB_STORE_WRITE_SINGLE);
                        if (r < 0)
                                b->n = 0; /* the blob goes back to the caller's error path */
                }
                if (r < 0) {
                        append_batch_reset(b);
                        if (!o->spare_batch)
                                o->spare_batch = b;
                        else
                                append_batch_free(b);
                        free(blob);
                        return r;
                }
                o->cur_batch = b;
                o->n_pending++;
        } else if (r < 0) {
                free(blob);
                return r;
        }
        o->next_seq++;
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
                uint64_t ci, cj;
                index_backlog(o, ep->cursor, &ci, NULL);
                index_backlog(o, seq, &cj, NULL);
                ep->delivered += ci - MIN(cj, ci);
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
        uint64_t last_first, le_count, le_bytes; /* for index_trim() */
        uint64_t rows;                           /* rows it deletes */
        uint64_t n_deleted; /* set on the commit thread */
        void (*done)(int result, uint64_t n_deleted, void *ud);
        void *ud;
};

static const char GC_DELETE_SQL[] = "DELETE FROM outbox WHERE seq <= ?1";
static const char GC_DELETE_CHUNKS_SQL[] = "DELETE FROM outbox_chunks WHERE last <= ?1";

static int gc_write_fn(struct hub_store_txn *txn, void *ud) {
        struct gc_job *g = ud;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int r, rc;

        r = hub_store_txn_prepare(txn, GC_DELETE_SQL, &st);
        if (r < 0)
                return r;
        sqlite3_bind_int64(st, 1, (sqlite3_int64) g->upto);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        g->n_deleted = (uint64_t) sqlite3_changes(db);
        /* The summaries of the chunks gone entirely (see "chunk summaries"). */
        r = hub_store_txn_prepare(txn, GC_DELETE_CHUNKS_SQL, &st);
        if (r < 0)
                return r;
        sqlite3_bind_int64(st, 1, (sqlite3_int64) g->upto);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static void gc_done(int r, void *ud) {
        struct gc_job *g = ud;
        struct hub_outbox *o = g->o;

        o->n_pending--;
        o->gc_running = false;
        if (r >= 0) {
                index_trim(o, g->upto, g->last_first, g->le_count, g->le_bytes);
                o->deleted += g->n_deleted;
        }
        if (g->done)
                g->done(r, r >= 0 ? g->n_deleted : 0, g->ud);
        /* A full batch: more may wait below the frontier. Go on at once rather than at the
         * caller's next call (a second later), or an ingest faster than GC_BATCH messages a
         * second would outgrow a disk budget although every endpoint moved on. */
        bool more = r >= 0 && g->rows >= GC_BATCH;
        free(g);
        if (more)
                (void) hub_outbox_gc(o, NULL, NULL);
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

        /* Whole chunks up to the frontier, then the part of the next one, at most GC_BATCH
         * rows in all. */
        struct gc_job job = { .o = o, .done = done, .ud = ud };
        uint64_t rows = 0;
        for (size_t k = 0; k < o->idx.n && rows < GC_BATCH; k++) {
                const struct chunk *c = chunk_at(&o->idx, k);
                const struct row_info *rv;
                size_t n;

                if (c->first > frontier)
                        break;
                if (c->last <= frontier && rows + c->count <= GC_BATCH) {
                        rows += c->count;
                        job.upto = c->last;
                        job.last_first = c->first;
                        job.le_count = c->count;
                        job.le_bytes = c->bytes;
                        continue;
                }
                r = chunk_rows(o, k, &rv, &n);
                if (r < 0)
                        break;
                size_t take = MIN(rows_after(rv, n, frontier), (size_t) (GC_BATCH - rows));
                if (take > 0) {
                        rows += take;
                        job.upto = rv[take - 1].seq;
                        job.last_first = c->first;
                        job.le_count = take;
                        job.le_bytes = rv[take - 1].cum;
                }
                break;
        }
        if (rows == 0)
                return 0;
        job.rows = rows;

        g = malloc(sizeof *g);
        if (!g)
                return -ENOMEM;
        *g = job;
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
        size_t k = chunk_after(&o->idx, ep->cursor);
        uint64_t now_wall, now_mono, age = 0, count = 0, bytes = 0;
        const struct row_info *rows;
        size_t n;

        now_times(o, &now_wall, &now_mono);
        if (!ep->deleted && k < o->idx.n && chunk_rows(o, k, &rows, &n) >= 0) {
                const struct chunk *c = chunk_at(&o->idx, k);
                size_t i = rows_after(rows, n, ep->cursor);
                if (i < n && !message_age(o, rows[i].enq_wall, c->boot, rows[i].boot_time, c->flags, now_wall, now_mono,
                                          &age))
                        age = 0;
        }
        if (!ep->deleted)
                index_backlog(o, ep->cursor, &count, &bytes);
        *ret = (struct hub_outbox_endpoint_stats) {
                .cursor = ep->cursor,
                .head = o->head,
                .backlog_count = count,
                .backlog_bytes = bytes,
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
                .stored_count = index_count(&o->idx),
                .stored_bytes = index_bytes(&o->idx),
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

/* Rows first..last of the log into the index, row by row. */
static int load_rows(struct hub_outbox *o, sqlite3 *db, uint64_t first, uint64_t last, uint64_t *high) {
        sqlite3_stmt *st = NULL;
        int rc, r = 0;

        rc = sqlite3_prepare_v2(db,
                                "SELECT seq, enqueued, boot, boot_time, flags, size FROM outbox WHERE seq >= ?1 AND "
                                "seq <= ?2 ORDER BY seq",
                                -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_int64(st, 1, (sqlite3_int64) MIN(first, (uint64_t) INT64_MAX));
                sqlite3_bind_int64(st, 2, (sqlite3_int64) MIN(last, (uint64_t) INT64_MAX));
        }
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                uint64_t seq = (uint64_t) sqlite3_column_int64(st, 0);
                rc = SQLITE_OK;
                r = index_push(o, seq, (uint64_t) sqlite3_column_int64(st, 1), (uint32_t) sqlite3_column_int64(st, 2),
                               (uint64_t) sqlite3_column_int64(st, 3), (uint32_t) sqlite3_column_int64(st, 4),
                               (uint32_t) sqlite3_column_int64(st, 5));
                if (r < 0)
                        break;
                *high = MAX(*high, seq);
        }
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

/* Builds the index from the chunk summaries and the rows no summary covers (see "chunk
 * summaries"): walking the summaries in order with next = the lowest seq not indexed yet
 * (first the oldest row left), a summary wholly below next is stale (collected rows) and
 * skipped, one that starts below next (its front was collected) and implausible ones are read
 * row by row, the rows between two summaries are read, and the rest after the last one. */
static int load_index(struct hub_outbox *o, sqlite3 *db, uint64_t *high) {
        sqlite3_stmt *st = NULL;
        uint64_t next = 0;
        int rc, r = 0;

        /* Two subqueries: SQLite answers min() or max() of the key from the b-tree's ends only
         * when each stands alone (both in one SELECT scan the whole table). */
        rc = sqlite3_prepare_v2(db, "SELECT (SELECT min(seq) FROM outbox), (SELECT max(seq) FROM outbox)", -1, &st,
                                NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                if (sqlite3_column_type(st, 0) == SQLITE_NULL) {
                        sqlite3_finalize(st);
                        return 0; /* an empty log (stale summaries go with the next collection) */
                }
                next = (uint64_t) sqlite3_column_int64(st, 0);
                *high = MAX(*high, (uint64_t) sqlite3_column_int64(st, 1));
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return hub_store_errno(rc);

        rc = sqlite3_prepare_v2(db,
                                "SELECT first, last, count, bytes, min_bt, max_bt, min_wall, max_wall, boot, flags "
                                "FROM outbox_chunks ORDER BY first",
                                -1, &st, NULL);
        while (r >= 0 && rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                struct chunk c = {
                        .first = (uint64_t) sqlite3_column_int64(st, 0),
                        .last = (uint64_t) sqlite3_column_int64(st, 1),
                        .count = (uint64_t) sqlite3_column_int64(st, 2),
                        .bytes = (uint64_t) sqlite3_column_int64(st, 3),
                        .min_bt = (uint64_t) sqlite3_column_int64(st, 4),
                        .max_bt = (uint64_t) sqlite3_column_int64(st, 5),
                        .min_wall = (uint64_t) sqlite3_column_int64(st, 6),
                        .max_wall = (uint64_t) sqlite3_column_int64(st, 7),
                        .boot = (uint32_t) sqlite3_column_int64(st, 8),
                        .flags = (uint32_t) sqlite3_column_int64(st, 9),
                };
                rc = SQLITE_OK;
                if (c.last < next)
                        continue;
                bool plausible = c.first <= c.last && c.count >= 1 && c.count <= CHUNK_ROWS &&
                                 c.count - 1 <= c.last - c.first && c.last <= *high;
                if (c.first < next || !plausible) {
                        r = load_rows(o, db, next, c.last, high);
                        next = c.last + 1;
                        continue;
                }
                if (c.first > next)
                        r = load_rows(o, db, next, c.first - 1, high);
                if (r >= 0)
                        r = index_add_summary(o, &c);
                next = c.last + 1;
        }
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        return load_rows(o, db, next, UINT64_MAX, high);
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

        r = load_index(o, db, &high);
        if (r < 0)
                return r;
        /* Summaries for what was read row by row (the first start after an upgrade: all). */
        index_persist(o);

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
        hub_log_debug(o->log, "outbox: %llu messages stored, head %llu, %zu endpoints",
                      (unsigned long long) index_count(&o->idx),
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
        sqlite3_finalize(o->st_detail);
        for (size_t i = 0; i < o->n_eps; i++)
                endpoint_free(o->eps[i]);
        free(o->eps);
        while (o->dead) {
                struct hub_outbox_endpoint *ep = o->dead;
                o->dead = ep->next_dead;
                endpoint_free(ep);
        }
        free(o->idx.v);
        free(o->idx.tail);
        for (size_t i = 0; i < DETAIL_SLOTS; i++)
                free(o->idx.cache[i].v);
        append_batch_free(o->cur_batch);
        append_batch_free(o->spare_batch);
        free(o);
        return NULL;
}
