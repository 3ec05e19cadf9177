/* SPDX-License-Identifier: MIT */
/* paho-pub: raw paho.mqtt.c (MQTTAsync) -> broker, QoS 1, for by-hand benchmarks
 * (tests/bench/README.md, bench-outbox.sh): the baseline issue 6 names for the outbox ingest,
 * "raw paho -> mosquitto QoS 1 with the same window".
 *
 * N MQTTAsync clients (MQTTCLIENT_PERSISTENCE_NONE, clean session, maxInflight = window),
 * each keeping `window` QoS 1 PUBLISHes of `payload` bytes in flight: a publish's success
 * callback (its PUBACK) sends the next one from the same slot, so every slot keeps its send
 * time (latency = MQTTAsync_send() -> success callback). With --cafile the clients use TLS
 * (trust store = that CA, server certificate verified, --ciphers forced, TLS 1.2). With
 * --hub/--key every client connects as an IoT Hub device (client id `<prefix>NNNNNN`, user
 * name `<hub>/<id>/?api-version=2021-04-12`, a SAS token as password) and publishes to
 * `devices/<id>/messages/events/`, byte-identical to tests/bench/mqtt-load.c's traffic.
 *
 * paho runs all clients of a process on its own two threads (send and receive); --procs P
 * forks P processes, each with its share of the connections, when one pair is the limit.
 *
 * Output: a human summary on stderr and one line "RESULT {json}" on stdout, with the same
 * keys as mqtt-load's (msgs_per_sec, p50_ms, p99_ms, gen_cores, server_cores,
 * server_us_per_msg, other_cores). Exit 0 when the run was clean, 1 when connections failed
 * or were lost, 2 on usage errors. */

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <MQTTAsync.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "bench-common.h"


enum phase { PH_CONNECT, PH_WARMUP, PH_MEASURE, PH_STOP };

/* Shared between the forked processes (an anonymous shared mapping). */
struct shared {
        _Atomic int phase;
        _Atomic uint64_t connected, failed, lost, sent, acked, errors;
        _Atomic uint64_t hist[HIST_BUCKETS];
};

struct client;

struct slot {
        struct client *c;
        uint64_t t_sent; /* usec, monotonic */
};

struct client {
        MQTTAsync h;
        unsigned idx;
        char id[64], topic[160];
        struct slot *slots;
        _Atomic bool up;
};

static struct {
        const char *host, *cafile, *ciphers, *hub, *prefix;
        unsigned port, connections, window, payload, procs;
        double duration, warmup;
        int server_pid, sas_ttl;
        char *key_raw;
        size_t key_len;
        const char *topic_fmt;
} o = {
        .host = "127.0.0.1", .prefix = "bench-", .connections = 100, .window = 16, .payload = 256, .procs = 1,
        .duration = 10, .warmup = 2, .sas_ttl = 86400,
};

static struct shared *sh;
static char *payload_bytes;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        fputs("paho-pub: ", stderr);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        exit(2);
}

static uint64_t now_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static void sas_token(const char *dev, char *out, size_t size) {
        if (!bench_sas_token(o.hub, o.key_raw, (int) o.key_len, o.sas_ttl, dev, out, size))
                die("HMAC failed");
}

/* ---- publishing (paho's threads) ---------------------------------------------------------- */

static void on_pub_ok(void *context, MQTTAsync_successData *resp);
static void on_pub_fail(void *context, MQTTAsync_failureData *resp);

static void send_slot(struct slot *s) {
        MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
        ro.onSuccess = on_pub_ok;
        ro.onFailure = on_pub_fail;
        ro.context = s;
        s->t_sent = now_usec();
        int r = MQTTAsync_send(s->c->h, s->c->topic, (int) o.payload, payload_bytes, 1, 0, &ro);
        if (r != MQTTASYNC_SUCCESS)
                atomic_fetch_add(&sh->errors, 1);
        else
                atomic_fetch_add(&sh->sent, 1);
}

static void on_pub_ok(void *context, MQTTAsync_successData *resp) {
        struct slot *s = context;
        int ph = atomic_load(&sh->phase);
        if (ph == PH_MEASURE) {
                atomic_fetch_add(&sh->acked, 1);
                atomic_fetch_add(&sh->hist[hist_index(now_usec() - s->t_sent)], 1);
        }
        if (ph != PH_STOP)
                send_slot(s);
}

static void on_pub_fail(void *context, MQTTAsync_failureData *resp) {
        atomic_fetch_add(&sh->errors, 1);
}

static void on_connected(void *context, MQTTAsync_successData *resp) {
        struct client *c = context;
        atomic_store(&c->up, true);
        atomic_fetch_add(&sh->connected, 1);
}

static void on_connect_failed(void *context, MQTTAsync_failureData *resp) {
        atomic_fetch_add(&sh->failed, 1);
        fprintf(stderr, "paho-pub: connect failed (code %d%s%s)\n", resp ? resp->code : -1,
                resp && resp->message ? ": " : "", resp && resp->message ? resp->message : "");
}

static void on_lost(void *context, char *cause) {
        struct client *c = context;
        if (atomic_load(&sh->phase) != PH_STOP) {
                atomic_fetch_add(&sh->lost, 1);
                fprintf(stderr, "paho-pub: %s: connection lost (%s)\n", c->id, cause ? cause : "?");
        }
}

static int on_arrived(void *context, char *topic, int topic_len, MQTTAsync_message *msg) {
        MQTTAsync_freeMessage(&msg);
        MQTTAsync_free(topic);
        return 1;
}

/* ---- one process: its share of the clients ------------------------------------------------ */

/* The topic template with every {deviceId} replaced by id. */
static void expand_topic(const char *tmpl, const char *id, char *out, size_t size) {
        size_t n = 0, il = strlen(id);
        for (const char *p = tmpl; *p && n + 1 < size;) {
                if (strncmp(p, "{deviceId}", 10) == 0 && n + il + 1 < size) {
                        memcpy(out + n, id, il);
                        n += il;
                        p += 10;
                } else
                        out[n++] = *p++;
        }
        out[n] = 0;
}

static void run_clients(unsigned first, unsigned n) {
        struct client *cs = calloc(n, sizeof *cs);
        char uri[300];
        if (!cs)
                die("out of memory");
        snprintf(uri, sizeof uri, "%s://%s:%u", o.cafile ? "ssl" : "tcp", o.host, o.port);
        for (unsigned i = 0; i < n; i++) {
                struct client *c = &cs[i];
                MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
                MQTTAsync_connectOptions cn = MQTTAsync_connectOptions_initializer;
                MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
                char user[512], pass[1400];
                c->idx = first + i;
                snprintf(c->id, sizeof c->id, "%s%06u", o.prefix, c->idx);
                expand_topic(o.topic_fmt ? o.topic_fmt : "devices/{deviceId}/messages/events/", c->id, c->topic,
                             sizeof c->topic);
                c->slots = calloc(o.window, sizeof *c->slots);
                if (!c->slots)
                        die("out of memory");
                for (unsigned k = 0; k < o.window; k++)
                        c->slots[k].c = c;
                co.maxBufferedMessages = (int) o.window;
                if (MQTTAsync_createWithOptions(&c->h, uri, c->id, MQTTCLIENT_PERSISTENCE_NONE, NULL, &co) !=
                    MQTTASYNC_SUCCESS)
                        die("MQTTAsync_create(%s) failed", uri);
                /* As fieldhubd's mqtt endpoint does (endpoint-mqtt.c): paho's in-memory packet
                 * trace off unless the environment asks for it. Same library setup for both. */
                if (!getenv("MQTT_C_CLIENT_TRACE") && !getenv("MQTT_C_CLIENT_TRACE_LEVEL"))
                        MQTTAsync_setTraceLevel(MQTTASYNC_TRACE_ERROR);
                MQTTAsync_setCallbacks(c->h, c, on_lost, on_arrived, NULL);
                cn.keepAliveInterval = 60;
                cn.cleansession = 1;
                cn.maxInflight = (int) o.window;
                cn.connectTimeout = 30;
                cn.onSuccess = on_connected;
                cn.onFailure = on_connect_failed;
                cn.context = c;
                if (o.hub) {
                        snprintf(user, sizeof user, "%s/%s/?api-version=2021-04-12", o.hub, c->id);
                        sas_token(c->id, pass, sizeof pass);
                        cn.username = user;
                        cn.password = pass;
                }
                if (o.cafile) {
                        ssl.trustStore = o.cafile;
                        ssl.enableServerCertAuth = 1;
                        ssl.verify = 1;
                        ssl.sslVersion = MQTT_SSL_VERSION_TLS_1_2;
                        ssl.enabledCipherSuites = o.ciphers;
                        cn.ssl = &ssl;
                }
                /* paho copies what it needs from the options during the call. */
                if (MQTTAsync_connect(c->h, &cn) != MQTTASYNC_SUCCESS)
                        die("MQTTAsync_connect failed");
        }
        /* Wait until every client answered, then fill the windows. */
        uint64_t deadline = now_usec() + 60 * 1000000u;
        while (atomic_load(&sh->connected) + atomic_load(&sh->failed) < o.connections && now_usec() < deadline)
                usleep(10000);
        while (atomic_load(&sh->phase) == PH_CONNECT)
                usleep(1000);
        for (unsigned i = 0; i < n; i++)
                if (atomic_load(&cs[i].up))
                        for (unsigned k = 0; k < o.window; k++)
                                send_slot(&cs[i].slots[k]);
        while (atomic_load(&sh->phase) != PH_STOP)
                usleep(10000);
        usleep(100000); /* let the last callbacks see PH_STOP */
        for (unsigned i = 0; i < n; i++) {
                MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
                d.timeout = 100;
                (void) MQTTAsync_disconnect(cs[i].h, &d);
        }
        usleep(200000);
        for (unsigned i = 0; i < n; i++) {
                MQTTAsync_destroy(&cs[i].h);
                free(cs[i].slots);
        }
        free(cs);
}

/* ---- measurement ---------------------------------------------------------------------------- */

static double pid_cpu(int pid) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
        FILE *f = fopen(path, "re");
        if (!f)
                return 0;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        unsigned long long ut = 0, st = 0;
        if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
                return 0;
        return (double) (ut + st) / (double) sysconf(_SC_CLK_TCK);
}

static double machine_busy(void) {
        FILE *f = fopen("/proc/stat", "re");
        unsigned long long v[10] = { 0 };
        if (!f)
                return 0;
        int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                       &v[5], &v[6], &v[7], &v[8], &v[9]);
        fclose(f);
        if (n < 8)
                return 0;
        return (double) (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double) sysconf(_SC_CLK_TCK);
}

static double procs_cpu(const pid_t *pids, unsigned n) {
        double s = 0;
        for (unsigned i = 0; i < n; i++)
                s += pid_cpu(pids[i]);
        return s;
}

static void usage(void) {
        fputs("usage: paho-pub --port P [--host 127.0.0.1] [--cafile CA [--ciphers LIST]] [--hub HOST --key BASE64]\n"
              "                [--prefix bench-] [--topic devices/{deviceId}/messages/events/] [--connections 100] [--window 16]\n"
              "                [--payload 256] [--duration 10] [--warmup 2] [--procs 1] [--server-pid PID]\n",
              stderr);
        exit(2);
}

static unsigned parse_uint(const char *s, const char *what) {
        char *end;
        errno = 0;
        unsigned long v = strtoul(s, &end, 10);
        if (errno || !*s || *end || v > 10000000)
                die("bad %s: %s", what, s);
        return (unsigned) v;
}

int main(int argc, char **argv) {
        static const struct option opts[] = {
                { "host", 1, NULL, 'H' },        { "port", 1, NULL, 'p' },    { "cafile", 1, NULL, 'c' },
                { "ciphers", 1, NULL, 'C' },     { "hub", 1, NULL, 'h' },     { "key", 1, NULL, 'k' },
                { "prefix", 1, NULL, 'x' },      { "topic", 1, NULL, 't' },   { "connections", 1, NULL, 'n' },
                { "window", 1, NULL, 'w' },      { "payload", 1, NULL, 's' }, { "duration", 1, NULL, 'd' },
                { "warmup", 1, NULL, 'W' },      { "procs", 1, NULL, 'P' },   { "server-pid", 1, NULL, 'S' },
                { NULL, 0, NULL, 0 },
        };
        const char *key64 = NULL;
        int c;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 'H': o.host = optarg; break;
                case 'p': o.port = parse_uint(optarg, "port"); break;
                case 'c': o.cafile = optarg; break;
                case 'C': o.ciphers = optarg; break;
                case 'h': o.hub = optarg; break;
                case 'k': key64 = optarg; break;
                case 'x': o.prefix = optarg; break;
                case 't': o.topic_fmt = optarg; break;
                case 'n': o.connections = parse_uint(optarg, "connection count"); break;
                case 'w': o.window = parse_uint(optarg, "window"); break;
                case 's': o.payload = parse_uint(optarg, "payload size"); break;
                case 'd': o.duration = atof(optarg); break;
                case 'W': o.warmup = atof(optarg); break;
                case 'P': o.procs = parse_uint(optarg, "process count"); break;
                case 'S': o.server_pid = (int) parse_uint(optarg, "server pid"); break;
                default: usage();
                }
        }
        if (!o.port || o.port > 65535 || !o.connections || !o.window || o.window > 65535 || !o.procs ||
            o.procs > o.connections || o.duration <= 0 || o.warmup < 0 || optind != argc)
                usage();
        if (!!o.hub != !!key64)
                die("--hub and --key go together");
        if (key64) {
                size_t l = strlen(key64);
                o.key_raw = malloc(l + 4);
                int n = o.key_raw ? EVP_DecodeBlock((unsigned char *) o.key_raw, (const unsigned char *) key64, (int) l) : -1;
                if (n < 0)
                        die("--key is not base64");
                while (l > 0 && key64[l - 1] == '=') {
                        l--;
                        n--;
                }
                o.key_len = (size_t) n;
        }
        payload_bytes = malloc(o.payload + 1);
        if (!payload_bytes)
                die("out of memory");
        for (unsigned i = 0; i < o.payload; i++)
                payload_bytes[i] = (char) ('a' + i % 26);
        sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (sh == MAP_FAILED)
                die("mmap: %s", strerror(errno));

        pid_t *pids = calloc(o.procs, sizeof *pids);
        if (!pids)
                die("out of memory");
        for (unsigned p = 0; p < o.procs; p++) {
                unsigned first = o.connections * p / o.procs, last = o.connections * (p + 1) / o.procs;
                pid_t pid = fork();
                if (pid < 0)
                        die("fork: %s", strerror(errno));
                if (pid == 0) {
                        run_clients(first, last - first);
                        _exit(0);
                }
                pids[p] = pid;
        }
        uint64_t t_conn = now_usec();
        while (atomic_load(&sh->connected) + atomic_load(&sh->failed) < o.connections &&
               now_usec() - t_conn < 60 * 1000000u)
                usleep(10000);
        double connect_sec = (double) (now_usec() - t_conn) / 1e6;
        atomic_store(&sh->phase, PH_WARMUP);
        usleep((useconds_t) (o.warmup * 1e6));
        double busy0 = machine_busy(), self0 = procs_cpu(pids, o.procs), srv0 = o.server_pid ? pid_cpu(o.server_pid) : 0;
        uint64_t sent0 = atomic_load(&sh->sent), t0 = now_usec();
        atomic_store(&sh->phase, PH_MEASURE);
        usleep((useconds_t) (o.duration * 1e6));
        atomic_store(&sh->phase, PH_STOP);
        uint64_t t1 = now_usec(), acked = atomic_load(&sh->acked), sent1 = atomic_load(&sh->sent);
        double busy1 = machine_busy(), self1 = procs_cpu(pids, o.procs), srv1 = o.server_pid ? pid_cpu(o.server_pid) : 0;
        for (unsigned p = 0; p < o.procs; p++)
                waitpid(pids[p], NULL, 0);

        double secs = (double) (t1 - t0) / 1e6, rate = (double) acked / secs;
        uint64_t n_lat = 0;
        for (unsigned b = 0; b < HIST_BUCKETS; b++)
                n_lat += atomic_load(&sh->hist[b]);
        double pct[3] = { 0.50, 0.99, 0.999 }, lat_ms[3] = { 0 };
        for (int k = 0; k < 3 && n_lat > 0; k++) {
                uint64_t target = (uint64_t) ceil(pct[k] * (double) n_lat), acc = 0;
                for (unsigned b = 0; b < HIST_BUCKETS; b++) {
                        acc += atomic_load(&sh->hist[b]);
                        if (acc >= target) {
                                lat_ms[k] = (double) hist_value(b) / 1000.0;
                                break;
                        }
                }
        }
        double self_cpu = self1 - self0, srv_cpu = srv1 - srv0;
        double other = (busy1 - busy0 - self_cpu - srv_cpu) / secs;
        if (other < 0)
                other = 0;
        uint64_t connected = atomic_load(&sh->connected), failed = atomic_load(&sh->failed),
                 lost = atomic_load(&sh->lost), errors = atomic_load(&sh->errors);
        fprintf(stderr,
                "paho-pub: paho MQTTAsync %s, %u connections in %u process(es), QoS 1, window %u, %u B: "
                "%.0f msg/s acknowledged over %.1f s (sent %.0f msg/s)\n"
                "  latency send->PUBACK p50 %.3f ms, p99 %.3f ms; generator %.2f cores; server %.2f cores "
                "(%.2f us/msg); others %.2f cores; connected %" PRIu64 ", failed %" PRIu64 ", lost %" PRIu64
                ", errors %" PRIu64 "\n",
                o.cafile ? "TLS" : "TCP", o.connections, o.procs, o.window, o.payload, rate, secs,
                (double) (sent1 - sent0) / secs, lat_ms[0], lat_ms[1], self_cpu / secs, srv_cpu / secs,
                acked ? srv_cpu * 1e6 / (double) acked : 0.0, other, connected, failed, lost, errors);
        printf("RESULT {\"connections\":%u,\"connected\":%" PRIu64 ",\"failed\":%" PRIu64 ",\"closed\":%" PRIu64
               ",\"connect_sec\":%.3f,\"qos\":1,\"window\":%u,\"payload\":%u,\"seconds\":%.3f,\"sent\":%" PRIu64
               ",\"acked\":%" PRIu64 ",\"msgs_per_sec\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,"
               "\"gen_cores\":%.3f,\"server_cores\":%.3f,\"server_us_per_msg\":%.3f,\"other_cores\":%.3f,"
               "\"errors\":%" PRIu64 "}\n",
               o.connections, connected, failed, lost, connect_sec, o.window, o.payload, secs, sent1 - sent0, acked,
               rate, lat_ms[0], lat_ms[1], lat_ms[2], self_cpu / secs, o.server_pid ? srv_cpu / secs : 0.0,
               acked ? srv_cpu * 1e6 / (double) acked : 0.0, other, errors);
        free(pids);
        free(payload_bytes);
        free(o.key_raw);
        return failed || lost || connected < o.connections ? 1 : 0;
}
