"""RolloutDataModule end to end: a real tiny Llama, a real BPE tokenizer, the toy environment."""


import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from etpo_lightning import ETPOModule, TransitionBatch
from etpo_lightning.callbacks import KLMonitor, RolloutRefresh
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from helpers import tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean"))


def _setup(tokenizer, **dm_kwargs):
    torch.manual_seed(0)
    module = ETPOModule(policy=tiny_llama(len(tokenizer), seed=1), beta=0.1, gamma=0.9, policy_lr=1e-3, critic_lr=1e-3)
    kwargs = dict(env=KeywordEnv(max_steps=3), tokenizer=tokenizer, num_envs=3, rollout_steps=3, batch_size=3,
                  max_new_tokens=5, seed=0)
    kwargs.update(dm_kwargs)
    dm = RolloutDataModule(**kwargs)
    dm.setup("fit")
    return module, dm


def test_collect_shapes_chain_and_logprobs(tokenizer):
    module, dm = _setup(tokenizer)
    try:
        transitions = dm.collect(module)
    finally:
        dm.teardown("fit")
    assert len(transitions) == 9  # 3 envs x 3 steps
    eos = tokenizer.eos_token_id
    for t in transitions:
        n = t.action_ids.numel()
        assert 1 <= n <= 5
        # An action ends at its first EOS, or runs to max_new_tokens without one.
        assert (t.action_ids[-1] == eos) or n == 5
        assert (t.action_ids[:-1] != eos).all()
        assert t.logprobs.shape == t.action_ids.shape and (t.logprobs <= 0).all()
    # Prompts are the tokenized observations.
    assert tokenizer.decode(transitions[0].prompt_ids).startswith("Say the word '")
    # Multi-step chaining: env i's step k leads to the prompt of its step k+1 unless the
    # episode terminated (no next observation) or was truncated (the observation it would
    # have continued from, not the reset one).
    by_env = [transitions[i::3] for i in range(3)]
    chained = 0
    for steps in by_env:
        for now, nxt in zip(steps, steps[1:]):
            assert not (now.terminated and now.truncated)
            if now.terminated:
                assert now.next_prompt_ids.numel() == 0
            elif not now.truncated:
                assert torch.equal(now.next_prompt_ids, nxt.prompt_ids)
                chained += 1
    assert chained >= 3
    # KeywordEnv(max_steps=3) over 3 steps: every episode that did not succeed was truncated.
    last = [steps[-1] for steps in by_env]
    assert all(t.terminated == (t.reward > 0) and t.truncated == (t.reward <= 0) for t in last)
    # ETPO bootstraps at training time, with the networks of that step, from those ids.
    batch = TransitionBatch.collate(transitions, tokenizer.pad_token_id)
    fresh = module.next_values(batch)
    for row, t in enumerate(transitions):
        if t.terminated:
            assert fresh[row] == 0.0
        else:
            ids = t.next_prompt_ids[None]
            want = module.bootstrap_values(ids, torch.ones_like(ids, dtype=torch.bool)).item()
            assert fresh[row].item() == pytest.approx(want, abs=1e-5)
    # Padding layout: prompts left-padded, actions right-padded.
    for row in range(len(batch)):
        assert batch.prompt_mask[row, -1] and batch.action_mask[row, 0]
        n = transitions[row].action_ids.numel()
        assert batch.action_mask[row].sum() == n and batch.action_mask[row, :n].all()
    stats = dm.latest_stats
    assert stats["rollout/reward_mean"] == pytest.approx(sum(t.reward for t in transitions) / 9)
    assert stats["rollout/reward_max"] == max(t.reward for t in transitions)


def _processed_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """log of the sampling distribution, by hand in float64, as the spec of ``generate``'s
    processing says: logits / T, then all but the k largest removed, then the smallest set of
    the largest probabilities whose sum reaches p kept (ascending cumulative sum <= 1 - p
    removed, the most likely token always kept), renormalised."""
    scaled = logits.double() / temperature
    if top_k:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(scaled, -1)
        out = torch.full_like(scaled, float("-inf"))
        for row in range(scaled.shape[0]):
            order = sorted(range(scaled.shape[1]), key=lambda w: float(probs[row, w]))  # ascending
            below = 0.0
            for rank, w in enumerate(order):
                below += float(probs[row, w])
                if below > 1.0 - top_p or rank == len(order) - 1:
                    out[row, w] = scaled[row, w]
        scaled = out
    return torch.log_softmax(scaled, -1)


def test_behaviour_logprobs_are_those_of_the_processed_sampling_distribution(tokenizer):
    """Temperature 0.5, top-k 7, top-p 0.8: the stored log mu of every sampled token equals an
    independent float64 computation from the policy's raw eval-mode logits (above), and
    differs both from the raw policy's log-probability and from the same processing
    without top-p (so each step of the processing is checked)."""
    module, dm = _setup(tokenizer, temperature=0.5, top_k=7, top_p=0.8)
    module.policy.train()  # the collector must switch dropout off itself
    try:
        transitions = dm.collect(module)
    finally:
        dm.teardown("fit")
    assert module.policy.training  # and restore the mode
    policy = module.policy.eval()
    raw_gap = top_p_gap = 0.0
    for t in transitions:
        ids = torch.cat([t.prompt_ids, t.action_ids])[None]
        with torch.no_grad():
            logits = policy(input_ids=ids).logits[0, t.prompt_ids.numel() - 1: -1]
        taken = t.action_ids[:, None]
        want = _processed_logprobs(logits, 0.5, 7, 0.8).gather(-1, taken).squeeze(-1)
        assert torch.isfinite(want).all()  # a sampled token is always inside the kept set
        torch.testing.assert_close(t.logprobs.double(), want, atol=1e-5, rtol=0)
        raw = torch.log_softmax(logits.double(), -1).gather(-1, taken).squeeze(-1)
        no_top_p = _processed_logprobs(logits, 0.5, 7, 1.0).gather(-1, taken).squeeze(-1)
        raw_gap = max(raw_gap, (raw - want).abs().max().item())
        top_p_gap = max(top_p_gap, (no_top_p - want).abs().max().item())
    assert raw_gap > 0.05 and top_p_gap > 0.01


def test_prompt_truncation_keeps_the_end(tokenizer):
    _, dm = _setup(tokenizer, max_prompt_tokens=4)
    text = "Say the word 'apple'.\nAnswer:"
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.warns(UserWarning, match="truncated"):
        (ids,) = dm.encode_prompts([text])
    assert ids.tolist() == full[-4:]
    dm.teardown("fit")


def test_batch_size_larger_than_rollout_is_refused(tokenizer):
    with pytest.raises(ValueError, match="batch_size=10 is larger than the rollout"):
        RolloutDataModule(env=KeywordEnv(), tokenizer=tokenizer, num_envs=2, rollout_steps=2, batch_size=10)


def _exact_kl(policy, reference, transitions) -> float:
    """Mean per-token KL(pi || rho) over the transitions' action tokens, by hand in float64:
    each transition alone (no padding), both networks called directly."""
    total, tokens = 0.0, 0
    for t in transitions:
        ids = torch.cat([t.prompt_ids, t.action_ids[:-1]])[None]
        rows = slice(t.prompt_ids.numel() - 1, None)
        with torch.no_grad():
            log_pi = torch.log_softmax(policy(input_ids=ids).logits[0, rows].double(), -1)
            log_rho = torch.log_softmax(reference(input_ids=ids).logits[0, rows].double(), -1)
        total += float((log_pi.exp() * (log_pi - log_rho)).sum())
        tokens += t.action_ids.numel()
    return total / tokens


def test_trainer_fit_on_toy_env_logs_rollout_metrics(tokenizer, tmp_path):
    module, dm = _setup(tokenizer, rollout_steps=1, batches_per_epoch=10)
    refresh = RolloutRefresh(every_n_steps=2)
    monitor = KLMonitor(kl_threshold=1e-4, on_threshold="adapt_beta", adapt_rate=0.5)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[refresh, monitor])
    trainer.fit(module, datamodule=dm)
    # 5 batches with a fresh collection every 2 (the first before batch 1): before batches 1, 3, 5.
    assert dm.collections == 3 and dm.env_steps == 9
    df = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    for key in ["rollout/reward_mean", "rollout/success_rate", "rollout/error_rate", "train/q_loss", "monitor/kl"]:
        assert df[key].notna().any(), key
    rewards = df["rollout/reward_mean"].dropna()
    assert ((rewards >= 0) & (rewards <= 1)).all()  # KeywordEnv's rewards lie in [0, 1]
    # The monitor evaluated each collection once, at the end of batches 1, 3 and 5; the last
    # evaluation saw the final policy, so its KL is exactly that of the final networks.
    assert [h["collection"] for h in monitor.history] == [1.0, 2.0, 3.0]
    kl = df["monitor/kl"].dropna()
    assert kl.iloc[-1] == pytest.approx(monitor.history[-1]["monitor/kl"], rel=1e-6)
    last = dm.replay[-1]
    independent = _exact_kl(module.policy, module.reference, last)
    assert independent > 1e-4  # the policy did move: a wrong KL cannot hide behind 0
    assert monitor.history[-1]["monitor/kl"] == pytest.approx(independent, rel=1e-5, abs=1e-7)
    # adapt_beta steered the module's KL coefficient, by hand: beta_k+1 = beta_k (1 + rate
    # clip(KL_k / target - 1, -0.2, 0.2)) after each collection; hparams are left as given.
    beta = 0.1
    for h in monitor.history:
        beta *= 1.0 + 0.5 * max(-0.2, min(0.2, h["monitor/kl"] / 1e-4 - 1.0))
        assert h["monitor/beta"] == pytest.approx(beta, rel=1e-9)
    assert module.kl_coef == pytest.approx(beta, rel=1e-9) and beta != pytest.approx(0.1)
    assert module.hparams.beta == 0.1 and monitor.beta == module.kl_coef
    # ... and the losses use the adapted coefficient.
    from etpo_lightning.losses import policy_loss

    batch = TransitionBatch.collate(last, tokenizer.pad_token_id)
    with torch.no_grad():
        out = module.compute_losses(batch)
        pi, rho, q = (module.action_outputs(m, batch) for m in (module.policy, module.reference, module.critic))
    assert out["policy_loss"].item() == pytest.approx(policy_loss(pi, rho, q, batch.action_mask, beta).item(), rel=1e-6)
    assert out["policy_loss"].item() != pytest.approx(policy_loss(pi, rho, q, batch.action_mask, 0.1).item(), rel=1e-6)
    # The adapted coefficient travels with the module's checkpoint.
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    fresh, _ = _setup(tokenizer)
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.kl_coef == module.kl_coef and fresh.hparams.beta == 0.1
    # The datamodule's state round-trips.
    state = dm.state_dict()
    _, dm2 = _setup(tokenizer, rollout_steps=1)
    dm2.load_state_dict(state)
    assert dm2.collections == 3 and dm2.best_reward == dm.best_reward
    assert [t.action_ids.tolist() for t in dm2.replay[-1]] == [t.action_ids.tolist() for t in dm.replay[-1]]
    dm2.teardown("fit")


def _fit_and_read(tokenizer, tmp_path, seed: int):
    pl.seed_everything(seed)
    module = ETPOModule(policy=tiny_llama(len(tokenizer), seed=1), beta=0.1, gamma=0.9, policy_lr=1e-3,
                        critic_lr=1e-3, lam=0.9)
    dm = RolloutDataModule(env=KeywordEnv(max_steps=2), tokenizer=tokenizer, num_envs=4, env_workers=2,
                           rollout_steps=2, batch_size=4, max_new_tokens=5, seed=seed, batches_per_epoch=10)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RolloutRefresh(every_n_steps=2)])
    trainer.fit(module, datamodule=dm)
    metrics = pd.read_csv(f"{trainer.logger.log_dir}/metrics.csv")
    return [p.detach().clone() for p in module.parameters()], metrics


def test_the_same_seed_reproduces_the_run(tokenizer, tmp_path):
    """Sampling, env worker order and updates are all seeded: two fits with one seed (two env
    worker processes each) end with bit-identical weights and metrics; another seed does not."""
    params_a, metrics_a = _fit_and_read(tokenizer, tmp_path / "a", seed=3)
    params_b, metrics_b = _fit_and_read(tokenizer, tmp_path / "b", seed=3)
    params_c, _ = _fit_and_read(tokenizer, tmp_path / "c", seed=4)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    pd.testing.assert_frame_equal(metrics_a, metrics_b)
    assert "rollout/reward_mean" in metrics_a and metrics_a["train/q_loss"].notna().sum() == 6
    assert any(not torch.equal(a, c) for a, c in zip(params_a, params_c))


def test_adapt_beta_needs_a_target_and_adapts_with_target_kl_alone():
    with pytest.raises(ValueError, match="needs target_kl"):
        KLMonitor(on_threshold="adapt_beta")
    with pytest.raises(ValueError, match="would be ignored"):
        KLMonitor(target_kl=0.05)  # on_threshold='warn' never reads a target
    # target_kl without kl_threshold used to be a silent no-op: beta never moved.
    monitor = KLMonitor(on_threshold="adapt_beta", target_kl=0.05, adapt_rate=0.1)
    module = type("M", (), {"kl_coef": 0.1})()
    for kl, factor in ((0.16, 1.02), (0.05, 1.0), (0.045, 0.99)):  # clip(0.16/0.05 - 1) = 0.2
        before = module.kl_coef
        monitor._guard(None, module, kl)
        assert module.kl_coef == pytest.approx(before * factor, rel=1e-12) and monitor.beta == module.kl_coef


def test_min_beta_floors_the_adaptive_controller():
    with pytest.raises(ValueError, match="floor of on_threshold='adapt_beta'"):
        KLMonitor(kl_threshold=0.1, min_beta=0.1)
    with pytest.raises(ValueError, match="min_beta must be > 0"):
        KLMonitor(on_threshold="adapt_beta", target_kl=0.1, min_beta=0.0)
    monitor = KLMonitor(on_threshold="adapt_beta", target_kl=0.1, adapt_rate=0.5, min_beta=0.1)
    module = type("M", (), {"kl_coef": 0.1})()
    # KL far below target: an unfloored controller would give 0.1 * 0.9 = 0.09; the floor holds 0.1.
    monitor._guard(None, module, 0.0)
    assert module.kl_coef == 0.1 and monitor.beta == 0.1
    # Above target it still tightens, 0.1 * (1 + 0.5 * 0.2) = 0.11, then relaxes down to the floor only.
    monitor._guard(None, module, 0.3)
    assert module.kl_coef == pytest.approx(0.11, rel=1e-12)
    monitor._guard(None, module, 0.095)  # clip(0.95 - 1) = -0.05: 0.11 * 0.975 = 0.10725
    assert module.kl_coef == pytest.approx(0.10725, rel=1e-12)
    monitor._guard(None, module, 0.0)  # 0.10725 * 0.9 = 0.0965 < floor
    assert module.kl_coef == 0.1
