/* SPDX-License-Identifier: MIT */
/* Payload mapping of the CoAP client adapter (see coap-map.h). */

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cbor.h>

#include "adp-util.h"
#include "coap-map.h"
#include "hub/macro.h"

const char *adp_coap_format_to_string(enum adp_coap_format f) {
        static const char *const names[] = { "raw", "json", "cbor" };
        return (unsigned) f < _ADP_COAP_FORMAT_MAX ? names[f] : NULL;
}

int adp_coap_format_from_string(const char *s) {
        for (int i = 0; i < _ADP_COAP_FORMAT_MAX; i++)
                if (s && strcmp(s, adp_coap_format_to_string(i)) == 0)
                        return i;
        return -EINVAL;
}

unsigned adp_coap_format_content_format(enum adp_coap_format f) {
        return f == ADP_COAP_FORMAT_JSON ? 50 : f == ADP_COAP_FORMAT_CBOR ? 60 : 0;
}

int adp_coap_path_valid(const char *path) {
        if (!path)
                return 0;
        size_t n = strlen(path);
        if (n == 0 || n > ADP_COAP_MAP_MAX_PATH || path[0] == '.' || path[n - 1] == '.' || strstr(path, ".."))
                return 0;
        return 1;
}

/* ---- raw -------------------------------------------------------------------------------------- */

static bool utf8_valid(const uint8_t *s, size_t n) {
        size_t i = 0;
        while (i < n) {
                uint8_t c = s[i];
                size_t k;
                uint32_t cp;
                if (c == 0)
                        return false;
                if (c < 0x80) {
                        i++;
                        continue;
                }
                if ((c & 0xe0) == 0xc0) {
                        k = 1;
                        cp = c & 0x1f;
                } else if ((c & 0xf0) == 0xe0) {
                        k = 2;
                        cp = c & 0x0f;
                } else if ((c & 0xf8) == 0xf0) {
                        k = 3;
                        cp = c & 0x07;
                } else
                        return false;
                if (i + k >= n)
                        return false;
                for (size_t j = 1; j <= k; j++) {
                        if (i + j >= n || (s[i + j] & 0xc0) != 0x80)
                                return false;
                        cp = (cp << 6) | (s[i + j] & 0x3f);
                }
                if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
                    (cp >= 0xd800 && cp <= 0xdfff))
                        return false;
                i += k + 1;
        }
        return true;
}

static int decode_raw(const uint8_t *data, size_t len, json_t **ret) {
        if (!utf8_valid(data, len))
                return -EBADMSG;
        /* Trimmed text that reads entirely as a finite number becomes a number. */
        size_t b = 0, e = len;
        while (b < e && (data[b] == ' ' || data[b] == '\t' || data[b] == '\r' || data[b] == '\n'))
                b++;
        while (e > b && (data[e - 1] == ' ' || data[e - 1] == '\t' || data[e - 1] == '\r' || data[e - 1] == '\n'))
                e--;
        if (e > b && e - b < 64) {
                char buf[64], *end;
                memcpy(buf, data + b, e - b);
                buf[e - b] = 0;
                if (strspn(buf, "+-0123456789.eE") == e - b) {
                        errno = 0;
                        long long ll = strtoll(buf, &end, 10);
                        if (!*end && errno == 0) {
                                *ret = json_integer(ll);
                                return *ret ? 0 : -ENOMEM;
                        }
                        double d = strtod(buf, &end);
                        if (!*end && isfinite(d)) {
                                *ret = json_real(d);
                                return *ret ? 0 : -ENOMEM;
                        }
                }
        }
        *ret = json_stringn((const char *) data, len);
        return *ret ? 0 : -ENOMEM;
}

/* ---- JSON ------------------------------------------------------------------------------------- */

static int depth_ok(const json_t *v, unsigned depth) {
        if (depth > ADP_COAP_MAP_MAX_DEPTH)
                return 0;
        if (json_is_object(v)) {
                const char *k;
                json_t *x;
                json_object_foreach((json_t *) v, k, x) if (!depth_ok(x, depth + 1)) return 0;
        } else if (json_is_array(v)) {
                size_t i;
                json_t *x;
                json_array_foreach(v, i, x) if (!depth_ok(x, depth + 1)) return 0;
        }
        return 1;
}

static int decode_json(const uint8_t *data, size_t len, json_t **ret) {
        json_error_t je;
        /* jansson limits nesting to 2048 by itself; ours is checked after. */
        json_t *v = json_loadb((const char *) data, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
        if (!v)
                return -EBADMSG;
        if (!depth_ok(v, 0)) {
                json_decref(v);
                return -E2BIG;
        }
        *ret = v;
        return 0;
}

/* ---- CBOR ------------------------------------------------------------------------------------- */

static char *base64(const uint8_t *p, size_t n) {
        static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        char *out = malloc(4 * ((n + 2) / 3) + 1), *o = out;
        if (!out)
                return NULL;
        for (size_t i = 0; i < n; i += 3) {
                uint32_t v = (uint32_t) p[i] << 16 | (i + 1 < n ? (uint32_t) p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
                *o++ = tab[v >> 18];
                *o++ = tab[(v >> 12) & 63];
                *o++ = i + 1 < n ? tab[(v >> 6) & 63] : '=';
                *o++ = i + 2 < n ? tab[v & 63] : '=';
        }
        *o = 0;
        return out;
}

/* The bytes of a (possibly indefinite) text or byte string, malloc'd. */
static int cbor_bytes(cbor_item_t *it, bool text, uint8_t **ret, size_t *ret_len) {
        bool definite = text ? cbor_string_is_definite(it) : cbor_bytestring_is_definite(it);
        if (definite) {
                size_t n = text ? cbor_string_length(it) : cbor_bytestring_length(it);
                const uint8_t *h = text ? cbor_string_handle(it) : cbor_bytestring_handle(it);
                uint8_t *b = malloc(n + 1);
                if (!b)
                        return -ENOMEM;
                if (n)
                        memcpy(b, h, n);
                b[n] = 0;
                *ret = b;
                *ret_len = n;
                return 0;
        }
        size_t nc = text ? cbor_string_chunk_count(it) : cbor_bytestring_chunk_count(it);
        cbor_item_t **ch = text ? cbor_string_chunks_handle(it) : cbor_bytestring_chunks_handle(it);
        size_t total = 0;
        for (size_t i = 0; i < nc; i++) {
                size_t l = text ? cbor_string_length(ch[i]) : cbor_bytestring_length(ch[i]);
                if (l > ADP_COAP_MAP_MAX_PAYLOAD || total + l > ADP_COAP_MAP_MAX_PAYLOAD)
                        return -E2BIG;
                total += l;
        }
        uint8_t *b = malloc(total + 1);
        if (!b)
                return -ENOMEM;
        size_t off = 0;
        for (size_t i = 0; i < nc; i++) {
                size_t l = text ? cbor_string_length(ch[i]) : cbor_bytestring_length(ch[i]);
                if (l)
                        memcpy(b + off, text ? cbor_string_handle(ch[i]) : cbor_bytestring_handle(ch[i]), l);
                off += l;
        }
        b[off] = 0;
        *ret = b;
        *ret_len = off;
        return 0;
}

static int cbor_to_json(cbor_item_t *it, unsigned depth, json_t **ret) {
        _cleanup_free_ uint8_t *b = NULL;
        size_t n;
        int r;

        if (depth > ADP_COAP_MAP_MAX_DEPTH)
                return -E2BIG;
        switch (cbor_typeof(it)) {
        case CBOR_TYPE_UINT: {
                uint64_t u = cbor_get_int(it);
                *ret = u > INT64_MAX ? json_real((double) u) : json_integer((json_int_t) u);
                break;
        }
        case CBOR_TYPE_NEGINT: {
                uint64_t u = cbor_get_int(it); /* value = -1 - u */
                *ret = u > INT64_MAX ? json_real(-1.0 - (double) u) : json_integer(-1 - (json_int_t) u);
                break;
        }
        case CBOR_TYPE_BYTESTRING: {
                if ((r = cbor_bytes(it, false, &b, &n)) < 0)
                        return r;
                _cleanup_free_ char *t = base64(b, n);
                if (!t)
                        return -ENOMEM;
                *ret = json_string(t);
                break;
        }
        case CBOR_TYPE_STRING:
                if ((r = cbor_bytes(it, true, &b, &n)) < 0)
                        return r;
                if (!utf8_valid(b, n))
                        return -EBADMSG;
                *ret = json_stringn((const char *) b, n);
                break;
        case CBOR_TYPE_ARRAY: {
                json_t *a = json_array();
                if (!a)
                        return -ENOMEM;
                cbor_item_t **h = cbor_array_handle(it);
                for (size_t i = 0; i < cbor_array_size(it); i++) {
                        json_t *x = NULL;
                        if ((r = cbor_to_json(h[i], depth + 1, &x)) < 0 || json_array_append_new(a, x) < 0) {
                                json_decref(a);
                                return r < 0 ? r : -ENOMEM;
                        }
                }
                *ret = a;
                return 0;
        }
        case CBOR_TYPE_MAP: {
                json_t *o = json_object();
                if (!o)
                        return -ENOMEM;
                struct cbor_pair *h = cbor_map_handle(it);
                for (size_t i = 0; i < cbor_map_size(it); i++) {
                        char key[32];
                        _cleanup_free_ uint8_t *kb = NULL;
                        size_t kl;
                        const char *k;
                        if (cbor_isa_string(h[i].key)) {
                                if ((r = cbor_bytes(h[i].key, true, &kb, &kl)) < 0 || !utf8_valid(kb, kl)) {
                                        json_decref(o);
                                        return r < 0 ? r : -EBADMSG;
                                }
                                k = (const char *) kb;
                        } else if (cbor_isa_uint(h[i].key)) {
                                snprintf(key, sizeof key, "%llu", (unsigned long long) cbor_get_int(h[i].key));
                                k = key;
                        } else if (cbor_isa_negint(h[i].key)) {
                                snprintf(key, sizeof key, "-%llu", (unsigned long long) cbor_get_int(h[i].key) + 1ull);
                                k = key;
                        } else {
                                json_decref(o);
                                return -EBADMSG; /* keys must be text or integers */
                        }
                        json_t *x = NULL;
                        if ((r = cbor_to_json(h[i].value, depth + 1, &x)) < 0) {
                                json_decref(o);
                                return r;
                        }
                        if (json_object_set_new(o, k, x) < 0) {
                                json_decref(o);
                                return -ENOMEM;
                        }
                }
                *ret = o;
                return 0;
        }
        case CBOR_TYPE_TAG:
                /* Tags (dates, bignums...) are looked through: the tagged item is the value. */
                {
                        cbor_item_t *t = cbor_tag_item(it);
                        r = cbor_to_json(t, depth + 1, ret);
                        cbor_decref(&t);
                        return r;
                }
        case CBOR_TYPE_FLOAT_CTRL:
                if (cbor_float_ctrl_is_ctrl(it)) {
                        uint8_t c = cbor_ctrl_value(it);
                        *ret = c == CBOR_CTRL_TRUE ? json_true() : c == CBOR_CTRL_FALSE ? json_false() : json_null();
                } else {
                        /* A half or single float means its shortest decimal (21.7, not
                         * 21.700000762939453). */
                        double d = cbor_float_get_width(it) == CBOR_FLOAT_64 ? cbor_float_get_float(it)
                                                                             : adp_f32_value((float) cbor_float_get_float(it));
                        *ret = isfinite(d) ? json_real(d) : json_null();
                }
                break;
        default:
                return -EBADMSG;
        }
        return *ret ? 0 : -ENOMEM;
}

/* libcbor 0.8 allocates what a header declares (a map of 2^58 pairs) before it reads the
 * items: every item is checked here first, so that counts never exceed the bytes left and
 * nesting stays within ADP_COAP_MAP_MAX_DEPTH. */
static int cbor_scan(const uint8_t *p, size_t len, size_t *pos, unsigned depth) {
        int r;
        if (depth > ADP_COAP_MAP_MAX_DEPTH + 1)
                return -E2BIG;
        if (*pos >= len)
                return -EBADMSG;
        uint8_t ib = p[(*pos)++];
        unsigned mt = ib >> 5, ai = ib & 31;
        uint64_t v = 0;
        if (ai < 24)
                v = ai;
        else if (ai <= 27) {
                size_t n = (size_t) 1 << (ai - 24);
                if (len - *pos < n)
                        return -EBADMSG;
                for (size_t i = 0; i < n; i++)
                        v = v << 8 | p[(*pos)++];
        } else if (ai != 31 || mt < 2 || mt == 6 || mt == 7)
                return -EBADMSG; /* reserved, or indefinite where it is not allowed (or a stray break) */
        switch (mt) {
        case 0:
        case 1:
        case 7:
                return 0;
        case 2:
        case 3:
                if (ai != 31) {
                        if (v > len - *pos)
                                return -EBADMSG;
                        *pos += (size_t) v;
                        return 0;
                }
                for (;;) {
                        if (*pos >= len)
                                return -EBADMSG;
                        if (p[*pos] == 0xff) {
                                ++*pos;
                                return 0;
                        }
                        if ((unsigned) (p[*pos] >> 5) != mt || (p[*pos] & 31) == 31)
                                return -EBADMSG; /* chunks are definite strings of the same type */
                        if ((r = cbor_scan(p, len, pos, depth + 1)) < 0)
                                return r;
                }
        case 4:
        case 5:
                if (ai != 31) {
                        if (v > (len - *pos) / (mt == 5 ? 2 : 1))
                                return -EBADMSG;
                        for (uint64_t i = 0; i < v * (mt == 5 ? 2 : 1); i++)
                                if ((r = cbor_scan(p, len, pos, depth + 1)) < 0)
                                        return r;
                        return 0;
                }
                for (unsigned k = 0;; k++) {
                        if (*pos >= len)
                                return -EBADMSG;
                        if (p[*pos] == 0xff) {
                                ++*pos;
                                return mt == 5 && k % 2 ? -EBADMSG : 0;
                        }
                        if ((r = cbor_scan(p, len, pos, depth + 1)) < 0)
                                return r;
                }
        default: /* 6: a tag and its item */
                return cbor_scan(p, len, pos, depth + 1);
        }
}

static int decode_cbor(const uint8_t *data, size_t len, json_t **ret) {
        struct cbor_load_result res;
        size_t pos = 0;
        if (len == 0)
                return -EBADMSG;
        int r0 = cbor_scan(data, len, &pos, 0);
        if (r0 < 0)
                return r0;
        if (pos != len)
                return -EBADMSG; /* trailing bytes */
        cbor_item_t *it = cbor_load(data, len, &res);
        if (!it)
                return res.error.code == CBOR_ERR_MEMERROR ? -ENOMEM : -EBADMSG;
        int r = res.read != len ? -EBADMSG : cbor_to_json(it, 0, ret);
        cbor_decref(&it);
        return r;
}

int adp_coap_decode(enum adp_coap_format f, const uint8_t *data, size_t len, json_t **ret) {
        if (!ret || (len && !data))
                return -EINVAL;
        if (len > ADP_COAP_MAP_MAX_PAYLOAD)
                return -E2BIG;
        switch (f) {
        case ADP_COAP_FORMAT_RAW:
                return decode_raw(data, len, ret);
        case ADP_COAP_FORMAT_JSON:
                return decode_json(data, len, ret);
        case ADP_COAP_FORMAT_CBOR:
                return decode_cbor(data, len, ret);
        default:
                return -EINVAL;
        }
}

json_t *adp_coap_path_get(json_t *v, const char *path) {
        if (!path || !*path)
                return v;
        if (!adp_coap_path_valid(path))
                return NULL;
        char seg[ADP_COAP_MAP_MAX_PATH + 1];
        const char *p = path;
        while (v && *p) {
                size_t n = strcspn(p, ".");
                memcpy(seg, p, n);
                seg[n] = 0;
                p += n;
                if (*p == '.')
                        p++;
                if (json_is_object(v))
                        v = json_object_get(v, seg);
                else if (json_is_array(v)) {
                        char *end;
                        unsigned long i = strtoul(seg, &end, 10);
                        v = (*end || !*seg || seg[0] == '-' || seg[0] == '+') ? NULL : json_array_get(v, i);
                } else
                        v = NULL;
        }
        return v;
}

int adp_coap_map(enum adp_coap_format f, const struct adp_coap_point *pts, size_t n_pts, const uint8_t *data,
                 size_t len, json_t **ret_points, size_t *ret_missing) {
        json_t *doc = NULL;
        int r = adp_coap_decode(f, data, len, &doc);
        if (r < 0)
                return r;
        json_t *out = json_object();
        size_t missing = 0;
        if (!out) {
                json_decref(doc);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n_pts; i++) {
                json_t *v = adp_coap_path_get(doc, f == ADP_COAP_FORMAT_RAW ? NULL : pts[i].path);
                if (!v) {
                        missing++;
                        continue;
                }
                if (json_object_set(out, pts[i].name, v) < 0) {
                        json_decref(out);
                        json_decref(doc);
                        return -ENOMEM;
                }
        }
        json_decref(doc);
        *ret_points = out;
        if (ret_missing)
                *ret_missing = missing;
        return 0;
}

/* ---- encoding --------------------------------------------------------------------------------- */

static cbor_item_t *json_to_cbor(const json_t *v, unsigned depth) {
        if (depth > ADP_COAP_MAP_MAX_DEPTH)
                return NULL;
        switch (json_typeof(v)) {
        case JSON_INTEGER: {
                json_int_t i = json_integer_value(v);
                return i >= 0 ? cbor_build_uint64((uint64_t) i) : cbor_build_negint64((uint64_t) (-(i + 1)));
        }
        case JSON_REAL:
                return cbor_build_float8(json_real_value(v));
        case JSON_STRING:
                return cbor_build_stringn(json_string_value(v), json_string_length(v));
        case JSON_TRUE:
                return cbor_build_bool(true);
        case JSON_FALSE:
                return cbor_build_bool(false);
        case JSON_NULL:
                return cbor_new_null();
        case JSON_ARRAY: {
                cbor_item_t *a = cbor_new_definite_array(json_array_size(v));
                size_t i;
                json_t *x;
                if (!a)
                        return NULL;
                json_array_foreach(v, i, x) {
                        cbor_item_t *c = json_to_cbor(x, depth + 1);
                        if (!c || !cbor_array_push(a, c)) {
                                if (c)
                                        cbor_decref(&c);
                                cbor_decref(&a);
                                return NULL;
                        }
                        cbor_decref(&c);
                }
                return a;
        }
        case JSON_OBJECT: {
                cbor_item_t *m = cbor_new_definite_map(json_object_size(v));
                const char *k;
                json_t *x;
                if (!m)
                        return NULL;
                json_object_foreach((json_t *) v, k, x) {
                        cbor_item_t *ck = cbor_build_string(k), *cv = json_to_cbor(x, depth + 1);
                        bool ok = ck && cv && cbor_map_add(m, (struct cbor_pair) { .key = ck, .value = cv });
                        if (ck)
                                cbor_decref(&ck);
                        if (cv)
                                cbor_decref(&cv);
                        if (!ok) {
                                cbor_decref(&m);
                                return NULL;
                        }
                }
                return m;
        }
        }
        return NULL;
}

int adp_coap_encode(enum adp_coap_format f, const json_t *v, uint8_t **ret, size_t *ret_len) {
        char *text = NULL;
        if (!v || !ret || !ret_len)
                return -EINVAL;
        switch (f) {
        case ADP_COAP_FORMAT_RAW:
                if (json_is_string(v)) {
                        size_t n = json_string_length(v);
                        uint8_t *b = malloc(n + 1);
                        if (!b)
                                return -ENOMEM;
                        memcpy(b, json_string_value(v), n + 1);
                        *ret = b;
                        *ret_len = n;
                        return 0;
                }
                if (json_is_object(v) || json_is_array(v))
                        return -EINVAL;
                text = adp_json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
                break;
        case ADP_COAP_FORMAT_JSON:
                if (!depth_ok(v, 0))
                        return -E2BIG;
                text = adp_json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
                break;
        case ADP_COAP_FORMAT_CBOR: {
                if (!depth_ok(v, 0))
                        return -E2BIG;
                cbor_item_t *it = json_to_cbor(v, 0);
                if (!it)
                        return -ENOMEM;
                unsigned char *buf = NULL;
                size_t size = 0;
                size_t n = cbor_serialize_alloc(it, &buf, &size);
                cbor_decref(&it);
                if (n == 0) {
                        free(buf);
                        return -ENOMEM;
                }
                *ret = buf;
                *ret_len = n;
                return 0;
        }
        default:
                return -EINVAL;
        }
        if (!text)
                return -ENOMEM;
        *ret_len = strlen(text);
        *ret = (uint8_t *) text;
        return 0;
}
