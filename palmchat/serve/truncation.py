"""Fitting a conversation into the model's context: `truncation: "auto"` on /v1/responses (OpenAI's option) and,
as an opt-in extension, on /v1/chat/completions.

The oldest messages go first; the system messages at the start (and `instructions`) and the newest message are
always kept, and a cut only ever falls where a user message begins, so the kept part reads as a conversation. The
cut moves in steps of `quantum` tokens rather than one message per turn: consecutive turns of a long conversation
then keep the same first kept message, so the prefix cache still serves everything before the new turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from palmchat.tokenizer.chat_format import ChatFormat


@dataclass
class Fitted:
    prompt: list[int]
    dropped_messages: int = 0
    dropped_tokens: int = 0

    def details(self) -> dict | None:
        """What a response reports under `truncation_details` (None when nothing was left out)."""
        if not self.dropped_messages:
            return None
        return {"dropped_messages": self.dropped_messages, "dropped_tokens": self.dropped_tokens}


def drop_oldest_messages(prompt: list[int], chat_format: ChatFormat, budget: int, quantum: int) -> Fitted:
    """`prompt` (a chat rendering ending with the generation prompt) cut to at most `budget` tokens by leaving out
    its oldest messages as described above; when the kept ones alone are longer, every message that may go goes
    (the caller's context check then decides)."""
    excess = len(prompt) - budget
    starts = chat_format.message_starts(prompt)[:-1]  # the last one is the generation prompt
    first = next((k for k, (role, _) in enumerate(starts) if role != "system"), len(starts))
    if excess <= 0 or len(starts) - first < 2:  # fits, or nothing but the newest message after the system ones
        return Fitted(prompt)
    begin, newest = starts[first][1], starts[-1][1]
    # where the kept part may begin: a user message after the first droppable one, or the newest message
    cuts = [i for role, i in starts[first + 1:-1] if role == "user"] + [newest]
    target = min(math.ceil(excess / quantum) * quantum, newest - begin)
    cut = next(c for c in cuts if c - begin >= target)
    dropped = sum(1 for _, i in starts if begin <= i < cut)
    return Fitted(prompt[:begin] + prompt[cut:], dropped, cut - begin)
