"""The served app reads nothing from the server's disk that the browser did not upload (issue 19),
checked in a real browser (headless Chromium via Playwright): without its token the page holds no
dashboard, and with it once a cookie carries it and the address drops it; the Import card offers uploads only (no "path on the server" box); an upload whose content
is a path, an accelerate YAML whose deepspeed_config_file points at a file next to the app, and a
DeepSpeed JSON carrying a secret in a key shardlab does not model never put a planted secret on the page.
"""

from __future__ import annotations

import json
import os

import pytest
from test_browser import BIN, browser, serve, stop, wait_http  # noqa: F401 - browser is a fixture

from shardlab.run.host import free_port

pytestmark = pytest.mark.browser

SECRET = "AKIA-PLANTED-7f3a91-SECRET"
UPLOADED = "wandb-key-uploaded-by-the-user-52c1"
TOKEN = "t0ken-for-the-test"


@pytest.fixture
def served(tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    # secrets next to the app, in the formats the importer reads
    (app_dir / "secret.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "aws_secret_access_key": SECRET}))
    (app_dir / "secret.yaml").write_text(f"distributed_type: DEEPSPEED\nhf_token: {SECRET}\n")
    port = free_port()
    proc = serve([str(BIN / "shardlab"), "app", "--port", str(port), "--token", TOKEN],
                 {**os.environ, "SHARDLAB_RUNS_DIR": str(tmp_path / "runs")}, app_dir, tmp_path / "app.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/login", proc, status=403)
        yield f"http://127.0.0.1:{port}/", app_dir
    finally:
        stop(proc)


def page_text(page) -> str:
    """All text on the page, shadow roots included (panel renders into them)."""
    return page.evaluate("""() => {
        const out = [];
        const walk = (root) => {
            for (const el of root.querySelectorAll('*')) {
                if (el.shadowRoot) walk(el.shadowRoot);
            }
            out.push(root.textContent || '');
            for (const el of root.querySelectorAll('input, textarea')) out.push(el.value || '');
        };
        walk(document);
        return out.join('\\n');
    }""")


def upload(page, name: str, content: str) -> None:
    page.locator(".sl-import-upload input[type=file]").set_input_files(
        files=[{"name": name, "mimeType": "application/octet-stream", "buffer": content.encode()}])


def test_the_app_reads_only_uploads_and_never_shows_a_server_file(browser, served):  # noqa: F811 - the fixture
    from playwright.sync_api import expect

    url, app_dir = served
    page = browser
    page.goto(url)  # no token: no dashboard
    expect(page.locator(".sl-token-needed")).to_contain_text("needs its token", timeout=60_000)
    assert page.locator(".sl-import-upload").count() == 0
    page.console_errors.clear()  # that page's own 403, as it should be; none is allowed from here on

    # the token once: a cookie (HttpOnly) from then on, and the address loses the token
    page.goto(f"{url}?token={TOKEN}")
    page.wait_for_selector(".sl-import-upload input[type=file]", timeout=60_000)
    assert TOKEN not in page.url, page.url
    cookie = next(c for c in page.context.cookies() if c["name"] == "shardlab_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKEN not in page.evaluate("document.cookie")
    assert page.locator(".sl-import-path").count() == 0, "a box for a path on the server is back"
    notes = page.locator(".sl-import-notes")

    # an upload whose content is a path (absolute, and relative to the app's folder)
    for i, content in enumerate((str(app_dir / "secret.json"), "secret.json", str(app_dir / "secret.yaml"))):
        upload(page, f"path{i}.json", content)
        expect(notes).to_contain_text(f"path{i}.json is not a DeepSpeed JSON", timeout=60_000)  # the text, not the file it names
        assert SECRET not in notes.inner_text()
    assert SECRET not in page_text(page)

    # an accelerate YAML pointing at the secret file next to the app: not followed, and it says so
    upload(page, "accelerate.yaml", f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {app_dir / 'secret.json'}\n")
    expect(notes).to_contain_text("was not followed", timeout=60_000)
    assert SECRET not in page_text(page)

    # a DeepSpeed JSON carrying a secret under a key shardlab does not model: the notes and the
    # "carried" list name the key, never its value. (The export preview does write it back: that is the
    # user's own upload returned to the same session, issue 15's round trip, not a file of the server.)
    upload(page, "ds.json", json.dumps({"zero_optimization": {"stage": 2}, "wandb": {"api_key": UPLOADED}}))
    expect(notes).to_contain_text("wandb.api_key", timeout=60_000)
    assert UPLOADED not in notes.inner_text()
    expect(page.locator(".sl-carried")).to_contain_text("wandb.api_key", timeout=20_000)
    assert UPLOADED not in page.locator(".sl-carried").inner_text()
    assert SECRET not in page_text(page)
    assert page.console_errors == [], "\n".join(page.console_errors)
