/* SPDX-License-Identifier: MIT */
#pragma once

/* X.509 device authentication (reference §1.8), shared by the device front-ends (MQTT, the
 * HTTP device API): a TLS client certificate judged against the device's registry entry.
 *
 *  - selfSigned: the leaf's SHA-1 (40 hex digits) or SHA-256 (64 hex digits) fingerprint over
 *    its DER encoding equals the primary or the secondary thumbprint, case-insensitively;
 *  - certificateAuthority: the chain the device sent validates against the CA certificates of
 *    hub.x509_ca_files, and the leaf's subject CN is the device id ("deviceId/moduleId" for a
 *    module);
 *  - in both cases the leaf's validity period includes now.
 *
 * Runs on the loop thread; no I/O except gw_auth_x509_load_ca(). */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <mbedtls/x509_crt.h>

struct hub_device;

/* Checks crt (the peer's leaf, with the rest of the chain it sent linked behind it; borrowed)
 * whose DER encoding is der/der_len, presented for device d (and module_id, NULL for the
 * device itself). ca_chain: the configured CAs, NULL when none is configured. Returns NULL
 * when the certificate is accepted, else a static reason safe to log (it never holds key
 * material). crt NULL gives "no client certificate". */
const char *gw_auth_x509_check(const mbedtls_x509_crt *crt, const uint8_t *der, size_t der_len,
                               const struct hub_device *d, const char *module_id, mbedtls_x509_crt *ca_chain);

/* Loads every PEM/DER file of files (NULL-terminated; may be NULL) into chain (initialised by
 * the caller). *ret_loaded is true when at least one file was loaded. Logs the file that
 * cannot be read and returns -EBADMSG (mbedtls error) or -ENOMEM. Blocks (file reads). */
int gw_auth_x509_load_ca(char *const *files, mbedtls_x509_crt *chain, bool *ret_loaded);
