"""Function calling on the OpenAI-compatible endpoints: the request's `tools` and `tool_choice` checked, chat
messages with tool calls and tool results turned into what a chat template renders, forced calls, and a reply's
calls in the shapes Chat Completions and the Responses API return.

How a request with tools runs:

* the tools are rendered into the prompt by the model's chat format (a Hugging Face template as transformers
  renders them; palmchat's own format as chat_format.py documents), and the reply is read by the parser of the
  format's call syntax (palmchat/tokenizer/tools.py), as it streams;
* `tool_choice: "none"` keeps the tools in the prompt and reads the reply as plain text;
* `tool_choice: "required"` or a named function forces a call: the call's opening (the format's tag and the
  function's name, up to its arguments) is put into the prompt after the generation prompt, so the reply is that
  call's arguments and what follows; for a function without parameters the whole call (arguments `{}`) is.
  With "required" and several tools the function is not guessed: the opening stops before the name, which the
  model writes (a name that is no tool's makes the call malformed: content). A named function's arguments follow its
  JSON schema by constrained decoding (a grammar through the engine's per-request logits processor), for any model.
* `strict: true` on a function keeps its promise of schema-valid arguments by the same constrained decoding: with
  `tool_choice` "auto", the reply is free text in which every call the model opens names an offered function and
  its arguments follow that function's schema (xgrammar's triggered structural tags, from the call's opening tag
  on); a forced call's arguments always do. "required" over several functions with a strict one is refused, as
  that call's name is the model's to write after an opening already in the prompt. The deprecated `functions` and
  `function_call` are refused;
* `parallel_tool_calls: false` ends the reply at its first call's close (a stop string where the call has a close
  tag; what follows the first call is dropped in any case).

Assistant messages' `tool_calls[].function.arguments` (a JSON string on the wire) are given to templates as the
object they hold, as vLLM does (templates write them with `tojson`); arguments that are not a JSON object stay the
string they are.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from palmchat.serve import schemas as S
from palmchat.serve.errors import APIError
from palmchat.tokenizer.tools import CallSyntax, ToolCall, ToolCallParser, arguments_object

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
NAME_MARKER = "\U000f0003"  # stands for a name when a call's opening is cut before it (private use: kept by JSON)
SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolSetup:
    """A request's tools, checked: `tools` in the chat shape templates read, what the reply may do with them."""

    tools: list[dict]
    names: list[str]
    choice: str  # "auto", "none", "required" or "function" (a named one)
    forced: str | None  # the function a forced call names; None: the model names it (or there is no forced call)
    parallel: bool
    syntax: CallSyntax

    @property
    def forces_call(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    def opening(self) -> str:
        """The text a forced call puts into the prompt after the generation prompt ("" when none is forced): up to
        where its arguments start, the blank before them left to the model (a tokenizer may merge it with them)."""
        if not self.forces_call:
            return ""
        if self.forced is not None and takes_no_arguments(self.tools[self.names.index(self.forced)]):
            return self.syntax.render(self.forced, "{}")  # the only call there is: all of it
        if self.forced is not None:
            return self.syntax.opening(self.forced).rstrip()
        return self.syntax.opening(NAME_MARKER).split(NAME_MARKER)[0]  # the open tag and '{"name": "'

    def arguments_schema(self) -> dict | None:
        """The JSON schema a forced call's arguments are constrained to (constrained decoding from the opening on),
        or None when no call with arguments to write is forced."""
        if self.forced is None or takes_no_arguments(self.tools[self.names.index(self.forced)]):
            return None
        return self.tools[self.names.index(self.forced)]["function"].get("parameters") or {"type": "object"}

    def strict_calls(self) -> bool:
        """Whether calls the model makes by itself must follow their functions' schemas (a strict function offered
        with tool_choice "auto")."""
        return self.choice == "auto" and offers_strict(self.tools)

    def stops(self) -> list[str]:
        """Stop strings of the reply: a call's close tag when only one call is allowed (the tag itself is then
        not part of the reply, which the parser takes as closed)."""
        return [self.syntax.close] if not self.parallel and self.syntax.close else []

    def parser(self) -> tuple[ToolCallParser, list[tuple]]:
        """A parser for one reply, already fed the forced opening (and the events that opening gave)."""
        parser = ToolCallParser(self.syntax, self.names, max_calls=None if self.parallel else 1)
        return parser, parser.feed(self.opening())


def refuse_legacy_functions(extra: dict | None) -> None:
    """Chat Completions' deprecated `functions` and `function_call` change what a reply may be: refused (by name)
    rather than ignored."""
    for field in ("functions", "function_call"):
        if extra and field in extra:
            raise APIError(400, f"{field} is not supported: use `tools` and `tool_choice`", param=field,
                           code="unsupported_parameter")


def tool_setup(chat_format, tools: list | None, tool_choice, parallel_tool_calls: bool | None, *,
               flat: bool = False) -> ToolSetup | None:
    """The checked tools of a request, or None when it offers none (and forces none). ``flat``: the Responses
    API's shape ({"type": "function", "name", "parameters"...}, tool_choice {"type": "function", "name"}) instead of
    Chat Completions' ({"type": "function", "function": {...}})."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice requires `tools`: this request offers no function to call",
                           param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise APIError(400, f"tools must be a list of at most {MAX_TOOLS} tools", param="tools")
    checked = [check_tool(tool, f"tools[{i}]", flat) for i, tool in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate:
        raise APIError(400, f"tools: the function name '{duplicate}' is used twice", param="tools")
    syntax = getattr(chat_format, "tool_syntax", None)
    if syntax is None:
        raise APIError(400, "tools: this model's chat template has no way to describe tools or tool calls",
                       param="tools", code="unsupported_parameter")
    choice, forced = "auto", None
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        choice = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = tool_choice.get("name") if flat else (tool_choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            shape = '{"type": "function", "name": ...}' if flat else '{"type": "function", "function": {"name": ...}}'
            raise APIError(400, f"tool_choice: a named function is {shape}", param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names the function '{name}', which is not among `tools` "
                                f"({', '.join(names)})", param="tool_choice")
        choice, forced = "function", name
    else:
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or a named function',
                       param="tool_choice")
    if choice == "required" and len(names) == 1:
        forced = names[0]
    if choice == "required" and forced is None and offers_strict(checked):
        raise APIError(400, 'tools: strict functions with tool_choice "required" over several functions are not '
                            "supported (name the function in tool_choice, or use \"auto\")", param="tool_choice",
                       code="unsupported_parameter")
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    return ToolSetup(checked, names, choice, forced, parallel, syntax)


def offers_strict(tools: list[dict]) -> bool:
    """Whether any of the (checked, chat-shaped) tools is a strict function."""
    return any(t["function"].get("strict") for t in tools)


def takes_no_arguments(tool: dict) -> bool:
    """Whether a function's only arguments are ``{}``: no parameters, or an object schema without properties."""
    parameters = tool["function"].get("parameters")
    return parameters is None or not parameters.get("properties")


def check_tool(tool, where: str, flat: bool) -> dict:
    """One tool in the chat shape, or a 400 naming what is wrong with it."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise APIError(400, f"{where}: only tools of type 'function' are supported", param=f"{where}.type")
    function = {k: v for k, v in tool.items() if k != "type"} if flat else tool.get("function")
    fwhere = where if flat else f"{where}.function"
    if not isinstance(function, dict):
        raise APIError(400, f"{fwhere}: expected an object with a 'name'", param=fwhere)
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise APIError(400, f"{fwhere}.name: a function name is 1 to 64 letters, digits, '_' or '-', got {name!r}",
                       param=f"{fwhere}.name")
    if not isinstance(function.get("description", ""), str):
        raise APIError(400, f"{fwhere}.description must be a string", param=f"{fwhere}.description")
    parameters = function.get("parameters")
    if parameters is not None:
        problem = schema_problem(parameters, "parameters")
        if problem:
            raise APIError(400, f"{fwhere}.parameters: invalid schema for function '{name}': {problem}",
                           param=f"{fwhere}.parameters")
    if not isinstance(function.get("strict", False), bool):
        raise APIError(400, f"{fwhere}.strict must be true or false", param=f"{fwhere}.strict")
    kept = {k: function[k] for k in ("name", "description", "parameters", "strict") if k in function}
    return {"type": "function", "function": kept}


def schema_problem(schema, where: str, depth: int = 0) -> str | None:
    """What makes ``schema`` no JSON schema a function's parameters can have (None: nothing): the top is an object
    schema; `type`, `properties`, `required`, `items`, `enum` and the combinators have the types JSON Schema
    gives them."""
    if depth > 32:
        return f"{where} is nested too deeply"
    if isinstance(schema, bool) and depth:
        return None
    if not isinstance(schema, dict):
        return f"{where} must be a JSON schema object, got {type(schema).__name__}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if any(k not in SCHEMA_TYPES for k in kinds):
        return f"{where}.type {kind!r} is not a JSON schema type ({', '.join(sorted(SCHEMA_TYPES))})"
    if depth == 0 and kinds and "object" not in kinds:
        return f"{where} must be a schema of type 'object', got {kind!r}"
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return f"{where}.properties must be an object"
    for key, sub in properties.items():
        problem = schema_problem(sub, f"{where}.properties.{key}", depth + 1)
        if problem:
            return problem
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        return f"{where}.required must be a list of property names"
    if "enum" in schema and not isinstance(schema["enum"], list):
        return f"{where}.enum must be a list"
    if "items" in schema:
        problem = schema_problem(schema["items"], f"{where}.items", depth + 1)
        if problem:
            return problem
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            if not isinstance(schema[combinator], list):
                return f"{where}.{combinator} must be a list of schemas"
            for k, sub in enumerate(schema[combinator]):
                problem = schema_problem(sub, f"{where}.{combinator}[{k}]", depth + 1)
                if problem:
                    return problem
    return None


# -- messages --------------------------------------------------------------------------------------------


def template_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments_object(arguments)}}


def has_tool_parts(messages: Sequence[dict] | None) -> bool:
    """Whether a conversation holds tool calls or tool results."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages or ())


def check_tool_results(messages: Sequence[dict], param: str = "messages") -> None:
    """Every tool message answers a call made earlier in the conversation (by its tool_call_id), or a 400."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        for call in message.get("tool_calls") or ():
            calls.add(call["id"])
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            if not call_id:
                raise APIError(400, f"{param}[{i}]: a tool message needs the tool_call_id of the call it answers",
                               param=f"{param}[{i}].tool_call_id")
            if call_id not in calls:
                raise APIError(400, f"{param}[{i}].tool_call_id '{call_id}' answers no tool call of an earlier "
                                    f"assistant message", param=f"{param}[{i}].tool_call_id")


def add_item(messages: list[dict], item: dict) -> None:
    """Append a Responses API item (message, function_call, function_call_output; a model or a dict) to chat
    messages: a call joins the assistant message before it (its text, or the calls before it), a call's output is a
    tool message."""
    item = item if isinstance(item, dict) else item.model_dump()
    kind = item.get("type") or "message"
    if kind == "function_call":
        call = template_call(item["call_id"], item["name"], item["arguments"])
        if messages and messages[-1]["role"] == "assistant":
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item["output"]
        text = output if isinstance(output, str) else "".join(p.get("text", "") for p in output)
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": S.clean_text(text)})
    else:
        content = item.get("content")
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content or ())
        messages.append({"role": S.role_of(item["role"]), "content": S.clean_text(text)})


def chat_messages(messages) -> list[dict]:
    """Chat Completions' messages (schemas.ChatMessage) as a chat template renders them, tool calls and tool
    results included; a tool message must answer an earlier call (else a 400)."""
    out = []
    for m in messages:
        message = {"role": S.role_of(m.role), "content": S.text_of(m.content)}
        if m.role == "assistant" and m.tool_calls:
            message["tool_calls"] = [template_call(c.id, c.function.name, c.function.arguments) for c in m.tool_calls]
        if m.role == "tool":
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    check_tool_results(out)
    return out


# -- replies ---------------------------------------------------------------------------------------------


class ReplyReader:
    """One reply's text as it arrives -> its content and tool calls (parser events, or Chat Completions' deltas of
    them). Without tools (or with tool_choice "none") all of the text is content."""

    def __init__(self, setup: ToolSetup | None):
        self.parser, self.opened = setup.parser() if setup is not None and setup.parses_calls else (None, [])
        self.ids: list[str] = []  # the calls' ids, made as they are found
        self.item_ids: list[str] = []  # the Responses API's ids of their function_call items
        self.text = ""

    def start_events(self) -> list[tuple]:
        """What the forced opening already says (a call's start and name)."""
        events, self.opened = self.opened, []
        return self._named(events)

    def feed_events(self, text: str) -> list[tuple]:
        self.text += text
        if self.parser is None:
            return [("content", text)] if text else []
        return self._named(self.parser.feed(text))

    def finish_events(self) -> list[tuple]:
        return [] if self.parser is None else self._named(self.parser.finish())

    def _named(self, events: list[tuple]) -> list[tuple]:
        for event in events:
            if event[0] == "call":
                self.ids.append(new_call_id())
                self.item_ids.append("fc_" + secrets.token_hex(16))
        return events

    def start(self) -> list[dict]:
        return chat_deltas(self.start_events(), self.ids)

    def feed(self, text: str) -> list[dict]:
        return chat_deltas(self.feed_events(text), self.ids)

    def finish(self) -> list[dict]:
        return chat_deltas(self.finish_events(), self.ids)

    def read(self, text: str) -> None:
        """The whole reply at once."""
        self.start_events()
        self.feed_events(text)
        self.finish_events()

    @property
    def calls(self) -> list[ToolCall]:
        return [] if self.parser is None else self.parser.calls

    @property
    def content(self) -> str:
        return self.text if self.parser is None else self.parser.content

    def tool_calls(self) -> list[dict] | None:
        """Chat Completions' `message.tool_calls` (None when the reply made no call)."""
        return chat_tool_calls(self.calls, self.ids) or None

    def finish_reason(self, reason: str) -> str:
        return finish_reason(reason, self.calls)

    def message(self) -> dict:
        """The reply as a chat message a template renders."""
        message = {"role": "assistant", "content": self.content}
        if self.calls:
            message["tool_calls"] = [template_call(self.ids[c.index], c.name, c.arguments) for c in self.calls]
        return message

    def output_items(self, message_id: str, status: str) -> list[dict]:
        """The reply as the Responses API's output items: its text as a message (left out when it only made
        calls), then a function_call item per call."""
        items = [S.message_item(message_id, "assistant", self.content, status=status)] if (
            self.content or not self.calls) else []
        return items + [S.function_call_item(self.item_ids[c.index], self.ids[c.index], c.name, c.arguments,
                                             "completed" if c.ended else "incomplete") for c in self.calls]


def chat_tool_calls(calls: list[ToolCall], ids: list[str]) -> list[dict]:
    """A reply's calls as Chat Completions' `message.tool_calls`."""
    return [{"id": ids[c.index], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def chat_deltas(events: list[tuple], ids: list[str]) -> list[dict]:
    """Parser events as Chat Completions' streamed deltas, in the shape the openai SDK's stream helpers and
    LangChain accumulate: a call's first delta carries its index, id, type and name (arguments ""), the next ones
    its index and a piece of its arguments; content pieces are {"content": ...}."""
    out: list[dict] = []
    for event in events:
        if event[0] == "content":
            out.append({"content": event[1]})
        elif event[0] == "call":
            index = event[1]
            out.append({"tool_calls": [{"index": index, "id": ids[index], "type": "function",
                                        "function": {"name": event[2], "arguments": ""}}]})
        else:
            out.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
    return out


def finish_reason(reason: str, calls: list[ToolCall]) -> str:
    """"tool_calls" when a reply made calls and ended on its own, or was cut only after its last call ended (what
    follows a call is dropped); a reply cut inside a call ("length") or filtered keeps its reason."""
    return "tool_calls" if calls and (reason == "stop" or (reason == "length" and calls[-1].ended)) else reason
