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
