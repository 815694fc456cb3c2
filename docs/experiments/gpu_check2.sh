#!/bin/bash
# As run on one H200 (2026-11-29), from the repository root (there it lay in .whl/). .whl/ as in gpu_check.sh;
# .whl/code held the train.py and controller.py of the commit that adds --controller_slots device.
# GPU checks, second run: slots in GPU memory (--controller_slots device) against host memory and off at 124M,
# and a resume mid-search with device slots. The code under test is copied from .whl/code (this work's train.py).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
exec > >(tee -a $OUT/log.txt) 2>&1
T0=$(date +%s)
cp .whl/code/train.py .whl/code/controller.py .
if [ -z "${QUICK:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
grep -c '"device"' train.py
W=/tmp/gw; rm -rf $W; mkdir -p $W
S=${QUICK:+5}
run() {  # name limit_s flags...
  local name=$1 lim=$2; shift 2
  local left=$(( ${END:-380} - $(date +%s) + T0 ))
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
                                 "train_tokens_per_s", "peak_memory_mb", "rollbacks"]})
    print("  wall per token %.4e" % (r["wall_s"] / r["tokens_seen"]))
    for line in open(d + "/metrics.jsonl"):
        m = json.loads(line)
        if m.get("controller/action") not in (None, "keep"):
            print("  step", m.get("step"), "loss %.4f" % m.get("eval_loss", float("nan")), "t %.2f" % m["elapsed_s"],
                  m.get("controller/action"), "lr %.3g" % m.get("lr", 0))
except Exception as e:
    print("  no results:", e)
PYEOF
}
M124="--config_overrides n_layer=12,n_embd=768,n_head=12 --block_size 1024 --per_device_train_batch_size 16 --sample_tokens 0 --max_train_steps ${S:-200} --eval_steps ${S:-20} --max_eval_batches 4 --final_eval_batches 16 --learning_rate 6e-3"
[ -z "${SKIP124:-}" ] && run r124_off 150 $M124 --controller off
[ -z "${SKIP124:-}" ] && run r124_mem 150 $M124 --controller rl
[ -z "${SKIP124:-}" ] && run r124_dev 150 $M124 --controller rl --controller_slots device
TS="--block_size 32 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --eval_steps 4 --controller_interval 4 --max_eval_batches 2 --num_warmup_steps 2 --config_overrides n_layer=1,n_embd=32,n_head=2 --sample_tokens 0 --max_train_steps 24 --search_budget 0.9 --learning_rate 1.0 --checkpointing_steps 2 --controller_slots device"
run tiny_full 100 $TS
ck=$(for d in $(ls -d $W/tiny_full/step_* | sort -t_ -k3 -n); do [ -n "$(find $d/controller_slots -name 'rank_0.pt' 2>/dev/null)" ] && echo $d; done | head -1)
echo "resume from: $ck"; ls $ck/controller_slots 2>/dev/null
[ -n "$ck" ] && run tiny_resumed 100 $TS --resume_from_checkpoint $ck
cd $W && tar czf $OUT/runs.tgz *.log */results.json */metrics.jsonl 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
