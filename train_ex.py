"""Train S5 and its time-varying extensions on the LRA tasks and sequential MNIST/CIFAR.

    python train_ex.py --enable_auxiliary_state --time_scale_type sinusoidal
    python train_ex.py --dataset listops-classification --ssm_type extend --R 10 --extend_mode full

The options and their checks are in config.py, the model, optimiser and step functions in models.py, the run
directory's files in utils.py. This script puts them together: the devices and processes (Runtime), the data,
the jit-compiled steps, the epoch loop, checkpoints, results.json, wandb and the console.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import serialization
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import dataloaders
import models
import tasks
import utils
from config import parse_args
from models import load_weights, make_optimizer, make_steps, new_state
from utils import RunError

# --------------------------------------------------------------------------------------------------
# Runtime: processes, devices, shardings
# --------------------------------------------------------------------------------------------------

class Runtime:
    """This process's place in the run: the device mesh over every process's devices, the data and replicated
    shardings, and the few host-side agreements every process must reach together."""

    def __init__(self, cfg):
        if cfg.distributed:
            try:  # CPU hosts exchange collectives over gloo; a no-op on GPU, absent from some JAX releases
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            except (AttributeError, ValueError):
                pass
            kw = {}
            problem = None if cfg.coordinator else utils.slurm_env_problem()
            if problem:
                raise utils.RunError(problem, 2)
            if cfg.coordinator:
                kw = dict(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                          process_id=cfg.process_id)
            jax.distributed.initialize(**kw)  # under SLURM / Open MPI it finds its peers itself
        self.devices = jax.devices()
        self.index, self.count = jax.process_index(), jax.process_count()
        if cfg.bsz % len(self.devices):
            raise utils.RunError(f"--bsz {cfg.bsz} must be divisible by the {len(self.devices)} devices "
                           f"({self.count} process(es))", 2)
        mesh = Mesh(np.array(self.devices), ("batch",))
        self.data_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(mesh, PartitionSpec())

    @property
    def main(self) -> bool:
        """Process 0 alone writes checkpoints, results.json, wandb and the console summary."""
        return self.index == 0

    @property
    def shard(self):
        return (self.index, self.count)

    def global_batch(self, local):
        """This process's rows of a global batch → one global array per leaf (no collective)."""
        return {k: jax.make_array_from_process_local_data(self.data_sharding, v) for k, v in local.items()}

    def agree(self, flags):
        """The element-wise maximum of `flags` (small ints) over every process: decisions all processes share."""
        flags = np.asarray(flags, np.int32)
        if self.count == 1:
            return flags
        return np.asarray(multihost_utils.process_allgather(flags)).max(axis=0)

    def barrier(self, name):
        if self.count > 1:
            multihost_utils.sync_global_devices(name)

    def host(self, x):
        """A replicated array's value on this host."""
        return np.asarray(x.addressable_data(0))

    def describe(self):
        d = self.devices[0]
        return f"{len(self.devices)}× {d.device_kind}" + (f" on {self.count} processes" if self.count > 1 else "")


# --------------------------------------------------------------------------------------------------
# Checkpoints and reports (process 0 writes; every process reads)
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Checkpoints and reports (process 0 writes; every process reads)
# --------------------------------------------------------------------------------------------------


class Checkpoints:
    """ckpt_{latest,best}.msgpack and their .json (utils.save_checkpoint), written by process 0 alone."""

    def __init__(self, run_dir: Path, rt: Runtime, config: dict):
        self.dir, self.rt, self.config = run_dir, rt, config

    def save(self, kind, state, progress):
        if self.rt.main:
            utils.save_checkpoint(self.dir, kind, jax.tree_util.tree_map(self.rt.host, state), self.config, progress)

    def restore(self, cfg, state):
        """(state, progress) from the newest readable checkpoint (ckpt_latest, else the one before it, else
        ckpt_best), saying which when it is not ckpt_latest and why; a RunError when none can be read or the
        architecture differs."""
        found, problems = utils.newest_checkpoint(self.dir)
        latest = utils.checkpoint_path(self.dir, "latest")
        if found is None and not problems:
            raise RunError(f"--resume: no checkpoint at {latest} (a run that never saved one starts without "
                           f"--resume)", 2)
        why = "".join(f"\n  {path.name}: {reason}" for path, reason in problems)
        if found is None:
            raise RunError(f"--resume: no checkpoint of {self.dir} can be read:{why}\n  start the run again "
                           f"without --resume, or copy intact ckpt_latest.msgpack and .json files into {self.dir}", 2)
        path, saved, raw = found
        if path != latest and self.rt.main:
            print(f"--resume: using {path.name} (step {saved['progress']['step']}), the newest checkpoint that can "
                  f"be read{why or ' (ckpt_latest is missing)'}", flush=True)
        models.check_architecture(saved["config"], cfg)
        return serialization.from_state_dict(state, raw), saved["progress"]


class Report:
    """results.json, wandb and the console, all from process 0."""

    def __init__(self, cfg, rt: Runtime, run_dir: Path, config: dict, ds, n_params: int):
        self.cfg, self.rt, self.dir, self.config, self.ds, self.n_params = cfg, rt, run_dir, config, ds, n_params
        self.wandb = start_wandb(cfg, config, run_dir) if rt.main else None

    def say(self, text):
        if self.rt.main:
            print(text, flush=True)

    def results(self, progress, status, error=None) -> bool:
        """Write results.json (process 0). → False when it could not be written (said on stderr)."""
        if not self.rt.main:
            return True
        best = progress["best"] or {}
        F = utils.BEST_FIELDS
        results = {
            "config": self.config, "epochs": progress["history"],
            "best": {k: best[k] for k in F if k in best} if best else {k: None for k in F[:3]},
            "wall_time_s": progress["wall_time_s"],
            "steps_per_s": progress["step"] / max(progress["wall_time_s"], 1e-9),
            "n_params": self.n_params, "device": self.rt.describe(), "data": self.ds.provenance(), "status": status,
            **self.ds.reference}  # e.g. lti_floor: what the best time-invariant filter scores on this task
        if error:
            results["error"] = error
        try:
            utils.write_json(self.dir / "results.json", results)
        except utils.WriteError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return False
        return True

    def epoch(self, row, progress):
        if self.wandb:  # per-layer lists (the guard's activity) as one scalar per layer
            flat = {k: v for k, v in row.items() if not isinstance(v, list)}
            flat.update({f"{k}/layer{i}": x for k, v in row.items() if isinstance(v, list) for i, x in enumerate(v)})
            self.wandb.log(flat, step=row["epoch"])
        best = progress["best"]
        guard = (f" | guard scaled {np.mean(row['guard_scaled']):.0%} of rows, median scale "
                 f"{np.median(row['guard_median_scale']):.3g}" if "guard_scaled" in row else "")
        if "val_bpd" in row:  # next-step prediction: nats per value and bits per dimension
            self.say(f"epoch {row['epoch']:3d} | train {row['train_loss']:.4f} nats {row['train_bpd']:.4f} bits/dim | "
                     f"val {row['val_loss']:.4f} nats {row['val_bpd']:.4f} bits/dim | test {row['test_bpd']:.4f} "
                     f"bits/dim | best val {best['val_bpd']:.4f} bits/dim (test {best['test_bpd']:.4f}) | "
                     f"{row['seconds']:.1f}s, {row['steps_per_s']:.1f} steps/s")
            return
        rates = "".join(f" | @{k}: val {row[f'val_acc@{k}']:.4f} test {row[f'test_acc@{k}']:.4f}"
                        for k in self.cfg.resolutions[1:])
        self.say(f"epoch {row['epoch']:3d} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | val loss "
                 f"{row['val_loss']:.4f} acc {row['val_acc']:.4f} | test acc {row['test_acc']:.4f}{rates} | best val "
                 f"{best['val_acc']:.4f} (test {best['test_acc']:.4f}){guard} | {row['seconds']:.1f}s, "
                 f"{row['steps_per_s']:.1f} steps/s")

    def image(self, path, epoch, caption):
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Image(str(path), caption=caption)}, step=epoch)

    def close(self):
        if self.wandb:
            self.wandb.finish()


def start_wandb(cfg, config, run_dir):
    """A wandb run (offline unless --use_wandb; WANDB_MODE wins), or None: logging must never cost a run. Its id
    is kept in the run directory (utils.WANDB_ID_FILE): a resumed or requeued run continues the same wandb run."""
    mode = utils.wandb_mode(cfg.use_wandb)
    if mode is None:
        return None
    try:
        import wandb  # imported only when used: it is slow to import and optional on GPU images

        id_file = Path(run_dir) / utils.WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = secrets.token_hex(8)  # wandb's id alphabet: lower-case letters and digits
            utils.atomic_write(id_file, run_id + "\n")
        return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name, config=config,
                          dir=str(run_dir), mode=mode, id=run_id, resume="allow")
    except Exception as e:
        print(f"warning: wandb logging is off ({e})", file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------------
# The run: data, state, the step loop, evaluation
# --------------------------------------------------------------------------------------------------


class StopSignals:
    """SIGINT, SIGTERM (what SLURM and Kubernetes send before a kill) and SIGUSR1 (SLURM's --signal=USR1@SECS
    before a time limit) only set a flag; the step loop saves and stops at the next agreed point, and the run
    exits with the signal's code of utils.SIGNAL_EXIT_CODES."""

    NAMES = tuple(utils.SIGNAL_EXIT_CODES)  # agreed between processes by index (0: none)

    def __enter__(self):
        self.caught = None
        self.previous = {s: signal.signal(s, self._handle) for s in (getattr(signal, n) for n in self.NAMES)}
        return self

    def _handle(self, signum, frame):
        self.caught = self.caught or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def load_data(cfg):
    """(dataset, train, val, test) for a config: splits drawn with --split_seed, subsets by --max_*_samples."""
    try:
        opts = {"downsample": cfg.downsample} if "mnist" in cfg.dataset else {}
        if cfg.dataset in tasks.TASKS:  # a diagnostic's --data_options (config.py checked them)
            opts = dataloaders.parse_options(cfg.dataset, cfg.data_options)
        ds = dataloaders.load(cfg.dataset, cfg.dir_name, seed=cfg.split_seed, speech_norm=cfg.speech_norm, **opts)
    except dataloaders.DataError as e:
        raise RunError(str(e), 2) from None
    train, val, test = ds.train, ds.val, ds.test
    if cfg.max_train_samples:
        train = train.subset(np.arange(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples:
        val = val.subset(np.arange(min(cfg.max_eval_samples, len(val))))
        test = test.subset(np.arange(min(cfg.max_eval_samples, len(test))))
    return ds, train, val, test


def build_state(cfg, rt, model, tx, first_batch, run_dir, ckpts):
    """(state on the devices, progress, n_params): fresh, warm-started or resumed; `tx` is the optimiser (built
    from the parameters' shapes), `first_batch` the first batch of this process's rows (only its shapes count)."""
    variables, _ = models.init_variables(cfg, model, first_batch)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if cfg.load_checkpoint and not cfg.resume:
        params, batch_stats = load_weights(cfg.load_checkpoint, cfg, params, batch_stats)
    state = new_state(params, batch_stats, tx)
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": [], "best": None, "wall_time_s": 0.0}
    if cfg.resume:
        state, progress = ckpts.restore(cfg, state)
        if rt.main:
            print(f"resuming {run_dir} at epoch {progress['epoch'] + 1}, batch {progress['batch']}")
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
    return jax.device_put(state, rt.replicated), progress, n_params


def check_memory(cfg, rt, model, tx, train_step, first_batch):
    """Before the first step: XLA's estimate of one training step at full length (models.memory_estimate of
    `train_step` lowered on abstract shapes: nothing is allocated, and the compiled step is the one training then
    runs) against the free memory of this process's devices (utils.device_memory_available). A RunError (exit
    utils.DOES_NOT_FIT) when it does not fit on some process, with the largest --bsz that would, from the
    estimate at a second batch size (linear in the batch). A device that reports no memory is not checked."""
    free = [utils.device_memory_available(d) for d in jax.local_devices()]
    known = [f for f in free if f[0] is not None]
    available, source = min(known) if known else (None, free[0][1])
    n_dev = len(rt.devices)
    shared = len(jax.local_devices()) if rt.devices[0].platform == "cpu" else 1  # CPU devices share the RAM

    def estimate(bsz):
        batch = models.abstract_batch(first_batch, bsz, rt.data_sharding)
        state = models.abstract_state(model, batch, tx, rt.replicated)
        est = models.memory_estimate(train_step.lower(state, batch, 0).compile())
        return dict(est, need=est["total"] * shared)

    est = estimate(cfg.bsz)
    fits = available is None or est["need"] <= available
    (misfit,) = rt.agree([not fits])
    if available is None and rt.main:
        print(f"memory check skipped: {source} (XLA's estimate of a training step: {utils.gigabytes(est['total'])} "
              f"per device)", flush=True)
    if not misfit:
        return est
    if fits:
        raise RunError("does not fit: another process's devices have too little free memory for a training step "
                       "(its message says how much); lower --bsz, or skip the check with --no-check_memory",
                       utils.DOES_NOT_FIT)
    b2 = cfg.bsz // 2 // n_dev * n_dev
    b2 = b2 if b2 >= n_dev else 2 * cfg.bsz
    est2 = estimate(b2)
    best = models.largest_fitting_batch([(cfg.bsz, est["need"]), (b2, est2["need"])], available, n_dev)
    G = utils.gigabytes
    where = f"the {rt.devices[0].platform.upper()} ({source})"
    line = f"from XLA's estimates at --bsz {cfg.bsz} and {b2} ({G(est2['need'])}), linear in the batch"
    advice = (f"the largest --bsz that fits is about {best} ({line}): run with --bsz {best} or less"
              if best is not None else
              f"no --bsz fits ({line}): the model itself is too large; lower --d_model, --ssm_size_base or "
              f"--n_layers")
    times = f", × {shared} CPU devices sharing the machine's memory: {G(est['need'])}" if shared > 1 else ""
    raise RunError(f"does not fit: XLA estimates {G(est['total'])} per device for one training step at --bsz "
                   f"{cfg.bsz}{times} (arguments {G(est['argument'])}: parameters, optimiser state, batch; temporaries "
                   f"{G(est['temp'])}), but {where} has {G(available)} free. Nothing was trained; {advice} "
                   f"(or skip this check with --no-check_memory)", utils.DOES_NOT_FIT)


@dataclass
class Loop:
    """What the epoch loop works with, built once per run by `setup`."""

    cfg: argparse.Namespace
    rt: Runtime
    splits: tuple  # (train, val, test)
    buckets: tuple | None  # the padded lengths of length buckets, or None
    steps_per_epoch: int
    train_step: Callable  # jit-compiled (state, batch, step) → state
    eval_steps: dict  # rate k → jit-compiled eval_step of the model with steps × k
    ckpts: Checkpoints
    next_step: bool  # next-step prediction (best epoch by loss, bits/dim) or classification
    guard_activity: Callable | None  # params → (n_layers, 2): what the stability guard did (models.guard_activity)

    def evaluate(self, state, split, k=1):
        """(loss, accuracy) over a split at rate k; every process runs the same batches of the same shapes."""
        if len(split) == 0:
            return float("nan"), float("nan")
        total = None
        for b in dataloaders.prefetch(split.batches(self.cfg.bsz, buckets=self.buckets, shard=self.rt.shard)):
            out = self.eval_steps[k](state, self.rt.global_batch(decimate(b, k)))
            total = out if total is None else total + out
        loss_sum, correct, n = self.rt.host(total)
        return float(loss_sum / n), float(correct / n)


def decimate(batch, k):
    """Every k-th sample of a batch (x[::k]); lengths in the coarser steps."""
    if k == 1:
        return batch
    out = dict(batch, inputs=batch["inputs"][:, ::k], lengths=-(-batch["lengths"] // k))
    if "inputs2" in batch:
        out.update(inputs2=batch["inputs2"][:, ::k], lengths2=-(-batch["lengths2"] // k))
    return out


def prepare_run_dir(cfg, rt) -> tuple[Path, utils.RunLock | None]:
    """(the run directory, process 0's lock on it): --run_dir, or a new folder under runs/. Process 0 first takes
    the directory's lock (utils.RunLock: a directory another process writes is a RunError, exit 6, before any
    file is touched; --lock_wait), then proves it writable, before any data is read or anything compiled: a
    RunError (exit 2) when it cannot be."""
    if not rt.main:
        return Path(cfg.run_dir), None
    run_dir = Path(cfg.run_dir) if cfg.run_dir is not None else utils.new_run_dir(utils.check_writable("runs"),
                                                                                  cfg.dataset)
    wait = utils.default_lock_wait() if cfg.lock_wait is None else cfg.lock_wait
    lock = utils.RunLock(run_dir, wait, os.environ.get(utils.LOCK_TOKEN_VAR))
    try:
        utils.check_writable(run_dir)
    except RunError:
        lock.release()
        raise
    return run_dir, lock


def saved_model_meta(run_dir):
    """The model_meta of a run directory's newest checkpoint metadata that can be read, or None."""
    for kind in ("latest", "latest.prev", "best"):
        try:
            return utils.read_json(utils.checkpoint_path(run_dir, kind).with_suffix(".json"))["config"]["model_meta"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def setup(cfg, rt, run_dir):
    """(Loop, model, state, progress, dataset, n_params, config) for a run: the data (process 0 builds any cache
    first, so processes sharing a disk never write it together), the model, its state, the steps."""
    if rt.main:
        ds, train, val, test = load_data(cfg)
    rt.barrier("data")
    if not rt.main:
        ds, train, val, test = load_data(cfg)
    buckets = tuple(ds.seq_len * k // 4 for k in (1, 2, 3)) if (cfg.buckets and ds.padded) else None
    steps_per_epoch = train.num_batches(cfg.bsz, drop_last=True, buckets=buckets)
    if steps_per_epoch == 0:
        raise RunError(f"{len(train)} training samples make no full batch of {cfg.bsz}: lower --bsz", 2)
    meta = dict(n_classes=ds.n_classes, seq_len=ds.seq_len, in_dim=ds.in_dim, tokens=ds.tokens, pair=ds.pair,
                task=ds.task, onehot_width=ds.onehot_width)
    saved = saved_model_meta(run_dir) if cfg.resume else None
    if saved is not None and "onehot_width" not in saved:  # a run that began with one-hot width = vocabulary
        meta["onehot_width"] = ds.in_dim
    model = models.build_model(cfg, meta)
    config = dict(vars(cfg), model_meta=meta)  # model_meta: what rebuilds the model without the data
    ckpts = Checkpoints(run_dir, rt, config)
    first = next(train.batches(cfg.bsz, shard=rt.shard))  # this process's rows; its shapes build the model
    init_key, dropout_key = models.init_keys(cfg)
    params = jax.eval_shape(lambda b: model.init({"params": init_key, "dropout": init_key}, b, training=False),
                            models.abstract_batch(first, cfg.bsz))["params"]  # shapes only: nothing allocated
    tx, _ = make_optimizer(params, cfg, steps_per_epoch, frozen=cfg.freeze == "base")
    train_step, eval_step = make_steps(model, tx, dropout_key, ds.task)
    train_step = jax.jit(train_step, donate_argnums=(0,), out_shardings=rt.replicated)
    if cfg.check_memory and not cfg.eval_only:  # compiled here on shapes; training reuses the compiled step
        check_memory(cfg, rt, model, tx, train_step, first)
    state, progress, n_params = build_state(cfg, rt, model, tx, first, run_dir, ckpts)
    eval_steps = {1: jax.jit(eval_step, out_shardings=rt.replicated)}
    for k in cfg.resolutions[1:]:  # the same parameters, every step × k (see ssm_ex.py for the extensions)
        model_k = models.build_model(argparse.Namespace(**{**vars(cfg), "step_rescale": float(k)}), meta)
        eval_steps[k] = jax.jit(make_steps(model_k, tx, dropout_key, ds.task)[1], out_shardings=rt.replicated)
    loop = Loop(cfg, rt, (train, val, test), buckets, steps_per_epoch, train_step, eval_steps, ckpts,
                ds.task == "next_step", models.guard_activity(model, ds.seq_len))
    return loop, model, state, progress, ds, n_params, config


def run(cfg):
    rt = Runtime(cfg)
    run_dir, lock = prepare_run_dir(cfg, rt)
    try:
        return run_locked(cfg, rt, run_dir)
    finally:
        if lock is not None:
            lock.release()


def run_locked(cfg, rt, run_dir):
    loop, model, state, progress, ds, n_params, config = setup(cfg, rt, run_dir)
    val, test = loop.splits[1:]
    if cfg.eval_only:
        (val_loss, val_acc), (test_loss, test_acc) = loop.evaluate(state, val), loop.evaluate(state, test)
        if rt.main:
            bpd = (lambda x: f" ({x / np.log(2.0):.4f} bits/dim)") if loop.next_step else (lambda x: "")
            print(f"eval: val loss {val_loss:.4f}{bpd(val_loss)} acc {val_acc:.4f} | test loss {test_loss:.4f}"
                  f"{bpd(test_loss)} acc {test_acc:.4f}")
        return 0
    after_epoch = sampler(cfg, rt, model, test, ds.seq_len, run_dir)
    report = Report(cfg, rt, run_dir, config, ds, n_params)
    report.say(f"{cfg.dataset} ({ds.source}): train {len(loop.splits[0]):,} val {len(val):,} test {len(test):,} | "
               f"{cfg.ssm_type} model, {n_params:,} parameters | {rt.describe()} | run {run_dir}")
    status = "finished"
    with StopSignals() as signals:
        if rt.count > 1:  # after the handlers are in place: from here a SIGTERM saves and stops
            print(f"process {rt.index} of {rt.count}: {jax.local_device_count()} local device(s), training",
                  flush=True)
        error = None
        try:
            state, status, code = train_epochs(loop, state, progress, report, signals, after_epoch)
        except Exception as e:
            status, error = "failed", str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            written = report.results(progress, status, error)
            report.close()
    return code if written else utils.WriteError.code  # results.json could not be written


def train_epochs(loop: Loop, state, progress, report, signals, after_epoch=None):
    """The remaining epochs. → (state, status, exit code). `after_epoch(state, epoch, report)` runs after each
    epoch's checkpoint and report (the samples of --sample_every)."""
    cfg = loop.cfg
    epochs_since_best = 0
    while progress["epoch"] < cfg.epochs:
        t0 = time.perf_counter()
        state, stopped_by = train_one_epoch(loop, state, progress, signals, t0)
        if stopped_by is not None:
            return state, "interrupted", utils.SIGNAL_EXIT_CODES.get(stopped_by, 0)
        state, row, improved = end_epoch(loop, state, progress, t0)
        epochs_since_best = 0 if improved else epochs_since_best + 1
        report.results(progress, "running")
        report.epoch(row, progress)
        if after_epoch is not None:
            after_epoch(state, row["epoch"], report)
        if cfg.early_stop_patience and epochs_since_best >= cfg.early_stop_patience:
            report.say(f"early stop: no better validation {'loss' if loop.next_step else 'accuracy'} for "
                       f"{epochs_since_best} epochs")
            break
    return state, "finished", 0


def train_one_epoch(loop: Loop, state, progress, signals, t0):
    """The steps of the current epoch from progress["batch"] on. → (state, None), or (state, what stopped it:
    a signal's name of StopSignals.NAMES or "max_steps") after saving ckpt_latest.

    Every --log_every steps (and at the end of the epoch) the host reads the on-device totals (loss, NaN count)
    and, with all processes, agrees on whether to stop (a signal, --max_steps) or to write a mid-epoch checkpoint
    (--ckpt_every_min); between those points no step waits for the host. A single process checks signals and
    the checkpoint clock after every step (host-side flags, no device sync).
    """
    cfg, rt, epoch = loop.cfg, loop.rt, progress["epoch"]
    sync_every = 1 if rt.count == 1 else cfg.log_every
    last_save = time.monotonic()
    desc = lambda: f"epoch {epoch + 1}/{cfg.epochs} | {run_progress(loop, progress, t0)}"  # noqa: E731
    bar = tqdm(total=loop.steps_per_epoch, initial=progress["batch"], desc=desc(), unit="step", leave=False,
               dynamic_ncols=True, disable=not rt.main)
    batches = loop.splits[0].batches(cfg.bsz, shuffle=True, seed=cfg.jax_seed, epoch=epoch, drop_last=True,
                                     buckets=loop.buckets, start=progress["batch"], shard=rt.shard)
    for b in dataloaders.prefetch(batches):
        state = loop.train_step(state, rt.global_batch(b), progress["step"])
        progress["batch"] += 1
        progress["step"] += 1
        bar.set_description_str(desc(), refresh=False)  # host clock and counters only: no device sync
        bar.update(1)
        if progress["batch"] % cfg.log_every == 0 or progress["batch"] == loop.steps_per_epoch:
            check_totals(loop, state, progress, bar, t0)
        if progress["step"] % sync_every and progress["step"] != cfg.max_steps:
            continue
        due = cfg.ckpt_every_min > 0 and time.monotonic() - last_save >= 60 * cfg.ckpt_every_min
        sig = 0 if signals.caught is None else StopSignals.NAMES.index(signals.caught) + 1
        stop_sig, max_steps, save_now = rt.agree([sig, progress["step"] == cfg.max_steps, due])
        if stop_sig or max_steps:
            progress["wall_time_s"] += time.perf_counter() - t0
            loop.ckpts.save("latest", state, progress)
            bar.close()
            name = StopSignals.NAMES[int(stop_sig) - 1] if stop_sig else None
            print(f"\nprocess {rt.index}: {'stopped by ' + name if name else 'reached --max_steps'} at epoch "
                  f"{epoch + 1}, batch {progress['batch']} (step {progress['step']}); continue with "
                  f"--resume --run_dir {loop.ckpts.dir}", flush=True)
            return state, name or "max_steps"
        if save_now:  # the saved wall time includes this epoch so far; the live count adds it at the end
            so_far = progress["wall_time_s"] + time.perf_counter() - t0
            loop.ckpts.save("latest", state, dict(progress, wall_time_s=so_far))
            last_save = time.monotonic()
    bar.close()
    return state, None


def run_progress(loop: Loop, progress, t0) -> str:
    """The whole run at a glance, for the line beside the epoch's bar: its time so far (earlier sessions of a resumed
    run included) and the time left for the rest of its steps over all epochs (to --max_steps if sooner) at the
    run's pace so far (compiles and evaluations included). Host-side numbers only."""
    total = loop.cfg.epochs * loop.steps_per_epoch
    if loop.cfg.max_steps:
        total = min(total, loop.cfg.max_steps)
    elapsed = progress["wall_time_s"] + time.perf_counter() - t0
    done = progress["step"]
    left = f"~{duration(elapsed / done * max(total - done, 0))}" if done else "?"
    return f"run {duration(elapsed)} elapsed, {left} left for {max(total - done, 0):,} of {total:,} steps"


def duration(seconds: float) -> str:
    """A time span as H:MM:SS, with the days in front when there are any (4d 3:12:00)."""
    days, rest = divmod(int(round(seconds)), 86400)
    clock = f"{rest // 3600:d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def check_totals(loop: Loop, state, progress, bar, t0):
    """Read the running totals (the only device sync, every --log_every steps): a non-finite step stops the run
    (exit 3); otherwise the progress bar shows the epoch's loss and accuracy so far."""
    loss_sum, correct, n, bad = loop.rt.host(state["totals"])
    if bad:
        progress["wall_time_s"] += time.perf_counter() - t0
        raise RunError(f"non-finite loss in epoch {progress['epoch'] + 1} within steps "
                       f"{progress['step'] - loop.cfg.log_every + 1}..{progress['step']}: stopped; the last good "
                       f"checkpoint is {utils.checkpoint_path(loop.ckpts.dir, 'latest')}", 3)
    bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", acc=f"{correct / max(n, 1):.3f}")


def end_epoch(loop: Loop, state, progress, t0):
    """Evaluate, record the epoch's row, update the best epoch, reset the totals, save the checkpoints.
    → (state, row, whether this epoch is the new best)."""
    cfg, rt, (_, val, test) = loop.cfg, loop.rt, loop.splits
    loss_sum, correct, n, _ = rt.host(state["totals"])
    (val_loss, val_acc), (test_loss, test_acc) = loop.evaluate(state, val), loop.evaluate(state, test)
    seconds = time.perf_counter() - t0
    progress["wall_time_s"] += seconds
    row = dict(epoch=progress["epoch"] + 1, train_loss=float(loss_sum / max(n, 1)),
               train_acc=float(correct / max(n, 1)), val_loss=val_loss, val_acc=val_acc, test_loss=test_loss,
               test_acc=test_acc, seconds=seconds, steps_per_s=loop.steps_per_epoch / seconds)
    for k in cfg.resolutions[1:]:  # zero-shot at another sampling rate: x[::k], steps × k
        row[f"val_acc@{k}"], row[f"test_acc@{k}"] = loop.evaluate(state, val, k)[1], loop.evaluate(state, test, k)[1]
    if loop.guard_activity is not None:  # per layer: the fraction of (t, state) rows scaled, the median scale
        activity = rt.host(loop.guard_activity(state["params"])).astype(float)
        row["guard_scaled"], row["guard_median_scale"] = activity[:, 0].tolist(), activity[:, 1].tolist()
    if loop.next_step:  # nats per value → bits per dimension
        row.update({f"{s}_bpd": row[f"{s}_loss"] / np.log(2.0) for s in ("train", "val", "test")})
    progress["history"].append(row)
    improved = utils.improves(progress["best"], row, loop.next_step)
    if improved:
        progress["best"] = {"epoch": row["epoch"], **{k: row[k] for k in utils.BEST_FIELDS[1:] if k in row}}
    progress["epoch"], progress["batch"] = row["epoch"], 0
    state["totals"] = jax.device_put(np.zeros(4, np.float32), rt.replicated)
    loop.ckpts.save("latest", state, progress)
    if improved:
        loop.ckpts.save("best", state, progress)
    return state, row, improved


def sampler(cfg, rt, model, test, seq_len, run_dir):
    """--sample_every: a function (state, epoch, report) that draws --n_samples digits (process 0, on its host copy
    of the state) into <run_dir>/samples/epoch<k>.png and wandb; None when off. Bad sampling options are a RunError
    here, before any training."""
    if not cfg.sample_every:
        return None
    try:
        prefix = models.resolve_prefix(cfg.sample_prefix, seq_len)
        truth = models.true_values(test, cfg.n_samples)
    except ValueError as e:
        raise RunError(f"--sample_every: {e} (--sample_prefix, --n_samples, --max_eval_samples)", 2) from None
    if not rt.main:
        return None
    draw = models.Sampler(model)

    def after_epoch(state, epoch, report):
        if epoch % cfg.sample_every:
            return
        variables = {k: jax.tree_util.tree_map(rt.host, state[k]) for k in ("params", "batch_stats")}
        drawn, seconds = draw(variables, truth, prefix, cfg.temperature, seed=cfg.jax_seed + epoch)
        path = models.save_grid(run_dir / "samples" / f"epoch{epoch:03d}.png", truth, drawn, prefix)
        report.say(f"  samples: {path} ({len(truth)} digits, prefix {prefix}, temperature {cfg.temperature}, "
                   f"{seconds:.1f}s)")
        report.image(path, epoch, f"epoch {epoch}: true | sampled, first {prefix} pixels given")

    return after_epoch


def main(argv=None):
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
