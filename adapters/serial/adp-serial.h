/* SPDX-License-Identifier: MIT */
#pragma once

/* The serial adapter's entry points for the gateway: the ops table (adapter/adapter.h) and a
 * validator for --check-config and the configuration schema's adapter table. */

#include "adapter/adapter.h"

extern const struct adp_ops adp_serial_ops;

/* Validates one `adapters[i]` item of type serial; every problem goes to e. 0 or -EINVAL
 * (-ENOMEM). Opens no port (plugins named in the item are loaded and checked). */
int adp_serial_validate(const struct adp_conf_node *item, struct adp_conf_errors *e);
