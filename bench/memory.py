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
3. One ETPO training step against prompt length (``--sections step``): the peak activation
   memory of one whole step as the quickstart runs it (ETPO(lambda = 0.9), dueling critic:
   policy, critic, target-critic and reference forwards, the fresh bootstraps V(s') on the
   next observations, one backward, clipping, both optimizer steps, the Polyak update), on
   a small random Llama with a 32,016-token vocabulary (CodeLlama's), for prompts of 128 to
   2,048 tokens and a 64-token action. Measured as the peak of the bytes torch allocates
   during the second step above what was live when it started (weights, gradients and Adam
   state, reported apart): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
   profiler's allocation/free events replayed in time order, as in 2. Why not the RSS:
   ``ru_maxrss`` is a once-per-process high-water mark that also counts the Python heap,
   model construction and glibc's cached free blocks, so it measures the allocator, not
   the step; the profiler sees every tensor byte torch's CPU allocator hands out and gets
   back, and section 2 checks it against an analytic bound (measured/bound 1.000).
   ``--label before`` / ``--label after`` keep two code versions apart
   (``bench/results/memory_prompt_<label>.json``, with the git commit measured); the table
   shows every label measured so far side by side.

Run: ``python bench/memory.py`` (CPU, a few minutes); ``--device cuda`` on a GPU;
``python bench/memory.py --sections step --label after`` for the step table alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import RESULTS_DIR, format_table, machine_info, machine_label, set_threads, synchronize, write_results
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


# ------------------------------------------------- one ETPO step vs prompt length
def small_llama(vocab_size: int, seed: int = 0):
    """A random-init small Llama (hidden 128, 2 layers) with CodeLlama's vocabulary size:
    the memory that depends on the prompt is the vocabulary's, not the depth's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def step_batch(batch: int, prompt_tokens: int, action_tokens: int, vocab_size: int, seed: int = 0):
    """``batch`` transitions with prompts of exactly ``prompt_tokens``, actions of
    ``action_tokens`` (the odd rows 3/4 as long), behaviour log-probs; the even rows are
    truncated (a next observation of ``prompt_tokens`` to bootstrap from), the odd ones terminated."""
    from etpo_lightning.core.batch import TransitionBatch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        a = action_tokens if i % 2 == 0 else max(1, 3 * action_tokens // 4)
        nxt = torch.empty(0, dtype=torch.long) if i % 2 else torch.randint(3, vocab_size, (prompt_tokens,), generator=g)
        rows.append(Transition(torch.randint(3, vocab_size, (prompt_tokens,), generator=g),
                               torch.randint(3, vocab_size, (a,), generator=g), reward=1.0,
                               terminated=bool(i % 2), truncated=not i % 2, logprobs=-torch.rand(a, generator=g),
                               next_prompt_ids=nxt))
    return TransitionBatch.collate(rows, pad_token_id=0)


def _state_bytes(module, optimizers) -> int:
    """Weights (four networks), gradients and optimizer state: what is live between steps."""
    params = {id(p): p for p in module.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    total += sum(p.grad.numel() * p.grad.element_size() for p in params.values() if p.grad is not None)
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def etpo_step_memory(prompt_tokens: int, vocab_size: int, batch: int, action_tokens: int, device: str) -> dict:
    """Peak bytes allocated during one ETPO training step above those live before it."""
    from etpo_lightning.etpo.module import ETPOModule

    module = ETPOModule(policy=small_llama(vocab_size), beta=0.1, gamma=0.99, lam=0.9, tau=0.5,
                        critic_head_init="dueling", critic_advantage_scale=0.1).to(device)
    optimizers = module.configure_optimizers()
    data = step_batch(batch, prompt_tokens, action_tokens, vocab_size).to(device)

    def step() -> None:
        # TokenRLModule.training_step without Lightning's loop around it.
        out = module.compute_losses(data)
        loss = out["q_loss"] + out["policy_loss"]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in reversed(optimizers):
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
        module.after_optimizer_steps()

    step()  # the first step creates the gradients and Adam's state
    gc.collect()
    start = time.perf_counter()
    peak = _peak_bytes_cuda(step, device) if device.startswith("cuda") else _peak_bytes_cpu(step)
    seconds = time.perf_counter() - start
    positions = int(data.prompt_ids.shape[1] + data.action_ids.shape[1] - 1)
    return {"prompt_tokens": prompt_tokens, "action_tokens": action_tokens, "batch": batch,
            "vocab_size": vocab_size, "input_positions": positions,
            "scored_positions": int(data.action_ids.shape[1]), "peak_step_bytes": peak,
            "state_bytes": _state_bytes(module, optimizers), "step_seconds_profiled": seconds,
            "logits_bytes_all_positions": batch * positions * vocab_size * FLOAT32_BYTES}


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "etpo_lightning"],
                               capture_output=True, text=True, check=True)
        return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step_table(prompt_lengths: list[int], vocab_size: int, batch: int, action_tokens: int, device: str,
               label: str, info: dict, write: bool) -> dict:
    commit = _git_commit()  # before measuring: the code imported is the code of this moment
    rows = []
    for p in prompt_lengths:
        rows.append(etpo_step_memory(p, vocab_size, batch, action_tokens, device))
        print(f"  prompt {p}: peak {rows[-1]['peak_step_bytes'] / 2**20:,.0f} MiB", flush=True)
        gc.collect()
    result = {"label": label, "commit": commit, "machine": info, "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if write:
        (RESULTS_DIR / f"memory_prompt_{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    labels = {label: result}
    for path in sorted(RESULTS_DIR.glob("memory_prompt_*.json")):
        other = json.loads(path.read_text())
        labels.setdefault(other["label"], other)
    order = sorted(labels, key=lambda k: (k != "before", k != "after", k))
    by_prompt = {lab: {r["prompt_tokens"]: r for r in labels[lab]["rows"]} for lab in order}
    headers = ["prompt tokens", "positions (scored)"] + [f"peak, {lab} ({labels[lab]['commit'][:8]})" for lab in order]
    if "before" in by_prompt and len(order) > 1:
        headers += [f"{lab} / before" for lab in order if lab != "before"]
    table = []
    for p in prompt_lengths:
        r = rows[prompt_lengths.index(p)]
        line = [p, f"{r['input_positions']:,} ({r['scored_positions']})"]
        line += [f"{by_prompt[lab][p]['peak_step_bytes'] / 2**20:,.0f} MiB" if p in by_prompt[lab] else "-" for lab in order]
        if "before" in by_prompt and len(order) > 1:
            line += [f"{by_prompt[lab][p]['peak_step_bytes'] / by_prompt['before'][p]['peak_step_bytes']:.2f}"
                     if p in by_prompt[lab] and p in by_prompt["before"] else "-" for lab in order if lab != "before"]
        table.append(line)
    r0 = rows[0]
    print(f"\nPeak activation memory of one ETPO(lambda=0.9) training step, dueling critic, batch {batch}, "
          f"{action_tokens}-token actions, |V| = {vocab_size:,} (weights + gradients + Adam state, "
          f"{r0['state_bytes'] / 2**20:,.0f} MiB, not included; {machine_label(info)})\n")
    print(format_table(headers, table))
    return {"vocab_size": vocab_size, "batch": batch, "action_tokens": action_tokens,
            "labels": {lab: labels[lab] for lab in order}}


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
    parser.add_argument("--sections", nargs="+", choices=["storage", "soft_values", "step"],
                        default=["storage", "soft_values", "step"])
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--step-vocab", type=int, default=32016, help="vocabulary of the training-step benchmark")
    parser.add_argument("--step-batch", type=int, default=2)
    parser.add_argument("--step-action-tokens", type=int, default=64)
    parser.add_argument("--label", default="after", help="name of the code version measured by the step section")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/memory.json")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine_info(args.device)
    data: dict = {}
    if "step" in args.sections:
        data["etpo_step"] = step_table(args.prompt_lengths, args.step_vocab, args.step_batch, args.step_action_tokens,
                                       args.device, args.label, info, not args.no_write)
    if "storage" in args.sections:
        data["storage"] = storage_section(args)
    if "soft_values" in args.sections:
        data["soft_values"] = soft_value_section(args, info)
    if not args.no_write:
        path = RESULTS_DIR / "memory.json"
        if path.exists():  # keep the sections not run this time, each with the run that measured it
            old = json.loads(path.read_text())
            kept = {}
            for key in ("storage", "soft_values", "etpo_step"):
                if key in old and key not in data:
                    measured = {k: old[k] for k in ("machine", "command", "date") if k in old}
                    kept[key] = {"measured": measured, **old[key]} if "measured" not in old[key] else old[key]
            data = {**kept, **data}
        path = write_results("memory", data, info, "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"\nwrote {path}")
    return data


def storage_section(args) -> dict:
    transitions = collect_transitions(args.env, args.num_envs, args.rollout_steps, args.max_new_tokens,
                                      args.max_prompt_tokens, args.tokenizer_vocab, args.seed)
    storage = storage_table(transitions, args.vocab_sizes)
    print(f"\nRollout storage per generated token ({storage['transitions']} transitions of a real "
          f"{args.env} collection: {storage['action_tokens']} action tokens, {storage['prompt_tokens']} prompt tokens)\n")
    print(format_table(
        ["|V|", "authors: 3 x |V| x 4 B", "ours (ids + log-probs + scalars)", "ours, action tokens only", "ratio"],
        [[r["vocab_size"], f"{r['authors_bytes_per_token']:,} B", f"{r['ours_bytes_per_token']:.1f} B",
          f"{r['ours_action_only_bytes_per_token']:.1f} B", f"{r['ratio']:,.0f}x"] for r in storage["rows"]]))
    return storage


def soft_value_section(args, info: dict) -> dict:
    soft = soft_value_table(args.positions, args.vocab_sizes, args.chunk_sizes, args.device)
    method = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "torch.profiler memory events"
    print(f"\nPeak extra memory of soft_values over N={args.positions} positions ({method}; {machine_label(info)})\n")
    print(format_table(
        ["|V|", "chunk", "peak extra", "per position in a chunk", "per position of N", "bound 5 x chunk x |V| x 4", "measured / bound"],
        [[r["vocab_size"], r["chunk_size"] if r["chunked"] else f"none ({r['chunk_size']})",
          f"{r['peak_extra_bytes'] / 2**20:,.1f} MiB", f"{r['peak_extra_bytes_per_chunk_position'] / 1024:,.1f} KiB",
          f"{r['peak_extra_bytes_per_position'] / 1024:,.2f} KiB", f"{r['analytic_bound_bytes'] / 2**20:,.1f} MiB",
          f"{r['measured_over_bound']:.3f}"] for r in soft]))
    return {"method": method, "rows": soft}


if __name__ == "__main__":
    main()
