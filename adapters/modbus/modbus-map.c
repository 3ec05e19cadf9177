/* SPDX-License-Identifier: MIT */
/* The Modbus adapter's configuration: devices, transports, point maps and profiles, validated
 * with file:line:col errors (configs/README.md, "Modbus adapter"), and the request plan: points
 * grouped by poll interval and coalesced into the fewest reads the protocol allows. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "modbus-internal.h"
#include <modbus/modbus.h>

#define DEFAULT_POLL_USEC (1000u * 1000u)
#define DEFAULT_TIMEOUT_USEC (500u * 1000u)
#define DEFAULT_MAX_GAP 16u
#define DEFAULT_BACKOFF_MIN_USEC (1000u * 1000u)
#define DEFAULT_BACKOFF_MAX_USEC (60u * 1000u * 1000u)
#define MAX_POINTS 4096u

static const char *const adapter_keys[] = { "type", "name", "profiles", "devices", NULL };
static const char *const profile_keys[] = { "points", "byte_order", NULL };
static const char *const device_keys[] = { "name", "tcp", "rtu", "unit", "profile", "points", "byte_order",
                                           "poll_interval", "timeout", "max_gap", "max_registers", "max_bits",
                                           "retries", "backoff", "log_polls", NULL };
static const char *const tcp_keys[] = { "host", "port", NULL };
static const char *const rtu_keys[] = { "device", "baud", "parity", "data_bits", "stop_bits", "rs485", "rts_delay",
                                        "turnaround", NULL };
static const char *const backoff_keys[] = { "min", "max", NULL };
static const char *const point_keys[] = { "name", "table", "address", "entity", "type", "byte_order", "length",
                                          "bit", "scale", "offset", "unit", "interval", "deadband",
                                          "report_by_exception", "writable", NULL };
static const char *const parity_names[] = { "none", "even", "odd", NULL };

/* ---- hashing a subtree (unchanged config ⇒ unchanged hash) ------------------------------ */

static uint64_t fnv(uint64_t h, const char *s) {
        for (; s && *s; s++) {
                h ^= (unsigned char) *s;
                h *= UINT64_C(0x100000001b3);
        }
        h ^= 0xff;
        return h * UINT64_C(0x100000001b3);
}

static uint64_t hash_node(uint64_t h, const struct adp_conf_node *n) {
        h = fnv(h, adp_conf_kind_to_string(adp_conf_kind(n)));
        switch (adp_conf_kind(n)) {
        case ADP_CONF_SCALAR:
                return fnv(h, adp_conf_scalar(n));
        case ADP_CONF_MAP:
                for (size_t i = 0; i < adp_conf_len(n); i++) {
                        h = fnv(h, adp_conf_key_at(n, i));
                        h = hash_node(h, adp_conf_at(n, i));
                }
                return h;
        case ADP_CONF_SEQ:
                for (size_t i = 0; i < adp_conf_len(n); i++)
                        h = hash_node(h, adp_conf_at(n, i));
                return h;
        default:
                return h;
        }
}

/* ---- freeing ----------------------------------------------------------------------------- */

static void point_done(struct adp_modbus_point *p) {
        free(p->name);
        free(p->unit);
}

static void groups_free(struct adp_modbus_device *d) {
        for (size_t g = 0; g < d->n_groups; g++) {
                for (size_t r = 0; r < d->groups[g].n_reqs; r++)
                        free(d->groups[g].reqs[r].points);
                free(d->groups[g].reqs);
        }
        free(d->groups);
        d->groups = NULL;
        d->n_groups = 0;
}

struct adp_modbus_device *adp_modbus_device_free(struct adp_modbus_device *d) {
        if (!d)
                return NULL;
        for (size_t i = 0; i < d->n_points; i++)
                point_done(&d->points[i]);
        free(d->points);
        groups_free(d);
        free(d->id);
        free(d->profile);
        free(d->line.host);
        free(d->line.device);
        free(d->last);
        free(d->have_last);
        free(d);
        return NULL;
}

struct adp_modbus_config *adp_modbus_config_free(struct adp_modbus_config *c) {
        if (!c)
                return NULL;
        for (size_t i = 0; i < c->n_devices; i++)
                adp_modbus_device_free(c->devices[i]);
        free(c->devices);
        free(c->name);
        free(c);
        return NULL;
}

struct adp_modbus_device *adp_modbus_config_take(struct adp_modbus_config *c, size_t i) {
        struct adp_modbus_device *d = c->devices[i];
        c->devices[i] = NULL;
        return d;
}

int adp_modbus_point_find(const struct adp_modbus_device *d, const char *name) {
        for (size_t i = 0; i < d->n_points; i++)
                if (streq(d->points[i].name, name))
                        return (int) i;
        return -ENOENT;
}

/* ---- points ------------------------------------------------------------------------------ */

static bool point_name_valid(const char *s) {
        size_t n = strlen(s);
        if (n == 0 || n > 64)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_' ||
                      *p == '-'))
                        return false;
        return true;
}

/* "40001" / "400001" style entity numbers: the first digit names the table, the rest is the
 * 1-based register number. */
static int parse_entity(const char *s, enum adp_modbus_table *ret_table, uint16_t *ret_addr) {
        size_t n = strlen(s);
        if (n != 5 && n != 6)
                return -EINVAL;
        for (size_t i = 0; i < n; i++)
                if (s[i] < '0' || s[i] > '9')
                        return -EINVAL;
        enum adp_modbus_table t;
        switch (s[0]) {
        case '0':
                t = ADP_MODBUS_COIL;
                break;
        case '1':
                t = ADP_MODBUS_DISCRETE_INPUT;
                break;
        case '3':
                t = ADP_MODBUS_INPUT_REGISTER;
                break;
        case '4':
                t = ADP_MODBUS_HOLDING_REGISTER;
                break;
        default:
                return -EINVAL;
        }
        unsigned long num = strtoul(s + 1, NULL, 10);
        if (num < 1 || num > 65536)
                return -ERANGE;
        *ret_table = t;
        *ret_addr = (uint16_t) (num - 1);
        return 0;
}

static int parse_point(const struct adp_conf_node *pn, enum adp_modbus_order dflt_order, uint64_t dflt_interval,
                       struct adp_modbus_point *p, struct adp_conf_errors *e) {
        size_t before = adp_conf_errors_total(e);
        const char *s;
        int idx;
        int64_t iv;
        uint64_t uv;

        if (adp_conf_kind(pn) != ADP_CONF_MAP) {
                adp_conf_error(e, pn, "found %s, expected a point mapping (name, table, address, type, ...)",
                               adp_conf_kind_to_string(adp_conf_kind(pn)));
                return -EINVAL;
        }
        (void) adp_conf_check_keys(pn, point_keys, e);
        *p = (struct adp_modbus_point){ .scale = 1.0, .order = dflt_order, .interval_usec = dflt_interval };

        if (adp_conf_get_string(pn, "name", true, e, &s) == 0) {
                if (!point_name_valid(s))
                        adp_conf_error(e, adp_conf_get(pn, "name"),
                                       "found \"%s\", expected a point name of 1 to 64 letters, digits, '_' or '-'", s);
                else if (!(p->name = strdup(s)))
                        return -ENOMEM;
        }

        bool have_table = adp_conf_get_enum(pn, "table", false, adp_modbus_table_names, e, &idx) == 0;
        if (have_table)
                p->table = (enum adp_modbus_table) idx;
        const struct adp_conf_node *an = adp_conf_get(pn, "address"), *en = adp_conf_get(pn, "entity");
        if (an && en)
                adp_conf_error(e, en, "both address and entity given, expected one of them");
        else if (en) {
                enum adp_modbus_table t;
                uint16_t a;
                s = adp_conf_scalar(en);
                if (!s || parse_entity(s, &t, &a) < 0)
                        adp_conf_error(e, en,
                                       "found %s, expected a Modbus entity number of 5 or 6 digits "
                                       "(\"40001\" = holding register address 0; first digit 0 coil, 1 discrete "
                                       "input, 3 input register, 4 holding register)",
                                       s ? s : adp_conf_kind_to_string(adp_conf_kind(en)));
                else if (have_table && t != p->table)
                        adp_conf_error(e, en, "entity \"%s\" is a %s, but table says %s", s,
                                       adp_modbus_table_names[t], adp_modbus_table_names[p->table]);
                else {
                        p->table = t;
                        p->address = a;
                        have_table = true;
                }
        } else if (adp_conf_get_uint(pn, "address", true, 0, 65535, e, &uv) == 0)
                p->address = (uint16_t) uv;
        if (!have_table && !en)
                adp_conf_error(e, pn, "missing key \"table\", expected one of coil, discrete_input, input_register, "
                                      "holding_register (or an \"entity\" number)");

        bool bits_table = p->table == ADP_MODBUS_COIL || p->table == ADP_MODBUS_DISCRETE_INPUT;
        p->type = bits_table ? ADP_MODBUS_BOOL : ADP_MODBUS_UINT16;
        if (adp_conf_get_enum(pn, "type", false, adp_modbus_type_names, e, &idx) == 0) {
                p->type = (enum adp_modbus_type) idx;
                if (bits_table != (p->type == ADP_MODBUS_BOOL))
                        adp_conf_error(e, adp_conf_get(pn, "type"),
                                       bits_table ? "found %s, expected bool: a %s holds single bits"
                                                  : "found %s, expected a register type: bool is for coils and "
                                                    "discrete inputs (use bit for one bit of a %s)",
                                       adp_modbus_type_names[p->type], adp_modbus_table_names[p->table]);
        }
        if (adp_conf_get_enum(pn, "byte_order", false, adp_modbus_order_names, e, &idx) == 0)
                p->order = (enum adp_modbus_order) idx;

        p->nregs = adp_modbus_type_registers(p->type, 0);
        if (p->type == ADP_MODBUS_STRING) {
                if (adp_conf_get_uint(pn, "length", true, 1, 64, e, &uv) == 0)
                        p->nregs = (unsigned) uv;
        } else if (adp_conf_get(pn, "length"))
                adp_conf_error(e, adp_conf_get(pn, "length"), "length applies to type string only");
        if (p->type == ADP_MODBUS_BIT) {
                if (adp_conf_get_uint(pn, "bit", true, 0, 15, e, &uv) == 0)
                        p->bit = (unsigned) uv;
        } else if (adp_conf_get(pn, "bit"))
                adp_conf_error(e, adp_conf_get(pn, "bit"), "bit applies to type bit only");
        if (bits_table)
                p->nregs = 1;
        if ((unsigned) p->address + p->nregs > 65536u)
                adp_conf_error(e, pn, "the point runs past address 65535 (%u + %u registers)", p->address, p->nregs);

        bool numeric = p->type != ADP_MODBUS_STRING && p->type != ADP_MODBUS_BOOL && p->type != ADP_MODBUS_BIT;
        const char *nonnum[] = { "scale", "offset", "deadband" };
        for (size_t i = 0; i < ELEMENTSOF(nonnum); i++)
                if (!numeric && adp_conf_get(pn, nonnum[i]))
                        adp_conf_error(e, adp_conf_get(pn, nonnum[i]), "%s applies to numeric types only, not %s",
                                       nonnum[i], adp_modbus_type_names[p->type]);
        (void) adp_conf_get_double(pn, "scale", false, -1e300, 1e300, e, &p->scale);
        if (p->scale == 0.0)
                adp_conf_error(e, adp_conf_get(pn, "scale"), "found 0, expected a non-zero scale");
        (void) adp_conf_get_double(pn, "offset", false, -1e300, 1e300, e, &p->offset);
        (void) adp_conf_get_double(pn, "deadband", false, 0, 1e300, e, &p->deadband);
        if (adp_conf_get_string(pn, "unit", false, e, &s) == 0 && !(p->unit = strdup(s)))
                return -ENOMEM;
        (void) adp_conf_get_duration(pn, "interval", false, 10 * 1000, UINT64_C(86400) * 1000000, e, &p->interval_usec);
        (void) adp_conf_get_bool(pn, "report_by_exception", false, e, &p->rbe);
        if (adp_conf_get_bool(pn, "writable", false, e, &p->writable) == 0 && p->writable &&
            (p->table == ADP_MODBUS_DISCRETE_INPUT || p->table == ADP_MODBUS_INPUT_REGISTER))
                adp_conf_error(e, adp_conf_get(pn, "writable"), "a %s is read-only, expected writable: false",
                               adp_modbus_table_names[p->table]);
        (void) iv;
        return adp_conf_errors_total(e) > before ? -EINVAL : 0;
}

static int parse_points(const struct adp_conf_node *seq, enum adp_modbus_order order, uint64_t interval,
                        struct adp_modbus_device *d, struct adp_conf_errors *e) {
        size_t n = adp_conf_len(seq);
        if (n == 0) {
                adp_conf_error(e, seq, "found an empty point list, expected at least one point");
                return -EINVAL;
        }
        if (n > MAX_POINTS) {
                adp_conf_error(e, seq, "found %zu points, expected at most %u", n, MAX_POINTS);
                return -EINVAL;
        }
        d->points = calloc(n, sizeof *d->points);
        if (!d->points)
                return -ENOMEM;
        int ret = 0;
        for (size_t i = 0; i < n; i++) {
                const struct adp_conf_node *pn = adp_conf_at(seq, i);
                int r = parse_point(pn, order, interval, &d->points[d->n_points], e);
                if (r == -ENOMEM) {
                        point_done(&d->points[d->n_points]);
                        return r;
                }
                if (r < 0) {
                        point_done(&d->points[d->n_points]);
                        ret = -EINVAL;
                        continue;
                }
                for (size_t j = 0; j < d->n_points; j++)
                        if (streq(d->points[j].name, d->points[d->n_points].name)) {
                                adp_conf_error(e, adp_conf_get(pn, "name"), "duplicate point name \"%s\"",
                                               d->points[j].name);
                                ret = -EINVAL;
                        }
                d->n_points++;
        }
        return ret;
}

/* ---- devices ----------------------------------------------------------------------------- */

static bool device_id_valid(const char *s) {
        size_t n = strlen(s);
        if (n == 0 || n > 128)
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      strchr("-.:_", *p)))
                        return false;
        return true;
}

static int parse_line(const struct adp_conf_node *dn, struct adp_modbus_line_conf *lc, struct adp_conf_errors *e) {
        const struct adp_conf_node *tcp = NULL, *rtu = NULL;
        const char *s;
        uint64_t uv;
        int idx;

        (void) adp_conf_get_map(dn, "tcp", false, e, &tcp);
        (void) adp_conf_get_map(dn, "rtu", false, e, &rtu);
        if (!!tcp == !!rtu) {
                adp_conf_error(e, tcp ? adp_conf_get(dn, "rtu") : dn, tcp ? "both tcp and rtu given, expected one transport"
                                                                          : "missing transport, expected a \"tcp\" or an \"rtu\" mapping");
                return -EINVAL;
        }
        lc->timeout_usec = DEFAULT_TIMEOUT_USEC;
        (void) adp_conf_get_duration(dn, "timeout", false, 10 * 1000, 60 * 1000000, e, &lc->timeout_usec);
        lc->backoff_min_usec = DEFAULT_BACKOFF_MIN_USEC;
        lc->backoff_max_usec = DEFAULT_BACKOFF_MAX_USEC;
        const struct adp_conf_node *bo = NULL;
        if (adp_conf_get_map(dn, "backoff", false, e, &bo) == 0) {
                (void) adp_conf_check_keys(bo, backoff_keys, e);
                (void) adp_conf_get_duration(bo, "min", false, 10 * 1000, UINT64_C(3600) * 1000000, e,
                                             &lc->backoff_min_usec);
                (void) adp_conf_get_duration(bo, "max", false, 10 * 1000, UINT64_C(3600) * 1000000, e,
                                             &lc->backoff_max_usec);
                if (lc->backoff_max_usec < lc->backoff_min_usec)
                        adp_conf_error(e, bo, "backoff.max is below backoff.min");
        }

        if (tcp) {
                lc->transport = ADP_MODBUS_TCP;
                (void) adp_conf_check_keys(tcp, tcp_keys, e);
                if (adp_conf_get_string(tcp, "host", true, e, &s) == 0 && !(lc->host = strdup(s)))
                        return -ENOMEM;
                lc->port = 502;
                if (adp_conf_get_uint(tcp, "port", false, 1, 65535, e, &uv) == 0)
                        lc->port = (uint16_t) uv;
                snprintf(lc->key, sizeof lc->key, "tcp:%s:%u", lc->host ? lc->host : "", lc->port);
                return 0;
        }
        lc->transport = ADP_MODBUS_RTU;
        (void) adp_conf_check_keys(rtu, rtu_keys, e);
        if (adp_conf_get_string(rtu, "device", true, e, &s) == 0) {
                if (s[0] != '/')
                        adp_conf_error(e, adp_conf_get(rtu, "device"), "found \"%s\", expected an absolute device path",
                                       s);
                else if (!(lc->device = strdup(s)))
                        return -ENOMEM;
        }
        lc->baud = 19200;
        if (adp_conf_get_uint(rtu, "baud", false, 300, 4000000, e, &uv) == 0)
                lc->baud = (unsigned) uv;
        lc->parity = 'E';
        if (adp_conf_get_enum(rtu, "parity", false, parity_names, e, &idx) == 0)
                lc->parity = "NEO"[idx];
        lc->data_bits = 8;
        if (adp_conf_get_uint(rtu, "data_bits", false, 7, 8, e, &uv) == 0)
                lc->data_bits = (unsigned) uv;
        lc->stop_bits = 1;
        if (adp_conf_get_uint(rtu, "stop_bits", false, 1, 2, e, &uv) == 0)
                lc->stop_bits = (unsigned) uv;
        (void) adp_conf_get_bool(rtu, "rs485", false, e, &lc->rs485);
        (void) adp_conf_get_duration(rtu, "rts_delay", false, 0, 1000000, e, &lc->rts_delay_usec);
        (void) adp_conf_get_duration(rtu, "turnaround", false, 0, 1000000, e, &lc->turnaround_usec);
        snprintf(lc->key, sizeof lc->key, "rtu:%s", lc->device ? lc->device : "");
        return 0;
}

static bool line_conf_equal(const struct adp_modbus_line_conf *a, const struct adp_modbus_line_conf *b) {
        return a->transport == b->transport && streq(a->key, b->key) && a->baud == b->baud &&
               a->parity == b->parity && a->data_bits == b->data_bits && a->stop_bits == b->stop_bits &&
               a->rs485 == b->rs485 && a->rts_delay_usec == b->rts_delay_usec &&
               a->turnaround_usec == b->turnaround_usec;
}

static int parse_device(const struct adp_conf_node *dn, const struct adp_conf_node *profiles,
                        struct adp_modbus_device **ret, struct adp_conf_errors *e) {
        size_t before = adp_conf_errors_total(e);
        struct adp_modbus_device *d = calloc(1, sizeof *d);
        const char *s;
        uint64_t uv;
        int idx, r;

        if (!d)
                return -ENOMEM;
        if (adp_conf_kind(dn) != ADP_CONF_MAP) {
                adp_conf_error(e, dn, "found %s, expected a device mapping (name, tcp or rtu, unit, points or profile)",
                               adp_conf_kind_to_string(adp_conf_kind(dn)));
                adp_modbus_device_free(d);
                return -EINVAL;
        }
        (void) adp_conf_check_keys(dn, device_keys, e);
        if (adp_conf_get_string(dn, "name", true, e, &s) == 0) {
                if (!device_id_valid(s))
                        adp_conf_error(e, adp_conf_get(dn, "name"),
                                       "found \"%s\", expected a device id of 1 to 128 letters, digits, '-', '.', ':' or '_'",
                                       s);
                else if (!(d->id = strdup(s)))
                        goto oom;
        }
        r = parse_line(dn, &d->line, e);
        if (r == -ENOMEM)
                goto oom;
        d->unit = 1;
        /* Unit 0 is broadcast (no reply) and 248..255 are reserved on serial lines; TCP
         * gateways use 255 for "the device itself". */
        if (adp_conf_get_uint(dn, "unit", false, d->line.transport == ADP_MODBUS_TCP ? 0 : 1,
                              d->line.transport == ADP_MODBUS_TCP ? 255 : 247, e, &uv) == 0)
                d->unit = (uint8_t) uv;
        uint64_t interval = DEFAULT_POLL_USEC;
        (void) adp_conf_get_duration(dn, "poll_interval", false, 10 * 1000, UINT64_C(86400) * 1000000, e, &interval);
        d->max_gap = DEFAULT_MAX_GAP;
        if (adp_conf_get_uint(dn, "max_gap", false, 0, 2000, e, &uv) == 0)
                d->max_gap = (unsigned) uv;
        d->max_regs = MODBUS_MAX_READ_REGISTERS;
        if (adp_conf_get_uint(dn, "max_registers", false, 1, MODBUS_MAX_READ_REGISTERS, e, &uv) == 0)
                d->max_regs = (unsigned) uv;
        d->max_bits = MODBUS_MAX_READ_BITS;
        if (adp_conf_get_uint(dn, "max_bits", false, 1, MODBUS_MAX_READ_BITS, e, &uv) == 0)
                d->max_bits = (unsigned) uv;
        if (adp_conf_get_uint(dn, "retries", false, 0, 10, e, &uv) == 0)
                d->retries = (unsigned) uv;
        (void) adp_conf_get_bool(dn, "log_polls", false, e, &d->log_polls);

        enum adp_modbus_order order = ADP_MODBUS_ABCD;
        const struct adp_conf_node *points = NULL, *profile = NULL;
        if (adp_conf_get_string(dn, "profile", false, e, &s) == 0) {
                profile = adp_conf_get(profiles, s);
                if (!profile) {
                        char known[512] = "";
                        size_t o = 0;
                        for (size_t i = 0; i < adp_conf_len(profiles) && o < sizeof known; i++)
                                o += (size_t) snprintf(known + o, sizeof known - o, "%s%s", i ? ", " : "",
                                                       adp_conf_key_at(profiles, i));
                        adp_conf_error(e, adp_conf_get(dn, "profile"), "unknown profile \"%s\", expected one of: %s", s,
                                       o ? known : "(no profiles defined)");
                } else if (!(d->profile = strdup(s)))
                        goto oom;
                if (adp_conf_get(dn, "points"))
                        adp_conf_error(e, adp_conf_get(dn, "points"),
                                       "both profile and points given, expected one of them");
        }
        if (profile) {
                if (adp_conf_get_enum(profile, "byte_order", false, adp_modbus_order_names, e, &idx) == 0)
                        order = (enum adp_modbus_order) idx;
                (void) adp_conf_get_seq(profile, "points", true, e, &points);
        } else if (!d->profile && adp_conf_get_seq(dn, "points", false, e, &points) == -ENOENT && !adp_conf_get(dn, "profile"))
                adp_conf_error(e, dn, "missing key \"points\", expected a point list or a \"profile\"");
        if (adp_conf_get_enum(dn, "byte_order", false, adp_modbus_order_names, e, &idx) == 0)
                order = (enum adp_modbus_order) idx;
        if (points) {
                r = parse_points(points, order, interval, d, e);
                if (r == -ENOMEM)
                        goto oom;
        }

        if (adp_conf_errors_total(e) > before) {
                adp_modbus_device_free(d);
                return -EINVAL;
        }
        d->hash = hash_node(UINT64_C(0xcbf29ce484222325), dn);
        if (profile)
                d->hash = hash_node(d->hash, profile);
        r = adp_modbus_plan(d);
        if (r < 0) {
                adp_modbus_device_free(d);
                return r;
        }
        *ret = d;
        return 0;
oom:
        adp_modbus_device_free(d);
        return -ENOMEM;
}

int adp_modbus_config_parse(const struct adp_conf_node *item, struct adp_modbus_config **ret, struct adp_conf_errors *e) {
        size_t before = adp_conf_errors_total(e);
        const struct adp_conf_node *profiles = NULL, *devices = NULL;
        const char *name = NULL;
        struct adp_modbus_config *c = calloc(1, sizeof *c);
        int r = 0;

        if (!c)
                return -ENOMEM;
        (void) adp_conf_check_keys(item, adapter_keys, e);
        (void) adp_conf_get_string(item, "name", true, e, &name);
        if (name && !(c->name = strdup(name)))
                goto oom;
        if (adp_conf_get_map(item, "profiles", false, e, &profiles) == 0)
                for (size_t i = 0; i < adp_conf_len(profiles); i++) {
                        const struct adp_conf_node *p = adp_conf_at(profiles, i);
                        if (adp_conf_kind(p) != ADP_CONF_MAP)
                                adp_conf_error(e, p, "found %s, expected a profile mapping (points, byte_order)",
                                               adp_conf_kind_to_string(adp_conf_kind(p)));
                        else
                                (void) adp_conf_check_keys(p, profile_keys, e);
                }
        if (adp_conf_get_seq(item, "devices", true, e, &devices) == 0) {
                size_t n = adp_conf_len(devices);
                c->devices = calloc(n ? n : 1, sizeof *c->devices);
                if (!c->devices)
                        goto oom;
                for (size_t i = 0; i < n; i++) {
                        const struct adp_conf_node *dn = adp_conf_at(devices, i);
                        struct adp_modbus_device *d = NULL;
                        r = parse_device(dn, profiles, &d, e);
                        if (r == -ENOMEM)
                                goto oom;
                        if (r < 0)
                                continue;
                        for (size_t j = 0; j < c->n_devices; j++) {
                                struct adp_modbus_device *o = c->devices[j];
                                if (streq(o->id, d->id))
                                        adp_conf_error(e, adp_conf_get(dn, "name"), "duplicate device name \"%s\"",
                                                       d->id);
                                else if (streq(o->line.key, d->line.key) && !line_conf_equal(&o->line, &d->line))
                                        adp_conf_error(e, dn,
                                                       "device \"%s\" uses the serial line %s of device \"%s\" with "
                                                       "different line settings, expected the same baud, parity, "
                                                       "bits, rs485 and timing for every device on one line",
                                                       d->id, d->line.device, o->id);
                                else if (streq(o->line.key, d->line.key) && o->unit == d->unit)
                                        adp_conf_error(e, adp_conf_get(dn, "unit"),
                                                       "device \"%s\" has unit %u, like device \"%s\" on the same %s",
                                                       d->id, d->unit, o->id,
                                                       d->line.transport == ADP_MODBUS_RTU ? "serial line" : "host and port");
                        }
                        c->devices[c->n_devices++] = d;
                }
        }
        if (adp_conf_errors_total(e) > before) {
                adp_modbus_config_free(c);
                return -EINVAL;
        }
        *ret = c;
        return 0;
oom:
        adp_modbus_config_free(c);
        return -ENOMEM;
}

/* ---- the request plan -------------------------------------------------------------------- */

static const struct adp_modbus_point *sort_points;

static int cmp_point_idx(const void *a, const void *b) {
        const struct adp_modbus_point *pa = &sort_points[*(const size_t *) a], *pb = &sort_points[*(const size_t *) b];
        if (pa->table != pb->table)
                return (int) pa->table - (int) pb->table;
        if (pa->address != pb->address)
                return (int) pa->address - (int) pb->address;
        return (int) pa->nregs - (int) pb->nregs;
}

static int add_request(struct adp_modbus_group *g, enum adp_modbus_table t, unsigned start, unsigned count,
                       const size_t *idx, size_t n) {
        struct adp_modbus_request *nr = realloc(g->reqs, (g->n_reqs + 1) * sizeof *nr);
        if (!nr)
                return -ENOMEM;
        g->reqs = nr;
        struct adp_modbus_request *r = &g->reqs[g->n_reqs];
        *r = (struct adp_modbus_request){ .table = t, .start = (uint16_t) start, .count = (uint16_t) count };
        r->points = malloc(n * sizeof(size_t));
        if (!r->points)
                return -ENOMEM;
        memcpy(r->points, idx, n * sizeof(size_t));
        r->n_points = n;
        g->n_reqs++;
        return 0;
}

/* Why a global for qsort: the plan is built at config time on the loop thread only, and
 * qsort_r's signature differs between libcs. */
int adp_modbus_plan(struct adp_modbus_device *d) {
        groups_free(d);
        size_t *idx = malloc((d->n_points ? d->n_points : 1) * sizeof(size_t));
        bool *done = calloc(d->n_points ? d->n_points : 1, sizeof(bool));
        int r = 0;
        if (!idx || !done) {
                free(idx);
                free(done);
                return -ENOMEM;
        }
        for (size_t i = 0; i < d->n_points; i++) {
                if (done[i])
                        continue;
                uint64_t iv = d->points[i].interval_usec;
                struct adp_modbus_group *ng = realloc(d->groups, (d->n_groups + 1) * sizeof *ng);
                if (!ng) {
                        r = -ENOMEM;
                        break;
                }
                d->groups = ng;
                struct adp_modbus_group *g = &d->groups[d->n_groups++];
                *g = (struct adp_modbus_group){ .interval_usec = iv };
                (void) adp_format_duration(iv, g->name, sizeof g->name);

                size_t n = 0;
                for (size_t j = i; j < d->n_points; j++)
                        if (!done[j] && d->points[j].interval_usec == iv) {
                                idx[n++] = j;
                                done[j] = true;
                        }
                g->n_points = n;
                sort_points = d->points;
                qsort(idx, n, sizeof(size_t), cmp_point_idx);

                /* Greedy coalescing: extend the current request while the next point starts
                 * within max_gap of its end and the whole stays within the function's limit. */
                size_t first = 0;
                while (first < n && r == 0) {
                        const struct adp_modbus_point *p = &d->points[idx[first]];
                        bool bits = p->table == ADP_MODBUS_COIL || p->table == ADP_MODBUS_DISCRETE_INPUT;
                        unsigned limit = bits ? d->max_bits : d->max_regs;
                        unsigned start = p->address, end = p->address + p->nregs; /* [start, end) */
                        size_t last = first + 1;
                        while (last < n) {
                                const struct adp_modbus_point *q = &d->points[idx[last]];
                                unsigned qend = MAX(end, (unsigned) q->address + q->nregs);
                                if (q->table != p->table || q->address > end + d->max_gap || qend - start > limit)
                                        break;
                                end = qend;
                                last++;
                        }
                        r = add_request(g, p->table, start, end - start, idx + first, last - first);
                        first = last;
                }
                if (r < 0)
                        break;
        }
        free(idx);
        free(done);
        if (r == 0) {
                free(d->last);
                free(d->have_last);
                d->last = calloc(d->n_points ? d->n_points : 1, sizeof *d->last);
                d->have_last = calloc(d->n_points ? d->n_points : 1, sizeof *d->have_last);
                if (!d->last || !d->have_last)
                        r = -ENOMEM;
        }
        return r;
}
