"""A reinforcement-learning controller for the learning rate and the batch size.

Pure Python (standard library only): functions take numbers and return numbers, the
Controller keeps its state in plain attributes with state_dict()/load_state_dict().
Copy this file into any training loop. Every N optimizer steps the loop evaluates,
then calls

    decision = ctrl.step({"tokens": tokens_spent, "eval_loss": val_loss, "nonfinite_steps": n_bad})

and applies decision.lr_scale (a multiplier on top of its own lr schedule),
decision.grad_accum (gradient-accumulation steps, i.e. the batch size),
decision.save / decision.load (save the weights + optimizer state under a slot name,
then reload a slot: a rollback) and decision.stop. Call ctrl.start() once before
training and apply its save.

The loop (state -> action -> reward -> policy update):
  state   where training stands: eval loss and its trend, progress, current lr scale and batch
  action  a change of lr and/or batch size (and, in the opening, a trial from an anchor)
  reward  the eval-loss improvement per token spent, compute_reward(); a non-finite or
          exploding loss earns -1
  update  REINFORCE with a baseline: theta += eta * (R - b) * grad log pi(a | s)

Policies: "rl" (learned, below), "seed" (the design's fixed formulas), "plateau"
(ReduceLROnPlateau), "off".
"""

import dataclasses
import math
import random

POLICIES = ("rl", "seed", "plateau", "off")

# ---------------------------------------------------------------- EDIT HERE: the reward
MAX_REWARD = 1.0
SEED_GAIN = 10.0  # the "seed" policy feeds reward * SEED_GAIN to the formulas: a window's relative gain is ~0.001-0.1


def compute_reward(loss_before, loss_after, tokens, ref_tokens, nonfinite=False):
    """Cost-aware reward of one decision window.

    loss_before, loss_after: eval loss (nats/token) at the start and end of the window.
    tokens: training tokens the window spent; ref_tokens: the tokens of a window at the
    starting batch size, so a window that spent twice the tokens for the same gain earns half.
    Returns the relative improvement per ref_tokens, clipped to [-MAX_REWARD, MAX_REWARD];
    -MAX_REWARD if the window saw a non-finite loss/gradient or the loss is not finite.
    """
    if nonfinite or not (math.isfinite(loss_before) and math.isfinite(loss_after)) or loss_before <= 0:
        return -MAX_REWARD
    rate = (loss_before - loss_after) / loss_before * (ref_tokens / max(tokens, 1))
    return max(-MAX_REWARD, min(MAX_REWARD, rate))


# ---------------------------------------------------------------- the design's update formulas, fixed
def update_learning_rate(lr, reward, alpha=2.0, lr_min=0.0, lr_max=math.inf):
    """lr * alpha ** reward, clipped to [lr_min, lr_max].

    The design writes lr * alpha**reward with alpha "usually between 0 and 1" and also says
    a positive reward should raise the lr: with alpha < 1 a positive reward *lowers* it.
    We keep the stated intent (reward > 0 raises the lr) and so take alpha > 1
    (the same as (1/alpha) ** -reward with 1/alpha in (0, 1)). Units: lr in the optimizer's units.
    """
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1 so that a positive reward raises the lr, got {alpha}")
    return min(lr_max, max(lr_min, lr * alpha ** reward))


def update_batch_size(prev, reward, max_reward=MAX_REWARD, multiple=1, lo=1, hi=None):
    """New batch size (sequences, or accumulation steps with multiple=1) after a reward.

    The design's prev * reward / max_reward is 0 or negative for reward <= 0, can only
    shrink the batch, and ignores that the batch must be a multiple of
    micro batch x processes. Fixed: prev * 2 ** (reward / max_reward), a factor in
    [1/2, 2] that is 1 at reward 0, rounded to the nearest multiple of `multiple`,
    clamped to [lo, hi], never below `multiple`.
    """
    r = max(-max_reward, min(max_reward, reward)) / max_reward
    new = prev * 2.0**r
    new = max(multiple, round(new / multiple) * multiple)
    new = max(new, lo)
    return min(new, hi) if hi is not None else new


def lr_range_suggestion(lrs, losses, beta=0.7):
    """The lr an lr range test suggests (fastai's / Lightning's lr_find, "steepest" rule).

    lrs: increasing learning rates of the test's steps; losses: their training losses.
    The losses are smoothed (exponential moving average, bias-corrected); past the minimum
    of the smoothed loss the test diverges, so the lr of the steepest descent of the
    smoothed loss against log(lr) before that minimum is returned.
    """
    smooth, avg = [], 0.0
    for i, v in enumerate(losses):
        v = v if math.isfinite(v) else math.inf
        avg = beta * avg + (1 - beta) * v
        smooth.append(avg / (1 - beta ** (i + 1)))
    best = min(range(len(smooth)), key=lambda i: smooth[i])
    if best == 0:
        return lrs[0]
    slopes = [(smooth[i + 1] - smooth[i]) / math.log(lrs[i + 1] / lrs[i]) for i in range(best)]
    return lrs[min(range(len(slopes)), key=lambda i: slopes[i])]


def reinforce_update(theta, features, probs, action, advantage, eta):
    """One REINFORCE step for a linear-softmax policy, in place.

    theta[a][f] are the logits' weights, pi(a|s) = softmax_a(theta[a] . features).
    grad log pi(action|s) w.r.t. theta[a] = (1[a == action] - pi(a|s)) * features, so
    theta[a] += eta * advantage * (1[a == action] - probs[a]) * features.
    (The design's theta_new = theta_old + eta * (pi(theta_new) - pi(theta_old)) has theta_new
    on both sides; this is the policy-gradient update it stands for.)
    """
    for a, row in enumerate(theta):
        g = (1.0 if a == action else 0.0) - probs[a]
        for f, x in enumerate(features):
            row[f] += eta * advantage * g * x


def softmax(logits):
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    s = sum(e)
    return [v / s for v in e]


@dataclasses.dataclass
class Decision:
    lr_scale: float  # multiplier on the loop's own lr schedule
    grad_accum: int  # gradient-accumulation steps from now on
    action: str = "keep"
    reward: float = 0.0
    save: str = ""  # save the current weights + optimizer state under this slot name ("" = no)
    load: str = ""  # then reload the weights + optimizer state of this slot (a rollback)
    stop: bool = False  # converged: no new best for `patience` decisions
    phase: str = ""

    def as_dict(self):
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- EDIT HERE: the action sets
# opening: trials from the anchor, each a multiplier on the incumbent lr
PROBE_ACTIONS = (0.1, 10**-0.5, 10**0.5, 10.0)  # half and whole decades
# online: (lr factor, accumulation factor)
ONLINE_ACTIONS = (("keep", 1.0, 1.0), ("lr_down", 0.8, 1.0), ("lr_up", 1.25, 1.0), ("batch_up", 1.0, 2.0), ("batch_down", 1.0, 0.5))


class Controller:
    """Holds the policy and its state. Deterministic for a given seed and sequence of observations.

    policy: one of POLICIES. lr: the loop's base lr; lr_bounds: (min_lr, max_lr) in the same units.
    grad_accum: starting accumulation; grad_accum_bounds: (lo, hi). patience: stop after this
    many decisions without a new best eval loss (None: never).
    """

    def __init__(self, policy, lr, lr_bounds, grad_accum, grad_accum_bounds, seed=0, patience=None,
                 probe_trials=5, probe_frac=0.2, spike=0.25, eta=0.5, tie=0.03, slow_drop=1 / 3):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy, self.patience = policy, patience
        self.scale_lo, self.scale_hi = lr_bounds[0] / lr, lr_bounds[1] / lr
        self.ga_lo, self.ga_hi = grad_accum_bounds
        self.ref_accum = grad_accum
        self.lr_scale, self.grad_accum = 1.0, grad_accum
        self.probe_trials, self.probe_frac, self.spike, self.eta, self.tie = probe_trials, probe_frac, spike, eta, tie
        self.slow_drop, self.init_loss, self.best_trial = slow_drop, None, None
        self.rng = random.Random(seed)
        self.decisions = 0
        self.bad_seen = 0  # non-finite steps already accounted for
        self.best, self.since_best = math.inf, 0
        self.last_loss, self.last_tokens = None, 0
        self.reward_mean, self.reward_var = 0.0, 1e-4  # running baseline and scale of the reward
        # rl: opening phase state
        self.phase = "probe" if policy == "rl" and probe_trials > 0 else "online"
        self.slot_loss = {}  # eval loss of each saved slot
        self.trials = []  # [(lr_scale, eval_loss)] of the opening trials
        # policy logits over the probe moves; a prior for going down first: a too-high lr does its damage early
        self.probe_pref = [0.5 if f < 1 else 0.0 for f in PROBE_ACTIONS]
        self.last_probe_action = None
        # rl: online linear-softmax policy; keep starts preferred (p = 0.83) so exploration is gentle
        self.theta = [[3.0 if a == 0 else 0.0, 0.0, 0.0, 0.0] for a in range(len(ONLINE_ACTIONS))]
        self.last = None  # (features, probs, action) awaiting its reward
        # plateau
        self.plateau_best, self.bad_evals = math.inf, 0

    # ------------------------------------------------------------ the step
    def step(self, obs):
        """obs: tokens (training tokens spent so far), eval_loss, and optionally nonfinite_steps
        (count so far) and progress (0..1). Returns a Decision.

        Safety for every policy but "off", once past the opening: a non-finite step in the window,
        a non-finite eval loss or one above best * (1 + spike) rolls back to the best weights
        (slot "best", saved at each new best eval loss) and halves the lr."""
        loss = float(obs["eval_loss"])
        tokens = int(obs["tokens"])
        bad = int(obs.get("nonfinite_steps", 0)) > self.bad_seen
        self.bad_seen = int(obs.get("nonfinite_steps", 0))
        window = tokens - self.last_tokens
        ref = window * self.ref_accum / self.grad_accum  # a window's tokens at the starting batch
        reward = 0.0 if self.last_loss is None else compute_reward(self.last_loss, loss, window, ref, bad)
        self.decisions += 1
        fault = bad or not math.isfinite(loss) or loss > self.best * (1 + self.spike)
        if math.isfinite(loss) and not bad and loss < self.best - 1e-4:
            self.best, self.since_best = loss, 0
        else:
            self.since_best += 1
        online = self.policy != "off" and self.phase == "online"
        if online and self.policy == "rl":
            self._learn(reward)
        if online and fault:
            self.lr_scale = self._clip(self.lr_scale * 0.5)
            d = Decision(self.lr_scale, self.grad_accum, action="rollback", load="best" if "best" in self.slot_loss else "", phase="safety")
        else:
            d = getattr(self, "_step_" + self.policy)(loss, reward, bad, obs)
            if online and self.since_best == 0 and not d.load:
                d.save = "best"
        d.reward = reward
        d.stop = self.patience is not None and self.since_best >= self.patience
        self.last_loss, self.last_tokens = loss, tokens
        if d.save:
            self.slot_loss[d.save] = loss
        if d.load:  # the next window starts from the slot's weights
            self.last_loss = self.slot_loss.get(d.load)
        return d

    def start(self, eval_loss=None):
        """Call once before training, with the eval loss of the initial weights if known; apply the
        returned save (the rl opening trials start from it)."""
        self.init_loss = eval_loss
        return Decision(self.lr_scale, self.grad_accum, action="start", save="init" if self.phase == "probe" else "", phase="start")

    def _step_off(self, loss, reward, bad, obs):
        return Decision(self.lr_scale, self.grad_accum, phase="off")

    def _step_seed(self, loss, reward, bad, obs):
        """The design's formulas as written (fixed for sign and range), applied every decision."""
        self.lr_scale = update_learning_rate(self.lr_scale, reward * SEED_GAIN, 2.0, self.scale_lo, self.scale_hi)
        self.grad_accum = update_batch_size(self.grad_accum, reward * SEED_GAIN, MAX_REWARD, 1, self.ga_lo, self.ga_hi)
        return Decision(self.lr_scale, self.grad_accum, action="formula", phase="seed")

    def _step_plateau(self, loss, reward, bad, obs, factor=0.5, patience=2, threshold=1e-3):
        """torch's ReduceLROnPlateau(mode="min", factor=0.5, patience=2, threshold=1e-3 relative), one
        call per decision on every rank (no per-process stepping trap)."""
        if math.isfinite(loss) and not bad and loss < self.plateau_best * (1 - threshold):
            self.plateau_best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        action = "keep"
        if self.bad_evals > patience:
            self.lr_scale = max(self.scale_lo, self.lr_scale * factor)
            self.bad_evals, action = 0, "lr_down"
        return Decision(self.lr_scale, self.grad_accum, action=action, phase="plateau")

    # ------------------------------------------------------------ rl
    def _step_rl(self, loss, reward, bad, obs):
        if self.phase == "probe":
            return self._probe(loss, bad, obs)
        return self._online(loss, reward, bad, obs)

    def _probe(self, loss, bad, obs):
        """Opening: trials of one interval each, all started from the initial weights (slot
        "init"), so their eval losses compare like with like. The incumbent is the lowest-lr trial
        within `tie` of the best loss: after one interval a too-high lr can look as good as the
        right one (it reaches the easy part of the loss first), so near-ties go to the lower lr.
        The policy picks the next trial's lr move relative to the incumbent; a move whose trial
        becomes the incumbent earns +1, else -1, and the move preferences are updated by
        REINFORCE. The incumbent's weights are kept (slot "best") and training goes on from them."""
        loss = loss if (math.isfinite(loss) and not bad) else math.inf
        self.trials.append((self.lr_scale, loss))
        last = len(self.trials) - 1
        inc = self._incumbent()
        if last == 0 and self.init_loss:  # the initial policy, from the first trial's state
            # a too-low lr barely moves the loss in one interval: if the first trial took off less than
            # slow_drop of the initial loss, prefer going up; else go down, the safe side
            up = (self.init_loss - loss) / self.init_loss < self.slow_drop
            # whole-decade move first (p = 0.75), half-decade next (0.17), the other direction last
            self.probe_pref = [(3.0 if abs(math.log10(f)) == 1 else 1.5) if (f > 1) == up else 0.0 for f in PROBE_ACTIONS]
        if self.last_probe_action is not None:  # learn from the move that produced this trial
            probs = softmax(self.probe_pref)
            gain = 1.0 if inc == last else -1.0
            for a in range(len(PROBE_ACTIONS)):
                self.probe_pref[a] += self.eta * 4 * gain * ((1.0 if a == self.last_probe_action else 0.0) - probs[a])
        save = ""
        if inc == last:
            save, self.best_trial = "best", last
        inc_scale, inc_loss = self.trials[inc]
        progress = float(obs.get("progress", 0.0))
        no_room = progress + progress / self.decisions > self.probe_frac  # another trial would pass the opening's share
        bracketed = any(s < inc_scale for s, _ in self.trials) and any(s > inc_scale for s, _ in self.trials)
        if len(self.trials) >= self.probe_trials or no_room or bracketed or not self._probe_moves(inc_scale):
            self.phase = "online"
            self.lr_scale, self.best, self.since_best = inc_scale, inc_loss, 0
            # go on from the incumbent: it is the trial just run, or in slot "best"; else restart from "init"
            load = "" if inc == last else ("best" if inc == self.best_trial else "init")
            return Decision(self.lr_scale, self.grad_accum, action="commit", save=save, load=load, phase="probe")
        moves = self._probe_moves(inc_scale)
        probs = softmax([self.probe_pref[a] for a in moves])
        a = moves[self._sample(probs)]
        self.last_probe_action = a
        self.lr_scale = self._clip(inc_scale * PROBE_ACTIONS[a])
        return Decision(self.lr_scale, self.grad_accum, action=f"trial_x{PROBE_ACTIONS[a]:.3g}", save=save, load="init", phase="probe")

    def _incumbent(self):
        """Index of the lowest-lr trial whose loss is within `tie` of the best trial's."""
        best = min(v for _, v in self.trials)
        return min((i for i, (_, v) in enumerate(self.trials) if v <= best * (1 + self.tie)), key=lambda i: self.trials[i][0])

    def _probe_moves(self, best_scale):
        """Indices of the probe moves that lead to an lr not tried yet (within the bounds)."""
        tried = {round(math.log10(s), 2) for s, _ in self.trials}
        return [a for a, f in enumerate(PROBE_ACTIONS) if round(math.log10(self._clip(best_scale * f)), 2) not in tried]

    def _sample(self, probs):
        u, acc = self.rng.random(), 0.0
        for i, p in enumerate(probs):
            acc += p
            if u <= acc:
                return i
        return len(probs) - 1

    def _changes(self, lr_f, ga_f):
        """Whether an online action would change anything within the bounds."""
        ga = min(self.ga_hi, max(self.ga_lo, round(self.grad_accum * ga_f)))
        return ga != self.grad_accum or self._clip(self.lr_scale * lr_f) != self.lr_scale

    def _clip(self, scale):
        return min(self.scale_hi, max(self.scale_lo, scale))

    def features(self, loss, obs):
        progress = float(obs.get("progress", 0.0))
        trend = 0.0 if self.last_loss is None or not math.isfinite(loss) else max(-1.0, min(1.0, (self.last_loss - loss) / max(self.last_loss, 1e-9) * 20))
        return [1.0, progress, trend, math.log2(self.grad_accum / self.ref_accum)]

    def _learn(self, reward):
        """REINFORCE with a baseline for the last online action: the advantage is the reward minus a
        running mean, over a running standard deviation (rewards shrink as training converges)."""
        if self.last is None:
            return
        feats, probs, a = self.last
        adv = max(-3.0, min(3.0, (reward - self.reward_mean) / math.sqrt(self.reward_var)))
        reinforce_update(self.theta, feats, probs, a, adv, self.eta)
        self.reward_mean += 0.2 * (reward - self.reward_mean)
        self.reward_var = max(1e-8, self.reward_var + 0.2 * ((reward - self.reward_mean) ** 2 - self.reward_var))
        self.last = None

    def _online(self, loss, reward, bad, obs):
        """After the opening: sample from the linear-softmax policy over ONLINE_ACTIONS (the actions
        that would change nothing within the bounds are left out)."""
        feats = self.features(loss, obs)
        allowed = [a for a, (_, lr_f, ga_f) in enumerate(ONLINE_ACTIONS) if a == 0 or self._changes(lr_f, ga_f)]
        probs_allowed = softmax([sum(w * x for w, x in zip(self.theta[a], feats)) for a in allowed])
        a = allowed[self._sample(probs_allowed)]
        probs = [0.0] * len(ONLINE_ACTIONS)
        for i, p in zip(allowed, probs_allowed):
            probs[i] = p
        name, lr_f, ga_f = ONLINE_ACTIONS[a]
        self.lr_scale = self._clip(self.lr_scale * lr_f)
        self.grad_accum = min(self.ga_hi, max(self.ga_lo, round(self.grad_accum * ga_f)))
        self.last = (feats, probs, a)
        return Decision(self.lr_scale, self.grad_accum, action=name, phase="online")

    # ------------------------------------------------------------ checkpointing
    def state_dict(self):
        d = {k: v for k, v in vars(self).items() if k != "rng"}
        d["rng"] = self.rng.getstate()
        return d

    def load_state_dict(self, d):
        d = dict(d)
        rng = d.pop("rng")
        vars(self).update(d)
        self.rng.setstate(tuple(rng[:1]) + (tuple(rng[1]),) + tuple(rng[2:]) if isinstance(rng, list) else rng)
