"""Read image sets in the common medical formats and convert them to a model's input.

A source is a folder (read recursively, hidden files and folders left out) or one file. Formats,
chosen by file suffix (case-insensitive):

- PNG, JPEG, TIFF (``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff``) through Pillow: 8-bit and
  16-bit grayscale, RGB, and 32-bit integer or float TIFF; every page of a multi-page TIFF.
- DICOM (``.dcm``, ``.dicom``, or no suffix) through pydicom: the modality LUT (rescale slope
  and intercept) is applied, MONOCHROME1 images are inverted, and every frame of a multi-frame
  file becomes one image.
- NIfTI (``.nii``, ``.nii.gz``) through nibabel, with the header's scaling applied: a 2-D image,
  or the 2-D slices of a 3-D volume along a chosen axis.
- npz: the ``images`` array, shape (N, H, W) or (N, H, W, C) with C = 1 or 3.

:func:`read_image_set` returns each image with its native pixel values.
:func:`to_model_input` then converts them, one recorded step at a time, to float tensors in
[-1, 1] with the model's channels and size:

1. intensity to [0, 1]: 8-bit integers divided by 255 and 16-bit integers by 65535. Other
   values (DICOM after rescaling, NIfTI, float or 32-bit images) are windowed per image, either
   minimum to 0 and maximum to 1 (``"minmax"``), or two percentiles to 0 and 1 with clipping
   (``"percentile"``);
2. channels: a gray image is repeated for a 3-channel model, and an RGB image becomes its
   luminance (ITU-R BT.601 weights, as Pillow's ``convert("L")``) for a 1-channel model;
3. size: ``"pad"`` repeats the edge pixels around the centred image, as the project does for its
   own 28 px images in a 32 px model. ``"resize"`` crops the centre to the model's aspect ratio,
   then resizes with antialiased bilinear interpolation (which matches Pillow's ``BILINEAR``
   resize). ``"auto"`` pads an image that lacks at most a quarter of the model's side on each
   axis, and resizes any other;
4. ``2 x - 1`` maps [0, 1] to [-1, 1].
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom", "")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED = "PNG, JPEG, TIFF, DICOM (.dcm, .dicom or no suffix), NIfTI (.nii, .nii.gz) and npz"
WINDOWS = ("minmax", "percentile")
RESIZE_MODES = ("auto", "pad", "resize")
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G and B
PAD_LIMIT = 0.25  # "auto" pads when at most this share of the model's side is missing


class UnreadableImageError(ValueError):
    """A file that cannot be read as an image or contains no usable image; the message names the file."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(
            f"cannot read image {str(path)!r}: {reason}; replace or remove the file, or leave unreadable files "
            "out with skip_unreadable=True (--skip-unreadable on the command line)"
        )


@dataclass
class SourceImage:
    """One 2-D image as stored in its file."""

    name: str  # path relative to the source; "#frame=3", "#slice=12" or "#image=5" marks one image of a file
    file: Path
    pixels: np.ndarray  # (H, W) gray or (H, W, 3) RGB; uint8, uint16 or float64
    full_scale: float | None  # 255 or 65535 for 8- or 16-bit integers; None: windowed per image
    notes: tuple[str, ...] = ()  # what the reader did, such as "applied the DICOM modality LUT"


@dataclass
class ImageSet:
    """The images of one source and the files behind them."""

    source: Path
    images: list[SourceImage]
    files: list[Path]  # files that gave at least one image, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of files or images left out


def read_image_set(source: str | os.PathLike, *, nifti_axis: int = 2, skip_unreadable: bool = False) -> ImageSet:
    """Read every image of a folder (recursively) or of one file.

    Args:
        source: a folder, or one image, DICOM, NIfTI or npz file.
        nifti_axis: axis (0, 1 or 2) along which a 3-D NIfTI volume is cut into 2-D slices.
        skip_unreadable: leave out, with a warning, files that cannot be read or hold no usable
            image (unsupported type, corrupt, NaN or infinite pixels, a constant image). When
            false, the first such file raises :class:`UnreadableImageError`.

    A constant frame or slice of a multi-image file (such as a blank slice at the edge of a
    volume) is always left out with a warning, because windowing cannot map it to [0, 1].

    Raises:
        FileNotFoundError: ``source`` does not exist, or the folder contains no files.
        UnreadableImageError: a file cannot be read (unless ``skip_unreadable``).
        ValueError: no usable image is left, or ``nifti_axis`` is not 0, 1 or 2.
    """
    source = Path(source)
    if nifti_axis not in (0, 1, 2):
        raise ValueError(f"nifti_axis={nifti_axis} must be 0, 1 or 2, the axis along which 3-D volumes are cut into slices")
    if not source.exists():
        raise FileNotFoundError(f"image source {str(source)!r} not found; give a folder of images or one image file")
    paths = _list_files(source)

    images, files, skipped = [], [], []
    for path in paths:
        name = path.relative_to(source).as_posix() if source.is_dir() else path.name
        try:
            read = _usable_images(read_file(path, nifti_axis), name, path, skipped)
        except UnreadableImageError as error:
            if not skip_unreadable:
                raise
            log.warning("left out %s: %s", path, error.reason)
            skipped.append((name, error.reason))
            continue
        images.extend(read)
        files.append(path)

    if not images:
        raise ValueError(f"no usable image in {str(source)!r} ({len(skipped)} files or images left out); supported formats: {SUPPORTED}")
    log.info("read %d images from %d files in %s (%d left out)", len(images), len(files), source, len(skipped))
    return ImageSet(source, images, files, skipped)


def _list_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    paths = sorted(
        path for path in source.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts)
    )
    if not paths:
        raise FileNotFoundError(f"no files in {str(source)!r}; put the images ({SUPPORTED}) there")
    return paths


def _usable_images(read: list[tuple[str, np.ndarray, float | None, tuple[str, ...]]], name: str, path: Path,
                   skipped: list[tuple[str, str]]) -> list[SourceImage]:
    """Wrap the images of one file, rejecting non-finite pixels and dropping constant frames."""
    images = []
    for part, pixels, full_scale, notes in read:
        full_name = name + part
        if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
            raise UnreadableImageError(path, f"{int((~np.isfinite(pixels)).sum())} pixel values of {full_name} are NaN or infinite")
        if pixels.min() == pixels.max():
            reason = f"{full_name} is constant (every pixel {pixels.flat[0]}), so it carries nothing to attack"
            if len(read) == 1:
                raise UnreadableImageError(path, reason)
            log.warning("left out %s", reason)
            skipped.append((full_name, "constant image"))
            continue
        images.append(SourceImage(full_name, path, pixels, full_scale, notes))
    return images


def read_file(path: Path, nifti_axis: int = 2) -> list[tuple[str, np.ndarray, float | None, tuple[str, ...]]]:
    """Read the 2-D images of one file.

    Returns:
        One ``(name suffix, pixels, full scale, notes)`` per image, as in :class:`SourceImage`;
        the name suffix is empty for a file that contains one image.

    Raises:
        UnreadableImageError: unsupported type, or the file cannot be decoded.
    """
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, nifti_axis)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix in RASTER_SUFFIXES:
        return _read_raster(path)
    if suffix in DICOM_SUFFIXES:
        return _read_dicom(path)
    raise UnreadableImageError(path, f"unsupported file type {suffix!r}; supported: {SUPPORTED}")


def _numbered(kind: str, count: int, index: int) -> str:
    return "" if count == 1 else f"#{kind}={index}"


# PNG, JPEG and TIFF

def _read_raster(path: Path) -> list[tuple[str, np.ndarray, float | None, tuple[str, ...]]]:
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            frames = [_raster_pixels(frame, path) for frame in ImageSequence.Iterator(image)]
    except UnreadableImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImageError(path, f"{type(error).__name__}: {error}") from error
    return [(_numbered("frame", len(frames), i), *frame) for i, frame in enumerate(frames)]


def _raster_pixels(image, path: Path) -> tuple[np.ndarray, float | None, tuple[str, ...]]:
    """Return the native pixels of one Pillow frame, its full scale and what was converted."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), 65535.0, ()
    if mode in ("I", "F"):
        return np.asarray(image).astype(np.float64), None, ()
    if mode == "L":
        return np.asarray(image), 255.0, ()
    if mode == "RGB":
        # NOTE: Pillow 13 reads a 16-bit-per-channel RGB PNG as 8-bit RGB, so such files lose
        # their low 8 bits here; 16-bit grayscale files keep every bit.
        return np.asarray(image), 255.0, ()
    if mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L")), 255.0, (f"converted Pillow mode {mode} to 8-bit gray",)
    if mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB")), 255.0, (f"converted Pillow mode {mode} to RGB",)
    raise UnreadableImageError(path, f"Pillow image mode {mode!r} is not supported; save the image as 8- or 16-bit gray or 8-bit RGB")


# DICOM

def _read_dicom(path: Path) -> list[tuple[str, np.ndarray, float | None, tuple[str, ...]]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except InvalidDicomError as error:
        raise UnreadableImageError(path, "not a DICOM file (no 'DICM' marker in its header)") from error
    except (AttributeError, KeyError, ValueError, RuntimeError, NotImplementedError, OSError, EOFError) as error:
        raise UnreadableImageError(path, f"pydicom cannot decode its pixel data ({type(error).__name__}: {error})") from error

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels[np.newaxis]

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(pixels, dataset).astype(np.float64)
        notes = [_modality_note(dataset)]
        if photometric == "MONOCHROME1":
            # MONOCHROME1 shows its lowest value as white. Mirroring each frame within its own
            # range keeps the range and gives the usual orientation (higher means brighter).
            values = values.min(axis=(1, 2), keepdims=True) + values.max(axis=(1, 2), keepdims=True) - values
            notes.append("inverted MONOCHROME1 (lowest value shown as white) within each frame's range")
        full_scale = None
    elif photometric == "RGB" or photometric.startswith("YBR"):
        values = pixels
        notes = [] if photometric == "RGB" else [f"converted {photometric} to RGB (pydicom)"]
        full_scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(pixels.dtype)
        if full_scale is None:
            values = pixels.astype(np.float64)
    else:
        raise UnreadableImageError(path, f"photometric interpretation {photometric!r} is not supported; use MONOCHROME1, MONOCHROME2 or RGB")

    if frames > 1:
        notes.append(f"split {frames} frames into separate images")
    return [(_numbered("frame", frames, i), frame, full_scale, tuple(notes)) for i, frame in enumerate(values)]


def _modality_note(dataset) -> str:
    if "ModalityLUTSequence" in dataset:
        return "applied the DICOM modality LUT sequence"
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    return f"applied the DICOM rescale slope {slope:g} and intercept {intercept:g}"


# NIfTI

def _read_nifti(path: Path, axis: int) -> list[tuple[str, np.ndarray, float | None, tuple[str, ...]]]:
    import nibabel
    from nibabel.filebasedimages import ImageFileError

    try:
        volume = nibabel.load(path).get_fdata(dtype=np.float64)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
        raise UnreadableImageError(path, f"nibabel cannot read it ({type(error).__name__}: {error})") from error

    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    notes = ("applied the NIfTI header's scaling (scl_slope, scl_inter)",)
    if volume.ndim == 2:
        return [("", volume, None, notes)]
    if volume.ndim != 3:
        raise UnreadableImageError(path, f"the NIfTI image has shape {volume.shape}; expected a 2-D image or a 3-D volume, so extract one volume first")

    slices = np.moveaxis(volume, axis, 0)
    notes += (f"cut the {'x'.join(map(str, volume.shape))} volume into {len(slices)} slices along axis {axis}",)
    return [(_numbered("slice", len(slices), i), image, None, notes) for i, image in enumerate(slices)]


# npz

def _read_npz(path: Path) -> list[tuple[str, np.ndarray, float | None, tuple[str, ...]]]:
    from .data import load_npz_arrays

    try:
        images = load_npz_arrays(path, ("images",))["images"]
    except (KeyError, ValueError) as error:
        raise UnreadableImageError(path, str(error.args[0] if error.args else error)) from error

    if images.ndim == 2:
        images = images[np.newaxis]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise UnreadableImageError(path, f"its images array has shape {images.shape}; expected (N, H, W) gray or (N, H, W, 3) RGB")
    if images.dtype.kind not in "uif":
        raise UnreadableImageError(path, f"its images array has dtype {images.dtype}; expected integer or float pixel values")

    full_scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(images.dtype)
    if full_scale is None:
        images = images.astype(np.float64)
    return [(_numbered("image", len(images), i), image, full_scale, ()) for i, image in enumerate(images)]


# Conversion to the model's input

@dataclass(frozen=True)
class Preprocessing:
    """The model's input format and the choices that convert images to it."""

    channels: int  # 1 or 3
    height: int
    width: int
    window: str = "minmax"  # intensity windowing of images without a full scale: "minmax" or "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)  # percentiles mapped to 0 and 1 by the "percentile" window
    resize: str = "auto"  # "auto", "pad" or "resize"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"the model has {self.channels} input channels; only 1-channel (gray) and 3-channel (RGB) models are supported")
        if self.window not in WINDOWS:
            raise ValueError(f"window={self.window!r} is unknown; choose one of {WINDOWS}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r} is unknown; choose one of {RESIZE_MODES}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"percentiles={self.percentiles} must satisfy 0 <= low < high <= 100")

    def describe(self) -> dict:
        """Return the target format and options as plain values, for a YAML record."""
        return {"channels": self.channels, "height": self.height, "width": self.width, "window": self.window,
                "percentiles": list(self.percentiles), "resize": self.resize}


def to_model_input(images: list[SourceImage], preprocessing: Preprocessing) -> tuple[torch.Tensor, list[list[str]]]:
    """Convert images to the model's input, recording every step.

    Returns:
        float32 tensor (N, channels, height, width) with values in [-1, 1], and for each image
        the list of steps applied to it, the reader's notes first.

    Raises:
        ValueError: with ``resize="pad"``, an image larger than the model's size.
    """
    tensors, steps = [], []
    for image in images:
        unit, intensity = _to_unit_range(image, preprocessing)
        channels, channel_step = _to_channels(unit, preprocessing.channels)
        sized, size_steps = _to_size(channels, preprocessing, image.name)
        tensors.append(sized * 2.0 - 1.0)
        steps.append([*image.notes, intensity, *channel_step, *size_steps, "mapped [0, 1] to [-1, 1] by 2 x - 1"])
    return torch.stack(tensors), steps


def summarise_steps(steps: list[list[str]]) -> list[str]:
    """Return each distinct step once, in first-seen order, with the number of images it applied to."""
    counts = Counter(step for image_steps in steps for step in dict.fromkeys(image_steps))
    return [f"{step} ({count} of {len(steps)} images)" for step, count in counts.items()]


def _to_unit_range(image: SourceImage, preprocessing: Preprocessing) -> tuple[np.ndarray, str]:
    """Map native pixels to float32 in [0, 1]."""
    pixels = image.pixels
    if image.full_scale is not None:
        # float32 division, so that 8-bit pixels give exactly the values of data.to_model_tensor
        bits = 8 if image.full_scale == 255.0 else 16
        return pixels.astype(np.float32) / np.float32(image.full_scale), f"divided {bits}-bit values by {image.full_scale:g}"

    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    step = "windowed per image: minimum to 0, maximum to 1"
    if preprocessing.window == "percentile":
        p_low, p_high = np.percentile(values, preprocessing.percentiles)
        if p_high > p_low:
            low, high = float(p_low), float(p_high)
            step = f"windowed per image: percentile {preprocessing.percentiles[0]:g} to 0, percentile {preprocessing.percentiles[1]:g} to 1, clipped"
        else:
            step = "windowed per image: minimum to 0, maximum to 1 (the two percentiles were equal)"
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    return unit.astype(np.float32), step


def _to_channels(unit: np.ndarray, channels: int) -> tuple[torch.Tensor, list[str]]:
    """Return a (channels, H, W) tensor from a gray (H, W) or RGB (H, W, 3) array."""
    if unit.ndim == 2:
        gray = torch.from_numpy(unit).unsqueeze(0)
        if channels == 1:
            return gray, []
        return gray.repeat(3, 1, 1), ["repeated the gray channel 3 times"]

    rgb = torch.from_numpy(np.ascontiguousarray(unit.transpose(2, 0, 1)))
    if channels == 3:
        return rgb, []
    weights = torch.tensor(LUMINANCE, dtype=torch.float32).view(3, 1, 1)
    return (rgb * weights).sum(dim=0, keepdim=True), ["converted RGB to luminance 0.299 R + 0.587 G + 0.114 B"]


def _to_size(image: torch.Tensor, preprocessing: Preprocessing, name: str) -> tuple[torch.Tensor, list[str]]:
    """Pad or resize a (C, h, w) tensor to the model's (C, H, W)."""
    height, width = image.shape[1:]
    target_h, target_w = preprocessing.height, preprocessing.width
    if (height, width) == (target_h, target_w):
        return image, []

    fits = height <= target_h and width <= target_w
    close = target_h - height <= PAD_LIMIT * target_h and target_w - width <= PAD_LIMIT * target_w
    mode = preprocessing.resize
    if mode == "auto":
        mode = "pad" if fits and close else "resize"
    if mode == "pad":
        if not fits:
            raise ValueError(
                f"image {name!r} is {height}x{width} px, larger than the model's {target_h}x{target_w} px, so it cannot be "
                "padded; use resize='resize' (--resize resize) or crop the images"
            )
        return _pad(image, target_h, target_w), [f"padded {height}x{width} px to {target_h}x{target_w} px by repeating the edge pixels"]
    return _resize(image, target_h, target_w)


def _pad(image: torch.Tensor, target_h: int, target_w: int) -> torch.Tensor:
    """Centre the image and repeat its edge pixels outwards; an odd margin puts the extra pixel bottom and right."""
    pad_h, pad_w = target_h - image.shape[1], target_w - image.shape[2]
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    return torch.nn.functional.pad(image.unsqueeze(0), padding, mode="replicate")[0]


def _resize(image: torch.Tensor, target_h: int, target_w: int) -> tuple[torch.Tensor, list[str]]:
    """Crop the centre to the target aspect ratio, then resize with antialiased bilinear interpolation."""
    steps = []
    height, width = image.shape[1:]
    crop_h = min(height, round(width * target_h / target_w))
    crop_w = min(width, round(height * target_w / target_h))
    if (crop_h, crop_w) != (height, width):
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[:, top : top + crop_h, left : left + crop_w]
        steps.append(f"cropped the centre {crop_h}x{crop_w} px of {height}x{width} px to the model's aspect ratio")
    resized = torch.nn.functional.interpolate(image.unsqueeze(0), size=(target_h, target_w), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    steps.append(f"resized {crop_h}x{crop_w} px to {target_h}x{target_w} px (bilinear, antialiased)")
    return resized.clamp(0.0, 1.0), steps
