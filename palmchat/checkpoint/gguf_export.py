"""GGUF export: one palmchat model and its tokenizer as a single file that llama.cpp and Ollama run.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a header of typed key/values (architecture,
sizes, tokenizer, chat template) followed by named tensors. llama.cpp knows a model by its architecture name and
its tensor names, so each palmchat block maps onto the llama.cpp architecture that computes the same block, as
llama.cpp's own convert_hf_to_gguf.py maps the Hugging Face families palmchat imports (`gguf_architecture`):

- sequential block with RMSNorm (palmchat's, Llama 1-3.x, Mistral without a binding window) -> "llama": qkv splits
  into attn_q/attn_k/attn_v and gate_up into ffn_gate/ffn_up, with their optional biases; Llama 3.1's rope scaling
  is a rope_freqs tensor of per-frequency divisors;
- the same with q/k/v biases only (Qwen2/2.5) -> "qwen2"; with q/k RMSNorms (Qwen3) -> "qwen3" (attn_q_norm and
  attn_k_norm);
- parallel block on one LayerNorm without bias (PaLM, Cohere) -> "command-r": llama.cpp's command-r block is
  y = x + Attn(LN(x)) + SwiGLU(LN(x)) with a bias-free LayerNorm, tied output embedding and the same rotary;
  the fused in_proj splits into attn_q/attn_k/attn_v/ffn_gate/ffn_up.

Rotary layout: palmchat rotates halves (dims j and j + D/2, as Hugging Face Llama), llama.cpp's "llama" and
"command-r" rotate adjacent pairs (2j, 2j + 1). Permuting each head's q and k rows (and biases) so that row 2j + s
takes row s * D/2 + j (convert_hf_to_gguf.py's LlamaModel.permute) makes the two compute the same attention scores:
scores are dot products over the head dim, which a common permutation of q and k leaves unchanged. "qwen2" and
"qwen3" rotate halves (llama.cpp's NEOX rope), so their rows are written as they are.

The tokenizer goes in as GGUF's "gpt2" byte-level BPE vocabulary. palmchat's own: llama.cpp's "gpt-2"
pre-tokenizer (the regex and byte mapping of palmchat's ByteLevel pre-tokenizer), palmchat's specials as control
tokens, and the chat format as a Jinja chat template, which llama.cpp and llama-cpp-python render; `export_main`
also writes an Ollama Modelfile beside the file, since Ollama renders only templates it recognises. A Hugging Face
tokenizer folder (palmchat/tokenizer/hf.py): its vocabulary, merges and added tokens as convert_hf_to_gguf.py
writes them, llama.cpp's pre-tokenizer chosen by the tokenizer.json pipeline it reproduces ("llama-bpe" for
Llama 3's regex split, "qwen2" for Qwen2's, "gpt-2", "smollm"; llama.cpp's converter hashes a probe text's ids
instead, which only works for the published vocabularies), the chat template's end-of-turn token as eos, and the
model's own chat template(s).

Whatever is not mapped is refused by name (ValueError / CheckpointError) rather than written wrong: a config field
the chosen architecture does not compute at a non-default value (GPT-NeoX's two norms, Gemma's offsets, a sliding
window shorter than the context), a tensor the mapping does not consume (an unmerged LoRA adapter), a block/norm
pair no llama.cpp architecture computes, a tokenizer whose pre-tokenization or normalizer llama.cpp cannot
reproduce (SentencePiece-style Llama 2 / Mistral v0.1 tokenizers among them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palmchat.checkpoint.errors import CheckpointError
from palmchat.checkpoint.native import TOKENIZER_FILE, load_model, resolve
from palmchat.model.config import ModelConfig
from palmchat.tokenizer.chat_format import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
    PALMCHAT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
)
from palmchat.tokenizer.hf import is_hf_tokenizer_folder
from palmchat.utils.args import arg
from palmchat.utils.atomic import atomic_path, atomic_write

__all__ = ["DTYPES", "OLLAMA_MODELFILE", "ExportGGUFArgs", "export_gguf", "export_main",
           "gguf_architecture", "permute_for_interleaved_rope", "rope_frequency_factors"]

# dtype -> (tensor type of the 2-D weights, general.file_type). Norm weights stay f32, as llama.cpp's converter
# writes them (ggml computes norms in f32 and the vectors are tiny).
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}

# ModelConfig fields whose every value the export maps (or that do not change what the model computes).
# A field missing here (one a later family adds, such as q/k/v biases or a sliding window) is refused by name
# when it differs from its default, until a mapping for it is written.
MAPPED_CONFIG_FIELDS = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "block",
                        "norm", "norm_eps", "rope_theta", "rope_scaling", "tie_embeddings", "max_seq_len",
                        "init_std", "sliding_window"}  # a window no shorter than max_seq_len: gguf_architecture
# What each llama.cpp architecture adds to those (llama.cpp's src/models/<arch>.cpp): llama takes optional biases on
# q/k/v, the attention output and the feed-forward, and Llama 3.1's rope as a rope_freqs tensor of per-frequency
# divisors; qwen2 optional q/k/v biases (and no other); qwen3 q/k RMSNorms and optional q/k/v biases.
ARCH_CONFIG_FIELDS = {
    "llama": MAPPED_CONFIG_FIELDS | {"qkv_bias", "attn_out_bias", "ffn_bias", "rope_type", "rope_low_freq_factor",
                                     "rope_high_freq_factor", "rope_original_max_len"},
    "qwen2": MAPPED_CONFIG_FIELDS | {"qkv_bias"},
    "qwen3": MAPPED_CONFIG_FIELDS | {"qk_norm", "qkv_bias"},
    "command-r": MAPPED_CONFIG_FIELDS,
}

# Ollama takes a GGUF's chat template only when it recognises it as one of its own, so a model in palmchat's
# format needs a Modelfile naming the same layout as a Go template. Ollama's tokenizer adds the bos token itself
# (tokenizer.ggml.add_bos_token), so the template starts at the first message. (Written from Ollama's Modelfile
# documentation; no Ollama ran in palmchat's tests.)
OLLAMA_MODELFILE = (
    'FROM ./{gguf}\n'
    'TEMPLATE """{{{{- range .Messages }}}}<|{{{{ .Role }}}}|>{{{{ .Content }}}}' + EOT_TOKEN + '{{{{ end }}}}'
    + ASSISTANT_TOKEN + '"""\n'
    'PARAMETER stop "' + EOT_TOKEN + '"\n'
)


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that computes `config`'s block, or ValueError naming what has none."""
    def refuse(field: str, why: str):
        raise ValueError(f"GGUF export: model config {field}={getattr(config, field)!r} {why}")

    # llama.cpp's llama, qwen2 and qwen3 attend to the whole context: a window is exact only when it never binds
    if config.sliding_window is not None and config.sliding_window < config.max_seq_len:
        refuse("sliding_window", f"is shorter than max_seq_len={config.max_seq_len}, and llama.cpp's llama, qwen2 "
                                 f"and qwen3 architectures have no sliding-window attention (as Mistral v0.1 has)")
    if config.block == "sequential" and config.norm == "rmsnorm":
        if config.qk_norm:
            arch = "qwen3"
        elif (config.qkv_bias and not config.attn_out_bias and not config.ffn_bias and config.rope_type == "linear"
              and config.n_heads * config.head_dim == config.dim):
            arch = "qwen2"
        else:
            arch = "llama"
    elif config.block == "parallel" and config.norm == "layernorm":
        arch = "command-r"
    else:
        arch = None
    # the config with every field the architecture does not map at its default (as the default resolves for this
    # shape): what differs is refused by name
    mapped = ARCH_CONFIG_FIELDS.get(arch, MAPPED_CONFIG_FIELDS)
    defaults = ModelConfig(**{k: v for k, v in config.to_dict().items() if k in mapped}).to_dict()
    for field, value in config.to_dict().items():
        if value != defaults[field]:
            where = f"llama.cpp's {arch} architecture" if arch else "the GGUF export"
            refuse(field, f"has no mapping in {where} (a model imported from Hugging Face: write it with "
                          f"`palmchat export-hf` and convert that folder with llama.cpp's convert_hf_to_gguf.py)")
    if arch is None:
        raise ValueError(f"GGUF export: block={config.block!r} with norm={config.norm!r} has no llama.cpp "
                         f"architecture that computes it (exportable: sequential + rmsnorm -> llama, qwen2 or "
                         f"qwen3, parallel + layernorm -> command-r)")
    if arch == "command-r":
        # llama.cpp's command-r reads its output projection from token_embd, sizes q and the attention output as
        # n_embd x n_embd, and expects q/k norms from 64 layers on (Command R+): refuse what breaks those
        if not config.tie_embeddings:
            raise ValueError("GGUF export: a parallel block with untied embeddings (tie_embeddings=False) has no "
                             "llama.cpp architecture: command-r always uses token_embd as its output projection")
        if config.n_heads * config.head_dim != config.dim:
            raise ValueError(f"GGUF export: a parallel block needs n_heads * head_dim == dim for llama.cpp's "
                             f"command-r (got {config.n_heads} * {config.head_dim} != {config.dim})")
        if config.n_layers >= 64:
            raise ValueError(f"GGUF export: llama.cpp's command-r expects q/k norms from 64 layers on; "
                             f"n_layers={config.n_layers} without them is not exportable")
    return arch


def permute_for_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * D, in) q or k rows in rotate-half order -> the adjacent-pair order llama.cpp rotates:
    within each head, row 2j + s takes row s * D/2 + j."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(tensor, block: int | None = None, kind: str = "weight") -> str:
    import gguf

    return gguf.TENSOR_NAMES[tensor].format(bid=block) + "." + kind


def rope_frequency_factors(config: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) float32 divisors of each rotary frequency: llama.cpp's rope_freqs tensor, which its llama
    architecture applies as theta_i / factor_i (how convert_hf_to_gguf.py writes Llama 3.1's rope scaling)."""
    from palmchat.model.rope import inverse_frequencies

    plain = inverse_frequencies(dataclasses.replace(config, rope_type="linear", rope_scaling=1.0))
    return (plain / inverse_frequencies(config)).to(torch.float32)


def _gguf_tensors(model: torch.nn.Module, config: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) pairs of the whole model in llama.cpp's layout; refuses a model holding any tensor the
    mapping leaves unread."""
    from gguf import MODEL_TENSOR as T

    state = model.state_dict()
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    # llama and command-r rotate adjacent pairs (rope type NORM), qwen2 and qwen3 halves as palmchat (NEOX)
    interleaved = arch in ("llama", "command-r")
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name].detach()

    expected = {"embed.weight", "norm.weight"} | ({"lm_head.weight"} if not c.tie_embeddings else set())
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        names = ["norm.weight", "in_proj.weight", "attn_out.weight", "ff_out.weight"] if arch == "command-r" else \
            ["attn_norm.weight", "qkv.weight", "attn_out.weight", "ff_norm.weight", "gate_up.weight", "ff_out.weight"]
        names += ["qkv.bias"] * c.qkv_bias + ["attn_out.bias"] * c.attn_out_bias + \
            ["gate_up.bias", "ff_out.bias"] * c.ffn_bias + ["q_norm.weight", "k_norm.weight"] * c.qk_norm
        expected |= {p + n for n in names}
    unmapped = sorted(set(state) - expected)
    if unmapped:
        hint = " (a LoRA adapter: merge it first, palmchat.model.lora.merge_lora)" if any(
            "lora" in n for n in unmapped) else ""
        raise ValueError(f"GGUF export: model tensors with no GGUF mapping: {', '.join(unmapped[:6])}"
                         f"{' ...' if len(unmapped) > 6 else ''}{hint}")

    def q_and_k(kind: str, wq: torch.Tensor, wk: torch.Tensor, i: int):
        if interleaved:
            wq, wk = permute_for_interleaved_rope(wq, c.n_heads), permute_for_interleaved_rope(wk, c.n_kv_heads)
        yield _gguf_name(T.ATTN_Q, i, kind), wq
        yield _gguf_name(T.ATTN_K, i, kind), wk

    yield _gguf_name(T.TOKEN_EMBD), take("embed.weight")
    if arch == "llama" and c.rope_type == "llama3":
        yield _gguf_name(T.ROPE_FREQS), rope_frequency_factors(c)
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        if arch == "command-r":
            yield _gguf_name(T.ATTN_NORM, i), take(p + "norm.weight")
            wq, wk, wv, gate, up = take(p + "in_proj.weight").split((q, kv, kv, c.ffn_hidden, c.ffn_hidden))
        else:
            yield _gguf_name(T.ATTN_NORM, i), take(p + "attn_norm.weight")
            wq, wk, wv = take(p + "qkv.weight").split((q, kv, kv))
            yield _gguf_name(T.FFN_NORM, i), take(p + "ff_norm.weight")
            gate, up = take(p + "gate_up.weight").chunk(2)
        yield from q_and_k("weight", wq, wk, i)
        yield _gguf_name(T.ATTN_V, i), wv
        if c.qkv_bias:
            bq, bk, bv = take(p + "qkv.bias").split((q, kv, kv))
            yield from q_and_k("bias", bq, bk, i)
            yield _gguf_name(T.ATTN_V, i, "bias"), bv
        if c.qk_norm:  # per-head RMSNorm weights, over the head dim in palmchat's (= qwen3's NEOX) order
            yield _gguf_name(T.ATTN_Q_NORM, i), take(p + "q_norm.weight")
            yield _gguf_name(T.ATTN_K_NORM, i), take(p + "k_norm.weight")
        yield _gguf_name(T.ATTN_OUT, i), take(p + "attn_out.weight")
        if c.attn_out_bias:
            yield _gguf_name(T.ATTN_OUT, i, "bias"), take(p + "attn_out.bias")
        yield _gguf_name(T.FFN_GATE, i), gate
        yield _gguf_name(T.FFN_UP, i), up
        yield _gguf_name(T.FFN_DOWN, i), take(p + "ff_out.weight")
        if c.ffn_bias:
            gate_bias, up_bias = take(p + "gate_up.bias").chunk(2)
            yield _gguf_name(T.FFN_GATE, i, "bias"), gate_bias
            yield _gguf_name(T.FFN_UP, i, "bias"), up_bias
            yield _gguf_name(T.FFN_DOWN, i, "bias"), take(p + "ff_out.bias")
    yield _gguf_name(T.OUTPUT_NORM), take("norm.weight")
    if not c.tie_embeddings:  # no output.weight: llama.cpp then projects with token_embd
        yield _gguf_name(T.OUTPUT), take("lm_head.weight")
    assert used == expected, sorted(expected - used)


def _encode(weight: torch.Tensor, tensor_type: str) -> tuple[np.ndarray, object]:
    """A weight as the numpy array GGUFWriter.add_tensor takes, and its raw GGML type (None: from the dtype)."""
    from gguf import GGMLQuantizationType, quants

    data = weight.to(torch.float32).contiguous().numpy()
    if weight.dim() == 1 or tensor_type == "F32":
        return data, None
    if tensor_type == "F16":
        return data.astype(np.float16), None
    kind = GGMLQuantizationType[tensor_type]
    if kind in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0) and data.shape[-1] % 32:
        return data.astype(np.float16), None  # they pack rows in blocks of 32 (llama.cpp's converter does this)
    return quants.quantize(data, kind), kind


@dataclass
class GGUFVocab:
    """What the file says of the tokenizer: GGUF's "gpt2" vocabulary (tokens by id, their types, merges "a b"),
    llama.cpp's pre-tokenizer name, the special ids and the chat template(s)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int  # what ends a reply: llama.cpp and Ollama stop there
    pad_id: int | None
    add_bos: bool  # llama.cpp puts bos before a prompt it tokenizes (and strips one a template rendered)
    chat_template: str | list[dict[str, str]]  # one template, or {"name", "template"} pairs ("default" among them)


# llama.cpp's byte-level BPE pre-tokenizers (src/llama-vocab.cpp) by the tokenizer.json pipeline each reproduces:
# the Split regex Llama 3 and Qwen2 write before a ByteLevel without its own regex, or a ByteLevel with GPT-2's
# regex, after Cohere's and SmolLM's single-digit split or without. Their "ignore_merges" must be llama.cpp's
# too: it looks a whole pre-token up in the vocabulary before merging for llama-bpe only.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {LLAMA3_REGEX: ("llama-bpe", True), QWEN2_REGEX: ("qwen2", False)}


def _read_vocab(tokenizer_file: Path, vocab_size: int) -> GGUFVocab:
    """palmchat's byte-level BPE tokenizer.json as GGUF's "gpt2" vocabulary: tokens by id, their types (palmchat's
    specials are control tokens), merges as "a b". Rows of the embedding past the tokenizer's vocabulary get
    unused placeholder tokens, as llama.cpp's converter writes them."""
    from gguf import TokenType

    def bad(field: str, why: str):
        raise CheckpointError(f"{tokenizer_file}: {field} {why}")

    try:
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{tokenizer_file}: unreadable tokenizer file ({e})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        bad("model.type", f"is {model.get('type')!r}; GGUF export takes palmchat's byte-level BPE tokenizer")
    pre = data.get("pre_tokenizer") or {}
    # llama.cpp's "gpt-2" pre-tokenizer splits with GPT-2's regex and maps bytes as ByteLevel does, without a
    # prefix space: exactly ByteLevel(add_prefix_space=False, use_regex=True), which palmchat trains with
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex")) != ("ByteLevel", False, True):
        bad("pre_tokenizer", f"is {pre!r}; llama.cpp reproduces ByteLevel(add_prefix_space=False, use_regex=True) "
                             f"only")
    if data.get("normalizer") is not None:
        bad("normalizer", f"is {data['normalizer']!r}; llama.cpp's gpt2 vocabulary applies none")

    by_id: dict[int, str] = {int(i): tok for tok, i in model.get("vocab", {}).items()}
    special = set()
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            special.add(int(added["id"]))
    for i, tok in enumerate(SPECIAL_TOKENS):
        if by_id.get(i) != tok:
            bad("added_tokens", f"has {by_id.get(i)!r} at id {i}, palmchat's chat format needs {tok!r}")
    if max(by_id) >= vocab_size:
        bad("model.vocab", f"has id {max(by_id)}, beyond the model's vocab_size={vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if i in special else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {tok: i for i, tok in by_id.items() if i in special}
    # palmchat opens every document and conversation with <|endoftext|>; a reply ends with <|end|>
    return GGUFVocab(tokens, [int(t) for t in types], merges, pre="gpt-2", bos_id=ids[BOS_TOKEN],
                     eos_id=ids[EOT_TOKEN], pad_id=ids[PAD_TOKEN], add_bos=True,
                     chat_template=PALMCHAT_CHAT_TEMPLATE)  # a literal "<|end|>" in a message is a special there


def _hf_pre_tokenizer(data: dict, bad) -> str:
    """llama.cpp's name for the pre-tokenization of a tokenizer.json (see SPLIT_PRE_TOKENIZERS), or `bad`."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps else {}
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space"):
        bad("pre_tokenizer", f"is {pre!r}: GGUF export takes byte-level BPE tokenizers whose pre-tokenizer ends with "
                             f"ByteLevel(add_prefix_space=false) (Llama 3, Qwen2/3, GPT-2 style); SentencePiece-style "
                             f"ones (Llama 2, Mistral v0.1) are not exported")
    first = steps[:-1]
    ignore_merges = bool((data.get("model") or {}).get("ignore_merges", False))
    if byte_level.get("use_regex", True):
        if first == []:
            name, llama_ignores = "gpt-2", False
        elif first == [{"type": "Digits", "individual_digits": True}]:
            name, llama_ignores = "smollm", False  # Cohere's and SmolLM's: digits one by one, then GPT-2's regex
        else:
            name, llama_ignores = None, False
    elif len(first) == 1 and first[0].get("type") == "Split" and first[0].get("behavior") == "Isolated" \
            and not first[0].get("invert") and first[0].get("pattern", {}).get("Regex") in SPLIT_PRE_TOKENIZERS:
        name, llama_ignores = SPLIT_PRE_TOKENIZERS[first[0]["pattern"]["Regex"]]
    else:
        name, llama_ignores = None, False
    if name is None:
        bad("pre_tokenizer", f"is {pre!r}, which no llama.cpp pre-tokenizer reproduces (known: Llama 3's and "
                             f"Qwen2's regex splits, GPT-2's ByteLevel regex, single digits then GPT-2's)")
    if ignore_merges != llama_ignores:
        bad("model.ignore_merges", f"is {ignore_merges}, but llama.cpp's {name!r} pre-tokenizer "
                                   f"{'looks whole words up' if llama_ignores else 'always merges'}")
    return name


def _read_hf_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    """A Hugging Face tokenizer folder (palmchat/tokenizer/hf.py reads it) as GGUF's "gpt2" vocabulary, as
    llama.cpp's convert_hf_to_gguf.py writes one: added tokens that are special (or look it, "<|...|>") are control
    tokens, other added tokens user-defined (llama.cpp then matches them in text as the tokenizer does), ids past the
    vocabulary unused placeholders. The end-of-turn token of the chat template is eos, so a reply stops there."""
    from gguf import TokenType

    from palmchat.tokenizer.hf import HFTokenizer

    tokenizer_file = folder / TOKENIZER_FILE

    def bad(field: str, why: str):
        raise CheckpointError(f"{tokenizer_file}: {field} {why}")

    try:
        tokenizer = HFTokenizer.load(folder)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    data = json.loads(tokenizer.to_str())  # as palmchat tokenizes (a Llama-class folder gets its Metaspace)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        bad("model.type", f"is {model.get('type')!r}; GGUF export takes byte-level BPE tokenizers")
    pre = _hf_pre_tokenizer(data, bad)
    for field in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(field):
            bad(f"model.{field}", f"is {model[field]!r}; llama.cpp's byte-level BPE has none")
    normalizer = data.get("normalizer")
    # llama.cpp normalizes nothing; Qwen's NFC changes only text not already in NFC (as with llama.cpp's converter)
    if normalizer is not None and normalizer.get("type") != "NFC":
        bad("normalizer", f"is {normalizer!r}; llama.cpp's byte-level BPE applies none")

    vocab = {int(i): tok for tok, i in model.get("vocab", {}).items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    top = max([*vocab, *added])
    if top >= vocab_size:
        bad("model.vocab", f"has id {top}, beyond the model's vocab_size={vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            text = added[i]["content"]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        elif i in vocab:
            tokens.append(vocab[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    fmt = tokenizer.chat_format
    eos = fmt.eot_id if fmt.eot_id is not None else next(iter(tokenizer.generation_eos_ids), None)
    if eos is None:
        bad("eos_token", "is unset, and the chat template and generation_config.json name no end-of-turn token")
    bos = tokenizer.token_id("bos_token")
    if bos is None:  # Qwen's folders name none; llama.cpp's converter then takes the model's bos_token_id
        bos = (tokenizer.generation_config or {}).get("bos_token_id")
        bos = bos if isinstance(bos, int) and 0 <= bos < vocab_size else None
    templates = tokenizer.chat_templates
    if not templates:
        bad("chat_template", f"is missing from {folder}: a GGUF without one renders no chats")
    chat_template = templates["default"] if list(templates) == ["default"] else \
        [{"name": name, "template": text} for name, text in templates.items()]
    return GGUFVocab(tokens, [int(t) for t in types], merges, pre=pre, bos_id=bos, eos_id=eos,
                     pad_id=tokenizer.token_id("pad_token"),
                     add_bos=bos is not None and (fmt.bos_id is not None or tokenizer.add_bos_token),
                     chat_template=chat_template)


def _tokenizer_file(tokenizer_path_or_folder: str | os.PathLike) -> Path:
    path = Path(tokenizer_path_or_folder)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"tokenizer not found: {path}")
    return path


def _write_metadata(writer, config: ModelConfig, arch: str, vocab: GGUFVocab, file_type: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType

    c = config
    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType[file_type]))
    if file_type in ("MOSTLY_Q8_0", "MOSTLY_Q4_0"):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_block_count(c.n_layers)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    if c.rope_type == "linear" and c.rope_scaling != 1.0:  # palmchat divides positions by it: llama.cpp's linear
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling)
    writer.add_vocab_size(c.vocab_size)
    if arch != "command-r":
        writer.add_layer_norm_rms_eps(c.norm_eps)
    else:
        writer.add_layer_norm_eps(c.norm_eps)
        writer.add_logit_scale(1.0)  # command-r scales logits; palmchat does not

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_eot_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab.chat_template)


def export_gguf(model: torch.nn.Module | str | os.PathLike, tokenizer_path_or_folder: str | os.PathLike | None,
                out_file: str | os.PathLike, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a Transformer, or a checkpoint or Hugging Face model folder to load one from) and its
    tokenizer (tokenizer.json or a folder holding it, palmchat's or a Hugging Face one; None: the checkpoint
    folder's) as one GGUF file at `out_file`, atomically.

    dtype: "f32", "f16", "bf16", "q8_0" or "q4_0" for the 2-D weights (norms stay f32; q8_0 and q4_0 fall back to
    f16 for a tensor whose rows are not a multiple of 32; q4_0's blocks are those of `--quantize int4`). Returns the
    path written."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"GGUF export: dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    if isinstance(model, (str, os.PathLike)):
        model, saved, ckpt = load_model(model)
        if tokenizer_path_or_folder is None:
            tokenizer_path_or_folder = ckpt
        # a run's checkpoint is named by its run folder, a Hugging Face model folder by itself
        folder = Path(ckpt).resolve()
        name = name or (folder.name if saved.get("stage") == "hf" else folder.parent.name)
    if tokenizer_path_or_folder is None:
        raise ValueError("GGUF export: a model object needs its tokenizer path")
    config: ModelConfig = model.config
    arch = gguf_architecture(config)
    tokenizer_file = _tokenizer_file(tokenizer_path_or_folder)
    if is_hf_tokenizer_folder(tokenizer_file.parent):
        vocab = _read_hf_vocab(tokenizer_file.parent, config.vocab_size)
    else:
        vocab = _read_vocab(tokenizer_file, config.vocab_size)
    tensor_type, file_type = DTYPES[dtype]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _write_metadata(writer, config, arch, vocab, file_type, name or "palmchat")
        for tensor_name, weight in _gguf_tensors(model, config, arch):
            data, raw_type = _encode(weight, tensor_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_file


@dataclass
class ExportGGUFArgs:
    """Export a checkpoint as one GGUF file for llama.cpp and Ollama."""

    checkpoint: str = arg("", "checkpoint folder, a run folder with a 'latest' file, or a Hugging Face model folder",
                          positional=True)
    out: str = arg("", "the .gguf file to write")
    dtype: str = arg("f16", "weight type of the 2-D tensors", choices=list(DTYPES))
    name: str = arg("", "general.name in the file (default: the run folder's name)")


def export_main(args: ExportGGUFArgs) -> Path:
    if not args.out:
        raise ValueError("--out is required")
    path = export_gguf(args.checkpoint, None, args.out, dtype=args.dtype, name=args.name or None)
    modelfile = path.with_suffix(".Modelfile")
    # a Hugging Face model's own template (ChatML, Llama 3...) is one Ollama recognises in the file; palmchat's is not
    own_format = not is_hf_tokenizer_folder(resolve(args.checkpoint))
    atomic_write(modelfile, OLLAMA_MODELFILE.format(gguf=path.name) if own_format else f"FROM ./{path.name}\n")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {modelfile.name}: "
          f"llama.cpp runs the file as it is; for Ollama, `ollama create NAME -f {modelfile}`")
    return path
