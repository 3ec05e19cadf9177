/* SPDX-License-Identifier: MIT */
/* hub_json_dumps() fuzzer: the first byte picks the flags (indentation, compact, ensure
 * ASCII, sort keys, escape slash), the rest is parsed with json_loadb(). For every document
 * that parses: the output must parse back to a tree equal to the input's, reals compared bit
 * for bit; when the tree holds no real it must be byte-identical to json_dumps(); when it
 * does, no longer than json_dumps(). */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/json-dump.h"
#include "json-exact.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static const size_t indents[] = { 0, 1, 2, 4 };
        size_t flags;
        json_t *in, *back;
        char *got, *want;
        bool has_real = false;

        if (size < 1 || size > 64 * 1024)
                return 0;
        flags = JSON_ENCODE_ANY | JSON_INDENT(indents[data[0] & 3]) | (data[0] & 4 ? JSON_COMPACT : 0) |
                (data[0] & 8 ? JSON_ENSURE_ASCII : 0) | (data[0] & 16 ? JSON_SORT_KEYS : 0) |
                (data[0] & 32 ? JSON_ESCAPE_SLASH : 0) | (data[0] & 64 ? JSON_PRESERVE_ORDER : 0);

        in = json_loadb((const char *) data + 1, size - 1, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (!in)
                return 0;

        got = hub_json_dumps(in, flags);
        want = json_dumps(in, flags);
        if (!got || !want) {
                fprintf(stderr, "a parsed document failed to encode (hub %p, jansson %p)\n", (void *) got,
                        (void *) want);
                abort();
        }
        back = json_loads(got, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
        if (!back || !json_exact_equal(in, back, &has_real)) {
                fprintf(stderr, "\"%s\" does not parse back to the input (jansson: \"%s\")\n", got, want);
                abort();
        }
        if (!has_real && strcmp(got, want) != 0) {
                fprintf(stderr, "without reals: hub \"%s\" != jansson \"%s\"\n", got, want);
                abort();
        }
        if (strlen(got) > strlen(want)) {
                fprintf(stderr, "hub \"%s\" longer than jansson \"%s\"\n", got, want);
                abort();
        }
        if (hub_json_dumpb(in, NULL, 0, flags) != strlen(got))
                abort();

        json_decref(back);
        json_decref(in);
        free(got);
        free(want);
        return 0;
}
