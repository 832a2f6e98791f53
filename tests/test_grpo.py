"""GRPOModule (the critic-free group baseline): its pure functions against hand and brute
force computations, the grouped rollout datamodule, real Trainer fits and exact resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from transformers import LlamaConfig, LlamaForCausalLM

from etpo_lightning import GRPOModule, Transition, TransitionBatch
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv, VectorEnv
from etpo_lightning.grpo.losses import aggregate, group_advantages, grpo_loss, k3_kl, row_advantages
from helpers import fit_then_resume_through_cli, random_transition_batch, tiny_llama, word_tokenizer

VOCAB = 64
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def _mask(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


# ------------------------------------------------------------- advantages
def _hand_advantages(returns: list[float], scale: bool, eps: float = 1e-4) -> list[float]:
    g = len(returns)
    mean = sum(returns) / g
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / (g - 1))
    if max(returns) == min(returns):
        return [0.0] * g
    return [(r - mean) / (std + eps) if scale else r - mean for r in returns]


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_against_a_hand_computation_with_ties_and_a_constant_group(scale):
    groups = [
        [1.0, 0.0, 1.0, 0.5],  # ties: the two 1.0 episodes get the same advantage
        [0.1, 0.1, 0.1, 0.1],  # zero variance (and a mean that is not exact in binary)
        [-1.0, -1.0, -1.0, 0.7],  # a single success among failures
        [-1.0, -1.0, -1.0, -1.0],  # every program failed
    ]
    got = group_advantages(torch.tensor(groups, dtype=torch.float64), scale_by_std=scale)
    want = torch.tensor([_hand_advantages(g, scale) for g in groups], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()
    assert got[1].abs().max() == 0 and got[3].abs().max() == 0  # exactly zero, not 0/eps noise
    assert got[0, 0] == got[0, 2] and got[0, 0] > 0 > got[0, 1]
    # The first group, spelled out: mean 0.625, unbiased std sqrt(0.6875 / 3).
    if scale:
        std = math.sqrt(0.6875 / 3)
        assert got[0, 3].item() == pytest.approx(-0.125 / (std + 1e-4), rel=1e-12)
    else:
        assert got[0].tolist() == [0.375, -0.625, 0.375, -0.125]
    # float32 inputs: the constant group is still exactly zero.
    got32 = group_advantages(torch.tensor(groups, dtype=torch.float32), scale_by_std=scale)
    assert got32[1].abs().max() == 0 and torch.isfinite(got32).all()


def test_row_advantages_pick_each_rows_episode():
    returns = torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [2.0, 2.0, 2.0]])
    members = torch.tensor([2, 0, 1])
    want = [_hand_advantages([1.0, 0.0, 0.5], True)[2], _hand_advantages([1.0, 0.0, 0.5], True)[0], 0.0]
    torch.testing.assert_close(row_advantages(returns, members), torch.tensor(want))


def test_group_advantages_need_groups():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))


# --------------------------------------------------------------------- k3
def test_k3_expectation_under_pi_is_the_exact_kl_on_a_small_vocabulary():
    g = torch.Generator().manual_seed(0)
    vocab = 7
    for _ in range(5):
        log_pi = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, -1)
        log_rho = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, -1)
        exact = sum(math.exp(log_pi[w]) * (log_pi[w] - log_rho[w]) for w in range(vocab))
        k3 = k3_kl(log_pi, log_rho)  # the estimate for every possible sampled token
        assert (k3 >= 0).all()
        assert float((log_pi.exp() * k3).sum()) == pytest.approx(float(exact), rel=1e-12)
        assert float(exact) > 0.05
        # Not the naive estimate log pi - log rho token by token (that one can be negative).
        assert not torch.allclose(k3, log_pi - log_rho)
    # Gradient: d k3 / d log pi = 1 - rho/pi.
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    lr = torch.tensor([-1.5, -1.0])
    k3_kl(lp, lr).sum().backward()
    torch.testing.assert_close(lp.grad, 1 - (lr - lp.detach()).exp())


# ------------------------------------------------------------------- loss
def _brute_loss(new, old, ref, adv, lengths, eps, beta, how):
    per_row, all_tokens = [], []
    for b, n in enumerate(lengths):
        terms = []
        for j in range(n):
            ratio = math.exp(float(new[b, j] - old[b, j]))
            a = float(adv[b])
            surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = float(ref[b, j] - new[b, j])
            terms.append(-surrogate + beta * (math.exp(d) - d - 1))
        if terms:
            per_row.append(sum(terms) / len(terms))
        all_tokens.extend(terms)
    return sum(per_row) / len(per_row) if how == "sequence" else sum(all_tokens) / len(all_tokens)


@pytest.mark.parametrize("how", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_loss_matches_an_independent_computation(how, beta):
    g = torch.Generator().manual_seed(2)
    lengths, width = [5, 2, 0, 4], 5
    mask = _mask(lengths, width)
    old = -torch.rand(4, width, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(4, width, generator=g, dtype=torch.float64) * 0.4
    ref = old + torch.randn(4, width, generator=g, dtype=torch.float64) * 0.5
    adv = torch.tensor([1.3, -0.7, 5.0, -0.2], dtype=torch.float64)
    got = grpo_loss(new, old, ref, adv, mask, clip_ratio=0.2, beta=beta, how=how)
    want = _brute_loss(new, old, ref, adv, lengths, 0.2, beta, how)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # The two aggregations differ when rows have different lengths.
    other = grpo_loss(new, old, ref, adv, mask, 0.2, beta, "token" if how == "sequence" else "sequence")
    assert abs(other.item() - got.item()) > 1e-3
    n_clipped = sum(abs(math.exp(float(new[b, j] - old[b, j])) - 1) > 0.2
                    for b, n in enumerate(lengths) for j in range(n))
    assert 0 < n_clipped < sum(lengths)  # both branches exercised


def test_clipped_tokens_get_no_surrogate_gradient():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.1]])).requires_grad_()
    adv = torch.tensor([1.0])
    grpo_loss(new, old, old, adv, torch.ones(1, 4, dtype=torch.bool), 0.2, beta=0.0).backward()
    # A > 0: ratios above 1 + eps are clipped (no gradient); below 1 - eps the min keeps the
    # unclipped term (pushed up); inside: -A * ratio / n.
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 0.0, -0.5 / 4, -1.1 / 4]]))


def test_aggregate_skips_empty_rows():
    x = torch.tensor([[1.0, 3.0], [5.0, 0.0], [9.0, 9.0]])
    mask = _mask([2, 1, 0], 2)
    assert aggregate(x, mask, "sequence").item() == pytest.approx((2.0 + 5.0) / 2)
    assert aggregate(x, mask, "token").item() == pytest.approx(9.0 / 3)


# ----------------------------------------------------------------- module
def _grouped_batch(seed: int = 5) -> TransitionBatch:
    batch = random_transition_batch(VOCAB, seed=seed)
    # Rows 0, 1 are episodes 0 and 2 of a group; rows 2, 3 episodes of a constant group.
    batch.group_returns = torch.tensor([[1.0, 0.2, -1.0], [1.0, 0.2, -1.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    batch.group_members = torch.tensor([0, 2, 1, 2])
    batch.group_ids = torch.tensor([0, 0, 1, 1])
    return batch


@pytest.mark.parametrize("how", ["sequence", "token"])
def test_compute_losses_match_an_independent_computation(how):
    module = GRPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.2, policy_lr=1e-3, loss_aggregation=how)
    # The policy moved away from the reference (which stays the initial model).
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _grouped_batch()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logp = module.action_logprobs(batch)
        batch.old_logprobs = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * batch.action_mask
        out = module.compute_losses(batch)
        ref_logits = module.action_outputs(module.reference, batch)
    ref_lp = torch.log_softmax(ref_logits, -1).gather(-1, batch.action_ids[..., None]).squeeze(-1)
    adv = [_hand_advantages([1.0, 0.2, -1.0], True)[0], _hand_advantages([1.0, 0.2, -1.0], True)[2], 0.0, 0.0]
    lengths = batch.action_mask.sum(1).tolist()
    want = _brute_loss(logp, batch.old_logprobs, ref_lp, adv, lengths, 0.2, 0.2, how)
    assert out["policy_loss"].item() == pytest.approx(want, rel=1e-5)
    assert out["zero_advantage"].item() == 0.5
    assert out["kl"].item() > 0 and out["k3_kl"].item() > 0
    assert set(k for k in out if k.endswith("loss")) == {"policy_loss"}


def test_no_critic_is_built_optimised_or_checkpointed(tmp_path):
    module = GRPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1, policy_lr=1e-3)
    assert module.critic is None and not hasattr(module, "target_critic")
    assert {k.split(".")[0] for k in module.state_dict()} == {"policy", "reference"}
    assert len(module.configure_optimizers()) == 1
    with pytest.raises(ValueError, match="group_size"):
        module.compute_losses(random_transition_batch(VOCAB, seed=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(beta=-0.1), "beta must be >= 0"), (dict(clip_ratio=0.0), "clip_ratio must be > 0"),
     (dict(loss_aggregation="batch"), "loss_aggregation must be"), (dict(std_eps=0.0), "std_eps must be > 0")],
)
def test_bad_hyperparameters_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOModule(policy=tiny_llama(VOCAB), **kwargs)


# --------------------------------------------------------- grouped rollouts
def test_vector_env_groups_share_their_seeds():
    fns = [lambda: KeywordEnv(words=WORDS, max_steps=1) for _ in range(6)]
    with VectorEnv(fns, seed=3, group_size=3) as venv:
        firsts = [venv.reset()]
        for _ in range(3):
            firsts.append(venv.step(["zzz"] * 6)[0])  # one-step episodes: auto-reset every step
    for obs in firsts:
        assert obs[0] == obs[1] == obs[2] and obs[3] == obs[4] == obs[5]
    assert len({o[0] for o in firsts} | {o[3] for o in firsts}) > 1  # groups and episodes differ
    with pytest.raises(ValueError, match="group_size"):
        VectorEnv(fns[:4], group_size=3)


def _first_of_each_episode(transitions: list[Transition]) -> dict[tuple[int, int], Transition]:
    firsts: dict[tuple[int, int], Transition] = {}
    for t in transitions:  # a released group lists each episode's transitions in order
        firsts.setdefault((t.group_id, t.group_member), t)
    return firsts


def test_grpo_fit_through_the_grouped_rollout_datamodule(tmp_path, tokenizer):
    pl.seed_everything(0)
    # Two-step episodes and one step per collection: groups span collections and are held back.
    dm = RolloutDataModule(env=KeywordEnv(words=WORDS, max_steps=2), tokenizer=tokenizer, num_envs=6, group_size=3,
                           rollout_steps=1, batch_size=4, replay_collections=2, max_new_tokens=4, seed=0)
    module = GRPOModule(policy=tiny_llama(len(tokenizer), seed=1), beta=0.1, policy_lr=1e-3)
    released: list[Transition] = []
    collect = dm.collect

    def recording_collect(m):
        out = collect(m)
        released.extend(out)
        return out

    dm.collect = recording_collect
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path, name="logs"), callbacks=[ckpt],
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6  # one optimizer step per batch
    # Every sampled action counts as an environment step, released or still running.
    assert dm.env_steps == dm.collections * 6 and dm.collections >= 2
    assert 0 < len(released) <= dm.env_steps

    by_episode: dict[tuple[int, int], list[Transition]] = {}
    for t in released:
        by_episode.setdefault((t.group_id, t.group_member), []).append(t)
    group_ids = {t.group_id for t in released}
    assert group_ids == set(range(dm.groups_completed)) and len(group_ids) >= 2
    for gid in group_ids:
        members = [by_episode[(gid, m)] for m in range(3)]  # all G episodes of the group released
        # The G episodes share their first observation.
        first_prompts = {tuple(steps[0].prompt_ids.tolist()) for steps in members}
        assert len(first_prompts) == 1
        for m, steps in enumerate(members):
            assert 1 <= len(steps) <= 2 and (steps[-1].terminated or steps[-1].truncated)
            assert not any(s.terminated or s.truncated for s in steps[:-1])
            # The recorded returns are the episode's undiscounted sum of rewards.
            assert steps[0].group_returns[m].item() == pytest.approx(sum(s.reward for s in steps))
            assert all(torch.equal(s.group_returns, steps[0].group_returns) for s in steps)
    # Different groups saw different tasks (the seeds are per group, not global).
    firsts = {tuple(by_episode[(gid, 0)][0].prompt_ids.tolist()) for gid in group_ids}
    assert len(firsts) > 1

    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    for key in ("policy_loss", "kl", "k3_kl", "entropy", "clip_fraction", "advantage_abs", "zero_advantage"):
        col = logged[f"train/{key}"].dropna()
        assert len(col) == 6 and torch.isfinite(torch.tensor(col.values)).all(), key
    assert logged["rollout/groups_completed"].dropna().iloc[-1] == dm.groups_completed

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"policy", "reference"}
    assert len(saved["optimizer_states"]) == 1
    assert not any("critic" in k for k in saved["state_dict"])


def test_group_size_must_divide_num_envs(tokenizer):
    with pytest.raises(ValueError, match="group_size"):
        RolloutDataModule(env=KeywordEnv(), tokenizer=tokenizer, num_envs=4, group_size=3, batch_size=2)


# ------------------------------------------------------------------ resume
def dropout_llama(vocab_size: int) -> LlamaForCausalLM:
    """A tiny Llama with attention dropout, so every training forward consumes RNG."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.2,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.losses.append((float(m["train/policy_loss"]), float(m["train/k3_kl"])))


class NoRNGRestore(GRPOModule):
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint({k: v for k, v in checkpoint.items() if k != "rng_states"})


def _rollout_data(tokenizer) -> RolloutDataModule:
    pl.seed_everything(0)
    # One word, as in test_resume.py: on resume the environments restart their seed
    # counters, so with several words the resumed run would be asked other tasks.
    return RolloutDataModule(env=KeywordEnv(words=["apple"], max_steps=1), tokenizer=tokenizer, num_envs=4,
                             group_size=2, rollout_steps=1, batch_size=3, batches_per_epoch=2, max_new_tokens=4,
                             seed=0)


def _fit(root: Path, max_batches: int, dm: RolloutDataModule, vocab: int, ckpt_path: str | None = None,
         module_cls: type[GRPOModule] = GRPOModule):
    module = module_cls(policy=dropout_llama(vocab), beta=0.1, policy_lr=3e-3)
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_steps=max_batches, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[recorder, checkpoints])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return module, recorder.losses


def test_resume_with_grouped_rollouts_is_exact(tmp_path, tokenizer):
    n, vocab = 4, len(tokenizer)  # two epochs, each a fresh collection of 2 groups of 2 and 2 batches
    full_dm = _rollout_data(tokenizer)
    full, full_losses = _fit(tmp_path / "full", n, full_dm, vocab)
    _, first = _fit(tmp_path / "half", n // 2, _rollout_data(tokenizer), vocab)
    ckpt = tmp_path / "half" / "ckpt" / f"step={n // 2}.ckpt"  # one optimizer step per batch
    resumed_dm = _rollout_data(tokenizer)
    resumed, second = _fit(tmp_path / "resumed", n, resumed_dm, vocab, ckpt_path=str(ckpt))

    assert first + second == full_losses  # bit-identical, batch by batch
    assert any(loss != 0 for loss, _ in full_losses)  # some group had a signal
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_dm.collections == full_dm.collections == 2 and resumed_dm.env_steps == full_dm.env_steps == 8
    assert resumed_dm.groups_completed == full_dm.groups_completed == 4
    assert [t.action_ids.tolist() for t in resumed_dm.replay[-1]] == [t.action_ids.tolist() for t in full_dm.replay[-1]]
    assert [t.group_returns.tolist() for t in resumed_dm.replay[-1]] == [t.group_returns.tolist() for t in full_dm.replay[-1]]

    # Negative control: the same resume without the RNG states diverges.
    _, control = _fit(tmp_path / "control", n // 2 + 1, _rollout_data(tokenizer), vocab, ckpt_path=str(ckpt),
                      module_cls=NoRNGRestore)
    assert control[0] != full_losses[n // 2]


def test_cli_fit_and_resume(tmp_path, tokenizer):
    """``etpo fit --config X`` with GRPOModule, then ``--ckpt_path last.ckpt``."""
    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    dropout_llama(len(tokenizer)).save_pretrained(model_dir)
    config = {
        "seed_everything": 0,
        "model": {"class_path": "etpo_lightning.GRPOModule",
                  "init_args": {"model_name_or_path": str(model_dir), "beta": 0.1, "policy_lr": 1e-3}},
        "data": {"env": {"class_path": "etpo_lightning.envs.KeywordEnv",
                         "init_args": {"words": list(WORDS[:3]), "max_steps": 1}},
                 "num_envs": 4, "group_size": 2, "rollout_steps": 1, "batch_size": 2, "batches_per_epoch": 1,
                 "max_new_tokens": 4},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "etpo_lightning.callbacks.KLMonitor"},
                                  {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
    }
    resumed = fit_then_resume_through_cli(config, tmp_path, max_steps=2)
    assert isinstance(resumed.model, GRPOModule)
    assert resumed.trainer.global_step == 2  # it continued from batch 1
