"""From a request body to what generation runs: the model it names (and its ':best-of-N' suffix), how many
choices and best-of candidates, the sampling parameters within this server's limits, and the prompt fitted to
the context."""

from __future__ import annotations

import re
from dataclasses import replace

from palmchat.inference.engine import SamplingParams
from palmchat.serve import schemas as S
from palmchat.serve import structured
from palmchat.serve.errors import APIError
from palmchat.serve.state import ServerState
from palmchat.serve.truncation import Fitted, drop_oldest_messages

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


def route_model(state: ServerState, model: str | None) -> tuple[str | None, int | None]:
    """A request's `model` -> (LoRA adapter or None for the base, N of a ':best-of-N' suffix or None). Names are
    the base's id, an adapter's name alone or after the base's id ("BASE:name", as vLLM and LoRAX take them), each
    with an optional ':best-of-N' suffix; None (the Responses API's default) is the base."""
    if model is None:
        return None, None
    rest = model[len(state.model_id) + 1:] if model.startswith(state.model_id + ":") else model
    if rest == state.model_id:
        rest = ""
    name, _, suffix = rest.partition(":")
    if re.fullmatch(r"best-of-.*", name) and rest != model:  # "BASE:best-of-N"
        name, suffix = "", name if not suffix else f"{name}:{suffix}"
    if name and name not in state.adapters:
        served = f"'{state.model_id}'" + (f" and the adapters {', '.join(map(repr, state.adapters))}"
                                          if state.adapters else "")
        raise APIError(404, f"The model '{model}' does not exist; this server serves {served}", param="model",
                       code="model_not_found")
    if not suffix:
        return name or None, None
    m = re.fullmatch(r"best-of-(\d{1,3})", suffix)
    if not m or not 1 <= int(m.group(1)) <= S.MAX_CHOICES:
        raise APIError(400, f"model '{model}': the only suffix is ':best-of-N' with N from 1 to {S.MAX_CHOICES}",
                       param="model")
    if state.reward_model is None:
        raise APIError(400, f"model '{model}': best-of-n needs a reward model; start the server with --reward-model",
                       param="model")
    return name or None, int(m.group(1))


def model_candidates(state: ServerState, model: str | None) -> int | None:
    """Check `model` names this server's model or one of its adapters; returns N of a ':best-of-N' suffix."""
    return route_model(state, model)[1]


def choice_counts(state: ServerState, body, mean_logprob_fallback: bool = False) -> tuple[int, int | None]:
    """(n, candidates): candidates is the best-of count (the body's best_of, else the model suffix) or None.
    mean_logprob_fallback: best_of without a reward model ranks by mean log-prob (completions, as OpenAI's)."""
    suffix = model_candidates(state, body.model)
    candidates = body.best_of or suffix
    if body.best_of and state.reward_model is None and not mean_logprob_fallback:
        raise APIError(400, "best_of needs a reward model; start the server with --reward-model", param="best_of")
    if candidates is not None and candidates < body.n:
        raise APIError(400, f"best_of ({candidates}) must be at least n ({body.n})", param="best_of")
    if candidates == 1 and body.n == 1:
        candidates = None  # best of one is a plain sample
    return body.n, candidates


def sampling_params(state: ServerState, body, prompt_len: int, max_tokens: int | None, param: str, input_param: str,
                    owner: str, default_max: int | None = None) -> SamplingParams:
    """The body's sampling settings, with the reply length checked against the server's limit and the context;
    `owner` (the caller's key) salts the prefix cache: no key reuses the K/V of another key's prompts."""
    limit, ctx = state.max_tokens_limit, state.context
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"{param} is {max_tokens}, more than this server's limit of {limit}", param=param,
                       code="integer_above_max_value")
    room = ctx - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, and the input has {prompt_len} "
                            f"tokens: no room is left for a reply", param=input_param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the input, {max_tokens} in {param})",
                       param=param, code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else max(body.top_p, 1e-6)  # 0 keeps the single most likely token
    seed = body.seed if "seed" in type(body).model_fields else None  # not an extra field a client made up
    return SamplingParams(max_new_tokens=max_tokens or min(room, limit, default_max or room), temperature=temperature,
                          top_p=top_p, seed=None if seed is None else seed % 2**62,
                          stop_token_ids=state.tokenizer.chat_format.reply_stop_ids, cache_salt=owner,
                          adapter=route_model(state, body.model)[0], **sampling_controls(state, body))


def sampling_controls(state: ServerState, body) -> dict:
    """The SamplingParams fields of the body's penalties, logit bias, top-k, min-p, log-probs and response format
    (only the fields its type declares: an extra a client made up is not read)."""
    declared = type(body).model_fields

    def field(name, default=None):
        value = getattr(body, name, None) if name in declared else None
        return default if value is None else value

    vocab = state.scheduler.config.vocab_size
    bias = {int(k): v for k, v in field("logit_bias", {}).items()}
    if any(t >= vocab for t in bias):
        raise APIError(400, f"logit_bias: token id {max(bias)} is not in the model's vocabulary of {vocab} tokens",
                       param="logit_bias")
    logprobs = field("logprobs")
    if "include" in declared:  # the Responses API: included as output data, with top_logprobs alternatives
        logprobs = field("top_logprobs", 0) if "message.output_text.logprobs" in field("include", []) else None
    elif "top_logprobs" in declared:  # Chat Completions: logprobs true/false, and top_logprobs alternatives
        if field("top_logprobs") is not None and not logprobs:
            raise APIError(400, "top_logprobs: logprobs must be true when top_logprobs is set", param="top_logprobs")
        logprobs = field("top_logprobs", 0) if logprobs else None
    grammar = None
    if "response_format" in declared:
        grammar = structured.compile_format(state, field("response_format"), "response_format")
    elif "text" in declared and body.text is not None:
        grammar = structured.compile_format(state, body.text.format, "text.format")
    return dict(presence_penalty=field("presence_penalty", 0.0), frequency_penalty=field("frequency_penalty", 0.0),
                repetition_penalty=field("repetition_penalty", 1.0), logit_bias=bias, top_k=max(field("top_k", 0), 0),
                min_p=field("min_p", 0.0), logprobs=logprobs, new_logits_processor=grammar)


def fit_prompt(state: ServerState, prompt: list[int], max_tokens: int | None, truncation: str | None) -> Fitted:
    """The prompt as it will run. With truncation "auto" its oldest messages are left out until the reply has room
    for `max_tokens`, or when that is unset for a quarter of the context (then it may use all the room left)."""
    if truncation != "auto":
        return Fitted(prompt)
    reserve = max_tokens or min(state.max_tokens_limit, state.context // 4)
    return drop_oldest_messages(prompt, state.tokenizer.chat_format, state.context - reserve,
                                quantum=max(1, state.context // 8))


def stops_of(stop) -> list[str]:
    """The body's stop strings (schemas allow MAX_STOPS of them), each at most MAX_STOP_CHARS long: every
    generated token is matched against the reply's unreleased tail, as long as the longest stop."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}", param="stop")
    longest = max(stops, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise APIError(400, f"stop: a stop sequence is at most {MAX_STOP_CHARS} characters, got one of "
                            f"{len(longest)}", param="stop", code="string_above_max_length")
    return stops


def constrain_tool_calls(state: ServerState, params: SamplingParams, tools) -> SamplingParams:
    """Tool calls kept valid under their functions' JSON schemas by constrained decoding: a forced call's arguments
    (the reply starts right after its opening), and with strict functions offered, every call the model makes by
    itself. A response format cannot apply at the same time."""
    schema = tools.arguments_schema() if tools is not None else None
    strict = tools is not None and tools.strict_calls()
    if schema is None and not strict:
        return params
    if params.new_logits_processor is not None:
        raise APIError(400, "a response format cannot be combined with a forced tool call (the reply is the call) "
                            "or with strict functions", param="tool_choice" if schema is not None else "tools")
    if schema is not None:
        return replace(params, new_logits_processor=structured.tool_arguments_processor(state, schema, "tools"))
    return replace(params, new_logits_processor=structured.tool_calls_processor(state, tools.syntax, tools.tools))
