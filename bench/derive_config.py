"""Write a copy of a run config with its output folder, seed, step budget and model replaced."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

import yaml

# "callbacks[KLMonitor]": the element of a class_path list whose class is KLMonitor.
_LIST_ELEMENT = re.compile(r"^(?P<key>[^\[\]]+)\[(?P<cls>[A-Za-z_][\w.]*)\]$")


def _child(node: dict, segment: str, dotted: str) -> dict:
    match = _LIST_ELEMENT.match(segment)
    if match is None:
        return node.setdefault(segment, {})
    key, cls = match["key"], match["cls"]
    items = node.get(key) or []
    found = [item for item in items
             if isinstance(item, dict) and (item.get("class_path", "") == cls
                                            or item.get("class_path", "").endswith("." + cls))]
    if len(found) != 1:
        classes = [item.get("class_path") for item in items if isinstance(item, dict)]
        raise KeyError(f"override {dotted!r}: {len(found)} elements of {key!r} have class {cls!r} "
                       f"(need exactly one; the list holds {classes})")
    return found[0]


def apply_override(cfg: dict, dotted: str, value) -> None:
    """Set ``dotted`` (e.g. ``data.replay_collections`` or
    ``trainer.callbacks[KLMonitor].init_args.target_kl``) to ``value`` in ``cfg``, in place.

    A segment ``key[Class]`` selects the one element of the list ``key`` whose ``class_path``
    is ``Class`` or ends with ``.Class``; anything else is a plain mapping key (created if
    missing).
    """
    node = cfg
    *parents, leaf = dotted.split(".")
    for segment in parents:
        node = _child(node, segment, dotted)
    if _LIST_ELEMENT.match(leaf):
        raise KeyError(f"override {dotted!r}: name a field of the list element, e.g. {leaf}.init_args.NAME")
    node[leaf] = value


def derive_config(config: str | Path, out_dir: str | Path, seed: int | None = None, max_steps: int | None = None,
                  model: str | None = None, overrides: dict | None = None) -> Path:
    """Point every output (loggers, checkpoints) of ``config`` into ``out_dir``; returns the new file.

    jsonargparse cannot override one element of the logger/callback lists from the command
    line, so benchmarks run from a derived file instead; ``overrides`` (dotted keys, see
    ``apply_override``) can address such an element by its class.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(derived(config, out_dir, seed, max_steps, model, overrides), sort_keys=False))
    return path


def derived(config: str | Path, out_dir: str | Path, seed: int | None = None, max_steps: int | None = None,
            model: str | None = None, overrides: dict | None = None) -> dict:
    """The config ``derive_config`` writes, as a dict (nothing written)."""
    out_dir = Path(out_dir)
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
        apply_override(cfg, dotted, value)
    return cfg


def differences(a, b, prefix: str = "") -> list[str]:
    """Dotted paths where two parsed configs differ (list elements by index)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in {**a, **b} for d in differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


def parse_assignment(item: str) -> tuple[str, object]:
    """``"a.b=0.15"`` -> ``("a.b", 0.15)`` (the value parsed as YAML; ``3e-4``, a string to
    PyYAML's YAML 1.1, is the float the CLI makes of it for a float argument)."""
    if "=" not in item:
        raise ValueError(f"--set wants dotted.key=value, got {item!r}")
    key, value = item.split("=", 1)
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed.strip()):
        parsed = float(parsed)
    return key, parsed


def parse_sets(sets: list[str]) -> dict:
    """``["a.b=0.15", ...]`` -> ``{"a.b": 0.15}``."""
    return dict(map(parse_assignment, sets))


def effective(config: dict, cli_args: list[str]) -> tuple[dict, list[str]]:
    """A copy of ``config`` with the ``--dotted.key=value`` arguments of ``cli_args`` applied
    (as the ``etpo`` CLI would on top of the file), and the arguments it could not apply."""
    config, rest = copy.deepcopy(config), []
    for arg in cli_args:
        if arg.startswith("--") and "=" in arg:
            apply_override(config, *parse_assignment(arg[2:]))
        else:
            rest.append(arg)
    return config, rest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--model")
    parser.add_argument("--set", nargs="*", default=[],
                        help="dotted.key=yaml_value; key[Class] picks a list element, e.g. "
                             "trainer.callbacks[KLMonitor].init_args.target_kl=0.15")
    a = parser.parse_args()
    print(derive_config(a.config, a.out_dir, a.seed, a.max_steps, a.model, parse_sets(a.set)))
