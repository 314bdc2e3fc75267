"""shardlab diff: two configs compared by meaning, each tool's defaults applied (DeepSpeed's pydantic
models and constants, accelerate's ClusterConfig and launch options are the judges of what a missing key means)."""

from __future__ import annotations

import json

from shardlab.cli import main
from shardlab.diff import diff, format_table

DS_SHORT = '{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}'
# The same setup with DeepSpeed's own defaults spelled out (0.19.8: clipping 1.0, ZeRO-2 overlap_comm off, 5e8 buckets).
DS_SPELLED = ('{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, '
              '"zero_optimization": {"stage": 2, "overlap_comm": false, "reduce_bucket_size": 500000000, "contiguous_gradients": true}}')


def test_the_same_setup_spelled_differently_has_no_differences():
    result = diff(DS_SHORT, DS_SPELLED)
    assert result["same"], result["differences"]
    assert "same meaning" in format_table(result)


def test_a_non_default_unmodelled_key_is_a_difference_against_deepspeeds_default():
    result = diff(DS_SHORT, DS_SHORT.replace('"stage": 2', '"stage": 2, "overlap_comm": true'))
    rows = {r["key"]: r for r in result["differences"]}
    assert list(rows) == ["deepspeed:zero_optimization.overlap_comm"]
    assert (rows["deepspeed:zero_optimization.overlap_comm"]["a"], rows["deepspeed:zero_optimization.overlap_comm"]["b"]) == (False, True)


def test_fsdp1_to_fsdp2_and_deepspeed_to_fsdp_show_what_changes(tmp_path):
    f1 = tmp_path / "f1.yaml"
    f1.write_text("distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 8\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n"
                  "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n  fsdp_backward_prefetch: BACKWARD_POST\n")
    f2 = tmp_path / "f2.yaml"
    f2.write_text("distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 8\nfsdp_config:\n  fsdp_version: 2\n"
                  "  fsdp_reshard_after_forward: true\n  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n")
    keys = {r["key"] for r in diff(f1, f2)["differences"]}
    assert keys == {"framework", "backward_prefetch"}
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": true}, "zero_optimization": {"stage": 3}}')
    keys = {r["key"] for r in diff(ds, f2)["differences"]}
    assert {"framework", "gradient_clipping", "optimizer"} <= keys  # DeepSpeed clips at 1.0 by default; accelerate's FSDP does not


def test_cli_diff_table_and_json(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(DS_SHORT)
    b.write_text(DS_SHORT.replace('"stage": 2', '"stage": 3'))
    assert main(["diff", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert not out["same"] and out["differences"][0]["key"] == "sharding"
    assert main(["diff", str(a), str(b)]) == 0
    assert "zero2" in capsys.readouterr().out
    assert main(["diff", str(a), str(tmp_path / "missing.json")]) == 2


def test_the_stored_tool_defaults_are_the_tools_own():
    """diff reads DeepSpeed's and accelerate's defaults from a stored table (importing them takes seconds):
    it must be what their pydantic models, constants, ClusterConfig and launch options say."""
    from shardlab import tooldefaults
    from shardlab.diff import accelerate_defaults_live, deepspeed_defaults_live

    assert tooldefaults.DEEPSPEED == {stage: deepspeed_defaults_live(stage) for stage in range(4)}
    assert tooldefaults.ACCELERATE == accelerate_defaults_live()
