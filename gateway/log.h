/* SPDX-License-Identifier: MIT */
#pragma once

/* The one logging module of the gateway (STYLE.md §6).
 *
 * Under journald (JOURNAL_STREAM names our stderr, or the target is forced to "journal")
 * each entry is sent with sd_journal_sendv_with_location(): MESSAGE, PRIORITY, CODE_*,
 * ERRNO, SYSLOG_IDENTIFIER=fieldhubd, MESSAGE_ID for operator events, and the FIELDHUB_*
 * fields. Elsewhere, readable lines go to stderr with a "<prio>" prefix.
 *
 * Repeated messages are rate-limited per key (call site + device unless a key is given);
 * when a window closes with suppressed messages, one line says how many were dropped.
 *
 * Secrets: registered secret strings, SAS signatures (sig=...), SharedAccessKey=...
 * values and JSON key fields are masked before a line leaves the process. */

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <syslog.h>

#include "hub/log.h"
#include "hub/macro.h"

enum gw_log_target_kind { GW_LOG_TO_AUTO, GW_LOG_TO_JOURNAL, GW_LOG_TO_STDERR };

/* Optional structured fields of one entry. */
struct gw_log_fields {
        const char *component;  /* FIELDHUB_COMPONENT */
        const char *device;     /* FIELDHUB_DEVICE */
        const char *adapter;    /* FIELDHUB_ADAPTER */
        const char *route;      /* FIELDHUB_ROUTE */
        const char *endpoint;   /* FIELDHUB_ENDPOINT */
        const char *event;      /* FIELDHUB_EVENT (short word, e.g. "reload-failed") */
        const char *message_id; /* MESSAGE_ID, from log-ids.h */
        long long queue_depth;  /* FIELDHUB_QUEUE_DEPTH when > 0... use has_queue_depth */
        bool has_queue_depth;
        const char *ratelimit_key; /* overrides the default key (file:line + device) */
        bool no_ratelimit;      /* operator events that must never be dropped */
};

void gw_log_setup(enum gw_log_target_kind target, int max_level);
void gw_log_set_max_level(int level);
int gw_log_get_max_level(void);
void gw_log_set_rate_limit(uint64_t interval_usec, unsigned burst);
bool gw_log_to_journal(void);

/* Secrets to mask wherever they appear. The strings are copied. */
int gw_log_add_secret(const char *secret);
void gw_log_clear_secrets(void);

/* Logs and returns -abs(error) (or 0 if error is 0). %m expands to strerror(error). */
int gw_log_internal(int level, int error, const char *file, int line, const char *func,
                    const struct gw_log_fields *f, const char *fmt, ...) _printf_(7, 8);
int gw_log_internalv(int level, int error, const char *file, int line, const char *func,
                     const struct gw_log_fields *f, const char *fmt, va_list ap) _printf_(7, 0);

/* Masks secrets in s in place (exposed for tests). */
void gw_log_scrub(char *s);

/* A hub_log that forwards hub-core's debug messages here. */
extern const struct hub_log gw_hub_log;

/* Flushes the "N messages suppressed" notes of closed windows (called from a timer). */
void gw_log_flush_suppressed(void);

/* The optional fields of one entry, as a compound literal: GW_FIELDS(.device = id, ...). */
#define GW_FIELDS(...) (&(const struct gw_log_fields){ __VA_ARGS__ })

#define gw_log_full(level, error, fields, ...) \
        gw_log_internal((level), (error), __FILE__, __LINE__, __func__, (fields), __VA_ARGS__)
#define gw_log(level, ...) gw_log_full((level), 0, NULL, __VA_ARGS__)
#define gw_log_errno(level, error, ...) gw_log_full((level), (error), NULL, __VA_ARGS__)
#define gw_log_debug(...) gw_log(LOG_DEBUG, __VA_ARGS__)
#define gw_log_info(...) gw_log(LOG_INFO, __VA_ARGS__)
#define gw_log_notice(...) gw_log(LOG_NOTICE, __VA_ARGS__)
#define gw_log_warning(...) gw_log(LOG_WARNING, __VA_ARGS__)
#define gw_log_error(...) gw_log(LOG_ERR, __VA_ARGS__)
/* An operator event: MESSAGE_ID and FIELDHUB_EVENT, never rate-limited. */
#define gw_log_event(level, error, msgid, ev, ...)                                      \
        gw_log_full((level), (error),                                                   \
                    GW_FIELDS(.message_id = (msgid), .event = (ev), \
                                                   .no_ratelimit = true),              \
                    __VA_ARGS__)
