"""`make demo` at toy size: every stage runs in order and report.md states the measured numbers."""

import json

from palmchat.demo import DemoArgs, run_pipeline


def test_quick_demo_writes_the_report(tmp_path):
    run = run_pipeline(DemoArgs(out=str(tmp_path / "demo"), quick=True))
    report = run["report"].read_text()
    for stage in ("| sft |", "| ppo |", "| dpo |", "| grpo |", "Kendall tau", "Best-of-n"):
        assert stage in report
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    for stage in ("sft", "ppo", "dpo", "grpo"):
        metrics = results["stages"][stage]
        assert 0.0 <= metrics["score"] <= 1.0 and 0.0 <= metrics["win_rate"] <= 1.0
    assert (tmp_path / "demo" / "stage_scores.png").stat().st_size > 1000
    assert set(results["best_of_n"]) == {"1", "2"}
