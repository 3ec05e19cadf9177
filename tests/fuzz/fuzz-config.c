/* SPDX-License-Identifier: MIT */
/* Arbitrary bytes → the YAML tree (adp_conf_load_string) → fieldhub's schema validation,
 * then a merge of the input onto itself and the error collector. Nothing may crash, leak or
 * read out of bounds, whatever the input. */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "adapter/conf.h"
#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct adp_conf_errors e = {};
        struct adp_conf_node *tree = NULL, *again = NULL, *base = NULL;
        struct gw_config *c = NULL;

        if (size > 64 * 1024)
                return 0;

        if (adp_conf_load_string("fuzz.yaml", (const char *) data, size, &tree, &e) == 0) {
                /* Merge a second copy onto a third: every kind combination meets itself. */
                if (adp_conf_load_string("a.yaml", (const char *) data, size, &base, &e) == 0 &&
                    adp_conf_load_string("b.yaml", (const char *) data, size, &again, &e) == 0) {
                        (void) adp_conf_merge(base, again, &e);
                        again = NULL;
                }
                if (gw_config_from_tree(tree, &c, &e) == 0) {
                        /* Touch what the daemon would read. */
                        for (size_t i = 0; c->host_aliases[i]; i++)
                                (void) strlen(c->host_aliases[i]);
                        for (size_t i = 0; i < c->n_adapters; i++)
                                (void) adp_conf_path(c->adapters[i].node);
                }
                tree = NULL; /* taken by gw_config_from_tree() */
        }
        for (size_t i = 0; i < adp_conf_errors_count(&e); i++)
                (void) strlen(adp_conf_errors_get(&e, i));

        gw_config_free(c);
        adp_conf_node_free(base);
        adp_conf_node_free(again);
        adp_conf_node_free(tree);
        adp_conf_errors_done(&e);
        return 0;
}
