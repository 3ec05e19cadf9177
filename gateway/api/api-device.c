/* SPDX-License-Identifier: MIT */
/* The hub's HTTPS 1.1 device interface (reference §3) and file upload (§3.5), served by the
 * service API's listeners and router (api.c):
 *
 *   POST   /devices/{id}/messages/events                 one D2C message, or a batch
 *                                                        (application/vnd.microsoft.iothub.json)
 *   POST   /devices/{id}/modules/{mid}/messages/events   the same for a module
 *   GET    /devices/{id}/messages/deviceBound            receive one C2D message under a lock
 *   DELETE /devices/{id}/messages/deviceBound/{etag}     complete (?reject: reject)
 *   POST   /devices/{id}/messages/deviceBound/{etag}/abandon
 *   POST   /devices/{id}/files                           start a file upload
 *   POST   /devices/{id}/files/notifications[/{corr}]    end it (notification into the events)
 *   PUT    /uploads/{id}/{blobName}?{sas}                the blob endpoint the upload uses
 *
 * Authentication, per request: "Authorization: SharedAccessSignature ..." with a device-scoped
 * token (device key) or a policy token with DeviceConnect covering the device; or, without
 * Authorization, the TLS client certificate (selfSigned thumbprint or CA-signed with CN = id,
 * gateway/auth-x509.c). The blob endpoint is authorised by the upload's own SAS in the query
 * (HMAC-SHA256 with the hub's upload key, scoped to the one blob, short-lived).
 *
 * HTTP devices are not "connected" (IoT Hub keeps connectionState for MQTT and AMQP only):
 * requests only touch lastActivityTime.
 *
 * Throttling (reference §10): a token bucket per device for D2C messages
 * (http_device.limits.max_messages_per_second, a batch counts each message). Over the rate a
 * request is first delayed (traffic shaping) up to max_shaping_delay, then refused with 429
 * ThrottlingException.
 *
 * Uploads: files live under <state_dir>/uploads/<device>/<blob path> (names percent-encoded
 * for the file system), staged blocks under <state_dir>/uploads/.blocks/. The key that signs
 * the blob SAS tokens and correlation ids is <state_dir>/uploads/.key (32 random bytes made
 * on first use, 0600), so tokens survive a restart. The quota counts every file and staged
 * block there. The correlation id is self-contained (expiry and blob name, signed), so a
 * notification after a restart still works; the count of active uploads per device (at most
 * file_upload.max_concurrent, 403006) is kept in memory. */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <mbedtls/base64.h>
#include <mbedtls/md.h>
#include <mbedtls/x509_crt.h>

#include "api/api-internal.h"
#include "auth-x509.h"
#include "config.h"
#include "hub/auth.h"
#include "hub/clock.h"
#include "hub/json-dump.h"
#include "hub/msg.h"
#include "hub/outbox.h"
#include "hub/queue.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/session.h"
#include "hub/urlenc.h"
#include "log-ids.h"
#include "log.h"
#include "net/net.h"

#define DEV_BUCKETS 256u
#define DEV_IDLE_USEC (600 * USEC_PER_SEC) /* per-device state kept this long after the last request */
#define BATCH_MAX_BYTES (256u * 1024u)     /* reference §3.3 */
#define BATCH_MAX_MESSAGES 500u
#define EVENTS_BODY_MAX (512u * 1024u)     /* let oversize messages reach the handler: 413 with a log */
#define BLOB_REQUEST_MAX ((uint64_t) 64 << 20) /* one PUT (single blob or block) */
#define BLOB_NAME_MAX 1024u
#define BLOB_CONTAINER "uploads"
#define BLOB_SAS_VERSION "2018-03-28"
#define BLOB_X_MS_VERSION "2020-04-08"
#define UPLOAD_NOTIFY_GRACE_USEC (3600 * USEC_PER_SEC) /* a notification may come this long after the SAS expired */

struct upload {
        struct upload *next;
        char *correlation_id;
        uint64_t expiry_mono;
};

struct dev_entry {
        struct dev_entry *next;
        char id[HUB_DEVICE_ID_MAX + 1];
        double tokens;
        uint64_t tokens_at;      /* mono usec, 0 = full bucket */
        uint64_t touched_mono;   /* lastActivityTime last written */
        uint64_t used_mono;
        struct upload *uploads;
        unsigned n_uploads;
};

struct api_device {
        struct gw_api *api;
        bool enabled;
        uint32_t rate;
        uint64_t max_shaping_usec;
        uint64_t quota, max_file, sas_ttl_usec;
        uint32_t max_concurrent;
        uint64_t listener_body_max;
        char *dir;               /* <state_dir>/uploads */
        uint8_t key[32];
        uint64_t used_bytes;     /* every file under dir */
        mbedtls_x509_crt ca_chain;
        bool have_ca;
        struct dev_entry *buckets[DEV_BUCKETS];
        size_t n_entries;
        unsigned lookups;
};

/* What a device request carries from authentication to its handler (req->state). */
struct dev_req {
        struct api_device *d;
        char *module_id;
        char generation_id[24];
        const char *auth_method; /* static JSON */
        /* D2C messages waiting for the shaping delay */
        struct hub_msg **msgs;
        size_t n_msgs;
        sd_event_source *timer;
};

static void dev_req_free(void *p) {
        struct dev_req *s = p;
        if (!s)
                return;
        free(s->module_id);
        for (size_t i = 0; i < s->n_msgs; i++)
                hub_msg_unref(s->msgs[i]);
        free(s->msgs);
        sd_event_source_disable_unref(s->timer);
        free(s);
}

static uint64_t mono(void) {
        return api_mono();
}

/* ---- per-device state ------------------------------------------------------------------- */

static unsigned dev_hash(const char *id) {
        uint32_t h = 2166136261u;
        for (; *id; id++)
                h = (h ^ (uint8_t) *id) * 16777619u;
        return h % DEV_BUCKETS;
}

static void upload_free(struct upload *u) {
        free(u->correlation_id);
        free(u);
}

static void entry_prune_uploads(struct dev_entry *e, uint64_t now) {
        for (struct upload **pu = &e->uploads; *pu;) {
                struct upload *u = *pu;
                if (u->expiry_mono <= now) {
                        *pu = u->next;
                        upload_free(u);
                        e->n_uploads--;
                } else
                        pu = &u->next;
        }
}

static void entry_free(struct dev_entry *e) {
        while (e->uploads) {
                struct upload *u = e->uploads;
                e->uploads = u->next;
                upload_free(u);
        }
        free(e);
}

static void dev_prune(struct api_device *d, uint64_t now) {
        for (unsigned b = 0; b < DEV_BUCKETS; b++)
                for (struct dev_entry **pe = &d->buckets[b]; *pe;) {
                        struct dev_entry *e = *pe;
                        entry_prune_uploads(e, now);
                        if (e->n_uploads == 0 && now - e->used_mono > DEV_IDLE_USEC) {
                                *pe = e->next;
                                entry_free(e);
                                d->n_entries--;
                        } else
                                pe = &e->next;
                }
}

/* The state of device id, created on first use; NULL on allocation failure. */
static struct dev_entry *dev_get(struct api_device *d, const char *id) {
        uint64_t now = mono();
        if (++d->lookups % 1024 == 0)
                dev_prune(d, now);
        unsigned h = dev_hash(id);
        for (struct dev_entry *e = d->buckets[h]; e; e = e->next)
                if (streq(e->id, id)) {
                        e->used_mono = now;
                        return e;
                }
        struct dev_entry *e = calloc(1, sizeof *e);
        if (!e)
                return NULL;
        snprintf(e->id, sizeof e->id, "%s", id);
        e->used_mono = now;
        e->next = d->buckets[h];
        d->buckets[h] = e;
        d->n_entries++;
        return e;
}

/* Token bucket: 0 = go on now, > 0 = usec to wait (traffic shaping; the tokens are taken),
 * -1 = over the shaping delay too (429). */
static int64_t throttle(struct api_device *d, struct dev_entry *e, size_t weight) {
        if (d->rate == 0 || !e)
                return 0;
        uint64_t now = mono();
        if (e->tokens_at == 0) {
                e->tokens = d->rate;
                e->tokens_at = now;
        }
        e->tokens += (double) (now - e->tokens_at) * d->rate / USEC_PER_SEC;
        if (e->tokens > d->rate)
                e->tokens = d->rate;
        e->tokens_at = now;
        if (e->tokens >= (double) weight) {
                e->tokens -= (double) weight;
                return 0;
        }
        double wait = ((double) weight - e->tokens) * USEC_PER_SEC / d->rate;
        if (wait > (double) d->max_shaping_usec)
                return -1;
        e->tokens -= (double) weight;
        return (int64_t) wait + 1;
}

/* ---- errors ------------------------------------------------------------------------------ */

/* Azure Blob's error shape: XML body, x-ms-error-code, x-ms-request-id, x-ms-version. */
static void blob_error(struct api_req *req, int status, const char *code, const char *fmt, ...) _printf_(4, 5);
static void blob_error(struct api_req *req, int status, const char *code, const char *fmt, ...) {
        char msg[512], rid[40], body[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        gw_log_full(status >= 500 ? LOG_WARNING : LOG_NOTICE, 0,
                    GW_FIELDS(.component = "api", .device = req->device_id, .event = "upload-error",
                              .ratelimit_key = "upload-error"),
                    "File upload of device %s: %d %s: %s", req->device_id ? req->device_id : "-", status, code, msg);
        /* The message is ours (no markup characters come from the peer but device ids: escape). */
        char esc[700];
        size_t o = 0;
        for (const char *p = msg; *p && o + 7 < sizeof esc; p++) {
                const char *r = *p == '<' ? "&lt;" : *p == '>' ? "&gt;" : *p == '&' ? "&amp;" : NULL;
                if (r) {
                        memcpy(esc + o, r, strlen(r));
                        o += strlen(r);
                } else
                        esc[o++] = *p;
        }
        esc[o] = 0;
        if (hub_random_hex(rid, 16) < 0)
                snprintf(rid, sizeof rid, "0");
        snprintf(body, sizeof body,
                 "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>%s</Code><Message>%s\nRequestId:%s</Message></Error>",
                 code, esc, rid);
        json_t *h = json_pack("{s:s, s:s, s:s}", "x-ms-error-code", code, "x-ms-request-id", rid, "x-ms-version",
                              BLOB_X_MS_VERSION);
        api_reply(req, status, h, "application/xml", body, strlen(body));
}

static void unauthorized(struct api_req *req, const char *id, const char *why) {
        const char *peer = api_req_net_conn(req) ? gw_net_conn_get_peer(api_req_net_conn(req)) : "internal";
        gw_log_full(LOG_WARNING, 0,
                    GW_FIELDS(.component = "api", .device = id, .event = "auth-failed",
                              .message_id = GW_MSG_AUTH_FAILED, .ratelimit_key = "http-device-auth-failed"),
                    "HTTP device %s from %s refused: %s", id, peer, why);
        api_reply_error(req, 401, "IotHubUnauthorized", "Unauthorized: device %s: %s", id, why);
}

/* ---- authentication --------------------------------------------------------------------- */

static void touch(struct api_req *req, struct dev_entry *e) {
        uint64_t now = mono();
        if (!e || (e->touched_mono && now - e->touched_mono < HUB_SESSION_ACTIVITY_INTERVAL_USEC))
                return;
        e->touched_mono = now;
        hub_sessions_touch_device(api_hub(req)->sessions, e->id);
}

static bool blob_authorize(struct api_req *req);

bool api_device_authorize(struct api_req *req, bool blob) {
        struct api_device *d = api_get_device(req->api);
        struct gw_hub *hub = api_hub(req);
        const char *id = req->n_seg > 1 ? req->seg[1] : "";
        const char *module = req->n_seg >= 4 && strcasecmp(req->seg[2], "modules") == 0 ? req->seg[3] : NULL;
        struct hub_device dev = {};
        int r;

        if (!d->enabled) {
                api_reply_error(req, 404, "NotFound", "The HTTP device API is disabled (http_device.enabled: false)");
                return false;
        }
        if (!hub_device_id_valid(id) || (module && !hub_device_id_valid(module))) {
                api_reply_error(req, 400, "ArgumentInvalid", "The device or module id in the path is not valid");
                return false;
        }
        req->device_id = strdup(id);
        struct dev_req *s = calloc(1, sizeof *s);
        if (!req->device_id || !s || (module && !(s->module_id = strdup(module)))) {
                dev_req_free(s);
                api_reply_errno(req, -ENOMEM, "Authentication");
                return false;
        }
        s->d = d;
        req->state = s;
        req->state_free = dev_req_free;
        if (blob)
                return blob_authorize(req);

        const char *auth = api_header(req, "Authorization");
        if (auth) {
                struct hub_auth_request areq = {
                        .token = auth,
                        .host_names = (const char *const *) api_host_names(req->api),
                        .device_id = id,
                        .module_id = module,
                        .required_rights = HUB_RIGHT_DEVICE_CONNECT,
                        .now_usec = api_now(),
                };
                struct hub_auth_result res = {};
                r = hub_auth_check_sas(hub->registry, &areq, &res);
                if (r == -EACCES) {
                        char why[96];
                        snprintf(why, sizeof why, "SAS token refused: %s", hub_auth_failure_to_string(res.failure));
                        unauthorized(req, id, why);
                        return false;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "Authentication");
                        return false;
                }
                r = hub_registry_get(hub->registry, id, &dev);
                if (r == -ENOENT) {
                        api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", id);
                        return false;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "Authentication");
                        return false;
                }
                if (dev.status != HUB_DEVICE_ENABLED) {
                        hub_device_done(&dev);
                        unauthorized(req, id, "the device is disabled");
                        return false;
                }
                s->auth_method = res.policy ? "{\"scope\":\"hub\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}"
                                 : module ? "{\"scope\":\"module\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}"
                                          : "{\"scope\":\"device\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
        } else {
                struct gw_net_conn *nc = api_req_net_conn(req);
                const mbedtls_x509_crt *crt = nc ? gw_net_conn_get_peer_cert(nc) : NULL;
                const uint8_t *der = NULL;
                size_t der_len = 0;
                if (req->internal) {
                        /* The admin socket acts with iothubowner's rights. */
                        s->auth_method = "{\"scope\":\"hub\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
                        goto done;
                }
                if (!crt || gw_net_conn_get_peer_cert_der(nc, &der, &der_len) < 0) {
                        unauthorized(req, id, "no Authorization header and no client certificate");
                        return false;
                }
                r = hub_registry_get(hub->registry, id, &dev);
                if (r == -ENOENT) {
                        unauthorized(req, id, "X.509: unknown device");
                        return false;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "Authentication");
                        return false;
                }
                const char *why = dev.status != HUB_DEVICE_ENABLED ? "the device is disabled"
                                  : module                         ? "X.509 is not supported for modules"
                                                                   : gw_auth_x509_check(crt, der, der_len, &dev, NULL,
                                                                                        d->have_ca ? &d->ca_chain : NULL);
                if (why) {
                        char buf[128];
                        snprintf(buf, sizeof buf, "X.509: %s", why);
                        hub_device_done(&dev);
                        unauthorized(req, id, buf);
                        return false;
                }
                s->auth_method = "{\"scope\":\"device\",\"type\":\"x509\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}";
        }
        snprintf(s->generation_id, sizeof s->generation_id, "%s", dev.generation_id);
        hub_device_done(&dev);
done:
        touch(req, dev_get(d, id));
        return true;
}

/* ---- D2C --------------------------------------------------------------------------------- */

/* Applies one IoT Hub HTTP property (a request header, or a key of a batch element's
 * "properties") to m. Returns 0, or an error already answered (-EINVAL / -E2BIG ...). Names
 * that are not message properties (iothub-to, Authorization, ...) are ignored. */
static int apply_property(struct api_req *req, struct hub_msg *m, const char *name, const char *value,
                          bool *ret_content_type) {
        static const struct {
                const char *name;
                enum hub_sys_prop prop;
        } sys[] = {
                { "iothub-messageid", HUB_SYS_MESSAGE_ID },
                { "iothub-correlationid", HUB_SYS_CORRELATION_ID },
                { "iothub-userid", HUB_SYS_USER_ID },
                { "iothub-expiry", HUB_SYS_EXPIRY_TIME },
                { "iothub-contenttype", HUB_SYS_CONTENT_TYPE },
                { "iothub-contentencoding", HUB_SYS_CONTENT_ENCODING },
                { "iothub-creationtimeutc", HUB_SYS_CREATION_TIME },
                { "iothub-creation-time-utc", HUB_SYS_CREATION_TIME },
                { "iothub-interface-id", HUB_SYS_INTERFACE_ID },
                { "dt-subject", HUB_SYS_COMPONENT_NAME },
        };
        int r;

        if (strncasecmp(name, "iothub-app-", 11) == 0) {
                if (name[11] == 0) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Device %s: an iothub-app- property needs a name",
                                        req->device_id);
                        return -EINVAL;
                }
                r = hub_msg_set_prop(m, name + 11, value);
                if (r == -E2BIG) {
                        api_reply_error(req, 413, "MessageTooLarge",
                                        "Device %s: the message with its properties is over %u bytes", req->device_id,
                                        HUB_MSG_D2C_MAX_SIZE);
                        return r;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "Message property");
                        return r;
                }
                return 0;
        }
        for (size_t i = 0; i < ELEMENTSOF(sys); i++) {
                if (strcasecmp(name, sys[i].name) != 0)
                        continue;
                if ((sys[i].prop == HUB_SYS_MESSAGE_ID || sys[i].prop == HUB_SYS_CORRELATION_ID) &&
                    strlen(value) > HUB_MSG_ID_MAX_LEN) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Device %s: %s is longer than %u characters",
                                        req->device_id, sys[i].name, HUB_MSG_ID_MAX_LEN);
                        return -EINVAL;
                }
                r = hub_msg_set_sys(m, sys[i].prop, value);
                if (r == -E2BIG) {
                        api_reply_error(req, 413, "MessageTooLarge", "Device %s: the message is over %u bytes",
                                        req->device_id, HUB_MSG_D2C_MAX_SIZE);
                        return r;
                }
                if (r < 0) {
                        api_reply_error(req, 400, "ArgumentInvalid", "Device %s: invalid %s", req->device_id,
                                        sys[i].name);
                        return r;
                }
                if (sys[i].prop == HUB_SYS_CONTENT_TYPE && ret_content_type)
                        *ret_content_type = true;
                return 0;
        }
        return 0;
}

static int stamp(struct api_req *req, struct hub_msg *m) {
        struct dev_req *s = req->state;
        char t[32];
        int r;
        if ((r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, req->device_id)) < 0 ||
            (s->module_id && (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_MODULE_ID, s->module_id)) < 0) ||
            (s->generation_id[0] && (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_AUTH_GENERATION_ID, s->generation_id)) < 0) ||
            (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_AUTH_METHOD, s->auth_method)) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "Telemetry")) < 0 ||
            (r = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, hub_time_format_iso8601(api_now(), t))) < 0) {
                if (r == -E2BIG)
                        api_reply_error(req, 413, "MessageTooLarge",
                                        "Device %s: the message is over %u bytes with the hub's properties",
                                        req->device_id, HUB_MSG_D2C_MAX_SIZE);
                else
                        api_reply_errno(req, r, "Message");
                return r;
        }
        return 0;
}

/* One message from the request: body bytes, headers as properties. */
static int single_message(struct api_req *req, struct hub_msg **ret) {
        const struct gw_http_request *hr = req->hr;
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        bool has_ct = false;
        int r;

        r = hub_msg_new(hr->body, hr->body_len, HUB_MSG_D2C_MAX_SIZE, &m);
        if (r == -E2BIG) {
                api_reply_error(req, 413, "MessageTooLarge", "Device %s: the message (%zu bytes) is over %u bytes",
                                req->device_id, hr->body_len, HUB_MSG_D2C_MAX_SIZE);
                return r;
        }
        if (r < 0) {
                api_reply_errno(req, r, "Message");
                return r;
        }
        for (size_t i = 0; i < hr->n_headers; i++) {
                r = apply_property(req, m, hr->headers[i].name, hr->headers[i].value, &has_ct);
                if (r < 0)
                        return r;
        }
        /* Content-Type gives contentType when iothub-contenttype does not (octet-stream is the
         * SDKs' default for "opaque bytes" and says nothing). */
        const char *ct = gw_http_header_get(hr, "Content-Type");
        if (!has_ct && ct && strncasecmp(ct, "application/octet-stream", 24) != 0) {
                r = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, ct);
                if (r < 0) {
                        api_reply_error(req, 413, "MessageTooLarge", "Device %s: the message is over %u bytes",
                                        req->device_id, HUB_MSG_D2C_MAX_SIZE);
                        return r;
                }
        }
        r = stamp(req, m);
        if (r < 0)
                return r;
        *ret = TAKE_PTR(m);
        return 0;
}

/* A batch (reference §3.3): a JSON array of {"body", "base64Encoded", "properties"}. */
static int batch_messages(struct api_req *req, struct hub_msg ***ret, size_t *ret_n) {
        const struct gw_http_request *hr = req->hr;
        json_error_t err;
        struct hub_msg **v = NULL;
        size_t n = 0;
        int r = -EINVAL;

        if (hr->body_len > BATCH_MAX_BYTES) {
                api_reply_error(req, 413, "MessageTooLarge", "Device %s: the batch (%zu bytes) is over %u bytes",
                                req->device_id, hr->body_len, BATCH_MAX_BYTES);
                return -E2BIG;
        }
        json_t *j = json_loadb((const char *) hr->body, hr->body_len, JSON_REJECT_DUPLICATES, &err);
        if (!j) {
                api_reply_error(req, 400, "IotHubFormatError", "Device %s: the batch is not valid JSON: %s at line %d column %d",
                                req->device_id, err.text, err.line, err.column);
                return -EINVAL;
        }
        if (!json_is_array(j) || json_array_size(j) == 0 || json_array_size(j) > BATCH_MAX_MESSAGES) {
                api_reply_error(req, 400, "ArgumentInvalid",
                                "Device %s: a batch must be a JSON array of 1 to %u messages", req->device_id,
                                BATCH_MAX_MESSAGES);
                goto fail;
        }
        v = calloc(json_array_size(j), sizeof *v);
        if (!v) {
                api_reply_errno(req, r = -ENOMEM, "Batch");
                goto fail;
        }
        for (size_t i = 0; i < json_array_size(j); i++) {
                json_t *e = json_array_get(j, i), *body = json_object_get(e, "body"),
                       *b64 = json_object_get(e, "base64Encoded"), *props = json_object_get(e, "properties");
                _cleanup_free_ uint8_t *data = NULL;
                _cleanup_free_ char *text = NULL;
                const void *p = NULL;
                size_t len = 0;
                bool is_b64 = !b64 || json_is_true(b64);

                if (!json_is_object(e) || !body || (b64 && !json_is_boolean(b64)) || (props && !json_is_object(props))) {
                        api_reply_error(req, 400, "ArgumentInvalid",
                                        "Device %s: batch element %zu must be an object with \"body\", an optional "
                                        "boolean \"base64Encoded\" and an optional object \"properties\"",
                                        req->device_id, i);
                        goto fail;
                }
                if (is_b64) {
                        if (!json_is_string(body) ||
                            hub_base64_decode(json_string_value(body), json_string_length(body), &data, &len) < 0) {
                                api_reply_error(req, 400, "ArgumentInvalid",
                                                "Device %s: the body of batch element %zu is not base64", req->device_id, i);
                                goto fail;
                        }
                        p = data;
                } else if (json_is_string(body)) {
                        p = json_string_value(body);
                        len = json_string_length(body);
                } else {
                        text = hub_json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY);
                        if (!text) {
                                api_reply_errno(req, r = -ENOMEM, "Batch");
                                goto fail;
                        }
                        p = text;
                        len = strlen(text);
                }
                r = hub_msg_new(p, len, HUB_MSG_D2C_MAX_SIZE, &v[n]);
                if (r == -E2BIG) {
                        api_reply_error(req, 413, "MessageTooLarge", "Device %s: batch element %zu is over %u bytes",
                                        req->device_id, i, HUB_MSG_D2C_MAX_SIZE);
                        goto fail;
                }
                if (r < 0) {
                        api_reply_errno(req, r, "Batch");
                        goto fail;
                }
                n++;
                const char *k;
                json_t *pv;
                json_object_foreach (props, k, pv) {
                        if (!json_is_string(pv)) {
                                api_reply_error(req, 400, "ArgumentInvalid",
                                                "Device %s: property %.64s of batch element %zu is not a string",
                                                req->device_id, k, i);
                                r = -EINVAL;
                                goto fail;
                        }
                        r = apply_property(req, v[n - 1], k, json_string_value(pv), NULL);
                        if (r < 0)
                                goto fail;
                }
                r = stamp(req, v[n - 1]);
                if (r < 0)
                        goto fail;
        }
        json_decref(j);
        *ret = v;
        *ret_n = n;
        return 0;
fail:
        for (size_t i = 0; i < n; i++)
                hub_msg_unref(v[i]);
        free(v);
        json_decref(j);
        return r < 0 ? r : -EINVAL;
}

struct append_ctx {
        struct api_req *req;
        size_t pending;
        int error;
};

static void append_reply(struct append_ctx *ac) {
        struct api_req *req = ac->req;
        int r = ac->error;
        free(ac);
        if (r == 0)
                api_reply(req, 204, NULL, NULL, NULL, 0);
        else if (r == -ENOBUFS)
                api_reply_error(req, 503, "ServiceUnavailable",
                                "Device %s: the hub's message store is full; try again later", req->device_id);
        else
                api_reply_error(req, r == -E2BIG ? 413 : 500, r == -E2BIG ? "MessageTooLarge" : "ServerError",
                                "Device %s: the message could not be stored: %s", req->device_id, strerror(-r));
}

static void append_done(int result, uint64_t seq, void *ud) {
        struct append_ctx *ac = ud;
        (void) seq;
        if (result < 0 && ac->error == 0)
                ac->error = result;
        if (--ac->pending == 0)
                append_reply(ac);
}

/* Appends every message of the request (one group commit: they are queued back to back) and
 * answers 204 once all are durable. */
static void append_all(struct api_req *req) {
        struct dev_req *s = req->state;
        struct append_ctx *ac = calloc(1, sizeof *ac);
        if (!ac) {
                api_reply_errno(req, -ENOMEM, "Message");
                return;
        }
        ac->req = req;
        ac->pending = 1; /* held while queuing */
        for (size_t i = 0; i < s->n_msgs; i++) {
                int r = hub_outbox_append(api_hub(req)->outbox, s->msgs[i], append_done, ac);
                if (r < 0) {
                        ac->error = r;
                        break;
                }
                ac->pending++;
        }
        append_done(0, 0, ac);
}

static int on_shaped(sd_event_source *src, uint64_t usec, void *ud) {
        struct api_req *req = ud;
        struct dev_req *s = req->state;
        (void) src;
        (void) usec;
        req->loop_driven = false;
        s->timer = sd_event_source_disable_unref(s->timer);
        if (req->detached || !req->api) {
                api_reply(req, 503, NULL, NULL, NULL, 0); /* frees it */
                return 0;
        }
        append_all(req);
        return 0;
}

void api_dev_events(struct api_req *req) {
        struct dev_req *s = req->state;
        struct api_device *d = api_get_device(req->api);
        const char *ct = api_header(req, "Content-Type");
        int r;

        if (ct && strncasecmp(ct, "application/vnd.microsoft.iothub.json", 37) == 0)
                r = batch_messages(req, &s->msgs, &s->n_msgs);
        else {
                s->msgs = calloc(1, sizeof *s->msgs);
                if (!s->msgs) {
                        api_reply_errno(req, -ENOMEM, "Message");
                        return;
                }
                r = single_message(req, &s->msgs[0]);
                if (r >= 0)
                        s->n_msgs = 1;
        }
        if (r < 0)
                return; /* answered */

        int64_t wait = throttle(d, dev_get(d, req->device_id), s->n_msgs);
        if (wait < 0) {
                gw_log_full(LOG_NOTICE, 0,
                            GW_FIELDS(.component = "api", .device = req->device_id, .event = "throttled",
                                      .ratelimit_key = "http-device-throttled"),
                            "HTTP device %s sends more than %u messages/s; refusing with 429", req->device_id, d->rate);
                api_reply_error(req, 429, "ThrottlingException",
                                "Device %s: more than %u messages per second", req->device_id, d->rate);
                return;
        }
        r = api_req_go_async(req, NULL);
        if (r < 0) {
                api_reply_errno(req, r, "Message");
                return;
        }
        if (wait == 0) {
                append_all(req);
                return;
        }
        /* Traffic shaping: the answer is delayed, the messages are kept. */
        r = sd_event_add_time_relative(api_event(req), &s->timer, CLOCK_BOOTTIME, (uint64_t) wait, 1000, on_shaped,
                                       req);
        if (r < 0) {
                append_all(req);
                return;
        }
        req->loop_driven = true;
}

/* ---- C2D --------------------------------------------------------------------------------- */

static void c2d_received(int r, const struct hub_queue_delivery *dl, void *ud) {
        struct api_req *req = ud;
        char t[32], num[24];

        if (r == -ENOENT) {
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", req->device_id);
                return;
        }
        if (r < 0) {
                api_reply_errno(req, r, "C2D receive");
                return;
        }
        if (!dl) {
                api_reply(req, 204, NULL, NULL, NULL, 0);
                return;
        }
        struct hub_msg *m = dl->msg;
        json_t *h = api_etag_header(NULL, dl->lock_token);
        static const struct {
                const char *name;
                enum hub_sys_prop prop;
        } sys[] = {
                { "iothub-messageid", HUB_SYS_MESSAGE_ID },  { "iothub-to", HUB_SYS_TO },
                { "iothub-correlationid", HUB_SYS_CORRELATION_ID }, { "iothub-userid", HUB_SYS_USER_ID },
                { "iothub-ack", HUB_SYS_ACK },               { "ContentType", HUB_SYS_CONTENT_TYPE },
                { "ContentEncoding", HUB_SYS_CONTENT_ENCODING },
        };
        for (size_t i = 0; i < ELEMENTSOF(sys); i++) {
                const char *v = hub_msg_get_sys(m, sys[i].prop);
                if (v)
                        json_object_set_new(h, sys[i].name, json_string(v));
        }
        if (!json_object_get(h, "iothub-ack"))
                json_object_set_new(h, "iothub-ack", json_string("none"));
        snprintf(num, sizeof num, "%" PRIu64, dl->sequence_number);
        json_object_set_new(h, "iothub-sequencenumber", json_string(num));
        json_object_set_new(h, "iothub-enqueuedtime", json_string(hub_time_format_iso8601(dl->enqueued_usec, t)));
        if (dl->expiry_usec)
                json_object_set_new(h, "iothub-expiry", json_string(hub_time_format_iso8601(dl->expiry_usec, t)));
        snprintf(num, sizeof num, "%" PRIu32, dl->delivery_count);
        json_object_set_new(h, "iothub-deliverycount", json_string(num));
        for (size_t i = 0; i < hub_msg_n_props(m); i++) {
                const struct hub_msg_prop *p = hub_msg_prop_at(m, i);
                char name[300];
                /* Only what an HTTP header can carry. */
                bool ok = strlen(p->name) < sizeof name - 11;
                for (const char *c = p->name; ok && *c; c++)
                        ok = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
                             strchr("!#$%&'*+-.^_`|~", *c);
                for (const char *c = p->value ? p->value : ""; ok && *c; c++)
                        ok = (unsigned char) *c >= 0x20 && *c != 0x7f;
                if (!ok) {
                        gw_log_full(LOG_NOTICE, 0, GW_FIELDS(.component = "api", .device = req->device_id),
                                    "C2D message to HTTP device %s: property %.64s cannot be sent as a header; dropped",
                                    req->device_id, p->name);
                        continue;
                }
                snprintf(name, sizeof name, "iothub-app-%s", p->name);
                json_object_set_new(h, name, json_string(p->value ? p->value : ""));
        }
        size_t len = 0;
        const void *body = hub_msg_body(m, &len);
        api_reply(req, 200, h, NULL, body, len);
}

void api_dev_c2d_receive(struct api_req *req) {
        uint64_t lock = 0;
        const char *v = api_header(req, "iothub-messagelocktimeout");
        if (!v)
                v = api_param(req, "iothub-messagelocktimeout");
        if (v) {
                char *end;
                errno = 0;
                unsigned long long t = strtoull(v, &end, 10);
                if (!*v || *v == '-' || *end || errno || t == 0 || t > 86400) {
                        api_reply_error(req, 400, "ArgumentInvalid",
                                        "Device %s: iothub-messagelocktimeout must be a number of seconds (5 to 300)",
                                        req->device_id);
                        return;
                }
                lock = t * USEC_PER_SEC; /* the queue clamps to 5 .. 300 s */
        }
        int r = api_req_go_async(req, NULL);
        if (r >= 0)
                r = hub_queue_receive(api_hub(req)->queue, req->device_id, lock, api_now(), c2d_received, req);
        if (r < 0)
                api_reply_errno(req, r, "C2D receive");
}

static void c2d_settled(int r, void *ud) {
        struct api_req *req = ud;
        if (r == -ENOLCK || r == -ESTALE) {
                api_reply_error(req, 412, "DeviceMessageLockLost",
                                "Device %s: the lock token is unknown or its lock has expired", req->device_id);
                return;
        }
        if (r == -ENOENT) {
                api_reply_error(req, 404, "DeviceNotFound", "Device %s not found", req->device_id);
                return;
        }
        if (r < 0) {
                api_reply_errno(req, r, "C2D settlement");
                return;
        }
        api_reply(req, 204, NULL, NULL, NULL, 0);
}

void api_dev_c2d_settle(struct api_req *req) {
        char token[HUB_QUEUE_LOCK_TOKEN_MAX + 1];
        const char *t = req->seg[4];
        size_t l = strlen(t);
        bool abandon = req->n_seg == 6;
        bool reject = !abandon && api_param(req, "reject") != NULL;

        if (l >= 2 && t[0] == '"' && t[l - 1] == '"') {
                t++;
                l -= 2;
        }
        if (l == 0 || l > HUB_QUEUE_LOCK_TOKEN_MAX) {
                api_reply_error(req, 412, "DeviceMessageLockLost",
                                "Device %s: the lock token is unknown or its lock has expired", req->device_id);
                return;
        }
        memcpy(token, t, l);
        token[l] = 0;
        int r = api_req_go_async(req, NULL);
        if (r >= 0) {
                struct hub_queue *q = api_hub(req)->queue;
                if (abandon)
                        r = hub_queue_abandon(q, req->device_id, token, api_now(), c2d_settled, req);
                else if (reject)
                        r = hub_queue_reject(q, req->device_id, token, api_now(), c2d_settled, req);
                else
                        r = hub_queue_complete(q, req->device_id, token, api_now(), c2d_settled, req);
        }
        if (r < 0)
                api_reply_errno(req, r, "C2D settlement");
}

/* ---- file upload: names, tokens ---------------------------------------------------------- */

/* A file-system name for s: [A-Za-z0-9_-] and '.' (not leading a segment) as they are,
 * everything else %XX; with keep_slash, '/' separates directories. */
static char *fs_name(const char *s, bool keep_slash) {
        size_t n = strlen(s);
        char *o = malloc(3 * n + 1), *p = o;
        if (!o)
                return NULL;
        bool seg_start = true;
        for (; *s; s++) {
                unsigned char c = (unsigned char) *s;
                if (keep_slash && c == '/') {
                        *p++ = '/';
                        seg_start = true;
                        continue;
                }
                if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                    c == '-' || (c == '.' && !seg_start))
                        *p++ = (char) c;
                else
                        p += sprintf(p, "%%%02X", c);
                seg_start = false;
        }
        *p = 0;
        return o;
}

/* blobName as IoT Hub accepts it: 1..1024 characters, segments separated by '/' that are
 * neither empty nor "." / "..", no control characters or backslashes. */
static bool blob_name_valid(const char *b) {
        size_t n = strlen(b);
        if (n == 0 || n > BLOB_NAME_MAX || b[0] == '/' || b[n - 1] == '/')
                return false;
        for (const char *p = b; *p; p++)
                if ((unsigned char) *p < 0x20 || *p == 0x7f || *p == '\\')
                        return false;
        for (const char *p = b; *p;) {
                size_t l = strcspn(p, "/");
                if (l == 0 || (l == 1 && p[0] == '.') || (l == 2 && p[0] == '.' && p[1] == '.'))
                        return false;
                p += l;
                if (*p == '/')
                        p++;
        }
        return true;
}

static int hmac_b64(struct api_device *d, const char *what, char **ret) {
        uint8_t mac[32];
        if (mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), d->key, sizeof d->key,
                            (const unsigned char *) what, strlen(what), mac) != 0)
                return -EIO;
        return hub_base64_encode(mac, sizeof mac, ret);
}

/* The signed string of a blob SAS: permissions, expiry (as in the token), the blob. */
static int blob_sig(struct api_device *d, const char *blob_full, const char *se, char **ret) {
        _cleanup_free_ char *what = NULL;
        if (asprintf(&what, "blob\nrw\n%s\n/" BLOB_CONTAINER "/%s", se, blob_full) < 0)
                return -ENOMEM;
        return hmac_b64(d, what, ret);
}

static bool const_eq(const char *a, const char *b) {
        size_t la = strlen(a), lb = strlen(b);
        unsigned char x = la != lb;
        for (size_t i = 0; i < la && i < lb; i++)
                x |= (unsigned char) (a[i] ^ b[i]);
        return x == 0;
}

/* base64url without padding */
static char *b64url(const char *b64) {
        char *o = strdup(b64);
        if (!o)
                return NULL;
        char *w = o;
        for (const char *p = b64; *p; p++)
                if (*p == '+')
                        *w++ = '-';
                else if (*p == '/')
                        *w++ = '_';
                else if (*p != '=')
                        *w++ = *p;
        *w = 0;
        return o;
}

/* correlationId = base64url("<expiry usec>\n<device>/<blob>") "." base64url(HMAC) */
static int correlation_make(struct api_device *d, uint64_t expiry, const char *blob_full, char **ret) {
        _cleanup_free_ char *plain = NULL, *p64 = NULL, *what = NULL, *mac = NULL, *a = NULL, *b = NULL;
        if (asprintf(&plain, "%" PRIu64 "\n%s", expiry, blob_full) < 0)
                return -ENOMEM;
        int r = hub_base64_encode(plain, strlen(plain), &p64);
        if (r < 0)
                return r;
        if (asprintf(&what, "corr\n%s", plain) < 0)
                return -ENOMEM;
        r = hmac_b64(d, what, &mac);
        if (r < 0)
                return r;
        a = b64url(p64);
        b = b64url(mac);
        if (!a || !b || asprintf(ret, "%s.%s", a, b) < 0)
                return -ENOMEM;
        return 0;
}

/* Checks a correlation id; gives the blob ("<device>/<blob>") and its SAS expiry. -EINVAL. */
static int correlation_check(struct api_device *d, const char *corr, char **ret_blob, uint64_t *ret_expiry) {
        const char *dot = strrchr(corr, '.');
        if (!dot || dot == corr || strlen(corr) > 4096)
                return -EINVAL;
        size_t l = (size_t) (dot - corr);
        _cleanup_free_ char *std = malloc(l + 4);
        if (!std)
                return -ENOMEM;
        size_t o = 0;
        for (size_t i = 0; i < l; i++) {
                char c = corr[i];
                if (c == '-')
                        c = '+';
                else if (c == '_')
                        c = '/';
                else if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
                        return -EINVAL;
                std[o++] = c;
        }
        while (o % 4)
                std[o++] = '=';
        std[o] = 0;
        _cleanup_free_ uint8_t *plain = NULL;
        size_t plen;
        if (hub_base64_decode(std, o, &plain, &plen) < 0 || strlen((char *) plain) != plen)
                return -EINVAL;
        char *nl = strchr((char *) plain, '\n');
        if (!nl)
                return -EINVAL;
        *nl = 0;
        char *end;
        errno = 0;
        unsigned long long exp = strtoull((char *) plain, &end, 10);
        if (*end || errno || !blob_name_valid(nl + 1))
                return -EINVAL;
        _cleanup_free_ char *expect = NULL;
        int r = correlation_make(d, exp, nl + 1, &expect);
        if (r < 0)
                return r;
        if (!const_eq(expect, corr))
                return -EINVAL;
        char *blob = strdup(nl + 1);
        if (!blob)
                return -ENOMEM;
        *ret_blob = blob;
        *ret_expiry = exp;
        return 0;
}

/* The host name (with port) devices reach us at: the request's Host when it is a plain
 * host[:port], else hub.host_name with the listener's port (unless 443). */
static const char *request_host(struct api_req *req, char buf[static 300]) {
        const char *h = req->hr ? req->hr->host : NULL;
        if (h && *h && strlen(h) < 300) {
                bool ok = true;
                for (const char *p = h; *p && ok; p++)
                        ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                             strchr(".-:[]", *p);
                if (ok) {
                        snprintf(buf, 300, "%s", h);
                        return buf;
                }
        }
        struct gw_net_conn *nc = api_req_net_conn(req);
        uint16_t port = nc ? gw_net_listener_get_port(gw_net_conn_get_listener(nc)) : 443;
        if (port != 443)
                snprintf(buf, 300, "%s:%u", api_host_names(req->api)[0], port);
        else
                snprintf(buf, 300, "%s", api_host_names(req->api)[0]);
        return buf;
}

/* ---- file upload: the IoT Hub side -------------------------------------------------------- */

void api_dev_file_init(struct api_req *req) {
        struct api_device *d = api_get_device(req->api);
        json_t *j = NULL;
        char host[300], se[32];

        if (api_body_json(req, &j) < 0)
                return;
        json_t *bn = json_object_get(j, "blobName");
        if (!json_is_object(j) || !json_is_string(bn) || !blob_name_valid(json_string_value(bn))) {
                json_decref(j);
                api_reply_error(req, 400, "ArgumentInvalid",
                                "Device %s: expected {\"blobName\":\"...\"} with a blob name of 1 to %u characters, "
                                "'/'-separated segments that are not empty, '.' or '..'",
                                req->device_id, BLOB_NAME_MAX);
                return;
        }
        struct dev_entry *e = dev_get(d, req->device_id);
        if (!e) {
                json_decref(j);
                api_reply_errno(req, -ENOMEM, "File upload");
                return;
        }
        uint64_t now_mono = mono();
        entry_prune_uploads(e, now_mono);
        if (e->n_uploads >= d->max_concurrent) {
                json_decref(j);
                api_reply_error(req, 403, "DeviceMaximumActiveFileUploadLimitExceeded",
                                "Device %s already has %u active file uploads", req->device_id, e->n_uploads);
                return;
        }
        _cleanup_free_ char *blob_full = NULL, *sig = NULL, *sig_enc = NULL, *se_enc = NULL, *corr = NULL,
                            *sas = NULL;
        uint64_t expiry = (api_now() / USEC_PER_SEC) * USEC_PER_SEC + d->sas_ttl_usec;
        hub_time_format_iso8601(expiry, se);
        int r = asprintf(&blob_full, "%s/%s", req->device_id, json_string_value(bn)) < 0 ? -ENOMEM : 0;
        json_decref(j);
        if (r >= 0)
                r = blob_sig(d, blob_full, se, &sig);
        if (r >= 0)
                r = hub_url_encode(sig, &sig_enc);
        if (r >= 0)
                r = hub_url_encode(se, &se_enc);
        if (r >= 0)
                r = correlation_make(d, expiry, blob_full, &corr);
        if (r >= 0 && asprintf(&sas, "?sv=" BLOB_SAS_VERSION "&sr=b&sig=%s&se=%s&sp=rw", sig_enc, se_enc) < 0)
                r = -ENOMEM;
        struct upload *u = r >= 0 ? calloc(1, sizeof *u) : NULL;
        if (r >= 0 && (!u || !(u->correlation_id = strdup(corr)))) {
                free(u);
                r = -ENOMEM;
        }
        if (r < 0) {
                api_reply_errno(req, r, "File upload");
                return;
        }
        u->expiry_mono = now_mono + d->sas_ttl_usec;
        u->next = e->uploads;
        e->uploads = u;
        e->n_uploads++;
        gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "api", .device = req->device_id, .event = "upload-started"),
                    "HTTP device %s starts a file upload of %s", req->device_id, blob_full);
        api_reply_json(req, 200,
                       json_pack("{s:s, s:s, s:s, s:s, s:s}", "correlationId", corr, "hostName", request_host(req, host),
                                 "containerName", BLOB_CONTAINER, "blobName", blob_full, "sasToken", sas),
                       NULL);
}

static void notify_appended(int result, uint64_t seq, void *ud) {
        struct api_req *req = ud;
        (void) seq;
        if (result < 0) {
                api_reply_error(req, 500, "ServerError", "Device %s: the file upload notification could not be stored: %s",
                                req->device_id, strerror(-result));
                return;
        }
        api_reply(req, 204, NULL, NULL, NULL, 0);
}

static char *blob_path(struct api_device *d, const char *blob_full) {
        /* blob_full = "<device>/<blob>"; the device id holds no '/' */
        const char *slash = strchr(blob_full, '/');
        if (!slash)
                return NULL;
        _cleanup_free_ char *dev = strndup(blob_full, (size_t) (slash - blob_full));
        _cleanup_free_ char *dn = dev ? fs_name(dev, false) : NULL, *bn = fs_name(slash + 1, true);
        char *p = NULL;
        if (!dn || !bn || asprintf(&p, "%s/%s/%s", d->dir, dn, bn) < 0)
                return NULL;
        return p;
}

void api_dev_file_notify(struct api_req *req) {
        struct api_device *d = api_get_device(req->api);
        json_t *j = NULL;
        bool legacy = req->n_seg == 5;
        char host[300];

        if (api_body_json(req, &j) < 0)
                return;
        json_t *corr = legacy ? NULL : json_object_get(j, "correlationId"), *ok = json_object_get(j, "isSuccess"),
               *code = json_object_get(j, "statusCode"), *desc = json_object_get(j, "statusDescription");
        if (!json_is_object(j) || (!legacy && !json_is_string(corr)) || !json_is_boolean(ok) ||
            (code && !json_is_integer(code) && !json_is_null(code)) || (desc && !json_is_string(desc) && !json_is_null(desc))) {
                json_decref(j);
                api_reply_error(req, 400, "ArgumentInvalid",
                                "Device %s: expected {\"correlationId\":\"...\",\"isSuccess\":true|false,"
                                "\"statusCode\":n,\"statusDescription\":\"...\"}",
                                req->device_id);
                return;
        }
        const char *cid = legacy ? req->seg[4] : json_string_value(corr);
        bool success = json_is_true(ok);
        int status = code && json_is_integer(code) ? (int) json_integer_value(code) : 0;
        _cleanup_free_ char *description = desc && json_is_string(desc) ? strndup(json_string_value(desc), 256) : NULL;
        _cleanup_free_ char *blob_full = NULL, *cid_copy = strdup(cid);
        uint64_t expiry = 0;
        json_decref(j);
        if (!cid_copy) {
                api_reply_errno(req, -ENOMEM, "File upload notification");
                return;
        }
        int r = correlation_check(d, cid_copy, &blob_full, &expiry);
        size_t dl = strlen(req->device_id);
        if (r < 0 || strncmp(blob_full, req->device_id, dl) != 0 || blob_full[dl] != '/' ||
            expiry + UPLOAD_NOTIFY_GRACE_USEC < api_now()) {
                api_reply_error(req, 400, "ArgumentInvalid",
                                "Device %s: the correlationId is not one of this device's file uploads, or too old",
                                req->device_id);
                return;
        }
        /* The upload is over: its slot is free. */
        struct dev_entry *e = dev_get(d, req->device_id);
        for (struct upload **pu = e ? &e->uploads : NULL; pu && *pu; pu = &(*pu)->next)
                if (streq((*pu)->correlation_id, cid_copy)) {
                        struct upload *u = *pu;
                        *pu = u->next;
                        upload_free(u);
                        e->n_uploads--;
                        break;
                }
        gw_log_full(LOG_INFO, 0, GW_FIELDS(.component = "api", .device = req->device_id, .event = "upload-finished"),
                    "HTTP device %s finished the file upload of %s: %s (%d %s)", req->device_id, blob_full,
                    success ? "success" : "failure", status, description ? description : "");
        if (!success) {
                api_reply(req, 204, NULL, NULL, NULL, 0);
                return;
        }
        _cleanup_free_ char *path = blob_path(d, blob_full);
        struct stat st;
        if (!path || stat(path, &st) < 0 || !S_ISREG(st.st_mode)) {
                gw_log_full(LOG_WARNING, 0, GW_FIELDS(.component = "api", .device = req->device_id),
                            "HTTP device %s reports a successful upload of %s, but no such blob was written; no notification",
                            req->device_id, blob_full);
                api_reply(req, 204, NULL, NULL, NULL, 0);
                return;
        }

        /* The notification of reference §5.8, as a message of the events stream. */
        char t_mod[32], t_now[32];
        _cleanup_free_ char *uri = NULL, *body = NULL;
        char mid_hex[33];
        hub_time_format_iso8601((uint64_t) st.st_mtim.tv_sec * USEC_PER_SEC + (uint64_t) st.st_mtim.tv_nsec / 1000, t_mod);
        hub_time_format_iso8601(api_now(), t_now);
        if (asprintf(&uri, "https://%s/" BLOB_CONTAINER "/%s", request_host(req, host), blob_full) < 0) {
                api_reply_errno(req, -ENOMEM, "File upload notification");
                return;
        }
        json_t *n = json_pack("{s:s, s:s, s:s, s:s, s:I, s:s}", "deviceId", req->device_id, "blobUri", uri, "blobName",
                              blob_full, "lastUpdatedTime", t_mod, "blobSizeInBytes", (json_int_t) st.st_size,
                              "enqueuedTimeUtc", t_now);
        body = n ? hub_json_dumps(n, JSON_COMPACT) : NULL;
        json_decref(n);
        _cleanup_(hub_msg_unrefp) struct hub_msg *m = NULL;
        r = body ? hub_msg_new(body, strlen(body), HUB_MSG_D2C_MAX_SIZE, &m) : -ENOMEM;
        if (r >= 0 && hub_random_hex(mid_hex, 16) < 0)
                r = -EIO;
        struct gw_hub *hub = api_hub(req);
        if (r >= 0 && ((r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_ID, mid_hex)) < 0 ||
                       (r = hub_msg_set_sys(m, HUB_SYS_CORRELATION_ID, cid_copy)) < 0 ||
                       (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_TYPE, "application/json")) < 0 ||
                       (r = hub_msg_set_sys(m, HUB_SYS_CONTENT_ENCODING, "utf-8")) < 0 ||
                       (hub->hub_name && (r = hub_msg_set_sys(m, HUB_SYS_USER_ID, hub->hub_name)) < 0) ||
                       (r = hub_msg_set_sys(m, HUB_SYS_CONNECTION_DEVICE_ID, req->device_id)) < 0 ||
                       (r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SOURCE, "fileNotifications")) < 0 ||
                       (r = hub_msg_set_sys(m, HUB_SYS_MESSAGE_SCHEMA, "fileUploadNotification")) < 0 ||
                       (r = hub_msg_set_sys(m, HUB_SYS_ENQUEUED_TIME, t_now)) < 0 ||
                       (hub->hub_name && (r = hub_msg_set_prop(m, "hubName", hub->hub_name)) < 0) ||
                       (r = hub_msg_set_prop(m, "deviceId", req->device_id)) < 0 ||
                       (r = hub_msg_set_prop(m, "operationTimestamp", t_now)) < 0 ||
                       (r = hub_msg_set_prop(m, "iothub-message-schema", "fileUploadNotification")) < 0))
                gw_log_full(LOG_WARNING, r, GW_FIELDS(.component = "api", .device = req->device_id),
                            "Cannot build the file upload notification of device %s: %m", req->device_id);
        if (r >= 0)
                r = api_req_go_async(req, NULL);
        if (r >= 0)
                r = hub_outbox_append(hub->outbox, m, notify_appended, req);
        if (r < 0)
                api_reply_errno(req, r, "File upload notification");
}

/* ---- file upload: the blob side ----------------------------------------------------------- */

static char *blob_full_of(struct api_req *req) {
        /* seg: uploads / device / blob... */
        size_t n = 0;
        for (size_t i = 1; i < req->n_seg; i++)
                n += strlen(req->seg[i]) + 1;
        char *s = malloc(n + 1), *p = s;
        if (!s)
                return NULL;
        for (size_t i = 1; i < req->n_seg; i++)
                p += sprintf(p, "%s%s", i > 1 ? "/" : "", req->seg[i]);
        return s;
}

static bool blob_authorize(struct api_req *req) {
        struct api_device *d = api_get_device(req->api);
        const char *sig = api_param(req, "sig"), *se = api_param(req, "se"), *sp = api_param(req, "sp"),
                   *sr = api_param(req, "sr");
        uint64_t expiry = 0;

        if (req->internal)
                return true;
        _cleanup_free_ char *blob_full = blob_full_of(req);
        if (!blob_full) {
                blob_error(req, 500, "InternalError", "out of memory");
                return false;
        }
        if (!sig || !se || !sp || !sr) {
                blob_error(req, 403, "AuthenticationFailed", "Blob %s: the request has no SAS (sig, se, sp, sr)", blob_full);
                return false;
        }
        if (hub_time_parse_iso8601(se, &expiry) < 0 || expiry < api_now()) {
                blob_error(req, 403, "AuthenticationFailed", "Blob %s: the SAS has expired or its se is not valid",
                           blob_full);
                return false;
        }
        _cleanup_free_ char *expect = NULL;
        if (!streq(sr, "b") || !strchr(sp, 'w') || blob_sig(d, blob_full, se, &expect) < 0 || !const_eq(expect, sig)) {
                blob_error(req, 403, "AuthenticationFailed",
                           "Blob %s: the SAS signature does not match (a token is scoped to one blob)", blob_full);
                return false;
        }
        return true;
}

static int mkdir_p(const char *path, size_t upto) {
        char buf[PATH_MAX];
        if (upto >= sizeof buf)
                return -ENAMETOOLONG;
        memcpy(buf, path, upto);
        buf[upto] = 0;
        for (char *p = buf + 1; *p; p++)
                if (*p == '/') {
                        *p = 0;
                        if (mkdir(buf, 0700) < 0 && errno != EEXIST)
                                return -errno;
                        *p = '/';
                }
        if (mkdir(buf, 0700) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

static int fsync_dir_of(const char *path) {
        _cleanup_free_ char *dir = strdup(path);
        if (!dir)
                return -ENOMEM;
        char *s = strrchr(dir, '/');
        if (s)
                *s = 0;
        int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
                return -errno;
        int r = fsync(fd) < 0 ? -errno : 0;
        close(fd);
        return r;
}

static int write_all(int fd, const uint8_t *p, size_t left) {
        while (left > 0) {
                ssize_t w = write(fd, p, left);
                if (w < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += w;
                left -= (size_t) w;
        }
        return 0;
}

/* Appends the whole file src to fd, 64 KiB at a time. */
static int copy_file(int fd, const char *src) {
        uint8_t buf[65536];
        int in = open(src, O_RDONLY | O_CLOEXEC);
        if (in < 0)
                return -errno;
        int r = 0;
        for (;;) {
                ssize_t k = read(in, buf, sizeof buf);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        r = k < 0 ? -errno : 0;
                        break;
                }
                r = write_all(fd, buf, (size_t) k);
                if (r < 0)
                        break;
        }
        close(in);
        return r;
}

/* Writes the n parts (concatenated) to path durably: temporary file, fsync, rename, fsync of
 * the directory. A part whose iov_base is NULL is the file named by srcs[i] (srcs may be NULL
 * otherwise). */
static int write_file_from(const char *path, const struct iovec *parts, char *const *srcs, size_t n) {
        const char *slash = strrchr(path, '/');
        int r = mkdir_p(path, (size_t) (slash - path));
        if (r < 0)
                return r;
        _cleanup_free_ char *tmp = NULL;
        char rnd[17];
        if (hub_random_hex(rnd, 8) < 0)
                return -EIO;
        if (asprintf(&tmp, "%.*s/.tmp-%s", (int) (slash - path), path, rnd) < 0)
                return -ENOMEM;
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
                return -errno;
        for (size_t i = 0; i < n && r >= 0; i++)
                r = parts[i].iov_base ? write_all(fd, parts[i].iov_base, parts[i].iov_len) : copy_file(fd, srcs[i]);
        if (r >= 0 && fsync(fd) < 0)
                r = -errno;
        close(fd);
        if (r >= 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                (void) unlink(tmp);
                return r;
        }
        return fsync_dir_of(path);
}

static int write_file(const char *path, const struct iovec *parts, size_t n) {
        return write_file_from(path, parts, NULL, n);
}

static uint64_t file_size(const char *path) {
        struct stat st;
        return stat(path, &st) == 0 && S_ISREG(st.st_mode) ? (uint64_t) st.st_size : 0;
}

static void blob_created(struct api_req *req, const char *path, bool with_etag) {
        struct stat st;
        char rid[33], etag[48], date[32];
        if (hub_random_hex(rid, 16) < 0)
                snprintf(rid, sizeof rid, "0");
        json_t *h = json_pack("{s:s, s:s, s:s}", "x-ms-request-id", rid, "x-ms-version",
                              api_header(req, "x-ms-version") ? api_header(req, "x-ms-version") : BLOB_X_MS_VERSION,
                              "x-ms-request-server-encrypted", "false");
        const char *crid = api_header(req, "x-ms-client-request-id");
        if (crid && strlen(crid) < 256)
                json_object_set_new(h, "x-ms-client-request-id", json_string(crid));
        if (with_etag && stat(path, &st) == 0) {
                snprintf(etag, sizeof etag, "\"0x%llX%09ld\"", (unsigned long long) st.st_mtim.tv_sec,
                         (long) st.st_mtim.tv_nsec);
                json_object_set_new(h, "ETag", json_string(etag));
                json_object_set_new(h, "Last-Modified",
                                    json_string(gw_http_format_date((uint64_t) st.st_mtim.tv_sec * USEC_PER_SEC, date)));
        }
        api_reply(req, 201, h, NULL, NULL, 0);
}

/* <dir>/.blocks/<sha-256 of the blob name>: one directory name whatever the blob's length. */
static char *staging_dir(struct api_device *d, const char *blob_full) {
        uint8_t h[32];
        char hex[65];
        char *p = NULL;
        if (mbedtls_md(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), (const unsigned char *) blob_full,
                       strlen(blob_full), h) != 0)
                return NULL;
        for (size_t i = 0; i < sizeof h; i++)
                snprintf(hex + 2 * i, 3, "%02x", h[i]);
        if (asprintf(&p, "%s/.blocks/%s", d->dir, hex) < 0)
                return NULL;
        return p;
}

/* Checks that adding add bytes (replacing old) stays within the quota. */
static bool quota_ok(struct api_req *req, struct api_device *d, const char *blob_full, uint64_t add, uint64_t old) {
        if (d->used_bytes - MIN(old, d->used_bytes) + add <= d->quota)
                return true;
        blob_error(req, 409, "QuotaExceeded",
                   "Blob %s: the hub's upload storage is full (%llu of %llu bytes used, file_upload.quota)", blob_full,
                   (unsigned long long) d->used_bytes, (unsigned long long) d->quota);
        return false;
}

/* Writes the request body to @path (the whole blob, or one staged block when !@whole) within
 * the device's upload quota, accounts for it and answers 201; answers the error otherwise. */
static void write_body(struct api_req *req, struct api_device *d, const char *blob_full, const char *path,
                       bool whole) {
        const struct gw_http_request *hr = req->hr;
        uint64_t old = file_size(path);
        if (!quota_ok(req, d, blob_full, hr->body_len, old))
                return;
        struct iovec v = { .iov_base = (void *) hr->body, .iov_len = hr->body_len };
        int r = write_file(path, &v, 1);
        if (r < 0) {
                blob_error(req, 500, "InternalError",
                           whole ? "Blob %s cannot be written: %s" : "Blob %s: the block cannot be written: %s",
                           blob_full, strerror(-r));
                return;
        }
        d->used_bytes = d->used_bytes - MIN(old, d->used_bytes) + hr->body_len;
        blob_created(req, path, whole);
}

static void put_single(struct api_req *req, struct api_device *d, const char *blob_full) {
        const struct gw_http_request *hr = req->hr;
        const char *type = api_header(req, "x-ms-blob-type");
        if (!type) {
                blob_error(req, 400, "MissingRequiredHeader", "Blob %s: x-ms-blob-type is required", blob_full);
                return;
        }
        if (!streq(type, "BlockBlob")) {
                blob_error(req, 400, "InvalidHeaderValue", "Blob %s: only x-ms-blob-type BlockBlob is supported",
                           blob_full);
                return;
        }
        if (hr->body_len > d->max_file) {
                blob_error(req, 413, "RequestBodyTooLarge", "Blob %s: %zu bytes is over file_upload.max_file (%llu)",
                           blob_full, hr->body_len, (unsigned long long) d->max_file);
                return;
        }
        _cleanup_free_ char *path = blob_path(d, blob_full);
        if (!path) {
                blob_error(req, 500, "InternalError", "out of memory");
                return;
        }
        write_body(req, d, blob_full, path, true);
}

static void put_block(struct api_req *req, struct api_device *d, const char *blob_full) {
        const struct gw_http_request *hr = req->hr;
        const char *id = api_param(req, "blockid");
        size_t idlen = 0;
        if (!id || !hub_base64_valid(id, strlen(id), &idlen) || idlen == 0 || idlen > 64) {
                blob_error(req, 400, "InvalidQueryParameterValue",
                           "Blob %s: blockid must be base64 of 1 to 64 bytes", blob_full);
                return;
        }
        if (hr->body_len > d->max_file) {
                blob_error(req, 413, "RequestBodyTooLarge", "Blob %s: a block of %zu bytes is over file_upload.max_file",
                           blob_full, hr->body_len);
                return;
        }
        _cleanup_free_ char *dir = staging_dir(d, blob_full), *name = fs_name(id, false), *path = NULL;
        if (!dir || !name || asprintf(&path, "%s/%s", dir, name) < 0) {
                blob_error(req, 500, "InternalError", "out of memory");
                return;
        }
        write_body(req, d, blob_full, path, false);
}

static int rm_entry(const char *p, const struct stat *st, int flag, struct FTW *ftw) {
        (void) st;
        (void) flag;
        (void) ftw;
        (void) remove(p);
        return 0;
}

static uint64_t du_total;
static int du_entry(const char *p, const struct stat *st, int flag, struct FTW *ftw) {
        (void) p;
        (void) ftw;
        if (flag == FTW_F && S_ISREG(st->st_mode))
                du_total += (uint64_t) st->st_size;
        return 0;
}

static uint64_t du(const char *dir) {
        du_total = 0;
        (void) nftw(dir, du_entry, 16, FTW_PHYS);
        return du_total;
}

static void put_block_list(struct api_req *req, struct api_device *d, const char *blob_full) {
        const struct gw_http_request *hr = req->hr;
        _cleanup_free_ char *dir = staging_dir(d, blob_full), *path = blob_path(d, blob_full);
        struct iovec *parts = NULL;
        char **files = NULL;
        size_t n = 0;
        uint64_t total = 0;
        const char *p = (const char *) hr->body, *end = p + hr->body_len;

        if (!dir || !path) {
                blob_error(req, 500, "InternalError", "out of memory");
                return;
        }
        if (!hr->body_len || !memmem(p, hr->body_len, "<BlockList>", 11)) {
                blob_error(req, 400, "InvalidXmlDocument", "Blob %s: expected a <BlockList> XML document", blob_full);
                return;
        }
        /* <Latest>id</Latest>, <Uncommitted>id</Uncommitted>, <Committed>id</Committed>: every
         * id names a staged block. */
        while (p < end) {
                const char *lt = memchr(p, '<', (size_t) (end - p));
                if (!lt)
                        break;
                static const char *const tags[] = { "Latest", "Uncommitted", "Committed" };
                const char *tag = NULL;
                for (size_t i = 0; i < 3 && !tag; i++) {
                        size_t tl = strlen(tags[i]);
                        if ((size_t) (end - lt) > tl + 2 && strncmp(lt + 1, tags[i], tl) == 0 && lt[tl + 1] == '>')
                                tag = tags[i];
                }
                if (!tag) {
                        p = lt + 1;
                        continue;
                }
                const char *v = lt + strlen(tag) + 2;
                const char *close = memchr(v, '<', (size_t) (end - v));
                if (!close) {
                        blob_error(req, 400, "InvalidXmlDocument", "Blob %s: unterminated <%s>", blob_full, tag);
                        goto out;
                }
                size_t l = (size_t) (close - v);
                _cleanup_free_ char *id = strndup(v, l), *name = NULL, *fp = NULL;
                size_t idlen;
                if (!id || !hub_base64_valid(id, l, &idlen) || idlen == 0 || idlen > 64 || n >= 50000) {
                        blob_error(req, 400, "InvalidBlockList", "Blob %s: a block id is not valid", blob_full);
                        goto out;
                }
                name = fs_name(id, false);
                if (!name || asprintf(&fp, "%s/%s", dir, name) < 0) {
                        blob_error(req, 500, "InternalError", "out of memory");
                        goto out;
                }
                struct stat st;
                if (stat(fp, &st) < 0 || !S_ISREG(st.st_mode)) {
                        blob_error(req, 400, "InvalidBlockList", "Blob %s: block %s was not uploaded", blob_full, id);
                        goto out;
                }
                struct iovec *np = realloc(parts, (n + 1) * sizeof *np);
                char **nf = realloc(files, (n + 1) * sizeof *nf);
                if (np)
                        parts = np;
                if (nf)
                        files = nf;
                if (!np || !nf) {
                        blob_error(req, 500, "InternalError", "out of memory");
                        goto out;
                }
                files[n] = TAKE_PTR(fp);
                parts[n].iov_len = (size_t) st.st_size;
                parts[n].iov_base = NULL;
                n++;
                total += (uint64_t) st.st_size;
                p = close + 1;
        }
        if (n == 0) {
                blob_error(req, 400, "InvalidBlockList", "Blob %s: the block list is empty", blob_full);
                goto out;
        }
        if (total > d->max_file) {
                blob_error(req, 413, "RequestBodyTooLarge", "Blob %s: %llu bytes is over file_upload.max_file (%llu)",
                           blob_full, (unsigned long long) total, (unsigned long long) d->max_file);
                goto out;
        }
        uint64_t staged = du(dir), old = file_size(path);
        /* The blocks are already counted; the blob needs its size again until they go. */
        if (!quota_ok(req, d, blob_full, total, old))
                goto out;
        /* The blocks are copied one after the other (a block may be listed twice). */
        int r = write_file_from(path, parts, files, n);
        if (r < 0) {
                blob_error(req, 500, "InternalError", "Blob %s cannot be written: %s", blob_full, strerror(-r));
                goto out;
        }
        (void) nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
        d->used_bytes = d->used_bytes - MIN(d->used_bytes, old + staged) + total;
        blob_created(req, path, true);
out:
        for (size_t i = 0; i < n; i++)
                free(files[i]);
        free(parts);
        free(files);
}

void api_dev_blob_put(struct api_req *req) {
        struct api_device *d = api_get_device(req->api);
        _cleanup_free_ char *blob_full = blob_full_of(req);
        if (!blob_full) {
                blob_error(req, 500, "InternalError", "out of memory");
                return;
        }
        if (!blob_name_valid(blob_full)) {
                blob_error(req, 400, "InvalidResourceName", "The blob name is not valid");
                return;
        }
        const char *comp = api_param(req, "comp");
        if (!comp)
                put_single(req, d, blob_full);
        else if (streq(comp, "block"))
                put_block(req, d, blob_full);
        else if (streq(comp, "blocklist"))
                put_block_list(req, d, blob_full);
        else
                blob_error(req, 400, "InvalidQueryParameterValue", "Blob %s: comp=%.32s is not supported", blob_full,
                           comp);
}

/* ---- headers stage, life cycle ----------------------------------------------------------- */

static uint64_t blob_request_max(uint64_t max_file) {
        /* A block list is small; blocks and single puts are bounded by max_file. */
        return MAX(MIN(max_file, BLOB_REQUEST_MAX), (uint64_t) 1024 * 1024);
}

size_t api_device_parser_body_max(const struct gw_config *cfg) {
        uint64_t m = cfg->api_max_body_bytes ? cfg->api_max_body_bytes : GW_HTTP_BODY_MAX_DEFAULT;
        if (cfg->http_device_enabled)
                m = MAX(m, MAX(blob_request_max(cfg->file_upload_max_file_bytes), (uint64_t) EVENTS_BODY_MAX));
        return (size_t) MIN(m, (uint64_t) GW_HTTP_BODY_MAX_LIMIT);
}

static int set_limit(struct gw_http_parser *p, uint64_t max) {
        return gw_http_parser_set_body_max(p, (size_t) MIN(max, (uint64_t) GW_HTTP_BODY_MAX_LIMIT)) == -E2BIG ? -413 : 0;
}

int api_device_on_headers(struct gw_api *api, struct gw_http_parser *p, const struct gw_http_request *hr,
                          bool metrics) {
        struct api_device *d = api_get_device(api);
        const char *path = hr->path;
        int r;
        if (!d)
                return 0;
        uint64_t base = d->listener_body_max ? d->listener_body_max : GW_HTTP_BODY_MAX_DEFAULT;
        if (metrics || !d->enabled)
                return set_limit(p, base);
        if (strncmp(path, "/uploads/", 9) == 0 && hr->method == GW_HTTP_METHOD_PUT) {
                r = set_limit(p, blob_request_max(d->max_file));
                return r < 0 ? r : 1;
        }
        const char *s = strncasecmp(path, "/devices/", 9) == 0 ? strchr(path + 9, '/') : NULL;
        if (s && (strncasecmp(s + 1, "messages/events", 15) == 0 || strncasecmp(s + 1, "modules/", 8) == 0)) {
                /* Oversize messages reach the handler: 413 MessageTooLarge naming the device. */
                r = set_limit(p, MAX(base, (uint64_t) EVENTS_BODY_MAX));
                return r < 0 ? r : 1;
        }
        r = set_limit(p, base);
        if (r < 0)
                return r;
        if (s && (strncasecmp(s + 1, "messages/devicebound", 20) == 0 || strncasecmp(s + 1, "files", 5) == 0))
                return 1;
        return 0;
}

static int load_key(struct api_device *d) {
        _cleanup_free_ char *path = NULL;
        if (asprintf(&path, "%s/.key", d->dir) < 0)
                return -ENOMEM;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
                ssize_t n = read(fd, d->key, sizeof d->key);
                close(fd);
                if (n == (ssize_t) sizeof d->key)
                        return 0;
                gw_log_warning("The upload key %s is damaged; making a new one (outstanding upload tokens become invalid)",
                               path);
        } else if (errno != ENOENT)
                return -errno;
        if (hub_random_bytes(d->key, sizeof d->key) < 0)
                return -EIO;
        struct iovec v = { .iov_base = d->key, .iov_len = sizeof d->key };
        return write_file(path, &v, 1);
}

void api_device_reconfigure(struct api_device *d, const struct gw_config *cfg) {
        if (!d)
                return;
        d->enabled = cfg->http_device_enabled && cfg->api_enabled && d->dir; /* set up at start only */
        d->rate = cfg->http_device_max_messages_per_second;
        d->max_shaping_usec = cfg->http_device_max_shaping_delay_usec;
        d->quota = cfg->file_upload_quota_bytes;
        d->max_file = cfg->file_upload_max_file_bytes ? cfg->file_upload_max_file_bytes : GW_CONFIG_FILE_UPLOAD_MAX_FILE_DEFAULT;
        d->sas_ttl_usec = cfg->file_upload_sas_ttl_usec ? cfg->file_upload_sas_ttl_usec
                                                        : GW_CONFIG_FILE_UPLOAD_SAS_TTL_DEFAULT_USEC;
        d->max_concurrent = cfg->file_upload_max_concurrent ? cfg->file_upload_max_concurrent
                                                            : GW_CONFIG_FILE_UPLOAD_MAX_CONCURRENT_DEFAULT;
        d->listener_body_max = cfg->api_max_body_bytes;
}

int api_device_new(struct gw_api *api, const struct gw_config *cfg, const char *state_dir, struct api_device **ret) {
        struct api_device *d = calloc(1, sizeof *d);
        int r;
        if (!d)
                return -ENOMEM;
        d->api = api;
        mbedtls_x509_crt_init(&d->ca_chain);
        api_device_reconfigure(d, cfg);
        if (!cfg->api_enabled || !cfg->http_device_enabled) {
                *ret = d;
                return 0;
        }
        r = gw_auth_x509_load_ca(cfg->x509_ca_files, &d->ca_chain, &d->have_ca);
        if (r < 0) {
                api_device_free(d);
                return r;
        }
        if (asprintf(&d->dir, "%s/uploads", state_dir) < 0) {
                api_device_free(d);
                return -ENOMEM;
        }
        if (mkdir(d->dir, 0700) < 0 && errno != EEXIST) {
                r = -errno;
                gw_log_errno(LOG_ERR, r, "Cannot create the upload directory %s: %m", d->dir);
                api_device_free(d);
                return r;
        }
        r = load_key(d);
        if (r < 0) {
                gw_log_errno(LOG_ERR, r, "Cannot read or create the upload key in %s: %m", d->dir);
                api_device_free(d);
                return r;
        }
        d->used_bytes = du(d->dir);
        d->used_bytes -= MIN(d->used_bytes, sizeof d->key);
        api_device_reconfigure(d, cfg);
        gw_log_info("HTTP device API on the service listeners; file uploads in %s (%llu of %llu bytes used)", d->dir,
                    (unsigned long long) d->used_bytes, (unsigned long long) d->quota);
        *ret = d;
        return 0;
}

struct api_device *api_device_free(struct api_device *d) {
        if (!d)
                return NULL;
        for (unsigned b = 0; b < DEV_BUCKETS; b++)
                while (d->buckets[b]) {
                        struct dev_entry *e = d->buckets[b];
                        d->buckets[b] = e->next;
                        entry_free(e);
                }
        mbedtls_x509_crt_free(&d->ca_chain);
        explicit_bzero(d->key, sizeof d->key);
        free(d->dir);
        free(d);
        return NULL;
}
