"""configs/accelerate/{ddp,fsdp,deepspeed_zero3}.yaml go through accelerate's own launcher code: its
config parser (unknown keys are an error), ``accelerate launch``'s validation and the environment it
hands to each process, then the plugin a training process builds from that environment. Nothing
here runs DeepSpeed or a GPU (neither exists on kdbench's CPU machines; docs/scaling.md says what
was run where): this pins that the files mean what docs/scaling.md says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launch_env(name: str, monkeypatch) -> tuple:
    """(validated launch args, per-process environment) as ``accelerate launch --config_file`` makes them."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = CONFIGS / f"{name}.yaml"
    ClusterConfig.from_yaml_file(str(path))  # raises on a key accelerate does not know
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "kdbench", "train"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # what launch_command adds before preparing a DeepSpeed launch
        fields = list(defaults.deepspeed_config.keys()) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return args, env


def test_every_config_is_documented_and_complete():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["ddp", "deepspeed_zero3", "fsdp"]
    scaling = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    for name in names:
        body = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert body["num_processes"] == 8 and body["mixed_precision"] == "bf16" and body["use_cpu"] is False
        assert f"configs/accelerate/{name}.yaml" in scaling


def test_ddp_config_is_plain_multi_gpu(monkeypatch):
    args, env = _launch_env("ddp", monkeypatch)
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 8
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp_config_gives_fsdp2_full_shard(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    args, env = _launch_env("fsdp", monkeypatch)
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as in a training process
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True and plugin.activation_checkpointing is False
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"  # one unit per decoder block


def test_deepspeed_zero3_config_gives_stage_3_with_partitioned_init(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    args, env = _launch_env("deepspeed_zero3", monkeypatch)
    assert args.use_deepspeed and env["ACCELERATE_USE_DEEPSPEED"] == "true"
    plugin = DeepSpeedPlugin()  # reads the environment; DeepSpeed itself is not needed to build the config
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 3 and zero["stage"] == 3
    assert plugin.zero3_init_flag is True  # models built partitioned: the teacher never whole on one rank
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"]["device"] == "none" and zero["offload_optimizer"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3"])
def test_unknown_key_is_refused_by_accelerate(name, tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    body = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    body["fsdp_verison"] = 2
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ValueError, match="unknown keys"):
        ClusterConfig.from_yaml_file(str(path))


def test_frozen_teacher_config_from_the_zero3_config(monkeypatch):
    """The teacher's DeepSpeed inference configuration (TRL's prepare_deepspeed) built from the plugin a
    process of `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml` builds: ZeRO-3 kept,
    buckets sized by the teacher's hidden size, no optimizer, batch sizes filled, nothing left at auto."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    from kdbench.parallel.deepspeed_frozen import frozen_inference_config, model_hidden_size

    _launch_env("deepspeed_zero3", monkeypatch)
    plugin = DeepSpeedPlugin()
    before = yaml.safe_dump(plugin.deepspeed_config)
    config = frozen_inference_config(dict(plugin.deepspeed_config, optimizer={"type": "AdamW"}), 5120,
                                     micro_batch_size=4, gradient_accumulation_steps=2, world_size=8)
    assert yaml.safe_dump(plugin.deepspeed_config) == before  # the student's configuration is untouched
    parsed = HfDeepSpeedConfig(config)
    assert parsed.is_zero3() and parsed.get_value("zero_optimization.reduce_bucket_size") == 5120 * 5120
    assert parsed.get_value("zero_optimization.stage3_param_persistence_threshold") == 51200
    assert parsed.get_value("zero_optimization.stage3_prefetch_bucket_size") == int(0.9 * 5120 * 5120)
    assert "optimizer" not in config and "scheduler" not in config
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (4, 4 * 1 * 8)
    assert "auto" not in yaml.safe_dump(config)

    class Llama13B:
        hidden_size = 5120

    assert model_hidden_size(Llama13B()) == 5120


def test_frozen_teacher_config_below_zero3_is_a_replicated_copy():
    from kdbench.errors import ConfigError
    from kdbench.parallel.deepspeed_frozen import frozen_inference_config

    zero2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    config = frozen_inference_config(zero2, 768, micro_batch_size=2, gradient_accumulation_steps=1, world_size=2)
    assert config["zero_optimization"] == {"stage": 0}  # ZeRO-1/2 shard nothing a frozen model has
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        frozen_inference_config({"train_batch_size": 8}, 768, micro_batch_size=2, gradient_accumulation_steps=1,
                                world_size=2)
    with pytest.raises(ConfigError, match="bf16.enabled: auto"):
        frozen_inference_config({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}, 768,
                                micro_batch_size=2, gradient_accumulation_steps=1, world_size=2)


def test_frozen_teacher_without_deepspeed_is_one_sentence():
    import importlib.util

    from kdbench.errors import ConfigError
    from kdbench.parallel.deepspeed_frozen import prepare_frozen_deepspeed

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        prepare_frozen_deepspeed(object(), object(), object())
