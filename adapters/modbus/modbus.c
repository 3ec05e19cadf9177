/* SPDX-License-Identifier: MIT */
/* The Modbus adapter: the adapter ops, one worker thread per line (a TCP host:port, or an RTU
 * serial port shared by every slave on it), poll scheduling with backoff for dead slaves,
 * writes and operator methods, errors and per-line metrics.
 *
 * Threads. libmodbus is synchronous, so each line has a worker thread that owns its libmodbus
 * context and runs one transaction at a time. The loop thread (ops, host calls) and a worker
 * share only the line's mutex-protected fields: the device list, the job queue and the stop
 * flag. Results go back to the loop through host->post(): a worker never calls any other host
 * op (except log, which is thread-safe).
 *
 * Devices. A device object belongs to the line it polls. Reload swaps the line's device list
 * under the mutex; a removed device is parked on the line's retired list and freed by the
 * worker when it is not using it. Unchanged devices (same config hash) stay in place with
 * their schedule, so reload does not disturb them. */

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "adapter/adapter.h"
#include "adp-util.h"
#include "adp-modbus.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "modbus-internal.h"
#include <modbus/modbus.h>

#define REPORT_INTERVAL_USEC (10u * 1000u * 1000u)
#define LOG_POLL_INTERVAL_USEC (3u * 1000u * 1000u)
#define MAX_JOBS 256u
#define BODY_MAX (200u * 1024u)
/* Telemetry messages posted to the loop and not yet taken by it, plus those the host has not
 * stored yet (host->backlog()), per adapter. Above this the workers hold their next poll (cycles are skipped and counted, not queued without bound):
 * polling never outruns what the gateway can store. */
#define MAX_PENDING_TELEMETRY 2000u

struct mb_adapter;

enum mb_job_kind { JOB_WRITE, JOB_READ };

struct mb_write {
        size_t point;
        struct adp_modbus_value v; /* the engineering value as given */
};

struct mb_job {
        struct mb_job *next;
        enum mb_job_kind kind;
        uint64_t cmd_id;
        bool is_method;
        char *device;
        struct mb_write *writes;
        size_t n_writes;
        enum adp_modbus_table table; /* JOB_READ */
        uint16_t address, count;
};

/* A growing text buffer; failed once it would exceed BODY_MAX or memory ran out. */
struct sbuf {
        char *p;
        size_t len, cap;
        bool failed;
};

struct mb_line {
        struct mb_adapter *a;
        struct adp_modbus_line_conf conf; /* host/device strings owned */
        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool stop;
        struct adp_modbus_device **devs;
        size_t n_devs;
        struct adp_modbus_device **retired;
        size_t n_retired;
        struct mb_job *jobs, *jobs_tail;
        size_t n_jobs;
        bool port_claimed;
        char claimed_path[4096];

        /* worker only */
        modbus_t *ctx;
        unsigned conn_failures;
        uint64_t conn_retry_at;
        uint64_t last_frame_end;
        uint64_t prev_t1;               /* end of the previous transaction, 0 after an idle wait */
        char conn_error[512];
        struct sbuf qual_buf, rep_buf;  /* reused by every poll */
        size_t body_hint;               /* size of the last telemetry body */

        /* metrics, under lock */
        uint64_t started_usec;
        uint64_t transactions, timeouts, retries, crc_errors, exceptions, other_errors, wrong_unit, reconnects;
        uint64_t busy_usec, theoretical_usec;
        uint64_t between_usec, n_between;  /* worker time from one transaction to the next, back to back */
        _Atomic uint64_t registers_read; /* not under lock: the worker adds without it */
        uint64_t held;             /* polls held back because the gateway was behind */
        uint64_t overruns;         /* poll cycles skipped (the line could not keep up) */
        uint64_t silence_min_usec; /* smallest gap we left between frames (RTU) */
};

struct mb_event;

struct mb_adapter {
        char *name;
        struct adp_modbus_config *conf; /* from init/reconfigure, devices taken at start */
        const struct adp_host *host;
        struct mb_line **lines;
        size_t n_lines;
        bool stopping;
        atomic_uint pending_telemetry;

        /* Events from the workers, taken by the loop in batches: a worker posts to the host
         * (a wake-up of the loop) only when the queue was empty and not yet posted. */
        pthread_mutex_t ev_lock;
        bool ev_lock_init;
        struct mb_event *ev_head, *ev_tail;
        bool ev_posted;
};

enum mb_event_kind { EV_TELEMETRY, EV_STATE, EV_REPORT, EV_RESULT };

struct mb_event {
        struct mb_event *next;
        enum mb_event_kind kind;
        char *device;           /* points into name_buf (or NULL) */
        char *body;
        char group[32];
        enum adp_device_state state;
        char *why;
        uint64_t cmd_id;
        int status;
        char name_buf[];
};

/* ---- logging ----------------------------------------------------------------------------- */

#define mlog(a, level, dev, key, err, ...) adp_logf((a)->host, level, dev, key, err, __VA_ARGS__)

/* ---- events from workers to the loop ----------------------------------------------------- */

static void event_free(struct mb_event *ev) {
        if (!ev)
                return;
        free(ev->body);
        free(ev->why);
        free(ev);
}

static void on_event(struct mb_adapter *a, struct mb_event *ev) {
        const struct adp_host *h = a->host;

        switch (ev->kind) {
        case EV_TELEMETRY: {
                atomic_fetch_sub(&a->pending_telemetry, 1);
                struct hub_msg *m = NULL;
                int r = adp_telemetry_new(ev->body, a->name, "modbus", "pollGroup", ev->group, &m);
                if (r >= 0)
                        r = h->emit(h->host, ev->device, m);
                if (r < 0 && r != -ENOENT) /* -ENOENT: the device was removed by a reload */
                        mlog(a, LOG_WARNING, ev->device, "emit", r, "Cannot queue telemetry: %m, dropping one poll cycle");
                hub_msg_unref(m);
                break;
        }
        case EV_STATE:
                h->device_state(h->host, ev->device, ev->state, ev->why);
                break;
        case EV_REPORT:
                (void) h->report(h->host, ev->device, ev->body);
                break;
        case EV_RESULT:
                h->command_result(h->host, ev->cmd_id, ev->status, ev->body);
                break;
        }
        event_free(ev);
}

static struct mb_event *events_take(struct mb_adapter *a) {
        pthread_mutex_lock(&a->ev_lock);
        struct mb_event *ev = a->ev_head;
        a->ev_head = a->ev_tail = NULL;
        a->ev_posted = false;
        pthread_mutex_unlock(&a->ev_lock);
        return ev;
}

/* Loop thread: runs every event queued so far, in order. */
static void on_events(void *ud) {
        struct mb_adapter *a = ud;
        for (struct mb_event *ev = events_take(a), *next; ev; ev = next) {
                next = ev->next;
                on_event(a, ev);
        }
}

static void events_drop(struct mb_adapter *a) {
        for (struct mb_event *ev = events_take(a), *next; ev; ev = next) {
                next = ev->next;
                if (ev->kind == EV_TELEMETRY)
                        atomic_fetch_sub(&a->pending_telemetry, 1);
                event_free(ev);
        }
}

/* Worker side: queues an event (taking body); on failure (stopping) frees it. */
static void post_event(struct mb_adapter *a, enum mb_event_kind kind, const char *dev, char *body, const char *group,
                       enum adp_device_state state, const char *why, uint64_t cmd_id, int status) {
        size_t dl = dev ? strlen(dev) + 1 : 0;
        struct mb_event *ev = malloc(sizeof *ev + dl);
        if (!ev) {
                free(body);
                return;
        }
        *ev = (struct mb_event){ .kind = kind, .body = body, .state = state, .cmd_id = cmd_id, .status = status };
        if (group)
                snprintf(ev->group, sizeof ev->group, "%s", group);
        if (dev)
                ev->device = memcpy(ev->name_buf, dev, dl);
        ev->why = why ? strdup(why) : NULL;
        if (why && !ev->why) {
                event_free(ev);
                return;
        }
        if (kind == EV_TELEMETRY)
                atomic_fetch_add(&a->pending_telemetry, 1);
        pthread_mutex_lock(&a->ev_lock);
        if (a->ev_tail)
                a->ev_tail->next = ev;
        else
                a->ev_head = ev;
        a->ev_tail = ev;
        bool post = !a->ev_posted;
        a->ev_posted = true;
        pthread_mutex_unlock(&a->ev_lock);
        if (post && a->host->post(a->host->host, on_events, a) < 0)
                events_drop(a); /* the host is closing: nothing will run them */
}

static _printf_(5, 6) void post_result(struct mb_adapter *a, const char *dev, uint64_t cmd_id, int status,
                                       const char *fmt, ...) {
        char *body = NULL;
        va_list ap;
        va_start(ap, fmt);
        if (vasprintf(&body, fmt, ap) < 0)
                body = NULL;
        va_end(ap);
        post_event(a, EV_RESULT, dev, body, NULL, 0, NULL, cmd_id, status);
}

/* ---- small helpers ----------------------------------------------------------------------- */

static char *json_quote(const char *s) {
        json_t *j = json_string(s ? s : "");
        char *out = j ? json_dumps(j, JSON_ENCODE_ANY) : NULL;
        json_decref(j);
        return out;
}

static void iso_now(char buf[static 32]) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        hub_time_format_iso8601((uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000, buf);
}

/* Sleeps until monotonic time t (usec): the inter-frame silence is a lower bound and every
 * microsecond past it is line time lost, so the last 100 us are spun rather than slept
 * (a timer wake-up comes 50..100 us late). Worker threads only. */
#define SPIN_USEC 100u
static void sleep_until(uint64_t t) {
        if (t > adp_modbus_now() + SPIN_USEC) {
                uint64_t w = t - SPIN_USEC;
                struct timespec ts = { .tv_sec = (time_t) (w / 1000000), .tv_nsec = (long) (w % 1000000) * 1000 };
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
                        ;
        }
        while (adp_modbus_now() < t)
                ;
}

static bool is_connection_error(int err) {
        switch (err) {
        case ECONNRESET:
        case EPIPE:
        case ENOTCONN:
        case EBADF:
        case ECONNREFUSED:
        case ECONNABORTED:
        case EIO:
                return true;
        default:
                return false;
        }
}

/* ---- transactions (worker) --------------------------------------------------------------- */

/* Keeps the inter-frame silence (and the turnaround delay) on an RTU line before a request. */
static void line_before_request(struct mb_line *l) {
        if (l->conf.transport != ADP_MODBUS_RTU || l->last_frame_end == 0)
                return;
        uint64_t gap = adp_modbus_rtu_silence_usec(&l->conf) + l->conf.turnaround_usec;
        sleep_until(l->last_frame_end + gap);
        uint64_t actual = adp_modbus_now() - l->last_frame_end;
        pthread_mutex_lock(&l->lock);
        if (l->silence_min_usec == 0 || actual < l->silence_min_usec)
                l->silence_min_usec = actual;
        pthread_mutex_unlock(&l->lock);
}

static void line_close(struct mb_line *l) {
        if (!l->ctx)
                return;
        modbus_close(l->ctx);
        modbus_free(l->ctx);
        l->ctx = NULL;
}

/* One libmodbus call with metrics, retries, and the error mapped; returns the count read or
 * -errno (libmodbus errno kept in *ret_mberr). */
static int transact(struct mb_line *l, struct adp_modbus_device *d, int (*fn)(struct mb_line *, void *), void *arg,
                    unsigned retries, int *ret_mberr) {
        int rc = -1, err = 0;
        for (unsigned attempt = 0; attempt <= retries; attempt++) {
                if (!l->ctx)
                        return *ret_mberr = ENOTCONN, -ENOTCONN;
                line_before_request(l);
                modbus_set_slave(l->ctx, d->unit);
                uint64_t t0 = adp_modbus_now();
                errno = 0;
                rc = fn(l, arg);
                err = rc < 0 ? (errno ? errno : EIO) : 0;
                uint64_t t1 = adp_modbus_now();
                l->last_frame_end = t1;
                pthread_mutex_lock(&l->lock);
                l->transactions++;
                l->busy_usec += t1 - t0;
                if (l->prev_t1) {
                        l->between_usec += t0 - l->prev_t1;
                        l->n_between++;
                }
                l->prev_t1 = t1;
                if (attempt > 0)
                        l->retries++;
                if (err == ETIMEDOUT)
                        l->timeouts++;
                else if (err == EMBBADCRC)
                        l->crc_errors++;
                else if (err > MODBUS_ENOBASE && err <= EMBXGTAR)
                        l->exceptions++;
                else if (err == EMBBADSLAVE)
                        l->wrong_unit++;
                else if (err)
                        l->other_errors++;
                pthread_mutex_unlock(&l->lock);
                if (rc >= 0)
                        break;
                if (err > MODBUS_ENOBASE && err <= EMBXGTAR)
                        break; /* an exception is an answer: retrying will not change it */
                if (is_connection_error(err)) {
                        line_close(l);
                        break;
                }
                /* Garbage, or a late answer that would be taken for the next one: drop
                 * whatever is left on the line or the connection. */
                if (err == EMBBADCRC || err == EMBBADDATA || err == EMBBADSLAVE || err == ETIMEDOUT)
                        (void) modbus_flush(l->ctx);
        }
        *ret_mberr = err;
        return rc < 0 ? adp_modbus_errno(err) : rc;
}

struct read_arg {
        enum adp_modbus_table table;
        int addr, count;
        uint16_t *regs;
        uint8_t *bits;
};

static int do_read(struct mb_line *l, void *p) {
        struct read_arg *ra = p;
        switch (ra->table) {
        case ADP_MODBUS_COIL:
                return modbus_read_bits(l->ctx, ra->addr, ra->count, ra->bits);
        case ADP_MODBUS_DISCRETE_INPUT:
                return modbus_read_input_bits(l->ctx, ra->addr, ra->count, ra->bits);
        case ADP_MODBUS_INPUT_REGISTER:
                return modbus_read_input_registers(l->ctx, ra->addr, ra->count, ra->regs);
        default:
                return modbus_read_registers(l->ctx, ra->addr, ra->count, ra->regs);
        }
}

static void describe_error(int mberr, char *buf, size_t size) {
        if (mberr > MODBUS_ENOBASE && mberr <= EMBXGTAR)
                snprintf(buf, size, "exception %d (%s)", mberr - MODBUS_ENOBASE, adp_modbus_strerror(mberr));
        else
                snprintf(buf, size, "%s", adp_modbus_strerror(mberr));
}

/* Reads one point alone (read-back after a write, read-modify-write of a bit). */
static int read_point(struct mb_line *l, struct adp_modbus_device *d, size_t pi, struct adp_modbus_value *ret,
                      uint16_t *ret_raw, int *ret_mberr) {
        const struct adp_modbus_point *p = &d->points[pi];
        uint16_t regs[64];
        uint8_t bits[1];
        struct read_arg ra = { .table = p->table, .addr = p->address, .count = (int) p->nregs, .regs = regs, .bits = bits };
        int r = transact(l, d, do_read, &ra, d->retries, ret_mberr);
        if (r < 0)
                return r;
        if (p->type == ADP_MODBUS_BOOL)
                *ret = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_BOOL, .b = bits[0] != 0 };
        else {
                r = adp_modbus_decode(p->type, p->order, regs, p->nregs, p->bit, ret);
                if (r < 0)
                        return r;
                adp_modbus_scale(ret, p->scale, p->offset);
                if (ret_raw)
                        *ret_raw = regs[0];
        }
        return 0;
}

/* ---- polling (worker) -------------------------------------------------------------------- */

static void set_device_online(struct mb_line *l, struct adp_modbus_device *d, bool online, const char *why) {
        if (d->online == online && online)
                return;
        if (!online && d->failures > 1)
                return; /* already reported */
        d->online = online;
        post_event(l->a, EV_STATE, d->id, NULL, NULL, online ? ADP_DEVICE_ONLINE : ADP_DEVICE_OFFLINE, why, 0, 0);
}


static _printf_(2, 3) void sb_printf(struct sbuf *b, const char *fmt, ...) {
        va_list ap;
        if (b->failed)
                return;
        for (;;) {
                va_start(ap, fmt);
                int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
                va_end(ap);
                if (n < 0) {
                        b->failed = true;
                        return;
                }
                if (b->p && b->len + (size_t) n < b->cap) {
                        b->len += (size_t) n;
                        return;
                }
                size_t ncap = MAX(b->cap * 2, b->len + (size_t) n + 256);
                if (ncap > BODY_MAX) {
                        b->failed = true;
                        return;
                }
                char *np = realloc(b->p, ncap);
                if (!np) {
                        b->failed = true;
                        return;
                }
                b->p = np;
                b->cap = ncap;
        }
}

/* Room for n more characters (and the NUL): the place to write them, or NULL (b->failed). */
static char *sb_reserve(struct sbuf *b, size_t n) {
        if (b->failed)
                return NULL;
        if (!b->p || b->len + n >= b->cap) {
                size_t ncap = MAX(b->cap * 2, b->len + n + 256);
                if (ncap > BODY_MAX) {
                        b->failed = true;
                        return NULL;
                }
                char *np = realloc(b->p, ncap);
                if (!np) {
                        b->failed = true;
                        return NULL;
                }
                b->p = np;
                b->cap = ncap;
        }
        return b->p + b->len;
}

static void sb_put(struct sbuf *b, const char *str, size_t n) {
        char *w = sb_reserve(b, n);
        if (!w)
                return;
        memcpy(w, str, n);
        b->len += n;
        b->p[b->len] = 0;
}

/* Appends `"name":json` to an object's members, with a comma after the first (first: the
 * length at which the object's members start). */
static void sb_member(struct sbuf *b, size_t first, const char *name, const char *json) {
        size_t nl = strlen(name), jl = strlen(json), comma = b->len > first;
        char *w = sb_reserve(b, comma + nl + jl + 3);
        if (!w)
                return;
        if (comma)
                *w++ = ',';
        *w++ = '"';
        memcpy(w, name, nl);
        w += nl;
        *w++ = '"';
        *w++ = ':';
        memcpy(w, json, jl);
        w += jl;
        *w = 0;
        b->len = (size_t) (w - b->p);
}

/* A value for the twin: twins hold integers of at most 53 bits (reference §6.2), so larger
 * ones go there as decimal strings (telemetry keeps the exact number). */
#define TWIN_INT_MAX INT64_C(4503599627370495)
static void twin_value_json(const struct adp_modbus_value *v, char *buf, size_t size) {
        if (v->kind == ADP_MODBUS_V_UINT && v->u > (uint64_t) TWIN_INT_MAX)
                snprintf(buf, size, "\"%llu\"", (unsigned long long) v->u);
        else if (v->kind == ADP_MODBUS_V_INT && (v->i > TWIN_INT_MAX || v->i < -TWIN_INT_MAX - 1))
                snprintf(buf, size, "\"%lld\"", (long long) v->i);
        else
                (void) adp_modbus_value_json(v, buf, size);
}

static void poll_group(struct mb_line *l, struct adp_modbus_device *d, struct adp_modbus_group *g) {
        struct mb_adapter *a = l->a;
        char ts[32], err_desc[128] = "";
        uint16_t regs[MODBUS_MAX_READ_REGISTERS];
        uint8_t bits[MODBUS_MAX_READ_BITS];
        /* The telemetry body is built in place ({"timestamp":..,"values":{ members }) and
         * handed to the loop as is; quality and reported members go to the line's reusable
         * buffers. */
        struct sbuf vals = { 0 }, *qual = &l->qual_buf, *rep = &l->rep_buf;
        size_t n_ok = 0, n_bad = 0, n_values = 0, vals0;
        int first_err = 0;
        bool any_answer = false;

        qual->len = rep->len = 0;
        qual->failed = rep->failed = false;
        if (qual->p)
                qual->p[0] = 0;
        if (rep->p)
                rep->p[0] = 0;
        iso_now(ts);
        vals.cap = l->body_hint;
        vals.p = vals.cap ? malloc(vals.cap) : NULL;
        if (!vals.p)
                vals.cap = 0;
        {
                char head[96];
                int hn = snprintf(head, sizeof head, "{\"timestamp\":\"%s\",\"unit\":%u,\"values\":{", ts, d->unit);
                sb_put(&vals, head, (size_t) hn);
        }
        vals0 = vals.len;
        int abort_err = 0;
        for (size_t ri = 0; ri < g->n_reqs; ri++) {
                const struct adp_modbus_request *rq = &g->reqs[ri];
                struct read_arg ra = { .table = rq->table, .addr = rq->start, .count = rq->count, .regs = regs, .bits = bits };
                int mberr = abort_err;
                /* After a timeout (or a lost connection) the rest of the cycle is skipped: a
                 * slave that stopped answering costs the line one timeout, not one per request. */
                int r = abort_err ? -ETIMEDOUT : transact(l, d, do_read, &ra, d->retries, &mberr);
                if (r < 0 && (mberr == ETIMEDOUT || mberr == ENOTCONN || is_connection_error(mberr)))
                        abort_err = mberr;
                if (r >= 0 || (mberr > MODBUS_ENOBASE && mberr <= EMBXGTAR))
                        any_answer = true;
                struct adp_modbus_request *mrq = &g->reqs[ri];
                if (r < 0) {
                        describe_error(mberr, err_desc, sizeof err_desc);
                        if (!first_err)
                                first_err = mberr ? mberr : -r;
                        /* Logged once per device, point range and error: when it starts (and
                         * rate-limited by key on top, should it flap). */
                        if (mrq->last_err != mberr) {
                                char key[160];
                                snprintf(key, sizeof key, "%s:%s:%u:%d", d->id, adp_modbus_table_names[rq->table],
                                         rq->start, mberr);
                                mlog(a, LOG_WARNING, d->id, key, 0,
                                     "Reading %s %u..%u (point %s%s) from unit %u failed: %s",
                                     adp_modbus_table_names[rq->table], rq->start, rq->start + rq->count - 1,
                                     d->points[rq->points[0]].name, rq->n_points > 1 ? " and others" : "", d->unit,
                                     err_desc);
                        }
                        mrq->last_err = mberr;
                        for (size_t k = 0; k < rq->n_points; k++) {
                                const struct adp_modbus_point *p = &d->points[rq->points[k]];
                                _cleanup_free_ char *q = json_quote(err_desc);
                                sb_member(qual, 0, p->name, q ? q : "\"error\"");
                                n_bad++;
                        }
                        continue;
                }
                if (mrq->last_err)
                        mlog(a, LOG_NOTICE, d->id, NULL, 0, "Reading %s %u..%u from unit %u works again",
                             adp_modbus_table_names[rq->table], rq->start, rq->start + rq->count - 1, d->unit);
                mrq->last_err = 0;
                atomic_fetch_add_explicit(&l->registers_read, rq->count, memory_order_relaxed);
                for (size_t k = 0; k < rq->n_points; k++) {
                        size_t pi = rq->points[k];
                        const struct adp_modbus_point *p = &d->points[pi];
                        unsigned off = p->address - rq->start;
                        struct adp_modbus_value v;
                        if (p->type == ADP_MODBUS_BOOL)
                                v = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_BOOL, .b = bits[off] != 0 };
                        else if (adp_modbus_decode(p->type, p->order, regs + off, p->nregs, p->bit, &v) < 0)
                                continue;
                        adp_modbus_scale(&v, p->scale, p->offset);
                        bool changed = !d->have_last[pi] || !adp_modbus_value_equal(&v, &d->last[pi]);
                        if (changed && p->deadband > 0 && d->have_last[pi] && v.kind != ADP_MODBUS_V_STRING)
                                changed = fabs(adp_modbus_value_double(&v) - adp_modbus_value_double(&d->last[pi])) >=
                                          p->deadband;
                        bool rbe = p->rbe || p->deadband > 0;
                        char num[160];
                        (void) adp_modbus_value_json(&v, num, sizeof num);
                        n_ok++;
                        if (!rbe || changed) {
                                sb_member(&vals, vals0, p->name, num);
                                sb_member(qual, 0, p->name,
                                          isfinite(adp_modbus_value_double(&v)) || v.kind == ADP_MODBUS_V_STRING ||
                                                          v.kind == ADP_MODBUS_V_BOOL
                                                  ? "\"good\""
                                                  : "\"invalid\"");
                                n_values++;
                        }
                        if (changed || !d->have_last[pi]) {
                                if (p->writable) {
                                        char tv[160];
                                        twin_value_json(&v, tv, sizeof tv);
                                        sb_member(rep, 0, p->name, tv);
                                }
                                d->last[pi] = v;
                                d->have_last[pi] = true;
                        }
                }
        }

        uint64_t now = adp_modbus_now();
        if (!any_answer && g->n_reqs > 0) {
                /* Nothing answered: the slave is dead (or the link is). Back off so that it
                 * cannot take the line from the others: one timeout per backoff window. */
                d->failures++;
                uint64_t b = l->conf.backoff_min_usec;
                for (unsigned i = 1; i < d->failures && b < l->conf.backoff_max_usec; i++)
                        b *= 2;
                b = MIN(b, l->conf.backoff_max_usec);
                d->backoff_until = now + b;
                if (d->failures == 1) {
                        char why[200];
                        snprintf(why, sizeof why, "%s", err_desc[0] ? err_desc : "no answer");
                        mlog(a, LOG_WARNING, d->id, NULL, 0,
                             "Unit %u on %s does not answer (%s); backing off (next attempt in %llu ms, up to %llu ms)",
                             d->unit, l->conf.key, why, (unsigned long long) (b / 1000),
                             (unsigned long long) (l->conf.backoff_max_usec / 1000));
                        set_device_online(l, d, false, why);
                        char *body = NULL;
                        _cleanup_free_ char *q = json_quote(why);
                        if (asprintf(&body, "{\"modbus\":{\"state\":\"offline\",\"lastError\":%s,\"lastErrorTime\":\"%s\"}}",
                                     q ? q : "null", ts) >= 0)
                                post_event(a, EV_REPORT, d->id, body, NULL, 0, NULL, 0, 0);
                }
        } else if (g->n_reqs > 0) {
                if (d->failures > 0 || !d->online) {
                        if (d->failures > 0)
                                mlog(a, LOG_NOTICE, d->id, NULL, 0, "Unit %u on %s answers again", d->unit, l->conf.key);
                        d->failures = 0;
                        d->backoff_until = 0;
                        set_device_online(l, d, true, NULL);
                }
        }

        if (n_values > 0 || n_bad > 0) {
                sb_put(&vals, "},\"quality\":{", 13);
                sb_put(&vals, qual->p ? qual->p : "", qual->len);
                sb_put(&vals, "}}", 2);
                if (!vals.failed && !qual->failed) {
                        char *body = TAKE_PTR(vals.p);
                        l->body_hint = MIN(vals.len + 64, (size_t) BODY_MAX);
                        if (d->log_polls) {
                                if (d->last_log == 0 || now - d->last_log >= LOG_POLL_INTERVAL_USEC) {
                                        d->last_log = now;
                                        mlog(a, LOG_INFO, d->id, "poll", 0, "Polled %s: %s", g->name, body);
                                }
                        }
                        post_event(a, EV_TELEMETRY, d->id, body, g->name, 0, NULL, 0, 0);
                }
        }

        /* The adapter's view in the twin: writable points' values when they change, and the
         * state at most every REPORT_INTERVAL_USEC (and on any change of error). */
        if (any_answer && !rep->failed) {
                bool err_changed = first_err != d->last_err;
                bool periodic = d->last_report == 0 || now - d->last_report >= REPORT_INTERVAL_USEC;
                /* The first report (every device at once, when the adapter starts) carries only
                 * the state; the values follow with the next one, in the device's own phase. */
                if (periodic && d->last_report != 0) {
                        /* Every point's latest value, for operators looking at the twin. */
                        struct sbuf all = { 0 };
                        for (size_t i = 0; i < d->n_points; i++) {
                                char num[160];
                                if (!d->have_last[i])
                                        continue;
                                twin_value_json(&d->last[i], num, sizeof num);
                                sb_member(&all, 0, d->points[i].name, num);
                        }
                        /* Twins are small (32 KiB of reported properties): big maps stay out. */
                        if (!all.failed && all.len < 8192)
                                sb_printf(rep, "%s\"values\":{%s}", rep->len ? "," : "", all.p ? all.p : "");
                        free(all.p);
                }
                if (rep->len > 0 || periodic || err_changed) {
                        char *body = NULL;
                        _cleanup_free_ char *q = first_err ? json_quote(err_desc) : NULL;
                        if (asprintf(&body, "{%s%s\"modbus\":{\"state\":\"online\",\"lastPoll\":\"%s\",\"lastError\":%s,"
                                            "\"pointsGood\":%zu,\"pointsBad\":%zu}}",
                                     rep->p ? rep->p : "", rep->len ? "," : "", ts, q ? q : "null", n_ok, n_bad) >= 0)
                                post_event(a, EV_REPORT, d->id, body, NULL, 0, NULL, 0, 0);
                        /* After the first report, each device keeps its own phase in the
                         * interval (from its config hash): fifty devices started together do
                         * not all rewrite their twins in the same second, every ten seconds. */
                        uint64_t phase = d->last_report == 0 ? d->hash % REPORT_INTERVAL_USEC : 0;
                        d->last_report = now > phase ? now - phase : 1;
                }
                d->last_err = first_err;
        }
        free(vals.p);
}

/* ---- writes and operator reads (worker) -------------------------------------------------- */

static int encode_write(const struct adp_modbus_point *p, const struct adp_modbus_value *in, uint16_t *regs,
                        const char **ret_why) {
        struct adp_modbus_value raw = *in;
        if (p->type == ADP_MODBUS_STRING) {
                if (in->kind != ADP_MODBUS_V_STRING)
                        return *ret_why = "expected a string", -EINVAL;
        } else if (in->kind == ADP_MODBUS_V_STRING)
                return *ret_why = "expected a number", -EINVAL;
        if ((p->scale != 1.0 || p->offset != 0.0) && in->kind != ADP_MODBUS_V_STRING) {
                double x = (adp_modbus_value_double(in) - p->offset) / p->scale;
                bool integral = p->type != ADP_MODBUS_FLOAT32 && p->type != ADP_MODBUS_FLOAT64;
                raw = (struct adp_modbus_value){ .kind = ADP_MODBUS_V_DOUBLE, .d = integral ? round(x) : x };
        }
        int r = adp_modbus_encode(p->type, p->order, &raw, p->nregs, regs);
        if (r == -ERANGE)
                *ret_why = "value out of range for the point's type";
        else if (r < 0)
                *ret_why = "value not valid for the point's type";
        return r;
}

struct write_arg {
        const struct adp_modbus_point *p;
        uint16_t *regs;
        bool bit;
};

static int do_write(struct mb_line *l, void *arg) {
        struct write_arg *wa = arg;
        const struct adp_modbus_point *p = wa->p;
        if (p->table == ADP_MODBUS_COIL)
                return modbus_write_bit(l->ctx, p->address, wa->bit);                   /* FC5 */
        if (p->nregs == 1)
                return modbus_write_register(l->ctx, p->address, wa->regs[0]);          /* FC6 */
        return modbus_write_registers(l->ctx, p->address, (int) p->nregs, wa->regs);    /* FC16 */
}

/* Writes one point and reads it back. Returns an HTTP-like status; *ret_json the read-back
 * value (JSON) or an error object. */
static int write_point(struct mb_line *l, struct adp_modbus_device *d, const struct mb_write *w, char **ret_json) {
        const struct adp_modbus_point *p = &d->points[w->point];
        uint16_t regs[64] = { 0 };
        struct write_arg wa = { .p = p, .regs = regs };
        const char *why = NULL;
        int mberr = 0, r;
        char desc[128];

        if (p->table == ADP_MODBUS_COIL) {
                if (w->v.kind != ADP_MODBUS_V_BOOL && !(w->v.kind == ADP_MODBUS_V_INT && (w->v.i == 0 || w->v.i == 1)))
                        return asprintf(ret_json, "{\"error\":\"point %s is a coil: expected true or false\"}", p->name) < 0
                                       ? 500 : 400;
                wa.bit = w->v.kind == ADP_MODBUS_V_BOOL ? w->v.b : w->v.i == 1;
        } else if (p->type == ADP_MODBUS_BIT) {
                /* Read-modify-write of one bit of a holding register. */
                struct adp_modbus_value cur;
                uint16_t raw = 0;
                bool on = w->v.kind == ADP_MODBUS_V_BOOL ? w->v.b : adp_modbus_value_double(&w->v) != 0;
                r = read_point(l, d, w->point, &cur, &raw, &mberr);
                if (r < 0)
                        goto fail;
                regs[0] = (uint16_t) (on ? (raw | (1u << p->bit)) : (raw & ~(1u << p->bit)));
                if (p->order == ADP_MODBUS_BADC || p->order == ADP_MODBUS_DCBA)
                        regs[0] = (uint16_t) (on ? (raw | (1u << ((p->bit + 8) % 16))) : (raw & ~(1u << ((p->bit + 8) % 16))));
        } else if (encode_write(p, &w->v, regs, &why) < 0) {
                _cleanup_free_ char *q = json_quote(why);
                return asprintf(ret_json, "{\"error\":%s,\"point\":\"%s\"}", q ? q : "\"invalid value\"", p->name) < 0
                               ? 500 : 400;
        }
        r = transact(l, d, do_write, &wa, d->retries, &mberr);
        if (r < 0)
                goto fail;
        struct adp_modbus_value back;
        r = read_point(l, d, w->point, &back, NULL, &mberr);
        if (r < 0)
                goto fail;
        char num[160];
        twin_value_json(&back, num, sizeof num);
        d->last[w->point] = back;
        d->have_last[w->point] = true;
        return asprintf(ret_json, "%s", num) < 0 ? 500 : 200;
fail:
        describe_error(mberr, desc, sizeof desc);
        mlog(l->a, LOG_WARNING, d->id, NULL, 0, "Writing point %s (unit %u) failed: %s", p->name, d->unit, desc);
        _cleanup_free_ char *q = json_quote(desc);
        if (asprintf(ret_json, "{\"error\":%s,\"point\":\"%s\"}", q ? q : "\"error\"", p->name) < 0)
                *ret_json = NULL;
        return mberr == ETIMEDOUT || mberr == ENOTCONN ? 504 : 502;
}

static void job_free(struct mb_job *j) {
        if (!j)
                return;
        free(j->device);
        free(j->writes);
        free(j);
}

static struct adp_modbus_device *line_find_device(struct mb_line *l, const char *id) {
        for (size_t i = 0; i < l->n_devs; i++)
                if (streq(l->devs[i]->id, id))
                        return l->devs[i];
        return NULL;
}

static void run_job(struct mb_line *l, struct adp_modbus_device *d, struct mb_job *j) {
        struct mb_adapter *a = l->a;
        if (!d) {
                post_result(a, j->device, j->cmd_id, 404, "{\"error\":\"device removed\"}");
                return;
        }
        if (!l->ctx) {
                post_result(a, d->id, j->cmd_id, 504, "{\"error\":\"device offline: %s\"}", "not connected");
                return;
        }
        if (j->kind == JOB_READ) {
                uint16_t regs[MODBUS_MAX_READ_REGISTERS];
                uint8_t bits[MODBUS_MAX_READ_BITS];
                struct read_arg ra = { .table = j->table, .addr = j->address, .count = j->count, .regs = regs, .bits = bits };
                int mberr = 0;
                int r = transact(l, d, do_read, &ra, d->retries, &mberr);
                if (r < 0) {
                        char desc[128];
                        describe_error(mberr, desc, sizeof desc);
                        _cleanup_free_ char *q = json_quote(desc);
                        post_result(a, d->id, j->cmd_id, mberr == ETIMEDOUT ? 504 : 502, "{\"error\":%s}",
                                    q ? q : "\"error\"");
                        return;
                }
                struct sbuf b = { 0 };
                sb_printf(&b, "{\"table\":\"%s\",\"address\":%u,\"count\":%u,\"values\":[",
                          adp_modbus_table_names[j->table], j->address, j->count);
                bool bit_table = j->table == ADP_MODBUS_COIL || j->table == ADP_MODBUS_DISCRETE_INPUT;
                for (unsigned i = 0; i < j->count; i++) {
                        if (bit_table)
                                sb_printf(&b, "%s%s", i ? "," : "", bits[i] ? "true" : "false");
                        else
                                sb_printf(&b, "%s%u", i ? "," : "", regs[i]);
                }
                sb_printf(&b, "]}");
                if (b.failed) {
                        free(b.p);
                        post_result(a, d->id, j->cmd_id, 500, "{\"error\":\"out of memory\"}");
                } else
                        post_event(a, EV_RESULT, d->id, b.p, NULL, 0, NULL, j->cmd_id, 200);
                return;
        }

        /* JOB_WRITE: each point written then read back; the reported patch carries every
         * read-back value, the result the first failure (or 200). */
        struct sbuf rep = { 0 }, res = { 0 };
        int status = 200;
        for (size_t i = 0; i < j->n_writes; i++) {
                char *out = NULL;
                int st = write_point(l, d, &j->writes[i], &out);
                const char *pname = d->points[j->writes[i].point].name;
                if (st == 200)
                        sb_printf(&rep, "%s\"%s\":%s", rep.len ? "," : "", pname, out);
                sb_printf(&res, "%s\"%s\":%s", res.len ? "," : "", pname, out ? out : "null");
                if (st != 200 && status == 200)
                        status = st;
                free(out);
        }
        if (rep.len > 0 && !rep.failed) {
                char *body = NULL;
                if (asprintf(&body, "{%s}", rep.p) >= 0)
                        post_event(a, EV_REPORT, d->id, body, NULL, 0, NULL, 0, 0);
        }
        if (j->is_method && j->n_writes == 1 && !res.failed) {
                /* write method: {"point": name, "value": read-back} or the error. */
                const char *pname = d->points[j->writes[0].point].name;
                const char *v = strchr(res.p, ':') + 1;
                if (status == 200)
                        post_result(a, d->id, j->cmd_id, status, "{\"point\":\"%s\",\"value\":%s}", pname, v);
                else
                        post_result(a, d->id, j->cmd_id, status, "%s", v);
        } else if (!res.failed)
                post_result(a, d->id, j->cmd_id, status, "{%s}", res.p ? res.p : "");
        else
                post_result(a, d->id, j->cmd_id, 500, "{\"error\":\"out of memory\"}");
        free(rep.p);
        free(res.p);
}

/* ---- the worker -------------------------------------------------------------------------- */

static void line_connect(struct mb_line *l, uint64_t now) {
        char why[512];
        int r = l->conf.transport == ADP_MODBUS_TCP ? adp_modbus_tcp_open(&l->conf, &l->ctx, why, sizeof why)
                                                    : adp_modbus_rtu_open(&l->conf, &l->ctx, why, sizeof why);
        pthread_mutex_lock(&l->lock);
        l->reconnects++;
        if (r < 0) {
                l->conn_failures++;
                uint64_t b = l->conf.backoff_min_usec;
                for (unsigned i = 1; i < l->conn_failures && b < l->conf.backoff_max_usec; i++)
                        b *= 2;
                b = MIN(b, l->conf.backoff_max_usec);
                l->conn_retry_at = now + b;
                bool changed = !streq(why, l->conn_error);
                snprintf(l->conn_error, sizeof l->conn_error, "%s", why);
                /* A port that refuses RS-485 or is taken is a configuration problem. */
                enum adp_device_state st = r == -EBUSY || r == -ENOTTY || r == -EACCES || r == -ENOENT
                                                   ? ADP_DEVICE_ERROR : ADP_DEVICE_OFFLINE;
                size_t n = l->n_devs;
                char **ids = calloc(n ? n : 1, sizeof(char *));
                for (size_t i = 0; ids && i < n; i++) {
                        ids[i] = strdup(l->devs[i]->id);
                        l->devs[i]->online = false;
                }
                pthread_mutex_unlock(&l->lock);
                if (changed || l->conn_failures == 1)
                        mlog(l->a, st == ADP_DEVICE_ERROR ? LOG_ERR : LOG_WARNING, NULL, l->conf.key, -r,
                             "Modbus line %s: %s; retrying in %llu ms", l->conf.key, why,
                             (unsigned long long) (b / 1000));
                for (size_t i = 0; ids && i < n; i++) {
                        if (ids[i] && (changed || l->conn_failures == 1)) {
                                post_event(l->a, EV_STATE, ids[i], NULL, NULL, st, why, 0, 0);
                                char *body = NULL;
                                _cleanup_free_ char *q = json_quote(why);
                                if (asprintf(&body, "{\"modbus\":{\"state\":\"%s\",\"lastError\":%s}}",
                                             st == ADP_DEVICE_ERROR ? "error" : "offline", q ? q : "null") >= 0)
                                        post_event(l->a, EV_REPORT, ids[i], body, NULL, 0, NULL, 0, 0);
                        }
                        free(ids[i]);
                }
                free(ids);
                return;
        }
        if (l->conn_failures > 0)
                mlog(l->a, LOG_NOTICE, NULL, NULL, 0, "Modbus line %s connected again", l->conf.key);
        l->conn_failures = 0;
        l->conn_error[0] = 0;
        l->last_frame_end = 0;
        pthread_mutex_unlock(&l->lock);
}

/* Scheduling of bus workers. A worker sleeps in I/O nearly all the time, but when a response
 * arrives (or the inter-frame silence ends) it should run at once rather than after the loop
 * thread has finished storing the previous cycle. On EEVDF kernels (6.12+) that is what a
 * short requested slice gives, without privilege: sched_setattr(SCHED_OTHER, sched_runtime
 * 100 us) makes the woken worker preempt a thread running on the default 3 ms slice
 * (PREEMPT_SHORT); older kernels ignore or refuse it, harmlessly. Deliberately NOT done:
 * SCHED_FIFO (a real-time worker that ever spun, e.g. on a driver answering EAGAIN, would take
 * a core from the gateway and the system, and needs CAP_SYS_NICE, which a plant-floor service
 * should not hold for this) and a negative nice: measured on the TCP benchmark it made the
 * gateway slower (the loop and the store's commit thread, which must keep up with the worker
 * for polling to continue, lose the CPU to it), and it needs privilege too. Timer slack 1 us:
 * sleep_until()'s wake-ups come at the deadline, not up to 50 us after it (the default slack
 * of a normal thread), which is line time on RTU. */
#define WORKER_SLICE_NSEC (100u * 1000u)
/* struct sched_attr of sched_setattr(2) (linux/sched/types.h clashes with sched.h). */
struct mb_sched_attr {
        uint32_t size, sched_policy;
        uint64_t sched_flags;
        int32_t sched_nice;
        uint32_t sched_priority;
        uint64_t sched_runtime, sched_deadline, sched_period;
        uint32_t sched_util_min, sched_util_max;
};

static void worker_tune(struct mb_line *l) {
        char name[16];
        snprintf(name, sizeof name, "mb-%s", l->conf.transport == ADP_MODBUS_RTU ? "rtu" : "tcp");
        (void) pthread_setname_np(pthread_self(), name);
        (void) prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
        /* A gateway run real-time as a whole (systemd CPUSchedulingPolicy=fifo, or chrt) keeps
         * its policy; its bus workers go one priority level above its other threads, which it
         * may do since it holds the right to run real-time at all. */
        int policy = sched_getscheduler(0);
        if (policy == SCHED_FIFO || policy == SCHED_RR) {
                struct sched_param sp;
                if (sched_getparam(0, &sp) == 0 && sp.sched_priority < sched_get_priority_max(policy)) {
                        sp.sched_priority++;
                        (void) pthread_setschedparam(pthread_self(), policy, &sp);
                }
                return;
        }
        if (policy != SCHED_OTHER)
                return;
        pid_t tid = (pid_t) gettid();
        errno = 0;
        int nice_now = getpriority(PRIO_PROCESS, (id_t) tid);
        if (errno != 0)
                return;
        struct mb_sched_attr sa = { .size = sizeof sa, .sched_policy = SCHED_OTHER, .sched_nice = nice_now,
                                    .sched_runtime = WORKER_SLICE_NSEC };
        (void) syscall(SYS_sched_setattr, tid, &sa, 0);
}

static void *line_worker(void *arg) {
        struct mb_line *l = arg;
        worker_tune(l);
        pthread_mutex_lock(&l->lock);
        while (!l->stop) {
                /* Devices removed by reload are freed here, never while in use. */
                for (size_t i = 0; i < l->n_retired; i++)
                        adp_modbus_device_free(l->retired[i]);
                l->n_retired = 0;

                uint64_t now = adp_modbus_now();
                if (!l->ctx) {
                        if (now < l->conn_retry_at && !l->jobs) {
                                struct timespec ts = { .tv_sec = (time_t) (l->conn_retry_at / 1000000),
                                                       .tv_nsec = (long) (l->conn_retry_at % 1000000) * 1000 };
                                (void) pthread_cond_timedwait(&l->cond, &l->lock, &ts);
                                continue;
                        }
                        if (now >= l->conn_retry_at) {
                                pthread_mutex_unlock(&l->lock);
                                line_connect(l, now);
                                pthread_mutex_lock(&l->lock);
                                continue;
                        }
                }
                if (l->jobs) {
                        struct mb_job *j = l->jobs;
                        l->jobs = j->next;
                        if (!l->jobs)
                                l->jobs_tail = NULL;
                        l->n_jobs--;
                        struct adp_modbus_device *d = line_find_device(l, j->device);
                        pthread_mutex_unlock(&l->lock);
                        run_job(l, d, j);
                        job_free(j);
                        pthread_mutex_lock(&l->lock);
                        continue;
                }
                if (!l->ctx)
                        continue;

                /* The earliest due group; a device in backoff is due when its window ends. */
                struct adp_modbus_device *best_d = NULL;
                struct adp_modbus_group *best_g = NULL;
                uint64_t best = UINT64_MAX;
                for (size_t i = 0; i < l->n_devs; i++) {
                        struct adp_modbus_device *d = l->devs[i];
                        for (size_t k = 0; k < d->n_groups; k++) {
                                struct adp_modbus_group *g = &d->groups[k];
                                if (g->next_due == 0)
                                        g->next_due = now;
                                uint64_t due = MAX(g->next_due, d->backoff_until);
                                if (due < best) {
                                        best = due;
                                        best_d = d;
                                        best_g = g;
                                }
                        }
                }
                if (best_d && best <= now &&
                    atomic_load(&l->a->pending_telemetry) + l->a->host->backlog(l->a->host->host) >=
                            MAX_PENDING_TELEMETRY) {
                        /* The gateway is behind: hold this poll a little. */
                        l->held++;
                        best = now + 2000;
                }
                if (!best_d || best > now) {
                        l->prev_t1 = 0; /* idle: not counted as time between transactions */
                        if (best == UINT64_MAX)
                                (void) pthread_cond_wait(&l->cond, &l->lock);
                        else {
                                struct timespec ts = { .tv_sec = (time_t) (best / 1000000),
                                                       .tv_nsec = (long) (best % 1000000) * 1000 };
                                (void) pthread_cond_timedwait(&l->cond, &l->lock, &ts);
                        }
                        continue;
                }
                pthread_mutex_unlock(&l->lock);
                poll_group(l, best_d, best_g);
                pthread_mutex_lock(&l->lock);
                /* Next cycle on the interval grid; cycles that could not run are skipped,
                 * not queued up. */
                uint64_t after = adp_modbus_now();
                best_g->next_due += best_g->interval_usec;
                if (best_g->next_due <= after) {
                        uint64_t late = after - best_g->next_due;
                        l->overruns += late / best_g->interval_usec + 1;
                        best_g->next_due = after + best_g->interval_usec - late % best_g->interval_usec;
                }
        }
        /* Stopping: answer what is still queued. */
        while (l->jobs) {
                struct mb_job *j = l->jobs;
                l->jobs = j->next;
                post_result(l->a, j->device, j->cmd_id, 503, "{\"error\":\"adapter stopping\"}");
                job_free(j);
        }
        l->jobs_tail = NULL;
        l->n_jobs = 0;
        pthread_mutex_unlock(&l->lock);
        line_close(l);
        return NULL;
}

/* ---- lines (loop thread) ----------------------------------------------------------------- */

static struct mb_line *line_free(struct mb_line *l) {
        if (!l)
                return NULL;
        for (size_t i = 0; i < l->n_devs; i++)
                adp_modbus_device_free(l->devs[i]);
        for (size_t i = 0; i < l->n_retired; i++)
                adp_modbus_device_free(l->retired[i]);
        while (l->jobs) {
                struct mb_job *j = l->jobs;
                l->jobs = j->next;
                job_free(j);
        }
        free(l->devs);
        free(l->retired);
        free(l->qual_buf.p);
        free(l->rep_buf.p);
        free(l->conf.host);
        free(l->conf.device);
        pthread_mutex_destroy(&l->lock);
        pthread_cond_destroy(&l->cond);
        free(l);
        return NULL;
}

static int line_new(struct mb_adapter *a, const struct adp_modbus_line_conf *lc, struct mb_line **ret) {
        struct mb_line *l = calloc(1, sizeof *l);
        if (!l)
                return -ENOMEM;
        l->a = a;
        l->conf = *lc;
        l->conf.host = lc->host ? strdup(lc->host) : NULL;
        l->conf.device = lc->device ? strdup(lc->device) : NULL;
        pthread_mutex_init(&l->lock, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&l->cond, &ca);
        pthread_condattr_destroy(&ca);
        l->started_usec = adp_modbus_now();
        if ((lc->host && !l->conf.host) || (lc->device && !l->conf.device)) {
                line_free(l);
                return -ENOMEM;
        }
        *ret = l;
        return 0;
}

/* Claims the serial port (RTU) across adapters, then starts the worker. */
static int line_start(struct mb_line *l) {
        const struct adp_host *h = l->a->host;
        if (l->conf.transport == ADP_MODBUS_RTU) {
                const char *owner = NULL;
                int r = h->port_claim(h->host, l->conf.device, &owner);
                if (r < 0) {
                        char why[600];
                        if (r == -EBUSY)
                                snprintf(why, sizeof why, "serial port %s is already owned by adapter \"%s\"",
                                         l->conf.device, owner ? owner : "?");
                        else
                                snprintf(why, sizeof why, "cannot claim serial port %s: %s", l->conf.device,
                                         strerror(-r));
                        mlog(l->a, LOG_ERR, NULL, NULL, 0, "Modbus line %s: %s; its devices stay offline",
                             l->conf.key, why);
                        for (size_t i = 0; i < l->n_devs; i++)
                                h->device_state(h->host, l->devs[i]->id, ADP_DEVICE_ERROR, why);
                        return 0; /* not fatal for the adapter: the others run */
                }
                l->port_claimed = true;
        }
        int r = -pthread_create(&l->thread, NULL, line_worker, l);
        if (r < 0)
                return r;
        l->thread_started = true;
        return 0;
}

static void line_stop(struct mb_line *l) {
        if (l->thread_started) {
                pthread_mutex_lock(&l->lock);
                l->stop = true;
                pthread_cond_signal(&l->cond);
                pthread_mutex_unlock(&l->lock);
                pthread_join(l->thread, NULL);
                l->thread_started = false;
        }
        if (l->port_claimed) {
                l->a->host->port_release(l->a->host->host, l->conf.device);
                l->port_claimed = false;
        }
}

static struct mb_line *adapter_find_line(struct mb_adapter *a, const char *key) {
        for (size_t i = 0; i < a->n_lines; i++)
                if (streq(a->lines[i]->conf.key, key))
                        return a->lines[i];
        return NULL;
}

static struct mb_line *adapter_line_of_device(struct mb_adapter *a, const char *id) {
        for (size_t i = 0; i < a->n_lines; i++)
                if (line_find_device(a->lines[i], id))
                        return a->lines[i];
        return NULL;
}

/* ---- ops --------------------------------------------------------------------------------- */

int adp_modbus_validate(const struct adp_conf_node *item, struct adp_conf_errors *e) {
        struct adp_modbus_config *c = NULL;
        int r = adp_modbus_config_parse(item, &c, e);
        adp_modbus_config_free(c);
        return r;
}

static int mb_init(void *priv, const struct adp_init_info *info, struct adp_conf_errors *e) {
        struct mb_adapter *a = priv;
        pthread_mutex_init(&a->ev_lock, NULL);
        a->ev_lock_init = true;
        a->name = strdup(info->name);
        if (!a->name)
                return -ENOMEM;
        return adp_modbus_config_parse(info->item, &a->conf, e);
}

/* Moves the devices of conf into lines (creating lines as needed). Loop thread; the lines
 * are not running yet. */
static int adapter_build_lines(struct mb_adapter *a, struct adp_modbus_config *conf) {
        for (size_t i = 0; i < conf->n_devices; i++) {
                struct adp_modbus_device *d = conf->devices[i];
                struct mb_line *l = adapter_find_line(a, d->line.key);
                if (!l) {
                        struct mb_line **nl = realloc(a->lines, (a->n_lines + 1) * sizeof *nl);
                        if (!nl)
                                return -ENOMEM;
                        a->lines = nl;
                        int r = line_new(a, &d->line, &l);
                        if (r < 0)
                                return r;
                        a->lines[a->n_lines++] = l;
                }
                struct adp_modbus_device **nd = realloc(l->devs, (l->n_devs + 1) * sizeof *nd);
                if (!nd)
                        return -ENOMEM;
                l->devs = nd;
                l->devs[l->n_devs++] = adp_modbus_config_take(conf, i);
        }
        return 0;
}

static int mb_start(void *priv, const struct adp_host *host) {
        struct mb_adapter *a = priv;
        int r;
        a->host = host;
        if (!a->conf)
                return -EINVAL;
        for (size_t i = 0; i < a->conf->n_devices; i++) {
                r = host->device_add(host->host, a->conf->devices[i]->id);
                if (r < 0) {
                        mlog(a, LOG_ERR, a->conf->devices[i]->id, NULL, r, "Cannot add device: %m");
                        return r;
                }
        }
        r = adapter_build_lines(a, a->conf);
        if (r < 0)
                return r;
        for (size_t i = 0; i < a->n_lines; i++) {
                r = line_start(a->lines[i]);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Parses a JSON value for a point into an adp_modbus_value. */
static int value_from_json(const json_t *j, struct adp_modbus_value *ret) {
        struct adp_modbus_value v = { 0 };
        if (json_is_integer(j)) {
                v.kind = ADP_MODBUS_V_INT;
                v.i = json_integer_value(j);
        } else if (json_is_real(j)) {
                v.kind = ADP_MODBUS_V_DOUBLE;
                v.d = json_real_value(j);
        } else if (json_is_boolean(j)) {
                v.kind = ADP_MODBUS_V_BOOL;
                v.b = json_is_true(j);
        } else if (json_is_string(j)) {
                const char *s = json_string_value(j);
                char *end;
                errno = 0;
                /* Decimal strings carry uint64 values JSON numbers cannot hold exactly. */
                unsigned long long u = strtoull(s, &end, 10);
                if (*s && *s != '-' && !*end && errno == 0) {
                        v.kind = ADP_MODBUS_V_UINT;
                        v.u = u;
                } else {
                        v.kind = ADP_MODBUS_V_STRING;
                        if (strlen(s) >= sizeof v.s)
                                return -E2BIG;
                        snprintf(v.s, sizeof v.s, "%s", s);
                }
        } else
                return -EINVAL;
        *ret = v;
        return 0;
}

static int queue_job(struct mb_line *l, struct mb_job *j) {
        pthread_mutex_lock(&l->lock);
        if (l->n_jobs >= MAX_JOBS || !l->thread_started) {
                pthread_mutex_unlock(&l->lock);
                return l->thread_started ? -ENOBUFS : -ENOTCONN;
        }
        if (l->jobs_tail)
                l->jobs_tail->next = j;
        else
                l->jobs = j;
        l->jobs_tail = j;
        l->n_jobs++;
        pthread_cond_signal(&l->cond);
        pthread_mutex_unlock(&l->lock);
        return 0;
}

static _printf_(4, 5) int answer(struct mb_adapter *a, uint64_t id, int status, const char *fmt, ...) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        a->host->command_result(a->host->host, id, status, buf);
        return 0;
}

static int mb_submit(void *priv, const struct adp_command *cmd) {
        struct mb_adapter *a = priv;
        struct mb_line *l = adapter_line_of_device(a, cmd->device_id);
        if (!l)
                return -ENOENT;
        /* The device object is only read here for its point map, which is immutable while it
         * is in the line (reload replaces the whole object on the loop thread). */
        struct adp_modbus_device *d = line_find_device(l, cmd->device_id);
        json_error_t jerr;
        _cleanup_(json_decrefp) json_t *j = NULL;
        struct mb_job *job = NULL;
        int r;

        if (cmd->kind == ADP_CMD_C2D)
                return -EOPNOTSUPP;
        j = json_loadb(cmd->payload, cmd->payload_len, JSON_DECODE_ANY, &jerr);
        if (!j)
                return answer(a, cmd->id, 400, "{\"error\":\"payload is not JSON\"}");
        job = calloc(1, sizeof *job);
        if (!job || !(job->device = strdup(cmd->device_id))) {
                job_free(job);
                return -ENOMEM;
        }
        job->cmd_id = cmd->id;

        if (cmd->kind == ADP_CMD_DESIRED || (cmd->kind == ADP_CMD_METHOD && streq(cmd->name, "write"))) {
                job->kind = JOB_WRITE;
                job->is_method = cmd->kind == ADP_CMD_METHOD;
                json_t *targets = j;
                _cleanup_(json_decrefp) json_t *one = NULL;
                if (job->is_method) {
                        const char *pn = json_string_value(json_object_get(j, "point"));
                        json_t *val = json_object_get(j, "value");
                        if (!pn || !val) {
                                job_free(job);
                                return answer(a, cmd->id, 400, "{\"error\":\"expected {\\\"point\\\": name, \\\"value\\\": value}\"}");
                        }
                        one = json_object();
                        if (!one || json_object_set(one, pn, val) < 0) {
                                job_free(job);
                                return -ENOMEM;
                        }
                        targets = one;
                } else if (!json_is_object(j)) {
                        job_free(job);
                        return answer(a, cmd->id, 400, "{\"error\":\"desired patch is not an object\"}");
                }
                size_t n = json_object_size(targets);
                job->writes = calloc(n ? n : 1, sizeof *job->writes);
                if (!job->writes) {
                        job_free(job);
                        return -ENOMEM;
                }
                const char *key;
                json_t *val;
                json_object_foreach(targets, key, val) {
                        if (key[0] == '$' || streq(key, "modbus"))
                                continue;
                        int pi = adp_modbus_point_find(d, key);
                        if (pi < 0 || !d->points[pi].writable) {
                                mlog(a, LOG_WARNING, d->id, key, 0, "%s %s: %s, ignoring",
                                     job->is_method ? "Method write of" : "Desired property", key,
                                     pi < 0 ? "no such point" : "the point is not writable");
                                if (job->is_method) {
                                        job_free(job);
                                        return answer(a, cmd->id, pi < 0 ? 404 : 403, "{\"error\":\"%s\",\"point\":\"%s\"}",
                                                      pi < 0 ? "no such point" : "point is not writable", key);
                                }
                                continue;
                        }
                        if (json_is_null(val))
                                continue; /* a deleted desired property: nothing to write */
                        r = value_from_json(val, &job->writes[job->n_writes].v);
                        if (r < 0) {
                                mlog(a, LOG_WARNING, d->id, key, 0, "Value for point %s is not a number, bool or string, ignoring", key);
                                if (job->is_method) {
                                        job_free(job);
                                        return answer(a, cmd->id, 400, "{\"error\":\"invalid value\",\"point\":\"%s\"}", key);
                                }
                                continue;
                        }
                        job->writes[job->n_writes++].point = (size_t) pi;
                }
                if (job->n_writes == 0) {
                        job_free(job);
                        return answer(a, cmd->id, 200, "{}");
                }
        } else if (cmd->kind == ADP_CMD_METHOD && streq(cmd->name, "read")) {
                int idx = -1;
                const char *t = json_string_value(json_object_get(j, "table"));
                for (int i = 0; t && adp_modbus_table_names[i]; i++)
                        if (streq(adp_modbus_table_names[i], t))
                                idx = i;
                json_t *ja = json_object_get(j, "address"), *jc = json_object_get(j, "count");
                json_int_t addr = json_integer_value(ja), count = jc ? json_integer_value(jc) : 1;
                bool bits = idx == ADP_MODBUS_COIL || idx == ADP_MODBUS_DISCRETE_INPUT;
                json_int_t maxc = bits ? MODBUS_MAX_READ_BITS : MODBUS_MAX_READ_REGISTERS;
                if (idx < 0 || !json_is_integer(ja) || (jc && !json_is_integer(jc)) || addr < 0 || addr > 65535 ||
                    count < 1 || count > maxc || addr + count > 65536) {
                        job_free(job);
                        return answer(a, cmd->id, 400,
                                      "{\"error\":\"expected {\\\"table\\\": coil|discrete_input|input_register|"
                                      "holding_register, \\\"address\\\": 0..65535, \\\"count\\\": 1..%lld}\"}",
                                      (long long) maxc);
                }
                job->kind = JOB_READ;
                job->table = (enum adp_modbus_table) idx;
                job->address = (uint16_t) addr;
                job->count = (uint16_t) count;
        } else {
                job_free(job);
                return answer(a, cmd->id, 501, "{\"error\":\"unknown method %s; this device has read and write\"}",
                              cmd->name ? cmd->name : "?");
        }
        r = queue_job(l, job);
        if (r < 0) {
                job_free(job);
                return answer(a, cmd->id, 503, "{\"error\":\"%s\"}", r == -ENOBUFS ? "too many pending commands" : "line not running");
        }
        return 0;
}

static int mb_reconfigure(void *priv, const struct adp_init_info *info, struct adp_conf_errors *e) {
        struct mb_adapter *a = priv;
        struct adp_modbus_config *nc = NULL;
        const struct adp_host *h = a->host;
        int r = adp_modbus_config_parse(info->item, &nc, e);
        if (r < 0)
                return r;

        /* 1. Lines whose settings changed, or that lost every device, stop as a whole. */
        for (size_t i = 0; i < a->n_lines;) {
                struct mb_line *l = a->lines[i];
                bool keep = false;
                for (size_t k = 0; k < nc->n_devices; k++) {
                        const struct adp_modbus_line_conf *lc = &nc->devices[k]->line;
                        if (streq(lc->key, l->conf.key) && lc->baud == l->conf.baud && lc->parity == l->conf.parity &&
                            lc->data_bits == l->conf.data_bits && lc->stop_bits == l->conf.stop_bits &&
                            lc->rs485 == l->conf.rs485 && lc->rts_delay_usec == l->conf.rts_delay_usec &&
                            lc->turnaround_usec == l->conf.turnaround_usec && lc->timeout_usec == l->conf.timeout_usec &&
                            lc->backoff_min_usec == l->conf.backoff_min_usec &&
                            lc->backoff_max_usec == l->conf.backoff_max_usec)
                                keep = true;
                }
                if (keep) {
                        i++;
                        continue;
                }
                line_stop(l);
                for (size_t k = 0; k < l->n_devs; k++) {
                        bool still = false;
                        for (size_t m = 0; m < nc->n_devices; m++)
                                still = still || streq(nc->devices[m]->id, l->devs[k]->id);
                        if (!still)
                                h->device_remove(h->host, l->devs[k]->id);
                }
                line_free(l);
                memmove(a->lines + i, a->lines + i + 1, (a->n_lines - i - 1) * sizeof *a->lines);
                a->n_lines--;
        }

        /* 2. In kept lines: unchanged devices stay (same object, same schedule); changed ones
         * are swapped; removed ones retired. */
        for (size_t i = 0; i < a->n_lines; i++) {
                struct mb_line *l = a->lines[i];
                pthread_mutex_lock(&l->lock);
                size_t n_new = 0;
                for (size_t k = 0; k < nc->n_devices; k++)
                        if (nc->devices[k] && streq(nc->devices[k]->line.key, l->conf.key))
                                n_new++;
                struct adp_modbus_device **nd = calloc(n_new ? n_new : 1, sizeof *nd);
                struct adp_modbus_device **nr = realloc(l->retired, (l->n_retired + l->n_devs + 1) * sizeof *nr);
                if (nr)
                        l->retired = nr;
                if (!nd || !nr) {
                        pthread_mutex_unlock(&l->lock);
                        free(nd);
                        adp_modbus_config_free(nc);
                        return -ENOMEM;
                }
                size_t o = 0;
                for (size_t k = 0; k < nc->n_devices; k++) {
                        struct adp_modbus_device *d = nc->devices[k];
                        if (!d || !streq(d->line.key, l->conf.key))
                                continue;
                        struct adp_modbus_device *old = line_find_device(l, d->id);
                        if (old && old->hash == d->hash) {
                                nd[o++] = old;          /* untouched */
                                old->removed = false;
                        } else {
                                if (!old)
                                        (void) h->device_add(h->host, d->id);
                                else
                                        mlog(a, LOG_INFO, d->id, NULL, 0, "Device configuration changed, restarting its polling");
                                nd[o++] = adp_modbus_config_take(nc, k);
                        }
                        if (old)
                                old->removed = !(old->hash == d->hash);
                        if (nc->devices[k] == NULL)
                                continue;
                        /* kept: the new (identical) parse is dropped */
                        adp_modbus_device_free(adp_modbus_config_take(nc, k));
                }
                for (size_t k = 0; k < l->n_devs; k++) {
                        bool kept = false;
                        for (size_t m = 0; m < o; m++)
                                kept = kept || nd[m] == l->devs[k];
                        if (kept)
                                continue;
                        bool renamed_away = true;
                        for (size_t m = 0; m < o; m++)
                                if (streq(nd[m]->id, l->devs[k]->id))
                                        renamed_away = false;
                        if (renamed_away)
                                h->device_remove(h->host, l->devs[k]->id);
                        l->retired[l->n_retired++] = l->devs[k];
                }
                free(l->devs);
                l->devs = nd;
                l->n_devs = o;
                pthread_cond_signal(&l->cond);
                pthread_mutex_unlock(&l->lock);
        }

        /* 3. What is left in nc goes to new lines. */
        size_t first_new = a->n_lines;
        struct adp_modbus_config rest = { .devices = nc->devices, .n_devices = nc->n_devices };
        for (size_t k = 0; k < nc->n_devices; k++)
                if (nc->devices[k])
                        (void) h->device_add(h->host, nc->devices[k]->id);
        size_t n = 0;
        for (size_t k = 0; k < nc->n_devices; k++)
                if (nc->devices[k])
                        nc->devices[n++] = nc->devices[k];
        rest.n_devices = n;
        r = adapter_build_lines(a, &rest);
        nc->n_devices = 0;
        for (size_t i = first_new; r >= 0 && i < a->n_lines; i++)
                r = line_start(a->lines[i]);
        adp_modbus_config_free(nc);
        free(a->name);
        a->name = strdup(info->name);
        return r < 0 ? r : 0;
}

static char *mb_stats(void *priv) {
        struct mb_adapter *a = priv;
        json_t *lines = json_array();
        for (size_t i = 0; lines && i < a->n_lines; i++) {
                struct mb_line *l = a->lines[i];
                pthread_mutex_lock(&l->lock);
                uint64_t el = adp_modbus_now() - l->started_usec;
                double secs = el / 1e6;
                json_t *o = json_pack("{s:s, s:I, s:f, s:I, s:f, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:b, s:s?, "
                                      "s:I, s:I}",
                                      "line", l->conf.key,
                                      "transactions", (json_int_t) l->transactions,
                                      "transactionsPerSecond", secs > 0 ? l->transactions / secs : 0.0,
                                      "registersRead", (json_int_t) atomic_load(&l->registers_read),
                                      "utilisation", el ? (double) l->busy_usec / (double) el : 0.0,
                                      "timeouts", (json_int_t) l->timeouts,
                                      "retries", (json_int_t) l->retries,
                                      "crcErrors", (json_int_t) l->crc_errors,
                                      "exceptions", (json_int_t) l->exceptions,
                                      "wrongUnit", (json_int_t) l->wrong_unit,
                                      "otherErrors", (json_int_t) l->other_errors,
                                      "connects", (json_int_t) l->reconnects,
                                      "minSilenceMs", l->silence_min_usec / 1000.0,
                                      "connected", l->conn_error[0] == 0 && l->thread_started,
                                      "lastError", l->conn_error[0] ? l->conn_error : NULL,
                                      "overruns", (json_int_t) l->overruns,
                                      "heldBack", (json_int_t) l->held);
                if (o) {
                        /* Mean time inside a transaction (request out to response in), and mean
                         * worker time from one transaction to the next when polls are due back
                         * to back: the gateway's own cost per transaction on the line. */
                        json_object_set_new(o, "meanTransactionMs",
                                            json_real(l->transactions ? l->busy_usec / 1000.0 / l->transactions : 0));
                        json_object_set_new(o, "meanBetweenMs",
                                            json_real(l->n_between ? l->between_usec / 1000.0 / l->n_between : 0));
                }
                if (o && l->conf.transport == ADP_MODBUS_RTU) {
                        /* The line's ceiling: back-to-back transactions of one register. */
                        uint64_t t = adp_modbus_rtu_transaction_usec(&l->conf, ADP_MODBUS_HOLDING_REGISTER, 1);
                        json_object_set_new(o, "ceilingTransactionsPerSecond", json_real(t ? 1e6 / t : 0));
                        json_object_set_new(o, "requiredSilenceMs",
                                            json_real(adp_modbus_rtu_silence_usec(&l->conf) / 1000.0));
                }
                pthread_mutex_unlock(&l->lock);
                if (o)
                        json_array_append_new(lines, o);
        }
        json_t *root = json_pack("{s:o}", "lines", lines ? lines : json_array());
        char *s = root ? json_dumps(root, JSON_COMPACT) : NULL;
        json_decref(root);
        return s;
}

/* Joins the workers. What they posted last (telemetry of the final cycles, answers of the
 * commands still queued) runs after this, while the devices still exist: the host removes
 * them once the inbox is drained, so nothing polled is lost on a clean stop. */
static void mb_stop(void *priv) {
        struct mb_adapter *a = priv;
        a->stopping = true;
        for (size_t i = 0; i < a->n_lines; i++)
                line_stop(a->lines[i]);
}

static void mb_fini(void *priv) {
        struct mb_adapter *a = priv;
        for (size_t i = 0; i < a->n_lines; i++)
                line_free(a->lines[i]);
        free(a->lines);
        adp_modbus_config_free(a->conf);
        free(a->name);
        if (a->ev_lock_init) {
                events_drop(a);
                pthread_mutex_destroy(&a->ev_lock);
        }
}

const struct adp_ops adp_modbus_ops = {
        .version = ADP_OPS_VERSION,
        .type = "modbus",
        .priv_size = sizeof(struct mb_adapter),
        .init = mb_init,
        .start = mb_start,
        .submit = mb_submit,
        .reconfigure = mb_reconfigure,
        .stats = mb_stats,
        .stop = mb_stop,
        .fini = mb_fini,
};
