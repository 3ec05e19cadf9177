/* SPDX-License-Identifier: MIT */
/* The http endpoint: an HTTPS webhook. Messages are POSTed as a JSON array (the objects of
 * uplink-json.h, Content-Type: application/json) in batches of up to batch.max_messages,
 * sent once that many are waiting or batch.max_delay after the first one arrived.
 *
 * libcurl's multi interface runs on the event loop: CURLMOPT_SOCKETFUNCTION turns curl's
 * sockets into sd-event io sources, CURLMOPT_TIMERFUNCTION into one timer, and both call
 * curl_multi_socket_action(). Nothing blocks (name resolution uses curl's threaded resolver).
 *
 * One request is in flight at a time, so that a retried batch can never overtake a later
 * one: the receiver sees every device's messages in order (at least once — a batch whose
 * answer was lost is sent again; sequenceNumber lets a receiver drop duplicates).
 *
 * Outcomes:
 *   2xx                  delivered: every message of the batch is confirmed (the cursor moves).
 *   408, 429, 5xx,       the endpoint goes down and retries with the framework's backoff and
 *   network / TLS error  jitter; a Retry-After (seconds or HTTP date, at most one hour) is a
 *                        lower bound on the wait.
 *   other 3xx / 4xx      the receiver refuses the content. A refused batch of several
 *                        messages is sent again one message per request to find the refused
 *                        one(s). A single refused message is logged as an error with the
 *                        status and the start of the answer, then, with on_client_error: retry
 *                        (the default), retried like a 5xx — nothing is ever dropped and the
 *                        backlog grows until the receiver or the route is fixed; with
 *                        on_client_error: skip, it is retried client_error_tries times and
 *                        then counted as poison (metrics, `fieldhubctl endpoints`, an error in
 *                        the journal with its sequence number) and skipped. */

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <systemd/sd-event.h>

#include "endpoint.h"
#include "hub/clock.h"
#include "log-ids.h"
#include "log.h"
#include "uplink-json.h"

#define HTTP_RETRY_AFTER_MAX_SEC 3600
#define HTTP_ANSWER_KEEP 256

struct http_item {
        uint64_t seq;
        char *json;
        size_t len;
};

struct http_ep {
        struct gw_endpoint *ep;
        sd_event *event;
        char *url, *ca_file;
        bool insecure;
        uint64_t timeout_usec, batch_delay_usec;
        unsigned batch_max, client_error_tries;
        bool client_error_skip;
        struct curl_slist *headers;

        CURLM *multi;
        sd_event_source *curl_timer; /* curl's timeout */
        sd_event_source *batch_timer; /* batch.max_delay */
        sd_event_source *wait_timer;  /* Retry-After before the next connect */
        bool up;

        /* Messages handed to us and not yet confirmed, in order; the first n_req are in the
         * request in flight. */
        struct http_item *q;
        size_t q_n, q_cap;
        CURL *easy;
        size_t n_req;
        char *body;
        char errbuf[CURL_ERROR_SIZE];
        char answer[HTTP_ANSWER_KEEP + 1];
        size_t answer_len;

        /* Survive a disconnect: */
        uint64_t not_before;   /* monotonic; Retry-After */
        uint64_t split_until;  /* send one message per request up to this seq (a refused batch) */
        uint64_t bad_seq;      /* the message refused bad_tries times in a row */
        unsigned bad_tries;
};

static bool curl_initialized;

static uint64_t now_mono(void) {
        return hub_clock_mono(hub_clock_system());
}

static void items_free(struct http_ep *h, size_t from, size_t to) {
        for (size_t i = from; i < to; i++)
                free(h->q[i].json);
}

/* Removes the first n items (confirmed or skipped). */
static void queue_pop(struct http_ep *h, size_t n) {
        items_free(h, 0, n);
        memmove(h->q, h->q + n, (h->q_n - n) * sizeof *h->q);
        h->q_n -= n;
}

static void request_clear(struct http_ep *h) {
        if (h->easy) {
                (void) curl_multi_remove_handle(h->multi, h->easy);
                curl_easy_cleanup(h->easy);
                h->easy = NULL;
        }
        free(h->body);
        h->body = NULL;
        h->n_req = 0;
        h->answer_len = 0;
        h->answer[0] = 0;
        h->errbuf[0] = 0;
}

/* ---- curl ↔ sd-event ----------------------------------------------------------------------- */

static void check_done(struct http_ep *h);

static int on_curl_io(sd_event_source *s, int fd, uint32_t revents, void *ud) {
        struct http_ep *h = ud;
        int flags = 0, running;
        if (revents & (EPOLLIN | EPOLLHUP))
                flags |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                flags |= CURL_CSELECT_OUT;
        if (revents & EPOLLERR)
                flags |= CURL_CSELECT_ERR;
        (void) curl_multi_socket_action(h->multi, fd, flags, &running);
        check_done(h);
        return 0;
}

static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        struct http_ep *h = userp;
        sd_event_source *s = socketp;
        uint32_t events = 0;

        if (what == CURL_POLL_REMOVE) {
                if (s)
                        sd_event_source_disable_unref(s);
                (void) curl_multi_assign(h->multi, fd, NULL);
                return 0;
        }
        if (what & CURL_POLL_IN)
                events |= EPOLLIN;
        if (what & CURL_POLL_OUT)
                events |= EPOLLOUT;
        if (s) {
                if (sd_event_source_set_io_events(s, events) < 0)
                        return -1;
                return 0;
        }
        if (sd_event_add_io(h->event, &s, fd, events, on_curl_io, h) < 0)
                return -1;
        (void) sd_event_source_set_description(s, "http-endpoint-socket");
        (void) curl_multi_assign(h->multi, fd, s);
        return 0;
}

static int on_curl_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct http_ep *h = ud;
        int running;
        (void) curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        check_done(h);
        return 0;
}

static int on_curl_timeout(CURLM *multi, long timeout_ms, void *userp) {
        struct http_ep *h = userp;
        if (timeout_ms < 0)
                return sd_event_source_set_enabled(h->curl_timer, SD_EVENT_OFF) < 0 ? -1 : 0;
        /* 0 = "now": the timer fires on the next loop iteration, never from within curl. */
        if (sd_event_source_set_time(h->curl_timer, now_mono() + (uint64_t) timeout_ms * USEC_PER_MSEC) < 0 ||
            sd_event_source_set_enabled(h->curl_timer, SD_EVENT_ONESHOT) < 0)
                return -1;
        return 0;
}

static size_t on_answer(char *p, size_t size, size_t nmemb, void *ud) {
        struct http_ep *h = ud;
        size_t n = size * nmemb, room = HTTP_ANSWER_KEEP - h->answer_len;
        size_t take = n < room ? n : room;
        memcpy(h->answer + h->answer_len, p, take);
        h->answer_len += take;
        h->answer[h->answer_len] = 0;
        return n; /* the rest is read and discarded */
}

/* ---- requests ------------------------------------------------------------------------------ */

static int start_request(struct http_ep *h) {
        size_t n = h->q_n < h->batch_max ? h->q_n : h->batch_max, len = 2;

        assert(!h->easy && n > 0);
        (void) sd_event_source_set_enabled(h->batch_timer, SD_EVENT_OFF);
        if (h->split_until && h->q[0].seq <= h->split_until)
                n = 1;
        else
                h->split_until = 0;
        for (size_t i = 0; i < n; i++)
                len += h->q[i].len + 1;
        h->body = malloc(len + 1);
        if (!h->body)
                return -ENOMEM;
        char *p = h->body;
        *p++ = '[';
        for (size_t i = 0; i < n; i++) {
                if (i > 0)
                        *p++ = ',';
                memcpy(p, h->q[i].json, h->q[i].len);
                p += h->q[i].len;
        }
        *p++ = ']';
        *p = 0;

        h->easy = curl_easy_init();
        if (!h->easy) {
                request_clear(h);
                return -ENOMEM;
        }
        long timeout_ms = (long) (h->timeout_usec / USEC_PER_MSEC);
        CURLcode c = CURLE_OK;
#define SET(opt, val) \
        if (c == CURLE_OK) \
        c = curl_easy_setopt(h->easy, opt, val)
        SET(CURLOPT_URL, h->url);
        SET(CURLOPT_POST, 1L);
        SET(CURLOPT_POSTFIELDS, h->body);
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) (p - h->body));
        SET(CURLOPT_HTTPHEADER, h->headers);
        SET(CURLOPT_NOSIGNAL, 1L);
        SET(CURLOPT_TIMEOUT_MS, timeout_ms);
        SET(CURLOPT_CONNECTTIMEOUT_MS, timeout_ms);
        SET(CURLOPT_ERRORBUFFER, h->errbuf);
        SET(CURLOPT_WRITEFUNCTION, on_answer);
        SET(CURLOPT_WRITEDATA, h);
        SET(CURLOPT_FOLLOWLOCATION, 0L);
        SET(CURLOPT_USERAGENT, "fieldhub");
#if LIBCURL_VERSION_NUM >= 0x075500
        SET(CURLOPT_PROTOCOLS_STR, "http,https");
#endif
        if (h->ca_file)
                SET(CURLOPT_CAINFO, h->ca_file);
        if (h->insecure) {
                SET(CURLOPT_SSL_VERIFYPEER, 0L);
                SET(CURLOPT_SSL_VERIFYHOST, 0L);
        }
#undef SET
        if (c != CURLE_OK) {
                request_clear(h);
                return -EINVAL;
        }
        h->errbuf[0] = 0;
        h->answer_len = 0;
        h->answer[0] = 0;
        if (curl_multi_add_handle(h->multi, h->easy) != CURLM_OK) {
                curl_easy_cleanup(h->easy);
                h->easy = NULL;
                request_clear(h);
                return -ENOMEM;
        }
        h->n_req = n;
        return 0;
}

/* Starts the next request when one is due: a full batch, or the delay has passed (now). */
static void maybe_send(struct http_ep *h, bool delay_passed) {
        if (!h->up || h->easy || h->q_n == 0)
                return;
        if (!delay_passed && h->q_n < h->batch_max && h->batch_delay_usec > 0 &&
            !(h->split_until && h->q[0].seq <= h->split_until)) {
                int enabled = SD_EVENT_OFF;
                (void) sd_event_source_get_enabled(h->batch_timer, &enabled);
                if (enabled == SD_EVENT_OFF &&
                    sd_event_source_set_time(h->batch_timer, now_mono() + h->batch_delay_usec) >= 0)
                        (void) sd_event_source_set_enabled(h->batch_timer, SD_EVENT_ONESHOT);
                return;
        }
        int r = start_request(h);
        if (r < 0)
                gw_endpoint_down(h->ep, r, "cannot build a request");
}

static int on_batch_timer(sd_event_source *s, uint64_t usec, void *ud) {
        maybe_send(ud, true);
        return 0;
}

static int curl_to_errno(CURLcode c) {
        switch (c) {
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
                return -EHOSTUNREACH;
        case CURLE_COULDNT_CONNECT:
                return -ECONNREFUSED;
        case CURLE_OPERATION_TIMEDOUT:
                return -ETIMEDOUT;
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CACERT_BADFILE:
                return -EPROTO;
        case CURLE_OUT_OF_MEMORY:
                return -ENOMEM;
        default:
                return -EIO;
        }
}

static void on_refused(struct http_ep *h, long status) {
        char why[128];
        uint64_t seq = h->q[0].seq;

        snprintf(why, sizeof why, "HTTP %ld", status);
        /* Keep the answer printable for the journal. */
        for (size_t i = 0; i < h->answer_len; i++)
                if ((unsigned char) h->answer[i] < 0x20 || h->answer[i] == 0x7f)
                        h->answer[i] = ' ';
        if (h->n_req > 1) {
                h->split_until = h->q[h->n_req - 1].seq;
                gw_log_full(LOG_ERR, 0,
                            GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name(h->ep),
                                      .event = "http-refused", .ratelimit_key = gw_endpoint_name(h->ep)),
                            "Endpoint %s: the receiver refused a batch of %zu messages (%s: %s); sending them one "
                            "at a time to find the refused one",
                            gw_endpoint_name(h->ep), h->n_req, why, h->answer);
                request_clear(h);
                maybe_send(h, true);
                return;
        }
        if (h->bad_seq == seq)
                h->bad_tries++;
        else {
                h->bad_seq = seq;
                h->bad_tries = 1;
        }
        bool skip = h->client_error_skip && h->bad_tries >= h->client_error_tries;
        gw_log_full(LOG_ERR, 0,
                    GW_FIELDS(.component = "uplink", .endpoint = gw_endpoint_name(h->ep), .event = "http-refused",
                              .message_id = GW_MSG_QUEUE_OVERFLOW, .ratelimit_key = gw_endpoint_name(h->ep)),
                    "Endpoint %s: the receiver refused message %llu (%s: %s), try %u; %s", gw_endpoint_name(h->ep),
                    (unsigned long long) seq, why, h->answer, h->bad_tries,
                    skip                   ? "skipping it (on_client_error: skip)"
                    : h->client_error_skip ? "retrying"
                                           : "retrying until it is accepted (on_client_error: retry)");
        request_clear(h);
        if (skip) {
                queue_pop(h, 1);
                h->bad_seq = 0;
                h->bad_tries = 0;
                gw_endpoint_count_poison(h->ep, seq, why);
                gw_endpoint_confirm(h->ep, seq, 0);
                maybe_send(h, true);
                return;
        }
        gw_endpoint_down(h->ep, -EBADMSG, why);
}

/* Reads finished transfers (at most one) and acts on the outcome. */
static void check_done(struct http_ep *h) {
        CURLMsg *m;
        int left;

        while ((m = curl_multi_info_read(h->multi, &left))) {
                if (m->msg != CURLMSG_DONE || m->easy_handle != h->easy)
                        continue;
                CURLcode c = m->data.result;
                long status = 0;
                curl_off_t retry_after = 0;
                char why[CURL_ERROR_SIZE + 64];

                (void) curl_easy_getinfo(h->easy, CURLINFO_RESPONSE_CODE, &status);
                if (c != CURLE_OK) {
                        snprintf(why, sizeof why, "%s", h->errbuf[0] ? h->errbuf : curl_easy_strerror(c));
                        request_clear(h);
                        gw_endpoint_down(h->ep, curl_to_errno(c), why);
                        return;
                }
                if (status >= 200 && status < 300) {
                        size_t n = h->n_req;
                        uint64_t last = h->q[n - 1].seq;
                        uint64_t *seqs = malloc(n * sizeof *seqs);
                        if (h->bad_seq && h->bad_seq <= last)
                                h->bad_seq = h->bad_tries = 0;
                        request_clear(h);
                        for (size_t i = 0; i < n; i++) {
                                if (seqs)
                                        seqs[i] = h->q[i].seq;
                                else
                                        gw_endpoint_confirm(h->ep, h->q[i].seq, 0);
                        }
                        queue_pop(h, n);
                        for (size_t i = 0; seqs && i < n; i++)
                                gw_endpoint_confirm(h->ep, seqs[i], 0);
                        free(seqs);
                        maybe_send(h, true); /* what waited meanwhile goes at once */
                        return;
                }
                if (status == 408 || status == 429 || status >= 500) {
#if LIBCURL_VERSION_NUM >= 0x074200
                        (void) curl_easy_getinfo(h->easy, CURLINFO_RETRY_AFTER, &retry_after);
#endif
                        if (retry_after > 0) {
                                if (retry_after > HTTP_RETRY_AFTER_MAX_SEC)
                                        retry_after = HTTP_RETRY_AFTER_MAX_SEC;
                                h->not_before = now_mono() + (uint64_t) retry_after * USEC_PER_SEC;
                                snprintf(why, sizeof why, "HTTP %ld, Retry-After %llds", status,
                                         (long long) retry_after);
                        } else
                                snprintf(why, sizeof why, "HTTP %ld", status);
                        request_clear(h);
                        gw_endpoint_down(h->ep, status == 429 || status == 503 ? -EBUSY : -EIO, why);
                        return;
                }
                on_refused(h, status);
                return;
        }
}

/* ---- the transport ----------------------------------------------------------------------- */

static void http_disconnect(void *t) {
        struct http_ep *h = t;
        h->up = false;
        request_clear(h);
        items_free(h, 0, h->q_n);
        h->q_n = 0;
        (void) sd_event_source_set_enabled(h->batch_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(h->wait_timer, SD_EVENT_OFF);
}

static void http_destroy(void *t) {
        struct http_ep *h = t;
        if (!h)
                return;
        http_disconnect(h);
        if (h->multi)
                curl_multi_cleanup(h->multi); /* removes its sockets (CURL_POLL_REMOVE) */
        sd_event_source_disable_unref(h->curl_timer);
        sd_event_source_disable_unref(h->batch_timer);
        sd_event_source_disable_unref(h->wait_timer);
        curl_slist_free_all(h->headers);
        sd_event_unref(h->event);
        free(h->q);
        free(h->url);
        free(h->ca_file);
        free(h);
}

static int on_wait_timer(sd_event_source *s, uint64_t usec, void *ud) {
        struct http_ep *h = ud;
        h->up = true;
        gw_endpoint_up(h->ep);
        return 0;
}

/* HTTP has no connection to set up ahead of a request (curl reuses one): the endpoint is up
 * at once, unless a Retry-After asked to wait longer than the backoff did. */
static int http_connect(void *t) {
        struct http_ep *h = t;
        uint64_t now = now_mono();
        if (h->not_before > now) {
                if (sd_event_source_set_time(h->wait_timer, h->not_before) < 0 ||
                    sd_event_source_set_enabled(h->wait_timer, SD_EVENT_ONESHOT) < 0)
                        return -ENOMEM;
                return 0;
        }
        h->up = true;
        gw_endpoint_up(h->ep);
        return 0;
}

static int http_send(void *t, const struct gw_ep_item *items, size_t n) {
        struct http_ep *h = t;
        int r;
        if (h->q_n + n > h->q_cap) {
                size_t cap = h->q_cap ? h->q_cap : 256;
                while (cap < h->q_n + n)
                        cap *= 2;
                struct http_item *q = realloc(h->q, cap * sizeof *q);
                if (!q)
                        return -ENOMEM;
                h->q = q;
                h->q_cap = cap;
        }
        for (size_t i = 0; i < n; i++) {
                struct http_item *x = &h->q[h->q_n];
                /* The file endpoint's direct formatter (same text as gw_uplink_item_json()); its
                 * newline becomes the terminating NUL: the item is one element of an array. */
                char *buf = NULL, *shrunk;
                size_t len = 0, cap = 0;
                r = gw_endpoint_json_append(&items[i], gw_endpoint_name(h->ep), &buf, &len, &cap);
                if (r < 0) {
                        free(buf);
                        return r;
                }
                buf[len - 1] = 0;
                shrunk = realloc(buf, len);
                x->json = shrunk ? shrunk : buf;
                x->len = len - 1;
                x->seq = items[i].seq;
                h->q_n++;
        }
        maybe_send(h, false);
        return 0;
}

static int add_header(struct curl_slist **l, const char *name, const char *value) {
        _cleanup_free_ char *line = NULL;
        /* "Name;" sends a header with an empty value; "Name:" would remove it. */
        if (asprintf(&line, *value ? "%s: %s" : "%s;", name, value) < 0)
                return -ENOMEM;
        struct curl_slist *n = curl_slist_append(*l, line);
        if (n)
                *l = n;
        hub_explicit_bzero(line, strlen(line));
        return n ? 0 : -ENOMEM;
}

static int http_create(struct gw_endpoint *ep, const struct gw_endpoint_conf *c, void **ret) {
        struct http_ep *h;
        bool has_ct = false;
        int r;

        if (!curl_initialized) {
                if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                        return -ENOMEM;
                curl_initialized = true;
        }
        h = calloc(1, sizeof *h);
        if (!h)
                return -ENOMEM;
        h->ep = ep;
        h->event = sd_event_ref(gw_endpoint_event(ep));
        h->url = strdup(c->url);
        h->ca_file = c->ca_file ? strdup(c->ca_file) : NULL;
        h->insecure = c->tls_insecure_skip_verify;
        h->timeout_usec = c->timeout_usec;
        h->batch_max = c->batch_max ? c->batch_max : 1;
        h->batch_delay_usec = c->batch_delay_usec;
        h->client_error_skip = c->client_error_skip;
        h->client_error_tries = c->client_error_tries ? c->client_error_tries : 1;
        if (!h->url || (c->ca_file && !h->ca_file)) {
                http_destroy(h);
                return -ENOMEM;
        }
        for (size_t i = 0; i < c->n_headers; i++) {
                if (strcasecmp(c->headers[i].name, "Content-Type") == 0)
                        has_ct = true;
                if ((r = add_header(&h->headers, c->headers[i].name, c->headers[i].value)) < 0) {
                        http_destroy(h);
                        return r;
                }
        }
        if (!has_ct && (r = add_header(&h->headers, "Content-Type", "application/json")) < 0) {
                http_destroy(h);
                return r;
        }
        /* "Expect:" removes curl's Expect: 100-continue (one round trip less per batch). */
        struct curl_slist *l = curl_slist_append(h->headers, "Expect:");
        if (!l) {
                http_destroy(h);
                return -ENOMEM;
        }
        h->headers = l;

        h->multi = curl_multi_init();
        if (!h->multi) {
                http_destroy(h);
                return -ENOMEM;
        }
        if (curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket) != CURLM_OK ||
            curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h) != CURLM_OK ||
            curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_curl_timeout) != CURLM_OK ||
            curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h) != CURLM_OK) {
                http_destroy(h);
                return -EINVAL;
        }
        if ((r = sd_event_add_time(h->event, &h->curl_timer, CLOCK_BOOTTIME, UINT64_MAX, USEC_PER_MSEC,
                                   on_curl_timer, h)) < 0 ||
            (r = sd_event_add_time(h->event, &h->batch_timer, CLOCK_BOOTTIME, UINT64_MAX, USEC_PER_MSEC,
                                   on_batch_timer, h)) < 0 ||
            (r = sd_event_add_time(h->event, &h->wait_timer, CLOCK_BOOTTIME, UINT64_MAX, 10 * USEC_PER_MSEC,
                                   on_wait_timer, h)) < 0) {
                http_destroy(h);
                return r;
        }
        (void) sd_event_source_set_enabled(h->curl_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(h->batch_timer, SD_EVENT_OFF);
        (void) sd_event_source_set_enabled(h->wait_timer, SD_EVENT_OFF);
        if (h->insecure)
                gw_log_full(LOG_WARNING, 0, GW_FIELDS(.component = "uplink", .endpoint = c->name),
                            "Endpoint %s: TLS certificate verification is off (tls.verify: false); use this for "
                            "tests only", c->name);
        *ret = h;
        return 0;
}

const struct gw_endpoint_ops gw_endpoint_http_ops = {
        .type = "http",
        .create = http_create,
        .connect = http_connect,
        .send = http_send,
        .disconnect = http_disconnect,
        .destroy = http_destroy,
};
