/* SPDX-License-Identifier: MIT */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/base64.h>

#include "hub/urlenc.h"

static bool url_unreserved(unsigned char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               c == '-' || c == '_' || c == '.' || c == '~';
}

int hub_url_encode(const char *s, char **ret) {
        static const char hex[] = "0123456789ABCDEF";
        size_t n = 0, len;
        char *out, *p;

        if (!s || !ret)
                return -EINVAL;
        len = strlen(s);
        for (size_t i = 0; i < len; i++)
                n += url_unreserved((unsigned char) s[i]) ? 1 : 3;
        out = malloc(n + 1);
        if (!out)
                return -ENOMEM;
        p = out;
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char) s[i];
                if (url_unreserved(c))
                        *p++ = (char) c;
                else {
                        *p++ = '%';
                        *p++ = hex[c >> 4];
                        *p++ = hex[c & 0xf];
                }
        }
        *p = '\0';
        *ret = out;
        return 0;
}

static int unhex(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

int hub_url_decode(const char *s, size_t len, bool plus_is_space, char **ret) {
        char *out, *p;

        if ((!s && len > 0) || !ret)
                return -EINVAL;
        out = malloc(len + 1);
        if (!out)
                return -ENOMEM;
        p = out;
        for (size_t i = 0; i < len; i++) {
                char c = s[i];
                if (c == '%') {
                        int hi, lo;
                        if (len - i < 3 || (hi = unhex(s[i + 1])) < 0 || (lo = unhex(s[i + 2])) < 0)
                                goto invalid;
                        c = (char) (hi << 4 | lo);
                        i += 2;
                } else if (c == '+' && plus_is_space)
                        c = ' ';
                if (c == '\0')
                        goto invalid;
                *p++ = c;
        }
        *p = '\0';
        *ret = out;
        return 0;

invalid:
        hub_explicit_bzero(out, len + 1);
        free(out);
        return -EINVAL;
}

int hub_base64_encode(const void *data, size_t len, char **ret) {
        size_t need = 4 * ((len + 2) / 3) + 1, olen = 0;
        char *out;

        if ((!data && len > 0) || !ret)
                return -EINVAL;
        if (len > (SIZE_MAX - 1) / 4 * 3 - 3)
                return -ENOMEM;
        out = malloc(need);
        if (!out)
                return -ENOMEM;
        if (len == 0)
                out[0] = '\0';
        else if (mbedtls_base64_encode((unsigned char *) out, need, &olen, data, len) != 0) {
                free(out);
                return -EIO;
        }
        *ret = out;
        return 0;
}

static bool b64_char(char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
               c == '/';
}

bool hub_base64_valid(const char *s, size_t len, size_t *ret_decoded_len) {
        size_t pad = 0;

        if (!s && len > 0)
                return false;
        if (len % 4 != 0)
                return false;
        if (len >= 1 && s[len - 1] == '=')
                pad++;
        if (len >= 2 && s[len - 2] == '=')
                pad++;
        if (pad == 1 && len >= 2 && s[len - 2] == '=')
                return false;
        for (size_t i = 0; i < len - pad; i++)
                if (!b64_char(s[i]))
                        return false;
        if (ret_decoded_len)
                *ret_decoded_len = len / 4 * 3 - pad;
        return true;
}

int hub_base64_decode_buf(const char *s, size_t len, void *buf, size_t size, size_t *ret_len) {
        size_t n, olen = 0;

        if (!hub_base64_valid(s, len, &n))
                return -EINVAL;
        if (n > size)
                return -ENOBUFS;
        if (len > 0 && mbedtls_base64_decode(buf, size, &olen, (const unsigned char *) s, len) != 0) {
                hub_explicit_bzero(buf, size);
                return -EINVAL;
        }
        if (ret_len)
                *ret_len = olen;
        return 0;
}

int hub_base64_decode(const char *s, size_t len, uint8_t **ret, size_t *ret_len) {
        size_t n, olen = 0;
        uint8_t *out;
        int r;

        if (!ret || !hub_base64_valid(s, len, &n))
                return -EINVAL;
        out = malloc(n + 1);
        if (!out)
                return -ENOMEM;
        r = hub_base64_decode_buf(s, len, out, n, &olen);
        if (r < 0) {
                free(out);
                return r;
        }
        out[olen] = 0;
        *ret = out;
        if (ret_len)
                *ret_len = olen;
        return 0;
}
