/* SPDX-License-Identifier: MIT */
#pragma once

/* The adapters' host (adapter/adapter.h implemented on sd-event) and the adapter↔hub bridge:
 * each adapter device becomes a hub identity (created on first start) with a device session;
 * its telemetry goes to the outbox, its adapter view to the twin's reported properties, and
 * desired-property patches, direct methods and C2D messages come back through the session
 * ops as adapter commands. This file is the only place where adapters meet hub-core.
 *
 * Everything runs on the loop thread, except the host's post() (thread-safe: a per-adapter
 * inbox signalled through an eventfd) and log(). */

#include <jansson.h>
#include <systemd/sd-event.h>

#include "adapter/adapter.h"

struct gw_config;
struct gw_hub;
struct gw_adapters;

/* The adapter types compiled in (name → ops). NULL-terminated. */
extern const struct adp_ops *const gw_adapter_ops[];

/* Creates and starts every adapter of c. hub is borrowed (must outlive the adapters). An
 * adapter that fails to start is logged and left out; the others run. Returns 0, -ENOMEM. */
int gw_adapters_start(sd_event *e, struct gw_hub *hub, const struct gw_config *c, struct gw_adapters **ret);

/* Applies a new (validated) configuration: adapters whose item did not change are left
 * alone; changed ones are reconfigured (the adapter keeps unchanged devices polling) or, when
 * the adapter cannot reconfigure, restarted; removed ones stopped; new ones started. Call it
 * while both the old and the new configuration are alive. Returns 0 or the first error
 * (logged; the other adapters are still applied). */
int gw_adapters_reload(struct gw_adapters *g, const struct gw_config *nc);

/* Stops every adapter (their threads joined, pending commands answered) and frees. Must run
 * before the hub is freed. Accepts NULL; returns NULL. */
struct gw_adapters *gw_adapters_stop(struct gw_adapters *g);

/* {"adapters":[{"name","type","devices":[{"id","state","reason"}],"stats":{...}}]} (new ref). */
json_t *gw_adapters_status(struct gw_adapters *g);
