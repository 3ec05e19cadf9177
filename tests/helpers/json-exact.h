/* SPDX-License-Identifier: MIT */
#pragma once

/* json_equal() with reals compared bit for bit (json_equal() compares them with ==, so it
 * cannot tell -0.0 from 0.0), for the tests of hub_json_dumps(): test-json-dump and
 * fuzz-json-dump. *has_real (optional) is set when a real is met. */

#include <stdbool.h>
#include <string.h>

#include <jansson.h>

static inline bool json_exact_equal(const json_t *a, const json_t *b, bool *has_real) {
        if (json_typeof(a) != json_typeof(b))
                return false;
        switch (json_typeof(a)) {
        case JSON_REAL: {
                double x = json_real_value(a), y = json_real_value(b);
                if (has_real)
                        *has_real = true;
                return memcmp(&x, &y, sizeof x) == 0;
        }
        case JSON_ARRAY:
                if (json_array_size(a) != json_array_size(b))
                        return false;
                for (size_t i = 0; i < json_array_size(a); i++)
                        if (!json_exact_equal(json_array_get(a, i), json_array_get(b, i), has_real))
                                return false;
                return true;
        case JSON_OBJECT: {
                const char *k;
                size_t klen;
                json_t *v;

                if (json_object_size(a) != json_object_size(b))
                        return false;
                json_object_keylen_foreach ((json_t *) a, k, klen, v) {
                        json_t *w = json_object_getn(b, k, klen);
                        if (!w || !json_exact_equal(v, w, has_real))
                                return false;
                }
                return true;
        }
        default:
                return json_equal(a, b);
        }
}
