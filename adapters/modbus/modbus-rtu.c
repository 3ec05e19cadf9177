/* SPDX-License-Identifier: MIT */
/* Modbus RTU: one libmodbus context per serial line, owned exclusively (TIOCEXCL), RS-485
 * mode and RTS timing where the port supports them, and the line's timing figures. */

#include <errno.h>
#include <linux/serial.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>

#include "modbus-internal.h"
#include <modbus/modbus-rtu.h>
#include <modbus/modbus.h>

uint64_t adp_modbus_rtu_char_usec(const struct adp_modbus_line_conf *lc) {
        /* start + data + parity + stop bits */
        unsigned bits = 1 + lc->data_bits + (lc->parity != 'N') + lc->stop_bits;
        return ((uint64_t) bits * 1000000u + lc->baud - 1) / lc->baud;
}

uint64_t adp_modbus_rtu_silence_usec(const struct adp_modbus_line_conf *lc) {
        if (lc->baud > 19200)
                return 1750;
        return (adp_modbus_rtu_char_usec(lc) * 7 + 1) / 2;
}

uint64_t adp_modbus_rtu_transaction_usec(const struct adp_modbus_line_conf *lc, enum adp_modbus_table t,
                                         unsigned count) {
        /* Request: unit, fc, addr(2), count(2), crc(2) = 8 bytes. Response: unit, fc, byte
         * count, data, crc(2). */
        bool bits = t == ADP_MODBUS_COIL || t == ADP_MODBUS_DISCRETE_INPUT;
        unsigned data = bits ? (count + 7) / 8 : 2 * count;
        unsigned chars = 8 + 5 + data;
        return chars * adp_modbus_rtu_char_usec(lc) + 2 * adp_modbus_rtu_silence_usec(lc) + lc->turnaround_usec;
}

int adp_modbus_rtu_open(const struct adp_modbus_line_conf *lc, modbus_t **ret, char *why, size_t why_size) {
        modbus_t *ctx = modbus_new_rtu(lc->device, (int) lc->baud, lc->parity, (int) lc->data_bits, (int) lc->stop_bits);
        int r;

        if (!ctx) {
                r = -errno;
                snprintf(why, why_size, "cannot create a Modbus RTU context for %s: %s", lc->device, strerror(errno));
                return r;
        }
        (void) modbus_set_response_timeout(ctx, (uint32_t) (lc->timeout_usec / 1000000),
                                           (uint32_t) (lc->timeout_usec % 1000000));
        /* Between two bytes of one frame: generous against USB adapters' latency, but
         * bounded by the response timeout. */
        uint64_t bt = MIN(lc->timeout_usec, (uint64_t) 100000);
        (void) modbus_set_byte_timeout(ctx, 0, (uint32_t) bt);
        if (modbus_connect(ctx) < 0) {
                r = -errno;
                if (errno == EBUSY)
                        snprintf(why, why_size, "serial port %s is taken: another process holds it exclusively "
                                 "(TIOCEXCL)", lc->device);
                else
                        snprintf(why, why_size, "cannot open serial port %s: %s", lc->device, strerror(errno));
                modbus_free(ctx);
                return r;
        }
        int fd = modbus_get_socket(ctx);
        int excl = 0;
        /* Privileged processes pass TIOCEXCL: check it ourselves so that root is refused a
         * port another process owns, too. */
        if (ioctl(fd, TIOCGEXCL, &excl) == 0 && excl) {
                snprintf(why, why_size, "serial port %s is taken: another process holds it exclusively (TIOCEXCL)",
                         lc->device);
                modbus_close(ctx);
                modbus_free(ctx);
                return -EBUSY;
        }
        if (ioctl(fd, TIOCEXCL) < 0) {
                r = -errno;
                snprintf(why, why_size, "cannot take serial port %s exclusively (TIOCEXCL): %s", lc->device,
                         strerror(errno));
                modbus_close(ctx);
                modbus_free(ctx);
                return r;
        }
        if (lc->rs485) {
                if (modbus_rtu_set_serial_mode(ctx, MODBUS_RTU_RS485) < 0) {
                        r = -errno;
                        snprintf(why, why_size,
                                 "serial port %s does not support RS-485 mode (TIOCSRS485: %s)%s", lc->device,
                                 strerror(errno),
                                 errno == ENOTTY ? "; it is not an RS-485 capable UART (a pseudo-terminal or a plain "
                                                   "RS-232 port): set rs485: false or use a transceiver with automatic "
                                                   "direction control" : "");
                        modbus_close(ctx);
                        modbus_free(ctx);
                        return r;
                }
                if (lc->rts_delay_usec > 0) {
                        /* The kernel driver switches the transceiver: give it our delays. */
                        struct serial_rs485 rs;
                        if (ioctl(fd, TIOCGRS485, &rs) < 0 ||
                            (rs.delay_rts_before_send = (uint32_t) ((lc->rts_delay_usec + 999) / 1000),
                             rs.delay_rts_after_send = rs.delay_rts_before_send, ioctl(fd, TIOCSRS485, &rs) < 0)) {
                                r = -errno;
                                snprintf(why, why_size, "cannot set the RS-485 RTS delays of %s: %s", lc->device,
                                         strerror(errno));
                                modbus_close(ctx);
                                modbus_free(ctx);
                                return r;
                        }
                }
        }
        *ret = ctx;
        return 0;
}
