"""Structured outputs: JSON that a request's `response_format` (Chat Completions) or `text.format` (Responses)
asks for, guaranteed by constrained decoding with xgrammar (https://github.com/mlc-ai/xgrammar).

At each step a row's grammar matcher gives the set of tokens that keep the output a prefix of a valid document; the
sampler sets every other logit to -inf (palmchat.inference.engine.LogitsProcessor), and once the document is
complete only the reply's stop tokens remain. A random-weight model therefore still writes valid JSON.

    grammar = Grammars(tokenizer, vocab_size=model.config.vocab_size, stop_ids=chat_format.reply_stop_ids)
    compiled = grammar.for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    SamplingParams(..., new_logits_processor=grammar.processor(compiled))   # one matcher per sampled row

Why xgrammar (benchmarks/bench_structured.py, figures in benchmarks/README.md): of the three maintained libraries
(xgrammar, llguidance, outlines-core) its per-step mask is the cheapest or tied with outlines-core's, for palmchat's
own tokenizer and for a 150k-token byte-level BPE like Qwen's, and a new schema compiles fastest (outlines-core builds
an index over the whole vocabulary for each schema, ten times longer at 150k tokens: every request may bring its
own schema). It takes any vocabulary as raw bytes (`token_bytes`), so palmchat's tokenizer needs no Hugging Face
wrapper. `tool_arguments_processor` constrains a tool call's arguments to its JSON schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch

from palmchat.serve.errors import APIError

MAX_SCHEMA_BYTES = 64 * 1024


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is written as -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(hf_tokenizer) -> list[bytes]:
    """The bytes each token id of a `tokenizers.Tokenizer` stands for (b"" for special tokens, which never occur
    in text): byte-level BPE (palmchat's own, GPT-2, Llama 3, Qwen) through its byte alphabet, SentencePiece-style
    BPE (Llama 2, Mistral) with "▁" as a space and <0xNN> byte-fallback pieces."""
    decoder = json.dumps(json.loads(hf_tokenizer.to_str()).get("decoder"))
    byte_level = '"ByteLevel"' in decoder
    byte_decoder = _byte_decoder()
    added = hf_tokenizer.get_added_tokens_decoder()
    out = []
    for i in range(hf_tokenizer.get_vocab_size(with_added_tokens=True)):
        piece = hf_tokenizer.id_to_token(i)
        if piece is None or (i in added and added[i].special):
            out.append(b"")
        elif i in added:  # added plain-text tokens are stored as their text
            out.append(piece.encode())
        elif byte_level and all(c in byte_decoder for c in piece):
            out.append(bytes(byte_decoder[c] for c in piece))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def xgrammar_message(error: Exception) -> str:
    """The first line of an xgrammar error, without the "[01:02:03] file.cc:12: " of its C++ log."""
    text = str(error).strip()
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0]) if text else type(error).__name__


class GrammarMatcher:
    """One row's LogitsProcessor: xgrammar's matcher over the compiled grammar, with its own bitmask buffer."""

    def __init__(self, compiled, vocab_size: int, json_safe: torch.Tensor):
        """json_safe: (ceil(V / 32),) int32, the bits of the tokens any JSON document may hold (Grammars)."""
        import xgrammar as xgr

        self.json_safe = json_safe
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, ceil(V / 32)) int32, bit j of word i: 32i + j
        self.vocab_size = vocab_size

    def allowed(self, tokens: Sequence[int]) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output a prefix of a valid document (only stop tokens at its end)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.bitmask[0] &= self.json_safe
        # little-endian words: byte k holds tokens 8k..8k+7, bit j of it token 8k + j
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits).view(torch.bool)

    def advance(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


class Grammars:
    """Compiles JSON grammars for one tokenizer and model vocabulary (xgrammar's compiler caches them)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        try:
            import xgrammar as xgr
        except ImportError:
            raise APIError(400, "this server cannot constrain replies to JSON: its Python environment lacks xgrammar "
                                "(pip install 'palmchat[structured]')", param="response_format",
                           code="unsupported_parameter") from None

        info = xgr.TokenizerInfo(token_bytes_of(tokenizer), xgr.VocabType.RAW, vocab_size=vocab_size,
                                 stop_token_ids=list(stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size
        # No raw byte below 0x20 is valid anywhere in compact JSON (in a string it must be escaped), but xgrammar's
        # rule for a string with maxLength lets them through: such tokens are masked here for every grammar.
        pieces = token_bytes_of(tokenizer)
        safe = np.ones(-(-vocab_size // 32) * 32, dtype=np.uint8)
        safe[[i for i, b in enumerate(pieces[:vocab_size]) if any(c < 0x20 for c in b)]] = 0
        self.json_safe = torch.from_numpy(np.packbits(safe, bitorder="little").view(np.int32).copy())

    def json_schema(self, schema: dict, param: str):
        """A compiled grammar for documents valid under `schema`, compact (no whitespace between tokens, so that
        a model cannot pad forever; strict: no properties the schema does not name). An invalid or unsupported
        schema is a 400 naming `param`."""
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise APIError(400, f"{param}: the schema is larger than {MAX_SCHEMA_BYTES} bytes", param=param)
        try:
            return self.compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"),
                                                     strict_mode=True)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise APIError(400, f"{param}: invalid JSON schema: {xgrammar_message(e)}", param=param,
                           code="invalid_json_schema") from None

    def json_object(self):
        """A compiled grammar for any JSON object (json_object mode)."""
        return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"),
                                                 strict_mode=False)

    def processor(self, compiled, json_only: bool = True) -> Callable[[], GrammarMatcher]:
        """SamplingParams.new_logits_processor: a fresh matcher for each sampled row. `json_only`: the output is
        JSON only (control bytes masked everywhere); False for a grammar that also allows free text."""
        safe = self.json_safe if json_only else torch.full_like(self.json_safe, -1)
        return lambda: GrammarMatcher(compiled, self.vocab_size, safe)

    def tool_calls(self, syntax, tools: list[dict], param: str = "tools"):
        """A compiled grammar for a reply of free text and tool calls written in `syntax` (a CallSyntax), where a
        call's opening must name one of `tools` (chat-shaped) and its arguments follow that function's schema
        when it is strict (else any JSON object): xgrammar's triggered tags, from the opening tag on."""
        tags = [{"type": "tag", "begin": syntax.opening(t["function"]["name"]),
                 "content": {"type": "json_schema", "json_schema": (
                     t["function"].get("parameters") or {"type": "object"}) if t["function"].get("strict")
                     else {"type": "object"}, "max_whitespace_cnt": 1},
                 "end": "}" + syntax.tail + syntax.close} for t in tools]
        structure = {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [syntax.open or '{"name": '], "tags": tags,
            "at_least_one": False, "stop_after_first": False}}
        text = json.dumps(structure)
        if len(text) > MAX_SCHEMA_BYTES * 4:
            raise APIError(400, f"{param}: the functions' schemas are larger than {MAX_SCHEMA_BYTES * 4} bytes",
                           param=param)
        try:
            return self.compiler.compile_structural_tag(text)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise APIError(400, f"{param}: invalid JSON schema in a strict function: {xgrammar_message(e)}",
                           param=param, code="invalid_json_schema") from None

    def for_response_format(self, response_format: dict | None, param: str = "response_format"):
        """The compiled grammar a Chat Completions `response_format` (or a Responses `text.format`) asks for, or
        None for plain text."""
        kind = (response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_object()
        if kind == "json_schema":
            # Chat Completions nest the fields in "json_schema"; the Responses API puts them beside "type"
            where = f"{param}.json_schema" if "json_schema" in response_format else param
            spec = response_format.get("json_schema", response_format)
            if not isinstance(spec, dict):
                raise APIError(400, f"{where}: an object with name and schema is required", param=where)
            name = spec.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise APIError(400, f"{where}.name: required, 1 to 64 letters, digits, _ or -", param=f"{where}.name")
            schema = spec.get("schema")
            if not isinstance(schema, dict):
                raise APIError(400, f"{where}.schema: a JSON schema object is required", param=f"{where}.schema")
            return self.json_schema(schema, f"{where}.schema")
        raise APIError(400, f"{param}.type: '{kind}' is not one of 'text', 'json_object', 'json_schema'",
                       param=f"{param}.type")

    def tool_arguments_processor(self, parameters: dict, param: str = "tools") -> Callable[[], GrammarMatcher]:
        """For function calling: a processor factory that keeps a tool call's arguments valid under the tool's
        JSON schema (`parameters`)."""
        return self.processor(self.json_schema(parameters or {"type": "object"}, param))


@lru_cache(maxsize=4)
def grammars_for(tokenizer, vocab_size: int, stop_ids: tuple[int, ...]) -> Grammars:
    """The server's Grammars (one per tokenizer: building xgrammar's tokenizer info reads the whole vocabulary)."""
    return Grammars(tokenizer, vocab_size, stop_ids)


def server_grammars(state) -> Grammars:
    stop_ids = tuple(state.tokenizer.chat_format.reply_stop_ids)
    return grammars_for(state.tokenizer, state.scheduler.config.vocab_size, stop_ids)


def compile_format(state, response_format: dict | None, param: str) -> Callable[[], GrammarMatcher] | None:
    """SamplingParams.new_logits_processor for a request's response format (None: plain text)."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    grammars = server_grammars(state)
    return grammars.processor(grammars.for_response_format(response_format, param))


@lru_cache(maxsize=4)
def token_bytes_of(tokenizer) -> list[bytes]:
    """token_bytes of a palmchat tokenizer (palmchat's own or a Hugging Face one), computed once."""
    return token_bytes(tokenizer.hf_tokenizer)


def tool_calls_processor(state, syntax, tools: list[dict]) -> Callable[[], GrammarMatcher]:
    """SamplingParams.new_logits_processor for a reply whose tool calls keep their strict functions' schemas
    (Grammars.tool_calls), for the server's tokenizer."""
    grammars = server_grammars(state)
    return grammars.processor(grammars.tool_calls(syntax, tools), json_only=False)


def tool_arguments_processor(state, parameters: dict, param: str = "tools") -> Callable[[], GrammarMatcher]:
    """SamplingParams.new_logits_processor that keeps a tool call's arguments valid under the tool's JSON schema
    (`parameters`), for the server's tokenizer; an invalid schema is a 400 naming `param`."""
    return server_grammars(state).tool_arguments_processor(parameters, param)
