/* SPDX-License-Identifier: MIT */
/* A Modbus slave simulator for fieldhub's demo, tests and benchmarks: Modbus TCP on loopback,
 * or Modbus RTU on a serial port / pseudo-terminal with several unit ids on the one line.
 *
 * The protocol is implemented here independently of libmodbus and of the adapter's codecs
 * (its own framing, CRC and value encoders), so a test compares two implementations.
 *
 *   modbus-sim --tcp PORT | --rtu PATH | --rtu-pty LINK [--baud N] [--parity none|even|odd] [--stop-bits N]
 *              [--pace] [--units 1,2,3] [--dead UNIT] [--garbage UNIT] [--wrong-unit UNIT]
 *              [--exception-addr ADDR] [--delay-ms N] [--demo] [--log FILE] [--ready FILE]
 *
 * --rtu-pty LINK  make a pseudo-terminal pair itself and serve its master side, LINK a
 *             symlink to the slave side for the master under test: one kernel hop per frame
 *             (a socat pty pair relays each byte through socat and two ptys, whose latency
 *             under load is several times the inter-frame silence at 115200 baud).
 * --pace      emulate the line's timing (a pseudo-terminal ignores baud rates): a request
 *             counts as arrived one character time per byte after its first byte, each
 *             response byte is written at the character time; the silence the master
 *             leaves before each request is measured (logged as gap_us).
 * --dead U    never answer unit U. --garbage U: answer unit U with a corrupt CRC (RTU) or a
 *             truncated frame (TCP). --wrong-unit U: answer unit U as unit U+1.
 * --exception-addr A: reads and writes of holding registers covering A answer exception 2.
 * --demo      registers change every second (temperature, pressure, counter, a coil).
 * --log FILE  one line per request: "REQ t_us unit fc addr count gap_us" (gap_us 0: not
 *             measured: the first request, or one after a response we could not pace).
 * --ready FILE written once listening (for tests), holding the TCP port.
 *
 * The test register map (every unit, unless --demo) is test_map() below, documented in
 * tests/integration/test_modbus.py. SIGTERM stops it. */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define NREG 65536
#define MAX_CLIENTS 64

static uint16_t holding[NREG], input_regs[NREG];
static uint8_t coils[NREG], discrete[NREG];
static bool units[256];
static int dead_unit = -1, garbage_unit = -1, wrong_unit = -1;
static long exception_addr = -1;
static long delay_ms;
static bool demo, pace;
static FILE *reqlog;
static unsigned baud = 19200, stop_bits = 1;
static char parity = 'E';
static volatile sig_atomic_t quit;
static uint64_t last_tx_end;
static bool frame_broken;

static uint64_t now_us(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

/* Precise enough for pacing bytes: sleep, then spin the last 100 us. */
static void sleep_us(uint64_t us) {
        uint64_t t = now_us() + us;
        if (us > 100) {
                uint64_t w = t - 100;
                struct timespec ts = { .tv_sec = (time_t) (w / 1000000), .tv_nsec = (long) (w % 1000000) * 1000 };
                while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !quit)
                        ;
        }
        while (now_us() < t && !quit)
                ;
}

/* ---- the register map ---------------------------------------------------------------- */

/* Stores n registers of a big-endian byte string b in the given order. */
static void put(uint16_t *regs, unsigned addr, const uint8_t *b, unsigned n, const char *order) {
        for (unsigned i = 0; i < n; i++) {
                uint16_t r;
                if (!strcmp(order, "ABCD"))
                        r = (uint16_t) (b[2 * i] << 8 | b[2 * i + 1]);
                else if (!strcmp(order, "BADC"))
                        r = (uint16_t) (b[2 * i + 1] << 8 | b[2 * i]);
                else if (!strcmp(order, "CDAB"))
                        r = (uint16_t) (b[2 * (n - 1 - i)] << 8 | b[2 * (n - 1 - i) + 1]);
                else /* DCBA: little-endian bytes */
                        r = (uint16_t) (b[2 * n - 1 - 2 * i] << 8 | b[2 * n - 2 - 2 * i]);
                regs[addr + i] = r;
        }
}

static void put_u(uint16_t *regs, unsigned addr, uint64_t v, unsigned n, const char *order) {
        uint8_t b[8];
        for (unsigned i = 0; i < 2 * n; i++)
                b[i] = (uint8_t) (v >> (8 * (2 * n - 1 - i)));
        put(regs, addr, b, n, order);
}

static void put_f32(uint16_t *regs, unsigned addr, float f, const char *order) {
        uint32_t u;
        memcpy(&u, &f, 4);
        put_u(regs, addr, u, 2, order);
}

static void put_f64(uint16_t *regs, unsigned addr, double d, const char *order) {
        uint64_t u;
        memcpy(&u, &d, 8);
        put_u(regs, addr, u, 4, order);
}

static void test_map(void) {
        holding[0] = (uint16_t) -2;                                     /* int16 -2 */
        holding[1] = 51234;                                             /* uint16 */
        holding[2] = 0x0201;                                            /* int16 BADC → 0x0102 = 258 */
        const char *orders[] = { "ABCD", "BADC", "CDAB", "DCBA" };
        for (unsigned i = 0; i < 4; i++) {
                put_u(holding, 10 + 2 * i, (uint32_t) -123456789, 2, orders[i]);  /* int32 */
                put_u(holding, 20 + 2 * i, 3000000000u, 2, orders[i]);             /* uint32 */
                put_f32(holding, 30 + 2 * i, -1234.5f, orders[i]);                 /* float32 */
                put_u(holding, 40 + 4 * i, (uint64_t) INT64_C(-1234567890123456789), 4, orders[i]); /* int64 */
                put_f64(holding, 60 + 4 * i, 3.141592653589793, orders[i]);        /* float64 */
        }
        put_u(holding, 56, UINT64_C(18446744073709551000), 4, "ABCD");           /* uint64 */
        const char *s = "FIELDHUB-01";                                           /* string, 6 registers */
        for (unsigned i = 0; i < 6; i++) {
                uint8_t hi = 2 * i < strlen(s) ? (uint8_t) s[2 * i] : 0, lo = 2 * i + 1 < strlen(s) ? (uint8_t) s[2 * i + 1] : 0;
                holding[80 + i] = (uint16_t) (hi << 8 | lo);
        }
        holding[90] = 0xA005;                                                    /* bits 0, 2, 13, 15 */
        holding[91] = 1234;                                                      /* scaled: 123.4 with scale 0.1 */
        static const uint8_t c[8] = { 1, 0, 1, 1, 0, 0, 1, 0 };
        memcpy(coils, c, sizeof c);
        static const uint8_t di[4] = { 0, 1, 1, 0 };
        memcpy(discrete, di, sizeof di);
        for (unsigned i = 0; i < 10; i++)
                input_regs[i] = (uint16_t) (1000 + i);
}

static void demo_tick(void) {
        static uint32_t counter;
        double t = now_us() / 1e6;
        holding[0] = (uint16_t) (int16_t) lround(215 + 30 * sin(t / 20));       /* temperature x0.1 °C */
        put_f32(holding, 2, (float) (1.013 + 0.05 * sin(t / 7)), "ABCD");        /* pressure, bar */
        counter += 7;
        put_u(holding, 4, counter, 2, "ABCD");                                    /* energy counter */
        coils[0] = ((uint64_t) t / 10) % 2;                                      /* running */
}

/* ---- the protocol ---------------------------------------------------------------------- */

static uint16_t crc16(const uint8_t *p, size_t n) {
        uint16_t crc = 0xFFFF;
        for (size_t i = 0; i < n; i++) {
                crc ^= p[i];
                for (int k = 0; k < 8; k++)
                        crc = crc & 1 ? (uint16_t) ((crc >> 1) ^ 0xA001) : (uint16_t) (crc >> 1);
        }
        return crc;
}

static size_t exception(uint8_t *rsp, uint8_t fc, uint8_t code) {
        rsp[0] = fc | 0x80;
        rsp[1] = code;
        return 2;
}

/* Handles one request PDU; returns the response PDU length. */
static size_t handle_pdu(const uint8_t *pdu, size_t n, uint8_t *rsp) {
        if (n < 1)
                return 0;
        uint8_t fc = pdu[0];
        if (n < 5)
                return exception(rsp, fc, 3);
        unsigned addr = (unsigned) (pdu[1] << 8 | pdu[2]), cnt = (unsigned) (pdu[3] << 8 | pdu[4]);
        bool covers_exc = exception_addr >= 0 && (long) addr <= exception_addr && exception_addr < (long) (addr + cnt);
        switch (fc) {
        case 1:
        case 2: {
                if (cnt < 1 || cnt > 2000 || addr + cnt > NREG)
                        return exception(rsp, fc, cnt < 1 || cnt > 2000 ? 3 : 2);
                const uint8_t *src = fc == 1 ? coils : discrete;
                rsp[0] = fc;
                rsp[1] = (uint8_t) ((cnt + 7) / 8);
                memset(rsp + 2, 0, rsp[1]);
                for (unsigned i = 0; i < cnt; i++)
                        if (src[addr + i])
                                rsp[2 + i / 8] |= (uint8_t) (1u << (i % 8));
                return 2u + rsp[1];
        }
        case 3:
        case 4: {
                if (cnt < 1 || cnt > 125)
                        return exception(rsp, fc, 3);
                if (addr + cnt > NREG || (fc == 3 && covers_exc))
                        return exception(rsp, fc, 2);
                const uint16_t *src = fc == 3 ? holding : input_regs;
                rsp[0] = fc;
                rsp[1] = (uint8_t) (2 * cnt);
                for (unsigned i = 0; i < cnt; i++) {
                        rsp[2 + 2 * i] = (uint8_t) (src[addr + i] >> 8);
                        rsp[3 + 2 * i] = (uint8_t) src[addr + i];
                }
                return 2u + rsp[1];
        }
        case 5:
                if (cnt != 0xFF00 && cnt != 0)
                        return exception(rsp, fc, 3);
                coils[addr] = cnt == 0xFF00;
                memcpy(rsp, pdu, 5);
                return 5;
        case 6:
                if (exception_addr == (long) addr)
                        return exception(rsp, fc, 2);
                holding[addr] = (uint16_t) cnt;
                memcpy(rsp, pdu, 5);
                return 5;
        case 15:
        case 16: {
                if (n < 6 || n < 6u + pdu[5])
                        return exception(rsp, fc, 3);
                if (addr + cnt > NREG || (fc == 16 && covers_exc))
                        return exception(rsp, fc, 2);
                for (unsigned i = 0; i < cnt; i++) {
                        if (fc == 15)
                                coils[addr + i] = (pdu[6 + i / 8] >> (i % 8)) & 1;
                        else
                                holding[addr + i] = (uint16_t) (pdu[6 + 2 * i] << 8 | pdu[7 + 2 * i]);
                }
                memcpy(rsp, pdu, 5);
                return 5;
        }
        default:
                return exception(rsp, fc, 1);
        }
}

static void log_req(unsigned unit, const uint8_t *pdu, uint64_t gap) {
        if (!reqlog)
                return;
        unsigned addr = (unsigned) (pdu[1] << 8 | pdu[2]), cnt = (unsigned) (pdu[3] << 8 | pdu[4]);
        fprintf(reqlog, "REQ %llu %u %u %u %u %llu\n", (unsigned long long) now_us(), unit, pdu[0], addr, cnt,
                (unsigned long long) gap);
        fflush(reqlog);
}

/* ---- TCP --------------------------------------------------------------------------------- */

static int serve_tcp(int port, const char *ready) {
        int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t) port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(ls, 16) < 0) {
                fprintf(stderr, "modbus-sim: cannot listen on 127.0.0.1:%d: %s\n", port, strerror(errno));
                return 1;
        }
        socklen_t sl = sizeof sa;
        getsockname(ls, (struct sockaddr *) &sa, &sl);
        if (ready) {
                FILE *f = fopen(ready, "w");
                if (f) {
                        fprintf(f, "%u\n", ntohs(sa.sin_port));
                        fclose(f);
                }
        }
        struct pollfd pf[MAX_CLIENTS + 1];
        uint8_t buf[MAX_CLIENTS][300];
        size_t have[MAX_CLIENTS];
        int n = 0;
        pf[0] = (struct pollfd){ .fd = ls, .events = POLLIN };
        uint64_t last_demo = 0;
        while (!quit) {
                if (demo && now_us() - last_demo > 1000000) {
                        demo_tick();
                        last_demo = now_us();
                }
                if (poll(pf, (nfds_t) n + 1, 200) < 0)
                        continue;
                if (pf[0].revents & POLLIN) {
                        int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
                        if (c >= 0 && n < MAX_CLIENTS) {
                                setsockopt(c, IPPROTO_TCP, 1 /* TCP_NODELAY */, &one, sizeof one);
                                pf[n + 1] = (struct pollfd){ .fd = c, .events = POLLIN };
                                have[n] = 0;
                                n++;
                        } else if (c >= 0)
                                close(c);
                }
                for (int i = 0; i < n; i++) {
                        if (!(pf[i + 1].revents & (POLLIN | POLLHUP | POLLERR)))
                                continue;
                        ssize_t k = read(pf[i + 1].fd, buf[i] + have[i], sizeof buf[i] - have[i]);
                        if (k <= 0) {
                                close(pf[i + 1].fd);
                                pf[i + 1] = pf[n];
                                memcpy(buf[i], buf[n - 1], have[n - 1]);
                                have[i] = have[n - 1];
                                n--;
                                i--;
                                continue;
                        }
                        have[i] += (size_t) k;
                        for (;;) {
                                if (have[i] < 7)
                                        break;
                                size_t len = (size_t) (buf[i][4] << 8 | buf[i][5]);
                                if (len < 2 || len > 254) { /* garbage: drop the connection's buffer */
                                        have[i] = 0;
                                        break;
                                }
                                if (have[i] < 6 + len)
                                        break;
                                uint8_t unit = buf[i][6], rsp[300];
                                log_req(unit, buf[i] + 7, 0);
                                size_t rl = 0;
                                if (units[unit] && unit != dead_unit)
                                        rl = handle_pdu(buf[i] + 7, len - 1, rsp + 7);
                                if (rl) {
                                        if (delay_ms)
                                                sleep_us((uint64_t) delay_ms * 1000);
                                        memcpy(rsp, buf[i], 4);
                                        rsp[4] = (uint8_t) ((rl + 1) >> 8);
                                        rsp[5] = (uint8_t) (rl + 1);
                                        rsp[6] = unit == wrong_unit ? (uint8_t) (unit + 1) : unit;
                                        size_t total = 7 + rl;
                                        if (unit == garbage_unit)
                                                total = 9, rsp[5] = 40; /* a header that promises more */
                                        (void) !write(pf[i + 1].fd, rsp, total);
                                }
                                memmove(buf[i], buf[i] + 6 + len, have[i] - 6 - len);
                                have[i] -= 6 + len;
                        }
                }
        }
        return 0;
}

/* ---- RTU --------------------------------------------------------------------------------- */

static speed_t speed_of(unsigned b) {
        switch (b) {
        case 9600: return B9600;
        case 19200: return B19200;
        case 38400: return B38400;
        case 57600: return B57600;
        case 115200: return B115200;
        default: return B19200;
        }
}

static uint64_t char_us(void) {
        unsigned bits = 1 + 8 + (parity != 'N') + stop_bits;
        return ((uint64_t) bits * 1000000u + baud - 1) / baud;
}

/* Length of a complete request frame in buf, 0 when more bytes are needed. */
static size_t request_len(const uint8_t *b, size_t n) {
        if (n < 2)
                return 0;
        switch (b[1]) {
        case 1: case 2: case 3: case 4: case 5: case 6:
                return n >= 8 ? 8 : 0;
        case 15: case 16:
                if (n < 7)
                        return 0;
                return n >= 9u + b[6] ? 9u + b[6] : 0;
        default:
                return 4; /* unknown function: unit, fc, crc */
        }
}

static int serve_rtu(const char *path, const char *link, const char *ready) {
        int fd;
        if (link) {
                fd = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
                const char *pts = fd >= 0 && grantpt(fd) == 0 && unlockpt(fd) == 0 ? ptsname(fd) : NULL;
                if (!pts) {
                        fprintf(stderr, "modbus-sim: cannot make a pseudo-terminal: %s\n", strerror(errno));
                        return 1;
                }
                (void) unlink(link);
                if (symlink(pts, link) < 0) {
                        fprintf(stderr, "modbus-sim: cannot link %s to %s: %s\n", link, pts, strerror(errno));
                        return 1;
                }
                path = link;
        } else
                fd = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (fd < 0) {
                fprintf(stderr, "modbus-sim: cannot open %s: %s\n", path, strerror(errno));
                return 1;
        }
        struct termios t;
        if (tcgetattr(fd, &t) == 0) {
                cfmakeraw(&t);
                cfsetspeed(&t, speed_of(baud));
                t.c_cc[VMIN] = 1;
                t.c_cc[VTIME] = 0;
                tcsetattr(fd, TCSANOW, &t);
        }
        if (ready) {
                FILE *f = fopen(ready, "w");
                if (f) {
                        fprintf(f, "%s\n", path);
                        fclose(f);
                }
        }
        uint8_t buf[512];
        size_t have = 0;
        uint64_t first_byte = 0, last_demo = 0;
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        while (!quit) {
                if (demo && now_us() - last_demo > 1000000) {
                        demo_tick();
                        last_demo = now_us();
                }
                int pr = poll(&pf, 1, have ? 20 : 200);
                if (pr < 0)
                        continue;
                if (pr == 0) {
                        have = 0; /* an incomplete frame followed by silence: drop it */
                        continue;
                }
                ssize_t k = read(fd, buf + have, sizeof buf - have);
                if (k <= 0) {
                        if (k < 0 && errno == EAGAIN)
                                continue;
                        sleep_us(10000); /* the other end is not open yet */
                        continue;
                }
                if (have == 0)
                        first_byte = now_us();
                have += (size_t) k;
                for (;;) {
                        size_t len = request_len(buf, have);
                        if (!len || len > have)
                                break;
                        if (crc16(buf, len) != 0) {
                                /* Resync: drop one byte. */
                                memmove(buf, buf + 1, --have);
                                continue;
                        }
                        uint8_t unit = buf[0];
                        /* gap 0: not measured (first request, or our previous frame broke). */
                        uint64_t gap = last_tx_end && !frame_broken ? first_byte - last_tx_end : 0;
                        frame_broken = false;
                        log_req(unit, buf + 1, gap);
                        uint8_t rsp[300];
                        size_t rl = 0;
                        if (unit != 0 && units[unit] && unit != dead_unit)
                                rl = handle_pdu(buf + 1, len - 3, rsp + 1);
                        memmove(buf, buf + len, have - len);
                        have -= len;
                        if (!rl)
                                continue;
                        if (pace) {
                                /* On a real line the request took len characters to arrive (a
                                 * pseudo-terminal delivers it at once): wait for its end. */
                                uint64_t end = first_byte + len * char_us(), now = now_us();
                                if (end > now)
                                        sleep_us(end - now);
                        }
                        if (delay_ms)
                                sleep_us((uint64_t) delay_ms * 1000);
                        else /* our own inter-frame silence: 3.5 characters, 1750 us above 19200 baud */
                                sleep_us(baud > 19200 ? 1750 : (char_us() * 7 + 1) / 2);
                        rsp[0] = unit == wrong_unit ? (uint8_t) (unit + 1) : unit;
                        uint16_t crc = crc16(rsp, 1 + rl);
                        rsp[1 + rl] = (uint8_t) crc;
                        rsp[2 + rl] = (uint8_t) (crc >> 8);
                        if (unit == garbage_unit)
                                rsp[2 + rl] ^= 0x5a;
                        size_t total = 3 + rl;
                        /* The end of our frame is taken just before its last byte is written:
                         * the master cannot have it earlier, so a measured gap is never too long. */
                        uint64_t t_last = 0;
                        if (pace) {
                                uint64_t t0 = now_us();
                                /* Each byte reaches the master when it would have
                                 * finished on the wire. */
                                for (size_t i = 0; i < total; i++) {
                                        uint64_t due = t0 + (i + 1) * char_us(), now = now_us();
                                        if (due > now)
                                                sleep_us(due - now);
                                        t_last = now_us();
                                        /* Descheduled past the master's byte timeout (a loaded
                                         * machine): our frame broke, so the master rightly took
                                         * it as ended; the next gap says nothing about it. */
                                        if (t_last > due + 20000)
                                                frame_broken = true;
                                        (void) !write(fd, rsp + i, 1);
                                }
                        } else {
                                t_last = now_us();
                                (void) !write(fd, rsp, total);
                        }
                        tcdrain(fd);
                        last_tx_end = t_last;
                        first_byte = now_us();
                }
        }
        return 0;
}

static void on_term(int sig) {
        quit = 1;
}

int main(int argc, char **argv) {
        const char *rtu = NULL, *rtu_link = NULL, *ready = NULL;
        int tcp = -1;
        bool any_unit = false;
        for (int i = 1; i < argc; i++) {
                const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (!strcmp(a, name) && v && (i++, true))
                if (ARG("--tcp"))
                        tcp = atoi(v);
                else if (ARG("--rtu"))
                        rtu = v;
                else if (ARG("--rtu-pty"))
                        rtu_link = v;
                else if (ARG("--baud"))
                        baud = (unsigned) atoi(v);
                else if (ARG("--parity"))
                        parity = !strcmp(v, "none") ? 'N' : !strcmp(v, "odd") ? 'O' : 'E';
                else if (ARG("--stop-bits"))
                        stop_bits = (unsigned) atoi(v);
                else if (ARG("--units")) {
                        char *dup = strdup(v), *save = NULL;
                        for (char *tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
                                units[atoi(tok) & 0xff] = any_unit = true;
                        free(dup);
                } else if (ARG("--dead"))
                        dead_unit = atoi(v);
                else if (ARG("--garbage"))
                        garbage_unit = atoi(v);
                else if (ARG("--wrong-unit"))
                        wrong_unit = atoi(v);
                else if (ARG("--exception-addr"))
                        exception_addr = atol(v);
                else if (ARG("--delay-ms"))
                        delay_ms = atol(v);
                else if (ARG("--log")) {
                        reqlog = fopen(v, "a");
                        if (!reqlog) {
                                fprintf(stderr, "modbus-sim: cannot open %s: %s\n", v, strerror(errno));
                                return 1;
                        }
                } else if (ARG("--ready"))
                        ready = v;
                else if (!strcmp(a, "--demo"))
                        demo = true;
                else if (!strcmp(a, "--pace"))
                        pace = true;
                else {
                        fprintf(stderr, "usage: modbus-sim --tcp PORT | --rtu PATH [options] (see the source)\n");
                        return 2;
                }
        }
        if (!any_unit)
                for (int u = 0; u < 256; u++)
                        units[u] = true;
        struct sigaction sa = { .sa_handler = on_term };
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        signal(SIGPIPE, SIG_IGN);
        if (demo)
                demo_tick();
        else
                test_map();
        if (tcp >= 0)
                return serve_tcp(tcp, ready);
        if (rtu || rtu_link)
                return serve_rtu(rtu, rtu_link, ready);
        fprintf(stderr, "modbus-sim: give --tcp PORT or --rtu PATH\n");
        return 2;
}
