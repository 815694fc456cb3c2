"""A reinforcement-learning controller for the learning rate and the batch size.

Pure Python (standard library only): functions take numbers and return numbers, and the Controller keeps its
state in plain attributes with state_dict()/load_state_dict(). Copy this file into any training loop (the README
shows one). The loop runs one segment of optimizer steps at a time and asks:

    d = ctrl.start()                                 # once; then for every segment:
    for i in range(n := d.steps or interval):        # d.steps: this segment's length
        lr = base_lr * schedule(kept_tokens) * d.lr_at(i, n)   # the controller's multiplier
        ... d.grad_accum micro-batches, backward, optimizer step
    d = ctrl.step(Observation(tokens=tokens_spent, eval_loss=evaluate, progress=kept_tokens / budget,
                              hypergradient=h,       # h over the segment's second half when d.measure, else None
                              schedule=schedule(kept_tokens)))  # the loop's own factor (rl: a flat one is cooled)

until kept_tokens reaches ctrl.history_budget() (the budget, less what a restart discarded beyond the search budget, or
all that was discarded with Controller(search_in_budget=True); schedule() ends there too), and applies each decision's
slots: d.save (weights + optimizer state + data position under a name), then d.load (a rollback to a slot), then d.drop
(free the slots no longer needed). eval_loss is the validation loss or the function that evaluates it, called only if
the decision reads the loss (an evaluation saved).

The design's loop (state -> action -> reward -> policy update, once per segment):
  state   eval loss, progress, the hypergradient (is a larger lr better right now?), the trials so far
  action  a change of lr and/or batch size; in the search, a trial of an lr from the initial weights (the
          rollback is the action's first half) and a cooldown to compare it
  reward  the relative eval-loss improvement per token (compute_reward); a trial's is its cooled improvement
          over the first segment's, on the same batches
  update  the search keeps the better trial's weights (exploit); without gradient statistics, REINFORCE on the
          trial directions: theta += eta * (R - b) * grad log pi(a | s)

Policies (POLICIES): "rl" (below), "seed" (the design's fixed formulas), "plateau" (ReduceLROnPlateau), "off".
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

    The design: a positive reward shrinks the batch (progress is cheap: take more, smaller steps) and a
    negative one grows it (damp the noise), as bs * reward / max_reward does for 0 < reward < max_reward;
    but that formula is 0 or negative for reward <= 0 and ignores that the batch must be a multiple of
    micro batch x processes. Fixed: prev * 2 ** (-reward / max_reward), a factor in [1/2, 2] that is 1
    at reward 0, rounded to the nearest multiple of `multiple`, clamped to [lo, hi], never below `multiple`.
    """
    r = max(-max_reward, min(max_reward, reward)) / max_reward
    new = prev * 2.0**-r
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


def sample(rng, probs):
    """Index drawn from `probs` with the controller's own random.Random."""
    u, acc = rng.random(), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u <= acc:
            return i
    return len(probs) - 1


# ---------------------------------------------------------------- what the loop passes in and gets back
@dataclasses.dataclass
class Observation:
    """What the loop reports at the end of a segment; a number may be a 0-d tensor or a numpy scalar (read once)."""

    tokens: int  # training tokens spent so far, discarded segments included (the cost)
    # validation loss of the current weights (nats/token; inf if not finite), or a function that returns it: the
    # controller then calls it only if this decision reads the loss (the rl search's reading before a cooldown
    # does not: the cooled one decides), and the loop saves an evaluation
    eval_loss: float
    progress: float = 0.0  # share of the run done: tokens in the current weights' history / the budget
    nonfinite_steps: int = 0  # optimizer steps skipped as non-finite so far (a running count)
    # over the second half of the segment, when the decision asked for it (d.measure): the cosine of the gradient
    # g_t and the previous update u_{t-1}; < 0 means a larger lr would have lowered the loss
    hypergradient: float = None
    # the loop's own lr factor (its schedule, without the controller's multiplier) at the segment's end; None: not
    # passed (then rl adds no final cooldown: it cannot tell whether the schedule already decays)
    schedule: float = None


@dataclasses.dataclass
class Decision:
    lr_scale: float  # multiplier on the loop's own lr schedule for the next segment
    grad_accum: int  # gradient-accumulation steps from now on
    steps: int = 0  # optimizer steps in the next segment (0: the loop's interval)
    ramp_from: float = -1.0  # >= 0: the multiplier rises linearly from this to lr_scale over the first half
    cool: bool = False  # a cooldown: the multiplier falls linearly from lr_scale towards 0 over the segment
    fall_to: float = -1.0  # >= 0: the multiplier falls linearly from lr_scale to this, reached after the segment
    action: str = "keep"
    reward: float = 0.0
    save: str = ""  # save weights + optimizer state + data position under this slot name ("" = no)
    load: str = ""  # then load this slot (a rollback; the data position goes back too)
    drop: tuple = ()  # then free these slots
    measure: bool = False  # measure the gradient statistics over the second half of the segment
    stop: bool = False  # converged: no new best for `patience` decisions
    phase: str = ""

    def lr_at(self, i, n):
        """The lr multiplier at step i (0-based) of an n-step segment."""
        if self.cool:
            return self.lr_scale * (1 - (i + 1) / (n + 1))
        if self.fall_to >= 0:
            return self.lr_scale + (self.fall_to - self.lr_scale) * i / n
        if self.ramp_from >= 0 and i < n // 2:
            return self.ramp_from + (self.lr_scale - self.ramp_from) * (i + 1) / (n // 2)
        return self.lr_scale

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["drop"] = list(self.drop)
        return d


# ---------------------------------------------------------------- EDIT HERE: tuning numbers
SEARCH_BUDGET = 0.10  # default share of the token budget the rl search may discard (Controller(search_budget=))
SPIKE = 0.25  # safety: an eval loss this far above the best rolls back (if a slot is kept) ...
SAFETY_LR_FACTOR = 0.5  # ... and multiplies the lr by this (after a move up: no higher than an undo's lr)
BLOWUP = 2.0  # safety: an eval loss this many times the best of the weights' history (and above the first) too
BLOWUP_CUT = 0.1  # safety: a blow-up that rose again right after a halving with no slot to go back to: lr x this
BEST_MARGIN = 1e-4  # a new best must beat the old one by this (nats)
# rl search, read from the hypergradient h (Observation.hypergradient, over each segment's second half):
#   1. after the first segment, h > 0 (too high even by the greedy measure, which this early favours high lrs)
#      suspects a too-high lr; the suspicion is settled by one trial from the initial weights at lr x 10**-TRIAL_DOWN,
#      compared with the first segment after a cooldown each (the short horizon favours the higher lr, so a lower
#      lr that wins is trusted). Two too-high lrs are stuck on the same early plateau, so a down trial that ties with
#      the first (within BOTH_HIGH_TIE), or wins but still reads h > 0 as the first did, means both are too high:
#      another TRIAL_DOWN down, from the initial weights (both lrs leave damage that a lower lr does not undo within
#      the run; a decade down from 30x too high is still 3x too high, and nothing online lowers the lr). That
#      discards the first segment too: up to one trial segment more than the search budget; the loop takes the
#      excess off the end of the run (Controller.history_budget), so the run never costs more than 1 + search_budget
#      budgets.
#      A trial that loses but reads too low (h < -LOW_H) puts the best lr between the two: its weights go on and
#      climb (2.) (the comparison favours the higher lr; a too-low lr does no damage), unless it lost by more than
#      SPIKE to a first segment whose reading was within LOW_H of 0: a suspicion that no clear reading carried, and a
#      loss that large is the lower lr's slowness (on a plain ReLU MLP at its best lr the trial lost by 82%), so the
#      first's weights go on at its lr. A clear reading (h > LOW_H) keeps the rule: a start well above the best lr
#      can win the comparison and blow up later (an autoencoder from 3x its best lr: its trial's cooled loss 4x the
#      start's).
#      The first segment and the trial last TRIAL_STEPS whatever the loop's interval (shorter trials pick too-high
#      lrs; at an interval of 10 the default task's first reading, over steps 6-10, said too low at its best lr and
#      the climb went to 3 lr*: +18% against `off`), shortened until one trial and its two cooldowns fit the search
#      budget (at least MIN_TRIAL steps). In a run too short for that (under 90 steps at 10%) a suspicion
#      cannot be settled, so only a first segment that blew up (its eval loss above BLOWUP x the initial one, which
#      the loop then passes to start(); at 60 steps no good start of ten plain loops went above 1.28x) restarts a
#      decade lower from the initial weights, uncompared, if the search budget holds the discarded segment.
#      A comparison made on a plateau is noise: when the first segment's and the trial's cooled losses both lie less
#      than PLATEAU below the initial eval loss and no more than SPIKE above it (neither made progress, neither spiked:
#      a regression network on its early plateau, whose 20-step losses, readings and trials cannot tell its best lr from
#      3x it or a tenth of it, and moves there decide which seeds leave the plateau; at a language model's verdicts the
#      trial's cooled loss lay 27-51% below the initial one), the first's weights go on at the start's lr with no moves,
#      slot "first" kept, until the eval loss leaves the band: below it, the search opens again from the live weights,
#      if the search budget holds a trial, but runs no trial unless its first segment's loss is not finite: a first
#      segment, then the climb (2.) or a commit at the start's lr (the start's lr took the loss off the plateau, and a
#      comparison there runs in the phase where the short horizon favours the lower lr: at reg_sgd's best lr in 2000
#      steps the trial a decade lower won the cooled comparison 0.16 to 0.38 and went on to end 7-10x above `off`); more
#      than SPIKE above the initial loss (or not finite, or blown up: the safety net leaves faults in the wait to it, at
#      any share of the run), the start was too high after all: back to the first's weights at the trial's lr (a
#      plateau's own wobble at the best lr rose 12%: the start waits). A finite rise below BLOWUP x the initial loss
#      whose segment does not read too high (h <= LOW_H) is the loop's own, not the lr's: the wait goes on (a matrix
#      factorisation at its best lr rose 30% in its wait, reading +0.004..+0.010, and fell to `off`'s loss; the 28
#      other rises of the plain-loop grid, two regression networks and a spiral classifier at or above their best lr,
#      read +0.018 or more, or blew up). The wait ends with the climb's share of the run (ONLINE_UNTIL);
#   2. a too-low lr does no damage and an up trial from the initial weights is judged with the short-horizon bias
#      (a 10x too-high lr wins a 20-step comparison on some tasks): up only from the live weights, while h < -LOW_H,
#      after a history's first reading by FIRST_UP_GAIN * |h| decades, at most FIRST_UP_MAX (that reading says "too
#      low" even at the best lr: -0.02..-0.07 at good starts of 8 language models, where every start from below read
#      -0.09 or lower), after later ones by UP_GAIN * |h|, at most UP_MAX, with the weights from before the move kept
#      as slot "best" for the safety net; nothing is discarded. A climb's segments are as long as the first segment
#      (shorter in a short run, whose first segment and trial are shortened to fit the search budget: a climb of 1.5
#      decades takes four readings, which at 20 steps took 45% of a 200-step run). In such a shortened search the
#      first segment's reading comes early (steps 5-8 of 150, inside train.py's 10-step warmup), where a good start
#      reads too low as well (the default task in 150 steps: -0.12 at lr*, -0.21 at lr*/10, and the move it made
#      cost 11% against `off`; at batch 64 in 100 steps 14%): a first reading of too low there is taken again over one
#      more segment at the same lr before anything moves (that reading is the history's first). Not in a run too
#      short for a trial (under 90 steps at 10%), whose 5-step segments are a twelfth of it: on 13 plain loops at 60
#      steps the second look lost more than it saved (76 runs higher, 20 lower, no good start mended). In any run a
#      weak first reading (one that moves the lr less than the cap: h above -FIRST_UP_MAX / FIRST_UP_GAIN = -0.1) is
#      taken again too: there the good starts read (8 language models -0.015..-0.066; pydocs in 1600 steps
#      -0.053..-0.094, whose climb to 1.9-2.9x its best lr delayed its plateau's breakout: +7.9% against `off` over 5
#      seeds), and 46 of 48 starts from below read -0.1 or lower (a clear reading climbs at once: taken again, the
#      regression networks' readings of -0.47 read too high the next segment and the run stayed 30x too low). A
#      weak first reading whose second look raised the eval loss more than UNDO_RISE ends the climb, online too, as an
#      undone move does (the test's regression loop at its best lr: -0.015, a second look 11% higher, then an online
#      move up on -0.022 cost 5.8%; before, the same weak first move was undone);
#   3. when h no longer says too low right after a move up, one more step up, as far as the climb went and at most
#      PAST_STEP decades (a climb of one weak reading's small move steps past as little; the greedy measure
#      favours lower lrs than the best constant lr once the early plateau is over, so the point where h turns is
#      below it), the weights from before it kept as slot "best"; commit at the next segment that does not read
#      too low. Under a flat schedule (the loop's factor unchanged since the previous decision) the step past is a
#      probe: the commit goes back to the lr from before it (with no decay to bring it down, it overshoots: MLPs,
#      the transformer and pydocs under a constant lr). A start that never moved up commits at once. Every
#      discarded token comes out of the search budget.
TRIAL_DOWN = 1.0
TRIAL_STEPS = 20  # Controller(trial_steps=): the search's segments (the first, a trial, the climb's), in steps
BOTH_HIGH_TIE = 0.01
MIN_TRIAL = 5
LOW_H = 0.015
UP_GAIN, FIRST_UP_MAX, UP_MAX = 10.0, 0.25, 0.5
FIRST_UP_GAIN = 2.5  # a history's first reading moves 2.5|h| decades (later ones 10|h|): its 'too low' runs low
PAST_STEP = 0.25  # decades up past the point where a climb ends
# a trial's comparison whose two cooled losses both lie less than PLATEAU below the initial eval loss (and less than
# SPIKE above it) was made on a plateau
PLATEAU = 0.1
UNDO_RISE = 0.05  # a move up after which the eval loss rose this much (relative) is undone, and the climb ends;
# the lr goes back to where it was before the previous move up too (the readings that took it up ran high); a weak
# first reading's second look (at the same lr) that rose this much ends the climb as well
ONLINE_UNTIL = 0.5  # online, the climb goes on through this share of the run
# the final cooldown: when the loop's own schedule (Observation.schedule) is flat at the end (a constant lr, a warmup +
# constant, a step schedule between its steps), the multiplier falls linearly over the last FINAL_COOL of the run, to
# 0 (to the lr's lower bound); a constant lr then a linear cooldown of 20% matches a cosine (Hagele et al. 2024). A
# schedule that falls, between two decisions, faster than FALLING of its value per run (its relative fall over the
# share of the run between them: a cosine at 80% of the run falls at 9.7, a linear decay at 5) is left alone (a cosine
# or linear decay already ends low: a second decay on top of a cosine cost 0.1-0.5% on six plain loops); one that
# starts to fall during the cooldown holds the multiplier where it is. The cooldown starts at 80% of the run: the
# segment that would cross it ends there.
FINAL_COOL = 0.2
FALLING = 0.5
# without gradient statistics: trials of an lr from one saved point, on identical batches, each ended by a short
# cooldown and compared by the cooled eval loss (a cooldown removes the noise a too-high lr hides behind)
COOL_FRAC = 0.4  # a cooldown's length, as a share of the trial's (at least 2 steps)
MOVES = (1.0, 0.5, 0.25)  # the trial search's step sizes in decades of lr, coarse to fine
SEARCH_ETA = 0.5  # learning rate of the trial search's direction preferences (REINFORCE)
# plateau (torch's ReduceLROnPlateau defaults, but patience 2)
PLATEAU_FACTOR, PLATEAU_PATIENCE, PLATEAU_THRESHOLD = 0.5, 2, 1e-3


def cooldown_steps(trial_steps):
    """A cooldown's length for a trial of trial_steps: COOL_FRAC of it, at least 2 steps."""
    return max(2, round(trial_steps * COOL_FRAC))


def reads_too_low(h):
    """Whether a hypergradient reading says the lr is too low (a larger one would have lowered the loss)."""
    return h is not None and h < -LOW_H


def up_factor(h, readings):
    """The climb's lr factor for a hypergradient h < 0 read after `readings` segments of the weights' history."""
    if readings < 2:
        return 10 ** min(FIRST_UP_MAX, FIRST_UP_GAIN * -h)
    return 10 ** min(UP_MAX, UP_GAIN * -h)


# ---------------------------------------------------------------- the policies
class Off:
    """No changes: the loop's own schedule alone."""

    guarded = False  # the controller's safety rollback does not apply

    def start(self, ctl):
        return Decision(ctl.lr_scale, ctl.grad_accum, action="start", phase="start")

    def decide(self, ctl, obs, reward, nonfinite):
        return Decision(ctl.lr_scale, ctl.grad_accum, phase="off")

    def punished(self, scale):
        """The lr scale after the safety net rolled back a move up that the loss punished (scale: the halved one)."""
        return scale

    def skips_loss(self, ctl, obs, nonfinite):
        """Whether this decision does without the eval loss (asked only when the loop passes a function for it)."""
        return False

    def rescue_slot(self, ctl):
        """The slot the safety net goes back to on a fault ("" if none held): the weights from before a move up."""
        return "best" if "best" in ctl.slot_loss else ""

    def needs_init_loss(self, ctl):
        """Whether a decision may need the initial weights' eval loss (asked only when the loop passes a function)."""
        return False

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
    """Search, then online; every decision at the end of a segment the policy asked for.

    Search by the hypergradient h (when the loop measures it). After the first segment, h > 0 suspects a too-high lr;
    the suspicion is settled by one trial a decade lower from the initial weights on the same batches, both compared
    after a short cooldown (in a run too short for a trial, only a first segment that blew up restarts a decade lower
    from the initial weights, uncompared): the trial's reward is its cooled improvement over the first segment
    (compute_reward), and the better one's weights go on; the trial's also when it loses but reads too low (the best lr
    is then between the two, and the comparison favours the higher lr), unless it lost by more than SPIKE to a start
    that read within LOW_H of 0 (a suspicion no clear reading carried); a comparison on a plateau (both cooled losses
    between 1 - PLATEAU and 1 + SPIKE times the initial one) is noise: the start goes on and the search waits. Up only
    from the live weights, while h says too low (a too-low lr does no damage; a first reading that says so weakly, or
    early in a short run, is taken again over one more segment before the lr moves; a weak one whose second look raises
    the loss ends the climb), then one step past where it stopped
    saying so (under a flat schedule a probe only: the commit goes back below it), then commit. At a good start no
    trial runs and nothing is discarded.

    Search by trials (no gradient statistics): trials of one lr each from the initial weights, each ended by a
    cooldown and compared by the cooled loss; the direction of the next trial is drawn from preferences that
    REINFORCE updates with the trial's outcome (+1 when it becomes the best, -1 otherwise). While every trial has blown
    up (a cooled loss over BLOWUP x the initial one, or not finite), the next one is a decade below the lowest, and
    with no room for it the run restarts there from the initial weights, uncompared. A lower trial that wins while it
    and the start are both on the plateau (their losses before and after the cooldown between 1 - PLATEAU and
    1 + SPIKE times the initial one, as the hypergradient search's comparison on a plateau) does not move the lr: the
    start goes on (at the best lr of two regression networks and a matrix factorisation a decade lower won so, by
    2-4%, and ended 2-22x above `off`). Off the plateau, a higher trial that wins only after its cooldown (its loss
    before the cooldown not below the lower one's) does not beat the lower one: the cooldown is where the short
    horizon's bias towards high lrs shows (a CNN and an overfitting regression network at their best lr: 10x won that
    way, and the runs ended at 1.5-1.9x `off`'s loss).

    Online: the climb goes on through the first ONLINE_UNTIL of the run; the safety net (Controller.step) undoes a
    move up that the next evaluation punishes. When the loop's schedule is flat at the end, the last FINAL_COOL of the
    run is a linear cooldown of the multiplier."""

    def __init__(self):
        self.phase = "search"
        self.mode = ""  # "gradient" or "trials", from the first observation
        self.stage = "first"  # the hypergradient search: first, cool_first, trial, cool_trial, climb
        self.history = 0  # segments in the current weights' history
        self.climbed_to = None  # the lr scale the climb last set (a rollback since then changed it)
        self.climb_base = None  # the lr scale the current climb started from
        self.move = None  # (from, to): the last move up, its verdict pending (slot "best" holds the weights at "from")
        self.moved_from = [None, None]  # the lr scale before the previous move up and before the last one
        self.climb_off = False  # a move up was punished: no more moves up
        self.floor = None  # the lr scale an undo goes no lower than: a start read near 0 that won its comparison
        self.again = False  # the last decision took a weak first reading again (measure_again)
        self.past_from = None  # the lr scale before a step past that awaits its verdict
        self.first, self.trial, self.trial_scale = None, None, None
        self.trials, self.segment = [], "trial"  # the trial search's state
        self.direction_pref, self.last_direction = [0.0, 0.0], None  # its logits of [down, up]
        self.schedule_seen = None  # the loop's schedule factor at the previous decision
        self.schedule_kept = None  # and the weights' history then (tokens)
        self.cool_m = None  # in the final cooldown: the multiplier's factor at the next segment's start
        self.waiting = None  # the trial's lr scale while the start goes on after a comparison on a plateau
        self.reopened = False  # the search opened again off a plateau: no trial
        self.rescue = ""  # after a search by trials: the winner's slot, kept for the safety net for the rest of the run

    @property
    def guarded(self):  # the safety net applies to the online phase and to the climb; a plateau's wait has its own
        # (a loss above its band or not finite: back to the first's weights, which the wait keeps for that, at the
        # trial's lr; the net, holding no slot then, could only halve the lr of weights that had blown up)
        return (self.phase == "online" and self.waiting is None) or self.stage == "climb"

    def start(self, ctl):
        self.trials.append({"scale": 1.0, "raw": None, "cooled": None, "slot": "trial0"})
        steps = ctl.trial_segment()
        return Decision(1.0, ctl.grad_accum, steps=steps, action="start", save="init", measure=True, phase="search")

    def decide(self, ctl, obs, reward, nonfinite):
        searching = self.phase == "search"
        d = self._decide(ctl, obs, reward, nonfinite)
        if searching:  # the schedule's reading, so that the online phase's first decision can tell a decay
            self.schedule_seen, self.schedule_kept = obs.schedule, ctl.kept
            if self.phase == "online" and obs.schedule is not None and not d.steps:  # the commit's segment
                d.steps = self._to_cool(ctl, ctl.slot_kept[d.load] if d.load else ctl.kept)
        return d

    def _decide(self, ctl, obs, reward, nonfinite):
        move, self.move = self.move, None  # the move's verdict: is its lr still in place, and did the loss rise?
        held = move and move[1] == ctl.lr_scale and "best" in ctl.slot_kept
        if held and obs.eval_loss > ctl.slot_loss["best"] * (1 + UNDO_RISE):
            return self._undo(ctl, obs, move[0])
        if self.phase == "online":
            return self._online(ctl, obs)
        # no reading after the first segment: a loop without gradient statistics, unless every measured step was
        # skipped as non-finite (a loop with them then reads None too: it searches by them, from a too-high start)
        self.mode = self.mode or ("gradient" if obs.hypergradient is not None or nonfinite else "trials")
        if self.mode == "trials":
            return self._trial_search(ctl, obs, nonfinite)
        return self._gradient_search(ctl, obs, nonfinite)

    def needs_init_loss(self, ctl):
        """The initial weights' eval loss: a run too short for a trial restarts lower when its first segment blew up
        (above BLOWUP x it), and a trial's comparison whose cooled losses stay near it waits (a plateau)."""
        return True

    def skips_loss(self, ctl, obs, nonfinite):
        """In the hypergradient search, the end of a trial (its cooldown follows) and of a first segment that already
        reads too high (h > 0: a cooldown and a lower trial follow) need no eval loss: the cooled one decides."""
        if self.phase == "online" or self.move or obs.hypergradient is None or self.mode == "trials":
            return False
        return self.stage == "trial" or (self.stage == "first" and self._first_cools(ctl, obs, None))

    @staticmethod
    def _down(ctl, scale):
        """The lr scale TRIAL_DOWN decades below `scale`, within the lr's bounds: a down trial's or a restart's."""
        return ctl.clip(scale * 10**-TRIAL_DOWN)

    def _first_cools(self, ctl, obs, loss):
        """After the first segment: a cooldown, then a trial lower by TRIAL_DOWN decades from the initial weights,
        when it reads too high (h > 0) or its loss is not finite (None: not read), if the lr can go lower and the
        search budget holds the trial and both cooldowns. A search opened again off a plateau suspects only a loss that
        is not finite (see the top)."""
        down = self._down(ctl, ctl.lr_scale)
        too_high = loss == math.inf or (obs.hypergradient > 0 and not self.reopened)
        return too_high and down != ctl.lr_scale and ctl.room(obs.tokens, ctl.trial_cost(), ctl.kept)

    def _cooldown(self, ctl, slot):
        """Keep the weights (slot), then a short cooldown of the lr to compare by the cooled loss."""
        return Decision(
            ctl.lr_scale, ctl.grad_accum, steps=ctl.cool_steps, cool=True, action="cooldown", save=slot, phase="search"
        )

    def _trial(self, ctl, scale, **kw):
        """A trial of lr x scale from the initial weights (a rollback), one trial segment long."""
        return Decision(
            scale,
            ctl.grad_accum,
            steps=ctl.trial_segment(),
            action=f"trial_x{scale:.3g}",
            load="init",
            phase="search",
            **kw,
        )

    def _commit(self, ctl, action="commit", load="", keep=(), **kw):
        """The search is over: go on at ctl.lr_scale (from slot `load`, if given) and free every slot but `keep` (a
        climb's commit keeps "best" through one more segment: the online phase's first decision frees it)."""
        self.phase = "online"
        kw.setdefault("measure", self.mode == "gradient")
        drop = tuple(n for n in ctl.slot_kept if n not in keep)
        return Decision(ctl.lr_scale, ctl.grad_accum, action=action, load=load, drop=drop, phase="search", **kw)

    def _undo(self, ctl, obs, old):
        """A move up after which the eval loss rose more than UNDO_RISE above the one before it (the move's reward
        is clearly negative; smaller rises are what an evaluation on a plateau moves by): back to the weights from
        before it, when the search budget allows discarding the segment, and to the lr from before the previous move
        up (the readings that took the climb up have just been shown to run high on this task: where they turn is
        above the best lr, not below it as on the language models); no more moves up (a direction that lost). On
        the three benchmark tasks the loss fell after every one of 195 moves up; on plain-loop MLPs the step past the
        climb's end was punished at the best lr, and going back to the lr of the move before it took rl from +1.5%
        and +5.9% above off to +0.0% and +0.9% (docs/experiments/README.md)."""
        old = ctl.lr_scale = self.punished(old)
        back = ctl.room(obs.tokens, 0, ctl.slot_kept["best"])
        if self.phase != "online":
            return self._commit(ctl, action="undo_up", load="best" if back else "", measure=False)
        return Decision(
            old, ctl.grad_accum, action="undo_up", load="best" if back else "", drop=("best",), phase="online"
        )

    def punished(self, scale):
        """A move up that the loss punished (an undo, or a spike the safety net rolled back): no more moves up (a
        direction that lost), and an lr no higher than the one from before the move before it, but no lower than a
        start that read near 0 and won its comparison (the floor; relu_reg at a third of its best lr: 0.097 and
        0.126 -> 0.064 and 0.091, `off` 0.063 and 0.068: 3 of 849 plain-loop runs change, all lower)."""
        self.climb_off, self.past_from = True, None
        back = min(scale, self.moved_from[0] or scale)
        return min(scale, max(back, self.floor or 0.0))

    # ------------------------------------------------------------ search by the hypergradient
    def _gradient_search(self, ctl, obs, nonfinite):
        h = obs.hypergradient
        loss = obs.eval_loss  # None: not read (skips_loss)
        if loss is not None and (not math.isfinite(loss) or nonfinite):
            loss = math.inf
        self.history += 1
        if self.stage == "first":  # 1. a suspicion, settled by one trial from the initial weights
            self.first = {"scale": ctl.lr_scale, "raw": loss, "h": h, "slot": "first"}
            down = self._down(ctl, ctl.lr_scale)  # a trial's lr, or a restart's
            if self._first_cools(ctl, obs, loss):
                self.stage, self.trial_scale = "cool_first", down
                return self._cooldown(ctl, "first")
            self.stage = "climb"
            blew_up = not ctl.trial_fits and loss is not None and ctl.init_loss and loss > BLOWUP * ctl.init_loss
            if blew_up and not reads_too_low(h) and down != ctl.lr_scale and ctl.room(obs.tokens, 0, 0):
                # no trial to settle it (a short run), but the first segment blew up and discarding it fits the
                # search budget: a decade lower from the initial weights, uncompared (see the top)
                return self._restart(ctl, down, "restart_down", ("init",), steps=ctl.trial_segment())
            # a first reading of too low, early (a shortened run) or weak (it moves the lr less than the cap): again
            if reads_too_low(h) and (ctl.shortened or up_factor(h, 1) < 10**FIRST_UP_MAX) and ctl.trial_fits:
                self.history, self.again = 0, not ctl.shortened
                return Decision(
                    ctl.lr_scale,
                    ctl.grad_accum,
                    steps=ctl.trial_segment(),
                    action="measure_again",
                    drop=("init",),
                    measure=True,
                    phase="search",
                )
            return self._climb(ctl, h, drop=("init",))
        if self.stage == "cool_first":
            self.first["cooled"], self.stage = loss, "trial"
            ctl.lr_scale, self.history = self.trial_scale, 0
            return self._trial(ctl, self.trial_scale, measure=True)
        if self.stage == "trial":
            self.trial = {"scale": ctl.lr_scale, "raw": loss, "h": h, "slot": "trial"}
            self.stage = "cool_trial"
            return self._cooldown(ctl, "trial")
        if self.stage == "cool_trial":  # the better of the two after the cooldown goes on, from before its cooldown
            first, trial = self.first, self.trial
            trial["cooled"] = loss
            reward = compute_reward(first["cooled"], trial["cooled"], 1, 1)  # the trial's relative improvement
            win = min((first, trial), key=lambda t: (t["cooled"], t["scale"]))
            # the trial is always the lower (it runs only if clip() allows): one that ties, or wins while it still reads
            # too high as the first did, means both are too high; one that loses but reads too low puts the best lr
            # between the two: its weights go on and climb (the comparison favours the higher lr; a too-low lr does no
            # damage), unless it lost by more than SPIKE to a first that read within LOW_H of 0 (see the top)
            both_high = abs(reward) <= BOTH_HIGH_TIE or (reward > 0 and trial["h"] is not None and trial["h"] > 0)
            near_0 = 0 < (first["h"] or 0) <= LOW_H
            low = reads_too_low(trial["h"]) and not (reward < -SPIKE and near_0)
            # a start read within LOW_H of 0 that won the comparison, its trial going on only for reading too low: the
            # floor of a later undo (a climb back up through the start's lr was not punished there)
            self.floor = first["scale"] if low and not both_high and win is first and near_0 else None
            win = trial if both_high or low else win
            if all(self._on_plateau(ctl, t, ("cooled",)) for t in (first, trial)):
                self.waiting, ctl.lr_scale, self.history = trial["scale"], first["scale"], 1  # a plateau: see the top
                return self._commit(ctl, action="plateau_wait", load="first", keep=("first",))
            ctl.lr_scale, self.history, self.stage = win["scale"], 1, "climb"
            drop = tuple(n for n in ("init", "first", "trial") if n in ctl.slot_kept and n != win["slot"]) + (
                win["slot"],
            )
            if both_high:  # another decade down, from the initial weights
                down = self._down(ctl, win["scale"])
                return self._restart(ctl, down, f"pick_x{win['scale']:.3g}_then_down_from_init", drop)
            d = self._climb(ctl, win["h"], load=win["slot"], drop=drop)
            d.action = f"pick_x{win['scale']:.3g}" + ("" if d.action in ("keep", "commit") else "_then_" + d.action)
            return d
        if self.again and loss is not None and loss > (self.first["raw"] or math.inf) * (1 + UNDO_RISE):
            self.climb_off = True  # a weak first reading's second look raised the loss at the same lr: as an undo
        self.again = False
        flat = obs.schedule is not None and obs.schedule == self.schedule_seen and ctl.kept != self.schedule_kept
        return self._climb(ctl, h, flat=flat)

    def _restart(self, ctl, scale, action, drop, steps=0):
        """From the initial weights at lr x scale: a fresh history, whose first reading is capped as a first one and
        whose losses are a new best."""
        ctl.lr_scale, self.history, ctl.best = scale, 0, math.inf
        return Decision(
            scale, ctl.grad_accum, steps=steps, action=action, load="init", drop=drop, measure=True, phase="search"
        )

    def _climb(self, ctl, h, load="", drop=(), flat=False):
        """2-3: up from the live weights while the hypergradient says too low, one step per segment; one step past
        the point where it stops saying so (not from a loaded slot: a trial's weights were not climbing); under a flat
        schedule the commit after it goes back to the lr from before it."""
        drop = tuple(dict.fromkeys((*drop, *(("best",) if "best" in ctl.slot_kept else ()))))
        too_low = reads_too_low(h) and not self.climb_off  # (a move up that the loss punished ends the climb)
        climbed, self.climbed_to = self.climbed_to == ctl.lr_scale, None
        past_from, self.past_from = self.past_from, None
        if too_low or (climbed and not load):
            old = ctl.lr_scale
            if too_low:
                factor = up_factor(h, self.history)
            else:  # the step past: as far as the climb went (decades since its start), at most PAST_STEP
                # (no climb_base: a checkpoint saved before it existed, resumed mid-climb: PAST_STEP as then)
                rose = math.log10(old / self.climb_base) if self.climb_base else PAST_STEP
                factor = 10 ** min(PAST_STEP, rose)
            ctl.lr_scale = ctl.clip(old * factor)
            if ctl.lr_scale != old:  # the weights about to be put at risk are kept for the safety net
                if too_low and not climbed:
                    self.climb_base = old
                self.climbed_to = ctl.lr_scale if too_low else None
                self.past_from = None if too_low else old
                self.move = None if load else (old, ctl.lr_scale)
                self.moved_from = [self.moved_from[1], old]
                return Decision(
                    ctl.lr_scale,
                    ctl.grad_accum,
                    steps=ctl.trial_segment(),
                    ramp_from=old,
                    action=f"{'up' if too_low else 'past'}_x{ctl.lr_scale / old:.3g}",
                    save="" if load else "best",
                    load=load,
                    drop=tuple(n for n in drop if n != "best"),
                    measure=True,
                    phase="search",
                )
        # the weights from before the last move stay one segment more, for the safety net: a move's damage can show
        # a segment late (a warmup or momentum still raising the step)
        if flat and past_from is not None and not load:  # a flat schedule: the step past was a probe; back down
            ctl.lr_scale = past_from
        return self._commit(ctl, load=load, keep=() if load else ("best",))

    # ------------------------------------------------------------ online
    def _online(self, ctl, obs):
        """After the search: the climb goes on through the first ONLINE_UNTIL of the run (a too-low lr shows
        once the early plateau is over, and later in training the greedy signal favours lower lrs, so a reading
        of too low is, if anything, an understatement); otherwise keep."""
        self.history += 1
        h = obs.hypergradient
        drop = ("best",) if "best" in ctl.slot_kept else ()
        cool, steps = self._final_cooldown(ctl, obs, drop + (("first",) if self.waiting is not None else ()))
        # in a wait: the loss more than SPIKE above the initial one or not finite (a blow-up too), checked before the
        # cooldown's verdict: a wait guards its own faults
        rose = self.waiting is not None and not obs.eval_loss <= ctl.init_loss * (1 + SPIKE)
        if rose and obs.eval_loss <= BLOWUP * ctl.init_loss and obs.hypergradient is not None:
            rose = obs.hypergradient > LOW_H  # a finite rise that the reading does not call too high: the loop's own
        if cool and not rose:  # (a wait that a long segment carried past the climb's share into the cooldown ends too)
            self.waiting = None
            return cool
        if rose:  # a rise at the decision that would have started the cooldown: the wait goes back (below), and the
            self.cool_m = None  # cooldown starts when the first's weights' history reaches it
        measure = self._measures(obs.progress)
        if self.waiting is not None:
            wait = self._wait(ctl, obs, drop, steps, measure, rose)
            if wait:
                return wait
            drop += ("first",)  # the wait is over: the online phase decides
        if measure and reads_too_low(h):
            old = ctl.lr_scale
            ctl.lr_scale = ctl.clip(old * up_factor(h, self.history))
            if ctl.lr_scale != old:
                self.move = (old, ctl.lr_scale)
                self.moved_from = [self.moved_from[1], old]
                return Decision(
                    ctl.lr_scale,
                    ctl.grad_accum,
                    steps=steps,
                    ramp_from=old,
                    action=f"up_x{ctl.lr_scale / old:.3g}",
                    save="best",
                    measure=True,
                    phase="online",
                )
        return Decision(
            ctl.lr_scale, ctl.grad_accum, steps=steps, action="keep", drop=drop, measure=measure, phase="online"
        )

    def _wait(self, ctl, obs, drop, steps, measure, rose):
        """After a comparison on a plateau (see the top): the decision, or None when the wait is over and the online
        phase decides. rose: the loss left the band upwards (or is not finite)."""
        init, loss, down = ctl.init_loss, obs.eval_loss, self.waiting
        self.waiting = None
        if rose:  # the start raised the loss as a spike would: too high after all
            ctl.lr_scale, self.history = down, 1
            action = f"plateau_rise_x{down:.3g}"
            kept = ctl.slot_kept["first"]  # the segment's length and measurement: from the first's history
            return Decision(
                down,
                ctl.grad_accum,
                steps=self._to_cool(ctl, kept),  # (it ends where that history starts to cool)
                action=action,
                load="first",
                drop=drop + ("first",),
                measure=self._measures(kept / ctl.budget_tokens if ctl.budget_tokens else obs.progress),
                phase="online",
            )
        if not measure:  # past the climb's share of the run
            return None
        if loss < init * (1 - PLATEAU):  # off the plateau: search again from the live weights (no trial but after a
            # blow-up), if the budget holds a trial
            if not ctl.room(obs.tokens, ctl.trial_cost(), ctl.kept):
                return None
            self.phase, self.stage, self.history, self.reopened = "search", "first", 0, True
            return Decision(
                ctl.lr_scale,
                ctl.grad_accum,
                steps=ctl.trial_segment(),
                action="search_again",
                save="init",
                drop=drop + ("first",),
                measure=True,
                phase="search",
            )
        self.waiting = down
        return Decision(
            ctl.lr_scale, ctl.grad_accum, steps=steps, action="wait", drop=drop, measure=True, phase="online"
        )

    def _measures(self, progress):
        """Whether the online phase measures the next segment (the climb goes on) at this share of the run."""
        return self.mode == "gradient" and progress < ONLINE_UNTIL and not self.climb_off

    def _final_cooldown(self, ctl, obs, drop):
        """The last FINAL_COOL of the run: the multiplier falls linearly to 0 at the end of the weights' history, in
        segments of at most the interval (each evaluated as usual), while the loop's own schedule is flat; it holds
        while the schedule falls. Returns (the decision, 0) in the cooldown, else (None, steps): the next segment's
        length when a flat schedule's cooldown starts within the interval (it ends there), 0 (the interval) if not."""
        s, prev, self.schedule_seen = obs.schedule, self.schedule_seen, obs.schedule
        since = 0 if self.schedule_kept is None else ctl.kept - self.schedule_kept  # (0: any fall counts)
        self.schedule_kept = ctl.kept
        if s is None or not ctl.budget_tokens:
            return None, 0
        end, step = ctl.history_budget(), ctl.steps_tokens(1) * ctl.grad_accum / ctl.ref_accum
        left = end - ctl.kept
        falling = prev is not None and s < prev * (1 - FALLING * max(0, since) / end)
        if not step or left <= 0:
            return None, 0
        if self.cool_m is None and left > FINAL_COOL * end + 1e-9:
            return None, 0 if falling else self._to_cool(ctl, ctl.kept)
        if self.cool_m is None:
            if falling:  # the loop decays on its own: no cooldown from the controller
                return None, 0
            self.cool_m = 1.0
        steps = min(ctl.interval, max(1, math.ceil(left / step - 1e-9)))
        start = self.cool_m or 1 / steps  # (0: the loop ran past the end the steps' tokens predicted: a last step)
        self.cool_m = start if falling else start * max(0.0, left - steps * step) / left
        return Decision(
            ctl.clip(ctl.lr_scale * start),  # (never below the lr's lower bound)
            ctl.grad_accum,
            steps=0 if steps == ctl.interval else steps,
            fall_to=ctl.clip(ctl.lr_scale * self.cool_m),
            action="final_cooldown_hold" if falling else "final_cooldown",
            drop=drop,
            phase="online",
        ), 0

    def _to_cool(self, ctl, kept):
        """The next segment's length from a history of `kept` tokens when the final cooldown's start (at 1 - FINAL_COOL
        of the history budget) falls inside it, so that the segment ends there; 0 (the interval) if not."""
        if not ctl.budget_tokens:
            return 0
        end, step = ctl.history_budget(kept), ctl.steps_tokens(1) * ctl.grad_accum / ctl.ref_accum
        before = end - kept - FINAL_COOL * end  # tokens to the cooldown's start
        if not step or before <= 1e-9:
            return 0
        steps = max(1, math.ceil(before / step - 1e-9))
        return steps if steps < ctl.interval else 0

    # ------------------------------------------------------------ search by trials
    def _trial_search(self, ctl, obs, nonfinite):
        trial = self.trials[-1]
        loss = obs.eval_loss if math.isfinite(obs.eval_loss) and not nonfinite else math.inf
        if self.segment == "trial":  # keep its weights, then cool down to compare
            trial["raw"] = loss
            self.segment = "cool"
            if len(self.trials) == 1 and not ctl.room(obs.tokens, ctl.trial_cost(), ctl.kept):
                if self._blown(ctl, loss) and self._down(ctl, trial["scale"]) < trial["scale"]:
                    return self._restart_down(ctl, trial["scale"])
                ctl.best = loss
                return self._commit(ctl)  # no budget for even one more trial: go on as started
            return Decision(
                trial["scale"],
                ctl.grad_accum,
                steps=ctl.cool_steps,
                cool=True,
                action="cooldown",
                save=trial["slot"],
                phase="search",
            )
        trial["cooled"] = loss
        self.segment = "trial"
        best = min(self.trials, key=lambda t: (t["cooled"], t["scale"]))
        start = self.trials[0]
        # off the plateau, a higher lr that wins only after its cooldown (its loss before it not below that of a lower
        # one whose slot is held) does not beat that one: the short horizon's bias towards high lrs, which the cooldown
        # brings out (on the plateau the losses before the cooldowns tell nothing: the cooled ones decide)
        beaten = [t for t in self.trials if t["scale"] < best["scale"] and t["slot"] and not best["raw"] < t["raw"]]
        if beaten and not self._on_plateau(ctl, start, ("cooled",)):
            best = min(beaten, key=lambda t: (t["cooled"], t["scale"]))
        lower = best["scale"] < start["scale"]
        if lower and start["slot"] and self._on_plateau(ctl, best) and self._on_plateau(ctl, start):
            best = start  # a lower lr's win on a plateau is noise: the start's lr stays
        if self.last_direction is not None:  # REINFORCE on the direction that produced this trial
            theta = [[p] for p in self.direction_pref]
            gain = 1.0 if best is trial else -1.0
            reinforce_update(theta, [1.0], softmax(self.direction_pref), self.last_direction, gain, SEARCH_ETA)
            self.direction_pref = [row[0] for row in theta]
        losers = tuple(t["slot"] for t in self.trials if t is not best and t["slot"])
        for t in self.trials:
            t["slot"] = t["slot"] if t is best else ""
        # every trial so far blew up: the next goes a decade below the lowest tried (none is a better one to go on from)
        lowest = min(t["scale"] for t in self.trials)
        down = self._down(ctl, lowest)
        blown = self._blown(ctl, best["cooled"]) and down < lowest
        nxt = (down, 0) if blown else self._next_scale(ctl, best)  # (scale, direction: 0 is down)
        extra = ctl.steps_tokens(ctl.trial_steps + ctl.cool_steps)
        if nxt is None or not ctl.room(obs.tokens, extra, ctl.slot_kept[best["slot"]]):
            if blown:  # never go on from weights that blew up
                return self._restart_down(ctl, lowest)
            ctl.lr_scale = best["scale"]
            ctl.best, ctl.since_best = best["raw"], 0  # the safety's reference: the weights training goes on from
            self.rescue = best["slot"]  # (see rescue_slot)
            d = self._commit(ctl, load=best["slot"], keep=(best["slot"],))
            d.drop = tuple(dict.fromkeys(d.drop + losers))
            return d
        scale, self.last_direction = nxt
        ctl.lr_scale = scale
        self.trials.append({"scale": scale, "raw": None, "cooled": None, "slot": f"trial{len(self.trials)}"})
        return self._trial(ctl, scale, drop=losers)

    def rescue_slot(self, ctl):
        """As Off's, or after a search by trials the winner's weights as committed: a 20-step comparison favours the
        highest lr that survives it, which can diverge later (an autoencoder's weights went NaN three segments after
        its commit; a linear regression's loss reached 3e11 in the next), and the net had nothing to go back to."""
        return super().rescue_slot(ctl) or (self.rescue if self.rescue in ctl.slot_loss else "")

    @staticmethod
    def _on_plateau(ctl, trial, keys=("raw", "cooled")):
        """A trial's losses (before its cooldown and after) less than PLATEAU below the initial one and no more than
        SPIKE above it: it made no progress and did not spike."""
        init = ctl.init_loss
        return bool(init) and all(trial[k] is not None and -PLATEAU <= trial[k] / init - 1 <= SPIKE for k in keys)

    @staticmethod
    def _blown(ctl, loss):
        """A trial's loss over BLOWUP x the initial one, or not finite: its lr is too high (training never goes on from
        its weights)."""
        return not loss < BLOWUP * (ctl.init_loss or math.inf)

    def _restart_down(self, ctl, lowest):
        """No room for another trial and every one blew up: a decade below the lowest tried, from the initial weights,
        uncompared (as a short run's first segment that blew up in the search by the hypergradient)."""
        self.phase = "online"
        d = self._restart(ctl, self._down(ctl, lowest), "restart_down", tuple(ctl.slot_kept))
        d.measure = False  # (nothing to measure: no gradient statistics)
        return d

    def _next_scale(self, ctl, best):
        """The next trial: from the best trial, a step in decades of lr. A side with a worse trial at distance d is
        bracketed: refine it at d/2 (down to the finest move). An open side is explored with the coarsest move.
        Between two candidate sides, the direction preferences decide."""
        here = math.log10(best["scale"])
        options = []  # (direction, new scale)
        for direction, sign in ((0, -1), (1, 1)):
            side = [
                abs(math.log10(t["scale"]) - here) for t in self.trials if sign * (math.log10(t["scale"]) - here) > 1e-9
            ]
            step = min(side) / 2 if side else MOVES[0]
            scale = ctl.clip(10 ** (here + sign * step))
            new = all(abs(math.log10(t["scale"]) - math.log10(scale)) > 1e-6 for t in self.trials)
            if step >= MOVES[-1] - 1e-9 and new:
                options.append((direction, scale))
        if not options:
            return None
        d, scale = options[sample(ctl.rng, softmax([self.direction_pref[d] for d, _ in options]))]
        return scale, d


POLICIES = {"rl": RL, "seed": Seed, "plateau": Plateau, "off": Off}


# ---------------------------------------------------------------- the controller
class Controller:
    """The reward, the best loss, the safety rollback, patience and the search budget; the policy
    decides the rest. Deterministic for a given seed and sequence of observations.

    policy: a key of POLICIES. lr: the loop's base lr; lr_bounds: (min_lr, max_lr) in the same units.
    grad_accum: starting accumulation; grad_accum_bounds: (lo, hi). budget_tokens: the run's token
    budget (the tokens its final weights will have seen); interval: the loop's optimizer steps between
    two decisions; trial_steps: the length of rl's search segments (the first, each trial, each move of the climb),
    whatever the interval, shortened in a short run (Decision.steps tells the loop); search_budget: the share of
    budget_tokens the rl search may discard.
    patience: stop after this many decisions without a new best eval loss (None: never).
    tokens_per_step: the tokens of one optimizer step at the starting batch, if known before the first segment
    (then a short run's first segment and trials are shortened until one trial fits the search budget).
    search_in_budget: the loop counts discarded tokens inside budget_tokens (its history ends that much earlier).
    An argument it cannot work with raises a ValueError that names it; so does an Observation whose running counts
    (tokens, nonfinite_steps) go back, or whose eval_loss is None.
    """

    def __init__(
        self,
        policy,
        lr,
        lr_bounds,
        grad_accum,
        grad_accum_bounds,
        budget_tokens=None,
        interval=20,
        search_budget=SEARCH_BUDGET,
        seed=0,
        patience=None,
        tokens_per_step=None,
        search_in_budget=False,
        trial_steps=TRIAL_STEPS,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        if not (math.isfinite(lr) and 0 < lr_bounds[0] <= lr <= lr_bounds[1]):
            raise ValueError(f"need 0 < lr_bounds[0] ({lr_bounds[0]}) <= lr ({lr}) <= lr_bounds[1] ({lr_bounds[1]})")
        if not 1 <= grad_accum_bounds[0] <= grad_accum <= grad_accum_bounds[1]:
            raise ValueError(
                f"need 1 <= grad_accum_bounds[0] ({grad_accum_bounds[0]}) <= grad_accum ({grad_accum}) "
                f"<= grad_accum_bounds[1] ({grad_accum_bounds[1]})"
            )
        if not 0 <= search_budget < 1:
            raise ValueError(f"search_budget must be in [0, 1), a share of budget_tokens, got {search_budget}")
        for name, v in [("interval", interval), ("budget_tokens", budget_tokens), ("tokens_per_step", tokens_per_step)]:
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if not (trial_steps >= 1 and int(trial_steps) == trial_steps):
            raise ValueError(f"trial_steps must be a whole number of optimizer steps >= 1, got {trial_steps}")
        if patience is not None and not patience >= 1:
            raise ValueError(f"patience must be at least 1 decision (or None: never stop), got {patience}")
        self.policy_name, self.policy = policy, POLICIES[policy]()
        self.patience = patience
        self.scale_lo, self.scale_hi = lr_bounds[0] / lr, lr_bounds[1] / lr
        self.ga_lo, self.ga_hi = grad_accum_bounds
        self.ref_accum = grad_accum  # the starting accumulation: the reward's reference window
        self.lr_scale, self.grad_accum = 1.0, grad_accum
        self.budget_tokens, self.search_budget = budget_tokens, search_budget
        self.search_in_budget = search_in_budget  # discarded tokens come off the history's end (history_budget)
        # a trial's length (the first segment's too: they are compared) and a cooldown's
        self.trial_steps, limit = int(trial_steps), math.inf
        if budget_tokens and tokens_per_step:
            limit = search_budget * budget_tokens / tokens_per_step  # steps the search may discard
        while self.trial_steps > MIN_TRIAL and self.trial_steps + 2 * cooldown_steps(self.trial_steps) > limit:
            self.trial_steps -= 1
        self.shortened = self.trial_steps < trial_steps  # a short run: its first reading comes early
        self.cool_steps = cooldown_steps(self.trial_steps)
        self.trial_fits = self.trial_steps + 2 * self.cool_steps <= limit
        self.init_loss = None  # the initial weights' eval loss, if read (start())
        self.rng = random.Random(seed)
        self.decisions = 0
        self.nonfinite_seen = 0  # non-finite steps already accounted for
        self.best, self.since_best = math.inf, 0
        self.first_loss, self.line_best = None, math.inf  # the first eval loss read; the best of the weights' history
        self.last_loss, self.last_tokens = None, 0  # the eval loss and tokens at the previous decision
        self.interval = interval
        self.tokens_per_step = tokens_per_step  # given, else measured from the segments
        self.kept = 0  # tokens in the current weights' history (a load goes back to the slot's)
        self.spent = 0  # tokens spent, at the decision being taken
        self.slot_kept = {}  # self.kept when each slot was saved
        self.slot_loss = {}  # eval loss of each saved slot
        self.pending = None  # the decision being carried out

    def start(self, eval_loss=None):
        """Call once before training, with the eval loss of the initial weights, or a function that returns it (called
        only if a decision may need it), or None; apply the returned decision. Only rl uses it (a short run's first
        segment that blew up restarts lower; a trial's comparison on a plateau waits); the safety net's and the
        reward's losses start with the first segment either way, so a number and a function that returns it decide
        alike."""
        if self.policy.needs_init_loss(self):
            loss = eval_loss() if callable(eval_loss) else eval_loss
            self.init_loss = None if loss is None else float(loss)  # None: not known, no restart
        d = self.policy.start(self)
        self._bookkeep(d, None, 0)
        self.pending = d
        return d

    def step(self, obs):
        """obs: an Observation (or a dict of its fields). Returns a Decision.

        Safety for the guarded policies: a non-finite step in the window (the loop skipped those updates: the weights
        are intact; one alone, with a finite eval loss, is a bad record, not a fault) or a non-finite eval loss
        multiplies the lr by SAFETY_LR_FACTOR; so does an eval loss more than SPIKE above the one before a move up,
        right after it (or in the segment after the commit that ends a climb: slot "best" is still held), which also
        rolls back to the weights from before it (once; twice in a row when they come back damaged: a non-finite or
        blown-up loss); and so does a blow-up, a finite divergence whoever set the lr: an eval loss above BLOWUP x the
        best of the weights' history (since the last load) and above the first eval loss read, unless it fell since the
        safety net halved the lr with no slot to go back to (the weights recover at the halved lr: it holds); a finite
        one that rose again right after such a halving multiplies it by BLOWUP_CUT (a decade) instead. Each fault goes
        back to the policy's rescue slot when one is held (rescue_slot: "best", or rl's committed trial weights)."""
        if self.pending is None:
            raise RuntimeError("Controller.step() before Controller.start(): call start() once before training")
        obs = obs if isinstance(obs, Observation) else Observation(**obs)  # a misspelt key raises
        # plain numbers from here on: a 0-d tensor (or numpy scalar) from the loop is read once, and never kept in the
        # controller's state (state_dict() stays JSON)
        obs = dataclasses.replace(
            obs,
            tokens=int(obs.tokens),
            nonfinite_steps=int(obs.nonfinite_steps),
            progress=float(obs.progress),
            hypergradient=None if obs.hypergradient is None else float(obs.hypergradient),
            schedule=None if obs.schedule is None else float(obs.schedule),
        )
        tokens = obs.tokens
        if obs.eval_loss is None:
            raise ValueError(
                "Observation.eval_loss is None: pass the validation loss (inf if not finite) or a callable"
            )
        if tokens < self.last_tokens:
            raise ValueError(
                f"Observation.tokens went back from {self.last_tokens} to {tokens}: pass the training tokens spent so "
                "far, discarded segments included (a running count that a rollback does not reset)"
            )
        if obs.nonfinite_steps < self.nonfinite_seen:
            raise ValueError(
                f"Observation.nonfinite_steps went back from {self.nonfinite_seen} to {obs.nonfinite_steps}: pass the "
                "optimizer steps skipped as non-finite so far (a running count, not the segment's)"
            )
        window = tokens - self.last_tokens  # the segment just run
        self.kept, self.spent = self.kept + window, tokens
        if window > 0:
            self.tokens_per_step = window / (self.pending.steps or self.interval) / self.grad_accum * self.ref_accum
        skipped, self.nonfinite_seen = obs.nonfinite_steps - self.nonfinite_seen, obs.nonfinite_steps
        nonfinite = skipped > 0
        ref = window * self.ref_accum / self.grad_accum  # the window's tokens at the starting batch
        self.decisions += 1
        unread = callable(obs.eval_loss) and not self.policy.guarded and self.policy.skips_loss(self, obs, nonfinite)
        if unread:  # no evaluation: no reward, no new best, and (unguarded) no safety verdict
            loss, reward, fault, recovering = None, 0.0, nonfinite, False
            obs = dataclasses.replace(obs, eval_loss=None)
        else:
            loss = float(obs.eval_loss() if callable(obs.eval_loss) else obs.eval_loss)  # read now if a function
            obs = dataclasses.replace(obs, eval_loss=loss)  # the policy gets the number
            if self.policy.guarded and skipped == 1 and math.isfinite(loss):
                nonfinite = False  # one skipped step in a segment is a bad record, not a divergence (two are)
            reward = 0.0 if self.last_loss is None else compute_reward(self.last_loss, loss, window, ref, nonfinite)
            # a fault: a non-finite step or loss; right after the controller raised the lr (slot "best" is held), a
            # spike above the loss from before the move; or a blow-up, whoever set the lr: above twice the best of
            # these weights' history and above the first loss read (a late rise near a loss of 0, such as
            # overfitting, is not one). Short of those, the run's own ups and downs are not the controller's to undo.
            spike = "best" in self.slot_kept and loss > self.slot_loss["best"] * (1 + SPIKE)
            blowup = self.first_loss is not None and loss > max(BLOWUP * self.line_best, self.first_loss)
            finite = math.isfinite(loss) and not nonfinite
            # a blow-up whose loss falls after the safety net halved the lr with no slot to go back to: the halved lr
            # holds, the weights recover; halving again would only slow that (to the lr's lower bound)
            held = self.pending.phase == "safety" and not self.pending.load and self.last_loss is not None
            recovering = blowup and finite and not spike and held and loss < self.last_loss
            fault = not finite or spike or (blowup and not recovering)
            if finite:
                self.first_loss = loss if self.first_loss is None else self.first_loss
                self.line_best = min(self.line_best, loss)
            if finite and loss < self.best - BEST_MARGIN:
                self.best, self.since_best = loss, 0
            else:
                self.since_best += 1
        if self.policy.guarded and recovering:
            d = Decision(self.lr_scale, self.grad_accum, action="recover", phase="safety")
        elif self.policy.guarded and fault:
            # a (finite) blow-up that rose again right after the net halved the lr with no slot to go back to: a decade
            # down (halving again lets the weights run away before the lr is low enough to hold them)
            worse = held and self.pending.action == "rollback" and blowup and finite and loss >= self.last_loss
            self.lr_scale = self.clip(self.lr_scale * (BLOWUP_CUT if worse else SAFETY_LR_FACTOR))
            if spike:  # a move up punished harder than an undo: its lr goes back at least as far
                self.lr_scale = self.policy.punished(self.lr_scale)
            load = self.policy.rescue_slot(self)
            # at most twice in a row: the slot is freed (a fault that persists, such as a bad batch, would otherwise
            # bring the same weights and batches back for ever); kept for a second rollback only when this one found
            # damaged weights (a non-finite or blown-up loss: at an lr on the edge of stability, the weights from
            # before the move can diverge again at the halved lr; skipped steps leave the weights intact)
            reloaded = self.pending.phase == "safety" and self.pending.load  # the decision before loaded it already
            again = load and not reloaded and (not math.isfinite(loss) or blowup)
            d = Decision(
                self.lr_scale,
                self.grad_accum,
                action="rollback",
                load=load,
                drop=(load,) if load and not again else (),
                phase="safety",
            )
        else:
            d = self.policy.decide(self, obs, reward, nonfinite)
        d.reward = reward
        d.stop = self.patience is not None and self.since_best >= self.patience
        self._bookkeep(d, loss, tokens)
        self.pending = d
        return d

    def _bookkeep(self, d, loss, tokens):
        """The slots: what each holds (its eval loss, its weights' token history)."""
        self.last_loss, self.last_tokens = loss, tokens
        if d.save:
            self.slot_loss[d.save], self.slot_kept[d.save] = loss, self.kept
        if d.load:  # the next segment starts from the slot's weights
            self.last_loss, self.kept = self.slot_loss[d.load], self.slot_kept[d.load]
            self.line_best = math.inf if self.last_loss is None else self.last_loss
        for name in d.drop:
            self.slot_loss.pop(name, None)
            self.slot_kept.pop(name, None)

    # ------------------------------------------------------------ helpers for the policies
    def trial_segment(self):
        """Decision.steps of a trial segment (0: the interval)."""
        return 0 if self.trial_steps == self.interval else self.trial_steps

    def steps_tokens(self, steps):
        """Tokens of `steps` optimizer steps at the starting batch size (measured from the segments run)."""
        return steps * (self.tokens_per_step or 0)

    def trial_cost(self):
        """Tokens of one more trial and both cooldowns (the trial's and the one it is compared with)."""
        return self.steps_tokens(self.trial_steps + 2 * self.cool_steps)

    def room(self, spent, extra, kept_after):
        """Whether the search budget allows spending `extra` more tokens and then going on from weights whose
        history is `kept_after` tokens: every token spent and not in the final weights' history is discarded."""
        if self.budget_tokens is None:
            return False
        return spent + extra - kept_after <= self.search_budget * self.budget_tokens + 1e-9

    def history_budget(self, kept=None):
        """The tokens the final weights' history may hold: budget_tokens, less what the search discarded beyond
        search_budget (a restart when both lrs are too high does, by at most one trial segment, and a plateau's wait
        that goes back to the first's weights), so that the run never spends more than (1 + search_budget) *
        budget_tokens; with search_in_budget, less everything it discarded (the run spends budget_tokens). A loop
        stops there and ends its schedule there. (kept: as it will be once the decision's rollback has loaded
        weights of that history; the current one if None.)"""
        kept = self.kept if kept is None else kept
        over = self.spent - kept - (0 if self.search_in_budget else self.search_budget * self.budget_tokens)
        return self.budget_tokens - max(0, over) if self.budget_tokens else self.budget_tokens

    def clip(self, scale):
        return min(self.scale_hi, max(self.scale_lo, scale))

    def clip_accum(self, ga):
        return min(self.ga_hi, max(self.ga_lo, ga))

    # ------------------------------------------------------------ checkpointing
    def state_dict(self):
        d = {k: v for k, v in vars(self).items() if k not in ("rng", "policy", "pending")}
        return d | {
            "rng": list(self.rng.getstate()),
            "policy": self.policy.state_dict(),
            "pending": self.pending.as_dict(),
        }

    def load_state_dict(self, d):
        d = dict(d)
        rng, policy, pending = d.pop("rng"), d.pop("policy"), d.pop("pending")
        vars(self).update(d)
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.policy.load_state_dict(policy)
        self.pending = Decision(**(pending | {"drop": tuple(pending["drop"])}))
