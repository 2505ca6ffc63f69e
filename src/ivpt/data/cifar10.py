"""CIFAR-10 from the JPEG tar layout ``cifar10/{train,test}/<class>/NNNN.jpg``."""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .paths import cache_dir, sha256_file

SPLITS = ("train", "test")


@dataclass
class ImageArrays:
    """Decoded images (N, H, W, 3 uint8) with integer labels and the class names they index."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


def _decode_tar(path: Path) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            parts = Path(member.name).parts
            if len(parts) != 4 or parts[0] != "cifar10" or parts[1] not in SPLITS:
                raise ValueError(
                    f"{path}: member {member.name!r} does not follow the layout "
                    "cifar10/{train,test}/<class>/<file>.jpg"
                )
            data = tar.extractfile(member).read()
            try:
                with Image.open(io.BytesIO(data)) as img:
                    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except Exception as err:  # PIL raises several types for broken files
                raise ValueError(f"{path}: cannot decode image {member.name!r}: {err}") from err
            found[parts[1]].append((parts[2], parts[3], array))
    return found


def load_cifar10(tar_path: str | os.PathLike, use_cache: bool = True) -> dict[str, ImageArrays]:
    """Both splits as arrays. Decoding 60k JPEGs takes a while, so the result is cached by sha256."""
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"CIFAR-10 tar not found: {tar_path}")
    digest = sha256_file(tar_path)
    cache = cache_dir() / f"cifar10-{digest[:16]}.npz"
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                classes = [str(c) for c in z["classes"]]
                return {s: ImageArrays(z[f"{s}_images"], z[f"{s}_labels"], classes) for s in SPLITS}
        except (OSError, ValueError, KeyError, EOFError):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt from the tar
    found = _decode_tar(tar_path)
    classes = sorted({cls for items in found.values() for cls, _, _ in items})
    if not classes:
        raise ValueError(f"{tar_path}: no images found")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in SPLITS:
        items = sorted(found[split], key=lambda t: (t[0], t[1]))
        if not items:
            raise ValueError(f"{tar_path}: split {split!r} holds no images")
        shapes = {a.shape for _, _, a in items}
        if len(shapes) != 1:
            raise ValueError(f"{tar_path}: images of split {split!r} differ in size: {sorted(shapes)}")
        images = np.stack([a for _, _, a in items])
        labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
        out[split] = ImageArrays(images, labels, classes)
    if use_cache:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp.npz")  # per process: no two writers share it
        np.savez(tmp, classes=np.array(classes), **{f"{s}_images": out[s].images for s in SPLITS},
                 **{f"{s}_labels": out[s].labels for s in SPLITS})
        os.replace(tmp, cache)
    return out
