"""GET /v1/models[/{model}]: the checkpoint, plus "<id>:best-of-N" when a reward model is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from palmchat.serve.sampling import model_candidates
from palmchat.serve.state import ServerState, caller, server_state

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@router.get("/models")
async def list_models(request: Request):
    state = server_state(request)
    ids = [state.model_id] + ([f"{state.model_id}:best-of-{n}" for n in (4, 8)] if state.reward_model else [])
    return {"object": "list", "data": [model_card(state, i) for i in ids]}


@router.get("/models/{model}")
async def get_model(model: str, request: Request):
    model_candidates(server_state(request), model)
    return model_card(server_state(request), model)


def model_card(state: ServerState, model: str) -> dict:
    """OpenAI's model object plus its context length under vLLM's name for it."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "palmchat", "max_model_len": state.context}
