/* SPDX-License-Identifier: MIT */
/* SAS tokens: the reference vectors (§1.4), signatures cross-checked against an independent
 * HMAC implementation (python3's hmac module), and every verification outcome of §1.5
 * against a real registry on a real store. Also URL and base64 helpers and the CSPRNG. */

#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

#include "hub/auth.h"
#include "hub/clock.h"
#include "hub/random.h"
#include "hub/registry.h"
#include "hub/store.h"
#include "hub/urlenc.h"
#include "test-util.h"

#define HOST "gw.example.local"
#define VKEY "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
#define VSE UINT64_C(1700000000)

static const char *const hosts[] = { HOST, "hub.azure-devices.net", NULL };

struct env {
        char dir[256];
        struct hub_fake_clock clock;
        struct hub_store *store;
        struct hub_registry *reg;
};

static void env_open(struct env *e) {
        char err[256] = "";
        struct hub_store_options o = {
                .dir = e->dir,
                .clock = &e->clock.clock,
                .errbuf = err,
                .errbuf_size = sizeof err,
        };
        int r = hub_store_open(&o, &e->store);
        if (r < 0)
                TEST_FAIL("hub_store_open: %s: %s", strerror(-r), err);
        ASSERT_OK(hub_registry_new(e->store, &e->clock.clock, NULL, &e->reg));
}

static void env_init(struct env *e) {
        test_tmpdir(e->dir, sizeof e->dir);
        hub_fake_clock_init(&e->clock, VSE * USEC_PER_SEC);
        env_open(e);
}

static void env_done(struct env *e) {
        e->reg = hub_registry_free(e->reg);
        e->store = hub_store_close(e->store);
        test_rmdir(e->dir);
}

static void make_device(struct env *e, const char *id, enum hub_auth_type type, const char *pk, const char *sk,
                        enum hub_device_status status) {
        struct hub_device d = {}, out;
        snprintf(d.device_id, sizeof d.device_id, "%s", id);
        d.auth_type = type;
        d.status = status;
        if (pk)
                snprintf(d.primary_key, sizeof d.primary_key, "%s", pk);
        if (sk)
                snprintf(d.secondary_key, sizeof d.secondary_key, "%s", sk);
        if (type == HUB_AUTH_TYPE_SELF_SIGNED)
                snprintf(d.primary_thumbprint, sizeof d.primary_thumbprint, "%s",
                         "0123456789abcdef0123456789abcdef01234567");
        ASSERT_OK(hub_registry_create(e->reg, &d, &out));
        hub_device_done(&out);
}

static enum hub_auth_failure check(struct env *e, const char *token, const char *device_id, const char *module_id,
                                   unsigned rights, struct hub_auth_result *ret) {
        struct hub_auth_result res;
        struct hub_auth_request req = {
                .token = token,
                .host_names = hosts,
                .device_id = device_id,
                .module_id = module_id,
                .required_rights = rights,
                .now_usec = hub_clock_now(&e->clock.clock),
        };
        int r;

        memset(&res, 0xaa, sizeof res);
        r = hub_auth_check_sas(e->reg, &req, &res);
        if (r != 0 && r != -EACCES)
                TEST_FAIL("hub_auth_check_sas: %s", strerror(-r));
        ASSERT_EQ(r == 0, res.failure == HUB_AUTH_OK);
        if (ret)
                *ret = res;
        return res.failure;
}

static char *gen(const char *resource, const char *key, uint64_t se, const char *policy) {
        char *t = NULL;
        ASSERT_OK(hub_sas_generate(resource, key, se, policy, &t));
        return t;
}

/* ---------------------------------------------------------------------------------------- */

static void test_vectors(void) {
        static const struct {
                const char *resource, *policy, *sr, *token;
        } v[] = {
                { HOST "/devices/dev1", NULL, HOST "%2Fdevices%2Fdev1",
                  "SharedAccessSignature sr=gw.example.local%2Fdevices%2Fdev1&sig=m8Kt58AA%2FCZctHZsPJLiBMET9uFMzrIH0xGsuKUJqSg%3D&se=1700000000" },
                { HOST "/devices/dev1/modules/modbus", NULL, HOST "%2Fdevices%2Fdev1%2Fmodules%2Fmodbus",
                  "SharedAccessSignature sr=gw.example.local%2Fdevices%2Fdev1%2Fmodules%2Fmodbus&sig=3k1bIjI278G%2BIqtYvhI65o1bG1b6tm2qvpnRX639nis%3D&se=1700000000" },
                { HOST, "iothubowner", HOST,
                  "SharedAccessSignature sr=gw.example.local&sig=%2FsiiYIrK%2BOKWnIu1Lq3nTSEPFFkDhfPzyrszLBsD%2F5I%3D&se=1700000000&skn=iothubowner" },
        };
        struct env e;

        for (size_t i = 0; i < ELEMENTSOF(v); i++) {
                _cleanup_free_ char *t = gen(v[i].resource, VKEY, VSE, v[i].policy);
                struct hub_sas_token p = {};
                ASSERT_STREQ(t, v[i].token);
                ASSERT_OK(hub_sas_parse(t, &p));
                ASSERT_STREQ(p.sr, v[i].sr);
                ASSERT_EQ(p.se, VSE);
                if (v[i].policy)
                        ASSERT_STREQ(p.skn, v[i].policy);
                else
                        ASSERT_NULL(p.skn);
                hub_sas_token_done(&p);
        }

        /* ... and the hub accepts them */
        env_init(&e);
        make_device(&e, "dev1", HUB_AUTH_TYPE_SAS, VKEY, NULL, HUB_DEVICE_ENABLED);
        ASSERT_OK(hub_registry_policy_set_keys(e.reg, "iothubowner", VKEY, NULL));
        struct hub_auth_result res;
        ASSERT_EQ(check(&e, v[0].token, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, &res), HUB_AUTH_OK);
        ASSERT_EQ(res.rights, HUB_RIGHT_DEVICE_CONNECT);
        ASSERT_FALSE(res.policy);
        ASSERT_FALSE(res.secondary_key);
        ASSERT_EQ(res.expiry_usec, VSE * USEC_PER_SEC);
        /* module identities do not exist yet: a device key never covers a module */
        ASSERT_EQ(check(&e, v[1].token, "dev1", "modbus", HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
        ASSERT_EQ(check(&e, v[2].token, NULL, NULL, HUB_RIGHT_REGISTRY_READ | HUB_RIGHT_REGISTRY_WRITE, &res),
                  HUB_AUTH_OK);
        ASSERT_TRUE(res.policy);
        ASSERT_STREQ(res.policy_name, "iothubowner");
        ASSERT_EQ(res.rights, HUB_RIGHTS_ALL);
        /* the owner policy covers any device and module too */
        ASSERT_EQ(check(&e, v[2].token, "dev1", "modbus", HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
        env_done(&e);
}

/* HMAC-SHA256 by python3's hmac module, key and message passed as hex. */
static void python_sig(const uint8_t *key, size_t klen, const char *msg, char out[static 64]) {
        char cmd[2048], *p;
        size_t n;
        FILE *f;

        p = cmd + snprintf(cmd, sizeof cmd,
                           "/usr/bin/python3 -c 'import hmac,hashlib,base64,sys; "
                           "print(base64.b64encode(hmac.new(bytes.fromhex(sys.argv[1]), bytes.fromhex(sys.argv[2]), "
                           "hashlib.sha256).digest()).decode())' ");
        for (size_t i = 0; i < klen; i++)
                p += sprintf(p, "%02x", key[i]);
        *p++ = ' ';
        for (size_t i = 0; msg[i]; i++)
                p += sprintf(p, "%02x", (unsigned char) msg[i]);
        *p = '\0';
        ASSERT_TRUE((size_t) (p - cmd) < sizeof cmd);
        f = popen(cmd, "r");
        ASSERT_NOT_NULL(f);
        ASSERT_NOT_NULL(fgets(out, 64, f));
        ASSERT_EQ(pclose(f), 0);
        n = strlen(out);
        if (n > 0 && out[n - 1] == '\n')
                out[n - 1] = '\0';
}

static void test_independent_hmac(void) {
        static const char idchars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-:.+%_#*?!(),=@;$'";

        for (int i = 0; i < 12; i++) {
                uint8_t key[64], rnd[40];
                char id[33], sig[45], expect[64], msg[512], se_str[24];
                _cleanup_free_ char *key_b64 = NULL, *resource = NULL, *sr = NULL;
                size_t klen;
                uint64_t se;

                ASSERT_OK(hub_random_bytes(rnd, sizeof rnd));
                klen = 16 + rnd[0] % 49; /* 16..64 */
                ASSERT_OK(hub_random_bytes(key, klen));
                size_t idlen = 1 + rnd[1] % 32;
                for (size_t k = 0; k < idlen; k++)
                        id[k] = idchars[rnd[2 + k] % (sizeof idchars - 1)];
                id[idlen] = '\0';
                ASSERT_TRUE(hub_device_id_valid(id));
                se = UINT64_C(1600000000) + rnd[35] * UINT64_C(100000) + rnd[36];
                ASSERT_OK(hub_base64_encode(key, klen, &key_b64));
                ASSERT_TRUE(asprintf(&resource, HOST "/devices/%s", id) > 0);
                ASSERT_OK(hub_url_encode(resource, &sr));
                snprintf(se_str, sizeof se_str, "%" PRIu64, se);
                snprintf(msg, sizeof msg, "%s\n%s", sr, se_str);

                ASSERT_OK(hub_sas_sign(sr, se, key_b64, sig));
                python_sig(key, klen, msg, expect);
                ASSERT_STREQ(sig, expect);
                ASSERT_EQ(strlen(sig), 44u);
        }
        /* the reference vector through the same path */
        {
                uint8_t key[32];
                char sig[45], expect[64];
                for (int k = 0; k < 32; k++)
                        key[k] = (uint8_t) k;
                python_sig(key, 32, HOST "%2Fdevices%2Fdev1\n1700000000", expect);
                ASSERT_OK(hub_sas_sign(HOST "%2Fdevices%2Fdev1", VSE, VKEY, sig));
                ASSERT_STREQ(sig, expect);
                ASSERT_STREQ(sig, "m8Kt58AA/CZctHZsPJLiBMET9uFMzrIH0xGsuKUJqSg=");
        }
}

static void test_sign_keys(void) {
        char sig[45], k[120];
        uint8_t raw[65] = {};
        _cleanup_free_ char *k15 = NULL, *k16 = NULL, *k64 = NULL, *k65 = NULL;

        ASSERT_OK(hub_base64_encode(raw, 15, &k15));
        ASSERT_OK(hub_base64_encode(raw, 16, &k16));
        ASSERT_OK(hub_base64_encode(raw, 64, &k64));
        ASSERT_OK(hub_base64_encode(raw, 65, &k65));
        ASSERT_ERR(hub_sas_sign("sr", 1, k15, sig), -EINVAL);
        ASSERT_OK(hub_sas_sign("sr", 1, k16, sig));
        ASSERT_OK(hub_sas_sign("sr", 1, k64, sig));
        ASSERT_ERR(hub_sas_sign("sr", 1, k65, sig), -EINVAL);
        ASSERT_ERR(hub_sas_sign("sr", 1, "not base64!", sig), -EINVAL);
        ASSERT_ERR(hub_sas_sign("sr", 1, "", sig), -EINVAL);
        snprintf(k, sizeof k, " %s", VKEY);
        ASSERT_ERR(hub_sas_sign("sr", 1, k, sig), -EINVAL);
        snprintf(k, sizeof k, "%.43s", VKEY); /* unpadded */
        ASSERT_ERR(hub_sas_sign("sr", 1, k, sig), -EINVAL);
        char *t = NULL;
        ASSERT_ERR(hub_sas_generate(HOST, k15, 1, NULL, &t), -EINVAL);
        ASSERT_ERR(hub_sas_generate("", VKEY, 1, NULL, &t), -EINVAL);
        ASSERT_NULL(t);
}

static void test_parse(void) {
        struct hub_sas_token t = {};

        /* names case-insensitive, any order, unknown fields ignored, skn decoded, + kept */
        ASSERT_OK(hub_sas_parse("SharedAccessSignature SE=5&foo=bar&SKN=my%20pol&Sig=a+b%2Bc%3D&sR=h%2fdevices%2Fx", &t));
        ASSERT_STREQ(t.sr, "h%2fdevices%2Fx");
        ASSERT_STREQ(t.sig, "a+b+c=");
        ASSERT_EQ(t.se, 5u);
        ASSERT_STREQ(t.skn, "my pol");
        hub_sas_token_done(&t);
        hub_sas_token_done(&t); /* idempotent */
        ASSERT_OK(hub_sas_parse("SharedAccessSignature\tsr=h&sig=x==&se=18446744073709551615", &t));
        ASSERT_EQ(t.se, UINT64_MAX);
        ASSERT_STREQ(t.sig, "x==");
        hub_sas_token_done(&t);

        static const char *const bad[] = {
                "",
                "sr=h&sig=x&se=1",
                "SharedAccessSignature",
                "SharedAccessSignature ",
                "SharedAccessSignaturesr=h&sig=x&se=1",
                "SharedAccessSignature  sr=h&sig=x&se=1",
                "sharedaccesssignature sr=h&sig=x&se=1",
                "SharedAccessSignature sr=h&sig=x",
                "SharedAccessSignature sig=x&se=1",
                "SharedAccessSignature sr=h&se=1",
                "SharedAccessSignature sr=h&sig=x&se=1x",
                "SharedAccessSignature sr=h&sig=x&se=",
                "SharedAccessSignature sr=h&sig=x&se=-1",
                "SharedAccessSignature sr=h&sig=x&se=18446744073709551616",
                "SharedAccessSignature sr=h&sig=x&se=1&sr=h",
                "SharedAccessSignature sr=h&sig=x&se=1&SIG=x",
                "SharedAccessSignature sr=h&sig=x&se=1&se=1",
                "SharedAccessSignature sr=h&sig=x&se=1&skn=a&skn=a",
                "SharedAccessSignature sr=h&sig=x&se=1&",
                "SharedAccessSignature sr=h&&sig=x&se=1",
                "SharedAccessSignature sr=h&sig&se=1",
                "SharedAccessSignature sr=h&=x&sig=x&se=1",
                "SharedAccessSignature sr=&sig=x&se=1",
                "SharedAccessSignature sr=h&sig=%zz&se=1",
                "SharedAccessSignature sr=h&sig=x%&se=1",
                "SharedAccessSignature sr=h&sig=x%00&se=1",
                "SharedAccessSignature sr=h&sig=x&se=1&skn=",
        };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                int r = hub_sas_parse(bad[i], &t);
                if (r != -EBADMSG)
                        TEST_FAIL("hub_sas_parse(\"%s\") = %d, expected -EBADMSG", bad[i], r);
                ASSERT_NULL(t.sr);
        }
        /* over-long */
        char *big = malloc(HUB_SAS_TOKEN_MAX + 64);
        ASSERT_NOT_NULL(big);
        int n = snprintf(big, HUB_SAS_TOKEN_MAX + 64, "SharedAccessSignature sig=x&se=1&sr=");
        memset(big + n, 'a', HUB_SAS_TOKEN_MAX + 63 - (size_t) n);
        big[HUB_SAS_TOKEN_MAX + 63] = '\0';
        ASSERT_ERR(hub_sas_parse(big, &t), -EBADMSG);
        free(big);
}

static void test_verify(void) {
        char pk[45], sk[45], x509key[45], sig[45];
        struct hub_auth_result res;
        struct env e;
        uint64_t now_s = VSE;

        env_init(&e);
        ASSERT_OK(hub_random_key(pk));
        ASSERT_OK(hub_random_key(sk));
        ASSERT_OK(hub_random_key(x509key));
        make_device(&e, "dev1", HUB_AUTH_TYPE_SAS, pk, sk, HUB_DEVICE_ENABLED);
        make_device(&e, "dev2", HUB_AUTH_TYPE_SAS, NULL, NULL, HUB_DEVICE_ENABLED);
        make_device(&e, "b", HUB_AUTH_TYPE_SAS, pk, NULL, HUB_DEVICE_ENABLED);
        make_device(&e, "bc", HUB_AUTH_TYPE_SAS, pk, NULL, HUB_DEVICE_ENABLED);
        make_device(&e, "off", HUB_AUTH_TYPE_SAS, pk, NULL, HUB_DEVICE_DISABLED);
        make_device(&e, "x509", HUB_AUTH_TYPE_SELF_SIGNED, NULL, NULL, HUB_DEVICE_ENABLED);
        make_device(&e, "ca", HUB_AUTH_TYPE_CA, NULL, NULL, HUB_DEVICE_ENABLED);

        /* valid, primary and secondary */
        {
                _cleanup_free_ char *t = gen(HOST "/devices/dev1", pk, now_s + 3600, NULL);
                ASSERT_EQ(check(&e, t, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, &res), HUB_AUTH_OK);
                ASSERT_FALSE(res.secondary_key);
                ASSERT_EQ(res.expiry_usec, (now_s + 3600) * USEC_PER_SEC);
                /* a device key grants DeviceConnect only */
                ASSERT_EQ(check(&e, t, "dev1", NULL, HUB_RIGHT_SERVICE_CONNECT, NULL), HUB_AUTH_INSUFFICIENT_RIGHTS);
                /* ... and never a module identity */
                ASSERT_EQ(check(&e, t, "dev1", "m1", HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                /* a service-side request (no device) needs hub scope: a device key never has it */
                ASSERT_EQ(check(&e, t, NULL, NULL, HUB_RIGHT_REGISTRY_READ, NULL), HUB_AUTH_WRONG_SCOPE);
        }
        {
                _cleanup_free_ char *t = gen(HOST "/devices/dev1", sk, now_s + 3600, NULL);
                ASSERT_EQ(check(&e, t, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, &res), HUB_AUTH_OK);
                ASSERT_TRUE(res.secondary_key);
        }
        /* expiry with 300 s of skew */
        {
                _cleanup_free_ char *t1 = gen(HOST "/devices/dev1", pk, now_s - 301, NULL);
                _cleanup_free_ char *t2 = gen(HOST "/devices/dev1", pk, now_s - 299, NULL);
                _cleanup_free_ char *t3 = gen(HOST "/devices/dev1", pk, now_s - 300, NULL);
                ASSERT_EQ(check(&e, t1, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, &res), HUB_AUTH_EXPIRED);
                ASSERT_EQ(res.rights, 0u);
                ASSERT_EQ(check(&e, t2, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, t3, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                hub_fake_clock_advance(&e.clock, 2 * USEC_PER_SEC);
                ASSERT_EQ(check(&e, t2, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_EXPIRED);
                hub_fake_clock_init(&e.clock, now_s * USEC_PER_SEC);
        }
        /* scope */
        {
                _cleanup_free_ char *t = gen(HOST "/devices/dev1", pk, now_s + 60, NULL);
                _cleanup_free_ char *tb = gen(HOST "/devices/b", pk, now_s + 60, NULL);
                _cleanup_free_ char *tbc = gen(HOST "/devices/bc", pk, now_s + 60, NULL);
                _cleanup_free_ char *thub = gen(HOST, pk, now_s + 60, NULL);
                _cleanup_free_ char *tdevs = gen(HOST "/devices", pk, now_s + 60, NULL);
                _cleanup_free_ char *tjunk = gen(HOST "/devices/dev1/junk", pk, now_s + 60, NULL);
                _cleanup_free_ char *tother = gen(HOST "/other/dev1", pk, now_s + 60, NULL);
                ASSERT_EQ(check(&e, t, "dev2", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tb, "bc", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tbc, "b", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tb, "b", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tbc, "bc", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                /* hub scope only with a policy */
                ASSERT_EQ(check(&e, thub, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tdevs, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tjunk, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tother, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                /* the device id in sr is compared case-insensitively, the registry key is the request's */
                _cleanup_free_ char *tup = gen(HOST "/devices/DEV1", pk, now_s + 60, NULL);
                ASSERT_EQ(check(&e, tup, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tup, "DEV1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_UNKNOWN_DEVICE);
        }
        /* hosts: aliases, case, unknown */
        {
                _cleanup_free_ char *ta = gen("HUB.Azure-Devices.net/devices/dev1", pk, now_s + 60, NULL);
                _cleanup_free_ char *tc = gen("GW.EXAMPLE.LOCAL/devices/dev1", pk, now_s + 60, NULL);
                _cleanup_free_ char *tu = gen("evil.example.com/devices/dev1", pk, now_s + 60, NULL);
                _cleanup_free_ char *tp = gen(HOST ".evil/devices/dev1", pk, now_s + 60, NULL);
                ASSERT_EQ(check(&e, ta, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tc, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tu, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_HOST);
                ASSERT_EQ(check(&e, tp, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_HOST);
        }
        /* tampered signature, and a signature by another key */
        {
                _cleanup_free_ char *t = gen(HOST "/devices/dev1", pk, now_s + 60, NULL);
                char *s = strstr(t, "sig=") + 4;
                while (*s == '%') /* an escaped '+', '/': tamper with a plain base64 digit */
                        s += 3;
                *s = *s == 'A' ? 'B' : 'A';
                ASSERT_EQ(check(&e, t, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_BAD_SIGNATURE);
                _cleanup_free_ char *t2 = gen(HOST "/devices/dev1", x509key, now_s + 60, NULL);
                ASSERT_EQ(check(&e, t2, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_BAD_SIGNATURE);
                /* changing se invalidates it */
                _cleanup_free_ char *t3 = gen(HOST "/devices/dev1", pk, now_s + 60, NULL);
                char *se = strstr(t3, "se=") + 3;
                se[strlen(se) - 1] = se[strlen(se) - 1] == '1' ? '2' : '1';
                ASSERT_EQ(check(&e, t3, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_BAD_SIGNATURE);
        }
        /* lower-case escapes in sr: the HMAC is over sr as received */
        {
                const char *sr = HOST "%2fdevices%2fdev1";
                _cleanup_free_ char *esig = NULL, *t = NULL;
                ASSERT_OK(hub_sas_sign(sr, now_s + 60, pk, sig));
                ASSERT_OK(hub_url_encode(sig, &esig));
                ASSERT_TRUE(asprintf(&t, "SharedAccessSignature sr=%s&sig=%s&se=%" PRIu64, sr, esig, now_s + 60) > 0);
                ASSERT_EQ(check(&e, t, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                /* the same signature with upper-case escapes does not verify */
                _cleanup_free_ char *t2 = NULL;
                ASSERT_TRUE(asprintf(&t2, "SharedAccessSignature sr=" HOST "%%2Fdevices%%2Fdev1&sig=%s&se=%" PRIu64, esig,
                                     now_s + 60) > 0);
                ASSERT_EQ(check(&e, t2, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_BAD_SIGNATURE);
        }
        /* a literal + (and unescaped / and =) in sig */
        {
                uint64_t se = now_s + 60;
                for (;; se++) {
                        ASSERT_OK(hub_sas_sign(HOST "%2Fdevices%2Fdev1", se, pk, sig));
                        if (strchr(sig, '+'))
                                break;
                }
                _cleanup_free_ char *t = NULL;
                ASSERT_TRUE(asprintf(&t, "SharedAccessSignature sr=" HOST "%%2Fdevices%%2Fdev1&sig=%s&se=%" PRIu64, sig,
                                     se) > 0);
                ASSERT_EQ(check(&e, t, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
        }
        /* policies */
        {
                struct hub_policy svc, dev, owner;
                ASSERT_OK(hub_registry_policy_get(e.reg, "service", &svc));
                ASSERT_OK(hub_registry_policy_get(e.reg, "device", &dev));
                ASSERT_OK(hub_registry_policy_get(e.reg, "iothubowner", &owner));
                _cleanup_free_ char *ts = gen(HOST, svc.primary_key, now_s + 60, "service");
                _cleanup_free_ char *ts2 = gen(HOST, svc.secondary_key, now_s + 60, "service");
                _cleanup_free_ char *tu = gen(HOST, svc.primary_key, now_s + 60, "nosuchpolicy");
                _cleanup_free_ char *tw = gen(HOST, dev.primary_key, now_s + 60, "service");
                _cleanup_free_ char *td = gen(HOST "/devices/dev1", dev.primary_key, now_s + 60, "device");
                _cleanup_free_ char *tdall = gen(HOST "/devices", dev.primary_key, now_s + 60, "device");
                _cleanup_free_ char *tb = gen(HOST "/devices/b", owner.primary_key, now_s + 60, "iothubowner");
                _cleanup_free_ char *tm = gen(HOST "/devices/b/modules/m", owner.primary_key, now_s + 60, "iothubowner");

                ASSERT_EQ(check(&e, ts, NULL, NULL, HUB_RIGHT_SERVICE_CONNECT, &res), HUB_AUTH_OK);
                ASSERT_TRUE(res.policy);
                ASSERT_STREQ(res.policy_name, "service");
                ASSERT_EQ(res.rights, HUB_RIGHT_SERVICE_CONNECT);
                ASSERT_FALSE(res.secondary_key);
                ASSERT_EQ(check(&e, ts2, NULL, NULL, HUB_RIGHT_SERVICE_CONNECT, &res), HUB_AUTH_OK);
                ASSERT_TRUE(res.secondary_key);
                ASSERT_EQ(check(&e, ts, NULL, NULL, HUB_RIGHT_REGISTRY_READ, &res), HUB_AUTH_INSUFFICIENT_RIGHTS);
                ASSERT_EQ(res.rights, 0u);
                ASSERT_EQ(check(&e, ts, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_INSUFFICIENT_RIGHTS);
                ASSERT_EQ(check(&e, tu, NULL, NULL, HUB_RIGHT_SERVICE_CONNECT, NULL), HUB_AUTH_UNKNOWN_POLICY);
                ASSERT_EQ(check(&e, tw, NULL, NULL, HUB_RIGHT_SERVICE_CONNECT, NULL), HUB_AUTH_BAD_SIGNATURE);
                /* "token service": a DeviceConnect policy scoped to a device acts as it */
                ASSERT_EQ(check(&e, td, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, &res), HUB_AUTH_OK);
                ASSERT_TRUE(res.policy);
                ASSERT_EQ(check(&e, td, "dev2", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, td, NULL, NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                /* sr={hub}/devices: a protocol gateway acting as any device (the policy is what is
                 * authenticated; whether the device exists is the front-end's business) */
                ASSERT_EQ(check(&e, tdall, "dev2", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tdall, "dev2", NULL, HUB_RIGHT_SERVICE_CONNECT, NULL), HUB_AUTH_INSUFFICIENT_RIGHTS);
                /* segment prefix rule with policies too */
                ASSERT_EQ(check(&e, tb, "b", "m", HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tb, "bc", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tm, "b", "m", HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                ASSERT_EQ(check(&e, tm, "b", "mx", HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);
                ASSERT_EQ(check(&e, tm, "b", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_SCOPE);

                /* failure strings and results never carry a key */
                for (int f = 0; f <= _HUB_AUTH_FAILURE_MAX; f++) {
                        const char *s = hub_auth_failure_to_string((enum hub_auth_failure) f);
                        ASSERT_NOT_NULL(s);
                        ASSERT_NULL(strstr(s, pk));
                        ASSERT_NULL(strstr(s, owner.primary_key));
                        ASSERT_NULL(strstr(s, svc.primary_key));
                }
                ASSERT_STREQ(hub_auth_failure_to_string(HUB_AUTH_EXPIRED), "expired");
                ASSERT_STREQ(hub_auth_failure_to_string(HUB_AUTH_WRONG_SCOPE), "wrong scope");
                hub_policy_done(&svc);
                hub_policy_done(&dev);
                hub_policy_done(&owner);
        }
        /* device state */
        {
                _cleanup_free_ char *toff = gen(HOST "/devices/off", pk, now_s + 60, NULL);
                _cleanup_free_ char *tx = gen(HOST "/devices/x509", pk, now_s + 60, NULL);
                _cleanup_free_ char *tca = gen(HOST "/devices/ca", pk, now_s + 60, NULL);
                _cleanup_free_ char *tn = gen(HOST "/devices/nobody", pk, now_s + 60, NULL);
                ASSERT_EQ(check(&e, toff, "off", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_DEVICE_DISABLED);
                ASSERT_EQ(check(&e, tx, "x509", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_AUTH_TYPE);
                ASSERT_EQ(check(&e, tca, "ca", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_WRONG_AUTH_TYPE);
                ASSERT_EQ(check(&e, tn, "nobody", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_UNKNOWN_DEVICE);

                /* enabling it again lets it in; disabling shuts it out */
                struct hub_device d;
                ASSERT_OK(hub_registry_get(e.reg, "off", &d));
                d.status = HUB_DEVICE_ENABLED;
                ASSERT_OK(hub_registry_update(e.reg, &d, "*", NULL));
                hub_device_done(&d);
                ASSERT_EQ(check(&e, toff, "off", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
                /* rotating its key invalidates tokens signed with the old one */
                ASSERT_OK(hub_registry_regenerate_key(e.reg, "off", HUB_KEY_PRIMARY, NULL));
                ASSERT_EQ(check(&e, toff, "off", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_BAD_SIGNATURE);
        }
        /* malformed */
        {
                _cleanup_free_ char *good = gen(HOST "/devices/dev1", pk, now_s + 60, NULL);
                const char *body = good + strlen("SharedAccessSignature ");
                _cleanup_free_ char *noprefix = strdup(body), *two = NULL, *nose = NULL, *badse = NULL,
                                    *badb64 = NULL, *shortsig = NULL, *badsr = NULL;
                ASSERT_TRUE(asprintf(&two, "SharedAccessSignature  %s", body) > 0);
                nose = strndup(good, (size_t) (strstr(good, "&se=") - good));
                ASSERT_TRUE(asprintf(&badse, "%.*s&se=12ab", (int) (strstr(good, "&se=") - good), good) > 0);
                ASSERT_TRUE(asprintf(&badb64, "SharedAccessSignature sr=" HOST "%%2Fdevices%%2Fdev1&sig=!!!!&se=%" PRIu64,
                                     now_s + 60) > 0);
                ASSERT_TRUE(asprintf(&shortsig, "SharedAccessSignature sr=" HOST "%%2Fdevices%%2Fdev1&sig=AAAA&se=%" PRIu64,
                                     now_s + 60) > 0);
                ASSERT_TRUE(asprintf(&badsr, "SharedAccessSignature sr=" HOST "%%2Fdevices%%2Fdev1%%zz&sig=%s", strstr(good, "&sig=") + 5) > 0);
                const char *bad[] = { noprefix, two, nose, badse, badb64, shortsig, badsr, "", "SharedAccessSignature x" };
                for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                        if (check(&e, bad[i], "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, &res) != HUB_AUTH_MALFORMED)
                                TEST_FAIL("token %zu: %s, expected malformed", i, hub_auth_failure_to_string(res.failure));
                        ASSERT_EQ(res.rights, 0u);
                }
                ASSERT_EQ(check(&e, good, "dev1", NULL, HUB_RIGHT_DEVICE_CONNECT, NULL), HUB_AUTH_OK);
        }
        env_done(&e);
}

static void test_urlenc(void) {
        _cleanup_free_ char *a = NULL, *b = NULL, *c = NULL, *d = NULL;

        ASSERT_OK(hub_url_encode("gw.example.local/devices/d 1+~_-.*!'()=&%\xc3\xa9", &a));
        ASSERT_STREQ(a, "gw.example.local%2Fdevices%2Fd%201%2B~_-.%2A%21%27%28%29%3D%26%25%C3%A9");
        ASSERT_OK(hub_url_decode(a, strlen(a), false, &b));
        ASSERT_STREQ(b, "gw.example.local/devices/d 1+~_-.*!'()=&%\xc3\xa9");
        ASSERT_OK(hub_url_decode("a+b%2fc%2F", 10, true, &c));
        ASSERT_STREQ(c, "a b/c/");
        ASSERT_OK(hub_url_decode("a+b", 3, false, &d));
        ASSERT_STREQ(d, "a+b");
        char *x = NULL;
        ASSERT_ERR(hub_url_decode("%", 1, false, &x), -EINVAL);
        ASSERT_ERR(hub_url_decode("%4", 2, false, &x), -EINVAL);
        ASSERT_ERR(hub_url_decode("%4g", 3, false, &x), -EINVAL);
        ASSERT_ERR(hub_url_decode("a%00b", 5, false, &x), -EINVAL);
        ASSERT_ERR(hub_url_decode("a\0b", 3, false, &x), -EINVAL);
        ASSERT_ERR(hub_url_decode("ab%41", 4, false, &x), -EINVAL); /* length cuts the escape */
        ASSERT_NULL(x);

        /* base64 */
        uint8_t *raw = NULL;
        size_t n = 0;
        _cleanup_free_ char *e = NULL;
        ASSERT_OK(hub_base64_encode("1", 1, &e));
        ASSERT_STREQ(e, "MQ==");
        ASSERT_OK(hub_base64_decode("MTg2MDAxMDgz", 12, &raw, &n));
        ASSERT_EQ(n, 9u);
        ASSERT_STREQ((char *) raw, "186001083");
        free(raw);
        ASSERT_OK(hub_base64_decode("", 0, &raw, &n));
        ASSERT_EQ(n, 0u);
        free(raw);
        static const char *const bad[] = { "MQ=", "MQ", "M===", "MQ=a", "M Q=", "MQ==\n", "MQ==MQ==", "@@@@" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                raw = NULL;
                ASSERT_ERR(hub_base64_decode(bad[i], strlen(bad[i]), &raw, &n), -EINVAL);
                ASSERT_NULL(raw);
        }
        uint8_t small[2];
        ASSERT_ERR(hub_base64_decode_buf("AAAA", 4, small, sizeof small, &n), -ENOBUFS);

        char etag[32];
        ASSERT_STREQ(hub_device_etag(1, etag), "MQ==");
        ASSERT_STREQ(hub_device_etag(186001083, etag), "MTg2MDAxMDgz");
        ASSERT_STREQ(hub_device_etag(12, etag), "MTI=");
}

static void test_random(void) {
        char k1[45], k2[45], hex[33];
        uint8_t raw[64];
        size_t n = 0;

        ASSERT_OK(hub_random_key(k1));
        ASSERT_OK(hub_random_key(k2));
        ASSERT_EQ(strlen(k1), 44u);
        ASSERT_TRUE(strcmp(k1, k2) != 0);
        ASSERT_OK(hub_base64_decode_buf(k1, 44, raw, sizeof raw, &n));
        ASSERT_EQ(n, 32u);
        ASSERT_OK(hub_random_hex(hex, 16));
        ASSERT_EQ(strlen(hex), 32u);
        ASSERT_EQ(strspn(hex, "0123456789abcdef"), 32u);
        /* not all zero, large requests work */
        uint8_t *big = calloc(1, 100000);
        ASSERT_NOT_NULL(big);
        ASSERT_OK(hub_random_bytes(big, 100000));
        size_t zeros = 0;
        for (size_t i = 0; i < 100000; i++)
                zeros += big[i] == 0;
        ASSERT_TRUE(zeros < 1000); /* ~390 expected */
        free(big);

        /* a forked child gets its own stream */
        int fds[2];
        ASSERT_OK(pipe(fds));
        pid_t pid = fork();
        ASSERT_TRUE(pid >= 0);
        if (pid == 0) {
                uint8_t c[16];
                close(fds[0]);
                if (hub_random_bytes(c, sizeof c) < 0 || write(fds[1], c, sizeof c) != (ssize_t) sizeof c)
                        _exit(1);
                _exit(0);
        }
        close(fds[1]);
        uint8_t child[16], parent[16];
        ASSERT_EQ(read(fds[0], child, sizeof child), (ssize_t) sizeof child);
        close(fds[0]);
        int status;
        ASSERT_EQ(waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        ASSERT_OK(hub_random_bytes(parent, sizeof parent));
        ASSERT_TRUE(memcmp(child, parent, sizeof child) != 0);
}

int main(void) {
        TEST_RUN(test_urlenc);
        TEST_RUN(test_random);
        TEST_RUN(test_parse);
        TEST_RUN(test_sign_keys);
        TEST_RUN(test_independent_hmac);
        TEST_RUN(test_vectors);
        TEST_RUN(test_verify);
        return 0;
}
