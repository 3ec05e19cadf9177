/* SPDX-License-Identifier: MIT */
/* Secrets referenced from the configuration: `<base>_file: /path` or `<base>_credential:
 * name` ($CREDENTIALS_DIRECTORY/name, systemd's LoadCredential=). The YAML never holds a
 * secret, and no message built here ever contains one: errors name the file, not its
 * content. */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapter/conf.h"

static void wipe_free(char *p, size_t n) {
        if (!p)
                return;
        hub_explicit_bzero(p, n);
        free(p);
}

/* Reads the secret file; on error adds a message at `at` naming `origin`. */
static int read_secret(const char *path, const char *origin, const struct adp_conf_node *at,
                       struct adp_conf_errors *e, char **ret) {
        _cleanup_close_ int fd = -EBADF;
        struct stat st;
        char *buf = NULL;
        size_t len = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0) {
                int r = errno;
                if (r == ENOENT)
                        adp_conf_error(e, at, "%s does not exist, expected a readable secret file", origin);
                else
                        adp_conf_error(e, at, "cannot open %s: %s", origin, strerror(r));
                return -EINVAL;
        }
        if (fstat(fd, &st) < 0) {
                adp_conf_error(e, at, "cannot stat %s: %s", origin, strerror(errno));
                return -EINVAL;
        }
        if (!S_ISREG(st.st_mode)) {
                adp_conf_error(e, at, "%s is not a regular file, expected a secret file", origin);
                return -EINVAL;
        }
        if (st.st_mode & 0007) {
                const char *what = (st.st_mode & 0004) ? "readable" : (st.st_mode & 0002) ? "writable" : "accessible";
                adp_conf_error(e, at, "%s is %s by others (mode %04o); chmod o-rwx it", origin, what,
                               (unsigned) (st.st_mode & 07777));
                return -EINVAL;
        }
        if (st.st_size > ADP_CONF_SECRET_MAX) {
                adp_conf_error(e, at, "%s is larger than %u bytes, expected a short secret", origin,
                               ADP_CONF_SECRET_MAX);
                return -EINVAL;
        }

        buf = malloc(ADP_CONF_SECRET_MAX + 2);
        if (!buf)
                return -ENOMEM;
        for (;;) {
                ssize_t k = read(fd, buf + len, ADP_CONF_SECRET_MAX + 1 - len);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        adp_conf_error(e, at, "cannot read %s: %s", origin, strerror(errno));
                        wipe_free(buf, ADP_CONF_SECRET_MAX + 2);
                        return -EINVAL;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
                if (len > ADP_CONF_SECRET_MAX) {
                        adp_conf_error(e, at, "%s is larger than %u bytes, expected a short secret", origin,
                                       ADP_CONF_SECRET_MAX);
                        wipe_free(buf, ADP_CONF_SECRET_MAX + 2);
                        return -EINVAL;
                }
        }
        while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' || buf[len - 1] == ' ' ||
                           buf[len - 1] == '\t'))
                buf[--len] = 0;
        buf[len] = 0;
        if (len == 0) {
                adp_conf_error(e, at, "%s is empty, expected a secret", origin);
                wipe_free(buf, ADP_CONF_SECRET_MAX + 2);
                return -EINVAL;
        }
        if (memchr(buf, 0, len)) {
                adp_conf_error(e, at, "%s contains a NUL byte, expected a text secret", origin);
                wipe_free(buf, ADP_CONF_SECRET_MAX + 2);
                return -EINVAL;
        }
        *ret = buf;
        return 0;
}

int adp_conf_get_secret_full(const struct adp_conf_node *map, const char *base, bool required,
                             struct adp_conf_errors *e, char **ret_secret, const struct adp_conf_node **ret_node,
                             char **ret_origin) {
        _cleanup_free_ char *k_file = NULL, *k_cred = NULL, *origin = NULL, *path = NULL;
        const struct adp_conf_node *inl, *nf, *nc, *at;
        const char *file = NULL, *cred = NULL;
        char *secret = NULL;
        int r;

        if (!base || !ret_secret)
                return -EINVAL;
        if (adp_conf_kind(map) != ADP_CONF_MAP && adp_conf_kind(map) != ADP_CONF_NULL)
                return -EINVAL; /* reported by whoever read the map */

        if (asprintf(&k_file, "%s_file", base) < 0 || asprintf(&k_cred, "%s_credential", base) < 0)
                return -ENOMEM;

        inl = adp_conf_get(map, base);
        if (inl) {
                /* Do not echo the value: it is probably the secret itself. */
                adp_conf_error(e, inl, "secrets are never written in the configuration; use %s: or %s:", k_file,
                               k_cred);
                return -EINVAL;
        }

        nf = adp_conf_get(map, k_file);
        nc = adp_conf_get(map, k_cred);
        if (nf && nc) {
                adp_conf_error(e, nc, "found both %s and %s, expected only one of them", k_file, k_cred);
                return -EINVAL;
        }
        if (nf) {
                r = adp_conf_get_string(map, k_file, true, e, &file);
                if (r < 0)
                        return r;
                at = nf;
                if (file[0] != '/') {
                        char found[128];
                        adp_conf_error(e, nf, "found %s, expected an absolute path",
                                       adp_conf_describe(nf, found, sizeof found));
                        return -EINVAL;
                }
                path = strdup(file);
                if (!path || asprintf(&origin, "\"%s\"", file) < 0)
                        return -ENOMEM;
        } else if (nc) {
                r = adp_conf_get_string(map, k_cred, true, e, &cred);
                if (r < 0)
                        return r;
                at = nc;
                if (!cred[0] || strchr(cred, '/') || streq(cred, ".") || streq(cred, "..")) {
                        char found[128];
                        adp_conf_error(e, nc, "found %s, expected a credential name (without '/')",
                                       adp_conf_describe(nc, found, sizeof found));
                        return -EINVAL;
                }
                const char *dir = getenv("CREDENTIALS_DIRECTORY");
                if (!dir || !dir[0]) {
                        adp_conf_error(e, nc, "credential \"%s\" cannot be read: $CREDENTIALS_DIRECTORY is not set (use LoadCredential=%s:/path in the service unit, or %s:)",
                                       cred, cred, k_file);
                        return -EINVAL;
                }
                if (asprintf(&path, "%s/%s", dir, cred) < 0 || asprintf(&origin, "credential \"%s\"", cred) < 0)
                        return -ENOMEM;
        } else {
                if (!required)
                        return -ENOENT;
                adp_conf_error(e, map, "missing required key \"%s\" or \"%s\"", k_file, k_cred);
                return -EINVAL;
        }

        r = read_secret(path, origin, at, e, &secret);
        if (r < 0)
                return r;

        *ret_secret = secret;
        if (ret_node)
                *ret_node = at;
        if (ret_origin)
                *ret_origin = TAKE_PTR(origin);
        return 0;
}

int adp_conf_get_secret(const struct adp_conf_node *map, const char *base, bool required, struct adp_conf_errors *e,
                        char **ret_secret) {
        return adp_conf_get_secret_full(map, base, required, e, ret_secret, NULL, NULL);
}
