/* SPDX-License-Identifier: MIT */
/* The system clock, the fake clock for tests, and ISO 8601 UTC timestamps (the form IoT Hub
 * uses on the wire and in twins: "2016-06-01T21:22:43.7996883Z"). */

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "hub/clock.h"

static uint64_t timespec_usec(clockid_t id) {
        struct timespec ts;

        if (clock_gettime(id, &ts) < 0)
                return 0;
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000u;
}

static uint64_t system_realtime(void *userdata) {
        (void) userdata;
        return timespec_usec(CLOCK_REALTIME);
}

static uint64_t system_monotonic(void *userdata) {
        (void) userdata;
        return timespec_usec(CLOCK_BOOTTIME);
}

const struct hub_clock *hub_clock_system(void) {
        static const struct hub_clock c = {
                .realtime_usec = system_realtime,
                .monotonic_usec = system_monotonic,
                .userdata = NULL,
        };
        return &c;
}

static uint64_t fake_realtime(void *userdata) {
        const struct hub_fake_clock *c = userdata;
        return __atomic_load_n(&c->realtime, __ATOMIC_RELAXED);
}

static uint64_t fake_monotonic(void *userdata) {
        const struct hub_fake_clock *c = userdata;
        return __atomic_load_n(&c->monotonic, __ATOMIC_RELAXED);
}

void hub_fake_clock_init(struct hub_fake_clock *c, uint64_t realtime_usec) {
        *c = (struct hub_fake_clock) {
                .clock = {
                        .realtime_usec = fake_realtime,
                        .monotonic_usec = fake_monotonic,
                        .userdata = c,
                },
                .realtime = realtime_usec,
                /* Not 0: code may use 0 as "never". */
                .monotonic = USEC_PER_SEC,
        };
}

void hub_fake_clock_advance(struct hub_fake_clock *c, uint64_t usec) {
        /* Atomic so that a store's commit thread may read the fake clock while a test moves it. */
        __atomic_add_fetch(&c->realtime, usec, __ATOMIC_RELAXED);
        __atomic_add_fetch(&c->monotonic, usec, __ATOMIC_RELAXED);
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
        y -= m <= 2;
        int64_t era = (y >= 0 ? y : y - 399) / 400;
        unsigned yoe = (unsigned) (y - era * 400);
        unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
        unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return era * 146097 + (int64_t) doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *ret_y, unsigned *ret_m, unsigned *ret_d) {
        z += 719468;
        int64_t era = (z >= 0 ? z : z - 146096) / 146097;
        unsigned doe = (unsigned) (z - era * 146097);
        unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
        int64_t y = (int64_t) yoe + era * 400;
        unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        unsigned mp = (5 * doy + 2) / 153;
        unsigned d = doy - (153 * mp + 2) / 5 + 1;
        unsigned m = mp < 10 ? mp + 3 : mp - 9;
        *ret_y = y + (m <= 2);
        *ret_m = m;
        *ret_d = d;
}

char *hub_time_format_iso8601(uint64_t usec, char buf[static 32]) {
        if (usec == 0) {
                snprintf(buf, 32, "0001-01-01T00:00:00Z");
                return buf;
        }

        /* ISO 8601 without an expanded year representation stops at 9999-12-31T23:59:59.999999. */
        if (usec > UINT64_C(253402300799999999))
                usec = UINT64_C(253402300799999999);

        uint64_t secs = usec / USEC_PER_SEC, frac = usec % USEC_PER_SEC;
        /* The date and time of day change once a second while messages are stamped many
         * thousand times a second: each thread keeps the last second's text. */
        static _Thread_local uint64_t cached_secs = UINT64_MAX;
        static _Thread_local char cached[32];
        static _Thread_local size_t cached_len;

        if (secs != cached_secs) {
                char tmp[64];
                int64_t days = (int64_t) (secs / 86400);
                unsigned sod = (unsigned) (secs % 86400);
                int64_t y;
                unsigned m, d;

                civil_from_days(days, &y, &m, &d);
                snprintf(tmp, sizeof tmp, "%04lld-%02u-%02uT%02u:%02u:%02u", (long long) y, m, d, sod / 3600,
                         (sod / 60) % 60, sod % 60);
                size_t n = strnlen(tmp, 22); /* 31 - ".1234567Z" */
                memcpy(cached, tmp, n);
                cached_len = n;
                cached_secs = secs;
        }
        /* 7 fractional digits (100 ns ticks), like .NET's "o" format IoT Hub emits. */
        size_t n = cached_len;
        memcpy(buf, cached, n);
        buf[n++] = '.';
        uint64_t ticks = frac * 10u;
        for (int i = 6; i >= 0; i--) {
                buf[n + (size_t) i] = (char) ('0' + ticks % 10);
                ticks /= 10;
        }
        n += 7;
        buf[n++] = 'Z';
        buf[n] = 0;
        return buf;
}

static bool parse_digits(const char **p, unsigned n, unsigned *ret) {
        unsigned v = 0;

        for (unsigned i = 0; i < n; i++) {
                char c = (*p)[i];
                if (c < '0' || c > '9')
                        return false;
                v = v * 10 + (unsigned) (c - '0');
        }
        *p += n;
        *ret = v;
        return true;
}

static bool is_leap(unsigned y) {
        return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

int hub_time_parse_iso8601(const char *s, uint64_t *ret_usec) {
        static const unsigned mdays[12] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
        unsigned year, mon, day, hour, min, sec, usec = 0;
        int64_t offset = 0;
        const char *p = s;

        if (!s || !ret_usec)
                return -EINVAL;

        if (!parse_digits(&p, 4, &year) || *p++ != '-' || !parse_digits(&p, 2, &mon) || *p++ != '-' ||
            !parse_digits(&p, 2, &day) || (*p != 'T' && *p != 't'))
                return -EINVAL;
        p++;
        if (!parse_digits(&p, 2, &hour) || *p++ != ':' || !parse_digits(&p, 2, &min) || *p++ != ':' ||
            !parse_digits(&p, 2, &sec))
                return -EINVAL;

        if (mon < 1 || mon > 12 || day < 1 ||
            day > mdays[mon - 1] + (mon == 2 && is_leap(year) ? 1u : 0u) || hour > 23 || min > 59 ||
            sec > 59)
                return -EINVAL;

        if (*p == '.') {
                unsigned n = 0, scale = 100000;

                p++;
                /* Any number of digits (at least one); beyond microseconds they are dropped. */
                for (; *p >= '0' && *p <= '9'; p++, n++) {
                        usec += (unsigned) (*p - '0') * scale;
                        scale /= 10;
                }
                if (n == 0)
                        return -EINVAL;
        }

        if (*p == 'Z' || *p == 'z')
                p++;
        else if (*p == '+' || *p == '-') {
                unsigned oh, om;
                int sign = *p == '-' ? -1 : 1;

                p++;
                if (!parse_digits(&p, 2, &oh) || *p++ != ':' || !parse_digits(&p, 2, &om) || oh > 23 ||
                    om > 59)
                        return -EINVAL;
                offset = sign * (int64_t) (oh * 3600 + om * 60);
        }
        if (*p != '\0')
                return -EINVAL;

        /* IoT Hub's "never" (.NET DateTime.MinValue) maps to 0. */
        if (year == 1 && mon == 1 && day == 1 && hour == 0 && min == 0 && sec == 0 && usec == 0 &&
            offset == 0) {
                *ret_usec = 0;
                return 0;
        }

        int64_t t = days_from_civil(year, mon, day) * 86400 + hour * 3600 + min * 60 + sec - offset;
        if (t < 0 || (t == 0 && usec == 0))
                return -ERANGE; /* before the epoch (0 is reserved for "never") */

        *ret_usec = (uint64_t) t * USEC_PER_SEC + usec;
        return 0;
}
