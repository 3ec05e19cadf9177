/* SPDX-License-Identifier: MIT */
/* The CoAP client adapter: fieldhub polls (GET at an interval) or observes (RFC 7641)
 * resources of CoAP devices, maps their payloads (raw, JSON, CBOR: coap-map.c) into named
 * points and emits them as telemetry; desired-property changes and direct methods become
 * PUT / POST requests on device resources. DTLS-PSK toward the device with the key from a key
 * file or a systemd credential.
 *
 * One libcoap context per adapter, driven from the host's loop through its fd and one-shot
 * timers; one client session per device, made again after a DTLS failure. Every request in
 * flight is a struct req found by its token (an Observe keeps its token). */

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include <coap3/coap.h>
#include <jansson.h>

#include "adp-coap.h"
#include "adp-util.h"
#include "coap-map.h"
#include "hub/msg.h"

#ifndef USEC_PER_SEC
#define USEC_PER_SEC UINT64_C(1000000)
#endif
#ifndef USEC_PER_MSEC
#define USEC_PER_MSEC UINT64_C(1000)
#endif
#define COAP_DEFAULT_INTERVAL_USEC (10 * USEC_PER_SEC)
#define COAP_OBSERVE_REFRESH_USEC (120 * USEC_PER_SEC)
#define COAP_MAX_POINTS 256

enum res_mode { MODE_POLL, MODE_OBSERVE };
enum req_kind { REQ_READ, REQ_WRITE };

struct cpoint {
        char *name, *path;
};

struct cresource {
        char *path;
        enum res_mode mode;
        uint64_t interval_usec;
        enum adp_coap_format format;
        struct cpoint *points;
        size_t n_points;
        /* runtime */
        struct cdevice *dev;
        struct adp_timer *timer;
        uint64_t last_usec;
        bool observing;
};

struct cwrite {               /* a desired property or a method mapped to a request */
        char *key;            /* property or method name */
        char *path;
        coap_pdu_code_t method;
        enum adp_coap_format format;
};

struct cdevice {
        char *id;
        char *uri;
        bool secure;
        coap_address_t addr;
        char *psk_identity;
        uint8_t *psk;
        size_t psk_len;
        struct cresource *res;
        size_t n_res;
        struct cwrite *writes, *methods;
        size_t n_writes, n_methods;
        /* runtime */
        struct adp_coap *a;
        coap_session_t *session;
        bool reset;           /* the session failed: make it again */
        bool online;
};

struct req {
        struct req *next;
        uint8_t token[8];
        size_t token_len;
        enum req_kind kind;
        struct cdevice *dev;
        struct cresource *res;  /* REQ_READ */
        uint64_t cmd_id;        /* REQ_WRITE */
        bool is_method;
        int pending;            /* desired patches: requests of one command still running */
        struct req *group;      /* desired patches: the request holding the count */
        int worst;              /* worst status of the group */
};

struct adp_coap {
        char *name;
        struct cdevice *devs;
        size_t n_devs;
        /* runtime */
        const struct adp_host *host;
        coap_context_t *ctx;
        struct adp_watch *watch;
        struct adp_timer *io_timer;
        struct req *reqs;
        uint64_t polls, notifications, errors, writes;
};

static void alog(struct adp_coap *a, int level, const char *dev, int err, const char *fmt, ...) _printf_(5, 6);
static void alog(struct adp_coap *a, int level, const char *dev, int err, const char *fmt, ...) {
        va_list ap;
        if (!a->host)
                return;
        va_start(ap, fmt);
        a->host->log(a->host->host, level, dev, NULL, err, fmt, ap);
        va_end(ap);
}

/* ---- configuration ------------------------------------------------------------------------- */

static const char *const item_keys[] = { "type", "name", "devices", NULL };
static const char *const dev_keys[] = { "id", "uri", "psk_identity", "psk_key_file", "psk_key_credential", "resources",
                                        "writes", "methods", NULL };
static const char *const res_keys[] = { "path", "mode", "interval", "format", "points", NULL };
static const char *const point_keys[] = { "name", "path", NULL };
static const char *const write_keys[] = { "property", "name", "path", "method", "format", NULL };
static const char *const modes[] = { "poll", "observe", NULL };
static const char *const formats[] = { "raw", "json", "cbor", NULL };
static const char *const methods[] = { "put", "post", NULL };

static void device_done(struct cdevice *d) {
        free(d->id);
        free(d->uri);
        free(d->psk_identity);
        if (d->psk) {
                hub_explicit_bzero(d->psk, d->psk_len);
                free(d->psk);
        }
        for (size_t i = 0; i < d->n_res; i++) {
                for (size_t j = 0; j < d->res[i].n_points; j++) {
                        free(d->res[i].points[j].name);
                        free(d->res[i].points[j].path);
                }
                free(d->res[i].points);
                free(d->res[i].path);
        }
        free(d->res);
        for (size_t i = 0; i < d->n_writes; i++) {
                free(d->writes[i].key);
                free(d->writes[i].path);
        }
        free(d->writes);
        for (size_t i = 0; i < d->n_methods; i++) {
                free(d->methods[i].key);
                free(d->methods[i].path);
        }
        free(d->methods);
}

static bool resource_path_valid(const char *p) {
        if (!p || !*p || *p == '/' || strlen(p) > 255)
                return false;
        for (const char *c = p; *c; c++)
                if ((unsigned char) *c <= ' ' || *c == '?' || *c == '#')
                        return false;
        return !strstr(p, "//") && p[strlen(p) - 1] != '/';
}

/* coap://IP[:port] or coaps://IP[:port] (IP literal or localhost; no path). */
static int parse_uri(const char *uri, coap_address_t *ret, bool *ret_secure) {
        coap_uri_t u;
        if (coap_split_uri((const uint8_t *) uri, strlen(uri), &u) < 0)
                return -EINVAL;
        if (u.scheme != COAP_URI_SCHEME_COAP && u.scheme != COAP_URI_SCHEME_COAPS)
                return -EPROTONOSUPPORT;
        if (u.path.length > 0 || u.query.length > 0)
                return -EINVAL;
        char host[64];
        if (u.host.length == 0 || u.host.length >= sizeof host)
                return -EINVAL;
        memcpy(host, u.host.s, u.host.length);
        host[u.host.length] = 0;
        if (strcmp(host, "localhost") == 0)
                strcpy(host, "127.0.0.1");
        coap_address_t a;
        coap_address_init(&a);
        if (inet_pton(AF_INET, host, &a.addr.sin.sin_addr) == 1) {
                a.addr.sin.sin_family = AF_INET;
                a.addr.sin.sin_port = htons(u.port);
                a.size = sizeof a.addr.sin;
        } else if (inet_pton(AF_INET6, host, &a.addr.sin6.sin6_addr) == 1) {
                a.addr.sin6.sin6_family = AF_INET6;
                a.addr.sin6.sin6_port = htons(u.port);
                a.size = sizeof a.addr.sin6;
        } else
                return -EADDRNOTAVAIL;
        *ret = a;
        *ret_secure = u.scheme == COAP_URI_SCHEME_COAPS;
        return 0;
}

static int parse_writes(const struct adp_conf_node *dn, const char *key, const char *name_key,
                        struct adp_conf_errors *e, struct cwrite **ret, size_t *ret_n) {
        const struct adp_conf_node *seq;
        if (adp_conf_get_seq(dn, key, false, e, &seq) < 0)
                return 0;
        size_t n = adp_conf_len(seq);
        struct cwrite *w = calloc(n ? n : 1, sizeof *w);
        if (!w)
                return -ENOMEM;
        *ret = w;
        for (size_t i = 0; i < n; i++) {
                const struct adp_conf_node *wn = adp_conf_at(seq, i);
                const char *k = NULL, *p = NULL;
                int m = 0, f = ADP_COAP_FORMAT_JSON;
                (void) adp_conf_check_keys(wn, write_keys, e);
                if (adp_conf_get(wn, streq(name_key, "property") ? "name" : "property"))
                        adp_conf_error(e, wn, "found \"%s\", expected \"%s\" in %s items",
                                       streq(name_key, "property") ? "name" : "property", name_key, key);
                (void) adp_conf_get_string(wn, name_key, true, e, &k);
                if (adp_conf_get_string(wn, "path", true, e, &p) == 0 && !resource_path_valid(p))
                        adp_conf_error(e, adp_conf_get(wn, "path"),
                                       "found \"%s\", expected a resource path like \"actuators/valve\" "
                                       "(no leading '/', query or fragment)", p);
                (void) adp_conf_get_enum(wn, "method", false, methods, e, &m);
                (void) adp_conf_get_enum(wn, "format", false, formats, e, &f);
                if (!k || !p)
                        continue;
                w[*ret_n].key = strdup(k);
                w[*ret_n].path = strdup(p);
                w[*ret_n].method = m == 1 ? COAP_REQUEST_CODE_POST : COAP_REQUEST_CODE_PUT;
                w[*ret_n].format = (enum adp_coap_format) f;
                if (!w[*ret_n].key || !w[*ret_n].path)
                        return -ENOMEM;
                ++*ret_n;
        }
        return 0;
}

static int parse_device(struct adp_coap *a, const struct adp_conf_node *dn, struct adp_conf_errors *e,
                        struct cdevice *d) {
        const char *id = NULL, *uri = NULL, *ident = NULL;
        const struct adp_conf_node *seq;
        int r;

        (void) adp_conf_check_keys(dn, dev_keys, e);
        if (adp_conf_get_string(dn, "id", true, e, &id) == 0 && !(d->id = strdup(id)))
                return -ENOMEM;
        if (adp_conf_get_string(dn, "uri", true, e, &uri) == 0) {
                r = parse_uri(uri, &d->addr, &d->secure);
                if (r < 0)
                        adp_conf_error(e, adp_conf_get(dn, "uri"),
                                       "found \"%s\", expected coap://IP[:port] or coaps://IP[:port] "
                                       "(an IP literal or localhost, no path)", uri);
                else if (!(d->uri = strdup(uri)))
                        return -ENOMEM;
        }
        (void) adp_conf_get_string(dn, "psk_identity", false, e, &ident);
        char *key = NULL;
        r = adp_conf_get_secret(dn, "psk_key", false, e, &key);
        if (r == -ENOMEM)
                return r;
        if (key) {
                /* "hex:0a1b..." for a binary key, else the text itself. */
                size_t kl = strlen(key);
                if (strncmp(key, "hex:", 4) == 0) {
                        size_t hl = kl - 4;
                        d->psk = malloc(hl / 2 + 1);
                        if (!d->psk) {
                                hub_explicit_bzero(key, kl);
                                free(key);
                                return -ENOMEM;
                        }
                        bool ok = hl > 0 && hl % 2 == 0;
                        for (size_t i = 0; ok && i < hl / 2; i++) {
                                unsigned v;
                                ok = sscanf(key + 4 + 2 * i, "%2x", &v) == 1;
                                d->psk[i] = (uint8_t) v;
                        }
                        d->psk_len = hl / 2;
                        if (!ok)
                                adp_conf_error(e, dn, "the PSK key file starts with \"hex:\" but is not hex digits");
                } else {
                        d->psk = (uint8_t *) strdup(key);
                        d->psk_len = kl;
                        if (!d->psk) {
                                hub_explicit_bzero(key, kl);
                                free(key);
                                return -ENOMEM;
                        }
                }
                hub_explicit_bzero(key, kl);
                free(key);
        }
        if (d->secure && (!ident || !d->psk))
                adp_conf_error(e, dn, "found a coaps:// uri without psk_identity and psk_key_file (or "
                               "psk_key_credential), expected both for DTLS-PSK");
        if (!d->secure && (ident || d->psk))
                adp_conf_error(e, dn, "found psk_identity / psk_key for a coap:// uri, expected coaps:// for DTLS");
        if (ident && !(d->psk_identity = strdup(ident)))
                return -ENOMEM;

        if (adp_conf_get_seq(dn, "resources", false, e, &seq) == 0) {
                size_t n = adp_conf_len(seq);
                d->res = calloc(n ? n : 1, sizeof *d->res);
                if (!d->res)
                        return -ENOMEM;
                for (size_t i = 0; i < n; i++) {
                        const struct adp_conf_node *rn = adp_conf_at(seq, i), *ps;
                        struct cresource *res = &d->res[d->n_res];
                        const char *p = NULL;
                        int m = MODE_POLL, f = ADP_COAP_FORMAT_JSON;
                        (void) adp_conf_check_keys(rn, res_keys, e);
                        if (adp_conf_get_string(rn, "path", true, e, &p) == 0 && !resource_path_valid(p))
                                adp_conf_error(e, adp_conf_get(rn, "path"),
                                               "found \"%s\", expected a resource path like \"sensors/temp\" "
                                               "(no leading '/', query or fragment)", p);
                        (void) adp_conf_get_enum(rn, "mode", false, modes, e, &m);
                        (void) adp_conf_get_enum(rn, "format", false, formats, e, &f);
                        res->interval_usec = m == MODE_OBSERVE ? COAP_OBSERVE_REFRESH_USEC : COAP_DEFAULT_INTERVAL_USEC;
                        (void) adp_conf_get_duration(rn, "interval", false, 100 * USEC_PER_MSEC, 24 * 3600 * USEC_PER_SEC,
                                                     e, &res->interval_usec);
                        res->mode = (enum res_mode) m;
                        res->format = (enum adp_coap_format) f;
                        if (!p)
                                continue;
                        if (!(res->path = strdup(p)))
                                return -ENOMEM;
                        if (adp_conf_get_seq(rn, "points", false, e, &ps) == 0 && adp_conf_len(ps) > 0) {
                                size_t np = adp_conf_len(ps);
                                if (np > COAP_MAX_POINTS)
                                        adp_conf_error(e, ps, "found %zu points, expected at most %d", np, COAP_MAX_POINTS);
                                if (f == ADP_COAP_FORMAT_RAW && np > 1)
                                        adp_conf_error(e, ps, "found %zu points for a raw resource, expected one "
                                                       "(the whole payload is one value)", np);
                                res->points = calloc(np, sizeof *res->points);
                                if (!res->points)
                                        return -ENOMEM;
                                for (size_t j = 0; j < np && j < COAP_MAX_POINTS; j++) {
                                        const struct adp_conf_node *pn = adp_conf_at(ps, j);
                                        const char *nm = NULL, *pp = NULL;
                                        (void) adp_conf_check_keys(pn, point_keys, e);
                                        (void) adp_conf_get_string(pn, "name", true, e, &nm);
                                        if (adp_conf_get_string(pn, "path", false, e, &pp) == 0 &&
                                            !adp_coap_path_valid(pp))
                                                adp_conf_error(e, adp_conf_get(pn, "path"),
                                                               "found \"%s\", expected keys and array indexes "
                                                               "separated by '.', e.g. \"sensors.0.temp\"", pp);
                                        if (!nm)
                                                continue;
                                        for (size_t k = 0; k < res->n_points; k++)
                                                if (streq(res->points[k].name, nm))
                                                        adp_conf_error(e, pn, "duplicate point name \"%s\"", nm);
                                        res->points[res->n_points].name = strdup(nm);
                                        res->points[res->n_points].path = pp ? strdup(pp) : NULL;
                                        if (!res->points[res->n_points].name || (pp && !res->points[res->n_points].path))
                                                return -ENOMEM;
                                        res->n_points++;
                                }
                        } else {
                                /* No points: the whole payload, named after the path's last segment. */
                                res->points = calloc(1, sizeof *res->points);
                                const char *last = strrchr(p, '/');
                                if (!res->points || !(res->points[0].name = strdup(last ? last + 1 : p)))
                                        return -ENOMEM;
                                res->n_points = 1;
                        }
                        d->n_res++;
                }
        }
        if ((r = parse_writes(dn, "writes", "property", e, &d->writes, &d->n_writes)) < 0 ||
            (r = parse_writes(dn, "methods", "name", e, &d->methods, &d->n_methods)) < 0)
                return r;
        return 0;
}

static int coap_init(void *priv, const struct adp_init_info *info, struct adp_conf_errors *e) {
        struct adp_coap *a = priv;
        const struct adp_conf_node *seq;
        size_t before = adp_conf_errors_total(e);
        int r;

        (void) adp_conf_check_keys(info->item, item_keys, e);
        if (!(a->name = strdup(info->name)))
                return -ENOMEM;
        if (adp_conf_get_seq(info->item, "devices", true, e, &seq) == 0) {
                size_t n = adp_conf_len(seq);
                a->devs = calloc(n ? n : 1, sizeof *a->devs);
                if (!a->devs)
                        return -ENOMEM;
                for (size_t i = 0; i < n; i++) {
                        struct cdevice *d = &a->devs[a->n_devs++];
                        r = parse_device(a, adp_conf_at(seq, i), e, d);
                        if (r < 0)
                                return r;
                        for (size_t j = 0; d->id && j + 1 < a->n_devs; j++)
                                if (a->devs[j].id && streq(a->devs[j].id, d->id))
                                        adp_conf_error(e, adp_conf_at(seq, i), "duplicate device id \"%s\"", d->id);
                }
        }
        return adp_conf_errors_total(e) != before ? -EINVAL : 0;
}

static void coap_fini(void *priv) {
        struct adp_coap *a = priv;
        for (size_t i = 0; i < a->n_devs; i++)
                device_done(&a->devs[i]);
        free(a->devs);
        free(a->name);
        a->devs = NULL;
        a->n_devs = 0;
}

int adp_coap_validate(const struct adp_conf_node *item, struct adp_conf_errors *e) {
        return adp_validate(&adp_coap_ops, item, e);
}

/* ---- requests -------------------------------------------------------------------------------- */

static struct req *req_find(struct adp_coap *a, coap_bin_const_t t, bool unlink) {
        for (struct req **p = &a->reqs; *p; p = &(*p)->next)
                if ((*p)->token_len == t.length && memcmp((*p)->token, t.s, t.length) == 0) {
                        struct req *r = *p;
                        if (unlink) {
                                *p = r->next;
                                r->next = NULL;
                        }
                        return r;
                }
        return NULL;
}

static void req_drop_device(struct adp_coap *a, struct cdevice *d);

static void run(struct adp_coap *a);

static coap_session_t *device_session(struct cdevice *d) {
        struct adp_coap *a = d->a;
        if (d->session && !d->reset)
                return d->session;
        if (d->session) {
                req_drop_device(a, d);
                coap_session_set_app_data(d->session, NULL);
                coap_session_release(d->session);
                d->session = NULL;
        }
        d->reset = false;
        if (d->secure) {
                coap_dtls_cpsk_t c = {
                        .version = COAP_DTLS_CPSK_SETUP_VERSION,
                        .psk_info.identity = { .length = strlen(d->psk_identity), .s = (const uint8_t *) d->psk_identity },
                        .psk_info.key = { .length = d->psk_len, .s = d->psk },
                };
                d->session = coap_new_client_session_psk2(a->ctx, NULL, &d->addr, COAP_PROTO_DTLS, &c);
        } else
                d->session = coap_new_client_session(a->ctx, NULL, &d->addr, COAP_PROTO_UDP);
        if (!d->session) {
                alog(a, LOG_WARNING, d->id, 0, "cannot open a CoAP session to %s", d->uri);
                return NULL;
        }
        coap_session_set_app_data(d->session, d);
        coap_session_set_max_retransmit(d->session, 2);
        return d->session;
}

static void release_body(coap_session_t *s, void *p) {
        free(p);
}

/* Sends method on d's path; *ret_req gets the request (linked, token set). */
static int send_request(struct cdevice *d, coap_pdu_code_t code, const char *path, bool observe, unsigned content_format,
                        const uint8_t *body, size_t len, enum req_kind kind, struct req **ret_req) {
        struct adp_coap *a = d->a;
        coap_session_t *s = device_session(d);
        if (!s)
                return -ENOTCONN;
        coap_pdu_t *pdu = coap_pdu_init(COAP_MESSAGE_CON, code, coap_new_message_id(s), coap_session_max_pdu_size(s));
        if (!pdu)
                return -ENOMEM;
        struct req *rq = calloc(1, sizeof *rq);
        if (!rq) {
                coap_delete_pdu(pdu);
                return -ENOMEM;
        }
        coap_session_new_token(s, &rq->token_len, rq->token);
        (void) coap_add_token(pdu, rq->token_len, rq->token);
        uint8_t buf[4];
        if (observe)
                (void) coap_add_option(pdu, COAP_OPTION_OBSERVE, coap_encode_var_safe(buf, sizeof buf, COAP_OBSERVE_ESTABLISH), buf);
        for (const char *p = path; *p;) {
                size_t n = strcspn(p, "/");
                (void) coap_add_option(pdu, COAP_OPTION_URI_PATH, n, (const uint8_t *) p);
                p += n;
                if (*p == '/')
                        p++;
        }
        if (body) {
                (void) coap_add_option(pdu, COAP_OPTION_CONTENT_FORMAT, coap_encode_var_safe(buf, sizeof buf, content_format), buf);
                uint8_t *copy = malloc(len ? len : 1);
                if (!copy) {
                        free(rq);
                        coap_delete_pdu(pdu);
                        return -ENOMEM;
                }
                memcpy(copy, body, len);
                if (!coap_add_data_large_request(s, pdu, len, copy, release_body, copy)) {
                        free(copy);
                        free(rq);
                        coap_delete_pdu(pdu);
                        return -ENOMEM;
                }
        }
        rq->kind = kind;
        rq->dev = d;
        rq->next = a->reqs;
        a->reqs = rq;
        if (coap_send(s, pdu) == COAP_INVALID_MID) {
                a->reqs = rq->next;
                free(rq);
                return -EIO;
        }
        *ret_req = rq;
        return 0;
}

/* ---- reading ---------------------------------------------------------------------------------- */

static void set_online(struct cdevice *d, bool online, const char *why) {
        if (d->online == online && online)
                return;
        d->online = online;
        d->a->host->device_state(d->a->host->host, d->id, online ? ADP_DEVICE_ONLINE : ADP_DEVICE_OFFLINE, why);
}

static void read_resource(struct cresource *res) {
        struct cdevice *d = res->dev;
        struct req *rq;
        if (res->mode == MODE_OBSERVE) {
                /* (Re-)register; a previous registration's token is forgotten. */
                for (struct req *x = d->a->reqs; x; x = x->next)
                        if (x->kind == REQ_READ && x->res == res)
                                x->res = NULL;
        }
        int r = send_request(d, COAP_REQUEST_CODE_GET, res->path, res->mode == MODE_OBSERVE, 0, NULL, 0, REQ_READ, &rq);
        if (r < 0) {
                set_online(d, false, "cannot send a request");
                return;
        }
        rq->res = res;
        d->a->polls++;
}

static void on_resource_timer(void *ud, uint64_t usec) {
        struct cresource *res = ud;
        struct adp_coap *a = res->dev->a;
        /* A sampling adapter waits while the gateway has not stored what it produced. */
        if (res->mode == MODE_POLL && a->host->backlog(a->host->host) > 1000)
                (void) a->host->timer_set(a->host->host, res->timer, usec + res->interval_usec / 4 + 1);
        else {
                if (res->mode == MODE_POLL || !res->observing || a->host->now(a->host->host) - res->last_usec >= res->interval_usec)
                        read_resource(res);
                (void) a->host->timer_set(a->host->host, res->timer, usec + res->interval_usec);
        }
        run(a);
}

static void handle_reading(struct cresource *res, const coap_pdu_t *rcv) {
        struct cdevice *d = res->dev;
        struct adp_coap *a = d->a;
        size_t len = 0, offset = 0, total = 0;
        const uint8_t *data = NULL;
        (void) coap_get_data_large(rcv, &len, &data, &offset, &total);
        struct adp_coap_point pts[COAP_MAX_POINTS];
        for (size_t i = 0; i < res->n_points; i++)
                pts[i] = (struct adp_coap_point) { res->points[i].name, res->points[i].path };
        json_t *points = NULL;
        size_t missing = 0;
        int r = adp_coap_map(res->format, pts, res->n_points, data, len, &points, &missing);
        if (r < 0) {
                a->errors++;
                alog(a, LOG_WARNING, d->id, r, "resource %s: cannot decode the %s payload (%zu bytes): %s", res->path,
                     adp_coap_format_to_string(res->format), len,
                     r == -E2BIG ? "too large or too deep" : r == -EBADMSG ? "malformed" : "%m");
                return;
        }
        if (missing > 0)
                alog(a, LOG_NOTICE, d->id, 0, "resource %s: %zu of %zu points missing from the payload", res->path, missing,
                     res->n_points);
        res->last_usec = a->host->now(a->host->host);
        _cleanup_free_ char *text = adp_json_dumps(points, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(points);
        if (!text)
                return;
        struct hub_msg *m = NULL;
        r = hub_msg_new(text, strlen(text), HUB_MSG_D2C_MAX_SIZE, &m);
        if (r >= 0 && (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json")) >= 0 &&
            (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8")) >= 0 &&
            (r = hub_msg_set_prop(m, "adapter", a->name)) >= 0 &&
            (r = hub_msg_set_prop(m, "coap-resource", res->path)) >= 0)
                r = a->host->emit(a->host->host, d->id, m);
        hub_msg_unref(m);
        if (r < 0)
                alog(a, LOG_WARNING, d->id, r, "resource %s: cannot emit the reading: %m", res->path);
}

/* ---- writes: desired properties and methods -------------------------------------------------- */

static int status_of(coap_pdu_code_t code) {
        unsigned cls = COAP_RESPONSE_CLASS(code), det = code & 0x1f;
        if (cls == 2)
                return 200;
        if (cls == 4)
                return det == 4 ? 404 : det == 5 ? 405 : 400;
        return 502;
}

static void write_done(struct adp_coap *a, struct req *rq, int status, const char *json_payload) {
        if (rq->is_method) {
                a->host->command_result(a->host->host, rq->cmd_id, status, json_payload);
                return;
        }
        struct req *g = rq->group ? rq->group : rq;
        if (status > g->worst)
                g->worst = status;
        if (--g->pending == 0) {
                a->host->command_result(a->host->host, g->cmd_id, g->worst, NULL);
                if (g != rq)
                        free(g);
        }
}

static int coap_submit(void *priv, const struct adp_command *cmd) {
        struct adp_coap *a = priv;
        struct cdevice *d = NULL;
        for (size_t i = 0; i < a->n_devs; i++)
                if (streq(a->devs[i].id, cmd->device_id))
                        d = &a->devs[i];
        if (!d)
                return -ENOENT;
        if (cmd->kind == ADP_CMD_METHOD) {
                struct cwrite *w = NULL;
                for (size_t i = 0; i < d->n_methods; i++)
                        if (streq(d->methods[i].key, cmd->name))
                                w = &d->methods[i];
                if (!w)
                        return -EOPNOTSUPP;
                json_error_t je;
                json_t *v = json_loads(cmd->payload ? cmd->payload : "null", JSON_DECODE_ANY, &je);
                uint8_t *body = NULL;
                size_t len = 0;
                int r = v ? adp_coap_encode(w->format, v, &body, &len) : -EINVAL;
                json_decref(v);
                if (r < 0)
                        return r == -ENOMEM ? r : -EINVAL;
                struct req *rq;
                r = send_request(d, w->method, w->path, false, adp_coap_format_content_format(w->format), body,
                                 len, REQ_WRITE, &rq);
                free(body);
                if (r < 0)
                        return r;
                rq->cmd_id = cmd->id;
                rq->is_method = true;
                a->writes++;
                run(a);
                return 0;
        }
        if (cmd->kind != ADP_CMD_DESIRED)
                return -EOPNOTSUPP;
        json_error_t je;
        json_t *patch = json_loads(cmd->payload, 0, &je);
        if (!json_is_object(patch)) {
                json_decref(patch);
                return -EINVAL;
        }
        struct req *group = NULL;
        const char *k;
        json_t *v;
        int r = 0;
        json_object_foreach(patch, k, v) {
                struct cwrite *w = NULL;
                for (size_t i = 0; i < d->n_writes; i++)
                        if (streq(d->writes[i].key, k))
                                w = &d->writes[i];
                if (!w)
                        continue; /* a property no resource is mapped to */
                uint8_t *body = NULL;
                size_t len = 0;
                if (adp_coap_encode(w->format, v, &body, &len) < 0) {
                        alog(a, LOG_NOTICE, d->id, 0, "desired property %s cannot be written as %s, ignoring", k,
                             adp_coap_format_to_string(w->format));
                        continue;
                }
                struct req *rq;
                r = send_request(d, w->method, w->path, false, adp_coap_format_content_format(w->format), body, len,
                                 REQ_WRITE, &rq);
                free(body);
                if (r < 0)
                        break;
                a->writes++;
                rq->cmd_id = cmd->id;
                if (!group) {
                        group = calloc(1, sizeof *group);
                        if (!group) {
                                r = -ENOMEM;
                                break;
                        }
                        group->cmd_id = cmd->id;
                        group->pending = 1; /* held until the loop ends */
                }
                rq->group = group;
                group->pending++;
        }
        json_decref(patch);
        if (!group)
                return r < 0 ? r : -EOPNOTSUPP; /* nothing to write: the host answers */
        if (r < 0 && group->worst < 502)
                group->worst = 502;
        /* Drop the loop's hold: may complete at once when every request already failed. */
        if (--group->pending == 0) {
                a->host->command_result(a->host->host, group->cmd_id, group->worst ? group->worst : 200, NULL);
                free(group);
        }
        run(a);
        return 0;
}

/* ---- libcoap callbacks ------------------------------------------------------------------------ */

static coap_response_t on_response(coap_session_t *s, const coap_pdu_t *sent, const coap_pdu_t *rcv, const coap_mid_t mid) {
        struct adp_coap *a = coap_get_app_data(coap_session_get_context(s));
        struct cdevice *d = coap_session_get_app_data(s);
        if (!a || !d)
                return COAP_RESPONSE_FAIL;
        coap_opt_iterator_t it;
        bool observe = coap_check_option(rcv, COAP_OPTION_OBSERVE, &it) != NULL;
        struct req *rq = req_find(a, coap_pdu_get_token(rcv), false);
        if (!rq)
                return COAP_RESPONSE_FAIL; /* unknown token: RST (an Observe we forgot) */
        coap_pdu_code_t code = coap_pdu_get_code(rcv);
        set_online(d, true, NULL);
        if (rq->kind == REQ_READ) {
                struct cresource *res = rq->res;
                bool keep = res && res->mode == MODE_OBSERVE && observe && COAP_RESPONSE_CLASS(code) == 2;
                if (!keep)
                        (void) req_find(a, coap_pdu_get_token(rcv), true);
                if (res && COAP_RESPONSE_CLASS(code) == 2) {
                        if (res->mode == MODE_OBSERVE) {
                                res->observing = observe;
                                a->notifications++;
                        }
                        handle_reading(res, rcv);
                } else if (res) {
                        a->errors++;
                        alog(a, LOG_WARNING, d->id, 0, "resource %s: the device answered %u.%02u", res->path,
                             COAP_RESPONSE_CLASS(code), code & 0x1f);
                }
                if (!keep)
                        free(rq);
                return COAP_RESPONSE_OK;
        }
        (void) req_find(a, coap_pdu_get_token(rcv), true);
        size_t len = 0, offset = 0, total = 0;
        const uint8_t *data = NULL;
        (void) coap_get_data_large(rcv, &len, &data, &offset, &total);
        _cleanup_free_ char *payload = NULL;
        if (rq->is_method && len > 0) {
                json_error_t je;
                json_t *v = json_loadb((const char *) data, len, JSON_DECODE_ANY, &je);
                if (!v && !memchr(data, 0, len))
                        v = json_stringn((const char *) data, len);
                payload = v ? adp_json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
                json_decref(v);
        }
        write_done(a, rq, status_of(code), payload);
        free(rq);
        return COAP_RESPONSE_OK;
}

static void on_nack(coap_session_t *s, const coap_pdu_t *sent, const coap_nack_reason_t reason, const coap_mid_t mid) {
        struct adp_coap *a = coap_get_app_data(coap_session_get_context(s));
        struct cdevice *d = coap_session_get_app_data(s);
        if (!a || !d || !sent)
                return;
        struct req *rq = req_find(a, coap_pdu_get_token(sent), true);
        const char *why = reason == COAP_NACK_TOO_MANY_RETRIES ? "no answer (timeout)"
                          : reason == COAP_NACK_TLS_FAILED ? "DTLS handshake failed"
                          : reason == COAP_NACK_RST ? "reset by the device" : "not deliverable";
        if (reason == COAP_NACK_TLS_FAILED || reason == COAP_NACK_NOT_DELIVERABLE)
                d->reset = true;
        set_online(d, false, why);
        a->errors++;
        alog(a, LOG_WARNING, d->id, 0, "%s: %s", d->uri, why);
        if (!rq)
                return;
        if (rq->kind == REQ_WRITE)
                write_done(a, rq, reason == COAP_NACK_TOO_MANY_RETRIES ? 504 : 502, NULL);
        else if (rq->res)
                rq->res->observing = false;
        free(rq);
}

static int on_event(coap_session_t *s, const coap_event_t ev) {
        struct cdevice *d = coap_session_get_app_data(s);
        if (!d)
                return 0;
        if (ev == COAP_EVENT_DTLS_ERROR || ev == COAP_EVENT_DTLS_CLOSED || ev == COAP_EVENT_SESSION_FAILED) {
                d->reset = true;
                for (size_t i = 0; i < d->n_res; i++)
                        d->res[i].observing = false;
                set_online(d, false, ev == COAP_EVENT_DTLS_ERROR ? "DTLS error (wrong PSK?)" : "session closed");
        }
        return 0;
}

/* Requests of a device whose session is being replaced: their answers will never come. */
static void req_drop_device(struct adp_coap *a, struct cdevice *d) {
        for (struct req **p = &a->reqs; *p;) {
                struct req *rq = *p;
                if (rq->dev != d) {
                        p = &rq->next;
                        continue;
                }
                *p = rq->next;
                if (rq->kind == REQ_WRITE)
                        write_done(a, rq, 502, NULL);
                free(rq);
        }
}

/* ---- the loop ------------------------------------------------------------------------------- */

static void on_io_timer(void *ud, uint64_t usec) {
        run(ud);
}

static void run(struct adp_coap *a) {
        if (!a->ctx)
                return;
        (void) coap_io_process(a->ctx, COAP_IO_NO_WAIT);
        coap_tick_t now;
        coap_ticks(&now);
        unsigned ms = coap_io_prepare_epoll(a->ctx, now);
        if (ms == 0 || ms > 1000)
                ms = 1000;
        (void) a->host->timer_set(a->host->host, a->io_timer, a->host->now(a->host->host) + (uint64_t) ms * USEC_PER_MSEC);
}

static void on_fd(void *ud, int fd, uint32_t revents) {
        run(ud);
}

static int coap_start(void *priv, const struct adp_host *host) {
        struct adp_coap *a = priv;
        int r;
        a->host = host;
        coap_startup();
        a->ctx = coap_new_context(NULL);
        if (!a->ctx)
                return -ENOMEM;
        coap_set_app_data(a->ctx, a);
        coap_context_set_block_mode(a->ctx, COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
        coap_register_response_handler(a->ctx, on_response);
        coap_register_nack_handler(a->ctx, on_nack);
        coap_register_event_handler(a->ctx, on_event);
        int fd = coap_context_get_coap_fd(a->ctx);
        if (fd < 0)
                return -EOPNOTSUPP;
        if ((r = host->watch_add(host->host, fd, EPOLLIN, on_fd, a, &a->watch)) < 0 ||
            (r = host->timer_add(host->host, host->now(host->host) + USEC_PER_SEC, on_io_timer, a, &a->io_timer)) < 0)
                return r;
        for (size_t i = 0; i < a->n_devs; i++) {
                struct cdevice *d = &a->devs[i];
                d->a = a;
                r = host->device_add(host->host, d->id);
                if (r < 0) {
                        alog(a, LOG_ERR, d->id, r, "cannot declare device %s: %m", d->id);
                        continue;
                }
                for (size_t j = 0; j < d->n_res; j++) {
                        struct cresource *res = &d->res[j];
                        res->dev = d;
                        /* Spread first reads over 100 ms steps so that many devices do not start at once. */
                        r = host->timer_add(host->host, host->now(host->host) + (i * 7 + j) % 10 * 10 * USEC_PER_MSEC + 1,
                                            on_resource_timer, res, &res->timer);
                        if (r < 0)
                                return r;
                }
        }
        return 0;
}

static void coap_stop(void *priv) {
        struct adp_coap *a = priv;
        if (!a->host)
                return;
        for (size_t i = 0; i < a->n_devs; i++) {
                struct cdevice *d = &a->devs[i];
                for (size_t j = 0; j < d->n_res; j++) {
                        a->host->timer_free(a->host->host, d->res[j].timer);
                        d->res[j].timer = NULL;
                }
        }
        while (a->reqs) {
                struct req *rq = a->reqs;
                a->reqs = rq->next;
                if (rq->kind == REQ_WRITE) {
                        struct req *g = rq->group;
                        if (rq->is_method || !g)
                                a->host->command_result(a->host->host, rq->cmd_id, 503, NULL);
                        else if (--g->pending == 0) {
                                a->host->command_result(a->host->host, g->cmd_id, 503, NULL);
                                free(g);
                        }
                }
                free(rq);
        }
        a->host->watch_free(a->host->host, a->watch);
        a->host->timer_free(a->host->host, a->io_timer);
        a->watch = NULL;
        a->io_timer = NULL;
        for (size_t i = 0; i < a->n_devs; i++)
                if (a->devs[i].session) {
                        coap_session_set_app_data(a->devs[i].session, NULL);
                        coap_session_release(a->devs[i].session);
                        a->devs[i].session = NULL;
                }
        if (a->ctx) {
                coap_free_context(a->ctx);
                a->ctx = NULL;
        }
        for (size_t i = 0; i < a->n_devs; i++)
                a->host->device_remove(a->host->host, a->devs[i].id);
}

static char *coap_stats(void *priv) {
        struct adp_coap *a = priv;
        json_t *j = json_pack("{s:I, s:I, s:I, s:I}", "requests", (json_int_t) a->polls, "notifications",
                              (json_int_t) a->notifications, "errors", (json_int_t) a->errors, "writes",
                              (json_int_t) a->writes);
        char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        return s;
}

const struct adp_ops adp_coap_ops = {
        .version = ADP_OPS_VERSION,
        .type = "coap",
        .priv_size = sizeof(struct adp_coap),
        .init = coap_init,
        .start = coap_start,
        .submit = coap_submit,
        .reconfigure = NULL,
        .stats = coap_stats,
        .stop = coap_stop,
        .fini = coap_fini,
};
