"""Evaluation, best-of-n and the report, on tiny random models (random weights, a tokenizer trained inline)."""

import copy
import math

import pytest
import torch

from palmchat.eval.policy import (
    Reply,
    evaluate_best_of_n,
    evaluate_policy,
    generate_replies,
    policy_kl,
    prompt_seed,
    win_rate,
)
from palmchat.eval.report import BEST_OF_N_PLOT, KL_PLOT, STAGE_PLOT, write_report
from palmchat.inference.best_of_n import best_of_n, best_of_n_batch, sample_seed, score_completions
from palmchat.inference.engine import Completion, Engine, SamplingParams
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.world.synthetic import World

MAX_NEW = 12


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(world.pretraining_documents(200), vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    torch.manual_seed(1)
    rm = RewardModel(preset("tiny", vocab_size=tokenizer.vocab_size), tokenizer.chat_format.eot_id).eval()
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # spread the rewards so the argmax is not a near-tie
    return rm


@pytest.fixture(scope="module")
def prompts(world):
    return world.prompts(6, "heldout")


@pytest.fixture(scope="module")
def reference(model):
    """The model with its weights perturbed: a reference whose KL from the model is positive."""
    torch.manual_seed(2)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def conversations(world, prompts):
    """The same held-out questions asked as later turns, half of them as follow-ups."""
    return world.multi_turn_prompts(prompts, seed=1, follow_ups=0.5, turns=(1, 1))  # fits the tiny context


@pytest.fixture(scope="module")
def policy_eval(model, tokenizer, world, prompts, reward_model, reference):
    return evaluate_policy(model, tokenizer, world, prompts, reference=reference, reward_model=reward_model,
                           max_new_tokens=MAX_NEW, seed=3)


def _ref_logprob(reference, prompt_ids, tokens):
    """log p_reference(tokens | prompt), by hand: one forward pass, log-softmax, pick each next token."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids + tokens]))[0, len(prompt_ids) - 1:-1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).sum().item()


# ---- evaluate_policy -------------------------------------------------------------------------


def test_evaluate_policy_keys_and_ranges(policy_eval, prompts):
    r = policy_eval
    for key in ("correct", "style", "score", "reward", "kl", "length", "scores", "per_task", "examples"):
        assert key in r, key
    for key in ("correct", "style", "score"):
        assert 0.0 <= r[key] <= 1.0
    assert math.isfinite(r["reward"])
    assert 0 <= r["length"] <= MAX_NEW
    assert len(r["scores"]) == len(prompts) and all(0 <= s <= 1 for s in r["scores"])
    assert abs(sum(r["scores"]) / len(prompts) - r["score"]) < 1e-12
    assert set(r["per_task"]) <= {"fact", "arithmetic", "list", "string", "unsafe"}
    assert all(0 <= v <= 1 for v in r["per_task"].values())
    ex = r["examples"][0]
    assert ex["prompt"] == prompts[0] and isinstance(ex["reply"], str) and "score" in ex["verdict"]


def test_kl_is_exact_on_one_token_replies(model, reference, tokenizer, prompts):
    """Every one-token reply, weighted by its probability under the model: the k1 estimates average to the exact
    KL(model || reference) of the first reply token, sum_y p(y) (log p(y) - log q(y)), which is positive. A sign
    bug makes it negative, a shift (scoring the token after, or the prompt's last) makes it another number."""
    ids = tokenizer.chat_format.render_prompt([{"role": "user", "content": prompts[0]}])
    vocab = tokenizer.vocab_size
    kls = policy_kl(model, reference, [ids] * vocab, [[y] for y in range(vocab)], batch_size=64)
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
        logq = reference(torch.tensor([ids]))[0, -1].log_softmax(-1)
    assert kls == pytest.approx((logp - logq).tolist(), abs=1e-4)  # each reply: log p(y) - log q(y)
    exact = (logp.exp() * (logp - logq)).sum().item()
    estimate = sum(p * k for p, k in zip(logp.exp().tolist(), kls))
    assert exact > 1e-4
    assert estimate == pytest.approx(exact, rel=1e-3, abs=1e-6)


def test_kl_matches_sampler_logprobs_against_each_reply_alone(model, reference, tokenizer, prompts):
    """Batched k1 KL = sum(engine logprobs at T=1) - reference log-prob of each reply scored alone."""
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=MAX_NEW, seed=1, batch_size=4)
    ids = [tokenizer.chat_format.render_prompt([{"role": "user", "content": p}]) for p in prompts]
    kls = policy_kl(model, reference, ids, [r.tokens for r in replies], batch_size=4)
    for prompt, reply, kl in zip(ids, replies, kls):
        assert kl == pytest.approx(sum(reply.logprobs) - _ref_logprob(reference, prompt, reply.tokens), abs=1e-3)
    assert any(abs(k) > 1e-3 for k in kls)


def test_evaluate_policy_kl_is_the_mean_over_its_replies(policy_eval, model, reference, tokenizer, prompts):
    """evaluate_policy's kl: the mean over its own sampled replies of log p_model - log p_reference, by hand."""
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=MAX_NEW, seed=3)
    ids = [tokenizer.chat_format.render_prompt([{"role": "user", "content": p}]) for p in prompts]
    by_hand = [sum(r.logprobs) - _ref_logprob(reference, i, r.tokens) for i, r in zip(ids, replies)]
    assert policy_eval["kl"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-3)
    assert abs(policy_eval["kl"]) > 1e-3


def test_replies_do_not_depend_on_batch_size(model, tokenizer, prompts):
    a = generate_replies(model, tokenizer, prompts, max_new_tokens=MAX_NEW, seed=5, batch_size=64)
    b = generate_replies(model, tokenizer, prompts, max_new_tokens=MAX_NEW, seed=5, batch_size=2)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert all(r.finish_reason in ("stop", "length") for r in a)


def test_win_rate():
    assert win_rate([1.0, 0.4, 0.31], [0.9, 0.0, 0.3]) == 1.0  # strictly better on every prompt
    assert win_rate([0.9, 0.0, 0.3], [1.0, 0.4, 0.31]) == 0.0  # strictly worse
    assert win_rate([0.3, 0.7], [0.3, 0.7]) == 0.5  # ties
    assert win_rate([1.0, 0.0, 0.5, 0.2], [0.5, 0.5, 0.5, 0.3]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert win_rate([0.5 + 1e-12], [0.5]) == 0.5  # within tie_tol
    with pytest.raises(ValueError, match="same prompts"):
        win_rate([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_evaluate_policy_win_rate_is_against_the_baseline(policy_eval, model, tokenizer, world, prompts):
    """The same replies against a baseline shifted down on every prompt win everywhere, shifted up lose."""
    scores = policy_eval["scores"]
    for shift, expected in ((-0.1, 1.0), (0.1, 0.0), (0.0, 0.5)):
        again = evaluate_policy(model, tokenizer, world, prompts, baseline_scores=[s + shift for s in scores],
                                max_new_tokens=MAX_NEW, seed=3)
        assert again["scores"] == scores and again["win_rate"] == expected, shift


# ---- conversations ---------------------------------------------------------------------------


def test_replies_to_conversations_render_the_whole_conversation(model, tokenizer, conversations):
    """Prompt i (a message list) is generated from the rendering of all its messages, with prompt i's seed."""
    replies = generate_replies(model, tokenizer, conversations, max_new_tokens=MAX_NEW, seed=2, batch_size=4)
    engine, eot = Engine(model), tokenizer.chat_format.eot_id
    differ = 0
    for i, (conv, reply) in enumerate(zip(conversations, replies)):
        ids = tokenizer.chat_format.render_prompt(conv)
        alone = engine.generate([ids], SamplingParams(max_new_tokens=MAX_NEW, seed=prompt_seed(2, i),
                                                      stop_token_ids=(eot,)))[0]
        assert reply.tokens == alone.tokens
        last = tokenizer.chat_format.render_prompt(conv[-1:])
        differ += engine.generate([last], SamplingParams(max_new_tokens=MAX_NEW, seed=prompt_seed(2, i),
                                                         stop_token_ids=(eot,)))[0].tokens != reply.tokens
    assert differ > 0  # the earlier turns change what the model says


def _oracle(world, answer_turn=-1):
    """A stand-in for generate_replies that answers, for each prompt, the question of one of its user turns."""
    def generate(model, tokenizer, prompts, **kwargs):
        out = []
        for p in prompts:
            if isinstance(p, list):
                users = [i for i, m in enumerate(p) if m["role"] == "user"]
                p = p[:users[answer_turn] + 1]
            text = world.reference(p)
            out.append(Reply(text, tokenizer.encode(text) + [tokenizer.chat_format.eot_id], [], "stop"))
        return out
    return generate


def test_evaluate_policy_verifies_the_last_turn_of_each_conversation(monkeypatch, model, tokenizer, world,
                                                                     prompts, conversations):
    """A policy that answers every last turn correctly scores 1 on the questions asked alone and asked as later
    turns (follow-ups included); one that answers the turn before scores 0 on the conversations."""
    assert any(world.parse(c[-1]["content"]) is None for c in conversations)  # some are follow-ups
    monkeypatch.setattr("palmchat.eval.policy.generate_replies", _oracle(world))
    for ps in (prompts, conversations):
        r = evaluate_policy(model, tokenizer, world, ps, max_new_tokens=MAX_NEW)
        assert r["correct"] == 1.0 and r["score"] == 1.0 and r["n"] == len(prompts)
    assert r["examples"][0]["prompt"] == conversations[0]
    monkeypatch.setattr("palmchat.eval.policy.generate_replies", _oracle(world, answer_turn=-2))
    r = evaluate_policy(model, tokenizer, world, conversations, max_new_tokens=MAX_NEW)
    unsafe = sum(world.parse(c).family == "unsafe" for c in conversations)  # refusing again is right again
    assert r["correct"] <= unsafe / len(conversations)


def test_evaluate_policy_scores_conversations_whole(model, tokenizer, world, reward_model, reference,
                                                   conversations):
    """Reward and KL of a conversation's reply are computed on the rendering of the whole conversation."""
    r = evaluate_policy(model, tokenizer, world, conversations, reference=reference, reward_model=reward_model,
                        max_new_tokens=MAX_NEW, seed=3)
    replies = generate_replies(model, tokenizer, conversations, max_new_tokens=MAX_NEW, seed=3)
    ids = [tokenizer.chat_format.render_prompt(c) for c in conversations]
    rewards = score_completions(reward_model, ids, [x.tokens for x in replies], tokenizer.chat_format.eot_id)
    assert r["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    kls = [sum(x.logprobs) - _ref_logprob(reference, i, x.tokens) for i, x in zip(ids, replies)]
    assert r["kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-3)
    assert r["scores"] == [world.verify(c, x.text).score for c, x in zip(conversations, replies)]


def test_best_of_n_on_conversations(model, reward_model, tokenizer, world, conversations):
    """Best-of-1 on conversations is the plain sample evaluate_policy draws for them with the same seed."""
    res = evaluate_best_of_n(model, reward_model, tokenizer, world, conversations, ns=(1, 2), seed=3,
                             max_new_tokens=MAX_NEW)
    plain = evaluate_policy(model, tokenizer, world, conversations, reward_model=reward_model, seed=3,
                            max_new_tokens=MAX_NEW)
    assert res[1]["reward"] == pytest.approx(plain["reward"], abs=1e-5)
    assert res[1]["score"] == pytest.approx(plain["score"])


def test_bad_prompts_are_refused(model, tokenizer, conversations):
    for bad in ("What is 2 + 3?", conversations[0], [conversations[0][:-1]], [[]]):
        with pytest.raises(ValueError):
            generate_replies(model, tokenizer, bad, max_new_tokens=2)


# ---- best-of-n -------------------------------------------------------------------------------


def test_best_of_n_picks_the_argmax_of_rewards_scored_alone(model, reward_model, tokenizer, prompts):
    engine = Engine(model)
    prompt = tokenizer.chat_format.render_prompt([{"role": "user", "content": prompts[0]}])
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=7)
    result = best_of_n(engine, reward_model, prompt, 8, params, tokenizer.chat_format.eot_id)
    assert len(result.completions) == len(result.rewards) == 8
    assert result.index == max(range(8), key=lambda j: result.rewards[j])
    assert result.best is result.completions[result.index]
    assert len({tuple(c.tokens) for c in result.completions}) > 1  # distinct seeds -> distinct samples
    for c, r in zip(result.completions, result.rewards):
        seq = prompt + c.tokens + ([] if c.tokens and c.tokens[-1] == tokenizer.chat_format.eot_id
                                   else [tokenizer.chat_format.eot_id])
        with torch.no_grad():
            alone = reward_model(torch.tensor([seq]), torch.tensor([len(seq) - 1])).item()
        assert r == pytest.approx(alone, abs=1e-5)
    # sample j is the plain sample with seed sample_seed(7, j); n=1 is exactly engine.generate with the params
    one = best_of_n(engine, reward_model, prompt, 1, params, tokenizer.chat_format.eot_id)
    plain = engine.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW, seed=7,
                                                     stop_token_ids=(tokenizer.chat_format.eot_id,)))[0]
    assert one.index == 0 and one.best.tokens == plain.tokens == result.completions[0].tokens
    third = engine.generate([prompt], SamplingParams(max_new_tokens=MAX_NEW, seed=sample_seed(7, 2),
                                                     stop_token_ids=(tokenizer.chat_format.eot_id,)))[0]
    assert third.tokens == result.completions[2].tokens


def test_best_of_n_with_a_rigged_head_prefers_the_known_best(model, tokenizer, prompts):
    """A head that reads one hidden unit: the reward of each completion is known from the backbone alone."""
    rm = RewardModel(preset("tiny", vocab_size=tokenizer.vocab_size), tokenizer.chat_format.eot_id).eval()
    with torch.no_grad():
        rm.head.weight.zero_()
        rm.head.weight[0, 5] = 1.0
        rm.head.bias.fill_(2.0)
    engine = Engine(model)
    prompt = tokenizer.chat_format.render_prompt([{"role": "user", "content": prompts[1]}])
    result = best_of_n(engine, rm, prompt, 6, SamplingParams(max_new_tokens=MAX_NEW, seed=0),
                       tokenizer.chat_format.eot_id)
    expected = []
    for c in result.completions:
        seq = prompt + c.tokens + ([] if c.tokens and c.tokens[-1] == tokenizer.chat_format.eot_id
                                   else [tokenizer.chat_format.eot_id])
        with torch.no_grad():
            expected.append(rm.backbone.hidden_states(torch.tensor([seq]))[0, -1, 5].item() + 2.0)
    assert result.rewards == pytest.approx(expected, abs=1e-5)
    assert result.index == max(range(6), key=lambda j: expected[j])


def test_best_of_n_batch_equals_each_prompt_alone(model, reward_model, tokenizer, prompts):
    engine = Engine(model)
    ids = [tokenizer.chat_format.render_prompt([{"role": "user", "content": p}]) for p in prompts[:3]]
    params = SamplingParams(max_new_tokens=MAX_NEW, seed=11)
    batched = best_of_n_batch(engine, reward_model, ids, 4, params, tokenizer.chat_format.eot_id)
    for prompt, b in zip(ids, batched):
        alone = best_of_n(engine, reward_model, prompt, 4, params, tokenizer.chat_format.eot_id)
        assert [c.tokens for c in b.completions] == [c.tokens for c in alone.completions]
        assert b.rewards == pytest.approx(alone.rewards, abs=1e-5) and b.index == alone.index


def test_length_limited_completion_is_scored_with_eot_appended(reward_model, tokenizer):
    prompt = [tokenizer.chat_format.bos_id, tokenizer.chat_format.user_id, 100, 101, tokenizer.chat_format.eot_id,
              tokenizer.chat_format.assistant_id]
    cut = Completion([120, 121], [0.0, 0.0], "length")
    ended = Completion([120, 121, tokenizer.chat_format.eot_id], [0.0, 0.0, 0.0], "stop")
    a, b = score_completions(reward_model, [prompt, prompt], [cut, ended], tokenizer.chat_format.eot_id)
    assert a == pytest.approx(b, abs=1e-6)


def test_evaluate_best_of_n(model, reward_model, tokenizer, world, prompts, policy_eval):
    res = evaluate_best_of_n(model, reward_model, tokenizer, world, prompts, ns=(1, 4), seed=3,
                             max_new_tokens=MAX_NEW)
    assert sorted(res) == [1, 4]
    for d in res.values():
        assert set(d) >= {"score", "correct", "style", "reward"}
        assert 0 <= d["score"] <= d["oracle_score"] <= 1
    assert res[4]["reward"] >= res[1]["reward"]  # the max over a superset of samples
    # best-of-1 is the plain sample evaluate_policy drew with the same seed
    assert res[1]["score"] == pytest.approx(policy_eval["score"])
    assert res[1]["reward"] == pytest.approx(policy_eval["reward"], abs=1e-5)


# ---- report ----------------------------------------------------------------------------------


def test_write_report(tmp_path, policy_eval):
    curve = tmp_path / "sft" / "loss.png"
    curve.parent.mkdir()
    curve.write_bytes(b"\x89PNG\r\n\x1a\n")
    stages = {name: dict(policy_eval, win_rate=0.5) for name in ("grpo", "sft", "ppo", "dpo", "rloo")}
    results = {
        "stages": stages,
        "reward_model": {"pairwise_accuracy": 0.71, "kendall_tau": 0.42, "n_rankings": 300,
                         "labeller_agreement": 0.861},
        "best_of_n": {"1": {"score": 0.5, "correct": 0.6, "style": 0.7, "reward": 0.1, "oracle_score": 0.5},
                      "4": {"score": 0.6, "correct": 0.7, "style": 0.7, "reward": 0.4, "oracle_score": 0.8},
                      "16": {"score": 0.62, "correct": 0.7, "style": 0.8, "reward": 0.9, "oracle_score": 0.9}},
        "plots": {"SFT loss": str(curve)},
        "settings": {"preset": "tiny", "seed": 0, "prompts": 6},
        "wall_time_s": 12.5,
    }
    path = write_report(tmp_path, results)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    for name in stages:
        assert f"| {name} |" in text
    assert text.index("| sft |") < text.index("| ppo |") < text.index("| dpo |") < text.index("| grpo |") \
        < text.index("| rloo |")
    assert "| ceiling: two simulated labellers agree on the same pairs | 0.861 |" in text
    for png in (STAGE_PLOT, BEST_OF_N_PLOT, KL_PLOT):
        assert (tmp_path / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert "](sft/loss.png)" in text
    assert "0.710" in text and "0.420" in text and "12.5" in text
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
