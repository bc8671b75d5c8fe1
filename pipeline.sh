#!/usr/bin/env bash
# minilab end to end: taxonomy -> synthetic data -> LoRA training -> evaluation -> GGUF -> served chat.
#
#   ./pipeline.sh [--output-dir DIR] [--profile cpu|single-gpu|multi-gpu|auto] [--taxonomy DIR] [--model PATH]
#                 [--phased | --no-phased] [--prune] [--skip STAGE,...] [--only STAGE,...] [--force]
#                 [--judge-endpoint URL] [--set SECTION.KEY=VALUE ...]
#
# Output goes to DIR (default runs/pipeline in the repository). Stages, in order: validate generate mix
# tokenize train (or phase1 phase2 with --phased) mmlu heldout convert mtbench chat summary. Each prints the exact
# command it runs; a finished stage writes DIR/.done/STAGE and is skipped on the next run (so a rerun resumes)
# unless --force. --set overrides the profile's sections, e.g. --set generate.num_instructions=2
# --set evaluate.mmlu_limit=5 --set train.max_steps=10 (train.* keys are config.py keys). MT-Bench is judged by
# the base model unless --judge-endpoint names an OpenAI-compatible server (key from MINILAB_API_KEY or
# OPENAI_API_KEY). Servers run on free loopback ports and are always stopped, also on errors and Ctrl-C.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

OUT="" PROFILE=auto TAXONOMY=sdg/sample_taxonomy MODEL=embedded:SmolLM2-135M-Instruct
JUDGE_ENDPOINT="" PHASED="" PRUNE=false FORCE=false SKIP="" ONLY="" SETS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --output-dir) OUT=${2:?--output-dir needs a folder}; shift 2 ;;
    --profile) PROFILE=${2:?--profile needs a name}; shift 2 ;;
    --taxonomy) TAXONOMY=${2:?--taxonomy needs a folder}; shift 2 ;;
    --model) MODEL=${2:?--model needs an HF folder}; shift 2 ;;
    --judge-endpoint) JUDGE_ENDPOINT=${2:?--judge-endpoint needs a URL}; shift 2 ;;
    --phased) PHASED=true; shift ;;
    --no-phased) PHASED=false; shift ;;
    --prune) PRUNE=true; shift ;;
    --force) FORCE=true; shift ;;
    --skip) SKIP=${2:?--skip needs stage names}; shift 2 ;;
    --only) ONLY=${2:?--only needs stage names}; shift 2 ;;
    --set) SETS+=(--set "${2:?--set needs SECTION.KEY=VALUE}"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'; see ./pipeline.sh --help" ;;
  esac
done
# The tools run from the repository root; paths the user gave stay relative to where they ran the script.
absolute() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }
[[ -n $OUT ]] && OUT=$(absolute "$OUT")
[[ -e $TAXONOMY ]] && TAXONOMY=$(absolute "$TAXONOMY")
[[ -e $MODEL ]] && MODEL=$(absolute "$MODEL")
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/runs/pipeline}

# Shell-quoted assignments from the profile: GENERATE_*, EVALUATE_*, TRAIN_PROFILE, TRAIN_OVERRIDES.
SETTINGS=$(python phases.py settings --profile "$PROFILE" ${SETS[@]+"${SETS[@]}"}) || exit 2
eval "$SETTINGS"
eval "TRAIN_SETS=($TRAIN_OVERRIDES)"
PHASED=${PHASED:-$EVALUATE_PHASED}
PHASES=(train)
[[ $PHASED == true ]] && PHASES=(phase1 phase2)
STAGES=(validate generate mix tokenize "${PHASES[@]}" mmlu heldout convert mtbench chat summary)
for name in ${SKIP//,/ } ${ONLY//,/ }; do
  [[ " ${STAGES[*]} " == *" $name "* ]] || die "unknown stage '$name'; stages: ${STAGES[*]}"
done
DATA=$OUT/data GEN=$OUT/data/generated EVAL=$OUT/eval
mkdir -p "$OUT/.done" "$DATA" "$EVAL"

show() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; }
run() { show "$@"; "$@"; }
limit() { [[ $1 -gt 0 ]] && echo "--limit $1" || true; }
# A stage runs when selected and not done yet; its marker is written only after it succeeded, and running it
# clears the markers of every later stage, whose inputs it just replaced.
begin() {
  if [[ -n $ONLY && ",$ONLY," != *",$1,"* ]] || [[ ",$SKIP," == *",$1,"* ]]; then
    echo "== $1: skipped"; return 1
  fi
  if [[ -f $OUT/.done/$1 && $FORCE != true ]]; then
    echo "== $1: done already (rerun with --force --only $1)"; return 1
  fi
  echo "== $1"; STAGE_START=$SECONDS
  local later=false name
  for name in "${STAGES[@]}"; do
    [[ $name == "$1" ]] && later=true
    [[ $later == true ]] && rm -f "$OUT/.done/$name"
  done
  return 0
}
finish() { date -u +%FT%TZ > "$OUT/.done/$1"; echo "== $1 done in $((SECONDS - STAGE_START))s"; }

SERVER_PIDS=()
start_server() {  # MODEL ('' = embedded) LOG CONTEXT_TOKENS -> sets SERVER_URL
  local port cmd
  port=$(python -c 'from serve.background import free_port; print(free_port())')
  cmd=(python -m serve --host 127.0.0.1 --port "$port" --ctx "$3")
  [[ -n $1 ]] && cmd+=(--model "$1")
  show "${cmd[@]}"; echo "  (in the background, log: $2)"
  "${cmd[@]}" >"$2" 2>&1 &
  SERVER_PIDS+=($!)
  SERVER_URL=http://127.0.0.1:$port/v1
  python phases.py wait-server "$SERVER_URL" "$!" "$2"
}
stop_servers() {
  local pid
  for pid in ${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}; do
    kill -INT "$pid" 2>/dev/null || continue
    # 45 s: serve gives vLLM 30 s to stop after Ctrl-C, and killing the wrapper first would orphan it
    for _ in $(seq 90); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}
trap stop_servers EXIT
trap 'exit 130' INT TERM

# The base model served as the trained one is, an HF folder converted by serve.convert: MT-Bench then compares
# training, not the embedded Q4_1 file against an F16 one.
base_server_model() {
  python -c 'import sys; from model import resolve_model_path; print(resolve_model_path(sys.argv[1]))' "$MODEL"
}
# Context for MT-Bench: the multi-turn judge prompt holds both questions, both answers and both references.
MT_BENCH_CTX=$((4 * EVALUATE_MAX_TOKENS + EVALUATE_JUDGE_MAX_TOKENS + 1536))

# Train configs first: a bad profile or key combination stops the run before anything slow starts.
for phase in "${PHASES[@]}"; do
  data=$DATA/train.jsonl; [[ $phase != train ]] && data=$DATA/$phase.jsonl
  extra=(keep_last_checkpoint_only=true)
  [[ $phase != train ]] && extra=(keep_last_checkpoint_only=false checkpoint_at_epoch=true)
  model=$MODEL
  [[ $phase == phase2 && -f $OUT/phase1/best.txt ]] && model=$(cat "$OUT/phase1/best.txt")
  python phases.py run-yaml "$OUT/$phase/run.yaml" "profile=$TRAIN_PROFILE" "model_path=$model" \
    "data_path=$data" "data_output_dir=$OUT/$phase/tokenized" "ckpt_output_dir=$OUT/$phase/checkpoints" \
    "${extra[@]}" ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"} || exit 2
done
echo "profile $TRAIN_PROFILE, phased $PHASED, output $OUT"

if begin validate; then
  run python -m sdg validate "$TAXONOMY"
  finish validate
fi

if begin generate; then
  teacher=()
  [[ -n $GENERATE_ENDPOINT ]] && teacher+=(--endpoint "$GENERATE_ENDPOINT")
  [[ -n $GENERATE_MODEL ]] && teacher+=(--model "$GENERATE_MODEL")
  run python -m sdg generate --taxonomy "$TAXONOMY" --output-dir "$GEN" \
    --num-instructions "$GENERATE_NUM_INSTRUCTIONS" --concurrency "$GENERATE_CONCURRENCY" \
    --max-tokens "$GENERATE_MAX_TOKENS" --judge-threshold "$GENERATE_JUDGE_THRESHOLD" ${teacher[@]+"${teacher[@]}"}
  finish generate
fi

if begin mix; then
  if [[ $PHASED == true ]]; then
    # LAB: knowledge first, then skills with a replay of the knowledge so phase 2 does not forget it.
    run python phases.py split "$GEN/train.jsonl" "$DATA" --phased
    printf 'output: phase1.jsonl\nexclude: [generated/test.jsonl]\ndatasets:\n  - {path: knowledge.jsonl, ratio: 1.0}\n' \
      > "$DATA/phase1_recipe.yaml"
    printf 'output: phase2.jsonl\nexclude: [generated/test.jsonl]\ndatasets:\n  - {path: skills.jsonl, ratio: 1.0}\n%s\n' \
      '  - {path: knowledge.jsonl, ratio: 0.5}' \
      > "$DATA/phase2_recipe.yaml"
    run python -m sdg mix "$DATA/phase1_recipe.yaml"
    run python -m sdg mix "$DATA/phase2_recipe.yaml"
  else
    # Knowledge samples repeated within each epoch: facts need more passes than a skill's few examples take.
    run python phases.py split "$GEN/train.jsonl" "$DATA"
    printf 'output: train.jsonl\nexclude: [generated/test.jsonl]\ndatasets:\n%s\n%s\n' \
      "  - {path: knowledge.jsonl, ratio: $MIX_KNOWLEDGE_REPEATS}" '  - {path: skills.jsonl, ratio: 1.0}' \
      > "$DATA/train_recipe.yaml"
    run python -m sdg mix "$DATA/train_recipe.yaml"
  fi
  finish mix
fi

if begin tokenize; then
  for phase in "${PHASES[@]}"; do run python tokenize_data.py --config "$OUT/$phase/run.yaml"; done
  finish tokenize
fi

train_phase() {  # PHASE: train, plot the loss curve
  run python train.py --config "$OUT/$1/run.yaml"
  run python logger.py plot "$OUT/$1/checkpoints"
}

if [[ $PHASED != true ]] && begin train; then
  train_phase train
  python phases.py checkpoints "$OUT/train/checkpoints" | tail -n 1 > "$OUT/final_model.txt.tmp"
  mv "$OUT/final_model.txt.tmp" "$OUT/final_model.txt"
  finish train
fi

prune_flag=(); [[ $PRUNE == true ]] && prune_flag=(--prune)
if [[ $PHASED == true ]] && begin phase1; then
  train_phase phase1
  mkdir -p "$OUT/phase1/eval"
  for ckpt in $(python phases.py checkpoints "$OUT/phase1/checkpoints"); do
    run python -m eval.mmlu --model "$ckpt" --taxonomy "$TAXONOMY" --few-shots "$EVALUATE_FEW_SHOTS" \
      --batch-size "$EVALUATE_BATCH_SIZE" $(limit "$EVALUATE_MMLU_LIMIT") \
      --output "$OUT/phase1/eval/$(basename "$ckpt").json"
  done
  run python phases.py best "$OUT/phase1/eval" "$OUT/phase1/checkpoints" ${prune_flag[@]+"${prune_flag[@]}"} \
    > "$OUT/phase1/best.txt.tmp"
  mv "$OUT/phase1/best.txt.tmp" "$OUT/phase1/best.txt"
  python phases.py run-yaml "$OUT/phase2/run.yaml" "profile=$TRAIN_PROFILE" "model_path=$(cat "$OUT/phase1/best.txt")" \
    "data_path=$DATA/phase2.jsonl" "data_output_dir=$OUT/phase2/tokenized" "ckpt_output_dir=$OUT/phase2/checkpoints" \
    keep_last_checkpoint_only=false checkpoint_at_epoch=true ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"}
  finish phase1
fi

if [[ $PHASED == true ]] && begin phase2; then
  train_phase phase2
  mkdir -p "$OUT/phase2/eval"
  JUDGE_URL=$JUDGE_ENDPOINT
  [[ -z $JUDGE_URL ]] && { start_server "$(base_server_model)" "$OUT/phase2/eval/judge.log" "$MT_BENCH_CTX"; JUDGE_URL=$SERVER_URL; }
  for ckpt in $(python phases.py checkpoints "$OUT/phase2/checkpoints"); do
    start_server "$ckpt" "$OUT/phase2/eval/$(basename "$ckpt").log" "$MT_BENCH_CTX"
    run python -m eval.mt_bench --model-endpoint "$SERVER_URL" --judge-endpoint "$JUDGE_URL" --taxonomy "$TAXONOMY" \
      $(limit "$EVALUATE_MT_BENCH_LIMIT") --max-tokens "$EVALUATE_MAX_TOKENS" \
      --judge-max-tokens "$EVALUATE_JUDGE_MAX_TOKENS" --output "$OUT/phase2/eval/$(basename "$ckpt").json"
    kill -INT "${SERVER_PIDS[-1]}"; wait "${SERVER_PIDS[-1]}" || true; unset 'SERVER_PIDS[-1]'
  done
  stop_servers
  run python phases.py best "$OUT/phase2/eval" "$OUT/phase2/checkpoints" ${prune_flag[@]+"${prune_flag[@]}"} \
    > "$OUT/final_model.txt.tmp"
  mv "$OUT/final_model.txt.tmp" "$OUT/final_model.txt"
  finish phase2
fi

FINAL=$(cat "$OUT/final_model.txt" 2>/dev/null || true)
need_final() { [[ -n $FINAL && -d $FINAL ]] || die "no trained model in $OUT/final_model.txt; run the training stage"; }

if begin mmlu; then
  need_final
  run python -m eval.mmlu --model "$FINAL" --base-model "$MODEL" --taxonomy "$TAXONOMY" \
    --few-shots "$EVALUATE_FEW_SHOTS" --batch-size "$EVALUATE_BATCH_SIZE" $(limit "$EVALUATE_MMLU_LIMIT") \
    --output "$EVAL/mmlu.json" --plot "$EVAL/mmlu.png"
  finish mmlu
fi

if begin heldout; then  # questions held out of training: what the model learned, with 95% intervals
  need_final
  run python -m eval.heldout --heldout "$GEN/test.jsonl" --model "$FINAL" --base-model "$MODEL" \
    --batch-size "$EVALUATE_BATCH_SIZE" --max-new-tokens "$EVALUATE_HELDOUT_MAX_TOKENS" \
    --output "$EVAL/heldout.json" --plot "$EVAL/heldout.png"
  finish heldout
fi

if begin convert; then
  need_final
  run python -m serve.convert --model "$FINAL" --output "$OUT/model.gguf"
  finish convert
fi

if begin mtbench; then
  [[ -f $OUT/model.gguf ]] || die "$OUT/model.gguf is missing; run the convert stage first"
  start_server "$(base_server_model)" "$EVAL/base_server.log" "$MT_BENCH_CTX"; BASE_URL=$SERVER_URL
  start_server "$OUT/model.gguf" "$EVAL/trained_server.log" "$MT_BENCH_CTX"
  # Without --judge-endpoint the base model judges: the only model at hand offline, and a weak judge.
  run python -m eval.mt_bench --model-endpoint "$SERVER_URL" --base-endpoint "$BASE_URL" \
    --judge-endpoint "${JUDGE_ENDPOINT:-$BASE_URL}" \
    --taxonomy "$TAXONOMY" $(limit "$EVALUATE_MT_BENCH_LIMIT") --max-tokens "$EVALUATE_MAX_TOKENS" \
    --judge-max-tokens "$EVALUATE_JUDGE_MAX_TOKENS" --output "$EVAL/mt_bench.json" --plot "$EVAL/mt_bench.png"
  stop_servers
  finish mtbench
fi

if begin chat; then
  [[ -f $OUT/model.gguf ]] || die "$OUT/model.gguf is missing; run the convert stage first"
  start_server "$OUT/model.gguf" "$OUT/chat_server.log" $((EVALUATE_CHAT_MAX_TOKENS + 1024))
  question=$(python phases.py question "$GEN/test.jsonl")
  echo "you> $question"
  show python -m serve.chat --endpoint "$SERVER_URL" --temperature 0 --max-tokens "$EVALUATE_CHAT_MAX_TOKENS"
  printf '%s\n' "$question" | python -m serve.chat --endpoint "$SERVER_URL" --temperature 0 \
    --max-tokens "$EVALUATE_CHAT_MAX_TOKENS" > "$OUT/chat.txt.tmp"
  stop_servers
  [[ -n $(tr -d '[:space:]' < "$OUT/chat.txt.tmp") ]] ||
    die "the served model gave an empty reply; see $OUT/chat_server.log"
  { printf 'you> %s\n' "$question"; cat "$OUT/chat.txt.tmp"; } > "$OUT/chat.txt" && rm "$OUT/chat.txt.tmp"
  cat "$OUT/chat.txt"
  finish chat
fi

if begin summary; then
  run python phases.py summary "$OUT"
fi
