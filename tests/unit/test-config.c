/* SPDX-License-Identifier: MIT */
/* The positioned configuration tree (adapter/conf.h) and fieldhub's schema (gateway/config.h):
 * every broken configuration must give exactly the error line written next to it. */

#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapter/conf.h"
#include "config.h"
#include "fieldhub-paths.h"
#include "test-util.h"

#define BASE "hub:\n  host_name: gw.example.local\n"
/* A valid base64 key of 32 bytes (bytes 0x00..0x1f). */
#define GOOD_KEY "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

static char tmp[256];

static void dump_errors(const struct adp_conf_errors *e) {
        for (size_t i = 0; i < adp_conf_errors_count(e); i++)
                fprintf(stderr, "   got: %s\n", adp_conf_errors_get(e, i));
}

/* Compares the collected errors with expected (NULL-terminated), exactly and in order. */
static void check_errors(int line, const struct adp_conf_errors *e, const char *const expected[]) {
        size_t n = 0;
        while (expected[n])
                n++;
        bool ok = adp_conf_errors_count(e) == n;
        for (size_t i = 0; ok && i < n; i++)
                ok = streq(adp_conf_errors_get(e, i), expected[i]);
        if (!ok) {
                fprintf(stderr, "test-config.c:%d: errors differ\n", line);
                for (size_t i = 0; i < n; i++)
                        fprintf(stderr, "  want: %s\n", expected[i]);
                dump_errors(e);
                abort();
        }
}

/* Parses text as "t.yaml", validates it as fieldhub's configuration, and compares errors. */
static void expect_config(int line, const char *text, const char *const expected[]) {
        struct adp_conf_errors e = {};
        struct adp_conf_node *tree = NULL;
        struct gw_config *c = NULL;

        int r = adp_conf_load_string("t.yaml", text, strlen(text), &tree, &e);
        if (r == 0) {
                r = gw_config_from_tree(tree, &c, &e);
                if (expected[0] == NULL && r < 0) {
                        fprintf(stderr, "test-config.c:%d: unexpected failure %d\n", line, r);
                        dump_errors(&e);
                        abort();
                }
        }
        if (expected[0] != NULL && r != -EINVAL) {
                fprintf(stderr, "test-config.c:%d: expected -EINVAL, got %d\n", line, r);
                dump_errors(&e);
                abort();
        }
        check_errors(line, &e, expected);
        gw_config_free(c);
        adp_conf_errors_done(&e);
}
#define EXPECT(text, ...) expect_config(__LINE__, (text), (const char *const[]) { __VA_ARGS__, NULL })
#define EXPECT_OK(text) expect_config(__LINE__, (text), (const char *const[]) { NULL })

static char *write_file(const char *name, const char *content, mode_t mode) {
        char *p = NULL;
        ASSERT_TRUE(asprintf(&p, "%s/%s", tmp, name) > 0);
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        ASSERT_TRUE(fd >= 0);
        ASSERT_EQ(write(fd, content, strlen(content)), (ssize_t) strlen(content));
        ASSERT_OK(fchmod(fd, mode));
        close(fd);
        return p;
}

/* Strings for expected-error arrays: formatted, and freed at the end of the run. */
static char *pool[256];
static size_t n_pool;
static char *tf(const char *fmt, ...) _printf_(1, 2);
static char *tf(const char *fmt, ...) {
        char *s = NULL;
        va_list ap;
        va_start(ap, fmt);
        ASSERT_TRUE(vasprintf(&s, fmt, ap) >= 0);
        va_end(ap);
        ASSERT_TRUE(n_pool < ELEMENTSOF(pool));
        return pool[n_pool++] = s;
}

static char *xasprintf(const char *fmt, ...) _printf_(1, 2);
static char *xasprintf(const char *fmt, ...) {
        char *s = NULL;
        va_list ap;
        va_start(ap, fmt);
        ASSERT_TRUE(vasprintf(&s, fmt, ap) >= 0);
        va_end(ap);
        return s;
}

/* ---- syntax and structure ------------------------------------------------------------- */

static void test_syntax(void) {
        EXPECT("hub:\n  host_name: [x\n",
               "t.yaml:3:1: did not find expected ',' or ']' (while parsing a flow sequence at line 2, column 14)");
        EXPECT("hub:\n\thost_name: x\n",
               "t.yaml:2:1: found character that cannot start any token (while scanning for the next token); tabs are not allowed for indentation, use spaces");
        EXPECT("a: 1\n  b: 2\n", "t.yaml:2:4: mapping values are not allowed in this context");
        EXPECT("hub: \"\xff\"\n", "t.yaml:1:7: invalid leading UTF-8 octet (byte 0xff), expected UTF-8 text");
        EXPECT(BASE "---\nhub: {}\n",
               "t.yaml:3:1: found a second YAML document, expected exactly one document per file");
        EXPECT("hub: &h\n  host_name: gw.example.local\nlog: *h\n",
               "t.yaml:1:6: hub: found an anchor (&h), expected plain values: anchors and aliases are not supported, write the value out",
               "t.yaml:3:6: log: found an alias (*h), expected plain values: anchors and aliases are not supported, write the value out");
        EXPECT("hub:\n  host_name: !secret gw.example.local\n",
               "t.yaml:2:14: hub.host_name: found the tag !secret, expected no tag or one of !!str, !!int, !!float, !!bool, !!null, !!map, !!seq");
        EXPECT("hub:\n  host_name: !!binary Z3cuZXhhbXBsZS5sb2NhbA==\n",
               "t.yaml:2:14: hub.host_name: found the tag !!binary, expected no tag or one of !!str, !!int, !!float, !!bool, !!null, !!map, !!seq");
        EXPECT("hub:\n  host_name: a.b\n  host_name: c.d\n",
               "t.yaml:3:3: hub.host_name: duplicate key \"host_name\" (first defined at line 2, column 3), expected each key once");
        EXPECT(BASE "? [a, b]\n: 1\n", "t.yaml:3:3: ?: found a sequence as a key, expected a key name");
        EXPECT("- hub\n", "t.yaml:1:1: found a sequence, expected a mapping with the keys: hub, state_dir, log, store, admin, adapters, service_api, metrics, c2d, feedback, mqtt, coap, endpoints, routes, fallback_route, enrichments, logs_dir, http_device, file_upload");
        EXPECT("", "t.yaml:1:1: missing required key \"hub\"");
        EXPECT("# only a comment\n", "t.yaml:1:1: missing required key \"hub\"");

        /* Nesting past the limit. */
        char deep[400] = "";
        for (int i = 0; i < 70; i++)
                strcat(deep, "[");
        EXPECT(deep, "t.yaml:1:65: found nesting deeper than 64 levels, expected a flatter structure");
}

static void test_schema_errors(void) {
        EXPECT("hub:\n  hots_name: gw.example.local\n",
               "t.yaml:2:3: hub.hots_name: unknown key \"hots_name\" (did you mean \"host_name\"?); expected one of: host_name, host_aliases, policies, x509_ca_files",
               "t.yaml:2:3: hub: missing required key \"host_name\"");
        EXPECT(BASE "stor:\n  check_on_start: true\n",
               "t.yaml:3:1: stor: unknown key \"stor\" (did you mean \"store\"?); expected one of: hub, state_dir, log, store, admin, adapters, service_api, metrics, c2d, feedback, mqtt, coap, endpoints, routes, fallback_route, enrichments, logs_dir, http_device, file_upload");
        EXPECT(BASE "bogus: []\n",
               "t.yaml:3:1: bogus: unknown key \"bogus\"; expected one of: hub, state_dir, log, store, admin, adapters, service_api, metrics, c2d, feedback, mqtt, coap, endpoints, routes, fallback_route, enrichments, logs_dir, http_device, file_upload");
        EXPECT("hub:\n  host_name:\n    a: b\n", "t.yaml:3:5: hub.host_name: found a mapping, expected a string");
        EXPECT("hub:\n  host_name: [a.b]\n", "t.yaml:2:14: hub.host_name: found a sequence, expected a string");
        EXPECT("hub:\n  host_name:\n", "t.yaml:2:13: hub.host_name: found null, expected a value");
        EXPECT("hub: gw.example.local\n", "t.yaml:1:6: hub: found \"gw.example.local\", expected a mapping");
        EXPECT("hub:\n  host_aliases: []\n", "t.yaml:2:3: hub: missing required key \"host_name\"");
        EXPECT("log:\n  level: info\n", "t.yaml:1:1: missing required key \"hub\"");
        EXPECT("hub:\n  host_name: gateway\n",
               "t.yaml:2:14: hub.host_name: found \"gateway\", expected a host name containing at least one dot");
        EXPECT("hub:\n  host_name: gw_1.local\n",
               "t.yaml:2:14: hub.host_name: found \"gw_1.local\", expected a host name: labels of 1 to 63 letters, digits or '-' (not starting or ending with '-'), at most 253 characters");
        EXPECT("hub:\n  host_name: -gw.local\n",
               "t.yaml:2:14: hub.host_name: found \"-gw.local\", expected a host name: labels of 1 to 63 letters, digits or '-' (not starting or ending with '-'), at most 253 characters");
        EXPECT("hub:\n  host_name: gw..local\n",
               "t.yaml:2:14: hub.host_name: found \"gw..local\", expected a host name: labels of 1 to 63 letters, digits or '-' (not starting or ending with '-'), at most 253 characters");
        EXPECT(BASE "  host_aliases: [hub.azure-devices.net, GW.Example.Local, HUB.azure-devices.net, x_y.z]\n",
               "t.yaml:3:41: hub.host_aliases[1]: duplicate host name \"GW.Example.Local\" (already given as hub.host_name), expected each name once",
               "t.yaml:3:59: hub.host_aliases[2]: duplicate host name \"HUB.azure-devices.net\" (already given as hub.host_aliases[0]), expected each name once",
               "t.yaml:3:82: hub.host_aliases[3]: found \"x_y.z\", expected a host name: labels of 1 to 63 letters, digits or '-' (not starting or ending with '-'), at most 253 characters");
        EXPECT(BASE "  host_aliases: a.b\n", "t.yaml:3:17: hub.host_aliases: found \"a.b\", expected a sequence");
        EXPECT(BASE "log:\n  level: verbose\n",
               "t.yaml:4:10: log.level: found \"verbose\", expected one of: emerg, alert, crit, err, warning, notice, info, debug");
        EXPECT(BASE "log:\n  target: syslog\n",
               "t.yaml:4:11: log.target: found \"syslog\", expected one of: auto, journal, stderr");
        EXPECT(BASE "store:\n  stall_timeout: 5 parsecs\n",
               "t.yaml:4:18: store.stall_timeout: found \"5 parsecs\", expected a duration such as 250ms, 5s, 10min, 2h, 7d");
        EXPECT(BASE "store:\n  stall_timeout: 5\n",
               "t.yaml:4:18: store.stall_timeout: found \"5\", expected a duration with a unit (us, ms, s, min, h, d) such as 250ms, 5s, 10min, 2h, 7d");
        EXPECT(BASE "store:\n  stall_timeout: 20min\n",
               "t.yaml:4:18: store.stall_timeout: found 20min, expected a duration from 1s to 10min");
        EXPECT(BASE "store:\n  stall_timeout: 500ms\n",
               "t.yaml:4:18: store.stall_timeout: found 500ms, expected a duration from 1s to 10min");
        EXPECT(BASE "log:\n  rate_limit:\n    burst: -5\n",
               "t.yaml:5:12: log.rate_limit.burst: found -5, expected an integer from 1 to 10000");
        EXPECT(BASE "log:\n  rate_limit:\n    burst: 70000\n",
               "t.yaml:5:12: log.rate_limit.burst: found 70000, expected an integer from 1 to 10000");
        EXPECT(BASE "log:\n  rate_limit:\n    burst: ten\n",
               "t.yaml:5:12: log.rate_limit.burst: found \"ten\", expected an integer from 1 to 10000 (decimal or 0x hex)");
        EXPECT(BASE "log:\n  rate_limit:\n    burst: 010\n",
               "t.yaml:5:12: log.rate_limit.burst: found \"010\", expected an integer from 1 to 10000 (decimal or 0x hex)");
        EXPECT(BASE "log:\n  rate_limit:\n    intervall: 1s\n",
               "t.yaml:5:5: log.rate_limit.intervall: unknown key \"intervall\" (did you mean \"interval\"?); expected one of: interval, burst");
        EXPECT(BASE "store:\n  check_on_start: maybe\n",
               "t.yaml:4:19: store.check_on_start: found \"maybe\", expected a boolean (true/false, yes/no, on/off)");
        EXPECT(BASE "state_dir: var/lib/fieldhub\n",
               "t.yaml:3:12: state_dir: found \"var/lib/fieldhub\", expected an absolute path");
        EXPECT(BASE "admin:\n  socket: admin.sock\n",
               "t.yaml:4:11: admin.socket: found \"admin.sock\", expected an absolute path");
        EXPECT(BASE "  policies:\n    - name: iothubowner\n      key: abc\n",
               "t.yaml:5:12: hub.policies[0].key: secrets are never written in the configuration; use key_file: or key_credential:");
        EXPECT(BASE "  policies:\n    - name: owner\n      key_file: /nonexistent/fieldhub/owner.key\n",
               "t.yaml:4:13: hub.policies[0].name: found \"owner\", expected one of: iothubowner, service, device, registryRead, registryReadWrite",
               "t.yaml:5:17: hub.policies[0].key_file: \"/nonexistent/fieldhub/owner.key\" does not exist, expected a readable secret file");
        EXPECT(BASE "  policies:\n    - name: service\n",
               "t.yaml:4:7: hub.policies[0]: missing required key \"key_file\" or \"key_credential\"");
        EXPECT(BASE "  policies:\n    - name: service\n      key_file: keys/service.key\n",
               "t.yaml:5:17: hub.policies[0].key_file: found \"keys/service.key\", expected an absolute path");
        EXPECT(BASE "  policies:\n    - name: service\n      key_file: /a\n      key_credential: b\n",
               "t.yaml:6:23: hub.policies[0].key_credential: found both key_file and key_credential, expected only one of them");
        EXPECT(BASE "  policies:\n    - service\n",
               "t.yaml:4:7: hub.policies[0]: found \"service\", expected a mapping with the keys: name, key_file or key_credential, and optionally secondary_key_file or secondary_key_credential");
        EXPECT(BASE "adapters:\n  - type: profibus\n    name: plc1\n",
               "t.yaml:4:11: adapters[0].type: found \"profibus\", expected one of: modbus, serial, coap");
        EXPECT(BASE "adapters:\n  - type: profibus\n    name: plc1\n  - type: canopen\n    name: plc1\n  - name: bad name\n",
               "t.yaml:4:11: adapters[0].type: found \"profibus\", expected one of: modbus, serial, coap",
               "t.yaml:6:11: adapters[1].type: found \"canopen\", expected one of: modbus, serial, coap",
               "t.yaml:7:11: adapters[1].name: duplicate adapter name \"plc1\" (already given at adapters[0]), expected each name once",
               "t.yaml:8:5: adapters[2]: missing required key \"type\"",
               "t.yaml:8:11: adapters[2].name: found \"bad name\", expected an adapter name of 1 to 64 letters, digits, '_', '-' or '.'");
        EXPECT(BASE "adapters:\n  - modbus\n",
               "t.yaml:4:5: adapters[0]: found \"modbus\", expected a mapping with the keys type, name and the adapter's own");
}

/* Several errors in one file are all reported, in file order. */
static void test_many_errors(void) {
        EXPECT("hub:\n"
               "  host_name: gateway\n"
               "  host_aliasses: []\n"
               "state_dir: relative\n"
               "log:\n"
               "  level: loud\n"
               "store:\n"
               "  stall_timeout: 1y\n"
               "  check_on_start: 2\n",
               "t.yaml:3:3: hub.host_aliasses: unknown key \"host_aliasses\" (did you mean \"host_aliases\"?); expected one of: host_name, host_aliases, policies, x509_ca_files",
               "t.yaml:2:14: hub.host_name: found \"gateway\", expected a host name containing at least one dot",
               "t.yaml:4:12: state_dir: found \"relative\", expected an absolute path",
               "t.yaml:6:10: log.level: found \"loud\", expected one of: emerg, alert, crit, err, warning, notice, info, debug",
               "t.yaml:8:18: store.stall_timeout: found \"1y\", expected a duration such as 250ms, 5s, 10min, 2h, 7d",
               "t.yaml:9:19: store.check_on_start: found \"2\", expected a boolean (true/false, yes/no, on/off)");

        /* The collector keeps 100 messages and counts the rest. */
        struct adp_conf_errors e = {};
        for (int i = 0; i < 130; i++)
                adp_conf_error(&e, NULL, "error %d", i);
        ASSERT_EQ(adp_conf_errors_count(&e), 101);
        ASSERT_EQ(adp_conf_errors_total(&e), 130);
        ASSERT_STREQ(adp_conf_errors_get(&e, 0), "error 0");
        ASSERT_STREQ(adp_conf_errors_get(&e, 99), "error 99");
        ASSERT_STREQ(adp_conf_errors_get(&e, 100), "30 more errors");
        ASSERT_NULL(adp_conf_errors_get(&e, 101));
        adp_conf_errors_done(&e);
        ASSERT_EQ(adp_conf_errors_count(&e), 0);
}

/* ---- the tree itself -------------------------------------------------------------------- */

static void test_tree(void) {
        static const char text[] =
                "adapters:\n"
                "  - name: a\n"
                "    devices:\n"
                "      - id: d0\n"
                "      - id: d1\n"
                "        points: [{type: u16}, {type: \"null\", x: null, y: ~, z: }]\n"
                "quoted: 'null'\n"
                "forced: !!str null\n";
        struct adp_conf_errors e = {};
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *root = NULL;

        ASSERT_OK(adp_conf_load_string("tree.yaml", text, strlen(text), &root, &e));
        ASSERT_EQ(adp_conf_errors_count(&e), 0);
        ASSERT_EQ(adp_conf_kind(root), ADP_CONF_MAP);
        ASSERT_STREQ(adp_conf_path(root), "");

        const struct adp_conf_node *p = adp_conf_at(adp_conf_get(adp_conf_at(adp_conf_get(adp_conf_at(adp_conf_get(root, "adapters"), 0), "devices"), 1), "points"), 1);
        ASSERT_NOT_NULL(p);
        ASSERT_STREQ(adp_conf_path(p), "adapters[0].devices[1].points[1]");
        const struct adp_conf_node *t = adp_conf_get(p, "type");
        ASSERT_STREQ(adp_conf_path(t), "adapters[0].devices[1].points[1].type");
        ASSERT_STREQ(adp_conf_file(t), "tree.yaml");
        ASSERT_EQ(adp_conf_line(t), 6);
        ASSERT_EQ(adp_conf_column(t), 38);
        ASSERT_STREQ(adp_conf_scalar(t), "null");
        ASSERT_EQ(adp_conf_kind(t), ADP_CONF_SCALAR);
        ASSERT_STREQ(adp_conf_key(t), "type");
        ASSERT_TRUE(adp_conf_is_null(adp_conf_get(p, "x")));
        ASSERT_TRUE(adp_conf_is_null(adp_conf_get(p, "y")));
        ASSERT_TRUE(adp_conf_is_null(adp_conf_get(p, "z")));
        ASSERT_NULL(adp_conf_scalar(adp_conf_get(p, "x")));
        ASSERT_EQ(adp_conf_len(p), 4);
        ASSERT_STREQ(adp_conf_key_at(p, 3), "z");
        ASSERT_EQ(adp_conf_column(adp_conf_key_node_at(p, 3)), 61);
        ASSERT_STREQ(adp_conf_scalar(adp_conf_get(root, "quoted")), "null");
        ASSERT_STREQ(adp_conf_scalar(adp_conf_get(root, "forced")), "null");
        ASSERT_NULL(adp_conf_at(p, 4));
        ASSERT_NULL(adp_conf_key_at(adp_conf_get(root, "adapters"), 0));

        /* Typed readers on an adapter-style subtree. */
        static const char dev[] = "port: 70000\nunit: 0x11\nmax: 10 kb\nbuf: 64MiB\nscale: 0.5\nlate: 1h30m\nlist: [1s, 2]\n";
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *d = NULL;
        int64_t i64 = -1;
        uint64_t u = 0;
        double dbl = 0;
        const struct adp_conf_node *seq = NULL;

        ASSERT_OK(adp_conf_load_string("dev.yaml", dev, strlen(dev), &d, &e));
        ASSERT_ERR(adp_conf_get_int(d, "port", true, 1, 65535, &e, &i64), -EINVAL);
        ASSERT_EQ(i64, -1);
        ASSERT_OK(adp_conf_get_int(d, "unit", true, 0, 255, &e, &i64));
        ASSERT_EQ(i64, 17);
        ASSERT_ERR(adp_conf_get_size(d, "max", true, 0, UINT64_MAX, &e, &u), -EINVAL);
        ASSERT_OK(adp_conf_get_size(d, "buf", true, 0, UINT64_MAX, &e, &u));
        ASSERT_EQ(u, 64 * 1024 * 1024);
        ASSERT_ERR(adp_conf_get_size(d, "buf", true, 0, 1024 * 1024, &e, &u), -EINVAL);
        ASSERT_OK(adp_conf_get_double(d, "scale", true, 0, 1, &e, &dbl));
        ASSERT_TRUE(dbl == 0.5);
        ASSERT_OK(adp_conf_get_duration(d, "late", true, 0, UINT64_MAX, &e, &u));
        ASSERT_EQ(u, UINT64_C(5400000000));
        ASSERT_ERR(adp_conf_get_duration(d, "absent", false, 0, UINT64_MAX, &e, &u), -ENOENT);
        ASSERT_ERR(adp_conf_get_uint(d, "absent", true, 0, 10, &e, &u), -EINVAL);
        ASSERT_OK(adp_conf_get_seq(d, "list", true, &e, &seq));
        ASSERT_OK(adp_conf_parse_duration(adp_conf_at(seq, 0), 0, UINT64_MAX, &e, &u));
        ASSERT_ERR(adp_conf_parse_duration(adp_conf_at(seq, 1), 0, UINT64_MAX, &e, &u), -EINVAL);
        ASSERT_ERR(adp_conf_get_map(d, "port", true, &e, &seq), -EINVAL);
        check_errors(__LINE__, &e, (const char *const[]) {
                "dev.yaml:1:7: port: found 70000, expected an integer from 1 to 65535",
                "dev.yaml:3:6: max: found \"10 kb\", expected a size such as 4096, 10kB, 512KiB, 64MiB, 1GB (units B, kB, KiB, MB, MiB, GB, GiB, TB, TiB)",
                "dev.yaml:4:6: buf: found 64MiB, expected a size from 0B to 1MiB",
                "dev.yaml:1:1: missing required key \"absent\"",
                "dev.yaml:7:12: list[1]: found \"2\", expected a duration with a unit (us, ms, s, min, h, d) such as 250ms, 5s, 10min, 2h, 7d",
                "dev.yaml:1:7: port: found \"70000\", expected a mapping",
                NULL });
        adp_conf_errors_done(&e);

        /* Booleans, YAML 1.1 style. */
        static const char bools[] = "a: Yes\nb: off\nc: TRUE\nd: n\n";
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *bn = NULL;
        bool bv = false;
        ASSERT_OK(adp_conf_load_string("b.yaml", bools, strlen(bools), &bn, &e));
        ASSERT_OK(adp_conf_get_bool(bn, "a", true, &e, &bv));
        ASSERT_TRUE(bv);
        ASSERT_OK(adp_conf_get_bool(bn, "b", true, &e, &bv));
        ASSERT_FALSE(bv);
        ASSERT_OK(adp_conf_get_bool(bn, "c", true, &e, &bv));
        ASSERT_TRUE(bv);
        ASSERT_ERR(adp_conf_get_bool(bn, "d", true, &e, &bv), -EINVAL);
        ASSERT_EQ(adp_conf_errors_count(&e), 1);
        adp_conf_errors_done(&e);

        /* Missing and unreadable files. */
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *none = NULL;
        ASSERT_ERR(adp_conf_load_file("/nonexistent/fieldhub.yaml", &none, &e), -ENOENT);
        ASSERT_ERR(adp_conf_load_file(tmp, &none, &e), -EISDIR);
        _cleanup_free_ char *dirmsg = xasprintf("%s: found a directory, expected a YAML file", tmp);
        check_errors(__LINE__, &e, (const char *const[]) {
                "/nonexistent/fieldhub.yaml: cannot open: No such file or directory", dirmsg, NULL });
        adp_conf_errors_done(&e);
}

static void test_units(void) {
        static const struct {
                const char *s;
                int r;
                uint64_t v;
        } durations[] = {
                { "250ms", 0, 250000 },
                { "5s", 0, 5000000 },
                { "10min", 0, 600000000 },
                { "10m", 0, 600000000 },
                { "2h", 0, UINT64_C(7200000000) },
                { "7d", 0, UINT64_C(604800000000) },
                { "1h30m", 0, UINT64_C(5400000000) },
                { "1h 30min", 0, UINT64_C(5400000000) },
                { "100us", 0, 100 },
                { "0s", 0, 0 },
                { "5", -EDOM, 0 },
                { "0", -EDOM, 0 },
                { "", -EINVAL, 0 },
                { "s", -EINVAL, 0 },
                { "5 parsecs", -EINVAL, 0 },
                { "1.5h", -EINVAL, 0 },
                { "-5s", -EINVAL, 0 },
                { "1h30", -EINVAL, 0 },
                { "5S", -EINVAL, 0 },
                { "99999999999999999999s", -ERANGE, 0 },
                { "300000000d", -ERANGE, 0 },
        };
        for (size_t i = 0; i < ELEMENTSOF(durations); i++) {
                uint64_t v = 12345;
                int r = adp_parse_duration(durations[i].s, &v);
                if (r != durations[i].r || (r == 0 && v != durations[i].v) || (r < 0 && v != 12345))
                        TEST_FAIL("adp_parse_duration(\"%s\") = %d, %" PRIu64, durations[i].s, r, v);
        }

        static const struct {
                const char *s;
                int r;
                uint64_t v;
        } sizes[] = {
                { "64MiB", 0, UINT64_C(67108864) },
                { "10kB", 0, 10000 },
                { "10 KiB", 0, 10240 },
                { "4096", 0, 4096 },
                { "1GB", 0, UINT64_C(1000000000) },
                { "2GiB", 0, UINT64_C(2147483648) },
                { "7B", 0, 7 },
                { "10 kb", -EINVAL, 0 },
                { "10K", -EINVAL, 0 },
                { "1.5GB", -EINVAL, 0 },
                { "MiB", -EINVAL, 0 },
                { "", -EINVAL, 0 },
                { "-1", -EINVAL, 0 },
                { "5MiBs", -EINVAL, 0 },
                { "99999999999TiB", -ERANGE, 0 },
        };
        for (size_t i = 0; i < ELEMENTSOF(sizes); i++) {
                uint64_t v = 12345;
                int r = adp_parse_size(sizes[i].s, &v);
                if (r != sizes[i].r || (r == 0 && v != sizes[i].v) || (r < 0 && v != 12345))
                        TEST_FAIL("adp_parse_size(\"%s\") = %d, %" PRIu64, sizes[i].s, r, v);
        }

        char buf[64];
        ASSERT_STREQ(adp_format_duration(UINT64_C(5400000000), buf, sizeof buf), "1h30min");
        ASSERT_STREQ(adp_format_duration(250000, buf, sizeof buf), "250ms");
        ASSERT_STREQ(adp_format_duration(0, buf, sizeof buf), "0s");
        ASSERT_STREQ(adp_format_size(UINT64_C(67108864), buf, sizeof buf), "64MiB");
        ASSERT_STREQ(adp_format_size(10000, buf, sizeof buf), "10kB");
        ASSERT_STREQ(adp_format_size(1001, buf, sizeof buf), "1001B");
        ASSERT_EQ(adp_edit_distance("hots_name", "host_name"), 2);
        ASSERT_EQ(adp_edit_distance("Store", "store"), 0);

        ASSERT_EQ(gw_log_level_from_string("info"), LOG_INFO);
        ASSERT_EQ(gw_log_level_from_string("7"), LOG_DEBUG);
        ASSERT_ERR(gw_log_level_from_string("8"), -EINVAL);
        ASSERT_ERR(gw_log_level_from_string("verbose"), -EINVAL);
        ASSERT_STREQ(gw_log_level_to_string(LOG_WARNING), "warning");
        ASSERT_NULL(gw_log_level_to_string(8));
        ASSERT_TRUE(gw_host_name_is_valid("a-b.c"));
        ASSERT_FALSE(gw_host_name_is_valid("a-.c"));
        ASSERT_FALSE(gw_host_name_is_valid("a.c."));
        char long_label[80];
        memset(long_label, 'a', 64);
        strcpy(long_label + 64, ".b");
        ASSERT_FALSE(gw_host_name_is_valid(long_label));
        long_label[1] = '.';
        ASSERT_TRUE(gw_host_name_is_valid(long_label));
}

/* ---- the good path ---------------------------------------------------------------------- */

static void test_defaults(void) {
        struct adp_conf_errors e = {};
        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        _cleanup_free_ char *p = write_file("min.yaml", BASE, 0644);

        ASSERT_OK(gw_config_load(p, NULL, &c, &e));
        ASSERT_EQ(adp_conf_errors_count(&e), 0);
        ASSERT_STREQ(c->host_name, "gw.example.local");
        ASSERT_NULL(c->host_aliases[0]);
        ASSERT_STREQ(c->state_dir, FIELDHUB_STATE_DIR);
        ASSERT_EQ(c->log_level, LOG_INFO);
        ASSERT_EQ(c->log_target, GW_LOG_TARGET_AUTO);
        ASSERT_EQ(c->log_rate_interval_usec, 30 * 1000000);
        ASSERT_EQ(c->log_rate_burst, 10);
        ASSERT_EQ(c->store_stall_timeout_usec, 10 * 1000000);
        ASSERT_FALSE(c->store_check_on_start);
        ASSERT_STREQ(c->admin_socket, FIELDHUB_ADMIN_SOCKET);
        ASSERT_EQ(c->n_policy_keys, 0);
        ASSERT_EQ(c->n_adapters, 0);
        ASSERT_STREQ(c->sources[0], p);
        ASSERT_NULL(c->sources[1]);

        /* Empty sections and a null log: defaults too. */
        EXPECT_OK(BASE "log:\nstore: {}\nadapters:\n");

        /* No service API, no metrics listener, hub-core's queue defaults. */
        ASSERT_FALSE(c->api_enabled);
        ASSERT_NULL(c->metrics_listen);
        ASSERT_EQ(c->c2d_max_queue_depth, 0);
        ASSERT_EQ(c->api_idle_timeout_usec, GW_CONFIG_API_IDLE_TIMEOUT_DEFAULT_USEC);
}

static void test_service_api(void) {
        struct adp_conf_errors e = {};
        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        _cleanup_free_ char *p = write_file("api.yaml",
                BASE "service_api:\n  listen: [\"127.0.0.1:0\", \"[::1]:8443\"]\n  limits:\n    idle_timeout: 5s\n"
                     "    max_body_bytes: 64KiB\nmetrics:\n  listen: localhost:9100\n"
                     "c2d:\n  default_ttl: 2h\n  max_queue_depth: 7\nfeedback:\n  lock_timeout: 30s\n", 0644);

        ASSERT_OK(gw_config_load(p, NULL, &c, &e));
        ASSERT_TRUE(c->api_enabled);
        ASSERT_STREQ(c->api_listen[0], "127.0.0.1:0");
        ASSERT_STREQ(c->api_listen[1], "[::1]:8443");
        ASSERT_NULL(c->api_listen[2]);
        ASSERT_NULL(c->api_cert_file);
        ASSERT_EQ(c->api_idle_timeout_usec, 5 * 1000000);
        ASSERT_EQ(c->api_max_body_bytes, 64 * 1024);
        ASSERT_EQ(c->api_max_header_bytes, GW_CONFIG_API_MAX_HEADER_BYTES_DEFAULT);
        ASSERT_STREQ(c->metrics_listen, "localhost:9100");
        ASSERT_EQ(c->c2d_default_ttl_usec, UINT64_C(7200) * 1000000);
        ASSERT_EQ(c->c2d_max_queue_depth, 7);
        ASSERT_EQ(c->feedback_lock_timeout_usec, 30 * 1000000);

        /* Default listen address when the section is there without one. */
        gw_config_free(TAKE_PTR(c));
        _cleanup_free_ char *p2 = write_file("api2.yaml", BASE "service_api: {}\n", 0644);
        ASSERT_OK(gw_config_load(p2, NULL, &c, &e));
        ASSERT_STREQ(c->api_listen[0], GW_CONFIG_API_LISTEN_DEFAULT);
        ASSERT_NULL(c->api_listen[1]);

        EXPECT(BASE "service_api:\n  listen: [\"example.com:443\"]\n",
               "t.yaml:4:12: service_api.listen[0]: found \"example.com:443\", expected an address:port with an IP literal or localhost, e.g. \"0.0.0.0:443\", \"[::]:443\" or \"127.0.0.1:9100\"");
        EXPECT(BASE "service_api:\n  tls:\n    cert_file: /a.pem\n",
               "t.yaml:5:5: service_api.tls: found only cert_file, expected both cert_file and key_file (or neither: a certificate is then generated in the state directory)");
        EXPECT(BASE "service_api:\n  limits:\n    idle_timout: 5s\n",
               "t.yaml:5:5: service_api.limits.idle_timout: unknown key \"idle_timout\" (did you mean \"idle_timeout\"?); expected one of: max_connections, max_connections_per_address, handshake_timeout, idle_timeout, request_timeout, max_header_bytes, max_body_bytes");
        EXPECT(BASE "metrics:\n  listen: 0.0.0.0:9100\n",
               "t.yaml:4:11: metrics.listen: found the non-loopback address \"0.0.0.0:9100\", expected a loopback address (the metrics listener has no authentication; set allow_non_loopback: true to expose it anyway)");
        EXPECT_OK(BASE "metrics:\n  listen: 0.0.0.0:9100\n  allow_non_loopback: true\n");
        EXPECT(BASE "c2d:\n  default_ttl: 2h\n  max_ttl: 1h\n",
               "t.yaml:5:12: c2d.max_ttl: found a max_ttl shorter than default_ttl (7200 s), expected at least default_ttl");

        /* The HTTP device API and file upload (api/api-device.c). */
        gw_config_free(TAKE_PTR(c));
        ASSERT_OK(gw_config_load(p2, NULL, &c, &e));
        ASSERT_TRUE(c->api_client_cert_optional);
        ASSERT_TRUE(c->http_device_enabled);
        ASSERT_EQ(c->http_device_max_messages_per_second, GW_CONFIG_HTTP_DEVICE_MAX_MESSAGES_PER_SECOND_DEFAULT);
        ASSERT_EQ(c->file_upload_quota_bytes, GW_CONFIG_FILE_UPLOAD_QUOTA_DEFAULT);
        ASSERT_EQ(c->file_upload_max_concurrent, GW_CONFIG_FILE_UPLOAD_MAX_CONCURRENT_DEFAULT);
        gw_config_free(TAKE_PTR(c));
        _cleanup_free_ char *p3 = write_file("api3.yaml",
                BASE "service_api:\n  tls:\n    client_cert: none\nhttp_device:\n  enabled: false\n  limits:\n"
                     "    max_messages_per_second: 0\n    max_shaping_delay: 250ms\n"
                     "file_upload:\n  quota: 2GiB\n  max_file: 1MiB\n  sas_ttl: 5min\n  max_concurrent: 3\n", 0644);
        ASSERT_OK(gw_config_load(p3, NULL, &c, &e));
        ASSERT_FALSE(c->api_client_cert_optional);
        ASSERT_FALSE(c->http_device_enabled);
        ASSERT_EQ(c->http_device_max_messages_per_second, 0);
        ASSERT_EQ(c->http_device_max_shaping_delay_usec, 250000);
        ASSERT_EQ(c->file_upload_quota_bytes, UINT64_C(2) << 30);
        ASSERT_EQ(c->file_upload_max_file_bytes, 1 << 20);
        ASSERT_EQ(c->file_upload_sas_ttl_usec, UINT64_C(300) * 1000000);
        ASSERT_EQ(c->file_upload_max_concurrent, 3);
        EXPECT(BASE "file_upload:\n  max_concurrent: 0\n",
               "t.yaml:4:19: file_upload.max_concurrent: found 0, expected an integer from 1 to 100");
        EXPECT(BASE "service_api:\n  tls:\n    client_cert: required\n",
               "t.yaml:5:18: service_api.tls.client_cert: found \"required\", expected one of: none, optional");
}

static void test_full(void) {
        struct adp_conf_errors e = {};
        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        _cleanup_free_ char *k1 = write_file("owner.key", GOOD_KEY "\n", 0600);
        _cleanup_free_ char *k2 = write_file("owner2.key", GOOD_KEY " \r\n\n", 0640);
        _cleanup_free_ char *k3 = write_file("svc.key", "MDEyMzQ1Njc4OWFiY2RlZg==", 0400);
        _cleanup_free_ char *text = xasprintf(
                "hub:\n"
                "  host_name: gw.example.local\n"
                "  host_aliases:\n"
                "    - myhub.azure-devices.net\n"
                "    - gw.lan\n"
                "  policies:\n"
                "    - name: iothubowner\n"
                "      key_file: %s\n"
                "      secondary_key_file: %s\n"
                "    - name: service\n"
                "      key_file: %s\n"
                "state_dir: /srv/fieldhub\n"
                "log:\n"
                "  level: debug\n"
                "  target: stderr\n"
                "  rate_limit:\n"
                "    interval: 1min\n"
                "    burst: 0x20\n"
                "store:\n"
                "  stall_timeout: 1min30s\n"
                "  check_on_start: yes\n"
                "admin:\n"
                "  socket: /run/fh/admin.sock\n"
                "adapters: []\n",
                k1, k2, k3);
        _cleanup_free_ char *p = write_file("full.yaml", text, 0644);

        ASSERT_OK(gw_config_load(p, "/nonexistent/conf.d", &c, &e));
        ASSERT_EQ(adp_conf_errors_count(&e), 0);
        ASSERT_STREQ(c->host_aliases[0], "myhub.azure-devices.net");
        ASSERT_STREQ(c->host_aliases[1], "gw.lan");
        ASSERT_NULL(c->host_aliases[2]);
        ASSERT_EQ(c->n_policy_keys, 2);
        ASSERT_STREQ(c->policy_keys[0].name, "iothubowner");
        ASSERT_STREQ(c->policy_keys[0].primary_key, GOOD_KEY);
        ASSERT_STREQ(c->policy_keys[0].secondary_key, GOOD_KEY);
        ASSERT_STREQ(c->policy_keys[1].name, "service");
        ASSERT_STREQ(c->policy_keys[1].primary_key, "MDEyMzQ1Njc4OWFiY2RlZg==");
        ASSERT_NULL(c->policy_keys[1].secondary_key);
        ASSERT_STREQ(c->state_dir, "/srv/fieldhub");
        ASSERT_EQ(c->log_level, LOG_DEBUG);
        ASSERT_EQ(c->log_target, GW_LOG_TARGET_STDERR);
        ASSERT_EQ(c->log_rate_interval_usec, 60 * 1000000);
        ASSERT_EQ(c->log_rate_burst, 32);
        ASSERT_EQ(c->store_stall_timeout_usec, 90 * 1000000);
        ASSERT_TRUE(c->store_check_on_start);
        ASSERT_STREQ(c->admin_socket, "/run/fh/admin.sock");
}

/* ---- secrets ---------------------------------------------------------------------------- */

/* Loads a config whose single policy has the given key lines; returns the errors. */
static int load_policy(const char *key_lines, struct adp_conf_errors *e, char **ret_path) {
        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        _cleanup_free_ char *text = xasprintf(BASE "  policies:\n    - name: iothubowner\n%s", key_lines);
        char *p = write_file("policy.yaml", text, 0644);
        int r = gw_config_load(p, NULL, &c, e);
        *ret_path = p;
        return r;
}

static void test_secrets(void) {
        static const char *const contents[] = { "SECRETVALUE-not-base64!", "c2hvcnQ=", GOOD_KEY };
        struct adp_conf_errors e = {};
        _cleanup_free_ char *k644 = write_file("k644.key", contents[2], 0644);
        _cleanup_free_ char *k602 = write_file("k602.key", contents[2], 0602);
        _cleanup_free_ char *kbad = write_file("kbad.key", contents[0], 0600);
        _cleanup_free_ char *kshort = write_file("kshort.key", contents[1], 0600);
        _cleanup_free_ char *klong = write_file("klong.key", GOOD_KEY GOOD_KEY GOOD_KEY, 0600);
        _cleanup_free_ char *kempty = write_file("kempty.key", " \n\n", 0600);
        char *big = calloc(1, 5000);
        memset(big, 'A', 4999);
        _cleanup_free_ char *kbig = write_file("kbig.key", big, 0600);
        free(big);
        char *p = NULL, *lines, *want;

#define SECRET_CASE(keyfile, msgfmt, ...)                                                     \
        do {                                                                                  \
                lines = xasprintf("      key_file: %s\n", keyfile);                           \
                ASSERT_ERR(load_policy(lines, &e, &p), -EINVAL);                              \
                want = xasprintf("%s:5:17: hub.policies[0].key_file: " msgfmt, p, __VA_ARGS__); \
                check_errors(__LINE__, &e, (const char *const[]) { want, NULL });             \
                for (size_t _i = 0; _i < adp_conf_errors_count(&e); _i++)                     \
                        for (size_t _j = 0; _j < ELEMENTSOF(contents); _j++)                  \
                                ASSERT_NULL(strstr(adp_conf_errors_get(&e, _i), contents[_j])); \
                adp_conf_errors_done(&e);                                                     \
                free(lines);                                                                  \
                free(want);                                                                   \
                free(p);                                                                      \
        } while (0)

        SECRET_CASE(k644, "\"%s\" is readable by others (mode 0644); chmod o-rwx it", k644);
        SECRET_CASE(k602, "\"%s\" is writable by others (mode 0602); chmod o-rwx it", k602);
        SECRET_CASE(kbad, "the key in \"%s\" is not valid base64, expected a base64 key of 16 to 64 bytes", kbad);
        SECRET_CASE(kshort, "the key in \"%s\" is 5 bytes once decoded, expected a base64 key of 16 to 64 bytes", kshort);
        SECRET_CASE(klong, "the key in \"%s\" is not valid base64, expected a base64 key of 16 to 64 bytes", klong);
        SECRET_CASE(kempty, "\"%s\" is empty, expected a secret", kempty);
        SECRET_CASE(kbig, "\"%s\" is larger than 4096 bytes, expected a short secret", kbig);
        SECRET_CASE(tmp, "\"%s\" is not a regular file, expected a secret file", tmp);

        /* A key longer than 64 bytes once decoded (one line, valid base64). */
        _cleanup_free_ char *k88 = write_file("k88.key", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+P0BB", 0600);
        SECRET_CASE(k88, "the key in \"%s\" is longer than 64 bytes, expected a base64 key of 16 to 64 bytes", k88);

        /* Credentials: $CREDENTIALS_DIRECTORY/name. */
        _cleanup_free_ char *kgood = write_file("owner.cred", GOOD_KEY "\n", 0400);
        ASSERT_OK(unsetenv("CREDENTIALS_DIRECTORY"));
        ASSERT_ERR(load_policy("      key_credential: owner.cred\n", &e, &p), -EINVAL);
        want = xasprintf("%s:5:23: hub.policies[0].key_credential: credential \"owner.cred\" cannot be read: $CREDENTIALS_DIRECTORY is not set (use LoadCredential=owner.cred:/path in the service unit, or key_file:)", p);
        check_errors(__LINE__, &e, (const char *const[]) { want, NULL });
        adp_conf_errors_done(&e);
        free(want);
        free(p);

        ASSERT_OK(setenv("CREDENTIALS_DIRECTORY", tmp, 1));
        ASSERT_ERR(load_policy("      key_credential: ../owner.cred\n      secondary_key_credential: absent.cred\n", &e, &p), -EINVAL);
        check_errors(__LINE__, &e, (const char *const[]) {
                tf("%s:5:23: hub.policies[0].key_credential: found \"../owner.cred\", expected a credential name (without '/')", p),
                tf("%s:6:33: hub.policies[0].secondary_key_credential: credential \"absent.cred\" does not exist, expected a readable secret file", p),
                NULL });
        adp_conf_errors_done(&e);
        free(p);

        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        _cleanup_free_ char *text = xasprintf(BASE "  policies:\n    - name: registryRead\n      key_credential: owner.cred\n");
        p = write_file("cred.yaml", text, 0644);
        ASSERT_OK(gw_config_load(p, NULL, &c, &e));
        ASSERT_EQ(c->n_policy_keys, 1);
        ASSERT_STREQ(c->policy_keys[0].name, "registryRead");
        ASSERT_STREQ(c->policy_keys[0].primary_key, GOOD_KEY);
        free(p);
        ASSERT_OK(unsetenv("CREDENTIALS_DIRECTORY"));

        /* Duplicate policies; the inline secret never echoes the value. */
        _cleanup_free_ char *text2 = xasprintf(BASE "  policies:\n    - name: device\n      key_file: %s\n    - name: device\n      key_file: %s\n      secondary_key: SECRETVALUE-not-base64!\n", kgood, kgood);
        p = write_file("dup.yaml", text2, 0644);
        c = gw_config_free(c);
        ASSERT_ERR(gw_config_load(p, NULL, &c, &e), -EINVAL);
        check_errors(__LINE__, &e, (const char *const[]) {
                tf("%s:6:13: hub.policies[1].name: duplicate policy \"device\", expected each policy once", p),
                tf("%s:8:22: hub.policies[1].secondary_key: secrets are never written in the configuration; use secondary_key_file: or secondary_key_credential:", p),
                NULL });
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                ASSERT_NULL(strstr(adp_conf_errors_get(&e, i), contents[0]));
        adp_conf_errors_done(&e);
        free(p);
#undef SECRET_CASE
}

/* ---- conf.d ----------------------------------------------------------------------------- */

static void test_confd(void) {
        struct adp_conf_errors e = {};
        _cleanup_(gw_config_freep) struct gw_config *c = NULL;
        _cleanup_free_ char *dir = xasprintf("%s/etc", tmp);
        _cleanup_free_ char *confd = xasprintf("%s/etc/conf.d", tmp);
        ASSERT_OK(mkdir(dir, 0755));
        ASSERT_OK(mkdir(confd, 0755));

        _cleanup_free_ char *main_path = write_file("etc/fieldhub.yaml",
                                                    BASE "  host_aliases: [a.example]\nlog:\n  level: info\n", 0644);
        _cleanup_free_ char *fa = write_file("etc/conf.d/10-a.yaml",
                                             "hub:\n  host_aliases: [b.example]\nlog:\n  level: debug\n  target: stderr\n", 0644);
        _cleanup_free_ char *fb = write_file("etc/conf.d/20-b.yaml",
                                             "hub:\n  host_aliases:\n    - c.example\nlog:\n  level: warning\n", 0644);
        free(write_file("etc/conf.d/30-c.yml", "this: is ignored: (not .yaml)\n", 0644));
        free(write_file("etc/conf.d/.hidden.yaml", "ignored: [\n", 0644));

        ASSERT_OK(gw_config_load(main_path, NULL, &c, &e));
        ASSERT_EQ(adp_conf_errors_count(&e), 0);
        ASSERT_EQ(c->log_level, LOG_WARNING);           /* 20-b overrides 10-a overrides main */
        ASSERT_EQ(c->log_target, GW_LOG_TARGET_STDERR); /* from 10-a, untouched by 20-b */
        ASSERT_STREQ(c->host_aliases[0], "a.example");  /* sequences are appended in order */
        ASSERT_STREQ(c->host_aliases[1], "b.example");
        ASSERT_STREQ(c->host_aliases[2], "c.example");
        ASSERT_NULL(c->host_aliases[3]);
        ASSERT_STREQ(c->sources[0], main_path);
        ASSERT_STREQ(c->sources[1], fa);
        ASSERT_STREQ(c->sources[2], fb);
        ASSERT_NULL(c->sources[3]);
        /* Appended items keep their own file and position, with renumbered paths. */
        const struct adp_conf_node *al = adp_conf_get(adp_conf_get(c->tree, "hub"), "host_aliases");
        const struct adp_conf_node *third = adp_conf_at(al, 2);
        ASSERT_STREQ(adp_conf_path(third), "hub.host_aliases[2]");
        ASSERT_STREQ(adp_conf_file(third), fb);
        ASSERT_EQ(adp_conf_line(third), 3);
        ASSERT_EQ(adp_conf_column(third), 7);
        const struct adp_conf_node *lvl = adp_conf_get(adp_conf_get(c->tree, "log"), "level");
        ASSERT_STREQ(adp_conf_file(lvl), fb);
        c = gw_config_free(c);

        /* An error in a fragment points at the fragment's own file:line:col. */
        free(write_file("etc/conf.d/20-b.yaml", "hub:\n  host_aliases:\n    - c.example\n    - bad_alias.example\nstore:\n  stall_timeout: 1 fortnight\n", 0644));
        ASSERT_ERR(gw_config_load(main_path, NULL, &c, &e), -EINVAL);
        check_errors(__LINE__, &e, (const char *const[]) {
                tf("%s:4:7: hub.host_aliases[3]: found \"bad_alias.example\", expected a host name: labels of 1 to 63 letters, digits or '-' (not starting or ending with '-'), at most 253 characters", fb),
                tf("%s:6:18: store.stall_timeout: found \"1 fortnight\", expected a duration such as 250ms, 5s, 10min, 2h, 7d", fb),
                NULL });
        adp_conf_errors_done(&e);

        /* A kind mismatch, a syntax error in another fragment: both reported. */
        free(write_file("etc/conf.d/20-b.yaml", "log: debug\nhub:\n  host_aliases:\n    x: y\n", 0644));
        _cleanup_free_ char *fd = write_file("etc/conf.d/40-d.yaml", "store:\n  - a\n b\n", 0644);
        ASSERT_ERR(gw_config_load(main_path, NULL, &c, &e), -EINVAL);
        check_errors(__LINE__, &e, (const char *const[]) {
                tf("%s:1:6: log: found \"debug\", expected a mapping to merge with %s:5:3", fb, main_path),
                tf("%s:4:5: hub.host_aliases: found a mapping, expected a sequence to merge with %s:3:17", fb, main_path),
                tf("%s:3:2: did not find expected key (while parsing a block mapping at line 1, column 1)", fd),
                NULL });
        adp_conf_errors_done(&e);
        ASSERT_OK(unlink(fd));

        /* An explicit conf.d directory that is not a directory is an error; a missing one is fine. */
        ASSERT_ERR(gw_config_load(main_path, main_path, &c, &e), -ENOTDIR);
        check_errors(__LINE__, &e, (const char *const[]) {
                tf("%s: cannot read the conf.d directory: Not a directory", main_path), NULL });
        adp_conf_errors_done(&e);
        ASSERT_OK(gw_config_load(main_path, "/nonexistent/conf.d", &c, &e));
        ASSERT_EQ(c->log_level, LOG_INFO);
        c = gw_config_free(c);

        /* A missing main file. */
        _cleanup_free_ char *missing = xasprintf("%s/missing.yaml", tmp);
        ASSERT_ERR(gw_config_load(missing, NULL, &c, &e), -ENOENT);
        check_errors(__LINE__, &e, (const char *const[]) {
                tf("%s: cannot open: No such file or directory", missing), NULL });
        adp_conf_errors_done(&e);

        /* Merging at the tree level: a null base takes the overlay; a null overlay changes nothing. */
        _cleanup_(adp_conf_node_freep) struct adp_conf_node *base = NULL;
        struct adp_conf_node *ov = NULL;
        ASSERT_OK(adp_conf_load_string("base.yaml", "", 0, &base, &e));
        ASSERT_OK(adp_conf_load_string("ov.yaml", "a: 1\n", 5, &ov, &e));
        ASSERT_OK(adp_conf_merge(base, ov, &e));
        ASSERT_STREQ(adp_conf_scalar(adp_conf_get(base, "a")), "1");
        ASSERT_OK(adp_conf_load_string("ov2.yaml", "", 0, &ov, &e));
        ASSERT_OK(adp_conf_merge(base, ov, &e));
        ASSERT_OK(adp_conf_load_string("ov3.yaml", "a: 2\nb: [x]\n", 12, &ov, &e));
        ASSERT_OK(adp_conf_merge(base, ov, &e));
        ASSERT_STREQ(adp_conf_scalar(adp_conf_get(base, "a")), "2");
        ASSERT_STREQ(adp_conf_file(adp_conf_get(base, "a")), "ov3.yaml");
        ASSERT_STREQ(adp_conf_path(adp_conf_at(adp_conf_get(base, "b"), 0)), "b[0]");
        ASSERT_EQ(adp_conf_errors_count(&e), 0);
}

/* Every configuration we ship loads without errors. */
static void test_shipped(void) {
        const char *src = getenv("FIELDHUB_SRCDIR");
        static const char *const files[] = { "fieldhub.yaml", "demo.yaml" };

        if (!src) {
                fprintf(stderr, "FIELDHUB_SRCDIR not set, skipping the shipped configs\n");
                return;
        }
        for (size_t i = 0; i < ELEMENTSOF(files); i++) {
                struct adp_conf_errors e = {};
                _cleanup_(gw_config_freep) struct gw_config *c = NULL;
                _cleanup_free_ char *p = xasprintf("%s/configs/%s", src, files[i]);
                int r = gw_config_load(p, "/nonexistent/conf.d", &c, &e);
                if (r < 0) {
                        dump_errors(&e);
                        TEST_FAIL("%s: %d", p, r);
                }
                ASSERT_EQ(adp_conf_errors_count(&e), 0);
                ASSERT_TRUE(strchr(c->host_name, '.') != NULL);
        }
}

/* Every fixture in tests/unit/configs/: good-*.yaml load, bad-*.yaml fail with the error in
 * the matching bad-*.err (with @ standing for the file's path). */
static void test_fixtures(void) {
        const char *src = getenv("FIELDHUB_SRCDIR");
        if (!src)
                return;
        _cleanup_free_ char *dir = xasprintf("%s/tests/unit/configs", src);
        struct dirent **ents = NULL;
        int k = scandir(dir, &ents, NULL, alphasort);
        ASSERT_TRUE(k >= 0);
        int n = 0;
        for (int i = 0; i < k; i++) {
                const char *name = ents[i]->d_name;
                size_t l = strlen(name);
                if (l > 5 && streq(name + l - 5, ".yaml")) {
                        struct adp_conf_errors e = {};
                        struct gw_config *c = NULL;
                        _cleanup_free_ char *p = xasprintf("%s/%s", dir, name);
                        int r = gw_config_load(p, "/nonexistent/conf.d", &c, &e);
                        gw_config_free(c);
                        if (strncmp(name, "good-", 5) == 0) {
                                if (r < 0) {
                                        dump_errors(&e);
                                        TEST_FAIL("%s: %d", p, r);
                                }
                        } else {
                                _cleanup_free_ char *errp = xasprintf("%s/%.*s.err", dir, (int) (l - 5), name);
                                FILE *f = fopen(errp, "re");
                                if (!f)
                                        TEST_FAIL("%s: missing expected-error file", errp);
                                char line[1024];
                                const char *want[32];
                                size_t nw = 0;
                                while (nw < 31 && fgets(line, sizeof line, f)) {
                                        line[strcspn(line, "\n")] = 0;
                                        char *at = strchr(line, '@');
                                        want[nw++] = at ? xasprintf("%.*s%s%s", (int) (at - line), line, p, at + 1)
                                                        : strdup(line);
                                }
                                fclose(f);
                                want[nw] = NULL;
                                ASSERT_ERR(r, -EINVAL);
                                check_errors(__LINE__, &e, want);
                                for (size_t j = 0; j < nw; j++)
                                        free((char *) want[j]);
                        }
                        adp_conf_errors_done(&e);
                        n++;
                }
                free(ents[i]);
        }
        free(ents);
        ASSERT_TRUE(n >= 4);
}

int main(void) {
        test_tmpdir(tmp, sizeof tmp);
        TEST_RUN(test_syntax);
        TEST_RUN(test_service_api);
        TEST_RUN(test_schema_errors);
        TEST_RUN(test_many_errors);
        TEST_RUN(test_tree);
        TEST_RUN(test_units);
        TEST_RUN(test_defaults);
        TEST_RUN(test_full);
        TEST_RUN(test_secrets);
        TEST_RUN(test_confd);
        TEST_RUN(test_shipped);
        TEST_RUN(test_fixtures);
        test_rmdir(tmp);
        for (size_t i = 0; i < n_pool; i++)
                free(pool[i]);
        return 0;
}
