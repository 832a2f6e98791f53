"""Precision as a Trainer argument: bf16-mixed on CPU, and gradient clipping under a GradScaler.

The networks' logits come out of autocast in bfloat16; ETPO's soft values, KL and losses
must still be float32 arithmetic (etpo/losses.py upcasts and disables autocast). The spies
below record what the module passes to the loss functions during a real bf16-mixed fit
and recompute every result in float64 from the same inputs: a bf16 computation (8-bit
mantissa) would miss the 1e-4 tolerance by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

import etpo_lightning.etpo.module as etpo_module
from etpo_lightning import ETPOModule
from helpers import random_transition_batch, tiny_llama

VOCAB = 64


def _loader(n: int) -> DataLoader:
    batch = random_transition_batch(VOCAB)
    return DataLoader([batch] * n, batch_size=None)


def _trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)


class Spy:
    """Wraps a loss function; keeps (inputs, output) of every call made in autocast."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):
            detach = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls.append(([detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()},
                               tuple(detach(o) for o in out) if isinstance(out, tuple) else detach(out)))
        return out


def _as64(x: Any) -> Any:
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def test_bf16_mixed_fit_computes_etpo_quantities_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("soft_values", "soft_lambda_targets", "policy_loss", "q_loss", "kl_and_entropy")
    spies = {name: Spy(getattr(etpo_module, name)) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(etpo_module, name, spy)
    module = ETPOModule(policy=tiny_llama(VOCAB), beta=0.1, gamma=0.9, policy_lr=3e-3, critic_lr=3e-3, lam=0.9)
    before = [p.detach().clone() for p in module.policy.parameters()]
    trainer = _trainer(max_steps=3, precision="bf16-mixed")
    trainer.fit(module, _loader(5))

    # The spies saw the module's real calls, under autocast, with bfloat16 network outputs.
    for name, spy in spies.items():
        # Once a step each (random batches carry no next ids, so no extra V(s_{t+1}) call).
        assert len(spy.calls) == 3, name
    args, _, _ = spies["soft_values"].calls[0]
    # pi's and rho's logits come out of autocast in bf16 (else the test is vacuous); Q does not:
    # the critic applies its head in float32 (TokenQCritic), so Q/beta is not quantised.
    assert args[0].dtype == torch.float32
    assert {a.dtype for a in args[1:3]} == {torch.bfloat16}, "autocast did not produce bf16 logits: vacuous test"
    # Every result is float32, finite, and equal to a float64 recomputation from the same inputs.
    for name, spy in spies.items():
        for args, kwargs, out in spy.calls:
            outs = out if isinstance(out, tuple) else (out,)
            want = spy.fn(*map(_as64, args), **{k: _as64(v) for k, v in kwargs.items()})
            wants = want if isinstance(want, tuple) else (want,)
            for got, exp in zip(outs, wants):
                assert got.dtype == torch.float32, name
                assert torch.isfinite(got).all(), name
                torch.testing.assert_close(got.double(), exp, rtol=1e-4, atol=1e-6)
    # The logged losses are float32 and finite; master weights stay float32 and moved.
    for key in ("train/q_loss", "train/policy_loss", "train/kl", "train/entropy"):
        value = trainer.callback_metrics[key]
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.policy.parameters()))


class RecordClippedNorms(ETPOModule):
    """Records the gradient norm each optimizer steps with (after the module's clipping)."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.norms = getattr(self, "norms", []) + [float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in grads])))]


def test_clipping_sees_unscaled_gradients_under_a_grad_scaler() -> None:
    """16-mixed scales the loss by the GradScaler's factor; clipping must act after unscaling.

    (On CPU Lightning turns '16-mixed' into bf16; the plugin is built by hand with a CPU
    GradScaler to get the GPU code path.) Clipping the still-scaled gradients, as a clip in
    ``training_step`` would, leaves a norm of clip / scale after unscaling.
    """
    clip, scale = 1e-3, 1024.0
    module = RecordClippedNorms(policy=tiny_llama(VOCAB), beta=0.1, policy_lr=1e-3, critic_lr=1e-3,
                                gradient_clip_val=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    trainer = _trainer(max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, _loader(4))
    assert len(module.norms) == 4  # 2 batches x 2 optimizers
    for norm in module.norms:
        assert norm == pytest.approx(clip, rel=1e-3)


@pytest.mark.parametrize("head_init", ["copy", "dueling"])
def test_q_head_is_float32_under_bf16_autocast(head_init: str) -> None:
    """Q under autocast equals the LM head applied in float64 to the (bf16-computed) last
    hidden state, to float32 precision; the bf16 head output it replaces is ~100x further off."""
    from etpo_lightning.etpo.critic import TokenQCritic

    critic = TokenQCritic.from_policy(tiny_llama(VOCAB, seed=3), head_init=head_init)
    head = critic.backbone.get_output_embeddings()
    with torch.no_grad():
        head.weight.normal_(0, 2.0)  # logits of a pretrained model's scale, tens of nats
        if critic.value_head is not None:
            critic.value_head.weight.normal_(0, 1.0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = torch.randn(2, 7, VOCAB, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = critic(ids, ref_logits=ref)
        out = critic.backbone(input_ids=ids, output_hidden_states=True, use_cache=False)
    assert q.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    hidden = out.hidden_states[-1].double()
    want = hidden @ head.weight.double().T
    bf16 = out.logits.double()
    if critic.value_head is not None:
        value = hidden @ critic.value_head.weight.double().T + critic.value_head.bias.double()
        rho = torch.softmax(ref.double(), -1)
        want = value + (want - (rho * want).sum(-1, keepdim=True))
        bf16 = value + (bf16 - (rho * bf16).sum(-1, keepdim=True))
    err = (q.double() - want).abs().max().item()
    bf16_err = (bf16 - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item()
    assert bf16_err > 100 * err
    # beta = 0.01: the bf16 head would move Q/beta by whole nats.
    assert bf16_err / 0.01 > 1.0
