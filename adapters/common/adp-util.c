/* SPDX-License-Identifier: MIT */

#include <errno.h>
#include <stdarg.h>
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
