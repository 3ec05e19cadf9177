/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "admin-proto.h"
#include "hub/macro.h"

int gw_admin_encode(const json_t *j, char **ret, size_t *ret_len) {
        char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!s)
                return -ENOMEM;
        size_t n = strlen(s);
        char *t = realloc(s, n + 2);
        if (!t) {
                free(s);
                return -ENOMEM;
        }
        t[n] = '\n';
        t[n + 1] = 0;
        *ret = t;
        *ret_len = n + 1;
        return 0;
}

int gw_admin_connect(const char *path, int *ret_fd) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0)
                return -errno;
        *ret_fd = TAKE_FD(fd);
        return 0;
}

static uint64_t now_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000ULL + (uint64_t) ts.tv_nsec / 1000;
}

int gw_admin_call(int fd, json_t *request, uint64_t timeout_usec, json_t **ret_response) {
        _cleanup_free_ char *out = NULL;
        size_t len;
        int r = gw_admin_encode(request, &out, &len);
        if (r < 0)
                return r;
        for (size_t off = 0; off < len;) {
                ssize_t w = send(fd, out + off, len - off, MSG_NOSIGNAL);
                if (w < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                off += (size_t) w;
        }

        uint64_t deadline = now_usec() + timeout_usec;
        _cleanup_free_ char *buf = NULL;
        size_t have = 0, cap = 0;
        for (;;) {
                uint64_t now = now_usec();
                if (now >= deadline)
                        return -ETIMEDOUT;
                struct pollfd p = { .fd = fd, .events = POLLIN };
                int pr = poll(&p, 1, (int) ((deadline - now + 999) / 1000));
                if (pr < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (pr == 0)
                        return -ETIMEDOUT;
                if (have + 4096 > cap) {
                        if (cap >= GW_ADMIN_MAX_MSG)
                                return -E2BIG;
                        size_t ncap = cap ? cap * 2 : 16384;
                        char *n = realloc(buf, ncap + 1);
                        if (!n)
                                return -ENOMEM;
                        buf = n;
                        cap = ncap;
                }
                ssize_t rd = recv(fd, buf + have, cap - have, 0);
                if (rd < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (rd == 0)
                        return -ECONNRESET;
                have += (size_t) rd;
                char *nl = memchr(buf, '\n', have);
                if (!nl)
                        continue;
                json_error_t err;
                json_t *j = json_loadb(buf, (size_t) (nl - buf), 0, &err);
                if (!j)
                        return -EBADMSG;
                *ret_response = j;
                return 0;
        }
}
