"""Budgets and the two selectors, over the unit costs of ``ms_prune.cost`` (a model's cost is
linear in its heads and neurons per layer: ``CostModel``).
"""
import numpy as np

from ms_prune.validation import check_amount_or_percent, check_choice, check_instance, check_int

METRICS = ("flops", "params")
SELECTORS = ("global", "bisect")


def parse_constraints(owner, constraints, seq_len):
    """``{"flops": "60%"}`` or ``{"params": 15e6}`` -> (metric, amount, fraction or None)."""
    check_instance(owner, "constraints", constraints, dict)
    if len(constraints) != 1 or next(iter(constraints)) not in METRICS:
        raise ValueError(f"{owner}: constraints must have exactly one key of {list(METRICS)} (e.g. "
                         f"{{'flops': '60%'}} or {{'params': 15e6}}), got {constraints!r}")
    metric, value = next(iter(constraints.items()))
    amount, fraction = check_amount_or_percent(owner, f"constraints[{metric!r}]", value)
    if metric == "flops":
        check_int(owner, "seq_len (the sequence length FLOPs are counted at)", seq_len, minimum=1)
    return metric, amount, fraction


def _order(scores, costs):
    """Units by score per unit of cost, best first; ties by (group, position) for determinism."""
    ratio = scores / np.maximum(costs, 1)
    return np.lexsort((np.arange(len(scores)), -ratio))


def _fill(keep, order, costs, room):
    """Add units in ``order`` that still fit in ``room``; the result is as close to the budget as
    the unit sizes allow."""
    for unit in order:
        if not keep[unit] and costs[unit] <= room:
            keep[unit] = True
            room -= costs[unit]
    return keep


def select_global(scores, costs, kinds, room, heads_kept=None):
    """Kwon et al. 2022: rank heads and neurons globally by score per cost; for every number of
    kept heads h, keep the h best heads and as many of the best neurons as the rest of the budget
    holds; choose the split that keeps the most total score. ``heads_kept``: use that h instead
    (e.g. another method's split, so that scores of different scales compare fairly)."""
    keep = np.zeros(len(scores), bool)
    firsts = {}
    for kind in (0, 1):
        members = np.flatnonzero(kinds == kind)
        ranked = members[_order(scores[members], costs[members])]
        firsts[kind] = (ranked, np.concatenate([[0], np.cumsum(costs[ranked])]),
                        np.concatenate([[0.0], np.cumsum(scores[ranked])]))
    (heads, head_cost_sum, head_score_sum), (neurons, neuron_cost_sum, neuron_score_sum) = firsts[0], firsts[1]
    best = None
    for h in range(len(heads) + 1) if heads_kept is None else [heads_kept]:
        left = room - head_cost_sum[h]
        if left < 0:
            break
        n = int(np.searchsorted(neuron_cost_sum, left, side="right")) - 1
        candidate = (head_score_sum[h] + neuron_score_sum[n], head_cost_sum[h] + neuron_cost_sum[n], h, n)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        raise ValueError(f"apply_gradnas: heads_kept={heads_kept} heads do not fit in the budget")
    _, used, h, n = best
    keep[heads[:h]] = True
    keep[neurons[:n]] = True
    return _fill(keep, _order(scores, costs), costs, room - used), {"heads_kept": int(h)}


def sensitivity_keys(scores, groups):
    """Per unit, the share of its group's total score held by the group's better units: the
    degradation threshold above which it is kept. A unit with no score comes last (key 1)."""
    keys = np.ones(len(scores))
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        values = scores[members]
        total = values.sum()
        if total <= 0:
            continue
        order = np.argsort(-values, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(values[order])[:-1]]) / total
        group_keys = np.where(values[order] > 0, before, 1.0)
        keys[members[order]] = group_keys
    return keys


def select_bisect(scores, costs, groups, room):
    """ModelOpt's gradnas: per group (the heads of a layer, the neurons of a layer) units sorted by
    score and their cumulative importance; a bisection on the threshold t finds the largest t for
    which every group keeps the units needed to hold a share t of its importance within the
    budget (the minimax choice: no group loses more than 1 - t of its importance)."""
    keys = sensitivity_keys(scores, groups)
    levels = np.unique(keys)
    cost_at = [0]  # cost_at[i]: keep units with key < levels[i]; the last entry keeps everything
    for level in levels:
        cost_at.append(int(costs[keys <= level].sum()))
    lo, hi = 0, len(levels)  # feasible index lo (0 keeps none), search the largest feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost_at[mid] <= room:
            lo = mid
        else:
            hi = mid - 1
    keep = keys <= levels[lo - 1] if lo > 0 else np.zeros(len(scores), bool)
    threshold = float(levels[lo - 1]) if lo > 0 else 0.0
    order = np.lexsort((-scores, keys))
    return _fill(keep, order, costs, room - int(costs[keep].sum())), {"threshold": threshold}


def select(selector, scores, costs, kinds, groups, room, heads_kept=None):
    """Boolean keep per unit with ``sum(costs[keep]) <= room``, and selector details."""
    check_choice("apply_gradnas", "selector", selector, SELECTORS)
    if selector == "global":
        return select_global(scores, costs, kinds, room, heads_kept)
    return select_bisect(scores, costs, groups, room)
