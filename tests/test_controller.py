"""Unit tests of controller.py's math against hand-computed values (fast, no torch).

Run: python -m pytest -q tests/test_controller.py
"""

import json
import math

import pytest

import controller as ctl


# ---------------------------------------------------------------- reward
def test_reward_is_relative_improvement_per_reference_tokens():
    assert ctl.compute_reward(2.0, 1.8, tokens=100, ref_tokens=100) == pytest.approx(0.1)
    # the same gain for twice the tokens (a doubled batch) earns half
    assert ctl.compute_reward(2.0, 1.8, tokens=200, ref_tokens=100) == pytest.approx(0.05)
    # degradation is negative
    assert ctl.compute_reward(2.0, 2.2, tokens=100, ref_tokens=100) == pytest.approx(-0.1)


def test_reward_nonfinite_and_clipping():
    assert ctl.compute_reward(2.0, float("nan"), 100, 100) == -ctl.MAX_REWARD
    assert ctl.compute_reward(2.0, float("inf"), 100, 100) == -ctl.MAX_REWARD
    assert ctl.compute_reward(2.0, 1.9, 100, 100, nonfinite=True) == -ctl.MAX_REWARD
    assert ctl.compute_reward(2.0, 50.0, 100, 100) == -ctl.MAX_REWARD  # exploding loss, clipped
    assert ctl.compute_reward(2.0, 0.0, 1, 1000) == ctl.MAX_REWARD


# ---------------------------------------------------------------- the design's formulas, fixed
def test_update_learning_rate_positive_reward_raises_lr():
    assert ctl.update_learning_rate(1e-3, 1.0, alpha=2.0) == pytest.approx(2e-3)
    assert ctl.update_learning_rate(1e-3, -1.0, alpha=2.0) == pytest.approx(5e-4)
    assert ctl.update_learning_rate(1e-3, 0.0, alpha=2.0) == pytest.approx(1e-3)
    assert ctl.update_learning_rate(1e-3, 0.5, alpha=4.0) == pytest.approx(2e-3)


def test_update_learning_rate_rejects_alpha_below_one_and_clips():
    # the design's alpha in (0, 1) would lower the lr on a positive reward: refused
    with pytest.raises(ValueError, match="alpha"):
        ctl.update_learning_rate(1e-3, 1.0, alpha=0.5)
    assert ctl.update_learning_rate(1e-3, 1.0, alpha=10.0, lr_max=5e-3) == 5e-3
    assert ctl.update_learning_rate(1e-3, -1.0, alpha=10.0, lr_min=5e-4) == 5e-4


def test_update_batch_size_never_zero_and_can_grow():
    # the design's prev * reward / max_reward gives 0 here; the fix keeps the batch
    assert ctl.update_batch_size(64, 0.0, 1.0) == 64
    assert ctl.update_batch_size(64, 1.0, 1.0) == 128  # can grow
    assert ctl.update_batch_size(64, -1.0, 1.0) == 32
    assert ctl.update_batch_size(64, -100.0, 1.0) == 32  # bounded factor, never <= 0
    assert ctl.update_batch_size(1, -1.0, 1.0) == 1


def test_update_batch_size_rounds_to_valid_multiple_and_bounds():
    # micro batch 8 x 2 processes = 16: 48 * 2**0.5 = 67.9 -> 64
    assert ctl.update_batch_size(48, 0.5, 1.0, multiple=16) == 64
    assert ctl.update_batch_size(16, -1.0, 1.0, multiple=16) == 16
    assert ctl.update_batch_size(64, 1.0, 1.0, multiple=16, hi=96) == 96
    assert ctl.update_batch_size(64, -1.0, 1.0, multiple=16, lo=48) == 48


def test_reinforce_update_hand_computed():
    theta = [[0.0, 0.0], [0.0, 0.0]]
    probs = ctl.softmax([0.0, 0.0])
    assert probs == [0.5, 0.5]
    ctl.reinforce_update(theta, features=[1.0, 2.0], probs=probs, action=0, advantage=2.0, eta=0.1)
    # theta[a] += eta * adv * (1[a=0] - 0.5) * x
    assert theta[0] == pytest.approx([0.1, 0.2])
    assert theta[1] == pytest.approx([-0.1, -0.2])


def test_softmax_is_stable():
    p = ctl.softmax([1000.0, 1000.0 + math.log(3)])
    assert p == pytest.approx([0.25, 0.75])


# ---------------------------------------------------------------- the policies
def make(policy="rl", patience=None):
    return ctl.Controller(
        policy, lr=1e-3, lr_bounds=(1e-8, 1e2), grad_accum=2, grad_accum_bounds=(1, 8), seed=3, patience=patience
    )


@pytest.fixture
def no_opening(monkeypatch):
    monkeypatch.setattr(ctl, "PROBE_TRIALS", 0)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        make("adam")


def test_rl_policy_learns_the_best_arm_of_a_toy_bandit(no_opening):
    """Online phase only: the loss improves most after 'lr_up', not at all after the others."""
    c = ctl.Controller("rl", lr=1e-3, lr_bounds=(1e-60, 1e60), grad_accum=2, grad_accum_bounds=(1, 8), seed=3)
    assert c.policy.phase == "online"
    loss, tokens, counts = 3.0, 0, {}
    d = None
    for i in range(300):
        gain = 0.02 if (d is not None and d.action == "lr_up") else 0.0
        loss -= gain * loss
        tokens += 1000 * c.grad_accum
        d = c.step({"tokens": tokens, "eval_loss": loss, "progress": i / 300})
        if i >= 200:
            counts[d.action] = counts.get(d.action, 0) + 1
    assert max(counts, key=counts.get) == "lr_up", counts
    assert counts["lr_up"] > 50, counts


def test_probe_finds_the_best_lr_and_keeps_its_weights(monkeypatch):
    """Opening trials on a loss that is best at 10x the starting lr: the probe tries moves from
    the initial weights (load init) and commits to the best trial's lr."""
    monkeypatch.setattr(ctl, "PROBE_FRAC", 1.0)
    c = make()
    assert c.start().save == "init"

    def trial_loss(scale):  # V-shaped in log10(lr scale), best at scale 10
        return 3.0 + abs(math.log10(scale) - 1.0)

    tokens, decisions = 0, []
    for _ in range(10):
        tokens += 1000
        d = c.step({"tokens": tokens, "eval_loss": trial_loss(c.lr_scale), "progress": tokens / 1e5})
        decisions.append(d)
        if d.action == "commit":
            break
    assert decisions[-1].action == "commit"
    assert c.lr_scale == pytest.approx(10.0)
    assert all(d.load == "init" for d in decisions[:-1])  # every trial restarts from the initial weights
    assert c.policy.phase == "online"


def test_online_rollback_on_spike_and_nonfinite(no_opening):
    c = make()
    c.step({"tokens": 1000, "eval_loss": 3.0})
    scale = c.lr_scale
    d = c.step({"tokens": 2000, "eval_loss": 3.0 * 1.5})
    assert d.load == "best" and d.action == "rollback"
    assert c.lr_scale == pytest.approx(scale * 0.5)
    d = c.step({"tokens": 3000, "eval_loss": 2.9, "nonfinite_steps": 1})
    assert d.load == "best" and d.reward == -ctl.MAX_REWARD


def test_plateau_halves_lr_after_patience():
    c = make("plateau")
    losses = [3.0, 2.9, 2.9, 2.9, 2.9, 2.9]
    actions = [c.step({"tokens": 1000 * (i + 1), "eval_loss": v}).action for i, v in enumerate(losses)]
    assert actions == ["keep", "keep", "keep", "keep", "lr_down", "keep"]
    assert c.lr_scale == 0.5


def test_seed_policy_applies_the_formulas():
    c = make("seed")
    c.step({"tokens": 1000, "eval_loss": 3.0})
    d = c.step({"tokens": 2000, "eval_loss": 2.7})  # reward 0.1 -> x 2 ** (0.1 * SEED_GAIN)
    assert d.reward == pytest.approx(0.1)
    assert c.lr_scale == pytest.approx(2.0 ** (0.1 * ctl.SEED_GAIN))
    assert c.grad_accum == ctl.update_batch_size(2, 0.1 * ctl.SEED_GAIN, ctl.MAX_REWARD, 1, 1, 8)


def test_patience_stops():
    c = make("off", patience=2)
    stops = [c.step({"tokens": i, "eval_loss": v}).stop for i, v in enumerate([3.0, 3.1, 3.2])]
    assert stops == [False, False, True]


def test_state_dict_round_trip_gives_identical_later_decisions(monkeypatch):
    monkeypatch.setattr(ctl, "PROBE_FRAC", 0.3)
    obs = [
        {"tokens": 1000 * (i + 1), "eval_loss": 4.0 - 0.02 * i + 0.05 * (i % 3), "progress": i / 80} for i in range(80)
    ]
    a = make()
    for o in obs[:15]:
        a.step(o)
    saved = json.loads(json.dumps(a.state_dict()))  # plain data, survives JSON
    b = make()
    b.load_state_dict(saved)
    rest_a = [a.step(o).as_dict() for o in obs[15:]]
    rest_b = [b.step(o).as_dict() for o in obs[15:]]
    assert rest_a == rest_b
    assert len({d["action"] for d in rest_a}) > 1  # the policy is really choosing


def test_same_seed_same_decisions_other_seed_differs(no_opening):
    obs = [{"tokens": 1000 * (i + 1), "eval_loss": 4.0 - 0.05 * i} for i in range(40)]
    runs = []
    for seed in (1, 1, 2):
        c = ctl.Controller("rl", 1e-3, (1e-8, 1e2), 2, (1, 8), seed=seed)
        runs.append([c.step(o).action for o in obs])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("first_loss,up", [(5.2, True), (3.3, False)])
def test_probe_first_move_follows_how_far_the_first_trial_got(first_loss, up, monkeypatch):
    """From 6.0 at init: a first trial that took off little (5.2) suggests a too-low lr (go up);
    one that took off a lot (3.3) may be too high, and the safe first move is down."""
    monkeypatch.setattr(ctl, "PROBE_FRAC", 1.0)
    went_up = 0
    for seed in range(40):
        c = ctl.Controller("rl", 1e-3, (1e-6, 1.0), 1, (1, 4), seed=seed)
        c.start(eval_loss=6.0)
        c.step({"tokens": 1000, "eval_loss": first_loss, "progress": 0.01})
        went_up += c.lr_scale > 1
    assert (went_up >= 32) if up else (went_up <= 8), went_up


def test_probe_near_ties_go_to_the_lower_lr(monkeypatch):
    """A trial at 10x that is only 1.5% better than the one at 1x does not win: after one interval a
    too-high lr can look as good as the right one. The run goes on at 1x from its saved weights."""
    monkeypatch.setattr(ctl, "PROBE_FRAC", 1.0)
    monkeypatch.setattr(ctl, "PROBE_TRIALS", 2)
    c = make()
    c.start(eval_loss=6.0)
    d1 = c.step({"tokens": 1000, "eval_loss": 5.5, "progress": 0.01})  # took off little: go up
    assert d1.save == "best" and d1.load == "init" and c.lr_scale > 1
    d2 = c.step({"tokens": 2000, "eval_loss": 5.5 * (1 - 0.015), "progress": 0.02})
    assert d2.action == "commit" and c.lr_scale == 1.0 and d2.load == "best" and d2.save == ""
    c = make()
    c.start(eval_loss=6.0)
    c.step({"tokens": 1000, "eval_loss": 5.5, "progress": 0.01})
    d2 = c.step({"tokens": 2000, "eval_loss": 5.5 * (1 - 0.05), "progress": 0.02})  # clearly better: it wins
    assert d2.action == "commit" and c.lr_scale > 1 and d2.load == "" and d2.save == "best"
