"""The bundled world's data sets, as each training stage takes them when it is given no --data: the one place the
trainers take their defaults from."""

from __future__ import annotations

from palmchat.data.chat import Ranking, parse_ranking
from palmchat.world.synthetic import MULTI_TURN, World


def bundled_documents(seed: int) -> list[str]:
    """Pretraining text."""
    return World(seed=seed).pretraining_documents()


def bundled_conversations(seed: int, n: int = 4000) -> list[list[dict]]:
    """SFT demonstrations, as message lists (a fraction ``MULTI_TURN`` of them multi-turn)."""
    return [c["messages"] for c in World(seed=seed).sft_conversations(n)]


def bundled_rankings(seed: int, n: int = 3000) -> list[Ranking]:
    """Simulated labellers' rankings, for the reward model and DPO (a fraction ``MULTI_TURN`` of them with a
    conversation as the prompt)."""
    return [parse_ranking(r) for r in World(seed=seed).ranking_examples(n)]


def bundled_prompts(seed: int, n: int = 2000, split: str = "train") -> list[list[dict]]:
    """Prompts for PPO and GRPO rollouts: message lists ending with a user turn, a fraction ``MULTI_TURN`` of them
    conversations whose last turn may refer back to an earlier one (``World.conversation_prompts``)."""
    return World(seed=seed).conversation_prompts(n, split, multi_turn=MULTI_TURN)
