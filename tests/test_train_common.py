"""train/common.py: the shared optimizer step against the same update written out by hand."""

import copy

import torch

from palmchat.train.common import adamw, optimizer_step


def test_optimizer_step_equals_a_hand_written_step_with_clipping():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    opt, twin_opt = adamw(model, 1e-3, 0.1), adamw(twin, 1e-3, 0.1)
    max_norm = 0.05
    for step, lr in enumerate((3e-2, 1e-2)):  # two steps: the second reads the first's Adam state
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        for group in twin_opt.param_groups:
            group["lr"] = lr
        twin_opt.step()
        twin_opt.zero_grad(set_to_none=True)

        torch.nn.functional.cross_entropy(model(x), y).backward()
        norm = optimizer_step(opt, model.parameters(), max_norm, lr)

        assert norm.item() > 5 * max_norm  # the clip really cut the gradient
        assert torch.equal(norm, expected_norm)
        assert all(g["lr"] == lr for g in opt.param_groups)
        assert all(p.grad is None for p in model.parameters())
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {step}"


def test_optimizer_step_keeps_the_learning_rate_when_none_is_given():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer_step(opt, model.parameters(), float("inf"))
    assert opt.param_groups[0]["lr"] == 5e-3


def test_grad_clip_zero_means_no_clipping():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randn(3, 4)).pow(2).sum().mul(100).backward()
    grad = model.weight.grad.clone()
    norm = optimizer_step(opt, list(model.parameters()), 0.0)
    assert norm > 1  # a large gradient, applied whole: 0 turns clipping off instead of zeroing the update
    assert torch.allclose(model.weight, before - grad)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from palmchat.train.common import MetricsLog
    from palmchat.utils.jsonl import read_jsonl

    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    for step in (1, 2):
        log.write(step=step, loss=1.0 / step, finished=True, note="text")
    assert read_jsonl(tmp_path / "metrics.jsonl")[1] == {"step": 2, "loss": 0.5, "finished": True, "note": "text"}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5)]
