"""PPOModule (the paper's baseline): its pure loss functions against brute force, and
real Trainer runs with a tiny Llama."""

import math

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from etpo_lightning.ppo import PPOModule, TokenValueCritic
from etpo_lightning.ppo.losses import (
    clipped_policy_loss,
    gae,
    masked_mean,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)
from helpers import random_transition_batch, tiny_llama

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for these tiny models: on a busy 2-core machine, two threads that
    wait for each other at every small matmul made the fit test several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- pure functions
def _brute_gae(values, rewards, mask, dones, next_values, gamma, lam, token_discount):
    """A_j = sum_{k >= j} (c lam)^(k-j) delta_k, written as the explicit sum, row by row."""
    c = 1.0 if token_discount == "none" else gamma
    B, L = values.shape
    adv = [[0.0] * L for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        deltas = []
        for k in range(n):
            nxt = c * float(values[b, k + 1]) if k + 1 < n else gamma * (1 - float(dones[b])) * float(next_values[b])
            deltas.append(float(rewards[b, k]) + nxt - float(values[b, k]))
        for j in range(n):
            adv[b][j] = sum((c * lam) ** (k - j) * deltas[k] for k in range(j, n))
    return torch.tensor(adv, dtype=torch.float64)


def _mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("token_discount", ["none", "gamma"])
def test_gae_matches_the_explicit_sum_with_padding_and_dones(token_discount):
    g = torch.Generator().manual_seed(0)
    lengths, width = [3, 1, 5, 0, 4], 5
    mask = _mask(lengths, width)
    values = torch.randn(5, width, generator=g, dtype=torch.float64)
    rewards = torch.randn(5, width, generator=g, dtype=torch.float64) * mask
    dones = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    next_values = torch.randn(5, generator=g, dtype=torch.float64)
    adv, ret = gae(values, rewards, mask, dones, next_values, gamma=0.8, lam=0.7, token_discount=token_discount)
    want = _brute_gae(values, rewards, mask, dones, next_values, 0.8, 0.7, token_discount)
    torch.testing.assert_close(adv, want)
    torch.testing.assert_close(ret, (want + values) * mask)
    assert adv[~mask].abs().max() == 0 and ret[~mask].abs().max() == 0


def test_gae_hand_computed():
    values = torch.tensor([[1.0, 2.0]])
    rewards = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    nv = torch.tensor([4.0])
    # none: delta_1 = 1 + 0.5*4 - 2 = 1, delta_0 = 0 + 2 - 1 = 1, A_0 = 1 + 0.5*1.
    adv, ret = gae(values, rewards, mask, torch.tensor([0.0]), nv, gamma=0.5, lam=0.5, token_discount="none")
    torch.testing.assert_close(adv, torch.tensor([[1.5, 1.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.5, 3.0]]))
    # gamma: delta_0 = 0 + 0.5*2 - 1 = 0, A_0 = 0 + 0.5*0.5*1.
    adv, _ = gae(values, rewards, mask, torch.tensor([0.0]), nv, gamma=0.5, lam=0.5, token_discount="gamma")
    torch.testing.assert_close(adv, torch.tensor([[0.25, 1.0]]))
    # done: no bootstrap, delta_1 = 1 - 2 = -1, A_0 = 1 + 0.5*(-1).
    adv, _ = gae(values, rewards, mask, torch.tensor([1.0]), nv, gamma=0.5, lam=0.5, token_discount="none")
    torch.testing.assert_close(adv, torch.tensor([[0.5, -1.0]]))


def test_gae_lambda_one_is_the_undiscounted_in_action_return():
    """lam = 1, no token discount: G_0 = sum of the action's rewards + gamma V(s'), whatever V is."""
    g = torch.Generator().manual_seed(1)
    mask = _mask([4, 2], 4)
    values = torch.randn(2, 4, generator=g)
    rewards = torch.randn(2, 4, generator=g) * mask
    _, ret = gae(values, rewards, mask, torch.tensor([0.0, 1.0]), torch.tensor([3.0, 3.0]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret[:, 0], rewards.sum(1) + torch.tensor([0.9 * 3.0, 0.0]))


def test_token_rewards_hand_computed():
    old = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-0.5, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0, -9.0], [-0.5, -9.0, -9.0, -9.0]])
    mask = _mask([3, 1], 4)
    r = token_rewards(old, ref, torch.tensor([5.0, -1.0]), mask, beta_kl=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 5.2, 0.0], [-1.0, 0.0, 0.0, 0.0]]))


def test_clipped_policy_loss_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    mask = _mask([5, 2, 4], 5)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.4  # many ratios outside [0.8, 1.2]
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    got = clipped_policy_loss(new, old, adv, mask, clip_ratio=0.2)
    terms = []
    for b in range(3):
        for j in range(int(mask[b].sum())):
            ratio = math.exp(float(new[b, j] - old[b, j]))
            a = float(adv[b, j])
            terms.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    n_clipped = sum(abs(math.exp(float(new[b, j] - old[b, j])) - 1) > 0.2 for b in range(3) for j in range(int(mask[b].sum())))
    assert 0 < n_clipped < len(terms)  # the data exercises both branches


def test_clipped_ratio_stops_the_gradient_only_beyond_the_clip():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    clipped_policy_loss(new, old, adv, torch.ones(1, 4, dtype=torch.bool), 0.2).backward()
    # A>0 and ratio above 1+eps: clipped, no gradient; A<0 and ratio above: still pushed down;
    # A<0 and ratio below 1-eps: clipped; inside the range: -A * ratio / n.
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 1.5 / 4, 0.0, -1.1 / 4]]))


def test_ratio_one_gradient_is_the_advantage_weighted_logprob_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    mask = _mask([5, 3, 1], 5)
    adv = torch.randn(3, 5, generator=g)
    logp = token_logprobs(logits, ids)
    clipped_policy_loss(logp, logp.detach(), adv, mask, 0.2).backward()
    got = logits.grad.clone()
    logits.grad = None
    (-masked_mean(adv * token_logprobs(logits, ids), mask)).backward()
    torch.testing.assert_close(got, logits.grad)
    # token_logprobs is the log-softmax of the taken token.
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1))


def test_value_loss_plain_and_clipped():
    v = torch.tensor([[1.0, 3.0, 0.0], [2.0, 9.0, 9.0]])
    old = torch.tensor([[0.0, 2.5, 0.0], [2.0, 0.0, 0.0]])
    g = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = _mask([2, 1], 3)
    assert value_loss(v, g, mask).item() == pytest.approx((1 + 9 + 4) / 3)
    # Clip 0.2 around old: 0.2 -> (0.2-2)^2 = 3.24 > 1; 2.7 -> 7.29 < 9; 2.0 -> 4 = 4.
    assert value_loss(v, g, mask, old, 0.2).item() == pytest.approx((3.24 + 9 + 4) / 3)


def test_whiten_uses_valid_entries_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = _mask([2, 1], 3)
    w = whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(w[mask], (valid - 2.0) / valid.std(unbiased=False))
    assert w[~mask].abs().max() == 0


# ---------------------------------------------------------------- the module
def _module(**kw):
    defaults = dict(beta_kl=0.1, gamma=0.9, lam=0.8, policy_lr=3e-3, critic_lr=3e-3)
    defaults.update(kw)
    return PPOModule(policy=tiny_llama(VOCAB, seed=0), **defaults)


def _randomise_value_head(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.critic.value_head.weight.copy_(torch.randn(module.critic.value_head.weight.shape, generator=g))
        module.critic.value_head.bias.fill_(0.3)


def _trainer(tmp_path, max_steps, **kw):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, **kw)


def _loader(batch, length):
    return DataLoader([batch] * length, batch_size=None, shuffle=False)


def test_critic_values_and_bootstrap_ignore_left_padding():
    module = _module()
    assert isinstance(module.critic, TokenValueCritic)
    assert module.critic.backbone is not module.policy.base_model
    batch = random_transition_batch(VOCAB, seed=4)
    assert module.action_outputs(module.critic, batch).abs().max() == 0  # zero head: V starts at 0
    _randomise_value_head(module)
    values = module.action_outputs(module.critic, batch)
    assert values.shape == batch.action_ids.shape and values.dtype == torch.float32
    boot = module.bootstrap_values(batch.prompt_ids, batch.prompt_mask)
    for b in range(len(batch)):
        p = batch.prompt_ids[b][batch.prompt_mask[b]][None]
        hidden = module.critic.backbone(input_ids=p).last_hidden_state[0, -1]
        assert boot[b].item() == pytest.approx(module.critic.value_head(hidden).item(), abs=1e-5)


@pytest.mark.parametrize("token_discount", ["none", "gamma"])
def test_compute_losses_match_an_independent_computation(token_discount):
    module = _module(token_discount=token_discount)
    _randomise_value_head(module)
    batch = random_transition_batch(VOCAB, seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logp = module.action_logprobs(batch)
        # A policy that moved since sampling: some ratios clipped, and a nonzero KL penalty.
        batch.old_logprobs = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * batch.action_mask
        out = module.compute_losses(batch)
        logits = module.action_outputs(module.policy, batch)
        ref = torch.log_softmax(module.action_outputs(module.reference, batch), -1)
        ref_lp = ref.gather(-1, batch.action_ids[..., None]).squeeze(-1)
        values = module.action_outputs(module.critic, batch)
    mask = batch.action_mask
    rewards = -0.1 * (batch.old_logprobs - ref_lp) * mask
    for b in range(len(batch)):
        rewards[b, int(mask[b].sum()) - 1] += batch.rewards[b]
    adv = _brute_gae(values, rewards, mask, batch.dones, batch.next_values, 0.9, 0.8, token_discount).float()
    n = mask.sum()
    assert out["advantage"].item() == pytest.approx((adv * mask).sum().item() / n.item(), rel=1e-5)
    assert out["value_loss"].item() == pytest.approx((((adv * mask) ** 2).sum() / n).item(), rel=1e-5)
    wa = (adv[mask] - adv[mask].mean()) / adv[mask].std(unbiased=False)
    ratio = (torch.log_softmax(logits, -1).gather(-1, batch.action_ids[..., None]).squeeze(-1) - batch.old_logprobs).exp()[mask]
    want = torch.maximum(-wa * ratio, -wa * ratio.clamp(0.8, 1.2)).mean()
    # The mean of +-whitened terms nearly cancels: compare absolutely, at float32 precision.
    assert out["policy_loss"].item() == pytest.approx(want.item(), abs=1e-6)
    assert abs(want.item()) > 1e-3
    assert out["clip_fraction"].item() == pytest.approx(((ratio - 1).abs() > 0.2).float().mean().item())
    assert 0 < out["clip_fraction"].item() < 1
    assert out["approx_kl"].item() == pytest.approx((ratio - 1 - ratio.log()).mean().item(), rel=1e-5)
    # The policy is still the reference: zero up to float rounding, as the two forwards (with
    # and without autograd) may take different kernels; -1.7e-9 on an AVX2 CPU.
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_without_old_logprobs_the_step_is_a_plain_policy_gradient():
    module = _module(normalize_advantages=False)
    _randomise_value_head(module)
    batch = random_transition_batch(VOCAB, seed=6)
    assert batch.old_logprobs is None
    out = module.compute_losses(batch)
    assert out["clip_fraction"].item() == 0.0 and out["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)
    # ratio 1: the loss is -mean(A); with pi_old = pi = rho the KL penalty vanishes.
    assert out["policy_loss"].item() == pytest.approx(-out["advantage"].item(), rel=1e-6)


def test_fit_on_a_fixed_batch(tmp_path):
    module = _module()
    batch = random_transition_batch(VOCAB, seed=7)
    batch.old_logprobs = logp_start = module.action_logprobs(batch)
    with torch.no_grad():
        first = module.compute_losses(batch)
    # First-step advantages, by hand: V = 0 and pi_old = rho, so r_j is the env reward at
    # the last token and A_j = lam^(n-1-j) (r + gamma (1-d) V(s')) ... whitened.
    mask = batch.action_mask
    adv0, _ = gae(torch.zeros(mask.shape), token_rewards(logp_start, logp_start, batch.rewards, mask, 0.1),
                  mask, batch.dones, batch.next_values, 0.9, 0.8)
    adv0 = whiten(adv0, mask)
    ref_before = [p.detach().clone() for p in module.reference.parameters()]
    policy_before = [p.detach().clone() for p in module.policy.parameters()]
    early = {}

    class AfterThreeSteps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            if batch_idx == 2:
                early["logp"] = pl_module.action_logprobs(b)

    trainer = _trainer(tmp_path, max_steps=12, callbacks=[AfterThreeSteps()])
    trainer.fit(module, _loader(batch, 100))
    assert trainer.global_step == 24  # max_steps counts batches, Lightning both optimizer steps
    with torch.no_grad():
        last = module.compute_losses(batch)
    assert last["value_loss"] < 0.3 * first["value_loss"]
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(policy_before, module.policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ref_before, module.reference.parameters()))
    assert not module.reference.training

    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    keys = ["policy_loss", "value_loss", "kl", "entropy", "clip_fraction", "approx_kl", "advantage", "value", "returns"]
    for key in keys:
        col = logged[f"train/{key}"].dropna()
        assert len(col) == 12 and torch.isfinite(torch.tensor(col.values)).all(), key
    row0 = {k: logged[f"train/{k}"].dropna().iloc[0] for k in keys}
    # Step 1: pi = pi_old = rho, zero value head.
    assert row0["kl"] == 0.0 and row0["value"] == 0.0 and row0["clip_fraction"] == 0.0
    assert row0["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert row0["value_loss"] == pytest.approx(first["value_loss"].item(), rel=1e-5)
    assert row0["policy_loss"] == pytest.approx(first["policy_loss"].item(), abs=1e-6)
    # Reusing the batch moves pi away from pi_old and rho: the monitors see it.
    tail = {k: logged[f"train/{k}"].dropna().iloc[-1] for k in keys}
    assert tail["kl"] > 0 and tail["approx_kl"] > 0 and tail["clip_fraction"] > 0
    # The first steps moved the policy towards the tokens with positive advantage (later the
    # critic has fitted the returns of this one batch and the advantages are residuals).
    assert masked_mean(adv0 * (early["logp"] - logp_start), mask) > 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta_kl=-0.1), "beta_kl must be >= 0"),
        (dict(gamma=1.5), "gamma must be in"),
        (dict(lam=-0.1), "lam must be in"),
        (dict(clip_ratio=0.0), "clip_ratio must be > 0"),
        (dict(token_discount="token"), "token_discount must be"),
    ],
)
def test_bad_hyperparameters_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOModule(policy=tiny_llama(VOCAB), **kwargs)


def test_value_clip_is_gone_rather_than_silently_dead():
    """Batches carry no rollout-time values, so value clipping had no centre and the argument
    did nothing: it was removed, and passing it is an error, not a silent no-op."""
    import inspect

    assert "value_clip" not in inspect.signature(PPOModule).parameters
    with pytest.raises(TypeError, match="value_clip"):
        PPOModule(policy=tiny_llama(VOCAB), value_clip=0.2)
