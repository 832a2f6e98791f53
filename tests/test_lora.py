"""ETPOModule(lora=...): four ETPO networks as adapters on one frozen base (peft)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from etpo_lightning import ETPOModule
from helpers import random_transition_batch, tiny_llama

pytest.importorskip("peft")
from etpo_lightning.core.lora import AdapterView, LoRAConfig  # noqa: E402

VOCAB = 64
TAU = 0.05


def _module(base: torch.nn.Module) -> ETPOModule:
    # A large LoRA learning rate so that a few steps move the adapters visibly.
    return ETPOModule(policy=base, beta=0.1, gamma=0.9, policy_lr=2e-2, critic_lr=2e-2, tau=TAU, lora=LoRAConfig(r=4))


def _fit(module: pl.LightningModule, steps: int) -> None:
    batch = random_transition_batch(VOCAB)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader([batch] * (steps + 1), batch_size=None))


def _clone(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@pytest.fixture(scope="module")
def trained() -> tuple[ETPOModule, torch.nn.Module, dict[str, list[torch.Tensor]]]:
    """A LoRA module after 4 training batches, an untouched copy of its base, and the initial adapters."""
    base = tiny_llama(VOCAB, seed=0)
    untouched = copy.deepcopy(base)  # independent copy, made before peft wraps the base
    module = _module(base)
    initial = {name: _clone(getattr(module, name).parameters()) for name in ("policy", "critic", "target_critic")}
    _fit(module, 4)
    return module, untouched, initial


def test_views_hold_only_their_adapter_and_one_base_is_shared() -> None:
    base = tiny_llama(VOCAB, seed=0)
    n_base = sum(p.numel() for p in base.parameters())
    module = _module(base)
    policy, critic, target = (list(getattr(module, n).parameters()) for n in ("policy", "critic", "target_critic"))
    assert list(module.reference.parameters()) == []
    assert all(p.requires_grad for p in policy + critic) and not any(p.requires_grad for p in target)
    # Critic and target are the same adapter layout (Polyak pairs them parameter by parameter),
    # with a LoRA on the LM head that the policy's adapter does not have.
    assert [p.shape for p in critic] == [p.shape for p in target] and len(critic) > len(policy)
    # The whole module stores one base: its unique parameters are the base plus adapters.
    unique = sum(p.numel() for p in module.parameters())
    n_adapters = sum(p.numel() for p in policy + critic + target)
    assert unique == n_base + n_adapters and n_adapters < n_base  # (tiny base; see bench/memory_modes.py)
    full = ETPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1)
    assert sum(p.numel() for p in full.parameters()) == 4 * n_base
    # The base is frozen; the optimizers see exactly the two trained adapters.
    assert not any(p.requires_grad for p in module.shared_lora.base_model().parameters()
                   if not any(p is q for q in policy + critic))
    opt_policy, opt_critic = module.configure_optimizers()
    assert [p for g in opt_policy.param_groups for p in g["params"]] == policy
    assert [p for g in opt_critic.param_groups for p in g["params"]] == critic


def test_initial_networks_equal_the_base_and_critic_is_full_vocabulary_q() -> None:
    base = tiny_llama(VOCAB, seed=0)
    untouched = copy.deepcopy(base)
    module = _module(base)
    batch = random_transition_batch(VOCAB)
    want = module.action_outputs(untouched, batch)
    q = module.action_outputs(module.critic, batch)
    assert q.shape == (len(batch), batch.action_ids.shape[1], VOCAB)  # Q over the whole vocabulary
    # LoRA's B matrices start at zero: every network starts as the base, like the full model's copies.
    for view in (module.policy, module.critic, module.target_critic, module.reference):
        torch.testing.assert_close(module.action_outputs(view, batch), want, rtol=0, atol=1e-6)


def test_lora_training_moves_adapters_not_the_base(trained) -> None:
    module, untouched, initial = trained
    # Base weights: bit-identical to the independent copy.
    base_params = dict(module.shared_lora.base_model().named_parameters())
    adapter_ids = {id(p) for n in ("policy", "critic", "target_critic") for p in getattr(module, n).parameters()}
    checked = 0
    for name, p in untouched.named_parameters():
        # peft renames adapted layers' weights to ``...q_proj.base_layer.weight``.
        mine = base_params[name] if name in base_params else base_params[name.replace(".weight", ".base_layer.weight")]
        assert id(mine) not in adapter_ids and torch.equal(mine, p), name
        checked += 1
    assert checked == len(list(untouched.parameters()))
    # Both trained adapters moved; the target followed the critic by Polyak averaging only.
    for name in ("policy", "critic"):
        now = list(getattr(module, name).parameters())
        assert any(not torch.equal(a, b) for a, b in zip(initial[name], now)), name
    target_now = _clone(module.target_critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(initial["target_critic"], target_now))
    assert all(not p.requires_grad for p in module.target_critic.parameters())


def test_polyak_step_on_the_adapter() -> None:
    module = _module(tiny_llama(VOCAB, seed=0))
    target_before = _clone(module.target_critic.parameters())
    _fit(module, 1)
    for t0, t1, c1 in zip(target_before, module.target_critic.parameters(), module.critic.parameters()):
        torch.testing.assert_close(t1.detach(), t0 + TAU * (c1.detach() - t0), rtol=0, atol=1e-7)


def test_reference_is_the_disabled_base_after_training(trained) -> None:
    module, untouched, _ = trained
    batch = random_transition_batch(VOCAB, seed=5)
    want = module.action_outputs(untouched, batch)
    ref = module.action_outputs(module.reference, batch)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    # Not vacuous: the trained policy and critic now differ from the base.
    assert (module.action_outputs(module.policy, batch) - want).abs().max() > 1e-3
    assert (module.action_outputs(module.critic, batch) - want).abs().max() > 1e-3
    # Running the reference did not disturb the trained adapters' trainability.
    assert all(p.requires_grad for p in module.policy.parameters())


def test_policy_export_and_generate_match_the_adapted_model(trained, tmp_path: Path) -> None:
    """HFExport calls ``policy.save_pretrained``; the rollout calls ``policy.generate``."""
    module, _, _ = trained
    assert isinstance(module.policy, AdapterView)
    module.policy.save_pretrained(tmp_path / "policy")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    ids = torch.tensor([[1, 5, 9, 12, 30, 7]])
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module.policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        greedy = module.policy.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(greedy, exported.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0))
    module.policy.train()
    assert "lora" not in " ".join(n for n, _ in exported.named_parameters())  # a plain merged model


def test_lora_refuses_injected_critic() -> None:
    with pytest.raises(ValueError, match="pass only `policy`"):
        ETPOModule(policy=tiny_llama(VOCAB), critic=tiny_llama(VOCAB), lora=LoRAConfig())
    with pytest.raises(ValueError, match="critic_head_init='copy'"):
        ETPOModule(policy=tiny_llama(VOCAB), critic_head_init="zero", lora=LoRAConfig())


def test_lora_takes_every_etpo_argument() -> None:
    """critic_advantage_scale, lam and traces work with lora: they are hyperparameters,
    validated, and lam shapes the critic's targets (ETPO(lambda) on the adapters)."""
    from etpo_lightning.losses import soft_lambda_targets, soft_values

    module = ETPOModule(policy=tiny_llama(VOCAB), beta=0.1, gamma=0.9, lora=LoRAConfig(r=4),
                        critic_advantage_scale=0.5, lam=0.9, traces=True)
    assert (module.hparams.critic_advantage_scale, module.hparams.lam, module.hparams.traces) == (0.5, 0.9, True)
    with pytest.raises(ValueError, match="critic_advantage_scale"):
        ETPOModule(policy=tiny_llama(VOCAB), critic_advantage_scale=0.0, lora=LoRAConfig())
    with pytest.raises(ValueError, match="lam must be in"):
        ETPOModule(policy=tiny_llama(VOCAB), lam=1.5, lora=LoRAConfig())
    with torch.no_grad():  # a critic adapter that is not the identity, so targets depend on lam
        for p in module.critic.parameters():
            p.normal_(0, 0.3)
        for t, c in zip(module.target_critic.parameters(), module.critic.parameters()):
            t.copy_(c)
    batch = random_transition_batch(VOCAB)
    with torch.no_grad():
        out = module.compute_losses(batch)
        pi, rho = module.action_outputs(module.policy, batch), module.action_outputs(module.reference, batch)
        qt = module.action_outputs(module.target_critic, batch)
        values = soft_values(qt, pi, rho, 0.1)
        taken = qt.gather(-1, batch.action_ids[..., None]).squeeze(-1)
        mask = batch.action_mask.float()

        def mean_target(lam: float) -> float:
            g = soft_lambda_targets(taken, values, batch.action_mask, batch.rewards, batch.dones, batch.next_values,
                                    0.9, lam, None)  # no behaviour log-probs in this batch: no traces
            return float((g * mask).sum() / mask.sum())

    assert out["target"].item() == pytest.approx(mean_target(0.9), rel=1e-5)
    assert abs(mean_target(0.9) - mean_target(0.0)) > 1e-3
