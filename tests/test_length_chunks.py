"""palmchat.model.length_chunks: the cheapest split of a batch into chunks of similar length, and the forwards that
use it (reward-model training and scoring, SFT's loss, response log-probs) giving what one padded forward gives."""

import itertools
import random

import pytest
import torch

from palmchat.data.chat import pad_right
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel, rewards_by_length
from palmchat.model.length_chunks import length_chunks, map_length_chunks
from palmchat.model.transformer import Transformer
from palmchat.train.sft import batch_loss

EOT = 5


def split_cost(lengths: list[int], chunks, forward_cost: int) -> int:
    return sum(len(c) * max(lengths[i] for i in c) + forward_cost for c in chunks)


def cheapest_by_brute_force(lengths: list[int], forward_cost: int, max_rows: int | None) -> int:
    """Every split of the rows sorted by length into consecutive chunks."""
    ordered = sorted(lengths)
    n, best = len(ordered), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if max_rows is not None and max(sizes) > max_rows:
            continue
        cost = sum(size * ordered[b - 1] + forward_cost for size, b in zip(sizes, bounds[1:]))
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("forward_cost, max_rows", [(0, None), (8, None), (40, None), (8, 3), (1000, None)])
def test_chunks_are_the_cheapest_split(forward_cost, max_rows):
    rng = random.Random(forward_cost)
    for _ in range(20):
        lengths = [rng.choice((2, 3, 9, 10, 30, 31, 60)) for _ in range(rng.randint(1, 9))]
        chunks = length_chunks(torch.tensor(lengths), max_rows=max_rows, forward_cost=forward_cost)
        rows = sorted(int(i) for c in chunks for i in c)
        assert rows == list(range(len(lengths)))  # every row once
        assert max_rows is None or max(len(c) for c in chunks) <= max_rows
        assert split_cost(lengths, [c.tolist() for c in chunks], forward_cost) == \
            cheapest_by_brute_force(lengths, forward_cost, max_rows)
    if forward_cost == 1000:  # a forward dearer than any padding: one chunk
        assert len(length_chunks(torch.tensor([2, 60, 3]), forward_cost=forward_cost)) == 1


def test_map_keeps_the_row_order_and_cuts_each_chunk_to_its_longest_row():
    lengths = torch.tensor([7, 2, 60, 3, 61, 2])
    ids = torch.arange(6)[:, None].expand(6, 64)
    widths = []

    def first_token_and_width(chunk, rows):
        widths.append((chunk.shape[1], int(lengths[rows].max())))
        return chunk[:, 0]

    assert map_length_chunks(first_token_and_width, ids, lengths, forward_cost=8).tolist() == list(range(6))
    assert len(widths) > 1 and all(width == longest for width, longest in widths)


def rows(n: int, seed: int) -> list[list[int]]:
    """Right-paddable rows of very different lengths, each ending with an end-of-turn token."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 97, (length,), generator=g).tolist() + [EOT] for length in
            torch.randint(2, 120, (n,), generator=g).tolist()]


def test_reward_model_by_length_equals_one_forward_with_its_gradients():
    torch.manual_seed(0)
    model = RewardModel(Transformer(preset("tiny", vocab_size=97)), EOT)
    ids, lengths = pad_right(rows(40, seed=1), 0)
    weights = torch.randn(40)  # a loss that weighs every row differently: a row in the wrong place changes it

    def rewards_and_grads(forward):
        model.zero_grad()
        rewards = forward(ids, lengths - 1)
        (rewards * weights).sum().backward()
        return rewards.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = rewards_and_grads(model)
    chunked, chunked_grads = rewards_and_grads(lambda ids, eot_index: rewards_by_length(model, ids, eot_index))
    assert len(length_chunks(lengths)) > 1
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sft_loss_in_chunks_equals_the_token_mean_over_one_forward():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=97))
    examples = []
    for seq in rows(10, seed=2):  # targets: the next token on the second half of each row, -100 elsewhere
        targets = seq[1:] + [-100]
        examples.append((seq, [t if i >= len(seq) // 2 else -100 for i, t in enumerate(targets)]))
    loss = batch_loss(model, examples, 0, "cpu", None)
    ids, _ = pad_right([e[0] for e in examples], 0)
    targets, _ = pad_right([e[1] for e in examples], -100)
    logp = torch.log_softmax(model(ids).double(), -1)
    mask = targets >= 0
    expected = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0][mask].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
