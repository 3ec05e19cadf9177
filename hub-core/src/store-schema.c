/* SPDX-License-Identifier: MIT */
/* The store's schema, as an array of forward migrations. Version 0 is a database without
 * the fieldhub tables (a brand-new, empty file). Each step runs in its own transaction and
 * ends by recording its version in schema_version, so a crash between steps leaves a
 * database at a well-defined version that the next start continues from.
 *
 * Adding a module's tables: append a step, bump HUB_STORE_SCHEMA_VERSION in hub/store.h.
 * Never edit a step that has shipped. */

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "hub/store.h"
#include "store-internal.h"
#include "store-schema.h"

const struct hub_store_migration hub_store_migrations[] = {
        {
                .version = 1,
                .what = "version table, meta, device registry, policies",
                .sql =
                        "CREATE TABLE schema_version (version INTEGER NOT NULL);\n"
                        "INSERT INTO schema_version (version) VALUES (0);\n"
                        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);\n"
                        "CREATE TABLE devices (\n"
                        "  device_id TEXT PRIMARY KEY NOT NULL,\n"
                        "  generation_id TEXT NOT NULL,\n"
                        "  etag_version INTEGER NOT NULL,\n"
                        "  status INTEGER NOT NULL,\n"
                        "  status_reason TEXT,\n"
                        "  status_updated INTEGER NOT NULL,\n"
                        "  auth_type INTEGER NOT NULL,\n"
                        "  primary_key TEXT, secondary_key TEXT,\n"
                        "  primary_thumbprint TEXT, secondary_thumbprint TEXT,\n"
                        "  iot_edge INTEGER NOT NULL DEFAULT 0,\n"
                        "  connection_state INTEGER NOT NULL DEFAULT 0,\n"
                        "  connection_state_updated INTEGER NOT NULL DEFAULT 0,\n"
                        "  last_activity INTEGER NOT NULL DEFAULT 0,\n"
                        "  c2d_count INTEGER NOT NULL DEFAULT 0,\n"
                        "  created INTEGER NOT NULL\n"
                        ") WITHOUT ROWID;\n"
                        "CREATE TABLE policies (\n"
                        "  name TEXT PRIMARY KEY NOT NULL,\n"
                        "  primary_key TEXT NOT NULL,\n"
                        "  secondary_key TEXT NOT NULL,\n"
                        "  rights INTEGER NOT NULL\n"
                        ") WITHOUT ROWID;\n",
        },
        {
                .version = 2,
                .what = "device twins",
                .sql = hub_twin_schema_sql, /* twin.c */
        },
        {
                .version = 3,
                .what = "cloud-to-device queues and feedback",
                .sql = hub_queue_schema_sql, /* queue.c */
        },
        {
                .version = 4,
                .what = "outbox, endpoint cursors and the events stream",
                .sql = hub_outbox_schema_sql, /* outbox.c */
        },
        {
                .version = 5,
                .what = "outbox without its per-device index",
                .sql = hub_outbox_schema_v5_sql, /* outbox.c */
        },
        {
                .version = 6,
                .what = "outbox chunk summaries",
                .sql = hub_outbox_schema_v6_sql, /* outbox.c */
        },
};
const size_t hub_store_n_migrations = ELEMENTSOF(hub_store_migrations);

_Static_assert(ELEMENTSOF(hub_store_migrations) == HUB_STORE_SCHEMA_VERSION,
               "one migration step per schema version");

_printf_(3, 4) static void set_err(char *errbuf, size_t n, const char *fmt, ...) {
        va_list ap;

        if (!errbuf || n == 0)
                return;
        va_start(ap, fmt);
        vsnprintf(errbuf, n, fmt, ap);
        va_end(ap);
}

int hub_store_schema_version(sqlite3 *db, int *ret_version, char *errbuf, size_t errbuf_size) {
        sqlite3_stmt *st = NULL;
        int rc, r, n_rows = 0;
        sqlite3_int64 version = 0;

        rc = sqlite3_prepare_v2(db,
                                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
                                -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc != SQLITE_ROW) {
                r = hub_store_errno(rc);
                set_err(errbuf, errbuf_size, "cannot read the database schema: %s", sqlite3_errmsg(db));
                sqlite3_finalize(st);
                return r;
        }
        bool exists = sqlite3_column_int(st, 0) > 0;
        sqlite3_finalize(st);
        st = NULL;

        if (!exists) {
                *ret_version = 0;
                return 0;
        }

        rc = sqlite3_prepare_v2(db, "SELECT version FROM schema_version", -1, &st, NULL);
        while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
                version = sqlite3_column_int64(st, 0);
                n_rows++;
                rc = SQLITE_OK;
        }
        if (rc != SQLITE_DONE) {
                r = hub_store_errno(rc);
                set_err(errbuf, errbuf_size, "cannot read the schema version: %s", sqlite3_errmsg(db));
                sqlite3_finalize(st);
                return r;
        }
        sqlite3_finalize(st);

        if (n_rows != 1 || version < 0 || version > INT32_MAX) {
                set_err(errbuf, errbuf_size,
                        "%s: the schema_version table is damaged (%d rows, expected exactly one with a valid "
                        "version); restore a backup",
                        sqlite3_db_filename(db, "main"), n_rows);
                return -EBADMSG;
        }

        *ret_version = (int) version;
        return 0;
}

static int exec_step(sqlite3 *db, const struct hub_store_migration *m) {
        char sql[96];
        int rc;

        rc = sqlite3_exec(db, m->sql, NULL, NULL, NULL);
        if (rc != SQLITE_OK)
                return rc;
        snprintf(sql, sizeof sql, "UPDATE schema_version SET version = %d", m->version);
        return sqlite3_exec(db, sql, NULL, NULL, NULL);
}

int hub_store_schema_migrate(sqlite3 *db, int from, const struct hub_log *log, char *errbuf,
                             size_t errbuf_size) {
        for (size_t i = 0; i < hub_store_n_migrations; i++) {
                const struct hub_store_migration *m = &hub_store_migrations[i];
                int rc;

                if (m->version <= from)
                        continue;

                hub_log_debug(log, "store: migrating schema to version %d (%s)", m->version, m->what);

                rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
                if (rc == SQLITE_OK) {
                        rc = exec_step(db, m);
                        if (rc == SQLITE_OK)
                                rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
                }
                if (rc != SQLITE_OK) {
                        int r = hub_store_errno(rc);
                        set_err(errbuf, errbuf_size, "migrating the schema to version %d (%s) failed: %s",
                                m->version, m->what, sqlite3_errmsg(db));
                        if (!sqlite3_get_autocommit(db))
                                (void) sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
                        return r;
                }
        }
        return 0;
}
