"""`palmchat eval`: the pairwise win rate against a baseline with an OpenAI-compatible judge (palmchat/eval/judge.py):
its scoring against hand-computed numbers, and a real run with a palmchat server on loopback as the judge."""

import json

import httpx
import pytest
from server_fixtures import Server, build_checkpoints, free_port

from palmchat.cli import main as cli
from palmchat.eval.judge import read_verdict, win_rate


def test_win_rate_by_hand():
    # policy wins both orders, loses both, the orders disagree, one verdict unreadable
    verdicts = [("A", "B"), ("B", "A"), ("A", "A"), (None, "B")]
    report = win_rate(verdicts)
    # scores 1, 0, 0.5, 0.5: mean 0.5; sample variance (0.25 + 0.25) / 3; ci 1.96 * sqrt(1/6) / 2
    assert report["win_rate"] == 0.5 and report["n"] == 4
    assert report["ci95"] == pytest.approx(1.96 * (1 / 6) ** 0.5 / 2)
    assert report["consistent"] == 0.5 and report["unreadable"] == 1
    assert win_rate([("A", "B")] * 3 + [("B", "A")])["win_rate"] == 0.75


def test_a_judge_that_always_names_the_first_reply_gives_an_even_score():
    """Position bias cancels: asking in both orders is the point."""
    report = win_rate([("A", "A")] * 10)
    assert report["win_rate"] == 0.5 and report["consistent"] == 0 and report["ci95"] == 0


@pytest.mark.parametrize("text, verdict", [("A", "A"), ("B", "B"), ("Reply B is better.", "B"),
                                           ("**A**", "A"), ("A or B", None), ("", None), ("Both are bad", None)])
def test_read_verdict(text, verdict):
    assert read_verdict(text) == verdict


@pytest.mark.slow
def test_eval_with_a_palmchat_server_as_the_judge(tmp_path, capsys):
    """Both policies answer, the judge (a real OpenAI-compatible server on loopback) is asked twice per prompt,
    once in each order, and the report holds every verdict and the score they give."""
    policy, _ = build_checkpoints(tmp_path, context=256)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("What pet does Briruul have?",
                                                                          "Add 3 and 4.", "Spell 'cactus'.")))
    judge = Server(policy, tmp_path / "judge.db", "--moderation", "none", log=tmp_path / "judge.log",
                   no_auth=True).start()
    try:
        out = tmp_path / "report.json"
        assert cli(["eval", str(policy), "--baseline", str(policy), "--prompts", str(prompts), "--judge",
                    judge.url + "/v1", "--judge-model", "tiny-chat", "--max-new-tokens", "8", "--out", str(out)]) == 0
        metrics = httpx.get(judge.url + "/metrics").text
    finally:
        judge.stop()
    asked = [line for line in metrics.splitlines()
             if line.startswith("palmchat_http_requests_total") and "/v1/chat/completions" in line]
    assert asked and sum(float(line.rsplit(" ", 1)[1]) for line in asked) == 6  # 3 prompts, both orders
    report = json.loads(out.read_text())
    assert report["n"] == 3 and len(report["rows"]) == 3
    for row in report["rows"]:
        assert len(row["judge"]) == 2 and row["policy"] == row["baseline"]  # the same checkpoint, greedy
        assert row["verdicts"] == [read_verdict(a) for a in row["judge"]]
    assert report["win_rate"] == win_rate([tuple(r["verdicts"]) for r in report["rows"]])["win_rate"]
    assert "win rate" in capsys.readouterr().out


def test_an_unreachable_judge_is_one_line(tmp_path, capsys):
    policy, _ = build_checkpoints(tmp_path, context=256)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert cli(["eval", str(policy), "--baseline", str(policy), "--prompts", str(prompts), "--judge", url,
                "--judge-model", "judge", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert url in err and "Traceback" not in err
