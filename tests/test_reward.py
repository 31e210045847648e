"""The reward model's ceilings: how often two simulated labellers agree on held-out pairs, and how well the world's
noise-free verifier orders the held-out labels."""

import itertools

import pytest

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
