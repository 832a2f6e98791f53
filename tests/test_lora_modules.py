"""``lora``: the one LoRA option of every module (ETPO, PPO, GRPO), real tiny Llamas and peft.

For each algorithm: training moves the adapters and leaves the base bit-identical; the
reference is the base with the adapters off; the losses equal an independent computation
on weights merged by hand (W + alpha / r * B A, no peft); a run stopped mid-way and resumed
from its checkpoint equals the uninterrupted run bit for bit; ``inference_state_dict`` is
peft's ``merge_and_unload`` of the policy adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from etpo_lightning import ETPOModule, GRPOModule, PPOModule, TokenRLModule
from etpo_lightning.core.functional import token_logprobs
from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.grpo.losses import grpo_loss, row_advantages
from etpo_lightning.ppo import TokenValueCritic
from etpo_lightning.ppo.losses import clipped_policy_loss, gae, token_rewards, value_loss, whiten
from helpers import reference_etpo_losses, tiny_llama
from test_grpo import _grouped_batch
from test_resume import dropout_llama

pytest.importorskip("peft")
from etpo_lightning.core.lora import AdapterView, LoRAConfig  # noqa: E402

VOCAB = 64
R, ALPHA = 4, 16
ALGORITHMS = ("etpo", "ppo", "grpo")
# Large learning rates so that a few steps move the adapters visibly.
HPARAMS: dict[str, dict[str, Any]] = {
    "etpo": dict(beta=0.1, gamma=0.9, tau=0.05, policy_lr=2e-2, critic_lr=2e-2),
    "ppo": dict(beta_kl=0.1, gamma=0.9, lam=0.9, policy_lr=2e-2, critic_lr=2e-2),
    "grpo": dict(beta=0.2, policy_lr=2e-2),
}
CLASSES = {"etpo": ETPOModule, "ppo": PPOModule, "grpo": GRPOModule}
# The adapters each algorithm trains (ETPO's target critic follows its critic by Polyak).
ADAPTERS = {"etpo": ("policy", "critic", "target_critic"), "ppo": ("policy", "critic"), "grpo": ("policy",)}


def make(algo: str, base: torch.nn.Module, **kwargs: Any) -> TokenRLModule:
    return CLASSES[algo](policy=base, lora=LoRAConfig(r=R, alpha=ALPHA), **{**HPARAMS[algo], **kwargs})


def _train_batches(n: int) -> list:
    batches = []
    for i in range(n):  # group returns too: every batch has a non-constant GRPO group
        batch = _grouped_batch(seed=10 + i)
        batch.group_returns = batch.group_returns + 0.3 * i
        batches.append(batch)
    return batches


def base_weights(module: TokenRLModule) -> dict[str, torch.Tensor]:
    """The frozen base's parameters under the plain HF names (peft renames an adapted layer's
    weight ``...q_proj.base_layer.weight``)."""
    return {name.replace(".base_layer.", "."): p for name, p in module.shared_lora.base_model().named_parameters()
            if ".lora_" not in name}


def merged_by_hand(module: TokenRLModule, untouched: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """A copy of the untouched base with ``adapter`` merged as W + (alpha / r) B A, without peft."""
    merged = copy.deepcopy(untouched)
    weights = dict(merged.named_parameters())
    n = 0
    for name, m in module.shared_lora.base_model().named_modules():
        if hasattr(m, "lora_A") and adapter in m.lora_A:
            with torch.no_grad():
                weights[f"{name}.weight"].add_((ALPHA / R) * m.lora_B[adapter].weight @ m.lora_A[adapter].weight)
            n += 1
    assert n > 0
    return merged.eval()


@pytest.fixture(scope="module", params=ALGORITHMS)
def trained(request) -> tuple[str, TokenRLModule, torch.nn.Module, dict[str, list[torch.Tensor]]]:
    """(algorithm, its LoRA module after 4 training batches, an untouched copy of the base made
    before peft wrapped it, each network's initial parameters)."""
    algo = request.param
    base = tiny_llama(VOCAB, seed=0)
    untouched = copy.deepcopy(base)
    module = make(algo, base)
    initial = {name: [p.detach().clone() for p in getattr(module, name).parameters()] for name in ADAPTERS[algo]}
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(_train_batches(5), batch_size=None))
    return algo, module, untouched, initial


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_one_frozen_base_and_one_adapter_per_network(algo: str) -> None:
    base = tiny_llama(VOCAB, seed=0)
    n_base = sum(p.numel() for p in base.parameters())
    module = make(algo, base)
    assert isinstance(module.policy, AdapterView) and module.sampling_network() is module.policy
    # Recorded as plain types (checkpoints, the loggers' hparams.yaml): no LoRAConfig object.
    want_hparam = {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": None, "critic_lm_head": True}
    assert type(module.hparams["lora"]) is dict and module.hparams["lora"] == want_hparam
    assert type(module.hparams_initial["lora"]) is dict and module.hparams_initial["lora"] == want_hparam
    assert list(module.reference.parameters()) == []
    assert (module.critic is None) == (algo == "grpo")
    # The whole module stores one base: its unique parameters are the base plus the adapters
    # (and PPO's value head), a fraction of one copy.
    own = [p for name in ADAPTERS[algo] for p in getattr(module, name).parameters()]
    assert sum(p.numel() for p in module.parameters()) == n_base + sum(p.numel() for p in own)
    assert sum(p.numel() for p in own) < n_base
    # The base is frozen; the optimizers train exactly the policy's and the critic's parameters.
    trained_ids = {id(p) for p in own if p.requires_grad}
    assert not any(p.requires_grad for p in module.shared_lora.base_model().parameters() if id(p) not in trained_ids)
    optimizers = module.configure_optimizers()
    networks = [module.policy] + ([module.critic] if module.critic is not None else [])
    assert len(optimizers) == len(networks)
    for opt, net in zip(optimizers, networks):
        assert [p for g in opt.param_groups for p in g["params"]] == list(net.parameters())
        assert all(p.requires_grad for p in net.parameters())
    if algo == "ppo":  # the value head on the critic adapter's decoder, trained with it
        assert isinstance(module.critic, TokenValueCritic) and isinstance(module.critic.backbone, AdapterView)
        head = list(module.critic.value_head.parameters())
        assert head and all(any(p is q for q in optimizers[1].param_groups[0]["params"]) for p in head)
    if algo == "etpo":  # the target critic: the critic's adapter layout, frozen, LM-head LoRA included
        target, critic, policy = (list(getattr(module, n).parameters()) for n in ("target_critic", "critic", "policy"))
        assert [p.shape for p in target] == [p.shape for p in critic] and len(critic) > len(policy)
        assert not any(p.requires_grad for p in target)
    # At the start (LoRA's B = 0) every LM network is the base.
    batch = _grouped_batch()
    want = module.action_outputs(tiny_llama(VOCAB, seed=0), batch)
    views = [module.policy, module.reference] + ([module.critic, module.target_critic] if algo == "etpo" else [])
    for view in views:
        torch.testing.assert_close(module.action_outputs(view, batch), want, rtol=0, atol=1e-6)


def test_training_moves_the_adapters_and_leaves_the_base_bit_identical(trained) -> None:
    algo, module, untouched, initial = trained
    mine = base_weights(module)
    adapter_ids = {id(p) for name in ADAPTERS[algo] for p in getattr(module, name).parameters()}
    assert mine.keys() == dict(untouched.named_parameters()).keys()
    for name, p in untouched.named_parameters():
        assert id(mine[name]) not in adapter_ids and torch.equal(mine[name], p), name
    for name in ADAPTERS[algo]:
        now = list(getattr(module, name).parameters())
        assert any(not torch.equal(a, b) for a, b in zip(initial[name], now, strict=True)), name
    if algo == "ppo":
        assert module.critic.value_head.weight.abs().sum() > 0  # the value head trained from zero


def test_reference_is_the_base_with_the_adapters_off(trained) -> None:
    algo, module, untouched, _ = trained
    batch = _grouped_batch(seed=3)
    want = module.action_outputs(untouched, batch)
    torch.testing.assert_close(module.action_outputs(module.reference, batch), want, rtol=0, atol=1e-6)
    # Not vacuous: the trained policy is not the base.
    assert (module.action_outputs(module.policy, batch) - want).abs().max() > 1e-3
    # Running the reference left the trained adapters trainable.
    assert all(p.requires_grad for p in module.policy.parameters())


def _batch_with_old_logprobs(module: TokenRLModule) -> Any:
    """A batch whose behaviour log-probs differ from the policy's, so ratios are not 1."""
    batch = _grouped_batch(seed=7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logp = module.action_logprobs(batch)
    batch.old_logprobs = (logp + 0.3 * torch.randn(logp.shape, generator=g)) * batch.action_mask
    return batch


def _taken_logprobs(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    inputs = TokenRLModule.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    logits = model(**inputs).logits[:, batch.prompt_ids.shape[1] - 1:]
    return token_logprobs(logits.double(), batch.action_ids)


@torch.no_grad()
def independent_losses(algo: str, module: TokenRLModule, untouched: torch.nn.Module, batch: Any) -> dict[str, float]:
    """The algorithm's losses from networks with the adapters merged by hand."""
    policy = merged_by_hand(module, untouched, "policy")
    assert (_taken_logprobs(policy, batch) - _taken_logprobs(untouched, batch)).abs().max() > 1e-3
    mask = batch.action_mask
    if algo == "etpo":
        batch.next_prompt_ids = None  # V(s') from the batch (reference_etpo_losses's contract)
        critic = merged_by_hand(module, untouched, "critic")
        target = merged_by_hand(module, untouched, "target_critic")
        hp = module.hparams
        return reference_etpo_losses(policy, critic, target, untouched, batch, hp.beta, hp.gamma)
    lp, ref_lp = _taken_logprobs(policy, batch), _taken_logprobs(untouched, batch)
    old = batch.old_logprobs.double()
    if algo == "grpo":
        adv = row_advantages(batch.group_returns.double(), batch.group_members, scale_by_std=True)
        return {"policy_loss": float(grpo_loss(lp, old, ref_lp, adv, mask, clip_ratio=0.2, beta=0.2))}
    # PPO: the value head (trained) on the decoder with the critic adapter merged.
    critic = TokenValueCritic(merged_by_hand(module, untouched, "critic").model, untouched.config.hidden_size)
    critic.value_head.load_state_dict(module.critic.value_head.state_dict())
    inputs = TokenRLModule.model_inputs(batch.prompt_ids, batch.prompt_mask, batch.action_ids, batch.action_mask)
    values = critic(**inputs)[:, batch.prompt_ids.shape[1] - 1:].double()
    rewards = token_rewards(old, ref_lp, batch.rewards, mask, 0.1)
    advantages, returns = gae(values, rewards, mask, batch.dones, batch.next_values, 0.9, 0.9, "none")
    return {"policy_loss": float(clipped_policy_loss(lp, old, whiten(advantages, mask), mask, 0.2)),
            "value_loss": float(value_loss(values, returns, mask))}


def test_losses_equal_an_independent_computation_on_merged_weights(trained) -> None:
    algo, module, untouched, _ = trained
    batch = _batch_with_old_logprobs(module)
    if algo == "etpo":
        batch.next_prompt_ids = None  # both sides bootstrap from the batch's next_values
    with torch.no_grad():
        out = module.compute_losses(batch)
    want = independent_losses(algo, module, untouched, batch)
    assert want
    for key, value in want.items():
        assert out[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_inference_state_dict_is_peft_merge_and_unload(trained, tmp_path: Path) -> None:
    algo, module, untouched, _ = trained
    got = module.inference_state_dict()
    peft_model = copy.deepcopy(module.shared_lora.peft)
    peft_model.base_model.set_adapter("policy")
    want = peft_model.merge_and_unload(adapter_names=["policy"]).state_dict()
    assert got.keys() == want.keys() == untouched.state_dict().keys()
    for key in want:
        assert got[key].device.type == "cpu" and torch.equal(got[key], want[key]), key
    # The policy moved, the base did not: merged weights differ from the base where adapted.
    assert any(not torch.equal(got[k], v) for k, v in untouched.state_dict().items())
    # A plain model loaded from it is the policy (what an inference engine samples from).
    plain = copy.deepcopy(untouched)
    plain.load_state_dict(got)
    batch = _grouped_batch(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(module.action_outputs(plain, batch), module.action_outputs(module.policy, batch),
                                   rtol=1e-4, atol=1e-5)


def test_inference_state_dict_without_lora_is_the_policys() -> None:
    module = GRPOModule(policy=tiny_llama(VOCAB, seed=0))
    got, want = module.inference_state_dict(), module.policy.state_dict()
    assert module.sampling_network() is module.policy
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ exact resume
class Losses(pl.Callback):
    """Every training batch's logged losses."""

    def __init__(self) -> None:
        self.losses: list[tuple[float, ...]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        m = trainer.callback_metrics
        self.losses.append(tuple(float(v) for k, v in sorted(m.items()) if k.endswith("loss")))


def _rollout_data(algo: str, tokenizer) -> RolloutDataModule:
    pl.seed_everything(0)
    # One word, one-step episodes (as in test_resume.py): the runs can only differ through RNG.
    return RolloutDataModule(env=KeywordEnv(words=["apple"], max_steps=1), tokenizer=tokenizer, num_envs=4,
                             group_size=2 if algo == "grpo" else 1, rollout_steps=1, batch_size=3,
                             batches_per_epoch=2, max_new_tokens=4, seed=0)


def _fit(algo: str, root: Path, batches: int, dm: RolloutDataModule, vocab: int, ckpt_path: str | None = None,
         without_rng: bool = False) -> tuple[TokenRLModule, list[tuple[float, ...]]]:
    # Attention dropout: every training forward draws from the RNG (trained adapters run in
    # train mode, the frozen views in eval mode).
    rates = dict(policy_lr=1e-2) if algo == "grpo" else dict(policy_lr=1e-2, critic_lr=1e-2)
    module = make(algo, dropout_llama(vocab), **rates)
    if without_rng:  # negative control: the checkpoint's RNG states dropped
        load = module.on_load_checkpoint
        module.on_load_checkpoint = lambda ckpt: load({k: v for k, v in ckpt.items() if k != "rng_states"})
    recorder = Losses()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(max_steps=batches, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, callbacks=[recorder, checkpoints])
    # The datamodule's replay holds Transition objects, which weights_only=True refuses.
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return module, recorder.losses


@pytest.fixture(scope="module")
def tokenizer():
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

    texts = ["Say the word 'apple'.\nAnswer: apple", "apple pie, apple tree, the word"] * 10
    return train_tokenizer(texts, vocab_size=300)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_resume_with_rollouts_is_exact(algo: str, tmp_path: Path, tokenizer) -> None:
    """N batches in one go == N/2, a checkpoint, and N/2 more in a new module and Trainer."""
    n, vocab = 4, len(tokenizer)
    full_dm = _rollout_data(algo, tokenizer)
    full, full_losses = _fit(algo, tmp_path / "full", n, full_dm, vocab)
    _, first = _fit(algo, tmp_path / "half", n // 2, _rollout_data(algo, tokenizer), vocab)
    steps_per_batch = 1 if algo == "grpo" else 2  # global_step counts every optimizer's steps
    ckpt = tmp_path / "half" / "ckpt" / f"step={steps_per_batch * n // 2}.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["hyper_parameters"]["lora"] == {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": None,
                                                 "critic_lm_head": True}
    resumed_dm = _rollout_data(algo, tokenizer)
    resumed, second = _fit(algo, tmp_path / "resumed", n, resumed_dm, vocab, ckpt_path=str(ckpt))

    assert len(full_losses) == n and first + second == full_losses  # bit-identical, batch by batch
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # LoRA's B matrices start at 0: the adapters trained.
    assert any(p.abs().sum() > 0 for name, p in full.shared_lora.peft.named_parameters() if "lora_B" in name)
    # The last collection's sampled actions (generate on the policy view) are the same tokens.
    assert [t.action_ids.tolist() for t in resumed_dm.replay[-1]] == [t.action_ids.tolist() for t in full_dm.replay[-1]]
    # Negative control: the same resume without the RNG states diverges.
    _, control = _fit(algo, tmp_path / "control", n // 2 + 1, _rollout_data(algo, tokenizer), vocab,
                      ckpt_path=str(ckpt), without_rng=True)
    assert control[0] != full_losses[n // 2]


# ------------------------------------------------------------ settings and errors
def test_lora_config_validates_and_round_trips_through_a_checkpoint_dict() -> None:
    import etpo_lightning

    assert etpo_lightning.LoRAConfig is LoRAConfig
    config = LoRAConfig(r=2, alpha=4.0, dropout=0.1, target_modules=("q_proj", "v_proj"))
    assert config.target_modules == ["q_proj", "v_proj"]
    assert LoRAConfig.coerce(config.as_dict()) == config and LoRAConfig.coerce(None) is None
    for bad, message in [(dict(r=0), "lora.r must be an integer >= 1"), (dict(alpha=0), "lora.alpha must be > 0"),
                         (dict(dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
                         (dict(target_modules="q_proj"), "lora.target_modules must be a non-empty list")]:
        with pytest.raises(ValueError, match=message):
            LoRAConfig(**bad)
    with pytest.raises(ValueError, match=r"lora: unknown settings \['rank'\]"):
        LoRAConfig.coerce({"rank": 4})


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_refuses_injected_critic_or_reference(algo: str) -> None:
    kwargs = {"reference": tiny_llama(VOCAB)} if algo == "grpo" else {"critic": tiny_llama(VOCAB)}
    with pytest.raises(ValueError, match="pass only `policy`"):
        make(algo, tiny_llama(VOCAB), **kwargs)


def test_etpo_lora_needs_the_copied_critic_head() -> None:
    with pytest.raises(ValueError, match="critic_head_init='copy'"):
        make("etpo", tiny_llama(VOCAB), critic_head_init="dueling")


def test_target_modules_choose_the_adapted_layers() -> None:
    module = PPOModule(policy=tiny_llama(VOCAB), **HPARAMS["ppo"])  # full copies: no peft at all
    assert not hasattr(module, "shared_lora")
    module = CLASSES["etpo"](policy=tiny_llama(VOCAB), lora=LoRAConfig(r=2, target_modules=["q_proj"]))
    adapted = {name.rsplit(".", 1)[-1] for name, m in module.shared_lora.base_model().named_modules()
               if hasattr(m, "lora_A") and "policy" in m.lora_A}
    critic_adapted = {name.rsplit(".", 1)[-1] for name, m in module.shared_lora.base_model().named_modules()
                      if hasattr(m, "lora_A") and "critic" in m.lora_A}
    assert adapted == {"q_proj"} and critic_adapted == {"q_proj", "lm_head"}
    # PPO's value head does not read the LM head: no LM-head LoRA for its critic.
    module = CLASSES["ppo"](policy=tiny_llama(VOCAB), lora=LoRAConfig(r=2, target_modules=["q_proj"]))
    critic_adapted = {name.rsplit(".", 1)[-1] for name, m in module.shared_lora.base_model().named_modules()
                      if hasattr(m, "lora_A") and "critic" in m.lora_A}
    assert critic_adapted == {"q_proj"}


# ------------------------------------------------------------ deprecated aliases
def test_deprecated_etpo_alias_warns_and_maps_its_arguments() -> None:
    from etpo_lightning import LoRAETPOModule

    with pytest.warns(DeprecationWarning, match=r"ETPOModule\(lora=LoRAConfig"):
        old = LoRAETPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1, lora_r=4, lora_alpha=8, lora_dropout=0.05,
                             target_modules=["q_proj", "v_proj"], critic_lm_head=False)
    config = LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"], critic_lm_head=False)
    assert isinstance(old, ETPOModule) and old.lora_config == config and old.hparams.lora == config.as_dict()
    assert old.hparams.policy_lr == old.hparams.critic_lr == 1e-4  # the alias's LoRA defaults
    assert old.base_model() is old.shared_lora.base_model()
    # The same networks as the new argument's, under the same names: checkpoints load into either.
    new = ETPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.1, lora=config)
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lora_r must be >= 1"):
        LoRAETPOModule(policy=tiny_llama(VOCAB), lora_r=0)
    # Loading an alias's checkpoint passes both the old arguments and ``lora``: ``lora`` wins.
    again = LoRAETPOModule(policy=tiny_llama(VOCAB, seed=0), lora_r=8, **{"lora": config.as_dict()})
    assert again.lora_config == config


def test_deprecated_grpo_alias_warns_and_maps_its_arguments() -> None:
    from etpo_lightning import LoRAGRPOModule
    from etpo_lightning.grpo import LoRAGRPOModule as same

    assert same is LoRAGRPOModule
    with pytest.warns(DeprecationWarning, match=r"GRPOModule\(lora=LoRAConfig"):
        old = LoRAGRPOModule(policy=tiny_llama(VOCAB, seed=0), beta=0.2, lora_r=4, lora_alpha=16)
    assert isinstance(old, GRPOModule) and old.lora_config == LoRAConfig(r=4, alpha=16)
    assert old.hparams.policy_lr == 1e-4 and old.critic is None
    new = make("grpo", tiny_llama(VOCAB, seed=0))
    a, b = old.state_dict(), new.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lora_r must be >= 1"):
        LoRAGRPOModule(policy=tiny_llama(VOCAB), lora_r=0)


@pytest.mark.parametrize("name, old_class", [("lora", "etpo_lightning.etpo.LoRAETPOModule"),
                                             ("grpo_lora", "etpo_lightning.grpo.LoRAGRPOModule")])
def test_an_old_style_config_still_parses(name: str, old_class: str, tmp_path: Path) -> None:
    """YAML written for the aliases (``lora_r``, ``lora_alpha``... at the top of init_args)."""
    import yaml

    from test_cli import CONFIGS, _print_config

    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    args = config["model"]["init_args"]
    lora = args.pop("lora")
    args.update(lora_r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"])
    config["model"]["class_path"] = old_class
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    printed = yaml.safe_load(_print_config(["fit", "--config", str(path), "--print_config"]))
    assert printed["model"]["class_path"] == old_class
    assert printed["model"]["init_args"]["lora_r"] == 16 and printed["model"]["init_args"]["lora_alpha"] == 32


def test_cli_fit_and_resume_with_a_lora_block(tmp_path: Path, tokenizer) -> None:
    """The YAML shape of the configs (``model.init_args.lora: {r: .., alpha: ..}``) through
    ``etpo fit``, then ``etpo fit --ckpt_path last.ckpt`` (hyperparameters saved as plain types)."""
    from helpers import fit_then_resume_through_cli, keyword_cli_config

    model_dir = tmp_path / "model"
    tokenizer.save_pretrained(model_dir)
    dropout_llama(len(tokenizer)).save_pretrained(model_dir)
    config = keyword_cli_config(tmp_path, "etpo_lightning.ppo.PPOModule", {
        "model_name_or_path": str(model_dir), "policy_lr": 1e-2, "critic_lr": 1e-2,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    cli = fit_then_resume_through_cli(config, tmp_path, max_steps=2)
    module = cli.model
    assert module.trainer.global_step == 4  # 2 batches x 2 optimizer steps: it continued from 1
    assert module.lora_config == LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    # Plain types, which torch.load(weights_only=True) accepts.
    assert type(saved["hyper_parameters"]["lora"]) is dict
    assert saved["hyper_parameters"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    adapted = {name.rsplit(".", 1)[-1] for name, m in module.shared_lora.base_model().named_modules()
               if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
