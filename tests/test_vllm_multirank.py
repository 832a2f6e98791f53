"""vLLM rollouts on two CPU ranks (gloo), one engine per rank on the trainer's process group
(skipped where vLLM is not installed: ``pip install torch==2.13.0 -e ".[vllm]"``).

``tests/vllm_multirank_fit.py`` runs the fit in real processes and records, per rank and per
collection, the policy's weights and the sampled transitions; the checks here recompute the
policy's log-probs with Hugging Face, independently of the engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from etpo_lightning.generation.vllm_options import vllm_installed
from helpers import run_ddp_fit, tiny_llama, word_tokenizer

pytestmark = pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (pip install -e '.[vllm]')")

FIT = Path(__file__).with_name("vllm_multirank_fit.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[str, str]:
    """(model_dir, tokenizer_dir): a random Llama with heads of 32 (vLLM's CPU attention has
    no kernel for smaller ones) over the toy task's vocabulary."""
    tokenizer = word_tokenizer(("apple", "river", "stone", "cloud"))
    root = tmp_path_factory.mktemp("vllm_multirank")
    tokenizer.save_pretrained(root / "tok")
    model = tiny_llama(len(tokenizer), seed=3, hidden=128, layers=2)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    return str(root / "model"), str(root / "tok")


@torch.no_grad()
def policy_logprobs(model, state: dict[str, torch.Tensor], prompt: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Each action token's log-probability under ``model`` holding ``state`` (temperature 1)."""
    model.load_state_dict(state)
    logits = model(torch.cat([prompt, action])[None]).logits[0, prompt.numel() - 1:-1].float()
    return logits.log_softmax(-1).gather(1, action[:, None]).squeeze(1)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ranks_sample_with_their_own_engines_and_the_current_weights(assets, tmp_path, strategy):
    """Three batches, one collection before each; under FSDP2 the weights pushed are
    gathered from the shards on every rank (a collective)."""
    from transformers import AutoModelForCausalLM

    run_ddp_fit([str(tmp_path), "--model", assets[0], "--tokenizer", assets[1], "--strategy", strategy], script=FIT)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["rank_seed"] != ranks[1]["rank_seed"]
    model = AutoModelForCausalLM.from_pretrained(assets[0]).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for r in ranks:
        assert len(r["collections"]) == 3
        for c, collection in enumerate(r["collections"]):
            # Training moved the weights pushed before the later collections.
            moved = any(not torch.equal(v, initial[k]) for k, v in collection["policy"].items())
            assert moved == (c > 0), c
            for prompt, action, logp in collection["transitions"]:
                assert action.numel() > 0 and logp.shape == action.shape
                # (a) The behaviour log-probs are this rank's policy's own: ratio 1 on fresh data.
                want = policy_logprobs(model, collection["policy"], prompt, action)
                assert (logp - want).abs().max().item() <= 1e-4, (r["rank"], c)
                if c > 0:
                    # ... the updated policy's, not the initial one's.
                    old = policy_logprobs(model, initial, prompt, action)
                    assert (logp - old).abs().max().item() > 1e-2, (r["rank"], c)
    # (b) The same prompts on both ranks, sampled with the ranks' own seeds: different actions.
    for c in range(3):
        first, second = (r["collections"][c]["transitions"] for r in ranks)
        assert [p.tolist() for p, _, _ in first] == [p.tolist() for p, _, _ in second]
        assert [a.tolist() for _, a, _ in first] != [a.tolist() for _, a, _ in second]
    # (c) The ranks trained one policy: identical before every collection and at the end.
    for c in range(3):
        for k, v in ranks[0]["collections"][c]["policy"].items():
            assert torch.equal(v, ranks[1]["collections"][c]["policy"][k]), (c, k)
    for k, v in ranks[0]["final"].items():
        assert torch.equal(v, ranks[1]["final"][k]), k
    # Each engine was closed at the end of fit, and the trainer's process group still works.
    assert all(r["engine_closed"] for r in ranks)
    assert [r["all_reduce"] for r in ranks] == [3.0, 3.0]
    # ... on which a new engine is built and samples the trained policy.
    for r in ranks:
        prompt, action, logp = r["rebuilt"]
        assert (logp - policy_logprobs(model, r["final"], prompt, action)).abs().max().item() <= 1e-4
