"""Hypothesis fuzzing of every door input comes in by (issue 19), bounded to ~30-60 s in all:
`shardlab validate / import / translate / estimate / diff` on hostile YAML, JSON and bytes, and the
run store's readers on corrupted run folders. Judged from outside the code: the command returns an
exit code (0, 1, or 2 for bad input) and never raises, finishes within seconds, and every message it
prints is under 2 KB. benchmarks/fuzz.py runs the same idea for tens of thousands of inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlab.cli import build_parser, main

CORPUS = sorted(p for p in (Path(__file__).parent / "corpus").rglob("*") if p.is_file())
KEYS = ["framework", "sharding", "precision", "offload", "optimizer", "lr", "weight_decay", "topology",
        "gpus_per_node", "nodes", "micro_batch_size", "gradient_clipping", "buckets", "zero_optimization",
        "stage", "bf16", "enabled", "distributed_type", "fsdp_config", "deepspeed_config",
        "deepspeed_config_file", "layers", "hidden", "heads", "vocab", "seq_len",
        "int", "str", "float", "bool", "none", "a[0]", "literal['auto']", ""]
HOSTILE = ["!!bool maybe", "!!int abc", ".inf", ".nan", "-.inf", "0x" + "f" * 4000, "9" * 5000, "&a [*a]",
           "*nope", "!!binary ???", "!!timestamp 2020-13-45", "{? [1, 2]: 3}", "[" * 200, "~", "1e999"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
                    st.sampled_from(["auto", "zero3", "deepspeed", "cpu", "bf16", 10**19, 2**64, 1e308]))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers(), st.none(), st.booleans())
data = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
                    max_leaves=25)


def _alias_bomb(n: int, w: int) -> str:
    lines = ["a0: &a0 [" + ",".join(['"x"'] * w) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * w) + "]" for i in range(1, n)]
    return "\n".join(lines) + "\n"


def _dump(d) -> str:
    try:
        return yaml.safe_dump(d, allow_unicode=True)
    except Exception:
        return repr(d)


documents = st.one_of(
    data.map(_dump),
    data.map(lambda d: json.dumps(d, default=str) if not isinstance(d, int) or abs(d) < 10**300 else "1"),
    st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(HOSTILE)), min_size=1, max_size=4).map(
        lambda kv: "".join(f"{k}: {v}\n" for k, v in kv)),
    st.builds(_alias_bomb, st.integers(3, 9), st.integers(3, 10)),
    st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    st.tuples(st.sampled_from(CORPUS), st.binary(min_size=1, max_size=8), st.integers(0, 2000)).map(
        lambda t: (lambda raw: raw[: t[2] % (len(raw) + 1)] + t[1].decode("latin-1") + raw[t[2] % (len(raw) + 1):])(t[0].read_text())),
)
COMMANDS = ["validate", "import", "translate", "estimate", "estimate-shape"]
if "diff" in build_parser()._subparsers._group_actions[0].choices:  # issue 15's `shardlab diff`, once it is there
    COMMANDS.append("diff")


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
    assert time.monotonic() - t0 < 5, f"{argv[0]} took {time.monotonic() - t0:.1f} s"
    return rc, err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=documents, cmd=st.sampled_from(COMMANDS), suffix=st.sampled_from([".yaml", ".json", ".yml", ""]))
def test_any_file_gives_an_exit_code_and_short_messages_never_a_traceback(tmp_path_factory, doc, cmd, suffix):
    d = tmp_path_factory.mktemp("fuzz")
    f = d / f"input{suffix}"
    f.write_text(doc, encoding="utf-8", errors="surrogateescape")
    plan = d / "plan.yaml"
    plan.write_text("framework: deepspeed\nsharding: zero3\ntopology: {gpus_per_node: 8}\n")
    argv = {"validate": ["validate", str(f)], "import": ["import", str(f)], "translate": ["translate", str(f), "--to", "fsdp2"],
            "estimate": ["estimate", str(f), "--params", "7e9"], "estimate-shape": ["estimate", str(plan), "--model", str(f)],
            "diff": ["diff", str(f), str(CORPUS[0])]}[cmd]
    rc, err = _run(argv)
    assert rc in (0, 1, 2)
    assert all(len(line.encode()) < 2048 for line in err.splitlines()), max(err.splitlines(), key=len)[:300]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(flag=st.sampled_from(["--params", "--gpu", "--model", "--calibration"]),
       value=st.one_of(st.text(max_size=60), st.sampled_from(["1e308", "nan", "inf", "-1", "0", "9" * 5000, "0x10", "/dev/zero"])))
def test_any_flag_value_gives_an_exit_code_never_a_traceback(tmp_path_factory, flag, value):
    plan = tmp_path_factory.mktemp("flag") / "plan.yaml"
    plan.write_text("framework: fsdp2\n")
    extra = [] if flag in ("--params", "--model") else ["--params", "7e9"]
    rc, err = _run(["estimate", str(plan), f"{flag}={value}", *extra])
    assert rc in (0, 2)
    assert all(len(line.encode()) < 2048 for line in err.splitlines())


def _store(root: Path) -> Path:
    d = root / "runs" / "20260101-000000-aaaaaa"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"id": d.name, "status": "completed", "framework": "fsdp2", "world_size": 2}))
    (d / "run.json").write_text(json.dumps({"model": "gpt-tiny", "steps": 2}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "rank": r, "loss": 1.0}) + "\n" for s in (1, 2) for r in (0, 1)))
    (d / "events.jsonl").write_text("")
    (d / "plan.yaml").write_text("framework: fsdp2\n")
    return d


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(["status.json", "run.json", "metrics.jsonl", "events.jsonl", "plan.yaml"]),
       content=st.one_of(st.binary(max_size=200), data.map(lambda d: json.dumps(d, default=str).encode())))
def test_a_corrupt_run_folder_never_breaks_the_store_readers(tmp_path_factory, name, content):
    from shardlab.run.store import list_runs, load_run

    d = _store(tmp_path_factory.mktemp("store"))
    (d / name).write_bytes(content)
    rc, err = _run(["runs", str(d.parent)])
    assert rc in (0, 2)
    try:
        run = load_run(d)
    except ValueError:  # PlanError: "not a run folder" is an answer
        return
    run.status, run.info, run.metrics, run.events  # noqa: B018 - each must read without raising
    list_runs(d.parent)
