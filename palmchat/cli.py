"""The `palmchat` command. Each stage is a plain script with a dataclass of arguments; this file only
maps sub-commands to them and turns a user's mistake into a one-line error instead of a traceback."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from palmchat.utils.args import add_dataclass_arguments, arg, from_namespace


@dataclass
class GenerateArgs:
    """Sample from a checkpoint."""

    checkpoint: str = arg("", "checkpoint folder (or a run folder with a 'latest' file)", positional=True)
    prompt: str = arg("", "the prompt")
    chat: bool | None = arg(None, "wrap the prompt as a user turn (default: yes unless the checkpoint is "
                                  "pretrain-only)")
    max_new_tokens: int = arg(128, "tokens to generate at most")
    temperature: float = arg(0.8, "sampling temperature; 0 = greedy")
    top_k: int = arg(0, "keep the k most likely tokens; 0 = off")
    top_p: float = arg(0.95, "nucleus sampling mass; 1 = off")
    seed: int | None = arg(None, "sampling seed")
    stop: list[str] = arg([], "stop sequences (text)")
    num_samples: int = arg(1, "independent samples, generated as one batch")
    dtype: str = arg("auto", "decode precision: auto, bf16 or fp32", choices=["auto", "bf16", "fp32"])
    quantize: str = arg("none", "weights for decoding: none, int8 (a scale per row: half of bf16's bytes) or "
                       "int4 (llama.cpp's Q4_0: a scale per 32, ~0.28x bf16's bytes)", choices=["none", "int8", "int4"])


def _load_for_inference(path: str, dtype_setting: str, quantize: str = "none"):
    from palmchat import checkpoint
    from palmchat.inference.engine import Engine
    from palmchat.utils.device import decode_dtype

    model, config, ckpt = checkpoint.load_model(path)
    model.eval()
    tokenizer = checkpoint.load_tokenizer(ckpt)
    return Engine(model, dtype=decode_dtype(dtype_setting), quantize=None if quantize == "none" else quantize), \
        tokenizer, config


def generate_main(args: GenerateArgs) -> None:
    from palmchat.inference.engine import SamplingParams
    from palmchat.tokenizer.chat_format import conversation_start

    if not args.prompt:
        raise ValueError("--prompt is required")
    engine, tokenizer, config = _load_for_inference(args.checkpoint, args.dtype, args.quantize)
    chat = args.chat if args.chat is not None else config.get("stage") != "pretrain"
    if chat:
        prompt = tokenizer.chat_format.render_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = conversation_start(tokenizer.chat_format) + tokenizer.encode(args.prompt)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_token_ids=tokenizer.chat_format.reply_stop_ids,
                            stop_sequences=tuple(tuple(tokenizer.encode(s)) for s in args.stop))
    params = engine.clamp_max_new_tokens(prompt, params)  # a prompt longer than the context is an error
    completions = engine.generate([prompt] * args.num_samples, params)
    for i, c in enumerate(completions):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ({c.finish_reason}) ---")
        print((args.prompt if not chat else "") + tokenizer.decode(c.tokens))


@dataclass
class ChatArgs:
    """Chat with a checkpoint in the terminal. Commands: /reset, /system TEXT, /quit."""

    checkpoint: str = arg("", "checkpoint folder", positional=True)
    system: str = arg("", "system prompt")
    max_new_tokens: int = arg(256, "tokens per reply at most")
    temperature: float = arg(0.7, "sampling temperature; 0 = greedy")
    top_p: float = arg(0.95, "nucleus sampling mass")
    dtype: str = arg("auto", "decode precision: auto, bf16 or fp32", choices=["auto", "bf16", "fp32"])
    quantize: str = arg("none", "weights for decoding: none, int8 (a scale per row: half of bf16's bytes) or "
                       "int4 (llama.cpp's Q4_0: a scale per 32, ~0.28x bf16's bytes)", choices=["none", "int8", "int4"])


def chat_main(args: ChatArgs) -> None:
    from palmchat.inference.engine import SamplingParams
    from palmchat.serve.truncation import drop_oldest_messages

    engine, tokenizer, _ = _load_for_inference(args.checkpoint, args.dtype, args.quantize)
    chat_format = tokenizer.chat_format
    context = engine.model.config.max_seq_len

    def fresh(system: str) -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    system = args.system
    messages = fresh(system)  # the conversation so far, rendered whole at every turn (any chat template works)
    print("palmchat: type a message, /reset, /system TEXT or /quit")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset" or line.startswith("/system"):
            system = line[len("/system"):].strip() if line.startswith("/system") else system
            messages = fresh(system)
            print("(conversation reset)")
            continue
        prompt = chat_format.render_prompt([*messages, {"role": "user", "content": line}])
        # as the server's truncation "auto": the oldest messages go when the reply would not have room
        fitted = drop_oldest_messages(prompt, chat_format, context - min(args.max_new_tokens, context // 4),
                                      quantum=max(1, context // 8))
        if fitted.dropped_messages:
            print(f"(the {fitted.dropped_messages} oldest messages no longer fit the {context}-token context: "
                  "this reply is written without them)")
        room = context - len(fitted.prompt)
        if room < 8:
            print(f"(the message and system prompt fill the {context}-token context: shorten it, or /reset)")
            continue
        params = SamplingParams(max_new_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                                top_p=args.top_p, stop_token_ids=chat_format.reply_stop_ids)
        print("assistant> ", end="", flush=True)
        reply: list[int] = []
        try:
            for step in engine.stream([fitted.prompt], params):
                for _, token, _ in step:
                    if token not in chat_format.reply_stop_ids:
                        reply.append(token)
                        print(tokenizer.decode([token]), end="", flush=True)
        except KeyboardInterrupt:
            pass
        print()
        messages += [{"role": "user", "content": line},
                     {"role": "assistant", "content": chat_format.decode_reply(reply)}]


@dataclass
class MergeArgs:
    """Fold a LoRA adapter checkpoint into its base weights and save a full checkpoint."""

    checkpoint: str = arg("", "an adapter checkpoint folder (adapter.safetensors + config.json naming its base)",
                          positional=True)
    out: str = arg("", "output folder for the merged checkpoint")


def merge_main(args: MergeArgs) -> None:
    from palmchat import checkpoint

    if not args.out:
        raise ValueError("--out is required")
    ckpt = checkpoint.resolve(args.checkpoint)
    if not (ckpt / checkpoint.ADAPTER_FILE).is_file():
        raise ValueError(f"{ckpt} holds full weights already (no {checkpoint.ADAPTER_FILE})")
    model, config, _ = checkpoint.load_model(ckpt, merge=True)
    config = {k: v for k, v in config.items() if k not in ("lora", "base", "step")}
    config["merged_from"] = str(ckpt)
    final = checkpoint.save_checkpoint(args.out, 0, model, config, ckpt / checkpoint.TOKENIZER_FILE)
    print(f"merged: {final}")


@dataclass
class ImportHFArgs:
    """Convert a Hugging Face model folder (or a repo id in the local cache) into a native palmchat checkpoint, or a
    PEFT LoRA adapter folder into a palmchat adapter checkpoint on its base."""

    model: str = arg("", "a Hugging Face model folder (config.json, *.safetensors, tokenizer files), a repo id, or "
                         "a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)", positional=True)
    out: str = arg("", "output folder for the checkpoint")
    base: str = arg("", "a PEFT adapter's base model (default: its adapter_config.json's base_model_name_or_path)")


def import_hf_main(args: ImportHFArgs) -> None:
    from pathlib import Path

    from palmchat import checkpoint
    from palmchat.checkpoint.peft import is_peft_folder, native_lora, read_peft_config
    from palmchat.model.lora import add_lora, load_adapter_state_dict

    if not args.out:
        raise ValueError("--out is required")
    if is_peft_folder(args.model):
        base = args.base or read_peft_config(args.model).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"--base is required: {args.model}'s adapter_config.json names no base model")
        base = checkpoint.resolve(base)
        model, config, _ = checkpoint.load_model(base)
        if "hf" not in config:
            raise ValueError(f"{base}: a PEFT adapter's base must be a Hugging Face model folder")
        tensors, lora = native_lora(args.model, model.config, config["hf"]["family"])
        add_lora(model, "adapter", rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"])
        load_adapter_state_dict(model, "adapter", tensors)
        config = {"model": model.config.to_dict(), "stage": "import", "imported_from": str(Path(args.model).resolve()),
                  "base": str(base.resolve()), "lora": {"name": "adapter", **lora}}
        final = checkpoint.save_checkpoint(args.out, 0, model, config, base / checkpoint.TOKENIZER_FILE,
                                           adapter="adapter")
        print(f"imported PEFT adapter (rank {lora['rank']} on palmchat's fused layers): {final}")
        return
    folder = checkpoint.resolve(args.model)
    model, config, _ = checkpoint.load_model(folder)
    config = {**config, "stage": "import", "imported_from": str(folder)}
    final = checkpoint.save_checkpoint(args.out, 0, model, config, folder / checkpoint.TOKENIZER_FILE)
    print(f"imported {config['hf']['family']} model: {final}")


@dataclass
class ExportHFArgs:
    """Write a checkpoint as a Hugging Face model folder that `transformers` loads with the same logits, or a LoRA
    adapter checkpoint as a PEFT adapter folder."""

    checkpoint: str = arg("", "a checkpoint folder (a LoRA adapter is merged in unless --peft)", positional=True)
    out: str = arg("", "output folder")
    peft: bool = arg(False, "write the adapter alone as a PEFT folder (for peft.PeftModel on the base it names)")


def export_hf_main(args: ExportHFArgs) -> None:
    from palmchat import checkpoint
    from palmchat.checkpoint.hf import export_hf, hf_family_for

    if not args.out:
        raise ValueError("--out is required")
    if args.peft:
        from palmchat.checkpoint.peft import export_peft
        from palmchat.model.config import ModelConfig
        from palmchat.model.lora import read_adapter_file

        ckpt = checkpoint.resolve(args.checkpoint)
        config = checkpoint.read_config(ckpt)
        if not (ckpt / checkpoint.ADAPTER_FILE).is_file():
            raise ValueError(f"{ckpt} holds full weights, not a LoRA adapter: export it without --peft")
        base = checkpoint.resolve(config["base"])
        if (base / checkpoint.ADAPTER_FILE).is_file():
            raise ValueError(f"{ckpt}'s base {base} is itself an adapter: merge it first (palmchat merge-lora), "
                             f"a PEFT adapter applies to one base model")
        cfg = ModelConfig.from_dict(config["model"])
        family = checkpoint.read_config(base).get("hf", {}).get("family") or hf_family_for(cfg)
        out = export_peft(read_adapter_file(ckpt)[0], config["lora"], cfg, family, args.out, base_model=str(base))
        print(f"exported PEFT adapter for {base}: {out}")
        return
    model, config, ckpt = checkpoint.load_model(args.checkpoint, merge=True)
    out = export_hf(model, args.out, family=config.get("hf", {}).get("family"),
                    tokenizer=checkpoint.load_tokenizer(ckpt))
    print(f"exported: {out}")


def _commands():
    """Sub-command name -> (argument dataclass, function), or -> {name: (...)} for a group (`palmchat keys create`).
    Only argument dataclasses are imported here: the serving stack (FastAPI) loads when `serve` runs."""
    from palmchat.checkpoint.gguf_export import ExportGGUFArgs
    from palmchat.checkpoint.gguf_export import export_main as export_gguf_main
    from palmchat.data.tools import DataConvertArgs, DataInspectArgs, convert_main, inspect_main
    from palmchat.demo import DemoArgs
    from palmchat.demo import main as demo_main
    from palmchat.eval.judge import EvalArgs
    from palmchat.eval.judge import main as eval_main
    from palmchat.feedback.exchange import FeedbackExportArgs, FeedbackImportArgs
    from palmchat.feedback.round import LoopArgs
    from palmchat.moderation.train import ModerationTrainArgs
    from palmchat.serve import keys
    from palmchat.serve.run import ServeArgs
    from palmchat.train.dpo import DPOArgs
    from palmchat.train.dpo import main as dpo_main
    from palmchat.train.grpo import GRPOArgs
    from palmchat.train.grpo import main as grpo_main
    from palmchat.train.kto import KTOArgs
    from palmchat.train.kto import main as kto_main
    from palmchat.train.ppo import PPOArgs
    from palmchat.train.ppo import main as ppo_main
    from palmchat.train.pretrain import PretrainArgs
    from palmchat.train.pretrain import main as pretrain_main
    from palmchat.train.reward import RewardArgs
    from palmchat.train.reward import main as reward_main
    from palmchat.train.rloo import RLOOArgs
    from palmchat.train.rloo import main as rloo_main
    from palmchat.train.sft import SFTArgs
    from palmchat.train.sft import main as sft_main

    def serve_main(args):
        from palmchat.serve.run import main

        main(args)

    def moderation_train_main(args):
        from palmchat.moderation.train import train_main

        train_main(args)

    def feedback_import_main(args):
        from palmchat.feedback.exchange import import_main

        import_main(args)

    def feedback_export_main(args):
        from palmchat.feedback.exchange import export_main

        export_main(args)

    def loop_main(args):
        from palmchat.feedback.round import main

        main(args)

    return {
        "demo": (DemoArgs, demo_main),
        "pretrain": (PretrainArgs, pretrain_main),
        "sft": (SFTArgs, sft_main),
        "reward": (RewardArgs, reward_main),
        "dpo": (DPOArgs, dpo_main),
        "kto": (KTOArgs, kto_main),
        "ppo": (PPOArgs, ppo_main),
        "grpo": (GRPOArgs, grpo_main),
        "rloo": (RLOOArgs, rloo_main),
        "merge-lora": (MergeArgs, merge_main),
        "import-hf": (ImportHFArgs, import_hf_main),
        "export-hf": (ExportHFArgs, export_hf_main),
        "export-gguf": (ExportGGUFArgs, export_gguf_main),
        "generate": (GenerateArgs, generate_main),
        "chat": (ChatArgs, chat_main),
        "serve": (ServeArgs, serve_main),
        "keys": {"create": (keys.KeysCreateArgs, keys.create_main), "list": (keys.KeysListArgs, keys.list_main),
                 "revoke": (keys.KeysRevokeArgs, keys.revoke_main)},
        "moderation": {"train": (ModerationTrainArgs, moderation_train_main)},
        "feedback": {"import": (FeedbackImportArgs, feedback_import_main),
                     "export": (FeedbackExportArgs, feedback_export_main)},
        "loop": (LoopArgs, loop_main),
        "data": {"inspect": (DataInspectArgs, inspect_main), "convert": (DataConvertArgs, convert_main)},
        "eval": (EvalArgs, eval_main),
    }


TRAINING_COMMANDS = {"demo", "pretrain", "sft", "reward", "dpo", "kto", "ppo", "grpo", "rloo", "loop"}


def main(argv: list[str] | None = None) -> int:
    from palmchat.utils import cpu

    try:
        cpu.cpu_isa()  # a bad PALMCHAT_MAX_CPU_ISA is one line here, not a traceback from an import below
    except ValueError as e:
        print(f"palmchat: error: {e}", file=sys.stderr)
        return 2
    commands = _commands()
    parser = argparse.ArgumentParser(prog="palmchat", description="Train, align and serve a PaLM-style assistant.")
    sub = parser.add_subparsers(dest="command", required=True)

    def first_line(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    for name, entry in commands.items():
        if isinstance(entry, dict):
            group = sub.add_parser(name, help=f"{name}: " + ", ".join(entry))
            inner = group.add_subparsers(dest="action", required=True)
            for action, (cls, _) in entry.items():
                action_parser = inner.add_parser(action, help=first_line(cls), description=first_line(cls))
                add_dataclass_arguments(action_parser, cls)
        else:
            add_dataclass_arguments(sub.add_parser(name, help=first_line(entry[0]), description=first_line(entry[0])),
                                    entry[0])
    namespace = parser.parse_args(argv)
    entry = commands[namespace.command]
    cls, fn = entry[namespace.action] if isinstance(entry, dict) else entry
    name = namespace.command + (f" {namespace.action}" if isinstance(entry, dict) else "")
    if namespace.command in TRAINING_COMMANDS:
        from palmchat.utils.device import keep_freed_memory

        keep_freed_memory()
    try:
        fn(from_namespace(cls, namespace))
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"palmchat {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
