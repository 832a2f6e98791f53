"""ETPOModule with a real tiny LlamaForCausalLM and real Lightning Trainer runs."""

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from etpo_lightning import ETPOModule, TokenQCritic, TransitionBatch
from etpo_lightning.core.batch import Transition
from etpo_lightning.losses import policy_loss, soft_values
from helpers import random_transition_batch, reference_etpo_losses, tiny_llama

VOCAB = 64


class FixedBatches(Dataset):
    """The same transition batch again and again: a fixed regression problem for the losses."""

    def __init__(self, batch: TransitionBatch, length: int):
        self.batch, self.length = batch, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.batch


def _loader(batch, length):
    return DataLoader(FixedBatches(batch, length), batch_size=None, shuffle=False)


def _trainer(tmp_path, max_steps, **kw):
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def _module(**kw):
    defaults = dict(beta=0.1, gamma=0.9, policy_lr=3e-3, critic_lr=3e-3, tau=0.05)
    defaults.update(kw)
    return ETPOModule(policy=tiny_llama(VOCAB, seed=0), **defaults)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_critic_is_a_copy_of_the_policy_and_targets_match_the_spec():
    module = _module()
    batch = random_transition_batch(VOCAB)
    assert isinstance(module.critic, TokenQCritic)
    # By default Q starts as the policy's logits (the paper's initialisation).
    torch.testing.assert_close(module.action_outputs(module.critic, batch), module.action_outputs(module.policy, batch))
    # Independent computation of V at action positions and of the targets, row by row.
    with torch.no_grad():
        out = module.compute_losses(batch)
        pi = module.action_outputs(module.policy, batch)
        rho = module.action_outputs(module.reference, batch)
        qt = module.action_outputs(module.target_critic, batch)
        values = soft_values(qt, pi, rho, 0.1)
    expected = []
    for b in range(len(batch)):
        n = int(batch.action_mask[b].sum())
        for j in range(n):
            last = batch.rewards[b] + 0.9 * (1 - batch.dones[b]) * batch.next_values[b]
            expected.append(values[b, j + 1] if j + 1 < n else last)
    assert out["target"].item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_action_outputs_ignore_left_padding():
    """Left-padded prompts with position ids from the mask give the unpadded logits."""
    module = _module()
    batch = random_transition_batch(VOCAB, batch=4, seed=3)
    full = module.action_outputs(module.policy, batch)
    for b in range(len(batch)):
        p = batch.prompt_ids[b][batch.prompt_mask[b]][None]
        a = batch.action_ids[b][batch.action_mask[b]][None]
        single = TransitionBatch(
            p, torch.ones_like(p, dtype=torch.bool), a, torch.ones_like(a, dtype=torch.bool),
            batch.rewards[b : b + 1], batch.dones[b : b + 1], batch.next_values[b : b + 1],
        )
        n = a.shape[1]
        torch.testing.assert_close(module.action_outputs(module.policy, single)[0], full[b, :n], atol=1e-5, rtol=1e-4)


def test_one_step_polyak_reference_and_policy(tmp_path):
    module = _module()
    batch = random_transition_batch(VOCAB)
    target_before, critic_before = _params(module.target_critic), _params(module.critic)
    ref_before, policy_before = _params(module.reference), _params(module.policy)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, _loader(batch, 10))
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 1  # max_steps counts batches
    assert trainer.global_step == 2  # ... and Lightning counts both optimizer steps
    critic_after = _params(module.critic)
    assert any((a - b).abs().max() > 0 for a, b in zip(critic_after, critic_before))
    for t_before, t_after, c_after in zip(target_before, module.target_critic.parameters(), critic_after):
        torch.testing.assert_close(t_after.detach(), t_before + 0.05 * (c_after - t_before), atol=1e-7, rtol=0)
    for before, after in zip(ref_before, module.reference.parameters()):
        assert torch.equal(before, after)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(policy_before, module.policy.parameters()))
    assert not module.reference.training and not module.target_critic.training
    assert all(not p.requires_grad for p in module.reference.parameters())


def _spec_losses(module, batch):
    """The spec's losses with the module's current networks, computed independently (helpers)."""
    return reference_etpo_losses(module.policy, module.critic, module.target_critic, module.reference, batch,
                                 beta=0.1, gamma=0.9)


def test_losses_fall_on_a_fixed_batch_and_metrics_are_logged(tmp_path):
    """The losses are the spec's (values checked against an independent float64 computation at
    the first and the last step), and minimising them on a fixed batch makes them fall."""
    module = _module()
    batch = random_transition_batch(VOCAB)
    with torch.no_grad():
        first = module.compute_losses(batch)
    want_first = _spec_losses(module, batch)
    assert first["q_loss"].item() == pytest.approx(want_first["q_loss"], rel=1e-5)
    assert first["policy_loss"].item() == pytest.approx(want_first["policy_loss"], rel=1e-5)
    trainer = _trainer(tmp_path, max_steps=30)
    trainer.fit(module, _loader(batch, 100))
    with torch.no_grad():
        last = module.compute_losses(batch)
    want_last = _spec_losses(module, batch)
    assert last["q_loss"].item() == pytest.approx(want_last["q_loss"], rel=1e-5)
    assert last["policy_loss"].item() == pytest.approx(want_last["policy_loss"], rel=1e-5, abs=1e-6)
    assert last["q_loss"] < 0.5 * first["q_loss"]
    assert last["policy_loss"] < first["policy_loss"]
    import pandas as pd

    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    for key in ["train/q_loss", "train/policy_loss", "train/kl", "train/entropy", "train/q_taken", "train/target"]:
        col = logged[key].dropna()
        assert len(col) == 30, key
        assert col.notna().all()
    # The policy moved away from rho, and the logged KL says so.
    assert logged["train/kl"].dropna().iloc[-1] > logged["train/kl"].dropna().iloc[0] >= 0
    assert logged["train/q_loss"].dropna().iloc[0] == pytest.approx(want_first["q_loss"], rel=1e-5)
    assert logged["train/policy_loss"].dropna().iloc[0] == pytest.approx(want_first["policy_loss"], rel=1e-5)


def test_subclass_policy_loss_is_used(tmp_path):
    class FrozenPolicyETPO(ETPOModule):
        calls = 0

        def compute_policy_loss(self, policy_logits, ref_logits, q, batch):
            type(self).calls += 1
            return 0.0 * policy_logits.sum()  # no gradient signal: the policy must not move

    module = FrozenPolicyETPO(policy=tiny_llama(VOCAB), beta=0.1, policy_lr=1e-2, critic_lr=1e-2, weight_decay=0.0)
    before = _params(module.policy)
    _trainer(tmp_path, max_steps=3).fit(module, _loader(random_transition_batch(VOCAB), 10))
    assert FrozenPolicyETPO.calls == 3
    for a, b in zip(before, module.policy.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_loss_skips_the_step(tmp_path):
    module = _module()
    batch = random_transition_batch(VOCAB)
    batch.rewards[0] = float("nan")
    before = _params(module.policy) + _params(module.critic)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        _trainer(tmp_path, max_steps=1, max_epochs=1).fit(module, _loader(batch, 3))
    assert module.nonfinite_steps == 3
    for a, b in zip(before, list(module.policy.parameters()) + list(module.critic.parameters())):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(beta=0.0), "beta must be > 0"), (dict(tau=0.0), "tau"), (dict(gamma=1.5), "gamma"),
     (dict(critic_head_init="zeros"), "critic_head_init"), (dict(critic_advantage_scale=0.0), "critic_advantage_scale")],
)
def test_bad_hyperparameters_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ETPOModule(policy=tiny_llama(VOCAB), **kwargs)


def test_zero_head_critic_starts_at_zero():
    module = _module(critic_head_init="zero")
    q = module.action_outputs(module.critic, random_transition_batch(VOCAB))
    assert torch.count_nonzero(q) == 0
    # The policy's own head is untouched.
    assert module.policy.get_output_embeddings().weight.abs().sum() > 0


def test_policy_loss_gradient_matches_functional_core():
    module = _module()
    batch = random_transition_batch(VOCAB)
    out = module.compute_losses(batch)
    logits = module.action_outputs(module.policy, batch)
    ref = module.action_outputs(module.reference, batch)
    q = module.action_outputs(module.critic, batch)
    want = policy_loss(logits, ref, q, batch.action_mask, 0.1)
    assert out["policy_loss"].item() == pytest.approx(want.item(), rel=1e-6)
    copy.deepcopy(module)  # modules must stay deep-copyable (checkpoint callbacks, EMA tools)


def test_dueling_head_is_value_plus_rho_centred_advantage():
    """Q = v + s * (A - E_rho[A]), checked against the backbone's hidden states and both heads."""
    policy = tiny_llama(VOCAB, seed=0)
    critic = TokenQCritic.from_policy(policy, head_init="dueling", advantage_scale=0.5)
    batch = random_transition_batch(VOCAB, seed=5)
    inputs = ETPOModule.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    rho = policy(**inputs).logits.detach()
    # Q starts at 0 for every token: the Boltzmann target is rho itself.
    assert torch.equal(critic(**inputs, ref_logits=rho), torch.zeros_like(rho))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (critic.backbone.get_output_embeddings().weight, critic.value_head.weight, critic.value_head.bias):
            p.normal_()
        q = critic(**inputs, ref_logits=rho)
        hidden = critic.backbone(**inputs, output_hidden_states=True).hidden_states[-1]
    a = hidden @ critic.backbone.get_output_embeddings().weight.T
    v = hidden @ critic.value_head.weight.T + critic.value_head.bias
    expected = v + 0.5 * (a - (torch.softmax(rho, -1) * a).sum(-1, keepdim=True))
    torch.testing.assert_close(q, expected, atol=1e-4, rtol=1e-4)
    # E_rho[Q] is the value head's output.
    torch.testing.assert_close((torch.softmax(rho, -1) * q).sum(-1), v.squeeze(-1), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="ref_logits"):
        critic(**inputs)


@pytest.mark.parametrize("head_init", ["zero", "dueling"])
def test_failed_episodes_do_not_push_the_target_off_what_rho_writes(tmp_path, head_init):
    """A confident rho writes its greedy programs and every one fails (reward -1). A zeroed head
    lowers only the sampled tokens' rows while every other token keeps Q = 0, so the Boltzmann
    target rho*exp(Q/beta)/Z moves its mass off the tokens rho writes, onto tokens it hardly
    ever writes; the dueling head lowers the history's value instead and the target stays near rho."""
    policy = tiny_llama(VOCAB, seed=0)
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(100.0)  # a confident LM, like a pretrained one
    g = torch.Generator().manual_seed(0)
    transitions = []
    for i in range(8):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g)
        with torch.no_grad():
            out = policy.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        transitions.append(Transition(prompt, out[0, len(prompt):], reward=-1.0, terminated=True, next_value=0.0))
    batch = TransitionBatch.collate(transitions, pad_token_id=0)
    module = ETPOModule(policy=policy, beta=0.1, gamma=0.9, policy_lr=1e-9, critic_lr=3e-3, tau=0.05,
                        critic_head_init=head_init)
    _trainer(tmp_path, max_steps=30).fit(module, _loader(batch, 30))
    with torch.no_grad():
        inputs = module.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
        start = batch.prompt_ids.shape[1] - 1
        rho_all = module.outputs(module.reference, inputs)
        q = module.outputs(module.critic, inputs, ref_logits=rho_all)[:, start:]
        log_rho = torch.log_softmax(rho_all[:, start:].float(), -1)
        log_target = torch.log_softmax(log_rho + q / 0.1, -1)
    taken = batch.action_ids.unsqueeze(-1)
    mask = batch.action_mask
    rho_taken = log_rho.gather(-1, taken).squeeze(-1).exp()[mask]
    target_taken = log_target.gather(-1, taken).squeeze(-1).exp()[mask]
    assert rho_taken.mean() > 0.8  # rho does write these tokens
    # Measured: zero 0.90 -> 0.52, dueling 0.90 -> 0.70 (the gap A_t still takes part of the blame).
    if head_init == "zero":
        assert target_taken.mean() < 0.65 * rho_taken.mean()
    else:
        assert target_taken.mean() > 0.72 * rho_taken.mean()


def test_policy_loss_gets_a_detached_q_so_the_critic_learns_only_from_its_own_loss():
    """A subclass whose policy loss uses Q non-trivially (Q squared, Q weighting log pi) must
    not train the critic through it: with the critic loss switched off, the critic gets no
    gradient at all, while the policy does."""
    seen = {}

    class QHungryETPO(ETPOModule):
        def compute_policy_loss(self, policy_logits, ref_logits, q, batch):
            seen["requires_grad"] = q.requires_grad
            mask = batch.action_mask.float()
            per_token = (q.softmax(-1) * policy_logits.log_softmax(-1)).sum(-1) + q.pow(2).mean(-1)
            return (per_token * mask).sum() / mask.sum()

        def compute_q_loss(self, q_taken, targets, batch):
            return 0.0 * q_taken.sum()

    module = QHungryETPO(policy=tiny_llama(VOCAB), beta=0.1)
    out = module.compute_losses(random_transition_batch(VOCAB))
    (out["policy_loss"] + out["q_loss"]).backward()
    assert seen["requires_grad"] is False
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in module.critic.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in module.policy.parameters())


def test_max_steps_counts_batches_whatever_the_number_of_optimizers(tmp_path):
    """``optimizer_steps_per_batch`` follows the optimizers the module configures: a subclass
    with ONE optimizer over policy and critic steps once per batch, so max_steps=3 is 3 batches."""

    class OneOptimizerETPO(ETPOModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(list(self.policy.parameters()) + list(self.critic.parameters()), lr=1e-3)

    module = OneOptimizerETPO(policy=tiny_llama(VOCAB), beta=0.1)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, _loader(random_transition_batch(VOCAB), 10))
    assert module.optimizer_steps_per_batch == 1
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 3 and trainer.global_step == 3

    class TwiceETPO(ETPOModule):  # a subclass may still say it itself
        optimizer_steps_per_batch = 2

    assert TwiceETPO(policy=tiny_llama(VOCAB), beta=0.1).optimizer_steps_per_batch == 2
    assert _module().optimizer_steps_per_batch == 2  # default: one step per optimizer (policy, critic)
