/* SPDX-License-Identifier: MIT */
/* Identity registry routes (reference §5.2): device CRUD with If-Match, list, bulk,
 * statistics. Registry writes block until durable (hub/registry.h), so these answer at once. */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "api/api-internal.h"
#include "hub/queue.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "log-ids.h"
#include "log.h"

static const char *const device_fields[] = {
        "deviceId", "generationId", "etag", "connectionState", "connectionStateUpdatedTime", "status",
        "statusReason", "statusUpdatedTime", "lastActivityTime", "cloudToDeviceMessageCount", "authentication",
        "capabilities", "deviceScope", "parentScopes", "modelId", NULL,
};

static const char *const bulk_fields[] = {
        "id", "importMode", "eTag", "twinETag", "status", "statusReason", "authentication", "capabilities",
        "tags", "properties", "deviceScope", "parentScopes", NULL,
};

static json_t *device_json(const struct hub_device *d, json_t **ret_headers) {
        char etag[32];
        hub_device_etag(d->etag_version, etag);
        if (ret_headers)
                *ret_headers = api_etag_header(NULL, etag);
        return hub_device_to_json(d, true);
}

/* Closes the live sessions of a device whose identity changed in a way that invalidates them. */
static void close_sessions_if_needed(struct api_req *req, const struct hub_device *old, const struct hub_device *now) {
        struct gw_hub *h = api_hub(req);
        int reason = 0;
        const char *why = NULL;

        if (!h->sessions)
                return;
        if (!now) {
                reason = -ENOENT;
                why = "device deleted";
        } else if (now->status == HUB_DEVICE_DISABLED && old->status != HUB_DEVICE_DISABLED) {
                reason = -EPERM;
                why = "device disabled";
        } else if (!streq(old->primary_key, now->primary_key) || !streq(old->secondary_key, now->secondary_key) ||
                   old->auth_type != now->auth_type || !streq(old->primary_thumbprint, now->primary_thumbprint) ||
                   !streq(old->secondary_thumbprint, now->secondary_thumbprint)) {
                reason = -EKEYREVOKED;
                why = "device credentials changed";
        }
        if (reason == 0)
                return;
        int n = hub_sessions_close_device(h->sessions, old->device_id, reason, why);
        if (n > 0)
                gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "api", .device = old->device_id, .event = "sessions-closed"),
                            "Closed %d session%s of %s: %s", n, n == 1 ? "" : "s", old->device_id, why);
}

void api_device_get(struct api_req *req) {
        struct hub_device d;
        json_t *h = NULL;
        int r = hub_registry_get(api_hub(req)->registry, req->seg[1], &d);
        if (r < 0) {
                api_reply_errno(req, r, "Get device");
                return;
        }
        json_t *j = device_json(&d, &h);
        hub_device_done(&d);
        api_reply_json(req, 200, j, h);
}

/* Shared by PUT and bulk: fills *ret from a Device-shaped object. -EINVAL with *ret_error. */
static int device_from_body(const json_t *body, const char *id, struct hub_device *ret, const char **ret_error) {
        json_t *copy = json_deep_copy(body);
        if (!copy)
                return -ENOMEM;
        json_object_set_new(copy, "deviceId", json_string(id));
        int r = hub_device_from_json(copy, ret, ret_error);
        json_decref(copy);
        if (r >= 0 && !hub_device_id_valid(ret->device_id)) {
                *ret_error = "deviceId: expected 1..128 of A-Z a-z 0-9 - : . + % _ # * ? ! ( ) , = @ ; $ '";
                return -EINVAL;
        }
        return r;
}

void api_device_put(struct api_req *req) {
        struct gw_hub *h = api_hub(req);
        const char *id = req->seg[1];
        const char *if_match = api_header(req, "If-Match");
        _cleanup_(json_decrefp) json_t *body = NULL;
        struct hub_device in, old = { 0 }, out;
        const char *err = NULL;
        json_t *hdr = NULL;
        int r;

        if (api_body_json(req, &body) < 0)
                return;
        if (!json_is_object(body)) {
                api_reply_error(req, 400, "ArgumentInvalid", "The body must be a Device JSON object");
                return;
        }
        if (api_check_fields(req, body, device_fields, "the Device") < 0)
                return;
        json_t *bid = json_object_get(body, "deviceId");
        if (bid && (!json_is_string(bid) || !streq(json_string_value(bid), id))) {
                api_reply_error(req, 400, "ArgumentInvalid", "deviceId in the body must equal the id in the path (%s)", id);
                return;
        }
        if (!hub_device_id_valid(id)) {
                api_reply_error(req, 400, "ArgumentInvalid",
                                "Invalid device id: expected 1..128 of A-Z a-z 0-9 - : . + %% _ # * ? ! ( ) , = @ ; $ '");
                return;
        }
        r = device_from_body(body, id, &in, &err);
        if (r < 0) {
                if (r == -EINVAL)
                        api_reply_error(req, 400, "ArgumentInvalid", "%s", err ? err : "invalid Device");
                else
                        api_reply_errno(req, r, "Create device");
                return;
        }

        if (!if_match) {
                const char *verr = NULL;
                if (hub_device_validate(&in, &verr) < 0) {
                        hub_device_done(&in);
                        api_reply_error(req, 400, "ArgumentInvalid", "%s", verr ? verr : "invalid Device");
                        return;
                }
                r = hub_registry_create(h->registry, &in, &out);
                hub_device_done(&in);
                if (r < 0) {
                        api_reply_errno(req, r, "Create device");
                        return;
                }
        } else {
                r = hub_registry_get(h->registry, id, &old);
                if (r < 0) {
                        hub_device_done(&in);
                        api_reply_errno(req, r, "Update device");
                        return;
                }
                const char *verr = NULL;
                if (hub_device_validate(&in, &verr) < 0) {
                        hub_device_done(&in);
                        hub_device_done(&old);
                        api_reply_error(req, 400, "ArgumentInvalid", "%s", verr ? verr : "invalid Device");
                        return;
                }
                r = hub_registry_update(h->registry, &in, if_match, &out);
                hub_device_done(&in);
                if (r < 0) {
                        hub_device_done(&old);
                        api_reply_errno(req, r, "Update device");
                        return;
                }
                close_sessions_if_needed(req, &old, &out);
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "registry", .device = id, .message_id = GW_MSG_DEVICE_UPDATED,
                                      .event = "updateDeviceIdentity", .no_ratelimit = true),
                            "Device identity %s updated", id);
                hub_device_done(&old);
        }
        json_t *j = device_json(&out, &hdr);
        hub_device_done(&out);
        api_reply_json(req, 200, j, hdr);
}

void api_device_delete(struct api_req *req) {
        struct gw_hub *h = api_hub(req);
        struct hub_device old;
        const char *id = req->seg[1];
        int r = hub_registry_get(h->registry, id, &old);
        if (r < 0) {
                api_reply_errno(req, r, "Delete device");
                return;
        }
        r = hub_registry_delete(h->registry, id, api_header(req, "If-Match"));
        if (r < 0) {
                hub_device_done(&old);
                api_reply_errno(req, r, "Delete device");
                return;
        }
        close_sessions_if_needed(req, &old, NULL);
        hub_device_done(&old);
        api_reply(req, 204, NULL, NULL, NULL, 0);
}

static int parse_uint_param(const char *s, uint64_t max, uint64_t *ret) {
        char *end;
        if (!s || !*s || *s == '-' || *s == '+')
                return -EINVAL;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (errno || *end || v > max)
                return -EINVAL;
        *ret = v;
        return 0;
}

void api_device_list(struct api_req *req) {
        uint64_t top = HUB_REGISTRY_LIST_MAX;
        struct hub_device *arr = NULL;
        size_t n = 0;
        const char *t = api_param(req, "top");

        if (t && (parse_uint_param(t, HUB_REGISTRY_LIST_MAX, &top) < 0 || top == 0)) {
                api_reply_error(req, 400, "ArgumentInvalid", "top must be an integer from 1 to %d", HUB_REGISTRY_LIST_MAX);
                return;
        }
        int r = hub_registry_list(api_hub(req)->registry, NULL, top, &arr, &n);
        if (r < 0) {
                api_reply_errno(req, r, "List devices");
                return;
        }
        json_t *a = json_array();
        for (size_t i = 0; i < n && a; i++)
                json_array_append_new(a, hub_device_to_json(&arr[i], true));
        hub_device_array_free(arr, n);
        api_reply_json(req, 200, a, NULL);
}

static const char *errno_to_code(int r) {
        switch (r) {
        case -ENOENT:
                return "DeviceNotFound";
        case -EEXIST:
                return "DeviceAlreadyExists";
        case -ESTALE:
                return "PreconditionFailed";
        case -EINVAL:
                return "ArgumentInvalid";
        default:
                return "ServerError";
        }
}

void api_device_bulk(struct api_req *req) {
        struct gw_hub *h = api_hub(req);
        _cleanup_(json_decrefp) json_t *body = NULL;

        if (api_body_json(req, &body) < 0)
                return;
        if (!json_is_array(body) || json_array_size(body) < 1 || json_array_size(body) > 100) {
                api_reply_error(req, 400, "ArgumentInvalid", "The body must be an array of 1 to 100 device entries");
                return;
        }
        /* Check every entry before applying any. */
        size_t i;
        json_t *item;
        json_array_foreach (body, i, item) {
                char what[64];
                snprintf(what, sizeof what, "entry %zu", i);
                if (!json_is_object(item)) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Entry %zu is not an object", i);
                        return;
                }
                if (api_check_fields(req, item, bulk_fields, what) < 0)
                        return;
                if (!json_is_string(json_object_get(item, "id")) ||
                    !json_is_string(json_object_get(item, "importMode"))) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Entry %zu: id and importMode must be strings", i);
                        return;
                }
        }

        json_t *errors = json_array();
        json_array_foreach (body, i, item) {
                const char *id = json_string_value(json_object_get(item, "id"));
                const char *mode = json_string_value(json_object_get(item, "importMode"));
                const char *etag = json_string_value(json_object_get(item, "eTag"));
                const char *err = NULL;
                struct hub_device in = { 0 }, old = { 0 }, out = { 0 };
                bool have_old = false;
                int r;

                json_t *dev = json_deep_copy(item);
                json_object_del(dev, "id");
                json_object_del(dev, "importMode");
                json_object_del(dev, "eTag");
                json_object_del(dev, "twinETag");
                json_object_del(dev, "tags");
                json_object_del(dev, "properties");

                bool is_delete = streq(mode, "delete") || streq(mode, "deleteIfMatchETag");
                bool if_match = streq(mode, "updateIfMatchETag") || streq(mode, "deleteIfMatchETag") ||
                                streq(mode, "createOrUpdateIfMatchETag");
                if (!streq(mode, "create") && !streq(mode, "update") && !streq(mode, "updateIfMatchETag") &&
                    !streq(mode, "createOrUpdate") && !streq(mode, "createOrUpdateIfMatchETag") && !is_delete) {
                        r = -EINVAL;
                        err = "importMode: expected create, update, updateIfMatchETag, createOrUpdate, "
                              "createOrUpdateIfMatchETag, delete or deleteIfMatchETag";
                } else if (if_match && !etag) {
                        r = -EINVAL;
                        err = "eTag is required with an IfMatchETag import mode";
                } else if (!hub_device_id_valid(id)) {
                        r = -EINVAL;
                        err = "invalid device id";
                } else {
                        have_old = hub_registry_get(h->registry, id, &old) >= 0;
                        if (is_delete) {
                                r = hub_registry_delete(h->registry, id, if_match ? etag : "*");
                                if (r >= 0 && have_old)
                                        close_sessions_if_needed(req, &old, NULL);
                        } else {
                                r = device_from_body(dev, id, &in, &err);
                                if (r >= 0 && hub_device_validate(&in, &err) < 0)
                                        r = -EINVAL;
                                if (r >= 0) {
                                        bool create = streq(mode, "create") || (!have_old && strncmp(mode, "createOrUpdate", 14) == 0);
                                        if (create)
                                                r = hub_registry_create(h->registry, &in, &out);
                                        else if (!have_old)
                                                r = -ENOENT;
                                        else {
                                                r = hub_registry_update(h->registry, &in, if_match ? etag : "*", &out);
                                                if (r >= 0)
                                                        close_sessions_if_needed(req, &old, &out);
                                        }
                                }
                        }
                }
                json_decref(dev);
                if (r < 0) {
                        json_array_append_new(errors,
                                              json_pack("{s:s, s:s, s:s, s:n, s:s}", "deviceId", id, "errorCode",
                                                        errno_to_code(r), "errorStatus",
                                                        err ? err : strerror(-r), "moduleId", "operation", mode));
                }
                hub_device_done(&in);
                hub_device_done(&out);
                if (have_old)
                        hub_device_done(&old);
        }
        bool ok = json_array_size(errors) == 0;
        json_t *res = json_pack("{s:b, s:o, s:[]}", "isSuccessful", ok, "errors", errors, "warnings");
        api_reply_json(req, ok ? 200 : 400, res,
                       ok ? NULL : json_pack("{s:s}", "iothub-errorcode", "BulkRegistryOperationFailure"));
}

void api_stats_devices(struct api_req *req) {
        uint64_t total = 0, enabled = 0, disabled = 0;
        int r = hub_registry_count(api_hub(req)->registry, &total, &enabled, &disabled);
        if (r < 0) {
                api_reply_errno(req, r, "Device statistics");
                return;
        }
        api_reply_json(req, 200,
                       json_pack("{s:I, s:I, s:I}", "totalDeviceCount", (json_int_t) total, "enabledDeviceCount",
                                 (json_int_t) enabled, "disabledDeviceCount", (json_int_t) disabled),
                       NULL);
}

void api_stats_service(struct api_req *req) {
        struct hub_sessions_stats st = { 0 };
        if (api_hub(req)->sessions)
                hub_sessions_get_stats(api_hub(req)->sessions, &st);
        api_reply_json(req, 200, json_pack("{s:I}", "connectedDeviceCount", (json_int_t) st.live), NULL);
}
