"""A checkpoint carries its tokenizer's identity, and a reward model, critic or LoRA adapter trained with another
tokenizer (same vocabulary size, so every shape matches) is refused instead of scoring garbage (issue 18, defect 3).
The server's side (stored conversations re-rendered after a tokenizer change) is in test_server.py."""

from __future__ import annotations

import json

import pytest

from palmchat import checkpoint
from palmchat.checkpoint.heads import load_reward_model, load_value_model, save_reward_model, save_value_model
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel, ValueModel
from palmchat.model.lora import add_lora, lora_config
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import Tokenizer, train_tokenizer
from palmchat.tokenizer.chat_format import EOT_ID

VOCAB = 300

ENGLISH = ["the cat sat on the mat and the dog ate the bone", "a quick brown fox jumps over the lazy dog",
           "she sells sea shells by the sea shore", "peter piper picked a peck of pickled peppers"] * 8
DIGITS = ["0123 4567 89 1024 2048 4096 8192 16384", "3.14159 2.71828 1.41421 1.73205 0.57721",
          "x = y + 1; y = z * 2; z = (x - 3) / 4;", "[1, 2, 3] {4: 5} <6> |7| ~8~ ^9^"] * 8


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two tokenizers trained on different text to the same vocabulary size, saved as files."""
    root = tmp_path_factory.mktemp("tokenizers")
    a, b = train_tokenizer(ENGLISH, vocab_size=VOCAB), train_tokenizer(DIGITS, vocab_size=VOCAB)
    assert a.vocab_size == b.vocab_size == VOCAB and a.sha256 != b.sha256
    return Tokenizer.load(a.save(root / "a")), Tokenizer.load(b.save(root / "b"))


@pytest.fixture
def config():
    return preset("tiny", vocab_size=VOCAB)


def policy(tmp_path, config, tokenizer, name="policy"):
    return checkpoint.save_checkpoint(tmp_path / name, 0, Transformer(config), {"model": config.to_dict()},
                                      tokenizer.path)


def reward(tmp_path, config, tokenizer, name="rm"):
    return save_reward_model(RewardModel(Transformer(config), EOT_ID), tmp_path / name, 0, {"stage": "reward"},
                             tokenizer.path)


def test_every_checkpoint_records_the_hash_of_the_tokenizer_it_saved(tmp_path, config, tokenizers):
    a, _ = tokenizers
    full = policy(tmp_path, config, a)
    rm = reward(tmp_path, config, a)
    vm = save_value_model(ValueModel(Transformer(config)), tmp_path / "vm", 0, {}, a.path)
    model = Transformer(config)
    add_lora(model, "policy", rank=2)
    adapter = checkpoint.save_checkpoint(tmp_path / "lora", 0, model,
                                         {"model": config.to_dict(), "lora": lora_config(model, "policy"),
                                          "base": str(full)}, a.path, adapter="policy")
    for ckpt in (full, rm, vm, adapter):
        recorded = checkpoint.read_config(ckpt)["tokenizer"]
        assert recorded == {"sha256": a.sha256, "vocab_size": VOCAB}, ckpt
        # the same as the hash of the tokenizer.json it carries, loaded back
        assert checkpoint.load_tokenizer(ckpt).sha256 == a.sha256 == checkpoint.tokenizer_hash(ckpt)
    assert checkpoint.load_model(adapter)[0] is not None  # adapter and base agree


def test_a_reward_model_of_another_tokenizer_is_refused(tmp_path, config, tokenizers):
    a, b = tokenizers
    rm = reward(tmp_path, config, b)
    with pytest.raises(checkpoint.CheckpointError) as e:
        load_reward_model(rm, eot_id=EOT_ID, tokenizer=a)
    message = str(e.value)
    assert f"reward model {rm} was trained with another tokenizer" in message
    assert a.path in message and b.sha256[:12] in message and a.sha256[:12] in message  # both named
    assert "palmchat reward --base" in message  # and what to do
    with pytest.raises(checkpoint.CheckpointError, match="value model .* another tokenizer"):
        load_value_model(rm, tokenizer=a)  # a critic initialised from it: the same refusal
    with pytest.raises(checkpoint.CheckpointError, match="critic"):
        checkpoint.check_tokenizer(rm, a, what="critic")


def test_the_same_tokenizer_is_accepted(tmp_path, config, tokenizers):
    a, _ = tokenizers
    rm = reward(tmp_path, config, a)
    model, _ = load_reward_model(rm, eot_id=EOT_ID, tokenizer=Tokenizer.load(a.path))  # loaded again: same hash
    assert isinstance(model, RewardModel)
    assert isinstance(load_value_model(rm, tokenizer=a)[0], ValueModel)
    checkpoint.check_tokenizer(rm, a.sha256)  # a hash works as well as a tokenizer


def _forget_hash(ckpt, drop_tokenizer_file: bool):
    """Make `ckpt` look written before checkpoints recorded their tokenizer."""
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    del config["tokenizer"]
    path.write_text(json.dumps(config))
    if drop_tokenizer_file:
        (ckpt / "tokenizer.json").unlink()


def test_a_legacy_checkpoint_is_compared_by_the_tokenizer_it_carries(tmp_path, config, tokenizers):
    a, b = tokenizers
    other, same = reward(tmp_path, config, b, "other"), reward(tmp_path, config, a, "same")
    for ckpt in (other, same):
        _forget_hash(ckpt, drop_tokenizer_file=False)
    with pytest.raises(checkpoint.CheckpointError, match="another tokenizer"):
        load_reward_model(other, tokenizer=a)
    load_reward_model(same, tokenizer=a)


def test_a_legacy_checkpoint_without_tokenizer_loads_with_a_warning(tmp_path, config, tokenizers):
    a, b = tokenizers
    rm = reward(tmp_path, config, b)
    _forget_hash(rm, drop_tokenizer_file=True)
    with pytest.warns(UserWarning, match="cannot check that it was trained with the tokenizer"):
        model, _ = load_reward_model(rm, tokenizer=a)
    assert isinstance(model, RewardModel)


def test_the_recorded_hash_decides_when_no_tokenizer_file_is_left(tmp_path, config, tokenizers):
    a, b = tokenizers
    rm = reward(tmp_path, config, b)
    (rm / "tokenizer.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="another tokenizer"):
        load_reward_model(rm, tokenizer=a)
    load_reward_model(rm, tokenizer=b)


def test_a_stale_recorded_hash_defers_to_the_tokenizer_file(tmp_path, config, tokenizers):
    """Another version of `tokenizers` may serialize the same tokenizer differently: the file it carries decides."""
    a, _ = tokenizers
    rm = reward(tmp_path, config, a)
    path = rm / "config.json"
    path.write_text(path.read_text().replace(a.sha256, "0" * 64))
    load_reward_model(rm, tokenizer=a)


def test_a_lora_adapter_must_share_its_bases_tokenizer(tmp_path, config, tokenizers):
    a, b = tokenizers
    base = policy(tmp_path, config, a, "base")
    model = Transformer(config)
    add_lora(model, "policy", rank=2)
    adapter = checkpoint.save_checkpoint(tmp_path / "lora", 0, model,
                                         {"model": config.to_dict(), "lora": lora_config(model, "policy"),
                                          "base": str(base)}, b.path, adapter="policy")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_model(adapter)
    assert f"LoRA adapter {adapter} was trained with another tokenizer" in str(e.value)
    assert f"its base {base}" in str(e.value) and f"Point 'base' in {adapter / 'config.json'}" in str(e.value)


def test_a_model_trained_with_another_tokenizer_scores_other_text(tokenizers):
    """Why the check exists: the same ids are different text to the two tokenizers."""
    a, b = tokenizers
    ids = a.encode("the cat sat on the mat")
    assert max(ids) < VOCAB and b.decode(ids) != a.decode(ids)


# -- the server's database: stored ids carry their tokenizer -----------------------------------------------


def test_a_v2_database_is_upgraded_and_its_rows_name_no_tokenizer(tmp_path):
    import sqlite3

    from palmchat.store import SCHEMA_V1, SCHEMA_V2, SCHEMA_VERSION, Store, pack_ids

    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as db:
        for statement in (SCHEMA_V1 + ";" + SCHEMA_V2).split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO conversations VALUES ('conv_1', '', 0, '{}')")
        db.execute("INSERT INTO items VALUES ('msg_0', 'conv_1', 0, '{}', ?)", (pack_ids([3, 300, 5]),))
        db.execute("INSERT INTO responses VALUES ('resp_1', '', 0, '{}', '[]', ?, NULL)", (pack_ids([1, 3, 5]),))
        db.execute("PRAGMA user_version=2")
    store = Store(path)
    try:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        response = store.get_response("", "resp_1")
        assert response["context"] == [1, 3, 5] and response["tokenizer"] is None and response["messages"] is None
        assert store.context_items("conv_1") == [({}, [3, 300, 5], None)]
        store.add_items("", "conv_1", [({"id": "msg_2"}, [3, 5])], tokenizer="abc")
        assert store.context_items("conv_1")[1] == ({"id": "msg_2"}, [3, 5], "abc")
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def test_a_conversations_ids_are_used_only_under_their_tokenizer(tokenizers):
    """Items tagged with the running tokenizer keep their ids (a sampled reply need not be the canonical encoding
    of its text); items of another tokenizer, or stored before items named theirs, are rendered again from text."""
    from types import SimpleNamespace

    from palmchat.serve import schemas as S
    from palmchat.serve.context import conversation_history, previous_history

    a, b = tokenizers
    state = SimpleNamespace(tokenizer=b, tokenizer_sha256=b.sha256)
    user, reply = S.message_item("msg_1", "user", "the cat sat"), S.message_item("msg_2", "assistant", "on the mat")
    blocked = S.message_item("msg_3", "user", "blocked")
    sampled = [b.chat_format.assistant_id] + list(reversed(b.encode("on the mat"))) + [b.chat_format.eot_id]
    assert sampled != b.chat_format.render_turn({"role": "assistant", "content": "on the mat"})
    messages = [{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on the mat"}]
    ids_a = [a.chat_format.render_turn(m) for m in messages]
    for tag in (a.sha256, None):
        ids, history = conversation_history(state, [(user, ids_a[0], tag), (reply, ids_a[1], tag), (blocked, [], tag)])
        assert ids == b.chat_format.render(messages)[0] and history == messages
    ids, _ = conversation_history(state, [(user, ids_a[0], a.sha256), (reply, sampled, b.sha256)])
    assert ids == [b.chat_format.bos_id] + b.chat_format.render_turn(messages[0]) + sampled
    # a response stored before contexts named their tokenizer has no text to render again: its ids are used, as before
    legacy = {"tokenizer": None, "context": ids_a[0], "messages": None}
    assert previous_history(state, legacy, "resp_1") == (ids_a[0], None)
    stored = {"tokenizer": a.sha256, "context": ids_a[0], "messages": messages[:1]}
    assert previous_history(state, stored, "resp_2") == (b.chat_format.render(messages[:1])[0], messages[:1])
