/* SPDX-License-Identifier: MIT */
#pragma once

/* MESSAGE_ID= values of operator-relevant journal entries. Each is documented in
 * packaging/systemd/fieldhub.catalog (installed to /usr/lib/systemd/catalog/), so
 * `journalctl -x` explains it, and `journalctl MESSAGE_ID=<id>` finds every occurrence.
 * Never change an id once released. */

#define GW_MSG_STARTED "28a98eb93a8a4f44a919eecacaf3cbd3" /* fieldhubd started and is ready */
#define GW_MSG_STOPPED "264459e469574e94a56a88263c6b77e3" /* fieldhubd stopped */
#define GW_MSG_CONFIG_INVALID "8d783dbd5b1d408db30b1122d88748a2" /* configuration rejected at start */
#define GW_MSG_RELOADED "e03a0c5b3b284d0ea15b8a35c9875a95" /* configuration reloaded */
#define GW_MSG_RELOAD_FAILED "30165a0d30c245c29eac7b04e5742701" /* configuration reload rejected; running configuration kept */
#define GW_MSG_STORE_OPENED "eb301052b2b148d385674409df5f9135" /* store opened */
#define GW_MSG_STORE_CHECK "d30ab6c2937e45e1a3cde53937dec66e" /* store integrity check after an unclean stop */
#define GW_MSG_STORE_ERROR "cc8f83dfd48a4cf6b275dff009658d79" /* store write failed */
#define GW_MSG_STORE_STALLED "f3832d4e65f04b0dbf1a196be943f2b2" /* store commit stalled; watchdog no longer petted */
#define GW_MSG_DEVICE_CREATED "320b98fbc3c44f068271f739ab594765" /* device identity created */
#define GW_MSG_DEVICE_DELETED "235998e30f5b4d0ca7babdb1b4cd813f" /* device identity deleted */
#define GW_MSG_DEVICE_UPDATED "ae8c3bdf28bc45aaa1e5f21c73a6911d" /* device identity updated */
#define GW_MSG_AUTH_FAILED "7339d05d11ea428eaa749b986f4fdd49" /* authentication failed */
#define GW_MSG_DEVICE_CONNECTED "9e0c61c2569e4ae583afc8b1820836f8" /* device connected */
#define GW_MSG_DEVICE_DISCONNECTED "e0e8f4f83dad49a3b269933120b51ea4" /* device disconnected */
#define GW_MSG_ENDPOINT_DOWN "1bbc7b2c062d40a0ad028531d1264d99" /* route endpoint unreachable */
#define GW_MSG_ENDPOINT_UP "227e7ee790da44beb2d92c3980076dd3" /* route endpoint reachable again */
#define GW_MSG_QUEUE_OVERFLOW "c76ab1c99d6841ec85c9755429fa3153" /* queue overflow */
#define GW_MSG_LOG_SUPPRESSED "7b3951ba6df247468d4129d78775f41e" /* repeated log messages suppressed */
