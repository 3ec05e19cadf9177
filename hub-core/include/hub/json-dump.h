/* SPDX-License-Identifier: MIT */
#pragma once

/* JSON encoding with the shortest round-tripping reals. jansson 2.14 writes every real with
 * "%.17g", so a reported 18.9 comes back as 18.899999999999999; IoT Hub writes the shortest
 * decimal that parses back to the same double (18.9). These functions are drop-in
 * replacements for json_dumps() / json_dumpb() / json_dumpf() / json_dump_callback(): for
 * the flags below they produce exactly jansson's bytes (key order, indentation, separators,
 * string escapes, integers, the same failures on invalid UTF-8 or circular references),
 * except that a real is written as the shortest of its "%.15g", "%.16g" and "%.17g"
 * renderings that strtod() turns back into the identical double (the lowest precision on a
 * tie), with jansson's finishing: ".0" appended when there is no '.' or 'e', the exponent's
 * '+' and leading zeros removed ("1e+22" -> "1e22", "1e-07" -> "1e-7"), the locale's decimal
 * point written as '.'. The result is never longer than jansson's for the same real. */

#include <stddef.h>
#include <stdio.h>

#include <jansson.h>

#include "hub/macro.h"

/* The flags these functions implement: JSON_INDENT(0..31), JSON_COMPACT, JSON_ENSURE_ASCII,
 * JSON_SORT_KEYS, JSON_PRESERVE_ORDER (a no-op since jansson 2.8), JSON_ENCODE_ANY and
 * JSON_ESCAPE_SLASH. Any other bit (JSON_REAL_PRECISION(n), JSON_EMBED, unknown bits) makes
 * them fail as if the value could not be encoded. */
#define HUB_JSON_DUMP_FLAGS                                                                     \
        ((size_t) (JSON_MAX_INDENT | JSON_COMPACT | JSON_ENSURE_ASCII | JSON_SORT_KEYS |        \
                   JSON_PRESERVE_ORDER | JSON_ENCODE_ANY | JSON_ESCAPE_SLASH))

/* As json_dump_callback(): hands the encoding of json to callback in pieces. Returns 0, or
 * -1 when json is NULL, is neither an object nor an array without JSON_ENCODE_ANY, holds a
 * string with invalid UTF-8 (json_string_nocheck), a non-finite real or a circular
 * reference, when flags has a bit outside HUB_JSON_DUMP_FLAGS, on allocation failure, or
 * when callback returns non-zero (output stops there; what was handed over stays). */
HUB_EXPORT int hub_json_dump_callback(const json_t *json, json_dump_callback_t callback, void *data,
                                      size_t flags);

/* As json_dumps(): a new NUL-terminated malloc'd string (release with free()), or NULL on
 * any failure listed at hub_json_dump_callback(). */
HUB_EXPORT char *hub_json_dumps(const json_t *json, size_t flags);

/* As json_dumpb(): writes the encoding (no NUL) into buffer when it fits in size bytes, and
 * returns its length either way (so a call with size 0 and buffer NULL measures it). When
 * the return value exceeds size, buffer holds some prefix of it. Returns 0 on failure. */
HUB_EXPORT size_t hub_json_dumpb(const json_t *json, char *buffer, size_t size, size_t flags);

/* As json_dumpf(): writes the encoding to output. Returns 0, or -1 on failure (including a
 * short fwrite()). */
HUB_EXPORT int hub_json_dumpf(const json_t *json, FILE *output, size_t flags);
