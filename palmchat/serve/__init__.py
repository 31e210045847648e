"""The server: an OpenAI-compatible API over a palmchat checkpoint, with stateful conversations that survive
a restart, prefix-cache reuse, continuous batching, best-of-n, moderation and API keys; and the web pages
people chat on and rank replies on, whose feedback trains the next reward model.

    run.py       `palmchat serve`: ServeArgs, loading, uvicorn
    app.py       the endpoints (FastAPI), errors, limits, metrics, the pages
    feedback.py  the feedback endpoints: thumbs, compare, the labelling queue, admin reload
    generate.py  prompt ids -> reply text through the scheduler: stop strings, output moderation, best-of-n
    schemas.py   request bodies and the OpenAI objects returned
    store.py     SQLite: responses, conversations, items, API keys, feedback
    keys.py      `palmchat keys`, key hashing, rate limits
    static/      the chat page (index.html, chat.js), the labelling page (label.html, label.js), common.js,
                 style.css, and vendor/ (marked and DOMPurify from npm, with their licences): no build step,
                 nothing loaded from the internet

Nothing here is imported by the training code; FastAPI is needed only by app.py (`pip install palmchat[serve]`).
"""
