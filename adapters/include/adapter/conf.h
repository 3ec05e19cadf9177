/* SPDX-License-Identifier: MIT */
#pragma once

/* The positioned configuration tree.
 *
 * A YAML file is parsed (libyaml) into a tree of nodes — scalars, mappings, sequences and
 * nulls — each of which remembers the file, the line and column (1-based, of the node's
 * start) and its key path from the root (`adapters[0].devices[2].points[1].type`). The
 * gateway validates its own keys with the typed readers below, and hands each adapter its
 * subtree so that the adapter validates its keys with the same precision.
 *
 * Errors are collected, not returned one at a time: every reader appends to a caller-owned
 * struct adp_conf_errors and carries on, so one run reports every problem in a file. Each
 * message has the form
 *
 *     FILE:LINE:COL: PATH: MESSAGE        (or FILE:LINE:COL: MESSAGE at the root / for syntax errors)
 *
 * where MESSAGE says what was found and what was expected.
 *
 * Refused on purpose: anchors and aliases, duplicate keys, more than one document per file,
 * tags other than the standard !!str/!!int/!!float/!!bool/!!null/!!map/!!seq, nesting
 * deeper than ADP_CONF_MAX_DEPTH. Nothing here blocks except the file reads. Not
 * thread-safe; a tree may be read from several threads once built. */

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/macro.h"

#define ADP_CONF_ERRORS_MAX 100     /* messages kept; later ones are counted in "N more errors" */
#define ADP_CONF_MAX_DEPTH 64       /* nesting levels */
#define ADP_CONF_MAX_FILE_SIZE (4u * 1024u * 1024u)

enum adp_conf_kind {
        ADP_CONF_NULL,          /* `~`, `null`, or an empty value (a quoted "null" is a scalar) */
        ADP_CONF_SCALAR,
        ADP_CONF_MAP,
        ADP_CONF_SEQ,
        _ADP_CONF_KIND_MAX,
};

struct adp_conf_node;

/* Caller-allocated, zero-initialised; release with adp_conf_errors_done(). */
struct adp_conf_errors {
        char **msgs;            /* up to ADP_CONF_ERRORS_MAX formatted lines */
        size_t n_msgs;
        size_t n_total;         /* every error reported, kept or not */
        char *more;             /* "N more errors" once over the cap */
};

/* ---- errors ----------------------------------------------------------------------------- */

/* Appends "FILE:LINE:COL: PATH: MESSAGE" positioned at node `at` (its path is omitted when
 * empty, i.e. at the root). `at` may be NULL: then only MESSAGE is recorded. Never fails:
 * on allocation failure the error is counted but its text is lost. */
HUB_EXPORT void adp_conf_error(struct adp_conf_errors *e, const struct adp_conf_node *at, const char *fmt, ...)
        _printf_(3, 4);
HUB_EXPORT void adp_conf_errorv(struct adp_conf_errors *e, const struct adp_conf_node *at, const char *fmt, va_list ap)
        _printf_(3, 0);

/* Appends "FILE:LINE:COL: MESSAGE", or "FILE: MESSAGE" when line is 0 (a file that cannot be
 * read, say). */
HUB_EXPORT void adp_conf_error_file(struct adp_conf_errors *e, const char *file, unsigned line, unsigned column,
                         const char *fmt, ...) _printf_(5, 6);

/* Number of lines adp_conf_errors_get() returns: the kept messages, plus one "N more errors"
 * line when some were dropped. */
HUB_EXPORT size_t adp_conf_errors_count(const struct adp_conf_errors *e);
/* Every error ever reported into e (to see whether a step added any). */
HUB_EXPORT size_t adp_conf_errors_total(const struct adp_conf_errors *e);
/* Line i (borrowed, valid until adp_conf_errors_done()), or NULL when out of range. */
HUB_EXPORT const char *adp_conf_errors_get(const struct adp_conf_errors *e, size_t i);
/* Frees the messages and leaves e zeroed (reusable). */
HUB_EXPORT void adp_conf_errors_done(struct adp_conf_errors *e);

/* ---- loading ---------------------------------------------------------------------------- */

/* Parses the file at path into *ret (a new tree; free with adp_conf_node_free()). An empty
 * file gives a null root. Returns 0; -ENOENT, -EACCES, -EISDIR, -EFBIG... with an error line
 * when the file cannot be read; -EINVAL after adding errors (syntax, duplicate key, alias,
 * tag, second document); -ENOMEM. */
HUB_EXPORT int adp_conf_load_file(const char *path, struct adp_conf_node **ret, struct adp_conf_errors *e);

/* Same from memory; name is used as the FILE in positions and messages. text need not be
 * NUL-terminated. */
HUB_EXPORT int adp_conf_load_string(const char *name, const char *text, size_t len, struct adp_conf_node **ret,
                         struct adp_conf_errors *e);

/* Frees a whole tree. NULL-safe; returns NULL. */
HUB_EXPORT struct adp_conf_node *adp_conf_node_free(struct adp_conf_node *n);
DEFINE_CLEANUP_FUNC(struct adp_conf_node *, adp_conf_node_free);

/* Merges a conf.d fragment on top of base. Mappings merge key by key, recursively; sequence
 * items are appended (their paths renumbered, their file:line:col kept); a scalar replaces a
 * scalar; a null overlay changes nothing, and anything replaces a null base. A kind mismatch
 * is an error at the overlay's node. The overlay is always consumed (freed or moved into
 * base). Returns 0, or -EINVAL after adding errors. */
HUB_EXPORT int adp_conf_merge(struct adp_conf_node *base, struct adp_conf_node *overlay, struct adp_conf_errors *e);

/* ---- accessors (all NULL-safe) ---------------------------------------------------------- */

HUB_EXPORT enum adp_conf_kind adp_conf_kind(const struct adp_conf_node *n);
HUB_EXPORT const char *adp_conf_kind_to_string(enum adp_conf_kind k);     /* "a mapping", "a sequence", ... */
HUB_EXPORT const char *adp_conf_file(const struct adp_conf_node *n);
HUB_EXPORT unsigned adp_conf_line(const struct adp_conf_node *n);
HUB_EXPORT unsigned adp_conf_column(const struct adp_conf_node *n);
/* Key path from the root, "" for the root itself. */
HUB_EXPORT const char *adp_conf_path(const struct adp_conf_node *n);
/* The node's key in its parent mapping, NULL for sequence items and the root. */
HUB_EXPORT const char *adp_conf_key(const struct adp_conf_node *n);
/* The scalar's text, NULL unless the node is a scalar (a null node gives NULL). */
HUB_EXPORT const char *adp_conf_scalar(const struct adp_conf_node *n);
HUB_EXPORT bool adp_conf_is_null(const struct adp_conf_node *n);
/* Items of a sequence or entries of a mapping; 0 for anything else. */
HUB_EXPORT size_t adp_conf_len(const struct adp_conf_node *n);
/* The i-th item (sequence) or the i-th value (mapping, in file order); NULL out of range. */
HUB_EXPORT const struct adp_conf_node *adp_conf_at(const struct adp_conf_node *n, size_t i);
/* The i-th key of a mapping, as text or as its positioned node. */
HUB_EXPORT const char *adp_conf_key_at(const struct adp_conf_node *map, size_t i);
HUB_EXPORT const struct adp_conf_node *adp_conf_key_node_at(const struct adp_conf_node *map, size_t i);
/* The value under key in a mapping, or NULL (absent, or map is not a mapping). */
HUB_EXPORT const struct adp_conf_node *adp_conf_get(const struct adp_conf_node *map, const char *key);

/* Writes a short description of what a node is, for "found X" in messages: the scalar quoted
 * and escaped (shortened past 60 characters), "a mapping", "a sequence" or "null". */
HUB_EXPORT const char *adp_conf_describe(const struct adp_conf_node *n, char *buf, size_t size);

/* ---- typed readers ----------------------------------------------------------------------
 * Each takes the mapping, the key, whether the key is required, and the collector. They
 * write *ret only on success and return 0; -ENOENT when an optional key is absent or null
 * (ret untouched: the caller's default stands); -EINVAL after adding an error (a missing
 * required key is reported at the mapping). A NULL or null map counts as an empty mapping.
 * A map that is a scalar or a sequence gives -EINVAL without a message of its own: that is
 * reported once, by adp_conf_get_map() or adp_conf_check_keys(). */

/* Reports every key of map not in allowed (NULL-terminated), with a "did you mean" for a
 * key within edit distance 2 of an allowed one and the list of allowed keys. Also reports
 * a map that is not a mapping (a null map is fine: empty). A key K for which both K_file and
 * K_credential are allowed is left to adp_conf_get_secret() (an inline secret). Returns 0 or
 * -EINVAL. */
HUB_EXPORT int adp_conf_check_keys(const struct adp_conf_node *map, const char *const allowed[], struct adp_conf_errors *e);

/* Scalars only (a mapping or a sequence is an error). *ret borrows from the tree. */
HUB_EXPORT int adp_conf_get_string(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                        const char **ret);
/* true/false, yes/no, on/off, case-insensitive. */
HUB_EXPORT int adp_conf_get_bool(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                      bool *ret);
/* Decimal or 0x hex, optional sign; leading zeros are refused (YAML 1.1 reads them as octal). */
HUB_EXPORT int adp_conf_get_int(const struct adp_conf_node *map, const char *key, bool required, int64_t min, int64_t max,
                     struct adp_conf_errors *e, int64_t *ret);
HUB_EXPORT int adp_conf_get_uint(const struct adp_conf_node *map, const char *key, bool required, uint64_t min, uint64_t max,
                      struct adp_conf_errors *e, uint64_t *ret);
/* A finite decimal number. */
HUB_EXPORT int adp_conf_get_double(const struct adp_conf_node *map, const char *key, bool required, double min, double max,
                        struct adp_conf_errors *e, double *ret);
/* See adp_parse_duration(). */
HUB_EXPORT int adp_conf_get_duration(const struct adp_conf_node *map, const char *key, bool required, uint64_t min_usec,
                          uint64_t max_usec, struct adp_conf_errors *e, uint64_t *ret_usec);
/* See adp_parse_size(). */
HUB_EXPORT int adp_conf_get_size(const struct adp_conf_node *map, const char *key, bool required, uint64_t min_bytes,
                      uint64_t max_bytes, struct adp_conf_errors *e, uint64_t *ret_bytes);
/* One of names (NULL-terminated), exact match; *ret_index is its index. */
HUB_EXPORT int adp_conf_get_enum(const struct adp_conf_node *map, const char *key, bool required, const char *const names[],
                      struct adp_conf_errors *e, int *ret_index);
/* A sequence / a mapping node (borrowed). An optional null value counts as absent. */
HUB_EXPORT int adp_conf_get_seq(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                     const struct adp_conf_node **ret);
HUB_EXPORT int adp_conf_get_map(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                     const struct adp_conf_node **ret);

/* The same parsers on a bare node (a sequence item, say): 0, or -EINVAL after an error at
 * the node (a null node is an error too). */
HUB_EXPORT int adp_conf_parse_string(const struct adp_conf_node *n, struct adp_conf_errors *e, const char **ret);
HUB_EXPORT int adp_conf_parse_bool(const struct adp_conf_node *n, struct adp_conf_errors *e, bool *ret);
HUB_EXPORT int adp_conf_parse_int(const struct adp_conf_node *n, int64_t min, int64_t max, struct adp_conf_errors *e,
                       int64_t *ret);
HUB_EXPORT int adp_conf_parse_uint(const struct adp_conf_node *n, uint64_t min, uint64_t max, struct adp_conf_errors *e,
                        uint64_t *ret);
HUB_EXPORT int adp_conf_parse_double(const struct adp_conf_node *n, double min, double max, struct adp_conf_errors *e,
                          double *ret);
HUB_EXPORT int adp_conf_parse_duration(const struct adp_conf_node *n, uint64_t min_usec, uint64_t max_usec,
                            struct adp_conf_errors *e, uint64_t *ret_usec);
HUB_EXPORT int adp_conf_parse_size(const struct adp_conf_node *n, uint64_t min_bytes, uint64_t max_bytes,
                        struct adp_conf_errors *e, uint64_t *ret_bytes);
HUB_EXPORT int adp_conf_parse_enum(const struct adp_conf_node *n, const char *const names[], struct adp_conf_errors *e,
                        int *ret_index);

/* ---- pure string parsers (conf-units.c) -------------------------------------------------- */

/* A duration: one or more <integer><unit> parts, optionally separated by spaces, units us,
 * ms, s, min (or m), h, d: "250ms", "5s", "1h30m", "1h 30min", "7d". Returns 0; -EDOM for a
 * bare number (missing unit); -ERANGE on overflow; -EINVAL for anything else. */
HUB_EXPORT int adp_parse_duration(const char *s, uint64_t *ret_usec);
/* A size: <integer>[ ][unit], units B, kB (1000), KiB (1024), MB, MiB, GB, GiB, TB, TiB; a
 * bare number is bytes. Returns 0, -ERANGE on overflow, -EINVAL. */
HUB_EXPORT int adp_parse_size(const char *s, uint64_t *ret_bytes);
/* Formats a duration as the parser reads it, largest units first ("1h30min", "250ms", "0s"). */
HUB_EXPORT const char *adp_format_duration(uint64_t usec, char *buf, size_t size);
/* Formats a size exactly ("64MiB", "10kB", "1000B"). */
HUB_EXPORT const char *adp_format_size(uint64_t bytes, char *buf, size_t size);
/* Case-insensitive Levenshtein distance, capped at 255 (used for "did you mean"). */
HUB_EXPORT unsigned adp_edit_distance(const char *a, const char *b);

/* ---- secrets (conf-secret.c) ------------------------------------------------------------
 * Secrets are never written in the YAML. For base "key" the map holds either
 *     key_file: /absolute/path              or
 *     key_credential: name                  ($CREDENTIALS_DIRECTORY/name, systemd LoadCredential=)
 * Both given, or `key:` written inline, is an error. The file must be a regular file, have no
 * permission bits for others (mode & 0007), hold at most 4 KiB, and not be empty once
 * trailing whitespace is stripped. The secret's value is never put into an error message.
 * Returns 0 with *ret_secret a malloc'd NUL-terminated string (the caller wipes it with
 * hub_explicit_bzero() and frees it); -ENOENT when optional and neither key is given;
 * -EINVAL after adding an error; -ENOMEM. */
#define ADP_CONF_SECRET_MAX 4096
HUB_EXPORT int adp_conf_get_secret(const struct adp_conf_node *map, const char *base, bool required, struct adp_conf_errors *e,
                        char **ret_secret);
/* Same, and also returns the node of the `<base>_file` / `<base>_credential` value it read
 * (for later errors about the secret's content) and a description of the source for
 * messages (`"/etc/fieldhub/owner.key"` or `credential "owner.key"`, malloc'd). Either of
 * ret_node and ret_origin may be NULL. */
HUB_EXPORT int adp_conf_get_secret_full(const struct adp_conf_node *map, const char *base, bool required,
                             struct adp_conf_errors *e, char **ret_secret, const struct adp_conf_node **ret_node,
                             char **ret_origin);
