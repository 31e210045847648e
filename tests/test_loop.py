"""`palmchat loop` at toy size: simulated labellers rank a queue through a real server's HTTP API, a round
retrains the reward model with LoRA, compares it with the served one on held-out rankings, and hot-swaps it
into the running server only when it is better by the margin asked for."""

from __future__ import annotations

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


def test_one_round_end_to_end(tmp_path, capsys):
    from palmchat.cli import main

    policy, reward = build_checkpoints(tmp_path)
    db = tmp_path / "loop.db"
    srv = Server(policy, db, "--reward-model", str(reward), "--moderation", "none",
                 log=tmp_path / "server.log").start()
    try:
        report = demo_round(srv.url, db, tmp_path / "loop", base=str(policy), reward_model=str(reward), prompts=16,
                            labellers=2, k=3, max_tokens=10, min_gain=-1.0, epochs=1.0)
        assert report["labelled"] == {"rankings": 32, "per_labeller": {"sim-0": 16, "sim-1": 16}}
        assert report["agreement"] is not None and 0 <= report["agreement"] <= 1
        assert report["rankings"] == 16 and report["train"] + report["heldout"] == 16
        assert 0 <= report["new_accuracy"] <= 1 and 0 <= report["previous_accuracy"] <= 1
        assert report["promoted"] and report["reloaded"]  # min_gain -1: any new model wins
        champion = (tmp_path / "loop" / "champion").read_text().strip()
        assert champion == report["new"]
        health = httpx.get(srv.url + "/health").json()
        assert health["reward_model"] == champion  # swapped in without a restart
        best = httpx.post(srv.url + "/v1/chat/completions", json={
            "model": "tiny-chat:best-of-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60)
        assert best.status_code == 200, best.text
        round_dir = tmp_path / "loop" / "round-001"
        assert len(load_rankings(round_dir / "train.jsonl")) == report["train"]
        assert json.loads((round_dir / "round.json").read_text())["promoted"]

        # round 2 through the CLI, asking for an impossible gain: evaluated, not promoted, nothing swapped
        code = main(["loop", "--db", str(db), "--out", str(tmp_path / "loop"), "--server", srv.url,
                     "--min-gain", "1.0", "--epochs", "1"])
        assert code == 0, capsys.readouterr().err
        assert "kept the current one" in capsys.readouterr().out
        second = json.loads((tmp_path / "loop" / "round-002" / "round.json").read_text())
        assert second["previous"] == champion and not second["promoted"] and not second["reloaded"]
        assert (tmp_path / "loop" / "champion").read_text().strip() == champion
        assert httpx.get(srv.url + "/health").json()["reward_model"] == champion
    finally:
        srv.stop()
