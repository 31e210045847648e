"""palmchat.model.logprobs.response_logprobs against log_softmax over each row scored alone, one token at a time."""

import pytest
import torch

from palmchat.data.chat import pad_right
from palmchat.model.logprobs import response_logprobs
from palmchat.model.transformer import Transformer

# (prompt, response) token ids; the empty response scores nothing
ROWS = [([1, 3, 40, 41, 5, 4], [50, 51, 52, 5]), ([1, 3, 60, 5, 4], [70, 5]), ([1, 3, 20, 21, 22, 5, 4], [5]),
        ([1, 4], [9, 8, 7, 6, 5, 5]), ([1, 3, 30, 5, 4], [])]


def hand_logprobs(model, prompt, response) -> list[float]:
    """log p(response[j] | prompt + response[:j]) for each j, from the row alone (no padding) in float64."""
    seq = prompt + response
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq]))[0].double(), -1)  # (T, V)
    return [logp[len(prompt) + j - 1, tok].item() for j, tok in enumerate(response)]


@pytest.fixture
def batch(tiny_config):
    model = Transformer(tiny_config).eval()
    ids, lengths = pad_right([p + r for p, r in ROWS], 0)
    prompt_lens = torch.tensor([len(p) for p, _ in ROWS])
    hand = [hand_logprobs(model, p, r) for p, r in ROWS]
    return model, ids, prompt_lens, lengths, hand


def test_per_token_logprobs_equal_the_hand_loop(batch):
    model, ids, prompt_lens, lengths, hand = batch
    width = max(len(r) for _, r in ROWS)
    with torch.no_grad():
        got = response_logprobs(model, ids, prompt_lens, lengths)
        wide = response_logprobs(model, ids, prompt_lens, lengths, width=width + 3)
    assert got.shape == (len(ROWS), width) and got.dtype == torch.float32
    for i, row in enumerate(hand):
        assert got[i, :len(row)].tolist() == pytest.approx(row, abs=1e-4)
        assert (got[i, len(row):] == 0).all()  # past the response
    assert torch.equal(wide[:, :width], got) and (wide[:, width:] == 0).all()


def test_summed_and_mean_logprobs_equal_the_hand_loop(batch):
    model, ids, prompt_lens, lengths, hand = batch
    with torch.no_grad():
        total = response_logprobs(model, ids, prompt_lens, lengths, reduce="sum")
        mean = response_logprobs(model, ids, prompt_lens, lengths, reduce="mean")
    assert total.shape == mean.shape == (len(ROWS),)
    for i, row in enumerate(hand):
        assert total[i].item() == pytest.approx(sum(row), abs=1e-4)
        assert mean[i].item() == pytest.approx(sum(row) / max(1, len(row)), abs=1e-4)


@pytest.mark.parametrize("reduce", ["none", "sum"])
def test_chunks_give_the_same_logprobs(batch, reduce):
    model, ids, prompt_lens, lengths, _ = batch
    with torch.no_grad():
        whole = response_logprobs(model, ids, prompt_lens, lengths, reduce=reduce)
        chunked = response_logprobs(model, ids, prompt_lens, lengths, reduce=reduce, batch_size=2)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_hidden_states_and_gradients(batch):
    model, ids, prompt_lens, lengths, _ = batch
    logp, hidden = response_logprobs(model, ids, prompt_lens, lengths, return_hidden=True)
    with torch.no_grad():
        assert torch.equal(hidden, model.hidden_states(ids))
    logp.sum().backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_bad_arguments(batch):
    model, ids, prompt_lens, lengths, _ = batch
    with pytest.raises(ValueError, match="reduce"):
        response_logprobs(model, ids, prompt_lens, lengths, reduce="max")
    with pytest.raises(ValueError, match="batch_size"):
        response_logprobs(model, ids, prompt_lens, lengths, batch_size=0)
    with pytest.raises(ValueError, match="single forward"):
        response_logprobs(model, ids, prompt_lens, lengths, batch_size=2, return_hidden=True)
