"""The diagnostic tasks (tasks.py, loaded by dataloaders.py): every generator's labels against a reconstruction
from its inputs, determinism and disjoint splits, option errors, the per-position and regression losses, and a
brief S5 training on the easiest setting of each task that must beat chance."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config
import dataloaders as dl
import models
import train_ex

SMALL = "n_train=200,n_val=50,n_test=50"


def load(name, options=""):
    return dl.load(name, **dl.parse_options(name, f"{options},{SMALL}".strip(",")))


def splits(ds):
    return {"train": ds.train, "val": ds.val, "test": ds.test}


# --------------------------------------------------------------------------------------------------
# labels against an independent reading of the inputs, one sample at a time
# --------------------------------------------------------------------------------------------------


def read_copying(x, k):
    """The answer a person would write for one copying sequence: the data tokens before the delimiter, in order,
    at the k positions after the blanks that follow the delimiter."""
    x = [int(t) for t in x]
    assert x.count(1) == 1, "exactly one delimiter"
    delim = x.index(1)
    data = [t - 2 for t in x[:delim] if t >= 2]
    assert all(t == 0 for t in x[delim + 1:]), "only blanks after the delimiter"
    answer = {delim + 1 + j: d for j, d in enumerate(data)}
    return data, answer


@pytest.mark.parametrize("options", ["", "k=3,vocab=5,lag=0", "k=1,vocab=1,lag=4"])
def test_copying_labels(options):
    ds = load("copying", options)
    o = dl.parse_options("copying", options)
    for name, s in splits(ds).items():
        for i in range(len(s)):
            data, answer = read_copying(s.inputs[i], o["k"])
            why = dl.describe(ds, name, i)
            assert len(data) == o["k"] and list(np.asarray(s.inputs[i][:o["k"]]) - 2) == data, why
            assert int(np.argmax(np.asarray(s.inputs[i]) == 1)) == o["k"] + o["lag"], why
            assert {t for t in range(ds.seq_len) if s.label_weights[i][t]} == set(answer), why
            assert all(s.labels[i][t] == d for t, d in answer.items()), why
    assert ds.seq_len == 2 * o["k"] + o["lag"] + 1 and ds.n_classes == o["vocab"]


@pytest.mark.parametrize("options", ["", "k=4,vocab=3,length=4", "k=2,vocab=6,length=30"])
def test_selective_copying_labels(options):
    ds = load("selective_copying", options)
    o = dl.parse_options("selective_copying", options)
    for name, s in splits(ds).items():
        for i in range(len(s)):
            data, answer = read_copying(s.inputs[i], o["k"])
            why = dl.describe(ds, name, i)
            assert len(data) == o["k"] and int(np.argmax(np.asarray(s.inputs[i]) == 1)) == o["length"], why
            assert {t for t in range(ds.seq_len) if s.label_weights[i][t]} == set(answer), why
            assert all(s.labels[i][t] == d for t, d in answer.items()), why
    # the data tokens do land at different places: the task is selective, not a fixed lag
    first = [int(np.argmax(np.asarray(x) >= 2)) for x in ds.train.inputs]
    assert len(set(first)) > 1 or o["k"] == o["length"]


@pytest.mark.parametrize("options", ["", "n_pairs=3,n_queries=2,n_keys=3,n_values=2,gap=5"])
def test_associative_recall_labels(options):
    ds = load("associative_recall", options)
    o = dl.parse_options("associative_recall", options)
    nk = o["n_keys"]
    for name, s in splits(ds).items():
        for i in range(len(s)):
            x, why = [int(t) for t in s.inputs[i]], dl.describe(ds, name, i)
            memory = {}
            for pos in range(0, 2 * o["n_pairs"], 2):
                key, value = x[pos], x[pos + 1]
                assert 1 <= key <= nk < value <= nk + o["n_values"] and key not in memory, why
                memory[key] = value - nk - 1
            assert all(t == 0 for t in x[2 * o["n_pairs"]:2 * o["n_pairs"] + o["gap"]]), why
            queries = range(ds.seq_len - o["n_queries"], ds.seq_len)
            assert len({x[q] for q in queries}) == o["n_queries"], why
            assert {t for t in range(ds.seq_len) if s.label_weights[i][t]} == set(queries), why
            assert all(s.labels[i][q] == memory[x[q]] for q in queries), why


@pytest.mark.parametrize("options", ["", "length=2", "length=7"])
def test_adding_labels(options):
    ds = load("adding", options)
    L = dl.parse_options("adding", options)["length"]
    for name, s in splits(ds).items():
        for i in range(len(s)):
            x, why = np.asarray(s.inputs[i], np.float64), dl.describe(ds, name, i)
            marked = [t for t in range(L) if x[t, 1] == 1.0]
            assert set(np.unique(x[:, 1])) <= {0.0, 1.0} and len(marked) == 2, why
            assert marked[0] < L // 2 <= marked[1], why
            assert np.all((0 <= x[:, 0]) & (x[:, 0] < 1)), why
            assert abs(float(s.labels[i]) - (x[marked[0], 0] + x[marked[1], 0])) < 1e-6, why
    assert ds.task == "regression" and ds.n_classes == 1 and ds.in_dim == 2 and not ds.tokens


def test_chance_levels():
    """1/vocab and 1/n_values; for adding, the share of sums within 0.04 of 1 over many generated sums."""
    assert dl.chance_level("copying", "vocab=5") == pytest.approx(1 / 5)
    assert dl.chance_level("selective_copying") == pytest.approx(1 / 8)
    assert dl.chance_level("associative_recall", "n_values=10,n_keys=10") == pytest.approx(1 / 10)
    labels = np.asarray(dl.load("adding", length=4, n_train=200000, n_val=1, n_test=1).train.labels)
    assert np.mean(np.abs(labels - 1.0) < 0.04) == pytest.approx(dl.chance_level("adding"), abs=0.003)


def gain_by_hand(t, length, periods, shape):
    """g(t) of the varying_gain task, one step at a time from its definition."""
    phase = (periods * t / length) % 1.0
    if shape == "sine":
        return 1.0 + np.sin(2 * np.pi * periods * t / length)
    if shape == "switch":
        return 2.0 if phase < 0.5 else 0.0
    return 2.0 * phase  # ramp: 1 + (2·phase − 1)


@pytest.mark.parametrize("options", ["", "length=30,lag=0,periods=1,shape=switch",
                                     "length=20,lag=7,periods=3,shape=ramp"])
def test_varying_gain_labels(options):
    ds = load("varying_gain", options)
    o = dl.parse_options("varying_gain", options)
    L, lag = o["length"], o["lag"]
    for name, s in splits(ds).items():
        for i in range(0, len(s), 7):
            u, y, w = np.asarray(s.inputs[i][:, 0], np.float64), s.labels[i], s.label_weights[i]
            assert list(w) == [0.0] * lag + [1.0] * (L - lag), dl.describe(ds, name, i)
            want = [gain_by_hand(t, L, o["periods"], o["shape"]) * u[t - lag] for t in range(lag, L)]
            np.testing.assert_allclose(y[lag:], want, rtol=1e-5, atol=1e-6, err_msg=dl.describe(ds, name, i))
    assert (ds.seq_len, ds.in_dim, ds.n_classes, ds.task) == (L, 1, 1, "per_position_regression")


def test_varying_gain_lti_floor_equals_a_plain_least_squares_fit():
    """The floor's filter against numpy's lstsq on the design matrix written out row by row (one row per scored
    position of every training sequence, column j = u_{t-j}), scored on the test split by hand."""
    ds = dl.load("varying_gain", **dl.parse_options("varying_gain", "length=12,lag=2,n_train=40,n_val=5,n_test=30"))
    rows, target = [], []
    for u, y, w in zip(ds.train.inputs[..., 0], ds.train.labels, ds.train.label_weights):
        for t in range(12):
            if w[t]:
                rows.append([u[t - j] if j <= t else 0.0 for j in range(12)])
                target.append(y[t])
    h = np.linalg.lstsq(np.array(rows, np.float64), np.array(target, np.float64), rcond=None)[0]
    errs = [sum(h[j] * u[t - j] for j in range(t + 1)) - y[t] for u, y, w in
            zip(ds.test.inputs[..., 0].astype(np.float64), ds.test.labels, ds.test.label_weights)
            for t in range(12) if w[t]]
    floor = ds.reference["lti_floor"]
    assert floor["taps"] == 12
    assert floor["test"]["mse"] == pytest.approx(np.mean(np.square(errs)), rel=1e-6)
    assert floor["test"]["acc"] == pytest.approx(np.mean(np.abs(errs) < dl.ADDING_TOLERANCE), abs=1e-9)


@pytest.mark.parametrize("shape", ["sine", "switch", "ramp"])
def test_varying_gain_lti_floor_is_the_gain_variance(shape):
    """With white unit-variance input the best time-invariant filter is ḡ · u_{t-lag} (ḡ the mean gain over the
    scored positions), so the floor's test error is the variance of g over them, up to the fit's sampling error."""
    o = dl.parse_options("varying_gain", f"length=40,lag=3,shape={shape},n_train=3000,n_val=10,n_test=3000")
    g = np.array([gain_by_hand(t, 40, o["periods"], shape) for t in range(3, 40)])
    floor = dl.load("varying_gain", **o).reference["lti_floor"]
    assert floor["test"]["mse"] == pytest.approx(g.var(), rel=0.02)


def test_varying_gain_chance_level():
    ds = load("varying_gain", "n_train=10")
    s = ds.test
    hit = (np.abs(s.labels) < dl.ADDING_TOLERANCE) * s.label_weights
    assert hit.sum() / s.label_weights.sum() == pytest.approx(dl.chance_level("varying_gain"), abs=0.01)


# --------------------------------------------------------------------------------------------------
# determinism, disjoint splits, shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(dl.DIAGNOSTIC_OPTIONS))
def test_deterministic_and_splits_disjoint(name):
    a, b, c = load(name), load(name), load(name, "data_seed=1")
    for split in ("train", "val", "test"):
        sa, sb, sc = getattr(a, split), getattr(b, split), getattr(c, split)
        assert np.array_equal(sa.inputs, sb.inputs) and np.array_equal(sa.labels, sb.labels)
        assert not np.array_equal(sa.inputs, sc.inputs)
    rows = {s: {np.asarray(x).tobytes() for x in getattr(a, s).inputs} for s in ("train", "val", "test")}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert [len(a.train), len(a.val), len(a.test)] == [200, 50, 50]


@pytest.mark.parametrize("name,options", [("copying", "k=3,lag=5"), ("selective_copying", "length=9"),
                                          ("associative_recall", "n_keys=20,gap=2"), ("adding", "length=11"),
                                          ("varying_gain", "length=9,lag=1"), ("copying", ""), ("varying_gain", "")])
def test_model_meta_matches_the_loaded_dataset(name, options):
    ds = dl.load(name, **dl.parse_options(name, options))
    fields = ("seq_len", "in_dim", "tokens", "pair", "n_classes", "task", "onehot_width")
    assert dl.model_meta(name, options) == {k: getattr(ds, k) for k in fields}
    if not options:
        assert dl.SHAPES[name] == tuple(getattr(ds, k) for k in fields[:5])


# --------------------------------------------------------------------------------------------------
# bad options: a clear error, exit 2
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "copying", "--data_options", "k=4,colour=3"], "unknown data option 'colour'"),
    (["--dataset", "copying", "--data_options", "k=four"], "must be an integer"),
    (["--dataset", "copying", "--data_options", "k"], "is not KEY=VALUE"),
    (["--dataset", "copying", "--data_options", "vocab=0"], "vocab must be at least 1"),
    (["--dataset", "associative_recall", "--data_options", "n_pairs=4,n_queries=5"], "n_queries=5"),
    (["--dataset", "associative_recall", "--data_options", "n_pairs=9,n_keys=8"], "n_keys >= n_pairs"),
    (["--dataset", "selective_copying", "--data_options", "k=9,length=8"], "do not fit"),
    (["--dataset", "mnist-classification", "--data_options", "k=4"], "applies to the diagnostic datasets"),
    (["--dataset", "copying", "--mode", "last"], "--mode last does not apply"),
    (["--dataset", "adding", "--eval_resolutions", "1,2"], "--eval_resolutions applies to the classification"),
    (["--dataset", "varying_gain", "--data_options", "shape=square"], "must be one of sine, switch, ramp"),
    (["--dataset", "varying_gain", "--data_options", "lag=128"], "leaves no scored position"),
    (["--dataset", "varying_gain", "--mode", "last"], "--mode last does not apply"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    if "data option" in message or "integer" in message or "KEY=VALUE" in message:
        assert "allowed (defaults): k=8, vocab=8, lag=64, n_train=2000" in err


def test_adding_allows_last_position_pooling():
    assert config.parse_args(["--dataset", "adding", "--mode", "last"]).mode == "last"


# --------------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------------


def test_per_position_loss_counts_only_the_scored_positions():
    labels = jnp.array([[0, 1, 2, 0], [2, 2, 2, 2]])
    lw = jnp.array([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    pred = jnp.array([[2, 1, 0, 1], [2, 0, 0, 0]])  # row 0: 1 of its 2 scored positions right; row 1: 1 of 1
    logits = 5.0 * jnp.eye(3)[pred]
    nll, hit = models.task_loss(logits, {"labels": labels, "label_weights": lw}, "per_position")
    assert np.allclose(hit, [0.5, 1.0])
    lse = np.log(np.exp(5.0) + 2.0)
    assert np.allclose(nll, [((lse - 5.0) + lse) / 2, lse - 5.0], atol=1e-5)


def test_regression_loss_and_tolerance():
    nll, hit = models.task_loss(jnp.array([[1.0], [0.5], [2.0]]), {"labels": jnp.array([1.03, 0.6, 2.0])},
                                "regression")
    assert np.allclose(nll, [0.0009, 0.01, 0.0], atol=1e-6) and list(np.asarray(hit)) == [1.0, 0.0, 1.0]


# --------------------------------------------------------------------------------------------------
# a brief S5 training beats chance on the easiest setting of each task
# --------------------------------------------------------------------------------------------------

EASIEST = {  # (data options, what test accuracy counts as clearly above chance)
    "copying": ("k=2,vocab=4,lag=2", 0.5),  # chance 0.25
    "selective_copying": ("k=2,vocab=4,length=6", 0.45),  # chance 0.25
    "associative_recall": ("n_pairs=2,n_queries=2,n_keys=4,n_values=4", 0.4),  # chance 0.25
    "adding": ("length=8", 0.14),  # chance 0.0784
}
TINY = ["--d_model", "16", "--n_layers", "1", "--ssm_size_base", "8", "--bsz", "32", "--p_dropout", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EASIEST))
def test_s5_beats_chance(name, tmp_path):
    options, bar = EASIEST[name]
    run_dir = tmp_path / "run"
    code = train_ex.main(["--dataset", name, "--data_options", f"{options},n_train=1024,n_val=256,n_test=256",
                          *TINY, "--epochs", "4", "--lr", "1e-2", "--warmup_end", "0", "--run_dir", str(run_dir),
                          "--ckpt_every_min", "0"])
    results = json.loads(Path(run_dir / "results.json").read_text())
    chance = dl.chance_level(name, options)
    assert code == 0 and chance < bar
    assert results["best"]["test_acc"] > bar, (results["best"], chance)
    assert results["data"]["generated"] and results["config"]["data_options"].startswith(options)


@pytest.mark.slow
def test_a_basis_delta_model_trained_at_length_l_evaluates_at_2l(tmp_path):
    """The Lambda extension with δ from a Legendre basis, trained on varying_gain at length 24: its parameters do not
    grow with the length (the same count at length 48), and the trained model, rebuilt from its run directory,
    evaluates sequences of 48 steps, its recurrent mode equal to its parallel mode there. A learned δ table cannot."""
    common = ["--dataset", "varying_gain", *TINY, "--ssm_type", "extend", "--R", "2", "--epochs", "1",
              "--ckpt_every_min", "0"]
    run = tmp_path / "run"
    assert train_ex.main([*common, "--data_options", "length=24,lag=2,n_train=128,n_val=32,n_test=32",
                          "--delta_type", "legendre", "--delta_basis_size", "5", "--run_dir", str(run)]) == 0
    counts = []
    for length in (24, 48):
        cfg = config.parse_args([*common, "--data_options", f"length={length}", "--delta_type", "legendre",
                                 "--delta_basis_size", "5"])
        meta = dl.model_meta("varying_gain", f"length={length}")
        variables, _ = models.init_variables(cfg, models.build_model(cfg, meta), models.example_batch(meta, 2))
        counts.append(sum(x.size for x in jax.tree_util.tree_leaves(variables["params"])))
    assert counts[0] == counts[1]
    cfg, meta, state = models.read_run(run)
    model = models.build_model(cfg, meta)
    u = np.random.default_rng(0).normal(size=(2, 48, 1)).astype(np.float32)
    batch = dict(models.example_batch(meta, 2, L=48), inputs=jnp.asarray(u))
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    y = np.asarray(model.apply(variables, batch))
    assert y.shape == (2, 48, 1) and np.all(np.isfinite(y))
    encoder = models.StackedEncoder(model.encoder.ssm, *[getattr(model.encoder, k) for k in (
        "d_model", "P", "n_layers", "tokens", "in_dim", "layer_kw", "token_encoder")])
    enc_vars = {k: v["encoder"] for k, v in variables.items()}
    systems = encoder.apply(enc_vars, 48, method="recurrent_system")
    states = encoder.apply(enc_vars, method="initial_state")
    dense = model.apply(variables, batch, method=lambda m, b: m.encoder(b["inputs"], jnp.ones((2, 48)), False))
    step = jax.jit(lambda states, u_t, t: encoder.apply(enc_vars, states, u_t, t, 48, systems, method="step"))
    for t in range(48):
        states, h = step(states, u[0, t], t)
        np.testing.assert_allclose(np.asarray(h), np.asarray(dense[0, t]), rtol=1e-4, atol=1e-5)
    table = config.parse_args([*common, "--data_options", "length=24"])
    with pytest.raises(ValueError, match="longer than the learned delta table"):
        m = models.build_model(table, dl.model_meta("varying_gain", "length=24"))
        m.init(jax.random.PRNGKey(0), models.example_batch(meta, 2, L=48))
