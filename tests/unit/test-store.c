/* SPDX-License-Identifier: MIT */
/* The SQLite store: creation and file modes, reopen, migrations from version 0, refusal of a
 * newer schema, corrupt and truncated files, unclean-stop detection, the grouped commit
 * under concurrent submitters, per-write rollback, submit_wait, disk full, stall detection
 * and backup. Real SQLite in a temporary directory; fixtures are built at run time with the
 * SQLite C API (nothing binary is committed). */

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "hub/clock.h"
#include "hub/store.h"
#include "store-internal.h"
#include "test-util.h"

static char tmp_root[4096];
static struct hub_fake_clock fake;
static char errbuf[512];

static char *mkpath(char *buf, size_t n, const char *a, const char *b) {
        snprintf(buf, n, "%s/%s", a, b);
        return buf;
}

/* A fresh state directory path (not created) under the test's temp dir. */
static const char *new_state_dir(const char *name) {
        static char buf[4200];
        return mkpath(buf, sizeof buf, tmp_root, name);
}

static int open_store_ex(const char *dir, const struct hub_clock *clock, bool force_check,
                         void (*progress)(void *, uint64_t), void *userdata, uint64_t stall,
                         struct hub_store **ret) {
        struct hub_store_options o = {
                .dir = dir,
                .clock = clock,
                .force_check = force_check,
                .check_progress = progress,
                .userdata = userdata,
                .stall_timeout_usec = stall,
                .errbuf = errbuf,
                .errbuf_size = sizeof errbuf,
        };
        int r = hub_store_open(&o, ret);
        if (r < 0)
                fprintf(stderr, "  (open %s: %s)\n", dir, errbuf);
        return r;
}

static int open_store(const char *dir, struct hub_store **ret) {
        return open_store_ex(dir, &fake.clock, false, NULL, NULL, 0, ret);
}

static void db_path(const char *dir, char *buf, size_t n) {
        mkpath(buf, n, dir, HUB_STORE_FILE_NAME);
}

/* Runs SQL on a database file directly (fixtures, after-the-fact inspection). */
static void sql_on_file(const char *path, const char *sql) {
        sqlite3 *db = NULL;
        char *err = NULL;

        if (sqlite3_open(path, &db) != SQLITE_OK)
                TEST_FAIL("sqlite3_open(%s): %s", path, sqlite3_errmsg(db));
        if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK)
                TEST_FAIL("%s: %s", sql, err);
        sqlite3_close(db);
}

static int64_t query_int(sqlite3 *db, const char *sql) {
        sqlite3_stmt *st = NULL;
        int64_t v;

        if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
                TEST_FAIL("prepare %s: %s", sql, sqlite3_errmsg(db));
        if (sqlite3_step(st) != SQLITE_ROW)
                TEST_FAIL("step %s: %s", sql, sqlite3_errmsg(db));
        v = sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        return v;
}

static char *query_text(sqlite3 *db, const char *sql) {
        sqlite3_stmt *st = NULL;
        char *v = NULL;

        if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
                TEST_FAIL("prepare %s: %s", sql, sqlite3_errmsg(db));
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
                v = strdup((const char *) sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
        return v;
}

static int txn_exec(struct hub_store_txn *txn, const char *sql) {
        int rc = sqlite3_exec(hub_store_txn_db(txn), sql, NULL, NULL, NULL);
        return rc == SQLITE_OK ? 0 : hub_store_errno(rc);
}

static int write_sql(struct hub_store_txn *txn, void *userdata) {
        return txn_exec(txn, userdata);
}

static void wait_sql(struct hub_store *s, const char *sql) {
        ASSERT_OK(hub_store_submit_wait(s, write_sql, (void *) sql));
}

static mode_t file_mode(const char *path) {
        struct stat st;
        if (stat(path, &st) < 0)
                TEST_FAIL("stat %s", path);
        return st.st_mode & 07777;
}

static uint8_t *read_all(const char *path, size_t *ret_len) {
        FILE *f = fopen(path, "rb");
        uint8_t *buf;
        long n;

        ASSERT_NOT_NULL(f);
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        fseek(f, 0, SEEK_SET);
        buf = malloc(n > 0 ? (size_t) n : 1);
        ASSERT_NOT_NULL(buf);
        ASSERT_EQ(fread(buf, 1, (size_t) n, f), (size_t) n);
        fclose(f);
        *ret_len = (size_t) n;
        return buf;
}

static void write_bytes(const char *path, const void *d, size_t n) {
        FILE *f = fopen(path, "wb");
        ASSERT_NOT_NULL(f);
        ASSERT_EQ(fwrite(d, 1, n, f), n);
        ASSERT_EQ(fclose(f), 0);
}

/* ---- creation, reopen, migrations ------------------------------------------------------ */

static void test_create_fresh(void) {
        const char *dir = new_state_dir("fresh");
        struct hub_store *s = NULL;
        char path[4300];
        mode_t old = umask(0);

        /* umask 0 would give 0777/0666: the store must not depend on it. */
        ASSERT_OK(open_store(dir, &s));
        umask(old);
        db_path(dir, path, sizeof path);
        ASSERT_EQ(file_mode(dir), 0700);
        ASSERT_EQ(file_mode(path), 0600);
        ASSERT_STREQ(hub_store_path(s), path);
        ASSERT_FALSE(hub_store_was_unclean(s));
        ASSERT_TRUE(hub_store_get_fd(s) >= 0);

        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT version FROM schema_version"), HUB_STORE_SCHEMA_VERSION);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM schema_version"), 1);
        _cleanup_free_ char *mark = query_text(r, "SELECT value FROM meta WHERE key = 'clean_shutdown'");
        ASSERT_STREQ(mark, "0");
        _cleanup_free_ char *created = query_text(r, "SELECT value FROM meta WHERE key = 'created_at'");
        ASSERT_NOT_NULL(created);
        uint64_t t;
        ASSERT_OK(hub_time_parse_iso8601(created, &t));
        ASSERT_EQ(t, hub_clock_now(&fake.clock));
        _cleanup_free_ char *jm = query_text(r, "PRAGMA journal_mode");
        ASSERT_STREQ(jm, "wal");

        /* The registry's tables, exactly as specified. */
        wait_sql(s, "INSERT INTO devices (device_id, generation_id, etag_version, status, status_updated,"
                    " auth_type, created) VALUES ('d1', 'g', 1, 0, 0, 0, 5)");
        wait_sql(s, "INSERT INTO policies VALUES ('iothubowner', 'a', 'b', 15)");
        ASSERT_EQ(query_int(r, "SELECT c2d_count + connection_state + iot_edge FROM devices"), 0);
        ASSERT_EQ(query_int(r, "SELECT rights FROM policies"), 15);
        /* Read connection is read-only. */
        ASSERT_TRUE(sqlite3_exec(r, "DELETE FROM devices", NULL, NULL, NULL) != SQLITE_OK);

        char wal[4400];
        snprintf(wal, sizeof wal, "%s-wal", path);
        ASSERT_EQ(file_mode(wal), 0600);

        ASSERT_NULL(hub_store_close(s));
        ASSERT_EQ(access(wal, F_OK) < 0 ? 0 : 1, 0); /* checkpointed and removed */
        ASSERT_NULL(hub_store_close(NULL));

        /* Reopen: clean, data kept, created_at kept. An existing loose dir is tightened. */
        ASSERT_OK(chmod(dir, 0755));
        ASSERT_OK(chmod(path, 0644));
        hub_fake_clock_advance(&fake, 3600 * USEC_PER_SEC);
        ASSERT_OK(open_store(dir, &s));
        ASSERT_EQ(file_mode(dir), 0700);
        ASSERT_EQ(file_mode(path), 0600);
        ASSERT_FALSE(hub_store_was_unclean(s));
        r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM devices WHERE device_id = 'd1'"), 1);
        _cleanup_free_ char *created2 = query_text(r, "SELECT value FROM meta WHERE key = 'created_at'");
        ASSERT_STREQ(created2, created);
        hub_store_close(s);

        /* Bad options. */
        struct hub_store_options o = { .dir = dir, .errbuf = errbuf, .errbuf_size = sizeof errbuf };
        ASSERT_ERR(hub_store_open(&o, &s), -EINVAL); /* no clock */
        ASSERT_TRUE(strlen(errbuf) > 0);
        o = (struct hub_store_options) { .dir = "/nonexistent/x/y", .clock = &fake.clock,
                                         .errbuf = errbuf, .errbuf_size = sizeof errbuf };
        ASSERT_ERR(hub_store_open(&o, &s), -ENOENT);
        ASSERT_TRUE(strstr(errbuf, "/nonexistent/x/y") != NULL);
}

static void assert_current_schema(struct hub_store *s) {
        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT version FROM schema_version"), HUB_STORE_SCHEMA_VERSION);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM sqlite_master WHERE name IN ('meta', 'devices', 'policies')"), 3);
}

static void test_migrate_from_v0(void) {
        struct hub_store *s = NULL;
        char path[4300];

        /* An empty file (0 bytes), created with a loose mode. */
        const char *dir = new_state_dir("v0-empty");
        ASSERT_OK(mkdir(dir, 0700));
        db_path(dir, path, sizeof path);
        write_bytes(path, "", 0);
        ASSERT_OK(chmod(path, 0644));
        ASSERT_OK(open_store(dir, &s));
        ASSERT_EQ(file_mode(path), 0600);
        ASSERT_FALSE(hub_store_was_unclean(s));
        assert_current_schema(s);
        hub_store_close(s);

        /* A real SQLite database without any fieldhub table (no schema_version). */
        dir = new_state_dir("v0-noversion");
        ASSERT_OK(mkdir(dir, 0700));
        db_path(dir, path, sizeof path);
        sql_on_file(path, "PRAGMA user_version = 0; CREATE TABLE x (a); DROP TABLE x;");
        size_t n;
        free(read_all(path, &n));
        ASSERT_TRUE(n > 0);
        ASSERT_OK(open_store(dir, &s));
        ASSERT_FALSE(hub_store_was_unclean(s));
        assert_current_schema(s);
        hub_store_close(s);
        ASSERT_OK(open_store(dir, &s));
        assert_current_schema(s);
        hub_store_close(s);

        /* A version-1 fixture written by this build, reopened: no migration, same data. */
        dir = new_state_dir("v1");
        ASSERT_OK(open_store(dir, &s));
        wait_sql(s, "INSERT INTO meta VALUES ('fixture', 'v1')");
        hub_store_close(s);
        ASSERT_OK(open_store(dir, &s));
        _cleanup_free_ char *v = query_text(hub_store_read_db(s), "SELECT value FROM meta WHERE key = 'fixture'");
        ASSERT_STREQ(v, "v1");
        hub_store_close(s);
}

static void test_newer_schema(void) {
        const char *dir = new_state_dir("v99");
        struct hub_store *s = NULL;
        char path[4300];
        size_t n1, n2;

        ASSERT_OK(mkdir(dir, 0700));
        db_path(dir, path, sizeof path);
        sql_on_file(path, "CREATE TABLE schema_version (version INTEGER NOT NULL);"
                          "INSERT INTO schema_version VALUES (99);"
                          "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
                          "CREATE TABLE future (x);");
        _cleanup_free_ uint8_t *before = read_all(path, &n1);

        ASSERT_ERR(open_store(dir, &s), -EPROTONOSUPPORT);
        ASSERT_NULL(s);
        ASSERT_TRUE(strstr(errbuf, "newer fieldhub") != NULL);
        ASSERT_TRUE(strstr(errbuf, "schema 99") != NULL);
        char knows[64];
        snprintf(knows, sizeof knows, "this build knows %d", HUB_STORE_SCHEMA_VERSION);
        ASSERT_TRUE(strstr(errbuf, knows) != NULL);
        ASSERT_TRUE(strstr(errbuf, "refusing to open it") != NULL);

        /* Untouched. */
        _cleanup_free_ uint8_t *after = read_all(path, &n2);
        ASSERT_EQ(n1, n2);
        ASSERT_TRUE(memcmp(before, after, n1) == 0);

        /* A damaged version table. */
        dir = new_state_dir("v-two-rows");
        ASSERT_OK(mkdir(dir, 0700));
        db_path(dir, path, sizeof path);
        sql_on_file(path, "CREATE TABLE schema_version (version INTEGER NOT NULL);"
                          "INSERT INTO schema_version VALUES (1), (1);");
        ASSERT_ERR(open_store(dir, &s), -EBADMSG);
        ASSERT_TRUE(strstr(errbuf, "schema_version") != NULL);
}

static void test_corrupt_files(void) {
        struct hub_store *s = NULL;
        char path[4300];

        /* Random bytes (fixed seed). */
        const char *dir = new_state_dir("garbage");
        ASSERT_OK(mkdir(dir, 0700));
        db_path(dir, path, sizeof path);
        uint8_t junk[3 * 4096];
        uint32_t x = 0x12345678;
        for (size_t i = 0; i < sizeof junk; i++) {
                x = x * 1103515245u + 12345u;
                junk[i] = (uint8_t) (x >> 16);
        }
        write_bytes(path, junk, sizeof junk);
        ASSERT_ERR(open_store(dir, &s), -EBADMSG);
        ASSERT_TRUE(strstr(errbuf, "not a fieldhub database or is corrupt") != NULL);
        ASSERT_TRUE(strstr(errbuf, path) != NULL);

        /* Text that happens to be a file. */
        write_bytes(path, "hello, this is not a database\n", 30);
        ASSERT_ERR(open_store(dir, &s), -EBADMSG);

        /* A real store, truncated. */
        dir = new_state_dir("truncated");
        ASSERT_OK(open_store(dir, &s));
        for (int i = 0; i < 20; i++)
                wait_sql(s, "INSERT INTO policies SELECT hex(randomblob(16)), hex(randomblob(200)),"
                            " hex(randomblob(200)), 1 FROM (SELECT 1 UNION SELECT 2 UNION SELECT 3)");
        hub_store_close(s);
        db_path(dir, path, sizeof path);
        size_t n;
        _cleanup_free_ uint8_t *whole = read_all(path, &n);
        ASSERT_TRUE(n > 8 * 4096);
        write_bytes(path, whole, 4096 + 1000);
        ASSERT_ERR(open_store(dir, &s), -EBADMSG);
        ASSERT_TRUE(strstr(errbuf, "corrupt") != NULL);
}

/* ---- unclean stop --------------------------------------------------------------------- */

/* A clock whose monotonic time moves 300 ms every time it is read. */
static uint64_t step_mono_v = USEC_PER_SEC;
static uint64_t step_real(void *u) {
        (void) u;
        return UINT64_C(1700000000) * USEC_PER_SEC;
}
static uint64_t step_mono(void *u) {
        (void) u;
        return step_mono_v += 300 * USEC_PER_MSEC;
}
static const struct hub_clock step_clock = { .realtime_usec = step_real, .monotonic_usec = step_mono };

static int progress_calls;
static void on_progress(void *userdata, uint64_t elapsed) {
        ASSERT_TRUE(userdata == &progress_calls);
        ASSERT_TRUE(elapsed >= USEC_PER_SEC);
        progress_calls++;
}

static void crash_after_write(const char *dir) {
        pid_t pid = fork();
        ASSERT_TRUE(pid >= 0);
        if (pid == 0) {
                struct hub_store *s = NULL;
                if (open_store(dir, &s) < 0)
                        _exit(1);
                wait_sql(s, "INSERT INTO meta VALUES ('before-crash', 'x')");
                _exit(0); /* no hub_store_close(): like kill -9 */
        }
        int status;
        ASSERT_EQ(waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void test_unclean(void) {
        const char *dir = new_state_dir("unclean");
        struct hub_store *s = NULL;

        ASSERT_OK(open_store(dir, &s));
        wait_sql(s, "CREATE TABLE filler (x)");
        wait_sql(s, "INSERT INTO filler WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3000)"
                    " SELECT randomblob(40) FROM c");
        hub_store_close(s);

        crash_after_write(dir);

        progress_calls = 0;
        ASSERT_OK(open_store_ex(dir, &step_clock, false, on_progress, &progress_calls, 0, &s));
        ASSERT_TRUE(hub_store_was_unclean(s));
        ASSERT_TRUE(progress_calls > 0); /* quick_check ran and reported progress */
        /* The committed write survived the crash. */
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT count(*) FROM meta WHERE key = 'before-crash'"), 1);
        hub_store_close(s);

        /* Clean close: no check next time... */
        progress_calls = 0;
        ASSERT_OK(open_store_ex(dir, &step_clock, false, on_progress, &progress_calls, 0, &s));
        ASSERT_FALSE(hub_store_was_unclean(s));
        ASSERT_EQ(progress_calls, 0);
        hub_store_close(s);
        /* ...unless forced. */
        ASSERT_OK(open_store_ex(dir, &step_clock, true, on_progress, &progress_calls, 0, &s));
        ASSERT_FALSE(hub_store_was_unclean(s));
        ASSERT_TRUE(progress_calls > 0);
        hub_store_close(s);

        /* A damaged page is caught by the check after an unclean stop. */
        char path[4300];
        size_t n;
        db_path(dir, path, sizeof path);
        sql_on_file(path, "UPDATE meta SET value = '0' WHERE key = 'clean_shutdown'; PRAGMA wal_checkpoint(TRUNCATE);");
        _cleanup_free_ uint8_t *db = read_all(path, &n);
        int64_t filler_root;
        {
                sqlite3 *h = NULL;
                ASSERT_EQ(sqlite3_open(path, &h), SQLITE_OK);
                filler_root = query_int(h, "SELECT rootpage FROM sqlite_master WHERE name = 'filler'");
                sqlite3_close(h);
        }
        ASSERT_TRUE((size_t) filler_root * 4096 <= n);
        /* Scribble over the filler table's root page header (an interior b-tree page). */
        memset(db + (filler_root - 1) * 4096, 0x6b, 64);
        write_bytes(path, db, n);
        ASSERT_ERR(open_store(dir, &s), -EBADMSG);
        ASSERT_TRUE(strstr(errbuf, path) != NULL);
}

/* ---- grouped commit ------------------------------------------------------------------- */

#define N_THREADS 8
#define N_PER_THREAD 500

struct item {
        int thread, i;
        int done_count;
        int result;
};

static struct hub_store *g_store;
static struct item items[N_THREADS * N_PER_THREAD];

static int write_item(struct hub_store_txn *txn, void *userdata) {
        struct item *it = userdata;
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_prepare_v2(hub_store_txn_db(txn), "INSERT INTO t (thread, i) VALUES (?, ?)", -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_int(st, 1, it->thread);
                sqlite3_bind_int(st, 2, it->i);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
                return hub_store_errno(rc);
        return it->i % 3; /* a non-negative result travels to the completion */
}

static void item_done(int result, void *userdata) {
        struct item *it = userdata;
        it->done_count++;
        it->result = result;
}

static void *submitter(void *arg) {
        int t = (int) (intptr_t) arg;
        for (int i = 0; i < N_PER_THREAD; i++) {
                struct item *it = &items[t * N_PER_THREAD + i];
                it->thread = t;
                it->i = i;
                ASSERT_OK(hub_store_submit(g_store, write_item, item_done, it));
        }
        return NULL;
}

static int dispatch_until(struct hub_store *s, int *counter, int want) {
        int total = 0;
        for (int rounds = 0; *counter < want; rounds++) {
                struct pollfd p = { .fd = hub_store_get_fd(s), .events = POLLIN };
                int r = poll(&p, 1, 10000);
                ASSERT_TRUE(r > 0); /* a completion must come within 10 s */
                ASSERT_TRUE(p.revents & POLLIN);
                int n = hub_store_dispatch(s);
                ASSERT_TRUE(n >= 0);
                total += n;
                ASSERT_TRUE(rounds < 100000);
        }
        return total;
}

static int completions;
static void count_done(int result, void *userdata) {
        (void) result;
        (void) userdata;
        completions++;
}

static void test_grouped_commit(void) {
        const char *dir = new_state_dir("group");
        pthread_t th[N_THREADS];
        struct hub_store_stats st;

        ASSERT_OK(open_store(dir, &g_store));
        wait_sql(g_store, "CREATE TABLE t (thread INTEGER NOT NULL, i INTEGER NOT NULL, PRIMARY KEY (thread, i))");

        for (int t = 0; t < N_THREADS; t++)
                ASSERT_EQ(pthread_create(&th[t], NULL, submitter, (void *) (intptr_t) t), 0);

        /* Completions arrive through the fd while the submitters still run. */
        int done = 0;
        while (done < N_THREADS * N_PER_THREAD) {
                struct pollfd p = { .fd = hub_store_get_fd(g_store), .events = POLLIN };
                ASSERT_TRUE(poll(&p, 1, 10000) == 1);
                done += hub_store_dispatch(g_store);
        }
        for (int t = 0; t < N_THREADS; t++)
                ASSERT_EQ(pthread_join(th[t], NULL), 0);

        ASSERT_EQ(done, N_THREADS * N_PER_THREAD);
        ASSERT_EQ(hub_store_dispatch(g_store), 0); /* nothing twice */
        for (size_t k = 0; k < ELEMENTSOF(items); k++) {
                ASSERT_EQ(items[k].done_count, 1);
                ASSERT_EQ(items[k].result, items[k].i % 3);
        }
        ASSERT_EQ(query_int(hub_store_read_db(g_store), "SELECT count(*) FROM t"), N_THREADS * N_PER_THREAD);
        ASSERT_EQ(query_int(hub_store_read_db(g_store), "SELECT count(DISTINCT thread * 1000 + i) FROM t"),
                  N_THREADS * N_PER_THREAD);

        hub_store_get_stats(g_store, &st);
        fprintf(stderr, "  commits=%llu writes=%llu max_batch=%llu avg_commit=%lluus db=%llu\n",
                (unsigned long long) st.commits, (unsigned long long) st.writes,
                (unsigned long long) st.max_batch,
                (unsigned long long) (st.commits ? st.total_commit_usec / st.commits : 0),
                (unsigned long long) st.db_bytes);
        ASSERT_EQ(st.writes, N_THREADS * N_PER_THREAD + 1);
        ASSERT_TRUE(st.commits < st.writes); /* grouped */
        ASSERT_TRUE(st.max_batch > 1);
        ASSERT_EQ(st.pending, 0);
        ASSERT_EQ(st.failed_commits, 0);
        ASSERT_TRUE(st.db_bytes > 0);

        /* A write without a completion is committed too (close drains it). */
        ASSERT_OK(hub_store_submit(g_store, write_sql, NULL, (void *) "INSERT INTO t VALUES (99, 1)"));
        ASSERT_ERR(hub_store_submit(g_store, NULL, NULL, NULL), -EINVAL);
        hub_store_close(g_store);
        g_store = NULL;

        ASSERT_OK(open_store(dir, &g_store));
        ASSERT_EQ(query_int(hub_store_read_db(g_store), "SELECT count(*) FROM t"), N_THREADS * N_PER_THREAD + 1);
        hub_store_close(g_store);
        g_store = NULL;
}

static uint64_t real_mono_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

/* store.group_interval: a write after a quiet spell commits at once; writes arriving right
 * after a group wait for the interval and then commit as ONE group; a blocking writer cuts
 * the wait short. The interval is long (400 ms) so that a slow, loaded machine cannot blur
 * "at once" and "after the interval". */
static void test_group_interval(void) {
        const char *dir = new_state_dir("pace");
        const uint64_t interval = 400 * USEC_PER_MSEC;
        struct hub_store_options o = {
                .dir = dir, .clock = &fake.clock, .errbuf = errbuf, .errbuf_size = sizeof errbuf,
                .group_interval_usec = interval,
        };
        struct hub_store *s = NULL;
        struct hub_store_stats st0, st1;
        static char sql[20][64];

        ASSERT_OK(hub_store_open(&o, &s));
        wait_sql(s, "CREATE TABLE p (i INTEGER PRIMARY KEY)");
        usleep(interval + 50 * USEC_PER_MSEC); /* a quiet spell */

        /* After the quiet spell: at once. */
        completions = 0;
        uint64_t t0 = real_mono_usec();
        ASSERT_OK(hub_store_submit(s, write_sql, count_done, (void *) "INSERT INTO p VALUES (1)"));
        dispatch_until(s, &completions, 1);
        uint64_t t1 = real_mono_usec();
        fprintf(stderr, "  first write after a quiet spell: %llu us\n", (unsigned long long) (t1 - t0));
        ASSERT_TRUE(t1 - t0 < interval / 2);

        /* Right after that group: twenty writes wait for the interval, then share one commit. */
        hub_store_get_stats(s, &st0);
        completions = 0;
        for (int i = 0; i < 20; i++) {
                snprintf(sql[i], sizeof sql[i], "INSERT INTO p VALUES (%d)", 100 + i);
                ASSERT_OK(hub_store_submit(s, write_sql, count_done, sql[i]));
        }
        dispatch_until(s, &completions, 20);
        uint64_t t2 = real_mono_usec();
        hub_store_get_stats(s, &st1);
        fprintf(stderr, "  20 writes right after a group: committed %llu us after the first one's start, in %llu commit(s)\n",
                (unsigned long long) (t2 - t0), (unsigned long long) (st1.commits - st0.commits));
        ASSERT_TRUE(t2 - t0 >= interval - 20 * USEC_PER_MSEC);
        ASSERT_EQ(st1.commits - st0.commits, 1);
        ASSERT_EQ(st1.last_batch, 20);

        /* A pending write, then a blocking writer right after a group: neither waits. */
        completions = 0;
        ASSERT_OK(hub_store_submit(s, write_sql, count_done, (void *) "INSERT INTO p VALUES (200)"));
        uint64_t t3 = real_mono_usec();
        ASSERT_OK(hub_store_submit_wait(s, write_sql, (void *) "INSERT INTO p VALUES (201)"));
        uint64_t t4 = real_mono_usec();
        fprintf(stderr, "  blocking write right after a group: %llu us\n", (unsigned long long) (t4 - t3));
        ASSERT_TRUE(t4 - t3 < interval / 2);
        dispatch_until(s, &completions, 1);
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT count(*) FROM p"), 23);

        /* 0 turns pacing off on a running store: back-to-back groups again. */
        hub_store_set_group_interval(s, 0);
        completions = 0;
        uint64_t t5 = real_mono_usec();
        ASSERT_OK(hub_store_submit(s, write_sql, count_done, (void *) "INSERT INTO p VALUES (300)"));
        dispatch_until(s, &completions, 1);
        ASSERT_OK(hub_store_submit(s, write_sql, count_done, (void *) "INSERT INTO p VALUES (301)"));
        dispatch_until(s, &completions, 2);
        ASSERT_TRUE(real_mono_usec() - t5 < interval / 2);
        hub_store_close(s);
}

static int after_close_result = 1;
static struct hub_store *close_store;
static void submit_in_close(int result, void *userdata) {
        ASSERT_EQ(result, 0);
        (void) userdata;
        after_close_result = hub_store_submit(close_store, write_sql, count_done, (void *) "SELECT 1");
        /* submit_wait too: refused, does not block */
        ASSERT_ERR(hub_store_submit_wait(close_store, write_sql, (void *) "SELECT 1"), -ESHUTDOWN);
}

static int return_seven(struct hub_store_txn *txn, void *userdata) {
        (void) userdata;
        return txn_exec(txn, "INSERT INTO meta VALUES ('seven', '7')") < 0 ? -EIO : 7;
}

static int nested_wait_result;
static int nested_wait(struct hub_store_txn *txn, void *userdata) {
        nested_wait_result = hub_store_submit_wait(userdata, write_sql, (void *) "SELECT 1");
        return 0;
}

static void test_submit_wait_and_shutdown(void) {
        const char *dir = new_state_dir("wait");
        struct hub_store *s = NULL;

        ASSERT_OK(open_store(dir, &s));
        ASSERT_ERR(hub_store_submit_wait(s, return_seven, NULL), 7);
        /* Visible to the read connection as soon as it returned. */
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT value FROM meta WHERE key = 'seven'"), 7);
        /* The write's own error, and a failing statement's mapped errno. */
        ASSERT_ERR(hub_store_submit_wait(s, write_sql, (void *) "INSERT INTO meta VALUES ('seven', '8')"), -EEXIST);
        ASSERT_ERR(hub_store_submit_wait(s, write_sql, (void *) "SELECT * FROM no_such_table"), -EIO);
        ASSERT_ERR(hub_store_submit_wait(s, nested_wait, s), 0);
        ASSERT_ERR(nested_wait_result, -EDEADLK);
        ASSERT_ERR(hub_store_submit_wait(s, NULL, NULL), -EINVAL);
        /* submit_wait delivers no other completions. */
        completions = 0;
        ASSERT_OK(hub_store_submit(s, write_sql, count_done, (void *) "SELECT 1"));
        ASSERT_OK(hub_store_submit_wait(s, write_sql, (void *) "SELECT 1"));
        ASSERT_EQ(completions, 0);
        dispatch_until(s, &completions, 1);

        /* A completion run by close cannot submit any more. */
        close_store = s;
        ASSERT_OK(hub_store_submit(s, write_sql, submit_in_close, (void *) "SELECT 1"));
        hub_store_close(s);
        ASSERT_ERR(after_close_result, -ESHUTDOWN);
        ASSERT_EQ(completions, 1);
}

/* ---- one failing write in a batch ----------------------------------------------------- */

static volatile int blocker_running, blocker_release;

static int blocker(struct hub_store_txn *txn, void *userdata) {
        __atomic_store_n(&blocker_running, 1, __ATOMIC_SEQ_CST);
        while (!__atomic_load_n(&blocker_release, __ATOMIC_SEQ_CST))
                usleep(1000);
        return txn_exec(txn, "INSERT INTO b VALUES ('blocker')");
}

struct op {
        const char *sql;
        int result, n;
};
static int n_ops_done;

static int write_op(struct hub_store_txn *txn, void *userdata) {
        struct op *o = userdata;
        return txn_exec(txn, o->sql);
}

/* Writes a row, then fails: its row must not stay. */
static int insert_then_fail(struct hub_store_txn *txn, void *userdata) {
        struct op *o = userdata;
        ASSERT_OK(txn_exec(txn, o->sql));
        return -EINVAL;
}

static void op_done(int result, void *userdata) {
        struct op *o = userdata;
        o->result = result;
        o->n++;
        n_ops_done++;
}

/* Submits the blocker and waits until its commit runs (writes submitted now queue up behind
 * it as one group until blocker_release); *st0: the stats at that point. */
static void start_blocker(struct hub_store *s, struct op *block, struct hub_store_stats *st0) {
        blocker_running = blocker_release = 0;
        n_ops_done = 0;
        ASSERT_OK(hub_store_submit(s, blocker, op_done, block));
        while (!__atomic_load_n(&blocker_running, __ATOMIC_SEQ_CST))
                usleep(1000);
        hub_store_get_stats(s, st0);
}

static void test_failing_write_in_batch(void) {
        const char *dir = new_state_dir("batch-fail");
        struct hub_store *s = NULL;
        struct hub_store_stats st0, st1;
        struct op block = { .sql = NULL };
        struct op ops[5] = {
                { .sql = "INSERT INTO b VALUES ('w1')" },
                { .sql = "INSERT INTO b VALUES ('w2')" },
                { .sql = "INSERT INTO b VALUES ('failing')" },
                { .sql = "INSERT INTO b VALUES ('w4')" },
                { .sql = "INSERT INTO b VALUES ('w5')" },
        };

        ASSERT_OK(open_store(dir, &s));
        wait_sql(s, "CREATE TABLE b (name TEXT)");

        start_blocker(s, &block, &st0);

        /* These queue up while the blocker's commit runs: they form one group. */
        for (int i = 0; i < 5; i++)
                ASSERT_OK(hub_store_submit(s, i == 2 ? insert_then_fail : write_op, op_done, &ops[i]));
        hub_store_get_stats(s, &st1);
        ASSERT_EQ(st1.pending, 6);
        __atomic_store_n(&blocker_release, 1, __ATOMIC_SEQ_CST);
        dispatch_until(s, &n_ops_done, 6);

        ASSERT_EQ(block.result, 0);
        for (int i = 0; i < 5; i++) {
                ASSERT_EQ(ops[i].n, 1);
                ASSERT_EQ(ops[i].result, i == 2 ? -EINVAL : 0);
        }
        hub_store_get_stats(s, &st1);
        ASSERT_EQ(st1.commits - st0.commits, 2); /* the blocker's group, then the five */
        ASSERT_EQ(st1.last_batch, 5);
        ASSERT_EQ(st1.failed_commits, 0);
        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM b"), 5);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM b WHERE name = 'failing'"), 0);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM b WHERE name IN ('blocker', 'w1', 'w2', 'w4', 'w5')"), 5);
        hub_store_close(s);
}

/* ---- disk full ------------------------------------------------------------------------ */

static int limit_pages(struct hub_store_txn *txn, void *userdata) {
        sqlite3 *db = hub_store_txn_db(txn);
        char sql[96];

        /* Caps the database at its current size: SQLITE_FULL for anything that needs a page. */
        snprintf(sql, sizeof sql, "PRAGMA max_page_count = %lld", (long long) query_int(db, "PRAGMA page_count"));
        return txn_exec(txn, sql);
}

static int unlimit_pages(struct hub_store_txn *txn, void *userdata) {
        return txn_exec(txn, "PRAGMA max_page_count = 1073741823");
}

static void test_disk_full(void) {
        const char *dir = new_state_dir("full");
        struct hub_store *s = NULL;
        struct op big = { .sql = "INSERT INTO f VALUES ('marker', NULL);"
                                 "INSERT INTO f VALUES ('big', randomblob(1000000))" };
        struct op small = { .sql = "INSERT INTO f VALUES ('small', NULL)" };

        ASSERT_OK(open_store(dir, &s));
        wait_sql(s, "CREATE TABLE f (name TEXT, data BLOB)");
        ASSERT_OK(hub_store_submit_wait(s, limit_pages, NULL));

        n_ops_done = 0;
        ASSERT_OK(hub_store_submit(s, write_op, op_done, &big));
        dispatch_until(s, &n_ops_done, 1);
        ASSERT_ERR(big.result, -ENOSPC);
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT count(*) FROM f"), 0); /* not even the marker */

        /* Still working for what fits, and after space is freed. */
        ASSERT_OK(hub_store_submit(s, write_op, op_done, &small));
        dispatch_until(s, &n_ops_done, 2);
        ASSERT_EQ(small.result, 0);
        ASSERT_OK(hub_store_submit_wait(s, unlimit_pages, NULL));
        big.n = 0;
        ASSERT_OK(hub_store_submit(s, write_op, op_done, &big));
        dispatch_until(s, &n_ops_done, 3);
        ASSERT_EQ(big.result, 0);
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT count(*) FROM f"), 3);
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT length(data) FROM f WHERE name = 'big'"), 1000000);

        /* Disk full in the middle of a group: whether SQLite undoes only the statement or the
         * whole transaction, every completion must tell the truth about its row. */
        wait_sql(s, "DELETE FROM f; CREATE TABLE g (name TEXT)");
        ASSERT_OK(hub_store_submit_wait(s, limit_pages, NULL));
        struct op block = { 0 }, ok1 = { .sql = "INSERT INTO g VALUES ('ok1')" },
                  full = { .sql = "INSERT INTO g VALUES ('full'); INSERT INTO f VALUES ('x', randomblob(4000000))" },
                  ok2 = { .sql = "INSERT INTO g VALUES ('ok2')" };
        struct hub_store_stats st_b;
        wait_sql(s, "CREATE TABLE IF NOT EXISTS b (name TEXT)");
        start_blocker(s, &block, &st_b);
        ASSERT_OK(hub_store_submit(s, write_op, op_done, &ok1));
        ASSERT_OK(hub_store_submit(s, write_op, op_done, &full));
        ASSERT_OK(hub_store_submit(s, write_op, op_done, &ok2));
        __atomic_store_n(&blocker_release, 1, __ATOMIC_SEQ_CST);
        n_ops_done = 0;
        dispatch_until(s, &n_ops_done, 4);
        ASSERT_ERR(full.result, -ENOSPC);
        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM g WHERE name = 'full'"), 0);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM g WHERE name = 'ok1'"), ok1.result == 0);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM g WHERE name = 'ok2'"), ok2.result == 0);
        ASSERT_TRUE(ok1.result == 0 || ok1.result == -ENOSPC);
        ASSERT_TRUE(ok2.result == 0 || ok2.result == -ENOSPC);
        fprintf(stderr, "  mid-group full: ok1=%d ok2=%d\n", ok1.result, ok2.result);
        ASSERT_OK(hub_store_submit_wait(s, unlimit_pages, NULL));
        wait_sql(s, "INSERT INTO g VALUES ('after')");
        hub_store_close(s);
}

/* ---- stall detection ------------------------------------------------------------------ */

static int slow_write(struct hub_store_txn *txn, void *userdata) {
        usleep(700 * 1000);
        return 0;
}

static void test_healthy(void) {
        const char *dir = new_state_dir("stall");
        const struct hub_clock *clk = hub_clock_system();
        struct hub_store *s = NULL;
        struct op o = { 0 };
        bool saw_unhealthy = false;

        ASSERT_OK(open_store_ex(dir, clk, false, NULL, NULL, 200 * USEC_PER_MSEC, &s));
        ASSERT_TRUE(hub_store_healthy(s, hub_clock_mono(clk)));

        n_ops_done = 0;
        ASSERT_OK(hub_store_submit(s, slow_write, op_done, &o));
        for (int i = 0; i < 300 && n_ops_done == 0; i++) {
                if (!hub_store_healthy(s, hub_clock_mono(clk)))
                        saw_unhealthy = true;
                usleep(10 * 1000);
                (void) hub_store_dispatch(s);
        }
        dispatch_until(s, &n_ops_done, 1);
        ASSERT_TRUE(saw_unhealthy);
        ASSERT_TRUE(hub_store_healthy(s, hub_clock_mono(clk)));
        /* Far in the future, but no commit running: still healthy. */
        ASSERT_TRUE(hub_store_healthy(s, hub_clock_mono(clk) + 3600 * USEC_PER_SEC));

        struct hub_store_stats st;
        hub_store_get_stats(s, &st);
        ASSERT_TRUE(st.last_commit_usec >= 600 * USEC_PER_MSEC);
        hub_store_close(s);
}

/* ---- backup --------------------------------------------------------------------------- */

static void test_backup(void) {
        const char *dir = new_state_dir("backup-src");
        char bdir[4300], bpath[4400];
        struct hub_store *s = NULL, *b = NULL;

        ASSERT_OK(open_store(dir, &s));
        wait_sql(s, "CREATE TABLE k (v INTEGER)");
        for (int i = 0; i < 50; i++)
                wait_sql(s, "INSERT INTO k VALUES (1), (2), (3)");

        mkpath(bdir, sizeof bdir, tmp_root, "backup-dst");
        ASSERT_OK(mkdir(bdir, 0700));
        mkpath(bpath, sizeof bpath, bdir, HUB_STORE_FILE_NAME);
        mode_t old = umask(0);
        ASSERT_OK(hub_store_backup(s, bpath));
        umask(old);
        ASSERT_EQ(file_mode(bpath), 0600);
        char tmp[4500];
        snprintf(tmp, sizeof tmp, "%s.tmp", bpath);
        ASSERT_TRUE(access(tmp, F_OK) < 0);

        /* Writes after the backup are not in it. */
        wait_sql(s, "INSERT INTO k VALUES (4)");
        ASSERT_ERR(hub_store_backup(s, "/nonexistent/dir/x.db"), -ENOENT);
        ASSERT_ERR(hub_store_backup(s, NULL), -EINVAL);
        hub_store_close(s);

        /* The copy opens as a store with the same rows. It is a snapshot of a running store,
         * so its clean-shutdown mark is '0' and the restore is checked once. */
        ASSERT_OK(open_store(bdir, &b));
        ASSERT_TRUE(hub_store_was_unclean(b));
        sqlite3 *r = hub_store_read_db(b);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM k"), 150);
        ASSERT_EQ(query_int(r, "SELECT sum(v) FROM k"), 300);
        _cleanup_free_ char *ic = query_text(r, "PRAGMA integrity_check");
        ASSERT_STREQ(ic, "ok");
        hub_store_close(b);
}

/* Writes flagged HUB_STORE_WRITE_SINGLE run without a SAVEPOINT: a failing statement is
 * undone by SQLite alone (here a multi-row INSERT failing on its third row), the others of
 * the group stay, and the group still commits once. */
static void test_single_writes(void) {
        const char *dir = new_state_dir("single");
        struct hub_store *s = NULL;
        struct hub_store_stats st0, st1;
        struct op block = { .sql = NULL };
        struct op ops[5] = {
                { .sql = "INSERT INTO u VALUES ('w1')" },
                { .sql = "INSERT INTO u VALUES ('w2')" },
                { .sql = "INSERT INTO u VALUES ('p1'), ('p2'), ('dup'), ('p3')" },
                { .sql = "UPDATE u SET name = 'w4' WHERE name = 'old'" },
                { .sql = "INSERT INTO u VALUES ('w5')" },
        };

        ASSERT_OK(open_store(dir, &s));
        wait_sql(s, "CREATE TABLE b (name TEXT)");
        wait_sql(s, "CREATE TABLE u (name TEXT UNIQUE); INSERT INTO u VALUES ('dup'), ('old')");
        ASSERT_ERR(hub_store_submit_flags(s, write_op, op_done, &ops[0], 1u << 7), -EINVAL);
        ASSERT_ERR(hub_store_submit_flags(s, NULL, op_done, &ops[0], HUB_STORE_WRITE_SINGLE), -EINVAL);

        start_blocker(s, &block, &st0);
        for (int i = 0; i < 5; i++)
                ASSERT_OK(hub_store_submit_flags(s, write_op, op_done, &ops[i], HUB_STORE_WRITE_SINGLE));
        __atomic_store_n(&blocker_release, 1, __ATOMIC_SEQ_CST);
        dispatch_until(s, &n_ops_done, 6);

        ASSERT_EQ(block.result, 0);
        for (int i = 0; i < 5; i++) {
                ASSERT_EQ(ops[i].n, 1);
                ASSERT_EQ(ops[i].result, i == 2 ? -EEXIST : 0);
        }
        hub_store_get_stats(s, &st1);
        ASSERT_EQ(st1.commits - st0.commits, 2);
        ASSERT_EQ(st1.last_batch, 5);
        ASSERT_EQ(st1.failed_commits, 0);
        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM u WHERE name LIKE 'p%'"), 0);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM u"), 5); /* dup w1 w2 w4 w5 */
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM u WHERE name IN ('dup', 'w1', 'w2', 'w4', 'w5')"), 5);
        hub_store_close(s);

        /* Reopened (and checked): nothing of the failed statement came back. */
        ASSERT_OK(open_store_ex(dir, &fake.clock, true, NULL, NULL, 0, &s));
        ASSERT_EQ(query_int(hub_store_read_db(s), "SELECT count(*) FROM u"), 5);
        hub_store_close(s);
}

/* SQLite's auto-checkpoint is replaced by one between groups: the WAL stays bounded under a
 * stream of commits, and the checkpoints are counted. */
static void test_wal_checkpoint_between_groups(void) {
        const char *dir = new_state_dir("walckpt");
        struct hub_store *s = NULL;
        struct hub_store_stats st;
        struct hub_store_options o = { .dir = dir, .clock = &fake.clock, .errbuf = errbuf,
                                       .errbuf_size = sizeof errbuf, .max_size = 8 * 1024 * 1024 };

        ASSERT_OK(hub_store_open(&o, &s));
        wait_sql(s, "CREATE TABLE w (data BLOB)");
        /* Budget 8 MiB: WAL share 2 MiB, checkpoint at 1 MiB. 200 commits of 20 KB rows,
         * deleted again so the database stays small. */
        for (int i = 0; i < 200; i++) {
                wait_sql(s, "INSERT INTO w VALUES (randomblob(20000))");
                if (i % 10 == 9)
                        wait_sql(s, "DELETE FROM w");
        }
        hub_store_get_stats(s, &st);
        fprintf(stderr, "  wal_checkpoints=%llu wal=%llu db=%llu\n", (unsigned long long) st.wal_checkpoints,
                (unsigned long long) st.wal_bytes, (unsigned long long) st.db_bytes);
        ASSERT_TRUE(st.wal_checkpoints >= 2);
        ASSERT_TRUE(st.wal_bytes <= 2 * 1024 * 1024 + 64 * 1024);
        hub_store_close(s);
}

/* The checkpointer thread: a stream of groups (an in-flight window, as the MQTT front-end
 * keeps one) never stops for long while the WAL is checkpointed on the other connection;
 * the WAL still stays within its share of the budget and starts over, the checkpoints are
 * counted, and a close with a checkpoint possibly in progress is clean and loses nothing. */
struct ckpt_stream {
        unsigned in_flight, ok, failed;
};

struct ckpt_stream_write {
        const char *sql;
        struct ckpt_stream *c;
};

static int ckpt_stream_write(struct hub_store_txn *txn, void *userdata) {
        struct ckpt_stream_write *w = userdata;
        return txn_exec(txn, w->sql);
}

static void ckpt_stream_done(int result, void *userdata) {
        struct ckpt_stream *c = ((struct ckpt_stream_write *) userdata)->c;
        c->in_flight--;
        if (result < 0)
                c->failed++;
        else
                c->ok++;
}

static void test_wal_checkpointer_stream(void) {
        const char *dir = new_state_dir("walstream");
        struct hub_store *s = NULL;
        struct hub_store_stats st;
        struct ckpt_stream c = { 0 };
        struct hub_store_options o = { .dir = dir, .clock = &fake.clock, .errbuf = errbuf,
                                       .errbuf_size = sizeof errbuf, .max_size = 8 * 1024 * 1024 };
        uint64_t max_wal = 0;
        unsigned sent = 0, deletes = 0;
        const unsigned n = 3000;
        struct ckpt_stream_write ins = { "INSERT INTO w VALUES (randomblob(3000))", &c },
                                 del = { "DELETE FROM w; UPDATE total SET n = n + 1", &c };

        ASSERT_OK(hub_store_open(&o, &s));
        wait_sql(s, "CREATE TABLE w (data BLOB)");
        wait_sql(s, "CREATE TABLE total (n INTEGER)");
        wait_sql(s, "INSERT INTO total VALUES (0)");
        /* Budget 8 MiB: WAL share 2 MiB, checkpoint at 1 MiB (256 pages). */
        while (c.ok + c.failed < n) {
                while (sent < n && c.in_flight < 16) {
                        deletes += sent % 100 == 99;
                        ASSERT_OK(hub_store_submit(s, ckpt_stream_write, ckpt_stream_done,
                                                   sent % 100 == 99 ? &del : &ins));
                        sent++;
                        c.in_flight++;
                }
                struct pollfd p = { .fd = hub_store_get_fd(s), .events = POLLIN };
                ASSERT_TRUE(poll(&p, 1, 10000) == 1);
                (void) hub_store_dispatch(s);
                hub_store_get_stats(s, &st);
                max_wal = MAX(max_wal, st.wal_bytes);
        }
        hub_store_get_stats(s, &st);
        fprintf(stderr, "  wal_checkpoints=%llu max wal=%llu db=%llu commits=%llu\n",
                (unsigned long long) st.wal_checkpoints, (unsigned long long) max_wal,
                (unsigned long long) st.db_bytes, (unsigned long long) st.commits);
        ASSERT_EQ(c.failed, 0u);
        ASSERT_TRUE(st.wal_checkpoints >= 4);
        ASSERT_TRUE(max_wal <= 2 * 1024 * 1024 + 64 * 1024);
        ASSERT_TRUE(hub_store_healthy(s, hub_clock_mono(&fake.clock)));
        hub_store_close(s);

        ASSERT_OK(open_store_ex(dir, &fake.clock, true, NULL, NULL, 0, &s));
        ASSERT_TRUE(!hub_store_was_unclean(s));
        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT n FROM total"), (int64_t) deletes);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM w"), (int64_t) (n - deletes * 100));
        hub_store_close(s);
}

/* A store written with schema 4 (the outbox's per-device index, no chunk summaries) migrates
 * to 5 (the index dropped) and 6 (outbox_chunks). */
static void test_migrate_v4_to_v5(void) {
        const char *dir = new_state_dir("v4");
        struct hub_store *s = NULL;
        char path[4300];

        ASSERT_OK(open_store(dir, &s));
        hub_store_close(s);
        db_path(dir, path, sizeof path);
        sql_on_file(path, "CREATE INDEX outbox_by_device ON outbox (device_id, seq);"
                          "DROP TABLE outbox_chunks;"
                          "INSERT INTO outbox VALUES (1, 'd', NULL, 1, 1, 1, 0, 1, x'00');"
                          "UPDATE schema_version SET version = 4;");
        ASSERT_OK(open_store(dir, &s));
        sqlite3 *r = hub_store_read_db(s);
        ASSERT_EQ(query_int(r, "SELECT version FROM schema_version"), 6);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM sqlite_master WHERE name = 'outbox_by_device'"), 0);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM sqlite_master WHERE name = 'outbox_chunks'"), 1);
        ASSERT_EQ(query_int(r, "SELECT count(*) FROM outbox"), 1);
        hub_store_close(s);
}

int main(void) {
        test_tmpdir(tmp_root, sizeof tmp_root);
        hub_fake_clock_init(&fake, UINT64_C(1700000000) * USEC_PER_SEC);

        TEST_RUN(test_create_fresh);
        TEST_RUN(test_migrate_from_v0);
        TEST_RUN(test_newer_schema);
        TEST_RUN(test_corrupt_files);
        TEST_RUN(test_unclean);
        TEST_RUN(test_grouped_commit);
        TEST_RUN(test_group_interval);
        TEST_RUN(test_submit_wait_and_shutdown);
        TEST_RUN(test_failing_write_in_batch);
        TEST_RUN(test_single_writes);
        TEST_RUN(test_wal_checkpoint_between_groups);
        TEST_RUN(test_wal_checkpointer_stream);
        TEST_RUN(test_migrate_v4_to_v5);
        TEST_RUN(test_disk_full);
        TEST_RUN(test_healthy);
        TEST_RUN(test_backup);

        test_rmdir(tmp_root);
        return 0;
}
