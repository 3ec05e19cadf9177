/* SPDX-License-Identifier: MIT */
/* The Modbus adapter's configuration (point maps, profiles, transports, positioned errors)
 * and its request plan (coalescing within the function limits and the configured gap). */

#include <string.h>

#include "modbus-internal.h"
#include "test-util.h"

static struct adp_modbus_config *parse(const char *yaml, struct adp_conf_errors *e, int expect) {
        struct adp_conf_node *tree = NULL;
        struct adp_modbus_config *c = NULL;
        ASSERT_OK(adp_conf_load_string("t.yaml", yaml, strlen(yaml), &tree, e));
        int r = adp_modbus_config_parse(tree, &c, e);
        for (size_t i = 0; r != expect && i < adp_conf_errors_count(e); i++)
                fprintf(stderr, "  %s\n", adp_conf_errors_get(e, i));
        ASSERT_EQ(r, expect);
        adp_conf_node_free(tree);
        return c;
}

static bool has_error(struct adp_conf_errors *e, const char *needle) {
        for (size_t i = 0; i < adp_conf_errors_count(e); i++)
                if (strstr(adp_conf_errors_get(e, i), needle))
                        return true;
        for (size_t i = 0; i < adp_conf_errors_count(e); i++)
                fprintf(stderr, "  have: %s\n", adp_conf_errors_get(e, i));
        return false;
}

static void test_coalescing(void) {
        struct adp_conf_errors e = { 0 };
        /* Holding 0,1 (int16,uint16), 10..11 (int32), 26..27: each within gap 16 → one read 0..27.
         * 200: too far → a second read. Coils 0 and 5 → one FC1 read of 6 bits. 300..: a
         * 1-second group of its own. */
        struct adp_modbus_config *c = parse("type: modbus\nname: m\ndevices:\n"
                                            "  - name: d1\n    tcp: {host: 127.0.0.1, port: 1502}\n    max_gap: 16\n"
                                            "    poll_interval: 2s\n"
                                            "    points:\n"
                                            "      - {name: a, table: holding_register, address: 0, type: int16}\n"
                                            "      - {name: b, table: holding_register, address: 1}\n"
                                            "      - {name: c, table: holding_register, address: 10, type: int32}\n"
                                            "      - {name: d, table: holding_register, address: 26, type: float32}\n"
                                            "      - {name: e, table: holding_register, address: 200}\n"
                                            "      - {name: f, table: coil, address: 0}\n"
                                            "      - {name: g, table: coil, address: 5}\n"
                                            "      - {name: h, table: holding_register, address: 300, interval: 1s}\n",
                                            &e, 0);
        ASSERT_EQ(c->n_devices, 1);
        struct adp_modbus_device *d = c->devices[0];
        ASSERT_EQ(d->n_points, 8);
        ASSERT_EQ(d->n_groups, 2);
        struct adp_modbus_group *g = &d->groups[0];
        ASSERT_EQ(g->interval_usec, 2000000);
        ASSERT_STREQ(g->name, "2s");
        ASSERT_EQ(g->n_reqs, 3);
        /* Sorted by table: coils first. */
        ASSERT_EQ(g->reqs[0].table, ADP_MODBUS_COIL);
        ASSERT_EQ(g->reqs[0].start, 0);
        ASSERT_EQ(g->reqs[0].count, 6);
        ASSERT_EQ(g->reqs[1].table, ADP_MODBUS_HOLDING_REGISTER);
        ASSERT_EQ(g->reqs[1].start, 0);
        ASSERT_EQ(g->reqs[1].count, 28);
        ASSERT_EQ(g->reqs[1].n_points, 4);
        ASSERT_EQ(g->reqs[2].start, 200);
        ASSERT_EQ(g->reqs[2].count, 1);
        ASSERT_EQ(d->groups[1].n_reqs, 1);
        ASSERT_EQ(d->groups[1].reqs[0].start, 300);
        adp_modbus_config_free(c);

        /* Gap 0: only contiguous ranges join; the 125-register limit splits long runs. */
        char yaml[16384];
        int o = snprintf(yaml, sizeof yaml, "type: modbus\nname: m\ndevices:\n  - name: d1\n    tcp: {host: h}\n"
                                            "    max_gap: 0\n    points:\n");
        for (int i = 0; i < 130; i++)
                o += snprintf(yaml + o, sizeof yaml - (size_t) o,
                              "      - {name: p%d, table: input_register, address: %d, type: float32}\n", i, 2 * i);
        c = parse(yaml, &e, 0);
        g = &c->devices[0]->groups[0];
        ASSERT_EQ(g->n_reqs, 3); /* 260 registers: 124 + 124 + 12, never a float split */
        ASSERT_EQ(g->reqs[0].count, 124);
        ASSERT_EQ(g->reqs[1].start, 124);
        ASSERT_EQ(g->reqs[2].count, 12);
        adp_modbus_config_free(c);

        /* max_registers caps a request for devices with small buffers. */
        c = parse("type: modbus\nname: m\ndevices:\n  - name: d1\n    tcp: {host: h}\n    max_registers: 4\n"
                  "    points:\n      - {name: a, table: holding_register, address: 0, type: int64}\n"
                  "      - {name: b, table: holding_register, address: 4, type: int16}\n",
                  &e, 0);
        ASSERT_EQ(c->devices[0]->groups[0].n_reqs, 2);
        adp_modbus_config_free(c);
        adp_conf_errors_done(&e);
}

static void test_profiles_and_entities(void) {
        struct adp_conf_errors e = { 0 };
        struct adp_modbus_config *c = parse(
                "type: modbus\nname: m\nprofiles:\n  meter:\n    byte_order: CDAB\n    points:\n"
                "      - {name: energy, entity: \"400011\", type: uint32, unit: kWh, writable: true}\n"
                "      - {name: volts, entity: \"30001\", scale: 0.1}\n"
                "devices:\n"
                "  - {name: m1, rtu: {device: /dev/ttyX, baud: 9600}, unit: 1, profile: meter}\n"
                "  - {name: m2, rtu: {device: /dev/ttyX, baud: 9600}, unit: 2, profile: meter}\n",
                &e, 0);
        ASSERT_EQ(c->n_devices, 2);
        for (int i = 0; i < 2; i++) {
                struct adp_modbus_device *d = c->devices[i];
                ASSERT_EQ(d->unit, i + 1);
                ASSERT_STREQ(d->profile, "meter");
                ASSERT_EQ(d->points[0].table, ADP_MODBUS_HOLDING_REGISTER);
                ASSERT_EQ(d->points[0].address, 10);
                ASSERT_EQ(d->points[0].order, ADP_MODBUS_CDAB);
                ASSERT_TRUE(d->points[0].writable);
                ASSERT_EQ(d->points[1].table, ADP_MODBUS_INPUT_REGISTER);
                ASSERT_EQ(d->points[1].address, 0);
                ASSERT_STREQ(d->line.key, "rtu:/dev/ttyX");
                ASSERT_EQ(d->line.parity, 'E');
        }
        /* Same profile, different unit: the hash differs only through the device's own keys. */
        ASSERT_TRUE(c->devices[0]->hash != c->devices[1]->hash);
        adp_modbus_config_free(c);
        adp_conf_errors_done(&e);
}

static void test_errors(void) {
        struct adp_conf_errors e = { 0 };
        struct adp_modbus_config *c = parse(
                "type: modbus\nname: m\nprofiles:\n  p: {points: [{name: x, table: coil, address: 0}]}\n"
                "devices:\n"
                "  - name: a\n    tcp: {host: h}\n    points:\n"
                "      - {name: v, table: holding_register, address: 70000}\n"     /* 9 */
                "      - {name: w, table: coil, address: 1, type: int16}\n"         /* 10 */
                "      - {name: x, entity: \"40001\", table: coil}\n"              /* 11 */
                "      - {name: y, entity: \"20001\"}\n"                            /* 12 */
                "      - {name: z, table: input_register, address: 1, writable: true}\n" /* 13 */
                "      - {name: s, table: holding_register, address: 1, type: string}\n"
                "      - {name: t, table: holding_register, address: 2, typo: 1}\n"
                "      - {name: u, table: holding_register, address: 3}\n"
                "      - {name: u, table: holding_register, address: 4}\n"
                "  - {name: b, rtu: {device: /dev/ttyX, baud: 9600}, profile: p}\n"
                "  - {name: b2, tcp: {host: h}, profile: nope}\n"
                "  - {name: c, rtu: {device: /dev/ttyX, baud: 19200}, unit: 2, profile: p}\n"
                "  - {name: d, tcp: {host: h}, rtu: {device: /dev/ttyY}, profile: p}\n",
                &e, -EINVAL);
        ASSERT_NULL(c);
        ASSERT_TRUE(has_error(&e, "t.yaml:9:"));
        ASSERT_TRUE(has_error(&e, "devices[0].points[0].address"));
        ASSERT_TRUE(has_error(&e, "expected bool: a coil holds single bits"));
        ASSERT_TRUE(has_error(&e, "entity \"40001\" is a holding_register, but table says coil"));
        ASSERT_TRUE(has_error(&e, "found 20001, expected a Modbus entity number"));
        ASSERT_TRUE(has_error(&e, "a input_register is read-only"));
        ASSERT_TRUE(has_error(&e, "devices[0].points[5]: missing required key \"length\""));
        ASSERT_TRUE(has_error(&e, "duplicate point name \"u\""));
        ASSERT_TRUE(has_error(&e, "typo"));
        ASSERT_TRUE(has_error(&e, "unknown profile \"nope\", expected one of: p"));
        ASSERT_TRUE(has_error(&e, "different line settings"));
        ASSERT_TRUE(has_error(&e, "both tcp and rtu given"));
        adp_conf_errors_done(&e);

        c = parse("type: modbus\nname: m\ndevices:\n"
                  "  - {name: a, tcp: {host: h, port: 502}, unit: 3, points: [{name: p, table: coil, address: 0}]}\n"
                  "  - {name: b, tcp: {host: h, port: 502}, unit: 3, points: [{name: p, table: coil, address: 0}]}\n"
                  "  - {name: a, tcp: {host: h2}, points: [{name: p, table: coil, address: 0}]}\n"
                  "  - {name: e, rtu: {device: relative}, unit: 0, points: [{name: p, table: coil, address: 0}]}\n",
                  &e, -EINVAL);
        ASSERT_TRUE(has_error(&e, "has unit 3, like device \"a\""));
        ASSERT_TRUE(has_error(&e, "duplicate device name \"a\""));
        ASSERT_TRUE(has_error(&e, "expected an absolute device path"));
        ASSERT_TRUE(has_error(&e, "devices[3].unit"));
        adp_conf_errors_done(&e);
}

int main(void) {
        TEST_RUN(test_coalescing);
        TEST_RUN(test_profiles_and_entities);
        TEST_RUN(test_errors);
        return 0;
}
