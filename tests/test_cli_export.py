"""`shardlab export / import / translate` as a person runs them: exit 0 with the file, or exit 2 with a
message on stderr and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shardlab.cli import main
from shardlab.plan import load_plan

CORPUS = Path(__file__).parent / "corpus"


def shardlab(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardlab.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def ds_plan(tmp_path: Path) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text("framework: deepspeed\nsharding: zero3\ntopology: {nodes: 1, gpus_per_node: 8}\noffload: {optimizer: cpu, params: cpu}\n")
    return p


def test_export_import_translate_round_through_the_command_line(ds_plan, tmp_path):
    r = shardlab("export", str(ds_plan), "--to", "deepspeed", "-o", str(tmp_path / "ds_config.json"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu"}

    r = shardlab("import", str(tmp_path / "ds_config.json"), "-o", str(tmp_path / "back.yaml"))
    assert r.returncode == 0, r.stderr
    assert "note: a DeepSpeed config does not name the GPUs" in r.stderr
    back = yaml.safe_load((tmp_path / "back.yaml").read_text())
    assert (back["framework"], back["offload"]) == ("deepspeed", {"optimizer": "cpu", "params": "cpu"})

    r = shardlab("translate", str(ds_plan), "--to", "fsdp2")
    assert r.returncode == 0, r.stderr
    translated = load_plan(r.stdout)  # a minimal plan file: framework fsdp2 is the default, so unnamed
    assert (translated.framework, translated.offload.params) == ("fsdp2", "cpu") and "note: " in r.stderr


def test_every_target_exports_from_the_command_line(ds_plan, capsys):
    for target in ("deepspeed", "accelerate", "torchrun", "deepspeed-launch", "accelerate-launch", "slurm"):
        assert main(["export", str(ds_plan), "--to", target]) == 0
        assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("args,message", [
    (["export", "{plan_fsdp}", "--to", "deepspeed"], "needs framework=deepspeed"),
    (["export", "{plan_fsdp}", "--to", "deepspeed-launch"], "needs framework=deepspeed"),
    (["export", "{ds_plan}", "--to", "fsdp-code"], "needs framework fsdp1 or fsdp2"),
    (["export", "{missing}", "--to", "accelerate"], "no such file"),
    (["import", "{missing}"], "no such file"),
    (["import", "{bad_json}"], "not valid YAML/JSON"),
    (["import", str(CORPUS / "invalid" / "ds_zero2_offload_param.json")], "needs sharding=zero3"),
    (["translate", "{bad_plan}", "--to", "fsdp1"], "must be greater than 0"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(args, message, ds_plan, tmp_path):
    (tmp_path / "fsdp.yaml").write_text("framework: fsdp2\n")
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,}')
    (tmp_path / "badplan.yaml").write_text("framework: deepspeed\noptimizer: {lr: -1}\n")
    fill = {"plan_fsdp": tmp_path / "fsdp.yaml", "ds_plan": ds_plan, "missing": tmp_path / "nope.json",
            "bad_json": tmp_path / "bad.json", "bad_plan": tmp_path / "badplan.yaml"}
    r = shardlab(*[a.format(**fill) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert any(line.startswith("error: ") for line in r.stderr.splitlines())


def test_unknown_target_is_refused_by_the_parser():
    r = shardlab("export", "plan.yaml", "--to", "megatron")
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
