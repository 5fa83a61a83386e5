"""Data-file primitives shared by the readers of ``demjax.data``: the ``Pool`` a
loader returns, reading a file's bytes with a one-line error, and one-line
exception text."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from demjax.errors import DataFileError


@dataclasses.dataclass(frozen=True)
class Pool:
    """A whole data set as one pool, before standardization.

    Attributes:
      x: float32 ``[N, *F]`` inputs scaled to [0, 1].
      y: int32 ``[N]`` labels in ``[0, num_classes)``.
      num_classes: C.
      num_train: rows ``[0, num_train)`` come from the data set's train split,
        the rest from its test split; ``N`` when it has no test split (digits).
      files: the files read (for the dataset card's checksums); empty for
        data held by a library (digits, tfds).
      groups: int32 ``[N]`` natural owner (writer) of each sample, or None.
      group_names: the owner names, ``group_names[groups[i]]``, or None.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    num_train: int
    files: tuple[str, ...] = ()
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``.

    Raises:
      DataFileError: the file cannot be read (missing, a directory, no
        permission); the one-line message names the file.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataFileError(f"{path} cannot be read: {one_line(e)}") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line, at most ``limit`` characters."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
