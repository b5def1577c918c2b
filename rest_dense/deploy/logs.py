"""Keeping the frameworks' log and warning noise out of the deployment tools' output."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

__all__ = ["quiet_logs"]


@contextlib.contextmanager
def quiet_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Silence mmengine / MMDeploy / detectron2 loggers, Python warnings and what the
    frameworks print to stdout (mmengine prints a checkpoint's whole key mismatch there,
    before our own one-line check names the problem) for a while."""
    names = ["mmengine", "mmdeploy", "detectron2", "fvcore", "d2"]
    loggers = [logging.getLogger(n) for n in names]
    try:
        from mmengine.logging import MMLogger

        loggers += list(MMLogger._instance_dict.values())
    except Exception:  # mmengine absent (detectron2 only)
        pass
    old = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in old:
            lg.setLevel(lvl)
