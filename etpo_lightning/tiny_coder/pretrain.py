"""Pretrain a small Llama on the sklearn corpus with plain torch (next-token prediction).

Prompt and body are tokenized separately and concatenated (``prompt_ids + body_ids + [eos]``)
because that is how the environment feeds the policy: it tokenizes the observation alone and
the model continues from there. Tokenizing the joined text instead would merge the newline
that ends the prompt with the body's indentation into tokens the policy never sees.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from etpo_lightning.tiny_coder.corpus import Sample, generate_samples, split_samples
from etpo_lightning.tiny_coder.tokenizer import train_tokenizer


@dataclass(frozen=True)
class TinyCoderConfig:
    """Build options of the tiny sklearn coder (defaults: ~3.5 minutes on 2 idle cores)."""

    # corpus
    n_samples: int = 6000
    heldout_fraction: float = 0.05
    # tokenizer and model
    # At a fixed CPU budget a ~1M-parameter model that sees more text writes valid code
    # more often than a 3.4M one that sees less (measured at equal time: hidden 256 parsed
    # 15-20% of samples at temperature 1, hidden 128 40-55%, before the temperature below).
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_length: int = 512
    # optimisation
    steps: int = 650
    batch_size: int = 22
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    prompt_loss_weight: float = 0.2
    # Share of training texts that keep the whole prompt; the others start at the
    # ``# x_train:`` line. The task header is the same in every prompt and the dataset line
    # hardly changes the body, so dropping them for most texts buys ~40% more bodies for
    # the same compute; the full prompts left teach the model to read past them.
    full_prompt_share: float = 0.3
    # Sampling temperature baked into the checkpoint: the final RMSNorm gain is divided by
    # it, so sampling the saved model at temperature 1.0 is sampling the trained one at this
    # temperature. A model this small keeps a long tail of junk tokens; 0.8 cuts most syntax
    # slips (measured on a 500-step model: 55-63% -> ~90% of samples parse) and still
    # samples every estimator family.
    bake_temperature: float = 0.8
    eval_batch_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PretrainResult:
    """The trained model and tokenizer, with what the build measured."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    train: list[Sample]
    heldout: list[Sample]
    losses: list[float] = field(default_factory=list)
    heldout_perplexity: float = float("nan")
    heldout_perplexity_unbaked: float = float("nan")
    seconds: dict[str, float] = field(default_factory=dict)
    torch_threads: int = 0  # intra-op threads the build ran with (the weights depend on it)


def make_model(config: TinyCoderConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A fresh ``LlamaForCausalLM`` sized by ``config``; call ``torch.manual_seed`` first."""
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=max(1024, config.max_length),
        tie_word_embeddings=True,  # a quarter of the parameters otherwise, for nothing at this size
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(llama)
    # Sample from the full distribution by default: transformers would otherwise apply
    # top_k=50 whenever do_sample=True, and a policy-gradient learner's log-probs would not
    # be those of the tokens' actual sampling distribution.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=160,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )
    return model


SHORT_PROMPT_FROM = "# x_train:"


def short_prompt(prompt: str) -> str:
    """The prompt from its ``# x_train:`` line on (shape, classes, any reflection, the def)."""
    i = prompt.find(SHORT_PROMPT_FROM)
    return prompt if i < 0 else prompt[i:]


def encode(
    sample: Sample,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    prompt_weight: float,
    full_prompt: bool = True,
) -> tuple[list[int], list[float]]:
    """Token ids of ``prompt + body + eos`` and the loss weight of predicting each of them.

    Too long texts lose the start of the prompt, never the body.
    """
    prompt = sample.prompt if full_prompt else short_prompt(sample.prompt)
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    b = tokenizer(sample.body, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (p + b)[-max_length:]
    weights = ([prompt_weight] * len(p) + [1.0] * len(b))[-max_length:]
    return ids, weights


def collate(rows: list[tuple[list[int], list[float]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and target weights (0 on padding and on the first token)."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    weight = torch.zeros((len(rows), n), dtype=torch.float32)
    for i, (r, w) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        weight[i, : len(r)] = torch.tensor(w)
    weight[:, 0] = 0.0
    return ids, mask, weight


def token_nll(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each token given the previous ones; column 0 is zero."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
    return F.pad(nll.view(ids.size(0), -1), (1, 0))


def length_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches of similar length (less padding), in random order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def lr_at(step: int, config: TinyCoderConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def _optimizer(model: LlamaForCausalLM, config: TinyCoderConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only; norms' gains stay free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def train_model(
    model: LlamaForCausalLM,
    rows: list[tuple[list[int], list[float]]],
    config: TinyCoderConfig,
    seed: int,
    pad_id: int,
    progress: bool = True,
) -> list[float]:
    """``config.steps`` AdamW steps on weighted next-token loss; returns the loss of each step."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(ids) for ids, _ in rows]
    optimizer = _optimizer(model, config)
    model.train()
    losses: list[float] = []
    queue: list[list[int]] = []
    bar = tqdm(range(config.steps), desc="pretraining tiny coder", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if not queue:
            queue = length_batches(lengths, config.batch_size, generator)
        ids, mask, weight = collate([rows[i] for i in queue.pop()], pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = (token_nll(model, ids, mask) * weight).sum() / weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def body_perplexities(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    temperatures: tuple[float, ...] = (1.0,),
    max_length: int = 512,
    batch_size: int = 32,
) -> list[float]:
    """For each temperature, ``exp`` of the mean NLL of the body tokens (and EOS) given their
    full prompts, with the logits divided by that temperature; one forward pass for all."""
    was_training = model.training
    model.eval()
    totals, count = [0.0] * len(temperatures), 0.0
    for start in range(0, len(samples), batch_size):
        rows = [encode(s, tokenizer, max_length, 0.0) for s in samples[start : start + batch_size]]
        ids, mask, weight = collate(rows, tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].reshape(-1)
        for i, t in enumerate(temperatures):
            nll = F.cross_entropy((logits / t).reshape(-1, logits.size(-1)), targets, reduction="none")
            totals[i] += (nll.view(ids.size(0), -1) * weight[:, 1:]).sum().item()
        count += weight.sum().item()
    model.train(was_training)
    return [math.exp(total / max(count, 1.0)) for total in totals]


def body_perplexity(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    max_length: int = 512,
    batch_size: int = 32,
) -> float:
    """``exp`` of the mean NLL of the body tokens (and EOS) given their full prompts."""
    return body_perplexities(model, tokenizer, samples, (1.0,), max_length, batch_size)[0]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily use ``n`` intra-op threads (``None``: leave torch's setting alone).

    On a small, busy machine one thread can be many times faster than two fighting for cores.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain(
    config: TinyCoderConfig = TinyCoderConfig(),
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = None,
) -> PretrainResult:
    """Corpus, tokenizer, model and training, all from ``seed``; nothing is written to disk.

    ``num_threads`` sets torch's intra-op threads for the build only (default: unchanged).
    """
    with torch_threads(num_threads):
        result = _pretrain(config, seed, progress)
        result.torch_threads = torch.get_num_threads()
        return result


def _pretrain(config: TinyCoderConfig, seed: int, progress: bool) -> PretrainResult:
    t0 = time.perf_counter()
    samples = generate_samples(config.n_samples, seed)
    train, heldout = split_samples(samples, config.heldout_fraction)
    t1 = time.perf_counter()
    # Prompts and bodies are separate texts, as they are tokenized separately.
    tokenizer = train_tokenizer((t for s in train for t in (s.prompt, s.body)), config.vocab_size)
    tokenizer.model_max_length = max(1024, config.max_length)
    keep = random.Random(seed)
    rows = [
        encode(s, tokenizer, config.max_length, config.prompt_loss_weight, keep.random() < config.full_prompt_share)
        for s in train
    ]
    t2 = time.perf_counter()
    torch.manual_seed(seed)
    model = make_model(config, tokenizer)
    losses = train_model(model, rows, config, seed, tokenizer.pad_token_id, progress)
    t3 = time.perf_counter()
    # Perplexity of the trained model and of the baked one users load (its logits / T).
    raw_ppl, ppl = float("nan"), float("nan")
    if heldout:
        raw_ppl, ppl = body_perplexities(
            model, tokenizer, heldout, (1.0, config.bake_temperature), config.max_length, config.eval_batch_size
        )
    bake_temperature(model, config.bake_temperature)
    t4 = time.perf_counter()
    seconds = {"corpus": t1 - t0, "tokenizer": t2 - t1, "train": t3 - t2, "eval": t4 - t3}
    return PretrainResult(model, tokenizer, train, heldout, losses, ppl, raw_ppl, seconds)


@torch.no_grad()
def bake_temperature(model: LlamaForCausalLM, temperature: float) -> None:
    """Scale the logits by ``1 / temperature`` for good, through the final norm's gain.

    The LM head is linear without bias, so scaling its input scales the logits exactly.
    """
    if temperature <= 0:
        raise ValueError(f"bake_temperature must be positive, got {temperature}")
    model.model.norm.weight.div_(temperature)
