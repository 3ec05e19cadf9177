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
#include "hub/json-dump.h"
#include "hub/macro.h"

int gw_admin_encode(const json_t *j, char **ret, size_t *ret_len) {
        char *s = hub_json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
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

int gw_admin_send(int fd, const json_t *request, int pass_fd) {
        _cleanup_free_ char *out = NULL;
        size_t len, off = 0;
        int r = gw_admin_encode(request, &out, &len);
        if (r < 0)
                return r;
        if (pass_fd >= 0) {
                /* The descriptor rides on the first byte. */
                union {
                        struct cmsghdr h;
                        char buf[CMSG_SPACE(sizeof(int))];
                } ctl = { 0 };
                struct iovec iov = { .iov_base = out, .iov_len = 1 };
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                                     .msg_controllen = sizeof ctl.buf };
                struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
                cm->cmsg_level = SOL_SOCKET;
                cm->cmsg_type = SCM_RIGHTS;
                cm->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(cm), &pass_fd, sizeof(int));
                for (;;) {
                        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
                        if (w < 0 && errno == EINTR)
                                continue;
                        if (w < 0)
                                return -errno;
                        off = (size_t) w;
                        break;
                }
        }
        while (off < len) {
                ssize_t w = send(fd, out + off, len - off, MSG_NOSIGNAL);
                if (w < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                off += (size_t) w;
        }
        return 0;
}

void gw_admin_reader_done(struct gw_admin_reader *r) {
        free(r->buf);
        *r = (struct gw_admin_reader) { 0 };
}

int gw_admin_read(int fd, struct gw_admin_reader *r, uint64_t timeout_usec, json_t **ret_json) {
        uint64_t deadline = timeout_usec == UINT64_MAX ? UINT64_MAX : now_usec() + timeout_usec;
        for (;;) {
                char *nl = r->have ? memchr(r->buf, '\n', r->have) : NULL;
                if (nl) {
                        size_t line = (size_t) (nl - r->buf);
                        json_error_t err;
                        json_t *j = json_loadb(r->buf, line, 0, &err);
                        memmove(r->buf, nl + 1, r->have - line - 1);
                        r->have -= line + 1;
                        if (!j)
                                return -EBADMSG;
                        *ret_json = j;
                        return 0;
                }
                int wait_ms = -1;
                if (deadline != UINT64_MAX) {
                        uint64_t now = now_usec();
                        if (now >= deadline)
                                return -ETIMEDOUT;
                        wait_ms = (int) MIN((deadline - now + 999) / 1000, (uint64_t) 1 << 30);
                }
                struct pollfd p = { .fd = fd, .events = POLLIN };
                int pr = poll(&p, 1, wait_ms);
                if (pr < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (pr == 0)
                        return -ETIMEDOUT;
                if (r->have + 4096 > r->cap) {
                        if (r->cap >= GW_ADMIN_MAX_REPLY)
                                return -E2BIG;
                        size_t ncap = r->cap ? r->cap * 2 : 16384;
                        char *n = realloc(r->buf, ncap);
                        if (!n)
                                return -ENOMEM;
                        r->buf = n;
                        r->cap = ncap;
                }
                ssize_t rd = recv(fd, r->buf + r->have, r->cap - r->have, 0);
                if (rd < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (rd == 0)
                        return -ECONNRESET;
                r->have += (size_t) rd;
        }
}

int gw_admin_call(int fd, json_t *request, uint64_t timeout_usec, json_t **ret_response) {
        _cleanup_(gw_admin_reader_done) struct gw_admin_reader rd = { 0 };
        int r = gw_admin_send(fd, request, -1);
        if (r < 0)
                return r;
        return gw_admin_read(fd, &rd, timeout_usec, ret_response);
}
