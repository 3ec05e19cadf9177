/* SPDX-License-Identifier: MIT */
#pragma once

/* Private to query-parse.c and query-eval.c: the expression tree. */

#include <stdbool.h>

#include <jansson.h>

#include "hub/msg.h"
#include "hub/query.h"

enum qnode_kind {
        QN_CONST,  /* value (json, owned) */
        QN_REF,    /* a reference: see enum qref_kind */
        QN_UNARY,  /* op a */
        QN_BINARY, /* a op b */
        QN_IN,     /* a IN list (op QOP_IN or QOP_NIN), list = const array */
        QN_FUNC,   /* func(args) */
        QN_AGG,    /* aggregate (only as a projection) */
};

enum qref_kind {
        QREF_DOC,  /* a path in the twin document (queries) */
        QREF_TWIN, /* $twin.path */
        QREF_BODY, /* $body.path */
        QREF_SYS,  /* $name: system property (sys), then application property "$name" */
        QREF_SYS_ESCAPED, /* {$name}: system property only */
        QREF_APP,  /* bare name: application property */
        QREF_NONE, /* always undefined ($body alone, {$unknown}) */
};

enum qop {
        QOP_NEG, QOP_NOT,
        QOP_MUL, QOP_DIV, QOP_MOD, QOP_ADD, QOP_SUB, QOP_CONCAT,
        QOP_LT, QOP_LE, QOP_GT, QOP_GE, QOP_EQ, QOP_NE,
        QOP_AND, QOP_OR, QOP_COALESCE,
        QOP_IN, QOP_NIN,
};

enum qfunc {
        QF_ABS, QF_EXP, QF_POWER, QF_SQUARE, QF_CEILING, QF_FLOOR, QF_SIGN, QF_SQRT,
        QF_AS_NUMBER, QF_IS_ARRAY, QF_IS_BOOL, QF_IS_DEFINED, QF_IS_NULL, QF_IS_NUMBER,
        QF_IS_OBJECT, QF_IS_PRIMITIVE, QF_IS_STRING,
        QF_CONCAT, QF_LENGTH, QF_LOWER, QF_UPPER, QF_SUBSTRING, QF_INDEX_OF,
        QF_STARTS_WITH, QF_ENDS_WITH, QF_CONTAINS,
        _QF_MAX,
};

enum qagg { QA_COUNT, QA_AVG, QA_SUM, QA_MIN, QA_MAX };

struct qseg {
        char *key;  /* NULL for an index */
        long index;
};

struct qnode {
        enum qnode_kind kind;
        unsigned offset; /* byte offset in the text, for messages */
        unsigned height; /* of the subtree (bounded by the parser) */
        union {
                json_t *value;  /* QN_CONST (never NULL: undefined is QREF_NONE) */
                enum qop op;    /* QN_UNARY, QN_BINARY, QN_IN */
                enum qfunc func;
                enum qagg agg;
        };
        /* QN_REF */
        enum qref_kind ref;
        enum hub_sys_prop sys;
        bool sys_known;
        char *name; /* QREF_APP / QREF_SYS: the property name as written */
        struct qseg *segs;
        unsigned n_segs;
        /* operands */
        struct qnode *a, *b;
        json_t *list; /* QN_IN */
        struct qnode **args;
        unsigned n_args;
};

struct hub_condition {
        struct qnode *root; /* NULL: always true (empty condition) */
};

struct qproj {
        struct qnode *expr;
        char *alias; /* NULL: derived from a path, or "$n" */
};

struct hub_query {
        unsigned top;
        bool star;
        bool aggregate; /* aggregates or GROUP BY */
        enum hub_query_from from;
        struct qproj *projs;
        unsigned n_projs;
        struct hub_condition where; /* root NULL when absent */
        bool has_where;
        struct qnode **group_by;
        unsigned n_group_by;
};

void qnode_free(struct qnode *n);
const char *qfunc_name(enum qfunc f);

/* Evaluation (query-eval.c). Returns a new reference, or NULL for undefined. */
struct qeval_ctx {
        const json_t *doc;     /* query document ($twin and QREF_DOC when msg-less) */
        struct hub_cond_ctx *msg_ctx; /* NULL for document-only evaluation */
};
json_t *qnode_eval(const struct qnode *n, struct qeval_ctx *c);
