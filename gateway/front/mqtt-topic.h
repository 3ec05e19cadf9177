/* SPDX-License-Identifier: MIT */
#pragma once

/* The IoT Hub layer over MQTT (reference §2): CONNECT user names, device→hub topic names,
 * property bags, hub→device topic names and the subscription filters a device may use.
 * Pure string work, no I/O. Every parser here faces the network: what it refuses is a reason
 * to close the connection (reference §2.4), and the error value tells which. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "front/mqtt-codec.h"
#include "hub/msg.h"

/* ---- CONNECT user name (reference §2.2) --------------------------------------------------
 *
 *     username = host "/" deviceId [ "/" moduleId ] "/" [ "?" ] params
 *     params   = param *( "&" param )        param = name [ "=" value ]
 *
 * Split on "/": three segments are the device form, four the module form; the last segment is
 * the parameter list, with one leading "?" stripped (without it, the old C SDK form
 * "{host}/{id}/api-version=2016-11-14&..."). host, deviceId and moduleId are taken verbatim
 * and must be non-empty. api-version is mandatory and non-empty; DeviceClientType and
 * model-id are optional; their values are percent-decoded ("+" stays "+"); each may appear
 * once. Unknown parameters (auth-chain, ...) are ignored without being decoded. The host is
 * the HostName the device was given: the caller compares it with hub.host_name and the
 * aliases. */
struct gw_mqtt_username {
        char *host;
        char *device_id;
        char *module_id;    /* NULL in the device form */
        char *api_version;
        char *client_type;  /* DeviceClientType, decoded; NULL if absent */
        char *model_id;     /* model-id, decoded; NULL if absent */
};

/* Parses len bytes of s. Returns 0 and fills *ret (free with gw_mqtt_username_done()),
 * -EBADMSG when the user name does not have the grammar above (missing api-version, a
 * malformed %-escape in a known value, empty segments, a NUL byte, a duplicate known
 * parameter), -ENOMEM. The caller answers -EBADMSG with CONNACK 0x04. */
int gw_mqtt_username_parse(const char *s, size_t len, struct gw_mqtt_username *ret);
void gw_mqtt_username_done(struct gw_mqtt_username *u);

/* Whether the CONNECT client id is exactly "{device_id}" (module_id NULL) or
 * "{device_id}/{module_id}" (reference §2.2). If not, the caller answers CONNACK 0x02. */
bool gw_mqtt_client_id_matches(struct gw_mqtt_str client_id, const char *device_id, const char *module_id);

/* ---- Device → hub PUBLISH topics (reference §2.7, §2.9, §2.10) --------------------------- */

enum gw_mqtt_topic_kind {
        GW_MQTT_TOPIC_EVENTS,               /* devices/{id}[/modules/{mid}]/messages/events[/[?]{bag}][/] */
        GW_MQTT_TOPIC_TWIN_GET,             /* $iothub/twin/GET/?$rid={rid} */
        GW_MQTT_TOPIC_TWIN_PATCH_REPORTED,  /* $iothub/twin/PATCH/properties/reported/?$rid={rid}[&$version=N] */
        GW_MQTT_TOPIC_METHOD_RESPONSE,      /* $iothub/methods/res/{status}/?$rid={rid} */
        _GW_MQTT_TOPIC_MAX,
};

/* A classified topic; the strings point into the topic passed to gw_mqtt_topic_parse(). */
struct gw_mqtt_topic {
        enum gw_mqtt_topic_kind kind;
        struct gw_mqtt_str device_id;  /* EVENTS: the id in the topic; the caller compares it with
                                        * the connection's identity */
        struct gw_mqtt_str module_id;  /* EVENTS, module form; else ptr NULL */
        struct gw_mqtt_str bag;        /* EVENTS: the property bag, without a leading "?" and a
                                        * trailing "/"; len 0 when there is none */
        struct gw_mqtt_str rid;        /* twin / method: the request id, raw (echo it verbatim) */
        bool has_version;              /* TWIN_PATCH_REPORTED: "$version=" given */
        uint64_t version;
        int status;                    /* METHOD_RESPONSE: the device's status code */
};

/* Classifies a PUBLISH topic name from a device. The parameters of twin and method topics
 * ("$rid", "$version") may come in any order; unknown ones are ignored; "?" before them is
 * optional. Returns 0 and fills *ret, -ENOENT for a topic that is none of the above (unknown
 * topic, empty ids, extra segments), -EBADMSG for a known topic with a missing or empty $rid,
 * a $version or status that is not a decimal number in range, or a repeated parameter. */
int gw_mqtt_topic_parse(const char *topic, size_t len, struct gw_mqtt_topic *ret);

/* ---- Property bags (reference §2.5, §2.6) ----------------------------------------------- */

enum {
        /* The bag came with a C2D / module-input delivery (client side): "iothub-ack" is the
         * HUB_SYS_ACK system property and $.cdid/$.cmid are kept. Without it (device→hub),
         * "iothub-ack" is an application property and the hub-stamped $.cdid and $.cmid are
         * dropped: a device cannot claim another identity. */
        GW_MQTT_BAG_DOWNSTREAM = 1u << 0,
};

/* Decodes a property bag into m: split on "&" (empty items are skipped), each item at the
 * first "=", both sides percent-decoded ("%24.mid" and "$.mid" are the same); "key" alone is
 * a property without value, "key=" an empty one. Known system names (hub_sys_prop_from_mqtt_name)
 * become system properties (a system name without value is skipped); unknown "$." names and
 * everything else are application properties. Returns 0, -EBADMSG for a malformed escape,
 * an escaped NUL or an empty name, -E2BIG when m would exceed its size limit (256 KB for a
 * D2C message: body + property names and values) or a message/correlation id exceeds 128
 * characters, -ENOMEM. On failure m may hold some of the bag's properties. */
int gw_mqtt_bag_decode(const char *bag, size_t len, unsigned flags, struct hub_msg *m);

/* The D2C message of an EVENTS topic: body copied, bag decoded, HUB_MSG_D2C_MAX_SIZE enforced.
 * A RETAIN publish gets application property mqtt-retain=true (reference §2.4). The caller
 * stamps the iothub-connection-* properties. Errors as gw_mqtt_bag_decode(). */
int gw_mqtt_d2c_message(const struct gw_mqtt_topic *t, const void *body, size_t len, bool retain,
                        struct hub_msg **ret_msg);

/* Encodes the properties of m as a bag for a hub→device topic: the system properties that
 * have an MQTT name, in the order $.mid, $.to, $.exp, $.cid, $.uid, $.ct, $.ce, then the
 * others, then iothub-ack, then the application properties in insertion order; names and
 * values percent-encoded keeping only RFC 3986 unreserved characters ("$" -> "%24");
 * a property without value is written as its name alone. *ret is a new string ("" when m has
 * no properties). Returns 0 or -ENOMEM. */
int gw_mqtt_bag_encode(const struct hub_msg *m, char **ret);

/* ---- Hub → device topics (reference §2.8–2.11). Each returns 0 and a new string in *ret,
 * -EINVAL for an argument that cannot appear in the topic, -ENOMEM. ----------------------- */

/* devices/{id}/messages/devicebound/{bag} ("devices/{id}/messages/devicebound/" if m has no
 * properties). */
int gw_mqtt_topic_c2d(const char *device_id, const struct hub_msg *m, char **ret);
/* devices/{id}/modules/{mid}/inputs/{input}/{bag} */
int gw_mqtt_topic_module_input(const char *device_id, const char *module_id, const char *input,
                               const struct hub_msg *m, char **ret);
/* $iothub/twin/res/{status}/?$rid={rid}[&$version={version}]; rid is echoed verbatim as the
 * device sent it (it must not contain '&', '#', '+' or '/'). */
int gw_mqtt_topic_twin_response(int status, struct gw_mqtt_str rid, bool has_version, uint64_t version,
                                char **ret);
/* $iothub/twin/PATCH/properties/desired/?$version={version} */
int gw_mqtt_topic_twin_desired(uint64_t version, char **ret);
/* $iothub/methods/POST/{name}/?$rid={rid}; name and rid must be non-empty without '/', '&',
 * '?', '#', '+'. */
int gw_mqtt_topic_method_request(const char *name, const char *rid, char **ret);

/* ---- SUBSCRIBE filters (reference §2.4, §2.8–2.11) --------------------------------------- */

enum gw_mqtt_filter_kind {
        GW_MQTT_FILTER_C2D,            /* devices/{id}/messages/devicebound/# */
        GW_MQTT_FILTER_MODULE,         /* devices/{id}/modules/{mid}/# (C SDK) */
        GW_MQTT_FILTER_MODULE_INPUTS,  /* devices/{id}/modules/{mid}/inputs/# (Node) */
        GW_MQTT_FILTER_TWIN_RESPONSE,  /* $iothub/twin/res/# */
        GW_MQTT_FILTER_TWIN_DESIRED,   /* $iothub/twin/PATCH/properties/desired/# */
        GW_MQTT_FILTER_METHODS,        /* $iothub/methods/POST/# */
        _GW_MQTT_FILTER_MAX,
};

struct gw_mqtt_filter {
        enum gw_mqtt_filter_kind kind;
        struct gw_mqtt_str device_id;  /* C2D, MODULE*: compare with the connection's identity */
        struct gw_mqtt_str module_id;  /* MODULE*: likewise */
};

/* Classifies a SUBSCRIBE filter. Only the documented filters, exactly (with the trailing
 * "/#"), are accepted: anything else returns -ENOENT, and the connection is closed
 * (reference §2.4: no SUBACK 0x80). */
int gw_mqtt_filter_parse(const char *filter, size_t len, struct gw_mqtt_filter *ret);

/* The QoS granted for a requested one (reference §2.4: QoS 2 is granted as 1). */
static inline uint8_t gw_mqtt_granted_qos(uint8_t requested) {
        return requested > 1 ? 1 : requested;
}
