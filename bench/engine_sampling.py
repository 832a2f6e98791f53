"""Do ``generate`` and vLLM sample the same distribution? The shipped tiny coder, the
quickstart's first prompt, ``--samples`` actions from each engine at the quickstart's sampling
settings (temperature 1, up to 128 new tokens).

    .venv-vllm/bin/python bench/engine_sampling.py --samples 512

Per engine: action length (mean ± std), the fraction that ends with EOS, the mean summed
log-probability of an action as the engine reports it and, for the first 64 actions, as the
policy computes it itself (the two agree when the engine's behaviour log-probs are the
policy's). Writes ``bench/results/engine_sampling.json``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import machine_info, write_results


@torch.no_grad()
def own_logprob(policy, prompt: torch.Tensor, action: torch.Tensor) -> float:
    """The policy's summed log-probability of ``action`` after ``prompt`` (temperature 1)."""
    from etpo_lightning.core.functional import token_logprobs

    logits = policy(torch.cat([prompt, action])[None]).logits[:, prompt.numel() - 1:-1]
    return token_logprobs(logits, action[None]).sum().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    from etpo_lightning import ETPOModule
    from etpo_lightning.core.generation import Sampling
    from etpo_lightning.core.models import load_tokenizer, resolve_model_path
    from etpo_lightning.envs import DataScienceCodingEnv, SyntheticDataset
    from etpo_lightning.generation.hf import HFGenerate
    from etpo_lightning.generation.vllm import VLLMEngine, VLLMOptions

    path = resolve_model_path("tiny-sklearn-coder")
    tokenizer = load_tokenizer(path)
    module = ETPOModule(model_name_or_path=path, beta=0.1, gamma=0.99, policy_lr=1e-4, critic_lr=1e-4)
    module.configure_model()
    observation = DataScienceCodingEnv(dataset=SyntheticDataset(kind="quickstart"), max_steps=3).reset(seed=0)
    prompt = torch.tensor(tokenizer(observation, add_special_tokens=False)["input_ids"])
    sampling = Sampling(max_new_tokens=128, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        batch_size=16, seed=args.seed)
    policy = module.policy.eval()
    results = {}
    for name, engine in (("generate", HFGenerate()), ("vllm", VLLMEngine(VLLMOptions(kv_cache_gib=0.5), 1024))):
        torch.manual_seed(args.seed)
        try:
            engine.load_weights(module)
            out = engine.sample(module, [prompt] * args.samples, sampling)
        finally:
            engine.close()
        lengths = [a.numel() for a in out.actions]
        reported = [lp.sum().item() for lp in out.logprobs]
        own = [own_logprob(policy, prompt, a) for a in out.actions[:64]]
        results[name] = {
            "length_mean": statistics.mean(lengths), "length_std": statistics.stdev(lengths),
            "eos_fraction": statistics.mean(float(a[-1] == tokenizer.eos_token_id) for a in out.actions),
            "action_logprob_mean": statistics.mean(reported),
            "action_logprob_std": statistics.stdev(reported),
            "first_64_reported": statistics.mean(reported[:64]), "first_64_policy": statistics.mean(own),
        }
        r = results[name]
        print(f"{name:<9} length {r['length_mean']:.1f} ± {r['length_std']:.1f}, EOS {r['eos_fraction']:.3f}, "
              f"action log-prob {r['action_logprob_mean']:.2f} ± {r['action_logprob_std']:.2f} "
              f"(first 64: engine {r['first_64_reported']:.3f}, policy {r['first_64_policy']:.3f})", flush=True)
    data = {"samples": args.samples, "prompt_tokens": prompt.numel(), "results": results}
    write_results("engine_sampling", data, machine_info(),
                  f"python bench/engine_sampling.py --samples {args.samples} --seed {args.seed}")
    return data


if __name__ == "__main__":
    main()
