/* SPDX-License-Identifier: MIT */
/* The serial adapter's integrity checks against published check values ("123456789"), and
 * their position, coverage, byte order and hex encoding. */

#include <string.h>

#include "serial-internal.h"
#include "test-util.h"

static const uint8_t nine[] = "123456789";

static void test_vectors(void) {
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_CRC16_MODBUS, nine, 9), 0x4B37);
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_CRC16_CCITT_FALSE, nine, 9), 0x29B1);
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_CRC16_XMODEM, nine, 9), 0x31C3);
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_CRC32, nine, 9), 0xCBF43926u);
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_SUM8, nine, 9), 0xDD); /* 477 mod 256 */
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_XOR8, nine, 9), 0x31);
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_LRC, nine, 9), 0x23);
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_CRC16_MODBUS, nine, 0), 0xFFFF);
        /* A Modbus RTU request: 01 03 00 00 00 0A -> CRC C5 CD (low byte first). */
        static const uint8_t rtu[] = { 0x01, 0x03, 0x00, 0x00, 0x00, 0x0A };
        ASSERT_EQ(adp_serial_check_compute(ADP_SERIAL_CHECK_CRC16_MODBUS, rtu, 6), 0xCDC5);
}

static void test_verify_positions(void) {
        /* Modbus RTU frame, CRC little endian at the end over everything before it. */
        uint8_t f[] = { 0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD };
        struct adp_serial_check c = { .type = ADP_SERIAL_CHECK_CRC16_MODBUS, .position = -2, .little_endian = true };
        ASSERT_OK(adp_serial_check_verify(&c, f, sizeof f));
        f[3] ^= 1;
        ASSERT_ERR(adp_serial_check_verify(&c, f, sizeof f), -EBADMSG);
        f[3] ^= 1;
        c.little_endian = false;
        ASSERT_ERR(adp_serial_check_verify(&c, f, sizeof f), -EBADMSG);
        ASSERT_ERR(adp_serial_check_verify(&c, f, 1), -ERANGE);

        /* NMEA: xor of the characters between $ and *, as two hex digits at the end. */
        const char *gga = "$GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,*76";
        struct adp_serial_check n = { .type = ADP_SERIAL_CHECK_XOR8, .hex = true, .position = -2, .from = 1,
                                      .to = -3, .to_set = true };
        ASSERT_OK(adp_serial_check_verify(&n, (const uint8_t *) gga, strlen(gga)));
        char low[128];
        strcpy(low, "$GPRMC,A*ab");
        /* compute the right value and write it in lower case: accepted */
        uint32_t x = adp_serial_check_compute(ADP_SERIAL_CHECK_XOR8, (const uint8_t *) low + 1, strlen(low) - 4);
        snprintf(low + strlen(low) - 2, 3, "%02x", x);
        ASSERT_OK(adp_serial_check_verify(&n, (const uint8_t *) low, strlen(low)));
        low[strlen(low) - 1] ^= 1;
        ASSERT_ERR(adp_serial_check_verify(&n, (const uint8_t *) low, strlen(low)), -EBADMSG);

        /* CRC-32 big endian in the middle (a header), covering the payload after it. */
        uint8_t g[4 + 9];
        memcpy(g + 4, nine, 9);
        g[0] = 0xCB, g[1] = 0xF4, g[2] = 0x39, g[3] = 0x26;
        struct adp_serial_check m = { .type = ADP_SERIAL_CHECK_CRC32, .position = 0, .from = 4, .to = 13, .to_set = true };
        ASSERT_OK(adp_serial_check_verify(&m, g, sizeof g));
        m.to = 12;
        ASSERT_ERR(adp_serial_check_verify(&m, g, sizeof g), -EBADMSG);
}

static void test_append(void) {
        uint8_t buf[32] = "123456789";
        struct adp_serial_check c = { .type = ADP_SERIAL_CHECK_CRC16_CCITT_FALSE, .position = -2 };
        ASSERT_EQ(adp_serial_check_append(&c, buf, 9, sizeof buf), 11);
        ASSERT_EQ(buf[9], 0x29);
        ASSERT_EQ(buf[10], 0xB1);
        ASSERT_OK(adp_serial_check_verify(&c, buf, 11));
        ASSERT_ERR(adp_serial_check_append(&c, buf, 9, 10), -ENOBUFS);
        struct adp_serial_check h = { .type = ADP_SERIAL_CHECK_XOR8, .hex = true, .position = -2, .from = 1, .to = -3,
                                      .to_set = true };
        memcpy(buf, "$PX,1*", 6);
        ASSERT_EQ(adp_serial_check_append(&h, buf, 6, sizeof buf), 8);
        ASSERT_OK(adp_serial_check_verify(&h, buf, 8));
}

int main(void) {
        test_vectors();
        test_verify_positions();
        test_append();
        return 0;
}
