/* SPDX-License-Identifier: MIT */
#pragma once

/* Cloud-to-device queues and the feedback queue (reference §7, §5.6, §5.7, §3.4, §2.8).
 *
 * Every device has a durable FIFO queue in the store. A message is Enqueued when sent,
 * Invisible while a receiver holds its lock, and leaves the queue when completed (feedback
 * Success), rejected (Rejected), abandoned for the last time (DeliveryCountExceeded), expired
 * (Expired) or purged (Purged). Dead-lettered messages are not kept (IoT Hub has no readable
 * dead-letter queue). Order is by a per-device sequence number that only grows; an abandoned
 * or lock-expired message returns to its place, so it is the next one delivered.
 *
 * Delivery count: incremented only on abandon (reference §7). A lock that expires returns the
 * message to Enqueued WITHOUT incrementing it. Lock expiries are counted separately; with
 * max_lock_expiries set (0 = off, the default, as IoT Hub) a message whose lock has expired
 * that many times is dead-lettered as DeliveryCountExceeded, as a safety limit against a
 * receiver that takes messages and never settles them.
 *
 * Feedback (iothub-ack): none (default) = no record; positive = Success on complete;
 * negative = a record when the message is dead-lettered (Expired, DeliveryCountExceeded,
 * Rejected) or purged (Purged: the message was not delivered either); full = both. A record is
 * written in the same transaction as the state change that causes it. Records are batched
 * into feedback messages (JSON array, content-type application/vnd.microsoft.iothub.feedback.json,
 * encoding utf-8) of up to HUB_QUEUE_FEEDBACK_BATCH_MAX records, or fewer once the oldest
 * record of the batch is HUB_QUEUE_FEEDBACK_BATCH_USEC old (released by hub_queue_tick()).
 * Feedback messages form one hub-wide queue with the same lifecycle (TTL, lock, abandon with
 * a maximum delivery count after which they are dropped; no feedback about feedback). The
 * hub name (feedback user-id) is not known to hub-core: the gateway stamps it.
 *
 * Deleting a device (registry) drops its queue and its pending (not yet batched) feedback
 * records through ON DELETE CASCADE; records already batched into a feedback message stay.
 * devices.c2d_count (cloudToDeviceMessageCount) always equals the number of messages in the
 * device's queue (Enqueued + Invisible); it is updated in the same transaction.
 *
 * Threading: every function is called on the store's owner thread. Mutations (send, receive,
 * settle, purge, tick) are asynchronous store writes: they return 0 once submitted, or a
 * negative errno for bad arguments (then the completion never runs); the completion runs
 * later from hub_store_dispatch() on the owner's thread with the result. Time is passed in
 * (realtime, usec since the epoch): hub-core reads no clock and runs no timer. The caller
 * asks hub_queue_next_deadline() when to call hub_queue_tick().
 *
 * Writes run in submission order, so successive hub_queue_receive() calls for one device
 * hand out successive messages in sequence order (an MQTT/AMQP session keeps a window of
 * several in-flight messages that way). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/clock.h"
#include "hub/macro.h"

struct hub_store;
struct hub_msg;
struct hub_log;
struct hub_queue;

#define HUB_QUEUE_DEFAULT_TTL_USEC (3600 * USEC_PER_SEC)
#define HUB_QUEUE_TTL_MIN_USEC (60 * USEC_PER_SEC)
#define HUB_QUEUE_TTL_MAX_USEC (48 * 3600 * USEC_PER_SEC)
#define HUB_QUEUE_DEFAULT_MAX_DELIVERY_COUNT 10u
#define HUB_QUEUE_MAX_DELIVERY_COUNT_LIMIT 100u
#define HUB_QUEUE_DEFAULT_MAX_DEPTH 50u
#define HUB_QUEUE_MAX_DEPTH_LIMIT 100000u
#define HUB_QUEUE_DEFAULT_LOCK_USEC (60 * USEC_PER_SEC)
#define HUB_QUEUE_LOCK_MIN_USEC (5 * USEC_PER_SEC)
#define HUB_QUEUE_LOCK_MAX_USEC (300 * USEC_PER_SEC)
#define HUB_QUEUE_FEEDBACK_BATCH_MAX 64u
#define HUB_QUEUE_FEEDBACK_BATCH_USEC (15 * USEC_PER_SEC)
#define HUB_QUEUE_FEEDBACK_CONTENT_TYPE "application/vnd.microsoft.iothub.feedback.json"
/* Lock tokens are GUID strings ("8b0c6f5e-...", 36 characters). */
#define HUB_QUEUE_LOCK_TOKEN_MAX 36u

enum hub_queue_ack { HUB_QUEUE_ACK_NONE, HUB_QUEUE_ACK_POSITIVE, HUB_QUEUE_ACK_NEGATIVE, HUB_QUEUE_ACK_FULL };

enum hub_feedback_status {
        HUB_FEEDBACK_SUCCESS,
        HUB_FEEDBACK_EXPIRED,
        HUB_FEEDBACK_DELIVERY_COUNT_EXCEEDED,
        HUB_FEEDBACK_REJECTED,
        HUB_FEEDBACK_PURGED,
        _HUB_FEEDBACK_STATUS_MAX,
};

/* "Success", "Expired", "DeliveryCountExceeded", "Rejected", "Purged"; NULL out of range. */
HUB_EXPORT const char *hub_feedback_status_to_string(enum hub_feedback_status s);
/* Parses an iothub-ack value ("none", "positive", "negative", "full"; NULL = none). -EINVAL. */
HUB_EXPORT int hub_queue_ack_from_string(const char *s, enum hub_queue_ack *ret);

struct hub_queue_options {
        /* 0 selects the default in every field. */
        uint64_t default_ttl_usec;          /* 1 h; 1 min … 48 h */
        uint64_t max_ttl_usec;              /* 48 h; default_ttl … 48 h (clamps absolute-expiry-time) */
        uint32_t max_delivery_count;        /* 10; 1 … 100 */
        uint32_t max_depth;                 /* 50; 1 … 100000 */
        uint64_t lock_timeout_usec;         /* 60 s; 5 s … 300 s */
        uint32_t max_lock_expiries;         /* 0 = no limit (IoT Hub); else 1 … 1000 */
        uint64_t feedback_ttl_usec;         /* 1 h; 1 min … 48 h */
        uint64_t feedback_lock_timeout_usec;/* 60 s; 5 s … 300 s */
        uint32_t feedback_max_delivery_count; /* 10; 1 … 100 */
};

/* Checks options (0 = default everywhere). Returns 0, or -EINVAL with *ret_error (may be NULL)
 * set to a static string naming the field and its range. */
HUB_EXPORT int hub_queue_options_validate(const struct hub_queue_options *o, const char **ret_error);

struct hub_queue_hooks {
        /* Called from a completion (owner's thread) when a device's queue went from nothing
         * deliverable to something deliverable: a new message, an abandon, a released or
         * expired lock. A session that is not pulling may start again. Optional. */
        void (*on_available)(void *userdata, const char *device_id);
        /* Likewise for the feedback queue (a batch released, an abandon, a lock expiry). */
        void (*on_feedback_available)(void *userdata);
        void *userdata;
};

/* Creates the queue module on an open store (borrowed; must outlive it). opts NULL = defaults
 * (copied), hooks NULL = none (copied), log may be NULL. -EINVAL bad options, -ENOMEM.
 * Does not block. */
HUB_EXPORT int hub_queue_new(struct hub_store *store, const struct hub_queue_options *opts,
                             const struct hub_queue_hooks *hooks, const struct hub_log *log,
                             struct hub_queue **ret);
/* Accepts NULL; returns NULL. Operations still pending keep running: their completions still
 * run (results intact) but hooks are no longer called. */
HUB_EXPORT struct hub_queue *hub_queue_free(struct hub_queue *q);
DEFINE_CLEANUP_FUNC(struct hub_queue *, hub_queue_free);

/* ---- device queues ------------------------------------------------------------------------ */

/* Completion of hub_queue_send(): r = 0 and the message's sequence number, or -ENOENT unknown
 * device, -ENOBUFS queue full (max_depth non-expired messages; the caller answers 403004
 * DeviceMaximumQueueDepthExceeded), store errors (-ENOSPC, -EIO ...). */
typedef void (*hub_queue_send_done_fn)(int r, uint64_t sequence_number, void *userdata);

/* Enqueues msg (borrowed; serialised before return) for device_id. Keeps the sender's
 * message-id (needed for feedback; may be absent, then originalMessageId is null). Expiry is
 * absolute-expiry-time when set (clamped to now + max TTL; one already past expires at once),
 * else now + default TTL. iothub-ack is read from the ack system property (absent = none).
 * Expired messages of the device are dead-lettered first in the same transaction so they do
 * not count towards the depth limit.
 * Returns 0 (done will run) or, without calling done: -EINVAL bad arguments, an invalid
 * iothub-ack or absolute-expiry-time; -E2BIG message over HUB_MSG_C2D_MAX_SIZE (64 KB);
 * -ENOMEM; -ESHUTDOWN (store closing). */
HUB_EXPORT int hub_queue_send(struct hub_queue *q, const char *device_id, const struct hub_msg *msg, uint64_t now,
                              hub_queue_send_done_fn done, void *userdata);

struct hub_queue_delivery {
        struct hub_msg *msg;       /* borrowed for the completion; hub_msg_ref() to keep it.
                                    * Stamped: enqueued time, expiry, iothub-ack, and "to"
                                    * (/devices/{id}/messages/deviceBound) when the sender left
                                    * it unset. */
        const char *device_id;     /* NULL for feedback messages */
        const char *lock_token;    /* settle with it; HTTP sends it as the ETag */
        uint64_t sequence_number;
        uint32_t delivery_count;   /* abandons so far (0 on the first delivery) */
        uint64_t enqueued_usec;
        uint64_t expiry_usec;
        uint64_t lock_until_usec;
};

/* Completion of a receive: r = 0 with d (borrowed, valid during the call) or d = NULL when
 * nothing is deliverable; r < 0: -ENOENT unknown device, store errors. */
typedef void (*hub_queue_receive_done_fn)(int r, const struct hub_queue_delivery *d, void *userdata);

/* Takes the oldest Enqueued, non-expired message of device_id (sequence order), makes it
 * Invisible until now + lock timeout (0 = the configured default; other values are clamped to
 * 5 … 300 s) under a fresh, unguessable lock token. Expired messages are dead-lettered first.
 * Returns 0 or -EINVAL / -ENOMEM / -ESHUTDOWN without calling done. */
HUB_EXPORT int hub_queue_receive(struct hub_queue *q, const char *device_id, uint64_t lock_timeout_usec,
                                 uint64_t now, hub_queue_receive_done_fn done, void *userdata);

/* Completion of a settlement or tick. r >= 0 success (abandon: 0 requeued, 1 dead-lettered
 * at the maximum delivery count); -ENOLCK no message of this device holds that lock token
 * (unknown, settled, or already returned to the queue), -ESTALE the lock (or the message) has
 * expired; the caller maps both to 412002 DeviceMessageLockLost. Store errors. */
typedef void (*hub_queue_done_fn)(int r, void *userdata);

/* Complete (Success feedback for positive/full), reject (dead-letter, Rejected feedback for
 * negative/full), abandon (back to Enqueued, delivery count + 1; at max_delivery_count
 * dead-lettered with DeliveryCountExceeded). device_id must be the message's device (a token
 * of another device is -ENOLCK). Returns 0 or -EINVAL / -ENOMEM / -ESHUTDOWN without calling
 * done. done may be NULL. */
HUB_EXPORT int hub_queue_complete(struct hub_queue *q, const char *device_id, const char *lock_token, uint64_t now,
                                  hub_queue_done_fn done, void *userdata);
HUB_EXPORT int hub_queue_reject(struct hub_queue *q, const char *device_id, const char *lock_token, uint64_t now,
                                hub_queue_done_fn done, void *userdata);
HUB_EXPORT int hub_queue_abandon(struct hub_queue *q, const char *device_id, const char *lock_token, uint64_t now,
                                 hub_queue_done_fn done, void *userdata);

/* Returns every Invisible message of device_id to Enqueued without incrementing its delivery
 * count (as a lock expiry, but not counted as one): for a session that closed with messages
 * in flight (MQTT disconnect), so they are redelivered at once on reconnect. r = number of
 * messages released. done may be NULL. */
HUB_EXPORT int hub_queue_release_device(struct hub_queue *q, const char *device_id, uint64_t now,
                                        hub_queue_done_fn done, void *userdata);

/* Completion of hub_queue_purge(): r = 0 and the number of messages removed; -ENOENT. */
typedef void (*hub_queue_count_done_fn)(int r, uint64_t count, void *userdata);
/* Removes every message of device_id (Enqueued or Invisible), with a Purged feedback record
 * for each that asked for negative feedback (negative/full). */
HUB_EXPORT int hub_queue_purge(struct hub_queue *q, const char *device_id, uint64_t now,
                               hub_queue_count_done_fn done, void *userdata);

/* Messages in device_id's queue (Enqueued + Invisible, expired ones not yet collected
 * included), read now on the owner's thread. -ENOENT unknown device, store errors. */
HUB_EXPORT int hub_queue_depth(struct hub_queue *q, const char *device_id, uint64_t *ret);

/* ---- time -------------------------------------------------------------------------------- */

/* The earliest time at which hub_queue_tick() has something to do (a lock or a message
 * expiring, in device queues or the feedback queue, or a feedback batch becoming due).
 * Returns 1 and *ret_usec, or 0 (ret_usec untouched) when nothing is pending; store errors.
 * Reads what has been dispatched: ask again after each completion batch. */
HUB_EXPORT int hub_queue_next_deadline(struct hub_queue *q, uint64_t *ret_usec);

/* Applies everything due at now: expired locks return to Enqueued (delivery count unchanged;
 * lock expiries counted, see max_lock_expiries), expired messages are dead-lettered (Expired
 * feedback), due feedback batches become feedback messages, expired feedback messages are
 * dropped and their expired locks released. done (may be NULL) gets r >= 0. */
HUB_EXPORT int hub_queue_tick(struct hub_queue *q, uint64_t now, hub_queue_done_fn done, void *userdata);

/* ---- feedback queue (GET/DELETE/abandon on /messages/serviceBound/feedback) ----------------- */

/* Takes the oldest deliverable feedback message, locked until now + lock timeout (0 = the
 * configured feedback lock; others clamped to 5 … 300 s). d->msg has the JSON array as body,
 * content-type HUB_QUEUE_FEEDBACK_CONTENT_TYPE, content-encoding utf-8, a fresh message-id,
 * enqueued time and expiry. d = NULL when none. */
HUB_EXPORT int hub_queue_feedback_receive(struct hub_queue *q, uint64_t lock_timeout_usec, uint64_t now,
                                          hub_queue_receive_done_fn done, void *userdata);
/* Complete (remove), abandon (back to the queue, delivery count + 1; dropped at the feedback
 * maximum delivery count, r = 1), reject (drop). -ENOLCK / -ESTALE as for device messages. */
HUB_EXPORT int hub_queue_feedback_complete(struct hub_queue *q, const char *lock_token, uint64_t now,
                                           hub_queue_done_fn done, void *userdata);
HUB_EXPORT int hub_queue_feedback_abandon(struct hub_queue *q, const char *lock_token, uint64_t now,
                                          hub_queue_done_fn done, void *userdata);
HUB_EXPORT int hub_queue_feedback_reject(struct hub_queue *q, const char *lock_token, uint64_t now,
                                         hub_queue_done_fn done, void *userdata);

/* Counts for metrics: feedback messages waiting (any state) and records not yet batched. */
HUB_EXPORT int hub_queue_feedback_depth(struct hub_queue *q, uint64_t *ret_messages, uint64_t *ret_pending_records);
