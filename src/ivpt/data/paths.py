"""Where ivpt finds the shared offline data and keeps its caches."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_ENV = "IVPT_DATA"
CACHE_ENV = "IVPT_CACHE"


def absolute_path(text: str | os.PathLike) -> str:
    """A path as a user typed it, with ``~`` expanded and made absolute against the working directory: how
    every path a run, a study or an evaluation records is written."""
    return str(Path(text).expanduser().resolve())


def data_root() -> Path:
    """The folder holding the offline data files.

    ``$IVPT_DATA`` wins; otherwise ``../shared/data`` seen from the current directory or from the
    repository this file lives in (the layout CI uses).
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    for parent in Path(__file__).resolve().parents:
        candidates.append(parent.parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return candidates[0]


def data_file(name: str) -> Path:
    """Path of one named file in the data root, with an error that says how to point at it."""
    path = data_root() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {name!r} not found at {path}; set ${DATA_ENV} to the folder that holds it"
        )
    return path


def cache_dir() -> Path:
    """Folder for derived caches (decoded arrays); never inside a user's data folder."""
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ivpt")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
