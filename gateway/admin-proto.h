/* SPDX-License-Identifier: MIT */
#pragma once

/* The admin socket protocol, shared by fieldhubd and fieldhubctl: newline-delimited JSON
 * over a SOCK_STREAM AF_UNIX socket. A request is {"cmd":"...", "args":{...}}; the answer
 * is {"ok":true,"result":...} or {"ok":false,"error":"one line","details":[...]}.
 * A long-lived command (monitor-events) answers with one line {"ok":true,"result":...}
 * and then one line per event, {"ok":true,"event":{...}}, until either side closes.
 * A request may carry one file descriptor (SCM_RIGHTS) sent with its first byte: `backup`
 * writes the store copy into it, so the file is created by the client, with its mode.
 * Access is controlled by the socket's file mode (0660) and the peer's credentials.
 *
 * Commands: status, reload, api ({method, target, headers, body} -> {status, headers,
 * body}: the service REST API with iothubowner rights), backup (+ fd), monitor-events
 * ({device?}). */

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

/* Largest request line the daemon accepts (an `api` body is at most this, minus framing). */
#define GW_ADMIN_MAX_MSG (4u * 1024u * 1024u)
/* Largest reply line the client accepts (a JSON body inside JSON may double in size). */
#define GW_ADMIN_MAX_REPLY (32u * 1024u * 1024u)

/* Blocking client side. connect: -ENOENT/-ECONNREFUSED/-EACCES when the daemon is not
 * there or we may not talk to it. */
int gw_admin_connect(const char *path, int *ret_fd);

/* Sends request (borrowed) as one line; when pass_fd >= 0 it travels with it (SCM_RIGHTS).
 * -errno from the socket, -ENOMEM. */
int gw_admin_send(int fd, const json_t *request, int pass_fd);

/* Buffered reader of reply lines. Zero-initialise; release with gw_admin_reader_done(). */
struct gw_admin_reader {
        char *buf;
        size_t have, cap;
};
void gw_admin_reader_done(struct gw_admin_reader *r);

/* Reads the next reply line within timeout_usec (UINT64_MAX: no timeout). -ETIMEDOUT,
 * -ECONNRESET (the daemon closed the connection), -E2BIG (line over GW_ADMIN_MAX_REPLY),
 * -EBADMSG (not JSON), -errno. *ret_json is a new reference. */
int gw_admin_read(int fd, struct gw_admin_reader *r, uint64_t timeout_usec, json_t **ret_json);

/* Sends request (borrowed) and waits up to timeout for one answer line. */
int gw_admin_call(int fd, json_t *request, uint64_t timeout_usec, json_t **ret_response);

/* Encodes j as one compact line terminated by '\n'. */
int gw_admin_encode(const json_t *j, char **ret, size_t *ret_len);
