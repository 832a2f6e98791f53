"""The paper's optimisation-consistency result, checked exactly on a tabular problem.

A two-step environment with a 3-token vocabulary and actions of exactly 3 tokens
(27 actions per state). The action-level KL-regularised problem is solved exactly by
enumeration; separately a tabular token-level Q is iterated with ``soft_values`` and
``soft_bellman_targets`` only, the policy at each history being the minimiser of
``policy_loss`` (the Boltzmann policy rho * exp(Q/beta) / Z). The product of the token
policies along every action must equal the action-level optimum.
"""

import itertools

import torch

from etpo_lightning.losses import soft_bellman_targets, soft_values

V, N = 3, 3  # vocabulary size, tokens per action
BETA, GAMMA = 0.3, 0.9
ACTIONS = list(itertools.product(range(V), repeat=N))
DT = torch.float64


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Step 0 from state "s0": reward r0(a); the first token decides the next state (0..V-1).
    # Step 1 from state ("s1", k): reward r1(k, a), then the episode ends.
    r0 = {a: float(torch.rand(1, generator=g, dtype=DT)) for a in ACTIONS}
    r1 = {(k, a): float(torch.randn(1, generator=g, dtype=DT)) for k in range(V) for a in ACTIONS}
    states = ["s0"] + [("s1", k) for k in range(V)]
    # An arbitrary (non-uniform) token-level reference rho(w | state, prefix).
    ref_logits = {
        (s, prefix): torch.randn(V, generator=g, dtype=DT) * 1.5
        for s in states
        for j in range(N)
        for prefix in itertools.product(range(V), repeat=j)
    }
    return r0, r1, states, ref_logits


def _log_rho_action(ref_logits, s, a):
    return sum(torch.log_softmax(ref_logits[(s, a[:j])], -1)[a[j]] for j in range(N))


def _action_level_optimum(r0, r1, ref_logits):
    """pi*(a|s) = rho(a|s) exp((Q*(s,a) - V*(s)) / beta), solved backwards over the two steps."""
    policy, v_star = {}, {}
    for k in range(V):
        s = ("s1", k)
        q = torch.tensor([r1[(k, a)] for a in ACTIONS], dtype=DT)
        log_rho = torch.stack([_log_rho_action(ref_logits, s, a) for a in ACTIONS])
        v_star[s] = BETA * torch.logsumexp(log_rho + q / BETA, 0)
        policy[s] = torch.exp(log_rho + (q - v_star[s]) / BETA)
    q = torch.tensor([r0[a] + GAMMA * v_star[("s1", a[0])] for a in ACTIONS], dtype=DT)
    log_rho = torch.stack([_log_rho_action(ref_logits, "s0", a) for a in ACTIONS])
    v_star["s0"] = BETA * torch.logsumexp(log_rho + q / BETA, 0)
    policy["s0"] = torch.exp(log_rho + (q - v_star["s0"]) / BETA)
    return policy


def _token_level_iteration(r0, r1, states, ref_logits, sweeps: int):
    q_table = {h: torch.zeros(V, dtype=DT) for h in ref_logits}

    def boltzmann_logits(h):  # the exact minimiser of policy_loss at h
        return torch.log_softmax(ref_logits[h], -1) + q_table[h] / BETA

    def value(h):
        return soft_values(q_table[h], boltzmann_logits(h), ref_logits[h], BETA)

    for _ in range(sweeps):
        for s in states:
            # One row per action: values at each of its histories, then the Bellman targets.
            values = torch.stack([torch.stack([value((s, a[:j])) for j in range(N)]) for a in ACTIONS])
            if s == "s0":
                rewards = torch.tensor([r0[a] for a in ACTIONS], dtype=DT)
                dones = torch.zeros(len(ACTIONS), dtype=DT)
                next_values = torch.stack([value((("s1", a[0]), ())) for a in ACTIONS])
            else:
                rewards = torch.tensor([r1[(s[1], a)] for a in ACTIONS], dtype=DT)
                dones = torch.ones(len(ACTIONS), dtype=DT)
                next_values = torch.full((len(ACTIONS),), 123.0, dtype=DT)  # must be ignored: done
            mask = torch.ones(len(ACTIONS), N, dtype=torch.bool)
            targets = soft_bellman_targets(values, mask, rewards, dones, next_values, GAMMA)
            for row, a in enumerate(ACTIONS):
                for j in range(N):
                    q_table[(s, a[:j])][a[j]] = targets[row, j]
    token_policy = {}
    for s in states:
        token_policy[s] = torch.stack(
            [
                torch.exp(sum(torch.log_softmax(boltzmann_logits((s, a[:j])), -1)[a[j]] for j in range(N)))
                for a in ACTIONS
            ]
        )
    return token_policy


def test_token_level_fixed_point_equals_action_level_optimum():
    r0, r1, states, ref_logits = _problem()
    want = _action_level_optimum(r0, r1, ref_logits)
    # The horizon is 2 steps x 3 tokens: 6 sweeps reach the fixed point exactly; run more.
    got = _token_level_iteration(r0, r1, states, ref_logits, sweeps=8)
    for s in states:
        assert abs(float(got[s].sum()) - 1.0) < 1e-9
        torch.testing.assert_close(got[s], want[s], rtol=0, atol=1e-6)
    # Guard against a trivial pass: the optimum is far from the reference.
    ref0 = torch.exp(torch.stack([_log_rho_action(ref_logits, "s0", a) for a in ACTIONS]))
    assert (want["s0"] - ref0).abs().max() > 0.05


def test_without_discount_bootstrap_the_policies_differ():
    """The check can fail: a wrong next-state value (ignoring V(s')) breaks consistency."""
    r0, r1, states, ref_logits = _problem(seed=1)
    want = _action_level_optimum(r0, r1, ref_logits)
    import etpo_lightning.losses as losses

    original = losses.soft_bellman_targets
    try:
        globals()["soft_bellman_targets"] = lambda v, m, r, d, nv, g: original(v, m, r, d, nv * 0, g)
        got = _token_level_iteration(r0, r1, states, ref_logits, sweeps=8)
    finally:
        globals()["soft_bellman_targets"] = original
    assert (got["s0"] - want["s0"]).abs().max() > 1e-3
