/* SPDX-License-Identifier: MIT */
/* The positioned configuration tree: libyaml events → nodes that keep file:line:col and
 * their key path, the error collector, conf.d merging and the accessors. The typed readers
 * live here too; the unit parsers are in conf-units.c, secrets in conf-secret.c. */

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "adapter/conf.h"

struct adp_conf_node {
        enum adp_conf_kind kind;
        char *file;
        unsigned line, column;
        char *path;                     /* "" for the root */
        char *key;                      /* name in the parent mapping, or NULL */
        struct adp_conf_node *key_node; /* positioned key (mapping values only) */
        char *value;                    /* scalar text (NUL-terminated) */
        struct adp_conf_node **children;
        size_t n_children, n_alloc;
};

/* ---- errors ----------------------------------------------------------------------------- */

static void errors_add(struct adp_conf_errors *e, char *msg /* takes */) {
        if (!e) {
                free(msg);
                return;
        }
        e->n_total++;
        if (msg && e->n_msgs < ADP_CONF_ERRORS_MAX) {
                char **n = realloc(e->msgs, (e->n_msgs + 1) * sizeof(char *));
                if (n) {
                        e->msgs = n;
                        e->msgs[e->n_msgs++] = msg;
                        return;
                }
        }
        free(msg);
        /* Dropped (over the cap, or out of memory): keep the summary line current. */
        size_t dropped = e->n_total - e->n_msgs;
        char *more = NULL;
        if (asprintf(&more, "%zu more error%s", dropped, dropped == 1 ? "" : "s") >= 0) {
                free(e->more);
                e->more = more;
        }
}

void adp_conf_errorv(struct adp_conf_errors *e, const struct adp_conf_node *at, const char *fmt, va_list ap) {
        char *text = NULL, *msg = NULL;

        if (vasprintf(&text, fmt, ap) < 0)
                text = NULL;
        if (text) {
                int r;
                if (!at)
                        r = asprintf(&msg, "%s", text);
                else if (at->path[0])
                        r = asprintf(&msg, "%s:%u:%u: %s: %s", at->file, at->line, at->column, at->path, text);
                else
                        r = asprintf(&msg, "%s:%u:%u: %s", at->file, at->line, at->column, text);
                if (r < 0)
                        msg = NULL;
        }
        free(text);
        errors_add(e, msg);
}

void adp_conf_error(struct adp_conf_errors *e, const struct adp_conf_node *at, const char *fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        adp_conf_errorv(e, at, fmt, ap);
        va_end(ap);
}

void adp_conf_error_file(struct adp_conf_errors *e, const char *file, unsigned line, unsigned column,
                         const char *fmt, ...) {
        char *text = NULL, *msg = NULL;
        va_list ap;

        va_start(ap, fmt);
        if (vasprintf(&text, fmt, ap) < 0)
                text = NULL;
        va_end(ap);
        if (text) {
                int r = line > 0 ? asprintf(&msg, "%s:%u:%u: %s", file, line, column, text)
                                 : asprintf(&msg, "%s: %s", file, text);
                if (r < 0)
                        msg = NULL;
        }
        free(text);
        errors_add(e, msg);
}

size_t adp_conf_errors_count(const struct adp_conf_errors *e) {
        if (!e)
                return 0;
        return e->n_msgs + (e->n_total > e->n_msgs ? 1 : 0);
}

size_t adp_conf_errors_total(const struct adp_conf_errors *e) {
        return e ? e->n_total : 0;
}

const char *adp_conf_errors_get(const struct adp_conf_errors *e, size_t i) {
        if (!e)
                return NULL;
        if (i < e->n_msgs)
                return e->msgs[i];
        if (i == e->n_msgs && e->n_total > e->n_msgs)
                return e->more ? e->more : "more errors";
        return NULL;
}

void adp_conf_errors_done(struct adp_conf_errors *e) {
        if (!e)
                return;
        for (size_t i = 0; i < e->n_msgs; i++)
                free(e->msgs[i]);
        free(e->msgs);
        free(e->more);
        *e = (struct adp_conf_errors) {};
}

/* ---- nodes ------------------------------------------------------------------------------ */

struct adp_conf_node *adp_conf_node_free(struct adp_conf_node *n) {
        if (!n)
                return NULL;
        for (size_t i = 0; i < n->n_children; i++)
                adp_conf_node_free(n->children[i]);
        free(n->children);
        adp_conf_node_free(n->key_node);
        free(n->file);
        free(n->path);
        free(n->key);
        free(n->value);
        free(n);
        return NULL;
}

static struct adp_conf_node *node_new(enum adp_conf_kind kind, const char *file, unsigned line, unsigned column) {
        struct adp_conf_node *n = calloc(1, sizeof *n);
        if (!n)
                return NULL;
        n->kind = kind;
        n->line = line;
        n->column = column;
        n->file = strdup(file);
        n->path = strdup("");
        if (!n->file || !n->path)
                return adp_conf_node_free(n);
        return n;
}

static int node_append(struct adp_conf_node *parent, struct adp_conf_node *child) {
        if (parent->n_children == parent->n_alloc) {
                size_t na = parent->n_alloc ? parent->n_alloc * 2 : 4;
                struct adp_conf_node **c = realloc(parent->children, na * sizeof *c);
                if (!c)
                        return -ENOMEM;
                parent->children = c;
                parent->n_alloc = na;
        }
        parent->children[parent->n_children++] = child;
        return 0;
}

static char *path_child_key(const char *parent, const char *key) {
        char *p = NULL;
        if (asprintf(&p, "%s%s%s", parent, parent[0] ? "." : "", key) < 0)
                return NULL;
        return p;
}

static char *path_child_index(const char *parent, size_t i) {
        char *p = NULL;
        if (asprintf(&p, "%s[%zu]", parent, i) < 0)
                return NULL;
        return p;
}

/* Sets n's path (taking it) and recomputes every descendant's. */
static int node_set_path(struct adp_conf_node *n, char *path) {
        if (!path)
                return -ENOMEM;
        free(n->path);
        n->path = path;
        if (n->key_node) {
                char *kp = strdup(path);
                if (!kp)
                        return -ENOMEM;
                free(n->key_node->path);
                n->key_node->path = kp;
        }
        for (size_t i = 0; i < n->n_children; i++) {
                struct adp_conf_node *c = n->children[i];
                char *cp = n->kind == ADP_CONF_MAP ? path_child_key(path, c->key) : path_child_index(path, i);
                int r = node_set_path(c, cp);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---- accessors -------------------------------------------------------------------------- */

enum adp_conf_kind adp_conf_kind(const struct adp_conf_node *n) {
        return n ? n->kind : ADP_CONF_NULL;
}

const char *adp_conf_kind_to_string(enum adp_conf_kind k) {
        switch (k) {
        case ADP_CONF_NULL:
                return "null";
        case ADP_CONF_SCALAR:
                return "a scalar";
        case ADP_CONF_MAP:
                return "a mapping";
        case ADP_CONF_SEQ:
                return "a sequence";
        default:
                return "an unknown node";
        }
}

const char *adp_conf_file(const struct adp_conf_node *n) {
        return n ? n->file : NULL;
}

unsigned adp_conf_line(const struct adp_conf_node *n) {
        return n ? n->line : 0;
}

unsigned adp_conf_column(const struct adp_conf_node *n) {
        return n ? n->column : 0;
}

const char *adp_conf_path(const struct adp_conf_node *n) {
        return n ? n->path : NULL;
}

const char *adp_conf_key(const struct adp_conf_node *n) {
        return n ? n->key : NULL;
}

const char *adp_conf_scalar(const struct adp_conf_node *n) {
        return n && n->kind == ADP_CONF_SCALAR ? n->value : NULL;
}

bool adp_conf_is_null(const struct adp_conf_node *n) {
        return n && n->kind == ADP_CONF_NULL;
}

size_t adp_conf_len(const struct adp_conf_node *n) {
        return n && (n->kind == ADP_CONF_MAP || n->kind == ADP_CONF_SEQ) ? n->n_children : 0;
}

const struct adp_conf_node *adp_conf_at(const struct adp_conf_node *n, size_t i) {
        return i < adp_conf_len(n) ? n->children[i] : NULL;
}

const char *adp_conf_key_at(const struct adp_conf_node *map, size_t i) {
        if (adp_conf_kind(map) != ADP_CONF_MAP || i >= map->n_children)
                return NULL;
        return map->children[i]->key;
}

const struct adp_conf_node *adp_conf_key_node_at(const struct adp_conf_node *map, size_t i) {
        if (adp_conf_kind(map) != ADP_CONF_MAP || i >= map->n_children)
                return NULL;
        return map->children[i]->key_node;
}

const struct adp_conf_node *adp_conf_get(const struct adp_conf_node *map, const char *key) {
        if (adp_conf_kind(map) != ADP_CONF_MAP || !key)
                return NULL;
        for (size_t i = 0; i < map->n_children; i++)
                if (streq(map->children[i]->key, key))
                        return map->children[i];
        return NULL;
}

const char *adp_conf_describe(const struct adp_conf_node *n, char *buf, size_t size) {
        if (!buf || size == 0)
                return "";
        if (!n || n->kind != ADP_CONF_SCALAR) {
                snprintf(buf, size, "%s", adp_conf_kind_to_string(adp_conf_kind(n)));
                return buf;
        }
        /* Quoted and escaped, so that control characters and quotes in a value cannot make
         * the message ambiguous; long values are shortened. */
        size_t o = 0;
        const unsigned char *s = (const unsigned char *) n->value;
        size_t shown = 0;
#define PUT(...) do { int _k = snprintf(buf + o, o < size ? size - o : 0, __VA_ARGS__); if (_k > 0) o += (size_t) _k; } while (0)
        PUT("\"");
        for (; *s && o < size; s++, shown++) {
                if (shown >= 60) {
                        PUT("...");
                        break;
                }
                if (*s == '"' || *s == '\\')
                        PUT("\\%c", *s);
                else if (*s == '\n')
                        PUT("\\n");
                else if (*s == '\t')
                        PUT("\\t");
                else if (*s < 0x20 || *s == 0x7f)
                        PUT("\\x%02x", *s);
                else
                        PUT("%c", *s);
        }
        PUT("\"");
#undef PUT
        return buf;
}

/* ---- loading ---------------------------------------------------------------------------- */

struct frame {
        struct adp_conf_node *node;
        struct adp_conf_node *pending_key;      /* mappings: the key waiting for its value */
        bool orphan;                            /* not attached to the tree: free at its end */
};

struct builder {
        const char *file;
        const char *text;
        size_t len;
        struct adp_conf_errors *e;
        struct frame stack[ADP_CONF_MAX_DEPTH + 1];
        size_t depth;
        struct adp_conf_node *root;
        unsigned n_docs;
        bool failed;
};

static void builder_unwind(struct builder *b) {
        while (b->depth > 0) {
                struct frame *f = &b->stack[--b->depth];
                adp_conf_node_free(f->pending_key);
                if (f->orphan)
                        adp_conf_node_free(f->node);
        }
        b->root = adp_conf_node_free(b->root);
}

static const char *const std_tags[] = { "str", "int", "float", "bool", "null", "map", "seq", NULL };
#define YAML_STD_TAG_PREFIX "tag:yaml.org,2002:"

static bool tag_is_standard(const char *tag) {
        if (!tag || streq(tag, "!"))
                return true;
        if (strncmp(tag, YAML_STD_TAG_PREFIX, strlen(YAML_STD_TAG_PREFIX)) != 0)
                return false;
        for (size_t i = 0; std_tags[i]; i++)
                if (streq(tag + strlen(YAML_STD_TAG_PREFIX), std_tags[i]))
                        return true;
        return false;
}

static void check_tag_anchor(struct builder *b, const struct adp_conf_node *n, const yaml_char_t *tag,
                             const yaml_char_t *anchor) {
        if (anchor) {
                adp_conf_error(b->e, n, "found an anchor (&%s), expected plain values: anchors and aliases are not supported, write the value out",
                               (const char *) anchor);
                b->failed = true;
        }
        if (!tag_is_standard((const char *) tag)) {
                const char *t = (const char *) tag;
                bool std = strncmp(t, YAML_STD_TAG_PREFIX, strlen(YAML_STD_TAG_PREFIX)) == 0;
                adp_conf_error(b->e, n, "found the tag %s%s, expected no tag or one of !!str, !!int, !!float, !!bool, !!null, !!map, !!seq",
                               std ? "!!" : "", std ? t + strlen(YAML_STD_TAG_PREFIX) : t);
                b->failed = true;
        }
}

/* Hooks a new node into the tree under the current frame. Returns 1 when the node was
 * kept, 0 when it is not part of the tree (an error was reported; the caller frees it, or
 * pushes it as an orphan), -ENOMEM. */
static int builder_attach(struct builder *b, struct adp_conf_node *n) {
        if (b->depth == 0) {
                if (b->root) /* cannot happen: one document, one root */
                        return 0;
                b->root = n;
                return 1;
        }
        struct frame *f = &b->stack[b->depth - 1];
        struct adp_conf_node *parent = f->node;

        if (parent->kind == ADP_CONF_SEQ) {
                char *p = path_child_index(parent->path, parent->n_children);
                if (!p)
                        return -ENOMEM;
                free(n->path);
                n->path = p;
                if (f->orphan)
                        return 0;
                if (node_append(parent, n) < 0)
                        return -ENOMEM;
                return 1;
        }

        assert(parent->kind == ADP_CONF_MAP);
        if (!f->pending_key) {
                /* This is a key. */
                char *p = path_child_key(parent->path, n->kind == ADP_CONF_SCALAR ? n->value : "?");
                if (!p)
                        return -ENOMEM;
                free(n->path);
                n->path = p;
                if (n->kind != ADP_CONF_SCALAR) {
                        adp_conf_error(b->e, n, "found %s as a key, expected a key name",
                                       adp_conf_kind_to_string(n->kind));
                        b->failed = true;
                }
                f->pending_key = n;
                return 1;
        }

        /* This is a value. */
        struct adp_conf_node *k = TAKE_PTR(f->pending_key);
        free(n->path);
        n->path = strdup(k->path);
        if (!n->path) {
                adp_conf_node_free(k);
                return -ENOMEM;
        }
        if (k->kind != ADP_CONF_SCALAR || f->orphan) {
                adp_conf_node_free(k);
                return 0;
        }
        const struct adp_conf_node *first = adp_conf_get(parent, k->value);
        if (first) {
                const struct adp_conf_node *fk = first->key_node;
                adp_conf_error(b->e, k, "duplicate key \"%s\" (first defined at line %u, column %u), expected each key once",
                               k->value, fk->line, fk->column);
                b->failed = true;
                adp_conf_node_free(k);
                return 0;
        }
        n->key = strdup(k->value);
        n->key_node = k;
        if (!n->key)
                return -ENOMEM;
        if (node_append(parent, n) < 0)
                return -ENOMEM;
        return 1;
}

static int builder_push(struct builder *b, struct adp_conf_node *n) {
        if (b->depth >= ADP_CONF_MAX_DEPTH) {
                adp_conf_error_file(b->e, n->file, n->line, n->column,
                                    "found nesting deeper than %u levels, expected a flatter structure",
                                    ADP_CONF_MAX_DEPTH);
                adp_conf_node_free(n);
                return -EINVAL;
        }
        int r = builder_attach(b, n);
        if (r < 0) {
                adp_conf_node_free(n);
                return r;
        }
        b->stack[b->depth++] = (struct frame) { .node = n, .orphan = (r == 0) };
        return 0;
}

static void builder_pop(struct builder *b) {
        assert(b->depth > 0);
        struct frame *f = &b->stack[--b->depth];
        /* A mapping that ended on a key without value cannot come out of libyaml (it emits
         * an empty scalar), but stay safe. */
        adp_conf_node_free(f->pending_key);
        if (f->orphan)
                adp_conf_node_free(f->node);
}

/* libyaml marks are 0-based; ours are 1-based. */
#define MARK_LINE(m) ((unsigned) (m).line + 1)
#define MARK_COL(m) ((unsigned) (m).column + 1)

static bool line_indented_with_tab(const char *text, size_t len, size_t line0) {
        size_t i = 0;
        for (size_t l = 0; l < line0 && i < len; i++)
                if (text[i] == '\n')
                        l++;
        for (; i < len && (text[i] == ' ' || text[i] == '\t'); i++)
                if (text[i] == '\t')
                        return true;
        return false;
}

static void builder_syntax_error(struct builder *b, const yaml_parser_t *p) {
        if (p->error == YAML_READER_ERROR) {
                /* Reader errors carry a byte offset, not a mark. */
                unsigned line = 1, col = 1;
                for (size_t i = 0; i < p->problem_offset && i < b->len; i++) {
                        if (b->text[i] == '\n') {
                                line++;
                                col = 1;
                        } else
                                col++;
                }
                if (p->problem_value >= 0)
                        adp_conf_error_file(b->e, b->file, line, col, "%s (byte 0x%02x), expected UTF-8 text",
                                            p->problem ? p->problem : "unreadable input", (unsigned) p->problem_value);
                else
                        adp_conf_error_file(b->e, b->file, line, col, "%s, expected UTF-8 text",
                                            p->problem ? p->problem : "unreadable input");
                return;
        }
        if (p->error == YAML_MEMORY_ERROR) {
                adp_conf_error_file(b->e, b->file, 0, 0, "out of memory while parsing");
                return;
        }
        const char *problem = p->problem ? p->problem : "syntax error";
        const char *hint = line_indented_with_tab(b->text, b->len, p->problem_mark.line)
                                   ? "; tabs are not allowed for indentation, use spaces"
                                   : "";
        if (p->context && (p->context_mark.line != p->problem_mark.line ||
                           p->context_mark.column != p->problem_mark.column))
                adp_conf_error_file(b->e, b->file, MARK_LINE(p->problem_mark), MARK_COL(p->problem_mark),
                                    "%s (%s at line %u, column %u)%s", problem, p->context,
                                    MARK_LINE(p->context_mark), MARK_COL(p->context_mark), hint);
        else if (p->context)
                adp_conf_error_file(b->e, b->file, MARK_LINE(p->problem_mark), MARK_COL(p->problem_mark),
                                    "%s (%s)%s", problem, p->context, hint);
        else
                adp_conf_error_file(b->e, b->file, MARK_LINE(p->problem_mark), MARK_COL(p->problem_mark),
                                    "%s%s", problem, hint);
}

static bool scalar_is_null(const yaml_event_t *ev) {
        const char *tag = (const char *) ev->data.scalar.tag;
        const char *v = (const char *) ev->data.scalar.value;

        if (tag && streq(tag, YAML_STD_TAG_PREFIX "null"))
                return true;
        if (tag || ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
                return false;
        return streq(v, "") || streq(v, "~") || streq(v, "null") || streq(v, "Null") || streq(v, "NULL");
}

static int builder_event(struct builder *b, yaml_event_t *ev, bool *done) {
        struct adp_conf_node *n;
        int r;

        switch (ev->type) {
        case YAML_STREAM_START_EVENT:
        case YAML_DOCUMENT_END_EVENT:
        case YAML_NO_EVENT:
                return 0;

        case YAML_STREAM_END_EVENT:
                *done = true;
                return 0;

        case YAML_DOCUMENT_START_EVENT:
                if (++b->n_docs > 1) {
                        adp_conf_error_file(b->e, b->file, MARK_LINE(ev->start_mark), MARK_COL(ev->start_mark),
                                            "found a second YAML document, expected exactly one document per file");
                        return -EINVAL;
                }
                return 0;

        case YAML_ALIAS_EVENT:
                n = node_new(ADP_CONF_NULL, b->file, MARK_LINE(ev->start_mark), MARK_COL(ev->start_mark));
                if (!n)
                        return -ENOMEM;
                r = builder_attach(b, n);
                if (r < 0) {
                        adp_conf_node_free(n);
                        return r;
                }
                adp_conf_error(b->e, n, "found an alias (*%s), expected plain values: anchors and aliases are not supported, write the value out",
                               (const char *) ev->data.alias.anchor);
                b->failed = true;
                if (r == 0)
                        adp_conf_node_free(n);
                return 0;

        case YAML_SCALAR_EVENT: {
                bool is_null = scalar_is_null(ev);
                n = node_new(is_null ? ADP_CONF_NULL : ADP_CONF_SCALAR, b->file, MARK_LINE(ev->start_mark),
                             MARK_COL(ev->start_mark));
                if (!n)
                        return -ENOMEM;
                if (!is_null) {
                        size_t l = ev->data.scalar.length;
                        if (memchr(ev->data.scalar.value, 0, l))
                                l = strlen((const char *) ev->data.scalar.value); /* "\0" escape: cut */
                        n->value = strndup((const char *) ev->data.scalar.value, l);
                        if (!n->value) {
                                adp_conf_node_free(n);
                                return -ENOMEM;
                        }
                }
                r = builder_attach(b, n);
                if (r < 0) {
                        adp_conf_node_free(n);
                        return r;
                }
                check_tag_anchor(b, n, ev->data.scalar.tag, ev->data.scalar.anchor);
                if (r == 0)
                        adp_conf_node_free(n);
                return 0;
        }

        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT: {
                bool seq = ev->type == YAML_SEQUENCE_START_EVENT;
                n = node_new(seq ? ADP_CONF_SEQ : ADP_CONF_MAP, b->file, MARK_LINE(ev->start_mark),
                             MARK_COL(ev->start_mark));
                if (!n)
                        return -ENOMEM;
                r = builder_push(b, n);
                if (r < 0)
                        return r;
                if (seq)
                        check_tag_anchor(b, n, ev->data.sequence_start.tag, ev->data.sequence_start.anchor);
                else
                        check_tag_anchor(b, n, ev->data.mapping_start.tag, ev->data.mapping_start.anchor);
                return 0;
        }

        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
                if (b->depth == 0)
                        return -EINVAL;
                builder_pop(b);
                return 0;
        }
        return 0;
}

int adp_conf_load_string(const char *name, const char *text, size_t len, struct adp_conf_node **ret,
                         struct adp_conf_errors *e) {
        struct builder b = { .file = name ? name : "<string>", .text = text, .len = len, .e = e };
        yaml_parser_t parser;
        bool done = false;
        int r = 0;

        if (!ret || (!text && len > 0))
                return -EINVAL;
        if (!yaml_parser_initialize(&parser))
                return -ENOMEM;
        yaml_parser_set_input_string(&parser, (const unsigned char *) (text ? text : ""), len);

        while (!done) {
                yaml_event_t ev;
                if (!yaml_parser_parse(&parser, &ev)) {
                        if (parser.error == YAML_MEMORY_ERROR)
                                r = -ENOMEM;
                        else {
                                builder_syntax_error(&b, &parser);
                                r = -EINVAL;
                        }
                        break;
                }
                r = builder_event(&b, &ev, &done);
                yaml_event_delete(&ev);
                if (r < 0)
                        break;
        }
        yaml_parser_delete(&parser);

        if (r == 0 && b.failed)
                r = -EINVAL;
        if (r < 0) {
                builder_unwind(&b);
                return r;
        }
        if (!b.root) {
                /* Empty stream (or only comments): a null root at 1:1. */
                b.root = node_new(ADP_CONF_NULL, b.file, 1, 1);
                if (!b.root)
                        return -ENOMEM;
        }
        *ret = TAKE_PTR(b.root);
        return 0;
}

int adp_conf_load_file(const char *path, struct adp_conf_node **ret, struct adp_conf_errors *e) {
        _cleanup_close_ int fd = -EBADF;
        _cleanup_free_ char *buf = NULL;
        struct stat st;
        size_t len = 0;

        if (!path || !ret)
                return -EINVAL;
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) {
                int r = -errno;
                adp_conf_error_file(e, path, 0, 0, "cannot open: %s", strerror(-r));
                return r;
        }
        if (fstat(fd, &st) < 0) {
                int r = -errno;
                adp_conf_error_file(e, path, 0, 0, "cannot stat: %s", strerror(-r));
                return r;
        }
        if (S_ISDIR(st.st_mode)) {
                adp_conf_error_file(e, path, 0, 0, "found a directory, expected a YAML file");
                return -EISDIR;
        }
        if (!S_ISREG(st.st_mode)) {
                adp_conf_error_file(e, path, 0, 0, "found a special file, expected a regular YAML file");
                return -EINVAL;
        }
        if ((uint64_t) st.st_size > ADP_CONF_MAX_FILE_SIZE) {
                adp_conf_error_file(e, path, 0, 0, "file is %" PRIu64 " bytes, expected at most %u",
                                    (uint64_t) st.st_size, ADP_CONF_MAX_FILE_SIZE);
                return -EFBIG;
        }
        buf = malloc((size_t) st.st_size + 1);
        if (!buf)
                return -ENOMEM;
        /* Read to EOF, but never past the cap (the file may grow while we read). */
        for (;;) {
                if (len > (size_t) st.st_size) {
                        adp_conf_error_file(e, path, 0, 0, "file grew while being read");
                        return -EFBIG;
                }
                ssize_t k = read(fd, buf + len, (size_t) st.st_size + 1 - len);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        int r = -errno;
                        adp_conf_error_file(e, path, 0, 0, "cannot read: %s", strerror(-r));
                        return r;
                }
                if (k == 0)
                        break;
                len += (size_t) k;
        }
        return adp_conf_load_string(path, buf, len, ret, e);
}

/* ---- merging ---------------------------------------------------------------------------- */

/* Replaces base's contents by overlay's (keeping base's place in its parent); frees the old
 * contents and the overlay shell. */
static void node_replace(struct adp_conf_node *base, struct adp_conf_node *ov) {
        struct adp_conf_node tmp = *base;
        *base = *ov;
        *ov = tmp;
        adp_conf_node_free(ov);
}

static int merge_node(struct adp_conf_node *base, struct adp_conf_node *ov, struct adp_conf_errors *e) {
        int r = 0;

        if (ov->kind == ADP_CONF_NULL) {
                adp_conf_node_free(ov);
                return 0;
        }
        if (base->kind == ADP_CONF_NULL || (base->kind == ADP_CONF_SCALAR && ov->kind == ADP_CONF_SCALAR)) {
                node_replace(base, ov);
                return 0;
        }
        if (base->kind != ov->kind) {
                char found[128];
                adp_conf_error(e, ov, "found %s, expected %s to merge with %s:%u:%u",
                               adp_conf_describe(ov, found, sizeof found), adp_conf_kind_to_string(base->kind),
                               base->file, base->line, base->column);
                adp_conf_node_free(ov);
                return -EINVAL;
        }

        if (base->kind == ADP_CONF_SEQ) {
                for (size_t i = 0; i < ov->n_children; i++) {
                        struct adp_conf_node *c = ov->children[i];
                        ov->children[i] = NULL;
                        int k = node_set_path(c, path_child_index(base->path, base->n_children));
                        if (k >= 0)
                                k = node_append(base, c);
                        if (k < 0) {
                                adp_conf_node_free(c);
                                if (r == 0)
                                        r = k;
                        }
                }
                adp_conf_node_free(ov);
                return r;
        }

        /* Mappings: key by key. */
        for (size_t i = 0; i < ov->n_children; i++) {
                struct adp_conf_node *c = ov->children[i];
                ov->children[i] = NULL;
                struct adp_conf_node *existing = (struct adp_conf_node *) adp_conf_get(base, c->key);
                int k;
                if (existing)
                        k = merge_node(existing, c, e);
                else {
                        k = node_set_path(c, path_child_key(base->path, c->key));
                        if (k >= 0)
                                k = node_append(base, c);
                        if (k < 0)
                                adp_conf_node_free(c);
                }
                if (k < 0 && (r == 0 || k == -ENOMEM))
                        r = k;
        }
        adp_conf_node_free(ov);
        return r;
}

int adp_conf_merge(struct adp_conf_node *base, struct adp_conf_node *overlay, struct adp_conf_errors *e) {
        if (!overlay)
                return 0;
        if (!base) {
                adp_conf_node_free(overlay);
                return -EINVAL;
        }
        return merge_node(base, overlay, e);
}

/* ---- typed readers ---------------------------------------------------------------------- */

static int lookup(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                  const struct adp_conf_node **ret) {
        if (map && map->kind != ADP_CONF_MAP && map->kind != ADP_CONF_NULL)
                return -EINVAL; /* reported by adp_conf_get_map() / adp_conf_check_keys() */
        const struct adp_conf_node *n = adp_conf_get(map, key);
        if (!n || n->kind == ADP_CONF_NULL) {
                if (!required)
                        return -ENOENT;
                if (n)
                        adp_conf_error(e, n, "found null, expected a value");
                else
                        adp_conf_error(e, map, "missing required key \"%s\"", key);
                return -EINVAL;
        }
        *ret = n;
        return 0;
}

/* "found X, expected Y" at n. */
static int found_expected(const struct adp_conf_node *n, struct adp_conf_errors *e, const char *fmt, ...)
        _printf_(3, 4);
static int found_expected(const struct adp_conf_node *n, struct adp_conf_errors *e, const char *fmt, ...) {
        char found[128], *expected = NULL;
        va_list ap;

        va_start(ap, fmt);
        if (vasprintf(&expected, fmt, ap) < 0)
                expected = NULL;
        va_end(ap);
        adp_conf_error(e, n, "found %s, expected %s", adp_conf_describe(n, found, sizeof found),
                       expected ? expected : "something else");
        free(expected);
        return -EINVAL;
}

/* `key:` where key_file and key_credential are allowed is an inline secret:
 * adp_conf_get_secret() reports it with a better message than "unknown key". */
static bool secret_base_allowed(const char *key, const char *const allowed[]) {
        bool f = false, c = false;
        size_t l = strlen(key);

        for (size_t j = 0; allowed && allowed[j]; j++) {
                if (strncmp(allowed[j], key, l) != 0)
                        continue;
                f = f || streq(allowed[j] + l, "_file");
                c = c || streq(allowed[j] + l, "_credential");
        }
        return f && c;
}

int adp_conf_check_keys(const struct adp_conf_node *map, const char *const allowed[], struct adp_conf_errors *e) {
        char list[1024];
        size_t o = 0;
        int r = 0;

        if (!map || map->kind == ADP_CONF_NULL)
                return 0;

        list[0] = 0;
        for (size_t i = 0; allowed && allowed[i]; i++) {
                int k = snprintf(list + o, sizeof list - o, "%s%s", i ? ", " : "", allowed[i]);
                if (k < 0 || (size_t) k >= sizeof list - o)
                        break;
                o += (size_t) k;
        }

        if (map->kind != ADP_CONF_MAP) {
                char found[128];
                adp_conf_error(e, map, "found %s, expected a mapping with the keys: %s",
                               adp_conf_describe(map, found, sizeof found), list);
                return -EINVAL;
        }

        for (size_t i = 0; i < map->n_children; i++) {
                const char *key = map->children[i]->key;
                const char *best = NULL;
                unsigned best_d = 3;
                bool ok = false;

                for (size_t j = 0; allowed && allowed[j]; j++) {
                        if (streq(key, allowed[j])) {
                                ok = true;
                                break;
                        }
                        unsigned d = adp_edit_distance(key, allowed[j]);
                        if (d < best_d) {
                                best_d = d;
                                best = allowed[j];
                        }
                }
                if (ok || secret_base_allowed(key, allowed))
                        continue;
                if (best)
                        adp_conf_error(e, map->children[i]->key_node,
                                       "unknown key \"%s\" (did you mean \"%s\"?); expected one of: %s", key, best,
                                       list);
                else
                        adp_conf_error(e, map->children[i]->key_node, "unknown key \"%s\"; expected one of: %s", key,
                                       list);
                r = -EINVAL;
        }
        return r;
}

int adp_conf_parse_string(const struct adp_conf_node *n, struct adp_conf_errors *e, const char **ret) {
        if (!n || n->kind != ADP_CONF_SCALAR)
                return found_expected(n, e, "a string");
        *ret = n->value;
        return 0;
}

int adp_conf_parse_bool(const struct adp_conf_node *n, struct adp_conf_errors *e, bool *ret) {
        static const char *const yes[] = { "true", "yes", "on", NULL }, *const no[] = { "false", "no", "off", NULL };
        const char *v = adp_conf_scalar(n);

        for (size_t i = 0; v && yes[i]; i++) {
                if (strcasecmp(v, yes[i]) == 0) {
                        *ret = true;
                        return 0;
                }
                if (strcasecmp(v, no[i]) == 0) {
                        *ret = false;
                        return 0;
                }
        }
        return found_expected(n, e, "a boolean (true/false, yes/no, on/off)");
}

/* Parses decimal or 0x hex with an optional sign into a sign and magnitude. Leading zeros
 * ("010") are refused: YAML 1.1 reads them as octal. Returns 0, -ERANGE, -EINVAL. */
static int parse_integer(const char *s, bool *ret_neg, uint64_t *ret_mag) {
        bool neg = false;
        unsigned base = 10;
        uint64_t v = 0;

        if (*s == '+' || *s == '-')
                neg = *s++ == '-';
        if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
                base = 16;
                s += 2;
        } else if (s[0] == '0' && s[1] != 0)
                return -EINVAL;
        if (!*s)
                return -EINVAL;
        for (; *s; s++) {
                unsigned d;
                if (*s >= '0' && *s <= '9')
                        d = (unsigned) (*s - '0');
                else if (base == 16 && *s >= 'a' && *s <= 'f')
                        d = (unsigned) (*s - 'a' + 10);
                else if (base == 16 && *s >= 'A' && *s <= 'F')
                        d = (unsigned) (*s - 'A' + 10);
                else
                        return -EINVAL;
                if (v > (UINT64_MAX - d) / base)
                        return -ERANGE;
                v = v * base + d;
        }
        *ret_neg = neg && v != 0;
        *ret_mag = v;
        return 0;
}

static void describe_int_range(char *buf, size_t size, bool is_signed, int64_t smin, int64_t smax, uint64_t umin,
                               uint64_t umax) {
        if (is_signed) {
                if (smin == INT64_MIN && smax == INT64_MAX)
                        snprintf(buf, size, "an integer");
                else if (smax == INT64_MAX)
                        snprintf(buf, size, "an integer of at least %" PRId64, smin);
                else if (smin == INT64_MIN)
                        snprintf(buf, size, "an integer of at most %" PRId64, smax);
                else
                        snprintf(buf, size, "an integer from %" PRId64 " to %" PRId64, smin, smax);
        } else {
                if (umax == UINT64_MAX)
                        snprintf(buf, size, "an integer of at least %" PRIu64, umin);
                else
                        snprintf(buf, size, "an integer from %" PRIu64 " to %" PRIu64, umin, umax);
        }
}

int adp_conf_parse_int(const struct adp_conf_node *n, int64_t min, int64_t max, struct adp_conf_errors *e,
                       int64_t *ret) {
        char range[128];
        const char *v = adp_conf_scalar(n);
        bool neg;
        uint64_t mag;
        int r;

        describe_int_range(range, sizeof range, true, min, max, 0, 0);
        r = v ? parse_integer(v, &neg, &mag) : -EINVAL;
        if (r == -EINVAL || !v)
                return found_expected(n, e, "%s (decimal or 0x hex)", range);
        if (r < 0 || (!neg && mag > (uint64_t) INT64_MAX) || (neg && mag > (uint64_t) INT64_MAX + 1))
                return found_expected(n, e, "%s", range);
        int64_t x = neg ? (mag == (uint64_t) INT64_MAX + 1 ? INT64_MIN : -(int64_t) mag) : (int64_t) mag;
        if (x < min || x > max) {
                adp_conf_error(e, n, "found %" PRId64 ", expected %s", x, range);
                return -EINVAL;
        }
        *ret = x;
        return 0;
}

int adp_conf_parse_uint(const struct adp_conf_node *n, uint64_t min, uint64_t max, struct adp_conf_errors *e,
                        uint64_t *ret) {
        char range[128];
        const char *v = adp_conf_scalar(n);
        bool neg;
        uint64_t mag;
        int r;

        describe_int_range(range, sizeof range, false, 0, 0, min, max);
        r = v ? parse_integer(v, &neg, &mag) : -EINVAL;
        if (r == -EINVAL)
                return found_expected(n, e, "%s (decimal or 0x hex)", range);
        if (r < 0)
                return found_expected(n, e, "%s", range);
        if (neg) {
                adp_conf_error(e, n, "found -%" PRIu64 ", expected %s", mag, range);
                return -EINVAL;
        }
        if (mag < min || mag > max) {
                adp_conf_error(e, n, "found %" PRIu64 ", expected %s", mag, range);
                return -EINVAL;
        }
        *ret = mag;
        return 0;
}

int adp_conf_parse_double(const struct adp_conf_node *n, double min, double max, struct adp_conf_errors *e,
                          double *ret) {
        const char *v = adp_conf_scalar(n);
        char *end = NULL;
        double d;

        if (v && *v && !isspace((unsigned char) *v)) {
                errno = 0;
                d = strtod(v, &end);
                if (end && *end == 0 && errno == 0 && isfinite(d) &&
                    /* strtod also takes hex floats and "inf"/"nan": a config wants plain decimals */
                    !strpbrk(v, "xXnN")) {
                        if (d < min || d > max) {
                                adp_conf_error(e, n, "found %g, expected a number from %g to %g", d, min, max);
                                return -EINVAL;
                        }
                        *ret = d;
                        return 0;
                }
        }
        return found_expected(n, e, "a number from %g to %g", min, max);
}

#define DURATION_EXAMPLES "250ms, 5s, 10min, 2h, 7d"

int adp_conf_parse_duration(const struct adp_conf_node *n, uint64_t min_usec, uint64_t max_usec,
                            struct adp_conf_errors *e, uint64_t *ret_usec) {
        const char *v = adp_conf_scalar(n);
        char a[64], b[64], f[64];
        uint64_t u;
        int r;

        r = v ? adp_parse_duration(v, &u) : -EINVAL;
        if (r == -EDOM)
                return found_expected(n, e, "a duration with a unit (us, ms, s, min, h, d) such as " DURATION_EXAMPLES);
        if (r < 0)
                return found_expected(n, e, "a duration such as " DURATION_EXAMPLES);
        if (u < min_usec || u > max_usec) {
                adp_conf_error(e, n, "found %s, expected a duration from %s to %s",
                               adp_format_duration(u, f, sizeof f), adp_format_duration(min_usec, a, sizeof a),
                               adp_format_duration(max_usec, b, sizeof b));
                return -EINVAL;
        }
        *ret_usec = u;
        return 0;
}

int adp_conf_parse_size(const struct adp_conf_node *n, uint64_t min_bytes, uint64_t max_bytes,
                        struct adp_conf_errors *e, uint64_t *ret_bytes) {
        const char *v = adp_conf_scalar(n);
        char a[64], b[64], f[64];
        uint64_t u;
        int r;

        r = v ? adp_parse_size(v, &u) : -EINVAL;
        if (r < 0)
                return found_expected(n, e, "a size such as 4096, 10kB, 512KiB, 64MiB, 1GB (units B, kB, KiB, MB, MiB, GB, GiB, TB, TiB)");
        if (u < min_bytes || u > max_bytes) {
                adp_conf_error(e, n, "found %s, expected a size from %s to %s", adp_format_size(u, f, sizeof f),
                               adp_format_size(min_bytes, a, sizeof a), adp_format_size(max_bytes, b, sizeof b));
                return -EINVAL;
        }
        *ret_bytes = u;
        return 0;
}

int adp_conf_parse_enum(const struct adp_conf_node *n, const char *const names[], struct adp_conf_errors *e,
                        int *ret_index) {
        const char *v = adp_conf_scalar(n);
        char list[1024];
        size_t o = 0;

        list[0] = 0;
        for (size_t i = 0; names && names[i]; i++) {
                if (v && streq(v, names[i])) {
                        *ret_index = (int) i;
                        return 0;
                }
                int k = snprintf(list + o, sizeof list - o, "%s%s", i ? ", " : "", names[i]);
                if (k < 0 || (size_t) k >= sizeof list - o)
                        break;
                o += (size_t) k;
        }
        return found_expected(n, e, "one of: %s", list[0] ? list : "(none)");
}

int adp_conf_get_string(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                        const char **ret) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_string(n, e, ret);
}

int adp_conf_get_bool(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                      bool *ret) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_bool(n, e, ret);
}

int adp_conf_get_int(const struct adp_conf_node *map, const char *key, bool required, int64_t min, int64_t max,
                     struct adp_conf_errors *e, int64_t *ret) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_int(n, min, max, e, ret);
}

int adp_conf_get_uint(const struct adp_conf_node *map, const char *key, bool required, uint64_t min, uint64_t max,
                      struct adp_conf_errors *e, uint64_t *ret) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_uint(n, min, max, e, ret);
}

int adp_conf_get_double(const struct adp_conf_node *map, const char *key, bool required, double min, double max,
                        struct adp_conf_errors *e, double *ret) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_double(n, min, max, e, ret);
}

int adp_conf_get_duration(const struct adp_conf_node *map, const char *key, bool required, uint64_t min_usec,
                          uint64_t max_usec, struct adp_conf_errors *e, uint64_t *ret_usec) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_duration(n, min_usec, max_usec, e, ret_usec);
}

int adp_conf_get_size(const struct adp_conf_node *map, const char *key, bool required, uint64_t min_bytes,
                      uint64_t max_bytes, struct adp_conf_errors *e, uint64_t *ret_bytes) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_size(n, min_bytes, max_bytes, e, ret_bytes);
}

int adp_conf_get_enum(const struct adp_conf_node *map, const char *key, bool required, const char *const names[],
                      struct adp_conf_errors *e, int *ret_index) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        return r < 0 ? r : adp_conf_parse_enum(n, names, e, ret_index);
}

static int get_kind(const struct adp_conf_node *map, const char *key, bool required, enum adp_conf_kind kind,
                    struct adp_conf_errors *e, const struct adp_conf_node **ret) {
        const struct adp_conf_node *n;
        int r = lookup(map, key, required, e, &n);
        if (r < 0)
                return r;
        if (n->kind != kind)
                return found_expected(n, e, "%s", adp_conf_kind_to_string(kind));
        *ret = n;
        return 0;
}

int adp_conf_get_seq(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                     const struct adp_conf_node **ret) {
        return get_kind(map, key, required, ADP_CONF_SEQ, e, ret);
}

int adp_conf_get_map(const struct adp_conf_node *map, const char *key, bool required, struct adp_conf_errors *e,
                     const struct adp_conf_node **ret) {
        return get_kind(map, key, required, ADP_CONF_MAP, e, ret);
}
