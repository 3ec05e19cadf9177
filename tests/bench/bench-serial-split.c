/* SPDX-License-Identifier: MIT */
/* The baseline of tests/bench/bench-serial.py: the least a reader can do with a serial
 * stream — read a tty (raw, blocking) and count CR LF terminated lines, nothing else.
 * Usage: bench-serial-split TTY N_LINES. Prints "lines seconds cpu_seconds". */

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
        if (argc != 3) {
                fprintf(stderr, "usage: %s TTY N_LINES\n", argv[0]);
                return 2;
        }
        int fd = open(argv[1], O_RDONLY | O_NOCTTY);
        if (fd < 0) {
                perror(argv[1]);
                return 1;
        }
        struct termios t;
        if (tcgetattr(fd, &t) == 0) {
                cfmakeraw(&t);
                tcsetattr(fd, TCSANOW, &t);
        }
        long want = atol(argv[2]), lines = 0;
        char buf[4096], prev = 0;
        double t0 = 0;
        printf("ready\n");
        fflush(stdout);
        while (lines < want) {
                ssize_t n = read(fd, buf, sizeof buf);
                if (n <= 0)
                        break;
                if (t0 == 0)
                        t0 = now();
                for (ssize_t i = 0; i < n; i++) {
                        if (buf[i] == '\n' && prev == '\r')
                                lines++;
                        prev = buf[i];
                }
        }
        double el = now() - t0;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        printf("%ld %.6f %.6f\n", lines, el,
               (double) ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double) ru.ru_stime.tv_sec +
                       ru.ru_stime.tv_usec / 1e6);
        return 0;
}
