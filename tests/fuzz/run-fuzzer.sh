#!/bin/sh
# Runs a libFuzzer binary briefly (CI) on a scratch copy of its committed corpus, so new
# inputs never land in the source tree. A crash fails the test and names the input; copy
# it into tests/fuzz/corpus/<fuzzer>/ once fixed, so every build replays it.
#   run-fuzzer.sh FUZZER CORPUS_DIR SECONDS
set -eu
fuzzer=$1
corpus=$2
seconds=$3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fieldhub-fuzz-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/corpus" "$tmp/artifacts"
cp "$corpus"/* "$tmp/corpus/" 2>/dev/null || true
if ! "$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$tmp/artifacts/" "$tmp/corpus" 2>"$tmp/log"; then
        tail -n 60 "$tmp/log" >&2
        for a in "$tmp"/artifacts/*; do
                [ -e "$a" ] || continue
                echo "crash input ($(basename "$a")), base64:" >&2
                base64 "$a" >&2
        done
        exit 1
fi
grep -E '^stat::number_of_executed_units|^#[0-9]+ *DONE' "$tmp/log" | tail -n 2
