"""End-to-end pretraining at toy size: the loss falls, resume equals an uninterrupted run,
checkpoints are atomic safetensors + JSON, and mistakes get one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from palmchat import checkpoint
from palmchat.checkpoint import native
from palmchat.cli import main as cli
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer
from palmchat.train.pretrain import PretrainArgs
from palmchat.train.pretrain import main as pretrain
from palmchat.utils.jsonl import read_jsonl
from palmchat.world.synthetic import World


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "world.txt"
    path.write_text("\n\n".join(World(seed=0).pretraining_documents(600)))
    return path


def small_run(out, corpus, **kw):
    args = dict(out=str(out), data=[str(corpus)], preset="tiny", vocab_size=320, seq_len=64, batch_size=8,
                max_steps=80, warmup_steps=5, lr=1e-2, eval_every=20, eval_batches=4, save_every=40, keep_last=3,
                dtype="fp32")
    args.update(kw)
    return pretrain(PretrainArgs(**args))


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run") / "pretrain"
    small_run(out, corpus)
    return out


def test_loss_falls_on_the_bundled_world(run):
    rows = read_jsonl(run / "metrics.jsonl")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert rows[0]["loss"] > 5.0  # ~ln(320) at initialisation
    assert val[-1] < rows[0]["loss"] - 2.0
    assert val[-1] < val[0]
    assert (run / "loss.png").stat().st_size > 1000


def test_checkpoint_folder_is_safetensors_and_json_only(run):
    ckpt = checkpoint.resolve(run)
    assert ckpt.name == "step-000080"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "tokenizer.json"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["step"] == 80 and config["model"]["dim"] == 64
    model, _, _ = checkpoint.load_model(run)
    assert isinstance(model, Transformer)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(run, corpus, tmp_path):
    # simulate a crash right after the step-20 checkpoint: keep only what existed then
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "step-000080")
    (crashed / "latest").write_text("step-000040\n")
    small_run(crashed, corpus, resume=True)
    full = read_jsonl(run / "metrics.jsonl")
    resumed = read_jsonl(crashed / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 81))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]  # bit-identical
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in full]


def test_context_steps_train_the_last_steps_on_whole_contexts_and_resume_exactly(run, corpus, tmp_path):
    """The run above trains on 64 of the model's 128 positions; with --context-steps 30 its first 50 steps are the
    same and its last 30 take 4 sequences of 128 tokens instead of 8 of 64 (what that buys on the demo's model:
    docs/decisions.md). Resuming in the middle of them changes nothing."""
    extended = tmp_path / "extended"
    small_run(extended, corpus, context_steps=30, save_every=20)
    rows, plain = read_jsonl(extended / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [r["loss"] for r in rows[:50]] == [r["loss"] for r in plain[:50]]
    assert all(r["loss"] != p["loss"] for r, p in zip(rows[50:], plain[50:]))
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in plain]  # as many tokens per step

    crashed = tmp_path / "crashed"
    shutil.copytree(extended, crashed)
    shutil.rmtree(crashed / "step-000080")
    (crashed / "latest").write_text("step-000060\n")  # 10 steps into the whole-context phase
    small_run(crashed, corpus, context_steps=30, save_every=20, resume=True)
    assert [r["loss"] for r in read_jsonl(crashed / "metrics.jsonl")] == [r["loss"] for r in rows]
    with pytest.raises(ValueError, match="--context-steps"):
        small_run(tmp_path / "bad", corpus, context_steps=5, batch_size=3)  # 3 x 64 tokens: not whole contexts


def test_a_crash_while_saving_leaves_the_previous_checkpoint(run, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    model, config, _ = checkpoint.load_model(out)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(native, "save_file", crash)  # where save_checkpoint looks it up
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(out, 120, model, config)
    assert checkpoint.resolve(out).name == "step-000080"
    assert not list(out.glob(".step-*"))  # no half-written folder left behind
    checkpoint.load_model(out)


def test_corrupt_weights_are_a_clear_error(run, tmp_path):
    out = tmp_path / "bad"
    shutil.copytree(checkpoint.resolve(run), out)
    (out / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable safetensors"):
        checkpoint.load_model(out)


def test_checkpoint_from_another_model_shape(run):
    other = Transformer(preset("tiny", vocab_size=320, dim=96))
    with pytest.raises(checkpoint.CheckpointError, match="another model shape"):
        checkpoint.load_weights(other, run)


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--data", "/nonexistent/corpus.txt"], "not found: /nonexistent/corpus.txt"),
    (["generate", "/nonexistent/ckpt", "--prompt", "hi"], "checkpoint not found: /nonexistent/ckpt"),
    (["pretrain", "--preset", "huge"], "unknown model preset 'huge'"),
    (["pretrain", "--model", "dim=65"], "dim=65"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path, corpus):
    if argv[0] == "pretrain" and "--data" not in argv:
        argv = argv + ["--data", str(corpus)]
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] == "pretrain" else [])
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_empty_corpus_and_existing_run(capsys, tmp_path, run):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli(["pretrain", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "contains no documents" in capsys.readouterr().err
    assert cli(["pretrain", "--data", str(empty), "--out", str(run)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_resume_with_a_different_shape_is_refused(run, tmp_path, corpus, capsys):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    # a checkpoint folder whose weights come from another model shape
    other = Transformer(preset("tiny", vocab_size=320, dim=32))
    config = checkpoint.read_config(out)
    checkpoint.save_checkpoint(out, 80, other, config)
    assert cli(["pretrain", "--resume", "--out", str(out), "--data", str(corpus), "--max-steps", "90"]) == 2
    assert "another model shape" in capsys.readouterr().err


KEEP_FREED_MEMORY_PROBE = """
import resource, sys, torch, torch.nn.functional as F
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer
from palmchat.utils.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
model = Transformer(preset("tiny", vocab_size=4096, max_seq_len=256))
data = torch.randint(0, 4096, (16, 257))
def step():  # its fp32 logits and their gradient are 64 MB each
    F.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten()).backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_keep_freed_memory_stops_each_training_step_from_page_faulting_its_activations_in_again():
    """Each in its own process, since the setting is process-wide: the page faults of steps 4 to 8. By default
    every step faults its large buffers in again (~67,000 faults a step, ~335,000 in all); kept, mostly none, but
    the heap's layout now and then has a 64 MB buffer or two come fresh (16,384 faults each; up to 36,096 seen)."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY_PROBE, mode], capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 100_000 and faults["keep"] < faults["default"] / 5, faults
