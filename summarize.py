"""Summarise a run_train_ex.sh series (or any folder of train_ex.py run directories).

    python summarize.py runs/series-listops-classification

Reads every results.json under the root (and the series_run.json that run_train_ex.sh puts beside it: group,
setting, seed, exit code) and writes into the root (or --out):

  summary.md       one row per setting: best validation accuracy and the test accuracy at the best validation
                   epoch as mean ± sample std over seeds, the test accuracy's 95% confidence interval (Student
                   t, scipy.stats), the paired difference to the group's baseline (same seed; the group's first S5
                   setting or --baseline) with its 95% interval (* where it excludes 0, unadjusted), the paired
                   t-test's p-value and its Holm adjustment over every comparison of the summary (** below 0.05),
                   parameters, the stability guard's activity (aux/extend), the tuned value, epochs, how many runs
                   peaked in their last two epochs, wall time, compute (all its runs, tuning included), steps/s,
                   status; the chance level of generated tasks; a tuned plan's grid (each candidate's validation
                   accuracy) and choice; for a time-varying regression (varying_gain) the test MSE beside the LTI
                   floor; then one row per run with its difference to the baseline
  summary.csv      the settings table, numbers unformatted (accuracies as fractions)
  runs.csv         one row per run
  val_acc_<group>.png   validation accuracy per epoch, one curve per run
  test_acc.png     test accuracy at the best validation epoch per setting, error bars = the 95% CI
  test_acc_diff.png  the paired differences to each group's baseline, error bars = their 95% CI

Works on a partial series: a run still running or interrupted counts with what it has so far, a failed run
(results.json status "failed", an exit code recorded by the series that utils.exit_status calls failed, or no
results.json at all) is a failed row; a run stopped by a signal (utils.INTERRUPTED_CODES) is interrupted.
The mean of a setting is over its finished runs; if none finished, over its partial ones; failed runs never count.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

from scipy import stats

import tasks
import utils

RESULTS, META = "results.json", "series_run.json"
PARTIAL = ("running", "interrupted")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def num(v):
    """A finite float, or None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def mean_std(values):
    """Mean and sample standard deviation (None for fewer than two values)."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def t975(df: int) -> float:
    """Student t's 0.975 quantile with df degrees of freedom (a two-sided 95% interval), from scipy.stats."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return float(stats.t.ppf(0.975, df))


def paired_p(diffs) -> float | None:
    """The two-sided p-value of a paired t-test that the mean of the paired differences is 0 (scipy.stats, the
    differences against zeros: ttest_rel); None for fewer than two pairs, 1 for differences that are all 0 and
    0 for a non-zero constant difference (no spread: scipy's nan)."""
    d = list(diffs)
    if len(d) < 2:
        return None
    if all(x == d[0] for x in d):
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_rel(d, [0.0] * len(d)).pvalue)


def holm(pvalues: list) -> list:
    """Holm's step-down adjustment of m p-values for a family of m comparisons (Holm 1979): sorted ascending,
    the i-th (0-based) becomes max over j ≤ i of min(1, (m − j)·p_(j)); returned in the input order. It controls the
    chance of any false claim in the family at the level the adjusted values are compared with."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def ci95(values):
    """(mean, sample std, half-width of the 95% confidence interval of the mean: t975(n - 1)·std/√n); std and
    half-width None for fewer than two values, all None for none."""
    m, s = mean_std(values)
    if s is None:
        return m, None, None
    return m, s, t975(len(values) - 1) * s / math.sqrt(len(values))


# --------------------------------------------------------------------------------------------------
# reading runs
# --------------------------------------------------------------------------------------------------


def find_run_dirs(root: Path):
    return sorted({p.parent for name in (RESULTS, META) for p in root.rglob(name) if "wandb" not in p.parts})


def load_run(root: Path, d: Path) -> dict:
    res = read_json(d / RESULTS)
    meta = read_json(d / META) or {}
    res = res if isinstance(res, dict) else None
    unreadable = res is None and (d / RESULTS).exists()  # truncated, damaged, not JSON
    cfg = (res or {}).get("config") or {}
    rel = d.relative_to(root).parts if d != root else (d.name,)

    # group / setting / seed: from the series' metadata, else from the layout <group>/<setting>/seed<k>
    m = re.fullmatch(r"seed(\d+)", rel[-1])
    parts = rel[:-1] if m else rel
    group = meta.get("group_label") or (parts[-2] if len(parts) >= 2 else "-")
    setting = meta.get("setting") or (parts[-1] if parts else d.name)
    seed = meta.get("seed", cfg.get("jax_seed", int(m.group(1)) if m else None))

    code = meta.get("exit_code")
    crashed = utils.exit_status(code) == "failed"
    if res is not None:
        status = res.get("status") or "unknown"
        if status in PARTIAL and crashed:
            status = "failed"  # the process died without writing its final status
        elif status in PARTIAL and utils.exit_status(code) == "interrupted":
            status = "interrupted"  # stopped by a signal (utils.INTERRUPTED_CODES): resumable
        elif status in PARTIAL and utils.exit_status(code) == "does not fit":
            status = "does not fit"  # a resumed run whose step no longer fits the device (utils.DOES_NOT_FIT)
    elif meta:
        status = "failed" if crashed else (meta.get("status") or "unknown")
    else:
        status = "unknown"
    if unreadable:
        status = "unreadable"

    epochs = [e for e in ((res or {}).get("epochs") or []) if isinstance(e, dict)]
    best = (res or {}).get("best") or {}
    val, test, best_epoch = num(best.get("val_acc")), num(best.get("test_acc")), best.get("epoch")
    if val is None:  # a results.json without `best` (e.g. written by hand): take it from the epochs
        scored = [e for e in epochs if num(e.get("val_acc")) is not None]
        by_bits = [e for e in scored if num(e.get("val_bpd")) is not None]  # a next-pixel run
        e = None
        for row in by_bits or scored:  # the epoch train_ex.py would have chosen
            e = row if utils.improves(e, row, next_step=bool(by_bits)) else e
        if e is not None:
            if by_bits:
                best = {"val_bpd": e["val_bpd"], "test_bpd": e.get("test_bpd")}
            val, test, best_epoch = num(e["val_acc"]), num(e.get("test_acc")), e.get("epoch")

    note = meta.get("note") or ""
    # the stability guard at the best epoch (aux/extend runs): the fraction of (t, state) rows it scaled and the
    # median scale, averaged over the layers; a run whose guard scaled most rows hardly let its extension act
    at_best = next((e for e in epochs if e.get("epoch") == best_epoch), {})
    scaled, scale = at_best.get("guard_scaled"), at_best.get("guard_median_scale")
    guard_scaled = sum(scaled) / len(scaled) if isinstance(scaled, list) and scaled else None
    guard_scale = sum(scale) / len(scale) if isinstance(scale, list) and scale else None
    floor = ((res or {}).get("lti_floor") or {}).get("test", {}).get("mse")
    test_loss = num(best.get("test_loss"))
    if floor is not None:  # a time-varying regression: its error beside the best time-invariant filter's
        mse = f"LTI floor {floor:.4f}" if test_loss is None else f"test MSE {test_loss:.4f} vs LTI floor {floor:.4f}"
        note = f"{mse}; {note}" if note else mse
    val_bpd, test_bpd = num(best.get("val_bpd")), num(best.get("test_bpd"))
    if val_bpd is not None:  # next-step prediction (train_ex --dataset mnist): its accuracies are per pixel
        test_text = "—" if test_bpd is None else f"{test_bpd:.4f}"
        bits = f"next-pixel model: best val {val_bpd:.4f} bits/dim, test {test_text}; accuracies per pixel"
        note = f"{bits}; {note}" if note else bits
    data = (res or {}).get("data") or {}
    generated = bool(data.get("generated"))
    if generated:  # not the published data set: its numbers do not compare with the papers' tables
        seed_text = f", generator seed {data['generator_seed']}" if data.get("generator_seed") is not None else ""
        note = f"GENERATED data{seed_text}; {note}" if note else f"GENERATED data{seed_text}"
    if (d / "inspect" / "inspect.json").exists():  # pictures from inspect_run.py
        link = f"[inspect]({(d.relative_to(root) if d != root else Path('.')) / 'inspect'}/)"
        note = f"{note}; {link}" if note else link
    if unreadable:
        note = f"{d.relative_to(root) / RESULTS if d != root else RESULTS} cannot be read; {note}".rstrip("; ")
    if status in ("failed", "unreadable") and (d / "train.log").exists():
        log = f"log {d.relative_to(root) / 'train.log'}"
        note = f"{note}; {log}" if note else log
    tuned = meta.get("tuned") if isinstance(meta.get("tuned"), dict) else None
    chance = None
    if cfg.get("dataset") in tasks.TASKS:
        try:
            chance = tasks.chance_level(cfg["dataset"], cfg.get("data_options"))
        except (ValueError, tasks.DataError):
            chance = None
    return dict(dir=str(d.relative_to(root)) if d != root else ".", group=group, setting=setting, seed=seed,
                ssm_type=cfg.get("ssm_type"), role=meta.get("role") or "run", tune_of=meta.get("tune_of"),
                tuned=tuned, lr=num(cfg.get("lr")), chance=chance,
                late_best=(best_epoch is not None and len(epochs) > 0 and best_epoch > len(epochs) - 2),
                order=meta.get("order"), status=status, exit_code=code, val=val, test=test, best_epoch=best_epoch,
                epochs=epochs, epochs_done=len(epochs), epochs_total=cfg.get("epochs"),
                wall=num((res or {}).get("wall_time_s")), steps_per_s=num((res or {}).get("steps_per_s")),
                n_params=(res or {}).get("n_params"), device=(res or {}).get("device"), note=note,
                generated=generated, val_bpd=val_bpd, test_bpd=test_bpd, guard_scaled=guard_scaled,
                guard_scale=guard_scale, test_loss=test_loss, lti_floor=num(floor))


def tuning(runs):
    """The tuning runs (role tune: SETTING/FLAG=VALUE/seedK) by (group, tuned setting): [(flag, value, run)]."""
    out = {}
    for r in runs:
        if r["role"] != "tune" or "/" not in r["setting"]:
            continue
        setting, candidate = r["setting"].rsplit("/", 1)
        flag, _, value = candidate.partition("=")
        out.setdefault((r["group"], setting), []).append((flag, value, r))
    for cands in out.values():  # in the order of the values (numbers ascending), as a plan lists a grid
        cands.sort(key=lambda c: (_number(c[1]) is None, _number(c[1]) or 0.0, c[1]))
    return out


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def summarise(runs):
    """One row per (group, setting), in series order; tuning runs (a plan's tune line) are not settings of their
    own: each row lists its candidates (`grid`), the value its runs used (`tuned`) and counts their compute."""
    grid = tuning(runs)
    runs = [r for r in runs if r["role"] != "tune"]
    keys = []
    for r in sorted(runs, key=lambda r: (r["order"] is None, r["order"] or 0, r["dir"])):
        if (r["group"], r["setting"]) not in keys:
            keys.append((r["group"], r["setting"]))
    rows = []
    for group, setting in keys:
        rs = sorted((r for r in runs if (r["group"], r["setting"]) == (group, setting)),
                    key=lambda r: (r["seed"] is None, r["seed"] if isinstance(r["seed"], int) else 0, r["dir"]))
        finished = [r for r in rs if r["status"] == "finished" and r["test"] is not None]
        partial = [r for r in rs if r["status"] in PARTIAL and r["test"] is not None]
        used = finished or partial
        val_m, val_s = mean_std([r["val"] for r in used if r["val"] is not None])
        test_m, test_s, test_ci = ci95([r["test"] for r in used])
        counts = {}
        for r in rs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        status = next(iter(counts)) if len(counts) == 1 else ", ".join(f"{n} {s}" for s, n in counts.items())
        if used and not finished:
            status += " (partial)"
        data = "generated" if any(r.get("generated") for r in rs) else "release"
        have = [r for r in rs if r["epochs_done"]]
        walls = [r["wall"] for r in have if r["wall"] is not None]
        sps = [r["steps_per_s"] for r in have if r["steps_per_s"] is not None]
        done = sorted({r["epochs_done"] for r in rs})
        totals = sorted({r["epochs_total"] for r in rs if r["epochs_total"] is not None})
        params = sorted({r["n_params"] for r in rs if isinstance(r["n_params"], int)})
        guarded = [r for r in used if r["guard_scaled"] is not None]
        cands = grid.get((group, setting), [])
        chosen = sorted({r["tuned"]["value"] for r in rs if r["tuned"]})
        compute = [r["wall"] for r in rs + [c[2] for c in cands] if r["wall"] is not None]
        chances = sorted({r["chance"] for r in rs if r["chance"] is not None})
        mse = [r for r in used if r["lti_floor"] is not None and r["test_loss"] is not None]
        rows.append(dict(group=group, setting=setting, seeds=[r["seed"] for r in rs], n=len(used), val_mean=val_m,
                         val_std=val_s, test_mean=test_m, test_std=test_s, test_ci=test_ci, epochs_done=done,
                         epochs_total=totals, used=used, ssm_types=sorted({r["ssm_type"] for r in rs if r["ssm_type"]}),
                         wall_time_s=sum(walls) / len(walls) if walls else None,
                         steps_per_s=sum(sps) / len(sps) if sps else None, n_params=params, status=status,
                         data=data, runs=rs,
                         guard_scaled=sum(r["guard_scaled"] for r in guarded) / len(guarded) if guarded else None,
                         guard_scale=sum(r["guard_scale"] for r in guarded) / len(guarded) if guarded else None,
                         test_mse=sum(r["test_loss"] for r in mse) / len(mse) if mse else None,
                         lti_floor=sum(r["lti_floor"] for r in mse) / len(mse) if mse else None,
                         grid=[(flag, value, c["val"], c["status"]) for flag, value, c in cands],
                         tune_runs=[c[2] for c in cands],
                         tuned=",".join(chosen) or None, compute_s=sum(compute) if compute else None,
                         late_best=sum(bool(r["late_best"]) for r in used), chance=chances[0] if chances else None))
    return rows


def paired_differences(rows, baseline=None):
    """Each setting's test accuracy minus its group's baseline's, seed by seed (runs with the same seed form a
    pair; only the runs counted in the settings' means): adds to every row `baseline` (the baseline setting's
    name, or None), `diffs` ({seed: difference}), `diff_mean`, `diff_std`, `diff_ci` (the 95% half-width of the
    mean difference), `diff_excludes_0` (the interval lies wholly above or below 0, unadjusted), `p` (paired
    t-test, two-sided) and `p_holm` (Holm-adjusted over every comparison of the summary). The baseline of a group
    is the setting named `baseline`, else its first S5 setting (ssm_type s5). → the groups without a baseline."""
    groups = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    missing = []
    for group in groups:
        members = [r for r in rows if r["group"] == group]
        if baseline is not None:
            base = next((r for r in members if r["setting"] == baseline), None)
        else:
            base = next((r for r in members if r["ssm_types"] == ["s5"]), None)
        if base is None:
            missing.append(group)
        ref = {r["seed"]: r["test"] for r in base["used"]} if base else {}
        for r in members:
            diffs = {} if base is None or r is base else {
                x["seed"]: x["test"] - ref[x["seed"]] for x in r["used"] if x["seed"] in ref}
            m, sd, ci = ci95(list(diffs.values()))
            r.update(baseline=base["setting"] if base else None, diffs=diffs, diff_mean=m, diff_std=sd, diff_ci=ci,
                     diff_excludes_0=ci is not None and abs(m) > ci, p=paired_p(diffs.values()), p_holm=None)
    # the family: every comparison with a p-value in this summary, adjusted together (Holm)
    family = [r for r in rows if r["p"] is not None]
    for r, adjusted in zip(family, holm([r["p"] for r in family])):
        r["p_holm"] = adjusted
    return missing


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def pct(m, s=None):
    if m is None:
        return "—"
    return f"{100 * m:.2f} ± {100 * s:.2f}" if s is not None else f"{100 * m:.2f}"


def interval(m, half):
    """A 95% interval in %: [lo, hi]; — without one."""
    if m is None or half is None:
        return "—"
    return f"[{100 * (m - half):.2f}, {100 * (m + half):.2f}]"


def fmt_diff(r):
    """A setting's mean paired difference to its baseline in percentage points with its 95% interval; a star
    where the interval excludes 0."""
    if r["baseline"] is None:
        return "—"
    if r["baseline"] == r["setting"]:
        return "baseline"
    if r["diff_mean"] is None:
        return "no pairs"
    text = f"{100 * r['diff_mean']:+.2f}"
    if r["diff_ci"] is None:
        return f"{text} (1 pair)"
    return f"{text} [{100 * (r['diff_mean'] - r['diff_ci']):+.2f}, {100 * (r['diff_mean'] + r['diff_ci']):+.2f}]" + (
        " *" if r["diff_excludes_0"] else "")


def fmt_p(r):
    """'0.0123 (0.0456) **': the paired t-test's p-value and its Holm-adjusted value; ** where that is below 0.05."""
    if r.get("p") is None:
        return "—"
    return f"{r['p']:.2g} ({r['p_holm']:.2g})" + (" **" if r["p_holm"] < 0.05 else "")


def fmt_time(s):
    if s is None:
        return "—"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def fmt_guard(r):
    """'45% ×0.88': the share of rows the guard scaled and the median scale; — for SSMs without a guard."""
    if r["guard_scaled"] is None:
        return "—"
    return f"{100 * r['guard_scaled']:.0f}% ×{r['guard_scale']:.2f}"


def fmt_num(v):
    return "—" if v is None else f"{v:.2f}"


def fmt_epochs(done, totals):
    d = "—" if not done else str(done[0]) if len(done) == 1 else f"{done[0]}–{done[-1]}"
    return f"{d}/{'/'.join(map(str, totals))}" if totals else d


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def join(xs):
    return ",".join("?" if x is None else str(x) for x in xs)


def write_markdown(path: Path, root: Path, rows, runs):
    L = [f"# Series summary: {root.name}", "",
         f"{len(runs)} run(s) in {len(rows)} setting(s) under `{root}`. Accuracies in %; *best val* = the best "
         "validation accuracy, *test at best val* = the test accuracy at that epoch; each is mean ± sample std over "
         "the seeds counted in *n* (finished runs; if none finished, the partial ones; failed runs never). "
         "*test 95% CI*: the 95% confidence interval of the mean test accuracy (Student t, n − 1 degrees of "
         "freedom). *Δ test vs baseline*: the test accuracy minus the group's baseline's (its first S5 setting, "
         "or --baseline) seed by seed, mean and 95% interval over the pairs in percentage points; * marks an "
         "interval that excludes 0 (a difference whose interval includes 0 is not shown to be one). "
         "*guard*: for aux/extend, the share of (t, state) rows of the transitions that the stability guard scaled "
         "at the best epoch and the median scale (means over layers and seeds; a guard that scales most rows "
         "far below 1 did not let the extension act). *p (Holm)*: the paired t-test's two-sided p-value of the "
         "difference to the baseline and, in brackets, Holm's adjustment over all the comparisons of this summary; "
         "** marks an adjusted p < 0.05, the only differences this summary calls shown (the interval's * is "
         "unadjusted). *tuned*: the value a tuned setting's runs used, chosen on validation (table below). "
         "*late best*: runs whose best epoch is one of their last two. Wall time and steps/s: mean per run; "
         "*compute*: the wall time of all its runs, tuning runs included.", "",
         "| group | setting | seeds | n | best val | test at best val | test 95% CI | Δ test vs baseline "
         "| p (Holm) | params | guard | tuned | epochs | late best | wall time | compute | steps/s | status |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['group']} | {r['setting']} | {join(r['seeds'])} | {r['n']} "
                 f"| {pct(r['val_mean'], r['val_std'])} | {pct(r['test_mean'], r['test_std'])} "
                 f"| {interval(r['test_mean'], r['test_ci'])} | {fmt_diff(r)} | {fmt_p(r)} "
                 f"| {'/'.join(f'{p:,}' for p in r['n_params']) or '—'} | {fmt_guard(r)} | {r['tuned'] or '—'} "
                 f"| {fmt_epochs(r['epochs_done'], r['epochs_total'])} | {r['late_best']}/{r['n']} "
                 f"| {fmt_time(r['wall_time_s'])} | {fmt_time(r['compute_s'])} "
                 f"| {fmt_num(r['steps_per_s'])} | {r['status']} |")
    counted = sum(r["n"] for r in rows)
    if counted:
        L += ["", f"Best epoch among a run's last two: {sum(r['late_best'] for r in rows)} of the {counted} runs "
              "counted above (such a run may not have finished learning)."]
    chance = {}
    for r in rows:
        if r["chance"] is not None:
            chance.setdefault(r["group"], r["chance"])
    if chance:
        L += ["", "Chance (the best input-blind guess): " + "; ".join(f"{g} {100 * c:.2f}" for g, c in chance.items())
              + "."]
    tuned = [r for r in rows if r["grid"]]
    if tuned:
        L += ["", "Tuning, on validation only: each candidate's run at the tuning seed, its best validation "
              "accuracy; the value with the highest was used for every seed (a failed candidate is out).", "",
              "| group | setting | " + " | ".join(f"{f}={v}" for f, v, *_ in tuned[0]["grid"]) + " | chosen |",
              "|---|---|" + "---|" * (len(tuned[0]["grid"]) + 1)]
        for r in tuned:
            cells = [pct(v) if status == "finished" else status for _, _, v, status in r["grid"]]
            L.append(f"| {r['group']} | {r['setting']} | " + " | ".join(cells) + f" | {r['tuned'] or '—'} |")
    floors = [r for r in rows if r["lti_floor"] is not None]
    if floors:
        L += ["", "Time-varying regression: the mean test MSE at the best validation epoch beside the *LTI floor*, "
              "the test MSE of the best linear time-invariant filter of the sequence's length fitted by least "
              "squares on the training set (below the floor: the model does what no LTI layer can).", "",
              "| group | setting | test MSE | LTI floor | ratio |", "|---|---|---|---|---|"]
        L += [f"| {r['group']} | {r['setting']} | {r['test_mse']:.4f} | {r['lti_floor']:.4f} "
              f"| {r['test_mse'] / r['lti_floor']:.3f} |" for r in floors]
    bases = sorted({f"{r['group']}: {r['baseline']}" for r in rows if r["baseline"] is not None})
    if bases:
        L += ["", "Baselines: " + "; ".join(bases) + "."]
    generated = [f"{r['group']}/{r['setting']}" for r in rows if r["data"] == "generated"]
    if generated:
        L += ["", f"**Generated data**, not the published release (numbers do not compare with the papers' tables): "
              f"{', '.join(generated)}."]
    unreadable = [r for r in runs if r["status"] == "unreadable"]
    if unreadable:
        L += ["", f"**{len(unreadable)} results.json cannot be read** (truncated or damaged; these runs count nowhere "
              f"above): " + ", ".join(f"`{Path(r['dir']) / RESULTS}`" for r in unreadable) + "."]
    L += ["", "## Runs", "", "| run | seed | status | epochs | best val | test at best val | Δ test vs baseline "
          "| wall time | note |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for r in row["runs"]:
            d = row["diffs"].get(r["seed"]) if any(r is u for u in row["used"]) else None
            L.append(f"| {r['dir']} | {r['seed']} | {r['status']} | "
                     f"{fmt_epochs([r['epochs_done']], [r['epochs_total']] if r['epochs_total'] else [])} | "
                     f"{pct(r['val'])} | {pct(r['test'])} | {'—' if d is None else f'{100 * d:+.2f}'} | "
                     f"{fmt_time(r['wall'])} | {cell(r['note'])} |")
    path.write_text("\n".join(L) + "\n")


def write_csvs(out: Path, rows):
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "setting", "seeds", "n", "val_mean", "val_std", "test_mean", "test_std", "epochs_done",
                    "epochs_total", "wall_time_s", "steps_per_s", "n_params", "status", "data", "test_ci95",
                    "baseline", "diff_n", "diff_mean", "diff_std", "diff_ci95", "diff_excludes_0", "guard_scaled",
                    "guard_scale", "test_mse", "lti_floor", "p", "p_holm", "tuned", "grid", "compute_s", "late_best",
                    "chance"])
        for r in rows:
            w.writerow([r["group"], r["setting"], " ".join(map(str, r["seeds"])), r["n"], r["val_mean"], r["val_std"],
                        r["test_mean"], r["test_std"], " ".join(map(str, r["epochs_done"])),
                        " ".join(map(str, r["epochs_total"])), r["wall_time_s"], r["steps_per_s"],
                        " ".join(map(str, r["n_params"])), r["status"], r["data"], r["test_ci"], r["baseline"],
                        len(r["diffs"]), r["diff_mean"], r["diff_std"], r["diff_ci"], r["diff_excludes_0"],
                        r["guard_scaled"], r["guard_scale"], r["test_mse"], r["lti_floor"], r["p"], r["p_holm"],
                        r["tuned"], " ".join(f"{f}={v}:{'' if x is None else x}" for f, v, x, _ in r["grid"]),
                        r["compute_s"], r["late_best"], r["chance"]])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ["dir", "group", "setting", "seed", "status", "exit_code", "val", "test", "best_epoch", "epochs_done",
                "epochs_total", "wall", "steps_per_s", "n_params", "device", "note", "val_bpd", "test_bpd",
                "guard_scaled", "guard_scale", "test_loss", "lti_floor", "role", "lr"]
        w.writerow(cols)
        for row in rows:
            for r in row["runs"] + row["tune_runs"]:
                w.writerow([r[c] for c in cols])


def safe(name):
    return re.sub(r"[^\w.-]+", "_", str(name))


def save_figure(fig, path):
    """Lay out, write (PNG, 100 dpi) and close a figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(out: Path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    groups = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    colours = plt.get_cmap("tab10")
    for group in groups:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        settings = [r for r in rows if r["group"] == group]
        curves = 0
        for i, row in enumerate(settings):
            labelled = False
            for run in row["runs"]:
                pts = [(e.get("epoch"), num(e.get("val_acc"))) for e in run["epochs"]]
                pts = [(x, y) for x, y in pts if x is not None and y is not None]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, color=colours(i % 10), alpha=0.85,
                        label=None if labelled else row["setting"])
                labelled, curves = True, curves + 1
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished epoch yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{group}: validation accuracy", xlabel="epoch", ylabel="validation accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out / f"val_acc_{safe(group)}.png"))

    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    heights = [r["test_mean"] or 0.0 for r in rows]
    errs = [r["test_ci"] or 0.0 for r in rows]
    cols = [colours(groups.index(r["group"]) % 10) for r in rows]
    ax.bar(xs, heights, yerr=errs, capsize=3, color=cols)
    for x, r in zip(xs, rows):
        if r["test_mean"] is None:
            ax.text(x, 0.01, "failed" if "failed" in r["status"] else "no result", rotation=90, ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"{r['group']}/{r['setting']}" for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="test accuracy at best val", title="test accuracy per setting (mean over seeds, 95% CI)")
    ax.grid(axis="y", alpha=0.3)
    written.append(save_figure(fig, out / "test_acc.png"))

    compared = [r for r in rows if r["baseline"] is not None and r["baseline"] != r["setting"]]
    if compared:
        fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(compared) + 2), 4.5))
        xs = range(len(compared))
        means = [100 * (r["diff_mean"] or 0.0) for r in compared]
        errs = [100 * (r["diff_ci"] or 0.0) for r in compared]
        cols = [colours(groups.index(r["group"]) % 10) for r in compared]
        ax.bar(xs, means, yerr=errs, capsize=3, color=cols)
        ax.axhline(0.0, color="black", lw=0.8)
        for x, r, m, e in zip(xs, compared, means, errs):
            if r["p_holm"] is not None and r["p_holm"] < 0.05:
                ax.text(x, m + (e if m >= 0 else -e), "**", ha="center", va="bottom" if m >= 0 else "top")
            elif r["diff_mean"] is None:
                ax.text(x, 0.0, "no pairs", rotation=90, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"{r['group']}/{r['setting']} − {r['baseline']}" for r in compared], rotation=60,
                      ha="right", fontsize=8)
        ax.set(ylabel="Δ test accuracy (percentage points)",
               title="paired difference to the group's baseline, same seed (mean, 95% CI; ** Holm p < 0.05)")
        ax.grid(axis="y", alpha=0.3)
        written.append(save_figure(fig, out / "test_acc_diff.png"))
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the series' output root (OUT_ROOT of run_train_ex.sh): searched recursively")
    parser.add_argument("--out", default=None, help="where to write the summary (default: the root)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--baseline", default=None, help="the setting every other setting of its group is "
                        "compared with, seed by seed (default: each group's first S5 setting)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not root.is_dir():
        print(f"summarize.py: error: no folder {root}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve() if args.out else root
    out.mkdir(parents=True, exist_ok=True)

    runs = [load_run(root, d) for d in find_run_dirs(root)]
    rows = summarise(runs)
    missing = paired_differences(rows, args.baseline)
    if args.baseline is not None and rows and len(missing) == len({r["group"] for r in rows}):
        print(f"summarize.py: error: --baseline {args.baseline!r} is no setting of any group; settings: "
              f"{', '.join(sorted({r['setting'] for r in rows}))}", file=sys.stderr)
        return 2
    write_markdown(out / "summary.md", root, rows, runs)
    write_csvs(out, rows)
    plots = write_plots(out, rows) if args.plots and rows else []
    n_failed = sum(r["status"] == "failed" for r in runs)
    unreadable = [root / r["dir"] / RESULTS for r in runs if r["status"] == "unreadable"]
    for path in unreadable:
        print(f"summarize.py: warning: {path} cannot be read (truncated or damaged): its run counts nowhere",
              file=sys.stderr)
    print(f"summary of {len(runs)} run(s) in {len(rows)} setting(s), {n_failed} failed, {len(unreadable)} "
          f"unreadable: {out / 'summary.md'}, summary.csv, runs.csv" + (f", {len(plots)} plot(s)" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
