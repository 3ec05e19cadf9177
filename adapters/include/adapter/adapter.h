/* SPDX-License-Identifier: MIT */
#pragma once

/* The adapter contract: how a field-protocol adapter (Modbus, CoAP client mode, serial) plugs
 * into the gateway. Modelled on PipeWire's spa/support/plugin.h: one versioned ops table, state
 * allocated by the caller (priv_size bytes, zeroed), services injected by the host, -errno
 * returns. Adapters include this header, adapter/conf.h and hub-core's public value and
 * message types only; never a gateway header.
 *
 * Lifecycle (every call on the host's loop thread, in this order):
 *
 *     init ─► start ─► (submit | reconfigure)* ─► stop ─► fini
 *       │                                          ▲
 *       └── (--check-config: init then fini) ──────┘ (fini alone after a failed init or start)
 *
 *   init       validates the adapter's config item (the whole `adapters[i]` mapping, `type`
 *              and `name` included) and builds the adapter's state. Every problem is added to
 *              e with its file:line:col (adp_conf_error()); returns -EINVAL when any was
 *              found. Opens nothing: no fds, threads or timers. May be called to validate only.
 *   start      opens fds, starts worker threads, declares its devices to the host
 *              (host->device_add) and arms its timers. A device that cannot be reached is
 *              not a start failure: it reports itself offline and retries. Returns -errno only
 *              when the adapter as a whole cannot run (out of memory, a thread that cannot
 *              start).
 *   submit     hands the adapter a command for one of its devices (a desired-property patch,
 *              a direct method call, a cloud-to-device message). Must not block. The adapter
 *              answers each accepted command exactly once with host->command_result(), now or
 *              later (from a worker through host->post()). Returns 0 when accepted, -errno
 *              (-ENOENT unknown device, -EOPNOTSUPP, -ENOBUFS queue full) when refused: the
 *              host then answers the command itself and command_result must not be called.
 *   reconfigure (optional, NULL when unsupported: the host then stops and restarts the
 *              adapter) applies a new config item to a running adapter on SIGHUP: devices
 *              whose configuration did not change keep polling undisturbed (no missed cycle);
 *              changed devices are restarted, removed ones are device_remove()d, new ones
 *              device_add()ed. Validation errors go to e exactly as in init, and then nothing
 *              changes (-EINVAL). Called only between start and stop.
 *   stop       stops every thread (joined), timer and fd watch, and answers every command
 *              still pending (503). Must not block for longer than one transaction timeout per
 *              worker. What the threads post()ed before they were joined still runs after stop
 *              returns (its telemetry is stored); then the host removes the adapter's devices.
 *   fini       frees what init built. Also called after a failed init or start.
 *
 * Threads: host ops are called on the loop thread only, except post() and backlog(), which
 * may be called from any thread, and log(), which is thread-safe. An adapter whose library blocks (libmodbus) runs it on its own threads and
 * hands results over through post().
 *
 * Devices: every adapter device is a hub device identity (created by the host on first
 * device_add, kept across restarts) with a twin; its telemetry goes to the hub's outbox (and
 * through routes) via emit(); the adapter's view (connection state, last poll, errors, point
 * values) goes to reported properties via report(). The host turns desired-property changes,
 * direct-method calls and C2D messages for the device into submit() calls. */

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "adapter/conf.h"
#include "hub/macro.h"

struct hub_msg;

#define ADP_OPS_VERSION 1u
#define ADP_HOST_VERSION 1u

/* ---- what the adapter receives ---------------------------------------------------------- */

enum adp_command_kind {
        ADP_CMD_DESIRED,        /* payload: the desired-properties patch (JSON object, "$version" included) */
        ADP_CMD_METHOD,         /* name: the method; payload: its JSON request body ("null" when none) */
        ADP_CMD_C2D,            /* payload: the message body (not necessarily JSON); msg: the message */
        _ADP_CMD_KIND_MAX,
};

/* A command for one device. Everything is borrowed for the duration of submit(): copy what
 * is needed later. id identifies the command in command_result(). */
struct adp_command {
        uint64_t id;
        enum adp_command_kind kind;
        const char *device_id;
        const char *name;       /* method name; NULL otherwise */
        const char *payload;    /* NUL-terminated */
        size_t payload_len;
        int64_t version;        /* desired $version (ADP_CMD_DESIRED), else 0 */
        const struct hub_msg *msg; /* ADP_CMD_C2D only */
};

/* ---- what the host provides -------------------------------------------------------------- */

struct adp_watch;
struct adp_timer;

/* fd callback: revents are EPOLL* bits. Return value ignored; call watch_free to stop. */
typedef void (*adp_fd_fn)(void *ud, int fd, uint32_t revents);
/* Timer callback, usec = CLOCK_MONOTONIC time it was due. The timer is one-shot: re-arm it
 * with timer_set from inside the callback to repeat. */
typedef void (*adp_timer_fn)(void *ud, uint64_t usec);
/* A function post() runs on the loop thread. */
typedef void (*adp_post_fn)(void *ud);

/* Connection state of a device as the adapter sees it. */
enum adp_device_state {
        ADP_DEVICE_CONNECTING,
        ADP_DEVICE_ONLINE,
        ADP_DEVICE_OFFLINE,     /* unreachable, backing off */
        ADP_DEVICE_ERROR,       /* misconfigured or refused (RS-485 unsupported, port taken, ...) */
        _ADP_DEVICE_STATE_MAX,
};

/* The host interface, passed to start() and valid until fini(). Members are never NULL.
 * `host` is the first argument of every op. */
struct adp_host {
        unsigned version;       /* ADP_HOST_VERSION */
        void *host;

        /* Logging (debug/info/notice/warning/err, syslog levels). The host adds the adapter
         * name (FIELDHUB_ADAPTER) and the device (FIELDHUB_DEVICE, may be NULL), rate-limits
         * per key (NULL key: the format string + device), and expands %m from error. Loop
         * thread or worker thread (logging is thread-safe). */
        void (*log)(void *host, int level, const char *device, const char *key, int error, const char *fmt,
                    va_list ap) _printf_(6, 0);

        /* fd watches. events/revents: EPOLLIN / EPOLLOUT / EPOLLERR / EPOLLHUP. */
        int (*watch_add)(void *host, int fd, uint32_t events, adp_fd_fn cb, void *ud, struct adp_watch **ret);
        int (*watch_set_events)(void *host, struct adp_watch *w, uint32_t events);
        void (*watch_free)(void *host, struct adp_watch *w); /* NULL-safe */

        /* One-shot timers on CLOCK_MONOTONIC. usec 0 = disarmed. */
        int (*timer_add)(void *host, uint64_t usec, adp_timer_fn cb, void *ud, struct adp_timer **ret);
        int (*timer_set)(void *host, struct adp_timer *t, uint64_t usec);
        void (*timer_free)(void *host, struct adp_timer *t); /* NULL-safe */
        uint64_t (*now)(void *host);    /* CLOCK_MONOTONIC, usec */

        /* The one thread-safe op: queues fn(ud) to run on the loop thread, in order of
         * posting. Returns 0, -ENOMEM, or -ESHUTDOWN once the adapter is being stopped (fn
         * will not run: the caller still owns ud). Never blocks. */
        int (*post)(void *host, adp_post_fn fn, void *ud);

        /* Declares a device: creates its hub identity on first use, registers its device
         * session, and reports it ADP_DEVICE_CONNECTING. -EINVAL invalid id, -EEXIST the id is
         * used by another adapter or device, store errors. */
        int (*device_add)(void *host, const char *device_id);
        /* The device is gone (removed on reload, or stop). Its session ends; its identity and
         * twin are kept. Unknown ids are ignored. */
        void (*device_remove)(void *host, const char *device_id);
        /* Connection state with a short reason (NULL when online), shown in the twin and
         * logged on change. */
        void (*device_state)(void *host, const char *device_id, enum adp_device_state state, const char *why);

        /* Telemetry: borrows m (body + application properties; the adapter sets content-type
         * and encoding). The host stamps the device identity and appends it to the outbox.
         * -ENOENT unknown device, -E2BIG, -ENOBUFS when the outbox refuses. */
        int (*emit)(void *host, const char *device_id, struct hub_msg *m);
        /* Thread-safe: telemetry messages this adapter gave to emit() that are not durable
         * yet. An adapter that samples (polls) holds its polling while this is high, so that
         * it never produces faster than the gateway stores. */
        unsigned long (*backlog)(void *host);
        /* A reported-properties patch (a JSON object as text). The host may coalesce
         * successive patches of one device. -ENOENT, -EINVAL not a JSON object. */
        int (*report)(void *host, const char *device_id, const char *json_patch);
        /* The answer to an accepted command: status is an HTTP-like code (200 ok, 400 bad
         * request, 404 unknown point, 504 device timeout, 502 device error); json_payload is
         * the method's response body (NULL: none). For C2D a status < 300 completes the
         * message, otherwise it is rejected. For desired patches the status is only logged. */
        void (*command_result)(void *host, uint64_t command_id, int status, const char *json_payload);

        /* Claims a serial port for this adapter across every adapter in the process:
         * -EBUSY (with *ret_owner naming the adapter that holds it, borrowed) when it is
         * taken. path is canonicalised by the host (realpath). */
        int (*port_claim)(void *host, const char *path, const char **ret_owner);
        void (*port_release)(void *host, const char *path);
};

/* ---- what the adapter provides ----------------------------------------------------------- */

struct adp_init_info {
        const char *name;                       /* the adapter's `name` */
        const struct adp_conf_node *item;       /* its config item, borrowed for the duration of
                                                 * the call only: copy what is needed later */
};

struct adp_ops {
        unsigned version;       /* ADP_OPS_VERSION */
        const char *type;       /* the `type:` value, e.g. "modbus" */
        size_t priv_size;       /* bytes the host allocates (zeroed) and passes as priv */

        int (*init)(void *priv, const struct adp_init_info *info, struct adp_conf_errors *e);
        int (*start)(void *priv, const struct adp_host *host);
        int (*submit)(void *priv, const struct adp_command *cmd);
        int (*reconfigure)(void *priv, const struct adp_init_info *info, struct adp_conf_errors *e);
        /* Optional: the adapter's metrics as a JSON object (text, malloc'd) for status. */
        char *(*stats)(void *priv);
        void (*stop)(void *priv);
        void (*fini)(void *priv);
};

/* Logging helpers for adapters. */
static inline _printf_(6, 7) void adp_log(const struct adp_host *h, int level, const char *device, const char *key,
                                          int error, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        h->log(h->host, level, device, key, error, fmt, ap);
        va_end(ap);
}

/* Validates an item with ops->init + ops->fini, without starting anything. */
static inline int adp_validate(const struct adp_ops *ops, const struct adp_conf_node *item, struct adp_conf_errors *e) {
        void *priv = calloc(1, ops->priv_size ? ops->priv_size : 1);
        if (!priv)
                return -ENOMEM;
        const char *name = adp_conf_scalar(adp_conf_get(item, "name"));
        struct adp_init_info info = { .name = name ? name : "?", .item = item };
        int r = ops->init(priv, &info, e);
        ops->fini(priv);
        free(priv);
        return r;
}
