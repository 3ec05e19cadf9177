/* SPDX-License-Identifier: MIT */

/* net-echo: a tiny server on gateway/net, driven by tests/integration/test_net.py.
 *
 * Echoes every byte back. A line "BIG n\n" at the start of a read makes it send n bytes
 * ('x') instead, produced only as the output queue drains (to test backpressure); a line
 * "HOLD\n" makes it consume nothing from then on (input piles up to max_input_bytes).
 * Prints on stdout (line-buffered):
 *   LISTENING <port>
 *   OPEN <peer> tls=<0|1> sni=<name|-> cipher=<suite|-> cert=<sha256 hex|none> verify=<hex>
 *   PAUSED <peer> / RESUMED <peer> / BIGDONE <peer>
 *   CLOSE <peer> <reason> <text>
 * Logs of the net layer go to stderr. Stops on SIGTERM / SIGINT. */

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/sha256.h>

#include "log.h"
#include "net/net.h"

struct echo_conn {
        uint64_t big_left;
        bool hold;
};

static size_t arg_max_output;

static void big_generate(struct gw_net_conn *c) {
        static uint8_t block[64 * 1024];
        struct echo_conn *ec = gw_net_conn_get_userdata(c);

        if (!ec || ec->big_left == 0)
                return;
        if (block[0] != 'x')
                memset(block, 'x', sizeof(block));
        while (ec->big_left > 0 && gw_net_conn_is_open(c) && gw_net_conn_get_output_bytes(c) <= arg_max_output) {
                size_t n = ec->big_left < sizeof(block) ? (size_t) ec->big_left : sizeof(block);
                if (gw_net_conn_send(c, block, n) < 0)
                        return;
                ec->big_left -= n;
        }
        if (ec->big_left == 0)
                printf("BIGDONE %s\n", gw_net_conn_get_peer(c));
}

static int on_open(struct gw_net_conn *c) {
        char thumb[65] = "none";
        const uint8_t *der;
        size_t len;

        if (gw_net_conn_get_peer_cert_der(c, &der, &len) >= 0) {
                unsigned char h[32];
                if (mbedtls_sha256_ret(der, len, h, 0) != 0)
                        return -EIO;
                for (int i = 0; i < 32; i++)
                        snprintf(thumb + 2 * i, 3, "%02x", h[i]);
        }
        struct echo_conn *ec = calloc(1, sizeof(*ec));
        if (!ec)
                return -ENOMEM;
        gw_net_conn_set_userdata(c, ec);
        printf("OPEN %s tls=%d sni=%s cipher=%s cert=%s verify=%x\n", gw_net_conn_get_peer(c),
               gw_net_conn_is_tls(c), gw_net_conn_get_sni(c) ?: "-", gw_net_conn_get_ciphersuite(c) ?: "-",
               thumb, gw_net_conn_get_peer_cert_verify_flags(c));
        return 0;
}

static ssize_t on_data(struct gw_net_conn *c, const uint8_t *data, size_t len) {
        struct echo_conn *ec = gw_net_conn_get_userdata(c);
        static const char cmd[] = "BIG ";

        if (ec && ec->big_left == 0 && data[0] == 'B') {
                size_t k = MIN(len, sizeof(cmd) - 1);
                if (memcmp(data, cmd, k) == 0) {
                        const uint8_t *nl = memchr(data, '\n', MIN(len, (size_t) 32));
                        if (!nl)
                                return len < 32 ? 0 : -EINVAL; /* wait for the whole line */
                        ec->big_left = strtoull((const char *) data + 4, NULL, 10);
                        big_generate(c);
                        return nl - data + 1;
                }
        }
        if (ec && ec->hold)
                return 0; /* like a front-end waiting for the rest of a large frame */
        if (ec && len >= 5 && memcmp(data, "HOLD\n", 5) == 0) {
                ec->hold = true;
                return 5;
        }
        if (ec && ec->big_left > 0)
                return len; /* ignore input while generating */
        int r = gw_net_conn_send(c, data, len);
        if (r < 0)
                return r;
        return (ssize_t) len;
}

static void on_drain(struct gw_net_conn *c) {
        big_generate(c);
}

static void on_flow(struct gw_net_conn *c, bool paused) {
        printf("%s %s\n", paused ? "PAUSED" : "RESUMED", gw_net_conn_get_peer(c));
}

static void on_close(struct gw_net_conn *c, int reason) {
        printf("CLOSE %s %d %s\n", gw_net_conn_get_peer(c), reason, reason ? strerror(-reason) : "by-peer");
        free(gw_net_conn_get_userdata(c));
}

static const struct gw_net_handler handler = {
        .on_open = on_open,
        .on_data = on_data,
        .on_drain = on_drain,
        .on_flow = on_flow,
        .on_close = on_close,
};

static void usage(void) {
        fprintf(stderr,
                "usage: net-echo --listen ADDR [--plain] [--allow-plaintext] [--tls-dir DIR --name NAME... [--ip IP...]]\n"
                "                [--cert FILE --key FILE] [--client-cert optional] [--client-ca FILE]\n"
                "                [--max-conn N] [--max-per-addr N] [--handshake-timeout MS] [--idle-timeout MS]\n"
                "                [--max-input N] [--max-output N] [--hard-max-output N]\n");
}

int main(int argc, char **argv) {
        enum { O_LISTEN = 256, O_TLSDIR, O_NAME, O_IP, O_PLAIN, O_ALLOW, O_CLIENT_CERT, O_CLIENT_CA,
               O_MAXCONN, O_PERADDR, O_HS, O_IDLE, O_MAXIN, O_MAXOUT, O_HARDOUT, O_CERT, O_KEY };
        static const struct option opts[] = {
                { "listen", required_argument, NULL, O_LISTEN },
                { "tls-dir", required_argument, NULL, O_TLSDIR },
                { "name", required_argument, NULL, O_NAME },
                { "ip", required_argument, NULL, O_IP },
                { "plain", no_argument, NULL, O_PLAIN },
                { "allow-plaintext", no_argument, NULL, O_ALLOW },
                { "client-cert", required_argument, NULL, O_CLIENT_CERT },
                { "client-ca", required_argument, NULL, O_CLIENT_CA },
                { "cert", required_argument, NULL, O_CERT },
                { "key", required_argument, NULL, O_KEY },
                { "max-conn", required_argument, NULL, O_MAXCONN },
                { "max-per-addr", required_argument, NULL, O_PERADDR },
                { "handshake-timeout", required_argument, NULL, O_HS },
                { "idle-timeout", required_argument, NULL, O_IDLE },
                { "max-input", required_argument, NULL, O_MAXIN },
                { "max-output", required_argument, NULL, O_MAXOUT },
                { "hard-max-output", required_argument, NULL, O_HARDOUT },
                {},
        };
        struct gw_net_listener_config cfg = { .config_path = "net-echo" };
        struct gw_tls_server_config tcfg = {};
        const char *names[16] = {}, *ips[16] = {};
        size_t n_names = 0, n_ips = 0;
        const char *tls_dir = NULL;
        bool plain = false;
        int c, r;

        setvbuf(stdout, NULL, _IOLBF, 0);
        gw_log_setup(GW_LOG_TO_STDERR, LOG_INFO);
        gw_log_set_rate_limit(0, 0);

        while ((c = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (c) {
                case O_LISTEN: cfg.address = optarg; break;
                case O_TLSDIR: tls_dir = optarg; break;
                case O_NAME: if (n_names < 15) names[n_names++] = optarg; break;
                case O_IP: if (n_ips < 15) ips[n_ips++] = optarg; break;
                case O_PLAIN: plain = true; break;
                case O_ALLOW: cfg.allow_plaintext = true; break;
                case O_CLIENT_CERT:
                        if (strcmp(optarg, "optional") == 0)
                                tcfg.client_cert = GW_TLS_CLIENT_CERT_OPTIONAL;
                        else if (strcmp(optarg, "none") != 0) {
                                usage();
                                return 2;
                        }
                        break;
                case O_CLIENT_CA: tcfg.client_ca_file = optarg; break;
                case O_CERT: tcfg.cert_file = optarg; break;
                case O_KEY: tcfg.key_file = optarg; break;
                case O_MAXCONN: cfg.max_connections = (unsigned) strtoul(optarg, NULL, 10); break;
                case O_PERADDR: cfg.max_connections_per_address = (unsigned) strtoul(optarg, NULL, 10); break;
                case O_HS: cfg.handshake_timeout_usec = strtoull(optarg, NULL, 10) * 1000; break;
                case O_IDLE: cfg.idle_timeout_usec = strtoull(optarg, NULL, 10) * 1000; break;
                case O_MAXIN: cfg.max_input_bytes = strtoull(optarg, NULL, 10); break;
                case O_MAXOUT: cfg.max_output_bytes = strtoull(optarg, NULL, 10); break;
                case O_HARDOUT: cfg.hard_max_output_bytes = strtoull(optarg, NULL, 10); break;
                default:
                        usage();
                        return 2;
                }
        }
        if (!cfg.address || (!plain && !tls_dir && !tcfg.cert_file)) {
                usage();
                return 2;
        }
        arg_max_output = cfg.max_output_bytes ?: 1024 * 1024;

        _cleanup_free_ char *cert = NULL, *key = NULL, *ca = NULL;
        struct gw_tls_server *tls = NULL;
        if (!plain) {
                if (tls_dir) {
                        if (n_names == 0)
                                names[n_names++] = "localhost";
                        /* the listen address itself, when it is an IP literal */
                        struct sockaddr_storage sa;
                        socklen_t salen;
                        char ipbuf[INET6_ADDRSTRLEN];
                        if (gw_net_parse_address(cfg.address, &sa, &salen) >= 0 && n_ips < 15) {
                                if (sa.ss_family == AF_INET)
                                        inet_ntop(AF_INET, &((struct sockaddr_in *) &sa)->sin_addr, ipbuf, sizeof(ipbuf));
                                else
                                        inet_ntop(AF_INET6, &((struct sockaddr_in6 *) &sa)->sin6_addr, ipbuf, sizeof(ipbuf));
                                bool dup = false;
                                for (size_t i = 0; i < n_ips; i++)
                                        dup = dup || strcmp(ips[i], ipbuf) == 0;
                                if (!dup)
                                        ips[n_ips++] = ipbuf;
                        }
                        r = gw_cert_ensure(tls_dir, names, ips, &cert, &key, &ca);
                        if (r < 0)
                                return 1;
                        tcfg.cert_file = cert;
                        tcfg.key_file = key;
                }
                r = gw_tls_server_new(&tcfg, &tls);
                if (r < 0)
                        return 1;
                cfg.tls = tls;
        }

        sd_event *e = NULL;
        r = sd_event_default(&e);
        if (r < 0)
                return 1;
        sigset_t ss;
        sigemptyset(&ss);
        sigaddset(&ss, SIGTERM);
        sigaddset(&ss, SIGINT);
        sigprocmask(SIG_BLOCK, &ss, NULL);
        (void) sd_event_add_signal(e, NULL, SIGTERM, NULL, NULL);
        (void) sd_event_add_signal(e, NULL, SIGINT, NULL, NULL);

        struct gw_net_listener *l = NULL;
        r = gw_net_listener_new(e, &cfg, &handler, NULL, &l);
        gw_tls_server_unref(tls);
        if (r < 0) {
                sd_event_unref(e);
                return 1;
        }
        printf("LISTENING %u\n", gw_net_listener_get_port(l));
        r = sd_event_loop(e);
        gw_net_listener_free(l);
        sd_event_unref(e);
        printf("STOPPED\n");
        return r < 0 ? 1 : 0;
}
