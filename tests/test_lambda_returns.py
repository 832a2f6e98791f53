"""ETPO(lambda): ``soft_lambda_targets`` against the spec, and its fixed point on a tabular MDP.

The spec's section "Multi-step soft returns along an action" defines, from the one-step
targets y_j, the target Q Qbar_j of the taken token and traces c_j = lam * min(1, pi/mu),

    G_n = y_n,   G_j = y_j + c_{j+1} (G_{j+1} - Qbar_{j+1}),

and claims the fixed point of the one-step rule for every lam. The tabular test iterates
the expected update (every continuation of an action enumerated under the behaviour
policy mu, every reward outcome under its probability) and compares the product of token
policies with the action-level optimum solved by enumeration in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from etpo_lightning import ETPOModule, Transition, TransitionBatch
from etpo_lightning.losses import soft_bellman_targets, soft_lambda_targets, soft_values
from helpers import tiny_llama

DT = torch.float64


def _random_inputs(seed: int = 0, batch: int = 5, length: int = 7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length  # one full row, one single-token row
    lengths[1] = 1
    mask = torch.arange(length)[None] < lengths[:, None]
    q_taken = torch.randn(batch, length, generator=g, dtype=dtype)
    values = torch.randn(batch, length, generator=g, dtype=dtype)
    rewards = torch.randn(batch, generator=g, dtype=dtype)
    dones = (torch.rand(batch, generator=g) < 0.5).to(dtype)
    next_values = torch.randn(batch, generator=g, dtype=dtype)
    log_ratio = (torch.randn(batch, length, generator=g, dtype=dtype) * 1.5) * mask
    return q_taken, values, mask, rewards, dones, next_values, log_ratio


def _brute_force(q_taken, values, mask, rewards, dones, next_values, gamma, lam, log_ratio):
    """G_j = y_j + sum_{k>j} (prod_{i=j+1..k} c_i) (y_k - Qbar_k), summed explicitly, float64."""
    out = torch.zeros(q_taken.shape, dtype=DT)
    for b in range(q_taken.shape[0]):
        n = int(mask[b].sum())
        y = [float(values[b, j + 1]) for j in range(n - 1)]
        y.append(float(rewards[b] + gamma * (1 - dones[b]) * next_values[b]))
        c = [lam * min(1.0, float(torch.exp(log_ratio[b, j].double()))) if log_ratio is not None else lam
             for j in range(n)]
        for j in range(n):
            total, prod = y[j], 1.0
            for k in range(j + 1, n):
                prod *= c[k]
                total += prod * (y[k] - float(q_taken[b, k]))
            out[b, j] = total
    return out


def test_lambda_zero_is_the_one_step_rule_bit_for_bit():
    q_taken, values, mask, rewards, dones, next_values, log_ratio = _random_inputs()
    one_step = soft_bellman_targets(values, mask, rewards, dones, next_values, 0.9)
    for ratio in (None, log_ratio):
        got = soft_lambda_targets(q_taken, values, mask, rewards, dones, next_values, 0.9, 0.0, ratio)
        assert torch.equal(got, one_step)


@pytest.mark.parametrize("lam", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("with_ratio", [False, True])
def test_matches_the_explicit_sum_of_corrections(lam, with_ratio):
    q_taken, values, mask, rewards, dones, next_values, log_ratio = _random_inputs(seed=1)
    ratio = log_ratio if with_ratio else None
    got = soft_lambda_targets(q_taken, values, mask, rewards, dones, next_values, 0.9, lam, ratio)
    want = _brute_force(q_taken, values, mask, rewards, dones, next_values, 0.9, lam, ratio)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got[~mask] == 0).all()


def test_monte_carlo_form_at_lambda_one():
    """lam = 1, c = 1: G_j = y_n - sum_{i>j} (Qbar_i - Vbar_i), the spec's Monte-Carlo identity."""
    q_taken, values, mask, rewards, dones, next_values, _ = _random_inputs(seed=2, dtype=DT)
    got = soft_lambda_targets(q_taken, values, mask, rewards, dones, next_values, 0.9, 1.0)
    for b in range(len(rewards)):
        n = int(mask[b].sum())
        y_n = rewards[b] + 0.9 * (1 - dones[b]) * next_values[b]
        for j in range(n):
            want = y_n - sum(q_taken[b, i] - values[b, i] for i in range(j + 1, n))
            assert float(got[b, j]) == pytest.approx(float(want), abs=1e-12)


def test_traces_cut_where_the_behaviour_policy_was_far_more_likely():
    """pi/mu ~ 0 at token k: tokens before k no longer see anything after k (G_{k-1} = y_{k-1})."""
    q_taken, values, mask, rewards, dones, next_values, log_ratio = _random_inputs(seed=3)
    k = 3
    cut = torch.zeros_like(log_ratio)  # on-policy everywhere but at token k of row 0
    cut[0, k] = -60.0
    args = (q_taken, values, mask)
    g1 = soft_lambda_targets(*args, rewards, dones, next_values, 0.9, 1.0, cut)
    g2 = soft_lambda_targets(*args, rewards + 5.0, dones, next_values, 0.9, 1.0, cut)
    assert torch.equal(g1[0, :k], g2[0, :k])
    # ... while the reward still reaches token k and every later one in full (c = 1 there).
    torch.testing.assert_close(g2[0, k:] - g1[0, k:], torch.full_like(g1[0, k:], 5.0))
    assert float(g1[0, k - 1]) == pytest.approx(float(values[0, k]), abs=1e-6)
    # Ratios above 1 are clipped: a trace never exceeds lam.
    big = log_ratio.abs() * mask
    torch.testing.assert_close(soft_lambda_targets(*args, rewards, dones, next_values, 0.9, 0.7, big),
                               soft_lambda_targets(*args, rewards, dones, next_values, 0.9, 0.7, None))


def test_bad_lambda_is_refused():
    args = _random_inputs()[:6]
    with pytest.raises(ValueError, match="lam must be in"):
        soft_lambda_targets(*args, 0.9, 1.5)
    with pytest.raises(ValueError, match="lam"):
        ETPOModule(policy=tiny_llama(32), lam=-0.1)


# ----------------------------------------------------------------- tabular fixed point
VOCAB, N = 3, 3  # tokens, tokens per action
BETA, GAMMA, NOISE = 0.3, 0.9, 0.8
ACTIONS = list(itertools.product(range(VOCAB), repeat=N))


def _problem(seed: int = 0):
    """Two steps: from s0 the first token picks the next state ('s1', k); from there the
    episode ends. Rewards are stochastic: r + NOISE with probability p, r - NOISE otherwise."""
    g = torch.Generator().manual_seed(seed)
    states = ["s0"] + [("s1", k) for k in range(VOCAB)]
    reward = {(s, a): float(torch.randn(1, generator=g, dtype=DT)) for s in states for a in ACTIONS}
    p_high = {(s, a): float(torch.rand(1, generator=g, dtype=DT)) for s in states for a in ACTIONS}
    histories = [(s, prefix) for s in states for j in range(N) for prefix in itertools.product(range(VOCAB), repeat=j)]
    ref_logits = {h: torch.randn(VOCAB, generator=g, dtype=DT) * 1.5 for h in histories}
    mu_logits = {h: torch.randn(VOCAB, generator=g, dtype=DT) for h in histories}  # the off-policy sampler
    return states, reward, p_high, ref_logits, mu_logits


def _mean_reward(reward, p_high, s, a):
    return reward[(s, a)] + NOISE * (2 * p_high[(s, a)] - 1)


def _action_level_optimum(states, reward, p_high, ref_logits):
    def log_rho(s, a):
        return sum(torch.log_softmax(ref_logits[(s, a[:j])], -1)[a[j]] for j in range(N))

    policy, v_star = {}, {}
    for s in states[1:] + states[:1]:  # the last step first
        bootstrap = (lambda a: GAMMA * v_star[("s1", a[0])]) if s == "s0" else (lambda a: 0.0)
        q = torch.tensor([_mean_reward(reward, p_high, s, a) + bootstrap(a) for a in ACTIONS], dtype=DT)
        lr = torch.stack([log_rho(s, a) for a in ACTIONS])
        v_star[s] = BETA * torch.logsumexp(lr + q / BETA, 0)
        policy[s] = torch.exp(lr + (q - v_star[s]) / BETA)
    return policy


def _token_level_iteration(states, reward, p_high, ref_logits, mu_logits, lam, off_policy, use_ratio, sweeps,
                           control_variate="q"):
    """Expected ETPO(lambda) updates: Q(h_j, w^j) <- E_mu,env[G_j | h_j, w^j] for every history
    and token, pi the Boltzmann policy of Q (the minimiser of policy_loss); returns prod_j pi."""
    q = {h: torch.zeros(VOCAB, dtype=DT) for h in ref_logits}

    def log_pi(h):
        return torch.log_softmax(torch.log_softmax(ref_logits[h], -1) + q[h] / BETA, -1)

    def value(h):
        return soft_values(q[h], log_pi(h), ref_logits[h], BETA)

    for _ in range(sweeps):
        new_q = {h: torch.zeros(VOCAB, dtype=DT) for h in q}
        for s in states:
            # One row per (action, reward outcome): 54 rows.
            rows = [(a, high) for a in ACTIONS for high in (True, False)]
            hists = [[(s, a[:j]) for j in range(N)] for a, _ in rows]
            q_taken = torch.stack([torch.stack([q[h][a[j]] for j, h in enumerate(hs)]) for (a, _), hs in zip(rows, hists)])
            values = torch.stack([torch.stack([value(h) for h in hs]) for hs in hists])
            rewards = torch.tensor([reward[(s, a)] + (NOISE if high else -NOISE) for a, high in rows], dtype=DT)
            terminal = s != "s0"
            dones = torch.full((len(rows),), float(terminal), dtype=DT)
            next_values = torch.stack([value((("s1", a[0]), ())) if not terminal else torch.tensor(7.0, dtype=DT)
                                       for a, _ in rows])
            log_mu = {h: torch.log_softmax(mu_logits[h], -1) if off_policy else log_pi(h) for h in q}
            log_ratio = torch.stack([torch.stack([log_pi(h)[a[j]] - log_mu[h][a[j]] for j, h in enumerate(hs)])
                                     for (a, _), hs in zip(rows, hists)])
            mask = torch.ones(len(rows), N, dtype=torch.bool)
            if control_variate == "value":
                q_taken = values
            g = soft_lambda_targets(q_taken, values, mask, rewards, dones, next_values, GAMMA, lam,
                                    log_ratio if use_ratio else None)
            # E[G_j | h_j, w^j]: weight each row by mu of its continuation and its outcome.
            for j in range(N):
                for row, ((a, high), hs) in enumerate(zip(rows, hists)):
                    p_out = p_high[(s, a)] if high else 1 - p_high[(s, a)]
                    cont = torch.exp(sum(log_mu[hs[i]][a[i]] for i in range(j + 1, N))) if j + 1 < N else 1.0
                    new_q[hs[j]][a[j]] += p_out * cont * g[row, j]
        q = new_q
    return {s: torch.stack([torch.exp(sum(log_pi((s, a[:j]))[a[j]] for j in range(N))) for a in ACTIONS])
            for s in states}


@pytest.mark.parametrize(("lam", "off_policy"), [(0.0, False), (0.5, False), (1.0, False), (0.5, True), (1.0, True)])
def test_every_lambda_reaches_the_action_level_optimum(lam, off_policy):
    problem = _problem()
    want = _action_level_optimum(*problem[:4])
    got = _token_level_iteration(*problem, lam=lam, off_policy=off_policy, use_ratio=True, sweeps=12)
    for s in problem[0]:
        torch.testing.assert_close(got[s], want[s], rtol=0, atol=1e-6)
    rho0 = torch.exp(torch.stack([sum(torch.log_softmax(problem[3][("s0", a[:j])], -1)[a[j]] for j in range(N))
                                  for a in ACTIONS]))
    assert (want["s0"] - rho0).abs().max() > 0.05  # the optimum is far from rho: not a trivial pass


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_uncorrected_traces_keep_the_fixed_point_on_off_policy_data(lam):
    """The spec's argument: inside an action the next history is fixed by the token, so every
    delta_k but the last vanishes at Q^pi whatever the traces; c = lam on data from mu != pi
    converges to the same optimum (the pi/mu cut buys contraction, not a different point)."""
    problem = _problem()
    want = _action_level_optimum(*problem[:4])
    got = _token_level_iteration(*problem, lam=lam, off_policy=True, use_ratio=False, sweeps=12)
    for s in problem[0]:
        torch.testing.assert_close(got[s], want[s], rtol=0, atol=1e-6)


def test_a_wrong_control_variate_misses_the_optimum():
    """The check can fail: correcting with (G - Vbar) instead of (G - Qbar) (TD(lambda) on
    state values) adds c * beta * log(pi/rho)-like terms to every target."""
    problem = _problem()
    want = _action_level_optimum(*problem[:4])
    got = _token_level_iteration(*problem, lam=0.5, off_policy=False, use_ratio=True, sweeps=12,
                                 control_variate="value")
    assert max((got[s] - want[s]).abs().max().item() for s in problem[0]) > 1e-3


def test_lambda_reaches_the_optimum_in_fewer_sweeps():
    """What ETPO(lambda) is for. The one-step rule moves a value back one token per sweep:
    2 steps x 3 tokens need 6 sweeps (measured: error 0.53 after 4). With lam = 1 a sweep
    carries it over the whole action: exact after 4 (2 per step, as pi settles)."""
    problem = _problem()
    want = _action_level_optimum(*problem[:4])

    def error(lam: float, sweeps: int) -> float:
        got = _token_level_iteration(*problem, lam=lam, off_policy=False, use_ratio=True, sweeps=sweeps)
        return max((got[s] - want[s]).abs().max().item() for s in problem[0])

    assert error(1.0, 4) < 1e-9
    assert error(0.0, 4) > 0.1
    assert error(0.0, 6) < 1e-9


# ------------------------------------------------------------------- the module
def test_module_targets_are_lambda_returns_with_fresh_bootstraps_and_retrace_traces():
    """ETPOModule(lam, traces) trains on soft_lambda_targets of its own networks' outputs:
    V(s') from next_prompt_ids with the target critic now, traces from the stored log mu."""
    vocab = 40
    g = torch.Generator().manual_seed(0)
    transitions = []
    for i in range(4):
        action = torch.randint(3, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        transitions.append(Transition(
            prompt_ids=torch.randint(3, vocab, (5,), generator=g), action_ids=action,
            reward=float(torch.randn(1, generator=g)), terminated=i == 0, truncated=i == 1,
            next_value=123.0,  # a stale rollout-time value: must not be used
            logprobs=-torch.rand(action.numel(), generator=g) * 3,
            next_prompt_ids=torch.empty(0, dtype=torch.long) if i == 0 else torch.randint(3, vocab, (4 + i,), generator=g),
        ))
    batch = TransitionBatch.collate(transitions, pad_token_id=0)
    assert batch.dones.tolist() == [1.0, 0.0, 0.0, 0.0]  # truncation is not terminal
    module = ETPOModule(policy=tiny_llama(vocab, seed=0), beta=0.1, gamma=0.9, lam=0.8, traces=True)
    with torch.no_grad():
        out = module.compute_losses(batch)
        pi = module.action_outputs(module.policy, batch)
        rho = module.action_outputs(module.reference, batch)
        qt = module.action_outputs(module.target_critic, batch)
        values = soft_values(qt, pi, rho, 0.1)
        taken = batch.action_ids[..., None]
        log_ratio = (torch.log_softmax(pi, -1).gather(-1, taken).squeeze(-1) - batch.old_logprobs) * batch.action_mask
        next_values = torch.zeros(4)
        for i, t in enumerate(transitions[1:], start=1):
            ids = t.next_prompt_ids[None]
            next_values[i] = module.bootstrap_values(ids, torch.ones_like(ids, dtype=torch.bool))[0]
    want = _brute_force(qt.gather(-1, taken).squeeze(-1), values, batch.action_mask, batch.rewards, batch.dones,
                        next_values, 0.9, 0.8, log_ratio)
    mask = batch.action_mask
    assert out["target"].item() == pytest.approx(want[mask].mean().item(), abs=1e-5)
    assert out["next_value"].item() == pytest.approx(next_values.mean().item(), abs=1e-6)
    assert 0 < out["trace_ratio"].item() < 1
