#!/usr/bin/env bash
# The main job, on the bundled data: prepare the world corpus, pretrain the base model with the
# preset that fits this machine (gpu with CUDA, else cpu), then ask it a question and a few-shot
# prompt. Installs what it needs into .venv. Extra arguments go to pretrain.py (e.g. --preset tiny).
# Re-running skips finished work; an interrupted pretraining run is resumed.
. "$(dirname "$0")/setup_env.sh" requirements.txt
python -m data.prepare
if [ -f out/base/eval.json ]; then
  echo "out/base is complete (delete it to pretrain again)"
elif [ -f out/base/ckpt.pt ]; then
  python pretrain.py --resume "$@"
else
  python pretrain.py "$@"
fi
show() { printf '\n$ python sample.py --ckpt out/base'; printf ' %q' "$@"; echo; python sample.py --ckpt out/base "$@"; }
show --prompt $'What is the capital of France?\n' --max-new-tokens 40 --seed 0
show --prompt $'Q: What is the capital of Japan?\nA: Tokyo\n\nQ: What is the capital of Kenya?\nA: Nairobi\n\nQ: What is the chemical symbol for gold?\nA: Au\n\nQ: What is the capital of France?\nA:' --max-new-tokens 6 --temperature 0
