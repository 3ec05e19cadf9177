/* SPDX-License-Identifier: MIT */
#pragma once

/* The store's schema: version table and forward migrations (store-schema.c). Private to
 * store.c. */

#include <stddef.h>
#include <sqlite3.h>

#include "hub/log.h"

struct hub_store_migration {
        int version;      /* the version this step produces */
        const char *what; /* for logs and error messages */
        const char *sql;  /* run inside the step's transaction */
};

/* The DDL of modules that own their tables, defined beside their code. */
extern const char hub_twin_schema_sql[];
extern const char hub_queue_schema_sql[];
extern const char hub_outbox_schema_sql[];
extern const char hub_outbox_schema_v5_sql[];
extern const char hub_outbox_schema_v6_sql[];

/* Steps 1 .. HUB_STORE_SCHEMA_VERSION, in order. */
extern const struct hub_store_migration hub_store_migrations[];
extern const size_t hub_store_n_migrations;

/* Reads the schema version: 0 for a database without the fieldhub tables. Returns 0 or a
 * negative errno (from hub_store_errno(), or -EBADMSG when schema_version does not hold
 * exactly one row); writes a reason to errbuf on failure. */
int hub_store_schema_version(sqlite3 *db, int *ret_version, char *errbuf, size_t errbuf_size);

/* Migrates from version `from` up to HUB_STORE_SCHEMA_VERSION, one transaction per step. */
int hub_store_schema_migrate(sqlite3 *db, int from, const struct hub_log *log, char *errbuf,
                             size_t errbuf_size);
