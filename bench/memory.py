"""Memory: what the rollout storage keeps per generated token, and the peak extra memory
of the exact soft-value computation per position, chunked vs unchunked.

1. Storage. A real ``RolloutDataModule`` collection (a random tiny Llama acting in the
   data-science coding environment, or the keyword toy with ``--env keyword``) leaves
   ``Transition`` objects exactly as training samples them: prompt and action token ids
   (int64), the sampling log-probabilities (float32) and three scalars. Their
   ``Transition.nbytes()`` summed over the collection and divided by the number of
   generated (action) tokens is compared with the authors' design, which keeps the
   target critic's Q values, the policy logits and the reference logits over the whole
   vocabulary for every generated token: 3 x |V| x 4 bytes.
2. Soft values. ``etpo_lightning.losses.soft_values`` over N positions with |V| logits,
   for several ``chunk_size`` values and unchunked (chunk = N). The peak of the bytes
   allocated during the call, above what was allocated before it (inputs excluded), is
   read from ``torch.cuda.max_memory_allocated`` on CUDA, and on CPU from the allocation
   and free events of ``torch.profiler`` (``profile_memory=True``), replayed in time
   order. It is compared with the analytic bound 5 x chunk x |V| x 4 bytes of
   ``etpo_lightning/etpo/losses.py``.

Run: ``python bench/memory.py`` (CPU, about a minute); ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import format_table, machine_info, machine_label, set_threads, synchronize, write_results
from etpo_lightning.core.batch import Transition

AUTHORS_TENSORS_PER_TOKEN = 3  # target-critic Q, policy logits, reference logits
FLOAT32_BYTES = 4


# ------------------------------------------------------------------ storage
def _tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained in a second on the environment's own prompts and
    this repository's Python source (what the policy reads and writes)."""
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

    root = Path(__file__).resolve().parents[1] / "etpo_lightning"
    texts = [p.read_text() for p in sorted(root.rglob("*.py"))]
    return train_tokenizer(texts, vocab_size=vocab_size)


def _env(kind: str):
    from etpo_lightning.envs import DataScienceCodingEnv, KeywordEnv, SklearnDataset

    if kind == "datascience":
        return DataScienceCodingEnv(SklearnDataset("breast_cancer"), max_steps=3, timeout_s=20.0)
    return KeywordEnv()


def collect_transitions(env_kind: str, num_envs: int, rollout_steps: int, max_new_tokens: int,
                        max_prompt_tokens: int, vocab_size: int, seed: int) -> list[Transition]:
    """One real collection of ``RolloutDataModule`` with a random-init tiny Llama policy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from etpo_lightning.datamodules.rollout import RolloutDataModule
    from etpo_lightning.etpo.module import ETPOModule

    tokenizer = _tokenizer(vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    module = ETPOModule(policy=LlamaForCausalLM(config))
    dm = RolloutDataModule(_env(env_kind), tokenizer=tokenizer, num_envs=num_envs, rollout_steps=rollout_steps,
                           batch_size=1, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                           seed=seed)
    dm.setup("fit")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # prompt truncation and sandbox notices
            return dm.collect(module)
    finally:
        dm.teardown("fit")  # closes the environments' copies
        dm.env.close()


def storage_table(transitions: list[Transition], vocab_sizes: list[int]) -> dict:
    stored = sum(t.nbytes() for t in transitions)
    action_tokens = sum(t.action_ids.numel() for t in transitions)
    prompt_tokens = sum(t.prompt_ids.numel() for t in transitions)
    ours = stored / action_tokens
    # Per generated token: its id (int64) and its log-prob (float32); the rest is the
    # observation's ids and three scalars per transition, amortised over its action.
    action_only = sum(t.action_ids.numel() * t.action_ids.element_size() + t.logprobs.numel() * t.logprobs.element_size()
                      for t in transitions) / action_tokens
    rows = []
    for v in vocab_sizes:
        authors = AUTHORS_TENSORS_PER_TOKEN * v * FLOAT32_BYTES
        rows.append({"vocab_size": v, "authors_bytes_per_token": authors, "ours_bytes_per_token": ours,
                     "ours_action_only_bytes_per_token": action_only, "ratio": authors / ours})
    return {"transitions": len(transitions), "action_tokens": action_tokens, "prompt_tokens": prompt_tokens,
            "stored_bytes": stored, "rows": rows}


# -------------------------------------------------------------- soft values
def _peak_bytes_cpu(fn) -> int:
    """Peak of (allocated - freed) bytes during ``fn()``, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _peak_bytes_cuda(fn, device: str) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def soft_value_table(positions: int, vocab_sizes: list[int], chunk_sizes: list[int], device: str) -> list[dict]:
    from etpo_lightning.losses import soft_values

    rows = []
    for v in vocab_sizes:
        g = torch.Generator(device=device).manual_seed(0)
        q, pi, rho = (torch.randn(positions, v, generator=g, device=device) for _ in range(3))
        for chunk in sorted(set(min(c, positions) for c in chunk_sizes + [positions])):
            def run() -> None:
                with torch.no_grad():
                    soft_values(q, pi, rho, 0.01, chunk)

            run()  # warm-up: first-call allocations are not the computation's
            gc.collect()
            peak = _peak_bytes_cuda(run, device) if device.startswith("cuda") else _peak_bytes_cpu(run)
            per_chunk = min(chunk, positions)
            bound = 5 * per_chunk * v * FLOAT32_BYTES
            rows.append({"vocab_size": v, "positions": positions, "chunk_size": chunk,
                         "chunked": chunk < positions, "peak_extra_bytes": peak,
                         "peak_extra_bytes_per_chunk_position": peak / per_chunk,
                         "peak_extra_bytes_per_position": peak / positions,
                         "analytic_bound_bytes": bound, "measured_over_bound": peak / bound})
        del q, pi, rho
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32016, 1024])
    parser.add_argument("--positions", type=int, default=2048, help="positions N of the soft-value benchmark")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--env", choices=["datascience", "keyword"], default="datascience")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--rollout-steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--tokenizer-vocab", type=int, default=1024, help="vocabulary of the rollout's tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/memory.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine_info(args.device)

    transitions = collect_transitions(args.env, args.num_envs, args.rollout_steps, args.max_new_tokens,
                                      args.max_prompt_tokens, args.tokenizer_vocab, args.seed)
    storage = storage_table(transitions, args.vocab_sizes)
    print(f"\nRollout storage per generated token ({storage['transitions']} transitions of a real "
          f"{args.env} collection: {storage['action_tokens']} action tokens, {storage['prompt_tokens']} prompt tokens)\n")
    print(format_table(
        ["|V|", "authors: 3 x |V| x 4 B", "ours (ids + log-probs + scalars)", "ours, action tokens only", "ratio"],
        [[r["vocab_size"], f"{r['authors_bytes_per_token']:,} B", f"{r['ours_bytes_per_token']:.1f} B",
          f"{r['ours_action_only_bytes_per_token']:.1f} B", f"{r['ratio']:,.0f}x"] for r in storage["rows"]]))

    soft = soft_value_table(args.positions, args.vocab_sizes, args.chunk_sizes, args.device)
    method = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "torch.profiler memory events"
    print(f"\nPeak extra memory of soft_values over N={args.positions} positions ({method}; {machine_label(info)})\n")
    print(format_table(
        ["|V|", "chunk", "peak extra", "per position in a chunk", "per position of N", "bound 5 x chunk x |V| x 4", "measured / bound"],
        [[r["vocab_size"], r["chunk_size"] if r["chunked"] else f"none ({r['chunk_size']})",
          f"{r['peak_extra_bytes'] / 2**20:,.1f} MiB", f"{r['peak_extra_bytes_per_chunk_position'] / 1024:,.1f} KiB",
          f"{r['peak_extra_bytes_per_position'] / 1024:,.2f} KiB", f"{r['analytic_bound_bytes'] / 2**20:,.1f} MiB",
          f"{r['measured_over_bound']:.3f}"] for r in soft]))

    data = {"storage": storage, "soft_values": {"method": method, "rows": soft}}
    if not args.no_write:
        path = write_results("memory", data, info, "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"\nwrote {path}")
    return data


if __name__ == "__main__":
    main()
