"""Greedy choice of the intermediate times of multistep sampling (Song et al. 2023, "Consistency Models", sec. 6 and
app. C: the time points are pinpointed one at a time, each by a ternary search on FID with the earlier ones fixed,
assuming the FID is unimodal in each).

The search here is golden-section (a ternary search that reuses one of its two inner points, so one evaluation a
step) on log sigma, between sigma_min and the previous time."""

from __future__ import annotations

import math
from collections.abc import Callable

from genlab.config import check_int
from genlab.errors import GenlabError

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...: the share of the bracket kept each step
MAX_SEARCH_ITERS = 60


def golden_section_min(f: Callable[[float], float], lo: float, hi: float, iters: int) -> tuple[float, float]:
    """(x, f(x)) for the best point evaluated by `iters` + 1 evaluations of a golden-section search of `f` on the open
    interval (lo, hi); exact for a unimodal `f` up to (hi - lo) * 0.618^iters. The best point evaluated is returned
    rather than the bracket's middle, so a noisy `f` never gives a point it did not score."""
    check_int("iters", iters, 1, MAX_SEARCH_ITERS)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise GenlabError(f"the search interval ({lo}, {hi}) is empty or not finite")
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    seen = [(fc, c), (fd, d)]
    for _ in range(iters - 1):
        if fc <= fd:  # the minimum is in (a, d): d becomes the right end, c the new right inner point
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
            seen.append((fc, c))
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
            seen.append((fd, d))
    best_f, best_x = min(seen, key=lambda t: (math.inf if math.isnan(t[0]) else t[0]))
    return best_x, best_f


def greedy_times(score: Callable[[list[float]], float], sigma_max: float, sigma_min: float, steps: int,
                 iters: int) -> tuple[list[float], list[float]]:
    """tau_1 = sigma_max > tau_2 > ... > tau_steps, chosen greedily (Song et al. 2023, app. C): tau_k minimises
    score([tau_1, ..., tau_k]) (a k-step sampler's) over log tau_k in (log sigma_min, log tau_{k-1}) with
    tau_1, ..., tau_{k-1} fixed. Returns the times and the best score at each k >= 2."""
    check_int("steps", steps, 1, 10_000)
    if not 0 < sigma_min < sigma_max:
        raise GenlabError(f"need 0 < sigma_min < sigma_max; got {sigma_min} and {sigma_max}")
    taus, best = [float(sigma_max)], []
    for _ in range(1, steps):
        log_t, f = golden_section_min(lambda u: score([*taus, math.exp(u)]), math.log(sigma_min),
                                      math.log(taus[-1]), iters)
        taus.append(math.exp(log_t))
        best.append(f)
    return taus, best
