/* SPDX-License-Identifier: MIT */
#pragma once

/* Shared access signature tokens (reference §1.2–1.7): parsing, signing, generation and the
 * hub-side verification against the identity registry.
 *
 * Nothing here ever logs or returns a key, a signature or a token: failures are reported as
 * an enum hub_auth_failure whose string is safe to log. */

#include <stdbool.h>
#include <stdint.h>

#include "hub/macro.h"

struct hub_registry;

/* Longest token accepted; longer ones are malformed. */
#define HUB_SAS_TOKEN_MAX 4096u
/* Allowed clock skew past se (reference §1.5 step 3). */
#define HUB_SAS_EXPIRY_SKEW_USEC (UINT64_C(300) * UINT64_C(1000000))

/* Shared access rights (reference §1.6). */
enum {
        HUB_RIGHT_REGISTRY_READ = 1u << 0,
        HUB_RIGHT_REGISTRY_WRITE = 1u << 1,
        HUB_RIGHT_SERVICE_CONNECT = 1u << 2,
        HUB_RIGHT_DEVICE_CONNECT = 1u << 3,
        HUB_RIGHTS_ALL = (1u << 4) - 1,
};

struct hub_sas_token {
        char *sr;  /* raw, exactly as received (still percent-encoded) */
        char *sig; /* percent-decoded base64 text (a literal "+" kept as "+") */
        uint64_t se;
        char *skn; /* percent-decoded policy name, NULL if absent */
};

/* Parses "SharedAccessSignature sr=...&sig=...&se=...[&skn=...]" (exactly one whitespace
 * after the prefix; fields split on "&", each at its first "="; field names
 * case-insensitive; unknown fields ignored). -EBADMSG when the token is malformed: no
 * prefix, empty or "="-less field, missing or duplicate sr/sig/se, duplicate skn, bad
 * percent escapes, se not a decimal integer, longer than HUB_SAS_TOKEN_MAX. -ENOMEM.
 * On success *ret is filled (release with hub_sas_token_done()); on failure it is untouched. */
HUB_EXPORT int hub_sas_parse(const char *token, struct hub_sas_token *ret);
/* Frees and wipes the token's fields. Safe on a zeroed or already-done struct. */
HUB_EXPORT void hub_sas_token_done(struct hub_sas_token *t);

/* Writes base64(HMAC-SHA256(base64_decode(key_b64), sr_raw "\n" se)) (44 chars + NUL).
 * sr_raw is used byte for byte. -EINVAL when the key is not strict base64 of 16..64 bytes. */
HUB_EXPORT int hub_sas_sign(const char *sr_raw, uint64_t se, const char *key_b64, char ret_sig_b64[static 45]);

/* Builds a token for resource_uri (unencoded, e.g. "gw.example.local/devices/dev1"; it is
 * percent-encoded with hub_url_encode()), signed with key_b64, expiring at se (seconds since
 * the epoch), with skn=policy when policy is not NULL. *ret_token is a new malloc'd string.
 * -EINVAL (bad key, empty resource), -ENOMEM. */
HUB_EXPORT int hub_sas_generate(const char *resource_uri, const char *key_b64, uint64_t se, const char *policy,
                                char **ret_token);

enum hub_auth_failure {
        HUB_AUTH_OK,
        HUB_AUTH_MALFORMED,
        HUB_AUTH_EXPIRED,
        HUB_AUTH_WRONG_HOST,
        HUB_AUTH_WRONG_SCOPE,
        HUB_AUTH_UNKNOWN_POLICY,
        HUB_AUTH_UNKNOWN_DEVICE,
        HUB_AUTH_DEVICE_DISABLED,
        HUB_AUTH_WRONG_AUTH_TYPE,
        HUB_AUTH_BAD_SIGNATURE,
        HUB_AUTH_INSUFFICIENT_RIGHTS,
        _HUB_AUTH_FAILURE_MAX,
};

/* Short words for logs ("ok", "malformed token", "expired", "wrong scope", ...). Never NULL. */
HUB_EXPORT const char *hub_auth_failure_to_string(enum hub_auth_failure f);

struct hub_auth_request {
        const char *token;
        const char *const *host_names; /* NULL-terminated: host_name then aliases; matched case-insensitively */
        const char *device_id;         /* identity the connection claims (NULL for service-side requests) */
        const char *module_id;         /* NULL for devices */
        unsigned required_rights;      /* e.g. HUB_RIGHT_DEVICE_CONNECT, or HUB_RIGHT_REGISTRY_READ */
        uint64_t now_usec;             /* wall clock */
};

struct hub_auth_result {
        enum hub_auth_failure failure;
        unsigned rights;   /* granted */
        bool policy;       /* authenticated with a shared access policy */
        char policy_name[65];
        bool secondary_key; /* matched the secondary key */
        uint64_t expiry_usec; /* se, so connections can be closed at expiry (saturated) */
};

/* Verifies a SAS token (reference §1.5):
 *   1. parse (MALFORMED);  2. se + 300 s < now (EXPIRED);
 *   3. sr percent-decoded once and split on "/": segment 0 must equal one of host_names,
 *      case-insensitively (WRONG_HOST); the rest must be "", "devices", "devices/{id}" or
 *      "devices/{id}/modules/{mid}" (else WRONG_SCOPE);
 *   4. the claimed identity must be covered by sr, by whole segments, ids compared
 *      case-insensitively (WRONG_SCOPE). Hub scope ("host" or "host/devices") is accepted
 *      only with skn. A request with device_id NULL (service side) needs hub scope;
 *      service-side calls about one device may pass its id to allow device-scoped tokens;
 *   5. with skn: the policy (UNKNOWN_POLICY), its rights; without: the device named by the
 *      request (looked up case-sensitively, with the request's spelling), which must exist
 *      (UNKNOWN_DEVICE), be enabled (DEVICE_DISABLED) and use SAS (WRONG_AUTH_TYPE); rights
 *      are DEVICE_CONNECT only. Module-scoped device-key tokens, and device-key tokens
 *      claiming a module, give WRONG_SCOPE (the registry has no module identities yet);
 *   6. HMAC over sr as received with the primary key, then the secondary, compared in
 *      constant time (BAD_SIGNATURE);
 *   7. the granted rights must include required_rights (INSUFFICIENT_RIGHTS).
 * With a policy token, the claimed device is not looked up: the policy is what is
 * authenticated, and the caller decides what an unknown or disabled device means for it.
 * Returns 0 when allowed, -EACCES when denied; in both cases *ret is written (failure set).
 * Other -errno (-ENOMEM, store errors) on internal failure, *ret untouched. Reads the store
 * on the caller's thread (the registry's owner thread). */
HUB_EXPORT int hub_auth_check_sas(struct hub_registry *r, const struct hub_auth_request *req,
                                  struct hub_auth_result *ret);
