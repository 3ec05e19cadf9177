/* SPDX-License-Identifier: MIT */
#pragma once

/* The JSON form of a routed message (file lines, http batches):
 *   {"endpoint":"x","sequenceNumber":12,"enqueuedTime":"…Z","deviceId":"d","moduleId":"m",
 *    "systemProperties":{"message-id":…,"content-type":…,…},"properties":{"a":"b",…},
 *    "body":<the JSON value of a JSON body> | "bodyText":"<UTF-8 text>" | "bodyBase64":"…"}
 * A body is emitted as JSON when the message says application/json (and UTF-8) and it parses;
 * as text when it is valid UTF-8; otherwise base64. */

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

struct gw_ep_item;
struct hub_msg;

/* Whether the message's body is to be emitted as JSON: content type application/json (with
 * parameters allowed) and no content encoding or UTF-8. */
bool gw_uplink_is_json_message(const struct hub_msg *m);

json_t *gw_uplink_item_to_json(const struct gw_ep_item *it, const char *endpoint);
/* Compact text with one spare byte after the text (for a newline); *ret_len excludes it. */
int gw_uplink_item_json(const struct gw_ep_item *it, const char *endpoint, char **ret, size_t *ret_len);
