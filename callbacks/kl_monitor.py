"""Exact KL(pi || rho), entropy on fresh rollouts, and held-out perplexity, with an optional KL guard."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torchmetrics.text import Perplexity

from etpo_lightning.core.batch import TransitionBatch
from etpo_lightning.core.rank_stats import Reduce, reduce_across_ranks
from etpo_lightning.core.functional import kl_and_entropy


def read_heldout(path: str | Path) -> list[str]:
    """Held-out texts: a ``.jsonl`` file with one object per line, either ``{"text": ...}`` or
    ``{"prompt": ..., "body": ...}`` (the tiny coder's held-out samples: prompt + body)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                texts.append(record["text"] if "text" in record else record["prompt"] + record["body"])
    return texts


class KLMonitor(pl.Callback):
    """After every fresh rollout collection, log the exact per-token KL(pi || rho) and entropy
    of the policy on the sampled actions (``monitor/kl``, ``monitor/entropy``) and the
    policy's perplexity on a held-out corpus (``monitor/perplexity``, torchmetrics).

    When ``kl_threshold`` is set and the KL passes it, ``on_threshold`` decides: ``warn`` or
    ``stop`` (ends fit). ``adapt_beta`` is the adaptive KL controller of RLHF instead: after
    every collection it multiplies the module's KL coefficient ``kl_coef`` (the ``beta`` or
    ``beta_kl`` the losses use) by ``1 + adapt_rate * clip(KL / target_kl - 1, -0.2, 0.2)``,
    steering KL towards ``target_kl`` (default ``kl_threshold``), and never below ``min_beta``
    when one is set: a floor turns the controller into a one-sided KL cap that only tightens.
    The module's hyperparameters are never changed: they keep the initial value the run was
    configured with; the adapted one is logged as ``monitor/beta`` and saved in checkpoints (the
    module's and this callback's state).

    Args:
        heldout_path: ``.jsonl`` held-out texts; default the ``heldout.jsonl`` saved next to
            the checkpoint the policy was loaded from, if there is one (the tiny coder has).
        heldout_max_texts: Held-out texts used per evaluation.
        max_length: Tokens per held-out text.
        batch_size: Texts or transitions per forward pass.
        kl_threshold: KL (nats per token) that triggers ``on_threshold``; None disables it.
        on_threshold: ``warn``, ``stop`` or ``adapt_beta``.
        target_kl: Target of ``adapt_beta`` (default ``kl_threshold``); only with ``adapt_beta``.
        adapt_rate: Step size of ``adapt_beta``.
        min_beta: Floor of the adapted coefficient (``adapt_beta`` only); None lets it fall
            freely. Early in a run the KL is far below any target, so an unfloored controller
            first lowers beta, just when the critic is least trustworthy: with ETPO the policy
            then followed the critic's noisy early gaps (docs/etpo.md, "Why the quickstart's settings").
    """

    def __init__(
        self,
        heldout_path: str | None = None,
        heldout_max_texts: int = 64,
        max_length: int = 256,
        batch_size: int = 8,
        kl_threshold: float | None = None,
        on_threshold: Literal["warn", "stop", "adapt_beta"] = "warn",
        target_kl: float | None = None,
        adapt_rate: float = 0.1,
        min_beta: float | None = None,
    ) -> None:
        if on_threshold not in ("warn", "stop", "adapt_beta"):
            raise ValueError(f"on_threshold must be 'warn', 'stop' or 'adapt_beta', got {on_threshold!r}")
        if on_threshold == "adapt_beta" and target_kl is None and kl_threshold is None:
            raise ValueError("on_threshold='adapt_beta' needs target_kl (or kl_threshold): the KL it steers towards")
        if target_kl is not None and on_threshold != "adapt_beta":
            raise ValueError(f"target_kl is the target of on_threshold='adapt_beta'; with on_threshold="
                             f"{on_threshold!r} it would be ignored (set kl_threshold instead)")
        if min_beta is not None and on_threshold != "adapt_beta":
            raise ValueError(f"min_beta is the floor of on_threshold='adapt_beta'; with on_threshold="
                             f"{on_threshold!r} beta never changes and it would be ignored")
        if min_beta is not None and not min_beta > 0:
            raise ValueError(f"min_beta must be > 0, got {min_beta}")
        self.heldout_path = heldout_path
        self.heldout_max_texts = heldout_max_texts
        self.max_length = max_length
        self.batch_size = batch_size
        self.kl_threshold = kl_threshold
        self.on_threshold = on_threshold
        self.target_kl = target_kl if target_kl is not None else kl_threshold
        self.adapt_rate = adapt_rate
        self.min_beta = min_beta
        self._seen_collections = -1
        self._heldout: list[str] | None = None
        self.beta: float | None = None  # the adapted beta, restored on resume
        self.last: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # one entry per evaluated collection

    # ---------------------------------------------------------------- inputs
    def _heldout_texts(self, pl_module: pl.LightningModule) -> list[str]:
        if self._heldout is None:
            path = self.heldout_path
            if path is None:
                # A checkpoint directory that ships held-out texts (the tiny coder does).
                loaded_from = getattr(getattr(pl_module.policy, "config", None), "_name_or_path", "") or ""
                candidate = Path(loaded_from) / "heldout.jsonl"
                path = str(candidate) if loaded_from and candidate.is_file() else None
            self._heldout = read_heldout(path)[: self.heldout_max_texts] if path else []
        return self._heldout

    @torch.no_grad()
    def rollout_kl_entropy(self, pl_module: pl.LightningModule, transitions: list, pad_id: int) -> tuple[float, float]:
        """Mean exact per-token KL(pi||rho) and entropy of pi over the transitions' action tokens."""
        kl, ent, _ = self._rollout_kl_entropy_tokens(pl_module, transitions, pad_id)
        return kl, ent

    @torch.no_grad()
    def _rollout_kl_entropy_tokens(self, pl_module: pl.LightningModule, transitions: list,
                                   pad_id: int) -> tuple[float, float, float]:
        """``rollout_kl_entropy`` and the number of action tokens it averaged over."""
        kl_sum = ent_sum = tokens = 0.0
        for start in range(0, len(transitions), self.batch_size):
            batch = TransitionBatch.collate(transitions[start:start + self.batch_size], pad_id).to(pl_module.device)
            kl, ent = kl_and_entropy(pl_module.action_outputs(pl_module.policy, batch),
                                     pl_module.action_outputs(pl_module.reference, batch))
            mask = batch.action_mask.float()
            kl_sum += float((kl * mask).sum())
            ent_sum += float((ent * mask).sum())
            tokens += float(mask.sum())
        return kl_sum / max(tokens, 1.0), ent_sum / max(tokens, 1.0), tokens

    @torch.no_grad()
    def heldout_perplexity(self, pl_module: pl.LightningModule, tokenizer: Any) -> float:
        """Perplexity of the policy on the held-out texts (padding ignored)."""
        texts = self._heldout_texts(pl_module)
        if not texts:
            return math.nan
        metric = Perplexity(ignore_index=-100).to(pl_module.device)
        policy = pl_module.policy
        was_training = policy.training
        policy.eval()
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_length).to(pl_module.device)
                mask = enc["attention_mask"]
                position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
                logits = policy(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids, use_cache=False).logits
                targets = enc["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                metric.update(logits[:, :-1].float(), targets)
        finally:
            policy.train(was_training)
        return float(metric.compute())

    # ----------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.beta is not None:  # resumed with an adapted beta
            pl_module.kl_coef = self.beta

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        dm = trainer.datamodule
        fresh = dm is not None and bool(getattr(dm, "replay", None)) and dm.collections != self._seen_collections
        # Under DDP/FSDP every rank evaluates, and joins the reduction, if any rank collected.
        if not trainer.strategy.reduce_boolean_decision(fresh, all=False):
            return
        self._seen_collections = dm.collections
        kl, entropy, tokens = self._rollout_kl_entropy_tokens(pl_module, dm.replay[-1], dm.tokenizer.pad_token_id)
        # The KL and entropy over the tokens of all ranks (each rank's mean weighted by its token
        # count), so that the guard and adapt_beta act on the same KL, and keep beta, on every rank.
        self.last = reduce_across_ranks(
            {"monitor/kl": kl, "monitor/entropy": entropy,
             "monitor/perplexity": self.heldout_perplexity(pl_module, dm.tokenizer)},
            {"monitor/kl": Reduce("mean", tokens), "monitor/entropy": Reduce("mean", tokens)},
            pl_module.device,
        )
        kl = self.last["monitor/kl"]
        self._guard(trainer, pl_module, kl)
        self.last["monitor/beta"] = float(pl_module.kl_coef)
        self.history.append(dict(self.last, collection=float(dm.collections)))
        pl_module.log_dict(self.last, prog_bar=False)

    def _guard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kl: float) -> None:
        # adapt_beta steers towards its target after every collection, whether or not the
        # KL passed a threshold (target_kl alone is enough to switch it on).
        if self.on_threshold == "adapt_beta":
            error = max(-0.2, min(0.2, kl / self.target_kl - 1.0))
            pl_module.kl_coef = float(pl_module.kl_coef) * (1.0 + self.adapt_rate * error)
            if self.min_beta is not None:
                pl_module.kl_coef = max(pl_module.kl_coef, self.min_beta)
            self.beta = pl_module.kl_coef
        elif self.kl_threshold is not None and kl > self.kl_threshold:
            message = f"KL(pi||rho) = {kl:.4f} nats/token passed kl_threshold={self.kl_threshold}"
            if self.on_threshold == "stop":
                warnings.warn(message + ": stopping fit", RuntimeWarning, stacklevel=2)
                trainer.should_stop = True
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "seen_collections": self._seen_collections}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.beta = state_dict.get("beta")
        self._seen_collections = state_dict.get("seen_collections", -1)
