/* SPDX-License-Identifier: MIT */
/* The identity registry on the store (tables `devices` and `policies`, created by the
 * store's migration 1).
 *
 * Reads run on the owner's thread through the store's read connection, with prepared
 * statements cached here. Writes are rare and go through hub_store_submit_wait(): each write
 * function re-reads what it depends on (etag, current keys) inside the commit transaction,
 * so conditional updates are atomic, and copies the stored row out so the caller sees
 * exactly what is durable. Keys are generated on the caller's thread before submitting
 * (the write function must not block on anything but SQLite), and every buffer that held
 * one is wiped. */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/auth.h"
#include "hub/json-dump.h"
#include "hub/msg.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/urlenc.h"
#include "store-internal.h"
#include "store-util.h"

struct hub_registry {
        struct hub_store *store;
        const struct hub_clock *clock;
        const struct hub_log *log;

        void (*event_fn)(void *ud, struct hub_msg *ev);
        void *event_ud;

        /* cached statements on the read connection */
        sqlite3_stmt *st_get;
        sqlite3_stmt *st_list;
        sqlite3_stmt *st_count;
        sqlite3_stmt *st_policy_get;
        sqlite3_stmt *st_policy_list;
};

#define DEVICE_COLUMNS                                                                              \
        "device_id, generation_id, etag_version, status, status_reason, status_updated, auth_type, " \
        "primary_key, secondary_key, primary_thumbprint, secondary_thumbprint, iot_edge, "          \
        "connection_state, connection_state_updated, last_activity, c2d_count, created"
#define POLICY_COLUMNS "name, primary_key, secondary_key, rights"

static const struct {
        const char *name;
        unsigned rights;
} default_policies[] = {
        { "iothubowner", HUB_RIGHTS_ALL },
        { "service", HUB_RIGHT_SERVICE_CONNECT },
        { "device", HUB_RIGHT_DEVICE_CONNECT },
        { "registryRead", HUB_RIGHT_REGISTRY_READ },
        { "registryReadWrite", HUB_RIGHT_REGISTRY_READ | HUB_RIGHT_REGISTRY_WRITE },
};

static int sql_errno(int rc) {
        return hub_store_errno(rc & 0xff);
}

/* ---- value helpers ---------------------------------------------------------------------- */

void hub_device_done(struct hub_device *d) {
        if (d)
                hub_explicit_bzero(d, sizeof *d);
}

void hub_policy_done(struct hub_policy *p) {
        if (p)
                hub_explicit_bzero(p, sizeof *p);
}

struct hub_device *hub_device_array_free(struct hub_device *arr, size_t n) {
        if (!arr)
                return NULL;
        hub_explicit_bzero(arr, n * sizeof *arr);
        free(arr);
        return NULL;
}

struct hub_policy *hub_policy_array_free(struct hub_policy *arr, size_t n) {
        if (!arr)
                return NULL;
        hub_explicit_bzero(arr, n * sizeof *arr);
        free(arr);
        return NULL;
}

static bool ascii_alnum(char c) {
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

/* A device id of 1 to HUB_DEVICE_ID_MAX characters, each alphanumeric or one of @extra. */
static bool device_id_check(const char *id, const char *extra) {
        size_t n;

        if (!id)
                return false;
        n = strnlen(id, HUB_DEVICE_ID_MAX + 1);
        if (n == 0 || n > HUB_DEVICE_ID_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!ascii_alnum(id[i]) && !strchr(extra, id[i]))
                        return false;
        return true;
}

bool hub_device_id_valid(const char *id) {
        return device_id_check(id, "-:.+%_#*?!(),=@;$'");
}

bool hub_device_id_valid_strict(const char *id) {
        return device_id_check(id, "._-");
}

char *hub_device_etag(uint64_t version, char buf[static 32]) {
        static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        char dec[21];
        size_t n, o = 0;

        n = (size_t) snprintf(dec, sizeof dec, "%" PRIu64, version);
        for (size_t i = 0; i < n; i += 3) {
                uint32_t v = (uint32_t) (unsigned char) dec[i] << 16;
                if (i + 1 < n)
                        v |= (uint32_t) (unsigned char) dec[i + 1] << 8;
                if (i + 2 < n)
                        v |= (uint32_t) (unsigned char) dec[i + 2];
                buf[o++] = b64[(v >> 18) & 63];
                buf[o++] = b64[(v >> 12) & 63];
                buf[o++] = i + 1 < n ? b64[(v >> 6) & 63] : '=';
                buf[o++] = i + 2 < n ? b64[v & 63] : '=';
        }
        buf[o] = '\0';
        return buf;
}

/* Number of code points of valid UTF-8 (no overlongs, surrogates or values above
 * U+10FFFF), or -1. */
static ssize_t utf8_length(const char *s) {
        const unsigned char *p = (const unsigned char *) s;
        ssize_t n = 0;

        while (*p) {
                uint32_t cp;
                int extra;
                if (*p < 0x80) {
                        p++;
                        n++;
                        continue;
                } else if ((*p & 0xe0) == 0xc0) {
                        cp = *p & 0x1f;
                        extra = 1;
                } else if ((*p & 0xf0) == 0xe0) {
                        cp = *p & 0x0f;
                        extra = 2;
                } else if ((*p & 0xf8) == 0xf0) {
                        cp = *p & 0x07;
                        extra = 3;
                } else
                        return -1;
                p++;
                for (int i = 0; i < extra; i++, p++) {
                        if ((*p & 0xc0) != 0x80)
                                return -1;
                        cp = cp << 6 | (*p & 0x3f);
                }
                if ((extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) || (extra == 3 && cp < 0x10000) ||
                    cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
                        return -1;
                n++;
        }
        return n;
}

static bool key_valid(const char *key, size_t size) {
        size_t n = 0, len = strnlen(key, size);

        if (len == size)
                return false; /* not terminated */
        if (!hub_base64_valid(key, len, &n))
                return false;
        return n >= HUB_KEY_MIN_BYTES && n <= HUB_KEY_MAX_BYTES;
}

static bool thumbprint_valid(const char *t, size_t size) {
        size_t len = strnlen(t, size);

        if (len == size)
                return false;
        if (len == 0)
                return true;
        if (len != 40 && len != 64)
                return false;
        for (size_t i = 0; i < len; i++)
                if (!((t[i] >= '0' && t[i] <= '9') || (t[i] >= 'a' && t[i] <= 'f') || (t[i] >= 'A' && t[i] <= 'F')))
                        return false;
        return true;
}

static int invalid(const char **ret_error, const char *msg) {
        if (ret_error)
                *ret_error = msg;
        return -EINVAL;
}

int hub_device_validate(const struct hub_device *d, const char **ret_error) {
        if (!d)
                return invalid(ret_error, "device: missing");
        if (strnlen(d->device_id, sizeof d->device_id) == sizeof d->device_id || !hub_device_id_valid(d->device_id))
                return invalid(ret_error,
                               "deviceId: expected 1..128 characters of A-Z a-z 0-9 and - : . + % _ # * ? ! ( ) , = @ ; $ '");
        if (d->status != HUB_DEVICE_ENABLED && d->status != HUB_DEVICE_DISABLED)
                return invalid(ret_error, "status: expected \"enabled\" or \"disabled\"");
        if (d->has_status_reason) {
                ssize_t n;
                if (strnlen(d->status_reason, sizeof d->status_reason) == sizeof d->status_reason)
                        return invalid(ret_error, "statusReason: longer than 128 characters");
                n = utf8_length(d->status_reason);
                if (n < 0)
                        return invalid(ret_error, "statusReason: not valid UTF-8");
                if (n > HUB_STATUS_REASON_MAX)
                        return invalid(ret_error, "statusReason: longer than 128 characters");
        }
        switch (d->auth_type) {
        case HUB_AUTH_TYPE_SAS:
                if (d->primary_key[0] && !key_valid(d->primary_key, sizeof d->primary_key))
                        return invalid(ret_error,
                                       "authentication.symmetricKey.primaryKey: expected base64 of 16 to 64 bytes");
                if (d->secondary_key[0] && !key_valid(d->secondary_key, sizeof d->secondary_key))
                        return invalid(ret_error,
                                       "authentication.symmetricKey.secondaryKey: expected base64 of 16 to 64 bytes");
                break;
        case HUB_AUTH_TYPE_SELF_SIGNED:
                if (!thumbprint_valid(d->primary_thumbprint, sizeof d->primary_thumbprint))
                        return invalid(ret_error,
                                       "authentication.x509Thumbprint.primaryThumbprint: expected 40 or 64 hex digits");
                if (!thumbprint_valid(d->secondary_thumbprint, sizeof d->secondary_thumbprint))
                        return invalid(ret_error,
                                       "authentication.x509Thumbprint.secondaryThumbprint: expected 40 or 64 hex digits");
                if (!d->primary_thumbprint[0])
                        return invalid(ret_error,
                                       "authentication.x509Thumbprint.primaryThumbprint: required for type selfSigned");
                break;
        case HUB_AUTH_TYPE_CA:
        case HUB_AUTH_TYPE_NONE:
                break;
        default:
                return invalid(ret_error,
                               "authentication.type: expected \"sas\", \"selfSigned\", \"certificateAuthority\" or \"none\"");
        }
        return 0;
}

/* 18 random decimal digits, the first not 0 (Azure's generation ids look like this). */
static int generation_id_new(char ret[static 24]) {
        char buf[19];
        size_t n = 0;

        while (n < 18) {
                uint8_t b[32];
                int r = hub_random_bytes(b, sizeof b);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < sizeof b && n < 18; i++) {
                        if (b[i] >= 250)
                                continue; /* rejection keeps the digits uniform */
                        if (n == 0 && b[i] % 10 == 0)
                                continue;
                        buf[n++] = (char) ('0' + b[i] % 10);
                }
        }
        buf[18] = '\0';
        memcpy(ret, buf, sizeof buf);
        return 0;
}

/* Strips the optional quotes of an If-Match value. NULL/"*" -> NULL (unconditional). */
static int if_match_etag(const char *if_match, char ret[static 32], bool *ret_any) {
        size_t n;

        if (!if_match || streq(if_match, "*") || streq(if_match, "\"*\"")) {
                *ret_any = true;
                return 0;
        }
        n = strlen(if_match);
        if (n >= 2 && if_match[0] == '"' && if_match[n - 1] == '"') {
                if_match++;
                n -= 2;
        }
        if (n >= 32) {
                /* can never match a real etag */
                ret[0] = '\0';
                *ret_any = false;
                return -ESTALE;
        }
        memcpy(ret, if_match, n);
        ret[n] = '\0';
        *ret_any = false;
        return 0;
}

/* ---- row <-> struct ------------------------------------------------------------------- */

static int row_to_device(sqlite3_stmt *st, struct hub_device *d) {
        bool null_reason = true;
        int r;

        *d = (struct hub_device) {};
        if ((r = hub_store_col_text(st, 0, d->device_id, sizeof d->device_id, NULL)) < 0 ||
            (r = hub_store_col_text(st, 1, d->generation_id, sizeof d->generation_id, NULL)) < 0 ||
            (r = hub_store_col_text(st, 4, d->status_reason, sizeof d->status_reason, &null_reason)) < 0 ||
            (r = hub_store_col_text(st, 7, d->primary_key, sizeof d->primary_key, NULL)) < 0 ||
            (r = hub_store_col_text(st, 8, d->secondary_key, sizeof d->secondary_key, NULL)) < 0 ||
            (r = hub_store_col_text(st, 9, d->primary_thumbprint, sizeof d->primary_thumbprint, NULL)) < 0 ||
            (r = hub_store_col_text(st, 10, d->secondary_thumbprint, sizeof d->secondary_thumbprint, NULL)) < 0) {
                hub_device_done(d);
                return r;
        }
        d->etag_version = (uint64_t) sqlite3_column_int64(st, 2);
        d->status = sqlite3_column_int(st, 3) == 0 ? HUB_DEVICE_ENABLED : HUB_DEVICE_DISABLED;
        d->has_status_reason = !null_reason;
        d->status_updated_usec = (uint64_t) sqlite3_column_int64(st, 5);
        switch (sqlite3_column_int(st, 6)) {
        case 0: d->auth_type = HUB_AUTH_TYPE_SAS; break;
        case 1: d->auth_type = HUB_AUTH_TYPE_SELF_SIGNED; break;
        case 2: d->auth_type = HUB_AUTH_TYPE_CA; break;
        default: d->auth_type = HUB_AUTH_TYPE_NONE; break;
        }
        d->iot_edge = sqlite3_column_int(st, 11) != 0;
        d->connection_state = sqlite3_column_int(st, 12) ? HUB_CONNECTED : HUB_DISCONNECTED;
        d->connection_state_updated_usec = (uint64_t) sqlite3_column_int64(st, 13);
        d->last_activity_usec = (uint64_t) sqlite3_column_int64(st, 14);
        d->c2d_count = (uint32_t) sqlite3_column_int64(st, 15);
        d->created_usec = (uint64_t) sqlite3_column_int64(st, 16);
        return 0;
}

static int device_decode(sqlite3_stmt *st, void *ret) {
        return row_to_device(st, ret);
}

static int row_to_policy(sqlite3_stmt *st, struct hub_policy *p) {
        int r;

        *p = (struct hub_policy) {};
        if ((r = hub_store_col_text(st, 0, p->name, sizeof p->name, NULL)) < 0 ||
            (r = hub_store_col_text(st, 1, p->primary_key, sizeof p->primary_key, NULL)) < 0 ||
            (r = hub_store_col_text(st, 2, p->secondary_key, sizeof p->secondary_key, NULL)) < 0) {
                hub_policy_done(p);
                return r;
        }
        p->rights = (unsigned) sqlite3_column_int64(st, 3) & HUB_RIGHTS_ALL;
        return 0;
}

static int policy_decode(sqlite3_stmt *st, void *ret) {
        return row_to_policy(st, ret);
}

static int bind_text_or_null(sqlite3_stmt *st, int i, const char *s) {
        return s && *s ? sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT) : sqlite3_bind_null(st, i);
}

/* Reads one device by id inside a transaction on db. */
static int select_device(sqlite3 *db, const char *id, struct hub_device *ret) {
        return hub_store_select_one_sql(db, "SELECT " DEVICE_COLUMNS " FROM devices WHERE device_id = ?1", id,
                                        device_decode, ret);
}

/* ---- lifecycle events (reference §8.7) ------------------------------------------------- */

static void emit_lifecycle(struct hub_registry *r, const char *id, const char *op_type) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        _cleanup_free_ char *body = NULL;
        char now_str[32], never[32], cid[33];
        json_t *twin;
        uint64_t now;
        int k;

        if (!r->event_fn)
                return;
        now = hub_clock_now(r->clock);
        hub_time_format_iso8601(now, now_str);
        hub_time_format_iso8601(0, never);

        twin = json_pack("{s:s, s:s, s:i, s:{s:{s:{s:s}, s:i}, s:{s:{s:s}, s:i}}}",
                         "deviceId", id, "etag", "AAAAAAAAAAE=", "version", 2, "properties",
                         "desired", "$metadata", "$lastUpdated", never, "$version", 1,
                         "reported", "$metadata", "$lastUpdated", never, "$version", 1);
        if (!twin)
                goto fail;
        body = hub_json_dumps(twin, JSON_COMPACT);
        json_decref(twin);
        if (!body)
                goto fail;

        k = hub_random_hex(cid, 16);
        if (k >= 0)
                k = hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, cid);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, id);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, now_str);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "deviceLifecycleEvents");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SCHEMA, "deviceLifecycleNotification");
        if (k >= 0)
                k = hub_msg_set_prop(m, "deviceId", id);
        if (k >= 0)
                k = hub_msg_set_prop(m, "operationTimestamp", now_str);
        if (k >= 0)
                k = hub_msg_set_prop(m, "opType", op_type);
        if (k >= 0)
                k = hub_msg_set_prop(m, "iothub-message-schema", "deviceLifecycleNotification");
        if (k < 0)
                goto fail;
        r->event_fn(r->event_ud, m);
        return;

fail:
        hub_log_debug(r->log, "registry: could not build %s event for %s, dropping it", op_type, id);
}

/* ---- writes ----------------------------------------------------------------------------- */

struct write_ctx {
        const struct hub_device *in;
        bool any;
        char etag[32];
        uint64_t now;
        char gen_id[24];
        char spare_primary[45], spare_secondary[45]; /* used where a key must be generated */
        enum hub_key_which which;
        const char *id;
        const char *policy_primary, *policy_secondary;
        struct hub_device out;
};

static void write_ctx_done(struct write_ctx *c) {
        hub_explicit_bzero(c, sizeof *c);
}

static int spare_keys(struct write_ctx *c) {
        int r = hub_random_key(c->spare_primary);
        if (r >= 0)
                r = hub_random_key(c->spare_secondary);
        return r;
}

static int exec_bound(sqlite3_stmt *st) {
        int rc = sqlite3_step(st);
        return rc == SQLITE_DONE ? 0 : sql_errno(rc);
}

static int write_create(struct hub_store_txn *txn, void *userdata) {
        struct write_ctx *c = userdata;
        const struct hub_device *in = c->in;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        bool sas = in->auth_type == HUB_AUTH_TYPE_SAS, x509 = in->auth_type == HUB_AUTH_TYPE_SELF_SIGNED;
        int rc, r;

        rc = sqlite3_prepare_v2(db,
                                "INSERT INTO devices (" DEVICE_COLUMNS ") VALUES "
                                "(?1, ?2, 1, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9, ?10, 0, 0, 0, 0, ?11)",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
                return sql_errno(rc);
        sqlite3_bind_text(st, 1, in->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, c->gen_id, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 3, in->status == HUB_DEVICE_DISABLED);
        if (in->has_status_reason)
                sqlite3_bind_text(st, 4, in->status_reason, -1, SQLITE_STATIC);
        else
                sqlite3_bind_null(st, 4);
        sqlite3_bind_int(st, 5, (int) in->auth_type);
        bind_text_or_null(st, 6, sas ? (in->primary_key[0] ? in->primary_key : c->spare_primary) : NULL);
        bind_text_or_null(st, 7, sas ? (in->secondary_key[0] ? in->secondary_key : c->spare_secondary) : NULL);
        bind_text_or_null(st, 8, x509 ? in->primary_thumbprint : NULL);
        bind_text_or_null(st, 9, x509 ? in->secondary_thumbprint : NULL);
        sqlite3_bind_int(st, 10, in->iot_edge);
        sqlite3_bind_int64(st, 11, (sqlite3_int64) c->now);
        r = exec_bound(st);
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        return select_device(db, in->device_id, &c->out);
}

/* Reads the current row inside the transaction and checks the etag. */
static int check_current(sqlite3 *db, struct write_ctx *c, const char *id, struct hub_device *cur) {
        char etag[32];
        int r;

        r = select_device(db, id, cur);
        if (r < 0)
                return r;
        if (!c->any && !streq(c->etag, hub_device_etag(cur->etag_version, etag)))
                return -ESTALE;
        return 0;
}

static int write_update(struct hub_store_txn *txn, void *userdata) {
        struct write_ctx *c = userdata;
        const struct hub_device *in = c->in;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_(hub_device_done) struct hub_device cur = {};
        sqlite3_stmt *st = NULL;
        bool sas = in->auth_type == HUB_AUTH_TYPE_SAS, x509 = in->auth_type == HUB_AUTH_TYPE_SELF_SIGNED;
        const char *pk = NULL, *sk = NULL;
        int rc, r;

        r = check_current(db, c, in->device_id, &cur);
        if (r < 0)
                return r;
        if (sas) {
                pk = in->primary_key[0] ? in->primary_key : cur.primary_key[0] ? cur.primary_key : c->spare_primary;
                sk = in->secondary_key[0] ? in->secondary_key
                     : cur.secondary_key[0] ? cur.secondary_key : c->spare_secondary;
        }
        rc = sqlite3_prepare_v2(db,
                                "UPDATE devices SET etag_version = etag_version + 1, status = ?2, status_reason = ?3, "
                                "status_updated = CASE WHEN status <> ?2 THEN ?4 ELSE status_updated END, "
                                "auth_type = ?5, primary_key = ?6, secondary_key = ?7, primary_thumbprint = ?8, "
                                "secondary_thumbprint = ?9, iot_edge = ?10 WHERE device_id = ?1",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
                return sql_errno(rc);
        sqlite3_bind_text(st, 1, in->device_id, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 2, in->status == HUB_DEVICE_DISABLED);
        if (in->has_status_reason)
                sqlite3_bind_text(st, 3, in->status_reason, -1, SQLITE_STATIC);
        else
                sqlite3_bind_null(st, 3);
        sqlite3_bind_int64(st, 4, (sqlite3_int64) c->now);
        sqlite3_bind_int(st, 5, (int) in->auth_type);
        bind_text_or_null(st, 6, pk);
        bind_text_or_null(st, 7, sk);
        bind_text_or_null(st, 8, x509 ? in->primary_thumbprint : NULL);
        bind_text_or_null(st, 9, x509 ? in->secondary_thumbprint : NULL);
        sqlite3_bind_int(st, 10, in->iot_edge);
        r = exec_bound(st);
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        return select_device(db, in->device_id, &c->out);
}

static int write_delete(struct hub_store_txn *txn, void *userdata) {
        struct write_ctx *c = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_(hub_device_done) struct hub_device cur = {};
        sqlite3_stmt *st = NULL;
        int rc, r;

        r = check_current(db, c, c->id, &cur);
        if (r < 0)
                return r;
        rc = sqlite3_prepare_v2(db, "DELETE FROM devices WHERE device_id = ?1", -1, &st, NULL);
        if (rc != SQLITE_OK)
                return sql_errno(rc);
        sqlite3_bind_text(st, 1, c->id, -1, SQLITE_STATIC);
        r = exec_bound(st);
        sqlite3_finalize(st);
        return r;
}

static int write_regenerate(struct hub_store_txn *txn, void *userdata) {
        struct write_ctx *c = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        _cleanup_(hub_device_done) struct hub_device cur = {};
        sqlite3_stmt *st = NULL;
        const char *pk, *sk;
        int rc, r;

        r = select_device(db, c->id, &cur);
        if (r < 0)
                return r;
        if (cur.auth_type != HUB_AUTH_TYPE_SAS)
                return -EINVAL;
        switch (c->which) {
        case HUB_KEY_PRIMARY:
                pk = c->spare_primary;
                sk = cur.secondary_key;
                break;
        case HUB_KEY_SECONDARY:
                pk = cur.primary_key;
                sk = c->spare_secondary;
                break;
        default:
                pk = cur.secondary_key;
                sk = cur.primary_key;
                break;
        }
        rc = sqlite3_prepare_v2(db,
                                "UPDATE devices SET etag_version = etag_version + 1, primary_key = ?2, "
                                "secondary_key = ?3 WHERE device_id = ?1",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
                return sql_errno(rc);
        sqlite3_bind_text(st, 1, c->id, -1, SQLITE_STATIC);
        bind_text_or_null(st, 2, pk);
        bind_text_or_null(st, 3, sk);
        r = exec_bound(st);
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        return select_device(db, c->id, &c->out);
}

struct policy_insert_ctx {
        struct hub_policy p[ELEMENTSOF(default_policies)];
        bool missing[ELEMENTSOF(default_policies)];
};

static int write_default_policies(struct hub_store_txn *txn, void *userdata) {
        struct policy_insert_ctx *c = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc, r = 0;

        rc = sqlite3_prepare_v2(db,
                                "INSERT OR IGNORE INTO policies (" POLICY_COLUMNS ") VALUES (?1, ?2, ?3, ?4)", -1,
                                &st, NULL);
        if (rc != SQLITE_OK)
                return sql_errno(rc);
        for (size_t i = 0; i < ELEMENTSOF(default_policies) && r >= 0; i++) {
                if (!c->missing[i])
                        continue;
                sqlite3_bind_text(st, 1, c->p[i].name, -1, SQLITE_STATIC);
                sqlite3_bind_text(st, 2, c->p[i].primary_key, -1, SQLITE_STATIC);
                sqlite3_bind_text(st, 3, c->p[i].secondary_key, -1, SQLITE_STATIC);
                sqlite3_bind_int64(st, 4, c->p[i].rights);
                r = exec_bound(st);
                sqlite3_reset(st);
                sqlite3_clear_bindings(st);
        }
        sqlite3_finalize(st);
        return r;
}

static int write_policy_keys(struct hub_store_txn *txn, void *userdata) {
        struct write_ctx *c = userdata;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc, r;

        rc = sqlite3_prepare_v2(db,
                                "UPDATE policies SET primary_key = coalesce(?2, primary_key), "
                                "secondary_key = coalesce(?3, secondary_key) WHERE name = ?1",
                                -1, &st, NULL);
        if (rc != SQLITE_OK)
                return sql_errno(rc);
        sqlite3_bind_text(st, 1, c->id, -1, SQLITE_STATIC);
        bind_text_or_null(st, 2, c->policy_primary);
        bind_text_or_null(st, 3, c->policy_secondary);
        r = exec_bound(st);
        sqlite3_finalize(st);
        if (r < 0)
                return r;
        return sqlite3_changes(db) > 0 ? 0 : -ENOENT;
}

/* ---- public API ------------------------------------------------------------------------- */

static int prepare_read(struct hub_registry *r, sqlite3_stmt **st, const char *sql) {
        return hub_store_prepare_cached(r->store, st, sql);
}

static int ensure_default_policies(struct hub_registry *r) {
        struct policy_insert_ctx c = {};
        bool any = false;
        int k = 0;

        for (size_t i = 0; i < ELEMENTSOF(default_policies); i++) {
                struct hub_policy p;
                k = hub_registry_policy_get(r, default_policies[i].name, &p);
                hub_policy_done(&p);
                if (k == -ENOENT) {
                        c.missing[i] = any = true;
                        (void) snprintf(c.p[i].name, sizeof c.p[i].name, "%s", default_policies[i].name);
                        c.p[i].rights = default_policies[i].rights;
                        k = hub_random_key(c.p[i].primary_key);
                        if (k >= 0)
                                k = hub_random_key(c.p[i].secondary_key);
                }
                if (k < 0)
                        goto out;
        }
        k = 0;
        if (any) {
                k = hub_store_submit_wait(r->store, write_default_policies, &c);
                if (k >= 0)
                        hub_log_debug(r->log, "registry: created the default shared access policies");
        }
out:
        hub_explicit_bzero(&c, sizeof c);
        return k < 0 ? k : 0;
}

int hub_registry_new(struct hub_store *store, const struct hub_clock *clock, const struct hub_log *log,
                     struct hub_registry **ret) {
        _cleanup_(hub_registry_freep) struct hub_registry *r = NULL;
        int k;

        if (!store || !clock || !ret)
                return -EINVAL;
        r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        r->store = store;
        r->clock = clock;
        r->log = log;
        k = ensure_default_policies(r);
        if (k < 0)
                return k;
        *ret = TAKE_PTR(r);
        return 0;
}

struct hub_registry *hub_registry_free(struct hub_registry *r) {
        if (!r)
                return NULL;
        sqlite3_finalize(r->st_get);
        sqlite3_finalize(r->st_list);
        sqlite3_finalize(r->st_count);
        sqlite3_finalize(r->st_policy_get);
        sqlite3_finalize(r->st_policy_list);
        free(r);
        return NULL;
}

void hub_registry_set_event_sink(struct hub_registry *r, void (*fn)(void *ud, struct hub_msg *ev), void *ud) {
        if (!r)
                return;
        r->event_fn = fn;
        r->event_ud = ud;
}

int hub_registry_get(struct hub_registry *r, const char *id, struct hub_device *ret) {
        struct hub_device d;
        int k;

        if (!r || !id || !ret || !hub_device_id_valid(id))
                return -EINVAL;
        k = prepare_read(r, &r->st_get, "SELECT " DEVICE_COLUMNS " FROM devices WHERE device_id = ?1");
        if (k < 0)
                return k;
        k = hub_store_select_one(r->st_get, id, device_decode, &d);
        if (k < 0)
                return k;
        *ret = d;
        hub_device_done(&d);
        return 0;
}

static int submit_and_copy(struct hub_registry *r, hub_store_write_fn fn, struct write_ctx *c, struct hub_device *ret) {
        int k = hub_store_submit_wait(r->store, fn, c);
        if (k >= 0 && ret)
                *ret = c->out;
        return k < 0 ? k : 0;
}

int hub_registry_create(struct hub_registry *r, const struct hub_device *in, struct hub_device *ret) {
        _cleanup_(write_ctx_done) struct write_ctx c = {};
        int k;

        if (!r || !in)
                return -EINVAL;
        k = hub_device_validate(in, NULL);
        if (k < 0)
                return k;
        c.in = in;
        c.now = hub_clock_now(r->clock);
        k = generation_id_new(c.gen_id);
        if (k < 0)
                return k;
        if (in->auth_type == HUB_AUTH_TYPE_SAS) {
                k = spare_keys(&c);
                if (k < 0)
                        return k;
        }
        k = submit_and_copy(r, write_create, &c, ret);
        if (k < 0)
                return k;
        hub_log_debug(r->log, "registry: created device %s", in->device_id);
        emit_lifecycle(r, in->device_id, "createDeviceIdentity");
        return 0;
}

int hub_registry_update(struct hub_registry *r, const struct hub_device *in, const char *if_match,
                        struct hub_device *ret) {
        _cleanup_(write_ctx_done) struct write_ctx c = {};
        int k;

        if (!r || !in)
                return -EINVAL;
        k = hub_device_validate(in, NULL);
        if (k < 0)
                return k;
        c.in = in;
        k = if_match_etag(if_match, c.etag, &c.any);
        if (k < 0) {
                /* an over-long etag never matches, but an unknown device is still -ENOENT */
                struct hub_device d;
                k = hub_registry_get(r, in->device_id, &d);
                hub_device_done(&d);
                return k < 0 ? k : -ESTALE;
        }
        c.now = hub_clock_now(r->clock);
        if (in->auth_type == HUB_AUTH_TYPE_SAS) {
                k = spare_keys(&c);
                if (k < 0)
                        return k;
        }
        k = submit_and_copy(r, write_update, &c, ret);
        if (k < 0)
                return k;
        hub_log_debug(r->log, "registry: updated device %s", in->device_id);
        return 0;
}

int hub_registry_delete(struct hub_registry *r, const char *id, const char *if_match) {
        _cleanup_(write_ctx_done) struct write_ctx c = {};
        int k;

        if (!r || !id || !hub_device_id_valid(id))
                return -EINVAL;
        c.id = id;
        k = if_match_etag(if_match, c.etag, &c.any);
        if (k < 0) {
                struct hub_device d;
                k = hub_registry_get(r, id, &d);
                hub_device_done(&d);
                return k < 0 ? k : -ESTALE;
        }
        k = hub_store_submit_wait(r->store, write_delete, &c);
        if (k < 0)
                return k;
        hub_log_debug(r->log, "registry: deleted device %s", id);
        emit_lifecycle(r, id, "deleteDeviceIdentity");
        return 0;
}

int hub_registry_regenerate_key(struct hub_registry *r, const char *id, enum hub_key_which which,
                                struct hub_device *ret) {
        _cleanup_(write_ctx_done) struct write_ctx c = {};
        int k;

        if (!r || !id || !hub_device_id_valid(id) || (which != HUB_KEY_PRIMARY && which != HUB_KEY_SECONDARY &&
                                                        which != HUB_KEY_SWAP))
                return -EINVAL;
        c.id = id;
        c.which = which;
        k = spare_keys(&c);
        if (k < 0)
                return k;
        k = submit_and_copy(r, write_regenerate, &c, ret);
        if (k < 0)
                return k;
        hub_log_debug(r->log, "registry: regenerated keys of device %s", id);
        return 0;
}

int hub_registry_list(struct hub_registry *r, const char *after_id, size_t max, struct hub_device **ret_array,
                      size_t *ret_n) {
        struct hub_device *arr = NULL;
        size_t n = 0;
        int k, rc = SQLITE_DONE;

        if (!r || !ret_array || !ret_n || max == 0)
                return -EINVAL;
        max = MIN(max, (size_t) HUB_REGISTRY_LIST_MAX);
        k = prepare_read(r, &r->st_list,
                         "SELECT " DEVICE_COLUMNS " FROM devices WHERE device_id > ?1 ORDER BY device_id LIMIT ?2");
        if (k < 0)
                return k;
        /* every id is at least one character long, so "" precedes them all */
        sqlite3_bind_text(r->st_list, 1, after_id ?: "", -1, SQLITE_STATIC);
        sqlite3_bind_int64(r->st_list, 2, (sqlite3_int64) max);
        arr = calloc(max, sizeof *arr);
        if (!arr) {
                k = -ENOMEM;
                goto out;
        }
        while (n < max && (rc = sqlite3_step(r->st_list)) == SQLITE_ROW) {
                k = row_to_device(r->st_list, &arr[n]);
                if (k < 0)
                        goto out;
                n++;
        }
        if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
                k = sql_errno(rc);
                goto out;
        }
        k = 0;
out:
        sqlite3_reset(r->st_list);
        sqlite3_clear_bindings(r->st_list);
        if (k < 0) {
                hub_device_array_free(arr, max);
                return k;
        }
        if (n == 0)
                arr = hub_device_array_free(arr, max);
        *ret_array = arr;
        *ret_n = n;
        return 0;
}

int hub_registry_count(struct hub_registry *r, uint64_t *total, uint64_t *enabled, uint64_t *disabled) {
        int k, rc;

        if (!r)
                return -EINVAL;
        k = prepare_read(r, &r->st_count,
                         "SELECT count(*), coalesce(sum(status = 0), 0), coalesce(sum(status <> 0), 0) FROM devices");
        if (k < 0)
                return k;
        rc = sqlite3_step(r->st_count);
        if (rc == SQLITE_ROW) {
                if (total)
                        *total = (uint64_t) sqlite3_column_int64(r->st_count, 0);
                if (enabled)
                        *enabled = (uint64_t) sqlite3_column_int64(r->st_count, 1);
                if (disabled)
                        *disabled = (uint64_t) sqlite3_column_int64(r->st_count, 2);
                k = 0;
        } else
                k = rc == SQLITE_DONE ? -EIO : sql_errno(rc);
        sqlite3_reset(r->st_count);
        return k;
}

int hub_registry_policy_get(struct hub_registry *r, const char *name, struct hub_policy *ret) {
        struct hub_policy p;
        int k;

        if (!r || !name || !ret)
                return -EINVAL;
        if (strlen(name) > HUB_POLICY_NAME_MAX)
                return -ENOENT;
        k = prepare_read(r, &r->st_policy_get, "SELECT " POLICY_COLUMNS " FROM policies WHERE name = ?1");
        if (k < 0)
                return k;
        k = hub_store_select_one(r->st_policy_get, name, policy_decode, &p);
        if (k < 0)
                return k;
        *ret = p;
        hub_policy_done(&p);
        return 0;
}

int hub_registry_policy_list(struct hub_registry *r, struct hub_policy **ret, size_t *ret_n) {
        struct hub_policy *arr = NULL;
        size_t n = 0, cap = 0;
        int k = 0, rc;

        if (!r || !ret || !ret_n)
                return -EINVAL;
        k = prepare_read(r, &r->st_policy_list, "SELECT " POLICY_COLUMNS " FROM policies ORDER BY name");
        if (k < 0)
                return k;
        while ((rc = sqlite3_step(r->st_policy_list)) == SQLITE_ROW) {
                if (n == cap) {
                        size_t ncap = cap ? cap * 2 : 8;
                        struct hub_policy *na = calloc(ncap, sizeof *na);
                        if (!na) {
                                k = -ENOMEM;
                                goto out;
                        }
                        if (arr)
                                memcpy(na, arr, n * sizeof *arr);
                        hub_policy_array_free(arr, cap);
                        arr = na;
                        cap = ncap;
                }
                k = row_to_policy(r->st_policy_list, &arr[n]);
                if (k < 0)
                        goto out;
                n++;
        }
        k = rc == SQLITE_DONE ? 0 : sql_errno(rc);
out:
        sqlite3_reset(r->st_policy_list);
        if (k < 0) {
                hub_policy_array_free(arr, cap);
                return k;
        }
        *ret = arr;
        *ret_n = n;
        return 0;
}

int hub_registry_policy_set_keys(struct hub_registry *r, const char *name, const char *primary,
                                 const char *secondary) {
        _cleanup_(write_ctx_done) struct write_ctx c = {};
        char buf[89];
        int k;

        if (!r || !name || (!primary && !secondary))
                return -EINVAL;
        for (int i = 0; i < 2; i++) {
                const char *key = i == 0 ? primary : secondary;
                if (!key)
                        continue;
                if (strlen(key) >= sizeof buf || !key_valid(key, sizeof buf))
                        return -EINVAL;
        }
        c.id = name;
        c.policy_primary = primary;
        c.policy_secondary = secondary;
        k = hub_store_submit_wait(r->store, write_policy_keys, &c);
        if (k < 0)
                return k;
        hub_log_debug(r->log, "registry: replaced keys of policy %s", name);
        return 0;
}
