/* SPDX-License-Identifier: MIT */
#pragma once

/* Direct method calls (reference §5.4, §2.10): the service side invokes a method on a device
 * (or module); the call goes out through the device's session (hub/session.h) once it is
 * connected and subscribed to methods, and completes with the device's answer, or with a
 * timeout, or when the device goes away.
 *
 * No timers: every entry point that needs the time takes `now`, the monotonic clock
 * (CLOCK_BOOTTIME, usec); the caller arms a timer for hub_method_next_deadline() and calls
 * hub_method_tick() when it fires. A call that waits for its device to connect is sent from
 * the session observer, stamped with the clock given at creation. Runs on the owner's thread.
 *
 * Errors and the reference's codes (mapping done by the service API):
 *   -EINVAL      400004 ArgumentInvalid     bad method name, timeout out of range, payload not
 *                                           JSON or over 128 KB
 *   -ENOENT      404001 DeviceNotFound      unknown device
 *   -ENOTCONN    404103 DeviceNotOnline     not connected / not subscribed within the connect timeout
 *   -ETIMEDOUT   504101 GatewayTimeout      no answer within the response timeout
 *   -ECONNRESET  404104 DeviceConnectionClosedRemotely  the device went away during the call
 *   -EAGAIN      429001 ThrottlingException the session cannot take the request now
 *   -ESHUTDOWN   503001 ServiceUnavailable  the hub is stopping */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/macro.h"

struct hub_sessions;
struct hub_session;
struct hub_registry;
struct hub_methods;

#define HUB_METHOD_PAYLOAD_MAX (128u * 1024u)
#define HUB_METHOD_NAME_MAX 128u /* local choice; the reference gives only the character rule */
#define HUB_METHOD_RESPONSE_TIMEOUT_DEFAULT 30
#define HUB_METHOD_RESPONSE_TIMEOUT_MIN 5
#define HUB_METHOD_RESPONSE_TIMEOUT_MAX 300
#define HUB_METHOD_CONNECT_TIMEOUT_DEFAULT 0
#define HUB_METHOD_CONNECT_TIMEOUT_MAX 300
/* Pass as a timeout to get its default. */
#define HUB_METHOD_TIMEOUT_DEFAULT (-1)
#define HUB_METHOD_REQUEST_ID_MAX 64u

/* Completion of a call. status >= 0: the device's status; json_payload is the device's
 * response body (NULL when it sent none), borrowed for the call. status < 0: an error above,
 * json_payload NULL. */
typedef void (*hub_method_done_fn)(int status, const char *json_payload, void *ud);

/* Method name rule of reference §5.4: 1..HUB_METHOD_NAME_MAX printable US-ASCII characters
 * except $ ( ) < > @ , ; : \ " / [ ] ? = { } SP HT. */
HUB_EXPORT bool hub_method_name_valid(const char *name);

/* Creates the method-call table on a session table (it observes sessions: borrowed, must
 * outlive it). registry (borrowed, may be NULL) answers "does the device exist". clock: for
 * calls sent when their device connects. -EINVAL, -ENOMEM. */
HUB_EXPORT int hub_methods_new(struct hub_sessions *hs, struct hub_registry *registry, const struct hub_clock *clock,
                               const struct hub_log *log, struct hub_methods **ret);
/* Completes every pending call with -ESHUTDOWN and frees. Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_methods *hub_methods_free(struct hub_methods *m);
DEFINE_CLEANUP_FUNC(struct hub_methods *, hub_methods_free);

/* Invokes method `name` on device_id (module_id NULL for the device itself) with
 * json_payload (any JSON value as text; NULL = "null"), response_timeout seconds (5..300)
 * and connect_timeout seconds (0..300), or HUB_METHOD_TIMEOUT_DEFAULT for either.
 * Returns 0 when the call is under way: done will run exactly once, never from inside this
 * function. Otherwise done is not called and the error is returned: -EINVAL (with
 * *ret_error, may be NULL, a static description), -ENOENT, -ENOTCONN (not online and
 * connect_timeout 0), -EAGAIN, -ENOMEM. */
HUB_EXPORT int hub_method_invoke(struct hub_methods *m, const char *device_id, const char *module_id,
                                 const char *name, const char *json_payload, int response_timeout,
                                 int connect_timeout, uint64_t now, hub_method_done_fn done, void *ud,
                                 const char **ret_error);

/* The device s answered request_id with status (>= 0; -EINVAL otherwise) and json_payload
 * (may be NULL or empty: no body). Completes the call. -ENOENT: no such call pending on this session (late, duplicate or forged:
 * ignore it); -E2BIG: payload over HUB_METHOD_PAYLOAD_MAX (the call fails with -E2BIG). */
HUB_EXPORT int hub_method_response(struct hub_methods *m, struct hub_session *s, const char *request_id, int status,
                                   const char *json_payload);

/* The earliest deadline of a pending call (monotonic usec), UINT64_MAX when none. */
HUB_EXPORT uint64_t hub_method_next_deadline(struct hub_methods *m);
/* Fails the calls whose deadline passed: waiting for a connection -> -ENOTCONN, waiting for
 * an answer -> -ETIMEDOUT. Returns how many completed. */
HUB_EXPORT int hub_method_tick(struct hub_methods *m, uint64_t now);
/* Calls pending (waiting to be sent or for an answer). */
HUB_EXPORT size_t hub_method_pending(struct hub_methods *m);
