/* SPDX-License-Identifier: MIT */
/* SAS tokens come from the network (MQTT passwords, HTTP Authorization headers, AMQP CBS
 * bodies): parse arbitrary bytes as a token, and percent-decode them both ways. Every
 * successful parse must satisfy the parser's contract. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hub/auth.h"
#include "hub/urlenc.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct hub_sas_token t = {};
        char *s, *dec = NULL;
        uint8_t *raw = NULL;
        size_t rawlen = 0;

        if (size > 2 * HUB_SAS_TOKEN_MAX)
                return 0;
        s = malloc(size + 1);
        if (!s)
                return 0;
        memcpy(s, data, size);
        s[size] = '\0';

        if (hub_sas_parse(s, &t) == 0) {
                /* contract: sr, sig present; sr is a raw substring of the input */
                if (!t.sr || !t.sig || !*t.sr || !strstr(s, t.sr))
                        abort();
                hub_sas_token_done(&t);
                if (t.sr || t.sig || t.skn)
                        abort();
        }

        for (int plus = 0; plus < 2; plus++) {
                if (hub_url_decode(s, size, plus, &dec) == 0) {
                        char *enc = NULL;
                        if (strlen(dec) > size)
                                abort();
                        /* encode then decode gives the decoded string back */
                        if (hub_url_encode(dec, &enc) == 0) {
                                char *again = NULL;
                                if (hub_url_decode(enc, strlen(enc), false, &again) != 0 || strcmp(again, dec) != 0)
                                        abort();
                                free(again);
                                free(enc);
                        }
                        free(dec);
                        dec = NULL;
                }
        }

        if (hub_base64_decode(s, size, &raw, &rawlen) == 0) {
                char *enc = NULL;
                /* strict base64 is canonical up to the padding bits */
                if (hub_base64_encode(raw, rawlen, &enc) != 0 || strlen(enc) != size)
                        abort();
                free(enc);
                free(raw);
        }

        free(s);
        return 0;
}
