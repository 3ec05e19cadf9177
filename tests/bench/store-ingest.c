/* SPDX-License-Identifier: MIT */
/* store-ingest: the durable ingest path of hub-core alone (issues 5 and 6), without network,
 * TLS or MQTT: N messages of a given payload size are stamped like the MQTT front-end stamps
 * them (hub_msg + the hub's system properties) and appended to the outbox of a store in a
 * temporary directory on disk, with two route endpoints registered besides `events`. The
 * main thread plays the daemon's event loop: each iteration "reads" a burst of publishes
 * (appends up to the in-flight window), then waits for the store's eventfd and runs
 * hub_store_dispatch() (the completions = the PUBACKs), and calls hub_outbox_gc() about
 * once a second.
 *
 *     store-ingest [-n 200000] [-p 256] [-w 1600] [-b 64] [-d /var/tmp] [-e 2] [-s BYTES] [-r RATE]
 *                  [-g USEC] [-k]
 *
 * -r paces the publishes at RATE messages per second (default: as fast as the window
 * allows, i.e. saturation). Either way, the latency of every message from its append to its
 * completion (= publish -> PUBACK inside the daemon) is recorded, and its p50 / p99 / p99.9 /
 * max are printed (completions run in submission order).
 *
 * -g sets the store's group interval (hub_store_options.group_interval_usec; the daemon's
 * store.group_interval, 2 ms by default there; 0 here unless given).
 *
 * -s gives the store a disk budget and, as the daemon does, the events endpoint a quarter
 * of it as its drop-oldest capacity (use it with -e 0: route endpoints that never
 * acknowledge would fill the budget). -k keeps the state directory.
 *
 * Prints msgs/s, commits, messages per commit, the CPU of the main thread and of the rest
 * of the process (the commit thread), the RSS before and after, and one `RESULT {json}`
 * line. Under callgrind only the ingest loop is instrumented (client requests), so
 *
 *     valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
 *             build/tests/store-ingest -n 20000
 *
 * gives instructions per message as the "Collected" total of each thread's output file
 * (callgrind_annotate FILE | grep 'PROGRAM TOTALS') divided by N. */

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "hub/clock.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/store.h"

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define HAVE_CALLGRIND 1
#endif
#endif
#ifndef HAVE_CALLGRIND
#define CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_STOP_INSTRUMENTATION
#endif

#define N_DEVICES 100

struct bench {
        uint64_t in_flight, completed, failed;
        double *sent_at; /* monotonic send time of each message */
        double *latency; /* its completion latency, in completion order */
};

static double now_sec(clockid_t id);

static void append_done(int result, uint64_t seq, void *ud) {
        struct bench *b = ud;
        (void) seq;
        uint64_t i = b->completed + b->failed;
        b->latency[i] = now_sec(CLOCK_MONOTONIC) - b->sent_at[i];
        b->in_flight--;
        if (result < 0)
                b->failed++;
        else
                b->completed++;
}

static double now_sec(clockid_t id) {
        struct timespec ts;
        clock_gettime(id, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* CPU seconds of every thread of this process but the calling one. */
static double other_threads_cpu(void) {
        long self = (long) syscall(SYS_gettid), hz = sysconf(_SC_CLK_TCK);
        double total = 0;
        DIR *d = opendir("/proc/self/task");
        struct dirent *de;

        if (!d)
                return 0;
        while ((de = readdir(d))) {
                char path[300], buf[1024];
                long tid = strtol(de->d_name, NULL, 10);
                unsigned long long ut = 0, st = 0;
                FILE *f;

                if (tid <= 0 || tid == self)
                        continue;
                snprintf(path, sizeof path, "/proc/self/task/%ld/stat", tid);
                f = fopen(path, "re");
                if (!f)
                        continue;
                if (fgets(buf, sizeof buf, f)) {
                        char *p = strrchr(buf, ')');
                        /* fields after the name: state(3) ... utime(14) stime(15) */
                        if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) == 2)
                                total += (double) (ut + st) / (double) hz;
                }
                fclose(f);
        }
        closedir(d);
        return total;
}

static long status_kib(const char *key) {
        char line[256];
        long v = -1;
        size_t n = strlen(key);
        FILE *f = fopen("/proc/self/status", "re");

        if (!f)
                return -1;
        while (fgets(line, sizeof line, f))
                if (strncmp(line, key, n) == 0 && line[n] == ':') {
                        v = strtol(line + n + 1, NULL, 10);
                        break;
                }
        fclose(f);
        return v;
}

static int make_msg(const uint8_t *payload, size_t len, unsigned dev, struct hub_msg **ret) {
        struct hub_msg *m = NULL;
        char id[32], t[32];
        int r;

        r = hub_msg_new(payload, len, HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0)
                return r;
        snprintf(id, sizeof id, "bench-%06u", dev);
        /* As gateway/front/mqtt.c stamp() does. */
        if ((r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, id)) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_AUTH_GENERATION_ID, "638370000000000000")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_AUTH_METHOD,
                                 "{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\"}")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "Telemetry")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME,
                                 hub_time_format_iso8601(hub_clock_now(hub_clock_system()), t))) < 0) {
                hub_msg_unref(m);
                return r;
        }
        *ret = m;
        return 0;
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;
        return x < y ? -1 : x > y;
}

static double pct(const double *sorted, uint64_t n, double p) {
        uint64_t i = (uint64_t) (p * (double) (n - 1) + 0.5);
        return sorted[MIN(i, n - 1)];
}

static void usage(void) {
        fprintf(stderr, "usage: store-ingest [-n messages] [-p payload] [-w window] [-b burst] [-d dir] "
                        "[-e endpoints] [-s store-budget-bytes] [-r msgs-per-s] [-g group-interval-usec] [-k]\n");
}

static void rm_rf(const char *dir) {
        static const char *const files[] = { "fieldhub.db", "fieldhub.db-wal", "fieldhub.db-shm",
                                             "fieldhub.lock", "fieldhub.reserve" };
        char p[4096];

        for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
                snprintf(p, sizeof p, "%s/%s", dir, files[i]);
                (void) unlink(p);
        }
        (void) rmdir(dir);
}

int main(int argc, char **argv) {
        uint64_t n = 200000, window = 1600, burst = 64, budget = 0, group_interval = 0;
        double pace = 0; /* messages per second, 0 = unpaced */
        size_t payload = 256;
        unsigned n_eps = 2;
        const char *base = "/var/tmp";
        bool keep = false;
        char dir[4096], errbuf[512] = "";
        struct hub_store *store = NULL;
        struct hub_outbox *ob = NULL;
        struct bench b = { 0 };
        int opt, r;

        while ((opt = getopt(argc, argv, "n:p:w:b:d:e:s:r:g:kh")) != -1)
                switch (opt) {
                case 'n': n = strtoull(optarg, NULL, 10); break;
                case 'p': payload = strtoull(optarg, NULL, 10); break;
                case 'w': window = strtoull(optarg, NULL, 10); break;
                case 'b': burst = strtoull(optarg, NULL, 10); break;
                case 'd': base = optarg; break;
                case 'e': n_eps = (unsigned) strtoul(optarg, NULL, 10); break;
                case 's': budget = strtoull(optarg, NULL, 10); break;
                case 'r': pace = strtod(optarg, NULL); break;
                case 'g': group_interval = strtoull(optarg, NULL, 10); break;
                case 'k': keep = true; break;
                default: usage(); return 2;
                }
        if (n == 0 || window == 0 || burst == 0 || payload > HUB_MSG_D2C_MAX_SIZE || pace < 0) {
                usage();
                return 2;
        }

        snprintf(dir, sizeof dir, "%s/store-ingest.XXXXXX", base);
        if (!mkdtemp(dir)) {
                fprintf(stderr, "mkdtemp %s: %m\n", dir);
                return 1;
        }
        struct hub_store_options so = {
                .dir = dir, .clock = hub_clock_system(), .errbuf = errbuf, .errbuf_size = sizeof errbuf,
                .max_size = budget, .group_interval_usec = group_interval,
        };
        r = hub_store_open(&so, &store);
        if (r < 0) {
                fprintf(stderr, "store: %s\n", errbuf);
                rm_rf(dir);
                return 1;
        }
        struct hub_outbox_options oo = {
                .store = store, .clock = hub_clock_system(), .boot_id = "store-ingest-boot",
                .clock_synchronized = true,
                .events = { .max_bytes = budget / 4, .overflow = HUB_OUTBOX_DROP_OLDEST },
        };
        r = hub_outbox_new(&oo, &ob);
        if (r < 0) {
                fprintf(stderr, "outbox: %s\n", strerror(-r));
                hub_store_close(store);
                rm_rf(dir);
                return 1;
        }
        for (unsigned i = 0; i < n_eps; i++) {
                char name[32];
                snprintf(name, sizeof name, "route-%u", i);
                r = hub_outbox_endpoint_open(ob, name, NULL, NULL);
                if (r < 0) {
                        fprintf(stderr, "endpoint %s: %s\n", name, strerror(-r));
                        return 1;
                }
        }

        uint8_t *body = malloc(payload ? payload : 1);
        if (!body)
                return 1;
        for (size_t i = 0; i < payload; i++)
                body[i] = (uint8_t) ('a' + i % 26);
        b.sent_at = calloc(n, sizeof *b.sent_at);
        b.latency = calloc(n, sizeof *b.latency);
        if (!b.sent_at || !b.latency)
                return 1;

        struct hub_store_stats s0, s1;
        hub_store_get_stats(store, &s0);
        long rss0 = status_kib("VmRSS");
        double other0 = other_threads_cpu();
        double cpu0 = now_sec(CLOCK_THREAD_CPUTIME_ID), t0 = now_sec(CLOCK_MONOTONIC), last_gc = t0;
        uint64_t sent = 0, iterations = 0;

        CALLGRIND_START_INSTRUMENTATION;
        while (b.completed + b.failed < n) {
                /* A burst of publishes read from the sockets, within the in-flight window. */
                uint64_t due = n;
                if (pace > 0) {
                        double el = now_sec(CLOCK_MONOTONIC) - t0;
                        due = MIN(n, (uint64_t) (el * pace) + 1);
                }
                for (uint64_t k = 0; k < burst && sent < due && b.in_flight < window; k++) {
                        struct hub_msg *m = NULL;
                        b.sent_at[sent] = now_sec(CLOCK_MONOTONIC);
                        r = make_msg(body, payload, (unsigned) (sent % N_DEVICES), &m);
                        if (r >= 0) {
                                r = hub_outbox_append(ob, m, append_done, &b);
                                hub_msg_unref(m);
                        }
                        if (r < 0) {
                                fprintf(stderr, "append %" PRIu64 ": %s\n", sent, strerror(-r));
                                return 1;
                        }
                        sent++;
                        b.in_flight++;
                }
                /* Then the loop polls: blocks only when nothing else could be done. */
                struct pollfd p = { .fd = hub_store_get_fd(store), .events = POLLIN };
                bool can_send = sent < n && b.in_flight < window;
                struct timespec tmo = { .tv_sec = can_send ? 0 : 1 };
                if (can_send && pace > 0) {
                        /* Sleep until the next message is due (or a completion arrives). */
                        double wait = t0 + (double) sent / pace - now_sec(CLOCK_MONOTONIC);
                        if (wait > 0)
                                tmo.tv_nsec = (long) (MIN(wait, 0.999) * 1e9);
                }
                if (ppoll(&p, 1, &tmo, NULL) < 0 && errno != EINTR) {
                        fprintf(stderr, "poll: %m\n");
                        return 1;
                }
                if (p.revents & POLLIN)
                        (void) hub_store_dispatch(store);
                iterations++;
                if ((iterations & 63) == 0) {
                        double now = now_sec(CLOCK_MONOTONIC);
                        if (now - last_gc >= 1.0) {
                                (void) hub_outbox_gc(ob, NULL, NULL);
                                last_gc = now;
                        }
                }
        }
        CALLGRIND_STOP_INSTRUMENTATION;

        double t1 = now_sec(CLOCK_MONOTONIC), cpu1 = now_sec(CLOCK_THREAD_CPUTIME_ID);
        double other1 = other_threads_cpu();
        long rss1 = status_kib("VmRSS"), hwm = status_kib("VmHWM");
        hub_store_get_stats(store, &s1);
        struct hub_outbox_stats os;
        hub_outbox_get_stats(ob, &os);

        uint64_t commits = s1.commits - s0.commits;
        qsort(b.latency, n, sizeof *b.latency, cmp_double);
        double l50 = pct(b.latency, n, 0.50) * 1e3, l99 = pct(b.latency, n, 0.99) * 1e3,
               l999 = pct(b.latency, n, 0.999) * 1e3, lmax = b.latency[n - 1] * 1e3;
        double secs = t1 - t0;
        double rate = (double) n / secs;
        fprintf(stderr,
                "store-ingest: %" PRIu64 " messages of %zu B (%" PRIu64 " failed) in %.2f s: %.0f msg/s\n"
                "  commits %" PRIu64 ", %.1f messages per commit, store writes %" PRIu64 ", max batch %" PRIu64
                ", avg commit %.0f us\n"
                "  CPU: main thread %.2f s (%.2f us/msg), other threads (commit) %.2f s (%.2f us/msg)\n"
                "  RSS %ld KiB before, %ld KiB after (%+.1f B/msg), peak %ld KiB; WAL %" PRIu64 " B, db %" PRIu64
                " B, stored %" PRIu64 " msgs\n",
                n, payload, b.failed, secs, rate, commits, commits ? (double) n / (double) commits : 0.0,
                s1.writes - s0.writes, s1.max_batch,
                commits ? (double) (s1.total_commit_usec - s0.total_commit_usec) / (double) commits : 0.0,
                cpu1 - cpu0, (cpu1 - cpu0) * 1e6 / (double) n, other1 - other0, (other1 - other0) * 1e6 / (double) n,
                rss0, rss1, (double) (rss1 - rss0) * 1024.0 / (double) n, hwm, s1.wal_bytes, s1.db_bytes,
                os.stored_count);
        fprintf(stderr,
                "  append->completion latency: p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms; WAL checkpoints %" PRIu64
                "\n",
                l50, l99, l999, lmax, s1.wal_checkpoints - s0.wal_checkpoints);
        printf("RESULT {\"messages\":%" PRIu64 ",\"payload\":%zu,\"window\":%" PRIu64 ",\"seconds\":%.3f,"
               "\"msgs_per_s\":%.0f,\"commits\":%" PRIu64 ",\"msgs_per_commit\":%.1f,\"main_cpu_us_per_msg\":%.2f,"
               "\"commit_cpu_us_per_msg\":%.2f,\"rss_kib_before\":%ld,\"rss_kib_after\":%ld,\"failed\":%" PRIu64
               ",\"rate\":%.0f,\"lat_p50_ms\":%.3f,\"lat_p99_ms\":%.3f,\"lat_p999_ms\":%.3f,\"lat_max_ms\":%.3f,"
               "\"wal_checkpoints\":%" PRIu64 "}\n",
               n, payload, window, secs, rate, commits, commits ? (double) n / (double) commits : 0.0,
               (cpu1 - cpu0) * 1e6 / (double) n, (other1 - other0) * 1e6 / (double) n, rss0, rss1, b.failed, pace, l50, l99, l999, lmax,
               s1.wal_checkpoints - s0.wal_checkpoints);

        free(body);
        free(b.sent_at);
        free(b.latency);
        hub_outbox_free(ob);
        hub_store_close(store);
        if (!keep)
                rm_rf(dir);
        else
                fprintf(stderr, "  kept %s\n", dir);
        return b.failed ? 1 : 0;
}
