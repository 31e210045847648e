"""/v1/conversations[/{id}[/items[/{item_id}]]]: create, read, update and delete conversations and their
items, as in OpenAI's Conversations API; GET /v1/conversations (the caller's, newest first) is an extension.

A conversation is a tree (palmchat/store.py): a regenerated reply or an edited message starts a new branch beside
the old one (POST /v1/responses with `branch_from`), and the conversation's items, as OpenAI's API lists them, are
those of its current branch. palmchat's extensions for the rest: GET .../tree (every item with its parent),
POST .../branch (make the branch through an item the current one), DELETE .../branches/{item_id} (an item and
everything that follows it)."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from palmchat.serve import schemas as S
from palmchat.serve.context import conversation_history, new_turns
from palmchat.serve.errors import APIError, not_found
from palmchat.serve.state import ServerState, caller, owned_conversation, server_state

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


def new_items(state: ServerState, messages: list[S.InputMessage], conversation_id: str | None = None
              ) -> list[tuple[dict, list[int]]]:
    """Each input message as a new item, with the token ids it adds to the conversation's context (after the
    messages the conversation `conversation_id` already holds)."""
    history_ids, history = ([], []) if conversation_id is None else \
        conversation_history(state, state.store.context_items(conversation_id))
    texts = [(m.role, S.text_of(m.content)) for m in messages]
    _, turns = new_turns(state.tokenizer.chat_format, history_ids, history,
                         [{"role": S.role_of(role), "content": text} for role, text in texts])
    return [(S.message_item(S.new_id("msg_"), role, text), ids) for (role, text), ids in zip(texts, turns)]


@router.post("/conversations")
async def create_conversation(request: Request, body: S.ConversationCreateRequest | None = None,
                              owner: str = Depends(caller)):
    state = server_state(request)
    body = body or S.ConversationCreateRequest()
    conversation = {"id": S.new_id("conv_"), "object": "conversation", "created_at": int(time.time()),
                    "metadata": body.metadata or {}}
    await asyncio.to_thread(state.store.create_conversation, owner, conversation, new_items(state, body.items or []),
                            state.tokenizer_sha256)
    return conversation


@router.get("/conversations")
async def list_conversations(request: Request, owner: str = Depends(caller), limit: int = Query(20, ge=1, le=100),
                             order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """An extension (OpenAI's API cannot list conversations): the caller's conversations, newest first by default.
    The chat page keeps each one's title in `metadata.title`."""
    try:
        page, more = await asyncio.to_thread(server_state(request).store.list_conversations, owner, limit, order, after)
    except KeyError:
        raise APIError(400, f"after: no conversation with id '{after}'", param="after") from None
    return S.item_list(page, has_more=more)


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)):
    return owned_conversation(server_state(request), owner, conversation_id)


@router.post("/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: S.ConversationUpdateRequest, request: Request,
                              owner: str = Depends(caller)):
    state = server_state(request)
    if not await asyncio.to_thread(state.store.update_conversation, owner, conversation_id, body.metadata):
        raise not_found("Conversation", conversation_id)
    return owned_conversation(state, owner, conversation_id)


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, owner: str = Depends(caller)):
    if not await asyncio.to_thread(server_state(request).store.delete_conversation, owner, conversation_id):
        raise not_found("Conversation", conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/conversations/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request, owner: str = Depends(caller),
                     limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                     after: str | None = None):
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    try:
        items, more = await asyncio.to_thread(state.store.branch_page, conversation_id, limit, order == "desc", after)
    except KeyError:
        raise APIError(400, f"after: no item with id '{after}'", param="after") from None
    return S.item_list(items, has_more=more)


@router.post("/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: S.ItemsCreateRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    items = await asyncio.to_thread(new_items, state, body.items, conversation_id)
    try:
        await asyncio.to_thread(state.store.add_items, owner, conversation_id, items, state.tokenizer_sha256)
    except KeyError:
        raise not_found("Conversation", conversation_id) from None
    return S.item_list([item for item, _ in items])


class BranchRequest(S.Body):
    item_id: str = Field(description="an item of the branch to show and continue; the branch runs on to its most "
                                     "recently extended end")


@router.get("/conversations/{conversation_id}/tree")
async def conversation_tree(conversation_id: str, request: Request, owner: str = Depends(caller)):
    """Every item of every branch, in the order they were added, each with `parent_id` (null: a first message),
    and the last item of the current branch."""
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    tree = await asyncio.to_thread(state.store.tree, conversation_id)
    return {"object": "conversation.tree", "conversation_id": conversation_id, "current_item": tree["current_item"],
            "data": [{**item, "parent_id": parent} for item, parent in tree["items"]]}


@router.post("/conversations/{conversation_id}/branch")
async def show_branch(conversation_id: str, body: BranchRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    leaf = await asyncio.to_thread(state.store.show_branch, owner, conversation_id, body.item_id)
    if leaf is None:
        raise APIError(404, f"Item with id '{body.item_id}' not found in conversation '{conversation_id}'.",
                       param="item_id", code="not_found")
    return {"object": "conversation.branch", "conversation_id": conversation_id, "current_item": leaf}


@router.delete("/conversations/{conversation_id}/branches/{item_id}")
async def delete_branch(conversation_id: str, item_id: str, request: Request, owner: str = Depends(caller)):
    """Delete an item and every item after it in any branch (DELETE .../items/{item_id} deletes the item alone)."""
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    if not await asyncio.to_thread(state.store.delete_branch, conversation_id, item_id):
        raise not_found("Item", item_id)
    return {"id": item_id, "object": "conversation.branch.deleted", "deleted": True,
            "current_item": await asyncio.to_thread(state.store.current_item, conversation_id)}


@router.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    item = state.store.get_item(conversation_id, item_id)
    if item is None:
        raise not_found("Item", item_id)
    return item


@router.delete("/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    conversation = owned_conversation(state, owner, conversation_id)
    if not await asyncio.to_thread(state.store.delete_item, conversation_id, item_id):
        raise not_found("Item", item_id)
    return conversation
