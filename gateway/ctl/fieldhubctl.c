/* SPDX-License-Identifier: MIT */
/* fieldhubctl: the operator's command-line tool.
 *
 * Registry, twin, query, C2D and method commands speak the service REST API (reference §5),
 * through one code path with two transports: the local daemon's admin socket (default; no
 * key, access by the socket's permissions, requests run with iothubowner rights), or HTTPS
 * to any hub with --hub and a shared access policy (a connection string, or --policy and
 * --key-file), signing a policy SAS token per request. status, reload, backup and
 * monitor-events are admin-socket commands; restore, check-config and sas-token work
 * offline. */

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <sqlite3.h>

#include "adapter/conf.h"
#include "admin-proto.h"
#include "config.h"
#include "fieldhub-paths.h"
#include "front/coap-config.h"
#include "hub/auth.h"
#include "hub/json-dump.h"
#include "hub/macro.h"
#include "hub/random.h"
#include "hub/store.h"
#include "hub/urlenc.h"

#define EXIT_FAIL 1
#define EXIT_DATAERR 65
#define EXIT_USAGE 64
#define API_VERSION "2021-04-12"
#define MAX_RESPONSE (64u * 1024u * 1024u)
#define DEFAULT_TIMEOUT_SEC 120

static const char *arg_socket = FIELDHUB_ADMIN_SOCKET;
static bool arg_json = false;

/* HTTPS transport (--hub). */
static char *arg_hub_host = NULL;   /* where to connect */
static unsigned arg_hub_port = 443;
static const char *arg_cafile = NULL;
static char *cs_host = NULL;        /* HostName: the SAS sr and the name devices use */
static char *cs_policy = NULL;      /* SharedAccessKeyName */
static char *cs_key = NULL;         /* SharedAccessKey */
static char *cs_sas = NULL;         /* SharedAccessSignature (ready-made) */

static int fail(const char *fmt, ...) _printf_(1, 2);
static int fail(const char *fmt, ...) {
        va_list ap;
        fputs("fieldhubctl: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        return EXIT_FAIL;
}

#define usage_fail(...) (fail(__VA_ARGS__), EXIT_USAGE)

static bool over_https(void) {
        return arg_hub_host != NULL;
}

static void print_json(const json_t *j) {
        char *s = hub_json_dumps(j, JSON_INDENT(2) | JSON_ENCODE_ANY);
        if (s) {
                puts(s);
                free(s);
        }
}

static const char *jstr(const json_t *o, const char *k) {
        const char *s = json_string_value(json_object_get(o, k));
        return s ? s : "";
}

/* ---- usage ------------------------------------------------------------------------------ */

struct usage {
        const char *cmd;
        const char *text;
};

static const struct usage usages[] = {
        { "check-config", "check-config [FILE] [--confd DIR]\n"
                          "    Validate a configuration (exit 78 when invalid). Offline." },
        { "sas-token", "sas-token --hub HOST (--device ID [--module M] | --policy NAME) (--key KEY | --key-file FILE)\n"
                       "          [--ttl 1h]\n"
                       "    Generate a SAS token (like az iot hub generate-sas-token). Offline." },
        { "status", "status\n    Daemon, store and registry summary (over HTTPS: statistics and health)." },
        { "endpoints", "endpoints\n    Route endpoints: state, backlog (count, bytes), oldest message age, drain rate, drops, expiries.\n"
                       "    Admin socket only." },
        { "reload", "reload [--wait]\n    Re-read the configuration; with --wait, fail when it is rejected. Admin socket only." },
        { "device", "device create ID [--auth sas|selfSigned|certificateAuthority] [--primary-thumbprint T]\n"
                    "                 [--secondary-thumbprint T] [--disabled]\n"
                    "device show ID\n"
                    "device list [--top N]\n"
                    "device update ID --status enabled|disabled [--status-reason TEXT] [--etag E]\n"
                    "device delete ID [--etag E]\n"
                    "device show-connection-string ID [--secondary]\n"
                    "device show-coap-psk ID [--secondary]\n"
                    "    The CoAP DTLS-PSK identity and key (hex) of a SAS device: HMAC-SHA256 of its key\n"
                    "    over \"fieldhub-coap-psk\"; identity ID (primary) or ID#2 (--secondary).\n"
                    "device regenerate-key ID --key primary|secondary|swap" },
        { "twin", "twin show ID\n"
                  "twin update ID [--desired JSON] [--tags JSON] [--etag E]" },
        { "query", "query 'SELECT ...' [--page-size N] [--max-items N]\n"
                   "    Runs a query and follows x-ms-continuation to the end (or --max-items)." },
        { "c2d", "c2d send ID [--body TEXT | --body-file F] [--property K=V]... [--message-id M]\n"
                 "             [--correlation-id C] [--ack full|positive|negative|none] [--ttl 5min]\n"
                 "c2d purge ID\n"
                 "c2d feedback [--wait] [--timeout 60s] [--no-complete]" },
        { "method", "method invoke ID NAME [--payload JSON] [--timeout 30s] [--connect-timeout 0s]" },
        { "backup", "backup FILE [--force]\n"
                    "    Consistent online copy of the store into FILE (mode 0600). Admin socket only." },
        { "restore", "restore FILE [--state-dir DIR | --config FILE] [--force]\n"
                     "    Install a backup as the store. Only while fieldhubd is stopped." },
        { "monitor-events", "monitor-events [--device ID] [--properties] [--timeout T] [--after SEQ]\n"
                            "    Print the hub's events as they arrive; --after replays those kept after that\n"
                            "    sequence number first (0: every event still kept). Admin socket only." },
        {},
};

static void help_cmd(const char *cmd) {
        for (const struct usage *u = usages; u->cmd; u++)
                if (streq(u->cmd, cmd)) {
                        printf("Usage: fieldhubctl [GLOBAL OPTIONS] %s\n", u->text);
                        return;
                }
}

static void help(void) {
        printf("Usage: fieldhubctl [GLOBAL OPTIONS] COMMAND ...\n\nCommands:\n");
        for (const struct usage *u = usages; u->cmd; u++) {
                printf("  ");
                for (const char *p = u->text; *p; p++) {
                        putchar(*p);
                        if (*p == '\n')
                                printf("  ");
                }
                putchar('\n');
        }
        printf("\nGlobal options:\n"
               "  --socket PATH              admin socket (default %s)\n"
               "  --hub HOST[:PORT]          use the HTTPS service API of HOST instead (port 443)\n"
               "  --connection-string CS     HostName=...;SharedAccessKeyName=...;SharedAccessKey=...\n"
               "                             (or $FIELDHUB_CONNECTION_STRING)\n"
               "  --policy NAME --key-file F a policy name and a file holding its key\n"
               "  --cafile FILE              trust the CA in FILE (e.g. the hub's generated CA)\n"
               "  --json                     machine-readable output\n"
               "  --help, --version\n"
               "'fieldhubctl COMMAND --help' describes one command.\n",
               FIELDHUB_ADMIN_SOCKET);
}

/* ---- connection strings (reference §1.1) ---------------------------------------------- */

static int read_key_file(const char *path, char **ret) {
        char buf[256];
        FILE *f = fopen(path, "re");
        if (!f)
                return -errno;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        bool more = !feof(f);
        fclose(f);
        buf[n] = 0;
        buf[strcspn(buf, "\r\n \t")] = 0;
        if (more || !buf[0]) {
                hub_explicit_bzero(buf, sizeof buf);
                return -EINVAL;
        }
        *ret = strdup(buf);
        hub_explicit_bzero(buf, sizeof buf);
        return *ret ? 0 : -ENOMEM;
}

/* Parses a service connection string into cs_*: ';'-separated Name=Value, each split at the
 * first '=', names case-sensitive. Prints the reason and returns EXIT_USAGE when invalid. */
static int parse_connection_string(const char *s) {
        _cleanup_free_ char *copy = strdup(s);
        char *save = NULL;
        unsigned idx = 0;
        if (!copy)
                return fail("out of memory");
        for (char *el = strtok_r(copy, ";", &save); el; el = strtok_r(NULL, ";", &save)) {
                idx++;
                char *eq = strchr(el, '=');
                if (!eq || eq == el)
                        return usage_fail("connection string: element %u (\"%.*s\") is not Name=Value", idx,
                                          (int) strcspn(el, "="), el);
                *eq = 0;
                const char *name = el, *value = eq + 1;
                char **slot = NULL;
                if (streq(name, "HostName"))
                        slot = &cs_host;
                else if (streq(name, "SharedAccessKeyName"))
                        slot = &cs_policy;
                else if (streq(name, "SharedAccessKey"))
                        slot = &cs_key;
                else if (streq(name, "SharedAccessSignature"))
                        slot = &cs_sas;
                else if (streq(name, "DeviceId") || streq(name, "ModuleId") || streq(name, "x509") ||
                         streq(name, "GatewayHostName"))
                        return usage_fail("connection string: \"%s\" belongs to a device connection string; "
                                          "fieldhubctl needs a service policy one "
                                          "(HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)",
                                          name);
                else
                        return usage_fail("connection string: unknown name \"%s\" (names are case-sensitive: "
                                          "HostName, SharedAccessKeyName, SharedAccessKey, SharedAccessSignature)",
                                          name);
                if (*slot)
                        return usage_fail("connection string: \"%s\" appears twice", name);
                if (!*value)
                        return usage_fail("connection string: \"%s\" has an empty value", name);
                *slot = strdup(value);
                if (!*slot)
                        return fail("out of memory");
        }
        hub_explicit_bzero(copy, strlen(s));
        if (!cs_host)
                return usage_fail("connection string: HostName is missing");
        if (!strchr(cs_host, '.'))
                return usage_fail("connection string: HostName \"%s\" must contain a dot", cs_host);
        if (cs_sas) {
                if (cs_key || cs_policy)
                        return usage_fail("connection string: SharedAccessSignature excludes SharedAccessKey(Name)");
                return 0;
        }
        if (!cs_policy)
                return usage_fail("connection string: SharedAccessKeyName (the policy) is missing");
        if (!cs_key)
                return usage_fail("connection string: SharedAccessKey is missing");
        return 0;
}

static int parse_hub(const char *s) {
        const char *colon;
        if (s[0] == '[') {
                const char *end = strchr(s, ']');
                if (!end)
                        return usage_fail("--hub: found \"%s\", expected HOST[:PORT] or [IPv6]:PORT", s);
                arg_hub_host = strndup(s, (size_t) (end - s + 1));
                colon = end[1] == ':' ? end + 1 : NULL;
                if (!colon && end[1])
                        return usage_fail("--hub: found \"%s\", expected HOST[:PORT] or [IPv6]:PORT", s);
        } else {
                colon = strchr(s, ':');
                arg_hub_host = colon ? strndup(s, (size_t) (colon - s)) : strdup(s);
        }
        if (!arg_hub_host || !arg_hub_host[0])
                return usage_fail("--hub: found \"%s\", expected HOST[:PORT]", s);
        if (colon) {
                char *end;
                errno = 0;
                unsigned long p = strtoul(colon + 1, &end, 10);
                if (errno || *end || p == 0 || p > 65535)
                        return usage_fail("--hub: found port \"%s\", expected 1..65535", colon + 1);
                arg_hub_port = (unsigned) p;
        }
        return 0;
}

/* ---- the REST call, over either transport --------------------------------------------- */

struct resp {
        int status;
        json_t *headers; /* name -> string */
        char *body;
        size_t len;
};

static void resp_done(struct resp *r) {
        json_decref(r->headers);
        free(r->body);
        *r = (struct resp) { 0 };
}

/* A response header, names compared case-insensitively. */
static const char *resp_header(const struct resp *r, const char *name) {
        const char *k;
        json_t *v;
        json_object_foreach(r->headers, k, v) if (strcasecmp(k, name) == 0) return json_string_value(v);
        return NULL;
}

static int call_admin_raw(json_t *req, int pass_fd, uint64_t timeout_usec, json_t **ret_reply) {
        int fd = -1;
        int r = gw_admin_connect(arg_socket, &fd);
        if (r < 0) {
                if (r == -ENOENT || r == -ECONNREFUSED)
                        return fail("cannot reach fieldhubd at %s: %s (is it running?)", arg_socket, strerror(-r));
                if (r == -EACCES)
                        return fail("no permission to use %s: run as root or as a member of the fieldhub group",
                                    arg_socket);
                return fail("cannot connect to %s: %s", arg_socket, strerror(-r));
        }
        _cleanup_(gw_admin_reader_done) struct gw_admin_reader rd = { 0 };
        r = gw_admin_send(fd, req, pass_fd);
        if (r >= 0)
                r = gw_admin_read(fd, &rd, timeout_usec, ret_reply);
        close(fd);
        if (r < 0)
                return fail("no answer from fieldhubd: %s", r == -ECONNRESET ? "it closed the connection" : strerror(-r));
        return 0;
}

/* Sends one admin command; on success *ret_reply holds the whole reply (ok true). */
static int call(const char *cmd, json_t *args, json_t **ret_reply) {
        json_t *req = json_pack("{s:s, s:o}", "cmd", cmd, "args", args ? args : json_object());
        json_t *reply = NULL;
        int r = req ? call_admin_raw(req, -1, DEFAULT_TIMEOUT_SEC * 1000000ULL, &reply) : fail("out of memory");
        json_decref(req);
        if (r)
                return r;
        if (!json_is_true(json_object_get(reply, "ok"))) {
                const char *e = json_string_value(json_object_get(reply, "error"));
                json_t *det = json_object_get(reply, "details");
                size_t i;
                json_t *v;
                fprintf(stderr, "fieldhubctl: %s: %s\n", cmd, e ? e : "failed");
                json_array_foreach(det, i, v) fprintf(stderr, "  %s\n", json_string_value(v));
                json_decref(reply);
                return EXIT_FAIL;
        }
        *ret_reply = reply;
        return 0;
}

struct curl_buf {
        struct resp *resp;
        bool overflow;
};

static size_t on_curl_body(char *p, size_t size, size_t n, void *ud) {
        struct curl_buf *b = ud;
        size_t len = size * n;
        if (b->resp->len + len > MAX_RESPONSE) {
                b->overflow = true;
                return 0;
        }
        char *nb = realloc(b->resp->body, b->resp->len + len + 1);
        if (!nb)
                return 0;
        memcpy(nb + b->resp->len, p, len);
        b->resp->len += len;
        nb[b->resp->len] = 0;
        b->resp->body = nb;
        return len;
}

static size_t on_curl_header(char *p, size_t size, size_t n, void *ud) {
        struct curl_buf *b = ud;
        size_t len = size * n;
        if (len >= 5 && strncmp(p, "HTTP/", 5) == 0) {
                json_object_clear(b->resp->headers); /* a new response (after 100 Continue) */
                return len;
        }
        const char *colon = memchr(p, ':', len);
        if (!colon)
                return len;
        _cleanup_free_ char *name = strndup(p, (size_t) (colon - p));
        const char *v = colon + 1, *end = p + len;
        while (v < end && (*v == ' ' || *v == '\t'))
                v++;
        while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
                end--;
        if (name) {
                for (char *c = name; *c; c++)
                        *c = (char) tolower((unsigned char) *c);
                json_object_set_new(b->resp->headers, name, json_stringn(v, (size_t) (end - v)));
        }
        return len;
}

static int call_https(const char *method, const char *target, json_t *headers, const char *body, size_t blen,
                      long timeout_sec, struct resp *ret) {
        static bool inited = false;
        _cleanup_free_ char *url = NULL, *auth = NULL, *tok = NULL;
        struct curl_slist *hl = NULL;
        struct resp out = { .headers = json_object() };
        struct curl_buf cb = { .resp = &out };
        char errbuf[CURL_ERROR_SIZE] = "";
        const char *k;
        json_t *v;
        int r;

        if (!inited) {
                curl_global_init(CURL_GLOBAL_DEFAULT);
                inited = true;
        }
        if (cs_sas)
                tok = strdup(cs_sas);
        else {
                r = hub_sas_generate(cs_host, cs_key, (uint64_t) time(NULL) + 3600, cs_policy, &tok);
                if (r < 0) {
                        resp_done(&out);
                        return fail("cannot sign a token: %s",
                                    r == -EINVAL ? "the policy key is not base64 of 16 to 64 bytes" : strerror(-r));
                }
        }
        if (!tok || asprintf(&auth, "Authorization: %s", tok) < 0 ||
            asprintf(&url, "https://%s:%u%s", arg_hub_host, arg_hub_port, target) < 0) {
                auth = url = NULL;
                resp_done(&out);
                return fail("out of memory");
        }
        hl = curl_slist_append(hl, auth);
        hl = curl_slist_append(hl, "User-Agent: fieldhubctl/" FIELDHUB_VERSION);
        hl = curl_slist_append(hl, "Accept: application/json");
        hl = curl_slist_append(hl, "Expect:");
        bool have_ct = false;
        json_object_foreach(headers, k, v) if (strcasecmp(k, "Content-Type") == 0) have_ct = true;
        if (body && !have_ct)
                hl = curl_slist_append(hl, "Content-Type: application/json; charset=utf-8");
        json_object_foreach(headers, k, v) {
                _cleanup_free_ char *line = NULL;
                if (asprintf(&line, "%s: %s", k, json_string_value(v)) >= 0)
                        hl = curl_slist_append(hl, line);
                else
                        line = NULL;
        }

        CURL *c = curl_easy_init();
        if (!c || !hl) {
                curl_slist_free_all(hl);
                resp_done(&out);
                return fail("cannot initialise libcurl");
        }
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, hl);
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "https");
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT, timeout_sec);
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 30L);
        curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_curl_body);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, &cb);
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_curl_header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, &cb);
        curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
        curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
        if (arg_cafile)
                curl_easy_setopt(c, CURLOPT_CAINFO, arg_cafile);
        if (streq(method, "HEAD"))
                curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
        if (body) {
                curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
                curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) blen);
        }
        CURLcode cc = curl_easy_perform(c);
        long status = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_cleanup(c);
        curl_slist_free_all(hl);
        hub_explicit_bzero(auth, strlen(auth));
        if (cc != CURLE_OK) {
                resp_done(&out);
                if (cb.overflow)
                        return fail("%s: the response is over %u bytes", url, MAX_RESPONSE);
                return fail("%s: %s", url, errbuf[0] ? errbuf : curl_easy_strerror(cc));
        }
        out.status = (int) status;
        *ret = out;
        return 0;
}

/* Runs a REST request. target is "/path" or "/path?query" (api-version is added). headers
 * (borrowed, may be NULL): name -> string. Returns 0 with *ret filled when an HTTP answer came
 * (whatever its status), else the exit status after printing why. */
static int rest(const char *method, const char *target, json_t *headers, const char *body, size_t blen,
                long timeout_sec, struct resp *ret) {
        _cleanup_free_ char *t = NULL;
        if (asprintf(&t, "%s%capi-version=" API_VERSION, target, strchr(target, '?') ? '&' : '?') < 0)
                return fail("out of memory");
        if (blen > GW_ADMIN_MAX_MSG - 4096)
                return fail("the request body is over %u bytes", GW_ADMIN_MAX_MSG - 4096);
        if (over_https())
                return call_https(method, t, headers, body, blen, timeout_sec, ret);

        json_t *jb = body ? json_stringn(body, blen) : NULL;
        if (body && !jb)
                return fail("the request body is not UTF-8 text; the admin socket carries text bodies only");
        json_t *req = json_pack("{s:s, s:{s:s, s:s, s:O?, s:o?}}", "cmd", "api", "args", "method", method, "target", t,
                                "headers", headers, "body", jb);
        json_t *reply = NULL;
        int r = req ? call_admin_raw(req, -1, (uint64_t) timeout_sec * 1000000ULL, &reply) : fail("out of memory");
        json_decref(req);
        if (r)
                return r;
        if (!json_is_true(json_object_get(reply, "ok"))) {
                r = fail("%s", jstr(reply, "error"));
                json_decref(reply);
                return r;
        }
        json_t *res = json_object_get(reply, "result");
        json_t *h = json_object_get(res, "headers");
        const char *b = json_string_value(json_object_get(res, "body"));
        *ret = (struct resp) {
                .status = (int) json_integer_value(json_object_get(res, "status")),
                .headers = json_is_object(h) ? json_incref(h) : json_object(),
                .body = b ? strdup(b) : NULL,
                .len = json_string_length(json_object_get(res, "body")),
        };
        json_decref(reply);
        return 0;
}

/* Prints the IoT Hub error of a failed answer in one line (reference §5.1) and returns
 * EXIT_FAIL. */
static int report_error(const char *what, const struct resp *r) {
        const char *code = resp_header(r, "iothub-errorcode");
        _cleanup_free_ char *text = NULL;
        json_t *j = r->body ? json_loadb(r->body, r->len, 0, NULL) : NULL;
        const char *msg = json_string_value(json_object_get(j, "Message"));
        if (!msg)
                msg = json_string_value(json_object_get(j, "message"));
        if (msg) {
                /* Legacy form "ErrorCode:Name;text". */
                const char *semi = strchr(msg, ';');
                if (strncmp(msg, "ErrorCode:", 10) == 0 && semi) {
                        if (!code)
                                code = NULL;
                        text = strndup(semi + 1, strlen(semi + 1));
                        if (!code) {
                                static char name[64];
                                snprintf(name, sizeof name, "%.*s", (int) (semi - msg - 10), msg + 10);
                                code = name;
                        }
                } else
                        text = strdup(msg);
        }
        if (text)
                text[strcspn(text, "\r\n")] = 0;
        fprintf(stderr, "fieldhubctl: %s: %s%s%s (HTTP %d)\n", what, code ? code : "error", text ? ": " : "",
                text ? text : "", r->status);
        json_decref(j);
        return EXIT_FAIL;
}

/* rest() + status check + JSON body. *ret_json may be NULL when the body is empty. */
static int rest_raw_json(const char *what, const char *method, const char *target, json_t *headers, const char *b,
                         size_t blen, long timeout_sec, struct resp *ret_resp, json_t **ret_json) {
        struct resp r = { 0 };
        int e = rest(method, target, headers, b, blen, timeout_sec, &r);
        if (e)
                return e;
        if (r.status < 200 || r.status > 299) {
                e = report_error(what, &r);
                resp_done(&r);
                return e;
        }
        json_t *j = NULL;
        if (r.len > 0) {
                json_error_t jerr;
                j = json_loadb(r.body, r.len, JSON_DECODE_ANY, &jerr);
                if (!j) {
                        resp_done(&r);
                        return fail("%s: the hub answered %d with a body that is not JSON: %s", what, r.status, jerr.text);
                }
        }
        if (ret_json)
                *ret_json = j;
        else
                json_decref(j);
        if (ret_resp)
                *ret_resp = r;
        else
                resp_done(&r);
        return 0;
}

static int rest_json(const char *what, const char *method, const char *target, json_t *headers, json_t *body,
                     long timeout_sec, struct resp *ret_resp, json_t **ret_json) {
        _cleanup_free_ char *b = body ? hub_json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
        if (body && !b)
                return fail("out of memory");
        return rest_raw_json(what, method, target, headers, b, b ? strlen(b) : 0, timeout_sec, ret_resp, ret_json);
}

/* "/devices/<id>" with the id percent-encoded. */
static char *path_for(const char *prefix, const char *id, const char *suffix) {
        _cleanup_free_ char *enc = NULL;
        char *p;
        if (hub_url_encode(id, &enc) < 0)
                return NULL;
        if (asprintf(&p, "%s/%s%s", prefix, enc, suffix ? suffix : "") < 0)
                return NULL;
        return p;
}

/* An If-Match header value: the etag quoted (unless it already is), or "*". */
static json_t *if_match(const char *etag) {
        char buf[512];
        if (!etag || streq(etag, "*"))
                snprintf(buf, sizeof buf, "\"*\"");
        else if (etag[0] == '"')
                snprintf(buf, sizeof buf, "%s", etag);
        else
                snprintf(buf, sizeof buf, "\"%s\"", etag);
        return json_pack("{s:s}", "If-Match", buf);
}

static int parse_duration_sec(const char *opt, const char *s, bool allow_zero, long *ret) {
        uint64_t u;
        if (adp_parse_duration(s, &u) < 0 || (!allow_zero && u < 1000000ULL))
                return usage_fail("%s: found \"%s\", expected a duration such as 30s, 5min, 1h", opt, s);
        *ret = (long) (u / 1000000ULL);
        return 0;
}

/* ---- offline: check-config, sas-token --------------------------------------------------- */

static int cmd_check_config(int argc, char **argv) {
        const char *confd = NULL, *file = NULL;
        for (int i = 1; i < argc; i++) {
                if (streq(argv[i], "--confd") && i + 1 < argc)
                        confd = argv[++i];
                else if (streq(argv[i], "--help"))
                        return help_cmd("check-config"), 0;
                else if (!file && argv[i][0] != '-')
                        file = argv[i];
                else
                        return usage_fail("check-config: unexpected argument \"%s\"", argv[i]);
        }
        if (!file)
                file = FIELDHUB_CONFIG_PATH;
        _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
        struct gw_config *c = NULL;
        int r = gw_config_load(file, confd, &c, &e);
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
        if (r < 0) {
                if (adp_conf_errors_count(&e) == 0)
                        fprintf(stderr, "%s: %s\n", file, strerror(-r));
                fprintf(stderr, "%s: configuration invalid\n", file);
                return 78;
        }
        printf("%s: configuration OK (hub %s)\n", file, c->host_name);
        gw_config_free(c);
        return 0;
}

static int cmd_sas_token(int argc, char **argv) {
        static const struct option opts[] = {
                { "hub", required_argument, NULL, 'H' },      { "device", required_argument, NULL, 'd' },
                { "module", required_argument, NULL, 'm' },   { "policy", required_argument, NULL, 'p' },
                { "key", required_argument, NULL, 'k' },      { "key-file", required_argument, NULL, 'K' },
                { "ttl", required_argument, NULL, 't' },      { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *hub = NULL, *dev = NULL, *mod = NULL, *pol = NULL, *key = NULL, *key_file = NULL;
        uint64_t ttl = 3600ULL * 1000000ULL;
        int c;
        optind = 0;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'H': hub = optarg; break;
                case 'd': dev = optarg; break;
                case 'm': mod = optarg; break;
                case 'p': pol = optarg; break;
                case 'k': key = optarg; break;
                case 'K': key_file = optarg; break;
                case 'h': return help_cmd("sas-token"), 0;
                case 't':
                        if (adp_parse_duration(optarg, &ttl) < 0 || ttl < 1000000ULL)
                                return usage_fail("--ttl: found \"%s\", expected a duration such as 30min, 1h, 7d", optarg);
                        break;
                default:
                        return EXIT_USAGE;
                }
        }
        if (!hub || (!dev && !pol) || (!key == !key_file) || (mod && !dev))
                return usage_fail("sas-token: need --hub, --device ID or --policy NAME, and --key or --key-file");

        _cleanup_free_ char *filekey = NULL;
        if (key_file) {
                int r = read_key_file(key_file, &filekey);
                if (r < 0)
                        return fail("%s: %s", key_file, r == -EINVAL ? "expected one base64 key" : strerror(-r));
                key = filekey;
        }
        char res[1024];
        if (dev && mod)
                snprintf(res, sizeof res, "%s/devices/%s/modules/%s", hub, dev, mod);
        else if (dev)
                snprintf(res, sizeof res, "%s/devices/%s", hub, dev);
        else
                snprintf(res, sizeof res, "%s", hub);

        uint64_t se = (uint64_t) time(NULL) + ttl / 1000000ULL;
        char *tok = NULL;
        int r = hub_sas_generate(res, key, se, dev ? NULL : pol, &tok);
        if (filekey)
                hub_explicit_bzero(filekey, strlen(filekey));
        if (r < 0)
                return fail("sas-token: %s", r == -EINVAL ? "the key is not base64 of 16 to 64 bytes" : strerror(-r));
        if (arg_json) {
                json_t *j = json_pack("{s:s, s:I}", "sas", tok, "expiry", (json_int_t) se);
                print_json(j);
                json_decref(j);
        } else
                puts(tok);
        free(tok);
        return 0;
}

/* ---- status, reload ---------------------------------------------------------------------- */

static int cmd_status_https(void) {
        json_t *devs = NULL, *svc = NULL, *health = NULL;
        int r = rest_json("status", "GET", "/statistics/devices", NULL, NULL, 60, NULL, &devs);
        if (!r)
                r = rest_json("status", "GET", "/statistics/service", NULL, NULL, 60, NULL, &svc);
        if (!r)
                r = rest_json("status", "GET", "/health", NULL, NULL, 60, NULL, &health);
        if (!r) {
                if (arg_json) {
                        json_t *j = json_pack("{s:s, s:O?, s:O?, s:O?}", "hostName", cs_host, "devices", devs, "service",
                                              svc, "health", health);
                        print_json(j);
                        json_decref(j);
                } else {
                        printf("hub %s (%s:%u)\n", cs_host, arg_hub_host, arg_hub_port);
                        printf("  health:    %s\n", health && json_is_object(health) && json_object_get(health, "status")
                                                            ? jstr(health, "status")
                                                            : "ok");
                        printf("  devices:   %lld total, %lld enabled, %lld disabled\n",
                               json_integer_value(json_object_get(devs, "totalDeviceCount")),
                               json_integer_value(json_object_get(devs, "enabledDeviceCount")),
                               json_integer_value(json_object_get(devs, "disabledDeviceCount")));
                        printf("  connected: %lld\n", json_integer_value(json_object_get(svc, "connectedDeviceCount")));
                }
        }
        json_decref(devs);
        json_decref(svc);
        json_decref(health);
        return r;
}

static int cmd_status(int argc, char **argv) {
        if (argc > 1 && streq(argv[1], "--help"))
                return help_cmd("status"), 0;
        if (argc > 1)
                return usage_fail("status: unexpected argument \"%s\"", argv[1]);
        if (over_https())
                return cmd_status_https();
        json_t *reply = NULL;
        int r = call("status", NULL, &reply);
        if (r)
                return r;
        json_t *s = json_object_get(reply, "result");
        if (arg_json)
                print_json(s);
        else {
                json_t *st = json_object_get(s, "store"), *dv = json_object_get(s, "devices");
                printf("fieldhubd %s (pid %lld), up %lld s\n", jstr(s, "version"),
                       json_integer_value(json_object_get(s, "pid")), json_integer_value(json_object_get(s, "uptimeSec")));
                printf("  %s\n", jstr(s, "status"));
                printf("  hub:     %s\n", jstr(s, "hostName"));
                printf("  devices: %lld total, %lld enabled, %lld disabled\n",
                       json_integer_value(json_object_get(dv, "total")), json_integer_value(json_object_get(dv, "enabled")),
                       json_integer_value(json_object_get(dv, "disabled")));
                printf("  store:   %s, %s, %lld commits / %lld writes, %lld pending, last commit %lld us\n",
                       jstr(st, "path"), json_is_true(json_object_get(st, "healthy")) ? "healthy" : "STALLED",
                       json_integer_value(json_object_get(st, "commits")), json_integer_value(json_object_get(st, "writes")),
                       json_integer_value(json_object_get(st, "pending")),
                       json_integer_value(json_object_get(st, "lastCommitUsec")));
                printf("  log:     %s\n", jstr(s, "logLevel"));
        }
        json_decref(reply);
        return 0;
}

static int cmd_endpoints(int argc, char **argv) {
        if (argc > 1 && streq(argv[1], "--help"))
                return help_cmd("endpoints"), 0;
        if (argc > 1)
                return usage_fail("endpoints: unexpected argument \"%s\"", argv[1]);
        if (over_https())
                return fail("endpoints: only over the admin socket (on the box itself)");
        json_t *reply = NULL;
        int r = call("endpoints", NULL, &reply);
        if (r)
                return r;
        json_t *eps = json_object_get(reply, "result");
        if (arg_json)
                print_json(eps);
        else {
                size_t i;
                json_t *ep;
                printf("%-16s %-5s %-10s %10s %12s %10s %10s %8s %8s %8s\n", "ENDPOINT", "TYPE", "STATE", "BACKLOG",
                       "BYTES", "OLDEST(s)", "RATE(/s)", "DROPS", "EXPIRED", "REJECTED");
                json_array_foreach(eps, i, ep) {
                        printf("%-16s %-5s %-10s %10lld %12lld %10.1f %10.1f %8lld %8lld %8lld\n", jstr(ep, "name"),
                               jstr(ep, "type"), jstr(ep, "state"),
                               json_integer_value(json_object_get(json_object_get(ep, "backlog"), "count")),
                               json_integer_value(json_object_get(json_object_get(ep, "backlog"), "bytes")),
                               json_number_value(json_object_get(ep, "oldestAgeSeconds")),
                               json_number_value(json_object_get(ep, "drainRatePerSecond")),
                               json_integer_value(json_object_get(ep, "drops")),
                               json_integer_value(json_object_get(ep, "expiries")),
                               json_integer_value(json_object_get(ep, "rejected")));
                        if (json_is_string(json_object_get(ep, "lastError")))
                                printf("    last error: %s\n", jstr(ep, "lastError"));
                }
                if (json_array_size(eps) == 0)
                        printf("(no endpoints configured)\n");
        }
        json_decref(reply);
        return 0;
}

static int cmd_reload(int argc, char **argv) {
        bool wait = false;
        for (int i = 1; i < argc; i++) {
                if (streq(argv[i], "--wait"))
                        wait = true;
                else if (streq(argv[i], "--help"))
                        return help_cmd("reload"), 0;
                else
                        return usage_fail("reload: unexpected argument \"%s\"", argv[i]);
        }
        if (over_https())
                return fail("reload: only over the admin socket (on the box itself)");
        json_t *reply = NULL;
        /* The daemon answers once the new configuration is applied or rejected; without
         * --wait a rejection is still reported, but does not fail the command. An
         * unreachable daemon always fails. */
        int fd = -1;
        int r = gw_admin_connect(arg_socket, &fd);
        if (r < 0)
                return fail("cannot reach fieldhubd at %s: %s (is it running?)", arg_socket, strerror(-r));
        close(fd);
        r = call("reload", NULL, &reply);
        if (r) {
                if (!wait)
                        fprintf(stderr, "fieldhubctl: the running configuration is kept\n");
                return wait ? r : 0;
        }
        json_decref(reply);
        if (!arg_json)
                printf("configuration reloaded\n");
        return 0;
}

/* ---- device ------------------------------------------------------------------------------ */

static void print_device_row(const json_t *d) {
        json_t *auth = json_object_get(d, "authentication");
        printf("%-24s %-9s %-12s %-20s %s\n", jstr(d, "deviceId"), jstr(d, "status"), jstr(d, "connectionState"),
               jstr(auth, "type"), jstr(d, "etag"));
}

static void print_device_header(void) {
        printf("%-24s %-9s %-12s %-20s %s\n", "DEVICE", "STATUS", "CONNECTION", "AUTH", "ETAG");
}

static void print_device(const json_t *d) {
        if (arg_json) {
                print_json(d);
                return;
        }
        json_t *auth = json_object_get(d, "authentication");
        printf("deviceId:          %s\n", jstr(d, "deviceId"));
        printf("status:            %s%s%s\n", jstr(d, "status"), json_is_string(json_object_get(d, "statusReason")) ? " - " : "",
               jstr(d, "statusReason"));
        printf("connectionState:   %s\n", jstr(d, "connectionState"));
        printf("lastActivityTime:  %s\n", jstr(d, "lastActivityTime"));
        printf("authentication:    %s\n", jstr(auth, "type"));
        printf("c2d messages:      %lld\n", json_integer_value(json_object_get(d, "cloudToDeviceMessageCount")));
        printf("etag:              %s\n", jstr(d, "etag"));
        printf("generationId:      %s\n", jstr(d, "generationId"));
}

/* The writable fields of a device, for PUT (read-only ones are left out). */
static json_t *device_writable(const json_t *d) {
        json_t *w = json_pack("{s:O, s:O}", "deviceId", json_object_get(d, "deviceId"), "status",
                              json_object_get(d, "status"));
        if (!w)
                return NULL;
        const char *keep[] = { "statusReason", "authentication", "capabilities" };
        for (size_t i = 0; i < ELEMENTSOF(keep); i++) {
                json_t *v = json_object_get(d, keep[i]);
                if (v && !json_is_null(v))
                        json_object_set(w, keep[i], v);
        }
        return w;
}

static int get_device(const char *what, const char *id, json_t **ret) {
        _cleanup_free_ char *p = path_for("/devices", id, NULL);
        if (!p)
                return fail("out of memory");
        return rest_json(what, "GET", p, NULL, NULL, 60, NULL, ret);
}

static int host_name(char **ret) {
        if (over_https()) {
                *ret = strdup(cs_host);
                return *ret ? 0 : fail("out of memory");
        }
        json_t *st = NULL;
        int r = call("status", NULL, &st);
        if (r)
                return r;
        *ret = strdup(jstr(json_object_get(st, "result"), "hostName"));
        json_decref(st);
        return *ret ? 0 : fail("out of memory");
}

static int device_create(const char *id, int argc, char **argv) {
        static const struct option opts[] = {
                { "auth", required_argument, NULL, 'a' },
                { "primary-thumbprint", required_argument, NULL, '1' },
                { "secondary-thumbprint", required_argument, NULL, '2' },
                { "disabled", no_argument, NULL, 'D' },
                {},
        };
        const char *auth = "sas", *t1 = NULL, *t2 = NULL;
        bool disabled = false;
        int c;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'a': auth = optarg; break;
                case '1': t1 = optarg; break;
                case '2': t2 = optarg; break;
                case 'D': disabled = true; break;
                default: return EXIT_USAGE;
                }
        }
        if (!streq(auth, "sas") && !streq(auth, "selfSigned") && !streq(auth, "certificateAuthority"))
                return usage_fail("--auth: found \"%s\", expected sas, selfSigned or certificateAuthority", auth);
        if ((t1 || t2) && !streq(auth, "selfSigned"))
                return usage_fail("device create: thumbprints need --auth selfSigned");
        if (streq(auth, "selfSigned") && !t1)
                return usage_fail("device create: --auth selfSigned needs --primary-thumbprint");
        json_t *dev = json_pack("{s:s, s:s, s:{s:s}}", "deviceId", id, "status", disabled ? "disabled" : "enabled",
                                "authentication", "type", auth);
        if (streq(auth, "sas"))
                json_object_set_new(json_object_get(dev, "authentication"), "symmetricKey",
                                    json_pack("{s:s, s:s}", "primaryKey", "", "secondaryKey", ""));
        if (t1 || t2)
                json_object_set_new(json_object_get(dev, "authentication"), "x509Thumbprint",
                                    json_pack("{s:s?, s:s?}", "primaryThumbprint", t1, "secondaryThumbprint", t2));
        _cleanup_free_ char *p = path_for("/devices", id, NULL);
        json_t *out = NULL;
        int r = p ? rest_json("device create", "PUT", p, NULL, dev, 60, NULL, &out) : fail("out of memory");
        json_decref(dev);
        if (r)
                return r;
        if (arg_json)
                print_json(out);
        else {
                print_device_header();
                print_device_row(out);
        }
        json_decref(out);
        return 0;
}

static int device_list(int argc, char **argv) {
        static const struct option opts[] = { { "top", required_argument, NULL, 't' }, {} };
        long top = 1000;
        int c;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                if (c != 't')
                        return EXIT_USAGE;
                char *end;
                top = strtol(optarg, &end, 10);
                if (*end || top < 1 || top > 1000)
                        return usage_fail("--top: found \"%s\", expected 1..1000", optarg);
        }
        if (optind < argc)
                return usage_fail("device list: unexpected argument \"%s\"", argv[optind]);
        char target[64];
        snprintf(target, sizeof target, "/devices?top=%ld", top);
        json_t *all = NULL;
        int r = rest_json("device list", "GET", target, NULL, NULL, 60, NULL, &all);
        if (r)
                return r;
        if (!json_is_array(all)) {
                json_decref(all);
                return fail("device list: the hub did not answer with an array");
        }
        if (arg_json)
                print_json(all);
        else {
                size_t i;
                json_t *v;
                print_device_header();
                json_array_foreach(all, i, v) print_device_row(v);
        }
        json_decref(all);
        return 0;
}

static int device_put(const char *what, const char *id, json_t *body, const char *etag, json_t **ret) {
        _cleanup_free_ char *p = path_for("/devices", id, NULL);
        json_t *h = if_match(etag);
        int r = p && h ? rest_json(what, "PUT", p, h, body, 60, NULL, ret) : fail("out of memory");
        json_decref(h);
        return r;
}

static int device_update(const char *id, int argc, char **argv) {
        static const struct option opts[] = {
                { "status", required_argument, NULL, 's' },
                { "status-reason", required_argument, NULL, 'r' },
                { "etag", required_argument, NULL, 'e' },
                {},
        };
        const char *status = NULL, *reason = NULL, *etag = NULL;
        int c;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 's': status = optarg; break;
                case 'r': reason = optarg; break;
                case 'e': etag = optarg; break;
                default: return EXIT_USAGE;
                }
        }
        if (!status && !reason)
                return usage_fail("device update: need --status enabled|disabled and/or --status-reason TEXT");
        if (status && !streq(status, "enabled") && !streq(status, "disabled"))
                return usage_fail("--status: found \"%s\", expected enabled or disabled", status);
        json_t *d = NULL, *out = NULL;
        int r = get_device("device update", id, &d);
        if (r)
                return r;
        json_t *w = device_writable(d);
        json_decref(d);
        if (!w)
                return fail("out of memory");
        if (status)
                json_object_set_new(w, "status", json_string(status));
        if (reason)
                json_object_set_new(w, "statusReason", json_string(reason));
        r = device_put("device update", id, w, etag, &out);
        json_decref(w);
        if (r)
                return r;
        if (arg_json)
                print_json(out);
        else {
                print_device_header();
                print_device_row(out);
        }
        json_decref(out);
        return 0;
}

static int device_regenerate_key(const char *id, int argc, char **argv) {
        static const struct option opts[] = { { "key", required_argument, NULL, 'k' }, {} };
        const char *which = NULL;
        int c;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                if (c != 'k')
                        return EXIT_USAGE;
                which = optarg;
        }
        if (!which || (!streq(which, "primary") && !streq(which, "secondary") && !streq(which, "swap")))
                return usage_fail("device regenerate-key: need --key primary, secondary or swap");
        json_t *d = NULL, *out = NULL;
        int r = get_device("device regenerate-key", id, &d);
        if (r)
                return r;
        json_t *sk = json_object_get(json_object_get(d, "authentication"), "symmetricKey");
        if (!streq(jstr(json_object_get(d, "authentication"), "type"), "sas") || !json_is_object(sk)) {
                json_decref(d);
                return fail("device regenerate-key: %s does not use SAS keys", id);
        }
        char etag[256];
        snprintf(etag, sizeof etag, "%s", jstr(d, "etag"));
        json_t *w = device_writable(d);
        json_decref(d);
        if (!w)
                return fail("out of memory");
        sk = json_object_get(json_object_get(w, "authentication"), "symmetricKey");
        if (streq(which, "swap")) {
                json_t *p = json_incref(json_object_get(sk, "primaryKey")), *s = json_incref(json_object_get(sk, "secondaryKey"));
                json_object_set_new(sk, "primaryKey", s);
                json_object_set_new(sk, "secondaryKey", p);
        } else {
                char key[45];
                if (hub_random_key(key) < 0) {
                        json_decref(w);
                        return fail("cannot get random bytes for a key");
                }
                json_object_set_new(sk, streq(which, "primary") ? "primaryKey" : "secondaryKey", json_string(key));
                hub_explicit_bzero(key, sizeof key);
        }
        /* The etag we read: a concurrent change makes this fail instead of being lost. */
        r = device_put("device regenerate-key", id, w, etag[0] ? etag : NULL, &out);
        json_decref(w);
        if (r)
                return r;
        if (arg_json)
                print_json(out);
        else
                printf("%s key of %s regenerated%s\n", streq(which, "swap") ? "primary and secondary" : which, id,
                       streq(which, "swap") ? " (swapped)" : "");
        json_decref(out);
        return 0;
}

static int device_show_cs(const char *id, int argc, char **argv) {
        bool secondary = false;
        for (int i = optind; i < argc; i++) {
                if (streq(argv[i], "--secondary"))
                        secondary = true;
                else
                        return usage_fail("device show-connection-string: unexpected argument \"%s\"", argv[i]);
        }
        json_t *d = NULL;
        int r = get_device("device show-connection-string", id, &d);
        if (r)
                return r;
        _cleanup_free_ char *host = NULL;
        r = host_name(&host);
        if (r) {
                json_decref(d);
                return r;
        }
        json_t *auth = json_object_get(d, "authentication");
        const char *type = jstr(auth, "type");
        char cs[1024];
        if (streq(type, "sas"))
                snprintf(cs, sizeof cs, "HostName=%s;DeviceId=%s;SharedAccessKey=%s", host, id,
                         jstr(json_object_get(auth, "symmetricKey"), secondary ? "secondaryKey" : "primaryKey"));
        else
                snprintf(cs, sizeof cs, "HostName=%s;DeviceId=%s;x509=true", host, id);
        if (arg_json) {
                json_t *j = json_pack("{s:s}", "connectionString", cs);
                print_json(j);
                json_decref(j);
        } else
                puts(cs);
        hub_explicit_bzero(cs, sizeof cs);
        json_decref(d);
        return 0;
}

/* CoAP DTLS-PSK of a device (front/coap-config.h), computed here from the key the daemon gives. */
static int device_show_coap_psk(const char *id, int argc, char **argv) {
        bool secondary = false;
        for (int i = optind; i < argc; i++) {
                if (streq(argv[i], "--secondary"))
                        secondary = true;
                else
                        return usage_fail("device show-coap-psk: unexpected argument \"%s\"", argv[i]);
        }
        json_t *d = NULL;
        int r = get_device("device show-coap-psk", id, &d);
        if (r)
                return r;
        json_t *auth = json_object_get(d, "authentication");
        if (!streq(jstr(auth, "type"), "sas")) {
                json_decref(d);
                fprintf(stderr, "device show-coap-psk: device %s does not use symmetric keys\n", id);
                return 1;
        }
        uint8_t psk[GW_COAP_PSK_BYTES];
        r = gw_coap_psk_derive(jstr(json_object_get(auth, "symmetricKey"), secondary ? "secondaryKey" : "primaryKey"),
                               psk);
        json_decref(d);
        if (r < 0) {
                fprintf(stderr, "device show-coap-psk: the key of %s is not base64 of 16..64 bytes\n", id);
                return 1;
        }
        char hex[2 * GW_COAP_PSK_BYTES + 1], identity[128 + 8];
        for (size_t i = 0; i < sizeof psk; i++)
                snprintf(hex + 2 * i, 3, "%02x", psk[i]);
        snprintf(identity, sizeof identity, "%s%s", id, secondary ? "#2" : "");
        if (arg_json) {
                json_t *j = json_pack("{s:s, s:s}", "identity", identity, "pskHex", hex);
                print_json(j);
                json_decref(j);
        } else
                printf("identity: %s\npsk: %s\n", identity, hex);
        hub_explicit_bzero(psk, sizeof psk);
        hub_explicit_bzero(hex, sizeof hex);
        return 0;
}

static int cmd_device(int argc, char **argv) {
        static const char *subs = "create, show, list, update, delete, show-connection-string, show-coap-psk, regenerate-key";
        if (argc < 2)
                return usage_fail("device: need a subcommand (%s)", subs);
        const char *sub = argv[1];
        for (int i = 1; i < argc; i++)
                if (streq(argv[i], "--help"))
                        return help_cmd("device"), 0;
        if (streq(sub, "list"))
                return optind = 0, device_list(argc - 1, argv + 1);
        if (!streq(sub, "create") && !streq(sub, "show") && !streq(sub, "update") && !streq(sub, "delete") &&
            !streq(sub, "show-connection-string") && !streq(sub, "show-coap-psk") && !streq(sub, "regenerate-key"))
                return usage_fail("device: unknown subcommand \"%s\" (expected %s)", sub, subs);
        if (argc < 3 || argv[2][0] == '-')
                return usage_fail("device %s: need a device id", sub);
        const char *id = argv[2];
        /* getopt over "sub ID --opts...": skip the id. */
        argc -= 2;
        argv += 2;
        optind = 0;
        if (streq(sub, "create"))
                return device_create(id, argc, argv);
        if (streq(sub, "update"))
                return device_update(id, argc, argv);
        if (streq(sub, "regenerate-key"))
                return device_regenerate_key(id, argc, argv);
        if (streq(sub, "show-connection-string"))
                return optind = 1, device_show_cs(id, argc, argv);
        if (streq(sub, "show-coap-psk"))
                return optind = 1, device_show_coap_psk(id, argc, argv);
        if (streq(sub, "show")) {
                if (argc > 1)
                        return usage_fail("device show: unexpected argument \"%s\"", argv[1]);
                json_t *d = NULL;
                int r = get_device("device show", id, &d);
                if (r)
                        return r;
                print_device(d);
                json_decref(d);
                return 0;
        }
        /* delete */
        const char *etag = NULL;
        for (int i = 1; i < argc; i++) {
                if (streq(argv[i], "--etag") && i + 1 < argc)
                        etag = argv[++i];
                else
                        return usage_fail("device delete: unexpected argument \"%s\"", argv[i]);
        }
        _cleanup_free_ char *p = path_for("/devices", id, NULL);
        json_t *h = if_match(etag);
        int r = p && h ? rest_json("device delete", "DELETE", p, h, NULL, 60, NULL, NULL) : fail("out of memory");
        json_decref(h);
        if (!r && !arg_json)
                printf("deleted %s\n", id);
        else if (!r)
                printf("{\"deleted\":true}\n");
        return r;
}

/* ---- twin -------------------------------------------------------------------------------- */

static int parse_json_object(const char *opt, const char *s, json_t **ret) {
        json_error_t e;
        json_t *j = json_loads(s, 0, &e);
        if (!j)
                return usage_fail("%s: not JSON: %s (column %d)", opt, e.text, e.column);
        if (!json_is_object(j)) {
                json_decref(j);
                return usage_fail("%s: expected a JSON object", opt);
        }
        *ret = j;
        return 0;
}

static int cmd_twin(int argc, char **argv) {
        for (int i = 1; i < argc; i++)
                if (streq(argv[i], "--help"))
                        return help_cmd("twin"), 0;
        if (argc < 2 || (!streq(argv[1], "show") && !streq(argv[1], "update")))
                return usage_fail("twin: need a subcommand (show, update)");
        if (argc < 3 || argv[2][0] == '-')
                return usage_fail("twin %s: need a device id", argv[1]);
        const char *id = argv[2];
        _cleanup_free_ char *p = path_for("/twins", id, NULL);
        json_t *out = NULL;
        int r;
        if (!p)
                return fail("out of memory");
        if (streq(argv[1], "show")) {
                if (argc > 3)
                        return usage_fail("twin show: unexpected argument \"%s\"", argv[3]);
                r = rest_json("twin show", "GET", p, NULL, NULL, 60, NULL, &out);
        } else {
                static const struct option opts[] = {
                        { "desired", required_argument, NULL, 'd' },
                        { "tags", required_argument, NULL, 't' },
                        { "etag", required_argument, NULL, 'e' },
                        {},
                };
                json_t *desired = NULL, *tags = NULL;
                const char *etag = NULL;
                int c;
                optind = 0;
                argc -= 2;
                argv += 2;
                while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                        switch (c) {
                        case 'd':
                                json_decref(desired);
                                desired = NULL;
                                r = parse_json_object("--desired", optarg, &desired);
                                break;
                        case 't':
                                json_decref(tags);
                                tags = NULL;
                                r = parse_json_object("--tags", optarg, &tags);
                                break;
                        case 'e': etag = optarg; r = 0; break;
                        default: r = EXIT_USAGE;
                        }
                        if (r) {
                                json_decref(desired);
                                json_decref(tags);
                                return r;
                        }
                }
                if (optind < argc || (!desired && !tags)) {
                        json_decref(desired);
                        json_decref(tags);
                        return usage_fail("twin update: need --desired JSON and/or --tags JSON");
                }
                json_t *patch = json_object();
                if (tags)
                        json_object_set_new(patch, "tags", tags);
                if (desired)
                        json_object_set_new(patch, "properties", json_pack("{s:o}", "desired", desired));
                json_t *h = if_match(etag);
                r = rest_json("twin update", "PATCH", p, h, patch, 60, NULL, &out);
                json_decref(h);
                json_decref(patch);
        }
        if (r)
                return r;
        print_json(out);
        json_decref(out);
        return 0;
}

/* ---- query ------------------------------------------------------------------------------- */

static int cmd_query(int argc, char **argv) {
        static const struct option opts[] = {
                { "page-size", required_argument, NULL, 'p' },
                { "max-items", required_argument, NULL, 'm' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        long page = 100, max = -1;
        int c;
        optind = 0;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                char *end;
                switch (c) {
                case 'p':
                        page = strtol(optarg, &end, 10);
                        if (*end || page < 1 || page > 1000)
                                return usage_fail("--page-size: found \"%s\", expected 1..1000", optarg);
                        break;
                case 'm':
                        max = strtol(optarg, &end, 10);
                        if (*end || max < 1)
                                return usage_fail("--max-items: found \"%s\", expected a positive number", optarg);
                        break;
                case 'h': return help_cmd("query"), 0;
                default: return EXIT_USAGE;
                }
        }
        if (optind + 1 != argc)
                return usage_fail("query: need exactly one query, e.g. \"SELECT * FROM devices\"");
        const char *q = argv[optind];
        json_t *all = json_array(), *body = json_pack("{s:s}", "query", q);
        char *cont = NULL;
        int r = 0;
        for (;;) {
                long want = max < 0 ? page : MIN(page, max - (long) json_array_size(all));
                char nbuf[32];
                snprintf(nbuf, sizeof nbuf, "%ld", want);
                json_t *h = json_pack("{s:s}", "x-ms-max-item-count", nbuf);
                if (cont)
                        json_object_set_new(h, "x-ms-continuation", json_string(cont));
                struct resp rs = { 0 };
                json_t *rows = NULL;
                r = rest_json("query", "POST", "/devices/query", h, body, 120, &rs, &rows);
                json_decref(h);
                free(cont);
                cont = NULL;
                if (r)
                        break;
                if (!json_is_array(rows)) {
                        json_decref(rows);
                        resp_done(&rs);
                        r = fail("query: the hub did not answer with an array");
                        break;
                }
                json_array_extend(all, rows);
                json_decref(rows);
                const char *next = resp_header(&rs, "x-ms-continuation");
                if (next && *next)
                        cont = strdup(next);
                resp_done(&rs);
                if (!cont || (max >= 0 && (long) json_array_size(all) >= max))
                        break;
        }
        free(cont);
        json_decref(body);
        if (!r) {
                while (max >= 0 && (long) json_array_size(all) > max)
                        json_array_remove(all, json_array_size(all) - 1);
                print_json(all);
        }
        json_decref(all);
        return r;
}

/* ---- c2d --------------------------------------------------------------------------------- */

static int read_file_all(const char *path, size_t max, char **ret, size_t *ret_len) {
        FILE *f = fopen(path, "re");
        if (!f)
                return -errno;
        char *buf = malloc(max + 1);
        if (!buf) {
                fclose(f);
                return -ENOMEM;
        }
        size_t n = fread(buf, 1, max + 1, f);
        int err = ferror(f);
        fclose(f);
        if (err) {
                free(buf);
                return -EIO;
        }
        if (n > max) {
                free(buf);
                return -E2BIG;
        }
        buf[n] = 0;
        *ret = buf;
        *ret_len = n;
        return 0;
}

static int c2d_send(int argc, char **argv) {
        static const struct option opts[] = {
                { "body", required_argument, NULL, 'b' },        { "body-file", required_argument, NULL, 'f' },
                { "property", required_argument, NULL, 'p' },    { "message-id", required_argument, NULL, 'm' },
                { "correlation-id", required_argument, NULL, 'c' }, { "ack", required_argument, NULL, 'a' },
                { "ttl", required_argument, NULL, 't' },         {},
        };
        const char *body = NULL, *body_file = NULL, *mid = NULL, *cid = NULL, *ack = NULL;
        long ttl = -1;
        json_t *props = json_object();
        int c, r;
        optind = 0;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'b': body = optarg; break;
                case 'f': body_file = optarg; break;
                case 'm': mid = optarg; break;
                case 'c': cid = optarg; break;
                case 'a':
                        if (!streq(optarg, "full") && !streq(optarg, "positive") && !streq(optarg, "negative") &&
                            !streq(optarg, "none")) {
                                json_decref(props);
                                return usage_fail("--ack: found \"%s\", expected full, positive, negative or none", optarg);
                        }
                        ack = optarg;
                        break;
                case 't':
                        r = parse_duration_sec("--ttl", optarg, false, &ttl);
                        if (r) {
                                json_decref(props);
                                return r;
                        }
                        break;
                case 'p': {
                        const char *eq = strchr(optarg, '=');
                        if (!eq || eq == optarg) {
                                json_decref(props);
                                return usage_fail("--property: found \"%s\", expected NAME=VALUE", optarg);
                        }
                        _cleanup_free_ char *name = strndup(optarg, (size_t) (eq - optarg));
                        json_object_set_new(props, name, json_string(eq + 1));
                        break;
                }
                default: json_decref(props); return EXIT_USAGE;
                }
        }
        if (optind + 1 != argc || (body && body_file)) {
                json_decref(props);
                return usage_fail("c2d send: need one device id, and at most one of --body, --body-file");
        }
        const char *id = argv[optind];
        _cleanup_free_ char *fbody = NULL;
        size_t flen = 0;
        if (body_file) {
                r = read_file_all(body_file, 64 * 1024, &fbody, &flen);
                if (r < 0) {
                        json_decref(props);
                        return fail("%s: %s", body_file, r == -E2BIG ? "over the 64 KiB C2D limit" : strerror(-r));
                }
                body = fbody;
        }
        /* fieldhub's C2D route (api-c2d.c): the payload as the body, system properties in
         * iothub-* headers, application properties as iothub-app-<name>. */
        const char *k;
        json_t *v;
        json_t *h = json_object();
        json_object_foreach(props, k, v) {
                char name[512];
                snprintf(name, sizeof name, "iothub-app-%s", k);
                json_object_set(h, name, v);
        }
        json_decref(props);
        char gen[37];
        if (!mid) {
                /* Feedback correlates on the message id: always send one. */
                char hex[33];
                if (hub_random_hex(hex, 16) < 0) {
                        json_decref(h);
                        return fail("cannot get random bytes for a message id");
                }
                snprintf(gen, sizeof gen, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12, hex + 16, hex + 20);
                mid = gen;
        }
        json_object_set_new(h, "iothub-messageid", json_string(mid));
        if (cid)
                json_object_set_new(h, "iothub-correlationid", json_string(cid));
        if (ack)
                json_object_set_new(h, "iothub-ack", json_string(ack));
        if (!json_object_get(h, "Content-Type"))
                json_object_set_new(h, "Content-Type", json_string("text/plain; charset=utf-8"));
        _cleanup_free_ char *enc = NULL, *p = NULL;
        if (hub_url_encode(id, &enc) < 0 ||
            (ttl >= 0 ? asprintf(&p, "/messages/devicebound/%s?ttl=%ld", enc, ttl)
                      : asprintf(&p, "/messages/devicebound/%s", enc)) < 0) {
                p = NULL;
                json_decref(h);
                return fail("out of memory");
        }
        json_t *out = NULL;
        const char *b = body ? body : "";
        r = rest_raw_json("c2d send", "POST", p, h, b, body_file ? flen : strlen(b), 60, NULL, &out);
        json_decref(h);
        if (r)
                return r;
        if (arg_json)
                print_json(out ? out : json_object());
        else
                printf("sent message %s to %s\n", out && json_object_get(out, "messageId") ? jstr(out, "messageId") : (mid ? mid : "?"), id);
        json_decref(out);
        return 0;
}

static int c2d_feedback(int argc, char **argv) {
        static const struct option opts[] = {
                { "wait", no_argument, NULL, 'w' },
                { "timeout", required_argument, NULL, 't' },
                { "no-complete", no_argument, NULL, 'n' },
                {},
        };
        bool wait = false, complete = true;
        long timeout = 60;
        int c, r;
        optind = 0;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'w': wait = true; break;
                case 'n': complete = false; break;
                case 't':
                        r = parse_duration_sec("--timeout", optarg, false, &timeout);
                        if (r)
                                return r;
                        break;
                default: return EXIT_USAGE;
                }
        }
        if (optind < argc)
                return usage_fail("c2d feedback: unexpected argument \"%s\"", argv[optind]);
        time_t deadline = time(NULL) + timeout;
        for (;;) {
                struct resp rs = { 0 };
                json_t *recs = NULL;
                r = rest_json("c2d feedback", "GET", "/messages/serviceBound/feedback", NULL, NULL, 60, &rs, &recs);
                if (r)
                        return r;
                if (rs.status == 204 || !recs) {
                        resp_done(&rs);
                        json_decref(recs);
                        if (wait && time(NULL) < deadline) {
                                usleep(250 * 1000);
                                continue;
                        }
                        if (wait)
                                return fail("c2d feedback: no feedback within %ld s", timeout);
                        if (arg_json)
                                puts("[]");
                        else
                                printf("no feedback\n");
                        return 0;
                }
                /* The lock token: the ETag, quoted on the wire. */
                char lock[256] = "";
                const char *et = resp_header(&rs, "etag");
                if (et) {
                        snprintf(lock, sizeof lock, "%s", et[0] == '"' ? et + 1 : et);
                        size_t l = strlen(lock);
                        if (l && lock[l - 1] == '"')
                                lock[l - 1] = 0;
                }
                resp_done(&rs);
                if (arg_json)
                        print_json(recs);
                else {
                        size_t i;
                        json_t *v;
                        printf("%-36s %-24s %-22s %s\n", "MESSAGE-ID", "DEVICE", "STATUS", "ENQUEUED");
                        json_array_foreach(recs, i, v) printf("%-36s %-24s %-22s %s\n", jstr(v, "originalMessageId"),
                                                              jstr(v, "deviceId"), jstr(v, "statusCode"),
                                                              jstr(v, "enqueuedTimeUtc"));
                }
                json_decref(recs);
                if (complete && lock[0]) {
                        _cleanup_free_ char *p = path_for("/messages/serviceBound/feedback", lock, NULL);
                        r = p ? rest_json("c2d feedback complete", "DELETE", p, NULL, NULL, 60, NULL, NULL)
                              : fail("out of memory");
                        if (r)
                                return r;
                }
                return 0;
        }
}

static int cmd_c2d(int argc, char **argv) {
        for (int i = 1; i < argc; i++)
                if (streq(argv[i], "--help"))
                        return help_cmd("c2d"), 0;
        if (argc < 2)
                return usage_fail("c2d: need a subcommand (send, purge, feedback)");
        if (streq(argv[1], "send"))
                return c2d_send(argc - 1, argv + 1);
        if (streq(argv[1], "feedback"))
                return c2d_feedback(argc - 1, argv + 1);
        if (!streq(argv[1], "purge"))
                return usage_fail("c2d: unknown subcommand \"%s\" (expected send, purge, feedback)", argv[1]);
        if (argc != 3)
                return usage_fail("c2d purge: need exactly one device id");
        _cleanup_free_ char *p = path_for("/devices", argv[2], "/commands");
        json_t *out = NULL;
        int r = p ? rest_json("c2d purge", "DELETE", p, NULL, NULL, 60, NULL, &out) : fail("out of memory");
        if (r)
                return r;
        if (arg_json)
                print_json(out);
        else
                printf("purged %lld message(s) from %s\n", json_integer_value(json_object_get(out, "totalMessagesPurged")),
                       argv[2]);
        json_decref(out);
        return 0;
}

/* ---- method ------------------------------------------------------------------------------ */

static int cmd_method(int argc, char **argv) {
        static const struct option opts[] = {
                { "payload", required_argument, NULL, 'p' },
                { "timeout", required_argument, NULL, 't' },
                { "connect-timeout", required_argument, NULL, 'c' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        json_t *payload = NULL;
        long timeout = 30, ctimeout = 0;
        int c, r = 0;
        if (argc < 2 || !streq(argv[1], "invoke")) {
                if (argc >= 2 && streq(argv[1], "--help"))
                        return help_cmd("method"), 0;
                return usage_fail("method: need a subcommand (invoke)");
        }
        optind = 0;
        argc--;
        argv++;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                json_error_t e;
                switch (c) {
                case 'p':
                        json_decref(payload);
                        payload = json_loads(optarg, JSON_DECODE_ANY, &e);
                        if (!payload)
                                return usage_fail("--payload: not JSON: %s", e.text);
                        break;
                case 't': r = parse_duration_sec("--timeout", optarg, false, &timeout); break;
                case 'c': r = parse_duration_sec("--connect-timeout", optarg, true, &ctimeout); break;
                case 'h': json_decref(payload); return help_cmd("method"), 0;
                default: r = EXIT_USAGE;
                }
                if (r) {
                        json_decref(payload);
                        return r;
                }
        }
        if (optind + 2 != argc) {
                json_decref(payload);
                return usage_fail("method invoke: need a device id and a method name");
        }
        const char *id = argv[optind], *name = argv[optind + 1];
        json_t *body = json_pack("{s:s, s:o, s:I, s:I}", "methodName", name, "payload", payload ? payload : json_null(),
                                 "responseTimeoutInSeconds", (json_int_t) timeout, "connectTimeoutInSeconds",
                                 (json_int_t) ctimeout);
        _cleanup_free_ char *p = path_for("/twins", id, "/methods");
        json_t *out = NULL;
        r = p ? rest_json("method invoke", "POST", p, NULL, body, timeout + ctimeout + 30, NULL, &out) : fail("out of memory");
        json_decref(body);
        if (r)
                return r;
        if (arg_json)
                print_json(out);
        else {
                printf("status: %lld\n", json_integer_value(json_object_get(out, "status")));
                char *s = hub_json_dumps(json_object_get(out, "payload"), JSON_INDENT(2) | JSON_ENCODE_ANY);
                printf("payload: %s\n", s ? s : "null");
                free(s);
        }
        json_decref(out);
        return 0;
}

/* ---- backup / restore ----------------------------------------------------------------------- */

static int fsync_dir_of(const char *path) {
        _cleanup_free_ char *d = strdup(path);
        if (!d)
                return -ENOMEM;
        char *slash = strrchr(d, '/');
        if (!slash)
                strcpy(d, ".");
        else if (slash == d)
                slash[1] = 0;
        else
                *slash = 0;
        _cleanup_close_ int fd = open(d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0)
                return -errno;
        return 0;
}

static int cmd_backup(int argc, char **argv) {
        bool force = false;
        const char *file = NULL;
        for (int i = 1; i < argc; i++) {
                if (streq(argv[i], "--force"))
                        force = true;
                else if (streq(argv[i], "--help"))
                        return help_cmd("backup"), 0;
                else if (!file && argv[i][0] != '-')
                        file = argv[i];
                else
                        return usage_fail("backup: unexpected argument \"%s\"", argv[i]);
        }
        if (!file)
                return usage_fail("backup: need a file name");
        if (over_https())
                return fail("backup: only over the admin socket (on the box itself)");
        if (!force && access(file, F_OK) == 0)
                return fail("backup: %s exists; use --force to replace it", file);

        /* The copy lands in a temporary file beside FILE, created 0600 by us and written by the
         * daemon through the descriptor we pass; only a complete copy is renamed to FILE. */
        _cleanup_free_ char *tmp = NULL;
        if (asprintf(&tmp, "%s.partial-XXXXXX", file) < 0)
                return fail("out of memory");
        mode_t old = umask(0077);
        int fd = mkostemp(tmp, O_CLOEXEC);
        umask(old);
        if (fd < 0)
                return fail("backup: cannot create a file beside %s: %s", file, strerror(errno));
        if (fchmod(fd, 0600) < 0) {
                int e = errno;
                close(fd);
                unlink(tmp);
                return fail("backup: %s: %s", tmp, strerror(e));
        }
        json_t *req = json_pack("{s:s, s:{}}", "cmd", "backup", "args");
        json_t *reply = NULL;
        int r = call_admin_raw(req, fd, 3600ULL * 1000000ULL, &reply);
        json_decref(req);
        if (!r && !json_is_true(json_object_get(reply, "ok")))
                r = fail("%s", jstr(reply, "error"));
        if (!r && fsync(fd) < 0)
                r = fail("backup: fsync %s: %s", tmp, strerror(errno));
        close(fd);
        if (!r) {
                if (force)
                        r = rename(tmp, file) < 0 ? fail("backup: cannot rename to %s: %s", file, strerror(errno)) : 0;
                else if (link(tmp, file) < 0)
                        r = fail("backup: cannot create %s: %s", file, strerror(errno));
                (void) unlink(tmp);
                if (!r)
                        (void) fsync_dir_of(file);
        } else
                (void) unlink(tmp);
        if (!r) {
                json_t *res = json_object_get(reply, "result");
                if (arg_json) {
                        json_t *j = json_pack("{s:s, s:O?, s:O?}", "file", file, "bytes", json_object_get(res, "bytes"),
                                              "schemaVersion", json_object_get(res, "schemaVersion"));
                        print_json(j);
                        json_decref(j);
                } else
                        printf("backup written to %s (%lld bytes, mode 0600)\n", file,
                               json_integer_value(json_object_get(res, "bytes")));
        }
        json_decref(reply);
        return r;
}

/* Validates a store file: SQLite, fieldhub schema not newer than ours, quick_check. Returns
 * 0 with *ret_version, else the exit status after printing why. */
static int validate_store(const char *label, const char *path, int *ret_version) {
        char magic[16];
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return fail("restore: %s: %s", label, strerror(errno));
        ssize_t n = read(fd, magic, sizeof magic);
        close(fd);
        if (n != (ssize_t) sizeof magic || memcmp(magic, "SQLite format 3", 16) != 0)
                return fail("restore: %s is not an SQLite database (not a fieldhub backup)", label), EXIT_DATAERR;

        sqlite3 *db = NULL;
        sqlite3_stmt *st = NULL;
        int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
        int ret = 0, version = -1;
        if (rc != SQLITE_OK) {
                ret = fail("restore: %s: cannot open: %s", label, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
                goto out;
        }
        rc = sqlite3_prepare_v2(db, "SELECT version FROM schema_version", -1, &st, NULL);
        if (rc != SQLITE_OK) {
                ret = (fail("restore: %s is not a fieldhub store (%s)", label, sqlite3_errmsg(db)), EXIT_DATAERR);
                goto out;
        }
        if (sqlite3_step(st) == SQLITE_ROW)
                version = sqlite3_column_int(st, 0);
        if (sqlite3_step(st) != SQLITE_DONE || version < 1) {
                ret = (fail("restore: %s: damaged schema_version (expected one positive version)", label), EXIT_DATAERR);
                goto out;
        }
        if (version > HUB_STORE_SCHEMA_VERSION) {
                ret = (fail("restore: %s was written by a newer fieldhub (schema %d; this one knows up to %d); "
                            "upgrade fieldhub first",
                            label, version, HUB_STORE_SCHEMA_VERSION),
                       EXIT_DATAERR);
                goto out;
        }
        sqlite3_finalize(st);
        st = NULL;
        rc = sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &st, NULL);
        if (rc != SQLITE_OK || sqlite3_step(st) != SQLITE_ROW) {
                ret = (fail("restore: %s fails its integrity check: %s", label, sqlite3_errmsg(db)), EXIT_DATAERR);
                goto out;
        }
        const char *res = (const char *) sqlite3_column_text(st, 0);
        if (!res || !streq(res, "ok")) {
                ret = (fail("restore: %s fails its integrity check: %s", label, res ? res : "?"), EXIT_DATAERR);
                goto out;
        }
        *ret_version = version;
out:
        sqlite3_finalize(st);
        sqlite3_close(db);
        return ret;
}

static int copy_fd(int in, int out) {
        char buf[65536];
        for (;;) {
                ssize_t n = read(in, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return 0;
                for (ssize_t off = 0; off < n;) {
                        ssize_t w = write(out, buf + off, (size_t) (n - off));
                        if (w < 0 && errno == EINTR)
                                continue;
                        if (w < 0)
                                return -errno;
                        off += w;
                }
        }
}

/* Moves path (if present) to dst; dst is replaced. */
static int move_aside(const char *path, const char *dst) {
        if (rename(path, dst) < 0 && errno != ENOENT)
                return -errno;
        return 0;
}

static int cmd_restore(int argc, char **argv) {
        static const struct option opts[] = {
                { "state-dir", required_argument, NULL, 's' },
                { "config", required_argument, NULL, 'c' },
                { "force", no_argument, NULL, 'f' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *state = NULL, *config = NULL;
        bool force = false;
        int c, r, version = 0;
        optind = 0;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 's': state = optarg; break;
                case 'c': config = optarg; break;
                case 'f': force = true; break;
                case 'h': return help_cmd("restore"), 0;
                default: return EXIT_USAGE;
                }
        }
        if (optind + 1 != argc)
                return usage_fail("restore: need exactly one backup file");
        if (state && config)
                return usage_fail("restore: --state-dir and --config exclude each other");
        if (over_https())
                return fail("restore: works on the box itself, with fieldhubd stopped (no --hub)");
        const char *file = argv[optind];

        _cleanup_(gw_config_freep) struct gw_config *cfg = NULL;
        if (!state) {
                _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
                const char *cp = config ? config : FIELDHUB_CONFIG_PATH;
                r = gw_config_load(cp, NULL, &cfg, &e);
                if (r < 0)
                        return fail("restore: cannot read the state directory from %s (%s); use --state-dir", cp,
                                    adp_conf_errors_count(&e) ? adp_conf_errors_get(&e, 0) : strerror(-r));
                state = cfg->state_dir;
        }
        struct stat dst;
        if (stat(state, &dst) < 0 || !S_ISDIR(dst.st_mode))
                return fail("restore: state directory %s: %s", state, errno ? strerror(errno) : "not a directory");

        _cleanup_free_ char *lockp = NULL, *db = NULL, *aside = NULL, *tmp = NULL;
        if (asprintf(&lockp, "%s/fieldhub.lock", state) < 0 || asprintf(&db, "%s/" HUB_STORE_FILE_NAME, state) < 0 ||
            asprintf(&aside, "%s.before-restore", db) < 0 || asprintf(&tmp, "%s/.restore-XXXXXX", state) < 0)
                return fail("out of memory");

        /* The daemon holds an exclusive flock on fieldhub.lock while it runs: hold it too for
         * the whole restore, so it cannot start in the middle. */
        _cleanup_close_ int lfd = open(lockp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (lfd < 0 && errno != ENOENT)
                return fail("restore: %s: %s", lockp, strerror(errno));
        if (lfd >= 0 && flock(lfd, LOCK_EX | LOCK_NB) < 0) {
                if (errno == EWOULDBLOCK)
                        return fail("restore: fieldhubd is running on %s; stop it first (systemctl stop fieldhub), "
                                    "then restore, then start it",
                                    state);
                return fail("restore: cannot lock %s: %s", lockp, strerror(errno));
        }
        if (!force && access(aside, F_OK) == 0)
                return fail("restore: %s exists from an earlier restore; move it away or use --force", aside);

        /* Copy into the state directory first, validate the copy (never the original: opening
         * a WAL database may touch its side files), then swap it in. */
        _cleanup_close_ int in = open(file, O_RDONLY | O_CLOEXEC);
        if (in < 0)
                return fail("restore: %s: %s", file, strerror(errno));
        mode_t old = umask(0077);
        int out = mkostemp(tmp, O_CLOEXEC);
        umask(old);
        if (out < 0)
                return fail("restore: cannot create a file in %s: %s", state, strerror(errno));
        r = copy_fd(in, out);
        if (r < 0) {
                close(out);
                unlink(tmp);
                return fail("restore: copying %s: %s", file, strerror(-r));
        }
        /* The store belongs to the state directory's owner (the service user), mode 0600. */
        if (fchmod(out, 0600) < 0 || fchown(out, dst.st_uid, dst.st_gid) < 0 || fsync(out) < 0) {
                int e = errno;
                close(out);
                unlink(tmp);
                return fail("restore: cannot give the copy to the owner of %s (uid %u): %s%s", state, (unsigned) dst.st_uid,
                            strerror(e), e == EPERM ? "; run as root" : "");
        }
        close(out);
        r = validate_store(file, tmp, &version);
        if (r) {
                unlink(tmp);
                char side[PATH_MAX];
                snprintf(side, sizeof side, "%s-wal", tmp);
                unlink(side);
                snprintf(side, sizeof side, "%s-shm", tmp);
                unlink(side);
                return r;
        }

        /* Move the current store aside, with its WAL (which may hold committed data), so that
         * the restored file is never paired with a stale WAL. */
        const char *sfx[] = { "", "-wal", "-shm" };
        for (size_t i = 0; i < ELEMENTSOF(sfx); i++) {
                char from[PATH_MAX], to[PATH_MAX];
                snprintf(from, sizeof from, "%s%s", db, sfx[i]);
                snprintf(to, sizeof to, "%s%s", aside, sfx[i]);
                if (i > 0)
                        (void) unlink(to);
                r = move_aside(from, to);
                if (r < 0) {
                        unlink(tmp);
                        return fail("restore: cannot move %s aside: %s", from, strerror(-r));
                }
        }
        if (rename(tmp, db) < 0) {
                r = errno;
                unlink(tmp);
                return fail("restore: cannot install %s: %s (the previous store is %s)", db, strerror(r), aside);
        }
        (void) fsync_dir_of(db);
        if (arg_json) {
                json_t *j = json_pack("{s:s, s:s, s:s, s:i}", "restored", file, "store", db, "previous", aside,
                                      "schemaVersion", version);
                print_json(j);
                json_decref(j);
        } else
                printf("restored %s into %s (schema %d)\n"
                       "the previous store is %s\n"
                       "start the service: systemctl start fieldhub\n",
                       file, db, version, aside);
        return 0;
}

/* ---- monitor-events ------------------------------------------------------------------------- */

static int cmd_monitor(int argc, char **argv) {
        static const struct option opts[] = {
                { "device", required_argument, NULL, 'd' },
                { "properties", no_argument, NULL, 'p' },
                { "timeout", required_argument, NULL, 't' },
                { "after", required_argument, NULL, 'a' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        const char *dev = NULL;
        bool props = false;
        long timeout = 0;
        json_int_t after = -1;
        int c, r;
        optind = 0;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'd': dev = optarg; break;
                case 'p': props = true; break;
                case 't':
                        r = parse_duration_sec("--timeout", optarg, false, &timeout);
                        if (r)
                                return r;
                        break;
                case 'a': {
                        char *end;
                        errno = 0;
                        unsigned long long v = strtoull(optarg, &end, 10);
                        if (errno || end == optarg || *end || optarg[0] == '-' || v > INT64_MAX)
                                return usage_fail("monitor-events: --after: expected a sequence number, got \"%s\"", optarg);
                        after = (json_int_t) v;
                        break;
                }
                case 'h': return help_cmd("monitor-events"), 0;
                default: return EXIT_USAGE;
                }
        }
        if (optind < argc)
                return usage_fail("monitor-events: unexpected argument \"%s\"", argv[optind]);
        if (over_https())
                return fail("monitor-events: only over the admin socket (on the box itself)");

        _cleanup_close_ int fd = -EBADF;
        r = gw_admin_connect(arg_socket, &fd);
        if (r < 0)
                return fail("cannot reach fieldhubd at %s: %s (is it running?)", arg_socket, strerror(-r));
        _cleanup_(gw_admin_reader_done) struct gw_admin_reader rd = { 0 };
        json_t *req = json_pack("{s:s, s:{s:s?}}", "cmd", "monitor-events", "args", "device", dev);
        if (req && after >= 0)
                json_object_set_new(json_object_get(req, "args"), "after", json_integer(after));
        r = gw_admin_send(fd, req, -1);
        json_decref(req);
        json_t *j = NULL;
        if (r >= 0)
                r = gw_admin_read(fd, &rd, 30 * 1000000ULL, &j);
        if (r < 0)
                return fail("monitor-events: no answer from fieldhubd: %s", strerror(-r));
        if (!json_is_true(json_object_get(j, "ok"))) {
                r = fail("monitor-events: %s", jstr(j, "error"));
                json_decref(j);
                return r;
        }
        json_decref(j);
        if (!arg_json)
                fprintf(stderr, "Starting event monitor%s%s, use ctrl-c to stop...\n", dev ? ", filtering on device: " : "",
                        dev ? dev : "");
        fflush(stderr);

        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (;;) {
                uint64_t left = UINT64_MAX;
                if (timeout > 0) {
                        struct timespec now;
                        clock_gettime(CLOCK_MONOTONIC, &now);
                        long el = now.tv_sec - t0.tv_sec;
                        if (el >= timeout)
                                return 0;
                        left = (uint64_t) (timeout - el) * 1000000ULL;
                }
                r = gw_admin_read(fd, &rd, left, &j);
                if (r == -ETIMEDOUT)
                        return 0;
                if (r < 0)
                        return fail("monitor-events: %s",
                                    r == -ECONNRESET ? "fieldhubd closed the stream (stopped?)" : strerror(-r));
                json_t *ev = json_object_get(j, "event");
                if (!json_is_true(json_object_get(j, "ok")) || !ev) {
                        r = fail("monitor-events: %s", jstr(j, "error"));
                        json_decref(j);
                        return r;
                }
                if (!props)
                        json_object_del(ev, "properties");
                else
                        /* As az iot hub monitor-events --props all: the stream position, for --after. */
                        json_object_set_new(ev, "annotations",
                                            json_pack("{s:O?}", "x-opt-sequence-number", json_object_get(j, "seq")));
                json_t *out = json_pack("{s:O}", "event", ev);
                /* --json: one compact event per line, for scripts. */
                char *line = hub_json_dumps(out, (arg_json ? JSON_COMPACT : JSON_INDENT(2)) | JSON_ENCODE_ANY);
                if (line)
                        puts(line);
                free(line);
                fflush(stdout);
                json_decref(out);
                json_decref(j);
        }
}

/* ---- main ---------------------------------------------------------------------------------- */

/* Global options are taken before the command, and also after it (except for the offline
 * sas-token, whose --hub/--policy/--key-file mean something else). */
static int take_global(int *argc, char **argv, int i, bool *ret_taken, const char **cs, const char **hub,
                       const char **policy, const char **key_file) {
        const char *a = argv[i];
        const char *val = NULL;
        const char **slot = NULL;
        int n = 1;
        static const struct {
                const char *name;
                int which;
        } withval[] = { { "--socket", 0 }, { "--hub", 1 }, { "--connection-string", 2 }, { "--policy", 3 },
                        { "--key-file", 4 }, { "--cafile", 5 } };
        *ret_taken = false;
        if (streq(a, "--json")) {
                arg_json = true;
                *ret_taken = true;
                goto remove;
        }
        for (size_t k = 0; k < ELEMENTSOF(withval); k++) {
                size_t l = strlen(withval[k].name);
                if (strncmp(a, withval[k].name, l) != 0 || (a[l] != 0 && a[l] != '='))
                        continue;
                if (a[l] == '=')
                        val = a + l + 1;
                else if (i + 1 < *argc) {
                        val = argv[i + 1];
                        n = 2;
                } else
                        return usage_fail("%s needs a value", withval[k].name);
                switch (withval[k].which) {
                case 0: arg_socket = val; break;
                case 1: slot = hub; break;
                case 2: slot = cs; break;
                case 3: slot = policy; break;
                case 4: slot = key_file; break;
                case 5: arg_cafile = val; break;
                }
                if (slot)
                        *slot = val;
                *ret_taken = true;
                goto remove;
        }
        return 0;
remove:
        memmove(&argv[i], &argv[i + n], sizeof(char *) * (size_t) (*argc - i - n + 1));
        *argc -= n;
        return 0;
}

int main(int argc, char **argv) {
        const char *cs = NULL, *hub = NULL, *policy = NULL, *key_file = NULL;
        int i = 1, r;
        bool taken;

        signal(SIGPIPE, SIG_IGN);
        while (i < argc && argv[i][0] == '-') {
                if (streq(argv[i], "--version")) {
                        printf("fieldhubctl %s\n", FIELDHUB_VERSION);
                        return 0;
                }
                if (streq(argv[i], "--help") || streq(argv[i], "-h")) {
                        help();
                        return 0;
                }
                r = take_global(&argc, argv, i, &taken, &cs, &hub, &policy, &key_file);
                if (r)
                        return r;
                if (!taken)
                        return usage_fail("unknown option \"%s\"; try 'fieldhubctl --help'", argv[i]);
        }
        if (i >= argc) {
                help();
                return EXIT_USAGE;
        }
        bool offline_opts = streq(argv[i], "sas-token");
        for (int j = i + 1; j < argc;) {
                if (offline_opts) {
                        if (streq(argv[j], "--json")) {
                                arg_json = true;
                                memmove(&argv[j], &argv[j + 1], sizeof(char *) * (size_t) (argc - j));
                                argc--;
                        } else
                                j++;
                        continue;
                }
                if (streq(argv[j], "--")) /* the rest is positional */
                        break;
                r = take_global(&argc, argv, j, &taken, &cs, &hub, &policy, &key_file);
                if (r)
                        return r;
                if (!taken)
                        j++;
        }

        if (hub) {
                r = parse_hub(hub);
                if (r)
                        return r;
                if (!cs && !policy)
                        cs = getenv("FIELDHUB_CONNECTION_STRING");
                if (cs && (policy || key_file))
                        return usage_fail("--connection-string excludes --policy/--key-file");
                if (cs) {
                        r = parse_connection_string(cs);
                        if (r)
                                return r;
                } else if (policy && key_file) {
                        r = read_key_file(key_file, &cs_key);
                        if (r < 0)
                                return fail("%s: %s", key_file, r == -EINVAL ? "expected one base64 key" : strerror(-r));
                        cs_policy = strdup(policy);
                        cs_host = strdup(arg_hub_host[0] == '[' ? "" : arg_hub_host);
                        if (!cs_policy || !cs_host)
                                return fail("out of memory");
                } else
                        return usage_fail("--hub needs credentials: --connection-string (or $FIELDHUB_CONNECTION_STRING), "
                                          "or --policy NAME --key-file FILE");
        } else if (cs || policy || key_file || arg_cafile)
                return usage_fail("--connection-string, --policy, --key-file and --cafile need --hub HOST[:PORT]");

        const char *cmd = argv[i];
        argc -= i;
        argv += i;
        if (streq(cmd, "check-config"))
                return cmd_check_config(argc, argv);
        if (streq(cmd, "sas-token"))
                return cmd_sas_token(argc, argv);
        if (streq(cmd, "status"))
                return cmd_status(argc, argv);
        if (streq(cmd, "reload"))
                return cmd_reload(argc, argv);
        if (streq(cmd, "endpoints"))
                return cmd_endpoints(argc, argv);
        if (streq(cmd, "device"))
                return cmd_device(argc, argv);
        if (streq(cmd, "twin"))
                return cmd_twin(argc, argv);
        if (streq(cmd, "query"))
                return cmd_query(argc, argv);
        if (streq(cmd, "c2d"))
                return cmd_c2d(argc, argv);
        if (streq(cmd, "method"))
                return cmd_method(argc, argv);
        if (streq(cmd, "backup"))
                return cmd_backup(argc, argv);
        if (streq(cmd, "restore"))
                return cmd_restore(argc, argv);
        if (streq(cmd, "monitor-events"))
                return cmd_monitor(argc, argv);
        if (streq(cmd, "help")) {
                if (argc > 1)
                        help_cmd(argv[1]);
                else
                        help();
                return 0;
        }
        return usage_fail("unknown command \"%s\"; try 'fieldhubctl --help'", cmd);
}
