/* SPDX-License-Identifier: MIT */
#pragma once

/* Cryptographically secure random bytes for keys, generation ids and event ids: an mbedtls
 * CTR-DRBG (AES-256) seeded from getrandom(2), shared by the whole process behind a mutex,
 * reseeded at mbedtls' default interval and after fork(). */

#include <stddef.h>

#include "hub/macro.h"

/* Fills buf with n random bytes. Thread-safe; may block only at first use, until the kernel's
 * entropy pool is initialised. Returns 0, or -EIO when the generator cannot be seeded. */
HUB_EXPORT int hub_random_bytes(void *buf, size_t n);

/* Writes a fresh symmetric key: base64 of 32 random bytes (44 characters + NUL). Returns 0
 * or -EIO. */
HUB_EXPORT int hub_random_key(char ret_b64[static 45]);

/* Writes nbytes random bytes as 2*nbytes lower-case hex digits + NUL into buf (which must
 * hold 2*nbytes+1 bytes). Returns 0 or -EIO. */
HUB_EXPORT int hub_random_hex(char *buf, size_t nbytes);
