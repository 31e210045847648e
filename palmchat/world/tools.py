"""The bundled world's tools: a calculator for its arithmetic and a directory of its invented people.

Both are OpenAI function tools (``WORLD_TOOLS``, JSON schemas), run by :func:`run_tool` (``World.run_tool``):

* ``calculator`` ``{"expression": "23 + 58"}`` -> ``"81"``: whole numbers with ``+``, ``-``, ``*`` and
  parentheses, read by a small parser (never ``eval``);
* ``lookup_person`` ``{"name": "Zorbo"}`` -> that person's facts in one line, or ``"no such person"``.

A call the model gets wrong (unknown tool, arguments that are not JSON, a missing or mistyped argument, an
expression the calculator does not read) gives an ``"error: ..."`` string, which the model sees as the tool's
result: never an exception.

A tool-use conversation (:func:`tool_conversation`) is a world question, the assistant's call of the right tool
with the right arguments, the tool's result, then the good answer, as the OpenAI chat API writes the messages
(the call's ``arguments`` a JSON string). :func:`expected_call` and :func:`is_right_call` say which call a
question wants; the arithmetic and fact questions (not the towns') are the ones a tool answers
(:func:`uses_tool`).

This module imports nothing of palmchat: ``world`` is a ``World``, ``task`` one of its parsed ``Task`` s.
"""

from __future__ import annotations

import json
import re

__all__ = ["WORLD_TOOLS", "TOOL_NAMES", "NO_SUCH_PERSON", "calculate", "person_facts", "run_tool", "uses_tool",
           "expected_call", "is_right_call", "tool_conversation"]

WORLD_TOOLS = [  # short: a small model reads them in every prompt
    {"type": "function", "function": {
        "name": "calculator", "description": "Whole-number arithmetic with +, - and *.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "lookup_person", "description": "A person's facts from the directory.",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
]
TOOL_NAMES = tuple(t["function"]["name"] for t in WORLD_TOOLS)
NO_SUCH_PERSON = "no such person"
_OPS = {"add": "+", "sub": "-", "mul": "*"}
_TOKEN_RE = re.compile(r"\s*(?:(\d+)|([-+*()]))")
MAX_EXPRESSION = 200  # characters: an expression is a question's arithmetic, not a program


def calculate(expression: str) -> int:
    """The value of ``expression`` (whole numbers, ``+ - *``, parentheses, unary minus, the usual precedence); a
    ValueError saying what is wrong otherwise."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the expression is empty")
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    text = expression.replace("\u00d7", "*").replace("\u2212", "-")
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"cannot read {text[pos:].strip()[:20]!r} (whole numbers with +, - and * only)")
        tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
        pos = m.end()
    value, rest = _sum(tokens)
    if rest:
        raise ValueError(f"unexpected {rest[0]!r}")
    return value


# recursive descent: sum := product (("+" | "-") product)*; product := factor ("*" factor)*;
# factor := number | "-" factor | "(" sum ")"
def _sum(tokens: list) -> tuple[int, list]:
    value, tokens = _product(tokens)
    while tokens and tokens[0] in ("+", "-"):
        op, (right, tokens) = tokens[0], _product(tokens[1:])
        value = value + right if op == "+" else value - right
    return value, tokens


def _product(tokens: list) -> tuple[int, list]:
    value, tokens = _factor(tokens)
    while tokens and tokens[0] == "*":
        right, tokens = _factor(tokens[1:])
        value *= right
    return value, tokens


def _factor(tokens: list) -> tuple[int, list]:
    if not tokens:
        raise ValueError("the expression ends too early")
    head = tokens[0]
    if isinstance(head, int):
        return head, tokens[1:]
    if head == "-":
        value, tokens = _factor(tokens[1:])
        return -value, tokens
    if head == "(":
        value, tokens = _sum(tokens[1:])
        if not tokens or tokens[0] != ")":
            raise ValueError("a parenthesis is not closed")
        return value, tokens[1:]
    raise ValueError(f"unexpected {head!r}")


def person_facts(entity) -> str:
    """A directory entry: ``entity``'s facts in one line, in the words the world's good answers use."""
    e = entity
    return (f"{e.name}: {'an' if e.kind[0] in 'aeiou' else 'a'} {e.kind}, {e.age} years old, lives in {e.town}, "
            f"favorite food {e.food}, favorite color {e.color}, pet {e.pet}.")


def _arguments(arguments) -> dict:
    """A call's arguments as a dict: given as one, or as the JSON text of one (OpenAI's wire form)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ValueError("the arguments are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ValueError("the arguments must be a JSON object")
    return arguments


def _argument(arguments: dict, name: str, tool: str) -> str:
    value = arguments.get(name)
    if not isinstance(value, str) or set(arguments) != {name}:
        raise ValueError(f'{tool} takes {{"{name}": "<text>"}}, got {json.dumps(arguments)[:80]}')
    return value


def run_tool(world, name: str, arguments) -> str:
    """The result of calling tool ``name`` with ``arguments`` (a dict or its JSON text) in ``world``: the text a
    ``tool`` message carries back to the model, ``"error: ..."`` for a call that cannot run."""
    try:
        args = _arguments(arguments)
        if name == "calculator":
            return str(calculate(_argument(args, "expression", name)))
        if name == "lookup_person":
            wanted = _argument(args, "name", name).strip().lower()
            found = next((e for e in world.entities if e.name.lower() == wanted), None)
            return NO_SUCH_PERSON if found is None else person_facts(found)
        raise ValueError(f"there is no tool {name!r} (tools: {', '.join(TOOL_NAMES)})")
    except ValueError as e:
        return f"error: {e}"


def uses_tool(task) -> bool:
    """Whether a tool answers ``task``: arithmetic (the calculator) and facts about people (the directory)."""
    return task.family == "arithmetic" or (task.family == "fact" and task.subtask != "feature")


def expected_call(task) -> tuple[str, dict]:
    """(tool, arguments) of the call that answers ``task`` (one :func:`uses_tool` accepts)."""
    if task.family == "arithmetic":
        return "calculator", {"expression": f"{task.data['a']} {_OPS[task.subtask]} {task.data['b']}"}
    if uses_tool(task):
        return "lookup_person", {"name": task.data["name"]}
    raise ValueError(f"no tool answers {task.prompt!r}")


def is_right_call(task, name: str, arguments) -> bool:
    """Whether calling ``name`` with ``arguments`` (a dict or its JSON text) is the right call for ``task``: the
    right tool, and arguments that ask exactly the question (the question's two numbers and operation, in either
    order where the operation allows it; the person's name, case aside)."""
    want, want_args = expected_call(task)
    if name != want:
        return False
    try:
        args = _arguments(arguments)
        if name == "lookup_person":
            return _argument(args, "name", name).strip().lower() == want_args["name"].lower()
        got = _argument(args, "expression", name).replace("\u00d7", "*").replace("\u2212", "-")
    except ValueError:
        return False
    a, b, op = task.data["a"], task.data["b"], re.escape(_OPS[task.subtask])
    m = re.fullmatch(rf"\s*\(?\s*(\d+)\s*{op}\s*(\d+)\s*\)?\s*", got)
    if m is None:
        return False
    pair = (int(m.group(1)), int(m.group(2)))
    return pair == (a, b) or (task.subtask != "sub" and pair == (b, a))


def tool_conversation(world, task, call_id: str = "call_1") -> list[dict]:
    """The messages of ``task``'s question answered with a tool: user question, assistant call (OpenAI's shape,
    arguments as JSON text), the tool's result, the good answer."""
    name, arguments = expected_call(task)
    return [
        {"role": "user", "content": task.prompt},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": run_tool(world, name, arguments)},
        {"role": "assistant", "content": world.reference(task.prompt)},
    ]
