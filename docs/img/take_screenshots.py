"""Take the README's dashboard screenshots: serve `shardlab app`, drive it in headless Chromium, save PNGs here.

    .venv/bin/python docs/img/take_screenshots.py      (about a minute; runs gpt-tiny on the CPU)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    port = 5961
    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "SHARDLAB_RUNS_DIR": str(tmp / "runs")}
    server = subprocess.Popen([str(Path(sys.executable).parent / "shardlab"), "app", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(tmp / "profile"), executable_path="/usr/bin/chromium", args=ARGS,
                                                       headless=True, viewport={"width": 1400, "height": 900})
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_selector(".sl-field-framework select", timeout=120_000)
            page.select_option(".sl-field-framework select", "deepspeed")
            page.locator(".sl-field-topology-gpus_per_node input").fill("8")
            page.locator(".sl-field-topology-gpus_per_node input").press("Enter")
            page.select_option(".sl-memory-card .sl-model select", "gpt-6.7b")
            expect(page.locator(".sl-preview-deepspeed pre")).to_contain_text('"stage": 3', timeout=30_000)
            page.locator("h1").first.click()  # leave the number box, back to the top of the page
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(HERE / "builder.png"))
            page.select_option(".sl-field-offload-params select", "cpu")
            page.select_option(".sl-field-sharding select", "zero2")
            expect(page.locator(".sl-message-offload-params")).to_contain_text("needs sharding=zero3", timeout=30_000)
            page.wait_for_timeout(500)
            page.locator(".sl-group-offload").screenshot(path=str(HERE / "builder-error.png"))
            page.select_option(".sl-field-offload-params select", "none")
            page.select_option(".sl-field-framework select", "fsdp2")
            page.select_option(".sl-field-sharding select", "zero3")
            page.select_option(".sl-field-precision select", "fp32")
            page.locator(".sl-app-tabs .bk-tab", has_text="Run").first.click()
            page.locator(".sl-run-steps input").fill("20")
            page.locator(".sl-run-steps input").press("Enter")
            page.locator(".sl-run-start button").click()
            expect(page.locator(".sl-run-status")).to_contain_text("completed", timeout=300_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(HERE / "run.png"))
            page.locator(".sl-app-tabs .bk-tab", has_text="Compare").first.click()
            page.locator(".sl-cmp-picker select").select_option(index=0)
            page.locator(".sl-cmp-go button").click()
            expect(page.locator(".sl-cmp-table table")).to_be_visible(timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(HERE / "compare.png"), full_page=True)
            ctx.close()
    finally:
        server.terminate()
        server.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
