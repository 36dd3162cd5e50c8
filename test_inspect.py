"""inspect_run.py on runs made by short real training runs: valid pictures, and numbers checked on cases with
known answers (eigenvalues set by hand; an extension with E = 0 is time-invariant)."""

import json

import numpy as np
import pytest
from PIL import Image

import inspect_run
import train_ex
import utils
from test_train import TINY

pytestmark = pytest.mark.xdist_group("inspect")  # its module fixtures are built once, on one worker

PNG = b"\x89PNG\r\n\x1a\n"


def train(root, run_dir, *extra):
    argv = ["--dataset", "mnist-classification", "--dir_name", str(root), "--downsample", "4", "--run_dir",
            str(run_dir), "--max_train_samples", "32", "--max_eval_samples", "16", "--epochs", "2",
            "--warmup_end", "0", *TINY, "--n_layers", "2", "--ssm_size_base", "8", *extra]
    assert train_ex.main(argv) == 0
    return run_dir


def edit_checkpoint(run_dir, fn):
    """Apply fn(layer name, ssm params dict) to every layer's SSM parameters in ckpt_best (in place)."""
    meta, state = utils.read_checkpoint(utils.checkpoint_path(run_dir, "best"))
    for name, layer in state["params"]["encoder"].items():
        if name.startswith("layer_"):
            fn(name, layer["ssm"])
    utils.save_checkpoint(run_dir, "best", state, meta["config"], meta["progress"])


@pytest.fixture(scope="module")
def runs(mnist_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"s5": train(mnist_root, root / "s5"),
            "aux": train(mnist_root, root / "aux", "--ssm_type", "aux"),
            "extend": train(mnist_root, root / "extend", "--ssm_type", "extend", "--R", "3")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["s5", "aux", "extend"])
def test_every_picture_is_a_valid_image(runs, kind):
    assert inspect_run.main([str(runs[kind])]) == 0
    report = json.loads((runs[kind] / "inspect" / "inspect.json").read_text())
    expected = {"eigenvalues.png", "timescales.png", "impulse.png", "curves.png"} | {
        "aux": {"aux_modulus.png"}, "extend": {"extend.png"}, "s5": set()}[kind]
    assert set(report["pictures"]) == expected
    for name in report["pictures"]:
        raw = (runs[kind] / "inspect" / name).read_bytes()
        assert raw[:8] == PNG
        with Image.open(runs[kind] / "inspect" / name) as im:
            im.verify()
    assert set(report["layers"]) == {"layer_0", "layer_1"} and len(report["epochs"]) == 2
    layer = report["layers"]["layer_0"]
    assert len(layer["eigenvalues"]) == len(layer["eigenvalues_init"]) == 4  # P = 8 under conj_sym
    if kind == "aux":
        q = np.asarray(layer["aux_modulus_quantiles"])
        # the moduli as the model runs them: clamped to 1, up to float32 rounding of a · (1/|a|)
        assert q.shape == (5, 49) and np.all(q <= 1.0 + 2 ** -22) and np.all(np.diff(q, axis=0) >= 0)
    if kind == "s5":
        assert layer["impulse_time_variation"] < 1e-5  # time-invariant: the same response at every t0


@pytest.mark.slow
def test_hand_set_eigenvalues_are_listed_with_their_timescales(runs, tmp_path):
    import shutil

    run = tmp_path / "s5"
    shutil.copytree(runs["s5"], run)
    r = np.array([0.5, 0.9, 0.99, 0.999])
    theta = np.array([0.0, 0.3, -1.0, 2.5])
    step = np.array([0.01, 0.1, 0.05, 0.2])

    def set_eigs(name, p):  # Λ̄ = exp(Λ·Δ) = r e^{iθ}
        p["Lambda_re"] = (np.log(r) / step).astype(np.float32)
        p["Lambda_im"] = (theta / step).astype(np.float32)
        p["log_step"] = np.log(step).astype(np.float32)

    edit_checkpoint(run, set_eigs)
    report = inspect_run.inspect(run, "best")
    layer = json.loads((run / "inspect" / "inspect.json").read_text())["layers"]["layer_1"]
    eig = np.array([complex(*z) for z in layer["eigenvalues"]])
    np.testing.assert_allclose(eig, r * np.exp(1j * theta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer["timescales"], -1 / np.log(r), rtol=1e-4)  # steps until r^k = 1/e
    np.testing.assert_allclose(layer["steps"], step, rtol=1e-6)
    assert report["layers"]["layer_0"]["eigenvalues"] == layer["eigenvalues"]


@pytest.mark.slow
def test_extension_with_zero_E_is_time_invariant(runs, tmp_path):
    import shutil

    run = tmp_path / "extend"
    shutil.copytree(runs["extend"], run)
    edit_checkpoint(run, lambda name, p: p.__setitem__("E", np.zeros_like(p["E"])))
    inspect_run.inspect(run, "best", t0s=[0, 12, 30])
    for name, layer in json.loads((run / "inspect" / "inspect.json").read_text())["layers"].items():
        lam = np.abs([complex(*z) for z in layer["eigenvalues"]])
        # Λ_ex(t) = Λ̄ for every t: its spectral radius and ∞-norm are max |λ̄| (Λ̄ clamped to |λ̄| ≤ 1)
        np.testing.assert_allclose(layer["extend_spectral_radius"], min(lam.max(), 1.0), rtol=1e-5)
        np.testing.assert_allclose(layer["extend_norm_inf"], min(lam.max(), 1.0), rtol=1e-5)
        assert layer["extend_how"].startswith("exact")
        assert layer["impulse_time_variation"] < 1e-5, name  # identical impulse responses at every t0
    # ... while the trained extension (E ≠ 0) does vary in time
    trained = inspect_run.inspect(runs["extend"], "best", t0s=[0, 12, 30])
    assert max(v["impulse_time_variation"] for v in trained["layers"].values()) > 1e-4


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert inspect_run.main([str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_is_xla_estimate_of_the_runs_training_step(runs, capsys):
    """--memory: the estimate train_ex.py checks before its first step (models.step_memory), at the run's --bsz;
    its arguments hold at least the parameters and Adam's two moments (float32)."""
    run = runs["s5"]
    assert inspect_run.main([str(run), "--memory"]) == 0
    assert "memory: XLA estimates" in capsys.readouterr().out
    m = json.loads((run / "inspect" / "inspect.json").read_text())["memory"]
    n_params = json.loads((run / "results.json").read_text())["n_params"]
    assert m["bsz"] == 8 and m["argument"] >= 3 * 4 * n_params
    assert m["total"] == m["argument"] + max(m["output"] - m["alias"], 0) + m["temp"] + m["code"] > m["argument"]
