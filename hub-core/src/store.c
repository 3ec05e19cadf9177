/* SPDX-License-Identifier: MIT */
/* The durable store: SQLite (WAL, synchronous=FULL) with grouped commits.
 *
 * Why a commit thread: with synchronous=FULL every commit costs an fsync (milliseconds on
 * real storage). Writers (MQTT PUBACKs waiting for durability, C2D queue changes, ...) must
 * not each pay one, and the event loop must never wait for one. So the owner's thread only
 * queues write functions; one commit thread takes everything queued since its last commit
 * (the whole list, swapped under the mutex), runs it in one transaction with a SAVEPOINT per
 * write (except writes atomic by themselves, HUB_STORE_WRITE_SINGLE), commits, hands the
 * completions back, has the WAL checkpointed when it has grown past its threshold (never
 * inside a commit, and mostly on a thread of its own: see "WAL checkpoints" below), and
 * takes whatever arrived meanwhile. Under light load each write commits alone with the least
 * latency, under heavy load batches grow by themselves to the number of writes that arrive
 * during one fsync. Between the two, a steady stream would commit a handful of writes per
 * fsync, thousands of times a second, and each commit costs the same fsync, WAL frames of the
 * same partly filled pages and two thread wake-ups whatever it holds: so a group starts no
 * sooner than group_interval after the previous one started (see group_pace()). A write
 * that arrives after a quiet spell still commits at once, a blocking
 * hub_store_submit_wait() is never held back, and a group that takes longer than the
 * interval (high load) is followed at once, as before.
 *
 * Completions travel back through a "done" list and an eventfd, so the event loop runs
 * them on its own thread from hub_store_dispatch(). hub_store_submit_wait() is the blocking
 * exception for rare operations; it waits on a condition variable of its own.
 *
 * Connections: the writer connection is used by the opening thread until the commit thread
 * starts, then only by the commit thread, then again by the closing thread after the join.
 * The checkpoint connection belongs to the checkpointer thread (see below). The read-only
 * connection belongs to the owner's thread. All are opened NOMUTEX. */

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/store.h"
#include "store-internal.h"
#include "store-schema.h"

#define STORE_BUSY_TIMEOUT_MS 5000
#define STORE_DEFAULT_STALL_USEC (10 * USEC_PER_SEC)
#define STORE_PROGRESS_OPS 100
/* The WAL is checkpointed (copied into the database, then started over) once it holds this
 * much. Small on purpose: a checkpoint ends with an fsync of the database file, and every
 * commit's WAL fsync issued meanwhile waits behind that write-back (the device's cache flush
 * covers it all). With 32 MiB rounds each of them held the commits for 10-20 ms (p99 append
 * -> completion 12.6 ms at 80k msg/s); with 2 MiB rounds 3.0 ms, at the same CPU per message
 * (store-ingest -r 80000 -g 1000, tests/bench/README.md). */
#define STORE_CKPT_MAX_BYTES (2ull * 1024 * 1024)
/* The largest tail the commit thread copies itself between two groups (see
 * wal_checkpoint_step()): 256 pages, about a millisecond of copying and a small fsync. */
#define STORE_CKPT_TAIL_FRAMES 256u

struct store_waiter {
        pthread_cond_t cond;
        bool done;
        int result;
};

struct store_write {
        struct store_write *next;
        hub_store_write_fn fn;
        hub_store_done_fn done;
        void *userdata;
        int result;
        unsigned flags;              /* HUB_STORE_WRITE_* */
        struct store_waiter *waiter; /* set by hub_store_submit_wait() */
};

struct hub_store_txn {
        struct hub_store *store;
        sqlite3 *db;
};

enum wstmt {
        WSTMT_BEGIN,
        WSTMT_COMMIT,
        WSTMT_ROLLBACK,
        WSTMT_SAVEPOINT,
        WSTMT_RELEASE,
        WSTMT_ROLLBACK_TO,
        _WSTMT_MAX,
};

struct hub_store {
        char *dir;
        char *path;
        const struct hub_clock *clock;
        const struct hub_log *log;
        uint64_t stall_timeout;
        uint64_t group_interval; /* see group_pace() (0 = none) */
        uint64_t group_last;     /* CLOCK_MONOTONIC usec when the last group started (commit thread) */
        uint64_t max_size;      /* the disk budget (0 = none) */
        uint64_t wal_truncate;  /* WAL size above which an idle store truncates it */
        char *wal_path;
        char *reserve_path;     /* see disk_full() */
        bool frozen;            /* commit thread: reserve released, database frozen at its size */
        uint64_t page_size, max_pages, autocheckpoint; /* the limits to restore after a thaw */
        /* WAL checkpoints: see wal_checkpoint_step(). Commit thread only: */
        uint64_t ckpt_frames; /* threshold: autocheckpoint, or a small value while frozen */
        uint64_t ckpt_hard;   /* the WAL's bound in frames: see wal_checkpoint_step() */
        uint64_t wal_frames;  /* the WAL's size in frames after the last commit (WAL hook) */
        uint64_t wal_last;    /* the same, never reset by a checkpoint */
        uint64_t wal_epoch;   /* counts the WAL's restarts (from its first frame) */
        uint64_t wal_group;   /* frames the last commit added */
        bool unclean;
        bool opened; /* fully opened: close records a clean shutdown */

        int lock_fd;  /* flock()ed <dir>/fieldhub.lock: one process per store */
        /* The transaction-control statements of the commit thread, prepared once: parsing
         * them for every write cost more than the writes' own SQL. */
        sqlite3_stmt *wstmt[_WSTMT_MAX];
        /* Statements of write functions (hub_store_txn_prepare), commit thread only. */
        struct {
                const char *sql;
                sqlite3_stmt *st;
        } txn_cache[HUB_STORE_TXN_CACHE];
        size_t n_txn_cache;
        sqlite3 *wdb; /* writer: commit thread */
        sqlite3 *rdb; /* reader: owner's thread */
        sqlite3 *cdb; /* checkpoints: checkpointer thread */
        int efd;

        pthread_t thread;
        bool thread_started;
        pthread_t ckpt_thread;
        bool ckpt_thread_started;
        bool lock_initialized;

        pthread_mutex_t lock;
        pthread_cond_t cond;
        /* Everything below is protected by lock. */
        struct store_write *queue, *queue_tail;
        struct store_write *done, *done_tail;
        bool stopping;
        bool thread_exited;
        bool dirty; /* committed since the last idle WAL truncation */
        bool pacing; /* the commit thread waits out group_interval: no signal per enqueue */
        bool urgent; /* a hub_store_submit_wait() is queued: no pacing */
        uint64_t commit_started; /* monotonic usec, 0 = no commit running */
        /* The checkpointer thread's request and result (see wal_checkpoint_step()). */
        pthread_cond_t ckpt_cond;
        bool ckpt_pending;         /* requested or running */
        bool ckpt_stopping;
        uint64_t ckpt_req_epoch;   /* wal_epoch when requested */
        bool ckpt_res_valid;       /* the last one succeeded in epoch ckpt_res_epoch ... */
        uint64_t ckpt_res_epoch;
        uint64_t ckpt_res_frames;  /* ... and the WAL's first this many frames are in the database */
        struct hub_store_stats stats;
};

int hub_store_errno(int sqlite_rc) {
        switch (sqlite_rc & 0xff) {
        case SQLITE_OK:
        case SQLITE_ROW:
        case SQLITE_DONE:
                return 0;
        case SQLITE_FULL:
                return -ENOSPC;
        case SQLITE_CONSTRAINT:
                return -EEXIST;
        case SQLITE_CORRUPT:
        case SQLITE_NOTADB:
                return -EBADMSG;
        case SQLITE_BUSY:
        case SQLITE_LOCKED:
                return -EBUSY;
        case SQLITE_NOMEM:
                return -ENOMEM;
        case SQLITE_PERM:
                return -EPERM;
        case SQLITE_AUTH:
                return -EACCES;
        case SQLITE_READONLY:
                return -EROFS;
        case SQLITE_TOOBIG:
                return -E2BIG;
        case SQLITE_MISUSE:
        case SQLITE_RANGE:
                return -EINVAL;
        default:
                return -EIO;
        }
}

/* Like hub_store_errno(), but prefers the OS error behind an I/O or open failure. */
static int db_errno(sqlite3 *db, int rc) {
        int prim = rc & 0xff;

        if (db && (prim == SQLITE_IOERR || prim == SQLITE_CANTOPEN)) {
                int e = sqlite3_system_errno(db);
                if (e > 0)
                        return -e;
        }
        return hub_store_errno(rc);
}

sqlite3 *hub_store_txn_db(struct hub_store_txn *txn) {
        return txn ? txn->db : NULL;
}

sqlite3 *hub_store_read_db(struct hub_store *s) {
        return s ? s->rdb : NULL;
}

const struct hub_log *hub_store_log(struct hub_store *s) {
        return s ? s->log : NULL;
}

const struct hub_clock *hub_store_clock(struct hub_store *s) {
        return s ? s->clock : NULL;
}

const char *hub_store_path(struct hub_store *s) {
        return s ? s->path : NULL;
}

bool hub_store_was_unclean(struct hub_store *s) {
        return s && s->unclean;
}

int hub_store_get_fd(struct hub_store *s) {
        return s ? s->efd : -EINVAL;
}

_printf_(2, 3) static void set_err(const struct hub_store_options *opts, const char *fmt, ...) {
        va_list ap;

        if (!opts->errbuf || opts->errbuf_size == 0)
                return;
        va_start(ap, fmt);
        vsnprintf(opts->errbuf, opts->errbuf_size, fmt, ap);
        va_end(ap);
}

static uint64_t mono_now(const struct hub_store *s) {
        uint64_t t = hub_clock_mono(s->clock);
        return t ? t : 1; /* 0 means "no commit running" */
}

/* ---- commit thread -------------------------------------------------------------------- */

static int exec(sqlite3 *db, const char *sql) {
        return sqlite3_exec(db, sql, NULL, NULL, NULL);
}

static int pragma_int(sqlite3 *db, const char *sql, int64_t *ret) {
        sqlite3_stmt *st = NULL;
        int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                *ret = sqlite3_column_int64(st, 0);
                rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE)
                rc = SQLITE_ERROR;
        sqlite3_finalize(st);
        return rc;
}

/* Runs one write under its own SAVEPOINT. Sets *ret_lost when SQLite rolled back the whole
 * transaction (it does so on some SQLITE_FULL, IOERR, NOMEM, BUSY errors): then nothing of
 * the group is left to commit. */
int hub_store_txn_prepare(struct hub_store_txn *txn, const char *sql, sqlite3_stmt **ret) {
        struct hub_store *s = txn->store;
        sqlite3_stmt *st = NULL;
        int rc;

        for (size_t i = 0; i < s->n_txn_cache; i++)
                if (s->txn_cache[i].sql == sql) {
                        st = s->txn_cache[i].st;
                        (void) sqlite3_reset(st);
                        (void) sqlite3_clear_bindings(st);
                        *ret = st;
                        return 0;
                }
        if (s->n_txn_cache >= HUB_STORE_TXN_CACHE)
                return -E2BIG;
        rc = sqlite3_prepare_v3(txn->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL);
        if (rc != SQLITE_OK)
                return hub_store_errno(rc);
        s->txn_cache[s->n_txn_cache].sql = sql;
        s->txn_cache[s->n_txn_cache].st = st;
        s->n_txn_cache++;
        *ret = st;
        return 0;
}

static int exec_w(struct hub_store *s, enum wstmt id) {
        static const char *const sql[_WSTMT_MAX] = {
                [WSTMT_BEGIN] = "BEGIN IMMEDIATE",
                [WSTMT_COMMIT] = "COMMIT",
                [WSTMT_ROLLBACK] = "ROLLBACK",
                [WSTMT_SAVEPOINT] = "SAVEPOINT hub_write",
                [WSTMT_RELEASE] = "RELEASE hub_write",
                [WSTMT_ROLLBACK_TO] = "ROLLBACK TO hub_write",
        };
        int rc;

        if (!s->wstmt[id]) {
                rc = sqlite3_prepare_v3(s->wdb, sql[id], -1, SQLITE_PREPARE_PERSISTENT, &s->wstmt[id], NULL);
                if (rc != SQLITE_OK)
                        return rc;
        }
        rc = sqlite3_step(s->wstmt[id]);
        (void) sqlite3_reset(s->wstmt[id]);
        return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static int run_one(struct hub_store *s, struct store_write *w, bool *ret_lost) {
        struct hub_store_txn txn = { .store = s, .db = s->wdb };
        int rc, r;

        *ret_lost = false;
        if (w->flags & HUB_STORE_WRITE_SINGLE) {
                /* Atomic by itself: SQLite undoes a failing statement on its own. */
                r = w->fn(&txn, w->userdata);
                if (sqlite3_get_autocommit(s->wdb)) {
                        *ret_lost = true;
                        return r < 0 ? r : -EIO;
                }
                return r;
        }
        rc = exec_w(s, WSTMT_SAVEPOINT);
        if (rc != SQLITE_OK) {
                *ret_lost = sqlite3_get_autocommit(s->wdb);
                return db_errno(s->wdb, rc);
        }

        r = w->fn(&txn, w->userdata);

        if (sqlite3_get_autocommit(s->wdb)) {
                *ret_lost = true;
                return r < 0 ? r : -EIO;
        }
        if (r >= 0) {
                rc = exec_w(s, WSTMT_RELEASE);
                if (rc == SQLITE_OK)
                        return r;
                r = db_errno(s->wdb, rc);
        }
        /* This write alone is undone; the others of the group are unaffected. */
        (void) exec_w(s, WSTMT_ROLLBACK_TO);
        (void) exec_w(s, WSTMT_RELEASE);
        if (sqlite3_get_autocommit(s->wdb))
                *ret_lost = true;
        return r;
}

/* Applies a batch as one transaction; when SQLite loses the transaction midway, the writes
 * run so far fail and the rest continue in a fresh transaction. */
static void run_batch(struct hub_store *s, struct store_write *batch) {
        struct store_write *seg = batch;

        while (seg) {
                struct store_write *w, *end = NULL;
                uint64_t t0 = mono_now(s), n = 0;
                int failure = 0, rc;

                rc = exec_w(s, WSTMT_BEGIN);
                if (rc != SQLITE_OK) {
                        failure = db_errno(s->wdb, rc);
                        for (w = seg; w; w = w->next, n++)
                                w->result = failure;
                        end = NULL;
                } else {
                        for (w = seg; w; w = w->next) {
                                bool lost;

                                n++;
                                w->result = run_one(s, w, &lost);
                                if (lost) {
                                        failure = w->result < 0 ? w->result : -EIO;
                                        break;
                                }
                        }
                        end = w ? w->next : NULL;

                        if (failure == 0) {
                                rc = exec_w(s, WSTMT_COMMIT);
                                if (rc != SQLITE_OK) {
                                        failure = db_errno(s->wdb, rc);
                                        if (!sqlite3_get_autocommit(s->wdb))
                                                (void) exec_w(s, WSTMT_ROLLBACK);
                                }
                        } else if (!sqlite3_get_autocommit(s->wdb))
                                (void) exec_w(s, WSTMT_ROLLBACK);

                        if (failure < 0)
                                /* Nothing of this group is in the database: all of it fails. */
                                for (w = seg; w != end; w = w->next)
                                        w->result = failure;
                }

                uint64_t dt = mono_now(s) - t0;
                pthread_mutex_lock(&s->lock);
                if (failure < 0)
                        s->stats.failed_commits++;
                else {
                        s->stats.commits++;
                        s->stats.writes += n;
                        s->stats.last_batch = n;
                        s->stats.max_batch = MAX(s->stats.max_batch, n);
                        s->stats.last_commit_usec = dt;
                        s->stats.total_commit_usec += dt;
                }
                pthread_mutex_unlock(&s->lock);

                if (failure < 0)
                        hub_log_debug(s->log, "store: group of %llu writes failed: %s", (unsigned long long) n,
                                      strerror(-failure));
                seg = end;
        }
}

/* With synchronous=FULL and wal_autocheckpoint the WAL is reset to its start after each
 * checkpoint, but its file keeps the size of its largest transaction group (up to
 * journal_size_limit). When the store has been idle for a second and the WAL file is larger
 * than wal_truncate, a TRUNCATE checkpoint brings it back to zero bytes, so that a burst does
 * not keep its disk space. It never waits for readers (busy timeout 0 for the call): when the
 * loop's read connection is in a read transaction it is simply tried again after the next
 * commit. Commit thread only. Returns whether the WAL was truncated. */
static bool idle_checkpoint(struct hub_store *s) {
        struct stat st;
        int rc;

        if (!s->wal_path || stat(s->wal_path, &st) < 0 || (uint64_t) st.st_size <= s->wal_truncate)
                return false;
        (void) sqlite3_busy_timeout(s->wdb, 0);
        rc = exec(s->wdb, "PRAGMA wal_checkpoint(TRUNCATE)");
        (void) sqlite3_busy_timeout(s->wdb, STORE_BUSY_TIMEOUT_MS);
        if (rc == SQLITE_OK)
                s->wal_frames = 0;
        if (rc != SQLITE_OK) {
                hub_log_debug(s->log, "store: idle checkpoint: %s", sqlite3_errmsg(s->wdb));
                pthread_mutex_lock(&s->lock);
                s->dirty = true; /* try again after the next idle second */
                pthread_mutex_unlock(&s->lock);
                return false;
        }
        return true;
}

/* ---- a full disk -----------------------------------------------------------------------
 *
 * On a full file system every write fails, also the ones that would free space: moving an
 * endpoint's cursor, deleting delivered messages and checkpointing all need room in the WAL
 * (and a checkpoint may need the database file to grow into pages the WAL allocated). So the
 * store keeps a reserve: a preallocated file of STORE_RESERVE_BYTES beside the database. When
 * a write fails with ENOSPC while the file system really is full, the commit thread
 * releases the reserve and freezes the database at its current size (max_page_count = its
 * page count, a small wal_autocheckpoint): from then on only pages freed by the outbox
 * collection are reused and the WAL stays within the released room, so cursors move, rows are
 * deleted and messages are accepted again as space is freed inside the file. When the file
 * system has room again (an operator freed space: at least four reserves), the reserve is
 * recreated and the limits restored. */

#define STORE_RESERVE_BYTES (1024 * 1024)

static uint64_t fs_free(const struct hub_store *s) {
        struct statvfs v;
        if (statvfs(s->dir, &v) < 0)
                return UINT64_MAX;
        return (uint64_t) v.f_bavail * v.f_frsize;
}

static void reserve_create(struct hub_store *s) {
        int fd = open(s->reserve_path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return;
        int r = posix_fallocate(fd, 0, STORE_RESERVE_BYTES);
        if (r == 0)
                r = fsync(fd) < 0 ? errno : 0;
        close(fd);
        if (r != 0) {
                (void) unlink(s->reserve_path);
                hub_log_debug(s->log, "store: cannot reserve %u bytes in %s: %s", STORE_RESERVE_BYTES, s->dir,
                              strerror(r));
        }
}

static void set_limits(struct hub_store *s, uint64_t max_pages, uint64_t autocheckpoint) {
        char sql[96];
        snprintf(sql, sizeof sql, "PRAGMA max_page_count = %llu", (unsigned long long) max_pages);
        (void) exec(s->wdb, sql);
        s->ckpt_frames = autocheckpoint; /* see wal_checkpoint_step() */
}

/* Called by SQLite on the writer connection after each commit (replaces its
 * auto-checkpoint, which would run inside the COMMIT). */
static int wal_hook(void *userdata, sqlite3 *db, const char *name, int n_frames) {
        struct hub_store *s = userdata;
        uint64_t n = n_frames > 0 ? (uint64_t) n_frames : 0;
        (void) db;
        (void) name;
        if (n < s->wal_last) {
                s->wal_epoch++; /* this commit started the WAL over */
                s->wal_group = n;
        } else
                s->wal_group = n - s->wal_last;
        s->wal_last = s->wal_frames = n;
        return SQLITE_OK;
}

/* ---- WAL checkpoints ------------------------------------------------------------------
 *
 * SQLite's auto-checkpoint is off (the WAL hook replaces it): it would run inside a COMMIT.
 * A checkpoint of a WAL at its threshold copies thousands of pages and fsyncs the database
 * file (tens of milliseconds), and no group may commit meanwhile on the same connection,
 * so every PUBACK would wait for it. Instead the commit thread, between groups, asks the
 * checkpointer thread for a PASSIVE checkpoint on a connection of its own; WAL mode lets it
 * run while the commit thread goes on committing.
 *
 * Such a checkpoint copies the frames that existed when it started; the WAL only starts
 * over from its beginning (and its file is cut back to journal_size_limit) when a write
 * transaction begins with every frame copied. So when the checkpointer has copied all but a
 * small tail (at most STORE_CKPT_TAIL_FRAMES, half the threshold or what the last two groups
 * added: another round could not do better), the commit thread copies that tail itself
 * between two groups (a pause of a millisecond or two instead of a long one), and the next
 * group restarts the WAL. A larger tail gets another round on the checkpointer: each round
 * copies only what the previous ones left, so they shrink to a tail within a few rounds.
 * Should the rounds not catch up (a slow disk), the WAL still stays within its share of the
 * disk budget: at ckpt_hard frames (three quarters of the share) the commit thread waits for
 * the round in progress and finishes by itself, as before the checkpointer existed. (With
 * 2 MiB rounds, a hard bound at 1.5 times the threshold was reached whenever one database
 * fsync took longer than ~12 ms at 80 MB/s of WAL: 30 ms stalls.) While the database is
 * frozen (a full file system, see disk_full()) the WAL must stay within the released
 * reserve: the commit thread checkpoints by itself. SQLITE_BUSY
 * (the other connection is checkpointing) is normal, and a reader holding old frames only
 * makes a checkpoint partial: the rest is copied next time.
 *
 * The watchdog (hub_store_healthy()) watches commits only: a long checkpoint on either
 * thread does not make the store look stalled. The idle TRUNCATE checkpoint stays on the
 * commit thread; while the checkpointer runs it fails with SQLITE_BUSY and is retried after
 * the next idle second. */

/* A PASSIVE checkpoint on the writer connection (commit thread, between groups). It never
 * waits for readers. */
static void wal_checkpoint_inline(struct hub_store *s) {
        int rc, n_log = 0, n_ckpt = 0;

        rc = sqlite3_wal_checkpoint_v2(s->wdb, NULL, SQLITE_CHECKPOINT_PASSIVE, &n_log, &n_ckpt);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY) {
                hub_log_debug(s->log, "store: WAL checkpoint: %s", sqlite3_errmsg(s->wdb));
                return;
        }
        s->wal_frames = 0; /* until the next commit says otherwise */
        pthread_mutex_lock(&s->lock);
        s->ckpt_res_valid = false;
        s->stats.wal_checkpoints++;
        pthread_mutex_unlock(&s->lock);
}

/* Commit thread, between groups, after handing their completions back; called with s->lock
 * held, which it may drop and retake. */
static void wal_checkpoint_step(struct hub_store *s) {
        uint64_t tail = MAX(MAX(MIN(STORE_CKPT_TAIL_FRAMES, s->ckpt_frames / 2), 2 * s->wal_group), 16u);
        uint64_t hard = MAX(s->ckpt_hard, s->ckpt_frames + s->ckpt_frames / 2);

        if (s->ckpt_frames == 0 || s->wal_frames < s->ckpt_frames)
                return;
        if (!s->frozen && s->ckpt_thread_started) {
                if (s->ckpt_pending && s->wal_frames < hard)
                        return; /* the checkpointer is at it */
                /* The WAL's hard bound (its share of the disk budget): the checkpointer
                 * does not catch up (a slow disk), wait for its round and finish here. */
                while (s->ckpt_pending)
                        pthread_cond_wait(&s->ckpt_cond, &s->lock);
                if (s->wal_frames < hard && (!s->ckpt_res_valid || s->ckpt_res_epoch != s->wal_epoch ||
                                             s->wal_frames > s->ckpt_res_frames + tail)) {
                        /* (Another) round on the checkpointer. */
                        s->ckpt_pending = true;
                        s->ckpt_req_epoch = s->wal_epoch;
                        pthread_cond_broadcast(&s->ckpt_cond);
                        return;
                }
                /* Only a small tail is left: copy it here, so that the next group starts the
                 * WAL over. */
        }
        pthread_mutex_unlock(&s->lock);
        wal_checkpoint_inline(s);
        pthread_mutex_lock(&s->lock);
}

static void *checkpoint_thread(void *userdata) {
        struct hub_store *s = userdata;

        pthread_mutex_lock(&s->lock);
        for (;;) {
                int rc, n_log = 0, n_ckpt = 0;
                uint64_t epoch;

                while (!s->ckpt_pending && !s->ckpt_stopping)
                        pthread_cond_wait(&s->ckpt_cond, &s->lock);
                if (s->ckpt_stopping)
                        break;
                epoch = s->ckpt_req_epoch;
                pthread_mutex_unlock(&s->lock);

                rc = sqlite3_wal_checkpoint_v2(s->cdb, NULL, SQLITE_CHECKPOINT_PASSIVE, &n_log, &n_ckpt);
                if (rc != SQLITE_OK && rc != SQLITE_BUSY)
                        hub_log_debug(s->log, "store: WAL checkpoint: %s", sqlite3_errmsg(s->cdb));

                pthread_mutex_lock(&s->lock);
                s->ckpt_pending = false;
                s->ckpt_res_valid = rc == SQLITE_OK && n_ckpt >= 0;
                s->ckpt_res_epoch = epoch;
                s->ckpt_res_frames = n_ckpt > 0 ? (uint64_t) n_ckpt : 0;
                if (rc == SQLITE_OK || rc == SQLITE_BUSY)
                        s->stats.wal_checkpoints++;
                pthread_cond_broadcast(&s->ckpt_cond); /* see wal_checkpoint_step() */
        }
        pthread_mutex_unlock(&s->lock);
        return NULL;
}

/* Stops and joins the checkpointer thread (waits for a checkpoint in progress). */
static void checkpoint_thread_stop(struct hub_store *s) {
        if (!s->ckpt_thread_started)
                return;
        pthread_mutex_lock(&s->lock);
        s->ckpt_stopping = true;
        pthread_cond_broadcast(&s->ckpt_cond);
        pthread_mutex_unlock(&s->lock);
        (void) pthread_join(s->ckpt_thread, NULL);
        s->ckpt_thread_started = false;
}

static void disk_full(struct hub_store *s) {
        int64_t pages = 0;
        if (s->frozen || access(s->reserve_path, F_OK) < 0 || fs_free(s) >= STORE_RESERVE_BYTES)
                return; /* the budget, not the disk (or nothing left to release) */
        if (pragma_int(s->wdb, "PRAGMA page_count", &pages) != SQLITE_OK)
                return;
        (void) unlink(s->reserve_path);
        s->frozen = true;
        set_limits(s, (uint64_t) pages, MAX(STORE_RESERVE_BYTES / 4 / s->page_size, 16u));
        hub_log_debug(s->log, "store: the file system holding %s is full: released the reserve, database frozen at %lld pages",
                      s->path, (long long) pages);
}

static void disk_thaw(struct hub_store *s) {
        if (!s->frozen || fs_free(s) < 4 * STORE_RESERVE_BYTES)
                return;
        reserve_create(s);
        if (access(s->reserve_path, F_OK) < 0)
                return;
        s->frozen = false;
        set_limits(s, s->max_pages, s->autocheckpoint);
        hub_log_debug(s->log, "store: the file system holding %s has room again: reserve restored", s->path);
}

static uint64_t mono_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

/* Commit thread, s->lock held, writes queued. Waits until group_interval has passed since the
 * previous group started, unless a blocking writer is queued or the store stops; writes
 * arriving meanwhile join the group without waking this thread (enqueue() checks pacing).
 * On the real monotonic clock, not the store's (tests run it on a fake one). */
static void group_pace(struct hub_store *s) {
        if (s->group_interval == 0 || s->group_last == 0)
                return;
        uint64_t due = s->group_last + s->group_interval;
        s->pacing = true;
        for (;;) {
                uint64_t now = mono_usec();
                if (now >= due || s->urgent || s->stopping)
                        break;
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                uint64_t ns = (uint64_t) ts.tv_nsec + (due - now) * 1000;
                ts.tv_sec += (time_t) (ns / 1000000000);
                ts.tv_nsec = (long) (ns % 1000000000);
                (void) pthread_cond_timedwait(&s->cond, &s->lock, &ts);
        }
        s->pacing = false;
}

static void *commit_thread(void *userdata) {
        struct hub_store *s = userdata;

        pthread_mutex_lock(&s->lock);
        for (;;) {
                struct store_write *batch, *w, *next;
                uint64_t n = 0;
                bool notify = false;

                while (!s->queue && !s->stopping) {
                        if (!s->dirty) {
                                pthread_cond_wait(&s->cond, &s->lock);
                                continue;
                        }
                        /* Idle for a second after commits: keep the WAL small (see idle_checkpoint). */
                        struct timespec ts;
                        clock_gettime(CLOCK_REALTIME, &ts);
                        ts.tv_sec += 1;
                        if (pthread_cond_timedwait(&s->cond, &s->lock, &ts) == ETIMEDOUT && !s->queue &&
                            !s->stopping) {
                                s->dirty = false;
                                pthread_mutex_unlock(&s->lock);
                                bool truncated = idle_checkpoint(s);
                                disk_thaw(s);
                                pthread_mutex_lock(&s->lock);
                                if (truncated)
                                        s->stats.checkpoints++;
                        }
                }
                if (!s->queue)
                        break; /* stopping, and everything is drained */

                /* A group right after the previous one: let it gather for the rest of the
                 * interval. After a quiet spell (the previous group started long ago) this
                 * returns at once. */
                group_pace(s);

                /* Take everything that arrived while the previous commit ran. */
                batch = s->queue;
                s->queue = s->queue_tail = NULL;
                s->urgent = false;
                s->group_last = mono_usec();
                s->commit_started = mono_now(s);
                pthread_mutex_unlock(&s->lock);

                run_batch(s, batch);
                for (w = batch; w; w = w->next)
                        if (w->result == -ENOSPC) {
                                disk_full(s);
                                break;
                        }

                pthread_mutex_lock(&s->lock);
                s->commit_started = 0;
                s->dirty = true;
                for (w = batch; w; w = next) {
                        next = w->next;
                        w->next = NULL;
                        n++;
                        if (w->result == -ENOSPC)
                                s->stats.full_failures++;
                        if (w->waiter) {
                                w->waiter->result = w->result;
                                w->waiter->done = true;
                                pthread_cond_signal(&w->waiter->cond);
                                free(w);
                        } else if (w->done) {
                                if (s->done_tail)
                                        s->done_tail->next = w;
                                else
                                        s->done = w;
                                s->done_tail = w;
                                notify = true;
                        } else
                                free(w);
                }
                s->stats.pending -= MIN(n, s->stats.pending);
                if (notify) {
                        uint64_t one = 1;
                        /* EAGAIN only when the counter is saturated: it is readable anyway. */
                        (void) !write(s->efd, &one, sizeof one);
                }
                /* After the completions: no PUBACK waits for a checkpoint. */
                wal_checkpoint_step(s);
        }
        s->thread_exited = true;
        pthread_mutex_unlock(&s->lock);
        return NULL;
}

/* ---- submitting and dispatching ------------------------------------------------------- */

static int enqueue(struct hub_store *s, struct store_write *w) {
        /* Caller holds s->lock. */
        if (s->stopping)
                return -ESHUTDOWN;
        bool was_empty = !s->queue;
        if (s->queue_tail)
                s->queue_tail->next = w;
        else
                s->queue = w;
        s->queue_tail = w;
        s->stats.pending++;
        if (w->waiter)
                s->urgent = true;
        /* The commit thread waits for work only on an empty queue; while it paces a group,
         * only a blocking writer cuts the wait short. */
        if (w->waiter || (was_empty && !s->pacing))
                pthread_cond_signal(&s->cond);
        return 0;
}

int hub_store_submit_flags(struct hub_store *s, hub_store_write_fn fn, hub_store_done_fn done, void *userdata,
                           unsigned flags) {
        struct store_write *w;
        int r;

        if (!s || !fn || (flags & ~(unsigned) HUB_STORE_WRITE_SINGLE))
                return -EINVAL;
        w = malloc(sizeof *w);
        if (!w)
                return -ENOMEM;
        *w = (struct store_write) { .fn = fn, .done = done, .userdata = userdata, .flags = flags };

        pthread_mutex_lock(&s->lock);
        r = enqueue(s, w);
        pthread_mutex_unlock(&s->lock);
        if (r < 0)
                free(w);
        return r;
}

void hub_store_set_group_interval(struct hub_store *s, uint64_t usec) {
        if (!s)
                return;
        pthread_mutex_lock(&s->lock);
        s->group_interval = usec;
        pthread_mutex_unlock(&s->lock);
}

int hub_store_submit(struct hub_store *s, hub_store_write_fn fn, hub_store_done_fn done, void *userdata) {
        return hub_store_submit_flags(s, fn, done, userdata, 0);
}

int hub_store_submit_wait(struct hub_store *s, hub_store_write_fn fn, void *userdata) {
        struct store_waiter waiter = { .done = false, .result = 0 };
        struct store_write *w;
        int r;

        if (!s || !fn)
                return -EINVAL;
        if (s->thread_started && pthread_equal(pthread_self(), s->thread))
                return -EDEADLK; /* called from a write function */

        w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        *w = (struct store_write) { .fn = fn, .userdata = userdata, .waiter = &waiter };
        if (pthread_cond_init(&waiter.cond, NULL) != 0) {
                free(w);
                return -ENOMEM;
        }

        pthread_mutex_lock(&s->lock);
        r = enqueue(s, w);
        if (r >= 0) {
                /* The commit thread frees w and signals under the lock. */
                while (!waiter.done)
                        pthread_cond_wait(&waiter.cond, &s->lock);
                r = waiter.result;
        }
        pthread_mutex_unlock(&s->lock);

        if (!waiter.done)
                free(w);
        pthread_cond_destroy(&waiter.cond);
        return r;
}

int hub_store_dispatch(struct hub_store *s) {
        struct store_write *list, *next;
        uint64_t v;
        int n = 0;

        if (!s)
                return -EINVAL;

        /* Drain first: a completion posted after this read re-arms the fd. */
        (void) !read(s->efd, &v, sizeof v);

        pthread_mutex_lock(&s->lock);
        list = s->done;
        s->done = s->done_tail = NULL;
        pthread_mutex_unlock(&s->lock);

        for (; list; list = next) {
                next = list->next;
                list->done(list->result, list->userdata);
                free(list);
                n++;
        }
        return n;
}

bool hub_store_healthy(struct hub_store *s, uint64_t now_mono_usec) {
        bool ok;

        if (!s)
                return false;
        pthread_mutex_lock(&s->lock);
        ok = !s->thread_exited;
        if (ok && s->commit_started != 0 && now_mono_usec > s->commit_started &&
            now_mono_usec - s->commit_started > s->stall_timeout)
                ok = false;
        pthread_mutex_unlock(&s->lock);
        return ok;
}

void hub_store_get_stats(struct hub_store *s, struct hub_store_stats *ret) {
        struct stat st;

        if (!s || !ret)
                return;
        pthread_mutex_lock(&s->lock);
        *ret = s->stats;
        pthread_mutex_unlock(&s->lock);
        ret->db_bytes = stat(s->path, &st) == 0 ? (uint64_t) st.st_size : 0;
        ret->wal_bytes = s->wal_path && stat(s->wal_path, &st) == 0 ? (uint64_t) st.st_size : 0;
        ret->max_size = s->max_size;
}

/* ---- open ----------------------------------------------------------------------------- */

static int ensure_dir(const struct hub_store_options *opts) {
        struct stat st;

        if (mkdir(opts->dir, 0700) < 0) {
                int r = -errno;
                if (r != -EEXIST) {
                        set_err(opts, "cannot create the state directory %s: %s (its parent must exist)",
                                opts->dir, strerror(-r));
                        return r;
                }
        }
        if (stat(opts->dir, &st) < 0) {
                int r = -errno;
                set_err(opts, "cannot access the state directory %s: %s", opts->dir, strerror(-r));
                return r;
        }
        if (!S_ISDIR(st.st_mode)) {
                set_err(opts, "the state directory %s is not a directory", opts->dir);
                return -ENOTDIR;
        }
        /* Holds keys: 0700, whatever the umask, when it is ours to change. */
        if (st.st_uid == geteuid() && (st.st_mode & 07777) != 0700 && chmod(opts->dir, 0700) < 0) {
                int r = -errno;
                set_err(opts, "cannot make the state directory %s private (chmod 0700): %s", opts->dir,
                        strerror(-r));
                return r;
        }
        return 0;
}

/* Creates the database file 0600 (umask-independent) or tightens an existing one. */
static int ensure_db_file(const struct hub_store_options *opts, const char *path, bool *ret_existed) {
        _cleanup_close_ int fd = -EBADF;
        bool existed = false;
        struct stat st;

        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0 && errno == EEXIST) {
                existed = true;
                fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
        }
        if (fd < 0) {
                int r = -errno;
                set_err(opts, "cannot open %s: %s", path, strerror(-r));
                return r;
        }
        if (fstat(fd, &st) < 0) {
                int r = -errno;
                set_err(opts, "cannot stat %s: %s", path, strerror(-r));
                return r;
        }
        if (!S_ISREG(st.st_mode)) {
                set_err(opts, "%s is not a regular file", path);
                return -EINVAL;
        }
        if (st.st_uid == geteuid() && (st.st_mode & 07777) != 0600 && fchmod(fd, 0600) < 0) {
                int r = -errno;
                set_err(opts, "cannot make %s private (chmod 0600): %s", path, strerror(-r));
                return r;
        }
        /* SQLite gives its -wal and -shm files the database's mode; fix leftovers too. */
        for (unsigned i = 0; i < 2; i++) {
                char side[4096];
                snprintf(side, sizeof side, "%s%s", path, i == 0 ? "-wal" : "-shm");
                if (stat(side, &st) == 0 && st.st_uid == geteuid() && (st.st_mode & 07777) != 0600)
                        (void) chmod(side, 0600);
        }

        *ret_existed = existed;
        return 0;
}

/* Turns an SQLite failure during open into -errno plus a message saying what to do. */
static int open_fail(const struct hub_store_options *opts, const char *path, sqlite3 *db, int rc,
                     const char *what) {
        int r = db_errno(db, rc);

        if (r == -EBADMSG)
                set_err(opts,
                        "%s is not a fieldhub database or is corrupt (%s: %s); move it away and restore a "
                        "backup, or remove it to start empty",
                        path, what, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        else if (r == -ENOSPC)
                set_err(opts, "the disk holding %s is full (%s); free some space and restart", path, what);
        else
                set_err(opts, "%s: %s: %s", path, what, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        return r;
}

static int exec_pragma(const struct hub_store_options *opts, const char *path, sqlite3 *db,
                       const char *sql, const char *expect) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                if (rc == SQLITE_ROW && expect) {
                        const char *v = (const char *) sqlite3_column_text(st, 0);
                        if (!v || strcasecmp(v, expect) != 0) {
                                set_err(opts, "%s: \"%s\" gave \"%s\", expected \"%s\"", path, sql,
                                        v ? v : "(null)", expect);
                                sqlite3_finalize(st);
                                return -EIO;
                        }
                }
                if (rc == SQLITE_ROW || rc == SQLITE_DONE)
                        rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
                return open_fail(opts, path, db, rc, sql);
        return 0;
}

struct check_progress {
        const struct hub_store_options *opts;
        uint64_t start, last;
};

static int check_progress_cb(void *userdata) {
        struct check_progress *c = userdata;
        uint64_t now = hub_clock_mono(c->opts->clock);

        if (now - c->last >= USEC_PER_SEC) {
                c->last = now;
                c->opts->check_progress(c->opts->userdata, now - c->start);
        }
        return 0;
}

static int quick_check(const struct hub_store_options *opts, const char *path, sqlite3 *db) {
        struct check_progress cp = { .opts = opts };
        sqlite3_stmt *st = NULL;
        char first[256] = "";
        bool ok = false;
        int rc;

        if (opts->check_progress) {
                cp.start = cp.last = hub_clock_mono(opts->clock);
                sqlite3_progress_handler(db, STORE_PROGRESS_OPS, check_progress_cb, &cp);
        }

        rc = sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                const char *v = (const char *) sqlite3_column_text(st, 0);
                if (!first[0]) {
                        snprintf(first, sizeof first, "%s", v ? v : "(null)");
                        ok = v && streq(v, "ok");
                }
                rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
        sqlite3_progress_handler(db, 0, NULL, NULL);

        if (rc != SQLITE_DONE)
                return open_fail(opts, path, db, rc, "integrity check");
        if (!ok) {
                set_err(opts,
                        "%s failed its integrity check after an unclean stop (%s); restore a backup or "
                        "move the file away to start empty",
                        path, first);
                return -EBADMSG;
        }
        return 0;
}

static int read_clean_mark(const struct hub_store_options *opts, const char *path, sqlite3 *db,
                           bool *ret_clean) {
        sqlite3_stmt *st = NULL;
        bool clean = false;
        int rc;

        rc = sqlite3_prepare_v2(db, "SELECT value FROM meta WHERE key = 'clean_shutdown'", -1, &st, NULL);
        if (rc == SQLITE_OK) {
                rc = sqlite3_step(st);
                if (rc == SQLITE_ROW) {
                        const char *v = (const char *) sqlite3_column_text(st, 0);
                        clean = v && streq(v, "1");
                        rc = SQLITE_DONE;
                }
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
                return open_fail(opts, path, db, rc, "reading the clean-shutdown mark");
        *ret_clean = clean;
        return 0;
}

static int write_meta_open(const struct hub_store_options *opts, struct hub_store *s, bool new_db) {
        char sql[256], ts[32];
        int rc;

        rc = exec(s->wdb, "BEGIN IMMEDIATE");
        if (rc == SQLITE_OK && new_db) {
                snprintf(sql, sizeof sql, "INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', '%s')",
                         hub_time_format_iso8601(hub_clock_now(s->clock), ts));
                rc = exec(s->wdb, sql);
        }
        if (rc == SQLITE_OK)
                rc = exec(s->wdb, "INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_shutdown', '0')");
        if (rc == SQLITE_OK)
                rc = exec(s->wdb, "COMMIT");
        if (rc != SQLITE_OK) {
                int r = open_fail(opts, s->path, s->wdb, rc, "marking the store open");
                if (!sqlite3_get_autocommit(s->wdb))
                        (void) exec(s->wdb, "ROLLBACK");
                return r;
        }
        return 0;
}

/* Two processes on one store would each believe they own the outbox and the queues: the
 * second is refused, naming the first. The lock dies with its process (kill -9 included). */
static int lock_dir(const struct hub_store_options *opts, struct hub_store *s) {
        _cleanup_free_ char *p = NULL;
        char pid[32];

        if (asprintf(&p, "%s/fieldhub.lock", opts->dir) < 0) {
                p = NULL;
                return -ENOMEM;
        }
        s->lock_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (s->lock_fd < 0) {
                int r = -errno;
                set_err(opts, "cannot open %s: %s", p, strerror(-r));
                return r;
        }
        if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
                int r = -errno;
                if (r == -EWOULDBLOCK) {
                        ssize_t n = pread(s->lock_fd, pid, sizeof pid - 1, 0);
                        pid[n > 0 ? n : 0] = 0;
                        pid[strcspn(pid, "\n")] = 0;
                        set_err(opts, "%s is in use by another process (pid %s); only one fieldhubd may use a state directory",
                                opts->dir, pid[0] ? pid : "unknown");
                        return -EBUSY;
                }
                set_err(opts, "cannot lock %s: %s", p, strerror(-r));
                return r;
        }
        int n = snprintf(pid, sizeof pid, "%ld\n", (long) getpid());
        if (ftruncate(s->lock_fd, 0) < 0 || pwrite(s->lock_fd, pid, (size_t) n, 0) != n)
                hub_log_debug(s->log, "store: cannot write the pid into %s: %m", p);
        return 0;
}

static void store_free(struct hub_store *s) {
        struct store_write *w, *next;

        if (!s)
                return;
        if (s->rdb)
                (void) sqlite3_close(s->rdb);
        for (size_t i = 0; i < _WSTMT_MAX; i++)
                (void) sqlite3_finalize(s->wstmt[i]);
        for (size_t i = 0; i < s->n_txn_cache; i++)
                (void) sqlite3_finalize(s->txn_cache[i].st);
        if (s->cdb)
                (void) sqlite3_close(s->cdb);
        if (s->wdb)
                (void) sqlite3_close(s->wdb);
        if (s->efd >= 0)
                (void) close(s->efd);
        if (s->lock_fd >= 0)
                (void) close(s->lock_fd); /* releases the flock */
        for (w = s->done; w; w = next) {
                next = w->next;
                free(w);
        }
        if (s->lock_initialized) {
                pthread_cond_destroy(&s->ckpt_cond);
                pthread_cond_destroy(&s->cond);
                pthread_mutex_destroy(&s->lock);
        }
        free(s->dir);
        free(s->wal_path);
        free(s->reserve_path);
        free(s->path);
        free(s);
}

/* The WAL policy and the disk budget (hub_store_options.max_size). Neither setting is
 * persistent in SQLite: they are applied at every open, after the writes of the open itself
 * (so that a store at its budget still opens). */
static int apply_budget(const struct hub_store_options *opts, struct hub_store *s) {
        int64_t page_size = 4096, pages = 0, v = 0;
        uint64_t wal_share = 64ull * 1024 * 1024;
        char sql[128];
        int rc;

        if (opts->max_size && opts->max_size < HUB_STORE_MAX_SIZE_MIN) {
                set_err(opts, "the store budget of %llu bytes is below the minimum of %u bytes",
                        (unsigned long long) opts->max_size, HUB_STORE_MAX_SIZE_MIN);
                return -EINVAL;
        }
        if (asprintf(&s->wal_path, "%s-wal", s->path) < 0) {
                s->wal_path = NULL;
                return -ENOMEM;
        }
        if (asprintf(&s->reserve_path, "%s/fieldhub.reserve", s->dir) < 0) {
                s->reserve_path = NULL;
                return -ENOMEM;
        }
        reserve_create(s);
        if ((rc = pragma_int(s->wdb, "PRAGMA page_size", &page_size)) != SQLITE_OK ||
            (rc = pragma_int(s->wdb, "PRAGMA page_count", &pages)) != SQLITE_OK)
                return open_fail(opts, s->path, s->wdb, rc, "reading the page size");
        s->max_size = opts->max_size;
        s->page_size = (uint64_t) page_size;
        s->max_pages = 4294967294u; /* SQLite's default */
        if (s->max_size)
                wal_share = MIN(wal_share, s->max_size / 4);
        /* Checkpoint at half the WAL's share, at most STORE_CKPT_MAX_BYTES; after a
         * checkpoint, the file is cut back to the share. */
        s->wal_truncate = MIN(wal_share / 2, 4ull * 1024 * 1024);
        s->autocheckpoint = MAX(MIN(wal_share / 2, STORE_CKPT_MAX_BYTES) / (uint64_t) page_size, 16u);
        s->ckpt_hard = wal_share / 4 * 3 / (uint64_t) page_size;
        /* SQLite's own auto-checkpoint off: the commit thread checkpoints between groups. */
        s->ckpt_frames = s->autocheckpoint;
        (void) sqlite3_wal_hook(s->wdb, wal_hook, s);
        snprintf(sql, sizeof sql, "PRAGMA journal_size_limit = %llu", (unsigned long long) wal_share);
        if ((rc = exec(s->wdb, sql)) != SQLITE_OK)
                return open_fail(opts, s->path, s->wdb, rc, "setting journal_size_limit");
        if (!s->max_size)
                return 0;
        uint64_t max_pages = s->max_pages = (s->max_size - wal_share) / (uint64_t) page_size;
        snprintf(sql, sizeof sql, "PRAGMA max_page_count = %llu", (unsigned long long) max_pages);
        if ((rc = pragma_int(s->wdb, sql, &v)) != SQLITE_OK)
                return open_fail(opts, s->path, s->wdb, rc, "setting max_page_count");
        if ((uint64_t) v > max_pages)
                hub_log_debug(s->log,
                              "store: %s holds %lld pages of %lld bytes, more than the budget allows (%llu): it "
                              "keeps its size and reuses its free pages",
                              s->path, (long long) pages, (long long) page_size, (unsigned long long) max_pages);
        hub_log_debug(s->log, "store: budget %llu bytes: at most %lld pages of %lld bytes, WAL checkpoint at %llu bytes",
                      (unsigned long long) s->max_size, (long long) v, (long long) page_size,
                      (unsigned long long) (wal_share / 2));
        return 0;
}

int hub_store_open(const struct hub_store_options *opts, struct hub_store **ret_store) {
        struct hub_store *s;
        bool existed = false, clean = true;
        int version = 0, r, rc;

        if (!opts || !ret_store)
                return -EINVAL;
        if (opts->errbuf && opts->errbuf_size)
                opts->errbuf[0] = 0;
        if (!opts->dir || !*opts->dir || !opts->clock) {
                set_err(opts, "store options need a state directory and a clock");
                return -EINVAL;
        }

        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->efd = -EBADF;
        s->lock_fd = -EBADF;
        s->clock = opts->clock;
        s->log = opts->log;
        s->stall_timeout = opts->stall_timeout_usec ? opts->stall_timeout_usec : STORE_DEFAULT_STALL_USEC;
        s->group_interval = opts->group_interval_usec;
        s->dir = strdup(opts->dir);
        if (!s->dir || asprintf(&s->path, "%s/%s", opts->dir, HUB_STORE_FILE_NAME) < 0) {
                s->path = NULL;
                r = -ENOMEM;
                goto fail;
        }

        r = ensure_dir(opts);
        if (r < 0)
                goto fail;
        r = lock_dir(opts, s);
        if (r < 0)
                goto fail;
        r = ensure_db_file(opts, s->path, &existed);
        if (r < 0)
                goto fail;

        rc = sqlite3_open_v2(s->path, &s->wdb, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
        if (rc != SQLITE_OK) {
                r = open_fail(opts, s->path, s->wdb, rc, "opening");
                goto fail;
        }
        (void) sqlite3_extended_result_codes(s->wdb, 1);
        (void) sqlite3_busy_timeout(s->wdb, STORE_BUSY_TIMEOUT_MS);

        /* The version first: a newer store is refused before anything touches it. */
        r = hub_store_schema_version(s->wdb, &version, opts->errbuf, opts->errbuf_size);
        if (r < 0) {
                int ec = sqlite3_errcode(s->wdb) & 0xff;
                if (r == -EBADMSG && (ec == SQLITE_NOTADB || ec == SQLITE_CORRUPT))
                        set_err(opts,
                                "%s is not a fieldhub database or is corrupt (%s); move it away and restore "
                                "a backup, or remove it to start empty",
                                s->path, sqlite3_errmsg(s->wdb));
                goto fail;
        }
        if (version > HUB_STORE_SCHEMA_VERSION) {
                set_err(opts, "%s was written by a newer fieldhub (schema %d, this build knows %d); refusing to open it",
                        s->path, version, HUB_STORE_SCHEMA_VERSION);
                r = -EPROTONOSUPPORT;
                goto fail;
        }

        r = exec_pragma(opts, s->path, s->wdb, "PRAGMA journal_mode = WAL", "wal");
        if (r >= 0)
                r = exec_pragma(opts, s->path, s->wdb, "PRAGMA synchronous = FULL", NULL);
        if (r >= 0)
                r = exec_pragma(opts, s->path, s->wdb, "PRAGMA foreign_keys = ON", NULL);
        if (r < 0)
                goto fail;

        if (version >= 1) {
                r = read_clean_mark(opts, s->path, s->wdb, &clean);
                if (r < 0)
                        goto fail;
                s->unclean = !clean;
        }
        if (s->unclean || opts->force_check) {
                hub_log_debug(s->log, "store: %s, running quick_check on %s",
                              s->unclean ? "previous run did not stop cleanly" : "check forced", s->path);
                r = quick_check(opts, s->path, s->wdb);
                if (r < 0)
                        goto fail;
        }

        if (version < HUB_STORE_SCHEMA_VERSION) {
                r = hub_store_schema_migrate(s->wdb, version, s->log, opts->errbuf, opts->errbuf_size);
                if (r < 0) {
                        if (r == -ENOSPC)
                                set_err(opts, "the disk holding %s is full (schema migration); free some space and restart",
                                        s->path);
                        goto fail;
                }
        }

        r = write_meta_open(opts, s, version == 0);
        if (r < 0)
                goto fail;
        r = apply_budget(opts, s);
        if (r < 0)
                goto fail;

        rc = sqlite3_open_v2(s->path, &s->rdb, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
        if (rc != SQLITE_OK) {
                r = open_fail(opts, s->path, s->rdb, rc, "opening the read connection");
                goto fail;
        }
        (void) sqlite3_extended_result_codes(s->rdb, 1);
        (void) sqlite3_busy_timeout(s->rdb, STORE_BUSY_TIMEOUT_MS);

        /* The checkpointer's connection: synchronous=FULL, so that its checkpoints fsync the
         * WAL before copying it and the database file after. It never writes. */
        rc = sqlite3_open_v2(s->path, &s->cdb, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
        if (rc != SQLITE_OK) {
                r = open_fail(opts, s->path, s->cdb, rc, "opening the checkpoint connection");
                goto fail;
        }
        (void) sqlite3_extended_result_codes(s->cdb, 1);
        (void) sqlite3_busy_timeout(s->cdb, STORE_BUSY_TIMEOUT_MS);
        r = exec_pragma(opts, s->path, s->cdb, "PRAGMA synchronous = FULL", NULL);
        if (r < 0)
                goto fail;

        s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (s->efd < 0) {
                r = -errno;
                set_err(opts, "eventfd: %s", strerror(-r));
                goto fail;
        }

        if (pthread_mutex_init(&s->lock, NULL) != 0) {
                r = -ENOMEM;
                goto fail;
        }
        if (pthread_cond_init(&s->cond, NULL) != 0) {
                pthread_mutex_destroy(&s->lock);
                r = -ENOMEM;
                goto fail;
        }
        if (pthread_cond_init(&s->ckpt_cond, NULL) != 0) {
                pthread_cond_destroy(&s->cond);
                pthread_mutex_destroy(&s->lock);
                r = -ENOMEM;
                goto fail;
        }
        s->lock_initialized = true;

        r = -pthread_create(&s->ckpt_thread, NULL, checkpoint_thread, s);
        if (r < 0) {
                set_err(opts, "cannot start the store's checkpointer thread: %s", strerror(-r));
                goto fail;
        }
        s->ckpt_thread_started = true;

        r = -pthread_create(&s->thread, NULL, commit_thread, s);
        if (r < 0) {
                set_err(opts, "cannot start the store's commit thread: %s", strerror(-r));
                checkpoint_thread_stop(s);
                goto fail;
        }
        s->thread_started = true;
        s->opened = true;

        hub_log_debug(s->log, "store: opened %s (schema %d%s%s)", s->path, HUB_STORE_SCHEMA_VERSION,
                      existed ? "" : ", new", version < HUB_STORE_SCHEMA_VERSION ? ", migrated" : "");
        *ret_store = s;
        return 0;

fail:
        store_free(s);
        return r;
}

/* ---- close ---------------------------------------------------------------------------- */

struct hub_store *hub_store_close(struct hub_store *s) {
        int rc;

        if (!s)
                return NULL;

        if (s->thread_started) {
                pthread_mutex_lock(&s->lock);
                s->stopping = true;
                pthread_cond_broadcast(&s->cond);
                pthread_mutex_unlock(&s->lock);
                (void) pthread_join(s->thread, NULL);
                s->thread_started = false;
        }
        /* No new requests now; a checkpoint in progress completes first. */
        checkpoint_thread_stop(s);
        if (s->cdb) {
                (void) sqlite3_close(s->cdb);
                s->cdb = NULL;
        }
        /* Completions of the drained writes; new submissions now fail with -ESHUTDOWN. */
        (void) hub_store_dispatch(s);

        if (s->rdb) {
                (void) sqlite3_close(s->rdb);
                s->rdb = NULL;
        }
        if (s->opened && s->wdb) {
                rc = exec(s->wdb, "INSERT OR REPLACE INTO meta (key, value) VALUES ('clean_shutdown', '1')");
                if (rc != SQLITE_OK)
                        hub_log_debug(s->log, "store: cannot record a clean shutdown: %s", sqlite3_errmsg(s->wdb));
                rc = exec(s->wdb, "PRAGMA wal_checkpoint(TRUNCATE)");
                if (rc != SQLITE_OK)
                        hub_log_debug(s->log, "store: final checkpoint failed: %s", sqlite3_errmsg(s->wdb));
        }
        hub_log_debug(s->log, "store: closed %s", s->path);
        store_free(s);
        return NULL;
}

/* ---- backup --------------------------------------------------------------------------- */

static int fsync_parent_dir(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        _cleanup_close_ int fd = -EBADF;
        char *slash;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (!slash)
                strcpy(dir, ".");
        else if (slash == dir)
                slash[1] = 0;
        else
                *slash = 0;

        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fsync(fd) < 0)
                return -errno;
        return 0;
}

int hub_store_backup(struct hub_store *s, const char *path) {
        _cleanup_free_ char *tmp = NULL;
        _cleanup_close_ int fd = -EBADF;
        sqlite3 *dst = NULL;
        sqlite3_backup *b;
        int rc, r;

        if (!s || !path || !*path || !s->rdb)
                return -EINVAL;
        if (asprintf(&tmp, "%s.tmp", path) < 0) {
                tmp = NULL;
                return -ENOMEM;
        }

        (void) unlink(tmp);
        fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, 0600) < 0) {
                r = -errno;
                goto fail;
        }

        rc = sqlite3_open_v2(tmp, &dst, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
        if (rc != SQLITE_OK) {
                r = db_errno(dst, rc);
                goto fail;
        }
        b = sqlite3_backup_init(dst, "main", s->rdb, "main");
        if (!b) {
                r = db_errno(dst, sqlite3_errcode(dst));
                goto fail;
        }
        for (unsigned tries = 0;; tries++) {
                rc = sqlite3_backup_step(b, -1);
                if ((rc != SQLITE_BUSY && rc != SQLITE_LOCKED) || tries >= 100)
                        break;
                sqlite3_sleep(50);
        }
        (void) sqlite3_backup_finish(b);
        if (rc != SQLITE_DONE) {
                r = db_errno(dst, rc);
                goto fail;
        }
        rc = sqlite3_close(dst);
        dst = NULL;
        if (rc != SQLITE_OK) {
                r = hub_store_errno(rc);
                goto fail;
        }

        if (fsync(fd) < 0 || rename(tmp, path) < 0) {
                r = -errno;
                goto fail;
        }
        r = fsync_parent_dir(path);
        if (r < 0)
                return r;
        hub_log_debug(s->log, "store: backup written to %s", path);
        return 0;

fail:
        if (dst)
                (void) sqlite3_close(dst);
        (void) unlink(tmp);
        return r;
}
