/* SPDX-License-Identifier: MIT */
#pragma once

/* Device twins (reference §6, §5.3, §2.9, §8.7).
 *
 * A twin is three JSON sections — `tags` (service only), `properties.desired` (written by the
 * service, read by the device) and `properties.reported` (written by the device) — plus
 * versions, an etag and `$metadata`, stored in the `twins` table of the store (one row per
 * device, created by its first write; a device without a row has the initial twin: versions
 * 1, empty sections, `$lastUpdated` = the device's creation time). Deleting the device from
 * the registry deletes its twin (foreign key, ON DELETE CASCADE).
 *
 * Reads (hub_twin_get(), hub_twin_get_device_view(), hub_twin_scan()) are queries on the
 * store's read connection, on the store owner's thread. Changes are asynchronous: each one
 * is a store write that reads the current row inside the commit transaction, applies the
 * change, checks every limit on the resulting document and writes it, so concurrent changes
 * serialize in submission order. Its completion runs from hub_store_dispatch() once the
 * change is durable and, on success, first hands the twin-change event (§8.7) to the event
 * sink, then (for a desired change) the desired-property notification to the desired
 * handler, then calls the caller's done.
 *
 * Limits (§6.2, §10), checked on the resulting section before anything is written:
 * - size: tags 8 KB, desired 32 KB, reported 32 KB, computed as §6.2 says: the sum over all
 *   properties of the key's UTF-8 length plus the value's size (string: UTF-8 bytes not
 *   counting control characters; number 8; boolean 4; null (inside arrays) 4; object: the
 *   recursive sum; array: the sum of its elements); `$version` / `$metadata` excluded.
 *   Local safeguard on top (the §6.2 measure counts control characters and empty containers
 *   as nothing): the compact JSON encoding of a section may not exceed twice its limit.
 *   -E2BIG.
 * - depth: the section object is level 0; every object or array value is one level deeper
 *   than its container. At most HUB_TWIN_DEPTH_MAX (10) levels: in
 *   {"l1":{"l2":{... "l10":{"leaf":1}}}} "l10" is at level 10 and is accepted, an object or
 *   array inside it (level 11) is not. -E2BIG.
 * - keys: 1 .. 1024 UTF-8 bytes (-E2BIG when longer); no control characters (C0, DEL, C1),
 *   `.`, `$` or space (-EINVAL). `$version` and `$metadata` at the top level of a patch or
 *   replacement document are ignored (clients send back what GET returned); anywhere else a
 *   `$` key is rejected.
 * - values: strings <= 4096 UTF-8 bytes (-E2BIG); integers within
 *   -4503599627370496 .. 4503599627370495 (-EINVAL); arrays are allowed and are atomic leaf
 *   values (replaced wholesale by a patch); the rules above also apply inside arrays.
 * Error messages name the offending path, e.g. "properties.desired.a.b: key contains '.'". */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "hub/clock.h"
#include "hub/log.h"
#include "hub/macro.h"

struct hub_store;
struct hub_msg;
struct hub_twins;

#define HUB_TWIN_TAGS_MAX 8192u
#define HUB_TWIN_DESIRED_MAX 32768u
#define HUB_TWIN_REPORTED_MAX 32768u
#define HUB_TWIN_DEPTH_MAX 10u
#define HUB_TWIN_KEY_MAX 1024u
#define HUB_TWIN_STRING_MAX 4096u
#define HUB_TWIN_INT_MAX INT64_C(4503599627370495)
#define HUB_TWIN_INT_MIN INT64_C(-4503599627370496)
/* Size of an error message buffer that always fits (paths are shortened to fit). */
#define HUB_TWIN_ERROR_MAX 512u

enum hub_twin_section {
        HUB_TWIN_SECTION_TAGS,
        HUB_TWIN_SECTION_DESIRED,
        HUB_TWIN_SECTION_REPORTED,
        _HUB_TWIN_SECTION_MAX,
};

/* ---- pure document logic (twin-patch.c): no store, fuzzed ------------------------------- */

/* "tags", "properties.desired", "properties.reported"; NULL for an invalid value. */
HUB_EXPORT const char *hub_twin_section_name(enum hub_twin_section which);
/* The size limit of a section (HUB_TWIN_TAGS_MAX, ...); 0 for an invalid value. */
HUB_EXPORT size_t hub_twin_section_limit(enum hub_twin_section which);

/* The §6.2 size of a section (see the top of this file). Top-level `$version` / `$metadata`
 * are not counted. Stops counting (returns SIZE_MAX) below HUB_TWIN_DEPTH_MAX + 1 levels. */
HUB_EXPORT size_t hub_twin_section_size(const json_t *section);

/* Checks a whole section (without `$version` / `$metadata`, as stored) against every limit
 * of the top of this file. Returns 0, or -E2BIG / -EINVAL with a message naming the path in
 * errbuf (may be NULL). Never recurses deeper than HUB_TWIN_DEPTH_MAX + 1 levels. */
HUB_EXPORT int hub_twin_check_limits(const json_t *section, enum hub_twin_section which, char *errbuf,
                                     size_t errbuf_size);

/* Checks a patch for a section before it is applied: a JSON object, key rules everywhere
 * (top-level `$version` / `$metadata` ignored), values as for hub_twin_check_limits() (null
 * allowed: it deletes), depth. Sizes are checked on the result by hub_twin_patch_apply().
 * Returns 0, -EINVAL or -E2BIG with a message in errbuf (may be NULL). */
HUB_EXPORT int hub_twin_check_patch(const json_t *patch, enum hub_twin_section which, char *errbuf,
                                    size_t errbuf_size);

/* When and at which section version a change happened, for `$metadata`. */
struct hub_twin_stamp {
        const char *time;  /* ISO 8601, as hub_time_format_iso8601() writes it */
        int64_t version;   /* > 0: also write `$lastUpdatedVersion` (desired); 0: don't */
};

/* Merges patch into section (reference §6.3): new keys are added, scalars and arrays
 * replaced, objects merged key by key, null removes a key and its subtree (a missing key is
 * no error); top-level `$version` / `$metadata` of the patch are ignored. meta (may be NULL,
 * e.g. for tags) is the section's `$metadata` object: every written or deleted key stamps
 * its parent levels, every written node gets fresh metadata (objects: recursively).
 * The patch is checked first (hub_twin_check_patch()), the result afterwards
 * (hub_twin_check_limits()); section and meta are changed only on success. Borrows all
 * arguments. Returns 0, -EINVAL / -E2BIG with a message in errbuf (may be NULL), -ENOMEM. */
HUB_EXPORT int hub_twin_patch_apply(json_t *section, json_t *meta, const json_t *patch, enum hub_twin_section which,
                                    const struct hub_twin_stamp *stamp, char *errbuf, size_t errbuf_size);

/* Replaces the content of section by doc (reference §6.3, PUT): doc is applied to an empty
 * section as a patch (so null values and top-level `$version` / `$metadata` are dropped).
 * meta (may be NULL): keys whose value did not change keep their metadata, everything else
 * is stamped. Same checks, errors and atomicity as hub_twin_patch_apply(). */
HUB_EXPORT int hub_twin_replace_apply(json_t *section, json_t *meta, const json_t *doc, enum hub_twin_section which,
                                      const struct hub_twin_stamp *stamp, char *errbuf, size_t errbuf_size);

/* The part of meta that describes what patch wrote: the root's own `$lastUpdated*` and, for
 * every non-null key of patch, its node (recursively for object values merged into objects).
 * For the twin-change event. Returns a new reference, or NULL on allocation failure. */
HUB_EXPORT json_t *hub_twin_meta_restrict(const json_t *meta, const json_t *patch);

/* ---- twins on the store (twin.c) -------------------------------------------------------- */

/* The twin etag of a version counter: base64 of the counter as 8 big-endian bytes
 * ("AAAAAAAAAAE=" for 1), unquoted. Returns buf. */
HUB_EXPORT char *hub_twin_etag(uint64_t counter, char buf[static 16]);

/* Opens the twin module on an open store (borrowed: must outlive it). clock is borrowed
 * (required), log may be NULL. -EINVAL, -ENOMEM. */
HUB_EXPORT int hub_twins_new(struct hub_store *store, const struct hub_clock *clock, const struct hub_log *log,
                             struct hub_twins **ret);

/* Waits for every change submitted through t to complete (running hub_store_dispatch(), so
 * other modules' completions run too; blocks for at most the pending commits), then frees.
 * Must run before the store is closed, on the owner's thread. Accepts NULL. Returns NULL. */
HUB_EXPORT struct hub_twins *hub_twins_free(struct hub_twins *t);
DEFINE_CLEANUP_FUNC(struct hub_twins *, hub_twins_free);

/* Twin-change events (§8.7, source twinChangeEvents, opType updateTwin / replaceTwin) are
 * passed to fn on the owner's thread after each durable change; fn borrows the message
 * (hub_msg_ref() it to keep it). user-id and the hubName property are left for the gateway.
 * fn NULL disables events. */
HUB_EXPORT void hub_twins_set_event_sink(struct hub_twins *t, void (*fn)(void *ud, struct hub_msg *ev), void *ud);

/* Desired-property notifications (§6.5) for the device-session layer: after each durable
 * desired change, fn gets the device id, the notification body (the patch exactly as
 * applied, `null`s included, plus "$version": version; for a replace, the new desired
 * document plus "$version") and the new desired version. Everything is borrowed for the
 * duration of the call. fn NULL disables them. */
HUB_EXPORT void hub_twins_set_desired_handler(struct hub_twins *t,
                                              void (*fn)(void *ud, const char *device_id, const json_t *patch,
                                                         int64_t version),
                                              void *ud);

/* The full twin of §6.1 (identity fields, etag, version, tags, properties with `$metadata`
 * and `$version`). -ENOENT unknown device, -EINVAL invalid arguments, -EBADMSG a corrupt
 * row, store errors. *ret_full is a new reference. */
HUB_EXPORT int hub_twin_get(struct hub_twins *t, const char *device_id, json_t **ret_full);

/* The device view of §2.9: {"desired":{...,"$version":N},"reported":{...,"$version":M}},
 * no `$metadata`, no tags. Errors as hub_twin_get(). *ret is a new reference. */
HUB_EXPORT int hub_twin_get_device_view(struct hub_twins *t, const char *device_id, json_t **ret);

/* Streams the full twins of up to max devices (1..HUB_TWIN_SCAN_MAX, larger is clamped)
 * ordered by device id (byte order), starting after after_id (NULL = from the start), one
 * row at a time: cb borrows twin for the duration of the call and returns 0 to continue,
 * > 0 to stop, < 0 to abort (that value is returned). cb must not call hub_twin_scan().
 * Returns the number of twins passed to cb, or -errno. For the query engine. */
#define HUB_TWIN_SCAN_MAX 100000u
typedef int (*hub_twin_scan_fn)(void *ud, const json_t *twin);
HUB_EXPORT int hub_twin_scan(struct hub_twins *t, const char *after_id, size_t max, hub_twin_scan_fn cb, void *ud);

/* Completion of a change, on the owner's thread, once durable (or failed).
 * result: 0, or -ENOENT unknown device, -ESTALE If-Match / expected-version mismatch,
 * -EINVAL invalid body or content, -E2BIG over a limit, -ENOMEM, -EBADMSG corrupt row, store
 * errors (-ENOSPC, -EIO, ...; nothing was written). error: NULL on success, else a message
 * for the client (names the path for content errors); borrowed. twin: on success the new
 * full twin (§6.1), borrowed (json_incref() it to keep it); NULL on failure. */
typedef void (*hub_twin_done_fn)(int result, json_t *twin, const char *error, void *ud);

/* Submission contract shared by the change functions below: every JSON argument is
 * borrowed (copied before return). Returns 0 when the change was submitted: done (may be
 * NULL) then runs exactly once from hub_store_dispatch(). Returns -EINVAL (NULL t, body or
 * an invalid device id), -ENOMEM or -ESHUTDOWN without submitting: done never runs.
 * Content errors (wrong shape, limits, etag) are reported through done, with a message. */

/* Service PATCH /twins/{id} (§5.3): body {"tags":{...},"properties":{"desired":{...}}};
 * either part may be absent. Read-only root fields of the twin (deviceId — must equal
 * device_id —, etag, version, status, ...) are ignored; unknown root or properties fields
 * and properties.reported are rejected (-EINVAL). if_match: NULL, "*" or a twin etag (quotes
 * tolerated). Increments version (and desired $version when desired is present). */
HUB_EXPORT int hub_twin_update(struct hub_twins *t, const char *device_id, const json_t *body, const char *if_match,
                               hub_twin_done_fn done, void *ud);

/* Service desired-only patch: hub_twin_update() with body {"properties":{"desired":patch}}. */
HUB_EXPORT int hub_twin_update_desired(struct hub_twins *t, const char *device_id, const json_t *patch,
                                       const char *if_match, hub_twin_done_fn done, void *ud);

/* Service PUT /twins/{id}: tags and properties.desired are replaced wholesale by those of
 * body (an absent one becomes empty); otherwise as hub_twin_update(). Increments version and
 * desired $version; the event is a replaceTwin event carrying the full twin. */
HUB_EXPORT int hub_twin_replace(struct hub_twins *t, const char *device_id, const json_t *body, const char *if_match,
                                hub_twin_done_fn done, void *ud);

/* Device reported-property patch (§2.9): patch is the bare object. expected_version >= 0:
 * the current reported $version must equal it (-ESTALE otherwise); < 0: unconditional.
 * Increments version and reported $version (the new one is the twin's
 * properties.reported.$version, for the 204's `$version=`). */
HUB_EXPORT int hub_twin_update_reported(struct hub_twins *t, const char *device_id, const json_t *patch,
                                        int64_t expected_version, hub_twin_done_fn done, void *ud);
