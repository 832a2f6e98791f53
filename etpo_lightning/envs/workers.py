"""The environments' side of ``VectorEnv``: one slot per environment, and worker processes.

``Slot`` wraps one :class:`TextEnv` with auto-reset and turns an exception in ``step`` into
a failed step (used in-process and inside workers). ``worker_main`` is the loop of a worker
process (started with ``forkserver`` or ``spawn``, so it imports this module and
``etpo_lightning.envs``, never torch); ``Worker`` is the trainer's handle on one.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import pickle
import signal
from collections.abc import Callable, Sequence
from typing import Any

from .base import TextEnv

EnvFn = Callable[[], TextEnv]


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Slot:
    """One environment and the step/auto-reset logic both execution modes share."""

    def __init__(self, env_fn: EnvFn) -> None:
        self.env_fn = env_fn
        self.env: TextEnv | None = None
        self.episode_step = 0

    def reset(self, seed: int) -> str:
        if self.env is None:
            self.env = self.env_fn()
        self.episode_step = 0
        return self.env.reset(seed=seed)

    def step(self, action: str, next_seed: int) -> tuple[str, float, bool, dict[str, Any]]:
        self.episode_step += 1
        try:
            if self.env is None:
                raise RuntimeError("the environment could not be re-created")
            obs, reward, done, info = self.env.step(action)
            info = dict(info) if isinstance(info, dict) else {"env_info": info}
            reward, done = float(reward), bool(done)
        except Exception as exc:  # noqa: BLE001 - one env's bug must not stop the others
            obs, reward, done = "", -1.0, True
            info = {"error": f"env raised {describe_error(exc)}", "success": False, "exception": True}
        info.setdefault("error", None)
        info.setdefault("success", False)
        info.setdefault("episode_step", self.episode_step)
        info["truncated"] = bool(done and info.get("truncated", False))
        if done:
            info["final_observation"] = obs
            obs = self._auto_reset(next_seed, info)
        return obs, reward, done, info

    def _auto_reset(self, seed: int, info: dict[str, Any]) -> str:
        try:
            return self.reset(seed)
        except Exception as first:  # noqa: BLE001
            # A broken env (e.g. after raising mid-step) gets one fresh instance.
            self.close()
            try:
                return self.reset(seed)
            except Exception as exc:  # noqa: BLE001
                self.close()
                info["reset_error"] = f"reset failed twice: {describe_error(first)}; {describe_error(exc)}"
                return ""

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.close()
            except Exception:  # noqa: BLE001
                pass
            self.env = None


def worker_main(conn: mpc.Connection, env_fns: dict[int, EnvFn]) -> None:
    """Worker process: serve reset/step/close commands for a few environments."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    slots = {i: Slot(fn) for i, fn in env_fns.items()}
    try:
        while True:
            try:
                command, payload = conn.recv()
            except (EOFError, OSError):
                break
            if command == "reset":
                reply: dict[int, Any] = {}
                for i, seed in payload:
                    try:
                        reply[i] = ("ok", slots[i].reset(seed))
                    except Exception as exc:  # noqa: BLE001
                        reply[i] = ("error", describe_error(exc))
            elif command == "step":
                reply = {i: slots[i].step(action, seed) for i, action, seed in payload}
            else:
                break
            try:
                conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError):
                # An info value that cannot be pickled: send its text instead.
                conn.send({i: as_text(r) for i, r in reply.items()})
    finally:
        for slot in slots.values():
            slot.close()
        conn.close()


def as_text(result: Any) -> Any:
    if isinstance(result, tuple) and len(result) == 4:
        obs, reward, done, info = result
        return obs, reward, done, {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in info.items()}
    return result


class Worker:
    def __init__(self, ctx: Any, env_ids: list[int], env_fns: Sequence[EnvFn]) -> None:
        self.env_ids = env_ids
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=worker_main,
            args=(child, {i: env_fns[i] for i in env_ids}),
            name=f"etpo-env-worker-{env_ids[0]}",
            daemon=True,
        )
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)
        self.conn.close()
