"""GET /v1/models[/{model}]: the base model, each LoRA adapter (with `parent`: the base, as vLLM lists them) and,
when a reward model is loaded, the ':best-of-N' variants of each; every card carries its context length."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from palmchat.serve.sampling import route_model
from palmchat.serve.state import ServerState, caller, server_state

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])
BEST_OF_LISTED = (4, 8)  # the variants listed; any N up to the limit is served


@router.get("/models")
async def list_models(request: Request):
    state = server_state(request)
    names = [state.model_id] + list(state.adapters)
    ids = names + ([f"{name}:best-of-{n}" for name in names for n in BEST_OF_LISTED] if state.reward_model else [])
    return {"object": "list", "data": [model_card(state, i) for i in ids]}


@router.get("/models/{model}")
async def get_model(model: str, request: Request):
    route_model(server_state(request), model)
    return model_card(server_state(request), model)


def model_card(state: ServerState, model: str) -> dict:
    """OpenAI's model object plus vLLM's fields: the context length, the model an adapter runs on or a best-of
    variant samples from (`parent`), and where an adapter was loaded from (`root`)."""
    adapter, candidates = route_model(state, model)
    if candidates is not None:  # a ':best-of-N' variant samples from the model it suffixes
        parent = model.rpartition(":")[0]
    else:
        parent = state.model_id if adapter is not None else None
    return {"id": model, "object": "model", "created": 0, "owned_by": "palmchat", "max_model_len": state.context,
            "root": state.adapters[adapter] if adapter is not None else state.model_id, "parent": parent}
