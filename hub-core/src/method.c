/* SPDX-License-Identifier: MIT */
/* Direct method calls (hub/method.h).
 *
 * A call is either waiting for its device to connect and subscribe to methods (deadline:
 * the connect timeout) or sent and waiting for the answer (deadline: the response timeout,
 * counted from the moment it was sent). The table observes sessions: a session gaining the
 * METHODS capability sends the calls waiting for its identity; a session going away fails
 * the calls sent through it. Calls are few (each is an HTTP request waiting), so they live
 * in one list searched linearly. Request ids are a per-table counter in hex: short, unique
 * for the life of the process, and matched together with the session, so one device cannot
 * answer another's call. */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "hub/method.h"
#include "hub/registry.h"
#include "hub/session.h"

enum call_state { CALL_WAITING, CALL_SENT };

struct call {
        struct call *prev, *next;
        enum call_state state;
        char *device_id, *module_id, *name, *payload;
        char rid[HUB_METHOD_REQUEST_ID_MAX + 1];
        struct hub_session *session; /* CALL_SENT */
        uint64_t deadline;
        uint64_t response_timeout_usec;
        hub_method_done_fn done;
        void *ud;
};

struct hub_methods {
        struct hub_sessions *hs;
        struct hub_registry *registry;
        const struct hub_clock *clock;
        const struct hub_log *log;
        struct call *calls, *calls_tail;
        size_t n_calls;
        uint64_t next_rid;
};

bool hub_method_name_valid(const char *name) {
        size_t n = 0;

        if (!name)
                return false;
        for (const unsigned char *p = (const unsigned char *) name; *p; p++, n++) {
                if (*p <= 0x20 || *p >= 0x7f || strchr("$()<>@,;:\\\"/[]?={}", *p))
                        return false;
        }
        return n >= 1 && n <= HUB_METHOD_NAME_MAX;
}

static void call_free(struct call *c) {
        free(c->device_id);
        free(c->module_id);
        free(c->name);
        free(c->payload);
        free(c);
}

static void call_unlink(struct hub_methods *m, struct call *c) {
        if (c->prev)
                c->prev->next = c->next;
        else
                m->calls = c->next;
        if (c->next)
                c->next->prev = c->prev;
        else
                m->calls_tail = c->prev;
        c->prev = c->next = NULL;
        m->n_calls--;
}

static void call_link(struct hub_methods *m, struct call *c) {
        c->prev = m->calls_tail;
        c->next = NULL;
        if (m->calls_tail)
                m->calls_tail->next = c;
        else
                m->calls = c;
        m->calls_tail = c;
        m->n_calls++;
}

/* Unlinks, completes and frees. The callback may start new calls. */
static void call_complete(struct hub_methods *m, struct call *c, int status, const char *payload) {
        call_unlink(m, c);
        c->done(status, payload, c->ud);
        call_free(c);
}

/* Sends a call through s. Returns 0 or the session's error. */
static int call_send(struct hub_methods *m, struct call *c, struct hub_session *s, uint64_t now) {
        int r;

        snprintf(c->rid, sizeof c->rid, "%" PRIx64, ++m->next_rid);
        r = hub_session_deliver_method(s, c->name, c->payload, c->rid);
        if (r < 0)
                return r;
        c->state = CALL_SENT;
        c->session = s;
        c->deadline = now + c->response_timeout_usec;
        return 0;
}

static bool call_matches(const struct call *c, struct hub_session *s) {
        const char *mod = hub_session_module_id(s);

        if (!streq(c->device_id, hub_session_device_id(s)))
                return false;
        if (!c->module_id || !mod)
                return !c->module_id && !mod;
        return streq(c->module_id, mod);
}

/* ---- session observer ---------------------------------------------------------------------- */

static void on_capabilities(void *ud, struct hub_session *s, unsigned old_caps, unsigned new_caps) {
        struct hub_methods *m = ud;
        uint64_t now;

        if ((old_caps & HUB_SESSION_METHODS) || !(new_caps & HUB_SESSION_METHODS))
                return;
        now = hub_clock_mono(m->clock);
        for (struct call *c = m->calls, *next; c; c = next) {
                next = c->next; /* the device may answer from inside the send */
                if (c->state != CALL_WAITING || !call_matches(c, s))
                        continue;
                int r = call_send(m, c, s, now);
                if (r < 0)
                        /* Stays waiting until its connect deadline. */
                        hub_log_debug(m->log, "methods: call %s on %s not sent: %s", c->name, c->device_id,
                                      strerror(-r));
        }
}

static void on_gone(void *ud, struct hub_session *s, int reason) {
        struct hub_methods *m = ud;
        struct call *c, *next, *failed = NULL;

        (void) reason;
        /* Collect first: completions may start new calls. */
        for (c = m->calls; c; c = next) {
                next = c->next;
                if (c->state == CALL_SENT && c->session == s) {
                        call_unlink(m, c);
                        c->next = failed;
                        failed = c;
                }
        }
        for (c = failed; c; c = next) {
                next = c->next;
                c->done(-ECONNRESET, NULL, c->ud);
                call_free(c);
        }
}

static const struct hub_session_observer observer = {
        .capabilities = on_capabilities,
        .gone = on_gone,
};

/* ---- API ------------------------------------------------------------------------------------- */

int hub_methods_new(struct hub_sessions *hs, struct hub_registry *registry, const struct hub_clock *clock,
                    const struct hub_log *log, struct hub_methods **ret) {
        struct hub_methods *m;
        int r;

        if (!hs || !clock || !ret)
                return -EINVAL;
        m = calloc(1, sizeof *m);
        if (!m)
                return -ENOMEM;
        m->hs = hs;
        m->registry = registry;
        m->clock = clock;
        m->log = log;
        r = hub_sessions_add_observer(hs, &observer, m);
        if (r < 0) {
                free(m);
                return r;
        }
        *ret = m;
        return 0;
}

struct hub_methods *hub_methods_free(struct hub_methods *m) {
        if (!m)
                return NULL;
        hub_sessions_remove_observer(m->hs, &observer, m);
        while (m->calls)
                call_complete(m, m->calls, -ESHUTDOWN, NULL);
        free(m);
        return NULL;
}

static int set_error(const char **ret_error, const char *what) {
        if (ret_error)
                *ret_error = what;
        return -EINVAL;
}

int hub_method_invoke(struct hub_methods *m, const char *device_id, const char *module_id, const char *name,
                      const char *json_payload, int response_timeout, int connect_timeout, uint64_t now,
                      hub_method_done_fn done, void *ud, const char **ret_error) {
        struct hub_session *s;
        struct call *c;
        int r;

        if (!m || !done)
                return set_error(ret_error, "internal: missing method table or completion");
        if (!device_id || !hub_device_id_valid(device_id))
                return set_error(ret_error, "invalid device id");
        if (module_id && !hub_device_id_valid(module_id))
                return set_error(ret_error, "invalid module id");
        if (!hub_method_name_valid(name))
                return set_error(ret_error,
                                 "invalid methodName: 1 to 128 printable ASCII characters, none of "
                                 "$ ( ) < > @ , ; : \\ \" / [ ] ? = { }, space or tab");
        if (response_timeout == HUB_METHOD_TIMEOUT_DEFAULT)
                response_timeout = HUB_METHOD_RESPONSE_TIMEOUT_DEFAULT;
        if (connect_timeout == HUB_METHOD_TIMEOUT_DEFAULT)
                connect_timeout = HUB_METHOD_CONNECT_TIMEOUT_DEFAULT;
        if (response_timeout < HUB_METHOD_RESPONSE_TIMEOUT_MIN || response_timeout > HUB_METHOD_RESPONSE_TIMEOUT_MAX)
                return set_error(ret_error, "responseTimeoutInSeconds must be between 5 and 300");
        if (connect_timeout < 0 || connect_timeout > HUB_METHOD_CONNECT_TIMEOUT_MAX)
                return set_error(ret_error, "connectTimeoutInSeconds must be between 0 and 300");
        if (!json_payload)
                json_payload = "null";
        if (strlen(json_payload) > HUB_METHOD_PAYLOAD_MAX)
                return set_error(ret_error, "payload is larger than 128 KB");
        json_error_t jerr;
        json_t *j = json_loads(json_payload, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
        if (!j)
                return set_error(ret_error, "payload is not valid JSON");
        json_decref(j);

        if (m->registry) {
                struct hub_device d;
                r = hub_registry_get(m->registry, device_id, &d);
                if (r == -ENOENT) {
                        if (ret_error)
                                *ret_error = "device not found";
                        return -ENOENT;
                }
                if (r < 0)
                        return r;
                hub_device_done(&d);
        }

        s = hub_sessions_find(m->hs, device_id, module_id);
        bool online = s && (hub_session_get_capabilities(s) & HUB_SESSION_METHODS);
        if (!online && connect_timeout == 0) {
                if (ret_error)
                        *ret_error = s ? "the device is not subscribed to direct methods" : "the device is not online";
                return -ENOTCONN;
        }

        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->device_id = strdup(device_id);
        c->module_id = module_id ? strdup(module_id) : NULL;
        c->name = strdup(name);
        c->payload = strdup(json_payload);
        if (!c->device_id || (module_id && !c->module_id) || !c->name || !c->payload) {
                call_free(c);
                return -ENOMEM;
        }
        c->response_timeout_usec = (uint64_t) response_timeout * USEC_PER_SEC;
        c->done = done;
        c->ud = ud;

        if (online) {
                r = call_send(m, c, s, now);
                if (r < 0) {
                        if (ret_error)
                                *ret_error = r == -EAGAIN ? "the device cannot take more requests now"
                                                          : "the device is not online";
                        call_free(c);
                        return r;
                }
        } else {
                c->state = CALL_WAITING;
                c->deadline = now + (uint64_t) connect_timeout * USEC_PER_SEC;
        }
        call_link(m, c);
        return 0;
}

int hub_method_response(struct hub_methods *m, struct hub_session *s, const char *request_id, int status,
                        const char *json_payload) {
        if (!m || !s || !request_id || status < 0)
                return -EINVAL;
        for (struct call *c = m->calls; c; c = c->next) {
                if (c->state != CALL_SENT || c->session != s || !streq(c->rid, request_id))
                        continue;
                if (json_payload && strlen(json_payload) > HUB_METHOD_PAYLOAD_MAX) {
                        call_complete(m, c, -E2BIG, NULL);
                        return -E2BIG;
                }
                if (json_payload && !*json_payload)
                        json_payload = NULL;
                call_complete(m, c, status, json_payload);
                return 0;
        }
        return -ENOENT;
}

uint64_t hub_method_next_deadline(struct hub_methods *m) {
        uint64_t t = UINT64_MAX;

        if (!m)
                return t;
        for (struct call *c = m->calls; c; c = c->next)
                t = MIN(t, c->deadline);
        return t;
}

int hub_method_tick(struct hub_methods *m, uint64_t now) {
        struct call *c, *next, *expired = NULL;
        int n = 0;

        if (!m)
                return -EINVAL;
        for (c = m->calls; c; c = next) {
                next = c->next;
                if (c->deadline <= now) {
                        call_unlink(m, c);
                        c->next = expired;
                        expired = c;
                }
        }
        for (c = expired; c; c = next) {
                next = c->next;
                c->done(c->state == CALL_WAITING ? -ENOTCONN : -ETIMEDOUT, NULL, c->ud);
                call_free(c);
                n++;
        }
        return n;
}

size_t hub_method_pending(struct hub_methods *m) {
        return m ? m->n_calls : 0;
}
