"""Datasets of the Long Range Arena and sequential MNIST/CIFAR, as compact numpy arrays, batched fast.

    ds = dataloaders.load("listops-classification", "./data", seed=42)   # seed: the held-out splits' seed
    ds.train.inputs (N, L) tokens | (N, L, C) uint8 pixels,  .lengths (N,),  .labels (N,)   [pairs: inputs2, lengths2]
    for batch in dataloaders.prefetch(ds.train.batches(50, shuffle=True, seed=42, epoch=0)): ...

Every source is parsed once into a cache of numpy arrays under `<data root>/cache/` (keyed by the dataset,
every option that changes the arrays, the cache version and a fingerprint of the source files) and loaded
from there memory-mapped afterwards. Seeded choices (hold-out splits) are applied at load time, so one cache
serves every seed. Conventions (the LRA release's, as in S4/S5): pad token 0, lengths count the appended end
token, pooling must average the real positions only.

Splits as in the S5 release: held-out sets are the parts of one `torch.randperm(n)` drawn with
`torch.Generator().manual_seed(seed)` (what torch's `random_split` does; seed 42 by default, independent of the
training seed), re-derived here in numpy (`torch_randperm`), so the indices are the release's exactly (same
source order, same permutation) without torch; psMNIST uses the release's fixed bit-reversal permutation of the
pixels.

The synthetic tasks (copying, associative recall, adding, varying_gain, ...) are declared in tasks.py; `load`
generates them in memory (load_diagnostic), and DATASETS, SHAPES and model_meta list them after the real datasets.

Command line:
    python dataloaders.py check NAME --dir_name DIR       sizes, one batch's shapes, batches/s of the data path
    python dataloaders.py make-listops --out DIR          generate ListOps in the LRA TSV format
    python dataloaders.py split-mnist --source D --out DIR  disjoint MNIST train/test from the test split alone
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import inspect
import json
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import tasks
from tasks import (  # noqa: F401  (also re-exported: the names other files use as dataloaders.NAME)
    ADDING_TOLERANCE,
    DataError,
    chance_level,
    diagnostic_shape,
    diagnostic_vocab,
    generate_diagnostic,
    listops_length,
    listops_source,
    listops_value,
    parse_options,
)

CACHE_VERSION = 2  # 2: Text/Retrieval vocabularies counted over the truncated text, as in the S5 release
# Datasets whose arrays changed since: their own cache version (3: gray CIFAR in Pillow's fixed-point luma)
CACHE_VERSION_OF = {"lra-cifar-classification": 3}
PAD, UNK, EOS = 0, 1, 2
SPECIALS = ["<pad>", "<unk>", "<eos>"]


# ==================================================================================================
# Splits and batches
# ==================================================================================================


@dataclass
class Split:
    inputs: np.ndarray  # (N, L) integer tokens, or (N, L, C) uint8 pixels
    lengths: np.ndarray  # (N,) real lengths (end token included)
    labels: np.ndarray  # (N,)
    inputs2: np.ndarray | None = None  # pair tasks: the second document
    lengths2: np.ndarray | None = None
    mean: np.ndarray | None = None  # normalisation on the value/scale scale: (C,) per channel or (L, C) per step;
    std: np.ndarray | None = None  # None for tokens
    scale: float = 255.0  # raw values → 0-1 (pixels) or −1..1 (16-bit PCM audio: 32768)
    next_step: bool = False  # next-step prediction: labels are the values themselves, inputs shifted right by one
    label_weights: np.ndarray | None = None  # per-position tasks: (N, L) 1 where a position is scored, else 0

    def __len__(self):
        return len(self.labels)

    def subset(self, idx) -> "Split":
        def pick(a):
            return None if a is None else np.asarray(a[idx])

        return Split(pick(self.inputs), pick(self.lengths), pick(self.labels), pick(self.inputs2),
                     pick(self.lengths2), self.mean, self.std, self.scale, self.next_step, pick(self.label_weights))

    def _features(self, x):
        if self.mean is None:
            return x.astype(np.int32)
        mean, std = self.mean, self.std
        if mean.ndim == 2:  # per time step: the first steps, for a batch cut to a shorter width
            mean, std = mean[:x.shape[1]], std[:x.shape[1]]
        return ((x.astype(np.float32) / self.scale) - mean) / std

    def num_batches(self, bsz, drop_last=False, buckets=None):
        return len(self._plan(bsz, False, 0, 0, drop_last, buckets))

    def _plan(self, bsz, shuffle, seed, epoch, drop_last, buckets):
        """[(row indices, padded width)] for one epoch, deterministic in (seed, epoch)."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
        L = self.inputs.shape[1]
        widths = sorted(set(int(b) for b in buckets or ()) | {L})
        if widths[0] < 1:
            raise ValueError(f"length buckets must be positive, got {buckets}")
        longest = self.lengths if self.lengths2 is None else np.maximum(self.lengths, self.lengths2)
        bucket_of = np.searchsorted(widths, np.minimum(longest[order], L))
        plan = []
        for b, width in enumerate(widths):
            rows = order[bucket_of == b]
            stop = len(rows) - len(rows) % bsz if drop_last else len(rows)
            plan += [(rows[i:i + bsz], width) for i in range(0, stop, bsz)]
        if shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def batches(self, bsz, *, shuffle=False, seed=0, epoch=0, drop_last=False, buckets=None, start=0,
                shard=(0, 1)):
        """Yield batches as dicts of numpy arrays: inputs, lengths, labels, weights [, inputs2, lengths2]
        [, label_weights]. Per-position tasks (`label_weights` set) have labels (bsz, L) and label_weights
        (bsz, L), 1 at the scored positions; real-valued labels (regression) stay float32, others are int32.
        For next-step prediction (`next_step`) labels are the sequences' values (bsz, L) and inputs the same
        values shifted right by one, 0 first.

        Every batch has exactly `bsz` rows, so the model compiles one shape per width: a last partial batch
        is filled with copies of its first row carrying weight 0 (`drop_last=True` drops it instead, for
        training). `buckets` (e.g. (512, 1024, 2048)) groups sequences by length and cuts each batch to the
        smallest bucket that holds it. `start` skips the first batches (resuming inside an epoch).
        `shard=(k, n)`: only the k-th of n equal parts of every batch (bsz/n rows; one process's share of a
        global batch of bsz rows). Every part has the same number of batches and the same shapes.
        """
        k, n_parts = shard
        if bsz % n_parts:
            raise ValueError(f"batch size {bsz} is not divisible into {n_parts} equal parts")
        part = bsz // n_parts
        for rows, width in self._plan(bsz, shuffle, seed, epoch, drop_last, buckets)[start:]:
            n = len(rows)
            weights = np.zeros(bsz, np.float32)
            weights[:n] = 1.0
            if n < bsz:
                rows = np.concatenate([rows, np.full(bsz - n, rows[0])])
            rows, weights = rows[k * part:(k + 1) * part], weights[k * part:(k + 1) * part]
            labels = np.asarray(self.labels[rows])
            labels = labels[:, :width] if labels.ndim == 2 else labels
            batch = {"inputs": self._features(self.inputs[rows, :width]),
                     "lengths": np.minimum(self.lengths[rows], width).astype(np.int32),
                     "labels": labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32),
                     "weights": weights}
            if self.label_weights is not None:
                batch["label_weights"] = np.asarray(self.label_weights[rows, :width], np.float32)
            if self.next_step:  # predict x_t from x_{<t}: the model sees x_{t-1} at t (0 at t = 0)
                values = np.asarray(self.inputs[rows, :width]).reshape(len(rows), width).astype(np.int32)
                batch["labels"] = values
                batch["inputs"] = np.pad(values[:, :-1], ((0, 0), (1, 0)))
            if self.inputs2 is not None:
                batch["inputs2"] = self._features(self.inputs2[rows, :width])
                batch["lengths2"] = np.minimum(self.lengths2[rows], width).astype(np.int32)
            yield batch


def prefetch(iterator, size=4):
    """Run `iterator` in a background thread, `size` items ahead, so the accelerator never waits for numpy."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    error = []

    def worker():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:  # handed to the consumer
            error.append(e)
        finally:
            q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        yield item
    if error:
        raise error[0]


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int
    seq_len: int
    in_dim: int  # vocabulary size for tokens, channels for pixels
    padded: bool  # sequences have different lengths (tokens, padded with 0)
    pair: bool  # two documents per sample (retrieval)
    cached: bool = False  # loaded from the cache without preprocessing
    source: str = ""  # where the data came from
    vocab: list = field(default_factory=list)
    generated: bool = False  # generated here (ListOps without the release), not the published data
    generator_seed: int | None = None  # its generator's seed, when known
    split_seed: int | None = None  # the seed of the held-out splits, when they were drawn here
    task: str = "classification"  # or "next_step" (task_of)
    onehot_width: int | None = None  # token datasets: the one-hot encoder's width (ONEHOT_WIDTH), >= in_dim
    reference: dict = field(default_factory=dict)  # reference scores results.json reports beside the model's

    @property
    def tokens(self):
        return self.train.mean is None

    def provenance(self) -> dict:
        """What results.json records about the data a run used."""
        return {"dataset": self.name, "source": self.source, "generated": self.generated,
                "generator_seed": self.generator_seed, "split_seed": self.split_seed,
                "vocab_size": self.in_dim if self.tokens else None,
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}


# ==================================================================================================
# Readers for the real file formats
# ==================================================================================================


def _need(path: Path, what: str, command: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: looked for {path}\n  get it with: {command}")
    return path


def _download_cmd(dir_name, part):
    return f"./download_lra.sh --dir {dir_name} --only {part}"


def read_tsv(path: Path, n_fields: int, header: tuple | None = None):
    """Rows of a tab-separated file as lists of strings; a row with the wrong number of fields is an error
    naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if i == 1 and header is not None:
                if tuple(line.split("\t")) != header:
                    raise DataError(f"{path}:1: expected the header {'<TAB>'.join(header)!r}, got {line[:80]!r}")
                continue
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != n_fields:
                raise DataError(f"{path}:{i}: malformed row: expected {n_fields} tab-separated fields, "
                                f"found {len(parts)}")
            rows.append(parts)
    return rows


def _label(text: str, n_classes: int, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not a number") from None
    if value != int(value) or not 0 <= value < n_classes:
        raise DataError(f"{where}: label {text!r} is out of range 0..{n_classes - 1}")
    return int(value)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzip or plain."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {tuple(dims)} ({np.prod(dims)} bytes) but holds {body.size}")
    return body.reshape(dims)


class _InProcess:
    """The part of multiprocessing.Pool used here, run in this process (workers=1: no fork)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


class _Workers:
    """The part of multiprocessing.Pool used here (imap, in order) over spawned processes (no fork: JAX may run
    threads), failing instead of hanging: concurrent.futures reports a worker that dies (BrokenProcessPool) where
    Pool starts a new one, forever. A spawned worker imports the caller's main script again; when that script
    calls dataloaders at its top level (no `if __name__ == "__main__":` guard), or a worker crashes on import,
    every worker dies at start-up. Then the pool is given up with a warning that says what to add, and the rest
    of the work is done in this process."""

    def __init__(self, workers: int):
        self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        self.broken = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.executor.shutdown(wait=not self.broken, cancel_futures=True)
        return False

    def imap(self, fn, items, chunksize=1):
        items, done = list(items), 0
        if not self.broken:
            try:
                for result in self.executor.map(fn, items, chunksize=chunksize):
                    yield result
                    done += 1
                return
            except BrokenProcessPool:
                self.broken = True
                when = "at start-up, before returning anything" if done == 0 else f"after {done} results"
                print(f"warning: dataloaders' worker processes died {when}. A spawned worker imports the script "
                      f"that started it again (here {_main_script()}): if that script calls dataloaders at its top "
                      f"level, put that code under `if __name__ == \"__main__\":` (or pass workers=1). Loading in "
                      f"this process instead (slower).", file=sys.stderr, flush=True)
        yield from map(fn, items[done:])


def _main_script() -> str:
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None) or "the interactive session"


def _pool(workers: int):
    return _InProcess() if workers <= 1 else _Workers(workers)


def _smallest_int(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32


def encode_texts(texts, lookup: dict, max_len: int, dtype):
    """Character tokens + end token, truncated to max_len (end token included), padded with 0."""
    out = np.zeros((len(texts), max_len), dtype)
    lengths = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        ids = [lookup.get(c, UNK) for c in text[:max_len - 1]] + [EOS]
        out[i, :len(ids)] = ids
        lengths[i] = len(ids)
    return out, lengths


def char_vocab(texts, min_freq: int):
    counts = collections.Counter()
    for t in texts:
        counts.update(t)
    chars = sorted((c for c, n in counts.items() if n >= min_freq), key=lambda c: (-counts[c], c))
    return SPECIALS + chars


# --------------------------------------------------------------------------------------------------
# ListOps: the LRA files, read or generated (the expressions: tasks.py)
# --------------------------------------------------------------------------------------------------

LISTOPS_VOCAB = SPECIALS + [str(d) for d in range(10)] + tasks.LISTOPS_OPS + ["]"]
LISTOPS_SIZES = {"n_train": 96000, "n_val": 2000, "n_test": 2000}  # the LRA release's
LISTOPS_GENERATOR_SEED = 0  # the seed of the set generated when the release is missing


def make_listops(out_dir, n_train=96000, n_val=2000, n_test=2000, seed=0, workers=None, progress=True):
    """Generate a ListOps set in the LRA TSV format (basic_{train,val,test}.tsv) with the expressions of
    tasks.listops_chunk. Deterministic in `seed` (candidates are drawn in fixed chunks, each from its own seeded
    generator, and kept in chunk order; duplicates are dropped)."""
    out_dir = Path(out_dir)
    total = n_train + n_val + n_test
    samples, seen = [], set()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    chunk = 2000
    bar = tqdm(total=total, desc="generating ListOps", unit="expr", disable=not progress)
    with _pool(workers) as pool:
        index = 0
        while len(samples) < total:
            jobs = [(seed, index + k, chunk) for k in range(4 * workers)]
            index += len(jobs)
            for found in pool.imap(tasks.listops_chunk, jobs):
                for src, value in found:
                    if src not in seen and len(samples) < total:
                        seen.add(src)
                        samples.append((src, value))
                        bar.update(1)
    bar.close()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "generator.json").write_text(json.dumps({"seed": seed, "n_train": n_train, "n_val": n_val,
                                                    "n_test": n_test}) + "\n")  # provenance for results.json
    start = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        with open(tmp / f"basic_{split}.tsv", "w", encoding="utf-8") as f:
            f.write("Source\tTarget\n")
            for src, value in samples[start:start + n]:
                f.write(f"{src}\t{value}\n")
        start += n
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def listops_tokens(source: str):
    return [t for t in source.split() if t not in ("(", ")")]


def _listops_dir(root: Path, generate: bool, workers=None):
    official = root / "lra_release" / "listops-1000"
    if (official / "basic_train.tsv").exists():
        return official, "the downloaded LRA release"
    generated = root / "listops_generated"
    if not (generated / "basic_train.tsv").exists():
        if not generate:
            _need(official / "basic_train.tsv", "ListOps", _download_cmd(root, "lra"))
        banner = ("=" * 100 + "\nListOps: the LRA release was not found under " + str(official) +
                  ".\nGenerating a ListOps set of the official sizes (96,000/2,000/2,000) with the LRA generator "
                  "into\n" + str(generated) + ". It is a GENERATED set, not the downloaded release: numbers are "
                  "comparable in\ndistribution, not sample for sample. Download the release with: " +
                  _download_cmd(root, "lra") + "\n" + "=" * 100)
        print(banner, file=sys.stderr, flush=True)
        make_listops(generated, **LISTOPS_SIZES, seed=LISTOPS_GENERATOR_SEED, workers=workers)
    return generated, "a GENERATED ListOps set (not the LRA release)"


def build_listops(root: Path, seq_len=2048, generate=True, workers=None):
    folder, source = _listops_dir(root, generate, workers)
    lookup = {t: i for i, t in enumerate(LISTOPS_VOCAB)}
    splits = {}
    for split in ("train", "val", "test"):
        path = folder / f"basic_{split}.tsv"
        rows = read_tsv(_need(path, "ListOps split", _download_cmd(root, "lra")), 2, header=("Source", "Target"))
        tokens = np.zeros((len(rows), seq_len), np.uint8)
        lengths = np.zeros(len(rows), np.int32)
        labels = np.zeros(len(rows), np.int32)
        for i, (src, target) in enumerate(rows):
            ids = [lookup.get(t, UNK) for t in listops_tokens(src)][:seq_len - 1] + [EOS]
            tokens[i, :len(ids)] = ids
            lengths[i] = len(ids)
            labels[i] = _label(target, 10, f"{path}:{i + 2}")
        splits[split] = dict(inputs=tokens, lengths=lengths, labels=labels)
    generated = folder.name == "listops_generated"
    info = folder / "generator.json"
    seed = json.loads(info.read_text()).get("seed") if generated and info.exists() else None
    return splits, dict(n_classes=10, seq_len=seq_len, in_dim=len(LISTOPS_VOCAB), padded=True, pair=False,
                        vocab=LISTOPS_VOCAB, source=source, generated=generated, generator_seed=seed)


# --------------------------------------------------------------------------------------------------
# Text (IMDB) and retrieval (AAN)
# --------------------------------------------------------------------------------------------------


def build_imdb(root: Path, seq_len=4096, min_freq=15):
    base = _need(root / "aclImdb", "the IMDB set (aclImdb)", _download_cmd(root, "imdb"))
    texts, labels = {}, {}
    for split in ("train", "test"):
        texts[split], labels[split] = [], []
        for label, sub in ((0, "neg"), (1, "pos")):
            folder = _need(base / split / sub, f"IMDB {split}/{sub}", _download_cmd(root, "imdb"))
            for p in sorted(folder.glob("*.txt")):
                texts[split].append(p.read_text(encoding="utf-8", errors="replace"))
                labels[split].append(label)
    vocab = char_vocab((t[:seq_len - 1] for t in texts["train"]), min_freq)  # counted over what the model sees
    lookup, dtype = {c: i for i, c in enumerate(vocab)}, _smallest_int(len(vocab))
    splits = {}
    for split in ("train", "test"):
        inputs, lengths = encode_texts(texts[split], lookup, seq_len, dtype)
        splits[split] = dict(inputs=inputs, lengths=lengths, labels=np.array(labels[split], np.int32))
    return splits, dict(n_classes=2, seq_len=seq_len, in_dim=len(vocab), padded=True, pair=False, vocab=vocab,
                        source=str(base))


def build_aan(root: Path, seq_len=4000, min_freq=1):
    base = root / "lra_release" / "tsv_data"
    rows = {}
    for split, fname in (("train", "train"), ("val", "eval"), ("test", "test")):
        path = _need(base / f"new_aan_pairs.{fname}.tsv", "the AAN retrieval pairs", _download_cmd(root, "lra"))
        rows[split] = (path, read_tsv(path, 5))
    vocab = char_vocab((d[:seq_len - 1] for r in rows["train"][1] for d in (r[3], r[4])), min_freq)
    lookup, dtype = {c: i for i, c in enumerate(vocab)}, _smallest_int(len(vocab))
    splits = {}
    for split, (path, r) in rows.items():
        inputs, lengths = encode_texts([x[3] for x in r], lookup, seq_len, dtype)
        inputs2, lengths2 = encode_texts([x[4] for x in r], lookup, seq_len, dtype)
        labels = np.array([_label(x[0], 2, f"{path}:{i + 1}") for i, x in enumerate(r)], np.int32)
        splits[split] = dict(inputs=inputs, lengths=lengths, inputs2=inputs2, lengths2=lengths2, labels=labels)
    return splits, dict(n_classes=2, seq_len=seq_len, in_dim=len(vocab), padded=True, pair=True, vocab=vocab,
                        source=str(base))


# --------------------------------------------------------------------------------------------------
# Images: CIFAR-10, MNIST, Pathfinder
# --------------------------------------------------------------------------------------------------

CIFAR_GRAY_MEAN, CIFAR_GRAY_STD = 122.6 / 255, 61.0 / 255
CIFAR_RGB_MEAN, CIFAR_RGB_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)  # the S5 release's values
MNIST_MEAN, MNIST_STD = 0.0, 1.0  # the S5 release feeds MNIST pixels on the 0-1 scale, unnormalised


def _cifar_batches(root: Path):
    base = _need(root / "cifar-10-batches-py", "CIFAR-10 (python version)", _download_cmd(root, "cifar"))
    out = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data, labels = [], []
        for n in names:
            path = _need(base / n, "CIFAR-10 batch", _download_cmd(root, "cifar"))
            try:
                with open(path, "rb") as f:
                    d = pickle.load(f, encoding="bytes")
                x, y = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"])
            except Exception as e:
                raise DataError(f"{path}: not a readable CIFAR-10 python batch ({e})") from None
            if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DataError(f"{path}: expected data (N, 3072) and N labels, got {x.shape} and {len(y)}")
            if y.min() < 0 or y.max() > 9:
                raise DataError(f"{path}: label out of range 0..9")
            data.append(x)
            labels.append(y)
        rgb = np.concatenate(data).reshape(-1, 3, 1024).transpose(0, 2, 1)  # (N, 1024, 3), row-major pixels
        out[split] = (rgb, np.concatenate(labels).astype(np.int32))
    return out, str(base)


def build_cifar(root: Path, gray: bool):
    raw, source = _cifar_batches(root)
    splits = {}
    for split, (rgb, labels) in raw.items():
        if gray:  # torchvision's Grayscale: Pillow's convert("L"), ITU-R 601 luma in 16-bit fixed point, rounded
            luma = rgb.astype(np.uint32) @ np.array([19595, 38470, 7471], np.uint32) + 0x8000
            rgb = (luma >> 16).astype(np.uint8)[..., None]
        splits[split] = dict(inputs=rgb, lengths=np.full(len(labels), 1024, np.int32), labels=labels)
    return splits, dict(n_classes=10, seq_len=1024, in_dim=1 if gray else 3, padded=False, pair=False,
                        source=source)


def write_idx(path: Path, array: np.ndarray):
    """Write unsigned bytes as an IDX file (gzip when the name ends in .gz): the inverse of read_idx."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def split_mnist(source: Path, out: Path, n_test: int) -> Path:
    """A torchvision-layout MNIST root (out/MNIST/raw) made from one IDX split (source/t10k-*), its last n_test
    images as the test split and the rest as the training split: disjoint train and test sets from the 10,000
    test images alone. Returns out/MNIST/raw."""
    images = read_idx(_mnist_file(source, "t10k-images-idx3-ubyte", source))
    labels = read_idx(_mnist_file(source, "t10k-labels-idx1-ubyte", source))
    if not 0 < n_test < len(images):
        raise DataError(f"split-mnist: --n_test must be between 1 and {len(images) - 1}, got {n_test}")
    raw = Path(out) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    cut = len(images) - n_test
    for prefix, part in (("train", slice(0, cut)), ("t10k", slice(cut, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels[part])
    return raw


def _mnist_file(base: Path, stem: str, root: Path):
    for name in (stem, stem + ".gz"):
        if (base / name).exists():
            return base / name
    return _need(base / (stem + ".gz"), "MNIST", _download_cmd(root, "mnist"))


def build_mnist(root: Path, downsample=1):
    """MNIST rows as sequences of 784 pixels, or (28/k)² after k×k average pooling with downsample=k."""
    base = root / "MNIST" / "raw"
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_mnist_file(base, f"{prefix}-images-idx3-ubyte", root))
        labels = read_idx(_mnist_file(base, f"{prefix}-labels-idx1-ubyte", root)).astype(np.int32)
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"{base}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        if labels.max(initial=0) > 9:
            raise DataError(f"{base}: {prefix} label out of range 0..9")
        n, k = len(images), downsample
        if k > 1:
            if 28 % k:
                raise DataError(f"MNIST downsample must divide 28, got {k}")
            images = np.rint(images.reshape(n, 28 // k, k, 28 // k, k).mean(axis=(2, 4))).astype(np.uint8)
        splits[split] = dict(inputs=images.reshape(n, -1, 1), lengths=np.full(n, images[0].size, np.int32),
                             labels=labels)
    return splits, dict(n_classes=10, seq_len=(28 // downsample) ** 2, in_dim=1, padded=False, pair=False,
                        source=str(base))


def _read_png(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.uint8)
    except Exception:
        return None


def build_pathfinder(root: Path, resolution: int, workers=None):
    folder = "pathfinder32" if resolution == 32 else "pathfinder128"
    base = root / "lra_release" / folder / "curv_contour_length_14"
    meta_dir = _need(base / "metadata", f"Pathfinder {resolution}x{resolution} metadata", _download_cmd(root, "lra"))
    entries = []
    for meta in sorted(meta_dir.glob("*.npy"), key=lambda p: (len(p.stem), p.stem)):
        with open(meta, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 4:
                    raise DataError(f"{meta}:{i}: malformed metadata row: expected at least 4 fields")
                entries.append((str(base / fields[0] / fields[1]), _label(fields[3], 2, f"{meta}:{i}")))
    if not entries:
        raise DataError(f"{meta_dir}: no metadata rows found (empty split)")
    paths = [e[0] for e in entries]
    with _pool(workers or max(1, min(16, os.cpu_count() or 1))) as pool:
        images = list(tqdm(pool.imap(_read_png, paths, chunksize=256), total=len(paths),
                           desc=f"reading {folder} PNGs", unit="img", disable=len(paths) < 5000))
    keep = [i for i, im in enumerate(images) if im is not None and im.shape == (resolution, resolution)]
    skipped = len(paths) - len(keep)
    if skipped:
        print(f"pathfinder: skipped {skipped} unreadable or empty image(s) of {len(paths)} "
              f"(e.g. {paths[next(i for i in range(len(paths)) if i not in set(keep))]})", file=sys.stderr)
    x = np.stack([images[i].reshape(-1) for i in keep])[..., None]
    labels = np.array([entries[i][1] for i in keep], np.int32)
    return {"all": dict(inputs=x, lengths=np.full(len(keep), resolution ** 2, np.int32), labels=labels)}, dict(
        n_classes=2, seq_len=resolution ** 2, in_dim=1, padded=False, pair=False, source=str(base), skipped=skipped)


# --------------------------------------------------------------------------------------------------
# Speech Commands v0.02 (35 words, raw 16 kHz audio)
# --------------------------------------------------------------------------------------------------

SPEECH_WORDS = ("backward", "bed", "bird", "cat", "dog", "down", "eight", "five", "follow", "forward", "four", "go",
                "happy", "house", "learn", "left", "marvin", "nine", "no", "off", "on", "one", "right", "seven",
                "sheila", "six", "stop", "three", "tree", "two", "up", "visual", "wow", "yes", "zero")
SPEECH_RATE, SPEECH_LEN = 16000, 16000
SPEECH_DIR = "speech_commands_v0.02"


def _read_wav(path):
    """(int16 samples, None) of a 16 kHz mono 16-bit PCM WAV file, or (None, what is wrong with it)."""
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            if (rate, width, channels) != (SPEECH_RATE, 2, 1):
                return None, (f"{rate} Hz, {8 * width}-bit, {channels} channel(s); Speech Commands clips are "
                              f"{SPEECH_RATE} Hz 16-bit mono")
            if n > SPEECH_LEN:
                return None, f"{n} samples, longer than {SPEECH_LEN} (1 s)"
            return np.frombuffer(w.readframes(n), "<i2").copy(), None
    except (wave.Error, EOFError, OSError) as e:
        return None, f"not a readable WAV file ({e})"


def build_speech(root: Path, workers=None):
    """Speech Commands v0.02 from its archive's layout: one folder of WAV files per word, validation_list.txt and
    testing_list.txt (paths relative to the folder); every other clip is training data. _background_noise_ is
    not a class. Clips are zero-padded at the end to 16,000 samples (1 s) and kept as int16."""
    base = root / SPEECH_DIR
    cmd = _download_cmd(root, "speech")
    _need(base, "Speech Commands v0.02 (the folder with the word folders and the two lists)", cmd)
    for name in ("validation_list.txt", "testing_list.txt"):
        _need(base / name, f"Speech Commands v0.02's {name}", cmd)
    listed = {s: {line.strip() for line in (base / f).read_text().splitlines() if line.strip()}
              for s, f in (("val", "validation_list.txt"), ("test", "testing_list.txt"))}
    entries = []
    for word_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("_")):
        if word_dir.name not in SPEECH_WORDS:
            raise DataError(f"{word_dir}: {word_dir.name!r} is not one of the 35 Speech Commands v0.02 words")
        for f in sorted(word_dir.glob("*.wav")):
            rel = f"{word_dir.name}/{f.name}"
            split = "test" if rel in listed["test"] else "val" if rel in listed["val"] else "train"
            entries.append((f, SPEECH_WORDS.index(word_dir.name), split))
    if not entries:
        raise DataError(f"no WAV files in the word folders under {base}\n  get them with: {cmd}")
    with _pool(workers or max(1, min(16, os.cpu_count() or 1))) as pool:
        clips = list(tqdm(pool.imap(_read_wav, [e[0] for e in entries], chunksize=256), total=len(entries),
                          desc="reading Speech Commands WAVs", unit="clip", disable=len(entries) < 5000))
    for (path, _, _), (_, problem) in zip(entries, clips):
        if problem:
            raise DataError(f"{path}: {problem}; replace or delete the file")
    splits = {}
    for split in ("train", "val", "test"):
        idx = [i for i, e in enumerate(entries) if e[2] == split]
        x = np.zeros((len(idx), SPEECH_LEN, 1), np.int16)
        for row, i in enumerate(idx):
            x[row, :len(clips[i][0]), 0] = clips[i][0]
        splits[split] = dict(inputs=x, lengths=np.full(len(idx), SPEECH_LEN, np.int32),
                             labels=np.array([entries[i][1] for i in idx], np.int32))
    total = count = squares = 0.0  # the training set's mean and std on the −1..1 scale, padding included
    for i in range(0, len(splits["train"]["inputs"]), 1024):
        chunk = splits["train"]["inputs"][i:i + 1024].astype(np.float64) / 32768.0
        total, squares, count = total + chunk.sum(), squares + np.square(chunk).sum(), count + chunk.size
    mean = total / max(count, 1)
    std = float(np.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0)))
    return splits, dict(n_classes=len(SPEECH_WORDS), seq_len=SPEECH_LEN, in_dim=1, padded=False, pair=False,
                        source=str(base), train_mean=float(mean), train_std=max(std, 1e-8), value_scale=32768.0)


SPEECH_NORMS = ("global", "release")
# The S5 release reads the clips with torchaudio.load, which already returns int16/2^15 (its default normalize=True),
# divides them by 2^15 once more, and standardises every step with std + 1e-5 on that scale: on the -1..1 scale
# of the clips the added constant is 1e-5 * 2^15.
SPEECH_RELEASE_EPS = 1e-5 * 2 ** 15


def step_stats(inputs, scale: float, chunk: int = 256):
    """Per time step mean and sample standard deviation (n - 1 in the denominator, as torch's std) over the rows
    of integer inputs (N, L, C), on the scale of inputs / scale: arrays (L, C) in float64."""
    n = len(inputs)
    if n < 2:
        raise DataError(f"per-step statistics need at least 2 training sequences, got {n}")
    total = np.zeros(inputs.shape[1:], np.int64)  # exact integer sums (16-bit samples: no overflow below 2^33 rows)
    squares = np.zeros(inputs.shape[1:], np.int64)
    for i in range(0, n, chunk):
        x = np.asarray(inputs[i:i + chunk], np.int64)
        total += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
    mean = total / n
    var = np.maximum((squares - total * mean) / (n - 1), 0.0)
    return mean / scale, np.sqrt(var) / scale


def _step_stats(cache: Path, inputs, scale: float):
    """step_stats of a dataset's training inputs, kept in its cache folder after the first call."""
    stored = cache / "stats" / "train-step-mean-std.npy"
    if stored.exists():
        mean, std = np.load(stored)
        return mean, std
    mean, std = step_stats(inputs, scale)
    stored.parent.mkdir(exist_ok=True)
    tmp = stored.with_name(f".{stored.name}.tmp{os.getpid()}.npy")
    np.save(tmp, np.stack([mean, std]))
    os.replace(tmp, stored)
    return mean, std


# --------------------------------------------------------------------------------------------------
# Diagnostic tasks: the synthetic tasks of tasks.py, generated in memory
# --------------------------------------------------------------------------------------------------

# Every registered task's options and their defaults, read live from tasks.TASKS
DIAGNOSTIC_OPTIONS = tasks.View(lambda task: task.defaults)


def load_diagnostic(name: str, options=None) -> Dataset:
    """A task of tasks.TASKS as a Dataset (generated in memory, nothing read or written); `options` as
    parse_options takes them."""
    task = tasks.TASKS[name]
    o = parse_options(name, options)
    seq_len, in_dim, tokens, _, n_classes = diagnostic_shape(name, o)
    arrays = generate_diagnostic(name, o)
    made = {}
    for split, (x, y, w) in arrays.items():
        lengths = np.full(len(y), seq_len, np.int32)
        if tokens:
            made[split] = Split(x, lengths, y, label_weights=w)
        else:  # real-valued inputs, fed as they are
            made[split] = Split(x, lengths, y, mean=np.zeros(in_dim, np.float32), std=np.ones(in_dim, np.float32),
                                scale=1.0, label_weights=w)
    return Dataset(name, made["train"], made["val"], made["test"], n_classes, seq_len, in_dim, padded=False,
                   pair=False, source=f"generated in memory: {name} " + ",".join(f"{k}={v}" for k, v in o.items()),
                   vocab=diagnostic_vocab(name, o), generated=True, generator_seed=o["data_seed"], task=task.kind,
                   onehot_width=in_dim if tokens else None,
                   reference=task.reference(arrays) if task.reference else {})


def describe(ds: Dataset, split: str, i: int) -> str:
    """Sample i of a diagnostic's split ("train", "val", "test") as text, to check by eye (tasks.sample_text)."""
    s = getattr(ds, split)
    x, y = np.asarray(s.inputs[i]), np.asarray(s.labels[i])
    w = None if s.label_weights is None else np.asarray(s.label_weights[i])
    return f"{ds.name} {split}[{i}]\n  " + tasks.sample_text(ds.name, ds.vocab, x, y, w)


# ==================================================================================================
# The registry, the cache, and load()
# ==================================================================================================

class _Catalog(collections.ChainMap):
    """The real datasets (a dict, which edits go to), then one entry per task of tasks.TASKS (a tasks.View), in
    that order: a task registered later is listed too."""

    def __iter__(self):
        return iter(dict.fromkeys(name for part in self.maps for name in part))


# name -> (builder, default options, normalisation (mean, std) or None for tokens, seeded split rule); the tasks
# of tasks.py after the real datasets: generated in memory by load_diagnostic (no files, no cache), options from
# --data_options
DATASETS = _Catalog({
    "listops-classification": (build_listops, dict(seq_len=2048), None, None),
    "imdb-classification": (build_imdb, dict(seq_len=4096, min_freq=15), None, "val=test"),
    "aan-classification": (build_aan, dict(seq_len=4000, min_freq=1), None, None),
    "lra-cifar-classification": (build_cifar, dict(gray=True), (CIFAR_GRAY_MEAN, CIFAR_GRAY_STD), 0.1),
    "cifar-classification": (build_cifar, dict(gray=False), (CIFAR_RGB_MEAN, CIFAR_RGB_STD), 0.1),
    "pathfinder-classification": (build_pathfinder, dict(resolution=32), (0.5, 0.5), "80/10/10"),
    "pathx-classification": (build_pathfinder, dict(resolution=128), (0.5, 0.5), "80/10/10"),
    "mnist-classification": (build_mnist, dict(downsample=1), (MNIST_MEAN, MNIST_STD), 0.1),
    "pmnist-classification": (build_mnist, dict(downsample=1), (MNIST_MEAN, MNIST_STD), 0.1),
    "speech35-classification": (build_speech, dict(), "train", None),  # standardised by the training set
    "mnist": (build_mnist, dict(downsample=1), None, 0.1),  # next-pixel prediction: 256 intensity classes
}, tasks.View(lambda task: (load_diagnostic, task.defaults, None, None)))
# What a model of each dataset sees, at its default options, without reading any data (bench.py compiles the S5
# recipes at these shapes): (seq_len, in_dim, tokens, pair, n_classes). in_dim is the vocabulary size of token
# datasets; Text's and Retrieval's vocabularies are built from the data, and the values here are those of the
# published files (characters seen often enough). The tasks at their default options.
SHAPES = _Catalog({
    "listops-classification": (2048, len(LISTOPS_VOCAB), True, False, 10),
    "imdb-classification": (4096, 135, True, False, 2),
    "aan-classification": (4000, 97, True, True, 2),
    "lra-cifar-classification": (1024, 1, False, False, 10),
    "cifar-classification": (1024, 3, False, False, 10),
    "pathfinder-classification": (32 ** 2, 1, False, False, 2),
    "pathx-classification": (128 ** 2, 1, False, False, 2),
    "mnist-classification": (784, 1, False, False, 10),
    "pmnist-classification": (784, 1, False, False, 10),
    "speech35-classification": (SPEECH_LEN, 1, False, False, len(SPEECH_WORDS)),
    "mnist": (784, 256, True, False, 256),  # next-pixel prediction: the previous pixel, one of 256 values
}, tasks.View(lambda task: diagnostic_shape(task.name)))


def model_meta(name: str, options=None) -> dict:
    """The model-facing fields of a dataset (as a loaded Dataset gives them) from SHAPES: seq_len, in_dim, tokens,
    pair, n_classes, task, onehot_width. `options`: a diagnostic's --data_options (text or dict)."""
    seq_len, in_dim, tokens, pair, n_classes = (diagnostic_shape(name, options) if name in tasks.TASKS
                                                else SHAPES[name])
    return dict(seq_len=seq_len, in_dim=in_dim, tokens=tokens, pair=pair, n_classes=n_classes, task=task_of(name),
                onehot_width=max(ONEHOT_WIDTH.get(name, 0), in_dim) if tokens and name not in NEXT_STEP else None)


# Datasets whose task is next-step prediction (density modelling, generation), not classification
NEXT_STEP = {"mnist"}
# The width of the one-hot token encoding, where the S5 release hard-codes it (its IN_DIM): ListOps 20 for 18
# tokens, Text 135. The columns past the vocabulary are never hot; a larger vocabulary widens it. Elsewhere the
# width is the vocabulary size, as in the release.
ONEHOT_WIDTH = {"listops-classification": 20, "imdb-classification": 135}


def task_of(name: str) -> str:
    """"next_step" (predict every value from the ones before it), "per_position" (a class at every scored
    position, the diagnostics' label_weights), "regression" (one real number per sequence),
    "per_position_regression" (a real number at every scored position) or "classification"."""
    if name in tasks.TASKS:
        return tasks.TASKS[name].kind
    return "next_step" if name in NEXT_STEP else "classification"


def _fingerprint(root: Path, name: str) -> str:
    """Sizes and modification times of the source files/folders a dataset is read from."""
    where = {
        "listops-classification": ["lra_release/listops-1000", "listops_generated"],
        "imdb-classification": ["aclImdb/train/pos", "aclImdb/train/neg", "aclImdb/test/pos", "aclImdb/test/neg"],
        "aan-classification": ["lra_release/tsv_data"],
        "lra-cifar-classification": ["cifar-10-batches-py"], "cifar-classification": ["cifar-10-batches-py"],
        "pathfinder-classification": ["lra_release/pathfinder32/curv_contour_length_14/metadata"],
        "speech35-classification": [SPEECH_DIR],
        "pathx-classification": ["lra_release/pathfinder128/curv_contour_length_14/metadata"],
        "mnist-classification": ["MNIST/raw"], "pmnist-classification": ["MNIST/raw"], "mnist": ["MNIST/raw"],
    }[name]
    items = []
    for rel in where:
        p = root / rel
        if p.is_dir():
            items += [(str(c.relative_to(root)), c.stat().st_size, c.stat().st_mtime_ns) for c in sorted(p.iterdir())
                      if c.is_file()]
            items.append((rel, len(os.listdir(p)), p.stat().st_mtime_ns))
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:12]


def cache_dir(root: Path, name: str, options: dict) -> Path:
    key = json.dumps({"name": name, "options": options, "version": CACHE_VERSION_OF.get(name, CACHE_VERSION),
                      "source": _fingerprint(root, name)}, sort_keys=True)
    return root / "cache" / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _save_cache(path: Path, splits: dict, meta: dict):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, arrays in splits.items():
        for key, arr in arrays.items():
            np.save(tmp / f"{split}.{key}.npy", arr)
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a reader sees the whole cache or none


def _load_cache(path: Path):
    meta = json.loads((path / "meta.json").read_text())
    splits = collections.defaultdict(dict)
    for f in path.glob("*.npy"):
        split, key, _ = f.name.split(".")
        splits[split][key] = np.load(f, mmap_mode="r")
    return dict(splits), meta


MT19937_N = 624  # words of MT19937's state
TORCH_RANDPERM_32BIT_MAX = (2 ** 32 - 1) // 20  # torch's CPU randperm draws 32-bit numbers for n below this


def mt19937_key(seed: int) -> np.ndarray:
    """MT19937's state after init_genrand(seed): what torch.Generator().manual_seed(seed) sets on the CPU (torch
    keeps the seed's low 32 bits; a negative seed counts as its 64-bit two's complement, with the same low bits)."""
    key = np.empty(MT19937_N, np.uint32)
    s = int(seed) & 0xFFFFFFFF
    for j in range(MT19937_N):
        key[j] = s
        s = (1812433253 * (s ^ (s >> 30)) + j + 1) & 0xFFFFFFFF
    return key


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """torch.randperm(n, generator=torch.Generator().manual_seed(seed)) on the CPU, computed without torch.

    torch's CPU generator is MT19937 seeded by init_genrand (mt19937_key); its first draw twists the whole state,
    as numpy's MT19937 does at position 624. randperm starts from 0..n-1 and, for i = 0..n-2, swaps entry i with
    entry i + (r_i mod (n - i)), r_i the i-th 32-bit draw: a Fisher-Yates shuffle. Every torch version does this
    for n < (2^32 - 1)/20 (recent ones draw 64-bit numbers above that size, which no dataset here reaches)."""
    n = int(n)
    if not 0 <= n < TORCH_RANDPERM_32BIT_MAX:
        raise ValueError(f"torch_randperm handles 0 <= n < {TORCH_RANDPERM_32BIT_MAX:,}, got n = {n:,}")
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": mt19937_key(seed), "pos": MT19937_N}}
    steps = max(n - 1, 0)
    draws = bits.random_raw(steps).astype(np.int64)  # the generator's 32-bit outputs, in order
    offsets = (draws % (n - np.arange(steps))).tolist()
    perm = list(range(n))
    for i, z in enumerate(offsets):
        perm[i], perm[i + z] = perm[i + z], perm[i]
    return np.array(perm, np.int64)


def release_split(n: int, lengths, seed: int):
    """Row indices of consecutive parts of sizes `lengths` of n rows, as torch.utils.data.random_split draws
    them with torch.Generator().manual_seed(seed): one torch.randperm(n), cut in order."""
    if sum(lengths) != n:
        raise ValueError(f"split sizes {lengths} do not add up to {n} rows")
    return np.split(torch_randperm(n, seed), np.cumsum(lengths)[:-1])


def _take(split: dict, idx):
    return {k: np.asarray(v[np.sort(idx)]) for k, v in split.items()}


def bitreversal_permutation(n: int) -> np.ndarray:
    """psMNIST's pixel order in the S5 release: the indices 0..2^m−1 (2^m ≥ n) in bit-reversed order, keeping
    those below n. For n = 784 it starts 0, 512, 256, 768, 128."""
    m = max(1, int(np.ceil(np.log2(n))))
    idx = np.arange(2 ** m)
    rev = np.zeros_like(idx)
    for bit in range(m):
        rev |= ((idx >> bit) & 1) << (m - 1 - bit)
    return rev[rev < n]


def load(name: str, dir_name="./data", seed: int = 42, speech_norm: str = "global", **options) -> Dataset:
    """Load a dataset by its `--dataset` name from the data root `dir_name` (see the module docstring).
    `seed` draws the held-out splits (the S5 release uses 42 for every run). `speech_norm` (Speech Commands
    only): "global" standardises with one mean and std of the training audio, "release" as the S5 release does
    (each time step by its own training mean and std, see SPEECH_RELEASE_EPS).

    Options override the dataset's defaults (e.g. seq_len, min_freq); the cache is keyed by them.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    builder, defaults, norm, rule = DATASETS[name]
    if speech_norm not in SPEECH_NORMS:
        raise DataError(f"speech_norm must be one of {', '.join(SPEECH_NORMS)}, got {speech_norm!r}")
    if speech_norm != "global" and norm != "train":
        raise DataError(f"speech_norm={speech_norm!r} applies to speech35-classification only, not {name}")
    if name in tasks.TASKS:  # generated from their own seed (option data_seed), not `seed`, nothing on disk
        return load_diagnostic(name, options)
    unknown = set(options) - set(defaults) - {"generate", "workers"}
    if unknown:
        raise DataError(f"{name}: unknown option(s) {sorted(unknown)}; it takes {sorted(defaults)}")
    opts = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    extra = {k: v for k, v in options.items() if k not in defaults}
    root = Path(dir_name)
    if name == "listops-classification":  # generate before fingerprinting, so the cache key sees the files
        _listops_dir(root, extra.get("generate", True), extra.get("workers"))
    path = cache_dir(root, name, opts)
    cached = (path / "meta.json").exists()
    if cached:
        splits, meta = _load_cache(path)
    else:
        accepted = inspect.signature(builder).parameters
        splits, meta = builder(root, **opts, **{k: v for k, v in extra.items() if k in accepted})
        for split, arrays in splits.items():
            if len(arrays["labels"]) == 0:
                raise DataError(f"{name}: the {split} split is empty (source: {meta.get('source')})")
        _save_cache(path, splits, meta)
        splits, meta = _load_cache(path)

    if rule == "val=test":  # LRA Text has no validation split: as in S4/S5, validate on the test split
        splits["val"] = splits["test"]
    elif isinstance(rule, float):  # the release: train = the first ⌊n(1 − f)⌋ of one randperm, val the rest
        n = len(splits["train"]["labels"])
        n_train = int(n * (1.0 - rule))
        tr, va = release_split(n, [n_train, n - n_train], seed)
        splits["train"], splits["val"] = _take(splits["train"], tr), _take(splits["train"], va)
    elif rule == "80/10/10":  # the release: val and test ⌊n/10⌋ each, train the rest (first)
        everything = splits.pop("all")
        n = len(everything["labels"])
        tr, va, te = release_split(n, [n - 2 * int(0.1 * n), int(0.1 * n), int(0.1 * n)], seed)
        splits.update(train=_take(everything, tr), val=_take(everything, va), test=_take(everything, te))
    if name == "pmnist-classification":
        perm = bitreversal_permutation(meta["seq_len"])
        splits = {s: {**a, "inputs": np.asarray(a["inputs"])[:, perm]} for s, a in splits.items()}

    next_step = task_of(name) == "next_step"
    if next_step:  # every value is a class: pixels 0..255 as tokens; the model decides how to read them
        norm = None
        meta = dict(meta, n_classes=256, in_dim=256)
    mean = std = None
    scale = meta.get("value_scale", 255.0)  # raw values → the model's scale: pixels 255, 16-bit PCM 32768
    if norm == "train" and speech_norm == "release":  # every step by its own training statistics
        step_mean, step_std = _step_stats(path, splits["train"]["inputs"], scale)
        mean, std = step_mean.astype(np.float32), (step_std + SPEECH_RELEASE_EPS).astype(np.float32)
    elif norm == "train":  # the training set's own mean and std, computed when the cache was built
        mean, std = np.full(1, meta["train_mean"], np.float32), np.full(1, meta["train_std"], np.float32)
    elif norm is not None:
        c = meta["in_dim"]
        mean = np.broadcast_to(np.asarray(norm[0], np.float32), (c,)).copy()
        std = np.broadcast_to(np.asarray(norm[1], np.float32), (c,)).copy()
    made = {s: Split(a["inputs"], a["lengths"], a["labels"], a.get("inputs2"), a.get("lengths2"), mean, std,
                     scale, next_step) for s, a in splits.items()}
    for s in ("train", "val", "test"):
        if len(made[s]) == 0:
            raise DataError(f"{name}: the {s} split is empty after splitting (source: {meta.get('source')})")
    tokens = mean is None and not next_step
    return Dataset(name, made["train"], made["val"], made["test"], meta["n_classes"], meta["seq_len"],
                   meta["in_dim"], meta["padded"], meta["pair"], cached, meta.get("source", ""),
                   meta.get("vocab", []), meta.get("generated", False), meta.get("generator_seed"),
                   seed if rule not in (None, "val=test") else None, task_of(name),
                   max(ONEHOT_WIDTH.get(name, 0), meta["in_dim"]) if tokens else None)


# ==================================================================================================
# Command line
# ==================================================================================================


def check(args):
    t0 = time.perf_counter()
    ds = load(args.name, args.dir_name, seed=args.seed)
    t_load = time.perf_counter() - t0
    print(f"{ds.name}: {'cache' if ds.cached else 'preprocessed and cached'} in {t_load:.1f}s from {ds.source}")
    print(f"  train {len(ds.train):,}  val {len(ds.val):,}  test {len(ds.test):,}  | classes {ds.n_classes}  "
          f"seq_len {ds.seq_len}  in_dim {ds.in_dim}  padded {ds.padded}  pair {ds.pair}")
    buckets = tuple(ds.seq_len * k // 4 for k in (1, 2, 3)) if ds.padded and args.buckets else None
    batch = next(ds.train.batches(args.bsz, shuffle=True, seed=args.seed, buckets=buckets))
    print("  one batch: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in batch.items()))
    n = min(args.n_batches, ds.train.num_batches(args.bsz, True, buckets))
    it = prefetch(ds.train.batches(args.bsz, shuffle=True, seed=args.seed, drop_last=True, buckets=buckets))
    t0 = time.perf_counter()
    for _ in zip(range(n), tqdm(it, total=n, desc="data path", unit="batch")):
        pass
    dt = time.perf_counter() - t0
    print(f"  data path: {n / dt:,.1f} batches/s ({n * args.bsz / dt:,.0f} samples/s) at bsz {args.bsz}, "
          f"shuffled{', length-bucketed' if buckets else ''}, with prefetch")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="load a dataset; print its sizes, one batch's shapes, and batches/s")
    c.add_argument("name", help=f"one of: {', '.join(DATASETS)}")
    c.add_argument("--dir_name", default="./data", help="data root (default ./data)")
    c.add_argument("--bsz", type=int, default=32)
    c.add_argument("--seed", type=int, default=42)
    c.add_argument("--n_batches", type=int, default=200, help="batches timed (default 200)")
    c.add_argument("--buckets", action=argparse.BooleanOptionalAction, default=True,
                   help="length buckets for padded datasets (default on)")
    g = sub.add_parser("make-listops", help="generate ListOps in the LRA TSV format")
    g.add_argument("--out", required=True, help="output folder (basic_{train,val,test}.tsv are written there)")
    g.add_argument("--n_train", type=int, default=LISTOPS_SIZES["n_train"])
    g.add_argument("--n_val", type=int, default=LISTOPS_SIZES["n_val"])
    g.add_argument("--n_test", type=int, default=LISTOPS_SIZES["n_test"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPU count, at most 8)")
    m = sub.add_parser("split-mnist", help="an MNIST root with disjoint train/test splits made from the test "
                       "split alone (source/t10k-*-ubyte[.gz]: its last N_TEST images become the test split)")
    m.add_argument("--source", required=True, help="folder holding t10k-images-idx3-ubyte[.gz] and its labels")
    m.add_argument("--out", required=True, help="data root to write (OUT/MNIST/raw), for --dir_name")
    m.add_argument("--n_test", type=int, default=2000, help="images kept for the test split (default 2000)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            check(args)
        elif args.command == "split-mnist":
            raw = split_mnist(Path(args.source), Path(args.out), args.n_test)
            print(f"wrote {raw}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz")
        else:
            t0 = time.perf_counter()
            out = make_listops(args.out, args.n_train, args.n_val, args.n_test, args.seed, args.workers)
            print(f"wrote {out}/basic_{{train,val,test}}.tsv in {time.perf_counter() - t0:.0f}s")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
