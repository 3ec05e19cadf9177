/* SPDX-License-Identifier: MIT */
/* The query and condition parsers take text from the service API and from configuration:
 * every input is parsed both as a query and as a routing condition; whatever parses is
 * executed over fixed twin documents and evaluated against a fixed message. Nothing may
 * crash, leak or recurse without bound; a rejected input must come with a message and a
 * position inside the text. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/msg.h"
#include "hub/query.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char twin_text[] =
        "{\"deviceId\":\"dev1\",\"status\":\"enabled\",\"version\":3,"
        "\"tags\":{\"site\":\"A\",\"floor\":2,\"list\":[1,\"x\",{\"y\":null}]},"
        "\"properties\":{\"desired\":{\"rate\":10,\"$version\":2},"
        "\"reported\":{\"telemetryConfig\":{\"status\":\"Success\"},\"battery\":55,\"fw\":null,\"$version\":4}}}";
static const char body_text[] = "{\"level\":\"alarm\",\"a\":{\"b\":[{\"c\":5}]},\"t\":21.5,\"s\":\"text\"}";

static void check_error(int r, const struct hub_query_error *err, size_t len) {
        if (r != -EINVAL && r != -E2BIG && r != -ENOMEM)
                abort();
        if (r != -ENOMEM && (err->message[0] == '\0' || err->offset > len || err->line < 1 || err->column < 1))
                abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct hub_query_error err;
        struct hub_query *q = NULL;
        struct hub_condition *c = NULL;
        struct hub_msg *m = NULL;
        json_t *twins[2];
        char *text;
        int r;

        if (size > 3 * HUB_QUERY_MAX_LEN)
                return 0;
        text = malloc(size + 1);
        if (!text)
                return 0;
        memcpy(text, data, size);
        text[size] = '\0';

        twins[0] = json_loads(twin_text, 0, NULL);
        twins[1] = json_pack("{s:s,s:{s:s},s:{s:{},s:{s:i}}}", "deviceId", "dev2", "tags", "site", "B",
                             "properties", "desired", "reported", "battery", 7);
        if (!twins[0] || !twins[1])
                abort();
        if (hub_msg_new(body_text, strlen(body_text), HUB_MSG_D2C_MAX_SIZE, &m) < 0 ||
            hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json; charset=utf-8") < 0 ||
            hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8") < 0 ||
            hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, "m1") < 0 ||
            hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, "dev1") < 0 ||
            hub_msg_set_prop(m, "severity", "high") < 0 || hub_msg_set_prop(m, "temp", "25") < 0)
                abort();

        r = hub_query_parse(text, &q, &err);
        if (r < 0) {
                check_error(r, &err, strlen(text));
                if (q)
                        abort();
        } else {
                struct hub_query_exec *x = NULL;
                json_t *rows = NULL;
                if (hub_query_exec_new(q, &x) < 0)
                        abort();
                for (int round = 0; round < 3; round++)
                        for (size_t i = 0; i < 2; i++) {
                                json_t *row = NULL;
                                r = hub_query_exec_feed(x, twins[i], &row);
                                if (r < 0 && r != -ENOMEM && r != -E2BIG)
                                        abort();
                                if (row && hub_query_is_aggregate(q))
                                        abort();
                                json_decref(row);
                        }
                if (hub_query_exec_finish(x, &rows) == 0) {
                        if (!json_is_array(rows))
                                abort();
                        char *s = json_dumps(rows, JSON_COMPACT);
                        free(s);
                        json_decref(rows);
                }
                hub_query_exec_free(x);
                hub_query_free(q);
        }

        r = hub_condition_parse(text, &c, &err);
        if (r < 0) {
                check_error(r, &err, strlen(text));
                if (c)
                        abort();
        } else {
                struct hub_cond_ctx ctx = HUB_COND_CTX_INIT(m, twins[0]);
                enum hub_tristate t1 = hub_condition_eval(c, &ctx);
                enum hub_tristate t2 = hub_condition_eval(c, &ctx); /* cached body: same result */
                if (t1 != t2)
                        abort();
                hub_cond_ctx_done(&ctx);
                (void) hub_condition_eval(c, NULL);
                (void) hub_condition_eval_doc(c, twins[1]);
                hub_condition_free(c);
        }

        hub_msg_unref(m);
        json_decref(twins[0]);
        json_decref(twins[1]);
        free(text);
        return 0;
}
