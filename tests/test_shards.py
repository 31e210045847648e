import json
import random

import numpy as np
import pytest
import torch

from palmchat.data.shards import PackedBatches, TokenShard, read_documents, write_shards
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import BOS_ID

WORDS = ("alpha beta gamma delta river stone cloud light dark north south east west "
         "small large quick slow red blue green one two three").split()


def make_docs(n=300, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "."
                 for _ in range(rng.randint(1, 3))]
        docs.append(f"Doc {i}: " + "\n".join(sents))
    return docs


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs, vocab_size=350)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, docs, tok):
    out = tmp_path_factory.mktemp("shards")
    meta = write_shards(docs, tok, out, val_fraction=0.1, seed=0)
    return out, meta


def split_docs(bin_path, tok):
    arr = np.fromfile(bin_path, dtype=np.uint16).astype(np.int64)
    if arr.size == 0:
        return []
    cuts = np.flatnonzero(arr == BOS_ID).tolist() + [arr.size]
    assert cuts[0] == 0
    return [tok.decode(arr[a + 1:b].tolist()) for a, b in zip(cuts[:-1], cuts[1:])]


def test_read_documents_txt_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("first doc\nline two\n\n\n  \nsecond doc\n\nthird\n", encoding="utf-8")
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"text": "json doc"}) + "\n\n" + json.dumps({"text": "é 世界", "id": 3}) + "\n",
                 encoding="utf-8")
    assert list(read_documents([t, j])) == ["first doc\nline two", "second doc", "third", "json doc", "é 世界"]
    assert list(read_documents(str(t))) == ["first doc\nline two", "second doc", "third"]


def test_read_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.txt"):
        read_documents([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok2"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: invalid JSON"):
        list(read_documents([bad]))
    nt = tmp_path / "nt.jsonl"
    nt.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"nt\.jsonl: line 2: missing \"text\""):
        list(read_documents([nt]))
    ns = tmp_path / "ns.jsonl"
    ns.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"ns\.jsonl: line 1: \"text\" must be a string"):
        list(read_documents([ns]))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file extension '.csv'"):
        read_documents([csv])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="contains no documents"):
        list(read_documents([empty]))


def test_write_shards_roundtrip_and_split(shard_dir, docs, tok):
    out, meta = shard_dir
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_sha256"] == tok.sha256
    train, val = split_docs(out / "train.bin", tok), split_docs(out / "val.bin", tok)
    assert len(train) == meta["train_docs"] and len(val) == meta["val_docs"]
    assert meta["train_tokens"] == (out / "train.bin").stat().st_size // 2
    assert meta["val_tokens"] == (out / "val.bin").stat().st_size // 2
    assert sorted(train + val) == sorted(docs)          # round trip, nothing lost
    assert val and train and not set(train) & set(val)  # non-empty, disjoint by document
    assert 10 <= len(val) <= 60                          # ~10% of 300
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_write_shards_deterministic_and_small(tmp_path, docs, tok):
    m1 = write_shards(docs[:50], tok, tmp_path / "a", val_fraction=0.2, seed=1)
    m2 = write_shards(reversed(docs[:50]), tok, tmp_path / "b", val_fraction=0.2, seed=1)
    # split depends on (seed, content) only, not on order
    assert sorted(split_docs(tmp_path / "a" / "val.bin", tok)) == sorted(split_docs(tmp_path / "b" / "val.bin", tok))
    assert m1["val_docs"] == m2["val_docs"]
    # two documents -> both splits non-empty, even with a tiny val_fraction
    for frac in (1e-9, 0.999):
        m = write_shards(docs[:2], tok, tmp_path / f"two{frac}", val_fraction=frac)
        assert m["train_docs"] == 1 and m["val_docs"] == 1
        folder = tmp_path / f"two{frac}"
        got = split_docs(folder / "train.bin", tok) + split_docs(folder / "val.bin", tok)
        assert sorted(got) == sorted(docs[:2])
    with pytest.raises(ValueError, match="empty corpus"):
        write_shards([], tok, tmp_path / "empty")


def test_get_batch_deterministic(shard_dir):
    out, _ = shard_dir
    a = PackedBatches(out / "train.bin", seq_len=16, batch_size=4, seed=7)
    b = PackedBatches(out / "train.bin", seq_len=16, batch_size=4, seed=7)
    for step in (0, 1, 5, 1000):
        xa, ya = a.get_batch(step)
        xb, yb = b.get_batch(step)
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # resume: calling out of order / again gives the same batch (pure function of seed, step)
    b.get_batch(3)
    assert torch.equal(a.get_batch(5)[0], b.get_batch(5)[0])
    assert not torch.equal(a.get_batch(0)[0], a.get_batch(1)[0])
    c = PackedBatches(out / "train.bin", seq_len=16, batch_size=4, seed=8)
    assert not torch.equal(a.get_batch(0)[0], c.get_batch(0)[0])


def test_get_batch_targets_shifted(shard_dir):
    out, _ = shard_dir
    pb = PackedBatches(out / "train.bin", seq_len=16, batch_size=8, seed=0)
    data = torch.from_numpy(np.fromfile(out / "train.bin", dtype=np.uint16).astype(np.int64))
    x, y = pb.get_batch(3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # every row is a real window of the shard
        starts = [s for s in range(len(data) - 16) if torch.equal(data[s:s + 16], row_x)]
        assert any(torch.equal(data[s + 1:s + 17], row_y) for s in starts)


def test_eval_batches(shard_dir):
    out, meta = shard_dir
    T, B = 8, 4
    pb = PackedBatches(out / "val.bin", seq_len=T, batch_size=B)
    data = torch.from_numpy(np.fromfile(out / "val.bin", dtype=np.uint16).astype(np.int64))
    batches = list(pb.iter_eval_batches())
    ys = torch.cat([y for _, y in batches])
    xs = torch.cat([x for x, _ in batches])
    n_win = (meta["val_tokens"] - 1) // T
    assert ys.shape == (n_win, T)
    # windows tile the shard: targets are disjoint, consecutive tokens
    assert torch.equal(ys.flatten(), data[1:1 + n_win * T])
    assert torch.equal(xs.flatten(), data[:n_win * T])
    assert [b[0].shape[0] for b in batches[:-1]] == [B] * (len(batches) - 1)
    assert len(list(pb.iter_eval_batches(max_batches=2))) == 2
    again = list(pb.iter_eval_batches(max_batches=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_errors_shard(tmp_path, shard_dir):
    out, meta = shard_dir
    n = meta["val_tokens"]
    with pytest.raises(ValueError, match=rf"val\.bin has {n} tokens.*needs at least {n + 5}"):
        PackedBatches(out / "val.bin", seq_len=n + 4, batch_size=2)
    with pytest.raises(FileNotFoundError, match="nothere.bin"):
        TokenShard(tmp_path / "nothere.bin")
