"""Many fine-tunes behind one server: LoRA adapters decoding in one batch (each row its own delta, model/lora.py),
loaded and unloaded while the scheduler runs, and `palmchat serve BASE --lora name=PATH` routing requests by model
name, listing them in /v1/models and taking new ones through the admin endpoints."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import httpx
import pytest
import torch
from openai import NotFoundError, OpenAI, PermissionDeniedError

from palmchat import checkpoint
from palmchat.checkpoint.heads import save_reward_model
from palmchat.cli import MergeArgs, merge_main
from palmchat.inference.engine import Engine, SamplingParams
from palmchat.inference.scheduler import Scheduler
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel
from palmchat.model.lora import adapters, add_lora, lora_config, lora_layers, use_adapter
from palmchat.model.transformer import Transformer
from palmchat.serve.adapters import AdapterRefused, read_adapter
from tests.server_fixtures import Server, build_policy, palmchat, world_tokenizer
from tests.test_auth import create_key

VOCAB = 97
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42, 7], [int(t) for t in torch.arange(17) * 5 % VOCAB]]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def make_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=VOCAB, init_std=0.3)).eval()


def add_random_adapter(model: torch.nn.Module, name: str, rank: int, seed: int) -> None:
    """A trained-looking adapter: B is not zero (a fresh one changes nothing)."""
    add_lora(model, name, rank=rank, alpha=2 * rank)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora_B:
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=generator) * 0.5)
    model.requires_grad_(False)


class Collector:
    """Submits requests to a running scheduler and waits for them (on_event runs on the scheduler's thread)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.lock, self.pending, self.done = scheduler, threading.Lock(), 0, threading.Event()

    def submit(self, prompt, params, adapter=None):
        with self.lock:
            self.pending += 1
            self.done.clear()

        def on_event(event):
            if event.finished:
                with self.lock:
                    self.pending -= 1
                    if self.pending == 0:
                        self.done.set()

        return self.scheduler.submit(prompt, params, on_event, adapter=adapter)

    def wait(self):
        assert self.done.wait(60), "requests did not finish"


def alone(model, prompt, n, adapter):
    with use_adapter(model, adapter):
        return Engine(model).generate([prompt], greedy(n))[0].tokens


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-copy"])
def test_two_adapters_in_one_batch_equal_each_alone(dtype):
    model = make_model()
    add_random_adapter(model, "a", rank=4, seed=1)
    add_random_adapter(model, "b", rank=8, seed=2)  # another rank: the batch pads it, which must add nothing
    rows = [(PROMPTS[0], "a"), (PROMPTS[0], "b"), (PROMPTS[0], None), (PROMPTS[1], "a")]
    scheduler = Scheduler(model, dtype=dtype).start()
    try:
        c = Collector(scheduler)
        batched = [c.submit(p, greedy(10), adapter=a) for p, a in rows]
        c.wait()
        separately = []
        for p, a in rows:  # each alone in the batch
            separately.append(c.submit(p, greedy(10), adapter=a))
            c.wait()
    finally:
        scheduler.stop()
    assert scheduler.counters["decode_rows_total"] > scheduler.counters["decode_steps_total"]  # rows did share steps
    assert [r.tokens for r in batched] == [r.tokens for r in separately]
    if dtype is None:  # the plain engine with one adapter for the whole batch
        assert [r.tokens for r in batched] == [alone(model, p, 10, a) for p, a in rows]
    assert len({tuple(r.tokens) for r in batched[:3]}) == 3  # the adapters really change the replies


def save_adapter_checkpoint(base: Path, out: Path, name: str, rank: int, seed: int) -> Path:
    model, _, _ = checkpoint.load_model(base)
    add_random_adapter(model, name, rank, seed)
    config = {"model": model.config.to_dict(), "stage": "sft", "base": str(base), "lora": lora_config(model, name)}
    return checkpoint.save_checkpoint(out, 0, model, config, base / checkpoint.TOKENIZER_FILE, adapter=name)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny base (weights whose greedy reply depends on the prompt), adapters a and b on it, and one on another
    base of the same shape."""
    root = tmp_path_factory.mktemp("multi_lora")
    tokenizer = world_tokenizer()
    tok_path = Path(tokenizer.save(root / "tokenizer.json"))
    base, _ = build_policy(root / "base", tokenizer, tok_path, steer=False)
    base = checkpoint.resolve(base)
    a = save_adapter_checkpoint(base, root / "lora-a", "a", rank=4, seed=1)
    b = save_adapter_checkpoint(base, root / "lora-b", "b", rank=8, seed=2)
    other, _ = build_policy(root / "other", tokenizer, tok_path, steer=True)  # the same shape, other weights
    foreign = save_adapter_checkpoint(checkpoint.resolve(other), root / "lora-foreign", "f", rank=4, seed=3)
    return {"base": base, "a": a, "b": b, "foreign": foreign, "tokenizer": tokenizer, "root": root}


def test_batched_adapters_equal_the_merged_models(checkpoints):
    """Rows of two adapters (and the base) in one batch give the greedy tokens of `palmchat merge-lora`'s models."""
    base, _, _ = checkpoint.load_model(checkpoints["base"])
    base.eval()
    tokenizer = checkpoints["tokenizer"]
    for name in ("a", "b"):
        tensors, lora = read_adapter(str(checkpoints[name]), name, str(checkpoints["base"]), base.config, tokenizer)
        from palmchat.serve.adapters import add_to_model

        add_to_model(base, name, tensors, lora)
    prompts = [tokenizer.chat_format.render_prompt([{"role": "user", "content": text}])
               for text in ("Where does Ada live?", "What is 3 + 4?")]
    rows = [(prompts[0], "a"), (prompts[0], "b"), (prompts[1], "a"), (prompts[1], None)]
    scheduler = Scheduler(base).start()
    try:
        c = Collector(scheduler)
        batched = [c.submit(p, greedy(12), adapter=a) for p, a in rows]
        c.wait()
    finally:
        scheduler.stop()
    merged = {}
    for name in ("a", "b"):
        out = checkpoints["root"] / f"merged-{name}"
        merge_main(MergeArgs(checkpoint=str(checkpoints[name]), out=str(out)))
        merged[name] = checkpoint.load_model(out)[0].eval()
    merged[None] = checkpoint.load_model(checkpoints["base"])[0].eval()
    for (prompt, name), request in zip(rows, batched):
        assert request.tokens == Engine(merged[name]).generate([prompt], greedy(12))[0].tokens, name
    assert batched[0].tokens != batched[1].tokens


def test_an_adapter_of_another_base_is_refused_by_name(checkpoints):
    base, _, _ = checkpoint.load_model(checkpoints["base"])
    with pytest.raises(AdapterRefused, match=r"adapter 'f'.*trained on the base .*other.* not those of the served"):
        read_adapter(str(checkpoints["foreign"]), "f", str(checkpoints["base"]), base.config, checkpoints["tokenizer"])
    other_tokenizer = world_tokenizer(reverse=True)
    with pytest.raises(AdapterRefused, match=r"adapter 'a'.*another tokenizer"):
        read_adapter(str(checkpoints["a"]), "a", str(checkpoints["base"]), base.config, other_tokenizer)
    with pytest.raises(AdapterRefused, match=r"adapter 'x'.*full weights, not a LoRA adapter"):
        read_adapter(str(checkpoints["base"]), "x", str(checkpoints["base"]), base.config, checkpoints["tokenizer"])
    result = palmchat("serve", str(checkpoints["base"]), "--no-auth", "--db", str(checkpoints["root"] / "refused.db"),
                      "--lora", f"f={checkpoints['foreign']}")
    assert result.returncode != 0 and "adapter 'f'" in result.stderr and "Traceback" not in result.stderr


def test_a_peft_adapter_folder_serves_the_same_tokens_as_the_palmchat_adapter(tmp_path):
    """A Llama-style base: palmchat's adapter exported as a PEFT folder (q/k/v and gate/up split as Hugging Face
    stores them) and read back by the server's loader gives the same replies in one batch with the original."""
    from palmchat.checkpoint.hf import hf_family_for
    from palmchat.checkpoint.peft import export_peft
    from palmchat.model.lora import adapter_state_dict
    from palmchat.serve.adapters import add_to_model

    tokenizer = world_tokenizer()
    tok_path = Path(tokenizer.save(tmp_path / "tokenizer.json"))
    config = preset("tiny", vocab_size=tokenizer.vocab_size, block="sequential", norm="rmsnorm", n_kv_heads=2,
                    tie_embeddings=False, init_std=0.3)
    torch.manual_seed(0)
    base_model = Transformer(config).eval()
    base = checkpoint.save_checkpoint(tmp_path / "llama", 0, base_model, {"model": config.to_dict()}, tok_path)
    add_random_adapter(base_model, "native", rank=4, seed=5)
    peft = export_peft(adapter_state_dict(base_model, "native"), lora_config(base_model, "native"), config,
                       hf_family_for(config), tmp_path / "peft", base_model=str(base))
    tensors, lora = read_adapter(str(peft), "p", str(base), config, tokenizer)
    add_to_model(base_model, "p", tensors, lora)
    prompts = [tokenizer.chat_format.render_prompt([{"role": "user", "content": "Who is Ada?"}]), PROMPTS[3]]
    rows = [(prompts[0], "native"), (prompts[0], "p"), (prompts[1], "p"), (prompts[1], None)]
    scheduler = Scheduler(base_model).start()
    try:
        c = Collector(scheduler)
        requests = [c.submit(p, greedy(10), adapter=a) for p, a in rows]
        c.wait()
    finally:
        scheduler.stop()
    out = [r.tokens for r in requests]
    assert out[0] == out[1] and out[2] != out[3]
    assert out[2] == alone(base_model, prompts[1], 10, "native")
    other = checkpoint.save_checkpoint(tmp_path / "llama-other", 0, Transformer(config), {"model": config.to_dict()},
                                       tok_path)
    with pytest.raises(AdapterRefused, match=r"adapter 'p': its adapter_config.json names the base .*llama/"):
        read_adapter(str(peft), "p", str(other), config, tokenizer)


def test_unloading_waits_for_the_requests_using_it_and_loading_joins_a_running_batch():
    model = make_model()
    add_random_adapter(model, "a", rank=4, seed=1)
    spare = make_model()
    add_random_adapter(spare, "b", rank=4, seed=2)  # its tensors are loaded into the served model at run time
    b_tensors = {k: v for k, v in spare.state_dict().items() if ".lora_" in k}
    expected_a = alone(model, PROMPTS[3], 60, "a")
    scheduler = Scheduler(model).start()
    try:
        c = Collector(scheduler)
        long_a = c.submit(PROMPTS[3], greedy(60), adapter="a")
        base_row = c.submit(PROMPTS[1], greedy(60))
        from palmchat.model.lora import add_adapter_weights

        tensors = {k.replace(".lora_A.b", ".lora_A").replace(".lora_B.b", ".lora_B"): v for k, v in b_tensors.items()}
        scheduler.between_steps(lambda: add_adapter_weights(model, "b", tensors, lora_config(spare, "b"))).result(30)
        with_b = c.submit(PROMPTS[0], greedy(8), adapter="b")
        unloaded = scheduler.unload_adapter("a")
        with pytest.raises(ValueError, match="unknown adapter 'a'"):
            scheduler.submit(PROMPTS[0], greedy(2), lambda ev: None, adapter="a")
        assert not unloaded.done() or long_a.finish_reason is not None
        unloaded.result(60)
        assert long_a.finish_reason == "length" and long_a.tokens == expected_a  # it finished with its adapter
        c.wait()
    finally:
        scheduler.stop()
    assert adapters(model) == ["b"]
    assert all(entry.key[0] != "a" for entry in scheduler.prefix_cache.entries.values())
    assert base_row.finish_reason == "length"
    with use_adapter(spare, "b"):
        assert with_b.tokens == Engine(spare).generate([PROMPTS[0]], greedy(8))[0].tokens


# ---- the server ------------------------------------------------------------------------------------------


def test_server_routes_adapters_lists_them_and_loads_and_unloads_at_run_time(checkpoints, tmp_path):
    base = checkpoints["base"]
    db = tmp_path / "keys.db"
    admin_key, user_key = create_key(db, "--name", "ops", "--admin"), create_key(db, "--name", "ada")
    config = checkpoint.load_model(base)[0].config
    reward = save_reward_model(RewardModel(Transformer(config), checkpoints["tokenizer"].chat_format.eot_id),
                               tmp_path / "rm", 0, {"stage": "reward"}, base / checkpoint.TOKENIZER_FILE).parent
    server = Server(base, db, "--model-name", "tiny", "--moderation", "none", "--lora", f"a={checkpoints['a']}",
                    "--reward-model", str(reward), log=tmp_path / "server.log").start()
    try:
        admin = OpenAI(base_url=server.url + "/v1", api_key=admin_key)
        user = OpenAI(base_url=server.url + "/v1", api_key=user_key)

        def reply(client, model, text="Where does Ada live?"):
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                 max_tokens=12, temperature=0)
            assert out.model == model
            return out.choices[0].message.content

        cards = {m.id: m for m in user.models.list().data}
        assert set(cards) == {"tiny", "a", "tiny:best-of-4", "tiny:best-of-8", "a:best-of-4", "a:best-of-8"}
        assert cards["a"].model_extra["parent"] == "tiny" and cards["tiny"].model_extra["parent"] is None
        assert cards["a:best-of-4"].model_extra["parent"] == "a"
        assert {c.model_extra["max_model_len"] for c in cards.values()} == {2048}
        assert user.models.retrieve("tiny:a").model_extra["parent"] == "tiny"

        with pytest.raises(PermissionDeniedError):  # a user key may not load adapters
            user.post("/load_lora_adapter", body={"lora_name": "b", "lora_path": str(checkpoints["b"])},
                      cast_to=object)
        loaded = admin.post("/load_lora_adapter", body={"lora_name": "b", "lora_path": str(checkpoints["b"])},
                            cast_to=object)
        assert loaded["status"] == "loaded" and loaded["parent"] == "tiny"
        assert {"tiny", "a", "b", "b:best-of-4"} <= {m.id for m in user.models.list().data}
        refused = httpx.post(server.url + "/v1/load_lora_adapter", headers={"authorization": f"Bearer {admin_key}"},
                             json={"lora_name": "f", "lora_path": str(checkpoints["foreign"])})
        assert refused.status_code == 400 and "adapter 'f'" in refused.json()["error"]["message"]
        b_path = str(checkpoints["b"])
        for body, param, says in [({"lora_name": "x:y", "lora_path": b_path}, "lora_name", "'x:y'"),
                                  ({"lora_name": "best-of-2", "lora_path": b_path}, "lora_name", "suffix"),
                                  ({"lora_name": "a", "lora_path": b_path}, "lora_name", "already"),
                                  ({"lora_name": "c", "lora_path": str(tmp_path / "none")}, "lora_path", "not found")]:
            bad = httpx.post(server.url + "/v1/load_lora_adapter", json=body,
                             headers={"authorization": f"Bearer {admin_key}"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
            assert says in bad.json()["error"]["message"]

        # concurrently (one batch): the base, both adapters and the base's id with the adapter's name
        models = ["tiny", "a", "b", "tiny:a"]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda m: reply(user, m), models))
        assert together == [reply(user, m) for m in models]  # one at a time
        assert together[1] == together[3] and len({together[0], together[1], together[2]}) == 3
        assert reply(user, "a:best-of-2") == together[1]  # greedy candidates of adapter a, the reward model's pick
        # per model: "a" and "tiny:a" are a's requests (twice each, and best-of-2's two candidates)
        latency = httpx.get(server.url + "/metrics").text
        assert 'palmchat_e2e_request_latency_seconds_count{model_name="a"} 6.0' in latency
        assert 'palmchat_e2e_request_latency_seconds_count{model_name="b"} 2.0' in latency
        assert reply(user, "tiny:a:best-of-2") == together[1]
        response = user.responses.create(model="b", input="Where does Ada live?", max_output_tokens=4)
        assert response.model == "b" and response.output_text

        with pytest.raises(NotFoundError):
            reply(user, "nope")
        with pytest.raises(NotFoundError):
            reply(user, "tiny:nope")
        with pytest.raises(PermissionDeniedError):
            user.post("/unload_lora_adapter", body={"lora_name": "b"}, cast_to=object)
        assert admin.post("/unload_lora_adapter", body={"lora_name": "b"}, cast_to=object)["status"] == "unloaded"
        with pytest.raises(NotFoundError):
            reply(user, "b")
        with pytest.raises(NotFoundError):
            admin.post("/unload_lora_adapter", body={"lora_name": "b"}, cast_to=object)
        assert "b" not in {m.id for m in user.models.list().data}
        assert reply(user, "a") == together[1]  # the others are untouched
    finally:
        server.stop()
