"""The public data sets' formats (palmchat/data/formats.py), checked field by field against hand-written expectations
on hand-made fixtures in each data set's exact schema (tests/fixtures/datasets/), plus `palmchat data inspect` and
`convert`, the containers (JSON, Parquet, a save_to_disk folder), and a reward and a DPO run reading oasst and HH."""

import json
import shutil
from pathlib import Path

import pytest

from palmchat.cli import main as cli
from palmchat.data.chat import encode_sft, load_conversations, load_prompts, load_rankings, load_unpaired
from palmchat.data.formats import OasstFilters, Ranking, detect_format, file_format, read_examples, tree_split
from palmchat.utils.jsonl import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


LLAMA = [user("What is a llama?"), assistant("A South American camelid."), user("How tall is it?")]
LAMA = [user("Was ist ein Lama?")]


# ============================================================================ detection
@pytest.mark.parametrize("name,fmt", [
    ("oasst_trees.jsonl", "oasst"), ("oasst_messages.jsonl", "oasst-messages"), ("hh_rlhf.jsonl", "hh-rlhf"),
    ("ultrafeedback.jsonl", "ultrafeedback"), ("ultrafeedback_binarized.jsonl", "ultrafeedback-binarized"),
    ("openai_chat.jsonl", "palmchat"), ("openai_preference.jsonl", "openai-preference"),
    ("sharegpt.json", "sharegpt"), ("alpaca.json", "alpaca"),
])
def test_each_fixture_is_detected_as_its_format(name, fmt):
    assert file_format(FIXTURES / name) == fmt


def test_palmchat_and_trl_records_stay_palmchat():
    for record in ({"messages": []}, {"prompt": "q", "chosen": "a", "rejected": "b"},
                   {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]},
                   {"prompt": "q", "completion": "a", "label": True}, {"text": "x"}):
        assert detect_format(record) == "palmchat"
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        file_format(FIXTURES / "alpaca.json", "csv")


# ============================================================================ Open-Assistant
@pytest.mark.parametrize("name", ["oasst_trees.jsonl", "oasst_messages.jsonl"])
def test_oasst_rankings_conversations_prompts_and_drops(name):
    ex = read_examples(FIXTURES / name)
    # the deleted a5, synthetic a6, failed-review a7 and the growing tree are gone; a4 (rank null) is not ranked
    assert ex.rankings == [
        Ranking([user("What is a llama?")], ["A South American camelid.", "A camelid."]),
        Ranking(LLAMA, ["About 1.8 m at the head.", "Around 1.7 to 1.8 metres."]),
        Ranking(LAMA, ["Ein Kamel aus Südamerika.", "Ein Tier."]),
    ]
    assert ex.conversations == [[*LLAMA, assistant("About 1.8 m at the head.")],  # the best-ranked branch
                                [*LAMA, assistant("Ein Kamel aus Südamerika.")]]
    assert ex.prompts == [[user("What is a llama?")], LLAMA, LAMA]
    assert [(u.completion, u.desirable) for u in ex.unpaired[:2]] == [("A South American camelid.", True),
                                                                     ("A camelid.", False)]
    rows = (lambda *r: list(r)) if name == "oasst_messages.jsonl" else (lambda *r: [1] * len(r))
    expected = {"deleted message": rows(7), "synthetic message": rows(9), "failed review": rows(10),
                "unranked reply": rows(6)}
    assert {k: v for k, v in ex.dropped.items() if k != "tree_state is not ready_for_export"} == expected
    assert ex.dropped["tree_state is not ready_for_export"] == [14 if name == "oasst_messages.jsonl" else 3]


def test_oasst_filters_language_all_branches_k_and_keeping():
    path = FIXTURES / "oasst_trees.jsonl"
    english = read_examples(path, oasst=OasstFilters(langs=("en",)))
    assert [r.prompt_messages for r in english.rankings] == [[user("What is a llama?")], LLAMA]
    assert english.dropped["language not selected"] == [2]
    every = read_examples(path, oasst=OasstFilters(branches="all"))
    assert every.conversations == [
        [user("What is a llama?"), assistant("A camelid.")],
        [*LLAMA, assistant("About 1.8 m at the head.")],
        [*LLAMA, assistant("Tall.")],
        [*LLAMA, assistant("Around 1.7 to 1.8 metres.")],
        [*LAMA, assistant("Ein Kamel aus Südamerika.")],
        [*LAMA, assistant("Ein Tier.")],
    ]
    kept = read_examples(path, oasst=OasstFilters(keep_deleted=True, keep_failed_review=True, tree_state="",
                                                  max_responses=2))
    assert kept.rankings[0].responses == ["A South American camelid.", "A camelid."]  # capped at K = 2 (a7 ranked 2)
    assert kept.rankings[1].responses == ["About 1.8 m at the head.", "Around 1.7 to 1.8 metres."]
    assert len(kept.rankings) == 4 and kept.rankings[3].prompt_messages == [user("Unfinished question?")]
    three = read_examples(path, oasst=OasstFilters(keep_deleted=True, keep_failed_review=True))
    assert three.rankings[0].responses == ["A South American camelid.", "A camelid.", "Llamas are fish."]
    assert three.rankings[1].responses[-1] == "Very tall indeed."


def test_oasst_split_is_by_tree_and_deterministic():
    sides = {t: tree_split(t, 0.5, seed=3) for t in ("p1", "q1", "r1", "a", "b", "c", "d")}
    assert sides == {t: tree_split(t, 0.5, seed=3) for t in sides} and set(sides.values()) == {"train", "val"}
    path = FIXTURES / "oasst_messages.jsonl"
    seed = next(s for s in range(100) if tree_split("p1", 0.5, s) != tree_split("q1", 0.5, s))
    train = read_examples(path, oasst=OasstFilters(split="train", val_fraction=0.5, seed=seed))
    val = read_examples(path, oasst=OasstFilters(split="val", val_fraction=0.5, seed=seed))
    prompts = {r.prompt_messages[0]["content"] for r in train.rankings}, {r.prompt_messages[0]["content"]
                                                                          for r in val.rankings}
    assert sorted(map(len, (train.rankings, val.rankings))) == [1, 2]  # both rankings of tree p1 on one side
    assert not prompts[0] & prompts[1]


def test_oasst_malformed_tree_names_file_row_and_field():
    path = FIXTURES / "oasst_trees_bad.jsonl"
    with pytest.raises(DataError, match=r"oasst_trees_bad.jsonl:2: prompt.replies\[0\].role 'bot' is not prompter"):
        load_rankings(path)
    ex = read_examples(path, strict=False)
    assert [row for row, _ in ex.bad] == [2] and len(ex.rankings) == 1


# ============================================================================ HH-RLHF
def test_hh_rlhf_prefix_and_final_replies():
    ex = read_examples(FIXTURES / "hh_rlhf.jsonl")
    assert ex.rankings == [
        Ranking([user("What is 2 + 2?")], ["2 + 2 = 4.", "It is 5."]),
        Ranking([user("Name a fruit."), assistant("An apple."), user("Another one?")], ["A pear.", "No."]),
    ]
    assert ex.dropped == {"chosen and rejected are the same reply": [3]}
    assert ex.conversations[2] == [user("Say hi."), assistant("Hi!")]
    assert load_rankings(FIXTURES / "hh_rlhf.jsonl") == ex.rankings


def test_hh_rlhf_row_that_does_not_parse_is_an_error_naming_file_and_row():
    with pytest.raises(DataError, match=r"hh_rlhf_bad.jsonl:2: \"chosen\": turn 2 is Human, expected Assistant"):
        load_rankings(FIXTURES / "hh_rlhf_bad.jsonl")


@pytest.mark.parametrize("record,problem", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "Human: a\n\nAssistant: c"},
     '"rejected" does not start with'),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: c"},
     '"chosen" does not end with an Assistant turn'),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"},
     "differ before their final Assistant turn"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": 3}, '"rejected" must be a string, got a number'),
])
def test_hh_rlhf_malformed_rows(tmp_path, record, problem):
    path = tmp_path / "hh.jsonl"
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        load_rankings(path, format="hh-rlhf")
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value), str(e.value)


# ============================================================================ UltraFeedback
def test_ultrafeedback_raw_ranks_by_mean_aspect_rating_and_drops_exact_ties():
    ex = read_examples(FIXTURES / "ultrafeedback.jsonl")
    assert ex.rankings == [
        # Red 4.5, Blue 4.5 (tied with Red: dropped), Yellow 3.5, Purple 2.0 (its N/A skipped)
        Ranking([user("Name a primary colour.")], ["Red.", "Yellow is one.", "Purple."]),
        # París by fine-grained_score 4.75, Lyon by overall_score 3.0; "No lo sé." has only N/A: unrated
        Ranking([user("¿Cuál es la capital de Francia?")], ["París.", "Lyon."]),
    ]
    assert ex.dropped == {"tied completion (only the first of equal scores kept)": [1, 3], "unrated completion": [2],
                          "fewer than 2 distinct scores": [3]}
    assert ex.conversations[2] == [user("Say yes."), assistant("Yes.")]  # all tied: still the SFT reply


def test_ultrafeedback_binarized_pair_and_tie():
    ex = read_examples(FIXTURES / "ultrafeedback_binarized.jsonl")
    assert ex.rankings == [Ranking([user("Name a primary colour.")], ["Red.", "Purple."])]
    assert ex.dropped == {"tie (score_chosen == score_rejected)": [2]}
    assert ex.prompts == [[user("Name a primary colour.")], [user("Say yes.")]]


# ============================================================================ OpenAI, ShareGPT, Alpaca
def test_openai_chat_weight_zero_gets_no_loss(tmp_path):
    from palmchat.tokenizer.bpe import train_tokenizer

    conversations = load_conversations(FIXTURES / "openai_chat.jsonl")
    assert conversations[0][2] == {"role": "assistant", "content": "Milan.", "weight": 0}
    assert conversations[0][4] == assistant("Rome.") and conversations[1] == [user("Hi"), assistant("Hello!")]
    tok = train_tokenizer(["Capital of Italy? Milan. Rome. Are you sure? You are terse."] * 20, vocab_size=300)
    ids, targets = encode_sft(tok, conversations[0], 512)
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in conversations[0]]
    _, all_targets = encode_sft(tok, unweighted, 512)
    trained = [t for t in targets if t != -100]
    assert tok.decode(trained) == "Rome." and tok.decode([t for t in all_targets if t != -100]) == "Milan.Rome."
    bad = tmp_path / "w.jsonl"
    bad.write_text(json.dumps({"messages": [user("q"), {**assistant("a"), "weight": 2}]}) + "\n")
    with pytest.raises(DataError, match=r"w.jsonl:1: messages\[1\].weight must be 0 or 1, got 2"):
        load_conversations(bad)


def test_openai_preference_sharegpt_alpaca():
    pref = load_rankings(FIXTURES / "openai_preference.jsonl")
    assert pref[0].prompt_messages == [user("Hello, can you tell me how cold San Francisco is today?")]
    assert pref[0].responses[0].startswith("Today in San Francisco") and pref[0].responses[1].startswith("It is not")
    assert [(u.desirable, u.completion[:5]) for u in load_unpaired(FIXTURES / "openai_preference.jsonl")] == [
        (True, "Today"), (False, "It is")]
    share = read_examples(FIXTURES / "sharegpt.json")
    system = {"role": "system", "content": "Be brief."}
    assert share.conversations == [[system, user("2+2?"), assistant("4"), user("And 3+3?"), assistant("6")],
                                   [user("Bonjour !"), assistant("Bonjour ! Comment puis-je aider ?")]]
    assert share.prompts[0] == [system, user("2+2?"), assistant("4"), user("And 3+3?")]
    assert load_conversations(FIXTURES / "alpaca.json") == [
        [user("Give three tips for staying healthy."), assistant("1. Eat well. 2. Sleep. 3. Move.")],
        [user("Translate to Spanish.\n\nGood morning"), assistant("Buenos días")]]
    assert load_prompts(FIXTURES / "alpaca.json")[1] == [user("Translate to Spanish.\n\nGood morning")]


def test_a_stage_the_format_cannot_feed_is_one_clear_error():
    with pytest.raises(DataError, match=r"alpaca.json: this stage needs rankings or pairs, and this alpaca file "
                                        r"\(Alpaca\) has none"):
        load_rankings(FIXTURES / "alpaca.json")


def test_json_list_rows_are_named_item_n(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                                {"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(DataError, match=r"s.json:item 2: conversations\[0\].from 'robot' is not one of human, gpt"):
        load_conversations(path)


# ============================================================================ containers
def test_json_lines_in_a_json_file_as_datasets_writes_them(tmp_path):
    path = tmp_path / "alpaca.json"
    rows = json.loads((FIXTURES / "alpaca.json").read_text())
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_conversations(path) == load_conversations(FIXTURES / "alpaca.json")


def test_parquet_file_and_save_to_disk_folder_read_like_the_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (FIXTURES / "oasst_messages.jsonl").read_text().splitlines()]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "oasst.parquet"))
    table.save_to_disk(str(tmp_path / "oasst_disk"))
    (tmp_path / "shards").mkdir()
    table.select(range(8)).to_parquet(str(tmp_path / "shards" / "train-00000-of-00002.parquet"))
    table.select(range(8, 16)).to_parquet(str(tmp_path / "shards" / "train-00001-of-00002.parquet"))
    expected = read_examples(FIXTURES / "oasst_messages.jsonl")
    for source in ("oasst.parquet", "oasst_disk", "shards"):
        ex = read_examples(tmp_path / source)
        assert ex.format == "oasst-messages" and ex.rows == 16
        assert ex.rankings == expected.rankings and ex.conversations == expected.conversations
        assert ex.dropped == expected.dropped
    assert load_rankings(tmp_path / "oasst_disk") == expected.rankings
    hh = [json.loads(line) for line in (FIXTURES / "hh_rlhf_bad.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(hh).to_parquet(str(tmp_path / "hh.parquet"))
    with pytest.raises(DataError, match=r"hh.parquet:row 2: \"chosen\": turn 2 is Human"):
        load_rankings(tmp_path / "hh.parquet")


def test_a_broken_parquet_file_is_one_clear_error(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        load_rankings(path)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match=r"empty_folder: a folder, but not a Hugging Face datasets folder"):
        load_conversations(tmp_path / "empty_folder")


# ============================================================================ inspect and convert
def test_inspect_prints_format_counts_and_drops(capsys):
    assert cli(["data", "inspect", str(FIXTURES / "oasst_messages.jsonl"), "--lang", "en"]) == 0
    out = capsys.readouterr().out
    assert "Open-Assistant messages (flat table) (format oasst-messages), 16 rows" in out
    assert "  rankings                   2   palmchat reward, dpo (K = 2)" in out
    assert "  sft conversations          1" in out
    assert "  deleted message: 1 (rows 7)" in out and "  language not selected: 1 (rows 11)" in out
    assert cli(["data", "inspect", str(FIXTURES / "hh_rlhf_bad.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "malformed rows: 1 (rows 2)" in out and "hh_rlhf_bad.jsonl:2: \"chosen\": turn 2 is Human" in out


@pytest.mark.parametrize("name,to,loader", [
    ("oasst_trees.jsonl", "rankings", load_rankings), ("oasst_trees.jsonl", "sft", load_conversations),
    ("ultrafeedback.jsonl", "pairs", load_rankings), ("hh_rlhf.jsonl", "prompts", load_prompts),
    ("hh_rlhf.jsonl", "kto", load_unpaired), ("openai_chat.jsonl", "sft", load_conversations),
])
def test_convert_writes_palmchat_files_the_loaders_read_back(tmp_path, name, to, loader, capsys):
    out = tmp_path / "out.jsonl"
    assert cli(["data", "convert", str(FIXTURES / name), "--to", to, "--out", str(out)]) == 0
    assert file_format(out) == "palmchat"
    source = read_examples(FIXTURES / name)
    expected = {"rankings": source.rankings, "sft": source.conversations, "prompts": source.prompts,
                "kto": source.unpaired,
                "pairs": [Ranking(r.prompt_messages, [a, b]) for r in source.rankings
                          for i, a in enumerate(r.responses) for b in r.responses[i + 1:]]}[to]
    assert loader(out) == expected
    assert "wrote" in capsys.readouterr().out


def test_convert_flags_reach_the_oasst_reader(tmp_path, capsys):
    out = tmp_path / "sft.jsonl"
    assert cli(["data", "convert", str(FIXTURES / "oasst_trees.jsonl"), "--to", "sft", "--oasst-branches", "all",
                "--lang", "en", "--keep-synthetic", "--out", str(out)]) == 0
    assert [c[-1]["content"] for c in load_conversations(out)] == [
        "A camelid.", "About 1.8 m at the head.", "Tall.", "Around 1.7 to 1.8 metres.", "Synthetic answer."]
    assert "wrote 5 sft records from 3 oasst rows" in capsys.readouterr().out


def test_convert_refuses_a_malformed_file(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert cli(["data", "convert", str(FIXTURES / "hh_rlhf_bad.jsonl"), "--to", "pairs", "--out", str(out)]) == 2
    assert "hh_rlhf_bad.jsonl:2:" in capsys.readouterr().err and not out.exists()


# ============================================================================ stages reading the formats
def test_reward_dpo_and_sft_train_on_the_public_formats(policy, tmp_path, capsys):
    from palmchat import checkpoint
    from palmchat.train.dpo import DPOArgs
    from palmchat.train.dpo import main as dpo
    from palmchat.train.reward import RewardArgs
    from palmchat.train.reward import main as reward
    from palmchat.train.sft import SFTArgs
    from palmchat.train.sft import main as sft

    data = [str(FIXTURES / "oasst_trees.jsonl"), str(FIXTURES / "hh_rlhf.jsonl")]  # 3 + 2 rankings
    rm = reward(RewardArgs(base=policy["ckpt"], data=data, val_data=[str(FIXTURES / "ultrafeedback.jsonl")],
                           out=str(tmp_path / "rm"), epochs=1, batch_size=2, dtype="fp32", save_every=0))
    assert checkpoint.read_config(rm)["stage"] == "reward"
    assert "reward model: 5 train / 2 held-out rankings" in capsys.readouterr().out
    out = dpo(DPOArgs(base=policy["ckpt"], data=data, out=str(tmp_path / "dpo"), epochs=1, batch_size=2,
                      val_fraction=0.2, dtype="fp32", save_every=0))
    assert checkpoint.read_config(out)["method"] == "dpo"
    assert "dpo: 4 train / 1 held-out rankings" in capsys.readouterr().out
    sft(SFTArgs(base=policy["ckpt"], data=[str(FIXTURES / "sharegpt.json"), str(FIXTURES / "openai_chat.jsonl"),
                                          str(FIXTURES / "alpaca.json")],
                out=str(tmp_path / "sft"), epochs=1, batch_size=2, val_fraction=0.2, dtype="fp32", save_every=0))
    assert "sft: 5 train / 1 held-out conversations" in capsys.readouterr().out
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("family", ["qwen2.5", "llama3"])
def test_weight_zero_with_a_hugging_face_chat_template(tmp_path, family):
    from hf_tokenizers import save_tiny_hf_tokenizer

    from palmchat.tokenizer.hf import HFTokenizer

    tok = HFTokenizer.load(save_tiny_hf_tokenizer(tmp_path, family))
    conversation = load_conversations(FIXTURES / "openai_chat.jsonl")[0]
    for messages in (conversation, conversation[1:]):  # without a system turn Qwen's template writes its own
        _, targets = encode_sft(tok, messages, 512)
        trained = tok.decode([t for t in targets if t != -100])
        assert "Rome." in trained and "Milan" not in trained, trained
        _, all_targets = encode_sft(tok, [{k: v for k, v in m.items() if k != "weight"} for m in messages], 512)
        assert "Milan" in tok.decode([t for t in all_targets if t != -100])


def test_inspect_a_palmchat_file_counts_each_stage_and_names_a_bad_row(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]},
        {"messages": [user("hi"), assistant("yo")]},
    ]) + "\n")
    assert cli(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format palmchat), 3 rows" in out and "  rankings                   1" in out
    assert "  pairs                      3" in out and "  sft conversations          1" in out
    assert f'malformed rows: 1 (rows 2)\n  {path}:2: "ranking" must be a permutation of 0..1, got [0, 0]' in out
