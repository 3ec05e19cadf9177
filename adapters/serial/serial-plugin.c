/* SPDX-License-Identifier: MIT */
/* Loading serial plugins (adapter/serial-plugin.h): dlopen, the entry symbol, the ABI
 * version check. */

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serial-internal.h"

int adp_serial_plugin_load(const char *path, struct adp_serial_plugin_handle *h, char *why, size_t why_size) {
        void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!dl) {
                const char *err = dlerror();
                snprintf(why, why_size, "cannot load plugin %s: %s", path, err ? err : "unknown error");
                return -ENOENT;
        }
        adp_serial_plugin_entry_fn entry;
        void *sym = dlsym(dl, ADP_SERIAL_PLUGIN_SYMBOL);
        if (!sym) {
                snprintf(why, why_size, "%s is not a fieldhub serial plugin: it does not export %s()", path,
                         ADP_SERIAL_PLUGIN_SYMBOL);
                dlclose(dl);
                return -EINVAL;
        }
        memcpy(&entry, &sym, sizeof entry);
        const struct adp_serial_plugin *p = entry();
        if (!p || p->abi_version != ADP_SERIAL_PLUGIN_ABI) {
                snprintf(why, why_size, "plugin %s speaks ABI version %u, fieldhub speaks %u: rebuild it against "
                         "adapter/serial-plugin.h", path, p ? p->abi_version : 0u, ADP_SERIAL_PLUGIN_ABI);
                dlclose(dl);
                return -EPROTO;
        }
        if (p->struct_size < offsetof(struct adp_serial_plugin, encode) + sizeof p->encode) {
                snprintf(why, why_size, "plugin %s declares a table of %u bytes, smaller than ABI %u's", path,
                         p->struct_size, ADP_SERIAL_PLUGIN_ABI);
                dlclose(dl);
                return -EPROTO;
        }
        h->dl = dl;
        h->p = p;
        return 0;
}

void adp_serial_plugin_unload(struct adp_serial_plugin_handle *h) {
        if (h->dl)
                dlclose(h->dl);
        h->dl = NULL;
        h->p = NULL;
        free(h->name);
        free(h->path);
        h->name = h->path = NULL;
}
