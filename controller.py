"""A reinforcement-learning controller for the learning rate and the batch size.

Pure Python (standard library only): functions take numbers and return numbers, and the
Controller keeps its state in plain attributes with state_dict()/load_state_dict().
Copy this file into any training loop. Every N optimizer steps the loop evaluates, then calls

    decision = ctrl.step(Observation(tokens=tokens_spent, eval_loss=val_loss, progress=frac))

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

Policies (POLICIES): "rl" (learned, below), "seed" (the design's fixed formulas),
"plateau" (ReduceLROnPlateau), "off".
"""

import dataclasses
import math
import random

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
    return min(lr_max, max(lr_min, lr * alpha**reward))


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


# ---------------------------------------------------------------- what the loop passes in and gets back
@dataclasses.dataclass
class Observation:
    tokens: int  # training tokens spent so far, discarded trials included
    eval_loss: float  # validation loss of the current weights (nats/token); inf if not finite
    progress: float = 0.0  # fraction of the token budget spent, 0..1
    nonfinite_steps: int = 0  # optimizer steps skipped as non-finite so far (a running count)


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


# ---------------------------------------------------------------- EDIT HERE: tuning numbers
SPIKE = 0.25  # safety: an eval loss this far above the best rolls back to the best weights
SAFETY_LR_FACTOR = 0.5  # ... and multiplies the lr by this
BEST_MARGIN = 1e-4  # a new best must beat the old one by this (nats)
# rl opening: trials from the initial weights, each a multiplier on the incumbent lr
PROBE_ACTIONS = (0.1, 10**-0.5, 10**0.5, 10.0)  # half and whole decades
PROBE_TRIALS = 5  # at most this many trials
PROBE_FRAC = 0.2  # and at most this share of the budget
PROBE_TIE = 0.03  # a trial within 3% of the best loss is a near-tie: near-ties go to the lower lr
PROBE_SLOW_DROP = 1 / 3  # a first trial that removed less than this share of the initial loss means "too low"
PROBE_ETA = 0.5  # learning rate of the opening's move preferences
# rl online: (name, lr factor, accumulation factor); keep is preferred at first (p = 0.83)
ONLINE_ACTIONS = (
    ("keep", 1.0, 1.0),
    ("lr_down", 0.8, 1.0),
    ("lr_up", 1.25, 1.0),
    ("batch_up", 1.0, 2.0),
    ("batch_down", 1.0, 0.5),
)
ONLINE_KEEP_LOGIT = 3.0
ONLINE_ETA = 0.5
BASELINE_RATE = 0.2  # running mean and variance of the reward, for the advantage
# plateau (torch's ReduceLROnPlateau defaults, but patience 2)
PLATEAU_FACTOR, PLATEAU_PATIENCE, PLATEAU_THRESHOLD = 0.5, 2, 1e-3


# ---------------------------------------------------------------- the policies
class Off:
    """No changes: the loop's own schedule alone."""

    guarded = False  # the controller's safety rollback does not apply

    def start(self, ctl, init_loss):
        return Decision(ctl.lr_scale, ctl.grad_accum, action="start", phase="start")

    def decide(self, ctl, obs, reward, nonfinite):
        return Decision(ctl.lr_scale, ctl.grad_accum, phase="off")

    def learn(self, reward):
        pass

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, d):
        vars(self).update(d)


class Seed(Off):
    """The design's formulas as written (fixed for sign and range), applied every decision."""

    guarded = True

    def decide(self, ctl, obs, reward, nonfinite):
        ctl.lr_scale = update_learning_rate(ctl.lr_scale, reward * SEED_GAIN, 2.0, ctl.scale_lo, ctl.scale_hi)
        ctl.grad_accum = update_batch_size(ctl.grad_accum, reward * SEED_GAIN, MAX_REWARD, 1, ctl.ga_lo, ctl.ga_hi)
        return Decision(ctl.lr_scale, ctl.grad_accum, action="formula", phase="seed")


class Plateau(Off):
    """torch's ReduceLROnPlateau(mode="min", factor=0.5, patience=2, threshold=1e-3 relative), one
    call per decision on every rank (no per-process stepping trap)."""

    guarded = True

    def __init__(self):
        self.best, self.bad_evals = math.inf, 0

    def decide(self, ctl, obs, reward, nonfinite):
        loss = obs.eval_loss
        if math.isfinite(loss) and not nonfinite and loss < self.best * (1 - PLATEAU_THRESHOLD):
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        action = "keep"
        if self.bad_evals > PLATEAU_PATIENCE:
            ctl.lr_scale = max(ctl.scale_lo, ctl.lr_scale * PLATEAU_FACTOR)
            self.bad_evals, action = 0, "lr_down"
        return Decision(ctl.lr_scale, ctl.grad_accum, action=action, phase="plateau")


class RL(Off):
    """Opening: trials from the initial weights, then an online linear-softmax REINFORCE policy."""

    def __init__(self):
        self.phase = "probe" if PROBE_TRIALS > 0 else "online"
        self.init_loss, self.best_trial = None, None
        self.trials = []  # [(lr_scale, eval_loss)] of the opening trials
        # logits over the probe moves; a prior for going down first: a too-high lr does its damage early
        self.probe_pref = [0.5 if f < 1 else 0.0 for f in PROBE_ACTIONS]
        self.probe_move = None  # the move that produced the trial being scored
        self.theta = [[ONLINE_KEEP_LOGIT if a == 0 else 0.0, 0.0, 0.0, 0.0] for a in range(len(ONLINE_ACTIONS))]
        self.pending_action = None  # (features, probs, action) awaiting its reward
        self.reward_mean, self.reward_var = 0.0, 1e-4  # running baseline and scale of the reward

    @property
    def guarded(self):
        return self.phase == "online"

    def start(self, ctl, init_loss):
        self.init_loss = init_loss
        save = "init" if self.phase == "probe" else ""
        return Decision(ctl.lr_scale, ctl.grad_accum, action="start", save=save, phase="start")

    def decide(self, ctl, obs, reward, nonfinite):
        if self.phase == "probe":
            return self._probe(ctl, obs, nonfinite)
        return self._online(ctl, obs)

    # ------------------------------------------------------------ opening
    def _probe(self, ctl, obs, nonfinite):
        """Trials of one interval each, all started from the initial weights (slot "init"), so their
        eval losses compare like with like. The incumbent is the lowest-lr trial within PROBE_TIE of
        the best loss. The policy picks the next trial's lr move relative to the incumbent; a move
        whose trial becomes the incumbent earns +1, else -1 (REINFORCE on the move preferences).
        The incumbent's weights are kept (slot "best") and training goes on from them."""
        loss = obs.eval_loss if (math.isfinite(obs.eval_loss) and not nonfinite) else math.inf
        self.trials.append((ctl.lr_scale, loss))
        last = len(self.trials) - 1
        inc = self._incumbent()
        if last == 0 and self.init_loss:  # the initial policy, from the first trial's state
            up = (self.init_loss - loss) / self.init_loss < PROBE_SLOW_DROP
            # whole-decade move first (p = 0.75), half-decade next (0.17), the other direction last
            self.probe_pref = [
                (3.0 if abs(math.log10(f)) == 1 else 1.5) if (f > 1) == up else 0.0 for f in PROBE_ACTIONS
            ]
        if self.probe_move is not None:  # learn from the move that produced this trial
            probs = softmax(self.probe_pref)
            gain = 1.0 if inc == last else -1.0
            for a in range(len(PROBE_ACTIONS)):
                self.probe_pref[a] += PROBE_ETA * 4 * gain * ((1.0 if a == self.probe_move else 0.0) - probs[a])
        save = ""
        if inc == last:
            save, self.best_trial = "best", last
        inc_scale, inc_loss = self.trials[inc]
        no_room = obs.progress + obs.progress / ctl.decisions > PROBE_FRAC  # another trial would pass the share
        bracketed = any(s < inc_scale for s, _ in self.trials) and any(s > inc_scale for s, _ in self.trials)
        if len(self.trials) >= PROBE_TRIALS or no_room or bracketed or not self._moves(ctl, inc_scale):
            self.phase = "online"
            ctl.lr_scale, ctl.best, ctl.since_best = inc_scale, inc_loss, 0
            # go on from the incumbent: it is the trial just run, or in slot "best"; else restart from "init"
            load = "" if inc == last else ("best" if inc == self.best_trial else "init")
            return Decision(ctl.lr_scale, ctl.grad_accum, action="commit", save=save, load=load, phase="probe")
        moves = self._moves(ctl, inc_scale)
        a = moves[sample(ctl.rng, softmax([self.probe_pref[m] for m in moves]))]
        self.probe_move = a
        ctl.lr_scale = ctl.clip(inc_scale * PROBE_ACTIONS[a])
        return Decision(
            ctl.lr_scale, ctl.grad_accum, action=f"trial_x{PROBE_ACTIONS[a]:.3g}", save=save, load="init", phase="probe"
        )

    def _incumbent(self):
        """Index of the lowest-lr trial whose loss is within PROBE_TIE of the best trial's."""
        best = min(v for _, v in self.trials)
        near = (i for i, (_, v) in enumerate(self.trials) if v <= best * (1 + PROBE_TIE))
        return min(near, key=lambda i: self.trials[i][0])

    def _moves(self, ctl, best_scale):
        """Indices of the probe moves that lead to an lr not tried yet (within the bounds)."""
        tried = {round(math.log10(s), 2) for s, _ in self.trials}
        return [a for a, f in enumerate(PROBE_ACTIONS) if round(math.log10(ctl.clip(best_scale * f)), 2) not in tried]

    # ------------------------------------------------------------ online
    def features(self, ctl, loss, progress):
        last = ctl.last_loss
        trend = (
            0.0
            if last is None or not math.isfinite(loss)
            else max(-1.0, min(1.0, (last - loss) / max(last, 1e-9) * 20))
        )
        return [1.0, progress, trend, math.log2(ctl.grad_accum / ctl.ref_accum)]

    def learn(self, reward):
        """REINFORCE with a baseline for the last online action: the advantage is the reward minus a
        running mean, over a running standard deviation (rewards shrink as training converges)."""
        if self.pending_action is None:
            return
        feats, probs, a = self.pending_action
        adv = max(-3.0, min(3.0, (reward - self.reward_mean) / math.sqrt(self.reward_var)))
        reinforce_update(self.theta, feats, probs, a, adv, ONLINE_ETA)
        self.reward_mean += BASELINE_RATE * (reward - self.reward_mean)
        self.reward_var = max(
            1e-8, self.reward_var + BASELINE_RATE * ((reward - self.reward_mean) ** 2 - self.reward_var)
        )
        self.pending_action = None

    def _online(self, ctl, obs):
        """Sample from the linear-softmax policy over ONLINE_ACTIONS (the actions that would change
        nothing within the bounds are left out)."""
        feats = self.features(ctl, obs.eval_loss, obs.progress)
        allowed = [a for a, (_, lr_f, ga_f) in enumerate(ONLINE_ACTIONS) if a == 0 or ctl.changes(lr_f, ga_f)]
        probs_allowed = softmax([sum(w * x for w, x in zip(self.theta[a], feats)) for a in allowed])
        a = allowed[sample(ctl.rng, probs_allowed)]
        probs = [0.0] * len(ONLINE_ACTIONS)
        for i, p in zip(allowed, probs_allowed):
            probs[i] = p
        name, lr_f, ga_f = ONLINE_ACTIONS[a]
        ctl.lr_scale = ctl.clip(ctl.lr_scale * lr_f)
        ctl.grad_accum = ctl.clip_accum(round(ctl.grad_accum * ga_f))
        self.pending_action = (feats, probs, a)
        return Decision(ctl.lr_scale, ctl.grad_accum, action=name, phase="online")


POLICIES = {"rl": RL, "seed": Seed, "plateau": Plateau, "off": Off}


def sample(rng, probs):
    """Index drawn from `probs` with the controller's own random.Random."""
    u, acc = rng.random(), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u <= acc:
            return i
    return len(probs) - 1


# ---------------------------------------------------------------- the controller
class Controller:
    """The reward, the best loss, the safety rollback and patience; the policy decides the rest.
    Deterministic for a given seed and sequence of observations.

    policy: a key of POLICIES. lr: the loop's base lr; lr_bounds: (min_lr, max_lr) in the same units.
    grad_accum: starting accumulation; grad_accum_bounds: (lo, hi). patience: stop after this
    many decisions without a new best eval loss (None: never).
    """

    def __init__(self, policy, lr, lr_bounds, grad_accum, grad_accum_bounds, seed=0, patience=None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy_name, self.policy = policy, POLICIES[policy]()
        self.patience = patience
        self.scale_lo, self.scale_hi = lr_bounds[0] / lr, lr_bounds[1] / lr
        self.ga_lo, self.ga_hi = grad_accum_bounds
        self.ref_accum = grad_accum  # the starting accumulation: the reward's reference window
        self.lr_scale, self.grad_accum = 1.0, grad_accum
        self.rng = random.Random(seed)
        self.decisions = 0
        self.nonfinite_seen = 0  # non-finite steps already accounted for
        self.best, self.since_best = math.inf, 0
        self.last_loss, self.last_tokens = None, 0  # the eval loss and tokens at the previous decision
        self.slot_loss = {}  # eval loss of each saved slot

    def start(self, eval_loss=None):
        """Call once before training, with the eval loss of the initial weights if known; apply the
        returned save."""
        return self.policy.start(self, eval_loss)

    def step(self, obs):
        """obs: an Observation (or a dict of its fields). Returns a Decision.

        Safety for the guarded policies: a non-finite step in the window, a non-finite eval loss or
        one above best * (1 + SPIKE) rolls back to the best weights (slot "best", saved at each new
        best eval loss) and multiplies the lr by SAFETY_LR_FACTOR."""
        obs = obs if isinstance(obs, Observation) else Observation(**obs)  # a misspelt key raises
        loss, tokens = float(obs.eval_loss), int(obs.tokens)
        nonfinite = obs.nonfinite_steps > self.nonfinite_seen
        self.nonfinite_seen = obs.nonfinite_steps
        window = tokens - self.last_tokens
        ref = window * self.ref_accum / self.grad_accum  # the window's tokens at the starting batch
        reward = 0.0 if self.last_loss is None else compute_reward(self.last_loss, loss, window, ref, nonfinite)
        self.decisions += 1
        fault = nonfinite or not math.isfinite(loss) or loss > self.best * (1 + SPIKE)
        if math.isfinite(loss) and not nonfinite and loss < self.best - BEST_MARGIN:
            self.best, self.since_best = loss, 0
        else:
            self.since_best += 1
        guarded = self.policy.guarded
        if guarded:
            self.policy.learn(reward)
        if guarded and fault:
            self.lr_scale = self.clip(self.lr_scale * SAFETY_LR_FACTOR)
            load = "best" if "best" in self.slot_loss else ""
            d = Decision(self.lr_scale, self.grad_accum, action="rollback", load=load, phase="safety")
        else:
            d = self.policy.decide(self, obs, reward, nonfinite)
            if guarded and self.since_best == 0 and not d.load:
                d.save = "best"
        d.reward = reward
        d.stop = self.patience is not None and self.since_best >= self.patience
        self.last_loss, self.last_tokens = loss, tokens
        if d.save:
            self.slot_loss[d.save] = loss
        if d.load:  # the next window starts from the slot's weights
            self.last_loss = self.slot_loss.get(d.load)
        return d

    # ------------------------------------------------------------ helpers for the policies
    def clip(self, scale):
        return min(self.scale_hi, max(self.scale_lo, scale))

    def clip_accum(self, ga):
        return min(self.ga_hi, max(self.ga_lo, ga))

    def changes(self, lr_f, ga_f):
        """Whether an lr / accumulation factor would change anything within the bounds."""
        return (
            self.clip_accum(round(self.grad_accum * ga_f)) != self.grad_accum
            or self.clip(self.lr_scale * lr_f) != self.lr_scale
        )

    # ------------------------------------------------------------ checkpointing
    def state_dict(self):
        d = {k: v for k, v in vars(self).items() if k not in ("rng", "policy")}
        return d | {"rng": list(self.rng.getstate()), "policy": self.policy.state_dict()}

    def load_state_dict(self, d):
        d = dict(d)
        rng, policy = d.pop("rng"), d.pop("policy")
        vars(self).update(d)
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.policy.load_state_dict(policy)
