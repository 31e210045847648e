"""Does a policy use the bundled world's tools? Ask it held-out questions a tool answers, run the calls it makes,
and score the call and the final answer.

    world = World(seed)
    questions = world.tool_questions(100, "heldout")
    result = evaluate_tool_use(model, tokenizer, world, questions, seed=0)
    result["right_call"], result["right_answer"], result["both"]

Each question is a conversation offering the world's tools (``palmchat.world.tools.WORLD_TOOLS``, rendered by the
tokenizer's chat format). In each round, every question still open gets one reply, generated for all of them in
batches; the tool calls in a reply are parsed with the format's own call syntax (``chat_format.tool_syntax``,
``parse_tool_calls``), run with ``World.run_tool``, and their results appended as ``tool`` messages; a reply without
a call ends its question. After ``max_rounds`` replies a question ends whatever its last reply did (its calls are
not run). The transcripts are OpenAI chat messages (a call's arguments as the JSON text the model wrote).

Scores (:func:`score_tool_use`, the same function for generated and hand-written transcripts), means over questions:

* ``called``: the policy made at least one call that parses (a name among the tools, arguments as JSON);
* ``right_call``: its first call is the right tool with the right arguments (``palmchat.world.tools.is_right_call``:
  the question's two numbers and operation for the calculator, the person's name for the directory);
* ``right_answer``: the last reply's text is correct by ``World.verify`` on the question (answering without a tool
  counts: this is the answer's correctness, not the tool's);
* ``both``: the right call and the right answer.

Sampling is as ``palmchat.eval.policy`` does it: temperature 1.0 by default (0 = greedy), question i seeded with
``prompt_seed(seed, i)`` (plus the round), so results do not depend on the batch size or the other questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from palmchat.eval.policy import prompt_seed
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.tokenizer.tools import arguments_object, parse_tool_calls
from palmchat.world.tools import TOOL_NAMES, WORLD_TOOLS, is_right_call

__all__ = ["evaluate_tool_use", "score_tool_use", "tool_prompt", "renderable"]


def score_tool_use(world, question: str, transcript: Sequence[dict]) -> dict[str, bool]:
    """Score one question's transcript: the messages after the question (assistant replies with their
    ``tool_calls``, ``tool`` results), as OpenAI writes them. Returns ``called``, ``right_call``, ``right_answer``
    and ``both`` (see the module docstring)."""
    task = world.parse(question)
    if task is None:
        raise ValueError(f"not a world question: {question!r}")
    calls = [call["function"] for m in transcript if m["role"] == "assistant" for call in m.get("tool_calls") or []]
    replies = [m for m in transcript if m["role"] == "assistant"]
    right_call = bool(calls) and is_right_call(task, calls[0]["name"], calls[0]["arguments"])
    final = (replies[-1].get("content") or "") if replies else ""
    right_answer = world.verify(question, final).correct == 1.0
    return {"called": bool(calls), "right_call": right_call, "right_answer": right_answer,
            "both": right_call and right_answer}


def renderable(messages: Sequence[dict]) -> list[dict]:
    """Messages as a chat format renders them: each call's arguments the JSON object their text holds (as chat
    templates write them with ``tojson``), arguments that are no JSON object kept as text."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "function": {**c["function"],
                                                       "arguments": arguments_object(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]}
        out.append(m)
    return out


def _means(scores: Sequence[dict]) -> dict[str, float]:
    return {key: sum(s[key] for s in scores) / len(scores) for key in ("called", "right_call", "right_answer", "both")}


def tool_prompt(chat_format, question: str, transcript: Sequence[dict]) -> list[int]:
    """The ids that ask for the next reply to ``question`` after ``transcript`` (OpenAI messages), the world's
    tools offered: rendered as the SFT conversations of ``World.tool_conversations`` are."""
    return chat_format.render_prompt(renderable([{"role": "user", "content": question}, *transcript]),
                                     tools=WORLD_TOOLS)


def _reply_message(text: str, syntax, round_: int) -> dict:
    """A generated reply as an OpenAI assistant message: its content, and its calls if it made any."""
    content, calls = parse_tool_calls(text, syntax, TOOL_NAMES)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": f"call_{round_}_{c.index}", "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
    return message


@torch.no_grad()
def evaluate_tool_use(model, tokenizer, world, questions: Sequence[str], *, seed: int = 0, temperature: float = 1.0,
                      max_rounds: int = 2, max_new_tokens: int = 64, batch_size: int = 64,
                      dtype: torch.dtype | None = None, n_examples: int = 3) -> dict:
    """Offer the world's tools on each question, let the policy call them for up to ``max_rounds`` replies, and
    score every transcript (see the module docstring). Returns ``n``, ``called``, ``right_call``,
    ``right_answer``, ``both`` (means), ``per_task`` (the same means by task family: arithmetic for the
    calculator, fact for the directory), ``per_question`` (each question's scores) and ``examples`` (the first
    ``n_examples`` transcripts)."""
    questions = list(questions)
    if not questions:
        raise ValueError("evaluate_tool_use: no questions")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    chat_format = tokenizer.chat_format
    if chat_format.tool_syntax is None:
        raise ValueError("this tokenizer's chat format cannot describe tools")
    engine = Engine(model, dtype=dtype)
    context = engine.config.max_seq_len
    transcripts: list[list[dict]] = [[] for _ in questions]
    open_ = list(range(len(questions)))
    training = model.training
    model.eval()
    try:
        for round_ in range(max_rounds):
            prompts = {i: tool_prompt(chat_format, questions[i], transcripts[i]) for i in open_}
            open_ = [i for i in open_ if len(prompts[i]) < context]  # no room for a reply: the question ends here
            params = [engine.clamp_max_new_tokens(prompts[i], SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=chat_format.reply_stop_ids,
                seed=(prompt_seed(seed, i) + round_) % 2**62)) for i in open_]
            still_open = []
            for start in range(0, len(open_), batch_size):
                rows = open_[start:start + batch_size]
                completions = engine.generate([prompts[i] for i in rows], params[start:start + batch_size])
                for i, completion in zip(rows, completions):
                    reply = _reply_message(chat_format.decode_reply(completion.tokens), chat_format.tool_syntax,
                                           round_)
                    transcripts[i].append(reply)
                    if reply.get("tool_calls") and round_ + 1 < max_rounds:
                        transcripts[i] += [{"role": "tool", "tool_call_id": c["id"],
                                            "content": world.run_tool(c["function"]["name"],
                                                                      c["function"]["arguments"])}
                                           for c in reply["tool_calls"]]
                        still_open.append(i)
            open_ = still_open
    finally:
        model.train(training)
    scores = [score_tool_use(world, q, t) for q, t in zip(questions, transcripts)]
    families: dict[str, list[dict]] = {}
    for q, s in zip(questions, scores):
        families.setdefault(world.parse(q).family, []).append(s)
    result = {"n": len(questions), **_means(scores),
              "per_task": {family: _means(s) for family, s in sorted(families.items())},
              "per_question": scores, "temperature": temperature, "seed": seed, "max_rounds": max_rounds}
    result["examples"] = [{"question": q, "transcript": t} for q, t in zip(questions[:n_examples], transcripts)]
    return result
