"""The run store as the one reader: any corrupt run folder is listed as unreadable and breaks no reader.

The good run is a real CPU run (cpu_runs.py: FSDP2 ZeRO-3, gpt-tiny, 2 ranks); each variant copies
its folder and breaks one thing the way a crash, a full disk, a stray editor or a careless script
would. Then `list_runs`, `shardlab runs`, `compare`, the figures and `report` are run over the good
run and the broken one together: none may raise, the good run must still read as it did, and a
folder whose status or plan cannot be read must say `unreadable` with the reason.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import time

import pandas as pd
import pytest
from cpu_runs import ANALYSIS, needs, real_runs

from shardlab import cli
from shardlab import compare as C
from shardlab.run.metrics import StepRecord, clean_line
from shardlab.run.store import list_runs, load_run

BAD_UTF8 = b"\xff\xfe\x80 not utf-8 \xc3\x28"


def _write(name: str, data: bytes | str):
    def corrupt(d):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return corrupt


def _append(name: str, data: bytes):
    def corrupt(d):
        with open(d / name, "ab") as f:
            f.write(data)
    return corrupt


def _insert_line(name: str, data: bytes):
    def corrupt(d):
        lines = (d / name).read_bytes().splitlines(keepends=True)
        (d / name).write_bytes(b"".join(lines[:1] + [data + b"\n"] + lines[1:]))
    return corrupt


def _remove(name: str):
    def corrupt(d):
        (d / name).unlink()
    return corrupt


def _replace_by(name: str, kind: str):
    def corrupt(d):
        (d / name).unlink()
        if kind == "dir":
            (d / name).mkdir()
        elif kind == "fifo":
            os.mkfifo(d / name)
        else:
            os.symlink("/dev/zero", d / name)
    return corrupt


def _status(**changes):
    def corrupt(d):
        info = json.loads((d / "status.json").read_text())
        (d / "status.json").write_text(json.dumps({**info, **changes}))
    return corrupt


def _unreadable_folder(d):
    (d / "UNREADABLE").touch()  # the test denies every access below this folder (see _deny)


# (id, corrupt(folder), True where the folder must list as unreadable)
VARIANTS = [
    ("status-a-list", _write("status.json", "[1, 2, 3]"), True),
    ("status-not-utf8", _write("status.json", BAD_UTF8), True),
    ("status-truncated", _write("status.json", '{"status": "compl'), True),
    ("status-empty", _write("status.json", ""), True),
    ("status-null", _write("status.json", "null"), True),
    ("status-deep-nesting", _write("status.json", "[" * 100_000 + "]" * 100_000), True),
    ("status-wrong-type", _status(status=5), True),
    ("status-unknown-word", _status(status="exploded"), True),
    ("status-fields-wrong-types", _status(started_at="yesterday", ended_at=[1], world_size="two", steps=None,
                                          launcher_pid="me", processes="many", model={"x": 1}), False),
    ("status-huge-numbers", _status(started_at=1e308, ended_at=float("inf"), launcher_pid=2**70), False),
    ("status-missing", _remove("status.json"), True),
    ("status-a-directory", _replace_by("status.json", "dir"), True),
    ("status-a-fifo", _replace_by("status.json", "fifo"), True),
    ("status-links-to-dev-zero", _replace_by("status.json", "devzero"), True),
    ("plan-missing", _remove("plan.yaml"), True),
    ("plan-garbage", _write("plan.yaml", "framework: [unclosed\n  - : :"), True),
    ("plan-not-utf8", _write("plan.yaml", BAD_UTF8), True),
    ("plan-a-list", _write("plan.yaml", "- 1\n- 2\n"), True),
    ("run-json-a-list", _write("run.json", "[]"), False),
    ("run-json-wrong-model", _write("run.json", '{"model": 5, "steps": "x", "device": 7}'), False),
    ("metrics-stray-bytes", _insert_line("metrics.jsonl", b'{"step": 2, "ra\x00\xff\xfek": 0}'), False),
    ("metrics-wrong-types", _insert_line("metrics.jsonl", b'{"step": "two", "rank": 0, "loss": "low"}'), False),
    ("metrics-bad-figures", _insert_line("metrics.jsonl", b'{"step": 1, "rank": 0, "loss": "low", "state_bytes": "lots", '
                                                          b'"comm_bytes": [1, 2], "tokens_per_s": {"a": 1}, "t_start": null}'), False),
    ("metrics-list-line", _insert_line("metrics.jsonl", b"[1, 2, 3]"), False),
    ("metrics-torn-last-line", _append("metrics.jsonl", b'{"step": 4, "rank": 0, "lo'), False),
    ("metrics-a-directory", _replace_by("metrics.jsonl", "dir"), False),
    ("metrics-missing", _remove("metrics.jsonl"), False),
    ("timeline-stray-bytes", _insert_line("timeline.jsonl", BAD_UTF8 + b'{"t": "now", "rank": "a", "bytes": null}'), False),
    ("timeline-wrong-types", _insert_line("timeline.jsonl", b'{"t": "now", "rank": 0, "bytes": 5}'), False),
    ("prediction-a-list", _write("prediction.json", "[]"), False),
    ("prediction-wrong-types", _write("prediction.json", '{"tokens_per_s": "fast", "step_time_s": null, "phases": 3}'), False),
    ("events-wrong-types", _insert_line("events.jsonl", b'{"event": 5, "gpu": [], "host": 7}'), False),
    ("folder-unreadable", _unreadable_folder, True),
]


def _deny(monkeypatch, folder):
    """Every open / stat / listing below `folder` fails as it does for a folder without read permission
    (the tests run as root, for whom chmod 000 changes nothing)."""
    prefix = str(folder)

    def guard(fn):
        def wrapped(path, *a, **k):
            p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
            # the folder's own entry in its parent stays visible (stat); what is inside does not
            if p.startswith(prefix + os.sep) or (p == prefix and fn is not real_stat):
                raise PermissionError(13, "Permission denied", p)
            return fn(path, *a, **k)
        return wrapped

    real_stat = os.stat

    for mod, name in ((os, "open"), (os, "listdir"), (os, "stat"), (os, "scandir"), (builtins, "open"), (io, "open")):
        monkeypatch.setattr(mod, name, guard(getattr(mod, name)))


@pytest.fixture(scope="module")
@needs(*ANALYSIS)
def good():
    return real_runs()[0]


@pytest.fixture
def store(good, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(good.dir, root / good.id, symlinks=True)
    return root


def _break(store, corrupt, monkeypatch):
    bad = store / "20991231-235959-badbad"
    shutil.copytree(store / sorted(os.listdir(store))[0], bad, symlinks=True)
    corrupt(bad)
    if (bad / "UNREADABLE").exists():
        _deny(monkeypatch, bad)
    return bad


@pytest.mark.parametrize("name,corrupt,unreadable", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_corrupt_run_folder_is_listed_and_breaks_no_reader(name, corrupt, unreadable, good, store, monkeypatch, capsys):
    bad = _break(store, corrupt, monkeypatch)
    listed = list_runs(store).set_index("id")
    assert list(listed.index) == [good.id, bad.name]
    assert listed.loc[good.id, "status"] == "completed" and pd.isna(listed.loc[good.id, "problem"])
    row = listed.loc[bad.name]
    if unreadable:
        assert row["status"] == "unreadable" and isinstance(row["problem"], str) and row["problem"], row.to_dict()
    else:
        assert row["status"] == "completed", row.to_dict()

    assert cli.main(["runs", str(store)]) == 0
    out = capsys.readouterr().out
    assert bad.name in out and good.id in out

    table = C.compare([good.dir, bad])
    assert table.loc[table["id"] == good.id, "state_bytes"].iloc[0] > 0
    assert table.loc[table["id"] == bad.name, "status"].iloc[0] == ("unreadable" if unreadable else "completed")


def _all_broken(good, store) -> list:
    bad = []
    for i, (name, corrupt, _) in enumerate(VARIANTS):
        if name == "folder-unreadable":
            continue  # needs the access guard, which would also hide the report's own files
        d = store / f"20991231-2359{i:02d}-{name}"
        shutil.copytree(good.dir, d, symlinks=True)
        corrupt(d)
        bad.append(d)
    return bad


def test_the_long_frames_take_every_corrupt_folder_at_once(good, store):
    bad = _all_broken(good, store)
    runs = C.load_runs([good.dir, *bad])
    loss = C.loss_frame(runs)
    assert (loss.loc[loss["id"] == good.id, "loss"] > 0).all()
    for frame in (C.phase_frame, C.timeline_frame, C.memory_breakdown, C.comm_frame):
        assert len(frame(runs)), frame.__name__


def test_report_and_its_figures_take_a_corrupt_folder(good, store, tmp_path):
    from shardlab.report import write_report

    bad = store / "20991231-235959-badbad"
    shutil.copytree(good.dir, bad, symlinks=True)
    for name, corrupt, _ in VARIANTS:  # one folder broken several ways: rendering is the slow part
        if name in ("plan-garbage", "metrics-bad-figures", "timeline-stray-bytes", "events-wrong-types"):
            corrupt(bad)
    html = write_report([good.dir, bad], tmp_path / "r.html", png=False).read_text()
    assert html.count('data-root-id="') == 6  # every figure drawn
    assert "unreadable" in html and "plan.yaml cannot be read" in html and good.id in html


def test_a_running_run_whose_launcher_is_gone_is_orphaned(good, store):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    d = store / good.id
    info = json.loads((d / "status.json").read_text())
    info.pop("launcher_boot_start", None)  # first as a run store recorded before the start after boot was
    write = lambda **kw: (d / "status.json").write_text(json.dumps({**info, "status": "running", **kw}))  # noqa: E731
    write(launcher_pid=gone.pid, started_at=time.time())
    assert load_run(d).status == "orphaned" and load_run(d).done
    row = list_runs(store).iloc[0]
    assert row["status"] == "orphaned" and str(gone.pid) in row["problem"]
    write(launcher_pid=os.getpid(), started_at=time.time())  # this process: alive
    assert load_run(d).status == "running" and pd.isna(list_runs(store).iloc[0]["problem"])
    write(launcher_pid=os.getpid(), started_at=time.time() - 10 * 86400)  # the pid now belongs to a younger process
    assert load_run(d).status == "orphaned"
    write(launcher_pid=None)  # an older run store without the launcher's pid: no evidence either way
    assert load_run(d).status == "running"
    from shardlab.run import launcher

    me = float(launcher._me().split(":")[1])
    write(launcher_pid=os.getpid(), launcher_boot_start=me, started_at=time.time() - 10 * 86400)  # the start says: this process
    assert load_run(d).status == "running"
    write(launcher_pid=os.getpid(), launcher_boot_start=me - 3, started_at=time.time())  # same pid, another start
    assert load_run(d).status == "orphaned"


def test_a_process_is_known_by_its_start_after_boot_when_the_boot_time_steps(monkeypatch):
    """Linux's boot time (psutil.boot_time, what create_time adds) is whole seconds recomputed from the
    wall clock, so a slewed clock moves it by 1 s between two readers: CI saw ranks stop because their
    live launcher's create_time no longer matched. The start after boot must not move."""
    import subprocess
    import sys

    import psutil
    from psutil import _pslinux

    from shardlab.run import faults, launcher, watchdog
    from shardlab.run.liveness import process_record, same_process

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec, other_rec = process_record(psutil.Process(child.pid), "rank0"), process_record(psutil.Process(other.pid), "rank1")
        me = launcher._me()
        stepped = _pslinux.boot_time() + 1.0
        monkeypatch.setattr(_pslinux, "boot_time", lambda: stepped)
        later = psutil.Process(child.pid)  # a fresh reader, as another process would be
        assert abs(later.create_time() - rec["create_time"] - 1.0) < 0.02  # the epoch start moved...
        assert same_process(later, rec)  # ...the process is still known
        assert not same_process(later, {"create_time": rec["create_time"]})  # as an old record, by create_time, it is not
        assert not same_process(later, {**rec, "boot_start": other_rec["boot_start"] + 5})  # another start: a reused pid
        assert watchdog._launcher_alive(me)
        assert [p.pid for p in faults.recorded_processes([rec, {**other_rec, "boot_start": -9.0}])] == [child.pid]
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


def test_load_run_refuses_what_is_not_a_run_folder(tmp_path):
    from shardlab.plan import PlanError

    with pytest.raises(PlanError, match="not a directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(PlanError, match="not a run folder"):
        load_run(tmp_path)


def test_the_workers_metrics_lines_keep_the_contract_and_read_back_unchanged(good):
    # DESIGN.md's metrics.jsonl contract, judged on the lines a real worker wrote
    lines = [json.loads(x) for x in (good.dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and len(lines) == len({(x["step"], x["rank"]) for x in lines})
    for line in lines:
        assert {"step", "rank", "loss", "state_bytes", "comm_bytes", "rss_bytes"} <= set(line)
        assert set(line["state_bytes"]) == {"params", "grads", "optimizer"}
        assert clean_line(line) == line
        rebuilt = StepRecord(**{k: v for k, v in line.items() if k in StepRecord.__dataclass_fields__}).to_json()
        assert rebuilt == line


def test_the_live_feed_passes_the_same_lines_the_store_reads_back(tmp_path):
    """A garbled metrics line (step as text, a string where bytes belong) and an event without a name:
    the launcher's live feed must give what `load_run(dir).metrics()` later gives, not its own reading."""
    from shardlab.run.liverun import LiveRun

    good = {"step": 1, "rank": 0, "loss": 2.5, "tokens_per_s": 10.0, "state_bytes": {"params": 4, "grads": "x", "optimizer": 8}}
    lines = [good, {"step": "2", "rank": 0, "loss": 1.0}, {"step": 2, "rank": 1, "rss_bytes": "lots", "loss": 1.5}]
    events = [{"event": "phase", "rank": 0, "what": "building"}, {"rank": 0, "what": "no event name"}]
    for name in ("plan.yaml", "status.json"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in events))
    run = LiveRun(tmp_path, agents=[], sampler=None, steps=2, world_size=2, timeout_s=None, on_event=None,
                  progress=None, info={"status": "running"})
    assert run._drain() is True and run._drain() is False
    fed = [run._queue.get() for _ in range(3)]
    fed_metrics = [{k: v for k, v in x.items() if k != "type"} for x in fed if x["type"] == "metrics"]
    stored = load_run(tmp_path).metrics.to_dict("records")
    assert [x["step"] for x in fed_metrics] == [x["step"] for x in stored] == [1, 2]
    assert fed_metrics[0]["state_bytes"] == {"params": 4, "optimizer": 8} and "rss_bytes" not in fed_metrics[1]
    assert [x.get("what") for x in fed if x["type"] == "event"] == ["building"] == [e["what"] for e in run.worker_events]
    assert run.steps_by_rank == {0: 1, 1: 1}
