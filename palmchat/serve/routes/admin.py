"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's endpoints and bodies): LoRA adapters join and
leave the running server without a restart. Admin keys only (`palmchat keys create --role admin`).

Loading reads and checks the folder (serve/adapters.py: of the served base, or refused) outside the scheduler, then
adds the adapter between two decode steps. Unloading refuses new requests for it at once (404) and lets the ones
in flight finish with it; the response comes when it has left the model.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from palmchat.serve import schemas as S
from palmchat.serve.adapters import AdapterRefused, add_to_model, check_adapter_name, read_adapter
from palmchat.serve.errors import APIError
from palmchat.serve.state import admin_key, server_state

router = APIRouter(prefix="/v1", dependencies=[Depends(admin_key)])


class LoadLoRARequest(S.Body):
    lora_name: str = Field(min_length=1, max_length=64, description="the model name requests use for it")
    lora_path: str = Field(min_length=1, max_length=4096,
                           description="a palmchat LoRA checkpoint folder or a PEFT adapter folder, of the served base")


class UnloadLoRARequest(S.Body):
    lora_name: str = Field(min_length=1, max_length=64)


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, request: Request):
    state = server_state(request)
    name = body.lora_name
    async with state.adapter_lock:
        try:
            check_adapter_name(name, state.model_id)
        except AdapterRefused as e:
            raise APIError(400, str(e), param="lora_name") from None
        if name in state.adapters:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded (from {state.adapters[name]}); "
                                f"unload it first", param="lora_name")
        scheduler = state.scheduler
        try:
            tensors, lora = await asyncio.to_thread(read_adapter, body.lora_path, name, state.base_path,
                                                    scheduler.config, state.tokenizer)
            model = scheduler.engine.model
            await asyncio.wrap_future(scheduler.between_steps(lambda: add_to_model(model, name, tensors, lora)))
        except AdapterRefused as e:
            raise APIError(400, str(e), param="lora_path") from None
        state.adapters[name] = body.lora_path
    return {"object": "lora_adapter", "id": name, "path": body.lora_path, "parent": state.model_id,
            "rank": lora["rank"], "status": "loaded"}


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request):
    state = server_state(request)
    name = body.lora_name
    async with state.adapter_lock:
        if name not in state.adapters:
            raise APIError(404, f"The lora adapter '{name}' is not loaded; loaded: "
                                f"{', '.join(state.adapters) or 'none'}", param="lora_name", code="model_not_found")
        path = state.adapters.pop(name)  # new requests for it get a 404 from now on
        try:
            unloaded = state.scheduler.unload_adapter(name)
        except ValueError:  # not on the model the scheduler serves now (a policy reload replaced it)
            unloaded = None
        if unloaded is not None:
            await asyncio.wrap_future(unloaded)  # the requests in flight finish with it first
    return {"object": "lora_adapter", "id": name, "path": path, "status": "unloaded"}
