/* SPDX-License-Identifier: MIT */
#pragma once

/* The outbox: the durable log of every accepted device-to-cloud message (and of the events
 * the hub itself emits: connection state, lifecycle, twin changes), stored once, in order,
 * with a sequence number that only grows (also across restarts and after garbage
 * collection). Endpoints (routes' destinations, the uplink, the built-in `events` stream)
 * read it through their own durable cursor: the sequence number of the last message the
 * endpoint is done with.
 *
 * Appends go through the store's grouped commit: hub_outbox_append() only queues; its
 * completion (dispatched by hub_store_dispatch() on the owner's thread) says the message is
 * durable — that is what a protocol front-end waits for before its PUBACK / HTTP 204. Many
 * appends queued back to back land in one transaction (one INSERT each, prepared once); the
 * appends queued while the commit thread is busy travel to it as one store write, with one
 * completion callback per message still.
 *
 * Everything here runs on the store owner's thread (the event loop), except the write
 * functions the store runs on its commit thread. There are no timers: the caller calls
 * hub_outbox_gc() now and then (about once a second) to apply TTLs and retention and to
 * delete what every endpoint is done with.
 *
 * Backlog accounting is computed from cursor positions: an endpoint's backlog is every
 * message after its cursor, including those its route would skip (the caller filters; it
 * should acknowledge skipped messages promptly). An in-memory index of ~100 bytes per 1,024
 * stored messages (chunk summaries; the rows of a chunk are read back from the log when a
 * question falls inside it) keeps counts, bytes and ages exact with bounded memory.
 *
 * Time rule for TTLs and retention (issue 6): within one boot a message's age is measured on
 * the monotonic boot clock (CLOCK_BOOTTIME), so wall-clock jumps never matter; a message
 * stored during another boot is aged by wall-clock time only when the wall clock was
 * synchronised both when it was stored and now (hub_outbox_set_clock_synchronized()), and a
 * negative wall-clock age counts as 0. Otherwise its age is unknown and it never expires (the
 * capacity bound still applies). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/macro.h"

struct hub_store;
struct hub_msg;
struct hub_outbox;
struct hub_outbox_endpoint;

/* The name of the built-in endpoint: the hub's event stream read by back-end applications. */
#define HUB_OUTBOX_EVENTS "events"
/* Endpoint names: 1..64 of [A-Za-z0-9_.-]. */
#define HUB_OUTBOX_ENDPOINT_NAME_MAX 64
/* Default retention of the events stream (IoT Hub's default: one day). */
#define HUB_OUTBOX_EVENTS_DEFAULT_RETENTION_USEC (24 * 3600 * USEC_PER_SEC)

enum hub_outbox_overflow {
        /* Over capacity, the endpoint's cursor moves past its oldest messages (counted as
         * drops). The publisher is acknowledged. */
        HUB_OUTBOX_DROP_OLDEST,
        /* Over capacity, hub_outbox_append() fails with -ENOBUFS: nothing is stored and the
         * publisher gets no acknowledgement, so the device keeps its copy. */
        HUB_OUTBOX_REJECT_NEW,
        _HUB_OUTBOX_OVERFLOW_MAX,
};

struct hub_outbox_endpoint_options {
        uint64_t max_count; /* messages after the cursor; 0 = unbounded */
        uint64_t max_bytes; /* stored bytes after the cursor; 0 = unbounded */
        enum hub_outbox_overflow overflow;
        /* Messages older than this (time rule above) are skipped and counted as expired;
         * 0 = never. For the events endpoint this is the retention time. */
        uint64_t ttl_usec;
};

struct hub_outbox_options {
        struct hub_store *store;       /* borrowed; must outlive the outbox */
        const struct hub_clock *clock; /* borrowed; required */
        const struct hub_log *log;     /* borrowed; optional */
        /* This boot's identity (/proc/sys/kernel/random/boot_id), 1..64 characters. The
         * monotonic clock is compared only between messages of the same boot. */
        const char *boot_id;
        /* Whether the wall clock is synchronised now (can change later). */
        bool clock_synchronized;
        /* The events endpoint: capacity, overflow, and ttl_usec = retention (0 here means
         * HUB_OUTBOX_EVENTS_DEFAULT_RETENTION_USEC). */
        struct hub_outbox_endpoint_options events;
};

/* One message read back. */
struct hub_outbox_entry {
        uint64_t seq;
        uint64_t enqueued_usec; /* wall clock when appended */
        char *device_id;
        char *module_id; /* NULL for device messages */
        size_t size;     /* stored size in bytes */
        /* The message (a private copy). iothub-enqueuedtime is set from enqueued_usec when the
         * appender had not stamped it. */
        struct hub_msg *msg;
};
/* Frees an array returned by the read functions. Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_outbox_entry *hub_outbox_entries_free(struct hub_outbox_entry *e, size_t n);

struct hub_outbox_endpoint_stats {
        uint64_t cursor;        /* last sequence number the endpoint is done with */
        uint64_t head;          /* last sequence number stored */
        uint64_t backlog_count; /* messages after the cursor */
        uint64_t backlog_bytes;
        uint64_t oldest_age_usec; /* of the first message after the cursor (0 when none or unknown) */
        uint64_t drops;           /* moved past by drop-oldest */
        uint64_t expiries;        /* moved past by the TTL (events: retention) */
        uint64_t delivered;       /* moved past by hub_outbox_ack() */
        uint64_t rejected;        /* appends refused with -ENOBUFS because of this endpoint */
};

struct hub_outbox_stats {
        uint64_t head;          /* last sequence number stored (0 = none yet) */
        uint64_t stored_count;  /* messages in the log (not yet garbage-collected) */
        uint64_t stored_bytes;
        uint64_t pending;       /* appends queued, not yet durable */
        uint64_t appended;      /* appends completed since start */
        uint64_t append_failures; /* appends that failed in the store */
        uint64_t deleted;       /* rows removed by hub_outbox_gc() since start */
};

/* Opens the outbox on an open store: loads endpoint cursors and indexes the stored messages
 * (one pass over the log; blocks), registers this boot, creates the events endpoint on first
 * use and applies opts->events to it. -EINVAL bad options, -ENOMEM, store errors. */
HUB_EXPORT int hub_outbox_new(const struct hub_outbox_options *opts, struct hub_outbox **ret);

/* Waits for this outbox's queued writes to complete (dispatching store completions, which
 * runs other modules' completions too), releases its statements and frees it. Must run
 * before hub_store_close(). Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_outbox *hub_outbox_free(struct hub_outbox *o);
DEFINE_CLEANUP_FUNC(struct hub_outbox *, hub_outbox_free);

/* Tells the outbox whether the wall clock is synchronised (time rule above). */
HUB_EXPORT void hub_outbox_set_clock_synchronized(struct hub_outbox *o, bool synchronized);

/* Called from each successful append's completion, before that append's own done, with the
 * new message's sequence number: lets the gateway wake long-pollers and endpoint drains. */
HUB_EXPORT void hub_outbox_set_appended_hook(struct hub_outbox *o, void (*fn)(void *ud, uint64_t seq), void *ud);

typedef void (*hub_outbox_append_done_fn)(int result, uint64_t seq, void *ud);

/* Appends a message. The device (and module) id are taken from the message's stamped
 * iothub-connection-device-id (-module-id) system properties, which must be set. The
 * message is serialized at once (borrowed: the caller keeps its reference). done runs from
 * hub_store_dispatch() with 0 and the message's sequence number once it is durable, or with
 * the store's error (-ENOSPC ...) and seq 0. Returns 0 when queued (done will run), else
 * done is not called: -EINVAL (no device id, NULL arguments), -E2BIG (message over its
 * limit), -ENOBUFS (a reject-new endpoint is at capacity: nothing stored), -ENOMEM,
 * -ESHUTDOWN. */
HUB_EXPORT int hub_outbox_append(struct hub_outbox *o, struct hub_msg *m, hub_outbox_append_done_fn done, void *ud);

/* Creates (durably; blocks) or loads the named endpoint and applies opts (NULL = unbounded,
 * no TTL). A new endpoint's cursor starts at the current head: it sees messages appended from
 * now on. Opening "events" reconfigures the built-in endpoint. Calling it again with the same
 * name reconfigures (reload). *ret stays valid until hub_outbox_free() (or
 * hub_outbox_endpoint_delete()). -EINVAL bad name or options, store errors. */
HUB_EXPORT int hub_outbox_endpoint_open(struct hub_outbox *o, const char *name,
                                        const struct hub_outbox_endpoint_options *opts,
                                        struct hub_outbox_endpoint **ret);
/* Looks an endpoint up by name (also one stored by an earlier run and not opened yet).
 * -ENOENT. */
HUB_EXPORT int hub_outbox_endpoint_get(struct hub_outbox *o, const char *name, struct hub_outbox_endpoint **ret);
/* Removes an endpoint and its cursor (a route endpoint removed from the configuration), so
 * that it no longer holds messages back. Blocks. -EPERM for "events", -ENOENT. Pointers to
 * it become invalid. */
HUB_EXPORT int hub_outbox_endpoint_delete(struct hub_outbox *o, const char *name);
/* Every known endpoint (no particular order): i from 0 while it returns non-NULL. */
HUB_EXPORT struct hub_outbox_endpoint *hub_outbox_endpoint_at(struct hub_outbox *o, size_t i);
HUB_EXPORT const char *hub_outbox_endpoint_name(const struct hub_outbox_endpoint *ep);
HUB_EXPORT void hub_outbox_endpoint_get_stats(struct hub_outbox_endpoint *ep, struct hub_outbox_endpoint_stats *ret);
HUB_EXPORT void hub_outbox_get_stats(struct hub_outbox *o, struct hub_outbox_stats *ret);
/* Last sequence number stored (0 = none). A reader that wants only new messages starts there. */
HUB_EXPORT uint64_t hub_outbox_head(struct hub_outbox *o);

/* Reads up to max_count messages (1..10000) and about max_bytes (0 = no byte bound; at least
 * one message is returned whatever its size) after max(after_seq, the endpoint's cursor),
 * in order, from the store's read connection. Messages at the front of the endpoint's
 * backlog that have expired (its TTL) are first moved past and counted; the batch stops
 * before any later expired message, which is moved past once it reaches the front. An
 * undecodable stored message is skipped. *ret_entries (NULL when *ret_n is 0) must be freed
 * with hub_outbox_entries_free(). Does not block on the commit thread. -EINVAL, -ENOMEM,
 * store errors. */
HUB_EXPORT int hub_outbox_read(struct hub_outbox *o, struct hub_outbox_endpoint *ep, uint64_t after_seq,
                               size_t max_count, size_t max_bytes, struct hub_outbox_entry **ret_entries,
                               size_t *ret_n);

typedef void (*hub_outbox_done_fn)(int result, void *ud);

/* Moves the endpoint's cursor forward to seq (what the far side confirmed; with a route
 * filter, also past skipped messages). A cursor never moves back: seq at or behind it is a
 * no-op. Cursor writes are coalesced (one in flight per endpoint). Returns 1 when done will
 * run once the cursor (at least seq) is durable or the write failed; 0 when it already was
 * durable (done not called); -EINVAL (seq beyond the head, NULL), -EPERM for the events
 * endpoint (its readers do not acknowledge: it is kept for its retention time), -ENOMEM. */
HUB_EXPORT int hub_outbox_ack(struct hub_outbox *o, struct hub_outbox_endpoint *ep, uint64_t seq,
                              hub_outbox_done_fn done, void *ud);

/* Applies TTLs (events: retention) to every endpoint's front, persists moved cursors, then
 * deletes (asynchronously, at most 20,000 rows per call) the messages every endpoint's
 * durable cursor has passed. Returns 1 when a delete was queued (done then runs with the
 * number of rows deleted or an error), 0 when there was nothing to delete or a collection is
 * already running (done not called), or -errno. Call about once a second. */
HUB_EXPORT int hub_outbox_gc(struct hub_outbox *o, void (*done)(int result, uint64_t n_deleted, void *ud),
                             void *ud);

/* The event stream for back-end readers (the service API's long poll / SSE, `fieldhubctl
 * monitor-events`): up to max (1..10000) messages after after_seq (and after what retention
 * removed), in order, optionally only those of one device (device_filter, NULL = all). A
 * reader keeps after_seq = the last seq it got; hub_outbox_head() gives "from now on".
 * *ret_entries must be freed with hub_outbox_entries_free(). -EINVAL, -ENOMEM, store
 * errors. */
HUB_EXPORT int hub_events_read(struct hub_outbox *o, uint64_t after_seq, size_t max, const char *device_filter,
                               struct hub_outbox_entry **ret_entries, size_t *ret_n);
