"""ETPO training and sampling throughput on a ~125M-parameter random Llama (GPT-2-small sized).

Random weights (no download): hidden 768, 12 layers, 12 heads, MLP 3072, vocab 32,000. One
``ETPOModule`` (policy, critic, target critic, reference) trains on random transition
batches for ``--steps`` optimizer steps after a warm-up; the policy then samples with
``generate``. Prints one JSON object (``bench/gpu_check.sh`` stores it).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from etpo_lightning import ETPOModule
from etpo_lightning.core.batch import Transition, TransitionBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--action-tokens", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (dry runs on a CPU)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if args.tiny \
        else dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False, **size)
    policy = LlamaForCausalLM(config).to(args.device, dtype)
    n_params = sum(p.numel() for p in policy.parameters())
    module = ETPOModule(policy=policy, beta=0.01, policy_lr=1e-6, critic_lr=1e-5, critic_head_init="dueling")
    module.configure_model()
    module.to(args.device)
    optimizers = module.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    rows = [Transition(prompt_ids=torch.randint(3, 32000, (args.prompt_tokens,), generator=g),
                       action_ids=torch.randint(3, 32000, (args.action_tokens,), generator=g),
                       reward=0.5, terminated=False, next_prompt_ids=torch.randint(3, 32000, (args.prompt_tokens,), generator=g))
            for _ in range(args.batch)]
    batch = TransitionBatch.collate(rows, pad_token_id=0).to(args.device)

    def step() -> None:
        out = module.compute_losses(batch)
        loss = sum(v for k, v in out.items() if k.endswith("loss"))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        module.update_target_critic()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    train_s = (time.perf_counter() - start) / args.steps
    ids = batch.prompt_ids
    with torch.no_grad():
        start = time.perf_counter()
        out = module.policy.generate(input_ids=ids, attention_mask=batch.prompt_mask.long(), do_sample=True,
                                     max_new_tokens=args.action_tokens, min_new_tokens=args.action_tokens,
                                     pad_token_id=0)
        sync()
        gen_s = time.perf_counter() - start
    new_tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "model_parameters": n_params, "dtype": args.dtype, "batch": args.batch,
        "prompt_tokens": args.prompt_tokens, "action_tokens": args.action_tokens,
        "train_step_s": train_s, "train_action_tokens_per_s": args.batch * args.action_tokens / train_s,
        "generate_s": gen_s, "generate_tokens_per_s": new_tokens / gen_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
    }))


if __name__ == "__main__":
    main()
