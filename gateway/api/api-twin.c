/* SPDX-License-Identifier: MIT */
/* Twin routes (reference §5.3): GET, PATCH (merge) and PUT (replace) on /twins/{id}. Writes
 * are asynchronous: the answer goes out from the twin module's completion, once durable. */

#include <errno.h>
#include <string.h>

#include "api/api-internal.h"
#include "hub/registry.h"
#include "hub/twin.h"

static json_t *twin_etag_header(const json_t *twin) {
        const char *etag = json_string_value(json_object_get(twin, "etag"));
        return etag ? api_etag_header(NULL, etag) : NULL;
}

void api_twin_get(struct api_req *req) {
        json_t *twin = NULL;
        int r = hub_twin_get(api_hub(req)->twins, req->seg[1], &twin);
        if (r < 0) {
                api_reply_errno(req, r, "Get twin");
                return;
        }
        api_reply_json(req, 200, twin, twin_etag_header(twin));
}

static void twin_done(int result, json_t *twin, const char *error, void *ud) {
        struct api_req *req = ud;
        if (result >= 0) {
                json_incref(twin);
                api_reply_json(req, 200, twin, twin_etag_header(twin));
                return;
        }
        switch (result) {
        case -ENOENT:
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", req->device_id);
                break;
        case -ESTALE:
                api_reply_error(req, 412, "PreconditionFailed", "The twin etag in If-Match does not match");
                break;
        case -EINVAL:
        case -E2BIG:
                api_reply_error(req, 400, "ArgumentInvalid", "%s", error ? error : "invalid twin patch");
                break;
        default:
                api_reply_error(req, 500, "ServerError", "Twin update failed: %s", error ? error : strerror(-result));
                break;
        }
}

static void twin_write(struct api_req *req, bool replace) {
        _cleanup_(json_decrefp) json_t *body = NULL;
        const char *id = req->seg[1];

        if (api_body_json(req, &body) < 0)
                return;
        if (!json_is_object(body)) {
                api_reply_error(req, 400, "ArgumentInvalid", "The body must be a twin JSON object");
                return;
        }
        json_t *props = json_object_get(body, "properties");
        if (json_is_object(props) && json_object_get(props, "reported")) {
                api_reply_error(req, 400, "ArgumentInvalid",
                                "properties.reported cannot be written by the service: only the device reports");
                return;
        }
        json_t *bid = json_object_get(body, "deviceId");
        if (bid && (!json_is_string(bid) || !streq(json_string_value(bid), id))) {
                api_reply_error(req, 400, "ArgumentInvalid", "deviceId in the body must equal the id in the path (%s)", id);
                return;
        }
        /* Copy If-Match before the request's buffers go away. */
        _cleanup_free_ char *if_match = NULL;
        const char *im = api_header(req, "If-Match");
        if (im && !(if_match = strdup(im))) {
                api_reply_errno(req, -ENOMEM, "Twin update");
                return;
        }
        int r = api_req_go_async(req, id);
        if (r < 0) {
                api_reply_errno(req, r, "Twin update");
                return;
        }
        r = replace ? hub_twin_replace(api_hub(req)->twins, id, body, if_match, twin_done, req)
                    : hub_twin_update(api_hub(req)->twins, id, body, if_match, twin_done, req);
        if (r == -EINVAL && !hub_device_id_valid(id)) {
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", id);
                return;
        }
        if (r < 0)
                api_reply_errno(req, r, "Twin update");
}

void api_twin_patch(struct api_req *req) {
        twin_write(req, false);
}

void api_twin_put(struct api_req *req) {
        twin_write(req, true);
}
