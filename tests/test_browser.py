"""The page in a real browser: headless Chromium drives the app as a user would.

Needs Debian's `chromium` (`apt-get install chromium`; `.ci/run` installs it). Without it the test
is skipped with the reason printed (`pytest -rs`), never silently.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from mmchat.serving.examples import EXAMPLES, example_path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
BOT = "#chat [data-testid='bot']"
USER = "#chat [data-testid='user']"


@contextmanager
def browser_page(url: str, tmp_path: Path):
    """A Chromium page on `url`, failing the test on any JavaScript error."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#message textarea")
        yield page
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def need_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install -y chromium)")


@pytest.fixture()
def page(request, tmp_path):
    """The app serving the random tiny checkpoint."""
    need_browser()
    app_server = request.getfixturevalue("app_server")  # only started when there is a browser
    with browser_page(app_server.url, tmp_path) as page:
        yield page


@pytest.fixture()
def demo_page(request, tmp_path):
    """`python app.py` with no flags: the embedded demo model."""
    need_browser()
    demo_server = request.getfixturevalue("demo_app_server")
    with browser_page(demo_server.url, tmp_path) as page:
        yield page


def last_answer(page) -> str:
    answers = page.locator(BOT)
    return answers.last.inner_text() if answers.count() else ""


WATCH = """() => {
    // Record every text the last answer shows, and whether the stats line was cleared (an answer
    // began) since the action; observers run in the page, so no streamed update is missed.
    const stats = document.querySelector('#stats'), chat = document.querySelector('#chat');
    window.answerTexts = [];
    window.statsCleared = false;
    const check = () => {
        if (!stats.innerText.includes('prompt tokens')) window.statsCleared = true;
        const answers = chat.querySelectorAll("[data-testid='bot']");
        const text = answers.length ? answers[answers.length - 1].innerText : '';
        const seen = window.answerTexts;
        if (text && seen[seen.length - 1] !== text) seen.push(text);
    };
    check();
    window.answerTexts = [];
    const observer = new MutationObserver(check);
    observer.observe(stats, {subtree: true, childList: true, characterData: true});
    observer.observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def answer_after(page, action, timeout: float = 60.0) -> list[str]:
    """Do `action`; wait until the stats line was cleared (an answer began) and written again
    (it ended). Returns the texts the last answer showed on the way, the complete one last."""
    page.evaluate(WATCH)
    action()
    page.wait_for_function("window.statsCleared && document.querySelector('#stats').innerText.includes('prompt tokens')",
                           polling=50, timeout=timeout * 1000)
    seen = page.evaluate("window.answerTexts")
    final = last_answer(page)
    return seen if seen and seen[-1] == final else seen + [final]


def set_number(page, elem_id: str, value: str) -> None:
    page.fill(f"#{elem_id} input[type=number]", value)
    page.press(f"#{elem_id} input[type=number]", "Enter")


def test_a_user_chats_about_an_image(page, tmp_path):
    set_number(page, "temperature", "0")  # greedy: the tiny model answers at length, and repeatably
    set_number(page, "max-new-tokens", "64")

    page.set_input_files("#message input[type=file]", str(example_path(EXAMPLES[3])))
    page.wait_for_selector("#message img")  # the attached image's preview
    page.fill("#message textarea", "Describe this picture.")
    seen = answer_after(page, lambda: page.click("#send"))
    assert len(seen) >= 3 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), \
        f"the answer should stream in growing pieces, saw {seen}"
    assert page.locator("#chat img").count() == 1, "the image shows in the thread where it was sent"
    first = seen[-1]

    page.fill("#message textarea", "What colour is the roof?")
    follow_up = answer_after(page, lambda: page.press("#message textarea", "Enter"))[-1]
    assert follow_up and page.locator(BOT).count() == 2 and page.locator(USER).count() == 3  # image, text, text
    assert page.locator(BOT).first.inner_text() == first, "the first answer stays"

    again = answer_after(page, lambda: page.click("#regenerate"))
    assert again[-1] == follow_up, "greedy regeneration gives the same answer"
    assert any(len(t) < len(follow_up) for t in again), "the regenerated answer streamed in again"
    assert page.locator(BOT).count() == 2

    shot = tmp_path / "mmchat.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    page.click("#clear")
    page.wait_for_function(f"document.querySelectorAll(\"{BOT}\").length == 0 && "
                           f"document.querySelectorAll(\"{USER}\").length == 0", polling=50)

    set_number(page, "max-new-tokens", "400")
    page.fill("#message textarea", "Tell me about circles.")
    page.evaluate(WATCH)
    page.click("#send")
    for attempt in range(3):
        page.wait_for_function(f"window.statsCleared && document.querySelectorAll(\"{BOT}\").length == 1 && "
                               f"document.querySelectorAll(\"{BOT}\")[0].innerText.length > 0", polling=20)
        page.click("#stop")
        page.wait_for_function("document.querySelector('#stats').innerText.includes('prompt tokens')", polling=50)
        new_tokens = int(page.inner_text("#stats").split(" new")[0].split()[-1])
        if new_tokens < 400:
            break
        # The tiny model wrote all 400 tokens before Stop reached the server (a busy machine): again.
        page.evaluate(WATCH)
        page.click("#regenerate")
    stopped = last_answer(page)
    time.sleep(1.0)
    assert stopped and last_answer(page) == stopped, "Stop keeps what was said"
    assert new_tokens < 400, f"Stop never ended an answer early in 3 tries ({new_tokens} of 400 tokens)"
    page.screenshot(path=str(tmp_path / "mmchat-stopped.png"), full_page=True)


def test_the_demo_model_names_the_colour_of_a_shape_in_an_example(demo_page):
    """The offline default: a user passes no flag, uploads an example and asks about its shape."""
    page = demo_page
    assert "Serving the demo model" in page.inner_text("body")
    red_circle = next(e for e in EXAMPLES if e.name == "red_circle")
    (shape,) = red_circle.shapes
    set_number(page, "temperature", "0")
    page.set_input_files("#message input[type=file]", str(example_path(red_circle)))
    page.wait_for_selector("#message img")
    page.fill("#message textarea", f"What colour is the {shape.kind}?")
    answer = answer_after(page, lambda: page.click("#send"))[-1]
    assert answer.strip().lower().rstrip(".") == shape.colour, answer

    page.fill("#message textarea", "Where is it?")  # a follow-up: only the first turn says what "it" is
    answer = answer_after(page, lambda: page.press("#message textarea", "Enter"))[-1]
    assert answer.strip().lower().rstrip(".") == "center", answer
