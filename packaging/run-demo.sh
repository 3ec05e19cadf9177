#!/bin/sh
# The README's first command: installs the build dependencies, builds fieldhub, starts the
# Modbus simulator (tests/sim/modbus-sim --demo on 127.0.0.1:5020: a boiler whose temperature,
# pressure and energy counter change every second) and runs fieldhubd in the foreground on
# configs/demo.yaml, polling it (state in /tmp/fieldhub-demo, created on start). Stop both
# with Ctrl-C. While it runs, in another shell:
#   ./build-demo/gateway/fieldhubctl --socket /tmp/fieldhub-demo/admin.sock monitor-events
#   ./build-demo/gateway/fieldhubctl --socket /tmp/fieldhub-demo/admin.sock twin show boiler-1
set -eu
cd "$(dirname "$0")/.."
packaging/install-deps.sh --build
if [ -d build-demo/meson-private ]; then
        meson setup --reconfigure build-demo -Dtests=false >/dev/null
else
        meson setup build-demo -Dtests=false --buildtype=release >/dev/null
fi
ninja -C build-demo >/dev/null
# The simulator is a test peer (built by meson with the tests); the demo builds it alone.
cc -O2 -o build-demo/modbus-sim tests/sim/modbus-sim.c -lm

build-demo/modbus-sim --tcp 5020 --demo &
sim=$!
trap 'kill "$sim" 2>/dev/null || true' EXIT INT TERM
echo "modbus-sim: a simulated boiler on 127.0.0.1:5020 (pid $sim)" >&2
echo "fieldhubd: starting on configs/demo.yaml; Ctrl-C stops it." >&2
echo "In another shell: ./build-demo/gateway/fieldhubctl --socket /tmp/fieldhub-demo/admin.sock monitor-events" >&2
./build-demo/gateway/fieldhubd --config configs/demo.yaml
