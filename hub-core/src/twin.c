/* SPDX-License-Identifier: MIT */
/* Device twins on the store (reference §6, §5.3, §2.9, §8.7): the `twins` table, the full
 * and device views, and changes as store writes.
 *
 * A change is a write function run on the store's commit thread inside the group
 * transaction: it reads the device and its twin row (a LEFT JOIN: a device without a row has
 * the initial twin), checks the precondition, applies the change with the pure functions of
 * twin-patch.c (which check every limit on the result), writes the row and builds everything
 * the completion needs (the new full twin, the event body, the desired notification) from
 * what it wrote. Because each write re-reads the row inside the transaction, changes
 * serialize in submission order whatever the grouping. The completion runs on the owner's
 * thread after the commit and only then tells anyone (event sink, desired handler, caller).
 *
 * The identity part of the full twin comes straight from the `devices` table (schema of
 * store migration 1) in the same query, so a scan over a million twins is one statement. */

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/json-dump.h"
#include "hub/msg.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/twin.h"
#include "store-internal.h"
#include "store-util.h"
#include "store-schema.h"

/* Migration 2. module_id is '' for device twins; module twins will use the module's id
 * (the foreign key on devices keeps working: a module belongs to a device). */
const char hub_twin_schema_sql[] =
        "CREATE TABLE twins (\n"
        "  device_id TEXT NOT NULL REFERENCES devices(device_id) ON DELETE CASCADE,\n"
        "  module_id TEXT NOT NULL DEFAULT '',\n"
        "  version INTEGER NOT NULL,\n"
        "  etag_counter INTEGER NOT NULL,\n"
        "  model_id TEXT NOT NULL DEFAULT '',\n"
        "  tags TEXT NOT NULL DEFAULT '{}',\n"
        "  desired TEXT NOT NULL DEFAULT '{}',\n"
        "  desired_version INTEGER NOT NULL,\n"
        "  desired_meta TEXT NOT NULL,\n"
        "  reported TEXT NOT NULL DEFAULT '{}',\n"
        "  reported_version INTEGER NOT NULL,\n"
        "  reported_meta TEXT NOT NULL,\n"
        "  PRIMARY KEY (device_id, module_id)\n"
        ") WITHOUT ROWID;\n";

struct hub_twins {
        struct hub_store *store;
        const struct hub_clock *clock;
        const struct hub_log *log;

        void (*event_fn)(void *ud, struct hub_msg *ev);
        void *event_ud;
        void (*desired_fn)(void *ud, const char *device_id, const json_t *patch, int64_t version);
        void *desired_ud;

        unsigned n_pending; /* submitted changes whose completion has not run */
        sqlite3_stmt *st_get; /* cached, read connection */
};

#define ROW_COLUMNS                                                                                        \
        "d.device_id, d.etag_version, d.status, d.status_reason, d.status_updated, d.auth_type, "          \
        "d.primary_thumbprint, d.secondary_thumbprint, d.iot_edge, d.connection_state, d.last_activity, "  \
        "d.c2d_count, d.created, "                                                                         \
        "t.version, t.etag_counter, t.model_id, t.tags, t.desired, t.desired_version, t.desired_meta, "    \
        "t.reported, t.reported_version, t.reported_meta"
#define ROW_FROM " FROM devices d LEFT JOIN twins t ON t.device_id = d.device_id AND t.module_id = ''"

enum {
        COL_DEVICE_ID,
        COL_DEVICE_ETAG,
        COL_STATUS,
        COL_STATUS_REASON,
        COL_STATUS_UPDATED,
        COL_AUTH_TYPE,
        COL_PRIMARY_TP,
        COL_SECONDARY_TP,
        COL_IOT_EDGE,
        COL_CONN_STATE,
        COL_LAST_ACTIVITY,
        COL_C2D_COUNT,
        COL_CREATED,
        COL_VERSION,
        COL_ETAG_COUNTER,
        COL_MODEL_ID,
        COL_TAGS,
        COL_DESIRED,
        COL_DESIRED_VERSION,
        COL_DESIRED_META,
        COL_REPORTED,
        COL_REPORTED_VERSION,
        COL_REPORTED_META,
};

/* A device with its twin, decoded from one row. */
struct twin_row {
        struct hub_device dev; /* identity fields only: no keys are selected */
        bool exists;           /* a twins row exists */
        int64_t version, etag_counter, desired_version, reported_version;
        char model_id[129];
        json_t *tags, *desired, *desired_meta, *reported, *reported_meta;
};

static void twin_row_done(struct twin_row *r) {
        hub_device_done(&r->dev);
        json_decref(r->tags);
        json_decref(r->desired);
        json_decref(r->desired_meta);
        json_decref(r->reported);
        json_decref(r->reported_meta);
        *r = (struct twin_row) {};
}

char *hub_twin_etag(uint64_t counter, char buf[static 16]) {
        static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        uint8_t in[9] = {};
        size_t o = 0;

        for (int i = 0; i < 8; i++)
                in[i] = (uint8_t) (counter >> (56 - 8 * i));
        for (size_t i = 0; i < 9; i += 3) {
                uint32_t v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
                buf[o++] = b64[(v >> 18) & 63];
                buf[o++] = b64[(v >> 12) & 63];
                buf[o++] = b64[(v >> 6) & 63];
                buf[o++] = b64[v & 63];
        }
        buf[11] = '='; /* 8 bytes: the last group holds 2 bytes, one pad character */
        buf[12] = '\0';
        return buf;
}

/* ---- row decoding ------------------------------------------------------------------------ */

static int col_json(sqlite3_stmt *st, int i, json_t **ret) {
        const void *t = sqlite3_column_blob(st, i);
        int n = sqlite3_column_bytes(st, i);
        json_t *j;

        if (!t)
                return -EBADMSG;
        j = json_loadb(t, (size_t) n, 0, NULL);
        if (!json_is_object(j)) {
                json_decref(j);
                return -EBADMSG;
        }
        *ret = j;
        return 0;
}

static json_t *initial_meta(uint64_t created, bool with_version) {
        char ts[32];

        hub_time_format_iso8601(created, ts);
        if (with_version)
                return json_pack("{s:s, s:I}", "$lastUpdated", ts, "$lastUpdatedVersion", (json_int_t) 1);
        return json_pack("{s:s}", "$lastUpdated", ts);
}

static int row_decode(sqlite3_stmt *st, struct twin_row *ret) {
        struct twin_row r = {};
        bool null_reason = true;
        int k;

        if ((k = hub_store_col_text(st, COL_DEVICE_ID, r.dev.device_id, sizeof r.dev.device_id, NULL)) < 0 ||
            (k = hub_store_col_text(st, COL_STATUS_REASON, r.dev.status_reason, sizeof r.dev.status_reason, &null_reason)) < 0 ||
            (k = hub_store_col_text(st, COL_PRIMARY_TP, r.dev.primary_thumbprint, sizeof r.dev.primary_thumbprint, NULL)) < 0 ||
            (k = hub_store_col_text(st, COL_SECONDARY_TP, r.dev.secondary_thumbprint, sizeof r.dev.secondary_thumbprint,
                          NULL)) < 0)
                goto fail;
        r.dev.etag_version = (uint64_t) sqlite3_column_int64(st, COL_DEVICE_ETAG);
        r.dev.status = sqlite3_column_int(st, COL_STATUS) == 0 ? HUB_DEVICE_ENABLED : HUB_DEVICE_DISABLED;
        r.dev.has_status_reason = !null_reason;
        r.dev.status_updated_usec = (uint64_t) sqlite3_column_int64(st, COL_STATUS_UPDATED);
        switch (sqlite3_column_int(st, COL_AUTH_TYPE)) {
        case 0: r.dev.auth_type = HUB_AUTH_TYPE_SAS; break;
        case 1: r.dev.auth_type = HUB_AUTH_TYPE_SELF_SIGNED; break;
        case 2: r.dev.auth_type = HUB_AUTH_TYPE_CA; break;
        default: r.dev.auth_type = HUB_AUTH_TYPE_NONE; break;
        }
        r.dev.iot_edge = sqlite3_column_int(st, COL_IOT_EDGE) != 0;
        r.dev.connection_state = sqlite3_column_int(st, COL_CONN_STATE) ? HUB_CONNECTED : HUB_DISCONNECTED;
        r.dev.last_activity_usec = (uint64_t) sqlite3_column_int64(st, COL_LAST_ACTIVITY);
        r.dev.c2d_count = (uint32_t) sqlite3_column_int64(st, COL_C2D_COUNT);
        r.dev.created_usec = (uint64_t) sqlite3_column_int64(st, COL_CREATED);

        if (sqlite3_column_type(st, COL_VERSION) == SQLITE_NULL) {
                /* No row yet: the initial twin. */
                r.exists = false;
                r.version = r.etag_counter = r.desired_version = r.reported_version = 1;
                r.tags = json_object();
                r.desired = json_object();
                r.reported = json_object();
                r.desired_meta = initial_meta(r.dev.created_usec, true);
                r.reported_meta = initial_meta(r.dev.created_usec, false);
                if (!r.tags || !r.desired || !r.reported || !r.desired_meta || !r.reported_meta) {
                        k = -ENOMEM;
                        goto fail;
                }
        } else {
                r.exists = true;
                r.version = sqlite3_column_int64(st, COL_VERSION);
                r.etag_counter = sqlite3_column_int64(st, COL_ETAG_COUNTER);
                r.desired_version = sqlite3_column_int64(st, COL_DESIRED_VERSION);
                r.reported_version = sqlite3_column_int64(st, COL_REPORTED_VERSION);
                if ((k = hub_store_col_text(st, COL_MODEL_ID, r.model_id, sizeof r.model_id, NULL)) < 0 ||
                    (k = col_json(st, COL_TAGS, &r.tags)) < 0 || (k = col_json(st, COL_DESIRED, &r.desired)) < 0 ||
                    (k = col_json(st, COL_DESIRED_META, &r.desired_meta)) < 0 ||
                    (k = col_json(st, COL_REPORTED, &r.reported)) < 0 ||
                    (k = col_json(st, COL_REPORTED_META, &r.reported_meta)) < 0)
                        goto fail;
        }
        *ret = r;
        return 0;
fail:
        twin_row_done(&r);
        return k;
}

/* ---- JSON views -------------------------------------------------------------------------- */

static const char *auth_type_name(enum hub_auth_type a) {
        switch (a) {
        case HUB_AUTH_TYPE_SAS: return "sas";
        case HUB_AUTH_TYPE_SELF_SIGNED: return "selfSigned";
        case HUB_AUTH_TYPE_CA: return "certificateAuthority";
        default: return "none";
        }
}

/* A shallow copy of section with "$metadata" (when meta) and "$version" appended. */
static json_t *section_view(const json_t *section, const json_t *meta, int64_t version) {
        json_t *v = json_copy((json_t *) section);

        if (!v)
                return NULL;
        if ((meta && json_object_set_new(v, "$metadata", json_deep_copy(meta)) < 0) ||
            json_object_set_new(v, "$version", json_integer(version)) < 0) {
                json_decref(v);
                return NULL;
        }
        return v;
}

/* The full twin of §6.1, fields in the reference's order. */
static json_t *row_to_full(const struct twin_row *r) {
        char etag[16], dev_etag[32], status_time[32], activity[32];
        json_t *desired, *reported;

        desired = section_view(r->desired, r->desired_meta, r->desired_version);
        reported = section_view(r->reported, r->reported_meta, r->reported_version);
        if (!desired || !reported) {
                json_decref(desired);
                json_decref(reported);
                return NULL;
        }
        hub_twin_etag((uint64_t) r->etag_counter, etag);
        hub_device_etag(r->dev.etag_version, dev_etag);
        hub_time_format_iso8601(r->dev.status_updated_usec, status_time);
        hub_time_format_iso8601(r->dev.last_activity_usec, activity);
        return json_pack("{s:s, s:s, s:s, s:s, s:s?, s:s, s:s, s:s, s:I, s:s, s:{s:s?, s:s?}, s:s, s:I, s:{s:b}, "
                         "s:O, s:{s:o, s:o}}",
                         "deviceId", r->dev.device_id,
                         "etag", etag,
                         "deviceEtag", dev_etag,
                         "status", r->dev.status == HUB_DEVICE_ENABLED ? "enabled" : "disabled",
                         "statusReason", r->dev.has_status_reason ? r->dev.status_reason : NULL,
                         "statusUpdateTime", status_time,
                         "connectionState", r->dev.connection_state == HUB_CONNECTED ? "Connected" : "Disconnected",
                         "lastActivityTime", activity,
                         "cloudToDeviceMessageCount", (json_int_t) r->dev.c2d_count,
                         "authenticationType", auth_type_name(r->dev.auth_type),
                         "x509Thumbprint",
                         "primaryThumbprint", r->dev.primary_thumbprint[0] ? r->dev.primary_thumbprint : NULL,
                         "secondaryThumbprint", r->dev.secondary_thumbprint[0] ? r->dev.secondary_thumbprint : NULL,
                         "modelId", r->model_id,
                         "version", (json_int_t) r->version,
                         "capabilities", "iotEdge", r->dev.iot_edge,
                         "tags", r->tags,
                         "properties", "desired", desired, "reported", reported);
}

static json_t *row_to_device_view(const struct twin_row *r) {
        json_t *desired = section_view(r->desired, NULL, r->desired_version);
        json_t *reported = section_view(r->reported, NULL, r->reported_version);

        if (!desired || !reported) {
                json_decref(desired);
                json_decref(reported);
                return NULL;
        }
        return json_pack("{s:o, s:o}", "desired", desired, "reported", reported);
}

/* ---- module ------------------------------------------------------------------------------ */

int hub_twins_new(struct hub_store *store, const struct hub_clock *clock, const struct hub_log *log,
                  struct hub_twins **ret) {
        struct hub_twins *t;

        if (!store || !clock || !ret)
                return -EINVAL;
        t = calloc(1, sizeof *t);
        if (!t)
                return -ENOMEM;
        t->store = store;
        t->clock = clock;
        t->log = log;
        *ret = t;
        return 0;
}

struct hub_twins *hub_twins_free(struct hub_twins *t) {
        if (!t)
                return NULL;
        while (t->n_pending > 0) {
                struct pollfd p = { .fd = hub_store_get_fd(t->store), .events = POLLIN };
                if (p.fd < 0 || (poll(&p, 1, -1) < 0 && errno != EINTR))
                        break; /* cannot happen with a live store; do not spin */
                (void) hub_store_dispatch(t->store);
        }
        sqlite3_finalize(t->st_get);
        free(t);
        return NULL;
}

void hub_twins_set_event_sink(struct hub_twins *t, void (*fn)(void *ud, struct hub_msg *ev), void *ud) {
        if (!t)
                return;
        t->event_fn = fn;
        t->event_ud = ud;
}

void hub_twins_set_desired_handler(struct hub_twins *t,
                                   void (*fn)(void *ud, const char *device_id, const json_t *patch, int64_t version),
                                   void *ud) {
        if (!t)
                return;
        t->desired_fn = fn;
        t->desired_ud = ud;
}

/* ---- reads ------------------------------------------------------------------------------- */

static int row_decode_fn(sqlite3_stmt *st, void *ret) {
        return row_decode(st, ret);
}

static int read_row(struct hub_twins *t, const char *device_id, struct twin_row *ret) {
        int k;

        if (!t || !device_id || !hub_device_id_valid(device_id))
                return -EINVAL;
        k = hub_store_prepare_cached(t->store, &t->st_get, "SELECT " ROW_COLUMNS ROW_FROM " WHERE d.device_id = ?1");
        if (k < 0)
                return k;
        return hub_store_select_one(t->st_get, device_id, row_decode_fn, ret);
}

int hub_twin_get(struct hub_twins *t, const char *device_id, json_t **ret_full) {
        struct twin_row r;
        json_t *j;
        int k;

        if (!ret_full)
                return -EINVAL;
        k = read_row(t, device_id, &r);
        if (k < 0)
                return k;
        j = row_to_full(&r);
        twin_row_done(&r);
        if (!j)
                return -ENOMEM;
        *ret_full = j;
        return 0;
}

int hub_twin_get_device_view(struct hub_twins *t, const char *device_id, json_t **ret) {
        struct twin_row r;
        json_t *j;
        int k;

        if (!ret)
                return -EINVAL;
        k = read_row(t, device_id, &r);
        if (k < 0)
                return k;
        j = row_to_device_view(&r);
        twin_row_done(&r);
        if (!j)
                return -ENOMEM;
        *ret = j;
        return 0;
}

int hub_twin_scan(struct hub_twins *t, const char *after_id, size_t max, hub_twin_scan_fn cb, void *ud) {
        sqlite3_stmt *st = NULL;
        sqlite3 *db;
        int rc, k = 0, n = 0;

        if (!t || !cb || max == 0)
                return -EINVAL;
        if (max > HUB_TWIN_SCAN_MAX)
                max = HUB_TWIN_SCAN_MAX;
        db = hub_store_read_db(t->store);
        if (!db)
                return -EIO;
        rc = sqlite3_prepare_v2(db, "SELECT " ROW_COLUMNS ROW_FROM " WHERE d.device_id > ?1 ORDER BY d.device_id LIMIT ?2",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
                return hub_store_errno(rc);
        rc = sqlite3_bind_text(st, 1, after_id ? after_id : "", -1, SQLITE_STATIC);
        if (rc == SQLITE_OK)
                rc = sqlite3_bind_int64(st, 2, (sqlite3_int64) max);
        if (rc != SQLITE_OK) {
                k = hub_store_errno(rc);
                goto out;
        }
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                struct twin_row r;
                json_t *j;

                k = row_decode(st, &r);
                if (k < 0)
                        goto out;
                j = row_to_full(&r);
                twin_row_done(&r);
                if (!j) {
                        k = -ENOMEM;
                        goto out;
                }
                n++;
                k = cb(ud, j);
                json_decref(j);
                if (k != 0)
                        goto out;
        }
        if (rc != SQLITE_DONE)
                k = hub_store_errno(rc);
out:
        sqlite3_finalize(st);
        if (k < 0)
                return k;
        return n;
}

/* ---- changes ----------------------------------------------------------------------------- */

enum op_kind { OP_UPDATE, OP_REPLACE, OP_REPORTED };

struct twin_op {
        struct hub_twins *t;
        enum op_kind kind;
        char device_id[HUB_DEVICE_ID_MAX + 1];
        json_t *body; /* owned copy: service body, or the reported patch */
        bool any_etag;
        char etag[32];
        bool etag_unmatchable;
        int64_t expected_version;
        hub_twin_done_fn done;
        void *ud;

        /* Written by the write function, read by the completion. */
        bool changed;
        char error[HUB_TWIN_ERROR_MAX];
        char now[32];
        json_t *twin;         /* the new full twin */
        json_t *event_body;   /* NULL: no event */
        json_t *notification; /* desired notification, or NULL */
        int64_t desired_version;
};

static struct twin_op *twin_op_free(struct twin_op *op) {
        if (!op)
                return NULL;
        json_decref(op->body);
        json_decref(op->twin);
        json_decref(op->event_body);
        json_decref(op->notification);
        free(op);
        return NULL;
}

_printf_(3, 4) static int op_fail(struct twin_op *op, int err, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        (void) vsnprintf(op->error, sizeof op->error, fmt, ap);
        va_end(ap);
        return err;
}

/* The patch as it is applied: without the ignored top-level "$version" / "$metadata". */
static json_t *strip_system(const json_t *patch) {
        json_t *c = json_copy((json_t *) patch);

        if (c) {
                (void) json_object_del(c, "$version");
                (void) json_object_del(c, "$metadata");
        }
        return c;
}

/* Root fields of a twin document a service body may carry and that are ignored. */
static bool read_only_root_field(const char *key) {
        static const char *const fields[] = {
                "etag", "deviceEtag", "version", "status", "statusReason", "statusUpdateTime",
                "connectionState", "lastActivityTime", "cloudToDeviceMessageCount", "authenticationType",
                "x509Thumbprint", "modelId", "capabilities", "deviceScope", "parentScopes",
                "connectionStateUpdatedTime", "generationId",
        };
        for (size_t i = 0; i < ELEMENTSOF(fields); i++)
                if (streq(key, fields[i]))
                        return true;
        return false;
}

/* Splits a service PATCH/PUT body into its tags and desired parts (borrowed; NULL when
 * absent). */
static int parse_service_body(struct twin_op *op, json_t **ret_tags, json_t **ret_desired) {
        json_t *tags = NULL, *desired = NULL, *v;
        const char *key;

        if (!json_is_object(op->body))
                return op_fail(op, -EINVAL, "the twin must be a JSON object");
        json_object_foreach (op->body, key, v) {
                if (streq(key, "tags")) {
                        if (json_is_null(v))
                                continue;
                        if (!json_is_object(v))
                                return op_fail(op, -EINVAL, "tags: must be a JSON object");
                        tags = v;
                } else if (streq(key, "properties")) {
                        const char *pkey;
                        json_t *pv;

                        if (json_is_null(v))
                                continue;
                        if (!json_is_object(v))
                                return op_fail(op, -EINVAL, "properties: must be a JSON object");
                        json_object_foreach (v, pkey, pv) {
                                if (streq(pkey, "desired")) {
                                        if (json_is_null(pv))
                                                continue;
                                        if (!json_is_object(pv))
                                                return op_fail(op, -EINVAL,
                                                               "properties.desired: must be a JSON object");
                                        desired = pv;
                                } else if (streq(pkey, "reported"))
                                        return op_fail(op, -EINVAL,
                                                       "properties.reported: the service cannot write reported "
                                                       "properties");
                                else
                                        return op_fail(op, -EINVAL, "properties.%.64s: unknown field", pkey);
                        }
                } else if (streq(key, "deviceId")) {
                        if (!json_is_string(v) || !streq(json_string_value(v), op->device_id))
                                return op_fail(op, -EINVAL, "deviceId: does not match the twin's device id %s",
                                               op->device_id);
                } else if (!read_only_root_field(key))
                        return op_fail(op, -EINVAL, "%.64s: unknown field", key);
        }
        *ret_tags = tags;
        *ret_desired = desired;
        return 0;
}

static const char select_row_sql[] = "SELECT " ROW_COLUMNS ROW_FROM " WHERE d.device_id = ?1";

static int select_row_txn(struct hub_store_txn *txn, const char *device_id, struct twin_row *ret) {
        sqlite3_stmt *st;
        int r = hub_store_txn_prepare(txn, select_row_sql, &st);
        return r < 0 ? r : hub_store_select_one(st, device_id, row_decode_fn, ret);
}

static int bind_json(sqlite3_stmt *st, int i, const json_t *j) {
        char *s = hub_json_dumps(j, JSON_COMPACT);

        if (!s)
                return SQLITE_NOMEM;
        return sqlite3_bind_text(st, i, s, -1, free);
}

static const char write_row_sql[] =
        "INSERT INTO twins (device_id, module_id, version, etag_counter, model_id, tags, "
        "desired, desired_version, desired_meta, reported, reported_version, reported_meta) "
        "VALUES (?1, '', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) "
        "ON CONFLICT (device_id, module_id) DO UPDATE SET version = excluded.version, "
        "etag_counter = excluded.etag_counter, model_id = excluded.model_id, "
        "tags = excluded.tags, desired = excluded.desired, "
        "desired_version = excluded.desired_version, desired_meta = excluded.desired_meta, "
        "reported = excluded.reported, reported_version = excluded.reported_version, "
        "reported_meta = excluded.reported_meta";

static int write_row_txn(struct hub_store_txn *txn, const struct twin_row *r) {
        sqlite3_stmt *st = NULL;
        int rc;

        rc = hub_store_txn_prepare(txn, write_row_sql, &st);
        if (rc < 0)
                return rc;
        if ((rc = sqlite3_bind_text(st, 1, r->dev.device_id, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(st, 2, r->version)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(st, 3, r->etag_counter)) != SQLITE_OK ||
            (rc = sqlite3_bind_text(st, 4, r->model_id, -1, SQLITE_STATIC)) != SQLITE_OK ||
            (rc = bind_json(st, 5, r->tags)) != SQLITE_OK || (rc = bind_json(st, 6, r->desired)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(st, 7, r->desired_version)) != SQLITE_OK ||
            (rc = bind_json(st, 8, r->desired_meta)) != SQLITE_OK ||
            (rc = bind_json(st, 9, r->reported)) != SQLITE_OK ||
            (rc = sqlite3_bind_int64(st, 10, r->reported_version)) != SQLITE_OK ||
            (rc = bind_json(st, 11, r->reported_meta)) != SQLITE_OK)
                goto out;
        rc = sqlite3_step(st);
        if (rc == SQLITE_DONE)
                rc = SQLITE_OK;
out:
        /* Reset at once: the bound JSON texts are freed, and the statement holds no lock. */
        (void) sqlite3_reset(st);
        (void) sqlite3_clear_bindings(st);
        return rc == SQLITE_OK ? 0 : hub_store_errno(rc);
}

/* {"<patch...>", "$metadata": restricted, "$version": v} for the update event. */
static json_t *event_section(const json_t *applied, const json_t *meta, int64_t version) {
        json_t *restricted = hub_twin_meta_restrict(meta, applied);
        json_t *s = json_copy((json_t *) applied);

        if (!s || !restricted || json_object_set_new(s, "$metadata", restricted) < 0) {
                json_decref(s);
                return NULL;
        }
        restricted = NULL;
        if (json_object_set_new(s, "$version", json_integer(version)) < 0) {
                json_decref(s);
                return NULL;
        }
        return s;
}

static int op_apply(struct twin_op *op, struct twin_row *row) {
        struct hub_twin_stamp dstamp = { .time = op->now, .version = row->desired_version + 1 };
        struct hub_twin_stamp rstamp = { .time = op->now, .version = 0 };
        _cleanup_(json_decrefp) json_t *tags_applied = NULL, *desired_applied = NULL, *reported_applied = NULL;
        json_t *tags = NULL, *desired = NULL;
        int k;

        if (op->kind == OP_REPORTED) {
                if (!json_is_object(op->body))
                        return op_fail(op, -EINVAL, "properties.reported: must be a JSON object");
                k = hub_twin_patch_apply(row->reported, row->reported_meta, op->body, HUB_TWIN_SECTION_REPORTED,
                                         &rstamp, op->error, sizeof op->error);
                if (k < 0)
                        return k;
                row->reported_version++;
                reported_applied = strip_system(op->body);
                if (!reported_applied)
                        return op_fail(op, -ENOMEM, "out of memory");
        } else {
                k = parse_service_body(op, &tags, &desired);
                if (k < 0)
                        return k;
                if (op->kind == OP_UPDATE && !tags && !desired)
                        return 0; /* nothing to change */
                if (op->kind == OP_REPLACE) {
                        _cleanup_(json_decrefp) json_t *empty = json_object();
                        if (!empty)
                                return op_fail(op, -ENOMEM, "out of memory");
                        k = hub_twin_replace_apply(row->tags, NULL, tags ?: empty, HUB_TWIN_SECTION_TAGS, &dstamp,
                                                   op->error, sizeof op->error);
                        if (k >= 0)
                                k = hub_twin_replace_apply(row->desired, row->desired_meta, desired ?: empty,
                                                           HUB_TWIN_SECTION_DESIRED, &dstamp, op->error,
                                                           sizeof op->error);
                        if (k < 0)
                                return k;
                        row->desired_version++;
                } else {
                        if (tags) {
                                k = hub_twin_patch_apply(row->tags, NULL, tags, HUB_TWIN_SECTION_TAGS, &dstamp,
                                                         op->error, sizeof op->error);
                                if (k < 0)
                                        return k;
                                tags_applied = strip_system(tags);
                                if (!tags_applied)
                                        return op_fail(op, -ENOMEM, "out of memory");
                        }
                        if (desired) {
                                k = hub_twin_patch_apply(row->desired, row->desired_meta, desired,
                                                         HUB_TWIN_SECTION_DESIRED, &dstamp, op->error,
                                                         sizeof op->error);
                                if (k < 0)
                                        return k;
                                row->desired_version++;
                                desired_applied = strip_system(desired);
                                if (!desired_applied)
                                        return op_fail(op, -ENOMEM, "out of memory");
                        }
                }
        }
        row->version++;
        row->etag_counter++;
        op->changed = true;

        /* The desired notification (§6.5). */
        if (op->kind == OP_REPLACE || desired_applied) {
                op->notification = json_copy(op->kind == OP_REPLACE ? row->desired : desired_applied);
                if (!op->notification ||
                    json_object_set_new(op->notification, "$version", json_integer(row->desired_version)) < 0)
                        return op_fail(op, -ENOMEM, "out of memory");
                op->desired_version = row->desired_version;
        }

        /* The twin-change event body (§8.7); for replace, the full twin (built by the caller). */
        if (op->kind != OP_REPLACE) {
                json_t *props = json_object();

                op->event_body = json_pack("{s:I}", "version", (json_int_t) row->version);
                if (!op->event_body || !props) {
                        json_decref(props);
                        return op_fail(op, -ENOMEM, "out of memory");
                }
                if (tags_applied && json_object_set(op->event_body, "tags", tags_applied) < 0)
                        k = -ENOMEM;
                if (k >= 0 && desired_applied &&
                    json_object_set_new(props, "desired",
                                        event_section(desired_applied, row->desired_meta, row->desired_version)) < 0)
                        k = -ENOMEM;
                if (k >= 0 && reported_applied &&
                    json_object_set_new(props, "reported", event_section(reported_applied, row->reported_meta,
                                                                         row->reported_version)) < 0)
                        k = -ENOMEM;
                if (k >= 0 && json_object_size(props) > 0 && json_object_set(op->event_body, "properties", props) < 0)
                        k = -ENOMEM;
                json_decref(props);
                if (k < 0)
                        return op_fail(op, -ENOMEM, "out of memory");
        }
        return 0;
}

static int op_write(struct hub_store_txn *txn, void *userdata) {
        struct twin_op *op = userdata;
        struct twin_row row;
        char etag[16];
        int k;

        hub_time_format_iso8601(hub_clock_now(op->t->clock), op->now);

        k = select_row_txn(txn, op->device_id, &row);
        if (k == -ENOENT)
                return op_fail(op, -ENOENT, "device %s not found", op->device_id);
        if (k == -EBADMSG)
                return op_fail(op, -EBADMSG, "the stored twin of %s is corrupt", op->device_id);
        if (k < 0)
                return op_fail(op, k, "store error reading the twin of %s", op->device_id);

        if (op->kind != OP_REPORTED && !op->any_etag) {
                hub_twin_etag((uint64_t) row.etag_counter, etag);
                if (op->etag_unmatchable || !streq(etag, op->etag)) {
                        k = op_fail(op, -ESTALE, "precondition failed: the twin's etag is \"%s\"", etag);
                        goto out;
                }
        }
        if (op->kind == OP_REPORTED && op->expected_version >= 0 && op->expected_version != row.reported_version) {
                k = op_fail(op, -ESTALE, "precondition failed: reported $version is %" PRId64 ", not %" PRId64,
                            row.reported_version, op->expected_version);
                goto out;
        }

        k = op_apply(op, &row);
        if (k < 0)
                goto out;
        if (op->changed) {
                k = write_row_txn(txn, &row);
                if (k < 0) {
                        k = op_fail(op, k, "store error writing the twin of %s", op->device_id);
                        goto out;
                }
        }
        op->twin = row_to_full(&row);
        if (!op->twin) {
                k = op_fail(op, -ENOMEM, "out of memory");
                goto out;
        }
        if (op->changed && op->kind == OP_REPLACE)
                op->event_body = json_incref(op->twin);
        k = 0;
out:
        twin_row_done(&row);
        return k;
}

/* Drops "$metadata" from the properties of an event body (when it would be too large). */
static void strip_event_metadata(json_t *body) {
        json_t *props = json_object_get(body, "properties");

        (void) json_object_del(json_object_get(props, "desired"), "$metadata");
        (void) json_object_del(json_object_get(props, "reported"), "$metadata");
}

static void emit_event(struct hub_twins *t, struct twin_op *op) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        _cleanup_free_ char *body = NULL;
        const char *op_type = op->kind == OP_REPLACE ? "replaceTwin" : "updateTwin";
        char cid[33];
        int k;

        if (!t->event_fn || !op->event_body)
                return;
        body = hub_json_dumps(op->event_body, JSON_COMPACT);
        if (body && strlen(body) > HUB_MSG_D2C_MAX_SIZE) {
                /* Events are messages: keep them within the message limit (§10). */
                json_t *copy = json_deep_copy(op->event_body);
                free(body);
                body = NULL;
                if (copy) {
                        strip_event_metadata(copy);
                        body = hub_json_dumps(copy, JSON_COMPACT);
                        json_decref(copy);
                }
        }
        k = body ? hub_random_hex(cid, 16) : -ENOMEM;
        if (k >= 0)
                k = hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, cid);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, op->device_id);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, op->now);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "twinChangeEvents");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SCHEMA, "twinChangeNotification");
        if (k >= 0)
                k = hub_msg_set_prop(m, "deviceId", op->device_id);
        if (k >= 0)
                k = hub_msg_set_prop(m, "operationTimestamp", op->now);
        if (k >= 0)
                k = hub_msg_set_prop(m, "opType", op_type);
        if (k >= 0)
                k = hub_msg_set_prop(m, "iothub-message-schema", "twinChangeNotification");
        if (k < 0) {
                hub_log_debug(t->log, "twin: could not build the %s event for %s (%s), dropping it", op_type,
                              op->device_id, strerror(-k));
                return;
        }
        t->event_fn(t->event_ud, m);
}

static void op_done(int result, void *userdata) {
        struct twin_op *op = userdata;
        struct hub_twins *t = op->t;

        t->n_pending--;
        if (result >= 0 && op->changed) {
                emit_event(t, op);
                if (op->notification && t->desired_fn)
                        t->desired_fn(t->desired_ud, op->device_id, op->notification, op->desired_version);
        }
        if (result < 0 && !op->error[0])
                (void) snprintf(op->error, sizeof op->error, "could not store the twin of %s: %s", op->device_id,
                                strerror(-result));
        if (result < 0)
                hub_log_debug(t->log, "twin: change of %s failed: %s", op->device_id, op->error);
        if (op->done)
                op->done(result < 0 ? result : 0, result < 0 ? NULL : op->twin, result < 0 ? op->error : NULL,
                         op->ud);
        twin_op_free(op);
}

static int op_submit(struct hub_twins *t, enum op_kind kind, const char *device_id, const json_t *body,
                     const char *if_match, int64_t expected_version, hub_twin_done_fn done, void *ud) {
        struct twin_op *op;
        int k;

        if (!t || !device_id || !body || !hub_device_id_valid(device_id))
                return -EINVAL;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->t = t;
        op->kind = kind;
        memcpy(op->device_id, device_id, strlen(device_id) + 1);
        op->expected_version = expected_version;
        op->done = done;
        op->ud = ud;
        /* The commit thread gets a copy of its own: the caller's tree stays the caller's. */
        op->body = json_deep_copy(body);
        if (!op->body) {
                twin_op_free(op);
                return -ENOMEM;
        }
        if (!if_match || streq(if_match, "*") || streq(if_match, "\"*\""))
                op->any_etag = true;
        else {
                size_t n = strlen(if_match);
                if (n >= 2 && if_match[0] == '"' && if_match[n - 1] == '"') {
                        if_match++;
                        n -= 2;
                }
                if (n >= sizeof op->etag)
                        op->etag_unmatchable = true;
                else {
                        memcpy(op->etag, if_match, n);
                        op->etag[n] = '\0';
                }
        }
        k = hub_store_submit(t->store, op_write, op_done, op);
        if (k < 0) {
                twin_op_free(op);
                return k;
        }
        t->n_pending++;
        return 0;
}

int hub_twin_update(struct hub_twins *t, const char *device_id, const json_t *body, const char *if_match,
                    hub_twin_done_fn done, void *ud) {
        return op_submit(t, OP_UPDATE, device_id, body, if_match, -1, done, ud);
}

int hub_twin_update_desired(struct hub_twins *t, const char *device_id, const json_t *patch, const char *if_match,
                            hub_twin_done_fn done, void *ud) {
        _cleanup_(json_decrefp) json_t *body = NULL;

        if (!patch)
                return -EINVAL;
        body = json_pack("{s:{s:O}}", "properties", "desired", (json_t *) patch);
        if (!body)
                return -ENOMEM;
        return op_submit(t, OP_UPDATE, device_id, body, if_match, -1, done, ud);
}

int hub_twin_replace(struct hub_twins *t, const char *device_id, const json_t *body, const char *if_match,
                     hub_twin_done_fn done, void *ud) {
        return op_submit(t, OP_REPLACE, device_id, body, if_match, -1, done, ud);
}

int hub_twin_update_reported(struct hub_twins *t, const char *device_id, const json_t *patch,
                             int64_t expected_version, hub_twin_done_fn done, void *ud) {
        return op_submit(t, OP_REPORTED, device_id, patch, NULL, expected_version, done, ud);
}
