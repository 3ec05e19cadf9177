/* SPDX-License-Identifier: MIT */
/* Modbus value codecs: registers ⇄ typed values in every byte and word order, exact JSON
 * formatting, exception and error names. Pure functions, no I/O. */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "modbus-internal.h"
#include <modbus/modbus.h>

const char *const adp_modbus_table_names[] = {
        [ADP_MODBUS_COIL] = "coil",
        [ADP_MODBUS_DISCRETE_INPUT] = "discrete_input",
        [ADP_MODBUS_INPUT_REGISTER] = "input_register",
        [ADP_MODBUS_HOLDING_REGISTER] = "holding_register",
        NULL,
};

const char *const adp_modbus_type_names[] = {
        [ADP_MODBUS_BOOL] = "bool",       [ADP_MODBUS_INT16] = "int16",     [ADP_MODBUS_UINT16] = "uint16",
        [ADP_MODBUS_INT32] = "int32",     [ADP_MODBUS_UINT32] = "uint32",   [ADP_MODBUS_INT64] = "int64",
        [ADP_MODBUS_UINT64] = "uint64",   [ADP_MODBUS_FLOAT32] = "float32", [ADP_MODBUS_FLOAT64] = "float64",
        [ADP_MODBUS_STRING] = "string",   [ADP_MODBUS_BIT] = "bit",         NULL,
};

const char *const adp_modbus_order_names[] = {
        [ADP_MODBUS_ABCD] = "ABCD", [ADP_MODBUS_BADC] = "BADC", [ADP_MODBUS_CDAB] = "CDAB",
        [ADP_MODBUS_DCBA] = "DCBA", NULL,
};

uint64_t adp_modbus_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

unsigned adp_modbus_type_registers(enum adp_modbus_type t, unsigned string_regs) {
        switch (t) {
        case ADP_MODBUS_BOOL:
        case ADP_MODBUS_INT16:
        case ADP_MODBUS_UINT16:
        case ADP_MODBUS_BIT:
                return 1;
        case ADP_MODBUS_INT32:
        case ADP_MODBUS_UINT32:
        case ADP_MODBUS_FLOAT32:
                return 2;
        case ADP_MODBUS_INT64:
        case ADP_MODBUS_UINT64:
        case ADP_MODBUS_FLOAT64:
                return 4;
        case ADP_MODBUS_STRING:
                return string_regs;
        default:
                return 0;
        }
}

static bool order_swaps_bytes(enum adp_modbus_order o) {
        return o == ADP_MODBUS_BADC || o == ADP_MODBUS_DCBA;
}

static bool order_swaps_words(enum adp_modbus_order o) {
        return o == ADP_MODBUS_CDAB || o == ADP_MODBUS_DCBA;
}

/* Registers in wire order → big-endian bytes (most significant first). */
static void regs_to_be(enum adp_modbus_order o, const uint16_t *regs, unsigned n, uint8_t *out) {
        for (unsigned i = 0; i < n; i++) {
                uint16_t r = regs[order_swaps_words(o) ? n - 1 - i : i];
                uint8_t hi = r >> 8, lo = r & 0xff;
                if (order_swaps_bytes(o)) {
                        uint8_t t = hi;
                        hi = lo;
                        lo = t;
                }
                out[2 * i] = hi;
                out[2 * i + 1] = lo;
        }
}

static void be_to_regs(enum adp_modbus_order o, const uint8_t *in, unsigned n, uint16_t *regs) {
        for (unsigned i = 0; i < n; i++) {
                uint8_t hi = in[2 * i], lo = in[2 * i + 1];
                if (order_swaps_bytes(o)) {
                        uint8_t t = hi;
                        hi = lo;
                        lo = t;
                }
                regs[order_swaps_words(o) ? n - 1 - i : i] = (uint16_t) ((hi << 8) | lo);
        }
}

static uint64_t be_uint(const uint8_t *b, unsigned n) {
        uint64_t v = 0;
        for (unsigned i = 0; i < n; i++)
                v = (v << 8) | b[i];
        return v;
}

int adp_modbus_decode(enum adp_modbus_type t, enum adp_modbus_order o, const uint16_t *regs, unsigned nregs,
                      unsigned bit, struct adp_modbus_value *ret) {
        struct adp_modbus_value v = { 0 };
        uint8_t b[8];

        if (t == ADP_MODBUS_STRING) {
                unsigned n = MIN(nregs, 64u), k = 0;
                uint8_t sb[128];
                /* Strings keep register order; only BADC/DCBA swap the two characters. */
                for (unsigned i = 0; i < n; i++) {
                        uint8_t hi = regs[i] >> 8, lo = regs[i] & 0xff;
                        sb[2 * i] = order_swaps_bytes(o) ? lo : hi;
                        sb[2 * i + 1] = order_swaps_bytes(o) ? hi : lo;
                }
                for (unsigned i = 0; i < 2 * n && sb[i]; i++)
                        v.s[k++] = sb[i] >= 0x20 && sb[i] < 0x7f ? (char) sb[i] : '?';
                while (k > 0 && v.s[k - 1] == ' ')
                        k--;
                v.s[k] = 0;
                v.kind = ADP_MODBUS_V_STRING;
                *ret = v;
                return 0;
        }

        unsigned need = adp_modbus_type_registers(t, 0);
        if (need == 0 || nregs < need || t == ADP_MODBUS_BOOL)
                return -EINVAL;
        regs_to_be(need == 1 ? (order_swaps_bytes(o) ? ADP_MODBUS_BADC : ADP_MODBUS_ABCD) : o, regs, need, b);
        uint64_t raw = be_uint(b, 2 * need);

        switch (t) {
        case ADP_MODBUS_INT16:
                v.kind = ADP_MODBUS_V_INT;
                v.i = (int16_t) raw;
                break;
        case ADP_MODBUS_UINT16:
        case ADP_MODBUS_UINT32:
        case ADP_MODBUS_UINT64:
                v.kind = ADP_MODBUS_V_UINT;
                v.u = raw;
                break;
        case ADP_MODBUS_INT32:
                v.kind = ADP_MODBUS_V_INT;
                v.i = (int32_t) (uint32_t) raw;
                break;
        case ADP_MODBUS_INT64:
                v.kind = ADP_MODBUS_V_INT;
                v.i = (int64_t) raw;
                break;
        case ADP_MODBUS_FLOAT32: {
                uint32_t u32 = (uint32_t) raw;
                float f;
                memcpy(&f, &u32, sizeof f);
                v.kind = ADP_MODBUS_V_DOUBLE;
                v.d = f;
                v.f32 = true;
                break;
        }
        case ADP_MODBUS_FLOAT64:
                memcpy(&v.d, &raw, sizeof v.d);
                v.kind = ADP_MODBUS_V_DOUBLE;
                break;
        case ADP_MODBUS_BIT:
                if (bit > 15)
                        return -EINVAL;
                v.kind = ADP_MODBUS_V_BOOL;
                v.b = (raw >> bit) & 1;
                break;
        default:
                return -EINVAL;
        }
        *ret = v;
        return 0;
}

int adp_modbus_encode(enum adp_modbus_type t, enum adp_modbus_order o, const struct adp_modbus_value *v,
                      unsigned nregs, uint16_t *ret_regs) {
        uint8_t b[8];
        uint64_t raw;

        if (t == ADP_MODBUS_STRING) {
                if (v->kind != ADP_MODBUS_V_STRING)
                        return -EINVAL;
                size_t len = strlen(v->s);
                if (len > 2 * (size_t) nregs)
                        return -ERANGE;
                for (unsigned i = 0; i < nregs; i++) {
                        uint8_t hi = 2 * i < len ? (uint8_t) v->s[2 * i] : 0;
                        uint8_t lo = 2 * i + 1 < len ? (uint8_t) v->s[2 * i + 1] : 0;
                        ret_regs[i] = order_swaps_bytes(o) ? (uint16_t) ((lo << 8) | hi) : (uint16_t) ((hi << 8) | lo);
                }
                return 0;
        }

        if (v->kind == ADP_MODBUS_V_STRING)
                return -EINVAL;

        if (t == ADP_MODBUS_FLOAT32 || t == ADP_MODBUS_FLOAT64) {
                double x = adp_modbus_value_double(v);
                if (t == ADP_MODBUS_FLOAT32) {
                        if (isfinite(x) && fabs(x) > 3.4028234663852886e38)
                                return -ERANGE;
                        float f = (float) x;
                        uint32_t u32;
                        memcpy(&u32, &f, sizeof u32);
                        raw = u32;
                } else
                        memcpy(&raw, &x, sizeof raw);
        } else {
                /* The exact integer: negative → s, else → u. */
                bool neg = false;
                int64_t s = 0;
                uint64_t u = 0;
                switch (v->kind) {
                case ADP_MODBUS_V_BOOL:
                        u = v->b;
                        break;
                case ADP_MODBUS_V_INT:
                        neg = v->i < 0;
                        s = v->i;
                        u = neg ? 0 : (uint64_t) v->i;
                        break;
                case ADP_MODBUS_V_UINT:
                        u = v->u;
                        break;
                case ADP_MODBUS_V_DOUBLE:
                        if (!isfinite(v->d) || v->d != floor(v->d))
                                return -ERANGE;
                        if (v->d < 0) {
                                if (v->d < -9223372036854775808.0)
                                        return -ERANGE;
                                neg = true;
                                s = (int64_t) v->d;
                        } else {
                                if (v->d >= 18446744073709551616.0)
                                        return -ERANGE;
                                u = (uint64_t) v->d;
                        }
                        break;
                default:
                        return -EINVAL;
                }
                unsigned bits = t == ADP_MODBUS_BIT ? 1 : 16 * adp_modbus_type_registers(t, 0);
                bool is_signed = t == ADP_MODBUS_INT16 || t == ADP_MODBUS_INT32 || t == ADP_MODBUS_INT64;
                if (bits == 0)
                        return -EINVAL;
                if (is_signed) {
                        int64_t lo = bits == 64 ? INT64_MIN : -(INT64_C(1) << (bits - 1));
                        uint64_t hi = bits == 64 ? (uint64_t) INT64_MAX : (UINT64_C(1) << (bits - 1)) - 1;
                        if (neg ? s < lo : u > hi)
                                return -ERANGE;
                        raw = neg ? (uint64_t) s : u;
                } else {
                        if (neg || (bits < 64 && u > (UINT64_C(1) << bits) - 1))
                                return -ERANGE;
                        raw = u;
                }
                if (bits < 64)
                        raw &= (UINT64_C(1) << bits) - 1;
        }

        if (t == ADP_MODBUS_BIT)
                return -EINVAL; /* a bit is written read-modify-write by the caller */
        unsigned n = adp_modbus_type_registers(t, 0);
        for (unsigned k = 0; k < 2 * n; k++)
                b[k] = (uint8_t) (raw >> (8 * (2 * n - 1 - k)));
        be_to_regs(n == 1 ? (order_swaps_bytes(o) ? ADP_MODBUS_BADC : ADP_MODBUS_ABCD) : o, b, n, ret_regs);
        return 0;
}

void adp_modbus_scale(struct adp_modbus_value *v, double scale, double offset) {
        if (scale == 1.0 && offset == 0.0)
                return;
        if (v->kind == ADP_MODBUS_V_STRING || v->kind == ADP_MODBUS_V_BOOL)
                return;
        double x = adp_modbus_value_double(v);
        /* Scales like 0.1 or 0.01 are not exact in binary: 219 * 0.1 is 21.900000000000002,
         * while 219 / 10 is the double nearest to 21.9. Divide by the exact inverse when
         * there is one. */
        double inv = 1.0 / scale, n = round(inv);
        if (fabs(scale) < 1.0 && n != 0.0 && fabs(inv - n) <= 1e-9 * fabs(n))
                x = x / n;
        else
                x = x * scale;
        v->kind = ADP_MODBUS_V_DOUBLE;
        v->f32 = false;
        v->d = x + offset;
}

double adp_modbus_value_double(const struct adp_modbus_value *v) {
        switch (v->kind) {
        case ADP_MODBUS_V_INT:
                return (double) v->i;
        case ADP_MODBUS_V_UINT:
                return (double) v->u;
        case ADP_MODBUS_V_DOUBLE:
                return v->d;
        case ADP_MODBUS_V_BOOL:
                return v->b;
        default:
                return NAN;
        }
}

bool adp_modbus_value_equal(const struct adp_modbus_value *a, const struct adp_modbus_value *b) {
        if (a->kind != b->kind)
                return false;
        switch (a->kind) {
        case ADP_MODBUS_V_INT:
                return a->i == b->i;
        case ADP_MODBUS_V_UINT:
                return a->u == b->u;
        case ADP_MODBUS_V_DOUBLE:
                return a->d == b->d || (isnan(a->d) && isnan(b->d));
        case ADP_MODBUS_V_BOOL:
                return a->b == b->b;
        default:
                return streq(a->s, b->s);
        }
}

static const double pow10_tab[] = { 1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                     1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22 };

/* %.Pg of a float32 (d holds it exactly) for the smallest P in 6..9 whose text reads back as
 * the same float, without printf or strtof: the P significant digits n are the rounded
 * d * 10^s, and n / 10^s (n < 2^53 and 10^|s| are exact doubles, so the quotient is the correctly
 * rounded double of the decimal) converted to float equals strtof() of the text unless that
 * double lies exactly halfway between two floats (every such midpoint is a double, so rounding
 * the decimal to a double cannot cross one; only landing on it can mislead). Returns the length
 * written to out (at least 32 bytes), or -1 when this path cannot decide (|s| > 22, a midpoint):
 * the caller then uses printf and strtof. */
static int format_f32_fast(double d, char out[static 32]) {
        double a = fabs(d);
        float f = (float) a;
        char *o = out;

        if (d < 0 || (d == 0 && signbit(d)))
                *o++ = '-';
        if (a == 0) {
                *o++ = '0';
                *o = 0;
                return (int) (o - out);
        }
        int e10_guess = (int) floor(log10(a));
        for (int p = 6; p <= 9; p++) {
                double n = 0;
                int s = 0, e10 = e10_guess;  /* the exponent of the value rounded to p digits */
                for (int tries = 0; tries < 3; tries++) {
                        s = p - 1 - e10;
                        if (s < -22 || s > 22)
                                return -1;
                        n = nearbyint(s >= 0 ? a * pow10_tab[s] : a / pow10_tab[-s]);
                        if (n >= pow10_tab[p]) {        /* rounded up to one more digit: 9.9999999 -> 10.0000 */
                                n /= 10;
                                e10++;
                                s--;
                                break;
                        }
                        if (n >= pow10_tab[p - 1])
                                break;
                        e10--;                          /* log10() overestimated */
                }
                if (n < pow10_tab[p - 1] || n >= pow10_tab[p] || s < -22 || s > 22)
                        return -1;
                double x = s >= 0 ? n / pow10_tab[s] : n * pow10_tab[-s];
                float fx = (float) x;
                if (fx != f)
                        continue;
                if (x != (double) fx) {
                        float g = nextafterf(fx, x > (double) fx ? INFINITY : -INFINITY);
                        if (x - (double) fx == (double) g - x)
                                return -1;
                }
                /* The digits of n, trailing zeros stripped (%g). */
                char dig[10];
                uint32_t u = (uint32_t) n;
                for (int i = p - 1; i >= 0; i--, u /= 10)
                        dig[i] = (char) ('0' + u % 10);
                int k = p;
                while (k > 1 && dig[k - 1] == '0')
                        k--;
                int X = e10;
                if (X >= -4 && X < p) {
                        if (X >= 0) {
                                for (int i = 0; i <= X; i++)
                                        *o++ = dig[i];
                                if (k > X + 1) {
                                        *o++ = '.';
                                        for (int i = X + 1; i < k; i++)
                                                *o++ = dig[i];
                                }
                        } else {
                                *o++ = '0';
                                *o++ = '.';
                                for (int i = 0; i < -X - 1; i++)
                                        *o++ = '0';
                                for (int i = 0; i < k; i++)
                                        *o++ = dig[i];
                        }
                } else {
                        *o++ = dig[0];
                        if (k > 1) {
                                *o++ = '.';
                                for (int i = 1; i < k; i++)
                                        *o++ = dig[i];
                        }
                        *o++ = 'e';
                        *o++ = X < 0 ? '-' : '+';
                        unsigned ax = (unsigned) abs(X);
                        if (ax >= 100)
                                *o++ = (char) ('0' + ax / 100);
                        *o++ = (char) ('0' + ax / 10 % 10);
                        *o++ = (char) ('0' + ax % 10);
                }
                *o = 0;
                return (int) (o - out);
        }
        return -1;
}

/* The shortest %.Ng that reads back as the same value: a double from 15 digits up (most
 * values need 15..17; each try is a printf and a strtod, so the search starts high), a float32
 * from 6 to 9 digits (-1234.5f prints -1234.5, 1.013f prints 1.013, not its double expansion
 * 1.0130000114440918), through format_f32_fast() when it can decide. */
static int format_double(double d, bool f32, char *buf, size_t size) {
        char tmp[40];
        if (f32) {
                int n = format_f32_fast(d, tmp);
                if (n >= 0) {
                        if ((size_t) n < size)
                                memcpy(buf, tmp, (size_t) n + 1);
                        else if (size > 0) {
                                memcpy(buf, tmp, size - 1);
                                buf[size - 1] = 0;
                        }
                        return n;
                }
                for (int prec = 6; prec <= 9; prec++) {
                        snprintf(tmp, sizeof tmp, "%.*g", prec, d);
                        if (strtof(tmp, NULL) == (float) d)
                                break;
                }
        } else {
                snprintf(tmp, sizeof tmp, "%.15g", d);
                if (strtod(tmp, NULL) != d) {
                        snprintf(tmp, sizeof tmp, "%.16g", d);
                        if (strtod(tmp, NULL) != d)
                                snprintf(tmp, sizeof tmp, "%.17g", d);
                }
        }
        /* JSON has no "inf"/"nan" (filtered by the caller) and needs no leading '+'. */
        return snprintf(buf, size, "%s", tmp);
}

int adp_modbus_value_json(const struct adp_modbus_value *v, char *buf, size_t size) {
        switch (v->kind) {
        case ADP_MODBUS_V_INT:
                return snprintf(buf, size, "%lld", (long long) v->i);
        case ADP_MODBUS_V_UINT:
                return snprintf(buf, size, "%llu", (unsigned long long) v->u);
        case ADP_MODBUS_V_DOUBLE:
                if (!isfinite(v->d))
                        return snprintf(buf, size, "null");
                return format_double(v->d, v->f32, buf, size);
        case ADP_MODBUS_V_BOOL:
                return snprintf(buf, size, "%s", v->b ? "true" : "false");
        case ADP_MODBUS_V_STRING: {
                /* Decoded strings hold printable ASCII only; escape '"' and '\\'. */
                size_t o = 0;
                int n = 2;
                if (o < size)
                        buf[o++] = '"';
                for (const char *p = v->s; *p; p++) {
                        bool esc = *p == '"' || *p == '\\';
                        n += esc ? 2 : 1;
                        if (esc && o + 1 < size)
                                buf[o++] = '\\';
                        if (o + 1 < size)
                                buf[o++] = *p;
                }
                if (o + 1 < size)
                        buf[o++] = '"';
                if (size)
                        buf[MIN(o, size - 1)] = 0;
                return n;
        }
        }
        return snprintf(buf, size, "null");
}

const char *adp_modbus_exception_name(unsigned code) {
        static const char *const names[] = {
                [1] = "ILLEGAL FUNCTION",
                [2] = "ILLEGAL DATA ADDRESS",
                [3] = "ILLEGAL DATA VALUE",
                [4] = "SERVER DEVICE FAILURE",
                [5] = "ACKNOWLEDGE",
                [6] = "SERVER DEVICE BUSY",
                [7] = "NEGATIVE ACKNOWLEDGE",
                [8] = "MEMORY PARITY ERROR",
                [10] = "GATEWAY PATH UNAVAILABLE",
                [11] = "GATEWAY TARGET DEVICE FAILED TO RESPOND",
        };
        return code < ELEMENTSOF(names) ? names[code] : NULL;
}

const char *adp_modbus_strerror(int err) {
        err = abs(err);
        if (err > MODBUS_ENOBASE && err <= EMBXGTAR) {
                const char *n = adp_modbus_exception_name((unsigned) (err - MODBUS_ENOBASE));
                return n ? n : "unknown exception";
        }
        switch (err) {
        case EMBBADCRC:
                return "CRC error";
        case EMBBADDATA:
                return "invalid data in the response";
        case EMBBADEXC:
                return "invalid exception code";
        case EMBUNKEXC:
                return "unknown exception code";
        case EMBMDATA:
                return "too many data";
        case EMBBADSLAVE:
                return "response from the wrong unit";
        case ETIMEDOUT:
                return "timeout";
        case ECONNRESET:
        case EPIPE:
        case ECONNREFUSED:
        case ENOTCONN:
                return strerror(err);
        default:
                return strerror(err);
        }
}

int adp_modbus_errno(int err) {
        err = abs(err);
        if (err > MODBUS_ENOBASE && err <= EMBXGTAR)
                return -EPROTO;
        switch (err) {
        case EMBBADCRC:
                return -EBADMSG;
        case EMBBADDATA:
        case EMBBADEXC:
        case EMBUNKEXC:
        case EMBMDATA:
                return -EBADMSG;
        case EMBBADSLAVE:
                return -EREMOTEIO;
        default:
                return err > 0 ? -err : -EIO;
        }
}
