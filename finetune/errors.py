"""The errors the command line reports in one line: the user's (exit 2) and the storage's (exit 1)."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError


class UserError(Exception):
    """A problem with the user's recipe, data or arguments: reported in one line, exit status 2."""


def path_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why `path` is not the file (or folder) asked for, or None when it is."""
    path = Path(path)
    if not path.exists():
        return "not found"
    if folder and not path.is_dir():
        return "is a file, not a folder"
    if not folder and not path.is_file():
        return "is a folder, not a file"
    return None


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """Storage errors raised while writing under `folder` name it when the library that raised them did not
    (numpy and Arrow leave the file name out), and safetensors' I/O errors become the OSError they wrap."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(folder)
        raise
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(folder)) from exc
