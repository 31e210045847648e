"""The chat page (/) and the labelling page (/label) in a real headless Chromium (Debian's `chromium`, driven
by the playwright package) against a real `palmchat serve` on loopback.

Every page blocks any request that is not to the server (so the pages provably load nothing from the
internet) and records console errors and uncaught exceptions. The model is tests/server_fixtures.py's tiny
random-weight checkpoint: its replies are word salad, always as long as the max tokens asked for.
Screenshots of each page are saved to $PALMCHAT_SCREENSHOTS when it is set (`make screenshots` writes the
README's, docs/*.png), else to the test's temporary folder, so a test run never changes the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from server_fixtures import Server, build_checkpoints, build_demo_shaped_checkpoint

pytestmark = pytest.mark.timeout(240)

CHROMIUM = shutil.which("chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
DOCS = Path()  # where screenshots go: set by the `web` fixture
SERVER_LIMIT = 65536  # the server's --max-request-bytes
# Loaded failing on purpose by the bad-input test (413 too large, 404 deleted conversation): Chromium logs
# each failed fetch as a console error, which that test expects and every other test forbids.
EXPECTED_FAILED_FETCH = re.compile(r"Failed to load resource: the server responded with a status of (404|413)")


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    if CHROMIUM is None:
        if os.environ.get("CI"):  # CI must run them: `make test` installs chromium
            pytest.fail("Debian's chromium is not installed (`make test` installs it: apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (`make test` installs it: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is in the dev extra")
    from palmchat.feedback.exchange import import_prompts
    from palmchat.store import Store

    root = tmp_path_factory.mktemp("web")
    policy, _ = build_checkpoints(root)
    db = root / "web.db"
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "What pet does Briruul have?", "What is 17 + 25?", "Sort these numbers: 9 4 7.")))
    store = Store(db)
    import_prompts(store, prompts, k=3, max_tokens=12)
    store.close()
    srv = Server(policy, db, "--moderation", "none", "--max-request-bytes", str(SERVER_LIMIT),
                 log=root / "server.log", no_auth=True).start()
    srv.db = db
    global DOCS
    DOCS = Path(os.environ.get("PALMCHAT_SCREENSHOTS") or root / "screenshots")
    DOCS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield srv, browser
        browser.close()
    srv.stop()


@pytest.fixture(scope="module")
def demo_web(web, tmp_path_factory):
    """The browser of `web` and a server of the demo's shape, context included (server_fixtures.py)."""
    root = tmp_path_factory.mktemp("demo-web")
    srv = Server(build_demo_shaped_checkpoint(root), root / "web.db", "--moderation", "none",
                 log=root / "server.log", no_auth=True).start()
    yield srv, web[1]
    srv.stop()


class Page:
    """A fresh browser context and page that only reaches the server, with console errors recorded."""

    def __init__(self, web, width: int = 1280, height: int = 800, answers: list[str] | None = None,
                 page_defaults: bool = False):
        srv, browser = web
        self.url = srv.url
        self.context = browser.new_context(viewport={"width": width, "height": height})
        # short replies unless the page's own defaults are under test (a test that needs a long one sets #max-tokens)
        if not page_defaults:
            self.context.add_init_script("if (!localStorage.getItem('palmchat.maxTokens')) {"
                                         " localStorage.setItem('palmchat.maxTokens', '24');"
                                         " localStorage.setItem('palmchat.theme', 'light'); }")
        self.page = self.context.new_page()
        self.errors, self.blocked, self.answers = [], [], list(answers or [])
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("dialog", lambda d: d.accept(self.answers.pop(0) if self.answers else ""))
        self.page.route("**/*", self._route)

    def _route(self, route):
        if route.request.url.startswith(self.url + "/"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def goto(self, path: str = "/"):
        self.page.goto(self.url + path)
        self.idle()

    def idle(self, timeout: float = 30_000):
        """Wait until nothing is being sent or streamed."""
        self.page.wait_for_function("() => !document.querySelector('.message.pending') && "
                                    "(!document.getElementById('send') || !document.getElementById('send').disabled)",
                                    timeout=timeout)

    def send(self, text: str):
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def error_text(self) -> str:
        self.page.wait_for_selector("#error:not([hidden])")
        return self.page.inner_text("#error")

    def messages(self) -> list[tuple[str, str]]:
        """(role, text) of each message shown."""
        return [(m.get_attribute("class").split()[1], m.query_selector(".body").inner_text().strip())
                for m in self.page.query_selector_all("#messages .message")]

    def items(self) -> list[str]:
        """The server's item id of each message shown."""
        return [m.get_attribute("data-item") for m in self.page.query_selector_all("#messages .message")]

    def versions(self) -> list[str]:
        """The "2/3" of each message shown ("" where it has no other version)."""
        return [m.inner_text() if m else "" for m in
                (n.query_selector(".branches .position") for n in self.page.query_selector_all("#messages .message"))]

    def close(self, expected_failures: bool = False):
        errors = [e for e in self.errors if not (expected_failures and EXPECTED_FAILED_FETCH.search(e))]
        self.context.close()
        assert not self.blocked, f"requests outside the server: {self.blocked}"
        assert not errors, f"console errors: {errors}"


def conversation_tree(srv, conversation: str) -> dict:
    response = httpx.get(f"{srv.url}/v1/conversations/{conversation}/tree")
    assert response.status_code == 200, response.text
    return response.json()


def assistant_texts(p: Page) -> list[str]:
    return [text for role, text in p.messages() if role == "assistant"]


def test_chat_streams_survives_reload_stop_thumbs_regenerate(web):
    p = Page(web, answers=["Looks right", "A renamed chat"])
    p.goto("/")
    assert p.page.title() == "palmchat" and p.page.inner_text("#title") == "New chat"
    # record the lengths of the reply shown while it streams in
    p.page.evaluate("""() => { window.partials = new Set(); new MutationObserver(() => {
        const text = document.querySelector('.message.assistant.pending .body')?.textContent;
        if (text) window.partials.add(text.length); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    p.page.evaluate("() => document.getElementById('max-tokens').value = '400'")
    p.send("Where does Zorbo live?")
    p.page.wait_for_selector(".message.assistant .actions")  # drawn again from the server when finished
    p.idle()
    assert p.page.evaluate("window.partials.size") >= 2  # shown as it streamed in, not all at once
    first = p.messages()
    assert first[0] == ("user", "Where does Zorbo live?") and first[1][0] == "assistant" and first[1][1]
    assert "?c=conv_" in p.page.url
    p.page.evaluate("() => document.getElementById('max-tokens').value = '24'")
    p.send("And **Briruul**?")
    p.page.wait_for_function("() => document.querySelectorAll('.message.assistant .actions').length == 2")
    p.idle()
    before = p.messages()

    p.page.reload()
    p.idle()
    p.page.wait_for_selector(".message.assistant .actions")
    assert p.messages() == before  # the server kept everything
    assert p.page.inner_text("#conversations li.active") .startswith("Where does Zorbo live?")

    # stop a long reply: the page then shows what the server stored, and a reload shows the same
    p.page.evaluate("() => document.getElementById('max-tokens').value = '1500'")
    p.send("Tell me a long story.")
    p.page.wait_for_function("() => (document.querySelector('.message.assistant.pending .body')?.textContent || '')"
                             ".length > 10")
    # clicked from the page itself: no waiting for the button to be "stable" while the reply streams in
    assert p.page.evaluate("() => { const b = document.getElementById('stop'); b.click(); return !b.hidden; }")
    p.page.wait_for_selector("text=(incomplete: stopped, or cut at the length limit)")
    p.idle()
    stopped = p.messages()
    assert len(stopped) == 6 and stopped[-2] == ("user", "Tell me a long story.")
    assert 10 < len(stopped[-1][1]) < 1500 * 8
    p.page.reload()
    p.page.wait_for_selector("text=(incomplete: stopped, or cut at the length limit)")
    assert p.messages() == stopped
    p.page.evaluate("() => document.getElementById('max-tokens').value = '24'")

    # thumbs up with a comment, kept across a reload
    p.page.click(".message.assistant >> nth=0 >> .rate.up")
    p.page.wait_for_selector(".message.assistant >> nth=0 >> .rate.up.chosen")
    p.page.reload()
    p.page.wait_for_selector(".message.assistant >> nth=0 >> .rate.up.chosen")

    # regenerate the last reply: same number of messages, a new last reply (the old one is kept beside it)
    p.page.hover(".message.assistant.last")
    p.page.click(".message.assistant.last .regenerate")
    p.page.wait_for_function("() => document.querySelectorAll('.message.assistant .actions').length == 3 && "
                             "!document.querySelector('.message.pending')")
    p.idle()
    regenerated = p.messages()
    assert len(regenerated) == 6 and regenerated[-2] == ("user", "Tell me a long story.")
    assert p.versions()[-1] == "2/2"

    # rename in the sidebar
    p.page.click("#conversations li.active [aria-label=Rename]")
    p.page.wait_for_function("() => document.getElementById('title').textContent == 'A renamed chat'")
    assert p.page.inner_text("#conversations li.active .open") == "A renamed chat"

    composer = p.page.locator("#composer").bounding_box()  # a long conversation scrolls; the composer stays
    assert composer["y"] + composer["height"] <= 800
    p.page.screenshot(path=str(DOCS / "chat-light.png"))
    p.page.click("#theme")
    assert p.page.evaluate("document.documentElement.dataset.theme") == "dark"
    p.page.screenshot(path=str(DOCS / "chat-dark.png"))
    p.page.click("#theme")
    p.close()


def test_branches_regenerate_edit_flip_rank_delete_and_survive_reload_and_restart(web):
    srv, _ = web
    p = Page(web)
    p.goto("/")
    p.send("What pet does Briruul have?")
    p.page.wait_for_selector(".message.assistant .actions")
    p.idle()
    for n in (2, 3):  # regenerate twice: three versions of the reply, the newest shown
        p.page.click(".message.assistant.last .regenerate")
        p.page.wait_for_function(f"() => document.querySelector('.message.assistant .position')?.textContent == "
                                 f"'{n}/{n}' && !document.querySelector('.message.pending')")
        p.idle()
    conversation = p.page.url.split("?c=")[1]
    replies = [i for i in conversation_tree(srv, conversation)["data"] if i["role"] == "assistant"]
    assert len(replies) == 3 and p.items()[1] == replies[2]["id"]
    for n in (2, 1):  # flip back through them
        p.page.click(".message.assistant .prev")
        p.page.wait_for_function(f"() => document.querySelector('.message.assistant .position').textContent == "
                                 f"'{n}/3'")
        assert p.items()[1] == replies[n - 1]["id"]

    # a follow-up on the first version, then the follow-up edited: a new branch that continues
    p.send("And its name?")
    p.page.wait_for_function("() => document.querySelectorAll('.message.assistant .actions').length == 2")
    p.idle()
    p.page.click(".message.user >> nth=1 >> .edit")
    p.page.fill(".editing textarea", "And its age?")
    p.page.click(".editing .save-edit")
    p.page.wait_for_function("() => document.querySelector('.message.user:nth-of-type(3) .position')?.textContent == "
                             "'2/2' && !document.querySelector('.message.pending')")
    p.idle()
    edited = p.messages()
    assert p.items()[1] == replies[0]["id"] and edited[2] == ("user", "And its age?")
    assert edited[3][0] == "assistant" and p.versions() == ["", "1/3", "2/2", ""]

    # rank the three versions of the first reply: kept as this person's ranking of those siblings
    p.page.click(".message.assistant >> nth=0 >> .rank")
    order = [replies[1]["id"], replies[2]["id"]]
    for item_id in order:
        p.page.click(f".candidate[data-id='{item_id}']")
    p.page.click(".submit-ranking")
    p.page.wait_for_selector("text=Ranking saved")
    from palmchat.cli import main

    out = srv.db.parent / "trees.jsonl"
    assert main(["feedback", "export", "--db", str(srv.db), "--format", "oasst", "--out", str(out)]) == 0
    root = next(t["prompt"] for t in map(json.loads, out.read_text().splitlines())
                if t["prompt"]["message_id"] == p.items()[0])
    assert [r["ranking"] for r in root["labeller_rankings"]] == [order + [replies[0]["id"]]]
    assert {r["message_id"]: r["rank"] for r in root["replies"]} == {
        replies[1]["id"]: 0, replies[2]["id"]: 1, replies[0]["id"]: 2}

    # everything is still there after a reload, and after a server restart
    p.page.reload()
    p.page.wait_for_selector(".message.assistant .actions")
    p.idle()
    assert p.messages() == edited and p.versions() == ["", "1/3", "2/2", ""]
    p.close()
    srv.stop()
    srv.start()
    p = Page(web)
    p.goto(f"/?c={conversation}")
    p.page.wait_for_selector(".message.assistant .actions")
    assert p.messages() == edited and p.versions() == ["", "1/3", "2/2", ""]

    # flip to the first follow-up, then delete that branch: the edited one is shown again, with no other version
    p.page.click(".message.user >> nth=1 >> .prev")
    p.page.wait_for_function("() => document.querySelector('.message.user:nth-of-type(3) .position')?.textContent "
                             "== '1/2'")
    assert p.messages()[2] == ("user", "And its name?")
    p.page.click(".message.user >> nth=1 >> .delete-branch")
    p.page.wait_for_function("() => document.querySelectorAll('.branches .position').length == 1")
    assert p.messages() == edited and p.versions() == ["", "1/3", "", ""]
    p.close()


def test_the_demos_model_with_the_pages_defaults_keeps_chatting_past_its_context(demo_web):
    """No settings touched: the first message gets a streamed reply, and a conversation longer than the model's
    context keeps getting replies, with a line where the messages the last reply could not see end."""
    p = Page(demo_web, page_defaults=True)
    p.goto("/")
    context = httpx.get(p.url + "/v1/models").json()["data"][0]["max_model_len"]
    assert context >= 1024 and p.page.input_value("#max-tokens") == ""  # auto: the reply may use the room left
    p.page.evaluate("""() => { window.partials = new Set(); new MutationObserver(() => {
        const text = document.querySelector('.message.assistant.pending .body')?.textContent;
        if (text) window.partials.add(text.length); })
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    questions = ["Where does Zorbo live?", "And Briruul?", "What is 17 + 25?"]
    for turn, question in enumerate(questions, 1):
        p.send(question)
        p.page.wait_for_function(f"() => document.querySelectorAll('.message.assistant .actions').length == {turn}")
        p.idle(timeout=60_000)
        assert p.page.is_hidden("#error"), p.page.inner_text("#error")
        shown = p.messages()
        assert len(shown) == 2 * turn and shown[-2] == ("user", question) and shown[-1][1]
    assert p.page.evaluate("window.partials.size") >= 2  # replies stream in
    # each reply filled the room its prompt left: every later turn had to leave the earlier ones out
    note = p.page.inner_text(".note.truncated")
    assert f"no longer in the model's context ({context} tokens)" in note
    # the line sits after the last message left out: at least the first exchange, never the newest question
    position = p.page.evaluate("() => [...document.querySelectorAll('#messages > *')]"
                               ".findIndex((e) => e.classList.contains('truncated'))")
    assert 2 <= position <= 4
    p.page.locator(".note.truncated").scroll_into_view_if_needed()
    p.page.screenshot(path=str(DOCS / "long-chat.png"))
    p.page.reload()
    p.page.wait_for_selector(".note.truncated")  # still said after a reload
    p.close()


def test_compare_two_replies_rank_them_and_find_the_ranking_in_the_export(web, tmp_path):
    from palmchat.cli import main

    srv, _ = web
    p = Page(web)
    p.goto("/")
    p.page.check("#compare")
    p.page.select_option("#compare-n", "2")
    with p.page.expect_response(lambda r: r.url.endswith("/compare")) as response:
        p.send("Which town is nicest?")
    texts = {c["id"]: c["text"] for c in response.value.json()["candidates"]}
    p.page.wait_for_selector(".candidate >> nth=1")
    p.idle()
    ids = [c.get_attribute("data-id") for c in p.page.query_selector_all(".candidate")]
    assert sorted(ids) == sorted(texts)
    p.page.click(f".candidate[data-id='{ids[1]}']")
    assert p.page.inner_text(f".candidate[data-id='{ids[1]}'] .rank") == "#1"
    p.page.screenshot(path=str(DOCS / "compare.png"))
    p.page.click(".submit-ranking")
    p.page.wait_for_selector(f".message.assistant[data-item='{ids[1]}'] .actions")
    assert not p.page.query_selector(".compare")
    assert [role for role, _ in p.messages()] == ["user", "assistant"]

    out = tmp_path / "rankings.jsonl"
    assert main(["feedback", "export", "--db", str(srv.db), "--format", "rankings", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    mine = [r for r in records if r["prompt"] == "Which town is nicest?" and r["source"] == "compare"]
    assert len(mine) == 1
    best = mine[0]["responses"][mine[0]["ranking"][0]]
    assert best == texts[ids[1]]
    p.close()


def test_a_labeller_ranks_a_queued_prompt(web):
    srv, _ = web
    p = Page(web)
    p.goto("/label")
    p.page.fill("#labeller", "web-labeller")
    p.page.press("#labeller", "Tab")  # change event: the page takes the next task for this labeller
    p.page.wait_for_selector("#stats:has-text('you ranked 0')")
    p.page.wait_for_selector(".candidate >> nth=2")
    prompt = p.page.inner_text(".prompt")
    p.page.screenshot(path=str(DOCS / "label.png"))
    for candidate in p.page.query_selector_all(".candidate"):
        candidate.click()
    p.page.click("#submit-ranking")
    p.page.wait_for_selector("#stats:has-text('you ranked 1')")
    p.page.wait_for_selector(".candidate >> nth=2")
    assert p.page.inner_text(".prompt") != prompt  # the next prompt
    stats = httpx.get(srv.url + "/v1/label/stats", headers={"x-palmchat-labeller": "web-labeller"}).json()
    assert stats["mine"] == 1 and stats["tasks"] == 3
    p.close()


def test_bad_input_gets_a_clear_message_and_never_a_broken_state(web):
    srv, _ = web
    p = Page(web)
    p.goto("/")
    conversations = len(httpx.get(srv.url + "/v1/conversations?limit=100").json()["data"])

    p.page.press("#input", "Enter")
    assert p.error_text() == "Type a message first."
    p.send("   \n  ")
    assert p.error_text() == "Type a message first."

    huge = "word " * (SERVER_LIMIT // 5 + 100)
    p.page.fill("#input", huge)
    p.page.wait_for_selector("#limit.over")
    assert "too long to send" in p.page.inner_text("#limit")
    p.page.press("#input", "Enter")
    p.page.wait_for_function("() => document.getElementById('error').textContent.includes('Shorten it')")
    message = p.error_text()
    assert "Shorten it (nothing was sent)" in message and "at most 60.0 KB" in message
    assert p.page.input_value("#input") == huge
    assert len(httpx.get(srv.url + "/v1/conversations?limit=100").json()["data"]) == conversations  # nothing sent

    # a page that believes the server takes more: the server's 413 message is shown, the text is kept
    p.page.route("**/health", lambda route: route.fulfill(json={"status": "ok", "limits": {
        "max_request_bytes": 10 * SERVER_LIMIT, "max_output_tokens": 64, "context_tokens": 2048}}))
    p.goto("/")
    p.page.fill("#input", huge)
    p.page.press("#input", "Enter")
    p.page.wait_for_function("() => document.getElementById('error').textContent.includes('413') || "
                             "document.getElementById('error').textContent.includes('limit of')")
    assert f"larger than this server's limit of {SERVER_LIMIT} bytes" in p.error_text()
    p.page.wait_for_function("() => document.getElementById('title').textContent == 'New chat'")
    p.idle()
    assert p.page.input_value("#input") == huge.strip()
    # the conversation created for the refused message was removed again
    assert len(httpx.get(srv.url + "/v1/conversations?limit=100").json()["data"]) == conversations
    p.send("A short one.")  # still works
    p.page.wait_for_selector(".message.assistant .actions")
    p.idle()
    assert [role for role, _ in p.messages()] == ["user", "assistant"]

    # ranking a comparison whose conversation was deleted (e.g. in another tab)
    p.page.click("#new-chat")
    p.page.check("#compare")
    p.send("Rank me after a deletion.")
    p.page.wait_for_selector(".candidate >> nth=1")
    p.idle()
    conversation = p.page.url.split("?c=")[1]
    assert httpx.delete(f"{srv.url}/v1/conversations/{conversation}").status_code == 200
    for candidate in p.page.query_selector_all(".candidate"):
        candidate.click()
    p.page.click(".submit-ranking")
    message = p.error_text()
    assert f"The conversation of this comparison ({conversation}) was deleted" in message
    assert "Nothing was stored" in message
    # the page then reloads the list and, the conversation being gone, opens a new chat keeping the message
    p.page.wait_for_function("() => document.getElementById('title').textContent == 'New chat'")
    assert "Nothing was stored" in p.error_text() and not p.page.query_selector(".compare")
    assert not p.page.query_selector(f"#conversations li[data-id='{conversation}']")
    p.page.uncheck("#compare")
    p.send("Still working?")
    p.page.wait_for_selector(".message.assistant .actions")
    p.close(expected_failures=True)


def test_markdown_is_rendered_and_sanitised_and_shift_enter_is_a_newline(web):
    p = Page(web)
    p.goto("/")
    html = p.page.evaluate("""() => { const d = document.createElement('div');
        renderMarkdown(d, '**bold** and `code`\\n\\n```\\nx = 1\\n```\\n<b onclick="window.hit=1">b</b><script>window.hit=1</script>');
        return d.innerHTML; }""")  # noqa: E501
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "<pre><code>x = 1" in html
    assert "onclick" not in html and "<script" not in html and p.page.evaluate("window.hit") is None
    # the Content-Security-Policy reports the handler the sanitiser met while parsing (in a document that runs nothing)
    p.errors = [e for e in p.errors if not e.startswith("Executing inline event handler violates")]
    p.page.fill("#input", "line one")
    p.page.press("#input", "Shift+Enter")
    p.page.type("#input", "line two")
    assert p.page.input_value("#input") == "line one\nline two" and not p.page.query_selector(".message")
    p.close()


def test_a_conversation_an_agent_ran_with_tools_shows_its_calls_and_results(web):
    """A conversation that called a client's tool through the API: the page shows the call (name and arguments)
    and the result the client sent back, between the question and the answer, after a reload too."""
    srv, _ = web
    model = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
    conversation = httpx.post(f"{srv.url}/v1/conversations", json={}).json()["id"]
    calculator = {"type": "function", "name": "calculator", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}
    first = httpx.post(f"{srv.url}/v1/responses", timeout=60, json={
        "model": model, "input": "What is 17 + 25?", "conversation": conversation, "tools": [calculator],
        "tool_choice": "required", "max_output_tokens": 48}).json()
    call = next(item for item in first["output"] if item["type"] == "function_call")
    answer = httpx.post(f"{srv.url}/v1/responses", timeout=60, json={
        "model": model, "conversation": conversation, "max_output_tokens": 8,
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "42"}]})
    assert answer.status_code == 200, answer.text
    p = Page(web)
    for _ in range(2):  # opened, then reloaded
        p.goto(f"/?c={conversation}")
        p.page.wait_for_selector("#messages .message.assistant")
        shown = [n.get_attribute("class").split()[0] for n in
                 p.page.query_selector_all("#messages .message, #messages .tool-item")]
        assert shown == ["message", "tool-item", "tool-item", "message"]
        tools = [(n.query_selector(".role").text_content(), n.query_selector("pre").text_content())
                 for n in p.page.query_selector_all("#messages .tool-item")]
        assert tools == [("tool call", f"calculator({call['arguments']})"), ("tool result", "42")]
    assert [role for role, _ in p.messages()] == ["user", "assistant"]
    p.close()


def test_phone_width(web):
    p = Page(web, width=390, height=844)
    p.goto("/")
    sidebar = p.page.locator("#sidebar")
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # off screen, behind ☰
    p.send("Hello from a phone.")
    p.page.wait_for_selector(".message.assistant .actions")
    p.idle()
    assert p.page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    p.page.screenshot(path=str(DOCS / "phone.png"))
    p.page.click("#open-sidebar")
    p.page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    p.page.screenshot(path=str(DOCS / "phone-sidebar.png"))
    p.page.click("#conversations li .open >> nth=0")
    p.page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    p.idle()
    p.close()
