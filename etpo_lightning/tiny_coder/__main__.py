"""``python -m etpo_lightning.tiny_coder``: build (or find) the cached tiny coder and print where."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from etpo_lightning.tiny_coder.build import BUILD_INFO, ensure_tiny_coder, weights_checksum
from etpo_lightning.tiny_coder.pretrain import TinyCoderConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etpo_lightning.tiny_coder", description=__doc__)
    parser.add_argument("--cache-dir", default=None, help="cache root (default $ETPO_CACHE_DIR or ~/.cache/etpo_lightning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="build again even if cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the build (default: torch's)")
    # Every build option is a flag: --steps, --n-samples, --batch-size, --hidden-size, ...
    for f in fields(TinyCoderConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None, dest=f.name)
    args = parser.parse_args(argv)
    options = {f.name: getattr(args, f.name) for f in fields(TinyCoderConfig) if getattr(args, f.name) is not None}
    path = ensure_tiny_coder(args.cache_dir, args.seed, rebuild=args.rebuild, progress=not args.quiet, num_threads=args.threads, **options)
    info = json.loads((path / BUILD_INFO).read_text())
    print(path)
    summary = {k: info[k] for k in ("seed", "steps", "n_params", "final_loss", "heldout_body_perplexity", "build_seconds")}
    # Builds made before the checksum was recorded: computed from the saved weights.
    summary["weights_sha256"] = info.get("weights_sha256") or weights_checksum(path)
    summary["reproducible_with"] = info.get("reproducible_with", "not recorded (an older build)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
