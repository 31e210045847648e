"""Prefix KV cache: the keys and values of token sequences computed before, kept so that a request whose prompt
starts with the same tokens (the same system prompt, the earlier turns of its conversation, the n samples of one
prompt) copies them instead of recomputing them. The idea of vLLM's automatic prefix caching and SGLang's
RadixAttention (Zheng et al. 2023, https://arxiv.org/abs/2312.07104), kept simple:

- an entry is one token sequence and its K/V, (L, Hkv, n, D) each; a prompt may reuse the first m tokens of any
  entry it agrees with on those m tokens, not only of entries that are whole prefixes of it;
- lookup scans the entries (a vectorised compare per entry): fine for the hundreds of entries a memory budget
  of ~100k tokens holds; a radix tree would be the next step for many thousands;
- the budget is in tokens; the least recently used entries are evicted first; an entry that is a prefix of a
  new one is dropped, since the new one serves every request the old one could;
- entries are namespaced by a key: the LoRA adapter the K/V were computed with (other weights, other K/V) and the
  requester's cache salt (the server's API key: one key never reuses, so never learns of, another's prompts).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

import torch


@dataclass
class CachedPrefix:
    key: object  # hashable: (adapter, cache salt)
    tokens: torch.Tensor  # (n,) long
    k: torch.Tensor  # (L, Hkv, n, D)
    v: torch.Tensor  # (L, Hkv, n, D)


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    return n if bool(same.all()) else int(same.long().argmin())  # index of the first mismatch


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, CachedPrefix] = OrderedDict()  # least recently used first
        self.tokens = 0
        self._ids = count()

    def lookup(self, key: object, prompt: torch.Tensor, limit: int) -> tuple[CachedPrefix | None, int]:
        """The entry sharing the longest prefix with `prompt` (at most `limit` tokens), and that length."""
        best_id, best_len = None, 0
        for entry_id, entry in self.entries.items():
            if entry.key == key and min(len(entry.tokens), limit) > best_len:
                m = common_prefix_length(entry.tokens, prompt[:limit])
                if m > best_len:
                    best_id, best_len = entry_id, m
        if best_id is None:
            return None, 0
        self.entries.move_to_end(best_id)
        return self.entries[best_id], best_len

    def insert(self, key: object, tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep `tokens` with their K/V, (L, Hkv, n, D); the tensors are stored as given (pass copies)."""
        n = len(tokens)
        if n == 0 or n > self.max_tokens:
            return
        for entry_id, entry in list(self.entries.items()):
            if entry.key != key:
                continue
            m = common_prefix_length(entry.tokens, tokens)
            if m == n:  # already held by a longer (or equal) entry
                self.entries.move_to_end(entry_id)
                return
            if m == len(entry.tokens):  # the new entry extends this one
                del self.entries[entry_id]
                self.tokens -= m
        self.entries[next(self._ids)] = CachedPrefix(key, tokens, k, v)
        self.tokens += n
        while self.tokens > self.max_tokens:
            _, evicted = self.entries.popitem(last=False)
            self.tokens -= len(evicted.tokens)

    def clear(self) -> None:
        self.entries.clear()
        self.tokens = 0

    def drop(self, where) -> None:
        """Forget the entries whose key `where(key)` holds (e.g. those of an adapter that left the model)."""
        for entry_id, entry in list(self.entries.items()):
            if where(entry.key):
                del self.entries[entry_id]
                self.tokens -= len(entry.tokens)
