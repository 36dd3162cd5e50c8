#!/usr/bin/env bash
# The lab's ablation series for train_ex.py: one run per setting and seed, each in its own run directory,
# resumable, failures logged and skipped over, summarised at the end by summarize.py.
#
#   ./run_train_ex.sh                        # the full series (see --help for the variables)
#   SMOKE=1 ./run_train_ex.sh                # the whole series on a tiny budget on a CPU, in minutes
#   RUN_GROUPS="1 5" SEEDS="0 1 2" EPOCHS=20 OUT_ROOT=runs/ablation ./run_train_ex.sh
#   STUDY=cpu PARALLEL=2 ./run_train_ex.sh  # the CPU study: every SSM type on the diagnostics and psMNIST, 3 seeds
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
  group 7  g7-baselines    --ssm_type s5, s4d, s6 (Mamba's selective SSM), lru, at the same --d_model

STUDY=cpu runs the CPU study instead: one group per task, each with the same 11 settings (s5; aux-linear,
aux-exponential, aux-sinusoidal, aux-constant; extend-diag and extend-full at R 4; s4d; s6; lru; s5-control, an
S5 whose --ssm_size_base gives it about extend-full's parameter count), d_model 32, 2 layers:
  group 1  copying             --data_options k=8,vocab=8,lag=32, 20 epochs (S5 control: --ssm_size_base 20)
  group 2  selective-copying   --data_options k=8,vocab=8,length=48, 20 epochs (22)
  group 3  associative-recall  --data_options n_pairs=8,n_queries=8,n_keys=16,n_values=16,gap=16, 20 epochs (20)
  group 4  adding              --data_options length=128, 15 epochs (26)
  group 5  psmnist             pmnist-classification, 2,000 training and 1,000 evaluation images, 3 epochs (66)
The diagnostics are generated in memory (2,000/500/500 samples); psMNIST reads DATA, by default OUT_ROOT/data
made once by "dataloaders.py split-mnist" from MNIST_SOURCE's 10,000 test images (8,000 train, 2,000 test).

Every run uses train_ex.py's defaults for padded sets: padding masked before every SSM (--mask_padding) and
length-bucketed batches (--buckets), not the S5 release's unmasked, full-length batches; for the release's
behaviour pass EXTRA="--no-mask_padding --no-buckets". Held-out splits are the release's (--split_seed 42).

Each run writes OUT_ROOT/<group>/<setting>/seed<k>/ (results.json, checkpoints, train.log, series_run.json).
A run whose results.json says "finished" is skipped; one left "running"/"interrupted" with a checkpoint is
continued with --resume; any other is (re)started from scratch. A failed run is logged (train.log keeps every
attempt) and the series goes on; a run that does not fit in memory (train_ex.py exit 5, checked before its first
step) is recorded as "does not fit", not as a crash. At the end summarize.py writes OUT_ROOT/summary.{md,csv},
runs.csv and PNG plots, and summary.md is printed. Exit status: 0 unless the variables are misused (2) or the series is
interrupted: Ctrl-C (130) or SIGTERM (143), to the series or to one of its runs; every running run then saves
ckpt_latest and stops, and the next invocation continues it. (The exit codes: utils.EXIT_CODES, CLUSTER.md.)

One writer per run: each run's directory is locked (run.lock, flock) from before its state is read until the run
ends. A run whose directory another process holds (another series on the same OUT_ROOT, a train_ex.py started by
hand) is "running elsewhere": skipped, nothing in it touched; once its own runs are done the series waits for
those and counts them, so two series started on one OUT_ROOT share its runs, each trained once, and print the
same summary.

Several runs at once (LAUNCHER=local): DEVICES="0 1 2 3" runs one run per device, each seeing only its device
(CUDA_VISIBLE_DEVICES); PARALLEL=N runs N at once (CPU). The console shows each run as it starts and one line as
it ends; each run's output goes to its own train.log.

On SLURM (LAUNCHER=slurm): the plan (one line per run that is not finished: array, task, run id, command) goes
to OUT_ROOT/slurm/plan.tsv; one job array runs it (one task per run, MAX_PARALLEL at once), a second array the
warm-start runs (task k starts when task k of the first, its S5 run, has ended: --dependency=aftercorr), and a
summary job runs summarize.py after both (--dependency=afterany). The job ids and how to follow them are printed
and the script returns (WAIT=1: waits for the summary, prints it). Every task is requeueable: before its time
limit (SIGNAL_SECS) and on preemption the run saves ckpt_latest, the task requeues itself (at most MAX_REQUEUES
times) and continues with --resume. Running the command again submits only the runs not finished and not still
pending or running in SLURM (OUT_ROOT/slurm/jobs.tsv: the arrays submitted, each with its own plan).

Variables (default in brackets):
  STUDY         cpu: the CPU study above instead of the ablation series (DATASET is then per group) []
  MNIST_SOURCE  STUDY=cpu: folder with t10k-{images-idx3,labels-idx1}-ubyte[.gz] [../shared/data/mnist]
  DATASET       train_ex.py --dataset                       [listops-classification]
  DATA          data root, train_ex.py --dir_name            [./data; SMOKE=1: OUT_ROOT/data for ListOps]
  EPOCHS        epochs per run                              [50; SMOKE=1: 1; STUDY=cpu: per task]
  SEEDS         seeds per setting (--jax_seed), e.g. "0 1 2" [0 1 2; SMOKE=1: 0]
  RUN_GROUPS    which groups run, e.g. "1 5"                 [1 2 3 4 5 6 7; STUDY=cpu: 1 2 3 4 5]
                (GROUPS is accepted too, but only through \`env GROUPS="1 5" $0\`: bash reserves the name)
  EXTRA         flags passed to every run (after the setting's own flags, so they win) []
  OUT_ROOT      output root     [runs/series-DATASET; SMOKE=1: runs/smoke-series; STUDY=cpu: runs/study-cpu]
  SMOKE         1: tiny model and data budget for a CPU check; builds a tiny generated ListOps under
                OUT_ROOT/data unless DATA is set              [0]
  SERIES        series name: wandb group and run-name prefix [basename of OUT_ROOT]
  USE_WANDB     1: log online (--use_wandb); otherwise wandb is offline; WANDB_MODE=disabled turns it off [0]
  WANDB_PROJECT train_ex.py --wandb_project                 [s5-ex]
  RETRY_FAILED  1: rerun failed runs on the next invocation; 0: leave them failed [1]
  PYTHON        interpreter                                 [.venv/bin/python beside this script, else python3]
  TRAIN         training script                             [train_ex.py beside this script]
  ONLY          space-separated globs over run ids: only the matching runs, e.g. "g6-warm-start/*/seed0" []
  FAIL_RUNS     test hook: space-separated globs over run ids (e.g. "g1-aux/aux-on/*"); matching runs get
                --epochs 0 appended, which train_ex.py rejects, so they fail on purpose []
  LAUNCHER      local (runs here) or slurm (sbatch job arrays)  [local]
  PARALLEL      local: runs at once                          [1; with DEVICES: one per device]
  DEVICES       local: device ids, one run per device at once (CUDA_VISIBLE_DEVICES) []
  SLURM_ARGS    slurm: options for every sbatch, e.g. "--partition=gpu --gres=gpu:1 --time=4:00:00 --account=x" []
  MAX_PARALLEL  slurm: array tasks running at once (%N)       [no limit]
  TASKS_PER_RUN slurm: processes per run: srun -n K python train_ex.py --distributed (sbatch --ntasks=K) [1]
  MAX_REQUEUES  slurm: requeues of an interrupted task before it is left interrupted [3]
  SIGNAL_SECS   slurm: seconds before the time limit at which the run is told to save and stop [120]
  WAIT          slurm: 1: wait for the summary job, print summary.md, exit like a local series [0]
  LOCK_WAIT     seconds to wait for a run directory another process holds before skipping it as running
                elsewhere [0; 300 in a requeued SLURM task, SLURM_RESTART_COUNT > 0]
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
STUDY="${STUDY:-}"
[[ -z "$STUDY" || "$STUDY" == cpu ]] || die "STUDY must be cpu or unset (the ablation series), got '$STUDY'"
if [[ -n "$STUDY" ]]; then
  [[ "$SMOKE" == 0 ]] || die "STUDY=cpu has its own small sizes; leave SMOKE unset"
  [[ -z "${DATASET:-}" ]] || die "STUDY=cpu sets each group's dataset; leave DATASET unset"
fi
DATASET="${DATASET:-listops-classification}"
if [[ -n "$STUDY" ]]; then
  EPOCHS="${EPOCHS:-}"; SEEDS="${SEEDS:-0 1 2}"; OUT_ROOT="${OUT_ROOT:-runs/study-$STUDY}"
elif [[ "$SMOKE" == 1 ]]; then
  EPOCHS="${EPOCHS:-1}"; SEEDS="${SEEDS:-0}"; OUT_ROOT="${OUT_ROOT:-runs/smoke-series}"
else
  EPOCHS="${EPOCHS:-50}"; SEEDS="${SEEDS:-0 1 2}"; OUT_ROOT="${OUT_ROOT:-runs/series-$DATASET}"
fi
# bash reserves GROUPS (the user's group ids): it neither reads it from the environment nor passes a
# `GROUPS=... cmd` prefix on; so take it from this process's original environment, and accept RUN_GROUPS too
if [[ -z "${RUN_GROUPS:-}" && -r /proc/$$/environ ]]; then
  RUN_GROUPS="$(tr '\0' '\n' </proc/$$/environ | sed -n 's/^GROUPS=//p' | head -n 1)"
fi
if [[ -n "$STUDY" ]]; then MAX_GROUP=5; else MAX_GROUP=7; fi
RUN_GROUPS="${RUN_GROUPS:-$(seq -s ' ' 1 $MAX_GROUP)}"
EXTRA="${EXTRA:-}"
USE_WANDB="${USE_WANDB:-0}"
WANDB_PROJECT="${WANDB_PROJECT:-s5-ex}"
RETRY_FAILED="${RETRY_FAILED:-1}"
FAIL_RUNS="${FAIL_RUNS:-}"
TRAIN="${TRAIN:-$HERE/train_ex.py}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

[[ (-n "$STUDY" && -z "$EPOCHS") || ("$EPOCHS" =~ ^[0-9]+$ && "$EPOCHS" -ge 1) ]] \
  || die "EPOCHS must be a positive integer, got '$EPOCHS'"
read -r -a SEED_LIST <<<"$SEEDS"
[[ ${#SEED_LIST[@]} -ge 1 ]] || die "SEEDS is empty"
for s in "${SEED_LIST[@]}"; do [[ "$s" =~ ^[0-9]+$ ]] || die "SEEDS must be non-negative integers, got '$s'"; done
read -r -a GROUP_ARGS <<<"$RUN_GROUPS"
[[ ${#GROUP_ARGS[@]} -ge 1 ]] || die "GROUPS is empty"
for g in "${GROUP_ARGS[@]}"; do
  [[ "$g" =~ ^[1-9]$ && "$g" -le $MAX_GROUP ]] || die "GROUPS must be numbers 1 to $MAX_GROUP, got '$g'"
done
[[ "$USE_WANDB" == 0 || "$USE_WANDB" == 1 ]] || die "USE_WANDB must be 0 or 1, got '$USE_WANDB'"
[[ "$RETRY_FAILED" == 0 || "$RETRY_FAILED" == 1 ]] || die "RETRY_FAILED must be 0 or 1, got '$RETRY_FAILED'"
[[ -n "$OUT_ROOT" ]] || die "OUT_ROOT is empty"
ONLY="${ONLY:-}"
LAUNCHER="${LAUNCHER:-local}"
DEVICES="${DEVICES:-}"
SLURM_ARGS="${SLURM_ARGS:-}"
MAX_PARALLEL="${MAX_PARALLEL:-}"
TASKS_PER_RUN="${TASKS_PER_RUN:-1}"
MAX_REQUEUES="${MAX_REQUEUES:-3}"
SIGNAL_SECS="${SIGNAL_SECS:-120}"
WAIT="${WAIT:-0}"
LOCK_WAIT="${LOCK_WAIT:-}"; LOCK_WAIT_GIVEN=$LOCK_WAIT
[[ "$LAUNCHER" == local || "$LAUNCHER" == slurm ]] || die "LAUNCHER must be local or slurm, got '$LAUNCHER'"
read -r -a DEVICE_LIST <<<"$DEVICES"
if [[ ${#DEVICE_LIST[@]} -gt 0 ]]; then
  [[ -z "${PARALLEL:-}" || "${PARALLEL:-}" == "${#DEVICE_LIST[@]}" ]] \
    || die "PARALLEL=$PARALLEL with DEVICES='$DEVICES': DEVICES runs one run per device; leave PARALLEL unset"
  PARALLEL=${#DEVICE_LIST[@]}
fi
PARALLEL="${PARALLEL:-1}"
[[ "$PARALLEL" =~ ^[0-9]+$ && "$PARALLEL" -ge 1 ]] || die "PARALLEL must be a positive integer, got '$PARALLEL'"
[[ -z "$MAX_PARALLEL" || ("$MAX_PARALLEL" =~ ^[0-9]+$ && "$MAX_PARALLEL" -ge 1) ]] \
  || die "MAX_PARALLEL must be a positive integer, got '$MAX_PARALLEL'"
[[ "$TASKS_PER_RUN" =~ ^[0-9]+$ && "$TASKS_PER_RUN" -ge 1 ]] \
  || die "TASKS_PER_RUN must be a positive integer, got '$TASKS_PER_RUN'"
[[ "$MAX_REQUEUES" =~ ^[0-9]+$ ]] || die "MAX_REQUEUES must be a non-negative integer, got '$MAX_REQUEUES'"
[[ "$SIGNAL_SECS" =~ ^[0-9]+$ ]] || die "SIGNAL_SECS must be a non-negative integer, got '$SIGNAL_SECS'"
[[ "$WAIT" == 0 || "$WAIT" == 1 ]] || die "WAIT must be 0 or 1, got '$WAIT'"
[[ -z "$LOCK_WAIT" || "$LOCK_WAIT" =~ ^[0-9]+$ ]] || die "LOCK_WAIT must be a non-negative integer, got '$LOCK_WAIT'"
if [[ -z "$LOCK_WAIT" ]]; then  # a requeued SLURM task: its predecessor may still be saving on another node
  if [[ "${SLURM_RESTART_COUNT:-0}" =~ ^[0-9]+$ && "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then LOCK_WAIT=300; else LOCK_WAIT=0; fi
fi
if [[ "$LAUNCHER" == slurm && -z "${_SERIES_TASK:-}" ]]; then
  command -v sbatch >/dev/null 2>&1 || die "LAUNCHER=slurm: no sbatch on PATH (run this on a SLURM login node)"
fi
read -r -a ONLY_GLOBS <<<"$ONLY"
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
  elif [[ -n "$STUDY" ]]; then DATA="$OUT_ROOT/data"
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
if [[ -n "$STUDY" ]]; then
  # small enough that one run takes about a minute on one CPU core; dropout off: the diagnostics are noiseless
  COMMON_ARGS=(--dir_name "$DATA" --d_model 32 --n_layers 2 --ssm_size_base 16 --bsz 64 --lr 4e-3 --p_dropout 0
               --warmup_end 1 --ckpt_every_min 0)
  [[ -n "$EPOCHS" ]] && COMMON_ARGS+=(--epochs "$EPOCHS")
else
  COMMON_ARGS=(--dataset "$DATASET" --dir_name "$DATA" --epochs "$EPOCHS" "${BASE_ARGS[@]}")
fi

# EXTRA (and DATASET) checked once with train_ex.py's own command line (config.py): a typo must not fail every run
if [[ -z "${_SERIES_TASK:-}" ]] && ! err="$("$PYTHON" - "${COMMON_ARGS[@]}" "${EXTRA_ARGS[@]}" 2>&1 <<PY
import sys
sys.path.insert(0, "$HERE")
import config
config.parse_args(sys.argv[1:])
PY
)"; then
  die "train_ex.py rejects DATASET/EXTRA ('$DATASET' / '$EXTRA'):"$'\n'"$(echo "$err" | tail -n 2)"
fi
# the exit codes of a run stopped by a signal, resumable (utils.INTERRUPTED_CODES: the one table of exit codes)
# and those of a run that does not fit in memory and of a run directory another process holds
CODES="$("$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); import utils
print(*sorted(utils.INTERRUPTED_CODES)); print(utils.DOES_NOT_FIT, utils.LOCKED)" "$HERE")" \
  || die "PYTHON: cannot import utils.py from $HERE"
INTERRUPTED_CODES=" $(head -n 1 <<<"$CODES") "
read -r NOFIT_CODE LOCKED_CODE <<<"$(tail -n 1 <<<"$CODES")"

# ---------------------------------------------------------------------------------------------------------------
# the series: group|setting|flags, in order
# ---------------------------------------------------------------------------------------------------------------
# STUDY=cpu: per task, its flags and the S5 control's --ssm_size_base (its parameter count is the closest to
# extend-full R 4's at d_model 32, 2 layers; the S5 count grows in steps of --ssm_size_base 2)
STUDY_TASKS=(""
  "copying|--dataset copying --data_options k=8,vocab=8,lag=32 --epochs 20|20"
  "selective-copying|--dataset selective_copying --data_options k=8,vocab=8,length=48 --epochs 20|22"
  "associative-recall|--dataset associative_recall --data_options n_pairs=8,n_queries=8,n_keys=16,n_values=16,gap=16 --epochs 20|20"
  "adding|--dataset adding --data_options length=128 --epochs 15|26"
  "psmnist|--dataset pmnist-classification --max_train_samples 2000 --max_eval_samples 1000 --epochs 3|66")
study_settings_of() {
  local task flags control
  IFS='|' read -r task flags control <<<"${STUDY_TASKS[$1]}"
  echo "s5|$flags --ssm_type s5"
  for t in linear exponential sinusoidal constant; do echo "aux-$t|$flags --enable_auxiliary_state --time_scale_type $t"; done
  for m in diag full; do echo "extend-$m|$flags --ssm_type extend --R 4 --extend_mode $m"; done
  for t in s4d s6 lru; do echo "$t|$flags --ssm_type $t"; done
  echo "s5-control|$flags --ssm_type s5 --ssm_size_base $control"
}

if [[ -n "$STUDY" ]]; then
  GROUP_NAMES=("")
  for ((g = 1; g <= MAX_GROUP; g++)); do GROUP_NAMES+=("${STUDY_TASKS[$g]%%|*}"); done
else
  GROUP_NAMES=("" g1-aux g2-time-scale g3-aux-strength g4-size g5-extend g6-warm-start g7-baselines)
fi
settings_of() {
  if [[ -n "$STUDY" ]]; then study_settings_of "$1"; return; fi
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
    7) for t in s5 s4d s6 lru; do echo "$t|--ssm_type $t"; done ;;
  esac
}

R_GROUP=(); R_SETTING=(); R_SEED=(); R_FLAGS=(); R_ORDER=()
for ((g = 1; g <= MAX_GROUP; g++)); do
  [[ " ${GROUP_ARGS[*]} " == *" $g "* ]] || continue
  j=0
  while IFS='|' read -r name flags; do
    j=$((j + 1))
    for s in "${SEED_LIST[@]}"; do  # order: the setting's place in the whole series, whatever GROUPS says
      if [[ ${#ONLY_GLOBS[@]} -gt 0 ]]; then
        keep=0
        # shellcheck disable=SC2053
        for pat in "${ONLY_GLOBS[@]}"; do [[ "${GROUP_NAMES[$g]}/$name/seed$s" == $pat ]] && keep=1; done
        [[ $keep == 1 ]] || continue
      fi
      R_GROUP+=("$g"); R_SETTING+=("$name"); R_SEED+=("$s"); R_FLAGS+=("$flags"); R_ORDER+=($((100 * g + j)))
    done
  done < <(settings_of "$g")
done
N=${#R_GROUP[@]}
[[ $N -ge 1 ]] || die "no run matches ONLY='$ONLY' in groups ${GROUP_ARGS[*]}"

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


is_interrupted() { [[ "$INTERRUPTED_CODES" == *" $1 "* ]]; }

# ARGS: train_ex.py's arguments for run i of the series, without --resume (added when it is continued)
build_args() {
  local i=$1 g=${R_GROUP[$1]} setting=${R_SETTING[$1]} seed=${R_SEED[$1]} pat flags id
  id="${GROUP_NAMES[$g]}/$setting/seed$seed"
  read -r -a flags <<<"${R_FLAGS[$i]}"
  # group 6: the extension starts from its own seed's S5 run
  [[ "$setting" == extend-warm ]] && flags+=(--load_checkpoint "$OUT_ROOT/${GROUP_NAMES[$g]}/s5-base/seed$seed/ckpt_best.msgpack")
  for pat in "${FAIL_GLOBS[@]}"; do
    # shellcheck disable=SC2053
    if [[ "$id" == $pat ]]; then flags+=(--epochs 0); fi  # FAIL_RUNS test hook: rejected by train_ex.py
  done
  ARGS=("${COMMON_ARGS[@]}" "${flags[@]}" "${EXTRA_ARGS[@]}" --jax_seed "$seed" --run_dir "$OUT_ROOT/$id"
        --wandb_project "$WANDB_PROJECT" --wandb_run_name "$SERIES/$id")
  [[ "$USE_WANDB" == 1 ]] && ARGS+=(--use_wandb)
  [[ "$TASKS_PER_RUN" -gt 1 && "$LAUNCHER" == slurm ]] && ARGS+=(--distributed)
  return 0
}

# The run directory's lock: run.lock, the flock that train_ex.py takes (utils.RunLock). This shell takes it before
# it reads the run's state and holds it until the run has ended; its train_ex.py inherits the descriptor (so the
# lock outlives this shell if only the shell is killed) and is told through RUN_LOCK_TOKEN that the lock is its
# own. lock_run DIR WAIT: 0 when this shell holds it (or the file system has no locks: a warning), 1 when another
# process holds it (HOLDER names it) after waiting up to WAIT seconds (-1: until it is free, or a signal).
LOCK_FD=""; LOCK_TOKEN=""; HOLDER=""
holder_of() {
  "$PYTHON" - "$1/run.lock" <<'PY' 2>/dev/null || echo "a process that has not yet written its name"
import json, sys
try:
    i = json.load(open(sys.argv[1]))
except Exception:
    i = {}
print(f"pid {i.get('pid', '?')} on host {i.get('host', '?')}, started {i.get('started', '?')}"
      + (f" ({i['by']})" if i.get("by") else "") if i else "a process that has not yet written its name")
PY
}
lock_run() {
  local dir=$1 wait=$2 t0=$SECONDS rc said=""
  LOCK_TOKEN=""
  exec {LOCK_FD}<>"$dir/run.lock"
  while :; do
    flock -n -E 75 "$LOCK_FD" 2>/dev/null && rc=0 || rc=$?
    [[ $rc == 0 ]] && break
    if [[ $rc != 75 ]]; then
      echo "warning: $dir cannot be locked (flock exit $rc: no lock support on its file system?): run without the one-writer guard" >&2
      return 0
    fi
    HOLDER="$(holder_of "$dir")"
    if [[ -n "$STOPPING" ]] || [[ "$wait" -ge 0 && $((SECONDS - t0)) -ge "$wait" ]]; then
      exec {LOCK_FD}>&-; LOCK_FD=""; return 1
    fi
    if [[ -z "$said" ]]; then
      echo "$dir: waiting$([[ "$wait" -ge 0 ]] && echo " up to ${wait}s") for $HOLDER to end"; said=1
    fi
    sleep 1
  done
  LOCK_TOKEN="series-$BASHPID-$RANDOM$RANDOM$RANDOM"
  # written by a child process (tee): on NFS, flock is a POSIX lock, which any close of the file by this
  # process itself would drop
  printf '{"host": %s, "pid": %s, "started": %s, "by": "run_train_ex.sh", "token": %s}\n' "$(json_str "$(hostname)")" \
    "$BASHPID" "$(json_str "$(date '+%Y-%m-%d %H:%M:%S %z')")" "$(json_str "$LOCK_TOKEN")" | tee "$dir/run.lock" >/dev/null
  return 0
}

# forward a signal to the training process of this shell (CHILD), or remember it when none is running yet
CHILD=""; STOPPING=""
forward() { STOPPING=${STOPPING:-$1}; if [[ -n "$CHILD" ]]; then kill -s "$1" "$CHILD" 2>/dev/null || true; fi; }

# One attempt at one run: TAG order g setting seed [launcher words...], with ARGS set by build_args. Prints a line
# as it starts and one as it ends (the run's own output goes to its train.log), writes series_run.json. Sets
# OUTCOME (trained, stopped, skipped, failed, interrupted, nofit, elsewhere: another process holds the run
# directory, nothing touched), RC (train_ex.py's exit code) and CMD (its command). The run directory's lock is
# taken first (waiting up to LOCK_WAIT_NOW, else LOCK_WAIT seconds) and held until the shell exits.
run_one() {
  local tag=$1 order=$2 g=$3 setting=$4 seed=$5
  local launch=("${@:6}")
  local id="${GROUP_NAMES[$g]}/$setting/seed$seed"
  local dir="$OUT_ROOT/$id" status bval btest
  local head="$tag ${GROUP_NAMES[$g]} $setting seed $seed → $dir"
  mkdir -p "$dir"
  RC=0
  if ! lock_run "$dir" "${LOCK_WAIT_NOW:-$LOCK_WAIT}"; then
    echo "$head: running elsewhere (held by $HOLDER), skipped"; OUTCOME=elsewhere; return 0
  fi
  read -r status _ _ < <(run_info "$dir")
  if [[ "$status" == finished ]]; then
    grep -q '"status": "finished"' "$dir/series_run.json" 2>/dev/null \
      || write_meta "$dir" "$order" "$g" "$setting" "$seed" finished null "" ""
    echo "$head: finished, skipped"; OUTCOME=skipped; return 0
  fi
  if [[ "$status" == failed && "$RETRY_FAILED" == 0 ]]; then
    echo "$head: failed before, left failed (RETRY_FAILED=0)"; OUTCOME=failed; return 0
  fi
  if [[ "$setting" == extend-warm ]]; then
    local base="$OUT_ROOT/${GROUP_NAMES[$g]}/s5-base/seed$seed" bstatus
    read -r bstatus _ _ < <(run_info "$base")
    if [[ "$bstatus" != finished || ! -f "$base/ckpt_best.msgpack" ]]; then
      local note="not started: its S5 run $base is not finished (status: $bstatus)"
      write_meta "$dir" "$order" "$g" "$setting" "$seed" failed null "$note" ""
      echo "$head: FAILED, $note"; OUTCOME=failed; return 0
    fi
  fi

  # a run with a checkpoint that has not failed is continued, never started again from scratch
  local mode=fresh args=("${ARGS[@]}")
  [[ "$status" != failed && -f "$dir/ckpt_latest.msgpack" ]] && mode=resume
  if [[ "$mode" == fresh ]]; then
    rm -f "$dir/results.json" "$dir"/ckpt_*.msgpack "$dir"/ckpt_*.json "$dir"/ckpt_*.prev
  else
    args+=(--resume)
  fi
  local cmd="${launch[*]}${launch[*]:+ }$PYTHON $TRAIN ${args[*]}"
  CMD=$cmd
  if [[ "$mode" == resume ]]; then echo "$head (resuming from ckpt_latest)"; else echo "$head"; fi
  write_meta "$dir" "$order" "$g" "$setting" "$seed" running null "" "$cmd"
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') attempt ($mode): $cmd" >>"$dir/train.log"
  local t0=$SECONDS
  WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$SERIES}" WANDB_JOB_TYPE="${GROUP_NAMES[$g]}" RUN_LOCK_TOKEN="$LOCK_TOKEN" \
    "${launch[@]}" "$PYTHON" "$TRAIN" "${args[@]}" >>"$dir/train.log" 2>&1 </dev/null &
  CHILD=$!
  [[ -n "$STOPPING" ]] && kill -s "$STOPPING" "$CHILD" 2>/dev/null
  while :; do  # a trapped signal interrupts `wait`: wait again until the run itself has ended
    wait "$CHILD" && RC=0 || RC=$?
    kill -0 "$CHILD" 2>/dev/null || break
  done
  if [[ $RC -gt 128 ]]; then wait "$CHILD" 2>/dev/null && RC=0 || { r=$?; [[ $r == 127 ]] || RC=$r; }; fi
  CHILD=""
  local dt=$((SECONDS - t0))
  read -r status bval btest < <(run_info "$dir")

  if is_interrupted "$RC"; then
    write_meta "$dir" "$order" "$g" "$setting" "$seed" interrupted "$RC" "stopped by a signal (exit $RC)" "$cmd"
    echo "$tag $id: interrupted (exit $RC) after ${dt}s; run this script again to continue (--resume)" >&2
    OUTCOME=interrupted
  elif [[ $RC == 0 && "$status" == finished ]]; then
    write_meta "$dir" "$order" "$g" "$setting" "$seed" finished 0 "" "$cmd"
    echo "$tag $id: finished in ${dt}s: best val $bval, test at best val $btest"; OUTCOME=trained
  elif [[ $RC == "$NOFIT_CODE" ]]; then  # XLA's estimate exceeds the device's memory: not a crash
    local msg
    msg="$(grep -a 'does not fit' "$dir/train.log" | tail -n 1 | cut -c 1-600)"
    write_meta "$dir" "$order" "$g" "$setting" "$seed" "does not fit" "$RC" "${msg//|//}" "$cmd"
    echo "$tag $id: DOES NOT FIT in memory (exit $RC) after ${dt}s; log: $dir/train.log"
    echo "      | $msg"
    OUTCOME=nofit
  elif [[ $RC == "$LOCKED_CODE" ]]; then  # another process took the directory (a file system without locks?)
    write_meta "$dir" "$order" "$g" "$setting" "$seed" "running elsewhere" "$RC" "$(tail -n 1 "$dir/train.log")" "$cmd"
    echo "$tag $id: running elsewhere (exit $RC), skipped"; OUTCOME=elsewhere
  elif [[ $RC == 0 ]]; then  # e.g. --max_steps in EXTRA: stopped resumably
    write_meta "$dir" "$order" "$g" "$setting" "$seed" "${status/none/interrupted}" 0 "stopped before the last epoch" "$cmd"
    echo "$tag $id: stopped after ${dt}s with status '$status' (resumed on the next invocation)"; OUTCOME=stopped
  else
    local last
    last="$(tr '\r' '\n' <"$dir/train.log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c 1-200)"
    write_meta "$dir" "$order" "$g" "$setting" "$seed" failed "$RC" "exit code $RC: ${last//|//}" "$cmd"
    { echo "$tag $id: FAILED (exit code $RC) after ${dt}s; log: $dir/train.log"
      tr '\r' '\n' <"$dir/train.log" | grep -v '^[[:space:]]*$' | tail -n 3 | sed 's/^/      | /'; }
    OUTCOME=failed
  fi
  return 0
}

# the index of run i's S5 base run in this invocation (group 6's extend-warm), or nothing
base_of() {
  local i=$1 b
  [[ "${R_SETTING[$i]}" == extend-warm ]] || return 0
  for ((b = 0; b < N; b++)); do
    if [[ "${R_GROUP[$b]}" == "${R_GROUP[$i]}" && "${R_SETTING[$b]}" == s5-base && "${R_SEED[$b]}" == "${R_SEED[$i]}" ]]; then
      echo "$b"; return 0
    fi
  done
}

summarize_and_print() {
  if "$PYTHON" "$HERE/summarize.py" "$OUT_ROOT"; then
    echo
    cat "$OUT_ROOT/summary.md"
  else
    echo "warning: summarize.py failed; the runs themselves are in $OUT_ROOT" >&2
  fi
}

# ---------------------------------------------------------------------------------------------------------------
# SLURM: one array task (started by sbatch: _SERIES_TASK = main or warm) and the summary job (summary)
# ---------------------------------------------------------------------------------------------------------------
# the plan of this task's own submission (a later submission writes its own; plan.tsv is the latest)
PLAN="${_SERIES_PLAN:-$OUT_ROOT/slurm/plan.tsv}"
JOBS="$OUT_ROOT/slurm/jobs.tsv"  # every submitted array: job id, array (main/warm), its plan

slurm_task() {
  local line id order g setting seed words
  line="$(awk -F'\t' -v a="$_SERIES_TASK" -v t="${SLURM_ARRAY_TASK_ID:-}" '$1 == a && $2 == t' "$PLAN")"
  [[ -n "$line" ]] || { echo "run_train_ex.sh: error: no line for array '$_SERIES_TASK' task ${SLURM_ARRAY_TASK_ID:-?} in $PLAN" >&2; exit 2; }
  IFS=$'\t' read -r _ _ id order g setting seed words <<<"$line"
  eval "ARGS=($words)"
  local launch=() stop=TERM
  if [[ "$TASKS_PER_RUN" -gt 1 ]]; then
    launch=(srun -n "$TASKS_PER_RUN" --kill-on-bad-exit=1)
    stop=USR1  # srun passes USR1 on to every process; SIGTERM to srun kills them without a checkpoint
  fi
  # shellcheck disable=SC2064
  trap "forward $stop" TERM USR1  # USR1: SLURM's --signal=B:USR1@SIGNAL_SECS before the time limit
  trap 'forward INT' INT
  local task="${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID:-?}" restarts=${SLURM_RESTART_COUNT:-0}
  run_one "[slurm $task, start $((restarts + 1))]" "$order" "$g" "$setting" "$seed" "${launch[@]}"
  if [[ "$OUTCOME" == interrupted ]]; then
    local dir="$OUT_ROOT/$id" cmd="$CMD"
    if [[ "$restarts" -lt "$MAX_REQUEUES" ]]; then
      write_meta "$dir" "$order" "$g" "$setting" "$seed" interrupted "$RC" \
        "stopped by a signal (exit $RC); SLURM task $task requeued ($((restarts + 1)) of at most $MAX_REQUEUES)" "$cmd"
      echo "requeueing $task ($((restarts + 1)) of at most $MAX_REQUEUES)"
      scontrol requeue "$task" || echo "(scontrol requeue $task failed: already requeued by SLURM?)"
    else
      write_meta "$dir" "$order" "$g" "$setting" "$seed" interrupted "$RC" \
        "stopped by a signal (exit $RC); not requeued: requeued $restarts times already (MAX_REQUEUES)" "$cmd"
      echo "not requeueing $task: requeued $restarts times already (MAX_REQUEUES=$MAX_REQUEUES)"
    fi
  fi
  exit 0  # the run's own outcome is in its series_run.json: a warm start after it checks it (aftercorr)
}

slurm_summary() {
  local a t id order g setting seed words dir
  while IFS=$'\t' read -r a t id order g setting seed words; do
    dir="$OUT_ROOT/$id"
    if [[ ! -f "$dir/results.json" && ! -f "$dir/series_run.json" ]]; then
      mkdir -p "$dir"
      write_meta "$dir" "$order" "$g" "$setting" "$seed" failed null "never started: its SLURM task was cancelled" ""
    fi
  done <"$PLAN"
  summarize_and_print
  date '+%Y-%m-%d %H:%M:%S' >"$OUT_ROOT/slurm/summary.done"
  exit 0
}

case "${_SERIES_TASK:-}" in
  "") ;;
  main|warm) slurm_task ;;
  summary) slurm_summary ;;
  *) die "_SERIES_TASK must be main, warm or summary (set by the series' own sbatch), got '$_SERIES_TASK'" ;;
esac

# ---------------------------------------------------------------------------------------------------------------
# data for SMOKE and STUDY=cpu
# ---------------------------------------------------------------------------------------------------------------
# (one series at a time: another started on the same OUT_ROOT waits here, then finds the data made)
exec {DATA_LOCK}<>"$OUT_ROOT/.data.lock"
flock "$DATA_LOCK" 2>/dev/null || true
if [[ "$SMOKE_DATA" == 1 && ! -f "$DATA/listops_generated/basic_test.tsv" && ! -d "$DATA/lra_release/listops-1000" ]]; then
  echo "SMOKE: generating a tiny ListOps set in $DATA/listops_generated"
  rm -rf "$DATA/listops_generated.tmp"
  "$PYTHON" "$HERE/dataloaders.py" make-listops --out "$DATA/listops_generated.tmp" --n_train 64 --n_val 16 \
    --n_test 16 --workers 1 >"$OUT_ROOT/make_listops.log" 2>&1 \
    || die "could not generate the smoke data (log: $OUT_ROOT/make_listops.log)"
  mv "$DATA/listops_generated.tmp" "$DATA/listops_generated"
fi
# STUDY=cpu's psMNIST: disjoint train/test splits made once from MNIST_SOURCE's test images, unless DATA has MNIST
if [[ -n "$STUDY" && " ${GROUP_ARGS[*]} " == *" 5 "* ]] && ! compgen -G "$DATA/MNIST/raw/train-images-idx3-ubyte*" >/dev/null; then
  MNIST_SOURCE="${MNIST_SOURCE:-$HERE/../shared/data/mnist}"
  echo "STUDY: making $DATA/MNIST from $MNIST_SOURCE (8,000 training and 2,000 test images)"
  "$PYTHON" "$HERE/dataloaders.py" split-mnist --source "$MNIST_SOURCE" --out "$DATA" --n_test 2000 \
    >"$OUT_ROOT/split_mnist.log" 2>&1 || die "could not make the psMNIST data: $(tail -n 1 "$OUT_ROOT/split_mnist.log")"
fi
exec {DATA_LOCK}>&-

if [[ -n "$STUDY" ]]; then
  echo "study '$STUDY' ($SERIES): $N runs (groups ${GROUP_ARGS[*]}; seeds ${SEED_LIST[*]}; ${EPOCHS:-per-task} epochs) → $OUT_ROOT"
else
  echo "series '$SERIES': $N runs (groups ${GROUP_ARGS[*]}; seeds ${SEED_LIST[*]}; $DATASET, $EPOCHS epochs) → $OUT_ROOT"
fi
[[ -n "$EXTRA" ]] && echo "EXTRA for every run: $EXTRA"

# ---------------------------------------------------------------------------------------------------------------
# SLURM: submit the plan
# ---------------------------------------------------------------------------------------------------------------
if [[ "$LAUNCHER" == slurm ]]; then
  read -r -a SLURM_ARG_LIST <<<"$SLURM_ARGS"
  mkdir -p "$OUT_ROOT/slurm"
  declare -A TASK_OF=() QUEUED=()
  # runs of an earlier submission still pending or running (squeue) are not submitted again
  if [[ -s "$JOBS" ]]; then
    while read -r jt state; do
      j=${jt%%_*}; t=${jt#*_}
      [[ "$jt" == *_* && "$t" =~ ^[0-9]+$ ]] || continue
      IFS=$'\t' read -r _ a p < <(awk -F'\t' -v j="$j" '$1 == j' "$JOBS") || continue
      [[ -n "${p:-}" && -f "$p" ]] || continue
      rid="$(awk -F'\t' -v a="$a" -v t="$t" '$1 == a && $2 == t {print $3}' "$p")"
      [[ -n "$rid" ]] && QUEUED[$rid]="$jt, $state"
    done < <(squeue -h -r -j "$(cut -f1 "$JOBS" | paste -sd, -)" -o "%i %T" 2>/dev/null || true)
  fi
  plan="" n_main=0; warm_ids=()
  for ((i = 0; i < N; i++)); do
    g=${R_GROUP[$i]}; id="${GROUP_NAMES[$g]}/${R_SETTING[$i]}/seed${R_SEED[$i]}"
    read -r status _ _ < <(run_info "$OUT_ROOT/$id")
    if [[ "$status" == finished ]]; then echo "[$((i + 1))/$N] $id: finished, skipped"; continue; fi
    if [[ -n "${QUEUED[$id]:-}" ]]; then
      echo "[$((i + 1))/$N] $id: still in SLURM (task ${QUEUED[$id]}), not submitted again"; continue
    fi
    if [[ "$status" == failed && "$RETRY_FAILED" == 0 ]]; then
      echo "[$((i + 1))/$N] $id: failed before, left failed (RETRY_FAILED=0)"; continue
    fi
    build_args "$i"
    b="$(base_of "$i")"
    if [[ -n "$b" && -n "${TASK_OF[$b]:-}" ]]; then  # its S5 run is in this submission: the same task id, later
      array=warm; task=${TASK_OF[$b]}; warm_ids+=("$task")
    else
      array=main; task=$n_main; n_main=$((n_main + 1)); TASK_OF[$i]=$task
    fi
    plan+="$array"$'\t'"$task"$'\t'"$id"$'\t'"${R_ORDER[$i]}"$'\t'"$g"$'\t'"${R_SETTING[$i]}"$'\t'"${R_SEED[$i]}"$'\t'"$(printf '%q ' "${ARGS[@]}")"$'\n'
    echo "[$((i + 1))/$N] $id: $array array task $task"
  done
  if [[ $n_main == 0 && ${#QUEUED[@]} -gt 0 ]]; then
    echo "every run is finished, left failed or still in SLURM: nothing to submit"
    exit 0
  fi
  if [[ $n_main == 0 ]]; then
    echo "every run is finished (or left failed): nothing to submit"
    summarize_and_print
    exit 0
  fi
  SUB="$(date +%Y%m%d-%H%M%S)-$$"  # this submission: its own plan and task script, read by its tasks
  PLAN="$OUT_ROOT/slurm/plan.$SUB.tsv"
  printf '%s' "$plan" >"$PLAN"
  cp "$PLAN" "$OUT_ROOT/slurm/plan.tsv.tmp" && mv "$OUT_ROOT/slurm/plan.tsv.tmp" "$OUT_ROOT/slurm/plan.tsv"
  cat >"$OUT_ROOT/slurm/task.$SUB.sh" <<EOF
#!/usr/bin/env bash
# A task of the series in $OUT_ROOT (run_train_ex.sh --help): its line of plan.tsv, requeued when interrupted.
$(for v in OUT_ROOT PYTHON TRAIN SERIES MAX_REQUEUES TASKS_PER_RUN RETRY_FAILED USE_WANDB LAUNCHER; do printf 'export %s=%q\n' "$v" "${!v}"; done)
export LOCK_WAIT=$(printf '%q' "$LOCK_WAIT_GIVEN")
export _SERIES_PLAN=$(printf '%q' "$PLAN")
exec bash $(printf '%q' "$HERE/run_train_ex.sh")
EOF
  rm -f "$OUT_ROOT/slurm/summary.done"
  log_of="$OUT_ROOT/slurm/%A_%a.out"
  common=(--parsable --requeue --open-mode=append --signal="B:USR1@$SIGNAL_SECS" --ntasks="$TASKS_PER_RUN"
          "${SLURM_ARG_LIST[@]}")
  submit() {  # sbatch words...: the job id, or exit 2 with sbatch's message after cancelling what was submitted
    local out
    if ! out="$(sbatch "$@" "$OUT_ROOT/slurm/task.$SUB.sh" 2>&1)"; then
      [[ ${#SUBMITTED[@]} -gt 0 ]] && scancel "${SUBMITTED[@]}" 2>/dev/null
      die "sbatch refused the series (SLURM_ARGS='$SLURM_ARGS'); nothing is submitted:"$'\n'"$out"
    fi
    out="$(echo "$out" | tail -n 1)"; out="${out%%;*}"
    SUBMITTED+=("$out"); echo "$out"
  }
  SUBMITTED=()
  MAIN_JOB=$(submit "${common[@]}" --job-name="$SERIES" --output="$log_of" --export="ALL,_SERIES_TASK=main" \
             --array="0-$((n_main - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}") || exit 2
  SUBMITTED=("$MAIN_JOB"); after="afterany:$MAIN_JOB"
  printf '%s\tmain\t%s\n' "$MAIN_JOB" "$PLAN" >>"$JOBS"
  if [[ ${#warm_ids[@]} -gt 0 ]]; then
    WARM_JOB=$(IFS=,; submit "${common[@]}" --job-name="$SERIES-warm" --output="$log_of" \
               --export="ALL,_SERIES_TASK=warm" --dependency="aftercorr:$MAIN_JOB" \
               --array="${warm_ids[*]}${MAX_PARALLEL:+%$MAX_PARALLEL}") || exit 2
    SUBMITTED+=("$WARM_JOB"); after+=":$WARM_JOB"
    printf '%s\twarm\t%s\n' "$WARM_JOB" "$PLAN" >>"$JOBS"
  fi
  SUM_JOB=$(submit --parsable "${SLURM_ARG_LIST[@]}" --ntasks=1 --job-name="$SERIES-summary" \
            --output="$OUT_ROOT/slurm/summary_%j.out" --export="ALL,_SERIES_TASK=summary" --dependency="$after") \
    || exit 2
  echo "submitted: job array $MAIN_JOB ($n_main run(s))${WARM_JOB:+, warm-start array $WARM_JOB (${#warm_ids[@]}, each after its S5 run)}, summary job $SUM_JOB (after them)"
  echo "follow:    squeue -j $MAIN_JOB${WARM_JOB:+,$WARM_JOB},$SUM_JOB   |   sacct -j $MAIN_JOB   |   tail -f $OUT_ROOT/<run>/train.log"
  echo "task logs: $OUT_ROOT/slurm/<job>_<task>.out; the plan: $PLAN; summary: $OUT_ROOT/summary.md when job $SUM_JOB ends"
  [[ "$WAIT" == 1 ]] || exit 0
  echo "waiting for summary job $SUM_JOB (WAIT=1) ..."
  while squeue -h -j "$SUM_JOB" 2>/dev/null | grep -q .; do sleep "${SLURM_POLL_SECS:-5}"; done
  [[ -f "$OUT_ROOT/slurm/summary.done" ]] \
    || { echo "run_train_ex.sh: error: summary job $SUM_JOB ended without a summary (log: $OUT_ROOT/slurm/summary_$SUM_JOB.out)" >&2; exit 1; }
  echo
  cat "$OUT_ROOT/summary.md"
  exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
# local: PARALLEL runs at once (one per device of DEVICES), each in a subshell that forwards signals to its run
# ---------------------------------------------------------------------------------------------------------------
declare -A RUN_OF=() SLOT_OF=()
STATE=(); for ((i = 0; i < N; i++)); do STATE[i]=pending; done
FREE=(); for ((s = 0; s < PARALLEL; s++)); do FREE+=("$s"); done
STOP=""; n_done=0; n_skipped=0; n_failed=0; n_stopped=0; n_elsewhere=0; n_nofit=0; STOP_RC=0; AWAIT=()
stop_all() {  # a signal to the series, or a run stopped by one: stop starting runs, pass it to the running ones
  STOP=${STOP:-$1}
  local pid
  for pid in "${!RUN_OF[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
on_signal() { if [[ $STOP_RC == 0 ]]; then STOP_RC=$2; fi; stop_all "$1"; }
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

next_ready() {  # the first pending run whose S5 base (if any) is not pending or running
  local i b
  for ((i = 0; i < N; i++)); do
    [[ "${STATE[$i]}" == pending ]] || continue
    b="$(base_of "$i")"
    if [[ -n "$b" && "${STATE[$b]}" != done ]]; then continue; fi
    echo "$i"; return 0
  done
  return 1
}

start_run() {  # i slot
  local i=$1 slot=$2
  build_args "$i"
  (
    trap 'forward TERM' TERM
    trap 'forward INT' INT
    if [[ -n "${AWAIT[$i]:-}" ]]; then LOCK_WAIT_NOW=-1; RETRY_FAILED=0; fi  # ran elsewhere: wait for its end
    [[ ${#DEVICE_LIST[@]} -gt 0 ]] && export CUDA_VISIBLE_DEVICES="${DEVICE_LIST[$slot]}"
    run_one "[$((i + 1))/$N]" "${R_ORDER[$i]}" "${R_GROUP[$i]}" "${R_SETTING[$i]}" "${R_SEED[$i]}"
    case "$OUTCOME" in
      trained) exit 0 ;; skipped) exit 10 ;; failed) exit 11 ;; stopped) exit 12 ;; elsewhere) exit 13 ;;
      nofit) exit 14 ;; *) exit "$RC" ;;
    esac
  ) &
  RUN_OF[$!]=$i; SLOT_OF[$!]=$slot; STATE[i]=running
}

# a run another process holds (another series on the same OUT_ROOT) is skipped at first; once every other run
# has ended, the series waits for those (their lock) and counts their outcome, so that its summary is complete
while :; do
  while :; do
    while [[ -z "$STOP" && ${#RUN_OF[@]} -lt $PARALLEL ]]; do
      i="$(next_ready)" || break
      start_run "$i" "${FREE[0]}"; FREE=("${FREE[@]:1}")
    done
    [[ ${#RUN_OF[@]} -gt 0 ]] || break
    DONE=""
    wait -n -p DONE "${!RUN_OF[@]}" && rc=0 || rc=$?
    [[ -n "${DONE:-}" ]] || continue  # a signal to the series: its trap has passed it on
    i=${RUN_OF[$DONE]}; FREE+=("${SLOT_OF[$DONE]}"); unset "RUN_OF[$DONE]" "SLOT_OF[$DONE]"; STATE[i]=done
    case $rc in
      0) n_done=$((n_done + 1)) ;; 11) n_failed=$((n_failed + 1)) ;; 12) n_stopped=$((n_stopped + 1)) ;;
      10) if [[ -n "${AWAIT[$i]:-}" ]]; then n_elsewhere=$((n_elsewhere + 1)); else n_skipped=$((n_skipped + 1)); fi ;;
      13) STATE[i]=elsewhere ;; 14) n_nofit=$((n_nofit + 1)) ;;
      *) if [[ $STOP_RC == 0 ]]; then STOP_RC=$rc; fi  # a run stopped by a signal: the series stops like on Ctrl-C
         if [[ $rc == 130 ]]; then stop_all INT; else stop_all TERM; fi ;;
    esac
  done
  [[ -z "$STOP" ]] || break
  elsewhere=(); for ((i = 0; i < N; i++)); do [[ "${STATE[$i]}" == elsewhere ]] && elsewhere+=("$i"); done
  [[ ${#elsewhere[@]} -gt 0 ]] || break
  echo "waiting for ${#elsewhere[@]} run(s) that another process is training, to summarise them too"
  for i in "${elsewhere[@]}"; do STATE[i]=pending; AWAIT[i]=1; done
done

if [[ -n "$STOP" ]]; then
  left=0; for ((i = 0; i < N; i++)); do [[ "${STATE[$i]}" == done ]] || left=$((left + 1)); done
  echo "series '$SERIES' interrupted (exit $STOP_RC): the running runs saved ckpt_latest; run this script again to continue them and the $left not started" >&2
  exit "$STOP_RC"
fi
echo "series '$SERIES': $n_done run(s) trained, $n_skipped skipped (finished before),$( ((n_elsewhere)) && echo " $n_elsewhere trained elsewhere (another process),") $n_failed failed,$( ((n_nofit)) && echo " $n_nofit did not fit in memory,") of $N"
summarize_and_print
exit 0
