"""The synthetic tasks: small sequence tasks generated in memory, each one declaration in the registry TASKS.

    tasks.register(tasks.Task("parity", "classification", "the parity of a bit string", dict(length=16),
                              generate=make_parity, shape=lambda o: (o["length"], 2, 2), chance=lambda o: 0.5,
                              vocab=lambda o: ["0", "1"]))

A registered task is a `--dataset` of train_ex.py at once: its options come from `--data_options KEY=VALUE,...`
(parse_options checks them), dataloaders.load builds its splits, and the model's shapes, the loss (`kind`) and the
chance level follow from the declaration. Every task takes the sizes SIZES as options besides its own; split s
(0, 1, 2 for train, val, test) is drawn from numpy's default_rng([data_seed, s]), so the three splits come from
disjoint random streams and the same options give the same arrays on every machine. Sequences all have the same
length (no padding); token tasks keep token 0 as the blank.

Also here: the grammar of ListOps' expressions, whose sets dataloaders.make_listops writes in the LRA format.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class DataError(Exception):
    """A problem with the data on disk or a task's options, with a message that says what to do about it."""


SIZES = dict(n_train=2000, n_val=500, n_test=500, data_seed=0)  # samples per split; the generator's seed
# What a task asks for and how models.task_loss scores it: a class per sequence, a class at every scored position
# (label_weights), a real number per sequence, a real number at every scored position
KINDS = ("classification", "per_position", "regression", "per_position_regression")
ADDING_TOLERANCE = 0.04  # a real-valued prediction counts as correct when within this of its label
BLANK, DELIM = 0, 1  # copying and selective copying: the blank (noise) token and the delimiter; data tokens from 2


@dataclass(frozen=True)
class Task:
    """One synthetic task, a `--dataset` of its own.

    name      the dataset's name
    kind      one of KINDS
    doc       one line for --help
    options   its own options and their defaults (integers, or words listed in `choices`); SIZES are added
    generate  (rng, n, **options) → (inputs, labels, label_weights or None) of n sequences: inputs (n, L) integer
              tokens or (n, L, C) real values; labels (n,) or (n, L); label_weights (n, L), 1 where scored
    shape     options → (seq_len, in_dim, n_classes): in_dim the vocabulary size of token inputs, else channels;
              n_classes 1 for the regressions
    chance    options → the accuracy of the best guess that ignores the inputs
    vocab     options → the symbol of every input token; None for real-valued inputs
    choices   {option: its allowed words}
    minimum   {option: its smallest value} where not 1 (data_seed: 0)
    check     options → what is wrong with their combination, or None
    reference {split: (inputs, labels, label_weights)} → scores results.json reports beside the model's
    show      (inputs, labels, label_weights) of one sequence → text to check it by eye (sample_text's
              layout by default)
    """

    name: str
    kind: str
    doc: str
    options: dict
    generate: Callable
    shape: Callable
    chance: Callable
    vocab: Callable | None = None
    choices: dict = field(default_factory=dict)
    minimum: dict = field(default_factory=dict)
    check: Callable | None = None
    reference: Callable | None = None
    show: Callable | None = None

    @property
    def defaults(self) -> dict:
        """Every option with its default: the task's own, then SIZES."""
        return {**self.options, **SIZES}

    @property
    def tokens(self) -> bool:
        return self.vocab is not None


TASKS: dict[str, Task] = {}  # name → declaration, in the order of registration


def register(task: Task) -> Task:
    """Add a declaration to TASKS; a ValueError when it is inconsistent or another task has its name."""
    where = f"task {task.name}"
    if task.name in TASKS and TASKS[task.name] != task:
        raise ValueError(f"{where} is declared twice")
    if task.kind not in KINDS:
        raise ValueError(f"{where}: kind {task.kind!r} is not one of {', '.join(KINDS)}")
    if set(task.options) & set(SIZES):
        raise ValueError(f"{where}: options {sorted(set(task.options) & set(SIZES))} are SIZES, given to every task")
    for key, value in task.options.items():
        if key in task.choices:
            if value not in task.choices[key]:
                raise ValueError(f"{where}: the default {key}={value!r} is not one of {task.choices[key]}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: option {key}={value!r} is neither an integer nor a word with choices")
    unknown = (set(task.choices) | set(task.minimum)) - set(task.defaults)
    if unknown:
        raise ValueError(f"{where}: choices or minimum name options it does not have: {sorted(unknown)}")
    takes = list(inspect.signature(task.generate).parameters)[2:]
    if sorted(takes) != sorted(task.options):
        raise ValueError(f"{where}: generate(rng, n, ...) takes {takes}, its options are {list(task.options)}")
    TASKS[task.name] = task
    return task


class View(Mapping):
    """{task name: of(task)} over TASKS, read live: a task registered later is in it too."""

    def __init__(self, of: Callable):
        self.of = of

    def __getitem__(self, name):
        return self.of(TASKS[name])

    def __iter__(self):
        return iter(TASKS)

    def __len__(self):
        return len(TASKS)


def parse_options(name: str, text: str | dict | None) -> dict:
    """A task's options: its defaults updated by `text` ("k=4,lag=32", or a dict). A DataError names what is wrong
    and every allowed key with its default."""
    if name not in TASKS:
        raise DataError(f"--data_options applies to the diagnostic datasets ({', '.join(TASKS)}), not {name}")
    task = TASKS[name]
    defaults = task.defaults
    allowed = ", ".join(f"{k}={v}" for k, v in defaults.items())
    given = {}
    if isinstance(text, dict):
        given = dict(text)
    elif text:
        for item in str(text).split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise DataError(f"{name}: data option {item!r} is not KEY=VALUE; allowed (defaults): {allowed}")
            given[key.strip()] = value.strip()
    opts = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise DataError(f"{name}: unknown data option {key!r}; allowed (defaults): {allowed}")
        if key in task.choices:
            if value not in task.choices[key]:
                raise DataError(f"{name}: data option {key}={value!r} must be one of {', '.join(task.choices[key])}")
            opts[key] = value
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, float) and value != number:
            raise DataError(f"{name}: data option {key}={value!r} must be an integer; allowed (defaults): {allowed}")
        opts[key] = number
    low = {"data_seed": 0, **task.minimum}
    for key, value in opts.items():
        if key not in task.choices and value < low.get(key, 1):
            raise DataError(f"{name}: data option {key} must be at least {low.get(key, 1)}, got {value}")
    problem = task.check(opts) if task.check else None
    if problem:
        raise DataError(f"{name}: {problem}")
    return opts


def chance_level(name: str, options=None) -> float:
    """The accuracy of the best guess that ignores the inputs, at the task's options (text or dict)."""
    return TASKS[name].chance(parse_options(name, options))


def diagnostic_shape(name: str, options=None) -> tuple:
    """(seq_len, in_dim, tokens, pair, n_classes) of a task at its options (as dataloaders.SHAPES)."""
    task = TASKS[name]
    seq_len, in_dim, n_classes = task.shape(parse_options(name, options))
    return seq_len, in_dim, task.tokens, False, n_classes


def diagnostic_vocab(name: str, options=None) -> list:
    """The symbol of every input token of a token task; empty for real-valued inputs."""
    task = TASKS[name]
    return task.vocab(parse_options(name, options)) if task.tokens else []


def generate_diagnostic(name: str, options=None) -> dict:
    """{split: (inputs, labels, label_weights or None)} of a task; split s is drawn from default_rng([data_seed, s])
    with s = 0, 1, 2 for train, val, test."""
    o = parse_options(name, options)
    own = {k: v for k, v in o.items() if k not in SIZES}
    return {split: TASKS[name].generate(np.random.default_rng([o["data_seed"], s]), o[f"n_{split}"], **own)
            for s, split in enumerate(("train", "val", "test"))}


def sample_text(name: str, vocab: list, x, y, w) -> str:
    """One sequence of a task as text, to check it by eye: the task's own `show`, else the inputs (as symbols for
    tokens) and the labels under them ('-' where nothing is scored)."""
    task = TASKS[name]
    if task.show:
        return task.show(x, y, w)
    inputs = (" ".join(f"{vocab[t]:>3}" for t in x) if task.tokens
              else str(np.round(np.asarray(x, np.float64), 3).tolist()))
    if np.ndim(y) == 0:
        return f"inputs {inputs}\n  label {y}"
    scored = np.ones(len(y)) if w is None else w
    labels = " ".join(f"{(str(c) if m else '-'):>3}" for c, m in zip(np.asarray(y).tolist(), scored))
    return f"inputs {inputs}\n  labels {labels}"


def _distinct(rng, n, among, k):
    """(n, k) distinct integers from 0..among-1 in each row, in random order."""
    return np.argsort(rng.random((n, among)), axis=1)[:, :k]


def _data_tokens(o):
    return [".", "|"] + [str(i) for i in range(o["vocab"])]


# --------------------------------------------------------------------------------------------------
# The memory tasks
# --------------------------------------------------------------------------------------------------


def make_copying(rng, n, k, vocab, lag):
    """The S4 paper's copying task. Layout of one sequence (length 2k + lag + 1), `.` blank, `|` delimiter:

        inputs   d1 d2 .. dk  .  .  ..  .  |  .  .  ..  .
                 (k tokens)  (lag blanks)     (k blanks)
        labels    -  - ..  -  -  -  ..  -  -  d1 d2 .. dk     scored only at the last k positions

    Data tokens are 2..vocab+1 in the inputs and their classes 0..vocab-1 in the labels."""
    L = 2 * k + lag + 1
    data = rng.integers(0, vocab, (n, k))
    x = np.zeros((n, L), np.uint8 if vocab + 2 <= 256 else np.int32)
    x[:, :k] = data + 2
    x[:, k + lag] = DELIM
    y, w = np.zeros((n, L), np.int32), np.zeros((n, L), np.float32)
    y[:, L - k:], w[:, L - k:] = data, 1.0
    return x, y, w


register(Task(
    "copying", "per_position", "S4's copying task: k tokens, lag blanks, a delimiter; repeat the k tokens",
    dict(k=8, vocab=8, lag=64), make_copying, minimum={"lag": 0},
    shape=lambda o: (2 * o["k"] + o["lag"] + 1, o["vocab"] + 2, o["vocab"]),
    chance=lambda o: 1.0 / o["vocab"], vocab=_data_tokens))


def make_selective_copying(rng, n, k, vocab, length):
    """Mamba's selective copying task: k data tokens at random distinct positions of a stream of `length` blanks
    (noise), then the delimiter, then k blanks where the data tokens must be reproduced in the order they came:

        inputs   .  d1 .  .  d2 d3 .  ..  dk .  |  .  .  ..  .
                 (a stream of `length` steps)       (k blanks)
        labels   -  -  ..                        -  d1 d2 .. dk   scored only at the last k positions

    Length length + 1 + k. Tokens and classes as in make_copying."""
    L = length + 1 + k
    data = rng.integers(0, vocab, (n, k))
    where = np.sort(_distinct(rng, n, length, k), axis=1)
    x = np.zeros((n, L), np.uint8 if vocab + 2 <= 256 else np.int32)
    x[np.arange(n)[:, None], where] = data + 2
    x[:, length] = DELIM
    y, w = np.zeros((n, L), np.int32), np.zeros((n, L), np.float32)
    y[:, L - k:], w[:, L - k:] = data, 1.0
    return x, y, w


register(Task(
    "selective_copying", "per_position", "Mamba's selective copying: k tokens scattered in a stream of blanks",
    dict(k=8, vocab=8, length=64), make_selective_copying,
    check=lambda o: (f"k={o['k']} tokens do not fit in a stream of length={o['length']}"
                     if o["k"] > o["length"] else None),
    shape=lambda o: (o["length"] + 1 + o["k"], o["vocab"] + 2, o["vocab"]),
    chance=lambda o: 1.0 / o["vocab"], vocab=_data_tokens))


def make_associative_recall(rng, n, n_pairs, n_queries, n_keys, n_values, gap):
    """Multi-query associative recall (Zoology's MQAR): n_pairs key-value pairs with distinct keys, `gap` blanks,
    then n_queries distinct keys of those pairs; at each query the answer is the value paired with that key:

        inputs   k1 v1 k2 v2 .. kP vP  .  ..  .  q1 q2 .. qQ
        labels    -  -  -  - ..  -  -  -  ..  -  a1 a2 .. aQ     scored only at the query positions

    Tokens: 0 blank, keys 1..n_keys, values n_keys+1..n_keys+n_values; classes: the values 0..n_values-1."""
    P, Q = n_pairs, n_queries
    L = 2 * P + gap + Q
    keys = _distinct(rng, n, n_keys, P)
    values = rng.integers(0, n_values, (n, P))
    asked = _distinct(rng, n, P, Q)  # which pairs are queried, in which order
    rows = np.arange(n)[:, None]
    x = np.zeros((n, L), np.uint8 if 1 + n_keys + n_values <= 256 else np.int32)
    x[:, 0:2 * P:2], x[:, 1:2 * P:2] = keys + 1, values + n_keys + 1
    x[:, L - Q:] = keys[rows, asked] + 1
    y, w = np.zeros((n, L), np.int32), np.zeros((n, L), np.float32)
    y[:, L - Q:], w[:, L - Q:] = values[rows, asked], 1.0
    return x, y, w


def _recall_check(o):
    if o["n_pairs"] > o["n_keys"]:
        return f"n_pairs={o['n_pairs']} distinct keys need n_keys >= n_pairs (n_keys={o['n_keys']})"
    if o["n_queries"] > o["n_pairs"]:
        return f"n_queries={o['n_queries']} distinct queries need n_pairs >= n_queries (n_pairs={o['n_pairs']})"
    return None


register(Task(
    "associative_recall", "per_position", "Zoology's MQAR: key-value pairs, then keys whose values to recall",
    dict(n_pairs=8, n_queries=8, n_keys=16, n_values=16, gap=0), make_associative_recall,
    minimum={"gap": 0}, check=_recall_check,
    shape=lambda o: (2 * o["n_pairs"] + o["gap"] + o["n_queries"], 1 + o["n_keys"] + o["n_values"], o["n_values"]),
    chance=lambda o: 1.0 / o["n_values"],
    vocab=lambda o: ["."] + [f"k{i}" for i in range(o["n_keys"])] + [f"v{i}" for i in range(o["n_values"])]))


# --------------------------------------------------------------------------------------------------
# Real-valued tasks
# --------------------------------------------------------------------------------------------------


def make_adding(rng, n, length):
    """The adding problem (Hochreiter & Schmidhuber): two channels per step, a value uniform in [0, 1) and a
    marker, 1 at exactly two steps (one in each half of the sequence) and 0 elsewhere. The answer, one real
    number per sequence, is the sum of the two marked values (a regression: squared error, correct when within
    ADDING_TOLERANCE):

        values   0.12 0.87 0.45 .. 0.31 0.02 ..      labels   0.87 + 0.31 = 1.18
        markers  0    1    0    .. 1    0    ..
    """
    values = rng.random((n, length)).astype(np.float32)
    half = length // 2
    first = rng.integers(0, half, n)
    second = rng.integers(half, length, n)
    markers = np.zeros((n, length), np.float32)
    markers[np.arange(n), first] = markers[np.arange(n), second] = 1.0
    rows = np.arange(n)
    labels = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=-1), labels.astype(np.float32), None


def show_adding(x, y, w):
    terms = " + ".join(f"x[{t}]={x[t, 0]:.3f}" for t in np.flatnonzero(x[:, 1]))
    return f"length {len(x)}: marked {terms}; label {float(y):.3f}"


register(Task(
    "adding", "regression", "the adding problem: the sum of the two marked values (a regression)",
    dict(length=100), make_adding,
    check=lambda o: (f"length must be at least 2 (one marker in each half), got {o['length']}"
                     if o["length"] < 2 else None),
    shape=lambda o: (o["length"], 2, 1),  # (value, marker) per step; one real-valued output
    # always answering 1 (the mode of the sum of two uniform values, whose density is 1 - |s - 1|) is within the
    # tolerance t with probability 2t - t² (0.0784 at t = 0.04)
    chance=lambda o: 2 * ADDING_TOLERANCE - ADDING_TOLERANCE ** 2, show=show_adding))


GAIN_SHAPES = ("sine", "switch", "ramp")


def gain_schedule(length: int, periods: int, shape: str) -> np.ndarray:
    """g(t) = 1 + φ(periods · t / length) for t = 0..length-1, (length,) float64, with φ of period 1, mean 0 and
    range [-1, 1]: sine sin(2πs); switch the sign of sin(2πs) (the gain jumps between 0 and 2); ramp the sawtooth
    2·frac(s) - 1 (it rises, then drops at once)."""
    s = periods * np.arange(length) / length
    if shape == "sine":
        phi = np.sin(2 * np.pi * s)
    elif shape == "switch":
        phi = np.where(np.mod(s, 1.0) < 0.5, 1.0, -1.0)
    elif shape == "ramp":
        phi = 2 * np.mod(s, 1.0) - 1
    else:
        raise DataError(f"unknown gain schedule shape {shape!r}: use one of {GAIN_SHAPES}")
    return 1.0 + phi


def make_varying_gain(rng, n, length, lag, periods, shape):
    """A time-varying linear map, which no time-invariant filter represents: white noise u_t ~ N(0, 1) in, and at
    every step t ≥ lag the target y_t = g(t) · u_{t-lag}, with the gain schedule g of gain_schedule (a regression
    at every scored position: squared error, correct within ADDING_TOLERANCE):

        inputs   u_0   u_1  ..  u_lag          u_lag+1          ..
        labels    -     -   ..  g(lag) u_0     g(lag+1) u_1     ..    scored from position lag on

    The best time-invariant filter of the same length (lti_floor) predicts ḡ · u_{t-lag}, ḡ the mean gain; its
    error is the variance of g over the scored positions, the part only a time-varying model can remove."""
    u = rng.normal(size=(n, length)).astype(np.float32)
    g = gain_schedule(length, periods, shape)
    y, w = np.zeros((n, length), np.float32), np.zeros((n, length), np.float32)
    y[:, lag:] = (g[lag:] * u[:, :length - lag]).astype(np.float32)
    w[:, lag:] = 1.0
    return u[..., None], y, w


def varying_gain_chance(o) -> float:
    """Always answering 0 (the mode of y_t = g(t) u, u ~ N(0, 1)) is within the tolerance t with probability
    erf(t / (g(t) √2)), averaged over the scored positions."""
    g = gain_schedule(o["length"], o["periods"], o["shape"])[o["lag"]:]
    return float(np.mean([1.0 if x == 0 else math.erf(ADDING_TOLERANCE / (abs(x) * math.sqrt(2))) for x in g]))


def lti_floor(train: tuple, evaluate: dict) -> dict:
    """The error of the best linear time-invariant filter of the sequence's length on a per-position regression:
    the causal FIR filter h (L taps), ŷ_t = Σ_{j ≤ t} h_j u_{t-j}, fitted by least squares to the scored positions
    of `train` = (inputs (n, L, 1), labels, label_weights) (normal equations accumulated in float64 over blocks of
    sequences), then scored on each split of `evaluate` ({name: (inputs, labels, label_weights)}) as the model is:
    mean squared error and the fraction within ADDING_TOLERANCE. → {split: {"mse": ..., "acc": ...}} plus "taps"."""
    def design(u):  # (n, L) → (n, L, L): X[n, t, j] = u[n, t-j] for j ≤ t, else 0
        n, L = u.shape
        padded = np.concatenate([np.zeros((n, L - 1)), u], axis=1)
        return np.lib.stride_tricks.sliding_window_view(padded, L, axis=1)[:, :, ::-1]

    def arrays(split):
        x, y, w = split
        return (np.asarray(a, np.float64) for a in (x[..., 0], y, w))

    u, y, w = arrays(train)
    L = u.shape[1]
    xtx, xty = np.zeros((L, L)), np.zeros(L)
    for i in range(0, len(u), 256):
        X = design(u[i:i + 256]) * np.sqrt(w[i:i + 256])[..., None]
        xtx += np.einsum("ntj,ntk->jk", X, X)
        xty += np.einsum("ntj,nt->j", X, y[i:i + 256] * np.sqrt(w[i:i + 256]))
    h = np.linalg.lstsq(xtx, xty, rcond=None)[0]
    out = {"taps": L}
    for name, split in evaluate.items():
        u, y, w = arrays(split)
        err = design(u) @ h - y
        out[name] = {"mse": float(np.sum(w * err ** 2) / np.sum(w)),
                     "acc": float(np.sum(w * (np.abs(err) < ADDING_TOLERANCE)) / np.sum(w))}
    return out


def show_varying_gain(x, y, w):
    lag = int(np.argmax(w > 0))
    steps = "  ".join(f"y[{t}]={y[t]:+.3f}=({y[t] / x[t - lag, 0] if x[t - lag, 0] else 0:.3f})·u[{t - lag}]"
                      for t in range(lag, min(lag + 4, len(y))))
    return f"length {len(y)}, lag {lag}: {steps} ..."


register(Task(
    "varying_gain", "per_position_regression", "y_t = g(t) u_(t-lag), a time-varying gain on white noise",
    dict(length=128, lag=4, periods=2, shape="sine"), make_varying_gain,
    choices={"shape": GAIN_SHAPES}, minimum={"lag": 0},
    check=lambda o: (f"lag={o['lag']} leaves no scored position in a sequence of length={o['length']}"
                     if o["lag"] >= o["length"] else None),
    shape=lambda o: (o["length"], 1, 1),  # one value per step, a real-valued output at every step
    chance=varying_gain_chance, show=show_varying_gain,
    reference=lambda splits: {"lti_floor": lti_floor(splits["train"], splits)}))


# --------------------------------------------------------------------------------------------------
# ListOps expressions (the LRA generator); dataloaders.make_listops writes sets of them
# --------------------------------------------------------------------------------------------------

LISTOPS_OPS = ["[MIN", "[MAX", "[MED", "[SM"]
LISTOPS_MAX_DEPTH, LISTOPS_P_OP, LISTOPS_MIN_LEN, LISTOPS_MAX_LEN = 10, 0.25, 500, 2000


class _TooLong(Exception):
    pass


def listops_tree(rng: random.Random, depth=1, budget=None):
    """A random expression: an operator with 2-10 arguments with probability 0.25 below the maximum depth,
    else a digit. Returned as (op, [args]) or an int. With `budget` (a one-element list holding the length
    still allowed) generation stops with _TooLong as soon as the expression outgrows it: such a candidate
    would be rejected anyway, and stopping early skips the rare enormous trees."""
    if depth < LISTOPS_MAX_DEPTH and rng.random() < LISTOPS_P_OP:
        op = rng.choice(LISTOPS_OPS)
        if budget is not None:
            budget[0] -= 2
            if budget[0] < 0:
                raise _TooLong
        return op, [listops_tree(rng, depth + 1, budget) for _ in range(rng.randint(2, 10))]
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooLong
    return rng.randrange(10)


def listops_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [listops_value(a) for a in args]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(np.median(values))
    return sum(values) % 10


def listops_length(tree) -> int:
    return 1 if isinstance(tree, int) else 2 + sum(listops_length(a) for a in tree[1])


def listops_source(tree) -> str:
    """The LRA `Source` string: every application of an operator to one more argument is parenthesised."""
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    s = op
    for a in args:
        s = f"( {s} {listops_source(a)} )"
    return f"( {s} ] )"


def listops_chunk(args) -> list:
    """[(source, value)] of the candidates of one chunk (seed, index, n) whose length is within the LRA bounds: n
    expressions drawn from a generator seeded by the seed and the chunk's index."""
    seed, index, n = args
    rng = random.Random(f"listops-{seed}-{index}")  # fast scalar draws; string seeds are stable
    out = []
    for _ in range(n):
        try:
            tree = listops_tree(rng, budget=[LISTOPS_MAX_LEN - 1])
        except _TooLong:
            continue
        if LISTOPS_MIN_LEN < listops_length(tree) < LISTOPS_MAX_LEN:
            out.append((listops_source(tree), listops_value(tree)))
    return out
