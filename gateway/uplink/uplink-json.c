/* SPDX-License-Identifier: MIT */
/* The JSON form of a routed message (uplink-json.h). */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <mbedtls/base64.h>

#include "endpoint.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/msg.h"
#include "uplink-json.h"

bool gw_uplink_is_json_message(const struct hub_msg *m) {
        const char *ct = hub_msg_get_sys(m, HUB_SYS_CONTENT_TYPE);
        const char *ce = hub_msg_get_sys(m, HUB_SYS_CONTENT_ENCODING);
        if (!ct || strncasecmp(ct, "application/json", 16) != 0 || (ct[16] && ct[16] != ';' && ct[16] != ' '))
                return false;
        return !ce || strcasecmp(ce, "utf-8") == 0;
}

static json_t *body_json(const struct hub_msg *m, const char **ret_key) {
        size_t len;
        const char *b = hub_msg_body(m, &len);
        if (gw_uplink_is_json_message(m)) {
                json_t *v = json_loadb(b, len, JSON_DECODE_ANY, NULL);
                if (v) {
                        *ret_key = "body";
                        return v;
                }
        }
        json_t *s = json_stringn(b, len); /* NULL unless valid UTF-8 */
        if (s) {
                *ret_key = "bodyText";
                return s;
        }
        size_t olen = 0;
        (void) mbedtls_base64_encode(NULL, 0, &olen, (const unsigned char *) b, len);
        char *enc = malloc(olen + 1);
        if (!enc)
                return NULL;
        if (mbedtls_base64_encode((unsigned char *) enc, olen + 1, &olen, (const unsigned char *) b, len) != 0) {
                free(enc);
                return NULL;
        }
        s = json_stringn(enc, olen);
        free(enc);
        *ret_key = "bodyBase64";
        return s;
}

json_t *gw_uplink_item_to_json(const struct gw_ep_item *it, const char *endpoint) {
        char ts[32];
        json_t *sys = json_object(), *props = json_object();
        const char *bkey = "body";
        json_t *body = body_json(it->msg, &bkey);

        for (unsigned p = 0; sys && p < _HUB_SYS_MAX; p++) {
                const char *v = hub_msg_get_sys(it->msg, p), *n = hub_sys_prop_wire_name(p);
                if (v && n)
                        json_object_set_new(sys, n, json_string(v));
        }
        for (size_t i = 0; props && i < hub_msg_n_props(it->msg); i++) {
                const struct hub_msg_prop *p = hub_msg_prop_at(it->msg, i);
                json_object_set_new(props, p->name, p->value ? json_string(p->value) : json_null());
        }
        if (!sys || !props || !body) {
                json_decref(sys);
                json_decref(props);
                json_decref(body);
                return NULL;
        }
        return json_pack("{s:s, s:I, s:s, s:s, s:s?, s:o, s:o, s:o}", "endpoint", endpoint, "sequenceNumber",
                         (json_int_t) it->seq, "enqueuedTime", hub_time_format_iso8601(it->enqueued_usec, ts),
                         "deviceId", it->device_id, "moduleId", it->module_id, "systemProperties", sys, "properties",
                         props, bkey, body);
}

int gw_uplink_item_json(const struct gw_ep_item *it, const char *endpoint, char **ret, size_t *ret_len) {
        json_t *j = gw_uplink_item_to_json(it, endpoint);
        if (!j)
                return -ENOMEM;
        size_t n = hub_json_dumpb(j, NULL, 0, JSON_COMPACT);
        char *buf = n ? malloc(n + 1) : NULL;
        if (!buf) {
                json_decref(j);
                return -ENOMEM;
        }
        hub_json_dumpb(j, buf, n, JSON_COMPACT);
        json_decref(j);
        buf[n] = 0;
        *ret = buf;
        *ret_len = n;
        return 0;
}
