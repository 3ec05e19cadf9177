/* SPDX-License-Identifier: MIT */
/* Modbus TCP: one libmodbus context per host and port (devices with several unit ids behind
 * one gateway share it). Connecting blocks: it runs on the line's worker thread. */

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "modbus-internal.h"
#include <modbus/modbus.h>

int adp_modbus_tcp_open(const struct adp_modbus_line_conf *lc, modbus_t **ret, char *why, size_t why_size) {
        char port[8];
        snprintf(port, sizeof port, "%u", lc->port);
        /* modbus_new_tcp_pi resolves host names as well as IPv4/IPv6 literals. */
        modbus_t *ctx = modbus_new_tcp_pi(lc->host, port);
        if (!ctx) {
                int r = -errno;
                snprintf(why, why_size, "cannot create a Modbus TCP context for %s:%u: %s", lc->host, lc->port,
                         strerror(errno));
                return r;
        }
        (void) modbus_set_response_timeout(ctx, (uint32_t) (lc->timeout_usec / 1000000),
                                           (uint32_t) (lc->timeout_usec % 1000000));
        if (modbus_connect(ctx) < 0) {
                int r = -errno;
                snprintf(why, why_size, "cannot connect to %s:%u: %s", lc->host, lc->port, modbus_strerror(errno));
                modbus_free(ctx);
                return r;
        }
        *ret = ctx;
        return 0;
}
