/* SPDX-License-Identifier: MIT */
/* Lexer and recursive-descent parser of the query language (reference §5.5) and of routing
 * conditions (reference §8.2). The input is bounded (HUB_QUERY_MAX_LEN), recursion is
 * bounded (HUB_QUERY_MAX_DEPTH), the node count and tree height are bounded, so no input
 * can exhaust the stack or the heap (the parser is fuzzed). */

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/query.h"
#include "query-internal.h"

#define MAX_TREE_HEIGHT 512u

enum tok_kind {
        T_EOF, T_NUM, T_STR, T_NAME,
        T_LPAREN, T_RPAREN, T_LBRACK, T_RBRACK, T_LBRACE, T_RBRACE, T_COMMA,
        T_STAR, T_SLASH, T_PERCENT, T_PLUS, T_MINUS, T_CONCAT, T_COALESCE,
        T_EQ, T_NE, T_LT, T_LE, T_GT, T_GE,
};

struct tok {
        enum tok_kind kind;
        unsigned start, len;
        double num;
        char *str; /* T_STR: decoded value (owned by the token) */
        size_t str_len;
};

struct parser {
        const char *text;
        size_t text_len;
        bool query; /* query grammar (vs routing condition grammar) */
        struct tok tok; /* current token */
        unsigned prev_end;
        unsigned pos; /* lexer position */
        unsigned depth;
        unsigned nodes;
        bool failed;
        int error;
        struct hub_query_error *err;
};

static const struct {
        const char *name, *alias;
        enum qfunc f;
        unsigned min_args, max_args;
} functions[] = {
        { "abs", NULL, QF_ABS, 1, 1 },
        { "exp", NULL, QF_EXP, 1, 1 },
        { "power", NULL, QF_POWER, 2, 2 },
        { "square", NULL, QF_SQUARE, 1, 1 },
        { "ceiling", NULL, QF_CEILING, 1, 1 },
        { "floor", NULL, QF_FLOOR, 1, 1 },
        { "sign", NULL, QF_SIGN, 1, 1 },
        { "sqrt", NULL, QF_SQRT, 1, 1 },
        { "as_number", NULL, QF_AS_NUMBER, 1, 1 },
        { "is_array", NULL, QF_IS_ARRAY, 1, 1 },
        { "is_bool", NULL, QF_IS_BOOL, 1, 1 },
        { "is_defined", NULL, QF_IS_DEFINED, 1, 1 },
        { "is_null", NULL, QF_IS_NULL, 1, 1 },
        { "is_number", NULL, QF_IS_NUMBER, 1, 1 },
        { "is_object", NULL, QF_IS_OBJECT, 1, 1 },
        { "is_primitive", NULL, QF_IS_PRIMITIVE, 1, 1 },
        { "is_string", NULL, QF_IS_STRING, 1, 1 },
        { "concat", NULL, QF_CONCAT, 2, 64 },
        { "length", NULL, QF_LENGTH, 1, 1 },
        { "lower", NULL, QF_LOWER, 1, 1 },
        { "upper", NULL, QF_UPPER, 1, 1 },
        { "substring", NULL, QF_SUBSTRING, 2, 3 },
        { "index_of", NULL, QF_INDEX_OF, 2, 2 },
        { "starts_with", "startswith", QF_STARTS_WITH, 2, 2 },
        { "ends_with", "endswith", QF_ENDS_WITH, 2, 2 },
        { "contains", NULL, QF_CONTAINS, 2, 2 },
};

const char *qfunc_name(enum qfunc f) {
        for (size_t i = 0; i < ELEMENTSOF(functions); i++)
                if (functions[i].f == f)
                        return functions[i].name;
        return "?";
}

/* ---- errors -------------------------------------------------------------------------- */

_printf_(3, 4) static void fail_at(struct parser *p, unsigned offset, const char *fmt, ...) {
        va_list ap;

        if (p->failed)
                return;
        p->failed = true;
        if (!p->error)
                p->error = -EINVAL;
        if (!p->err)
                return;
        unsigned chars = 0, line = 1, col = 1;
        for (unsigned i = 0; i < offset && i < p->text_len; i++) {
                unsigned char c = (unsigned char) p->text[i];
                if ((c & 0xC0) == 0x80)
                        continue; /* UTF-8 continuation byte: same character */
                chars++;
                if (c == '\n') {
                        line++;
                        col = 1;
                } else
                        col++;
        }
        p->err->offset = chars;
        p->err->line = line;
        p->err->column = col;
        va_start(ap, fmt);
        (void) vsnprintf(p->err->message, sizeof p->err->message, fmt, ap);
        va_end(ap);
}

static void fail_nomem(struct parser *p) {
        p->error = -ENOMEM;
        fail_at(p, p->tok.start, "out of memory");
}

/* "'text'" of the current token (shortened), or "end of input". */
static const char *tok_desc(struct parser *p, char *buf, size_t n) {
        if (p->tok.kind == T_EOF)
                return "end of input";
        unsigned len = p->tok.len;
        if (len > 40) {
                len = 40;
                while (len > 0 && ((unsigned char) p->text[p->tok.start + len] & 0xC0) == 0x80)
                        len--; /* do not cut a UTF-8 sequence */
                (void) snprintf(buf, n, "'%.*s...'", (int) len, p->text + p->tok.start);
        } else
                (void) snprintf(buf, n, "'%.*s'", (int) len, p->text + p->tok.start);
        return buf;
}

static void fail_expected(struct parser *p, const char *expected) {
        char b[64];
        fail_at(p, p->tok.start, "found %s, expected %s", tok_desc(p, b, sizeof b), expected);
}

/* ---- lexer --------------------------------------------------------------------------- */

static bool is_digit(char c) {
        return c >= '0' && c <= '9';
}
static bool is_alpha(char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
static bool is_space(char c) {
        return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}

/* Routing grammar: ID chars are everything but ()<>@,;:\"/[]?={} and whitespace; we also
 * stop a name at the operator characters ' + * % | ! so that `a+b` and `a!=b` work. */
static bool cond_id_char(char c) {
        return c && !is_space(c) && !strchr("()<>@,;:\\\"/[]?={}'+*%|!", c);
}
static bool cond_id_start(char c) {
        return cond_id_char(c) && !is_digit(c) && c != '-' && c != '.';
}
static bool query_id_start(char c) {
        return is_alpha(c) || c == '_' || c == '$' || (unsigned char) c >= 0x80;
}
static bool query_id_char(char c) {
        return query_id_start(c) || is_digit(c);
}

static int hexval(char c) {
        if (is_digit(c))
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

static int read_u4(const char *s, unsigned *ret) {
        unsigned v = 0;
        for (int i = 0; i < 4; i++) {
                int h = hexval(s[i]);
                if (h < 0)
                        return -EINVAL;
                v = v * 16 + (unsigned) h;
        }
        *ret = v;
        return 0;
}

static size_t put_utf8(char *out, unsigned cp) {
        if (cp < 0x80) {
                out[0] = (char) cp;
                return 1;
        }
        if (cp < 0x800) {
                out[0] = (char) (0xC0 | (cp >> 6));
                out[1] = (char) (0x80 | (cp & 0x3F));
                return 2;
        }
        if (cp < 0x10000) {
                out[0] = (char) (0xE0 | (cp >> 12));
                out[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
                out[2] = (char) (0x80 | (cp & 0x3F));
                return 3;
        }
        out[0] = (char) (0xF0 | (cp >> 18));
        out[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
        out[3] = (char) (0x80 | (cp & 0x3F));
        return 4;
}

static void lex_string(struct parser *p, unsigned start) {
        const char *s = p->text;
        char quote = s[start];
        unsigned i = start + 1;
        /* the decoded string is never longer than the source */
        char *out = malloc(p->text_len - start + 1);
        size_t n = 0;

        if (!out)
                return fail_nomem(p);
        for (;;) {
                char c = s[i];
                if (c == '\0') {
                        free(out);
                        return fail_at(p, start, "unterminated string");
                }
                if (c == quote) {
                        i++;
                        break;
                }
                if (c != '\\') {
                        out[n++] = c;
                        i++;
                        continue;
                }
                char e = s[i + 1];
                if (e == '\'' || e == '"' || e == '\\') {
                        out[n++] = e;
                        i += 2;
                        continue;
                }
                if (e != 'u') {
                        free(out);
                        if (e == '\0')
                                return fail_at(p, start, "unterminated string");
                        if ((unsigned char) e < 0x20 || (unsigned char) e >= 0x7F)
                                return fail_at(p, i, "invalid escape sequence, expected \\', \\\", \\\\ or \\uXXXX");
                        return fail_at(p, i, "invalid escape sequence '\\%c', expected \\', \\\", \\\\ or \\uXXXX", e);
                }
                unsigned cp;
                if (read_u4(s + i + 2, &cp) < 0) {
                        free(out);
                        return fail_at(p, i, "invalid \\u escape, expected 4 hexadecimal digits");
                }
                unsigned len = 6;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                        unsigned lo;
                        if (s[i + 6] != '\\' || s[i + 7] != 'u' || read_u4(s + i + 8, &lo) < 0 ||
                            lo < 0xDC00 || lo > 0xDFFF) {
                                free(out);
                                return fail_at(p, i, "invalid \\u escape: unpaired surrogate");
                        }
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        len = 12;
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                        free(out);
                        return fail_at(p, i, "invalid \\u escape: unpaired surrogate");
                } else if (cp == 0) {
                        free(out);
                        return fail_at(p, i, "\\u0000 is not allowed in a string");
                }
                n += put_utf8(out + n, cp);
                i += len;
        }
        out[n] = '\0';
        p->tok.kind = T_STR;
        p->tok.str = out;
        p->tok.str_len = n;
        p->tok.len = i - start;
}

static void lex_number(struct parser *p, unsigned start) {
        const char *s = p->text;
        unsigned i = start;

        if (s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X')) {
                unsigned long long v = 0;
                bool overflow = false;
                i += 2;
                if (hexval(s[i]) < 0)
                        return fail_at(p, start, "invalid hexadecimal number, expected digits after '0x'");
                while (hexval(s[i]) >= 0) {
                        if (v > (1ull << 53))
                                overflow = true;
                        v = v * 16 + (unsigned) hexval(s[i]);
                        i++;
                }
                if (overflow || v > (1ull << 53))
                        return fail_at(p, start, "hexadecimal number too large");
                p->tok.num = (double) v;
        } else {
                while (is_digit(s[i]))
                        i++;
                if (s[i] == '.' && is_digit(s[i + 1])) {
                        i++;
                        while (is_digit(s[i]))
                                i++;
                }
                if ((s[i] == 'e' || s[i] == 'E') &&
                    (is_digit(s[i + 1]) || ((s[i + 1] == '+' || s[i + 1] == '-') && is_digit(s[i + 2])))) {
                        i += 2;
                        while (is_digit(s[i]))
                                i++;
                }
                char buf[64];
                if (i - start >= sizeof buf)
                        return fail_at(p, start, "number too long");
                memcpy(buf, s + start, i - start);
                buf[i - start] = '\0';
                char *end;
                errno = 0;
                double d = strtod(buf, &end);
                if (*end || !isfinite(d))
                        return fail_at(p, start, "invalid number '%s'", buf);
                p->tok.num = d;
        }
        /* `10abc`, `1.5.3`: a number must not run into a name */
        if (p->query ? (query_id_char(s[i]) || s[i] == '.') : (cond_id_char(s[i]) && s[i] != '-')) {
                unsigned j = i;
                while (j - start < 40 && (p->query ? query_id_char(s[j]) || s[j] == '.' : cond_id_char(s[j])))
                        j++;
                return fail_at(p, start, "invalid number '%.*s'", (int) (j - start), s + start);
        }
        p->tok.kind = T_NUM;
        p->tok.len = i - start;
}

/* A name: routing grammar ID or $SYS_PROP (may hold [n]), or a query path (seg(.seg|[n])*). */
static void lex_name(struct parser *p, unsigned start) {
        const char *s = p->text;
        unsigned i = start;

        if (!p->query) {
                bool sys = s[i] == '$';
                i++;
                while (cond_id_char(s[i]) || (sys && (s[i] == '[' || s[i] == ']')))
                        i++;
                if (sys && i == start + 1)
                        return fail_at(p, start, "expected a property name after '$'");
        } else {
                for (;;) {
                        while (query_id_char(s[i]))
                                i++;
                        if (s[i] == '.' && query_id_start(s[i + 1])) {
                                i++;
                                continue;
                        }
                        if (s[i] == '[' && is_digit(s[i + 1])) {
                                /* `x IN[1]`: IN and NIN are keywords, not paths */
                                if ((i - start == 2 && strncasecmp(s + start, "IN", 2) == 0) ||
                                    (i - start == 3 && strncasecmp(s + start, "NIN", 3) == 0))
                                        break;
                                unsigned j = i + 1;
                                while (is_digit(s[j]))
                                        j++;
                                if (s[j] != ']')
                                        break;
                                i = j + 1;
                                if (s[i] == '.' && query_id_start(s[i + 1])) {
                                        i++;
                                        continue;
                                }
                                if (s[i] == '[')
                                        continue;
                        }
                        break;
                }
        }
        p->tok.kind = T_NAME;
        p->tok.len = i - start;
}

static void next(struct parser *p) {
        const char *s = p->text;
        unsigned i;

        if (p->failed)
                return;
        p->prev_end = p->tok.start + p->tok.len;
        free(p->tok.str);
        p->tok = (struct tok) {};

        i = p->pos;
        for (;;) {
                while (is_space(s[i]))
                        i++;
                if (s[i] == '/' && s[i + 1] == '*') {
                        const char *e = strstr(s + i + 2, "*/");
                        if (!e) {
                                p->tok.start = i;
                                return fail_at(p, i, "unterminated comment");
                        }
                        i = (unsigned) (e - s) + 2;
                        continue;
                }
                break;
        }
        p->tok.start = i;
        p->tok.len = 1;
        char c = s[i];
        char d = c ? s[i + 1] : '\0';
        switch (c) {
        case '\0': p->tok.kind = T_EOF; p->tok.len = 0; break;
        case '(': p->tok.kind = T_LPAREN; break;
        case ')': p->tok.kind = T_RPAREN; break;
        case '[': p->tok.kind = T_LBRACK; break;
        case ']': p->tok.kind = T_RBRACK; break;
        case '{': p->tok.kind = T_LBRACE; break;
        case '}': p->tok.kind = T_RBRACE; break;
        case ',': p->tok.kind = T_COMMA; break;
        case '*': p->tok.kind = T_STAR; break;
        case '/': p->tok.kind = T_SLASH; break;
        case '%': p->tok.kind = T_PERCENT; break;
        case '+': p->tok.kind = T_PLUS; break;
        case '-': p->tok.kind = T_MINUS; break;
        case '=': p->tok.kind = T_EQ; break;
        case '|':
                if (d != '|')
                        return fail_at(p, i, "unexpected character '|', expected '||'");
                p->tok.kind = T_CONCAT;
                p->tok.len = 2;
                break;
        case '?':
                if (d != '?')
                        return fail_at(p, i, "unexpected character '?', expected '?\?'");
                p->tok.kind = T_COALESCE;
                p->tok.len = 2;
                break;
        case '!':
                if (d != '=')
                        return fail_at(p, i, "unexpected character '!', expected '!='");
                p->tok.kind = T_NE;
                p->tok.len = 2;
                break;
        case '<':
                if (d == '=' || d == '>') {
                        p->tok.kind = d == '=' ? T_LE : T_NE;
                        p->tok.len = 2;
                } else
                        p->tok.kind = T_LT;
                break;
        case '>':
                if (d == '=') {
                        p->tok.kind = T_GE;
                        p->tok.len = 2;
                } else
                        p->tok.kind = T_GT;
                break;
        case '\'':
        case '"':
                lex_string(p, i);
                break;
        default:
                if (is_digit(c) || (c == '.' && is_digit(d)))
                        lex_number(p, i);
                else if (p->query ? query_id_start(c) : cond_id_start(c))
                        lex_name(p, i);
                else if ((unsigned char) c < 0x20 || (unsigned char) c == 0x7F)
                        return fail_at(p, i, "unexpected control character 0x%02x", (unsigned) (unsigned char) c);
                else
                        return fail_at(p, i, "unexpected character '%c'", c);
        }
        p->pos = p->tok.start + p->tok.len;
}

static bool tok_is(struct parser *p, const char *kw) {
        return p->tok.kind == T_NAME && p->tok.len == strlen(kw) &&
               strncasecmp(p->text + p->tok.start, kw, p->tok.len) == 0;
}
static bool tok_is_exact(struct parser *p, const char *kw) {
        return p->tok.kind == T_NAME && p->tok.len == strlen(kw) &&
               strncmp(p->text + p->tok.start, kw, p->tok.len) == 0;
}

static bool tok_is_reserved(struct parser *p) {
        static const char *const cond_kw[] = { "AND", "OR", "NOT" };
        static const char *const query_kw[] = { "SELECT", "TOP", "FROM", "WHERE", "GROUP", "BY", "AS", "IN", "NIN" };
        for (size_t i = 0; i < ELEMENTSOF(cond_kw); i++)
                if (tok_is(p, cond_kw[i]))
                        return true;
        if (p->query)
                for (size_t i = 0; i < ELEMENTSOF(query_kw); i++)
                        if (tok_is(p, query_kw[i]))
                                return true;
        return false;
}

/* Numbers are doubles; integral ones are kept as JSON integers so results print as such. */
static json_t *num_value(double d) {
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
                return json_integer((json_int_t) d);
        return json_real(d);
}

/* ---- nodes --------------------------------------------------------------------------- */

void qnode_free(struct qnode *n) {
        if (!n)
                return;
        if (n->kind == QN_CONST)
                json_decref(n->value);
        json_decref(n->list);
        free(n->name);
        for (unsigned i = 0; i < n->n_segs; i++)
                free(n->segs[i].key);
        free(n->segs);
        qnode_free(n->a);
        qnode_free(n->b);
        for (unsigned i = 0; i < n->n_args; i++)
                qnode_free(n->args[i]);
        free(n->args);
        free(n);
}
DEFINE_CLEANUP_FUNC(struct qnode *, qnode_free);

static struct qnode *node_new(struct parser *p, enum qnode_kind kind, unsigned offset) {
        if (++p->nodes > HUB_QUERY_MAX_NODES) {
                fail_at(p, offset, "expression too complex (more than %u elements)", HUB_QUERY_MAX_NODES);
                return NULL;
        }
        struct qnode *n = calloc(1, sizeof *n);
        if (!n) {
                fail_nomem(p);
                return NULL;
        }
        n->kind = kind;
        n->offset = offset;
        return n;
}

static unsigned node_height(const struct qnode *n) {
        if (!n)
                return 0;
        return n->height ? n->height : 1;
}

static struct qnode *node_op(struct parser *p, enum qnode_kind kind, enum qop op, unsigned offset,
                             struct qnode *a, struct qnode *b) {
        if (p->failed) {
                qnode_free(a);
                qnode_free(b);
                return NULL;
        }
        unsigned h = 1 + MAX(node_height(a), node_height(b));
        if (h > MAX_TREE_HEIGHT) {
                qnode_free(a);
                qnode_free(b);
                fail_at(p, offset, "expression too complex (more than %u operators in a chain)", MAX_TREE_HEIGHT);
                return NULL;
        }
        struct qnode *n = node_new(p, kind, offset);
        if (!n) {
                qnode_free(a);
                qnode_free(b);
                return NULL;
        }
        n->op = op;
        n->a = a;
        n->b = b;
        n->height = h;
        return n;
}

/* Splits "a.b[0].c" into segments. */
static int parse_segs(const char *s, size_t len, struct qseg **ret, unsigned *ret_n) {
        struct qseg *segs = NULL;
        unsigned n = 0;
        size_t i = 0;
        int r = -EINVAL;

        while (i < len) {
                struct qseg sg = { .index = -1 };
                if (s[i] == '[') {
                        size_t j = i + 1;
                        long v = 0;
                        while (j < len && is_digit(s[j]) && v < 100000000)
                                v = v * 10 + (s[j++] - '0');
                        if (j == i + 1 || j >= len || s[j] != ']')
                                goto fail;
                        sg.index = v;
                        i = j + 1;
                        if (i < len && s[i] == '.') {
                                i++;
                                if (i >= len)
                                        goto fail;
                        } else if (i < len && s[i] != '[')
                                goto fail;
                } else {
                        size_t j = i;
                        while (j < len && s[j] != '.' && s[j] != '[' && s[j] != ']')
                                j++;
                        if (j == i || (j < len && s[j] == ']'))
                                goto fail;
                        sg.key = strndup(s + i, j - i);
                        if (!sg.key) {
                                r = -ENOMEM;
                                goto fail;
                        }
                        i = j;
                        if (i < len && s[i] == '.') {
                                i++;
                                if (i >= len) {
                                        free(sg.key);
                                        goto fail;
                                }
                        }
                }
                struct qseg *t = realloc(segs, (n + 1) * sizeof *segs);
                if (!t) {
                        free(sg.key);
                        r = -ENOMEM;
                        goto fail;
                }
                segs = t;
                segs[n++] = sg;
        }
        *ret = segs;
        *ret_n = n;
        return 0;
fail:
        for (unsigned k = 0; k < n; k++)
                free(segs[k].key);
        free(segs);
        return r;
}

/* A reference node from the current T_NAME token. escaped: inside {…}. */
static struct qnode *make_ref(struct parser *p, bool escaped) {
        const char *s = p->text + p->tok.start;
        size_t len = p->tok.len;
        unsigned off = p->tok.start;
        _cleanup_(qnode_freep) struct qnode *n = node_new(p, QN_REF, off);
        int r;

        if (!n)
                return NULL;
        if (p->query) {
                n->ref = QREF_DOC;
                r = parse_segs(s, len, &n->segs, &n->n_segs);
        } else if (s[0] != '$') {
                n->ref = QREF_APP;
                n->name = strndup(s, len);
                r = n->name ? 0 : -ENOMEM;
        } else if (len >= 5 && strncasecmp(s, "$body", 5) == 0 && (len == 5 || s[5] == '.' || s[5] == '[')) {
                n->ref = QREF_BODY;
                n->name = strndup(s, len); /* for the application-property fallback */
                if (!n->name) {
                        fail_nomem(p);
                        return NULL;
                }
                if (len == 5 || s[5] == '[')
                        n->ref = QREF_NONE; /* `$body` alone or `$body[0]`: not supported (§8.4) */
                r = len == 5 ? 0 : parse_segs(s + 6, len - 6, &n->segs, &n->n_segs);
                if (s[5] == '[')
                        r = parse_segs(s + 5, len - 5, &n->segs, &n->n_segs);
        } else if (len >= 5 && strncasecmp(s, "$twin", 5) == 0 && (len == 5 || s[5] == '.')) {
                n->ref = len == 5 ? QREF_NONE : QREF_TWIN;
                r = len == 5 ? 0 : parse_segs(s + 6, len - 6, &n->segs, &n->n_segs);
        } else {
                n->ref = escaped ? QREF_SYS_ESCAPED : QREF_SYS;
                n->name = strndup(s, len);
                if (!n->name)
                        r = -ENOMEM;
                else {
                        n->sys_known = hub_sys_prop_from_query_name(n->name, &n->sys) >= 0;
                        r = 0;
                        if (escaped && !n->sys_known) {
                                fail_at(p, off, "unknown system property '%s'", n->name);
                                return NULL;
                        }
                }
        }
        if (r == -ENOMEM) {
                fail_nomem(p);
                return NULL;
        }
        if (r < 0) {
                fail_at(p, off, "invalid property path '%.*s'", (int) MIN(len, 100u), s);
                return NULL;
        }
        return TAKE_PTR(n);
}

/* ---- expressions --------------------------------------------------------------------- */

enum level {
        L_COALESCE, L_OR, L_AND, L_NOT_Q /* query grammar only */, L_EQUALITY, L_COMPARE, L_ADD, L_MUL, L_UNARY,
};

static struct qnode *parse_expr(struct parser *p);
static struct qnode *parse_level(struct parser *p, enum level lv);

static bool enter(struct parser *p) {
        if (++p->depth > HUB_QUERY_MAX_DEPTH) {
                fail_at(p, p->tok.start, "expression nested too deeply (more than %u levels)", HUB_QUERY_MAX_DEPTH);
                return false;
        }
        return true;
}

static json_t *parse_array_const(struct parser *p) {
        /* '[' literal (',' literal)* ']' */
        _cleanup_(json_decrefp) json_t *a = json_array();
        if (!a) {
                fail_nomem(p);
                return NULL;
        }
        next(p);
        if (p->tok.kind == T_RBRACK) {
                next(p);
                return TAKE_PTR(a);
        }
        for (;;) {
                json_t *v = NULL;
                bool neg = false;
                if (p->tok.kind == T_MINUS) {
                        neg = true;
                        next(p);
                        if (p->tok.kind != T_NUM) {
                                fail_expected(p, "a number");
                                return NULL;
                        }
                }
                if (p->failed)
                        return NULL;
                if (++p->nodes > HUB_QUERY_MAX_NODES) {
                        fail_at(p, p->tok.start, "expression too complex (more than %u elements)", HUB_QUERY_MAX_NODES);
                        return NULL;
                }
                if (p->tok.kind == T_NUM)
                        v = num_value(neg ? -p->tok.num : p->tok.num);
                else if (p->tok.kind == T_STR)
                        v = json_stringn(p->tok.str, p->tok.str_len);
                else if (tok_is_exact(p, "true"))
                        v = json_true();
                else if (tok_is_exact(p, "false"))
                        v = json_false();
                else if (tok_is_exact(p, "null"))
                        v = json_null();
                else {
                        fail_expected(p, "a constant (string, number, true, false or null)");
                        return NULL;
                }
                if (!v || json_array_append_new(a, v) < 0) {
                        fail_nomem(p);
                        return NULL;
                }
                next(p);
                if (p->tok.kind == T_COMMA) {
                        next(p);
                        continue;
                }
                if (p->tok.kind == T_RBRACK) {
                        next(p);
                        return TAKE_PTR(a);
                }
                if (!p->failed)
                        fail_expected(p, "',' or ']'");
                return NULL;
        }
}

static int lookup_function(const char *s, size_t len) {
        for (size_t i = 0; i < ELEMENTSOF(functions); i++) {
                if (strlen(functions[i].name) == len && strncasecmp(functions[i].name, s, len) == 0)
                        return (int) i;
                if (functions[i].alias && strlen(functions[i].alias) == len &&
                    strncasecmp(functions[i].alias, s, len) == 0)
                        return (int) i;
        }
        return -1;
}

static bool is_aggregate_name(const char *s, size_t len) {
        static const char *const aggs[] = { "COUNT", "AVG", "SUM", "MIN", "MAX" };
        for (size_t i = 0; i < ELEMENTSOF(aggs); i++)
                if (strlen(aggs[i]) == len && strncasecmp(aggs[i], s, len) == 0)
                        return true;
        return false;
}

static struct qnode *parse_call(struct parser *p) {
        unsigned off = p->tok.start, len = p->tok.len;
        const char *name = p->text + off;
        int fi = lookup_function(name, len);

        if (fi < 0) {
                if (p->query && is_aggregate_name(name, len))
                        fail_at(p, off, "aggregate '%.*s' is only allowed as a whole projection of SELECT", (int) len, name);
                else
                        fail_at(p, off, "unknown function '%.*s'", (int) MIN(len, 64u), name);
                return NULL;
        }
        _cleanup_(qnode_freep) struct qnode *n = node_new(p, QN_FUNC, off);
        if (!n)
                return NULL;
        n->func = functions[fi].f;
        unsigned height = 1;
        next(p); /* name */
        next(p); /* ( */
        if (p->tok.kind != T_RPAREN)
                for (;;) {
                        struct qnode *arg = parse_expr(p);
                        if (!arg)
                                return NULL;
                        if (n->n_args >= 64) {
                                qnode_free(arg);
                                fail_at(p, off, "too many arguments");
                                return NULL;
                        }
                        struct qnode **t = realloc(n->args, (n->n_args + 1) * sizeof *t);
                        if (!t) {
                                qnode_free(arg);
                                fail_nomem(p);
                                return NULL;
                        }
                        n->args = t;
                        n->args[n->n_args++] = arg;
                        height = MAX(height, 1 + node_height(arg));
                        if (p->tok.kind == T_COMMA) {
                                next(p);
                                continue;
                        }
                        break;
                }
        if (p->tok.kind != T_RPAREN) {
                fail_expected(p, "',' or ')'");
                return NULL;
        }
        unsigned mn = functions[fi].min_args, mx = functions[fi].max_args;
        if (n->n_args < mn || n->n_args > mx) {
                if (mn == mx)
                        fail_at(p, off, "function '%s' takes %u argument%s, found %u", functions[fi].name, mn,
                                mn == 1 ? "" : "s", n->n_args);
                else
                        fail_at(p, off, "function '%s' takes %u to %u arguments, found %u", functions[fi].name, mn,
                                mx, n->n_args);
                return NULL;
        }
        if (n->func == QF_IS_DEFINED && p->query && n->args[0]->kind != QN_REF) {
                fail_at(p, n->args[0]->offset, "IS_DEFINED expects a property path");
                return NULL;
        }
        if (height > MAX_TREE_HEIGHT) {
                fail_at(p, off, "expression too complex");
                return NULL;
        }
        n->height = height;
        next(p); /* ) */
        return TAKE_PTR(n);
}

static struct qnode *parse_primary(struct parser *p) {
        struct qnode *n;
        unsigned off = p->tok.start;

        if (p->failed)
                return NULL;
        switch (p->tok.kind) {
        case T_LPAREN:
                next(p);
                n = parse_expr(p);
                if (!n)
                        return NULL;
                if (p->tok.kind != T_RPAREN) {
                        qnode_free(n);
                        fail_expected(p, "')'");
                        return NULL;
                }
                next(p);
                return n;
        case T_NUM:
        case T_STR:
                n = node_new(p, QN_CONST, off);
                if (!n)
                        return NULL;
                n->value = p->tok.kind == T_NUM ? num_value(p->tok.num) : json_stringn(p->tok.str, p->tok.str_len);
                if (!n->value) {
                        qnode_free(n);
                        fail_nomem(p);
                        return NULL;
                }
                next(p);
                return n;
        case T_LBRACE:
                if (p->query)
                        break;
                next(p);
                if (p->tok.kind != T_NAME || p->text[p->tok.start] != '$') {
                        fail_expected(p, "a system property ('$name') inside '{ }'");
                        return NULL;
                }
                n = make_ref(p, true);
                if (!n)
                        return NULL;
                next(p);
                if (p->tok.kind != T_RBRACE) {
                        qnode_free(n);
                        fail_expected(p, "'}'");
                        return NULL;
                }
                next(p);
                return n;
        case T_NAME:
                if (tok_is_exact(p, "true") || tok_is_exact(p, "false") || tok_is_exact(p, "null")) {
                        n = node_new(p, QN_CONST, off);
                        if (!n)
                                return NULL;
                        n->value = tok_is_exact(p, "true") ? json_true()
                                   : tok_is_exact(p, "false") ? json_false()
                                                              : json_null();
                        next(p);
                        return n;
                }
                if (tok_is_exact(p, "undefined")) {
                        n = node_new(p, QN_REF, off);
                        if (!n)
                                return NULL;
                        n->ref = QREF_NONE;
                        next(p);
                        return n;
                }
                if (tok_is_reserved(p))
                        break;
                /* a function call: name immediately followed by '(' (whitespace allowed) */
                {
                        unsigned i = p->pos;
                        while (is_space(p->text[i]))
                                i++;
                        if (p->text[i] == '(')
                                return parse_call(p);
                }
                n = make_ref(p, false);
                if (n)
                        next(p);
                return n;
        default:
                break;
        }
        fail_expected(p, "an expression");
        return NULL;
}

static struct qnode *parse_unary(struct parser *p) {
        unsigned off = p->tok.start;
        enum qop op;

        if (p->tok.kind == T_MINUS)
                op = QOP_NEG;
        else if (!p->query && tok_is(p, "NOT"))
                op = QOP_NOT;
        else
                return parse_primary(p);
        if (!enter(p))
                return NULL;
        next(p);
        struct qnode *a = parse_unary(p);
        p->depth--;
        if (!a)
                return NULL;
        return node_op(p, QN_UNARY, op, off, a, NULL);
}

static bool match_op(struct parser *p, enum level lv, enum qop *ret) {
        switch (lv) {
        case L_COALESCE:
                if (p->tok.kind == T_COALESCE)
                        return *ret = QOP_COALESCE, true;
                return false;
        case L_OR:
                return tok_is(p, "OR") ? (*ret = QOP_OR, true) : false;
        case L_AND:
                return tok_is(p, "AND") ? (*ret = QOP_AND, true) : false;
        case L_EQUALITY:
                if (p->tok.kind == T_EQ)
                        return *ret = QOP_EQ, true;
                if (p->tok.kind == T_NE)
                        return *ret = QOP_NE, true;
                return false;
        case L_COMPARE:
                switch (p->tok.kind) {
                case T_LT: return *ret = QOP_LT, true;
                case T_LE: return *ret = QOP_LE, true;
                case T_GT: return *ret = QOP_GT, true;
                case T_GE: return *ret = QOP_GE, true;
                default: break;
                }
                if (p->query && tok_is(p, "IN"))
                        return *ret = QOP_IN, true;
                if (p->query && tok_is(p, "NIN"))
                        return *ret = QOP_NIN, true;
                return false;
        case L_ADD:
                switch (p->tok.kind) {
                case T_PLUS: return *ret = QOP_ADD, true;
                case T_MINUS: return *ret = QOP_SUB, true;
                case T_CONCAT: return *ret = QOP_CONCAT, true;
                default: return false;
                }
        case L_MUL:
                switch (p->tok.kind) {
                case T_STAR: return *ret = QOP_MUL, true;
                case T_SLASH: return *ret = QOP_DIV, true;
                case T_PERCENT: return *ret = QOP_MOD, true;
                default: return false;
                }
        default:
                return false;
        }
}

static struct qnode *parse_level(struct parser *p, enum level lv) {
        if (p->failed)
                return NULL;
        if (lv == L_UNARY)
                return parse_unary(p);
        if (lv == L_NOT_Q) {
                if (!p->query)
                        return parse_level(p, L_EQUALITY);
                if (!tok_is(p, "NOT"))
                        return parse_level(p, L_EQUALITY);
                unsigned off = p->tok.start;
                if (!enter(p))
                        return NULL;
                next(p);
                struct qnode *a = parse_level(p, L_NOT_Q);
                p->depth--;
                if (!a)
                        return NULL;
                return node_op(p, QN_UNARY, QOP_NOT, off, a, NULL);
        }

        struct qnode *left = parse_level(p, lv + 1);
        enum qop op;
        while (left && !p->failed && match_op(p, lv, &op)) {
                unsigned off = p->tok.start;
                next(p);
                if (op == QOP_IN || op == QOP_NIN) {
                        if (p->tok.kind != T_LBRACK) {
                                qnode_free(left);
                                fail_expected(p, "'[' (an array of constants)");
                                return NULL;
                        }
                        json_t *list = parse_array_const(p);
                        if (!list) {
                                qnode_free(left);
                                return NULL;
                        }
                        left = node_op(p, QN_IN, op, off, left, NULL);
                        if (!left) {
                                json_decref(list);
                                return NULL;
                        }
                        left->list = list;
                        continue;
                }
                struct qnode *right = parse_level(p, lv + 1);
                if (!right) {
                        qnode_free(left);
                        return NULL;
                }
                left = node_op(p, QN_BINARY, op, off, left, right);
        }
        if (p->failed) {
                qnode_free(left);
                return NULL;
        }
        return left;
}

static struct qnode *parse_expr(struct parser *p) {
        if (!enter(p))
                return NULL;
        struct qnode *n = parse_level(p, L_COALESCE);
        p->depth--;
        return n;
}

/* ---- entry points -------------------------------------------------------------------- */

static int parser_init(struct parser *p, const char *text, bool query, struct hub_query_error *err) {
        *p = (struct parser) { .text = text, .query = query, .err = err };
        if (err)
                *err = (struct hub_query_error) {};
        if (!text)
                return -EINVAL;
        p->text_len = strlen(text);
        if (p->text_len > HUB_QUERY_MAX_LEN) {
                p->text_len = HUB_QUERY_MAX_LEN; /* positions below stay in bounds */
                p->error = -E2BIG;
                fail_at(p, 0, "%s longer than %u characters", query ? "query" : "condition", HUB_QUERY_MAX_LEN);
                return -E2BIG;
        }
        /* the text must be UTF-8 (it becomes JSON strings) */
        const unsigned char *s = (const unsigned char *) text;
        for (size_t i = 0; i < p->text_len;) {
                unsigned c = s[i], n, cp;
                if (c < 0x80) {
                        i++;
                        continue;
                }
                if (c >= 0xC2 && c <= 0xDF)
                        n = 1, cp = c & 0x1F;
                else if (c >= 0xE0 && c <= 0xEF)
                        n = 2, cp = c & 0x0F;
                else if (c >= 0xF0 && c <= 0xF4)
                        n = 3, cp = c & 0x07;
                else
                        goto bad;
                for (unsigned k = 1; k <= n; k++) {
                        if (i + k >= p->text_len || (s[i + k] & 0xC0) != 0x80)
                                goto bad;
                        cp = (cp << 6) | (s[i + k] & 0x3F);
                }
                if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
                        goto bad;
                i += n + 1;
                continue;
        bad:
                fail_at(p, (unsigned) i, "invalid UTF-8");
                return -EINVAL;
        }
        next(p);
        return p->failed ? p->error : 0;
}

static void parser_done(struct parser *p) {
        free(p->tok.str);
        p->tok.str = NULL;
}

int hub_condition_parse(const char *text, struct hub_condition **ret, struct hub_query_error *err) {
        struct parser p;
        struct qnode *root = NULL;
        int r;

        if (!ret)
                return -EINVAL;
        r = parser_init(&p, text, false, err);
        if (r < 0) {
                parser_done(&p);
                return r;
        }
        if (p.tok.kind != T_EOF) {
                root = parse_expr(&p);
                if (root && p.tok.kind != T_EOF)
                        fail_expected(&p, "an operator or end of input");
        }
        parser_done(&p);
        if (p.failed) {
                qnode_free(root);
                return p.error;
        }
        struct hub_condition *c = calloc(1, sizeof *c);
        if (!c) {
                qnode_free(root);
                return -ENOMEM;
        }
        c->root = root;
        *ret = c;
        return 0;
}

struct hub_condition *hub_condition_free(struct hub_condition *c) {
        if (c) {
                qnode_free(c->root);
                free(c);
        }
        return NULL;
}

struct hub_query *hub_query_free(struct hub_query *q) {
        if (!q)
                return NULL;
        for (unsigned i = 0; i < q->n_projs; i++) {
                qnode_free(q->projs[i].expr);
                free(q->projs[i].alias);
        }
        free(q->projs);
        qnode_free(q->where.root);
        for (unsigned i = 0; i < q->n_group_by; i++)
                qnode_free(q->group_by[i]);
        free(q->group_by);
        free(q);
        return NULL;
}

static bool expect_kw(struct parser *p, const char *kw) {
        if (p->failed)
                return false;
        if (!tok_is(p, kw)) {
                fail_expected(p, kw);
                return false;
        }
        next(p);
        return !p->failed;
}

static int parse_aggregate(struct parser *p, struct qnode **ret) {
        static const struct { const char *name; enum qagg agg; } aggs[] = {
                { "COUNT", QA_COUNT }, { "AVG", QA_AVG }, { "SUM", QA_SUM }, { "MIN", QA_MIN }, { "MAX", QA_MAX },
        };
        unsigned off = p->tok.start;
        size_t i;

        for (i = 0; i < ELEMENTSOF(aggs); i++)
                if (tok_is(p, aggs[i].name))
                        break;
        if (i >= ELEMENTSOF(aggs))
                return 0;
        unsigned j = p->pos;
        while (is_space(p->text[j]))
                j++;
        if (p->text[j] != '(')
                return 0;
        _cleanup_(qnode_freep) struct qnode *n = node_new(p, QN_AGG, off);
        if (!n)
                return -1;
        n->agg = aggs[i].agg;
        next(p);
        next(p);
        if (n->agg == QA_COUNT) {
                if (p->tok.kind != T_RPAREN) {
                        fail_expected(p, "')' (COUNT takes no argument)");
                        return -1;
                }
        } else {
                if (p->tok.kind == T_RPAREN) {
                        fail_at(p, off, "%s takes 1 argument, found 0", aggs[i].name);
                        return -1;
                }
                n->a = parse_expr(p);
                if (!n->a)
                        return -1;
                if (p->tok.kind != T_RPAREN) {
                        fail_expected(p, "')'");
                        return -1;
                }
        }
        next(p);
        *ret = TAKE_PTR(n);
        return 1;
}

/* Whether two expressions are the same path (case-insensitively). */
static bool same_path(const struct qnode *a, const struct qnode *b) {
        if (a->kind != QN_REF || b->kind != QN_REF || a->ref != QREF_DOC || b->ref != QREF_DOC ||
            a->n_segs != b->n_segs)
                return false;
        for (unsigned i = 0; i < a->n_segs; i++) {
                if (!a->segs[i].key != !b->segs[i].key)
                        return false;
                if (a->segs[i].key ? strcasecmp(a->segs[i].key, b->segs[i].key) != 0
                                   : a->segs[i].index != b->segs[i].index)
                        return false;
        }
        return true;
}

static int parse_select(struct parser *p, struct hub_query *q) {
        if (!expect_kw(p, "SELECT"))
                return -1;
        if (tok_is(p, "TOP")) {
                next(p);
                if (p->tok.kind != T_NUM || p->tok.num != floor(p->tok.num) || p->tok.num < 1 ||
                    p->tok.num > 2147483647.0) {
                        fail_expected(p, "a positive integer after TOP");
                        return -1;
                }
                q->top = (unsigned) p->tok.num;
                next(p);
        }
        if (p->tok.kind == T_STAR) {
                q->star = true;
                next(p);
        } else
                for (;;) {
                        struct qnode *e = NULL;
                        unsigned off = p->tok.start;
                        if (tok_is(p, "FROM") || p->tok.kind == T_EOF) {
                                fail_expected(p, q->n_projs == 0 ? "'*' or a projection" : "a projection");
                                return -1;
                        }
                        int r = parse_aggregate(p, &e);
                        if (r < 0)
                                return -1;
                        if (r == 0) {
                                e = parse_expr(p);
                                if (!e)
                                        return -1;
                        }
                        struct qproj *t = realloc(q->projs, (q->n_projs + 1) * sizeof *t);
                        if (!t) {
                                qnode_free(e);
                                fail_nomem(p);
                                return -1;
                        }
                        q->projs = t;
                        q->projs[q->n_projs++] = (struct qproj) { .expr = e };
                        if (e->kind == QN_AGG)
                                q->aggregate = true;
                        if (tok_is(p, "AS")) {
                                next(p);
                                if (p->tok.kind != T_NAME || tok_is_reserved(p) ||
                                    memchr(p->text + p->tok.start, '.', p->tok.len) ||
                                    memchr(p->text + p->tok.start, '[', p->tok.len)) {
                                        fail_expected(p, "an alias name after AS");
                                        return -1;
                                }
                                q->projs[q->n_projs - 1].alias = strndup(p->text + p->tok.start, p->tok.len);
                                if (!q->projs[q->n_projs - 1].alias) {
                                        fail_nomem(p);
                                        return -1;
                                }
                                next(p);
                        }
                        (void) off;
                        if (p->tok.kind == T_COMMA) {
                                next(p);
                                continue;
                        }
                        break;
                }
        if (p->failed)
                return -1;
        if (!tok_is(p, "FROM")) {
                fail_expected(p, q->star ? "FROM" : "',', AS or FROM");
                return -1;
        }
        next(p);
        if (tok_is(p, "devices"))
                q->from = HUB_QUERY_FROM_DEVICES;
        else if (tok_is(p, "devices.modules"))
                q->from = HUB_QUERY_FROM_DEVICES_MODULES;
        else {
                fail_expected(p, "devices or devices.modules");
                return -1;
        }
        next(p);
        if (tok_is(p, "WHERE")) {
                next(p);
                q->where.root = parse_expr(p);
                if (!q->where.root)
                        return -1;
                q->has_where = true;
        }
        if (tok_is(p, "GROUP")) {
                unsigned off = p->tok.start;
                next(p);
                if (!expect_kw(p, "BY"))
                        return -1;
                for (;;) {
                        struct qnode *e = parse_expr(p);
                        if (!e)
                                return -1;
                        struct qnode **t = realloc(q->group_by, (q->n_group_by + 1) * sizeof *t);
                        if (!t) {
                                qnode_free(e);
                                fail_nomem(p);
                                return -1;
                        }
                        q->group_by = t;
                        q->group_by[q->n_group_by++] = e;
                        if (p->tok.kind == T_COMMA) {
                                next(p);
                                continue;
                        }
                        break;
                }
                if (p->failed)
                        return -1;
                if (q->star) {
                        fail_at(p, off, "GROUP BY requires explicit projections or aggregates, not SELECT *");
                        return -1;
                }
                q->aggregate = true;
        }
        if (p->tok.kind != T_EOF) {
                fail_expected(p, q->n_group_by ? "',' or end of input"
                                 : q->has_where ? "GROUP BY or end of input" : "WHERE, GROUP BY or end of input");
                return -1;
        }
        /* Aggregation rules: every plain projection must be a GROUP BY expression. */
        if (q->aggregate)
                for (unsigned i = 0; i < q->n_projs; i++) {
                        struct qnode *e = q->projs[i].expr;
                        if (e->kind == QN_AGG)
                                continue;
                        bool found = false;
                        for (unsigned k = 0; k < q->n_group_by && !found; k++)
                                found = same_path(e, q->group_by[k]);
                        if (!found) {
                                if (q->n_group_by == 0)
                                        fail_at(p, e->offset,
                                                "cannot mix aggregates and plain projections without GROUP BY");
                                else
                                        fail_at(p, e->offset, "projection is neither an aggregate nor a GROUP BY path");
                                return -1;
                        }
                }
        return 0;
}

int hub_query_parse(const char *text, struct hub_query **ret, struct hub_query_error *err) {
        struct parser p;
        int r;

        if (!ret)
                return -EINVAL;
        r = parser_init(&p, text, true, err);
        if (r < 0) {
                parser_done(&p);
                return r;
        }
        struct hub_query *q = calloc(1, sizeof *q);
        if (!q) {
                parser_done(&p);
                return -ENOMEM;
        }
        (void) parse_select(&p, q);
        parser_done(&p);
        if (p.failed) {
                hub_query_free(q);
                return p.error;
        }
        *ret = q;
        return 0;
}

bool hub_query_is_aggregate(const struct hub_query *q) {
        return q && q->aggregate;
}

unsigned hub_query_top(const struct hub_query *q) {
        return q ? q->top : 0;
}

enum hub_query_from hub_query_from(const struct hub_query *q) {
        return q ? q->from : HUB_QUERY_FROM_DEVICES;
}

bool hub_query_selects_all(const struct hub_query *q) {
        return q && q->star;
}

const struct hub_condition *hub_query_where(const struct hub_query *q) {
        return q && q->has_where ? &q->where : NULL;
}
