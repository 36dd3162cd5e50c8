#!/usr/bin/env bash
# The lab's ablation series for train_ex.py: one run per setting and seed, each in its own run directory,
# resumable, failures logged and skipped over, summarised at the end by summarize.py.
#
#   ./run_train_ex.sh                        # the full series (see --help for the variables)
#   SMOKE=1 ./run_train_ex.sh                # the whole series on a tiny budget on a CPU, in minutes
#   RUN_GROUPS="1 5" SEEDS="0 1 2" EPOCHS=20 OUT_ROOT=runs/ablation ./run_train_ex.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<EOF
usage: [VAR=value ...] $0 [--help]

Runs the ablation series of train_ex.py, in this order (one run per setting and seed):
  group 1  g1-aux          auxiliary state off (S5) vs on (--enable_auxiliary_state)
  group 2  g2-time-scale   --time_scale_type linear, exponential, sinusoidal, constant (auxiliary state on)
  group 3  g3-aux-strength --auxiliary_strength 0.05, 0.1, 0.2 (auxiliary state on)
  group 4  g4-size         (--d_model, --ssm_size_base) = (64,32), (128,64), (256,128) (auxiliary state on)
                           [SMOKE=1: (8,4), (16,8), (32,16)]
  group 5  g5-extend       --ssm_type extend, --R 4/10/16 x --extend_mode full/diag
  group 6  g6-warm-start   an S5 run, then --ssm_type extend fine-tuned on its ckpt_best.msgpack (--freeze base)

Every run uses train_ex.py's defaults for padded sets: padding masked before every SSM (--mask_padding) and
length-bucketed batches (--buckets), not the S5 release's unmasked, full-length batches; for the release's
behaviour pass EXTRA="--no-mask_padding --no-buckets". Held-out splits are the release's (--split_seed 42).

Each run writes OUT_ROOT/<group>/<setting>/seed<k>/ (results.json, checkpoints, train.log, series_run.json).
A run whose results.json says "finished" is skipped; one left "running"/"interrupted" with a checkpoint is
continued with --resume; any other is (re)started from scratch. A failed run is logged (train.log keeps every
attempt) and the series goes on. At the end summarize.py writes OUT_ROOT/summary.{md,csv}, runs.csv and PNG
plots, and summary.md is printed. Exit status: 0 unless the variables are misused (2) or Ctrl-C (130).

Variables (default in brackets):
  DATASET       train_ex.py --dataset                       [listops-classification]
  DATA          data root, train_ex.py --dir_name            [./data; SMOKE=1: OUT_ROOT/data for ListOps]
  EPOCHS        epochs per run                              [50; SMOKE=1: 1]
  SEEDS         seeds per setting (--jax_seed), e.g. "0 1 2" [0 1 2; SMOKE=1: 0]
  RUN_GROUPS    which groups run, e.g. "1 5"                 [1 2 3 4 5 6]
                (GROUPS is accepted too, but only through \`env GROUPS="1 5" $0\`: bash reserves the name)
  EXTRA         flags passed to every run (after the setting's own flags, so they win) []
  OUT_ROOT      output root                                 [runs/series-DATASET; SMOKE=1: runs/smoke-series]
  SMOKE         1: tiny model and data budget for a CPU check; builds a tiny generated ListOps under
                OUT_ROOT/data unless DATA is set              [0]
  SERIES        series name: wandb group and run-name prefix [basename of OUT_ROOT]
  USE_WANDB     1: log online (--use_wandb); otherwise wandb is offline; WANDB_MODE=disabled turns it off [0]
  WANDB_PROJECT train_ex.py --wandb_project                 [s5-ex]
  RETRY_FAILED  1: rerun failed runs on the next invocation; 0: leave them failed [1]
  PYTHON        interpreter                                 [.venv/bin/python beside this script, else python3]
  TRAIN         training script                             [train_ex.py beside this script]
  FAIL_RUNS     test hook: space-separated globs over run ids (e.g. "g1-aux/aux-on/*"); matching runs get
                --epochs 0 appended, which train_ex.py rejects, so they fail on purpose []
Each run logs to wandb with group SERIES (WANDB_RUN_GROUP), job type = its group (WANDB_JOB_TYPE) and name
SERIES/<group>/<setting>/seed<k>.
EOF
}

die() { echo "run_train_ex.sh: error: $*" >&2; echo "(see $0 --help)" >&2; exit 2; }

for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$a': everything is set with environment variables" ;;
  esac
done

# ---------------------------------------------------------------------------------------------------------------
# settings and their validation
# ---------------------------------------------------------------------------------------------------------------
SMOKE="${SMOKE:-0}"
[[ "$SMOKE" == 0 || "$SMOKE" == 1 ]] || die "SMOKE must be 0 or 1, got '$SMOKE'"
DATASET="${DATASET:-listops-classification}"
if [[ "$SMOKE" == 1 ]]; then
  EPOCHS="${EPOCHS:-1}"; SEEDS="${SEEDS:-0}"; OUT_ROOT="${OUT_ROOT:-runs/smoke-series}"
else
  EPOCHS="${EPOCHS:-50}"; SEEDS="${SEEDS:-0 1 2}"; OUT_ROOT="${OUT_ROOT:-runs/series-$DATASET}"
fi
# bash reserves GROUPS (the user's group ids): it neither reads it from the environment nor passes a
# `GROUPS=... cmd` prefix on; so take it from this process's original environment, and accept RUN_GROUPS too
if [[ -z "${RUN_GROUPS:-}" && -r /proc/$$/environ ]]; then
  RUN_GROUPS="$(tr '\0' '\n' </proc/$$/environ | sed -n 's/^GROUPS=//p' | head -n 1)"
fi
RUN_GROUPS="${RUN_GROUPS:-1 2 3 4 5 6}"
EXTRA="${EXTRA:-}"
USE_WANDB="${USE_WANDB:-0}"
WANDB_PROJECT="${WANDB_PROJECT:-s5-ex}"
RETRY_FAILED="${RETRY_FAILED:-1}"
FAIL_RUNS="${FAIL_RUNS:-}"
TRAIN="${TRAIN:-$HERE/train_ex.py}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

[[ "$EPOCHS" =~ ^[0-9]+$ && "$EPOCHS" -ge 1 ]] || die "EPOCHS must be a positive integer, got '$EPOCHS'"
read -r -a SEED_LIST <<<"$SEEDS"
[[ ${#SEED_LIST[@]} -ge 1 ]] || die "SEEDS is empty"
for s in "${SEED_LIST[@]}"; do [[ "$s" =~ ^[0-9]+$ ]] || die "SEEDS must be non-negative integers, got '$s'"; done
read -r -a GROUP_ARGS <<<"$RUN_GROUPS"
[[ ${#GROUP_ARGS[@]} -ge 1 ]] || die "GROUPS is empty"
for g in "${GROUP_ARGS[@]}"; do [[ "$g" =~ ^[1-6]$ ]] || die "GROUPS must be numbers 1 to 6, got '$g'"; done
[[ "$USE_WANDB" == 0 || "$USE_WANDB" == 1 ]] || die "USE_WANDB must be 0 or 1, got '$USE_WANDB'"
[[ "$RETRY_FAILED" == 0 || "$RETRY_FAILED" == 1 ]] || die "RETRY_FAILED must be 0 or 1, got '$RETRY_FAILED'"
[[ -n "$OUT_ROOT" ]] || die "OUT_ROOT is empty"
[[ -f "$TRAIN" ]] || die "TRAIN: no file $TRAIN"
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON: no interpreter '$PYTHON'"
read -r -a EXTRA_ARGS <<<"$EXTRA"
read -r -a FAIL_GLOBS <<<"$FAIL_RUNS"

mkdir -p "$OUT_ROOT"
OUT_ROOT="$(cd "$OUT_ROOT" && pwd)"
SERIES="${SERIES:-$(basename "$OUT_ROOT")}"

# data: SMOKE builds its own tiny generated ListOps unless DATA is given
SMOKE_DATA=0
if [[ -z "${DATA:-}" ]]; then
  if [[ "$SMOKE" == 1 && "$DATASET" == listops-classification ]]; then DATA="$OUT_ROOT/data"; SMOKE_DATA=1
  else DATA=./data; fi
fi

if [[ "$SMOKE" == 1 ]]; then
  # one compiled shape (no length buckets), a tiny model, 32 training and 16 evaluation samples
  BASE_ARGS=(--d_model 8 --n_layers 1 --ssm_size_base 4 --bsz 8 --max_train_samples 32 --max_eval_samples 16
             --no-buckets)
  SIZES=("8 4" "16 8" "32 16")
  export JAX_DISABLE_MOST_OPTIMIZATIONS="${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}"  # compile time dominates a smoke run
else
  BASE_ARGS=()
  SIZES=("64 32" "128 64" "256 128")
fi
COMMON_ARGS=(--dataset "$DATASET" --dir_name "$DATA" --epochs "$EPOCHS" "${BASE_ARGS[@]}")

# EXTRA (and DATASET) checked once with train_ex.py's own command line (config.py): a typo must not fail every run
if ! err="$("$PYTHON" - "${COMMON_ARGS[@]}" "${EXTRA_ARGS[@]}" 2>&1 <<PY
import sys
sys.path.insert(0, "$HERE")
import config
config.parse_args(sys.argv[1:])
PY
)"; then
  die "train_ex.py rejects DATASET/EXTRA ('$DATASET' / '$EXTRA'):"$'\n'"$(echo "$err" | tail -n 2)"
fi

# ---------------------------------------------------------------------------------------------------------------
# the series: group|setting|flags, in order
# ---------------------------------------------------------------------------------------------------------------
GROUP_NAMES=("" g1-aux g2-time-scale g3-aux-strength g4-size g5-extend g6-warm-start)
settings_of() {
  case "$1" in
    1) echo "aux-off|--ssm_type s5"
       echo "aux-on|--enable_auxiliary_state" ;;
    2) for t in linear exponential sinusoidal constant; do echo "$t|--enable_auxiliary_state --time_scale_type $t"; done ;;
    3) for a in 0.05 0.1 0.2; do echo "strength-$a|--enable_auxiliary_state --auxiliary_strength $a"; done ;;
    4) for hp in "${SIZES[@]}"; do
         read -r h p <<<"$hp"
         echo "d$h-p$p|--enable_auxiliary_state --d_model $h --ssm_size_base $p"
       done ;;
    5) for r in 4 10 16; do for m in full diag; do echo "R$r-$m|--ssm_type extend --R $r --extend_mode $m"; done; done ;;
    6) echo "s5-base|--ssm_type s5"
       echo "extend-warm|--ssm_type extend --freeze base" ;;  # + --load_checkpoint <s5-base of the same seed>
  esac
}

R_GROUP=(); R_SETTING=(); R_SEED=(); R_FLAGS=(); R_ORDER=()
for g in 1 2 3 4 5 6; do
  [[ " ${GROUP_ARGS[*]} " == *" $g "* ]] || continue
  j=0
  while IFS='|' read -r name flags; do
    j=$((j + 1))
    for s in "${SEED_LIST[@]}"; do  # order: the setting's place in the whole series, whatever GROUPS says
      R_GROUP+=("$g"); R_SETTING+=("$name"); R_SEED+=("$s"); R_FLAGS+=("$flags"); R_ORDER+=($((100 * g + j)))
    done
  done < <(settings_of "$g")
done
N=${#R_GROUP[@]}

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
# "status best_val test_at_best" from DIR/results.json ("none" when it is missing or unreadable)
run_info() {
  "$PYTHON" - "$1/results.json" <<'PY' 2>/dev/null || echo "none - -"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception:
    print("none - -"); sys.exit()
b = r.get("best") or {}
f = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"
print(r.get("status") or "none", f(b.get("val_acc")), f(b.get("test_acc")))
PY
}

json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }

# write DIR/series_run.json: what summarize.py needs to know about a run beyond its results.json
write_meta() {  # dir order g setting seed status exit_code note command
  local tmp="$1/.series_run.json.tmp"
  cat >"$tmp" <<EOF
{"series": $(json_str "$SERIES"), "order": $2, "group": $3, "group_label": $(json_str "${GROUP_NAMES[$3]}"),
 "setting": $(json_str "$4"), "seed": $5, "status": $(json_str "$6"), "exit_code": $7,
 "note": $(json_str "$8"), "log": "train.log", "command": $(json_str "$9")}
EOF
  mv "$tmp" "$1/series_run.json"
}

# ---------------------------------------------------------------------------------------------------------------
# data for SMOKE
# ---------------------------------------------------------------------------------------------------------------
if [[ "$SMOKE_DATA" == 1 && ! -f "$DATA/listops_generated/basic_test.tsv" && ! -d "$DATA/lra_release/listops-1000" ]]; then
  echo "SMOKE: generating a tiny ListOps set in $DATA/listops_generated"
  rm -rf "$DATA/listops_generated.tmp"
  "$PYTHON" "$HERE/dataloaders.py" make-listops --out "$DATA/listops_generated.tmp" --n_train 64 --n_val 16 \
    --n_test 16 --workers 1 >"$OUT_ROOT/make_listops.log" 2>&1 \
    || die "could not generate the smoke data (log: $OUT_ROOT/make_listops.log)"
  mv "$DATA/listops_generated.tmp" "$DATA/listops_generated"
fi

# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------
echo "series '$SERIES': $N runs (groups ${GROUP_ARGS[*]}; seeds ${SEED_LIST[*]}; $DATASET, $EPOCHS epochs) → $OUT_ROOT"
[[ -n "$EXTRA" ]] && echo "EXTRA for every run: $EXTRA"
n_done=0; n_skipped=0; n_failed=0
for ((i = 0; i < N; i++)); do
  k=$((i + 1)); g=${R_GROUP[$i]}; setting=${R_SETTING[$i]}; seed=${R_SEED[$i]}; order=${R_ORDER[$i]}
  id="${GROUP_NAMES[$g]}/$setting/seed$seed"
  dir="$OUT_ROOT/$id"
  head="[$k/$N] ${GROUP_NAMES[$g]} $setting seed $seed → $dir"
  mkdir -p "$dir"
  read -r status _ _ < <(run_info "$dir")

  if [[ "$status" == finished ]]; then
    [[ -f "$dir/series_run.json" ]] || write_meta "$dir" "$order" "$g" "$setting" "$seed" finished null "" ""
    echo "$head: finished, skipped"; n_skipped=$((n_skipped + 1)); continue
  fi
  if [[ "$status" == failed && "$RETRY_FAILED" == 0 ]]; then
    echo "$head: failed before, left failed (RETRY_FAILED=0)"; n_failed=$((n_failed + 1)); continue
  fi

  read -r -a flags <<<"${R_FLAGS[$i]}"
  if [[ "$setting" == extend-warm ]]; then
    base="$OUT_ROOT/${GROUP_NAMES[$g]}/s5-base/seed$seed"
    read -r bstatus _ _ < <(run_info "$base")
    if [[ "$bstatus" != finished || ! -f "$base/ckpt_best.msgpack" ]]; then
      note="not started: its S5 run $base is not finished (status: $bstatus)"
      write_meta "$dir" "$order" "$g" "$setting" "$seed" failed null "$note" ""
      echo "$head: FAILED, $note"; n_failed=$((n_failed + 1)); continue
    fi
    flags+=(--load_checkpoint "$base/ckpt_best.msgpack")
  fi
  for pat in "${FAIL_GLOBS[@]}"; do
    # shellcheck disable=SC2053
    if [[ "$id" == $pat ]]; then flags+=(--epochs 0); fi  # FAIL_RUNS test hook: rejected by train_ex.py
  done

  mode=fresh
  if [[ ("$status" == running || "$status" == interrupted) && -f "$dir/ckpt_latest.msgpack" ]]; then mode=resume; fi
  if [[ "$mode" == fresh ]]; then rm -f "$dir/results.json" "$dir"/ckpt_*.msgpack "$dir"/ckpt_*.json; fi
  args=("${COMMON_ARGS[@]}" "${flags[@]}" "${EXTRA_ARGS[@]}" --jax_seed "$seed" --run_dir "$dir"
        --wandb_project "$WANDB_PROJECT" --wandb_run_name "$SERIES/$id")
  [[ "$USE_WANDB" == 1 ]] && args+=(--use_wandb)
  [[ "$mode" == resume ]] && args+=(--resume)
  cmd="$PYTHON $TRAIN ${args[*]}"

  if [[ "$mode" == resume ]]; then echo "$head (resuming from ckpt_latest)"; else echo "$head"; fi
  write_meta "$dir" "$order" "$g" "$setting" "$seed" running null "" "$cmd"
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') attempt ($mode): $cmd" >>"$dir/train.log"
  t0=$SECONDS
  set +e
  WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$SERIES}" WANDB_JOB_TYPE="${GROUP_NAMES[$g]}" \
    "$PYTHON" "$TRAIN" "${args[@]}" >>"$dir/train.log" 2>&1 </dev/null
  rc=$?
  set -e
  dt=$((SECONDS - t0))
  read -r status bval btest < <(run_info "$dir")

  if [[ $rc == 130 ]]; then
    write_meta "$dir" "$order" "$g" "$setting" "$seed" interrupted $rc "Ctrl-C" "$cmd"
    echo "      interrupted after ${dt}s; run this script again to continue (--resume)" >&2
    exit 130
  elif [[ $rc == 0 && "$status" == finished ]]; then
    write_meta "$dir" "$order" "$g" "$setting" "$seed" finished 0 "" "$cmd"
    echo "      finished in ${dt}s: best val $bval, test at best val $btest"; n_done=$((n_done + 1))
  elif [[ $rc == 0 ]]; then  # e.g. --max_steps in EXTRA: stopped resumably
    write_meta "$dir" "$order" "$g" "$setting" "$seed" "${status/none/interrupted}" 0 "stopped before the last epoch" "$cmd"
    echo "      stopped after ${dt}s with status '$status' (resumed on the next invocation)"
  else
    last="$(tr '\r' '\n' <"$dir/train.log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c 1-200)"
    write_meta "$dir" "$order" "$g" "$setting" "$seed" failed $rc "exit code $rc: ${last//|//}" "$cmd"
    echo "      FAILED (exit code $rc) after ${dt}s; log: $dir/train.log"
    tr '\r' '\n' <"$dir/train.log" | grep -v '^[[:space:]]*$' | tail -n 3 | sed 's/^/      | /'
    n_failed=$((n_failed + 1))
  fi
done

echo "series '$SERIES': $n_done run(s) trained, $n_skipped skipped (finished before), $n_failed failed, of $N"
if "$PYTHON" "$HERE/summarize.py" "$OUT_ROOT"; then
  echo
  cat "$OUT_ROOT/summary.md"
else
  echo "warning: summarize.py failed; the runs themselves are in $OUT_ROOT" >&2
fi
exit 0
