/* SPDX-License-Identifier: MIT */
/* The serial port: opened non-blocking for the event loop, exclusively (TIOCEXCL, checked
 * first so that root is refused a port another process holds), raw termios with the
 * configured speed, parity, data and stop bits and flow control, and RS-485 mode through
 * TIOCSRS485 where the UART supports it. */

#include <errno.h>
#include <fcntl.h>
#include <linux/serial.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include "serial-internal.h"

static speed_t speed_of(unsigned baud) {
        static const struct { unsigned b; speed_t s; } t[] = {
                { 300, B300 },         { 600, B600 },         { 1200, B1200 },       { 2400, B2400 },
                { 4800, B4800 },       { 9600, B9600 },       { 19200, B19200 },     { 38400, B38400 },
                { 57600, B57600 },     { 115200, B115200 },   { 230400, B230400 },   { 460800, B460800 },
                { 500000, B500000 },   { 576000, B576000 },   { 921600, B921600 },   { 1000000, B1000000 },
                { 1152000, B1152000 }, { 1500000, B1500000 }, { 2000000, B2000000 }, { 3000000, B3000000 },
                { 4000000, B4000000 },
        };
        for (size_t i = 0; i < ELEMENTSOF(t); i++)
                if (t[i].b == baud)
                        return t[i].s;
        return 0;
}

int adp_serial_tty_open(const struct adp_serial_port_conf *pc, char *why, size_t why_size) {
        int r;
        int fd = open(pc->device, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) {
                r = -errno;
                if (errno == EBUSY)
                        snprintf(why, why_size, "serial port %s is taken: another process holds it exclusively "
                                 "(TIOCEXCL)", pc->device);
                else
                        snprintf(why, why_size, "cannot open serial port %s: %s", pc->device, strerror(errno));
                return r;
        }
        int excl = 0;
        if (ioctl(fd, TIOCGEXCL, &excl) == 0 && excl) {
                snprintf(why, why_size, "serial port %s is taken: another process holds it exclusively (TIOCEXCL)",
                         pc->device);
                close(fd);
                return -EBUSY;
        }
        struct termios t;
        if (tcgetattr(fd, &t) < 0) {
                r = -errno;
                snprintf(why, why_size, "%s is not a serial port: %s", pc->device, strerror(errno));
                close(fd);
                return r == -ENOTTY ? -ENOTTY : r;
        }
        if (ioctl(fd, TIOCEXCL) < 0) {
                r = -errno;
                snprintf(why, why_size, "cannot take serial port %s exclusively (TIOCEXCL): %s", pc->device,
                         strerror(errno));
                close(fd);
                return r;
        }
        cfmakeraw(&t);
        speed_t sp = speed_of(pc->baud);
        cfsetispeed(&t, sp);
        cfsetospeed(&t, sp);
        t.c_cflag &= (tcflag_t) ~(CSIZE | PARENB | PARODD | CSTOPB | CRTSCTS);
        t.c_cflag |= CLOCAL | CREAD;
        t.c_cflag |= pc->data_bits == 5 ? CS5 : pc->data_bits == 6 ? CS6 : pc->data_bits == 7 ? CS7 : CS8;
        if (pc->parity == 'E')
                t.c_cflag |= PARENB;
        else if (pc->parity == 'O')
                t.c_cflag |= PARENB | PARODD;
        if (pc->stop_bits == 2)
                t.c_cflag |= CSTOPB;
        t.c_iflag &= (tcflag_t) ~(IXON | IXOFF | IXANY);
        if (pc->flow == ADP_SERIAL_FLOW_RTSCTS)
                t.c_cflag |= CRTSCTS;
        else if (pc->flow == ADP_SERIAL_FLOW_XONXOFF)
                t.c_iflag |= IXON | IXOFF;
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        if (tcsetattr(fd, TCSANOW, &t) < 0) {
                r = -errno;
                snprintf(why, why_size, "cannot configure serial port %s (%u baud, %u%c%u): %s", pc->device, pc->baud,
                         pc->data_bits, pc->parity, pc->stop_bits, strerror(errno));
                close(fd);
                return r;
        }
        if (pc->rs485) {
                struct serial_rs485 rs = { .flags = SER_RS485_ENABLED | SER_RS485_RTS_ON_SEND };
                if (ioctl(fd, TIOCSRS485, &rs) < 0) {
                        r = -errno;
                        snprintf(why, why_size, "serial port %s does not support RS-485 mode (TIOCSRS485: %s)%s",
                                 pc->device, strerror(errno),
                                 errno == ENOTTY ? "; it is not an RS-485 capable UART (a pseudo-terminal or a plain "
                                                   "RS-232 port): set rs485: false or use a transceiver with automatic "
                                                   "direction control" : "");
                        close(fd);
                        return r;
                }
        }
        (void) tcflush(fd, TCIOFLUSH);
        return fd;
}
