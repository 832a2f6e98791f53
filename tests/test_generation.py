"""The generation interface: the datamodule drives an engine, never the module's attributes."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from etpo_lightning import ETPOModule
from etpo_lightning.core.functional import token_logprobs
from etpo_lightning.core.generation import GenerationEngine, RolloutPolicy, Samples, Sampling, cut_at_eos, pad_left
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.datamodules.rollout_metrics import RolloutMetrics
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.generation.hf import HFGenerate
from helpers import tiny_llama, word_tokenizer

WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean")


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def _module(tokenizer) -> ETPOModule:
    return ETPOModule(policy=tiny_llama(len(tokenizer), seed=1), beta=0.1, gamma=0.9, policy_lr=1e-3, critic_lr=1e-3)


def test_pad_left_and_cut_at_eos():
    ids, mask = pad_left([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]
    rows, logp = torch.tensor([[3, 2, 4], [3, 3, 3]]), -torch.arange(6.0).view(2, 3)
    cut = list(cut_at_eos(rows, logp, eos_token_id=2))
    assert [a.tolist() for a, _ in cut] == [[3, 2], [3, 3, 3]]
    assert [lp.tolist() for _, lp in cut] == [[0.0, -1.0], [-3.0, -4.0, -5.0]]


def test_hf_engine_logprobs_are_the_processed_policy_logprobs(tokenizer):
    """At temperature 0.7 with top-k 5 the behaviour log-prob of each sampled token is the
    policy's log-softmax of logits / 0.7 restricted to its 5 best tokens (computed here
    independently from one forward over [prompt | action])."""
    torch.manual_seed(0)
    module = _module(tokenizer)
    assert isinstance(module, RolloutPolicy)
    sampling = Sampling(max_new_tokens=6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        temperature=0.7, top_k=5, batch_size=2)
    prompts = [torch.tensor(tokenizer("Say the word 'apple'")["input_ids"]),
               torch.tensor(tokenizer("Say 'ocean'")["input_ids"])]
    samples = HFGenerate().sample(module, prompts, sampling)
    assert len(samples.actions) == 2
    module.policy.eval()
    for prompt, action, logp in zip(prompts, samples.actions, samples.logprobs):
        ids = torch.cat([prompt, action])[None]
        logits = module.policy(ids).logits[0, prompt.numel() - 1:-1].float() / 0.7
        kth = logits.topk(5, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        want = token_logprobs(logits[None], action[None])[0]
        torch.testing.assert_close(logp, want, atol=1e-5, rtol=0)


class RecordingEngine(GenerationEngine):
    """Samples with ``HFGenerate`` and records what the datamodule asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.inner = HFGenerate()

    def load_weights(self, source: RolloutPolicy) -> None:
        self.calls.append("load_weights")
        self.weights = source.inference_state_dict()

    def sample(self, source: RolloutPolicy, prompts, sampling: Sampling) -> Samples:
        self.calls.append("sample")
        return self.inner.sample(source, prompts, sampling)

    def close(self) -> None:
        self.calls.append("close")


class RecordingDataModule(RolloutDataModule):
    def make_engine(self) -> GenerationEngine:
        self.recorder = RecordingEngine()
        return self.recorder


def test_datamodule_pushes_weights_before_every_collection_and_closes_the_engine(tokenizer, tmp_path):
    torch.manual_seed(0)
    module = _module(tokenizer)
    dm = RecordingDataModule(env=KeywordEnv(max_steps=2), tokenizer=tokenizer, num_envs=2, rollout_steps=2,
                             batch_size=2, max_new_tokens=4, seed=0)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    calls = dm.recorder.calls
    # One collection per epoch of 2 batches over 3 batches: 2 collections of 2 steps each.
    assert calls == ["load_weights", "sample", "sample", "load_weights", "sample", "sample", "close"]
    assert dm.engine is None
    # The pushed weights are the policy's, under its own names, copied to the CPU.
    assert dm.recorder.weights.keys() == module.policy.state_dict().keys()
    # The rollout statistics reached the trainer through the datamodule's callback.
    assert sum(isinstance(c, RolloutMetrics) for c in trainer.callbacks) == 1
    assert trainer.callback_metrics["rollout/reward_mean"].item() == pytest.approx(dm.latest_stats["rollout/reward_mean"])


def test_the_datamodule_refuses_an_unknown_engine_and_a_module_without_a_policy(tokenizer):
    with pytest.raises(ValueError, match="generation must be one of"):
        RolloutDataModule(env=KeywordEnv(), tokenizer=tokenizer, generation="bogus")
    dm = RolloutDataModule(env=KeywordEnv(), tokenizer=tokenizer, num_envs=2, batch_size=2)
    dm.setup("fit")
    try:
        with pytest.raises(TypeError, match="RolloutPolicy"):
            dm.collect(torch.nn.Linear(2, 2))
    finally:
        dm.teardown("fit")
