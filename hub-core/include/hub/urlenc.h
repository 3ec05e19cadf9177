/* SPDX-License-Identifier: MIT */
#pragma once

/* Percent-encoding as the IoT Hub SDKs do it (reference §1.4) and strict base64. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/macro.h"

/* Percent-encodes every byte of s except A-Z a-z 0-9 - _ . ~, with upper-case hex digits
 * ("/" -> "%2F"). *ret is a new malloc'd string. Returns 0 or -ENOMEM (-EINVAL if s NULL). */
HUB_EXPORT int hub_url_encode(const char *s, char **ret);

/* Decodes len bytes of s: "%XY" (either hex case) becomes the byte; "+" becomes a space when
 * plus_is_space (form encoding), else stays "+". *ret is a new NUL-terminated malloc'd
 * string. -EINVAL on a truncated or non-hex escape, or when the result would contain a NUL
 * byte (an escaped "%00" or a raw NUL within len); -ENOMEM. */
HUB_EXPORT int hub_url_decode(const char *s, size_t len, bool plus_is_space, char **ret);

/* Standard base64 (RFC 4648 alphabet, with padding) of len bytes. *ret is a new malloc'd
 * string. Returns 0 or -ENOMEM. */
HUB_EXPORT int hub_base64_encode(const void *data, size_t len, char **ret);

/* Strict standard base64 decoding of len characters of s: length a multiple of 4, only the
 * alphabet, "=" only as one or two final padding characters, no whitespace. *ret is a new
 * malloc'd buffer (NUL-terminated for convenience, not counted in *ret_len). -EINVAL on
 * malformed input, -ENOMEM. */
HUB_EXPORT int hub_base64_decode(const char *s, size_t len, uint8_t **ret, size_t *ret_len);

/* As hub_base64_decode(), into a caller buffer (for secrets: nothing is left on the heap).
 * -EINVAL malformed, -ENOBUFS when the decoded data exceeds size. On failure buf may have
 * been written to and is wiped. */
HUB_EXPORT int hub_base64_decode_buf(const char *s, size_t len, void *buf, size_t size, size_t *ret_len);

/* Whether len characters of s are valid strict base64 (see above); on true, *ret_decoded_len
 * (may be NULL) is the decoded length. */
HUB_EXPORT bool hub_base64_valid(const char *s, size_t len, size_t *ret_decoded_len);
