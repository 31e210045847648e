"""A Hugging Face tokenizer folder and its Jinja chat template behind palmchat's :class:`ChatFormat`.

The folder holds (as ``transformers`` writes and reads it)::

    tokenizer.json                     the tokenizer itself, read with `tokenizers`
    tokenizer_config.json              bos/eos/pad/unk tokens (strings or AddedToken dicts), add_bos_token, and the
                                       chat template: a string, or a list of {"name", "template"}
    chat_template.jinja                the default template as transformers 5 writes it (wins over the config's)
    additional_chat_templates/*.jinja  named templates ("tool_use" is chosen when tools are passed)
    special_tokens_map.json            older folders' special tokens (tokenizer_config.json's win)
    generation_config.json             eos_token_id, an int or a list: every one of them ends a reply

tokenizer.json is read as written, except for the Llama tokenizer classes, whose pre-tokenization transformers 5
builds itself (see :func:`_pretokenize_as_transformers`).  transformers 5 rebuilds other classes too; Qwen2's
(Qwen2, 2.5, 3) builds what Qwen's tokenizer.json holds (the tests check it), the others (Gemma's, T5's...) are not
checked against it here.

:class:`HFTokenizer` has the interface of palmchat's own ``Tokenizer`` (encode, encode_batch, decode, vocab_size,
sha256, path, save, load, chat_format).  Its ``encode`` never produces a special token's id from text, the same
injection defence as bpe.py: a user typing ``<|im_end|>`` gets ordinary tokens.

:class:`TemplateChatFormat` renders a conversation the way ``transformers``' ``apply_chat_template(...,
sanitize_control_tokens=True)`` does: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks,
``raise_exception``, ``tojson``, ``strftime_now``, loop controls, the ``{% generation %}`` block), the same variables
(messages, tools, documents, add_generation_prompt and the special tokens), and the rendered text tokenized with the
special tokens the template writes parsed as specials and no bos added.  Control tokens (the special tokens and the
added tokens the template's literals contain) that appear in messages or tools are encoded as ordinary text, so no
message can forge a turn boundary; for a conversation without them this is exactly plain ``apply_chat_template``.

What the format needs to know beyond the template it learns at load by rendering probe conversations (alternating
user/assistant turns, with and without a system message):

* ``generation_prompt``: the ids ``add_generation_prompt=True`` appends to a conversation ending with a user turn;
* ``eot_id``: the first special token of what two probe replies with different contents end with (``<|im_end|>``
  for ChatML and Qwen, ``<|eot_id|>`` for Llama 3, ``</s>`` for Mistral), else the tokenizer's eos token;
* ``reply_end``: the ids from that ``eot_id`` to the end of the reply's turn (ChatML's ``<|im_end|>`` then ``\\n``);
* ``bos_id``: the tokenizer's bos token when the template writes ``bos_token`` and every rendering starts with it,
  else None (ChatML has none);
* ``prefix_stable``: whether every rendering's ids start with the ids of the conversation one message shorter, and
  every assistant turn's with the generation prompt before it.  Templates that rewrite earlier turns (Qwen3's
  dropping the reasoning of earlier replies, one putting the system prompt in the last user turn) are not;
* ``tool_syntax``: how the template writes a tool call (palmchat/tokenizer/tools.py: Hermes tags, Llama 3.1's JSON),
  None when it renders none;
* the role markers ``message_starts`` looks for: the ids that open every turn of a role, kept when they hold a
  special token (which text never produces, so they cannot occur inside a message).

Loss masks: where the template has ``{% generation %}`` blocks, the tokens that overlap the text those blocks
rendered (transformers' ``return_assistant_tokens_mask``).  Otherwise a reply's tokens start where the rendering of
the conversation before it plus the generation prompt ends in the whole rendering (what the model generates after
that prompt, leading space included), and end with the first ``eot_id`` after that.  Where the template renders that
prompt differently inside the whole conversation, the reply's start is found by rendering the conversation with the
reply's content replaced by a marker.

This module imports neither torch nor the rest of palmchat; jinja2 is imported when a template is compiled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, pre_tokenizers

from palmchat.tokenizer.bpe import encode_plain
from palmchat.tokenizer.tools import call_syntax, check_tools
from palmchat.utils.atomic import atomic_write

__all__ = [
    "TOKENIZER_FILE",
    "CONFIG_FILE",
    "TEMPLATE_FILE",
    "TEMPLATES_DIR",
    "SPECIAL_TOKENS_MAP_FILE",
    "GENERATION_CONFIG_FILE",
    "COMPANION_FILES",
    "HFTokenizer",
    "TemplateChatFormat",
    "is_hf_tokenizer_folder",
]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATES_DIR = "additional_chat_templates"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# what a Hugging Face tokenizer folder holds beside tokenizer.json (all of it is part of the tokenizer's sha256): a
# checkpoint trained from such a folder carries every one that exists
COMPANION_FILES = (CONFIG_FILE, TEMPLATE_FILE, TEMPLATES_DIR, SPECIAL_TOKENS_MAP_FILE, GENERATION_CONFIG_FILE)

# The special tokens transformers passes to a chat template (as `tokenizer.special_tokens_map`) when they are set.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers' markers around a control token found in a message (chat_template_utils._CONTROL_TOKEN_START/END):
# private-use characters, removed from messages before marking so that a message cannot forge them.
CONTROL_START, CONTROL_END = "\U000f0000", "\U000f0001"
# Stands for a reply's content when its start is looked for in a rendering (private use, never in a message).
REPLY_MARKER = "\U000f0002"

# Contents of the probe turns whose common start is a role's marker: different enough (letters, digits, punctuation,
# spaces, a newline, words the vocabulary may merge with a space before them) that no token of a content is in it.
MARKER_PROBES = ("Alpha", "Zulu", "What is it?", "the", "1", "{", " x", "\nx", "<", "\u00dcber")

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")

# tokenizer_config.json classes whose pre-tokenization transformers 5 builds itself instead of reading tokenizer.json's
# (SentencePiece models converted to BPE: Llama 1-2, Mistral v0.1-0.2, TinyLlama, Vicuna...).
LLAMA_TOKENIZER_CLASSES = frozenset({"LlamaTokenizer", "LlamaTokenizerFast"})


def is_hf_tokenizer_folder(path: str | os.PathLike) -> bool:
    """A folder with a tokenizer_config.json beside its tokenizer.json (palmchat's own folders have no config)."""
    p = Path(path)
    return p.is_dir() and (p / TOKENIZER_FILE).is_file() and (p / CONFIG_FILE).is_file()


def _read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} when the file does not exist), or a ValueError naming the file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: object, where: str) -> str | None:
    """A special token given as a string or an AddedToken dict ({"content": ...}), or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or an AddedToken dict with 'content', got {value!r}")


def _pretokenize_as_transformers(tok: _RustTokenizer, config: Mapping) -> None:
    """Give a Llama-class tokenizer the normalizer, pre-tokenizer and decoder transformers 5's LlamaTokenizer builds
    (models/llama/tokenization_llama.py), whatever tokenizer.json says: older conversions wrote a Prepend("▁")
    normalizer, which also puts "▁" after every special token where transformers 5 (Metaspace) does not."""
    if config.get("tokenizer_class") not in LLAMA_TOKENIZER_CLASSES:
        return
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))


def _read_templates(folder: Path, config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> template text, name -> where it was read) of a folder, read as transformers 5 reads them."""
    templates: dict[str, str] = {}
    sources: dict[str, str] = {}
    config_template = config.get("chat_template")
    where = f"{folder / CONFIG_FILE} (chat_template)"
    if isinstance(config_template, str):
        templates["default"], sources["default"] = config_template, where
    elif isinstance(config_template, list):
        for i, entry in enumerate(config_template):
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{where}: entry {i} is not a {{'name', 'template'}} pair of strings")
            templates[entry["name"]], sources[entry["name"]] = entry["template"], f"{where[:-1]} '{entry['name']}')"
    elif config_template is not None:
        raise ValueError(f"{where}: expected a string or a list of {{'name', 'template'}}, "
                         f"got {type(config_template).__name__}")
    if (folder / TEMPLATE_FILE).is_file():
        templates["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        sources["default"] = str(folder / TEMPLATE_FILE)
    if (folder / TEMPLATES_DIR).is_dir():
        for file in sorted((folder / TEMPLATES_DIR).glob("*.jinja")):
            name = file.name.removesuffix(".jinja")
            templates[name], sources[name] = file.read_text(encoding="utf-8"), str(file)
    return templates, sources


class HFTokenizer:
    """A Hugging Face tokenizer folder (see the module docstring); ``chat_format`` renders with its chat template.

    ``special_tokens`` maps bos_token/eos_token/... to their text (the ones set), ``generation_eos_ids`` are
    generation_config.json's ``eos_token_id`` (possibly several), ``add_bos_token`` is tokenizer_config.json's flag
    (whether transformers would put bos before plain text; templates write their own).
    """

    def __init__(self, tokenizer_json: str, config: Mapping | None = None, *,
                 chat_templates: Mapping[str, str] | None = None, template_sources: Mapping[str, str] | None = None,
                 special_tokens_map: Mapping | None = None, generation_config: Mapping | None = None,
                 path: str | None = None, template_variables: Mapping | None = None):
        folder = Path(path) if path else Path(".")
        self.path = path
        self.config = dict(config or {})
        self.special_tokens_map = dict(special_tokens_map) if special_tokens_map else None
        self.generation_config = dict(generation_config) if generation_config else None
        self.chat_templates = dict(chat_templates or {})
        # extra variables every rendering passes to the template, e.g. {"enable_thinking": False} for Qwen3
        self.template_variables = _plain_data(dict(template_variables or {}), "template_variables")
        for name in self.template_variables:
            if not isinstance(name, str) or name in ("messages", "tools", "documents", "add_generation_prompt"):
                raise ValueError(f"template_variables: {name!r} is not a name a chat template can be given")
        self.template_sources = {name: (template_sources or {}).get(name, f"chat template '{name}'")
                                 for name in self.chat_templates}
        try:
            self._tok = _RustTokenizer.from_str(tokenizer_json)  # renders: special tokens in its text are specials
            self._plain = _RustTokenizer.from_str(tokenizer_json)  # encodes text: special tokens are plain text
        except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{folder / TOKENIZER_FILE}: not a tokenizer `tokenizers` reads: {msg}") from None
        for tok in (self._tok, self._plain):
            _pretokenize_as_transformers(tok, self.config)
        # Not serialized by `tokenizers`, so set on every construction (as in bpe.py).
        self._plain.encode_special_tokens = True

        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.added_tokens = {t.content: (i, t.special) for i, t in added.items()}

        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            if key in self.config:
                text = _token_text(self.config[key], f"{folder / CONFIG_FILE}: {key}")
            else:
                text = _token_text((self.special_tokens_map or {}).get(key),
                                   f"{folder / SPECIAL_TOKENS_MAP_FILE}: {key}")
            if text is None:
                continue
            if self._tok.token_to_id(text) is None:
                raise ValueError(f"{folder / CONFIG_FILE}: {key} {text!r} is not in {TOKENIZER_FILE}'s vocabulary")
            self.special_tokens[key] = text
        add_bos = self.config.get("add_bos_token", False)
        if not isinstance(add_bos, bool):
            raise ValueError(f"{folder / CONFIG_FILE}: add_bos_token must be true or false, got {add_bos!r}")
        self.add_bos_token = add_bos
        self.generation_eos_ids = self._generation_eos_ids(folder)
        self.chat_format = TemplateChatFormat(self)

    def _generation_eos_ids(self, folder: Path) -> tuple[int, ...]:
        where = f"{folder / GENERATION_CONFIG_FILE}: eos_token_id"
        value = (self.generation_config or {}).get("eos_token_id")
        if value is None:
            return ()
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise ValueError(f"{where}: expected token ids below the vocabulary size {self.vocab_size}, "
                                 f"got {value!r}")
        return tuple(dict.fromkeys(values))

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> _RustTokenizer:
        """The `tokenizers` object that encodes plain text (special tokens in the text stay text)."""
        return self._plain

    def token_id(self, key: str) -> int | None:
        """The id of special token ``key`` ("bos_token", "eos_token", ...), None when the folder sets none."""
        text = self.special_tokens.get(key)
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        """Encode plain text; never emits a special token's id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return encode_plain(self._plain, [text], self.special_ids)[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust); never emits a special token's id."""
        return encode_plain(self._plain, texts, self.special_ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def sha256(self) -> str:
        """Hash of what decides the ids: tokenizer.json, the chat templates, the special tokens and the eos ids.
        Stored ids, shards and checkpoints record it, so that ids are never read with another tokenizer."""
        identity = {"tokenizer.json": self._tok.to_str(), "chat_templates": self.chat_templates,
                    "special_tokens": self.special_tokens, "add_bos_token": self.add_bos_token,
                    "generation_eos_ids": list(self.generation_eos_ids),
                    "template_variables": self.template_variables}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()

    # ------------------------------------------------------------- save / load
    def save(self, folder: str | os.PathLike) -> str:
        """Write the files this tokenizer was read from into ``folder`` (as transformers 5 writes them: the default
        template in chat_template.jinja, named ones in additional_chat_templates/); returns the folder."""
        folder = Path(folder)
        if folder.name == TOKENIZER_FILE:
            folder = folder.parent
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / TOKENIZER_FILE, self._tok.to_str(pretty=True))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        for name, template in self.chat_templates.items():
            if name == "default":
                atomic_write(folder / TEMPLATE_FILE, template)
            else:
                (folder / TEMPLATES_DIR).mkdir(exist_ok=True)
                file = folder / TEMPLATES_DIR / f"{name}.jinja"
                if file.resolve().parent != (folder / TEMPLATES_DIR).resolve():
                    raise ValueError(f"chat template name {name!r} is not a file name")
                atomic_write(file, template)
        if self.special_tokens_map is not None:
            atomic_write(folder / SPECIAL_TOKENS_MAP_FILE, json.dumps(self.special_tokens_map, indent=2) + "\n")
        if self.generation_config is not None:
            atomic_write(folder / GENERATION_CONFIG_FILE, json.dumps(self.generation_config, indent=2) + "\n")
        self.path = str(folder)
        return str(folder)

    save_pretrained = save  # the name palmchat's own Tokenizer writes a Hugging Face folder under

    @classmethod
    def load(cls, folder: str | os.PathLike, template_variables: Mapping | None = None) -> HFTokenizer:
        """Read a Hugging Face tokenizer folder (a path to its tokenizer.json means its folder);
        ``template_variables`` are passed to every rendering of its chat template (they are part of its sha256)."""
        folder = Path(folder)
        if folder.name == TOKENIZER_FILE:
            folder = folder.parent
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder (expected a Hugging Face tokenizer folder)")
        if not (folder / TOKENIZER_FILE).is_file():
            slow = [name for name in ("tokenizer.model", "vocab.json") if (folder / name).is_file()]
            hint = (f" (it has {', '.join(slow)}: only fast tokenizers saved as {TOKENIZER_FILE} are supported; "
                    f"save it with a transformers fast tokenizer first)") if slow else ""
            raise ValueError(f"{folder}: missing {TOKENIZER_FILE}{hint}")
        config = _read_json(folder / CONFIG_FILE)
        templates, sources = _read_templates(folder, config)
        return cls((folder / TOKENIZER_FILE).read_text(encoding="utf-8"), config,
                   chat_templates=templates, template_sources=sources,
                   special_tokens_map=_read_json(folder / SPECIAL_TOKENS_MAP_FILE) or None,
                   generation_config=_read_json(folder / GENERATION_CONFIG_FILE) or None,
                   path=str(folder), template_variables=template_variables)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


# ------------------------------------------------------------------------------------------------ chat templates
_generation_spans: ContextVar[list | None] = ContextVar("palmchat_generation_spans", default=None)


def _compile(template: str, where: str):
    """``template`` compiled in the environment transformers renders chat templates in, or a ValueError."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span its body renders to while
        :func:`_generation_spans` holds (rendered blocks so far, spans)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("track"), [], [], body).set_lineno(lineno)

        def track(self, caller):
            text = caller()
            tracking = _generation_spans.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' own: no HTML escaping, and its options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore attributes (as transformers' does)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        compiled = env.from_string(template)
        ast = env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}: the chat template does not compile: {e.message} (line {e.lineno})") from None
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    names = frozenset(n.name for n in ast.find_all(jinja2.nodes.Name))
    return compiled, "\0".join(literals), names


def _plain_data(value, where: str):
    """Messages and tools rebuilt from plain JSON types (what the sandboxed template may see)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_data(k, where): _plain_data(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v, where) for v in value]
    raise ValueError(f"{where}: {type(value).__name__} values cannot be passed to a chat template")


def _mark(value, control_re: re.Pattern):
    """Control tokens inside strings wrapped in the markers (transformers' mark_control_tokens); keys untouched."""
    if isinstance(value, str):
        value = value.replace(CONTROL_START, "").replace(CONTROL_END, "")
        return control_re.sub(f"{CONTROL_START}\\g<0>{CONTROL_END}", value)
    if isinstance(value, dict):
        return {k: _mark(v, control_re) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark(v, control_re) for v in value]
    return value


def _validate_messages(messages: object) -> list[dict]:
    """Messages as plain dicts with their None values dropped (as transformers does), or a ValueError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages: conversation is empty (need at least one message)")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in _plain_data(message, f"message {i}").items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise ValueError(f"message {i}: missing 'role' (a string)")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"message {i}: 'content' must be a string, got {type(content).__name__}")
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:  # transformers fills both names templates read the reasoning under
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return list(a[:n])


def _starts_with(ids: Sequence[int], prefix: Sequence[int]) -> bool:
    return list(ids[:len(prefix)]) == list(prefix)


def _probe_conversations() -> list[list[dict]]:
    """Alternating user/assistant conversations, with and without a system message, for the load-time probes."""
    turns = []
    for k in range(1, 4):
        turns.append({"role": "user", "content": f"Probe question {k}?"})
        turns.append({"role": "assistant", "content": f"Probe answer {k}."})
    return [[{"role": "system", "content": "Probe system prompt."}] + turns, turns]


class CompiledTemplate(NamedTuple):
    template: object  # jinja2.Template
    control_re: re.Pattern  # control tokens to mark in messages and tools
    markers_re: re.Pattern  # a marked control token (group 1), or a lone marker
    where: str  # the file (and field) it was read from, for errors
    names: frozenset  # the variables it reads
    has_generation_blocks: bool


class TemplateChatFormat:
    """:class:`ChatFormat` of an :class:`HFTokenizer`'s Jinja chat template (see the module docstring).

    A tokenizer without a chat template still gives bos/eos/pad ids; rendering with it raises a ValueError.
    """

    def __init__(self, tokenizer: HFTokenizer):
        self.tokenizer = tokenizer
        self._compiled: dict[str, tuple] = {}
        self.where = tokenizer.template_sources.get("default", f"{tokenizer.path or '.'}/{TEMPLATE_FILE}")
        # the special tokens transformers passes (those set), then the caller's variables
        self.variables = {**tokenizer.special_tokens, **tokenizer.template_variables}
        eos_id = tokenizer.token_id("eos_token")
        self.has_template = "default" in tokenizer.chat_templates
        for name in tokenizer.chat_templates:
            self._template(name)  # a template that does not compile fails at load, naming its file
        self.bos_id: int | None = None
        self.generation_prompt: list[int] = []
        self.reply_end: list[int] = []
        self.reply_lead = ""
        self.prefix_stable = False
        self.markers: list[tuple[str, list[int]]] = []
        templates = tokenizer.chat_templates
        self.tool_syntax = call_syntax(templates.get("tool_use", templates.get("default", "")))
        if self.has_template:
            self._probe()
        else:
            self.eot_id = eos_id
            if self.eot_id is None:
                raise ValueError(f"{tokenizer.path}: no chat template and no eos_token: nothing ends a reply")
            self.bos_id = tokenizer.token_id("bos_token") if tokenizer.add_bos_token else None
            self.reply_end = [self.eot_id]
        pad = tokenizer.token_id("pad_token")
        self.pad_id: int = pad if pad is not None else eos_id if eos_id is not None else self.eot_id
        self.reply_stop_ids: tuple[int, ...] = tuple(dict.fromkeys(
            [self.eot_id, *tokenizer.generation_eos_ids] + ([eos_id] if eos_id is not None else [])))

    # ------------------------------------------------------------------ rendering
    def _template(self, name: str) -> CompiledTemplate:
        if name not in self._compiled:
            where = self.tokenizer.template_sources[name]
            compiled, literals, names = _compile(self.tokenizer.chat_templates[name], where)
            control = sorted((text for text, (_, special) in self.tokenizer.added_tokens.items()
                              if special or (text in literals and not text.isspace())), key=len, reverse=True)
            control_re = re.compile("|".join(map(re.escape, control)) or "(?!)")
            markers_re = re.compile(
                f"{CONTROL_START}({control_re.pattern}){CONTROL_END}|[{CONTROL_START}{CONTROL_END}]")
            self._compiled[name] = CompiledTemplate(compiled, control_re, markers_re, where, names, bool(
                GENERATION_BLOCK.search(self.tokenizer.chat_templates[name])))
        return self._compiled[name]

    def _render_text(self, messages: list[dict], add_generation_prompt: bool, tools
                     ) -> tuple[str, list[tuple[int, int]], CompiledTemplate]:
        """(rendered text with control tokens from messages marked, the character spans its {% generation %}
        blocks rendered, the template used)."""
        import jinja2

        if not self.has_template:
            raise ValueError(f"{self.tokenizer.path}: this tokenizer has no chat template ({CONFIG_FILE} has no "
                             f"chat_template and there is no {TEMPLATE_FILE})")
        name = "tool_use" if tools is not None and "tool_use" in self.tokenizer.chat_templates else "default"
        entry = self._template(name)
        control_re, where = entry.control_re, entry.where
        if tools is not None:
            check_tools(tools)
            tools = _mark(_plain_data(list(tools), "tools"), control_re)
        variables = dict(messages=_mark(copy.deepcopy(messages), control_re), tools=tools, documents=None,
                         add_generation_prompt=add_generation_prompt, **self.variables)
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            if entry.has_generation_blocks:
                reset = _generation_spans.set((blocks, spans))
                try:
                    for block in entry.template.generate(**variables):
                        blocks.append(block)
                finally:
                    _generation_spans.reset(reset)
                text = "".join(blocks)
            else:
                text = entry.template.render(**variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"{where}: the chat template failed to render: {e.message or type(e).__name__}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, ZeroDivisionError) as e:
            raise ValueError(f"{where}: the chat template failed to render: {type(e).__name__}: {e}") from None
        return text, spans, entry

    def _encode_without_added(self, text: str) -> list[int]:
        """``text`` through the normalizer, pre-tokenizer and model alone: no added token matched."""
        tok = self.tokenizer._tok
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(text)] if tok.pre_tokenizer is not None else [text]
        return [t.id for s in splits for t in tok.model.tokenize(s)]

    def _encode_text(self, text: str, entry: CompiledTemplate) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets) of a rendering, as transformers' encode_marked_chat encodes it: the template's
        control tokens are specials, marked ones from messages plain text; a piece after a marker is encoded after
        a newline that is then removed (so that it starts as a piece inside text would)."""
        tok = self.tokenizer._tok
        newline = tok.encode("\n", add_special_tokens=False).ids
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos, first = 0, True

        def add_piece(start: int, end: int, as_text: bool) -> None:
            piece = text[start:end]
            if first:
                enc = tok.encode(piece, add_special_tokens=False)
                ids.extend(enc.ids)
                offsets.extend((start + a, start + b) for a, b in enc.offsets)
                return
            if not piece:
                return
            if as_text:
                piece_ids = self._encode_without_added("\n" + piece)
                piece_ids = (piece_ids[len(newline):] if piece_ids[:len(newline)] == newline
                             else self._encode_without_added(piece))
                if self.tokenizer.token_to_id(piece) in piece_ids:
                    raise ValueError(f"cannot encode {piece!r} in a message as text: the tokenizer makes it from text")
                ids.extend(piece_ids)
                offsets.extend([(start, end)] * len(piece_ids))
                return
            enc = tok.encode("\n" + piece, add_special_tokens=False)
            if enc.ids[:len(newline)] == newline:
                ids.extend(enc.ids[len(newline):])
                offsets.extend((max(start, start + a - 1), start + b - 1) for a, b in enc.offsets[len(newline):])
            else:
                enc = tok.encode(piece, add_special_tokens=False)
                ids.extend(enc.ids)
                offsets.extend((start + a, start + b) for a, b in enc.offsets)

        for m in entry.markers_re.finditer(text):
            add_piece(pos, m.start(), as_text=False)
            first = False
            if m.group(1) is not None:
                add_piece(m.start(1), m.end(1), as_text=True)
            pos = m.end()
        add_piece(pos, len(text), as_text=False)
        return ids, offsets

    def _ids(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> list[int]:
        text, _, entry = self._render_text(messages, add_generation_prompt, tools)
        return self._encode_text(text, entry)[0]

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
               tools: Sequence[Mapping] | None = None) -> tuple[list[int], list[int]]:
        """A conversation as ``(ids, loss_mask)``: the mask is 1 on every assistant reply's tokens and its
        end-of-turn token (see the module docstring for how they are found), 0 elsewhere."""
        messages = _validate_messages(messages)
        text, spans, entry = self._render_text(messages, add_generation_prompt, tools)
        ids, offsets = self._encode_text(text, entry)
        mask = [0] * len(ids)
        if entry.has_generation_blocks:
            for k, (start, end) in enumerate(offsets):  # transformers' return_assistant_tokens_mask
                if any(end > s and start < e for s, e in spans):
                    mask[k] = 1
            return ids, mask
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._reply_start(messages, i, text, tools)
            first = next((k for k, (_, end) in enumerate(offsets) if end > start), len(ids))
            last = next((k for k in range(first, len(ids)) if ids[k] == self.eot_id), None)
            if last is None:  # a template that closes replies with no eot: up to where the message's rendering ends
                upto, _, _ = self._render_text(messages[:i + 1], False, tools)
                end_char = len(upto) if text.startswith(upto) else len(text)
                last = next((k for k in range(len(ids) - 1, first - 1, -1) if offsets[k][0] < end_char), first - 1)
            for k in range(first, last + 1):
                mask[k] = 1
        return ids, mask

    def _reply_start(self, messages: list[dict], i: int, text: str, tools) -> int:
        """Where assistant message ``i``'s reply starts in the rendering ``text`` of ``messages``."""
        if i > 0:
            prompt, _, _ = self._render_text(messages[:i], True, tools)
            if text.startswith(prompt):
                return len(prompt)
        stand_in = [dict(m, content=REPLY_MARKER) if k == i else m for k, m in enumerate(messages)]
        marked, _, _ = self._render_text(stand_in, False, tools)
        start = marked.find(REPLY_MARKER)
        if start < 0 or marked[:start] != text[:start]:
            raise ValueError(f"{self.where}: cannot find where message {i} (assistant) starts in the rendering, "
                             f"so its loss mask is unknown")
        return start

    def render_prompt(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None) -> list[int]:
        """The ids of ``messages`` followed by the generation prompt."""
        return self._ids(_validate_messages(messages), True, tools)

    def render_turn(self, message: Mapping, history: Sequence[Mapping] = ()) -> list[int]:
        """The ids ``message`` adds after the conversation ``history`` (after ``[bos_id]`` when it is empty).
        Only for prefix-stable formats: with any other the whole conversation must be rendered again."""
        if not self.prefix_stable:
            raise ValueError(f"{self.where}: this chat template rewrites earlier turns (not prefix-stable), so a "
                             f"turn has no ids of its own: render the whole conversation")
        return self._turn_ids(message, history)

    def _turn_ids(self, message: Mapping, history: Sequence[Mapping]) -> list[int]:
        """render_turn without the stability check: right here, whatever the template does to later turns."""
        history = _validate_messages(list(history)) if len(history) else []
        before = self._ids(history, False) if history else ([] if self.bos_id is None else [self.bos_id])
        after = self._ids(history + _validate_messages([message]), False)
        if not _starts_with(after, before):
            raise ValueError(f"{self.where}: adding this {message.get('role')!r} message changes the rendering of "
                             f"the conversation before it: render the whole conversation")
        return after[len(before):]

    def message_starts(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        """(role, index) of each message that starts in a rendering ``ids``, found by its role marker (see the
        module docstring); a trailing generation prompt counts as an assistant message.  Messages whose turn
        opens with no special token (Mistral's replies, a system prompt folded into a user turn) are not listed."""
        ids = [int(i) for i in ids]
        found: list[tuple[str, int]] = []
        k = 0
        while k < len(ids):
            for role, marker in self.markers:
                if ids[k:k + len(marker)] == marker:
                    found.append((role, k))
                    k += len(marker)
                    break
            else:
                k += 1
        gp = self.generation_prompt
        start = len(ids) - len(gp)
        if ids[start:] == gp and not (found and found[-1] == ("assistant", start)):
            found.append(("assistant", start))
        return found

    def decode_reply(self, ids: Iterable[int]) -> str:
        """The text of generated reply ids, up to (not including) the first id that ends a reply, without the
        whitespace the template writes before a reply's content (Mistral's space after [/INST])."""
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i in self.reply_stop_ids:
                break
            out.append(i)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return text[len(self.reply_lead):] if self.reply_lead and text.startswith(self.reply_lead) else text

    # ------------------------------------------------------------------ probes
    def _probe(self) -> None:
        """Derive generation_prompt, eot_id, reply_end, bos_id, prefix_stable and the role markers by rendering
        the probe conversations (see the module docstring)."""
        tok = self.tokenizer
        rendered: list[tuple[list[dict], list[list[int]], list[list[int] | None]]] = []
        error: ValueError | None = None
        for conversation in _probe_conversations():
            try:
                plain = [self._ids(conversation[:k], False) for k in range(1, len(conversation) + 1)]
                prompts = [self._ids(conversation[:k], True) if conversation[k - 1]["role"] == "user" else None
                           for k in range(1, len(conversation) + 1)]
            except ValueError as e:  # e.g. a template that refuses system messages: probe without them
                error = e
                continue
            rendered.append((conversation, plain, prompts))
        if not rendered:
            raise error

        stable = True
        for conversation, plain, prompts in rendered:
            for k in range(1, len(conversation)):
                stable &= _starts_with(plain[k], plain[k - 1])
                if conversation[k]["role"] == "assistant":
                    stable &= _starts_with(plain[k], prompts[k - 1])
        self.prefix_stable = stable

        conversation, plain, prompts = rendered[-1]  # without a system message when the template takes that
        user = next(k for k, m in enumerate(conversation) if m["role"] == "user")
        prompt = prompts[user]
        if _starts_with(prompt, plain[user]):
            self.generation_prompt = prompt[len(plain[user]):]
        else:
            self.generation_prompt = []
            self.prefix_stable = False
        # a reply's end is what replies with different contents end with; its first special token ends the turn
        # (the first special token of the reply itself may open it, as gpt-oss's <|channel|> does)
        ends = []
        for content in ("Probe answer 1.", "Zulu"):
            reply = plain[user + 1] if content == conversation[user + 1]["content"] else self._ids(
                conversation[:user + 1] + [{"role": "assistant", "content": content}], False)
            ends.append(reply[len(_common_prefix(reply, prompt)):][::-1])
        end = _common_prefix(*ends)[::-1]
        # the whitespace the template writes before a reply's content (Mistral's and Llama 2's ' '), which a model
        # samples as part of the reply and decode_reply leaves out
        prompt_text = self._render_text(conversation[:user + 1], True, None)[0]
        reply_text = self._render_text(conversation[:user + 2], False, None)[0]
        lead = reply_text[len(prompt_text):].split(conversation[user + 1]["content"])[0]
        self.reply_lead = lead if reply_text.startswith(prompt_text) and lead.isspace() else ""
        eot_at = next((k for k, i in enumerate(end) if i in tok.special_ids), None)
        if eot_at is not None:
            self.eot_id = end[eot_at]
            self.reply_end = end[eot_at:]
        else:
            self.eot_id = tok.token_id("eos_token")
            if self.eot_id is None:
                raise ValueError(f"{self.where}: cannot tell which token ends an assistant turn: the template writes "
                                 f"no special token after a reply and {CONFIG_FILE} has no eos_token")
            self.reply_end = [self.eot_id]

        bos = tok.token_id("bos_token")
        every = [ids for _, plain, _ in rendered for ids in plain]
        writes_bos = "bos_token" in self._template("default").names
        self.bos_id = bos if writes_bos and bos is not None and all(ids[:1] == [bos] for ids in every) else None
        self.markers = self._role_markers(rendered[0][0][0]["role"] == "system")

    def _role_markers(self, takes_system: bool) -> list[tuple[str, list[int]]]:
        """The ids opening every turn of each role (the common start of its turns with the MARKER_PROBES contents,
        no longer than the generation prompt for replies: Qwen3's last reply opens with more than earlier ones),
        kept when they hold a special token (so that text cannot forge them); longest first."""
        first_turn = [{"role": "user", "content": "Probe question 1?"}, {"role": "assistant", "content": "Probe."}]
        # the histories to add a turn of each role to, in order of preference: a user turn after a first exchange
        # (the first one may carry a default system prompt), else first (Qwen3 rewrites the exchange before it)
        histories = {"user": [first_turn, []], "assistant": [first_turn[:1]], "system": [[]] if takes_system else []}
        markers = []
        for role, candidates in histories.items():
            for history in candidates:
                try:
                    turns = [self._turn_ids({"role": role, "content": text}, history) for text in MARKER_PROBES]
                except ValueError:
                    continue
                marker = turns[0]
                for turn in turns[1:]:
                    marker = _common_prefix(marker, turn)
                if role == "assistant" and self.generation_prompt and _starts_with(marker, self.generation_prompt):
                    marker = marker[:len(self.generation_prompt)]
                if not self.tokenizer.special_ids.isdisjoint(marker):
                    markers.append((role, marker))
                break
        return sorted(markers, key=lambda m: len(m[1]), reverse=True)

    def __repr__(self) -> str:
        return (f"TemplateChatFormat(eot_id={self.eot_id}, bos_id={self.bos_id}, prefix_stable={self.prefix_stable}, "
                f"path={self.tokenizer.path!r})")
