"""s6_lru.py: the selective scan and the LRU against float64 numpy loops of their equations (outputs, and gradients
against central differences of those loops), the modules against loops built from their raw parameters, their
initialisations, the memory of the channel-blocked scan, the options, and a short real-MNIST run of each.

The references are written from the equations, one time step at a time, independently of the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import config
import inspect_run
import models
import s6_lru
import train_ex
from test_ssm import rel_err
from test_train import results

# --------------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------------


def np_selective_scan(u, delta, A, B, C, D, bidirectional=False):
    """x_t = exp(Δ_t A) ⊙ x_{t−1} + (Δ_t u_t) B_t, y_t = x_t C_t + D u_t; backward direction read by C_t[N:]."""
    L, H = u.shape
    N = A.shape[1]
    y = D * u
    x = np.zeros((H, N))
    for t in range(L):
        x = np.exp(delta[t][:, None] * A) * x + np.outer(delta[t] * u[t], B[t])
        y[t] = y[t] + x @ C[t, :N]
    if bidirectional:
        x = np.zeros((H, N))
        for t in reversed(range(L)):
            x = np.exp(delta[t][:, None] * A) * x + np.outer(delta[t] * u[t], B[t])
            y[t] = y[t] + x @ C[t, N:]
    return y


def np_lru(nu_log, theta_log, gamma_log, B, C, D, u, bidirectional=False, rate=1):
    """x_t = λ x_{t−1} + γ B u_t, y_t = Re(C x_t) + D u_t. At rate k every step is k fine steps of the same λ with
    the input held (the k-step hold)."""
    lam = np.exp(-np.exp(nu_log) + 1j * np.exp(theta_log))
    gamma = np.exp(gamma_log)
    L, H = u.shape
    P = len(lam)
    y = D * u

    def run(order, Cd):
        x = np.zeros(P, complex)
        for t in order:
            for _ in range(rate):
                x = lam * x + gamma * (B @ u[t])
            y[t] = y[t] + (Cd @ x).real

    run(range(L), C[:, :P])
    if bidirectional:
        run(reversed(range(L)), C[:, P:])
    return y


def central_difference(f, args, i, v, eps=1e-6):
    """d/dε f(args with args[i] + ε v) at 0, float64."""
    plus = [a + eps * v if j == i else a for j, a in enumerate(args)]
    minus = [a - eps * v if j == i else a for j, a in enumerate(args)]
    return (f(*plus) - f(*minus)) / (2 * eps)


def f32(x):
    return jnp.asarray(x, jnp.float32)


def c64(x):
    return jnp.asarray(x, jnp.complex64)


def selective_inputs(rng, L, H, N, dirs):
    u = rng.normal(size=(L, H))
    delta = np.exp(rng.uniform(np.log(0.01), np.log(1.0), (L, H)))
    A = -np.exp(rng.uniform(-1.0, 1.5, (H, N)))
    B, C = rng.normal(size=(L, N)), rng.normal(size=(L, dirs * N))
    D = rng.normal(size=H)
    return [u, delta, A, B, C, D]


# --------------------------------------------------------------------------------------------------
# selective_scan
# --------------------------------------------------------------------------------------------------

SCAN_CASES = [(1, 3, 2, None), (17, 4, 3, None), (33, 6, 4, 2), (20, 5, 16, 1)]  # (L, H, N, block)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L,H,N,block", SCAN_CASES)
def test_selective_scan_equals_loop(L, H, N, block, bidirectional):
    args = selective_inputs(np.random.default_rng(L * H + N), L, H, N, 2 if bidirectional else 1)
    y = jax.jit(lambda *a: s6_lru.selective_scan(*a, bidirectional=bidirectional, block=block))(*map(f32, args))
    assert y.shape == (L, H) and y.dtype == jnp.float32
    assert rel_err(y, np_selective_scan(*args, bidirectional)) < 1e-5


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_selective_scan_equals_its_plain_loop_beside_it(bidirectional):
    """selective_scan (blocked, rematerialised) against selective_scan_ref, the step-by-step loop written beside it
    in s6_lru.py: outputs and the gradient of every argument; the loop itself against the float64 numpy loop."""
    L, H, N = 19, 6, 4
    rng = np.random.default_rng(11)
    args = list(map(f32, selective_inputs(rng, L, H, N, 2 if bidirectional else 1)))
    w = f32(rng.normal(size=(L, H)))
    fast = lambda *a: s6_lru.selective_scan(*a, bidirectional=bidirectional, block=2)  # noqa: E731
    ref = lambda *a: s6_lru.selective_scan_ref(*a, bidirectional=bidirectional)  # noqa: E731
    y_ref = jax.jit(ref)(*args)
    assert rel_err(jax.jit(fast)(*args), y_ref) < 1e-5
    assert rel_err(y_ref, np_selective_scan(*map(np.asarray, args), bidirectional)) < 1e-5
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(w * f(*a)), argnums=tuple(range(6))))(*args)  # noqa: E731
    for i, (g, g_ref) in enumerate(zip(grad(fast), grad(ref))):
        assert rel_err(g, g_ref) < 1e-4, i


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_selective_scan_gradients_equal_differences_of_the_loop(bidirectional):
    """Directional derivatives of Σ w ⊙ y along a random direction of every argument (u, Δ, A, B, C, D), from
    jax.grad in float32 (blocked, rematerialised) against central differences of the float64 loop."""
    L, H, N = 13, 4, 3
    rng = np.random.default_rng(5)
    args = selective_inputs(rng, L, H, N, 2 if bidirectional else 1)
    w = rng.normal(size=(L, H))
    loss = lambda *a: jnp.sum(f32(w) * s6_lru.selective_scan(*a, bidirectional=bidirectional, block=2))  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*map(f32, args))
    ref_loss = lambda *a: float(np.sum(w * np_selective_scan(*a, bidirectional)))  # noqa: E731
    for i, g in enumerate(grads):
        v = rng.normal(size=args[i].shape)
        ref = central_difference(ref_loss, args, i, v)
        got = float(np.sum(np.asarray(g, np.float64) * v))
        assert abs(got - ref) < 1e-4 * max(abs(ref), 1.0), (i, got, ref)


def test_channel_blocks_bound_the_memory_of_a_training_step():
    """Scanned in blocks of 8 of 64 channels and rematerialised, the gradient's temporary memory is a fraction of
    the unblocked scan's; the default block keeps L·block·N within CHANNEL_BUDGET."""
    assert s6_lru.channel_block(4096, 64, 16) == 16 and s6_lru.channel_block(16384, 128, 16) == 4
    assert s6_lru.channel_block(10, 7, 16) == 7 and s6_lru.channel_block(2 ** 20, 6, 16) == 1
    L, H, N = 1024, 64, 16
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(L, H), (L, H), (H, N), (L, N), (L, N), (H,)]]

    def temp_bytes(block):
        grad = jax.grad(lambda *a: jnp.sum(s6_lru.selective_scan(*a, block=block) ** 2), argnums=(0, 1, 2, 3, 4))
        return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    blocked, whole = temp_bytes(8), temp_bytes(H)
    assert blocked < 0.4 * whole, (blocked, whole)


# --------------------------------------------------------------------------------------------------
# apply_lru
# --------------------------------------------------------------------------------------------------


def lru_inputs(rng, L, H, P, dirs):
    nu_log = np.log(-np.log(rng.uniform(0.5, 0.99, P)))
    theta_log = np.log(rng.uniform(0.01, np.pi, P))
    gamma_log = rng.normal(size=P) * 0.3
    B = rng.normal(size=(P, H)) + 1j * rng.normal(size=(P, H))
    C = rng.normal(size=(H, dirs * P)) + 1j * rng.normal(size=(H, dirs * P))
    return [nu_log, theta_log, gamma_log, B, C, rng.normal(size=H), rng.normal(size=(L, H))]


def jax_lru_args(args):
    return [f32(a) if not np.iscomplexobj(a) else c64(a) for a in args]


@pytest.mark.parametrize("rate", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L,H,P", [(1, 2, 3), (19, 3, 5), (40, 4, 8)])
def test_apply_lru_equals_loop(L, H, P, bidirectional, rate):
    args = lru_inputs(np.random.default_rng(L + P), L, H, P, 2 if bidirectional else 1)
    y = jax.jit(lambda *a: s6_lru.apply_lru(*a, bidirectional=bidirectional, rate=rate))(*jax_lru_args(args))
    assert y.shape == (L, H) and y.dtype == jnp.float32
    assert rel_err(y, np_lru(*args, bidirectional, rate)) < 2e-5


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_apply_lru_gradients_equal_differences_of_the_loop(bidirectional):
    """Directional derivatives of Σ w ⊙ y along every argument; for complex B and C the real and the imaginary
    directions separately (jax.grad of a real loss is ∂/∂re − i ∂/∂im, so the derivative along v is Re Σ grad · v)."""
    L, H, P = 15, 3, 4
    rng = np.random.default_rng(11)
    args = lru_inputs(rng, L, H, P, 2 if bidirectional else 1)
    w = rng.normal(size=(L, H))
    loss = lambda *a: jnp.sum(f32(w) * s6_lru.apply_lru(*a, bidirectional=bidirectional))  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*jax_lru_args(args))
    ref_loss = lambda *a: float(np.sum(w * np_lru(*a, bidirectional)))  # noqa: E731
    for i, g in enumerate(grads):
        g = np.asarray(g, np.complex128)
        for part in ((1.0,) if not np.iscomplexobj(args[i]) else (1.0, 1j)):
            v = rng.normal(size=args[i].shape) * part
            ref = central_difference(ref_loss, args, i, v)
            got = float(np.sum((g * v).real))
            assert abs(got - ref) < 1e-4 * max(abs(ref), 1.0), (i, part, got, ref)


# --------------------------------------------------------------------------------------------------
# Modules: initialisation, parameters → equations, rates
# --------------------------------------------------------------------------------------------------


def np_params(variables):
    return {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}


def test_s6_initialisation():
    H, N = 20, 5
    model = s6_lru.S6SSM(H=H, N=N, dt_min=0.002, dt_max=0.05)
    p = np_params(model.init(jax.random.PRNGKey(0), jnp.zeros((3, H))))
    np.testing.assert_allclose(p["A_log"], np.log(np.tile(np.arange(1, N + 1), (H, 1))), rtol=1e-6)
    np.testing.assert_array_equal(p["D"], 1.0)
    assert p["W_Delta_down"].shape == (H, 2) and p["W_Delta_up"].shape == (2, H)  # rank ⌈20/16⌉ = 2
    dt = np.log1p(np.exp(p["b_Delta"]))  # softplus
    assert np.all((dt > 0.002 * (1 - 1e-4)) & (dt < 0.05 * (1 + 1e-4))) and dt.std() > 0
    assert p["W_B"].shape == (H, N) and p["W_C"].shape == (H, N)


def test_lru_initialisation():
    H, P = 3, 4000
    model = s6_lru.LRUSSM(H=H, P=P, r_min=0.4, r_max=0.9, max_phase=np.pi / 10)
    p = np_params(model.init(jax.random.PRNGKey(1), jnp.zeros((2, H))))
    r = np.exp(-np.exp(p["nu_log"]))
    phase = np.exp(p["theta_log"])
    assert r.min() >= 0.4 - 1e-6 and r.max() <= 0.9 + 1e-6
    # uniform on the annulus: |λ|² uniform on [r_min², r_max²], mean (0.16 + 0.81)/2
    assert abs(np.mean(r ** 2) - 0.485) < 0.01
    assert phase.min() > 0 and phase.max() <= np.pi / 10 * (1 + 1e-6) and abs(phase.mean() - np.pi / 20) < 0.01
    np.testing.assert_allclose(np.exp(p["gamma_log"]), np.sqrt(1 - r ** 2), rtol=1e-4)
    assert p["B"].shape == (P, H, 2) and p["C"].shape == (H, P, 2)


@pytest.mark.parametrize("rate", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_s6_module_equals_loop_from_its_parameters(bidirectional, rate):
    """Δ_t = rate · softplus(W_Δ u_t + b_Δ), B_t = W_B u_t, C_t = W_C u_t, A = −exp(A_log), then the loop."""
    L, H, N = 11, 4, 3
    model = s6_lru.S6SSM(H=H, N=N, bidirectional=bidirectional, step_rescale=float(rate))
    variables = model.init(jax.random.PRNGKey(2), jnp.zeros((L, H)))
    variables = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.normal(jax.random.PRNGKey(3), x.shape),
                                       variables)
    p = np_params(variables)
    u = np.random.default_rng(4).normal(size=(L, H))
    delta = rate * np.log1p(np.exp(u @ p["W_Delta_down"] @ p["W_Delta_up"] + p["b_Delta"]))
    ref = np_selective_scan(u, delta, -np.exp(p["A_log"]), u @ p["W_B"], u @ p["W_C"], p["D"], bidirectional)
    assert rel_err(jax.jit(model.apply)(variables, f32(u)), ref) < 1e-5


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lru_module_equals_loop_from_its_parameters(bidirectional):
    L, H, P = 9, 3, 5
    model = s6_lru.LRUSSM(H=H, P=P, bidirectional=bidirectional, step_rescale=2.0)
    variables = model.init(jax.random.PRNGKey(5), jnp.zeros((L, H)))
    p = np_params(variables)
    u = np.random.default_rng(6).normal(size=(L, H))
    cplx = lambda a: a[..., 0] + 1j * a[..., 1]  # noqa: E731
    ref = np_lru(p["nu_log"], p["theta_log"], p["gamma_log"], cplx(p["B"]), cplx(p["C"]), p["D"], u, bidirectional,
                 rate=2)
    assert rel_err(jax.jit(model.apply)(variables, f32(u)), ref) < 2e-5


@pytest.mark.parametrize("cls", [s6_lru.S6SSM, s6_lru.LRUSSM])
def test_recurrent_step_equals_parallel_layer_at_a_rate(cls):
    """One layer at step_rescale 2: its step loop gives its parallel output (whole models: test_generate.py)."""
    L, H = 12, 4
    model = cls(H=H, P=6, step_rescale=2.0)
    variables = model.init(jax.random.PRNGKey(7), jnp.zeros((L, H)))
    u = f32(np.random.default_rng(8).normal(size=(L, H)))

    @jax.jit
    def recurrent(variables, u):
        system = model.apply(variables, L, method="recurrent_system")
        body = lambda x, u_t: model.apply(variables, x, u_t, None, L, system, method="step")  # noqa: E731
        return jax.lax.scan(body, model.apply(variables, method="initial_state"), u)[1]

    assert rel_err(recurrent(variables, u), np.asarray(jax.jit(model.apply)(variables, u), np.float64)) < 1e-5


@pytest.mark.parametrize("cls", [s6_lru.S6SSM, s6_lru.LRUSSM])
def test_bidirectional_step_raises(cls):
    model = cls(H=2, P=4, bidirectional=True)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="bidirectional"):
        model.apply(variables, 3, method="recurrent_system")


# --------------------------------------------------------------------------------------------------
# Options, optimiser groups, inspect_run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,match", [
    (["--ssm_type", "lru", "--lru_r_min", "0.9", "--lru_r_max", "0.5"], "lru_r_min"),
    (["--ssm_type", "lru", "--lru_r_max", "1.0"], "lru_r_max"),
    (["--ssm_type", "lru", "--lru_max_phase", "0"], "lru_max_phase"),
    (["--ssm_type", "s6", "--s6_state_size", "0"], "s6_state_size"),
    (["--ssm_type", "s6", "--freeze", "base", "--load_checkpoint", "x.msgpack"], "no S5 base"),
    (["--ssm_type", "lru", "--freeze", "base", "--load_checkpoint", "x.msgpack"], "no S5 base"),
])
def test_bad_options_exit_2_saying_what(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_options_reach_the_modules_and_the_optimiser_groups():
    cfg = config.parse_args(["--ssm_type", "s6", "--s6_state_size", "5", "--d_model", "8", "--n_layers", "1"])
    meta = dict(n_classes=3, seq_len=10, in_dim=4, tokens=True, pair=False)
    variables = jax.eval_shape(models.build_model(cfg, meta).init, jax.random.PRNGKey(0),
                               models.example_batch(meta, 2))
    ssm = variables["params"]["encoder"]["layer_0"]["ssm"]
    assert ssm["A_log"].shape == (8, 5) and "s6_state_size" in models.ARCH_FIELDS
    labels = models.make_optimizer(variables["params"], cfg, 10)[1]["encoder"]["layer_0"]["ssm"]
    assert labels["A_log"] == "ssm" and labels["b_Delta"] == "ssm" and labels["W_B"] == "regular"
    cfg = config.parse_args(["--ssm_type", "lru", "--lru_r_min", "0.2", "--lru_r_max", "0.3", "--d_model", "8",
                             "--n_layers", "1", "--ssm_size_base", "6"])
    variables = models.build_model(cfg, meta).init(jax.random.PRNGKey(0), models.example_batch(meta, 2))
    ssm = variables["params"]["encoder"]["layer_0"]["ssm"]
    r = np.exp(-np.exp(np.asarray(ssm["nu_log"])))
    assert ssm["nu_log"].shape == (6,) and np.all((r > 0.2 - 1e-6) & (r < 0.3 + 1e-6))
    labels = models.make_optimizer(variables["params"], cfg, 10)[1]["encoder"]["layer_0"]["ssm"]
    assert {labels[k] for k in ("nu_log", "theta_log", "gamma_log")} == {"ssm"}


def test_inspect_eigenvalues_of_s6_and_lru(tmp_path):
    """inspect_run's discrete eigenvalues: S6's exp(Δ A) at the bias step Δ = softplus(b_Δ); the LRU's λ (no Δ)."""
    layers = {}
    for cls in (s6_lru.S6SSM, s6_lru.LRUSSM):
        module = cls(H=4, P=6, N=3) if cls is s6_lru.S6SSM else cls(H=4, P=6)
        p = module.init(jax.random.PRNGKey(0), jnp.zeros((5, 4)))["params"]
        lam, steps = inspect_run.discrete_eigs(module, p)
        if cls is s6_lru.S6SSM:
            dt = np.log1p(np.exp(np.asarray(p["b_Delta"], np.float64)))
            ref = np.exp(dt[:, None] * -np.exp(np.asarray(p["A_log"], np.float64))).ravel()
            np.testing.assert_allclose(steps, dt, rtol=1e-5)
        else:
            ref = np.exp(-np.exp(np.asarray(p["nu_log"], np.float64)) + 1j * np.exp(np.asarray(p["theta_log"])))
            assert steps is None
        np.testing.assert_allclose(lam, ref, rtol=1e-5)
        layers[cls.__name__] = dict(trained=lam, init=lam, timescales=inspect_run.timescales(lam),
                                    timescales_init=inspect_run.timescales(lam), steps=steps)
    inspect_run.plot_eigenvalues(tmp_path / "e.png", layers)
    inspect_run.plot_timescales(tmp_path / "t.png", layers)
    assert (tmp_path / "e.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------------
# Learning real MNIST
# --------------------------------------------------------------------------------------------------


# S6 starts with its sequence mixing small (its output is bilinear in the input through B_t and C_t, and Δ starts
# small): it needs larger steps, a larger learning rate and one more epoch than the LRU to pass a lower bar.
MNIST_RUNS = {
    "lru": (["--epochs", "2", "--lr", "4e-3"], 0.6),
    "s6": (["--epochs", "3", "--lr", "1e-2", "--s6_state_size", "4", "--dt_min", "0.05", "--dt_max", "0.5",
            "--no-batchnorm"], 0.35),
}


@pytest.mark.slow
@pytest.mark.parametrize("ssm_type", list(MNIST_RUNS))
def test_real_mnist_learns(ssm_type, mnist_root, tmp_path):
    """A small model of each type on real MNIST test images (7×7 pixels, 4,000 for training, 1,000 held out)."""
    extra, bar = MNIST_RUNS[ssm_type]
    args = ["--dataset", "mnist-classification", "--dir_name", str(mnist_root), "--downsample", "4", "--run_dir",
            str(tmp_path / "m"), "--bsz", "50", "--d_model", "32", "--n_layers", "2", "--ssm_size_base", "16",
            "--max_train_samples", "4000", "--max_eval_samples", "1000", "--p_dropout", "0", "--warmup_end", "0",
            "--ssm_type", ssm_type, *extra]
    assert train_ex.main(args) == 0
    epochs = results(tmp_path / "m")["epochs"]
    val_acc = epochs[-1]["val_acc"]
    print(f"{ssm_type}: real MNIST (7x7, 4,000 train / 1,000 held out, {len(epochs)} epochs): val accuracy "
          f"{val_acc:.3f}")
    assert val_acc > bar, f"chance is 0.1; reached {val_acc}"
