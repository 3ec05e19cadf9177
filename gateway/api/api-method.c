/* SPDX-License-Identifier: MIT */
/* Direct method invocation (reference §5.4): POST /twins/{id}/methods. The answer goes out
 * when the device answers, or the call times out, or the device goes away. */

#include <errno.h>
#include <string.h>

#include "api/api-internal.h"
#include "hub/json-dump.h"
#include "hub/method.h"

static const char *const method_fields[] = { "methodName", "payload", "responseTimeoutInSeconds",
                                             "connectTimeoutInSeconds", NULL };

static void method_done(int status, const char *json_payload, void *ud) {
        struct api_req *req = ud;

        if (status >= 0) {
                json_t *payload = NULL;
                if (json_payload && *json_payload) {
                        payload = json_loads(json_payload, JSON_DECODE_ANY, NULL);
                        if (!payload) /* not JSON: hand it over as a string */
                                payload = json_string(json_payload);
                }
                api_reply_json(req, 200,
                               json_pack("{s:i, s:o}", "status", status, "payload", payload ? payload : json_null()),
                               NULL);
                return;
        }
        switch (status) {
        case -ENOENT:
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", req->device_id);
                break;
        case -ENOTCONN:
                api_reply_error(req, 404, "DeviceNotOnline", "Timed out waiting for device %s to connect", req->device_id);
                break;
        case -ETIMEDOUT:
                api_reply_error(req, 504, "GatewayTimeout", "Timed out waiting for the response from device %s",
                                req->device_id);
                break;
        case -ECONNRESET:
                api_reply_error(req, 404, "DeviceConnectionClosedRemotely",
                                "Device %s disconnected during the method call", req->device_id);
                break;
        case -EAGAIN:
                api_reply_error(req, 429, "ThrottlingException", "Device %s cannot take another call now", req->device_id);
                break;
        case -E2BIG:
                api_reply_error(req, 413, "MessageTooLarge", "The response of device %s is over 128 KB", req->device_id);
                break;
        case -ESHUTDOWN:
                api_reply_error(req, 503, "ServiceUnavailable", "The hub is stopping");
                break;
        default:
                api_reply_error(req, 500, "ServerError", "Method call failed: %s", strerror(-status));
                break;
        }
}

static int get_timeout(struct api_req *req, json_t *body, const char *key, int *ret) {
        json_t *v = json_object_get(body, key);
        if (!v || json_is_null(v)) {
                *ret = HUB_METHOD_TIMEOUT_DEFAULT;
                return 0;
        }
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 100000) {
                api_reply_error(req, 400, "ArgumentInvalid", "%s must be an integer number of seconds", key);
                return -EINVAL;
        }
        *ret = (int) json_integer_value(v);
        return 0;
}

void api_method_invoke(struct api_req *req) {
        struct gw_hub *h = api_hub(req);
        _cleanup_(json_decrefp) json_t *body = NULL;
        _cleanup_free_ char *payload = NULL;
        const char *err = NULL;
        int rto, cto, r;

        if (api_body_json(req, &body) < 0)
                return;
        if (!json_is_object(body)) {
                api_reply_error(req, 400, "ArgumentInvalid", "The body must be a JSON object with methodName");
                return;
        }
        if (api_check_fields(req, body, method_fields, "the method call") < 0)
                return;
        const char *name = json_string_value(json_object_get(body, "methodName"));
        if (!name) {
                api_reply_error(req, 400, "ArgumentInvalid", "methodName is required and must be a string");
                return;
        }
        if (get_timeout(req, body, "responseTimeoutInSeconds", &rto) < 0 ||
            get_timeout(req, body, "connectTimeoutInSeconds", &cto) < 0)
                return;
        json_t *p = json_object_get(body, "payload");
        payload = hub_json_dumps(p ? p : json_null(), JSON_COMPACT | JSON_ENCODE_ANY);
        if (!payload) {
                api_reply_errno(req, -ENOMEM, "Method call");
                return;
        }
        if (!h->methods) {
                api_reply_error(req, 503, "ServiceUnavailable", "Direct methods are not available");
                return;
        }
        const char *id = req->seg[1];
        r = api_req_go_async(req, id);
        if (r < 0) {
                api_reply_errno(req, r, "Method call");
                return;
        }
        r = hub_method_invoke(h->methods, id, NULL, name, payload, rto, cto, api_mono(), method_done, req, &err);
        if (r < 0) {
                if (r == -EINVAL)
                        api_reply_error(req, 400, "ArgumentInvalid", "%s", err ? err : "invalid method call");
                else
                        method_done(r, NULL, req);
                return;
        }
        gw_hub_rearm(h);
}
