/* SPDX-License-Identifier: MIT */
#pragma once

/* The hub message: body bytes + IoT Hub system properties + application properties
 * (reference §2.6, §2.7, §8.3, §8.7). Reference-counted and immutable once shared: build it,
 * then hand out references. Size limits of reference §10 are enforced (-E2BIG). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/macro.h"

enum hub_sys_prop {
        HUB_SYS_MESSAGE_ID,           /* $.mid    message-id                 $messageId */
        HUB_SYS_CORRELATION_ID,       /* $.cid    correlation-id             $correlationId */
        HUB_SYS_USER_ID,              /* $.uid    user-id                    $userId */
        HUB_SYS_TO,                   /* $.to     to                         $to */
        HUB_SYS_EXPIRY_TIME,          /* $.exp    absolute-expiry-time (ISO 8601) */
        HUB_SYS_CONTENT_TYPE,         /* $.ct     content-type               $contentType */
        HUB_SYS_CONTENT_ENCODING,     /* $.ce     content-encoding           $contentEncoding */
        HUB_SYS_CREATION_TIME,        /* $.ctime  iothub-creation-time-utc */
        HUB_SYS_OUTPUT_NAME,          /* $.on     iothub-outputname */
        HUB_SYS_MESSAGE_SCHEMA,       /* $.schema iothub-message-schema */
        HUB_SYS_INTERFACE_ID,         /* $.ifid   iothub-interface-id */
        HUB_SYS_COMPONENT_NAME,       /* $.sub    dt-subject                 $dt-subject */
        HUB_SYS_DIAG_ID,              /* $.diagid Diagnostic-Id */
        HUB_SYS_DIAG_CONTEXT,         /* $.diagctx Correlation-Context */
        HUB_SYS_ACK,                  /* iothub-ack (C2D)                    $ack */
        /* Stamped by the hub, never taken from a device: */
        HUB_SYS_CONNECTION_DEVICE_ID, /* iothub-connection-device-id         $connectionDeviceId */
        HUB_SYS_CONNECTION_MODULE_ID, /* iothub-connection-module-id         $connectionModuleId */
        HUB_SYS_CONNECTION_AUTH_GENERATION_ID, /* iothub-connection-auth-generation-id */
        HUB_SYS_CONNECTION_AUTH_METHOD, /* iothub-connection-auth-method     $connectionAuthMethod */
        HUB_SYS_ENQUEUED_TIME,        /* iothub-enqueuedtime                 $enqueuedTime */
        HUB_SYS_MESSAGE_SOURCE,       /* iothub-message-source (Telemetry, twinChangeEvents, ...) */
        HUB_SYS_DATA_SCHEMA,          /* dt-dataschema                       $dt-dataschema */
        _HUB_SYS_MAX,
};

#define HUB_MSG_D2C_MAX_SIZE (256u * 1024u) /* body + system values + app names/values */
#define HUB_MSG_C2D_MAX_SIZE (64u * 1024u)
#define HUB_MSG_ID_MAX_LEN 128u
#define HUB_MSG_MAX_PROPS 256u

struct hub_msg;

struct hub_msg_prop {
        char *name;
        char *value; /* NULL = a property with no value (`key` alone in a bag) */
};

/* Names of a system property in each vocabulary, or NULL where it has none. Note that the
 * MQTT name of HUB_SYS_ACK is "iothub-ack" (sent without "$.", reference §2.6). */
HUB_EXPORT const char *hub_sys_prop_mqtt_name(enum hub_sys_prop p);   /* "$.mid" */
HUB_EXPORT const char *hub_sys_prop_query_name(enum hub_sys_prop p);  /* "$messageId" */
HUB_EXPORT const char *hub_sys_prop_wire_name(enum hub_sys_prop p);   /* "message-id", "iothub-enqueuedtime" */
/* Looks a name up in the MQTT vocabulary ("$.mid", already percent-decoded). -ENOENT if unknown. */
HUB_EXPORT int hub_sys_prop_from_mqtt_name(const char *name, enum hub_sys_prop *ret);
/* Looks a name up in the query vocabulary ("$messageId", case-insensitive). */
HUB_EXPORT int hub_sys_prop_from_query_name(const char *name, enum hub_sys_prop *ret);
/* Whether devices may set it (false for the stamped ones). */
HUB_EXPORT bool hub_sys_prop_settable(enum hub_sys_prop p);

/* A new message holding a copy of body (len may be 0). limit is the size limit enforced by
 * every later setter (HUB_MSG_D2C_MAX_SIZE or HUB_MSG_C2D_MAX_SIZE). -E2BIG if over. */
HUB_EXPORT int hub_msg_new(const void *body, size_t len, size_t limit, struct hub_msg **ret_msg);
HUB_EXPORT struct hub_msg *hub_msg_ref(struct hub_msg *m);
HUB_EXPORT struct hub_msg *hub_msg_unref(struct hub_msg *m); /* accepts NULL, returns NULL */
DEFINE_CLEANUP_FUNC(struct hub_msg *, hub_msg_unref);

/* Sets (replaces; NULL clears) a system property. -E2BIG when the message would exceed its
 * limit or a message/correlation id exceeds HUB_MSG_ID_MAX_LEN. */
HUB_EXPORT int hub_msg_set_sys(struct hub_msg *m, enum hub_sys_prop p, const char *value);
HUB_EXPORT const char *hub_msg_get_sys(const struct hub_msg *m, enum hub_sys_prop p);

/* Adds or replaces an application property (names are case-sensitive). value may be NULL.
 * -E2BIG over the size limit or HUB_MSG_MAX_PROPS; -EINVAL for an empty name. A replaced
 * property keeps its position (hub_msg_prop_at() lists them in insertion order). */
HUB_EXPORT int hub_msg_set_prop(struct hub_msg *m, const char *name, const char *value);
/* Returns the property, or NULL (and *ret_found=false) when absent. ret_found may be NULL. */
HUB_EXPORT const char *hub_msg_get_prop(const struct hub_msg *m, const char *name, bool *ret_found);
HUB_EXPORT size_t hub_msg_n_props(const struct hub_msg *m);
HUB_EXPORT const struct hub_msg_prop *hub_msg_prop_at(const struct hub_msg *m, size_t i);

HUB_EXPORT const void *hub_msg_body(const struct hub_msg *m, size_t *ret_len);

/* The IoT Hub size: body + system property values + application property names and values. */
HUB_EXPORT size_t hub_msg_size(const struct hub_msg *m);

/* A self-describing, versioned binary encoding for the store. serialize returns a malloc'd
 * buffer. deserialize validates everything and returns -EBADMSG on any malformed input
 * (fuzzed: it reads bytes from disk), including a message over limit, an id over
 * HUB_MSG_ID_MAX_LEN and trailing bytes. The encoding is canonical: serialize(deserialize(b))
 * == b. The format is described at the top of msg.c. */
HUB_EXPORT int hub_msg_serialize(const struct hub_msg *m, uint8_t **ret_buf, size_t *ret_len);
HUB_EXPORT int hub_msg_deserialize(const uint8_t *buf, size_t len, size_t limit, struct hub_msg **ret_msg);
