/* SPDX-License-Identifier: MIT */
/* The gateway's logging module: journald with structured fields, or stderr; per-key rate
 * limiting with suppression reports; secrets masked before anything leaves the process. */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-journal.h>

#include "log-ids.h"
#include "log.h"

#define LOG_LINE_MAX 8192
#define RL_SLOTS 512
#define RL_SAMPLE 160
#define MAX_SECRETS 256

struct rl_slot {
        uint64_t hash;
        uint64_t window_start;
        unsigned count;
        unsigned suppressed;
        int level;
        char sample[RL_SAMPLE];
};

static struct {
        pthread_mutex_t lock;
        bool journal;
        int max_level;
        uint64_t rl_interval;
        unsigned rl_burst;
        struct rl_slot slots[RL_SLOTS];
        char *secrets[MAX_SECRETS];
        size_t n_secrets;
} L = {
        .lock = PTHREAD_MUTEX_INITIALIZER,
        .journal = false,
        .max_level = LOG_INFO,
        .rl_interval = 30 * 1000000ULL,
        .rl_burst = 10,
};

static uint64_t mono_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000ULL + (uint64_t) ts.tv_nsec / 1000;
}

/* JOURNAL_STREAM is "dev:ino" of the stream systemd connected stderr to. It is inherited
 * by children whose stderr goes elsewhere, so only trust it if it matches our stderr. */
static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

void gw_log_setup(enum gw_log_target_kind target, int max_level) {
        pthread_mutex_lock(&L.lock);
        if (target == GW_LOG_TO_JOURNAL)
                L.journal = true;
        else if (target == GW_LOG_TO_STDERR)
                L.journal = false;
        else
                L.journal = stderr_is_journal();
        L.max_level = max_level;
        pthread_mutex_unlock(&L.lock);
}

void gw_log_set_max_level(int level) {
        pthread_mutex_lock(&L.lock);
        L.max_level = level;
        pthread_mutex_unlock(&L.lock);
}

int gw_log_get_max_level(void) {
        pthread_mutex_lock(&L.lock);
        int l = L.max_level;
        pthread_mutex_unlock(&L.lock);
        return l;
}

bool gw_log_to_journal(void) {
        pthread_mutex_lock(&L.lock);
        bool j = L.journal;
        pthread_mutex_unlock(&L.lock);
        return j;
}

void gw_log_set_rate_limit(uint64_t interval_usec, unsigned burst) {
        pthread_mutex_lock(&L.lock);
        L.rl_interval = interval_usec;
        L.rl_burst = burst ? burst : 1;
        pthread_mutex_unlock(&L.lock);
}

int gw_log_add_secret(const char *secret) {
        if (!secret || strlen(secret) < 4) /* too short to mask without mangling text */
                return 0;
        pthread_mutex_lock(&L.lock);
        for (size_t i = 0; i < L.n_secrets; i++)
                if (streq(L.secrets[i], secret)) {
                        pthread_mutex_unlock(&L.lock);
                        return 0;
                }
        if (L.n_secrets >= MAX_SECRETS) {
                pthread_mutex_unlock(&L.lock);
                return -ENOBUFS;
        }
        char *c = strdup(secret);
        if (!c) {
                pthread_mutex_unlock(&L.lock);
                return -ENOMEM;
        }
        L.secrets[L.n_secrets++] = c;
        pthread_mutex_unlock(&L.lock);
        return 0;
}

void gw_log_clear_secrets(void) {
        pthread_mutex_lock(&L.lock);
        for (size_t i = 0; i < L.n_secrets; i++) {
                hub_explicit_bzero(L.secrets[i], strlen(L.secrets[i]));
                free(L.secrets[i]);
        }
        L.n_secrets = 0;
        pthread_mutex_unlock(&L.lock);
}

/* Replaces the n bytes at p by '*' (at most three stars, the rest removed). */
static size_t mask_span(char *p, size_t n) {
        size_t stars = MIN(n, (size_t) 3);
        memset(p, '*', stars);
        memmove(p + stars, p + n, strlen(p + n) + 1);
        return stars;
}

static void mask_after(char *s, const char *marker, bool icase, const char *stop) {
        size_t ml = strlen(marker);
        char *p = s;
        for (;;) {
                char *hit = icase ? strcasestr(p, marker) : strstr(p, marker);
                if (!hit)
                        return;
                char *v = hit + ml;
                size_t n = strcspn(v, stop);
                p = v + (n ? mask_span(v, n) : 0);
        }
}

/* Caller holds L.lock. */
static void scrub_locked(char *s) {
        for (size_t i = 0; i < L.n_secrets; i++) {
                const char *sec = L.secrets[i];
                size_t n = strlen(sec);
                char *p = s;
                while ((p = strstr(p, sec)))
                        p += mask_span(p, n);
        }
        mask_after(s, "sig=", true, "&; \t\r\n\"'");
        mask_after(s, "SharedAccessKey=", true, "; \t\r\n\"'");
        mask_after(s, "\"primaryKey\":\"", false, "\"");
        mask_after(s, "\"secondaryKey\":\"", false, "\"");
        mask_after(s, "\"primaryKey\": \"", false, "\"");
        mask_after(s, "\"secondaryKey\": \"", false, "\"");
}

void gw_log_scrub(char *s) {
        pthread_mutex_lock(&L.lock);
        scrub_locked(s);
        pthread_mutex_unlock(&L.lock);
}

static uint64_t fnv1a(uint64_t h, const char *s) {
        for (; s && *s; s++) {
                h ^= (unsigned char) *s;
                h *= 0x100000001b3ULL;
        }
        return h;
}

static void emit(int level, int error, const char *file, int line, const char *func,
                 const struct gw_log_fields *f, const char *msg);

/* Caller holds L.lock. Returns true when the message may go out. May set *ret_report to a
 * summary of what the previous window suppressed. */
static bool ratelimit_locked(uint64_t h, int level, const char *msg, char *report, size_t report_size,
                             int *ret_report_level) {
        struct rl_slot *s = &L.slots[h % RL_SLOTS];
        uint64_t now = mono_usec();

        report[0] = 0;
        if (s->hash != h || now - s->window_start >= L.rl_interval) {
                if (s->suppressed > 0) {
                        snprintf(report, report_size, "Suppressed %u messages like: %s", s->suppressed,
                                 s->sample);
                        *ret_report_level = s->level;
                }
                s->hash = h;
                s->window_start = now;
                s->count = 0;
                s->suppressed = 0;
                s->level = level;
                size_t l = strnlen(msg, sizeof s->sample - 1);
                memcpy(s->sample, msg, l);
                s->sample[l] = 0;
        }
        if (s->count >= L.rl_burst) {
                s->suppressed++;
                return false;
        }
        s->count++;
        return true;
}

void gw_log_flush_suppressed(void) {
        uint64_t now = mono_usec();
        for (size_t i = 0; i < RL_SLOTS; i++) {
                char report[RL_SAMPLE + 64];
                int level = LOG_INFO;
                report[0] = 0;
                pthread_mutex_lock(&L.lock);
                struct rl_slot *s = &L.slots[i];
                if (s->suppressed > 0 && now - s->window_start >= L.rl_interval) {
                        snprintf(report, sizeof report, "Suppressed %u messages like: %s", s->suppressed,
                                 s->sample);
                        level = s->level;
                        s->suppressed = 0;
                        s->count = 0;
                        s->window_start = now;
                }
                pthread_mutex_unlock(&L.lock);
                if (report[0])
                        emit(level, 0, __FILE__, __LINE__, __func__,
                             GW_FIELDS(.message_id = GW_MSG_LOG_SUPPRESSED,
                                                            .event = "log-suppressed"),
                             report);
        }
}

static const char *field_names[] = {
        "FIELDHUB_COMPONENT=", "FIELDHUB_DEVICE=", "FIELDHUB_ADAPTER=", "FIELDHUB_ROUTE=",
        "FIELDHUB_ENDPOINT=", "FIELDHUB_EVENT=",
};

static void emit(int level, int error, const char *file, int line, const char *func,
                 const struct gw_log_fields *f, const char *msg) {
        const char *vals[6] = { 0 };
        if (f) {
                vals[0] = f->component;
                vals[1] = f->device;
                vals[2] = f->adapter;
                vals[3] = f->route;
                vals[4] = f->endpoint;
                vals[5] = f->event;
        }

        if (gw_log_to_journal()) {
                char *bufs[12] = { 0 };
                struct iovec iov[14];
                int n = 0;
                bool ok = true;

#define ADD(...)                                                         \
        do {                                                             \
                if (asprintf(&bufs[n], __VA_ARGS__) < 0) {               \
                        bufs[n] = NULL;                                  \
                        ok = false;                                      \
                } else {                                                 \
                        iov[n].iov_base = bufs[n];                       \
                        iov[n].iov_len = strlen(bufs[n]);                \
                        n++;                                             \
                }                                                        \
        } while (0)
                ADD("MESSAGE=%s", msg);
                ADD("PRIORITY=%d", level);
                ADD("SYSLOG_IDENTIFIER=fieldhubd");
                if (ok && error)
                        ADD("ERRNO=%d", error);
                if (ok && f && f->message_id)
                        ADD("MESSAGE_ID=%s", f->message_id);
                if (ok && f && f->has_queue_depth)
                        ADD("FIELDHUB_QUEUE_DEPTH=%lld", f->queue_depth);
                for (size_t i = 0; ok && i < ELEMENTSOF(vals); i++)
                        if (vals[i])
                                ADD("%s%s", field_names[i], vals[i]);
#undef ADD
                char fbuf[512], lbuf[32];
                snprintf(fbuf, sizeof fbuf, "CODE_FILE=%s", file);
                snprintf(lbuf, sizeof lbuf, "CODE_LINE=%d", line);
                int r = ok ? sd_journal_sendv_with_location(fbuf, lbuf, func, iov, n) : -ENOMEM;
                for (int i = 0; i < n; i++)
                        free(bufs[i]);
                if (r >= 0)
                        return;
                /* journald unreachable: fall through to stderr rather than lose the line */
        }

        char out[LOG_LINE_MAX + 512];
        int k = snprintf(out, sizeof out, "<%d>%s%s%s", level, vals[0] ? vals[0] : "", vals[0] ? ": " : "",
                         msg);
        static const char *short_names[] = { NULL, "device", "adapter", "route", "endpoint", NULL };
        for (size_t i = 1; i < ELEMENTSOF(vals) && k > 0 && (size_t) k < sizeof out - 2; i++)
                if (vals[i] && short_names[i])
                        k += snprintf(out + k, sizeof out - (size_t) k, " [%s=%s]", short_names[i], vals[i]);
        if (k < 0)
                return;
        if ((size_t) k > sizeof out - 2)
                k = (int) sizeof out - 2;
        out[k++] = '\n';
        ssize_t w = write(STDERR_FILENO, out, (size_t) k);
        (void) w;
}

int gw_log_internalv(int level, int error, const char *file, int line, const char *func,
                     const struct gw_log_fields *f, const char *fmt, va_list ap) {
        int ret = error > 0 ? -error : error;
        if (error < 0)
                error = -error;

        if (level > gw_log_get_max_level())
                return ret;

        char msg[LOG_LINE_MAX];
        int saved = errno;
        errno = error;
        vsnprintf(msg, sizeof msg, fmt, ap);
        errno = saved;

        char report[RL_SAMPLE + 64];
        int report_level = level;
        bool pass = true;

        pthread_mutex_lock(&L.lock);
        scrub_locked(msg);
        report[0] = 0;
        if (level < LOG_DEBUG && !(f && f->no_ratelimit)) {
                uint64_t h = 0xcbf29ce484222325ULL;
                if (f && f->ratelimit_key)
                        h = fnv1a(h, f->ratelimit_key);
                else {
                        char site[64];
                        snprintf(site, sizeof site, ":%d", line);
                        h = fnv1a(fnv1a(fnv1a(h, file), site), f ? f->device : NULL);
                }
                pass = ratelimit_locked(h, level, msg, report, sizeof report, &report_level);
        }
        pthread_mutex_unlock(&L.lock);

        if (report[0])
                emit(report_level, 0, file, line, func,
                     GW_FIELDS(.message_id = GW_MSG_LOG_SUPPRESSED,
                                                    .event = "log-suppressed",
                                                    .device = f ? f->device : NULL),
                     report);
        if (pass)
                emit(level, error, file, line, func, f, msg);
        return ret;
}

int gw_log_internal(int level, int error, const char *file, int line, const char *func,
                    const struct gw_log_fields *f, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        int r = gw_log_internalv(level, error, file, line, func, f, fmt, ap);
        va_end(ap);
        return r;
}

_printf_(6, 0) static void hub_log_forward(void *userdata, int level, const char *file, int line, const char *func,
                                           const char *fmt, va_list ap) {
        (void) userdata;
        gw_log_internalv(level, 0, file, line, func, GW_FIELDS(.component = "hub-core"),
                         fmt, ap);
}

const struct hub_log gw_hub_log = { .fn = hub_log_forward, .userdata = NULL };
