"""The server: an OpenAI-compatible API over a palmchat checkpoint, with stateful conversations that survive
a restart, prefix-cache reuse, continuous batching, best-of-n, moderation and API keys; and the web pages
people chat on and rank replies on, whose feedback trains the next reward model.

    run.py        `palmchat serve`: ServeArgs, loading, uvicorn
    drain.py      uvicorn with a drain on SIGTERM: refuse new work, let running requests finish, exit 0
    app.py        create_app: assembles the routers, error handlers, middleware and the scheduler's lifespan
    routes/       one file per endpoint family: health (+ metrics, pages), models, chat, completions, responses,
                  conversations, moderations, feedback (thumbs, compare, the labelling queue, admin reload)
    state.py      ServerState, what every route shares: the state of a request, the caller's key and rate limit
    errors.py     OpenAI-shaped errors and their handlers, the request-body limit
    sampling.py   request -> model check, best-of count, sampling parameters, the prompt fitted to the context
    generate.py   prompt ids -> reply text through the scheduler: stop strings, moderation, best-of-n
    streaming.py  server-sent events (with keep-alive comments), and whether a request's client went away
    metrics.py    Prometheus metrics
    schemas.py    request bodies and the OpenAI objects returned
    truncation.py leaving out the oldest messages of a conversation too long for the context
    keys.py       `palmchat keys`, key hashing, rate limits
    static/       the chat page (index.html, chat.js), the labelling page (label.html, label.js), common.js,
                  style.css, and vendor/ (marked and DOMPurify from npm, with their licences): no build step,
                  nothing loaded from the internet

The database they use (responses, conversations, API keys, feedback) is palmchat/store.py, shared with the
feedback commands and the loop. Nothing here is imported by the training code; FastAPI is needed by app.py and
what it imports, not by run.py, keys.py or truncation.py (`pip install palmchat[serve]`).
"""
