/* SPDX-License-Identifier: MIT */
#pragma once

/* The admin socket protocol, shared by fieldhubd and fieldhubctl: newline-delimited JSON
 * over a SOCK_STREAM AF_UNIX socket. A request is {"cmd":"...", "args":{...}}; the answer
 * is {"ok":true,"result":...} or {"ok":false,"error":"one line","details":[...]}.
 * Access is controlled by the socket's file mode (0660) and the peer's credentials. */

#include <stdint.h>

#include <jansson.h>

#define GW_ADMIN_MAX_MSG (4u * 1024u * 1024u)

/* Blocking client side. connect: -ENOENT/-ECONNREFUSED/-EACCES when the daemon is not
 * there or we may not talk to it. */
int gw_admin_connect(const char *path, int *ret_fd);
/* Sends request (borrowed) and waits up to timeout for one answer line. */
int gw_admin_call(int fd, json_t *request, uint64_t timeout_usec, json_t **ret_response);

/* Encodes j as one compact line terminated by '\n'. */
int gw_admin_encode(const json_t *j, char **ret, size_t *ret_len);
