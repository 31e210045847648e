"""Structured outputs in-process (palmchat.serve.structured): token bytes and grammar-constrained decoding with
palmchat's own tokenizer and Hugging Face tokenizers of real families' formats (byte-level BPE as Qwen and Llama 3,
SentencePiece-style BPE with byte fallback as Mistral), on tiny random models."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from hf_tokenizers import save_tiny_hf_tokenizer
from pydantic import BaseModel, Field
from server_fixtures import world_tokenizer

from palmchat.inference.engine import Engine, SamplingParams
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer
from palmchat.serve.errors import APIError
from palmchat.serve.structured import Grammars, token_bytes
from palmchat.tokenizer.hf import HFTokenizer

TEXTS = ["The cat sat on the mat.", 'def add(a, b): return {"sum": a + b}', "naïve café – 日本 🐍\n\tend"]


class Call(BaseModel):
    function: Literal["get_weather", "add"]
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=14)
    units: list[Literal["c", "f"]] = Field(max_length=2)


@pytest.fixture(scope="module", params=["palmchat", "qwen2.5", "llama3", "mistral"])
def tokenizer(request, tmp_path_factory):
    if request.param == "palmchat":
        return world_tokenizer()
    return HFTokenizer.load(save_tiny_hf_tokenizer(tmp_path_factory.mktemp(request.param), request.param))


def test_token_bytes_spell_out_the_text(tokenizer):
    pieces = token_bytes(tokenizer.hf_tokenizer)
    for text in TEXTS:
        spelled = b"".join(pieces[t] for t in tokenizer.encode(text))
        # SentencePiece-style tokenizers add a space before the text (decoding strips it)
        assert spelled in (text.encode(), b" " + text.encode())
    special = tokenizer.chat_format.reply_stop_ids
    assert all(pieces[t] == b"" for t in special)


def test_constrained_decoding_gives_valid_json_for_any_seed(tokenizer):
    vocab = tokenizer.vocab_size + 5  # a model's vocabulary may be padded past the tokenizer's
    torch.manual_seed(0)
    engine = Engine(Transformer(preset("tiny", vocab_size=vocab, init_std=0.3, max_seq_len=256)).eval())
    stops = tokenizer.chat_format.reply_stop_ids
    grammars = Grammars(tokenizer, vocab, stops)
    new = grammars.processor(grammars.for_response_format(
        {"type": "json_schema", "json_schema": {"name": "call", "schema": Call.model_json_schema(), "strict": True}}))
    params = [SamplingParams(max_new_tokens=200, temperature=1.0, seed=s, stop_token_ids=stops,
                             new_logits_processor=new) for s in range(4)]
    prompt = tokenizer.encode("Call a function:")
    for out in engine.generate([prompt] * 4, params):
        assert out.finish_reason == "stop" and out.tokens[-1] in stops
        Call.model_validate_json(tokenizer.decode(out.tokens[:-1]))
    any_object = grammars.processor(grammars.for_response_format({"type": "json_object"}))
    out = engine.generate([prompt], SamplingParams(max_new_tokens=60, temperature=0.0, stop_token_ids=stops,
                                                   new_logits_processor=any_object))[0]
    text = tokenizer.decode([t for t in out.tokens if t not in stops])
    # greedy on a random model may run to the limit inside a string; what it wrote is a JSON object's prefix
    assert text.startswith("{") and (out.finish_reason == "length" or isinstance(json.loads(text), dict))


def test_tool_arguments_processor_and_schema_errors():
    tokenizer = world_tokenizer()
    grammars = Grammars(tokenizer, tokenizer.vocab_size, tokenizer.chat_format.reply_stop_ids)
    processor = grammars.tool_arguments_processor(Call.model_json_schema())()
    allowed = processor.allowed([])
    assert allowed.shape == (tokenizer.vocab_size,) and allowed.sum() >= 1
    assert all(token_bytes(tokenizer.hf_tokenizer)[t].startswith(b"{") for t in torch.nonzero(allowed).flatten())
    with pytest.raises(APIError) as e:
        grammars.tool_arguments_processor({"type": "nope"}, param="tools.0.function.parameters")
    assert e.value.param == "tools.0.function.parameters" and "nope" in e.value.message
    assert "json_schema_converter" not in e.value.message  # not the library's C++ log prefix


@pytest.mark.parametrize("family", ["qwen2.5", "mistral"])
def test_every_released_token_gets_its_logprobs(family, tmp_path):
    """The chat log-probs of a reply cover all its released tokens, in byte-level and SentencePiece-style
    vocabularies; the tokens a stop string cuts are not reported."""
    from palmchat.inference.engine import TokenLogprobs
    from palmchat.serve.generate import Reply
    from palmchat.serve.logprobs import LogprobsCursor, chat_logprobs

    tokenizer = HFTokenizer.load(save_tiny_hf_tokenizer(tmp_path, family))
    tokens = tokenizer.encode("Hello there! How are you today?")
    for stops in ([], ["you"]):
        reply = Reply(tokenizer, stops=stops)
        cursor, entries = LogprobsCursor(tokenizer, reply), []
        for i, t in enumerate(tokens):
            reply.add([t], "length" if i == len(tokens) - 1 else None, [TokenLogprobs(-0.5 * i, ((t, -0.1),))])
            entries += chat_logprobs(cursor)["content"]
            if reply.finish_reason:
                break
        assert [e["logprob"] for e in entries] == [-0.5 * i for i in range(len(entries))]
        assert "".join(e["token"] for e in entries).strip() == reply.text.strip()
        if not stops:
            assert len(entries) == len(tokens) and reply.text.strip() == "Hello there! How are you today?"
        else:
            assert reply.text.strip() == "Hello there! How are"
