/* SPDX-License-Identifier: MIT */
#pragma once

/* The hand-over from paho.mqtt.c's threads to the event loop, shared by the transports that
 * use MQTTAsync (endpoint-mqtt.c, endpoint-upstream.c): paho's callbacks only append a record
 * to a mutex-protected list and write an eventfd; the loop takes the whole list at once and
 * calls the handler for each record in posting order, on the loop thread.
 *
 * A record is any struct whose first member is a struct gw_paho_item, allocated by the
 * poster; after the handler ran, the inbox calls free_item on it (also for records still
 * queued when the inbox is freed). */

#include <systemd/sd-event.h>

struct gw_paho_item {
        struct gw_paho_item *next;
};

struct gw_paho_inbox;

typedef void (*gw_paho_inbox_fn)(void *ud, struct gw_paho_item *item);

/* handler and free_item are required. -errno (eventfd, sd-event, memory). */
int gw_paho_inbox_new(sd_event *e, gw_paho_inbox_fn handler, void (*free_item)(struct gw_paho_item *item), void *ud,
                      struct gw_paho_inbox **ret);
/* Any thread. Takes item. */
void gw_paho_inbox_post(struct gw_paho_inbox *ib, struct gw_paho_item *item);
/* Loop thread, after the paho clients that post here are destroyed. Frees what is queued.
 * Accepts NULL; returns NULL. */
struct gw_paho_inbox *gw_paho_inbox_free(struct gw_paho_inbox *ib);
