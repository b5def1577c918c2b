"""The documents some commands write besides their table (``--markdown``, ``--plot``):
checked before any work is done, written with a one-line error if the write still fails."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def output_problem(path: Optional[str], option: str, example: str,
                   sources: Sequence[Optional[str]] = (), replaced: bool = False) -> Optional[str]:
    """Why ``path`` cannot take an output file, or None
    (:func:`rest_dense.utils.check_output_path`: the one rule; missing folders are created
    when the file is written).

    Args:
        path: the file the command will write (None: nothing to check).
        option: the option that named it (``'--markdown'``), for the message.
        example: a file name for the message when ``path`` is a folder.
        sources: files the command reads, which ``path`` must not be.
        replaced: the file is staged and renamed onto ``path`` (see
            :func:`rest_dense.utils.check_output_path`).
    """
    if path is None:
        return None
    from ..utils import check_output_path

    try:
        check_output_path(path, option, sources, example=example, replaced=replaced)
    except ValueError as e:
        return str(e)
    return None


def write_document(command: str, path: Optional[str], text: str,
                   option: str = "--markdown") -> int:
    """Write ``text`` to ``path`` (if given); 0, or 2 after a one-line error naming
    ``option`` (what the command printed is on stdout already)."""
    if not path:
        return 0
    from ..utils import make_parent_folder

    try:
        with open(make_parent_folder(path), "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        print(f"rest-dense {command}: error: {option}: cannot write {path!r}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
