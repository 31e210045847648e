"""The moderation classifier behind `POST /v1/moderations`: hashed n-grams, one logistic regression per category.

Model
-----
A text is NFKC-normalised and case-folded, split into words (``\\w+``), and turned into a *set* of hashed
features: word unigrams and bigrams, and character 3-5-grams of each word padded as ``<word>`` (fastText's
trick, so "shoplift" and "shoplifting" share most features). Each feature is hashed (CRC-32, stable across
processes) into one of ``buckets`` rows. A text's logits are ``bias + sum of its rows / sqrt(#features)``
(an ``embedding_bag`` whose width is the number of categories, i.e. multi-label logistic regression on the
L2-normalised binary feature vector), and each category's score is the sigmoid of its logit. Training is
Adam on sparse rows with the binary cross-entropy, from zero weights, so it is deterministic given the seed
(which only orders the batches); a few thousand examples train in seconds on one CPU thread.

A category is flagged when its score reaches its threshold, and a text is ``flagged`` when any category is.
Thresholds are 0.5, not tuned: on the bundled world's held-out texts the scores are far from 0.5 (see
below), and thresholds tuned on a small user file's validation slice would overfit it. A saved
``moderation.json`` may set any threshold by hand.

Terms
-----
A term list forces a category: a case-insensitive, whole-word match of the phrase (any whitespace between
its words) sets that category's score to 1.0 and flags it. The file format is one term per line,
``category<TAB>phrase``, or just ``phrase`` for ``DEFAULT_TERM_CATEGORY`` ("harassment": a blocklist is
usually of insults and slurs); blank lines and lines starting with ``#`` are skipped. From Python, set
``moderator.terms = [("illicit", "heist"), ...]`` or call ``moderator.add_terms(...)``.

Output
------
``ModerationResult.to_openai()`` is one entry of OpenAI's ``results`` list: ``flagged``, ``categories``
{name: bool} and ``category_scores`` {name: float in [0, 1]}. Every one of OpenAI's 13 category names is
present so that clients can index any of them; a category the classifier was not trained on (the bundled
world has 5) scores 0.0 unless a term names it. Categories from a user's data or terms that OpenAI does
not have are appended after them.

Files
-----
A moderator folder holds ``moderation.safetensors`` (``weight`` [buckets, categories], ``bias``) and
``moderation.json`` (feature settings, categories, thresholds, terms, and how it was trained). Both are
written atomically; nothing is unpickled on load, and a missing, corrupt or mismatched file is a
ValueError naming the file.

Training data
-------------
JSON Lines, one ``{"text": str, "categories": {name: bool}, "flagged": bool}`` per line, as
``World.moderation_examples`` produces; ``flagged`` is optional but must equal "any category is true" when
given, and a category missing from a record counts as false.

Trained on the bundled world's moderation examples and scored on its held-out ones (with hard negatives such
as "How can I beat my boss at chess?"; ``python -m palmchat.moderation.train --out runs/moderation`` runs it), the
classifier separates flagged from unflagged texts with scores far from 0.5 on either side, which is why the
thresholds stay at 0.5. The bundled world is templated, so this says the model separates *its* texts; on text
unlike the world's it is much weaker ("Please write a poem about spring" scores 0.57 harassment, from "write ...
about"; "You are a stupid idiot" scores under 0.1 everywhere). Train on your own data for real traffic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from palmchat.utils.atomic import atomic_path, atomic_write
from palmchat.utils.jsonl import DataError, json_type

__all__ = ["CONFIG_FILE", "DEFAULT_TERM_CATEGORY", "OPENAI_CATEGORIES", "WEIGHTS_FILE", "Features", "ModerationResult",
           "Moderator", "read_terms"]

# The names of OpenAI's omni-moderation model, in its order.
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
                     "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                     "sexual/minors", "violence", "violence/graphic")
DEFAULT_TERM_CATEGORY = "harassment"
WEIGHTS_FILE, CONFIG_FILE = "moderation.safetensors", "moderation.json"
FORMAT = "palmchat-moderation"
DEFAULT_THRESHOLD = 0.5


def normalize(text: str) -> str:
    """NFKC + case-folding, so that full-width letters, ligatures and capitals all match."""
    return unicodedata.normalize("NFKC", text).casefold()


# =============================================================================================
# Features
# =============================================================================================


def _bucket(feature: str, buckets: int) -> int:
    return zlib.crc32(feature.encode("utf-8")) % buckets


@functools.lru_cache(maxsize=1 << 16)
def _word_features(word: str, buckets: int, char_min: int, char_max: int) -> tuple[int, ...]:
    padded = f"<{word}>"
    grams = {padded[i:i + n] for n in range(char_min, char_max + 1) for i in range(len(padded) - n + 1)}
    grams.add(padded)  # words shorter than char_min still get a feature of their own
    return (_bucket("w\0" + word, buckets),) + tuple(_bucket("c\0" + g, buckets) for g in grams)


@dataclass(frozen=True)
class Features:
    """How a text becomes hashed feature ids (saved in moderation.json: the weights only fit these settings)."""

    buckets: int = 1 << 18
    word_ngrams: int = 2  # 1 = unigrams only, 2 = unigrams and bigrams
    char_min: int = 3
    char_max: int = 5

    def __post_init__(self):
        if self.buckets < 1 or self.word_ngrams < 1 or not 1 <= self.char_min <= self.char_max:
            raise ValueError(f"invalid feature settings: {self}")

    def ids(self, text: str) -> list[int]:
        """Sorted distinct bucket ids of `text` (a set: a feature counts once however often it occurs)."""
        words = re.findall(r"\w+", normalize(text))
        out: set[int] = set()
        for w in words:
            out.update(_word_features(w, self.buckets, self.char_min, self.char_max))
        for n in range(2, self.word_ngrams + 1):
            for i in range(len(words) - n + 1):
                out.add(_bucket(f"{n}\0" + " ".join(words[i:i + n]), self.buckets))
        return sorted(out)

    def bags(self, texts: Sequence[str] | Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`embedding_bag` inputs for texts (or precomputed id lists): flat ids, offsets, per-id weights
        1/sqrt(#ids) so that every text's feature vector has unit L2 norm."""
        id_lists = [self.ids(t) if isinstance(t, str) else t for t in texts]
        lengths = [len(ids) for ids in id_lists]
        flat = torch.tensor([i for ids in id_lists for i in ids], dtype=torch.long)
        offsets = torch.tensor([0] + lengths[:-1], dtype=torch.long).cumsum(0)
        weights = torch.tensor([1.0 / math.sqrt(n) for n in lengths for _ in range(n)], dtype=torch.float32)
        return flat, offsets, weights


# =============================================================================================
# Terms
# =============================================================================================


def _check_term(category: object, phrase: object) -> tuple[str, str]:
    """A clean (category, phrase) pair; ValueError (without a location) if unusable."""
    if not isinstance(category, str) or not category.strip() or any(c in category for c in "\t\r\n"):
        raise ValueError(f"term category must be a non-empty one-line string, got {category!r}")
    if not isinstance(phrase, str) or not re.search(r"\w", phrase):
        raise ValueError(f"term phrase must be a string with at least one letter or digit, got {phrase!r}")
    return category.strip(), " ".join(normalize(phrase).split())


def _term_pattern(phrases: Iterable[str]) -> re.Pattern:
    # (?<!\w)/(?!\w) rather than \b, so phrases that start or end with punctuation ("c++") match whole too
    alternatives = sorted({r"\s+".join(re.escape(w) for w in p.split()) for p in phrases}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


def read_terms(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A term file -> [(category, phrase)]; DataError ``FILE:LINE: PROBLEM`` for a bad line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"terms file not found: {p}" if not p.exists() else f"not a file: {p}")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 (byte {e.start + 1})") from None
    terms = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) > 2:
            raise DataError(f"{p}:{lineno}: expected 'category<TAB>phrase' or 'phrase', found {len(parts) - 1} tabs")
        category, phrase = parts if len(parts) == 2 else (DEFAULT_TERM_CATEGORY, parts[0])
        try:
            terms.append(_check_term(category, phrase))
        except ValueError as e:
            raise DataError(f"{p}:{lineno}: {e}") from None
    return terms


# =============================================================================================
# The moderator
# =============================================================================================


@dataclass
class ModerationResult:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]

    def to_openai(self) -> dict:
        """One entry of the `results` list of OpenAI's moderation response."""
        return {"flagged": self.flagged, "categories": dict(self.categories),
                "category_scores": dict(self.category_scores)}


class Moderator:
    """Scores texts per category; see the module docstring. Build with `Moderator.train` or `Moderator.load`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, categories: Sequence[str],
                 features: Features = Features(), thresholds: dict[str, float] | None = None,
                 terms: Iterable[tuple[str, str]] = (), training: dict | None = None):
        categories = list(categories)
        if weight.shape != (features.buckets, len(categories)) or bias.shape != (len(categories),):
            raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit "
                             f"{features.buckets} buckets x {len(categories)} categories")
        self.weight, self.bias = weight.detach().float(), bias.detach().float()
        self.categories, self.features = categories, features
        self.thresholds = {c: DEFAULT_THRESHOLD for c in categories} | (thresholds or {})
        self.training = training or {}  # how it was trained and measured; informational
        self.terms = list(terms)

    @property
    def terms(self) -> list[tuple[str, str]]:
        """(category, phrase) pairs; assigning a new list recompiles the matchers."""
        return list(self._terms)

    @terms.setter
    def terms(self, terms: Iterable[tuple[str, str]]) -> None:
        self._terms = [_check_term(c, p) for c, p in terms]
        by_category: dict[str, list[str]] = {}
        for c, p in self._terms:
            by_category.setdefault(c, []).append(p)
        self._term_patterns = {c: _term_pattern(ps) for c, ps in by_category.items()}

    def add_terms(self, phrases: str | Iterable[str], category: str = DEFAULT_TERM_CATEGORY) -> None:
        phrases = [phrases] if isinstance(phrases, str) else list(phrases)
        self.terms = self._terms + [(category, p) for p in phrases]

    def copy(self) -> Moderator:
        """A moderator sharing the (never modified) weights, with its own terms and thresholds."""
        return Moderator(self.weight, self.bias, self.categories, self.features, dict(self.thresholds),
                         self._terms, dict(self.training))

    @property
    def output_categories(self) -> list[str]:
        extra = [c for c in self.categories + [c for c, _ in self._terms] if c not in OPENAI_CATEGORIES]
        return list(OPENAI_CATEGORIES) + list(dict.fromkeys(extra))

    def scores(self, texts: Sequence[str]) -> torch.Tensor:
        """Classifier probabilities (len(texts), len(self.categories)), terms not applied."""
        return torch.sigmoid(_logits(self.weight, self.bias, *self.features.bags(texts)))

    def moderate(self, texts: str | Sequence[str]) -> list[ModerationResult]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("moderate() takes a string or a list of strings")
        if not texts:
            return []
        with torch.no_grad():
            probs = self.scores(texts).tolist()
        names = self.output_categories
        results = []
        for text, row in zip(texts, probs):
            scores = dict.fromkeys(names, 0.0) | dict(zip(self.categories, row))
            flags = dict.fromkeys(names, False) | {c: scores[c] >= self.thresholds[c] for c in self.categories}
            normalized = normalize(text) if self._term_patterns else ""
            for category, pattern in self._term_patterns.items():
                if pattern.search(normalized):
                    scores[category], flags[category] = 1.0, True
            results.append(ModerationResult(any(flags.values()), flags, scores))
        return results

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, examples: Sequence[dict], terms: Iterable[tuple[str, str]] = (), seed: int = 0,
              epochs: int = 5, lr: float = 0.1, batch_size: int = 64, features: Features = Features()) -> Moderator:
        """Fit on ``{"text", "categories"}`` records (see `load_examples`); the categories are the records' keys
        in order of first appearance."""
        if not examples:
            raise ValueError("no moderation examples to train on")
        categories = list(dict.fromkeys(c for e in examples for c in e["categories"]))
        if not categories:
            raise ValueError("the moderation examples name no categories")
        id_lists = [features.ids(e["text"]) for e in examples]
        labels = torch.tensor([[float(bool(e["categories"].get(c, False))) for c in categories] for e in examples])
        weight = torch.zeros(features.buckets, len(categories), requires_grad=True)
        rate = labels.mean(0).clamp(1e-3, 1 - 1e-3)
        bias = torch.log(rate / (1 - rate)).requires_grad_()  # start from the base rates
        # A batch touches a few thousand of the 2**18 rows: sparse gradients and SparseAdam update only those,
        # several times faster than dense AdamW. No weight decay (SparseAdam has none): few epochs, small weights.
        optimizers = [torch.optim.SparseAdam([weight], lr=lr), torch.optim.Adam([bias], lr=lr)]
        order, rng = list(range(len(examples))), random.Random(seed)
        for _ in range(epochs):
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                logits = _logits(weight, bias, *features.bags([id_lists[i] for i in batch]), sparse=True)
                F.binary_cross_entropy_with_logits(logits, labels[batch]).backward()
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        training = {"examples": len(examples), "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size}
        return cls(weight, bias, categories, features, terms=terms, training=training)

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp))
        config = {"format": FORMAT, "version": 1, "features": dataclasses.asdict(self.features),
                  "categories": self.categories, "thresholds": self.thresholds,
                  "terms": [list(t) for t in self._terms], "training": self.training}
        atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Moderator:
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not folder.is_dir():
            raise ValueError(f"moderator folder not found: {folder}")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{path}: missing (not a moderator folder?)")
        config = _read_config(config_path)
        try:
            tensors = load_file(weights_path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{weights_path}: unreadable safetensors file ({e})") from None
        features, categories = config["features"], config["categories"]
        expected = {"weight": (features.buckets, len(categories)), "bias": (len(categories),)}
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"{weights_path}: no tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, but {CONFIG_FILE} "
                                 f"({features.buckets} buckets, {len(categories)} categories) needs {shape}")
            if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
                raise ValueError(f"{weights_path}: {name} is not all finite floats")
        return cls(tensors["weight"], tensors["bias"], categories, features, config["thresholds"], config["terms"],
                   config["training"])


def _logits(weight, bias, ids, offsets, per_id_weights, sparse: bool = False) -> torch.Tensor:
    return F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=per_id_weights, sparse=sparse) + bias


def _read_config(path: Path) -> dict:
    """moderation.json, validated: every problem names the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {problem}")

    need(isinstance(raw, dict) and raw.get("format") == FORMAT,
         f"not a moderator config (\"format\" is not {FORMAT!r})")
    need(raw.get("version") == 1, f"unsupported version {raw.get('version')!r} (this code reads 1)")
    for key, kind in (("features", dict), ("categories", list), ("thresholds", dict), ("terms", list)):
        need(isinstance(raw.get(key), kind), f"\"{key}\" must be {'an object' if kind is dict else 'a list'}, "
                                             f"got {json_type(raw.get(key))}")
    try:
        features = Features(**raw["features"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad \"features\" ({e})") from None
    need(all(isinstance(v, int) and not isinstance(v, bool) for v in dataclasses.asdict(features).values()),
         "\"features\" values must be integers")
    categories = raw["categories"]
    need(len(categories) > 0 and all(isinstance(c, str) and c for c in categories)
         and len(set(categories)) == len(categories), "\"categories\" must be distinct non-empty strings")
    for c, t in raw["thresholds"].items():
        need(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0,
             f"threshold of {c!r} must be a number in [0, 1], got {t!r}")
    need(all(isinstance(t, list) and len(t) == 2 for t in raw["terms"]), "\"terms\" must be [category, phrase] pairs")
    try:
        terms = [_check_term(c, p) for c, p in raw["terms"]]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return {"features": features, "categories": categories, "thresholds": dict(raw["thresholds"]), "terms": terms,
            "training": raw.get("training") if isinstance(raw.get("training"), dict) else {}}
