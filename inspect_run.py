"""Look inside a trained run: what its SSMs and time-varying terms learned, as PNGs and one inspect.json.

    python inspect_run.py RUN_DIR [--checkpoint best|latest] [--t0 0,256,512]

Reads RUN_DIR's checkpoint and config, rebuilds the model without the data, and writes into RUN_DIR/inspect/:
  eigenvalues.png   per layer, the discrete eigenvalues Λ̄ in the complex plane with the unit circle, at
                    initialisation (rebuilt from the config's seed) and trained (S6: exp(ΔA) at the bias step
                    Δ = softplus(b_Δ), i.e. for a zero input, as its transition depends on the input; LRU: λ)
  timescales.png    per layer, histograms of the timescales −1/ln|λ̄| (steps until |λ̄|^k falls to 1/e) and of
                    the learned steps Δ
  and the pictures an SSM type declares (ssm.SSMType.pictures), e.g. those of ssm_ex.py:
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
import ssm
import utils


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
    """(Λ̄ (n,) complex, steps Δ or None) of a layer, as its type's declaration computes them (ssm.SSMType.eigs)."""
    return _declaration(module).eigs(module, p)


def _declaration(module):
    return next(d for d in ssm.declarations() if type(module) is d.cls)


def timescales(Lambda_bar):
    """Steps until |λ̄|^k falls to 1/e: −1/ln|λ̄| (inf where |λ̄| ≥ 1)."""
    r = np.abs(np.asarray(Lambda_bar))
    with np.errstate(divide="ignore"):
        return np.where(r < 1, -1.0 / np.log(np.maximum(r, 1e-300)), np.inf)


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


def _grid(n):
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def plot_eigenvalues(path, layers):
    plt = utils.pyplot()
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
    utils.save_figure(plt, fig, path)


def plot_timescales(path, layers):
    plt = utils.pyplot()
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
    utils.save_figure(plt, fig, path)


def plot_impulse(path, impulses, channels=3):
    plt = utils.pyplot()
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
    utils.save_figure(plt, fig, path)


def plot_curves(path, epochs):
    """Loss and accuracy per epoch; for aux/extend runs a third panel: per layer, the fraction of (t, state) rows
    the stability guard scaled and the median scale (results.json's guard_scaled, guard_median_scale)."""
    plt = utils.pyplot()
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
    utils.save_figure(plt, fig, path)


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
    eigs, extra, imp = {}, {}, {}
    for name, module, p in trained:
        decl = _declaration(module)
        lam, steps = discrete_eigs(module, p)
        lam0, _ = discrete_eigs(module, init[name])
        eigs[name] = dict(trained=lam, init=lam0, timescales=timescales(lam), timescales_init=timescales(lam0),
                          steps=steps, step_note=decl.eigs_note)
        for picture in decl.pictures:  # the type's own pictures
            extra.setdefault(picture, {})[name] = picture.numbers(module, p, L)
        resp = impulse_responses(module, p, L, H, t0s)
        imp[name] = dict(responses=resp, time_variation=time_variation(resp, L))

    plot_eigenvalues(out / "eigenvalues.png", eigs)
    plot_timescales(out / "timescales.png", eigs)
    pictures = ["eigenvalues.png", "timescales.png"]
    for picture, layers in extra.items():
        picture.plot(out / picture.file, layers)
        pictures.append(picture.file)
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
            **{k: v for picture, layers in extra.items() for k, v in picture.report(layers[name]).items()},
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
