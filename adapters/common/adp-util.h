/* SPDX-License-Identifier: MIT */
#pragma once

/* Small helpers that every adapter needs on top of the adapter API (adapter/adapter.h):
 * logging through the host and building telemetry messages in the common shape. Private to
 * the adapters built into the gateway (adapters/common, static library adpcommon). */

#include "adapter/adapter.h"
#include "hub/macro.h"
#include "hub/msg.h"

/* Logs through @host's log() (see struct adp_host); does nothing when @host is NULL (the
 * adapter has not been started yet). */
void adp_logf(const struct adp_host *host, int level, const char *device, const char *key, int error,
              const char *fmt, ...) _printf_(6, 7);

/* Makes a telemetry message from the JSON text @body: content type application/json,
 * encoding utf-8, application properties adapter=@adapter, adapterType=@adapter_type and
 * @key=@value. Returns 0 and the new message in *@ret, or -errno (-E2BIG when the message would
 * be larger than a D2C message may be). */
int adp_telemetry_new(const char *body, const char *adapter, const char *adapter_type, const char *key,
                      const char *value, struct hub_msg **ret);

#include <jansson.h>

/* The value a device meant by the IEEE single @f, as a double: the shortest decimal that reads
 * back as @f (21.7f → 21.7, not 21.700000762939453). NaN and infinities are returned as they
 * are. */
double adp_f32_value(float f);

/* json_dumps() with reals as short as they can be while still reading back exactly: jansson
 * writes every real with 17 significant digits (0.1 → 0.10000000000000001); this walks @j,
 * finds the fewest digits (15, 16 or 17) that round-trip every real in it, and dumps with
 * JSON_REAL_PRECISION of that (so a message whose reals all fit in 15 digits, the common
 * case, reads 0.1 and 21.7). @flags as for json_dumps (a JSON_REAL_PRECISION in them is
 * replaced). The text is malloc'ed, NULL on failure. */
char *adp_json_dumps(const json_t *j, size_t flags);
