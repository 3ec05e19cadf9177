/* SPDX-License-Identifier: MIT */

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adp-util.h"

void adp_logf(const struct adp_host *host, int level, const char *device, const char *key, int error,
              const char *fmt, ...) {
        va_list ap;

        if (!host)
                return;
        va_start(ap, fmt);
        host->log(host->host, level, device, key, error, fmt, ap);
        va_end(ap);
}

int adp_telemetry_new(const char *body, const char *adapter, const char *adapter_type, const char *key,
                      const char *value, struct hub_msg **ret) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        int r;

        if (!body || !ret)
                return -EINVAL;
        r = hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0)
                return r;
        if ((r = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8")) < 0 ||
            (r = hub_msg_set_prop(m, "adapter", adapter)) < 0 ||
            (r = hub_msg_set_prop(m, "adapterType", adapter_type)) < 0 ||
            (r = hub_msg_set_prop(m, key, value)) < 0)
                return r;
        *ret = TAKE_PTR(m);
        return 0;
}

double adp_f32_value(float f) {
        char buf[32];
        if (!isfinite(f))
                return f;
        /* 9 significant digits always read back as the same single. */
        for (int prec = 6; prec <= 9; prec++) {
                snprintf(buf, sizeof buf, "%.*g", prec, (double) f);
                if (strtof(buf, NULL) == f)
                        return strtod(buf, NULL);
        }
        return f;
}

/* The fewest significant digits (15..17) that read back as every real in j, at most 17. */
static int real_digits(const json_t *j, int have, unsigned depth) {
        char buf[40];
        if (have >= 17 || depth > 64)
                return 17;
        switch (json_typeof(j)) {
        case JSON_REAL: {
                double d = json_real_value(j);
                for (int prec = have; prec < 17; prec++) {
                        snprintf(buf, sizeof buf, "%.*g", prec, d);
                        if (strtod(buf, NULL) == d)
                                return prec;
                }
                return 17;
        }
        case JSON_OBJECT: {
                const char *k;
                const json_t *v;
                json_object_foreach ((json_t *) j, k, v)
                        have = real_digits(v, have, depth + 1);
                return have;
        }
        case JSON_ARRAY: {
                size_t i;
                const json_t *v;
                json_array_foreach (j, i, v)
                        have = real_digits(v, have, depth + 1);
                return have;
        }
        default:
                return have;
        }
}

char *adp_json_dumps(const json_t *j, size_t flags) {
        if (!j)
                return NULL;
        int prec = real_digits(j, 15, 0);
        return json_dumps(j, (flags & ~(size_t) JSON_REAL_PRECISION(31)) | JSON_REAL_PRECISION(prec));
}
