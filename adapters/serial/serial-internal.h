/* SPDX-License-Identifier: MIT */
#pragma once

/* The serial adapter's internals: the parsed configuration, the framers (serial-frame.c),
 * the integrity checks (serial-check.c), the decoders (serial-decode.c), the command
 * templates (serial-command.c), the port (serial-tty.c) and plugins (serial-plugin.c).
 * Everything but serial.c and serial-tty.c is pure (no fds), so unit tests and the fuzzer
 * drive it directly. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "adapter/conf.h"
#include "adapter/serial-plugin.h"

struct json_t;
typedef struct pcre2_real_code_8 serial_pcre2_code;

#define ADP_SERIAL_BYTES_MAX 64u          /* delimiters, markers, prefixes, sync words */
#define ADP_SERIAL_FRAME_MAX (64u * 1024u)
#define ADP_SERIAL_MAX_FIELDS 256u

/* ---- bytes given in YAML ----------------------------------------------------------------
 * A string with C escapes: \r \n \t \0 \\ \xHH (two hex digits). Other bytes stand for
 * themselves. Returns 0, -EINVAL (bad escape), -E2BIG (over cap). */
int adp_serial_parse_bytes(const char *s, uint8_t *out, size_t cap, size_t *ret_len);

/* ---- integrity checks ------------------------------------------------------------------ */

enum adp_serial_check_type {
        ADP_SERIAL_CHECK_NONE,
        ADP_SERIAL_CHECK_SUM8,
        ADP_SERIAL_CHECK_XOR8,
        ADP_SERIAL_CHECK_LRC,           /* two's complement of the byte sum (Modbus ASCII) */
        ADP_SERIAL_CHECK_CRC16_MODBUS,
        ADP_SERIAL_CHECK_CRC16_CCITT_FALSE,
        ADP_SERIAL_CHECK_CRC16_XMODEM,
        ADP_SERIAL_CHECK_CRC32,
        _ADP_SERIAL_CHECK_MAX,
};

struct adp_serial_check {
        enum adp_serial_check_type type;
        int64_t position;       /* where the check value sits; < 0 counts from the frame's end */
        int64_t from;           /* coverage start; < 0 from the end */
        int64_t to;             /* coverage end (exclusive); < 0 from the end */
        bool to_set;            /* otherwise: up to the check value */
        bool little_endian;
        bool hex;               /* written as ASCII hex digits (NMEA's *hh) */
};

extern const char *const adp_serial_check_names[];
size_t adp_serial_check_width(enum adp_serial_check_type t);       /* bytes of the binary value */
uint32_t adp_serial_check_compute(enum adp_serial_check_type t, const uint8_t *p, size_t n);
/* 0 when the frame's check is right; -EBADMSG wrong; -ERANGE the frame is too short for
 * the declared positions. */
int adp_serial_check_verify(const struct adp_serial_check *c, const uint8_t *frame, size_t len);
/* Appends the check of buf[from..len) at the end (position must be the end); returns the new
 * length or -ENOBUFS / -ERANGE. */
ssize_t adp_serial_check_append(const struct adp_serial_check *c, uint8_t *buf, size_t len, size_t cap);

/* ---- framing ---------------------------------------------------------------------------- */

enum adp_serial_framing_type {
        ADP_SERIAL_FRAME_LINE,
        ADP_SERIAL_FRAME_FIXED,
        ADP_SERIAL_FRAME_LENGTH,
        ADP_SERIAL_FRAME_MARKERS,
        ADP_SERIAL_FRAME_SLIP,
        ADP_SERIAL_FRAME_COBS,
        ADP_SERIAL_FRAME_IDLE,
        ADP_SERIAL_FRAME_PLUGIN,
        _ADP_SERIAL_FRAME_MAX,
};
extern const char *const adp_serial_framing_names[];

struct adp_serial_framing {
        enum adp_serial_framing_type type;
        size_t max_length;
        uint64_t idle_usec;                     /* inter-character timeout; 0 = none */
        uint8_t delim[ADP_SERIAL_BYTES_MAX];    /* line */
        size_t delim_len;
        size_t fixed_length;                    /* fixed */
        uint8_t sync[ADP_SERIAL_BYTES_MAX];     /* fixed, length: every frame starts with these */
        size_t sync_len;
        size_t len_offset, len_size;            /* length */
        bool len_little_endian;
        bool len_counts_frame;                  /* the whole frame; else the bytes after the field */
        int64_t len_adjust;                     /* added to the value (e.g. the CRC not counted) */
        uint8_t start, end, escape, escape_xor; /* markers */
        bool has_start, has_escape;
        const struct adp_serial_plugin *plugin; /* plugin */
};

/* Statistics of one stream. */
struct adp_serial_stream_stats {
        uint64_t frames;        /* handed to the callback and accepted */
        uint64_t rejected;      /* handed and refused by the callback (check failed) */
        uint64_t oversize;      /* frames over max_length, dropped */
        uint64_t bad_encoding;  /* COBS/SLIP/escape errors, bad lengths */
        uint64_t garbage_bytes; /* bytes skipped while resynchronising */
        uint64_t idle_flushes;  /* partial frames ended by the inter-character timeout */
};

/* Called for each frame. Returns 0 (taken) or -EBADMSG (check failed: a positional framer
 * then resynchronises one byte further on, so a good frame hidden behind garbage that
 * looked like a header is not lost). */
typedef int (*adp_serial_frame_fn)(void *ud, const uint8_t *frame, size_t len);

struct adp_serial_stream {
        const struct adp_serial_framing *f;
        void *plugin_state;
        uint8_t *buf;
        size_t head, len, cap;
        size_t scan;            /* line/markers: bytes of the window already searched */
        bool discarding;        /* line/slip/cobs: dropping an oversize frame up to its end */
        uint8_t *out;           /* decoded frame (markers, SLIP, COBS) */
        struct adp_serial_stream_stats st;
};

int adp_serial_stream_init(struct adp_serial_stream *s, const struct adp_serial_framing *f, void *plugin_state);
void adp_serial_stream_done(struct adp_serial_stream *s);
/* Forgets buffered bytes (port reopened). */
void adp_serial_stream_reset(struct adp_serial_stream *s);
/* Feeds bytes; calls cb for every complete frame. Returns 0 or -ENOMEM. */
int adp_serial_stream_feed(struct adp_serial_stream *s, const uint8_t *data, size_t n, adp_serial_frame_fn cb, void *ud);
/* The inter-character timeout expired: type idle hands the buffered bytes over as a frame,
 * the other framers drop a partial frame. */
void adp_serial_stream_idle(struct adp_serial_stream *s, adp_serial_frame_fn cb, void *ud);
static inline size_t adp_serial_stream_pending(const struct adp_serial_stream *s) {
        return s->len - s->head;
}
/* Wraps a payload for the wire as the framing wants it (delimiter, SLIP, COBS, markers);
 * fixed/length/idle/plugin: unchanged. Returns bytes written to out, or -ENOBUFS. */
ssize_t adp_serial_frame_encode(const struct adp_serial_framing *f, const uint8_t *p, size_t n, uint8_t *out, size_t cap);
/* COBS primitives (exported for tests). Decode returns the length or -EBADMSG. */
ssize_t adp_serial_cobs_encode(const uint8_t *p, size_t n, uint8_t *out, size_t cap);
ssize_t adp_serial_cobs_decode(const uint8_t *p, size_t n, uint8_t *out, size_t cap);

/* ---- decoding --------------------------------------------------------------------------- */

enum adp_serial_decoder { ADP_SERIAL_DEC_REGEX, ADP_SERIAL_DEC_KV, ADP_SERIAL_DEC_CSV, ADP_SERIAL_DEC_BINARY,
                          ADP_SERIAL_DEC_PLUGIN, ADP_SERIAL_DEC_NONE, _ADP_SERIAL_DEC_MAX };
extern const char *const adp_serial_decoder_names[];

enum adp_serial_ftype {
        ADP_SERIAL_T_AUTO,      /* text: a number when the text is one, else a string */
        ADP_SERIAL_T_U8, ADP_SERIAL_T_I8, ADP_SERIAL_T_U16, ADP_SERIAL_T_I16, ADP_SERIAL_T_U24, ADP_SERIAL_T_I24,
        ADP_SERIAL_T_U32, ADP_SERIAL_T_I32, ADP_SERIAL_T_U64, ADP_SERIAL_T_I64, ADP_SERIAL_T_F32, ADP_SERIAL_T_F64,
        ADP_SERIAL_T_BOOL, ADP_SERIAL_T_STRING, ADP_SERIAL_T_BCD, ADP_SERIAL_T_HEX,
        ADP_SERIAL_T_NUMBER, ADP_SERIAL_T_INT, /* text only */
        _ADP_SERIAL_T_MAX,
};
extern const char *const adp_serial_ftype_names[];

struct adp_serial_field {
        char *name;
        enum adp_serial_ftype type;
        int64_t offset;         /* binary: byte offset; < 0 from the frame's end */
        size_t length;          /* string, bcd, hex: bytes */
        bool little_endian;
        int bit, bits;          /* bit field: bits [bit, bit+bits) of the integer; bits 0 = whole */
        double scale, add;
        bool scaled;            /* scale/add given: the value becomes a number */
};

struct adp_serial_message {
        char *name;
        uint8_t match[ADP_SERIAL_BYTES_MAX];
        size_t match_len;
        int64_t match_offset;
        bool has_match;
        enum adp_serial_decoder decoder;
        serial_pcre2_code *re;
        char *csv_sep, *pair_sep, *kv_sep;
        char **columns;         /* csv: name per column, NULL to skip */
        size_t n_columns;
        bool trim;              /* text: strip surrounding spaces of values */
        struct adp_serial_field *fields; /* binary: the field list; text: per-name types */
        size_t n_fields;
        const struct adp_serial_plugin *plugin;
        bool emit;              /* false: replies only, not telemetry */
};

void adp_serial_message_done(struct adp_serial_message *m);
/* The first message whose match fits the frame, or -1. */
int adp_serial_match(const struct adp_serial_message *msgs, size_t n, const uint8_t *frame, size_t len);
/* Decodes a frame into a new JSON object of fields. Returns 0, -EBADMSG (the frame does not
 * fit the declaration: regex no match, field out of range), -ENOMEM. */
int adp_serial_decode(const struct adp_serial_message *m, void *plugin_state, const uint8_t *frame, size_t len,
                      struct json_t **ret);

/* ---- commands --------------------------------------------------------------------------- */

struct adp_serial_tpl_item {
        uint8_t *bytes;         /* literal (NULL for an argument) */
        size_t n;
        char *arg;              /* argument name */
        char *fmt;              /* text: printf conversion for it ("%.2f"), NULL = natural */
        enum adp_serial_ftype type; /* binary argument */
        bool little_endian;
        double scale;
};

struct adp_serial_command {
        char *name;
        bool method, c2d;
        bool binary;
        struct adp_serial_tpl_item *items;
        size_t n_items;
        const struct adp_serial_plugin *plugin;
        bool append_check;
        char *reply;            /* expected reply message kind, NULL = none */
        int reply_index;
        uint64_t timeout_usec;
};

void adp_serial_command_done(struct adp_serial_command *c);
/* Renders the command's payload from args (a JSON object or NULL), without framing. Returns
 * the length, or -EINVAL with why filled (missing argument, wrong type), -ENOBUFS. */
ssize_t adp_serial_command_render(const struct adp_serial_command *c, const struct json_t *args, uint8_t *out,
                                  size_t cap, char *why, size_t why_size);

/* ---- plugins ---------------------------------------------------------------------------- */

struct adp_serial_plugin_handle {
        char *name, *path;
        void *dl;
        const struct adp_serial_plugin *p;
};
/* dlopen()s path and checks the ABI. On error, why says what is wrong. */
int adp_serial_plugin_load(const char *path, struct adp_serial_plugin_handle *h, char *why, size_t why_size);
void adp_serial_plugin_unload(struct adp_serial_plugin_handle *h);

/* ---- configuration ---------------------------------------------------------------------- */

enum adp_serial_flow { ADP_SERIAL_FLOW_NONE, ADP_SERIAL_FLOW_RTSCTS, ADP_SERIAL_FLOW_XONXOFF };

struct adp_serial_port_conf {
        char *device;
        unsigned baud, data_bits, stop_bits;
        char parity;            /* 'N', 'E', 'O' */
        enum adp_serial_flow flow;
        bool rs485;
        uint64_t reopen_min_usec, reopen_max_usec;
};

struct adp_serial_poll {
        int command;
        uint64_t interval_usec;
        char *args;             /* JSON text or NULL */
};

struct adp_serial_device_conf {
        char *name;
        struct adp_serial_port_conf port;
        struct adp_serial_framing framing;
        struct adp_serial_check check;
        struct adp_serial_message *messages;
        size_t n_messages;
        struct adp_serial_command *commands;
        size_t n_commands;
        struct adp_serial_poll *polls;
        size_t n_polls;
        const struct adp_serial_plugin *plugin; /* the device's plugin (state per device) */
        char *plugin_args;
        uint64_t report_usec;
};

struct adp_serial_config {
        struct adp_serial_plugin_handle *plugins;
        size_t n_plugins;
        struct adp_serial_device_conf *devices;
        size_t n_devices;
};

/* Parses and validates an adapter item; errors go to e. 0 or -EINVAL / -ENOMEM. */
int adp_serial_config_parse(const struct adp_conf_node *item, struct adp_serial_config **ret,
                            struct adp_conf_errors *e);
struct adp_serial_config *adp_serial_config_free(struct adp_serial_config *c);

/* ---- the port --------------------------------------------------------------------------- */

/* Opens and configures the port (non-blocking, exclusive, termios, RS-485). Returns the fd,
 * or -errno with why explaining it; -ENOTTY/-EINVAL/-EBUSY are not worth retrying soon. */
int adp_serial_tty_open(const struct adp_serial_port_conf *pc, char *why, size_t why_size);
