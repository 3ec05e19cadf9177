/* SPDX-License-Identifier: MIT */
/* CoAP load generator on libcoap (run by hand: tests/bench/bench-coap.py).
 *
 *   coap-load requests  URI-TEMPLATE N WINDOW SECONDS [METHOD [COUNT]]
 *       N client endpoints (one session each, own source port), each keeping WINDOW CON
 *       requests in flight (NSTART), for SECONDS; "%d" in the URI is replaced by the
 *       endpoint's index (d/bench-%d/telemetry). METHOD is post (default) or put; the body is
 *       the same 43-byte JSON (Content-Format 50) for every request. With COUNT, stops after
 *       COUNT answers (or SECONDS, whichever is first): for instruction counts per request.
 *       Prints requests/s of 2.xx answers and the generator's own CPU time (user + system),
 *       to show it is not the bottleneck.
 *   coap-load handshakes URI IDENTITY HEXKEYS N SECONDS
 *       N parallel loops of: new DTLS-PSK session, one GET of URI's path, release. Prints
 *       completed sessions/s. "%d" in IDENTITY and in URI is the loop's index; HEXKEYS is one
 *       hex key, or one per loop separated by commas.
 *
 * Plain single-threaded libcoap, one context, COAP_IO_WAIT driven. */

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <sys/resource.h>

#include <coap3/coap.h>

static uint64_t ok_count, err_count, timeouts;
static unsigned window;
static uint64_t max_count; /* 0: no limit */
static coap_pdu_code_t method = COAP_REQUEST_CODE_POST;
static const char payload[] = "{\"temperature\":21.5,\"humidity\":40,\"seq\":1}";

struct ep {
        coap_session_t *s;
        char path[256];
        unsigned inflight;
        bool done;
        bool busy; /* handshakes: a request is out */
};

static struct ep *eps;
static unsigned n_eps;
static coap_address_t dst;
static const char *ident;
#define MAX_KEYS 256
static uint8_t keys[MAX_KEYS][64];
static size_t key_lens[MAX_KEYS], n_keys;

static double now_s(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int send_one(struct ep *e, coap_pdu_code_t code, bool body) {
        coap_pdu_t *pdu = coap_pdu_init(COAP_MESSAGE_CON, code, coap_new_message_id(e->s), coap_session_max_pdu_size(e->s));
        if (!pdu)
                return -ENOMEM;
        uint8_t tok[8];
        size_t tl;
        coap_session_new_token(e->s, &tl, tok);
        coap_add_token(pdu, tl, tok);
        for (const char *p = e->path; *p;) {
                size_t n = strcspn(p, "/");
                coap_add_option(pdu, COAP_OPTION_URI_PATH, n, (const uint8_t *) p);
                p += n;
                if (*p == '/')
                        p++;
        }
        if (body) {
                uint8_t b[4];
                coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(b, sizeof b, 50), b);
                coap_add_data(pdu, sizeof payload - 1, (const uint8_t *) payload);
        }
        if (coap_send(e->s, pdu) == COAP_INVALID_MID)
                return -EIO;
        e->inflight++;
        return 0;
}

static coap_response_t on_resp(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcv, const coap_mid_t mid) {
        struct ep *e = coap_session_get_app_data(s);
        if (COAP_RESPONSE_CLASS(coap_pdu_get_code(rcv)) == 2)
                ok_count++;
        else
                err_count++;
        if (!e)
                return COAP_RESPONSE_OK;
        e->inflight--;
        e->busy = false;
        if (max_count && ok_count + err_count + timeouts + e->inflight >= max_count)
                e->done = true;
        if (!e->done && !ident)
                send_one(e, method, method != COAP_REQUEST_CODE_GET);
        return COAP_RESPONSE_OK;
}

static void on_nack(coap_session_t *s, const coap_pdu_t *sent, const coap_nack_reason_t reason, const coap_mid_t mid) {
        struct ep *e = coap_session_get_app_data(s);
        timeouts++;
        if (e) {
                e->inflight--;
                e->busy = false;
                if (max_count && ok_count + err_count + timeouts + e->inflight >= max_count)
                        e->done = true;
                if (!e->done && !ident)
                        send_one(e, method, method != COAP_REQUEST_CODE_GET);
        }
}

static int parse_uri(const char *uri, char *path, size_t size) {
        coap_uri_t u;
        if (coap_split_uri((const uint8_t *) uri, strlen(uri), &u) < 0)
                return -EINVAL;
        char host[64];
        snprintf(host, sizeof host, "%.*s", (int) u.host.length, u.host.s);
        coap_address_init(&dst);
        dst.addr.sin.sin_family = AF_INET;
        dst.addr.sin.sin_port = htons(u.port);
        dst.size = sizeof dst.addr.sin;
        if (inet_pton(AF_INET, host, &dst.addr.sin.sin_addr) != 1)
                return -EINVAL;
        snprintf(path, size, "%.*s", (int) u.path.length, u.path.s);
        return u.scheme == COAP_URI_SCHEME_COAPS;
}

static void subst(char *out, size_t size, const char *tmpl, unsigned i) {
        const char *pct = strstr(tmpl, "%d");
        if (pct)
                snprintf(out, size, "%.*s%u%s", (int) (pct - tmpl), tmpl, i, pct + 2);
        else
                snprintf(out, size, "%s", tmpl);
}

static coap_session_t *new_session(coap_context_t *ctx, bool secure, unsigned i) {
        if (!secure)
                return coap_new_client_session(ctx, NULL, &dst, COAP_PROTO_UDP);
        static char id[128];
        subst(id, sizeof id, ident, i);
        size_t k = n_keys > 1 ? i % n_keys : 0;
        coap_dtls_cpsk_t c = {
                .version = COAP_DTLS_CPSK_SETUP_VERSION,
                .psk_info.identity = { .length = strlen(id), .s = (const uint8_t *) id },
                .psk_info.key = { .length = key_lens[k], .s = keys[k] },
        };
        return coap_new_client_session_psk2(ctx, NULL, &dst, COAP_PROTO_DTLS, &c);
}

int main(int argc, char **argv) {
        if (argc < 2) {
                fprintf(stderr, "usage: see the top of tests/bench/coap-load.c\n");
                return 2;
        }
        bool hs = strcmp(argv[1], "handshakes") == 0;
        if ((!hs && argc < 6) || (hs && argc < 7)) {
                fprintf(stderr, "usage: see the top of tests/bench/coap-load.c\n");
                return 2;
        }
        coap_startup();
        coap_set_log_level(LOG_EMERG);
        coap_context_t *ctx = coap_new_context(NULL);
        coap_register_response_handler(ctx, on_resp);
        coap_register_nack_handler(ctx, on_nack);
        double secs;
        char tmpl[256];

        if (!hs) {
                n_eps = (unsigned) atoi(argv[3]);
                window = (unsigned) atoi(argv[4]);
                secs = atof(argv[5]);
                if (argc > 6 && strcmp(argv[6], "put") == 0)
                        method = COAP_REQUEST_CODE_PUT;
                else if (argc > 6 && strcmp(argv[6], "post") != 0) {
                        fprintf(stderr, "requests: METHOD is post or put\n");
                        return 2;
                }
                if (argc > 7)
                        max_count = strtoull(argv[7], NULL, 10);
                if (parse_uri(argv[2], tmpl, sizeof tmpl) != 0) {
                        fprintf(stderr, "requests: a coap:// URI with an IP literal\n");
                        return 2;
                }
        } else {
                ident = argv[3];
                for (const char *hex = argv[4]; *hex && n_keys < MAX_KEYS;) {
                        size_t l = strcspn(hex, ",");
                        key_lens[n_keys] = l / 2 > 64 ? 64 : l / 2;
                        for (size_t i = 0; i < key_lens[n_keys]; i++) {
                                unsigned v = 0;
                                sscanf(hex + 2 * i, "%2x", &v);
                                keys[n_keys][i] = (uint8_t) v;
                        }
                        n_keys++;
                        hex += l;
                        if (*hex == ',')
                                hex++;
                }
                n_eps = (unsigned) atoi(argv[5]);
                secs = atof(argv[6]);
                if (parse_uri(argv[2], tmpl, sizeof tmpl) != 1) {
                        fprintf(stderr, "handshakes: a coaps:// URI with an IP literal\n");
                        return 2;
                }
        }
        eps = calloc(n_eps, sizeof *eps);
        for (unsigned i = 0; i < n_eps; i++) {
                struct ep *e = &eps[i];
                subst(e->path, sizeof e->path, tmpl, i);
                if (!hs) {
                        e->s = new_session(ctx, false, i);
                        coap_session_set_app_data(e->s, e);
                        coap_session_set_nstart(e->s, (uint16_t) window);
                        for (unsigned k = 0; k < window; k++)
                                send_one(e, method, method != COAP_REQUEST_CODE_GET);
                }
        }
        double t0 = now_s(), end = t0 + secs;
        uint64_t sessions = 0;
        while (now_s() < end && !(max_count && ok_count + err_count + timeouts >= max_count)) {
                if (hs)
                        for (unsigned i = 0; i < n_eps; i++) {
                                struct ep *e = &eps[i];
                                if (e->busy)
                                        continue;
                                if (e->s) {
                                        coap_session_set_app_data(e->s, NULL);
                                        coap_session_release(e->s);
                                        e->s = NULL;
                                        sessions++;
                                }
                                e->s = new_session(ctx, true, i);
                                coap_session_set_app_data(e->s, e);
                                e->busy = true;
                                send_one(e, COAP_REQUEST_CODE_GET, false);
                        }
                coap_io_process(ctx, 100);
        }
        double el = now_s() - t0;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
        for (unsigned i = 0; i < n_eps; i++)
                eps[i].done = true;
        if (hs)
                printf("{\"sessions\": %llu, \"seconds\": %.2f, \"sessions_per_second\": %.1f, \"errors\": %llu, "
                       "\"timeouts\": %llu}\n",
                       (unsigned long long) sessions, el, sessions / el, (unsigned long long) err_count,
                       (unsigned long long) timeouts);
        else
                printf("{\"ok\": %llu, \"seconds\": %.2f, \"requests_per_second\": %.1f, \"errors\": %llu, "
                       "\"timeouts\": %llu, \"generator_cpu_seconds\": %.2f}\n",
                       (unsigned long long) ok_count, el, ok_count / el, (unsigned long long) err_count,
                       (unsigned long long) timeouts, cpu);
        for (unsigned i = 0; i < n_eps; i++)
                if (eps[i].s)
                        coap_session_release(eps[i].s);
        coap_free_context(ctx);
        coap_cleanup();
        free(eps);
        return 0;
}
