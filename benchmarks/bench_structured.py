"""Structured outputs: the per-step cost of a JSON-schema token mask in three maintained grammar libraries
(xgrammar, llguidance, outlines-core), and what constrained decoding costs palmchat's decode.

    python benchmarks/bench_structured.py            # pip install xgrammar llguidance outlines-core first
    python benchmarks/bench_structured.py --quick    # smaller vocabulary and fewer steps

Two tokenizers: palmchat's own (byte-level BPE trained on the bundled world, the demo's 2048 ids) and a byte-level
BPE with Qwen2's pre-tokenizer trained on this machine's Python standard library to about Qwen's vocabulary size
(no download: the mask cost depends on the vocabulary's size and shape, not on which text trained it).

1. Mask cost: every library compiles the same JSON schema, then B matchers (batch 1 and 8) walk the tokens of a
   valid document; per step each fills its row of the batch's token mask. Printed: median milliseconds per decode
   step (all B rows), compile time (the tokenizer's vocabulary and the schema), and for palmchat's glue
   (palmchat.serve.structured over xgrammar) the time including the bool mask the sampler applies.
2. Decode: palmchat's engine (the demo's model shape, random weights, bf16 inference copy) generates up to 64
   tokens per row unconstrained and constrained to the schema, batch 1 and 8; printed: the median milliseconds per
   decode step while every row is still generating, and the slowdown.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from palmchat.inference.engine import Engine, SamplingParams  # noqa: E402
from palmchat.model.config import preset  # noqa: E402
from palmchat.model.transformer import Transformer  # noqa: E402
from palmchat.serve.structured import Grammars, token_bytes  # noqa: E402

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
            "address": {"city": "London", "zip": "W1"}, "active": True}


class Vocab:
    """A tokenizers.Tokenizer with what the libraries need: token bytes, the stop id, a text encoder."""

    def __init__(self, name, hf_tokenizer, stop_id: int):
        self.name, self.hf_tokenizer, self.stop_id = name, hf_tokenizer, stop_id
        self.size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.bytes = token_bytes(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids


def palmchat_vocab() -> Vocab:
    from palmchat.tokenizer.bpe import train_tokenizer
    from palmchat.world.synthetic import World

    tok = train_tokenizer(World(seed=0).pretraining_documents(2000), vocab_size=2048)
    return Vocab(f"palmchat BPE ({tok.vocab_size} ids)", tok.hf_tokenizer, tok.chat_format.eot_id)


def qwen_like_vocab(size: int) -> Vocab:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        for f in sorted(glob.glob(f"{Path(json.__file__).parent.parent}/**/*.py", recursive=True)):
            try:
                yield Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                pass

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts(), trainer=trainers.BpeTrainer(
        vocab_size=size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Vocab(f"Qwen-style byte-level BPE ({tok.get_vocab_size()} ids)", tok, tok.token_to_id("<|im_end|>"))


# -- the libraries: compile(vocab) -> a factory of matchers with fill(bitmask, row) and accept(token) ----------


def xgrammar_matchers(vocab: Vocab):
    import xgrammar as xgr

    info = xgr.TokenizerInfo(vocab.bytes, xgr.VocabType.RAW, vocab_size=vocab.size, stop_token_ids=[vocab.stop_id])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))

    class M:
        def __init__(self):
            self.m = xgr.GrammarMatcher(compiled)

        def fill(self, bitmask, row):
            self.m.fill_next_token_bitmask(bitmask, row)

        def accept(self, token):
            assert self.m.accept_token(token), token

    return M, lambda B: xgr.allocate_token_bitmask(B, vocab.size)


def llguidance_matchers(vocab: Vocab):
    import llguidance
    import llguidance.torch

    class Wrapped:
        eos_token_id, bos_token_id = vocab.stop_id, None
        tokens = vocab.bytes
        special_token_ids = [i for i, b in enumerate(vocab.bytes) if not b]

        def __call__(self, text):
            return vocab.encode(text.decode() if isinstance(text, bytes) else text)

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=vocab.size)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False})

    class M:
        def __init__(self):
            self.m = llguidance.LLMatcher(tokenizer, grammar)
            assert not self.m.is_error(), self.m.get_error()

        def fill(self, bitmask, row):
            llguidance.torch.fill_next_token_bitmask(self.m, bitmask, row)

        def accept(self, token):
            assert self.m.consume_token(token), self.m.get_error()

    return M, lambda B: llguidance.torch.allocate_token_bitmask(B, vocab.size)


def outlines_matchers(vocab: Vocab):
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    pieces: dict[bytes, list[int]] = {}
    for i, b in enumerate(vocab.bytes):
        if b and i != vocab.stop_id:
            pieces.setdefault(b, []).append(i)
    index = outlines_core.Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=""),
                                outlines_core.Vocabulary(vocab.stop_id, pieces))

    class M:
        def __init__(self):
            self.g = outlines_core.Guide(index)

        def fill(self, bitmask, row):
            self.g.write_mask_into(bitmask[row].data_ptr(), bitmask[row].numel(), bitmask.element_size())

        def accept(self, token):
            self.g.advance(token)

    return M, lambda B: torch.zeros(B, (vocab.size + 31) // 32, dtype=torch.int32)


LIBRARIES = {"xgrammar": xgrammar_matchers, "llguidance": llguidance_matchers, "outlines-core": outlines_matchers}


def mask_cost(vocab: Vocab, library: str, batch: int, repeats: int) -> tuple[float, float]:
    """(compile seconds, milliseconds per decode step filling `batch` rows' masks)."""
    start = time.perf_counter()
    make, bitmask_of = LIBRARIES[library](vocab)
    compile_s = time.perf_counter() - start
    trajectory = vocab.encode(json.dumps(DOCUMENT, separators=(",", ":"))) + [vocab.stop_id]
    bitmask = bitmask_of(batch)
    times = []
    for _ in range(repeats):
        matchers = [make() for _ in range(batch)]
        for token in trajectory:
            start = time.perf_counter()
            for b, m in enumerate(matchers):
                m.fill(bitmask, b)
            times.append(time.perf_counter() - start)
            assert (bitmask[0, token // 32] >> (token % 32)) & 1, f"{library}: the document's token {token} masked"
            for m in matchers:
                m.accept(token) if token != vocab.stop_id else None
    return compile_s, 1000 * statistics.median(times)


def glue_cost(vocab: Vocab, batch: int, repeats: int) -> float:
    """Milliseconds per decode step of palmchat's processors (palmchat.serve.structured): masks as bool rows."""

    class Tok:
        hf_tokenizer = vocab.hf_tokenizer

    grammars = Grammars(Tok(), vocab.size, [vocab.stop_id])
    new = grammars.processor(grammars.json_schema(SCHEMA, "schema"))
    trajectory = vocab.encode(json.dumps(DOCUMENT, separators=(",", ":")))
    times = []
    new().allowed(())  # warm-up
    for _ in range(repeats):
        rows = [new() for _ in range(batch)]
        for token in trajectory:
            start = time.perf_counter()
            masks = [r.allowed(()) for r in rows]
            times.append(time.perf_counter() - start)
            assert masks[0][token]
            for r in rows:
                r.advance(token)
    return 1000 * statistics.median(times)


def decode_step_ms(vocab: Vocab, batch: int, tokens: int) -> tuple[float, float]:
    """(unconstrained, constrained) median milliseconds per decode step of palmchat's engine on the demo's model
    shape (random weights, bf16 copy), over the steps where all `batch` rows were still generating (a constrained
    row ends when its document does, so whole-run tokens/s would compare batches of different sizes)."""

    class Tok:
        hf_tokenizer = vocab.hf_tokenizer

    torch.manual_seed(0)
    model = Transformer(preset("mini", vocab_size=vocab.size)).eval()
    engine = Engine(model, dtype=torch.bfloat16)
    grammars = Grammars(Tok(), vocab.size, [vocab.stop_id])
    new = grammars.processor(grammars.json_schema(SCHEMA, "schema"))
    prompt = vocab.encode("Write the record as JSON:")
    medians = []
    for constrained in (False, True):
        params = [SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=i, stop_token_ids=(vocab.stop_id,),
                                 new_logits_processor=new if constrained else None) for i in range(batch)]
        engine.generate([prompt] * batch, params)  # warm-up (and the bf16 copy)
        times, full = [], []
        for events in engine.stream([prompt] * batch, params):
            times.append(time.perf_counter())
            full.append(len(events) == batch)
        steps = [b - a for a, b, all_rows in zip(times, times[1:], full[1:]) if all_rows]
        medians.append(1000 * statistics.median(steps))
    return medians[0], medians[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 32k vocabulary and one repeat")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated, of " + ", ".join(LIBRARIES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else 3
    for module in ("xgrammar", "llguidance", "outlines_core"):  # imported before timing: compile times exclude it
        __import__(module)
    vocabs = [palmchat_vocab(), qwen_like_vocab(32768 if args.quick else 151643)]
    print(f"torch threads: 1; schema: {len(SCHEMA['properties'])} properties, nested object and array")
    print(f"{'tokenizer':44} {'library':14} {'compile s':>9} {'mask ms/step B=1':>17} {'B=8':>8}")
    for vocab in vocabs:
        for library in args.libraries.split(","):
            try:
                compile_s, one = mask_cost(vocab, library, 1, repeats)
                _, eight = mask_cost(vocab, library, 8, repeats)
                print(f"{vocab.name:44} {library:14} {compile_s:9.2f} {one:17.3f} {eight:8.3f}")
            except Exception as e:  # noqa: BLE001 - a library that cannot do it is reported, not fatal
                print(f"{vocab.name:44} {library:14} failed: {type(e).__name__}: {str(e)[:80]}")
        print(f"{vocab.name:44} {'palmchat glue':14} {'':9} {glue_cost(vocab, 1, repeats):17.3f} "
              f"{glue_cost(vocab, 8, repeats):8.3f}   (xgrammar + the bool mask the sampler applies)")
    print(f"\n{'tokenizer':44} {'batch':>5} {'free ms/step':>12} {'JSON ms/step':>12} {'slowdown':>8}")
    for vocab in vocabs:
        for batch in (1, 8):
            free, constrained = decode_step_ms(vocab, batch, 32 if args.quick else 64)
            print(f"{vocab.name:44} {batch:5} {free:12.2f} {constrained:12.2f} {constrained / free:7.2f}x")


if __name__ == "__main__":
    main()
