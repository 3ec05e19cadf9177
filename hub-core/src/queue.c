/* SPDX-License-Identifier: MIT */
/* Cloud-to-device queues and feedback (reference §7, §5.7), on the store.
 *
 * Every state lives in SQLite; nothing is cached in memory, so a restart resumes exactly
 * where the last commit left off (locks included: a lock held when the daemon stopped simply
 * expires at its time and the message is redelivered). Each operation is one store write
 * (its own SAVEPOINT inside the commit group): the state change, the feedback record it
 * causes, the feedback batch it completes and devices.c2d_count are committed together.
 *
 * A write function runs on the store's commit thread. It touches only its own `struct op`
 * (inputs copied at submission, outputs filled for the completion) and never the hub_queue,
 * which belongs to the owner's thread and may even be freed while writes are pending.
 *
 * Tables:
 *   c2d_sequence        last sequence number handed out per device (numbers never go back,
 *                       even when the queue empties)
 *   c2d_messages        one row per queued message; lock_token NULL = Enqueued, else
 *                       Invisible until lock_until
 *   c2d_feedback_records feedback records not yet batched
 *   c2d_feedback_messages the feedback queue (JSON arrays of records)
 *
 * "Deliverable" = Enqueued and not expired at `now`. on_available fires when an operation
 * made messages deliverable and, after it, the number of deliverable messages equals the
 * number it made deliverable: before it there were none. */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <sqlite3.h>

#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/log.h"
#include "hub/msg.h"
#include "hub/queue.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "store-internal.h"
#include "store-schema.h"

const char hub_queue_schema_sql[] =
        "CREATE TABLE c2d_sequence (\n"
        "  device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,\n"
        "  last_seq INTEGER NOT NULL\n"
        ") WITHOUT ROWID;\n"
        "CREATE TABLE c2d_messages (\n"
        "  id INTEGER PRIMARY KEY,\n"
        "  device_id TEXT NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,\n"
        "  seq INTEGER NOT NULL,\n"
        "  message_id TEXT,\n"
        "  ack INTEGER NOT NULL,\n"
        "  enqueued INTEGER NOT NULL,\n"
        "  expiry INTEGER NOT NULL,\n"
        "  lock_token TEXT,\n"
        "  lock_until INTEGER,\n"
        "  delivery_count INTEGER NOT NULL DEFAULT 0,\n"
        "  lock_expiries INTEGER NOT NULL DEFAULT 0,\n"
        "  body BLOB NOT NULL,\n"
        "  UNIQUE (device_id, seq)\n"
        ");\n"
        "CREATE UNIQUE INDEX c2d_messages_lock_token ON c2d_messages(lock_token) WHERE lock_token IS NOT NULL;\n"
        "CREATE INDEX c2d_messages_lock_until ON c2d_messages(lock_until) WHERE lock_until IS NOT NULL;\n"
        "CREATE INDEX c2d_messages_expiry ON c2d_messages(expiry);\n"
        "CREATE TABLE c2d_feedback_records (\n"
        "  id INTEGER PRIMARY KEY,\n"
        "  device_id TEXT NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,\n"
        "  generation_id TEXT NOT NULL,\n"
        "  original_message_id TEXT,\n"
        "  time INTEGER NOT NULL,\n"
        "  status INTEGER NOT NULL\n"
        ");\n"
        "CREATE INDEX c2d_feedback_records_device ON c2d_feedback_records(device_id);\n"
        "CREATE TABLE c2d_feedback_messages (\n"
        "  seq INTEGER PRIMARY KEY AUTOINCREMENT,\n"
        "  message_id TEXT NOT NULL,\n"
        "  enqueued INTEGER NOT NULL,\n"
        "  expiry INTEGER NOT NULL,\n"
        "  lock_token TEXT,\n"
        "  lock_until INTEGER,\n"
        "  delivery_count INTEGER NOT NULL DEFAULT 0,\n"
        "  body TEXT NOT NULL\n"
        ");\n"
        "CREATE UNIQUE INDEX c2d_feedback_messages_lock_token ON c2d_feedback_messages(lock_token)\n"
        "  WHERE lock_token IS NOT NULL;\n"
        "CREATE INDEX c2d_feedback_messages_lock_until ON c2d_feedback_messages(lock_until)\n"
        "  WHERE lock_until IS NOT NULL;\n"
        "CREATE INDEX c2d_feedback_messages_expiry ON c2d_feedback_messages(expiry);\n";

/* ---- small helpers ------------------------------------------------------------------------ */

static const char *const feedback_status_names[_HUB_FEEDBACK_STATUS_MAX] = {
        [HUB_FEEDBACK_SUCCESS] = "Success",
        [HUB_FEEDBACK_EXPIRED] = "Expired",
        [HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED] = "DeliveryCountExceeded",
        [HUB_FEEDBACK_REJECTED] = "Rejected",
        [HUB_FEEDBACK_PURGED] = "Purged",
};

static const char *const feedback_descriptions[_HUB_FEEDBACK_STATUS_MAX] = {
        [HUB_FEEDBACK_SUCCESS] = "Success",
        [HUB_FEEDBACK_EXPIRED] = "Message expired",
        [HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED] = "Message delivery count exceeded",
        [HUB_FEEDBACK_REJECTED] = "Message rejected",
        [HUB_FEEDBACK_PURGED] = "Message purged",
};

static const char *const ack_names[] = {
        [HUB_QUEUE_ACK_NONE] = "none",
        [HUB_QUEUE_ACK_POSITIVE] = "positive",
        [HUB_QUEUE_ACK_NEGATIVE] = "negative",
        [HUB_QUEUE_ACK_FULL] = "full",
};

const char *hub_feedback_status_to_string(enum hub_feedback_status s) {
        if ((unsigned) s >= _HUB_FEEDBACK_STATUS_MAX)
                return NULL;
        return feedback_status_names[s];
}

int hub_queue_ack_from_string(const char *s, enum hub_queue_ack *ret) {
        if (!ret)
                return -EINVAL;
        if (!s) {
                *ret = HUB_QUEUE_ACK_NONE;
                return 0;
        }
        for (size_t i = 0; i < ELEMENTSOF(ack_names); i++)
                if (streq(s, ack_names[i])) {
                        *ret = (enum hub_queue_ack) i;
                        return 0;
                }
        return -EINVAL;
}

/* Whether a message with this ack wants a record with this status. Purged counts as negative
 * (the message was not delivered). */
static bool ack_wants(int ack, enum hub_feedback_status s) {
        if (s == HUB_FEEDBACK_SUCCESS)
                return ack == HUB_QUEUE_ACK_POSITIVE || ack == HUB_QUEUE_ACK_FULL;
        return ack == HUB_QUEUE_ACK_NEGATIVE || ack == HUB_QUEUE_ACK_FULL;
}

static void finalizep(sqlite3_stmt **st) {
        if (*st)
                (void) sqlite3_finalize(*st);
}
#define _cleanup_stmt_ _cleanup_(finalizep)

static int prep(sqlite3 *db, const char *sql, sqlite3_stmt **ret) {
        int rc = sqlite3_prepare_v2(db, sql, -1, ret, NULL);
        return rc == SQLITE_OK ? 0 : hub_store_errno(rc);
}

/* Steps a statement that returns no row (or whose rows are ignored). */
static int step_done(sqlite3_stmt *st) {
        int rc;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
                ;
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static int exec1(sqlite3 *db, const char *sql, const char *text, int64_t i2) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r = prep(db, sql, &st);
        if (r < 0)
                return r;
        if (text)
                sqlite3_bind_text(st, 1, text, -1, SQLITE_STATIC);
        if (sqlite3_bind_parameter_count(st) >= 2)
                sqlite3_bind_int64(st, 2, i2);
        return step_done(st);
}

/* Runs a one-value query with ?1 = text (may be NULL: unbound), ?2 = i2. Returns 1 with
 * *ret, 0 when there is no row or the value is NULL. */
static int query_int(sqlite3 *db, const char *sql, const char *text, int64_t i2, int64_t *ret) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r = prep(db, sql, &st), rc;
        if (r < 0)
                return r;
        if (text)
                sqlite3_bind_text(st, 1, text, -1, SQLITE_STATIC);
        if (sqlite3_bind_parameter_count(st) >= 2)
                sqlite3_bind_int64(st, 2, i2);
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return 0;
        if (rc != SQLITE_ROW)
                return hub_store_errno(rc);
        if (sqlite3_column_type(st, 0) == SQLITE_NULL)
                return 0;
        *ret = sqlite3_column_int64(st, 0);
        return 1;
}

/* A GUID-shaped (version 4) string from 16 random bytes: IoT Hub's lock tokens look so. */
static int lock_token_new(char ret[static HUB_QUEUE_LOCK_TOKEN_MAX + 1]) {
        uint8_t b[16];
        int r = hub_random_bytes(b, sizeof b);
        if (r < 0)
                return r;
        b[6] = (uint8_t) ((b[6] & 0x0f) | 0x40);
        b[8] = (uint8_t) ((b[8] & 0x3f) | 0x80);
        snprintf(ret, HUB_QUEUE_LOCK_TOKEN_MAX + 1,
                 "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3],
                 b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
        hub_explicit_bzero(b, sizeof b);
        return 0;
}

static uint64_t add_sat(uint64_t a, uint64_t b) {
        return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* SQLite integers are signed: keep every time within INT64_MAX. */
static int64_t t64(uint64_t t) {
        return t > (uint64_t) INT64_MAX ? INT64_MAX : (int64_t) t;
}

/* ---- options ------------------------------------------------------------------------------- */

/* Locks one row: runs @sql with ?1 = @token, ?2 = @until and ?3 = @key. */
static int set_lock(sqlite3 *db, const char *sql, const char *token, uint64_t until, int64_t key) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r;

        r = prep(db, sql, &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, token, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, t64(until));
        sqlite3_bind_int64(st, 3, key);
        return step_done(st);
}

/* Runs @sql with ?1 = @lock_token and returns the statement positioned on its first row;
 * -ENOLCK when no row holds that lock token. */
static int find_locked(sqlite3 *db, const char *sql, const char *lock_token, sqlite3_stmt **ret) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r, rc;

        r = prep(db, sql, &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, lock_token, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return -ENOLCK;
        if (rc != SQLITE_ROW)
                return hub_store_errno(rc);
        *ret = TAKE_PTR(st);
        return 0;
}

static void options_fill(const struct hub_queue_options *in, struct hub_queue_options *o) {
        *o = in ? *in : (struct hub_queue_options) { 0 };
        if (o->default_ttl_usec == 0)
                o->default_ttl_usec = HUB_QUEUE_DEFAULT_TTL_USEC;
        if (o->max_ttl_usec == 0)
                o->max_ttl_usec = MAX(HUB_QUEUE_TTL_MAX_USEC, o->default_ttl_usec);
        if (o->max_delivery_count == 0)
                o->max_delivery_count = HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT;
        if (o->max_depth == 0)
                o->max_depth = HUB_QUEUE_DEFAULT_MAX_DEPTH;
        if (o->lock_timeout_usec == 0)
                o->lock_timeout_usec = HUB_QUEUE_DEFAULT_LOCK_USEC;
        if (o->feedback_ttl_usec == 0)
                o->feedback_ttl_usec = HUB_QUEUE_DEFAULT_TTL_USEC;
        if (o->feedback_lock_timeout_usec == 0)
                o->feedback_lock_timeout_usec = HUB_QUEUE_DEFAULT_LOCK_USEC;
        if (o->feedback_max_delivery_count == 0)
                o->feedback_max_delivery_count = HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT;
}

int hub_queue_options_validate(const struct hub_queue_options *in, const char **ret_error) {
        struct hub_queue_options o;
        const char *e = NULL;

        options_fill(in, &o);
        if (o.default_ttl_usec < HUB_QUEUE_TTL_MIN_USEC || o.default_ttl_usec > HUB_QUEUE_TTL_MAX_USEC)
                e = "default TTL must be between 1 minute and 48 hours";
        else if (o.max_ttl_usec < o.default_ttl_usec || o.max_ttl_usec > HUB_QUEUE_TTL_MAX_USEC)
                e = "maximum TTL must be between the default TTL and 48 hours";
        else if (o.max_delivery_count < 1 || o.max_delivery_count > HUB_QUEUE_MAX_DELIVERY_COUNT_LIMIT)
                e = "maximum delivery count must be between 1 and 100";
        else if (o.max_depth < 1 || o.max_depth > HUB_QUEUE_MAX_DEPTH_LIMIT)
                e = "queue depth limit must be between 1 and 100000";
        else if (o.lock_timeout_usec < HUB_QUEUE_LOCK_MIN_USEC || o.lock_timeout_usec > HUB_QUEUE_LOCK_MAX_USEC)
                e = "lock timeout must be between 5 and 300 seconds";
        else if (o.max_lock_expiries > 1000)
                e = "maximum lock expiries must be between 0 (no limit) and 1000";
        else if (o.feedback_ttl_usec < HUB_QUEUE_TTL_MIN_USEC || o.feedback_ttl_usec > HUB_QUEUE_TTL_MAX_USEC)
                e = "feedback TTL must be between 1 minute and 48 hours";
        else if (o.feedback_lock_timeout_usec < HUB_QUEUE_LOCK_MIN_USEC ||
                 o.feedback_lock_timeout_usec > HUB_QUEUE_LOCK_MAX_USEC)
                e = "feedback lock timeout must be between 5 and 300 seconds";
        else if (o.feedback_max_delivery_count < 1 ||
                 o.feedback_max_delivery_count > HUB_QUEUE_MAX_DELIVERY_COUNT_LIMIT)
                e = "feedback maximum delivery count must be between 1 and 100";
        if (e) {
                if (ret_error)
                        *ret_error = e;
                return -EINVAL;
        }
        return 0;
}

static uint64_t clamp_lock(uint64_t v, uint64_t dflt) {
        if (v == 0)
                return dflt;
        return MIN(MAX(v, HUB_QUEUE_LOCK_MIN_USEC), HUB_QUEUE_LOCK_MAX_USEC);
}

/* ---- the queue object and pending operations ------------------------------------------------- */

enum op_kind {
        OP_SEND,
        OP_RECEIVE,
        OP_COMPLETE,
        OP_REJECT,
        OP_ABANDON,
        OP_RELEASE,
        OP_PURGE,
        OP_TICK,
        OP_FB_RECEIVE,
        OP_FB_COMPLETE,
        OP_FB_ABANDON,
        OP_FB_REJECT,
};

struct avail {
        char *device_id;
        uint64_t added;
        struct avail *next;
};

struct op {
        struct hub_queue *q; /* NULL once the queue has been freed */
        struct op *prev, *next;
        enum op_kind kind;
        struct hub_queue_options opts;
        const struct hub_log *log;

        /* inputs */
        char device_id[HUB_DEVICE_ID_MAX + 1];
        char *lock_token_in;
        uint64_t now;
        uint64_t lock_timeout;
        uint8_t *buf; /* serialised message (send) */
        size_t len;
        char *message_id;
        int ack;
        uint64_t expiry;
        char new_token[HUB_QUEUE_LOCK_TOKEN_MAX + 1];

        /* outputs */
        uint64_t count;
        bool have_delivery;
        struct hub_queue_delivery d;
        struct hub_msg *msg;
        struct avail *avail;     /* devices that became deliverable */
        uint64_t fb_added;       /* feedback messages made deliverable */
        bool fb_available;

        union {
                hub_queue_send_done_fn send;
                hub_queue_receive_done_fn receive;
                hub_queue_done_fn plain;
                hub_queue_count_done_fn count;
        } done;
        void *userdata;
};

struct hub_queue {
        struct hub_store *store;
        struct hub_queue_options opts;
        struct hub_queue_hooks hooks;
        const struct hub_log *log;
        struct op *ops; /* pending, for detaching at free */
        /* hub_queue_next_deadline() runs after every store dispatch (for each group commit
         * of D2C messages too): its statement is prepared once on the read connection
         * (finalized by hub_queue_free(), which must run before the store is closed), and
         * its answer is kept until a queue write completes (op_done: only queue writes
         * touch the queue tables). */
        sqlite3 *deadline_db;
        sqlite3_stmt *deadline_st;
        bool deadline_valid;
        int deadline_r;
        uint64_t deadline_usec;
};

static void avail_free_all(struct avail *a) {
        while (a) {
                struct avail *n = a->next;
                free(a->device_id);
                free(a);
                a = n;
        }
}

static struct op *op_free(struct op *op) {
        if (!op)
                return NULL;
        free(op->lock_token_in);
        free(op->buf);
        free(op->message_id);
        hub_msg_unref(op->msg);
        avail_free_all(op->avail);
        free(op);
        return NULL;
}

int hub_queue_new(struct hub_store *store, const struct hub_queue_options *opts, const struct hub_queue_hooks *hooks,
                  const struct hub_log *log, struct hub_queue **ret) {
        struct hub_queue *q;
        int r;

        if (!store || !ret)
                return -EINVAL;
        r = hub_queue_options_validate(opts, NULL);
        if (r < 0)
                return r;
        q = calloc(1, sizeof *q);
        if (!q)
                return -ENOMEM;
        q->store = store;
        options_fill(opts, &q->opts);
        if (hooks)
                q->hooks = *hooks;
        q->log = log;
        *ret = q;
        return 0;
}

struct hub_queue *hub_queue_free(struct hub_queue *q) {
        if (!q)
                return NULL;
        for (struct op *op = q->ops; op; op = op->next)
                op->q = NULL;
        (void) sqlite3_finalize(q->deadline_st);
        free(q);
        return NULL;
}

static int op_new(struct hub_queue *q, enum op_kind kind, const char *device_id, uint64_t now, struct op **ret) {
        struct op *op;

        if (device_id && (!*device_id || strlen(device_id) > HUB_DEVICE_ID_MAX))
                return -EINVAL;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->kind = kind;
        op->opts = q->opts;
        op->log = q->log;
        op->now = now;
        if (device_id)
                strcpy(op->device_id, device_id);
        *ret = op;
        return 0;
}

static void op_done(int result, void *userdata) {
        struct op *op = userdata;
        struct hub_queue *q = op->q;

        if (q) {
                q->deadline_valid = false;
                if (op->prev)
                        op->prev->next = op->next;
                else
                        q->ops = op->next;
                if (op->next)
                        op->next->prev = op->prev;
        }

        switch (op->kind) {
        case OP_SEND:
                if (op->done.send)
                        op->done.send(result, result >= 0 ? op->count : 0, op->userdata);
                break;
        case OP_RECEIVE:
        case OP_FB_RECEIVE:
                if (op->done.receive)
                        op->done.receive(result, result >= 0 && op->have_delivery ? &op->d : NULL, op->userdata);
                break;
        case OP_PURGE:
                if (op->done.count)
                        op->done.count(result, result >= 0 ? op->count : 0, op->userdata);
                break;
        default:
                if (op->done.plain)
                        op->done.plain(result, op->userdata);
                break;
        }

        if (q && result >= 0) {
                if (q->hooks.on_available)
                        for (struct avail *a = op->avail; a; a = a->next)
                                q->hooks.on_available(q->hooks.userdata, a->device_id);
                if (op->fb_available && q->hooks.on_feedback_available)
                        q->hooks.on_feedback_available(q->hooks.userdata);
        }
        op_free(op);
}

static int op_submit(struct hub_queue *q, struct op *op, hub_store_write_fn fn) {
        int r = hub_store_submit(q->store, fn, op_done, op);
        if (r < 0) {
                op_free(op);
                return r;
        }
        op->q = q;
        op->next = q->ops;
        if (q->ops)
                q->ops->prev = op;
        q->ops = op;
        return 0;
}

/* ---- pieces of write functions (commit thread) ----------------------------------------------- */

/* The device's generation id; -ENOENT when the device does not exist. */
static int device_generation(sqlite3 *db, const char *device_id, char ret[static 24]) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r = prep(db, "SELECT generation_id FROM devices WHERE device_id = ?1", &st), rc;
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return -ENOENT;
        if (rc != SQLITE_ROW)
                return hub_store_errno(rc);
        const unsigned char *g = sqlite3_column_text(st, 0);
        snprintf(ret, 24, "%s", g ? (const char *) g : "");
        return 0;
}

static int update_count(sqlite3 *db, const char *device_id) {
        return exec1(db,
                     "UPDATE devices SET c2d_count = (SELECT count(*) FROM c2d_messages WHERE device_id = ?1) "
                     "WHERE device_id = ?1",
                     device_id, 0);
}

static int count_deliverable(sqlite3 *db, const char *device_id, uint64_t now, int64_t *ret) {
        int64_t n = 0;
        int r = query_int(db,
                          "SELECT count(*) FROM c2d_messages WHERE device_id = ?1 AND lock_token IS NULL "
                          "AND expiry > ?2",
                          device_id, t64(now), &n);
        if (r < 0)
                return r;
        *ret = n;
        return 0;
}

/* Records that `added` messages of device_id became deliverable in this op. */
static int note_added(struct op *op, const char *device_id, uint64_t added) {
        struct avail *a;

        if (added == 0)
                return 0;
        for (a = op->avail; a; a = a->next)
                if (streq(a->device_id, device_id)) {
                        a->added += added;
                        return 0;
                }
        a = calloc(1, sizeof *a);
        if (!a)
                return -ENOMEM;
        a->device_id = strdup(device_id);
        if (!a->device_id) {
                free(a);
                return -ENOMEM;
        }
        a->added = added;
        a->next = op->avail;
        op->avail = a;
        return 0;
}

/* Keeps in op->avail only the devices that had nothing deliverable before this op. */
static int resolve_added(sqlite3 *db, struct op *op) {
        struct avail **p = &op->avail;

        while (*p) {
                struct avail *a = *p;
                int64_t n;
                int r = count_deliverable(db, a->device_id, op->now, &n);
                if (r < 0)
                        return r;
                if (n > 0 && (uint64_t) n == a->added)
                        p = &a->next;
                else {
                        *p = a->next;
                        free(a->device_id);
                        free(a);
                }
        }
        return 0;
}

static int count_fb_deliverable(sqlite3 *db, uint64_t now, int64_t *ret) {
        int64_t n = 0;
        int r = query_int(db,
                          "SELECT count(*) FROM c2d_feedback_messages WHERE lock_token IS NULL AND expiry > ?2",
                          NULL, t64(now), &n);
        if (r < 0)
                return r;
        *ret = n;
        return 0;
}

static int resolve_fb_added(sqlite3 *db, struct op *op) {
        int64_t n;
        int r;

        if (op->fb_added == 0)
                return 0;
        r = count_fb_deliverable(db, op->now, &n);
        if (r < 0)
                return r;
        op->fb_available = n > 0 && (uint64_t) n == op->fb_added;
        return 0;
}

/* Turns the oldest (up to HUB_QUEUE_FEEDBACK_BATCH_MAX) pending records into one feedback
 * message. Returns 1 when a message was made, 0 when there was no record. */
static int feedback_batch(sqlite3 *db, struct op *op) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        _cleanup_(json_decrefp) json_t *arr = NULL;
        _cleanup_free_ char *body = NULL;
        char id[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
        int64_t last_id = 0;
        unsigned n = 0;
        int r, rc;

        r = prep(db,
                 "SELECT id, device_id, generation_id, original_message_id, time, status "
                 "FROM c2d_feedback_records ORDER BY id LIMIT ?1",
                 &st);
        if (r < 0)
                return r;
        sqlite3_bind_int(st, 1, HUB_QUEUE_FEEDBACK_BATCH_MAX);
        arr = json_array();
        if (!arr)
                return -ENOMEM;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                char t[32];
                int status = sqlite3_column_int(st, 5);
                const char *mid = (const char *) sqlite3_column_text(st, 3);
                json_t *rec;

                if (status < 0 || status >= _HUB_FEEDBACK_STATUS_MAX)
                        status = HUB_FEEDBACK_EXPIRED; /* cannot happen: written by us */
                last_id = sqlite3_column_int64(st, 0);
                rec = json_pack("{s:s?, s:s, s:s, s:s, s:s, s:s}", "originalMessageId", mid, "enqueuedTimeUtc",
                                hub_time_format_iso8601((uint64_t) sqlite3_column_int64(st, 4), t), "statusCode",
                                feedback_status_names[status], "description", feedback_descriptions[status],
                                "deviceId", (const char *) sqlite3_column_text(st, 1), "deviceGenerationId",
                                (const char *) sqlite3_column_text(st, 2));
                if (!rec || json_array_append_new(arr, rec) < 0)
                        return -ENOMEM;
                n++;
        }
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        if (n == 0)
                return 0;

        body = hub_json_dumps(arr, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (!body)
                return -ENOMEM;
        r = lock_token_new(id); /* a fresh GUID as message-id */
        if (r < 0)
                return r;

        sqlite3_finalize(st);
        st = NULL;
        r = prep(db,
                 "INSERT INTO c2d_feedback_messages (message_id, enqueued, expiry, body) VALUES (?1, ?2, ?3, ?4)",
                 &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, t64(op->now));
        sqlite3_bind_int64(st, 3, t64(add_sat(op->now, op->opts.feedback_ttl_usec)));
        sqlite3_bind_text(st, 4, body, -1, SQLITE_STATIC);
        r = step_done(st);
        if (r < 0)
                return r;
        r = exec1(db, "DELETE FROM c2d_feedback_records WHERE id <= ?2", NULL, last_id);
        if (r < 0)
                return r;
        op->fb_added++;
        return 1;
}

/* Writes a feedback record when the message's ack asks for one; makes a batch when 64 are
 * pending. gen may be NULL (looked up). */
static int add_feedback(sqlite3 *db, struct op *op, const char *device_id, const char *gen, const char *message_id,
                        int ack, enum hub_feedback_status status) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        char genbuf[24];
        int64_t n = 0;
        int r;

        if (!ack_wants(ack, status))
                return 0;
        if (!gen) {
                r = device_generation(db, device_id, genbuf);
                if (r < 0)
                        return r;
                gen = genbuf;
        }
        r = prep(db,
                 "INSERT INTO c2d_feedback_records (device_id, generation_id, original_message_id, time, status) "
                 "VALUES (?1, ?2, ?3, ?4, ?5)",
                 &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, gen, -1, SQLITE_STATIC);
        if (message_id)
                sqlite3_bind_text(st, 3, message_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 4, t64(op->now));
        sqlite3_bind_int(st, 5, (int) status);
        r = step_done(st);
        if (r < 0)
                return r;

        r = query_int(db, "SELECT count(*) FROM c2d_feedback_records", NULL, 0, &n);
        if (r < 0)
                return r;
        while (n >= HUB_QUEUE_FEEDBACK_BATCH_MAX) {
                r = feedback_batch(db, op);
                if (r <= 0)
                        return r;
                n -= HUB_QUEUE_FEEDBACK_BATCH_MAX;
        }
        return 0;
}

/* Removes a message, with the feedback its ack asks for. */
static int remove_message(sqlite3 *db, struct op *op, int64_t id, const char *device_id, const char *message_id,
                          int ack, enum hub_feedback_status status) {
        int r = add_feedback(db, op, device_id, NULL, message_id, ack, status);
        if (r < 0)
                return r;
        return exec1(db, "DELETE FROM c2d_messages WHERE id = ?2", NULL, id);
}

/* Dead-letters (Expired) every message with expiry <= now, of one device or (NULL) of all.
 * c2d_count of the devices concerned is updated. Returns the number expired. */
static int expire_messages(sqlite3 *db, struct op *op, const char *device_id) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r, rc, n = 0;

        if (device_id)
                r = prep(db,
                         "SELECT id, device_id, message_id, ack FROM c2d_messages "
                         "WHERE device_id = ?1 AND expiry <= ?2 ORDER BY seq",
                         &st);
        else
                r = prep(db,
                         "SELECT id, device_id, message_id, ack FROM c2d_messages WHERE expiry <= ?2 "
                         "ORDER BY device_id, seq",
                         &st);
        if (r < 0)
                return r;
        if (device_id)
                sqlite3_bind_text(st, 1, device_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, t64(op->now));

        /* Collect first: deleting while stepping the same table is avoided. */
        struct row {
                int64_t id;
                char *dev, *mid;
                int ack;
        } *rows = NULL;
        size_t nrows = 0, cap = 0;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                if (nrows == cap) {
                        size_t nc = cap ? cap * 2 : 16;
                        struct row *nr = realloc(rows, nc * sizeof *rows);
                        if (!nr) {
                                r = -ENOMEM;
                                goto out;
                        }
                        rows = nr;
                        cap = nc;
                }
                const char *dev = (const char *) sqlite3_column_text(st, 1);
                const char *mid = (const char *) sqlite3_column_text(st, 2);
                rows[nrows] = (struct row) {
                        .id = sqlite3_column_int64(st, 0),
                        .dev = strdup(dev ? dev : ""),
                        .mid = mid ? strdup(mid) : NULL,
                        .ack = sqlite3_column_int(st, 3),
                };
                nrows++;
                if (!rows[nrows - 1].dev || (mid && !rows[nrows - 1].mid)) {
                        r = -ENOMEM;
                        goto out;
                }
        }
        if (rc != SQLITE_DONE) {
                r = hub_store_errno(rc);
                goto out;
        }
        sqlite3_finalize(st);
        st = NULL;

        r = 0;
        for (size_t i = 0; i < nrows; i++) {
                r = remove_message(db, op, rows[i].id, rows[i].dev, rows[i].mid, rows[i].ack, HUB_FEEDBACK_EXPIRED);
                if (r < 0)
                        goto out;
                if (i + 1 == nrows || !streq(rows[i].dev, rows[i + 1].dev)) {
                        r = update_count(db, rows[i].dev);
                        if (r < 0)
                                goto out;
                }
                n++;
        }
        r = n;
out:
        for (size_t i = 0; i < nrows; i++) {
                free(rows[i].dev);
                free(rows[i].mid);
        }
        free(rows);
        return r;
}

/* ---- send ------------------------------------------------------------------------------------ */

static int write_send(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        char gen[24];
        int64_t depth = 0, seq = 0;
        int r;

        r = device_generation(db, op->device_id, gen);
        if (r < 0)
                return r;
        r = expire_messages(db, op, op->device_id);
        if (r < 0)
                return r;
        r = query_int(db, "SELECT count(*) FROM c2d_messages WHERE device_id = ?1", op->device_id, 0, &depth);
        if (r < 0)
                return r;
        if (depth >= (int64_t) op->opts.max_depth)
                return -ENOBUFS;

        r = exec1(db,
                  "INSERT INTO c2d_sequence (device_id, last_seq) VALUES (?1, ?2) "
                  "ON CONFLICT (device_id) DO UPDATE SET last_seq = last_seq + 1",
                  op->device_id, 1);
        if (r < 0)
                return r;
        r = query_int(db, "SELECT last_seq FROM c2d_sequence WHERE device_id = ?1", op->device_id, 0, &seq);
        if (r < 0)
                return r;
        if (r == 0)
                return -EIO;

        r = prep(db,
                 "INSERT INTO c2d_messages (device_id, seq, message_id, ack, enqueued, expiry, body) "
                 "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                 &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, op->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, seq);
        if (op->message_id)
                sqlite3_bind_text(st, 3, op->message_id, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 4, op->ack);
        sqlite3_bind_int64(st, 5, t64(op->now));
        sqlite3_bind_int64(st, 6, t64(op->expiry));
        sqlite3_bind_blob(st, 7, op->buf, (int) op->len, SQLITE_STATIC);
        r = step_done(st);
        if (r < 0)
                return r;
        r = update_count(db, op->device_id);
        if (r < 0)
                return r;
        if (op->expiry > op->now) {
                r = note_added(op, op->device_id, 1);
                if (r < 0)
                        return r;
        }
        r = resolve_added(db, op);
        if (r < 0)
                return r;
        r = resolve_fb_added(db, op);
        if (r < 0)
                return r;
        op->count = (uint64_t) seq;
        return 0;
}

int hub_queue_send(struct hub_queue *q, const char *device_id, const struct hub_msg *msg, uint64_t now,
                   hub_queue_send_done_fn done, void *userdata) {
        struct op *op = NULL;
        enum hub_queue_ack ack;
        uint64_t expiry, limit;
        const char *s;
        int r;

        if (!q || !device_id || !msg)
                return -EINVAL;
        if (hub_msg_size(msg) > HUB_MSG_C2D_MAX_SIZE)
                return -E2BIG;
        r = hub_queue_ack_from_string(hub_msg_get_sys(msg, HUB_SYS_ACK), &ack);
        if (r < 0)
                return r;
        limit = add_sat(now, q->opts.max_ttl_usec);
        s = hub_msg_get_sys(msg, HUB_SYS_EXPIRY_TIME);
        if (s) {
                r = hub_time_parse_iso8601(s, &expiry);
                if (r < 0)
                        return -EINVAL;
                expiry = MIN(expiry, limit);
        } else
                expiry = MIN(add_sat(now, q->opts.default_ttl_usec), limit);

        r = op_new(q, OP_SEND, device_id, now, &op);
        if (r < 0)
                return r;
        op->ack = (int) ack;
        op->expiry = expiry;
        s = hub_msg_get_sys(msg, HUB_SYS_MESSAGE_ID);
        if (s && !(op->message_id = strdup(s))) {
                op_free(op);
                return -ENOMEM;
        }
        r = hub_msg_serialize(msg, &op->buf, &op->len);
        if (r < 0) {
                op_free(op);
                return r;
        }
        op->done.send = done;
        op->userdata = userdata;
        return op_submit(q, op, write_send);
}

/* ---- receive ------------------------------------------------------------------------------- */

/* Builds the delivered message from its stored form, stamped for the receiver. */
static int delivery_msg(const void *blob, size_t len, const char *device_id, uint64_t enqueued, uint64_t expiry,
                        int ack, struct hub_msg **ret) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        char t[32], to[HUB_DEVICE_ID_MAX + 64];
        int r;

        /* Stored messages were at most 64 KB; the stamps may add a little. */
        r = hub_msg_deserialize(blob, len, HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0)
                return r;
        if ((r = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, hub_time_format_iso8601(enqueued, t))) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_EXPIRY_TIME, hub_time_format_iso8601(expiry, t))) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_ACK, ack_names[ack & 3])) < 0)
                return r;
        if (device_id && !hub_msg_get_sys(m, HUB_SYS_TO)) {
                snprintf(to, sizeof to, "/devices/%s/messages/deviceBound", device_id);
                r = hub_msg_set_sys(m, HUB_SYS_TO, to);
                if (r < 0)
                        return r;
        }
        *ret = TAKE_PTR(m);
        return 0;
}

static int write_receive(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        char gen[24];
        int r, rc;

        r = device_generation(db, op->device_id, gen);
        if (r < 0)
                return r;
        r = expire_messages(db, op, op->device_id);
        if (r < 0)
                return r;

        for (;;) {
                _cleanup_stmt_ sqlite3_stmt *st = NULL;
                r = prep(db,
                         "SELECT id, seq, message_id, ack, enqueued, expiry, delivery_count, body FROM c2d_messages "
                         "WHERE device_id = ?1 AND lock_token IS NULL AND expiry > ?2 ORDER BY seq LIMIT 1",
                         &st);
                if (r < 0)
                        return r;
                sqlite3_bind_text(st, 1, op->device_id, -1, SQLITE_STATIC);
                sqlite3_bind_int64(st, 2, t64(op->now));
                rc = sqlite3_step(st);
                if (rc == SQLITE_DONE)
                        break;
                if (rc != SQLITE_ROW)
                        return hub_store_errno(rc);

                int64_t id = sqlite3_column_int64(st, 0);
                int ack = sqlite3_column_int(st, 3);
                uint64_t enq = (uint64_t) sqlite3_column_int64(st, 4), exp = (uint64_t) sqlite3_column_int64(st, 5);
                r = delivery_msg(sqlite3_column_blob(st, 7), (size_t) sqlite3_column_bytes(st, 7), op->device_id, enq,
                                 exp, ack, &op->msg);
                if (r == -EBADMSG) {
                        /* A damaged row can never be delivered: drop it (feedback as expired
                         * would lie; say it was not delivered) and take the next. */
                        hub_log_debug(op->log, "c2d: dropping undecodable message %" PRId64 " of %s", id,
                                      op->device_id);
                        char *mid = sqlite3_column_text(st, 2) ? strdup((const char *) sqlite3_column_text(st, 2))
                                                               : NULL;
                        sqlite3_finalize(st);
                        st = NULL;
                        r = remove_message(db, op, id, op->device_id, mid, ack, HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED);
                        free(mid);
                        if (r < 0)
                                return r;
                        continue;
                }
                if (r < 0)
                        return r;

                op->d = (struct hub_queue_delivery) {
                        .msg = op->msg,
                        .device_id = op->device_id,
                        .lock_token = op->new_token,
                        .sequence_number = (uint64_t) sqlite3_column_int64(st, 1),
                        .delivery_count = (uint32_t) sqlite3_column_int(st, 6),
                        .enqueued_usec = enq,
                        .expiry_usec = exp,
                        .lock_until_usec = add_sat(op->now, op->lock_timeout),
                };
                sqlite3_finalize(st);
                st = NULL;
                r = set_lock(db, "UPDATE c2d_messages SET lock_token = ?1, lock_until = ?2 WHERE id = ?3",
                             op->new_token, op->d.lock_until_usec, id);
                if (r < 0)
                        return r;
                op->have_delivery = true;
                break;
        }
        r = update_count(db, op->device_id);
        if (r < 0)
                return r;
        return resolve_fb_added(db, op);
}

/* Queues a receive op of @kind (@device_id NULL for the feedback queue) with a fresh lock token;
 * the lock lasts @lock_timeout_usec clamped, @dflt_lock_usec when 0. */
static int receive_submit(struct hub_queue *q, enum op_kind kind, const char *device_id, uint64_t lock_timeout_usec,
                          uint64_t dflt_lock_usec, uint64_t now, hub_store_write_fn fn, hub_queue_receive_done_fn done,
                          void *userdata) {
        struct op *op;
        int r;

        r = op_new(q, kind, device_id, now, &op);
        if (r < 0)
                return r;
        op->lock_timeout = clamp_lock(lock_timeout_usec, dflt_lock_usec);
        r = lock_token_new(op->new_token);
        if (r < 0) {
                op_free(op);
                return r;
        }
        op->done.receive = done;
        op->userdata = userdata;
        return op_submit(q, op, fn);
}

int hub_queue_receive(struct hub_queue *q, const char *device_id, uint64_t lock_timeout_usec, uint64_t now,
                      hub_queue_receive_done_fn done, void *userdata) {
        if (!q || !device_id)
                return -EINVAL;
        return receive_submit(q, OP_RECEIVE, device_id, lock_timeout_usec, q->opts.lock_timeout_usec, now,
                              write_receive, done, userdata);
}

/* ---- settlement ------------------------------------------------------------------------------ */

static int write_settle(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        _cleanup_free_ char *mid = NULL;
        int r, ack, result = 0;

        r = find_locked(db,
                        "SELECT id, device_id, message_id, ack, expiry, lock_until, delivery_count FROM c2d_messages "
                        "WHERE lock_token = ?1",
                        op->lock_token_in, &st);
        if (r < 0)
                return r;
        const char *dev = (const char *) sqlite3_column_text(st, 1);
        if (!dev || !streq(dev, op->device_id))
                return -ENOLCK;
        int64_t id = sqlite3_column_int64(st, 0);
        ack = sqlite3_column_int(st, 3);
        uint64_t expiry = (uint64_t) sqlite3_column_int64(st, 4);
        uint64_t lock_until = (uint64_t) sqlite3_column_int64(st, 5);
        uint32_t dc = (uint32_t) sqlite3_column_int(st, 6);
        if (sqlite3_column_text(st, 2) && !(mid = strdup((const char *) sqlite3_column_text(st, 2))))
                return -ENOMEM;
        sqlite3_finalize(st);
        st = NULL;
        if (lock_until <= op->now || expiry <= op->now)
                return -ESTALE;

        switch (op->kind) {
        case OP_COMPLETE:
                r = remove_message(db, op, id, op->device_id, mid, ack, HUB_FEEDBACK_SUCCESS);
                break;
        case OP_REJECT:
                r = remove_message(db, op, id, op->device_id, mid, ack, HUB_FEEDBACK_REJECTED);
                break;
        case OP_ABANDON:
                dc++;
                if (dc >= op->opts.max_delivery_count) {
                        r = remove_message(db, op, id, op->device_id, mid, ack, HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED);
                        result = 1;
                } else {
                        r = exec1(db,
                                  "UPDATE c2d_messages SET lock_token = NULL, lock_until = NULL, "
                                  "delivery_count = delivery_count + 1 WHERE id = ?2",
                                  NULL, id);
                        if (r >= 0)
                                r = note_added(op, op->device_id, 1);
                }
                break;
        default:
                return -EINVAL;
        }
        if (r < 0)
                return r;
        r = update_count(db, op->device_id);
        if (r < 0)
                return r;
        r = resolve_added(db, op);
        if (r < 0)
                return r;
        r = resolve_fb_added(db, op);
        if (r < 0)
                return r;
        return result;
}

/* Queues a settlement op of @kind for @lock_token (@device_id NULL for the feedback queue). */
static int settle_submit(struct hub_queue *q, enum op_kind kind, const char *device_id, const char *lock_token,
                         uint64_t now, hub_store_write_fn fn, hub_queue_done_fn done, void *userdata) {
        struct op *op;
        int r;

        r = op_new(q, kind, device_id, now, &op);
        if (r < 0)
                return r;
        op->lock_token_in = strdup(lock_token);
        if (!op->lock_token_in) {
                op_free(op);
                return -ENOMEM;
        }
        op->done.plain = done;
        op->userdata = userdata;
        return op_submit(q, op, fn);
}

static int settle(struct hub_queue *q, enum op_kind kind, const char *device_id, const char *lock_token, uint64_t now,
                  hub_queue_done_fn done, void *userdata) {
        if (!q || !device_id || !lock_token)
                return -EINVAL;
        return settle_submit(q, kind, device_id, lock_token, now, write_settle, done, userdata);
}

int hub_queue_complete(struct hub_queue *q, const char *device_id, const char *lock_token, uint64_t now,
                       hub_queue_done_fn done, void *userdata) {
        return settle(q, OP_COMPLETE, device_id, lock_token, now, done, userdata);
}

int hub_queue_reject(struct hub_queue *q, const char *device_id, const char *lock_token, uint64_t now,
                     hub_queue_done_fn done, void *userdata) {
        return settle(q, OP_REJECT, device_id, lock_token, now, done, userdata);
}

int hub_queue_abandon(struct hub_queue *q, const char *device_id, const char *lock_token, uint64_t now,
                      hub_queue_done_fn done, void *userdata) {
        return settle(q, OP_ABANDON, device_id, lock_token, now, done, userdata);
}

static int write_release(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        int64_t live = 0;
        int r;

        r = query_int(db,
                      "SELECT count(*) FROM c2d_messages WHERE device_id = ?1 AND lock_token IS NOT NULL "
                      "AND expiry > ?2",
                      op->device_id, t64(op->now), &live);
        if (r < 0)
                return r;
        r = exec1(db,
                  "UPDATE c2d_messages SET lock_token = NULL, lock_until = NULL "
                  "WHERE device_id = ?1 AND lock_token IS NOT NULL",
                  op->device_id, 0);
        if (r < 0)
                return r;
        int changes = sqlite3_changes(db);
        r = note_added(op, op->device_id, (uint64_t) live);
        if (r < 0)
                return r;
        r = resolve_added(db, op);
        if (r < 0)
                return r;
        return changes;
}

int hub_queue_release_device(struct hub_queue *q, const char *device_id, uint64_t now, hub_queue_done_fn done,
                             void *userdata) {
        struct op *op;
        int r;

        if (!q || !device_id)
                return -EINVAL;
        r = op_new(q, OP_RELEASE, device_id, now, &op);
        if (r < 0)
                return r;
        op->done.plain = done;
        op->userdata = userdata;
        return op_submit(q, op, write_release);
}

/* ---- purge --------------------------------------------------------------------------------- */

static int write_purge(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        char gen[24];
        uint64_t n = 0;
        int r, rc;

        r = device_generation(db, op->device_id, gen);
        if (r < 0)
                return r;
        r = prep(db, "SELECT message_id, ack FROM c2d_messages WHERE device_id = ?1 ORDER BY seq", &st);
        if (r < 0)
                return r;
        sqlite3_bind_text(st, 1, op->device_id, -1, SQLITE_STATIC);
        /* Records go to another table: stepping this SELECT while inserting there is safe. */
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                r = add_feedback(db, op, op->device_id, gen, (const char *) sqlite3_column_text(st, 0),
                                 sqlite3_column_int(st, 1), HUB_FEEDBACK_PURGED);
                if (r < 0)
                        return r;
                n++;
        }
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        r = exec1(db, "DELETE FROM c2d_messages WHERE device_id = ?1", op->device_id, 0);
        if (r < 0)
                return r;
        r = update_count(db, op->device_id);
        if (r < 0)
                return r;
        r = resolve_fb_added(db, op);
        if (r < 0)
                return r;
        op->count = n;
        return 0;
}

int hub_queue_purge(struct hub_queue *q, const char *device_id, uint64_t now, hub_queue_count_done_fn done,
                    void *userdata) {
        struct op *op;
        int r;

        if (!q || !device_id)
                return -EINVAL;
        r = op_new(q, OP_PURGE, device_id, now, &op);
        if (r < 0)
                return r;
        op->done.count = done;
        op->userdata = userdata;
        return op_submit(q, op, write_purge);
}

/* ---- tick ---------------------------------------------------------------------------------- */

/* Returns expired locks of device messages to Enqueued (or dead-letters them at the lock
 * expiry safety limit). */
static int release_expired_locks(sqlite3 *db, struct op *op) {
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r, rc;

        r = prep(db,
                 "SELECT id, device_id, message_id, ack, lock_expiries FROM c2d_messages "
                 "WHERE lock_until <= ?2 ORDER BY device_id, seq",
                 &st);
        if (r < 0)
                return r;
        sqlite3_bind_int64(st, 2, t64(op->now));
        /* Every row found is updated or deleted by id; SQLite allows changing rows of the
         * table being scanned as long as the scan does not revisit them, which the lock_until
         * condition guarantees (updated rows get lock_until NULL). To stay clear of scan
         * corner cases anyway, collect the ids first. */
        struct row {
                int64_t id;
                char *dev, *mid;
                int ack;
                uint32_t lx;
        } *rows = NULL;
        size_t n = 0, cap = 0;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                if (n == cap) {
                        size_t nc = cap ? 2 * cap : 16;
                        struct row *nr = realloc(rows, nc * sizeof *rows);
                        if (!nr) {
                                r = -ENOMEM;
                                goto out;
                        }
                        rows = nr;
                        cap = nc;
                }
                const char *dev = (const char *) sqlite3_column_text(st, 1);
                const char *mid = (const char *) sqlite3_column_text(st, 2);
                rows[n++] = (struct row) {
                        .id = sqlite3_column_int64(st, 0),
                        .dev = strdup(dev ? dev : ""),
                        .mid = mid ? strdup(mid) : NULL,
                        .ack = sqlite3_column_int(st, 3),
                        .lx = (uint32_t) sqlite3_column_int(st, 4) + 1,
                };
                if (!rows[n - 1].dev || (mid && !rows[n - 1].mid)) {
                        r = -ENOMEM;
                        goto out;
                }
        }
        if (rc != SQLITE_DONE) {
                r = hub_store_errno(rc);
                goto out;
        }
        sqlite3_finalize(st);
        st = NULL;

        r = 0;
        for (size_t i = 0; i < n; i++) {
                if (op->opts.max_lock_expiries > 0 && rows[i].lx >= op->opts.max_lock_expiries)
                        r = remove_message(db, op, rows[i].id, rows[i].dev, rows[i].mid, rows[i].ack,
                                           HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED);
                else {
                        r = exec1(db,
                                  "UPDATE c2d_messages SET lock_token = NULL, lock_until = NULL, "
                                  "lock_expiries = lock_expiries + 1 WHERE id = ?2",
                                  NULL, rows[i].id);
                        if (r >= 0)
                                r = note_added(op, rows[i].dev, 1);
                }
                if (r < 0)
                        goto out;
                if (i + 1 == n || !streq(rows[i].dev, rows[i + 1].dev)) {
                        r = update_count(db, rows[i].dev);
                        if (r < 0)
                                goto out;
                }
        }
out:
        for (size_t i = 0; i < n; i++) {
                free(rows[i].dev);
                free(rows[i].mid);
        }
        free(rows);
        return r;
}

static int write_tick(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        int64_t oldest = 0;
        int r;

        /* Expiry first: an expired message whose lock also lapsed is dead-lettered, not
         * returned to the queue. */
        r = expire_messages(db, op, NULL);
        if (r < 0)
                return r;
        r = release_expired_locks(db, op);
        if (r < 0)
                return r;

        /* Feedback queue: expired messages are dropped, lapsed locks released. */
        r = exec1(db, "DELETE FROM c2d_feedback_messages WHERE expiry <= ?2", NULL, t64(op->now));
        if (r < 0)
                return r;
        r = exec1(db,
                  "UPDATE c2d_feedback_messages SET lock_token = NULL, lock_until = NULL "
                  "WHERE lock_until <= ?2",
                  NULL, t64(op->now));
        if (r < 0)
                return r;
        op->fb_added += (uint64_t) sqlite3_changes(db);

        /* Batches whose first record has waited long enough. */
        for (;;) {
                r = query_int(db, "SELECT min(time) FROM c2d_feedback_records", NULL, 0, &oldest);
                if (r < 0)
                        return r;
                if (r == 0 || add_sat((uint64_t) oldest, HUB_QUEUE_FEEDBACK_BATCH_USEC) > op->now)
                        break;
                r = feedback_batch(db, op);
                if (r < 0)
                        return r;
                if (r == 0)
                        break;
        }

        r = resolve_added(db, op);
        if (r < 0)
                return r;
        r = resolve_fb_added(db, op);
        if (r < 0)
                return r;
        return 0;
}

int hub_queue_tick(struct hub_queue *q, uint64_t now, hub_queue_done_fn done, void *userdata) {
        struct op *op;
        int r;

        if (!q)
                return -EINVAL;
        r = op_new(q, OP_TICK, NULL, now, &op);
        if (r < 0)
                return r;
        op->done.plain = done;
        op->userdata = userdata;
        return op_submit(q, op, write_tick);
}

/* ---- feedback queue ---------------------------------------------------------------------- */

static int write_fb_receive(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        char t[32];
        int r, rc;

        r = prep(db,
                 "SELECT seq, message_id, enqueued, expiry, delivery_count, body FROM c2d_feedback_messages "
                 "WHERE lock_token IS NULL AND expiry > ?1 ORDER BY seq LIMIT 1",
                 &st);
        if (r < 0)
                return r;
        sqlite3_bind_int64(st, 1, t64(op->now));
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                return 0;
        if (rc != SQLITE_ROW)
                return hub_store_errno(rc);

        int64_t seq = sqlite3_column_int64(st, 0);
        uint64_t enq = (uint64_t) sqlite3_column_int64(st, 2), exp = (uint64_t) sqlite3_column_int64(st, 3);
        r = hub_msg_new(sqlite3_column_text(st, 5), (size_t) sqlite3_column_bytes(st, 5), HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0)
                return r;
        if ((r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, (const char *) sqlite3_column_text(st, 1))) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, HUB_QUEUE_FEEDBACK_CONTENT_TYPE)) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, hub_time_format_iso8601(enq, t))) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_EXPIRY_TIME, hub_time_format_iso8601(exp, t))) < 0)
                return r;
        op->d = (struct hub_queue_delivery) {
                .lock_token = op->new_token,
                .sequence_number = (uint64_t) seq,
                .delivery_count = (uint32_t) sqlite3_column_int(st, 4),
                .enqueued_usec = enq,
                .expiry_usec = exp,
                .lock_until_usec = add_sat(op->now, op->lock_timeout),
        };
        sqlite3_finalize(st);
        st = NULL;

        r = set_lock(db, "UPDATE c2d_feedback_messages SET lock_token = ?1, lock_until = ?2 WHERE seq = ?3",
                     op->new_token, op->d.lock_until_usec, seq);
        if (r < 0)
                return r;
        op->msg = TAKE_PTR(m);
        op->d.msg = op->msg;
        op->have_delivery = true;
        return 0;
}

int hub_queue_feedback_receive(struct hub_queue *q, uint64_t lock_timeout_usec, uint64_t now,
                               hub_queue_receive_done_fn done, void *userdata) {
        if (!q)
                return -EINVAL;
        return receive_submit(q, OP_FB_RECEIVE, NULL, lock_timeout_usec, q->opts.feedback_lock_timeout_usec, now,
                              write_fb_receive, done, userdata);
}

static int write_fb_settle(struct hub_store_txn *txn, void *userdata) {
        struct op *op = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_stmt_ sqlite3_stmt *st = NULL;
        int r, result = 0;

        r = find_locked(db, "SELECT seq, expiry, lock_until, delivery_count FROM c2d_feedback_messages WHERE lock_token = ?1",
                        op->lock_token_in, &st);
        if (r < 0)
                return r;
        int64_t seq = sqlite3_column_int64(st, 0);
        uint64_t expiry = (uint64_t) sqlite3_column_int64(st, 1);
        uint64_t lock_until = (uint64_t) sqlite3_column_int64(st, 2);
        uint32_t dc = (uint32_t) sqlite3_column_int(st, 3);
        sqlite3_finalize(st);
        st = NULL;
        if (lock_until <= op->now || expiry <= op->now)
                return -ESTALE;

        if (op->kind == OP_FB_ABANDON && dc + 1 < op->opts.feedback_max_delivery_count) {
                r = exec1(db,
                          "UPDATE c2d_feedback_messages SET lock_token = NULL, lock_until = NULL, "
                          "delivery_count = delivery_count + 1 WHERE seq = ?2",
                          NULL, seq);
                op->fb_added++;
        } else {
                if (op->kind == OP_FB_ABANDON)
                        result = 1;
                r = exec1(db, "DELETE FROM c2d_feedback_messages WHERE seq = ?2", NULL, seq);
        }
        if (r < 0)
                return r;
        r = resolve_fb_added(db, op);
        if (r < 0)
                return r;
        return result;
}

static int fb_settle(struct hub_queue *q, enum op_kind kind, const char *lock_token, uint64_t now,
                     hub_queue_done_fn done, void *userdata) {
        if (!q || !lock_token)
                return -EINVAL;
        return settle_submit(q, kind, NULL, lock_token, now, write_fb_settle, done, userdata);
}

int hub_queue_feedback_complete(struct hub_queue *q, const char *lock_token, uint64_t now, hub_queue_done_fn done,
                                void *userdata) {
        return fb_settle(q, OP_FB_COMPLETE, lock_token, now, done, userdata);
}

int hub_queue_feedback_abandon(struct hub_queue *q, const char *lock_token, uint64_t now, hub_queue_done_fn done,
                               void *userdata) {
        return fb_settle(q, OP_FB_ABANDON, lock_token, now, done, userdata);
}

int hub_queue_feedback_reject(struct hub_queue *q, const char *lock_token, uint64_t now, hub_queue_done_fn done,
                              void *userdata) {
        return fb_settle(q, OP_FB_REJECT, lock_token, now, done, userdata);
}

/* ---- reads (owner's thread) ------------------------------------------------------------------ */

int hub_queue_depth(struct hub_queue *q, const char *device_id, uint64_t *ret) {
        int64_t n = 0;
        int r;

        if (!q || !device_id || !ret)
                return -EINVAL;
        r = query_int(hub_store_read_db(q->store),
                      "SELECT (SELECT count(*) FROM c2d_messages WHERE device_id = ?1) FROM devices "
                      "WHERE device_id = ?1",
                      device_id, 0, &n);
        if (r < 0)
                return r;
        if (r == 0)
                return -ENOENT;
        *ret = (uint64_t) n;
        return 0;
}

int hub_queue_feedback_depth(struct hub_queue *q, uint64_t *ret_messages, uint64_t *ret_pending_records) {
        sqlite3 *db;
        int64_t m = 0, p = 0;
        int r;

        if (!q)
                return -EINVAL;
        db = hub_store_read_db(q->store);
        r = query_int(db, "SELECT count(*) FROM c2d_feedback_messages", NULL, 0, &m);
        if (r < 0)
                return r;
        r = query_int(db, "SELECT count(*) FROM c2d_feedback_records", NULL, 0, &p);
        if (r < 0)
                return r;
        if (ret_messages)
                *ret_messages = (uint64_t) m;
        if (ret_pending_records)
                *ret_pending_records = (uint64_t) p;
        return 0;
}

int hub_queue_next_deadline(struct hub_queue *q, uint64_t *ret_usec) {
        int64_t t = 0;
        int r;

        if (!q || !ret_usec)
                return -EINVAL;
        sqlite3 *db = hub_store_read_db(q->store);
        if (q->deadline_valid && q->deadline_db == db) {
                if (q->deadline_r > 0)
                        *ret_usec = q->deadline_usec;
                return q->deadline_r;
        }
        if (!q->deadline_st || q->deadline_db != db) {
                (void) sqlite3_finalize(q->deadline_st);
                q->deadline_st = NULL;
                q->deadline_db = NULL;
                r = prep(db,
                         "SELECT min(x) FROM ("
                         " SELECT min(lock_until) AS x FROM c2d_messages WHERE lock_until IS NOT NULL"
                         " UNION ALL SELECT min(expiry) FROM c2d_messages"
                         " UNION ALL SELECT min(time) + ?1 FROM c2d_feedback_records"
                         " UNION ALL SELECT min(lock_until) FROM c2d_feedback_messages WHERE lock_until IS NOT NULL"
                         " UNION ALL SELECT min(expiry) FROM c2d_feedback_messages)",
                         &q->deadline_st);
                if (r < 0)
                        return r;
                q->deadline_db = db;
                sqlite3_bind_int64(q->deadline_st, 1, (int64_t) HUB_QUEUE_FEEDBACK_BATCH_USEC);
        }
        int rc = sqlite3_step(q->deadline_st);
        if (rc == SQLITE_ROW && sqlite3_column_type(q->deadline_st, 0) != SQLITE_NULL) {
                t = sqlite3_column_int64(q->deadline_st, 0);
                r = 1;
        } else
                r = rc == SQLITE_ROW || rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
        (void) sqlite3_reset(q->deadline_st); /* ends the read transaction; the binding stays */
        if (r < 0)
                return r;
        q->deadline_valid = true;
        q->deadline_r = r;
        q->deadline_usec = t < 0 ? 0 : (uint64_t) t;
        if (r > 0)
                *ret_usec = q->deadline_usec;
        return r;
}
