"""GGUF export (palmchat/checkpoint/gguf_export.py): the file read back with gguf's own reader holds the metadata
and weights llama.cpp needs, and, where llama-cpp-python is installed, llama.cpp computes palmchat's logits and
greedy continuations from it, for the parallel (command-r) and the sequential (llama) block."""

import ctypes
import json
import re

import gguf
import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from palmchat.checkpoint import CheckpointError
from palmchat.checkpoint.gguf_export import export_gguf, gguf_architecture
from palmchat.model.config import ModelConfig, preset
from palmchat.model.lora import DEFAULT_TARGETS, add_lora, merge_lora
from palmchat.model.rope import rotary_tables
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import PALMCHAT_CHAT_TEMPLATE as CHAT_TEMPLATE
from palmchat.tokenizer.chat_format import SPECIAL_TOKENS

BLOCKS = {"parallel": dict(block="parallel", norm="layernorm"), "sequential": dict(block="sequential", norm="rmsnorm")}
ARCH = {"parallel": "command-r", "sequential": "llama"}
VOCAB = 320  # larger than the tokenizer's: the extra rows become unused placeholder tokens
TEXTS = ["The quick brown fox jumps over the lazy dog. It's 2026, don't you know?",
         "Numbers 12345 and  double  spaces,\nnew lines\n\n and tabs\tand ünïcödé — all here.",
         "hello world hello world, the tokenizer learns merges like 'the' and 'ing' and 'tion'."] * 30


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=300).save(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from palmchat.tokenizer.bpe import Tokenizer

    return Tokenizer.load(tokenizer_dir)


def make_model(block: str, **overrides) -> Transformer:
    # a larger init spreads the logits, so greedy choices are not near-ties between two implementations
    torch.manual_seed(0)
    config = preset("tiny", **{"vocab_size": VOCAB, "init_std": 0.3, **BLOCKS[block], **overrides})
    model = Transformer(config).eval()
    with torch.no_grad():  # norms at 1 would not show a norm weight written to the wrong place
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of the export's q/k row permutation: adjacent-pair order back to palmchat's halves."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rebuild_state_dict(reader: gguf.GGUFReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """palmchat's state dict from the file's dequantized tensors."""
    t = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        t[tensor.name] = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(
            tuple(int(n) for n in reversed(tensor.shape)))
    out = {"embed.weight": t.pop("token_embd.weight"), "norm.weight": t.pop("output_norm.weight")}
    if "output.weight" in t:
        out["lm_head.weight"] = t.pop("output.weight")
    for i in range(config.n_layers):
        b = f"blk.{i}."
        q = interleaved_to_rotate_half(t.pop(b + "attn_q.weight"), config.n_heads)
        k = interleaved_to_rotate_half(t.pop(b + "attn_k.weight"), config.n_kv_heads)
        v = t.pop(b + "attn_v.weight")
        gate, up = t.pop(b + "ffn_gate.weight"), t.pop(b + "ffn_up.weight")
        p = f"blocks.{i}."
        out[p + "attn_out.weight"] = t.pop(b + "attn_output.weight")
        out[p + "ff_out.weight"] = t.pop(b + "ffn_down.weight")
        if config.block == "parallel":
            out[p + "norm.weight"] = t.pop(b + "attn_norm.weight")
            out[p + "in_proj.weight"] = torch.cat([q, k, v, gate, up])
        else:
            out[p + "attn_norm.weight"] = t.pop(b + "attn_norm.weight")
            out[p + "ff_norm.weight"] = t.pop(b + "ffn_norm.weight")
            out[p + "qkv.weight"] = torch.cat([q, k, v])
            out[p + "gate_up.weight"] = torch.cat([gate, up])
    assert not t, f"tensors the rebuild did not read: {sorted(t)}"
    return out


# ------------------------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("tied", [True, False])
def test_f32_file_rebuilds_the_weights_exactly(block, tied, tokenizer_dir, tmp_path):
    if block == "parallel" and not tied:
        pytest.skip("refused: test_refusals")
    model = make_model(block, tie_embeddings=tied)
    path = export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not tied)  # tied: llama.cpp projects with token_embd
    rebuilt = rebuild_state_dict(reader, model.config)
    expected = model.state_dict()
    assert rebuilt.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(rebuilt[name], weight), name


@pytest.mark.parametrize("block", BLOCKS)
def test_metadata(block, tokenizer_dir, tokenizer, tmp_path):
    model = make_model(block, rope_theta=50000.0, rope_scaling=2.0, norm_eps=1e-6, max_seq_len=96)
    path = export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", dtype="f16", name="tiny-palm")
    f, c, arch = fields(gguf.GGUFReader(path)), model.config, ARCH[block]
    assert f["general.architecture"] == arch
    assert f["general.name"] == "tiny-palm"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert f[f"{arch}.context_length"] == 96
    assert f[f"{arch}.embedding_length"] == c.dim
    assert f[f"{arch}.feed_forward_length"] == c.ffn_hidden
    assert f[f"{arch}.block_count"] == c.n_layers
    assert f[f"{arch}.attention.head_count"] == c.n_heads
    assert f[f"{arch}.attention.head_count_kv"] == c.n_kv_heads
    assert f[f"{arch}.rope.dimension_count"] == c.head_dim
    assert f[f"{arch}.rope.freq_base"] == 50000.0
    assert f[f"{arch}.rope.scaling.type"] == "linear"
    assert f[f"{arch}.rope.scaling.factor"] == 2.0
    eps_key = "layer_norm_rms_epsilon" if block == "sequential" else "layer_norm_epsilon"
    assert f[f"{arch}.attention.{eps_key}"] == pytest.approx(1e-6)

    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == VOCAB
    assert tokens[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert all(tokens[i] == tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size))
    assert tokens[tokenizer.vocab_size:] == [f"[PAD{i}]" for i in range(tokenizer.vocab_size, VOCAB)]
    types = f["tokenizer.ggml.token_type"]
    assert types[:len(SPECIAL_TOKENS)] == [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    assert set(types[len(SPECIAL_TOKENS):tokenizer.vocab_size]) == {gguf.TokenType.NORMAL}
    assert set(types[tokenizer.vocab_size:]) == {gguf.TokenType.UNUSED}
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    fmt = tokenizer.chat_format
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) \
        == (fmt.bos_id, fmt.eot_id, fmt.pad_id)
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"] == CHAT_TEMPLATE


# q4_0: a block's extreme maps to -8 d exactly, so a value of the other sign clips at 7 d: up to 1/8 of the largest
@pytest.mark.parametrize("dtype, tolerance", [("f16", 1e-3), ("bf16", 0.0), ("q8_0", 2e-2), ("q4_0", 0.13)])
def test_lower_precisions_dequantize_close(dtype, tolerance, tokenizer_dir, tmp_path):
    model = make_model("sequential")
    reader = gguf.GGUFReader(export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", dtype=dtype))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    rebuilt = rebuild_state_dict(reader, model.config)
    for name, weight in model.state_dict().items():
        if dtype == "bf16":  # exactly torch's round-to-nearest-even bf16
            assert torch.equal(rebuilt[name], weight.to(torch.bfloat16).float() if weight.dim() > 1 else weight), name
        else:
            scale = weight.abs().max()
            assert (rebuilt[name] - weight).abs().max() <= tolerance * scale, name


def test_q4_0_blocks_are_llama_cpps_and_the_int4_engines(tokenizer_dir, tmp_path):
    """quantize_q4_0 (the engine's --quantize int4) writes, byte for byte, the Q4_0 blocks of gguf-py's port of
    llama.cpp's quantize_row_q4_0_ref (an all-zero block, a negative extreme, ties for the largest |w| included),
    and the q4_0 export of a model holds those same blocks for its weights."""
    from gguf import GGMLQuantizationType, quants

    from palmchat.kernels.cpu_linear import dequantize_q4_0, quantize_q4_0

    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[0, :32] = 0
    w[1, 5] = -4 * w[1].abs().max()
    w[2, :32] = w[2, 0]
    w[3, 40], w[3, 41] = 3.0, -3.0
    qweight, scale = quantize_q4_0(w)
    blocks = np.concatenate([scale.numpy().view(np.uint8).reshape(16, 8, 2), qweight.numpy().reshape(16, 8, 16)], -1)
    theirs = quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    assert np.array_equal(blocks.reshape(16, -1), theirs)
    dequantized = dequantize_q4_0(qweight, scale)  # through the decode kernel where one is built
    assert np.array_equal(dequantized.numpy(), quants.dequantize(theirs, GGMLQuantizationType.Q4_0))
    assert torch.equal(dequantize_q4_0(qweight, scale, torch.bfloat16), dequantized.bfloat16())

    model = make_model("sequential")
    exported = {t.name: t for t in gguf.GGUFReader(export_gguf(model, tokenizer_dir, tmp_path / "m.gguf",
                                                               dtype="q4_0")).tensors}
    for name, weight in (("blk.0.ffn_down.weight", model.blocks[0].ff_out.weight),
                         ("blk.1.attn_output.weight", model.blocks[1].attn_out.weight)):
        qweight, scale = quantize_q4_0(weight)
        rows, blocks = qweight.shape[0], qweight.shape[1] // 16
        ours = np.concatenate([scale.numpy().view(np.uint8).reshape(rows, blocks, 2),
                               qweight.numpy().reshape(rows, blocks, 16)], -1)
        assert exported[name].tensor_type == GGMLQuantizationType.Q4_0
        assert exported[name].data.tobytes() == ours.tobytes(), name


def test_permutation_makes_adjacent_pair_rotary_compute_palmchats_scores():
    """The reason for the q/k permutation, checked without llama.cpp: rotating the permuted rows in adjacent pairs
    (llama.cpp's "normal" rope) gives the same q.k scores as palmchat's rotate-half on the original rows."""
    from palmchat.checkpoint.gguf_export import permute_for_interleaved_rope
    from palmchat.model.rope import apply_rotary

    config = preset("tiny", vocab_size=VOCAB)
    D, T = config.head_dim, 7
    cos, sin = rotary_tables(config, T)
    x, wq, wk = torch.randn(T, config.dim), torch.randn(D, config.dim), torch.randn(D, config.dim)
    ours = apply_rotary((x @ wq.T)[None, None], cos[None, None], sin[None, None])[0, 0] @ \
        apply_rotary((x @ wk.T)[None, None], cos[None, None], sin[None, None])[0, 0].T

    def adjacent_pairs(v):  # (T, D): rotate (v[2j], v[2j+1]) by position * theta^(-2j/D)
        angles = torch.arange(T)[:, None] * config.rope_theta ** (-torch.arange(0, D, 2) / D)
        a, b = v[:, 0::2], v[:, 1::2]
        return torch.stack([a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()], -1).flatten(1)

    theirs = adjacent_pairs(x @ permute_for_interleaved_rope(wq, 1).T) @ \
        adjacent_pairs(x @ permute_for_interleaved_rope(wk, 1).T).T
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    without = adjacent_pairs(x @ wq.T) @ adjacent_pairs(x @ wk.T).T
    assert not torch.allclose(without, ours, atol=1e-2)  # the permutation is needed


def test_chat_template_renders_palmchats_format(tokenizer):
    env = ImmutableSandboxedEnvironment()

    def raise_exception(message):
        raise ValueError(message)

    template = env.from_string(CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, fox?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Numbers 12345"}]
    text = template.render(messages=messages, add_generation_prompt=True, bos_token=SPECIAL_TOKENS[1],
                           raise_exception=raise_exception)
    assert text == ("<|endoftext|><|system|>Be brief.<|end|><|user|>Hi there, fox?<|end|><|assistant|>Hello.<|end|>"
                    "<|user|>Numbers 12345<|end|><|assistant|>")
    # tokenized as llama.cpp does with special tokens parsed: split at the specials, encode each piece
    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")", text):
        ids += [SPECIAL_TOKENS.index(piece)] if piece in SPECIAL_TOKENS else tokenizer.encode(piece)
    assert ids == tokenizer.chat_format.render_prompt(messages)
    with pytest.raises(ValueError, match="not robot"):
        template.render(messages=[{"role": "robot", "content": "x"}], bos_token="", raise_exception=raise_exception)


# ------------------------------------------------------------------------------------------------- refusals


def test_refusals(tokenizer_dir, tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="tie_embeddings"):
        export_gguf(make_model("parallel", tie_embeddings=False), tokenizer_dir, out)
    with pytest.raises(ValueError, match="norm='layernorm'"):
        gguf_architecture(preset("tiny", block="sequential", norm="layernorm"))
    with pytest.raises(ValueError, match="norm='rmsnorm'"):
        gguf_architecture(preset("tiny", block="parallel", norm="rmsnorm"))
    with pytest.raises(ValueError, match="head_dim"):
        gguf_architecture(preset("tiny", head_dim=32))
    # the settings of Hugging Face families no llama.cpp architecture computes are refused by name
    seq = dict(block="sequential", norm="rmsnorm")
    with pytest.raises(ValueError, match="sliding_window=8 is shorter than max_seq_len=128"):
        gguf_architecture(preset("tiny", **seq, sliding_window=8))
    assert gguf_architecture(preset("tiny", **seq, sliding_window=128)) == "llama"  # a window that never binds
    with pytest.raises(ValueError, match="attn_out_bias=True has no mapping in llama.cpp's qwen3"):
        gguf_architecture(preset("tiny", **seq, qk_norm=True, qkv_bias=True, attn_out_bias=True))
    with pytest.raises(ValueError, match="rope_type='llama3' has no mapping in llama.cpp's qwen3"):
        gguf_architecture(preset("tiny", **seq, qk_norm=True, rope_type="llama3"))
    with pytest.raises(ValueError, match="qk_norm=True has no mapping in llama.cpp's command-r"):
        gguf_architecture(preset("tiny", qk_norm=True))
    with pytest.raises(ValueError, match="parallel_norms=2"):  # GPT-NeoX
        gguf_architecture(preset("tiny", parallel_norms=2, n_kv_heads=4))
    with pytest.raises(ValueError, match="norm_offset=1.0"):  # Gemma
        gguf_architecture(preset("tiny", **seq, norm_offset=1.0))
    assert gguf_architecture(preset("tiny", **seq, qkv_bias=True)) == "qwen2"
    assert gguf_architecture(preset("tiny", **seq, qkv_bias=True, head_dim=32)) == "llama"  # qwen2 needs H*D == dim
    assert gguf_architecture(preset("tiny", **seq, qkv_bias=True, rope_type="llama3")) == "llama"
    assert gguf_architecture(preset("tiny", **seq, qkv_bias=True, attn_out_bias=True, ffn_bias=True)) == "llama"
    assert gguf_architecture(preset("tiny", **seq, qk_norm=True, qkv_bias=True)) == "qwen3"
    gguf_architecture(preset("tiny", block="sequential", norm="rmsnorm", rotary_dim=16))  # = head_dim: the default
    with pytest.raises(ValueError, match="dtype='q4'"):
        export_gguf(make_model("parallel"), tokenizer_dir, out, dtype="q4")

    lora = make_model("sequential")
    add_lora(lora, "a", rank=2)
    with pytest.raises(ValueError, match="lora.*merge_lora"):
        export_gguf(lora, tokenizer_dir, out)
    assert list(tmp_path.iterdir()) == []  # a refused export leaves no file, not even a temporary one
    export_gguf(merge_lora(lora, "a"), tokenizer_dir, out)  # merged, it exports

    bad = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    bad["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"bad/tokenizer.json: pre_tokenizer"):
        export_gguf(make_model("parallel"), tmp_path / "bad", out)
    with pytest.raises(CheckpointError, match="model.vocab.*vocab_size=100"):
        export_gguf(Transformer(preset("tiny", vocab_size=100)), tokenizer_dir, out)
    with pytest.raises(CheckpointError, match="tokenizer not found"):
        export_gguf(make_model("parallel"), tmp_path / "nowhere", out)


def test_exports_a_checkpoint_folder(tokenizer_dir, tmp_path):
    from palmchat.checkpoint import save_checkpoint
    from palmchat.checkpoint.gguf_export import ExportGGUFArgs, export_main

    model = make_model("parallel")
    save_checkpoint(tmp_path / "run", 3, model, {"model": model.config.to_dict()}, tokenizer_dir / "tokenizer.json")
    path = export_main(ExportGGUFArgs(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "out" / "run.gguf"),
                                      dtype="f32"))
    reader = gguf.GGUFReader(path)
    assert fields(reader)["general.name"] == "run"
    assert (tmp_path / "out" / "run.Modelfile").read_text() == (
        'FROM ./run.gguf\nTEMPLATE """{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}'
        '<|assistant|>"""\nPARAMETER stop "<|end|>"\n')
    rebuilt = rebuild_state_dict(reader, model.config)
    assert all(torch.equal(rebuilt[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------- llama.cpp runs the file


def llama(path, n_ctx=128):
    llama_cpp = pytest.importorskip("llama_cpp")
    # an f32 KV cache (llama.cpp's default is f16, which alone moves logits by ~1e-3)
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


@pytest.mark.parametrize("block, overrides", [
    ("parallel", {}), ("sequential", {}),
    # grouped-query, heads wider than dim / n_heads, an untied output projection, linear rope scaling
    ("sequential", dict(n_kv_heads=2, head_dim=32, tie_embeddings=False, rope_scaling=2.0, rope_theta=500.0)),
    ("parallel", dict(n_kv_heads=2, rope_scaling=2.0, rope_theta=500.0))])
def test_llama_cpp_logits_and_greedy_decode_match_palmchat(block, overrides, tokenizer_dir, tokenizer, tmp_path):
    model = make_model(block, **overrides)
    llm = llama(export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", dtype="f32"))
    prompt = tokenizer.chat_format.render_prompt([{"role": "user", "content": "The quick brown fox?"}])

    llm.reset()
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert ours.std() > 1.0  # spread logits: a mismatch cannot hide in near-uniform ones
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-3)

    # greedy continuation, llama.cpp decoding one token at a time from its KV cache
    ids = list(prompt)
    for _ in range(24):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ids[-1]])
    with torch.no_grad():
        ours = list(prompt)
        for _ in range(24):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    assert ids == ours


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_llama_cpp_runs_the_lower_precisions(dtype, tokenizer_dir, tokenizer, tmp_path):
    """Each weight type loads and computes palmchat's logits up to its rounding (llama.cpp also rounds the
    activations it multiplies them with: 8-bit blocks for q8_0 and q4_0). q4_0 is compared with palmchat's model on
    the same 4-bit weights (what --quantize int4 decodes with). Without the rotary permutation the error is ~30%."""
    from palmchat.kernels.cpu_linear import dequantize_q4_0, quantize_q4_0

    llama_cpp = pytest.importorskip("llama_cpp")
    if dtype.startswith("q") and b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        pytest.skip("llama.cpp's AMX backend segfaults on quantized matrices on this CPU (ggml-org/llama.cpp#20824, "
                    "also with its own quantizer's files); a build with -DGGML_AMX_INT8=OFF runs this")
    model = make_model("parallel")
    llm = llama(export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", dtype=dtype))
    prompt = tokenizer.chat_format.render_prompt([{"role": "user", "content": "The quick brown fox?"}])
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    with torch.no_grad():
        if dtype == "q4_0":  # every matrix the file holds in 4 bits (rows permuted for rotary keep their blocks)
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(dequantize_q4_0(*quantize_q4_0(p)))
        ours = model(torch.tensor([prompt]))[0]
    error = (theirs - ours).norm() / ours.norm()
    assert error < {"f16": 1e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 5e-2}[dtype], float(error)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_export_equals_llama_cpps_own_quantizer(dtype, tokenizer_dir, tmp_path):
    """The q8_0 (q4_0) file holds, byte for byte, what llama.cpp's quantizer writes from the bf16 export of the same
    weights: the same tensor types (f32 norms, quantized matrices), shapes and blocks. For q4_0 its quantizer is
    asked to keep one type for every matrix (`pure`; by default it writes the output layer in Q6_K)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = make_model("sequential", tie_embeddings=False).to(torch.bfloat16)
    ours = gguf.GGUFReader(export_gguf(model, tokenizer_dir, tmp_path / "ours.gguf", dtype=dtype))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{dtype.upper()}")
    params.nthread, params.pure = 1, dtype == "q4_0"
    source = export_gguf(model, tokenizer_dir, tmp_path / "bf16.gguf", dtype="bf16")
    target = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
    theirs = {t.name: t for t in gguf.GGUFReader(target).tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(theirs)
    assert sum(t.tensor_type == gguf.GGMLQuantizationType[dtype.upper()] for t in ours.tensors) > 0
    for t in ours.tensors:
        other = theirs[t.name]
        assert (t.tensor_type, list(t.shape)) == (other.tensor_type, list(other.shape)), t.name
        assert t.data.tobytes() == other.data.tobytes(), t.name


def test_llama_cpp_tokenizes_and_renders_chats_as_palmchat(tokenizer_dir, tokenizer, tmp_path):
    llm = llama(export_gguf(make_model("sequential"), tokenizer_dir, tmp_path / "m.gguf", dtype="f16"))
    for text in TEXTS[:3] + ["  leading and trailing  ", "<|end|> is text here", "tabs\t\tand\r\nCRLF 3.14159"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    assert llm.tokenize(b"hi", add_bos=True) == [tokenizer.chat_format.bos_id] + tokenizer.encode("hi")
    assert llm.token_eos() == tokenizer.chat_format.eot_id
    # llama-cpp-python renders chats with the file's template
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|end|>",
                                    bos_token="<|endoftext|>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, fox?"}]
    text = formatter(messages=messages).prompt
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.chat_format.render_prompt(messages)


def test_llama_cpp_chat_completion_replies_as_palmchat(tokenizer_dir, tokenizer, tmp_path):
    """llama.cpp's chat path end to end (the file's chat template, its bos handling, its stop at <|end|>): the
    greedy reply is palmchat's greedy reply."""
    from palmchat.inference.engine import Engine, SamplingParams

    model = make_model("parallel", vocab_size=tokenizer.vocab_size)  # no placeholder tokens to decode
    llm = llama(export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", dtype="f32"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox?"}]
    fmt = tokenizer.chat_format
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=16)
    # llama-cpp-python runs on past max_tokens until the text's last character is whole: compare that many tokens
    n = reply["usage"]["completion_tokens"]
    ours = Engine(model).generate([fmt.render_prompt(messages)], SamplingParams(
        max_new_tokens=n, temperature=0.0, stop_token_ids=fmt.reply_stop_ids))[0].tokens
    ours = [t for t in ours if t not in fmt.reply_stop_ids]
    # the reply's bytes, decoded as llama-cpp-python does (bytes of no whole character dropped)
    assert reply["choices"][0]["message"]["content"] == llm.detokenize(ours).decode("utf-8", errors="ignore")


# ------------------------------------------------------------------- models imported from Hugging Face

# Llama 3's real pre-tokenization (tokenizer.json of Meta-Llama-3): a regex split, then bytes without a regex, and
# whole words looked up before merging. tests/hf_tokenizers.py's "llama3" folder has GPT-2's ByteLevel regex instead.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# case -> (model family, tokenizer family, config overrides, llama.cpp architecture, llama.cpp pre-tokenizer)
HF_CASES = {
    "qwen2": ("qwen2", "qwen2.5", {}, "qwen2", "qwen2"),
    "llama3.1": ("llama", "llama3", dict(rope_parameters=LLAMA31_ROPE), "llama", "llama-bpe"),
    "qwen3": ("qwen3", "qwen3", {}, "qwen3", "qwen2"),
    "mistral": ("mistral", "llama3", dict(sliding_window=None), "llama", "llama-bpe"),
    # Llama's attention_bias and mlp_bias: llama's optional biases, the q/k ones permuted as their rows
    "llama-biases": ("llama", "llama3", dict(attention_bias=True, mlp_bias=True), "llama", "llama-bpe"),
    # Qwen2 with heads wider than hidden_size / heads: llama.cpp's qwen2 sizes q as n_embd, so it goes as llama
    "qwen2-wide-heads": ("qwen2", "qwen2.5", dict(head_dim=16), "llama", "qwen2"),
    # PaLM's block; Cohere's tokenizers split digits one by one before GPT-2's regex
    "cohere": ("cohere", "llama3", {}, "command-r", "smollm"),
}
HF_TEXTS = ["The cat sat on the mat.", "I've 12345 cats!!  \n\n ok, WE'LL see", "Über café — naïve 3.14",
            "<|im_end|> and <tool_call> are text here", "  leading\tand trailing  ",
            "def add(a, b): return a + b"]  # "(a" is one pre-token for Qwen2's regex, two for GPT-2's


def use_llama3_pre_tokenizer(folder):
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    data["model"]["ignore_merges"] = True
    path.write_text(json.dumps(data))


def use_digits_pre_tokenizer(folder):
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """case -> a Hugging Face folder (tiny random model, tokenizer, chat template), made on first use."""
    from hf_models import save_tiny_hf_model
    from hf_tokenizers import save_tiny_hf_tokenizer

    made = {}

    def folder(case):
        if case not in made:
            family, tokenizer_family, overrides, _, pre = HF_CASES[case]
            made[case] = tmp_path_factory.mktemp(case.replace(".", "_"))
            save_tiny_hf_model(made[case], family, vocab_size=700, max_position_embeddings=256, **overrides)
            save_tiny_hf_tokenizer(made[case], tokenizer_family)
            if pre == "llama-bpe":
                use_llama3_pre_tokenizer(made[case])
            if pre == "smollm":
                use_digits_pre_tokenizer(made[case])
        return made[case]
    return folder


def gguf_tensors(reader) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(
        tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def llama31_rope_factors(head_dim: int, p: dict) -> torch.Tensor:
    """rope_freqs as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes them."""
    import math

    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low, high = p["original_max_position_embeddings"] / p["low_freq_factor"], \
        p["original_max_position_embeddings"] / p["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high:
            factors.append(1)
        elif wavelen > low:
            factors.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return torch.tensor(factors, dtype=torch.float32)


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_model_file_holds_the_checkpoints_tensors(case, hf_folders, tmp_path):
    """Every GGUF tensor is the Hugging Face tensor of the same role, exactly (f32), with q/k rows (and biases)
    permuted back for llama's adjacent-pair rotary only: qwen2 and qwen3 rotate halves as Hugging Face does."""
    from safetensors.torch import load_file

    folder = hf_folders(case)
    arch = HF_CASES[case][3]
    reader = gguf.GGUFReader(export_gguf(folder, None, tmp_path / "m.gguf", dtype="f32"))
    ours = gguf_tensors(reader)
    hf = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    roles = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected["output.weight"] = "lm_head.weight"
    for name in hf:
        parts = name.split(".")  # model.layers.{i}.{module}.{proj}.{kind}
        if parts[1] == "layers":
            role = next(r for r, h in roles.items() if ".".join(parts[3:-1]) == h)
            expected[f"blk.{parts[2]}.{role}.{parts[-1]}"] = name
    if case == "llama3.1":
        factors = ours.pop("rope_freqs.weight")
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        torch.testing.assert_close(factors, llama31_rope_factors(head_dim, LLAMA31_ROPE), atol=0, rtol=1e-6)
        assert factors.min() == 1 and factors.max() == 8  # kept, interpolated and fully scaled frequencies
    assert ours.keys() == expected.keys()
    for name, hf_name in expected.items():
        t = ours[name]
        # Cohere's checkpoints store q/k rows in the adjacent-pair order command-r rotates: no permutation to undo
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            t = interleaved_to_rotate_half(t, heads if ".attn_q." in name else kv_heads)
        assert torch.equal(t, hf[hf_name]), name


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_model_metadata_and_vocabulary(case, hf_folders, tmp_path):
    from hf_tokenizers import load_transformers_tokenizer

    folder = hf_folders(case)
    _, tokenizer_family, _, arch, pre = HF_CASES[case]
    f = fields(gguf.GGUFReader(export_gguf(folder, None, tmp_path / "m.gguf", dtype="f16")))
    config = json.loads((folder / "config.json").read_text())
    theirs = load_transformers_tokenizer(folder)
    assert f["general.architecture"] == arch and f["general.name"] == folder.name
    assert f[f"{arch}.context_length"] == 256 and f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert f[f"{arch}.attention.key_length"] == head_dim
    if arch == "command-r":
        assert f[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(config["layer_norm_eps"])
    else:
        assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert f[f"{arch}.rope.freq_base"] == (config.get("rope_parameters") or config)["rope_theta"]
    assert f"{arch}.rope.scaling.type" not in f  # Llama 3.1's scaling is the rope_freqs tensor

    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == pre
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 700
    vocab = {i: t for t, i in theirs.get_vocab().items()}
    assert tokens == [vocab.get(i, f"[PAD{i}]") for i in range(700)]
    added = theirs.added_tokens_decoder
    assert [types[i] for i in added] == [gguf.TokenType.CONTROL if t.special else gguf.TokenType.USER_DEFINED
                                         for t in added.values()]
    assert gguf.TokenType.USER_DEFINED in types or case not in ("qwen2", "qwen3")  # <tool_call>, <think>
    assert set(types[i] for i in vocab if i not in added) == {gguf.TokenType.NORMAL}
    assert set(types[len(vocab):]) == {gguf.TokenType.UNUSED}
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    llama3 = tokenizer_family == "llama3"
    end_of_turn = theirs.convert_tokens_to_ids("<|eot_id|>" if llama3 else "<|im_end|>")
    assert f["tokenizer.ggml.eos_token_id"] == f["tokenizer.ggml.eot_token_id"] == end_of_turn
    if llama3:  # its template writes bos: llama.cpp adds it (and strips a rendered one)
        assert f["tokenizer.ggml.bos_token_id"] == theirs.bos_token_id and f["tokenizer.ggml.add_bos_token"] is True
    else:  # ChatML has none
        assert "tokenizer.ggml.bos_token_id" not in f and f["tokenizer.ggml.add_bos_token"] is False
        assert f["tokenizer.ggml.padding_token_id"] == theirs.pad_token_id
    assert f["tokenizer.chat_template"] == theirs.chat_template


@pytest.mark.parametrize("case", HF_CASES)
def test_llama_cpp_runs_hf_models_as_palmchat(case, hf_folders, tmp_path):
    """llama.cpp on the exported file: palmchat's fp32 logits, its greedy continuation, its tokenization of plain
    text and of a rendered chat (special tokens parsed)."""
    from hf_tokenizers import load_transformers_tokenizer

    from palmchat.checkpoint import load_model, load_tokenizer

    folder = hf_folders(case)
    llm = llama(export_gguf(folder, None, tmp_path / "m.gguf", dtype="f32"), n_ctx=256)
    model, _, _ = load_model(folder)
    tokenizer = load_tokenizer(folder)
    for text in HF_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the weather like in Paris?"},
                {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "Hello there!"}]
    prompt = tokenizer.chat_format.render_prompt(messages)
    text = load_transformers_tokenizer(folder).apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt

    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert ours.std() > 0.5
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-3)
    ids = list(prompt)
    for _ in range(16):
        ids.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ids[-1]])
    with torch.no_grad():
        ours = list(prompt)
        for _ in range(16):
            ours.append(int(model(torch.tensor([ours]))[0, -1].argmax()))
    assert ids == ours


def test_hf_refusals(hf_folders, tmp_path):
    """What llama.cpp does not compute is refused by name, the file and field named, and no file is left."""
    import shutil

    from hf_models import save_tiny_hf_model
    from hf_tokenizers import save_tiny_hf_tokenizer

    out = tmp_path / "out" / "m.gguf"

    def folder(name, family, tokenizer_family="qwen2.5", **overrides):
        save_tiny_hf_model(tmp_path / name, family, vocab_size=overrides.pop("vocab_size", 700), **overrides)
        return save_tiny_hf_tokenizer(tmp_path / name, tokenizer_family)

    with pytest.raises(ValueError, match="sliding_window=4 is shorter than max_seq_len=64"):  # Mistral v0.1
        export_gguf(folder("mistral", "mistral"), None, out)
    with pytest.raises(ValueError, match="parallel_norms=2 has no mapping"):
        export_gguf(folder("neox", "gpt_neox"), None, out)
    with pytest.raises(ValueError, match="GGUF export: model config"):
        export_gguf(folder("gemma", "gemma3_text"), None, out)
    with pytest.raises(CheckpointError, match=r"llama2/tokenizer.json: pre_tokenizer .*SentencePiece-style"):
        export_gguf(folder("llama2", "llama", "llama2"), None, out)
    with pytest.raises(CheckpointError, match=r"small/tokenizer.json: model.vocab has id \d+, beyond the model's "
                                              r"vocab_size=300"):
        export_gguf(folder("small", "qwen2", vocab_size=300), None, out)

    def edited(case, name, edit):
        shutil.copytree(hf_folders(case), tmp_path / name)
        data = json.loads((tmp_path / name / "tokenizer.json").read_text())
        edit(data)
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(data))
        return tmp_path / name

    def other_regex(data):
        data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|\s+|."
    with pytest.raises(CheckpointError, match=r"regex/tokenizer.json: pre_tokenizer .*no llama.cpp pre-tokenizer"):
        export_gguf(edited("qwen2", "regex", other_regex), None, out)

    def merges_always(data):
        data["model"]["ignore_merges"] = False
    with pytest.raises(CheckpointError, match=r"merging/tokenizer.json: model.ignore_merges is False, but llama.cpp's "
                                              r"'llama-bpe'"):
        export_gguf(edited("llama3.1", "merging", merges_always), None, out)

    def lowercase(data):
        data["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(CheckpointError, match=r"lower/tokenizer.json: normalizer"):
        export_gguf(edited("qwen2", "lower", lowercase), None, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_export_main_on_a_hf_folder(hf_folders, tmp_path):
    from palmchat.checkpoint.gguf_export import ExportGGUFArgs, export_main

    folder = hf_folders("qwen2")
    path = export_main(ExportGGUFArgs(checkpoint=str(folder), out=str(tmp_path / "qwen.gguf"), dtype="q8_0"))
    assert fields(gguf.GGUFReader(path))["general.name"] == folder.name
    # Ollama takes a ChatML or Llama 3 template from the file itself: the Modelfile only points at it
    assert (tmp_path / "qwen.Modelfile").read_text() == "FROM ./qwen.gguf\n"


def test_exports_a_lora_run_trained_from_a_hf_model(hf_folders, tmp_path):
    """A run that LoRA-trained an imported Qwen2 (an adapter-only checkpoint whose base is the Hugging Face folder)
    exports with its adapter merged and the Hugging Face tokenizer it carries; llama.cpp computes the merged model."""
    from palmchat.checkpoint import load_model, load_tokenizer, save_checkpoint
    from palmchat.checkpoint.gguf_export import ExportGGUFArgs, export_main

    folder = hf_folders("qwen2")
    model, _, _ = load_model(folder)
    add_lora(model, "sft", rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.3)  # B starts at zero: a trained adapter moves the logits
    lora = {"name": "sft", "rank": 2, "alpha": 16, "targets": list(DEFAULT_TARGETS)}
    save_checkpoint(tmp_path / "run", 5, model, {"model": model.config.to_dict(), "base": str(folder), "lora": lora},
                    folder / "tokenizer.json", adapter="sft")
    path = export_main(ExportGGUFArgs(checkpoint=str(tmp_path / "run"), out=str(tmp_path / "run.gguf"), dtype="f32"))
    f = fields(gguf.GGUFReader(path))
    assert f["general.name"] == "run" and f["general.architecture"] == "qwen2" and f["tokenizer.ggml.pre"] == "qwen2"
    merged = merge_lora(model, "sft")
    base, _, _ = load_model(folder)
    prompt = load_tokenizer(tmp_path / "run").chat_format.render_prompt([{"role": "user", "content": "Hi there"}])
    with torch.no_grad():
        ours, before = merged(torch.tensor([prompt]))[0], base(torch.tensor([prompt]))[0]
    assert (ours - before).abs().max() > 0.1  # the adapter matters
    llm = llama(path, n_ctx=256)
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    torch.testing.assert_close(theirs, ours, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("case", ["qwen2", "llama3.1"])
def test_llama_cpp_chat_completion_of_a_hf_model_replies_as_palmchat(case, tmp_path):
    """llama-cpp-python's chat path on the file: the model's own template rendered by llama-cpp-python (Llama 3's
    bos written once, not twice), its stop at the end-of-turn token, and palmchat's greedy reply."""
    from hf_models import save_tiny_hf_model
    from hf_tokenizers import save_tiny_hf_tokenizer

    from palmchat.checkpoint import load_model, load_tokenizer
    from palmchat.inference.engine import Engine, SamplingParams
    from palmchat.tokenizer.hf import HFTokenizer

    family, tokenizer_family, overrides, _, pre = HF_CASES[case]
    # a model exactly as wide as the vocabulary: no placeholder token to decode
    vocab_size = HFTokenizer.load(save_tiny_hf_tokenizer(tmp_path / "tokenizer", tokenizer_family)).vocab_size
    save_tiny_hf_model(tmp_path / "m", family, vocab_size=vocab_size, max_position_embeddings=256, **overrides)
    folder = save_tiny_hf_tokenizer(tmp_path / "m", tokenizer_family)
    if pre == "llama-bpe":
        use_llama3_pre_tokenizer(folder)
    llm = llama(export_gguf(folder, None, tmp_path / "m.gguf", dtype="f32"), n_ctx=256)
    model, _, _ = load_model(folder)
    fmt = load_tokenizer(folder).chat_format
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the weather like in Paris?"}]
    reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=12)
    assert reply["usage"]["prompt_tokens"] == len(fmt.render_prompt(messages))
    n = reply["usage"]["completion_tokens"]
    ours = Engine(model).generate([fmt.render_prompt(messages)], SamplingParams(
        max_new_tokens=n, temperature=0.0, stop_token_ids=fmt.reply_stop_ids))[0].tokens
    ours = [t for t in ours if t not in fmt.reply_stop_ids]
    assert reply["choices"][0]["message"]["content"] == llm.detokenize(ours).decode("utf-8", errors="ignore")
