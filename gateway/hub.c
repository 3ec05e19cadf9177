/* SPDX-License-Identifier: MIT */
/* The hub object: hub-core's modules, their hooks and their timers (see hub.h). */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/timex.h>
#include <unistd.h>

#include "config.h"
#include "hub.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/method.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/store.h"
#include "hub/twin.h"
#include "log-ids.h"
#include "log.h"

void gw_hub_queue_options(const struct gw_config *cfg, struct hub_queue_options *ret) {
        *ret = (struct hub_queue_options) {
                .default_ttl_usec = cfg->c2d_default_ttl_usec,
                .max_ttl_usec = cfg->c2d_max_ttl_usec,
                .max_delivery_count = cfg->c2d_max_delivery_count,
                .max_depth = cfg->c2d_max_queue_depth,
                .lock_timeout_usec = cfg->c2d_lock_timeout_usec,
                .max_lock_expiries = cfg->c2d_max_lock_expiries,
                .feedback_ttl_usec = cfg->feedback_ttl_usec,
                .feedback_lock_timeout_usec = cfg->feedback_lock_timeout_usec,
                .feedback_max_delivery_count = cfg->feedback_max_delivery_count,
        };
}

static uint64_t mono_now(void) {
        return hub_clock_mono(hub_clock_system());
}

static void event_appended(int result, uint64_t seq, void *ud) {
        struct gw_hub *h = ud;
        if (result < 0) {
                h->event_failures++;
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "hub", .event = "event-lost"),
                            "Cannot store a hub event: %m");
        } else
                h->events_appended++;
}

/* Lifecycle and twin-change events go to the outbox (the events stream), stamped with the
 * hub's name as IoT Hub does. */
static void append_event(struct gw_hub *h, struct hub_msg *ev) {
        if (!h->outbox)
                return;
        if (!hub_msg_get_sys(ev, HUB_SYS_USER_ID))
                (void) hub_msg_set_sys(ev, HUB_SYS_USER_ID, h->hub_name);
        (void) hub_msg_set_prop(ev, "hubName", h->hub_name);
        int r = hub_outbox_append(h->outbox, ev, event_appended, h);
        if (r < 0) {
                h->event_failures++;
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "hub", .event = "event-lost"),
                            "Cannot store a hub event: %m");
        }
}

static void on_registry_event(void *userdata, struct hub_msg *ev) {
        struct gw_hub *h = userdata;
        const char *op = hub_msg_get_prop(ev, "opType", NULL);
        const char *dev = hub_msg_get_prop(ev, "deviceId", NULL);
        if (!op || !dev)
                return;
        bool created = streq(op, "createDeviceIdentity");
        gw_log_full(LOG_NOTICE, 0,
                    GW_FIELDS(.component = "registry", .device = dev,
                              .message_id = created ? GW_MSG_DEVICE_CREATED : GW_MSG_DEVICE_DELETED, .event = op,
                              .no_ratelimit = true),
                    "Device identity %s %s", dev, created ? "created" : "deleted");
        append_event(h, ev);
}

static void on_twin_event(void *userdata, struct hub_msg *ev) {
        append_event(userdata, ev);
}

static void on_c2d_available(void *userdata, const char *device_id) {
        struct gw_hub *h = userdata;
        if (h->c2d_available)
                h->c2d_available(h->c2d_available_ud, device_id);
        if (h->coap_c2d_available)
                h->coap_c2d_available(h->coap_c2d_available_ud, device_id);
        if (h->adapters_c2d_available)
                h->adapters_c2d_available(h->adapters_c2d_available_ud, device_id);
}

static void on_desired(void *userdata, const char *device_id, const json_t *patch, int64_t version) {
        struct gw_hub *h = userdata;
        _cleanup_free_ char *text = hub_json_dumps(patch, JSON_COMPACT);
        if (text)
                (void) hub_sessions_deliver_desired(h->sessions, device_id, NULL, text, version);
}

static int rearm_at(sd_event_source *s, uint64_t when_mono) {
        int r = sd_event_source_set_time(s, when_mono);
        if (r >= 0)
                r = sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return r;
}

static void queue_tick_done(int r, void *ud) {
        struct gw_hub *h = ud;
        h->queue_tick_running = false;
        h->queue_ticks++;
        if (r < 0)
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "c2d"), "C2D queue maintenance failed: %m");
        gw_hub_rearm(h);
}

static int on_queue_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct gw_hub *h = ud;
        if (h->queue_tick_running)
                return 0;
        int r = hub_queue_tick(h->queue, hub_clock_now(hub_clock_system()), queue_tick_done, h);
        if (r < 0) {
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "c2d"), "C2D queue maintenance failed: %m");
                return rearm_at(s, usec + USEC_PER_SEC);
        }
        h->queue_tick_running = true;
        return 0;
}

static int on_method_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct gw_hub *h = ud;
        (void) hub_method_tick(h->methods, mono_now());
        gw_hub_rearm(h);
        return 0;
}

static void gc_done(int result, uint64_t n, void *ud) {
        if (result < 0)
                gw_log_full(LOG_WARNING, result, GW_FIELDS(.component = "outbox"), "Outbox collection failed: %m");
}

/* Whether the kernel considers the wall clock synchronised: systemd-timesyncd's flag file,
 * or else adjtimex() without STA_UNSYNC (chrony and ntpd clear it once synchronised). */
static bool clock_is_synchronized(void) {
        struct timex tx = { .modes = 0 };
        if (access("/run/systemd/timesync/synchronized", F_OK) == 0)
                return true;
        int state = adjtimex(&tx);
        return state >= 0 && state != TIME_ERROR && !(tx.status & STA_UNSYNC);
}

/* The event stream (read by local back-end applications, kept for its retention time) gives
 * way to the route endpoints' backlogs, which carry the delivery guarantee: while the store is
 * full, every second it may keep only half of what it holds (its oldest are dropped, counted
 * as drops of the events endpoint), so that the collection can free rows the endpoints are
 * done with. Its configured bound comes back once the store has space again. */
static void shed_events(struct gw_hub *h, bool full) {
        struct hub_outbox_endpoint *ev = NULL;
        struct hub_outbox_endpoint_stats st;
        struct hub_outbox_endpoint_options o = { .max_bytes = h->events_max_bytes, .overflow = HUB_OUTBOX_DROP_OLDEST };
        if (hub_outbox_endpoint_get(h->outbox, HUB_OUTBOX_EVENTS, &ev) < 0)
                return;
        hub_outbox_endpoint_get_stats(ev, &st);
        if (full) {
                if (st.backlog_bytes == 0)
                        return;
                o.max_bytes = st.backlog_bytes / 2 ? st.backlog_bytes / 2 : 1;
        }
        (void) hub_outbox_endpoint_open(h->outbox, HUB_OUTBOX_EVENTS, &o, NULL);
        if (full)
                gw_log_full(LOG_WARNING, 0,
                            GW_FIELDS(.component = "store", .endpoint = HUB_OUTBOX_EVENTS, .event = "events-shed",
                                      .message_id = GW_MSG_QUEUE_OVERFLOW, .ratelimit_key = "events-shed"),
                            "The store is full: the event stream drops its oldest messages (it keeps %llu of %llu "
                            "bytes) so that delivered messages can be collected",
                            (unsigned long long) o.max_bytes, (unsigned long long) st.backlog_bytes);
}

/* The store's full state, from its -ENOSPC count: logged once on entry (writes refused:
 * publishers get no PUBACK) and once on exit (a write went through again). */
static void watch_store_full(struct gw_hub *h) {
        struct hub_store_stats ss;
        struct hub_outbox_stats os;
        hub_store_get_stats(h->store, &ss);
        hub_outbox_get_stats(h->outbox, &os);
        uint64_t last_full_failures = h->store_full_failures;
        h->store_full_failures = ss.full_failures;
        /* In: any write refused for lack of space. Out: messages appended and none refused
         * during the last second (cursor and registry writes may still fail meanwhile). */
        bool appends_fail = os.append_failures > h->store_full_append_failures;
        h->store_full_append_failures = os.append_failures;
        if (ss.full_failures > last_full_failures && (!h->store_full || appends_fail)) {
                if (!h->store_full) {
                        char why[96] = "the disk is full";
                        if (ss.max_size)
                                snprintf(why, sizeof why, "store.max_size of %llu bytes reached, or the disk is full",
                                         (unsigned long long) ss.max_size);
                        gw_log_full(LOG_ERR, -ENOSPC,
                                    GW_FIELDS(.component = "store", .message_id = GW_MSG_STORE_ERROR,
                                              .event = "store-full", .no_ratelimit = true),
                                    "The store is full (%s): new messages are refused (no PUBACK, publishers keep "
                                    "them) until delivered ones are collected: %m",
                                    why);
                }
                h->store_full = true;
                h->store_full_appended = os.appended;
                shed_events(h, true);
        } else if (h->store_full && os.appended > h->store_full_appended && !appends_fail) {
                h->store_full = false;
                shed_events(h, false);
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "store", .message_id = GW_MSG_STORE_ERROR, .event = "store-space",
                                      .no_ratelimit = true),
                            "The store has space again: messages are accepted (%llu writes were refused)",
                            (unsigned long long) ss.full_failures);
        }
}

static int on_gc_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct gw_hub *h = ud;
        bool sync = clock_is_synchronized();
        if (sync != h->clock_synchronized) {
                h->clock_synchronized = sync;
                hub_outbox_set_clock_synchronized(h->outbox, sync);
                gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "outbox"),
                            "The wall clock is %s synchronised: message ages across reboots %s",
                            sync ? "now" : "no longer", sync ? "are measured by it" : "are unknown until it is");
        }
        watch_store_full(h);
        (void) hub_outbox_gc(h->outbox, gc_done, h);
        return rearm_at(s, usec + USEC_PER_SEC);
}

void gw_hub_rearm(struct gw_hub *h) {
        uint64_t when;

        /* Both timers are on CLOCK_BOOTTIME; the queue thinks in wall-clock time. */
        if (h->queue_timer && !h->queue_tick_running) {
                int r = hub_queue_next_deadline(h->queue, &when);
                if (r > 0) {
                        uint64_t now = hub_clock_now(hub_clock_system()), mono = mono_now();
                        uint64_t at = when <= now ? mono : mono + (when - now);
                        (void) rearm_at(h->queue_timer, at);
                } else
                        (void) sd_event_source_set_enabled(h->queue_timer, SD_EVENT_OFF);
        }
        if (h->method_timer) {
                when = hub_method_next_deadline(h->methods);
                if (when != UINT64_MAX)
                        (void) rearm_at(h->method_timer, when);
                else
                        (void) sd_event_source_set_enabled(h->method_timer, SD_EVENT_OFF);
        }
}

int gw_hub_dispatch(struct gw_hub *h) {
        int n = hub_store_dispatch(h->store);
        if (h->after_dispatch)
                h->after_dispatch(h->after_dispatch_ud);
        gw_hub_rearm(h);
        return n;
}

static void read_boot_id(char buf[static 65]) {
        strcpy(buf, "unknown-boot");
        int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return;
        ssize_t n = read(fd, buf, 64);
        close(fd);
        if (n <= 0) {
                strcpy(buf, "unknown-boot");
                return;
        }
        buf[n] = 0;
        buf[strcspn(buf, "\n")] = 0;
}

int gw_hub_new(sd_event *e, struct hub_store *store, const struct gw_config *cfg, struct gw_hub **ret) {
        const struct hub_clock *clock = hub_clock_system();
        struct gw_hub *h = calloc(1, sizeof *h);
        int r;

        if (!h)
                return gw_log_errno(LOG_ERR, ENOMEM, "Out of memory");
        h->event = sd_event_ref(e);
        h->store = store;
        h->hub_name = strdup(cfg->host_name);
        if (!h->hub_name) {
                r = gw_log_errno(LOG_ERR, ENOMEM, "Out of memory");
                goto fail;
        }

        r = hub_registry_new(store, clock, &gw_hub_log, &h->registry);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot open the identity registry: %m");
                goto fail;
        }
        hub_registry_set_event_sink(h->registry, on_registry_event, h);

        r = hub_twins_new(store, clock, &gw_hub_log, &h->twins);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot open the twins: %m");
                goto fail;
        }
        hub_twins_set_event_sink(h->twins, on_twin_event, h);
        hub_twins_set_desired_handler(h->twins, on_desired, h);

        struct hub_queue_options qo;
        const char *qerr = NULL;
        gw_hub_queue_options(cfg, &qo);
        if (hub_queue_options_validate(&qo, &qerr) < 0) {
                r = gw_log_errno(LOG_ERR, EINVAL, "Invalid C2D queue options: %s", qerr);
                goto fail;
        }
        const struct hub_queue_hooks qh = { .on_available = on_c2d_available, .userdata = h };
        r = hub_queue_new(store, &qo, &qh, &gw_hub_log, &h->queue);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot open the C2D queues: %m");
                goto fail;
        }

        char boot_id[65];
        read_boot_id(boot_id);
        struct hub_outbox_options oo = {
                .store = store,
                .clock = clock,
                .log = &gw_hub_log,
                .boot_id = boot_id,
                .clock_synchronized = h->clock_synchronized = clock_is_synchronized(),
                /* With a disk budget the event stream (kept for its retention time, a day)
                 * must not hold the store full: it keeps at most a quarter of the budget,
                 * dropping its oldest first. Route endpoints' backlogs have the rest. */
                .events = { .max_bytes = h->events_max_bytes = cfg->store_max_size / 4,
                            .overflow = HUB_OUTBOX_DROP_OLDEST },
        };
        r = hub_outbox_new(&oo, &h->outbox);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot open the outbox: %m");
                goto fail;
        }

        struct hub_sessions_options so = {
                .store = store,
                .outbox = h->outbox,
                .clock = clock,
                .log = &gw_hub_log,
                .hub_name = h->hub_name,
        };
        r = hub_sessions_new(&so, &h->sessions);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot create the session table: %m");
                goto fail;
        }
        r = hub_methods_new(h->sessions, h->registry, clock, &gw_hub_log, &h->methods);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot create the method table: %m");
                goto fail;
        }

        uint64_t now = mono_now();
        if ((r = sd_event_add_time(e, &h->queue_timer, CLOCK_BOOTTIME, now, USEC_PER_MSEC * 10, on_queue_timer, h)) < 0 ||
            (r = sd_event_add_time(e, &h->method_timer, CLOCK_BOOTTIME, UINT64_MAX, USEC_PER_MSEC, on_method_timer, h)) < 0 ||
            (r = sd_event_add_time(e, &h->gc_timer, CLOCK_BOOTTIME, now + USEC_PER_SEC, 100 * USEC_PER_MSEC, on_gc_timer, h)) < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot add the hub's timers: %m");
                goto fail;
        }
        (void) sd_event_source_set_enabled(h->method_timer, SD_EVENT_OFF);
        /* The first queue tick runs at once: whatever expired while we were down. */
        *ret = h;
        return 0;
fail:
        gw_hub_free(h);
        return r;
}

struct gw_hub *gw_hub_free(struct gw_hub *h) {
        if (!h)
                return NULL;
        h->queue_timer = sd_event_source_disable_unref(h->queue_timer);
        h->method_timer = sd_event_source_disable_unref(h->method_timer);
        h->gc_timer = sd_event_source_disable_unref(h->gc_timer);
        h->methods = hub_methods_free(h->methods);
        h->sessions = hub_sessions_free(h->sessions);
        h->twins = hub_twins_free(h->twins);
        h->queue = hub_queue_free(h->queue);
        /* Completions of queue operations still pending run here, while the outbox (which
         * events may still go to) and the registry are alive. */
        if (h->store)
                (void) hub_store_dispatch(h->store);
        h->outbox = hub_outbox_free(h->outbox);
        h->registry = hub_registry_free(h->registry);
        free(h->hub_name);
        sd_event_unref(h->event);
        free(h);
        return NULL;
}
