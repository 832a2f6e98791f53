"""Write a copy of a run config with its output folder, seed, step budget and model replaced."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def derive_config(config: str | Path, out_dir: str | Path, seed: int | None = None, max_steps: int | None = None,
                  model: str | None = None, overrides: dict | None = None) -> Path:
    """Point every output (loggers, checkpoints) of ``config`` into ``out_dir``; returns the new file.

    jsonargparse cannot override one element of the logger/callback lists from the command
    line, so benchmarks run from a derived file instead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(config).read_text())
    trainer = cfg["trainer"]
    trainer["default_root_dir"] = str(out_dir)
    for logger in trainer.get("logger", []) or []:
        logger.setdefault("init_args", {})["save_dir"] = str(out_dir)
    for callback in trainer.get("callbacks", []) or []:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(out_dir / "checkpoints")
    if seed is not None:
        cfg["seed_everything"] = seed
        cfg["data"]["seed"] = seed
    if max_steps is not None:
        trainer["max_steps"] = max_steps
    if model is not None:
        cfg["model"]["init_args"]["model_name_or_path"] = model
    for dotted, value in (overrides or {}).items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--model")
    parser.add_argument("--set", nargs="*", default=[], help="dotted.key=yaml_value")
    a = parser.parse_args()
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    print(derive_config(a.config, a.out_dir, a.seed, a.max_steps, a.model, sets))
