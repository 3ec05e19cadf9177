/* SPDX-License-Identifier: MIT */
/* The adapters' host on sd-event and the adapter↔hub bridge (adapters.h). */

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "adapters.h"
#include "adp-modbus.h"
#include "adp-serial.h"
#include "adp-coap.h"
#include "config.h"
#include "hub.h"
#include "hub/json-dump.h"
#include "hub/method.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/queue.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/twin.h"
#include "log-ids.h"
#include "log.h"

const struct adp_ops *const gw_adapter_ops[] = {
        &adp_modbus_ops,
        &adp_serial_ops,
        &adp_coap_ops,
        NULL,
};

/* Telemetry appends in flight per adapter before new ones are dropped (the store is behind). */
#define MAX_INFLIGHT_APPENDS 20000u

struct gw_adapter;

struct gw_post {
        struct gw_post *next;
        adp_post_fn fn;
        void *ud;
};

struct adp_watch {
        struct gw_adapter *a;
        sd_event_source *src;
        adp_fd_fn cb;
        void *ud;
};

struct adp_timer {
        struct gw_adapter *a;
        sd_event_source *src;
        adp_timer_fn cb;
        void *ud;
};

/* One adapter device: an identity, a session, its twin reporting. */
struct gw_adev {
        struct gw_adapters *g;
        struct gw_adapter *owner;
        char *id;
        struct hub_session *session;
        enum adp_device_state state;
        char *why;
        bool disabled;          /* the registry says disabled: telemetry is dropped */
        json_t *report_pending; /* merged patches waiting for the one in flight */
        bool report_inflight;
        bool gone;              /* removed while a twin update was in flight: free on its completion */
        uint64_t dropped;
        bool c2d_busy;          /* a C2D message is being received or is with the adapter */
};

struct gw_adapter {
        struct gw_adapters *g;
        const struct adp_ops *ops;
        void *priv;
        char *name;
        char *type;
        char *item_text;        /* canonical text of the config item, to see whether it changed */
        struct adp_host host;
        bool initialised, started;

        pthread_mutex_t lock;
        struct gw_post *posts, *posts_tail;
        bool closed;            /* post() refuses */
        int efd;
        sd_event_source *efd_src;

        struct gw_appends *appends;     /* outlives the adapter while appends are in flight */
        uint64_t dropped;
        uint64_t last_stats_log;
};

/* Telemetry appends of one adapter: the completion of an append can come after the adapter
 * is gone (stopped on reload or shutdown with writes in flight), so this lives on until the
 * last one completed. */
struct gw_appends {
        atomic_ulong inflight;          /* read by adapter threads through backlog() */
        uint64_t appended;
        char *name;
        bool orphaned;
};

struct gw_pending_cmd {
        uint64_t id;
        enum adp_command_kind kind;
        char *device;
        char *request_id;       /* method */
        char *lock_token;       /* C2D */
};

/* A result given from inside submit(): answered once submit() has returned (hub-core does
 * not take a method response from inside its own method_request call). */
struct gw_deferred {
        struct gw_deferred *next;
        uint64_t id;
        int status;
        char *json;
};

struct gw_port_claim {
        char *path;
        struct gw_adapter *owner;
};

struct gw_adapters {
        sd_event *event;
        struct gw_hub *hub;
        struct gw_adapter **adapters;
        size_t n_adapters;
        struct gw_adev **devs;
        size_t n_devs;
        struct gw_pending_cmd *cmds;
        size_t n_cmds;
        uint64_t next_cmd_id;
        struct gw_port_claim *claims;
        size_t n_claims;
        sd_event_source *stats_timer;
        unsigned in_submit;
        struct gw_deferred *deferred;
        sd_event_source *defer_src;
};

static uint64_t now_mono(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

/* The C2D queue works in wall-clock time (expiry, locks). */
static uint64_t now_wall(void) {
        return hub_clock_now(hub_clock_system());
}

/* ---- config item text (change detection) ------------------------------------------------- */

static void node_text(const struct adp_conf_node *n, FILE *f) {
        switch (adp_conf_kind(n)) {
        case ADP_CONF_SCALAR: {
                json_t *s = json_string(adp_conf_scalar(n));
                if (s)
                        hub_json_dumpf(s, f, JSON_ENCODE_ANY);
                json_decref(s);
                break;
        }
        case ADP_CONF_MAP:
                fputc('{', f);
                for (size_t i = 0; i < adp_conf_len(n); i++) {
                        fprintf(f, "%s\"%s\":", i ? "," : "", adp_conf_key_at(n, i));
                        node_text(adp_conf_at(n, i), f);
                }
                fputc('}', f);
                break;
        case ADP_CONF_SEQ:
                fputc('[', f);
                for (size_t i = 0; i < adp_conf_len(n); i++) {
                        if (i)
                                fputc(',', f);
                        node_text(adp_conf_at(n, i), f);
                }
                fputc(']', f);
                break;
        default:
                fputs("null", f);
        }
}

static char *item_text(const struct adp_conf_node *n) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);
        if (!f)
                return NULL;
        node_text(n, f);
        if (fclose(f) != 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

/* ---- devices ----------------------------------------------------------------------------- */

static struct gw_adev *find_dev(struct gw_adapters *g, const char *id) {
        for (size_t i = 0; i < g->n_devs; i++)
                if (streq(g->devs[i]->id, id))
                        return g->devs[i];
        return NULL;
}

static struct gw_adev *find_dev_of(struct gw_adapter *a, const char *id) {
        struct gw_adev *d = find_dev(a->g, id);
        return d && d->owner == a ? d : NULL;
}

static void adev_free(struct gw_adev *d) {
        if (!d)
                return;
        json_decref(d->report_pending);
        free(d->id);
        free(d->why);
        free(d);
}

static const char *state_name(enum adp_device_state s) {
        switch (s) {
        case ADP_DEVICE_CONNECTING:
                return "connecting";
        case ADP_DEVICE_ONLINE:
                return "online";
        case ADP_DEVICE_OFFLINE:
                return "offline";
        case ADP_DEVICE_ERROR:
                return "error";
        default:
                return "unknown";
        }
}

/* Session ops: the hub delivers to an adapter device. */
static uint64_t cmd_add(struct gw_adapters *g, enum adp_command_kind kind, const char *dev, const char *request_id,
                        const char *lock_token) {
        struct gw_pending_cmd *n = realloc(g->cmds, (g->n_cmds + 1) * sizeof *n);
        if (!n)
                return 0;
        g->cmds = n;
        struct gw_pending_cmd *c = &g->cmds[g->n_cmds];
        *c = (struct gw_pending_cmd){ .id = ++g->next_cmd_id, .kind = kind };
        c->device = strdup(dev);
        c->request_id = request_id ? strdup(request_id) : NULL;
        c->lock_token = lock_token ? strdup(lock_token) : NULL;
        if (!c->device || (request_id && !c->request_id) || (lock_token && !c->lock_token)) {
                free(c->device);
                free(c->request_id);
                free(c->lock_token);
                return 0;
        }
        g->n_cmds++;
        return c->id;
}

static bool cmd_take(struct gw_adapters *g, uint64_t id, struct gw_pending_cmd *ret) {
        for (size_t i = 0; i < g->n_cmds; i++)
                if (g->cmds[i].id == id) {
                        *ret = g->cmds[i];
                        memmove(g->cmds + i, g->cmds + i + 1, (g->n_cmds - i - 1) * sizeof *g->cmds);
                        g->n_cmds--;
                        return true;
                }
        return false;
}

static void cmd_done(struct gw_pending_cmd *c) {
        free(c->device);
        free(c->request_id);
        free(c->lock_token);
}

static void c2d_pump(struct gw_adev *d);

static void answer_cmd(struct gw_adapters *g, struct gw_pending_cmd *c, int status, const char *json) {
        struct gw_adev *d = find_dev(g, c->device);
        switch (c->kind) {
        case ADP_CMD_METHOD:
                if (d && d->session) {
                        int r = hub_method_response(g->hub->methods, d->session, c->request_id, status, json);
                        if (r < 0 && r != -ENOENT)
                                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "adapter", .device = c->device),
                                            "Cannot answer method call %s: %m", c->request_id);
                        gw_hub_rearm(g->hub);
                }
                break;
        case ADP_CMD_C2D:
                /* Settled in submission order, so the next receive sees this one gone. */
                if (status < 300)
                        (void) hub_queue_complete(g->hub->queue, c->device, c->lock_token, now_wall(), NULL, NULL);
                else
                        (void) hub_queue_reject(g->hub->queue, c->device, c->lock_token, now_wall(), NULL, NULL);
                if (d) {
                        d->c2d_busy = false;
                        c2d_pump(d);
                }
                break;
        case ADP_CMD_DESIRED:
                if (status >= 300)
                        gw_log_full(LOG_WARNING, 0,
                                    GW_FIELDS(.component = "adapter", .device = c->device,
                                              .adapter = d && d->owner ? d->owner->name : NULL),
                                    "Desired properties not fully applied (status %d): %s", status, json ? json : "");
                break;
        default:
                break;
        }
}

static void host_command_result(void *host, uint64_t id, int status, const char *json);

static int submit(struct gw_adev *d, enum adp_command_kind kind, const char *name, const char *payload,
                  int64_t version, const char *request_id, const char *lock_token, const struct hub_msg *m) {
        struct gw_adapters *g = d->g;
        struct gw_adapter *a = d->owner;
        if (!a || !a->started)
                return -ENOTCONN;
        uint64_t id = cmd_add(g, kind, d->id, request_id, lock_token);
        if (id == 0)
                return -ENOMEM;
        struct adp_command cmd = { .id = id, .kind = kind, .device_id = d->id, .name = name, .payload = payload,
                                   .payload_len = strlen(payload), .version = version, .msg = m };
        g->in_submit++;
        int r = a->ops->submit(a->priv, &cmd);
        g->in_submit--;
        if (r < 0) {
                /* Refused: the host answers, after this delivery returned. */
                char body[200];
                snprintf(body, sizeof body, "{\"error\":\"%s\"}",
                         r == -EOPNOTSUPP ? "not supported by this adapter device" : strerror(-r));
                g->in_submit++;
                host_command_result(a, id, r == -EOPNOTSUPP ? 501 : r == -ENOENT ? 404 : 500, body);
                g->in_submit--;
        }
        return 0;
}

static int sess_deliver_c2d(void *ud, struct hub_msg *m, const char *lock_token) {
        struct gw_adev *d = ud;
        size_t len = 0;
        const char *body = hub_msg_body(m, &len);
        _cleanup_free_ char *text = strndup(body ? body : "", len);
        if (!text)
                return -ENOMEM;
        return submit(d, ADP_CMD_C2D, NULL, text, 0, NULL, lock_token, m);
}

/* Cloud-to-device messages for adapter devices: one at a time per device, taken from the
 * durable queue when the queue says something is deliverable, when the device comes online,
 * and after the previous one was settled by the adapter's command result (200..299
 * completes, anything else rejects: the message is dead-lettered with negative feedback). */
struct c2d_recv {
        struct gw_adapters *g;
        char *device;
};

static void c2d_received(int r, const struct hub_queue_delivery *dl, void *userdata) {
        struct c2d_recv *cr = userdata;
        struct gw_adev *d = find_dev(cr->g, cr->device);
        if (!d) {
                /* Gone meanwhile: the lock expires and the message returns to the queue. */
                free(cr->device);
                free(cr);
                return;
        }
        if (r < 0 || !dl) {
                d->c2d_busy = false;
                if (r < 0 && r != -ENOENT)
                        gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "adapter", .device = d->id),
                                    "Cannot receive a cloud-to-device message for %s: %m", d->id);
        } else if (!d->session || sess_deliver_c2d(d, dl->msg, dl->lock_token) < 0) {
                (void) hub_queue_abandon(cr->g->hub->queue, d->id, dl->lock_token, now_wall(), NULL, NULL);
                d->c2d_busy = false;
        }
        free(cr->device);
        free(cr);
}

static void c2d_pump(struct gw_adev *d) {
        struct gw_adapters *g = d->g;
        if (d->c2d_busy || !d->session || d->state != ADP_DEVICE_ONLINE || !d->owner || !d->owner->started ||
            !g->hub || !g->hub->queue)
                return;
        struct c2d_recv *cr = calloc(1, sizeof *cr);
        if (!cr || !(cr->device = strdup(d->id))) {
                free(cr);
                return;
        }
        cr->g = g;
        d->c2d_busy = true;
        int r = hub_queue_receive(g->hub->queue, d->id, 0, now_wall(), c2d_received, cr);
        if (r < 0) {
                d->c2d_busy = false;
                free(cr->device);
                free(cr);
        }
}

static void c2d_available_hook(void *ud, const char *device_id) {
        struct gw_adapters *g = ud;
        struct gw_adev *d = find_dev(g, device_id);
        if (d)
                c2d_pump(d);
}

static int sess_desired(void *ud, const char *json_patch, int64_t version) {
        return submit(ud, ADP_CMD_DESIRED, NULL, json_patch, version, NULL, NULL, NULL);
}

static int sess_method(void *ud, const char *name, const char *payload, const char *request_id) {
        return submit(ud, ADP_CMD_METHOD, name, payload ? payload : "null", 0, request_id, NULL, NULL);
}

static void sess_close(void *ud, int reason, const char *why) {
        struct gw_adev *d = ud;
        gw_log_full(LOG_NOTICE, reason,
                    GW_FIELDS(.component = "adapter", .device = d->id, .adapter = d->owner ? d->owner->name : NULL),
                    "The hub closed the session of adapter device %s (%s); its telemetry is dropped until the "
                    "adapter restarts", d->id, why ? why : "no reason");
        struct hub_session *s = d->session;
        d->session = NULL;
        d->disabled = true;
        hub_session_unregister(s);
}

static const struct hub_session_ops session_ops = {
        .version = HUB_SESSION_OPS_VERSION,
        .deliver_c2d = sess_deliver_c2d,
        .desired_patch = sess_desired,
        .method_request = sess_method,
        .close = sess_close,
};

/* ---- host ops ---------------------------------------------------------------------------- */

static _printf_(6, 0) void host_log(void *host, int level, const char *device, const char *key, int error, const char *fmt,
                     va_list ap) {
        struct gw_adapter *a = host;
        char k[256];
        snprintf(k, sizeof k, "%s:%s:%s", a->name, device ? device : "", key ? key : fmt);
        (void) gw_log_internalv(level, error, __FILE__, __LINE__, a->type,
                                GW_FIELDS(.component = "adapter", .adapter = a->name, .device = device,
                                          .ratelimit_key = k),
                                fmt, ap);
}

static int on_watch(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct adp_watch *w = userdata;
        w->cb(w->ud, fd, revents);
        return 0;
}

static int host_watch_add(void *host, int fd, uint32_t events, adp_fd_fn cb, void *ud, struct adp_watch **ret) {
        struct gw_adapter *a = host;
        struct adp_watch *w = calloc(1, sizeof *w);
        if (!w)
                return -ENOMEM;
        *w = (struct adp_watch){ .a = a, .cb = cb, .ud = ud };
        int r = sd_event_add_io(a->g->event, &w->src, fd, events, on_watch, w);
        if (r < 0) {
                free(w);
                return r;
        }
        *ret = w;
        return 0;
}

static int host_watch_set_events(void *host, struct adp_watch *w, uint32_t events) {
        return sd_event_source_set_io_events(w->src, events);
}

static void host_watch_free(void *host, struct adp_watch *w) {
        if (!w)
                return;
        sd_event_source_disable_unref(w->src);
        free(w);
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        struct adp_timer *t = userdata;
        t->cb(t->ud, usec);
        return 0;
}

static int host_timer_add(void *host, uint64_t usec, adp_timer_fn cb, void *ud, struct adp_timer **ret) {
        struct gw_adapter *a = host;
        struct adp_timer *t = calloc(1, sizeof *t);
        if (!t)
                return -ENOMEM;
        *t = (struct adp_timer){ .a = a, .cb = cb, .ud = ud };
        int r = sd_event_add_time(a->g->event, &t->src, CLOCK_MONOTONIC, usec ? usec : UINT64_MAX, 0, on_timer, t);
        if (r >= 0)
                r = sd_event_source_set_enabled(t->src, usec ? SD_EVENT_ONESHOT : SD_EVENT_OFF);
        if (r < 0) {
                sd_event_source_disable_unref(t->src);
                free(t);
                return r;
        }
        *ret = t;
        return 0;
}

static int host_timer_set(void *host, struct adp_timer *t, uint64_t usec) {
        if (usec == 0)
                return sd_event_source_set_enabled(t->src, SD_EVENT_OFF);
        int r = sd_event_source_set_time(t->src, usec);
        if (r >= 0)
                r = sd_event_source_set_enabled(t->src, SD_EVENT_ONESHOT);
        return r;
}

static void host_timer_free(void *host, struct adp_timer *t) {
        if (!t)
                return;
        sd_event_source_disable_unref(t->src);
        free(t);
}

static unsigned long host_backlog(void *host) {
        struct gw_adapter *a = host;
        return atomic_load(&a->appends->inflight);
}

static uint64_t host_now(void *host) {
        return now_mono();
}

static int host_post(void *host, adp_post_fn fn, void *ud) {
        struct gw_adapter *a = host;
        struct gw_post *p = malloc(sizeof *p);
        if (!p)
                return -ENOMEM;
        *p = (struct gw_post){ .fn = fn, .ud = ud };
        pthread_mutex_lock(&a->lock);
        if (a->closed) {
                pthread_mutex_unlock(&a->lock);
                free(p);
                return -ESHUTDOWN;
        }
        bool was_empty = !a->posts;
        if (a->posts_tail)
                a->posts_tail->next = p;
        else
                a->posts = p;
        a->posts_tail = p;
        pthread_mutex_unlock(&a->lock);
        if (was_empty) {
                uint64_t one = 1;
                (void) !write(a->efd, &one, sizeof one);
        }
        return 0;
}

static void run_posts(struct gw_adapter *a) {
        uint64_t v;
        (void) !read(a->efd, &v, sizeof v);
        pthread_mutex_lock(&a->lock);
        struct gw_post *p = a->posts;
        a->posts = a->posts_tail = NULL;
        pthread_mutex_unlock(&a->lock);
        while (p) {
                struct gw_post *next = p->next;
                p->fn(p->ud);
                free(p);
                p = next;
        }
}

static int on_inbox(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        run_posts(userdata);
        return 0;
}

static int host_device_add(void *host, const char *id) {
        struct gw_adapter *a = host;
        struct gw_adapters *g = a->g;
        struct hub_device dev = { 0 };
        int r;

        struct gw_adev *d = find_dev(g, id);
        if (d) {
                if (d->owner == a)
                        return 0;
                gw_log_full(LOG_ERR, 0, GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id),
                            "Device id %s is already used by adapter %s; not adding it to %s", id,
                            d->owner ? d->owner->name : "?", a->name);
                return -EEXIST;
        }
        if (!hub_device_id_valid(id))
                return -EINVAL;

        r = hub_registry_get(g->hub->registry, id, &dev);
        if (r == -ENOENT) {
                struct hub_device in = { .auth_type = HUB_AUTH_TYPE_SAS, .status = HUB_DEVICE_ENABLED };
                snprintf(in.device_id, sizeof in.device_id, "%s", id);
                r = hub_registry_create(g->hub->registry, &in, &dev);
                if (r >= 0)
                        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id),
                                    "Created the hub identity of adapter device %s", id);
                hub_explicit_bzero(&in, sizeof in);
        }
        if (r < 0) {
                hub_device_done(&dev);
                return gw_log_full(LOG_ERR, r, GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id),
                                   "Cannot read or create the hub identity of %s: %m", id);
        }

        d = calloc(1, sizeof *d);
        struct gw_adev **nd = realloc(g->devs, (g->n_devs + 1) * sizeof *nd);
        if (!d || !nd || !(d->id = strdup(id))) {
                if (nd)
                        g->devs = nd;
                adev_free(d);
                hub_device_done(&dev);
                return -ENOMEM;
        }
        g->devs = nd;
        d->g = g;
        d->owner = a;
        d->state = ADP_DEVICE_CONNECTING;
        if (dev.status == HUB_DEVICE_DISABLED) {
                d->disabled = true;
                gw_log_full(LOG_WARNING, 0, GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id),
                            "Adapter device %s is disabled in the registry: it is polled, but its telemetry is dropped",
                            id);
        } else {
                r = hub_sessions_register(g->hub->sessions, id, NULL, dev.generation_id, &session_ops, d, &d->session);
                if (r >= 0)
                        r = hub_session_set_capabilities(d->session,
                                                         HUB_SESSION_DESIRED | HUB_SESSION_METHODS | HUB_SESSION_C2D);
                if (r < 0) {
                        gw_log_full(LOG_ERR, r, GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id),
                                    "Cannot open the hub session of %s: %m", id);
                        hub_session_unregister(d->session);
                        d->session = NULL;
                }
        }
        hub_device_done(&dev);
        g->devs[g->n_devs++] = d;
        return 0;
}

static void report_done(int result, json_t *twin, const char *error, void *ud);

static void report_flush(struct gw_adev *d) {
        if (d->report_inflight || !d->report_pending)
                return;
        json_t *patch = d->report_pending;
        d->report_pending = NULL;
        int r = hub_twin_update_reported(d->g->hub->twins, d->id, patch, -1, report_done, d);
        json_decref(patch);
        if (r >= 0)
                d->report_inflight = true;
        else
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "adapter", .device = d->id),
                            "Cannot update the reported properties of %s: %m", d->id);
}

static void report_done(int result, json_t *twin, const char *error, void *ud) {
        struct gw_adev *d = ud;
        d->report_inflight = false;
        if (d->gone) {
                adev_free(d);
                return;
        }
        if (result < 0)
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "adapter", .device = d->id),
                            "Reported properties of %s not stored: %s", d->id, error ? error : "error");
        report_flush(d);
}

static void host_device_remove(void *host, const char *id) {
        struct gw_adapter *a = host;
        struct gw_adapters *g = a->g;
        for (size_t i = 0; i < g->n_devs; i++) {
                struct gw_adev *d = g->devs[i];
                if (!streq(d->id, id) || d->owner != a)
                        continue;
                memmove(g->devs + i, g->devs + i + 1, (g->n_devs - i - 1) * sizeof *g->devs);
                g->n_devs--;
                struct hub_session *s = d->session;
                d->session = NULL;
                d->owner = NULL;
                hub_session_unregister(s);
                if (d->report_inflight)
                        d->gone = true; /* freed by report_done */
                else
                        adev_free(d);
                return;
        }
}

static void host_device_state(void *host, const char *id, enum adp_device_state state, const char *why) {
        struct gw_adapter *a = host;
        struct gw_adev *d = find_dev_of(a, id);
        if (!d)
                return;
        bool same = d->state == state && streq(d->why ? d->why : "", why ? why : "");
        if (same)
                return;
        enum adp_device_state old = d->state;
        d->state = state;
        free(d->why);
        d->why = why ? strdup(why) : NULL;
        if (state == ADP_DEVICE_ONLINE)
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id,
                                      .message_id = GW_MSG_DEVICE_CONNECTED, .event = "adapter-device-online",
                                      .no_ratelimit = true),
                            "Adapter device %s is online", id);
        else if (state != ADP_DEVICE_CONNECTING)
                gw_log_full(state == ADP_DEVICE_ERROR ? LOG_ERR : LOG_WARNING, 0,
                            GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id,
                                      .message_id = GW_MSG_DEVICE_DISCONNECTED, .event = "adapter-device-offline",
                                      .no_ratelimit = old != state),
                            "Adapter device %s is %s: %s", id, state_name(state), why ? why : "no reason given");
        /* Commands queued while it was away are delivered now that it answers again. */
        if (state == ADP_DEVICE_ONLINE)
                c2d_pump(d);
}

static int host_emit(void *host, const char *id, struct hub_msg *m);

static void appends_free(struct gw_appends *ap) {
        if (!ap)
                return;
        free(ap->name);
        free(ap);
}

static void append_done(int result, uint64_t seq, void *ud) {
        struct gw_appends *ap = ud;
        atomic_fetch_sub(&ap->inflight, 1);
        if (result < 0)
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "adapter", .adapter = ap->name),
                            "Adapter telemetry not stored: %m");
        else
                ap->appended++;
        if (ap->orphaned && atomic_load(&ap->inflight) == 0)
                appends_free(ap);
}

static int host_emit(void *host, const char *id, struct hub_msg *m) {
        struct gw_adapter *a = host;
        struct gw_adev *d = find_dev_of(a, id);
        char ts[32];
        int r;

        if (!d)
                return -ENOENT;
        if (d->disabled || !d->session) {
                d->dropped++;
                return -ENOTCONN;
        }
        if (atomic_load(&a->appends->inflight) >= MAX_INFLIGHT_APPENDS) {
                a->dropped++;
                return gw_log_full(LOG_WARNING, ENOBUFS,
                                   GW_FIELDS(.component = "adapter", .adapter = a->name, .ratelimit_key = "adapter-backlog"),
                                   "The store is behind: %lu telemetry messages in flight; dropping new ones",
                                   (unsigned long) atomic_load(&a->appends->inflight));
        }
        struct timespec tsr;
        clock_gettime(CLOCK_REALTIME, &tsr);
        hub_time_format_iso8601((uint64_t) tsr.tv_sec * USEC_PER_SEC + (uint64_t) tsr.tv_nsec / 1000, ts);
        if ((r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, id)) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_AUTH_GENERATION_ID, hub_session_auth_generation_id(d->session))) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "Telemetry")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CREATION_TIME, ts)) < 0)
                return r;
        atomic_fetch_add(&a->appends->inflight, 1);
        r = hub_outbox_append(a->g->hub->outbox, m, append_done, a->appends);
        if (r < 0) {
                atomic_fetch_sub(&a->appends->inflight, 1);
                return r;
        }
        hub_session_touch(d->session);
        return 0;
}

static int host_report(void *host, const char *id, const char *json_patch) {
        struct gw_adapter *a = host;
        struct gw_adev *d = find_dev_of(a, id);
        if (!d)
                return -ENOENT;
        json_error_t err;
        json_t *p = json_loads(json_patch, 0, &err);
        if (!json_is_object(p)) {
                json_decref(p);
                return gw_log_full(LOG_WARNING, EINVAL, GW_FIELDS(.component = "adapter", .adapter = a->name, .device = id),
                                   "Adapter %s reported properties that are not a JSON object, ignoring: %s",
                                   a->name, p ? "not an object" : err.text);
        }
        if (!d->report_pending)
                d->report_pending = p;
        else {
                (void) json_object_update_recursive(d->report_pending, p);
                json_decref(p);
        }
        report_flush(d);
        return 0;
}

static void run_result(struct gw_adapters *g, uint64_t id, int status, const char *json) {
        struct gw_pending_cmd c;
        if (!cmd_take(g, id, &c))
                return;
        answer_cmd(g, &c, status, json);
        cmd_done(&c);
}

static int on_deferred(sd_event_source *s, void *userdata) {
        struct gw_adapters *g = userdata;
        struct gw_deferred *list = g->deferred;
        g->deferred = NULL;
        g->defer_src = sd_event_source_disable_unref(g->defer_src);
        /* Reverse into submission order. */
        struct gw_deferred *rev = NULL;
        while (list) {
                struct gw_deferred *n = list->next;
                list->next = rev;
                rev = list;
                list = n;
        }
        while (rev) {
                struct gw_deferred *n = rev->next;
                run_result(g, rev->id, rev->status, rev->json);
                free(rev->json);
                free(rev);
                rev = n;
        }
        return 0;
}

static void host_command_result(void *host, uint64_t id, int status, const char *json) {
        struct gw_adapter *a = host;
        struct gw_adapters *g = a->g;
        if (g->in_submit) {
                struct gw_deferred *dr = calloc(1, sizeof *dr);
                if (dr && (!json || (dr->json = strdup(json))) &&
                    (g->defer_src || sd_event_add_defer(g->event, &g->defer_src, on_deferred, g) >= 0)) {
                        *dr = (struct gw_deferred){ .next = g->deferred, .id = id, .status = status, .json = dr->json };
                        g->deferred = dr;
                        return;
                }
                if (dr)
                        free(dr->json);
                free(dr);
        }
        run_result(g, id, status, json);
}

static int host_port_claim(void *host, const char *path, const char **ret_owner) {
        struct gw_adapter *a = host;
        struct gw_adapters *g = a->g;
        char real[PATH_MAX];
        const char *p = realpath(path, real) ? real : path;
        for (size_t i = 0; i < g->n_claims; i++)
                if (streq(g->claims[i].path, p)) {
                        if (ret_owner)
                                *ret_owner = g->claims[i].owner->name;
                        return -EBUSY;
                }
        struct gw_port_claim *n = realloc(g->claims, (g->n_claims + 1) * sizeof *n);
        if (!n)
                return -ENOMEM;
        g->claims = n;
        if (!(g->claims[g->n_claims].path = strdup(p)))
                return -ENOMEM;
        g->claims[g->n_claims++].owner = a;
        return 0;
}

static void host_port_release(void *host, const char *path) {
        struct gw_adapter *a = host;
        struct gw_adapters *g = a->g;
        char real[PATH_MAX];
        const char *p = realpath(path, real) ? real : path;
        for (size_t i = 0; i < g->n_claims; i++)
                if (g->claims[i].owner == a && (streq(g->claims[i].path, p) || streq(g->claims[i].path, path))) {
                        free(g->claims[i].path);
                        memmove(g->claims + i, g->claims + i + 1, (g->n_claims - i - 1) * sizeof *g->claims);
                        g->n_claims--;
                        return;
                }
}

/* ---- adapter instances ------------------------------------------------------------------- */

static const struct adp_ops *ops_of(const char *type) {
        for (size_t i = 0; gw_adapter_ops[i]; i++)
                if (streq(gw_adapter_ops[i]->type, type))
                        return gw_adapter_ops[i];
        return NULL;
}

static void log_stats(struct gw_adapter *a, const char *when) {
        if (!a->ops->stats)
                return;
        _cleanup_free_ char *st = a->ops->stats(a->priv);
        if (st)
                gw_log_full(LOG_INFO, 0,
                            GW_FIELDS(.component = "adapter", .adapter = a->name, .event = "adapter-stats",
                                      .no_ratelimit = true),
                            "Adapter %s%s: %llu messages stored, %llu dropped; %s", a->name, when,
                            (unsigned long long) a->appends->appended, (unsigned long long) a->dropped, st);
}

static void adapter_free(struct gw_adapter *a) {
        if (!a)
                return;
        if (a->started) {
                a->ops->stop(a->priv);
                a->started = false;
                log_stats(a, " stopped");
        }
        /* Whatever the workers posted before they were joined still runs (results of pending
         * commands among them); then nothing more is accepted. */
        if (a->efd >= 0)
                run_posts(a);
        pthread_mutex_lock(&a->lock);
        a->closed = true;
        pthread_mutex_unlock(&a->lock);
        if (a->efd >= 0)
                run_posts(a);
        /* Devices the adapter did not remove itself. */
        for (size_t i = a->g->n_devs; i > 0; i--)
                if (a->g->devs[i - 1]->owner == a)
                        host_device_remove(a, a->g->devs[i - 1]->id);
        for (size_t i = a->g->n_claims; i > 0; i--)
                if (a->g->claims[i - 1].owner == a) {
                        free(a->g->claims[i - 1].path);
                        memmove(a->g->claims + i - 1, a->g->claims + i, (a->g->n_claims - i) * sizeof *a->g->claims);
                        a->g->n_claims--;
                }
        if (a->initialised)
                a->ops->fini(a->priv);
        sd_event_source_disable_unref(a->efd_src);
        if (a->efd >= 0)
                close(a->efd);
        pthread_mutex_destroy(&a->lock);
        if (a->appends) {
                if (atomic_load(&a->appends->inflight) > 0)
                        a->appends->orphaned = true; /* the last append_done() frees it */
                else
                        appends_free(a->appends);
        }
        free(a->priv);
        free(a->name);
        free(a->type);
        free(a->item_text);
        free(a);
}

static int adapter_new(struct gw_adapters *g, const struct gw_adapter_conf *ac, struct gw_adapter **ret) {
        _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
        const struct adp_ops *ops = ops_of(ac->type);
        if (!ops || ops->version != ADP_OPS_VERSION)
                return gw_log_full(LOG_ERR, EOPNOTSUPP, GW_FIELDS(.component = "adapter", .adapter = ac->name),
                                   "Adapter %s: type %s is not compiled into this build", ac->name, ac->type);
        struct gw_adapter *a = calloc(1, sizeof *a);
        if (!a)
                return -ENOMEM;
        a->g = g;
        a->ops = ops;
        a->efd = -1;
        pthread_mutex_init(&a->lock, NULL);
        a->priv = calloc(1, ops->priv_size ? ops->priv_size : 1);
        a->name = strdup(ac->name);
        a->type = strdup(ac->type);
        a->item_text = item_text(ac->node);
        a->appends = calloc(1, sizeof *a->appends);
        if (a->appends)
                a->appends->name = strdup(ac->name);
        if (!a->priv || !a->name || !a->type || !a->item_text || !a->appends || !a->appends->name) {
                adapter_free(a);
                return -ENOMEM;
        }
        a->host = (struct adp_host){
                .version = ADP_HOST_VERSION,
                .host = a,
                .log = host_log,
                .watch_add = host_watch_add,
                .watch_set_events = host_watch_set_events,
                .watch_free = host_watch_free,
                .timer_add = host_timer_add,
                .timer_set = host_timer_set,
                .timer_free = host_timer_free,
                .now = host_now,
                .post = host_post,
                .backlog = host_backlog,
                .device_add = host_device_add,
                .device_remove = host_device_remove,
                .device_state = host_device_state,
                .emit = host_emit,
                .report = host_report,
                .command_result = host_command_result,
                .port_claim = host_port_claim,
                .port_release = host_port_release,
        };
        a->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        int r = a->efd < 0 ? -errno : sd_event_add_io(g->event, &a->efd_src, a->efd, EPOLLIN, on_inbox, a);
        if (r < 0) {
                adapter_free(a);
                return gw_log_errno(LOG_ERR, r, "Adapter %s: cannot create its inbox: %m", ac->name);
        }
        struct adp_init_info info = { .name = ac->name, .item = ac->node };
        r = ops->init(a->priv, &info, &e);
        a->initialised = true;
        if (r < 0) {
                for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                        gw_log_full(LOG_ERR, 0, GW_FIELDS(.component = "config", .adapter = ac->name), "%s",
                                    adp_conf_errors_get(&e, i));
                adapter_free(a);
                return gw_log_full(LOG_ERR, r, GW_FIELDS(.component = "adapter", .adapter = ac->name),
                                   "Adapter %s: invalid configuration: %m", ac->name);
        }
        r = ops->start(a->priv, &a->host);
        a->started = true;
        if (r < 0) {
                gw_log_full(LOG_ERR, r, GW_FIELDS(.component = "adapter", .adapter = ac->name),
                            "Adapter %s (%s) cannot start: %m", ac->name, ac->type);
                adapter_free(a);
                return r;
        }
        gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "adapter", .adapter = ac->name), "Adapter %s (%s) started",
                    ac->name, ac->type);
        *ret = a;
        return 0;
}

static int on_stats(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_adapters *g = userdata;
        for (size_t i = 0; i < g->n_adapters; i++)
                log_stats(g->adapters[i], "");
        (void) sd_event_source_set_time(s, usec + 60 * USEC_PER_SEC);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static int add_adapter(struct gw_adapters *g, const struct gw_adapter_conf *ac) {
        struct gw_adapter *a = NULL;
        struct gw_adapter **n = realloc(g->adapters, (g->n_adapters + 1) * sizeof *n);
        if (!n)
                return -ENOMEM;
        g->adapters = n;
        int r = adapter_new(g, ac, &a);
        if (r < 0)
                return r;
        g->adapters[g->n_adapters++] = a;
        return 0;
}

int gw_adapters_start(sd_event *e, struct gw_hub *hub, const struct gw_config *c, struct gw_adapters **ret) {
        struct gw_adapters *g = calloc(1, sizeof *g);
        if (!g)
                return -ENOMEM;
        g->event = sd_event_ref(e);
        g->hub = hub;
        hub->adapters_c2d_available = c2d_available_hook;
        hub->adapters_c2d_available_ud = g;
        for (size_t i = 0; i < c->n_adapters; i++) {
                int r = add_adapter(g, &c->adapters[i]);
                if (r == -ENOMEM) {
                        gw_adapters_stop(g);
                        return r;
                }
        }
        if (sd_event_add_time_relative(e, &g->stats_timer, CLOCK_MONOTONIC, 60 * USEC_PER_SEC, USEC_PER_SEC, on_stats,
                                       g) < 0)
                g->stats_timer = NULL;
        *ret = g;
        return 0;
}

int gw_adapters_reload(struct gw_adapters *g, const struct gw_config *nc) {
        int ret = 0;
        if (!g)
                return 0;
        /* 1. Removed adapters (or whose type changed) stop first, so that their device ids
         * and serial ports are free for the others. */
        for (size_t i = 0; i < g->n_adapters;) {
                struct gw_adapter *a = g->adapters[i];
                bool keep = false;
                for (size_t k = 0; k < nc->n_adapters; k++)
                        keep = keep || (streq(nc->adapters[k].name, a->name) && streq(nc->adapters[k].type, a->type));
                if (keep) {
                        i++;
                        continue;
                }
                gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "adapter", .adapter = a->name),
                            "Adapter %s removed by reload, stopping it", a->name);
                adapter_free(a);
                memmove(g->adapters + i, g->adapters + i + 1, (g->n_adapters - i - 1) * sizeof *g->adapters);
                g->n_adapters--;
        }
        /* 2. Changed ones reconfigure (or restart); new ones start. */
        for (size_t k = 0; k < nc->n_adapters; k++) {
                const struct gw_adapter_conf *ac = &nc->adapters[k];
                struct gw_adapter *a = NULL;
                size_t idx = 0;
                for (size_t i = 0; i < g->n_adapters; i++)
                        if (streq(g->adapters[i]->name, ac->name)) {
                                a = g->adapters[i];
                                idx = i;
                        }
                if (!a) {
                        int r = add_adapter(g, ac);
                        if (r < 0 && ret == 0)
                                ret = r;
                        continue;
                }
                _cleanup_free_ char *text = item_text(ac->node);
                if (!text)
                        return -ENOMEM;
                if (streq(text, a->item_text))
                        continue; /* untouched */
                if (a->ops->reconfigure) {
                        _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
                        struct adp_init_info info = { .name = ac->name, .item = ac->node };
                        int r = a->ops->reconfigure(a->priv, &info, &e);
                        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                                gw_log_full(LOG_ERR, 0, GW_FIELDS(.component = "config", .adapter = ac->name), "%s",
                                            adp_conf_errors_get(&e, i));
                        if (r >= 0) {
                                free(a->item_text);
                                a->item_text = TAKE_PTR(text);
                                gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "adapter", .adapter = a->name),
                                            "Adapter %s reconfigured", a->name);
                                continue;
                        }
                        gw_log_full(LOG_ERR, r, GW_FIELDS(.component = "adapter", .adapter = a->name),
                                    "Adapter %s cannot apply its new configuration: %m; restarting it", a->name);
                }
                adapter_free(a);
                memmove(g->adapters + idx, g->adapters + idx + 1, (g->n_adapters - idx - 1) * sizeof *g->adapters);
                g->n_adapters--;
                int r = add_adapter(g, ac);
                if (r < 0 && ret == 0)
                        ret = r;
        }
        return ret;
}

struct gw_adapters *gw_adapters_stop(struct gw_adapters *g) {
        if (!g)
                return NULL;
        if (g->hub && g->hub->adapters_c2d_available_ud == g) {
                g->hub->adapters_c2d_available = NULL;
                g->hub->adapters_c2d_available_ud = NULL;
        }
        for (size_t i = g->n_adapters; i > 0; i--)
                adapter_free(g->adapters[i - 1]);
        free(g->adapters);
        /* Commands never answered (the adapter refused to answer on stop). */
        for (size_t i = 0; i < g->n_cmds; i++)
                cmd_done(&g->cmds[i]);
        free(g->cmds);
        for (size_t i = 0; i < g->n_devs; i++)
                adev_free(g->devs[i]);
        free(g->devs);
        for (size_t i = 0; i < g->n_claims; i++)
                free(g->claims[i].path);
        free(g->claims);
        sd_event_source_disable_unref(g->stats_timer);
        g->defer_src = sd_event_source_disable_unref(g->defer_src);
        while (g->deferred) {
                struct gw_deferred *n = g->deferred->next;
                free(g->deferred->json);
                free(g->deferred);
                g->deferred = n;
        }
        sd_event_unref(g->event);
        free(g);
        return NULL;
}

json_t *gw_adapters_status(struct gw_adapters *g) {
        json_t *arr = json_array();
        for (size_t i = 0; g && arr && i < g->n_adapters; i++) {
                struct gw_adapter *a = g->adapters[i];
                json_t *devs = json_array();
                for (size_t k = 0; devs && k < g->n_devs; k++)
                        if (g->devs[k]->owner == a)
                                json_array_append_new(devs, json_pack("{s:s, s:s, s:s?}", "id", g->devs[k]->id, "state",
                                                                      state_name(g->devs[k]->state), "reason",
                                                                      g->devs[k]->why));
                json_t *stats = NULL;
                if (a->ops->stats) {
                        _cleanup_free_ char *s = a->ops->stats(a->priv);
                        stats = s ? json_loads(s, 0, NULL) : NULL;
                }
                json_array_append_new(arr, json_pack("{s:s, s:s, s:o, s:o, s:I, s:I}", "name", a->name, "type", a->type,
                                                     "devices", devs ? devs : json_array(), "stats",
                                                     stats ? stats : json_null(), "stored", (json_int_t) a->appends->appended,
                                                     "dropped", (json_int_t) a->dropped));
        }
        return json_pack("{s:o}", "adapters", arr ? arr : json_array());
}
