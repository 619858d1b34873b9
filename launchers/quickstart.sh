#!/usr/bin/env bash
# Quickstart: a tiny MoC trained on CPU, two ranks under DeepSpeed ZeRO-2, from a corpus that
# needs no network (this machine's Python standard-library sources).
#
#   bash launchers/quickstart.sh              # install (if needed), data, train 300 steps
#   STEPS=50 bash launchers/quickstart.sh     # shorter
#
# Steps: venv + pip install (skipped when the venv exists) → corpus → tokenizer → .bin/.idx →
# `deepspeed --num_gpus 2 megatron_moc/training/pretrain.py --config launchers/configs/tiny.yaml`
# → compare the validation loss with the unigram entropy of the data.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DATA=${DATA:-data}
RUN=${RUN:-runs/tiny}
STEPS=${STEPS:-300}
NPROC=${NPROC:-2}

# --- environment ---------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"   # set TORCH_SPEC for your CUDA/ROCm build
  .venv/bin/pip install -q -e ".[test]"
fi
. .venv/bin/activate
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR=cpu          # DeepSpeed's CPU accelerator (gloo) even if a GPU is present
export CUDA_VISIBLE_DEVICES=""     # the tiny run is a CPU demonstration
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# DeepSpeed JIT-builds a CPU comm op; a private dir avoids stale build locks of other jobs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/runs/.torch_extensions}  # runs/ is git-ignored

# --- data ----------------------------------------------------------------------------------
if [ ! -f "$DATA/stdlib.bin" ]; then
  python tools/build_default_corpus.py --output-dir "$DATA" --max-mb 4
  python tools/train_tokenizer.py --input "$DATA/stdlib.jsonl" --output-prefix "$DATA/tok" \
    --vocab-size 512 --num-threads 2
  python tools/preprocess_data.py --input "$DATA/stdlib.jsonl" --tokenizer "$DATA/tok.model" \
    --output-prefix "$DATA/stdlib" --workers 2
fi

# --- train ---------------------------------------------------------------------------------
deepspeed --num_nodes 1 --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29512}" \
  megatron_moc/training/pretrain.py --config launchers/configs/tiny.yaml \
  "train.data_path=[$DATA/stdlib]" "train.tokenizer=$DATA/tok.model" "train.save=$RUN" \
  "train.train_iters=$STEPS" "$@"

# --- result --------------------------------------------------------------------------------
python - "$DATA/stdlib" "$RUN" <<'PY'
import json, sys
from megatron_moc.training.metrics import unigram_entropy
prefix, run = sys.argv[1:]
h = unigram_entropy(prefix)
valid = json.load(open(f"{run}/summary.json"))["valid_loss"]
print(f"validation loss {valid:.3f} nats vs unigram entropy of the data {h:.3f} nats "
      f"({'below' if valid < h else 'NOT below'} by {h - valid:.3f})")
print(f"checkpoints: {run}   TensorBoard: tensorboard --logdir {run}/tensorboard")
PY
