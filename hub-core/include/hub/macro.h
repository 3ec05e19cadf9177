/* SPDX-License-Identifier: MIT */
#pragma once

/* Small helpers shared by every layer: cleanup attributes, ownership transfer,
 * export marking. Modelled on systemd's alloc-util.h / macro.h. */

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

#define HUB_EXPORT __attribute__((visibility("default")))

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _unused_ __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _warn_unused_result_ __attribute__((warn_unused_result))

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* Returns the pointer and leaves NULL behind (ownership transfer out of a _cleanup_ variable). */
#define TAKE_PTR(p)                          \
        ({                                   \
                __typeof__(p) _tp_ = (p);    \
                (p) = NULL;                  \
                _tp_;                        \
        })
#define TAKE_FD(fd)                  \
        ({                           \
                int _tf_ = (fd);     \
                (fd) = -EBADF;       \
                _tf_;                \
        })

static inline void freep(void *p) {
        int saved = errno;
        free(*(void **) p);
        errno = saved;
}
#define _cleanup_free_ _cleanup_(freep)

static inline void closep(int *fd) {
        if (*fd >= 0) {
                int saved = errno;
                (void) close(*fd);
                errno = saved;
        }
}
#define _cleanup_close_ _cleanup_(closep)

/* DEFINE_CLEANUP_FUNC(struct foo *, foo_free) defines foo_freep() for _cleanup_(). */
#define DEFINE_CLEANUP_FUNC(type, func)                  \
        static inline void func##p(type *p) {            \
                if (*p) {                                \
                        int _saved_ = errno;             \
                        func(*p);                        \
                        errno = _saved_;                 \
                }                                        \
        }

/* Overwrites memory that held a secret, in a way the compiler may not elide. */
static inline void hub_explicit_bzero(void *p, size_t n) {
        volatile unsigned char *v = p;
        while (n--)
                *v++ = 0;
}

#define streq(a, b) (strcmp((a), (b)) == 0)
