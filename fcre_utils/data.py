"""Images as float tensors in [-1, 1] of shape (N, 1, H, W), and member / non-member splits.

Sources:

- a MedMNIST 2-D dataset by name and resolution. It is read from a data directory, either the
  offline union file ``<name>_union_<size>.npz`` (``images``, ``labels``) or the official
  ``<name>[_<size>].npz`` (``train_images``, ``val_images``, ``test_images``). Otherwise it is
  downloaded from the address in the ``medmnist`` package's catalogue, checking its MD5 checksum;
- any npz file with an ``images`` array;
- a folder of PNG or JPEG files.

Folders and files of every format an audit accepts (PNG, JPEG, TIFF, DICOM, NIfTI, npz) are read
by :mod:`fcre_utils.image_files`, whose reader and converter are re-exported here.

Splits are seeded and written as a manifest: one row per image with its content hash (SHA-256 of
the stored pixels), its member flag and its split ("calibration" or "evaluation").
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .image_files import Preprocessing, read_image_set, to_model_input  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

DATA_DIR_VARIABLE = "FCRE_DATA_DIR"
DEFAULT_DOWNLOAD_DIR = Path.home() / ".medmnist"  # the medmnist package's own default
MEDMNIST_SIZES = (28, 64, 128, 224)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the data directory: ``data_dir`` if given, else ``$FCRE_DATA_DIR``, else None."""
    chosen = str(data_dir) if data_dir else os.environ.get(DATA_DIR_VARIABLE, "")
    if not chosen:
        return None

    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {str(path)!r} does not exist; set {DATA_DIR_VARIABLE} or the "
            "data_dir parameter to a folder that holds the dataset's npz files"
        )
    return path


def load_npz_images(path: str | os.PathLike, keys: tuple[str, ...] = ("images",)) -> np.ndarray:
    """Read and concatenate the arrays ``keys`` of an npz file, rejecting pickled objects.

    Returns:
        uint8 or float array of shape (N, H, W) or (N, H, W, C).
    """
    return np.concatenate(list(load_npz_arrays(path, keys).values()), axis=0)


def load_npz_arrays(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read the arrays ``keys`` of an npz file in one pass, rejecting pickled objects."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise KeyError(
                    f"{str(path)!r} has no array {missing[0]!r} (arrays: {archive.files}); "
                    f"expected the arrays {list(keys)}"
                )
            arrays = {key: archive[key] for key in keys}
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(
            f"cannot read {str(path)!r}: the file is truncated or not an npz file ({error}); "
            "download or save it again"
        ) from error
    except ValueError as error:
        raise ValueError(
            f"cannot read {str(path)!r} as a plain npz file ({error}); files containing pickled "
            "objects are rejected, so save the images as a numeric array with numpy.savez"
        ) from error

    return arrays


def _official_name(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _download_medmnist(name: str, size: int, root: Path) -> Path:
    """Download the official MedMNIST file named in the medmnist package's catalogue.

    The address and MD5 checksum come from ``medmnist.INFO``. The package's own downloader
    needs torchvision, which the pinned torch does not match, so the file is fetched here.
    """
    try:
        import medmnist
    except ImportError as error:
        raise FileNotFoundError(
            f"no {name} file of {size} px found and the medmnist package is not installed; "
            f"set {DATA_DIR_VARIABLE} to a folder holding {name}_union_{size}.npz or "
            f"{_official_name(name, size)}, or install medmnist to download it "
            "(pip install --no-deps medmnist)"
        ) from error

    info = medmnist.INFO.get(name)
    if info is None:
        raise KeyError(f"{name!r} is not a MedMNIST dataset; choose one of {sorted(medmnist.INFO)}")

    suffix = "" if size == 28 else f"_{size}"
    target = root / _official_name(name, size)
    log.info("downloading %s at %d px into %s", name, size, root)
    return download_file(info[f"url{suffix}"], target, info[f"MD5{suffix}"])


def download_file(url: str, target: Path, md5: str) -> Path:
    """Download ``url`` to ``target`` through a temporary file, checking its MD5 checksum.

    Raises:
        FileNotFoundError: the download failed (offline, or the address is gone).
        ValueError: the checksum does not match; nothing is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        urllib.request.urlretrieve(url, partial)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"the data file is not in {str(target.parent)!r} and its download from {url} failed "
            f"({error}); put {target.name} (or the offline union file) into that folder, or set "
            f"{DATA_DIR_VARIABLE} to a folder that contains it"
        ) from error

    digest = hashlib.md5(partial.read_bytes()).hexdigest()
    if digest != md5:
        partial.unlink()
        raise ValueError(f"download of {url} has MD5 {digest}, expected {md5}; the file was discarded, try again")
    os.replace(partial, target)
    return target


def locate_medmnist(name: str = "pneumoniamnist", size: int = 28, data_dir: str | os.PathLike | None = None) -> Path:
    """Find, or download, the npz file of a MedMNIST 2-D dataset and return its path.

    Look in the data directory (``data_dir``, else ``$FCRE_DATA_DIR``, else ``~/.medmnist``)
    for the offline union file, then for the official file. When neither is there and the
    medmnist package is installed, download the official file into that directory.
    """
    if size not in MEDMNIST_SIZES:
        raise ValueError(f"MedMNIST size {size} is not available; choose one of {MEDMNIST_SIZES}")

    root = find_data_dir(data_dir) or DEFAULT_DOWNLOAD_DIR
    union = root / f"{name}_union_{size}.npz"
    official = root / _official_name(name, size)
    if union.is_file():
        return union
    if official.is_file():
        return official
    return _download_medmnist(name, size, root)


def load_medmnist(
    name: str = "pneumoniamnist", size: int = 28, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load every image of a MedMNIST 2-D dataset, duplicates removed.

    The file is found as :func:`locate_medmnist` describes. The official file's train, val and
    test parts are concatenated in that order.

    Returns:
        images: uint8 array (N, size, size); labels: int array (N,).
    """
    return read_medmnist_file(locate_medmnist(name, size, data_dir))


def read_medmnist_file(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a union or official MedMNIST npz file; see :func:`load_medmnist`."""
    if "_union_" in source.name:
        image_keys, label_keys = ("images",), ("labels",)
    else:
        splits = ("train", "val", "test")
        image_keys = tuple(f"{s}_images" for s in splits)
        label_keys = tuple(f"{s}_labels" for s in splits)

    arrays = load_npz_arrays(source, image_keys + label_keys)
    images = np.concatenate([arrays[key] for key in image_keys])
    labels = np.concatenate([arrays[key] for key in label_keys]).reshape(-1)

    images, labels = drop_duplicates(images, labels)
    log.info("loaded %d unique images of %s px from %s", len(images), images.shape[1:], source)
    return images, labels


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def drop_duplicates(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first copy of every distinct image (by content hash)."""
    hashes = content_hashes(images)
    _, first = np.unique(hashes, return_index=True)
    keep = np.sort(first)
    if len(keep) < len(images):
        log.info("dropped %d duplicate images", len(images) - len(keep))
    return images[keep], labels[keep]


def load_image_folder(folder: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read every PNG or JPEG file of ``folder`` as an 8-bit grayscale image.

    Returns:
        images: uint8 array (N, H, W); names: the file names, sorted.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    visible = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    unsupported = sorted(p.name for p in visible if p.suffix.lower() not in IMAGE_SUFFIXES)
    if unsupported:
        raise ValueError(
            f"{str(folder)!r} contains files that are not PNG or JPEG ({', '.join(unsupported[:5])}); "
            "convert them to 8- or 16-bit PNG, or move them out of the folder"
        )
    files = sorted(visible)
    if not files:
        raise FileNotFoundError(f"no PNG or JPEG files in {str(folder)!r}")

    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                images.append(_to_uint8_gray(image, path))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {str(path)!r}: {error}; replace or remove it") from error

    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images in {str(folder)!r} have mixed sizes {sorted(shapes)}; resize them to one size"
        )
    stacked = np.stack(images)
    check_pixels(stacked, str(folder))
    return stacked, [p.name for p in files]


def check_finite(images: np.ndarray, source: str) -> None:
    """Raise ValueError if any pixel of a float array (N, ...) is NaN or infinite."""
    if images.dtype.kind != "f":
        return
    bad = ~np.isfinite(images)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(images), -1).any(axis=1))[0])
        raise ValueError(
            f"{int(bad.sum())} pixel values are NaN or infinite (first in image {first}) in "
            f"{source}; replace them or remove those images"
        )


def check_pixels(images: np.ndarray, source: str) -> None:
    """Raise ValueError if any pixel is NaN or infinite, or any image is constant.

    A constant image (every pixel equal) has no structure, so its reconstruction error says
    nothing about membership and its SSIM is undefined.
    """
    check_finite(images, source)
    flat = images.reshape(len(images), -1)
    constant = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1))
    if len(constant):
        raise ValueError(
            f"{len(constant)} images are constant (first image {int(constant[0])}, every pixel "
            f"{flat[constant[0], 0]}) in {source}; remove them, they carry nothing to attack"
        )


def _to_uint8_gray(image, path: Path) -> np.ndarray:
    """Convert a PIL image to 8-bit grayscale; 16-bit images are scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.int64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"image {str(path)!r} has pixel values outside 0..65535; convert it to 8 or 16 bit")
        return np.rint(pixels / 257.0).astype(np.uint8)
    if image.mode not in ("L", "1", "P"):
        log.warning("converted %s image %s to grayscale", image.mode, path.name)
    return np.asarray(image.convert("L"))


def content_hashes(images: np.ndarray) -> np.ndarray:
    """Return the SHA-256 hex digest of each image's stored pixels, shape (N,)."""
    return np.array([hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images])


def to_model_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """Convert 8-bit grayscale images to the model's input.

    Images smaller than ``image_size`` are padded by repeating their edge pixels (no
    interpolation, so no pixel value changes); larger ones raise ValueError.

    Args:
        images: uint8 array (N, H, W), H == W.
        image_size: side of the output images.

    Returns:
        float32 tensor (N, 1, image_size, image_size) with values in [-1, 1].
    """
    if images.ndim != 3:
        raise ValueError(
            f"expected images of shape (N, H, W), one grayscale channel without a channel axis, got shape {images.shape}; "
            "reshape or squeeze the array to (N, H, W)"
        )
    check_finite(images, "the images")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got dtype {images.dtype}; scale them to 0..255 and convert with .astype(np.uint8)")

    height, width = images.shape[1:]
    if height != width:
        log.warning("images are %dx%d px, not square; edge padding makes them %dx%d", height, width, image_size, image_size)
    if height > image_size or width > image_size:
        raise ValueError(
            f"images of {height}x{width} px exceed image_size={image_size}; "
            "raise image_size or use a MedMNIST source_size that is not larger"
        )

    pad_h, pad_w = image_size - height, image_size - width
    padding = ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
    padded = np.pad(images, padding, mode="edge")

    tensor = torch.from_numpy(padded.astype(np.float32)).unsqueeze(1)
    return tensor / 127.5 - 1.0


def make_splits(
    hashes: np.ndarray,
    n_members: int,
    n_nonmembers: int,
    calibration_fraction: float,
    seed: int,
) -> pd.DataFrame:
    """Draw disjoint member and non-member sets and split each into calibration and evaluation.

    The draw is a seeded ranking of the content hashes, so it does not depend on the order of
    the images.

    Args:
        hashes: content hash of each available image, shape (N,), all distinct.
        n_members, n_nonmembers: sizes of the two sets; together at most N.
        calibration_fraction: share of each set in the calibration split, in [0, 1).
        seed: seed of the random draw.

    Returns:
        The manifest: columns ``image_id`` (row in the source), ``sha256``, ``member`` (bool) and
        ``split`` ("calibration" or "evaluation"), members first.
    """
    n_total = len(hashes)
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(
            f"n_members={n_members} and n_nonmembers={n_nonmembers} must both be at least 1"
        )
    if n_members + n_nonmembers > n_total:
        raise ValueError(
            f"n_members + n_nonmembers = {n_members + n_nonmembers} exceeds the {n_total} "
            "available images; lower one of them"
        )
    if not 0.0 <= calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1), got {calibration_fraction}")
    if len(set(hashes)) != n_total:
        raise ValueError("the images contain duplicates; remove them before splitting")

    order = seeded_order(hashes, seed)
    rows = []
    for is_member, ids in ((True, order[:n_members]), (False, order[n_members : n_members + n_nonmembers])):
        n_calibration = int(round(calibration_fraction * len(ids)))
        for position, image_id in enumerate(ids):
            split = "calibration" if position < n_calibration else "evaluation"
            rows.append((int(image_id), hashes[image_id], is_member, split))

    manifest = pd.DataFrame(rows, columns=["image_id", "sha256", "member", "split"])
    check_manifest(manifest)
    return manifest


def seeded_order(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Return image indices ranked by a seeded hash of their content.

    The draw then depends only on the images and the seed, not on their order in the file, so
    two data files that share an image put it on the same side.
    """
    keys = [hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest() for digest in hashes]
    return np.argsort(keys, kind="stable")


def draw_control(hashes: np.ndarray, manifest: pd.DataFrame, n_control: int, seed: int) -> pd.DataFrame:
    """Draw a control set: images that are neither members nor non-members of ``manifest``.

    A model trained on the control set never saw a member, so every attack against it should
    score near chance. The images follow the manifest's draw in the same seeded ranking.

    Returns:
        Columns ``image_id`` and ``sha256``.
    """
    used = set(manifest.sha256)
    free = [int(i) for i in seeded_order(hashes, seed) if hashes[i] not in used]
    if n_control > len(free):
        raise ValueError(
            f"the control set needs {n_control} images (as many as n_members) but only {len(free)} remain "
            f"after the {len(manifest)} members and non-members; lower n_members or n_nonmembers, or set train_control=false"
        )
    ids = free[:n_control]
    return pd.DataFrame({"image_id": ids, "sha256": [hashes[i] for i in ids]})


def check_manifest(manifest: pd.DataFrame) -> None:
    """Raise ValueError if a content hash is both member and non-member or a set is empty."""
    members = set(manifest.loc[manifest.member, "sha256"])
    nonmembers = set(manifest.loc[~manifest.member, "sha256"])
    shared = members & nonmembers
    if shared:
        raise ValueError(
            f"{len(shared)} images are both members and non-members (first hash "
            f"{sorted(shared)[0][:12]}); remove the duplicates from the data"
        )

    for is_member, split in [(True, "evaluation"), (False, "evaluation")]:
        count = int(((manifest.member == is_member) & (manifest.split == split)).sum())
        if count == 0:
            side = "member" if is_member else "non-member"
            raise ValueError(f"the {split} split has no {side} images; enlarge that set")
