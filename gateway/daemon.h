/* SPDX-License-Identifier: MIT */
#pragma once

/* fieldhubd's top-level object: the sd-event loop, the configuration, the store, the
 * registry and the admin socket, with the start / reload / stop lifecycle. */

#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "hub/registry.h"
#include "hub/store.h"

struct gw_adapters;
struct gw_admin;
struct gw_api;
struct gw_mqtt;
struct gw_coap;
struct gw_uplink;
struct gw_hub;

struct gw_daemon_options {
        const char *config_path;
        const char *confd_dir;      /* NULL: <dirname(config)>/conf.d */
        const char *state_dir;      /* NULL: from the configuration */
        int log_level;              /* -1: from the configuration */
};

struct gw_daemon {
        struct gw_daemon_options opts;
        sd_event *event;
        struct gw_config *config;
        struct hub_store *store;
        struct gw_hub *hub;         /* hub-core's modules and their timers (hub.h) */
        struct hub_registry *registry; /* borrowed from hub */
        struct gw_api *api;         /* the service REST API (api/api.h); also serves the admin socket
                                     * through gw_api_call_internal(). Always present once started. */
        struct gw_mqtt *mqtt;       /* the MQTT device interface (front/mqtt.h) */
        struct gw_coap *coap;       /* CoAP server mode (front/coap.h); NULL when off */
        struct gw_admin *admin;
        struct gw_adapters *adapters; /* field adapters and their devices (adapters.h) */
        struct gw_uplink *uplink;   /* route endpoints reading the outbox (uplink/uplink.h) */
        char **host_names;          /* host_name then aliases, NULL-terminated (borrowed from config) */

        sd_event_source *store_source;
        sd_event_source *watchdog_source;
        sd_event_source *housekeeping_source;
        sd_event_source *trim_source; /* malloc_trim() every second */
        uint64_t watchdog_usec;     /* 0: no watchdog */
        bool store_stalled;
        bool heartbeat_pending;
        uint64_t started_mono;

        unsigned reloads_ok, reloads_failed;
        char *last_reload_error;    /* NULL when the last reload succeeded (or none yet) */
};

/* Exit statuses (sysexits.h): a bad configuration must not make systemd restart us. */
#define GW_EXIT_CONFIG 78  /* EX_CONFIG */
#define GW_EXIT_DATAERR 65 /* EX_DATAERR: the store is corrupt or from a newer version */

/* Loads the configuration, opens the store, listens. On failure logs why and returns the
 * exit status to use (> 0). */
int gw_daemon_start(const struct gw_daemon_options *opts, struct gw_daemon **ret);
/* Runs the loop until SIGTERM/SIGINT. Returns the exit status. */
int gw_daemon_run(struct gw_daemon *d);
struct gw_daemon *gw_daemon_free(struct gw_daemon *d);

/* Re-reads the configuration and applies it, or keeps the running one. 0 on success;
 * -EINVAL with *ret_errors (a JSON array of strings, new reference) when rejected. */
int gw_daemon_reload(struct gw_daemon *d, json_t **ret_errors);
/* A JSON summary for `fieldhubctl status` (new reference). */
json_t *gw_daemon_status(struct gw_daemon *d);
/* The one-line STATUS= summary. */
void gw_daemon_status_line(struct gw_daemon *d, char *buf, size_t n);

/* The admin socket (admin.c). */
int gw_admin_start(struct gw_daemon *d, const char *path, struct gw_admin **ret);
struct gw_admin *gw_admin_stop(struct gw_admin *a);
const char *gw_admin_path(struct gw_admin *a);
