/* SPDX-License-Identifier: MIT */
#pragma once

/* Payload mapping of the CoAP client adapter: a resource's payload (raw text, JSON or CBOR)
 * into named points, and a point value into a payload for writes. Pure functions, no I/O;
 * fuzzed (tests/fuzz/fuzz-coap-map.c). Payloads come from field devices: every size and depth
 * is bounded. */

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define ADP_COAP_MAP_MAX_PAYLOAD (64u * 1024u) /* bytes decoded */
#define ADP_COAP_MAP_MAX_DEPTH 16u             /* nesting of arrays / maps */
#define ADP_COAP_MAP_MAX_PATH 256u             /* characters of a point path */

enum adp_coap_format {
        ADP_COAP_FORMAT_RAW,    /* the whole payload is one value: a number when it reads as one, else text */
        ADP_COAP_FORMAT_JSON,
        ADP_COAP_FORMAT_CBOR,   /* RFC 8949 through libcbor; byte strings become base64 text */
        _ADP_COAP_FORMAT_MAX,
};

/* "raw", "json", "cbor"; NULL out of range. */
const char *adp_coap_format_to_string(enum adp_coap_format f);
/* The inverse; -EINVAL. */
int adp_coap_format_from_string(const char *s);
/* The CoAP Content-Format of a format (0 text/plain, 50 JSON, 60 CBOR). */
unsigned adp_coap_format_content_format(enum adp_coap_format f);

/* A point: name, and for JSON / CBOR the path of its value in the document — keys and array
 * indexes separated by '.', e.g. "sensors.0.temp"; NULL or "" = the whole document. */
struct adp_coap_point {
        const char *name;
        const char *path;
};

/* Whether a path is well formed (1..ADP_COAP_MAP_MAX_PATH characters, no empty segment). */
int adp_coap_path_valid(const char *path);

/* Decodes a payload into a new JSON value. -EBADMSG malformed (invalid JSON / CBOR, trailing
 * bytes, a raw payload that is not UTF-8), -E2BIG over ADP_COAP_MAP_MAX_PAYLOAD or
 * ADP_COAP_MAP_MAX_DEPTH, -ENOMEM. */
int adp_coap_decode(enum adp_coap_format f, const uint8_t *data, size_t len, json_t **ret);

/* The value at path in v (borrowed), or NULL when absent. */
json_t *adp_coap_path_get(json_t *v, const char *path);

/* Decodes a payload and picks its points: *ret_points is a new object {name: value}, with
 * absent points left out and counted in *ret_missing (may be NULL). Errors as
 * adp_coap_decode(). */
int adp_coap_map(enum adp_coap_format f, const struct adp_coap_point *pts, size_t n_pts, const uint8_t *data,
                 size_t len, json_t **ret_points, size_t *ret_missing);

/* Encodes a value for a PUT / POST: raw = a scalar's text (strings as they are), JSON, CBOR.
 * *ret is malloc'd. -EINVAL raw with an object or array, -E2BIG too deep, -ENOMEM. */
int adp_coap_encode(enum adp_coap_format f, const json_t *v, uint8_t **ret, size_t *ret_len);
