"""The feedback pages in headless Chromium (Playwright) against ``alignkit feedback serve``: log in, vote by key
and by click on each kind, the admin page, a phone-sized screen, injected markup that must stay text, and an
answer whose response the network lost. Every flow reads the outcome back from the store and saves a screenshot
to ``$ALIGNKIT_SCREENSHOTS`` (else the test's temporary folder), e.g.
``ALIGNKIT_SCREENSHOTS=docs/feedback python -m pytest tests/test_feedback_browser.py``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")
if shutil.which("chromium") is None:
    pytest.skip("no chromium on PATH", allow_module_level=True)

from PIL import Image  # noqa: E402

from _feedback_server import serving  # noqa: E402
from alignkit.feedback.store import SQLiteStore  # noqa: E402

expect = sync_api.expect
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAYLOADS = ["<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=2">',
            '"><svg onload="window.__pwned=3">', "' onmouseover='window.__pwned=4", "javascript:window.__pwned=5"]
ANNOTATORS = ("ann", "ranker", "thumber", "phone", "flaky", "judge1", "judge2", "inj-pairwise", "inj-ranking",
              "inj-thumbs")


def _pair(i: int, a: str, b: str) -> dict:
    return {"prompt": f"question {i}", "responses": [{"text": a, "model": "m1"}, {"text": b, "model": "m2"}]}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One store with a project per flow (each flow has its own annotator), served for the whole module."""
    db = tmp_path_factory.mktemp("feedback") / "fb.sqlite"
    store = SQLiteStore(db, seed=0)
    plain = dict(overlap=3, gold_rate=0.0)
    store.create_project("judged", "pairwise", **plain)  # first: the admin page opens it
    store.add_items("judged", [_pair(i, f"first answer {i}", f"second answer {i}") for i in range(4)])
    store.create_project("pairs", "pairwise", instructions="Pick the more helpful answer.", **plain)
    store.add_items("pairs", [_pair(i, f"Paris is the capital {i}. " + "x" * 120, f"Lyon, I think {i}.")
                              for i in range(3)])
    store.create_project("rank", "ranking", **plain)
    store.add_items("rank", [{"prompt": "Order these from best to worst.",
                              "responses": ["alpha reply", "beta reply", "gamma reply", "delta reply"]}])
    store.create_project("thumbs", "thumbs", **plain)
    store.add_items("thumbs", [{"prompt": f"thumbs prompt {i}", "responses": [f"thumbs answer {i}"]} for i in range(2)])
    store.create_project("retry", "pairwise", **plain)
    store.add_items("retry", [_pair(10 + i, f"retry a{i}", f"retry b{i}") for i in range(2)])
    injected = "\n".join(PAYLOADS)
    store.create_project("inj-pairwise", "pairwise", **plain)
    store.add_items("inj-pairwise", [{"prompt": [{"role": "system", "content": PAYLOADS[0]},
                                                 {"role": "user", "content": injected}],
                                      "responses": [" ".join(PAYLOADS[:3]), " ".join(PAYLOADS[3:])]}])
    store.create_project("inj-ranking", "ranking", **plain)
    store.add_items("inj-ranking", [{"prompt": injected, "responses": PAYLOADS}])
    store.create_project("inj-thumbs", "thumbs", **plain)
    store.add_items("inj-thumbs", [{"prompt": injected, "responses": [injected]}])
    tokens = {name: store.add_annotator(name) for name in ANNOTATORS}
    tokens["boss"] = store.add_annotator("boss", "admin")
    # two annotators judge "judged" (they differ on one item), so agreement and ratings exist for the admin page
    for name, picks in (("judge1", "aaba"), ("judge2", "aabb")):
        who = store.authenticate(tokens[name])["id"]
        while (task := store.next_task(who, "judged")) is not None:
            item = next(it for it in store.items("judged") if it["id"] == task["item"])
            want = picks[int(item["prompt"].split()[-1])]
            first_is_a = task["responses"][0] == item["responses"][0]["text"]
            store.submit(who, task["lease"], {"choice": want if first_is_a else "ba"["ab".index(want)]})
    store.close()
    with serving(db) as server:
        yield server, db, tokens


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser):
    """``open_page(**context options)``: a fresh page (own cookies and sessionStorage); the test fails if a dialog
    opens or a script throws."""
    contexts, problems = [], []

    def make(**options):
        ctx = browser.new_context(**options)
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(10_000)
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        return page

    yield make
    for ctx in contexts:
        ctx.close()
    assert problems == []


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("ALIGNKIT_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str, full_page: bool = True) -> None:
        path = folder / f"feedback_{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        lo, hi = Image.open(path).convert("L").getextrema()
        assert hi - lo > 100, f"{path} is blank"

    return shot


# ------------------------------------------------------------------------------------------------- helpers


def login(page, url: str, token: str, path: str = "/") -> None:
    page.goto(url + path)
    page.fill("#token", token)
    page.press("#token", "Enter")
    expect(page.locator("#login")).to_be_hidden()


def open_project(page, name: str) -> dict:
    page.click(f'button[data-project="{name}"]')
    expect(page.locator("#responses .card").first).to_be_visible()
    return read_task(page)


def read_task(page) -> dict:
    return {"prompt": page.locator("#prompt").text_content(),
            "responses": page.locator("#responses .card .response").all_text_contents()}


def next_task(page, before: dict) -> dict:
    """Wait until the page shows the task after ``before`` and read it."""
    expect(page.locator("#prompt")).not_to_have_text(before["prompt"])
    expect(page.locator("#responses .card").first).to_be_visible()
    return read_task(page)


def done(page) -> None:
    expect(page.locator("#status")).to_have_text("Nothing left to judge in this project. Thank you!")


def item_of(db, project: str, prompt: str) -> dict:
    return next(it for it in SQLiteStore(db).items(project) if it["prompt"] == prompt)


def texts(item: dict) -> list[str]:
    return [r["text"] for r in item["responses"]]


def votes_of(db, project: str, annotator: str) -> list[dict]:
    return [v for v in SQLiteStore(db).votes(project) if v["annotator"] == annotator]


# --------------------------------------------------------------------------------------------------- flows


def test_login_and_pairwise_votes_by_key_and_click(site, open_page, shots):
    server, db, tokens = site
    page = open_page()
    page.goto(server.url + "/")
    page.fill("#token", "not-a-token")
    page.click("#login-form button")
    expect(page.locator("#status")).to_have_text("Unknown token.")
    expect(page.locator("#status")).to_have_class("error")
    shots(page, "login")
    page.fill("#token", tokens["ann"])
    page.click("#login-form button")
    expect(page.locator("#who")).to_have_text("ann (annotator)")
    expect(page.locator("#status")).to_have_text("")

    first = open_project(page, "pairs")
    expect(page.locator("#instructions")).to_have_text("Pick the more helpful answer.")
    page.keyboard.press("b")
    second = next_task(page, first)
    page.fill("#reason", "both name a French city")
    shots(page, "pairwise")
    page.click("#controls button:text-is('Tie')")
    third = next_task(page, second)

    by_key, by_click = votes_of(db, "pairs", "ann")
    item = item_of(db, "pairs", first["prompt"])
    assert by_key["item"] == item["id"]
    assert by_key["answer"] == {"choice": "ab"[texts(item).index(first["responses"][1])], "reason": ""}
    assert by_click["item"] == item_of(db, "pairs", second["prompt"])["id"]
    assert by_click["answer"] == {"choice": "tie", "reason": "both name a French city"}
    assert third["prompt"] not in (first["prompt"], second["prompt"])


def test_ranking_by_keys_and_drag(site, open_page, shots):
    server, db, tokens = site
    page = open_page()
    login(page, server.url, tokens["ranker"])
    shown = open_project(page, "rank")["responses"]
    cards = page.locator("#responses .card")

    def on_page() -> list[str]:
        return page.locator("#responses .card .response").all_text_contents()

    page.keyboard.press("4")  # select the fourth and move it to the top
    for _ in range(3):
        page.keyboard.press("k")
    expected = [shown[3], shown[0], shown[1], shown[2]]
    assert on_page() == expected
    expect(cards.nth(0)).to_have_class("card selected")
    page.keyboard.press("2")
    page.keyboard.press("ArrowDown")
    expected = [expected[0], expected[2], expected[1], expected[3]]
    assert on_page() == expected
    cards.nth(3).drag_to(cards.nth(0))
    expected = [expected[3], *expected[:3]]
    assert on_page() == expected
    expect(cards.nth(0).locator(".label span").first).to_contain_text("#1")
    shots(page, "ranking")
    page.keyboard.press("Enter")
    done(page)

    (vote,) = votes_of(db, "rank", "ranker")
    item = item_of(db, "rank", "Order these from best to worst.")
    assert vote["answer"] == {"ranking": [texts(item).index(t) for t in expected]}


def test_thumbs_down_with_correction_and_up_by_key(site, open_page, shots):
    server, db, tokens = site
    page = open_page()
    login(page, server.url, tokens["thumber"])
    first = open_project(page, "thumbs")
    submit = page.locator("#controls button:text-is('Submit thumbs down')")
    expect(submit).to_be_hidden()
    page.keyboard.press("d")
    expect(page.locator("#correction")).to_be_focused()
    page.keyboard.type("A better answer,\nover two lines.")
    shots(page, "thumbs")
    submit.click()
    second = next_task(page, first)
    page.keyboard.press("u")
    done(page)

    down, up = votes_of(db, "thumbs", "thumber")
    assert down["item"] == item_of(db, "thumbs", first["prompt"])["id"]
    assert down["answer"] == {"thumb": "down", "correction": "A better answer,\nover two lines."}
    assert up["item"] == item_of(db, "thumbs", second["prompt"])["id"]
    assert up["answer"] == {"thumb": "up", "correction": ""}


def test_admin_page_and_annotator_refused(site, open_page, shots):
    server, db, tokens = site
    page = open_page(viewport={"width": 1100, "height": 900})
    login(page, server.url, tokens["boss"], "/admin")
    expect(page.locator("#project")).to_have_value("judged")
    agreement = page.locator("#agreement table")
    expect(agreement).to_be_visible()
    head = agreement.locator("th").all_text_contents()
    row = dict(zip(head, agreement.locator("tbody td").all_text_contents()))
    for key in ("alpha", "pairwise_agreement"):
        assert -1.0 <= float(row[key]) <= 1.0, row
    assert float(row["pairwise_agreement"]) == pytest.approx(0.75, abs=1e-3)  # they differ on one item of four
    names = page.locator("#annotators tbody tr td:first-child").all_text_contents()
    assert sorted(names) == ["judge1", "judge2"]
    expect(page.locator("#leaderboard table")).to_be_visible()
    expect(page.locator("#plots img")).to_have_count(3)
    page.wait_for_function("() => [...document.querySelectorAll('#plots img')].every((i) => i.complete)")
    widths = page.eval_on_selector_all("#plots img", "(imgs) => imgs.map((i) => i.naturalWidth)")
    assert all(w > 0 for w in widths), widths
    shots(page, "admin")

    other = open_page()
    login(other, server.url, tokens["ann"], "/admin")
    expect(other.locator("#status")).to_have_text("This page is for admins.")
    expect(other.locator("#admin")).to_be_hidden()
    assert other.locator("#agreement *, #annotators *, #plots *").count() == 0


def test_phone_viewport_has_no_horizontal_scroll(site, open_page, shots):
    server, db, tokens = site
    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2)
    login(page, server.url, tokens["phone"])
    open_project(page, "pairs")
    width = page.evaluate("innerWidth")
    assert page.evaluate("document.scrollingElement.scrollWidth") <= width
    for key in "abtx":
        button = page.locator(f'#controls button[data-key="{key}"]')
        expect(button).to_be_visible()
        box = button.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (key, box)
    shots(page, "phone", full_page=False)


# The arena is left out: its replies come from models given to the server with --model, which cannot be faked
# through the CLI; it renders through the same card() as a pairwise task, which is checked here.
@pytest.mark.parametrize("kind", ["pairwise", "ranking", "thumbs"])
def test_injected_markup_stays_text(site, open_page, kind):
    server, db, tokens = site
    page = open_page()
    login(page, server.url, tokens[f"inj-{kind}"])
    open_project(page, f"inj-{kind}")
    prompt, responses = page.inner_text("#prompt"), page.inner_text("#responses")
    for payload in PAYLOADS:
        assert payload in prompt and payload in responses, payload
    for card in page.locator("#responses .card .response").all():
        card.hover()
    page.hover("#prompt")
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#responses :is(img, svg, script), #prompt :is(img, svg, script)").count() == 0
    assert page.locator("script:not([src])").count() == 0
    if kind == "pairwise":  # a reason with markup is stored as typed
        page.fill("#reason", PAYLOADS[1])
        page.click("#controls button[data-key='a']")
        done(page)
        (vote,) = votes_of(db, "inj-pairwise", "inj-pairwise")
        assert vote["answer"]["reason"] == PAYLOADS[1]
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_lost_answer_response_is_retried_exactly_once(site, open_page):
    server, db, tokens = site
    page = open_page()
    login(page, server.url, tokens["flaky"])
    sent, acks = [], []

    def lose_first_response(route):
        sent.append(route.request.post_data_json)
        if len(sent) == 1:
            route.fetch()  # the server stores the vote, but the page never hears back
            route.abort()
        else:
            route.continue_()

    page.route("**/api/tasks/*/answer", lose_first_response)
    page.on("response", lambda r: acks.append(r.json()) if r.url.endswith("/answer") else None)
    first = open_project(page, "retry")
    page.keyboard.press("a")
    next_task(page, first)

    assert len(sent) == 2 and sent[0] == sent[1]  # the retry carries the same client_id
    (vote,) = votes_of(db, "retry", "flaky")
    assert vote["item"] == item_of(db, "retry", first["prompt"])["id"]
    assert acks == [{"vote": vote["vote"], "duplicate": True}]
