"""Bringing your own networks: injected critics of any kind, subclasses that shape the critic,
and checkpoints of modules whose networks were injected."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from etpo_lightning import ETPOModule, TokenQCritic
from helpers import random_transition_batch, reference_etpo_losses, tiny_llama

VOCAB = 64
HP = dict(beta=0.1, gamma=0.9, policy_lr=3e-3, critic_lr=3e-3, tau=0.05)


class PlainQCritic(nn.Module):
    """A critic that is no TokenQCritic and no Hugging Face model: Q ``[B, T, V]`` from a causal
    running mean of token embeddings. Its forward takes only ids and masks (no ``use_cache``)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.embed(input_ids) * mask[..., None]
        mean = x.cumsum(1) / mask.cumsum(1).clamp_min(1)[..., None]
        return self.head(torch.tanh(mean))


def _fit(module: pl.LightningModule, batch, steps: int, tmp_path) -> pd.DataFrame:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"),
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader([batch] * (steps + 1), batch_size=None))
    return pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ defect 1
def test_a_plain_module_critic_trains_and_its_losses_are_the_spec(tmp_path):
    """A critic without ``use_cache`` in its forward trains in a real fit; the logged losses of
    the first step equal the spec's losses computed independently from the initial networks."""
    policy, critic = tiny_llama(VOCAB, seed=0), PlainQCritic(seed=1)
    initial = {name: copy.deepcopy(net) for name, net in (("policy", policy), ("critic", critic))}
    module = ETPOModule(policy=policy, critic=critic, **HP)
    assert module.critic is critic
    batch = random_transition_batch(VOCAB, seed=2)
    before = _state(module.critic)
    logged = _fit(module, batch, 2, tmp_path)
    after = _state(module.critic)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # At step 1 the target critic is the initial critic and the reference the initial policy.
    want = reference_etpo_losses(initial["policy"], initial["critic"], initial["critic"], initial["policy"],
                                 batch, beta=0.1, gamma=0.9)
    assert logged["train/q_loss"].dropna().iloc[0] == pytest.approx(want["q_loss"], rel=1e-5)
    assert logged["train/policy_loss"].dropna().iloc[0] == pytest.approx(want["policy_loss"], rel=1e-5, abs=1e-6)
    # Polyak moved the target critic towards the trained critic.
    for name, p in module.target_critic.named_parameters():
        assert not torch.equal(p, before[name])


def test_a_compiled_token_critic_trains_like_the_uncompiled_one(tmp_path):
    """``torch.compile`` wraps the critic in an OptimizedModule; it must still be recognised as a
    TokenQCritic (the dueling head gets rho's logits) and give the uncompiled critic's losses.

    The smallest Llama (hidden 8, one layer) and ``backend="aot_eager"`` (no C++ code
    generation) keep compilation to seconds on a busy 2-core CPU; the wrapper the module sees
    is the same OptimizedModule as with the default inductor backend."""
    batch = random_transition_batch(VOCAB, seed=4)

    def build(compiled: bool) -> ETPOModule:
        policy = tiny_llama(VOCAB, seed=0, hidden=8, layers=1)
        critic = TokenQCritic.from_policy(policy, head_init="dueling")
        with torch.no_grad():  # a dueling head that does not start at Q = 0
            critic.value_head.bias.fill_(0.3)
            critic.backbone.get_output_embeddings().weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        if compiled:
            critic = torch.compile(critic, backend="aot_eager", dynamic=False)
        return ETPOModule(policy=policy, critic=critic, **HP)

    compiled = build(True)
    assert type(compiled.critic).__name__ == "OptimizedModule"
    plain_logs = _fit(build(False), batch, 2, tmp_path / "plain")
    compiled_logs = _fit(compiled, batch, 2, tmp_path / "compiled")
    for key in ("train/q_loss", "train/policy_loss", "train/q_taken", "train/target"):
        a, b = plain_logs[key].dropna().to_numpy(), compiled_logs[key].dropna().to_numpy()
        assert len(a) == len(b) == 2, key
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    assert compiled_logs["train/q_taken"].dropna().iloc[0] != pytest.approx(0.0, abs=1e-3)  # a real Q


class CentredPlainCritic(PlainQCritic):
    """A custom critic that needs rho (``needs_reference``) and takes only ``ref_logits``:
    Q = A - E_rho[A], centred under rho like the dueling head."""

    needs_reference = True

    def forward(self, input_ids, attention_mask=None, position_ids=None, ref_logits=None):
        a = super().forward(input_ids, attention_mask, position_ids)
        a = a[:, -ref_logits.shape[1]:]  # the positions rho is given at
        return a - (torch.softmax(ref_logits.double(), -1) * a).sum(-1, keepdim=True).float()


def test_a_custom_critic_that_needs_rho_gets_it_as_logits(tmp_path):
    """The module shares rho's probabilities between critics; a custom critic whose forward
    takes only ``ref_logits`` still gets rho, and its Q is the one computed by hand."""
    policy = tiny_llama(VOCAB, seed=0)
    module = ETPOModule(policy=policy, critic=CentredPlainCritic(seed=2), **HP)
    batch = random_transition_batch(VOCAB, seed=6)
    with torch.no_grad():
        got = module.compute_losses(batch)["q_taken"].item()
        taken = []
        for b in range(len(batch)):
            prompt = batch.prompt_ids[b][batch.prompt_mask[b]]
            action = batch.action_ids[b][batch.action_mask[b]]
            ids = torch.cat([prompt, action[:-1]])[None]
            rows = slice(prompt.numel() - 1, None)
            rho = module.reference(input_ids=ids).logits[:, rows]
            q = module.critic(ids, ref_logits=rho)[0]
            taken += [float(q[j, action[j]]) for j in range(action.numel())]
    assert got == pytest.approx(sum(taken) / len(taken), rel=1e-4, abs=1e-6)
    assert abs(got) > 1e-4  # a Q that is not trivially 0
    before = _state(module.critic)
    _fit(module, batch, 1, tmp_path)
    assert not torch.equal(before["head.weight"], module.critic.head.weight)


# ------------------------------------------------------------------ defect 2
class SizedCriticETPO(ETPOModule):
    """A subclass whose critic depends on an attribute set AFTER ``super().__init__``."""

    def __init__(self, critic_hidden: int = 24, **kwargs) -> None:
        super().__init__(**kwargs)
        self.critic_hidden = critic_hidden

    def build_critic(self, policy: nn.Module) -> nn.Module:
        return PlainQCritic(hidden=self.critic_hidden, seed=3)


def test_a_subclass_attribute_set_after_super_init_shapes_the_critic(tmp_path):
    module = SizedCriticETPO(critic_hidden=24, policy=tiny_llama(VOCAB), **HP)
    assert module.hparams.critic_hidden == 24  # save_hyperparameters saw the subclass's argument
    assert isinstance(module.critic, PlainQCritic) and module.critic.embed.embedding_dim == 24
    assert module.target_critic.embed.embedding_dim == 24
    # The built networks are registered: their weights are in the state dict and train.
    assert "critic.embed.weight" in module.state_dict() and "target_critic.head.bias" in module.state_dict()
    before = _state(module.critic)
    _fit(module, random_transition_batch(VOCAB), 1, tmp_path)
    assert not torch.equal(before["head.weight"], module.critic.head.weight)


def test_networks_are_built_on_first_use_of_parameters_and_state_dict():
    """Nothing reads an empty module: parameters(), state_dict() and load_state_dict() see
    the built networks even when no attribute was touched first."""
    a = SizedCriticETPO(critic_hidden=12, policy=tiny_llama(VOCAB, seed=0), **HP)
    n = sum(p.numel() for p in a.parameters())
    want = 2 * sum(p.numel() for p in tiny_llama(VOCAB).parameters())  # policy + reference
    want += 2 * sum(p.numel() for p in PlainQCritic(hidden=12).parameters())  # critic + target
    assert n == want
    b = SizedCriticETPO(critic_hidden=12, policy=tiny_llama(VOCAB, seed=7), **HP)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------ defect 3
@pytest.fixture(scope="module")
def injected_checkpoint(tmp_path_factory):
    """A checkpoint of one training batch of a module with an injected policy and critic."""
    root = tmp_path_factory.mktemp("injected")
    module = ETPOModule(policy=tiny_llama(VOCAB, seed=0), critic=PlainQCritic(seed=1), **HP)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, DataLoader([random_transition_batch(VOCAB)] * 2, batch_size=None))
    path = root / "injected.ckpt"
    trainer.save_checkpoint(path)
    return path, _state(module)


def test_loading_an_injected_checkpoint_without_the_networks_fails_clearly(injected_checkpoint, monkeypatch):
    path, _ = injected_checkpoint
    import etpo_lightning.core.base_module as base_module

    def no_default_model(*args, **kwargs):
        raise AssertionError("the default model_name_or_path must not be loaded for an injected checkpoint")

    monkeypatch.setattr(base_module, "load_causal_lm", no_default_model)
    with pytest.raises(ValueError, match=r"injected.*policy=.*critic=") as err:
        ETPOModule.load_from_checkpoint(path)
    assert "LlamaForCausalLM" in str(err.value) and "PlainQCritic" in str(err.value)
    # Passing only the policy is not enough: the critic was injected too.
    with pytest.raises(ValueError, match=r"critic="):
        ETPOModule.load_from_checkpoint(path, policy=tiny_llama(VOCAB, seed=5))
    # Resuming into a module that would build its own networks is refused as well.
    checkpoint = torch.load(path, weights_only=False)
    with pytest.raises(ValueError, match="injected"):
        ETPOModule(model_name_or_path="tiny-sklearn-coder").on_load_checkpoint(checkpoint)


def test_loading_an_injected_checkpoint_with_the_networks_restores_the_weights(injected_checkpoint):
    path, trained = injected_checkpoint
    # Fresh networks of the same architecture, different weights.
    loaded = ETPOModule.load_from_checkpoint(path, policy=tiny_llama(VOCAB, seed=5), critic=PlainQCritic(seed=6))
    state = loaded.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert loaded.hparams.beta == HP["beta"] and loaded.hparams.tau == HP["tau"]
    # A different architecture is refused by the strict state-dict load.
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        ETPOModule.load_from_checkpoint(path, policy=tiny_llama(VOCAB, seed=5, hidden=16), critic=PlainQCritic())
