"""``configs/fsdp2_gpu.yaml`` parses, and its four CodeLlama-7B-sized networks shard on the
meta device over its ranks (a fake process group: no GPU, no weights, no memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from etpo_lightning.cli.main import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fsdp2_gpu.yaml"
CODELLAMA_7B = {  # codellama/CodeLlama-7b-hf's config.json (the architecture only)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32016,
    "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 1000000, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def test_fsdp2_gpu_config_parses(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "etpo_lightning.core.fsdp2.FSDP2Strategy"
    assert strategy["init_args"]["param_dtype"] == "bfloat16" and strategy["init_args"]["reduce_dtype"] == "float32"


def test_fsdp2_gpu_config_shards_7b_networks_on_meta(tmp_path: Path) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh

    from etpo_lightning import ETPOModule
    from etpo_lightning.core.fsdp2 import FSDP2Strategy, decoder_layers, fully_shard_network, local_shard

    config = yaml.safe_load(CONFIG.read_text())
    (tmp_path / "config.json").write_text(json.dumps(CODELLAMA_7B))
    init_args = {**config["model"]["init_args"], "model_name_or_path": str(tmp_path)}
    module = ETPOModule(**init_args)
    strategy = FSDP2Strategy(**config["trainer"]["strategy"]["init_args"])
    world = config["trainer"]["devices"]
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        # What configure_model does on a rank other than 0: the architecture on meta, no load.
        module._policy_on_meta = True
        module.build_models()
        nets = module.sharded_networks()
        assert set(nets) == {"policy", "critic", "target_critic", "reference"}
        for net in nets.values():
            fully_shard_network(net, mesh, strategy.mixed_precision_policy())
    finally:
        dist.destroy_process_group()
    total = local = 0
    for name, net in nets.items():
        assert isinstance(net, FSDPModule), name
        layers = decoder_layers(net)
        assert len(layers) == 32 and all(isinstance(layer, FSDPModule) for layer in layers), name
        for p in net.parameters():
            # The checkpoint's dtype (its config says bfloat16), as from_pretrained would load it.
            assert isinstance(p, DTensor) and p.is_meta and p.dtype == torch.bfloat16
            total += p.numel()
            local += local_shard(p).numel()
        policy = net._get_fsdp_state()._mp_policy
        assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert 4 * 6.7e9 < total < 4 * 6.8e9  # four CodeLlama-7B networks (and the critic's heads)
    assert abs(local / total - 1 / world) < 1e-3  # each rank holds 1/N
