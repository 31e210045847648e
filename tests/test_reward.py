"""The reward model's ceilings: how often two simulated labellers agree on held-out pairs, and how well the world's
noise-free verifier orders the held-out labels."""

import itertools
import json

import pytest
import torch

from palmchat.data.chat import Ranking, parse_ranking
from palmchat.eval.reward import labeller_agreement, ranking_ceilings, world_knows
from palmchat.world.synthetic import DEFAULT_NOISE, Verdict, World


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def rankings(world):
    return [parse_ranking(r) for r in world.ranking_examples(200, split="heldout")]


class ScriptedWorld:
    """Labellers whose rankings are given in advance, in the order World.rank would be called."""

    def __init__(self, orders):
        self.orders = list(orders)

    def rank(self, prompt, responses, rng, noise):
        return self.orders.pop(0)

    def verify(self, prompt, response):
        return Verdict("arithmetic", 1.0, 1.0, 1.0)


def ranking(k: int) -> Ranking:
    return Ranking([{"role": "user", "content": "What is 2 + 3?"}], [f"r{i}" for i in range(k)])


def test_labeller_agreement_is_a_hand_count():
    # ranking 1, K=3: labeller A orders 0 > 1 > 2, B orders 1 > 0 > 2: pairs (0,1) disagree, (0,2) (1,2) agree
    # ranking 2, K=2: A says 0 > 1, B says 1 > 0: no agreement; the mean over rankings is (2/3 + 0) / 2
    scripted = ScriptedWorld([[0, 1, 2], [1, 0, 2], [0, 1], [1, 0]])
    assert labeller_agreement(scripted, [ranking(3), ranking(2)], noise=1.0, labellers=2) == pytest.approx(1 / 3)
    # three labellers: every pair of them counts; A = B = [0, 1], C = [1, 0] -> 1 of 3 labeller pairs agree
    scripted = ScriptedWorld([[0, 1], [0, 1], [1, 0]])
    assert labeller_agreement(scripted, [ranking(2)], noise=1.0, labellers=3) == pytest.approx(1 / 3)


def test_labellers_without_noise_always_agree_and_with_huge_noise_flip_coins(world, rankings):
    assert labeller_agreement(world, rankings, noise=0.0) == 1.0
    assert labeller_agreement(world, rankings, noise=1e6) == pytest.approx(0.5, abs=0.03)
    default = labeller_agreement(world, rankings, noise=DEFAULT_NOISE)
    assert 0.75 < default < 0.95  # the bundled world's labellers: most pairs differ by more than the noise
    assert labeller_agreement(world, rankings, noise=DEFAULT_NOISE, seed=1) == pytest.approx(default, abs=0.02)


def test_ceilings_of_the_bundled_rankings(world, rankings):
    ceilings = ranking_ceilings(world, rankings, DEFAULT_NOISE)
    # the verifier is scored against one noisy label per pair, two labellers against two: only one side is noisy
    assert ceilings["labeller_agreement"] < ceilings["verifier_accuracy"] < 1.0
    # noise-free labels: the verifier is right on every pair it separates and half right on its ties
    records = world.ranking_examples(200, split="heldout", noise=0.0)
    ties = [sum(a == b for a, b in itertools.combinations(r["scores"], 2)) / 6 for r in records]
    assert ranking_ceilings(world, [parse_ranking(r) for r in records], 0.0) == {
        "labeller_agreement": 1.0, "verifier_accuracy": pytest.approx(1 - sum(ties) / len(ties) / 2, abs=1e-3)}


def test_no_ceiling_for_prompts_the_world_does_not_know(world, rankings):
    unknown = Ranking([{"role": "user", "content": "Write me a poem about the sea."}], ["a", "b"])
    assert not world_knows(world, [*rankings[:5], unknown])
    assert ranking_ceilings(world, [*rankings[:5], unknown], DEFAULT_NOISE) is None
    # a system prompt does not change the task
    system = Ranking([{"role": "system", "content": "Be brief."}, *rankings[0].prompt_messages],
                     rankings[0].responses)
    assert world_knows(world, [system])


# ---------------------------------------------------------------------------------------------------------------
# Training: the margin, gradient accumulation, and a killed run resumed


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, world):
    """A tiny random language-model checkpoint with a tokenizer, and a rankings file: what `palmchat reward`
    starts from."""
    from palmchat import checkpoint
    from palmchat.model.config import preset
    from palmchat.model.transformer import Transformer
    from palmchat.tokenizer.bpe import train_tokenizer
    from palmchat.utils.jsonl import write_jsonl

    root = tmp_path_factory.mktemp("reward")
    tokenizer = train_tokenizer(world.pretraining_documents(200), vocab_size=320)
    tok_path = tokenizer.save(root / "tokenizer.json")
    config = preset("tiny", vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    base = checkpoint.save_checkpoint(root / "base", 0, Transformer(config), {"model": config.to_dict()}, tok_path)
    data = write_jsonl(root / "rankings.jsonl", world.ranking_examples(40))
    return base.parent, data


def reward_args(tiny_base, out, **kw):
    from palmchat.train.reward import RewardArgs

    base, data = tiny_base
    return RewardArgs(base=str(base), out=str(out), dtype="fp32", lr=3e-3, warmup_steps=2,
                      **{"data": [str(data)], "batch_size": 4, "epochs": 2.0, **kw})


def trained_weights(path):
    from palmchat.checkpoint.heads import load_reward_model

    model, config = load_reward_model(path)
    return model.state_dict(), config


def test_margin_is_a_shift_per_place():
    from palmchat.losses import ranking_loss
    from palmchat.train.reward import margin_rewards

    rewards = torch.tensor([[2.0, 1.5, 0.2]])
    loss, _ = ranking_loss(margin_rewards(rewards, 0.5))
    pairs = [(2.0 - 1.5 - 0.5), (2.0 - 0.2 - 1.0), (1.5 - 0.2 - 0.5)]  # r_i - r_j - margin * (j - i)
    want = -torch.nn.functional.logsigmoid(torch.tensor(pairs)).mean()
    torch.testing.assert_close(loss, want)


def test_gradient_accumulation_takes_the_same_steps_in_smaller_pieces(tiny_base, tmp_path):
    from palmchat.train.reward import main as reward

    whole, _ = trained_weights(reward(reward_args(tiny_base, tmp_path / "whole", batch_size=8, normalize="none")))
    pieces, _ = trained_weights(reward(reward_args(tiny_base, tmp_path / "pieces", batch_size=2, grad_accum=4,
                                                   normalize="none")))
    other, _ = trained_weights(reward(reward_args(tiny_base, tmp_path / "other", batch_size=2, normalize="none")))
    for name in whole.keys() - {"head.bias"}:  # the loss sees only differences: the bias's gradient is 0 up to
        # rounding, which Adam turns into steps of +-lr either way
        # (the LM loss normalised per micro-batch instead of per step: differences up to 1.3e-2)
        torch.testing.assert_close(pieces[name], whole[name], atol=3e-4, rtol=1e-4)
    assert any(not torch.allclose(other[name], whole[name], atol=1e-3) for name in whole)  # batch 2 differs


def test_a_killed_run_resumed_equals_the_uninterrupted_run(tiny_base, tmp_path, monkeypatch):
    import palmchat.train.reward as reward_stage

    uninterrupted, config = trained_weights(reward_stage.main(reward_args(tiny_base, tmp_path / "a", save_every=3)))
    steps = config["step"]
    assert steps >= 8

    real_step, calls = reward_stage.optimizer_step, []

    def killed_at_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt  # killed while computing step 8: the last state saved is step 6's
        return real_step(*args, **kwargs)

    monkeypatch.setattr(reward_stage, "optimizer_step", killed_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        reward_stage.main(reward_args(tiny_base, tmp_path / "b", save_every=3))
    monkeypatch.setattr(reward_stage, "optimizer_step", real_step)
    assert (tmp_path / "b" / "resume" / "latest").read_text().strip() == "step-000006"
    with pytest.raises(ValueError, match="batch_size"):  # another batch size would take other batches
        reward_stage.main(reward_args(tiny_base, tmp_path / "b", batch_size=2, resume=True))
    resumed, resumed_config = trained_weights(reward_stage.main(reward_args(tiny_base, tmp_path / "b", save_every=3,
                                                                            resume=True)))
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    assert resumed_config["eval"] == config["eval"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))  # read as one run


def test_without_data_the_bundled_rankings_train_and_the_ceiling_is_printed(tiny_base, tmp_path, capsys):
    from palmchat import checkpoint
    from palmchat.train.reward import main as reward

    out = reward(reward_args(tiny_base, tmp_path / "bundled", data=[], bundled_rankings=24, epochs=1.0))
    config = checkpoint.read_config(out)
    assert config["train"]["bundled_rankings"] == 24
    after = config["eval"]["after"]
    assert 0.5 < after["labeller_agreement"] <= 1 and 0.5 < after["verifier_accuracy"] <= 1  # 2 held-out rankings
    printed = capsys.readouterr().out
    assert "22 train / 2 held-out rankings" in printed  # 24 drawn from the world, a tenth held out
    assert f"two simulated labellers agree on {after['labeller_agreement']:.3f}" in printed
