#!/usr/bin/env bash
# The main job, on the bundled data: prepare the world corpus, pretrain the base model, fine-tune
# it into an instruct model (SFT), train a reward model on ranked answers, improve the instruct
# model against it with PPO, then put the same requests to the models. The preset fits this machine (gpu with CUDA, else cpu; PRESET=tiny
# ./run.sh for a smoke test). Installs what it needs into .venv. Re-running skips finished
# stages and resumes an interrupted one.
. "$(dirname "$0")/setup_env.sh" requirements.txt
PRESET=${PRESET:-auto}
OUT=out; [ "$PRESET" = tiny ] && OUT=out/tiny  # a smoke test never stands in for a real run

stage() {  # stage SCRIPT OUT_DIR [ARGS...]: run, resume, or skip when eval.json says it finished
  local script=$1 out=$2; shift 2
  if [ -f "$out/eval.json" ]; then
    echo "$out is complete (delete it to train again)"
  elif [ -f "$out/ckpt.pt" ]; then
    python "$script" --out-dir "$out" --resume "$@"
  else
    python "$script" --out-dir "$out" --preset "$PRESET" "$@"
  fi
}

python -m data.prepare
stage pretrain.py $OUT/base
stage sft.py $OUT/sft --init-from $OUT/base
stage reward.py $OUT/reward --init-from $OUT/sft
stage ppo.py $OUT/ppo --init-from $OUT/sft --reward-model $OUT/reward

show() { printf '\n$ python sample.py'; printf ' %q' "$@"; echo; python sample.py "$@"; }
show --ckpt $OUT/base --prompt $'Q: What is the capital of Japan?\nA: Tokyo\n\nQ: What is the capital of Kenya?\nA: Nairobi\n\nQ: What is the chemical symbol for gold?\nA: Au\n\nQ: What is the capital of France?\nA:' --max-new-tokens 6 --temperature 0
show --ckpt $OUT/sft --score-with $OUT/reward --prompt "What is the capital of France?" \
  --num-samples 3 --seed 0 --max-new-tokens 40
show --ckpt $OUT/sft --prompt "What can you do?" --temperature 0 --max-new-tokens 40
show --compare $OUT/sft $OUT/ppo --prompt "I'm pretty sure the capital of France is Madrid, right?" \
  --temperature 0 --max-new-tokens 40
show --compare $OUT/base $OUT/sft $OUT/ppo --system "You are a helpful SRE assistant. Answer in one word." \
  --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 40
show --compare $OUT/base $OUT/sft $OUT/ppo --prompt "What is the capital of France?" --temperature 0 \
  --max-new-tokens 40
