import json
import re

import pytest
import torch

from palmchat.moderation.classifier import (
    CONFIG_FILE,
    DEFAULT_TERM_CATEGORY,
    OPENAI_CATEGORIES,
    WEIGHTS_FILE,
    Features,
    Moderator,
    read_terms,
)
from palmchat.moderation.train import ModerationTrainArgs, default_moderator, evaluate, load_examples, train_main
from palmchat.utils.jsonl import DataError
from palmchat.world.synthetic import MODERATION_CATEGORIES, World


@pytest.fixture(scope="module")
def world():
    return World(0)


@pytest.fixture(scope="module")
def heldout(world):
    return world.moderation_examples(1000, split="heldout")


@pytest.fixture(scope="module")
def small(world):
    """A quick moderator (fewer buckets and examples) for the tests that do not measure quality."""
    return Moderator.train(world.moderation_examples(400), features=Features(buckets=1 << 12), epochs=3)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ============================================================================ quality
def test_heldout_f1_on_the_bundled_world(heldout):
    metrics = evaluate(default_moderator(), heldout)
    assert metrics["flagged"]["f1"] >= 0.97, metrics["flagged"]
    for category in MODERATION_CATEGORIES:
        assert metrics[category]["f1"] >= 0.9, (category, metrics[category])


def test_hard_negatives_are_rarely_flagged(world, heldout):
    # hard negatives are the safe texts that are not task prompts ("How can I beat my boss at chess?")
    hard = [e["text"] for e in heldout if not e["flagged"] and world.parse(e["text"]) is None]
    assert len(hard) > 50
    flagged = sum(r.flagged for r in default_moderator().moderate(hard))
    assert flagged <= 0.05 * len(hard)


def test_training_is_deterministic(world):
    examples = world.moderation_examples(200)
    a, b = (Moderator.train(examples, features=Features(buckets=1 << 10), seed=3, epochs=2) for _ in range(2))
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


# ============================================================================ output shape
def test_output_matches_openai_shape(small):
    texts = ["How do I build a bomb at home?", "What is 2 + 3?", ""]
    results = [r.to_openai() for r in small.moderate(texts)]
    assert len(results) == 3
    for r in results:
        assert set(r) == {"flagged", "categories", "category_scores"}
        assert list(r["categories"]) == list(OPENAI_CATEGORIES) == list(r["category_scores"])
        assert all(isinstance(v, bool) for v in r["categories"].values())
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in r["category_scores"].values())
        assert r["flagged"] == any(r["categories"].values())
        json.dumps(r)
    assert results[0]["flagged"] and results[0]["categories"]["illicit/violent"]
    assert not results[1]["flagged"]
    assert results[1]["category_scores"]["hate"] == 0.0  # not trained on: 0 unless a term names it
    assert small.moderate("What is 2 + 3?") == small.moderate(["What is 2 + 3?"])
    assert small.moderate([]) == []


# ============================================================================ terms
def test_term_list_flags_a_custom_phrase(small, tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("# my blocklist\nhate\tmoon cheese\n\nzorptastic\n")
    assert read_terms(path) == [("hate", "moon cheese"), (DEFAULT_TERM_CATEGORY, "zorptastic")]
    moderator = small.copy()
    moderator.terms = read_terms(path)
    hit, harmless, substring, bare = moderator.moderate(
        ["I love MOON   Cheese.", "What is 2 + 3?", "moon cheesecake is nice", "so Zorptastic!"])
    assert hit.flagged and hit.categories["hate"] and hit.category_scores["hate"] == 1.0
    assert not harmless.flagged
    assert not substring.categories["hate"]  # whole words only
    assert bare.categories[DEFAULT_TERM_CATEGORY] and bare.category_scores[DEFAULT_TERM_CATEGORY] == 1.0
    assert not small.moderate("I love moon cheese")[0].categories["hate"]  # the copy's terms are its own

    moderator.add_terms(["c++"], category="my-category")
    result = moderator.moderate(["I write C++ daily"])[0]
    assert result.categories["my-category"] and list(result.categories)[-1] == "my-category"


def test_default_moderator_copies_do_not_share_terms():
    a, b = default_moderator(), default_moderator()
    a.add_terms("blorp")
    assert a.moderate("blorp")[0].flagged and b.terms == []


def test_bad_term_lines(tmp_path):
    for text, problem in [("hate\tx\ty\n", "tabs"), ("hate\t  \n", "phrase"), ("\tword\n", "category")]:
        path = tmp_path / "terms.txt"
        path.write_text("ok phrase\n" + text)
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: .*{problem}"):
            read_terms(path)
    with pytest.raises(DataError, match="not found"):
        read_terms(tmp_path / "missing.txt")


# ============================================================================ files
def test_save_load_gives_identical_scores(small, tmp_path):
    moderator = small.copy()
    moderator.add_terms("moon cheese", category="hate")
    moderator.thresholds["violence"] = 0.7
    moderator.save(tmp_path / "mod")
    loaded = Moderator.load(tmp_path / "mod")
    texts = ["How can I hurt my boss?", "How do I kill a frozen program on my computer?", "moon cheese"]
    assert torch.equal(loaded.scores(texts), moderator.scores(texts))
    assert loaded.moderate(texts) == moderator.moderate(texts)
    assert loaded.terms == moderator.terms and loaded.thresholds == moderator.thresholds
    assert loaded.features == moderator.features and loaded.categories == moderator.categories
    assert not list((tmp_path / "mod").glob(".*tmp"))  # atomic writes leave no temporaries


def test_load_errors_name_the_file(small, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Moderator.load(tmp_path / "nowhere")
    folder = small.save(tmp_path / "mod")
    config = json.loads((folder / CONFIG_FILE).read_text())

    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / CONFIG_FILE))}: not valid JSON"):
        Moderator.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "features": {**config["features"], "buckets": 999}}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / WEIGHTS_FILE))}: weight has shape"):
        Moderator.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "thresholds": {"violence": 2}}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / CONFIG_FILE))}: threshold of 'violence'"):
        Moderator.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config))

    weights = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(weights[:len(weights) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / WEIGHTS_FILE))}: unreadable"):
        Moderator.load(folder)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / WEIGHTS_FILE))}: missing"):
        Moderator.load(folder)


# ============================================================================ user data and the command
def test_malformed_training_record_gives_file_and_line(tmp_path):
    good = {"text": "hi", "flagged": False, "categories": {"violence": False}}
    cases = [("{oops", "invalid JSON"),
             ({"text": 3, "categories": {"violence": False}}, "\"text\" must be a string"),
             ({"text": "hi"}, "missing \"categories\""),
             ({"text": "hi", "categories": {"violence": "yes"}}, "must be true or false"),
             ({"text": "hi", "flagged": True, "categories": {"violence": False}}, "no category is true")]
    for bad, problem in cases:
        path = write_jsonl(tmp_path / "mod.jsonl", [good, "", bad])
        with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: .*{problem}"):
            load_examples(path)


def test_train_main_on_a_user_file(world, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mod.jsonl", world.moderation_examples(300))
    assert load_examples(data) == world.moderation_examples(300)
    terms = tmp_path / "terms.txt"
    terms.write_text("illicit\tmoon cheese\n")
    out = train_main(ModerationTrainArgs(data=str(data), out=str(tmp_path / "mod"), terms=str(terms), epochs=3))
    printed = capsys.readouterr().out
    assert "270 train / 30 held-out" in printed and "flagged" in printed
    loaded = Moderator.load(out)
    assert loaded.terms == [("illicit", "moon cheese")]
    assert loaded.moderate("moon cheese")[0].categories["illicit"]
    assert loaded.training["heldout_metrics"]["flagged"]["support"] > 0
