"""Generation tokens/s: Hugging Face ``generate`` against the vLLM engine, as the rollout
datamodule drives them (``engine.load_weights(module)`` then ``engine.sample(...)``, so the
weight push before every collection is inside the vLLM time).

Models: the tiny coder (1M parameters, its real EOS: programs end when it says so) and a
random ~134M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary 32016,
untied embeddings) with ``--prompt-tokens`` random prompt tokens. Both sample at
temperature 1 with up to ``--new-tokens`` new tokens; tokens/s counts the tokens of the
actions returned (up to and including EOS). Each engine is warmed up first (the vLLM start
is reported apart as ``start_s``); the time of a batch is the median of ``--repeats``.

    python bench/generation.py                      # needs the [vllm] extra
    python bench/generation.py --models tiny --batches 8,64

Writes ``bench/results/generation.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from common import format_table, machine_info, machine_label, set_threads, write_results

TINY_PROMPT = "# x_train: 200 rows, 6 numeric features\ndef build_model(x_train, y_train):\n"


def build_model(name: str, prompt_tokens: int):
    """(module, prompts, sampling settings) of a bench model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from etpo_lightning import ETPOModule
    from etpo_lightning.core.generation import Sampling
    from etpo_lightning.core.models import load_tokenizer, resolve_model_path

    if name == "tiny":
        path = resolve_model_path("tiny-sklearn-coder")
        module = ETPOModule(model_name_or_path=path, beta=0.1, gamma=0.99, policy_lr=1e-4, critic_lr=1e-4)
        tokenizer = load_tokenizer(path)
        prompt = torch.tensor(tokenizer(TINY_PROMPT, add_special_tokens=False)["input_ids"])
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        prompts = lambda n: [prompt.clone() for _ in range(n)]  # noqa: E731
    else:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32016, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        module = ETPOModule(policy=LlamaForCausalLM(config), beta=0.1, gamma=0.99, policy_lr=1e-4, critic_lr=1e-4)
        eos, pad = 2, 0
        g = torch.Generator().manual_seed(1)
        fixed = [torch.randint(3, 32016, (prompt_tokens,), generator=g) for _ in range(64)]
        prompts = lambda n: fixed[:n]  # noqa: E731
    module.configure_model()
    params = sum(p.numel() for p in module.policy.parameters())
    return module, prompts, params, lambda new: Sampling(max_new_tokens=new, eos_token_id=eos, pad_token_id=pad,
                                                         batch_size=64, seed=0)


def run_engine(engine_name: str, module, prompts, sampling, batches: list[int], repeats: int,
               max_model_len: int) -> dict:
    from etpo_lightning.generation.hf import HFGenerate

    result: dict = {"engine": engine_name}
    if engine_name == "vllm":
        from etpo_lightning.generation.vllm import VLLMEngine, VLLMOptions

        engine = VLLMEngine(VLLMOptions(kv_cache_gib=2.0), max_model_len=max_model_len)
        t0 = time.perf_counter()
        engine.load_weights(module)
        result["start_s"] = time.perf_counter() - t0
    else:
        engine = HFGenerate()
    try:
        engine.sample(module, prompts(2), sampling(8))  # warm-up
        for batch in batches:
            times, pushes, tokens = [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.load_weights(module)
                t1 = time.perf_counter()
                samples = engine.sample(module, prompts(batch), sampling(None))
                t2 = time.perf_counter()
                times.append(t2 - t0)
                pushes.append(t1 - t0)
                tokens.append(sum(a.numel() for a in samples.actions))
            seconds = statistics.median(times)
            result[str(batch)] = {"seconds": seconds, "weight_push_s": statistics.median(pushes),
                                  "tokens": int(statistics.median(tokens)),
                                  "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times))}
            print(f"  {engine_name} batch {batch}: {result[str(batch)]['tokens_per_s']:.0f} tok/s "
                  f"({result[str(batch)]['tokens']} tokens in {seconds:.1f} s)", flush=True)
    finally:
        engine.close()
        gc.collect()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,llama134m", help="comma-separated: tiny, llama134m")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: tiny 8,64; llama 8,32)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of the random Llama")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--out", default="generation", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    info = machine_info("cpu")
    results: dict = {}
    rows = []
    for name in args.models.split(","):
        batches = [int(b) for b in (args.batches or ("8,64" if name == "tiny" else "8,32")).split(",")]
        module, prompts, params, make_sampling = build_model(name, args.prompt_tokens)
        prompt_len = prompts(1)[0].numel()
        print(f"{name}: {params / 1e6:.1f}M parameters, prompts of {prompt_len} tokens", flush=True)
        entry: dict = {"parameters": params, "prompt_tokens": prompt_len, "new_tokens": args.new_tokens}
        for engine_name in args.engines.split(","):
            sampling = lambda n: make_sampling(n or args.new_tokens)  # noqa: E731
            entry[engine_name] = run_engine(engine_name, module, prompts, sampling, batches, args.repeats,
                                            max_model_len=prompt_len + args.new_tokens)
        for batch in batches:
            hf, vl = entry.get("hf", {}).get(str(batch)), entry.get("vllm", {}).get(str(batch))
            speedup = vl["tokens_per_s"] / hf["tokens_per_s"] if hf and vl else None
            rows.append([name, batch, hf and hf["tokens_per_s"], vl and vl["tokens_per_s"], speedup,
                         vl and vl["weight_push_s"]])
        results[name] = entry
        del module
        gc.collect()
    info["load_average_1m_end"] = machine_info("cpu")["load_average_1m"]
    table = format_table(["model", "batch", "generate tok/s", "vLLM tok/s", "vLLM / generate", "weight push s"], rows)
    print(f"\n{machine_label(info)}\n{table}")
    path = write_results(args.out, {"results": results, "table": table}, info,
                         "python bench/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
