"""``python -m etpo_lightning.tiny_coder``: rebuild the tiny coder (into the cache, or ``--out DIR``),
print where, and say whether its weights equal the shipped ones."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from etpo_lightning.tiny_coder.build import BUILD_INFO, build_tiny_coder, ensure_tiny_coder, make_config, weights_checksum
from etpo_lightning.tiny_coder.pretrain import TinyCoderConfig
from etpo_lightning.tiny_coder.shipped import SHIPPED_DIR, missing_shipped_files, shipped_build_info

# What a build's bits depend on besides seed and options (docs/tiny_coder.md). MKL's
# instruction set is known only when MKL_ENABLE_INSTRUCTIONS set it.
REPRODUCIBILITY_KEYS = ("torch_version", "transformers_version", "torch_threads", "cpu_capability",
                        "mkl_enable_instructions_env")
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def invocation(argv: list[str]) -> str:
    """The command line as one string, with the kernel-choosing variables it ran under."""
    variables = [f"{k}={shlex.quote(os.environ[k])}" for k in KERNEL_VARIABLES if os.environ.get(k)]
    return " ".join([*variables, shlex.join(["python", "-m", "etpo_lightning.tiny_coder", *argv])])


def compare_with_shipped(info: dict) -> dict:
    """Whether a build of the shipped seed and options has the shipped weights, and which
    recorded conditions differ (a build under other conditions is expected to differ)."""
    if missing_shipped_files():
        return {"shipped": f"not installed ({SHIPPED_DIR})"}
    shipped = shipped_build_info()
    if (info["seed"], info["config"]) != (shipped["seed"], shipped["config"]):
        return {"shipped": "other seed or options: not comparable"}
    here, there = info["reproducible_with"], shipped["reproducible_with"]
    return {
        "same_weights_as_shipped": info["weights_sha256"] == shipped["weights_sha256"],
        "shipped_weights_sha256": shipped["weights_sha256"],
        "conditions_unlike_shipped": {k: [here.get(k), there.get(k)] for k in REPRODUCIBILITY_KEYS if here.get(k) != there.get(k)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etpo_lightning.tiny_coder", description=__doc__)
    parser.add_argument("--out", default=None, help="build into this directory (overwritten; no cache)")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $ETPO_CACHE_DIR or ~/.cache/etpo_lightning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the build (default: torch's)")
    # Every build option is a flag: --steps, --n-samples, --batch-size, --hidden-size, ...
    for f in fields(TinyCoderConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, dest=f.name)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    command = invocation(argv)
    options = {f.name: getattr(args, f.name) for f in fields(TinyCoderConfig) if getattr(args, f.name) is not None}
    if args.out is not None:
        path = Path(args.out)
        build_tiny_coder(path, args.seed, make_config(**options), not args.quiet, args.threads, command)
    else:
        path = ensure_tiny_coder(args.cache_dir, args.seed, rebuild=args.rebuild, progress=not args.quiet,
                                 num_threads=args.threads, command=command, **options)
    info = json.loads((path / BUILD_INFO).read_text())
    print(path)
    summary = {k: info[k] for k in ("seed", "steps", "n_params", "final_loss", "heldout_body_perplexity", "build_seconds")}
    # Builds made before the checksum was recorded: computed from the saved weights.
    info["weights_sha256"] = summary["weights_sha256"] = info.get("weights_sha256") or weights_checksum(path)
    summary["reproducible_with"] = info.get("reproducible_with", "not recorded (an older build)")
    if isinstance(summary["reproducible_with"], dict):
        summary.update(compare_with_shipped(info))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
