/* SPDX-License-Identifier: MIT */
#pragma once

/* sd_notify() messages to the service manager (no-ops without NOTIFY_SOCKET). */

#include <stdint.h>

#include "hub/macro.h"

void gw_notify_ready(const char *status);
void gw_notify_status(const char *fmt, ...) _printf_(1, 2);
void gw_notify_reloading(void);
void gw_notify_stopping(void);
void gw_notify_watchdog(void);
void gw_notify_extend_timeout(uint64_t usec);
