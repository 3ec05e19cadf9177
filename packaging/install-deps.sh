#!/bin/sh
# Installs every build and test dependency of fieldhub from Debian bookworm.
# Idempotent and quiet; works on a bare bookworm as root (no package lists yet).
#   packaging/install-deps.sh          build + test dependencies
#   packaging/install-deps.sh --build  only what building fieldhubd needs
set -eu
export DEBIAN_FRONTEND=noninteractive

BUILD="build-essential meson ninja-build pkg-config
 libmodbus-dev libcoap3-dev libpaho-mqtt-dev libmbedtls-dev libssl-dev libyaml-dev libsystemd-dev
 libsqlite3-dev libjansson-dev libqpid-proton11-dev libcurl4-openssl-dev libpcre2-dev libcbor-dev"
TEST="clang llvm libclang-rt-14-dev systemd man-db sqlite3 openssl libssl-dev curl socat
 mosquitto mosquitto-clients libcoap3-bin python3 python3-paho-mqtt python3-pymodbus python3-serial-asyncio
 python3-qpid-proton debhelper devscripts lintian fakeroot dpkg-dev valgrind"

pkgs="$BUILD"
[ "${1:-}" = "--build" ] || pkgs="$pkgs $TEST"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (apt-get)" >&2
    exit 1
fi

missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ] || ! apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The distribution's mosquitto unit may be started by the package; tests run their own.
