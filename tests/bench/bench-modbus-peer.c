/* SPDX-License-Identifier: MIT */
/* Benchmark peers for the Modbus adapter (tests/bench/bench-modbus.py), both on libmodbus:
 *
 *   bench-modbus-peer server PORT
 *       a Modbus TCP server on 127.0.0.1:PORT (every unit id, holding registers 0..999: 500
 *       float32 values, big-endian register pairs, plausible measurements such as 231.47 that
 *       change with every request, several clients through select()); prints "requests N at T" (the
 *       requests answered so far, CLOCK_MONOTONIC seconds) on SIGUSR1, so the benchmark counts every contender the same way.
 *   bench-modbus-peer client PORT UNITS COUNT SECONDS
 *       the bare loop: reads COUNT holding registers from each of unit 1..UNITS in turn, as
 *       fast as it can, for SECONDS; prints "requests N registers M seconds S". */

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <modbus/modbus.h>

static volatile sig_atomic_t report;

static void on_usr1(int sig) {
        (void) sig;
        report = 1;
}

/* Register pair i (registers 2i, 2i+1) holds a float32 measurement, ABCD order. */
static void set_float(modbus_mapping_t *map, unsigned i, unsigned long long n) {
        float v = 20.0f + (float) (i % 50) * 4.5f + (float) (n % 1000) * 0.01f;
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        map->tab_registers[2 * i] = (uint16_t) (u >> 16);
        map->tab_registers[2 * i + 1] = (uint16_t) u;
}

static double now_s(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int server(const char *port) {
        modbus_t *ctx = modbus_new_tcp("127.0.0.1", atoi(port));
        modbus_mapping_t *map = modbus_mapping_new(0, 0, 1000, 0);
        uint8_t q[MODBUS_TCP_MAX_ADU_LENGTH];
        if (!ctx || !map)
                return 1;
        for (unsigned i = 0; i < 500; i++)
                set_float(map, i, i);
        struct sigaction sa = { .sa_handler = on_usr1 };
        sigaction(SIGUSR1, &sa, NULL); /* no SA_RESTART: select() returns EINTR */
        int ls = modbus_tcp_listen(ctx, 16);
        if (ls < 0) {
                fprintf(stderr, "listen: %s\n", modbus_strerror(errno));
                return 1;
        }
        fd_set all;
        FD_ZERO(&all);
        FD_SET(ls, &all);
        int maxfd = ls;
        unsigned long long n = 0;
        for (;;) {
                fd_set rd = all;
                struct timeval tv = { .tv_sec = 0, .tv_usec = 200000 };
                if (report) {
                        report = 0;
                        printf("requests %llu at %.6f\n", n, now_s()); /* CLOCK_MONOTONIC */
                        fflush(stdout);
                }
                if (select(maxfd + 1, &rd, NULL, NULL, &tv) < 0)
                        continue;
                for (int fd = 0; fd <= maxfd; fd++) {
                        if (!FD_ISSET(fd, &rd))
                                continue;
                        if (fd == ls) {
                                int c = accept(ls, NULL, NULL);
                                if (c >= 0) {
                                        FD_SET(c, &all);
                                        if (c > maxfd)
                                                maxfd = c;
                                }
                                continue;
                        }
                        modbus_set_socket(ctx, fd);
                        int rc = modbus_receive(ctx, q);
                        if (rc > 0) {
                                set_float(map, (unsigned) (n % 500), n);
                                modbus_reply(ctx, q, rc, map);
                                n++;
                        } else if (rc < 0) {
                                close(fd);
                                FD_CLR(fd, &all);
                        }
                }
        }
}

static int client(const char *port, int units, int count, double secs) {
        modbus_t *ctx = modbus_new_tcp("127.0.0.1", atoi(port));
        uint16_t regs[MODBUS_MAX_READ_REGISTERS];
        if (!ctx || modbus_connect(ctx) < 0) {
                fprintf(stderr, "connect: %s\n", modbus_strerror(errno));
                return 1;
        }
        unsigned long long n = 0, r = 0;
        double t0 = now_s(), t;
        while ((t = now_s()) - t0 < secs)
                for (int u = 1; u <= units; u++) {
                        modbus_set_slave(ctx, u);
                        if (modbus_read_registers(ctx, 0, count, regs) == count) {
                                n++;
                                r += (unsigned) count;
                        }
                }
        printf("requests %llu registers %llu seconds %.3f\n", n, r, now_s() - t0);
        return 0;
}

int main(int argc, char **argv) {
        if (argc == 3 && !strcmp(argv[1], "server"))
                return server(argv[2]);
        if (argc == 6 && !strcmp(argv[1], "client"))
                return client(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]));
        fprintf(stderr, "usage: bench-modbus-peer server PORT | client PORT UNITS COUNT SECONDS\n");
        return 2;
}
