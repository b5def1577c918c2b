"""The documents some commands write besides their table (``--markdown``, ``--plot``):
checked before any work is done, written with a one-line error if the write still fails."""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional, Sequence


def output_problem(path: Optional[str], example: str,
                   sources: Sequence[Optional[str]] = ()) -> Optional[str]:
    """Why ``path`` cannot take an output file (its missing folders are created), or None.

    Args:
        path: the file the command will write (None: nothing to check).
        example: a file name for the message when ``path`` is a folder.
        sources: files the command reads, which ``path`` must not be
            (:func:`rest_dense.convert.check_destination`).
    """
    if not path:
        return None
    from ..convert import check_destination

    try:
        if not os.path.isdir(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        folder = check_destination(path, example=example, sources=sources)
        with tempfile.TemporaryFile(dir=folder):
            pass  # permissions alone do not tell (root, read-only or virtual file systems)
    except ValueError as e:
        return str(e)
    except OSError as e:
        return f"cannot write {path!r}: {e.strerror or e}"
    return None


def write_document(command: str, path: Optional[str], text: str,
                   option: str = "--markdown") -> int:
    """Write ``text`` to ``path`` (if given); 0, or 2 after a one-line error naming
    ``option`` (what the command printed is on stdout already)."""
    if not path:
        return 0
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        print(f"rest-dense {command}: error: {option}: cannot write {path!r}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
