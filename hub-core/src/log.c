/* SPDX-License-Identifier: MIT */
/* hub-core's only way to log: through the hook the embedding application injected. */

#include <stdarg.h>

#include "hub/log.h"

void hub_log_emit(const struct hub_log *log, int level, const char *file, int line, const char *func,
                  const char *fmt, ...) {
        va_list ap;

        if (!log || !log->fn)
                return;

        va_start(ap, fmt);
        log->fn(log->userdata, level, file, line, func, fmt, ap);
        va_end(ap);
}
