/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "notify.h"

void gw_notify_ready(const char *status) {
        (void) sd_notifyf(0, "READY=1\nSTATUS=%s", status ? status : "Ready");
}

void gw_notify_status(const char *fmt, ...) {
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        (void) sd_notifyf(0, "STATUS=%s", buf);
}

void gw_notify_reloading(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        /* MONOTONIC_USEC lets systemd >= 253 match the reload; older ones ignore it. */
        (void) sd_notifyf(0, "RELOADING=1\nSTATUS=Reloading configuration\nMONOTONIC_USEC=%llu",
                          (unsigned long long) ts.tv_sec * 1000000ULL + (unsigned long long) ts.tv_nsec / 1000);
}

void gw_notify_stopping(void) {
        (void) sd_notify(0, "STOPPING=1\nSTATUS=Stopping");
}

void gw_notify_watchdog(void) {
        (void) sd_notify(0, "WATCHDOG=1");
}

void gw_notify_extend_timeout(uint64_t usec) {
        (void) sd_notifyf(0, "EXTEND_TIMEOUT_USEC=%llu", (unsigned long long) usec);
}
