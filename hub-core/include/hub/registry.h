/* SPDX-License-Identifier: MIT */
#pragma once

/* The identity registry (reference §5.2): device identities and shared access policies,
 * stored in the `devices` and `policies` tables of the store. No in-memory copy of the
 * device table is kept (it must scale to a million identities): every read is a query on
 * the store's read connection, on the caller's thread (the store's owner thread), and every
 * write goes through hub_store_submit_wait(), i.e. BLOCKS until durable. Registry changes
 * are rare; hot paths (authentication) only read.
 *
 * struct hub_device and struct hub_policy are value copies holding secrets: release them
 * with hub_device_done() / hub_policy_done(), which wipe the keys. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/macro.h"

struct hub_store;
struct hub_msg;
struct hub_registry;

enum hub_device_status { HUB_DEVICE_ENABLED, HUB_DEVICE_DISABLED };
enum hub_auth_type { HUB_AUTH_TYPE_SAS, HUB_AUTH_TYPE_SELF_SIGNED, HUB_AUTH_TYPE_CA, HUB_AUTH_TYPE_NONE };
enum hub_connection_state { HUB_DISCONNECTED, HUB_CONNECTED };

#define HUB_DEVICE_ID_MAX 128
#define HUB_STATUS_REASON_MAX 128 /* characters (UTF-8 code points) */
#define HUB_KEY_MIN_BYTES 16
#define HUB_KEY_MAX_BYTES 64
#define HUB_POLICY_NAME_MAX 64
/* Most devices one hub_registry_list() call returns. */
#define HUB_REGISTRY_LIST_MAX 1000

struct hub_device { /* a value copy; holds secrets: hub_device_done() wipes it */
        char device_id[HUB_DEVICE_ID_MAX + 1];
        char generation_id[24];
        uint64_t etag_version; /* etag = base64 of the decimal counter, e.g. "MQ==" for 1 */
        enum hub_device_status status;
        bool has_status_reason;
        char status_reason[4 * HUB_STATUS_REASON_MAX + 1];
        uint64_t status_updated_usec;
        enum hub_auth_type auth_type;
        char primary_key[89], secondary_key[89];
        char primary_thumbprint[65], secondary_thumbprint[65];
        bool iot_edge;
        enum hub_connection_state connection_state;
        uint64_t connection_state_updated_usec, last_activity_usec, created_usec;
        uint32_t c2d_count;
};

struct hub_policy {
        char name[HUB_POLICY_NAME_MAX + 1];
        char primary_key[89];
        char secondary_key[89];
        unsigned rights; /* HUB_RIGHT_* of hub/auth.h */
};

/* Wipes the struct (keys included). */
HUB_EXPORT void hub_device_done(struct hub_device *d);
HUB_EXPORT void hub_policy_done(struct hub_policy *p);
/* Wipes and frees an array returned by hub_registry_list() / hub_registry_policy_list().
 * Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_device *hub_device_array_free(struct hub_device *arr, size_t n);
HUB_EXPORT struct hub_policy *hub_policy_array_free(struct hub_policy *arr, size_t n);

/* Device id rules of reference §5.2: 1..128 ASCII alphanumerics and - : . + % _ # * ? ! ( ) , = @ ; $ ' */
HUB_EXPORT bool hub_device_id_valid(const char *id);
/* Stricter rule for field devices: 1..128 of [A-Za-z0-9._-]. */
HUB_EXPORT bool hub_device_id_valid_strict(const char *id);

/* Checks the writable fields of a device as hub_registry_create() / _update() do: id,
 * status, status_reason (<= 128 characters, valid UTF-8), auth_type, SAS keys (each empty
 * or strict base64 of 16..64 bytes; only for sas), thumbprints (each empty or 40/64 hex
 * digits; selfSigned needs the primary). Returns 0, or -EINVAL with *ret_error (may be NULL)
 * set to a static description naming the field. */
HUB_EXPORT int hub_device_validate(const struct hub_device *d, const char **ret_error);

/* The etag of a version: base64 of its decimal representation ("MQ==" for 1), unquoted.
 * buf must hold 32 bytes. Returns buf. */
HUB_EXPORT char *hub_device_etag(uint64_t version, char buf[static 32]);

/* Opens the registry on an open store (borrowed: it must outlive the registry), clock and log
 * (borrowed; log may be NULL). On first start creates the default policies of reference
 * §1.6 with fresh random keys (iothubowner = all rights, service = ServiceConnect, device =
 * DeviceConnect, registryRead = RegistryRead, registryReadWrite = RegistryRead +
 * RegistryWrite); existing policies are left alone. Blocks (store write). -ENOMEM, store
 * errors. */
HUB_EXPORT int hub_registry_new(struct hub_store *store, const struct hub_clock *clock, const struct hub_log *log,
                                struct hub_registry **ret);
/* Accepts NULL. Returns NULL. Must run before the store is closed. */
HUB_EXPORT struct hub_registry *hub_registry_free(struct hub_registry *r);
DEFINE_CLEANUP_FUNC(struct hub_registry *, hub_registry_free);

/* Device lifecycle events (reference §8.7: createDeviceIdentity / deleteDeviceIdentity) are
 * built after each successful create/delete and passed to fn, on the caller's thread, before
 * the create/delete returns. fn borrows the message (hub_msg_ref() it to keep it). The
 * hub name is not known to hub-core: user-id and the hubName property are left for the
 * gateway to stamp. fn NULL disables events. */
HUB_EXPORT void hub_registry_set_event_sink(struct hub_registry *r, void (*fn)(void *ud, struct hub_msg *ev),
                                            void *ud);

/* Reads a device by id (case-sensitive). -ENOENT when absent, -EINVAL bad arguments, store
 * errors. *ret must be released with hub_device_done(). */
HUB_EXPORT int hub_registry_get(struct hub_registry *r, const char *id, struct hub_device *ret);

/* Creates a device from in: device_id (hub_device_id_valid()), status, status_reason
 * (<= 128 characters of valid UTF-8), auth_type, keys (for sas: both empty = generate both,
 * else each strict base64 of 16..64 bytes; an empty one is generated), thumbprints
 * (selfSigned: primary required; each empty or 40/64 hex digits), iot_edge. Every other field
 * is ignored: generation_id is fresh (18 random decimal digits), etag_version 1, times now,
 * connection state disconnected. Blocks until durable. -EEXIST when the id exists, -EINVAL
 * on invalid input, store errors. On success *ret (may be NULL) is the stored device. */
HUB_EXPORT int hub_registry_create(struct hub_registry *r, const struct hub_device *in, struct hub_device *ret);

/* Replaces the writable fields (status, status_reason, auth_type, keys, thumbprints,
 * iot_edge) of device in->device_id; read-only ones (generation id, etag, connection state,
 * activity, c2d count, created) are ignored. if_match: NULL or "*" = unconditional, else an
 * etag (surrounding double quotes tolerated) that must match the current one. An empty SAS
 * key keeps the device's current one (or is generated when it has none, e.g. it was not sas
 * before). etag_version + 1; status_updated is set to now when the status changes. Blocks. -ENOENT, -ESTALE etag mismatch, -EINVAL,
 * store errors. *ret (may be NULL) is the stored device. */
HUB_EXPORT int hub_registry_update(struct hub_registry *r, const struct hub_device *in, const char *if_match,
                                   struct hub_device *ret);

/* Deletes a device (if_match as for update). Blocks. -ENOENT, -ESTALE, store errors. */
HUB_EXPORT int hub_registry_delete(struct hub_registry *r, const char *id, const char *if_match);

/* Up to max (1..HUB_REGISTRY_LIST_MAX, larger is clamped) devices ordered by id (byte order),
 * starting after after_id (NULL = from the start). *ret_array is a new array (NULL when
 * *ret_n is 0), to be released with hub_device_array_free(). -EINVAL, -ENOMEM, store errors. */
HUB_EXPORT int hub_registry_list(struct hub_registry *r, const char *after_id, size_t max,
                                 struct hub_device **ret_array, size_t *ret_n);

/* Device statistics (reference §5.2 /statistics/devices). Any pointer may be NULL. */
HUB_EXPORT int hub_registry_count(struct hub_registry *r, uint64_t *total, uint64_t *enabled, uint64_t *disabled);

enum hub_key_which { HUB_KEY_PRIMARY, HUB_KEY_SECONDARY, HUB_KEY_SWAP };
/* Gives the device a fresh primary or secondary key, or swaps them. Bumps the etag. Only for
 * sas devices (-EINVAL otherwise). Blocks. -ENOENT, store errors. *ret may be NULL. */
HUB_EXPORT int hub_registry_regenerate_key(struct hub_registry *r, const char *id, enum hub_key_which which,
                                           struct hub_device *ret);

/* Reads a policy by name (case-sensitive). -ENOENT. Release *ret with hub_policy_done(). */
HUB_EXPORT int hub_registry_policy_get(struct hub_registry *r, const char *name, struct hub_policy *ret);
/* All policies ordered by name. Release with hub_policy_array_free(). */
HUB_EXPORT int hub_registry_policy_list(struct hub_registry *r, struct hub_policy **ret, size_t *ret_n);
/* Replaces a policy's keys (e.g. with keys the configuration reads from files). Either may be
 * NULL to keep the current one. -ENOENT unknown policy, -EINVAL a key that is not base64 of
 * 16..64 bytes. Blocks. */
HUB_EXPORT int hub_registry_policy_set_keys(struct hub_registry *r, const char *name, const char *primary,
                                            const char *secondary);

/* Device JSON of reference §5.2 (device-json.c). with_keys=false gives null keys. Returns a
 * new reference, or NULL on allocation failure. */
HUB_EXPORT json_t *hub_device_to_json(const struct hub_device *d, bool with_keys);
/* Fills *ret from a Device JSON body (service PUT), applying the Node SDK normalisation:
 * missing "authentication" -> sas with empty keys (generated on create); authentication
 * without "type" -> selfSigned when a thumbprint is given, else sas. Read-only fields are
 * accepted and ignored. -EINVAL with *ret_error (may be NULL; a static string naming the
 * field and what was expected) on wrong types, unknown enum values or over-long values.
 * *ret is written on success only. */
HUB_EXPORT int hub_device_from_json(const json_t *j, struct hub_device *ret, const char **ret_error);
