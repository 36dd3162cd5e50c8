#!/usr/bin/env bash
# The lab's series of train_ex.py runs, read from a plan (plans/NAME.plan: groups of settings, one line per setting):
# one run per setting and seed, each in its own run directory, resumable, failures logged and skipped over,
# summarised at the end by summarize.py. This file schedules (a local pool or SLURM job arrays); the plan says what.
#
#   ./run_train_ex.sh                        # the ablation series, plans/series.plan (see --help for the variables)
#   SMOKE=1 ./run_train_ex.sh                # the whole series on a tiny budget on a CPU, in minutes
#   RUN_GROUPS="1 5" SEEDS="0 1 2" EPOCHS=20 OUT_ROOT=runs/ablation ./run_train_ex.sh
#   STUDY=cpu PARALLEL=2 ./run_train_ex.sh  # the CPU study, plans/study-cpu.plan
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "run_train_ex.sh: error: $*" >&2; echo "(see $0 --help)" >&2; exit 2; }

# the plan: PLAN=NAME (plans/NAME.plan) or a file's path; STUDY=NAME is PLAN=study-NAME
STUDY="${STUDY:-}"
if [[ -n "$STUDY" ]]; then
  [[ -z "${PLAN:-}" ]] || die "give PLAN or STUDY, not both (STUDY=$STUDY is PLAN=study-$STUDY)"
  [[ -f "$HERE/plans/study-$STUDY.plan" ]] \
    || die "STUDY must name a plan plans/study-NAME.plan: $(cd "$HERE/plans" && ls study-*.plan 2>/dev/null | sed 's/^study-//; s/\.plan$//' | paste -sd, -), got '$STUDY'"
  PLAN="study-$STUDY"
fi
PLAN="${PLAN:-series}"

usage() {
  cat <<EOF
usage: [VAR=value ...] $0 [--help]

Runs the train_ex.py runs of a plan: plans/NAME.plan lists groups of settings, one line per setting (its syntax:
SERIES.md, "Plans"). One run per setting and seed, in plan order. The plans (PLAN=NAME, or STUDY=NAME for
plans/study-NAME.plan, or PLAN=path/to/file.plan):
$("$PYTHON" "$HERE/config.py" plans 2>&1)

PLAN=$PLAN (PLAN=NAME $0 --help shows another):
$("$PYTHON" "$HERE/config.py" plan-table "$PLAN" 2>&1)

A plan may default SEEDS, EPOCHS and DATASET (the environment wins); a plan whose groups set --dataset refuses
DATASET. SMOKE=1 adds the plan's tiny sizes (its "smoke" line) and one epoch. Settings whose plan has a "tune" line
run each candidate value on the tuning seed first (folder SETTING/FLAG=VALUE/seedK); their seeds then use the value
with the best validation score (chosen when each run starts; series_run.json records it), never a test figure.

Every run uses train_ex.py's defaults for padded sets: padding masked before every SSM (--mask_padding) and
length-bucketed batches (--buckets), not the S5 release's unmasked, full-length batches; for the release's
behaviour pass EXTRA="--no-mask_padding --no-buckets". Held-out splits are the release's (--split_seed 42).

Each run writes OUT_ROOT/<group>/<setting>/seed<k>/ (results.json, checkpoints, train.log, series_run.json).
A run whose results.json says "finished" is skipped; one left "running"/"interrupted" with a checkpoint is
continued with --resume; any other is (re)started from scratch. A failed run is logged (train.log keeps every
attempt) and the series goes on; a run that does not fit in memory (train_ex.py exit 5, checked before its first
step) is recorded as "does not fit", not as a crash. A run that starts from another (a warm start, after=) or from
a tuned value waits for those runs; if they did not finish it is recorded as failed, not started. At the end
summarize.py writes OUT_ROOT/summary.{md,csv}, runs.csv and PNG plots, and summary.md is printed. Exit status: 0
unless the variables are misused (2) or the series is interrupted: Ctrl-C (130) or SIGTERM (143), to the series or
to one of its runs; every running run then saves ckpt_latest and stops, and the next invocation continues it.
(The exit codes: utils.EXIT_CODES, CLUSTER.md.)

One writer per run: each run's directory is locked (run.lock, flock) from before its state is read until the run
ends. A run whose directory another process holds (another series on the same OUT_ROOT, a train_ex.py started by
hand) is "running elsewhere": skipped, nothing in it touched; once its own runs are done the series waits for
those and counts them, so two series started on one OUT_ROOT share its runs, each trained once, and print the
same summary.

Several runs at once (LAUNCHER=local): DEVICES="0 1 2 3" runs one run per device, each seeing only its device
(CUDA_VISIBLE_DEVICES); PARALLEL=N runs N at once (CPU). The console shows each run as it starts and one line as
it ends; each run's output goes to its own train.log.

On SLURM (LAUNCHER=slurm): the plan (one line per run that is not finished: array, task, run id, command) goes
to OUT_ROOT/slurm/plan.tsv; one job array runs it (one task per run, MAX_PARALLEL at once); warm starts run in a
second array (task k starts when task k of the first, its base run, has ended: --dependency=aftercorr), tuned
runs in a third (after the whole first array, which holds their tuning runs: afterany); a summary job runs
summarize.py after them all (afterany). The job ids and how to follow them are printed and the script returns
(WAIT=1: waits for the summary, prints it). Every task is requeueable: before its time limit (SIGNAL_SECS) and
on preemption the run saves ckpt_latest, the task requeues itself (at most MAX_REQUEUES times) and continues with
--resume. Running the command again submits only the runs not finished and not still pending or running in
SLURM (OUT_ROOT/slurm/jobs.tsv: the arrays submitted, each with its own plan).

Variables (default in brackets):
  PLAN          the plan: a name in plans/ or a file's path  [series]
  STUDY         NAME: the plan plans/study-NAME.plan (cpu: the CPU study; gpu: its GPU-sized version) []
  MNIST_SOURCE  a plan with "data | split-mnist": folder with t10k-{images-idx3,labels-idx1}-ubyte[.gz]
                [../shared/data/mnist]
  DATASET       train_ex.py --dataset, for a plan whose groups set none [the plan's; listops-classification]
  DATA          data root, train_ex.py --dir_name            [./data; SMOKE=1 on ListOps, or a plan with data: OUT_ROOT/data]
  EPOCHS        epochs per run (wins over the plan's)        [the plan's; SMOKE=1: 1]
  SEEDS         seeds per setting (--jax_seed), e.g. "0 1 2"; a setting with seeds=N takes the first N
                [the plan's; SMOKE=1: 0]
  RUN_GROUPS    which groups run (numbers, as --help lists them), e.g. "1 5"  [all]
                (GROUPS is accepted too, but only through \`env GROUPS="1 5" $0\`: bash reserves the name)
  EXTRA         flags passed to every run (after the plan's, so they win) []
  OUT_ROOT      output root     [runs/series-DATASET; SMOKE=1: runs/smoke-series; other plans: runs/PLAN]
  SMOKE         1: tiny model and data budget for a CPU check; builds a tiny generated ListOps under
                OUT_ROOT/data unless DATA is set              [0]
  SERIES        series name: wandb group and run-name prefix [basename of OUT_ROOT]
  USE_WANDB     1: log online (--use_wandb); otherwise wandb is offline; WANDB_MODE=disabled turns it off [0]
  WANDB_PROJECT train_ex.py --wandb_project                 [s5-ex]
  RETRY_FAILED  1: rerun failed runs on the next invocation; 0: leave them failed [1]
  PYTHON        interpreter                                 [.venv/bin/python beside this script, else python3]
  TRAIN         training script                             [train_ex.py beside this script]
  ONLY          space-separated globs over run ids: only the matching runs, e.g. "copying/*/seed0" (a GROUP/SETTING/seedK glob) []
  FAIL_RUNS     test hook: space-separated globs over run ids (e.g. "copying/s5/*"); matching runs get
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
  JAX_COMPILATION_CACHE_DIR  JAX's compilation cache, shared by the runs (empty: none)  [OUT_ROOT/.jax_cache]
  LOCK_WAIT     seconds to wait for a run directory another process holds before skipping it as running
                elsewhere [0; 300 in a requeued SLURM task, SLURM_RESTART_COUNT > 0]
Each run logs to wandb with group SERIES (WANDB_RUN_GROUP), job type = its group (WANDB_JOB_TYPE) and name
SERIES/<group>/<setting>/seed<k>.
EOF
}

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
DATASET="${DATASET:-}"; EPOCHS="${EPOCHS:-}"; SEEDS="${SEEDS:-}"
# bash reserves GROUPS (the user's group ids): it neither reads it from the environment nor passes a
# `GROUPS=... cmd` prefix on; so take it from this process's original environment, and accept RUN_GROUPS too
if [[ -z "${RUN_GROUPS:-}" && -r /proc/$$/environ ]]; then
  RUN_GROUPS="$(tr '\0' '\n' </proc/$$/environ | sed -n 's/^GROUPS=//p' | head -n 1)"
fi
RUN_GROUPS="${RUN_GROUPS:-}"
EXTRA="${EXTRA:-}"
USE_WANDB="${USE_WANDB:-0}"
WANDB_PROJECT="${WANDB_PROJECT:-s5-ex}"
RETRY_FAILED="${RETRY_FAILED:-1}"
FAIL_RUNS="${FAIL_RUNS:-}"
TRAIN="${TRAIN:-$HERE/train_ex.py}"

[[ -z "$EPOCHS" || ("$EPOCHS" =~ ^[0-9]+$ && "$EPOCHS" -ge 1) ]] || die "EPOCHS must be a positive integer, got '$EPOCHS'"
for s in $SEEDS; do [[ "$s" =~ ^[0-9]+$ ]] || die "SEEDS must be non-negative integers, got '$s'"; done
for g in $RUN_GROUPS; do [[ "$g" =~ ^[1-9][0-9]*$ ]] || die "GROUPS must be numbers (the plan's groups), got '$g'"; done
[[ "$USE_WANDB" == 0 || "$USE_WANDB" == 1 ]] || die "USE_WANDB must be 0 or 1, got '$USE_WANDB'"
[[ "$RETRY_FAILED" == 0 || "$RETRY_FAILED" == 1 ]] || die "RETRY_FAILED must be 0 or 1, got '$RETRY_FAILED'"
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
[[ -f "$TRAIN" ]] || die "TRAIN: no file $TRAIN"
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON: no interpreter '$PYTHON'"
read -r -a FAIL_GLOBS <<<"$FAIL_RUNS"

# ---------------------------------------------------------------------------------------------------------------
# the runs: config.py reads the plan, applies its defaults, checks every setting's command line with train_ex.py's
# own parser (a typo must not fail every run), and prints the variables, '---', then one line per run:
# id, order, group number, group, setting, seed, role (run, tune, tuned), the ids it waits for, its flags
# ---------------------------------------------------------------------------------------------------------------
R_ID=(); R_ORDER=(); R_GROUP=(); R_GNAME=(); R_SETTING=(); R_SEED=(); R_ROLE=(); R_DEPS=(); R_FLAGS=()
declare -A INDEX_OF=()
if [[ -z "${_SERIES_TASK:-}" ]]; then
  plan_out="$("$PYTHON" "$HERE/config.py" series "$PLAN" --seeds "$SEEDS" --epochs "$EPOCHS" --dataset "$DATASET" \
              --groups "$RUN_GROUPS" --only "$ONLY" --extra "$EXTRA" $([[ "$SMOKE" == 1 ]] && echo --smoke) 2>&1)" \
    || die "plan '$PLAN': $(echo "$plan_out" | grep -v '^\s*$' | tail -n 1 | sed 's/^error: //')"
  eval "$(sed '/^---$/,$d' <<<"$plan_out")"
  while IFS=$'\t' read -r id order g gname setting seed role deps flags; do
    INDEX_OF[$id]=${#R_ID[@]}
    R_ID+=("$id"); R_ORDER+=("$order"); R_GROUP+=("$g"); R_GNAME+=("$gname"); R_SETTING+=("$setting")
    R_SEED+=("$seed"); R_ROLE+=("$role"); R_DEPS+=("$deps"); R_FLAGS+=("$flags")
  done < <(sed '1,/^---$/d' <<<"$plan_out")
  N=${#R_ID[@]}
  [[ $N -ge 1 ]] || die "no run matches ONLY='$ONLY' in groups ${RUN_GROUPS:-(all)} of plan $PLAN_NAME"
else  # a SLURM task: its own line of the submission's plan.tsv says everything; only the exit codes are needed
  codes="$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import utils
print(*sorted(utils.INTERRUPTED_CODES)); print(utils.DOES_NOT_FIT, utils.LOCKED)' "$HERE")" \
    || die "PYTHON: cannot import utils.py from $HERE"
  INTERRUPTED_CODES="$(head -n 1 <<<"$codes")"
  read -r NOFIT_CODE LOCKED_CODE <<<"$(tail -n 1 <<<"$codes")"
  PLAN_NAME=task; PLAN_DATA=""; PLAN_DATASETS=""
fi
INTERRUPTED_CODES=" $INTERRUPTED_CODES "

if [[ -z "${OUT_ROOT:-}" ]]; then
  if [[ "$PLAN_NAME" == series && "$SMOKE" == 1 ]]; then OUT_ROOT=runs/smoke-series
  elif [[ "$PLAN_NAME" == series ]]; then OUT_ROOT="runs/series-$DATASET"
  elif [[ "$SMOKE" == 1 ]]; then OUT_ROOT="runs/smoke-$PLAN_NAME"
  else OUT_ROOT="runs/$PLAN_NAME"; fi
fi
mkdir -p "$OUT_ROOT"
OUT_ROOT="$(cd "$OUT_ROOT" && pwd)"
SERIES="${SERIES:-$(basename "$OUT_ROOT")}"

# data: SMOKE on ListOps builds its own tiny generated set, a plan with "data" makes it, unless DATA is given
SMOKE_DATA=0
if [[ -z "${DATA:-}" ]]; then
  if [[ "$SMOKE" == 1 && " $PLAN_DATASETS " == *" listops-classification "* ]]; then DATA="$OUT_ROOT/data"; SMOKE_DATA=1
  elif [[ -n "$PLAN_DATA" ]]; then DATA="$OUT_ROOT/data"
  else DATA=./data; fi
fi
[[ "$SMOKE" == 1 ]] && export JAX_DISABLE_MOST_OPTIMIZATIONS="${JAX_DISABLE_MOST_OPTIMIZATIONS:-1}"  # compile time dominates a smoke run
# JAX's persistent compilation cache, one per series: the runs of one model and shape (seeds, learning rates, resumed
# starts) compile their steps once; a compiled step is the same program, so the numbers do not change
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR-$OUT_ROOT/.jax_cache}"

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

# write DIR/series_run.json: what summarize.py needs to know about a run beyond its results.json (the run: RUN_*;
# META_EXTRA: more JSON fields, e.g. a tuned run's chosen value)
write_meta() {  # dir status exit_code note command
  local tmp="$1/.series_run.json.tmp"
  cat >"$tmp" <<EOF
{"series": $(json_str "$SERIES"), "order": $RUN_ORDER, "group": $RUN_G, "group_label": $(json_str "${RUN_ID%%/*}"),
 "setting": $(json_str "$RUN_SETTING"), "seed": $RUN_SEED, "role": $(json_str "$RUN_ROLE"), "status": $(json_str "$2"),
 "exit_code": $3, "note": $(json_str "$4"), "log": "train.log", "command": $(json_str "$5")${META_EXTRA:+, $META_EXTRA}}
EOF
  mv "$tmp" "$1/series_run.json"
}

is_interrupted() { [[ "$INTERRUPTED_CODES" == *" $1 "* ]]; }

# RUN_*: run i of the series (the fields run_one and write_meta use)
select_run() {
  RUN_ID=${R_ID[$1]}; RUN_ORDER=${R_ORDER[$1]}; RUN_G=${R_GROUP[$1]}; RUN_SETTING=${R_SETTING[$1]}
  RUN_SEED=${R_SEED[$1]}; RUN_ROLE=${R_ROLE[$1]}
}

# ARGS: train_ex.py's arguments for run i of the series, without --resume (added when it is continued); its
# placeholders (@after=, @tuned=) are resolved by run_one when the run starts
build_args() {
  local i=$1 pat flags
  eval "flags=(${R_FLAGS[$i]})"
  for pat in "${FAIL_GLOBS[@]}"; do
    # shellcheck disable=SC2053
    if [[ "${R_ID[$i]}" == $pat ]]; then flags+=(--epochs 0); fi  # FAIL_RUNS test hook: rejected by train_ex.py
  done
  ARGS=(--dir_name "$DATA" "${flags[@]}" --jax_seed "${R_SEED[$i]}" --run_dir "$OUT_ROOT/${R_ID[$i]}"
        --wandb_project "$WANDB_PROJECT" --wandb_run_name "$SERIES/${R_ID[$i]}")
  [[ "$USE_WANDB" == 1 ]] && ARGS+=(--use_wandb)
  [[ "$TASKS_PER_RUN" -gt 1 && "$LAUNCHER" == slurm ]] && ARGS+=(--distributed)
  return 0
}

# Resolve ARGS' placeholders for the run starting now: @after=ID (start from run ID's ckpt_best.msgpack: it must
# have finished) and @tuned=FLAG=ID,ID,... (FLAG takes the value of the candidate run with the best validation
# score: utils.choose_tuned). Sets META_EXTRA; returns 1 with NOTE when the run cannot start.
resolve_args() {
  local out=() a id status value lines
  META_EXTRA=""; NOTE=""
  for a in "${ARGS[@]}"; do
    case "$a" in
      @after=*)
        id=${a#@after=}
        read -r status _ _ < <(run_info "$OUT_ROOT/$id")
        if [[ "$status" != finished || ! -f "$OUT_ROOT/$id/ckpt_best.msgpack" ]]; then
          NOTE="not started: the run it starts from, $OUT_ROOT/$id, is not finished (status: $status)"; return 1
        fi
        out+=(--load_checkpoint "$OUT_ROOT/$id/ckpt_best.msgpack") ;;
      @tuned=*)
        a=${a#@tuned=}
        if ! lines="$("$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import utils
from pathlib import Path
v, note = utils.choose_tuned(Path(sys.argv[2]), sys.argv[3].split(","))
print(v if v is not None else "-"); print(note); sys.exit(v is None)' "$HERE" "$OUT_ROOT" "${a#*=}" 2>&1)"; then
          NOTE="not started: $(tail -n 1 <<<"$lines")"; return 1
        fi
        value=$(head -n 1 <<<"$lines")
        out+=("${a%%=*}" "$value")
        META_EXTRA="\"tuned\": {\"flag\": $(json_str "${a%%=*}"), \"value\": $(json_str "$value"), \"candidates\": $(json_str "${a#*=}"), \"why\": $(json_str "$(tail -n 1 <<<"$lines")")}" ;;
      *) out+=("$a") ;;
    esac
  done
  ARGS=("${out[@]}")
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

# One attempt at one run: TAG [launcher words...], the run RUN_* (select_run), ARGS set by build_args. Prints a line
# as it starts and one as it ends (the run's own output goes to its train.log), writes series_run.json. Sets
# OUTCOME (trained, stopped, skipped, failed, interrupted, nofit, elsewhere: another process holds the run
# directory, nothing touched), RC (train_ex.py's exit code) and CMD (its command). The run directory's lock is
# taken first (waiting up to LOCK_WAIT_NOW, else LOCK_WAIT seconds) and held until the shell exits.
run_one() {
  local tag=$1
  local launch=("${@:2}")
  local id=$RUN_ID
  local dir="$OUT_ROOT/$id" status bval btest
  local head="$tag ${id%%/*} $RUN_SETTING seed $RUN_SEED → $dir"
  mkdir -p "$dir"
  RC=0; META_EXTRA=""
  if ! lock_run "$dir" "${LOCK_WAIT_NOW:-$LOCK_WAIT}"; then
    echo "$head: running elsewhere (held by $HOLDER), skipped"; OUTCOME=elsewhere; return 0
  fi
  read -r status _ _ < <(run_info "$dir")
  if [[ "$status" == finished ]]; then
    grep -q '"status": "finished"' "$dir/series_run.json" 2>/dev/null \
      || write_meta "$dir" finished null "" ""
    echo "$head: finished, skipped"; OUTCOME=skipped; return 0
  fi
  if [[ "$status" == failed && "$RETRY_FAILED" == 0 ]]; then
    echo "$head: failed before, left failed (RETRY_FAILED=0)"; OUTCOME=failed; return 0
  fi
  if ! resolve_args; then  # what it starts from has not finished
    write_meta "$dir" failed null "$NOTE" ""
    echo "$head: FAILED, $NOTE"; OUTCOME=failed; return 0
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
  write_meta "$dir" running null "" "$cmd"
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') attempt ($mode): $cmd" >>"$dir/train.log"
  local t0=$SECONDS
  WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$SERIES}" WANDB_JOB_TYPE="${id%%/*}" RUN_LOCK_TOKEN="$LOCK_TOKEN" \
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
    write_meta "$dir" interrupted "$RC" "stopped by a signal (exit $RC)" "$cmd"
    echo "$tag $id: interrupted (exit $RC) after ${dt}s; run this script again to continue (--resume)" >&2
    OUTCOME=interrupted
  elif [[ $RC == 0 && "$status" == finished ]]; then
    write_meta "$dir" finished 0 "" "$cmd"
    echo "$tag $id: finished in ${dt}s: best val $bval, test at best val $btest"; OUTCOME=trained
  elif [[ $RC == "$NOFIT_CODE" ]]; then  # XLA's estimate exceeds the device's memory: not a crash
    local msg
    msg="$(grep -a 'does not fit' "$dir/train.log" | tail -n 1 | cut -c 1-600)"
    write_meta "$dir" "does not fit" "$RC" "${msg//|//}" "$cmd"
    echo "$tag $id: DOES NOT FIT in memory (exit $RC) after ${dt}s; log: $dir/train.log"
    echo "      | $msg"
    OUTCOME=nofit
  elif [[ $RC == "$LOCKED_CODE" ]]; then  # another process took the directory (a file system without locks?)
    write_meta "$dir" "running elsewhere" "$RC" "$(tail -n 1 "$dir/train.log")" "$cmd"
    echo "$tag $id: running elsewhere (exit $RC), skipped"; OUTCOME=elsewhere
  elif [[ $RC == 0 ]]; then  # e.g. --max_steps in EXTRA: stopped resumably
    write_meta "$dir" "${status/none/interrupted}" 0 "stopped before the last epoch" "$cmd"
    echo "$tag $id: stopped after ${dt}s with status '$status' (resumed on the next invocation)"; OUTCOME=stopped
  else
    local last
    last="$(tr '\r' '\n' <"$dir/train.log" | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c 1-200)"
    write_meta "$dir" failed "$RC" "exit code $RC: ${last//|//}" "$cmd"
    { echo "$tag $id: FAILED (exit code $RC) after ${dt}s; log: $dir/train.log"
      tr '\r' '\n' <"$dir/train.log" | grep -v '^[[:space:]]*$' | tail -n 3 | sed 's/^/      | /'; }
    OUTCOME=failed
  fi
  return 0
}

# the indices of the runs of this invocation that run i waits for (its base run, its tuning runs)
deps_of() {
  local d
  [[ "${R_DEPS[$1]}" == - ]] && return 0
  for d in ${R_DEPS[$1]//,/ }; do [[ -n "${INDEX_OF[$d]:-}" ]] && echo "${INDEX_OF[$d]}"; done
  return 0
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
SLURM_PLAN="${_SERIES_PLAN:-$OUT_ROOT/slurm/plan.tsv}"
JOBS="$OUT_ROOT/slurm/jobs.tsv"  # every submitted array: job id, array (main/warm), its plan

slurm_task() {
  local line words
  line="$(awk -F'\t' -v a="$_SERIES_TASK" -v t="${SLURM_ARRAY_TASK_ID:-}" '$1 == a && $2 == t' "$SLURM_PLAN")"
  [[ -n "$line" ]] || { echo "run_train_ex.sh: error: no line for array '$_SERIES_TASK' task ${SLURM_ARRAY_TASK_ID:-?} in $SLURM_PLAN" >&2; exit 2; }
  IFS=$'\t' read -r _ _ RUN_ID RUN_ORDER RUN_G RUN_SETTING RUN_SEED RUN_ROLE words <<<"$line"
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
  run_one "[slurm $task, start $((restarts + 1))]" "${launch[@]}"
  if [[ "$OUTCOME" == interrupted ]]; then
    local dir="$OUT_ROOT/$RUN_ID" cmd="$CMD"
    if [[ "$restarts" -lt "$MAX_REQUEUES" ]]; then
      write_meta "$dir" interrupted "$RC" \
        "stopped by a signal (exit $RC); SLURM task $task requeued ($((restarts + 1)) of at most $MAX_REQUEUES)" "$cmd"
      echo "requeueing $task ($((restarts + 1)) of at most $MAX_REQUEUES)"
      scontrol requeue "$task" || echo "(scontrol requeue $task failed: already requeued by SLURM?)"
    else
      write_meta "$dir" interrupted "$RC" \
        "stopped by a signal (exit $RC); not requeued: requeued $restarts times already (MAX_REQUEUES)" "$cmd"
      echo "not requeueing $task: requeued $restarts times already (MAX_REQUEUES=$MAX_REQUEUES)"
    fi
  fi
  exit 0  # the run's own outcome is in its series_run.json: a run that starts from it checks it
}

slurm_summary() {
  local words dir
  while IFS=$'\t' read -r _ _ RUN_ID RUN_ORDER RUN_G RUN_SETTING RUN_SEED RUN_ROLE words; do
    dir="$OUT_ROOT/$RUN_ID"
    if [[ ! -f "$dir/results.json" && ! -f "$dir/series_run.json" ]]; then
      mkdir -p "$dir"; META_EXTRA=""
      write_meta "$dir" failed null "never started: its SLURM task was cancelled" ""
    fi
  done <"$SLURM_PLAN"
  summarize_and_print
  date '+%Y-%m-%d %H:%M:%S' >"$OUT_ROOT/slurm/summary.done"
  exit 0
}

case "${_SERIES_TASK:-}" in
  "") ;;
  main|warm|tuned) slurm_task ;;
  summary) slurm_summary ;;
  *) die "_SERIES_TASK must be main, warm, tuned or summary (set by the series' own sbatch), got '$_SERIES_TASK'" ;;
esac

# ---------------------------------------------------------------------------------------------------------------
# data for SMOKE and for a plan that names some (data | split-mnist)
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
# psMNIST for a plan with "data | split-mnist": disjoint train/test splits made once from MNIST_SOURCE's test
# images, unless DATA has MNIST
if [[ " $PLAN_DATA " == *" split-mnist "* && " $PLAN_DATASETS " == *mnist* ]] \
    && ! compgen -G "$DATA/MNIST/raw/train-images-idx3-ubyte*" >/dev/null; then
  MNIST_SOURCE="${MNIST_SOURCE:-$HERE/../shared/data/mnist}"
  echo "$PLAN_NAME: making $DATA/MNIST from $MNIST_SOURCE (8,000 training and 2,000 test images)"
  "$PYTHON" "$HERE/dataloaders.py" split-mnist --source "$MNIST_SOURCE" --out "$DATA" --n_test 2000 \
    >"$OUT_ROOT/split_mnist.log" 2>&1 || die "could not make the psMNIST data: $(tail -n 1 "$OUT_ROOT/split_mnist.log")"
fi
exec {DATA_LOCK}>&-

echo "series '$SERIES' (plan $PLAN_NAME): $N runs (groups ${RUN_GROUPS:-all}; seeds $SEEDS; ${DATASET:-the datasets of the groups}, ${EPOCHS:-per-plan} epochs) → $OUT_ROOT"
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
  plan="" n_main=0; n_tuned=0; warm_ids=()
  for ((i = 0; i < N; i++)); do
    id=${R_ID[$i]}
    read -r status _ _ < <(run_info "$OUT_ROOT/$id")
    if [[ "$status" == finished ]]; then echo "[$((i + 1))/$N] $id: finished, skipped"; continue; fi
    if [[ -n "${QUEUED[$id]:-}" ]]; then
      echo "[$((i + 1))/$N] $id: still in SLURM (task ${QUEUED[$id]}), not submitted again"; continue
    fi
    if [[ "$status" == failed && "$RETRY_FAILED" == 0 ]]; then
      echo "[$((i + 1))/$N] $id: failed before, left failed (RETRY_FAILED=0)"; continue
    fi
    waits=""; in_main=()
    if [[ "${R_DEPS[$i]}" != - ]]; then
      for d in ${R_DEPS[$i]//,/ }; do
        [[ -n "${QUEUED[$d]:-}" ]] && waits=$d
        b=${INDEX_OF[$d]:-}; [[ -n "$b" && -n "${TASK_OF[$b]:-}" ]] && in_main+=("$b")
      done
    fi
    if [[ -n "$waits" ]]; then
      echo "[$((i + 1))/$N] $id: not submitted: it starts from $waits, still in SLURM (task ${QUEUED[$waits]}); run this again after it"
      continue
    fi
    build_args "$i"
    if [[ ${#in_main[@]} -gt 0 && "${R_ROLE[$i]}" == tuned ]]; then  # its tuning runs are in this submission
      array=tuned; task=$n_tuned; n_tuned=$((n_tuned + 1))
    elif [[ ${#in_main[@]} -gt 0 ]]; then  # the run it starts from is in this submission: the same task id, later
      array=warm; task=${TASK_OF[${in_main[0]}]}; warm_ids+=("$task")
    else
      array=main; task=$n_main; n_main=$((n_main + 1)); TASK_OF[$i]=$task
    fi
    plan+="$array"$'\t'"$task"$'\t'"$id"$'\t'"${R_ORDER[$i]}"$'\t'"${R_GROUP[$i]}"$'\t'"${R_SETTING[$i]}"$'\t'"${R_SEED[$i]}"$'\t'"${R_ROLE[$i]}"$'\t'"$(printf '%q ' "${ARGS[@]}")"$'\n'
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
  WARM_JOB=""; TUNED_JOB=""
  SUB="$(date +%Y%m%d-%H%M%S)-$$"  # this submission: its own plan and task script, read by its tasks
  SLURM_PLAN="$OUT_ROOT/slurm/plan.$SUB.tsv"
  printf '%s' "$plan" >"$SLURM_PLAN"
  cp "$SLURM_PLAN" "$OUT_ROOT/slurm/plan.tsv.tmp" && mv "$OUT_ROOT/slurm/plan.tsv.tmp" "$OUT_ROOT/slurm/plan.tsv"
  cat >"$OUT_ROOT/slurm/task.$SUB.sh" <<EOF
#!/usr/bin/env bash
# A task of the series in $OUT_ROOT (run_train_ex.sh --help): its line of plan.tsv, requeued when interrupted.
$(for v in OUT_ROOT PYTHON TRAIN SERIES MAX_REQUEUES TASKS_PER_RUN RETRY_FAILED USE_WANDB LAUNCHER; do printf 'export %s=%q\n' "$v" "${!v}"; done)
export LOCK_WAIT=$(printf '%q' "$LOCK_WAIT_GIVEN")
export _SERIES_PLAN=$(printf '%q' "$SLURM_PLAN")
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
  printf '%s\tmain\t%s\n' "$MAIN_JOB" "$SLURM_PLAN" >>"$JOBS"
  if [[ ${#warm_ids[@]} -gt 0 ]]; then
    WARM_JOB=$(IFS=,; submit "${common[@]}" --job-name="$SERIES-warm" --output="$log_of" \
               --export="ALL,_SERIES_TASK=warm" --dependency="aftercorr:$MAIN_JOB" \
               --array="${warm_ids[*]}${MAX_PARALLEL:+%$MAX_PARALLEL}") || exit 2
    SUBMITTED+=("$WARM_JOB"); after+=":$WARM_JOB"
    printf '%s\twarm\t%s\n' "$WARM_JOB" "$SLURM_PLAN" >>"$JOBS"
  fi
  if [[ $n_tuned -gt 0 ]]; then  # after every tuning run of the first array (each task chooses its value as it starts)
    TUNED_JOB=$(submit "${common[@]}" --job-name="$SERIES-tuned" --output="$log_of" \
                --export="ALL,_SERIES_TASK=tuned" --dependency="afterany:$MAIN_JOB" \
                --array="0-$((n_tuned - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}") || exit 2
    SUBMITTED+=("$TUNED_JOB"); after+=":$TUNED_JOB"
    printf '%s\ttuned\t%s\n' "$TUNED_JOB" "$SLURM_PLAN" >>"$JOBS"
  fi
  SUM_JOB=$(submit --parsable "${SLURM_ARG_LIST[@]}" --ntasks=1 --job-name="$SERIES-summary" \
            --output="$OUT_ROOT/slurm/summary_%j.out" --export="ALL,_SERIES_TASK=summary" --dependency="$after") \
    || exit 2
  echo "submitted: job array $MAIN_JOB ($n_main run(s))${WARM_JOB:+, warm-start array $WARM_JOB (${#warm_ids[@]}, each after its base run)}${TUNED_JOB:+, tuned array $TUNED_JOB ($n_tuned, after the tuning runs of the first)}, summary job $SUM_JOB (after them)"
  echo "follow:    squeue -j $MAIN_JOB${WARM_JOB:+,$WARM_JOB}${TUNED_JOB:+,$TUNED_JOB},$SUM_JOB   |   sacct -j $MAIN_JOB   |   tail -f $OUT_ROOT/<run>/train.log"
  echo "task logs: $OUT_ROOT/slurm/<job>_<task>.out; the plan: $SLURM_PLAN; summary: $OUT_ROOT/summary.md when job $SUM_JOB ends"
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

next_ready() {  # the first pending run whose dependencies (its base run, its tuning runs) have all ended
  local i b ready
  for ((i = 0; i < N; i++)); do
    [[ "${STATE[$i]}" == pending ]] || continue
    ready=1
    for b in $(deps_of "$i"); do [[ "${STATE[$b]}" == done ]] || ready=0; done
    [[ $ready == 1 ]] || continue
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
    select_run "$i"
    run_one "[$((i + 1))/$N]"
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
