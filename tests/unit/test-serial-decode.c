/* SPDX-License-Identifier: MIT */
/* The serial decoders, parsed from YAML as a user writes them: regex with named groups,
 * key=value, CSV, binary fields of every type and byte order with bit fields and scaling,
 * message selection, command templates, the example plugin, and config errors. */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "adp-serial.h"
#include "serial-internal.h"
#include "test-util.h"

static struct adp_serial_config *parse(const char *yaml, struct adp_conf_errors *e) {
        struct adp_conf_node *root = NULL;
        struct adp_serial_config *c = NULL;
        ASSERT_OK(adp_conf_load_string("t.yaml", yaml, strlen(yaml), &root, e));
        int r = adp_serial_config_parse(root, &c, e);
        adp_conf_node_free(root);
        return r < 0 ? NULL : c;
}

static json_t *decode(const struct adp_serial_device_conf *d, const void *frame, size_t len, const char *want_kind) {
        int i = adp_serial_match(d->messages, d->n_messages, frame, len);
        ASSERT_TRUE(i >= 0);
        ASSERT_STREQ(d->messages[i].name, want_kind);
        json_t *o = NULL;
        ASSERT_OK(adp_serial_decode(&d->messages[i], NULL, frame, len, &o));
        return o;
}

#define NUM(o, k) json_number_value(json_object_get((o), (k)))

static void test_text(void) {
        struct adp_conf_errors e = { 0 };
        struct adp_serial_config *c = parse(
                "type: serial\nname: t\ndevices:\n"
                "  - name: d\n    port: {device: /dev/null}\n    framing: {type: line}\n"
                "    messages:\n"
                "      - name: gga\n        match: {prefix: '$GPGGA'}\n        decode: regex\n"
                "        regex: '^\\$GPGGA,(?<utc>[0-9.]*),(?<lat>[0-9.]*),(?<ns>[NS]),(?<missing>X)?'\n"
                "        types: {utc: string, lat: {type: number, scale: 0.01}}\n"
                "      - name: kv\n        match: {prefix: 'T='}\n        decode: kv\n        pair_separator: ';'\n"
                "        types: {C: int, flag: bool}\n"
                "      - name: csv\n        decode: csv\n        separator: '\\t'\n        columns: [a, null, c, d]\n",
                &e);
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
        ASSERT_NOT_NULL(c);
        const struct adp_serial_device_conf *d = &c->devices[0];
        const char *gga = "$GPGGA,092750.000,5321.6802,N,00630.3372";
        json_t *o = decode(d, gga, strlen(gga), "gga");
        ASSERT_STREQ(json_string_value(json_object_get(o, "utc")), "092750.000");
        ASSERT_TRUE(fabs(NUM(o, "lat") - 53.216802) < 1e-9);
        ASSERT_STREQ(json_string_value(json_object_get(o, "ns")), "N");
        ASSERT_TRUE(json_is_null(json_object_get(o, "missing")));
        json_decref(o);
        /* No match of the regex: the frame is refused, not forwarded. */
        json_t *x = NULL;
        ASSERT_ERR(adp_serial_decode(&d->messages[0], NULL, (const uint8_t *) "$GPGGA,x", 8, &x), -EBADMSG);

        o = decode(d, "T=21.5; C = 7;flag=Y;name=abc;empty=", 36, "kv");
        ASSERT_TRUE(fabs(NUM(o, "T") - 21.5) < 1e-12);
        ASSERT_EQ(json_integer_value(json_object_get(o, "C")), 7);
        ASSERT_TRUE(json_is_true(json_object_get(o, "flag")));
        ASSERT_STREQ(json_string_value(json_object_get(o, "name")), "abc");
        ASSERT_TRUE(json_is_null(json_object_get(o, "empty")));
        json_decref(o);

        o = decode(d, "1\tskip\t-3.25", 12, "csv");
        ASSERT_EQ(json_integer_value(json_object_get(o, "a")), 1);
        ASSERT_TRUE(NUM(o, "c") == -3.25);
        ASSERT_NULL(json_object_get(o, "skip"));
        ASSERT_TRUE(json_is_null(json_object_get(o, "d")));
        json_decref(o);
        adp_serial_config_free(c);
        adp_conf_errors_done(&e);
}

static void test_binary(void) {
        struct adp_conf_errors e = { 0 };
        struct adp_serial_config *c = parse(
                "type: serial\nname: t\ndevices:\n"
                "  - name: d\n    port: {device: /dev/null}\n    framing: {type: fixed, length: 40}\n"
                "    messages:\n"
                "      - name: other\n        match: {offset: 1, byte: 0x02}\n        decode: none\n"
                "      - name: m\n        match: {offset: 1, byte: 0x01}\n        decode: binary\n        fields:\n"
                "          - {name: u8, offset: 2}\n"
                "          - {name: i8, offset: 3, type: i8}\n"
                "          - {name: u16be, offset: 4, type: u16}\n"
                "          - {name: i16le, offset: 6, type: i16, byte_order: little}\n"
                "          - {name: i24, offset: 8, type: i24}\n"
                "          - {name: u32le, offset: 11, type: u32, byte_order: little}\n"
                "          - {name: i32, offset: 15, type: i32}\n"
                "          - {name: f32, offset: 19, type: f32}\n"
                "          - {name: f64le, offset: 23, type: f64, byte_order: little}\n"
                "          - {name: flag, offset: 2, type: u8, bit: 7}\n"
                "          - {name: nib, offset: 2, type: u8, bit: 4, bits: 3}\n"
                "          - {name: snib, offset: 3, type: i8, bit: 0, bits: 4}\n"
                "          - {name: scaled, offset: 6, type: i16, byte_order: little, scale: 0.1, add: 100}\n"
                "          - {name: bcd, offset: 31, type: bcd, length: 2}\n"
                "          - {name: s, offset: 33, type: string, length: 4}\n"
                "          - {name: last, offset: -1, type: u8}\n"
                "          - {name: ok, offset: 37, type: bool}\n",
                &e);
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
        ASSERT_NOT_NULL(c);
        uint8_t f[40] = { 0 };
        f[1] = 0x01;
        f[2] = 0xD5;                            /* 213: flag 1, nib 5 */
        f[3] = 0xFE;                            /* -2, low nibble 0xE = -2 */
        f[4] = 0xBE, f[5] = 0xEF;               /* 48879 */
        f[6] = 0x18, f[7] = 0xFC;               /* -1000 LE */
        f[8] = 0xFF, f[9] = 0xFF, f[10] = 0xFE; /* -2 */
        f[11] = 0x00, f[12] = 0x5E, f[13] = 0xD0, f[14] = 0xB2; /* 3000000000 LE */
        f[15] = 0xF8, f[16] = 0xA4, f[17] = 0x32, f[18] = 0xEB; /* -123456789 */
        f[19] = 0x41, f[20] = 0xAD, f[21] = 0x99, f[22] = 0x9A; /* 21.7f (21.700000762939453) */
        double pi = 3.141592653589793;
        memcpy(f + 23, &pi, 8);                 /* little endian host */
        f[31] = 0x12, f[32] = 0x34;
        memcpy(f + 33, "AB  ", 4);
        f[37] = 1;
        f[39] = 0x42;
        json_t *o = decode(&c->devices[0], f, sizeof f, "m");
        ASSERT_EQ(json_integer_value(json_object_get(o, "u8")), 213);
        ASSERT_EQ(json_integer_value(json_object_get(o, "i8")), -2);
        ASSERT_EQ(json_integer_value(json_object_get(o, "u16be")), 48879);
        ASSERT_EQ(json_integer_value(json_object_get(o, "i16le")), -1000);
        ASSERT_EQ(json_integer_value(json_object_get(o, "i24")), -2);
        ASSERT_EQ(json_integer_value(json_object_get(o, "u32le")), 3000000000LL);
        ASSERT_EQ(json_integer_value(json_object_get(o, "i32")), -123456789);
        ASSERT_TRUE(NUM(o, "f32") == 21.7); /* the decimal the instrument meant */
        ASSERT_TRUE(NUM(o, "f64le") == pi);
        ASSERT_TRUE(json_is_true(json_object_get(o, "flag")));
        ASSERT_EQ(json_integer_value(json_object_get(o, "nib")), 5);
        ASSERT_EQ(json_integer_value(json_object_get(o, "snib")), -2);
        ASSERT_TRUE(fabs(NUM(o, "scaled") - 0.0) < 1e-9);
        ASSERT_EQ(json_integer_value(json_object_get(o, "bcd")), 1234);
        ASSERT_STREQ(json_string_value(json_object_get(o, "s")), "AB");
        ASSERT_EQ(json_integer_value(json_object_get(o, "last")), 0x42);
        ASSERT_TRUE(json_is_true(json_object_get(o, "ok")));
        json_decref(o);
        /* Selection by type byte; a frame too short for its fields is refused. */
        f[1] = 0x02;
        json_decref(decode(&c->devices[0], f, sizeof f, "other"));
        f[1] = 0x01;
        json_t *x = NULL;
        ASSERT_ERR(adp_serial_decode(&c->devices[0].messages[1], NULL, f, 20, &x), -EBADMSG);
        f[1] = 0x09;
        ASSERT_EQ(adp_serial_match(c->devices[0].messages, 2, f, sizeof f), -1);
        adp_serial_config_free(c);
        adp_conf_errors_done(&e);
}

static void test_commands(void) {
        struct adp_conf_errors e = { 0 };
        struct adp_serial_config *c = parse(
                "type: serial\nname: t\ndevices:\n"
                "  - name: d\n    port: {device: /dev/null}\n    framing: {type: line, delimiter: '\\r'}\n"
                "    check: {type: xor8, encoding: hex, from: 1, to: -3}\n"
                "    messages: [{name: ack, decode: none}]\n"
                "    commands:\n"
                "      - {name: set, text: '$SET,{name},{v:%05.1f},{{x}},{n:%X}*', check: true, reply: {message: ack}}\n"
                "      - name: bin\n        binary: [{bytes: '\\x01\\x06'}, {arg: reg, type: u16}, "
                "{arg: val, type: i16, byte_order: little, scale: 0.1}]\n",
                &e);
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
        ASSERT_NOT_NULL(c);
        const struct adp_serial_device_conf *d = &c->devices[0];
        ASSERT_EQ(d->commands[0].reply_index, 0);
        uint8_t out[128];
        char why[256];
        json_t *args = json_pack("{s:s,s:f,s:i}", "name", "pump", "v", 2.5, "n", 255);
        ssize_t n = adp_serial_command_render(&d->commands[0], args, out, sizeof out, why, sizeof why);
        ASSERT_TRUE(n > 0);
        n = adp_serial_check_append(&d->check, out, (size_t) n, sizeof out);
        out[n] = 0;
        ASSERT_STREQ((char *) out, "$SET,pump,002.5,{x},FF*0D");
        ASSERT_OK(adp_serial_check_verify(&d->check, out, (size_t) n));
        json_decref(args);
        args = json_pack("{s:s}", "name", "x");
        ASSERT_ERR(adp_serial_command_render(&d->commands[0], args, out, sizeof out, why, sizeof why), -EINVAL);
        ASSERT_TRUE(strstr(why, "missing argument \"v\"") != NULL);
        json_decref(args);
        args = json_pack("{s:i,s:f}", "reg", 258, "val", -1.5);
        n = adp_serial_command_render(&d->commands[1], args, out, sizeof out, why, sizeof why);
        ASSERT_EQ(n, 6);
        ASSERT_TRUE(memcmp(out, "\x01\x06\x01\x02\xF1\xFF", 6) == 0);
        json_decref(args);
        args = json_pack("{s:i,s:f}", "reg", 70000, "val", 0.0);
        ASSERT_ERR(adp_serial_command_render(&d->commands[1], args, out, sizeof out, why, sizeof why), -EINVAL);
        ASSERT_TRUE(strstr(why, "out of range") != NULL);
        json_decref(args);
        adp_serial_config_free(c);
        adp_conf_errors_done(&e);
}

struct pctx {
        const struct adp_serial_message *m;
        void *st;
        json_t *last;
        int n;
};

static int plugin_frame(void *ud, const uint8_t *f, size_t len) {
        struct pctx *c = ud;
        json_decref(c->last);
        c->last = NULL;
        ASSERT_OK(adp_serial_decode(c->m, c->st, f, len, &c->last));
        c->n++;
        return 0;
}

static void test_plugin(void) {
        const char *bd = getenv("FIELDHUB_BUILDDIR");
        char yaml[2048];
        if (!bd) {
                fprintf(stderr, "FIELDHUB_BUILDDIR unset: skipping the plugin test\n");
                return;
        }
        snprintf(yaml, sizeof yaml,
                 "type: serial\nname: t\nplugins: {ex: %s/adapters/serial/fieldhub-serial-example.so}\ndevices:\n"
                 "  - name: d\n    port: {device: /dev/null}\n    framing: {type: plugin, plugin: ex}\n"
                 "    plugin_args: scale=0.5\n"
                 "    messages: [{name: tv, decode: plugin, plugin: ex}]\n"
                 "    commands: [{name: set, plugin: ex}]\n",
                 bd);
        struct adp_conf_errors e = { 0 };
        struct adp_serial_config *c = parse(yaml, &e);
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
        ASSERT_NOT_NULL(c);
        const struct adp_serial_device_conf *d = &c->devices[0];
        void *st = NULL;
        ASSERT_OK(d->plugin->create(d->plugin_args, &st));
        uint8_t cmd[16];
        ssize_t n = d->commands[0].plugin->encode(st, "set", "{\"tag\": 3, \"value\": -12}", cmd, sizeof cmd);
        ASSERT_EQ(n, 6);
        /* Frame it back through a stream, with garbage (and a false sync byte) ahead. */
        struct adp_serial_stream s;
        struct pctx ctx = { .m = &d->messages[0], .st = st };
        ASSERT_OK(adp_serial_stream_init(&s, &d->framing, st));
        uint8_t in[32] = { 0x00, 0xA5, 0x99, 0x13 };
        memcpy(in + 4, cmd, 6);
        memcpy(in + 10, cmd, 6);
        for (size_t i = 0; i < 16; i++)
                ASSERT_OK(adp_serial_stream_feed(&s, in + i, 1, plugin_frame, &ctx));
        ASSERT_EQ(ctx.n, 2);
        ASSERT_TRUE(NUM(ctx.last, "t3") == -6.0);
        ASSERT_EQ(json_integer_value(json_object_get(ctx.last, "sequence")), 2);
        json_decref(ctx.last);
        adp_serial_stream_done(&s);
        json_t *o = NULL;
        ASSERT_OK(adp_serial_decode(&d->messages[0], st, cmd, 6, &o));
        ASSERT_TRUE(NUM(o, "t3") == -6.0);
        ASSERT_EQ(json_integer_value(json_object_get(o, "sequence")), 3);
        json_decref(o);
        d->plugin->destroy(st);
        adp_serial_config_free(c);
        adp_conf_errors_done(&e);
        /* Bad arguments are refused at validation. */
        snprintf(yaml, sizeof yaml,
                 "type: serial\nname: t\nplugins: {ex: %s/adapters/serial/fieldhub-serial-example.so, "
                 "bad: /nonexistent.so}\ndevices:\n"
                 "  - name: d\n    port: {device: /dev/null}\n    framing: {type: plugin, plugin: ex}\n"
                 "    plugin_args: speed=3\n    messages: [{name: tv, decode: plugin, plugin: ex}]\n",
                 bd);
        ASSERT_NULL(parse(yaml, &e));
        ASSERT_EQ(adp_conf_errors_count(&e), 2);
        ASSERT_TRUE(strstr(adp_conf_errors_get(&e, 0), "t.yaml:3:") && strstr(adp_conf_errors_get(&e, 0), "cannot load plugin"));
        ASSERT_TRUE(strstr(adp_conf_errors_get(&e, 1), "refuses these arguments"));
        adp_conf_errors_done(&e);
}

static void test_errors(void) {
        struct adp_conf_errors e = { 0 };
        ASSERT_NULL(parse("type: serial\nname: t\ndevices:\n"
                          "  - name: d\n    port: {device: dev/ttyS0, baud: 9601, parity: space}\n"
                          "    framing: {type: lines, delimiter: '\\q'}\n"
                          "    check: {type: crc16}\n"
                          "    messages:\n"
                          "      - {name: a, decode: regex, regex: '(unclosed'}\n"
                          "      - {name: b, decode: binary, fields: [{name: x, offset: 0, type: u8, bit: 6, bits: 4}]}\n"
                          "    commands: [{name: c, text: 'X{v:%s}', reply: {message: nope}}]\n"
                          "    poll: [{command: zz, interval: 1s}]\n",
                          &e));
        const char *want[] = { "t.yaml:5:20: devices[0].port.device", "not a standard rate", "parity",
                               "framing.type", "check.type", "bad regular expression", "does not fit a u8",
                               "one printf conversion", "no message named \"nope\"", "no command named \"zz\"" };
        size_t n = adp_conf_errors_count(&e);
        for (size_t i = 0; i < ELEMENTSOF(want); i++) {
                bool found = false;
                for (size_t k = 0; k < n; k++)
                        found |= strstr(adp_conf_errors_get(&e, k), want[i]) != NULL;
                if (!found) {
                        for (size_t k = 0; k < n; k++)
                                fprintf(stderr, "  %s\n", adp_conf_errors_get(&e, k));
                        TEST_FAIL("no error mentioning \"%s\"", want[i]);
                }
        }
        adp_conf_errors_done(&e);
}

int main(void) {
        test_text();
        test_binary();
        test_commands();
        test_plugin();
        test_errors();
        return 0;
}
