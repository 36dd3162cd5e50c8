"""Look inside a trained run: what its SSMs and time-varying terms learned, as PNGs and one inspect.json.

    python inspect_run.py RUN_DIR [--checkpoint best|latest] [--t0 0,256,512]

Reads RUN_DIR's checkpoint and config, rebuilds the model without the data, and writes into RUN_DIR/inspect/:
  eigenvalues.png   per layer, the discrete eigenvalues Λ̄ in the complex plane with the unit circle, at
                    initialisation (rebuilt from the config's seed) and trained (S6: exp(ΔA) at the bias step
                    Δ = softplus(b_Δ), i.e. for a zero input, as its transition depends on the input; LRU: λ)
  timescales.png    per layer, histograms of the timescales −1/ln|λ̄| (steps until |λ̄|^k falls to 1/e) and of
                    the learned steps Δ
  aux_modulus.png   (aux) the effective transition modulus |Λ̄ + E Δ(t−1)| over t, quantiles across states, the
                    clamp's bound marked
  extend.png        (extend) δ(t) per rank, and the spectral radius, 2-norm and ∞-norm of Λ_ex(t) over t (exact
                    from the P×P matrices for up to 128 states, else estimates and bounds, said which), with the
                    smallest factor the stability guard applied at each t and the fraction of (t, state) it scaled
  impulse.png       per layer, the SSM part's output (no D term) to a unit impulse on input channel 0 at a few t₀,
                    against t − t₀: for a time-invariant layer the curves coincide; for aux/extend their
                    difference is the time variation
  curves.png        loss and accuracy per epoch (train/val/test) from results.json; for aux/extend runs also the
                    guard's activity per epoch and layer (rows scaled, median scale)
  inspect.json      the numbers behind every picture (--memory: also XLA's estimate of one training step at the
                    run's --bsz, models.step_memory, the estimate train_ex.py checks before its first step)

Everything is computed for the layer as the model runs it (stability guard included), one sequence at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import models
import s4
import s6_lru
import ssm
import ssm_ex
import utils

EXACT_MAX_P = 128  # Λ_ex(t) spectra from dense matrices up to this many states; an upper bound beyond


class InspectError(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------------


def load_run(run_dir: Path, kind: str):
    """(config namespace, model meta, parameters) of a run's checkpoint."""
    try:
        cfg, meta, state = models.read_run(run_dir, kind)
    except utils.RunError as e:
        raise InspectError(str(e)) from None
    return cfg, meta, state["params"]


def ssm_layers(cfg, meta, params):
    """[(layer name, module, its params)] for every SequenceLayer's SSM."""

    model = models.build_model(cfg, meta)
    cls, kw = model.encoder.ssm
    enc = params["encoder"]
    layers = sorted((k for k in enc if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    return [(name, cls(H=cfg.d_model, P=cfg.ssm_size_base, **kw), enc[name]["ssm"]) for name in layers]


def initial_params(cfg, meta):
    """The parameters the run started from (the config's seed, drawn as train_ex draws them)."""
    model = models.build_model(cfg, meta)
    return models.init_variables(cfg, model, models.example_batch(meta))[0]["params"]


# --------------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------------


def discrete_eigs(module, p):
    """(Λ̄ (n,) complex, steps Δ or None) of a layer: S5-type layers' diagonal Λ̄; S4D/DSS exp(ΔΛ) per feature; S4
    the eigenvalues of each feature's dense bilinear Ā; S6 exp(ΔA) at the bias step Δ = softplus(b_Δ) (its steps
    depend on the input: this is the transition of a zero input); the LRU's λ (discrete-time: no step, None)."""

    m = module.bind({"params": p})
    if isinstance(module, s6_lru.S6SSM):
        step = np.asarray(jax.nn.softplus(m.b_Delta), np.float64) * module.step_rescale
        return np.exp(step[:, None] * np.asarray(m.A(), np.float64)).ravel().astype(complex), step
    if isinstance(module, s6_lru.LRUSSM):
        return np.asarray(m.discrete_system()[0]), None
    if isinstance(module, s4.S4SSM):
        A_bar, _ = jax.vmap(s4.dplr_bilinear)(m.Lambda(), ssm.as_complex(m.P_lr), ssm.as_complex(m.B),
                                             m.step_size())
        return np.linalg.eigvals(np.asarray(A_bar, np.complex128)).ravel(), np.asarray(m.step_size())
    if isinstance(module, (s4.S4DSSM, s4.DSSSSM)):
        Lam = m.Lambda()
        step = m.step_size()
        return np.asarray(np.exp(step[:, None] * Lam)).ravel(), np.asarray(step)
    Lambda_bar, _, _ = m.discrete_system()
    return np.asarray(Lambda_bar), np.exp(np.asarray(p["log_step"], np.float64))


def timescales(Lambda_bar):
    """Steps until |λ̄|^k falls to 1/e: −1/ln|λ̄| (inf where |λ̄| ≥ 1)."""
    r = np.abs(np.asarray(Lambda_bar))
    with np.errstate(divide="ignore"):
        return np.where(r < 1, -1.0 / np.log(np.maximum(r, 1e-300)), np.inf)


def aux_modulus(module, p, L):
    """|Λ̄ + E Δ(t−1)| (L, P) after the clamp, the fraction of (t, state) the clamp acted on, and the clamp's bound."""

    a, scale = module.apply({"params": p}, L, method="transitions")
    return np.abs(np.asarray(a)), float(np.mean(np.asarray(scale) < 1.0)), (1.0 if module.guard != "none" else None)


def extend_spectra(module, p, L, n_t=64):
    """δ(t) (L, R); for a sample of t: spectral radius, 2-norm and ∞-norm of Λ_ex(t) as the model runs it
    (guarded), exact from the P×P matrices for P ≤ EXACT_MAX_P (or diag mode, which is diagonal), else the
    2-norm from the spectral guard's power iteration and upper bounds for the others; the guard's factor per
    (t, state) row (L, P)."""

    m = module.bind({"params": p})
    Lambda_bar, _, _ = m.discrete_system()
    delta = m.delta(L)
    a, s, guard_scale = m.guarded(Lambda_bar, delta, L)
    E, F = np.asarray(ssm.as_complex(p["E"]), np.complex128), np.asarray(ssm.as_complex(p["F"]), np.complex128)
    ts = np.unique(np.linspace(0, L - 1, min(n_t, L)).astype(int))
    d = np.asarray(delta, np.float64)
    guard_scale = np.asarray(guard_scale, np.float64)
    if module.mode == "diag":  # the transition is diagonal: all three are max |a_t|
        mod = np.abs(np.asarray(a))[ts].max(1)
        return dict(t=ts, delta=d, radius=mod, norm_2=mod, norm_inf=mod, how="exact (diagonal)",
                    guard_scale=guard_scale)
    lam = np.broadcast_to(np.asarray(a, np.complex128), (L, E.shape[0]))  # a_t: Λ̄, or c_t Λ̄ (spectral guard)
    scale = np.ones((L, E.shape[0])) if s is None else np.asarray(s, np.float64)
    if E.shape[0] <= EXACT_MAX_P:
        A = np.stack([np.diag(lam[t]) + (scale[t][:, None] * E) @ np.diag(d[t]) @ F for t in ts])
        radius = np.abs(np.linalg.eigvals(A)).max(1)
        norm_2 = np.linalg.svd(A, compute_uv=False)[:, 0]
        norm = np.abs(A).sum(2).max(1)
        how = "exact (dense P×P matrices)"
    else:  # ‖·‖∞ ≤ |a_p| + s_p Σ_r |E_pr||δ_r| Σ_q |F_rq| per row; the spectral radius is at most the 2-norm
        bound = np.abs(lam[ts]) + scale[ts] * (np.abs(d[ts]) @ (np.abs(E) * np.abs(F).sum(1)[None, :]).T)
        norm = bound.max(1)
        corr = E[None] * scale[ts][:, :, None]  # the row-scaled E at each sampled t
        norm_2 = radius = np.array([float(ssm_ex.spectral_norms(lam[t], corr[i], F, d[t][None])[0])
                                    for i, t in enumerate(ts)])
        how = "2-norm by power iteration (a lower bound), ∞-norm an upper bound"
    return dict(t=ts, delta=d, radius=np.asarray(radius), norm_2=np.asarray(norm_2), norm_inf=np.asarray(norm),
                how=how, guard_scale=guard_scale)


def impulse_responses(module, p, L, H, t0s):
    """For each t₀: the SSM part's output (L, H), D·u removed, to u = e_{t₀} on input channel 0."""

    apply = jax.jit(lambda u: module.apply({"params": p}, u))
    out = {}
    for t0 in t0s:
        u = jnp.zeros((L, H)).at[t0, 0].set(1.0)
        y = np.asarray(apply(u), np.float64) - np.asarray(p["D"], np.float64) * np.asarray(u)
        out[int(t0)] = y
    return out


def time_variation(responses, L):
    """max over t₀ of ‖r_{t₀}(k) − r_{first}(k)‖∞ / ‖r_{first}‖∞ on the lags k both responses cover."""
    t0s = sorted(responses)
    ref_t0 = t0s[0]
    ref = responses[ref_t0]
    scale = max(np.max(np.abs(ref)), 1e-30)
    worst = 0.0
    for t0 in t0s[1:]:
        lo, hi = -min(t0, ref_t0), L - max(t0, ref_t0)  # lags k with both t0 + k and ref_t0 + k in range
        a, b = responses[t0][t0 + lo:t0 + hi], ref[ref_t0 + lo:ref_t0 + hi]
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _grid(n):
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_eigenvalues(path, layers):
    plt = _plt()
    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    circle = np.exp(1j * np.linspace(0, 2 * np.pi, 400))
    for ax, (name, info) in zip(axes.flat, layers.items()):
        ax.plot(circle.real, circle.imag, "k-", lw=0.8, label="unit circle")
        for key, style, label in (("init", dict(marker="o", facecolors="none", edgecolors="tab:gray"), "initial"),
                                  ("trained", dict(marker="x", color="tab:red"), "trained")):
            z = np.asarray(info[key])
            ax.scatter(z.real, z.imag, s=18, label=label, **style)
        ax.set_aspect("equal")
        ax.set_title(f"{name}: discrete eigenvalues Λ̄")
        ax.set_xlabel("Re λ̄")
        ax.set_ylabel("Im λ̄")
        ax.legend(fontsize=8, loc="lower left")
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    _save(plt, fig, path)


def plot_timescales(path, layers):
    plt = _plt()
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 3 * len(layers)), squeeze=False)
    for (ax_t, ax_d), (name, info) in zip(axes, layers.items()):
        for key, color, label in (("timescales_init", "tab:gray", "initial"), ("timescales", "tab:red", "trained")):
            v = np.asarray(info[key], np.float64)
            v = v[np.isfinite(v) & (v > 0)]
            if len(v):
                ax_t.hist(np.log10(v), bins=30, alpha=0.6, color=color, label=label)
        ax_t.set_xlabel("log10 timescale −1/ln|λ̄| (steps)")
        ax_t.set_ylabel("states")
        ax_t.set_title(f"{name}: timescales (steps until |λ̄|^k = 1/e)")
        ax_t.legend(fontsize=8)
        if info["steps"] is None:
            ax_d.text(0.5, 0.5, "no step Δ: the layer is discrete-time (LRU)", ha="center", va="center")
            ax_d.axis("off")
            continue
        steps = np.asarray(info["steps"], np.float64)
        ax_d.hist(np.log10(steps), bins=30, color="tab:blue")
        ax_d.set_xlabel("log10 learned step Δ")
        ax_d.set_ylabel("states" if len(steps) == len(info["trained"]) else "features")
        ax_d.set_title(f"{name}: learned steps Δ{info.get('step_note', '')}")
    _save(plt, fig, path)


def plot_aux(path, aux):
    plt = _plt()
    fig, axes = plt.subplots(len(aux), 1, figsize=(9, 3 * len(aux)), squeeze=False)
    for ax, (name, info) in zip(axes[:, 0], aux.items()):
        q = np.asarray(info["quantiles"])  # (5, L)
        t = np.arange(q.shape[1])
        ax.fill_between(t, q[0], q[4], color="tab:blue", alpha=0.15, label="min–max over states")
        ax.fill_between(t, q[1], q[3], color="tab:blue", alpha=0.35, label="25–75%")
        ax.plot(t, q[2], color="tab:blue", label="median")
        if info["bound"] is not None:
            ax.axhline(info["bound"], color="tab:red", ls="--", label=f"clamp |a| ≤ {info['bound']:.4g}")
        ax.set_xlabel("t (steps)")
        ax.set_ylabel("|Λ̄ + E Δ(t−1)|")
        ax.set_title(f"{name}: auxiliary state, effective transition modulus "
                     f"(clamped at {100 * info['clamped_fraction']:.2f}% of (t, state))")
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_extend(path, ext):
    plt = _plt()
    fig, axes = plt.subplots(len(ext), 2, figsize=(12, 3.2 * len(ext)), squeeze=False)
    for (ax_d, ax_r), (name, info) in zip(axes, ext.items()):
        d = np.asarray(info["delta"])
        for r in range(d.shape[1]):
            ax_d.plot(d[:, r], lw=0.8, label=f"rank {r}" if d.shape[1] <= 10 else None)
        ax_d.set_xlabel("t (steps)")
        ax_d.set_ylabel("δ_r(t)")
        ax_d.set_title(f"{name}: δ(t) per rank")
        if d.shape[1] <= 10:
            ax_d.legend(fontsize=7, ncol=2)
        ax_r.plot(info["t"], info["radius"], "o-", ms=3, label="spectral radius")
        ax_r.plot(info["t"], info["norm_2"], "d-", ms=3, label="2-norm")
        ax_r.plot(info["t"], info["norm_inf"], "s-", ms=3, label="∞-norm")
        ax_r.plot(info["t"], info["guard_scale_min"], "^-", ms=3,
                  label=f"guard: min row scale (scaled {100 * info['guard_scaled']:.0f}% of (t, state))")
        ax_r.axhline(1.0, color="tab:red", ls="--", lw=0.8)
        ax_r.set_xlabel("t (steps)")
        ax_r.set_ylabel("value")
        ax_r.set_title(f"{name}: Λ_ex(t), {info['how']}")
        ax_r.legend(fontsize=8)
    _save(plt, fig, path)


def plot_impulse(path, impulses, channels=3):
    plt = _plt()
    fig, axes = plt.subplots(len(impulses), 1, figsize=(9, 3 * len(impulses)), squeeze=False)
    for ax, (name, info) in zip(axes[:, 0], impulses.items()):
        for t0, y in info["responses"].items():
            y = np.asarray(y)
            k = np.arange(y.shape[0]) - int(t0)
            for h in range(min(channels, y.shape[1])):
                ax.plot(k, y[:, h], lw=0.9, label=f"t₀ = {t0}, output {h}")
        ax.set_xlabel("t − t₀ (steps)")
        ax.set_ylabel("y (SSM part, no D term)")
        ax.set_title(f"{name}: impulse response on input 0 (time variation {info['time_variation']:.3g})")
        ax.legend(fontsize=7, ncol=3)
    _save(plt, fig, path)


def plot_curves(path, epochs):
    """Loss and accuracy per epoch; for aux/extend runs a third panel: per layer, the fraction of (t, state) rows
    the stability guard scaled and the median scale (results.json's guard_scaled, guard_median_scale)."""
    plt = _plt()
    guarded = any("guard_scaled" in e for e in epochs)
    fig, axes = plt.subplots(1, 3 if guarded else 2, figsize=(16.5 if guarded else 11, 3.8))
    ax_l, ax_a = axes[:2]
    ep = [e["epoch"] for e in epochs]
    if guarded:
        ax_g = axes[2]
        rows = [e for e in epochs if "guard_scaled" in e]
        for i in range(len(rows[0]["guard_scaled"])):
            line = ax_g.plot([e["epoch"] for e in rows], [e["guard_scaled"][i] for e in rows], "o-", ms=3,
                             label=f"layer {i}: rows scaled")[0]
            ax_g.plot([e["epoch"] for e in rows], [e["guard_median_scale"][i] for e in rows], "--",
                      color=line.get_color(), label=f"layer {i}: median scale")
        ax_g.set_ylim(-0.03, 1.03)
        ax_g.set_xlabel("epoch")
        ax_g.set_title("stability guard: was the extension allowed to act?")
        ax_g.legend(fontsize=7)
    for split, style in (("train", "o-"), ("val", "s-"), ("test", "^-")):
        ax_l.plot(ep, [e.get(f"{split}_loss") for e in epochs], style, label=split)
        ax_a.plot(ep, [e.get(f"{split}_acc") for e in epochs], style, label=split)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("cross-entropy loss")
    ax_l.set_title("loss per epoch")
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy")
    ax_a.set_title("accuracy per epoch")
    for ax in (ax_l, ax_a):
        ax.legend()
    _save(plt, fig, path)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def inspect(run_dir: Path, kind: str = "best", t0s=None, out: Path | None = None, memory: bool = False) -> dict:
    """Write the pictures and inspect.json; return the report (the same numbers). `memory`: add XLA's estimate of
    one training step at the run's --bsz (bytes; compiled on shapes, nothing allocated)."""

    cfg, meta, params = load_run(run_dir, kind)
    L, H = meta["seq_len"], cfg.d_model
    t0s = sorted({min(max(int(t), 0), L - 1) for t in (t0s or (0, L // 4, L // 2))})
    out = out or run_dir / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    trained = ssm_layers(cfg, meta, params)
    init = {name: p for name, _, p in ssm_layers(cfg, meta, initial_params(cfg, meta))}
    eigs, aux, ext, imp = {}, {}, {}, {}
    for name, module, p in trained:
        lam, steps = discrete_eigs(module, p)
        lam0, _ = discrete_eigs(module, init[name])
        eigs[name] = dict(trained=lam, init=lam0, timescales=timescales(lam), timescales_init=timescales(lam0),
                          steps=steps)
        if isinstance(module, s6_lru.S6SSM):  # its steps and eigenvalues depend on the input
            eigs[name]["step_note"] = " at the bias softplus(b_Δ) (S6: zero input)"
        if isinstance(module, ssm_ex.S5SSMAux):
            mod, frac, bound = aux_modulus(module, p, L)
            aux[name] = dict(quantiles=np.quantile(mod, [0, 0.25, 0.5, 0.75, 1.0], axis=1), clamped_fraction=frac,
                             bound=bound)
        if isinstance(module, ssm_ex.S5SSMExtend):
            e = extend_spectra(module, p, L)
            e["guard_scale_min"] = e["guard_scale"][e["t"]].min(axis=1)
            e["guard_scaled"] = float(np.mean(e["guard_scale"] < 1.0))
            ext[name] = e
        resp = impulse_responses(module, p, L, H, t0s)
        imp[name] = dict(responses=resp, time_variation=time_variation(resp, L))

    plot_eigenvalues(out / "eigenvalues.png", eigs)
    plot_timescales(out / "timescales.png", eigs)
    pictures = ["eigenvalues.png", "timescales.png"]
    if aux:
        plot_aux(out / "aux_modulus.png", aux)
        pictures.append("aux_modulus.png")
    if ext:
        plot_extend(out / "extend.png", ext)
        pictures.append("extend.png")
    plot_impulse(out / "impulse.png", imp)
    pictures.append("impulse.png")
    results = run_dir / "results.json"
    epochs = json.loads(results.read_text()).get("epochs", []) if results.exists() else []
    if epochs:
        plot_curves(out / "curves.png", epochs)
        pictures.append("curves.png")

    cplx = lambda z: [[float(v.real), float(v.imag)] for v in np.asarray(z).ravel()]  # noqa: E731
    real = lambda a: [None if not np.isfinite(v) else float(v) for v in np.asarray(a, np.float64).ravel()]  # noqa: E731
    report = {
        "run_dir": str(run_dir), "checkpoint": kind, "ssm_type": cfg.ssm_type, "seq_len": L, "t0": t0s,
        "pictures": pictures,
        "layers": {name: {
            "eigenvalues": cplx(e["trained"]), "eigenvalues_init": cplx(e["init"]),
            "timescales": real(e["timescales"]), "timescales_init": real(e["timescales_init"]),
            "steps": None if e["steps"] is None else real(e["steps"]),
            "impulse_time_variation": imp[name]["time_variation"],
            **({"aux_modulus_quantiles": np.asarray(aux[name]["quantiles"]).tolist(),
                "aux_clamped_fraction": aux[name]["clamped_fraction"]} if name in aux else {}),
            **({"extend_t": real(ext[name]["t"]), "extend_spectral_radius": real(ext[name]["radius"]),
                "extend_norm_2": real(ext[name]["norm_2"]),
                "extend_norm_inf": real(ext[name]["norm_inf"]), "extend_how": ext[name]["how"],
                "extend_delta": np.asarray(ext[name]["delta"]).tolist(),
                "extend_guard_scale_min": real(ext[name]["guard_scale_min"]),
                "extend_guard_scaled": ext[name]["guard_scaled"]} if name in ext else {}),
        } for name, e in eigs.items()},
        "epochs": epochs,
    }
    if memory:
        est = models.step_memory(cfg, meta)
        report["memory"] = {"bsz": cfg.bsz, "platform": jax.devices()[0].platform,
                            **{k: v for k, v in est.items() if k != "compile_s"}}
    (out / "inspect.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by train_ex.py")
    p.add_argument("--checkpoint", default="best", choices=("best", "latest"))
    p.add_argument("--t0", default=None, help="impulse times, comma-separated (default 0, L/4, L/2)")
    p.add_argument("--memory", action="store_true", help="also XLA's estimate of one training step at the run's "
                   "--bsz on this backend, in inspect.json (default: off; it compiles the step)")
    args = p.parse_args(argv)
    try:
        t0s = [int(t) for t in args.t0.split(",")] if args.t0 else None
    except ValueError:
        p.error(f"--t0 takes integers separated by commas, got {args.t0!r}")
    try:
        report = inspect(Path(args.run_dir), args.checkpoint, t0s, memory=args.memory)
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(report['pictures'])} and inspect.json into {Path(args.run_dir) / 'inspect'}")
    if "memory" in report:
        m = report["memory"]
        print(f"memory: XLA estimates {utils.gigabytes(m['total'])} per device for one training step at --bsz "
              f"{m['bsz']} on {m['platform']} (temporaries {utils.gigabytes(m['temp'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
