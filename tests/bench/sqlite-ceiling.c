/* SPDX-License-Identifier: MIT */
/* The store ceiling of bench-api.sh: a bare SQLite loop doing the service API's transactions on a
 * 10,000-row table, single-threaded, WAL, synchronous=FULL (fieldhub's durability):
 *   read:   point reads by primary key (SELECT doc FROM devices WHERE id = ?) of random rows;
 *   update: one transaction per operation (BEGIN; SELECT; UPDATE devices SET doc = ? WHERE id = ?; COMMIT),
 *           or BATCH operations per transaction (group commit: what a server with BATCH concurrent
 *           clients can do at best when it commits their writes together).
 * Prints one line "RESULT {"mode":..., "ops":N, "seconds":S, "ops_per_s":R}".
 *
 *   sqlite-ceiling DB_PATH read|update SECONDS [ROWS [BATCH]]
 * Built by bench-api.sh with cc (-O2 -lsqlite3); not part of the meson build. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static void check(sqlite3 *db, int r, const char *what) {
        if (r != SQLITE_OK && r != SQLITE_DONE && r != SQLITE_ROW) {
                fprintf(stderr, "sqlite-ceiling: %s: %s\n", what, sqlite3_errmsg(db));
                exit(1);
        }
}

static void exec(sqlite3 *db, const char *sql) {
        check(db, sqlite3_exec(db, sql, NULL, NULL, NULL), sql);
}

/* A document the size of a fieldhub device + twin (~700 bytes of JSON). */
static int make_doc(char *buf, size_t size, int id, long n) {
        return snprintf(buf, size,
                        "{\"deviceId\":\"bench-%06d\",\"generationId\":\"638000000000000000\",\"etag\":\"MTIzNDU2Nzg=\","
                        "\"connectionState\":\"Disconnected\",\"status\":\"enabled\",\"statusReason\":null,"
                        "\"connectionStateUpdatedTime\":\"0001-01-01T00:00:00Z\",\"statusUpdatedTime\":\"0001-01-01T00:00:00Z\","
                        "\"lastActivityTime\":\"0001-01-01T00:00:00Z\",\"cloudToDeviceMessageCount\":0,"
                        "\"authentication\":{\"symmetricKey\":{\"primaryKey\":\"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\","
                        "\"secondaryKey\":\"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=\"},\"x509Thumbprint\":"
                        "{\"primaryThumbprint\":null,\"secondaryThumbprint\":null},\"type\":\"sas\"},"
                        "\"capabilities\":{\"iotEdge\":false},\"tags\":{\"site\":\"site-%d\"},\"properties\":{\"desired\":"
                        "{\"n\":%ld,\"$version\":%ld},\"reported\":{\"$version\":1}},\"version\":%ld}",
                        id, id % 10, n, n + 1, n + 2);
}

int main(int argc, char **argv) {
        if (argc < 4 || (strcmp(argv[2], "read") != 0 && strcmp(argv[2], "update") != 0)) {
                fprintf(stderr, "usage: sqlite-ceiling DB_PATH read|update SECONDS [ROWS [BATCH]]\n");
                return 2;
        }
        const char *path = argv[1];
        int update = strcmp(argv[2], "update") == 0;
        double seconds = atof(argv[3]);
        int rows = argc > 4 ? atoi(argv[4]) : 10000;
        int batch = argc > 5 ? atoi(argv[5]) : 1;
        sqlite3 *db;
        sqlite3_stmt *st;
        char doc[2048];

        if (rows <= 0 || seconds <= 0 || batch <= 0) {
                fprintf(stderr, "sqlite-ceiling: SECONDS, ROWS and BATCH must be positive\n");
                return 2;
        }
        check(NULL, sqlite3_open(path, &db), path);
        exec(db, "PRAGMA journal_mode=WAL");
        exec(db, "PRAGMA synchronous=FULL");
        exec(db, "CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID");

        /* Seed once (the same file is reused by later runs). */
        check(db, sqlite3_prepare_v2(db, "SELECT count(*) FROM devices", -1, &st, NULL), "count");
        check(db, sqlite3_step(st), "count");
        int have = sqlite3_column_int(st, 0);
        sqlite3_finalize(st);
        if (have < rows) {
                exec(db, "BEGIN");
                check(db, sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO devices (id, doc) VALUES (?, ?)", -1, &st, NULL), "insert");
                for (int i = 0; i < rows; i++) {
                        char id[32];
                        snprintf(id, sizeof id, "bench-%06d", i);
                        int l = make_doc(doc, sizeof doc, i, 0);
                        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
                        sqlite3_bind_text(st, 2, doc, l, SQLITE_TRANSIENT);
                        check(db, sqlite3_step(st), "insert");
                        sqlite3_reset(st);
                }
                sqlite3_finalize(st);
                exec(db, "COMMIT");
        }

        sqlite3_stmt *sel, *upd, *begin, *commit;
        check(db, sqlite3_prepare_v2(db, "SELECT doc FROM devices WHERE id = ?", -1, &sel, NULL), "select");
        check(db, sqlite3_prepare_v2(db, "UPDATE devices SET doc = ? WHERE id = ?", -1, &upd, NULL), "update");
        check(db, sqlite3_prepare_v2(db, "BEGIN IMMEDIATE", -1, &begin, NULL), "begin");
        check(db, sqlite3_prepare_v2(db, "COMMIT", -1, &commit, NULL), "commit");

        srand(12345);
        long ops = 0;
        size_t bytes = 0;
        double t0 = now(), end = t0 + seconds, t = t0;
        while (t < end) {
                for (int k = 0; k < 64; k++) {
                        char id[32];
                        int i = rand() % rows;
                        snprintf(id, sizeof id, "bench-%06d", i);
                        if (!update) {
                                sqlite3_bind_text(sel, 1, id, -1, SQLITE_STATIC);
                                int r = sqlite3_step(sel);
                                if (r != SQLITE_ROW) {
                                        fprintf(stderr, "sqlite-ceiling: row %s not found\n", id);
                                        return 1;
                                }
                                bytes += (size_t) sqlite3_column_bytes(sel, 0);
                                sqlite3_reset(sel);
                        } else {
                                /* Read-modify-write like a twin PATCH: read the row, write it back. */
                                if (ops % batch == 0) {
                                        check(db, sqlite3_step(begin), "begin");
                                        sqlite3_reset(begin);
                                }
                                sqlite3_bind_text(sel, 1, id, -1, SQLITE_STATIC);
                                check(db, sqlite3_step(sel), "select");
                                bytes += (size_t) sqlite3_column_bytes(sel, 0);
                                sqlite3_reset(sel);
                                int l = make_doc(doc, sizeof doc, i, ops + 1);
                                sqlite3_bind_text(upd, 1, doc, l, SQLITE_STATIC);
                                sqlite3_bind_text(upd, 2, id, -1, SQLITE_STATIC);
                                check(db, sqlite3_step(upd), "update");
                                sqlite3_reset(upd);
                                if ((ops + 1) % batch == 0) {
                                        check(db, sqlite3_step(commit), "commit");
                                        sqlite3_reset(commit);
                                }
                        }
                        ops++;
                }
                t = now();
        }
        if (update && ops % batch != 0) {
                check(db, sqlite3_step(commit), "commit");
                sqlite3_reset(commit);
                t = now();
        }
        double el = t - t0;
        printf("RESULT {\"mode\":\"%s\",\"batch\":%d,\"ops\":%ld,\"seconds\":%.3f,\"ops_per_s\":%.1f,\"bytes\":%zu}\n",
               update ? "update" : "read", batch, ops, el, (double) ops / el, bytes);
        sqlite3_finalize(sel);
        sqlite3_finalize(upd);
        sqlite3_finalize(begin);
        sqlite3_finalize(commit);
        sqlite3_close(db);
        return 0;
}
