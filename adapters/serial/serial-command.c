/* SPDX-License-Identifier: MIT */
/* Command templates: a direct method's or a C2D message's arguments (a JSON object) become
 * the bytes of a request. Text templates hold {name} or {name:%.2f} placeholders; binary
 * templates are a list of literal bytes and typed arguments. The checksum and the framing
 * are added by the caller (serial.c). */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "serial-internal.h"

void adp_serial_command_done(struct adp_serial_command *c) {
        free(c->name);
        for (size_t i = 0; i < c->n_items; i++) {
                free(c->items[i].bytes);
                free(c->items[i].arg);
                free(c->items[i].fmt);
        }
        free(c->items);
        free(c->reply);
        *c = (struct adp_serial_command){ 0 };
}

static int put_bytes(uint8_t *out, size_t cap, size_t *o, const void *p, size_t n) {
        if (n > cap - *o)
                return -ENOBUFS;
        memcpy(out + *o, p, n);
        *o += n;
        return 0;
}

/* The formats are checked at config time: one numeric conversion (serial-conf.c). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
static int text_arg(const struct adp_serial_tpl_item *it, const json_t *v, char *buf, size_t size, char *why,
                    size_t why_size) {
        int n;
        if (it->fmt) {
                if (!json_is_number(v)) {
                        snprintf(why, why_size, "argument \"%s\" must be a number", it->arg);
                        return -EINVAL;
                }
                char conv = it->fmt[strlen(it->fmt) - 1];
                double d = json_number_value(v);
                if (conv == 'd' || conv == 'x' || conv == 'X' || conv == 'u') {
                        if (d != floor(d) || fabs(d) > 9.0e15) {
                                snprintf(why, why_size, "argument \"%s\" must be an integer", it->arg);
                                return -EINVAL;
                        }
                        char f2[40];
                        snprintf(f2, sizeof f2, "%.*sll%c", (int) strlen(it->fmt) - 1, it->fmt, conv);
                        n = snprintf(buf, size, f2, (long long) d);
                } else
                        n = snprintf(buf, size, it->fmt, d);
        } else if (json_is_string(v))
                n = snprintf(buf, size, "%s", json_string_value(v));
        else if (json_is_integer(v))
                n = snprintf(buf, size, "%lld", (long long) json_integer_value(v));
        else if (json_is_real(v))
                n = snprintf(buf, size, "%.10g", json_real_value(v));
        else if (json_is_boolean(v))
                n = snprintf(buf, size, "%d", json_is_true(v) ? 1 : 0);
        else {
                snprintf(why, why_size, "argument \"%s\" must be a string, a number or a boolean", it->arg);
                return -EINVAL;
        }
        if (n < 0 || (size_t) n >= size) {
                snprintf(why, why_size, "argument \"%s\" is too long", it->arg);
                return -EINVAL;
        }
        return n;
}

#pragma GCC diagnostic pop

static int binary_arg(const struct adp_serial_tpl_item *it, const json_t *v, uint8_t *b, char *why, size_t why_size) {
        if (!json_is_number(v) && !json_is_boolean(v)) {
                snprintf(why, why_size, "argument \"%s\" must be a number", it->arg);
                return -EINVAL;
        }
        double d = json_is_boolean(v) ? (json_is_true(v) ? 1 : 0) : json_number_value(v);
        if (it->scale != 0 && it->scale != 1)
                d = d / it->scale; /* engineering value -> raw */
        size_t sz;
        uint64_t u;
        switch (it->type) {
        case ADP_SERIAL_T_F32: {
                float f = (float) d;
                uint32_t x;
                memcpy(&x, &f, 4);
                u = x;
                sz = 4;
                break;
        }
        case ADP_SERIAL_T_F64:
                memcpy(&u, &d, 8);
                sz = 8;
                break;
        default: {
                static const struct { enum adp_serial_ftype t; size_t sz; double lo, hi; } lim[] = {
                        { ADP_SERIAL_T_U8, 1, 0, 255 },                 { ADP_SERIAL_T_I8, 1, -128, 127 },
                        { ADP_SERIAL_T_BOOL, 1, 0, 1 },                 { ADP_SERIAL_T_U16, 2, 0, 65535 },
                        { ADP_SERIAL_T_I16, 2, -32768, 32767 },         { ADP_SERIAL_T_U24, 3, 0, 16777215 },
                        { ADP_SERIAL_T_I24, 3, -8388608, 8388607 },     { ADP_SERIAL_T_U32, 4, 0, 4294967295.0 },
                        { ADP_SERIAL_T_I32, 4, -2147483648.0, 2147483647.0 },
                        { ADP_SERIAL_T_U64, 8, 0, 9007199254740992.0 }, { ADP_SERIAL_T_I64, 8, -9007199254740992.0, 9007199254740992.0 },
                };
                size_t k;
                for (k = 0; k < ELEMENTSOF(lim) && lim[k].t != it->type; k++)
                        ;
                if (k == ELEMENTSOF(lim))
                        return -EINVAL;
                d = round(d);
                if (d < lim[k].lo || d > lim[k].hi) {
                        snprintf(why, why_size, "argument \"%s\" is out of range for %s", it->arg,
                                 adp_serial_ftype_names[it->type]);
                        return -EINVAL;
                }
                u = (uint64_t) (int64_t) d;
                sz = lim[k].sz;
        }
        }
        for (size_t i = 0; i < sz; i++)
                b[it->little_endian ? i : sz - 1 - i] = (uint8_t) (u >> (8 * i));
        return (int) sz;
}

ssize_t adp_serial_command_render(const struct adp_serial_command *c, const json_t *args, uint8_t *out, size_t cap,
                                  char *why, size_t why_size) {
        size_t o = 0;
        for (size_t i = 0; i < c->n_items; i++) {
                const struct adp_serial_tpl_item *it = &c->items[i];
                int r;
                if (it->bytes) {
                        r = put_bytes(out, cap, &o, it->bytes, it->n);
                } else {
                        const json_t *v = json_is_object(args) ? json_object_get(args, it->arg) : NULL;
                        if (!v) {
                                snprintf(why, why_size, "missing argument \"%s\"", it->arg);
                                return -EINVAL;
                        }
                        if (c->binary) {
                                uint8_t b[8];
                                r = binary_arg(it, v, b, why, why_size);
                                if (r < 0)
                                        return r;
                                r = put_bytes(out, cap, &o, b, (size_t) r);
                        } else {
                                char buf[512];
                                r = text_arg(it, v, buf, sizeof buf, why, why_size);
                                if (r < 0)
                                        return r;
                                r = put_bytes(out, cap, &o, buf, (size_t) r);
                        }
                }
                if (r < 0) {
                        snprintf(why, why_size, "the request is longer than %zu bytes", cap);
                        return r;
                }
        }
        return (ssize_t) o;
}
