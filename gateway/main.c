/* SPDX-License-Identifier: MIT */
/* fieldhubd: the fieldhub edge gateway daemon. */

#include <getopt.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "daemon.h"
#include "fieldhub-paths.h"
#include "log.h"

static void help(void) {
        printf("Usage: fieldhubd [OPTIONS]\n"
               "\n"
               "The fieldhub edge gateway: field protocols in, an IoT-Hub-compatible hub at the edge,\n"
               "store-and-forward upstream.\n"
               "\n"
               "  -c --config=PATH      Configuration file (default %s)\n"
               "                        conf.d/*.yaml beside it is merged in lexical order\n"
               "     --confd=DIR        Read fragments from DIR instead of <config dir>/conf.d\n"
               "  -s --state-dir=DIR    State directory (overrides state_dir; default %s)\n"
               "     --check-config     Validate the configuration (adapters included, no device\n"
               "                        is opened) and exit: 0 if valid, 78 if not\n"
               "  -l --log-level=LEVEL  emerg|alert|crit|err|warning|notice|info|debug (overrides log.level)\n"
               "  -V --version          Print the version and exit\n"
               "  -h --help             Show this help\n"
               "\n"
               "Signals: SIGHUP reloads the configuration, SIGTERM/SIGINT stop gracefully.\n",
               FIELDHUB_CONFIG_PATH, FIELDHUB_STATE_DIR);
}

int main(int argc, char **argv) {
        enum { OPT_CHECK = 0x100, OPT_CONFD };
        static const struct option options[] = {
                { "config", required_argument, NULL, 'c' },
                { "confd", required_argument, NULL, OPT_CONFD },
                { "state-dir", required_argument, NULL, 's' },
                { "check-config", no_argument, NULL, OPT_CHECK },
                { "log-level", required_argument, NULL, 'l' },
                { "version", no_argument, NULL, 'V' },
                { "help", no_argument, NULL, 'h' },
                {},
        };
        struct gw_daemon_options o = { .config_path = FIELDHUB_CONFIG_PATH, .log_level = -1 };
        bool check = false;
        int c;

        /* Two malloc arenas, not 8 per core: every adapter line has its worker thread, and
         * each arena a thread touches keeps its own free pages (measured: 55 Modbus lines,
         * 24 MiB taken from the kernel for 8.6 MiB in use). MALLOC_ARENA_MAX or
         * GLIBC_TUNABLES in the environment still win. */
        if (!getenv("MALLOC_ARENA_MAX") && !getenv("GLIBC_TUNABLES"))
                (void) mallopt(M_ARENA_MAX, 2);

        while ((c = getopt_long(argc, argv, "c:s:l:Vh", options, NULL)) >= 0) {
                switch (c) {
                case 'c':
                        o.config_path = optarg;
                        break;
                case OPT_CONFD:
                        o.confd_dir = optarg;
                        break;
                case 's':
                        if (optarg[0] != '/') {
                                fprintf(stderr, "fieldhubd: --state-dir must be an absolute path, got \"%s\"\n",
                                        optarg);
                                return GW_EXIT_CONFIG;
                        }
                        o.state_dir = optarg;
                        break;
                case OPT_CHECK:
                        check = true;
                        break;
                case 'l':
                        o.log_level = gw_log_level_from_string(optarg);
                        if (o.log_level < 0) {
                                fprintf(stderr,
                                        "fieldhubd: --log-level: found \"%s\", expected one of: emerg, alert, crit, "
                                        "err, warning, notice, info, debug\n",
                                        optarg);
                                return GW_EXIT_CONFIG;
                        }
                        break;
                case 'V':
                        printf("fieldhubd %s\n", FIELDHUB_VERSION);
                        return 0;
                case 'h':
                        help();
                        return 0;
                default:
                        fprintf(stderr, "Try 'fieldhubd --help'.\n");
                        return 64; /* EX_USAGE */
                }
        }
        if (optind < argc) {
                fprintf(stderr, "fieldhubd: unexpected argument \"%s\"; try 'fieldhubd --help'.\n", argv[optind]);
                return 64;
        }

        if (check) {
                _cleanup_(adp_conf_errors_done) struct adp_conf_errors e = { 0 };
                struct gw_config *cfg = NULL;
                int r = gw_config_load(o.config_path, o.confd_dir, &cfg, &e);
                for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                        fprintf(stderr, "%s\n", adp_conf_errors_get(&e, i));
                if (r < 0) {
                        if (adp_conf_errors_count(&e) == 0)
                                fprintf(stderr, "%s: %s\n", o.config_path, strerror(-r));
                        fprintf(stderr, "%s: configuration invalid (%zu error%s)\n", o.config_path,
                                adp_conf_errors_count(&e), adp_conf_errors_count(&e) == 1 ? "" : "s");
                        return GW_EXIT_CONFIG;
                }
                size_t n = 0;
                while (cfg->sources && cfg->sources[n])
                        n++;
                printf("%s: configuration OK (%zu file%s, hub %s, %zu adapter%s)\n", o.config_path, n,
                       n == 1 ? "" : "s", cfg->host_name, cfg->n_adapters, cfg->n_adapters == 1 ? "" : "s");
                gw_config_free(cfg);
                return 0;
        }

        gw_log_setup(GW_LOG_TO_AUTO, o.log_level >= 0 ? o.log_level : LOG_INFO);

        struct gw_daemon *d = NULL;
        int status = gw_daemon_start(&o, &d);
        if (status == 0)
                status = gw_daemon_run(d);
        gw_daemon_free(d);
        return status;
}
