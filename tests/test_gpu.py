"""FSDP and the GPU precisions.

Everything marked ``gpu`` is skipped when ``torch.cuda.is_available()`` is False (and the
two-GPU test when fewer than two devices are visible), nothing else decides it; it has NOT
been run in development (no GPU there): run ``pytest -m gpu tests/test_gpu.py`` on a GPU
machine.
The first test runs on CPU: it checks that configs/fsdp_gpu.yaml's wrap policy makes each
of the four networks its own FSDP unit, with the critic and its target wrapped alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

from etpo_lightning import ETPOModule
from helpers import random_transition_batch, run_ddp_fit, save_tiny_assets, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
NETWORKS = ("policy", "critic", "target_critic", "reference")


def _fsdp_strategy_from_config() -> Any:
    """configs/fsdp_gpu.yaml's strategy, parsed and instantiated as the CLI does."""
    from jsonargparse import ArgumentParser
    from pytorch_lightning.strategies import Strategy

    config = yaml.safe_load((ROOT / "configs" / "fsdp_gpu.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Strategy, "strategy")
    return parser.instantiate_classes(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy


def test_fsdp_config_makes_each_network_its_own_unit() -> None:
    strategy = _fsdp_strategy_from_config()
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs.get("use_orig_params") is True
    policy = strategy.kwargs["auto_wrap_policy"]
    module = ETPOModule(policy=tiny_llama(VOCAB), beta=0.1)
    wrapped = set(policy._run_policy(module, set(), {}))
    # Every whole LM is a unit: frozen and trained weights never share a flat parameter.
    for lm in (module.policy, module.reference, module.critic.backbone, module.target_critic.backbone):
        assert lm in wrapped
    layers = [m for m in module.modules() if isinstance(m, LlamaDecoderLayer)]
    assert len(layers) == 4 * 2 and all(layer in wrapped for layer in layers)

    # Critic and target critic wrapped alike: same units at the same relative paths, so
    # their local shards line up for the shard-by-shard Polyak update.
    def units(net: torch.nn.Module) -> list[str]:
        return [name for name, m in net.named_modules() if m in wrapped]

    assert units(module.critic) == units(module.target_critic) and len(units(module.critic)) == 3


# ----------------------------------------------------------------------------- GPU only
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

def _fixed_loader(n: int) -> DataLoader:
    return DataLoader([random_transition_batch(VOCAB)] * n, batch_size=None)


def _quiet_trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


class _ClippedNorms(ETPOModule):
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad.float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms = getattr(self, "norms", []) + [float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])))]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_precisions_on_one_gpu(precision: str) -> None:
    clip = 1e-3
    module = _ClippedNorms(policy=tiny_llama(VOCAB), beta=0.1, policy_lr=1e-3, critic_lr=1e-3, gradient_clip_val=clip)
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = _quiet_trainer(accelerator="cuda", devices=1, precision=precision, max_steps=3)
    trainer.fit(module, _fixed_loader(5))
    for key in ("train/q_loss", "train/policy_loss", "train/kl"):
        value = trainer.callback_metrics[key]
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    want_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert all(p.dtype == want_dtype for p in module.parameters())
    assert any(not torch.equal(a.to(p.device, p.dtype), p) for a, p in zip(before, module.policy.parameters()))
    # Clipping acts on unscaled gradients (16-mixed's GradScaler): the stepped norm is the clip.
    finite = [n for n in module.norms if n == n]  # a skipped fp16 overflow step gives nan
    assert finite and all(n == pytest.approx(clip, rel=1e-2) for n in finite)


@pytest.mark.gpu
@needs_gpu
def test_fsdp_on_one_gpu_steps_clips_and_averages(tmp_path: Path) -> None:
    """FSDP with the config's wrap policy on one GPU (FSDP uses NO_SHARD at world size 1:
    this checks wrapping, lazy init, clipping and Polyak through the wrapper, not sharding)."""
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model_dir = tmp_path / "model"
    tiny_llama(VOCAB).save_pretrained(model_dir)
    tau, clip = 0.1, 1e-3
    module = _ClippedNorms(model_name_or_path=str(model_dir), beta=0.1, policy_lr=1e-3, critic_lr=1e-3, tau=tau,
                           gradient_clip_val=clip)
    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer, LlamaForCausalLM})
    trainer = _quiet_trainer(accelerator="cuda", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=1)
    initial = {k: v.float().cpu() for k, v in tiny_llama(VOCAB).state_dict().items()}
    trainer.fit(module, _fixed_loader(3))
    assert all(n == pytest.approx(clip, rel=1e-2) for n in module.norms) and len(module.norms) == 2
    with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
        def params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
            return {k.replace("_fsdp_wrapped_module.", "").removeprefix("backbone."): p.detach().float().cpu()
                    for k, p in net.named_parameters()}

        policy, critic, target, ref = (params(getattr(module, n)) for n in NETWORKS)
    for name, p0 in initial.items():
        if name not in critic:
            continue
        # Polyak from the identical start: target = init + tau * (critic - init).
        torch.testing.assert_close(target[name], p0 + tau * (critic[name] - p0), rtol=0, atol=1e-5)
        torch.testing.assert_close(ref[name], p0, rtol=0, atol=0)
    assert any(not torch.equal(policy[k], initial[k]) for k in policy)


@pytest.mark.gpu
@needs_gpu
@needs_two_gpus
def test_fsdp_two_gpus_rollout_and_sync(tmp_path: Path) -> None:
    """Two FSDP ranks generating in their own environments (different lengths per rank)."""
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

    tok = train_tokenizer(["Say the word 'apple'.\nAnswer: apple river stone cloud"] * 10, vocab_size=300)
    model_dir, tok_dir = save_tiny_assets(tmp_path, tok, seed=1)
    out = tmp_path / "fsdp"
    run_ddp_fit([str(out), "--model", model_dir, "--tokenizer", tok_dir, "--max-steps", "3", "--strategy", "fsdp",
                 "--accelerator", "gpu"], timeout=600)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    for name in NETWORKS:
        a, b = ranks[0]["final"][name], ranks[1]["final"][name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(not torch.equal(ranks[0]["final"]["policy"][k], v) for k, v in ranks[0]["start"]["policy"].items())
    # The full-state checkpoint loads on one device.
    single = ETPOModule(policy=tiny_llama(len(tok), seed=1), beta=0.1)
    state = torch.load(out / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    single.load_state_dict(state)
    torch.testing.assert_close(dict(single.policy.named_parameters())["lm_head.weight"].float(),
                               ranks[0]["final"]["policy"]["lm_head.weight"].float())
