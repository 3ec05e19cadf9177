/* SPDX-License-Identifier: MIT */
/* Evaluation of query and routing expressions (reference §5.5, §8.2–8.5), routing-condition
 * evaluation against a message and twin, and the streaming query executor.
 *
 * Values are jansson values; a NULL json_t * is "undefined". Every evaluation returns a new
 * reference. Allocation failures degrade to undefined (a condition is then not satisfied):
 * evaluation never fails loudly and never allocates more than HUB_QUERY_MAX_STRING per
 * intermediate string. */

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/json-dump.h"
#include "hub/msg.h"
#include "hub/query.h"
#include "query-internal.h"

#define EXACT_INT_LIMIT 9007199254740992.0 /* 2^53 */

/* ---- values -------------------------------------------------------------------------- */

static json_t *mk_num(double d) {
        if (!isfinite(d))
                return NULL;
        if (d == floor(d) && fabs(d) < EXACT_INT_LIMIT)
                return json_integer((json_int_t) d);
        return json_real(d);
}

static enum hub_tristate tri_of(const json_t *v) {
        if (json_is_true(v))
                return HUB_TRUE;
        if (json_is_false(v))
                return HUB_FALSE;
        return HUB_UNDEFINED;
}

static json_t *mk_tri(enum hub_tristate t) {
        return t == HUB_UNDEFINED ? NULL : json_boolean(t == HUB_TRUE);
}

static size_t utf8_chars(const char *s, size_t len) {
        size_t n = 0;
        for (size_t i = 0; i < len; i++)
                if (((unsigned char) s[i] & 0xC0) != 0x80)
                        n++;
        return n;
}

/* Byte offset of the chars-th character (or len). */
static size_t utf8_offset(const char *s, size_t len, size_t chars) {
        size_t i = 0;
        while (i < len && chars > 0) {
                i++;
                while (i < len && ((unsigned char) s[i] & 0xC0) == 0x80)
                        i++;
                chars--;
        }
        return i;
}

/* Equality of primitive values of the same type; undefined otherwise (reference §8.2). */
static enum hub_tristate values_equal(const json_t *a, const json_t *b) {
        if (!a || !b || json_is_null(a) || json_is_null(b))
                return HUB_UNDEFINED;
        if (json_is_number(a) && json_is_number(b))
                return json_number_value(a) == json_number_value(b) ? HUB_TRUE : HUB_FALSE;
        if (json_is_string(a) && json_is_string(b)) {
                size_t la = json_string_length(a), lb = json_string_length(b);
                return la == lb && memcmp(json_string_value(a), json_string_value(b), la) == 0 ? HUB_TRUE : HUB_FALSE;
        }
        if (json_is_boolean(a) && json_is_boolean(b))
                return json_is_true(a) == json_is_true(b) ? HUB_TRUE : HUB_FALSE;
        return HUB_UNDEFINED;
}

/* Ordering of two numbers or two strings (ordinal): -1/0/1, or -2 when not comparable. */
static int values_order(const json_t *a, const json_t *b) {
        if (!a || !b)
                return -2;
        if (json_is_number(a) && json_is_number(b)) {
                double x = json_number_value(a), y = json_number_value(b);
                return x < y ? -1 : x > y ? 1 : 0;
        }
        if (json_is_string(a) && json_is_string(b)) {
                size_t la = json_string_length(a), lb = json_string_length(b);
                int c = memcmp(json_string_value(a), json_string_value(b), MIN(la, lb));
                if (c == 0)
                        c = la < lb ? -1 : la > lb ? 1 : 0;
                return c < 0 ? -1 : c > 0 ? 1 : 0;
        }
        return -2;
}

/* ---- references ---------------------------------------------------------------------- */

static json_t *object_get(const json_t *o, const char *key, bool ci, const char **ret_key) {
        json_t *v = json_object_get(o, key);
        if (v) {
                if (ret_key)
                        *ret_key = key;
                return v;
        }
        if (!ci)
                return NULL;
        const char *k;
        json_t *val;
        json_object_foreach((json_t *) o, k, val)
                if (strcasecmp(k, key) == 0) {
                        if (ret_key)
                                *ret_key = k;
                        return val;
                }
        return NULL;
}

/* Walks a path; borrowed result or NULL. ret_key: the last key as found in the document. */
static json_t *walk(const json_t *root, const struct qseg *segs, unsigned n, bool ci, const char **ret_key) {
        const json_t *v = root;
        const char *last = NULL;
        for (unsigned i = 0; v && i < n; i++) {
                if (segs[i].key) {
                        if (!json_is_object(v))
                                return NULL;
                        v = object_get(v, segs[i].key, ci, &last);
                } else {
                        if (!json_is_array(v))
                                return NULL;
                        v = json_array_get(v, (size_t) segs[i].index);
                }
        }
        if (ret_key)
                *ret_key = last;
        return (json_t *) v;
}

static const char *app_prop(const struct hub_msg *m, const char *name, bool *ret_found) {
        size_t n = hub_msg_n_props(m);
        const struct hub_msg_prop *ci = NULL;
        for (size_t i = 0; i < n; i++) {
                const struct hub_msg_prop *pr = hub_msg_prop_at(m, i);
                if (!pr)
                        continue;
                if (streq(pr->name, name)) {
                        *ret_found = true;
                        return pr->value;
                }
                if (!ci && strcasecmp(pr->name, name) == 0)
                        ci = pr;
        }
        *ret_found = ci != NULL;
        return ci ? ci->value : NULL;
}

static json_t *app_prop_value(const struct hub_msg *m, const char *name) {
        bool found;
        const char *v = app_prop(m, name, &found);
        if (!found)
                return NULL;
        return v ? json_string(v) : json_null();
}

static bool ascii_ieq_prefix(const char *s, size_t len, const char *word, size_t *ret_wlen) {
        size_t wl = strlen(word);
        if (len < wl || strncasecmp(s, word, wl) != 0)
                return false;
        *ret_wlen = wl;
        return true;
}

/* application/json, optionally followed by parameters (";charset=utf-8"). */
static bool content_type_is_json(const char *ct) {
        size_t wl;
        if (!ct)
                return false;
        while (*ct == ' ' || *ct == '\t')
                ct++;
        if (!ascii_ieq_prefix(ct, strlen(ct), "application/json", &wl))
                return false;
        ct += wl;
        while (*ct == ' ' || *ct == '\t')
                ct++;
        return *ct == '\0' || *ct == ';';
}

enum body_enc { ENC_NONE, ENC_UTF8, ENC_UTF16, ENC_UTF32 };

static enum body_enc content_encoding(const char *ce) {
        if (!ce)
                return ENC_NONE;
        if (strcasecmp(ce, "utf-8") == 0)
                return ENC_UTF8;
        if (strcasecmp(ce, "utf-16") == 0)
                return ENC_UTF16;
        if (strcasecmp(ce, "utf-32") == 0)
                return ENC_UTF32;
        return ENC_NONE;
}

/* Transcodes UTF-16 / UTF-32 (BOM decides the byte order, little-endian without one, as
 * .NET's Encoding.Unicode / UTF32) to UTF-8. Returns a malloc'd buffer or NULL. */
static char *transcode(const unsigned char *b, size_t len, enum body_enc enc, size_t *ret_len) {
        unsigned unit = enc == ENC_UTF16 ? 2 : 4;
        bool be = false;
        size_t i = 0;

        if (enc == ENC_UTF16 && len >= 2) {
                if (b[0] == 0xFE && b[1] == 0xFF)
                        be = true, i = 2;
                else if (b[0] == 0xFF && b[1] == 0xFE)
                        i = 2;
        } else if (enc == ENC_UTF32 && len >= 4) {
                if (b[0] == 0 && b[1] == 0 && b[2] == 0xFE && b[3] == 0xFF)
                        be = true, i = 4;
                else if (b[0] == 0xFF && b[1] == 0xFE && b[2] == 0 && b[3] == 0)
                        i = 4;
        }
        if ((len - i) % unit)
                return NULL;
        /* each unit becomes at most 4 bytes (UTF-16: 3 per unit, 4 per surrogate pair) */
        char *out = malloc((len - i) / unit * 4 + 1);
        if (!out)
                return NULL;
        size_t n = 0;
        while (i < len) {
                unsigned cp;
                if (unit == 2) {
                        cp = be ? (b[i] << 8) | b[i + 1] : (b[i + 1] << 8) | b[i];
                        i += 2;
                        if (cp >= 0xD800 && cp <= 0xDBFF) {
                                if (i + 2 > len)
                                        goto bad;
                                unsigned lo = be ? (b[i] << 8) | b[i + 1] : (b[i + 1] << 8) | b[i];
                                if (lo < 0xDC00 || lo > 0xDFFF)
                                        goto bad;
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                                i += 2;
                        } else if (cp >= 0xDC00 && cp <= 0xDFFF)
                                goto bad;
                } else {
                        cp = be ? ((unsigned) b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]
                                : ((unsigned) b[i + 3] << 24) | (b[i + 2] << 16) | (b[i + 1] << 8) | b[i];
                        i += 4;
                        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
                                goto bad;
                }
                if (cp < 0x80)
                        out[n++] = (char) cp;
                else if (cp < 0x800) {
                        out[n++] = (char) (0xC0 | (cp >> 6));
                        out[n++] = (char) (0x80 | (cp & 0x3F));
                } else if (cp < 0x10000) {
                        out[n++] = (char) (0xE0 | (cp >> 12));
                        out[n++] = (char) (0x80 | ((cp >> 6) & 0x3F));
                        out[n++] = (char) (0x80 | (cp & 0x3F));
                } else {
                        out[n++] = (char) (0xF0 | (cp >> 18));
                        out[n++] = (char) (0x80 | ((cp >> 12) & 0x3F));
                        out[n++] = (char) (0x80 | ((cp >> 6) & 0x3F));
                        out[n++] = (char) (0x80 | (cp & 0x3F));
                }
        }
        *ret_len = n;
        return out;
bad:
        free(out);
        return NULL;
}

/* The parsed body, or NULL when the message is not JSON under the rule of reference §8.4. */
static const json_t *body_json(struct hub_cond_ctx *ctx) {
        if (ctx->body_state != 0)
                return ctx->body_state > 0 ? ctx->body_cache : NULL;
        ctx->body_state = -1;
        if (!ctx->msg)
                return NULL;
        if (!content_type_is_json(hub_msg_get_sys(ctx->msg, HUB_SYS_CONTENT_TYPE)))
                return NULL;
        enum body_enc enc = content_encoding(hub_msg_get_sys(ctx->msg, HUB_SYS_CONTENT_ENCODING));
        if (enc == ENC_NONE)
                return NULL;
        size_t len;
        const unsigned char *b = hub_msg_body(ctx->msg, &len);
        if (!b)
                return NULL;
        json_t *j;
        if (enc == ENC_UTF8) {
                if (len >= 3 && b[0] == 0xEF && b[1] == 0xBB && b[2] == 0xBF)
                        b += 3, len -= 3;
                j = json_loadb((const char *) b, len, JSON_DECODE_ANY, NULL);
        } else {
                size_t n;
                char *u = transcode(b, len, enc, &n);
                if (!u)
                        return NULL;
                j = json_loadb(u, n, JSON_DECODE_ANY, NULL);
                free(u);
        }
        if (!j)
                return NULL;
        ctx->body_cache = j;
        ctx->body_state = 1;
        return j;
}

void hub_cond_ctx_done(struct hub_cond_ctx *ctx) {
        if (!ctx)
                return;
        json_decref(ctx->body_cache);
        ctx->body_cache = NULL;
        ctx->body_state = 0;
}

static json_t *eval_ref(const struct qnode *n, struct qeval_ctx *c) {
        const struct hub_msg *m = c->msg_ctx ? c->msg_ctx->msg : NULL;
        const json_t *twin = c->msg_ctx ? c->msg_ctx->twin : c->doc;
        const char *v;

        switch (n->ref) {
        case QREF_DOC:
                return json_incref(walk(c->doc ? c->doc : twin, n->segs, n->n_segs, true, NULL));
        case QREF_TWIN:
                return json_incref(walk(twin, n->segs, n->n_segs, false, NULL));
        case QREF_BODY: {
                if (!c->msg_ctx)
                        return NULL;
                const json_t *b = body_json(c->msg_ctx);
                json_t *r = b ? walk(b, n->segs, n->n_segs, false, NULL) : NULL;
                if (r)
                        return json_incref(r);
                /* no body value: a property literally named "$body.…" (§8.2 look-up order) */
                return m && n->name ? app_prop_value(m, n->name) : NULL;
        }
        case QREF_SYS:
                if (!m)
                        return NULL;
                if (n->sys_known && (v = hub_msg_get_sys(m, n->sys)))
                        return json_string(v);
                return app_prop_value(m, n->name);
        case QREF_SYS_ESCAPED:
                if (m && n->sys_known && (v = hub_msg_get_sys(m, n->sys)))
                        return json_string(v);
                return NULL;
        case QREF_APP:
                return m ? app_prop_value(m, n->name) : NULL;
        case QREF_NONE:
        default:
                return NULL;
        }
}

/* ---- functions ----------------------------------------------------------------------- */

static json_t *str_result(const char *s, size_t len) {
        if (len > HUB_QUERY_MAX_STRING)
                return NULL;
        return json_stringn(s, len);
}

static json_t *case_map(const json_t *a, bool upper) {
        if (!json_is_string(a))
                return NULL;
        size_t len = json_string_length(a);
        char *s = malloc(len + 1);
        if (!s)
                return NULL;
        memcpy(s, json_string_value(a), len);
        for (size_t i = 0; i < len; i++) {
                if (upper && s[i] >= 'a' && s[i] <= 'z')
                        s[i] = (char) (s[i] - 'a' + 'A');
                else if (!upper && s[i] >= 'A' && s[i] <= 'Z')
                        s[i] = (char) (s[i] - 'A' + 'a');
        }
        json_t *r = json_stringn(s, len);
        free(s);
        return r;
}

static json_t *as_number(const json_t *a) {
        if (json_is_number(a))
                return json_incref((json_t *) a);
        if (!json_is_string(a))
                return NULL;
        const char *s = json_string_value(a);
        size_t len = json_string_length(a);
        if (len == 0 || len > 400 || strlen(s) != len)
                return NULL;
        char *end;
        double d = strtod(s, &end);
        if (end == s)
                return NULL;
        while (*end == ' ' || *end == '\t')
                end++;
        /* strtod also takes "inf", "nan" and hex floats: accept plain decimal numbers only */
        for (const char *t = s; t < end; t++)
                if (!strchr("0123456789+-.eE \t", *t))
                        return NULL;
        if (*end)
                return NULL;
        return mk_num(d);
}

static json_t *eval_func(const struct qnode *n, struct qeval_ctx *c) {
        json_t *av[64] = {};
        json_t *r = NULL;
        unsigned na = MIN(n->n_args, (unsigned) ELEMENTSOF(av));
        double x = 0, y = 0;

        for (unsigned i = 0; i < na; i++)
                av[i] = qnode_eval(n->args[i], c);
        json_t *a = av[0], *b = av[1];
        bool num1 = json_is_number(a);
        if (num1)
                x = json_number_value(a);

        switch (n->func) {
        case QF_ABS: if (num1) r = mk_num(fabs(x)); break;
        case QF_EXP: if (num1) r = mk_num(exp(x)); break;
        case QF_POWER:
                if (num1 && json_is_number(b)) {
                        y = json_number_value(b);
                        r = mk_num(pow(x, y));
                }
                break;
        case QF_SQUARE: if (num1) r = mk_num(x * x); break;
        case QF_CEILING: if (num1) r = mk_num(ceil(x)); break;
        case QF_FLOOR: if (num1) r = mk_num(floor(x)); break;
        case QF_SIGN: if (num1) r = mk_num(x > 0 ? 1 : x < 0 ? -1 : 0); break;
        case QF_SQRT: if (num1) r = mk_num(sqrt(x)); break;
        case QF_AS_NUMBER: r = as_number(a); break;
        case QF_IS_ARRAY: r = json_boolean(json_is_array(a)); break;
        case QF_IS_BOOL: r = json_boolean(json_is_boolean(a)); break;
        case QF_IS_DEFINED: r = json_boolean(a != NULL); break;
        case QF_IS_NULL: r = json_boolean(json_is_null(a)); break;
        case QF_IS_NUMBER: r = json_boolean(num1); break;
        case QF_IS_OBJECT: r = json_boolean(json_is_object(a)); break;
        case QF_IS_PRIMITIVE:
                r = json_boolean(json_is_string(a) || num1 || json_is_boolean(a) || json_is_null(a));
                break;
        case QF_IS_STRING: r = json_boolean(json_is_string(a)); break;
        case QF_CONCAT: {
                size_t total = 0;
                bool strings = true;
                for (unsigned i = 0; i < na; i++) {
                        strings = strings && json_is_string(av[i]);
                        total += json_string_length(av[i]);
                }
                if (!strings || total > HUB_QUERY_MAX_STRING)
                        break;
                char *s = malloc(total + 1);
                if (!s)
                        break;
                size_t off = 0;
                for (unsigned i = 0; i < na; i++) {
                        memcpy(s + off, json_string_value(av[i]), json_string_length(av[i]));
                        off += json_string_length(av[i]);
                }
                r = json_stringn(s, total);
                free(s);
                break;
        }
        case QF_LENGTH:
                if (json_is_string(a))
                        r = json_integer((json_int_t) utf8_chars(json_string_value(a), json_string_length(a)));
                break;
        case QF_LOWER: r = case_map(a, false); break;
        case QF_UPPER: r = case_map(a, true); break;
        case QF_SUBSTRING: {
                if (!json_is_string(a) || !json_is_number(b) || (na > 2 && !json_is_number(av[2])))
                        break;
                const char *s = json_string_value(a);
                size_t len = json_string_length(a), chars = utf8_chars(s, len);
                double st = trunc(json_number_value(b));
                double cnt = na > 2 ? trunc(json_number_value(av[2])) : (double) chars;
                if (!isfinite(st) || !isfinite(cnt) || st < 0 || cnt < 0)
                        break;
                if (st > (double) chars)
                        st = (double) chars;
                if (cnt > (double) chars - st)
                        cnt = (double) chars - st;
                size_t from = utf8_offset(s, len, (size_t) st);
                size_t to = from + utf8_offset(s + from, len - from, (size_t) cnt);
                r = json_stringn(s + from, to - from);
                break;
        }
        case QF_INDEX_OF:
                if (json_is_string(a) && json_is_string(b)) {
                        const char *s = json_string_value(a);
                        const char *hit = memmem(s, json_string_length(a), json_string_value(b), json_string_length(b));
                        r = json_integer(hit ? (json_int_t) utf8_chars(s, (size_t) (hit - s)) : -1);
                }
                break;
        case QF_STARTS_WITH:
        case QF_ENDS_WITH:
        case QF_CONTAINS:
                if (json_is_string(a) && json_is_string(b)) {
                        const char *s = json_string_value(a), *f = json_string_value(b);
                        size_t ls = json_string_length(a), lf = json_string_length(b);
                        bool res;
                        if (n->func == QF_STARTS_WITH)
                                res = lf <= ls && memcmp(s, f, lf) == 0;
                        else if (n->func == QF_ENDS_WITH)
                                res = lf <= ls && memcmp(s + ls - lf, f, lf) == 0;
                        else
                                res = lf == 0 || memmem(s, ls, f, lf) != NULL;
                        r = json_boolean(res);
                }
                break;
        default:
                break;
        }
        for (unsigned i = 0; i < na; i++)
                json_decref(av[i]);
        return r;
}

/* ---- operators ----------------------------------------------------------------------- */

static json_t *eval_binary(const struct qnode *n, struct qeval_ctx *c) {
        json_t *a, *b, *r = NULL;

        /* logical operators short-circuit, with the three-valued tables of §8.2 */
        if (n->op == QOP_AND || n->op == QOP_OR) {
                enum hub_tristate stop = n->op == QOP_AND ? HUB_FALSE : HUB_TRUE;
                a = qnode_eval(n->a, c);
                enum hub_tristate ta = tri_of(a);
                json_decref(a);
                if (ta == stop)
                        return mk_tri(stop);
                b = qnode_eval(n->b, c);
                enum hub_tristate tb = tri_of(b);
                json_decref(b);
                if (tb == stop)
                        return mk_tri(stop);
                if (ta == HUB_UNDEFINED || tb == HUB_UNDEFINED)
                        return NULL;
                return mk_tri(ta); /* both are the non-stopping value */
        }
        if (n->op == QOP_COALESCE) {
                a = qnode_eval(n->a, c);
                return a ? a : qnode_eval(n->b, c);
        }

        a = qnode_eval(n->a, c);
        b = qnode_eval(n->b, c);
        switch (n->op) {
        case QOP_MUL:
        case QOP_DIV:
        case QOP_MOD:
        case QOP_ADD:
        case QOP_SUB: {
                if (!json_is_number(a) || !json_is_number(b))
                        break;
                double x = json_number_value(a), y = json_number_value(b);
                switch (n->op) {
                case QOP_MUL: r = mk_num(x * y); break;
                case QOP_DIV: r = y != 0 ? mk_num(x / y) : NULL; break;
                case QOP_MOD: r = y != 0 ? mk_num(fmod(x, y)) : NULL; break;
                case QOP_ADD: r = mk_num(x + y); break;
                default: r = mk_num(x - y); break;
                }
                break;
        }
        case QOP_CONCAT:
                if (json_is_string(a) && json_is_string(b)) {
                        size_t la = json_string_length(a), lb = json_string_length(b);
                        if (la + lb > HUB_QUERY_MAX_STRING)
                                break;
                        char *s = malloc(la + lb + 1);
                        if (!s)
                                break;
                        memcpy(s, json_string_value(a), la);
                        memcpy(s + la, json_string_value(b), lb);
                        r = str_result(s, la + lb);
                        free(s);
                }
                break;
        case QOP_EQ:
                r = mk_tri(values_equal(a, b));
                break;
        case QOP_NE: {
                enum hub_tristate t = values_equal(a, b);
                r = mk_tri(t == HUB_UNDEFINED ? t : t == HUB_TRUE ? HUB_FALSE : HUB_TRUE);
                break;
        }
        case QOP_LT:
        case QOP_LE:
        case QOP_GT:
        case QOP_GE: {
                int o = values_order(a, b);
                if (o == -2)
                        break;
                bool res = n->op == QOP_LT ? o < 0 : n->op == QOP_LE ? o <= 0 : n->op == QOP_GT ? o > 0 : o >= 0;
                r = json_boolean(res);
                break;
        }
        default:
                break;
        }
        json_decref(a);
        json_decref(b);
        return r;
}

json_t *qnode_eval(const struct qnode *n, struct qeval_ctx *c) {
        json_t *a, *r = NULL;

        if (!n)
                return NULL;
        switch (n->kind) {
        case QN_CONST:
                return json_incref(n->value);
        case QN_REF:
                return eval_ref(n, c);
        case QN_UNARY:
                a = qnode_eval(n->a, c);
                if (n->op == QOP_NEG)
                        r = json_is_number(a) ? mk_num(-json_number_value(a)) : NULL;
                else if (json_is_boolean(a))
                        r = json_boolean(!json_is_true(a));
                json_decref(a);
                return r;
        case QN_BINARY:
                return eval_binary(n, c);
        case QN_IN: {
                a = qnode_eval(n->a, c);
                if (a && !json_is_null(a) && (json_is_string(a) || json_is_number(a) || json_is_boolean(a))) {
                        bool found = false;
                        size_t i;
                        json_t *e;
                        json_array_foreach(n->list, i, e)
                                if (values_equal(a, e) == HUB_TRUE) {
                                        found = true;
                                        break;
                                }
                        r = json_boolean(n->op == QOP_IN ? found : !found);
                }
                json_decref(a);
                return r;
        }
        case QN_FUNC:
                return eval_func(n, c);
        case QN_AGG:
        default:
                return NULL;
        }
}

/* ---- conditions ---------------------------------------------------------------------- */

enum hub_tristate hub_condition_eval(const struct hub_condition *c, struct hub_cond_ctx *ctx) {
        if (!c)
                return HUB_UNDEFINED;
        if (!c->root)
                return HUB_TRUE;
        struct qeval_ctx ec = { .doc = NULL, .msg_ctx = ctx };
        json_t *v = qnode_eval(c->root, &ec);
        enum hub_tristate t = tri_of(v);
        json_decref(v);
        return t;
}

json_t *hub_condition_value(const struct hub_condition *c, struct hub_cond_ctx *ctx) {
        if (!c || !c->root)
                return NULL;
        struct qeval_ctx ec = { .doc = NULL, .msg_ctx = ctx };
        return qnode_eval(c->root, &ec);
}

enum hub_tristate hub_condition_eval_doc(const struct hub_condition *c, const json_t *doc) {
        if (!c)
                return HUB_UNDEFINED;
        if (!c->root)
                return HUB_TRUE;
        struct qeval_ctx ec = { .doc = doc };
        json_t *v = qnode_eval(c->root, &ec);
        enum hub_tristate t = tri_of(v);
        json_decref(v);
        return t;
}

/* ---- query execution ----------------------------------------------------------------- */

struct agg_state {
        double sum;
        unsigned long long n; /* values summed (AVG/SUM), documents counted (COUNT) */
        json_t *best;         /* MIN / MAX */
};

struct group {
        json_t *first;   /* the group's first document (for plain projections) */
        struct agg_state *aggs; /* one per projection */
};

struct hub_query_exec {
        const struct hub_query *q;
        unsigned produced;
        struct group *groups;
        size_t n_groups, cap_groups;
        json_t *index; /* group key -> position */
};

int hub_query_exec_new(const struct hub_query *q, struct hub_query_exec **ret) {
        if (!q || !ret)
                return -EINVAL;
        struct hub_query_exec *x = calloc(1, sizeof *x);
        if (!x)
                return -ENOMEM;
        x->q = q;
        x->index = json_object();
        if (!x->index) {
                free(x);
                return -ENOMEM;
        }
        *ret = x;
        return 0;
}

struct hub_query_exec *hub_query_exec_free(struct hub_query_exec *x) {
        if (!x)
                return NULL;
        for (size_t i = 0; i < x->n_groups; i++) {
                json_decref(x->groups[i].first);
                if (x->groups[i].aggs)
                        for (unsigned k = 0; k < x->q->n_projs; k++)
                                json_decref(x->groups[i].aggs[k].best);
                free(x->groups[i].aggs);
        }
        free(x->groups);
        json_decref(x->index);
        free(x);
        return NULL;
}

/* Name of projection i in output rows; v: its value in doc (for derived names). */
static const char *proj_name(const struct hub_query *q, unsigned i, const json_t *doc, char *buf, size_t n) {
        const struct qproj *pr = &q->projs[i];
        if (pr->alias)
                return pr->alias;
        const struct qnode *e = pr->expr;
        if (e->kind == QN_REF && e->ref == QREF_DOC && e->n_segs > 0 && e->segs[e->n_segs - 1].key) {
                const char *found = NULL;
                if (walk(doc, e->segs, e->n_segs, true, &found) && found)
                        return found;
                return e->segs[e->n_segs - 1].key;
        }
        /* unnamed expressions are $1, $2, … in order */
        unsigned k = 0;
        for (unsigned j = 0; j <= i; j++) {
                const struct qnode *f = q->projs[j].expr;
                if (!q->projs[j].alias && !(f->kind == QN_REF && f->ref == QREF_DOC && f->n_segs > 0 &&
                                            f->segs[f->n_segs - 1].key))
                        k++;
        }
        (void) snprintf(buf, n, "$%u", k);
        return buf;
}

static int project(const struct hub_query *q, const json_t *doc, json_t **ret) {
        json_t *row = json_object();
        if (!row)
                return -ENOMEM;
        for (unsigned i = 0; i < q->n_projs; i++) {
                struct qeval_ctx ec = { .doc = doc };
                char buf[16];
                json_t *v = qnode_eval(q->projs[i].expr, &ec);
                if (!v)
                        continue; /* undefined values are omitted */
                if (json_object_set_new(row, proj_name(q, i, doc, buf, sizeof buf), v) < 0) {
                        json_decref(row);
                        return -ENOMEM;
                }
        }
        *ret = row;
        return 0;
}

/* Appends a canonical, type-tagged form of v to the key string. */
static int key_append(char **s, size_t *len, const json_t *v) {
        char num[40];
        const char *part;
        size_t plen;
        char *dumped = NULL;

        if (!v)
                part = "u", plen = 1;
        else if (json_is_null(v))
                part = "z", plen = 1;
        else if (json_is_true(v))
                part = "t", plen = 1;
        else if (json_is_false(v))
                part = "f", plen = 1;
        else if (json_is_number(v)) {
                plen = (size_t) snprintf(num, sizeof num, "n%.17g", json_number_value(v));
                part = num;
        } else if (json_is_string(v)) {
                plen = (size_t) snprintf(num, sizeof num, "s%zu:", json_string_length(v));
                char *t = realloc(*s, *len + plen + json_string_length(v) + 2);
                if (!t)
                        return -ENOMEM;
                *s = t;
                memcpy(*s + *len, num, plen);
                memcpy(*s + *len + plen, json_string_value(v), json_string_length(v));
                *len += plen + json_string_length(v);
                (*s)[(*len)++] = ';';
                (*s)[*len] = '\0';
                return 0;
        } else {
                dumped = hub_json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY);
                if (!dumped)
                        return -ENOMEM;
                part = dumped;
                plen = strlen(dumped);
        }
        char *t = realloc(*s, *len + plen + 3);
        if (!t) {
                free(dumped);
                return -ENOMEM;
        }
        *s = t;
        (*s)[(*len)++] = 'j';
        memcpy(*s + *len, part, plen);
        *len += plen;
        (*s)[(*len)++] = ';';
        (*s)[*len] = '\0';
        free(dumped);
        return 0;
}

static int type_rank(const json_t *v) {
        if (json_is_boolean(v))
                return 1;
        if (json_is_number(v))
                return 2;
        if (json_is_string(v))
                return 3;
        return 0;
}

static void accumulate(const struct hub_query *q, struct group *g, const json_t *doc) {
        for (unsigned i = 0; i < q->n_projs; i++) {
                const struct qnode *e = q->projs[i].expr;
                struct agg_state *st = &g->aggs[i];
                if (e->kind != QN_AGG)
                        continue;
                if (e->agg == QA_COUNT) {
                        st->n++;
                        continue;
                }
                struct qeval_ctx ec = { .doc = doc };
                json_t *v = qnode_eval(e->a, &ec);
                if (e->agg == QA_AVG || e->agg == QA_SUM) {
                        if (json_is_number(v)) {
                                st->sum += json_number_value(v);
                                st->n++;
                        }
                        json_decref(v);
                        continue;
                }
                int rk = type_rank(v);
                if (rk == 0) {
                        json_decref(v);
                        continue;
                }
                bool better;
                if (!st->best)
                        better = true;
                else {
                        int rb = type_rank(st->best);
                        int o = rk != rb ? (rk < rb ? -1 : 1)
                                : rk == 1 ? (json_is_true(v) - json_is_true(st->best))
                                          : values_order(v, st->best);
                        better = e->agg == QA_MIN ? o < 0 : o > 0;
                }
                if (better) {
                        json_decref(st->best);
                        st->best = v;
                } else
                        json_decref(v);
        }
}

static int group_add(struct hub_query_exec *x, const char *key, const json_t *doc, struct group **ret) {
        if (x->n_groups >= HUB_QUERY_MAX_GROUPS)
                return -E2BIG;
        if (x->n_groups == x->cap_groups) {
                size_t cap = x->cap_groups ? x->cap_groups * 2 : 16;
                struct group *t = realloc(x->groups, cap * sizeof *t);
                if (!t)
                        return -ENOMEM;
                x->groups = t;
                x->cap_groups = cap;
        }
        struct group *g = &x->groups[x->n_groups];
        *g = (struct group) {};
        g->aggs = calloc(MAX(x->q->n_projs, 1u), sizeof *g->aggs);
        if (!g->aggs)
                return -ENOMEM;
        if (key && json_object_set_new(x->index, key, json_integer((json_int_t) x->n_groups)) < 0) {
                free(g->aggs);
                return -ENOMEM;
        }
        g->first = json_incref((json_t *) doc);
        x->n_groups++;
        *ret = g;
        return 0;
}

int hub_query_exec_feed(struct hub_query_exec *x, const json_t *doc, json_t **ret_row) {
        const struct hub_query *q;
        int r;

        if (ret_row)
                *ret_row = NULL;
        if (!x || !json_is_object(doc))
                return -EINVAL;
        q = x->q;
        if (!q->aggregate && q->top && x->produced >= q->top)
                return 1;
        if (q->has_where && hub_condition_eval_doc(&q->where, doc) != HUB_TRUE)
                return 0;

        if (!q->aggregate) {
                json_t *row;
                if (q->star)
                        row = json_incref((json_t *) doc);
                else {
                        r = project(q, doc, &row);
                        if (r < 0)
                                return r;
                }
                x->produced++;
                if (ret_row)
                        *ret_row = row;
                else
                        json_decref(row);
                return q->top && x->produced >= q->top ? 1 : 0;
        }

        struct group *g = NULL;
        if (q->n_group_by == 0) {
                if (x->n_groups == 0) {
                        r = group_add(x, NULL, doc, &g);
                        if (r < 0)
                                return r;
                } else
                        g = &x->groups[0];
        } else {
                char *key = NULL;
                size_t len = 0;
                for (unsigned i = 0; i < q->n_group_by; i++) {
                        struct qeval_ctx ec = { .doc = doc };
                        json_t *v = qnode_eval(q->group_by[i], &ec);
                        r = key_append(&key, &len, v);
                        json_decref(v);
                        if (r < 0) {
                                free(key);
                                return r;
                        }
                }
                json_t *pos = json_object_get(x->index, key);
                if (pos)
                        g = &x->groups[json_integer_value(pos)];
                else {
                        r = group_add(x, key, doc, &g);
                        if (r < 0) {
                                free(key);
                                return r;
                        }
                }
                free(key);
        }
        accumulate(q, g, doc);
        return 0;
}

static int group_row(const struct hub_query *q, const struct group *g, json_t **ret) {
        json_t *row = json_object();
        if (!row)
                return -ENOMEM;
        for (unsigned i = 0; i < q->n_projs; i++) {
                const struct qnode *e = q->projs[i].expr;
                const struct agg_state *st = &g->aggs[i];
                json_t *v = NULL;
                char buf[16];
                if (e->kind != QN_AGG) {
                        struct qeval_ctx ec = { .doc = g->first };
                        v = g->first ? qnode_eval(e, &ec) : NULL;
                } else
                        switch (e->agg) {
                        case QA_COUNT: v = json_integer((json_int_t) st->n); break;
                        case QA_SUM: v = mk_num(st->sum); break;
                        case QA_AVG: v = st->n ? mk_num(st->sum / (double) st->n) : NULL; break;
                        default: v = json_incref(st->best); break;
                        }
                if (!v)
                        continue;
                if (json_object_set_new(row, proj_name(q, i, g->first, buf, sizeof buf), v) < 0) {
                        json_decref(row);
                        return -ENOMEM;
                }
        }
        *ret = row;
        return 0;
}

int hub_query_exec_finish(struct hub_query_exec *x, json_t **ret_rows) {
        int r;

        if (!x || !ret_rows)
                return -EINVAL;
        const struct hub_query *q = x->q;
        json_t *rows = json_array();
        if (!rows)
                return -ENOMEM;
        if (q->aggregate) {
                /* aggregates without GROUP BY give one row even over no document */
                if (x->n_groups == 0 && q->n_group_by == 0) {
                        struct group empty = { .aggs = calloc(MAX(q->n_projs, 1u), sizeof *empty.aggs) };
                        json_t *row;
                        if (!empty.aggs) {
                                json_decref(rows);
                                return -ENOMEM;
                        }
                        r = group_row(q, &empty, &row);
                        free(empty.aggs);
                        if (r < 0 || json_array_append_new(rows, row) < 0) {
                                json_decref(rows);
                                return r < 0 ? r : -ENOMEM;
                        }
                }
                for (size_t i = 0; i < x->n_groups && (!q->top || i < q->top); i++) {
                        json_t *row;
                        r = group_row(q, &x->groups[i], &row);
                        if (r < 0 || json_array_append_new(rows, row) < 0) {
                                json_decref(rows);
                                return r < 0 ? r : -ENOMEM;
                        }
                }
        }
        *ret_rows = rows;
        return 0;
}
