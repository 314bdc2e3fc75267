"""Fuzz the command line for long runs: `python benchmarks/fuzz.py -n 20000 [--seed 0] [--json out.json]`.

Inputs: random bytes, random YAML / JSON built from the Plan's keys and hostile values (keys named
int / str / none / a[0], huge and non-finite numbers, `!!bool maybe`, alias bombs, deep nesting,
mixed-type keys), mutated real configs (tests/corpus, tests/golden/plans), special files (a FIFO,
a link to /dev/zero, a folder, a missing path), and corrupt run folders. Each goes through
`shardlab.cli.main` as `validate`, `import`, `translate`, `estimate` (--params / --model shape file),
`diff` (when the command exists), random small model shapes through `estimate` (a fifth with `--trace`), or the
run store's readers (`runs`, and `load`: the loaders and\nframes behind `report` and the app's Compare tab, without drawing).

Counted, per the robustness contract (issue 19): tracebacks (any exception other than the exit 2 of
bad input, grouped by crash site), hangs (an input taking over 5 s of CPU, or 60 s of wall time
without an answer; on a machine shared by many, wall time over 5 s on less CPU is listed apart as a
stall of the machine), memory growth over 500 MB (the child's peak RSS), and error messages of 2 KB
or more. Inputs run in a child process that is
replaced after a hang or a blow-up; the parent keeps time. Run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 5.0  # CPU seconds one input may take (CPU, not wall time: the machine is shared)
WALL_S = 60.0  # wall seconds before an input that uses no CPU (blocked on a read, say) counts as hung
GROWTH_BYTES = 500 * 10**6
MESSAGE_BYTES = 2048
SEEDS = sorted(p for d in ("tests/corpus", "tests/golden/plans") for p in (ROOT / d).glob("*") if p.is_file())
KEYS = ["framework", "sharding", "precision", "offload", "optimizer", "lr", "weight_decay", "topology", "nodes",
        "gpus_per_node", "micro_batch_size", "gradient_clipping", "buckets", "reduce_bucket_size", "zeropp",
        "zero_optimization", "stage", "bf16", "fp16", "enabled", "train_micro_batch_size_per_gpu",
        "distributed_type", "fsdp_config", "deepspeed_config", "deepspeed_config_file", "num_processes",
        "layers", "hidden", "heads", "vocab", "seq_len", "int", "str", "float", "bool", "none", "a[0]",
        "literal['auto']", "", "\u00e9", "x" * 300]
VALUES = ["auto", "fsdp2", "deepspeed", "zero3", "bf16", "cpu", "none", "true", "maybe", 0, 1, -1, 2, 8, 10**18,
          10**19, 2**63, 1e308, -1e308, 1e-320, float("inf"), float("-inf"), float("nan"), "1e999", "nan",
          "0x" + "f" * 40, None, True, False, [], {}, "x" * 5000, "/etc/passwd", "../../secret.json"]
YAML_SCALARS = ["!!bool maybe", "!!int abc", "!!float x", "!!timestamp 2020-13-45", "!!binary ???", ".inf", ".nan",
                "-.inf", "0x" + "f" * 4000, "1" * 5000, "~", "!!python/object:os.system 1", "*undefined",
                "&a [*a]", "{? [1, 2]: 3}", "[1, {2: 3}]", "!!set {a, b}", "!!omap [a: 1]"]


# ---------------------------------------------------------------------------------------------
# Generators (all from one random.Random, so a seed reproduces the run)


def _value(r: random.Random, depth: int = 0):
    x = r.random()
    if depth < 4 and x < 0.2:
        return {r.choice(KEYS + [1, None, True, 2.5]): _value(r, depth + 1) for _ in range(r.randint(0, 4))}
    if depth < 4 and x < 0.3:
        return [_value(r, depth + 1) for _ in range(r.randint(0, 4))]
    return r.choice(VALUES)


def _yaml_text(r: random.Random) -> str:
    kind = r.random()
    if kind < 0.15:  # alias bomb
        n, w = r.randint(3, 9), r.randint(3, 10)
        lines = ["a0: &a0 [" + ",".join(['"lol"'] * w) + "]"]
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * w) + "]" for i in range(1, n)]
        return "\n".join(lines) + "\n"
    if kind < 0.25:  # deep nesting
        d = r.choice([50, 100, 1000, 5000])
        return "[" * d + "]" * d if r.random() < 0.5 else "a: " + "{b: " * d + "1" + "}" * d
    if kind < 0.5:  # hostile scalars under plausible keys
        return "\n".join(f"{r.choice(KEYS)}: {r.choice(YAML_SCALARS)}" for _ in range(r.randint(1, 4))) + "\n"
    data = _value(r)
    if not isinstance(data, dict) or r.random() < 0.3:
        data = {r.choice(KEYS): _value(r) for _ in range(r.randint(1, 6))}
    try:
        if r.random() < 0.5:
            import yaml

            return yaml.safe_dump(data, allow_unicode=True)
        return json.dumps(data, default=str)
    except Exception:  # a huge int json cannot print, a non-str key yaml may refuse: plain text then
        return str(data)


def _mutate(r: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(r.randint(1, 8)):
        op = r.random()
        i = r.randrange(len(b) + 1)
        if op < 0.3 and b:
            b[min(i, len(b) - 1)] = r.randrange(256)
        elif op < 0.5:
            b[i:i] = r.choice([b"&x ", b"*x", b"{", b"}", b"[", b"\n  ", b": ", b"\x00", b"\xff", b"!!bool maybe",
                               b"1e999", b"int: 1\n", b"0x" + b"f" * 4000, b"\"", b"#", b"-"])
        elif op < 0.7 and b:
            del b[i:i + r.randint(1, 20)]
        else:
            j = r.randrange(len(b) + 1)
            b[i:i] = b[j:j + r.randint(1, 40)]
    return bytes(b)


def make_input(r: random.Random, work: Path) -> tuple[list[str], str]:
    """(argv for shardlab.cli.main, the input's kind)."""
    f = work / r.choice(["in.yaml", "in.json", "in.yml", "in"])
    kind = r.choices(["bytes", "yaml", "mutated", "special", "store", "shape"], [1, 5, 4, 0.3, 0.7, 1])[0]
    for p in work.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    if kind == "bytes":
        f.write_bytes(r.randbytes(r.randint(0, 400)))
    elif kind == "yaml":
        f.write_text(_yaml_text(r))
    elif kind == "mutated":
        f.write_bytes(_mutate(r, r.choice(SEEDS).read_bytes()))
    elif kind == "special":
        what = r.choice(["fifo", "zero", "dir", "missing"])
        if what == "fifo":
            os.mkfifo(f)
        elif what == "zero":
            f.symlink_to("/dev/zero")
        elif what == "dir":
            f.mkdir()
    elif kind == "shape":  # a model shape of valid keys and small, odd values, estimated (a fifth traced: tiny models)
        plan = work / "plan.yaml"
        plan.write_text(f"framework: {r.choice(['fsdp1', 'fsdp2', 'deepspeed'])}\nsharding: {r.choice(['ddp', 'zero2', 'zero3'])}\n"
                        f"precision: {r.choice(['fp32', 'bf16', 'fp16'])}\ntopology: {{gpus_per_node: {r.choice([1, 2, 3])}}}\n")
        heads = r.choice([1, 2, 3, 4])
        shape = {"family": r.choice(["gpt", "llama"]), "layers": r.choice([1, 2, 3]), "hidden": r.choice([6, 8, 12, 30, 64]),
                 "heads": heads, "vocab": r.choice([1, 2, 17, 100]), "seq_len": r.choice([1, 5, 16]),
                 "kv_heads": r.choice([1, heads, 3]), "ffn_hidden": r.choice([1, 7, 40])}
        f.write_text(json.dumps({k: v for k, v in shape.items() if r.random() < 0.9}))
        return ["estimate", str(plan), "--model", str(f)] + (["--trace"] if r.random() < 0.2 else []), kind
    else:  # the store's readers: the `runs` listing, or the loaders behind `report` and the Compare tab
        return [r.choice(["runs", "load"]), str(_store(r, work))], kind
    cmd = r.choice(["validate", "import", "translate", "estimate", "estimate-model", "diff"])
    if cmd == "translate":
        return ["translate", str(f), "--to", r.choice(["fsdp1", "fsdp2", "deepspeed"])], kind
    if cmd == "estimate":
        return ["estimate", str(f), "--params", r.choice(["7e9", "1e308", "nan", "inf", "-1", "0x10", "1" * 400, "1e15"])], kind
    if cmd == "estimate-model":
        plan = work / "plan.yaml"
        plan.write_text("framework: deepspeed\nsharding: zero3\ntopology: {gpus_per_node: 8}\n")
        return ["estimate", str(plan), "--model", str(f)], kind
    if cmd == "diff" and not has_diff():
        cmd = "validate"
    if cmd == "diff":
        other = r.choice(SEEDS)
        return (["diff", str(f), str(other)] if r.random() < 0.5 else ["diff", str(other), str(f)]), kind
    return [cmd, str(f)], kind


def has_diff() -> bool:
    """`shardlab diff` exists (issue 15 adds it): fuzzed from then on."""
    from shardlab.cli import build_parser

    return "diff" in build_parser()._subparsers._group_actions[0].choices


def _store(r: random.Random, work: Path) -> Path:
    """A run store with one good-looking run and one corrupted in a random way."""
    store = work / "runs"
    for name in ("20260101-000000-aaaaaa", "20260101-000001-bbbbbb"):
        d = store / name
        d.mkdir(parents=True)
        (d / "status.json").write_text(json.dumps({"id": name, "status": "completed", "framework": "fsdp2", "world_size": 2}))
        (d / "run.json").write_text(json.dumps({"model": "gpt-tiny", "steps": 2}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "rank": k, "loss": 1.0}) + "\n" for s in (1, 2) for k in (0, 1)))
        (d / "events.jsonl").write_text("")
        (d / "plan.yaml").write_text("framework: fsdp2\n")
    bad = d / r.choice(["status.json", "run.json", "metrics.jsonl", "events.jsonl", "plan.yaml"])
    how = r.random()
    if how < 0.4:
        bad.write_bytes(_mutate(r, bad.read_bytes()))
    elif how < 0.6:
        bad.write_bytes(r.randbytes(r.randint(0, 100)))
    elif how < 0.8:
        bad.write_text(json.dumps(_value(r), default=str))
    else:
        bad.unlink()
        bad.mkdir()
    return store


# ---------------------------------------------------------------------------------------------
# The child: runs inputs, reports what happened


def load_store(store: str) -> int:
    """What `shardlab report` and the app's Compare tab read, without drawing: every run of `store`
    loaded, then the comparison table and the frames the figures are made from."""
    from shardlab import compare as c
    from shardlab.run.files import subdirs

    runs = c.load_runs([str(d) for d in subdirs(Path(store))])
    for frame in (c.compare, c.loss_frame, c.phase_frame, c.timeline_frame, c.memory_breakdown, c.comm_frame):
        frame(runs)
    return 0


def _child(conn, work: str) -> None:
    from shardlab.cli import main

    os.nice(5)
    # an input that would take the machine's memory ends as a MemoryError here (counted) instead
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
    work_dir = Path(work)
    # Warm up: what the commands import on first use (pandas for `runs`, the estimator, the
    # loaders) must not be timed as part of an input.
    import shardlab.estimate  # noqa: F401
    import shardlab.export  # noqa: F401
    import shardlab.load  # noqa: F401
    import shardlab.run.store  # noqa: F401

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(["runs", str(work_dir / "none")])
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        seed = job
        r = random.Random(seed)
        argv, kind = make_input(r, work_dir)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        before, cpu0 = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
        out, err = io.StringIO(), io.StringIO()
        crash = None
        rc = None
        t0 = time.monotonic()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = load_store(argv[1]) if argv[0] == "load" else main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:  # noqa: BLE001 - this is what is being counted
            tb = traceback.extract_tb(e.__traceback__)
            frame = next((f for f in reversed(tb) if "shardlab" in f.filename), tb[-1] if tb else None)
            site = f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"
            crash = {"site": site, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        grown = usage.ru_maxrss * 1024 - before
        cpu = usage.ru_utime + usage.ru_stime - cpu0
        text = err.getvalue()
        messages = [m for m in text.split("\n") if m.strip()]
        longest = max((len(m.encode()) for m in messages), default=0)
        conn.send({"seed": seed, "argv0": argv[0], "kind": kind, "rc": rc, "crash": crash, "grown": grown,
                   "longest_message": longest, "s": time.monotonic() - t0, "cpu_s": cpu})


class Runner:
    def __init__(self):
        self.work = tempfile.mkdtemp(prefix="shardlab-fuzz-")
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child, self.work), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise SystemExit("the fuzzing child did not start")

    def restart(self) -> None:
        self.proc.kill()
        self.proc.join()
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.start()

    def run(self, seed: int) -> dict | None:
        """The child's report, or None after WALL_S seconds (the child is then replaced)."""
        self.conn.send(seed)
        if self.conn.poll(WALL_S):
            return self.conn.recv()
        self.restart()
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000, help="inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the summary here")
    a = ap.parse_args()
    runner = Runner()
    crashes: dict[str, dict] = {}
    hangs, stalls, blowups, long_msgs, done = [], [], [], [], 0
    by_cmd: dict[str, int] = {}
    t0 = time.time()

    def summarize() -> dict:
        return {"inputs": done, "seed": a.seed, "seconds": round(time.time() - t0),
                "tracebacks": sum(c["count"] for c in crashes.values()), "crash_sites": crashes,
                "hangs_over_5s": hangs, "machine_stalls_over_5s_wall": stalls, "memory_growth_over_500MB": blowups,
                "messages_2KB_or_more": long_msgs, "by_command": by_cmd}

    for i in range(a.n):
        seed = a.seed * 10**7 + i
        rep = runner.run(seed)
        done += 1
        if rep is None or rep["cpu_s"] > HANG_S:
            hangs.append(seed)
            if rep is None:
                continue
        elif rep["s"] > HANG_S:
            stalls.append(seed)  # over 5 s of wall time on under 5 s of CPU: the shared machine, not the input
        by_cmd[rep["argv0"]] = by_cmd.get(rep["argv0"], 0) + 1
        if rep["crash"]:
            c = crashes.setdefault(rep["crash"]["site"], {"count": 0, "example_seed": seed, "error": rep["crash"]["error"], "command": rep["argv0"]})
            c["count"] += 1
        if rep["grown"] > GROWTH_BYTES:
            blowups.append(seed)
        if rep["longest_message"] >= MESSAGE_BYTES:
            long_msgs.append(seed)
        if (i + 1) % 1000 == 0:
            if a.json:  # the summary so far, so a long run that is stopped still leaves its counts
                Path(a.json).write_text(json.dumps(summarize(), indent=1))
            print(f"{i + 1} inputs, {time.time() - t0:.0f} s: {sum(c['count'] for c in crashes.values())} tracebacks, "
                  f"{len(hangs)} hangs ({len(stalls)} machine stalls), {len(blowups)} memory blow-ups, {len(long_msgs)} long messages", flush=True)
    runner.conn.send(None)
    summary = summarize()
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(runner.work, ignore_errors=True)
    return 0 if not (crashes or hangs or blowups or long_msgs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
