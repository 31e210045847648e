"""A conversation's token context: the ids stored with it, a new turn appended to them, or the whole of it rendered
again from its text (under another tokenizer than the one that stored it, or with a chat template that is not
prefix-stable)."""

from __future__ import annotations

from palmchat.serve import schemas as S
from palmchat.serve.errors import APIError
from palmchat.serve.state import ServerState
from palmchat.serve.tools import ToolSetup, add_item
from palmchat.tokenizer.chat_format import conversation_start


def render_or_400(chat_format, messages: list[dict], tools: ToolSetup | None = None, prompt: bool = False,
                  param: str = "input") -> list[int]:
    """The ids of a conversation (with the generation prompt: `prompt`; a stored context's may have no messages), or
    a 400 naming `param` with what the chat template refused (a role, an order of roles, several calls in one
    reply...)."""
    try:
        if prompt:
            return chat_format.render_prompt(messages, **({"tools": tools.tools} if tools else {}))
        return chat_format.render(messages)[0] if messages else conversation_start(chat_format)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param) from None


def message_of(item: dict) -> dict:
    """A conversation's message item as a chat message {"role", "content"}."""
    text = "".join(part.get("text", "") for part in item.get("content", []))
    return {"role": S.role_of(item["role"]), "content": text}


def conversation_history(state: ServerState, items: list[tuple[dict, list[int], str | None]]
                         ) -> tuple[list[int], list[dict]]:
    """(ids, messages) of a conversation's items that are part of its token history (a blocked turn is not): each
    item's stored ids when this server's tokenizer made them, else the item rendered again from its text; with a
    chat template that is not prefix-stable, or tool calls and results among the items (whose ids are stand-ins),
    the whole history rendered again from its text."""
    chat_format = state.tokenizer.chat_format
    kept = [(item, tokens, tokenizer) for item, tokens, tokenizer in items
            if tokens and item.get("type") in ("message", "function_call", "function_call_output")]
    if not chat_format.prefix_stable or any(item["type"] != "message" for item, _, _ in kept):
        messages: list[dict] = []
        for item, _, _ in kept:
            add_item(messages, item)
        return render_or_400(chat_format, messages, param="conversation"), messages
    ids, messages = conversation_start(chat_format), []
    for item, tokens, tokenizer in kept:
        message = message_of(item)
        ids += tokens if tokenizer == state.tokenizer_sha256 else chat_format.render_turn(message, messages)
        messages.append(message)
    return ids, messages


def new_turns(chat_format, history: list[int], history_messages: list[dict] | None, messages: list[dict]
              ) -> tuple[list[int], list[list[int]]]:
    """The ids of `history` followed by `messages` (without the generation prompt), and the ids each message adds.
    A prefix-stable format appends each message's turn to the stored ids (those of generated replies are kept as
    sampled); any other renders the whole conversation again from its text (the prefix cache still reuses what
    did not change), and a message's own ids are then its rendering alone."""
    if chat_format.prefix_stable:
        earlier, turns = list(history_messages or []), []
        for message in messages:
            turns.append(chat_format.render_turn(message, earlier))
            earlier.append(message)
        return history + [t for turn in turns for t in turn], turns
    if not messages:
        return history, []
    ids = chat_format.render((history_messages or []) + messages)[0]
    return ids, [chat_format.render([message])[0] for message in messages]


def previous_history(state: ServerState, previous: dict, response_id: str) -> tuple[list[int], list[dict] | None]:
    """(ids, messages) of a stored response's context: its ids when this server's tokenizer made them (or when it
    was stored before contexts named their tokenizer: then they are taken as this tokenizer's, as before), else its
    text rendered again. A response of a conversation: that conversation's branch up to its reply."""
    if previous["context"] is None:
        if previous["context_items"] is None:
            raise APIError(400, f"Previous response '{response_id}' ended with a conversation item that was deleted "
                                f"since, so it cannot be continued. Continue the conversation instead.",
                           param="previous_response_id", code="previous_response_unusable")
        return conversation_history(state, previous["context_items"])
    if previous["tokenizer"] is None or previous["tokenizer"] == state.tokenizer_sha256:
        return previous["context"], previous["messages"]
    if previous["messages"] is None:
        raise APIError(400, f"Previous response '{response_id}' continues a conversation stored by an older palmchat "
                            f"without its text, and this server's model uses another tokenizer than the one that "
                            f"stored it, so it cannot be continued. Send the whole conversation as `input` instead.",
                       param="previous_response_id", code="previous_response_unusable")
    return render_or_400(state.tokenizer.chat_format, previous["messages"], param="previous_response_id"), \
        previous["messages"]


