/* SPDX-License-Identifier: MIT */
/* The admin socket: fieldhubctl's way into the local daemon without keys. Access is
 * limited by the socket file's mode (0660) and checked again on the peer's credentials
 * (root, the daemon's own user, or its group). One JSON request per line (admin-proto.h).
 *
 * A connection answers its requests strictly in order, one at a time: while a request waits
 * for an asynchronous answer (an `api` call waiting for the store or a device) the next
 * line is not parsed. The client may go away at any moment; a pending call then finds
 * itself detached and its answer is dropped. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "admin-proto.h"
#include "uplink/uplink.h"
#include "daemon.h"
#include "hub.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/random.h"
#include "hub/store.h"
#include "log-ids.h"
#include "log.h"

#if __has_include("api/api.h")
#include "api/api.h"
#define ADMIN_HAVE_API 1
#else
#define ADMIN_HAVE_API 0
#endif

#define ADMIN_MAX_CONNS 64
/* Limits on an `api` request beyond the line cap. */
#define ADMIN_API_MAX_TARGET 8192u
#define ADMIN_API_MAX_HEADERS 64u
/* A monitor stops reading events while this much output is queued for its client. */
#define ADMIN_MONITOR_MAX_QUEUED (1024u * 1024u)
#define ADMIN_MONITOR_BATCH 200u
#define ADMIN_MONITOR_POLL_USEC (100u * 1000u)

struct admin_call;

struct admin_conn {
        struct gw_admin *admin;
        int fd;
        sd_event_source *src;
        char *in;
        size_t in_len, in_cap;
        char *out;
        size_t out_len, out_off, out_cap;
        struct admin_conn *next;
        uid_t uid;
        int passed_fd;           /* received with SCM_RIGHTS for the next request, or -1 */
        struct admin_call *call; /* the request being answered asynchronously */
        bool dispatching;        /* inside process_lines(): do not free, mark broken */
        bool broken;
        /* monitor-events */
        bool monitoring;
        char *mon_device;
        uint64_t mon_after;
};

/* One asynchronous request; outlives its connection when the client leaves early. */
struct admin_call {
        struct admin_conn *conn; /* NULL once detached */
};

struct gw_admin {
        struct gw_daemon *daemon;
        char *path;
        int fd;
        sd_event_source *src;
        sd_event_source *monitor_timer;
        struct admin_conn *conns;
        unsigned n_conns;
};

static int process_lines(struct admin_conn *c);

/* What a handler returns when its answer is queued by a completion (maybe already). */
static char admin_async_marker;
#define ADMIN_ASYNC ((json_t *) &admin_async_marker)

const char *gw_admin_path(struct gw_admin *a) {
        return a->path;
}

static void conn_free(struct admin_conn *c) {
        struct gw_admin *a = c->admin;
        for (struct admin_conn **p = &a->conns; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        break;
                }
        a->n_conns--;
        if (c->call)
                c->call->conn = NULL; /* its reply will find nobody and free it */
        sd_event_source_disable_unref(c->src);
        if (c->fd >= 0)
                close(c->fd);
        if (c->passed_fd >= 0)
                close(c->passed_fd);
        free(c->mon_device);
        free(c->in);
        free(c->out);
        free(c);
}

/* Frees c now, or, when we are inside its dispatch loop, marks it for the loop to free. */
static void conn_fail(struct admin_conn *c) {
        if (c->dispatching)
                c->broken = true;
        else
                conn_free(c);
}

static json_t *reply_error(const char *fmt, ...) _printf_(1, 2);
static json_t *reply_error(const char *fmt, ...) {
        char buf[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        return json_pack("{s:b, s:s}", "ok", 0, "error", buf);
}

static json_t *reply_ok(json_t *result) {
        return json_pack("{s:b, s:o}", "ok", 1, "result", result ? result : json_null());
}

static int conn_update_events(struct admin_conn *c) {
        return sd_event_source_set_io_events(c->src, c->out_len > c->out_off ? EPOLLIN | EPOLLOUT : EPOLLIN);
}

static int queue_reply(struct admin_conn *c, json_t *reply) {
        _cleanup_free_ char *s = NULL;
        size_t n;
        int r = gw_admin_encode(reply, &s, &n);
        if (r < 0)
                return r;
        if (c->out_off == c->out_len)
                c->out_off = c->out_len = 0;
        else if (c->out_off > 0 && c->out_off >= c->out_len / 2) {
                memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
                c->out_len -= c->out_off;
                c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
                /* Grows geometrically: monitor-events queues up to 1 MiB one event at a time. */
                size_t cap = MAX(c->out_len + n, 2 * c->out_cap);
                char *o = realloc(c->out, cap);
                if (!o)
                        return -ENOMEM;
                c->out = o;
                c->out_cap = cap;
        }
        memcpy(c->out + c->out_len, s, n);
        c->out_len += n;
        return conn_update_events(c);
}

/* ---- api: the service REST API with iothubowner rights ------------------------------- */

#if ADMIN_HAVE_API
static void on_api_reply(void *ud, int status, json_t *headers, const char *body, size_t len) {
        struct admin_call *call = ud;
        struct admin_conn *c = call->conn;
        free(call);
        if (!c)
                return; /* the client left */
        c->call = NULL;

        json_t *b = json_stringn_nocheck(body ? body : "", body ? len : 0);
        json_t *reply = reply_ok(json_pack("{s:i, s:O?, s:o}", "status", status, "headers", headers, "body",
                                           b ? b : json_string("")));
        int r = reply ? queue_reply(c, reply) : -ENOMEM;
        json_decref(reply);
        if (r < 0) {
                conn_fail(c);
                return;
        }
        /* Resume the lines that arrived meanwhile (not when answered from inside the call). */
        if (!c->dispatching && process_lines(c) < 0)
                conn_free(c);
}
#endif

/* Returns ADMIN_ASYNC when on_api_reply() answers (now or later), else the reply. */
static json_t *cmd_api(struct admin_conn *c, json_t *args) {
#if ADMIN_HAVE_API
        struct gw_api *api = c->admin->daemon->api;
        const char *method = json_string_value(json_object_get(args, "method"));
        const char *target = json_string_value(json_object_get(args, "target"));
        json_t *headers = json_object_get(args, "headers");
        json_t *body = json_object_get(args, "body");
        const char *k;
        json_t *v;

        if (json_is_null(headers))
                headers = NULL;
        if (!api)
                return reply_error("the service API is not running");
        if (!method || !*method || strlen(method) > 16)
                return reply_error("api: \"method\" must be an HTTP method such as GET");
        if (!target || target[0] != '/' || strlen(target) > ADMIN_API_MAX_TARGET)
                return reply_error("api: \"target\" must be a path starting with / of at most %u bytes",
                                   ADMIN_API_MAX_TARGET);
        if (headers && !json_is_object(headers))
                return reply_error("api: \"headers\" must be an object of strings");
        if (json_object_size(headers) > ADMIN_API_MAX_HEADERS)
                return reply_error("api: more than %u headers", ADMIN_API_MAX_HEADERS);
        json_object_foreach(headers, k, v) if (!json_is_string(v)) return reply_error("api: header %s is not a string", k);
        if (body && !json_is_string(body) && !json_is_null(body))
                return reply_error("api: \"body\" must be a string");
        size_t blen = json_string_length(body);
        if (blen > GW_ADMIN_MAX_MSG)
                return reply_error("api: body over %u bytes", GW_ADMIN_MAX_MSG);

        struct admin_call *call = calloc(1, sizeof *call);
        if (!call)
                return reply_error("out of memory");
        call->conn = c;
        c->call = call;
        int r = gw_api_call_internal(api, method, target, headers, blen ? json_string_value(body) : NULL, blen,
                                     on_api_reply, call);
        if (r < 0) {
                c->call = NULL;
                free(call);
                return reply_error("api: %s", r == -ESHUTDOWN ? "the service API is stopping" : strerror(-r));
        }
        return ADMIN_ASYNC;
#else
        return reply_error("this fieldhubd has no service API");
#endif
}

/* ---- backup: a consistent copy of the store into the client's file ------------------ */

static json_t *cmd_backup(struct admin_conn *c, json_t *args) {
        struct gw_daemon *d = c->admin->daemon;
        _cleanup_close_ int out = TAKE_FD(c->passed_fd);
        _cleanup_free_ char *tmp = NULL, *dir = NULL;
        _cleanup_close_ int in = -EBADF;
        struct stat st;
        char rnd[17];
        uint64_t total = 0;
        int r, fl;

        c->passed_fd = -1;
        if (out < 0)
                return reply_error("backup: no file descriptor was passed with the request");
        if (fstat(out, &st) < 0 || !S_ISREG(st.st_mode))
                return reply_error("backup: the passed descriptor is not a regular file");
        if (st.st_mode & 0077)
                return reply_error("backup: the backup file must not be accessible to group or others (mode %04o); "
                                   "it will hold every device key",
                                   (unsigned) (st.st_mode & 07777));
        fl = fcntl(out, F_GETFL);
        if (fl < 0 || (fl & O_ACCMODE) == O_RDONLY || (fl & O_APPEND))
                return reply_error("backup: the passed descriptor is not open for writing");

        dir = strdup(hub_store_path(d->store));
        if (!dir)
                return reply_error("out of memory");
        char *slash = strrchr(dir, '/');
        if (slash)
                *slash = 0;
        else
                strcpy(dir, ".");
        r = hub_random_hex(rnd, 8);
        if (r < 0 || asprintf(&tmp, "%s/.backup-%s.db", slash ? dir : ".", rnd) < 0) {
                tmp = NULL;
                return reply_error("backup: cannot make a temporary name");
        }

        r = hub_store_backup(d->store, tmp);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Backup of the store failed: %m");
                return reply_error("backup: %s", strerror(-r));
        }
        in = open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        (void) unlink(tmp); /* the open fd keeps the bytes */
        if (in < 0)
                return reply_error("backup: cannot reopen the copy: %s", strerror(errno));
        if (ftruncate(out, 0) < 0 || lseek(out, 0, SEEK_SET) < 0)
                return reply_error("backup: cannot write the backup file: %s", strerror(errno));
        for (;;) {
                char buf[65536];
                ssize_t n = read(in, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return reply_error("backup: reading the copy: %s", strerror(errno));
                if (n == 0)
                        break;
                for (ssize_t off = 0; off < n;) {
                        ssize_t w = write(out, buf + off, (size_t) (n - off));
                        if (w < 0 && errno == EINTR)
                                continue;
                        if (w < 0)
                                return reply_error("backup: writing the backup file: %s", strerror(errno));
                        off += w;
                }
                total += (uint64_t) n;
        }
        if (fsync(out) < 0)
                return reply_error("backup: fsync of the backup file: %s", strerror(errno));
        gw_log_info("Store backed up for uid %u (%llu bytes)", (unsigned) c->uid, (unsigned long long) total);
        return reply_ok(json_pack("{s:I, s:i}", "bytes", (json_int_t) total, "schemaVersion", HUB_STORE_SCHEMA_VERSION));
}

/* ---- monitor-events: the hub's event stream, one line per event ---------------------- */

static struct hub_outbox *admin_outbox(struct gw_admin *a) {
        return a->daemon->hub ? a->daemon->hub->outbox : NULL;
}

/* The event as `az iot hub monitor-events --properties all` prints it. */
static json_t *event_to_json(const struct hub_outbox_entry *e) {
        size_t blen = 0;
        const char *body = hub_msg_body(e->msg, &blen);
        json_t *payload = NULL, *sys = json_object(), *app = json_object();
        const char *iface = hub_msg_get_sys(e->msg, HUB_SYS_INTERFACE_ID);
        const char *comp = hub_msg_get_sys(e->msg, HUB_SYS_COMPONENT_NAME);

        if (blen > 0)
                payload = json_loadb(body, blen, JSON_DECODE_ANY, NULL);
        if (!payload)
                payload = json_stringn(body ? body : "", blen); /* NULL when not UTF-8 */
        if (!payload) {
                /* Binary: hex, as az prints undecodable bodies as bytes. */
                _cleanup_free_ char *hex = malloc(blen * 2 + 1);
                if (hex) {
                        for (size_t i = 0; i < blen; i++)
                                sprintf(hex + 2 * i, "%02x", ((const unsigned char *) body)[i]);
                        hex[2 * blen] = 0;
                        payload = json_pack("{s:s}", "hex", hex);
                }
        }
        for (int p = 0; p < _HUB_SYS_MAX; p++) {
                const char *v = hub_msg_get_sys(e->msg, (enum hub_sys_prop) p);
                const char *n = hub_sys_prop_wire_name((enum hub_sys_prop) p);
                if (v && n)
                        json_object_set_new(sys, n, json_string(v));
        }
        for (size_t i = 0; i < hub_msg_n_props(e->msg); i++) {
                const struct hub_msg_prop *p = hub_msg_prop_at(e->msg, i);
                json_object_set_new(app, p->name, p->value ? json_string(p->value) : json_null());
        }
        return json_pack("{s:{s:s, s:s, s:s, s:s, s:o, s:{s:o, s:o}}, s:I}", "event", "origin", e->device_id, "module",
                         e->module_id ? e->module_id : "", "interface", iface ? iface : "", "component",
                         comp ? comp : "", "payload", payload ? payload : json_null(), "properties", "system", sys,
                         "application", app, "seq", (json_int_t) e->seq);
}

static int monitor_pump(struct admin_conn *c) {
        struct hub_outbox *o = admin_outbox(c->admin);
        if (!o)
                return 0;
        while (c->out_len - c->out_off < ADMIN_MONITOR_MAX_QUEUED) {
                struct hub_outbox_entry *e = NULL;
                size_t n = 0;
                int r = hub_events_read(o, c->mon_after, ADMIN_MONITOR_BATCH, c->mon_device, &e, &n);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < n; i++) {
                        json_t *ev = event_to_json(&e[i]);
                        json_t *line = ev ? json_pack("{s:b, s:O, s:O}", "ok", 1, "event", json_object_get(ev, "event"), "seq",
                                                    json_object_get(ev, "seq")) : NULL;
                        json_decref(ev);
                        r = line ? queue_reply(c, line) : -ENOMEM;
                        json_decref(line);
                        if (r < 0) {
                                hub_outbox_entries_free(e, n);
                                return r;
                        }
                        c->mon_after = e[i].seq;
                }
                hub_outbox_entries_free(e, n);
                if (n < ADMIN_MONITOR_BATCH)
                        break;
        }
        return 0;
}

static int on_monitor_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_admin *a = userdata;
        bool any = false;
        for (struct admin_conn *c = a->conns, *next; c; c = next) {
                next = c->next;
                if (!c->monitoring)
                        continue;
                any = true;
                int r = monitor_pump(c);
                if (r < 0) {
                        gw_log_errno(LOG_WARNING, r, "Admin socket: monitor-events failed: %m; closing it");
                        conn_free(c);
                }
        }
        if (any) {
                (void) sd_event_source_set_time_relative(s, ADMIN_MONITOR_POLL_USEC);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static json_t *cmd_monitor(struct admin_conn *c, json_t *args) {
        struct gw_admin *a = c->admin;
        struct hub_outbox *o = admin_outbox(a);
        json_t *dev = json_object_get(args, "device");
        int r;

        if (!o)
                return reply_error("monitor-events: this fieldhubd has no event stream yet");
        if (dev && !json_is_string(dev) && !json_is_null(dev))
                return reply_error("monitor-events: \"device\" must be a string");
        if (json_is_string(dev)) {
                c->mon_device = strdup(json_string_value(dev));
                if (!c->mon_device)
                        return reply_error("out of memory");
        }
        c->mon_after = hub_outbox_head(o);
        /* Optional "after": replay what the stream still holds after that sequence number
         * (0 = from the oldest event kept), e.g. to check that nothing acknowledged was lost. */
        json_t *after = json_object_get(args, "after");
        if (json_is_integer(after) && json_integer_value(after) >= 0 &&
            (uint64_t) json_integer_value(after) < c->mon_after)
                c->mon_after = (uint64_t) json_integer_value(after);
        if (!a->monitor_timer) {
                r = sd_event_add_time_relative(a->daemon->event, &a->monitor_timer, CLOCK_MONOTONIC,
                                               ADMIN_MONITOR_POLL_USEC, 10000, on_monitor_timer, a);
                if (r < 0)
                        return reply_error("monitor-events: %s", strerror(-r));
        } else {
                (void) sd_event_source_set_time_relative(a->monitor_timer, ADMIN_MONITOR_POLL_USEC);
                (void) sd_event_source_set_enabled(a->monitor_timer, SD_EVENT_ONESHOT);
        }
        c->monitoring = true;
        return reply_ok(json_pack("{s:I}", "after", (json_int_t) c->mon_after));
}

/* ---- dispatch ------------------------------------------------------------------------ */

static json_t *handle(struct admin_conn *c, json_t *req) {
        struct gw_admin *a = c->admin;
        const char *cmd = json_string_value(json_object_get(req, "cmd"));
        json_t *args = json_object_get(req, "args");
        if (!cmd)
                return reply_error("request without \"cmd\"");
        if (args && !json_is_object(args))
                return reply_error("\"args\" must be an object");
        if (c->passed_fd >= 0 && !streq(cmd, "backup")) {
                close(c->passed_fd);
                c->passed_fd = -1;
        }
        if (streq(cmd, "status"))
                return reply_ok(gw_daemon_status(a->daemon));
        if (streq(cmd, "reload")) {
                json_t *errs = NULL;
                int r = gw_daemon_reload(a->daemon, &errs);
                if (r < 0) {
                        json_t *j = reply_error("configuration rejected; the running configuration is kept");
                        json_object_set_new(j, "details", errs ? errs : json_array());
                        return j;
                }
                return reply_ok(NULL);
        }
        if (streq(cmd, "api"))
                return cmd_api(c, args);
        if (streq(cmd, "backup"))
                return cmd_backup(c, args);
        if (streq(cmd, "monitor-events"))
                return cmd_monitor(c, args);
        if (streq(cmd, "endpoints"))
                return reply_ok(gw_uplink_status(a->daemon->uplink));
        return reply_error("unknown command \"%s\"", cmd);
}

/* Answers complete lines until one is pending. Returns < 0 when the connection must close
 * (the caller frees it). */
static int process_lines(struct admin_conn *c) {
        char *nl;
        c->dispatching = true;
        while (!c->call && !c->monitoring && !c->broken && (nl = memchr(c->in, '\n', c->in_len))) {
                size_t line = (size_t) (nl - c->in);
                json_error_t jerr;
                json_t *req = json_loadb(c->in, line, 0, &jerr);
                memmove(c->in, nl + 1, c->in_len - line - 1);
                c->in_len -= line + 1;
                json_t *reply = req ? handle(c, req) : reply_error("malformed request: %s", jerr.text);
                json_decref(req);
                if (reply == ADMIN_ASYNC)
                        continue; /* the loop stops on c->call; a sync answer is already queued */
                int r = reply ? queue_reply(c, reply) : -ENOMEM;
                json_decref(reply);
                if (r < 0)
                        c->broken = true;
        }
        c->dispatching = false;
        return c->broken ? -EIO : 0;
}

static int on_conn(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct admin_conn *c = userdata;

        if (revents & EPOLLOUT) {
                while (c->out_off < c->out_len) {
                        ssize_t w = send(fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
                        if (w < 0) {
                                if (errno == EAGAIN)
                                        break;
                                conn_free(c);
                                return 0;
                        }
                        c->out_off += (size_t) w;
                }
                (void) conn_update_events(c);
        }
        if (!(revents & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                return 0;

        if (c->in_cap - c->in_len < 4096) {
                size_t ncap = c->in_cap ? c->in_cap * 2 : 8192;
                if (ncap > GW_ADMIN_MAX_MSG + 8192) {
                        gw_log_warning("Admin request over %u bytes, closing the connection", GW_ADMIN_MAX_MSG);
                        conn_free(c);
                        return 0;
                }
                char *n = realloc(c->in, ncap);
                if (!n) {
                        conn_free(c);
                        return 0;
                }
                c->in = n;
                c->in_cap = ncap;
        }
        union {
                struct cmsghdr h;
                char buf[CMSG_SPACE(sizeof(int) * 4)];
        } ctl;
        struct iovec iov = { .iov_base = c->in + c->in_len, .iov_len = c->in_cap - c->in_len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf, .msg_controllen = sizeof ctl.buf };
        ssize_t rd = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
        if (rd < 0 && errno == EAGAIN)
                return 0;
        /* Keep the first descriptor passed (for `backup`); close any other. */
        for (struct cmsghdr *cm = rd >= 0 ? CMSG_FIRSTHDR(&mh) : NULL; cm; cm = CMSG_NXTHDR(&mh, cm)) {
                if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                        continue;
                size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                for (size_t i = 0; i < nfd; i++) {
                        int pfd;
                        memcpy(&pfd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
                        if (c->passed_fd < 0)
                                c->passed_fd = pfd;
                        else
                                close(pfd);
                }
        }
        if (rd <= 0) {
                conn_free(c);
                return 0;
        }
        c->in_len += (size_t) rd;
        if (process_lines(c) < 0)
                conn_free(c);
        return 0;
}

static int on_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct gw_admin *a = userdata;
        int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cfd < 0)
                return 0;

        struct ucred cred;
        socklen_t len = sizeof cred;
        if (getsockopt(cfd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
            !(cred.uid == 0 || cred.uid == geteuid() || cred.gid == getegid())) {
                gw_log_full(LOG_WARNING, 0,
                            GW_FIELDS(.component = "admin", .message_id = GW_MSG_AUTH_FAILED,
                                                           .event = "auth-failed"),
                            "Admin socket: refused a client (uid %u, gid %u): not root, not our user or group",
                            (unsigned) cred.uid, (unsigned) cred.gid);
                close(cfd);
                return 0;
        }
        if (a->n_conns >= ADMIN_MAX_CONNS) {
                gw_log_warning("Admin socket: %u clients connected, refusing another", a->n_conns);
                close(cfd);
                return 0;
        }
        struct admin_conn *c = calloc(1, sizeof *c);
        if (!c) {
                close(cfd);
                return 0;
        }
        c->admin = a;
        c->fd = cfd;
        c->uid = cred.uid;
        c->passed_fd = -1;
        if (sd_event_add_io(sd_event_source_get_event(s), &c->src, cfd, EPOLLIN, on_conn, c) < 0) {
                close(cfd);
                free(c);
                return 0;
        }
        c->next = a->conns;
        a->conns = c;
        a->n_conns++;
        return 0;
}
int gw_admin_start(struct gw_daemon *d, const char *path, struct gw_admin **ret) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);

        /* Outside systemd (RuntimeDirectory=) the directory may not exist yet. */
        _cleanup_free_ char *dir = strdup(path);
        if (!dir)
                return -ENOMEM;
        char *slash = strrchr(dir, '/');
        if (slash && slash != dir) {
                *slash = 0;
                if (mkdir(dir, 0750) < 0 && errno != EEXIST)
                        return -errno;
        }

        /* A socket file left by a previous run: remove it if nobody answers on it. */
        struct stat st;
        if (lstat(path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode))
                        return -EEXIST;
                int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (probe >= 0) {
                        int cr = connect(probe, (struct sockaddr *) &sa, sizeof sa);
                        close(probe);
                        if (cr == 0)
                                return -EADDRINUSE;
                }
                (void) unlink(path);
        }

        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        mode_t old = umask(0117);
        int r = bind(fd, (struct sockaddr *) &sa, sizeof sa);
        umask(old);
        if (r < 0)
                return -errno;
        if (chmod(path, 0660) < 0 || listen(fd, 16) < 0) {
                r = -errno;
                (void) unlink(path);
                return r;
        }

        struct gw_admin *a = calloc(1, sizeof *a);
        if (!a) {
                (void) unlink(path);
                return -ENOMEM;
        }
        a->daemon = d;
        a->path = strdup(path);
        a->fd = TAKE_FD(fd);
        r = a->path ? sd_event_add_io(d->event, &a->src, a->fd, EPOLLIN, on_accept, a) : -ENOMEM;
        if (r < 0) {
                (void) unlink(path);
                close(a->fd);
                free(a->path);
                free(a);
                return r;
        }
        gw_log_info("Admin socket listening on %s", path);
        *ret = a;
        return 0;
}

struct gw_admin *gw_admin_stop(struct gw_admin *a) {
        if (!a)
                return NULL;
        while (a->conns)
                conn_free(a->conns);
        sd_event_source_disable_unref(a->monitor_timer);
        sd_event_source_disable_unref(a->src);
        close(a->fd);
        (void) unlink(a->path);
        free(a->path);
        free(a);
        return NULL;
}
