"""Waiting for a notebook's kernel in JupyterLab from Playwright: the one wait both browser test files use.

JupyterLab 4.6.6 skips every cell of a Run All clicked before the notebook's kernel exists, and the
toolbar's execution indicator reads "idle" before any kernel does (docs/benchmarks.md, "Why the seventh
lab never ran"). The status bar's kernel item is the real signal. A fresh JupyterLab may first ask which
kernel to start (the notebook's own is preselected): that dialog is accepted whenever it shows, instead
of waiting a fixed time for a dialog that usually never comes (15 s of every browser test before).
"""

from __future__ import annotations

import time

# The status bar's kernel item ("Python 3 (ipykernel) | Idle") reads SessionContext.kernelDisplayStatus:
# "Idle" only once a kernel exists, is connected and idle ("Initializing", "Connecting", "Unknown" before).
KERNEL_IDLE_JS = """(name) => {
    const items = Array.from(document.querySelectorAll('.jp-StatusBar-TextItem')).map(e => e.textContent.trim());
    return items.includes(name) && items.some(t => / [|] Idle$/.test(t) && !t.startsWith('No Kernel'));
}"""


def wait_kernel_idle(page, name: str, timeout_s: float = 300) -> None:
    """Until the status bar shows `name` as the current notebook and its kernel as Idle: what the
    facilitator guide tells the room to wait for before Run All. JupyterLab's kernel dialog, if it
    shows meanwhile, is accepted."""
    choose = page.locator(".jp-Dialog .jp-mod-accept")
    end = time.monotonic() + timeout_s
    while not page.evaluate(KERNEL_IDLE_JS, name):
        if time.monotonic() > end:
            status = page.evaluate("() => Array.from(document.querySelectorAll('.jp-StatusBar-TextItem')).map(e => e.textContent.trim()).join(' ; ')")
            raise AssertionError(f"the kernel of {name} was not Idle within {timeout_s:.0f} s (status bar: {status})")
        if choose.count():
            try:
                choose.first.click(timeout=2_000)
            except Exception:  # noqa: BLE001 - the dialog closed between the look and the click
                pass
        page.wait_for_timeout(250)
