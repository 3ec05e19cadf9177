/* SPDX-License-Identifier: MIT */
/* hub_msg_deserialize() reads bytes from disk: anything it accepts must re-encode to the
 * very same bytes (the encoding is canonical), and nothing may crash it. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hub/msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct hub_msg *m = NULL;
        uint8_t *out = NULL;
        size_t out_len = 0;
        int r;

        r = hub_msg_deserialize(data, size, HUB_MSG_D2C_MAX_SIZE, &m);
        if (r < 0) {
                if (r != -EBADMSG && r != -ENOMEM)
                        abort(); /* malformed input must be -EBADMSG */
                if (m)
                        abort();
                return 0;
        }

        if (hub_msg_size(m) > HUB_MSG_D2C_MAX_SIZE)
                abort();
        if (hub_msg_serialize(m, &out, &out_len) < 0)
                abort();
        if (out_len != size || memcmp(out, data, size) != 0)
                abort();

        free(out);
        hub_msg_unref(m);
        return 0;
}
