"""vLLM as the rollout engine, in the training process: one engine per rank.

Without a process group (one process) vLLM sets up its own. Under a trainer's process group
(DDP, FSDP2) each rank builds its own engine on that group with vLLM's ``external_launcher``
executor (``vllm_distributed``): the ranks build their engines together, at their first
collection, then each samples its own prompts with its own seeds, and closing an engine
leaves the trainer's group working. Tested on CPU ranks (gloo); on GPUs each rank's engine
takes ``cuda:LOCAL_RANK``, sharing it with training (``kv_cache_gib`` bounds its share).

The engine is built on first use from the policy's config alone (random weights, no
checkpoint written) and every ``load_weights`` pushes ``inference_state_dict()`` into it:
LoRA merged and FSDP gathered by the module, so the engine always samples the policy
being trained (under FSDP2 every rank gathers it: a collective, as every rank collects).
Behaviour log-probs are vLLM's *processed* log-probs: of each sampled token
under the distribution it was drawn from, after temperature / top-k / top-p, as the
``generate`` engine returns them.

vLLM is imported only when the engine is built; ``VLLMOptions`` imports without it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import tempfile
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from etpo_lightning.core.generation import GenerationEngine, RolloutPolicy, Samples, Sampling, cut_at_eos
from etpo_lightning.generation.vllm_distributed import (
    external_launcher_args,
    remember_vllm_own_group,
    trainer_group_initialized,
    trainer_group_kept,
)
from etpo_lightning.generation.vllm_options import (
    INSTALL_HINT,
    VLLMNotInstalledError,
    VLLMOptions,
    require_vllm,
    vllm_installed,
)

__all__ = ["VLLMEngine", "VLLMOptions", "VLLMNotInstalledError", "INSTALL_HINT", "require_vllm", "vllm_installed"]


def hf_config(network: nn.Module):
    """The Hugging Face config of a policy network (through PEFT / FSDP wrappers)."""
    for candidate in (network, getattr(network, "module", None)):
        if candidate is None:
            continue
        base = candidate.get_base_model() if hasattr(candidate, "get_base_model") else candidate
        config = getattr(base, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            return config
    raise TypeError(f"{type(network).__name__} has no Hugging Face config: vLLM builds the engine from one")


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what building an in-process engine does to the training process: vLLM reseeds
    Python's, NumPy's and torch's global generators and disables ``torch.set_num_threads``."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _scheduling(max_model_len: int | None) -> dict:
    """Scheduler settings. On CPUs, no chunked prefill: a prompt whose prefill is split over
    two steps makes vLLM rewind the request's seeded generator, which a CPU generator cannot
    do ("CPU Generator does not use offset"; every request here is seeded). Whole prompts
    are scheduled instead, as many per step as the token budget holds."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len or 0, 4096)}


class VLLMEngine(GenerationEngine):
    """Samples actions with vLLM; see the module docstring.

    Args:
        options: How the engine is built (KV-cache space, dtype, ...).
        max_model_len: Longest prompt + action, used when ``options.max_model_len`` is None
            (the datamodule passes ``max_prompt_tokens + max_new_tokens``).
    """

    def __init__(self, options: VLLMOptions | None = None, max_model_len: int | None = None) -> None:
        super().__init__(options, max_model_len)
        self.options = options or VLLMOptions()
        self.max_model_len = self.options.max_model_len or max_model_len
        self._llm = None
        self._on_trainer_group = False  # built on the trainer's process group (vllm_distributed)
        self._config_dir: str | None = None

    @classmethod
    def check_settings(cls, options: VLLMOptions | None, max_model_len: int | None) -> None:
        require_vllm()
        if options is not None and not isinstance(options, VLLMOptions):
            raise ValueError(f"vLLM options must be VLLMOptions, got {type(options).__name__}")
        if options is not None and max_model_len is not None:
            options.check_fits(max_model_len)

    @property
    def built(self) -> bool:
        return self._llm is not None

    # ----------------------------------------------------------------- weights
    def load_weights(self, source: RolloutPolicy) -> None:
        if self._llm is None:
            self._build(source)
        state = source.inference_state_dict()
        # In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the tensors are handed over, not copied
        # between processes. A direct model.load_weights fails on the CPU build; reload_weights
        # runs vLLM's own loaders (fused QKV / gate-up, tied embeddings skipped).
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        # The prefix cache holds keys and values computed with the old weights: a prompt that
        # shares a cached prefix (every collection repeats the task's prompt) would be sampled
        # from a mix of old and new weights, and its log-probs would not be the policy's.
        self._llm.reset_prefix_cache()

    def _build(self, source: RolloutPolicy) -> None:
        # Under a trainer's process group (DDP, FSDP2; one rank too) vLLM joins it: one engine
        # per rank, built by all ranks together (see vllm_distributed).
        self._on_trainer_group = trainer_group_initialized()
        launch = external_launcher_args() if self._on_trainer_group else {}
        config = hf_config(source.sampling_network())
        positions = getattr(config, "max_position_embeddings", None)
        if self.options.max_model_len is None and positions is not None:
            # vLLM refuses a length beyond the model's positions; prompts that would need more
            # are refused one by one in ``sample``, with their length.
            self.max_model_len = min(self.max_model_len or positions, int(positions))
        # Only the architecture is read from disk (load_format="dummy"): the weights come
        # from the live policy right after, and again before every collection.
        self._config_dir = tempfile.mkdtemp(prefix="etpo-vllm-")
        config.save_pretrained(self._config_dir)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # weights are pushed in-process
        opts = self.options
        memory = ({"kv_cache_memory_bytes": int(opts.kv_cache_gib * 2**30)} if opts.kv_cache_gib is not None
                  else {"gpu_memory_utilization": opts.gpu_memory_utilization})
        try:
            with _process_state_kept():
                try:
                    from vllm import LLM
                except (ImportError, RuntimeError) as err:  # e.g. a torchvision built for another torch
                    raise VLLMNotInstalledError(f"vLLM is installed but does not import ({err}): {INSTALL_HINT}") from err
                self._llm = LLM(
                    model=self._config_dir, load_format="dummy", skip_tokenizer_init=True, dtype=opts.dtype,
                    max_model_len=self.max_model_len, enforce_eager=opts.enforce_eager,
                    logprobs_mode="processed_logprobs", **memory, **launch, **_scheduling(self.max_model_len),
                )
            if not self._on_trainer_group:
                remember_vllm_own_group()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- sampling
    def sample(self, source: RolloutPolicy, prompts: list[Tensor], sampling: Sampling) -> Samples:
        if self._llm is None:
            self.load_weights(source)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        limit = self.max_model_len or float("inf")
        too_long = [p.numel() for p in prompts if p.numel() + sampling.max_new_tokens > limit]
        if too_long:
            raise ValueError(f"a prompt of {max(too_long)} tokens + max_new_tokens={sampling.max_new_tokens} exceeds "
                             f"the vLLM engine's max_model_len={self.max_model_len}")
        # One seed per request, so that rows never share their random draws: one draw from torch's
        # global generator (seed_everything governs it, as it governs ``generate``, and a
        # checkpoint restores it, so a resumed fit samples as a continuous one) mixed with the
        # sampling seed (each rank's own) and the row.
        base = int(torch.randint(0, 2**31 - 1, (1,)).item())
        params = [
            SamplingParams(
                n=1, temperature=sampling.temperature, top_k=sampling.top_k if sampling.top_k > 0 else 0,
                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, logprobs=0,
                stop_token_ids=[sampling.eos_token_id], detokenize=False,
                seed=hash((sampling.seed, base, i)) & 0x7FFFFFFF,
            )
            for i in range(len(prompts))
        ]
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params,
                                     use_tqdm=False)
        actions, logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = torch.tensor(list(completion.token_ids), dtype=torch.long)
            logp = torch.tensor([step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs)],
                                dtype=torch.float32)
            # vLLM stops at EOS and keeps it; the cut makes it explicit (and equal to ``generate``).
            (action, action_logp), = cut_at_eos(ids[None], logp[None], sampling.eos_token_id)
            actions.append(action)
            logprobs.append(action_logp)
        return Samples(actions, logprobs)

    # ----------------------------------------------------------------- closing
    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            kept = trainer_group_kept() if self._on_trainer_group else contextlib.nullcontext()
            with contextlib.suppress(Exception), kept:
                # Tears down vLLM's process groups (not the trainer's) and unfreezes what its
                # start froze for gc.
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
