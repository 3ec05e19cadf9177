/* SPDX-License-Identifier: MIT */
#pragma once

/* The hub: one object owning the hub-core modules the gateway runs — identity registry,
 * twins, C2D and feedback queues, outbox (events), device sessions and direct methods —
 * with their hooks and the timers hub-core asks for (it runs none itself): the queue tick at
 * hub_queue_next_deadline(), the method tick at hub_method_next_deadline(), and the outbox
 * garbage collection once a second.
 *
 * Store completions are dispatched by the daemon (gw_hub_dispatch() on the store fd), which
 * also re-arms the timers whose deadlines the completions may have moved. Runs on the loop
 * thread. */

#include <stdbool.h>
#include <stdint.h>

#include <systemd/sd-event.h>

#include "hub/queue.h"

struct hub_store;
struct hub_registry;
struct hub_twins;
struct hub_queue;
struct hub_outbox;
struct hub_sessions;
struct hub_methods;
struct gw_config;
struct gw_mqtt_stats;

struct gw_hub {
        sd_event *event;
        struct hub_store *store;          /* borrowed */
        struct hub_registry *registry;
        struct hub_twins *twins;
        struct hub_queue *queue;
        struct hub_outbox *outbox;
        struct hub_sessions *sessions;
        struct hub_methods *methods;
        char *hub_name;                   /* hub.host_name: user-id / hubName of events */

        /* Set by a device front-end (MQTT): called when a device's C2D queue has something
         * deliverable again (the queue's on_available hook). */
        void (*c2d_available)(void *ud, const char *device_id);
        void *c2d_available_ud;
        /* The same for the CoAP front-end (front/coap.c), which runs beside MQTT. */
        void (*coap_c2d_available)(void *ud, const char *device_id);
        void *coap_c2d_available_ud;
        /* The same for adapter devices (adapters.c). */
        void (*adapters_c2d_available)(void *ud, const char *device_id);
        void *adapters_c2d_available_ud;
        /* Set by the MQTT front-end for the metrics endpoint (struct gw_mqtt_stats, front/mqtt.h). */
        const struct gw_mqtt_stats *mqtt_stats;
        /* Set by the MQTT front-end: called at the end of gw_hub_dispatch(), once the
         * completions of a group commit ran, to send the PUBACKs they made due together. */
        void (*after_dispatch)(void *ud);
        void *after_dispatch_ud;


        sd_event_source *queue_timer, *method_timer, *gc_timer;
        bool queue_tick_running;
        uint64_t queue_ticks, events_appended, event_failures;
        /* The store's "full" state (budget or disk), watched by the gc timer: logged once when
         * writes start failing with -ENOSPC and once when they succeed again. */
        bool store_full, clock_synchronized;
        uint64_t store_full_failures, store_full_appended, store_full_append_failures;
        uint64_t events_max_bytes;        /* the event stream's configured bound (0 = none) */
        struct gw_uplink *uplink;         /* the route endpoints (set by uplink.c), for metrics */
};

/* Converts the c2d: / feedback: configuration into queue options. */
void gw_hub_queue_options(const struct gw_config *cfg, struct hub_queue_options *ret);

/* Opens every module on an open store (borrowed: must outlive the hub), with the queue
 * options of cfg. Blocks (registry and outbox set-up). Logs and returns -errno. */
int gw_hub_new(sd_event *e, struct hub_store *store, const struct gw_config *cfg, struct gw_hub **ret);
/* Closes every session, fails pending method calls, waits for the modules' writes and frees
 * them, in dependency order. Must run before the store closes. Accepts NULL; returns NULL. */
struct gw_hub *gw_hub_free(struct gw_hub *h);

/* Runs the store's completions and re-arms the timers. */
int gw_hub_dispatch(struct gw_hub *h);
/* Re-arms the queue and method timers from the modules' current deadlines (after a call that
 * may have moved them, e.g. a method invoke). */
void gw_hub_rearm(struct gw_hub *h);
