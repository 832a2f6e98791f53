"""Builders shared by the tests: a real tiny Llama and a real BPE tokenizer, made in seconds;
and the runner of ``tests/ddp_fit.py``'s multi-process fits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from etpo_lightning.core.batch import Transition, TransitionBatch

DDP_FIT = Path(__file__).with_name("ddp_fit.py")


def tiny_llama(vocab_size: int = 64, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def word_tokenizer(words: Iterable[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on the toy task's prompts, answers and reflections for ``words``."""
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

    texts = [f"Say the word '{w}'.\nAnswer: {w}\nYour previous answer was 'x': wrong." for w in words] * 5
    return train_tokenizer(texts, vocab_size=vocab_size)


def save_tiny_assets(root: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 1) -> tuple[str, str]:
    """Save ``tokenizer`` and a tiny Llama over its vocabulary (its EOS and pad tokens) under
    ``root``, to be loaded by path in other processes: ``(model_dir, tokenizer_dir)``."""
    tokenizer.save_pretrained(root / "tok")
    model = tiny_llama(len(tokenizer), seed=seed)
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    return str(root / "model"), str(root / "tok")


def run_ddp_fit(args: list[str], timeout: int = 300, script: Path = DDP_FIT) -> subprocess.CompletedProcess:
    """Run ``script`` (``tests/ddp_fit.py``) with ``args`` (it starts the ranks); on a timeout
    (ranks deadlocked in a collective) kill the whole process group, every rank, and fail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DDP_FIT.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the multi-process fit did not finish in {timeout} s (ranks out of step?):\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def keyword_cli_config(tmp_path: Path, class_path: str, init_args: dict) -> dict:
    """A one-batch ``etpo fit`` config: the module ``class_path`` with ``init_args``, the one-word
    KeywordEnv, and a ModelCheckpoint writing ``tmp_path/ckpt/last.ckpt`` (for
    ``fit_then_resume_through_cli``)."""
    return {
        "seed_everything": 0,
        "model": {"class_path": class_path, "init_args": init_args},
        "data": {"env": {"class_path": "etpo_lightning.envs.KeywordEnv",
                         "init_args": {"words": ["apple"], "max_steps": 1}},
                 "num_envs": 2, "rollout_steps": 1, "batch_size": 2, "batches_per_epoch": 1, "max_new_tokens": 4},
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
    }


def fit_then_resume_through_cli(config: dict, tmp_path: Path, max_steps: int):
    """``etpo fit`` with ``config`` (its ModelCheckpoint writes ``tmp_path/ckpt/last.ckpt``),
    then ``etpo fit --ckpt_path last.ckpt`` of the same config up to ``max_steps``; returns the
    resumed run's LightningCLI."""
    import yaml

    from etpo_lightning.cli.main import cli_main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(path)])
    return cli_main(["fit", "--config", str(path), f"--trainer.max_steps={max_steps}",
                     "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])


def random_transition_batch(vocab_size: int = 64, batch: int = 4, seed: int = 0) -> TransitionBatch:
    """Prompts and actions of different lengths, some episodes done, some not."""
    g = torch.Generator().manual_seed(seed)
    transitions = []
    for i in range(batch):
        p_len = int(torch.randint(3, 9, (1,), generator=g))
        a_len = int(torch.randint(1, 7, (1,), generator=g))
        transitions.append(
            Transition(
                prompt_ids=torch.randint(3, vocab_size, (p_len,), generator=g),
                action_ids=torch.randint(3, vocab_size, (a_len,), generator=g),
                reward=float(torch.rand(1, generator=g)) * 2 - 1,
                terminated=bool(i % 2),
                next_value=float(torch.rand(1, generator=g)),
            )
        )
    return TransitionBatch.collate(transitions, pad_token_id=0)


def _row_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s per-position output ``[T, V]`` for one unpadded sequence, called directly."""
    out = model(input_ids=ids[None])
    return (out if isinstance(out, torch.Tensor) else out.logits)[0]


@torch.no_grad()
def reference_etpo_losses(policy, critic, target_critic, reference, batch: TransitionBatch, beta: float,
                          gamma: float) -> dict[str, float]:
    """The one-step (lam = 0) ETPO losses of the spec, computed independently of the library:
    row by row on the unpadded sequences (no masks, no position ids, no chunks), in float64,
    from the networks called directly.

        V(h)  = sum_w pi(w|h) [Q_target(h,w) - beta (log pi(w|h) - log rho(w|h))]
        y_j   = V(h_{j+1}) inside the action; y_n = r + gamma (1 - d) V(s') at its last token
        L_Q   = mean over the batch's action tokens of (Q(h_j, w^j) - y_j)^2
        L_pi  = mean over the batch's action tokens of sum_w pi [beta (log pi - log rho) - Q]

    V(s') is the batch's ``next_values`` (batches without next observation ids). Critics that
    need rho's logits (the dueling head) are not covered.
    """
    q_terms, pi_terms = [], []
    for b in range(len(batch)):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b]]
        action = batch.action_ids[b][batch.action_mask[b]]
        n, p = action.numel(), prompt.numel()
        ids = torch.cat([prompt, action[:-1]])
        rows = slice(p - 1, p - 1 + n)  # the histories h_1..h_n where action tokens are chosen
        log_pi = torch.log_softmax(_row_logits(policy, ids)[rows].double(), -1)
        log_rho = torch.log_softmax(_row_logits(reference, ids)[rows].double(), -1)
        q = _row_logits(critic, ids)[rows].double()
        q_target = _row_logits(target_critic, ids)[rows].double()
        pi = log_pi.exp()
        values = (pi * (q_target - beta * (log_pi - log_rho))).sum(-1)
        bootstrap = float(batch.rewards[b]) + gamma * (1.0 - float(batch.dones[b])) * float(batch.next_values[b])
        for j in range(n):
            y = float(values[j + 1]) if j + 1 < n else bootstrap
            q_terms.append((float(q[j, action[j]]) - y) ** 2)
            pi_terms.append(float((pi[j] * (beta * (log_pi[j] - log_rho[j]) - q[j])).sum()))
    return {"q_loss": sum(q_terms) / len(q_terms), "policy_loss": sum(pi_terms) / len(pi_terms)}
