"""What goes over the wire: request bodies (pydantic, so FastAPI validates them and publishes them in
/openapi.json) and builders of the OpenAI objects the server returns (errors: errors.py).

The shapes follow what the official `openai` Python client parses (ChatCompletion, ChatCompletionChunk,
Completion, Response and its stream events, Conversation, ConversationItem, ModerationCreateResponse). Request
fields a body does not declare are accepted and ignored, as clients send parameters that change nothing in the
reply (user, metadata, service_tier, prompt_cache_key, ...); an OpenAI or vLLM field that would change the reply
and that this server does not implement is refused with a 400 `unsupported_parameter` naming it (UNSUPPORTED).
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from palmchat.inference.engine import MAX_LOGIT_BIAS_ENTRIES, MAX_TOP_LOGPROBS
from palmchat.serve.errors import APIError

MAX_CHOICES = 16  # n and best_of, each


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# -- requests --------------------------------------------------------------------------------------------


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields a body does not declare are accepted and ignored


# Fields of OpenAI's API (and vLLM's extras) that would change the reply and that palmchat does not implement: a
# request that sets one (to anything but null, false or an empty value) gets a 400 naming it, never a reply that
# silently ignored it. field -> what it asks for.
UNSUPPORTED_CHAT = {
    "audio": "audio output", "modalities": "output modalities other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning effort (palmchat's models do not reason)",
    "verbosity": "a verbosity level", "store": "stored chat completions (the Responses API stores replies)",
}
UNSUPPORTED_COMPLETIONS = {"echo": "echoing the prompt", "suffix": "a suffix (insertion)"}
UNSUPPORTED_RESPONSES = {
    "reasoning": "reasoning settings (palmchat's models do not reason)", "background": "background responses",
    "prompt": "prompt templates",
}
RESPONSES_INCLUDE = ("message.output_text.logprobs",)  # the `include` values this server produces
UNSUPPORTED_VLLM = {  # vLLM's extra sampling fields, beside the ones palmchat implements (top_k, min_p, ...)
    "guided_json": "vLLM's guided decoding (use response_format)", "guided_regex": "vLLM's guided decoding",
    "guided_choice": "vLLM's guided decoding", "guided_grammar": "vLLM's guided decoding",
    "structured_outputs": "vLLM's structured outputs (use response_format)", "use_beam_search": "beam search",
    "length_penalty": "beam search", "min_tokens": "a minimum reply length", "ignore_eos": "ignoring end-of-turn",
    "prompt_logprobs": "log-probs of the prompt", "allowed_token_ids": "an allowed-token list",
    "bad_words": "banned words", "stop_token_ids": "stop token ids", "include_stop_str_in_output": "stop strings "
    "kept in the output", "skip_special_tokens": "special tokens in the output",
}
WHAT_HAPPENS_ANYWAY = {"modalities": ["text"], "skip_special_tokens": True}  # values asking for what palmchat does


def _is_set(name: str, value: Any) -> bool:
    """Whether a request's value of an unsupported field asks for something palmchat would not do."""
    if value is None:
        return False
    if name in WHAT_HAPPENS_ANYWAY:
        return value != WHAT_HAPPENS_ANYWAY[name]
    return value not in (False, "", [], {})


class _RefusesUnsupported(Body):
    """A body that refuses the fields in its UNSUPPORTED with a 400 `unsupported_parameter`."""

    UNSUPPORTED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, what in cls.UNSUPPORTED.items():
                if name in data and _is_set(name, data[name]):
                    # raised as APIError, not ValueError: pydantic lets it through to the error handler as it is
                    raise APIError(400, f"{name}: this server does not support {what}; remove the field",
                                   param=name, code="unsupported_parameter")
        return data


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 16:
        raise ValueError("metadata holds at most 16 key-value pairs")
    if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
        raise ValueError("metadata keys are at most 64 characters and values at most 512")
    return value


Metadata = Annotated[dict[str, str], AfterValidator(_check_metadata)]


class TextPart(Body):
    type: Literal["text", "input_text", "output_text"] = "text"
    text: str


class FunctionCall(Body):
    name: str
    arguments: str = Field(description="the call's arguments as JSON text")


class ToolCallIn(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="an assistant message's calls")
    tool_call_id: str | None = Field(None, description="a tool message: the id of the call it answers")


class ToolsFields(Body):
    """Function calling (serve/tools.py checks them, so that an error names the tool and field at fault)."""

    tools: list[dict] | None = Field(None, description="function tools, at most 128")
    tool_choice: str | dict | None = Field(None, description='"none", "auto" (default with tools), "required" or '
                                           "a named function")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per reply")


class StreamOptions(Body):
    include_usage: bool = False


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return value
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
    for key, bias in value.items():
        if not key.isdigit():
            raise ValueError(f"keys are token ids (digits), got '{key:.20}'")
        if not -100 <= bias <= 100:
            raise ValueError(f"token {key}: the bias must be in [-100, 100], got {bias}")
    return value


class _Sampling(_RefusesUnsupported):
    UNSUPPORTED: ClassVar[dict[str, str]] = UNSUPPORTED_VLLM
    model: str
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI's: minus this for every token "
                                           "already in the reply")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI's: minus this times the times "
                                            "each token is in the reply so far")
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_check_logit_bias)] = Field(
        None, description="token id (a string) -> bias in [-100, 100] added to its logit; -100 bans it")
    top_k: int | None = Field(None, ge=-1, description="vLLM's extra: sample among the k most likely (0 or -1: off)")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM's extra: keep tokens at least this times as "
                                "likely as the most likely one")
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM's extra (Hugging Face's "
                                             "definition, over prompt + reply): > 1 discourages repeats; 1 is off")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES,
                                description="sample this many candidates and return the n the reward model ranks best")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value


Truncation = Literal["auto", "disabled"] | None


class ChatCompletionRequest(ToolsFields, _Sampling):
    UNSUPPORTED: ClassVar[dict[str, str]] = {**UNSUPPORTED_VLLM, **UNSUPPORTED_CHAT}
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = Field(None, description="report each reply token's log-prob (choice.logprobs)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: also the most "
                                     "likely tokens at each position, this many")
    response_format: dict | None = Field(None, description='{"type": "text"}, {"type": "json_object"} or '
                                         '{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}: '
                                         "guaranteed by constrained decoding")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    truncation: Truncation = Field(None, description='palmchat extension: "auto" leaves out the oldest messages '
                                   "(never the leading system ones or the last) when the conversation does not fit "
                                   "the context; by default such a request fails with a 400, as on OpenAI")


class CompletionRequest(_Sampling):
    UNSUPPORTED: ClassVar[dict[str, str]] = {**UNSUPPORTED_VLLM, **UNSUPPORTED_COMPLETIONS}
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists: each prompt gets "
                    "n choices, choice index = prompt index * n + j")
    max_tokens: int | None = Field(None, ge=1, description="default 16, as in OpenAI's API")
    logprobs: int | None = Field(None, ge=0, le=5, description="report each token's log-prob and this many most "
                                 "likely alternatives (choice.logprobs)")


class InputMessage(Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class FunctionCallItem(Body):
    """A call the model made (an earlier response's output item, sent back as input)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(Body):
    """The result of a call, for the model to go on with."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem


class ConversationRef(Body):
    id: str


class TextFormat(_RefusesUnsupported):
    UNSUPPORTED: ClassVar[dict[str, str]] = {"verbosity": "a verbosity level (text.verbosity)"}
    format: dict | None = Field(None, description='{"type": "text"}, {"type": "json_object"} or {"type": '
                                '"json_schema", "name", "schema", "strict"}')


class ResponseRequest(ToolsFields, _RefusesUnsupported):
    UNSUPPORTED: ClassVar[dict[str, str]] = UNSUPPORTED_RESPONSES
    model: str
    input: str | list[InputItem]
    instructions: str | None = Field(None, description="a system message for this response only (not carried over)")
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    text: TextFormat | None = Field(None, description="the reply's format: text (default) or JSON")
    include: list[str] | None = Field(None, description='"message.output_text.logprobs": each reply token\'s '
                                      "log-prob in the message's output_text part")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with the log-probs: also the "
                                     "most likely alternatives at each position")
    metadata: Metadata | None = None
    truncation: Truncation = Field(None, description='"auto" leaves out the oldest messages (never the leading '
                                   "system ones, the instructions or the newest) when the conversation does not fit "
                                   'the context; "disabled" (default) fails such a request with a 400')
    @field_validator("include")
    @classmethod
    def known_include(cls, include: list[str] | None) -> list[str] | None:
        for value in include or []:
            if value not in RESPONSES_INCLUDE:
                # raised as APIError, not ValueError: pydantic lets it through to the error handler as it is
                raise APIError(400, f"include: this server does not produce {value!r}; it can include "
                               f"{', '.join(RESPONSES_INCLUDE)}", param="include", code="unsupported_parameter")
        return include

    branch_from: str | None = Field(None, description="palmchat's extension, with `conversation`: the item this turn "
                                    "follows, starting a new branch beside the replies that follow it already (an "
                                    "edited message, or with an empty `input` after a user message, a regenerated "
                                    'reply); "" starts a new first message. Default: the end of the current branch')


class ConversationCreateRequest(Body):
    items: list[InputMessage] | None = Field(None, max_length=20)
    metadata: Metadata | None = None


class ConversationUpdateRequest(Body):
    metadata: Metadata


class ItemsCreateRequest(Body):
    items: list[InputMessage] = Field(min_length=1, max_length=20)


class ModerationRequest(Body):
    input: str | list[str]
    model: str | None = None


def clean_text(text: str) -> str:
    """Lone surrogates (JSON can carry them, UTF-8 cannot) become U+FFFD before they reach the tokenizer."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def text_of(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    return clean_text(content if isinstance(content, str) else "".join(p.text for p in content))


def role_of(role: str) -> str:
    return "system" if role == "developer" else role


# -- responses -------------------------------------------------------------------------------------------


def chat_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_completion(id: str, model: str, created: int, choices: list[dict], usage: dict, **extra) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None, **extra}


def chat_choice(index: int, text: str | None, finish_reason: str, refusal: str | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text, "refusal": refusal}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}


def chat_chunk(id: str, model: str, created: int, choices: list[dict], usage: dict | None = None, **extra) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": usage, "system_fingerprint": None, **extra}


def text_completion(id: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def message_item(id: str, role: str, text: str, status: str = "completed", refusal: str | None = None) -> dict:
    """A conversation/response message item. Assistant text is `output_text`, anything else `input_text`."""
    if refusal is not None:
        content = [{"type": "refusal", "refusal": refusal}]
    elif role == "assistant":
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    else:
        content = [{"type": "input_text", "text": text}]
    return {"id": id, "type": "message", "role": role, "status": status, "content": content}


def function_call_item(id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    """A call the model made, as a response's output item (and a conversation's item)."""
    return {"id": id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def function_call_output_item(id: str, call_id: str, output: str) -> dict:
    """A call's result the client sent, as a conversation's item."""
    return {"id": id, "type": "function_call_output", "call_id": call_id, "output": output, "status": "completed"}


def response_object(id: str, model: str, created_at: float, status: str, output: list[dict], *,
                    instructions: str | None, previous_response_id: str | None, conversation_id: str | None,
                    max_output_tokens: int | None, temperature: float | None, top_p: float | None,
                    metadata: dict | None, store: bool, usage: dict | None, incomplete_reason: str | None = None,
                    moderation: dict | None = None, truncation: str = "disabled",
                    truncation_details: dict | None = None, tools: list[dict] | None = None,
                    tool_choice: str | dict = "none", parallel_tool_calls: bool = False,
                    text_format: dict | None = None) -> dict:
    return {
        "id": id, "object": "response", "created_at": created_at, "status": status, "model": model,
        "output": output, "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": instructions, "previous_response_id": previous_response_id,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "max_output_tokens": max_output_tokens, "temperature": temperature, "top_p": top_p,
        "metadata": metadata or {}, "store": store, "usage": usage, "parallel_tool_calls": parallel_tool_calls,
        "tool_choice": tool_choice, "tools": tools or [], "text": {"format": text_format or {"type": "text"}},
        "truncation": truncation,
        "completed_at": time.time() if status in ("completed", "incomplete") else None,
        **({"moderation": moderation} if moderation else {}),
        **({"truncation_details": truncation_details} if truncation_details else {}),
    }


def response_usage(input_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def item_list(items: list[dict], has_more: bool = False) -> dict:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": has_more}


def item_page(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    """One page of a list endpoint: `items` oldest first, turned to `order`, from the one after `after`."""
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(400, f"after: no item with id '{after}'", param="after")
        items = items[ids.index(after) + 1:]
    return item_list(items[:limit], has_more=len(items) > limit)
