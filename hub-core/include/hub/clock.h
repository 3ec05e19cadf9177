/* SPDX-License-Identifier: MIT */
#pragma once

/* hub-core does not read the clock itself: it is handed one. Production passes
 * hub_clock_system(); unit tests pass a fake clock they move by hand. */

#include <stdint.h>

#include "hub/macro.h"

struct hub_clock {
        /* Wall-clock time, microseconds since the epoch (CLOCK_REALTIME). */
        uint64_t (*realtime_usec)(void *userdata);
        /* Monotonic time, microseconds (CLOCK_BOOTTIME). */
        uint64_t (*monotonic_usec)(void *userdata);
        void *userdata;
};

/* A clock backed by clock_gettime(). The returned struct is static. */
HUB_EXPORT const struct hub_clock *hub_clock_system(void);

/* A fake clock for tests: starts at the given times (monotonic at 1 s), moves only when
 * told. Reads and advances are atomic, so a store's commit thread may read it. */
struct hub_fake_clock {
        struct hub_clock clock;
        uint64_t realtime;
        uint64_t monotonic;
};
HUB_EXPORT void hub_fake_clock_init(struct hub_fake_clock *c, uint64_t realtime_usec);
HUB_EXPORT void hub_fake_clock_advance(struct hub_fake_clock *c, uint64_t usec);

static inline uint64_t hub_clock_now(const struct hub_clock *c) {
        return c->realtime_usec(c->userdata);
}
static inline uint64_t hub_clock_mono(const struct hub_clock *c) {
        return c->monotonic_usec(c->userdata);
}

#define USEC_PER_SEC UINT64_C(1000000)
#define USEC_PER_MSEC UINT64_C(1000)

/* Formats usec-since-epoch as ISO 8601 UTC with 7 fractional digits
 * ("2016-06-01T21:22:43.7996883Z"), or "0001-01-01T00:00:00Z" for 0. buf >= 32 bytes. */
HUB_EXPORT char *hub_time_format_iso8601(uint64_t usec, char buf[static 32]);
/* Parses ISO 8601 UTC (with or without fraction and Z). -EINVAL if malformed. */
/* Accepts "YYYY-MM-DDTHH:MM:SS", an optional fraction of any number of digits (truncated to
 * microseconds), then nothing, "Z" or a "+HH:MM"/"-HH:MM" offset (applied). The "never"
 * value "0001-01-01T00:00:00Z" parses to 0; other times before the epoch give -ERANGE. */
HUB_EXPORT int hub_time_parse_iso8601(const char *s, uint64_t *ret_usec);
