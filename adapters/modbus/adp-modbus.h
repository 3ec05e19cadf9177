/* SPDX-License-Identifier: MIT */
#pragma once

/* The Modbus adapter's entry points for the gateway: the ops table (adapter/adapter.h) and a
 * validator for --check-config and the configuration schema's adapter table. */

#include "adapter/adapter.h"

extern const struct adp_ops adp_modbus_ops;

/* Validates one `adapters[i]` item of type modbus; every problem goes to e. 0 or -EINVAL
 * (-ENOMEM). Opens nothing. */
int adp_modbus_validate(const struct adp_conf_node *item, struct adp_conf_errors *e);
