"""How much probability a trained policy moves onto tokens the base model finds unlikely.

    python bench/tail_mass.py --run "ETPO(lambda=0.9)=runs/bench_learning/etpo_lam0.9" --run "PPO=runs/bench_learning/ppo"

For each seed's checkpoint (and the base model), samples programs from the quickstart prompt with
the policy itself (temperature 1, the evaluation's sampling) and, at every generated position,
measures the mass pi puts on tokens with rho(w) < threshold against rho's own mass there, and how
often such a token is actually sampled. A test of one explanation of failing programs: a
full-vocabulary Boltzmann target rho * exp(Q / beta) lifting the tail where the critic has never
seen a sample. Writes bench/results/tail_mass.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from learning_compare import parse_runs, seed_dirs  # noqa: E402


@torch.no_grad()
def tail_stats(policy, reference, prompt_ids: torch.Tensor, eos_id: int, pad_id: int, samples: int,
               threshold: float, seed: int) -> dict:
    torch.manual_seed(seed)
    n_prompt = prompt_ids.shape[1]
    out = policy.generate(input_ids=prompt_ids.expand(samples, -1), attention_mask=torch.ones_like(prompt_ids).expand(samples, -1),
                          do_sample=True, temperature=1.0, top_k=None, top_p=1.0, max_new_tokens=160,
                          pad_token_id=pad_id, eos_token_id=eos_id)
    log_pi = policy(out).logits[:, n_prompt - 1:-1].float().log_softmax(-1)
    log_rho = reference(out).logits[:, n_prompt - 1:-1].float().log_softmax(-1)
    generated = out[:, n_prompt:]
    # Positions up to and including the first EOS (generate pads finished rows after it).
    eos_seen = (generated == eos_id).int().cumsum(1)
    valid = (eos_seen == 0) | ((eos_seen == 1) & (generated == eos_id))
    tail = log_rho.exp() < threshold
    pi_tail = (log_pi.exp() * tail).sum(-1)[valid].mean().item()
    rho_tail = (log_rho.exp() * tail).sum(-1)[valid].mean().item()
    sampled_tail = (log_rho.gather(-1, generated[..., None]).squeeze(-1).exp() < threshold)[valid]
    kl = (log_pi.exp() * (log_pi - log_rho)).sum(-1)[valid].mean().item()
    return {"pi_tail_mass": pi_tail, "rho_tail_mass": rho_tail, "ratio": pi_tail / rho_tail,
            "tail_tokens_sampled_per_program": sampled_tail.float().sum().item() / samples,
            "tokens_per_program": valid.float().sum().item() / samples, "kl": kl}


def main(argv: list[str] | None = None) -> dict:
    from etpo_lightning.cli.evaluate import make_dataset
    from etpo_lightning.core.models import load_causal_lm, load_tokenizer, resolve_model_path
    from etpo_lightning.envs import DataScienceCodingEnv

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="a label and a bench/learning.py --out folder (repeat)")
    parser.add_argument("--base", default="tiny-sklearn-coder", help="the base model (rho)")
    parser.add_argument("--checkpoint", default="hf-last")
    parser.add_argument("--samples", type=int, default=48, help="programs sampled per model")
    parser.add_argument("--threshold", type=float, default=1e-3, help="a token is in the tail when rho(w) < this")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed, the same for every model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    base = resolve_model_path(args.base)
    reference, tokenizer = load_causal_lm(base).eval(), load_tokenizer(base)
    env = DataScienceCodingEnv(dataset=make_dataset("quickstart"), timeout_s=10, max_steps=1)
    prompt_ids = tokenizer(env.reset(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    env.close()

    def measure(policy) -> dict:
        return tail_stats(policy, reference, prompt_ids, tokenizer.eos_token_id, tokenizer.pad_token_id,
                          args.samples, args.threshold, args.seed)

    results = {"base": measure(reference)}
    print(f"base: ratio {results['base']['ratio']:.2f}", flush=True)
    lines = [f"Tail: tokens with rho < {args.threshold:g}; {args.samples} programs per model sampled by the model "
             f"itself (seed {args.seed}), {args.checkpoint}.", "",
             "| agent | seeds | pi's tail mass / rho's | tail tokens sampled per program | KL(pi ‖ rho) per token |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| base | | {results['base']['ratio']:.2f} | {results['base']['tail_tokens_sampled_per_program']:.2f} | 0 |"]
    for label, run_dir in parse_runs(args.run).items():
        per_seed = [measure(load_causal_lm(str(d / "checkpoints" / args.checkpoint)).eval()) for d in seed_dirs(run_dir)]
        results[label] = per_seed

        def span(key: str) -> str:
            values = [r[key] for r in per_seed]
            return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

        lines.append(f"| {label} | {len(per_seed)} | {span('ratio')} | {span('tail_tokens_sampled_per_program')} | "
                     f"{span('kl')} |")
        print(lines[-1], flush=True)
    out = {"args": vars(args), "results": results, "table": "\n".join(lines)}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tail_mass.json").write_text(json.dumps(out, indent=2))
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
