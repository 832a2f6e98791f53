"""Build the tiny sklearn coder and cache it as an ordinary Hugging Face checkpoint.

The package ships one build (``shipped.py``); building is for rebuilding that one, checking
that a machine reproduces it, or other seeds and options.

Reproducibility: a build is bit-for-bit the same (same ``weights_sha256``) for the same seed
and options when torch's version, the number of intra-op threads and the CPU's vector
instruction set (``torch.backends.cpu.get_cpu_capability()``) are the same: all four are
recorded in ``build_info.json``. A different thread count or kernel changes the order of
floating-point sums, and 650 steps of training carry that rounding into visibly different
weights (e.g. a final loss of 0.3278 instead of 0.3301), so compare ``weights_sha256``
before comparing numbers measured with two builds (``docs/tiny_coder.md``).

The checkpoint directory is complete once it holds :data:`COMPLETE_MARKER`. A build runs in
a temporary sibling directory that is renamed into place at the end (an interrupted build
leaves no half-written checkpoint behind), and under an exclusive file lock, so two processes
asking at once build it only once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

from etpo_lightning.tiny_coder.corpus import save_samples
from etpo_lightning.tiny_coder.pretrain import PretrainResult, TinyCoderConfig, pretrain

NAME = "tiny-sklearn-coder"
COMPLETE_MARKER = ".complete"
BUILD_INFO = "build_info.json"
HELDOUT_FILE = "heldout.jsonl"
FORMAT_VERSION = 1  # bump when the corpus or the training changes what a seed produces


def make_config(**kwargs) -> TinyCoderConfig:
    """``TinyCoderConfig`` with ``kwargs`` overriding defaults; unknown names raise ``TypeError``."""
    known = {f.name for f in fields(TinyCoderConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown tiny coder build option(s) {unknown}; known: {sorted(known)}")
    return replace(TinyCoderConfig(), **kwargs)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$ETPO_CACHE_DIR``, else ``~/.cache/etpo_lightning``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ETPO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.path.expanduser("~/.cache/etpo_lightning"))


def checkpoint_name(seed: int, config: TinyCoderConfig) -> str:
    """``tiny-sklearn-coder-<seed>`` for the defaults; other options get a hash suffix, so a
    small test build never stands in for the default model."""
    if config == TinyCoderConfig():
        return f"{NAME}-{seed}"
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{NAME}-{seed}-{digest}"


def checkpoint_dir(cache_dir: str | os.PathLike | None = None, seed: int = 0, **kwargs) -> Path:
    """Where :func:`ensure_tiny_coder` keeps the checkpoint for these options (built or not)."""
    return cache_root(cache_dir) / checkpoint_name(seed, make_config(**kwargs))


def is_complete(path: Path, seed: int, config: TinyCoderConfig) -> bool:
    """A finished build with the same seed, options and format version."""
    if not (path / COMPLETE_MARKER).is_file():
        return False
    try:
        info = json.loads((path / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("format_version") == FORMAT_VERSION
        and info.get("seed") == seed
        and info.get("config") == config.to_dict()
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` (blocks until free); a no-op where ``fcntl`` is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: rely on the atomic rename alone
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def weights_checksum(checkpoint_dir: str | os.PathLike) -> str:
    """SHA-256 of a saved checkpoint's weights: every tensor of its ``*.safetensors`` files,
    by name (sorted), with its dtype, shape and bytes. File metadata (library versions) does
    not enter, so two builds have the same checksum exactly when their weights are equal."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {checkpoint_dir}")
    digest = hashlib.sha256()
    tensors: dict[str, tuple[Path, str]] = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                tensors[name] = (file, name)
    for name in sorted(tensors):
        with safe_open(str(tensors[name][0]), "pt") as handle:
            tensor = handle.get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def build_environment(torch_threads: int) -> dict:
    """What a build's bits depend on besides seed and options (see the module docstring)."""
    import torch
    import transformers

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    # ATEN_CPU_CAPABILITY lowers the kernels torch picks (avx2 on an AVX-512 CPU), and
    # MKL_ENABLE_INSTRUCTIONS those of MKL, which does matrix products and ignores the former:
    # recorded to say how a capability other than the CPU's own was reached.
    return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "torch_threads": torch_threads, "cpu_capability": capability,
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
            "mkl_enable_instructions_env": os.environ.get("MKL_ENABLE_INSTRUCTIONS"), "machine": platform.machine(),
            "python_version": platform.python_version(), "sklearn_version": _version("scikit-learn")}


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def save_build(result: PretrainResult, out_dir: Path, seed: int, config: TinyCoderConfig, build_seconds: float,
               command: str | None = None) -> dict:
    """Write model, tokenizer, held-out samples and ``build_info.json`` to ``out_dir``;
    ``command`` is the invocation to record (default: the equivalent Python call)."""
    result.model.save_pretrained(out_dir)
    result.tokenizer.save_pretrained(out_dir)
    save_samples(result.heldout, out_dir / HELDOUT_FILE)
    n = min(10, len(result.losses))
    info = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "config": config.to_dict(),
        "steps": config.steps,
        "n_params": sum(p.numel() for p in result.model.parameters()),
        "initial_loss": sum(result.losses[:n]) / max(n, 1),
        "final_loss": sum(result.losses[-n:]) / max(n, 1),
        "losses": [round(x, 5) for x in result.losses],
        "heldout_body_perplexity": result.heldout_perplexity,
        "heldout_body_perplexity_unbaked": result.heldout_perplexity_unbaked,
        "n_train_samples": len(result.train),
        "n_heldout_samples": len(result.heldout),
        "failing_share_train": sum(s.kind != "ok" for s in result.train) / max(len(result.train), 1),
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "build_seconds": round(build_seconds, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or f"build_tiny_coder(out_dir, seed={seed}, num_threads={result.torch_threads})",
        "weights_sha256": weights_checksum(out_dir),
        "reproducible_with": build_environment(result.torch_threads),
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=1))
    return info


def build_tiny_coder(
    out_dir: str | os.PathLike,
    seed: int = 0,
    config: TinyCoderConfig | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    command: str | None = None,
) -> PretrainResult:
    """Build into ``out_dir`` (created or overwritten, no caching); returns the in-memory result.
    ``command`` is recorded in ``build_info.json`` as the way it was built."""
    config = config or TinyCoderConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = pretrain(config, seed, progress, num_threads)
    save_build(result, out, seed, config, time.perf_counter() - t0, command)
    (out / COMPLETE_MARKER).write_text("ok\n")
    return result


def ensure_tiny_coder(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    rebuild: bool = False,
    progress: bool = True,
    num_threads: int | None = None,
    command: str | None = None,
    **kwargs,
) -> Path:
    """Directory of the tiny sklearn coder checkpoint, building it on first use.

    Args:
        cache_dir: root of the cache; defaults to ``$ETPO_CACHE_DIR`` or
            ``~/.cache/etpo_lightning``. The checkpoint is the subdirectory
            ``tiny-sklearn-coder-<seed>`` (plus a hash of non-default options).
        seed: seeds the corpus, the tokenizer data, the initial weights and the batch order.
        rebuild: build again even if a complete checkpoint exists.
        progress: show a tqdm bar while training.
        num_threads: torch threads for the build (default: torch's setting). Not a build
            option: it does not change the checkpoint's name.
        command: how the build was asked for, recorded in ``build_info.json``.
        **kwargs: build options, fields of :class:`TinyCoderConfig` (e.g. ``steps=20``).

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    config = make_config(**kwargs)
    path = cache_root(cache_dir) / checkpoint_name(seed, config)
    if not rebuild and is_complete(path, seed, config):
        return path
    with _file_lock(path.parent / f".{path.name}.lock"):
        # Another process may have finished the build while this one waited for the lock.
        if not rebuild and is_complete(path, seed, config):
            return path
        # Left by builds that were killed; nobody else builds this name while we hold the lock.
        for stale in path.parent.glob(f".{path.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
        try:
            build_tiny_coder(tmp, seed, config, progress, num_threads, command)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return path
