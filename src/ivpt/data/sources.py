"""The real data at hand, decoded to arrays: Fashion-MNIST, PneumoniaMNIST, DTD-10 and CamVid.

Decoding is cached (keyed by the source file's sha256) under ``$IVPT_CACHE``; nothing is ever
written next to the data.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import ArrayDataset, DataError
from .paths import cache_dir, data_file, sha256_file

FASHION_MNIST_ENV = "IVPT_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot"]
PNEUMONIA_CLASSES = ["normal", "pneumonia"]
CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign-symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_IGNORE = 11


def _cached(name: str, source: Path, build) -> dict[str, np.ndarray]:
    path = cache_dir() / f"{name}-{sha256_file(source)[:16]}.npz"
    cached = load_npz_cache(path)
    if cached is not None:
        return cached
    arrays = build()
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def load_npz_cache(path: Path) -> dict[str, np.ndarray] | None:
    """A cache file's arrays, or None when it is missing or damaged (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        path.unlink(missing_ok=True)
        return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (as MNIST ships), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape}, file holds {body.size} values (truncated?)")
    return body.reshape(shape)


def fashion_mnist(root=None) -> dict[str, ArrayDataset]:
    root = Path(root or os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        paths = [root / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))]
        for p in paths:
            if not p.is_file():
                raise DataError(f"Fashion-MNIST file not found: {p} (install the Debian package "
                                f"dataset-fashion-mnist or set ${FASHION_MNIST_ENV})")
        out[split] = ArrayDataset(read_idx(paths[0]), read_idx(paths[1]), FASHION_MNIST_CLASSES)
    return out


def pneumonia_mnist(path=None) -> dict[str, ArrayDataset]:
    path = Path(path) if path else data_file("pneumoniamnist.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    out = {}
    for split in ("train", "val", "test"):
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in arrays:
                raise DataError(f"{path}: missing array {key!r}")
        out[split] = ArrayDataset(arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1), PNEUMONIA_CLASSES)
    return out


def _decode(data: bytes, where: str, mode: str = "RGB") -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert(mode) if mode else img.copy()
    except Exception as err:
        raise DataError(f"cannot decode image {where}: {err}") from err


def dtd10(path=None, size: int = 64) -> ArrayDataset:
    """All 1,200 DTD-10 images resized (whole image, VTAB-style) to size x size; no split of its own."""
    path = Path(path) if path else data_file("dtd10-256.tar.gz")

    def build():
        images, names = [], []
        with tarfile.open(path, "r:*") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) != 3 or parts[0] != "dtd10":
                    continue
                img = _decode(tar.extractfile(member).read(), f"{path}:{member.name}")
                images.append(np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.uint8))
                names.append(parts[1])
        if not images:
            raise DataError(f"{path}: no images in the layout dtd10/<class>/<image>")
        return {"images": np.stack(images), "class_of": np.array(names)}

    arrays = _cached(f"dtd10-{size}", path, build)
    classes = sorted(set(arrays["class_of"].tolist()))
    labels = np.array([classes.index(c) for c in arrays["class_of"]], dtype=np.int64)
    return ArrayDataset(arrays["images"], labels, classes)


def camvid(path=None) -> dict[str, dict[str, np.ndarray]]:
    """CamVid splits as arrays: images (N, H, W, 3), masks (N, H, W) with 11 = void (ignored)."""
    path = Path(path) if path else data_file("camvid-240x180.tar.gz")

    def build():
        files: dict[str, bytes] = {}
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    files[member.name] = tar.extractfile(member).read()
        out = {}
        for split in ("train", "val", "test"):
            listing = files.get(f"camvid/{split}.txt")
            if listing is None:
                raise DataError(f"{path}: list file camvid/{split}.txt missing")
            names = [n.strip() for n in listing.decode().splitlines() if n.strip()]
            images, masks = [], []
            for name in names:
                for key in (f"camvid/{split}/{name}", f"camvid/{split}annot/{name}"):
                    if key not in files:
                        raise DataError(f"{path}: {key} is listed in camvid/{split}.txt but missing")
                images.append(np.asarray(_decode(files[f"camvid/{split}/{name}"], name), dtype=np.uint8))
                mask = np.asarray(_decode(files[f"camvid/{split}annot/{name}"], name, mode=None))
                if mask.ndim != 2 or mask.max() > CAMVID_IGNORE:
                    raise DataError(f"{path}: mask {split}annot/{name} is not a label map with values 0..11")
                masks.append(mask.astype(np.uint8))
            out[f"{split}_images"], out[f"{split}_masks"] = np.stack(images), np.stack(masks)
            out[f"{split}_names"] = np.array(names)
        return out

    arrays = _cached("camvid", path, build)
    return {s: {k: arrays[f"{s}_{k}"] for k in ("images", "masks", "names")} for s in ("train", "val", "test")}
