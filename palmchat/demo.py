"""`make demo`: the whole pipeline on the bundled assistant world, on a laptop CPU.

    data -> tokenizer + pretraining -> SFT -> reward model -> PPO, DPO, GRPO, RLOO, KTO -> evaluation -> report.md

Each step calls the same stage function a user runs from the command line, with small settings. With
``--tool-use`` SFT also trains on the world's tool-use conversations (``tool_sft.jsonl``: a calculator for the
arithmetic, a directory of the invented people) and every stage is also evaluated on held-out questions a tool
answers (``palmchat.eval.tool_use``): how often it calls the right tool with the right arguments, and answers right.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from palmchat.utils.args import arg
from palmchat.utils.jsonl import write_jsonl


@dataclass
class DemoArgs:
    """Run the pipeline end to end on the bundled data and write report.md."""

    out: str = arg("runs/demo", "output folder")
    quick: bool = arg(False, "tiny settings for tests (seconds instead of minutes)")
    seed: int = arg(0, "random seed of the training stages (initialisation, data order, sampling)")
    world_seed: int = arg(-1, "seed of the bundled world: its people, tasks, training data and held-out prompts; "
                              "-1 = --seed. Benchmarks fix it to compare training seeds on one test set")
    # enough that the SFT models of different seeds agree, so the aligned stages' gains exceed the seed spread
    # (docs/decisions.md)
    pretrain_steps: int = arg(1100, "pretraining steps")
    eval_prompts: int = arg(500, "held-out prompts per evaluation")
    eval_samples: int = arg(1, "replies sampled per held-out prompt in the evaluation: the score's sampling noise "
                               "falls as 1/sqrt(prompts x samples) (benchmarks use 4)")
    fresh: bool = arg(True, "delete earlier outputs in --out first")
    serve: bool = arg(False, "after the report: start the server with the best aligned policy and the reward "
                             "model, run one feedback round with simulated labellers, then keep serving until Ctrl-C")
    port: int = arg(8000, "port for --serve (on 127.0.0.1)")
    tool_use: bool = arg(False, "SFT also on the bundled world's 3000 tool-use conversations (a calculator, a "
                                "directory of its people), and a tool-use evaluation of every stage in the report "
                                "(SFT then takes ~6x as long: benchmarks/README.md)")


@dataclass
class Settings:
    """Stage sizes: the demo's, or --quick's for tests."""

    preset: str
    pretrain_steps: int
    vocab_size: int
    seq_len: int
    context_steps: int  # the last pretraining steps, on sequences of the model's whole context
    sft_epochs: float
    reward_epochs: float
    dpo_epochs: float
    ppo_iterations: int
    grpo_iterations: int
    rloo_iterations: int
    kto_epochs: float
    eval_prompts: int
    best_of: tuple[int, ...]
    eval_samples: int = 1
    reward_normalize: str = "standardize"
    ppo_kl_coef: float = 0.4
    policy_rankings: int = 1000  # training prompts whose SFT samples (4 each) the simulated labellers rank


def settings(args: DemoArgs) -> Settings:
    if args.quick:
        return Settings("tiny", 30, 400, 128, 0, 0.2, 0.1, 0.05, 2, 2, 2, 0.05, 16, (1, 2), args.eval_samples,
                        policy_rankings=16)
    # reward model: the bundle's 6000 rankings for 2 epochs (more rankings beat more epochs at the same steps:
    # docs/decisions.md), standardised so that the PPO KL coefficient means the same whatever the reward's scale;
    # DPO: half an epoch of them (the steps one epoch of 3000 took); PPO: kl_coef 0.4 against that unit-std reward,
    # 60 iterations (docs/decisions.md); RLOO: as many samples as GRPO (60 x 8 prompts x 4), the same KL as PPO
    # pretraining: sequences of 256 tokens, then 100 steps of whole 1024-token contexts (docs/decisions.md)
    return Settings("mini", args.pretrain_steps, 2048, 256, 100, 2.0, 2.0, 0.5, 60, 30, 60, 1.0, args.eval_prompts,
                    (1, 4, 16), args.eval_samples)


def run_pipeline(args: DemoArgs) -> dict:
    from palmchat import checkpoint
    from palmchat.checkpoint.heads import load_reward_model
    from palmchat.data.chat import load_rankings, unpaired_from_rankings
    from palmchat.eval.policy import evaluate_best_of_n, evaluate_policy
    from palmchat.eval.report import write_report
    from palmchat.eval.tool_use import evaluate_tool_use
    from palmchat.train.dpo import DPOArgs
    from palmchat.train.dpo import main as dpo
    from palmchat.train.grpo import GRPOArgs
    from palmchat.train.grpo import main as grpo
    from palmchat.train.kto import KTOArgs
    from palmchat.train.kto import main as kto
    from palmchat.train.ppo import PPOArgs
    from palmchat.train.ppo import main as ppo
    from palmchat.train.pretrain import PretrainArgs
    from palmchat.train.pretrain import main as pretrain
    from palmchat.train.reward import RewardArgs
    from palmchat.train.reward import main as reward
    from palmchat.train.rloo import RLOOArgs
    from palmchat.train.rloo import main as rloo
    from palmchat.train.sft import SFTArgs
    from palmchat.train.sft import main as sft
    from palmchat.utils.device import autocast_dtype, pick_device
    from palmchat.world.synthetic import World, write_bundle

    s = settings(args)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started, minutes = time.time(), {}
    seed = args.seed
    world_seed = seed if args.world_seed < 0 else args.world_seed

    def timed(name, fn):
        t0 = time.time()
        print(f"\n=== {name} ===")
        result = fn()
        minutes[name] = (time.time() - t0) / 60
        return result

    data = out / "data"
    quick_sizes = dict(pretrain=600, sft=300, rankings=150, pairs=60, prompts_train=64, prompts_heldout=32,
                       moderation=20, tool_sft=60, prompts_tools_heldout=16)
    timed("data", lambda: write_bundle(data, seed=world_seed, sizes=quick_sizes if args.quick else None))

    reused: set[str] = set()

    def pretrained():
        """Pretrain, or with --no-fresh reuse a finished pretraining run in --out (the slowest stage)."""
        if not args.fresh and (out / "pretrain" / "latest").exists() \
                and checkpoint.read_config(out / "pretrain")["step"] >= s.pretrain_steps:
            print(f"reusing the finished pretraining run in {out / 'pretrain'}")
            reused.add("pretrain")
            return checkpoint.resolve(out / "pretrain")
        # a tool-use prompt (the tools offered, the call, its result) is longer than the quick model's context
        longer = "max_seq_len=768" if args.quick and args.tool_use else ""
        return pretrain(PretrainArgs(
            out=str(out / "pretrain"), preset=s.preset, data=[str(data / "pretrain.txt")], max_steps=s.pretrain_steps,
            vocab_size=s.vocab_size, seq_len=s.seq_len, context_steps=s.context_steps, model=longer,
            eval_every=max(10, s.pretrain_steps // 7), save_every=max(10, s.pretrain_steps // 2),
            warmup_steps=min(50, s.pretrain_steps // 5), seed=seed))

    def stage(name, main, stage_args, inputs: tuple[str, ...]):
        """Train one stage; with --no-fresh, reuse its finished checkpoint instead when it was trained with these
        very arguments and everything it was trained from was reused too (so benchmarks can resume)."""
        def run():
            folder = Path(stage_args.out)
            if not args.fresh and all(i in reused for i in inputs) and (folder / "latest").exists():
                recorded = checkpoint.read_config(folder).get("train")
                if recorded == json.loads(json.dumps(dataclasses.asdict(stage_args))):
                    print(f"reusing {checkpoint.resolve(folder)}: trained with these arguments")
                    reused.add(name)
                    return checkpoint.resolve(folder)
            return main(stage_args)
        return timed(name, run)

    pt = timed("pretrain", pretrained)
    sft_data = [str(data / "sft.jsonl")] + ([str(data / "tool_sft.jsonl")] if args.tool_use else [])
    sft_ckpt = stage("sft", sft, SFTArgs(base=str(pt), data=sft_data, out=str(out / "sft"),
                                         epochs=s.sft_epochs, seed=seed), ("pretrain",))

    def rank_sft_samples():
        """Simulated labellers rank the SFT model's own samples (InstructGPT's reward-model data), added to the
        bundled rankings. Kept as the faithful recipe: its measured gain is within evaluation noise
        (docs/decisions.md)."""
        from palmchat.feedback.simulated import rank_policy_samples
        from palmchat.train.rollout import load_prompt_messages

        model, _, _ = checkpoint.load_model(sft_ckpt)
        tokenizer = checkpoint.load_tokenizer(sft_ckpt)
        prompts = load_prompt_messages([str(data / "prompts_train.jsonl")], seed)  # whole conversations
        records = rank_policy_samples(model.eval(), tokenizer, prompts[:s.policy_rankings], k=4, seed=seed,
                                      world=World(seed=world_seed), dtype=autocast_dtype("auto", pick_device("auto")))
        write_jsonl(data / "sft_rankings.jsonl", records)

    timed("rank SFT samples", rank_sft_samples)
    rankings = [str(data / "rankings.jsonl"), str(data / "sft_rankings.jsonl")]
    rm_ckpt = stage("reward", reward, RewardArgs(base=str(sft_ckpt), data=rankings, out=str(out / "reward"),
                                                 epochs=s.reward_epochs, normalize=s.reward_normalize, seed=seed,
                                                 world_seed=world_seed),
                    ("sft",))
    # plain DPO (no RPO term) with beta 0.5: at 0.1 it drifted 5.7 nats from SFT and lost to it (docs/decisions.md)
    dpo_ckpt = stage("dpo", dpo, DPOArgs(base=str(sft_ckpt), data=[str(data / "rankings.jsonl")],
                                         out=str(out / "dpo"), epochs=s.dpo_epochs, beta=0.5, seed=seed), ("sft",))
    # a strong KL penalty: with a weak one the policy learns the reward model's taste for short polite template
    # answers and forgets facts (docs/decisions.md)
    ppo_ckpt = stage("ppo", ppo, PPOArgs(base=str(sft_ckpt), reward=str(rm_ckpt),
                                         prompts=[str(data / "prompts_train.jsonl")], out=str(out / "ppo"),
                                         iterations=s.ppo_iterations, kl_coef=s.ppo_kl_coef, seed=seed),
                     ("sft", "reward"))
    grpo_ckpt = stage("grpo", grpo, GRPOArgs(base=str(sft_ckpt), reward="verifier",
                                             prompts=[str(data / "prompts_train.jsonl")], out=str(out / "grpo"),
                                             iterations=s.grpo_iterations, seed=seed), ("sft",))
    rloo_ckpt = stage("rloo", rloo, RLOOArgs(base=str(sft_ckpt), reward=str(rm_ckpt),
                                             prompts=[str(data / "prompts_train.jsonl")], out=str(out / "rloo"),
                                             iterations=s.rloo_iterations, kl_coef=s.ppo_kl_coef, seed=seed),
                      ("sft", "reward"))
    # KTO on the bundled rankings read as unpaired thumbs: each ranking's best reply up, its worst down
    thumbs = [{"prompt": u.prompt_messages, "completion": u.completion, "label": u.desirable}
              for u in unpaired_from_rankings(load_rankings(data / "rankings.jsonl"))]
    write_jsonl(data / "thumbs.jsonl", thumbs)
    kto_ckpt = stage("kto", kto, KTOArgs(base=str(sft_ckpt), data=[str(data / "thumbs.jsonl")], out=str(out / "kto"),
                                         epochs=s.kto_epochs, seed=seed), ("sft",))
    aligned = {"ppo": ppo_ckpt, checkpoint.read_config(dpo_ckpt)["method"]: dpo_ckpt, "grpo": grpo_ckpt,
               "rloo": rloo_ckpt, "kto": kto_ckpt}

    def evaluate():
        """Every policy on the world's held-out prompts, each asked eval_samples times. The sampling seed is the
        world's, like its prompts: every training seed's models are measured on the same draws, so the spread
        between seeds is their training's and not the sampler's."""
        world = World(seed=world_seed)
        prompts = world.prompts(s.eval_prompts, "heldout")
        # the same questions asked as the last turn of a conversation (earlier turns about other tasks)
        later_turns = world.multi_turn_prompts(prompts, seed=world_seed, turns=(1, 1) if args.quick else (1, 3))
        asked, later_asked = prompts * s.eval_samples, later_turns * s.eval_samples
        sft_model, _, _ = checkpoint.load_model(sft_ckpt)
        tokenizer = checkpoint.load_tokenizer(sft_ckpt)
        reward_model, _ = load_reward_model(rm_ckpt, eot_id=tokenizer.chat_format.eot_id, tokenizer=tokenizer)
        reward_model.eval()
        tool_questions = [json.loads(line)["prompt"] for line in (data / "prompts_tools_heldout.jsonl").read_text()
                          .splitlines()] if args.tool_use else []
        stages = {}
        for name, ckpt in {"sft": sft_ckpt, **aligned}.items():
            model = sft_model if name == "sft" else checkpoint.load_model(ckpt)[0]
            baseline = None if name == "sft" else stages["sft"]["scores"]
            stages[name] = evaluate_policy(model.eval(), tokenizer, world, asked, reference=sft_model,
                                           reward_model=reward_model, baseline_scores=baseline, seed=world_seed)
            stages[name]["multi_turn_score"] = evaluate_policy(model, tokenizer, world, later_asked,
                                                               seed=world_seed)["score"]
            if args.tool_use:
                tools = evaluate_tool_use(model, tokenizer, world, tool_questions, seed=world_seed)
                stages[name]["tool_use"] = {k: v for k, v in tools.items() if k != "per_question"}
        stages["sft"]["win_rate"] = 0.5
        best = evaluate_best_of_n(sft_model, reward_model, tokenizer, world, prompts, ns=s.best_of, seed=world_seed)
        return stages, best

    stages, best = timed("evaluation", evaluate)
    rm_config = checkpoint.read_config(rm_ckpt)
    results = {
        "stages": stages,
        "reward_model": rm_config["eval"]["after"],
        "best_of_n": best,
        "plots": {"pretraining loss": "pretrain/loss.png", "SFT loss": "sft/loss.png",
                  "reward model": "reward/accuracy.png", "DPO": "dpo/loss.png", "PPO": "ppo/reward.png",
                  "GRPO": "grpo/reward.png", "RLOO": "rloo/reward.png", "KTO": "kto/loss.png"},
        "settings": {"seed": seed, "world_seed": world_seed, "quick": args.quick, **vars(s), "minutes": minutes,
                     "total_minutes": (time.time() - started) / 60,
                     "checkpoints": {k: str(v) for k, v in {"pretrain": pt, "sft": sft_ckpt, "reward": rm_ckpt,
                                                            **aligned}.items()}},
    }
    report = write_report(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return {"report": report, "results": results, "checkpoints": results["settings"]["checkpoints"]}


def main(args: DemoArgs) -> None:
    started = time.time()
    run = run_pipeline(args)
    stages = run["results"]["stages"]
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min")
    print("held-out verifier score: " + ", ".join(f"{k} {v['score']:.3f}" for k, v in stages.items()))
    if args.tool_use:
        print("tool use, right call / right answer: " + ", ".join(
            f"{k} {v['tool_use']['right_call']:.3f}/{v['tool_use']['right_answer']:.3f}" for k, v in stages.items()))
    print(f"report:      {run['report']}")
    for name, path in run["checkpoints"].items():
        print(f"{name + ':':12} {path}")
    print(f"try:         palmchat chat {run['checkpoints']['ppo']}")
    if args.serve:
        serve_with_feedback_round(args, run)


def serve_with_feedback_round(args: DemoArgs, run: dict) -> None:
    """Serve the aligned policy with the best held-out verifier score, run one round of the human-feedback
    loop against it (simulated labellers rank queued prompts on the label API; a reward model retrained on the
    demo's rankings plus theirs replaces the served one only if it ranks their held-out prompts better), add
    the round to report.md, then keep serving until Ctrl-C."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from palmchat.feedback.simulated import demo_round
    from palmchat.utils.atomic import atomic_write

    out, ckpts = Path(args.out), run["checkpoints"]
    stages = run["results"]["stages"]
    best = max((name for name in stages if name != "sft"), key=lambda name: stages[name]["score"])
    url = f"http://127.0.0.1:{args.port}"
    db = out / "palmchat.db"
    command = [sys.executable, "-m", "palmchat.cli", "serve", ckpts[best], "--reward-model", ckpts["reward"],
               "--db", str(db), "--port", str(args.port), "--model-name", best, "--log-level", "warning",
               "--no-auth",  # on 127.0.0.1, for the one person running the demo
               "--drain-timeout", "5"]  # terminate() below drains: requests running get 5 s of the 30 it waits
    server = subprocess.Popen(command)

    def stop(signum, frame):  # `kill` (SIGTERM) stops the demo as Ctrl-C does: the server never outlives it
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a script inherits SIGINT ignored, and Python keeps it so
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for _ in range(300):
            if server.poll() is not None:
                raise RuntimeError(f"the server exited (code {server.returncode}); is port {args.port} in use? "
                                   f"(--port picks another)")
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        print(f"\nfeedback round: simulated labellers rank prompts on {url}/label ...", flush=True)
        round_ = demo_round(url, db, out / "loop", base=ckpts["sft"], reward_model=ckpts["reward"], prompts=100,
                            labellers=3, extra_data=[str(out / "data" / "rankings.jsonl")], epochs=1.0,
                            policy=ckpts[best], seed=run["results"]["settings"]["world_seed"])
        previous = round_["previous_accuracy"]
        summary = (f"\n## One round of the human-feedback loop\n\n"
                   f"Served `{best}` (the best held-out verifier score) with the reward model on {url}. Three "
                   f"simulated labellers (the verifier plus noise) made {round_['labelled']['rankings']} rankings "
                   f"of queued candidates "
                   f"through the label API (agreement {round_['agreement'] or 0:.2f}); `palmchat loop` exported "
                   f"{round_['rankings']} merged rankings ({round_['train']} to train on, {round_['heldout']} held "
                   f"out), retrained the reward model on the demo's rankings plus these with LoRA, and measured "
                   f"held-out pairwise accuracy {round_['new_accuracy']:.3f} for the new model against "
                   f"{previous:.3f} for the served one: "
                   + ("**promoted** and hot-swapped into the server." if round_["promoted"]
                      else "**kept the served one** (the new one is not better).") + "\n")
        policy = round_.get("policy")
        if policy:
            measured = ", ".join(f"{name} {c['accuracy']:.3f}" for name, c in policy["candidates"].items())
            kto_note = f" skipped: {policy['skipped']['kto']}" if "kto" in policy["skipped"] else ""
            summary += (f"\nThe round also trained LoRA adapters on the served `{best}` from the same rankings (DPO) "
                        f"and thumbs (KTO{kto_note})"
                        f". Held-out preference accuracy of their implicit rewards (0.5 = the served policy): "
                        f"{measured}: " + ("**promoted** and hot-swapped into the server." if policy["promoted"]
                                            else "**kept the served policy**.") + "\n")
        report = Path(run["report"])
        atomic_write(report, report.read_text() + summary)
        print(summary.strip())
        print(f"\nserving {best} on {url}  (chat page: {url}/ , labelling: {url}/label , API: {url}/v1)")
        print("Ctrl-C to stop", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(30)
