/* SPDX-License-Identifier: MIT */
/* The serial adapter's configuration: every key of an `adapters[i]` item of type serial,
 * validated with file:line:col errors (configs/README.md, "Serial adapter"). */

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "serial-internal.h"

#define USEC_PER_MSEC 1000ull
#define USEC_PER_SEC_ 1000000ull
#define FRAME_MAX_I ((int64_t) ADP_SERIAL_FRAME_MAX)

static char *xstrdup(const char *s) {
        return s ? strdup(s) : NULL;
}

/* Reads a byte string (with escapes) under key. 0, -ENOENT absent, -EINVAL. */
static int get_bytes(const struct adp_conf_node *map, const char *key, bool required, size_t min, uint8_t *out,
                     size_t cap, size_t *ret_len, struct adp_conf_errors *e) {
        const char *s;
        int r = adp_conf_get_string(map, key, required, e, &s);
        if (r < 0)
                return r;
        size_t n;
        r = adp_serial_parse_bytes(s, out, cap, &n);
        if (r == -E2BIG) {
                adp_conf_error(e, adp_conf_get(map, key), "longer than %zu bytes", cap);
                return -EINVAL;
        }
        if (r < 0) {
                adp_conf_error(e, adp_conf_get(map, key),
                               "bad escape: use \\r \\n \\t \\0 \\\\ or \\xHH (two hex digits); write the string in "
                               "single quotes so that YAML leaves the backslashes alone");
                return -EINVAL;
        }
        if (n < min) {
                adp_conf_error(e, adp_conf_get(map, key), "must be at least %zu byte(s)", min);
                return -EINVAL;
        }
        *ret_len = n;
        return 0;
}

static int get_byte(const struct adp_conf_node *map, const char *key, bool required, uint8_t *ret,
                    struct adp_conf_errors *e) {
        const struct adp_conf_node *n = adp_conf_get(map, key);
        if (!n || adp_conf_is_null(n)) {
                if (required)
                        return adp_conf_get_uint(map, key, true, 0, 255, e, &(uint64_t){ 0 });
                return -ENOENT;
        }
        const char *s = adp_conf_scalar(n);
        uint8_t b[4];
        size_t len;
        /* A number (0x02, 2) or a one-byte string ('\x02', '$'). */
        if (s && ((s[0] >= '0' && s[0] <= '9') && strlen(s) > 1)) {
                uint64_t v;
                int r = adp_conf_get_uint(map, key, required, 0, 255, e, &v);
                if (r < 0)
                        return r;
                *ret = (uint8_t) v;
                return 0;
        }
        int r = get_bytes(map, key, required, 1, b, sizeof b, &len, e);
        if (r < 0)
                return r;
        if (len != 1) {
                adp_conf_error(e, n, "must be one byte (a number 0..255, or one character such as '\\x02')");
                return -EINVAL;
        }
        *ret = b[0];
        return 0;
}

static int get_byte_order(const struct adp_conf_node *map, bool dflt_little, bool *ret, struct adp_conf_errors *e) {
        static const char *const orders[] = { "big", "little", NULL };
        int i = dflt_little ? 1 : 0;
        int r = adp_conf_get_enum(map, "byte_order", false, orders, e, &i);
        if (r == -EINVAL)
                return r;
        *ret = i == 1;
        return 0;
}

static int parse_port(const struct adp_conf_node *dev, struct adp_serial_port_conf *pc, struct adp_conf_errors *e) {
        static const char *const keys[] = { "device", "baud", "parity", "data_bits", "stop_bits", "flow_control",
                                            "rs485", NULL };
        static const char *const parities[] = { "none", "even", "odd", NULL };
        static const char *const flows[] = { "none", "rtscts", "xonxoff", NULL };
        static const unsigned bauds[] = { 300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400,
                                          460800, 500000, 576000, 921600, 1000000, 1152000, 1500000, 2000000,
                                          3000000, 4000000 };
        const struct adp_conf_node *port = NULL;
        int bad = 0;
        if (adp_conf_get_map(dev, "port", true, e, &port) < 0)
                return -EINVAL;
        bad |= adp_conf_check_keys(port, keys, e);
        const char *s = NULL;
        if (adp_conf_get_string(port, "device", true, e, &s) < 0)
                bad = -EINVAL;
        else if (s[0] != '/') {
                adp_conf_error(e, adp_conf_get(port, "device"), "must be an absolute path (/dev/ttyUSB0, "
                               "/dev/serial/by-id/...), found \"%s\"", s);
                bad = -EINVAL;
        } else if (!(pc->device = strdup(s)))
                return -ENOMEM;
        uint64_t v = 9600;
        if (adp_conf_get_uint(port, "baud", false, 50, 4000000, e, &v) == -EINVAL)
                bad = -EINVAL;
        else {
                bool ok = false;
                for (size_t i = 0; i < ELEMENTSOF(bauds); i++)
                        ok |= bauds[i] == v;
                if (!ok) {
                        adp_conf_error(e, adp_conf_get(port, "baud"), "%llu is not a standard rate (300 ... 4000000, "
                                       "e.g. 4800, 9600, 19200, 38400, 57600, 115200)", (unsigned long long) v);
                        bad = -EINVAL;
                }
                pc->baud = (unsigned) v;
        }
        int p = 0;
        if (adp_conf_get_enum(port, "parity", false, parities, e, &p) == -EINVAL)
                bad = -EINVAL;
        pc->parity = "NEO"[p];
        v = 8;
        if (adp_conf_get_uint(port, "data_bits", false, 5, 8, e, &v) == -EINVAL)
                bad = -EINVAL;
        pc->data_bits = (unsigned) v;
        v = 1;
        if (adp_conf_get_uint(port, "stop_bits", false, 1, 2, e, &v) == -EINVAL)
                bad = -EINVAL;
        pc->stop_bits = (unsigned) v;
        int f = 0;
        if (adp_conf_get_enum(port, "flow_control", false, flows, e, &f) == -EINVAL)
                bad = -EINVAL;
        pc->flow = (enum adp_serial_flow) f;
        if (adp_conf_get_bool(port, "rs485", false, e, &pc->rs485) == -EINVAL)
                bad = -EINVAL;

        pc->reopen_min_usec = 500 * USEC_PER_MSEC;
        pc->reopen_max_usec = 30 * USEC_PER_SEC_;
        const struct adp_conf_node *ro = NULL;
        static const char *const rkeys[] = { "min", "max", NULL };
        int r = adp_conf_get_map(dev, "reopen", false, e, &ro);
        if (r == -EINVAL)
                bad = -EINVAL;
        else if (r >= 0) {
                bad |= adp_conf_check_keys(ro, rkeys, e);
                if (adp_conf_get_duration(ro, "min", false, 10 * USEC_PER_MSEC, 3600 * USEC_PER_SEC_, e,
                                          &pc->reopen_min_usec) == -EINVAL ||
                    adp_conf_get_duration(ro, "max", false, 10 * USEC_PER_MSEC, 3600 * USEC_PER_SEC_, e,
                                          &pc->reopen_max_usec) == -EINVAL)
                        bad = -EINVAL;
                else if (pc->reopen_max_usec < pc->reopen_min_usec) {
                        adp_conf_error(e, ro, "max must not be below min");
                        bad = -EINVAL;
                }
        }
        return bad ? -EINVAL : 0;
}

static const struct adp_serial_plugin *find_plugin(const struct adp_serial_config *c, const struct adp_conf_node *map,
                                                   const char *key, struct adp_conf_errors *e) {
        const char *name;
        if (adp_conf_get_string(map, key, true, e, &name) < 0)
                return NULL;
        for (size_t i = 0; i < c->n_plugins; i++)
                if (streq(c->plugins[i].name, name))
                        return c->plugins[i].p;
        adp_conf_error(e, adp_conf_get(map, key), "no plugin named \"%s\" in this adapter's `plugins:`", name);
        return NULL;
}

static int parse_framing(const struct adp_serial_config *c, const struct adp_conf_node *dev,
                         struct adp_serial_framing *f, struct adp_conf_errors *e) {
        static const char *const keys[] = { "type", "delimiter", "max_length", "idle_timeout", "length", "sync",
                                            "length_offset", "length_size", "length_byte_order", "length_counts",
                                            "length_adjust", "start", "end", "escape", "escape_xor", "plugin", NULL };
        const struct adp_conf_node *fr = NULL;
        int bad = 0, t = ADP_SERIAL_FRAME_LINE;
        if (adp_conf_get_map(dev, "framing", true, e, &fr) < 0)
                return -EINVAL;
        bad |= adp_conf_check_keys(fr, keys, e);
        if (adp_conf_get_enum(fr, "type", true, adp_serial_framing_names, e, &t) < 0)
                return -EINVAL;
        f->type = (enum adp_serial_framing_type) t;
        uint64_t v = 1024;
        if (adp_conf_get_size(fr, "max_length", false, 1, ADP_SERIAL_FRAME_MAX, e, &v) == -EINVAL)
                bad = -EINVAL;
        f->max_length = (size_t) v;
        if (adp_conf_get_duration(fr, "idle_timeout", false, 1, 60 * USEC_PER_SEC_, e, &f->idle_usec) == -EINVAL)
                bad = -EINVAL;

        /* Keys that belong to other framings are refused, so a typo in `type` is not silent. */
        static const struct { const char *key; unsigned types; } only[] = {
                { "delimiter", 1u << ADP_SERIAL_FRAME_LINE },
                { "length", 1u << ADP_SERIAL_FRAME_FIXED },
                { "sync", (1u << ADP_SERIAL_FRAME_FIXED) | (1u << ADP_SERIAL_FRAME_LENGTH) },
                { "length_offset", 1u << ADP_SERIAL_FRAME_LENGTH }, { "length_size", 1u << ADP_SERIAL_FRAME_LENGTH },
                { "length_byte_order", 1u << ADP_SERIAL_FRAME_LENGTH },
                { "length_counts", 1u << ADP_SERIAL_FRAME_LENGTH }, { "length_adjust", 1u << ADP_SERIAL_FRAME_LENGTH },
                { "start", 1u << ADP_SERIAL_FRAME_MARKERS }, { "end", 1u << ADP_SERIAL_FRAME_MARKERS },
                { "escape", 1u << ADP_SERIAL_FRAME_MARKERS }, { "escape_xor", 1u << ADP_SERIAL_FRAME_MARKERS },
                { "plugin", 1u << ADP_SERIAL_FRAME_PLUGIN },
        };
        for (size_t i = 0; i < ELEMENTSOF(only); i++)
                if (adp_conf_get(fr, only[i].key) && !(only[i].types & (1u << t))) {
                        adp_conf_error(e, adp_conf_get(fr, only[i].key), "not used by framing type %s",
                                       adp_serial_framing_names[t]);
                        bad = -EINVAL;
                }

        switch (f->type) {
        case ADP_SERIAL_FRAME_LINE: {
                int r = get_bytes(fr, "delimiter", false, 1, f->delim, sizeof f->delim, &f->delim_len, e);
                if (r == -ENOENT) {
                        f->delim[0] = '\n';
                        f->delim_len = 1;
                } else if (r < 0)
                        bad = -EINVAL;
                break;
        }
        case ADP_SERIAL_FRAME_FIXED:
        case ADP_SERIAL_FRAME_LENGTH:
                if (get_bytes(fr, "sync", false, 1, f->sync, sizeof f->sync, &f->sync_len, e) == -EINVAL)
                        bad = -EINVAL;
                if (f->type == ADP_SERIAL_FRAME_FIXED) {
                        if (adp_conf_get_size(fr, "length", true, 1, ADP_SERIAL_FRAME_MAX, e, &v) < 0)
                                bad = -EINVAL;
                        else {
                                f->fixed_length = (size_t) v;
                                f->max_length = MAX(f->max_length, f->fixed_length);
                                if (f->sync_len > f->fixed_length) {
                                        adp_conf_error(e, adp_conf_get(fr, "sync"), "longer than the frame");
                                        bad = -EINVAL;
                                }
                        }
                } else {
                        static const char *const counts[] = { "after", "frame", NULL };
                        uint64_t off = 0, size = 1;
                        int64_t adj = 0;
                        int ci = 0;
                        if (adp_conf_get_uint(fr, "length_offset", true, 0, 1024, e, &off) < 0 ||
                            adp_conf_get_uint(fr, "length_size", false, 1, 4, e, &size) == -EINVAL ||
                            adp_conf_get_enum(fr, "length_counts", false, counts, e, &ci) == -EINVAL ||
                            adp_conf_get_int(fr, "length_adjust", false, -1024, 1024, e, &adj) == -EINVAL)
                                bad = -EINVAL;
                        if (size == 3) {
                                adp_conf_error(e, adp_conf_get(fr, "length_size"), "must be 1, 2 or 4");
                                bad = -EINVAL;
                        }
                        static const char *const orders[] = { "big", "little", NULL };
                        int bo = 0;
                        if (adp_conf_get_enum(fr, "length_byte_order", false, orders, e, &bo) == -EINVAL)
                                bad = -EINVAL;
                        f->len_offset = (size_t) off;
                        f->len_size = (size_t) size;
                        f->len_little_endian = bo == 1;
                        f->len_counts_frame = ci == 1;
                        f->len_adjust = adj;
                }
                break;
        case ADP_SERIAL_FRAME_MARKERS: {
                int r = get_byte(fr, "start", false, &f->start, e);
                if (r == -EINVAL)
                        bad = -EINVAL;
                f->has_start = r >= 0;
                if (get_byte(fr, "end", true, &f->end, e) < 0)
                        bad = -EINVAL;
                r = get_byte(fr, "escape", false, &f->escape, e);
                if (r == -EINVAL)
                        bad = -EINVAL;
                f->has_escape = r >= 0;
                if (get_byte(fr, "escape_xor", false, &f->escape_xor, e) == -EINVAL)
                        bad = -EINVAL;
                if (f->has_escape && (f->escape == f->end || (f->has_start && f->escape == f->start))) {
                        adp_conf_error(e, adp_conf_get(fr, "escape"), "the escape byte must differ from the markers");
                        bad = -EINVAL;
                }
                break;
        }
        case ADP_SERIAL_FRAME_PLUGIN:
                if (!(f->plugin = find_plugin(c, fr, "plugin", e)))
                        bad = -EINVAL;
                else if (!f->plugin->frame) {
                        adp_conf_error(e, adp_conf_get(fr, "plugin"), "plugin %s provides no frame() function",
                                       f->plugin->name ? f->plugin->name : "?");
                        bad = -EINVAL;
                }
                break;
        case ADP_SERIAL_FRAME_IDLE:
                if (!f->idle_usec) {
                        adp_conf_error(e, fr, "framing type idle needs idle_timeout (the silence that ends a frame)");
                        bad = -EINVAL;
                }
                break;
        default:
                break;
        }
        return bad ? -EINVAL : 0;
}

static int parse_check(const struct adp_conf_node *dev, struct adp_serial_check *c, struct adp_conf_errors *e) {
        static const char *const keys[] = { "type", "position", "from", "to", "byte_order", "encoding", NULL };
        static const char *const encodings[] = { "binary", "hex", NULL };
        const struct adp_conf_node *ck = NULL;
        int bad = 0, t = 0, enc = 0;
        *c = (struct adp_serial_check){ .type = ADP_SERIAL_CHECK_NONE };
        int r = adp_conf_get_map(dev, "check", false, e, &ck);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        bad |= adp_conf_check_keys(ck, keys, e);
        if (adp_conf_get_enum(ck, "type", true, adp_serial_check_names, e, &t) < 0)
                return -EINVAL;
        c->type = (enum adp_serial_check_type) t;
        if (adp_conf_get_enum(ck, "encoding", false, encodings, e, &enc) == -EINVAL)
                bad = -EINVAL;
        c->hex = enc == 1;
        size_t ww = adp_serial_check_width(c->type) * (c->hex ? 2 : 1);
        c->position = -(int64_t) ww;
        if (adp_conf_get_int(ck, "position", false, -FRAME_MAX_I, FRAME_MAX_I, e, &c->position) ==
                    -EINVAL ||
            adp_conf_get_int(ck, "from", false, -FRAME_MAX_I, FRAME_MAX_I, e, &c->from) == -EINVAL)
                bad = -EINVAL;
        r = adp_conf_get_int(ck, "to", false, -FRAME_MAX_I, FRAME_MAX_I, e, &c->to);
        if (r == -EINVAL)
                bad = -EINVAL;
        c->to_set = r >= 0;
        if (c->position < 0 && (uint64_t) -c->position < ww) {
                adp_conf_error(e, adp_conf_get(ck, "position"), "the %zu-byte check does not fit before the frame's end",
                               ww);
                bad = -EINVAL;
        }
        /* CRC-16/MODBUS goes low byte first on the wire; the others high byte first. */
        if (get_byte_order(ck, c->type == ADP_SERIAL_CHECK_CRC16_MODBUS, &c->little_endian, e) < 0)
                bad = -EINVAL;
        return bad ? -EINVAL : 0;
}

static int parse_ftype(const struct adp_conf_node *map, const char *key, bool required, bool text, enum adp_serial_ftype dflt,
                       enum adp_serial_ftype *ret, struct adp_conf_errors *e) {
        int t = (int) dflt;
        int r = adp_conf_get_enum(map, key, required, adp_serial_ftype_names, e, &t);
        if (r == -EINVAL)
                return r;
        bool text_ok = t == ADP_SERIAL_T_AUTO || t == ADP_SERIAL_T_NUMBER || t == ADP_SERIAL_T_INT ||
                       t == ADP_SERIAL_T_STRING || t == ADP_SERIAL_T_BOOL;
        bool bin_ok = t != ADP_SERIAL_T_AUTO && t != ADP_SERIAL_T_NUMBER && t != ADP_SERIAL_T_INT;
        if ((text && !text_ok) || (!text && !bin_ok)) {
                adp_conf_error(e, adp_conf_get(map, key), "type %s is not for %s messages (%s)", adp_serial_ftype_names[t],
                               text ? "text" : "binary",
                               text ? "auto, number, int, string, bool"
                                    : "u8 i8 u16 i16 u24 i24 u32 i32 u64 i64 f32 f64 bool string bcd hex");
                return -EINVAL;
        }
        *ret = (enum adp_serial_ftype) t;
        return 0;
}

static int parse_scale(const struct adp_conf_node *map, struct adp_serial_field *f, const char *add_key,
                       struct adp_conf_errors *e) {
        f->scale = 1;
        int r1 = adp_conf_get_double(map, "scale", false, -1e300, 1e300, e, &f->scale);
        int r2 = adp_conf_get_double(map, add_key, false, -1e300, 1e300, e, &f->add);
        if (r1 == -EINVAL || r2 == -EINVAL)
                return -EINVAL;
        f->scaled = r1 >= 0 || r2 >= 0;
        return 0;
}

static int parse_binary_field(const struct adp_conf_node *n, struct adp_serial_field *f, struct adp_conf_errors *e) {
        static const char *const keys[] = { "name", "offset", "type", "byte_order", "scale", "add", "bit", "bits",
                                            "length", NULL };
        const char *name;
        int bad = adp_conf_check_keys(n, keys, e);
        if (adp_conf_get_string(n, "name", true, e, &name) < 0)
                return -EINVAL;
        if (!(f->name = strdup(name)))
                return -ENOMEM;
        if (adp_conf_get_int(n, "offset", true, -FRAME_MAX_I, FRAME_MAX_I, e, &f->offset) < 0)
                bad = -EINVAL;
        if (parse_ftype(n, "type", false, false, ADP_SERIAL_T_U8, &f->type, e) < 0 ||
            get_byte_order(n, false, &f->little_endian, e) < 0 || parse_scale(n, f, "add", e) < 0)
                bad = -EINVAL;
        uint64_t len = 0;
        int r = adp_conf_get_size(n, "length", f->type == ADP_SERIAL_T_STRING || f->type == ADP_SERIAL_T_BCD ||
                                                    f->type == ADP_SERIAL_T_HEX, 1, 256, e, &len);
        if (r == -EINVAL)
                bad = -EINVAL;
        f->length = (size_t) len;
        int64_t bit = 0, bits = 0;
        int rb = adp_conf_get_int(n, "bit", false, 0, 63, e, &bit);
        int rn = adp_conf_get_int(n, "bits", false, 1, 64, e, &bits);
        if (rb == -EINVAL || rn == -EINVAL)
                bad = -EINVAL;
        if (rb >= 0 && rn < 0)
                bits = 1;
        if (rb >= 0 || rn >= 0) {
                unsigned width = 0;
                switch (f->type) {
                case ADP_SERIAL_T_U8: case ADP_SERIAL_T_I8: width = 8; break;
                case ADP_SERIAL_T_U16: case ADP_SERIAL_T_I16: width = 16; break;
                case ADP_SERIAL_T_U24: case ADP_SERIAL_T_I24: width = 24; break;
                case ADP_SERIAL_T_U32: case ADP_SERIAL_T_I32: width = 32; break;
                case ADP_SERIAL_T_U64: case ADP_SERIAL_T_I64: width = 64; break;
                default: break;
                }
                if (!width || bit + bits > (int64_t) width) {
                        adp_conf_error(e, n, "bit field %lld+%lld does not fit a %s (bit fields need an integer type)",
                                       (long long) bit, (long long) bits, adp_serial_ftype_names[f->type]);
                        bad = -EINVAL;
                }
        }
        f->bit = (int) bit;
        f->bits = (int) bits;
        return bad ? -EINVAL : 0;
}

static int parse_text_types(const struct adp_conf_node *m, struct adp_serial_message *msg, struct adp_conf_errors *e) {
        const struct adp_conf_node *types = NULL;
        int r = adp_conf_get_map(m, "types", false, e, &types);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        size_t n = adp_conf_len(types);
        msg->fields = calloc(n ? n : 1, sizeof *msg->fields);
        if (!msg->fields)
                return -ENOMEM;
        int bad = 0;
        for (size_t i = 0; i < n; i++) {
                struct adp_serial_field *f = &msg->fields[msg->n_fields++];
                const struct adp_conf_node *v = adp_conf_at(types, i);
                if (!(f->name = strdup(adp_conf_key_at(types, i))))
                        return -ENOMEM;
                f->scale = 1;
                if (adp_conf_kind(v) == ADP_CONF_MAP) {
                        static const char *const keys[] = { "type", "scale", "offset", NULL };
                        bad |= adp_conf_check_keys(v, keys, e);
                        if (parse_ftype(v, "type", false, true, ADP_SERIAL_T_AUTO, &f->type, e) < 0 ||
                            parse_scale(v, f, "offset", e) < 0)
                                bad = -EINVAL;
                } else {
                        int t;
                        if (adp_conf_parse_enum(v, adp_serial_ftype_names, e, &t) < 0)
                                bad = -EINVAL;
                        else {
                                f->type = (enum adp_serial_ftype) t;
                                if (t != ADP_SERIAL_T_AUTO && t != ADP_SERIAL_T_NUMBER && t != ADP_SERIAL_T_INT &&
                                    t != ADP_SERIAL_T_STRING && t != ADP_SERIAL_T_BOOL) {
                                        adp_conf_error(e, v, "text fields are auto, number, int, string or bool");
                                        bad = -EINVAL;
                                }
                        }
                }
        }
        return bad ? -EINVAL : 0;
}

static int get_sep(const struct adp_conf_node *m, const char *key, const char *dflt, char **ret, struct adp_conf_errors *e) {
        uint8_t b[16];
        size_t n = 0;
        int r = get_bytes(m, key, false, 1, b, sizeof b - 1, &n, e);
        if (r == -EINVAL)
                return r;
        if (r == -ENOENT) {
                *ret = strdup(dflt);
        } else {
                if (memchr(b, 0, n)) {
                        adp_conf_error(e, adp_conf_get(m, key), "a separator cannot contain a NUL byte");
                        return -EINVAL;
                }
                *ret = strndup((const char *) b, n);
        }
        return *ret ? 0 : -ENOMEM;
}

static int parse_message(const struct adp_serial_config *c, const struct adp_conf_node *m,
                         struct adp_serial_message *msg, struct adp_conf_errors *e) {
        static const char *const keys[] = { "name", "match", "decode", "regex", "separator", "columns",
                                            "pair_separator", "kv_separator", "types", "fields", "plugin", "trim",
                                            "telemetry", NULL };
        int bad = adp_conf_check_keys(m, keys, e), d = 0;
        const char *name;
        if (adp_conf_get_string(m, "name", true, e, &name) < 0)
                return -EINVAL;
        if (!(msg->name = strdup(name)))
                return -ENOMEM;
        msg->emit = true;
        msg->trim = true;
        if (adp_conf_get_bool(m, "telemetry", false, e, &msg->emit) == -EINVAL ||
            adp_conf_get_bool(m, "trim", false, e, &msg->trim) == -EINVAL)
                bad = -EINVAL;

        const struct adp_conf_node *match = NULL;
        int r = adp_conf_get_map(m, "match", false, e, &match);
        if (r == -EINVAL)
                bad = -EINVAL;
        else if (r >= 0) {
                static const char *const mkeys[] = { "prefix", "offset", "bytes", "byte", NULL };
                bad |= adp_conf_check_keys(match, mkeys, e);
                int n_given = !!adp_conf_get(match, "prefix") + !!adp_conf_get(match, "bytes") + !!adp_conf_get(match, "byte");
                if (n_given != 1) {
                        adp_conf_error(e, match, "give exactly one of prefix, bytes (with offset) or byte (with offset)");
                        bad = -EINVAL;
                } else if (adp_conf_get(match, "prefix")) {
                        if (adp_conf_get(match, "offset")) {
                                adp_conf_error(e, adp_conf_get(match, "offset"), "a prefix is at offset 0: use bytes with offset");
                                bad = -EINVAL;
                        }
                        if (get_bytes(match, "prefix", true, 1, msg->match, sizeof msg->match, &msg->match_len, e) < 0)
                                bad = -EINVAL;
                } else {
                        if (adp_conf_get_int(match, "offset", false, -FRAME_MAX_I, FRAME_MAX_I, e,
                                             &msg->match_offset) == -EINVAL)
                                bad = -EINVAL;
                        if (adp_conf_get(match, "byte")) {
                                if (get_byte(match, "byte", true, &msg->match[0], e) < 0)
                                        bad = -EINVAL;
                                msg->match_len = 1;
                        } else if (get_bytes(match, "bytes", true, 1, msg->match, sizeof msg->match, &msg->match_len, e) < 0)
                                bad = -EINVAL;
                }
                msg->has_match = true;
        }

        if (adp_conf_get_enum(m, "decode", true, adp_serial_decoder_names, e, &d) < 0)
                return -EINVAL;
        msg->decoder = (enum adp_serial_decoder) d;
        static const struct { const char *key; unsigned decs; } only[] = {
                { "regex", 1u << ADP_SERIAL_DEC_REGEX }, { "separator", 1u << ADP_SERIAL_DEC_CSV },
                { "columns", 1u << ADP_SERIAL_DEC_CSV },  { "pair_separator", 1u << ADP_SERIAL_DEC_KV },
                { "kv_separator", 1u << ADP_SERIAL_DEC_KV },
                { "types", (1u << ADP_SERIAL_DEC_REGEX) | (1u << ADP_SERIAL_DEC_KV) | (1u << ADP_SERIAL_DEC_CSV) },
                { "fields", 1u << ADP_SERIAL_DEC_BINARY }, { "plugin", 1u << ADP_SERIAL_DEC_PLUGIN },
        };
        for (size_t i = 0; i < ELEMENTSOF(only); i++)
                if (adp_conf_get(m, only[i].key) && !(only[i].decs & (1u << d))) {
                        adp_conf_error(e, adp_conf_get(m, only[i].key), "not used by decode: %s",
                                       adp_serial_decoder_names[d]);
                        bad = -EINVAL;
                }

        switch (msg->decoder) {
        case ADP_SERIAL_DEC_REGEX: {
                const char *re;
                if (adp_conf_get_string(m, "regex", true, e, &re) < 0)
                        return -EINVAL;
                int errc;
                PCRE2_SIZE erroff;
                pcre2_code *code = pcre2_compile((PCRE2_SPTR) re, PCRE2_ZERO_TERMINATED, 0, &errc, &erroff, NULL);
                if (!code) {
                        PCRE2_UCHAR buf[256];
                        pcre2_get_error_message(errc, buf, sizeof buf);
                        adp_conf_error(e, adp_conf_get(m, "regex"), "bad regular expression at character %zu: %s",
                                       (size_t) erroff, (const char *) buf);
                        return -EINVAL;
                }
                msg->re = (serial_pcre2_code *) code;
                uint32_t count = 0;
                (void) pcre2_pattern_info(code, PCRE2_INFO_NAMECOUNT, &count);
                if (count == 0) {
                        adp_conf_error(e, adp_conf_get(m, "regex"), "has no named group: name the values with "
                                       "(?<name>...)");
                        bad = -EINVAL;
                }
                if (parse_text_types(m, msg, e) < 0)
                        bad = -EINVAL;
                break;
        }
        case ADP_SERIAL_DEC_KV:
                if (get_sep(m, "pair_separator", ",", &msg->pair_sep, e) < 0 ||
                    get_sep(m, "kv_separator", "=", &msg->kv_sep, e) < 0 || parse_text_types(m, msg, e) < 0)
                        bad = -EINVAL;
                break;
        case ADP_SERIAL_DEC_CSV: {
                const struct adp_conf_node *cols = NULL;
                if (get_sep(m, "separator", ",", &msg->csv_sep, e) < 0 || parse_text_types(m, msg, e) < 0)
                        bad = -EINVAL;
                if (adp_conf_get_seq(m, "columns", true, e, &cols) < 0)
                        return -EINVAL;
                msg->n_columns = adp_conf_len(cols);
                if (!(msg->columns = calloc(msg->n_columns ? msg->n_columns : 1, sizeof(char *))))
                        return -ENOMEM;
                size_t named = 0;
                for (size_t i = 0; i < msg->n_columns; i++) {
                        const struct adp_conf_node *cn = adp_conf_at(cols, i);
                        if (adp_conf_is_null(cn))
                                continue;
                        const char *s;
                        if (adp_conf_parse_string(cn, e, &s) < 0) {
                                bad = -EINVAL;
                                continue;
                        }
                        if (!*s)
                                continue;
                        if (!(msg->columns[i] = strdup(s)))
                                return -ENOMEM;
                        named++;
                }
                if (!named) {
                        adp_conf_error(e, cols, "names no column (null skips a column)");
                        bad = -EINVAL;
                }
                break;
        }
        case ADP_SERIAL_DEC_BINARY: {
                const struct adp_conf_node *fl = NULL;
                if (adp_conf_get_seq(m, "fields", true, e, &fl) < 0)
                        return -EINVAL;
                size_t n = adp_conf_len(fl);
                if (n == 0 || n > ADP_SERIAL_MAX_FIELDS) {
                        adp_conf_error(e, fl, "needs 1 to %u fields", ADP_SERIAL_MAX_FIELDS);
                        return -EINVAL;
                }
                if (!(msg->fields = calloc(n, sizeof *msg->fields)))
                        return -ENOMEM;
                for (size_t i = 0; i < n; i++) {
                        r = parse_binary_field(adp_conf_at(fl, i), &msg->fields[msg->n_fields++], e);
                        if (r == -ENOMEM)
                                return r;
                        if (r < 0)
                                bad = -EINVAL;
                }
                break;
        }
        case ADP_SERIAL_DEC_PLUGIN:
                if (!(msg->plugin = find_plugin(c, m, "plugin", e)))
                        bad = -EINVAL;
                else if (!msg->plugin->decode) {
                        adp_conf_error(e, adp_conf_get(m, "plugin"), "this plugin provides no decode() function");
                        bad = -EINVAL;
                }
                break;
        default:
                break;
        }
        return bad ? -EINVAL : 0;
}

static int add_item(struct adp_serial_command *cmd, struct adp_serial_tpl_item **ret) {
        struct adp_serial_tpl_item *n = realloc(cmd->items, (cmd->n_items + 1) * sizeof *n);
        if (!n)
                return -ENOMEM;
        cmd->items = n;
        *ret = &n[cmd->n_items++];
        **ret = (struct adp_serial_tpl_item){ .scale = 1 };
        return 0;
}

/* A text template: escapes, then {name} / {name:%fmt} placeholders, {{ and }} for braces. */
static int parse_text_template(const struct adp_conf_node *at, const char *s, struct adp_serial_command *cmd,
                               struct adp_conf_errors *e) {
        uint8_t *bytes = malloc(strlen(s) + 1);
        size_t n;
        if (!bytes)
                return -ENOMEM;
        int r = adp_serial_parse_bytes(s, bytes, strlen(s) + 1, &n);
        if (r < 0) {
                free(bytes);
                adp_conf_error(e, at, "bad escape: use \\r \\n \\t \\0 \\\\ or \\xHH");
                return -EINVAL;
        }
        size_t lit = 0, i = 0;
        uint8_t *buf = malloc(n + 1);
        if (!buf) {
                free(bytes);
                return -ENOMEM;
        }
        struct adp_serial_tpl_item *it;
#define FLUSH_LIT()                                                                     \
        do {                                                                            \
                if (lit > 0) {                                                          \
                        if ((r = add_item(cmd, &it)) < 0)                               \
                                goto out;                                               \
                        if (!(it->bytes = malloc(lit))) {                               \
                                r = -ENOMEM;                                            \
                                goto out;                                               \
                        }                                                               \
                        memcpy(it->bytes, buf, lit);                                    \
                        it->n = lit;                                                    \
                        lit = 0;                                                        \
                }                                                                       \
        } while (0)
        r = 0;
        while (i < n) {
                if ((bytes[i] == '{' || bytes[i] == '}') && i + 1 < n && bytes[i + 1] == bytes[i]) {
                        buf[lit++] = bytes[i];
                        i += 2;
                        continue;
                }
                if (bytes[i] == '}') {
                        adp_conf_error(e, at, "unmatched } in the template (write }} for a literal brace)");
                        r = -EINVAL;
                        goto out;
                }
                if (bytes[i] != '{') {
                        buf[lit++] = bytes[i++];
                        continue;
                }
                const uint8_t *close = memchr(bytes + i, '}', n - i);
                if (!close) {
                        adp_conf_error(e, at, "unterminated placeholder (write {{ for a literal brace)");
                        r = -EINVAL;
                        goto out;
                }
                FLUSH_LIT();
                char ph[128];
                size_t pl = (size_t) (close - bytes) - i - 1;
                if (pl == 0 || pl >= sizeof ph) {
                        adp_conf_error(e, at, "empty or overlong placeholder");
                        r = -EINVAL;
                        goto out;
                }
                memcpy(ph, bytes + i + 1, pl);
                ph[pl] = 0;
                char *colon = strchr(ph, ':');
                if ((r = add_item(cmd, &it)) < 0)
                        goto out;
                if (colon) {
                        *colon = 0;
                        const char *f = colon + 1;
                        /* One numeric conversion: %[flags][width][.prec](d|u|x|X|f|e|g). */
                        size_t k = 0;
                        bool ok = f[k++] == '%';
                        while (ok && f[k] && strchr("-+ 0#", f[k]))
                                k++;
                        while (ok && f[k] >= '0' && f[k] <= '9')
                                k++;
                        if (ok && f[k] == '.')
                                for (k++; f[k] >= '0' && f[k] <= '9'; k++)
                                        ;
                        ok = ok && f[k] && strchr("duxXfeg", f[k]) && f[k + 1] == 0 && k < 16;
                        if (!ok) {
                                adp_conf_error(e, at, "placeholder {%s:%s}: the format must be one printf conversion "
                                               "such as %%d, %%05.1f or %%X", ph, f);
                                r = -EINVAL;
                                goto out;
                        }
                        if (!(it->fmt = strdup(f))) {
                                r = -ENOMEM;
                                goto out;
                        }
                }
                if (!(it->arg = strdup(ph))) {
                        r = -ENOMEM;
                        goto out;
                }
                i = (size_t) (close - bytes) + 1;
        }
        FLUSH_LIT();
out:
#undef FLUSH_LIT
        free(buf);
        free(bytes);
        return r;
}

static int parse_binary_template(const struct adp_conf_node *seq, struct adp_serial_command *cmd,
                                 struct adp_conf_errors *e) {
        int bad = 0;
        for (size_t i = 0; i < adp_conf_len(seq); i++) {
                static const char *const keys[] = { "bytes", "arg", "type", "byte_order", "scale", NULL };
                const struct adp_conf_node *n = adp_conf_at(seq, i);
                struct adp_serial_tpl_item *it;
                int r = add_item(cmd, &it);
                if (r < 0)
                        return r;
                if (adp_conf_check_keys(n, keys, e) < 0) {
                        bad = -EINVAL;
                        continue;
                }
                if (!!adp_conf_get(n, "bytes") == !!adp_conf_get(n, "arg")) {
                        adp_conf_error(e, n, "give either bytes (literal) or arg (an argument's name)");
                        bad = -EINVAL;
                        continue;
                }
                if (adp_conf_get(n, "bytes")) {
                        uint8_t b[ADP_SERIAL_BYTES_MAX];
                        if (get_bytes(n, "bytes", true, 1, b, sizeof b, &it->n, e) < 0) {
                                bad = -EINVAL;
                                continue;
                        }
                        if (!(it->bytes = malloc(it->n)))
                                return -ENOMEM;
                        memcpy(it->bytes, b, it->n);
                        continue;
                }
                const char *arg;
                if (adp_conf_get_string(n, "arg", true, e, &arg) < 0 || !(it->arg = strdup(arg))) {
                        bad = -EINVAL;
                        continue;
                }
                if (parse_ftype(n, "type", false, false, ADP_SERIAL_T_U8, &it->type, e) < 0 ||
                    get_byte_order(n, false, &it->little_endian, e) < 0 ||
                    adp_conf_get_double(n, "scale", false, -1e300, 1e300, e, &it->scale) == -EINVAL)
                        bad = -EINVAL;
                else if (it->type == ADP_SERIAL_T_STRING || it->type == ADP_SERIAL_T_BCD || it->type == ADP_SERIAL_T_HEX) {
                        adp_conf_error(e, adp_conf_get(n, "type"), "binary arguments are numbers (u8 ... f64, bool)");
                        bad = -EINVAL;
                } else if (it->scale == 0) {
                        adp_conf_error(e, adp_conf_get(n, "scale"), "must not be 0");
                        bad = -EINVAL;
                }
        }
        return bad ? -EINVAL : 0;
}

static int parse_command(const struct adp_serial_config *c, const struct adp_serial_device_conf *d,
                         const struct adp_conf_node *n, struct adp_serial_command *cmd, struct adp_conf_errors *e) {
        static const char *const keys[] = { "name", "method", "c2d", "text", "binary", "plugin", "check", "reply", NULL };
        int bad = adp_conf_check_keys(n, keys, e);
        const char *name;
        if (adp_conf_get_string(n, "name", true, e, &name) < 0)
                return -EINVAL;
        if (!(cmd->name = strdup(name)))
                return -ENOMEM;
        cmd->method = true;
        cmd->reply_index = -1;
        if (adp_conf_get_bool(n, "method", false, e, &cmd->method) == -EINVAL ||
            adp_conf_get_bool(n, "c2d", false, e, &cmd->c2d) == -EINVAL ||
            adp_conf_get_bool(n, "check", false, e, &cmd->append_check) == -EINVAL)
                bad = -EINVAL;
        int given = !!adp_conf_get(n, "text") + !!adp_conf_get(n, "binary") + !!adp_conf_get(n, "plugin");
        if (given != 1) {
                adp_conf_error(e, n, "give exactly one of text (a template), binary (a field list) or plugin");
                return -EINVAL;
        }
        int r = 0;
        if (adp_conf_get(n, "text")) {
                const char *s;
                if (adp_conf_get_string(n, "text", true, e, &s) < 0)
                        return -EINVAL;
                r = parse_text_template(adp_conf_get(n, "text"), s, cmd, e);
        } else if (adp_conf_get(n, "binary")) {
                const struct adp_conf_node *seq;
                if (adp_conf_get_seq(n, "binary", true, e, &seq) < 0)
                        return -EINVAL;
                cmd->binary = true;
                r = parse_binary_template(seq, cmd, e);
        } else {
                if (!(cmd->plugin = find_plugin(c, n, "plugin", e)))
                        bad = -EINVAL;
                else if (!cmd->plugin->encode) {
                        adp_conf_error(e, adp_conf_get(n, "plugin"), "this plugin provides no encode() function");
                        bad = -EINVAL;
                }
                if (cmd->append_check) {
                        adp_conf_error(e, adp_conf_get(n, "check"), "a plugin command writes its own check");
                        bad = -EINVAL;
                }
        }
        if (r == -ENOMEM)
                return r;
        if (r < 0)
                bad = -EINVAL;
        if (cmd->append_check) {
                size_t ww = adp_serial_check_width(d->check.type) * (d->check.hex ? 2 : 1);
                if (d->check.type == ADP_SERIAL_CHECK_NONE) {
                        adp_conf_error(e, adp_conf_get(n, "check"), "the device declares no check to append");
                        bad = -EINVAL;
                } else if (d->check.position != -(int64_t) ww) {
                        adp_conf_error(e, adp_conf_get(n, "check"), "the device's check is not at the frame's end, "
                                       "so it cannot be appended: build it into the template instead");
                        bad = -EINVAL;
                }
        }
        const struct adp_conf_node *rp = NULL;
        r = adp_conf_get_map(n, "reply", false, e, &rp);
        if (r == -EINVAL)
                bad = -EINVAL;
        else if (r >= 0) {
                static const char *const rkeys[] = { "message", "timeout", NULL };
                const char *msg;
                cmd->timeout_usec = USEC_PER_SEC_;
                bad |= adp_conf_check_keys(rp, rkeys, e);
                if (adp_conf_get_duration(rp, "timeout", false, USEC_PER_MSEC, 600 * USEC_PER_SEC_, e,
                                          &cmd->timeout_usec) == -EINVAL)
                        bad = -EINVAL;
                if (adp_conf_get_string(rp, "message", true, e, &msg) < 0)
                        bad = -EINVAL;
                else {
                        for (size_t i = 0; i < d->n_messages; i++)
                                if (d->messages[i].name && streq(d->messages[i].name, msg))
                                        cmd->reply_index = (int) i;
                        if (cmd->reply_index < 0) {
                                adp_conf_error(e, adp_conf_get(rp, "message"), "no message named \"%s\" in this "
                                               "device's `messages:`", msg);
                                bad = -EINVAL;
                        }
                        if (!(cmd->reply = strdup(msg)))
                                return -ENOMEM;
                }
        }
        return bad ? -EINVAL : 0;
}

static int parse_device(const struct adp_serial_config *c, const struct adp_conf_node *dn,
                        struct adp_serial_device_conf *d, struct adp_conf_errors *e) {
        static const char *const keys[] = { "name", "port", "reopen", "framing", "check", "messages", "commands",
                                            "poll", "plugin", "plugin_args", "report_interval", NULL };
        int bad = adp_conf_check_keys(dn, keys, e), r;
        const char *name;
        if (adp_conf_kind(dn) != ADP_CONF_MAP)
                return -EINVAL;
        if (adp_conf_get_string(dn, "name", true, e, &name) < 0)
                bad = -EINVAL;
        else if (!(d->name = strdup(name)))
                return -ENOMEM;
        if ((r = parse_port(dn, &d->port, e)) == -ENOMEM)
                return r;
        if (r < 0)
                bad = -EINVAL;
        if (parse_framing(c, dn, &d->framing, e) < 0)
                bad = -EINVAL;
        if (parse_check(dn, &d->check, e) < 0)
                bad = -EINVAL;
        d->report_usec = 10 * USEC_PER_SEC_;
        if (adp_conf_get_duration(dn, "report_interval", false, 100 * USEC_PER_MSEC, 3600 * USEC_PER_SEC_, e,
                                  &d->report_usec) == -EINVAL)
                bad = -EINVAL;

        bool needs_plugin = d->framing.type == ADP_SERIAL_FRAME_PLUGIN;
        const struct adp_conf_node *msgs = NULL;
        if (adp_conf_get_seq(dn, "messages", true, e, &msgs) < 0)
                bad = -EINVAL;
        else {
                d->n_messages = adp_conf_len(msgs);
                if (d->n_messages == 0) {
                        adp_conf_error(e, msgs, "needs at least one message kind");
                        bad = -EINVAL;
                }
                if (!(d->messages = calloc(d->n_messages ? d->n_messages : 1, sizeof *d->messages)))
                        return -ENOMEM;
                for (size_t i = 0; i < d->n_messages; i++) {
                        const struct adp_conf_node *mn = adp_conf_at(msgs, i);
                        if (adp_conf_kind(mn) != ADP_CONF_MAP) {
                                adp_conf_error(e, mn, "a message must be a mapping (name, match, decode, ...)");
                                bad = -EINVAL;
                                continue;
                        }
                        r = parse_message(c, mn, &d->messages[i], e);
                        if (r == -ENOMEM)
                                return r;
                        if (r < 0)
                                bad = -EINVAL;
                        needs_plugin |= d->messages[i].decoder == ADP_SERIAL_DEC_PLUGIN;
                        for (size_t k = 0; k < i; k++)
                                if (d->messages[k].name && d->messages[i].name &&
                                    streq(d->messages[k].name, d->messages[i].name)) {
                                        adp_conf_error(e, adp_conf_get(mn, "name"), "message \"%s\" is declared twice",
                                                       d->messages[i].name);
                                        bad = -EINVAL;
                                }
                }
        }
        const struct adp_conf_node *cmds = NULL;
        r = adp_conf_get_seq(dn, "commands", false, e, &cmds);
        if (r == -EINVAL)
                bad = -EINVAL;
        else if (r >= 0) {
                d->n_commands = adp_conf_len(cmds);
                if (!(d->commands = calloc(d->n_commands ? d->n_commands : 1, sizeof *d->commands)))
                        return -ENOMEM;
                for (size_t i = 0; i < d->n_commands; i++) {
                        const struct adp_conf_node *cn = adp_conf_at(cmds, i);
                        if (adp_conf_kind(cn) != ADP_CONF_MAP) {
                                adp_conf_error(e, cn, "a command must be a mapping (name, text/binary, reply, ...)");
                                bad = -EINVAL;
                                continue;
                        }
                        r = parse_command(c, d, cn, &d->commands[i], e);
                        if (r == -ENOMEM)
                                return r;
                        if (r < 0)
                                bad = -EINVAL;
                        needs_plugin |= d->commands[i].plugin != NULL;
                        for (size_t k = 0; k < i; k++)
                                if (d->commands[k].name && d->commands[i].name &&
                                    streq(d->commands[k].name, d->commands[i].name)) {
                                        adp_conf_error(e, adp_conf_get(cn, "name"), "command \"%s\" is declared twice",
                                                       d->commands[i].name);
                                        bad = -EINVAL;
                                }
                }
        }
        const struct adp_conf_node *polls = NULL;
        r = adp_conf_get_seq(dn, "poll", false, e, &polls);
        if (r == -EINVAL)
                bad = -EINVAL;
        else if (r >= 0) {
                d->n_polls = adp_conf_len(polls);
                if (!(d->polls = calloc(d->n_polls ? d->n_polls : 1, sizeof *d->polls)))
                        return -ENOMEM;
                for (size_t i = 0; i < d->n_polls; i++) {
                        static const char *const pkeys[] = { "command", "interval", "args", NULL };
                        const struct adp_conf_node *pn = adp_conf_at(polls, i);
                        struct adp_serial_poll *p = &d->polls[i];
                        const char *cname;
                        p->command = -1;
                        if (adp_conf_check_keys(pn, pkeys, e) < 0) {
                                bad = -EINVAL;
                                continue;
                        }
                        if (adp_conf_get_duration(pn, "interval", true, 10 * USEC_PER_MSEC, 24 * 3600 * USEC_PER_SEC_, e,
                                                  &p->interval_usec) < 0)
                                bad = -EINVAL;
                        if (adp_conf_get_string(pn, "command", true, e, &cname) < 0) {
                                bad = -EINVAL;
                                continue;
                        }
                        for (size_t k = 0; k < d->n_commands; k++)
                                if (d->commands[k].name && streq(d->commands[k].name, cname))
                                        p->command = (int) k;
                        if (p->command < 0) {
                                adp_conf_error(e, adp_conf_get(pn, "command"), "no command named \"%s\" in this "
                                               "device's `commands:`", cname);
                                bad = -EINVAL;
                        }
                        const struct adp_conf_node *an = NULL;
                        r = adp_conf_get_map(pn, "args", false, e, &an);
                        if (r == -EINVAL)
                                bad = -EINVAL;
                        else if (r >= 0) {
                                json_t *o = json_object();
                                for (size_t k = 0; o && k < adp_conf_len(an); k++) {
                                        const char *s = adp_conf_scalar(adp_conf_at(an, k));
                                        char *end = NULL;
                                        double v = s ? strtod(s, &end) : 0;
                                        json_object_set_new(o, adp_conf_key_at(an, k),
                                                            !s ? json_null()
                                                            : end && end != s && !*end ? json_real(v)
                                                                                       : json_string(s));
                                }
                                p->args = o ? json_dumps(o, JSON_COMPACT) : NULL;
                                json_decref(o);
                                if (!p->args)
                                        return -ENOMEM;
                        }
                }
        }
        if (adp_conf_get(dn, "plugin") || needs_plugin) {
                const struct adp_serial_plugin *p = NULL;
                if (!adp_conf_get(dn, "plugin")) {
                        /* The device's plugin (its state) is the first one any of its parts names. */
                        p = d->framing.plugin;
                        for (size_t i = 0; !p && i < d->n_messages; i++)
                                p = d->messages[i].plugin;
                        for (size_t i = 0; !p && i < d->n_commands; i++)
                                p = d->commands[i].plugin;
                } else if (!(p = find_plugin(c, dn, "plugin", e)))
                        bad = -EINVAL;
                d->plugin = p;
                const char *args;
                r = adp_conf_get_string(dn, "plugin_args", false, e, &args);
                if (r == -EINVAL)
                        bad = -EINVAL;
                else if (r >= 0 && !(d->plugin_args = strdup(args)))
                        return -ENOMEM;
                if (p && p->create && !bad) {
                        /* Validate the arguments now, so that --check-config catches them. */
                        void *st = NULL;
                        r = p->create(d->plugin_args, &st);
                        if (r < 0) {
                                adp_conf_error(e, adp_conf_get(dn, "plugin_args") ?: dn,
                                               "plugin %s refuses these arguments: %s", p->name ? p->name : "?",
                                               strerror(-r));
                                bad = -EINVAL;
                        } else if (p->destroy)
                                p->destroy(st);
                }
        } else if (adp_conf_get(dn, "plugin_args")) {
                adp_conf_error(e, adp_conf_get(dn, "plugin_args"), "set without a plugin");
                bad = -EINVAL;
        }
        return bad ? -EINVAL : 0;
}

struct adp_serial_config *adp_serial_config_free(struct adp_serial_config *c) {
        if (!c)
                return NULL;
        for (size_t i = 0; i < c->n_devices; i++) {
                struct adp_serial_device_conf *d = &c->devices[i];
                free(d->name);
                free(d->port.device);
                for (size_t k = 0; k < d->n_messages; k++)
                        adp_serial_message_done(&d->messages[k]);
                free(d->messages);
                for (size_t k = 0; k < d->n_commands; k++)
                        adp_serial_command_done(&d->commands[k]);
                free(d->commands);
                for (size_t k = 0; k < d->n_polls; k++)
                        free(d->polls[k].args);
                free(d->polls);
                free(d->plugin_args);
        }
        free(c->devices);
        for (size_t i = 0; i < c->n_plugins; i++)
                adp_serial_plugin_unload(&c->plugins[i]);
        free(c->plugins);
        free(c);
        return NULL;
}

int adp_serial_config_parse(const struct adp_conf_node *item, struct adp_serial_config **ret,
                            struct adp_conf_errors *e) {
        static const char *const keys[] = { "type", "name", "plugins", "devices", NULL };
        struct adp_serial_config *c = calloc(1, sizeof *c);
        int bad = 0, r;
        if (!c)
                return -ENOMEM;
        bad |= adp_conf_check_keys(item, keys, e);

        const struct adp_conf_node *pl = NULL;
        r = adp_conf_get_map(item, "plugins", false, e, &pl);
        if (r == -EINVAL)
                bad = -EINVAL;
        else if (r >= 0) {
                size_t n = adp_conf_len(pl);
                if (!(c->plugins = calloc(n ? n : 1, sizeof *c->plugins))) {
                        adp_serial_config_free(c);
                        return -ENOMEM;
                }
                for (size_t i = 0; i < n; i++) {
                        const struct adp_conf_node *pn = adp_conf_at(pl, i);
                        const char *path;
                        if (adp_conf_parse_string(pn, e, &path) < 0) {
                                bad = -EINVAL;
                                continue;
                        }
                        if (path[0] != '/') {
                                adp_conf_error(e, pn, "must be an absolute path to a shared object, found \"%s\"", path);
                                bad = -EINVAL;
                                continue;
                        }
                        struct adp_serial_plugin_handle *h = &c->plugins[c->n_plugins];
                        char why[1024];
                        if (adp_serial_plugin_load(path, h, why, sizeof why) < 0) {
                                adp_conf_error(e, pn, "%s", why);
                                bad = -EINVAL;
                                continue;
                        }
                        h->name = xstrdup(adp_conf_key_at(pl, i));
                        h->path = xstrdup(path);
                        c->n_plugins++;
                }
        }

        const struct adp_conf_node *devs = NULL;
        if (adp_conf_get_seq(item, "devices", true, e, &devs) < 0)
                bad = -EINVAL;
        else {
                c->n_devices = adp_conf_len(devs);
                if (c->n_devices == 0) {
                        adp_conf_error(e, devs, "needs at least one device");
                        bad = -EINVAL;
                }
                if (!(c->devices = calloc(c->n_devices ? c->n_devices : 1, sizeof *c->devices))) {
                        adp_serial_config_free(c);
                        return -ENOMEM;
                }
                for (size_t i = 0; i < c->n_devices; i++) {
                        const struct adp_conf_node *dn = adp_conf_at(devs, i);
                        if (adp_conf_kind(dn) != ADP_CONF_MAP) {
                                adp_conf_error(e, dn, "a device must be a mapping (name, port, framing, messages, ...)");
                                bad = -EINVAL;
                                continue;
                        }
                        r = parse_device(c, dn, &c->devices[i], e);
                        if (r == -ENOMEM) {
                                adp_serial_config_free(c);
                                return r;
                        }
                        if (r < 0)
                                bad = -EINVAL;
                        for (size_t k = 0; k < i; k++) {
                                const struct adp_serial_device_conf *o = &c->devices[k];
                                if (o->name && c->devices[i].name && streq(o->name, c->devices[i].name)) {
                                        adp_conf_error(e, adp_conf_get(dn, "name"), "device \"%s\" is declared twice",
                                                       o->name);
                                        bad = -EINVAL;
                                }
                                if (o->port.device && c->devices[i].port.device &&
                                    streq(o->port.device, c->devices[i].port.device)) {
                                        adp_conf_error(e, adp_conf_get(adp_conf_get(dn, "port"), "device"),
                                                       "serial port %s is already used by device \"%s\": one device "
                                                       "per port", o->port.device, o->name ? o->name : "?");
                                        bad = -EINVAL;
                                }
                        }
                }
        }
        if (bad) {
                adp_serial_config_free(c);
                return -EINVAL;
        }
        *ret = c;
        return 0;
}
