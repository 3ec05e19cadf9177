/* SPDX-License-Identifier: MIT */
/* Fuzzes the serial framers, checks and decoders: the first byte picks a device
 * configuration (one per framing, with checks and text and binary decoders), the second
 * the read size, the rest is the byte stream from the port. Every frame is checked, matched
 * and decoded as the adapter does; the inter-character timeout fires at the end. */

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "serial-internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const configs[] = {
        "framing: {type: line, delimiter: '\\r\\n', max_length: 80}\n"
        "check: {type: xor8, encoding: hex, from: 1, to: -3}\n"
        "messages:\n"
        "  - {name: a, match: {prefix: '$GPGGA'}, decode: regex, regex: '^\\$GPGGA,(?<t>[0-9.]*),(?<x>[^,]*),', types: {t: string}}\n"
        "  - {name: b, match: {prefix: '$GPRMC'}, decode: csv, columns: [null, t, s, lat], types: {lat: {type: number, scale: 0.01}}}\n"
        "  - {name: c, decode: kv, pair_separator: ';', types: {n: int, f: bool}}\n",
        "framing: {type: length, sync: '\\xAA\\x55', length_offset: 2, length_size: 2, length_adjust: 2, max_length: 64, idle_timeout: 10ms}\n"
        "check: {type: crc16-modbus}\n"
        "messages:\n"
        "  - name: m\n    match: {offset: 4, byte: 1}\n    decode: binary\n    fields:\n"
        "      - {name: a, offset: 5, type: i16, byte_order: little, scale: 0.1}\n"
        "      - {name: b, offset: -4, type: u16, bit: 3, bits: 5}\n"
        "      - {name: c, offset: 7, type: f64}\n"
        "      - {name: d, offset: 6, type: bcd, length: 3}\n"
        "      - {name: e, offset: 5, type: string, length: 6}\n"
        "  - {name: n, decode: none}\n",
        "framing: {type: fixed, length: 9, sync: '\\x7E'}\ncheck: {type: sum8, from: 0}\n"
        "messages:\n  - {name: m, decode: binary, fields: [{name: a, offset: 1, type: u64}, {name: h, offset: 1, type: hex, length: 7}]}\n",
        "framing: {type: markers, start: '\\x02', end: '\\x03', escape: '\\x10', escape_xor: 0x20, max_length: 40}\n"
        "check: {type: crc16-ccitt-false}\nmessages:\n  - {name: m, decode: binary, fields: [{name: a, offset: 0, type: i32}]}\n",
        "framing: {type: markers, start: '\\x7E', end: '\\x7E', max_length: 40}\n"
        "messages:\n  - {name: m, decode: kv}\n",
        "framing: {type: slip, max_length: 40}\ncheck: {type: crc32, position: 0, from: 4, to: 40}\n"
        "messages:\n  - {name: m, decode: binary, fields: [{name: a, offset: 4, type: f32, byte_order: little}]}\n",
        "framing: {type: cobs, max_length: 40}\ncheck: {type: crc16-xmodem}\n"
        "messages:\n  - {name: m, decode: regex, regex: '(?<all>.*)'}\n",
        "framing: {type: idle, idle_timeout: 5ms, max_length: 16}\ncheck: {type: lrc}\n"
        "messages:\n  - {name: m, decode: csv, separator: ';', columns: [a, b, c]}\n",
        "framing: {type: length, length_offset: 0, length_size: 1, length_counts: frame, max_length: 32}\n"
        "messages:\n  - {name: m, decode: binary, fields: [{name: a, offset: 1, type: i24}]}\n",
};

#define N_CONFIGS (sizeof configs / sizeof configs[0])
static struct adp_serial_config *parsed[N_CONFIGS];

static int on_frame(void *ud, const uint8_t *frame, size_t len) {
        const struct adp_serial_device_conf *d = ud;
        if (adp_serial_check_verify(&d->check, frame, len) < 0)
                return -EBADMSG;
        int i = adp_serial_match(d->messages, d->n_messages, frame, len);
        if (i < 0)
                return 0;
        json_t *o = NULL;
        if (adp_serial_decode(&d->messages[i], NULL, frame, len, &o) >= 0) {
                char *s = json_dumps(o, JSON_COMPACT);
                if (!s)
                        abort(); /* decoded values must always serialise */
                free(s);
                json_decref(o);
        }
        return 0;
}

static const struct adp_serial_device_conf *device(size_t k) {
        if (!parsed[k]) {
                char yaml[4096];
                struct adp_conf_errors e = { 0 };
                struct adp_conf_node *root = NULL;
                snprintf(yaml, sizeof yaml,
                         "type: serial\nname: f\ndevices:\n  - name: d\n    port: {device: /dev/null}\n%s", configs[k]);
                /* indent the device body */
                char body[4096], *o = body;
                const char *s = yaml;
                for (; *s; s++) {
                        *o++ = *s;
                        if (*s == '\n' && s > yaml + 50 && s[1])
                                o += sprintf(o, "    ");
                }
                *o = 0;
                if (adp_conf_load_string("fuzz.yaml", body, strlen(body), &root, &e) < 0 ||
                    adp_serial_config_parse(root, &parsed[k], &e) < 0) {
                        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                                fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
                        abort(); /* the fuzzer's own configs must be valid */
                }
                adp_conf_node_free(root);
                adp_conf_errors_done(&e);
        }
        return &parsed[k]->devices[0];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size < 2)
                return 0;
        const struct adp_serial_device_conf *d = device(data[0] % N_CONFIGS);
        size_t chunk = (size_t) (data[1] % 64) + 1;
        struct adp_serial_stream s;
        if (adp_serial_stream_init(&s, &d->framing, NULL) < 0)
                return 0;
        data += 2;
        size -= 2;
        while (size > 0) {
                size_t k = chunk < size ? chunk : size;
                (void) adp_serial_stream_feed(&s, data, k, on_frame, (void *) d);
                data += k;
                size -= k;
        }
        adp_serial_stream_idle(&s, on_frame, (void *) d);
        adp_serial_stream_done(&s);
        return 0;
}
