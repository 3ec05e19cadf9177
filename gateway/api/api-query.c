/* SPDX-License-Identifier: MIT */
/* POST /devices/query (reference §5.5): the query language over twins, streamed from the store
 * with hub_twin_scan() a chunk at a time, so a million twins are never in memory at once.
 *
 * Paging: x-ms-max-item-count (1..1000, default 100) rows per page; when more may follow, the
 * answer carries x-ms-continuation, an opaque token (base64 of {"a":<last device id
 * scanned>,"n":<rows already emitted, for TOP>} or, for aggregates, {"o":<offset>}) that the
 * next request sends back. A page scans at most QUERY_SCAN_BUDGET twins: a selective WHERE
 * over a large registry may answer a short (even empty) page with a continuation rather than
 * block the loop. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/base64.h>

#include "api/api-internal.h"
#include "hub/json-dump.h"
#include "hub/query.h"
#include "hub/registry.h"
#include "hub/twin.h"

#define QUERY_PAGE_DEFAULT 100u
#define QUERY_PAGE_MAX 1000u
#define QUERY_CHUNK 1000u
#define QUERY_SCAN_BUDGET 50000u

struct scan {
        struct hub_query_exec *x;
        json_t *rows;
        size_t want;
        size_t scanned;
        bool stopped;
        bool top_reached;
        int err;
        char last_id[HUB_DEVICE_ID_MAX + 1];
};

static int scan_cb(void *ud, const json_t *twin) {
        struct scan *s = ud;
        json_t *row = NULL;
        const char *id = json_string_value(json_object_get(twin, "deviceId"));
        s->scanned++;
        if (id)
                snprintf(s->last_id, sizeof s->last_id, "%s", id);
        int r = hub_query_exec_feed(s->x, twin, s->rows ? &row : NULL);
        if (r < 0) {
                s->err = r;
                return r;
        }
        if (row)
                json_array_append_new(s->rows, row);
        if (r == 1) {
                s->top_reached = true;
                s->stopped = true;
                return 1;
        }
        if (s->rows && json_array_size(s->rows) >= s->want) {
                s->stopped = true;
                return 1;
        }
        return 0;
}

/* A query runs a chunk of QUERY_CHUNK twins per turn of the event loop, so a long scan (an
 * aggregate over a million twins) never holds the loop for long. */
struct qstate {
        struct hub_query *q;
        struct hub_query_exec *x;
        json_t *hdr;
        json_t *cont;
        sd_event_source *src;
        struct scan s;
        char cursor[HUB_DEVICE_ID_MAX + 1];
        uint64_t emitted;
        unsigned top;
        uint64_t page;
        bool aggregate;
};

static void qstate_free(void *p) {
        struct qstate *st = p;
        sd_event_source_disable_unref(st->src);
        hub_query_exec_free(st->x);
        hub_query_free(st->q);
        json_decref(st->hdr);
        json_decref(st->cont);
        json_decref(st->s.rows);
        free(st);
}

static char *token_encode(json_t *j) {
        _cleanup_free_ char *text = hub_json_dumps(j, JSON_COMPACT);
        json_decref(j);
        if (!text)
                return NULL;
        size_t olen = 0, l = strlen(text);
        size_t cap = 4 * ((l + 2) / 3) + 1;
        unsigned char *out = malloc(cap);
        if (!out || mbedtls_base64_encode(out, cap, &olen, (const unsigned char *) text, l) != 0) {
                free(out);
                return NULL;
        }
        out[olen] = 0;
        return (char *) out;
}

static json_t *token_decode(const char *tok) {
        unsigned char buf[1024];
        size_t olen = 0;
        size_t l = strlen(tok);
        if (l == 0 || l > 1300 ||
            mbedtls_base64_decode(buf, sizeof buf - 1, &olen, (const unsigned char *) tok, l) != 0)
                return NULL;
        json_t *j = json_loadb((const char *) buf, olen, 0, NULL);
        if (!json_is_object(j)) {
                json_decref(j);
                return NULL;
        }
        return j;
}

static void finish_plain(struct api_req *req, struct qstate *st, bool at_end) {
        json_t *rows = TAKE_PTR(st->s.rows);
        json_t *hdr = TAKE_PTR(st->hdr);
        st->emitted += json_array_size(rows);
        bool more = !at_end && !st->s.top_reached && !(st->top && st->emitted >= st->top);
        if (more) {
                char *tok = token_encode(json_pack("{s:s, s:I}", "a", st->s.last_id, "n", (json_int_t) st->emitted));
                if (tok)
                        json_object_set_new(hdr, "x-ms-continuation", json_string(tok));
                free(tok);
        }
        api_reply_json(req, 200, rows, hdr);
}

static void finish_aggregate(struct api_req *req, struct qstate *st) {
        json_t *rows = NULL;
        int r = hub_query_exec_finish(st->x, &rows);
        if (r < 0) {
                api_reply_errno(req, r, "Query");
                return;
        }
        size_t off = st->cont ? (size_t) json_integer_value(json_object_get(st->cont, "o")) : 0;
        json_t *out = json_array();
        for (size_t i = off; i < json_array_size(rows) && json_array_size(out) < st->page; i++)
                json_array_append(out, json_array_get(rows, i));
        json_t *hdr = TAKE_PTR(st->hdr);
        if (off + json_array_size(out) < json_array_size(rows)) {
                char *tok = token_encode(json_pack("{s:I}", "o", (json_int_t) (off + json_array_size(out))));
                if (tok)
                        json_object_set_new(hdr, "x-ms-continuation", json_string(tok));
                free(tok);
        }
        json_decref(rows);
        api_reply_json(req, 200, out, hdr);
}

static int query_step(sd_event_source *src, void *userdata) {
        struct api_req *req = userdata;
        struct qstate *st = req->state;

        if (req->detached) { /* nobody waits for the answer any more */
                api_reply(req, 499, NULL, NULL, NULL, 0);
                return 0;
        }
        st->s.stopped = false;
        int n = hub_twin_scan(api_hub(req)->twins, st->cursor[0] ? st->cursor : NULL, QUERY_CHUNK, scan_cb, &st->s);
        if (st->s.err < 0 || n < 0) {
                int r = st->s.err < 0 ? st->s.err : n;
                if (r == -E2BIG)
                        api_reply_error(req, 400, "ArgumentInvalid", "Query failed: more than %u groups", HUB_QUERY_MAX_GROUPS);
                else
                        api_reply_errno(req, r, "Query");
                return 0;
        }
        if (st->s.stopped) {
                finish_plain(req, st, false);
                return 0;
        }
        if ((size_t) n < QUERY_CHUNK) {
                if (st->aggregate)
                        finish_aggregate(req, st);
                else
                        finish_plain(req, st, true);
                return 0;
        }
        snprintf(st->cursor, sizeof st->cursor, "%s", st->s.last_id);
        if (!st->aggregate && st->s.scanned >= QUERY_SCAN_BUDGET) {
                finish_plain(req, st, false);
                return 0;
        }
        (void) sd_event_source_set_enabled(src, SD_EVENT_ONESHOT);
        return 0;
}

void api_query(struct api_req *req) {
        _cleanup_(json_decrefp) json_t *body = NULL, *cont = NULL;
        _cleanup_(hub_query_freep) struct hub_query *q = NULL;
        _cleanup_(hub_query_exec_freep) struct hub_query_exec *x = NULL;
        static const char *const fields[] = { "query", NULL };
        struct hub_query_error qe = { 0 };
        uint64_t page = QUERY_PAGE_DEFAULT;
        int r;

        const char *mic = api_header(req, "x-ms-max-item-count");
        if (mic) {
                char *end;
                errno = 0;
                unsigned long long v = strtoull(mic, &end, 10);
                if (!*mic || *mic == '-' || *end || errno || v < 1 || v > QUERY_PAGE_MAX) {
                        api_reply_error(req, 400, "ArgumentInvalid", "x-ms-max-item-count must be from 1 to %u",
                                        QUERY_PAGE_MAX);
                        return;
                }
                page = v;
        }
        const char *ct = api_header(req, "x-ms-continuation");
        if (ct && *ct) {
                cont = token_decode(ct);
                if (!cont) {
                        api_reply_error(req, 400, "ArgumentInvalid", "x-ms-continuation is not a token this hub issued");
                        return;
                }
        }
        if (api_body_json(req, &body) < 0)
                return;
        if (!json_is_object(body)) {
                api_reply_error(req, 400, "ArgumentInvalid", "The body must be {\"query\":\"SELECT ...\"}");
                return;
        }
        if (api_check_fields(req, body, fields, "the query request") < 0)
                return;
        const char *text = json_string_value(json_object_get(body, "query"));
        if (!text) {
                api_reply_error(req, 400, "ArgumentInvalid", "query is required and must be a string");
                return;
        }
        r = hub_query_parse(text, &q, &qe);
        if (r == -EINVAL || r == -E2BIG) {
                api_reply_error(req, 400, "ArgumentInvalid", "Query syntax error at line %u, column %u (offset %u): %s",
                                qe.line, qe.column, qe.offset, qe.message);
                return;
        }
        if (r < 0) {
                api_reply_errno(req, r, "Query");
                return;
        }
        r = hub_query_exec_new(q, &x);
        if (r < 0) {
                api_reply_errno(req, r, "Query");
                return;
        }
        bool aggregate = hub_query_is_aggregate(q);
        const char *item_type = hub_query_selects_all(q) && !aggregate ? "twin" : "raw";
        json_t *hdr = json_pack("{s:s}", "x-ms-item-type", item_type);

        if (hub_query_from(q) == HUB_QUERY_FROM_DEVICES_MODULES) {
                /* The registry has no module identities. */
                json_t *rows = NULL;
                if (aggregate)
                        (void) hub_query_exec_finish(x, &rows);
                api_reply_json(req, 200, rows ? rows : json_array(), hdr);
                return;
        }

        struct qstate *st = calloc(1, sizeof *st);
        if (!st) {
                json_decref(hdr);
                api_reply_errno(req, -ENOMEM, "Query");
                return;
        }
        req->state = st;
        req->state_free = qstate_free;
        st->hdr = hdr;
        st->page = page;
        st->aggregate = aggregate;
        st->top = hub_query_top(q);
        if (!aggregate && cont) {
                const char *after = json_string_value(json_object_get(cont, "a"));
                snprintf(st->cursor, sizeof st->cursor, "%s", after ? after : "");
                st->emitted = (uint64_t) json_integer_value(json_object_get(cont, "n"));
        }
        st->s.x = x;
        if (!aggregate) {
                st->s.want = page;
                if (st->top) {
                        if (st->emitted >= st->top) {
                                api_reply_json(req, 200, json_array(), TAKE_PTR(st->hdr));
                                return;
                        }
                        st->s.want = MIN(st->s.want, st->top - st->emitted);
                }
                st->s.rows = json_array();
                if (!st->s.rows) {
                        api_reply_errno(req, -ENOMEM, "Query");
                        return;
                }
        }
        st->q = TAKE_PTR(q);
        st->x = TAKE_PTR(x);
        st->cont = TAKE_PTR(cont);
        r = sd_event_add_defer(api_event(req), &st->src, query_step, req);
        if (r >= 0)
                r = sd_event_source_set_enabled(st->src, SD_EVENT_ONESHOT);
        if (r >= 0)
                r = api_req_go_async(req, NULL);
        if (r < 0) {
                api_reply_errno(req, r, "Query");
                return;
        }
        req->loop_driven = true;
}
