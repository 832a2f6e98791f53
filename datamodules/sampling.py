"""The rollout's use of the policy: prompts to token ids, sampled actions, bootstrap values.

``PolicySampling`` is a mixin of ``RolloutDataModule`` (it uses the datamodule's
``tokenizer`` and ``hparams``): ``generate`` samples one action per prompt with the module's
policy and returns, for each token, its log-probability under the distribution it was
drawn from; ``_next_values`` asks the module for V(s') of the next observations.
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
from torch import Tensor


class PolicySampling:
    """Sampling from the policy and bootstrapping with it, for ``RolloutDataModule``."""

    def encode_prompts(self, texts: list[str]) -> list[Tensor]:
        limit = self.hparams.max_prompt_tokens
        ids = []
        for text in texts:
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) > limit:
                warnings.warn(f"prompt of {len(tokens)} tokens truncated to its last {limit}", stacklevel=2)
                tokens = tokens[-limit:]
            ids.append(torch.tensor(tokens, dtype=torch.long))
        return ids

    def _pad_left(self, prompts: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        width = max(p.numel() for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - p.numel():], mask[i, width - p.numel():] = p, True
        return ids.to(device), mask.to(device)

    @torch.no_grad()
    def generate(self, module: pl.LightningModule, prompts: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Sample one action per prompt with the module's policy (up to and including EOS).

        Returns the actions and, for every sampled token, its log-probability under the
        distribution it was actually drawn from: the policy in eval mode (no dropout) after
        ``generate``'s temperature / top-k / top-p processing. That is the behaviour policy
        mu of off-policy corrections (Retrace traces, PPO ratios); at temperature 1 with no
        top-k/top-p it is the policy itself.
        """
        hp, policy = self.hparams, module.policy
        was_training = policy.training
        policy.eval()
        eos = self.tokenizer.eos_token_id
        actions: list[Tensor] = []
        logprobs: list[Tensor] = []
        try:
            for start in range(0, len(prompts), hp.generation_batch_size):
                ids, mask = self._pad_left(prompts[start:start + hp.generation_batch_size], module.device)
                # Under FSDP: gather the policy's top-level weights (generate bypasses the
                # wrapper) and keep ranks stepping together when their lengths differ.
                with module.generation_context(policy):
                    out = policy.generate(
                        input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=hp.temperature,
                        top_k=hp.top_k, top_p=hp.top_p, max_new_tokens=hp.max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos, use_cache=True,
                        output_scores=True, return_dict_in_generate=True,
                        **module.generation_kwargs(),
                    )
                new_tokens = out.sequences[:, ids.shape[1]:]
                # out.scores[t] [B, V]: the processed logits token t was sampled from. Only the
                # taken token's log-probability is kept (one float per token).
                taken = torch.stack([
                    torch.log_softmax(step.float(), dim=-1).gather(-1, new_tokens[:, t, None]).squeeze(-1)
                    for t, step in enumerate(out.scores)
                ], dim=1).cpu() if out.scores else torch.zeros(new_tokens.shape, dtype=torch.float32)
                for row, row_logp in zip(new_tokens.cpu(), taken):
                    ends = (row == eos).nonzero()
                    n = int(ends[0]) + 1 if len(ends) else row.numel()
                    actions.append(row[:n])
                    logprobs.append(row_logp[:n].clone())
        finally:
            policy.train(was_training)
        return actions, logprobs

    def decode_action(self, action_ids: Tensor) -> str:
        return self.tokenizer.decode(action_ids, skip_special_tokens=True)

    def _next_values(self, module: pl.LightningModule, next_prompts: list[Tensor], terminated: list[bool]) -> list[float]:
        """V(s') at the first position of each next observation; 0 where the episode terminated."""
        values = [0.0] * len(next_prompts)
        # Under FSDP every rank must make the same forward calls: forward all rows there
        # (a terminated row's empty prompt becomes one pad token; its value is discarded).
        pad = torch.tensor([self.tokenizer.pad_token_id], dtype=torch.long)
        rows = list(range(len(terminated))) if module.under_fsdp() else [i for i, d in enumerate(terminated) if not d]
        for start in range(0, len(rows), self.hparams.generation_batch_size):
            chunk = rows[start:start + self.hparams.generation_batch_size]
            ids, mask = self._pad_left([next_prompts[i] if next_prompts[i].numel() else pad for i in chunk], module.device)
            for i, v in zip(chunk, module.bootstrap_values(ids, mask).tolist()):
                values[i] = 0.0 if terminated[i] else v
        return values
