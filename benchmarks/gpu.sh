#!/usr/bin/env bash
# The GPU figures of the reader and paper-scale work in one run, each part under its own time
# limit so that one failure leaves the others' figures (logs in OUTDIR, a summary printed last):
#   1. the frozen teacher's bfloat16 forward at T0-3B's shapes: MFU (score.py --paper-shape);
#   2. the ART update with BERT-base towers, bfloat16 compute, vs transformers BertModel under
#      autocast on the same GPU: ms/step and MFU (train_step.py), at B = 16 and at the paper's
#      B = 64 with remat on both sides (the preset's; without it one GPU cannot hold both sides);
#   3. the FiD train step, T5-base, one question of K = 50 passages of 512 tokens, remat, bfloat16
#      compute, vs T5ForConditionalGeneration under autocast and gradient checkpointing: ms/step and
#      MFU (reader.py);
#   4. passage embedding, art_jax's embed vs sentence-transformers, float32 (TF32 on both sides)
#      and bfloat16 (embed.py, given a BERT folder such as all-MiniLM-L6-v2);
#   5. XLA:GPU's memory analysis of the FiD step (reader.py --part memory), to set beside the
#      CPU compiler's figures in the README.
# usage: benchmarks/gpu.sh OUTDIR [BERT_FOLDER]    (run from the repository root)
# PEAK_TFLOPS (default 989, an H100/H200 SXM's dense bfloat16 peak) is the MFU's denominator.
# PARTS="art_update art_update_b64" runs only the parts named (default: all; the parts' limits add up
# to 15-19 minutes: where one command may run 10, split them over two calls).
set -u
out=${1:?usage: benchmarks/gpu.sh OUTDIR [BERT_FOLDER]}
bert=${2:-}
peak=${PEAK_TFLOPS:-989}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and torch share the GPU's memory
export TOKENIZERS_PARALLELISM=false

part() {  # part NAME SECONDS COMMAND...: the command's output to OUTDIR/NAME.log and its tail here
  local name=$1 limit=$2
  shift 2
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then return; fi
  echo "== $name ($limit s at most): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -v "^\s*$" "$out/$name.log" | tail -n 14
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', \
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$out/gpu.txt"

part teacher 110 python3 benchmarks/score.py --paper-shape bigscience/T0_3B --dtype bfloat16 --batch-size 64 \
  --encoder-length 512 --decoder-length 32 --repeats 10 --peak-tflops "$peak"
part art_update 170 python3 benchmarks/train_step.py --hidden 768 --layers 12 --heads 12 --batch 16 --k 32 \
  --passage-length 256 --loop-steps 0 --warmup 3 --repeats 10 --dtype bfloat16 --peak-tflops "$peak"
part art_update_b64 240 python3 benchmarks/train_step.py --hidden 768 --layers 12 --heads 12 --batch 64 --k 32 \
  --passage-length 256 --loop-steps 0 --warmup 2 --repeats 4 --dtype bfloat16 --remat on --peak-tflops "$peak"
part fid_step 160 python3 benchmarks/reader.py --part step --d-model 768 --d-ff 3072 --layers 12 --heads 12 \
  --k 50 --passage-length 512 --batch 1 --answer-length 32 --warmup 2 --repeats 8 --dtype bfloat16 --remat on \
  --peak-tflops "$peak"
if [ -n "$bert" ]; then
  part embed_float32 120 python3 benchmarks/embed.py --passages 10000 --batch-size 128 --model "$bert"
  part embed_bfloat16 120 python3 benchmarks/embed.py --passages 10000 --batch-size 128 --dtype bfloat16 \
    --model "$bert"
fi
part fid_memory 200 python3 benchmarks/reader.py --part memory --memory-dtypes bfloat16 --memory-remat on off

echo "== summary"
grep -H "MFU\|ratio\|passages/s\|remat o[nf] \|^  [0-9.]* M parameters" "$out"/*.log | sed "s|^$out/||"
