"""`make demo` at toy size: every stage runs in order and report.md states the measured numbers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
from server_fixtures import free_port

from palmchat.demo import DemoArgs, run_pipeline
from palmchat.world.synthetic import World


def test_quick_demo_writes_the_report(tmp_path):
    run = run_pipeline(DemoArgs(out=str(tmp_path / "demo"), quick=True, tool_use=False, eval_samples=2))
    report = run["report"].read_text()
    for stage in ("16 held-out prompts, 2 replies each", "| sft |", "| ppo |", "| dpo |", "| grpo |", "| rloo |",
                  "| kto |", "Kendall tau", "Best-of-n",
                  "ceiling: two simulated labellers agree"):
        assert stage in report
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    for stage in ("sft", "ppo", "dpo", "grpo", "rloo", "kto"):
        metrics = results["stages"][stage]
        assert metrics["n"] == 2 * 16 and len(metrics["scores"]) == 32
        assert 0.0 <= metrics["score"] <= 1.0 and 0.0 <= metrics["win_rate"] <= 1.0
        assert 0.0 <= metrics["multi_turn_score"] <= 1.0
    assert "## Tool use" not in report and not any("tool_use" in m for m in results["stages"].values())
    # every held-out ranking is one the world can judge, so the reward model is read against its ceiling
    assert 0.5 < results["reward_model"]["labeller_agreement"] <= 1.0
    assert (tmp_path / "demo" / "stage_scores.png").stat().st_size > 1000
    assert set(results["best_of_n"]) == {"1", "2"}
    # the reward model's data includes the SFT model's own samples, ranked by simulated labellers
    sft_rankings = [json.loads(line) for line in (tmp_path / "demo" / "data" / "sft_rankings.jsonl").open()]
    assert sft_rankings and all(sorted(r["ranking"]) == list(range(len(r["responses"]))) for r in sft_rankings)
    # of whole conversations where the prompt was one (a follow-up alone is a question nobody asked)
    world = World(seed=0)
    assert any(isinstance(r["prompt"], list) and len(r["prompt"]) > 1 for r in sft_rankings)
    assert all(world.parse(r["prompt"]) is not None for r in sft_rankings)

    # --no-fresh resumes: finished stages trained with the same arguments are reused; a stage whose checkpoint
    # is gone is retrained, and so is everything trained from it, but nothing else
    checkpoints = run["checkpoints"]
    shutil.rmtree(tmp_path / "demo" / "reward")
    rerun = run_pipeline(DemoArgs(out=str(tmp_path / "demo"), quick=True, tool_use=False, fresh=False))
    minutes = rerun["results"]["settings"]["minutes"]
    for stage in ("sft", "dpo", "grpo"):
        assert rerun["checkpoints"][stage] == checkpoints[stage]
    assert minutes["sft"] < minutes["reward"] and minutes["dpo"] < minutes["ppo"]


@pytest.mark.slow
def test_quick_demo_with_tool_use_reports_it_per_stage(tmp_path):
    """--tool-use: SFT trains on the tool conversations too, and every stage gets a row of tool-use numbers."""
    from palmchat import checkpoint

    run = run_pipeline(DemoArgs(out=str(tmp_path / "demo"), quick=True, tool_use=True))
    sft_data = checkpoint.read_config(run["checkpoints"]["sft"])["train"]["data"]
    assert [os.path.basename(p) for p in sft_data] == ["sft.jsonl", "tool_sft.jsonl"]
    report = run["report"].read_text()
    table = report[report.index("## Tool use"):report.index("## Reward model")]
    stages = run["results"]["stages"]
    for name, metrics in stages.items():
        tools = metrics["tool_use"]
        assert tools["n"] == 16 and 0.0 <= tools["both"] <= min(tools["right_call"], tools["right_answer"]) <= 1.0
        assert tools["right_call"] <= tools["called"]
        assert f"| {name} | {tools['called']:.3f} | {tools['right_call']:.3f} | {tools['right_answer']:.3f} |" in table
    assert f"sft:\n\n```text\nuser: {stages['sft']['tool_use']['examples'][0]['question']}\nassistant: " in table


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_quick_demo_runs_a_feedback_round_then_serves_until_ctrl_c(tmp_path, stop):
    """`make demo` ends by serving: the report (with the feedback round) is written first, the server answers,
    and Ctrl-C (or `kill`) stops everything cleanly, the server included."""
    port = free_port()
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own process group, so that a failing test can still kill the server the demo started
    proc = subprocess.Popen([sys.executable, "-m", "palmchat.cli", "demo", "--quick", "--no-tool-use", "--serve",
                             "--port", str(port), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to stop" in line and "serving" in lines[-2]:
                break
        else:
            pytest.fail("the demo ended before serving:\n" + "".join(lines[-30:]))
        report = (out / "report.md").read_text()
        assert "One round of the human-feedback loop" in report and "rankings of queued candidates" in report
        round_ = json.loads(next((out / "loop").glob("round-*/round.json")).read_text())
        assert round_["rankings"] > 0 and 0 <= round_["new_accuracy"] <= 1
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
        assert health["status"] == "ok"
        proc.send_signal(stop)
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # the server went with it
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the demo and its server are gone already
            pass
        proc.wait()
