"""Write the end-of-pipeline report: ``report.md`` plus PNG plots, from one ``results`` dict.

    path = write_report("runs/demo", results)   # -> runs/demo/report.md (+ stage_scores.png, best_of_n.png)

The ``results`` schema (every key optional; missing values print as "n/a")::

    {
      "title": str,                       # heading; default "palmchat report"
      "stages": {                         # one entry per evaluated policy; rows appear in the order
        "sft":  STAGE, "ppo": STAGE,      # sft, ppo, dpo, grpo, then any other key in insertion order
        "dpo":  STAGE, "grpo": STAGE, ...
      },
      "reward_model": {                   # held-out ranking metrics of the reward model
        "pairwise_accuracy": float, "kendall_tau": float,
        ...                               # any other scalars are listed too (e.g. "n_rankings")
      },
      "best_of_n": {n: BON, ...},         # n = 1, 4, 16 (int or str keys, as after a JSON round trip)
      "best_of_n_policy": str,            # which policy best-of-n sampled from (e.g. "sft")
      "plots": {caption: path, ...}       # training-curve PNGs, paths relative to out_dir
               | [path, ...],             #   (absolute paths are rewritten relative to out_dir)
      "settings": {key: value, ...},      # run settings, printed as a table (values JSON-encoded)
      "wall_time_s": float,               # the whole run's wall time
    }

    STAGE = palmchat.eval.evaluate_policy(...) output: "correct", "style", "score", "reward", "win_rate"
            (vs SFT's per-prompt scores), "kl" (to the reference), "length", "n", "per_task" {family: score},
            "examples" [{"prompt", "reply", "verdict": {"task", "correct", "style", "score", ...}}, ...],
            optionally "tool_use": palmchat.eval.tool_use.evaluate_tool_use(...) output ("called", "right_call",
            "right_answer", "both", "n", "temperature", "max_rounds")
    BON   = palmchat.eval.evaluate_best_of_n(...)[n]: "score", "correct", "style", "reward", "oracle_score"

Written files (each written atomically: a temporary file in out_dir, then ``os.replace``):

* ``report.md``       -- tables, embedded plots, examples, settings;
* ``stage_scores.png`` -- verifier score and correctness per stage (when there are stages);
* ``best_of_n.png``    -- best-of-n verifier score vs n (when best_of_n is given).

The report prints measured numbers only; it draws no conclusions from them.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from pathlib import Path

from palmchat.utils.atomic import atomic_path, atomic_write

__all__ = ["write_report", "STAGE_ORDER", "STAGE_PLOT", "BEST_OF_N_PLOT", "KL_PLOT", "REPORT_FILE"]

STAGE_ORDER = ("sft", "ppo", "dpo", "rpo", "ipo", "grpo", "rloo", "kto")
REPORT_FILE = "report.md"
STAGE_PLOT = "stage_scores.png"
BEST_OF_N_PLOT = "best_of_n.png"
KL_PLOT = "score_vs_kl.png"
N_EXAMPLES = 3

# (column header, key in a STAGE dict, decimals)
_STAGE_COLUMNS = (
    ("correctness", "correct", 3),
    ("style", "style", 3),
    ("verifier score", "score", 3),
    ("verifier score, asked as a later turn", "multi_turn_score", 3),
    ("reward-model score", "reward", 3),
    ("win rate vs SFT", "win_rate", 3),
    ("KL to reference", "kl", 4),
    ("mean length (tokens)", "length", 1),
)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _num(x, decimals: int = 3) -> str:
    if isinstance(x, bool):
        return str(x)
    if not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{decimals}f}"


def _cell(x) -> str:
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _printable(text: str) -> str:
    """Control characters other than newline and tab (a random model emits any byte) as escapes."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ch.encode("unicode_escape").decode()
                   for ch in text)


def _fenced(text: str) -> list[str]:
    text = _printable(text)
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", *text.split("\n"), fence]


def _tool_turn(message: dict) -> str:
    """One message of a tool-use transcript on one line: its role, its text, its calls."""
    calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in message.get("tool_calls") or []]
    return f"{message.get('role')}: " + " ".join(filter(None, [message.get("content") or "", *calls]))


def _ordered_stages(stages: dict) -> list[str]:
    return [s for s in STAGE_ORDER if s in stages] + [s for s in stages if s not in STAGE_ORDER]


def _best_of_n_rows(bon: dict) -> list[tuple[int, dict]]:
    rows = []
    for k, v in bon.items():
        try:
            n = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"results['best_of_n'] keys must be sample counts n, got {k!r}") from None
        rows.append((n, v if isinstance(v, dict) else {}))
    return sorted(rows)


def _relative(path, out_dir: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        return Path(os.path.relpath(p, out_dir)).as_posix()
    return p.as_posix()


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _figure(size=(7, 4)):
    # a bare Figure on the Agg canvas: no pyplot, so no global backend state and nothing to close
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _value(d: dict, key: str) -> float:
    x = d.get(key)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def _plot_stages(stages: dict, names: list[str], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.38
    xs = range(len(names))
    for offset, key, label in ((-width / 2, "score", "verifier score"), (width / 2, "correct", "correctness")):
        values = [_value(stages[s], key) for s in names]
        bars = ax.bar([x + offset for x in xs], [0 if math.isnan(v) else v for v in values], width, label=label)
        for bar, v in zip(bars, values):
            ax.annotate(_num(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.25)  # room for the legend above bars near 1
    ax.set_ylabel("mean over held-out prompts")
    ax.set_title("verifier score and correctness per stage")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_score_vs_kl(stages: dict, names: list[str], path: Path) -> None:
    """Each policy's held-out score against its KL to the reference: methods compared per nat spent, not only at
    their defaults."""
    fig = _figure()
    ax = fig.add_subplot()
    for s in names:
        kl, score = _value(stages[s], "kl"), _value(stages[s], "score")
        if s == "sft" and math.isnan(kl):
            kl = 0.0
        if not (math.isnan(kl) or math.isnan(score)):
            ax.scatter([kl], [score])
            ax.annotate(s, (kl, score), xytext=(4, 4), textcoords="offset points", fontsize=9)
    ax.set_xlabel("KL to the reference (nats per reply)")
    ax.set_ylabel("held-out verifier score")
    ax.set_title("score against KL to the SFT model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_best_of_n(rows: list[tuple[int, dict]], policy: str | None, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    ns = [n for n, _ in rows]
    for key, label in (("score", "verifier score of the reward model's pick"), ("correct", "correctness"),
                       ("oracle_score", "best verifier score among the n")):
        values = [_value(d, key) for _, d in rows]
        if not all(math.isnan(v) for v in values):
            ax.plot(ns, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("n (samples per prompt)")
    ax.set_ylim(0, 1.05)
    ax.set_title("best-of-n" + (f" (samples from {policy})" if policy else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def write_report(out_dir, results: dict) -> Path:
    """Write ``out_dir/report.md`` and its PNG plots from ``results`` (schema: module docstring); returns
    the report's path."""
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    stages = results.get("stages") or {}
    if not isinstance(stages, dict):
        raise TypeError("results['stages'] must be a dict {stage name: evaluate_policy output}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _ordered_stages(stages)
    lines = [f"# {results.get('title', 'palmchat report')}", ""]

    wall = results.get("wall_time_s")
    if isinstance(wall, (int, float)):
        lines += [f"Wall time: {wall:.1f} s ({wall / 60:.1f} min).", ""]

    # -- policies
    lines += ["## Policies on held-out prompts", ""]
    if names:
        n_prompts = sorted({stages[s].get("n") for s in names if isinstance(stages[s].get("n"), int)})
        temps = sorted({stages[s].get("temperature") for s in names if stages[s].get("temperature") is not None})
        samples = (results.get("settings") or {}).get("eval_samples", 1)
        what = "Means over " + (f"{'/'.join(str(n // samples) for n in n_prompts)} " if n_prompts else "") + \
            "held-out prompts"
        each = "one reply" if samples == 1 else f"{samples} replies"
        what += f", {each} each sampled at temperature {'/'.join(map(str, temps))}." if temps else "."
        lines += [what + " Correctness, style and verifier score come from the world's verifier; "
                  "win rate vs SFT is per prompt (win 1, tie 0.5, loss 0) on the same prompts; "
                  "KL to reference is the summed per-token log-ratio on the sampled replies (k1 estimator).", ""]
        lines += _table(["stage"] + [c[0] for c in _STAGE_COLUMNS],
                        [[s] + [_num(stages[s].get(key), d) for _, key, d in _STAGE_COLUMNS] for s in names])
        families = sorted({f for s in names for f in (stages[s].get("per_task") or {})})
        if families:
            lines += ["Verifier score by task family:", ""]
            lines += _table(["stage"] + families,
                            [[s] + [_num((stages[s].get("per_task") or {}).get(f)) for f in families] for s in names])
        _plot_stages(stages, names, out_dir / STAGE_PLOT)
        lines += [f"![verifier score per stage]({STAGE_PLOT})", ""]
        if sum(isinstance(stages[s].get("kl"), (int, float)) for s in names) >= 2:
            _plot_score_vs_kl(stages, names, out_dir / KL_PLOT)
            lines += ["Held-out verifier score against KL to the SFT model, per method:", "",
                      f"![score against KL]({KL_PLOT})", ""]
    else:
        lines += ["No stages were evaluated.", ""]

    # -- tool use
    with_tools = [s for s in names if isinstance(stages[s].get("tool_use"), dict)]
    if with_tools:
        tools = [stages[s]["tool_use"] for s in with_tools]
        counts = sorted({t.get("n") for t in tools if isinstance(t.get("n"), int)})
        temps = sorted({t.get("temperature") for t in tools if t.get("temperature") is not None})
        asked = "asked with the world's tools offered"
        asked += f", {'/'.join(map(str, counts))} questions" if counts else ""
        asked += f", sampled at temperature {'/'.join(map(str, temps))}" if temps else ""
        lines += ["## Tool use", "",
                  f"Held-out questions a tool answers (arithmetic: the calculator; facts about people: the directory), "
                  f"{asked}. The calls a policy makes are run and their results shown to it before its next reply. "
                  "Right call: its first call is the right tool with the right arguments; right answer: the verifier "
                  "finds its last reply correct; both: the two together.", ""]
        lines += _table(["stage", "made a call", "right call", "right answer", "both"],
                        [[s] + [_num(t.get(key)) for key in ("called", "right_call", "right_answer", "both")]
                         for s, t in zip(with_tools, tools)])
        shown = [(s, t["examples"][0]) for s, t in zip(with_tools, tools) if t.get("examples")]
        if shown:
            lines += ["The first question's transcript per stage (a call as `name(arguments)`):", ""]
        for s, example in shown:
            lines += [f"{s}:", ""] + _fenced("\n".join([f"user: {example.get('question', '')}"] + [
                _tool_turn(m) for m in example.get("transcript", [])])) + [""]

    # -- reward model
    rm = results.get("reward_model")
    if rm:
        lines += ["## Reward model", "", "Held-out rankings.", ""]
        rows = [["pairwise accuracy", _num(rm.get("pairwise_accuracy"))], ["Kendall tau", _num(rm.get("kendall_tau"))]]
        ceilings = {"labeller_agreement": "ceiling: two simulated labellers agree on the same pairs",
                    "verifier_accuracy": "ceiling: the noise-free verifier's accuracy on the labels"}
        rows += [[label, _num(rm[key])] for key, label in ceilings.items() if key in rm]
        rows += [[k, _num(v) if isinstance(v, (int, float)) else v] for k, v in rm.items()
                 if k not in ("pairwise_accuracy", "kendall_tau", *ceilings) and isinstance(v, (int, float, str))]
        lines += _table(["metric", "value"], rows)

    # -- best of n
    bon = results.get("best_of_n")
    if bon:
        rows = _best_of_n_rows(bon)
        policy = results.get("best_of_n_policy")
        lines += ["## Best-of-n", "",
                  f"n replies sampled per prompt{f' from {policy}' if policy else ''}; the reward model picks one. "
                  "Oracle: the highest verifier score among the n.", ""]
        lines += _table(["n", "verifier score", "correctness", "style", "reward-model score", "oracle score"],
                        [[str(n), _num(d.get("score")), _num(d.get("correct")), _num(d.get("style")),
                          _num(d.get("reward")), _num(d.get("oracle_score"))] for n, d in rows])
        _plot_best_of_n(rows, policy, out_dir / BEST_OF_N_PLOT)
        lines += [f"![best-of-n score vs n]({BEST_OF_N_PLOT})", ""]

    # -- training curves
    plots = results.get("plots")
    if plots:
        items = list(plots.items()) if isinstance(plots, dict) else [(Path(p).stem, p) for p in plots]
        lines += ["## Training curves", ""]
        for caption, p in items:
            rel = _relative(p, out_dir)
            missing = "" if (out_dir / rel).is_file() else " (file not found when the report was written)"
            lines += [f"### {caption}", "", f"![{caption}]({rel})", "", f"[{rel}]({rel}){missing}", ""]

    # -- examples
    with_examples = [s for s in names if stages[s].get("examples")]
    if with_examples:
        lines += ["## Example replies", "", "The first prompts of the evaluation set, one sampled reply each.", ""]
        for s in with_examples:
            lines += [f"### {s}", ""]
            for i, ex in enumerate(stages[s]["examples"][:N_EXAMPLES], 1):
                v = ex.get("verdict") or {}
                facts = [f"task {v.get('task', 'n/a')}", f"correct {_num(v.get('correct'), 0)}",
                         f"style {_num(v.get('style'))}", f"score {_num(v.get('score'))}"]
                if "reward" in ex:
                    facts.append(f"reward {_num(ex['reward'])}")
                if "finish_reason" in ex:
                    facts.append(f"finish {ex['finish_reason']}")
                lines += [f"{i}. " + ", ".join(facts), ""]
                prompt = ex.get("prompt", "")
                turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                conversation = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in turns)
                lines += ["   " + line for line in _fenced(f"{conversation}\nassistant: {ex.get('reply', '')}")]
                lines += [""]

    # -- settings
    settings = dict(results.get("settings") or {})
    if settings or isinstance(wall, (int, float)):
        lines += ["## Settings", ""]
        rows = [[k, v if isinstance(v, str) else json.dumps(v, default=str)] for k, v in settings.items()]
        if isinstance(wall, (int, float)):
            rows.append(["wall time (s)", f"{wall:.1f}"])
        lines += _table(["setting", "value"], rows)

    path = out_dir / REPORT_FILE
    atomic_write(path, "\n".join(lines).rstrip() + "\n")
    return path


