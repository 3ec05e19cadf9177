/* SPDX-License-Identifier: MIT */
#pragma once

/* Statement helpers shared by the hub-core modules that read rows of the store (registry,
 * twins). Private to hub-core/src, like store-internal.h. */

#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include "store-internal.h"

/* Copies the text of column @i of the current row into @buf of @size bytes (an empty string
 * for NULL; *@ret_null, if given, says which). -EBADMSG if the text does not fit. */
static inline int hub_store_col_text(sqlite3_stmt *st, int i, char *buf, size_t size, bool *ret_null) {
        const unsigned char *t = sqlite3_column_text(st, i);
        int n = sqlite3_column_bytes(st, i);

        if (ret_null)
                *ret_null = !t;
        if (!t) {
                buf[0] = '\0';
                return 0;
        }
        if ((size_t) n >= size)
                return -EBADMSG;
        memcpy(buf, t, (size_t) n);
        buf[n] = '\0';
        return 0;
}

/* Prepares @sql once, persistently, on the store's read connection into *@st; nothing to do
 * when *@st is already prepared. *@st stays NULL on failure. */
static inline int hub_store_prepare_cached(struct hub_store *s, sqlite3_stmt **st, const char *sql) {
        sqlite3 *db;
        int rc;

        if (*st)
                return 0;
        db = hub_store_read_db(s);
        if (!db)
                return -EIO;
        rc = sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
        if (rc != SQLITE_OK) {
                *st = NULL;
                return hub_store_errno(rc);
        }
        return 0;
}

typedef int (*hub_store_row_fn)(sqlite3_stmt *st, void *ret);

/* Binds @key as ?1 of @st, steps it once and decodes the row with @decode into @ret:
 * -ENOENT when there is no row. Resets @st (and clears its bindings) for reuse. */
static inline int hub_store_select_one(sqlite3_stmt *st, const char *key, hub_store_row_fn decode, void *ret) {
        int rc, r;

        rc = sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc == SQLITE_ROW)
                r = decode(st, ret);
        else if (rc == SQLITE_DONE)
                r = -ENOENT;
        else
                r = hub_store_errno(rc);
        sqlite3_reset(st);
        sqlite3_clear_bindings(st);
        return r;
}

/* hub_store_select_one() on a statement prepared from @sql for this call only (write
 * functions, inside the transaction on @db). */
static inline int hub_store_select_one_sql(sqlite3 *db, const char *sql, const char *key, hub_store_row_fn decode,
                                           void *ret) {
        sqlite3_stmt *st = NULL;
        int rc, r;

        rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
        if (rc != SQLITE_OK)
                return hub_store_errno(rc);
        r = hub_store_select_one(st, key, decode, ret);
        sqlite3_finalize(st);
        return r;
}
