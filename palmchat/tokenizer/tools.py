"""Tool calls in a model's reply: how each chat format writes a call, and the parser that finds calls in a reply's
text, whole or as it streams.

A format writes a call in one of three ways (its :class:`CallSyntax`), chosen from the format at load
(:func:`call_syntax`):

* ``hermes``: Hermes-style tags, as Qwen2.5 and Qwen3 templates write them::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* ``llama3_json``: Llama 3.1's JSON form, the reply being the call itself (one per reply; a leading
  ``<|python_tag|>`` is allowed)::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

* ``palmchat``: palmchat's own format, the Hermes tags without their newlines (chat_format.py documents the whole
  tool protocol)::

      <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

:class:`ToolCallParser` reads a reply as it arrives: ``feed(text)`` returns the events that text completes (a piece
of content, a call's start with its name, a piece of a call's arguments), holding back a tail that may be the start
of a call, so a stream never shows a tag as content. A call is recognised once its body reads ``{"name": "<one of
the offered tools>", "arguments": `` (key order as the templates write it; a body in another key order is taken
whole when its closing tag arrives, if it is valid JSON); its arguments are then streamed as they come, up to the
end of their JSON value. Anything else, a body that is not such an object or names no offered tool, is content:
a malformed call from the model reaches the client as text, never as an error. A call whose arguments are cut off
(the reply hit its token limit) keeps the arguments written so far, as OpenAI's non-strict calls may carry
arguments that are not valid JSON. Text after the last call is dropped, as vLLM's parsers drop it (a model ends its
turn there; an untrained one may ramble on).

A format names its syntax as ``chat_format.tool_syntax`` (None: it cannot describe tools).

This module imports neither torch nor the rest of palmchat.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["CallSyntax", "SYNTAXES", "arguments_object", "call_syntax", "check_tools", "ToolCall", "ToolCallParser",
           "parse_tool_calls"]


def arguments_object(arguments):
    """A call's arguments as chat templates write them (with ``tojson``): the JSON object a string holds (OpenAI's
    wire form), else the value unchanged (already an object, or text that is no JSON object)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def check_tools(tools: object) -> None:
    """A ValueError unless ``tools`` is a list of dicts (the JSON-schema tools a chat format renders)."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not all(
            isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be a list of JSON-schema dicts")


@dataclass(frozen=True)
class CallSyntax:
    """How a format writes one tool call: ``open + {"name": NAME, "<arguments_key>": ARGS} + close``, with
    ``head``/``tail`` the exact whitespace the format's rendering puts inside the tags."""

    name: str
    open: str  # "" for a reply that is a bare JSON call
    close: str
    arguments_key: str
    head: str = ""  # between open and the JSON object
    tail: str = ""  # between the JSON object and close

    def opening(self, function: str) -> str:
        """The text of a call up to where its arguments start: what a forced call puts into the prompt."""
        return f'{self.open}{self.head}{{"name": {json.dumps(function, ensure_ascii=False)}, "{self.arguments_key}": '

    def render(self, function: str, arguments: str) -> str:
        """A whole call with ``arguments`` (JSON text), as the format renders it."""
        return f"{self.opening(function)}{arguments}}}{self.tail}{self.close}"


SYNTAXES = {
    "hermes": CallSyntax("hermes", "<tool_call>", "</tool_call>", "arguments", head="\n", tail="\n"),
    "llama3_json": CallSyntax("llama3_json", "", "", "parameters"),
    "palmchat": CallSyntax("palmchat", "<tool_call>", "</tool_call>", "arguments"),
}


def call_syntax(template: str) -> CallSyntax | None:
    """The syntax a Hugging Face chat template renders assistant tool calls in, or None when it renders none."""
    if "<tool_call>" in template:
        return SYNTAXES["hermes"]
    if '"parameters": ' in template and "tool_calls" in template:
        return SYNTAXES["llama3_json"]
    return None


@dataclass
class ToolCall:
    name: str
    arguments: str = ""  # JSON text as the model wrote it
    index: int = 0
    ended: bool = False  # the call's JSON object ended (False: the reply was cut inside it)


@dataclass
class _Scan:
    """Where the parser is inside a call's JSON arguments value."""

    depth: int = 0
    in_string: bool = False
    escape: bool = False
    started: bool = False
    kind: str = ""  # "{", '"', or "other" (not a JSON object: read up to the close tag)


# the parser's modes: plain content (looking for a call's open tag), a call's start, a tagged call in another key
# order (whole at its close tag), a bare JSON reply in another key order (whole at the end), a call's arguments,
# what closes a call, the separators between bare JSON calls, a reply that holds no call, the end
CONTENT, HEAD, WHOLE, WHOLE_JSON, ARGUMENTS, AFTER, SEPARATOR, TEXT, DONE = (
    "content", "head", "whole", "whole_json", "arguments", "after", "separator", "text", "done")
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1 may open a call with it
MAX_NAME = 64  # a function name's longest (OpenAI's limit): a longer one is no call
WHITESPACE = " \t\r\n"


@dataclass
class ToolCallParser:
    """Finds the tool calls of one reply as its text arrives (see the module docstring).

    ``feed`` and ``finish`` return events: ``("content", text)``, ``("call", index, name)`` when a call starts,
    ``("arguments", index, text)`` for a piece of its arguments. ``tools`` are the names a call may have (empty:
    any), ``max_calls`` how many calls a reply may make. ``content`` and ``calls`` hold everything found so far.
    """

    syntax: CallSyntax
    tools: Collection[str] = ()
    max_calls: int | None = None  # 1: the reply ends with its first call (what follows is dropped)
    text: str = ""
    pos: int = 0  # text[:pos] is settled
    mode: str = CONTENT
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    scan: _Scan = field(default_factory=_Scan)
    searched: int = 0  # WHOLE: where in the held call the next search for its close tag starts

    def __post_init__(self):
        if not self.syntax.open:  # a bare JSON call: only at the start of the reply
            self.mode = HEAD

    def feed(self, text: str) -> list[tuple]:
        self.text += text
        events: list[tuple] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[tuple]:
        """The reply ended: settle what was held back."""
        events: list[tuple] = []
        while self._step(events, final=True):
            pass
        if self.mode in (HEAD, WHOLE, WHOLE_JSON, CONTENT, TEXT):
            self._content(events, self.text[self.pos:])
        self.pos, self.mode = len(self.text), DONE
        return events

    # -------------------------------------------------------------------------------------------- steps
    def _content(self, events: list, text: str) -> None:
        if text and not self.calls:  # text after a call is dropped
            self.content += text
            events.append(("content", text))

    def _step(self, events: list, final: bool) -> bool:
        """Advance as far as the text allows; True when the mode changed (call again)."""
        if self.mode in (CONTENT, SEPARATOR) and self.max_calls is not None and len(self.calls) >= self.max_calls:
            self.pos, self.mode = len(self.text), DONE
        rest = self.text[self.pos:]
        if self.mode == CONTENT:
            at = rest.find(self.syntax.open)
            if at < 0:
                hold = 0 if final else _partial_suffix(rest, self.syntax.open)
                self._content(events, rest[:len(rest) - hold])
                self.pos += len(rest) - hold
                return False
            self._content(events, rest[:at])
            self.pos += at
            self.mode = HEAD
            return True
        if self.mode == TEXT:
            self._content(events, rest)
            self.pos += len(rest)
            return False
        if self.mode == HEAD:
            if not self.syntax.open:  # a bare JSON call: the reply's first non-blank character opens it
                stripped = rest.lstrip(WHITESPACE)
                if stripped.startswith(PYTHON_TAG):
                    self.pos += len(rest) - len(stripped) + len(PYTHON_TAG)
                    return True
                if not stripped or (PYTHON_TAG.startswith(stripped) and not self.calls):
                    if final:
                        self.mode = TEXT
                        return True
                    return False
                if not stripped.startswith("{"):
                    self.mode = TEXT
                    return True
            match = _match_head(rest, self.syntax)
            if match == "partial" and not final:
                return False
            if isinstance(match, tuple) and (not self.tools or match[0] in self.tools):
                name, end = match
                self.calls.append(ToolCall(name, "", len(self.calls)))
                events.append(("call", len(self.calls) - 1, name))
                self.pos += end
                self.scan = _Scan()
                self.mode = ARGUMENTS
                return True
            self.mode = WHOLE if self.syntax.open else WHOLE_JSON
            self.searched = 0
            return True
        if self.mode == WHOLE_JSON:  # all of the rest is one call in another key order, or content
            if not final:
                return False
            call = _call_of_json(rest.strip(), self.syntax, self.tools)
            if call is not None:
                self._add_whole(events, call)
                self.pos = len(self.text)
            self.mode = TEXT
            return True
        if self.mode == WHOLE:  # a tagged call in another key order: taken when it closes, if it is valid JSON
            end = rest.find(self.syntax.close, self.searched)
            if end < 0:
                self.searched = max(0, len(rest) - len(self.syntax.close))  # each feed searches only what is new
                return False if not final else self._settle_whole(events, rest, len(rest))
            return self._settle_whole(events, rest[len(self.syntax.open):end], end + len(self.syntax.close))
        if self.mode == ARGUMENTS:
            used, done = self._scan_arguments(rest)
            if used:
                piece = rest[:used]
                if not self.calls[-1].arguments:
                    piece = piece.lstrip(WHITESPACE)
                if piece:
                    self.calls[-1].arguments += piece
                    events.append(("arguments", len(self.calls) - 1, piece))
                self.pos += used
            if done:
                self.mode = AFTER
                return True
            return False
        if self.mode == AFTER:  # the object's "}", then the close tag; then maybe another call
            stripped = rest.lstrip(WHITESPACE)
            if stripped.startswith("}"):
                self.calls[-1].ended = True
                after = stripped[1:].lstrip(WHITESPACE) if self.syntax.close else stripped[1:]
                if after.startswith(self.syntax.close):
                    self.pos += len(rest) - len(after) + len(self.syntax.close)
                    self.mode = CONTENT if self.syntax.open else SEPARATOR
                    return True
            if not final and _could_close(rest, "}" + self.syntax.close):
                return False
            self.pos, self.mode = len(self.text), DONE  # a call not closed as written: what follows is dropped
            return False
        if self.mode == SEPARATOR:  # Llama's calls may follow one another, separated by ";"
            skip = len(rest) - len(rest.lstrip(WHITESPACE + ";"))
            self.pos += skip
            if self.pos < len(self.text):
                self.mode = HEAD
                return True
            return False
        return False

    def _settle_whole(self, events: list, body: str, consumed: int) -> bool:
        call = _call_of_json(body.strip(), self.syntax, self.tools)
        if call is None:
            self._content(events, self.text[self.pos:self.pos + consumed])
        else:
            self._add_whole(events, call)
        self.pos += consumed
        self.mode = CONTENT
        return True

    def _add_whole(self, events: list, call: tuple[str, str]) -> None:
        name, arguments = call
        self.calls.append(ToolCall(name, arguments, len(self.calls), ended=True))
        events.append(("call", len(self.calls) - 1, name))
        events.append(("arguments", len(self.calls) - 1, arguments))

    def _scan_arguments(self, rest: str) -> tuple[int, bool]:
        """(characters of ``rest`` that belong to the arguments, whether their value ended)."""
        s = self.scan
        for k, ch in enumerate(rest):
            if not s.started:
                if ch in WHITESPACE:
                    continue
                s.started, s.kind = True, ch if ch in '{"' else "other"
                if s.kind == "{":
                    s.depth = 1
                elif s.kind == '"':
                    s.in_string = True
                else:  # not JSON: up to where the call closes
                    return self._scan_other(rest, k)
                continue
            if s.kind == "other":
                return self._scan_other(rest, k)
            if s.in_string:
                if s.escape:
                    s.escape = False
                elif ch == "\\":
                    s.escape = True
                elif ch == '"':
                    s.in_string = False
                    if s.kind == '"':
                        return k + 1, True
                continue
            if ch == '"':
                s.in_string = True
            elif ch in "{[":
                s.depth += 1
            elif ch in "}]":
                s.depth -= 1
                if s.depth == 0:
                    return k + 1, True
        return len(rest), False

    def _scan_other(self, rest: str, start: int) -> tuple[int, bool]:
        """Arguments that are not a JSON value: everything up to a "}" that the close tag follows (or the end)."""
        if not self.syntax.close:
            return len(rest), False
        end = re.compile(r"\}\s*" + re.escape(self.syntax.close)).search(rest, start)
        if end:
            return end.start(), True
        brace = rest.rfind("}", start)
        if brace >= 0 and _could_close(rest[brace:], "}" + self.syntax.close):
            return brace, False
        return len(rest) - _partial_suffix(rest, self.syntax.close), False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the start of ``tag`` (held back: it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _could_close(rest: str, closing: str) -> bool:
    """Whether ``rest`` (whitespace aside) may still become ``closing``."""
    squeezed = "".join(rest.split())
    target = "".join(closing.split())
    return target.startswith(squeezed)


def _match_head(text: str, syntax: CallSyntax):
    """Match ``open {"name": "NAME", "<key>": `` (any whitespace between the JSON tokens) at the start of ``text``:
    (name, end), "partial" when ``text`` may still become it, or None."""
    pos = _match_literals(text, 0, ([syntax.open] if syntax.open else []) + ["{", '"name"', ":", '"'])
    if not isinstance(pos, int):
        return pos
    name_end = pos
    while name_end < len(text) and text[name_end] != '"':
        if text[name_end] == "\\" or text[name_end] in "\n{}" or name_end - pos >= MAX_NAME:
            return None
        name_end += 1
    if name_end == len(text):
        return "partial"
    end = _match_literals(text, name_end + 1, [",", f'"{syntax.arguments_key}"', ":"])
    return (text[pos:name_end], end) if isinstance(end, int) else end


def _match_literals(text: str, pos: int, literals: list[str]):
    """The position after ``literals`` (any whitespace between them) from ``pos``, "partial" when ``text`` ends
    inside them, or None when it holds something else."""
    for literal in literals:
        pos = _skip_ws(text, pos)
        if pos == len(text):
            return "partial"
        piece = text[pos:pos + len(literal)]
        if not literal.startswith(piece):
            return None
        if len(piece) < len(literal):
            return "partial"
        pos += len(literal)
    return pos


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in WHITESPACE:
        pos += 1
    return pos


def _call_of_json(body: str, syntax: CallSyntax, tools: Collection[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call written as one JSON object with its keys in any order, else None."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or len(value["name"]) > MAX_NAME:
        return None
    arguments = value.get(syntax.arguments_key, value.get("arguments", value.get("parameters")))
    if not isinstance(arguments, dict) or set(value) - {"name", "arguments", "parameters"}:
        return None
    if tools and value["name"] not in tools:
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def parse_tool_calls(text: str, syntax: CallSyntax, tools: Collection[str] = ()) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply: the same as feeding it to a :class:`ToolCallParser` at once."""
    parser = ToolCallParser(syntax, tools)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
