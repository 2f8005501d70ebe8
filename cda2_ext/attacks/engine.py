"""The shared machinery of the evaluation attacks: losses, worst-case bookkeeping, one PGD loop.

Every gradient attack in :mod:`~cda2_ext.attacks.whitebox`, :mod:`~cda2_ext.attacks.adaptive` and
:mod:`~cda2_ext.attacks.transfer` is :func:`sign_attack` (or APGD's schedule on the same sign step,
:func:`~cda2_ext.attacks.apgd.apgd`) with a different *objective*:

``objective(x) -> (loss, logits)`` for a batch of candidates ``x [G, B, C, H, W]``
    ``G`` independent copies of the ``B`` samples (parallel restarts, one copy per attacked
    sub-model, ...). ``loss [G, B]`` is maximised (its sum is differentiated, so every copy gets
    its own gradient); ``logits [G, B, K]`` are the outputs of the model being *evaluated* at ``x``
    (detached), used to keep the worst case found, or ``None`` when the attacked model is not the
    evaluated one (transfer attacks on a surrogate).

Per-sample worst case. A sample is "broken" when the evaluated model's argmax differs from the
label. :class:`AttackResult` keeps, per copy, the broken point with the largest margin
``max_{k != y} z_k - z_y`` if any, else the point of largest margin - i.e. every iterate is a
candidate, not just the last one (any point in the ball is a legitimate adversarial example).
:meth:`AttackResult.worst` folds the copy axis and :func:`merge_worst` folds several attacks.

Restarts (:func:`run_restarts`) run sequentially and only on samples not broken yet, which is how
the "worst case over restarts" of the paper's protocol is computed without wasting work; the
random start of restart ``r`` is drawn for the full batch and then sliced, so a sample gets the
same start whichever other samples are still active.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as Fn
from torch import Tensor

from .. import limits
from ..errors import ConfigError
from ..ops.reference import draw_seed
from ..runtime import FUSED, OpsBackend

__all__ = [
    "Objective", "ModelFn", "LOSSES", "ce_loss", "cw_loss", "dlr_loss", "margin", "per_sample_loss",
    "AttackResult", "merge_worst", "update_best", "new_best", "sign_attack", "run_restarts",
    "model_objective", "project_", "flatten_copies", "check_attack_args",
    "derive_generator",
]

Objective = Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]
ModelFn = Callable[[Tensor], Tensor]  # images [N, C, H, W] in [0, 1] -> logits [N, K]


# ----- losses (per sample, to maximise) -----------------------------------------------------------
def margin(logits: Tensor, target: Tensor) -> Tensor:
    """``max_{k != y} z_k - z_y`` over the last axis (> 0 means misclassified); any leading shape."""
    z_y = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    other = logits.masked_fill(Fn.one_hot(target, logits.shape[-1]).bool(), float("-inf"))
    return other.amax(-1) - z_y


def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy, any leading shape."""
    K = logits.shape[-1]
    return Fn.cross_entropy(logits.reshape(-1, K).float(), target.reshape(-1),
                            reduction="none").view(target.shape)


def cw_loss(logits: Tensor, target: Tensor, kappa: float = 50.0) -> Tensor:
    """Carlini-Wagner margin loss ``min(max_{k != y} z_k - z_y, kappa)``.

    Equals ``-max(z_y - max_other + kappa, 0)`` (the usual form) up to the constant ``kappa``;
    the cap stops pushing a sample once it is misclassified with confidence ``kappa``.
    """
    return margin(logits.float(), target).clamp(max=kappa)


def dlr_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Difference-of-logits-ratio loss of Croce & Hein (2020), needs ``K >= 3``.

    ``-(z_y - max_{k != y} z_k) / (z_pi1 - z_pi3 + 1e-12)``: shift- and scale-invariant in the
    logits, so it is not fooled by a model that merely rescales its outputs.
    """
    z = logits.float()
    if z.shape[-1] < 3:
        raise ValueError(f"DLR loss needs at least 3 classes, got {z.shape[-1]}")
    top = z.topk(3, dim=-1).values
    return margin(z, target) / (top[..., 0] - top[..., 2] + 1e-12)


LOSSES: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}


def per_sample_loss(name: str, option: str = "loss") -> Callable[[Tensor, Tensor], Tensor]:
    """The loss called ``name`` (``"ce"``, ``"cw"`` or ``"dlr"``); otherwise
    :class:`~cda2_ext.errors.ConfigError` naming ``option`` (the field that holds the name)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"{option}: expected one of {sorted(LOSSES)}, got {name!r}") from None


# ----- helpers ------------------------------------------------------------------------------------
def flatten_copies(x: Tensor) -> Tensor:
    """``[G, B, ...] -> [G*B, ...]`` (a view when possible)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def project_(x: Tensor, x_nat: Tensor, eps: float, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """In place: clip ``x`` to the L-inf ``eps``-ball around ``x_nat`` (broadcast), then to the box.

    Same two clamps, in the same order, as the fused sign step; used where a step is not a sign
    step (APGD's momentum mix).
    """
    torch.minimum(torch.maximum(x, x_nat - eps), x_nat + eps, out=x)
    return x.clamp_(lo, hi)


def derive_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` (e.g. attack name, eps, batch index), so
    every attack's randomness is reproducible and independent of which other attacks ran."""
    h = zlib.crc32("/".join(str(k) for k in (seed, *keys)).encode())
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + h) % 2 ** 63)


def check_attack_args(x_nat: Tensor, target: Tensor, eps: float, steps: int = 0) -> None:
    """One-line ``ValueError`` for unusable attack inputs (before any model call); ``eps`` by the
    package's one radius rule (:func:`~cda2_ext.limits.radius`)."""
    if x_nat.dim() < 2 or target.shape != x_nat.shape[:1]:
        raise ValueError(f"x_nat [B, ...] and target [B] must agree, got {list(x_nat.shape)} "
                         f"and {list(target.shape)}")
    limits.radius("eps", eps)
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")


def model_objective(model: ModelFn, target: Tensor,
                    loss: Union[str, Callable[[Tensor, Tensor], Tensor]] = "ce",
                    transform: Optional[Callable[[Tensor], Tensor]] = None,
                    evaluate: bool = True) -> Objective:
    """The objective "``loss`` of ``model``" for candidates ``[G, B, ...]``.

    Args:
        model: images ``[N, C, H, W]`` -> logits ``[N, K]``.
        target: ``[B]`` labels (shared by all copies).
        loss: ``"ce"``, ``"cw"``, ``"dlr"`` or a callable ``(logits [G, B, K], target [G, B]) -> [G, B]``.
        transform: applied to the images before ``model`` in the loss path only (input
            diversity); the result then says nothing about the untransformed point, so no logits
            are reported when it is set.
        evaluate: report ``model``'s logits for worst-case tracking (``False`` for surrogates).
    """
    fn = per_sample_loss(loss) if isinstance(loss, str) else loss

    def objective(x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        G, B = x.shape[:2]
        flat = flatten_copies(x)
        logits = model(transform(flat) if transform is not None else flat).view(G, B, -1)
        y = target.expand(G, B)
        keep = evaluate and transform is None
        return fn(logits, y), (logits.detach() if keep else None)

    return objective


# ----- results ------------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """The worst case an attack found: what every evaluation attack returns.

    The attacks that know more return a subclass that adds only that
    (:class:`~cda2_ext.attacks.square.SquareResult`: queries spent;
    :class:`~cda2_ext.attacks.autoattack.AutoAttackResult`: AutoAttack's warnings and time).

    Attributes:
        x_adv: ``[G, B, C, H, W]`` adversarial inputs (``G`` copies; 1 unless the attack keeps
            several, e.g. one per attacked sub-model) - or ``[B, ...]`` after :meth:`worst`.
        margin: ``max_{k != y} z_k - z_y`` of the evaluated model at ``x_adv``, same leading
            shape; ``None`` when the attack had no evaluated model (transfer).
        correct: the evaluated model still answers the label at ``x_adv`` (``None`` likewise).
    """

    x_adv: Tensor
    margin: Optional[Tensor] = None
    correct: Optional[Tensor] = None

    def worst(self) -> "AttackResult":
        """Fold the copy axis: per sample, a broken copy if any, else the largest margin."""
        if self.margin is None or self.correct is None:
            raise ValueError("worst(): this result has no evaluated model to rank copies by")
        key = _rank_key(self.correct, self.margin)  # [G, B]
        best = key.argmax(0)  # [B]
        B = best.shape[0]
        ar = torch.arange(B, device=best.device)
        return AttackResult(self.x_adv[best, ar], self.margin[best, ar], self.correct[best, ar])


def _rank_key(correct: Tensor, margin: Tensor) -> Tensor:
    """A score where broken beats unbroken and, within each, a larger margin wins.

    ``atan`` maps margins into (-pi/2, pi/2), so adding 4 for "broken" orders the two groups.
    """
    return torch.atan(margin.double()) + 4.0 * (~correct).double()


def merge_worst(results: Sequence[AttackResult]) -> AttackResult:
    """Per-sample worst case over several (folded, ``[B, ...]``) results of the same samples."""
    res = [r for r in results if r.margin is not None]
    if not res:
        raise ValueError("merge_worst: no result with an evaluated model")
    return AttackResult(torch.stack([r.x_adv for r in res]), torch.stack([r.margin for r in res]),
                        torch.stack([r.correct for r in res])).worst()


def new_best(x: Tensor) -> AttackResult:
    """An empty tracker for candidates ``x [G, B, ...]`` (margin ``-inf``, nothing broken)."""
    return AttackResult(x.detach().clone(), torch.full(x.shape[:2], -math.inf, device=x.device),
                        torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))


def update_best(best: AttackResult, x: Tensor, logits: Tensor, target: Tensor) -> None:
    """Keep, per copy and sample, the better of ``best`` and the candidate ``x`` (in place).

    ``x [G, B, ...]``, ``logits [G, B, K]`` of the evaluated model at ``x``.
    """
    m = margin(logits.float(), target.expand(logits.shape[:2]))
    c = logits.argmax(-1) == target
    better = _rank_key(c, m) > _rank_key(best.correct, best.margin)
    best.x_adv[better] = x[better]
    best.margin[better] = m[better]
    best.correct[better] = c[better]


# ----- the one PGD loop ---------------------------------------------------------------------------
def sign_attack(objective: Objective, x_nat: Tensor, target: Tensor, eps: float, alpha: float,
                steps: int, *, x_init: Optional[Tensor] = None, copies: int = 1,
                momentum: Optional[float] = None, lo: float = 0.0, hi: float = 1.0,
                track_worst: bool = True, last_iterate: bool = False,
                backend: OpsBackend = FUSED) -> AttackResult:
    """Projected sign-gradient ascent on ``objective`` in the L-inf ``eps``-ball around ``x_nat``.

    Each step: one forward + backward of ``objective`` on all ``G*B`` candidates and one fused
    :func:`~cda2_ext.ops.pgd_sign_step_` over ``[G, B, C, H, W]`` with ``x_nat`` broadcast over G.

    Args:
        objective: see the module docstring.
        x_nat: ``[B, C, H, W]`` natural images in ``[lo, hi]``; target ``[B]``.
        eps, alpha, steps: radius, step size, number of gradient steps.
        x_init: the start ``[G, B, ...]`` (e.g. a fused random start); default: ``x_nat``.
        copies: ``G`` when ``x_init`` is not given.
        momentum: ``mu`` of MI-FGSM (Dong et al. 2018): the step follows the sign of
            ``g <- mu * g + grad / mean|grad|`` (per sample L1 normalisation); ``None``: plain PGD.
        track_worst: keep the per-sample worst case over all iterates (evaluation). ``False``
            returns the last iterate and skips the forward pass at the final point: what
            training PGD wants (Algorithm 1 trains on the last iterate).
        last_iterate: with ``track_worst``, judge only the final iterate (its margin and
            correctness are still returned): the published protocol (DVERGE's scripts keep each
            restart's last PGD iterate). The default worst-iterate bookkeeping also counts a
            sample as broken when an earlier iterate broke it, so it can only be stronger.
        backend: the operator module (:data:`~cda2_ext.runtime.FUSED` or ``REFERENCE``).

    Returns:
        With ``track_worst`` and an evaluated model: the per-copy worst case over *all*
        iterates (start and final point included). Without one: the final iterate, ``margin``/``correct`` ``None``.
    """
    x_nat = x_nat.detach()
    if x_init is None:
        x = x_nat.unsqueeze(0).expand(copies, *x_nat.shape).clone()
    else:
        if x_init.shape[1:] != x_nat.shape:
            raise ValueError(f"x_init: expected [G, {', '.join(map(str, x_nat.shape))}], "
                             f"got {list(x_init.shape)}")
        x = x_init.detach().clone()
    best: Optional[AttackResult] = None
    g_acc: Optional[Tensor] = None
    for step in range(steps + 1 if track_worst else steps):
        last = step == steps
        with torch.enable_grad() if not last else torch.no_grad():
            if not last:
                x.requires_grad_(True)
            loss, logits = objective(x)
            grad = None if last else torch.autograd.grad(loss.sum(), x)[0]
        x = x.detach()
        if logits is not None and track_worst and (last or not last_iterate):
            if best is None:
                best = new_best(x)
            update_best(best, x, logits, target)
        if last:
            break
        if momentum is not None:
            norm = grad.abs().flatten(2).mean(-1).clamp_min(1e-12)
            grad = grad / norm.view(*norm.shape, *([1] * (grad.dim() - 2)))
            g_acc = grad if g_acc is None else g_acc.mul_(momentum).add_(grad)
            grad = g_acc
        backend.pgd_sign_step_(x, grad, x_nat, eps, alpha, lo, hi)
    if best is None:
        return AttackResult(x)
    return best


def run_restarts(attack_once: Callable[[Tensor, Tensor], AttackResult], x_nat: Tensor,
                 target: Tensor, eps: float, restarts: int, *, random_start: bool = True,
                 copies: int = 1, initially_correct: Optional[Tensor] = None, lo: float = 0.0,
                 hi: float = 1.0, generator: Optional[torch.Generator] = None,
                 backend: OpsBackend = FUSED) -> AttackResult:
    """Sequential restarts, each on the samples not broken yet; returns the folded worst case.

    Args:
        attack_once: ``(active_index [b], x_init [G, b, ...]) -> AttackResult`` for the samples
            ``x_nat[active_index]`` (its copies already folded or not; they are folded here).
        restarts: number of starts (``>= 1``); each draws a seed from ``generator``.
        random_start: uniform fused random start in the ball; ``False``: every restart starts at
            ``x_nat`` (so more than one restart only makes sense with a random start).
        initially_correct: ``[B]`` mask of samples worth attacking (e.g. clean-correct); the others
            are returned unattacked with ``correct=False`` and margin ``+inf``.
    """
    if restarts < 1:
        raise ValueError(f"restarts: must be >= 1, got {restarts}")
    B = x_nat.shape[0]
    dev = x_nat.device
    out = AttackResult(x_nat.detach().clone(), torch.full((B,), -math.inf, device=dev),
                       torch.ones(B, dtype=torch.bool, device=dev))
    if initially_correct is not None:
        out.correct &= initially_correct
        out.margin[~initially_correct] = math.inf
    for _ in range(restarts):
        # Draw every restart's seed even when nothing is left to attack, so the stream (and hence
        # the next attack's starts) does not depend on how many samples were broken.
        seed = draw_seed(generator)
        active = out.correct.nonzero().squeeze(1)
        if active.numel() == 0:
            continue
        if random_start and eps > 0:
            x0 = backend.pgd_random_start(x_nat, eps, lo, hi, num_models=copies, seed=seed)[:, active]
        else:
            x0 = x_nat[active].unsqueeze(0).expand(copies, -1, *x_nat.shape[1:]).clone()
        res = attack_once(active, x0)
        if res.x_adv.dim() == x_nat.dim() + 1:
            res = res.worst()
        cur = AttackResult(out.x_adv[active], out.margin[active], out.correct[active])
        merged = merge_worst([cur, res])
        out.x_adv[active], out.margin[active], out.correct[active] = (merged.x_adv, merged.margin,
                                                                      merged.correct)
    return out
