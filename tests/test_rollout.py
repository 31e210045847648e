"""What PPO, GRPO and RLOO share (palmchat/train/rollout.py): the log-probs the trainer recomputes are those the
engine sampled with at any temperature, a prompt is the whole conversation for the policy, the reward model and the
verifier, and a prompt too long for the context is truncated (never an empty response, never a silently dropped
score)."""

import json

import pytest
import torch

from palmchat import checkpoint
from palmchat.inference.engine import Engine
from palmchat.train import rollout as R
from palmchat.train.pretrain import PretrainArgs
from palmchat.train.pretrain import main as pretrain
from palmchat.train.sft import SFTArgs
from palmchat.train.sft import main as sft
from palmchat.world.synthetic import write_bundle

SIZES = dict(pretrain=300, sft=150, rankings=20, pairs=20, prompts_train=32, prompts_heldout=16, moderation=10)
CONVERSATION = [
    {"role": "system", "content": "You are Zorbo's assistant."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    data = root / "data"
    write_bundle(data, seed=0, sizes=SIZES)
    pt = pretrain(PretrainArgs(out=str(root / "pt"), data=[str(data / "pretrain.txt")], preset="tiny", vocab_size=320,
                               seq_len=128, batch_size=8, max_steps=20, eval_every=20, save_every=20, dtype="fp32"))
    ckpt = sft(SFTArgs(base=str(pt), data=[str(data / "sft.jsonl")], out=str(root / "sft"), epochs=1, batch_size=16,
                       lr=1e-3, dtype="fp32"))
    model, _, folder = checkpoint.load_model(ckpt)
    return dict(root=root, data=data, ckpt=ckpt, model=model.eval(), tokenizer=checkpoint.load_tokenizer(folder))


def test_trainer_logprobs_equal_the_engines_at_temperature_0_7(policy):
    """The engine samples from logits / T; the function PPO, GRPO and RLOO take old, new and reference log-probs
    from must score the same distribution (at T=1 it would be off by far more than rounding)."""
    model, tokenizer = policy["model"], policy["tokenizer"]
    prompts = ["What is 2 + 3?", "Sort these numbers: 5, 2, 9.", "Reverse the word 'lamp'."]
    rollout = R.sample(Engine(model), tokenizer, prompts, max_new_tokens=12, seed=1, temperature=0.7)
    mask = rollout.mask
    with torch.no_grad():
        recomputed = R.rollout_logprobs(model, rollout)
    assert (recomputed[mask] - rollout.sample_logprobs[mask]).abs().max() < 1e-5
    assert (recomputed[~mask] == 0).all()
    rollout.temperature = 1.0  # what the trainer computed before: a different distribution
    with torch.no_grad():
        at_one = R.rollout_logprobs(model, rollout)
    assert (at_one[mask] - rollout.sample_logprobs[mask]).abs().max() > 0.05


class RecordingRewardModel(torch.nn.Module):
    """Scores every sequence 1.0 and keeps the ids it was given."""

    def __init__(self, max_seq_len=128):
        super().__init__()
        self.config = type("Config", (), {"max_seq_len": max_seq_len})()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, ids, index, response_start=None):
        self.seen += [row[: int(i) + 1].tolist() for row, i in zip(ids, index)]
        return torch.ones(len(ids)) + self.w


def test_the_whole_conversation_reaches_the_prompt_ids_the_reward_model_and_the_verifier(policy, tmp_path):
    model, tokenizer = policy["model"], policy["tokenizer"]
    chat = tokenizer.chat_format
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    prompts = R.load_prompt_messages([str(path)], seed=0)
    assert prompts == [CONVERSATION, [{"role": "user", "content": "Hi"}]]

    rollout = R.sample(Engine(model), tokenizer, prompts, max_new_tokens=6, seed=0)
    full = chat.render_prompt(CONVERSATION)
    assert rollout.ids[0, : rollout.prompt_lens[0]].tolist() == full
    assert "Zorbo's assistant" in tokenizer.decode(full) and "What is 2 + 3?" in tokenizer.decode(full)
    assert rollout.prompts[0] == CONVERSATION

    rm = RecordingRewardModel()
    R.reward_model_scorer(rm, tokenizer)(rollout)
    # the conversation's row (the longer: rows are scored in order of length) has its system prompt and earlier turns
    assert len(rm.seen) == 2 and max(rm.seen, key=len)[: len(full)] == full

    class World:
        seen = []

        def verify(self, prompt, response):
            self.seen.append(prompt)
            return type("Verdict", (), {"score": 0.5})()

    world = World()
    assert R.verifier_scorer(world)(rollout).tolist() == [0.5, 0.5]
    assert world.seen == [CONVERSATION, [{"role": "user", "content": "Hi"}]]


def test_a_prompt_that_fills_the_context_is_truncated_after_bos_not_answered_empty(policy):
    model, tokenizer = policy["model"], policy["tokenizer"]
    chat = tokenizer.chat_format
    long_prompt = "What is 2 + 3? " * 60  # more than the tiny model's 128-token context
    full = chat.render_prompt([{"role": "user", "content": long_prompt}])
    assert len(full) > 128
    rollout = R.sample(Engine(model), tokenizer, [long_prompt, "Hi"], max_new_tokens=8, seed=0)
    assert rollout.prompt_lens[0] == 128 - 8 and rollout.prompts_truncated == 1
    kept = rollout.ids[0, : rollout.prompt_lens[0]].tolist()
    assert kept == full[:1] + full[len(full) - (128 - 8 - 1):]  # bos, then the newest tokens
    assert (rollout.response_lens >= 1).all()

    rollout = R.sample(Engine(model), tokenizer, [long_prompt], max_new_tokens=8, seed=0, max_prompt_len=40)
    assert rollout.prompt_lens[0] == 40
    with pytest.raises(ValueError, match="--max-prompt-len 125 \\+ --max-new-tokens 8 = 133 tokens"):
        R.sample(Engine(model), tokenizer, ["Hi"], max_new_tokens=8, seed=0, max_prompt_len=125)


def test_minibatches_split_each_optimizer_step_into_micro_batches():
    steps = list(R.minibatches([5, 3, 1, 0, 2, 4, 6], minibatch=4, grad_accum=2))
    assert [[m.tolist() for m in step] for step in steps] == [[[5, 3], [1, 0]], [[2, 4], [6]]]


def test_zero_variance_groups_by_hand():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.2, 0.2, 0.2])
    assert R.zero_variance_groups(scores, 3).tolist() == [True, False, True]
