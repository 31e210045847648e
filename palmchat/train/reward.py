"""Reward model: `palmchat reward SFT_CHECKPOINT --data rankings.jsonl --out runs/reward`.

The LM backbone with a scalar head read at the response's explicit end-of-turn token. Trained on
K-wise human rankings with the InstructGPT loss (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155,
eq. 1): all C(K,2) pairs of one prompt in one batch element, -1/C(K,2) * sum log sigmoid(r_w - r_l).
Pairwise files (prompt/chosen/rejected) are the K=2 case. Reports held-out pairwise accuracy and
Kendall's tau between the model's order and the labelers' order, beside the ceiling for rankings from the bundled
world's simulated labellers (how often two of them agree on the same pairs, eval/reward.py). `--resume` continues a
killed run from its last state (train/resume.py) and ends where the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from palmchat import checkpoint
from palmchat.checkpoint.heads import save_reward_model
from palmchat.data.chat import group_by_ranking, ranking_batch, read_stage_data, split_by_tree
from palmchat.data.formats import FormatArgs
from palmchat.eval.reward import ranking_ceilings, ranking_metrics, score_rankings
from palmchat.losses import ranking_loss
from palmchat.model.heads import READOUTS, RewardModel
from palmchat.model.length_chunks import map_length_chunks
from palmchat.model.lora import lora_config
from palmchat.train import resume
from palmchat.train.common import MetricsLog, TrainArgs, adamw, cosine_lr, load_policy, optimizer_step, plot_metrics
from palmchat.utils.args import arg
from palmchat.utils.device import autocast, autocast_dtype, pick_device
from palmchat.world.defaults import bundled_rankings
from palmchat.world.synthetic import DEFAULT_NOISE, World


@dataclass
class RewardArgs(FormatArgs, TrainArgs):
    """Train a reward model on K-wise rankings (or chosen/rejected pairs)."""

    base: str = arg("", "checkpoint to start from (usually the SFT model)", positional=True)
    data: list[str] = arg([], "rankings {'prompt','responses','ranking'} or pairs {'prompt','chosen',"
                              "'rejected'} (or a public format: palmchat data inspect); default: the bundled world's "
                              "rankings")
    bundled_rankings: int = arg(6000, "without --data: how many rankings to draw from the bundled world. More "
                                      "rankings were the strongest lever on held-out accuracy (0.62 / 0.65 / 0.70 "
                                      "with 900 / 2700 / 5700 in one epoch; 2700 for two epochs, the same steps as "
                                      "5700 for one: 0.67)")
    out: str = arg("runs/reward", "output folder")
    epochs: float = arg(1.0, "passes over the data")
    batch_size: int = arg(16, "rankings per micro-batch (each holds K responses); a step takes --batch-size x "
                              "--grad-accum")
    lr: float = arg(3e-4, "peak learning rate")
    warmup_steps: int = arg(10, "linear warmup steps")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_len: int = arg(0, "tokens per prompt+response; 0 = the model's context")
    val_fraction: float = arg(0.1, "rankings held out for accuracy and Kendall tau")
    readout: str = arg("eot+gap", "what the score reads: the hidden state at the reply's end-of-turn token "
                                  "through a linear head (eot, InstructGPT's), plus a learned multiple of the reply's "
                                  "mean logit gap, how far each of its tokens is from the one the model would have "
                                  "written itself (eot+gap; model/heads.py). On the bundled world's held-out "
                                  "questions eot+gap with --lm-coef 0.1 ranked 0.731 of pairs right, eot 0.653 "
                                  "(docs/decisions.md)", choices=list(READOUTS))
    lm_coef: float = arg(0.1, "weight of a language-model loss on each ranking's top response through the backbone "
                              "(a regulariser, as in Yang et al. 2024, https://arxiv.org/abs/2406.10216): it keeps "
                              "the output layer a language model, which the eot+gap readout reads")
    normalize: str = arg("standardize", "after training, shift (center) or shift and scale (standardize) the head "
                                        "so the held-out responses' rewards have mean 0 (and std 1); the order, so the "
                                        "accuracy, is unchanged. The ranking loss sees only differences, so offset and "
                                        "scale are arbitrary and grow with training (std 1.1 after 1 epoch, 2.3 after "
                                        "3, docs/decisions.md): standardize removes the offset PPO's critic would have "
                                        "to learn and makes one KL coefficient mean the same for every reward model",
                         choices=["none", "center", "standardize"])
    labeller_noise: float = arg(DEFAULT_NOISE, "for the ceiling printed beside the accuracy: the noise of the "
                                               "bundled world's simulated labellers (World.rank) that ranked the data")
    world_seed: int = arg(-1, "for the ceiling: the seed of the bundled world that wrote the data; -1 = --seed")
    margin: float = arg(0.0, "margin per place in the ranking: responses ranked i-th and j-th must differ by "
                             "margin * (j - i) before their pair stops pulling (Llama 2's margin loss, Touvron et al. "
                             "2023, https://arxiv.org/abs/2307.09288, with the distance in the ranking as the "
                             "preference's strength); 0 = InstructGPT's loss. On the bundled world 0.5 changed "
                             "nothing (held-out accuracy 0.619 against 0.621)")
    val_data: list[str] = arg([], "held-out rankings to measure on; default: --val-fraction of --data")
    grad_accum: int = arg(1, "micro-batches of --batch-size rankings per optimizer step: the same effective batch in "
                             "less memory")
    gradient_checkpointing: bool = arg(False, "recompute each block's activations in backward: less memory, "
                                              "~30%% more compute")
    save_every: int = arg(100, "save a resumable state (weights, optimizer, step) every this many steps; 0 = never")
    resume: bool = arg(False, "continue from the newest resumable state in --out, with the arguments the run "
                              "started with; the result equals an uninterrupted run's")
    lora_rank: int = arg(0, "train a LoRA adapter (plus the head) instead of all weights")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")


def rewards_and_best_logprobs(model: RewardModel, batch: dict, device, logprobs: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) rewards of a ranking_batch's rows and (N,) summed log-probs of each ranking's top response (its tokens
    and end-of-turn; 0 on the other rows, and everywhere without ``logprobs``) under the backbone's output layer,
    from one forward pass in chunks of rows of similar length (model/length_chunks.py); the log-probs only
    project the top responses' positions."""
    ids, eot_index = batch["ids"].to(device), batch["eot_index"].to(device)
    start, best = batch["prompt_lens"].to(device), (batch["rank"] == 0).to(device)

    def chunk_results(chunk, rows):
        rewards, hidden = model(chunk, eot_index[rows], return_hidden=True, response_start=start[rows])
        positions = torch.arange(1, chunk.shape[1], device=device)[None, :]  # column j scores token j + 1
        scored = logprobs & best[rows, None] & (positions >= start[rows, None]) & (positions <= eot_index[rows, None])
        logp = model.backbone.token_logprobs(hidden[:, :-1][scored], chunk[:, 1:][scored])
        row_logp = torch.zeros(len(rows), device=device).index_add(0, scored.nonzero()[:, 0], logp)
        return torch.stack([rewards.float(), row_logp], 1)

    results = map_length_chunks(chunk_results, ids, eot_index + 1)
    return results[:, 0], results[:, 1]


def margin_rewards(rewards: torch.Tensor, margin: float) -> torch.Tensor:
    """(B, K_max) rewards, column j ranked j-th, shifted so that :func:`ranking_loss` on them is the margin loss
    -log sigmoid(r_i - r_j - margin * (j - i)) for every pair i above j: (r_i + margin*i) - (r_j + margin*j)."""
    return rewards + margin * torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training rankings' order in one epoch: a pure function of (seed, epoch), so a resumed run takes the
    batches an uninterrupted one would."""
    order = list(range(n))
    random.Random(f"reward-order|{seed}|{epoch}").shuffle(order)
    return order


def main(args: RewardArgs) -> Path:
    if args.grad_accum < 1 or args.batch_size < 1:
        raise ValueError("--batch-size and --grad-accum must be at least 1")
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    backbone, tokenizer, _ = load_policy(args.base, args.lora_rank, args.lora_alpha, device, adapter_name="reward",
                                       dtype=dtype)
    backbone.gradient_checkpointing = args.gradient_checkpointing
    # the new head is trainable either way
    model = RewardModel(backbone, eot_id=tokenizer.chat_format.eot_id, readout=args.readout).to(device)
    max_len = args.max_len or backbone.config.max_seq_len
    data = read_stage_data(args.data, "rankings", args, "reward") if args.data else None
    rankings = data.items if data else bundled_rankings(args.seed, args.bundled_rankings)
    if args.val_data:
        train, val = rankings, read_stage_data(args.val_data, "rankings", args, "reward").items
        if not train or not val:
            raise ValueError("the reward model needs at least 1 ranking to train on and 1 held out")
    else:
        if len(rankings) < 2:
            raise ValueError("the reward model needs at least 2 rankings")
        train, val = split_by_tree(rankings, data.trees if data else [None] * len(rankings), args.val_fraction,
                                   args.seed)
        if not train:
            raise ValueError("the reward model needs rankings to train on: every one is held out (an "
                             "Open-Assistant file of one tree cannot be split by tree; give --val-data)")
    # what the accuracy is read against: how often two of the world's simulated labellers agree on these pairs
    # (None for rankings whose prompts the bundled world does not know)
    world = World(seed=args.seed if args.world_seed < 0 else args.world_seed)
    ceilings = ranking_ceilings(world, val, args.labeller_noise, seed=args.seed)

    per_step = args.batch_size * args.grad_accum  # rankings per optimizer step, whatever fits in memory
    steps_per_epoch = max(1, len(train) // per_step)
    max_steps = max(1, int(args.epochs * steps_per_epoch))
    optimizer = adamw(model, args.lr, args.weight_decay)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # what must not change between a run and its resumption (the batches, the schedule and the loss depend on it)
    recipe = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("out", "resume", "save_every", "device", "tensorboard")}
    start_step, state = resume.start_or_resume(out, args.resume, {"reward": model}, {"reward": optimizer})
    if args.resume:
        changed = sorted(k for k in recipe if state.get("recipe", {}).get(k) != recipe[k])
        if changed:
            raise resume.ResumeError(f"--resume: {out} was started with other arguments ({', '.join(changed)}); "
                                     f"resume with the ones it was started with")
        print(f"reward model: resuming at step {start_step} from {resume.latest_state(out)}")
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=start_step if args.resume else None,
                         tensorboard=args.tensorboard)
    print(f"reward model: {len(train)} train / {len(val)} held-out rankings, {max_steps} steps of {per_step}")

    reward_stats = {}  # mean and std of the held-out responses' rewards at the last validation

    def validate(step: int) -> dict:
        rewards, ks = score_rankings(model, tokenizer, val, max_len, 2 * args.batch_size, device, dtype)
        result = ranking_metrics(rewards, ks)
        metrics.write(step=step, **{f"val_{k}": v for k, v in result.items()})
        values = rewards[~rewards.isnan()]
        reward_stats.update(mean=values.mean().item(), std=values.std().item())
        return result

    first = state["before"] if args.resume else validate(0)
    started = time.time()
    for step in tqdm(range(start_step, max_steps), desc="reward", dynamic_ncols=True, mininterval=1.0):
        epoch, pos = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), args.seed, epoch)[pos * per_step:(pos + 1) * per_step]
        lr = cosine_lr(step, max_steps, args.warmup_steps, args.lr, args.lr * 0.1)
        totals = {"loss": 0.0, "accuracy": 0.0, "lm_loss": 0.0}
        # micro-batches of batch_size rankings (fewer if the data are short of one step)
        batches = [ranking_batch(tokenizer, [train[i] for i in order[first:first + args.batch_size]], max_len)
                   for first in range(0, len(order), args.batch_size)]
        # the ranking loss is a mean of the micro-batches' means; the LM loss a mean over all of the step's top-reply
        # tokens, whichever micro-batch holds them, so accumulation takes the steps one big batch would
        lm_tokens = sum(int((b["lengths"] - b["prompt_lens"])[b["rank"] == 0].sum()) for b in batches)
        for batch in batches:
            num = batch["num_responses"].to(device)
            with autocast(device, dtype):
                rewards, best_logp = rewards_and_best_logprobs(model, batch, device, args.lm_coef > 0)
                grouped = group_by_ranking(rewards.float(), num)
                loss, _ = ranking_loss(margin_rewards(grouped, args.margin), num)
            lm_loss = -best_logp.sum() / max(lm_tokens, 1)
            step_loss = loss / len(batches) + args.lm_coef * lm_loss
            step_loss.backward()
            totals["loss"] += step_loss.item()
            totals["lm_loss"] += lm_loss.item()
            totals["accuracy"] += float(ranking_loss(grouped.detach(), num)[1]) / len(batches)
        optimizer_step(optimizer, model.parameters(), args.grad_clip, lr)
        metrics.write(step=step + 1, **totals, lr=lr)
        if (step + 1) % max(1, max_steps // 4) == 0 and step + 1 != max_steps:
            validate(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 != max_steps:
            resume.save_state(out, step + 1, {"reward": model}, {"reward": optimizer},
                              state={"before": first, "recipe": recipe})
    final_metrics = validate(max_steps)
    if args.normalize != "none":
        # InstructGPT normalises its reward model so that a reference set scores 0 on average before RL; the
        # ranking loss only sees differences, so the offset (and the scale) is arbitrary until fixed here
        raw = dict(reward_stats)
        usable = math.isfinite(raw["std"]) and raw["std"] > 1e-6
        scale = raw["std"] if args.normalize == "standardize" and usable else 1.0
        with torch.no_grad():
            model.head.bias.sub_(raw["mean"]).div_(scale)
            model.head.weight.div_(scale)
            if model.gap_weight is not None:
                model.gap_weight.div_(scale)
        final_metrics = validate(max_steps)  # same order, so the same accuracy; mean 0 (std 1)
        normalization = {"mode": args.normalize, "raw_mean": raw["mean"], "raw_std": raw["std"], "scale": scale}
    else:
        normalization = {"mode": "none"}
    normalization.update(heldout_mean=reward_stats["mean"], heldout_std=reward_stats["std"])
    plot_metrics(out / "metrics.jsonl", out / "accuracy.png", ["accuracy", "val_pairwise_accuracy", "val_kendall_tau"],
                 "reward model")
    config = {"stage": "reward", "train": dataclasses.asdict(args), "minutes": (time.time() - started) / 60,
              "eval": {"before": first, "after": {**final_metrics, **(ceilings or {})}}, "normalization": normalization}
    base_ckpt = checkpoint.resolve(args.base)
    if args.lora_rank:
        config.update(lora=lora_config(backbone, "reward"), base=str(base_ckpt.resolve()))
    final = save_reward_model(model, out, max_steps, config, base_ckpt / checkpoint.TOKENIZER_FILE,
                              adapter="reward" if args.lora_rank else None)
    print(f"reward model done: {final}  held-out pairwise accuracy {final_metrics['pairwise_accuracy']:.3f}, "
          f"Kendall tau {final_metrics['kendall_tau']:.3f} (before training: {first['pairwise_accuracy']:.3f})")
    if ceilings:
        print(f"  ceiling: two simulated labellers agree on {ceilings['labeller_agreement']:.3f} of these pairs; "
              f"the world's noise-free verifier scores {ceilings['verifier_accuracy']:.3f} against these labels")
    return final
