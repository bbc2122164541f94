#!/usr/bin/env bash
# Every GPU measurement of docs/PERFORMANCE.md, stage by stage; logs go to $OUT (default ./gpu-results).
#   bash bench/gpu_suite.sh kernels parity tinyllama lanes llama7b
# Stages: kernels (Triton attention against the torch backend, and its timings), gemv (the batch-1 projection
# kernel against cuBLAS), decode (where a 7B decode step at batch 1 spends its time), parity (float32 token-exact and
# bfloat16 agreement against transformers), tinyllama / llama7b (W256 against the peers, decode-step micro
# benchmark), lanes (interactive TTFT while a batch runs; needs the service's Python packages), service (the
# service's paths -- Batch API, completions, jobs, SSE streams, TTFT -- against the engine offline on 1024 requests,
# TinyLlama shape; needs the service's Python packages).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
for stage in "$@"; do
  echo "=== $stage $(date -u +%FT%TZ)"
  case $stage in
    kernels) python3 bench/attention_check.py 2>&1 | tee "$OUT/kernels.txt" ;;
    gemv) python3 bench/gemv_tune.py 2>&1 | tee "$OUT/gemv.txt" ;;
    decode) python3 bench/decode_profile.py llama2-7b 1 2>&1 | tee "$OUT/decode.txt" ;;
    parity) python3 bench/gpu_parity.py --device cuda 2>&1 | tee "$OUT/parity.txt" ;;
    tinyllama) PEERS=${PEERS:-inferq,transformers_cb,hf_static_b64} python3 bench/peers_gpu.py tinyllama-1.1b 2>&1 \
      | tee "$OUT/tinyllama.txt" ;;
    llama7b) PEERS=${PEERS:-inferq,transformers_cb_graphs,hf_static_b64} python3 bench/peers_gpu.py llama2-7b 2>&1 \
      | tee "$OUT/llama7b.txt" ;;
    lanes) python3 -m worker.cli demo-model /tmp/inferq-100m --size 100m >/dev/null &&
      python3 bench/lanes_ttft.py --model /tmp/inferq-100m --device cuda --max-num-seqs 64 --batch-max-tokens 128 \
        2>&1 | tee "$OUT/lanes.txt" ;;
    service) python3 bench/service_gpu.py --rounds 4 2>&1 | tee "$OUT/service.txt" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
