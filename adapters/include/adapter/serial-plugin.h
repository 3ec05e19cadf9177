/* SPDX-License-Identifier: MIT */
#pragma once

/* The serial adapter's plugin ABI, version 1: for instrument protocols that no YAML
 * declaration can describe (a framing with state, a compressed payload, a vendor checksum).
 *
 * A plugin is a shared object (built with -fPIC -shared) that exports one symbol,
 *
 *     const struct adp_serial_plugin *adp_serial_plugin_v1(void);
 *
 * which the adapter dlopen()s once per adapter (`plugins: {NAME: /path/to/plugin.so}`) and
 * calls at init (so --check-config validates it). The returned table must stay valid until
 * the object is unloaded. abi_version must be ADP_SERIAL_PLUGIN_ABI; a plugin built against
 * a later, incompatible ABI is refused with a clear error rather than called.
 *
 * Every function is optional (NULL), is called on the gateway's loop thread only, must not
 * block, and must not keep pointers into the buffers it is given. A device uses a plugin
 * with `framing: {type: plugin, plugin: NAME}`, a message `decode: plugin` (with
 * `plugin: NAME`) or a command `plugin: NAME`. Each device gets its own state from create().
 *
 * Compatibility rule: members are only ever appended; a new member is guarded by
 * struct_size (the adapter reads a member only when struct_size covers it). Changing a
 * member's meaning bumps ADP_SERIAL_PLUGIN_ABI and the exported symbol's suffix. */

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define ADP_SERIAL_PLUGIN_ABI 1u
#define ADP_SERIAL_PLUGIN_SYMBOL "adp_serial_plugin_v1"

/* Where decode() puts a frame's fields. name is copied; values are telemetry values. */
struct adp_serial_sink {
        void *ud;
        void (*number)(void *ud, const char *name, double value);
        void (*integer)(void *ud, const char *name, int64_t value);
        void (*boolean)(void *ud, const char *name, int value);
        void (*string)(void *ud, const char *name, const char *value, size_t len);
};

struct adp_serial_plugin {
        uint32_t abi_version;   /* ADP_SERIAL_PLUGIN_ABI */
        uint32_t struct_size;   /* sizeof(struct adp_serial_plugin) as the plugin was built */
        const char *name;       /* for messages */

        /* A device's private state. args is the device's `plugin_args` string (or NULL).
         * Returns 0 and *ret_state (may be NULL), or -errno (-EINVAL: bad args). */
        int (*create)(const char *args, void **ret_state);
        void (*destroy)(void *state);

        /* Framing: looks for one frame at the start of buf[0..len). Returns
         *   > 0   a complete frame of that many bytes starts at buf[*ret_skip]: the adapter
         *         drops the *ret_skip bytes before it (garbage) and the frame;
         *   0     no complete frame yet: the adapter drops *ret_skip garbage bytes (may be
         *         0) and calls again when more bytes arrive;
         *   < 0   -errno: a broken stream; the adapter drops max(*ret_skip, 1) bytes.
         * *ret_skip is 0 when frame() does not set it. A frame must not exceed len. */
        ssize_t (*frame)(void *state, const uint8_t *buf, size_t len, size_t *ret_skip);

        /* Decoding: turns one frame (already checked) into fields through sink. Returns 0,
         * or -errno (-EBADMSG: not a frame this plugin understands; counted, not forwarded). */
        int (*decode)(void *state, const uint8_t *frame, size_t len, const struct adp_serial_sink *sink);

        /* Encoding: turns a command (its name and its arguments, a JSON text, "null" when
         * none) into the bytes to send, framing included. Returns the number of bytes written
         * to out (at most size), -ENOBUFS when size is too small, -EINVAL for bad arguments,
         * -EOPNOTSUPP for an unknown command. */
        ssize_t (*encode)(void *state, const char *command, const char *json_args, uint8_t *out, size_t size);
};

typedef const struct adp_serial_plugin *(*adp_serial_plugin_entry_fn)(void);
