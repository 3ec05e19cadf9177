/* SPDX-License-Identifier: MIT */
/* An example serial plugin (adapter/serial-plugin.h, ABI 1): a "tag-value" protocol no YAML
 * declaration describes, because its frame length depends on a count of variable records.
 *
 *     0xA5  N  (tag value_hi value_lo) × N  sum
 *
 * where sum is the byte sum of everything before it, mod 256. Each record becomes the field
 * "t<tag>" (a signed 16-bit value times the scale given in plugin_args, "scale=0.1"; 1 by
 * default), plus "records" (N) and "sequence" (frames seen by this device so far, to show the
 * per-device state). The "set" command ({"tag": 3, "value": -12}) encodes one record.
 *
 * Build: cc -shared -fPIC -I adapters/include -o example.so example-plugin.c */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapter/serial-plugin.h"

#define SYNC 0xA5

struct state {
        double scale;
        unsigned long long sequence;
};

static int ex_create(const char *args, void **ret_state) {
        struct state *s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->scale = 1;
        if (args && *args) {
                char *end = NULL;
                if (strncmp(args, "scale=", 6) != 0 || (s->scale = strtod(args + 6, &end), end == args + 6 || *end)) {
                        free(s);
                        return -EINVAL;
                }
        }
        *ret_state = s;
        return 0;
}

static void ex_destroy(void *state) {
        free(state);
}

static ssize_t ex_frame(void *state, const uint8_t *buf, size_t len, size_t *ret_skip) {
        size_t skip = 0;
        while (skip < len && buf[skip] != SYNC)
                skip++;
        *ret_skip = skip;
        buf += skip;
        len -= skip;
        if (len < 2)
                return 0;
        if (buf[1] > 40) { /* not a count: a false sync byte */
                *ret_skip = skip + 1;
                return 0;
        }
        size_t total = 2 + 3u * buf[1] + 1;
        if (len < total)
                return 0;
        unsigned sum = 0;
        for (size_t i = 0; i < total - 1; i++)
                sum += buf[i];
        if ((sum & 0xff) != buf[total - 1]) {
                *ret_skip = skip + 1;
                return -EBADMSG;
        }
        return (ssize_t) total;
}

static int ex_decode(void *state, const uint8_t *f, size_t len, const struct adp_serial_sink *sink) {
        struct state *s = state;
        if (len < 3 || f[0] != SYNC || len != 2 + 3u * f[1] + 1)
                return -EBADMSG;
        s->sequence++;
        for (unsigned i = 0; i < f[1]; i++) {
                const uint8_t *r = f + 2 + 3 * i;
                char name[16];
                snprintf(name, sizeof name, "t%u", r[0]);
                int16_t v = (int16_t) ((r[1] << 8) | r[2]);
                if (s->scale == 1)
                        sink->integer(sink->ud, name, v);
                else
                        sink->number(sink->ud, name, v * s->scale);
        }
        sink->integer(sink->ud, "records", f[1]);
        sink->integer(sink->ud, "sequence", (int64_t) s->sequence);
        return 0;
}

/* Reads "key": <integer> from a flat JSON object (enough for this example). */
static int json_int(const char *json, const char *key, long *ret) {
        char pat[64];
        snprintf(pat, sizeof pat, "\"%s\"", key);
        const char *p = strstr(json, pat);
        if (!p)
                return -EINVAL;
        p += strlen(pat);
        while (*p == ' ' || *p == ':')
                p++;
        char *end;
        *ret = strtol(p, &end, 10);
        return end == p ? -EINVAL : 0;
}

static ssize_t ex_encode(void *state, const char *command, const char *json_args, uint8_t *out, size_t size) {
        long tag, value;
        if (strcmp(command, "set") != 0)
                return -EOPNOTSUPP;
        if (json_int(json_args, "tag", &tag) < 0 || json_int(json_args, "value", &value) < 0 || tag < 0 ||
            tag > 255 || value < -32768 || value > 32767)
                return -EINVAL;
        if (size < 6)
                return -ENOBUFS;
        out[0] = SYNC;
        out[1] = 1;
        out[2] = (uint8_t) tag;
        out[3] = (uint8_t) ((uint16_t) value >> 8);
        out[4] = (uint8_t) value;
        out[5] = (uint8_t) (out[0] + out[1] + out[2] + out[3] + out[4]);
        return 6;
}

static const struct adp_serial_plugin plugin = {
        .abi_version = ADP_SERIAL_PLUGIN_ABI,
        .struct_size = sizeof(struct adp_serial_plugin),
        .name = "example-tag-value",
        .create = ex_create,
        .destroy = ex_destroy,
        .frame = ex_frame,
        .decode = ex_decode,
        .encode = ex_encode,
};

__attribute__((visibility("default"))) const struct adp_serial_plugin *adp_serial_plugin_v1(void);
const struct adp_serial_plugin *adp_serial_plugin_v1(void) {
        return &plugin;
}
