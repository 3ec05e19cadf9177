/* SPDX-License-Identifier: MIT */
/* The query language and routing conditions: parse errors with positions, the three-valued
 * logic, every operator and function, message and twin references, and queries executed over
 * generated twin documents. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/msg.h"
#include "hub/query.h"
#include "query-internal.h"
#include "test-util.h"

/* ---- helpers ------------------------------------------------------------------------- */

static void check_error(bool query, const char *text, int rc, unsigned offset, unsigned line, unsigned column,
                        const char *message) {
        struct hub_query_error err;
        struct hub_query *q = NULL;
        struct hub_condition *c = NULL;
        int r = query ? hub_query_parse(text, &q, &err) : hub_condition_parse(text, &c, &err);
        if (r != rc)
                TEST_FAIL("parse(\"%s\") = %d, expected %d (message: %s)", text, r, rc, err.message);
        ASSERT_NULL(q);
        ASSERT_NULL(c);
        if (err.offset != offset || err.line != line || err.column != column || strcmp(err.message, message) != 0)
                TEST_FAIL("parse(\"%s\"): got %u (%u:%u) \"%s\", expected %u (%u:%u) \"%s\"", text, err.offset,
                          err.line, err.column, err.message, offset, line, column, message);
}
#define QERR(text, off, msg) check_error(true, text, -EINVAL, off, 1, (off) + 1, msg)
#define CERR(text, off, msg) check_error(false, text, -EINVAL, off, 1, (off) + 1, msg)

/* Evaluates a routing expression without message: its value dumped, or "undefined". */
static char *eval_str(const char *text, struct hub_cond_ctx *ctx) {
        struct hub_condition *c = NULL;
        struct hub_query_error err;
        int r = hub_condition_parse(text, &c, &err);
        if (r < 0)
                TEST_FAIL("parse(\"%s\") = %d: %u: %s", text, r, err.offset, err.message);
        struct qeval_ctx ec = { .msg_ctx = ctx };
        json_t *v = qnode_eval(c->root, &ec);
        char *s = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : strdup("undefined");
        json_decref(v);
        hub_condition_free(c);
        return s;
}

static void check_value(const char *text, const char *expected, struct hub_cond_ctx *ctx) {
        char *s = eval_str(text, ctx);
        if (strcmp(s, expected) != 0)
                TEST_FAIL("%s = %s, expected %s", text, s, expected);
        free(s);
}
#define VAL(text, expected) check_value(text, expected, NULL)

static enum hub_tristate cond(const char *text, struct hub_cond_ctx *ctx) {
        struct hub_condition *c = NULL;
        struct hub_query_error err;
        int r = hub_condition_parse(text, &c, &err);
        if (r < 0)
                TEST_FAIL("parse(\"%s\") = %d: %u: %s", text, r, err.offset, err.message);
        enum hub_tristate t = hub_condition_eval(c, ctx);
        hub_condition_free(c);
        return t;
}
#define COND(text, ctx, expected)                                                       \
        do {                                                                            \
                enum hub_tristate _t = cond(text, ctx);                                 \
                if (_t != (expected))                                                   \
                        TEST_FAIL("%s: got %d, expected %s", text, (int) _t, #expected); \
        } while (0)

/* ---- parse errors -------------------------------------------------------------------- */

static void test_query_errors(void) {
        QERR("SELECT * FORM devices", 9, "found 'FORM', expected FROM");
        QERR("SELECT * FROM devices WHERE tags.x = 'abc", 37, "unterminated string");
        QERR("SELECT * FROM devices WHERE tags.x = 'a\\qb'", 39,
             "invalid escape sequence '\\q', expected \\', \\\", \\\\ or \\uXXXX");
        QERR("SELECT * FROM devices WHERE tags.x = 'a\\u12G4'", 39, "invalid \\u escape, expected 4 hexadecimal digits");
        QERR("SELECT * FROM devices WHERE foo(1) = 1", 28, "unknown function 'foo'");
        QERR("SELECT * FROM devices WHERE (tags.x = 1", 39, "found end of input, expected ')'");
        QERR("SELECT TOP -1 * FROM devices", 11, "found '-', expected a positive integer after TOP");
        QERR("SELECT TOP 1.5 * FROM devices", 11, "found '1.5', expected a positive integer after TOP");
        QERR("SELECT * FROM devices GROUP BY tags.x", 22,
             "GROUP BY requires explicit projections or aggregates, not SELECT *");
        QERR("", 0, "found end of input, expected SELECT");
        QERR("SELECT FROM devices", 7, "found 'FROM', expected '*' or a projection");
        QERR("SELECT * FROM devices.jobs", 14, "found 'devices.jobs', expected devices or devices.modules");
        QERR("SELECT * FROM devices x", 22, "found 'x', expected WHERE, GROUP BY or end of input");
        QERR("SELECT * FROM devices WHERE LOWER('a', 'b') = 'a'", 28, "function 'lower' takes 1 argument, found 2");
        QERR("SELECT * FROM devices WHERE tags.x IN 5", 38, "found '5', expected '[' (an array of constants)");
        QERR("SELECT * FROM devices WHERE tags.x IN ['a',", 43,
             "found end of input, expected a constant (string, number, true, false or null)");
        QERR("SELECT deviceId, COUNT() AS n FROM devices", 7,
             "cannot mix aggregates and plain projections without GROUP BY");
        QERR("SELECT tags.y, COUNT() AS n FROM devices GROUP BY tags.x", 7,
             "projection is neither an aggregate nor a GROUP BY path");
        QERR("SELECT * FROM devices WHERE COUNT() = 1", 28,
             "aggregate 'COUNT' is only allowed as a whole projection of SELECT");
        QERR("SELECT * FROM devices WHERE tags.x = 1 /* open", 39, "unterminated comment");
        QERR("SELECT * FROM devices WHERE tags.x = 10abc", 37, "invalid number '10abc'");
        QERR("SELECT * FROM devices WHERE tags.x = 0x", 37, "invalid hexadecimal number, expected digits after '0x'");
        QERR("SELECT * FROM devices WHERE tags.x # 1", 35, "unexpected character '#'");
        QERR("SELECT deviceId AS FROM devices", 19, "found 'FROM', expected an alias name after AS");
        QERR("SELECT deviceId FROM devices WHERE", 34, "found end of input, expected an expression");
        QERR("SELECT * FROM devices WHERE tags.x = '\xff'", 38, "invalid UTF-8");
        /* positions count characters, not bytes, and lines */
        QERR("SELECT * FROM devices WHERE tags.x = 'é' FORM", 41, "found 'FORM', expected GROUP BY or end of input");
        check_error(true, "SELECT *\nFROM devices\nWHERE tags.x = = 1", -EINVAL, 37, 3, 16,
                    "found '=', expected an expression");

        /* over-long text */
        char *big = malloc(HUB_QUERY_MAX_LEN + 2);
        ASSERT_NOT_NULL(big);
        memset(big, ' ', HUB_QUERY_MAX_LEN + 1);
        memcpy(big, "SELECT * FROM devices", 21);
        big[HUB_QUERY_MAX_LEN + 1] = '\0';
        check_error(true, big, -E2BIG, 0, 1, 1, "query longer than 8192 characters");
        big[HUB_QUERY_MAX_LEN] = '\0'; /* exactly the limit is fine */
        struct hub_query *q = NULL;
        ASSERT_OK(hub_query_parse(big, &q, NULL));
        q = hub_query_free(q);

        /* nesting bomb */
        size_t n = 0;
        n += (size_t) sprintf(big, "SELECT * FROM devices WHERE ");
        for (int i = 0; i < 200; i++)
                big[n++] = '(';
        big[n++] = '1';
        for (int i = 0; i < 200; i++)
                big[n++] = ')';
        big[n] = '\0';
        check_error(true, big, -EINVAL, 28 + 64, 1, 28 + 65, "expression nested too deeply (more than 64 levels)");
        /* unary chain bomb */
        n = (size_t) sprintf(big, "SELECT * FROM devices WHERE ");
        for (int i = 0; i < 3000; i++)
                big[n++] = '-';
        big[n++] = '1';
        big[n] = '\0';
        check_error(true, big, -EINVAL, 28 + 63, 1, 28 + 64, "expression nested too deeply (more than 64 levels)");
        /* a long flat chain is bounded too, without recursion */
        n = (size_t) sprintf(big, "SELECT * FROM devices WHERE 1");
        for (int i = 0; i < 1500; i++)
                n += (size_t) sprintf(big + n, "+1");
        struct hub_query_error err;
        ASSERT_ERR(hub_query_parse(big, &q, &err), -EINVAL);
        ASSERT_TRUE(strstr(err.message, "expression too complex") != NULL);
        free(big);

        /* NULL arguments */
        ASSERT_ERR(hub_query_parse(NULL, &q, NULL), -EINVAL);
        ASSERT_ERR(hub_query_parse("SELECT * FROM devices", NULL, NULL), -EINVAL);
}

static void test_condition_errors(void) {
        CERR("$body.x = ", 10, "found end of input, expected an expression");
        CERR("a = 'x' AND", 11, "found end of input, expected an expression");
        CERR("{$messageId", 11, "found end of input, expected '}'");
        CERR("{$nope} = 1", 1, "unknown system property '$nope'");
        CERR("{severity} = 1", 1, "found 'severity', expected a system property ('$name') inside '{ }'");
        CERR("a @ b", 2, "unexpected character '@'");
        CERR("$ = 1", 0, "expected a property name after '$'");
        CERR("a = 1 b", 6, "found 'b', expected an operator or end of input");
        CERR("$body.a..b = 1", 0, "invalid property path '$body.a..b'");
        CERR("$body.a[x] = 1", 0, "invalid property path '$body.a[x]'");
        CERR("bogus_fn(1)", 0, "unknown function 'bogus_fn'");
        CERR("substring('a')", 0, "function 'substring' takes 2 to 3 arguments, found 1");
        CERR("a | b", 2, "unexpected character '|', expected '||'");
        CERR("a ? b", 2, "unexpected character '?', expected '?\?'");
        CERR("x IN ['a']", 2, "found 'IN', expected an operator or end of input");
        CERR("'abc\\", 0, "unterminated string");
        CERR("'\\ud800' = 'x'", 1, "invalid \\u escape: unpaired surrogate");

        struct hub_condition *c = NULL;
        ASSERT_OK(hub_condition_parse("", &c, NULL));
        ASSERT_EQ(hub_condition_eval_doc(c, NULL), HUB_TRUE);
        c = hub_condition_free(c);
        ASSERT_OK(hub_condition_parse("  /* nothing */ ", &c, NULL));
        ASSERT_EQ(hub_condition_eval_doc(c, NULL), HUB_TRUE);
        c = hub_condition_free(c);
}

/* ---- evaluation ---------------------------------------------------------------------- */

static void test_three_valued_logic(void) {
        static const char *const v[] = { "true", "false", "undefined" };
        /* [a][b]: T F U */
        static const char *const and_t[3][3] = { { "true", "false", "undefined" },
                                                 { "false", "false", "false" },
                                                 { "undefined", "false", "undefined" } };
        static const char *const or_t[3][3] = { { "true", "true", "true" },
                                                { "true", "false", "undefined" },
                                                { "true", "undefined", "undefined" } };
        char buf[128];
        for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++) {
                        snprintf(buf, sizeof buf, "%s AND %s", v[a], v[b]);
                        VAL(buf, and_t[a][b]);
                        snprintf(buf, sizeof buf, "%s and %s", v[a], v[b]);
                        VAL(buf, and_t[a][b]);
                        snprintf(buf, sizeof buf, "%s OR %s", v[a], v[b]);
                        VAL(buf, or_t[a][b]);
                }
        VAL("NOT true", "false");
        VAL("NOT false", "true");
        VAL("NOT undefined", "undefined");
        VAL("not 5", "undefined");
        /* non-Boolean operands count as undefined */
        VAL("5 AND false", "false");
        VAL("'x' OR true", "true");
        VAL("'x' AND true", "undefined");
        /* a condition holds only on Boolean true */
        COND("undefined", NULL, HUB_UNDEFINED);
        COND("1", NULL, HUB_UNDEFINED);
        COND("false", NULL, HUB_FALSE);
        COND("true", NULL, HUB_TRUE);
}

static void test_operators(void) {
        VAL("1 + 2", "3");
        VAL("5 - 7", "-2");
        VAL("3 -5", "-2");
        VAL("-5 + 3", "-2");
        VAL("2 * 3.5", "7");
        VAL("7 / 2", "3.5");
        VAL("7 % 3", "1");
        VAL("-7 % 3", "-1");
        VAL("1 / 0", "undefined");
        VAL("1 % 0", "undefined");
        VAL("0x1F + .5", "31.5");
        VAL("2e3", "2000");
        VAL("1.5E-1 * 10", "1.5");
        VAL("1 + 2 * 3", "7");
        VAL("(1 + 2) * 3", "9");
        VAL("10 - 2 - 3", "5");
        VAL("-(3)", "-3");
        VAL("- 'a'", "undefined");
        VAL("1 + '1'", "undefined");
        VAL("1 + null", "undefined");
        VAL("'a' || 'b' || 'c'", "\"abc\"");
        VAL("'a' || 1", "undefined");
        VAL("'it\\'s' || \"\\\"q\\\"\" || '\\\\' || '\\u00e9\\ud83d\\ude00'", "\"it's\\\"q\\\"\\\\é😀\"");
        VAL("undefined ?? 5", "5");
        VAL("4 ?? 5", "4");
        VAL("null ?? 5", "null");
        VAL("undefined ?? undefined", "undefined");
        VAL("nope ?? 'x'", "\"x\"");
        /* comparisons */
        VAL("1 = 1", "true");
        VAL("1 = 1.0", "true");
        VAL("1 != 1", "false");
        VAL("1 <> 2", "true");
        VAL("'a' = 'a'", "true");
        VAL("'a' = 'A'", "false");
        VAL("true = true", "true");
        VAL("true != false", "true");
        VAL("1 = '1'", "undefined");
        VAL("1 = true", "undefined");
        VAL("null = null", "undefined");
        VAL("null != 1", "undefined");
        VAL("undefined = undefined", "undefined");
        VAL("1 < 2", "true");
        VAL("2 <= 2", "true");
        VAL("3 > 2", "true");
        VAL("2 >= 3", "false");
        VAL("'B' < 'a'", "true"); /* ordinal */
        VAL("'abc' < 'abd'", "true");
        VAL("'ab' < 'abc'", "true");
        VAL("'2022-06-07T00:00:00Z' > '2022-06-06T22:56:06Z'", "true");
        VAL("1 < '2'", "undefined");
        VAL("true < false", "undefined");
        VAL("null < 1", "undefined");
        /* precedence: comparison over AND over OR over ?? */
        VAL("1 = 1 AND 2 = 3 OR 4 = 4", "true");
        VAL("1 = 2 OR 1 = 1 AND 1 = 2", "false");
        VAL("undefined ?? 1 = 1", "true");
        /* routing grammar: unary NOT binds tighter than '=' (as the Edge grammar) */
        VAL("NOT 1 = 1", "undefined");
        VAL("NOT (1 = 1)", "false");
        VAL("/* c */ 1 /* c2 */ + 1", "2");
}

static void test_functions(void) {
        VAL("abs(-2.5)", "2.5");
        VAL("ABS('x')", "undefined");
        VAL("exp(0)", "1");
        VAL("power(2, 10)", "1024");
        VAL("square(-3)", "9");
        VAL("ceiling(1.2)", "2");
        VAL("floor(-1.2)", "-2");
        VAL("sign(-4)", "-1");
        VAL("sign(0)", "0");
        VAL("sqrt(16)", "4");
        VAL("sqrt(-1)", "undefined");
        VAL("as_number('42.5')", "42.5");
        VAL("as_number(' 7 ')", "7");
        VAL("as_number('abc')", "undefined");
        VAL("as_number('nan')", "undefined");
        VAL("as_number(3)", "3");
        VAL("as_number(true)", "undefined");
        VAL("is_bool(false)", "true");
        VAL("is_bool(1)", "false");
        VAL("is_defined(undefined)", "false");
        VAL("is_defined(null)", "true");
        VAL("is_null(null)", "true");
        VAL("is_null(undefined)", "false");
        VAL("is_number(1)", "true");
        VAL("is_number('1')", "false");
        VAL("is_string('1')", "true");
        VAL("is_primitive('1')", "true");
        VAL("is_array('1')", "false");
        VAL("is_object(1)", "false");
        VAL("concat('a', 'b', 'c')", "\"abc\"");
        VAL("concat('a', 1)", "undefined");
        VAL("length('héllo')", "5");
        VAL("length(5)", "undefined");
        VAL("lower('AbC')", "\"abc\"");
        VAL("upper('AbC')", "\"ABC\"");
        VAL("substring('hello', 1, 3)", "\"ell\"");
        VAL("substring('hello', 2)", "\"llo\"");
        VAL("substring('héllo', 1, 2)", "\"él\"");
        VAL("substring('hello', 10)", "\"\"");
        VAL("substring('hello', -1)", "undefined");
        VAL("index_of('hello', 'll')", "2");
        VAL("index_of('héllo', 'llo')", "2");
        VAL("index_of('hello', 'x')", "-1");
        VAL("starts_with('hello', 'he')", "true");
        VAL("STARTSWITH('hello', 'lo')", "false");
        VAL("ends_with('hello', 'lo')", "true");
        VAL("EndsWith('hello', 'he')", "false");
        VAL("contains('hello', 'ell')", "true");
        VAL("contains('hello', 'xyz')", "false");
        VAL("contains(1, 'x')", "undefined");
}

static void test_string_cap(void) {
        /* concatenation beyond HUB_QUERY_MAX_STRING is undefined, not an allocation bomb */
        struct hub_msg *m = NULL;
        char *big = malloc(40001);
        ASSERT_NOT_NULL(big);
        memset(big, 'y', 40000);
        big[40000] = '\0';
        ASSERT_OK(hub_msg_new("", 0, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_prop(m, "big", big));
        free(big);
        struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(m, NULL);
        check_value("length(big || 'x')", "40001", &ctx);
        check_value("big || big", "undefined", &ctx);
        check_value("concat(big, 'x', big)", "undefined", &ctx);
        check_value("length(concat(big, 'x'))", "40001", &ctx);
        hub_cond_ctx_done(&ctx);
        hub_msg_unref(m);
}

static struct hub_msg *make_msg(const char *body, const char *ct, const char *ce) {
        struct hub_msg *m = NULL;
        ASSERT_OK(hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m));
        if (ct)
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, ct));
        if (ce)
                ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, ce));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "m1"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "plc-7"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, "2022-06-07T10:00:00Z"));
        ASSERT_OK(hub_msg_set_prop(m, "Severity", "high"));
        ASSERT_OK(hub_msg_set_prop(m, "temp", "25.5"));
        ASSERT_OK(hub_msg_set_prop(m, "alert-level", "3"));
        ASSERT_OK(hub_msg_set_prop(m, "$custom", "x"));
        return m;
}

static const char body_json_text[] = "{\"level\":\"alarm\",\"a\":{\"b\":[{\"c\":5},{\"c\":6}]},\"n\":null,\"t\":30}";

static void test_message_refs(void) {
        struct hub_msg *m = make_msg(body_json_text, "application/json; charset=utf-8", "UTF-8");
        json_t *twin = json_loads("{\"deviceId\":\"plc-7\",\"tags\":{\"site\":\"plant1\",\"zone\":{\"id\":4}},"
                                  "\"properties\":{\"desired\":{\"rate\":10},\"reported\":{\"fw\":\"1.2\"}}}",
                                  0, NULL);
        ASSERT_NOT_NULL(twin);
        struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(m, twin);

        COND("$body.level = 'alarm' AND $connectionDeviceId = 'plc-7'", &ctx, HUB_TRUE);
        ASSERT_EQ(ctx.body_state, 1); /* parsed once and cached */
        json_t *cached = ctx.body_cache;
        COND("$body.a.b[1].c = 6", &ctx, HUB_TRUE);
        ASSERT_TRUE(ctx.body_cache == cached);
        COND("$body.a.b[2].c = 6", &ctx, HUB_UNDEFINED);
        COND("$body.t > 20 AND $body.t <= 30", &ctx, HUB_TRUE);
        COND("is_defined($body.n) AND is_null($body.n)", &ctx, HUB_TRUE);
        COND("$body.n = null", &ctx, HUB_UNDEFINED);
        COND("$body.missing = 1", &ctx, HUB_UNDEFINED);
        COND("$body.level.x = 1", &ctx, HUB_UNDEFINED);
        COND("is_defined($body)", &ctx, HUB_FALSE); /* $body alone is not supported */
        check_value("$body.a.b[0]", "{\"c\":5}", &ctx);
        /* system properties, case-insensitive names, escaped form */
        COND("$messageId = 'm1'", &ctx, HUB_TRUE);
        COND("$MESSAGEID = 'm1'", &ctx, HUB_TRUE);
        COND("{$messageId} = 'm1'", &ctx, HUB_TRUE);
        COND("$contentType = 'application/json; charset=utf-8'", &ctx, HUB_TRUE);
        COND("$enqueuedTime > \"2022-06-06T22:56:06Z\"", &ctx, HUB_TRUE);
        COND("is_defined($connectionModuleId)", &ctx, HUB_FALSE);
        COND("$connectionModuleId = 'x' OR severity = 'high'", &ctx, HUB_TRUE);
        /* application properties: bare names, case-insensitive, string values */
        COND("severity = 'high'", &ctx, HUB_TRUE);
        COND("SEVERITY = 'high'", &ctx, HUB_TRUE);
        COND("severity = 'HIGH'", &ctx, HUB_FALSE);
        COND("temp > 20", &ctx, HUB_UNDEFINED); /* a string against a number */
        COND("as_number(temp) > 20", &ctx, HUB_TRUE);
        COND("alert-level = '3'", &ctx, HUB_TRUE);
        COND("$custom = 'x'", &ctx, HUB_TRUE);     /* not a system property: application */
        COND("missing = 'x'", &ctx, HUB_UNDEFINED);
        COND("severity || '-' || $messageId = 'high-m1'", &ctx, HUB_TRUE);
        COND("missing ?? severity = 'high'", &ctx, HUB_TRUE);
        /* twin references */
        COND("$twin.tags.site = 'plant1'", &ctx, HUB_TRUE);
        COND("$twin.tags.zone.id = 4", &ctx, HUB_TRUE);
        COND("$twin.properties.desired.rate >= 10", &ctx, HUB_TRUE);
        COND("$twin.properties.reported.fw = '1.2'", &ctx, HUB_TRUE);
        COND("$twin.tags.nope = 'x'", &ctx, HUB_UNDEFINED);
        /* values, e.g. for enrichments */
        struct hub_condition *e = NULL;
        ASSERT_OK(hub_condition_parse("$twin.tags.site", &e, NULL));
        json_t *v = hub_condition_value(e, &ctx);
        ASSERT_STREQ(json_string_value(v), "plant1");
        json_decref(v);
        e = hub_condition_free(e);
        ASSERT_OK(hub_condition_parse("$twin.tags.location", &e, NULL));
        ASSERT_NULL(hub_condition_value(e, &ctx));
        e = hub_condition_free(e);
        hub_cond_ctx_done(&ctx);
        ASSERT_NULL(ctx.body_cache);

        struct hub_cond_ctx no_twin = HUB_COND_CTX_INIT(m, NULL);
        COND("$twin.tags.site = 'plant1'", &no_twin, HUB_UNDEFINED);
        COND("severity = 'high'", &no_twin, HUB_TRUE);
        hub_cond_ctx_done(&no_twin);
        /* $twin-only evaluation against the twin document */
        struct hub_condition *c = NULL;
        ASSERT_OK(hub_condition_parse("$twin.tags.site = 'plant1' AND is_defined($twin.properties.reported.fw)", &c, NULL));
        ASSERT_EQ(hub_condition_eval_doc(c, twin), HUB_TRUE);
        c = hub_condition_free(c);
        ASSERT_OK(hub_condition_parse("severity = 'high'", &c, NULL));
        ASSERT_EQ(hub_condition_eval_doc(c, twin), HUB_UNDEFINED);
        c = hub_condition_free(c);
        hub_msg_unref(m);

        /* content type / encoding rule for $body (reference §8.4) */
        static const struct {
                const char *ct, *ce;
                enum hub_tristate expect;
        } cases[] = {
                { "application/json", "utf-8", HUB_TRUE },
                { "application/json;charset=utf-8", "utf-8", HUB_TRUE },
                { "Application/JSON; charset=UTF-8", "UTF-8", HUB_TRUE },
                { "application/json", "UTF-32", HUB_UNDEFINED }, /* body bytes are not UTF-32 */
                { "application/json", NULL, HUB_UNDEFINED },
                { NULL, "utf-8", HUB_UNDEFINED },
                { "text/plain", "utf-8", HUB_UNDEFINED },
                { "application/jsonx", "utf-8", HUB_UNDEFINED },
                { "application/json", "latin-1", HUB_UNDEFINED },
        };
        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                m = make_msg(body_json_text, cases[i].ct, cases[i].ce);
                ctx = HUB_COND_CTX_INIT(m, NULL);
                enum hub_tristate t = cond("$body.level = 'alarm'", &ctx);
                if (t != cases[i].expect)
                        TEST_FAIL("ct=%s ce=%s: %d", cases[i].ct ?: "(none)", cases[i].ce ?: "(none)", (int) t);
                /* properties still route when the body cannot be queried */
                COND("severity = 'high' OR $body.level = 'alarm'", &ctx, HUB_TRUE);
                hub_cond_ctx_done(&ctx);
                hub_msg_unref(m);
        }
        /* a body that is not JSON */
        m = make_msg("not json", "application/json", "utf-8");
        ctx = HUB_COND_CTX_INIT(m, NULL);
        COND("$body.level = 'alarm'", &ctx, HUB_UNDEFINED);
        ASSERT_EQ(ctx.body_state, -1);
        hub_cond_ctx_done(&ctx);
        hub_msg_unref(m);

        /* UTF-16LE and UTF-32BE (with BOM) bodies */
        static const char j[] = "{\"v\":\"\xc3\xa9\"}"; /* {"v":"é"} */
        unsigned char b16[64], b32[128];
        size_t n16 = 0, n32 = 0;
        b32[n32++] = 0, b32[n32++] = 0, b32[n32++] = 0xFE, b32[n32++] = 0xFF;
        for (const unsigned char *p = (const unsigned char *) j; *p; p++) {
                unsigned cp = *p;
                if (cp == 0xC3) {
                        cp = 0xE9;
                        p++;
                }
                b16[n16++] = (unsigned char) cp, b16[n16++] = 0;
                b32[n32++] = 0, b32[n32++] = 0, b32[n32++] = 0, b32[n32++] = (unsigned char) cp;
        }
        ASSERT_OK(hub_msg_new(b16, n16, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-16"));
        ctx = HUB_COND_CTX_INIT(m, NULL);
        COND("$body.v = 'é'", &ctx, HUB_TRUE);
        hub_cond_ctx_done(&ctx);
        hub_msg_unref(m);
        ASSERT_OK(hub_msg_new(b32, n32, HUB_MSG_D2C_MAX_SIZE, &m));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json"));
        ASSERT_OK(hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-32"));
        ctx = HUB_COND_CTX_INIT(m, NULL);
        COND("$body.v = '\\u00e9'", &ctx, HUB_TRUE);
        hub_cond_ctx_done(&ctx);
        hub_msg_unref(m);

        json_decref(twin);
}

/* ---- queries over generated twins ---------------------------------------------------- */

#define N_TWINS 50

static json_t *twins[N_TWINS];

static const char *cfg_status(int i) {
        return i % 10 < 3 ? "Success" : i % 10 < 5 ? "Pending" : "Failed";
}

static void make_twins(void) {
        for (int i = 0; i < N_TWINS; i++) {
                char id[16];
                snprintf(id, sizeof id, "dev%02d", i);
                json_t *reported = json_pack("{s:{s:s},s:i,s:o}", "telemetryConfig", "status", cfg_status(i),
                                             "battery", i * 2, "fw", i % 7 == 0 ? json_null() : json_string("1.0"));
                if (i < 10)
                        json_object_set_new(reported, "optional", json_true());
                twins[i] = json_pack("{s:s,s:s,s:s,s:i,s:{s:s,s:i},s:{s:{s:i,s:i},s:o}}", "deviceId", id, "status",
                                     i % 5 == 0 ? "disabled" : "enabled", "connectionState", "Disconnected",
                                     "version", i + 1, "tags", "site", i % 3 == 0 ? "A" : i % 3 == 1 ? "B" : "C",
                                     "floor", i % 4, "properties", "desired", "telemetryInterval", 10 + (i % 2) * 5,
                                     "$version", 1, "reported", reported);
                ASSERT_NOT_NULL(twins[i]);
        }
}

/* Runs text over the twins: rows (plain) or finish rows (aggregate). */
static json_t *run(const char *text) {
        struct hub_query *q = NULL;
        struct hub_query_exec *x = NULL;
        struct hub_query_error err;
        json_t *rows = json_array();
        int r = hub_query_parse(text, &q, &err);
        if (r < 0)
                TEST_FAIL("parse(\"%s\") = %d: %u: %s", text, r, err.offset, err.message);
        ASSERT_OK(hub_query_exec_new(q, &x));
        for (int i = 0; i < N_TWINS; i++) {
                json_t *row = NULL;
                r = hub_query_exec_feed(x, twins[i], &row);
                ASSERT_OK(r);
                if (row) {
                        ASSERT_FALSE(hub_query_is_aggregate(q));
                        json_array_append_new(rows, row);
                }
                if (r == 1) {
                        ASSERT_EQ(json_array_size(rows), hub_query_top(q));
                        /* nothing more once TOP is reached */
                        ASSERT_EQ(hub_query_exec_feed(x, twins[0], &row), 1);
                        ASSERT_NULL(row);
                        break;
                }
        }
        json_t *agg = NULL;
        ASSERT_OK(hub_query_exec_finish(x, &agg));
        if (hub_query_is_aggregate(q)) {
                ASSERT_EQ(json_array_size(rows), 0);
                json_decref(rows);
                rows = agg;
        } else {
                ASSERT_EQ(json_array_size(agg), 0);
                json_decref(agg);
        }
        hub_query_exec_free(x);
        hub_query_free(q);
        return rows;
}

static size_t count(const char *text) {
        json_t *rows = run(text);
        size_t n = json_array_size(rows);
        json_decref(rows);
        return n;
}

static void expect_rows(const char *text, const char *expected_json) {
        json_t *rows = run(text);
        json_t *exp = json_loads(expected_json, 0, NULL);
        ASSERT_NOT_NULL(exp);
        if (!json_equal(rows, exp)) {
                char *s = json_dumps(rows, JSON_COMPACT);
                TEST_FAIL("%s\n  got      %s\n  expected %s", text, s, expected_json);
        }
        json_decref(rows);
        json_decref(exp);
}

static void test_queries(void) {
        make_twins();

        ASSERT_EQ(count("SELECT * FROM devices"), 50);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.site = 'A'"), 17);
        ASSERT_EQ(count("select * from DEVICES where Tags.Site = 'A'"), 17);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.site = 'A' AND status = 'disabled'"), 4); /* 0,15,30,45 */
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.site = 'A' OR tags.floor = 1"), 17 + 13 - 4);
        ASSERT_EQ(count("SELECT * FROM devices WHERE NOT tags.site = 'A'"), 33); /* SQL precedence */
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.desired.telemetryInterval = 15"), 25);
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.telemetryConfig.status = 'Pending'"), 10);
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.battery >= 90"), 5);
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.battery = 0x10"), 1);
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.battery / 2 + 1 > 45"), 5);
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.battery % 20 = 0"), 5);
        /* IS_DEFINED is true on null; comparisons with null are undefined */
        ASSERT_EQ(count("SELECT * FROM devices WHERE IS_DEFINED(properties.reported.fw)"), 50);
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.fw = null"), 0);
        ASSERT_EQ(count("SELECT * FROM devices WHERE is_null(properties.reported.fw)"), 8); /* i % 7 == 0 */
        ASSERT_EQ(count("SELECT * FROM devices WHERE IS_DEFINED(properties.reported.optional)"), 10);
        ASSERT_EQ(count("SELECT * FROM devices WHERE NOT IS_DEFINED(properties.reported.optional)"), 40);
        /* undefined is not true: neither the condition nor its negation holds */
        ASSERT_EQ(count("SELECT * FROM devices WHERE properties.reported.optional = true"), 10);
        ASSERT_EQ(count("SELECT * FROM devices WHERE NOT (properties.reported.optional = true)"), 0);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.site IN ['A', 'B']"), 34);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.site NIN ['A', 'B']"), 16);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.floor IN [0, -1, 3]"), 25);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.nope NIN ['A']"), 0);
        ASSERT_EQ(count("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'dev4')"), 10);
        ASSERT_EQ(count("SELECT * FROM devices WHERE ENDSWITH(deviceId, '7')"), 5);
        ASSERT_EQ(count("SELECT * FROM devices WHERE CONTAINS(deviceId, 'v1')"), 10);
        ASSERT_EQ(count("SELECT * FROM devices WHERE LOWER(status) = 'enabled' AND LENGTH(deviceId) = 5"), 40);
        ASSERT_EQ(count("SELECT * FROM devices WHERE SUBSTRING(deviceId, 3) = '07' OR INDEX_OF(deviceId, '08') = 3"), 2);
        ASSERT_EQ(count("SELECT * FROM devices WHERE CONCAT(tags.site, status) = 'Adisabled'"), 4);
        ASSERT_EQ(count("SELECT * FROM devices WHERE UPPER(tags.site) = 'a'"), 0);
        ASSERT_EQ(count("SELECT * FROM devices WHERE tags.site = 1"), 0); /* type mismatch */

        /* TOP */
        ASSERT_EQ(count("SELECT TOP 5 * FROM devices"), 5);
        ASSERT_EQ(count("SELECT TOP 5 deviceId FROM devices WHERE tags.site = 'B'"), 5);
        ASSERT_EQ(count("SELECT TOP 100 * FROM devices"), 50);

        /* projections: aliases, case-insensitive names keep the document's spelling,
         * undefined values are omitted, unnamed expressions are $1, $2… */
        expect_rows("SELECT DeviceId, Tags.Site AS s, properties.reported.optional FROM devices "
                    "WHERE properties.reported.battery >= 16 AND properties.reported.battery <= 20",
                    "[{\"deviceId\":\"dev08\",\"s\":\"C\",\"optional\":true},"
                    "{\"deviceId\":\"dev09\",\"s\":\"A\",\"optional\":true},{\"deviceId\":\"dev10\",\"s\":\"B\"}]");
        expect_rows("SELECT deviceId, properties.reported.battery / 4 AS q, LOWER(deviceId), properties.reported.battery + 1 "
                    "FROM devices WHERE deviceId = 'dev03'",
                    "[{\"deviceId\":\"dev03\",\"q\":1.5,\"$1\":\"dev03\",\"$2\":7}]");
        expect_rows("SELECT properties.reported.telemetryConfig FROM devices WHERE deviceId = 'dev00'",
                    "[{\"telemetryConfig\":{\"status\":\"Success\"}}]");
        /* SELECT * returns the documents */
        json_t *rows = run("SELECT * FROM devices WHERE deviceId = 'dev42'");
        ASSERT_EQ(json_array_size(rows), 1);
        ASSERT_TRUE(json_equal(json_array_get(rows, 0), twins[42]));
        json_decref(rows);

        /* aggregates */
        expect_rows("SELECT COUNT() AS n FROM devices WHERE status = 'disabled'", "[{\"n\":10}]");
        expect_rows("SELECT COUNT() AS n FROM devices WHERE status = 'nope'", "[{\"n\":0}]");
        expect_rows("SELECT COUNT() AS n, SUM(properties.reported.battery) AS s, AVG(properties.reported.battery) AS a, "
                    "MIN(properties.reported.battery) AS lo, MAX(properties.reported.battery) AS hi FROM devices",
                    "[{\"n\":50,\"s\":2450,\"a\":49,\"lo\":0,\"hi\":98}]");
        expect_rows("SELECT MIN(deviceId) AS first, MAX(deviceId) AS last, AVG(tags.nope) AS none FROM devices",
                    "[{\"first\":\"dev00\",\"last\":\"dev49\"}]");
        expect_rows("SELECT COUNT(), SUM(tags.floor) FROM devices WHERE tags.site = 'C'", "[{\"$1\":16,\"$2\":24}]");

        /* GROUP BY: the reference's example and its output shape */
        expect_rows("SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices "
                    "FROM devices GROUP BY properties.reported.telemetryConfig.status",
                    "[{\"numberOfDevices\":15,\"status\":\"Success\"},{\"numberOfDevices\":10,\"status\":\"Pending\"},"
                    "{\"numberOfDevices\":25,\"status\":\"Failed\"}]");
        expect_rows("SELECT tags.site, status, COUNT() AS n FROM devices WHERE tags.floor = 0 GROUP BY tags.site, status",
                    /* floor 0: i = 0, 4, …, 48; site i % 3, disabled when i % 5 == 0 */
                    "[{\"site\":\"A\",\"status\":\"disabled\",\"n\":1},{\"site\":\"B\",\"status\":\"enabled\",\"n\":3},"
                    "{\"site\":\"C\",\"status\":\"enabled\",\"n\":3},{\"site\":\"A\",\"status\":\"enabled\",\"n\":4},"
                    "{\"site\":\"C\",\"status\":\"disabled\",\"n\":1},{\"site\":\"B\",\"status\":\"disabled\",\"n\":1}]");
        expect_rows("SELECT TOP 2 tags.site, AVG(properties.reported.battery) AS avgBattery FROM devices GROUP BY tags.site",
                    "[{\"site\":\"A\",\"avgBattery\":48},{\"site\":\"B\",\"avgBattery\":50}]");
        /* GROUP BY with plain projections only: distinct values */
        expect_rows("SELECT tags.site FROM devices GROUP BY tags.site", "[{\"site\":\"A\"},{\"site\":\"B\"},{\"site\":\"C\"}]");
        /* group keys: undefined and missing values group together, numbers by value */
        expect_rows("SELECT COUNT() AS n FROM devices GROUP BY properties.reported.optional",
                    "[{\"n\":10},{\"n\":40}]");
        expect_rows("SELECT COUNT() AS n FROM devices WHERE properties.reported.battery < 4 "
                    "GROUP BY properties.reported.battery / 2 - properties.reported.battery / 2",
                    "[{\"n\":2}]");

        /* accessors */
        struct hub_query *q = NULL;
        ASSERT_OK(hub_query_parse("SELECT TOP 3 * FROM devices.modules WHERE moduleId = 'm'", &q, NULL));
        ASSERT_EQ(hub_query_from(q), HUB_QUERY_FROM_DEVICES_MODULES);
        ASSERT_EQ(hub_query_top(q), 3);
        ASSERT_TRUE(hub_query_selects_all(q));
        ASSERT_FALSE(hub_query_is_aggregate(q));
        ASSERT_NOT_NULL(hub_query_where(q));
        struct hub_query_exec *x = NULL;
        ASSERT_OK(hub_query_exec_new(q, &x));
        json_t *row = NULL;
        json_t *arr = json_array();
        ASSERT_ERR(hub_query_exec_feed(x, arr, &row), -EINVAL);
        ASSERT_ERR(hub_query_exec_feed(x, NULL, &row), -EINVAL);
        json_decref(arr);
        hub_query_exec_free(x);
        hub_query_free(q);
        ASSERT_OK(hub_query_parse("SELECT deviceId FROM devices", &q, NULL));
        ASSERT_NULL(hub_query_where(q));
        ASSERT_EQ(hub_query_from(q), HUB_QUERY_FROM_DEVICES);
        ASSERT_EQ(hub_query_top(q), 0);
        ASSERT_FALSE(hub_query_selects_all(q));
        hub_query_free(q);

        for (int i = 0; i < N_TWINS; i++)
                json_decref(twins[i]);
}

int main(void) {
        TEST_RUN(test_query_errors);
        TEST_RUN(test_condition_errors);
        TEST_RUN(test_three_valued_logic);
        TEST_RUN(test_operators);
        TEST_RUN(test_functions);
        TEST_RUN(test_string_cap);
        TEST_RUN(test_message_refs);
        TEST_RUN(test_queries);
        return 0;
}
