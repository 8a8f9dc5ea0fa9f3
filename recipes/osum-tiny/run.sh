#!/usr/bin/env bash
# osum-tiny, the offline default model, from nothing: numbered stages, each re-runnable and resumable
# (synthesis skips finished utterances, training resumes from its last checkpoint).
#
#   bash recipes/osum-tiny/run.sh                  # every stage (0 needs root for apt)
#   STAGES="3 4 5" bash recipes/osum-tiny/run.sh   # some stages
#   stages: 0 voices · 1 synthesize (shards + test lists) · 2 data stats · 3 CTC warm-up + train stage 1 ·
#           4/5 train stage 2/3 ·
#           6 export (bf16, LoRA kept apart, CTC word-time offsets, the event head and the joint CTC decoding
#           weight fitted) · 7 evaluate the exported model (held-out voices and real recordings)
# On a GPU machine the same stages run there (training picks CUDA by itself); NPROC>1 uses torchrun DDP.
# Environment: DATA, EXP, OUT (exported model), PRESET, SENTENCES, OPEN (open-domain WordNet utterances, default
# 6000; 0 for none), JOBS, REAL_VALID (share of the real recordings held out for choosing decoding settings, default
# osum synth's; 0 for the corpus of the current release), STEPS0..3, NPROC, FINAL (the training stage whose `final`
# stage 6 exports, default 3; 2 to release before stage 3), BEAMS (the exported model's default beam count, default 4;
# 1 for greedy), LOCATOR_CROP (frames each side of the event locator's peak the event head reads, default 40);
# extra arguments are dotted overrides for the three
# training stages (e.g. `precision=fp32 data.num_workers=2`).
set -euo pipefail
cd "$(dirname "$0")/../.."
here=recipes/osum-tiny
DATA=${DATA:-data/osum-tiny}
EXP=${EXP:-exp/osum-tiny}
OUT=${OUT:-$EXP/model}
PRESET=${PRESET:-osum-tiny}
SENTENCES=${SENTENCES:-12000}
OPEN=${OPEN:-6000}
JOBS=${JOBS:-2}
NPROC=${NPROC:-1}
STAGES=${STAGES:-"0 1 2 3 4 5 6 7"}
FINAL=${FINAL:-3}
OSUM=${OSUM:-$(command -v osum || echo .venv/bin/osum)}
PYTHON=${PYTHON:-$(dirname "$OSUM")/python}

run_stage() { [[ " $STAGES " == *" $1 "* ]]; }
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

train() {  # stage number (0 = CTC warm-up, 1..3), steps
  local n=$1 steps=$2 init=()
  shift 2
  if [ "$n" -gt 0 ]; then init=("init_from=$EXP/stage$((n - 1))/final"); fi
  local args=(--config "$here/stage$n.yaml" "model.preset=$PRESET" "data.mixture=$DATA/mixture.yaml"
              "out_dir=$EXP/stage$n" "max_steps=$steps" "${init[@]}" "$@")
  if [ "$NPROC" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m osum.cli train "${args[@]}"
  else
    "$OSUM" train "${args[@]}"
  fi
  "$OSUM" average "$EXP/stage$n" --last "${AVERAGE:-3}" --out "$EXP/stage$n/final"
}

if run_stage 0; then bash "$here/install_voices.sh"; fi
if run_stage 1; then
  "$OSUM" synth --out "$DATA" --sentences "$SENTENCES" --open-sentences "$OPEN" --jobs "$JOBS" \
    ${REAL_VALID:+--real-valid-share "$REAL_VALID"}
  # Two more cough recordings for the event head's fit (the hedgewars training packs have three): Scratch's,
  # inserted into training speech as osum synth inserts events (model card, "Vocal events")
  coughs=(/usr/share/scratch/Media/Sounds/Human/Cough-*.wav)
  if [ -f "${coughs[0]}" ]; then
    "$PYTHON" "$here/event_sources.py" --data "$DATA" --clips "cough=${coughs[0]%/*}/Cough-*.wav" \
      --write "$DATA/train_extra_ved.jsonl"
  elif [ ! -f "$DATA/train_extra_ved.jsonl" ]; then
    echo "Scratch's coughs are not installed (apt-get install scratch): the event head is fitted without them"
  fi
fi
if run_stage 2; then "$OSUM" data stats "$DATA/train" --png "$DATA/train_durations.png"; fi
shift_args=("$@")
if run_stage 3; then
  train 0 "${STEPS0:-3000}" "${shift_args[@]}"
  train 1 "${STEPS1:-1500}" "${shift_args[@]}"
fi
if run_stage 4; then train 2 "${STEPS2:-1000}" "${shift_args[@]}"; fi
if run_stage 5; then train 3 "${STEPS3:-1000}" "${shift_args[@]}"; fi
if run_stage 6; then
  # export replaces the folder; a model card already there (README.md) is kept, to be updated by hand
  card=""
  if [ -f "$OUT/README.md" ]; then
    card=$(mktemp)
    cp "$OUT/README.md" "$card"
  fi
  # Beam search (BEAMS beams) as the model's decoding default: on the valid split it gave release 5 WER 15.4 %
  # against greedy's 17.4 % (model card); `--decoding greedy` decodes about twice as fast. The CTC weight's fit
  # below decodes the valid splits once per weight tried, with these beams (88 min for release 5 on 2 cores).
  fit=(--generation "num_beams=${BEAMS:-4}")
  # srwt word times from the CTC alignment, its offsets fitted on the training split's word times
  if [ -f "$DATA/train_synth_srwt.jsonl" ]; then fit+=(--fit-word-times "$DATA/train_synth_srwt.jsonl"); fi
  # A model with a voice summary (a non-empty summary_layers list in its config) reads gender off it, age off a
  # linear head over its statistics fitted on the training split's age utterances (cross-validated by voice), and
  # vocal events off a linear head fitted on the training split's event utterances, over statistics pooled
  # where a frame locator (fitted first, on the inserted events' spans) hears the event; its cross-validation
  # holds each event recording's utterances out together (two packs may share one under two names).
  if grep -q '"summary_layers": \[$' "$EXP/stage$FINAL/final/config.json"; then
    fit+=(--generation "summary_tags=[gender,age]")
    if [ -f "$DATA/train_synth_ved.jsonl" ]; then
      fit+=(--fit-tag-heads "event=$DATA/train_synth_ved.jsonl" --tag-head-groups event=extra.event.recording)
      # the head also fits the extra event utterances of stage 1 (the locator only the first list)
      if [ -f "$DATA/train_extra_ved.jsonl" ]; then fit+=(--fit-tag-heads "event=$DATA/train_extra_ved.jsonl"); fi
      # (the locator needs the events' spans, which osum synth records; a corpus without them gets the plain head)
      # The head reads the LOCATOR_CROP frames each side of the locator's peak, the later blocks run again on
      # them, and is fitted with dropout (2-4 points more held out by recording than L-BFGS); with the coughs, 10
      # points over release 7's whole-utterance L-BFGS head (model card, recipes/osum-tiny/event_readers.py)
      if grep -q '"span"' "$DATA/train_synth_ved.jsonl"; then
        fit+=(--locate-tag-head event --locator-crop "${LOCATOR_CROP:-40}" --tag-head-dropout event=0.3)
      fi
    fi
    if [ -f "$DATA/train_synth_sap.jsonl" ]; then
      fit+=(--fit-tag-heads "age=$DATA/train_synth_sap.jsonl" --tag-head-groups age=speaker)
    fi
  fi
  # joint CTC/LLM decoding of transcripts, its weight chosen on the valid splits, synthetic and real, pooled
  # (0 when CTC does not help there), decoding them as the exported model will (with BEAMS beams)
  for list in "$DATA/valid_synth.jsonl" "$DATA/valid_real.jsonl"; do
    if [ -f "$list" ]; then fit+=(--fit-ctc-weight "$list"); fi
  done
  "$OSUM" export "$EXP/stage$FINAL/final" --keep-lora --dtype bfloat16 "${fit[@]}" --out "$OUT"
  if [ -n "$card" ]; then
    mv "$card" "$OUT/README.md"
    chmod 644 "$OUT/README.md"
    echo "kept the model card $OUT/README.md: update its figures for the new weights"
  fi
  du -sh "$OUT"
fi
if run_stage 7; then
  suite="$EXP/suite.yaml"
  {
    echo "model: $(absolute "$OUT")"
    echo "out: $(absolute "$EXP")/eval"
    echo "defaults: {normalizer: auto, batch_size: 16, decoding: model}"
    echo "runs:"
    for pair in asr:asr srwt:srwt ser:asr+ser ssr:asr+ssr sap:asr+sap sgc:asr+sgc ved:asr+ved sttc:sttc open:asr; do
      family=${pair%%:*} task=${pair#*:}
      if [ -f "$DATA/test_synth_$family.jsonl" ]; then
        echo "  - {name: synth-$family, data: $(absolute "$DATA")/test_synth_$family.jsonl, task: $task}"
      fi
    done
    if [ -f "$DATA/test_real.jsonl" ]; then
      echo "  - {name: real, data: $(absolute "$DATA")/test_real.jsonl, task: asr+sgc}"
    fi
  } > "$suite"
  "$OSUM" eval --suite "$suite"
fi
