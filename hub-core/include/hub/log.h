/* SPDX-License-Identifier: MIT */
#pragma once

/* hub-core never writes logs itself: the embedding application hands it a log hook.
 * hub-core uses it for debug-level detail only; errors are returned, and the caller
 * decides whether and how to log them (STYLE.md §6). */

#include <stdarg.h>
#include <syslog.h>

#include "hub/macro.h"

struct hub_log {
        /* level is a syslog priority (LOG_ERR .. LOG_DEBUG). May be called from any thread
         * hub-core runs code on (the store's commit thread included). */
        void (*fn)(void *userdata, int level, const char *file, int line, const char *func,
                   const char *fmt, va_list ap);
        void *userdata;
};

/* Calls log->fn; does nothing when log or log->fn is NULL. */
HUB_EXPORT void hub_log_emit(const struct hub_log *log, int level, const char *file, int line, const char *func,
                  const char *fmt, ...) _printf_(6, 7);

#define hub_log_debug(log, ...) hub_log_emit((log), LOG_DEBUG, __FILE__, __LINE__, __func__, __VA_ARGS__)
