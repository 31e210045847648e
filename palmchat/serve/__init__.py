"""The server: an OpenAI-compatible API over a palmchat checkpoint, with stateful conversations that survive
a restart, prefix-cache reuse, continuous batching, best-of-n, moderation and API keys.

    run.py       `palmchat serve`: ServeArgs, loading, uvicorn
    app.py       the endpoints (FastAPI), errors, limits, metrics
    generate.py  prompt ids -> reply text through the scheduler: stop strings, output moderation, best-of-n
    schemas.py   request bodies and the OpenAI objects returned
    store.py     SQLite: responses, conversations, items, API keys
    keys.py      `palmchat keys`, key hashing, rate limits

Nothing here is imported by the training code; FastAPI is needed only by app.py (`pip install palmchat[serve]`).
"""
