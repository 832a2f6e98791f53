"""``HFGenerate``: actions sampled with Hugging Face ``generate`` on the module's live policy."""

from __future__ import annotations

import torch
from torch import Tensor

from etpo_lightning.core.generation import GenerationEngine, RolloutPolicy, Samples, Sampling, cut_at_eos, pad_left


class HFGenerate(GenerationEngine):
    """Samples with ``generate`` (KV cache on) on the policy network itself, so there are no
    weights to push: every collection sees the current parameters."""

    @torch.no_grad()
    def sample(self, source: RolloutPolicy, prompts: list[Tensor], sampling: Sampling) -> Samples:
        """One action per prompt and, for every sampled token, its log-probability under the
        distribution it was drawn from: the policy in eval mode (no dropout) after
        ``generate``'s temperature / top-k / top-p processing. That is the behaviour policy mu
        of off-policy corrections (Retrace traces, PPO ratios); at temperature 1 with no
        top-k/top-p it is the policy itself."""
        policy = source.sampling_network()
        was_training = policy.training
        policy.eval()
        actions: list[Tensor] = []
        logprobs: list[Tensor] = []
        try:
            for start in range(0, len(prompts), sampling.batch_size):
                ids, mask = pad_left(prompts[start:start + sampling.batch_size], sampling.pad_token_id, source.device)
                # Sharded policies: gather the weights generate bypasses the wrapper for, and keep
                # ranks stepping together when their lengths differ (generation_kwargs).
                with source.generation_context(policy):
                    out = policy.generate(
                        input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=sampling.temperature,
                        top_k=sampling.top_k, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens,
                        pad_token_id=sampling.pad_token_id, eos_token_id=sampling.eos_token_id, use_cache=True,
                        output_scores=True, return_dict_in_generate=True,
                        **source.generation_kwargs(),
                    )
                new_tokens = out.sequences[:, ids.shape[1]:]
                # out.scores[t] [B, V]: the processed logits token t was sampled from. Only the
                # taken token's log-probability is kept (one float per token).
                taken = torch.stack([
                    torch.log_softmax(step.float(), dim=-1).gather(-1, new_tokens[:, t, None]).squeeze(-1)
                    for t, step in enumerate(out.scores)
                ], dim=1).cpu() if out.scores else torch.zeros(new_tokens.shape, dtype=torch.float32)
                for action, action_logprobs in cut_at_eos(new_tokens.cpu(), taken, sampling.eos_token_id):
                    actions.append(action)
                    logprobs.append(action_logprobs)
        finally:
            policy.train(was_training)
        return Samples(actions, logprobs)
