"""Exporters: golden files, the real tools as judges, and exported code that really trains.

Golden files (tests/golden/) hold the expected output for a few named plans; each was read against
what the tool needs and passed through the tool's own parser (tests below) before it was frozen.
Set SHARDLAB_UPDATE_GOLDEN=1 to rewrite them after a deliberate change (each rewritten file is reported as
skipped, not passed), then review the diff and run again without it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import _prestart
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from judges import PLACEHOLDERS, accelerate_judge, command_argv, deepspeed_config, torchrun_args, valid_plans

from shardlab.export import TARGETS, export
from shardlab.export.deepspeed import deepspeed_config as ds_dict
from shardlab.load import translate
from shardlab.plan import PlanError, load_plan
from shardlab.run.host import free_port

GOLDEN = Path(__file__).parent / "golden"
PLANS = {p.stem: load_plan(p) for p in sorted((GOLDEN / "plans").glob("*.yaml"))}
EXT = {"deepspeed": "json", "accelerate": "yaml", "fsdp-code": "py", "slurm": "sh"}
GOLDEN_CASES = [(name, target) for name in PLANS for target in TARGETS
                if not (target in ("deepspeed", "deepspeed-launch") and PLANS[name].framework != "deepspeed")
                and not (target == "fsdp-code" and PLANS[name].framework == "deepspeed")]
STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "hybrid": 3}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("name,target", GOLDEN_CASES)
def test_golden_files(name, target):
    """Every export of the golden plans is byte-for-byte the reviewed file."""
    path = GOLDEN / f"{name}.{target}.{EXT.get(target, 'txt')}"
    text = export(PLANS[name], target)
    if os.environ.get("SHARDLAB_UPDATE_GOLDEN") and (not path.exists() or path.read_text() != text):
        # a rewritten file compared with itself proves nothing: it is reported, never passed
        path.write_text(text)
        pytest.skip(f"rewrote {path.name}: review the diff, then run again without SHARDLAB_UPDATE_GOLDEN")
    assert path.exists(), f"missing golden file {path.name}"
    assert text == path.read_text()
    if target == "fsdp-code":
        compile(text, path.name, "exec")
    elif target == "deepspeed":
        json.loads(text)
    elif target == "accelerate":
        assert isinstance(yaml.safe_load(text), dict)


def test_unknown_target_and_wrong_framework_are_plan_errors():
    plan = load_plan({"framework": "fsdp2"})
    with pytest.raises(PlanError, match="not an export target"):
        export(plan, "megatron")
    with pytest.raises(PlanError, match="translate PLAN --to deepspeed"):
        export(plan, "deepspeed")
    with pytest.raises(PlanError, match="fsdp1 or fsdp2"):
        export(load_plan({"framework": "deepspeed"}), "fsdp-code")
    with pytest.raises(PlanError, match="class names"):
        export(load_plan({"framework": "fsdp1", "wrap": {"transformer_layer_cls": "my-block"}}), "fsdp-code")


# ---------------------------------------------------------------------------------------------
# DeepSpeed's parser as judge


def test_golden_deepspeed_configs_read_by_deepspeed_as_meant():
    """DeepSpeed reads the golden ZeRO++ file as: stage 3, hpZ 8, qwZ/qgZ on, batch 256 over 16 GPUs."""
    plan = PLANS["deepspeed_zeropp_2x8"]
    c = deepspeed_config(json.loads((GOLDEN / "deepspeed_zeropp_2x8.deepspeed.json").read_text()), plan.world_size)
    assert (c.zero_optimization_stage, c.zero_config.zero_hpz_partition_size) == (3, 8)
    assert c.zero_config.zero_quantized_weights and c.zero_config.zero_quantized_gradients
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (256, 8, 2)
    assert c.bfloat16_config.enabled and not c.float16_config.enabled

    plan = PLANS["deepspeed_zero3_offload_1x8"]
    c = deepspeed_config(json.loads((GOLDEN / "deepspeed_zero3_offload_1x8.deepspeed.json").read_text()), plan.world_size)
    assert c.zero_config.offload_param.device == "cpu" and c.zero_config.offload_optimizer.device == "cpu"
    assert c.zero_config.gather_16bit_weights_on_model_save and c.gradient_clipping == 1.0
    assert c.train_batch_size == 4 * 8 * 8  # derived by DeepSpeed: micro x accumulation x world size


def test_fp16_dynamic_loss_scale_and_plain_adam():
    c = deepspeed_config(ds_dict(PLANS["deepspeed_zero1_fp16"]), 4)
    assert c.float16_config.enabled and c.float16_config.loss_scale == 0  # 0 = dynamic
    assert c.zero_optimization_stage == 1 and c.optimizer_name == "adam"
    assert c.optimizer_params["adam_w_mode"] is False and c.communication_data_type is not None


@FAST
@given(valid_plans(frameworks=("deepspeed",)))
def test_every_valid_deepspeed_plan_is_accepted_by_deepspeed(plan):
    c = deepspeed_config(ds_dict(plan), plan.world_size)
    assert c.zero_optimization_stage == STAGE[plan.sharding]
    assert c.train_micro_batch_size_per_gpu == plan.micro_batch_size
    assert c.train_batch_size == plan.micro_batch_size * plan.grad_accum_steps * plan.world_size
    assert c.bfloat16_config.enabled == (plan.precision == "bf16")
    if plan.offload.params != "none":
        assert c.zero_config.offload_param.device == plan.offload.params


# ---------------------------------------------------------------------------------------------
# accelerate's loader and launch validation as judge


@pytest.mark.parametrize("name", list(PLANS))
def test_golden_accelerate_configs_pass_accelerate_launch_validation(name):
    plan = PLANS[name]
    ds = (GOLDEN / f"{name}.deepspeed.json").read_text() if plan.framework == "deepspeed" else None
    seen = accelerate_judge((GOLDEN / f"{name}.accelerate.yaml").read_text(), ds)
    args = seen["args"]
    assert args.num_processes == plan.world_size and args.num_machines == plan.topology.nodes
    if plan.framework == "deepspeed":
        assert args.use_deepspeed and seen["plugin"].zero_stage == STAGE[plan.sharding]
    else:
        assert args.use_fsdp and str(args.fsdp_version) == plan.framework[-1]


def test_fsdp2_hybrid_becomes_a_2d_mesh_and_resharding_in_accelerate():
    seen = accelerate_judge((GOLDEN / "fsdp2_hybrid_2x8.accelerate.yaml").read_text())
    env, plugin = seen["env"], seen["plugin"]
    assert env["PARALLELISM_CONFIG_DP_REPLICATE_SIZE"] == "2" and env["PARALLELISM_CONFIG_DP_SHARD_SIZE"] == "8"
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"  # FSDP2 offload of params, grads, optimizer step


@FAST
@given(valid_plans())
def test_every_valid_plan_exports_an_accelerate_config_accelerate_accepts(plan):
    ds = export(plan, "deepspeed") if plan.framework == "deepspeed" else None
    seen = accelerate_judge(export(plan, "accelerate"), ds)
    if plan.framework == "deepspeed":
        assert seen["plugin"].zero_stage == STAGE[plan.sharding]
    elif plan.framework == "fsdp2":
        assert seen["plugin"].reshard_after_forward == (plan.sharding in ("zero3", "hybrid"))


@FAST
@given(valid_plans(frameworks=("fsdp1",)))
def test_accelerate_to_fsdp2_agrees_with_our_fsdp2_yaml(plan):
    """`accelerate to-fsdp2` applied to our FSDP1 YAML gives the values our FSDP2 YAML has."""
    from accelerate.commands.to_fsdp2 import convert_config_to_fsdp2

    theirs = convert_config_to_fsdp2(yaml.safe_load(export(plan, "accelerate")))
    ours = yaml.safe_load(export(translate(plan, "fsdp2")[0], "accelerate"))
    shared = set(theirs["fsdp_config"]) & set(ours["fsdp_config"])
    assert {"fsdp_reshard_after_forward", "fsdp_offload_params", "fsdp_version"} <= shared
    assert {k: theirs["fsdp_config"][k] for k in shared} == {k: ours["fsdp_config"][k] for k in shared}
    top = (set(theirs) & set(ours)) - {"fsdp_config"}
    assert {k: theirs[k] for k in top} == {k: ours[k] for k in top}


# ---------------------------------------------------------------------------------------------
# Launch commands and the SLURM script, read by the launchers' own parsers


@FAST
@given(valid_plans())
def test_launch_commands_parse_with_the_launchers_own_parsers(plan):
    from accelerate.commands.launch import launch_command_parser

    t = torchrun_args(command_argv(export(plan, "torchrun")))
    assert (t.nnodes, int(t.nproc_per_node), t.rdzv_backend) == (str(plan.topology.nodes), plan.topology.gpus_per_node, "c10d")
    assert t.training_script == "train.py"
    if plan.topology.nodes > 1:
        assert t.node_rank == 0 and t.rdzv_endpoint == "10.0.0.1:29500"
    a = launch_command_parser().parse_args(command_argv(export(plan, "accelerate-launch"))[2:])
    assert a.num_processes == plan.world_size and a.config_file == "accelerate_config.yaml"
    if plan.framework == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        d = parse_args(command_argv(export(plan, "deepspeed-launch"))[1:])
        assert d.num_gpus == plan.topology.gpus_per_node and d.user_script == "train.py"
        assert d.user_args == ["--deepspeed_config", "ds_config.json"]
        assert (d.num_nodes, d.hostfile) == ((plan.topology.nodes, "hostfile") if plan.topology.nodes > 1 else (-1, d.hostfile))


@pytest.mark.parametrize("name", list(PLANS))
def test_slurm_script_is_valid_bash_and_runs_torchrun_per_node(name, tmp_path):
    plan = PLANS[name]
    script = (GOLDEN / f"{name}.slurm.sh").read_text()
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    assert f"#SBATCH --nodes={plan.topology.nodes}" in script and "#SBATCH --ntasks-per-node=1" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    inner = shlex.split(srun)[-1]
    if plan.topology.nodes > 1:
        assert "--node-rank=$SLURM_NODEID" in inner  # expanded per node, inside the single-quoted command
    else:
        assert "--rdzv-endpoint=127.0.0.1:$MASTER_PORT" in inner
    t = torchrun_args(command_argv(inner))
    assert t.rdzv_backend == "c10d" and t.nnodes == str(plan.topology.nodes)
    assert int(t.nproc_per_node) == plan.topology.gpus_per_node


# ---------------------------------------------------------------------------------------------
# Exported FSDP code compiles for every plan, and trains in 2 CPU processes


@FAST
@given(valid_plans(frameworks=("fsdp1", "fsdp2")))
def test_exported_fsdp_code_compiles(plan):
    code = export(plan, "fsdp-code")
    compile(code, "train_fsdp.py", "exec")
    assert ("fully_shard(" in code) == (plan.framework == "fsdp2")
    assert ("FSDP(model, **kwargs)" in code) == (plan.framework == "fsdp1")


# The four exported FSDP scripts that train for real (2 CPU processes each, 4 steps) start in the background
# right after collection (_prestart.py), two at a time: most of such a run is starting torch, and two runs
# fill 2 cores (tests/cpu_runs.py has the measurement); one after another they took ~46 s in CI.
TRAINED = {
    "fsdp1-ac": {"framework": "fsdp1", "topology": {"gpus_per_node": 2}, "activation_checkpointing": True,
                 "checkpoint": "full", "gradient_clipping": 1.0, "optimizer": {"lr": 0.01}},
    "fsdp1-hybrid": {"framework": "fsdp1", "sharding": "hybrid", "topology": {"nodes": 2, "gpus_per_node": 1},
                     "offload": {"optimizer": "cpu", "params": "cpu"}, "low_memory_init": True,
                     "wrap": {"policy": "size", "min_num_params": 20000}, "optimizer": {"lr": 0.01}},
    "fsdp2-2d": {"framework": "fsdp2", "sharding": "hybrid", "topology": {"nodes": 2, "gpus_per_node": 1},
                 "offload": {"optimizer": "cpu", "params": "cpu"}, "low_memory_init": True,
                 "wrap": {"policy": "size", "min_num_params": 20000}, "forward_prefetch": True, "optimizer": {"lr": 0.01}},
    "fsdp2-exported-torchrun": {"framework": "fsdp2", "topology": {"gpus_per_node": 2}, "activation_checkpointing": True,
                                "optimizer": {"lr": 0.01}},
}


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}"]


def _launcher(name: str, plan) -> list[str]:
    if name != "fsdp2-exported-torchrun":
        return _torchrun(2)
    # the torchrun line exactly as exported (port changed), without 'train.py': the script is appended
    argv = command_argv(export(plan, "torchrun").replace("29500", str(free_port())))
    return [sys.executable, "-m", "torch.distributed.run", *argv[1:-1]]


def _start(name: str, where: Path) -> subprocess.Popen:
    plan = load_plan(TRAINED[name])
    where.mkdir()
    (where / "train.py").write_text(export(plan, "fsdp-code"))
    env = {**_prestart.base_env(), "OMP_NUM_THREADS": "1"}  # started in the background: _prestart.py says why
    with open(where / "stdout", "w") as out, open(where / "stderr", "w") as err:
        return subprocess.Popen([*_launcher(name, plan), str(where / "train.py"), "--steps", "4", "--save", str(where / "ckpt")],
                                cwd=where, env=env, stdout=out, stderr=err, text=True)


_trained_root: list[Path] = []


def _trained_dir() -> Path:
    if not _trained_root:
        _trained_root.append(Path(tempfile.mkdtemp(prefix="shardlab-export-trained-")))
    return _trained_root[0]


TRAINED_JOBS = {name: f"exported script {name}" for name in TRAINED}
for _name in TRAINED:
    _prestart.register(TRAINED_JOBS[_name], lambda name=_name: _start(name, _trained_dir() / name), lambda proc: proc.poll() is not None)


@pytest.fixture(scope="module")
@_prestart.needs(*TRAINED_JOBS.values())
def trained():
    """name -> (exit code, folder with stdout, stderr, ckpt) of each TRAINED plan's exported script."""
    _prestart.want(TRAINED_JOBS.values(), first=True)
    started = {name: _prestart.get(job) for name, job in TRAINED_JOBS.items()}
    for p in started.values():
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {name: (p.returncode, _trained_dir() / name) for name, p in started.items()}


def _losses(trained, name: str) -> tuple[list[float], Path]:
    """The losses the exported script printed (it must have exited 0), and its folder."""
    code, where = trained[name]
    assert code == 0, (where / "stderr").read_text()[-3000:]
    return [float(x) for x in re.findall(r"step \d+ loss ([\d.]+)", (where / "stdout").read_text())], where


@pytest.mark.slow
def test_fsdp1_code_trains_with_activation_checkpointing_and_writes_a_full_checkpoint(trained):
    losses, where = _losses(trained, "fsdp1-ac")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (where / "ckpt" / "model.pt").exists()


@pytest.mark.slow
def test_fsdp1_hybrid_code_trains_with_meta_init_offload_and_size_wrapping(trained):
    losses, where = _losses(trained, "fsdp1-hybrid")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert sorted(p.name for p in (where / "ckpt").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_fsdp2_code_trains_on_a_2d_mesh_with_offload_and_meta_init(trained):
    losses, where = _losses(trained, "fsdp2-2d")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert sorted(p.name for p in (where / "ckpt").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@pytest.mark.slow
def test_exported_torchrun_command_starts_the_exported_fsdp2_code(trained):
    """The torchrun line exactly as exported (port changed) runs the exported FSDP2 script."""
    losses, _ = _losses(trained, "fsdp2-exported-torchrun")
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_placeholders_cover_every_variable_in_the_exports():
    for name, plan in PLANS.items():
        for target in ("torchrun", "accelerate-launch", "slurm"):
            for var in re.findall(r"\$[A-Z_]+", export(plan, target)):
                assert var in PLACEHOLDERS or var == "$SLURM_JOB_NODELIST", (name, target, var)
