/* SPDX-License-Identifier: MIT */
/* The admin socket: fieldhubctl's way into the local daemon without keys. Access is
 * limited by the socket file's mode (0660) and checked again on the peer's credentials
 * (root, the daemon's own user, or its group). One JSON request per line. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "admin-proto.h"
#include "daemon.h"
#include "hub/registry.h"
#include "log-ids.h"
#include "log.h"

#define ADMIN_MAX_CONNS 64

struct admin_conn {
        struct gw_admin *admin;
        int fd;
        sd_event_source *src;
        char *in;
        size_t in_len, in_cap;
        char *out;
        size_t out_len, out_off;
        struct admin_conn *next;
        uid_t uid;
};

struct gw_admin {
        struct gw_daemon *daemon;
        char *path;
        int fd;
        sd_event_source *src;
        struct admin_conn *conns;
        unsigned n_conns;
};

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
        sd_event_source_disable_unref(c->src);
        if (c->fd >= 0)
                close(c->fd);
        free(c->in);
        free(c->out);
        free(c);
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

static const char *registry_error(int r) {
        switch (r) {
        case -ENOENT:
                return "DeviceNotFound";
        case -EEXIST:
                return "DeviceAlreadyExists";
        case -ESTALE:
                return "PreconditionFailed (etag mismatch)";
        case -EINVAL:
                return "ArgumentInvalid";
        case -ENOSPC:
                return "the disk is full";
        default:
                return strerror(-r);
        }
}

static json_t *cmd_device_create(struct gw_admin *a, json_t *args) {
        struct hub_device in, out;
        const char *err = NULL;
        json_t *dev = json_object_get(args, "device");
        if (!json_is_object(dev))
                return reply_error("device create: missing \"device\" object");
        int r = hub_device_from_json(dev, &in, &err);
        if (r < 0)
                return reply_error("ArgumentInvalid: %s", err ? err : "bad device");
        r = hub_registry_create(a->daemon->registry, &in, &out);
        hub_device_done(&in);
        if (r < 0)
                return reply_error("%s: %s", registry_error(r), json_string_value(json_object_get(dev, "deviceId")));
        json_t *j = hub_device_to_json(&out, true);
        hub_device_done(&out);
        return reply_ok(j);
}

static json_t *cmd_device_get(struct gw_admin *a, json_t *args) {
        const char *id = json_string_value(json_object_get(args, "deviceId"));
        struct hub_device d;
        if (!id)
                return reply_error("missing deviceId");
        int r = hub_registry_get(a->daemon->registry, id, &d);
        if (r < 0)
                return reply_error("%s: %s", registry_error(r), id);
        json_t *j = hub_device_to_json(&d, true);
        hub_device_done(&d);
        return reply_ok(j);
}

static json_t *cmd_device_list(struct gw_admin *a, json_t *args) {
        const char *after = json_string_value(json_object_get(args, "after"));
        json_int_t max = json_integer_value(json_object_get(args, "max"));
        struct hub_device *arr = NULL;
        size_t n = 0;
        if (max <= 0 || max > 1000)
                max = 1000;
        int r = hub_registry_list(a->daemon->registry, after, (size_t) max, &arr, &n);
        if (r < 0)
                return reply_error("list: %s", registry_error(r));
        json_t *list = json_array();
        for (size_t i = 0; i < n; i++)
                json_array_append_new(list, hub_device_to_json(&arr[i], false));
        hub_device_array_free(arr, n);
        return reply_ok(list);
}

static json_t *cmd_device_delete(struct gw_admin *a, json_t *args) {
        const char *id = json_string_value(json_object_get(args, "deviceId"));
        const char *etag = json_string_value(json_object_get(args, "etag"));
        if (!id)
                return reply_error("missing deviceId");
        int r = hub_registry_delete(a->daemon->registry, id, etag ? etag : "*");
        if (r < 0)
                return reply_error("%s: %s", registry_error(r), id);
        return reply_ok(NULL);
}

static json_t *handle(struct gw_admin *a, json_t *req) {
        const char *cmd = json_string_value(json_object_get(req, "cmd"));
        json_t *args = json_object_get(req, "args");
        if (!cmd)
                return reply_error("request without \"cmd\"");
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
        if (streq(cmd, "device.create"))
                return cmd_device_create(a, args);
        if (streq(cmd, "device.get"))
                return cmd_device_get(a, args);
        if (streq(cmd, "device.list"))
                return cmd_device_list(a, args);
        if (streq(cmd, "device.delete"))
                return cmd_device_delete(a, args);
        return reply_error("unknown command \"%s\"", cmd);
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
        if (c->out_off == c->out_len) {
                c->out_off = c->out_len = 0;
        }
        char *o = realloc(c->out, c->out_len + n);
        if (!o)
                return -ENOMEM;
        memcpy(o + c->out_len, s, n);
        c->out = o;
        c->out_len += n;
        return conn_update_events(c);
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
        ssize_t rd = recv(fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (rd < 0 && errno == EAGAIN)
                return 0;
        if (rd <= 0) {
                conn_free(c);
                return 0;
        }
        c->in_len += (size_t) rd;

        char *nl;
        while ((nl = memchr(c->in, '\n', c->in_len))) {
                size_t line = (size_t) (nl - c->in);
                json_error_t jerr;
                json_t *req = json_loadb(c->in, line, 0, &jerr);
                json_t *reply = req ? handle(c->admin, req) : reply_error("malformed request: %s", jerr.text);
                json_decref(req);
                memmove(c->in, nl + 1, c->in_len - line - 1);
                c->in_len -= line + 1;
                int r = reply ? queue_reply(c, reply) : -ENOMEM;
                json_decref(reply);
                if (r < 0) {
                        conn_free(c);
                        return 0;
                }
        }
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
        sd_event_source_disable_unref(a->src);
        close(a->fd);
        (void) unlink(a->path);
        free(a->path);
        free(a);
        return NULL;
}
