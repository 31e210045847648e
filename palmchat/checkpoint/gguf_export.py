"""GGUF export: one palmchat model and its tokenizer as a single file that llama.cpp and Ollama run.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is a header of typed key/values (architecture,
sizes, tokenizer, chat template) followed by named tensors. llama.cpp knows a model by its architecture name and
its tensor names, so each palmchat block style maps onto the llama.cpp architecture that computes the same block:

- sequential block with RMSNorm (Llama/Qwen style) -> "llama": qkv splits into attn_q/attn_k/attn_v and gate_up
  into ffn_gate/ffn_up;
- parallel block on one LayerNorm without bias (PaLM) -> "command-r" (Cohere): llama.cpp's command-r block is
  y = x + Attn(LN(x)) + SwiGLU(LN(x)) with a bias-free LayerNorm, tied output embedding and the same rotary;
  the fused in_proj splits into attn_q/attn_k/attn_v/ffn_gate/ffn_up.

Rotary layout: palmchat rotates halves (dims j and j + D/2, as Hugging Face Llama), llama.cpp's "llama" and
"command-r" rotate adjacent pairs (2j, 2j + 1). Permuting each head's q and k rows so that row 2j + s takes row
s * D/2 + j (convert_hf_to_gguf.py's LlamaModel.permute) makes the two compute the same attention scores: scores
are dot products over the head dim, which a common permutation of q and k leaves unchanged.

The tokenizer goes in as GGUF's "gpt2" byte-level BPE vocabulary with llama.cpp's "gpt-2" pre-tokenizer (the
regex and byte mapping of palmchat's ByteLevel pre-tokenizer), palmchat's specials as control tokens, and the
chat format as a Jinja chat template, which llama.cpp and llama-cpp-python render; `export_main` also writes an
Ollama Modelfile beside the file, since Ollama renders only templates it recognises.

Whatever is not mapped is refused by name (ValueError) rather than written wrong: a config field this module does
not know at a non-default value, a tensor the mapping does not consume (an unmerged LoRA adapter), a block/norm
pair no llama.cpp architecture computes, a tokenizer whose pre-tokenizer llama.cpp cannot reproduce.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from palmchat.checkpoint.errors import CheckpointError
from palmchat.checkpoint.native import TOKENIZER_FILE, load_model
from palmchat.model.config import ModelConfig
from palmchat.tokenizer.chat_format import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
    PALMCHAT_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
)
from palmchat.utils.args import arg
from palmchat.utils.atomic import atomic_path, atomic_write

__all__ = ["DTYPES", "OLLAMA_MODELFILE", "ExportGGUFArgs", "export_gguf", "export_main",
           "gguf_architecture", "permute_for_interleaved_rope"]

# dtype -> (tensor type of the 2-D weights, general.file_type). Norm weights stay f32, as llama.cpp's converter
# writes them (ggml computes norms in f32 and the vectors are tiny).
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# ModelConfig fields whose every value the export maps (or that do not change what the model computes).
# A field missing here (one a later family adds, such as q/k/v biases or a sliding window) is refused by name
# when it differs from its default, until a mapping for it is written.
MAPPED_CONFIG_FIELDS = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "block",
                        "norm", "norm_eps", "rope_theta", "rope_scaling", "tie_embeddings", "max_seq_len",
                        "init_std"}

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
    # the config with every unmapped field at its default (as the default resolves for this shape)
    defaults = ModelConfig(**{k: v for k, v in config.to_dict().items() if k in MAPPED_CONFIG_FIELDS}).to_dict()
    for field, value in config.to_dict().items():
        if value != defaults[field]:
            raise ValueError(f"GGUF export: model config {field}={value!r} has no GGUF mapping yet (a model "
                             f"imported from Hugging Face: write it with `palmchat export-hf` and convert that "
                             f"folder with llama.cpp's convert_hf_to_gguf.py)")
    if config.block == "sequential" and config.norm == "rmsnorm":
        return "llama"
    if config.block == "parallel" and config.norm == "layernorm":
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
        return "command-r"
    raise ValueError(f"GGUF export: block={config.block!r} with norm={config.norm!r} has no llama.cpp "
                     f"architecture that computes it (exportable: sequential + rmsnorm -> llama, "
                     f"parallel + layernorm -> command-r)")


def permute_for_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * D, in) q or k rows in rotate-half order -> the adjacent-pair order llama.cpp rotates:
    within each head, row 2j + s takes row s * D/2 + j."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(tensor, block: int | None = None) -> str:
    import gguf

    return gguf.TENSOR_NAMES[tensor].format(bid=block) + ".weight"


def _gguf_tensors(model: torch.nn.Module, config: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, weight) pairs of the whole model in llama.cpp's layout; refuses a model holding any tensor the
    mapping leaves unread."""
    from gguf import MODEL_TENSOR as T

    state = model.state_dict()
    c = config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return state[name].detach()

    expected = {"embed.weight", "norm.weight"} | ({"lm_head.weight"} if not c.tie_embeddings else set())
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        names = ("norm", "in_proj", "attn_out", "ff_out") if arch == "command-r" else \
            ("attn_norm", "qkv", "attn_out", "ff_norm", "gate_up", "ff_out")
        expected |= {p + n + ".weight" for n in names}
    unmapped = sorted(set(state) - expected)
    if unmapped:
        hint = " (a LoRA adapter: merge it first, palmchat.model.lora.merge_lora)" if any(
            "lora" in n for n in unmapped) else ""
        raise ValueError(f"GGUF export: model tensors with no GGUF mapping: {', '.join(unmapped[:6])}"
                         f"{' ...' if len(unmapped) > 6 else ''}{hint}")

    yield _gguf_name(T.TOKEN_EMBD), take("embed.weight")
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
        yield _gguf_name(T.ATTN_Q, i), permute_for_interleaved_rope(wq, c.n_heads)
        yield _gguf_name(T.ATTN_K, i), permute_for_interleaved_rope(wk, c.n_kv_heads)
        yield _gguf_name(T.ATTN_V, i), wv
        yield _gguf_name(T.ATTN_OUT, i), take(p + "attn_out.weight")
        yield _gguf_name(T.FFN_GATE, i), gate
        yield _gguf_name(T.FFN_UP, i), up
        yield _gguf_name(T.FFN_DOWN, i), take(p + "ff_out.weight")
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
    if kind == GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return data.astype(np.float16), None  # q8_0 packs rows in blocks of 32 (llama.cpp's converter does this)
    return quants.quantize(data, kind), kind


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]


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
    return GGUFVocab(tokens, [int(t) for t in types], merges)


def _tokenizer_file(tokenizer_path_or_folder: str | os.PathLike) -> Path:
    path = Path(tokenizer_path_or_folder)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"tokenizer not found: {path}")
    return path


def _write_metadata(writer, config: ModelConfig, arch: str, vocab: GGUFVocab, file_type: str, name: str) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType, RopeScalingType, TokenType

    c = config
    writer.add_name(name)
    writer.add_file_type(int(LlamaFileType[file_type]))
    if file_type == "MOSTLY_Q8_0":
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
    if c.rope_scaling != 1.0:  # palmchat divides positions by rope_scaling: llama.cpp's linear scaling
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(c.rope_scaling)
    writer.add_vocab_size(c.vocab_size)
    if arch == "llama":
        writer.add_layer_norm_rms_eps(c.norm_eps)
    else:
        writer.add_layer_norm_eps(c.norm_eps)
        writer.add_logit_scale(1.0)  # command-r scales logits; palmchat does not

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    ids = {tok: i for i, (tok, t) in enumerate(zip(vocab.tokens, vocab.token_types)) if t == TokenType.CONTROL}
    writer.add_bos_token_id(ids[BOS_TOKEN])
    writer.add_eos_token_id(ids[EOT_TOKEN])  # a reply ends with <|end|>: llama.cpp and Ollama stop there
    writer.add_eot_token_id(ids[EOT_TOKEN])
    writer.add_pad_token_id(ids[PAD_TOKEN])
    writer.add_add_bos_token(True)  # palmchat opens every document and conversation with <|endoftext|>
    writer.add_add_eos_token(False)
    writer.add_chat_template(PALMCHAT_CHAT_TEMPLATE)  # a literal "<|end|>" in a message is a special there


def export_gguf(model: torch.nn.Module | str | os.PathLike, tokenizer_path_or_folder: str | os.PathLike | None,
                out_file: str | os.PathLike, dtype: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a Transformer, or a checkpoint folder to load one from) and its tokenizer (tokenizer.json or
    a folder holding it; None: the checkpoint folder's) as one GGUF file at `out_file`, atomically.

    dtype: "f32", "f16", "bf16" or "q8_0" for the 2-D weights (norms stay f32; q8_0 falls back to f16 for a
    tensor whose rows are not a multiple of 32). Returns the path written."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"GGUF export: dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    if isinstance(model, (str, os.PathLike)):
        model, _, ckpt = load_model(model)
        if tokenizer_path_or_folder is None:
            tokenizer_path_or_folder = ckpt
        name = name or Path(ckpt).resolve().parent.name
    if tokenizer_path_or_folder is None:
        raise ValueError("GGUF export: a model object needs its tokenizer path")
    config: ModelConfig = model.config
    arch = gguf_architecture(config)
    vocab = _read_vocab(_tokenizer_file(tokenizer_path_or_folder), config.vocab_size)
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

    checkpoint: str = arg("", "checkpoint folder (or a run folder with a 'latest' file)", positional=True)
    out: str = arg("", "the .gguf file to write")
    dtype: str = arg("f16", "weight type of the 2-D tensors", choices=list(DTYPES))
    name: str = arg("", "general.name in the file (default: the run folder's name)")


def export_main(args: ExportGGUFArgs) -> Path:
    if not args.out:
        raise ValueError("--out is required")
    path = export_gguf(args.checkpoint, None, args.out, dtype=args.dtype, name=args.name or None)
    modelfile = path.with_suffix(".Modelfile")
    atomic_write(modelfile, OLLAMA_MODELFILE.format(gguf=path.name))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {modelfile.name}: "
          f"llama.cpp runs the file as it is; for Ollama, `ollama create NAME -f {modelfile}`")
    return path
