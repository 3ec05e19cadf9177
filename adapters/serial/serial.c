/* SPDX-License-Identifier: MIT */
/* The serial adapter: one port per device, owned on the host's event loop (no threads). Bytes
 * read from the port go through the device's framer, integrity check and message decoders;
 * decoded frames become telemetry, or the response of a command waiting for that reply.
 * Commands (direct methods, C2D messages, polls) are rendered from templates and sent one at
 * a time: a command with an expected reply holds the line until the reply or its timeout.
 * A port that vanishes (USB unplug, the peer of a pty gone) is closed and reopened with
 * exponential backoff; the device is offline meanwhile. */

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "adapter/adapter.h"
#include "adp-util.h"
#include "adp-serial.h"
#include "hub/msg.h"
#include "serial-internal.h"

#define MAX_QUEUE 64u
#define READ_CHUNK 4096u
#define WBUF_MAX (256u * 1024u)

struct sa;
struct sdev;

struct scmd {
        struct scmd *next;
        uint64_t id;            /* host command id; 0 for a poll */
        bool has_id;
        int cmd;                /* index in the device's commands */
        uint8_t *bytes;
        size_t n;
};

struct spoll {
        struct sdev *d;
        size_t index;
        struct adp_timer *timer;
        bool queued;
};

struct sdev {
        struct sa *a;
        const struct adp_serial_device_conf *c;
        int fd;
        struct adp_watch *watch;
        struct adp_timer *reopen_timer, *idle_timer, *reply_timer, *report_timer;
        struct spoll *polls;
        struct adp_serial_stream stream;
        bool stream_ready;
        void *plugin_state;
        bool claimed, added;
        char claim_path[PATH_MAX];
        uint64_t backoff_usec;
        enum adp_device_state state;
        char last_error[512];
        uint8_t *wbuf;
        size_t wlen;
        struct scmd *q_head, *q_tail;
        size_t n_q;
        struct scmd *inflight;
        uint64_t bytes_in, bytes_out, frames, telemetry, check_errors, decode_errors, unmatched, commands,
                replies, reply_timeouts, reopens, write_errors;
        char last_kind[64];
        bool dirty;
};

struct sa {
        char *name;
        struct adp_serial_config *conf;
        const struct adp_host *host;
        struct sdev *devs;
        size_t n_devs;
        bool stopping;
};

#define slog(a, level, dev, key, err, ...) adp_logf((a)->host, level, dev, key, err, __VA_ARGS__)

static const char *state_name(enum adp_device_state s) {
        static const char *const n[] = { "connecting", "online", "offline", "error" };
        return s < _ADP_DEVICE_STATE_MAX ? n[s] : "?";
}

static void report(struct sdev *d) {
        struct sa *a = d->a;
        json_t *o = json_pack("{s:{s:s,s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}}", "serial", "state",
                              state_name(d->state), "port", d->c->port.device, "bytesIn", (json_int_t) d->bytes_in,
                              "frames", (json_int_t) d->frames, "telemetry", (json_int_t) d->telemetry, "checkErrors",
                              (json_int_t) d->check_errors, "decodeErrors", (json_int_t) d->decode_errors,
                              "unmatched", (json_int_t) d->unmatched, "framingErrors",
                              (json_int_t) (d->stream.st.oversize + d->stream.st.bad_encoding), "commands",
                              (json_int_t) d->commands, "replyTimeouts", (json_int_t) d->reply_timeouts, "reopens",
                              (json_int_t) d->reopens);
        if (!o)
                return;
        json_t *s = json_object_get(o, "serial");
        json_object_set_new(s, "lastError", d->last_error[0] ? json_string(d->last_error) : json_null());
        if (d->last_kind[0])
                json_object_set_new(s, "lastMessage", json_string(d->last_kind));
        char *txt = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        if (txt && !a->stopping)
                (void) a->host->report(a->host->host, d->c->name, txt);
        free(txt);
        d->dirty = false;
}

static void set_state(struct sdev *d, enum adp_device_state st, const char *why) {
        struct sa *a = d->a;
        if (why) {
                size_t l = strnlen(why, sizeof d->last_error - 1);
                memcpy(d->last_error, why, l);
                d->last_error[l] = 0;
        }
        if (d->state == st && st == ADP_DEVICE_ONLINE)
                return;
        d->state = st;
        if (!a->stopping)
                a->host->device_state(a->host->host, d->c->name, st, st == ADP_DEVICE_ONLINE ? NULL : why);
        report(d);
}

/* ---- commands ---------------------------------------------------------------------------- */

static _printf_(4, 5) void result(struct sdev *d, uint64_t id, int status, const char *fmt, ...) {
        char msg[600];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        json_t *o = status < 300 ? json_pack("{s:s}", "result", msg) : json_pack("{s:s}", "error", msg);
        char *txt = o ? json_dumps(o, JSON_COMPACT) : NULL;
        d->a->host->command_result(d->a->host->host, id, status, txt);
        free(txt);
        json_decref(o);
}

static void scmd_free(struct scmd *c) {
        if (c) {
                free(c->bytes);
                free(c);
        }
}

static void poll_done(struct sdev *d, struct scmd *c) {
        for (size_t i = 0; i < d->c->n_polls; i++)
                if (!c->has_id && d->c->polls[i].command == c->cmd)
                        d->polls[i].queued = false;
}

/* Fails every queued and in-flight command (port lost, stop). */
static void fail_all(struct sdev *d, int status, const char *why) {
        struct scmd *c;
        d->a->host->timer_set(d->a->host->host, d->reply_timer, 0);
        if ((c = d->inflight)) {
                d->inflight = NULL;
                if (c->has_id)
                        result(d, c->id, status, "%s", why);
                poll_done(d, c);
                scmd_free(c);
        }
        while ((c = d->q_head)) {
                d->q_head = c->next;
                if (c->has_id)
                        result(d, c->id, status, "%s", why);
                poll_done(d, c);
                scmd_free(c);
        }
        d->q_tail = NULL;
        d->n_q = 0;
}

static void port_lost(struct sdev *d, const char *why);

static void on_io(void *ud, int fd, uint32_t revents);

static int port_write(struct sdev *d, const uint8_t *p, size_t n) {
        const struct adp_host *h = d->a->host;
        if (d->wlen == 0) {
                ssize_t k = write(d->fd, p, n);
                if (k < 0 && errno != EAGAIN && errno != EINTR)
                        return -errno;
                if (k > 0) {
                        p += k;
                        n -= (size_t) k;
                        d->bytes_out += (uint64_t) k;
                }
                if (n == 0)
                        return 0;
        }
        if (d->wlen + n > WBUF_MAX)
                return -ENOBUFS;
        uint8_t *nb = realloc(d->wbuf, d->wlen + n);
        if (!nb)
                return -ENOMEM;
        d->wbuf = nb;
        memcpy(d->wbuf + d->wlen, p, n);
        d->wlen += n;
        return h->watch_set_events(h->host, d->watch, EPOLLIN | EPOLLOUT);
}

static void pump(struct sdev *d) {
        const struct adp_host *h = d->a->host;
        while (!d->inflight && d->q_head && d->fd >= 0) {
                struct scmd *c = d->q_head;
                const struct adp_serial_command *cc = &d->c->commands[c->cmd];
                d->q_head = c->next;
                if (!d->q_head)
                        d->q_tail = NULL;
                d->n_q--;
                int r = port_write(d, c->bytes, c->n);
                d->commands++;
                d->dirty = true;
                if (r < 0) {
                        d->write_errors++;
                        slog(d->a, LOG_WARNING, d->c->name, "write", r, "Cannot write command %s to %s: %m", cc->name,
                             d->c->port.device);
                        if (c->has_id)
                                result(d, c->id, 502, "cannot write to %s: %s", d->c->port.device, strerror(-r));
                        poll_done(d, c);
                        scmd_free(c);
                        continue;
                }
                if (cc->reply_index >= 0) {
                        d->inflight = c;
                        h->timer_set(h->host, d->reply_timer, h->now(h->host) + cc->timeout_usec);
                        return;
                }
                if (c->has_id)
                        result(d, c->id, 200, "sent %zu bytes", c->n);
                poll_done(d, c);
                scmd_free(c);
        }
}

static void on_reply_timeout(void *ud, uint64_t usec) {
        struct sdev *d = ud;
        struct scmd *c = d->inflight;
        if (!c)
                return;
        const struct adp_serial_command *cc = &d->c->commands[c->cmd];
        d->inflight = NULL;
        d->reply_timeouts++;
        d->dirty = true;
        char ts[32];
        adp_format_duration(cc->timeout_usec, ts, sizeof ts);
        slog(d->a, LOG_WARNING, d->c->name, "reply-timeout", 0, "No %s reply to command %s within %s", cc->reply,
             cc->name, ts);
        if (c->has_id)
                result(d, c->id, 504, "no %s reply from the instrument within %s", cc->reply, ts);
        poll_done(d, c);
        scmd_free(c);
        pump(d);
}

/* Renders a command into framed bytes. 0, or -EINVAL with why. */
static int render(struct sdev *d, const struct adp_serial_command *cc, const char *args_text, uint8_t **ret,
                  size_t *ret_n, char *why, size_t why_size) {
        size_t cap = d->c->framing.max_length * 2 + 512;
        _cleanup_free_ uint8_t *raw = malloc(cap), *out = malloc(2 * cap + 16);
        json_t *args = NULL;
        ssize_t n;
        if (!raw || !out)
                return -ENOMEM;
        if (cc->plugin) {
                n = cc->plugin->encode(d->plugin_state, cc->name, args_text ? args_text : "null", out, 2 * cap + 16);
                if (n < 0) {
                        snprintf(why, why_size, "plugin refused the command: %s", strerror((int) -n));
                        return -EINVAL;
                }
                *ret_n = (size_t) n;
                *ret = TAKE_PTR(out);
                return 0;
        }
        if (args_text && *args_text) {
                json_error_t je;
                args = json_loads(args_text, JSON_DECODE_ANY, &je);
                if (!args) {
                        snprintf(why, why_size, "the arguments are not JSON: %s", je.text);
                        return -EINVAL;
                }
                if (!json_is_object(args) && !json_is_null(args)) {
                        json_decref(args);
                        snprintf(why, why_size, "the arguments must be a JSON object");
                        return -EINVAL;
                }
        }
        n = adp_serial_command_render(cc, args, raw, cap - 16, why, why_size);
        json_decref(args);
        if (n < 0)
                return -EINVAL;
        if (cc->append_check) {
                n = adp_serial_check_append(&d->c->check, raw, (size_t) n, cap);
                if (n < 0) {
                        snprintf(why, why_size, "cannot append the check: the request is too short");
                        return -EINVAL;
                }
        }
        n = adp_serial_frame_encode(&d->c->framing, raw, (size_t) n, out, 2 * cap + 16);
        if (n < 0) {
                snprintf(why, why_size, "the request is too long");
                return -EINVAL;
        }
        *ret_n = (size_t) n;
        *ret = TAKE_PTR(out);
        return 0;
}

static int enqueue(struct sdev *d, int cmd, bool has_id, uint64_t id, const char *args, char *why, size_t why_size) {
        if (d->n_q >= MAX_QUEUE)
                return -ENOBUFS;
        struct scmd *c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->cmd = cmd;
        c->has_id = has_id;
        c->id = id;
        int r = render(d, &d->c->commands[cmd], args, &c->bytes, &c->n, why, why_size);
        if (r < 0) {
                scmd_free(c);
                return r;
        }
        if (d->q_tail)
                d->q_tail->next = c;
        else
                d->q_head = c;
        d->q_tail = c;
        d->n_q++;
        pump(d);
        return 0;
}

static void on_poll(void *ud, uint64_t usec) {
        struct spoll *p = ud;
        struct sdev *d = p->d;
        const struct adp_host *h = d->a->host;
        const struct adp_serial_poll *pc = &d->c->polls[p->index];
        h->timer_set(h->host, p->timer, usec + pc->interval_usec);
        if (d->fd < 0 || p->queued)
                return; /* offline, or the previous request is still waiting */
        char why[512];
        p->queued = true;
        int r = enqueue(d, pc->command, false, 0, pc->args, why, sizeof why);
        if (r < 0) {
                p->queued = false;
                slog(d->a, LOG_WARNING, d->c->name, "poll", r, "Cannot send poll request %s: %s",
                     d->c->commands[pc->command].name, r == -EINVAL ? why : strerror(-r));
        }
}

/* ---- frames ------------------------------------------------------------------------------ */

static void emit(struct sdev *d, const struct adp_serial_message *m, json_t *values) {
        struct sa *a = d->a;
        struct timespec ts;
        struct tm tm;
        char iso[64];
        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        size_t k = strftime(iso, sizeof iso, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(iso + k, sizeof iso - k, ".%03ldZ", ts.tv_nsec / 1000000);
        json_t *o = json_pack("{s:s,s:s,s:O}", "kind", m->name, "ts", iso, "values", values);
        char *body = o ? adp_json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        struct hub_msg *msg = NULL;
        int r = body ? adp_telemetry_new(body, a->name, "serial", "messageKind", m->name, &msg) : -ENOMEM;
        free(body);
        if (r >= 0)
                r = a->host->emit(a->host->host, d->c->name, msg);
        if (r < 0)
                slog(a, LOG_WARNING, d->c->name, "emit", r, "Cannot queue telemetry: %m, dropping one %s frame", m->name);
        else
                d->telemetry++;
        hub_msg_unref(msg);
}

static int on_frame(void *ud, const uint8_t *frame, size_t len) {
        struct sdev *d = ud;
        const struct adp_serial_device_conf *c = d->c;
        int r = adp_serial_check_verify(&c->check, frame, len);
        d->dirty = true;
        if (r < 0) {
                d->check_errors++;
                slog(d->a, LOG_WARNING, c->name, "check", 0, "Dropped a %zu-byte frame from %s: %s %s", len,
                     c->port.device, adp_serial_check_names[c->check.type],
                     r == -ERANGE ? "check does not fit the frame (too short)" : "check failed");
                return -EBADMSG;
        }
        d->frames++;
        int i = adp_serial_match(c->messages, c->n_messages, frame, len);
        if (i < 0) {
                d->unmatched++;
                slog(d->a, LOG_DEBUG, c->name, "unmatched", 0, "A %zu-byte frame matches no message kind", len);
                return 0;
        }
        const struct adp_serial_message *m = &c->messages[i];
        json_t *values = NULL;
        r = adp_serial_decode(m, d->plugin_state, frame, len, &values);
        if (r < 0) {
                d->decode_errors++;
                slog(d->a, LOG_WARNING, c->name, "decode", 0, "Cannot decode a %zu-byte %s frame: %s", len, m->name,
                     r == -ENOMEM ? "out of memory" : "it does not fit the declaration");
                return 0;
        }
        snprintf(d->last_kind, sizeof d->last_kind, "%s", m->name);
        if (d->inflight && c->commands[d->inflight->cmd].reply_index == i) {
                struct scmd *cmd = d->inflight;
                d->inflight = NULL;
                d->replies++;
                d->a->host->timer_set(d->a->host->host, d->reply_timer, 0);
                if (cmd->has_id) {
                        json_t *o = json_pack("{s:s,s:O}", "kind", m->name, "values", values);
                        char *txt = o ? adp_json_dumps(o, JSON_COMPACT) : NULL;
                        d->a->host->command_result(d->a->host->host, cmd->id, 200, txt);
                        free(txt);
                        json_decref(o);
                }
                poll_done(d, cmd);
                scmd_free(cmd);
                pump(d);
        }
        if (m->emit)
                emit(d, m, values);
        json_decref(values);
        return 0;
}

static void on_idle(void *ud, uint64_t usec) {
        struct sdev *d = ud;
        adp_serial_stream_idle(&d->stream, on_frame, d);
}

/* ---- the port ---------------------------------------------------------------------------- */

static void try_open(struct sdev *d);

static void on_reopen(void *ud, uint64_t usec) {
        try_open(ud);
}

static void close_port(struct sdev *d) {
        const struct adp_host *h = d->a->host;
        h->watch_free(h->host, d->watch);
        d->watch = NULL;
        if (d->fd >= 0)
                close(d->fd);
        d->fd = -1;
        d->wlen = 0;
        h->timer_set(h->host, d->idle_timer, 0);
        adp_serial_stream_reset(&d->stream);
}

static void schedule_reopen(struct sdev *d) {
        const struct adp_host *h = d->a->host;
        const struct adp_serial_port_conf *pc = &d->c->port;
        d->backoff_usec = d->backoff_usec ? MIN(d->backoff_usec * 2, pc->reopen_max_usec) : pc->reopen_min_usec;
        h->timer_set(h->host, d->reopen_timer, h->now(h->host) + d->backoff_usec);
}

static void port_lost(struct sdev *d, const char *why) {
        char msg[600];
        snprintf(msg, sizeof msg, "serial port %s disappeared: %s", d->c->port.device, why);
        slog(d->a, LOG_WARNING, d->c->name, NULL, 0, "%s; reopening with backoff", msg);
        close_port(d);
        fail_all(d, 502, msg);
        set_state(d, ADP_DEVICE_OFFLINE, msg);
        d->backoff_usec = 0;
        schedule_reopen(d);
}

static void try_open(struct sdev *d) {
        const struct adp_host *h = d->a->host;
        char why[700];
        int fd = adp_serial_tty_open(&d->c->port, why, sizeof why);
        if (fd < 0) {
                bool config = fd == -ENOTTY || fd == -EINVAL;
                /* Log each distinct failure once, not every retry. */
                if (!streq(why, d->last_error) || d->state == ADP_DEVICE_CONNECTING)
                        slog(d->a, config ? LOG_ERR : LOG_WARNING, d->c->name, NULL, 0, "%s; retrying", why);
                set_state(d, config ? ADP_DEVICE_ERROR : ADP_DEVICE_OFFLINE, why);
                if (config)
                        d->backoff_usec = d->c->port.reopen_max_usec / 2;
                schedule_reopen(d);
                return;
        }
        d->fd = fd;
        int r = h->watch_add(h->host, fd, EPOLLIN, on_io, d, &d->watch);
        if (r < 0) {
                close(fd);
                d->fd = -1;
                slog(d->a, LOG_ERR, d->c->name, NULL, r, "Cannot watch %s: %m", d->c->port.device);
                schedule_reopen(d);
                return;
        }
        if (d->reopens++ > 0 || d->last_error[0])
                slog(d->a, LOG_NOTICE, d->c->name, NULL, 0, "Serial port %s is back", d->c->port.device);
        d->backoff_usec = 0;
        d->last_error[0] = 0;
        adp_serial_stream_reset(&d->stream);
        set_state(d, ADP_DEVICE_ONLINE, NULL);
        pump(d);
}

static void on_io(void *ud, int fd, uint32_t revents) {
        struct sdev *d = ud;
        const struct adp_host *h = d->a->host;
        if (revents & EPOLLOUT && d->wlen > 0) {
                ssize_t k = write(fd, d->wbuf, d->wlen);
                if (k < 0 && errno != EAGAIN && errno != EINTR) {
                        port_lost(d, strerror(errno));
                        return;
                }
                if (k > 0) {
                        memmove(d->wbuf, d->wbuf + k, d->wlen - (size_t) k);
                        d->wlen -= (size_t) k;
                        d->bytes_out += (uint64_t) k;
                }
                if (d->wlen == 0)
                        (void) h->watch_set_events(h->host, d->watch, EPOLLIN);
        }
        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                uint8_t buf[READ_CHUNK];
                for (int rounds = 0; rounds < 64; rounds++) {
                        ssize_t k = read(fd, buf, sizeof buf);
                        if (k > 0) {
                                d->bytes_in += (uint64_t) k;
                                (void) adp_serial_stream_feed(&d->stream, buf, (size_t) k, on_frame, d);
                                if (d->fd < 0)
                                        return;
                                continue;
                        }
                        if (k < 0 && errno == EINTR)
                                continue;
                        if (k < 0 && errno == EAGAIN) {
                                if (revents & (EPOLLHUP | EPOLLERR)) {
                                        port_lost(d, "hang-up");
                                        return;
                                }
                                break;
                        }
                        port_lost(d, k == 0 ? "end of file" : strerror(errno));
                        return;
                }
                if (d->c->framing.idle_usec)
                        h->timer_set(h->host, d->idle_timer,
                                     adp_serial_stream_pending(&d->stream) ? h->now(h->host) + d->c->framing.idle_usec : 0);
        }
}

static void on_report(void *ud, uint64_t usec) {
        struct sdev *d = ud;
        const struct adp_host *h = d->a->host;
        if (d->dirty)
                report(d);
        h->timer_set(h->host, d->report_timer, usec + d->c->report_usec);
}

/* ---- ops --------------------------------------------------------------------------------- */

int adp_serial_validate(const struct adp_conf_node *item, struct adp_conf_errors *e) {
        struct adp_serial_config *c = NULL;
        int r = adp_serial_config_parse(item, &c, e);
        adp_serial_config_free(c);
        return r;
}

static int sa_init(void *priv, const struct adp_init_info *info, struct adp_conf_errors *e) {
        struct sa *a = priv;
        if (!(a->name = strdup(info->name)))
                return -ENOMEM;
        return adp_serial_config_parse(info->item, &a->conf, e);
}

static int dev_start(struct sa *a, struct sdev *d) {
        const struct adp_host *h = a->host;
        const struct adp_serial_device_conf *c = d->c;
        int r;
        if (c->plugin && c->plugin->create) {
                r = c->plugin->create(c->plugin_args, &d->plugin_state);
                if (r < 0)
                        return r;
        }
        if ((r = adp_serial_stream_init(&d->stream, &c->framing, d->plugin_state)) < 0)
                return r;
        d->stream_ready = true;
        if ((r = h->timer_add(h->host, 0, on_reopen, d, &d->reopen_timer)) < 0 ||
            (r = h->timer_add(h->host, 0, on_idle, d, &d->idle_timer)) < 0 ||
            (r = h->timer_add(h->host, 0, on_reply_timeout, d, &d->reply_timer)) < 0 ||
            (r = h->timer_add(h->host, h->now(h->host) + c->report_usec, on_report, d, &d->report_timer)) < 0)
                return r;
        if (!(d->polls = calloc(c->n_polls ? c->n_polls : 1, sizeof *d->polls)))
                return -ENOMEM;
        for (size_t i = 0; i < c->n_polls; i++) {
                d->polls[i] = (struct spoll){ .d = d, .index = i };
                r = h->timer_add(h->host, h->now(h->host) + c->polls[i].interval_usec, on_poll, &d->polls[i],
                                 &d->polls[i].timer);
                if (r < 0)
                        return r;
        }
        r = h->device_add(h->host, c->name);
        if (r < 0) {
                slog(a, LOG_ERR, c->name, NULL, r, "Cannot declare device %s: %m", c->name);
                return 0; /* the others run */
        }
        d->added = true;
        d->state = ADP_DEVICE_CONNECTING;

        char real[PATH_MAX];
        const char *owner = NULL;
        snprintf(d->claim_path, sizeof d->claim_path, "%s", realpath(c->port.device, real) ? real : c->port.device);
        r = h->port_claim(h->host, d->claim_path, &owner);
        if (r < 0) {
                char why[PATH_MAX + 200];
                if (r == -EBUSY)
                        snprintf(why, sizeof why, "serial port %s is already owned by adapter \"%s\"", c->port.device,
                                 owner ? owner : "?");
                else
                        snprintf(why, sizeof why, "cannot claim serial port %s: %s", c->port.device, strerror(-r));
                slog(a, LOG_ERR, c->name, NULL, 0, "%s; device %s stays offline", why, c->name);
                set_state(d, ADP_DEVICE_ERROR, why);
                return 0;
        }
        d->claimed = true;
        try_open(d);
        return 0;
}

static int sa_start(void *priv, const struct adp_host *host) {
        struct sa *a = priv;
        a->host = host;
        a->stopping = false;
        if (!(a->devs = calloc(a->conf->n_devices ? a->conf->n_devices : 1, sizeof *a->devs)))
                return -ENOMEM;
        a->n_devs = a->conf->n_devices;
        for (size_t i = 0; i < a->n_devs; i++)
                a->devs[i] = (struct sdev){ .a = a, .c = &a->conf->devices[i], .fd = -1 };
        for (size_t i = 0; i < a->n_devs; i++) {
                int r = dev_start(a, &a->devs[i]);
                if (r < 0)
                        return r;
        }
        return 0;
}

static struct sdev *find_dev(struct sa *a, const char *id) {
        for (size_t i = 0; i < a->n_devs; i++)
                if (a->devs[i].added && streq(a->devs[i].c->name, id))
                        return &a->devs[i];
        return NULL;
}

static int sa_submit(void *priv, const struct adp_command *cmd) {
        struct sa *a = priv;
        struct sdev *d = find_dev(a, cmd->device_id);
        const char *name = NULL;
        if (!d)
                return -ENOENT;
        if (cmd->kind == ADP_CMD_DESIRED)
                return -EOPNOTSUPP;
        if (cmd->kind == ADP_CMD_METHOD)
                name = cmd->name;
        else if (cmd->msg)
                name = hub_msg_get_prop(cmd->msg, "command", NULL);
        int idx = -1;
        for (size_t i = 0; name && i < d->c->n_commands; i++) {
                const struct adp_serial_command *cc = &d->c->commands[i];
                if (streq(cc->name, name) && (cmd->kind == ADP_CMD_METHOD ? cc->method : cc->c2d))
                        idx = (int) i;
        }
        if (idx < 0) {
                slog(a, LOG_WARNING, d->c->name, "unknown-command", 0, "Refusing %s \"%s\": the device has no such %s",
                     cmd->kind == ADP_CMD_C2D ? "C2D command" : "method", name ? name : "(no command property)",
                     cmd->kind == ADP_CMD_C2D ? "C2D command" : "method");
                if (cmd->kind == ADP_CMD_C2D)
                        result(d, cmd->id, 400, name ? "no C2D command \"%s\" on this device"
                                                     : "%s a C2D message needs an application property `command` naming "
                                                       "one of the device's commands",
                               name ? name : "");
                else
                        result(d, cmd->id, 404, "no method \"%s\" on this device", name ? name : "");
                return 0;
        }
        if (d->fd < 0) {
                result(d, cmd->id, 502, "serial port %s is not open: %s", d->c->port.device,
                       d->last_error[0] ? d->last_error : "offline");
                return 0;
        }
        char why[512];
        int r = enqueue(d, idx, true, cmd->id, cmd->payload, why, sizeof why);
        if (r == -EINVAL) {
                result(d, cmd->id, 400, "%s", why);
                return 0;
        }
        return r;
}

static char *sa_stats(void *priv) {
        struct sa *a = priv;
        json_t *o = json_object(), *devs = json_object();
        if (!o || !devs) {
                json_decref(o);
                json_decref(devs);
                return NULL;
        }
        for (size_t i = 0; i < a->n_devs; i++) {
                struct sdev *d = &a->devs[i];
                json_object_set_new(devs, d->c->name,
                                    json_pack("{s:s,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "state", state_name(d->state),
                                              "bytesIn", (json_int_t) d->bytes_in, "bytesOut", (json_int_t) d->bytes_out,
                                              "frames", (json_int_t) d->frames, "checkErrors",
                                              (json_int_t) d->check_errors, "decodeErrors", (json_int_t) d->decode_errors,
                                              "garbageBytes", (json_int_t) d->stream.st.garbage_bytes, "commands",
                                              (json_int_t) d->commands, "replyTimeouts", (json_int_t) d->reply_timeouts,
                                              "reopens", (json_int_t) d->reopens));
        }
        json_object_set_new(o, "devices", devs);
        char *s = json_dumps(o, JSON_COMPACT);
        json_decref(o);
        return s;
}

static void sa_stop(void *priv) {
        struct sa *a = priv;
        const struct adp_host *h = a->host;
        if (!h)
                return;
        for (size_t i = 0; i < a->n_devs; i++) {
                struct sdev *d = &a->devs[i];
                fail_all(d, 503, "the adapter is stopping");
        }
        a->stopping = true;
        for (size_t i = 0; i < a->n_devs; i++) {
                struct sdev *d = &a->devs[i];
                close_port(d);
                h->timer_free(h->host, d->reopen_timer);
                h->timer_free(h->host, d->idle_timer);
                h->timer_free(h->host, d->reply_timer);
                h->timer_free(h->host, d->report_timer);
                for (size_t k = 0; d->polls && k < d->c->n_polls; k++)
                        h->timer_free(h->host, d->polls[k].timer);
                free(d->polls);
                if (d->claimed)
                        h->port_release(h->host, d->claim_path);
                if (d->added)
                        h->device_remove(h->host, d->c->name);
                if (d->stream_ready)
                        adp_serial_stream_done(&d->stream);
                if (d->c->plugin && d->c->plugin->destroy && d->plugin_state)
                        d->c->plugin->destroy(d->plugin_state);
                free(d->wbuf);
        }
        free(a->devs);
        a->devs = NULL;
        a->n_devs = 0;
}

static void sa_fini(void *priv) {
        struct sa *a = priv;
        a->conf = adp_serial_config_free(a->conf);
        free(a->name);
        a->name = NULL;
}

const struct adp_ops adp_serial_ops = {
        .version = ADP_OPS_VERSION,
        .type = "serial",
        .priv_size = sizeof(struct sa),
        .init = sa_init,
        .start = sa_start,
        .submit = sa_submit,
        .reconfigure = NULL,
        .stats = sa_stats,
        .stop = sa_stop,
        .fini = sa_fini,
};
