"""The Plan: defaults, every validation rule (error vs warning, field, message), and reading files."""

import json
import subprocess
import sys

import pytest

from shardlab.plan import RULES, Plan, PlanError, field_descriptions, load_plan

# rule id, plan that triggers it, level, field at fault, words the message must contain
CASES = [
    ("positive_sizes", {"micro_batch_size": 0}, "error", "micro_batch_size", ["micro_batch_size=0", "Use 1 or more"]),
    ("positive_sizes", {"topology": {"gpus_per_node": -2}}, "error", "topology.gpus_per_node", ["-2"]),
    ("positive_sizes", {"buckets": {"reduce_bucket_size": 0}}, "error", "buckets.reduce_bucket_size", ["=0"]),
    ("persistence_threshold_non_negative", {"buckets": {"param_persistence_threshold": -1}}, "error", "buckets.param_persistence_threshold", ["-1", "'auto'"]),
    ("learning_rate_positive", {"optimizer": {"lr": 0}}, "error", "optimizer.lr", ["optimizer.lr=0", "1e-4"]),
    ("non_negative_regularisers", {"gradient_clipping": -1.0}, "error", "gradient_clipping", ["gradient_clipping=-1.0"]),
    ("non_negative_regularisers", {"optimizer": {"weight_decay": -0.1}}, "error", "optimizer.weight_decay", ["-0.1"]),
    ("params_offload_needs_zero3", {"framework": "deepspeed", "sharding": "zero2", "offload": {"params": "cpu"}}, "error", "offload.params", ["offload.params=cpu", "sharding=zero3", "Use sharding: zero3"]),
    ("nvme_needs_path", {"framework": "deepspeed", "offload": {"optimizer": "nvme"}}, "error", "offload.nvme_path", ["nvme_path", "Set offload.nvme_path"]),
    ("nvme_needs_deepspeed", {"framework": "fsdp2", "offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": "/nvme"}}, "error", "offload", ["framework=fsdp2", "deepspeed"]),
    ("nvme_path_unused", {"offload": {"nvme_path": "/nvme"}}, "warning", "offload.nvme_path", ["/nvme", "unused"]),
    ("fsdp_offload_all_or_nothing", {"framework": "fsdp1", "offload": {"optimizer": "cpu"}}, "error", "offload.optimizer", ["all or nothing", "framework: deepspeed"]),
    ("optimizer_offload_needs_zero", {"framework": "deepspeed", "sharding": "ddp", "offload": {"optimizer": "cpu"}}, "error", "offload.optimizer", ["sharding is ddp", "zero2"]),
    ("zero1_is_deepspeed_only", {"framework": "fsdp2", "sharding": "zero1"}, "error", "sharding", ["zero1", "fsdp2", "zero2"]),
    ("hybrid_needs_nodes", {"sharding": "hybrid", "topology": {"gpus_per_node": 4}}, "warning", "topology.nodes", ["nodes=1", "zero3"]),
    ("hpz_divides_node", {"framework": "deepspeed", "topology": {"nodes": 2, "gpus_per_node": 8}, "zeropp": {"hpz_partition_size": 3}}, "error", "zeropp.hpz_partition_size", ["=3", "gpus_per_node=8"]),
    ("hpz_needs_deepspeed_zero3", {"framework": "fsdp2", "topology": {"nodes": 2, "gpus_per_node": 8}, "zeropp": {"hpz_partition_size": 8}}, "error", "zeropp.hpz_partition_size", ["framework=fsdp2", "hybrid"]),
    ("hpz_single_node", {"framework": "deepspeed", "topology": {"gpus_per_node": 8}, "zeropp": {"hpz_partition_size": 8}}, "warning", "zeropp.hpz_partition_size", ["one node"]),
    ("quantized_needs_deepspeed_zero3", {"framework": "deepspeed", "sharding": "zero2", "topology": {"gpus_per_node": 2}, "zeropp": {"quantized_weights": True}}, "error", "zeropp.quantized_weights", ["sharding=zero2", "zero3"]),
    ("quantized_needs_gpu", {"framework": "deepspeed", "topology": {"gpus_per_node": 2}, "zeropp": {"quantized_gradients": True}}, "warning", "zeropp.quantized_gradients", ["CUDA"]),
    ("fp16_fsdp2_needs_scaler", {"framework": "fsdp2", "precision": "fp16", "loss_scaling": "none"}, "error", "loss_scaling", ["fp16", "GradScaler"]),
    ("fp16_without_scaling", {"framework": "deepspeed", "precision": "fp16", "loss_scaling": "none", "topology": {"gpus_per_node": 2}}, "warning", "loss_scaling", ["underflow"]),
    ("global_batch_consistent", {"micro_batch_size": 2, "grad_accum_steps": 4, "topology": {"gpus_per_node": 8}, "global_batch_size": 32}, "error", "global_batch_size", ["global_batch_size=32", "= 64", "global_batch_size: 64"]),
    ("low_memory_init_needs_sync", {"framework": "fsdp1", "low_memory_init": True, "sync_module_states": False}, "error", "sync_module_states", ["sync_module_states: true"]),
    ("full_16bit_is_deepspeed_zero3", {"framework": "fsdp2", "checkpoint": "full_16bit"}, "error", "checkpoint", ["full_16bit", "checkpoint: full"]),
    ("dtype_mismatch", {"precision": "bf16", "reduce_dtype": "fp16"}, "warning", "reduce_dtype", ["reduce_dtype=fp16"]),
    ("nothing_to_shard", {"sharding": "zero3"}, "warning", "sharding", ["world size of 1"]),
    ("auto_assumed", {"framework": "deepspeed", "micro_batch_size": "auto", "topology": {"gpus_per_node": 2}}, "warning", "micro_batch_size", ["left to the training script", "assume micro_batch_size=1"]),
    ("ignored_knobs", {"framework": "fsdp2", "buckets": {"reduce_bucket_size": 5_000_000}, "topology": {"gpus_per_node": 2}}, "warning", "buckets.reduce_bucket_size", ["DeepSpeed knob"]),
    ("ignored_knobs", {"framework": "deepspeed", "forward_prefetch": True, "topology": {"gpus_per_node": 2}}, "warning", "forward_prefetch", ["FSDP knob"]),
]


def test_at_least_fifteen_rules_each_covered_here():
    names = {r.__name__ for r in RULES}
    assert len(names) >= 15
    assert names == {c[0] for c in CASES}, "every rule has a case in CASES"


@pytest.mark.parametrize("rule_id,data,level,field,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_fires_with_its_message(rule_id, data, level, field, words):
    plan = Plan.model_validate(data)
    hits = [f for f in plan.findings() if f.rule == rule_id]
    assert hits, f"{rule_id} did not fire for {data}"
    f = hits[0]
    assert (f.level, f.field) == (level, field)
    for w in words:
        assert w in f.message
    # Errors make the plan unloadable; warnings do not.
    if level == "error":
        with pytest.raises(PlanError) as e:
            load_plan(data)
        assert f.message in str(e.value)
    else:
        assert load_plan(data).framework == plan.framework


def test_default_plan_is_the_design_schema_and_clean():
    p = Plan()
    d = p.to_dict()
    assert (d["framework"], d["sharding"], d["precision"]) == ("fsdp2", "zero3", "bf16")
    assert d["offload"] == {"optimizer": "none", "params": "none", "nvme_path": None}
    assert d["topology"] == {"nodes": 1, "gpus_per_node": 1}
    assert d["zeropp"] == {"quantized_weights": False, "quantized_gradients": False, "hpz_partition_size": 1}
    assert (d["activation_checkpointing"], d["micro_batch_size"], d["grad_accum_steps"]) == (False, 1, 1)
    assert p.errors() == []
    assert p.to_dict(minimal=True) == {}


def test_valid_setups_have_no_errors():
    for data in [
        {"framework": "deepspeed", "sharding": "zero2", "offload": {"optimizer": "cpu"}, "topology": {"nodes": 2, "gpus_per_node": 8}},
        {"framework": "deepspeed", "sharding": "zero3", "offload": {"optimizer": "nvme", "params": "nvme", "nvme_path": "/local_nvme"}, "topology": {"gpus_per_node": 8}},
        {"framework": "fsdp1", "sharding": "hybrid", "topology": {"nodes": 2, "gpus_per_node": 8}},
        {"framework": "fsdp2", "offload": {"optimizer": "cpu", "params": "cpu"}, "topology": {"gpus_per_node": 4}},
        {"framework": "deepspeed", "zeropp": {"hpz_partition_size": 8, "quantized_weights": True}, "topology": {"nodes": 4, "gpus_per_node": 8}},
    ]:
        assert load_plan(data).errors() == []


def test_every_field_has_a_one_line_description():
    desc = field_descriptions()
    # The knobs issue 2 names, as users of FSDP and DeepSpeed set them.
    for name in ["reduce_dtype", "buffer_dtype", "wrap.policy", "wrap.transformer_layer_cls", "wrap.min_num_params",
                 "backward_prefetch", "forward_prefetch", "limit_all_gathers", "sync_module_states", "low_memory_init",
                 "checkpoint", "gradient_clipping", "buckets.reduce_bucket_size", "buckets.prefetch_bucket_size",
                 "compile", "optimizer.name", "optimizer.lr", "offload.nvme_path", "zeropp.hpz_partition_size"]:
        assert name in desc, name
    for name, text in desc.items():
        assert text and "\n" not in text and len(text) < 200, name


def test_plan_file_names_only_what_differs_and_round_trips(tmp_path):
    p = Plan(framework="deepspeed", sharding="zero2", topology={"gpus_per_node": 4})
    f = tmp_path / "plan.yaml"
    f.write_text(p.to_yaml(minimal=True))
    assert "precision" not in f.read_text()
    assert load_plan(f) == p
    j = tmp_path / "plan.json"
    j.write_text(json.dumps(p.to_dict()))
    assert load_plan(str(j)) == p


@pytest.mark.parametrize(
    "text,words",
    [
        ("topolgy: {nodes: 2}", ["topolgy", "Did you mean 'topology'"]),
        ("offload: {optimiser: cpu}", ["offload.optimiser", "'optimizer'"]),
        ("framework: fsdp3", ["framework='fsdp3'", "'fsdp1', 'fsdp2' or 'deepspeed'"]),
        ("micro_batch_size: lots", ["micro_batch_size='lots'", "integer"]),
        ("buckets: {reduce_bucket_size: big}", ["buckets.reduce_bucket_size='big'", "'auto' or a whole number"]),
        ("offload: cpu", ["offload='cpu'", "nested block"]),
        ("framework: [unclosed", ["not valid YAML/JSON", "line 1"]),
        ("- a\n- b\n", ["mapping"]),
    ],
)
def test_bad_input_messages_name_field_value_and_fix(text, words):
    with pytest.raises(PlanError) as e:
        load_plan(text)
    for w in words:
        assert w in str(e.value)


def test_long_one_line_text_is_read_as_a_plan_not_a_path():
    text = "{" + ", ".join(f'"k{i}": {i}' for i in range(40)) + "}"
    assert len(text) > 300
    with pytest.raises(PlanError, match="k0: unknown key"):
        load_plan(text)
    assert load_plan('{"framework": "deepspeed", "sharding": "zero2", "topology": {"gpus_per_node": 4}' + " " * 300 + "}").framework == "deepspeed"


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(PlanError, match="no such file"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="UTF-8"):
        load_plan(bad)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "shardlab.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_validate_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("framework: deepspeed\nsharding: zero3\ntopology: {gpus_per_node: 8}\n")
    r = _cli("validate", str(good))
    assert r.returncode == 0 and "valid" in r.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("framework: deepspeed\nsharding: zero2\noffload: {params: cpu}\n")
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    assert "offload.params=cpu needs sharding=zero3" in r.stderr
    assert "Traceback" not in r.stderr

    typo = tmp_path / "typo.yaml"
    typo.write_text("sharding: zero3\nmicro_bach_size: 4\n")
    r = _cli("validate", str(typo))
    assert r.returncode == 2 and "micro_batch_size" in r.stderr and "Traceback" not in r.stderr

    r = _cli("validate", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_cli_validate_prints_warnings_but_passes(tmp_path):
    f = tmp_path / "warn.yaml"
    f.write_text("sharding: hybrid\ntopology: {gpus_per_node: 4}\n")
    r = _cli("validate", str(f))
    assert r.returncode == 0
    assert "warning:" in r.stderr and "hybrid" in r.stderr


def test_import_shardlab_is_light():
    """Neither torch nor deepspeed on `import shardlab` (its time is measured by benchmarks/estimate_speed.py)."""
    code = "import sys; import shardlab; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_loaded, ds_loaded = r.stdout.split()
    assert torch_loaded == "False" and ds_loaded == "False"
