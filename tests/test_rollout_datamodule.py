"""RolloutDataModule end to end: a real tiny Llama, a real BPE tokenizer, the toy environment."""

import math

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from etpo_lightning import ETPOModule, TransitionBatch
from etpo_lightning.callbacks import KLMonitor, RolloutRefresh
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
from helpers import tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Say the word '{w}'.\nAnswer: {w}\nYour previous answer was 'x': wrong." for w in
             ("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean")] * 5
    return train_tokenizer(texts, vocab_size=300)


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


def test_behaviour_logprobs_are_those_of_the_processed_sampling_distribution(tokenizer):
    """Temperature 0.5 and top-k 7: the stored log mu of every sampled token equals an
    independent computation (eval-mode logits / T, all but the 7 largest removed, log-softmax),
    and differs from the raw policy's log-probability (what was stored before)."""
    module, dm = _setup(tokenizer, temperature=0.5, top_k=7, top_p=1.0)
    module.policy.train()  # the collector must switch dropout off itself
    try:
        transitions = dm.collect(module)
    finally:
        dm.teardown("fit")
    assert module.policy.training  # and restore the mode
    policy = module.policy.eval()
    raw_gap = 0.0
    for t in transitions:
        ids = torch.cat([t.prompt_ids, t.action_ids])[None]
        with torch.no_grad():
            logits = policy(input_ids=ids).logits[0, t.prompt_ids.numel() - 1: -1].double()
        scaled = logits / 0.5
        kth = scaled.topk(7, dim=-1).values[:, -1:]
        processed = scaled.masked_fill(scaled < kth, float("-inf"))
        want = torch.log_softmax(processed, -1).gather(-1, t.action_ids[:, None]).squeeze(-1)
        assert torch.isfinite(want).all()  # a sampled token is always inside the top k
        torch.testing.assert_close(t.logprobs.double(), want, atol=1e-4, rtol=0)
        raw = torch.log_softmax(logits, -1).gather(-1, t.action_ids[:, None]).squeeze(-1)
        raw_gap = max(raw_gap, (raw - want).abs().max().item())
    assert raw_gap > 0.05


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


def test_trainer_fit_on_toy_env_logs_rollout_metrics(tokenizer, tmp_path):
    module, dm = _setup(tokenizer, rollout_steps=1, batches_per_epoch=10)
    refresh, monitor = RolloutRefresh(every_n_steps=2), KLMonitor()
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[refresh, monitor])
    trainer.fit(module, datamodule=dm)
    # 6 batches with a fresh collection every 2 (the first before batch 1): 3 collections.
    assert dm.collections == 3 and dm.env_steps == 9
    df = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    for key in ["rollout/reward_mean", "rollout/success_rate", "rollout/error_rate", "train/q_loss", "monitor/kl"]:
        assert df[key].notna().any(), key
    rewards = df["rollout/reward_mean"].dropna()
    assert ((rewards >= 0) & (rewards <= 1)).all()  # KeywordEnv's rewards lie in [0, 1]
    # The monitor evaluated each collection once; its KL is >= 0 and reached the logs.
    assert [h["collection"] for h in monitor.history] == [1.0, 2.0, 3.0]
    kl = df["monitor/kl"].dropna()
    assert (kl >= 0).all() and math.isfinite(kl.iloc[-1])
    assert kl.iloc[-1] == pytest.approx(monitor.history[-1]["monitor/kl"], rel=1e-6)
    # Recompute the last collection's KL independently with the final policy.
    last = dm.replay[-1]
    batch = TransitionBatch.collate(last, tokenizer.pad_token_id)
    from etpo_lightning.losses import kl_and_entropy

    kl_tok, _ = kl_and_entropy(module.action_outputs(module.policy, batch), module.action_outputs(module.reference, batch))
    independent = float((kl_tok * batch.action_mask).sum() / batch.action_mask.sum())
    # The monitor ran one update before the end; the KL can only have moved a little.
    assert independent == pytest.approx(monitor.history[-1]["monitor/kl"], abs=0.05)
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
