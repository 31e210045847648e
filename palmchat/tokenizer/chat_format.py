"""How a conversation becomes token ids: the :class:`ChatFormat` interface and palmchat's own format.

Everything above the tokenizer that handles chats (SFT loss masks, reward-model inputs, padding, the server's
prompts, truncation and stop ids) goes through a ``ChatFormat`` and never through token-id constants, so that any
tokenizer able to provide one plugs in unchanged: palmchat's BPE tokenizer here, a Hugging Face tokenizer with its
chat template in hf.py (``TemplateChatFormat``).  A tokenizer exposes its format as ``tokenizer.chat_format``.

Formats differ in ways callers must respect: a format may have no bos (``bos_id`` None: start a conversation with
:func:`conversation_start`), a turn may depend on the history before it (pass ``history`` to ``render_turn``), a
format may not be prefix-stable (``prefix_stable`` False: render the whole conversation again at every turn), and a
reply's turn may close with more than its end-of-turn token (``reply_end``).

palmchat's format (:class:`PalmChatFormat`) has six special tokens with fixed ids::

    <|pad|>=0  <|endoftext|>=1  <|system|>=2  <|user|>=3  <|assistant|>=4  <|end|>=5

and renders a conversation as::

    [bos] + for each message: [role_id] + encode(content) + [eot]

where ``bos`` is ``<|endoftext|>`` and ``eot`` is ``<|end|>``; the generation prompt is ``[<|assistant|>]``.  Each
message's content is encoded independently, so rendering is prefix-stable: appending a turn never changes the ids
of earlier turns (the server relies on this for prefix KV-cache reuse).  Special ids only enter a sequence through
this format: the tokenizer's ``encode`` never produces them.

Tools are plain text inside those turns (no special token of their own, so the vocabulary, and with it every
checkpoint's tokenizer hash, stays as it is); the tags are Hermes' (Qwen's) without their newlines:

* the tools offered (``tools=``, OpenAI's ``{"type": "function", "function": {...}}`` objects) are a system turn
  right after bos: ``<|system|># Tools`` and one line per tool, its JSON, then ``<|end|>``;
* an assistant message's ``tool_calls`` follow its content in the same turn, each as
  ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` (the JSON of the call; ``arguments`` as an object);
* a ``tool`` message (a call's result) is a user turn ``<|user|><tool_response>RESULT</tool_response><|end|>``.

``palmchat.tokenizer.tools`` parses such calls out of a reply (its ``palmchat`` syntax).

This module deliberately imports neither torch nor the rest of palmchat (but the call syntaxes of tools.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from palmchat.tokenizer.tools import SYNTAXES, CallSyntax, check_tools

__all__ = [
    "ChatFormat",
    "conversation_start",
    "TextCodec",
    "PalmChatFormat",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "SYSTEM_TOKEN",
    "USER_TOKEN",
    "ASSISTANT_TOKEN",
    "EOT_TOKEN",
    "SPECIAL_TOKENS",
    "NUM_SPECIAL_TOKENS",
    "PAD_ID",
    "BOS_ID",
    "SYSTEM_ID",
    "USER_ID",
    "ASSISTANT_ID",
    "EOT_ID",
    "ROLES",
    "PALMCHAT_CHAT_TEMPLATE",
    "TOOLS_HEADER",
    "tool_call_text",
    "tools_text",
]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
EOT_TOKEN = "<|end|>"

# Order defines the ids: index in this tuple == token id.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, EOT_TOKEN)
PAD_ID, BOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, EOT_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

ROLES: dict[str, int] = {"system": SYSTEM_ID, "user": USER_ID, "assistant": ASSISTANT_ID}

# the tool protocol's text (see the module docstring)
TOOLS_HEADER = "# Tools"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = SYNTAXES["palmchat"].open, SYNTAXES["palmchat"].close
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# palmchat's format as a Jinja chat template, for the tools that render chats with one (transformers'
# apply_chat_template, llama.cpp, Ollama): bos, then per message <|role|>content<|end|>, then <|assistant|> to ask
# for a reply. The rendered text is tokenized with special tokens parsed, which splits it at the specials exactly
# where PalmChatFormat encodes each message's content on its own, so both give the same ids.
_ROLE_TOKENS = ", ".join(f"'{role}': '{SPECIAL_TOKENS[i]}'" for role, i in ROLES.items())
PALMCHAT_CHAT_TEMPLATE = (
    "{%- set role_tokens = {" + _ROLE_TOKENS + "} -%}"
    "{{- bos_token -}}"
    "{%- if tools -%}"
    "{{- '" + SYSTEM_TOKEN + TOOLS_HEADER + "' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '" + EOT_TOKEN + "' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '" + USER_TOKEN + TOOL_RESPONSE_OPEN + "' + message['content'] + '" + TOOL_RESPONSE_CLOSE + EOT_TOKEN + "' -}}"
    "{%- elif message['role'] not in role_tokens -%}"
    "{{- raise_exception('palmchat chats have system, user, assistant and tool messages only, not '"
    " + message['role']) -}}"
    "{%- else -%}"
    "{{- role_tokens[message['role']] + (message['content'] if message['content'] is string else '') -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set call = call['function'] if call['function'] is defined else call -%}"
    "{{- '" + TOOL_CALL_OPEN + "' + ({'name': call['name'], 'arguments': call['arguments']} | tojson) + '"
    + TOOL_CALL_CLOSE + "' -}}"
    "{%- endfor -%}"
    "{{- '" + EOT_TOKEN + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_TOKEN + "' -}}{%- endif -%}"
)


def tool_call_text(name: str, arguments) -> str:
    """One call as palmchat's format writes it in an assistant turn (``arguments``: the JSON object, or text that
    is not JSON, which is written as a JSON string)."""
    return SYNTAXES["palmchat"].render(name, json.dumps(arguments, ensure_ascii=False))


def tools_text(tools: Sequence[Mapping]) -> str:
    """The system turn's text that offers ``tools``."""
    return "\n".join([TOOLS_HEADER] + [json.dumps(tool, ensure_ascii=False) for tool in tools])


@runtime_checkable
class ChatFormat(Protocol):
    """What the code above the tokenizer needs to know about how a tokenizer lays out chats.

    Implemented by :class:`PalmChatFormat` and by ``palmchat.tokenizer.hf.TemplateChatFormat`` (a Hugging Face
    tokenizer's Jinja chat template).  ``render`` and ``render_prompt`` take ``tools=`` (OpenAI's function tools,
    JSON-schema dicts), and messages may carry assistant ``tool_calls`` and ``tool`` results; ``tool_syntax`` says
    how the format writes a call in a reply.
    """

    @property
    def bos_id(self) -> int | None:
        """Opens every document (pretraining) and every rendered conversation; None when the format has none (a
        ChatML template): documents and conversations then start with nothing.  :func:`conversation_start` gives
        the ids a conversation starts with either way."""
        ...

    @property
    def eot_id(self) -> int:
        """Closes every assistant turn; a reply ends with it and a reward model reads its score there."""
        ...

    @property
    def pad_id(self) -> int:
        """Fills batches up to a common length; never attended to or trained on."""
        ...

    @property
    def generation_prompt(self) -> list[int]:
        """The ids appended to a conversation to ask for the assistant's reply."""
        ...

    @property
    def reply_stop_ids(self) -> tuple[int, ...]:
        """The ids that end a sampled reply (none of them is part of the reply's text)."""
        ...

    @property
    def reply_end(self) -> list[int]:
        """The ids that close an assistant turn, from ``eot_id`` on (ChatML's ``<|im_end|>`` and ``\\n``): what to
        append to a generated reply cut at a stop id so that the stored turn reads as the format renders it."""
        ...

    @property
    def prefix_stable(self) -> bool:
        """Whether appending a message never changes the ids of the conversation before it.  When False (a
        template that rewrites earlier turns), ``render_turn`` raises and callers render the whole conversation
        again with ``render``/``render_prompt`` at every turn instead of appending to stored ids."""
        ...

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """A conversation as ``(ids, loss_mask)``: the mask is 1 on the tokens SFT trains on (every assistant reply
        and its end-of-turn token), 0 elsewhere."""
        ...

    def render_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """The ids of ``messages`` followed by the generation prompt."""
        ...

    def render_turn(self, message: Mapping, history: Sequence[Mapping] = ()) -> list[int]:
        """The ids ``message`` adds to the rendering of ``history`` (the messages before it; for an empty history,
        the ids after :func:`conversation_start`).  Only for prefix-stable formats (see ``prefix_stable``)."""
        ...

    @property
    def tool_syntax(self) -> CallSyntax | None:
        """How the format writes a tool call in a reply (palmchat.tokenizer.tools); None when it cannot describe
        tools (a template that renders none)."""
        ...

    def message_starts(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        """(role, index) of each message that starts in a rendering ``ids``; a trailing generation prompt counts
        as an assistant message.  A format may leave out messages it cannot find (a template whose turns open with
        no special token), never lists a position inside a message."""
        ...

    def decode_reply(self, ids: Iterable[int]) -> str:
        """The text of generated reply ids, up to (not including) the first end-of-turn."""
        ...


def conversation_start(chat_format: ChatFormat) -> list[int]:
    """The ids every rendered conversation starts with: ``[bos_id]``, or nothing for a format without bos."""
    return [] if chat_format.bos_id is None else [chat_format.bos_id]


class TextCodec(Protocol):
    """The plain-text side of a tokenizer that :class:`PalmChatFormat` renders with."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...


class PalmChatFormat:
    """palmchat's chat format (see the module docstring) on top of a tokenizer's plain-text encoding."""

    pad_id = PAD_ID
    bos_id = BOS_ID
    eot_id = EOT_ID
    system_id = SYSTEM_ID
    user_id = USER_ID
    assistant_id = ASSISTANT_ID
    prefix_stable = True  # each message's content is encoded on its own
    tool_syntax = SYNTAXES["palmchat"]

    def __init__(self, codec: TextCodec):
        self.codec = codec

    @property
    def role_ids(self) -> Mapping[str, int]:
        return dict(ROLES)

    @property
    def generation_prompt(self) -> list[int]:
        return [ASSISTANT_ID]

    @property
    def reply_stop_ids(self) -> tuple[int, ...]:
        """A reply's end-of-turn, or any other special token (a role token would open the next message, bos a new
        document), so that a stored conversation always keeps the shape rendered above."""
        return (EOT_ID, BOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, PAD_ID)

    @property
    def reply_end(self) -> list[int]:
        return [EOT_ID]

    def render_turn(self, message: Mapping, history: Sequence[Mapping] = ()) -> list[int]:
        """``[role_id] + encode(content) + [eot]`` for one message, whatever the history before it (only its
        length is used, to name the message in errors)."""
        role, content = _validate_message(message, len(history))
        return [ROLES[role]] + self.codec.encode(content) + [EOT_ID]

    def tools_turn(self, tools: Sequence[Mapping]) -> list[int]:
        """The system turn offering ``tools`` (after bos, before the messages)."""
        check_tools(tools)
        return [SYSTEM_ID] + self.codec.encode(tools_text(tools)) + [EOT_ID]

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
               tools: Sequence[Mapping] | None = None) -> tuple[list[int], list[int]]:
        """Render a conversation to ``(ids, loss_mask)``.

        ``loss_mask`` is 1 exactly on assistant content tokens (their tool calls included) and their closing eot, 0
        elsewhere.  With ``add_generation_prompt`` an ``<|assistant|>`` token (mask 0) is appended as the prompt for
        the model's reply.  ``tools`` are offered in a system turn after bos (see the module docstring).
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(
                f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
            )
        if len(messages) == 0:
            raise ValueError("messages: conversation is empty (need at least one message)")
        validated = [_validate_message(m, i) for i, m in enumerate(messages)]
        contents = self.codec.encode_batch([c for _, c in validated])

        ids: list[int] = [BOS_ID]
        if tools:
            ids += self.tools_turn(tools)
        mask: list[int] = [0] * len(ids)
        for (role, _), body in zip(validated, contents):
            ids.append(ROLES[role])
            mask.append(0)
            ids.extend(body)
            ids.append(EOT_ID)
            m = 1 if role == "assistant" else 0
            mask.extend([m] * (len(body) + 1))
        if add_generation_prompt:
            ids.append(ASSISTANT_ID)
            mask.append(0)
        return ids, mask

    def render_prompt(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> list[int]:
        """Ids of ``messages`` followed by the assistant generation prompt."""
        return self.render(messages, add_generation_prompt=True, tools=tools)[0]

    def message_starts(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        """(role, index) of each message that starts in ``ids`` (a rendering as above, possibly ending with the
        generation prompt, which counts as an assistant message): role ids only ever open a message."""
        role_of = {i: role for role, i in ROLES.items()}
        return [(role_of[t], i) for i, t in enumerate(ids) if t in role_of]

    def decode_reply(self, ids: Iterable[int]) -> str:
        """Decode generated reply ids, stopping at the first eot (exclusive)."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOT_ID:
                break
            out.append(i)
        return self.codec.decode(out, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"PalmChatFormat({self.codec!r})"


def _validate_message(message: object, index: int) -> tuple[str, str]:
    """``(role, text)`` of one chat message's turn, or a ValueError naming message ``index`` and what is wrong: a
    ``tool`` message is a user turn holding its result, an assistant message's ``tool_calls`` follow its content."""
    if not isinstance(message, Mapping):
        raise ValueError(
            f"message {index}: expected a dict with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES and role != "tool":
        raise ValueError(
            f"message {index}: unknown role {role!r} (expected one of {', '.join(ROLES)}, tool)"
        )
    calls = (message.get("tool_calls") or []) if role == "assistant" else []
    if "content" not in message and not calls:
        raise ValueError(f"message {index}: missing 'content'")
    content = message.get("content")
    if content is None and calls:
        content = ""
    if not isinstance(content, str):
        raise ValueError(
            f"message {index}: 'content' must be a string, got {type(content).__name__}"
        )
    if role == "tool":
        return "user", TOOL_RESPONSE_OPEN + content + TOOL_RESPONSE_CLOSE
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise ValueError(f"message {index}: 'tool_calls' must be a list")
    for k, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or (
                "arguments" not in function):
            raise ValueError(f"message {index}: tool_calls[{k}] must have a 'name' and 'arguments'")
        content += tool_call_text(function["name"], function["arguments"])
    return role, content
