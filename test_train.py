"""models.py and train_ex.py in one process: learning, the release's equations, padding, resume, NaN, freeze, the
CLI and TRAINING.md's S5 recipes, real MNIST. Subprocess, multi-device and multi-process runs: test_cluster.py."""

import functools
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import config
import dataloaders
import models
import train_ex

HERE = Path(__file__).resolve().parent
os.environ["WANDB_MODE"] = "disabled"
TINY = ["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4", "--bsz", "8", "--p_dropout", "0"]
# training subprocesses compile as the in-process tests do (conftest.py): XLA's heavy passes off
SUBPROCESS_ENV = {"JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "WANDB_MODE": "disabled"}


def mnist_args(root, run_dir, *extra):
    return ["--dataset", "mnist-classification", "--dir_name", str(root), "--downsample", "4", "--run_dir",
            str(run_dir), "--max_train_samples", "64", "--max_eval_samples", "16", "--warmup_end", "0", *TINY,
            *extra]


def results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def token_batch(rng, B=4, L=24, vocab=12, min_len=5):
    lengths = rng.integers(min_len, L + 1, B)
    tokens = rng.integers(3, vocab, (B, L))
    tokens[np.arange(L)[None, :] >= lengths[:, None]] = 0
    return {"inputs": jnp.asarray(tokens), "lengths": jnp.asarray(lengths),
            "labels": jnp.asarray(rng.integers(0, 3, B)), "weights": jnp.ones(B)}


SSM_VARIANTS = [["--ssm_type", "s5"], ["--ssm_type", "aux"], ["--enable_auxiliary_state"],
                ["--ssm_type", "extend", "--extend_mode", "full", "--R", "2"],
                ["--ssm_type", "extend", "--extend_mode", "diag", "--delta_type", "sinusoidal", "--R", "2"],
                ["--ssm_type", "s4"], ["--ssm_type", "s4d", "--s4d_init", "lin"], ["--ssm_type", "dss"]]


@pytest.mark.parametrize("variant", [v if i in (0, 3) else pytest.param(v, marks=pytest.mark.slow)  # s5, extend full
                                     for i, v in enumerate(SSM_VARIANTS)],
                         ids=lambda v: "-".join(a.strip("-") for a in v))
def test_train_steps_lower_the_loss(variant):
    cfg = train_ex.parse_args(["--d_model", "16", "--n_layers", "2", "--ssm_size_base", "8", "--lr", "3e-3",
                               "--p_dropout", "0", "--warmup_end", "0", "--epochs", "1", *variant])
    meta = dict(n_classes=3, seq_len=24, in_dim=12, tokens=True, pair=False)
    model = models.build_model(cfg, meta)
    batch = token_batch(np.random.default_rng(0))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    tx, _ = models.make_optimizer(variables["params"], cfg, steps_per_epoch=100)

    def loss_fn(params, stats):
        logits, upd = model.apply({"params": params, "batch_stats": stats}, batch, training=True,
                                  mutable=["batch_stats"])
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), batch["labels"]]), upd["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = tx.update(g, opt_state, params)
        return jax.tree_util.tree_map(jnp.add, params, updates), stats, opt_state, loss

    params, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
    losses = []
    for _ in range(8):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("variant", [["--ssm_type", "s5", "--bidirectional"],
                                     pytest.param(["--ssm_type", "aux"], marks=pytest.mark.slow),
                                     ["--ssm_type", "extend", "--R", "2"]], ids=["s5-bidir", "aux", "extend"])
@pytest.mark.parametrize("mode", ["pool", pytest.param("last", marks=pytest.mark.slow)])
def test_padding_does_not_change_outputs(variant, mode):
    cfg = train_ex.parse_args(["--d_model", "8", "--n_layers", "2", "--ssm_size_base", "4", "--mode", mode, *variant])
    model = models.build_model(cfg, dict(n_classes=3, seq_len=40, in_dim=12, tokens=True, pair=False))
    batch = token_batch(np.random.default_rng(1), L=20)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    padded = dict(batch, inputs=jnp.pad(batch["inputs"], ((0, 0), (0, 20))))
    padded_junk = dict(batch, inputs=padded["inputs"].at[:, 20:].set(7))  # whatever the padding holds
    apply = jax.jit(model.apply)
    out = apply(variables, batch)
    np.testing.assert_allclose(apply(variables, padded), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(variables, padded_junk), out, rtol=1e-5, atol=1e-5)


def test_pool_averages_real_positions_only():
    x = jnp.arange(12.0).reshape(1, 6, 2)
    np.testing.assert_allclose(models.pool(x, jnp.array([3]), "pool"), [[2.0, 3.0]])
    np.testing.assert_allclose(models.pool(x, jnp.array([3]), "last"), [[4.0, 5.0]])


def test_retrieval_head_shapes():
    cfg = train_ex.parse_args(["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4"])
    model = models.build_model(cfg, dict(n_classes=2, seq_len=20, in_dim=12, tokens=True, pair=True))
    rng = np.random.default_rng(0)
    a, b = token_batch(rng, L=20), token_batch(rng, L=20)
    batch = dict(a, inputs2=b["inputs"], lengths2=b["lengths"])
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    assert jax.jit(model.apply)(variables, batch).shape == (4, 2)


def test_parameter_groups():
    cfg = train_ex.parse_args(["--opt_config", "BandCdecay", "--ssm_type", "extend"])
    path = lambda *names: [jax.tree_util.DictKey(n) for n in names]  # noqa: E731
    assert models.param_label(path("layer_0", "ssm", "B"), cfg, False) == "ssm_decay"
    assert models.param_label(path("layer_0", "ssm", "C"), cfg, False) == "regular"
    assert models.param_label(path("layer_0", "ssm", "Lambda_re"), cfg, False) == "ssm"
    assert models.param_label(path("layer_0", "ssm", "E"), cfg, False) == "ssm"
    assert models.param_label(path("layer_0", "out2", "kernel"), cfg, False) == "regular"
    assert models.param_label(path("layer_0", "ssm", "B"), cfg, True) == "frozen"
    assert models.param_label(path("layer_0", "ssm", "F"), cfg, True) == "ssm"
    dt = train_ex.parse_args(["--dt_global"])
    assert models.param_label(path("layer_0", "ssm", "log_step"), dt, False) == "regular"


# --------------------------------------------------------------------------------------------------
# the CLI and runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--ssm_size_base", "10", "--blocks", "3"], "not divisible by --blocks"),
    (["--dataset", "nope"], "invalid choice"),
    (["--ssm_type", "extend", "--R", "0"], "--R must be at least 1"),
    (["--ssm_size_base", "6", "--blocks", "2"], "even block size"),
    (["--freeze", "base"], "needs --load_checkpoint"),
    (["--resume"], "needs --run_dir"),
    (["--downsample", "2"], "mnist"),
    (["--ssm_type", "s4d", "--ssm_size_base", "7"], "must be even"),
    (["--ssm_type", "s5", "--R", "4"], "--R is an option of --ssm_type extend"),
    (["--ssm_type", "lru", "--s6_state_size", "8"], "--s6_state_size is an option of --ssm_type s6"),
    (["--ssm_type", "s4", "--blocks", "2"], "--blocks is an option of --ssm_type s5, aux, extend"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_ex.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_gives_every_option_a_help_line_and_its_default():
    """`train_ex.py --help` lists every option with what it does and its default: an option without a help line
    (argparse then prints neither) or whose default is not shown fails here."""
    parser = config.make_parser()
    parser.formatter_class = functools.partial(config.HelpFormatter, width=10**6)  # no line wrapped
    text = " ".join(parser.format_help().split())
    checked = 0
    for action in parser._actions:
        if action.dest == "help":
            continue
        name = action.option_strings[0]
        assert action.help and action.help.strip(), f"{name} has no help line"
        line = " ".join(action.help.split())
        if "default" not in line:  # else the help line says its default itself (one that depends on other options)
            line += f" (default: {action.default})"
        assert line in text, f"{name}: --help does not show {line!r}"
        checked += 1
    assert checked == len(parser._actions) - 1 > 70
    assert f"(default: {models.MODEL_DEFAULTS['d_model']})" in text  # the model's defaults come from models.py


def test_readme_lists_every_ssm_type():
    """The README's --ssm_type table names exactly the types the command line accepts."""
    text = (HERE / "README.md").read_text()
    table = text.split("| `--ssm_type` |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    assert sorted(rows) == sorted(models.SSM_TYPES) and len(rows) == len(set(rows))


def test_training_md_lists_the_options_that_may_change_on_resume():
    text = " ".join((HERE / "TRAINING.md").read_text().split())
    listed = text.split("(`config.RESUME_MAY_CHANGE`):", 1)[1].split(".", 1)[0]
    assert re.findall(r"`--(\w+)`", listed) == list(config.RESUME_MAY_CHANGE)


def test_enable_auxiliary_state_is_aux():
    assert train_ex.parse_args(["--enable_auxiliary_state", "--time_scale_type", "sinusoidal"]).ssm_type == "aux"


def test_run_progress_is_the_whole_runs_time_and_time_left(monkeypatch):
    loop = SimpleNamespace(cfg=SimpleNamespace(epochs=50, max_steps=None), steps_per_epoch=3000)
    monkeypatch.setattr(train_ex.time, "perf_counter", lambda: 100.0)
    # a resumed run: 2 h in earlier sessions, 100 s of this epoch, 1,500 of 150,000 steps done
    line = train_ex.run_progress(loop, {"wall_time_s": 7100.0, "step": 1500}, t0=0.0)
    assert line == "run 2:00:00 elapsed, ~8d 6:00:00 left for 148,500 of 150,000 steps", line
    assert train_ex.run_progress(loop, {"wall_time_s": 0.0, "step": 0}, t0=100.0).startswith("run 0:00:00 elapsed, ? ")
    loop.cfg.max_steps = 3000
    assert train_ex.run_progress(loop, {"wall_time_s": 0.0, "step": 1000}, t0=0.0).endswith(
        "~0:03:20 left for 2,000 of 3,000 steps")


def test_run_writes_results_and_checkpoints(mnist_root, tmp_path, capsys):
    assert train_ex.main(mnist_args(mnist_root, tmp_path / "r", "--epochs", "2")) == 0
    steps = 2 * (64 // 8)  # 2 epochs of 64 training samples in batches of 8
    err = capsys.readouterr().err  # each epoch's bar starts with the whole run's line: at epoch 2, half is left
    assert f"epoch 1/2 | run 0:00:00 elapsed, ? left for {steps} of {steps} steps" in err
    clock = r"\d+:\d\d:\d\d"
    assert re.search(rf"epoch 2/2 \| run {clock} elapsed, ~{clock} left for {steps // 2} of {steps} steps", err)
    res = results(tmp_path / "r")
    assert res["status"] == "finished" and len(res["epochs"]) == 2 and res["n_params"] > 0
    assert set(res["epochs"][0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
                                     "seconds"}
    best = max(res["epochs"], key=lambda r: r["val_acc"])
    assert res["best"]["val_acc"] == best["val_acc"] and res["best"]["test_acc"] == best["test_acc"]
    for f in ("ckpt_latest.msgpack", "ckpt_best.msgpack", "ckpt_latest.json"):
        assert (tmp_path / "r" / f).exists()
    # eval_only reproduces the last epoch's numbers from the checkpoint
    assert train_ex.main(mnist_args(mnist_root, tmp_path / "e", "--eval_only", "--load_checkpoint",
                                    str(tmp_path / "r" / "ckpt_latest.msgpack"))) == 0


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(mnist_root, tmp_path):
    args = lambda d, *x: mnist_args(mnist_root, tmp_path / d, "--epochs", "2", *x)  # noqa: E731
    assert train_ex.main(args("full")) == 0
    assert train_ex.main(args("cut", "--max_steps", "11")) == 0  # stops mid-epoch 2 (8 steps an epoch)
    assert results(tmp_path / "cut")["status"] == "interrupted"
    # the run directory alone: its own options, not train_ex.py's defaults (another dataset, model, budget)
    assert train_ex.main(["--resume", "--run_dir", str(tmp_path / "cut")]) == 0
    full, cut = results(tmp_path / "full"), results(tmp_path / "cut")
    assert cut["status"] == "finished" and len(cut["epochs"]) == 2 and cut["config"]["max_steps"] is None
    for a, b in zip(full["epochs"], cut["epochs"]):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_resume_refuses_other_options_and_extends_by_epochs(mnist_root, tmp_path, capsys):
    assert train_ex.main(mnist_args(mnist_root, tmp_path / "a", "--epochs", "1")) == 0
    with pytest.raises(SystemExit) as e:  # every difference listed, before any data is read
        train_ex.main(mnist_args(mnist_root, tmp_path / "a", "--resume", "--n_layers", "2", "--lr", "0.01"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "n_layers: checkpoint 1 vs now 2" in err and "lr: checkpoint 0.001 vs now 0.01" in err
    assert "--epochs" in err.split("only these may change")[1]
    # --epochs may change: the run goes on to epoch 2 with its own options
    assert train_ex.main(["--resume", "--run_dir", str(tmp_path / "a"), "--epochs", "2"]) == 0
    res = results(tmp_path / "a")
    assert res["status"] == "finished" and [r["epoch"] for r in res["epochs"]] == [1, 2]
    assert res["config"]["dataset"] == "mnist-classification" and res["config"]["d_model"] == 8


def test_non_finite_loss_stops_the_run(mnist_root, tmp_path, capsys):
    code = train_ex.main(mnist_args(mnist_root, tmp_path / "nan", "--epochs", "3", "--lr", "1e30", "--log_every", "1"))
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss in epoch" in err and "steps" in err
    assert results(tmp_path / "nan")["status"] == "failed"


@pytest.mark.slow
def test_freeze_trains_only_the_extension(mnist_root, tmp_path):
    assert train_ex.main(mnist_args(mnist_root, tmp_path / "s5", "--epochs", "1")) == 0
    ckpt = tmp_path / "s5" / "ckpt_latest.msgpack"
    assert train_ex.main(mnist_args(mnist_root, tmp_path / "ex", "--epochs", "1", "--ssm_type", "extend", "--R", "2",
                                    "--delta_type", "sinusoidal", "--load_checkpoint", str(ckpt),
                                    "--freeze", "base")) == 0
    before = serialization.msgpack_restore(ckpt.read_bytes())["params"]
    after = serialization.msgpack_restore((tmp_path / "ex" / "ckpt_latest.msgpack").read_bytes())["params"]
    changed = []

    def walk(a, b, path):
        if isinstance(b, dict):
            for k in b:
                walk(a.get(k) if isinstance(a, dict) else None, b[k], path + (k,))
        elif a is None:
            changed.append(path)  # an extension leaf, absent from S5
            assert path[-1] in ("E", "F", "delta_amp", "delta_table")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"frozen leaf {path} changed")

    walk(before, after, ())
    e_leaves = [p for p in changed if p[-1] == "E"]
    assert e_leaves
    for p in e_leaves:
        leaf = after
        for k in p:
            leaf = leaf[k]
        assert np.abs(leaf).max() > 0, "E started at zero and must have been trained"


@pytest.mark.slow
def test_real_mnist_learns(mnist_root, tmp_path):
    """A small S5 on real MNIST test images (conftest.mnist_root: 2,700 for training, 300 held out, 14×14 pixels),
    for about 250 optimiser steps of 64 images (6 epochs here; the bar was set for 2 epochs of 8,000 images)."""
    args = ["--dataset", "mnist-classification", "--dir_name", str(mnist_root), "--downsample", "2", "--run_dir",
            str(tmp_path / "m"), "--epochs", "6", "--bsz", "64", "--d_model", "32", "--n_layers", "2",
            "--ssm_size_base", "16", "--blocks", "2", "--max_eval_samples", "300",
            "--lr", "4e-3", "--p_dropout", "0", "--warmup_end", "0"]
    assert train_ex.main(args) == 0
    res = results(tmp_path / "m")
    val_acc = res["epochs"][-1]["val_acc"]
    assert res["data"]["sizes"]["train"] * 6 >= 250 * 64  # what the 0.6 bar was set for: ~250 steps of 64 images
    print(f"real MNIST (14x14, sizes {res['data']['sizes']}, 6 epochs): val accuracy {val_acc:.3f}")
    assert val_acc > 0.6, f"chance is 0.1; reached {val_acc}"


# --------------------------------------------------------------------------------------------------
# No dense linear algebra in any step, and no hang, for every ssm_type
# --------------------------------------------------------------------------------------------------

LINALG_TARGETS = ("lapack", "solver", "getrf", "geqrf", "geev", "heevd", "syevd", "potrf", "trsm", "gesdd")
EVERY_TYPE = [["--ssm_type", t] for t in models.SSM_TYPES] + [["--ssm_type", "extend", "--extend_mode", "diag"]]


def custom_call_targets(lowered_text):
    import re

    return set(re.findall(r"custom_call\s*@([\w.]+)", lowered_text)) | set(
        re.findall(r'custom_call_target\s*=\s*"([\w.]+)"', lowered_text))


@pytest.mark.parametrize("variant", [v if v[1] in ("s5", "extend") else pytest.param(v, marks=pytest.mark.slow)
                                     for v in EVERY_TYPE], ids=lambda v: "-".join(v[1::2]))
def test_train_and_eval_steps_have_no_dense_linear_algebra(variant):
    """jaxlib's LAPACK kernels can deadlock XLA's CPU thread pool (two at once on 2 cores): none may appear in a
    lowered train or eval step (they would show as custom calls such as lapack_cgetrf_ffi)."""
    cfg = train_ex.parse_args([*TINY, *variant, *(["--R", "2"] if "extend" in variant else [])])
    meta = dict(n_classes=3, seq_len=16, in_dim=1, tokens=False, pair=False)
    model = models.build_model(cfg, meta)
    batch = {"inputs": jnp.zeros((8, 16, 1)), "lengths": jnp.full(8, 16), "labels": jnp.zeros(8, jnp.int32),
             "weights": jnp.ones(8)}
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))
    tx, _ = models.make_optimizer(variables["params"], cfg, steps_per_epoch=10)
    state = jax.eval_shape(lambda: models.new_state(variables["params"], variables.get("batch_stats", {}), tx))
    train_step, eval_step = models.make_steps(model, tx, jax.random.PRNGKey(1))
    for name, text in (("train", jax.jit(train_step).lower(state, batch, 0).as_text()),
                       ("eval", jax.jit(eval_step).lower(state, batch).as_text())):
        bad = {t for t in custom_call_targets(text) if any(k in t.lower() for k in LINALG_TARGETS)}
        assert not bad, f"{name} step of {variant} calls dense linear algebra: {sorted(bad)}"


def test_linalg_check_can_fail():
    """The check above sees a solve when there is one."""
    text = jax.jit(jnp.linalg.solve).lower(jnp.eye(3, dtype=jnp.complex64), jnp.ones(3, jnp.complex64)).as_text()
    assert any("lapack" in t or "solver" in t for t in custom_call_targets(text))


# --------------------------------------------------------------------------------------------------
# The whole model against the S5 release's equations, written out here
# --------------------------------------------------------------------------------------------------


def np_gelu(x):  # flax's (and the release's) default GELU: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_batchnorm(p, stats, x, eps=1e-5):
    """Evaluation mode: running statistics."""
    mean, var = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def np_activation(kind, p, y):
    """The release's SequenceLayer activations (dropout off)."""
    g = np_gelu(y)
    if kind == "full_glu":
        return np_dense(p["out1"], g) * np_sigmoid(np_dense(p["out2"], g))
    if kind == "half_glu1":
        return g * np_sigmoid(np_dense(p["out2"], g))
    if kind == "half_glu2":
        return y * np_sigmoid(np_dense(p["out2"], g))
    assert kind == "gelu"
    return g


@pytest.mark.parametrize("activation", models.ACTIVATIONS)
@pytest.mark.parametrize("prenorm", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_whole_model_equals_release_equations(activation, prenorm):
    from test_ssm import module_reference

    cfg = train_ex.parse_args(["--d_model", "6", "--n_layers", "2", "--ssm_size_base", "8", "--blocks", "2",
                               "--bidirectional", "--conj_sym", "--batchnorm", "--activation_fn", activation,
                               "--prenorm" if prenorm else "--no-prenorm"])
    L, B, in_dim = 13, 3, 2
    model = models.build_model(cfg, dict(n_classes=4, seq_len=L, in_dim=in_dim, tokens=False, pair=False))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.normal(size=(B, L, in_dim)), jnp.float32), "lengths": jnp.full(B, L),
             "labels": jnp.zeros(B, jnp.int32), "weights": jnp.ones(B)}
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    stats = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32),
                                   variables["batch_stats"])  # running statistics away from (0, 1)
    logits = jax.jit(model.apply)({"params": variables["params"], "batch_stats": stats}, batch)

    p = variables["params"]["encoder"]
    x = np_dense(p["encoder"], np.asarray(batch["inputs"], np.float64))
    for i in range(cfg.n_layers):
        lp, ls = p[f"layer_{i}"], stats["encoder"][f"layer_{i}"]
        skip = x
        if prenorm:
            x = np_batchnorm(lp["norm"], ls["norm"], x)
        y = np.stack([module_reference(lp["ssm"], x[b], True, True, "zoh") for b in range(B)])
        x = skip + np_activation(activation, lp, y)
        if not prenorm:
            x = np_batchnorm(lp["norm"], ls["norm"], x)
    ref = np_dense(variables["params"]["decoder"], x.mean(axis=1))
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=2e-4, atol=2e-5 * np.abs(ref).max())


def test_the_four_activations_differ():
    """The equations above tell the activations apart on the same input (so the test above can fail)."""
    rng = np.random.default_rng(1)
    p = {k: {"kernel": rng.normal(size=(4, 4)), "bias": rng.normal(size=4)} for k in ("out1", "out2")}
    y = rng.normal(size=(5, 4))
    outs = [np_activation(a, p, y) for a in models.ACTIVATIONS]
    for i in range(len(outs)):
        for j in range(i):
            assert np.max(np.abs(outs[i] - outs[j])) > 1e-2


# --------------------------------------------------------------------------------------------------
# S5 parity: padding, token encoder, retrieval batch, learning-rate schedule, splits
# --------------------------------------------------------------------------------------------------


def test_no_mask_padding_lets_the_scans_see_the_padding():
    """--no-mask_padding is the release's behaviour: the bidirectional scan crosses the pads, so what they hold
    changes the output (pooling still averages the real positions only)."""
    cfg = train_ex.parse_args(["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4", "--bidirectional",
                               "--no-mask_padding"])
    model = models.build_model(cfg, dict(n_classes=3, seq_len=40, in_dim=12, tokens=True, pair=False))
    batch = token_batch(np.random.default_rng(1), L=20)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    padded = dict(batch, inputs=jnp.pad(batch["inputs"], ((0, 0), (0, 20))))
    apply = jax.jit(model.apply)
    assert np.max(np.abs(np.asarray(apply(variables, padded) - apply(variables, batch)))) > 1e-4


def test_onehot_token_encoder_is_a_dense_layer_on_one_hot_tokens():
    cfg = train_ex.parse_args(["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4"])
    assert cfg.token_encoder == "onehot"
    enc = models.OneHotDense(12, 8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 12, (3, 5)))
    p = enc.init(jax.random.PRNGKey(0), tokens)["params"]
    p = {"kernel": p["kernel"], "bias": jnp.linspace(-1, 1, 8)}
    ref = jax.nn.one_hot(tokens, 12) @ p["kernel"] + p["bias"]
    np.testing.assert_allclose(enc.apply({"params": p}, tokens), ref, rtol=1e-6, atol=1e-6)
    std = float(np.std(np.asarray(models.OneHotDense(135, 256).init(jax.random.PRNGKey(1), tokens)["params"]
                                  ["kernel"])))
    assert abs(std - 1 / np.sqrt(135)) < 0.1 / np.sqrt(135)  # lecun-normal over the one-hot width, as nn.Dense


def test_onehot_encoder_takes_the_datasets_width():
    """The one-hot encoder is as wide as the dataset's onehot_width (the release's 20 for ListOps' 18 tokens; its
    lecun-normal scale is then 1/√20, the test above); --token_encoder embed keeps the vocabulary; a model_meta
    saved without onehot_width rebuilds at the vocabulary."""
    meta = dict(n_classes=3, seq_len=24, in_dim=18, tokens=True, pair=False, onehot_width=20)
    batch = token_batch(np.random.default_rng(0), vocab=18)
    older = {k: v for k, v in meta.items() if k != "onehot_width"}
    for encoder, ds_meta, rows in (("onehot", meta, 20), ("embed", meta, 18), ("onehot", older, 18)):
        cfg = train_ex.parse_args(["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4",
                                   "--token_encoder", encoder])
        params = jax.eval_shape(models.build_model(cfg, ds_meta).init, jax.random.PRNGKey(0), batch)["params"]
        table = params["encoder"]["encoder"]["kernel" if encoder == "onehot" else "embedding"]
        assert table.shape == (rows, 8), (encoder, ds_meta)


def test_retrieval_encodes_both_documents_in_one_batch():
    """One BatchNorm statistic over both documents (the release's single 2B pass): after one training-mode call
    the first norm's running mean is (1 − momentum) × the mean of the encoder outputs of all 2B documents."""
    cfg = train_ex.parse_args(["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4", "--bn_momentum", "0.9"])
    model = models.build_model(cfg, dict(n_classes=2, seq_len=20, in_dim=12, tokens=True, pair=True))
    rng = np.random.default_rng(0)
    a, b = token_batch(rng, L=20), token_batch(rng, L=20)
    batch = dict(a, inputs2=b["inputs"], lengths2=b["lengths"])
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    _, upd = jax.jit(lambda v, b: model.apply(v, b, training=True, mutable=["batch_stats"],
                                              rngs={"dropout": jax.random.key(0)}))(variables, batch)
    enc = variables["params"]["encoder"]["encoder"]
    x = np.concatenate([np.asarray(enc["kernel"])[np.asarray(t)] for t in (a["inputs"], b["inputs"])])
    x = x + np.asarray(enc["bias"])
    np.testing.assert_allclose(upd["batch_stats"]["encoder"]["layer_0"]["norm"]["mean"], 0.1 * x.mean(axis=(0, 1)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warmup_end,cosine", [(1, True), (0, True), (2, False)])
def test_schedule_is_the_release_per_step_update(warmup_end, cosine):
    """Emulates the release's loop: the rate starts at base, and after every step it is set to
    decay(step, base, end_step) with the epoch's decay function and the global step counter."""
    spe, epochs, base, lr_min = 4, 5, 2e-3, 1e-5
    cfg = train_ex.parse_args(["--epochs", str(epochs), "--warmup_end", str(warmup_end), "--lr_min", str(lr_min),
                               "--cosine_anneal" if cosine else "--no-cosine_anneal"])
    rates, current, step = [], base, 0
    for epoch in range(epochs):
        if epoch < warmup_end:
            decay, end = (lambda s, e: base * (s + 1) / e), spe * warmup_end
        elif cosine:
            decay, end = (lambda s, e: (base - lr_min) * 0.5 * (1 + np.cos(np.pi * min(s, e) / e)) + lr_min,
                          spe * epochs - spe * warmup_end)
        else:
            decay, end = (lambda s, e: base), None
        for _ in range(spe):
            rates.append(current)
            current = decay(step, end)
            step += 1
    lr = models.lr_schedule(base, cfg, spe)
    np.testing.assert_allclose([float(lr(k)) for k in range(len(rates))], rates, rtol=1e-5, atol=1e-9)


def test_split_does_not_move_with_jax_seed(tmp_path):
    from test_data import make_pathfinder

    make_pathfinder(tmp_path, empty=())
    dataloaders.load("pathfinder-classification", tmp_path, workers=1)  # the cache, built without a process pool
    tests = []
    for seed in ("1", "2"):
        cfg = train_ex.parse_args(["--dataset", "pathfinder-classification", "--dir_name", str(tmp_path),
                                   "--jax_seed", seed])
        tests.append(np.asarray(train_ex.load_data(cfg)[3].inputs))
    np.testing.assert_array_equal(tests[0], tests[1])
    cfg = train_ex.parse_args(["--dataset", "pathfinder-classification", "--dir_name", str(tmp_path),
                               "--split_seed", "7"])
    assert not np.array_equal(np.asarray(train_ex.load_data(cfg)[3].inputs), tests[0])


# The S5 release's run_train.py settings per task (its published recipe table), written out here.
RELEASE_RECIPES = {  # dataset: (C_init, blocks, bsz, d_model, ssm_size, n_layers, epochs, ssm_lr, lr_factor,
    #                            opt_config, dropout, weight_decay, other settings)
    "listops-classification": ("lecun_normal", 8, 50, 128, 16, 8, 40, 1e-3, 3, "BfastandCdecay", 0.0, 0.04,
                               dict(activation_fn="half_glu2")),
    "imdb-classification": ("lecun_normal", 12, 50, 256, 192, 6, 35, 1e-3, 4, "standard", 0.1, 0.07,
                            dict(activation_fn="half_glu2", dt_global=True, warmup_end=0)),
    "aan-classification": ("trunc_standard_normal", 16, 32, 128, 256, 6, 20, 1e-3, 2, "standard", 0.0, 0.05,
                           dict(dt_global=True)),
    "lra-cifar-classification": ("lecun_normal", 3, 50, 512, 384, 6, 250, 1e-3, 4.5, "BfastandCdecay", 0.1, 0.07,
                                 dict(clip_eigs=True)),
    "pathfinder-classification": ("trunc_standard_normal", 8, 64, 192, 256, 6, 200, 9e-4, 5, "standard", 0.05,
                                  0.03, dict(bn_momentum=0.9)),
    "pathx-classification": ("complex_normal", 16, 32, 128, 256, 6, 75, 6e-4, 3, "BandCdecay", 0.0, 0.06,
                             dict(dt_min=1e-4, bn_momentum=0.9)),
    "speech35-classification": ("lecun_normal", 16, 16, 96, 128, 6, 40, 2e-3, 4, "noBCdecay", 0.1, 0.04,
                                dict(resolutions=[1, 2], speech_norm="release")),
}
RELEASE_COMMON = dict(prenorm=True, batchnorm=True, bidirectional=True, conj_sym=True, discretization="zoh",
                      mode="pool", mask_padding=False, buckets=False, token_encoder="onehot", split_seed=42,
                      ssm_type="s5", clip_eigs=False, dt_global=False, activation_fn="half_glu1", warmup_end=1,
                      bn_momentum=0.95, dt_min=0.001, lr_min=0.0, cosine_anneal=True, resolutions=[1])


def test_s5_recipes_parse_to_the_release_settings():
    import config

    recipes = config.s5_recipes()
    assert len(recipes) == 7
    # TRAINING.md shows them as commands generated from the plan file, never a second hand-written copy
    assert "```bash\n" + config.recipe_commands() + "\n```" in (HERE / "TRAINING.md").read_text()
    seen = set()
    for argv in recipes.values():
        cfg = train_ex.parse_args(argv)
        seen.add(cfg.dataset)
        c_init, blocks, bsz, d, p, n, epochs, ssm_lr, factor, opt, drop, wd, other = RELEASE_RECIPES[cfg.dataset]
        want = {**RELEASE_COMMON, **other, "C_init": c_init, "blocks": blocks, "bsz": bsz, "d_model": d,
                "ssm_size_base": p, "n_layers": n, "epochs": epochs, "ssm_lr": ssm_lr,
                "global_lr": pytest.approx(factor * ssm_lr), "opt_config": opt, "p_dropout": drop,
                "weight_decay": wd}
        got = {k: getattr(cfg, k) for k in want}
        assert got == want, cfg.dataset
    assert seen == set(RELEASE_RECIPES)


@pytest.mark.slow
def test_speech_run_evaluates_at_two_rates(tmp_path):
    """A short run on a Speech Commands tree written by the tests: --eval_resolutions 1,2 writes the accuracy at
    16 kHz and, zero-shot, at 8 kHz (x[::2], steps × 2)."""
    from test_data import make_speech

    make_speech(tmp_path)
    dataloaders.load("speech35-classification", tmp_path, workers=1)
    argv = ["--dataset", "speech35-classification", "--dir_name", str(tmp_path), "--run_dir", str(tmp_path / "r"),
            "--epochs", "1", "--bsz", "2", "--d_model", "4", "--n_layers", "1", "--ssm_size_base", "4",
            "--p_dropout", "0", "--warmup_end", "0", "--eval_resolutions", "1,2", "--speech_norm", "release"]
    assert train_ex.main(argv) == 0
    row = results(tmp_path / "r")["epochs"][0]
    for key in ("val_acc", "test_acc", "val_acc@2", "test_acc@2"):
        assert 0.0 <= row[key] <= 1.0, key
    assert train_ex.parse_args(["--eval_resolutions", "1,2"]).resolutions == [1, 2]
    ds = train_ex.load_data(train_ex.parse_args(argv))[0]
    assert ds.train.mean.shape == (16000, 1)  # --speech_norm release: statistics per time step
    with pytest.raises(SystemExit):
        train_ex.parse_args(["--speech_norm", "release"])  # ListOps, the default dataset: not audio


@pytest.mark.parametrize("bad", ["2", "1,x", "0,1"])
def test_eval_resolutions_must_include_1(bad, capsys):
    with pytest.raises(SystemExit):
        train_ex.parse_args(["--eval_resolutions", bad])
    assert "--eval_resolutions" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run_format1", "run_format2_extend"])
def test_a_run_directory_written_by_earlier_code_resumes_samples_and_inspects(tmp_path, name):
    """testdata/run_format1 was written by the train_ex.py that kept the optimiser, steps and run-directory code in
    itself (a next-pixel aux model stopped by --max_steps at step 6 of 8; its state's totals under the key "acc");
    run_format2_extend by the code before the choice of stability guard (a next-pixel extend full model, the same
    stop; its config has no extend_guard, so it must resume with the guard it trained with, "rows"). Today's code
    resumes each to the epochs the same command gave uninterrupted, and sample.py and inspect_run.py read it. Their
    data: the 10,000 MNIST test images as both train and test files, as then; run_format1/mnist keeps the 96 of them
    these runs read (64 training, 32 validation and 32 test images) and zeros in the others, so the splits, drawn
    over all 10,000, are the ones they had."""
    import shlex
    import shutil

    import inspect_run
    import sample

    mnist_root = tmp_path / "data"
    (mnist_root / "MNIST" / "raw").mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        for prefix in ("train", "t10k"):
            os.symlink(HERE / "testdata" / "run_format1" / "mnist" / f"t10k-{kind}-ubyte.gz",
                       mnist_root / "MNIST" / "raw" / f"{prefix}-{kind}-ubyte.gz")
    run = tmp_path / "run"
    shutil.copytree(HERE / "testdata" / name, run, ignore=shutil.ignore_patterns("mnist"))
    reference = json.loads((run / "uninterrupted.json").read_text())
    argv = shlex.split(reference["command"].split(" (")[0])[1:]
    assert train_ex.main([*argv, "--dir_name", str(mnist_root), "--run_dir", str(run), "--resume"]) == 0
    got = results(run)
    assert got["status"] == "finished" and len(got["epochs"]) == 2
    for mine, want in zip(got["epochs"], reference["epochs"]):
        for key in ("train_loss", "val_loss", "test_loss", "val_acc", "test_acc"):
            assert mine[key] == pytest.approx(want[key], abs=1e-5), (mine["epoch"], key)
    assert sample.main([str(run), "--n", "2", "--dir_name", str(mnist_root), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert inspect_run.main([str(run), "--checkpoint", "latest"]) == 0
    assert (run / "inspect" / "inspect.json").exists()
