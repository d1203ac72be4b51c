#!/usr/bin/env bash
# An index update against a full build, one after the other (issue 42): the first N passages of the bundled sample
# built, then updated to a seeded copy with 0.5% edited, 0.3% added and 0.2% deleted (the 50 / 30 / 20 of the demo's
# 10,033, scaled), then verified.
#
#   bash bench/update_timing.sh [N] [OUT.json]        # N: 2000 by default
set -euo pipefail
N=${1:-2000}
OUT=${2:-}
PY=${PY:-$PWD/.venv/bin/python}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
E=$(( N * 5 / 1000 )); A=$(( N * 3 / 1000 )); D=$(( N * 2 / 1000 ))
$PY -m flows.update_corpus --limit "$N" --edited 0 --added 0 --deleted 0 --out "$W/base.jsonl" > /dev/null
$PY -m flows.update_corpus --limit "$N" --edited "$E" --added "$A" --deleted "$D" --out "$W/new.jsonl" > /dev/null
s=$(date +%s); $PY -m flows.index_wikipedia --index "$W/index" --corpus "$W/base.jsonl" --corpus-format jsonl > "$W/build.log" 2>&1
b=$(( $(date +%s) - s ))
s=$(date +%s); $PY -m flows.index_wikipedia --index "$W/index" --corpus "$W/new.jsonl" --corpus-format jsonl --update > "$W/update.log" 2>&1
u=$(( $(date +%s) - s ))
$PY -m storage.verify "$W/index" > "$W/verify.log" 2>&1 && v=ok || v=failed
result="{\"passages\": $N, \"edited\": $E, \"added\": $A, \"deleted\": $D, \"full_build_s\": $b, \"update_s\": $u, \"update_over_build\": $(awk "BEGIN {print int(1000 * $u / $b) / 1000}"), \"verify\": \"$v\"}"
echo "$result"
[ -z "$OUT" ] || echo "$result" > "$OUT"
