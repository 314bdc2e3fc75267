"""report.py and `shardlab report` on real CPU runs: one self-contained HTML page with the tables and
interactive figures, PNGs beside it, and bad input answered with exit 2 and a message."""

from __future__ import annotations

import re

import pytest
from cpu_runs import ANALYSIS, label, needs, real_runs
from PIL import Image

from shardlab.cli import main
from shardlab.plan import PlanError
from shardlab.report import write_report

FIGURES = ("memory_states", "memory_breakdown", "memory_timeline", "throughput", "comm_bytes", "loss_curves")


@pytest.fixture(scope="session")
@needs(*ANALYSIS)
def runs():
    return real_runs()


@pytest.fixture(scope="session")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "lab.html"
    return write_report([str(r.dir) for r in runs], out)


def test_report_is_one_self_contained_page(report):
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "cdn.bokeh.org" not in html and "<script src=" not in html  # everything inlined
    assert "Bokeh" in html
    assert html.count("docs_json = ") == 1  # one bokeh document holds every figure
    assert len(re.findall(r'data-root-id="', html)) == len(FIGURES)


def test_report_holds_tables_runs_and_claims(report, runs):
    html = report.read_text()
    for heading in ("Measured vs predicted", "Runs", "Claims checked", "Features", "Offloading", "Precision", "Launchers", "When to use which"):
        assert heading in html, heading
    for setup in (("fsdp2", "zero3"), ("deepspeed", "zero3"), ("fsdp1", "ddp")):
        assert label(*setup) in html
    for r in runs:
        assert r.id in html
    assert re.search(r"peak \((KiB|MiB|GiB)\)", html) and "same_losses" in html  # the unit fitted to the column


def test_report_writes_pngs_beside_it(report):
    files = report.with_name(report.stem + "_files")
    for name in FIGURES:
        png = files / f"{name}.png"
        assert png.exists(), name
        img = Image.open(png).convert("RGB")
        assert img.size[0] >= 400 and img.size[1] >= 200
        colours = img.getcolors(maxcolors=1 << 20)
        assert colours and len(colours) > 20, f"{name}.png looks blank"
        assert f"{files.name}/{name}.png" in report.read_text()


def test_bad_input_is_plan_error(tmp_path, runs):
    with pytest.raises(PlanError, match="run_dir=.*not a directory"):
        write_report([tmp_path / "nope"], tmp_path / "r.html")
    with pytest.raises(PlanError, match="must end in .html"):
        write_report([runs[0].dir], tmp_path / "r.pdf")


def test_runs_without_steps_are_named_not_fatal(tmp_path, runs):
    """A run that never trained (its plan, settings and status, no metrics) is listed as such beside real
    runs, and alone it is bad input: there is nothing to draw."""
    import shutil

    silent = tmp_path / "never-trained"
    silent.mkdir()
    for name in ("plan.yaml", "run.json", "status.json"):
        shutil.copy(runs[2].dir / name, silent / name)
    with pytest.raises(PlanError, match="none of the runs has recorded a step"):
        write_report([silent], tmp_path / "alone.html")
    out = write_report([runs[2].dir, silent], tmp_path / "mixed.html", png=False)
    html = out.read_text()
    assert "No steps recorded for" in html and "never-trained" in html
    assert not (tmp_path / "mixed_files").exists()


def test_cli_report(tmp_path, runs, capsys):
    # the command's own main() in this process: the report's imports are already paid by the fixtures
    out = tmp_path / "cli.html"
    assert main(["report", str(runs[0].dir), str(runs[2].dir), "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.exists() and label("fsdp1", "ddp") in out.read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "missing"), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "run_dir=" in err and "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


def test_a_run_store_stands_for_its_runs(tmp_path, runs, capsys):
    """`shardlab report runs -o r.html` refused the store as "not a run folder" (session 19): a folder with run folders
    inside and none of a run's files of its own is read as its runs, here and in compare() / RunCompare alike."""
    import shutil

    from shardlab.compare import load_runs

    store = tmp_path / "store"
    for r in (runs[0], runs[2]):
        shutil.copytree(r.dir, store / r.dir.name)
    (store / "notes").mkdir()  # not a run: left out, as `shardlab runs` leaves it out
    assert sorted(r.id for r in load_runs(store)) == sorted([runs[0].id, runs[2].id])
    assert [r.id for r in load_runs([runs[1].dir, store])][0] == runs[1].id
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "x.html")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_chromium_offline(report):
    """Opened from disk in headless Chromium: bokeh draws every figure, with no console errors."""
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri())
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=60_000)
            assert page.evaluate("Bokeh.documents[0].roots().length") == len(FIGURES)
            page.locator("canvas").first.wait_for(timeout=30_000)
            assert page.locator("canvas").count() >= len(FIGURES)
            assert errors == []
        finally:
            browser.close()
