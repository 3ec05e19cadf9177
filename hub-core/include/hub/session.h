/* SPDX-License-Identifier: MIT */
#pragma once

/* Device sessions: the one protocol-neutral interface through which every way a device is
 * connected — an MQTT connection, an HTTP poller, an AMQP link, a CoAP endpoint, an adapter
 * device — meets hub-core. The protocol side registers a session for an identity (device, or
 * device + module) with an ops table; hub-core delivers through it cloud-to-device messages,
 * desired-property patches and method requests, and asks it to drop the device (disabled,
 * deleted, keys rotated, taken over). hub-core never learns which protocol is behind it.
 *
 * IoT Hub allows one connection per identity: registering an identity that already has a
 * session closes the old one first (ops->close, "taken over by a new connection").
 * Registration and unregistration append the connection-state events of reference §8.7
 * (deviceConnectionStateEvents, deviceConnected / deviceDisconnected, with a hex
 * sequenceNumber that strictly increases, across restarts too) to the outbox, and update the
 * registry's connectionState / connectionStateUpdatedTime / lastActivityTime (devices only:
 * the registry has no module rows) through the store, asynchronously.
 *
 * Everything runs on the store owner's thread (the event loop). Ops are called on that
 * thread; they must not block. They may call back into hub_session_* (including
 * hub_session_unregister() of their own session from close).
 *
 * Other hub-core modules (methods) and the gateway's wiring (C2D queues' on_available,
 * twins' on_desired) follow sessions through observers: a capability change (a device
 * subscribing to methods, to C2D), a session that is ready for more after -EAGAIN, and a
 * session that went away. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/macro.h"

struct hub_store;
struct hub_outbox;
struct hub_msg;
struct hub_sessions;
struct hub_session;

#define HUB_SESSION_OPS_VERSION 1u

/* Capabilities: what the device subscribed to. Settable at any time. */
#define HUB_SESSION_C2D (1u << 0)     /* cloud-to-device messages (MQTT devicebound, AMQP receiver link, ...) */
#define HUB_SESSION_DESIRED (1u << 1) /* desired-property patches */
#define HUB_SESSION_METHODS (1u << 2) /* direct methods */
#define _HUB_SESSION_CAPS_ALL (HUB_SESSION_C2D | HUB_SESSION_DESIRED | HUB_SESSION_METHODS)

/* Last activity is written to the registry at most this often per device. */
#define HUB_SESSION_ACTIVITY_INTERVAL_USEC (10 * USEC_PER_SEC)

/* What the protocol side implements. Each delivery returns 0 when the session took it,
 * -EAGAIN when it cannot take more now (window full: call hub_session_ready() when it can),
 * -ENOTCONN when it is going away. All run on the owner's thread and must not block. */
struct hub_session_ops {
        unsigned version; /* HUB_SESSION_OPS_VERSION */
        /* Borrows m (hub_msg_ref() to keep it). lock_token identifies the delivery for the
         * C2D queue's complete / reject / abandon. */
        int (*deliver_c2d)(void *ud, struct hub_msg *m, const char *lock_token);
        /* json_patch: the desired-properties patch document (with "$version"). */
        int (*desired_patch)(void *ud, const char *json_patch, int64_t version);
        /* json_payload: the exact JSON the device receives as the body. request_id: what the
         * device echoes in its response (hub_method_response()). */
        int (*method_request)(void *ud, const char *method_name, const char *json_payload, const char *request_id);
        /* The hub asks the protocol to drop the device (reason_errno: -EEXIST taken over,
         * -EPERM disabled, -ENOENT deleted, -EKEYREVOKED keys changed, ...). The session is
         * already out of the table and its disconnected event emitted; the protocol must
         * still call hub_session_unregister() (possibly from inside close). */
        void (*close)(void *ud, int reason_errno, const char *why);
};

/* Observers: hub-core modules and the gateway wiring follow sessions. Every member may be
 * NULL. Called on the owner's thread after the change took effect. */
struct hub_session_observer {
        /* The capabilities changed (also right after registration with old = 0). */
        void (*capabilities)(void *ud, struct hub_session *s, unsigned old_caps, unsigned new_caps);
        /* The protocol said it can take more after an -EAGAIN (hub_session_ready()). */
        void (*ready)(void *ud, struct hub_session *s);
        /* The session leaves the table (unregistered, or closed by the hub). s is still valid
         * during the call, not after. reason_errno: 0 = the device went away. */
        void (*gone)(void *ud, struct hub_session *s, int reason_errno);
};

struct hub_sessions_options {
        struct hub_store *store;       /* borrowed, required: registry columns and the sequence generation */
        struct hub_outbox *outbox;     /* borrowed, optional: where connection-state events go */
        const struct hub_clock *clock; /* borrowed, required */
        const struct hub_log *log;     /* borrowed, optional */
        /* The hub's name: user-id and the hubName property of events (optional). */
        const char *hub_name;
};

/* Creates the session table. Blocks once, on a store write that bumps the persistent
 * generation of connection-state sequence numbers and marks every device disconnected (no
 * session survives a restart; a crash may have left devices "connected"). -EINVAL, -ENOMEM,
 * store errors. */
HUB_EXPORT int hub_sessions_new(const struct hub_sessions_options *opts, struct hub_sessions **ret);
/* Closes every live session as hub_sessions_close_device() does (ops->close with
 * -ESHUTDOWN; disconnected events and registry updates included), waits for this table's
 * store writes and frees it. Must run before the outbox and the store are freed. A session
 * its protocol has not unregistered yet is detached: hub_session_unregister() then only
 * frees it. Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_sessions *hub_sessions_free(struct hub_sessions *hs);
DEFINE_CLEANUP_FUNC(struct hub_sessions *, hub_sessions_free);

/* Adds an observer (at most 8). -ENOSPC when full, -EINVAL. */
HUB_EXPORT int hub_sessions_add_observer(struct hub_sessions *hs, const struct hub_session_observer *obs, void *ud);
HUB_EXPORT void hub_sessions_remove_observer(struct hub_sessions *hs, const struct hub_session_observer *obs,
                                             void *ud);

/* Registers a session for device_id (module_id NULL for the device itself) whose identity
 * was authenticated by the caller. auth_generation_id (may be NULL) is the registry
 * generation id the credentials were checked against. ops and ud are borrowed until
 * hub_session_unregister(). Capabilities start empty. An existing session of the same
 * identity is closed first (taken over). Emits deviceConnected and updates the registry.
 * -EINVAL bad ids or ops (ops->version must be HUB_SESSION_OPS_VERSION, close required),
 * -ENOMEM. */
HUB_EXPORT int hub_sessions_register(struct hub_sessions *hs, const char *device_id, const char *module_id,
                                     const char *auth_generation_id, const struct hub_session_ops *ops, void *ud,
                                     struct hub_session **ret);

/* The protocol side is done with the session (connection closed, or after ops->close). If it
 * was still live: emits deviceDisconnected, updates the registry, notifies observers
 * (calls in flight to it fail). Then frees it. Accepts NULL. */
HUB_EXPORT void hub_session_unregister(struct hub_session *s);

/* Sets what the device subscribed to (HUB_SESSION_*). -EINVAL unknown bits; -ENOTCONN when
 * the session was closed by the hub. */
HUB_EXPORT int hub_session_set_capabilities(struct hub_session *s, unsigned caps);
HUB_EXPORT unsigned hub_session_get_capabilities(const struct hub_session *s);

/* The protocol can take deliveries again after returning -EAGAIN. */
HUB_EXPORT void hub_session_ready(struct hub_session *s);

/* Records device activity (a message, a ping). The registry's lastActivityTime is written at
 * most once per HUB_SESSION_ACTIVITY_INTERVAL_USEC per session. */
HUB_EXPORT void hub_session_touch(struct hub_session *s);

/* Records activity of a device that has no session (HTTP device requests: IoT Hub does not
 * count HTTP devices as connected): writes the registry's lastActivityTime asynchronously,
 * without a connection-state change. The caller limits how often (e.g. once per
 * HUB_SESSION_ACTIVITY_INTERVAL_USEC per device). Unknown devices are ignored. */
HUB_EXPORT void hub_sessions_touch_device(struct hub_sessions *hs, const char *device_id);

HUB_EXPORT const char *hub_session_device_id(const struct hub_session *s);
HUB_EXPORT const char *hub_session_module_id(const struct hub_session *s); /* NULL for a device */
HUB_EXPORT const char *hub_session_auth_generation_id(const struct hub_session *s);
HUB_EXPORT void *hub_session_userdata(const struct hub_session *s);
/* False once the hub closed it or it was unregistered. */
HUB_EXPORT bool hub_session_is_live(const struct hub_session *s);

/* The live session of an identity, or NULL. */
HUB_EXPORT struct hub_session *hub_sessions_find(struct hub_sessions *hs, const char *device_id,
                                                 const char *module_id);

/* Closes every live session of a device and of its modules, at once (ops->close with
 * reason_errno and why): the device was disabled, deleted or its keys regenerated. Returns
 * the number of sessions closed. */
HUB_EXPORT int hub_sessions_close_device(struct hub_sessions *hs, const char *device_id, int reason_errno,
                                         const char *why);

/* Deliveries through a session, checking its capability first: -ENOTCONN when the session
 * is not live or did not subscribe (C2D / DESIRED / METHODS), else what the op returned. */
HUB_EXPORT int hub_session_deliver_c2d(struct hub_session *s, struct hub_msg *m, const char *lock_token);
HUB_EXPORT int hub_session_deliver_desired(struct hub_session *s, const char *json_patch, int64_t version);
HUB_EXPORT int hub_session_deliver_method(struct hub_session *s, const char *method_name, const char *json_payload,
                                          const char *request_id);
/* Desired-property fan-out for the twins' on_desired hook: delivers to the identity's live
 * session if it subscribed. -ENOTCONN otherwise (the device reads the twin on reconnect). */
HUB_EXPORT int hub_sessions_deliver_desired(struct hub_sessions *hs, const char *device_id, const char *module_id,
                                            const char *json_patch, int64_t version);

struct hub_sessions_stats {
        uint64_t live;               /* sessions in the table */
        uint64_t with_c2d, with_desired, with_methods;
        uint64_t registered;         /* since start */
        uint64_t taken_over;
        uint64_t closed_by_hub;
        uint64_t event_failures;     /* connection-state events that could not be appended */
};
HUB_EXPORT void hub_sessions_get_stats(struct hub_sessions *hs, struct hub_sessions_stats *ret);
