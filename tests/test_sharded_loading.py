"""Loading the networks for FSDP (issue 14, defect 6), checked on CPU.

Under an ``FSDPStrategy`` ``configure_model`` builds the four networks on the meta device
(no memory), rank 0 alone loads the checkpoint once, and the reference, critic backbone and
target critic take their weights from that one loaded copy (sharing its storage) instead of
three deep copies; the other ranks stay on meta and FSDP fills them from rank 0
(``sync_module_states``). The trainer is simulated (a real ``FSDPStrategy`` object, a chosen
rank): FSDP itself refuses CPU-only execution, see tests/test_gpu.py for the GPU fits.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.strategies import FSDPStrategy
from safetensors.torch import load_file
from torch import nn

import etpo_lightning.core.models as models
from etpo_lightning import ETPOModule, PPOModule
from helpers import run_ddp_fit, save_tiny_assets, tiny_llama, word_tokenizer

NETWORKS = ("policy", "reference", "critic", "target_critic")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """A saved tiny Llama and its weights read back independently (safetensors)."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    tiny_llama(64, seed=3, layers=2).save_pretrained(path)
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(load_file(file))
    return str(path), weights


def _fsdp_configure(module: nn.Module, rank: int, monkeypatch: pytest.MonkeyPatch) -> tuple[FSDPStrategy, list[str]]:
    """Run ``configure_model`` as Lightning does under a 2-rank FSDPStrategy on ``rank``;
    returns the strategy and the paths ``from_pretrained`` was called with."""
    strategy = FSDPStrategy()
    module._trainer = SimpleNamespace(strategy=strategy, global_rank=rank, world_size=2)
    loads: list[str] = []
    real = models.AutoModelForCausalLM.from_pretrained

    def counting(path, *args, **kwargs):
        loads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", counting)
    with strategy.tensor_init_context():
        module.configure_model()
    module._trainer = None
    return strategy, loads


def _tensors(net: nn.Module) -> list[torch.Tensor]:
    return [*net.parameters(), *net.buffers()]


def _unique_bytes(nets: list[nn.Module]) -> int:
    """Bytes of the distinct storages behind the networks' parameters and buffers."""
    storages = {}
    for net in nets:
        for t in _tensors(net):
            if not t.is_meta:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _make(cls: type, path: str, head: str | None) -> nn.Module:
    kwargs = {} if head is None else {"critic_head_init": head}
    return cls(model_name_or_path=path, **kwargs)


CASES = [(ETPOModule, "copy"), (ETPOModule, "dueling"), (PPOModule, None)]


@pytest.mark.parametrize(("cls", "head"), CASES, ids=["etpo-copy", "etpo-dueling", "ppo"])
def test_other_ranks_load_nothing_and_build_on_meta(cls, head, checkpoint, monkeypatch) -> None:
    path, _ = checkpoint
    module = _make(cls, path, head)
    strategy, loads = _fsdp_configure(module, rank=1, monkeypatch=monkeypatch)
    assert loads == []  # rank 1 never reads the checkpoint ...
    for name in NETWORKS:
        net = getattr(module, name, None)
        if net is not None:  # ... and holds no weights: everything is on the meta device
            assert all(t.is_meta for t in _tensors(net)), name
    # FSDP materialises rank 1's networks and copies rank 0's weights into them.
    assert strategy.kwargs.get("sync_module_states") is True


@pytest.mark.parametrize(("cls", "head"), CASES, ids=["etpo-copy", "etpo-dueling", "ppo"])
def test_rank_zero_loads_one_copy_and_every_network_equals_the_plain_build(cls, head, checkpoint,
                                                                         monkeypatch) -> None:
    path, weights = checkpoint
    module = _make(cls, path, head)
    _, loads = _fsdp_configure(module, rank=0, monkeypatch=monkeypatch)
    assert len(loads) == 1  # the checkpoint is read once
    nets = [getattr(module, n) for n in NETWORKS if getattr(module, n, None) is not None]
    assert not any(t.is_meta for net in nets for t in _tensors(net))

    # Memory: one full copy of the checkpoint for all four networks, plus only what the critic
    # adds (a zeroed LM head and a value head for the dueling critic, a value head for PPO's).
    one_copy = _unique_bytes([module.policy])
    assert one_copy == sum(t.numel() * t.element_size() for t in weights.values()) + sum(
        b.numel() * b.element_size() for b in module.policy.buffers())
    extra = 0
    if head == "dueling":
        extra = sum(t.numel() * t.element_size() for t in module.critic.backbone.lm_head.parameters())
        extra += sum(t.numel() * t.element_size() for t in module.critic.value_head.parameters())
    if cls is PPOModule:
        extra = sum(t.numel() * t.element_size() for t in module.critic.value_head.parameters())
    assert _unique_bytes(nets) == one_copy + extra

    # The weights: policy and reference are the checkpoint's ...
    for name in ("policy", "reference"):
        state = getattr(module, name).state_dict()
        assert set(weights) <= set(state), name
        for key, value in weights.items():
            assert torch.equal(state[key], value), (name, key)
    # ... and every network (critic heads included) is exactly what the plain, non-sharded
    # build (full load, deep copies) gives: same keys, same values, same trainable flags.
    plain = _make(cls, path, head)
    plain.configure_model()
    for name in NETWORKS:
        got, want = getattr(module, name, None), getattr(plain, name, None)
        if want is None:
            assert got is None
            continue
        got_state, want_state = got.state_dict(), want.state_dict()
        assert got_state.keys() == want_state.keys(), name
        for key in want_state:
            assert torch.equal(got_state[key], want_state[key]), (name, key)
        assert [p.requires_grad for p in got.parameters()] == [p.requires_grad for p in want.parameters()], name
        assert got.training == want.training, name
    # The policy reads as the loaded one (the KL monitor finds held-out texts by its path,
    # generate() uses its generation config).
    assert module.policy.config.to_dict() == plain.policy.config.to_dict()
    assert module.policy.generation_config.to_dict() == plain.policy.generation_config.to_dict()
    # The critic's backbone holds the checkpoint too (its LM head zeroed for the dueling critic).
    backbone = module.critic.backbone.state_dict()
    for key, value in weights.items():
        key = key.removeprefix("model.") if cls is PPOModule else key
        if key in backbone and not (head == "dueling" and key.startswith("lm_head")):
            assert torch.equal(backbone[key], value), key
    # Parameters are distinct objects per network (freezing one never freezes another).
    ids = [id(p) for net in nets for p in net.parameters()]
    assert len(ids) == len(set(ids))


def test_without_fsdp_every_network_is_its_own_copy(checkpoint) -> None:
    """The single-device / DDP path is unchanged: four independent copies (DDP trains them in place)."""
    path, _ = checkpoint
    module = _make(ETPOModule, path, "copy")
    module.configure_model()
    nets = [getattr(module, n) for n in NETWORKS]
    assert _unique_bytes(nets) == 4 * _unique_bytes([module.policy])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (FSDP refuses the CPU)")
def test_fsdp_two_gpus_loads_sharded_and_matches_a_single_process(tmp_path: Path) -> None:
    """A 2-rank FSDP fit (tests/ddp_fit.py) from a checkpoint loaded by rank 0 only: both
    ranks start from the checkpoint's weights, the first step's losses on each rank equal a
    single-process computation on the same batch with the plainly loaded networks, and the
    four networks end identical across ranks."""
    import ddp_fit
    from etpo_lightning.envs.toy import DEFAULT_WORDS

    tok = word_tokenizer(DEFAULT_WORDS)
    model_dir, tok_dir = save_tiny_assets(tmp_path, tok, seed=1)
    out = tmp_path / "fsdp"
    run_ddp_fit([str(out), "--model", model_dir, "--tokenizer", tok_dir, "--max-steps", "2", "--strategy", "fsdp",
                 "--accelerator", "gpu"], timeout=600)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    want = {k: v.float() for k, v in tiny_llama(len(tok), seed=1).state_dict().items()}  # the saved weights
    for r in ranks:  # rank 1 never read the checkpoint, yet starts from it
        start = {k: v for k, v in r["start"]["policy"].items() if k in want}
        assert len(start) == len([k for k in want if "rotary" not in k])  # every weight compared
        assert all(torch.equal(v.float(), want[k]) for k, v in start.items())
    for r in ranks:
        single, _ = ddp_fit.build(model_dir, tok_dir)
        single.configure_model()
        with torch.no_grad():
            out_single = single.compute_losses(r["first_batch"])
        assert r["losses"][0] == pytest.approx(float(out_single["q_loss"]), rel=1e-3, abs=1e-5)
        assert r["policy_losses"][0] == pytest.approx(float(out_single["policy_loss"]), rel=1e-3, abs=1e-5)
    for name in NETWORKS:
        a, b = ranks[0]["final"][name], ranks[1]["final"][name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_injected_policy_under_fsdp_is_used_as_given(monkeypatch) -> None:
    """Nothing to load for an injected policy: configure_model under FSDP keeps it (real
    weights on every rank, no from_pretrained), the others copies as without FSDP."""
    policy = tiny_llama(64, seed=5)
    want = {k: v.clone() for k, v in policy.state_dict().items()}
    module = ETPOModule(policy=policy)
    _, loads = _fsdp_configure(module, rank=1, monkeypatch=monkeypatch)
    assert loads == [] and module.policy is policy
    for name in NETWORKS:
        assert not any(t.is_meta for t in _tensors(getattr(module, name))), name
    assert all(torch.equal(module.reference.state_dict()[k], v) for k, v in want.items())
