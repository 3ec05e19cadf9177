/* SPDX-License-Identifier: MIT */
#pragma once

/* The hand-over from paho.mqtt.c's threads to the event loop, shared by the transports that
 * use MQTTAsync (endpoint-mqtt.c, endpoint-upstream.c): paho's callbacks only append a record
 * to a mutex-protected list and write an eventfd; the loop takes the whole list at once and
 * calls the handler for each record in posting order, on the loop thread.
 *
 * A record is any struct whose first member is a struct gw_paho_item, allocated by the
 * poster; after the handler ran, the inbox calls free_item on it (also for records still
 * queued when the inbox is freed).
 *
 * The inbox also wakes paho's receive thread after a connect (gw_paho_inbox_wake_receiver()),
 * see there. The first inbox of the process creates the waker (a private paho client and a
 * loopback listening socket), the last one freed destroys it. */

#include <MQTTAsync.h>
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

/* paho.mqtt.c 1.3.x has one receive thread per process. It polls a saved copy of its socket
 * set for readability with a 1 s timeout (Socket_getReadySocket), and looks at the sockets
 * whose TCP connect completed (it then sends the CONNECT, or starts the TLS handshake) only
 * after that poll returned (an event or the timeout; an interrupted poll, EINTR, skips that
 * check and sleeps 100 ms). A completed connect makes a socket writable, not readable, and an
 * MQTT server sends nothing first, so a connection made with MQTTAsync_connect() would wait
 * for the end of that poll: up to a second before its first packet.
 *
 * The remedy is a socket in that set which we can make readable: each inbox holds a
 * reference on a process-wide waker, a listening socket on 127.0.0.1 (any port) to which a
 * private paho client connects once (its CONNECT must carry a random client id, anybody else
 * is closed; answered with a CONNACK; no keep-alive). gw_paho_inbox_wake_receiver(), called
 * right after MQTTAsync_connect() (loop thread), writes a PINGRESP (2 bytes, which paho
 * takes and ignores) to that connection at 1, 5, 15, 30, 60, 100, 170, 270, 420 and 650 ms
 * (the connect runs on paho's send thread, and completes after a round trip): each time
 * the receive thread's poll returns, it copies the socket set again and handles the new
 * connection. Once its CONNECT (or TLS handshake) is out, the answers arrive on its own
 * socket. A later call restarts the sequence. Without a waker (it could not be set up:
 * logged once per inbox) connections only take paho's second longer. */
void gw_paho_inbox_wake_receiver(struct gw_paho_inbox *ib);
/* ---- paho clients, one per connection ------------------------------------------------------
 *
 * paho.mqtt.c keeps a client's queued commands across a lost connection: publishes handed to
 * MQTTAsync_send() that its send thread had not written yet go out on the client's next
 * connection, before anything sent after the reconnect (MQTTCLIENT_PERSISTENCE_NONE and a
 * clean session do not drop them; only MQTTAsync_destroy() does). The transports resend
 * from their cursor after a reconnect, so those leftovers would reach the broker ahead of
 * older messages of the same device (seen: 44-52 leftovers after a broker restart during a
 * drain, first deliveries out of order per device). So every connection after the first
 * gets a new client: gw_paho_client_renew(). */

struct gw_paho_client_conf {
        const char *uri, *client_id;
        int mqtt_version;           /* MQTTVERSION_DEFAULT, MQTTVERSION_3_1_1, ... */
        int max_buffered;           /* createOptions.maxBufferedMessages */
        void *context;              /* for lost and arrived */
        MQTTAsync_connectionLost *lost;
        MQTTAsync_messageArrived *arrived;
};

/* A client (persistence none, no sending while disconnected) with its callbacks set. A paho
 * code (MQTTASYNC_SUCCESS). */
int gw_paho_client_new(const struct gw_paho_client_conf *c, MQTTAsync *ret);

/* Loop thread, while *client is not connected: replaces it by a new client made as
 * gw_paho_client_new() does and destroys the old one, with whatever it still had queued
 * (paho calls the failure callbacks of those commands from here, on this thread). The new
 * client is made first: destroying the process's last client would stop paho's threads and
 * wait for them. A paho code; on failure *client is left as it was. */
int gw_paho_client_renew(const struct gw_paho_client_conf *c, MQTTAsync *client);
