"""Next-step prediction and generation: the whole network's recurrent mode against its parallel mode, sampling,
the MNIST next-pixel task on real images, sample.py.

The recurrent-mode proof runs a real multi-layer model (encoder, norms with non-trivial running statistics,
every SSM type, activation, residual, head) on random inputs under teacher forcing: one step at a time must give
the parallel logits. The extensions' time-varying terms are scaled up first, so a wrong time index shows.
"""

import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from PIL import Image

import conftest
import dataloaders
import models
import sample
import train_ex

L_TEST = 40  # a short sequence: the recurrent mode's cost is L compiled steps either way


def next_step_model(ssm_type, *flags, d_model=8, n_layers=3, P=4, L=L_TEST):
    """A next-step model of L steps and 256 classes. Built from a classification config, so that the recurrent-mode
    proof also covers BatchNorm (which `--dataset mnist` refuses for training, but a layer must still stream)."""
    tokens = "--pixel_tokens" in flags
    cfg = train_ex.parse_args(["--ssm_type", ssm_type, "--d_model", str(d_model), "--n_layers", str(n_layers),
                               "--ssm_size_base", str(P), *(["--R", "2"] if ssm_type == "extend" else []),
                               *(f for f in flags if f != "--pixel_tokens")])
    cfg.pixel_tokens = tokens
    meta = dict(n_classes=256, seq_len=L, in_dim=256, tokens=True, pair=False, task="next_step")
    return models.build_model(cfg, meta)


def random_variables(model, key, B=3, L=L_TEST):
    """Initial variables with larger steps Δ (e^3 ×: states that forget within the sequence, which leaves the
    extension's stability guard room for a large time-varying term), the time-varying terms made large, and the
    BatchNorm statistics moved off 0/1."""
    batch = {"inputs": jnp.zeros((B, L), jnp.int32), "lengths": jnp.full(B, L)}
    variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, batch))(key)
    change = {"E": lambda x: 10 * x, "F": lambda x: 10 * x, "delta_table": lambda x: 10 * x,
              "log_step": lambda x: x + 3.0, "b_Delta": lambda x: x + 3.0}

    def scale(path, x):
        return change.get(getattr(path[-1], "key", ""), lambda v: v)(x)

    out = {"params": jax.tree_util.tree_map_with_path(scale, variables["params"])}
    if "batch_stats" in variables:
        leaves, tree = jax.tree_util.tree_flatten(variables["batch_stats"])
        keys = jax.random.split(jax.random.fold_in(key, 7), len(leaves))
        out["batch_stats"] = jax.tree_util.tree_unflatten(
            tree, [x + 0.5 + jax.random.uniform(k, x.shape) for x, k in zip(leaves, keys)])  # mean and var > 0
    return out


LAYOUTS = {  # every type once; each layout (norm placement, norm, activation, input encoding) by several types
    "prenorm-batchnorm-values": ("--prenorm", "--batchnorm", "--activation_fn", "half_glu2"),
    "postnorm-layernorm-tokens": ("--no-prenorm", "--no-batchnorm", "--activation_fn", "full_glu", "--pixel_tokens",
                                  "--token_encoder", "embed"),
    "prenorm-layernorm-onehot": ("--prenorm", "--no-batchnorm", "--activation_fn", "half_glu1", "--pixel_tokens"),
    "postnorm-batchnorm-gelu": ("--no-prenorm", "--batchnorm", "--activation_fn", "gelu"),
}
QUICK_CASES = [("s5", "prenorm-batchnorm-values"), ("aux", "postnorm-layernorm-tokens"),
               ("extend", "prenorm-layernorm-onehot"), ("s6", "prenorm-layernorm-onehot"),
               ("lru", "postnorm-layernorm-tokens")]
MORE_CASES = [("extend-diag", "postnorm-batchnorm-gelu"), ("s4", "prenorm-batchnorm-values"),  # full suite only
              ("s4d", "postnorm-layernorm-tokens"), ("dss", "postnorm-batchnorm-gelu")]
CASES = QUICK_CASES + MORE_CASES


@pytest.mark.parametrize("ssm_type,layout",
                         QUICK_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in MORE_CASES])
def test_recurrent_logits_equal_parallel_logits(ssm_type, layout):
    assert {t for t, _ in CASES} >= {*models.SSM_TYPES}, "every ssm_type with a recurrent mode is covered"
    flags = LAYOUTS[layout] + (("--extend_mode", "diag") if ssm_type == "extend-diag" else ())
    flags += ("--delta_type", "learned") if ssm_type.startswith("extend") else ()
    model = next_step_model(ssm_type.split("-")[0], *flags)
    variables = random_variables(model, jax.random.PRNGKey(0))
    values = jax.random.randint(jax.random.PRNGKey(1), (3, L_TEST), 0, 256)
    inputs = jnp.pad(values[:, :-1], ((0, 0), (1, 0)))
    parallel_fn = jax.jit(lambda v, x: model.apply(v, {"inputs": x, "lengths": jnp.full(3, L_TEST)}))
    parallel = parallel_fn(variables, inputs)
    recurrent = jax.jit(lambda v, x: models.recurrent_logits(model, v, x))(variables, inputs)
    assert parallel.shape == recurrent.shape == (3, L_TEST, 256)
    scale = float(jnp.max(jnp.abs(parallel)))
    assert scale > 0.1  # the comparison means something
    np.testing.assert_allclose(np.asarray(recurrent), np.asarray(parallel), rtol=0, atol=1e-4 * max(scale, 1.0))
    # causality: changing the last input changes only the last position's logits
    moved = parallel_fn(variables, inputs.at[:, -1].set((inputs[:, -1] + 128) % 256))
    before = float(jnp.max(jnp.abs(moved[:, :-1] - parallel[:, :-1])))  # FFT rounding only (S4 family)
    assert before < 1e-5 * max(scale, 1.0) and float(jnp.max(jnp.abs(moved[:, -1] - parallel[:, -1]))) > 1e-2


@pytest.mark.slow
def test_the_default_next_pixel_model_is_causal_in_training_too():
    """With --dataset mnist's defaults (LayerNorm, dropout) a change of the last input changes no earlier position's
    training-mode logits: nothing in a training step looks ahead."""
    cfg = train_ex.parse_args(["--dataset", "mnist", "--d_model", "8", "--n_layers", "2", "--ssm_size_base", "4"])
    model = models.build_model(cfg, dict(n_classes=256, seq_len=L_TEST, in_dim=256, tokens=True, pair=False,
                                         task="next_step"))
    inputs = jax.random.randint(jax.random.PRNGKey(8), (4, L_TEST), 0, 256)
    variables = model.init(jax.random.PRNGKey(0), {"inputs": inputs, "lengths": jnp.full(4, L_TEST)})

    @jax.jit
    def train_logits(x):
        out, _ = model.apply(variables, {"inputs": x, "lengths": jnp.full(4, L_TEST)}, training=True,
                             rngs={"dropout": jax.random.PRNGKey(9)}, mutable=["batch_stats"])
        return out

    a, b = train_logits(inputs), train_logits(inputs.at[:, -1].set((inputs[:, -1] + 100) % 256))
    assert float(jnp.max(jnp.abs(a[:, :-1] - b[:, :-1]))) < 1e-5 and float(jnp.max(jnp.abs(a[:, -1] - b[:, -1]))) > 1e-3


def test_the_time_index_matters_in_the_proof():
    """The proof above can fail: an extension's recurrent mode run one step late does not match."""
    model = next_step_model("extend", "--delta_type", "learned")
    variables = random_variables(model, jax.random.PRNGKey(2))
    inputs = jax.random.randint(jax.random.PRNGKey(3), (3, L_TEST), 0, 256)
    parallel = jax.jit(model.apply)(variables, {"inputs": inputs, "lengths": jnp.full(3, L_TEST)})
    right = jax.jit(lambda v, x: models.recurrent_logits(model, v, x))(variables, inputs)

    @jax.jit
    def late(variables, inputs):  # models.recurrent_logits with t + 1 in place of t
        step, states = models._recurrent(model, variables, L_TEST, 3)
        body = lambda s, tv: step(s, tv[1], jnp.minimum(tv[0] + 1, L_TEST - 1))  # noqa: E731
        return jnp.swapaxes(jax.lax.scan(body, states, (jnp.arange(L_TEST), inputs.T))[1], 0, 1)

    scale = float(jnp.max(jnp.abs(parallel)))
    assert float(jnp.max(jnp.abs(right - parallel))) < 1e-4 * scale
    assert float(jnp.max(jnp.abs(late(variables, inputs) - parallel))) > 1e-2 * scale


@pytest.fixture(scope="module")
def small_model():
    model = next_step_model("s5", "--d_model", "16", "--n_layers", "2", "--ssm_size_base", "8", L=64)
    return model, random_variables(model, jax.random.PRNGKey(4), L=64)


def test_sampling_is_reproducible_valid_and_respects_the_prefix(small_model):
    model, variables = small_model
    truth = np.asarray(jax.random.randint(jax.random.PRNGKey(5), (5, 64), 0, 256), np.int32)
    draw = models.Sampler(model)
    a, _ = draw(variables, truth, 20, 1.0, seed=3)
    b, _ = draw(variables, truth, 20, 1.0, seed=3)
    c, _ = draw(variables, truth, 20, 1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for x in (a, c):
        assert x.shape == (5, 64) and x.dtype == np.int32 and x.min() >= 0 and x.max() <= 255
        np.testing.assert_array_equal(x[:, :20], truth[:, :20])
    assert not np.array_equal(a[:, 20:], truth[:, 20:])
    u, _ = draw(variables, truth, 0, 1.0, seed=3)  # unconditional: nothing copied
    assert u.shape == (5, 64) and not np.array_equal(u[:, :20], truth[:, :20])


def test_greedy_sample_is_the_parallel_models_argmax(small_model):
    """At temperature 0 every drawn value is the argmax of the parallel model's logits at its position, given
    the drawn sequence before it: the sampler conditions on exactly what it drew."""
    model, variables = small_model
    truth = np.asarray(jax.random.randint(jax.random.PRNGKey(6), (4, 64), 0, 256), np.int32)
    drawn, _ = models.Sampler(model)(variables, truth, 10, 0.0, seed=0)
    inputs = jnp.pad(jnp.asarray(drawn[:, :-1]), ((0, 0), (1, 0)))
    logits = jax.jit(model.apply)(variables, {"inputs": inputs, "lengths": jnp.full(4, 64)})
    np.testing.assert_array_equal(drawn[:, 10:], np.asarray(jnp.argmax(logits, -1))[:, 10:])


def test_sampling_is_one_compiled_loop(small_model):
    """The draw is a single lax.scan over the L steps (nothing dispatched per pixel from Python), compiled
    once: other prefixes, temperatures and seeds reuse it."""
    model, variables = small_model
    truth = np.zeros((2, 64), np.int32)
    jaxpr = jax.make_jaxpr(lambda v, k, p, n, T: models.sample(model, v, k, p, n, T))(
        variables, jax.random.PRNGKey(0), truth, 0, 1.0)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [64]
    draw = models.Sampler(model)
    for n_given, temperature, seed in ((0, 1.0, 0), (30, 0.5, 1), (64, 0.0, 2)):
        draw(variables, truth, n_given, temperature, seed)
    assert draw.fn._cache_size() == 1


def test_grid_image_pairs_truth_and_samples():
    truth = np.arange(5 * 16, dtype=np.int32).reshape(5, 16) % 256
    drawn = 255 - truth
    img = models.grid_image(truth, drawn, n_given=8, cols=2)
    assert img.dtype == np.uint8 and img.shape == (3 * (4 + 2) + 2, 2 * (2 * 4 + 2 + 4) + 2)
    np.testing.assert_array_equal(img[2:6, 2:6], truth[0].reshape(4, 4))  # first pair: truth, then sample
    np.testing.assert_array_equal(img[2:6, 8:12], drawn[0].reshape(4, 4))
    with pytest.raises(ValueError, match="not square"):
        models.grid_image(truth[:, :15], drawn[:, :15], 0)


# --------------------------------------------------------------------------------------------------
# Real MNIST: the data, a short training run, sample.py
# --------------------------------------------------------------------------------------------------


def write_idx(path, array):
    """An IDX file as MNIST ships it (gzip; magic 0x08 = uint8, then the dimensions, big-endian)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


N_TRAIN_FILE = 2000  # of the 3,000 committed test images: the first 2,000 as the training file, the rest as test


@pytest.fixture(scope="module")
def disjoint_mnist(tmp_path_factory):
    """The committed real MNIST test images (testdata/mnist) cut in two: images 0..1999 as the training file,
    2000..2999 as the test file, so both the validation split (10% of training) and the test split are images no
    step trained on."""
    images = dataloaders.read_idx(conftest.MNIST_SUBSET / "t10k-images-idx3-ubyte.gz")
    labels = dataloaders.read_idx(conftest.MNIST_SUBSET / "t10k-labels-idx1-ubyte.gz")
    root = tmp_path_factory.mktemp("mnist-disjoint")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, rows in (("train", slice(0, N_TRAIN_FILE)), ("t10k", slice(N_TRAIN_FILE, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images[rows])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    return root, images


def test_next_pixel_batches_are_the_images_shifted(disjoint_mnist):
    root, images = disjoint_mnist
    ds = dataloaders.load("mnist", root)
    assert (ds.task, ds.n_classes, ds.seq_len, len(ds.train), len(ds.val), len(ds.test)) == \
        ("next_step", 256, 784, N_TRAIN_FILE - N_TRAIN_FILE // 10, N_TRAIN_FILE // 10, len(images) - N_TRAIN_FILE)
    batch = next(ds.test.batches(4))
    np.testing.assert_array_equal(batch["labels"], images[N_TRAIN_FILE:N_TRAIN_FILE + 4].reshape(4, 784))
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])
    assert (batch["inputs"][:, 0] == 0).all() and batch["inputs"].dtype == np.int32


def marginal_bits(train_values, held_out_values):
    """Bits per pixel on held-out images of the best context-free model: the training pixels' histogram."""
    counts = np.bincount(train_values.ravel(), minlength=256) + 1.0
    p = counts / counts.sum()
    return float(-np.log2(p[held_out_values.ravel()]).mean())


class WandbRecorder:
    """Stands in for a wandb run: keeps what train_ex logs."""

    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        pass


@pytest.mark.slow
def test_short_run_on_real_mnist_learns_and_draws(disjoint_mnist, tmp_path, capsys, monkeypatch):
    import wandb

    root, images = disjoint_mnist
    run = tmp_path / "gen"
    recorder = WandbRecorder()
    monkeypatch.setattr(train_ex, "start_wandb", lambda *a: recorder)
    code = train_ex.main(["--dataset", "mnist", "--dir_name", str(root), "--run_dir", str(run), "--epochs", "2",
                          "--max_train_samples", "1024", "--max_eval_samples", "256", "--bsz", "32", "--d_model",
                          "32", "--n_layers", "2", "--ssm_size_base", "16", "--lr", "1e-2", "--p_dropout", "0",
                          "--warmup_end", "0", "--sample_every", "2", "--n_samples", "4", "--jax_seed", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "samples:" in out
    res = json.loads((run / "results.json").read_text())
    for row in res["epochs"]:
        for s in ("train", "val", "test"):
            assert row[f"{s}_bpd"] == pytest.approx(row[f"{s}_loss"] / np.log(2), rel=1e-6)
    best = res["best"]
    assert best["val_bpd"] == min(r["val_bpd"] for r in res["epochs"])
    assert res["config"]["batchnorm"] is False
    # held-out images: clearly below uniform (8 bits), and below the best model that ignores the context
    ds = dataloaders.load("mnist", root)
    train_px = np.asarray(ds.train.inputs[:1024])
    for split in ("val", "test"):
        context_free = marginal_bits(train_px, np.asarray(getattr(ds, split).inputs[:256]))
        assert best[f"{split}_bpd"] < context_free < 8.0, split
    png = run / "samples" / "epoch002.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 4 * 28
    assert not (run / "samples" / "epoch001.png").exists()  # --sample_every 2
    images_logged = [(step, d["samples"]) for step, d in recorder.logged if "samples" in d]
    assert len(images_logged) == 1 and images_logged[0][0] == 2 and isinstance(images_logged[0][1], wandb.Image)
    assert [d["val_bpd"] for _, d in recorder.logged if "val_bpd" in d] == [r["val_bpd"] for r in res["epochs"]]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # sample.py from the checkpoint: 16 digits, the first 11 rows given
    assert sample.main([str(run), "--n", "16", "--seed", "1", "--out", str(tmp_path / "s.png")]) == 0
    assert "drew 16 sequences of 784 values (308 given)" in capsys.readouterr().out
    assert sample.main([str(run), "--prefix", "784"]) == 2 and "at least one must be drawn" in capsys.readouterr().err
    # bad sampling options stop a run before it trains, with exit code 2
    code = train_ex.main(["--dataset", "mnist", "--dir_name", str(root), "--run_dir", str(tmp_path / "bad"),
                          "--max_eval_samples", "4", "--sample_every", "1", "--n_samples", "8", "--d_model", "8",
                          "--n_layers", "1", "--ssm_size_base", "4", "--max_train_samples", "64"])
    assert code == 2 and "8 samples need 8 test sequences, but the split has only 4" in capsys.readouterr().err
    with Image.open(tmp_path / "s.png") as im:
        assert im.format == "PNG"


def test_causal_only_and_clear_errors(tmp_path, capsys):
    for flags, message in ((["--bidirectional"], "--bidirectional is not allowed"),
                           (["--batchnorm"], "--batchnorm is not allowed"), (["--mode", "last"], "--mode pools"),
                           (["--temperature", "nan"], "finite --temperature")):
        with pytest.raises(SystemExit) as e:
            train_ex.parse_args(["--dataset", "mnist", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert train_ex.parse_args(["--dataset", "mnist"]).batchnorm is False  # LayerNorm by default here
    assert train_ex.parse_args(["--dataset", "mnist-classification"]).batchnorm is True
    with pytest.raises(SystemExit):
        train_ex.parse_args(["--dataset", "mnist-classification", "--sample_every", "1"])
    assert "next-step datasets" in capsys.readouterr().err
    assert (models.resolve_prefix(None, 784), models.resolve_prefix(None, 196), models.resolve_prefix(0, 784)) == \
        (308, 70, 0)
    for bad in (784, 1000):
        with pytest.raises(ValueError, match="at least one must be drawn"):
            models.resolve_prefix(bad, 784)
    run = tmp_path / "cls"  # a classification run's checkpoint files (only its config matters here)
    run.mkdir()
    (run / "ckpt_best.msgpack").write_bytes(serialization.msgpack_serialize({"params": {}}))
    meta = dict(n_classes=10, seq_len=784, in_dim=1, tokens=False, pair=False, task="classification")
    (run / "ckpt_best.json").write_text(json.dumps({"config": {"dataset": "mnist-classification",
                                                               "model_meta": meta}}))
    assert sample.main([str(run)]) == 2
    assert "only next-step models" in capsys.readouterr().err
    assert sample.main([str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (run / "ckpt_best.json").unlink()
    assert sample.main([str(run)]) == 2
    assert "has no ckpt_best.json beside it" in capsys.readouterr().err
