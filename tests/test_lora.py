import json

import pytest
import torch
from torch import nn

from palmchat.inference.kv_cache import KVCache
from palmchat.model.config import preset
from palmchat.model.lora import (
    ADAPTER_FILE,
    AdapterError,
    LoRALinear,
    adapter_state_dict,
    adapters,
    add_lora,
    load_adapter,
    load_adapter_state_dict,
    lora_config,
    lora_parameters,
    mark_trainable,
    merge_lora,
    merged_state_dict,
    remove_adapter,
    save_adapter,
    set_adapter,
    set_row_adapters,
    use_adapter,
)
from palmchat.model.transformer import Transformer

BLOCKS = ["parallel", "sequential"]


def make(block="parallel", **overrides):
    config = preset("tiny", vocab_size=97, block=block, **overrides)
    return Transformer(config).eval(), config


def randomize(model, name, std=0.05):
    """Give B nonzero values so the adapter actually changes the model."""
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.normal_(std=std)


def tokens(B=3, T=12):
    return torch.randint(0, 97, (B, T))


@pytest.mark.parametrize("block", BLOCKS)
def test_trainable_parameter_count(block):
    model, c = make(block)
    add_lora(model, "a", rank=4)
    hd = c.n_heads * c.head_dim
    kv = c.n_kv_heads * c.head_dim
    if block == "parallel":  # in_proj, attn_out, ff_out
        shapes = [(c.dim, hd + 2 * kv + 2 * c.ffn_hidden), (hd, c.dim), (c.ffn_hidden, c.dim)]
    else:  # qkv, attn_out, gate_up, ff_out
        shapes = [(c.dim, hd + 2 * kv), (hd, c.dim), (c.dim, 2 * c.ffn_hidden), (c.ffn_hidden, c.dim)]
    expected = c.n_layers * sum(4 * (i + o) for i, o in shapes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected == sum(p.numel() for p in lora_parameters(model, "a"))
    assert lora_config(model, "a") == {"name": "a", "rank": 4, "alpha": 16.0,
                                       "targets": [t for t in ("in_proj", "qkv", "attn_out", "gate_up", "ff_out")
                                                   if any(n.endswith(t) for n, _ in model.named_modules())]}


def test_only_adapter_gets_gradients_and_base_is_bit_identical_after_step():
    model, _ = make()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    add_lora(model, "a")
    model.train()
    before_A = model.blocks[0].in_proj.lora_A["a"].detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = tokens()
    for _ in range(2):  # the second step gives A a gradient too (B is nonzero after the first)
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (".lora_A.a" in n or ".lora_B.a" in n), n
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)
    assert not torch.equal(model.blocks[0].in_proj.lora_A["a"], before_A)
    assert model.blocks[0].in_proj.lora_B["a"].abs().sum() > 0


@pytest.mark.parametrize("block", BLOCKS)
def test_new_adapter_is_identity_and_none_is_base(block):
    model, _ = make(block)
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        add_lora(model, "a")
        assert torch.equal(model(x), ref)  # B = 0: exactly no change
        randomize(model, "a")
        assert not torch.allclose(model(x), ref, atol=1e-3)
        with use_adapter(model, None):
            assert torch.equal(model(x), ref)  # LoRA switched off = the frozen reference model
        set_row_adapters(model, [None, None, None])
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("block", BLOCKS)
def test_merge_equals_unmerged(block):
    model, config = make(block)
    add_lora(model, "a", rank=4, alpha=8)
    add_lora(model, "b", rank=2)
    randomize(model, "a")
    randomize(model, "b")
    x = tokens()
    with torch.no_grad():
        with use_adapter(model, "a"):
            want = model(x)
        merged = merge_lora(model, "a")
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert all(p.requires_grad for p in merged.parameters())
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=0)
        plain = Transformer(config).eval()
        plain.load_state_dict(merged_state_dict(model, "a"))  # strict: plain keys, nothing extra
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=0)
        # the LoRA model is untouched by a (default, copying) merge
        assert adapters(model) == ["a", "b"] and isinstance(model.blocks[0].attn_out, LoRALinear)


def test_two_adapters_share_base_and_switching_works():
    model, _ = make()
    add_lora(model, "actor")
    base_weight = model.blocks[0].in_proj.base.weight
    add_lora(model, "critic", rank=2, alpha=4)
    assert model.blocks[0].in_proj.base.weight is base_weight  # one frozen base in memory
    # the last add_lora leaves only its own adapter trainable and active
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".critic" in n for n in trainable)
    mark_trainable(model, "actor", "critic")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".actor" in n or ".critic" in n}
    randomize(model, "actor")
    randomize(model, "critic")
    x = tokens()
    with torch.no_grad():
        set_adapter(model, "actor")
        actor = model(x)
        set_adapter(model, "critic")
        critic = model(x)
        assert not torch.allclose(actor, critic, atol=1e-3)
        with use_adapter(model, "actor"):
            torch.testing.assert_close(model(x), actor, atol=0, rtol=0)
            with use_adapter(model, None):
                base = model(x)
            torch.testing.assert_close(model(x), actor, atol=0, rtol=0)
        torch.testing.assert_close(model(x), critic, atol=0, rtol=0)  # restored
        with pytest.raises(RuntimeError), use_adapter(model, "actor"):
            raise RuntimeError
        torch.testing.assert_close(model(x), critic, atol=0, rtol=0)  # restored after an exception too
        assert not torch.allclose(base, actor, atol=1e-3)
    with pytest.raises(AdapterError, match="no adapter 'nope'.*actor, critic"):
        set_adapter(model, "nope")
    with pytest.raises(AdapterError, match="already has an adapter named 'actor'"):
        add_lora(model, "actor")
    with pytest.raises(AdapterError, match="adapter name"):
        add_lora(model, "a.b")
    with pytest.raises(AdapterError, match="'train' as an adapter name"):  # would shadow nn.Module.train
        add_lora(model, "train")


@pytest.mark.parametrize("block", BLOCKS)
def test_per_row_mixed_batch_equals_each_row_alone(block):
    model, _ = make(block)
    add_lora(model, "a", rank=4)
    add_lora(model, "b", rank=8, alpha=4)  # different ranks batch together (zero-padded)
    add_lora(model, "c", rank=2, targets=("attn_out",))  # an adapter on some layers only
    for n in ("a", "b", "c"):
        randomize(model, n)
    names = ["b", None, "a", "c", "b"]
    x = tokens(B=len(names))
    with torch.no_grad():
        set_row_adapters(model, names)
        mixed = model(x)
        for i, n in enumerate(names):
            with use_adapter(model, n):
                torch.testing.assert_close(mixed[i : i + 1], model(x[i : i + 1]), atol=1e-5, rtol=1e-4)
        with pytest.raises(AdapterError, match="5 rows but the batch has 2"):
            model(x[:2])


def test_cached_decode_with_adapters_equals_full_forward():
    model, config = make()
    add_lora(model, "a")
    add_lora(model, "b")
    randomize(model, "a")
    randomize(model, "b")
    x = tokens(B=3, T=10)
    with torch.no_grad():
        for state in ("a", ["a", "b", None]):  # one adapter for the batch, then one per row (serving)
            with use_adapter(model, state):
                full = model(x)
                cache = KVCache(config, batch_size=3)
                model(x[:, :9], cache=cache)
                step = model(x[:, 9:], cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_autocast_bf16():
    model, _ = make()
    add_lora(model, "a")
    add_lora(model, "b")
    randomize(model, "a", std=0.2)
    randomize(model, "b", std=0.2)
    x = tokens()
    with torch.no_grad():
        for state in ("a", ["a", None, "b"]):
            with use_adapter(model, state):
                want = model(x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    got = model(x)
            with use_adapter(model, None):
                base = model(x)
            assert (got.float() - want).abs().max() < 0.1 < (want - base).abs().max()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().mean().backward()
    assert model.blocks[0].in_proj.lora_B["b"].grad is not None


def test_save_load_round_trip(tmp_path):
    model, config = make()
    add_lora(model, "a", rank=4, alpha=8, targets=("in_proj", "ff_out"))
    randomize(model, "a")
    x = tokens()
    with torch.no_grad():
        want = model(x)
    cfg = lora_config(model, "a")
    path = save_adapter(tmp_path / "sft", model, "a", cfg)
    (tmp_path / "sft" / "config.json").write_text(json.dumps({"lora": cfg}))  # the caller's part
    assert path.name == ADAPTER_FILE and sorted(p.name for p in (tmp_path / "sft").iterdir()) == [
        ADAPTER_FILE, "config.json"]  # no temporary file left behind
    from safetensors.torch import load_file
    saved = load_file(path)
    assert set(saved) == set(adapter_state_dict(model, "a"))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in saved) and "blocks.0.in_proj.lora_A" in saved
    assert saved["blocks.1.ff_out.lora_B"].shape == (config.dim, 4)

    # into a fresh copy of the base: the file alone recreates the adapter (frozen, inactive)
    fresh = Transformer(config).eval()
    fresh.load_state_dict({k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    assert load_adapter(tmp_path / "sft", fresh) == "a"
    assert lora_config(fresh, "a") == cfg
    assert not any(p.requires_grad for p in lora_parameters(fresh, "a"))
    with torch.no_grad(), use_adapter(fresh, "a"):
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)
    # into an existing adapter of the same shape, under another name
    add_lora(fresh, "a2", rank=4, alpha=8, targets=("in_proj", "ff_out"))
    load_adapter(tmp_path / "sft", fresh, "a2")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)


def test_shape_mismatch_names_the_key(tmp_path):
    model, _ = make()
    add_lora(model, "a", rank=4)
    add_lora(model, "b", rank=8)
    with pytest.raises(AdapterError, match=r"tensor blocks\.0\.in_proj\.lora_A has shape \(4, 64\) but the model "
                                           r"expects \(8, 64\)"):
        load_adapter_state_dict(model, "b", adapter_state_dict(model, "a"))
    tensors = adapter_state_dict(model, "b")
    del tensors["blocks.1.ff_out.lora_B"]
    with pytest.raises(AdapterError, match=r"missing: \['blocks\.1\.ff_out\.lora_B'\]"):
        load_adapter_state_dict(model, "b", tensors)
    save_adapter(tmp_path, model, "a")
    with pytest.raises(AdapterError, match=r"adapter\.safetensors: .*tensor blocks\.0\.in_proj\.lora_A"):
        load_adapter(tmp_path, model, "b")
    # creating an adapter from a file that does not fit leaves the model as it was
    other, _ = make(dim=32)
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(tmp_path, other)
    assert adapters(other) == [] and not any(isinstance(m, LoRALinear) for m in other.modules())
    with pytest.raises(AdapterError, match="rank=2"):
        save_adapter(tmp_path, model, "a", {"name": "a", "rank": 2, "alpha": 16, "targets": ["in_proj"]})


def test_remove_adapter_restores_plain_layers():
    model, _ = make()
    add_lora(model, "a")
    add_lora(model, "b", targets=("ff_out",))
    remove_adapter(model, "a")
    assert adapters(model) == ["b"]
    assert isinstance(model.blocks[0].in_proj, nn.Linear) and isinstance(model.blocks[0].ff_out, LoRALinear)
    remove_adapter(model, "b")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
