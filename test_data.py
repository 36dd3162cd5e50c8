"""dataloaders.py and download_lra.sh on small files in the real formats, built here; plus the real MNIST
test split from ../shared/data/mnist/."""

import gzip
import http.server
import os
import pickle
import random
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataloaders as dl

HERE = Path(__file__).resolve().parent
MNIST_SUBSET = HERE / "testdata" / "mnist"  # real MNIST test images (conftest.py)


# --------------------------------------------------------------------------------------------------
# An independent ListOps evaluator (parses the Source string itself, parentheses included)
# --------------------------------------------------------------------------------------------------


def evaluate_listops(source: str) -> int:
    stack = []
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok.startswith("["):
            stack.append(tok)
        elif tok == "]":
            args = []
            while not (isinstance(stack[-1], str) and stack[-1].startswith("[")):
                args.append(stack.pop())
            op = stack.pop()
            args = sorted(args)
            if op == "[MIN":
                stack.append(args[0])
            elif op == "[MAX":
                stack.append(args[-1])
            elif op == "[MED":  # integer part of the median
                n = len(args)
                stack.append(args[n // 2] if n % 2 else int((args[n // 2 - 1] + args[n // 2]) / 2))
            elif op == "[SM":
                stack.append(sum(args) % 10)
            else:
                raise ValueError(op)
        else:
            stack.append(int(tok))
    assert len(stack) == 1
    return stack[0]


def read_rows(path):
    lines = Path(path).read_text().splitlines()
    assert lines[0] == "Source\tTarget"
    return [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def generated_listops(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "listops"
    dl.make_listops(out, n_train=300, n_val=30, n_test=30, seed=3, workers=1, progress=False)
    return out


def test_listops_generator_labels_lengths_duplicates(generated_listops):
    rows = sum((read_rows(generated_listops / f"basic_{s}.tsv") for s in ("train", "val", "test")), [])
    assert len(rows) == 360
    sources = [r[0] for r in rows]
    assert len(set(sources)) == len(sources), "duplicate expressions"
    for src, target in rows:
        assert int(target) == evaluate_listops(src)
        tokens = [t for t in src.split() if t not in ("(", ")")]
        assert 500 < len(tokens) < 2000
        assert src.startswith("( ") and src.count("(") == src.count(")")
    labels = [int(r[1]) for r in rows]
    assert len(set(labels)) >= 8, f"labels should spread over the classes, got {sorted(set(labels))}"


def test_listops_source_format():
    tree = ("[MAX", [2, 9])
    assert dl.listops_source(tree) == "( ( ( [MAX 2 ) 9 ) ] )"
    assert dl.listops_value(tree) == 9 and dl.listops_length(tree) == 4
    nested = ("[SM", [("[MED", [1, 5, 2, 8]), 7])
    assert evaluate_listops(dl.listops_source(nested)) == dl.listops_value(nested) == (3 + 7) % 10


@pytest.mark.slow
def test_listops_generator_is_deterministic(tmp_path):
    a = dl.make_listops(tmp_path / "a", 20, 2, 2, seed=5, workers=1, progress=False)
    b = dl.make_listops(tmp_path / "b", 20, 2, 2, seed=5, workers=1, progress=False)
    c = dl.make_listops(tmp_path / "c", 20, 2, 2, seed=6, workers=1, progress=False)
    assert (a / "basic_train.tsv").read_text() == (b / "basic_train.tsv").read_text()
    assert (a / "basic_train.tsv").read_text() != (c / "basic_train.tsv").read_text()


def write_listops_release(root: Path, rows_by_split):
    d = root / "lra_release" / "listops-1000"
    d.mkdir(parents=True)
    for split, rows in rows_by_split.items():
        (d / f"basic_{split}.tsv").write_text("Source\tTarget\n" + "".join(f"{s}\t{t}\n" for s, t in rows))
    return d


def test_listops_official_format_and_generated_read_the_same(tmp_path, generated_listops):
    root = tmp_path / "official"
    official = write_listops_release(root, {s: read_rows(generated_listops / f"basic_{s}.tsv")
                                            for s in ("train", "val", "test")})
    a = dl.load("listops-classification", root)
    assert "LRA release" in a.source
    root2 = tmp_path / "generated"
    shutil.copytree(generated_listops, root2 / "listops_generated")
    b = dl.load("listops-classification", root2)
    assert "GENERATED" in b.source
    assert a.provenance()["generated"] is False and a.provenance()["generator_seed"] is None
    assert b.provenance()["generated"] is True and b.provenance()["generator_seed"] == 3  # the fixture's seed
    assert a.provenance()["vocab_size"] == 18 and a.provenance()["sizes"] == {"train": 300, "val": 30, "test": 30}
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, s).inputs, getattr(b, s).inputs)
        np.testing.assert_array_equal(getattr(a, s).labels, getattr(b, s).labels)
    # tokens: parentheses dropped, end token appended, padded with 0 to 2048, smallest integer type
    assert a.train.inputs.shape == (300, 2048) and a.train.inputs.dtype == np.uint8
    assert a.in_dim == len(dl.LISTOPS_VOCAB) == 18 and a.padded and not a.pair and a.n_classes == 10
    first = read_rows(official / "basic_train.tsv")[0][0]
    tokens = [dl.LISTOPS_VOCAB[i] for i in a.train.inputs[0, :a.train.lengths[0]]]
    assert tokens == [t for t in first.split() if t not in "()"] + ["<eos>"]
    assert np.all(a.train.inputs[0, a.train.lengths[0]:] == 0)


def test_listops_generated_when_missing_and_release_wins(tmp_path, monkeypatch, capsys):
    assert list(dl.LISTOPS_SIZES.values()) == [96000, 2000, 2000]  # the official sizes, made smaller here:
    monkeypatch.setattr(dl, "LISTOPS_SIZES", dict(zip(dl.LISTOPS_SIZES, (12, 3, 3))))
    ds = dl.load("listops-classification", tmp_path, workers=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 3, 3)
    assert "GENERATED" in capsys.readouterr().err
    assert (tmp_path / "listops_generated" / "basic_train.tsv").exists()
    assert not (tmp_path / "lra_release").exists(), "never write where the downloaded release goes"
    write_listops_release(tmp_path, {"train": [("( ( [MAX 2 ) 9 ] )", "9")] * 4, "val": [("( ( [MIN 3 ) 1 ] )", "1")],
                                     "test": [("( ( [SM 5 ) 7 ] )", "2")]})
    ds = dl.load("listops-classification", tmp_path)
    assert len(ds.train) == 4 and "LRA release" in ds.source


def test_listops_bad_rows(tmp_path):
    write_listops_release(tmp_path, {"train": [("( ( [MAX 2 ) 9 ] )", "9"), ("( ( [MAX 2 ) 9 ] )", "12")],
                                     "val": [("( ( [MIN 3 ) 1 ] )", "1")], "test": [("( ( [SM 5 ) 7 ] )", "2")]})
    with pytest.raises(dl.DataError, match=r"basic_train.tsv:3: label '12' is out of range"):
        dl.load("listops-classification", tmp_path)
    (tmp_path / "lra_release/listops-1000/basic_train.tsv").write_text("Source\tTarget\n( ( [MAX 2 ) 9 ] )\n")
    with pytest.raises(dl.DataError, match=r"basic_train.tsv:2: malformed row"):
        dl.load("listops-classification", tmp_path)


# --------------------------------------------------------------------------------------------------
# IMDB and AAN
# --------------------------------------------------------------------------------------------------


def random_text(rng, n):
    return "".join(rng.choice("abcdefgh ij.,<br />") for _ in range(n))


def make_imdb(root: Path, n=6, seed=0):
    rng = random.Random(seed)
    for split in ("train", "test"):
        for sub in ("pos", "neg"):
            d = root / "aclImdb" / split / sub
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}_{rng.randint(1, 10)}.txt").write_text(("é" if i == 0 else "") +
                                                                 random_text(rng, rng.randint(50, 300)))


def test_imdb(tmp_path):
    make_imdb(tmp_path)
    ds = dl.load("imdb-classification", tmp_path, seq_len=128, min_freq=3)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 12, 12)
    np.testing.assert_array_equal(ds.val.labels, ds.test.labels)  # no validation split in LRA Text
    assert sorted(np.bincount(ds.train.labels)) == [6, 6]
    assert ds.train.inputs.shape == (12, 128) and ds.train.inputs.dtype == np.uint8
    assert ds.vocab[:3] == ["<pad>", "<unk>", "<eos>"]
    assert "é" not in ds.vocab  # seen twice in train (one file per class), under min_freq=3: it maps to <unk>
    assert "é" in dl.load("imdb-classification", tmp_path, seq_len=128, min_freq=2).vocab
    texts = sorted((tmp_path / "aclImdb/train/neg").glob("*.txt"))
    text = texts[0].read_text()
    row = ds.train.inputs[0, :ds.train.lengths[0]]
    expected = [ds.vocab.index(c) if c in ds.vocab else dl.UNK for c in text[:127]] + [dl.EOS]
    assert row.tolist() == expected
    assert np.all(ds.train.lengths <= 128) and ds.train.lengths.max() == 128  # truncated, end token kept


def test_text_vocabularies_count_only_what_the_model_sees(tmp_path):
    """As in the release: characters are counted over the truncated text (seq_len − 1 characters + the end
    token); Retrieval keeps every character seen (no minimum frequency)."""
    make_imdb(tmp_path)
    for i, f in enumerate(sorted((tmp_path / "aclImdb/train/pos").glob("*.txt"))):
        f.write_text("a" * 200 + "Z" * 5 + ("Q" if i == 0 else ""))  # Z only after position 127
    vocab = dl.load("imdb-classification", tmp_path, seq_len=128, min_freq=3).vocab
    assert "Z" not in vocab and "a" in vocab
    assert "Z" in dl.load("imdb-classification", tmp_path, seq_len=256, min_freq=3).vocab
    write_aan(tmp_path)
    rows = [line.split("\t") for line in (tmp_path / "lra_release/tsv_data/new_aan_pairs.train.tsv").read_text()
            .splitlines()]
    seen = set("".join(r[3][:63] + r[4][:63] for r in rows))
    assert set(dl.load("aan-classification", tmp_path, seq_len=64).vocab[3:]) == seen


def test_onehot_widths_are_the_releases(tmp_path, generated_listops):
    """The one-hot encoder's width: the release's hard-coded 20 (ListOps, 18 tokens) and 135 (Text), wider only for
    a Text vocabulary past 135; the vocabulary size for Retrieval; none for pixels."""
    shutil.copytree(generated_listops, tmp_path / "listops_generated")
    listops = dl.load("listops-classification", tmp_path)
    assert (listops.in_dim, listops.onehot_width) == (18, 20)
    make_imdb(tmp_path)
    imdb = dl.load("imdb-classification", tmp_path, seq_len=128, min_freq=3)
    assert imdb.in_dim < 135 and imdb.onehot_width == 135
    for f in (tmp_path / "aclImdb/train/pos").glob("*.txt"):
        f.write_text("".join(chr(0x4E00 + k) for k in range(150)))  # 150 more characters, each in 6 files
    wide = dl.load("imdb-classification", tmp_path, seq_len=256, min_freq=3)
    assert wide.in_dim == 3 + len(set(imdb.vocab[3:]) | {chr(0x4E00 + k) for k in range(150)}) > 135
    assert wide.onehot_width == wide.in_dim
    write_aan(tmp_path)
    aan = dl.load("aan-classification", tmp_path, seq_len=64)
    assert aan.onehot_width == aan.in_dim == len(aan.vocab)
    make_mnist(tmp_path)
    assert dl.load("mnist-classification", tmp_path).onehot_width is None
    assert dl.load("mnist", tmp_path).onehot_width is None  # next-pixel tokens: the model takes 256


def write_aan(root: Path, n=8, bad_line=None, bad_label=False):
    d = root / "lra_release" / "tsv_data"
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for name in ("train", "eval", "test"):
        lines = []
        for i in range(n):
            label = "1" if i % 2 else "0"
            if bad_label and name == "train" and i == 3:
                label = "2"
            lines.append(f"{label}\tid{i}a\tid{i}b\t{random_text(rng, 80)}\t{random_text(rng, 60)}")
        if bad_line and name == "train":
            lines.insert(bad_line - 1, "1\tonly\tthree")
        (d / f"new_aan_pairs.{name}.tsv").write_text("\n".join(lines) + "\n")


def test_aan_pairs(tmp_path):
    write_aan(tmp_path)
    ds = dl.load("aan-classification", tmp_path, seq_len=64, min_freq=1)
    assert ds.pair and ds.train.inputs2.shape == (8, 64) and ds.train.lengths2.shape == (8,)
    assert list(np.bincount(ds.train.labels)) == [4, 4]
    batch = next(ds.train.batches(4))
    assert set(batch) == {"inputs", "lengths", "labels", "weights", "inputs2", "lengths2"}


def test_aan_malformed_row_and_label(tmp_path):
    write_aan(tmp_path, bad_line=4)
    with pytest.raises(dl.DataError, match=r"new_aan_pairs.train.tsv:4: malformed row"):
        dl.load("aan-classification", tmp_path)
    shutil.rmtree(tmp_path / "lra_release")
    write_aan(tmp_path, bad_label=True)
    with pytest.raises(dl.DataError, match=r"new_aan_pairs.train.tsv:4: label '2' is out of range"):
        dl.load("aan-classification", tmp_path, min_freq=1)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def make_cifar(root: Path, n=20, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in rng.integers(0, 10, n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_cifar_gray_and_color(tmp_path):
    d = make_cifar(tmp_path)
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    img = raw[b"data"][0].reshape(3, 32, 32).astype(np.float64)  # channel-major, as the CIFAR files are
    color = dl.load("cifar-classification", tmp_path)
    np.testing.assert_array_equal(color.test.inputs[0], img.reshape(3, 1024).T)
    gray = dl.load("lra-cifar-classification", tmp_path)
    for i in range(len(gray.test)):  # torchvision's Grayscale (the release's) is Pillow's convert("L")
        rgb = raw[b"data"][i].reshape(3, 32, 32).transpose(1, 2, 0)
        np.testing.assert_array_equal(gray.test.inputs[i, :, 0],
                                      np.asarray(Image.fromarray(rgb, "RGB").convert("L")).reshape(-1))
    np.testing.assert_allclose(gray.test.inputs[0, :, 0], (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).ravel(),
                               atol=0.51)  # ITU-R 601 luma, rounded
    assert gray.test.inputs.dtype == np.uint8 and gray.in_dim == 1 and color.in_dim == 3
    assert (len(gray.train), len(gray.val), len(gray.test)) == (90, 10, 20)  # 10% of train held out
    b = next(gray.test.batches(4))
    expected = (gray.test.inputs[:4].astype(np.float32) / 255 - 122.6 / 255) / (61.0 / 255)
    np.testing.assert_allclose(b["inputs"], expected, rtol=1e-6)
    assert b["inputs"].dtype == np.float32 and b["inputs"].shape == (4, 1024, 1)


def test_cifar_bad_batch(tmp_path):
    d = make_cifar(tmp_path)
    with open(d / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 11]}, f)
    with pytest.raises(dl.DataError, match="data_batch_3: label out of range"):
        dl.load("cifar-classification", tmp_path)


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_mnist(root: Path, n_train=50, n_test=20):
    d = root / "MNIST" / "raw"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return d


def test_mnist_and_permuted(tmp_path):
    make_mnist(tmp_path)
    ds = dl.load("mnist-classification", tmp_path)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45, 5, 20) and ds.seq_len == 784
    assert ds.train.inputs.shape == (45, 784, 1)
    b = next(ds.test.batches(3))  # the release's MNIST: pixels on the 0-1 scale, no mean/std normalisation
    np.testing.assert_allclose(b["inputs"], ds.test.inputs[:3] / 255.0, rtol=0, atol=1e-7)
    p1 = dl.load("pmnist-classification", tmp_path, seed=1)
    p2 = dl.load("pmnist-classification", tmp_path, seed=2)
    # one fixed permutation of the 784 pixels for every image and every seed: the release's bit reversal
    np.testing.assert_array_equal(p1.test.inputs, p2.test.inputs)
    perm = [int(np.flatnonzero(np.all(ds.test.inputs[:, :, 0] == p1.test.inputs[:, j:j + 1, 0], axis=0))[0])
            for j in range(5)]
    assert perm == [0, 512, 256, 768, 128]


def test_bitreversal_permutation():
    """Against the bit-reversed binary strings of 0..1023 (10 bits), keeping those below 784."""
    ref = [r for r in (int(format(i, "010b")[::-1], 2) for i in range(1024)) if r < 784]
    np.testing.assert_array_equal(dl.bitreversal_permutation(784), ref)
    np.testing.assert_array_equal(dl.bitreversal_permutation(8), [0, 4, 2, 6, 1, 5, 3, 7])


def test_mnist_bad_idx(tmp_path):
    d = make_mnist(tmp_path)
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + np.array([30], ">u4").tobytes() + bytes(3))
    with pytest.raises(dl.DataError, match="IDX header says"):
        dl.load("mnist-classification", tmp_path)


def test_real_mnist_test_split(tmp_path):
    """Real MNIST test images (the committed subset, testdata/mnist) through the MNIST path, as both the train and
    the test files: the loader's arrays equal the files' bytes read here without it."""
    d = tmp_path / "MNIST" / "raw"
    d.mkdir(parents=True)
    raw = {}
    for kind in ("images-idx3", "labels-idx1"):
        src = MNIST_SUBSET / f"t10k-{kind}-ubyte.gz"
        raw[kind] = gzip.decompress(src.read_bytes())
        os.symlink(src, d / f"t10k-{kind}-ubyte.gz")
        os.symlink(src, d / f"train-{kind}-ubyte.gz")
    n = int.from_bytes(raw["labels-idx1"][4:8], "big")
    labels = np.frombuffer(raw["labels-idx1"], np.uint8, offset=8)
    images = np.frombuffer(raw["images-idx3"], np.uint8, offset=16).reshape(n, 784)
    assert raw["images-idx3"][:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw["images-idx3"][4:8], "big") == n
    ds = dl.load("mnist-classification", tmp_path, seed=42)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (n - n // 10, n // 10, n)
    np.testing.assert_array_equal(ds.test.labels, labels)
    np.testing.assert_array_equal(np.asarray(ds.test.inputs).reshape(n, 784), images)
    assert (np.bincount(labels, minlength=10) > n // 20).all()  # every digit, none rare
    x = np.asarray(ds.test.inputs, np.float64) / 255
    assert 0.11 < x.mean() < 0.14  # MNIST's mean pixel intensity is 0.1325 (0.121 in the first 3,000 test images)
    assert x[0].reshape(28, 28)[:4].max() == 0  # the top rows of a digit are background


def make_pathfinder(root: Path, resolution=32, n_per_file=10, n_files=3, empty=(("0", 2),)):
    base = root / "lra_release" / ("pathfinder32" if resolution == 32 else "pathfinder128") / "curv_contour_length_14"
    (base / "metadata").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(n_files):
        (base / "imgs" / str(k)).mkdir(parents=True)
        lines = []
        for i in range(n_per_file):
            label = i % 2
            path = base / "imgs" / str(k) / f"sample_{i}.png"
            if (str(k), i) in empty:
                path.write_bytes(b"")
            else:
                Image.fromarray(rng.integers(0, 256, (resolution, resolution), dtype=np.uint8)).save(path)
            lines.append(f"imgs/{k} sample_{i}.png 0 {label} 1.2 3")
        (base / "metadata" / f"{k}.npy").write_text("\n".join(lines) + "\n")
    return base


def test_pathfinder_split_and_empty_image(tmp_path, capsys):
    base = make_pathfinder(tmp_path)
    ds = dl.load("pathfinder-classification", tmp_path, workers=1)
    assert "skipped 1 unreadable" in capsys.readouterr().err
    assert len(ds.train) + len(ds.val) + len(ds.test) == 29
    assert (len(ds.val), len(ds.test)) == (2, 2)  # the release: ⌊n/10⌋ each
    assert ds.train.inputs.shape[1:] == (1024, 1)
    img = np.asarray(Image.open(base / "imgs/1/sample_3.png"))
    all_inputs = np.concatenate([ds.train.inputs, ds.val.inputs, ds.test.inputs])[:, :, 0]
    all_labels = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
    (hit,) = np.flatnonzero(np.all(all_inputs == img.reshape(-1), axis=1))
    assert all_labels[hit] == 1
    b = next(ds.test.batches(2))
    np.testing.assert_allclose(b["inputs"], (ds.test.inputs[:2] / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)  # float32
    other = dl.load("pathfinder-classification", tmp_path, seed=7)
    assert not np.array_equal(other.test.inputs, ds.test.inputs)  # the split is seeded


# torch.randperm(n, generator=torch.Generator().manual_seed(42)) on the CPU, recorded with torch 2.14.1 by
#   python -c "import torch, hashlib; p = torch.randperm(N, generator=torch.Generator().manual_seed(42)).numpy()
#   .astype('int64'); print(hashlib.sha256(p.tobytes()).hexdigest(), p.tolist() if N <= 50 else p[:5].tolist())"
# for each N below: the sizes the loaders split (CIFAR's 50,000 and MNIST's 60,000 training images; Pathfinder
# and Path-X split every image their metadata lists, whatever the count: 200,000 and 199,999 recorded) and the
# test trees' (30, 50).
TORCH_RANDPERM_SEED42 = {
    10: ("fd6484606b698821d3cb41481c8658938c5df28b4df65a624686fb697f37c1ad", [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]),
    30: ("eec061d01c8ece3e441ad729a829e6a2349c18309e4898b07a1ca336d0864aa8",
         [12, 0, 6, 25, 8, 15, 10, 18, 16, 23, 28, 26, 20, 7, 21, 22, 29, 13, 14, 2, 4, 1, 9, 11, 17, 19, 27, 5, 24,
          3]),
    50: ("a8eb53b2ff703fa52df9181c328988e5172f3efe1d6f74c16af2593875180ef8",
         [42, 17, 30, 34, 20, 25, 0, 8, 36, 18, 28, 39, 3, 2, 41, 1, 37, 6, 14, 12, 11, 32, 43, 16, 5, 38, 31, 44, 26,
          45, 15, 47, 4, 10, 21, 19, 33, 27, 13, 48, 46, 23, 22, 35, 7, 24, 49, 29, 40, 9]),
    50000: ("55ecb6cd4e1eb48274001018b26a797b833f72ae79a02b388e4874497445b43d", [37542, 44491, 216, 43688, 41558]),
    60000: ("7cd1a1e010482b25004c00bf2e3caae398061dfa812ba311e56e8b6b9b4cdc7a", [37542, 43087, 2992, 25810, 39634]),
    199999: ("d46f4cc18070f72c8bc08134adfe133c09588443343ef119ade77dd360610502",
             [45585, 160278, 148126, 62173, 168625]),
    200000: ("ee4e53fa9a9cb4316c55a0d184c7aa8fd2f92e97453e62e49195c42034a31789",
             [37542, 143173, 127710, 58234, 152906]),
}


@pytest.mark.parametrize("n", sorted(TORCH_RANDPERM_SEED42))
def test_torch_randperm_equals_torch(n):
    import hashlib

    digest, head = TORCH_RANDPERM_SEED42[n]
    perm = dl.torch_randperm(n, 42)
    assert perm.dtype == np.int64 and perm[:len(head)].tolist() == head
    assert hashlib.sha256(perm.tobytes()).hexdigest() == digest
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))


def test_torch_generator_seeding_is_init_genrand():
    """torch's manual_seed(s) sets MT19937's init_genrand(s & 0xffffffff) state, the state numpy's legacy
    RandomState(s) seeding sets for a 32-bit s."""
    for seed in (0, 42, 2 ** 32 - 1):
        np.testing.assert_array_equal(dl.mt19937_key(seed), np.random.RandomState(seed).get_state()[1])
    np.testing.assert_array_equal(dl.mt19937_key(2 ** 32 + 42), dl.mt19937_key(42))  # the low 32 bits
    assert dl.torch_randperm(0, 42).tolist() == [] and dl.torch_randperm(1, 42).tolist() == [0]
    with pytest.raises(ValueError, match="torch_randperm handles"):
        dl.torch_randperm(dl.TORCH_RANDPERM_32BIT_MAX, 42)


def test_splits_are_the_release_random_split(tmp_path):
    """Held-out splits are torch's random_split with the release's generator seed 42: the consecutive parts of
    torch.randperm(n) (recorded above), of the rows in source order."""
    make_pathfinder(tmp_path, empty=())
    ds = dl.load("pathfinder-classification", tmp_path, workers=1)
    perm = np.array(TORCH_RANDPERM_SEED42[30][1])
    parts = (perm[:24], perm[24:27], perm[27:])  # random_split(range(30), [24, 3, 3])
    order = {}
    for k in range(3):  # the source order: metadata files by number, rows in file order
        for i in range(10):
            img = np.asarray(Image.open(tmp_path / "lra_release/pathfinder32/curv_contour_length_14" /
                                        f"imgs/{k}/sample_{i}.png")).reshape(-1)
            order[10 * k + i] = img
    for split, idx in zip((ds.train, ds.val, ds.test), parts):
        expected = np.stack([order[i] for i in sorted(idx)])
        np.testing.assert_array_equal(split.inputs[:, :, 0], expected)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 30
    make_mnist(tmp_path)  # MNIST/CIFAR: train = the first ⌊0.9 n⌋ of the randperm, val the rest
    mn = dl.load("mnist-classification", tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28)).reshape(50, 784)  # make_mnist's train file
    perm = np.array(TORCH_RANDPERM_SEED42[50][1])
    np.testing.assert_array_equal(mn.train.inputs[:, :, 0], images[np.sort(perm[:45])])
    np.testing.assert_array_equal(mn.val.inputs[:, :, 0], images[np.sort(perm[45:])])


def test_pathx_reads_128(tmp_path):
    make_pathfinder(tmp_path, resolution=128, n_per_file=10, n_files=1, empty=())
    ds = dl.load("pathx-classification", tmp_path, workers=1)
    assert ds.seq_len == 16384 and ds.train.inputs.shape[1:] == (16384, 1)


# --------------------------------------------------------------------------------------------------
# Cache, determinism, batches, buckets
# --------------------------------------------------------------------------------------------------


def test_cache_reused_without_preprocessing(tmp_path, monkeypatch):
    make_imdb(tmp_path)
    first = dl.load("imdb-classification", tmp_path, seq_len=64, min_freq=2)
    assert not first.cached

    def fail(*a, **k):
        raise AssertionError("preprocessing ran again")

    monkeypatch.setitem(dl.DATASETS, "imdb-classification", (fail,) + dl.DATASETS["imdb-classification"][1:])
    second = dl.load("imdb-classification", tmp_path, seq_len=64, min_freq=2)
    assert second.cached
    np.testing.assert_array_equal(first.train.inputs, second.train.inputs)
    with pytest.raises(AssertionError, match="preprocessing ran again"):  # another option: another cache
        dl.load("imdb-classification", tmp_path, seq_len=32, min_freq=2)


def test_shuffle_is_deterministic_and_covers_every_row(tmp_path):
    make_cifar(tmp_path)
    ds = dl.load("lra-cifar-classification", tmp_path)
    order = lambda seed, epoch: np.concatenate(  # noqa: E731
        [b["labels"][b["weights"] > 0] for b in ds.train.batches(7, shuffle=True, seed=seed, epoch=epoch)])
    assert np.array_equal(order(1, 0), order(1, 0))
    assert not np.array_equal(order(1, 0), order(1, 1))
    assert sorted(order(1, 0)) == sorted(ds.train.labels)  # every row once; last partial batch kept
    batches = list(ds.train.batches(7))
    assert all(b["inputs"].shape[0] == 7 for b in batches)  # one shape: the partial batch is padded
    assert batches[-1]["weights"].sum() == len(ds.train) % 7
    assert len(list(ds.train.batches(7, drop_last=True))) == len(ds.train) // 7
    skipped = list(ds.train.batches(7, shuffle=True, seed=1, start=3))
    np.testing.assert_array_equal(skipped[0]["labels"], list(ds.train.batches(7, shuffle=True, seed=1))[3]["labels"])


def test_length_buckets(tmp_path, generated_listops):
    shutil.copytree(generated_listops, tmp_path / "listops_generated")
    ds = dl.load("listops-classification", tmp_path)
    buckets = (512, 1024, 1536)
    widths = set()
    seen = 0
    for b in ds.train.batches(16, shuffle=True, seed=0, buckets=buckets):
        width = b["inputs"].shape[1]
        widths.add(width)
        real = b["weights"] > 0
        seen += real.sum()
        assert b["lengths"][real].max() <= width
        smaller = [w for w in (*buckets, 2048) if w < width]
        assert not smaller or b["lengths"][real].max() > max(smaller)  # the smallest bucket that holds it
    assert widths <= {512, 1024, 1536, 2048} and len(widths) > 1 and seen == len(ds.train)


def test_prefetch_passes_items_and_errors():
    assert list(dl.prefetch(iter(range(10)), size=2)) == list(range(10))

    def broken():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(dl.prefetch(broken()))


# --------------------------------------------------------------------------------------------------
# Errors and the command line
# --------------------------------------------------------------------------------------------------


def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "dataloaders.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_missing_files_message_and_exit_code(tmp_path):
    with pytest.raises(dl.DataError, match=r"looked for .*aclImdb.*\n.*download_lra.sh --dir .* --only imdb"):
        dl.load("imdb-classification", tmp_path)
    r = run_cli("check", "imdb-classification", "--dir_name", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "aclImdb" in r.stderr and "download_lra.sh" in r.stderr
    r = run_cli("check", "no-such-dataset", "--dir_name", str(tmp_path))
    assert r.returncode == 2 and "unknown dataset" in r.stderr and "Traceback" not in r.stderr


def test_empty_split_is_an_error(tmp_path):
    make_imdb(tmp_path)
    for f in (tmp_path / "aclImdb/test/pos").glob("*.txt"):
        f.unlink()
    for f in (tmp_path / "aclImdb/test/neg").glob("*.txt"):
        f.unlink()
    with pytest.raises(dl.DataError, match="test split is empty"):
        dl.load("imdb-classification", tmp_path, min_freq=1)


def test_check_command(tmp_path):
    make_cifar(tmp_path)
    r = run_cli("check", "lra-cifar-classification", "--dir_name", str(tmp_path), "--bsz", "8")
    assert r.returncode == 0, r.stderr
    assert "train 90" in r.stdout and "inputs (8, 1024, 1) float32" in r.stdout and "batches/s" in r.stdout


def test_make_listops_command(tmp_path):
    r = run_cli("make-listops", "--out", str(tmp_path / "lo"), "--n_train", "5", "--n_val", "1", "--n_test", "1",
                "--workers", "2")
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / "lo" / "basic_train.tsv")
    assert len(rows) == 5 and all(int(t) == evaluate_listops(s) for s, t in rows)


# --------------------------------------------------------------------------------------------------
# download_lra.sh against a file server on loopback
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def file_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, fmt, *args):
            requests.append(self.command + " " + self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def run_download(data, env_extra, *args):
    env = {**os.environ, **env_extra}
    return subprocess.run(["bash", str(HERE / "download_lra.sh"), "--dir", str(data), *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_download_script_fetches_verifies_extracts_and_skips(tmp_path, file_server):
    served, url, requests = file_server
    src = tmp_path / "src"
    make_imdb(src, n=2)
    with tarfile.open(served / "aclImdb_v1.tar.gz", "w:gz") as tar:
        tar.add(src / "aclImdb", arcname="aclImdb")
    data = tmp_path / "data"
    env = {"IMDB_URL": f"{url}/aclImdb_v1.tar.gz"}
    r = run_download(data, env, "--only", "imdb")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and (data / "aclImdb/train/pos").is_dir()
    assert not (data / "aclImdb_v1.tar.gz").exists()  # archive removed after extraction
    n_requests = len(requests)
    r = run_download(data, env, "--only", "imdb")
    assert r.returncode == 0 and "already present" in r.stdout and len(requests) == n_requests  # idempotent
    assert len(dl.load("imdb-classification", data, min_freq=1).train) == 4
    # a wrong checksum is refused before extraction
    r = run_download(tmp_path / "data2", {**env, "IMDB_MD5": "0" * 32}, "--only", "imdb")
    assert r.returncode != 0 and "md5" in r.stderr and not (tmp_path / "data2/aclImdb").exists()


def test_download_script_arguments(tmp_path):
    r = run_download(tmp_path, {}, "--help")
    assert r.returncode == 0 and "--only" in r.stdout and "resume" in r.stdout
    r = run_download(tmp_path, {}, "--only", "imdb,bogus")
    assert r.returncode == 2 and "unknown part 'bogus'" in r.stderr
    r = run_download(tmp_path, {}, "--frobnicate")
    assert r.returncode == 2 and "unknown argument" in r.stderr


# --------------------------------------------------------------------------------------------------
# Speech Commands
# --------------------------------------------------------------------------------------------------


def write_wav(path, samples, rate=16000, width=2):
    import wave

    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, "<i2").tobytes())


def make_speech(root: Path):
    """yes/no/zero clips (a test and a training clip shorter than 1 s), a validation and a testing list,
    background noise."""
    base = root / "speech_commands_v0.02"
    rng = np.random.default_rng(0)
    clips = {}
    for word in ("yes", "no", "zero"):
        for i in range(3):
            n = {("no", 1): 8000, ("yes", 2): 12000}.get((word, i), 16000)
            clips[f"{word}/c{i}_nohash_0.wav"] = rng.integers(-3000, 3000, n)
    for rel, x in clips.items():
        write_wav(base / rel, x)
    write_wav(base / "_background_noise_" / "noise.wav", rng.integers(-100, 100, 16000))
    (base / "validation_list.txt").write_text("yes/c1_nohash_0.wav\n")
    (base / "testing_list.txt").write_text("no/c1_nohash_0.wav\nzero/c2_nohash_0.wav\n")
    return base, clips


def test_speech_commands_splits_padding_and_standardisation(tmp_path):
    base, clips = make_speech(tmp_path)
    ds = dl.load("speech35-classification", tmp_path, workers=1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 1, 2) and ds.n_classes == 35 and ds.seq_len == 16000
    words = list(dl.SPEECH_WORDS)
    assert sorted(ds.test.labels.tolist()) == sorted([words.index("no"), words.index("zero")])
    assert ds.val.labels.tolist() == [words.index("yes")]
    short = ds.test.inputs[ds.test.labels.tolist().index(words.index("no")), :, 0]
    np.testing.assert_array_equal(short[:8000], clips["no/c1_nohash_0.wav"])  # the clip, then zeros to 1 s
    assert not np.any(short[8000:])
    train = np.concatenate([np.pad(np.asarray(x, np.float64), (0, 16000 - len(x))) for rel, x in clips.items()
                            if rel not in ("yes/c1_nohash_0.wav", "no/c1_nohash_0.wav", "zero/c2_nohash_0.wav")])
    mean, std = (train / 32768).mean(), (train / 32768).std()
    b = next(ds.test.batches(2))
    np.testing.assert_allclose(b["inputs"], (ds.test.inputs / 32768 - mean) / std, rtol=1e-4, atol=1e-5)


def test_speech_release_standardises_every_step_by_the_training_clips(tmp_path):
    """speech_norm="release": each of the 16,000 steps standardised by the training clips' own mean and sample std
    at that step (padding included), applied to every split; the std carries the release's + 1e-5 on its scale
    2^15 below the -1..1 one."""
    base, clips = make_speech(tmp_path)
    ds = dl.load("speech35-classification", tmp_path, workers=1, speech_norm="release")
    held_out = ("yes/c1_nohash_0.wav", "no/c1_nohash_0.wav", "zero/c2_nohash_0.wav")
    train = np.stack([np.pad(np.asarray(x, np.float64), (0, 16000 - len(x))) / 32768 for rel, x in clips.items()
                      if rel not in held_out])  # (6, 16000), one clip padded with zeros past 12,000 samples
    mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
    eps = 1e-5 * 32768  # the release: (x/2^15 - m)/(s + 1e-5) with x, m, s on the -1..1 scale
    features = next(ds.train.batches(len(ds.train)))["inputs"][:, :, 0].astype(np.float64)
    np.testing.assert_allclose(features.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(features.std(axis=0, ddof=1), std / (std + eps), rtol=1e-4)
    assert np.ptp(mean) > 0.01 and np.ptp(std) > 0.01  # the steps differ: one mean and std could not pass this
    for split in (ds.val, ds.test):
        b = next(split.batches(len(split)))
        np.testing.assert_allclose(b["inputs"][:, :, 0], (split.inputs[:, :, 0] / 32768 - mean) / (std + eps),
                                   rtol=1e-4, atol=1e-5)
    again = dl.load("speech35-classification", tmp_path, speech_norm="release")  # statistics kept in the cache
    assert again.cached and np.array_equal(again.test.mean, ds.test.mean)
    with pytest.raises(dl.DataError, match="speech_norm must be one of global, release"):
        dl.load("speech35-classification", tmp_path, speech_norm="per-step")
    make_mnist(tmp_path)
    with pytest.raises(dl.DataError, match="applies to speech35-classification only"):
        dl.load("mnist-classification", tmp_path, speech_norm="release")


def test_speech_commands_bad_files_and_missing_data(tmp_path, capsys):
    base, _ = make_speech(tmp_path)
    (base / "yes" / "broken.wav").write_bytes(b"RIFF\x00\x00not a wav")
    with pytest.raises(dl.DataError, match=r"yes/broken.wav: not a readable WAV file"):
        dl.load("speech35-classification", tmp_path, workers=1)
    (base / "yes" / "broken.wav").unlink()
    write_wav(base / "yes" / "slow.wav", np.zeros(8000), rate=8000)
    with pytest.raises(dl.DataError, match=r"yes/slow.wav: 8000 Hz"):
        dl.load("speech35-classification", tmp_path, workers=1)
    with pytest.raises(dl.DataError, match=r"(?s)looked for \S*elsewhere/speech_commands_v0.02\n.*--only speech"):
        dl.load("speech35-classification", tmp_path / "elsewhere")
    assert dl.main(["check", "speech35-classification", "--dir_name", str(tmp_path / "elsewhere")]) == 2


def test_download_script_speech(tmp_path, file_server):
    """The Speech Commands archive has no top folder: it is extracted into DIR/speech_commands_v0.02."""
    served, url, _ = file_server
    base, _ = make_speech(tmp_path / "src")
    with tarfile.open(served / "speech_commands_v0.02.tar.gz", "w:gz") as tar:
        for p in sorted(base.iterdir()):
            tar.add(p, arcname=p.name)
    data = tmp_path / "data"
    r = run_download(data, {"SPEECH_URL": f"{url}/speech_commands_v0.02.tar.gz"}, "--only", "speech")
    assert r.returncode == 0, r.stderr
    assert (data / "speech_commands_v0.02" / "testing_list.txt").exists()
    assert len(dl.load("speech35-classification", data, workers=1).test) == 2


def test_model_meta_without_data_matches_the_loaded_datasets(tmp_path, generated_listops):
    """dl.model_meta (what bench.py compiles the S5 recipes at) against datasets loaded from files in the
    real formats; Text's and Retrieval's vocabularies depend on the data, so only their other fields are compared."""
    make_cifar(tmp_path)
    make_mnist(tmp_path)
    make_pathfinder(tmp_path)
    make_pathfinder(tmp_path, resolution=128, n_per_file=5, n_files=2, empty=())
    make_speech(tmp_path)
    make_imdb(tmp_path)
    loaded = {name: dl.load(name, tmp_path) for name in (
        "lra-cifar-classification", "cifar-classification", "mnist-classification", "pmnist-classification",
        "pathfinder-classification", "pathx-classification", "speech35-classification", "imdb-classification",
        "mnist")}
    listops = tmp_path / "gen"
    shutil.copytree(generated_listops, listops / "listops_generated")
    loaded["listops-classification"] = dl.load("listops-classification", listops)
    fields = ("seq_len", "in_dim", "tokens", "pair", "n_classes", "task", "onehot_width")
    for name, ds in loaded.items():
        want = dl.model_meta(name)
        got = {k: getattr(ds, k) for k in fields}
        if name == "imdb-classification":
            got["in_dim"], want["in_dim"] = None, None
        assert got == want, name
    assert set(dl.SHAPES) == set(dl.DATASETS)
