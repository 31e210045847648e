"""One reward-scoring path: a (prompt, response) longer than the reward model's context is cut the same way --
the prompt's oldest tokens after bos go first -- in reward-model training, best-of-n and the PPO/GRPO scorer."""

from types import SimpleNamespace

import pytest
import torch

from palmchat.data.chat import Ranking, ranking_batch
from palmchat.eval.reward import score_rankings
from palmchat.inference.best_of_n import score_completions
from palmchat.inference.engine import Completion
from palmchat.inference.reward_scoring import score_responses
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import ASSISTANT_ID, BOS_ID, EOT_ID, PAD_ID, USER_ID
from palmchat.train.rollout import Rollout, reward_model_scorer
from palmchat.world.synthetic import World

CTX = 12
# 14 tokens: bos, user, 10..19, eot, assistant
LONG_PROMPT = [BOS_ID, USER_ID, *range(10, 20), EOT_ID, ASSISTANT_ID]
# with the reply [30, 31] + eot, 12 tokens fit: bos, then the prompt's newest 8 tokens, then the reply
KEPT = [BOS_ID, 14, 15, 16, 17, 18, 19, EOT_ID, ASSISTANT_ID, 30, 31, EOT_ID]


@pytest.fixture(scope="module", params=["eot", "eot+gap"])
def rm(request):
    torch.manual_seed(0)
    model = RewardModel(preset("tiny", vocab_size=64, max_seq_len=CTX), EOT_ID, readout=request.param).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)  # rewards far apart, so a different cut shows
    return model


def alone(rm, ids):
    """The reward of one sequence, its reply starting after its last assistant token."""
    reply_start = len(ids) - ids[::-1].index(ASSISTANT_ID)
    with torch.no_grad():
        return rm(torch.tensor([ids]), torch.tensor([len(ids) - 1]), response_start=torch.tensor([reply_start])).item()


def test_score_responses_cuts_the_oldest_prompt_tokens_and_keeps_bos(rm):
    short = [BOS_ID, USER_ID, 40, EOT_ID, ASSISTANT_ID]
    got = score_responses(rm, [LONG_PROMPT, short, LONG_PROMPT], [[30, 31], [41, 42, EOT_ID], [30, 31, EOT_ID]],
                          EOT_ID, pad_id=PAD_ID)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert got[0].item() == pytest.approx(alone(rm, KEPT), abs=1e-5)
    assert got[1].item() == pytest.approx(alone(rm, short + [41, 42, EOT_ID]), abs=1e-5)
    assert got[2].item() == pytest.approx(got[0].item(), abs=1e-6)  # an ended reply: the same sequence
    assert alone(rm, KEPT) != pytest.approx(alone(rm, (LONG_PROMPT + [30, 31, EOT_ID])[-CTX:]), abs=1e-3)
    # batch size and a smaller limit
    in_twos = score_responses(rm, [LONG_PROMPT, short, LONG_PROMPT], [[30, 31], [41, 42], [30, 31]], EOT_ID,
                              batch_size=2)
    torch.testing.assert_close(in_twos, got, atol=1e-5, rtol=0)
    assert score_responses(rm, [LONG_PROMPT], [[30, 31]], EOT_ID, max_len=6).item() == pytest.approx(
        alone(rm, [BOS_ID, EOT_ID, ASSISTANT_ID, 30, 31, EOT_ID]), abs=1e-5)
    assert score_responses(rm, [], [], EOT_ID).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(rm, [short, short], [[41]], EOT_ID)


def test_best_of_n_scores_an_over_long_prompt_as_reward_training_does(rm):
    got = score_completions(rm, [LONG_PROMPT], [Completion([30, 31], [0.0, 0.0], "length")], EOT_ID)
    assert got == pytest.approx([alone(rm, KEPT)], abs=1e-5)
    # a reply that fills the context: the prompt's oldest token after bos goes, the reply stays whole
    prompt = [BOS_ID, USER_ID, 10, 11, 12, 13, EOT_ID, ASSISTANT_ID]
    got = score_completions(rm, [prompt], [[30, 31, 32, 33]], EOT_ID)
    assert got == pytest.approx([alone(rm, [BOS_ID, 10, 11, 12, 13, EOT_ID, ASSISTANT_ID, 30, 31, 32, 33, EOT_ID])],
                                abs=1e-5)


def test_rollout_scorer_keeps_bos_when_it_cuts(rm):
    prompts = [LONG_PROMPT, [BOS_ID, USER_ID, 40, EOT_ID, ASSISTANT_ID]]
    responses = [[30, 31], [41, EOT_ID]]  # the first never ended
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids = torch.full((2, max(map(len, seqs))), PAD_ID)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    rollout = Rollout(ids=ids, prompt_lens=torch.tensor([14, 5]), response_lens=torch.tensor([2, 2]),
                      finished=torch.tensor([False, True]), sample_logprobs=torch.zeros(2, 2), prompts=["", ""],
                      responses=["", ""])
    tokenizer = SimpleNamespace(chat_format=SimpleNamespace(eot_id=EOT_ID, pad_id=PAD_ID))
    scores = reward_model_scorer(rm, tokenizer)(rollout)
    assert scores[0].item() == pytest.approx(alone(rm, KEPT), abs=1e-5)
    assert scores[1].item() == pytest.approx(alone(rm, seqs[1]), abs=1e-5)


def test_training_best_of_n_and_rollout_score_a_long_conversation_alike():
    tok = train_tokenizer(World(0).pretraining_documents(100), vocab_size=300)
    torch.manual_seed(1)
    rm = RewardModel(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=24), EOT_ID).eval()
    messages = [{"role": "user", "content": "word " * 40}]
    ranking = Ranking(messages, ["The answer is 5.", "No."])
    prompt = tok.chat_format.render_prompt(messages)
    replies = [tok.encode(text) for text in ranking.responses]
    assert len(prompt) > 24
    batch = ranking_batch(tok, [ranking], 24)  # what reward-model training feeds the model
    assert (batch["ids"][:, 0] == BOS_ID).all() and bool(batch["truncated"].all())
    with torch.no_grad():
        trained = rm(batch["ids"], batch["eot_index"])
    validated, _ = score_rankings(rm, tok, [ranking], 24, 4, "cpu", None)
    best_of_n = score_completions(rm, [prompt, prompt], replies, tok.chat_format.eot_id, pad_id=tok.chat_format.pad_id)
    ids = torch.full((2, len(prompt) + max(map(len, replies))), tok.chat_format.pad_id)
    for row, r in enumerate(replies):
        ids[row, :len(prompt) + len(r)] = torch.tensor(prompt + r)
    rollout = Rollout(ids=ids, prompt_lens=torch.tensor([len(prompt)] * 2),
                      response_lens=torch.tensor([len(r) for r in replies]), finished=torch.tensor([False, False]),
                      sample_logprobs=torch.zeros(2, 1), prompts=["", ""], responses=ranking.responses)
    rollout_scores = reward_model_scorer(rm, tok)(rollout)
    torch.testing.assert_close(validated[0], trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(best_of_n), trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout_scores, trained, atol=1e-5, rtol=0)


def test_candidates_of_one_prompt_are_scored_on_the_same_prompt_cut(rm):
    """Best-of-n's candidates (and a GRPO group) share their prompt: it is cut once, leaving the longest candidate
    whole, so a short candidate is not scored on more context than a long one."""
    short, long = [30, 31], [30, 31, 32, 33, 34]
    got = score_responses(rm, [LONG_PROMPT, LONG_PROMPT], [short, long], EOT_ID)
    head = [BOS_ID, *LONG_PROMPT[-(CTX - len(long) - 2):]]  # room for the long one and its eot
    assert got[0].item() == pytest.approx(alone(rm, head + short + [EOT_ID]), abs=1e-5)
    assert got[1].item() == pytest.approx(alone(rm, head + long + [EOT_ID]), abs=1e-5)
