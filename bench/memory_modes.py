"""Memory of ETPO's networks: full copies (``ETPOModule``) vs LoRA on one base (``ETPOModule(lora=...)``).

For each model configuration the real modules are built on the META device (shapes only,
nothing allocated, so the 7B case runs on a laptop) and their parameters counted:
per network, and for the whole module with shared tensors counted once (the LoRA views
share one base). Bytes are given for 2-byte (bf16) and 4-byte (fp32) weights, and a
training estimate adds gradients and AdamW's two moments for the trainable parameters:

    weights + trainable x (1 grad + 2 moments)      in the same dtype

(activations, the KV cache and the full-vocabulary loss chunks come on top; see
etpo_lightning/etpo/losses.py and bench/memory.py for those).

Configurations: ``tiny`` is the tiny sklearn coder's Llama (hidden 256, 4 layers,
vocab 1024); ``7b`` a CodeLlama-7B-like Llama (hidden 4096, 32 layers, vocab 32016).

Run: ``python bench/memory_modes.py [--configs tiny 7b] [--lora-r 16]``; writes
``bench/results/memory_modes.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from etpo_lightning import ETPOModule

RESULTS = Path(__file__).resolve().parent / "results" / "memory_modes.json"
NETWORKS = ("policy", "critic", "target_critic", "reference")

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "7b": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}


def meta_llama(name: str) -> nn.Module:
    """The configuration's ``LlamaForCausalLM`` with meta tensors (no memory)."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**CONFIGS[name]))


def count(params: list[nn.Parameter]) -> dict[str, int]:
    """Total, trainable and frozen parameter counts of distinct tensors."""
    unique = list({id(p): p for p in params}.values())
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def with_bytes(counts: dict[str, int]) -> dict[str, Any]:
    """Add weight bytes and the training estimate (weights + grads + 2 AdamW moments)."""
    out: dict[str, Any] = dict(counts)
    for dtype, size in (("bf16", 2), ("fp32", 4)):
        out[f"weights_bytes_{dtype}"] = counts["total"] * size
        out[f"training_bytes_{dtype}"] = (counts["total"] + 3 * counts["trainable"]) * size
    return out


def measure(module: nn.Module, shared: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    """Per-network and whole-module figures (``shared``: extra rows, e.g. the LoRA base)."""
    rows = {name: with_bytes(count(list(getattr(module, name).parameters()))) for name in NETWORKS}
    for name, part in (shared or {}).items():
        rows[name] = with_bytes(count([p for p in part.parameters()
                                       if not any(p is q for n in NETWORKS for q in getattr(module, n).parameters())]))
    rows["module"] = with_bytes(count(list(module.parameters())))
    return rows


def run(config: str, lora_r: int) -> dict[str, Any]:
    """Both modes for one configuration."""
    full = ETPOModule(policy=meta_llama(config), beta=0.01)
    result: dict[str, Any] = {"model": CONFIGS[config], "full": measure(full)}
    del full
    try:
        import peft  # noqa: F401
    except ImportError:  # peft missing: report the full mode only
        return result
    from etpo_lightning.core.lora import LoRAConfig

    lora = ETPOModule(policy=meta_llama(config), beta=0.01, lora=LoRAConfig(r=lora_r, alpha=2 * lora_r))
    result["lora"] = measure(lora, shared={"shared_base": lora.shared_lora.base_model()})
    result["lora_r"] = lora_r
    return result


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB" if n >= 2**28 else f"{n / 2**20:8.2f} MiB"


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n== {name}: hidden {result['model']['hidden_size']}, {result['model']['num_hidden_layers']} layers, "
          f"vocab {result['model']['vocab_size']} ==")
    header = f"{'mode':5} {'network':14} {'params':>14} {'trainable':>14} {'frozen':>14} {'weights bf16':>13} " \
             f"{'weights fp32':>13} {'train fp32*':>13}"
    print(header)
    for mode in ("full", "lora"):
        for network, row in result.get(mode, {}).items():
            print(f"{mode:5} {network:14} {row['total']:>14,} {row['trainable']:>14,} {row['frozen']:>14,} "
                  f"{_gib(row['weights_bytes_bf16']):>13} {_gib(row['weights_bytes_fp32']):>13} "
                  f"{_gib(row['training_bytes_fp32']):>13}")
    if "lora" in result:
        ratio = result["full"]["module"]["training_bytes_fp32"] / result["lora"]["module"]["training_bytes_fp32"]
        print(f"LoRA (r={result['lora_r']}) needs {ratio:.1f}x less for weights+grads+AdamW than four full copies")
    print("* weights + gradients + 2 AdamW moments of the trainable parameters, fp32; activations excluded")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = {name: run(name, args.lora_r) for name in args.configs}
    for name, result in results.items():
        print_table(name, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/memory_modes.py " + " ".join(argv or sys.argv[1:]),
                                    "results": results}, indent=2))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
