"""`palmchat loop` at toy size: simulated labellers rank a queue through a real server's HTTP API, a round
retrains the reward model with LoRA, compares it with the served one on held-out rankings, and hot-swaps it
into the running server only when it is better by the margin asked for. The same round trains the policy (DPO on
the rankings, KTO on the thumbs, LoRA adapters), measures it against the served one on the held-out rankings and
hot-swaps the better one; report.md tells both outcomes."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from server_fixtures import Server, build_checkpoints

from palmchat.data.chat import load_rankings
from palmchat.feedback.round import split_rankings
from palmchat.feedback.simulated import demo_round

pytestmark = pytest.mark.timeout(240)


def test_split_keeps_a_prompt_on_one_side():
    records = [{"prompt": f"p{i % 7}", "responses": ["a", "b"], "ranking": [0, 1]} for i in range(40)]
    train, heldout = split_rankings(records, 0.3)
    assert heldout and train and len(train) + len(heldout) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert split_rankings(records, 0.3) == (train, heldout)  # the same split every round
    few = records[:3]
    assert len(split_rankings(few, 0.01)[1]) >= 1  # at least one held out


def test_a_round_needs_enough_rankings(tmp_path, capsys):
    from palmchat.cli import main
    from palmchat.store import Store

    Store(tmp_path / "empty.db").close()
    assert main(["loop", "--db", str(tmp_path / "empty.db"), "--base", "runs/sft", "--out", str(tmp_path / "l")]) == 2
    assert "a round needs at least 3" in capsys.readouterr().err
    assert main(["loop", "--db", str(tmp_path / "none.db"), "--base", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def add_thumbs(db):
    """Thumbs up and down on a few prompts, as the chat page stores them."""
    from palmchat.store import Store

    store = Store(db)
    for i in range(12):
        prompt = [{"role": "user", "content": f"What is {i} + 2?"}]
        for j, (reply, rating) in enumerate(((f"{i} + 2 = {i + 2}.", 1), (f"Figure it out yourself, {i}.", -1))):
            store.put_feedback({"id": f"fb{i}-{j}", "owner": "", "conversation_id": f"c{i}", "item_id": f"i{i}-{j}",
                                "rating": rating, "comment": "", "prompt": prompt, "reply": reply,
                                "created_at": float(2 * i + j)})
    store.close()


def greedy(url, text="hi"):
    reply = httpx.post(url + "/v1/chat/completions", json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0},
        timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def weights_sha256(path) -> str:
    """The sha256 of a checkpoint's weight files, as /health names the reward model it serves."""
    from palmchat.checkpoint import resolve

    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(resolve(path).glob("*.safetensors")))).hexdigest()


def test_one_round_end_to_end(tmp_path, capsys):
    from palmchat.cli import main

    policy, reward = build_checkpoints(tmp_path)
    db = tmp_path / "loop.db"
    srv = Server(policy, db, "--reward-model", str(reward), "--moderation", "none",
                 log=tmp_path / "server.log", no_auth=True).start()
    add_thumbs(db)
    try:
        before = greedy(srv.url)
        report = demo_round(srv.url, db, tmp_path / "loop", base=str(policy), reward_model=str(reward), prompts=16,
                            labellers=2, k=3, max_tokens=10, min_gain=-1.0, epochs=1.0)
        assert report["labelled"] == {"rankings": 32, "per_labeller": {"sim-0": 16, "sim-1": 16}}
        assert report["agreement"] is not None and 0 <= report["agreement"] <= 1
        # 16 labelled tasks, and 12 thumbs pairs (one up and one down on a prompt) as K = 2 rankings
        assert report["rankings"] == 28 and report["train"] + report["heldout"] == 28
        assert 0 <= report["new_accuracy"] <= 1 and 0 <= report["previous_accuracy"] <= 1
        assert report["promoted"] and report["reloaded"]  # min_gain -1: any new model wins
        champion = (tmp_path / "loop" / "champion").read_text().strip()
        assert champion == report["new"]
        health = httpx.get(srv.url + "/health").json()
        assert health["reward_model"]["sha256"] == weights_sha256(champion)  # swapped in without a restart
        assert str(tmp_path) not in json.dumps(health)  # no file paths
        best = httpx.post(srv.url + "/v1/chat/completions", json={
            "model": "tiny-chat:best-of-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60)
        assert best.status_code == 200, best.text
        round_dir = tmp_path / "loop" / "round-001"
        assert len(load_rankings(round_dir / "train.jsonl")) == report["train"]
        assert json.loads((round_dir / "round.json").read_text())["promoted"]
        # the policy: a DPO and a KTO adapter on the served policy, measured on the held-out rankings against it
        # (the base itself: 0.5); min_gain -1: the best is promoted and served under the same model id
        served = report["policy"]
        assert served["current_accuracy"] == 0.5 and set(served["candidates"]) == {"dpo", "kto"}, served
        assert all(0 <= c["accuracy"] <= 1 for c in served["candidates"].values())
        assert served["promoted"] and served["reloaded"]
        promoted = served["candidates"][served["best"]]["path"]
        assert (tmp_path / "loop" / "policy_champion").read_text().strip() == promoted
        text = (round_dir / "report.md").read_text()
        assert "## Reward model" in text and "## Policy" in text and text.count("**promoted**") == 2
        greedy(srv.url)  # the swapped-in policy answers

        # round 2 through the CLI, asking for an impossible gain: evaluated, not promoted, nothing swapped
        code = main(["loop", "--db", str(db), "--out", str(tmp_path / "loop"), "--server", srv.url,
                     "--min-gain", "1.0", "--epochs", "1"])
        assert code == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "kept the current one" in printed and "kept the current policy" in printed
        second = json.loads((tmp_path / "loop" / "round-002" / "round.json").read_text())
        assert second["previous"] == champion and not second["promoted"] and not second["reloaded"]
        assert (tmp_path / "loop" / "champion").read_text().strip() == champion
        assert httpx.get(srv.url + "/health").json()["reward_model"]["sha256"] == weights_sha256(champion)
        assert not second["policy"]["promoted"] and second["policy"]["current"] == promoted
        assert (tmp_path / "loop" / "policy_champion").read_text().strip() == promoted
        assert "**kept** the current one" in (tmp_path / "loop" / "round-002" / "report.md").read_text()
    finally:
        srv.stop()
    assert before  # the server answered before the swap too


def test_admin_reload_swaps_the_served_policy(tmp_path):
    """POST /v1/admin/reload {"policy": ...} serves other weights under the same model id, at once; a folder that
    does not load is refused and changes nothing."""
    import torch

    from palmchat import checkpoint

    policy, _ = build_checkpoints(tmp_path)
    model, config, ckpt = checkpoint.load_model(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    other = checkpoint.save_checkpoint(tmp_path / "other", 0, model, config, ckpt / checkpoint.TOKENIZER_FILE)
    srv = Server(policy, tmp_path / "a.db", "--moderation", "none", log=tmp_path / "server.log", no_auth=True).start()
    try:
        before = greedy(srv.url)
        bad = httpx.post(srv.url + "/v1/admin/reload", json={"policy": str(tmp_path / "nothing")}, timeout=60)
        assert bad.status_code == 400 and "could not load" in bad.text
        assert greedy(srv.url) == before
        swapped = httpx.post(srv.url + "/v1/admin/reload", json={"policy": str(other)}, timeout=60)
        assert swapped.status_code == 200 and swapped.json()["policy"] == str(other), swapped.text
        assert greedy(srv.url) != before
        httpx.post(srv.url + "/v1/admin/reload", json={"policy": str(policy)}, timeout=60).raise_for_status()
        assert greedy(srv.url) == before
        assert httpx.post(srv.url + "/v1/admin/reload", json={}, timeout=60).status_code == 400
    finally:
        srv.stop()
