"""Speed of every scan, of a training step, and of the data path, on whatever backend JAX has; the memory a
training step needs at every S5 recipe's size; every scan's sequential depth; and the time to draw 16 MNIST
digits in the recurrent mode.

    python bench.py --quick                  # CPU-sized shapes, under 3 minutes on 2 cores (memory not included;
                                             # the guard ablations' training steps only when named in --variants)
    python bench.py --out bench.json         # the full shapes (a GPU)
    python bench.py --sections memory        # XLA's memory estimate at the S5 recipes (compile only, any backend;
                                             # 6 variants × 7 recipes: 42 compiles, minutes on a CPU)
    python bench.py --quick --sections sample   # drawing 16 MNIST digits in the recurrent mode, per ssm_type

Times are medians over --repeats calls after a warm-up call, each ended by block_until_ready. Every scan
is reported as a ratio to the S5 scan of the same shape and pass, measured in the same run. The rows "s5 layer",
"lru layer" and "s6 layer" are whole SSM layers on P features (S5 and the LRU: P complex states and the same scan;
S6: P × 16 real states, its selective scan), to compare with each other.

Sequential depth: the number of dependent steps on the longest path of a function's jaxpr, where a scan of
length n whose body has depth d counts n·max(d, 1) and every other operation 0 (a parallel associative scan's
O(log L) levels count 0). It is what a GPU pays in kernel-launch latency, however wide it is.

Memory: `jax.jit(train_step).lower(...).compile().memory_analysis()` on abstract shapes (nothing is allocated),
XLA's own estimate of the temporary bytes one step needs on the backend it compiles for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import config
import dataloaders
import models
import s6_lru
import ssm
import ssm_ex

FULL_SHAPES = [(32, 1024, 64), (32, 2048, 64), (8, 16384, 128)]
QUICK_SHAPES = [(32, 1024, 64), (2, 4096, 32)]  # (32, 1024, 64): the full mode's target shape; (2, 4096, 32) long
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (SXM parts)
R = 10
S6_N = 16  # S6's states per channel in the scan rows (Mamba's default)


def _jaxpr_depth(jaxpr) -> int:
    depth = {}
    get = lambda v: 0 if type(v).__name__ == "Literal" else depth.get(v, 0)  # noqa: E731
    for eqn in jaxpr.eqns:
        d = max((get(v) for v in eqn.invars), default=0) + _eqn_depth(eqn)
        for v in eqn.outvars:
            depth[v] = d
    return max((get(v) for v in jaxpr.outvars), default=0)


def _sub_jaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            inner = getattr(x, "jaxpr", x)
            if hasattr(inner, "eqns"):
                yield inner


def _eqn_depth(eqn) -> int:
    name = eqn.primitive.name
    if name == "scan":
        return eqn.params["length"] * max(1, _jaxpr_depth(eqn.params["jaxpr"].jaxpr))
    if name == "while":
        raise ValueError("a while loop has no static trip count: its depth is unknown")
    return max((_jaxpr_depth(j) for j in _sub_jaxprs(eqn.params)), default=0)


def sequential_depth(fn, *args) -> int:
    """Dependent steps on the longest path of fn's jaxpr (see the module docstring)."""
    return _jaxpr_depth(jax.make_jaxpr(fn)(*args).jaxpr)


def median_time(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))  # warm-up: compiles
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def scan_variants(P, L):
    """name → f(b (B,L,P), params) giving all states, batched over the first axis."""
    rng = np.random.default_rng(0)
    lam = jnp.asarray(0.99 * np.exp(1j * rng.uniform(-1, 1, P)), jnp.complex64)
    E_aux = jnp.asarray(0.01 * (rng.normal(size=P) + 1j * rng.normal(size=P)), jnp.complex64)
    E = jnp.asarray(0.05 * (rng.normal(size=(P, R)) + 1j * rng.normal(size=(P, R))), jnp.complex64)
    F = jnp.asarray(0.05 * (rng.normal(size=(R, P)) + 1j * rng.normal(size=(R, P))), jnp.complex64)
    delta = jnp.asarray(rng.normal(size=(L, R)), jnp.float32)
    sched = ssm_ex.time_scale(L, "sinusoidal")
    B_s5 = jnp.asarray(rng.normal(size=(P, P)) + 1j * rng.normal(size=(P, P)), jnp.complex64) / np.sqrt(2 * P)
    C_s5 = jnp.asarray(rng.normal(size=(P, P)) + 1j * rng.normal(size=(P, P)), jnp.complex64) / np.sqrt(2 * P)
    nu_log, theta_log = jnp.log(-jnp.log(jnp.abs(lam))), jnp.log(jnp.abs(jnp.angle(lam)) + 1e-3)
    gamma_log, D = 0.5 * jnp.log(1 - jnp.abs(lam) ** 2), jnp.ones(P)
    s6_delta = jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (L, P))), jnp.float32)
    s6_A = -jnp.tile(jnp.arange(1.0, S6_N + 1), (P, 1))

    def guarded_full_scan(guard):
        def scan(b):
            a, s, _ = ssm_ex.guard_full(lam, E, F, delta, guard)
            return ssm_ex.lowrank_scan(a, E, F, delta, b, s)

        return scan

    def lowrank_recurrence(b):
        def step(x, inp):
            d, bt = inp
            x = lam * x + E @ (d * (F @ x)) + bt
            return x, x

        return jax.lax.scan(step, jnp.zeros(P, b.dtype), (delta.astype(b.dtype), b))[1]

    per_seq = {
        "s5 scan": lambda b: ssm.linear_scan(lam, b),
        "s5 recurrence": lambda b: ssm.linear_recurrence(lam, b),
        "aux scan": lambda b: ssm.linear_scan(ssm_ex.aux_transitions(lam, E_aux, sched), b),
        "aux recurrence": lambda b: ssm.linear_recurrence(ssm_ex.aux_transitions(lam, E_aux, sched), b),
        "diag scan": lambda b: ssm.linear_scan(ssm_ex.extend_diag_transitions(lam, E, F, delta), b),
        "diag recurrence": lambda b: ssm.linear_recurrence(ssm_ex.extend_diag_transitions(lam, E, F, delta), b),
        "full chunked": lambda b: ssm_ex.lowrank_scan(lam, E, F, delta, b),
        "full recurrence": lowrank_recurrence,
        # full mode as a layer runs it: each guard's transitions (shared by the batch), then the chunked scan
        **{f"full {g} guard": guarded_full_scan(g) for g in ssm_ex.GUARDS},
        # whole layers on u = Re b (L, P), P features: S5 and the LRU carry P complex states (the same scan);
        # S6 carries P × S6_N real states (its Δ_t, B_t, C_t given, as its projections would make them)
        "s5 layer": lambda b: ssm.apply_ssm(lam, B_s5, C_s5, b.real, conj_sym=False),
        "lru layer": lambda b: s6_lru.apply_lru(nu_log, theta_log, gamma_log, B_s5, C_s5, D, b.real),
        "s6 layer": lambda b: s6_lru.selective_scan(b.real, s6_delta, s6_A, b.imag[:, :S6_N], b.imag[:, -S6_N:], D),
    }
    return {k: jax.vmap(f) for k, f in per_seq.items()}


def bench_scans(shapes, repeats, on_gpu, first_shape_only=()):
    """Every scan variant at every shape, except those named in first_shape_only: at the first shape alone."""
    rows = []
    for i, (B, L, P) in enumerate(shapes):
        key = jax.random.PRNGKey(0)
        b = (jax.random.normal(key, (B, L, P)) + 1j * jax.random.normal(key, (B, L, P))).astype(jnp.complex64)
        variants = {k: f for k, f in scan_variants(P, L).items() if i == 0 or k not in first_shape_only}
        times, depths = {}, {}
        for name, f in variants.items():
            fwd = jax.jit(f)
            # |x|² keeps the gradient a function of the input: the gradient of a loss linear in b would be a
            # constant that the compiler can fold away, timing nothing
            grad = jax.grad(lambda b, f=f: jnp.sum(jnp.abs(f(b)) ** 2))
            times[name] = (median_time(fwd, b, repeats=repeats), median_time(jax.jit(grad), b, repeats=repeats))
            depths[name] = (sequential_depth(f, b), sequential_depth(grad, b))
        base_f, base_fb = times["s5 scan"]
        for name, (tf, tfb) in times.items():
            row = dict(shape=f"({B}, {L}, {P})", variant=name, fwd_ms=tf * 1e3, fwd_bwd_ms=tfb * 1e3,
                       fwd_ratio=tf / base_f, fwd_bwd_ratio=tfb / base_fb, fwd_depth=depths[name][0],
                       fwd_bwd_depth=depths[name][1], depth_target=L // 4)
            if name == "s5 scan":
                # bytes that must cross memory at least once: read b, write the states (complex64 each)
                row["fwd_GBps"] = 2 * B * L * P * 8 / tf / 1e9
                row["fwd_bwd_GBps"] = 4 * B * L * P * 8 / tfb / 1e9  # + read the cotangent, write the gradient
                peak = next((v for k, v in PEAK_BANDWIDTH.items() if on_gpu and k in jax.devices()[0].device_kind),
                            None)
                if peak:
                    row["fwd_bwd_peak_fraction"] = row["fwd_bwd_GBps"] * 1e9 / peak
            rows.append(row)
            print(f"  {row['shape']:>16} {name:16} fwd {tf * 1e3:9.2f} ms ({tf / base_f:5.2f}x)   fwd+bwd "
                  f"{tfb * 1e3:9.2f} ms ({tfb / base_fb:5.2f}x)   depth {depths[name][0]:6d} fwd "
                  f"{depths[name][1]:6d} fwd+bwd" +
                  (f"   {row['fwd_bwd_GBps']:.1f} GB/s" if "fwd_bwd_GBps" in row else ""), flush=True)
    return rows


# The variants every training and memory row compares: S5 and the extensions on the same recipe, the modern
# baselines at S5's width; each type's declaration names its own (ssm.SSMType.bench)
def variants() -> dict:
    return {name: argv for d in ssm.declarations() for name, argv in d.bench.items()}


def type_flags(argv: list, **values) -> list:
    """The options `values` (name → value) that the --ssm_type named in argv takes, as words."""
    decl = ssm.ssm_type(argv[argv.index("--ssm_type") + 1])
    return [w for name, v in values.items() if name in decl.option_names() for w in (f"--{name}", str(v))]


VARIANTS = variants()
# --quick (under 3 minutes on 2 cores) leaves out the stability guards' ablations of full mode (the default spectral
# guard stays) from the training step, and times their scans at its first shape only; name them to include them
_ABLATED = [g for g in ssm_ex.GUARDS if g != ssm_ex.GUARD.default]
GUARD_ABLATIONS = tuple(f"extend full {g}" for g in _ABLATED)  # the names of ssm_ex's bench variants
GUARD_SCANS = tuple(f"full {g} guard" for g in _ABLATED)  # the names of scan_variants' guarded scans


def bench_train(recipes, repeats, variants=VARIANTS, type_values=None):
    """Steps/s of a training step per variant. All variants are compiled first, then timed in interleaved rounds
    (one step of each in turn), so a slow spell of a noisy machine hits every variant alike; the ratio to S5
    is the median of the per-round ratios."""
    rows = []
    for label, argv, L, tokens in recipes:
        runs = {}
        for name, extra in variants.items():
            cfg = config.parse_args([*argv, *extra, *type_flags(extra, **(type_values or {}))])
            meta = dict(n_classes=10, seq_len=L, in_dim=18 if tokens else 1, tokens=tokens, pair=False)
            rng = np.random.default_rng(0)
            batch = models.example_batch(meta, cfg.bsz)
            x = rng.integers(3, 18, (cfg.bsz, L)) if tokens else rng.normal(size=(cfg.bsz, L, 1))
            batch.update(inputs=jnp.asarray(x, batch["inputs"].dtype),
                         labels=jnp.asarray(rng.integers(0, 10, cfg.bsz), jnp.int32))
            compiled, model, _, compile_s = models.compiled_step(cfg, meta, batch)
            variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
            tx, _ = models.make_optimizer(variables["params"], cfg, steps_per_epoch=100)
            state = models.new_state(variables["params"], variables.get("batch_stats", {}), tx)
            state = jax.block_until_ready(compiled(state, batch, 0))
            runs[name] = dict(cfg=cfg, compiled=compiled, state=state, batch=batch, compile_s=compile_s, times=[])
        for i in range(repeats):
            for r in runs.values():
                t0 = time.perf_counter()
                r["state"] = jax.block_until_ready(r["compiled"](r["state"], r["batch"], i + 1))
                r["times"].append(time.perf_counter() - t0)
        base = np.asarray(runs["s5"]["times"])
        for name, r in runs.items():
            t = float(np.median(r["times"]))
            ratio = float(np.median(base / np.asarray(r["times"])))  # steps/s relative to S5, per round
            stats = jax.devices()[0].memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            row = dict(recipe=label, ssm_type=name, bsz=r["cfg"].bsz, L=L, steps_per_s=1 / t,
                       samples_per_s=r["cfg"].bsz / t, ratio_to_s5=ratio, compile_s=r["compile_s"],
                       peak_mem_GB=peak / 1e9 if peak else None)
            rows.append(row)
            print(f"  {label:10} {name:12} {1 / t:8.2f} steps/s ({ratio:4.2f}x S5) {r['cfg'].bsz / t:9.1f} samples/s  "
                  f"compile {r['compile_s']:6.1f} s  peak mem {row['peak_mem_GB'] if peak else 'n/a'}", flush=True)
    return rows


def step_memory(argv, meta):
    """XLA's compiled memory estimate of one training step (abstract shapes: nothing is allocated), in GB: the
    same estimate (models.step_memory) that train_ex.py checks before its first step."""
    mem = models.step_memory(config.parse_args(argv), meta)
    return dict(temp_GB=mem["temp"] / 1e9, argument_GB=mem["argument"] / 1e9, output_GB=mem["output"] / 1e9,
                total_GB=mem["total"] / 1e9, compile_s=mem["compile_s"])


def s5_recipes() -> dict:
    """{short name: (the S5 command for the task, the task's dataset)}, the LRA tasks and Speech
    (plans/s5_recipes.plan)."""
    return config.s5_recipes_by_name()


def bench_memory(recipes, variants=VARIANTS):
    rows = []
    all_recipes = s5_recipes()
    for label in recipes:
        argv, dataset = all_recipes[label]
        meta = dataloaders.model_meta(dataset)
        base = None
        for variant, extra in variants.items():
            row = dict(recipe=label, variant=variant, L=meta["seq_len"],
                       **step_memory([*argv, *extra, *type_flags(extra, R=R)], meta))
            base = base or row["temp_GB"]
            row["temp_ratio"] = row["temp_GB"] / base
            rows.append(row)
            print(f"  {label:10} {variant:12} temp {row['temp_GB']:8.2f} GB ({row['temp_ratio']:5.2f}x S5)   "
                  f"arguments {row['argument_GB']:6.3f} GB   compile {row['compile_s']:5.1f} s", flush=True)
    return rows


def bench_sample(model_flags, n, L, repeats):
    """Drawing n sequences of L pixels (models.Sampler: the whole network in its recurrent mode, one compiled
    lax.scan) per ssm_type: the first call (compile included) and the median of later calls."""
    rows = []
    for ssm_type in ssm.TYPES:
        cfg = config.parse_args(["--dataset", "mnist", "--ssm_type", ssm_type, *model_flags])
        meta = dict(dataloaders.model_meta("mnist"), seq_len=L)
        model = models.build_model(cfg, meta)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), models.example_batch(meta))
        truth = np.zeros((n, L), np.int32)
        draw = models.Sampler(model)
        _, first = draw(variables, truth, 0, 1.0, seed=0)
        t = float(np.median([draw(variables, truth, 0, 1.0, seed=i + 1)[1] for i in range(repeats)]))
        rows.append(dict(ssm_type=ssm_type, n=n, L=L, first_call_s=first, draw_s=t, us_per_step=1e6 * t / L))
        print(f"  {ssm_type:6} {n} x {L}: first call {first:6.2f} s (compile included), then {t:6.3f} s "
              f"({1e6 * t / L:7.1f} us per step)", flush=True)
    return rows


def bench_data(data_dir, bsz, n_batches):
    ds = dataloaders.load("listops-classification", data_dir)
    buckets = (512, 1024, 1536)
    n = min(n_batches, ds.train.num_batches(bsz, True, buckets))
    it = dataloaders.prefetch(ds.train.batches(bsz, shuffle=True, seed=0, drop_last=True, buckets=buckets))
    t0 = time.perf_counter()
    for _ in zip(range(n), it):
        pass
    rate = n / (time.perf_counter() - t0)
    print(f"  ListOps data path: {rate:,.0f} batches/s at bsz {bsz} ({ds.source})", flush=True)
    return dict(batches_per_s=rate, bsz=bsz, source=ds.source)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and models (CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (the median is reported); default 5, with --quick 3")
    p.add_argument("--sections", default="scans,train,data,sample",
                   help="comma-separated subset of scans,train,data,memory,sample; memory (a compile of every "
                   "variant at every S5 recipe, minutes each on a CPU) only when named")
    p.add_argument("--recipes", default=",".join(s5_recipes()),
                   help=f"memory section: which S5 recipes (of {','.join(s5_recipes())})")
    p.add_argument("--variants", default=None,
                   help=f"train and memory sections: which of {','.join(variants())} (s5 always, the ratios' base; "
                   f"each SSM type's declaration names its own) [all; with --quick all but the guard ablations "
                   f"{', '.join(GUARD_ABLATIONS)}]")
    p.add_argument("--data_dir", default=None, help="data root with ListOps (default: a small generated set)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.variants is None:
        args.variants = ",".join(k for k in variants() if not (args.quick and k in GUARD_ABLATIONS))
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    print(f"backend {dev.platform}: {len(jax.devices())}× {dev.device_kind} | jax {jax.__version__}")
    out = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__, "quick": args.quick}
    sections = args.sections.split(",")
    every = variants()
    unknown = set(args.variants.split(",")) - set(every)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {','.join(every)}")
    chosen = {k: v for k, v in every.items() if k == "s5" or k in args.variants.split(",")}
    if "scans" in sections:
        print("scans (B, L, P): median time, ratio to the S5 scan")
        out["scans"] = bench_scans(QUICK_SHAPES if args.quick else FULL_SHAPES, args.repeats, on_gpu,
                                   first_shape_only=GUARD_SCANS if args.quick else ())
    if "train" in sections:
        print("training step (forward, backward, optimiser)")
        if args.quick:
            recipes = [("listops-s", ["--d_model", "32", "--n_layers", "2", "--ssm_size_base", "16", "--bsz", "8"],
                        1024, True)]
        else:
            recipes = [("listops", ["--bsz", "32"], 2048, True)]
            if on_gpu:
                recipes.append(("path-x", ["--bsz", "32", "--d_model", "128", "--ssm_size_base", "256", "--blocks",
                                           "16", "--n_layers", "6", "--bidirectional", "--C_init", "complex_normal"],
                                16384, False))
        out["train"] = bench_train(recipes, args.repeats, chosen, type_values=dict(R=4) if args.quick else None)
    if "memory" in sections:
        print(f"memory of one training step at the S5 recipes (XLA's estimate on {dev.platform}; R = {R})")
        unknown = set(args.recipes.split(",")) - set(s5_recipes())
        if unknown:
            p.error(f"--recipes: unknown {sorted(unknown)}; choose from {','.join(s5_recipes())}")
        out["memory"] = bench_memory(args.recipes.split(","), chosen)
    if "sample" in sections:
        if args.quick:
            flags = ["--d_model", "32", "--n_layers", "2", "--ssm_size_base", "16"]
        else:  # Annotated S4's MNIST generation model
            flags = ["--d_model", "512", "--n_layers", "6", "--ssm_size_base", "64", "--no-batchnorm",
                     "--activation_fn", "full_glu", "--pixel_tokens", "--token_encoder", "embed"]
        print(f"sampling 16 MNIST digits (784 steps), recurrent mode, model {' '.join(flags[:6])}")
        out["sample"] = bench_sample(flags, 16, 784, args.repeats)
    if "data" in sections:
        print("data path")
        if args.data_dir:
            out["data"] = bench_data(args.data_dir, 32, 500)
        else:
            with tempfile.TemporaryDirectory() as d:
                dataloaders.make_listops(Path(d) / "listops_generated", 2000, 100, 100, workers=1, progress=False)
                out["data"] = bench_data(d, 32, 500)
        if "train" in out:
            slowest = min(r["steps_per_s"] for r in out["train"])
            print(f"  data path / slowest training step: {out['data']['batches_per_s'] / slowest:,.0f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
