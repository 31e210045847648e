"""Bring your own model, as a user does it: a Hugging Face folder (a tiny Qwen2 built with transformers beside a
ChatML tokenizer with Qwen2.5's template) through the commands: generate, import-hf, a repo id from the local cache,
LoRA SFT then DPO, serving with the official openai client, export-hf back to transformers, and a Hugging Face
sequence-classification reward model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import save_tiny_hf_model, tiny_hf_model
from hf_tokenizers import save_tiny_hf_tokenizer
from server_fixtures import Server, palmchat

from palmchat import checkpoint
from palmchat.cli import main as cli
from palmchat.utils.jsonl import read_jsonl

VOCAB = 700  # above the tiny tokenizer's ~620 ids
PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen"
    # seed 1: a random model whose greedy reply is not one token repeated
    save_tiny_hf_model(folder, "qwen2", seed=1, vocab_size=VOCAB, max_position_embeddings=512)
    save_tiny_hf_tokenizer(folder, "qwen2.5")  # after the model: it merges its eos ids into generation_config.json
    return folder


def transformers_greedy(folder, messages, max_new_tokens: int) -> str:
    """The reply transformers' own generate gives for `messages` rendered by transformers' own chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_on_a_hugging_face_folder_matches_transformers(qwen, capsys):
    assert cli(["generate", str(qwen), "--prompt", PROMPT[1]["content"], "--temperature", "0",
                "--max-new-tokens", "12", "--dtype", "fp32"]) == 0
    ours = capsys.readouterr().out.rstrip("\n")
    theirs = transformers_greedy(qwen, PROMPT[1:], 12)
    assert theirs.strip() and ours == theirs


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_in_generate_and_serve_give_the_same_greedy_reply(qwen, tmp_path, capsys, quantize):
    """--quantize int8 or int4: `palmchat generate` and `palmchat serve` (through the openai client) decode with
    those weights and give the same greedy reply: the quantized engine's. 4 bits change this flat random model's
    greedy reply (to an empty one) where int8 keeps it: so the flag reached both commands."""
    from openai import OpenAI

    assert cli(["generate", str(qwen), "--prompt", PROMPT[1]["content"], "--temperature", "0",
                "--max-new-tokens", "12", "--dtype", "bf16", "--quantize", quantize]) == 0
    generated = capsys.readouterr().out.rstrip("\n")
    server = Server(qwen, tmp_path / "db.sqlite", "--dtype", "bf16", "--quantize", quantize, "--moderation", "none",
                    log=tmp_path / "server.log", no_auth=True).start()
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=PROMPT[1:],
                                               temperature=0, max_tokens=12)
    finally:
        server.stop()
    assert reply.choices[0].message.content == generated
    from palmchat.inference.engine import Engine, SamplingParams

    model = checkpoint.load_model(str(qwen))[0].eval()
    chat_format = checkpoint.load_tokenizer(str(qwen)).chat_format
    replies = {kind: chat_format.decode_reply(Engine(model, dtype=torch.bfloat16, quantize=kind).generate(
        [chat_format.render_prompt(PROMPT[1:])], SamplingParams(max_new_tokens=12, temperature=0))[0].tokens).strip()
        for kind in (None, quantize)}
    assert replies[quantize] == generated.strip()
    assert (replies[quantize] == replies[None] != "") if quantize == "int8" else (replies[quantize] != replies[None])


def test_import_hf_gives_a_native_checkpoint_with_the_same_logits(qwen, tmp_path):
    assert cli(["import-hf", str(qwen), "--out", str(tmp_path / "native")]) == 0
    native = checkpoint.resolve(tmp_path / "native")
    assert (native / "model.safetensors").is_file() and (native / "tokenizer_config.json").is_file()
    ids = torch.randint(0, VOCAB, (2, 9))
    a, _, _ = checkpoint.load_model(qwen)
    b, config, _ = checkpoint.load_model(native)
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=1e-5)
    assert config["hf"]["family"] == "qwen2"
    assert checkpoint.load_tokenizer(native).sha256 == checkpoint.load_tokenizer(qwen).sha256


def test_a_checkpoint_carries_every_file_of_a_hugging_face_tokenizer(qwen, tmp_path):
    """Named chat templates (additional_chat_templates/, e.g. a tool_use template) are part of the tokenizer's
    identity: a checkpoint trained from the folder must carry them, or its tokenizer hash would differ from the
    folder's and a reward model trained from the same folder would be refused."""
    folder = tmp_path / "with-tool-use"
    shutil.copytree(qwen, folder)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")
    assert cli(["import-hf", str(folder), "--out", str(tmp_path / "native")]) == 0
    native = checkpoint.load_tokenizer(tmp_path / "native")
    assert native.sha256 == checkpoint.load_tokenizer(folder).sha256 != checkpoint.load_tokenizer(qwen).sha256
    assert "tool_use" in native.chat_templates


def test_a_repo_id_resolves_through_the_local_cache(qwen, tmp_path, monkeypatch):
    """The real huggingface_hub cache layout (models--org--name/snapshots/REV, refs/main naming REV), read by
    `palmchat generate` in its own process; a repo id that is not there is one clear error."""
    repo = tmp_path / "hub" / "models--acme--tiny-qwen"
    shutil.copytree(qwen, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = palmchat("generate", "acme/tiny-qwen", "--prompt", PROMPT[1]["content"], "--temperature", "0",
                   "--max-new-tokens", "12", "--dtype", "fp32")
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n") == transformers_greedy(qwen, PROMPT[1:], 12)
    missing = palmchat("generate", "acme/not-downloaded", "--prompt", "hi")
    assert missing.returncode == 2
    assert "acme/not-downloaded" in missing.stderr and "hf download" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.fixture(scope="module")
def aligned(qwen, tmp_path_factory):
    """LoRA SFT on the imported model, then LoRA DPO on the SFT checkpoint, as the README shows."""
    from palmchat.train.dpo import DPOArgs
    from palmchat.train.dpo import main as dpo
    from palmchat.train.sft import SFTArgs
    from palmchat.train.sft import main as sft

    root = tmp_path_factory.mktemp("aligned")
    replies = ["It is sunny and warm.", "The cat sat on the mat.", "I am fine, thank you.", "Hello there!"]
    with open(root / "sft.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [*PROMPT[:1], {"role": "user", "content": f"Probe question {i % 6}?"},
                                             {"role": "assistant", "content": replies[i % 4]}]}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Probe question {i % 6}?", "chosen": replies[0],
                                "rejected": replies[1 + i % 3]}) + "\n")
    sft_ckpt = sft(SFTArgs(base=str(qwen), data=[str(root / "sft.jsonl")], out=str(root / "sft"), epochs=10,
                           batch_size=4, lr=1e-2, warmup_steps=2, lora_rank=8, dtype="fp32", save_every=0))
    dpo_ckpt = dpo(DPOArgs(base=str(sft_ckpt), data=[str(root / "pairs.jsonl")], out=str(root / "dpo"), epochs=3,
                           batch_size=4, lr=3e-3, warmup_steps=2, lora_rank=8, beta=0.5, dtype="fp32",
                           save_every=0))
    return dict(root=root, sft=sft_ckpt, dpo=dpo_ckpt)


def test_lora_sft_and_dpo_train_on_an_imported_model(aligned, qwen):
    sft_rows = [r for r in read_jsonl(aligned["root"] / "sft" / "metrics.jsonl") if "loss" in r]
    assert sum(r["loss"] for r in sft_rows[-3:]) < 0.5 * sum(r["loss"] for r in sft_rows[:3])
    dpo_rows = read_jsonl(aligned["root"] / "dpo" / "metrics.jsonl")
    losses = [r["loss"] for r in dpo_rows if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    # both are adapters: SFT's on the Hugging Face folder, DPO's on the SFT checkpoint
    assert (aligned["sft"] / "adapter.safetensors").is_file() and (aligned["dpo"] / "adapter.safetensors").is_file()
    assert checkpoint.read_config(aligned["sft"])["base"] == str(qwen.resolve())
    assert (aligned["dpo"] / "tokenizer_config.json").is_file()


def test_export_hf_after_alignment_loads_in_transformers(aligned, tmp_path):
    """The DPO'd model (both adapters merged) and its tokenizer as a Hugging Face folder: transformers computes the
    same logits and renders the same chat ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert cli(["export-hf", str(aligned["dpo"]), "--out", str(out)]) == 0
    ours, _, _ = checkpoint.load_model(aligned["dpo"])
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    rendered = tok(tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]
    assert rendered == checkpoint.load_tokenizer(aligned["dpo"]).chat_format.render_prompt(PROMPT)


def test_serving_an_aligned_imported_model_with_the_openai_client(aligned, tmp_path):
    """`palmchat serve` on the DPO checkpoint: the openai client's greedy reply is transformers' on the exported
    folder, and a follow-up through previous_response_id reuses the stored turn's KV (cached tokens)."""
    from openai import OpenAI

    exported = tmp_path / "exported"
    assert cli(["export-hf", str(aligned["dpo"]), "--out", str(exported)]) == 0
    server = Server(aligned["dpo"], tmp_path / "db.sqlite", "--dtype", "fp32", "--moderation", "none",
                    log=tmp_path / "server.log", no_auth=True).start()
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=10)
        assert chat.choices[0].message.content == transformers_greedy(exported, PROMPT, 10)
        first = client.responses.create(model=model, input=PROMPT[1]["content"], temperature=0,
                                        max_output_tokens=6)
        second = client.responses.create(model=model, input="And tomorrow?", previous_response_id=first.id,
                                         temperature=0, max_output_tokens=6)
        # the first turn's prompt and reply (but its last token, never run through the model) come from the prefix
        # cache (with instructions they would not: those apply to one response only, and Qwen's template writes its
        # default system prompt without them)
        used = first.usage.input_tokens + first.usage.output_tokens
        assert second.usage.input_tokens > used and second.usage.input_tokens_details.cached_tokens >= used - 1
        import httpx

        assert httpx.get(server.url + "/health").json()["prefix_stable"] is True
    finally:
        server.stop()


def test_a_template_that_rewrites_earlier_turns_is_served_by_rendering_again(tmp_path):
    """Qwen3's template drops earlier replies' reasoning, so it is not prefix-stable: /health says so, and a follow-up
    through previous_response_id runs the same prompt as the whole conversation sent at once."""
    from openai import OpenAI

    folder = tmp_path / "tiny-qwen3"
    save_tiny_hf_model(folder, "qwen3", vocab_size=VOCAB, max_position_embeddings=512)
    save_tiny_hf_tokenizer(folder, "qwen3")
    server = Server(folder, tmp_path / "db.sqlite", "--dtype", "fp32", "--moderation", "none",
                    log=tmp_path / "server.log", no_auth=True).start()
    try:
        import httpx

        assert httpx.get(server.url + "/health").json()["prefix_stable"] is False
        assert "not prefix-stable" in server.log()
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        first = client.responses.create(model=model, input="Hello there!", temperature=0, max_output_tokens=5)
        second = client.responses.create(model=model, input="And tomorrow?", previous_response_id=first.id,
                                         temperature=0, max_output_tokens=5)
        whole = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": first.output_text},
                 {"role": "user", "content": "And tomorrow?"}]
        chat_format = checkpoint.load_tokenizer(folder).chat_format
        assert second.usage.input_tokens == len(chat_format.render_prompt(whole))
        conversation = client.conversations.create()  # the same through a stored conversation
        first = client.responses.create(model=model, input="Hello there!", conversation=conversation.id,
                                        temperature=0, max_output_tokens=5)
        second = client.responses.create(model=model, input="And tomorrow?", conversation=conversation.id,
                                         temperature=0, max_output_tokens=5)
        whole[1]["content"] = first.output_text
        assert second.usage.input_tokens == len(chat_format.render_prompt(whole))
    finally:
        server.stop()


def test_a_sequence_classification_folder_is_a_reward_model(tmp_path):
    from hf_models import tiny_hf_config
    from transformers import AutoModelForSequenceClassification

    from palmchat.checkpoint.heads import load_reward_model

    folder = tmp_path / "rm"
    hf = AutoModelForSequenceClassification.from_config(tiny_hf_config("qwen2", vocab_size=VOCAB, num_labels=1,
                                                                       max_position_embeddings=512))
    hf.load_state_dict(tiny_hf_model("qwen2", vocab_size=VOCAB).state_dict(), strict=False)  # random backbone
    torch.nn.init.normal_(hf.score.weight)
    hf.eval().save_pretrained(folder)
    save_tiny_hf_tokenizer(folder, "qwen2.5")
    tokenizer = checkpoint.load_tokenizer(folder)
    model, _ = load_reward_model(folder, tokenizer=tokenizer)
    ids = tokenizer.chat_format.render([*PROMPT, {"role": "assistant", "content": "It is sunny."}])[0]
    end = max(i for i, t in enumerate(ids) if t == tokenizer.chat_format.eot_id)  # where palmchat reads the score
    with torch.no_grad():
        expected = hf(torch.tensor([ids[:end + 1]])).logits[0, 0]
        ours = model.score(torch.tensor([ids]))[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_lora_on_a_bf16_model_keeps_its_frozen_base_in_bf16(tmp_path):
    """Under bf16 autocast a LoRA run trains fp32 adapters on the bf16 weights as stored (no fp32 copy of the
    base); in fp32 training (a CPU without bf16) and in full fine-tuning every weight is fp32."""
    from palmchat.model.lora import lora_parameters
    from palmchat.train.common import load_policy

    folder = save_tiny_hf_model(tmp_path / "bf16", "qwen2", vocab_size=VOCAB, dtype=torch.bfloat16)
    save_tiny_hf_tokenizer(folder, "qwen2.5")
    model, _, _ = load_policy(str(folder), lora_rank=4, dtype=torch.bfloat16)
    adapters = {id(p) for p in lora_parameters(model, "policy")}
    assert {p.dtype for p in model.parameters() if id(p) in adapters} == {torch.float32}
    assert {p.dtype for p in model.parameters() if id(p) not in adapters} == {torch.bfloat16}
    for lora_rank, dtype in ((4, None), (0, torch.bfloat16)):
        model, _, _ = load_policy(str(folder), lora_rank=lora_rank, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_lora_adapter_exports_as_a_peft_folder_that_peft_loads(aligned, qwen, tmp_path):
    """The SFT adapter (on the Hugging Face folder itself) as a PEFT folder: peft.PeftModel on the base computes the
    logits palmchat computes with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    assert cli(["export-hf", str(aligned["sft"]), "--out", str(out), "--peft"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(qwen.resolve())
    base = AutoModelForCausalLM.from_pretrained(qwen, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, out).eval()
    ours, _, _ = checkpoint.load_model(aligned["sft"])
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        plain = base.get_base_model()(ids).logits if hasattr(base, "get_base_model") else None
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)
    assert plain is None or (plain - ours(ids)).abs().max() > 1e-2  # the adapter does change the logits


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_a_peft_adapter_imports_as_a_palmchat_adapter(family, tmp_path):
    """A PEFT LoRA on every projection (q, k, v apart, as PEFT has them; NeoX's fused query_key_value with its
    per-head row order) becomes a palmchat adapter checkpoint whose logits are peft's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_tiny_hf_model(tmp_path / "base", family)
    save_tiny_hf_tokenizer(base, "llama3")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if family == "llama" \
        else ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert cli(["import-hf", str(tmp_path / "adapter"), "--out", str(tmp_path / "imported")]) == 0
    ours, config, _ = checkpoint.load_model(tmp_path / "imported")
    assert config["lora"]["rank"] == 4 * (3 if family == "llama" else 1)
    ids = torch.randint(0, 160, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model.eval()(ids).logits, rtol=0, atol=1e-4)


def test_bad_peft_folders_get_one_clear_error(tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "use_dora": True, "base_model_name_or_path": "x"}))
    assert cli(["import-hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "use_dora=True is not supported" in capsys.readouterr().err
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    assert cli(["import-hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "--base is required" in capsys.readouterr().err


def test_reward_model_and_grpo_on_an_imported_model(aligned, qwen):
    """The remaining stages on the Hugging Face model: a reward model trained from the folder, then GRPO on the
    SFT adapter checkpoint scored by it (the tokenizers' hashes agree), with whole conversations as prompts."""
    from palmchat.checkpoint.heads import load_reward_model
    from palmchat.train.grpo import GRPOArgs
    from palmchat.train.grpo import main as grpo
    from palmchat.train.reward import RewardArgs
    from palmchat.train.reward import main as reward

    root = aligned["root"]
    rm = reward(RewardArgs(base=str(qwen), data=[str(root / "pairs.jsonl")], out=str(root / "rm"), epochs=2,
                           batch_size=4, lr=3e-3, lora_rank=4, dtype="fp32", save_every=0))
    rm_model, _ = load_reward_model(rm, tokenizer=checkpoint.load_tokenizer(aligned["sft"]))
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"messages": [*PROMPT[:1], {"role": "user", "content": f"Probe question {i}?"}]}) + "\n")
    out = grpo(GRPOArgs(base=str(aligned["sft"]), reward=str(rm), prompts=[str(root / "prompts.jsonl")],
                        out=str(root / "grpo"), iterations=2, prompts_per_iteration=2, group_size=4,
                        max_new_tokens=8, minibatch=8, lora_rank=4, dtype="fp32", save_every=0))
    rows = read_jsonl(root / "grpo" / "metrics.jsonl")
    assert len([r for r in rows if "score" in r]) == 2 and rows[-1]["logprob_mismatch"] < 1e-4
    policy, _, _ = checkpoint.load_model(out)
    before, _, _ = checkpoint.load_model(aligned["sft"])
    assert any((a - b).abs().max() > 0 for a, b in zip(policy.state_dict().values(), before.state_dict().values()))
    assert rm_model.eot_id == checkpoint.load_tokenizer(qwen).chat_format.eot_id


def test_terminal_chat_on_a_hugging_face_folder(qwen):
    run = palmchat("chat", str(qwen), "--temperature", "0", "--max-new-tokens", "6", "--dtype", "fp32",
                   "--system", PROMPT[0]["content"], input=f"{PROMPT[1]['content']}\nAnd tomorrow?\n/quit\n")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("assistant> ") == 2


def test_a_broken_hugging_face_folder_is_one_line_naming_the_file(qwen, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "mamba", "architectures": ["MambaX"]}))
    run = palmchat("generate", str(broken), "--prompt", "hi")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "config.json" in run.stderr and "mamba" in run.stderr
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    run = palmchat("serve", str(broken), "--db", str(tmp_path / "palmchat.db"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "pytorch_model.bin" in run.stderr and "safetensors" in run.stderr
