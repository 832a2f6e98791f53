"""The transition: what one environment step leaves for training, and its padded batch form.

Storage is deliberately small: token ids and a few scalars per transition, plus the
per-token log-probabilities of the distribution each token was sampled from (4 bytes a
token: Retrace traces and PPO-style ratios need them). No full-vocabulary tensor is ever
stored. From the future ETPO needs only V(s_{t+1}); it is evaluated when the transition
is trained on, with the networks of that moment, from the next observation's token ids
(``next_prompt_ids``), so a replayed bootstrap is never older than the batch.

An episode ends in one of two ways, kept apart because they back up differently:
``terminated`` (the task's own end: success, or an environment that cannot go on; no
bootstrap) and ``truncated`` (the step limit ran out in a state that could go on; the
target still bootstraps from V at ``next_prompt_ids``, the observation the agent would
have seen next).

With G samples per observation (``RolloutDataModule(group_size=G)``, for GRPO) a
transition also records its *group*: the G episodes that started from the same
observation. ``group_id`` names the group, ``group_member`` is the episode's index in it
and ``group_returns`` holds the G episode returns (undiscounted sums of rewards), known
once every episode of the group has ended; the group-relative advantage of the episode
is a function of these alone (``grpo.losses.group_advantages``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Transition:
    """One environment step: observation tokens, the action the policy wrote, and its outcome."""

    prompt_ids: Tensor  # [P] int, the observation's tokens (already truncated by the datamodule)
    action_ids: Tensor  # [L] int, the generated tokens, EOS included when the policy emitted it
    reward: float
    terminated: bool  # the episode ended in a terminal state: no bootstrap
    truncated: bool = False  # the episode was cut by its step limit: bootstrap from next_prompt_ids
    next_value: float = 0.0  # V(s_{t+1}) at rollout time (modules that bootstrap then); 0 if terminated
    logprobs: Tensor | None = None  # [L] float32, log mu(w_j | h_j) of the sampling distribution
    next_prompt_ids: Tensor | None = None  # [P'] int, the next observation's tokens; empty if terminated
    group_id: int = -1  # the group of episodes sharing a first observation (-1: no group)
    group_member: int = -1  # this episode's index in its group, 0..G-1
    group_returns: Tensor | None = None  # [G] float32, the returns of the group's episodes

    def nbytes(self) -> int:
        """Bytes this transition holds in tensors (ids, log-probs, group returns) plus its scalars."""
        tensors = [self.prompt_ids, self.action_ids, self.logprobs, self.next_prompt_ids, self.group_returns]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + 6 * 4


@dataclass
class TransitionBatch:
    """A padded batch of transitions, the input of ``ETPOModule.training_step``.

    Prompts are LEFT-padded so that every prompt ends at column P-1 and the first action
    token is predicted from the same column in every row; actions are RIGHT-padded so
    that the valid tokens of ``action_mask`` are left-aligned, as the losses expect.
    """

    prompt_ids: Tensor  # [B, P] long
    prompt_mask: Tensor  # [B, P] bool
    action_ids: Tensor  # [B, L] long
    action_mask: Tensor  # [B, L] bool
    rewards: Tensor  # [B] float32
    dones: Tensor  # [B] float32, d_t of the spec: 1.0 = terminated (no bootstrap); truncation is 0
    next_values: Tensor  # [B] float32, rollout-time V(s_{t+1})
    old_logprobs: Tensor | None = field(default=None)  # [B, L] float32, log mu of the taken tokens, 0 at padding
    # The next observations, LEFT-padded like the prompts, for bootstraps evaluated at training
    # time; a terminated row holds one pad token (mask True) so every row has a valid input.
    next_prompt_ids: Tensor | None = field(default=None)  # [B, P'] long
    next_prompt_mask: Tensor | None = field(default=None)  # [B, P'] bool
    # Groups (G samples per observation; None unless every transition has one): the group
    # ids [B] long, each row's member index [B] long and its group's returns [B, G] float32.
    group_ids: Tensor | None = field(default=None)
    group_members: Tensor | None = field(default=None)
    group_returns: Tensor | None = field(default=None)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> TransitionBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return TransitionBatch(**moved)

    @classmethod
    def collate(cls, transitions: Sequence[Transition], pad_token_id: int) -> TransitionBatch:
        """Pad a list of transitions into a batch (prompts left, actions right)."""
        if not transitions:
            raise ValueError("cannot collate an empty list of transitions")
        prompts = [t.prompt_ids.long() for t in transitions]
        actions = [t.action_ids.long() for t in transitions]
        prompt_ids, prompt_mask = _pad(prompts, pad_token_id, left=True)
        action_ids, action_mask = _pad(actions, pad_token_id, left=False)
        old_logprobs = None
        if all(t.logprobs is not None for t in transitions):
            old_logprobs, _ = _pad([t.logprobs.float() for t in transitions], 0.0, left=False)
        next_ids = next_mask = None
        if all(t.next_prompt_ids is not None for t in transitions):
            pad = torch.tensor([pad_token_id], dtype=torch.long)
            nexts = [t.next_prompt_ids.long() if t.next_prompt_ids.numel() else pad for t in transitions]
            next_ids, next_mask = _pad(nexts, pad_token_id, left=True)
        group_ids = group_members = group_returns = None
        if all(t.group_returns is not None for t in transitions):
            sizes = {t.group_returns.numel() for t in transitions}
            if len(sizes) != 1:
                raise ValueError(f"transitions from groups of different sizes {sorted(sizes)} in one batch")
            group_ids = torch.tensor([t.group_id for t in transitions], dtype=torch.long)
            group_members = torch.tensor([t.group_member for t in transitions], dtype=torch.long)
            group_returns = torch.stack([t.group_returns.float() for t in transitions])
        return cls(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            action_ids=action_ids,
            action_mask=action_mask,
            rewards=torch.tensor([float(t.reward) for t in transitions], dtype=torch.float32),
            dones=torch.tensor([float(t.terminated) for t in transitions], dtype=torch.float32),
            next_values=torch.tensor([float(t.next_value) for t in transitions], dtype=torch.float32),
            old_logprobs=old_logprobs,
            next_prompt_ids=next_ids,
            next_prompt_mask=next_mask,
            group_ids=group_ids,
            group_members=group_members,
            group_returns=group_returns,
        )


def _pad(seqs: Sequence[Tensor], value: float, left: bool) -> tuple[Tensor, Tensor]:
    width = max(1, max(s.numel() for s in seqs))
    out = torch.full((len(seqs), width), value, dtype=seqs[0].dtype)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = s.numel()
        if n == 0:
            continue
        if left:
            out[i, width - n :], mask[i, width - n :] = s, True
        else:
            out[i, :n], mask[i, :n] = s, True
    return out, mask
