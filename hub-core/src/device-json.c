/* SPDX-License-Identifier: MIT */
/* The Device JSON of the service API (reference §5.2), both ways. Parsing follows the Node
 * service SDK's normalisation so that what the SDKs send is accepted unchanged, and reports
 * the first problem as "<json path>: <what was expected>". */

#include <errno.h>
#include <string.h>

#include <jansson.h>

#include "hub/clock.h"
#include "hub/registry.h"

static const char *const auth_type_names[] = {
        [HUB_AUTH_TYPE_SAS] = "sas",
        [HUB_AUTH_TYPE_SELF_SIGNED] = "selfSigned",
        [HUB_AUTH_TYPE_CA] = "certificateAuthority",
        [HUB_AUTH_TYPE_NONE] = "none",
};

static json_t *str_or_null(const char *s) {
        return s && *s ? json_string(s) : json_null();
}

json_t *hub_device_to_json(const struct hub_device *d, bool with_keys) {
        char etag[32], csu[32], su[32], la[32];
        json_t *j;

        if (!d || (unsigned) d->auth_type >= ELEMENTSOF(auth_type_names))
                return NULL;
        hub_device_etag(d->etag_version, etag);
        hub_time_format_iso8601(d->connection_state_updated_usec, csu);
        hub_time_format_iso8601(d->status_updated_usec, su);
        hub_time_format_iso8601(d->last_activity_usec, la);

        j = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:o, s:s, s:s, s:I,"
                      " s:{s:s, s:{s:o, s:o}, s:{s:o, s:o}}, s:{s:b}, s:n, s:[]}",
                      "deviceId", d->device_id,
                      "generationId", d->generation_id,
                      "etag", etag,
                      "connectionState", d->connection_state == HUB_CONNECTED ? "Connected" : "Disconnected",
                      "connectionStateUpdatedTime", csu,
                      "status", d->status == HUB_DEVICE_DISABLED ? "disabled" : "enabled",
                      "statusReason", d->has_status_reason ? json_string(d->status_reason) : json_null(),
                      "statusUpdatedTime", su,
                      "lastActivityTime", la,
                      "cloudToDeviceMessageCount", (json_int_t) d->c2d_count,
                      "authentication",
                      "type", auth_type_names[d->auth_type],
                      "symmetricKey",
                      "primaryKey", with_keys ? str_or_null(d->primary_key) : json_null(),
                      "secondaryKey", with_keys ? str_or_null(d->secondary_key) : json_null(),
                      "x509Thumbprint",
                      "primaryThumbprint", str_or_null(d->primary_thumbprint),
                      "secondaryThumbprint", str_or_null(d->secondary_thumbprint),
                      "capabilities", "iotEdge", d->iot_edge,
                      "deviceScope",
                      "parentScopes");
        return j;
}

static int fail(const char **ret_error, const char *msg) {
        if (ret_error)
                *ret_error = msg;
        return -EINVAL;
}

/* Copies an optional string member (absent or null -> ""). -E2BIG over size-1 bytes,
 * -EINVAL not a string. */
static int get_string(const json_t *obj, const char *key, char *buf, size_t size, bool *ret_present) {
        const json_t *v = obj ? json_object_get(obj, key) : NULL;
        size_t n;

        buf[0] = '\0';
        if (ret_present)
                *ret_present = false;
        if (!v || json_is_null(v))
                return 0;
        if (!json_is_string(v))
                return -EINVAL;
        n = json_string_length(v);
        if (n >= size)
                return -E2BIG;
        if (memchr(json_string_value(v), '\0', n))
                return -EINVAL;
        memcpy(buf, json_string_value(v), n);
        buf[n] = '\0';
        if (ret_present)
                *ret_present = true;
        return 0;
}

/* An optional object member: absent/null -> *ret NULL; other types -EINVAL. */
static int get_object(const json_t *obj, const char *key, const json_t **ret) {
        const json_t *v = obj ? json_object_get(obj, key) : NULL;

        *ret = NULL;
        if (!v || json_is_null(v))
                return 0;
        if (!json_is_object(v))
                return -EINVAL;
        *ret = v;
        return 0;
}

int hub_device_from_json(const json_t *j, struct hub_device *ret, const char **ret_error) {
        struct hub_device d = {};
        const json_t *auth, *sym, *x509, *caps, *v;
        char buf[64];
        int r;

        if (!ret)
                return -EINVAL;
        if (!json_is_object(j))
                return fail(ret_error, "device: expected a JSON object");

        v = json_object_get(j, "deviceId");
        if (!v || !json_is_string(v))
                return fail(ret_error, "deviceId: expected a string");
        r = get_string(j, "deviceId", d.device_id, sizeof d.device_id, NULL);
        if (r == -E2BIG)
                return fail(ret_error, "deviceId: longer than 128 characters");
        if (r < 0 || !hub_device_id_valid(d.device_id))
                return fail(ret_error,
                            "deviceId: expected 1..128 characters of A-Z a-z 0-9 and - : . + % _ # * ? ! ( ) , = @ ; $ '");

        r = get_string(j, "status", buf, sizeof buf, NULL);
        if (r < 0 || !(buf[0] == '\0' || streq(buf, "enabled") || streq(buf, "disabled")))
                return fail(ret_error, "status: expected \"enabled\" or \"disabled\"");
        d.status = streq(buf, "disabled") ? HUB_DEVICE_DISABLED : HUB_DEVICE_ENABLED;

        r = get_string(j, "statusReason", d.status_reason, sizeof d.status_reason, &d.has_status_reason);
        if (r == -E2BIG)
                return fail(ret_error, "statusReason: longer than 128 characters");
        if (r < 0)
                return fail(ret_error, "statusReason: expected a string or null");

        if (get_object(j, "capabilities", &caps) < 0)
                return fail(ret_error, "capabilities: expected an object or null");
        v = caps ? json_object_get(caps, "iotEdge") : NULL;
        if (v && !json_is_null(v) && !json_is_boolean(v))
                return fail(ret_error, "capabilities.iotEdge: expected true or false");
        d.iot_edge = v && json_is_true(v);

        if (get_object(j, "authentication", &auth) < 0)
                return fail(ret_error, "authentication: expected an object or null");
        if (get_object(auth, "symmetricKey", &sym) < 0)
                return fail(ret_error, "authentication.symmetricKey: expected an object or null");
        if (get_object(auth, "x509Thumbprint", &x509) < 0)
                return fail(ret_error, "authentication.x509Thumbprint: expected an object or null");

        r = get_string(sym, "primaryKey", d.primary_key, sizeof d.primary_key, NULL);
        if (r < 0) {
                hub_device_done(&d);
                return fail(ret_error, r == -E2BIG ? "authentication.symmetricKey.primaryKey: longer than 88 characters"
                                                   : "authentication.symmetricKey.primaryKey: expected a string or null");
        }
        r = get_string(sym, "secondaryKey", d.secondary_key, sizeof d.secondary_key, NULL);
        if (r < 0) {
                hub_device_done(&d);
                return fail(ret_error, r == -E2BIG ? "authentication.symmetricKey.secondaryKey: longer than 88 characters"
                                                   : "authentication.symmetricKey.secondaryKey: expected a string or null");
        }
        r = get_string(x509, "primaryThumbprint", d.primary_thumbprint, sizeof d.primary_thumbprint, NULL);
        if (r < 0) {
                hub_device_done(&d);
                return fail(ret_error, r == -E2BIG
                                               ? "authentication.x509Thumbprint.primaryThumbprint: expected 40 or 64 hex digits"
                                               : "authentication.x509Thumbprint.primaryThumbprint: expected a string or null");
        }
        r = get_string(x509, "secondaryThumbprint", d.secondary_thumbprint, sizeof d.secondary_thumbprint, NULL);
        if (r < 0) {
                hub_device_done(&d);
                return fail(ret_error, r == -E2BIG
                                               ? "authentication.x509Thumbprint.secondaryThumbprint: expected 40 or 64 hex digits"
                                               : "authentication.x509Thumbprint.secondaryThumbprint: expected a string or null");
        }

        /* Node normalisation: no authentication -> sas with empty keys (generated on create);
         * no type -> selfSigned when a thumbprint is given, else sas. */
        r = get_string(auth, "type", buf, sizeof buf, NULL);
        if (r < 0) {
                hub_device_done(&d);
                return fail(ret_error,
                            "authentication.type: expected \"sas\", \"selfSigned\", \"certificateAuthority\" or \"none\"");
        }
        if (buf[0] == '\0')
                d.auth_type = d.primary_thumbprint[0] || d.secondary_thumbprint[0] ? HUB_AUTH_TYPE_SELF_SIGNED
                                                                                     : HUB_AUTH_TYPE_SAS;
        else {
                bool found = false;
                for (size_t i = 0; i < ELEMENTSOF(auth_type_names); i++)
                        if (streq(buf, auth_type_names[i])) {
                                d.auth_type = (enum hub_auth_type) i;
                                found = true;
                        }
                if (!found) {
                        hub_device_done(&d);
                        return fail(ret_error,
                                    "authentication.type: expected \"sas\", \"selfSigned\", \"certificateAuthority\" or \"none\"");
                }
        }

        r = hub_device_validate(&d, ret_error);
        if (r < 0) {
                hub_device_done(&d);
                return r;
        }
        *ret = d;
        hub_device_done(&d);
        return 0;
}
