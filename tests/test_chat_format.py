"""tokenizer/chat_format.py: palmchat's chat format checked against ids written out by hand.

A character codec (one id per character, its code point) stands in for the BPE tokenizer so that every expected id
is a literal; the last test checks that the BPE tokenizer's own format lays out the same ids around its encoding.
"""

from __future__ import annotations

from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import ChatFormat, PalmChatFormat


class CharCodec:
    """One id per character (its code point, so never one of the six special ids for printable text)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 6))


CONVERSATION = [
    {"role": "system", "content": "Be"},  # B=66 e=101
    {"role": "user", "content": "hi"},  # h=104 i=105
    {"role": "assistant", "content": "ok"},  # o=111 k=107
]
# bos=1 system=2 user=3 assistant=4 eot=5
RENDERED = [1, 2, 66, 101, 5, 3, 104, 105, 5, 4, 111, 107, 5]
LOSS_MASK = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]  # the assistant's content and its eot, nothing else


def test_the_special_ids_and_the_interface():
    fmt = PalmChatFormat(CharCodec())
    assert isinstance(fmt, ChatFormat)
    assert (fmt.pad_id, fmt.bos_id, fmt.eot_id) == (0, 1, 5)
    assert fmt.role_ids == {"system": 2, "user": 3, "assistant": 4}
    assert fmt.generation_prompt == [4]
    assert sorted(fmt.reply_stop_ids) == [0, 1, 2, 3, 4, 5]


def test_a_three_message_conversation_renders_to_these_ids_and_loss_mask():
    fmt = PalmChatFormat(CharCodec())
    assert fmt.render(CONVERSATION) == (RENDERED, LOSS_MASK)
    assert fmt.render_turn(CONVERSATION[1]) == [3, 104, 105, 5]
    prompt = [1, 2, 66, 101, 5, 3, 104, 105, 5, 4]  # the first two messages and the generation prompt
    assert fmt.render(CONVERSATION[:2], add_generation_prompt=True) == (prompt, [0] * 10)
    assert fmt.render_prompt(CONVERSATION[:2]) == prompt


def test_message_starts_and_the_reply():
    fmt = PalmChatFormat(CharCodec())
    assert fmt.message_starts(fmt.render_prompt(CONVERSATION)) == [
        ("system", 1), ("user", 5), ("assistant", 9), ("assistant", 13)]  # the last: the generation prompt
    assert fmt.decode_reply([111, 107, 5, 104]) == "ok"  # up to the first eot


def test_the_bpe_tokenizer_renders_the_same_layout():
    tok = train_tokenizer(["Be brief, hi, ok: a few words to learn from"], vocab_size=300)
    assert isinstance(tok.chat_format, ChatFormat)
    e = tok.encode
    assert tok.chat_format.render(CONVERSATION)[0] == [1, 2, *e("Be"), 5, 3, *e("hi"), 5, 4, *e("ok"), 5]
