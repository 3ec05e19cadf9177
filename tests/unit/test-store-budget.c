/* SPDX-License-Identifier: MIT */
/* The store's disk budget (hub_store_options.max_size) and WAL policy: writes beyond the
 * budget fail with -ENOSPC and are counted, the files stay within the budget, freed pages are
 * reused, the budget is applied again at every open, and an idle store truncates its WAL. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hub/clock.h"
#include "hub/store.h"
#include "store-internal.h"
#include "test-util.h"

#define BUDGET (2u * 1024 * 1024)
#define BLOB 50000

static char tmp_root[4096];
static struct hub_fake_clock fake;

static int open_budget(const char *dir, uint64_t max_size, struct hub_store **ret) {
        static char errbuf[512];
        struct hub_store_options o = {
                .dir = dir, .clock = &fake.clock, .max_size = max_size, .errbuf = errbuf, .errbuf_size = sizeof errbuf,
        };
        return hub_store_open(&o, ret);
}

static int exec_fn(struct hub_store_txn *txn, void *ud) {
        int rc = sqlite3_exec(hub_store_txn_db(txn), ud, NULL, NULL, NULL);
        return rc == SQLITE_OK ? 0 : hub_store_errno(rc);
}

static int insert_blob(struct hub_store *s) {
        return hub_store_submit_wait(s, exec_fn, (void *) "INSERT INTO b VALUES (randomblob(" "50000" "))");
}

static uint64_t file_size(const char *dir, const char *name) {
        char p[4300];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, name);
        return stat(p, &st) == 0 ? (uint64_t) st.st_size : 0;
}

/* Inserts blobs until the budget refuses one; returns how many fitted. */
static unsigned fill(struct hub_store *s) {
        unsigned n = 0;
        int r;
        while ((r = insert_blob(s)) == 0) {
                n++;
                if (n > 1000)
                        TEST_FAIL("the budget never refused a write");
        }
        ASSERT_ERR(r, -ENOSPC);
        return n;
}

static void test_minimum(void) {
        char dir[4200];
        struct hub_store *s = NULL;
        snprintf(dir, sizeof dir, "%s/min", tmp_root);
        ASSERT_ERR(open_budget(dir, HUB_STORE_MAX_SIZE_MIN - 1, &s), -EINVAL);
        ASSERT_NULL(s);
}

static void test_budget(void) {
        char dir[4200];
        struct hub_store *s = NULL;
        struct hub_store_stats st;

        snprintf(dir, sizeof dir, "%s/budget", tmp_root);
        ASSERT_OK(open_budget(dir, BUDGET, &s));
        ASSERT_OK(hub_store_submit_wait(s, exec_fn, (void *) "CREATE TABLE b (data BLOB)"));
        unsigned n1 = fill(s);
        /* 3/4 of 2 MiB for the database: about 31 blobs of 50 kB with the schema. */
        ASSERT_TRUE(n1 >= 20 && n1 <= 32);
        hub_store_get_stats(s, &st);
        ASSERT_EQ(st.max_size, (uint64_t) BUDGET);
        ASSERT_TRUE(st.full_failures >= 1);
        ASSERT_TRUE(file_size(dir, "fieldhub.db") + file_size(dir, "fieldhub.db-wal") <= BUDGET);

        /* The pages of deleted rows are reused: as much fits again, the file does not grow. */
        ASSERT_OK(hub_store_submit_wait(s, exec_fn, (void *) "DELETE FROM b"));
        unsigned n2 = fill(s);
        ASSERT_TRUE(n2 + 1 >= n1);
        ASSERT_TRUE(file_size(dir, "fieldhub.db") + file_size(dir, "fieldhub.db-wal") <= BUDGET);
        ASSERT_TRUE(file_size(dir, "fieldhub.db") <= BUDGET - BUDGET / 4);
        hub_store_close(s);

        /* The budget is applied again at open (it is not persistent in SQLite). */
        ASSERT_OK(open_budget(dir, BUDGET, &s));
        ASSERT_ERR(insert_blob(s), -ENOSPC);
        ASSERT_OK(hub_store_submit_wait(s, exec_fn, (void *) "DELETE FROM b"));
        ASSERT_OK(insert_blob(s));
        hub_store_close(s);

        /* Without a budget the same store takes more. */
        ASSERT_OK(open_budget(dir, 0, &s));
        for (unsigned i = 0; i < n1 + 10; i++)
                ASSERT_OK(insert_blob(s));
        hub_store_close(s);
}

static void test_idle_truncate(void) {
        char dir[4200];
        struct hub_store *s = NULL;
        struct hub_store_stats st;

        snprintf(dir, sizeof dir, "%s/idle", tmp_root);
        ASSERT_OK(open_budget(dir, 64u * 1024 * 1024, &s));
        ASSERT_OK(hub_store_submit_wait(s, exec_fn, (void *) "CREATE TABLE b (data BLOB)"));
        /* One group much larger than the truncation threshold (4 MiB here). */
        ASSERT_OK(hub_store_submit_wait(s, exec_fn,
                                        (void *) "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
                                                 "WHERE i < 120) INSERT INTO b SELECT randomblob(50000) FROM c"));
        ASSERT_TRUE(file_size(dir, "fieldhub.db-wal") > 4u * 1024 * 1024);
        /* After a second without writes the commit thread truncates the WAL. Wait for the
         * counter, not the file: the file is cut before the checkpoint returns and counts. */
        hub_store_get_stats(s, &st);
        for (int i = 0; i < 50 && st.checkpoints == 0; i++) {
                usleep(100 * 1000);
                hub_store_get_stats(s, &st);
        }
        ASSERT_TRUE(st.checkpoints >= 1);
        ASSERT_EQ(file_size(dir, "fieldhub.db-wal"), 0);
        ASSERT_EQ(st.wal_bytes, 0);
        hub_store_close(s);
}

int main(void) {
        test_tmpdir(tmp_root, sizeof tmp_root);
        hub_fake_clock_init(&fake, UINT64_C(1700000000) * USEC_PER_SEC);

        TEST_RUN(test_minimum);
        TEST_RUN(test_budget);
        TEST_RUN(test_idle_truncate);

        test_rmdir(tmp_root);
        return 0;
}
