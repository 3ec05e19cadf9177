/* SPDX-License-Identifier: MIT */
#pragma once

/* The IoT Hub query language (reference §5.5) and the routing condition language
 * (reference §8.2–8.5): one lexer, one parser, one evaluator.
 *
 * - Service queries: `SELECT [TOP n] * | expr [AS alias], ... FROM devices | devices.modules
 *   [WHERE cond] [GROUP BY expr, ...]`, executed as a streaming cursor that is fed one twin
 *   document at a time (so the caller can page over store rows without loading them all).
 * - Routing conditions: evaluated against a message (system properties, application
 *   properties, `$body` of JSON messages) and the sender's twin (`$twin`).
 *
 * Values are jansson values; "undefined" is represented internally by the absence of a value.
 * Semantics are the three-valued logic of reference §8.2 in both languages: a missing
 * property is undefined, a comparison with an undefined or null operand is undefined,
 * comparing different types is undefined, `undefined AND false` is false, `undefined OR true`
 * is true; a condition (or WHERE clause) is satisfied only when it is Boolean true.
 *
 * Differences between the two grammars (both are documented in the reference):
 * - conditions: bare names are application properties, `$name` a system property (then an
 *   application property of that name), `$body.…`, `$twin.…`, `{$name}`, unary `-` and `NOT`
 *   bind tighter than every binary operator (as the Edge hub's grammar lists them);
 *   names may contain `-` and `.` (`alert-level`).
 * - queries: bare paths address the twin document (`tags.a.b`, `properties.reported.x`,
 *   `deviceId`; names case-insensitive when no exact match exists), `IN [..]`, `NIN [..]`,
 *   `NOT` binds looser than comparisons (SQL); `-` is always the minus operator.
 * Both accept every function of §8.5 (case-insensitive), plus STARTSWITH / ENDSWITH as
 * spellings of starts_with / ends_with, `||`, `??` and comments.
 *
 * Limits: text at most HUB_QUERY_MAX_LEN bytes (-E2BIG), expressions nested at most
 * HUB_QUERY_MAX_DEPTH deep, at most HUB_QUERY_MAX_NODES nodes; string values produced by
 * evaluation (concatenation) are capped at HUB_QUERY_MAX_STRING bytes (longer → undefined).
 *
 * Thread safety: a parsed query or condition is immutable and may be evaluated from several
 * threads at once; a hub_query_exec or hub_cond_ctx belongs to one thread. Nothing blocks. */

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "hub/macro.h"

struct hub_msg;

#define HUB_QUERY_MAX_LEN 8192u
#define HUB_QUERY_MAX_DEPTH 64u
#define HUB_QUERY_MAX_NODES 4096u
#define HUB_QUERY_MAX_STRING (64u * 1024u)
#define HUB_QUERY_MAX_GROUPS 100000u

struct hub_query;     /* a parsed SELECT statement */
struct hub_condition; /* a parsed routing condition (or a query's WHERE clause) */
struct hub_query_exec;

struct hub_query_error {
        unsigned offset;       /* 0-based character (code point) offset of the problem */
        unsigned line, column; /* 1-based */
        char message[256];     /* what was found and what was expected, e.g.
                                * "found 'FORM', expected FROM" */
};

enum hub_query_from {
        HUB_QUERY_FROM_DEVICES,
        HUB_QUERY_FROM_DEVICES_MODULES,
        _HUB_QUERY_FROM_MAX,
};

enum hub_tristate { HUB_FALSE, HUB_TRUE, HUB_UNDEFINED };

/* Parses a SELECT statement. Returns 0 and a new query in *ret, -EINVAL with *err filled
 * (err may be NULL) when the text does not parse, -E2BIG (err filled too) when it is longer
 * than HUB_QUERY_MAX_LEN bytes, -ENOMEM. */
HUB_EXPORT int hub_query_parse(const char *text, struct hub_query **ret, struct hub_query_error *err);
HUB_EXPORT struct hub_query *hub_query_free(struct hub_query *q); /* accepts NULL, returns NULL */
DEFINE_CLEANUP_FUNC(struct hub_query *, hub_query_free);

/* Whether the query aggregates (COUNT/AVG/SUM/MIN/MAX or GROUP BY): its rows come from
 * hub_query_exec_finish(), not from hub_query_exec_feed(). */
HUB_EXPORT bool hub_query_is_aggregate(const struct hub_query *q);
HUB_EXPORT unsigned hub_query_top(const struct hub_query *q); /* TOP n, 0 = none */
HUB_EXPORT enum hub_query_from hub_query_from(const struct hub_query *q);
/* Whether the query is `SELECT *` (rows are whole twin documents: x-ms-item-type twin). */
HUB_EXPORT bool hub_query_selects_all(const struct hub_query *q);
/* The WHERE clause, or NULL. Borrowed: valid as long as q. */
HUB_EXPORT const struct hub_condition *hub_query_where(const struct hub_query *q);

/* A cursor executing q over documents fed one at a time. Borrows q (which must outlive it). */
HUB_EXPORT int hub_query_exec_new(const struct hub_query *q, struct hub_query_exec **ret);
HUB_EXPORT struct hub_query_exec *hub_query_exec_free(struct hub_query_exec *x); /* accepts NULL */
DEFINE_CLEANUP_FUNC(struct hub_query_exec *, hub_query_exec_free);

/* Feeds one twin document (borrowed). For a plain query, *ret_row receives a new reference
 * to the projected row (for `SELECT *`, doc itself; projections share values with doc: treat
 * rows as read-only) or NULL when WHERE filtered the document out or TOP was already reached.
 * For an aggregate query, doc is accumulated and *ret_row is NULL. ret_row may be NULL.
 * Returns 0, or 1 when TOP rows have now been produced (feeding more yields nothing: the
 * caller may stop), -EINVAL (doc not an object), -E2BIG (more than HUB_QUERY_MAX_GROUPS
 * groups), -ENOMEM. */
HUB_EXPORT int hub_query_exec_feed(struct hub_query_exec *x, const json_t *doc, json_t **ret_row);
/* Ends the run: *ret_rows receives a new array holding the aggregate/group rows in order of
 * first appearance (one row for aggregates without GROUP BY, even over no documents; at most
 * TOP rows), or an empty array for a plain query. -ENOMEM. */
HUB_EXPORT int hub_query_exec_finish(struct hub_query_exec *x, json_t **ret_rows);

/* Parses a routing condition (reference §8.2). An empty condition (or only whitespace and
 * comments) is always true. Errors as hub_query_parse(). */
HUB_EXPORT int hub_condition_parse(const char *text, struct hub_condition **ret, struct hub_query_error *err);
HUB_EXPORT struct hub_condition *hub_condition_free(struct hub_condition *c); /* accepts NULL */
DEFINE_CLEANUP_FUNC(struct hub_condition *, hub_condition_free);

/* What a routing condition is evaluated against. Fill msg and twin, zero the rest
 * (HUB_COND_CTX_INIT), and call hub_cond_ctx_done() when finished with the message: the
 * body is parsed at most once per context, lazily, on the first `$body` reference. */
struct hub_cond_ctx {
        const struct hub_msg *msg; /* borrowed, may be NULL (then only $twin is defined) */
        const json_t *twin;        /* borrowed, may be NULL: the sender's twin document */
        /* internal: */
        json_t *body_cache;
        int body_state; /* 0 = not parsed yet, 1 = parsed into body_cache, -1 = not JSON */
};
#define HUB_COND_CTX_INIT(m, t) ((struct hub_cond_ctx) { .msg = (m), .twin = (t) })
HUB_EXPORT void hub_cond_ctx_done(struct hub_cond_ctx *ctx);

/* Evaluates c against a message (and twin). Never fails: anything that cannot be evaluated
 * (or memory exhaustion) is HUB_UNDEFINED. A route matches only on HUB_TRUE. ctx may be
 * NULL (no message, no twin: every reference is undefined). */
HUB_EXPORT enum hub_tristate hub_condition_eval(const struct hub_condition *c, struct hub_cond_ctx *ctx);
/* The value of c's expression (e.g. a parsed `$twin.tags.site` for an enrichment): a new
 * reference, or NULL when undefined (also for an empty condition). ctx may be NULL. */
HUB_EXPORT json_t *hub_condition_value(const struct hub_condition *c, struct hub_cond_ctx *ctx);
/* Evaluates c against a twin document alone: query paths and `$twin.…` address doc;
 * message references are undefined. */
HUB_EXPORT enum hub_tristate hub_condition_eval_doc(const struct hub_condition *c, const json_t *doc);
