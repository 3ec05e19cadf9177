/* SPDX-License-Identifier: MIT */
#pragma once

/* The CoAP client adapter (client mode: fieldhub polls or observes CoAP devices) for the
 * gateway: the ops table (adapter/adapter.h) and a validator for --check-config and the
 * configuration schema's adapter table. Devices that push to fieldhub use the CoAP front-end
 * (gateway/front/coap.c) instead. */

#include "adapter/adapter.h"

extern const struct adp_ops adp_coap_ops;

/* Validates one `adapters[i]` item of type coap; every problem goes to e. 0 or -EINVAL
 * (-ENOMEM). Opens nothing (key files are read to check them). */
int adp_coap_validate(const struct adp_conf_node *item, struct adp_conf_errors *e);
