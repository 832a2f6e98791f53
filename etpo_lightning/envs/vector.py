"""Run several :class:`TextEnv` side by side, in-process or in worker processes.

Semantics (both modes):

* ``reset()`` resets every environment and returns their first observations.
* ``step(actions)`` steps every environment once. When environment ``i`` finishes an
  episode (``done[i]`` is True) it is reset at once (auto-reset): ``obs[i]`` is the
  *first observation of its new episode*, while ``reward[i]``, ``done[i]`` and
  ``info[i]`` belong to the episode that just ended; ``info[i]["final_observation"]``
  holds the observation the finished episode ended with.
* An environment that raises in ``step`` gets reward ``-1.0``, ``done=True`` and
  ``info["error"] = "env raised <Type>: <message>"``; the others are unaffected.
* Every ``info`` has ``error``, ``success`` and ``episode_step``.
* Seeds: reset number ``k`` of environment ``i`` uses
  ``SeedSequence([seed, i // group_size, k])``, so runs are reproducible and DDP ranks that
  pass different ``seed`` values get different episodes. With ``group_size`` G > 1 the
  environments form groups of G consecutive slots whose k-th episodes start from the same
  seed, hence (for an environment whose ``reset(seed)`` is deterministic) from the same
  task and first observation: G samples per observation, as GRPO needs. The slots of a
  group still step independently (their actions differ); with G = 1 (default) every slot
  has its own seeds, as before groups existed.

With ``num_workers > 0`` the environments live in worker processes started with the
``forkserver`` (default on Linux) or ``spawn`` method -- never ``fork``, because the trainer
holds torch threads. Environment ``i`` lives in worker ``i % num_workers``; slow steps of
different workers overlap. A worker that dies, or does not answer within
``step_timeout_s``, is killed and replaced; its environments are re-created and reset,
and their step reports ``-1.0`` with ``"worker crashed ..."`` or ``"worker timed out ..."``
(environments sharing that worker are affected too). ``step_timeout_s`` cannot be
enforced in-process (``num_workers=0``). Every replacement is logged as one warning line
on the ``etpo_lightning.envs.vector`` logger (which worker, why, what was done) and counted in
``workers_restarted``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import pickle
import signal
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .workers import EnvFn, Slot, Worker, describe_error

log = logging.getLogger(__name__)


class VectorEnv:
    """A batch of text environments with auto-reset (see the module docstring).

    Args:
        env_fns: one zero-argument factory per environment. With ``num_workers > 0`` they
            must be picklable (a class, ``functools.partial`` or module-level function --
            not a lambda).
        num_workers: 0 runs the environments in this process, one after the other; ``n``
            spreads them over ``n`` worker processes (at most one per environment).
        seed: base seed; per-environment seeds are derived from it.
        step_timeout_s: a worker that does not answer a step within this time is killed
            and replaced (``None``: wait forever). Only with ``num_workers > 0``.
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
        reset_timeout_s: how long a (re)started worker may take to create and reset its
            environments.
        group_size: environments ``[g*G, (g+1)*G)`` share the seed of each of their resets
            (see the module docstring); must divide the number of environments.
    """

    def __init__(
        self,
        env_fns: Sequence[EnvFn],
        num_workers: int = 0,
        seed: int = 0,
        step_timeout_s: float | None = None,
        start_method: str | None = None,
        reset_timeout_s: float | None = 600.0,
        group_size: int = 1,
    ) -> None:
        self.env_fns = list(env_fns)
        if not self.env_fns:
            raise ValueError("VectorEnv needs at least one env_fn")
        if group_size < 1 or len(self.env_fns) % group_size:
            raise ValueError(f"group_size must be >= 1 and divide the number of environments "
                             f"({len(self.env_fns)}), got group_size={group_size}")
        self.group_size = int(group_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_envs = len(self.env_fns)
        self.num_workers = min(int(num_workers), self.num_envs)
        self.seed = int(seed)
        self.step_timeout_s = step_timeout_s
        self.reset_timeout_s = reset_timeout_s
        #: Workers replaced after a crash or a timeout.
        self.workers_restarted = 0
        #: Steps in which an environment raised.
        self.env_exceptions = 0
        #: Episodes that ended (success, failure or max_steps).
        self.episodes_finished = 0
        self._resets = [0] * self.num_envs
        self._episode_step = [0] * self.num_envs
        self._needs_reset = True
        self._closed = False
        self._slots: list[Slot] = []
        self._workers: list[Worker] = []
        if self.num_workers == 0:
            self._slots = [Slot(fn) for fn in self.env_fns]
            return
        try:
            pickle.dumps(self.env_fns)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(
                "env_fns must be picklable when num_workers > 0 (use a class, functools.partial "
                f"or a module-level function, not a lambda): {describe_error(exc)}"
            ) from exc
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn' (never 'fork'), got {start_method!r}")
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Workers fork from a server that imported the envs once: cheap (re)starts.
            self._ctx.set_forkserver_preload(["etpo_lightning.envs"])
        self._workers = [
            Worker(self._ctx, list(range(w, self.num_envs, self.num_workers)), self.env_fns) for w in range(self.num_workers)
        ]

    # -- seeds -----------------------------------------------------------------------------

    def _seed_for(self, i: int) -> int:
        """Seed of the next reset of env ``i`` (the counter moves on when it is used)."""
        group = i // self.group_size
        return int(np.random.SeedSequence([self.seed, group, self._resets[i]]).generate_state(1)[0])

    # -- public API ------------------------------------------------------------------------

    def reset(self) -> list[str]:
        """Reset every environment; return the first observations."""
        self._check_open()
        seeds = [self._seed_for(i) for i in range(self.num_envs)]
        if self.num_workers == 0:
            obs = [slot.reset(seeds[i]) for i, slot in enumerate(self._slots)]
        else:
            obs = [""] * self.num_envs
            for w in self._workers:
                self._send(w, ("reset", [(i, seeds[i]) for i in w.env_ids]))
            replies, failures = self._gather(list(self._workers), self.reset_timeout_s)
            for w, reason in failures.items():
                replies[w] = {i: ("ok", o) for i, o in self._replace(w, reason, in_step=False).items()}
            for reply in replies.values():
                for i, (status, value) in reply.items():
                    if status != "ok":
                        raise RuntimeError(f"env {i} failed to reset: {value}")
                    obs[i] = value
        for i in range(self.num_envs):
            self._resets[i] += 1
            self._episode_step[i] = 0
        self._needs_reset = False
        return obs

    def step(self, actions: Sequence[str]) -> tuple[list[str], list[float], list[bool], list[dict[str, Any]]]:
        """Step every environment once; finished environments are reset automatically."""
        self._check_open()
        if self._needs_reset:
            raise RuntimeError("call VectorEnv.reset() before step()")
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(actions)}")
        seeds = [self._seed_for(i) for i in range(self.num_envs)]
        results: dict[int, tuple[str, float, bool, dict[str, Any]]] = {}
        if self.num_workers == 0:
            for i, slot in enumerate(self._slots):
                results[i] = slot.step(actions[i], seeds[i])
        else:
            for w in self._workers:
                self._send(w, ("step", [(i, actions[i], seeds[i]) for i in w.env_ids]))
            replies, failures = self._gather(list(self._workers), self.step_timeout_s)
            for reply in replies.values():
                results.update(reply)
            for w, reason in failures.items():
                for i, first_obs in self._replace(w, reason).items():
                    info = {
                        "error": reason,
                        "success": False,
                        "episode_step": self._episode_step[i] + 1,
                        "worker_restarted": True,
                        "truncated": False,  # the episode is lost: terminal, nothing to bootstrap from
                        "final_observation": "",
                    }
                    results[i] = (first_obs, -1.0, True, info)
        obs, rewards, dones, infos = [], [], [], []
        for i in range(self.num_envs):
            o, r, d, info = results[i]
            if info.get("exception"):
                self.env_exceptions += 1
            if d:
                self._resets[i] += 1
                self._episode_step[i] = 0
                self.episodes_finished += 1
            else:
                self._episode_step[i] += 1
            obs.append(o)
            rewards.append(float(r))
            dones.append(bool(d))
            infos.append(info)
        return obs, rewards, dones, infos

    def worker_pid(self, env_index: int) -> int | None:
        """Pid of the worker process hosting ``env_index`` (``None`` in-process)."""
        if self.num_workers == 0:
            return None
        return self._workers[env_index % self.num_workers].process.pid

    def close(self) -> None:
        """Stop the workers (or close the in-process environments). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            slot.close()
        for w in self._workers:
            try:
                w.conn.send(("close", None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10.0
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            w.kill()

    def __enter__(self) -> "VectorEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __len__(self) -> int:
        return self.num_envs

    # -- workers ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VectorEnv is closed")

    @staticmethod
    def _send(worker: Worker, message: tuple) -> None:
        try:
            worker.conn.send(message)
        except (OSError, ValueError):
            pass  # a dead worker: _gather sees its sentinel and reports the crash

    def _gather(self, workers: list[Worker], timeout: float | None) -> tuple[dict[Worker, dict], dict[Worker, str]]:
        """Wait for one reply per worker; return replies and failure reasons."""
        replies: dict[Worker, dict] = {}
        failures: dict[Worker, str] = {}
        pending = {w.conn: w for w in workers}
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            sentinels = {w.process.sentinel: w for w in pending.values()}
            ready = mpc.wait(list(pending) + list(sentinels), timeout=remaining)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                for w in pending.values():
                    failures[w] = (
                        f"worker timed out: no answer within step_timeout_s={timeout:g} s; "
                        f"it was killed and env(s) {w.env_ids} re-created"
                    )
                break
            for obj in ready:
                w = pending.get(obj) or sentinels.get(obj)
                if w is None or w.conn not in pending:
                    continue
                try:
                    if w.conn.poll():
                        replies[w] = w.conn.recv()
                        del pending[w.conn]
                        continue
                except (EOFError, OSError):
                    pass
                if obj is w.conn or not w.process.is_alive():
                    w.process.join(1.0)
                    code = w.process.exitcode
                    name = f", {signal.Signals(-code).name}" if code is not None and code < 0 else ""
                    failures[w] = f"worker crashed (exit code {code}{name}); env(s) {w.env_ids} re-created"
                    del pending[w.conn]
        return replies, failures

    def _replace(self, worker: Worker, reason: str, in_step: bool = True) -> dict[int, str]:
        """Kill ``worker``, start a new one for its environments, reset them; return first obs."""
        old_pid = worker.process.pid
        worker.kill()
        self.workers_restarted += 1
        new = Worker(self._ctx, worker.env_ids, self.env_fns)
        outcome = "their step scores -1.0 and their episodes restart" if in_step else "they are reset again"
        log.warning("env worker %d (pid %s) replaced by pid %s: %s; %s (worker restart %d of this VectorEnv)",
                    self._workers.index(worker), old_pid, new.process.pid, reason, outcome, self.workers_restarted)
        self._workers[self._workers.index(worker)] = new
        self._send(new, ("reset", [(i, self._seed_for(i)) for i in new.env_ids]))
        replies, failures = self._gather([new], self.reset_timeout_s)
        if failures:
            raise RuntimeError(f"could not replace a worker ({reason}): the new worker failed too: {failures[new]}")
        obs = {}
        for i, (status, value) in replies[new].items():
            if status != "ok":
                raise RuntimeError(f"could not replace a worker ({reason}): env {i} failed to reset: {value}")
            obs[i] = value
        return obs
