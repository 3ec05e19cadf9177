/* SPDX-License-Identifier: MIT */
/* Integrity checks of serial frames: sums, LRC, the common CRC-16s and CRC-32, at a declared
 * position, over a declared coverage, in either byte order, binary or as ASCII hex. */

#include <errno.h>
#include <string.h>

#include "serial-internal.h"

const char *const adp_serial_check_names[] = {
        [ADP_SERIAL_CHECK_NONE] = "none",
        [ADP_SERIAL_CHECK_SUM8] = "sum8",
        [ADP_SERIAL_CHECK_XOR8] = "xor8",
        [ADP_SERIAL_CHECK_LRC] = "lrc",
        [ADP_SERIAL_CHECK_CRC16_MODBUS] = "crc16-modbus",
        [ADP_SERIAL_CHECK_CRC16_CCITT_FALSE] = "crc16-ccitt-false",
        [ADP_SERIAL_CHECK_CRC16_XMODEM] = "crc16-xmodem",
        [ADP_SERIAL_CHECK_CRC32] = "crc32",
        NULL,
};

size_t adp_serial_check_width(enum adp_serial_check_type t) {
        switch (t) {
        case ADP_SERIAL_CHECK_NONE:
                return 0;
        case ADP_SERIAL_CHECK_SUM8:
        case ADP_SERIAL_CHECK_XOR8:
        case ADP_SERIAL_CHECK_LRC:
                return 1;
        case ADP_SERIAL_CHECK_CRC32:
                return 4;
        default:
                return 2;
        }
}

static uint16_t crc16_reflected(const uint8_t *p, size_t n, uint16_t crc, uint16_t poly_reflected) {
        for (size_t i = 0; i < n; i++) {
                crc ^= p[i];
                for (int b = 0; b < 8; b++)
                        crc = (crc & 1) ? (uint16_t) ((crc >> 1) ^ poly_reflected) : (uint16_t) (crc >> 1);
        }
        return crc;
}

static uint16_t crc16_msb(const uint8_t *p, size_t n, uint16_t crc, uint16_t poly) {
        for (size_t i = 0; i < n; i++) {
                crc ^= (uint16_t) (p[i] << 8);
                for (int b = 0; b < 8; b++)
                        crc = (crc & 0x8000) ? (uint16_t) ((crc << 1) ^ poly) : (uint16_t) (crc << 1);
        }
        return crc;
}

static uint32_t crc32_table[256];
static bool crc32_ready;

static void crc32_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
                uint32_t c = i;
                for (int b = 0; b < 8; b++)
                        c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
                crc32_table[i] = c;
        }
        crc32_ready = true;
}

uint32_t adp_serial_check_compute(enum adp_serial_check_type t, const uint8_t *p, size_t n) {
        uint32_t acc = 0;
        switch (t) {
        case ADP_SERIAL_CHECK_NONE:
                return 0;
        case ADP_SERIAL_CHECK_SUM8:
                for (size_t i = 0; i < n; i++)
                        acc += p[i];
                return acc & 0xff;
        case ADP_SERIAL_CHECK_LRC:
                for (size_t i = 0; i < n; i++)
                        acc += p[i];
                return (uint32_t) (-acc) & 0xff;
        case ADP_SERIAL_CHECK_XOR8:
                for (size_t i = 0; i < n; i++)
                        acc ^= p[i];
                return acc;
        case ADP_SERIAL_CHECK_CRC16_MODBUS:
                return crc16_reflected(p, n, 0xffff, 0xA001);
        case ADP_SERIAL_CHECK_CRC16_CCITT_FALSE:
                return crc16_msb(p, n, 0xffff, 0x1021);
        case ADP_SERIAL_CHECK_CRC16_XMODEM:
                return crc16_msb(p, n, 0x0000, 0x1021);
        case ADP_SERIAL_CHECK_CRC32: {
                if (!crc32_ready)
                        crc32_init(); /* loop thread (and tests) only */
                uint32_t c = 0xffffffffu;
                for (size_t i = 0; i < n; i++)
                        c = crc32_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
                return c ^ 0xffffffffu;
        }
        default:
                return 0;
        }
}

static bool resolve(int64_t v, size_t len, size_t *ret) {
        if (v < 0) {
                if ((uint64_t) -v > len)
                        return false;
                *ret = len - (size_t) -v;
        } else {
                if ((uint64_t) v > len)
                        return false;
                *ret = (size_t) v;
        }
        return true;
}

/* The check value as it is written: width bytes (or 2*width hex digits) in the declared
 * order. */
static size_t encode_value(const struct adp_serial_check *c, uint32_t v, uint8_t *out) {
        size_t w = adp_serial_check_width(c->type);
        uint8_t b[4];
        for (size_t i = 0; i < w; i++) /* big endian first */
                b[i] = (uint8_t) (v >> (8 * (w - 1 - i)));
        if (c->little_endian)
                for (size_t i = 0; i < w / 2; i++) {
                        uint8_t t = b[i];
                        b[i] = b[w - 1 - i];
                        b[w - 1 - i] = t;
                }
        if (!c->hex) {
                memcpy(out, b, w);
                return w;
        }
        static const char hexd[] = "0123456789ABCDEF";
        for (size_t i = 0; i < w; i++) {
                out[2 * i] = (uint8_t) hexd[b[i] >> 4];
                out[2 * i + 1] = (uint8_t) hexd[b[i] & 15];
        }
        return 2 * w;
}

static size_t written_width(const struct adp_serial_check *c) {
        return adp_serial_check_width(c->type) * (c->hex ? 2 : 1);
}

int adp_serial_check_verify(const struct adp_serial_check *c, const uint8_t *frame, size_t len) {
        if (c->type == ADP_SERIAL_CHECK_NONE)
                return 0;
        size_t ww = written_width(c), pos, from, to;
        if (!resolve(c->position, len, &pos) || pos + ww > len)
                return -ERANGE;
        if (!resolve(c->from, len, &from))
                return -ERANGE;
        if (c->to_set) {
                if (!resolve(c->to, len, &to))
                        return -ERANGE;
        } else
                to = pos;
        if (from > to)
                return -ERANGE;
        uint8_t want[8];
        encode_value(c, adp_serial_check_compute(c->type, frame + from, to - from), want);
        if (c->hex) { /* hex digits in either case */
                for (size_t i = 0; i < ww; i++) {
                        uint8_t g = frame[pos + i];
                        if (g >= 'a' && g <= 'f')
                                g = (uint8_t) (g - 'a' + 'A');
                        if (g != want[i])
                                return -EBADMSG;
                }
                return 0;
        }
        return memcmp(want, frame + pos, ww) == 0 ? 0 : -EBADMSG;
}

ssize_t adp_serial_check_append(const struct adp_serial_check *c, uint8_t *buf, size_t len, size_t cap) {
        if (c->type == ADP_SERIAL_CHECK_NONE)
                return (ssize_t) len;
        size_t ww = written_width(c), from;
        if (len + ww > cap)
                return -ENOBUFS;
        /* Coverage as it will be in the finished frame (len + ww bytes). */
        if (!resolve(c->from, len + ww, &from) || from > len)
                return -ERANGE;
        size_t to = len;
        if (c->to_set) {
                if (!resolve(c->to, len + ww, &to) || to > len || to < from)
                        return -ERANGE;
        }
        encode_value(c, adp_serial_check_compute(c->type, buf + from, to - from), buf + len);
        return (ssize_t) (len + ww);
}
