/* SPDX-License-Identifier: MIT */
/* The file endpoint: one JSON object per line (JSON lines) appended to a file under the logs
 * directory, rotated by size (file → file.1 → … → file.<max_files-1>, the oldest removed).
 * With fsync: batch (the default) each batch is fsynced before it is confirmed, so the cursor
 * never passes a line that a power cut could lose. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "endpoint.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "log.h"
#include "uplink-json.h"

struct file_ep {
        struct gw_endpoint *ep;
        char *path;
        uint64_t max_size;
        unsigned max_files;
        enum gw_file_fsync fsync;
        int fd;
        uint64_t size;
};

static int file_create(struct gw_endpoint *ep, const struct gw_endpoint_conf *c, void **ret) {
        struct file_ep *f = calloc(1, sizeof *f);
        if (!f)
                return -ENOMEM;
        f->ep = ep;
        f->fd = -1;
        f->path = strdup(c->path);
        f->max_size = c->max_size;
        f->max_files = c->max_files;
        f->fsync = c->fsync;
        if (!f->path) {
                free(f);
                return -ENOMEM;
        }
        *ret = f;
        return 0;
}

static void file_disconnect(void *t) {
        struct file_ep *f = t;
        if (f->fd >= 0)
                close(f->fd);
        f->fd = -1;
}

static void file_destroy(void *t) {
        struct file_ep *f = t;
        file_disconnect(f);
        free(f->path);
        free(f);
}

static int file_open(struct file_ep *f) {
        struct stat st;
        f->fd = open(f->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
        if (f->fd < 0)
                return -errno;
        if (fstat(f->fd, &st) < 0)
                return -errno;
        f->size = (uint64_t) st.st_size;
        return 0;
}

static int file_connect(void *t) {
        struct file_ep *f = t;
        int r = file_open(f);
        if (r < 0) {
                char why[512];
                snprintf(why, sizeof why, "cannot open %s", f->path);
                gw_endpoint_down(f->ep, r, why);
                return 0;
        }
        gw_endpoint_up(f->ep);
        return 0;
}

static int rotate(struct file_ep *f) {
        char from[4200], to[4200];
        if (f->fsync == GW_FILE_FSYNC_BATCH && fsync(f->fd) < 0)
                return -errno;
        close(f->fd);
        f->fd = -1;
        if (f->max_files <= 1) {
                if (unlink(f->path) < 0 && errno != ENOENT)
                        return -errno;
        } else {
                for (unsigned i = f->max_files - 1; i >= 1; i--) {
                        if (i == 1)
                                snprintf(from, sizeof from, "%s", f->path);
                        else
                                snprintf(from, sizeof from, "%s.%u", f->path, i - 1);
                        snprintf(to, sizeof to, "%s.%u", f->path, i);
                        if (rename(from, to) < 0 && errno != ENOENT)
                                return -errno;
                }
        }
        return file_open(f);
}

static int write_all(int fd, const char *p, size_t n) {
        while (n > 0) {
                ssize_t w = write(fd, p, n);
                if (w < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += w;
                n -= (size_t) w;
        }
        return 0;
}

static int file_send(void *t, const struct gw_ep_item *items, size_t n) {
        struct file_ep *f = t;
        int r;
        for (size_t i = 0; i < n; i++) {
                _cleanup_free_ char *line = NULL;
                size_t len;
                r = gw_uplink_item_json(&items[i], gw_endpoint_name(f->ep), &line, &len);
                if (r < 0)
                        return r;
                if (f->size > 0 && f->size + len + 1 > f->max_size && (r = rotate(f)) < 0)
                        return r;
                line[len] = '\n';
                if ((r = write_all(f->fd, line, len + 1)) < 0)
                        return r;
                f->size += len + 1;
        }
        if (f->fsync == GW_FILE_FSYNC_BATCH && fdatasync(f->fd) < 0)
                return -errno;
        for (size_t i = 0; i < n; i++)
                gw_endpoint_confirm(f->ep, items[i].seq, 0);
        return 0;
}

const struct gw_endpoint_ops gw_endpoint_file_ops = {
        .type = "file",
        .create = file_create,
        .connect = file_connect,
        .send = file_send,
        .disconnect = file_disconnect,
        .destroy = file_destroy,
};
