/* SPDX-License-Identifier: MIT */
/* Durations and sizes as written in the configuration and on fieldhubctl's command line,
 * their formatting for messages, and the edit distance behind "did you mean". */

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "adapter/conf.h"

#define USEC_PER_MSEC UINT64_C(1000)
#define USEC_PER_SEC UINT64_C(1000000)
#define USEC_PER_MIN (60 * USEC_PER_SEC)
#define USEC_PER_HOUR (60 * USEC_PER_MIN)
#define USEC_PER_DAY (24 * USEC_PER_HOUR)

struct unit {
        const char *name;
        uint64_t factor;
};

static const struct unit duration_units[] = {
        { "us", 1 },
        { "ms", USEC_PER_MSEC },
        { "s", USEC_PER_SEC },
        { "min", USEC_PER_MIN },
        { "m", USEC_PER_MIN },
        { "h", USEC_PER_HOUR },
        { "d", USEC_PER_DAY },
};

static const struct unit size_units[] = {
        { "B", 1 },
        { "kB", UINT64_C(1000) },
        { "KiB", UINT64_C(1024) },
        { "MB", UINT64_C(1000000) },
        { "MiB", UINT64_C(1024) * 1024 },
        { "GB", UINT64_C(1000000000) },
        { "GiB", UINT64_C(1024) * 1024 * 1024 },
        { "TB", UINT64_C(1000000000000) },
        { "TiB", UINT64_C(1024) * 1024 * 1024 * 1024 },
};

/* Reads decimal digits at *p. Returns 0, -EINVAL when there are none, -ERANGE. */
static int read_digits(const char **p, uint64_t *ret) {
        const char *s = *p;
        uint64_t v = 0;

        if (!isdigit((unsigned char) *s))
                return -EINVAL;
        for (; isdigit((unsigned char) *s); s++) {
                unsigned d = (unsigned) (*s - '0');
                if (v > (UINT64_MAX - d) / 10)
                        return -ERANGE;
                v = v * 10 + d;
        }
        *p = s;
        *ret = v;
        return 0;
}

/* Reads the run of letters at *p and looks it up. */
static const struct unit *read_unit(const char **p, const struct unit *units, size_t n) {
        const char *s = *p;
        size_t l = 0;

        while (isalpha((unsigned char) s[l]))
                l++;
        if (l == 0)
                return NULL;
        for (size_t i = 0; i < n; i++)
                if (strlen(units[i].name) == l && strncmp(s, units[i].name, l) == 0) {
                        *p = s + l;
                        return &units[i];
                }
        return NULL;
}

int adp_parse_duration(const char *s, uint64_t *ret_usec) {
        uint64_t total = 0;
        bool any = false;

        if (!s || !ret_usec)
                return -EINVAL;
        while (*s == ' ')
                s++;
        if (!*s)
                return -EINVAL;
        while (*s) {
                uint64_t v;
                int r = read_digits(&s, &v);
                if (r < 0)
                        return r;
                while (*s == ' ')
                        s++;
                if (!*s && !any)
                        return -EDOM; /* "5": a number without a unit */
                const struct unit *u = read_unit(&s, duration_units, ELEMENTSOF(duration_units));
                if (!u)
                        return -EINVAL;
                if (v > UINT64_MAX / u->factor || total > UINT64_MAX - v * u->factor)
                        return -ERANGE;
                total += v * u->factor;
                any = true;
                while (*s == ' ')
                        s++;
        }
        *ret_usec = total;
        return 0;
}

int adp_parse_size(const char *s, uint64_t *ret_bytes) {
        uint64_t v;
        int r;

        if (!s || !ret_bytes)
                return -EINVAL;
        r = read_digits(&s, &v);
        if (r < 0)
                return r;
        while (*s == ' ')
                s++;
        if (*s) {
                const struct unit *u = read_unit(&s, size_units, ELEMENTSOF(size_units));
                if (!u || *s)
                        return -EINVAL;
                if (v > UINT64_MAX / u->factor)
                        return -ERANGE;
                v *= u->factor;
        }
        *ret_bytes = v;
        return 0;
}

const char *adp_format_duration(uint64_t usec, char *buf, size_t size) {
        static const struct unit order[] = {
                { "d", USEC_PER_DAY }, { "h", USEC_PER_HOUR }, { "min", USEC_PER_MIN },
                { "s", USEC_PER_SEC }, { "ms", USEC_PER_MSEC }, { "us", 1 },
        };
        size_t o = 0;

        if (!buf || size == 0)
                return "";
        buf[0] = 0;
        if (usec == 0) {
                snprintf(buf, size, "0s");
                return buf;
        }
        for (size_t i = 0; i < ELEMENTSOF(order) && usec > 0; i++) {
                uint64_t k = usec / order[i].factor;
                if (k == 0)
                        continue;
                usec -= k * order[i].factor;
                int w = snprintf(buf + o, size - o, "%" PRIu64 "%s", k, order[i].name);
                if (w < 0 || (size_t) w >= size - o)
                        break;
                o += (size_t) w;
        }
        return buf;
}

const char *adp_format_size(uint64_t bytes, char *buf, size_t size) {
        if (!buf || size == 0)
                return "";
        /* The largest unit that divides exactly, so the text reads back to the same value. */
        for (size_t i = ELEMENTSOF(size_units); i-- > 1;) {
                if (bytes != 0 && bytes % size_units[i].factor == 0) {
                        snprintf(buf, size, "%" PRIu64 "%s", bytes / size_units[i].factor, size_units[i].name);
                        return buf;
                }
        }
        snprintf(buf, size, "%" PRIu64 "B", bytes);
        return buf;
}

unsigned adp_edit_distance(const char *a, const char *b) {
        /* Two-row Levenshtein on at most 64 characters each (longer names are never close). */
        size_t la = strlen(a), lb = strlen(b);
        unsigned prev[65], cur[65];

        if (la > 64 || lb > 64)
                return 255;
        for (size_t j = 0; j <= lb; j++)
                prev[j] = (unsigned) j;
        for (size_t i = 1; i <= la; i++) {
                cur[0] = (unsigned) i;
                for (size_t j = 1; j <= lb; j++) {
                        unsigned cost = tolower((unsigned char) a[i - 1]) == tolower((unsigned char) b[j - 1]) ? 0 : 1;
                        unsigned v = prev[j] + 1;
                        if (cur[j - 1] + 1 < v)
                                v = cur[j - 1] + 1;
                        if (prev[j - 1] + cost < v)
                                v = prev[j - 1] + cost;
                        cur[j] = v;
                }
                memcpy(prev, cur, sizeof(unsigned) * (lb + 1));
        }
        return prev[lb] > 255 ? 255 : prev[lb];
}
