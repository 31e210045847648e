"""Every stage reads every data format that can feed it: tiny reward, DPO, KTO and SFT runs on each public format's
fixture (tests/fixtures/datasets/) finish with a finite loss; for one format per stage the examples the stage trained
and validated on equal the reader's output field by field; Open-Assistant data is split by tree; malformed rows are
reported in the stage's log and skipped; a format that cannot feed a stage, or a wrong --format, is one clear error."""

import json
import math
from pathlib import Path

import pytest

from palmchat.cli import main as cli
from palmchat.data.chat import read_stage_data, split_by_tree
from palmchat.data.formats import FormatArgs, OasstFilters, Ranking, read_examples, tree_position
from palmchat.train import dpo as dpo_stage
from palmchat.train import reward as reward_stage
from palmchat.train import sft as sft_stage
from palmchat.train.dpo import DPOArgs
from palmchat.train.kto import KTOArgs
from palmchat.train.kto import main as kto
from palmchat.train.reward import RewardArgs
from palmchat.train.rollout import load_prompt_messages
from palmchat.train.sft import SFTArgs
from palmchat.utils.jsonl import DataError, read_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
PREFERENCE = ["oasst_trees.jsonl", "oasst_messages.jsonl", "hh_rlhf.jsonl", "ultrafeedback.jsonl",
              "ultrafeedback_binarized.jsonl", "openai_preference.jsonl"]
CONVERSATION = ["oasst_trees.jsonl", "sharegpt.json", "alpaca.json", "openai_chat.jsonl"]
TINY = dict(epochs=1, batch_size=2, dtype="fp32", save_every=0)


def losses(out) -> list[float]:
    return [r["loss"] for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r]


def key(ranking: Ranking) -> str:
    return json.dumps([ranking.prompt_messages, ranking.responses])


def recorder(monkeypatch, module, name: str, argument: int):
    """Wrap ``module.name`` to record its ``argument``-th positional argument at every call."""
    seen, original = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append(args[argument])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


# ============================================================================ a tiny run per format
@pytest.mark.parametrize("name", PREFERENCE)
def test_reward_and_dpo_train_on_each_preference_format(policy, tmp_path, name):
    data = [str(FIXTURES / name)] * 2  # some fixtures hold one ranking; a run needs one to train on and one held out
    rm = reward_stage.main(RewardArgs(base=policy["ckpt"], data=data, out=str(tmp_path / "rm"), **TINY))
    assert losses(tmp_path / "rm") and all(math.isfinite(x) for x in losses(tmp_path / "rm"))
    assert json.loads((rm / "config.json").read_text())["eval"]["after"]["pairwise_accuracy"] is not None
    dpo_stage.main(DPOArgs(base=policy["ckpt"], data=data, out=str(tmp_path / "dpo"), **TINY))
    assert losses(tmp_path / "dpo") and all(math.isfinite(x) for x in losses(tmp_path / "dpo"))


@pytest.mark.parametrize("name", CONVERSATION)
def test_sft_trains_on_each_conversation_format(policy, tmp_path, name):
    sft_stage.main(SFTArgs(base=policy["ckpt"], data=[str(FIXTURES / name)], out=str(tmp_path / "sft"), **TINY))
    assert losses(tmp_path / "sft") and all(math.isfinite(x) for x in losses(tmp_path / "sft"))


def test_kto_trains_on_open_assistant_rankings(policy, tmp_path):
    kto(KTOArgs(base=policy["ckpt"], data=[str(FIXTURES / "oasst_trees.jsonl")], out=str(tmp_path / "kto"), **TINY))
    assert losses(tmp_path / "kto") and all(math.isfinite(x) for x in losses(tmp_path / "kto"))


# ============================================================================ what each stage trained on
def test_reward_trains_and_holds_out_the_readers_rankings_split_by_tree(policy, tmp_path, monkeypatch, capsys):
    trained = recorder(monkeypatch, reward_stage, "ranking_batch", 1)
    held_out = recorder(monkeypatch, reward_stage, "score_rankings", 2)
    path = FIXTURES / "oasst_trees.jsonl"
    out = tmp_path / "rm"
    reward_stage.main(RewardArgs(base=policy["ckpt"], data=[str(path)], out=str(out), batch_size=4, epochs=1,
                                 dtype="fp32", save_every=0))
    expected = read_examples(path).rankings  # 2 rankings of the English tree, 1 of the German one
    train = {key(r) for batch in trained for r in batch}
    val = {key(r) for r in held_out[0]}
    assert sorted(train | val) == sorted(key(r) for r in expected) and not train & val
    english = {key(r) for r in expected if r.prompt_messages[0]["content"] == "What is a llama?"}
    assert english <= train or english <= val  # the siblings' tree lands on one side
    # the held-out pairwise accuracy of the imported rankings: printed, in the metrics and in the checkpoint
    log = capsys.readouterr().out
    assert "reward: " + str(path) + ": Open-Assistant message trees (format oasst), 3 rows -> 3 rankings" in log
    assert "held-out pairwise accuracy" in log
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "val_pairwise_accuracy" in r]
    assert rows[0]["step"] == 0 and rows[-1]["step"] >= 1 and 0.0 <= rows[-1]["val_pairwise_accuracy"] <= 1.0


def test_dpo_trains_on_the_readers_ultrafeedback_rankings(policy, tmp_path, monkeypatch):
    seen = recorder(monkeypatch, dpo_stage, "ranking_batch", 1)
    path = FIXTURES / "ultrafeedback.jsonl"
    dpo_stage.main(DPOArgs(base=policy["ckpt"], data=[str(path)], out=str(tmp_path / "dpo"), **TINY))
    expected = read_examples(path).rankings
    assert [len(r.responses) for r in expected] == [3, 2]  # K-wise, the exact tie dropped
    assert {key(r) for batch in seen for r in batch} == {key(r) for r in expected}


def test_sft_trains_on_the_readers_openai_conversations_with_weights(policy, tmp_path, monkeypatch):
    seen = recorder(monkeypatch, sft_stage, "encode_sft", 1)
    path = FIXTURES / "openai_chat.jsonl"
    sft_stage.main(SFTArgs(base=policy["ckpt"], data=[str(path)], out=str(tmp_path / "sft"), **TINY))
    expected = read_examples(path).conversations
    assert seen == expected and any(m.get("weight") == 0 for c in seen for m in c)


def test_the_open_assistant_flags_reach_the_stage(policy, tmp_path, monkeypatch, capsys):
    seen = recorder(monkeypatch, sft_stage, "encode_sft", 1)
    path = str(FIXTURES / "oasst_messages.jsonl")
    assert cli(["sft", policy["ckpt"], "--data", path, "--oasst-branches", "all", "--keep-synthetic",
                "--out", str(tmp_path / "sft"), "--epochs", "1", "--batch-size", "2", "--dtype", "fp32",
                "--save-every", "0"]) == 0
    expected = read_examples(path, oasst=OasstFilters(branches="all", keep_synthetic=True)).conversations
    assert seen == expected and "Synthetic answer." in [c[-1]["content"] for c in seen]
    assert "synthetic message" not in capsys.readouterr().out  # kept, so not in the log's drop list
    german = load_prompt_messages([path], 0, FormatArgs(lang=["de"], tree_state=""), "ppo")
    assert german == read_examples(path, oasst=OasstFilters(langs=("de",), tree_state="")).prompts
    assert {m["content"] for p in german for m in p} >= {"Was ist ein Lama?"}


def test_rl_stages_read_prompts_of_a_public_format():
    path = FIXTURES / "ultrafeedback.jsonl"
    assert load_prompt_messages([str(path)], 0, FormatArgs(), "grpo") == read_examples(path).prompts


# ============================================================================ the split by tree
def test_split_by_tree_keeps_each_tree_on_one_side_and_the_rest_as_before():
    items = list(range(40))
    trees = [f"tree{i // 4}" for i in range(20)] + [None] * 20
    train, val = split_by_tree(items, trees, 0.3, seed=1)
    assert sorted(train + val) == items
    for tree in {t for t in trees if t}:
        members = {i for i, t in enumerate(trees) if t == tree}
        assert members <= set(train) or members <= set(val)
        assert (members <= set(val)) == (tree_position(tree, 1) < 0.3)  # as `palmchat data convert --split val`
    loose_val = [i for i in val if trees[i] is None]
    assert len(loose_val) == 6  # int(20 * 0.3) of the items from no tree
    # no tree-held items: exactly the stages' old shuffle-and-slice
    import random

    plain = list(range(20))
    random.Random(1).shuffle(plain)
    assert split_by_tree(list(range(20)), [None] * 20, 0.3, seed=1) == (plain[6:], plain[:6])
    # a tiny file whose trees all fall on the train side still holds one tree out
    train, val = split_by_tree(["a", "b", "c"], ["t1", "t1", "t2"], 0.0, seed=0)
    assert val and train and len({"t1" if x in "ab" else "t2" for x in val}) == 1


# ============================================================================ errors and bad rows
def test_malformed_rows_are_reported_in_the_stage_log_and_skipped(policy, tmp_path, capsys):
    good, bad = str(FIXTURES / "hh_rlhf.jsonl"), str(FIXTURES / "hh_rlhf_bad.jsonl")
    reward_stage.main(RewardArgs(base=policy["ckpt"], data=[good, bad], out=str(tmp_path / "rm"), **TINY))
    log = capsys.readouterr().out
    assert f"reward: {bad}: Anthropic HH-RLHF (format hh-rlhf), 2 rows -> 1 rankings or pairs" in log
    assert "reward:   malformed rows: 1 (rows 2)" in log
    assert f'reward:     {bad}:2: "chosen": turn 2 is Human' in log
    assert "reward model: 2 train / 1 held-out rankings" in log


def test_a_line_that_is_not_json_is_a_bad_row_too(policy, tmp_path, capsys, monkeypatch):
    seen = recorder(monkeypatch, sft_stage, "encode_sft", 1)
    good = [[{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}] for i in range(3)]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": good[0]}) + "\n" + '{"messages": [{"role": "user", "cont\n'
                    + json.dumps({"messages": good[1]}) + "\n" + "[1, 2]\n"
                    + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n"
                    + json.dumps({"messages": good[2]}) + "\n")
    sft_stage.main(SFTArgs(base=policy["ckpt"], data=[str(path)], out=str(tmp_path / "sft"), **TINY))
    assert seen == good
    log = capsys.readouterr().out
    assert f"sft: {path}: palmchat / OpenAI chat / TRL records (format palmchat), 6 rows -> 3 SFT conversations" in log
    assert "sft:   malformed rows: 3 (rows 2, 4, 5)" in log
    assert f"sft:     {path}:2: invalid JSON (" in log
    assert f"sft:     {path}:4: expected a JSON object, got a list" in log
    assert f"sft:     {path}:5: messages[0].role 'bot' is not one of system, user, assistant" in log
    assert cli(["data", "inspect", str(path)]) == 0
    assert "malformed rows: 3 (rows 2, 4, 5)" in capsys.readouterr().out


def test_a_format_that_cannot_feed_the_stage_is_one_clear_error(policy, tmp_path, capsys):
    alpaca = str(FIXTURES / "alpaca.json")
    assert cli(["dpo", policy["ckpt"], "--data", alpaca, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"palmchat dpo: error: {alpaca}: dpo needs rankings or pairs, and this "
                                              "alpaca file (Alpaca) has none: give palmchat records")
    assert "oasst, oasst-messages, hh-rlhf, ultrafeedback, ultrafeedback-binarized, openai-preference" in err
    with pytest.raises(DataError, match="kto needs unpaired examples, and this sharegpt file"):
        read_stage_data([FIXTURES / "sharegpt.json"], "unpaired", FormatArgs(), "kto")


def test_a_wrong_format_named_is_one_clear_error(policy, tmp_path, capsys):
    hh = str(FIXTURES / "hh_rlhf.jsonl")
    assert cli(["reward", policy["ckpt"], "--data", hh, "--format", "ultrafeedback", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert (f"{hh}: no row of this ultrafeedback file gives reward rankings or pairs (--format ultrafeedback named "
            f"it; its first record looks like hh-rlhf): all 3 malformed, the first at {hh}:1: missing") in err
    with pytest.raises(SystemExit) as exit:  # argparse's own one-line error
        cli(["sft", policy["ckpt"], "--data", hh, "--format", "csv", "--out", str(tmp_path / "o")])
    assert exit.value.code == 2 and "--format: invalid choice: 'csv'" in capsys.readouterr().err


def test_a_file_whose_every_example_is_filtered_out_says_why(tmp_path):
    with pytest.raises(DataError, match=r"oasst_trees.jsonl: this oasst file gives no rankings or pairs for dpo "
                                        r"\(.*language not selected: 2.*\): palmchat data inspect shows why"):
        read_stage_data([FIXTURES / "oasst_trees.jsonl"], "rankings", FormatArgs(lang=["fr"]), "dpo")
