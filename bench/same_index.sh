#!/usr/bin/env bash
# The same corpus and settings indexed by another commit and by this tree, one after the other: are the published
# indexes the same bytes (shards, codec, retriever), and how long did each flow take?
#
#   bash bench/same_index.sh 675d046 [PASSAGES] [OUT.json]     # 675d046: the worker before the pipeline (issue 41)
#
# The corpus is the bundled sample's first PASSAGES (default 600) passages whose text NFKC leaves as it is (the
# corpus rules changed after 675d046: other passages are stored differently, on purpose), shards of 200, offline
# merge 0.2 (the flow's defaults otherwise). Runs the flow directly (a temporary Prefect server, a local Ray).
set -euo pipefail
OLD=${1:?usage: bench/same_index.sh COMMIT [PASSAGES] [OUT.json]}
N=${2:-600}
OUT=${3:-}
PY=${PY:-$PWD/.venv/bin/python}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/old" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/old" "$OLD" >/dev/null
$PY - "$WORK/corpus.jsonl" "$N" <<'EOF'
import json, sys, unicodedata
from reader.assets import wikipedia_sample
path, limit, n = sys.argv[1], int(sys.argv[2]), 0
with open(path, "w") as f:
    for i, p in enumerate(wikipedia_sample(None)):
        title, text = p.title.strip(), p.text.strip()
        if n == limit or not text or len(text) > 20_000 or any(unicodedata.normalize("NFKC", s) != s for s in (title, text)):
            continue
        f.write(json.dumps({"id": f"p{i}", "title": title, "text": text}) + "\n")
        n += 1
EOF
run() {  # $1: the checkout whose code runs, $2: the index folder
    local start=$(date +%s)
    (cd "$1" && PYTHONPATH="$1" $PY -m flows.index_wikipedia --index "$2" --corpus "$WORK/corpus.jsonl" \
        --corpus-format jsonl --shard-size 200) > "$2.log" 2>&1 || { tail -20 "$2.log"; exit 1; }
    echo $(( $(date +%s) - start ))
}
OLD_S=$(run "$WORK/old" "$WORK/index-old")
NEW_S=$(run "$PWD" "$WORK/index-new")
$PY - "$WORK" "$OLD" "$N" "$OLD_S" "$NEW_S" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, old, n, old_s, new_s, out = sys.argv[1:7]
a, b = (json.loads((Path(work) / f"index-{k}" / "manifest.json").read_text()) for k in ("old", "new"))
same = lambda f: f(a) == f(b)  # noqa: E731
result = {
    "old": old, "passages": int(n), "shards": [s["digest"] for s in b["shards"]],
    "same_shards": same(lambda m: [s["digest"] for s in m["shards"]]), "same_codec": same(lambda m: m["codec"]),
    "same_retriever": same(lambda m: m["extra"]["retriever"]),
    "manifest_fields_that_differ": sorted(k for k in a if a[k] != b.get(k)),
    "flow_seconds": {"old": round(float(old_s), 1), "new": round(float(new_s), 1)},
}
print(json.dumps(result, indent=1))
if out:
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
EOF
