"""``etpo evaluate``: sample K programs per dataset from a checkpoint and score them.

    etpo evaluate --model tiny-sklearn-coder --dataset quickstart --samples 32
    etpo evaluate --model runs/quickstart/checkpoints/hf-best --dataset quickstart breast_cancer
    etpo evaluate --model <path> --csv data/pharyngitis.csv --target radt --drop number

Prints, per dataset: mean reward of the samples (failures count -1), success rate, mean
and best AUC of the successful programs, and the best program. A bad option (an unknown
dataset, a CSV that does not read, a missing target column, a model path that does not
load) is one line on stderr and exit status 2, as for ``etpo fit``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from etpo_lightning.cli.errors import SettingError, first_line
from etpo_lightning.core.models import ModelNotFoundError, load_causal_lm, load_tokenizer
from etpo_lightning.envs import CSVDataset, DataScienceCodingEnv, SklearnDataset, SyntheticDataset, VectorEnv
from etpo_lightning.envs.datasets import TabularDataset

SKLEARN_NAMES = ("breast_cancer", "wine", "iris", "digits")


@dataclass
class EvalResult:
    dataset: str
    samples: int
    reward_mean: float
    success_rate: float
    auc_mean: float
    auc_best: float
    best_program: str | None
    errors: dict[str, int]


def make_dataset(name: str) -> TabularDataset:
    """``quickstart`` (the synthetic quickstart task) or one of sklearn's bundled datasets."""
    if name in SKLEARN_NAMES:
        return SklearnDataset(name)
    return SyntheticDataset(kind=name)


@torch.no_grad()
def sample_bodies(model, tokenizer, prompt: str, k: int, max_new_tokens: int = 160, temperature: float = 1.0,
                  batch_size: int = 16, seed: int = 0) -> list[str]:
    """K sampled continuations of ``prompt`` (the code after the ``def`` line), EOS stripped."""
    torch.manual_seed(seed)
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    bodies: list[str] = []
    for start in range(0, k, batch_size):
        n = min(batch_size, k - start)
        out = model.generate(input_ids=ids.expand(n, -1), attention_mask=torch.ones_like(ids).expand(n, -1),
                             do_sample=True, temperature=temperature, top_k=None, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        bodies += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return bodies


def score_bodies(env: DataScienceCodingEnv, bodies: list[str], workers: int = 2, progress: bool = True) -> list[tuple[float, dict]]:
    """Each body's reward and info, every body in a fresh episode of a copy of ``env``."""
    results: list[tuple[float, dict]] = []
    chunk = max(1, workers * 2)
    with VectorEnv([functools.partial(copy.deepcopy, env)] * chunk, num_workers=workers) as venv:
        bar = tqdm(total=len(bodies), desc=f"scoring {env.dataset.name}", disable=not progress, leave=False)
        for start in range(0, len(bodies), chunk):
            part = bodies[start:start + chunk]
            venv.reset()
            _, rewards, _, infos = venv.step(part + [""] * (chunk - len(part)))
            results += list(zip(rewards, infos))[: len(part)]
            bar.update(len(part))
        bar.close()
    return results


def summarize(name: str, bodies: list[str], scored: list[tuple[float, dict]]) -> EvalResult:
    rewards = [r for r, _ in scored]
    ok = [(r, b) for (r, info), b in zip(scored, bodies) if info.get("error") is None]
    errors: dict[str, int] = {}
    for _, info in scored:
        if info.get("error") is not None:
            kind = info.get("failure_kind") or "error"
            errors[kind] = errors.get(kind, 0) + 1
    best = max(ok, default=(float("nan"), None))
    return EvalResult(
        dataset=name, samples=len(bodies), reward_mean=sum(rewards) / len(rewards),
        success_rate=len(ok) / len(bodies), auc_mean=(sum(r for r, _ in ok) / len(ok)) if ok else float("nan"),
        auc_best=best[0], best_program=best[1], errors=errors,
    )


def evaluate(model_path: str, datasets: list[tuple[str, TabularDataset]], samples: int = 32, max_new_tokens: int = 160,
             temperature: float = 1.0, workers: int = 2, timeout_s: float = 20.0, seed: int = 0) -> list[EvalResult]:
    model, tokenizer = load_causal_lm(model_path), load_tokenizer(model_path)
    results = []
    for name, dataset in datasets:
        env = DataScienceCodingEnv(dataset=dataset, timeout_s=timeout_s, max_steps=1)
        bodies = sample_bodies(model, tokenizer, env.reset(), samples, max_new_tokens, temperature, seed=seed)
        results.append(summarize(name, bodies, score_bodies(env, bodies, workers)))
        env.close()
    return results


def format_table(results: list[EvalResult]) -> str:
    lines = ["| dataset | samples | mean reward | success rate | mean AUC (successes) | best AUC | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "-"
        lines.append(f"| {r.dataset} | {r.samples} | {r.reward_mean:.3f} | {r.success_rate:.2f} | "
                     f"{r.auc_mean:.3f} | {r.auc_best:.3f} | {errs} |")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`SettingError` (one line) instead of printing its usage."""

    def error(self, message: str):
        raise SettingError(message)


def _dataset_from(option: str, build):
    """``build()``, its error turned into one line that names ``option``."""
    try:
        return build()
    except (ValueError, OSError) as err:
        raise SettingError(f"{option}: {first_line(str(err))}") from err


def main(argv: list[str] | None = None) -> list[EvalResult]:
    parser = _Parser(prog="etpo evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-sklearn-coder", help="checkpoint directory, hub id or alias")
    parser.add_argument("--dataset", nargs="*", default=["quickstart"],
                        help=f"'quickstart' or sklearn datasets: {', '.join(SKLEARN_NAMES)}")
    parser.add_argument("--csv", help="a CSV file to evaluate on (with --target)")
    parser.add_argument("--target", help="target column of --csv")
    parser.add_argument("--drop", nargs="*", default=[], help="columns of --csv to drop (ids)")
    parser.add_argument("--samples", type=int, default=32, help="programs sampled per dataset")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per program (all folds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    datasets = [(name, _dataset_from(f"--dataset {name}", functools.partial(make_dataset, name))) for name in args.dataset]
    if args.csv:
        if not args.target:
            parser.error("--csv needs --target")
        try:
            csv = CSVDataset(args.csv, target=args.target, drop=args.drop)
        except (ValueError, OSError) as err:
            message = first_line(str(err))
            option = "--target" if message.startswith("target column") else "--drop" if message.startswith("drop column") else "--csv"
            raise SettingError(f"{option}: {message}") from err
        datasets.append((Path(args.csv).stem, csv))
    try:
        results = evaluate(args.model, datasets, args.samples, args.max_new_tokens, args.temperature, args.workers,
                           args.timeout, args.seed)
    except ModelNotFoundError as err:
        raise SettingError(first_line(str(err)).replace("model_name_or_path=", "--model ", 1)) from err
    print(format_table(results))
    for r in results:
        print(f"\nbest program on {r.dataset} (AUC {r.auc_best:.4f}):\n{r.best_program}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results
