/* SPDX-License-Identifier: MIT */
#pragma once

/* hub-core modules (registry, twins, queues, outbox) reach SQLite through these. Not part of
 * the public API: nothing outside hub-core includes this file (unit tests excepted). */

#include <sqlite3.h>

#include "hub/store.h"

/* The connection inside a write function's transaction (commit thread only). */
sqlite3 *hub_store_txn_db(struct hub_store_txn *txn);

/* A statement on the transaction's connection for @sql, prepared once and kept for the
 * store's lifetime (keyed by the address of @sql: pass a string literal). Returned reset,
 * bindings cleared; the caller steps it and must not finalize it. -E2BIG when more than
 * HUB_STORE_TXN_CACHE distinct statements are asked for (a programming error). */
#define HUB_STORE_TXN_CACHE 64
int hub_store_txn_prepare(struct hub_store_txn *txn, const char *sql, sqlite3_stmt **ret);

/* The read-only connection for the owner's thread. */
sqlite3 *hub_store_read_db(struct hub_store *s);

/* Maps an SQLite result code to -errno (SQLITE_FULL -> -ENOSPC, SQLITE_CONSTRAINT ->
 * -EEXIST, SQLITE_CORRUPT/NOTADB -> -EBADMSG, SQLITE_BUSY -> -EBUSY, SQLITE_NOMEM ->
 * -ENOMEM, else -EIO). */
int hub_store_errno(int sqlite_rc);

const struct hub_log *hub_store_log(struct hub_store *s);
const struct hub_clock *hub_store_clock(struct hub_store *s);
