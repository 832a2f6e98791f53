"""``RolloutDataModule``: the current policy acts in N environments; the transitions feed training."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import random
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from etpo_lightning.core.batch import Transition, TransitionBatch
from etpo_lightning.core.generation import GenerationEngine, RolloutPolicy, Sampling
from etpo_lightning.core.models import load_tokenizer
from etpo_lightning.core.rank_stats import Reduce
from etpo_lightning.datamodules.rollout_metrics import RolloutMetrics
from etpo_lightning.datamodules.tokens import TokenCodec
from etpo_lightning.envs import TextEnv, VectorEnv
from etpo_lightning.generation import build_engine, engine_class
from etpo_lightning.generation.vllm_options import VLLMOptions

log = logging.getLogger(__name__)

#: ``info["failure_kind"]`` of a step whose sandbox executor died or hung and was restarted.
EXECUTOR_RESTART_KINDS = ("executor_crash", "executor_timeout")


class BatchTicket(int):
    """A placeholder the dataloader yields; the datamodule turns it into a batch just in time.

    Lightning fetches one batch ahead of the one being trained on. Building the batch
    there would sample with a policy one update old and run one collection too many at
    the end of fit, so the real batch is made in ``on_before_batch_transfer``, which runs
    right before the batch's training step.
    """


class _RolloutStream(IterableDataset):
    """One epoch = ``batches_per_epoch`` tickets, each redeemed for a batch from the replay buffer."""

    def __init__(self, datamodule: RolloutDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[BatchTicket]:
        dm = self.datamodule
        if dm.refresh_on_epoch:
            dm.request_refresh()
        for i in range(dm.batches_per_epoch):
            yield BatchTicket(i)


class RolloutDataModule(TokenCodec, pl.LightningDataModule):
    """Runs ``num_envs`` text environments with the attached module's policy and serves
    ``TransitionBatch``es.

    A *collection* runs every environment for ``rollout_steps`` steps with the current
    policy, sampled by a generation engine (``generation``: Hugging Face ``generate`` by
    default; the module offers its policy as a ``core.generation.RolloutPolicy`` and the
    engine is given the current weights before every collection); episodes
    continue across collections (an environment mid-episode keeps its state). The last
    ``replay_collections`` collections are kept, as token ids and a few scalars per
    transition (no full-vocabulary tensor), and batches are sampled from them. A new
    collection starts at every epoch (``refresh_on_epoch``) or whenever
    ``request_refresh()`` is called (the ``RolloutRefresh`` callback does so every N steps).

    Prompts longer than ``max_prompt_tokens`` keep their LAST ``max_prompt_tokens`` tokens:
    the end of an observation (the function to complete) is what the policy continues;
    the oldest context goes first. Prompts are left-padded for generation; actions are
    the generated tokens up to and including the first EOS (no EOS if ``max_new_tokens``
    ran out), right-padded in batches.

    Under DDP every rank runs its own environments with the seed ``seed + 1000 * rank``.

    Groups (``group_size`` G > 1, for GRPO): G samples per observation. The ``num_envs``
    environments form ``num_envs / G`` groups of G consecutive slots whose k-th episodes
    start from the same seed (``VectorEnv(group_size=G)``), so the G copies see the same
    task and first observation and the policy samples G actions for it. (Copies of the
    environment state rather than G samples of one prompt: multi-step episodes then run
    on unchanged, each copy continuing from its own action, and the G episodes of a group
    are G trajectories from one start, as in multi-turn GRPO.) The transitions of an
    episode are held back until all G episodes of its group have ended; they then enter
    the replay together, each recording its ``group_id``, ``group_member`` and the
    group's G ``group_returns`` (undiscounted sums of rewards). With one-step episodes
    every group completes in the collection that started it; otherwise a group can span
    collections, and a batch is only drawn once the released transitions fill it (the
    datamodule collects again until they do). ``env_steps`` counts every sampled action,
    released or not. Episodes still running at a checkpoint are not saved (on resume the
    environments restart their episodes, as they always do). G = 1 (default) releases
    every transition at once, without group fields.

    Faults are survived and shown: an environment worker process that dies or hangs is
    replaced by ``VectorEnv``, and a sandbox executor that dies or hangs is restarted by the
    sandbox; each is one warning line in the log and counts in ``rollout/env_restarts``
    (restarts since the start of the run, on this rank).

    Args:
        env: The environment; each of the ``num_envs`` environments is a deep copy of it.
        tokenizer: Hub id, local path or the alias ``tiny-sklearn-coder`` of the policy's
            tokenizer (linked to the module's ``model_name_or_path`` by the CLI), or a
            tokenizer object.
        num_envs: Environments run in parallel (per rank).
        env_workers: Processes that step the environments (0: in this process). Slow
            environments (code execution) overlap when > 0.
        rollout_steps: Steps of every environment per collection.
        batch_size: Transitions per training batch.
        batches_per_epoch: Training batches per epoch; default one pass over a collection.
        replay_collections: Collections kept and sampled from (1: the latest only).
        max_prompt_tokens: Longest prompt fed to the policy (see the truncation rule above).
        max_new_tokens: Longest action.
        temperature: Sampling temperature.
        top_k: Top-k sampling (0 disables it).
        top_p: Nucleus sampling (1.0 disables it).
        generation_batch_size: Prompts per engine call (bounds generation memory).
        step_timeout_s: Seconds an environment step may take before its worker is replaced.
        seed: Seed of environments and sampling.
        group_size: Samples per observation (see Groups above); must divide ``num_envs``.
        generation: The engine that samples actions: ``hf`` (Hugging Face ``generate`` on
            the live policy) or ``vllm`` (vLLM in this process, the policy's weights pushed
            before every collection; ``pip install -e ".[vllm]"``).
        vllm: The vLLM engine's options (``VLLMOptions``: KV-cache space, ``max_model_len``,
            dtype, ``enforce_eager``); only with ``generation: vllm``.
    """

    def __init__(
        self,
        env: TextEnv,
        tokenizer: str | PreTrainedTokenizerBase = "tiny-sklearn-coder",
        num_envs: int = 4,
        env_workers: int = 0,
        rollout_steps: int = 1,
        batch_size: int = 4,
        batches_per_epoch: int | None = None,
        replay_collections: int = 1,
        max_prompt_tokens: int = 512,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generation_batch_size: int = 16,
        step_timeout_s: float | None = None,
        seed: int = 0,
        group_size: int = 1,
        generation: str = "hf",
        vllm: VLLMOptions | None = None,
    ) -> None:
        super().__init__()
        for name, value in dict(num_envs=num_envs, rollout_steps=rollout_steps, batch_size=batch_size,
                                replay_collections=replay_collections, max_new_tokens=max_new_tokens,
                                max_prompt_tokens=max_prompt_tokens, generation_batch_size=generation_batch_size).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if batch_size > num_envs * rollout_steps * replay_collections:
            raise ValueError(
                f"batch_size={batch_size} is larger than the rollout it is drawn from "
                f"(num_envs * rollout_steps * replay_collections = {num_envs * rollout_steps * replay_collections})"
            )
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size must be >= 1 and divide num_envs={num_envs} (each group of "
                             f"group_size environments shares its observations), got group_size={group_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got temperature={temperature}")
        if vllm is not None and generation != "vllm":
            raise ValueError(f"vllm options are set but generation={generation!r}: set generation: vllm, or drop them")
        engine_class(generation).check_settings(vllm, max_prompt_tokens + max_new_tokens)
        self.save_hyperparameters(ignore=["env", "tokenizer"])
        self.env = env
        # The engine's own options (only vLLM has any), the object itself: the hparams may hold
        # it as a plain dict (Lightning, the CLI).
        self.engine_options = vllm
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.batches_per_epoch = batches_per_epoch or max(1, num_envs * rollout_steps // batch_size)
        self.refresh_on_epoch = True
        self.vector_env: VectorEnv | None = None
        self.engine: GenerationEngine | None = None
        self.replay: deque[list[Transition]] = deque(maxlen=replay_collections)
        self.latest_stats: dict[str, float] = {}  # this rank's, of the latest collection
        self.latest_reduce: dict[str, Reduce] = {}  # how each combines across ranks
        self.best_action: str | None = None
        self.best_reward = float("-inf")
        self.collections = 0
        self.env_steps = 0
        self.episodes_finished = 0
        self.env_restarts = 0  # env workers replaced + sandbox executors restarted
        self._observations: list[str] | None = None
        self._episode_lengths = [0] * num_envs
        self._refresh_requested = True
        self._sample_rng = random.Random(seed)
        self.groups_completed = 0
        self._reset_groups()

    def _reset_groups(self) -> None:
        """Forget running episodes (their environments restart): per-slot transitions and
        returns so far, episode counters, and groups waiting for their last episodes."""
        n = self.hparams.num_envs
        self._episode_transitions: list[list[Transition]] = [[] for _ in range(n)]
        self._episode_returns = [0.0] * n
        self._episode_index = [0] * n
        self._pending_groups: dict[tuple[int, int], dict[int, tuple[list[Transition], float]]] = {}

    # ---------------------------------------------------------------- setup
    @property
    def rank_seed(self) -> int:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return self.hparams.seed + 1000 * rank

    @property
    def sampling(self) -> Sampling:
        """The sampling settings every engine applies."""
        hp = self.hparams
        return Sampling(max_new_tokens=hp.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                        pad_token_id=self.tokenizer.pad_token_id, temperature=hp.temperature, top_k=hp.top_k,
                        top_p=hp.top_p, batch_size=hp.generation_batch_size, seed=self.rank_seed)

    def make_engine(self) -> GenerationEngine:
        """The engine ``generation`` names (a subclass may return its own)."""
        hp = self.hparams
        return build_engine(hp.generation, self.engine_options, hp.max_prompt_tokens + hp.max_new_tokens)

    def setup(self, stage: str) -> None:
        # The rollout statistics reach the loggers through this callback (``rollout/*``).
        if self.trainer is not None and not any(isinstance(c, RolloutMetrics) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(RolloutMetrics())
        if self.engine is None:
            self.engine = self.make_engine()
        if self.vector_env is None:
            fns = [functools.partial(copy.deepcopy, self.env) for _ in range(self.hparams.num_envs)]
            self.vector_env = VectorEnv(fns, num_workers=self.hparams.env_workers, seed=self.rank_seed,
                                        step_timeout_s=self.hparams.step_timeout_s,
                                        group_size=self.hparams.group_size)
            self._sample_rng.seed(self.rank_seed)
            self._reset_groups()

    def on_exception(self, exception: BaseException) -> None:
        # Lightning skips ``teardown`` when fit fails: free the engine here (a vLLM engine
        # holds its KV cache and a process group).
        self._close_engine()

    def _close_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def teardown(self, stage: str) -> None:
        # Lightning calls this at the end of fit (not when it fails: ``on_exception``).
        self._close_engine()
        if self.vector_env is not None:
            self.vector_env.close()
            self.vector_env = None
            self._observations = None

    def train_dataloader(self) -> DataLoader:
        # Generation needs the policy on its device: batches are made in this process.
        return DataLoader(_RolloutStream(self), batch_size=None, num_workers=0)

    # -------------------------------------------------------------- batches
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.next_batch() if isinstance(batch, BatchTicket) else batch

    def request_refresh(self) -> None:
        """The next batch will come from a fresh collection with the current policy."""
        self._refresh_requested = True

    def next_batch(self) -> TransitionBatch:
        """A batch sampled from the replay buffer, collecting first if a refresh is due."""
        if self._refresh_requested or not self.replay:
            self.collect(self.trainer.lightning_module)
            self._refresh_requested = False
        pool = [t for collection in self.replay for t in collection]
        extra = 0
        while len(pool) < self.hparams.batch_size:
            # Groups still running (group_size > 1) or a first collection smaller than a batch.
            extra += 1
            if extra > 1000:
                raise RuntimeError("1000 collections released fewer transitions than one batch: do the episodes end?")
            self.collect(self.trainer.lightning_module)
            pool = [t for collection in self.replay for t in collection]
        chosen = self._sample_rng.sample(pool, self.hparams.batch_size)
        return TransitionBatch.collate(chosen, self.tokenizer.pad_token_id)

    # --------------------------------------------------------------- rollout
    @torch.no_grad()
    def collect(self, module: RolloutPolicy) -> list[Transition]:
        """Run every environment ``rollout_steps`` steps with ``module``'s current policy."""
        if not isinstance(module, RolloutPolicy):
            raise TypeError(f"RolloutDataModule needs a module that offers its policy as a RolloutPolicy "
                            f"(e.g. a TokenRLModule), got {type(module).__name__}")
        venv, hp, engine, sampling = self.vector_env, self.hparams, self.engine, self.sampling
        engine.load_weights(module)
        workers_restarted_before = venv.workers_restarted
        if self._observations is None:
            self._observations = venv.reset()
        sampled: list[Transition] = []  # every action of this collection
        transitions: list[Transition] = []  # what enters the replay (complete groups when group_size > 1)
        group_size, group_stds = hp.group_size, []
        rewards, successes, errors, finished_lengths, truncations = [], [], [], [], 0
        steps = tqdm(range(hp.rollout_steps), desc="rollout", leave=False, disable=hp.rollout_steps < 2)
        for _ in steps:
            prompts = self.encode_prompts(self._observations)
            samples = engine.sample(module, prompts, sampling)
            actions, logprobs = samples.actions, samples.logprobs
            texts = [self.decode_action(a) for a in actions]
            next_obs, step_rewards, dones, infos = venv.step(texts)
            truncated = [bool(d and info.get("truncated", False)) for d, info in zip(dones, infos)]
            terminated = [bool(d) and not t for d, t in zip(dones, truncated)]
            # The observation each transition leads to: after auto-reset, a truncated episode's
            # is the one it would have continued from (final_observation); a terminated one has none.
            following = [info.get("final_observation", "") if t else o for o, t, info in zip(next_obs, truncated, infos)]
            next_prompts = self.encode_prompts(["" if term else f for f, term in zip(following, terminated)])
            next_values = (engine.bootstrap_values(module, next_prompts, terminated, sampling)
                           if module.bootstraps_at_rollout else [0.0] * len(next_prompts))
            for i in range(hp.num_envs):
                transition = Transition(
                    prompts[i], actions[i], float(step_rewards[i]), terminated=terminated[i], truncated=truncated[i],
                    next_value=float(next_values[i]), logprobs=logprobs[i], next_prompt_ids=next_prompts[i],
                )
                sampled.append(transition)
                if group_size == 1:
                    transitions.append(transition)
                else:
                    self._episode_transitions[i].append(transition)
                    self._episode_returns[i] += float(step_rewards[i])
                    if dones[i]:
                        group = self._end_episode(i)
                        if group is not None:
                            transitions.extend(group)
                            group_stds.append(float(group[0].group_returns.std()))
                self._episode_lengths[i] += 1
                if dones[i]:
                    finished_lengths.append(self._episode_lengths[i])
                    self._episode_lengths[i] = 0
                if step_rewards[i] > self.best_reward:
                    self.best_reward, self.best_action = float(step_rewards[i]), texts[i]
                successes.append(bool(infos[i].get("success", False)))
                errors.append(infos[i].get("error") is not None)
                if infos[i].get("failure_kind") in EXECUTOR_RESTART_KINDS:
                    self.env_restarts += 1
                    log.warning("env %d: %s; its program scored -1.0 (env restart %d of this run)",
                                i, infos[i].get("error"), self.env_restarts + venv.workers_restarted - workers_restarted_before)
            truncations += sum(truncated)
            rewards.extend(float(r) for r in step_rewards)
            self._observations = next_obs
        self.env_restarts += venv.workers_restarted - workers_restarted_before  # each logged by VectorEnv
        if transitions or group_size == 1:
            self.replay.append(transitions)
        self.collections += 1
        self.env_steps += len(sampled)
        self.episodes_finished += len(finished_lengths)
        # This rank's statistics, and how each combines over ranks when logged (the same keys
        # on every rank): means weighted by their sample counts, extremes, summed counters.
        n = len(sampled)
        stats = {
            "rollout/reward_mean": (sum(rewards) / n, Reduce("mean", n)),
            "rollout/reward_max": (max(rewards), Reduce("max")),
            "rollout/reward_min": (min(rewards), Reduce("min")),
            "rollout/success_rate": (sum(successes) / n, Reduce("mean", n)),
            "rollout/error_rate": (sum(errors) / n, Reduce("mean", n)),
            "rollout/episode_len": ((sum(finished_lengths) / len(finished_lengths)) if finished_lengths else float("nan"),
                                    Reduce("mean", len(finished_lengths))),
            "rollout/truncated_rate": (truncations / n, Reduce("mean", n)),
            "rollout/action_tokens": (sum(t.action_ids.numel() for t in sampled) / n, Reduce("mean", n)),
            "rollout/best_reward": (self.best_reward, Reduce("max")),
            "rollout/env_steps": (float(self.env_steps), Reduce("sum")),
            "rollout/env_restarts": (float(self.env_restarts), Reduce("sum")),
        }
        if group_size > 1:
            stats["rollout/groups_completed"] = (float(self.groups_completed), Reduce("sum"))
            # Groups whose G returns are all equal: zero advantage, no policy gradient (NaN when
            # no group ended in this collection).
            stats["rollout/zero_std_groups"] = (
                sum(s == 0 for s in group_stds) / len(group_stds) if group_stds else float("nan"),
                Reduce("mean", len(group_stds)),
            )
        self.latest_stats = {k: v for k, (v, _) in stats.items()}
        self.latest_reduce = {k: r for k, (_, r) in stats.items()}
        return transitions

    def _end_episode(self, i: int) -> list[Transition] | None:
        """Slot ``i``'s episode ended: file it with its group; the group's transitions, with
        their group fields set, once all of its ``group_size`` episodes have ended."""
        size = self.hparams.group_size
        key = (i // size, self._episode_index[i])
        members = self._pending_groups.setdefault(key, {})
        members[i % size] = (self._episode_transitions[i], self._episode_returns[i])
        self._episode_transitions[i], self._episode_returns[i] = [], 0.0
        self._episode_index[i] += 1
        if len(members) < size:
            return None
        del self._pending_groups[key]
        returns = torch.tensor([members[m][1] for m in range(size)], dtype=torch.float32)
        group_id, self.groups_completed = self.groups_completed, self.groups_completed + 1
        released = []
        for m in range(size):
            for t in members[m][0]:
                t.group_id, t.group_member, t.group_returns = group_id, m, returns.clone()
                released.append(t)
        return released

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters, the best action and the replay contents (environments restart their episode)."""
        return {
            # Plain dicts of tensors and numbers: loadable with torch.load(weights_only=True).
            "replay": [[dataclasses.asdict(t) for t in c] for c in self.replay],
            "best_action": self.best_action,
            "best_reward": self.best_reward,
            "collections": self.collections,
            "env_steps": self.env_steps,
            "episodes_finished": self.episodes_finished,
            "env_restarts": self.env_restarts,
            "latest_stats": self.latest_stats,
            "latest_reduce": {k: tuple(r) for k, r in self.latest_reduce.items()},
            "sample_rng": self._sample_rng.getstate(),
            "refresh_requested": self._refresh_requested,
            "groups_completed": self.groups_completed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay = deque([[Transition(**_upgrade(t)) for t in c] for c in state["replay"]],
                            maxlen=self.hparams.replay_collections)
        self.best_action, self.best_reward = state["best_action"], state["best_reward"]
        self.collections, self.env_steps = state["collections"], state["env_steps"]
        self.episodes_finished, self.latest_stats = state["episodes_finished"], state["latest_stats"]
        self.latest_reduce = {k: Reduce(*r) for k, r in state.get("latest_reduce", {}).items()}
        self.env_restarts = state.get("env_restarts", 0)
        self._sample_rng.setstate(state["sample_rng"])
        self._refresh_requested = state["refresh_requested"]
        self.groups_completed = state.get("groups_completed", 0)


def _upgrade(fields: dict[str, Any]) -> dict[str, Any]:
    """A stored transition with one ``done`` field (checkpoints that do not separate terminal
    from truncated, where ``done`` meant either) loads as terminated, as it was trained."""
    fields = dict(fields)
    if "done" in fields:
        fields["terminated"] = fields.pop("done")
    return fields
