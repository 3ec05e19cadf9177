/* SPDX-License-Identifier: MIT */
/* Twin patch fuzzer: the input is two JSON documents, a base section and a patch. The first
 * byte chooses the section kind (low 2 bits, mod 3), whether to merge or replace (bit 2) and,
 * with the rest of the input's length, the split point: base = data[1 .. 1+split),
 * patch = the remainder. The base is applied as a replacement to an empty section first (as
 * the store would hold it), then the patch; both must not crash, and whenever an operation is
 * accepted its result must pass hub_twin_check_limits() and its metadata must mirror the
 * section's keys. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/twin.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void must_pass(const json_t *section, const json_t *meta, enum hub_twin_section which) {
        char err[HUB_TWIN_ERROR_MAX];
        const char *key;
        json_t *v;

        if (hub_twin_check_limits(section, which, err, sizeof err) < 0) {
                fprintf(stderr, "accepted result fails the limits: %s\n", err);
                abort();
        }
        if (!meta)
                return;
        json_object_foreach ((json_t *) section, key, v) {
                if (!json_is_object(json_object_get(meta, key))) {
                        fprintf(stderr, "no metadata for key %s\n", key);
                        abort();
                }
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct hub_twin_stamp st = { .time = "2024-01-01T00:00:00.0000000Z", .version = 2 };
        char err[HUB_TWIN_ERROR_MAX];
        enum hub_twin_section which;
        json_t *base, *patch, *section, *meta = NULL, *restricted;
        size_t split;
        bool replace;

        if (size < 1 || size > 256 * 1024)
                return 0;
        which = (enum hub_twin_section) ((data[0] & 3) % 3);
        replace = data[0] & 4;
        split = (size - 1) * (size_t) (data[0] >> 3) / 31;

        base = json_loadb((const char *) data + 1, split, 0, NULL);
        patch = json_loadb((const char *) data + 1 + split, size - 1 - split, 0, NULL);
        if (!base || !patch)
                goto out;

        section = json_object();
        if (which != HUB_TWIN_SECTION_TAGS)
                meta = json_pack("{s:s}", "$lastUpdated", "0001-01-01T00:00:00Z");
        if (!section || (which != HUB_TWIN_SECTION_TAGS && !meta))
                abort();

        if (hub_twin_replace_apply(section, meta, base, which, &st, err, sizeof err) >= 0)
                must_pass(section, meta, which);
        else if (json_object_size(section) != 0) {
                fprintf(stderr, "rejected replacement changed the section\n");
                abort();
        }

        st.version = 3;
        if (replace) {
                if (hub_twin_replace_apply(section, meta, patch, which, &st, err, sizeof err) >= 0)
                        must_pass(section, meta, which);
        } else {
                json_t *before = json_deep_copy(section);
                if (hub_twin_patch_apply(section, meta, patch, which, &st, err, sizeof err) >= 0)
                        must_pass(section, meta, which);
                else if (!json_equal(before, section)) {
                        fprintf(stderr, "rejected patch changed the section\n");
                        abort();
                }
                json_decref(before);
        }
        restricted = hub_twin_meta_restrict(meta, patch);
        json_decref(restricted);
        (void) hub_twin_section_size(base);
        (void) hub_twin_check_patch(patch, which, err, sizeof err);

        json_decref(section);
        json_decref(meta);
out:
        json_decref(base);
        json_decref(patch);
        return 0;
}
