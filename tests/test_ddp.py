"""Two-process CPU DDP (gloo) on the toy environment, and checkpoints that cross world sizes.

ETPO:
1. one device: 1 batch, checkpoint A;
2. DDP, 2 ranks (``tests/ddp_fit.py`` in a subprocess): resume from A to 3 batches, checkpoint B;
3. one device again: resume from B to 4 batches.

GRPO: a 2-rank fit with grouped rollouts (G copies of each task per group), then its
checkpoint on one device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ddp_fit
from etpo_lightning.envs.toy import DEFAULT_WORDS
from helpers import run_ddp_fit, save_tiny_assets, word_tokenizer

NETWORKS = ("policy", "critic", "target_critic", "reference")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A saved tokenizer and tiny Llama, loaded by path in every process (configure_model path)."""
    return save_tiny_assets(tmp_path_factory.mktemp("assets"), word_tokenizer(DEFAULT_WORDS))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_ranks_and_checkpoints_across_world_sizes(tmp_path: Path, assets: tuple[str, str]) -> None:
    model_dir, tok_dir = assets
    torch.manual_seed(0)

    # 1. One device, one batch.
    single, dm = ddp_fit.build(model_dir, tok_dir)
    ddp_fit.trainer(tmp_path / "single", 1, ddp_fit.Record()).fit(single, datamodule=dm)
    ckpt_a = tmp_path / "single" / "ckpt" / "last.ckpt"
    saved_a = torch.load(ckpt_a, weights_only=False)
    assert len(saved_a["rng_states"]) == 1

    # 2. DDP, resuming from the single-device checkpoint.
    out = tmp_path / "ddp"
    run_ddp_fit([str(out), "--model", model_dir, "--tokenizer", tok_dir, "--ckpt", str(ckpt_a), "--max-steps", "3"])
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # The single-device checkpoint loaded on both ranks: same weights, same step.
    for r in ranks:
        assert r["start"]["global_step"] == 2  # 1 batch x 2 optimizer steps
        assert _equal(r["start"]["policy"], _state(single.policy))
    # Rank 0 continues the saved RNG stream; rank 1 (absent from the checkpoint) is re-seeded.
    assert ranks[0]["start"]["python_rng"] == saved_a["rng_states"][0]["python"]
    assert ranks[1]["start"]["python_rng"] != ranks[0]["start"]["python_rng"]

    # Each rank ran its own environments on different data ...
    assert (ranks[0]["rank_seed"], ranks[1]["rank_seed"]) == (0, 1000)
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == 2
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # ... yet all four networks are identical across ranks: gradients were averaged, and
    # the Polyak target and the frozen reference followed identical updates.
    for name in NETWORKS:
        assert _equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    # Training did something: the policy and critic moved, the target followed, rho did not.
    start = ranks[0]["start"]["policy"]
    assert not _equal(ranks[0]["final"]["policy"], start)
    assert not _equal(ranks[0]["final"]["critic"], _state(single.critic))
    assert not _equal(ranks[0]["final"]["target_critic"], _state(single.target_critic))
    assert _equal(ranks[0]["final"]["reference"], _state(single.reference))

    # 3. The DDP checkpoint on one device.
    ckpt_b = out / "ckpt" / "last.ckpt"
    saved_b = torch.load(ckpt_b, weights_only=False)
    assert len(saved_b["rng_states"]) == 2  # both ranks' RNG states were gathered
    resumed, dm = ddp_fit.build(model_dir, tok_dir)
    record = ddp_fit.Record()
    ddp_fit.trainer(tmp_path / "resumed", 4, record).fit(resumed, datamodule=dm, ckpt_path=str(ckpt_b),
                                                        weights_only=False)
    assert record.start["global_step"] == 6
    assert _equal(record.start["policy"], ranks[0]["final"]["policy"])
    assert record.start["python_rng"] == saved_b["rng_states"][0]["python"]  # continues as rank 0
    assert len(record.losses) == 1 and not _equal(_state(resumed.policy), ranks[0]["final"]["policy"])


def test_grpo_ddp_two_ranks_with_grouped_rollouts(tmp_path: Path, assets: tuple[str, str]) -> None:
    """GRPOModule under 2-rank DDP: each rank runs whole groups of G copies of its own tasks,
    gradients are averaged, and the checkpoint loads on one device."""
    from etpo_lightning import GRPOModule

    model_dir, tok_dir = assets
    group_size, out = 2, tmp_path / "ddp"
    run_ddp_fit([str(out), "--model", model_dir, "--tokenizer", tok_dir, "--algo", "grpo",
                 "--group-size", str(group_size), "--max-steps", "3"])
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    initial, _ = ddp_fit.build(model_dir, tok_dir, algo="grpo", group_size=group_size)
    initial.configure_model()
    initial_policy = _state(initial.policy)

    # Each rank ran its own environments: different seeds, different tasks and groups.
    assert (ranks[0]["rank_seed"], ranks[1]["rank_seed"]) == (0, 1000)
    firsts = []
    for r in ranks:
        by_episode: dict[tuple[int, int], list[dict]] = {}
        for t in r["released"]:
            by_episode.setdefault((t["group_id"], t["group_member"]), []).append(t)
        group_ids = {g for g, _ in by_episode}
        assert group_ids == set(range(r["groups_completed"])) and len(group_ids) >= 3
        for gid in group_ids:
            # Groups are never split: all G episodes of a group ran on this rank ...
            members = [by_episode.get((gid, m)) for m in range(group_size)]
            assert all(members) and len(by_episode) == group_size * len(group_ids)
            # ... from the same task (first observation), each to its end, with the group's returns.
            assert len({tuple(steps[0]["prompt"]) for steps in members}) == 1
            for m, steps in enumerate(members):
                assert steps[-1]["done"] and not any(s["done"] for s in steps[:-1])
                assert all(s["group_returns"] == steps[0]["group_returns"] for s in steps)
                assert steps[0]["group_returns"][m] == pytest.approx(sum(s["reward"] for s in steps))
        firsts.append({tuple(by_episode[(gid, 0)][0]["prompt"]) for gid in group_ids})
        # Training batches only hold rows of completed groups of this rank.
        for batch in r["batches"]:
            assert set(batch["group_ids"]) <= group_ids and set(batch["group_members"]) <= set(range(group_size))
    assert firsts[0] != firsts[1]
    # Not vacuous: groups completed in different collections on the two ranks (multi-step
    # episodes of different lengths), yet both ranks logged the same rollout statistics.
    assert ranks[0]["released_per_collection"] != ranks[1]["released_per_collection"]
    assert [b["stats_keys"] for b in ranks[0]["batches"]] == [b["stats_keys"] for b in ranks[1]["batches"]]
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"]) == 3
    assert ranks[0]["losses"] != ranks[1]["losses"]

    # Averaged gradients: bit-identical policies on both ranks, moved from the initial
    # weights; the reference is the initial policy on both. No critic anywhere.
    assert set(ranks[0]["final"]) == {"policy", "reference"}
    for name in ("policy", "reference"):
        assert _equal(ranks[0]["final"][name], ranks[1]["final"][name]), name
    assert _equal(ranks[0]["start"]["policy"], initial_policy)
    assert not _equal(ranks[0]["final"]["policy"], initial_policy)
    assert _equal(ranks[0]["final"]["reference"], initial_policy)

    # The DDP checkpoint on one device: loaded for inference, and resumed for one batch.
    ckpt = out / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["rng_states"]) == 2 and len(saved["optimizer_states"]) == 1
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"policy", "reference"}
    loaded = GRPOModule.load_from_checkpoint(ckpt, weights_only=False)
    assert _equal(_state(loaded.policy), ranks[0]["final"]["policy"])
    assert _equal(_state(loaded.reference), ranks[0]["final"]["reference"])
    resumed, dm = ddp_fit.build(model_dir, tok_dir, algo="grpo", group_size=group_size)
    record = ddp_fit.Record(loss_key="train/policy_loss")
    ddp_fit.trainer(tmp_path / "resumed", 4, record).fit(resumed, datamodule=dm, ckpt_path=str(ckpt),
                                                        weights_only=False)
    assert record.start["global_step"] == 3  # one optimizer step per batch
    assert _equal(record.start["policy"], ranks[0]["final"]["policy"])
    assert record.start["python_rng"] == saved["rng_states"][0]["python"]  # continues as rank 0
    assert len(record.losses) == 1


def test_ddp_rollout_and_monitor_statistics_are_reduced_across_ranks(tmp_path: Path, assets: tuple[str, str]) -> None:
    """Two ranks see different rewards (``SeededRewardEnv``); what they log is the statistic
    over both ranks' samples: max of maxima, min of minima, means weighted by counts, summed
    counters; the KL monitor's KL is the token-weighted mean, so beta adapts alike on both.

    Checked against each rank's own raw records (its rewards, its local KL and token count).
    Fails on averaging the ranks' values (the default ``sync_dist`` reduction): the ranks'
    reward maxima differ, so their mean is not the maximum."""
    model_dir, tok_dir = assets
    out = tmp_path / "stats"
    run_ddp_fit([str(out), "--model", model_dir, "--tokenizer", tok_dir, "--max-steps", "3", "--env", "seeded",
                 "--monitor"])
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False)["steps"] for r in (0, 1))
    assert len(r0) == len(r1) == 3
    # The test can tell a max from a mean: the ranks' own maxima and minima differ.
    assert any(max(a["rewards"]) != max(b["rewards"]) for a, b in zip(r0, r1))
    assert any(min(a["rewards"]) != min(b["rewards"]) for a, b in zip(r0, r1))
    seen: list[float] = []
    beta = 0.1
    for a, b in zip(r0, r1):
        both = a["rewards"] + b["rewards"]
        seen += both
        kl = (a["local_kl"] * a["tokens"] + b["local_kl"] * b["tokens"]) / (a["tokens"] + b["tokens"])
        want = {
            "rollout/reward_max": max(both),
            "rollout/reward_min": min(both),
            "rollout/reward_mean": sum(both) / len(both),
            "rollout/best_reward": max(seen),
            "rollout/success_rate": sum(r > 0.5 for r in both) / len(both),
            "rollout/env_steps": a["env_steps"] + b["env_steps"],
            "monitor/kl": kl,
        }
        for rank in (a, b):
            for key, value in want.items():
                assert rank["logged"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        # adapt_beta from the global KL: beta * (1 + 0.5 * clip(KL / 1e-6 - 1, -0.2, 0.2)).
        beta *= 1 + 0.5 * max(-0.2, min(0.2, kl / 1e-6 - 1))
        assert a["beta"] == b["beta"] == pytest.approx(beta, rel=1e-9)
        assert a["logged"]["monitor/beta"] == b["logged"]["monitor/beta"] == pytest.approx(beta, rel=1e-6)


def _grads(seed: int, size: int = 10) -> list[torch.Tensor]:
    return [torch.randn(size, generator=torch.Generator().manual_seed(seed + i)) * 3 for i in range(3)]


def _params_with(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def test_sharded_clip_grad_norm_matches_unsharded_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FSDP clipping path, with the all-reduce of a two-rank group simulated.

    FSDP cannot run on CPU, and two real processes cost ~20 s of imports; the collective is
    a plain sum, so rank 0 is run with an all-reduce that adds rank 1's contribution.
    """
    import torch.distributed as dist

    from etpo_lightning.core.distributed import sharded_clip_grad_norm_

    full = _params_with(_grads(0))
    want_norm = float(torch.nn.utils.clip_grad_norm_(full, 1.0))
    assert want_norm > 1.0  # clipping is active
    halves = [[g.grad[:5] for g in _params_with(_grads(0))], [g.grad[5:] for g in _params_with(_grads(0))]]

    def run_rank(rank: int, grads: list[torch.Tensor], other: list[torch.Tensor], replicas: int):
        other_sumsq = sum(float(g.pow(2).sum()) for g in other)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(other_sumsq))
        params = _params_with(grads)
        return float(sharded_clip_grad_norm_(params, 1.0, replicas=replicas)), [p.grad for p in params]

    # FULL_SHARD: each rank holds half of every gradient.
    norm0, shard0 = run_rank(0, halves[0], halves[1], replicas=1)
    norm1, shard1 = run_rank(1, halves[1], halves[0], replicas=1)
    assert norm0 == norm1 == pytest.approx(want_norm, rel=1e-6)
    for a, b, p in zip(shard0, shard1, full):
        torch.testing.assert_close(torch.cat([a, b]), p.grad)
    # NO_SHARD: both ranks hold everything; the sum counts every element twice.
    whole = [p.grad for p in _params_with(_grads(0))]
    norm, clipped = run_rank(0, whole, whole, replicas=2)
    assert norm == pytest.approx(want_norm, rel=1e-6)
    for a, p in zip(clipped, full):
        torch.testing.assert_close(a, p.grad)


def test_reduce_across_ranks_weights_means_by_counts_and_skips_empty_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reduction with a two-rank all-gather simulated: rank 1's row is captured from its own
    call, then served to rank 0. Means over different counts are weighted (3.25, not the 2.5 of
    averaging the ranks' means); a rank without samples (NaN, weight 0) does not count."""
    import torch.distributed as dist

    from etpo_lightning.core.rank_stats import Reduce, reduce_across_ranks

    how0 = {"len": Reduce("mean", 0), "r": Reduce("mean", 1), "hi": Reduce("max"), "lo": Reduce("min"),
            "n": Reduce("sum")}
    how1 = {"len": Reduce("mean", 2), "r": Reduce("mean", 3), "hi": Reduce("max"), "lo": Reduce("min"),
            "n": Reduce("sum")}
    rank0 = {"len": float("nan"), "r": 1.0, "hi": float("nan"), "lo": -2.0, "n": 5.0}
    rank1 = {"len": 3.0, "r": 4.0, "hi": 0.5, "lo": 1.0, "n": 7.0}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    rows: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "all_gather", lambda out, t: (rows.append(t.clone()), out[0].copy_(t), out[1].copy_(t)))
    reduce_across_ranks(rank1, how1)  # records rank 1's row
    monkeypatch.setattr(dist, "all_gather", lambda out, t: (out[0].copy_(t), out[1].copy_(rows[0])))
    got = reduce_across_ranks(rank0, how0)
    assert got == {"len": 3.0, "r": pytest.approx((1.0 * 1 + 4.0 * 3) / 4), "hi": 0.5, "lo": -2.0, "n": 12.0}
    # Ranks logging different keys (as many of them) is an error, not a silent mix.
    with pytest.raises(RuntimeError, match="different statistics"):
        reduce_across_ranks({k: 1.0 for k in "abcde"}, {})
