"""The registry of synthetic tasks (tasks.register): a task declared once, in a test's own file, is a --dataset of
train_ex.py with its options, their errors, its chance level and its shapes, without an edit to any other file;
every registered task's declaration agrees with what it generates; the built-in tasks' data do not change."""

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import config
import dataloaders as dl
import tasks
import train_ex

HERE = Path(__file__).resolve().parent
os.environ["WANDB_MODE"] = "disabled"


# The parity or the majority of a bit string, one class per sequence: a toy task, declared here only
def make_bits(rng, n, length, rule):
    bits = rng.integers(0, 2, (n, length))
    labels = bits.sum(axis=1) % 2 if rule == "parity" else 2 * bits.sum(axis=1) > length
    return (bits + 1).astype(np.uint8), labels.astype(np.int32), None


BITS = tasks.Task(
    "bits", "classification", "the parity or majority of a bit string (a test's task)",
    dict(length=9, rule="majority"), make_bits, choices={"rule": ("majority", "parity")},
    check=lambda o: "majority needs an odd length" if o["rule"] == "majority" and o["length"] % 2 == 0 else None,
    shape=lambda o: (o["length"], 3, 2), chance=lambda o: 0.5, vocab=lambda o: [".", "0", "1"])

SMALL = "n_train=64,n_val=16,n_test=16"


@pytest.fixture
def bits():
    tasks.register(BITS)
    yield BITS
    del tasks.TASKS[BITS.name]


def test_a_task_declared_once_is_listed_everywhere(bits, monkeypatch):
    assert list(dl.DATASETS)[-1] == "bits" and list(dl.DATASETS)[0] == "listops-classification"
    assert dl.SHAPES["bits"] == (9, 3, True, False, 2) and dl.task_of("bits") == "classification"
    assert dl.DIAGNOSTIC_OPTIONS["bits"] == dict(length=9, rule="majority", **tasks.SIZES)
    assert dl.chance_level("bits") == 0.5
    assert dl.model_meta("bits", "length=5") == dict(seq_len=5, in_dim=3, tokens=True, pair=False, n_classes=2,
                                                     task="classification", onehot_width=3)
    monkeypatch.setenv("COLUMNS", "100000")  # --help's lines unbroken
    text = config.make_parser().format_help()
    assert "bits (the parity or majority of a bit string (a test's task))" in text
    assert "bits: length=9,rule=majority,n_train=2000,n_val=500,n_test=500,data_seed=0" in text


def test_a_task_leaves_no_trace_once_removed(bits):
    del tasks.TASKS["bits"]
    assert "bits" not in dl.DATASETS and "bits" not in dl.SHAPES and "bits" not in dl.DIAGNOSTIC_OPTIONS
    assert set(dl.DATASETS) == set(dl.SHAPES) and set(tasks.TASKS) < set(dl.DATASETS)
    tasks.register(BITS)


def test_a_task_loads_as_train_ex_loads_it(bits):
    cfg = config.parse_args(["--dataset", "bits", "--data_options", f"length=6,rule=parity,{SMALL}"])
    ds, train, val, test = train_ex.load_data(cfg)
    assert [len(train), len(val), len(test)] == [64, 16, 16] and ds.generated and ds.task == "classification"
    assert (ds.seq_len, ds.in_dim, ds.n_classes, ds.vocab) == (6, 3, 2, [".", "0", "1"])
    np.testing.assert_array_equal(train.labels, (np.asarray(train.inputs) - 1).sum(axis=1) % 2)
    assert ds.source == f"generated in memory: bits length=6,rule=parity,{SMALL},data_seed=0"
    assert dl.model_meta("bits", cfg.data_options) == {k: getattr(ds, k) for k in (
        "seq_len", "in_dim", "tokens", "pair", "n_classes", "task", "onehot_width")}
    batch = next(train.batches(8))
    assert batch["inputs"].shape == (8, 6) and batch["labels"].shape == (8,) and "label_weights" not in batch
    assert dl.describe(ds, "train", 0).startswith("bits train[0]\n  inputs ")
    majority = dl.load("bits", **dl.parse_options("bits", SMALL))
    np.testing.assert_array_equal(majority.test.labels, (np.asarray(majority.test.inputs) == 2).sum(axis=1) > 4)


@pytest.mark.parametrize("options,message", [
    ("length=8", "bits: majority needs an odd length"),
    ("rule=xor", "bits: data option rule='xor' must be one of majority, parity"),
    ("colour=1", "bits: unknown data option 'colour'; allowed (defaults): length=9, rule=majority, n_train=2000"),
    ("length=nine", "must be an integer"),
    ("length=0", "bits: data option length must be at least 1, got 0"),
])
def test_a_tasks_bad_options_exit_2(bits, options, message, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--dataset", "bits", "--data_options", options])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    with pytest.raises(dl.DataError, match=re.escape(message)):
        dl.chance_level("bits", options)


@pytest.mark.slow
def test_a_task_declared_once_trains(bits, tmp_path):
    run = tmp_path / "run"
    code = train_ex.main(["--dataset", "bits", "--data_options", f"length=5,{SMALL}", "--d_model", "8",
                          "--n_layers", "1", "--ssm_size_base", "4", "--bsz", "8", "--epochs", "1", "--max_steps",
                          "2", "--run_dir", str(run), "--ckpt_every_min", "0"])
    results = json.loads((run / "results.json").read_text())
    assert code == 0 and results["data"]["generated"] and results["config"]["dataset"] == "bits"


def declaration(**changes):
    fields = dict(name="bad", kind="per_position", doc="", options=dict(length=4), generate=lambda rng, n, length: 0,
                  shape=lambda o: (4, 2, 2), chance=lambda o: 0.5)
    return tasks.Task(**{**fields, **changes})


@pytest.mark.parametrize("changes,message", [
    (dict(kind="ranking"), "kind 'ranking' is not one of"),
    (dict(options=dict(length=0.5), generate=lambda rng, n, length: 0), "neither an integer nor a word"),
    (dict(options=dict(length=4, n_train=3)), "are SIZES"),
    (dict(generate=lambda rng, n, size: 0), "takes ['size']"),
    (dict(options=dict(length=4, mode="a"), generate=lambda rng, n, length, mode: 0, choices={"mode": ("b",)}),
     "the default mode='a' is not one of"),
    (dict(minimum={"lag": 0}), "does not have: ['lag']"),
    (dict(name="copying"), "task copying is declared twice"),
])
def test_register_refuses_an_inconsistent_declaration(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tasks.register(declaration(**changes))
    assert "bad" not in tasks.TASKS


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_declaration_agrees_with_what_it_generates(name):
    task = tasks.TASKS[name]
    o = tasks.parse_options(name, "n_train=6,n_val=2,n_test=2")
    seq_len, in_dim, n_classes = task.shape(o)
    x, y, w = tasks.generate_diagnostic(name, o)["train"]
    vocab = dl.diagnostic_vocab(name, o)
    if task.tokens:
        assert x.shape == (6, seq_len) and len(vocab) == in_dim and x.max() < in_dim
    else:
        assert x.shape == (6, seq_len, in_dim) and vocab == []
    per_position = task.kind.startswith("per_position")
    assert y.shape == ((6, seq_len) if per_position else (6,))
    assert (w is not None and w.shape == (6, seq_len)) == per_position
    assert (y.dtype.kind == "f") == task.kind.endswith("regression")
    assert n_classes == 1 if task.kind.endswith("regression") else y.max() < n_classes
    assert 0 < tasks.chance_level(name, o) < 1


BUILTIN = [t for t in tasks.TASKS.values() if t.generate.__module__ == "tasks"]


def test_data_md_lists_every_built_in_task_with_its_defaults():
    text = (HERE / "DATA.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)`[^|]*\|[^|]*\|[^|]*\| `([^`]*)` \|", text, re.M)}
    assert {t.name: ", ".join(f"{k}={v}" for k, v in t.options.items()) for t in BUILTIN} == rows


# sha256 of the arrays of every split at n_train=16,n_val=8,n_test=8: the data of the published results and of
# every run's generated splits. A change here changes every diagnostic's data (keep the order of the rng's draws).
GOLDEN = {
    "copying": "7edf97ad323096ee",
    "selective_copying": "4cb04337ec72702c",
    "associative_recall": "4ce9c86ea3eac670",
    "adding": "26ab2d3749ae341f",
    "varying_gain": "c522acd76743d76d",
}


def test_the_built_in_tasks_generate_the_data_they_always_have():
    digests = {}
    for task in BUILTIN:
        m = hashlib.sha256()
        for arrays in tasks.generate_diagnostic(task.name, "n_train=16,n_val=8,n_test=8").values():
            for a in arrays:
                if a is not None:
                    m.update(np.ascontiguousarray(a).tobytes())
        digests[task.name] = m.hexdigest()[:16]
    assert digests == GOLDEN
