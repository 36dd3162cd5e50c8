"""The registry of SSM types (ssm.register): a new type written in a file of its own trains, lists its options in
--help, runs in bench.py and inspect_run.py and streams in the recurrent mode, without an edit to any other file;
an option given to a type that does not take it is refused."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench
import config
import inspect_run
import models
import ssm
import train_ex

# A fixed-decay exponential moving average, x_t = a x_{t-1} + (1 - a) u_t, y_t = g ⊙ x_t + D ⊙ u_t per feature:
# the lab's next idea, in one file that registers itself
EMA_MODULE = textwrap.dedent('''
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    import ssm


    class EMASSM(nn.Module):
        H: int
        P: int
        decay: float = 0.9
        bidirectional: bool = False
        step_rescale: float = 1.0

        def setup(self):
            self.gain = self.param("gain", nn.initializers.normal(1.0), (self.H,))
            self.D = self.param("D", nn.initializers.normal(1.0), (self.H,))

        def __call__(self, u):
            x = ssm.linear_scan(jnp.full((self.H,), self.decay), (1 - self.decay) * u)
            return self.gain * x + self.D * u

        def initial_state(self):
            return jnp.zeros((self.H,))

        def recurrent_system(self, seq_len=None):
            return ()

        def step(self, x_prev, u_t, t=None, seq_len=None, system=None):
            x = self.decay * x_prev + (1 - self.decay) * u_t
            return x, self.gain * x + self.D * u_t


    def check(args, error):
        if not 0 <= args.ema_decay < 1:
            error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")


    ssm.register(ssm.SSMType(
        ("ema",), EMASSM, "a fixed-decay moving average (a test's file)",
        options=(ssm.Option("ema_decay", 0.9, "ema: the decay a of x_t = a x_(t-1) + (1 - a) u_t", type=float,
                            field="decay"),),
        params=dict(gain="regular", D="D"),
        eigs=lambda module, p: (np.full(module.H, module.decay, complex), None),
        bench={"ema": ["--ssm_type", "ema"]}, check=check))
''')

TINY = ["--d_model", "8", "--n_layers", "1", "--ssm_size_base", "4", "--bsz", "8"]


@pytest.fixture(scope="module")
def ema(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "ema.py"
    path.write_text(EMA_MODULE)
    assert ssm.load_plugins(str(path)) == [str(path)]
    yield path
    for name in [n for n, d in ssm.TYPES.items() if d.cls.__name__ == "EMASSM"]:
        del ssm.TYPES[name]
    ssm.OPTIONS.pop("ema_decay", None)


def test_a_type_from_its_own_file_lists_its_options_in_help(ema):
    text = " ".join(config.make_parser().format_help().split())
    assert "--ema_decay EMA_DECAY ema: the decay a of" in text and "(default: 0.9)" in text
    assert "ema (a fixed-decay moving average (a test's file))" in text


@pytest.mark.slow
def test_a_type_from_its_own_file_trains_inspects_and_runs_in_bench(ema, tmp_path, capsys):
    run = tmp_path / "run"
    code = train_ex.main(["--dataset", "copying", "--data_options", "k=2,vocab=4,lag=4,n_train=32,n_val=16,n_test=16",
                          *TINY, "--ssm_type", "ema", "--ema_decay", "0.8", "--epochs", "1", "--max_steps", "2",
                          "--run_dir", str(run), "--ckpt_every_min", "0"])
    assert code == 0
    assert json.loads((run / "ckpt_latest.json").read_text())["config"]["ema_decay"] == 0.8
    assert inspect_run.main([str(run), "--checkpoint", "latest"]) == 0
    report = json.loads((run / "inspect" / "inspect.json").read_text())
    assert report["ssm_type"] == "ema"
    np.testing.assert_allclose(np.asarray(report["layers"]["layer_0"]["eigenvalues"])[:, 0], 0.8)
    rows = bench.bench_train([("tiny", TINY, 16, True)], repeats=1,
                             variants={name: argv for name, argv in bench.variants().items() if name in ("s5", "ema")})
    assert {r["ssm_type"] for r in rows} == {"s5", "ema"} and all(r["steps_per_s"] > 0 for r in rows)


def test_a_type_from_its_own_file_streams_as_it_runs_in_parallel(ema):
    cfg = train_ex.parse_args([*TINY, "--ssm_type", "ema", "--ema_decay", "0.7", "--no-batchnorm"])
    model = models.build_model(cfg, dict(n_classes=16, seq_len=24, in_dim=16, tokens=True, pair=False,
                                         task="next_step"))
    inputs = jax.random.randint(jax.random.PRNGKey(1), (3, 24), 0, 16)
    batch = {"inputs": inputs, "lengths": jnp.full(3, 24)}
    variables = model.init(jax.random.PRNGKey(0), batch)
    parallel = model.apply(variables, batch)
    recurrent = models.recurrent_logits(model, variables, inputs)
    scale = float(jnp.max(jnp.abs(parallel)))
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(recurrent), np.asarray(parallel), rtol=0, atol=1e-5 * max(scale, 1.0))
    labels = jax.tree_util.tree_map_with_path(lambda p, _: models.param_label(p, cfg, False), variables["params"])
    ssm_labels = labels["encoder"]["layer_0"]["ssm"]
    assert ssm_labels == {"gain": "regular", "D": "regular"}


@pytest.mark.parametrize("argv,message", [
    (["--ssm_type", "s5", "--R", "4"], "--R is an option of --ssm_type extend"),
    (["--ssm_type", "lru", "--s6_state_size", "8"], "--s6_state_size is an option of --ssm_type s6"),
    (["--ssm_type", "s5", "--ema_decay", "0.5"], "--ema_decay is an option of --ssm_type ema"),
    (["--ssm_type", "ema", "--ema_decay", "1.5"], "--ema_decay must be in [0, 1)"),
])
def test_an_option_of_another_type_exits_2_naming_the_types_that_take_it(ema, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_option_at_its_default_or_shared_by_the_type_is_accepted(ema):
    assert config.parse_args(["--ssm_type", "s5", "--R", "10", "--ema_decay", "0.9"]).ssm_type == "s5"
    assert config.parse_args(["--ssm_type", "s4d", "--dt_min", "0.01"]).dt_min == 0.01
    assert config.parse_args(["--ssm_type", "aux", "--blocks", "2", "--extend_guard", "rows"]).extend_guard == "rows"


@pytest.mark.slow
def test_every_parameter_leaf_of_every_type_has_a_declared_role():
    """A parameter renamed in a module but not in its declaration fails here (and in param_label), rather than
    moving silently into another optimiser group."""
    for decl in ssm.declarations():
        kw = {"N": 3} if decl.name == "s6" else {}
        kw.update({"l_max": 8} if decl.name == "extend" else {})
        params = decl.cls(H=4, P=4, **kw).init(jax.random.PRNGKey(0), jnp.zeros((8, 4)))["params"]
        assert set(params) <= set(decl.params), (decl.name, set(params) - set(decl.params))


def test_s5_groups_are_those_of_the_release(ema):
    """The S5 leaves' groups under each --opt_config, as the S5 release places them."""
    path = lambda leaf: [jax.tree_util.DictKey(n) for n in ("encoder", "layer_0", "ssm", leaf)]  # noqa: E731
    expect = {"standard": dict(B="ssm", C="regular", D="regular"), "BandCdecay": dict(B="ssm_decay", C="regular"),
              "BfastandCdecay": dict(B="regular", C="regular"), "noBCdecay": dict(B="ssm", C="ssm", D="ssm")}
    for opt, groups in expect.items():
        cfg = config.parse_args(["--opt_config", opt])
        for leaf, group in {**groups, "Lambda_re": "ssm", "Lambda_im": "ssm", "log_step": "ssm"}.items():
            assert models.param_label(path(leaf), cfg, False) == group, (opt, leaf)
    with pytest.raises(ValueError, match="no role"):
        models.param_label(path("Lambda_renamed"), config.parse_args([]), False)


@pytest.mark.slow
def test_a_type_from_its_own_file_can_be_named_in_a_series_plan(ema, tmp_path):
    """A plan file naming --ssm_type ema: the series checks and runs it when SSM_MODULES names the type's file,
    and refuses it (exit 2, naming the setting) when it does not."""
    import os
    import subprocess

    plan = tmp_path / "ema.plan"
    plan.write_text("about | the moving average\ngroup | copy | --dataset copying --data_options k=2,vocab=4,lag=4,"
                    "n_train=32,n_val=16,n_test=16\nsetting | s5 | --ssm_type s5\n"
                    "setting | ema | --ssm_type ema --ema_decay 0.5\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "EPOCHS", "DATASET", "GROUPS", "SSM_MODULES")}
    env.update(JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PLAN=str(plan), OUT_ROOT=str(tmp_path / "out"),
               SEEDS="0", EPOCHS="1", EXTRA=" ".join(TINY), DATA=str(tmp_path))
    script = config.PLANS.parent / "run_train_ex.sh"
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "setting 'ema'" in r.stderr and "ema" in r.stderr, r.stdout + r.stderr
    r = subprocess.run(["bash", str(script)], env={**env, "SSM_MODULES": str(ema)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "out" / "copy" / "ema" / "seed0" / "results.json").read_text())
    assert res["status"] == "finished" and res["config"]["ssm_type"] == "ema" and res["config"]["ema_decay"] == 0.5
