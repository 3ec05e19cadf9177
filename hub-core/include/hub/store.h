/* SPDX-License-Identifier: MIT */
#pragma once

/* The durable store: one SQLite database (WAL, synchronous=FULL) in the state directory.
 *
 * Writes are asynchronous and grouped. Callers submit a write function with a completion;
 * one commit thread takes everything submitted while the previous commit ran and applies it
 * in a single transaction as soon as it is idle (no fixed wait), each write under its own
 * SAVEPOINT so that one failing write does not fail the others (writes that are atomic by
 * themselves skip it: HUB_STORE_WRITE_SINGLE). Completions are handed back
 * to the thread that owns the store (the event loop) through an eventfd: when
 * hub_store_get_fd() polls readable, call hub_store_dispatch().
 *
 * Reads run on the owner's thread through a second, read-only connection; they see every
 * write whose completion has been dispatched (or whose hub_store_submit_wait() returned).
 *
 * Schema: a version table with forward migrations for every hub-core module (registry,
 * twins, queues, outbox, ...); a database written by a newer version is refused. After an
 * unclean stop (the clean-shutdown mark missing) `PRAGMA quick_check` runs at open. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/macro.h"

struct hub_store;
struct hub_store_txn; /* the open transaction, valid only inside a write function */

/* The schema version this build writes. */
#define HUB_STORE_SCHEMA_VERSION 6
#define HUB_STORE_FILE_NAME "fieldhub.db"

struct hub_store_options {
        /* State directory: created 0700 if missing (parents must exist); an existing one is
         * chmod'ed to 0700 when it is ours. The database is <dir>/fieldhub.db, mode 0600. */
        const char *dir;
        const struct hub_clock *clock; /* required */
        const struct hub_log *log;     /* optional */
        /* A commit running longer than this makes hub_store_healthy() false (0 = 10 s). */
        uint64_t stall_timeout_usec;
        /* Minimum time between the starts of two consecutive group commits (0 = none): under
         * a steady load, writes then share fsyncs in groups of up to this interval's worth
         * instead of a few each; a write after a quiet spell, a hub_store_submit_wait() and
         * groups longer than the interval are not delayed. Adds at most this to a write's
         * latency. */
        uint64_t group_interval_usec;
        /* Called on the opening thread, about once a second, while a long integrity check
         * runs at open, so the daemon can extend its start-up timeout. Optional. */
        void (*check_progress)(void *userdata, uint64_t elapsed_usec);
        void *userdata;
        /* Force `PRAGMA quick_check` even after a clean stop. */
        bool force_check;
        /* Where hub_store_open() writes a human-readable reason on failure. Optional. */
        char *errbuf;
        size_t errbuf_size;
        /* Disk budget for the database and its WAL in bytes (0 = none; else at least
         * HUB_STORE_MAX_SIZE_MIN). A quarter of it (at most 64 MiB) is kept for the WAL, the
         * rest bounds the database file (`PRAGMA max_page_count`, applied at every open). A
         * write that needs a page beyond it fails with -ENOSPC, like a full disk; pages freed
         * by deletes are reused. The WAL is checkpointed when it reaches half its share (at
         * most 2 MiB, also without a budget) and
         * truncated when the store is idle. A database already larger than the budget keeps
         * its size (never shrinks) and only reuses its free pages. */
        uint64_t max_size;
};

#define HUB_STORE_MAX_SIZE_MIN (1024 * 1024)

/* Opens (creating or migrating) the store. Blocks (integrity check, migrations).
 * Errors: -EPROTONOSUPPORT the file was written by a newer fieldhub (schema version above
 * HUB_STORE_SCHEMA_VERSION); -EBADMSG the file is not a database or fails quick_check;
 * -ENOSPC the disk is full; -EACCES/-EPERM and other -errno from the file system. On
 * failure opts->errbuf says what happened and what to do. */
HUB_EXPORT int hub_store_open(const struct hub_store_options *opts, struct hub_store **ret_store);

/* Changes hub_store_options.group_interval_usec of an open store; from the next group on. */
HUB_EXPORT void hub_store_set_group_interval(struct hub_store *s, uint64_t usec);

/* Waits for every submitted write to commit, delivers their completions, records a clean
 * shutdown, checkpoints the WAL and closes. Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_store *hub_store_close(struct hub_store *s);
DEFINE_CLEANUP_FUNC(struct hub_store *, hub_store_close);

/* A write, run on the commit thread inside the group transaction. Return >= 0 on success;
 * a negative errno rolls back this write only (its SAVEPOINT) and is passed to its
 * completion. Must not block on anything but SQLite, and must not call hub_store_* except
 * the txn functions below. */
typedef int (*hub_store_write_fn)(struct hub_store_txn *txn, void *userdata);
/* Completion, run from hub_store_dispatch() on the owner's thread. result is the write
 * function's result once committed, or the commit's failure (-ENOSPC disk full, -EIO ...),
 * in which case nothing of the write is in the database. */
typedef void (*hub_store_done_fn)(int result, void *userdata);

/* Queues a write. Never blocks on I/O; may be called from any thread. done may be NULL. Returns 0, -ENOMEM, or
 * -ESHUTDOWN once close has begun. userdata must stay valid until done has run (or, when
 * done is NULL, until the write function has run). */
HUB_EXPORT int hub_store_submit(struct hub_store *s, hub_store_write_fn fn, hub_store_done_fn done,
                                void *userdata);

/* Flags for hub_store_submit_flags(). */
enum {
        /* The write is atomic by itself: it either changes nothing and returns < 0, or
         * returns >= 0 with each of its statements either applied or, when one failed,
         * undone by SQLite alone (a single INSERT/UPDATE/DELETE statement, or several
         * independent statements whose individual outcome the write reports itself). The
         * store then runs it without a SAVEPOINT (which costs a copy of every page the write
         * touches into SQLite's statement journal). A failure that loses the whole
         * transaction is still detected and fails the whole group, as for other writes. */
        HUB_STORE_WRITE_SINGLE = 1 << 0,
};

/* hub_store_submit() with flags (HUB_STORE_WRITE_*). Same results. */
HUB_EXPORT int hub_store_submit_flags(struct hub_store *s, hub_store_write_fn fn, hub_store_done_fn done,
                                      void *userdata, unsigned flags);

/* Queues a write and blocks until its group has committed. Returns the write's result or
 * the commit's failure, or -ESHUTDOWN once close has begun. For rare operations (registry
 * changes) on the owner's thread; it delivers no other completions. Must not be called from
 * a write function (-EDEADLK). */
HUB_EXPORT int hub_store_submit_wait(struct hub_store *s, hub_store_write_fn fn, void *userdata);

/* An fd (eventfd) that polls readable when completions wait for hub_store_dispatch(). */
HUB_EXPORT int hub_store_get_fd(struct hub_store *s);

/* Runs every pending completion on the calling thread. Returns how many ran. */
HUB_EXPORT int hub_store_dispatch(struct hub_store *s);

/* False when a commit has been running for longer than the stall timeout, or the commit
 * thread has died: the daemon must then stop petting its watchdog. now is monotonic. */
HUB_EXPORT bool hub_store_healthy(struct hub_store *s, uint64_t now_mono_usec);

struct hub_store_stats {
        uint64_t commits;           /* transactions committed */
        uint64_t writes;            /* writes committed (successful or rolled back alone) */
        uint64_t failed_commits;    /* transactions that failed as a whole */
        uint64_t last_batch;        /* writes in the last transaction */
        uint64_t max_batch;
        uint64_t last_commit_usec;  /* duration of the last commit */
        uint64_t total_commit_usec; /* sum of commit durations */
        uint64_t pending;           /* submitted, not yet committed */
        uint64_t db_bytes;          /* size of the database file (without WAL) */
        uint64_t wal_bytes;         /* size of the WAL file */
        uint64_t full_failures;     /* writes that failed with -ENOSPC (budget or disk full) */
        uint64_t max_size;          /* the budget (0 = none) */
        uint64_t checkpoints;       /* idle WAL truncations */
        uint64_t wal_checkpoints;   /* WAL checkpoints run between commits (size threshold) */
};
HUB_EXPORT void hub_store_get_stats(struct hub_store *s, struct hub_store_stats *ret);

/* Whether the previous run ended without a clean close (then quick_check ran at open). */
HUB_EXPORT bool hub_store_was_unclean(struct hub_store *s);
HUB_EXPORT const char *hub_store_path(struct hub_store *s);

/* Consistent online copy of the whole database into path (SQLite backup API), written to a
 * temporary file, fsynced and renamed. Blocks; call from the owner's thread. The copy is mode
 * 0600 and holds what the read connection sees (every dispatched write). Restored as a
 * store, it counts as not cleanly closed, so quick_check runs on its first open. Returns 0
 * or -errno (-ENOENT missing directory, -ENOSPC, ...). */
HUB_EXPORT int hub_store_backup(struct hub_store *s, const char *path);
