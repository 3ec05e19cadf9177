#!/bin/sh
# Installs every dependency, builds fieldhub and runs every test suite (unit, integration,
# fuzz, packaging), the way CI does:
#   1. gcc, -Dwerror=true, AddressSanitizer + UndefinedBehaviorSanitizer: all suites;
#   2. clang with -Dfuzzing=true (libFuzzer + ASan/UBSan): the fuzz suite, which replays
#      every corpus and runs each fuzzer briefly.
# Ends with one line of totals, "N passed, N failed, N skipped". Exit status 0 only when
# nothing failed. Works on a bare Debian bookworm as root.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)

packaging/install-deps.sh

export ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:detect_leaks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export MESON_TESTTHREADS="${MESON_TESTTHREADS:-4}"

setup() { # dir, meson options...
        dir=$1
        shift
        if [ -d "$dir/meson-private" ]; then
                meson setup --reconfigure "$dir" "$@" >/dev/null
        else
                meson setup "$dir" "$@" >/dev/null
        fi
}

status=0
build_failures=0
logs=""
# A build that fails counts as one failed test, so the totals line is always printed.
run_suite() { # dir, meson test arguments...
        dir=$1
        shift
        if ninja -C "$dir" >"$dir.build.log" 2>&1; then
                meson test -C "$dir" --print-errorlogs --no-rebuild "$@" || status=1
                logs="$logs $top/$dir/meson-logs/testlog.json"
        else
                tail -n 40 "$dir.build.log" >&2
                echo "run-all: the build in $dir failed" >&2
                build_failures=$((build_failures + 1))
                status=1
        fi
}

setup build-ci -Dwerror=true -Db_sanitize=address,undefined -Db_lundef=false
run_suite build-ci

CC=clang setup build-fuzz -Dwerror=true -Dfuzzing=true -Db_sanitize=address,undefined -Db_lundef=false
run_suite build-fuzz --suite fuzz

python3 - "$build_failures" $logs <<'PY'
import json, sys
p = s = 0
f = int(sys.argv[1])
for path in sys.argv[2:]:
    for line in open(path):
        r = json.loads(line)["result"]
        if r in ("OK", "EXPECTEDFAIL"):
            p += 1
        elif r == "SKIP":
            s += 1
        else:
            f += 1
print(f"{p} passed, {f} failed, {s} skipped")
PY
exit $status
