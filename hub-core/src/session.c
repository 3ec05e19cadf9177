/* SPDX-License-Identifier: MIT */
/* Device sessions (hub/session.h): the table of live sessions by identity, takeover,
 * connection-state events, registry connection columns, observers.
 *
 * Lifetime: a session is referenced by its protocol (from register to unregister) and,
 * briefly, while hub-core calls out of it (ops->close may unregister it). It is "live" while
 * it is in the table; the hub closing it (takeover, device disabled, shutdown) takes it out
 * of the table at once, so a new connection of the same identity can register right away,
 * and the protocol's later unregister only frees it.
 *
 * connection-state sequence numbers (reference §8.7: hex, strictly increasing, compared as
 * strings) are 64 upper-case hex digits: a generation bumped durably each time the table is
 * created (so numbers keep growing across restarts whatever the wall clock does), a counter
 * within the generation, and the wall-clock time for readability. */

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/store.h"
#include "store-internal.h"

#define MAX_OBSERVERS 8
#define HUB_NAME_MAX 256

struct hub_session {
        struct hub_sessions *hs; /* NULL once the table is gone */
        char *device_id, *module_id, *auth_gen;
        char *key; /* "device" or "device/module" ('/' is not allowed in ids) */
        const struct hub_session_ops *ops;
        void *ud;
        unsigned caps;
        bool live;
        bool unregistered;
        unsigned n_ref;
        uint64_t activity_written_mono; /* when lastActivity was last written */
        struct hub_session *prev, *next; /* every session not yet freed */
        struct hub_session *hnext;       /* hash chain (live only) */
};

struct observer {
        const struct hub_session_observer *obs;
        void *ud;
};

struct hub_sessions {
        struct hub_store *store;
        struct hub_outbox *outbox;
        const struct hub_clock *clock;
        const struct hub_log *log;
        char *hub_name;

        struct hub_session **buckets;
        size_t n_buckets, n_live;
        struct hub_session *all;

        struct observer observers[MAX_OBSERVERS];
        size_t n_observers;

        uint64_t generation, counter;
        unsigned n_pending; /* registry writes queued */
        struct hub_sessions_stats stats;
};

/* ---- hash table ---------------------------------------------------------------------------- */

static uint64_t hash_str(const char *s) {
        uint64_t h = UINT64_C(1469598103934665603);
        for (; *s; s++) {
                h ^= (unsigned char) *s;
                h *= UINT64_C(1099511628211);
        }
        return h;
}

static int make_key(const char *device_id, const char *module_id, char **ret) {
        char *k;
        if (asprintf(&k, "%s%s%s", device_id, module_id ? "/" : "", module_id ? module_id : "") < 0)
                return -ENOMEM;
        *ret = k;
        return 0;
}

static struct hub_session *table_find(struct hub_sessions *hs, const char *key) {
        if (hs->n_buckets == 0)
                return NULL;
        for (struct hub_session *s = hs->buckets[hash_str(key) & (hs->n_buckets - 1)]; s; s = s->hnext)
                if (streq(s->key, key))
                        return s;
        return NULL;
}

static int table_grow(struct hub_sessions *hs) {
        size_t nb = hs->n_buckets ? hs->n_buckets * 2 : 64;
        struct hub_session **b = calloc(nb, sizeof *b);

        if (!b)
                return -ENOMEM;
        for (size_t i = 0; i < hs->n_buckets; i++)
                for (struct hub_session *s = hs->buckets[i], *next; s; s = next) {
                        next = s->hnext;
                        size_t j = hash_str(s->key) & (nb - 1);
                        s->hnext = b[j];
                        b[j] = s;
                }
        free(hs->buckets);
        hs->buckets = b;
        hs->n_buckets = nb;
        return 0;
}

static int table_add(struct hub_sessions *hs, struct hub_session *s) {
        if (hs->n_live + 1 > hs->n_buckets) {
                int r = table_grow(hs);
                if (r < 0)
                        return r;
        }
        size_t j = hash_str(s->key) & (hs->n_buckets - 1);
        s->hnext = hs->buckets[j];
        hs->buckets[j] = s;
        hs->n_live++;
        return 0;
}

static void table_remove(struct hub_sessions *hs, struct hub_session *s) {
        struct hub_session **p = &hs->buckets[hash_str(s->key) & (hs->n_buckets - 1)];
        for (; *p; p = &(*p)->hnext)
                if (*p == s) {
                        *p = s->hnext;
                        s->hnext = NULL;
                        hs->n_live--;
                        return;
                }
}

/* ---- session references ------------------------------------------------------------------ */

static void session_ref(struct hub_session *s) {
        s->n_ref++;
}

static void session_unref(struct hub_session *s) {
        if (--s->n_ref > 0)
                return;
        if (s->hs) {
                if (s->prev)
                        s->prev->next = s->next;
                else
                        s->hs->all = s->next;
                if (s->next)
                        s->next->prev = s->prev;
        }
        free(s->device_id);
        free(s->module_id);
        free(s->auth_gen);
        free(s->key);
        free(s);
}

/* ---- registry columns ---------------------------------------------------------------------- */

struct state_write {
        struct hub_sessions *hs;
        char device_id[HUB_DEVICE_ID_MAX + 1];
        int state; /* HUB_CONNECTED / HUB_DISCONNECTED, or -1 for activity only */
        uint64_t when;
};

static int state_write_fn(struct hub_store_txn *txn, void *ud) {
        struct state_write *w = ud;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        if (w->state >= 0)
                rc = sqlite3_prepare_v2(db,
                                        "UPDATE devices SET connection_state = ?2, connection_state_updated = ?3, "
                                        "last_activity = MAX(last_activity, ?3) WHERE device_id = ?1",
                                        -1, &st, NULL);
        else
                rc = sqlite3_prepare_v2(db, "UPDATE devices SET last_activity = MAX(last_activity, ?3) WHERE device_id = ?1",
                                        -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_text(st, 1, w->device_id, -1, SQLITE_STATIC);
                if (w->state >= 0)
                        sqlite3_bind_int(st, 2, w->state);
                sqlite3_bind_int64(st, 3, (sqlite3_int64) w->when);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

static void state_write_done(int r, void *ud) {
        struct state_write *w = ud;

        w->hs->n_pending--;
        if (r < 0)
                hub_log_debug(w->hs->log, "sessions: registry connection state of %s not updated: %s", w->device_id,
                              strerror(-r));
        free(w);
}

/* Registry rows exist for devices only (no module table). */
static void write_state(struct hub_sessions *hs, const struct hub_session *s, int state) {
        struct state_write *w;

        if (s->module_id)
                return;
        w = calloc(1, sizeof *w);
        if (!w)
                return;
        w->hs = hs;
        snprintf(w->device_id, sizeof w->device_id, "%s", s->device_id);
        w->state = state;
        w->when = hub_clock_now(hs->clock);
        if (hub_store_submit(hs->store, state_write_fn, state_write_done, w) < 0) {
                hub_log_debug(hs->log, "sessions: cannot queue the registry update of %s", s->device_id);
                free(w);
                return;
        }
        hs->n_pending++;
}

/* ---- connection-state events (reference §8.7) ------------------------------------------- */

static void emit_state_event(struct hub_sessions *hs, const struct hub_session *s, bool connected) {
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        char body[128], seqnum[72], now_str[32], cid[33];
        const char *op = connected ? "deviceConnected" : "deviceDisconnected";
        uint64_t now;
        int k;

        if (!hs->outbox)
                return;
        now = hub_clock_now(hs->clock);
        hs->counter++;
        snprintf(seqnum, sizeof seqnum, "%016" PRIX64 "%016" PRIX64 "%016" PRIX64 "0000000000000000", hs->generation,
                 hs->counter, now);
        snprintf(body, sizeof body, "{\"sequenceNumber\":\"%s\"}", seqnum);
        hub_time_format_iso8601(now, now_str);

        k = hub_random_hex(cid, 16);
        if (k >= 0)
                k = hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, cid);
        if (k >= 0 && hs->hub_name)
                k = hub_msg_set_sys(m, HUB_SYS_USER_ID, hs->hub_name);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, s->device_id);
        if (k >= 0 && s->module_id)
                k = hub_msg_set_sys(m, HUB_SYS_CONNECTION_MODULE_ID, s->module_id);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, now_str);
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "deviceConnectionStateEvents");
        if (k >= 0)
                k = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SCHEMA, "deviceConnectionStateNotification");
        if (k >= 0 && hs->hub_name)
                k = hub_msg_set_prop(m, "hubName", hs->hub_name);
        if (k >= 0)
                k = hub_msg_set_prop(m, "deviceId", s->device_id);
        if (k >= 0 && s->module_id)
                k = hub_msg_set_prop(m, "moduleId", s->module_id);
        if (k >= 0)
                k = hub_msg_set_prop(m, "operationTimestamp", now_str);
        if (k >= 0)
                k = hub_msg_set_prop(m, "iothub-message-schema", "deviceConnectionStateNotification");
        if (k >= 0)
                k = hub_msg_set_prop(m, "opType", op);
        if (k >= 0)
                k = hub_outbox_append(hs->outbox, m, NULL, NULL);
        if (k < 0) {
                hs->stats.event_failures++;
                hub_log_debug(hs->log, "sessions: %s event of %s not stored: %s", op, s->key, strerror(-k));
        }
}

/* ---- going offline ------------------------------------------------------------------------- */

/* Takes a live session out of the table: disconnected event, registry, observers. */
static void go_offline(struct hub_session *s, int reason) {
        struct hub_sessions *hs = s->hs;

        if (!s->live || !hs)
                return;
        s->live = false;
        table_remove(hs, s);
        emit_state_event(hs, s, false);
        write_state(hs, s, HUB_DISCONNECTED);
        session_ref(s);
        for (size_t i = 0; i < hs->n_observers; i++)
                if (hs->observers[i].obs->gone)
                        hs->observers[i].obs->gone(hs->observers[i].ud, s, reason);
        session_unref(s);
}

static void hub_close_session(struct hub_session *s, int reason, const char *why) {
        if (!s->live)
                return;
        session_ref(s);
        s->hs->stats.closed_by_hub++;
        go_offline(s, reason);
        s->ops->close(s->ud, reason, why);
        session_unref(s);
}

/* ---- the table ------------------------------------------------------------------------------ */

struct gen_write {
        uint64_t now;
        uint64_t generation; /* out */
};

static int gen_write_fn(struct hub_store_txn *txn, void *ud) {
        struct gen_write *g = ud;
        sqlite3 *db = hub_store_txn_db(txn);
        sqlite3_stmt *st = NULL;
        int rc;

        rc = sqlite3_exec(db,
                          "INSERT INTO meta (key, value) VALUES ('session_generation', '1') "
                          "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                          NULL, NULL, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_prepare_v2(db, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'session_generation'",
                                        -1, &st, NULL);
        if (rc == SQLITE_OK)
                rc = sqlite3_step(st);
        if (rc == SQLITE_ROW)
                g->generation = (uint64_t) sqlite3_column_int64(st, 0);
        sqlite3_finalize(st);
        if (rc != SQLITE_ROW)
                return hub_store_errno(rc);
        st = NULL;

        /* No session survives a restart: what the previous run left "connected" is not. */
        rc = sqlite3_prepare_v2(db,
                                "UPDATE devices SET connection_state = 0, connection_state_updated = ?1 "
                                "WHERE connection_state != 0",
                                -1, &st, NULL);
        if (rc == SQLITE_OK) {
                sqlite3_bind_int64(st, 1, (sqlite3_int64) g->now);
                rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        return rc == SQLITE_DONE ? 0 : hub_store_errno(rc);
}

int hub_sessions_new(const struct hub_sessions_options *opts, struct hub_sessions **ret) {
        struct hub_sessions *hs;
        struct gen_write g = { 0 };
        int r;

        if (!opts || !opts->store || !opts->clock || !ret ||
            (opts->hub_name && (!*opts->hub_name || strlen(opts->hub_name) > HUB_NAME_MAX)))
                return -EINVAL;

        g.now = hub_clock_now(opts->clock);
        r = hub_store_submit_wait(opts->store, gen_write_fn, &g);
        if (r < 0)
                return r;

        hs = calloc(1, sizeof *hs);
        if (!hs)
                return -ENOMEM;
        hs->store = opts->store;
        hs->outbox = opts->outbox;
        hs->clock = opts->clock;
        hs->log = opts->log;
        hs->generation = g.generation;
        if (opts->hub_name) {
                hs->hub_name = strdup(opts->hub_name);
                if (!hs->hub_name) {
                        free(hs);
                        return -ENOMEM;
                }
        }
        *ret = hs;
        return 0;
}

struct hub_sessions *hub_sessions_free(struct hub_sessions *hs) {
        if (!hs)
                return NULL;
        for (size_t i = 0; i < hs->n_buckets; i++)
                while (hs->buckets[i])
                        hub_close_session(hs->buckets[i], -ESHUTDOWN, "the hub is shutting down");
        while (hs->n_pending > 0) {
                struct pollfd p = { .fd = hub_store_get_fd(hs->store), .events = POLLIN };
                if (p.fd < 0 || (poll(&p, 1, -1) < 0 && errno != EINTR))
                        break;
                (void) hub_store_dispatch(hs->store);
        }
        /* Detach what the protocols have not unregistered yet. */
        for (struct hub_session *s = hs->all, *next; s; s = next) {
                next = s->next;
                s->hs = NULL;
                s->prev = s->next = NULL;
        }
        free(hs->buckets);
        free(hs->hub_name);
        free(hs);
        return NULL;
}

int hub_sessions_add_observer(struct hub_sessions *hs, const struct hub_session_observer *obs, void *ud) {
        if (!hs || !obs)
                return -EINVAL;
        if (hs->n_observers >= MAX_OBSERVERS)
                return -ENOSPC;
        hs->observers[hs->n_observers++] = (struct observer) { .obs = obs, .ud = ud };
        return 0;
}

void hub_sessions_remove_observer(struct hub_sessions *hs, const struct hub_session_observer *obs, void *ud) {
        if (!hs)
                return;
        for (size_t i = 0; i < hs->n_observers; i++)
                if (hs->observers[i].obs == obs && hs->observers[i].ud == ud) {
                        memmove(hs->observers + i, hs->observers + i + 1,
                                (hs->n_observers - i - 1) * sizeof *hs->observers);
                        hs->n_observers--;
                        return;
                }
}

static void notify_caps(struct hub_session *s, unsigned old_caps) {
        struct hub_sessions *hs = s->hs;

        session_ref(s);
        for (size_t i = 0; i < hs->n_observers && s->live; i++)
                if (hs->observers[i].obs->capabilities)
                        hs->observers[i].obs->capabilities(hs->observers[i].ud, s, old_caps, s->caps);
        session_unref(s);
}

int hub_sessions_register(struct hub_sessions *hs, const char *device_id, const char *module_id,
                          const char *auth_generation_id, const struct hub_session_ops *ops, void *ud,
                          struct hub_session **ret) {
        _cleanup_free_ char *key = NULL;
        struct hub_session *s, *old;
        int r;

        if (!hs || !device_id || !hub_device_id_valid(device_id) || (module_id && !hub_device_id_valid(module_id)) ||
            !ops || ops->version != HUB_SESSION_OPS_VERSION || !ops->close || !ret ||
            (auth_generation_id && strlen(auth_generation_id) > 64))
                return -EINVAL;

        r = make_key(device_id, module_id, &key);
        if (r < 0)
                return r;

        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->device_id = strdup(device_id);
        s->module_id = module_id ? strdup(module_id) : NULL;
        s->auth_gen = auth_generation_id ? strdup(auth_generation_id) : NULL;
        if (!s->device_id || (module_id && !s->module_id) || (auth_generation_id && !s->auth_gen)) {
                free(s->device_id);
                free(s->module_id);
                free(s->auth_gen);
                free(s);
                return -ENOMEM;
        }
        s->key = TAKE_PTR(key);
        s->hs = hs;
        s->ops = ops;
        s->ud = ud;
        s->n_ref = 1; /* the protocol's, until hub_session_unregister() */

        /* One connection per identity: the old one goes first (its disconnected event and
         * registry write come before the new connected ones). */
        old = table_find(hs, s->key);
        if (old) {
                hs->stats.taken_over++;
                hub_close_session(old, -EEXIST, "taken over by a new connection");
        }
        r = table_add(hs, s);
        if (r < 0) {
                s->hs = NULL;
                session_unref(s);
                return r;
        }
        s->live = true;
        s->next = hs->all;
        if (hs->all)
                hs->all->prev = s;
        hs->all = s;
        hs->stats.registered++;
        s->activity_written_mono = hub_clock_mono(hs->clock);

        emit_state_event(hs, s, true);
        write_state(hs, s, HUB_CONNECTED);
        notify_caps(s, 0);
        hub_log_debug(hs->log, "sessions: %s connected", s->key);
        *ret = s;
        return 0;
}

void hub_session_unregister(struct hub_session *s) {
        if (!s || s->unregistered)
                return;
        s->unregistered = true;
        if (s->live)
                go_offline(s, 0);
        session_unref(s);
}

int hub_session_set_capabilities(struct hub_session *s, unsigned caps) {
        unsigned old;

        if (!s || (caps & ~_HUB_SESSION_CAPS_ALL))
                return -EINVAL;
        if (!s->live)
                return -ENOTCONN;
        old = s->caps;
        s->caps = caps;
        if (old != caps)
                notify_caps(s, old);
        return 0;
}

unsigned hub_session_get_capabilities(const struct hub_session *s) {
        return s && s->live ? s->caps : 0;
}

void hub_session_ready(struct hub_session *s) {
        struct hub_sessions *hs;

        if (!s || !s->live)
                return;
        hs = s->hs;
        session_ref(s);
        for (size_t i = 0; i < hs->n_observers && s->live; i++)
                if (hs->observers[i].obs->ready)
                        hs->observers[i].obs->ready(hs->observers[i].ud, s);
        session_unref(s);
}

void hub_session_touch(struct hub_session *s) {
        uint64_t now;

        if (!s || !s->live)
                return;
        now = hub_clock_mono(s->hs->clock);
        if (now - s->activity_written_mono < HUB_SESSION_ACTIVITY_INTERVAL_USEC)
                return;
        s->activity_written_mono = now;
        write_state(s->hs, s, -1);
}

void hub_sessions_touch_device(struct hub_sessions *hs, const char *device_id) {
        struct state_write *w;

        if (!hs || !device_id || strlen(device_id) > HUB_DEVICE_ID_MAX)
                return;
        w = calloc(1, sizeof *w);
        if (!w)
                return;
        w->hs = hs;
        snprintf(w->device_id, sizeof w->device_id, "%s", device_id);
        w->state = -1;
        w->when = hub_clock_now(hs->clock);
        if (hub_store_submit(hs->store, state_write_fn, state_write_done, w) < 0) {
                free(w);
                return;
        }
        hs->n_pending++;
}

const char *hub_session_device_id(const struct hub_session *s) {
        return s ? s->device_id : NULL;
}

const char *hub_session_module_id(const struct hub_session *s) {
        return s ? s->module_id : NULL;
}

const char *hub_session_auth_generation_id(const struct hub_session *s) {
        return s ? s->auth_gen : NULL;
}

void *hub_session_userdata(const struct hub_session *s) {
        return s ? s->ud : NULL;
}

bool hub_session_is_live(const struct hub_session *s) {
        return s && s->live;
}

struct hub_session *hub_sessions_find(struct hub_sessions *hs, const char *device_id, const char *module_id) {
        _cleanup_free_ char *key = NULL;

        if (!hs || !device_id)
                return NULL;
        if (make_key(device_id, module_id, &key) < 0)
                return NULL;
        return table_find(hs, key);
}

int hub_sessions_close_device(struct hub_sessions *hs, const char *device_id, int reason_errno, const char *why) {
        struct hub_session *s;
        int n = 0;

        if (!hs || !device_id)
                return -EINVAL;
        /* The device and its modules; closing changes the table, so restart after each. */
        for (;;) {
                for (s = hs->all; s; s = s->next)
                        if (s->live && streq(s->device_id, device_id))
                                break;
                if (!s)
                        break;
                hub_close_session(s, reason_errno, why ? why : "closed by the hub");
                n++;
        }
        return n;
}

int hub_session_deliver_c2d(struct hub_session *s, struct hub_msg *m, const char *lock_token) {
        if (!s || !m || !lock_token)
                return -EINVAL;
        if (!s->live || !(s->caps & HUB_SESSION_C2D) || !s->ops->deliver_c2d)
                return -ENOTCONN;
        return s->ops->deliver_c2d(s->ud, m, lock_token);
}

int hub_session_deliver_desired(struct hub_session *s, const char *json_patch, int64_t version) {
        if (!s || !json_patch)
                return -EINVAL;
        if (!s->live || !(s->caps & HUB_SESSION_DESIRED) || !s->ops->desired_patch)
                return -ENOTCONN;
        return s->ops->desired_patch(s->ud, json_patch, version);
}

int hub_session_deliver_method(struct hub_session *s, const char *method_name, const char *json_payload,
                               const char *request_id) {
        if (!s || !method_name || !json_payload || !request_id)
                return -EINVAL;
        if (!s->live || !(s->caps & HUB_SESSION_METHODS) || !s->ops->method_request)
                return -ENOTCONN;
        return s->ops->method_request(s->ud, method_name, json_payload, request_id);
}

int hub_sessions_deliver_desired(struct hub_sessions *hs, const char *device_id, const char *module_id,
                                 const char *json_patch, int64_t version) {
        struct hub_session *s = hub_sessions_find(hs, device_id, module_id);
        if (!s)
                return -ENOTCONN;
        return hub_session_deliver_desired(s, json_patch, version);
}

void hub_sessions_get_stats(struct hub_sessions *hs, struct hub_sessions_stats *ret) {
        if (!hs || !ret)
                return;
        *ret = hs->stats;
        ret->live = hs->n_live;
        ret->with_c2d = ret->with_desired = ret->with_methods = 0;
        for (struct hub_session *s = hs->all; s; s = s->next) {
                if (!s->live)
                        continue;
                ret->with_c2d += !!(s->caps & HUB_SESSION_C2D);
                ret->with_desired += !!(s->caps & HUB_SESSION_DESIRED);
                ret->with_methods += !!(s->caps & HUB_SESSION_METHODS);
        }
}
