"""Learning vs forgetting, compared at matched acquisition (Lin et al. 2025, figure 1).

A method's forgetting means little without how much it learned: a method that learns nothing
forgets nothing. So every method is run at several learning rates (a sweep), each run is one
point (acquisition, retention), a method's points form its frontier, and methods are compared by
interpolating each frontier at the same acquisition levels.

    runs = expand_sweeps(params.continual.methods)      # {lr: [a, b]} -> "<name>@lr=a", "<name>@lr=b"
    table = matched(summary, levels=[0.25, 0.5, 0.75])  # per group: retention drops at each level
"""
from __future__ import annotations

import dataclasses

from slotwise.continual.experiment import MethodRun
from slotwise.continual.updaters import build_params

RETENTION_KEYS = ("known_drop", "heldout_ppl_rise")  # relative drops: 0 = nothing lost


def expand_sweeps(methods: list[MethodRun]) -> list[MethodRun]:
    """One run per swept value; each expanded run's group is the original name.

    A sweep key is a key of the method's params (e.g. lr, top_t) or one of the run's own budget
    fields (steps_per_fact, until_loss); several keys form their product, in the order given.
    """
    out: list[MethodRun] = []
    for m in methods:
        runs = [dataclasses.replace(m, sweep={}, group=m.group or m.name)]
        for key, values in m.sweep.items():
            if not values:
                raise ValueError(f"continual.methods[{m.name}].sweep.{key}: expected a non-empty list of values")
            nxt = []
            for r in runs:
                for v in values:
                    v = int(v) if key in ("steps_per_fact", "top_t", "r") and float(v).is_integer() else v
                    suffix = f"{key}={v:g}" if isinstance(v, float) else f"{key}={v}"
                    if key in ("steps_per_fact", "until_loss"):
                        nxt.append(dataclasses.replace(r, name=f"{r.name}@{suffix}", **{key: v}))
                    else:
                        params = build_params(r.method, {**dataclasses.asdict(r.params), key: v})
                        nxt.append(dataclasses.replace(r, name=f"{r.name}@{suffix}", params=params))
            runs = nxt
        out.extend(runs)
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"continual.methods: run names must be unique after sweeps, got {names}")
    return out


def acquisition(s: dict) -> float:
    return s["learned"] / max(s["n_facts"], 1)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x through points sorted by x; None outside their range (no extrapolation).

    Several points at the same x are averaged first."""
    by_x: dict[float, list[float]] = {}
    for px, py in points:
        if py is not None:
            by_x.setdefault(px, []).append(py)
    pts = sorted((px, sum(ys) / len(ys)) for px, ys in by_x.items())
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, exactly at x


def efficient(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (acquisition, drop) points no other point beats: none learns as much or more for a lower drop.

    An lr past a method's best (learns less AND forgets more) is not on its frontier."""
    pts = [p for p in points if p[1] is not None]
    return [p for p in pts if not any(q[0] >= p[0] and q[1] < p[1] for q in pts)]


def matched(summary: dict, groups: dict[str, str], levels: list[float]) -> dict:
    """Per group and acquisition level: each retention drop interpolated on the group's frontier (its
    efficient runs for that drop, see `efficient`).

    summary: the stage's per-run summary ({name: {learned, n_facts, known_drop, heldout_ppl_rise}});
    groups: run name -> group. A level outside a group's reached range is None (not extrapolated).
    """
    out: dict = {}
    for group in dict.fromkeys(groups.values()):
        runs = [summary[n] for n, g in groups.items() if g == group and n in summary]
        out[group] = {"acquisition_range": [min(map(acquisition, runs)), max(map(acquisition, runs))] if runs else None,
                      "at": {f"{lv:g}": {k: interpolate(efficient([(acquisition(r), r.get(k)) for r in runs]), lv) for k in RETENTION_KEYS}
                             for lv in levels}}
    return out


def common_levels(summary: dict, groups: dict[str, str]) -> list[float]:
    """Every acquisition some run reached at which at least two groups can be read (interpolated on their
    frontiers, never extrapolated), sorted.

    A level need not lie inside EVERY group's range: one single-run group (a LoRA row, a variant) would
    otherwise empty the table for all the others."""
    runs_by_group: dict[str, list[dict]] = {}
    for name, group in groups.items():
        if name in summary:
            runs_by_group.setdefault(group, []).append(summary[name])
    levels = sorted({acquisition(r) for runs in runs_by_group.values() for r in runs})

    def readable(runs: list[dict], lv: float) -> bool:
        return interpolate([(acquisition(r), 0.0) for r in runs], lv) is not None

    return [lv for lv in levels if sum(readable(runs, lv) for runs in runs_by_group.values()) >= 2]
