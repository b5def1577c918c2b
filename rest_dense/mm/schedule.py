"""Short runs of a config with a proportionate schedule (mmengine configs).

:func:`scale_schedule`: configs that set ``scale_schedule_with_max_iters = True`` (the toy
configs) keep their schedule proportionate when ``train_cfg.max_iters`` is overridden
(``rest-dense train --max-iters``).
"""
from __future__ import annotations

from typing import Any, Collection, Dict, Tuple

from mmengine.config import Config

from ..utils import scale_count

__all__ = ["SCALE_SCHEDULE_KEY", "scale_schedule"]

#: the config flag that opts a config into :func:`scale_schedule`
SCALE_SCHEDULE_KEY = "scale_schedule_with_max_iters"

_LINEAR = ("LinearLR", "LinearParamScheduler", "LinearMomentum")


def _explicit(key: str, explicit: Collection[str]) -> bool:
    """Whether the user set ``key`` (or a parent of it) themselves."""
    return any(key == e or key.startswith(e + ".") for e in explicit)


def scale_schedule(cfg: Config, max_iters: int,
                   explicit: Collection[str] = ()) -> Dict[str, Tuple[Any, Any]]:
    """Set ``train_cfg.max_iters`` and stretch everything counted in iterations with it.

    With ``r = max_iters / <the config's max_iters>``: the iteration-based parameter
    schedulers' ``begin`` / ``end`` / ``T_max`` / ``milestones`` (warm-up, decay steps), the
    validation interval, the checkpoint interval and the logging interval are multiplied by
    ``r`` and rounded (intervals at least 1; a scheduler ending at the old ``max_iters`` ends
    at the new one; a linear warm-up keeps at least two iterations, the least in which
    mmengine's ``LinearLR`` gets from ``start_factor`` to ``end_factor``). So a short run
    (``--cfg-options train_cfg.max_iters=20``) warms up, reaches its learning rate, decays,
    saves checkpoints and validates like the full one, only sooner. Entries named in
    ``explicit`` keep their value.

    Args:
        cfg: an iteration-based config (``train_cfg.max_iters``); modified in place.
        max_iters: the new number of iterations (>= 1).
        explicit: dotted keys the user set explicitly (e.g. the ``--cfg-options`` keys).

    Returns:
        What changed: ``{key: (old, new)}``.

    Raises:
        ValueError: ``max_iters`` < 1, or the config is not iteration-based.
    """
    max_iters = int(max_iters)
    if max_iters < 1:
        raise ValueError(f"train_cfg.max_iters must be at least 1, got {max_iters}")
    old = (cfg.get("train_cfg") or {}).get("max_iters")
    if not old:
        raise ValueError(f"{SCALE_SCHEDULE_KEY} needs an iteration-based train_cfg "
                         "(train_cfg.max_iters)")
    ratio = max_iters / float(old)
    changes: Dict[str, Tuple[Any, Any]] = {}

    def put(owner: Any, attr: str, key: str, value: Any) -> None:
        if _explicit(key, explicit) or owner.get(attr) == value:
            return
        changes[key] = (owner.get(attr), value)
        owner[attr] = value

    changes["train_cfg.max_iters"] = (old, max_iters)
    cfg.train_cfg.max_iters = max_iters
    if cfg.train_cfg.get("val_interval"):
        put(cfg.train_cfg, "val_interval", "train_cfg.val_interval",
            scale_count(cfg.train_cfg.val_interval, ratio))
    hooks = cfg.get("default_hooks") or {}
    for name in ("checkpoint", "logger"):
        hook = hooks.get(name)
        if isinstance(hook, dict) and hook.get("interval") and not hook.get("by_epoch", False):
            put(hook, "interval", f"default_hooks.{name}.interval",
                scale_count(hook["interval"], ratio))

    schedulers = cfg.get("param_scheduler") or []
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    if not _explicit("param_scheduler", explicit):
        for i, sched in enumerate(schedulers):
            if sched.get("by_epoch", True):
                continue
            key = f"param_scheduler.{i}"
            begin, end = sched.get("begin", 0), sched.get("end")
            new_begin = scale_count(begin, ratio, minimum=0)
            put(sched, "begin", f"{key}.begin", new_begin)
            new_end = None
            if end is not None and end < 2 ** 31:  # mmengine's "until the end" is INF
                # mmengine's LinearLR reaches end_factor at its last step, end - 1; over a
                # single step it never leaves start_factor: a shortened warm-up keeps two
                shortest = 2 if sched.get("type") in _LINEAR and end - begin >= 2 else 1
                new_end = max(max_iters if end >= old else scale_count(end, ratio),
                              new_begin + shortest)
                put(sched, "end", f"{key}.end", new_end)
            if sched.get("T_max"):
                spans = new_end is not None and sched["T_max"] == end - begin
                put(sched, "T_max", f"{key}.T_max",
                    new_end - new_begin if spans else scale_count(sched["T_max"], ratio))
            if sched.get("milestones"):
                put(sched, "milestones", f"{key}.milestones",
                    [scale_count(m, ratio) for m in sched["milestones"]])
    return changes
