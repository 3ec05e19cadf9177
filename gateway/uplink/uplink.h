/* SPDX-License-Identifier: MIT */
#pragma once

/* The route endpoints of the configuration (endpoint.h) and the router they share. Created by
 * the daemon after the hub; runs on the loop thread. */

#include <jansson.h>
#include <systemd/sd-event.h>

struct gw_hub;
struct gw_config;
struct gw_uplink;

/* Builds the router, opens (or creates) every configured endpoint's outbox cursor, deletes
 * the cursors of endpoints no longer configured (so they stop holding messages), starts
 * connecting. Logs and returns -errno. */
int gw_uplink_new(sd_event *e, struct gw_hub *hub, const struct gw_config *cfg, struct gw_uplink **ret);
/* Applies a new (validated) configuration: the new router at once; endpoints whose transport
 * settings did not change keep their connection; changed ones reconnect; removed ones stop and
 * their cursors are deleted; new ones start. Cursors of kept endpoints survive. */
int gw_uplink_reload(struct gw_uplink *u, const struct gw_config *cfg);
struct gw_uplink *gw_uplink_free(struct gw_uplink *u);
/* [{name, type, state, backlog:{count, bytes}, oldestAgeSeconds, drainRatePerSecond, delivered,
 *   drops, expiries, rejected, poison, oversize, lastError}, ...] (new reference). */
json_t *gw_uplink_status(struct gw_uplink *u);
