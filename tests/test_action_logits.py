"""Logits only where actions are scored (issue 14, defect 5).

A training step scores the action tokens: it needs the networks' outputs at the history
before each action token (the last prompt position and the action positions but the last),
and a bootstrap needs them at the last position of the next observation only. The output
heads (LM heads, Q-heads, value heads) must see exactly those positions, never the prompt's;
and the losses, targets, statistics and gradients must be those of the former computation
(full-sequence outputs, sliced afterwards), which ``reference_etpo_losses`` below redoes
from the networks themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from etpo_lightning import ETPOModule, TokenQCritic, TransitionBatch
from etpo_lightning.core.batch import Transition
from etpo_lightning.grpo import GRPOModule
from etpo_lightning.losses import kl_and_entropy, policy_loss, q_loss, soft_lambda_targets, soft_values
from etpo_lightning.ppo import PPOModule
from helpers import tiny_llama

VOCAB = 64
HEADS = ("lm_head", "value_head")


def _batch(seed: int = 0, groups: bool = False) -> TransitionBatch:
    """Prompts of 3-9 tokens (left padding), actions of 1-6 tokens, behaviour log-probs; even rows
    truncated with a next observation of 2-7 tokens, odd rows terminated; groups of two."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(6):
        a = int(torch.randint(1, 7, (1,), generator=g))
        nxt = (torch.empty(0, dtype=torch.long) if i % 2 else
               torch.randint(3, VOCAB, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g))
        rows.append(Transition(
            torch.randint(3, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g),
            torch.randint(3, VOCAB, (a,), generator=g), reward=float(torch.rand(1, generator=g)) * 2 - 1,
            terminated=bool(i % 2), truncated=not i % 2, logprobs=-2 * torch.rand(a, generator=g), next_prompt_ids=nxt,
            group_id=i // 2 if groups else -1, group_member=i % 2 if groups else -1,
            group_returns=torch.rand(2, generator=g) if groups else None))
    return TransitionBatch.collate(rows, pad_token_id=0)


@torch.no_grad()
def _perturb(modules: list[nn.Module], seed: int, scale: float = 0.05) -> None:
    """Move every parameter a little (zero heads and LoRA's zero B included), so that pi, rho,
    Q and Q_target all differ and no gradient vanishes."""
    torch.manual_seed(seed)
    for m in modules:
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))


def _etpo(head_init: str = "copy", **kw) -> ETPOModule:
    m = ETPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1, gamma=0.9, lam=0.9, traces=True,
                   critic_head_init=head_init, critic_advantage_scale=0.5, **kw)
    _perturb([m.policy], 1)
    _perturb([m.critic], 2)
    _perturb([m.target_critic], 3)
    return m


def _lora() -> ETPOModule:
    pytest.importorskip("peft")
    from etpo_lightning.core.lora import LoRAConfig

    m = ETPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1, gamma=0.9, tau=0.05, lam=0.9, traces=True,
                   lora=LoRAConfig(r=4))
    for seed, view in enumerate((m.policy, m.critic, m.target_critic), start=1):
        _perturb([view.adapter_params], seed, scale=0.2)
    return m


MODULES = {
    "etpo-copy": lambda: _etpo("copy"),
    "etpo-zero": lambda: _etpo("zero"),
    "etpo-dueling": lambda: _etpo("dueling"),
    "etpo-lora": _lora,
    "ppo": lambda: _perturbed(PPOModule(policy=tiny_llama(VOCAB, seed=0), beta_kl=0.1)),
    "grpo": lambda: _perturbed(GRPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1)),
}


def _perturbed(m):
    _perturb([m.policy], 1)
    if m.critic is not None:
        _perturb([m.critic], 2)
    return m


# ------------------------------------------------------------------- the spy
class HeadSpy:
    """Records the number of positions every output head of a module is applied to."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: list[tuple[str, int]] = []
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in module.named_modules()
                        if name.rsplit(".", 1)[-1] in HEADS]
        assert self.handles, "no output head found: the spy would see nothing"

    def _hook(self, name):
        def hook(_mod, args):
            x = args[0]
            self.seen.append((name, x.shape[1] if x.dim() == 3 else 1))
        return hook

    def positions(self) -> set[int]:
        out = {n for _, n in self.seen}
        self.seen.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("kind", list(MODULES))
def test_output_heads_see_only_the_scored_positions(kind):
    """Every output head runs on the L positions that score the action (the last prompt
    position and the action's), never on the prompt; bootstraps on one position."""
    module = MODULES[kind]()
    batch = _batch(groups=kind == "grpo")
    scored = batch.action_ids.shape[1]
    assert batch.prompt_ids.shape[1] > 2 and scored > 1  # prompt positions exist to be wrongly computed
    spy = HeadSpy(module)
    try:
        with torch.no_grad():
            module.compute_losses(batch)
        seen = spy.positions()
        if kind.startswith("etpo"):  # fresh bootstraps run in the step: one position each
            assert seen == {scored, 1}, seen
        else:
            assert seen == {scored}, seen
        if kind != "grpo":
            module.bootstrap_values(batch.prompt_ids, batch.prompt_mask)
            assert spy.positions() == {1}
        module.action_logprobs(batch)
        assert spy.positions() == {scored}
    finally:
        spy.close()


# ----------------------------------------------- the former computation, redone
def _full_inputs(prompt_ids: Tensor, prompt_mask: Tensor, action_ids: Tensor | None = None,
                 action_mask: Tensor | None = None) -> dict[str, Tensor]:
    ids, mask = prompt_ids, prompt_mask
    if action_ids is not None:
        ids = torch.cat([prompt_ids, action_ids[:, :-1]], 1)
        mask = torch.cat([prompt_mask, action_mask[:, :-1]], 1)
    mask = mask.long()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)}


def _all_positions(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    out = model(**inputs, use_cache=False)
    return out if isinstance(out, Tensor) else out.logits


def _q_all_positions(critic: nn.Module, inputs: dict[str, Tensor], rho_all: Tensor) -> Tensor:
    """Q at every position, from the backbone's outputs and the heads (the dueling form by hand)."""
    if not isinstance(critic, TokenQCritic):  # LoRA's critic view: Q is its logits
        return _all_positions(critic, inputs).float()
    out = critic.backbone(**inputs, use_cache=False, output_hidden_states=True)
    a = out.logits.float()
    if critic.value_head is None:
        return a
    hidden = out.hidden_states[-1].float()
    v = F.linear(hidden, critic.value_head.weight, critic.value_head.bias)
    rho = torch.softmax(rho_all.float(), -1)
    return v + critic.advantage_scale * (a - (rho * a).sum(-1, keepdim=True))


def _taken_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def reference_etpo_losses(m: ETPOModule, batch: TransitionBatch) -> dict[str, Tensor]:
    """ETPOModule.compute_losses as it was before the fix: every network over every position,
    sliced at the action afterwards; rho's softmax taken inside each critic."""
    hp, mask = m.hparams, batch.action_mask
    start = batch.prompt_ids.shape[1] - 1
    inputs = _full_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    taken = batch.action_ids.unsqueeze(-1)
    with torch.no_grad():
        rho_all = _all_positions(m.reference, inputs)
    rho = rho_all[:, start:]
    pi = _all_positions(m.policy, inputs)[:, start:]
    q = _q_all_positions(m.critic, inputs, rho_all)[:, start:]
    with torch.no_grad():
        qt = _q_all_positions(m.target_critic, inputs, rho_all)[:, start:]
        values = soft_values(qt, pi, rho, hp.beta)
        log_ratio = (_taken_logprobs(pi, batch.action_ids) - batch.old_logprobs) * mask
        nin = _full_inputs(batch.next_prompt_ids, batch.next_prompt_mask)
        n_rho = _all_positions(m.reference, nin)
        n_q = _q_all_positions(m.target_critic, nin, n_rho)[:, -1]
        n_pi = _all_positions(m.policy, nin)[:, -1]
        next_values = soft_values(n_q, n_pi, n_rho[:, -1], hp.beta)
        next_values = torch.where(batch.dones.bool(), torch.zeros_like(next_values), next_values)
        targets = soft_lambda_targets(qt.gather(-1, taken).squeeze(-1), values, mask, batch.rewards, batch.dones,
                                      next_values, hp.gamma, hp.lam, log_ratio if hp.traces else None)
    q_taken = q.gather(-1, taken).squeeze(-1)
    n = mask.float().sum()
    kl, entropy = kl_and_entropy(pi.detach(), rho)
    return {
        "q_loss": q_loss(q_taken, targets, mask, hp.huber_delta),
        "policy_loss": policy_loss(pi, rho, q, mask, hp.beta),
        "kl": (kl * mask).sum() / n, "entropy": (entropy * mask).sum() / n,
        "q_taken": (q_taken.detach() * mask).sum() / n, "target": (targets * mask).sum() / n,
        "value": (values * mask).sum() / n, "next_value": next_values.mean(),
        "trace_ratio": (log_ratio.clamp(max=0.0).exp() * mask).sum() / n,
        "next_values": next_values,
    }


def _trained_params(m) -> list[nn.Parameter]:
    nets = [m.policy] + ([m.critic] if m.critic is not None else [])
    return [p for net in nets for p in net.parameters() if p.requires_grad]


def _grads(m, out: dict[str, Tensor]) -> list[Tensor]:
    loss = sum(v for k, v in out.items() if k.endswith("loss"))
    params = _trained_params(m)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _assert_same(got: dict[str, Tensor], want: dict[str, Tensor], grads_got, grads_want) -> None:
    for key in want:
        if key in got:
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-5, atol=1e-6, msg=key)
    assert len(grads_got) == len(grads_want) and grads_want
    assert any(g.abs().max() > 1e-4 for g in grads_want)  # gradients that can disagree
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["etpo-copy", "etpo-zero", "etpo-dueling", "etpo-lora"])
def test_etpo_step_equals_the_full_sequence_computation(kind):
    module = MODULES[kind]()
    batch = _batch(seed=1)
    want = reference_etpo_losses(module, batch)
    grads_want = _grads(module, want)
    got = module.compute_losses(batch)
    grads_got = _grads(module, got)
    assert set(want) - {"next_values"} <= set(got)
    _assert_same(got, want, grads_got, grads_want)
    with torch.no_grad():
        torch.testing.assert_close(module.next_values(batch), want["next_values"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_baseline_steps_equal_the_full_sequence_computation(kind, monkeypatch):
    """PPO's and GRPO's steps with every forward over all positions, sliced afterwards (the
    former ``action_outputs``), give the same losses, statistics and gradients."""
    module = MODULES[kind]()
    batch = _batch(seed=2, groups=kind == "grpo")
    got = module.compute_losses(batch)
    grads_got = _grads(module, got)
    calls = []

    def former_action_outputs(model, b):
        calls.append(model)
        inputs = _full_inputs(b.prompt_ids, b.prompt_mask, b.action_ids, b.action_mask)
        return _all_positions(model, inputs)[:, b.prompt_ids.shape[1] - 1:]

    monkeypatch.setattr(module, "action_outputs", former_action_outputs)
    want = module.compute_losses(batch)
    assert len(calls) == (3 if kind == "ppo" else 2)  # every forward went through the former path
    _assert_same(got, want, grads_got, _grads(module, want))
    if kind == "ppo":
        monkeypatch.undo()
        with torch.no_grad():
            boot = module.bootstrap_values(batch.next_prompt_ids, batch.next_prompt_mask)
            nin = _full_inputs(batch.next_prompt_ids, batch.next_prompt_mask)
            torch.testing.assert_close(boot, _all_positions(module.critic, nin)[:, -1].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_init", ["copy", "dueling"])
def test_q_at_the_last_positions_equals_full_q_sliced_under_bf16_autocast(head_init):
    """The float32 head of TokenQCritic under autocast, applied to the kept positions only,
    gives the Q of every position sliced: same hidden states, same float32 head."""
    critic = TokenQCritic.from_policy(tiny_llama(VOCAB, seed=3), head_init=head_init)
    _perturb([critic], 4, scale=0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    rho = torch.randn(3, 11, VOCAB, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = critic(ids, ref_logits=rho)
        kept = critic(ids, ref_probs=TokenQCritic.reference_probs(rho[:, -4:]), logits_to_keep=4)
    assert full.dtype == kept.dtype == torch.float32 and kept.shape == (3, 4, VOCAB)
    torch.testing.assert_close(kept, full[:, -4:], rtol=1e-5, atol=1e-5)


class PlainCritic(nn.Module):
    """An injected critic that knows nothing of ``logits_to_keep``: Q over every position."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()


def test_a_critic_without_logits_to_keep_is_sliced_at_the_action():
    policy = tiny_llama(VOCAB, seed=0)
    module = ETPOModule(policy=policy, critic=PlainCritic(tiny_llama(VOCAB, seed=5)), beta=0.1, gamma=0.9, lam=0.9)
    batch = _batch(seed=3)
    want = reference_etpo_losses(module, batch)
    grads_want = _grads(module, want)
    got = module.compute_losses(batch)
    _assert_same(got, want, _grads(module, got), grads_want)


def test_bootstraps_forward_only_the_rows_that_did_not_terminate():
    """V(s') enters the targets times (1 - d): only the truncated rows' next observations are
    forwarded (without the padding columns they all share), and V(s') equals the value of
    each observation alone; a batch where every row terminated still makes one call per network."""
    module = _etpo("dueling")
    batch = _batch(seed=4)
    live = (~batch.dones.bool()).nonzero().squeeze(-1)
    assert 0 < len(live) < len(batch)
    spy, sizes = HeadSpy(module), []
    handle = module.reference.register_forward_pre_hook(lambda _m, args, kw: sizes.append(tuple(kw["input_ids"].shape)),
                                                        with_kwargs=True)
    try:
        with torch.no_grad():
            got = module.next_values(batch)
    finally:
        handle.remove()
        spy.close()
    width = int(batch.next_prompt_mask[live].sum(1).max())
    assert sizes == [(len(live), width)]
    for b in range(len(batch)):
        if batch.dones[b]:
            assert got[b] == 0
            continue
        ids = batch.next_prompt_ids[b][batch.next_prompt_mask[b]][None]
        with torch.no_grad():
            want = module.bootstrap_values(ids, torch.ones_like(ids, dtype=torch.bool))
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-6)
    done = TransitionBatch(**{**vars(batch), "dones": torch.ones_like(batch.dones)})
    sizes.clear()
    with torch.no_grad():
        assert torch.equal(module.next_values(done), torch.zeros(len(batch)))
