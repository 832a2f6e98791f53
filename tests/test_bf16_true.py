"""``bf16-true`` on the CPU: bfloat16 weights, float32 RL arithmetic.

With every weight in bf16 (no float32 master copy, unlike bf16-mixed) the networks' outputs
come out in bf16; ETPO's Q (the critic's head is recomputed in float32), soft values,
targets and losses must still be float32, the batch's rewards and behaviour log-probs must
reach the losses unrounded, and the target critic must follow the float32 Polyak average:
a bf16 lerp at tau = 0.005 rounds to no change at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import etpo_lightning.etpo.module as etpo_module
from etpo_lightning import ETPOModule
from helpers import random_transition_batch, run_ddp_fit, tiny_llama

VOCAB = 64
FSDP2_FIT = Path(__file__).with_name("fsdp2_fit.py")


def _bf16_module(**kwargs: Any) -> ETPOModule:
    return ETPOModule(policy=tiny_llama(VOCAB, seed=1), beta=0.1, policy_lr=1e-3, critic_lr=1e-3,
                      critic_head_init="dueling", lam=0.5, **kwargs)


def test_bf16_true_fit_keeps_q_values_targets_and_losses_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[torch.Tensor]] = {}

    def spy(name: str):
        fn = getattr(etpo_module, name)

        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = fn(*args, **kwargs)
            seen.setdefault(name, []).append(out.detach())
            return out

        monkeypatch.setattr(etpo_module, name, wrapped)

    for name in ("soft_values", "soft_lambda_targets", "q_loss", "policy_loss"):
        spy(name)
    q_seen: list[torch.Tensor] = []
    rewards_seen: list[torch.Tensor] = []
    module = _bf16_module()
    compute_q_loss = module.compute_q_loss

    def q_spy(q_taken: torch.Tensor, targets: torch.Tensor, batch: Any) -> torch.Tensor:
        q_seen.append(q_taken.detach())
        rewards_seen.append(batch.rewards)
        return compute_q_loss(q_taken, targets, batch)

    module.compute_q_loss = q_spy
    batch = random_transition_batch(VOCAB)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-true", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 3, batch_size=None))

    # The weights really are bf16 (no float32 copy anywhere) ...
    for net in (module.policy, module.critic, module.target_critic, module.reference):
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    # ... yet Q, the soft values, the targets and both losses are float32 and finite, every step.
    assert len(q_seen) == 3 and all(len(v) == 3 for v in seen.values()), {k: len(v) for k, v in seen.items()}
    for name, outputs in {**seen, "q_taken": q_seen}.items():
        for out in outputs:
            assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), name
    # The rewards reached the targets as float32, unrounded (bf16 would keep 8 bits).
    for rewards in rewards_seen:
        assert rewards.dtype == torch.float32 and torch.equal(rewards, batch.rewards)
    assert not torch.equal(batch.rewards.bfloat16().float(), batch.rewards)  # the test can tell


def test_bf16_target_critic_follows_the_float32_polyak_average() -> None:
    """At tau = 0.005, 40 Polyak steps towards a critic 5% away (each step 0.025% of a weight,
    an eighth of a bf16 ulp): the bf16 target must be the
    float32 average rounded to bf16 (to one bf16 ulp); a plain bf16 lerp would not move."""
    module = _bf16_module(tau=0.005).to(torch.bfloat16)
    module.configure_model()
    with torch.no_grad():
        for p in module.critic.parameters():
            p.mul_(1.05)
    target0 = [p.detach().double().clone() for p in module.target_critic.parameters()]
    critic = [p.detach().double() for p in module.critic.parameters()]
    steps, tau = 40, 0.005
    naive = [p.detach().clone() for p in module.target_critic.parameters()]
    for _ in range(steps):
        module.update_target_critic()
        for t, c in zip(naive, module.critic.parameters()):
            t.lerp_(c.detach(), tau)
    moved = 0
    for got, t0, c, plain in zip(module.target_critic.parameters(), target0, critic, naive):
        want = c + (t0 - c) * (1 - tau) ** steps  # the exact average after `steps` steps
        ulp = want.abs().clamp_min(1e-30) * 2.0 ** -8
        assert got.dtype == torch.bfloat16
        assert bool(((got.double() - want).abs() <= ulp).all())
        moved += int((got != t0.bfloat16()).sum())
        # The plain bf16 lerp stays where it started, on every element.
        assert torch.equal(plain, t0.bfloat16())
    assert moved > 0.5 * sum(int((t != 0).sum()) for t in target0)


def test_bf16_true_under_fsdp2_on_two_ranks(tmp_path: Path) -> None:
    """bf16-true with every network sharded over two ranks: three batches, finite losses, bf16
    shards, and the target critic moved (the float32 average kept per shard)."""
    model = tmp_path / "model"
    tiny_llama(VOCAB, seed=1).save_pretrained(model)
    out = tmp_path / "two"
    run_ddp_fit([str(out), "--model", str(model), "--devices", "2", "--precision", "bf16-true"], script=FSDP2_FIT)
    zero = tmp_path / "zero"
    run_ddp_fit([str(zero), "--model", str(model), "--devices", "1", "--steps", "0", "--precision", "bf16-true"],
                script=FSDP2_FIT)
    initial = torch.load(zero / "rank0.pt", weights_only=False)["weights"]
    for rank in (0, 1):
        got = torch.load(out / f"rank{rank}.pt", weights_only=False)
        assert got["dtensor"] and len(got["losses"]) == 3
        assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in got["losses"])
        target = got["weights"]["target_critic"]
        assert {v.dtype for v in target.values()} == {torch.bfloat16}
        assert any(not torch.equal(v, initial["target_critic"][k]) for k, v in target.items())
