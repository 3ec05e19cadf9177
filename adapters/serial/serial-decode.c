/* SPDX-License-Identifier: MIT */
/* Decoders: a frame becomes a JSON object of named fields. Text frames through a PCRE2
 * regular expression with named groups, key=value pairs or CSV columns; binary frames
 * through a field list (offset, type, byte order, bit field, scale and offset); or a plugin.
 * The message kind of a frame is chosen by a byte match (a prefix, a type byte). */

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <math.h>
#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "adp-util.h"
#include "serial-internal.h"

const char *const adp_serial_decoder_names[] = {
        [ADP_SERIAL_DEC_REGEX] = "regex", [ADP_SERIAL_DEC_KV] = "kv",         [ADP_SERIAL_DEC_CSV] = "csv",
        [ADP_SERIAL_DEC_BINARY] = "binary", [ADP_SERIAL_DEC_PLUGIN] = "plugin", [ADP_SERIAL_DEC_NONE] = "none",
        NULL,
};

const char *const adp_serial_ftype_names[] = {
        [ADP_SERIAL_T_AUTO] = "auto",   [ADP_SERIAL_T_U8] = "u8",       [ADP_SERIAL_T_I8] = "i8",
        [ADP_SERIAL_T_U16] = "u16",     [ADP_SERIAL_T_I16] = "i16",     [ADP_SERIAL_T_U24] = "u24",
        [ADP_SERIAL_T_I24] = "i24",     [ADP_SERIAL_T_U32] = "u32",     [ADP_SERIAL_T_I32] = "i32",
        [ADP_SERIAL_T_U64] = "u64",     [ADP_SERIAL_T_I64] = "i64",     [ADP_SERIAL_T_F32] = "f32",
        [ADP_SERIAL_T_F64] = "f64",     [ADP_SERIAL_T_BOOL] = "bool",   [ADP_SERIAL_T_STRING] = "string",
        [ADP_SERIAL_T_BCD] = "bcd",     [ADP_SERIAL_T_HEX] = "hex",     [ADP_SERIAL_T_NUMBER] = "number",
        [ADP_SERIAL_T_INT] = "int",     NULL,
};

void adp_serial_message_done(struct adp_serial_message *m) {
        free(m->name);
        if (m->re)
                pcre2_code_free((pcre2_code *) m->re);
        free(m->csv_sep);
        free(m->pair_sep);
        free(m->kv_sep);
        for (size_t i = 0; i < m->n_columns; i++)
                free(m->columns[i]);
        free(m->columns);
        for (size_t i = 0; i < m->n_fields; i++)
                free(m->fields[i].name);
        free(m->fields);
        *m = (struct adp_serial_message){ 0 };
}

int adp_serial_match(const struct adp_serial_message *msgs, size_t n, const uint8_t *frame, size_t len) {
        for (size_t i = 0; i < n; i++) {
                const struct adp_serial_message *m = &msgs[i];
                if (!m->has_match)
                        return (int) i;
                size_t off;
                if (m->match_offset < 0) {
                        if ((uint64_t) -m->match_offset > len)
                                continue;
                        off = len - (size_t) -m->match_offset;
                } else
                        off = (size_t) m->match_offset;
                if (off + m->match_len <= len && memcmp(frame + off, m->match, m->match_len) == 0)
                        return (int) i;
        }
        return -1;
}

static const struct adp_serial_field *field_of(const struct adp_serial_message *m, const char *name) {
        for (size_t i = 0; i < m->n_fields; i++)
                if (streq(m->fields[i].name, name))
                        return &m->fields[i];
        return NULL;
}

/* Text from an instrument is not necessarily UTF-8: such a value becomes null. */
static json_t *text_string(const char *s, size_t n) {
        return json_stringn(s, n) ?: json_null();
}

static json_t *number_value(double v, const struct adp_serial_field *f) {
        if (f && f->scaled)
                v = v * f->scale + f->add;
        if (!isfinite(v))
                return json_null();
        return json_real(v);
}

/* A text value: typed as declared, else a number when it reads as one, else a string. */
static json_t *text_value(const struct adp_serial_message *m, const char *name, const char *s, size_t n) {
        const struct adp_serial_field *f = field_of(m, name);
        enum adp_serial_ftype t = f ? f->type : ADP_SERIAL_T_AUTO;
        char buf[256];

        if (m->trim) {
                while (n > 0 && (*s == ' ' || *s == '\t'))
                        s++, n--;
                while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
                        n--;
        }
        if (t == ADP_SERIAL_T_STRING)
                return text_string(s, n);
        if (n == 0)
                return json_null();
        if (t == ADP_SERIAL_T_BOOL) {
                if ((n == 1 && (*s == '1' || *s == 'Y' || *s == 'y' || *s == 'T' || *s == 't')) ||
                    (n == 4 && strncasecmp(s, "true", 4) == 0) || (n == 2 && strncasecmp(s, "on", 2) == 0))
                        return json_true();
                return json_false();
        }
        if (n >= sizeof buf)
                return t == ADP_SERIAL_T_AUTO ? text_string(s, n) : NULL;
        memcpy(buf, s, n);
        buf[n] = 0;
        char *end = NULL;
        errno = 0;
        bool looks_int = strspn(buf + (buf[0] == '-' || buf[0] == '+'), "0123456789") == n - (buf[0] == '-' || buf[0] == '+');
        if (looks_int && (t == ADP_SERIAL_T_AUTO || t == ADP_SERIAL_T_INT) && !(f && f->scaled)) {
                long long v = strtoll(buf, &end, 10);
                if (errno == 0 && end && *end == 0 && n > 0)
                        return json_integer(v);
        }
        errno = 0;
        double d = strtod(buf, &end);
        if (errno == 0 && end != buf && *end == 0 && isfinite(d) && !(t == ADP_SERIAL_T_INT && !looks_int))
                return number_value(d, f);
        if (t == ADP_SERIAL_T_AUTO)
                return text_string(buf, n);
        return NULL; /* declared a number, is not one */
}

static int put(json_t *o, const char *name, json_t *v) {
        if (!v)
                return -EBADMSG;
        return json_object_set_new(o, name, v) < 0 ? -ENOMEM : 0;
}

static int decode_regex(const struct adp_serial_message *m, const uint8_t *frame, size_t len, json_t *o) {
        pcre2_code *re = (pcre2_code *) m->re;
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
        if (!md)
                return -ENOMEM;
        int rc = pcre2_match(re, frame, len, 0, 0, md, NULL);
        if (rc < 0) {
                pcre2_match_data_free(md);
                return -EBADMSG;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        uint32_t count = 0, esize = 0;
        PCRE2_SPTR table = NULL;
        (void) pcre2_pattern_info(re, PCRE2_INFO_NAMECOUNT, &count);
        (void) pcre2_pattern_info(re, PCRE2_INFO_NAMEENTRYSIZE, &esize);
        (void) pcre2_pattern_info(re, PCRE2_INFO_NAMETABLE, &table);
        int r = 0;
        for (uint32_t i = 0; i < count && r >= 0; i++) {
                const uint8_t *e = table + (size_t) i * esize;
                int g = (e[0] << 8) | e[1];
                const char *name = (const char *) e + 2;
                if (g >= rc || ov[2 * g] == PCRE2_UNSET) {
                        r = put(o, name, json_null());
                        continue;
                }
                r = put(o, name, text_value(m, name, (const char *) frame + ov[2 * g], ov[2 * g + 1] - ov[2 * g]));
        }
        pcre2_match_data_free(md);
        return r;
}

static const char *find_sep(const char *p, const char *end, const char *sep) {
        size_t sl = strlen(sep);
        for (; p + sl <= end; p++)
                if (memcmp(p, sep, sl) == 0)
                        return p;
        return NULL;
}

static int decode_kv(const struct adp_serial_message *m, const uint8_t *frame, size_t len, json_t *o) {
        const char *p = (const char *) frame, *end = p + len;
        size_t psl = strlen(m->pair_sep), ksl = strlen(m->kv_sep);
        int found = 0;
        while (p < end) {
                const char *q = find_sep(p, end, m->pair_sep);
                const char *pe = q ? q : end;
                const char *eq = find_sep(p, pe, m->kv_sep);
                if (eq) {
                        char key[128];
                        const char *ks = p, *ke = eq;
                        while (ks < ke && (*ks == ' ' || *ks == '\t'))
                                ks++;
                        while (ke > ks && (ke[-1] == ' ' || ke[-1] == '\t'))
                                ke--;
                        size_t kl = (size_t) (ke - ks);
                        if (kl > 0 && kl < sizeof key) {
                                memcpy(key, ks, kl);
                                key[kl] = 0;
                                if (json_object_set_new(o, key, text_value(m, key, eq + ksl, (size_t) (pe - eq - ksl))
                                                                        ?: json_null()) < 0)
                                        return -ENOMEM;
                                found++;
                        }
                }
                p = q ? q + psl : end;
        }
        return found > 0 ? 0 : -EBADMSG;
}

static int decode_csv(const struct adp_serial_message *m, const uint8_t *frame, size_t len, json_t *o) {
        const char *p = (const char *) frame, *end = p + len;
        size_t sl = strlen(m->csv_sep), col = 0;
        int r = 0;
        while (col < m->n_columns && r >= 0) {
                const char *q = find_sep(p, end, m->csv_sep);
                const char *ce = q ? q : end;
                if (m->columns[col])
                        r = put(o, m->columns[col], text_value(m, m->columns[col], p, (size_t) (ce - p)));
                col++;
                if (!q)
                        break;
                p = q + sl;
        }
        if (r >= 0 && col < m->n_columns)
                for (; col < m->n_columns; col++) /* short line: the missing columns are null */
                        if (m->columns[col] && json_object_set_new(o, m->columns[col], json_null()) < 0)
                                return -ENOMEM;
        return r;
}

static uint64_t read_uint_le(const uint8_t *p, size_t n, bool le) {
        uint64_t v = 0;
        for (size_t i = 0; i < n; i++)
                v |= (uint64_t) p[le ? i : n - 1 - i] << (8 * i);
        return v;
}

static size_t ftype_size(enum adp_serial_ftype t) {
        switch (t) {
        case ADP_SERIAL_T_U8: case ADP_SERIAL_T_I8: case ADP_SERIAL_T_BOOL: return 1;
        case ADP_SERIAL_T_U16: case ADP_SERIAL_T_I16: return 2;
        case ADP_SERIAL_T_U24: case ADP_SERIAL_T_I24: return 3;
        case ADP_SERIAL_T_U32: case ADP_SERIAL_T_I32: case ADP_SERIAL_T_F32: return 4;
        case ADP_SERIAL_T_U64: case ADP_SERIAL_T_I64: case ADP_SERIAL_T_F64: return 8;
        default: return 0;
        }
}

static json_t *binary_field(const struct adp_serial_field *f, const uint8_t *frame, size_t len) {
        size_t off;
        if (f->offset < 0) {
                if ((uint64_t) -f->offset > len)
                        return NULL;
                off = len - (size_t) -f->offset;
        } else
                off = (size_t) f->offset;
        size_t sz = ftype_size(f->type);
        if (sz == 0)
                sz = f->length;
        if (off > len || sz > len - off)
                return NULL;
        const uint8_t *p = frame + off;

        switch (f->type) {
        case ADP_SERIAL_T_STRING: {
                size_t n = strnlen((const char *) p, sz);
                while (n > 0 && p[n - 1] == ' ')
                        n--;
                return json_stringn((const char *) p, n) ?: json_null(); /* NULL: not UTF-8 */
        }
        case ADP_SERIAL_T_HEX: {
                char buf[2 * 256 + 1];
                static const char hexd[] = "0123456789abcdef";
                for (size_t i = 0; i < sz && i < 256; i++) {
                        buf[2 * i] = hexd[p[i] >> 4];
                        buf[2 * i + 1] = hexd[p[i] & 15];
                }
                return json_stringn(buf, 2 * MIN(sz, (size_t) 256));
        }
        case ADP_SERIAL_T_BCD: {
                uint64_t v = 0;
                for (size_t i = 0; i < sz; i++) {
                        uint8_t hi = p[i] >> 4, lo = p[i] & 15;
                        if (hi > 9 || lo > 9)
                                return NULL;
                        v = v * 100 + hi * 10u + lo;
                }
                return f->scaled ? number_value((double) v, f) : json_integer((json_int_t) v);
        }
        case ADP_SERIAL_T_F32: {
                uint32_t u = (uint32_t) read_uint_le(p, 4, f->little_endian);
                float x;
                memcpy(&x, &u, 4);
                /* The single's shortest decimal (21.7, not 21.700000762939453), then scaled. */
                return number_value(adp_f32_value(x), f->scaled ? f : NULL);
        }
        case ADP_SERIAL_T_F64: {
                uint64_t u = read_uint_le(p, 8, f->little_endian);
                double x;
                memcpy(&x, &u, 8);
                return number_value(x, f->scaled ? f : NULL);
        }
        default:
                break;
        }
        uint64_t u = read_uint_le(p, sz, f->little_endian);
        bool is_signed = f->type == ADP_SERIAL_T_I8 || f->type == ADP_SERIAL_T_I16 || f->type == ADP_SERIAL_T_I24 ||
                         f->type == ADP_SERIAL_T_I32 || f->type == ADP_SERIAL_T_I64;
        unsigned width = (unsigned) sz * 8;
        if (f->bits > 0) {
                u = (u >> f->bit) & (f->bits >= 64 ? ~0ull : ((1ull << f->bits) - 1));
                width = (unsigned) f->bits;
        }
        if (f->type == ADP_SERIAL_T_BOOL || (f->bits == 1 && !f->scaled && !is_signed))
                return json_boolean(u != 0);
        int64_t sv;
        if (is_signed && width < 64 && (u >> (width - 1)) & 1)
                sv = (int64_t) (u | (~0ull << width));
        else
                sv = (int64_t) u;
        if (f->scaled)
                return number_value(is_signed ? (double) sv : (double) u, f);
        if (!is_signed && u > INT64_MAX)
                return json_real((double) u);
        return json_integer(is_signed ? sv : (json_int_t) u);
}

static void sink_number(void *ud, const char *name, double v) {
        json_object_set_new(ud, name, isfinite(v) ? json_real(v) : json_null());
}
static void sink_integer(void *ud, const char *name, int64_t v) {
        json_object_set_new(ud, name, json_integer(v));
}
static void sink_boolean(void *ud, const char *name, int v) {
        json_object_set_new(ud, name, json_boolean(v));
}
static void sink_string(void *ud, const char *name, const char *v, size_t n) {
        json_t *s = json_stringn(v, n);
        json_object_set_new(ud, name, s ?: json_null());
}

int adp_serial_decode(const struct adp_serial_message *m, void *plugin_state, const uint8_t *frame, size_t len,
                      json_t **ret) {
        json_t *o = json_object();
        int r = 0;
        if (!o)
                return -ENOMEM;
        switch (m->decoder) {
        case ADP_SERIAL_DEC_REGEX:
                r = decode_regex(m, frame, len, o);
                break;
        case ADP_SERIAL_DEC_KV:
                r = decode_kv(m, frame, len, o);
                break;
        case ADP_SERIAL_DEC_CSV:
                r = decode_csv(m, frame, len, o);
                break;
        case ADP_SERIAL_DEC_BINARY:
                for (size_t i = 0; i < m->n_fields && r >= 0; i++)
                        r = put(o, m->fields[i].name, binary_field(&m->fields[i], frame, len));
                break;
        case ADP_SERIAL_DEC_PLUGIN: {
                struct adp_serial_sink sink = { .ud = o, .number = sink_number, .integer = sink_integer,
                                                .boolean = sink_boolean, .string = sink_string };
                r = m->plugin && m->plugin->decode ? m->plugin->decode(plugin_state, frame, len, &sink) : -ENOSYS;
                if (r < 0)
                        r = -EBADMSG;
                break;
        }
        case ADP_SERIAL_DEC_NONE:
        default:
                break;
        }
        if (r < 0) {
                json_decref(o);
                return r;
        }
        *ret = o;
        return 0;
}
