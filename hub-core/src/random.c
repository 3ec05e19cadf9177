/* SPDX-License-Identifier: MIT */
/* A process-wide CTR-DRBG. mbedtls' own entropy collector is given getrandom(2) as a strong
 * source; the DRBG is created on first use, protected by one mutex (generation is cheap
 * compared with everything that asks for it: key creation, event ids) and re-seeded from
 * scratch in a child after fork(), so parent and child never share a stream. */

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <mbedtls/base64.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>

#include "hub/random.h"

static pthread_mutex_t random_lock = PTHREAD_MUTEX_INITIALIZER;
static bool random_ready;
static pid_t random_pid;
static mbedtls_entropy_context random_entropy;
static mbedtls_ctr_drbg_context random_drbg;

static int getrandom_source(void *data, unsigned char *output, size_t len, size_t *olen) {
        size_t done = 0;

        (void) data;
        while (done < len) {
                ssize_t k = getrandom(output + done, len - done, 0);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return MBEDTLS_ERR_ENTROPY_SOURCE_FAILED;
                }
                done += (size_t) k;
        }
        *olen = done;
        return 0;
}

static void random_teardown_locked(void) {
        if (!random_ready)
                return;
        mbedtls_ctr_drbg_free(&random_drbg);
        mbedtls_entropy_free(&random_entropy);
        random_ready = false;
}

static int random_setup_locked(void) {
        static const char personalisation[] = "fieldhub hub-core random";
        pid_t pid = getpid();

        if (random_ready && random_pid == pid)
                return 0;
        random_teardown_locked(); /* forked child: start a fresh, independently seeded DRBG */

        mbedtls_entropy_init(&random_entropy);
        mbedtls_ctr_drbg_init(&random_drbg);
        if (mbedtls_entropy_add_source(&random_entropy, getrandom_source, NULL, 32,
                                       MBEDTLS_ENTROPY_SOURCE_STRONG) != 0 ||
            mbedtls_ctr_drbg_seed(&random_drbg, mbedtls_entropy_func, &random_entropy,
                                  (const unsigned char *) personalisation,
                                  sizeof personalisation - 1) != 0) {
                mbedtls_ctr_drbg_free(&random_drbg);
                mbedtls_entropy_free(&random_entropy);
                return -EIO;
        }
        /* Prediction resistance off: reseed every MBEDTLS_CTR_DRBG_RESEED_INTERVAL requests,
         * mbedtls' default. */
        random_ready = true;
        random_pid = pid;
        return 0;
}

int hub_random_bytes(void *buf, size_t n) {
        unsigned char *p = buf;
        int r;

        if (n > 0 && !buf)
                return -EINVAL;

        pthread_mutex_lock(&random_lock);
        r = random_setup_locked();
        while (r >= 0 && n > 0) {
                size_t chunk = MIN(n, (size_t) MBEDTLS_CTR_DRBG_MAX_REQUEST);
                if (mbedtls_ctr_drbg_random(&random_drbg, p, chunk) != 0) {
                        r = -EIO;
                        break;
                }
                p += chunk;
                n -= chunk;
        }
        pthread_mutex_unlock(&random_lock);
        return r < 0 ? r : 0;
}

int hub_random_key(char ret_b64[static 45]) {
        unsigned char raw[32];
        char out[45];
        size_t olen = 0;
        int r;

        r = hub_random_bytes(raw, sizeof raw);
        if (r < 0)
                return r;
        r = mbedtls_base64_encode((unsigned char *) out, sizeof out, &olen, raw, sizeof raw);
        hub_explicit_bzero(raw, sizeof raw);
        if (r != 0 || olen != 44) {
                hub_explicit_bzero(out, sizeof out);
                return -EIO;
        }
        out[44] = '\0';
        memcpy(ret_b64, out, sizeof out);
        hub_explicit_bzero(out, sizeof out);
        return 0;
}

int hub_random_hex(char *buf, size_t nbytes) {
        static const char hex[] = "0123456789abcdef";
        unsigned char raw[64];
        size_t done = 0;

        if (!buf)
                return -EINVAL;
        while (done < nbytes) {
                size_t chunk = MIN(nbytes - done, sizeof raw);
                int r = hub_random_bytes(raw, chunk);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < chunk; i++) {
                        buf[2 * (done + i)] = hex[raw[i] >> 4];
                        buf[2 * (done + i) + 1] = hex[raw[i] & 0xf];
                }
                done += chunk;
        }
        buf[2 * nbytes] = '\0';
        return 0;
}
