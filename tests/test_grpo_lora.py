"""GRPOModule(lora=...): GRPO's policy as a LoRA adapter on one frozen base, the reference being
that base with the adapter disabled (peft)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from etpo_lightning import GRPOModule, TokenRLModule
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.grpo.losses import grpo_loss, row_advantages
from ddp_fit import UnevenKeywordEnv
from helpers import tiny_llama, word_tokenizer
from test_grpo import VOCAB, WORDS, _fit, _grouped_batch, _rollout_data

pytest.importorskip("peft")
from etpo_lightning.core.lora import AdapterView, LoRAConfig  # noqa: E402

LORA_R, LORA_ALPHA = 4, 16


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def _module(base: torch.nn.Module, **kwargs: Any) -> GRPOModule:
    # A large learning rate so that a few steps move the adapter visibly.
    return GRPOModule(policy=base, beta=0.2, policy_lr=2e-2, lora=LoRAConfig(r=LORA_R, alpha=LORA_ALPHA), **kwargs)


def _train_batches(n: int) -> list:
    batches = []
    for i in range(n):
        batch = _grouped_batch(seed=10 + i)
        batch.group_returns = batch.group_returns + 0.3 * i  # every batch has a non-constant group
        batches.append(batch)
    return batches


@pytest.fixture(scope="module")
def trained() -> tuple[GRPOModule, torch.nn.Module, list[torch.Tensor]]:
    """A LoRA GRPO module after 4 training batches, an untouched copy of its base (made
    before peft wraps it) and the initial adapter."""
    base = tiny_llama(VOCAB, seed=0)
    untouched = copy.deepcopy(base)
    module = _module(base)
    initial = [p.detach().clone() for p in module.policy.parameters()]
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(_train_batches(5), batch_size=None))
    assert trainer.global_step == 4
    return module, untouched, initial


def test_one_base_one_adapter_no_critic() -> None:
    base = tiny_llama(VOCAB, seed=0)
    n_base = sum(p.numel() for p in base.parameters())
    module = _module(base)
    assert isinstance(module, GRPOModule) and isinstance(module.policy, AdapterView)
    policy = list(module.policy.parameters())
    assert list(module.reference.parameters()) == [] and module.critic is None
    assert policy and all(p.requires_grad for p in policy)
    # One base: the module's unique parameters are the base plus the adapter.
    n_adapter = sum(p.numel() for p in policy)
    assert sum(p.numel() for p in module.parameters()) == n_base + n_adapter and n_adapter < n_base
    assert sum(p.numel() for p in GRPOModule(policy=tiny_llama(VOCAB, seed=0)).parameters()) == 2 * n_base
    # The base is frozen; the one optimizer trains exactly the adapter; nothing critic-like is stored.
    ids = {id(p) for p in policy}
    assert not any(p.requires_grad for p in module.shared_lora.base_model().parameters() if id(p) not in ids)
    (opt,) = module.configure_optimizers()
    assert [p for g in opt.param_groups for p in g["params"]] == policy
    assert not any("critic" in k for k in module.state_dict())
    # At the start (LoRA's B = 0) the policy and the reference are the base.
    untouched = tiny_llama(VOCAB, seed=0)
    batch = _grouped_batch()
    want = module.action_outputs(untouched, batch)
    for view in (module.policy, module.reference):
        torch.testing.assert_close(module.action_outputs(view, batch), want, rtol=0, atol=1e-6)


def test_refuses_an_injected_reference_and_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="pass only `policy`"):
        GRPOModule(policy=tiny_llama(VOCAB), reference=tiny_llama(VOCAB), lora=LoRAConfig())
    with pytest.raises(ValueError, match="lora.r must be an integer >= 1"):
        GRPOModule(policy=tiny_llama(VOCAB), lora=LoRAConfig(r=0))


def test_training_moves_the_adapter_only_and_the_reference_stays_the_base(trained) -> None:
    module, untouched, initial = trained
    # Base weights: bit-identical to the independent copy (peft renames adapted layers'
    # weights ``...q_proj.base_layer.weight``).
    base_params = dict(module.shared_lora.base_model().named_parameters())
    adapter_ids = {id(p) for p in module.policy.parameters()}
    for name, p in untouched.named_parameters():
        mine = base_params.get(name, base_params.get(name.replace(".weight", ".base_layer.weight")))
        assert mine is not None and id(mine) not in adapter_ids and torch.equal(mine, p), name
    # The adapter moved.
    assert any(not torch.equal(a, b) for a, b in zip(initial, module.policy.parameters()))
    # The reference's logits are the untouched base's; the policy's are not.
    batch = _grouped_batch(seed=3)
    want = module.action_outputs(untouched, batch)
    torch.testing.assert_close(module.action_outputs(module.reference, batch), want, rtol=0, atol=1e-6)
    assert (module.action_outputs(module.policy, batch) - want).abs().max() > 1e-3
    # Running the reference left the adapter trainable.
    assert all(p.requires_grad for p in module.policy.parameters())


def _merged_by_hand(module: GRPOModule, untouched: torch.nn.Module) -> torch.nn.Module:
    """The adapted policy without peft: W + (alpha / r) B A in a copy of the untouched base."""
    merged = copy.deepcopy(untouched)
    weights = dict(merged.named_parameters())
    n = 0
    for name, m in module.shared_lora.base_model().named_modules():
        if hasattr(m, "lora_A") and "policy" in m.lora_A:
            a, b = m.lora_A["policy"].weight, m.lora_B["policy"].weight
            with torch.no_grad():
                weights[f"{name}.weight"].add_((LORA_ALPHA / LORA_R) * b @ a)
            n += 1
    assert n > 0
    return merged.eval()


@pytest.mark.parametrize("how", ["sequence", "token"])
def test_losses_match_an_independent_grpo_computation(trained, how) -> None:
    module, untouched, _ = trained
    module.hparams.loss_aggregation = how
    try:
        batch = _grouped_batch(seed=7)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            logp = module.action_logprobs(batch)
            batch.old_logprobs = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * batch.action_mask
            out = module.compute_losses(batch)
    finally:
        module.hparams.loss_aggregation = "sequence"

    inputs = TokenRLModule.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    start = batch.prompt_ids.shape[1] - 1

    def taken_logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**inputs).logits[:, start:]
        return torch.log_softmax(logits.double(), -1).gather(-1, batch.action_ids[..., None]).squeeze(-1)

    policy_lp = taken_logprobs(_merged_by_hand(module, untouched))
    ref_lp = taken_logprobs(untouched)
    assert (policy_lp - ref_lp).abs().max() > 1e-3  # the adapted policy is not the base
    adv = row_advantages(batch.group_returns.double(), batch.group_members, scale_by_std=True)
    want = grpo_loss(policy_lp, batch.old_logprobs.double(), ref_lp, adv, batch.action_mask, clip_ratio=0.2,
                     beta=0.2, how=how)
    assert out["policy_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    # The KL term is there: with the policy as its own reference the loss would differ.
    without_kl = grpo_loss(policy_lp, batch.old_logprobs.double(), policy_lp, adv, batch.action_mask, 0.2, 0.2, how)
    assert abs(without_kl.item() - want.item()) > 1e-4


def test_fit_through_the_grouped_rollout_datamodule(tmp_path: Path, tokenizer) -> None:
    pl.seed_everything(0)
    # One-step episodes with a dense reward (the share of the target's letters in the answer),
    # so the G answers of a random tiny model score differently and the adapter gets a gradient.
    dm = RolloutDataModule(env=UnevenKeywordEnv(words=WORDS, max_steps=1), tokenizer=tokenizer, num_envs=4,
                           group_size=2, rollout_steps=1, batch_size=4, max_new_tokens=4, seed=0)
    base = tiny_llama(len(tokenizer), seed=1)
    untouched = copy.deepcopy(base)
    module = _module(base)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"), callbacks=[ckpt],
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and dm.collections == 3 and dm.groups_completed == 6
    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    for key in ("policy_loss", "kl", "k3_kl", "entropy", "advantage_abs"):
        col = logged[f"train/{key}"].dropna()
        assert len(col) == 3 and torch.isfinite(torch.tensor(col.values)).all(), key
    assert logged["train/advantage_abs"].dropna().max() > 0
    # Rollouts (policy.generate) and training left the base alone.
    base_params = dict(module.shared_lora.base_model().named_parameters())
    for name, p in untouched.named_parameters():
        assert torch.equal(base_params.get(name, base_params.get(name.replace(".weight", ".base_layer.weight"))), p)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert len(saved["optimizer_states"]) == 1 and not any("critic" in k for k in saved["state_dict"])
    # The checkpoint loads into a new module (the injected base passed again): same weights.
    loaded = GRPOModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False,
                                             policy=tiny_llama(len(tokenizer), seed=1))
    a, b = module.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(p.abs().sum() > 0 for name, p in loaded.shared_lora.peft.named_parameters() if "lora_B" in name)


class _LoRAGRPO(GRPOModule):
    """``test_grpo._fit`` builds modules as ``cls(policy=..., beta=..., policy_lr=...)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(lora=LoRAConfig(r=LORA_R, alpha=LORA_ALPHA), **kwargs)


class _NoRNGRestore(_LoRAGRPO):
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint({k: v for k, v in checkpoint.items() if k != "rng_states"})


def test_resume_with_grouped_rollouts_is_exact(tmp_path: Path, tokenizer) -> None:
    """As test_grpo.py's resume test, with the LoRA module: N batches in one go == N/2, a
    checkpoint, and N/2 more in a new Trainer."""
    n, vocab = 4, len(tokenizer)
    full_dm = _rollout_data(tokenizer)
    full, full_losses = _fit(tmp_path / "full", n, full_dm, vocab, module_cls=_LoRAGRPO)
    _, first = _fit(tmp_path / "half", n // 2, _rollout_data(tokenizer), vocab, module_cls=_LoRAGRPO)
    ckpt = tmp_path / "half" / "ckpt" / f"step={n // 2}.ckpt"
    resumed_dm = _rollout_data(tokenizer)
    resumed, second = _fit(tmp_path / "resumed", n, resumed_dm, vocab, ckpt_path=str(ckpt), module_cls=_LoRAGRPO)

    assert first + second == full_losses  # bit-identical, batch by batch
    assert any(loss != 0 for loss, _ in full_losses)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # LoRA's B matrices start at 0: the adapter trained.
    assert any(p.abs().sum() > 0 for name, p in full.shared_lora.peft.named_parameters() if "lora_B" in name)
    assert resumed_dm.env_steps == full_dm.env_steps == 8 and resumed_dm.groups_completed == full_dm.groups_completed

    # Negative control: the same resume without the RNG states diverges.
    _, control = _fit(tmp_path / "control", n // 2 + 1, _rollout_data(tokenizer), vocab, ckpt_path=str(ckpt),
                      module_cls=_NoRNGRestore)
    assert control[0] != full_losses[n // 2]
