"""The functional core against brute-force loops and closed forms."""

import math

import pytest
import torch

from etpo_lightning.losses import kl_and_entropy, policy_loss, q_loss, soft_bellman_targets, soft_values



@pytest.fixture(autouse=True, scope="module")
def _float64():
    # Exactness checks at 1e-12 need float64; restore the default for other test files.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _brute_soft_value(q, pl, rl, beta):
    pi = [math.exp(x) for x in pl]
    z = sum(pi)
    pi = [p / z for p in pi]
    rho = [math.exp(x) for x in rl]
    zr = sum(rho)
    rho = [r / zr for r in rho]
    return sum(p * (qq - beta * (math.log(p) - math.log(r))) for p, qq, r in zip(pi, q, rho))


def test_soft_values_equals_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    q, pl, rl = (torch.randn(3, 4, 7, generator=g, dtype=torch.float64) for _ in range(3))
    got = soft_values(q, pl, rl, beta=0.3)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            want = _brute_soft_value(q[i, j].tolist(), pl[i, j].tolist(), rl[i, j].tolist(), 0.3)
            assert got[i, j].item() == pytest.approx(want, abs=1e-12)


def test_soft_values_of_boltzmann_policy_is_beta_logsumexp():
    g = torch.Generator().manual_seed(1)
    q, rl = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g)
    beta = 0.7
    log_rho = torch.log_softmax(rl, -1)
    boltzmann_logits = log_rho + q / beta
    got = soft_values(q, boltzmann_logits, rl, beta)
    want = beta * torch.logsumexp(log_rho + q / beta, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_chunking_does_not_change_values_or_gradients():
    g = torch.Generator().manual_seed(2)
    q, pl, rl = (torch.randn(2, 9, 13, generator=g) for _ in range(3))
    mask = torch.rand(2, 9, generator=g) > 0.3
    torch.testing.assert_close(soft_values(q, pl, rl, 0.1, chunk_size=1), soft_values(q, pl, rl, 0.1, chunk_size=1000))
    grads = []
    for chunk in (1, 4, 1000):
        logits = pl.clone().requires_grad_(True)
        loss = policy_loss(logits, rl, q, mask, beta=0.1, chunk_size=chunk)
        loss.backward()
        grads.append((loss.detach(), logits.grad))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0])
        torch.testing.assert_close(grad, grads[0][1])


def test_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    q, pl, rl = (torch.randn(4, 50, generator=g, dtype=torch.float32).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = soft_values(q, pl, rl, 0.05)
        loss = policy_loss(pl, rl, q, torch.ones(4, dtype=torch.bool), 0.05)
    assert v.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(v, soft_values(q.float(), pl.float(), rl.float(), 0.05))


def test_policy_loss_at_boltzmann_policy_is_minus_beta_log_z():
    g = torch.Generator().manual_seed(4)
    q, rl = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    beta = 0.4
    log_rho = torch.log_softmax(rl, -1)
    boltzmann = log_rho + q / beta
    mask = torch.ones(3, dtype=torch.bool)
    got = policy_loss(boltzmann, rl, q, mask, beta)
    log_z = torch.logsumexp(log_rho + q / beta, -1)
    torch.testing.assert_close(got, (-beta * log_z).mean(), rtol=0, atol=1e-12)
    # Any other policy scores higher (the loss is beta*KL(pi||pi*) - beta log Z).
    assert policy_loss(boltzmann + torch.randn(3, 6, generator=g), rl, q, mask, beta) > got


def test_gradient_descent_on_policy_loss_converges_to_boltzmann():
    g = torch.Generator().manual_seed(5)
    q, rl = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    beta = 0.5
    logits = torch.zeros(4, 5, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    mask = torch.ones(4, dtype=torch.bool)
    for _ in range(2000):
        opt.zero_grad()
        policy_loss(logits, rl, q, mask, beta).backward()
        opt.step()
    want = torch.softmax(torch.log_softmax(rl, -1) + q / beta, -1)
    torch.testing.assert_close(torch.softmax(logits, -1), want, rtol=0, atol=1e-6)


def test_policy_loss_ignores_padding_and_detaches_q():
    q = torch.randn(2, 3, 4, requires_grad=True)
    pl, rl = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    full = policy_loss(pl, rl, q, mask, 0.2)
    pl2 = pl.detach().clone()
    pl2[0, 2] += 100.0  # padding positions must not matter
    pl2[1, 1:] -= 50.0
    torch.testing.assert_close(policy_loss(pl2, rl, q, mask, 0.2), full)
    full.backward()
    assert q.grad is None
    assert pl.grad[0, 2].abs().sum() == 0 and pl.grad[1, 1:].abs().sum() == 0
    assert pl.grad[0, :2].abs().sum() > 0


def test_bellman_targets_padding_last_token_done_and_not_done():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([0.5, -1.0, 3.0])
    dones = torch.tensor([0.0, 1.0, 0.0])
    next_values = torch.tensor([10.0, 100.0, 7.0])
    t = soft_bellman_targets(values, mask, rewards, dones, next_values, gamma=0.9)
    want = torch.tensor(
        [
            [2.0, 3.0, 0.5 + 0.9 * 10.0, 0.0],  # not done: bootstrap from V(s'), padding 0
            [6.0, 7.0, 8.0, -1.0],  # done: the reward alone, next value ignored
            [0.0, 0.0, 0.0, 0.0],  # no valid token
        ]
    )
    torch.testing.assert_close(t, want)


def test_q_loss_mse_and_huber():
    q = torch.tensor([[1.0, 2.0, 9.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([[0.0, 4.0, -9.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert q_loss(q, y, mask).item() == pytest.approx((1 + 4 + 9) / 3)
    # Huber(delta=1): 0.5*1, then |d|-0.5 for |d|>1: 1.5 and 2.5.
    assert q_loss(q, y, mask, huber_delta=1.0).item() == pytest.approx((0.5 + 1.5 + 2.5) / 3)


def test_kl_and_entropy_exact():
    pl = torch.tensor([[0.0, math.log(3.0)]])  # pi = (1/4, 3/4)
    rl = torch.tensor([[0.0, 0.0]])  # rho uniform
    kl, ent = kl_and_entropy(pl, rl)
    p = torch.tensor([0.25, 0.75])
    assert kl.item() == pytest.approx((p * (p.log() - math.log(0.5))).sum().item(), abs=1e-12)
    assert ent.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-12)
