/* SPDX-License-Identifier: MIT */
#pragma once

/* Shared by the MQTT load generators (mqtt-load.c, paho-pub.c): the latency histogram and
 * IoT Hub SAS tokens (reference §1: sr = url-encoded "<hub>/devices/<id>", HMAC-SHA256 of
 * "<sr>\n<se>" with the device key, base64, url-encoded). */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

/* Latency histogram: log2 buckets with HIST_SUB linear sub-buckets (~3 % resolution). */
#define HIST_SUB 32
#define HIST_BUCKETS (40 * HIST_SUB)

static inline unsigned hist_index(uint64_t v) {
        if (v < HIST_SUB)
                return (unsigned) v;
        unsigned e = 63 - (unsigned) __builtin_clzll(v); /* v >= 2^e, e >= 5 */
        unsigned sub = (unsigned) ((v >> (e - 5)) & (HIST_SUB - 1));
        unsigned i = (e - 4) * HIST_SUB + sub;
        return i < HIST_BUCKETS ? i : HIST_BUCKETS - 1;
}

static inline uint64_t hist_value(unsigned i) { /* upper bound of bucket i */
        if (i < HIST_SUB)
                return i;
        unsigned e = i / HIST_SUB + 4, sub = i % HIST_SUB;
        return ((uint64_t) (HIST_SUB + sub + 1) << (e - 5)) - 1;
}

static inline void bench_urlencode(const char *in, char *out, size_t size) {
        static const char hex[] = "0123456789ABCDEF";
        size_t n = 0;
        for (const unsigned char *p = (const unsigned char *) in; *p && n + 4 < size; p++) {
                if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                    *p == '-' || *p == '_' || *p == '.' || *p == '~')
                        out[n++] = (char) *p;
                else {
                        out[n++] = '%';
                        out[n++] = hex[*p >> 4];
                        out[n++] = hex[*p & 15];
                }
        }
        out[n] = 0;
}

/* A device SAS token valid for ttl seconds; false if HMAC fails. */
static inline bool bench_sas_token(const char *hub, const void *key, int key_len, int ttl, const char *dev,
                                   char *out, size_t size) {
        char res[512], sr[1024], sts[1100], sig64[128], sig[256];
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned mac_len = 0;
        long long se = (long long) time(NULL) + ttl;
        snprintf(res, sizeof res, "%s/devices/%s", hub, dev);
        bench_urlencode(res, sr, sizeof sr);
        int n = snprintf(sts, sizeof sts, "%s\n%lld", sr, se);
        if (!HMAC(EVP_sha256(), key, key_len, (const unsigned char *) sts, (size_t) n, mac, &mac_len))
                return false;
        EVP_EncodeBlock((unsigned char *) sig64, mac, (int) mac_len);
        bench_urlencode(sig64, sig, sizeof sig);
        snprintf(out, size, "SharedAccessSignature sr=%s&sig=%s&se=%lld", sr, sig, se);
        return true;
}
