"""serve/truncation.py: which messages `truncation: "auto"` leaves out, checked on hand-written token ids."""

from __future__ import annotations

from palmchat.serve.truncation import drop_oldest_messages
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import ASSISTANT_ID, BOS_ID, EOT_ID, SYSTEM_ID, USER_ID

W = 10  # any content token


def msg(role_id: int, words: int) -> list[int]:
    return [role_id] + [W] * words + [EOT_ID]


SYSTEM, U1, A1, U2, A2, U3 = msg(SYSTEM_ID, 1), msg(USER_ID, 2), msg(ASSISTANT_ID, 3), msg(USER_ID, 1), \
    msg(ASSISTANT_ID, 2), msg(USER_ID, 2)  # 3, 4, 5, 3, 4 and 4 tokens


def prompt(*messages: list[int]) -> list[int]:
    return [BOS_ID] + [t for m in messages for t in m] + [ASSISTANT_ID]


TOKENIZER = train_tokenizer(["a few words to learn from"], vocab_size=300)


def fit(ids: list[int], budget: int, quantum: int = 1):
    return drop_oldest_messages(ids, TOKENIZER.chat_format, budget, quantum)


def test_a_prompt_that_fits_is_unchanged():
    ids = prompt(SYSTEM, U1, A1, U3)
    fitted = fit(ids, len(ids))
    assert fitted.prompt == ids and fitted.dropped_messages == 0 and fitted.details() is None


def test_the_oldest_exchange_goes_first_and_the_system_message_stays():
    ids = prompt(SYSTEM, U1, A1, U2, A2, U3)  # 25 tokens
    assert len(ids) == 25
    fitted = fit(ids, 20)  # 5 too many: U1 + A1 (9 tokens) go, the smallest cut at a user message
    assert fitted.prompt == prompt(SYSTEM, U2, A2, U3)
    assert fitted.details() == {"dropped_messages": 2, "dropped_tokens": 9}


def test_a_cut_never_leaves_an_assistant_message_first():
    ids = prompt(U1, A1, U2, A2, U3)  # 1 too many for 21: U1 alone would do, but A1 would then open the prompt
    assert fit(ids, len(ids) - 1).prompt == prompt(U2, A2, U3)


def test_the_cut_moves_in_steps_of_the_quantum():
    ids = prompt(SYSTEM, U1, A1, U2, A2, U3)
    fitted = fit(ids, 20, quantum=16)  # 5 too many, rounded up to 16: everything but the newest message goes
    assert fitted.prompt == prompt(SYSTEM, U3) and fitted.dropped_messages == 4


def test_a_growing_conversation_keeps_its_cut_so_the_prefix_cache_still_serves_it():
    first = prompt(SYSTEM, U1, A1, U2, A2, U3)
    later = first[:-1] + msg(ASSISTANT_ID, 1) + msg(USER_ID, 1) + [ASSISTANT_ID]  # two more messages, 6 tokens
    a, b = fit(first, 22, quantum=8), fit(later, 28, quantum=8)  # 3 too many each time: rounded up to 8
    assert a.dropped_messages == b.dropped_messages == 2
    assert b.prompt[:len(a.prompt) - 1] == a.prompt[:-1]  # the earlier prompt (without its generation token)


def test_when_nothing_else_can_go_only_the_system_and_newest_messages_are_left():
    ids = prompt(SYSTEM, U1, A1, U2, A2, U3)
    fitted = fit(ids, 5)  # cannot be met: the caller's context check decides what then
    assert fitted.prompt == prompt(SYSTEM, U3) and fitted.dropped_tokens == 16
    assert fit(prompt(SYSTEM, U3), 3).prompt == prompt(SYSTEM, U3)  # nothing to leave out
