/* SPDX-License-Identifier: MIT */
/* fieldhubd lifecycle: start, the loop, reload on SIGHUP, graceful stop, the watchdog. */

#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "adapters.h"
#include "api/api.h"
#include "front/mqtt.h"
#include "front/coap.h"
#include "uplink/uplink.h"
#include "daemon.h"
#include "hub.h"
#include "hub/clock.h"
#include "hub/msg.h"
#include "log-ids.h"
#include "log.h"
#include "notify.h"

static uint64_t mono_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_BOOTTIME, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

static enum gw_log_target_kind log_target_of(enum gw_log_target t) {
        switch (t) {
        case GW_LOG_TARGET_JOURNAL:
                return GW_LOG_TO_JOURNAL;
        case GW_LOG_TARGET_STDERR:
                return GW_LOG_TO_STDERR;
        default:
                return GW_LOG_TO_AUTO;
        }
}

static char **host_names_of(const struct gw_config *c) {
        size_t n = 0;
        while (c->host_aliases && c->host_aliases[n])
                n++;
        char **v = calloc(n + 2, sizeof(char *));
        if (!v)
                return NULL;
        v[0] = c->host_name;
        for (size_t i = 0; i < n; i++)
                v[i + 1] = c->host_aliases[i];
        return v;
}

/* Logs every configuration error, one entry each, and returns them as a JSON array. */
static json_t *log_config_errors(struct adp_conf_errors *e, int level) {
        json_t *arr = json_array();
        for (size_t i = 0; i < adp_conf_errors_count(e); i++) {
                const char *m = adp_conf_errors_get(e, i);
                gw_log_full(level, 0, GW_FIELDS(.component = "config", .no_ratelimit = true),
                            "%s", m);
                if (arr)
                        json_array_append_new(arr, json_string(m));
        }
        return arr;
}

static void apply_log_config(struct gw_daemon *d, const struct gw_config *c) {
        gw_log_setup(log_target_of(c->log_target), d->opts.log_level >= 0 ? d->opts.log_level : c->log_level);
        gw_log_set_rate_limit(c->log_rate_interval_usec, c->log_rate_burst);
}

/* Policy keys from key files or credentials replace the generated ones. */
static int apply_policy_keys(struct gw_daemon *d, const struct gw_config *c) {
        gw_log_clear_secrets();
        for (size_t i = 0; i < c->n_policy_keys; i++) {
                const struct gw_policy_key *k = &c->policy_keys[i];
                (void) gw_log_add_secret(k->primary_key);
                if (k->secondary_key)
                        (void) gw_log_add_secret(k->secondary_key);
                int r = hub_registry_policy_set_keys(d->registry, k->name, k->primary_key, k->secondary_key);
                if (r < 0)
                        return gw_log_errno(LOG_ERR, r, "Cannot set the keys of policy %s: %m", k->name);
                gw_log_info("Shared access policy %s uses the key%s from the configuration", k->name,
                            k->secondary_key ? "s" : "");
        }
        return 0;
}

void gw_daemon_status_line(struct gw_daemon *d, char *buf, size_t n) {
        uint64_t total = 0, enabled = 0, disabled = 0;
        if (d->registry)
                (void) hub_registry_count(d->registry, &total, &enabled, &disabled);
        snprintf(buf, n, "Hub %s: %llu device%s (%llu enabled)%s%s%s", d->config->host_name,
                 (unsigned long long) total, total == 1 ? "" : "s", (unsigned long long) enabled,
                 d->store_stalled ? "; STORE STALLED" : "", d->last_reload_error ? "; last reload rejected: " : "",
                 d->last_reload_error ? d->last_reload_error : "");
}

static void notify_ready(struct gw_daemon *d) {
        char status[512];
        gw_daemon_status_line(d, status, sizeof status);
        gw_notify_ready(status);
}

json_t *gw_daemon_status(struct gw_daemon *d) {
        struct hub_store_stats st;
        uint64_t total = 0, enabled = 0, disabled = 0;
        char line[512];

        hub_store_get_stats(d->store, &st);
        (void) hub_registry_count(d->registry, &total, &enabled, &disabled);
        gw_daemon_status_line(d, line, sizeof line);

        json_t *aliases = json_array(), *sources = json_array();
        for (size_t i = 0; d->config->host_aliases && d->config->host_aliases[i]; i++)
                json_array_append_new(aliases, json_string(d->config->host_aliases[i]));
        for (size_t i = 0; d->config->sources && d->config->sources[i]; i++)
                json_array_append_new(sources, json_string(d->config->sources[i]));

        return json_pack("{s:s, s:s, s:s, s:o, s:s, s:o, s:I, s:s, s:{s:I, s:I, s:I}, "
                         "s:{s:s, s:b, s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:I}, "
                         "s:{s:I, s:I, s:s?}, s:I, s:o}",
                         "version", FIELDHUB_VERSION,
                         "status", line,
                         "hostName", d->config->host_name,
                         "hostAliases", aliases,
                         "stateDir", d->opts.state_dir ? d->opts.state_dir : d->config->state_dir,
                         "configSources", sources,
                         "pid", (json_int_t) getpid(),
                         "logLevel", gw_log_level_to_string(gw_log_get_max_level()),
                         "devices", "total", (json_int_t) total, "enabled", (json_int_t) enabled,
                         "disabled", (json_int_t) disabled,
                         "store", "path", hub_store_path(d->store), "healthy", !d->store_stalled,
                         "uncleanStartup", hub_store_was_unclean(d->store), "commits", (json_int_t) st.commits,
                         "writes", (json_int_t) st.writes, "pending", (json_int_t) st.pending,
                         "lastBatch", (json_int_t) st.last_batch, "maxBatch", (json_int_t) st.max_batch,
                         "lastCommitUsec", (json_int_t) st.last_commit_usec, "dbBytes", (json_int_t) st.db_bytes,
                         "reloads", "ok", (json_int_t) d->reloads_ok, "failed", (json_int_t) d->reloads_failed,
                         "lastError", d->last_reload_error,
                         "uptimeSec", (json_int_t) ((mono_now() - d->started_mono) / USEC_PER_SEC),
                         "serviceApi", d->api ? gw_api_status(d->api) : json_null());
}

static int on_move_admin(sd_event_source *s, void *userdata) {
        struct gw_daemon *d = userdata;
        struct gw_admin *na = NULL;
        int r = gw_admin_start(d, d->config->admin_socket, &na);
        if (r < 0)
                gw_log_errno(LOG_WARNING, r, "Cannot move the admin socket to %s: %m; keeping %s",
                             d->config->admin_socket, d->admin ? gw_admin_path(d->admin) : "none");
        else {
                gw_admin_stop(d->admin);
                d->admin = na;
        }
        return 0;
}

int gw_daemon_reload(struct gw_daemon *d, json_t **ret_errors) {
        _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
        struct gw_config *nc = NULL;

        gw_notify_reloading();
        gw_log_info("Reloading configuration from %s", d->opts.config_path);

        int r = gw_config_load(d->opts.config_path, d->opts.confd_dir, &nc, &e);
        if (r < 0) {
                json_t *errs = log_config_errors(&e, LOG_ERR);
                const char *first = adp_conf_errors_count(&e) > 0 ? adp_conf_errors_get(&e, 0) : strerror(-r);
                free(d->last_reload_error);
                d->last_reload_error = strdup(first);
                d->reloads_failed++;
                gw_log_event(LOG_ERR, 0, GW_MSG_RELOAD_FAILED, "reload-failed",
                             "Configuration reload rejected (%zu error%s); keeping the running configuration",
                             adp_conf_errors_count(&e), adp_conf_errors_count(&e) == 1 ? "" : "s");
                notify_ready(d);
                if (ret_errors)
                        *ret_errors = errs;
                else
                        json_decref(errs);
                return -EINVAL;
        }

        struct gw_config *old = d->config;
        if (!streq(old->state_dir, nc->state_dir) && !d->opts.state_dir)
                gw_log_warning("state_dir changed from %s to %s: this takes effect after a restart, ignoring",
                               old->state_dir, nc->state_dir);
        if (old->store_stall_timeout_usec != nc->store_stall_timeout_usec)
                gw_log_warning("store.stall_timeout changed: this takes effect after a restart, ignoring");
        if (old->store_max_size != nc->store_max_size)
                gw_log_warning("store.max_size changed: this takes effect after a restart, ignoring");
        hub_store_set_group_interval(d->store, nc->store_group_interval_usec);

        char **hn = host_names_of(nc);
        if (!hn) {
                gw_config_free(nc);
                return gw_log_errno(LOG_ERR, ENOMEM, "Reload failed: %m");
        }

        apply_log_config(d, nc);
        r = apply_policy_keys(d, nc);
        if (r < 0) {
                /* Put the old keys back: the registry must match the running configuration. */
                (void) apply_policy_keys(d, old);
                free(hn);
                gw_config_free(nc);
                apply_log_config(d, old);
                notify_ready(d);
                if (ret_errors)
                        *ret_errors = json_pack("[s]", "cannot apply the shared access policy keys");
                return -EINVAL;
        }

        bool move_admin = !streq(old->admin_socket, nc->admin_socket);

        if (old->c2d_default_ttl_usec != nc->c2d_default_ttl_usec || old->c2d_max_ttl_usec != nc->c2d_max_ttl_usec ||
            old->c2d_lock_timeout_usec != nc->c2d_lock_timeout_usec ||
            old->c2d_max_delivery_count != nc->c2d_max_delivery_count ||
            old->c2d_max_queue_depth != nc->c2d_max_queue_depth ||
            old->c2d_max_lock_expiries != nc->c2d_max_lock_expiries || old->feedback_ttl_usec != nc->feedback_ttl_usec ||
            old->feedback_lock_timeout_usec != nc->feedback_lock_timeout_usec ||
            old->feedback_max_delivery_count != nc->feedback_max_delivery_count)
                gw_log_warning("c2d: / feedback: changed: this takes effect after a restart, ignoring");

        /* Listeners, TLS material and limits; on failure the running ones stay and the whole
         * reload is rejected, so the configuration and what runs never disagree. */
        if (d->api) {
                r = gw_api_reconfigure(d->api, nc, d->opts.state_dir ? d->opts.state_dir : old->state_dir, hn);
                if (r < 0) {
                        (void) apply_policy_keys(d, old);
                        free(hn);
                        gw_config_free(nc);
                        apply_log_config(d, old);
                        free(d->last_reload_error);
                        d->last_reload_error = strdup("cannot apply the service API settings (see the log)");
                        d->reloads_failed++;
                        gw_log_event(LOG_ERR, 0, GW_MSG_RELOAD_FAILED, "reload-failed",
                                     "Configuration reload rejected: the service API listeners or TLS material "
                                     "cannot be applied; keeping the running configuration");
                        notify_ready(d);
                        if (ret_errors)
                                *ret_errors = json_pack("[s]", "cannot apply the service API settings (see the log)");
                        return -EINVAL;
                }
        }

        free(d->host_names);
        d->host_names = hn;
        if (d->mqtt)
                gw_mqtt_reconfigure(d->mqtt, nc, hn);
        d->config = nc;
        /* Adapters: only what changed (their items borrow from both trees until here). */
        (void) gw_adapters_reload(d->adapters, nc);
        /* Routes and endpoints: cursors survive, unchanged connections stay up. */
        (void) gw_uplink_reload(d->uplink, nc);
        gw_config_free(old);
        free(d->last_reload_error);
        d->last_reload_error = NULL;
        d->reloads_ok++;
        /* The request being answered may have come through the admin socket: move the
         * listener only after this dispatch has returned. */
        if (move_admin)
                (void) sd_event_add_defer(d->event, NULL, on_move_admin, d);

        gw_log_event(LOG_NOTICE, 0, GW_MSG_RELOADED, "reloaded", "Configuration reloaded from %s",
                     d->opts.config_path);
        notify_ready(d);
        return 0;
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        struct gw_daemon *d = userdata;
        if (si->ssi_signo == SIGHUP) {
                (void) gw_daemon_reload(d, NULL);
                return 0;
        }
        gw_log_info("Received %s, stopping", strsignal((int) si->ssi_signo));
        gw_notify_stopping();
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

static int on_store(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct gw_daemon *d = userdata;
        if (d->hub)
                (void) gw_hub_dispatch(d->hub);
        else
                (void) hub_store_dispatch(d->store);
        return 0;
}

/* Timer sources are one-shot: set the next time and enable them again. */
static int rearm(sd_event_source *s, uint64_t next) {
        int r = sd_event_source_set_time(s, next);
        if (r >= 0)
                r = sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return r;
}

static int heartbeat_write(struct hub_store_txn *txn, void *userdata) {
        /* Nothing to write: the transaction itself (write lock, commit) is the probe. */
        return 0;
}

static void heartbeat_done(int result, void *userdata) {
        struct gw_daemon *d = userdata;
        d->heartbeat_pending = false;
        if (result < 0)
                gw_log_full(LOG_ERR, result,
                            GW_FIELDS(.component = "store", .message_id = GW_MSG_STORE_ERROR,
                                                           .event = "store-error"),
                            "Store heartbeat commit failed: %m");
}

/* Pets the watchdog only while the loop runs (this timer fires) and the store's commit
 * thread makes progress (no commit stuck past the stall timeout); a tiny heartbeat
 * transaction keeps the commit thread exercised even when nothing else writes. */
static int on_watchdog(sd_event_source *s, uint64_t usec, void *userdata) {
        struct gw_daemon *d = userdata;
        uint64_t now = mono_now();

        if (!hub_store_healthy(d->store, now)) {
                if (!d->store_stalled) {
                        d->store_stalled = true;
                        gw_log_full(LOG_CRIT, 0,
                                    GW_FIELDS(.component = "store",
                                                                   .message_id = GW_MSG_STORE_STALLED,
                                                                   .event = "store-stalled", .no_ratelimit = true),
                                    "Store commit stalled for more than %llu ms; no longer petting the watchdog",
                                    (unsigned long long) (d->config->store_stall_timeout_usec / USEC_PER_MSEC));
                        gw_notify_status("Store commit stalled");
                }
        } else {
                if (d->store_stalled) {
                        d->store_stalled = false;
                        gw_log_notice("Store commits make progress again");
                        char st[512];
                        gw_daemon_status_line(d, st, sizeof st);
                        gw_notify_status("%s", st);
                }
                if (d->watchdog_usec)
                        gw_notify_watchdog();
        }
        if (!d->heartbeat_pending) {
                int r = hub_store_submit(d->store, heartbeat_write, heartbeat_done, d);
                if (r >= 0)
                        d->heartbeat_pending = true;
        }

        uint64_t period = d->watchdog_usec ? d->watchdog_usec / 4 : 5 * USEC_PER_SEC;
        return rearm(s, usec + MAX(period, 50 * USEC_PER_MSEC));
}

static int on_housekeeping(sd_event_source *s, uint64_t usec, void *userdata) {
        gw_log_flush_suppressed();
        return rearm(s, usec + 5 * USEC_PER_SEC);
}

static int on_trim(sd_event_source *s, uint64_t usec, void *userdata) {
        /* Give the pages that bursts (appends waiting for a commit, a drain, a backlog read)
         * left free inside the heaps back to the kernel: without it glibc keeps them, and the
         * RSS of a long-running gateway only ever grows to its worst moment. Every second:
         * well under a millisecond for a heap of a few MiB. */
        (void) malloc_trim(0);
        return rearm(s, usec + USEC_PER_SEC);
}

static void on_check_progress(void *userdata, uint64_t elapsed) {
        /* Ask systemd for more start-up time while quick_check runs. */
        gw_notify_extend_timeout(30 * USEC_PER_SEC);
        gw_notify_status("Checking the store after an unclean stop (%llu s)",
                         (unsigned long long) (elapsed / USEC_PER_SEC));
}

int gw_daemon_start(const struct gw_daemon_options *opts, struct gw_daemon **ret) {
        _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
        struct gw_daemon *d = calloc(1, sizeof *d);
        int r;

        if (!d) {
                gw_log_errno(LOG_ERR, ENOMEM, "Out of memory");
                return 1;
        }
        d->opts = *opts;
        d->started_mono = mono_now();
        *ret = d;

        r = gw_config_load(opts->config_path, opts->confd_dir, &d->config, &e);
        if (r < 0) {
                json_decref(log_config_errors(&e, LOG_ERR));
                if (adp_conf_errors_count(&e) == 0)
                        gw_log_errno(LOG_ERR, r, "Cannot load %s: %m", opts->config_path);
                gw_log_event(LOG_ERR, 0, GW_MSG_CONFIG_INVALID, "config-invalid",
                             "Configuration %s is invalid (%zu error%s); refusing to start", opts->config_path,
                             adp_conf_errors_count(&e), adp_conf_errors_count(&e) == 1 ? "" : "s");
                return GW_EXIT_CONFIG;
        }
        apply_log_config(d, d->config);
        d->host_names = host_names_of(d->config);
        if (!d->host_names) {
                gw_log_errno(LOG_ERR, ENOMEM, "Out of memory");
                return 1;
        }

        sigset_t ss;
        sigemptyset(&ss);
        sigaddset(&ss, SIGTERM);
        sigaddset(&ss, SIGINT);
        sigaddset(&ss, SIGHUP);
        sigprocmask(SIG_BLOCK, &ss, NULL);
        signal(SIGPIPE, SIG_IGN);

        r = sd_event_default(&d->event);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot create the event loop: %m");
                return 1;
        }
        if ((r = sd_event_add_signal(d->event, NULL, SIGTERM, on_signal, d)) < 0 ||
            (r = sd_event_add_signal(d->event, NULL, SIGINT, on_signal, d)) < 0 ||
            (r = sd_event_add_signal(d->event, NULL, SIGHUP, on_signal, d)) < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot watch signals: %m");
                return 1;
        }

        const char *state_dir = opts->state_dir ? opts->state_dir : d->config->state_dir;
        char errbuf[512] = "";
        struct hub_store_options so = {
                .dir = state_dir,
                .clock = hub_clock_system(),
                .log = &gw_hub_log,
                .stall_timeout_usec = d->config->store_stall_timeout_usec,
                .group_interval_usec = d->config->store_group_interval_usec,
                .check_progress = on_check_progress,
                .userdata = d,
                .force_check = d->config->store_check_on_start,
                .max_size = d->config->store_max_size,
                .errbuf = errbuf,
                .errbuf_size = sizeof errbuf,
        };
        r = hub_store_open(&so, &d->store);
        if (r < 0) {
                gw_log_full(LOG_ERR, r,
                            GW_FIELDS(.component = "store", .message_id = GW_MSG_STORE_ERROR,
                                                           .event = "store-open-failed", .no_ratelimit = true),
                            "Cannot open the store in %s: %s", state_dir, errbuf[0] ? errbuf : strerror(-r));
                return r == -EPROTONOSUPPORT || r == -EBADMSG ? GW_EXIT_DATAERR : 1;
        }
        if (hub_store_was_unclean(d->store))
                gw_log_event(LOG_WARNING, 0, GW_MSG_STORE_CHECK, "store-checked",
                             "The previous run did not stop cleanly; store %s passed its integrity check",
                             hub_store_path(d->store));
        gw_log_full(LOG_INFO, 0,
                    GW_FIELDS(.component = "store", .message_id = GW_MSG_STORE_OPENED,
                                                   .event = "store-opened"),
                    "Store %s opened", hub_store_path(d->store));

        r = gw_hub_new(d->event, d->store, d->config, &d->hub);
        if (r < 0)
                return 1;
        d->registry = d->hub->registry;
        if (apply_policy_keys(d, d->config) < 0)
                return GW_EXIT_CONFIG;

        r = sd_event_add_io(d->event, &d->store_source, hub_store_get_fd(d->store), EPOLLIN, on_store, d);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot watch the store: %m");
                return 1;
        }
        /* Completions (durable PUBACKs) first, before the input of other ready connections. */
        (void) sd_event_source_set_priority(d->store_source, SD_EVENT_PRIORITY_IMPORTANT);

        r = gw_api_new(d->event, d->hub, d->config, state_dir, d->host_names, &d->api);
        if (r < 0)
                return r == -EPERM || r == -EINVAL || r == -ENOENT || r == -EACCES || r == -EBADMSG ? GW_EXIT_CONFIG : 1;

        r = gw_mqtt_new(d->event, d->hub, d->config, state_dir, d->host_names, &d->mqtt);
        if (r < 0)
                return r == -EPERM || r == -EINVAL || r == -ENOENT || r == -EACCES || r == -EBADMSG ? GW_EXIT_CONFIG : 1;

        r = gw_coap_new(d->event, d->hub, d->config, &d->coap);
        if (r < 0)
                return r == -EINVAL || r == -EADDRNOTAVAIL || r == -EOPNOTSUPP ? GW_EXIT_CONFIG : 1;

        r = gw_adapters_start(d->event, d->hub, d->config, &d->adapters);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot start the adapters: %m");
                return 1;
        }

        r = gw_uplink_new(d->event, d->hub, d->config, &d->uplink);
        if (r < 0)
                return 1;

        r = gw_admin_start(d, d->config->admin_socket, &d->admin);
        if (r < 0)
                gw_log_errno(LOG_WARNING, r, "Admin socket %s unavailable: %m; fieldhubctl cannot reach this daemon",
                             d->config->admin_socket);

        if (sd_watchdog_enabled(false, &d->watchdog_usec) <= 0)
                d->watchdog_usec = 0;
        uint64_t now;
        sd_event_now(d->event, CLOCK_MONOTONIC, &now);
        r = sd_event_add_time(d->event, &d->watchdog_source, CLOCK_MONOTONIC, now, 0, on_watchdog, d);
        if (r >= 0)
                r = sd_event_add_time(d->event, &d->housekeeping_source, CLOCK_MONOTONIC, now + 5 * USEC_PER_SEC,
                                      USEC_PER_SEC, on_housekeeping, d);
        if (r >= 0)
                r = sd_event_add_time(d->event, &d->trim_source, CLOCK_MONOTONIC, now + USEC_PER_SEC,
                                      250 * USEC_PER_MSEC, on_trim, d);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot add timers: %m");
                return 1;
        }
        return 0;
}

int gw_daemon_run(struct gw_daemon *d) {
        char status[512];
        gw_daemon_status_line(d, status, sizeof status);
        gw_log_event(LOG_NOTICE, 0, GW_MSG_STARTED, "started", "fieldhubd %s started: %s", FIELDHUB_VERSION, status);
        gw_notify_ready(status);

        int r = sd_event_loop(d->event);
        if (r < 0)
                return gw_log_errno(LOG_ERR, r, "Event loop failed: %m"), 1;
        return 0;
}

/* Waits (bounded) until every submitted store write has committed and its completion has
 * run on this thread. Completions may submit further writes; those are drained too. */
static void drain_store(struct gw_daemon *d, uint64_t budget_usec) {
        if (!d->store)
                return;
        uint64_t deadline = mono_now() + budget_usec;
        for (;;) {
                struct hub_store_stats st;
                int n = hub_store_dispatch(d->store);
                hub_store_get_stats(d->store, &st);
                if (st.pending == 0 && n == 0)
                        break;
                uint64_t now = mono_now();
                if (now >= deadline) {
                        gw_log_warning("Stopping with %llu store writes still pending; they complete at close",
                                       (unsigned long long) st.pending);
                        break;
                }
                struct pollfd p = { .fd = hub_store_get_fd(d->store), .events = POLLIN };
                (void) poll(&p, 1, 20);
        }
}

struct gw_daemon *gw_daemon_free(struct gw_daemon *d) {
        if (!d)
                return NULL;
        bool started = d->store != NULL;
        /* Completions of writes still in flight (an MQTT PUBACK, an API answer) point at the
         * objects below: deliver them while those objects are alive, then free. */
        drain_store(d, 1500 * USEC_PER_MSEC);
        /* The API first: internal calls still waiting get their answer while the admin
         * socket's clients are alive. Then the hub, before the store closes. */
        d->api = gw_api_free(d->api);
        d->coap = gw_coap_free(d->coap);
        d->mqtt = gw_mqtt_free(d->mqtt);
        d->admin = gw_admin_stop(d->admin);
        d->watchdog_source = sd_event_source_disable_unref(d->watchdog_source);
        d->housekeeping_source = sd_event_source_disable_unref(d->housekeeping_source);
        d->trim_source = sd_event_source_disable_unref(d->trim_source);
        d->adapters = gw_adapters_stop(d->adapters);
        d->uplink = gw_uplink_free(d->uplink);
        d->hub = gw_hub_free(d->hub);
        d->registry = NULL;
        d->store_source = sd_event_source_disable_unref(d->store_source);
        /* Drains every pending write and delivers its completion before closing. */
        d->store = hub_store_close(d->store);
        d->event = sd_event_unref(d->event);
        if (started)
                gw_log_event(LOG_NOTICE, 0, GW_MSG_STOPPED, "stopped", "fieldhubd stopped");
        free(d->host_names);
        free(d->last_reload_error);
        d->config = gw_config_free(d->config);
        gw_log_clear_secrets();
        free(d);
        return NULL;
}
