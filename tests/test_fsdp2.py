"""FSDP2 (``fully_shard`` under Lightning's ``ModelParallelStrategy``) on two CPU ranks (gloo).

Each fit runs ``tests/fsdp2_fit.py`` in real processes: one process without sharding, or two
ranks sharding every network. On the same fixed global batches the two-rank run must give
the one-process losses and weights (to 1e-5 in float32): gradients averaged by the
reduce-scatter, the clipping norm all-reduced over the shards, the Polyak update and the
training-time bootstraps computed on DTensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_ddp_fit, tiny_llama

FSDP2_FIT = Path(__file__).with_name("fsdp2_fit.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fsdp2") / "model"
    tiny_llama(64, seed=1).save_pretrained(path)
    return str(path)


def fit(out: Path, model: str, *args: str) -> list[dict]:
    run_ddp_fit([str(out), "--model", model, *args], script=FSDP2_FIT)
    return [torch.load(p, weights_only=False) for p in sorted(out.glob("rank*.pt"))]


def assert_same_training(one: dict, ranks: list[dict], networks: set[str]) -> None:
    """Losses: the mean of the ranks' (equal token counts); weights: every network, gathered."""
    assert len(one["losses"]) == len(ranks[0]["losses"]) == len(ranks[1]["losses"])
    for step, want in enumerate(one["losses"]):
        for key, value in want.items():
            got = sum(r["losses"][step][key] for r in ranks) / len(ranks)
            assert got == pytest.approx(value, abs=1e-5, rel=1e-5), (step, key)
    assert set(one["weights"]) == networks
    for name, state in one["weights"].items():
        for r in ranks:
            assert state.keys() == r["weights"][name].keys()
            for key, value in state.items():
                torch.testing.assert_close(r["weights"][name][key], value, atol=1e-5, rtol=1e-5, msg=f"{name}.{key}")


NETWORKS = {"etpo": {"policy", "critic", "target_critic", "reference"}, "ppo": {"policy", "critic", "reference"},
            "grpo": {"policy", "reference"}}


@pytest.mark.parametrize("algo", ["etpo", "ppo", "grpo"])
def test_two_ranks_train_as_one_process(tmp_path: Path, model_dir: str, algo: str) -> None:
    """ETPO(lambda) with Retrace traces and the dueling critic, PPO, GRPO: 3 batches of 4."""
    one = fit(tmp_path / "one", model_dir, "--algo", algo, "--devices", "1")
    ranks = fit(tmp_path / "two", model_dir, "--algo", algo, "--devices", "2")
    assert len(one) == 1 and [r["rank"] for r in ranks] == [0, 1]
    assert all(r["dtensor"] for r in ranks) and not one[0]["dtensor"]
    networks = NETWORKS[algo]
    assert_same_training(one[0], ranks, networks)
    if algo != "etpo":
        return
    # Training moved the trained networks and the Polyak target, not the reference: the
    # comparison is not between two copies of the initial weights.
    initial = fit(tmp_path / "zero", model_dir, "--algo", algo, "--devices", "1", "--steps", "0")[0]["weights"]
    for name in networks:
        moved = any(not torch.equal(v, initial[name][k]) for k, v in one[0]["weights"][name].items())
        assert moved == (name != "reference"), name
    # The gradient clipping compared (a norm all-reduced over the shards) was active.
    unclipped = fit(tmp_path / "unclipped", model_dir, "--algo", algo, "--devices", "1", "--clip", "0")[0]
    assert not torch.allclose(unclipped["weights"]["policy"]["lm_head.weight"], one[0]["weights"]["policy"]["lm_head.weight"])

    # Each rank holds about half the parameter bytes, counted from its local shards.
    full = one[0]["full_bytes"]
    assert ranks[0]["full_bytes"] == full
    assert sum(r["local_bytes"] for r in ranks) == full
    for r in ranks:
        assert abs(r["local_bytes"] - full / 2) / full < 0.01, (r["local_bytes"], full)


def test_sharded_checkpoint_resumes_exactly_and_the_hf_export_loads(tmp_path: Path, model_dir: str) -> None:
    """A 2-rank ETPO run checkpoints after every batch (one shard file per rank) and exports the
    policy at the end; a run resumed from the checkpoint after batch 2 ends where the continuous
    run ended, bit for bit; ``from_pretrained`` of the export gives the gathered policy."""
    from transformers import AutoModelForCausalLM

    continuous = fit(tmp_path / "a", model_dir, "--devices", "2", "--save", "--export")
    ckpt = tmp_path / "a" / "ckpt" / "epoch=1.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    resumed = fit(tmp_path / "b", model_dir, "--devices", "2", "--ckpt", str(ckpt))
    for a, b in zip(continuous, resumed):
        assert b["start_step"] == 4 and b["batch_steps"] == [4]  # 2 batches x 2 optimizer steps, then batch 3
        assert b["losses"] == a["losses"][-1:]
        for name in NETWORKS["etpo"]:
            assert a["weights"][name].keys() == b["weights"][name].keys()
            for key, value in a["weights"][name].items():
                assert torch.equal(b["weights"][name][key], value), f"{name}.{key}"

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "hf" / "hf-last").state_dict()
    policy = continuous[0]["weights"]["policy"]
    assert exported.keys() == policy.keys()
    for key, value in policy.items():
        assert torch.equal(exported[key], value), key


def test_fsdp2_cpu_config_trains_resumes_and_exports_through_the_cli(tmp_path: Path) -> None:
    """``etpo fit --config configs/fsdp2_cpu.yaml`` on two ranks (rollouts: generation with the
    gathered policy, bootstraps, the KL monitor), on a tiny saved model and the keyword task
    instead of the tiny coder and the sandbox: 2 batches with a sharded checkpoint, then
    ``--ckpt_path`` to a third batch, and the Hugging Face export loads."""
    import os
    import subprocess
    import sys

    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from etpo_lightning.envs.toy import DEFAULT_WORDS
    from helpers import word_tokenizer

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from derive_config import derive_config

    assets = tmp_path / "assets"
    tokenizer = word_tokenizer(DEFAULT_WORDS)
    tokenizer.save_pretrained(assets)
    model = tiny_llama(len(tokenizer), seed=1)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(assets)
    out = tmp_path / "run"
    config = derive_config(root / "configs" / "fsdp2_cpu.yaml", out, max_steps=2, model=str(assets), overrides={
        "data.env": {"class_path": "etpo_lightning.envs.KeywordEnv", "init_args": {"max_steps": 2}},
        "data.num_envs": 2, "data.batch_size": 2, "data.max_new_tokens": 4,
        "trainer.callbacks[ModelCheckpoint].init_args.every_n_train_steps": 2,
        "trainer.callbacks[RolloutRefresh].init_args.every_n_steps": 1,
    })
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def etpo_fit(*args: str) -> None:
        proc = subprocess.run(["etpo", "fit", "--config", str(config), "--trainer.enable_progress_bar=false", *args],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    etpo_fit()
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in last.iterdir()}
    etpo_fit("--trainer.max_steps=3", f"--ckpt_path={last}")
    first, resumed = (pd.read_csv(out / "logs" / f"version_{v}" / "metrics.csv") for v in (0, 1))
    assert first["train/q_loss"].notna().sum() == 2
    # The resumed run trained one more batch, the third: its step and its datamodule's
    # environment steps (4 per collection, two ranks) go on from the checkpoint's.
    q = resumed[resumed["train/q_loss"].notna()]
    assert len(q) == 1 and int(q["epoch"].iloc[0]) == 2
    assert resumed["rollout/env_steps"].dropna().iloc[0] > first["rollout/env_steps"].dropna().max()

    export = out / "checkpoints" / "hf-last"
    loaded = AutoModelForCausalLM.from_pretrained(export)
    assert AutoTokenizer.from_pretrained(export).vocab_size == tokenizer.vocab_size
    initial = model.state_dict()
    moved = [k for k, v in loaded.state_dict().items() if not torch.equal(v, initial[k])]
    assert moved  # the trained policy, not the initial weights


@pytest.mark.parametrize("algo", ["etpo", "ppo", "grpo"])
def test_lora_two_ranks_train_as_one_process(tmp_path: Path, model_dir: str, algo: str) -> None:
    """``lora``: the one peft base sharded once for every adapter view (PPO's value head on
    the decoder a unit of its own). Two ranks give the one-process losses, adapters (ETPO's
    Polyak target included), value head and merged policy to 1e-5 and the same greedy tokens;
    the frozen base stays bit-identical to the checkpoint on every rank; ETPO resumes exactly
    from a sharded checkpoint."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    one = fit(tmp_path / "one", model_dir, "--algo", algo, "--devices", "1", "--lora")
    ranks = fit(tmp_path / "two", model_dir, "--algo", algo, "--devices", "2", "--lora", "--export",
                *(["--save"] if algo == "etpo" else []))
    assert all(r["dtensor"] for r in ranks) and not one[0]["dtensor"]
    adapters = {"etpo": ("policy", "critic", "target_critic"), "ppo": ("policy", "critic"), "grpo": ("policy",)}[algo]
    assert_same_training(one[0], ranks, {"shared_lora", *adapters, "reference"})

    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for run in [one[0], *ranks]:
        shared = run["weights"]["shared_lora"]
        base = {k.replace("peft.base_model.model.", "").replace(".base_layer.", "."): v
                for k, v in shared.items() if ".lora_" not in k}
        assert base.keys() == initial.keys()
        for key, value in base.items():
            assert torch.equal(value, initial[key]), key
        # Every adapter trained (lora_B starts at zero), the target by Polyak.
        for adapter in adapters:
            assert any(f".lora_B.{adapter}." in k and v.abs().sum() > 0 for k, v in shared.items()), adapter
        assert run["weights"]["reference"] == {}
        assert run["inference"].keys() == initial.keys()
        assert any(not torch.equal(run["inference"][k], initial[k]) for k in initial)  # the adapter merged in
    for r in ranks:
        for key, value in one[0]["inference"].items():
            torch.testing.assert_close(r["inference"][key], value, atol=1e-5, rtol=1e-5, msg=key)
        assert torch.equal(r["generated"], one[0]["generated"])
        assert torch.equal(r["generated_at_start"], one[0]["generated_at_start"])
    if algo == "etpo":  # a sharded checkpoint after batch 2 resumes to the same batch 3, bit for bit
        resumed = fit(tmp_path / "resumed", model_dir, "--devices", "2", "--lora",
                      "--ckpt", str(tmp_path / "two" / "ckpt" / "epoch=1.ckpt"))
        for a, b in zip(ranks, resumed):
            assert b["start_step"] == 4 and b["losses"] == a["losses"][-1:]
            for name, state in a["weights"].items():
                for key, value in state.items():
                    assert torch.equal(b["weights"][name][key], value), f"{name}.{key}"
    # The HF export of the sharded run is the merged policy (rank 0 writes what every rank gathered).
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "hf" / "hf-last").state_dict()
    assert exported.keys() == ranks[0]["inference"].keys()
    for key, value in ranks[0]["inference"].items():
        assert torch.equal(exported[key], value), key
