"""Hugging Face checkpoints in and out (palmchat/checkpoint/hf.py): each family's tiny random model, built and saved
by `transformers`, gives the same logits and the same greedy tokens in palmchat; exported folders load back in
`transformers` with the same logits; bad folders get one clear error naming the file and the field."""

import json
import shutil

import pytest
import torch
from hf_models import VOCAB, randomize, save_tiny_hf_model
from safetensors.torch import load_file, save_file

from palmchat.checkpoint.hf import (
    export_hf,
    hf_model_config,
    hf_state_dict,
    is_hf_model_folder,
    load_hf_model,
    load_hf_reward_backbone,
    native_state_dict,
)
from palmchat.checkpoint.native import CheckpointError
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.fused_block import FusedBlock
from palmchat.kernels.cpu_linear import bf16_kernel, can_pack
from palmchat.model.config import preset
from palmchat.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}  # with head_dim 16: kept, interpolated and scaled bands
VARIANTS = {
    "llama-untied": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama3-rope": ("llama", dict(hidden_size=64, rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope-biases": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                               attention_bias=True, mlp_bias=True)),
    "mistral-window-4": ("mistral", {}),  # the test sequences are longer than the window
    "qwen2-tied": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gpt_neox-parallel": ("gpt_neox", {}),  # rotary_pct 0.25, two LayerNorms
    "gpt_neox-sequential": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=0.5)),
    "cohere": ("cohere", {}),
    "gemma3": ("gemma3_text", {}),  # a local layer (window 4, own rotary base), a global one with linear rope
}
PROMPTS = [[5, 17, 99, 3, 150, 42, 8, 77, 23, 64, 11, 130], [9, 33, 71, 120, 4, 58, 96], [44, 12, 101]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> its saved folder (built once per module)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_hf_model(root / name, family, **overrides)
            for name, (family, overrides) in VARIANTS.items()}


def load_transformers(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), True
    return ids, mask


def assert_same_logits(model, hf_model, prompts=PROMPTS):
    """fp32 logits of a left-padded mixed-length batch, on real tokens, and of the longest prompt alone."""
    ids, mask = left_padded(prompts)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, padding_mask=mask)
        theirs = hf_model(ids, attention_mask=mask.long(), position_ids=positions).logits
        assert theirs.abs().max() > 1  # logits that a wrong weight would move well past the tolerance
        torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=0)
        longest = torch.tensor([prompts[0]])  # no padding: the training path (with a window: its explicit mask)
        torch.testing.assert_close(model(longest), hf_model(longest).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers_on_a_left_padded_batch(folders, variant):
    model, info = load_hf_model(folders[variant])
    assert info["family"] == VARIANTS[variant][0]
    assert info["generation_config"]["eos_token_id"] == 2  # what save_pretrained wrote
    assert model.num_params() == model.config.num_params() == load_transformers(folders[variant]).num_parameters()
    assert_same_logits(model.eval(), load_transformers(folders[variant]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decoding_with_the_kv_cache_equals_generate(folders, variant):
    """palmchat's Engine (right-padded prefill into a KV cache, then one token per row per step) against
    transformers' generate, prompt by prompt; and one prompt alone (the engine's one-row decode path)."""
    model, _ = load_hf_model(folders[variant])
    hf_model = load_transformers(folders[variant])
    hf_model.generation_config.eos_token_id = None  # run the full length, as the engine does without stop tokens
    params = SamplingParams(max_new_tokens=10, temperature=0)
    engine = Engine(model.eval())
    batch = [c.tokens for c in engine.generate(PROMPTS, params)]
    alone = engine.generate(PROMPTS[1:2], params)[0].tokens
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf_model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    assert batch == expected
    assert alone == expected[1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_loads_in_transformers_with_the_same_logits(folders, variant, tmp_path):
    model, info = load_hf_model(folders[variant])
    out = export_hf(model, tmp_path / "exported", family=info["family"], extra_config={"eos_token_id": 2})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == info["family"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert_same_logits(model.eval(), load_transformers(out))
    # and the exported tensors are the imported ones, names and values
    original = load_file(folders[variant] / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def random_native(**overrides):
    torch.manual_seed(0)
    return randomize(Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=64, **overrides))).eval()


@pytest.mark.parametrize("overrides, family", [
    (dict(), "cohere"),  # PaLM's parallel block: one LayerNorm without bias, SwiGLU, multi-query, tied
    (dict(n_kv_heads=2, tie_embeddings=False), "cohere"),
    (dict(block="sequential", norm="rmsnorm", n_kv_heads=2, tie_embeddings=False), "llama"),
    (dict(block="sequential", norm="rmsnorm", sliding_window=5), "mistral"),
], ids=["palm", "palm-gqa-untied", "sequential", "sequential-window"])
def test_native_model_exports_with_the_same_logits(overrides, family, tmp_path):
    """Cohere rotates interleaved pairs: the export permutes each head's q/k rows, so the logits must match."""
    model = random_native(**overrides)
    out = export_hf(model, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["eos_token_id"] is None  # not the family's default id
    assert not (out / "generation_config.json").exists()
    assert_same_logits(model, load_transformers(out))
    back, info = load_hf_model(out)  # and it comes back as the same model
    assert info["family"] == family
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_model_no_family_represents_is_refused_with_the_reason(tmp_path):
    model = random_native(block="sequential", norm="layernorm")  # LayerNorm without bias, SwiGLU, sequential
    with pytest.raises(CheckpointError, match="no Hugging Face family has this block"):
        export_hf(model, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_export_as_a_family_that_differs_is_refused(folders, tmp_path):
    model, _ = load_hf_model(folders["qwen2-tied"])  # biases on q, k, v only: Llama's attention_bias means o too
    with pytest.raises(CheckpointError, match=r"cannot export as llama: its config.json cannot say "
                                              r"attn_out_bias=False \(as llama: True\)"):
        export_hf(model, tmp_path / "exported", family="llama")
    model, _ = load_hf_model(folders["mistral-window-4"])
    with pytest.raises(CheckpointError, match=r"sliding_window=4 \(as llama: None\)"):
        export_hf(model, tmp_path / "exported", family="llama")


def test_name_tables_split_what_they_fuse():
    model = random_native(block="sequential", norm="rmsnorm", n_kv_heads=2)
    hf = hf_state_dict(model, "llama", model.config)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert hf["model.layers.1.mlp.up_proj.weight"].shape == (256, 64)
    back = native_state_dict(hf, "llama", model.config)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_bf16_checkpoint_stays_bf16_and_a_dtype_converts(tmp_path):
    folder = save_tiny_hf_model(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16)
    model, _ = load_hf_model(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32, _ = load_hf_model(folder, dtype=torch.float32)
    assert {p.dtype for p in model32.parameters()} == {torch.float32}
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert_same_logits(model32.eval(), hf_model)


def test_sharded_checkpoint_loads(tmp_path):
    folder = save_tiny_hf_model(tmp_path / "sharded", "llama", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    assert is_hf_model_folder(folder)
    model, _ = load_hf_model(folder)
    assert_same_logits(model.eval(), load_transformers(folder))


def test_exported_shards_load(tmp_path):
    model = random_native(block="sequential", norm="rmsnorm")
    out = export_hf(model, tmp_path / "sharded", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert_same_logits(model, load_transformers(out))


def test_blocks_with_features_the_c_kernel_lacks_are_not_fused(folders):
    """The bf16 inference copy fuses palmchat's own blocks only; Qwen3's q/k norms and Mistral's window (whose
    linears have no bias, so they are packed like palmchat's) run in PyTorch."""
    if bf16_kernel() is None or not can_pack(torch.bfloat16):
        pytest.skip("no bf16 decode kernel on this CPU")
    native = Engine(random_native(block="sequential", norm="rmsnorm"), dtype=torch.bfloat16).sync()
    assert all(isinstance(b, FusedBlock) for b in native.blocks)
    for variant in ("qwen3", "mistral-window-4", "llama3-rope"):
        runner = Engine(load_hf_model(folders[variant])[0], dtype=torch.bfloat16).sync()
        fused = [isinstance(b, FusedBlock) for b in runner.blocks]
        assert fused == [variant == "llama3-rope"] * 2  # llama3 rope is only tables: the kernel takes them


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_inference_copy_decodes_every_family(folders, variant):
    """The engine's bf16 copy (packed bias-free linears, fused blocks where allowed) runs each family, and each
    greedy token it picks is one the fp32 model, given the same prefix, ranks within bf16 noise of its best (random
    models have near-ties, so not necessarily the same token)."""
    model, _ = load_hf_model(folders[variant])
    bf16 = Engine(model.eval(), dtype=torch.bfloat16).generate(PROMPTS, SamplingParams(max_new_tokens=8,
                                                                                       temperature=0))
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, bf16):
            assert len(completion.tokens) == 8
            logits = model(torch.tensor([prompt + completion.tokens]))[0, len(prompt) - 1 : -1]  # (8, V)
            picked = logits.gather(-1, torch.tensor(completion.tokens)[:, None])[:, 0]
            assert (logits.max(-1).values - picked).max() < 0.05


def test_is_hf_model_folder(folders, tmp_path):
    assert is_hf_model_folder(folders["qwen2-tied"])
    assert not is_hf_model_folder(tmp_path)
    native = tmp_path / "native"
    native.mkdir()
    (native / "config.json").write_text(json.dumps({"model": {}, "model_type": "llama"}))
    (native / "model.safetensors").write_bytes(b"")
    assert not is_hf_model_folder(native)


def test_qwen25_config_maps_field_by_field():
    """Qwen2.5-0.5B-Instruct's config.json (transformers 4.x style: rope_theta at the top, a sliding_window that
    use_sliding_window switches off)."""
    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
          "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
          "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
          "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
          "use_sliding_window": False, "vocab_size": 151936}
    cfg = hf_model_config(hf, "Qwen2.5-0.5B/config.json")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden) == (896, 24, 14, 2, 64,
                                                                                                   4864)
    assert (cfg.block, cfg.norm, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings) == ("sequential", "rmsnorm",
                                                                                        1e-6, 1e6, True)
    assert (cfg.qkv_bias, cfg.attn_out_bias, cfg.ffn_bias, cfg.sliding_window) == (True, False, False, None)
    assert cfg.max_seq_len == 32768


def test_llama31_config_in_the_4x_style():
    hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 100, "rope_theta": 500000.0,
          "max_position_embeddings": 131072,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    cfg = hf_model_config(hf, "config.json")
    assert (cfg.rope_type, cfg.rope_scaling, cfg.rope_theta, cfg.rope_original_max_len) == ("llama3", 8.0, 5e5, 8192)
    assert not cfg.tie_embeddings  # transformers' default for a Llama config.json that does not say


@pytest.mark.parametrize("window, expected", [(None, None), (4096, 4096), ("absent", 4096)])
def test_mistral_sliding_window_may_be_null(window, expected):
    hf = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_hidden_layers": 2, "num_key_value_heads": 2, "vocab_size": 100}
    if window != "absent":
        hf["sliding_window"] = window
    assert hf_model_config(hf).sliding_window == expected


# -- bad input: one CheckpointError naming the file and the field ------------------------------------------------


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def copy_of(folders, variant, tmp_path):
    return shutil.copytree(folders[variant], tmp_path / variant)


def test_missing_config_json(folders, tmp_path):
    folder = copy_of(folders, "qwen2-tied", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"qwen2-tied/config.json: missing"):
        load_hf_model(folder)


def test_index_naming_a_missing_shard(tmp_path):
    folder = save_tiny_hf_model(tmp_path / "sharded", "llama", max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: weight_map names shard '{shard.name}'"
                                              r", which is missing"):
        load_hf_model(folder)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="mamba"), r"config.json: model_type 'mamba' is not supported \(supported: llama, mistral"),
    (dict(model_type="gemma2"), r"config.json: model_type 'gemma2' is not supported: Gemma 2's attention and"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
     r"config.json: rope_parameters.rope_type 'yarn' is not supported \(supported: linear, llama3\)"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"config.json: rope_scaling.rope_type 'dynamic' is not supported"),
    (dict(hidden_act="gelu"), r"config.json: hidden_act 'gelu' is not supported for this family \(supported: silu"),
    (dict(quantization_config={"quant_method": "gptq"}), r"config.json: quantization_config is set"),
    (dict(use_sliding_window=True), r"config.json: use_sliding_window is true"),
    (dict(architectures=["Qwen2ForTokenClassification"]),
     r"config.json: architectures 'Qwen2ForTokenClassification' is not supported"),
])
def test_unsupported_config_is_refused_by_name(folders, tmp_path, changes, message):
    folder = copy_of(folders, "qwen2-tied", tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_hf_model(folder)


def test_shape_mismatch_names_the_tensor_and_both_shapes(folders, tmp_path):
    folder = copy_of(folders, "qwen2-tied", tmp_path)
    edit_config(folder, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"qwen2-tied: shape mismatch for model.layers.0.mlp.gate_proj.weight: "
                                              r"\(64, 32\) in the checkpoint, \(48, 32\) from config.json "
                                              r"\(palmchat's blocks.0.gate_up.weight\)"):
        load_hf_model(folder)


def test_missing_and_unexpected_tensors_are_named(folders, tmp_path):
    folder = copy_of(folders, "llama-untied", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'lm_head.weight' \(for palmchat's lm_head.weight\)"):
        load_hf_model(folder)
    save_file({**tensors, "model.layers.0.extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.extra.weight' of shape \(2,\)"):
        load_hf_model(folder)


def test_buffers_older_checkpoints_carry_are_skipped(folders, tmp_path):
    """Pythia-era GPT-NeoX files hold the causal mask and rotary frequencies as tensors: recomputed, not weights."""
    folder = copy_of(folders, "gpt_neox-parallel", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    extra = {"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 8, 8, dtype=torch.bool),
             "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
             "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(2)}
    save_file({**tensors, **extra}, folder / "model.safetensors")
    model, _ = load_hf_model(folder)
    assert_same_logits(model.eval(), load_transformers(folders["gpt_neox-parallel"]))


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast"])
def test_gpt_neox_tanh_gelus_load_exactly(act, tmp_path):
    folder = save_tiny_hf_model(tmp_path / act, "gpt_neox", hidden_act=act)
    model, _ = load_hf_model(folder)
    assert model.config.ffn == "gelu_tanh"
    assert_same_logits(model.eval(), load_transformers(folder))


def test_pickle_only_folder_is_refused(folders, tmp_path):
    folder = copy_of(folders, "qwen2-tied", tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\): convert to safetensors; "
                                              r"palmchat never unpickles"):
        load_hf_model(folder)


# -- sequence-classification checkpoints as reward models ------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reward_backbone_scores_like_transformers(family, tmp_path):
    from hf_models import tiny_hf_config

    torch.manual_seed(0)
    config = tiny_hf_config(family, num_labels=1)
    hf_model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    hf_model = randomize(hf_model).eval()
    hf_model.save_pretrained(tmp_path / "rm")
    backbone, score, info = load_hf_reward_backbone(tmp_path / "rm")
    assert info["family"] == family and score.shape == (1, config.hidden_size)
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        ours = backbone.eval().hidden_states(ids)[:, -1] @ score.T  # (1, 1): the last token's score
        theirs = hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match=r"architectures '\w+ForSequenceClassification' is not supported here "
                                              r"\(expected a ForCausalLM"):
        load_hf_model(tmp_path / "rm")


# -- the model settings other families need ----------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(rotary_dim=3), r"rotary_dim=3 must be an even integer in \[2, head_dim=16\]"),
    (dict(ffn="relu"), r"ffn='relu' must be"),
    (dict(norm="rmsnorm", norm_bias=True), r"norm_bias=True needs norm=\"layernorm\""),
    (dict(qkv_bias=True), r"qkv_bias=True is not supported by the fused one-norm parallel block"),
    (dict(block="sequential", parallel_norms=2), r"parallel_norms=2 applies to block=\"parallel\" only"),
    (dict(sliding_window=0), r"sliding_window=0 must be a positive integer or None"),
    (dict(rope_type="yarn"), r"rope_type='yarn' must be \"linear\" or \"llama3\""),
])
def test_model_config_settings_are_validated_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny", vocab_size=VOCAB, **bad)


def test_settings_create_only_the_parameters_they_use():
    names = set(Transformer(preset("tiny", vocab_size=VOCAB, block="sequential")).state_dict())
    assert not any(n.endswith("bias") or "q_norm" in n for n in names)  # palmchat's own block: none of them
    names = set(Transformer(preset("tiny", vocab_size=VOCAB, block="sequential", qkv_bias=True, qk_norm=True,
                                   ffn="gelu")).state_dict())
    assert {"blocks.0.qkv.bias", "blocks.0.q_norm.weight", "blocks.0.k_norm.weight", "blocks.0.ff_in.weight"} <= names
    assert not {"blocks.0.attn_out.bias", "blocks.0.ff_out.bias", "blocks.0.gate_up.weight"} & names


def test_gemma3_config_in_the_4x_style():
    """Gemma 3 4B's text config as transformers 4.x wrote it: rope_theta and rope_scaling are the global layers',
    rope_local_base_freq the local ones', and every sixth layer is global."""
    hf = {"model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_hidden_layers": 12, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
          "query_pre_attn_scalar": 16, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
          "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
          "sliding_window_pattern": 6, "final_logit_softcapping": None, "attn_logit_softcapping": None}
    cfg = hf_model_config(hf)
    assert cfg.local_layers == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.local_rope_theta) == (1e6, 8.0, 1e4)
    assert (cfg.embed_scale, cfg.attn_scale, cfg.norm_offset) == (8.0, 0.25, 1.0)
    with pytest.raises(CheckpointError, match="config.json: final_logit_softcapping is set: soft-capping"):
        hf_model_config({**hf, "final_logit_softcapping": 30.0})
