/* SPDX-License-Identifier: MIT */
#pragma once

/* The Modbus adapter's internals, shared by modbus.c (ops, workers), modbus-map.c (config,
 * point maps, request plans), modbus-frame.c (value codecs) and modbus-tcp.c / modbus-rtu.c
 * (transports). The unit tests include it too. */

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapter/adapter.h"
#include "adapter/conf.h"

/* ---- value codecs (modbus-frame.c) ------------------------------------------------------- */

enum adp_modbus_table {
        ADP_MODBUS_COIL,
        ADP_MODBUS_DISCRETE_INPUT,
        ADP_MODBUS_INPUT_REGISTER,
        ADP_MODBUS_HOLDING_REGISTER,
        _ADP_MODBUS_TABLE_MAX,
};

enum adp_modbus_type {
        ADP_MODBUS_BOOL,
        ADP_MODBUS_INT16,
        ADP_MODBUS_UINT16,
        ADP_MODBUS_INT32,
        ADP_MODBUS_UINT32,
        ADP_MODBUS_INT64,
        ADP_MODBUS_UINT64,
        ADP_MODBUS_FLOAT32,
        ADP_MODBUS_FLOAT64,
        ADP_MODBUS_STRING,      /* N registers, 2 characters each */
        ADP_MODBUS_BIT,         /* one bit of a register */
        _ADP_MODBUS_TYPE_MAX,
};

/* Byte order of multi-register values, named by where the most significant byte A goes:
 * ABCD big-endian (Modbus standard), BADC bytes swapped in each register, CDAB registers
 * swapped (low word first), DCBA little-endian. For 64-bit values the same rule extends
 * (CDAB = the four registers in reverse order). 16-bit values use only the byte swap. */
enum adp_modbus_order {
        ADP_MODBUS_ABCD,
        ADP_MODBUS_BADC,
        ADP_MODBUS_CDAB,
        ADP_MODBUS_DCBA,
        _ADP_MODBUS_ORDER_MAX,
};

extern const char *const adp_modbus_table_names[];  /* "coil", "discrete_input", ... NULL-terminated */
extern const char *const adp_modbus_type_names[];
extern const char *const adp_modbus_order_names[];

/* A decoded value: exactly one of i (signed types, bit, bool), u (unsigned), d (floats,
 * scaled), s (string) is meaningful according to kind. */
enum adp_modbus_vkind { ADP_MODBUS_V_INT, ADP_MODBUS_V_UINT, ADP_MODBUS_V_DOUBLE, ADP_MODBUS_V_BOOL, ADP_MODBUS_V_STRING };
struct adp_modbus_value {
        enum adp_modbus_vkind kind;
        int64_t i;
        uint64_t u;
        double d;
        bool b;
        bool f32;       /* d holds a float32 as read (no scaling): printed as the shortest float */
        char s[2 * 64 + 1];
};

/* Registers a value of this type occupies (string: nregs). */
unsigned adp_modbus_type_registers(enum adp_modbus_type t, unsigned string_regs);

/* Decodes from registers (host-order uint16 as libmodbus returns them). bit: for
 * ADP_MODBUS_BIT. Returns 0 or -EINVAL (bool is not a register type here). */
int adp_modbus_decode(enum adp_modbus_type t, enum adp_modbus_order o, const uint16_t *regs, unsigned nregs,
                      unsigned bit, struct adp_modbus_value *ret);
/* Encodes v (already unscaled to the raw type: INT/UINT/DOUBLE kind as fits) into registers.
 * -ERANGE when the value does not fit the type, -EINVAL otherwise. */
int adp_modbus_encode(enum adp_modbus_type t, enum adp_modbus_order o, const struct adp_modbus_value *v,
                      unsigned nregs, uint16_t *ret_regs);
/* Applies scale and offset (value * scale + offset) when either is not the identity; the
 * value becomes a double. */
void adp_modbus_scale(struct adp_modbus_value *v, double scale, double offset);
/* Appends the value as JSON to buf (numbers exact: integers in full, doubles in the shortest
 * form that reads back equal; NaN/Inf as null; strings escaped). Returns chars written
 * (like snprintf; truncated when >= size). */
int adp_modbus_value_json(const struct adp_modbus_value *v, char *buf, size_t size);
/* The value as a double (for deadbands). */
double adp_modbus_value_double(const struct adp_modbus_value *v);
bool adp_modbus_value_equal(const struct adp_modbus_value *a, const struct adp_modbus_value *b);
/* "ILLEGAL DATA ADDRESS" for exception code 2 ...; NULL when not an exception code. */
const char *adp_modbus_exception_name(unsigned code);
/* A libmodbus errno (EMBXILADD, EMBBADCRC, ETIMEDOUT...) as a short description. */
const char *adp_modbus_strerror(int err);
/* Maps a libmodbus errno to ours (STYLE.md §4): exception → -EPROTO, CRC → -EBADMSG, ... */
int adp_modbus_errno(int err);

/* ---- configuration, point maps and plans (modbus-map.c) ---------------------------------- */

struct adp_modbus_point {
        char *name;
        enum adp_modbus_table table;
        uint16_t address;               /* 0-based protocol address */
        enum adp_modbus_type type;
        enum adp_modbus_order order;
        unsigned nregs;                 /* registers (or bits: 1) it occupies */
        unsigned bit;                   /* ADP_MODBUS_BIT */
        double scale, offset;
        char *unit;
        uint64_t interval_usec;         /* poll group */
        double deadband;                /* absolute; 0 = any change */
        bool rbe;                       /* report by exception */
        bool writable;
};

/* One coalesced read request. */
struct adp_modbus_request {
        enum adp_modbus_table table;
        uint16_t start, count;
        size_t *points;                 /* indices into the device's points */
        size_t n_points;
        int last_err;                   /* worker state: libmodbus errno of the last attempt */
};

/* Points of one device polled at the same interval. */
struct adp_modbus_group {
        uint64_t interval_usec;
        char name[32];                  /* the interval, formatted ("1s"): the poll group */
        struct adp_modbus_request *reqs;
        size_t n_reqs;
        size_t n_points;
        uint64_t next_due;              /* worker state */
};

enum adp_modbus_transport { ADP_MODBUS_TCP, ADP_MODBUS_RTU };

struct adp_modbus_line_conf {
        enum adp_modbus_transport transport;
        char *host;                     /* TCP */
        uint16_t port;
        char *device;                   /* RTU */
        unsigned baud, data_bits, stop_bits;
        char parity;                    /* 'N', 'E', 'O' */
        bool rs485;
        uint64_t rts_delay_usec;        /* RS-485 RTS delay (0: libmodbus default) */
        uint64_t turnaround_usec;       /* extra delay between transactions (RTU) */
        uint64_t timeout_usec;          /* response timeout */
        uint64_t backoff_min_usec, backoff_max_usec;
        char key[300];                  /* "tcp:host:port" or "rtu:/dev/..." — devices with one key share a line */
};

struct adp_modbus_device {
        char *id;                       /* the hub device id (`name`) */
        uint8_t unit;
        struct adp_modbus_line_conf line;
        struct adp_modbus_point *points;
        size_t n_points;
        struct adp_modbus_group *groups;
        size_t n_groups;
        unsigned max_gap;               /* registers (or bits) a request may read past to join ranges */
        unsigned max_regs, max_bits;    /* request size caps */
        unsigned retries;               /* extra attempts per request */
        bool log_polls;                 /* an info line per poll cycle (demo) */
        char *profile;                  /* profile name, or NULL */
        uint64_t hash;                  /* of everything above: unchanged on reload = same hash */

        /* Worker state (owned by the line's worker thread). */
        struct adp_modbus_value *last;  /* last reported value per point */
        bool *have_last;
        unsigned failures;              /* consecutive failed cycles */
        uint64_t backoff_until;
        bool online;
        int last_err;                   /* libmodbus errno of the last cycle (0: all good) */
        uint64_t last_report, last_log;
        bool removed;
};

struct adp_modbus_config {
        char *name;
        struct adp_modbus_device **devices;
        size_t n_devices;
};

/* Parses and validates an adapter item (the whole adapters[i] mapping) into *ret. Every
 * problem is added to e. Returns 0, -EINVAL, -ENOMEM. */
int adp_modbus_config_parse(const struct adp_conf_node *item, struct adp_modbus_config **ret, struct adp_conf_errors *e);
struct adp_modbus_config *adp_modbus_config_free(struct adp_modbus_config *c);
struct adp_modbus_device *adp_modbus_device_free(struct adp_modbus_device *d);
/* Detaches device i from c (for handing it to a running line). */
struct adp_modbus_device *adp_modbus_config_take(struct adp_modbus_config *c, size_t i);

/* Builds the device's groups and coalesced requests from its points. */
int adp_modbus_plan(struct adp_modbus_device *d);
/* The point index by name, or -ENOENT. */
int adp_modbus_point_find(const struct adp_modbus_device *d, const char *name);

/* ---- transports (modbus-tcp.c, modbus-rtu.c) -------------------------------------------- */

typedef struct _modbus modbus_t;

/* Creates and connects a libmodbus context for the line. On failure *ret_why says why
 * (static or in why_buf). RTU: claims the port (host port_claim), sets TIOCEXCL, refuses a
 * port another process holds exclusively, sets RS-485 mode when asked. */
int adp_modbus_tcp_open(const struct adp_modbus_line_conf *lc, modbus_t **ret, char *why, size_t why_size);
int adp_modbus_rtu_open(const struct adp_modbus_line_conf *lc, modbus_t **ret, char *why, size_t why_size);
/* Time of one character on the line (11 bits with parity or two stop bits, else 10), and
 * the inter-frame silence: 3.5 characters, 1750 us above 19200 baud. */
uint64_t adp_modbus_rtu_char_usec(const struct adp_modbus_line_conf *lc);
uint64_t adp_modbus_rtu_silence_usec(const struct adp_modbus_line_conf *lc);
/* Theoretical duration of one read transaction (request + response frames + silences). */
uint64_t adp_modbus_rtu_transaction_usec(const struct adp_modbus_line_conf *lc, enum adp_modbus_table t,
                                         unsigned count);

/* Monotonic time in usec. */
uint64_t adp_modbus_now(void);
