/* SPDX-License-Identifier: MIT */
/* fieldhubctl: the operator's command-line tool. Talks to the local fieldhubd over its
 * admin socket; some subcommands (check-config, sas-token) work offline. */

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "adapter/conf.h"
#include "admin-proto.h"
#include "config.h"
#include "fieldhub-paths.h"
#include "hub/auth.h"
#include "hub/macro.h"

#define EXIT_FAIL 1
#define EXIT_USAGE 64

static const char *arg_socket = FIELDHUB_ADMIN_SOCKET;
static bool arg_json = false;

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

static void help(void) {
        printf("Usage: fieldhubctl [--socket PATH] [--json] COMMAND ...\n"
               "\n"
               "Offline:\n"
               "  check-config FILE [--confd DIR]    Validate a configuration (exit 78 if invalid)\n"
               "  sas-token --hub HOST (--device ID [--module M] | --policy NAME)\n"
               "            (--key KEY | --key-file FILE) [--ttl 1h]\n"
               "                                     Generate a SAS token (like az iot hub generate-sas-token)\n"
               "Daemon (over the admin socket, default %s):\n"
               "  status                             Daemon, store and registry summary\n"
               "  reload [--wait]                    Re-read the configuration; with --wait, fail if rejected\n"
               "  device create ID [--auth sas|selfSigned|certificateAuthority]\n"
               "                   [--primary-thumbprint T] [--secondary-thumbprint T] [--disabled]\n"
               "  device show ID | list | delete ID [--etag E] | show-connection-string ID [--secondary]\n"
               "\n"
               "  --json    machine-readable output     --version    print the version\n",
               FIELDHUB_ADMIN_SOCKET);
}

/* Sends one admin request; on success *ret_result borrows from *ret_reply. */
static int call(const char *cmd, json_t *args, json_t **ret_reply) {
        int fd = -1;
        int r = gw_admin_connect(arg_socket, &fd);
        if (r < 0) {
                json_decref(args);
                if (r == -ENOENT || r == -ECONNREFUSED)
                        return fail("cannot reach fieldhubd at %s: %s (is it running?)", arg_socket, strerror(-r));
                if (r == -EACCES)
                        return fail("no permission to use %s: run as root or as a member of the fieldhub group",
                                    arg_socket);
                return fail("cannot connect to %s: %s", arg_socket, strerror(-r));
        }
        json_t *req = json_pack("{s:s, s:o}", "cmd", cmd, "args", args ? args : json_object());
        json_t *reply = NULL;
        r = gw_admin_call(fd, req, 120 * 1000000ULL, &reply);
        close(fd);
        json_decref(req);
        if (r < 0)
                return fail("%s: no answer from fieldhubd: %s", cmd, strerror(-r));
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

static void print_json(json_t *j) {
        char *s = json_dumps(j, JSON_INDENT(2) | JSON_ENCODE_ANY);
        if (s) {
                puts(s);
                free(s);
        }
}

static int cmd_check_config(int argc, char **argv) {
        const char *confd = NULL, *file = NULL;
        for (int i = 1; i < argc; i++) {
                if (streq(argv[i], "--confd") && i + 1 < argc)
                        confd = argv[++i];
                else if (!file && argv[i][0] != '-')
                        file = argv[i];
                else
                        return fail("check-config: unexpected argument \"%s\"", argv[i]), EXIT_USAGE;
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
                { "ttl", required_argument, NULL, 't' },      {},
        };
        const char *hub = NULL, *dev = NULL, *mod = NULL, *pol = NULL, *key = NULL, *key_file = NULL;
        uint64_t ttl = 3600ULL * 1000000ULL;
        int c;
        optind = 1;
        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case 'H': hub = optarg; break;
                case 'd': dev = optarg; break;
                case 'm': mod = optarg; break;
                case 'p': pol = optarg; break;
                case 'k': key = optarg; break;
                case 'K': key_file = optarg; break;
                case 't':
                        if (adp_parse_duration(optarg, &ttl) < 0 || ttl < 1000000ULL)
                                return fail("--ttl: found \"%s\", expected a duration such as 30min, 1h, 7d", optarg),
                                       EXIT_USAGE;
                        break;
                default:
                        return EXIT_USAGE;
                }
        }
        if (!hub || (!dev && !pol) || (!key == !key_file) || (mod && !dev))
                return fail("sas-token: need --hub, --device ID or --policy NAME, and --key or --key-file"),
                       EXIT_USAGE;

        char keybuf[256];
        if (key_file) {
                FILE *f = fopen(key_file, "re");
                if (!f)
                        return fail("%s: %s", key_file, strerror(errno));
                size_t n = fread(keybuf, 1, sizeof keybuf - 1, f);
                fclose(f);
                keybuf[n] = 0;
                keybuf[strcspn(keybuf, "\r\n \t")] = 0;
                key = keybuf;
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
        hub_explicit_bzero(keybuf, sizeof keybuf);
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

static int cmd_status(void) {
        json_t *reply = NULL;
        int r = call("status", NULL, &reply);
        if (r)
                return r;
        json_t *s = json_object_get(reply, "result");
        if (arg_json)
                print_json(s);
        else {
                json_t *st = json_object_get(s, "store"), *dv = json_object_get(s, "devices");
                printf("fieldhubd %s (pid %lld), up %lld s\n", json_string_value(json_object_get(s, "version")),
                       json_integer_value(json_object_get(s, "pid")), json_integer_value(json_object_get(s, "uptimeSec")));
                printf("  %s\n", json_string_value(json_object_get(s, "status")));
                printf("  hub:     %s\n", json_string_value(json_object_get(s, "hostName")));
                printf("  devices: %lld total, %lld enabled, %lld disabled\n",
                       json_integer_value(json_object_get(dv, "total")), json_integer_value(json_object_get(dv, "enabled")),
                       json_integer_value(json_object_get(dv, "disabled")));
                printf("  store:   %s, %s, %lld commits / %lld writes, %lld pending, last commit %lld us\n",
                       json_string_value(json_object_get(st, "path")),
                       json_is_true(json_object_get(st, "healthy")) ? "healthy" : "STALLED",
                       json_integer_value(json_object_get(st, "commits")), json_integer_value(json_object_get(st, "writes")),
                       json_integer_value(json_object_get(st, "pending")),
                       json_integer_value(json_object_get(st, "lastCommitUsec")));
                printf("  log:     %s\n", json_string_value(json_object_get(s, "logLevel")));
        }
        json_decref(reply);
        return 0;
}

static int cmd_reload(int argc, char **argv) {
        bool wait = argc > 1 && streq(argv[1], "--wait");
        json_t *reply = NULL;
        /* The daemon answers once the new configuration is applied or rejected; without
         * --wait a rejection is still reported, but does not fail the command. */
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

static void print_device(json_t *d) {
        json_t *auth = json_object_get(d, "authentication");
        printf("%-24s %-9s %-12s %-8s %s\n", json_string_value(json_object_get(d, "deviceId")),
               json_string_value(json_object_get(d, "status")), json_string_value(json_object_get(d, "connectionState")),
               json_string_value(json_object_get(auth, "type")), json_string_value(json_object_get(d, "etag")));
}

static int cmd_device(int argc, char **argv) {
        if (argc < 2)
                return fail("device: need a subcommand (create, show, list, delete, show-connection-string)"), EXIT_USAGE;
        const char *sub = argv[1];
        json_t *reply = NULL;
        int r;

        if (streq(sub, "list")) {
                json_t *all = json_array();
                const char *after = NULL;
                char after_buf[256];
                for (;;) {
                        json_t *args = json_pack("{s:s?, s:i}", "after", after, "max", 1000);
                        r = call("device.list", args, &reply);
                        if (r) {
                                json_decref(all);
                                return r;
                        }
                        json_t *page = json_object_get(reply, "result");
                        size_t n = json_array_size(page);
                        json_array_extend(all, page);
                        if (n < 1000) {
                                json_decref(reply);
                                break;
                        }
                        snprintf(after_buf, sizeof after_buf, "%s",
                                 json_string_value(json_object_get(json_array_get(page, n - 1), "deviceId")));
                        after = after_buf;
                        json_decref(reply);
                }
                if (arg_json)
                        print_json(all);
                else {
                        size_t i;
                        json_t *v;
                        printf("%-24s %-9s %-12s %-8s %s\n", "DEVICE", "STATUS", "CONNECTION", "AUTH", "ETAG");
                        json_array_foreach(all, i, v) print_device(v);
                }
                json_decref(all);
                return 0;
        }
        if (argc < 3)
                return fail("device %s: need a device id", sub), EXIT_USAGE;
        const char *id = argv[2];

        if (streq(sub, "create")) {
                const char *auth = "sas", *t1 = NULL, *t2 = NULL;
                bool disabled = false;
                for (int i = 3; i < argc; i++) {
                        if (streq(argv[i], "--auth") && i + 1 < argc)
                                auth = argv[++i];
                        else if (streq(argv[i], "--primary-thumbprint") && i + 1 < argc)
                                t1 = argv[++i];
                        else if (streq(argv[i], "--secondary-thumbprint") && i + 1 < argc)
                                t2 = argv[++i];
                        else if (streq(argv[i], "--disabled"))
                                disabled = true;
                        else
                                return fail("device create: unexpected argument \"%s\"", argv[i]), EXIT_USAGE;
                }
                json_t *dev = json_pack("{s:s, s:s, s:{s:s}}", "deviceId", id, "status", disabled ? "disabled" : "enabled",
                                        "authentication", "type", auth);
                if (t1 || t2)
                        json_object_set_new(json_object_get(dev, "authentication"), "x509Thumbprint",
                                            json_pack("{s:s?, s:s?}", "primaryThumbprint", t1, "secondaryThumbprint", t2));
                r = call("device.create", json_pack("{s:o}", "device", dev), &reply);
        } else if (streq(sub, "show") || streq(sub, "show-connection-string"))
                r = call("device.get", json_pack("{s:s}", "deviceId", id), &reply);
        else if (streq(sub, "delete")) {
                const char *etag = argc > 4 && streq(argv[3], "--etag") ? argv[4] : "*";
                r = call("device.delete", json_pack("{s:s, s:s}", "deviceId", id, "etag", etag), &reply);
                if (!r && !arg_json)
                        printf("deleted %s\n", id);
                json_decref(reply);
                return r;
        } else
                return fail("device: unknown subcommand \"%s\"", sub), EXIT_USAGE;
        if (r)
                return r;

        json_t *d = json_object_get(reply, "result");
        if (streq(sub, "show-connection-string")) {
                json_t *st = NULL;
                r = call("status", NULL, &st);
                if (r) {
                        json_decref(reply);
                        return r;
                }
                const char *host = json_string_value(json_object_get(json_object_get(st, "result"), "hostName"));
                json_t *auth = json_object_get(d, "authentication");
                const char *type = json_string_value(json_object_get(auth, "type"));
                bool secondary = argc > 3 && streq(argv[3], "--secondary");
                char cs[1024];
                if (type && streq(type, "sas"))
                        snprintf(cs, sizeof cs, "HostName=%s;DeviceId=%s;SharedAccessKey=%s", host, id,
                                 json_string_value(json_object_get(json_object_get(auth, "symmetricKey"),
                                                                   secondary ? "secondaryKey" : "primaryKey")));
                else
                        snprintf(cs, sizeof cs, "HostName=%s;DeviceId=%s;x509=true", host, id);
                if (arg_json) {
                        json_t *j = json_pack("{s:s}", "connectionString", cs);
                        print_json(j);
                        json_decref(j);
                } else
                        puts(cs);
                hub_explicit_bzero(cs, sizeof cs);
                json_decref(st);
        } else if (arg_json || streq(sub, "show"))
                print_json(d);
        else {
                printf("%-24s %-9s %-12s %-8s %s\n", "DEVICE", "STATUS", "CONNECTION", "AUTH", "ETAG");
                print_device(d);
        }
        json_decref(reply);
        return 0;
}

int main(int argc, char **argv) {
        int i = 1;
        for (; i < argc && argv[i][0] == '-'; i++) {
                if (streq(argv[i], "--socket") && i + 1 < argc)
                        arg_socket = argv[++i];
                else if (strncmp(argv[i], "--socket=", 9) == 0)
                        arg_socket = argv[i] + 9;
                else if (streq(argv[i], "--json"))
                        arg_json = true;
                else if (streq(argv[i], "--version")) {
                        printf("fieldhubctl %s\n", FIELDHUB_VERSION);
                        return 0;
                } else if (streq(argv[i], "--help") || streq(argv[i], "-h")) {
                        help();
                        return 0;
                } else
                        return fail("unknown option \"%s\"; try 'fieldhubctl --help'", argv[i]), EXIT_USAGE;
        }
        if (i >= argc) {
                help();
                return EXIT_USAGE;
        }
        /* Options may also follow the command. */
        for (int j = i + 1; j < argc; j++)
                if (streq(argv[j], "--json")) {
                        arg_json = true;
                        memmove(&argv[j], &argv[j + 1], sizeof(char *) * (size_t) (argc - j));
                        argc--;
                        j--;
                }
        const char *cmd = argv[i];
        argc -= i;
        argv += i;
        if (streq(cmd, "check-config"))
                return cmd_check_config(argc, argv);
        if (streq(cmd, "sas-token"))
                return cmd_sas_token(argc, argv);
        if (streq(cmd, "status"))
                return cmd_status();
        if (streq(cmd, "reload"))
                return cmd_reload(argc, argv);
        if (streq(cmd, "device"))
                return cmd_device(argc, argv);
        if (streq(cmd, "help"))
                return help(), 0;
        return fail("unknown command \"%s\"; try 'fieldhubctl --help'", cmd), EXIT_USAGE;
}
