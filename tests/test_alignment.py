"""Alignment stages end to end at toy size, plus the RL traps: log-probs that match between rollout and
training, rewards read at each response's own end-of-turn token, LoRA-only saves, clear data errors."""

import json

import pytest
import torch

from palmchat import checkpoint
from palmchat.checkpoint.heads import load_reward_model
from palmchat.cli import main as cli
from palmchat.inference.engine import Engine
from palmchat.train.dpo import DPOArgs
from palmchat.train.dpo import main as dpo
from palmchat.train.grpo import GRPOArgs
from palmchat.train.grpo import main as grpo
from palmchat.train.ppo import PPOArgs
from palmchat.train.ppo import main as ppo
from palmchat.train.pretrain import PretrainArgs
from palmchat.train.pretrain import main as pretrain
from palmchat.train.reward import RewardArgs
from palmchat.train.reward import main as reward
from palmchat.train.rollout import reward_model_scorer, rollout_logprobs, sample
from palmchat.train.sft import SFTArgs
from palmchat.train.sft import main as sft
from palmchat.world.synthetic import write_bundle

SIZES = dict(pretrain=400, sft=200, rankings=120, pairs=60, prompts_train=64, prompts_heldout=32, moderation=20)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    data = root / "data"
    write_bundle(data, seed=0, sizes=SIZES)
    pt = pretrain(PretrainArgs(out=str(root / "pt"), data=[str(data / "pretrain.txt")], preset="tiny", vocab_size=320,
                               seq_len=128, batch_size=8, max_steps=30, eval_every=15, save_every=30, dtype="fp32"))
    sft_ckpt = sft(SFTArgs(base=str(pt), data=[str(data / "sft.jsonl")], out=str(root / "sft"), epochs=1, batch_size=16,
                           lr=1e-3, dtype="fp32"))
    rm = reward(RewardArgs(base=str(sft_ckpt), data=[str(data / "rankings.jsonl")], out=str(root / "rm"), epochs=1,
                           batch_size=16, dtype="fp32"))
    return dict(root=root, data=data, pt=pt, sft=sft_ckpt, rm=rm)


def test_sft_loss_falls_and_only_assistant_tokens_count(pipeline):
    rows = [json.loads(line) for line in (pipeline["root"] / "sft" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]
    # the trainer's loss is the mean next-token loss over the assistant replies and their eot, nothing else
    from palmchat.data.chat import encode_sft
    from palmchat.train.sft import batch_loss

    model, _, ckpt = checkpoint.load_model(pipeline["sft"])
    tokenizer = checkpoint.load_tokenizer(ckpt)
    chat = tokenizer.chat_format
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                    {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 2 + 4?"},
                    {"role": "assistant", "content": "6."}]
    example = encode_sft(tokenizer, conversation, 128)
    replies = [tokenizer.encode("5.") + [chat.eot_id], tokenizer.encode("6.") + [chat.eot_id]]
    assert [t for t in example.targets if t != -100] == replies[0] + replies[1]
    with torch.no_grad():
        loss = batch_loss(model.eval(), [example], chat.pad_id, "cpu", None)
        logp = torch.log_softmax(model(torch.tensor([example.ids]))[0].float(), -1)
    counted = [(t, y) for t, y in enumerate(example.targets) if y != -100]
    by_hand = -sum(logp[t, y] for t, y in counted) / len(counted)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-5)


def test_engine_logprobs_match_training_forward(pipeline):
    """The trainer's own path at temperature 0.7 in fp32: the log-probs PPO recomputes for its ratio, KL and
    advantages (rollout_logprobs on the policy PPO trains) equal those the engine sampled with, for the sampled
    multi-turn conversations too; the run logs the largest gap."""
    model, _, ckpt = checkpoint.load_model(pipeline["sft"])
    tokenizer = checkpoint.load_tokenizer(ckpt)
    model.eval()
    prompts = ["What is 2 + 3?", [{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": "Sort these numbers: 5, 2, 9."}],
               "Reverse the word 'lamp'."]
    rollout = sample(Engine(model), tokenizer, prompts, max_new_tokens=12, seed=1, temperature=0.7)
    assert len(set(rollout.response_lens.tolist())) > 1 or not rollout.finished.all()
    with torch.no_grad():
        recomputed = rollout_logprobs(model, rollout)
    mask = rollout.mask
    assert (recomputed[mask] - rollout.sample_logprobs[mask]).abs().max() < 1e-5
    assert (recomputed[~mask] == 0).all()
    root = pipeline["root"]
    ppo(PPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / "ppo_t07"), iterations=1,
                rollout_batch=8, minibatch=8, ppo_epochs=1, max_new_tokens=12, dtype="fp32", temperature=0.7,
                prompts=[str(pipeline["data"] / "prompts_train.jsonl")]))
    row = json.loads((root / "ppo_t07" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["logprob_mismatch"] < 1e-5 and row["kl"] == pytest.approx(0.0, abs=1e-6)


def test_reward_is_read_at_each_responses_own_end_of_turn(pipeline):
    rm, _ = load_reward_model(pipeline["rm"])
    rm.eval()
    model, _, ckpt = checkpoint.load_model(pipeline["sft"])
    tokenizer = checkpoint.load_tokenizer(ckpt)
    rollout = sample(Engine(model.eval()), tokenizer, ["What is 2 + 3?", "How old is Zorbo?", "Hi"] * 2, 16, seed=3)
    batch_scores = reward_model_scorer(rm, tokenizer)(rollout)
    for row in range(len(rollout.prompts)):
        n = int(rollout.prompt_lens[row] + rollout.response_lens[row])
        seq = rollout.ids[row, :n].tolist() + ([] if rollout.finished[row] else [tokenizer.chat_format.eot_id])
        alone = rm(torch.tensor([seq]), torch.tensor([len(seq) - 1]), response_start=rollout.prompt_lens[row:row + 1])
        assert abs(alone.item() - batch_scores[row].item()) < 1e-4


def test_reward_model_beats_chance_on_held_out_rankings(pipeline):
    """On 200 rankings of held-out prompts, a trained reward model orders the labellers' pairs better than chance
    and better than its own untrained start (the same head initialisation on the same backbone): a sign flip in the
    loss, a reward read at the wrong token or a head that does not train all fail this. The pipeline's own models
    are too raw for it (after 30 pretraining steps a trained reward model does no better than a random head), so
    this one starts from 150 steps of pretraining (and SFT). Both readouts: the end-of-turn head alone, and the
    default that adds the reply's logit gap, which orders pairs above chance before any training (what the
    fine-tuned model knows) and more after."""
    from palmchat.data.chat import parse_ranking
    from palmchat.eval.reward import ranking_metrics, score_rankings
    from palmchat.model.heads import RewardModel
    from palmchat.world.synthetic import World

    root, data = pipeline["root"], pipeline["data"]
    pt = pretrain(PretrainArgs(out=str(root / "rm_pt"), data=[str(data / "pretrain.txt")], preset="tiny",
                               vocab_size=320, seq_len=128, batch_size=8, max_steps=150, eval_every=150,
                               save_every=150, dtype="fp32"))
    sft_ckpt = sft(SFTArgs(base=str(pt), data=[str(data / "sft.jsonl")], out=str(root / "rm_sft"), epochs=1,
                           batch_size=16, lr=1e-3, dtype="fp32"))
    tokenizer = checkpoint.load_tokenizer(sft_ckpt)
    rankings = [parse_ranking(r) for r in World(seed=0).ranking_examples(200, split="heldout")]
    accuracy = {}
    for readout, lm_coef in (("eot", 0.0), ("eot+gap", 0.1)):
        rm = reward(RewardArgs(base=str(sft_ckpt), data=[str(data / "rankings.jsonl")], out=str(root / readout),
                               epochs=2, batch_size=16, lr=1e-3, warmup_steps=2, dtype="fp32", readout=readout,
                               lm_coef=lm_coef))
        config = checkpoint.read_config(rm)
        after = config["eval"]["after"]
        assert config["readout"] == readout and after["pairwise_accuracy"] < after["labeller_agreement"] < 1
        trained, _ = load_reward_model(rm)
        torch.manual_seed(0)  # as the reward stage does before it loads its base: its head starts from this draw
        backbone, _, _ = checkpoint.load_model(sft_ckpt)
        untrained = RewardModel(backbone, eot_id=tokenizer.chat_format.eot_id, readout=readout)
        with torch.no_grad():
            for name, model in (("trained", trained), ("untrained", untrained)):
                metrics = ranking_metrics(*score_rankings(model.eval(), tokenizer, rankings, 128, 32, "cpu", None))
                accuracy[readout, name] = metrics["pairwise_accuracy"]
    assert accuracy["eot", "trained"] > 0.54, accuracy  # 0.565 measured; 0.45 with the loss's sign flipped
    assert accuracy["eot", "trained"] > accuracy["eot", "untrained"] + 0.04, accuracy  # 0.526 untrained
    # 0.552 untrained (with the gap's sign flipped: 0.48), 0.5675 trained
    assert accuracy["eot+gap", "untrained"] > 0.54, accuracy
    assert accuracy["eot+gap", "trained"] > accuracy["eot+gap", "untrained"], accuracy


def test_dpo_with_lora_saves_only_the_adapter_and_merges(pipeline):
    out = dpo(DPOArgs(base=str(pipeline["sft"]), data=[str(pipeline["data"] / "pairs.jsonl")],
                      out=str(pipeline["root"] / "dpo"), epochs=1, batch_size=8, lora_rank=4, dtype="fp32", lr=1e-3))
    assert (out / "adapter.safetensors").exists() and not (out / "model.safetensors").exists()
    assert checkpoint.read_config(out)["method"] == "dpo"  # plain DPO by default, not RPO
    merged, config, _ = checkpoint.load_model(out)
    base, _, _ = checkpoint.load_model(pipeline["sft"])
    x = torch.randint(0, 320, (1, 20))
    assert not torch.allclose(merged(x), base(x))  # the adapter learned something
    from palmchat.model.lora import add_lora, load_adapter

    add_lora(base, "policy", rank=4, alpha=16)
    load_adapter(out, base, "policy")
    torch.testing.assert_close(merged(x), base(x), atol=1e-5, rtol=1e-4)  # merged == unmerged


def test_ppo_and_grpo_run_and_save(pipeline):
    root = pipeline["root"]
    out = ppo(PPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / "ppo"), iterations=2,
                      rollout_batch=8, minibatch=4, max_new_tokens=12, dtype="fp32", kl_target=1.0,
                      prompts=[str(pipeline["data"] / "prompts_train.jsonl")]))
    rows = [json.loads(line) for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["logprob_mismatch"] < 1e-4  # fp32: sampling and training log-probs agree
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adaptive control moved
    assert all(r["tis_weight"] == 1.0 for r in rows)  # fp32 rollouts: no importance correction
    checkpoint.load_model(out)
    # bf16 rollouts come from the engine's packed inference copy: it must follow every update (fused AdamW
    # does not bump the version counters the engine checks), else PPO keeps sampling from the start policy.
    # Its numerics differ from the training forward's: TIS weights correct that, and are logged
    ppo(PPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / "ppo_bf16"), iterations=3,
                rollout_batch=8, minibatch=4, max_new_tokens=12, dtype="bf16", lr=3e-3))
    rows = [json.loads(line) for line in (root / "ppo_bf16" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["logprob_mismatch"] for r in rows) < 0.25  # a stale copy: > 1 here
    assert all(0 < r["tis_weight"] <= 2.0 and r["tis_weight"] != 1.0 for r in rows)
    out = ppo(PPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / "ppo_lora"), iterations=1,
                      rollout_batch=8, minibatch=8, max_new_tokens=12, lora_rank=4, gradient_checkpointing=True))
    assert (out / "adapter.safetensors").exists()
    for lora_rank in (0, 4):  # the separate critic (a backbone of its own, or a critic adapter on the shared base)
        out = ppo(PPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / f"ppo_sep{lora_rank}"),
                          iterations=2, rollout_batch=8, minibatch=4, max_new_tokens=12, dtype="fp32",
                          critic="separate", lora_rank=lora_rank, save_every=1))
        rows = [json.loads(line) for line in (root / f"ppo_sep{lora_rank}" / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["logprob_mismatch"] < 1e-4 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
        assert all(r["value_loss"] > 0 for r in rows)
        checkpoint.load_model(out)
        # the critic and its optimizer are part of the resumable state
        ppo(PPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / f"ppo_sep{lora_rank}"),
                    iterations=3, rollout_batch=8, minibatch=4, max_new_tokens=12, dtype="fp32", critic="separate",
                    lora_rank=lora_rank, save_every=1, resume=True))
    for loss_type in ("grpo", "dr_grpo"):
        out = grpo(GRPOArgs(base=str(pipeline["sft"]), reward=str(pipeline["rm"]), out=str(root / f"grpo_{loss_type}"),
                            iterations=1, prompts_per_iteration=2, group_size=4, max_new_tokens=12, dtype="bf16",
                            loss_type=loss_type, minibatch=8, grad_accum=2, gradient_checkpointing=True))
        row = json.loads((root / f"grpo_{loss_type}" / "metrics.jsonl").read_text().splitlines()[0])
        assert 0 <= row["zero_variance_frac"] <= 1 and row["tis_weight"] != 1.0 and row["logprob_mismatch"] < 0.25
        checkpoint.load_model(out)


def test_reward_lm_regulariser_is_the_top_responses_own_next_token_loss(pipeline):
    """The reward stage's one chunked forward gives each row's reward as a forward of it alone would, and the
    summed log-prob of each ranking's top response (0 on the others) as the language model's own softmax does."""
    from palmchat.data.chat import load_rankings, ranking_batch
    from palmchat.model.heads import RewardModel
    from palmchat.train.reward import rewards_and_best_logprobs

    backbone, _, ckpt = checkpoint.load_model(pipeline["sft"])
    tokenizer = checkpoint.load_tokenizer(ckpt)
    model = RewardModel(backbone, tokenizer.chat_format.eot_id, readout="eot+gap").eval()
    rankings = load_rankings(pipeline["data"] / "rankings.jsonl")[:3]
    batch = ranking_batch(tokenizer, rankings, 128)
    with torch.no_grad():
        rewards, logps = rewards_and_best_logprobs(model, batch, "cpu")
        for row in range(len(batch["ids"])):  # one row at a time, unpadded
            n, p = int(batch["lengths"][row]), int(batch["prompt_lens"][row])
            ids = batch["ids"][row, :n]
            alone = model(ids[None], torch.tensor([n - 1]), response_start=torch.tensor([p]))
            torch.testing.assert_close(rewards[row:row + 1], alone, rtol=1e-4, atol=1e-5)
            logp = backbone(ids[None, :-1])[0].log_softmax(-1)
            want = sum(logp[t - 1, ids[t]] for t in range(p, n)) if batch["rank"][row] == 0 else torch.tensor(0.)
            torch.testing.assert_close(logps[row], want, rtol=1e-4, atol=1e-4)  # every token, the eot included
        assert (logps[batch["rank"] == 0] < 0).all()


def test_ppo_ptx_learns_the_pretraining_text(pipeline):
    """PPO-ptx: the language-model loss on --ptx-data is part of every minibatch, so it falls."""
    root = pipeline["root"]
    with pytest.raises(ValueError, match="--ptx-data"):
        ppo(PPOArgs(base=str(pipeline["sft"]), out=str(root / "ptx_bad"), ptx_coef=1.0))
    ppo(PPOArgs(base=str(pipeline["sft"]), reward="verifier", out=str(root / "ptx"), iterations=4, rollout_batch=8,
                minibatch=4, max_new_tokens=8, dtype="fp32", lr=3e-3, ptx_coef=5.0, ptx_seq_len=64,
                ptx_data=[str(pipeline["data"] / "pretrain.txt")]))
    rows = [json.loads(line) for line in (root / "ptx" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["ptx_loss"] < rows[0]["ptx_loss"] - 0.05


@pytest.mark.parametrize("stage,record,message", [
    ("sft", {"messages": [{"role": "bot", "content": "hi"}]}, "'bot' is not one of"),
    ("reward", {"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 0]}, "permutation"),
    ("dpo", {"prompt": "hi", "chosen": "a"}, 'missing "rejected"'),
])
def test_malformed_records_name_file_line_and_problem(pipeline, tmp_path, capsys, stage, record, message):
    # a malformed row is skipped and reported in the stage's log (tests/test_stage_formats.py); a file whose every
    # row is malformed is one error line naming the first
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    assert cli([stage, str(pipeline["sft"]), "--data", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "all 2 malformed, the first at " in err and "bad.jsonl:1:" in err and message in err and "\n" not in err
