"""Importers and translate: round trips, the corpus without loss, bad files, random input, translations."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from judges import accelerate_judge, deepspeed_config, valid_plans

from shardlab.export import export
from shardlab.export import keys as K
from shardlab.load import import_config, translate
from shardlab.plan import Plan, PlanError, load_plan

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(p for p in CORPUS.glob("*.*"))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _combos():
    """Every framework x sharding the validator accepts, on 2 nodes x 4 GPUs, plain and with options."""
    extras = [{}, {"offload": {"optimizer": "cpu", "params": "cpu"}}, {"precision": "fp16", "activation_checkpointing": True,
              "checkpoint": "full", "gradient_clipping": 1.0, "low_memory_init": True}]
    for fw, sh, extra in itertools.product(("fsdp1", "fsdp2", "deepspeed"), ("ddp", "zero1", "zero2", "zero3", "hybrid"), extras):
        plan = Plan.model_validate({"framework": fw, "sharding": sh, "topology": {"nodes": 2, "gpus_per_node": 4}, **extra})
        if not plan.errors():
            yield pytest.param(plan, id=f"{fw}-{sh}-{len(extra)}")


def _round_trip(plan: Plan, target: str, tmp_path: Path) -> tuple[str, str]:
    first = export(plan, target)
    name = "ds_config.json" if target == "deepspeed" else "accelerate_config.yaml"
    if target == "accelerate" and plan.framework == "deepspeed":
        (tmp_path / "ds_config.json").write_text(export(plan, "deepspeed"))  # a file-mode YAML refers to it
    (tmp_path / name).write_text(first)
    again, _ = import_config(tmp_path / name)
    return first, export(again, target)


@pytest.mark.parametrize("plan", list(_combos()))
def test_export_import_export_gives_the_same_file(plan, tmp_path):
    for target in ("accelerate",) + (("deepspeed",) if plan.framework == "deepspeed" else ()):
        first, second = _round_trip(plan, target, tmp_path)
        assert second == first, target


@FAST
@given(valid_plans())
def test_round_trip_holds_for_random_valid_plans(plan):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for target in ("accelerate",) + (("deepspeed",) if plan.framework == "deepspeed" else ()):
            first, second = _round_trip(plan, target, Path(tmp))
            assert second == first, target


def test_import_reads_what_the_file_says():
    plan, notes = import_config(CORPUS / "ds_zeropp_multinode.json")
    assert (plan.framework, plan.sharding, plan.zeropp.hpz_partition_size) == ("deepspeed", "zero3", 8)
    assert plan.zeropp.quantized_weights and plan.zeropp.quantized_gradients
    assert (plan.topology.nodes, plan.topology.gpus_per_node, plan.global_batch_size) == (2, 8, 256)
    assert any("topology 2 node(s) x 8 comes from train_batch_size" in n for n in notes)

    plan, _ = import_config(CORPUS / "acc_fsdp2_hsdp_2nodes.yaml")
    assert (plan.framework, plan.sharding, plan.checkpoint, plan.world_size) == ("fsdp2", "hybrid", "full", 16)
    plan, _ = import_config(CORPUS / "acc_fsdp1_offload_legacy.yaml")
    assert (plan.sharding, plan.offload.params, plan.offload.optimizer, plan.wrap.policy) == ("zero3", "cpu", "cpu", "size")
    plan, _ = import_config(CORPUS / "ds_zero1_fp16.json")
    assert (plan.sharding, plan.precision, plan.loss_scaling, plan.optimizer.name) == ("zero1", "fp16", "dynamic", "adam")


def test_hf_auto_values_are_reported_not_guessed():
    plan, notes = import_config(CORPUS / "hf_zero3_offload_auto.json")
    assert (plan.sharding, plan.offload.params, plan.checkpoint) == ("zero3", "cpu", "full_16bit")
    # 'auto' stays 'auto': on the plan's auto list, with the value estimates assume named in a note.
    assert {"micro_batch_size", "grad_accum_steps", "optimizer.lr", "gradient_clipping", "precision",
            "buckets.prefetch_bucket_size"} <= set(plan.auto)
    assert any("left to the training script" in n and "micro_batch_size=1" in n for n in notes)
    assert plan.buckets.prefetch_bucket_size == "auto"
    assert json.loads(export(plan, "deepspeed"))["train_micro_batch_size_per_gpu"] == "auto"


def test_accelerate_yaml_pointing_to_a_deepspeed_file_reads_both():
    plan, notes = import_config(CORPUS / "acc_deepspeed_config_file.yaml")
    assert plan.zeropp.hpz_partition_size == 8 and plan.low_memory_init
    assert (plan.topology.nodes, plan.topology.gpus_per_node) == (2, 8)  # from the YAML, not guessed
    assert plan.passthrough.deepspeed["zero_optimization"]["overlap_comm"] is True  # carried for a DeepSpeed export
    text = (CORPUS / "acc_deepspeed_config_file.yaml").read_text().replace("ds_zeropp_multinode.json", "missing.json")
    _, notes = import_config(text)
    assert any("missing.json was not found" in n for n in notes)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_corpus_imports_without_loss(path):
    """Every key of every corpus file maps to a Plan field or is named in a note."""
    plan, notes = import_config(path)
    text = " ".join(notes)
    if path.suffix == ".json":
        import hjson

        data = json.loads(json.dumps(hjson.loads(path.read_text())))
        mapped = {k.key for k in K.DEEPSPEED_KEYS} | set(K.DEEPSPEED_COMPOSITE_KEYS)
        leaves = K.leaf_keys(data)
    else:
        data = yaml.safe_load(path.read_text())
        mapped = ({"distributed_type", "mixed_precision", "num_machines", "num_processes", "dynamo_config.dynamo_backend"}
                  | {f"fsdp_config.{k.key}" for k in K.ACC_FSDP_KEYS + K.ACC_FSDP1_ONLY_KEYS}
                  | {f"fsdp_config.{k}" for k in K.ACC_FSDP_COMPOSITE_KEYS}
                  | {f"deepspeed_config.{k}" for k in K.ACC_DS_COMPOSITE_KEYS} | {f"deepspeed_config.{k.key}" for k in K.ACC_DS_KEYS}
                  | {f"parallelism_config.{K.ACC_PARALLELISM_PREFIX}{k}" for k in ("dp_replicate_size", "dp_shard_size")})
        leaves = K.leaf_keys(data)
    carried = set(K.leaf_keys(plan.passthrough.deepspeed if path.suffix == ".json" else plan.passthrough.accelerate))
    lost = [k for k in leaves if k not in mapped and k not in carried and k.split(".")[-1] not in text]
    assert not lost, f"keys neither mapped nor noted: {lost}"
    assert plan.errors() == []


def test_corpus_has_the_documented_shapes():
    names = {p.name for p in FILES}
    assert len(names) >= 10
    assert {"hf_zero2_offload_auto.json", "hf_zero3_offload_auto.json", "ds_zero3_infinity_nvme.json", "ds_zeropp_multinode.json",
            "acc_fsdp1_llama.yaml", "acc_fsdp2_ac.yaml", "acc_deepspeed_zero3_inline.yaml"} <= names


def test_corpus_accelerate_files_are_real_accelerate_configs():
    """The corpus is judged by accelerate too, so it has the shape accelerate documents."""
    for path in CORPUS.glob("acc_*.yaml"):
        ref = ((yaml.safe_load(path.read_text()) or {}).get("deepspeed_config") or {}).get("deepspeed_config_file")
        ds = (CORPUS / ref).read_text() if ref else None
        seen = accelerate_judge(path.read_text(), ds, strict_keys=False, ds_name=ref or "ds_config.json")
        _, notes = import_config(path)
        for key in seen["unknown"]:  # accelerate loads the file and ignores the key; the import says so
            assert any(f"fsdp_config.{key} " in n and "not an `accelerate launch` option" in n for n in notes), key


def test_corpus_deepspeed_files_without_auto_are_accepted_by_deepspeed():
    import hjson

    for path in CORPUS.glob("ds_*.json"):
        cfg = json.loads(json.dumps(hjson.loads(path.read_text())))
        plan, _ = import_config(path)
        assert deepspeed_config(cfg, plan.world_size).zero_optimization_stage == K.DS_STAGE[plan.sharding]


# ---------------------------------------------------------------------------------------------
# Bad files


def test_deepspeed_accepts_offload_param_with_stage_2_but_the_import_refuses_it():
    path = CORPUS / "invalid" / "ds_zero2_offload_param.json"
    assert deepspeed_config(json.loads(path.read_text()), 1).zero_optimization_stage == 2  # DeepSpeed: silently fine
    with pytest.raises(PlanError, match="offload.params=cpu needs sharding=zero3"):
        import_config(path)


@pytest.mark.parametrize("text,match", [
    ('{"train_micro_batch_size_per_gpu": 2,, }', "not valid YAML/JSON"),
    ("distributed_type: FSDP\nfsdp_confg: {}\n", "fsdp_confg: not an accelerate config key"),
    ('{"zero_optimization": {"stage": 5}}', "is not a ZeRO stage"),
    ('{"zero_optimization": {"stage": "two"}}', "must be a whole number"),
    ('{"zero_optimization": 3}', "must be a mapping"),
    ('{"bf16": {"enabled": "maybe"}}', "must be true or false"),
    # a strategy out of range was refused as "must be true or false" (session 19); accelerate takes names or 1-5
    ("distributed_type: FSDP\nfsdp_config: {fsdp_sharding_strategy: 6}\n", "is not an FSDP sharding strategy. Use one of FULL_SHARD"),
    ("distributed_type: FSDP\nnum_machines: 2\nnum_processes: 3\n", "not a multiple of num_machines=2"),
    ("distributed_type: XLA\n", "not something shardlab models"),
    ("- a\n- b\n", "not a DeepSpeed JSON object"),
    ("framework: fsdp2\nsharding: zero3\n", "looks like a shardlab plan"),
    ('{"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}', "not a multiple"),
])
def test_malformed_files_are_plan_errors_that_say_why(text, match):
    with pytest.raises(PlanError, match=match):
        import_config(text)


@pytest.mark.parametrize("value,sharding", [("2", "zero2"), ("'2'", "zero2"), ("HYBRID_SHARD", "hybrid"), ("no_shard", "ddp")])
def test_accelerate_sharding_strategy_by_name_or_number_as_accelerate_reads_it(value, sharding):
    """accelerate's FullyShardedDataParallelPlugin takes a strategy's name (any case) or its number, also as a string."""
    plan, _ = import_config(f"distributed_type: FSDP\nfsdp_config: {{fsdp_sharding_strategy: {value}}}\n")
    assert plan.sharding == sharding


@pytest.mark.parametrize("text, tool", [('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}', "a DeepSpeed config"),
                                         ("distributed_type: FSDP\nfsdp_config: {fsdp_version: 2}\n", "an accelerate config")])
def test_a_tools_config_where_a_plan_is_expected_says_to_import_it(tmp_path, text, tool, capsys):
    """Given to translate / validate / export / estimate, a DeepSpeed JSON was answered key by key ("unknown key. Did you
    mean 'micro_batch_size'?"); `import` is the way from a config to a plan, and the message says so."""
    from shardlab.cli import main

    f = tmp_path / ("cfg.json" if text.startswith("{") else "cfg.yaml")
    f.write_text(text)
    for cmd in (["translate", str(f), "--to", "fsdp2"], ["validate", str(f)], ["estimate", str(f), "--model", "gpt-tiny"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert f"{f} is {tool}" in err and f"shardlab import {f} -o plan.yaml" in err and "unknown key" not in err
    # and import reads it (the FSDP2 YAML names no strategy: accelerate's default, resharding after forward, is ZeRO-3;
    # this session's strategy check first refused that default as "True is not an FSDP sharding strategy")
    assert import_config(f)[0].sharding == "zero3"


def test_missing_file_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="no such file"):
        import_config(tmp_path / "nope.json")


def test_deepspeed_comments_are_tolerated_like_deepspeed_does():
    plan, _ = import_config(CORPUS / "ds_commented.json")
    assert (plan.sharding, plan.offload.optimizer, plan.grad_accum_steps, plan.activation_checkpointing) == ("zero2", "cpu", 4, True)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                     max_leaves=20)
_keys = st.sampled_from(["zero_optimization", "stage", "offload_param", "offload_optimizer", "device", "bf16", "fp16",
                         "enabled", "optimizer", "type", "params", "lr", "train_batch_size", "train_micro_batch_size_per_gpu",
                         "distributed_type", "fsdp_config", "fsdp_version", "deepspeed_config", "num_processes",
                         "mixed_precision", "zero_hpz_partition_size", "activation_checkpointing", "nvme_path"])
_shaped = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**10) | st.floats() | st.sampled_from(["auto", "cpu", "nvme", "FSDP", "DEEPSPEED", "bf16", "Adam", "x"]),
                       lambda inner: st.dictionaries(_keys, inner, max_size=5) | st.lists(inner, max_size=3), max_leaves=25)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.dictionaries(_keys, _shaped, max_size=6), st.dictionaries(st.text(max_size=10), _json, max_size=5)))
def test_random_dicts_give_a_plan_or_a_plan_error(data):
    for text in (json.dumps(data, default=str), yaml.safe_dump(data)):
        try:
            plan, notes = import_config(text)
        except PlanError as e:
            assert str(e)
        else:
            assert isinstance(plan, Plan) and all(isinstance(n, str) for n in notes)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_give_a_plan_or_a_plan_error(blob):
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(blob)
        f.flush()
        try:
            import_config(f.name)
        except PlanError as e:
            assert str(e)


# ---------------------------------------------------------------------------------------------
# translate


@FAST
@given(valid_plans(), st.sampled_from(("fsdp1", "fsdp2", "deepspeed")))
def test_translate_always_gives_a_valid_plan(plan, to):
    out, notes = translate(plan, to)
    assert out.framework == to and out.errors() == []
    assert all(isinstance(n, str) for n in notes)
    if (to == "deepspeed") != (plan.framework == "deepspeed"):
        assert any("checkpoints" in n for n in notes)  # FSDP <-> DeepSpeed always changes the checkpoint format


def test_translate_notes_each_behaviour_that_does_not_carry_over():
    ds = load_plan({"framework": "deepspeed", "sharding": "zero1", "offload": {"optimizer": "cpu"}, "topology": {"gpus_per_node": 8},
                    "buckets": {"reduce_bucket_size": 10**7}})
    out, notes = translate(ds, "fsdp2")
    text = " ".join(notes)
    assert (out.sharding, out.offload.optimizer, out.buckets.reduce_bucket_size) == ("zero2", "none", "auto")
    for phrase in ("no FSDP equivalent", "all or nothing", "fp32 master weights", "bucket", "prefetch", "checkpoints"):
        assert phrase in text, phrase

    hpz = load_plan({"framework": "deepspeed", "sharding": "zero3", "topology": {"nodes": 2, "gpus_per_node": 8},
                     "zeropp": {"hpz_partition_size": 8}, "checkpoint": "full_16bit", "offload": {"optimizer": "nvme", "params": "cpu", "nvme_path": "/nvme"}})
    out, notes = translate(hpz, "fsdp1")
    assert (out.sharding, out.checkpoint, out.offload.optimizer, out.offload.params) == ("hybrid", "full", "cpu", "cpu")
    assert any("hpZ" in n and "HYBRID_SHARD" in n for n in notes)

    f1 = load_plan({"framework": "fsdp1", "sharding": "hybrid", "topology": {"nodes": 2, "gpus_per_node": 8},
                    "backward_prefetch": "backward_post", "buffer_dtype": "fp32", "wrap": {"policy": "size"}})
    out, notes = translate(f1, "fsdp2")
    assert (out.backward_prefetch, out.buffer_dtype) == ("backward_pre", "auto")
    out, notes = translate(f1, "deepspeed")
    assert out.sharding == "hybrid" and any("zero_hpz_partition_size" in n for n in notes)
    assert export(out, "deepspeed").count('"zero_hpz_partition_size": 8') == 1


def test_translate_to_the_same_framework_says_so():
    plan = load_plan({"framework": "fsdp2"})
    out, notes = translate(plan, "fsdp2")
    assert out == plan and "already" in notes[0]
    with pytest.raises(PlanError, match="not a framework"):
        translate(plan, "megatron")
