#!/usr/bin/env bash
# The GPU evidence of issues 4 and 5 on one 4-GPU host, side by side, inside one 10-minute call:
#   GPU 0     osdn-1.3b: bf16 step, Trainer, generate, save/reload, throughput vs fla DeltaNet
#   GPUs 2,3  osdn-1.3b: the same steps on 1 GPU and under FSDP on 2 (scripts/fsdp_parity.py)
#   GPU 1     the MQAR sweep, 3 worker processes (small models; a GPU of their own, since
#             sharing GPUs with the 1.3B runs slowed both past the call's limit)
# usage: bash benchmarks/run_evidence.sh OUT_DIR COMMIT [MQAR_STEPS] [MQAR_DEADLINE_S] [MQAR_ARGS...]
set -u
out=$1 commit=$2 steps=${3:-3000} deadline=${4:-520}
shift $(( $# < 4 ? $# : 4 ))
export PYTHONUNBUFFERED=1
[ -f benchmarks/results/mqar.json ] && [ ! -f "$out/mqar.json" ] && cp benchmarks/results/mqar.json "$out/"
CUDA_VISIBLE_DEVICES=0 timeout 570 python3 scripts/gpu_model_evidence.py --config configs/osdn-1.3b \
    --out "$out/osdn-1.3b_gpu.json" --commit "$commit" --steps 200 --batch 4 --seq 2048 --throughput-steps 4 \
    >"$out/log_1.3b.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout 570 python3 scripts/fsdp_parity.py --config configs/osdn-1.3b --gpus 2 \
    --steps 20 --global-batch 8 --out "$out/osdn-1.3b_fsdp_parity.json" --commit "$commit" \
    >"$out/log_fsdp.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 580 python3 scripts/mqar.py --out "$out/mqar.json" --steps "$steps" \
    --eval-every 200 --deadline "$deadline" --workers 3 --commit "$commit" "$@" >"$out/log_mqar.txt" 2>&1 &
wait
grep -h -E "acc |deadline|Error|error" "$out/log_mqar.txt" | tail -40
tail -n 5 "$out/log_fsdp.txt"
tail -n 40 "$out/log_1.3b.txt" | tr "\r" "\n" | grep -v "it/s" | tail -n 25
