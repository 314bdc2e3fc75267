"""Each hostile input the issue-19 review found, through the real command line (in-process): exit 2
with a short message naming the problem, no traceback, nothing started or allocated. The fuzzers
(test_fuzz.py, benchmarks/fuzz.py) search further; these pin the known cases.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time

import pytest

from shardlab.cli import main

PLAN = "framework: fsdp2\nsharding: zero3\ntopology: {gpus_per_node: 2}\n"


def cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    t0 = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    assert time.monotonic() - t0 < 5
    text = err.getvalue()
    assert "Traceback" not in text and len(text.encode()) < 2048, text[:500]
    return rc, text


def bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ",".join(['"lol"'] * width) + "]"]
    return "\n".join(lines + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]) + "\n"


@pytest.mark.parametrize("text, says", [
    (bomb(), "expands to more than"),
    ("a: &a [*a]\n", "contains itself"),
    ("[" * 5000 + "]" * 5000, "nests deeper"),
    ("int: 1\n", "int: unknown key"),
    ("optimizer: {str: 1, 'a[0]': 2}\n", "unknown key"),
    ("none: {bool: 1}\n", "none: unknown key"),
    ("compile: !!bool maybe\n", "cannot read"),
    ("micro_batch_size: 0x" + "f" * 4000 + "\n", "too large"),
    ("1: 2\nframework: fsdp2\n", "keys must be names"),
    ("optimizer: {lr: .nan}\n", "finite"),
    ("optimizer: {weight_decay: .inf}\n", "finite"),
    ("gradient_clipping: -.inf\n", "finite"),
])
def test_hostile_plans_are_refused_with_a_short_message(tmp_path, text, says):
    f = tmp_path / "plan.yaml"
    f.write_text(text)
    for cmd in (["validate", str(f)], ["estimate", str(f), "--params", "7e9"]):
        rc, err = cli(*cmd)
        assert rc == 2 and says in err, err


def test_special_files_and_missing_paths_are_named_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    for name, says in (("fifo.yaml", "not a regular file"), ("zero.json", "not a regular file"),
                       ("nothere.yaml", "no such file"), ("nothere", "file not found")):
        for cmd in ("validate", "import"):
            rc, err = cli(cmd, str(tmp_path / name))
            assert rc == 2 and says in err, (name, err)
    # a model given as a .json path (a Hugging Face config.json, issue 17) goes through the same reader
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    for name in ("fifo.json", "zero.json"):
        if name == "fifo.json":
            os.mkfifo(tmp_path / name)
        rc, err = cli("estimate", str(plan), "--model", str(tmp_path / name))
        assert rc == 2 and "not a regular file" in err, (name, err)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 5000)  # json's parser recurses: RecursionError unless refused first
    rc, err = cli("estimate", str(plan), "--model", str(deep))
    assert rc == 2 and "nests deeper" in err, err


def test_a_lone_surrogate_in_a_key_is_printed_as_an_escape(tmp_path):
    # "\ud800" in a YAML/JSON string makes a lone surrogate: no UTF-8 stream can take it as it is
    f = tmp_path / "plan.yaml"
    f.write_text('{"\\ud800\\udc00": 1000000000000000001}')
    rc, err = cli("validate", str(f))
    err.encode("utf-8")
    assert rc == 2 and "\\ud800" in err, err


def test_notes_listing_hostile_key_names_stay_short(tmp_path):
    # unmodelled keys are carried and named in a note: names the fuzzer made 4 KB long must not make it long
    keys = {f"k{i}_" + "f" * 1500: 1 for i in range(3)}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}, **keys}))
    rc, err = cli("import", str(f))  # cli() asserts the whole of stderr < 2 KB
    assert rc == 0 and "carried unchanged" in err, err


def test_model_sizes_and_flags_are_bounded_before_any_work(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    shape = tmp_path / "shape.yaml"
    shape.write_text("layers: 1000000000\nhidden: 64\nheads: 4\nvocab: 100\nseq_len: 10\n")
    odd = tmp_path / "odd_heads.yaml"  # a llama head of 15 channels: RoPE rotates pairs, so every run of it fails
    odd.write_text("family: llama\nlayers: 2\nhidden: 30\nheads: 2\nvocab: 100\nseq_len: 10\n")
    for flags, says in ((["--params", "1e308"], "beyond what shardlab models"), (["--params", "nan"], "not a finite number"),
                        (["--model", str(shape)], "model.layers=1000000000 is beyond"),
                        (["--model", str(odd)], "= 15 is odd")):
        rc, err = cli("estimate", str(plan), *flags)
        assert rc == 2 and says in err, err


def test_output_paths_and_ports_that_cannot_work_exit_2(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    rc, err = cli("export", str(plan), "--to", "deepspeed", "-o", str(tmp_path / "missing" / "out.json"))
    assert rc == 2 and "does not exist" in err
    rc, err = cli("export", str(plan), "--to", "deepspeed", "-o", str(tmp_path))
    assert rc == 2 and "is a directory" in err
    rc, err = cli("app", "--port", "99999")
    assert rc == 2 and "not a TCP port" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, err = cli("app", "--port", str(s.getsockname()[1]))
    assert rc == 2 and "cannot listen" in err
    (tmp_path / "afile").write_text("")  # a run store that cannot be one: the app served, and every Start failed
    from shardlab.run.host import free_port

    rc, err = cli("app", "--port", str(free_port()), "--runs", str(tmp_path / "afile"))
    assert rc == 2 and "--runs=" in err and "a file is in the way" in err


def test_run_refuses_nproc_0_and_more_processes_than_cores_before_starting(tmp_path):
    from shardlab.run.launcher import CPU_RANKS_PER_CORE, usable_cores

    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    store = tmp_path / "runs"
    rc, err = cli("run", str(plan), "--model", "gpt-tiny", "--steps", "2", "--device", "cpu", "--nproc", "0", "--out", str(store))
    assert rc == 2 and "at least 1" in err and "--nproc" in err
    big = tmp_path / "big.yaml"
    cores = usable_cores()
    per_node = CPU_RANKS_PER_CORE * cores  # two nodes of this many: twice what the machine may hold
    big.write_text(f"framework: fsdp2\ntopology: {{nodes: 2, gpus_per_node: {per_node}}}\n")
    rc, err = cli("run", str(big), "--model", "gpt-tiny", "--steps", "2", "--device", "cpu", "--out", str(store))
    assert rc == 2 and f"would start {2 * per_node} processes" in err and f"{cores} CPU cores" in err, err
    assert f"--nproc {per_node // 2}" in err or "fewer topology.nodes" in err
    assert not store.exists() or not any(store.iterdir()), "a run folder was made for a refused run"
