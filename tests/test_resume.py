"""The resumable training state every fine-tuning stage saves (palmchat/train/resume.py): what is saved comes back
exactly, a mismatch is refused by name, and a crash while saving leaves the previous state. The stages' own
killed-then-resumed runs are tested beside each stage."""

import random

import pytest
import torch

from palmchat.model.config import preset
from palmchat.model.transformer import Transformer
from palmchat.train import resume


def build(seed=0, frozen_embed=True):
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=64))
    model.embed.requires_grad_(not frozen_embed)  # frozen weights are not saved: they come from the base
    head = torch.nn.Linear(model.config.dim, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    return model, head, opt, head_opt


def train_steps(model, head, opt, head_opt, n, order: random.Random, gen: torch.Generator):
    for _ in range(n):
        x = torch.randint(0, 64, (2, 8), generator=gen)
        x[0, order.randrange(8)] = 1
        x[1] = torch.randint(0, 64, (8,))  # torch's global generator
        loss = model(x).logsumexp(-1).mean() + head(model.hidden_states(x)).pow(2).mean()
        loss.backward()
        for o in (opt, head_opt):
            o.step()
            o.zero_grad()


def test_save_then_load_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, head, opt, head_opt = build()
    order, gen = random.Random(1), torch.Generator().manual_seed(2)
    train_steps(model, head, opt, head_opt, 6, order, gen)
    uninterrupted = [p.clone() for p in list(model.parameters()) + list(head.parameters())]

    model, head, opt, head_opt = build()
    order, gen = random.Random(1), torch.Generator().manual_seed(2)
    train_steps(model, head, opt, head_opt, 3, order, gen)
    resume.save_state(tmp_path, 3, {"policy": model, "head": head}, {"policy": opt, "head": head_opt},
                      rngs={"order": order, "gen": gen}, state={"kl_coef": 0.25})
    random.random(), torch.rand(5), order.random(), gen.seed()  # the "crash": every generator moves on

    model, head, opt, head_opt = build()  # a fresh process: fresh weights, optimizers and generators
    order, gen = random.Random(99), torch.Generator().manual_seed(99)
    step, state = resume.load_state(tmp_path, {"policy": model, "head": head}, {"policy": opt, "head": head_opt},
                                    rngs={"order": order, "gen": gen})
    assert (step, state) == (3, {"kl_coef": 0.25})
    train_steps(model, head, opt, head_opt, 3, order, gen)
    resumed = list(model.parameters()) + list(head.parameters())
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))


def test_a_different_set_of_trainable_parameters_is_refused_by_name(tmp_path):
    model, head, opt, head_opt = build()
    resume.save_state(tmp_path, 1, {"policy": model}, {"policy": opt})
    other, _, other_opt, _ = build(frozen_embed=False)
    with pytest.raises(resume.ResumeError, match="embed.weight"):
        resume.load_state(tmp_path, {"policy": other}, {"policy": other_opt})
    with pytest.raises(resume.ResumeError, match="no resumable state"):
        resume.load_state(tmp_path / "elsewhere", {"policy": model}, {"policy": opt})


def test_a_crash_while_saving_keeps_the_previous_state(tmp_path, monkeypatch):
    model, head, opt, head_opt = build()
    resume.save_state(tmp_path, 1, {"policy": model}, {"policy": opt})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(resume, "save_file", crash)
    with pytest.raises(OSError):
        resume.save_state(tmp_path, 2, {"policy": model}, {"policy": opt})
    assert resume.latest_state(tmp_path).name == "step-000001"
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["latest", "step-000001"]
