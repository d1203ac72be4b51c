#!/usr/bin/env bash
# One lent GPU, one command (the `device` tool: docs/gpu-run.md). On the GPU machine, from the repo root:
#
#   bash bench/gpu_run.sh "$OUT"          # SMOKE=1 bash bench/gpu_run.sh /tmp/out: the same at toy sizes, on CPU
#
# Needs `python -m bench.gpu_readers prepare` (.gpu/: base encoder, data, retrieved evaluation sets,
# a corpus slice) and the wheels the GPU image lacks in .whl/. Runs, in this order:
#   1. bench.workers alone (the indexing worker's throughput on the GPU, issue 26), under 1 min;
#   2. side by side on the one GPU: bench.gpu_readers (issue 25: extractive chain + control from
#      all-MiniLM-L6-v2, sized to fit, evaluated on dev and test) and flows.fid_synthetic at the
#      small and t5-base shapes (issue 29), each sized by --budget-s.
# Writes to OUT: workers.json, extractive.json, fid-small.json, fid-base.json, logs.tar.gz and the
# fp16 export of the extractive btr reader as export.tar.part-aa, -ab, ... (files come back <= 16 MiB).
set -u
OUT=${1:?usage: bench/gpu_run.sh OUT}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
LOGS=$(mktemp -d)
WORK=${WORK:-/tmp/gpu-run}
mkdir -p "$OUT" "$WORK"
if ! $PY -c "import lmdb, zstandard, pydantic" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=3
(nvidia-smi || true; $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())") > "$LOGS/machine.txt" 2>&1

if [ "$SMOKE" = 1 ]; then  # the script itself, at toy sizes, on a CPU
    W="--passages 64 --rounds 1"
    X="--budget-s 20 --steps 6 --split-steps 6 --bits-steps 4 --control-steps 8 --batch-size 2 --eval-limit 3"
    F="--steps 4 --split-steps 2 --bits-steps 2 --budget-s 10 --questions 4 --batch-size 4"
    B="--steps 2 --split-steps 1 --bits-steps 1 --budget-s 10 --questions 2 --batch-size 2 --ratios 0.2"
else
    W="--passages 5000 --rounds 2 --batch-size 128"
    X="--budget-s 210"
    F="--steps 20000 --split-steps 4000 --bits-steps 4000 --budget-s 200 --batch-size 32"
    B="--steps 10000 --split-steps 2000 --bits-steps 2000 --budget-s 160 --batch-size 32 --learning-rate 3e-4 --questions 300"
fi
timeout 60 $PY -m bench.workers --corpus .gpu/corpus.jsonl --format jsonl --checkpoint .gpu/base --split-layer 3 $W --json \
    > "$OUT/workers.json" 2> "$LOGS/workers.log"
$PY -m flows.synthetic_qa --out "$WORK/synthetic" > "$LOGS/synthetic.log" 2>&1  # once, before both FiD runs read it
timeout 440 $PY -m bench.gpu_readers run --data .gpu --out "$WORK/extractive" --export "$WORK/export" $X \
    --results "$OUT/extractive.json" > "$LOGS/extractive.log" 2>&1 &
timeout 440 $PY -m flows.fid_synthetic --shape small --tokenizer .gpu/base --data "$WORK/synthetic" --out "$WORK/fid-small" \
    --threads 3 $F --results "$OUT/fid-small.json" > "$LOGS/fid-small.log" 2>&1 &
timeout 440 $PY -m flows.fid_synthetic --shape t5-base --tokenizer .gpu/base --data "$WORK/synthetic" --out "$WORK/fid-base" \
    --threads 3 $B --results "$OUT/fid-base.json" > "$LOGS/fid-base.log" 2>&1 &
wait
if [ -f "$WORK/export/btr.json" ]; then
    tar -C "$WORK" -cf - export | split -b 15M - "$OUT/export.tar.part-"
fi
tar -C "$LOGS" -czf "$OUT/logs.tar.gz" .
ls -la "$OUT"
