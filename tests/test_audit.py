"""The audit: image files of every format, their conversion, checkpoints, the report and the CLI."""

import json
import logging
import subprocess
import sys

import nibabel
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from conftest import synthetic_images
from fcre_utils import __main__ as cli
from fcre_utils import audit, audit_report, data, image_files, metrics, models, runs, training
from fcre_utils.image_files import Preprocessing, UnreadableImageError, read_image_set, to_model_input
from fcre_utils.presets import resolve_params

# Attack settings that keep an end-to-end audit to seconds on a CPU.
FAST = {"timesteps": [20], "band_candidates": [[0.0, 1.5]], "lowpass_cutoffs": [0.5], "bootstrap_resamples": 20}
end_to_end = pytest.mark.slow  # tests that train or audit a model: tens of seconds on a busy CPU


def save_pngs(folder, images, prefix="image"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}{i:02d}.png")
    return folder


def write_dicom(path, frames, photometric="MONOCHROME2", slope=None, intercept=None):
    """Write uint16 pixels (H, W) or (frames, H, W) as an uncompressed DICOM file with pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = frames.shape[-2:]
    if frames.ndim == 3:
        dataset.NumberOfFrames = frames.shape[0]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    dataset.PixelData = frames.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)


def pixels_of(image_set):
    return [image.pixels for image in image_set.images]


# Reading each format

def test_png_8bit_values(tmp_path):
    images = synthetic_images(3)
    image_set = read_image_set(save_pngs(tmp_path, images))
    assert [image.name for image in image_set.images] == ["image00.png", "image01.png", "image02.png"]
    for read, written in zip(pixels_of(image_set), images):
        np.testing.assert_array_equal(read, written)
    assert image_set.images[0].full_scale == 255


def test_png_16bit_values(tmp_path):
    pixels = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 83)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    (image,) = read_image_set(tmp_path).images
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.full_scale == 65535
    tensor, _ = to_model_input([image], Preprocessing(1, 28, 28))
    np.testing.assert_allclose(tensor[0, 0].numpy(), pixels / 65535 * 2 - 1, atol=1e-6)


def test_jpeg_close_to_written(tmp_path):
    written = synthetic_images(1)[0]
    Image.fromarray(written).save(tmp_path / "scan.jpg", quality=95)
    (image,) = read_image_set(tmp_path).images
    assert image.pixels.shape == written.shape
    assert np.abs(image.pixels.astype(int) - written).mean() < 3


def test_tiff_8_and_16bit_values(tmp_path):
    eight = synthetic_images(1)[0]
    sixteen = eight.astype(np.uint16) * 257 + 3
    Image.fromarray(eight).save(tmp_path / "a8.tif")
    Image.fromarray(sixteen).save(tmp_path / "b16.tiff")
    first, second = read_image_set(tmp_path).images
    np.testing.assert_array_equal(first.pixels, eight)
    np.testing.assert_array_equal(second.pixels, sixteen)
    assert (first.full_scale, second.full_scale) == (255, 65535)


def test_tiff_pages_split(tmp_path):
    pages = [Image.fromarray(image) for image in synthetic_images(3)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    image_set = read_image_set(tmp_path)
    assert [image.name for image in image_set.images] == ["stack.tif#frame=0", "stack.tif#frame=1", "stack.tif#frame=2"]
    np.testing.assert_array_equal(image_set.images[2].pixels, synthetic_images(3)[2])


def test_dicom_rescale_applied(tmp_path):
    stored = synthetic_images(1)[0].astype(np.uint16) * 10
    write_dicom(tmp_path / "ct.dcm", stored, slope=2.0, intercept=-1024.0)
    (image,) = read_image_set(tmp_path).images
    np.testing.assert_array_equal(image.pixels, stored * 2.0 - 1024.0)
    assert image.full_scale is None
    assert "applied the DICOM rescale slope 2 and intercept -1024" in image.notes


def test_dicom_without_suffix_read(tmp_path):
    stored = synthetic_images(1)[0].astype(np.uint16)
    write_dicom(tmp_path / "IM0001", stored)
    (image,) = read_image_set(tmp_path).images
    np.testing.assert_array_equal(image.pixels, stored)


def test_dicom_monochrome1_inverted(tmp_path):
    stored = synthetic_images(1)[0].astype(np.uint16) + 100
    write_dicom(tmp_path / "cr.dcm", stored, photometric="MONOCHROME1", slope=1.0, intercept=0.0)
    (image,) = read_image_set(tmp_path).images
    np.testing.assert_array_equal(image.pixels, stored.min() + stored.max() - stored.astype(np.float64))
    tensor, _ = to_model_input([image], Preprocessing(1, 28, 28))
    assert tensor[0, 0].flatten().argmax() == torch.from_numpy(stored.astype(np.int64)).flatten().argmin()


def test_dicom_frames_split(tmp_path):
    frames = synthetic_images(3).astype(np.uint16) * 4
    write_dicom(tmp_path / "cine.dcm", frames, slope=0.5, intercept=10.0)
    image_set = read_image_set(tmp_path)
    assert [image.name for image in image_set.images] == ["cine.dcm#frame=0", "cine.dcm#frame=1", "cine.dcm#frame=2"]
    for image, frame in zip(image_set.images, frames):
        np.testing.assert_array_equal(image.pixels, frame * 0.5 + 10.0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_slices_along_axis(tmp_path, axis):
    volume = np.random.default_rng(axis).random((6, 7, 8)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "brain.nii.gz")
    image_set = read_image_set(tmp_path, nifti_axis=axis)
    assert len(image_set.images) == volume.shape[axis]
    assert image_set.images[3].name == "brain.nii.gz#slice=3"
    np.testing.assert_array_equal(image_set.images[3].pixels, volume.take(3, axis=axis))


def test_nifti_scaling_applied(tmp_path):
    raw = np.arange(5 * 6, dtype=np.int16).reshape(5, 6)
    image = nibabel.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(0.5, 3.0)
    nibabel.save(image, tmp_path / "slice.nii")
    (read,) = read_image_set(tmp_path).images
    np.testing.assert_allclose(read.pixels, raw * 0.5 + 3.0)


def test_nifti_blank_slices_left_out(tmp_path, caplog):
    volume = np.zeros((4, 5, 6), dtype=np.float32)
    volume[:, :, 2:4] = np.random.default_rng(0).random((4, 5, 2))
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii")
    with caplog.at_level(logging.WARNING):
        image_set = read_image_set(tmp_path)
    assert [image.name for image in image_set.images] == ["v.nii#slice=2", "v.nii#slice=3"]
    assert ("v.nii#slice=0", "constant image") in image_set.skipped
    assert "v.nii#slice=5" in caplog.text


def test_nifti_4d_rejected(tmp_path):
    nibabel.save(nibabel.Nifti1Image(np.random.default_rng(0).random((4, 5, 6, 2)).astype(np.float32), np.eye(4)), tmp_path / "fmri.nii.gz")
    with pytest.raises(UnreadableImageError, match=r"fmri.nii.gz.*shape \(4, 5, 6, 2\); expected a 2-D image or a 3-D volume"):
        read_image_set(tmp_path)


def test_npz_gray_and_rgb(tmp_path):
    gray = synthetic_images(4)
    rgb = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    np.savez(tmp_path / "gray.npz", images=gray)
    np.savez(tmp_path / "rgb.npz", images=rgb)
    image_set = read_image_set(tmp_path)
    assert len(image_set.images) == 8
    assert image_set.images[1].name == "gray.npz#image=1"
    np.testing.assert_array_equal(image_set.images[1].pixels, gray[1])
    np.testing.assert_array_equal(image_set.images[6].pixels, rgb[2])


def test_npz_file_as_source(tmp_path):
    images = synthetic_images(3).astype(np.float32) / 255
    np.savez(tmp_path / "set.npz", images=images)
    image_set = read_image_set(tmp_path / "set.npz")
    assert [image.name for image in image_set.images] == ["set.npz#image=0", "set.npz#image=1", "set.npz#image=2"]
    assert image_set.images[0].full_scale is None


def test_folder_recursive_hidden_skipped(tmp_path):
    save_pngs(tmp_path / "patient1", synthetic_images(1))
    save_pngs(tmp_path / ".cache", synthetic_images(1))
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    image_set = read_image_set(tmp_path)
    assert [image.name for image in image_set.images] == ["patient1/image00.png"]


# Unreadable files

def test_unreadable_file_named(tmp_path):
    save_pngs(tmp_path, synthetic_images(2))
    (tmp_path / "broken.png").write_bytes((tmp_path / "image00.png").read_bytes()[:60])
    with pytest.raises(UnreadableImageError) as error:
        read_image_set(tmp_path)
    assert "broken.png" in str(error.value)
    assert "skip_unreadable=True" in str(error.value)


def test_unreadable_file_skipped(tmp_path, caplog):
    save_pngs(tmp_path, synthetic_images(2))
    (tmp_path / "broken.png").write_bytes((tmp_path / "image00.png").read_bytes()[:60])
    with caplog.at_level(logging.WARNING):
        image_set = read_image_set(tmp_path, skip_unreadable=True)
    assert len(image_set.images) == 2
    assert [name for name, _ in image_set.skipped] == ["broken.png"]
    assert "broken.png" in caplog.text


def test_unsupported_type_named(tmp_path):
    save_pngs(tmp_path, synthetic_images(1))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UnreadableImageError, match="notes.txt.*unsupported file type '.txt'"):
        read_image_set(tmp_path)


def test_non_dicom_without_suffix(tmp_path):
    (tmp_path / "README").write_text("not an image")
    with pytest.raises(UnreadableImageError, match="README.*not a DICOM file"):
        read_image_set(tmp_path)


def test_constant_image_named(tmp_path):
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(UnreadableImageError, match="blank.png.*constant"):
        read_image_set(tmp_path)


def test_nan_pixels_named(tmp_path):
    images = synthetic_images(2).astype(np.float32)
    images[1, 3, 4] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    with pytest.raises(UnreadableImageError, match=r"nan.npz.*1 pixel values of nan.npz#image=1 are NaN"):
        read_image_set(tmp_path)


def test_empty_folder_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files in"):
        read_image_set(tmp_path)


def test_missing_source_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*absent' not found"):
        read_image_set(tmp_path / "absent")


# Conversion to the model's input

def test_pad_matches_project_pipeline(tmp_path):
    images = synthetic_images(4)
    image_set = read_image_set(save_pngs(tmp_path, images))
    tensor, steps = to_model_input(image_set.images, Preprocessing(1, 32, 32))
    assert torch.equal(tensor, data.to_model_tensor(images, 32))
    assert "padded 28x28 px to 32x32 px by repeating the edge pixels" in steps[0]


def test_resize_matches_pillow(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "wide.png")
    tensor, steps = to_model_input(read_image_set(tmp_path).images, Preprocessing(1, 32, 32))
    centre = Image.fromarray(image[:, 8:56].astype(np.float32) / 255, mode="F")
    expected = np.asarray(centre.resize((32, 32), Image.Resampling.BILINEAR)) * 2 - 1
    np.testing.assert_allclose(tensor[0, 0].numpy(), expected, atol=1e-5)
    assert steps[0][1:3] == ["cropped the centre 48x48 px of 48x64 px to the model's aspect ratio",
                             "resized 48x48 px to 32x32 px (bilinear, antialiased)"]


def test_auto_resizes_small_images(tmp_path):
    save_pngs(tmp_path, synthetic_images(1, size=16))
    _, steps = to_model_input(read_image_set(tmp_path).images, Preprocessing(1, 32, 32))
    assert "resized 16x16 px to 32x32 px (bilinear, antialiased)" in steps[0]


def test_pad_rejects_larger_image(tmp_path):
    save_pngs(tmp_path, synthetic_images(1, size=40))
    with pytest.raises(ValueError, match="'image00.png' is 40x40 px, larger than the model's 32x32 px"):
        to_model_input(read_image_set(tmp_path).images, Preprocessing(1, 32, 32, resize="pad"))


def test_gray_repeated_for_rgb_model(tmp_path):
    tensor, steps = to_model_input(read_image_set(save_pngs(tmp_path, synthetic_images(1))).images, Preprocessing(3, 28, 28))
    assert tensor.shape == (1, 3, 28, 28)
    assert torch.equal(tensor[0, 0], tensor[0, 2])
    assert "repeated the gray channel 3 times" in steps[0]


def test_rgb_luminance_matches_pillow(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    tensor, _ = to_model_input(read_image_set(tmp_path).images, Preprocessing(1, 28, 28))
    pillow = np.asarray(Image.fromarray(rgb).convert("L")) / 255 * 2 - 1
    np.testing.assert_allclose(tensor[0, 0].numpy(), pillow, atol=1.01 / 255)


def test_minmax_window(tmp_path):
    values = np.random.default_rng(0).normal(40.0, 300.0, (28, 28))
    np.savez(tmp_path / "ct.npz", images=values[np.newaxis])
    tensor, _ = to_model_input(read_image_set(tmp_path).images, Preprocessing(1, 28, 28))
    np.testing.assert_allclose(tensor[0, 0].numpy(), (values - values.min()) / np.ptp(values) * 2 - 1, atol=1e-6)


def test_percentile_window_clips(tmp_path):
    values = np.random.default_rng(0).normal(0.0, 1.0, (28, 28))
    np.savez(tmp_path / "mr.npz", images=values[np.newaxis])
    tensor, steps = to_model_input(read_image_set(tmp_path).images, Preprocessing(1, 28, 28, window="percentile", percentiles=(5, 95)))
    low, high = np.percentile(values, [5, 95])
    expected = np.clip((values - low) / (high - low), 0, 1) * 2 - 1
    np.testing.assert_allclose(tensor[0, 0].numpy(), expected, atol=1e-6)
    assert (tensor == -1).float().mean() == pytest.approx(0.05, abs=0.01)
    assert "percentile 5 to 0, percentile 95 to 1, clipped" in steps[0][0]


def test_unsupported_channel_count():
    with pytest.raises(ValueError, match="4 input channels"):
        Preprocessing(4, 32, 32)


# Manifests, duplicates and exported runs

def test_export_reproduces_run(npz_dataset, tmp_path):
    run_dir = tmp_path / "run"
    params = runs.start_run(run_dir, "smoke", {"dataset": str(npz_dataset)})
    runs.create_manifest(run_dir, params)
    run_manifest, run_images = runs.load_split_images(run_dir, params)

    folders = audit.export_run_images(run_dir, tmp_path / "export")
    sets = {is_member: read_image_set(folder) for is_member, folder in folders.items()}
    manifest, images, _ = audit.build_manifest(sets, Preprocessing(1, 32, 32), params.calibration_fraction, params.seed)
    assert list(manifest.sha256) == list(run_manifest.sha256)
    assert list(manifest.split) == list(run_manifest.split)
    assert list(manifest.member) == list(run_manifest.member)
    assert torch.equal(images, run_images)


def test_export_keeps_existing_folder(npz_dataset, tmp_path):
    run_dir = tmp_path / "run"
    runs.create_manifest(run_dir, runs.start_run(run_dir, "smoke", {"dataset": str(npz_dataset)}))
    save_pngs(tmp_path / "export" / "members", synthetic_images(1))
    with pytest.raises(FileExistsError, match="members' is not empty"):
        audit.export_run_images(run_dir, tmp_path / "export")


def test_split_ignores_file_order(tmp_path):
    images = synthetic_images(12)
    forward = read_image_set(save_pngs(tmp_path / "a", images))
    backward = read_image_set(save_pngs(tmp_path / "b", images[::-1]))
    others = read_image_set(save_pngs(tmp_path / "n", synthetic_images(8, seed=5)))
    first, _, _ = audit.build_manifest({True: forward, False: others}, Preprocessing(1, 32, 32), 0.25, seed=3)
    again, _, _ = audit.build_manifest({True: backward, False: others}, Preprocessing(1, 32, 32), 0.25, seed=3)
    assert list(first.sha256) == list(again.sha256)
    assert (first.split[first.member] == "calibration").sum() == 3


def test_image_in_both_sets_named(tmp_path):
    images = synthetic_images(6)
    members = read_image_set(save_pngs(tmp_path / "m", images[:4], prefix="m"))
    nonmembers = read_image_set(save_pngs(tmp_path / "n", images[3:], prefix="n"))
    with pytest.raises(ValueError, match="the member 'm03.png' and the non-member 'n00.png'"):
        audit.build_manifest({True: members, False: nonmembers}, Preprocessing(1, 32, 32), 0.5, seed=0)


def test_duplicate_in_one_set_named(tmp_path):
    images = synthetic_images(3)
    members = read_image_set(save_pngs(tmp_path / "m", np.concatenate([images, images[:1]])))
    others = read_image_set(save_pngs(tmp_path / "n", synthetic_images(4, seed=9)))
    with pytest.raises(ValueError, match="'image00.png' and 'image03.png' in the member set have identical pixels"):
        audit.build_manifest({True: members, False: others}, Preprocessing(1, 32, 32), 0.5, seed=0)


def test_small_split_rejected():
    with pytest.raises(ValueError, match="the member set has 5 images.*puts 1 of them in the calibration split"):
        audit.check_split_sizes("member", 5, 0.25)


# Checkpoints

@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A tiny 3-channel UNet trained one epoch, saved as a UNet2DModel folder with its scheduler config."""
    params = resolve_params("smoke", {"epochs": 1})
    gray = synthetic_images(8, size=32, seed=4)
    rgb = np.stack([gray, np.roll(gray, 3, axis=1), 255 - gray], axis=-1)
    images = torch.from_numpy(rgb.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    unet = models.build_unet(params, in_channels=3)
    scheduler = models.build_scheduler(params)
    root = tmp_path_factory.mktemp("rgb")
    trained, _ = training.train_ddpm(unet, scheduler, images, params, root / "pipeline")
    unet_dir = root / "unet_only"
    trained.save_pretrained(unet_dir, safe_serialization=True)
    scheduler.save_config(unet_dir)
    return unet_dir, rgb


def test_unet_folder_loaded(rgb_model):
    unet_dir, _ = rgb_model
    unet, scheduler, paths = models.load_checkpoint(unet_dir)
    assert unet.config.in_channels == 3
    assert paths["scheduler"] == unet_dir / "scheduler_config.json"
    assert len(scheduler.alphas_cumprod) == 1000


def test_unet_folder_needs_scheduler(rgb_model, tmp_path):
    unet_dir, _ = rgb_model
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (bare / name).write_bytes((unet_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no scheduler config found.*--scheduler"):
        models.load_checkpoint(bare)
    _, scheduler, _ = models.load_checkpoint(bare, unet_dir / "scheduler_config.json")
    assert scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_predictions_rejected(rgb_model, tmp_path, prediction_type):
    unet_dir, _ = rgb_model
    DDPMScheduler(prediction_type=prediction_type).save_config(tmp_path)
    with pytest.raises(ValueError, match=f"prediction_type is '{prediction_type}'; the attacks support epsilon prediction only"):
        models.load_checkpoint(unet_dir, tmp_path)


def test_conditional_unet_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 64}))
    with pytest.raises(ValueError, match="describes a UNet2DConditionModel; only unconditional UNet2DModel"):
        models.load_checkpoint(tmp_path)


def test_folder_without_model_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="is neither a DDPMPipeline folder .* nor a UNet2DModel folder"):
        models.load_checkpoint(tmp_path)


def test_missing_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder '.*nowhere' not found"):
        models.load_checkpoint(tmp_path / "nowhere")


# Reports

@pytest.fixture(scope="module")
def gray_audit(tiny_model, tmp_path_factory):
    """An audit of the tiny grayscale model: 12 of its training images against 12 unseen ones."""
    _, _, model_dir, _ = tiny_model
    root = tmp_path_factory.mktemp("audit")
    members = save_pngs(root / "members", synthetic_images(24, seed=1)[:12], prefix="m")
    nonmembers = save_pngs(root / "nonmembers", synthetic_images(12, seed=2), prefix="n")
    report = audit.audit(model_dir, members, nonmembers, calibration_fraction=0.5, out=root / "report",
                         preset="smoke", overrides=FAST, attacks=["fcre_*", "pia"])
    return report, model_dir, members, nonmembers


@end_to_end
def test_report_files_written(gray_audit):
    report, *_ = gray_audit
    for name in ("report.md", "report.html", "metrics.csv", "metrics.md", "scores.csv", "selection.csv", "manifest.csv",
                 "most_exposed.csv", "preprocessing.yaml", "inputs.yaml", "figures/roc.png",
                 "figures/score_histograms.png", "figures/most_exposed.png"):
        assert (report.out_dir / name).is_file(), name


@end_to_end
def test_report_metrics_match_attack_table(gray_audit):
    report, *_ = gray_audit
    scores = pd.read_csv(report.out_dir / "scores.csv")
    written = pd.read_csv(report.out_dir / "metrics.csv")
    recomputed = metrics.attack_table(scores, FAST["bootstrap_resamples"], report.params.seed)
    pd.testing.assert_frame_equal(written, recomputed, check_exact=False, rtol=1e-12)


@end_to_end
def test_report_attacks_filtered(gray_audit):
    report, *_ = gray_audit
    expected = {"pia", *(f"fcre_{m}_{p}" for m in ("ssim", "l2", "l2_ssim") for p in ("x0", "residual"))}
    assert set(report.table.attack) == expected
    assert set(pd.read_csv(report.out_dir / "scores.csv").attack) == expected


@end_to_end
def test_report_scores_name_files(gray_audit):
    report, _, members, nonmembers = gray_audit
    scores = pd.read_csv(report.out_dir / "scores.csv")
    assert set(scores.file[scores.member]) == {p.name for p in members.iterdir()}
    assert set(scores.file[~scores.member]) == {p.name for p in nonmembers.iterdir()}
    assert not scores.duplicated(["file", "attack"]).any()


@end_to_end
def test_report_split_counts(gray_audit):
    report, *_ = gray_audit
    counts = report.manifest.groupby(["member", "split"]).size()
    assert counts.tolist() == [6, 6, 6, 6]


@end_to_end
def test_report_text_sections(gray_audit):
    report, *_ = gray_audit
    text = (report.out_dir / "report.md").read_text()
    assert report.summary in text
    assert "What this means for a patient" in text
    assert "- padded 28x28 px to 32x32 px by repeating the edge pixels (24 of 24 images)" in text
    html = (report.out_dir / "report.html").read_text()
    assert '<img src="figures/roc.png"' in html
    assert html.count("<table>") == 4


@end_to_end
def test_report_inputs_hashed(gray_audit):
    report, model_dir, members, _ = gray_audit
    record = yaml.safe_load((report.out_dir / "inputs.yaml").read_text())
    assert record["members"]["files"]["m00.png"] == data.file_sha256(members / "m00.png")
    assert record["model"]["files"]["unet/diffusion_pytorch_model.safetensors"] == data.file_sha256(
        model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    digest, _ = audit.folder_digest([model_dir], model_dir)
    assert record["model"]["sha256"] == digest
    assert record["parameters"]["timesteps"] == [20]


@end_to_end
def test_report_most_exposed_ranked(gray_audit):
    report, *_ = gray_audit
    exposed = pd.read_csv(report.out_dir / "most_exposed.csv")
    best = audit_report.strongest_attack(report.table)
    member_scores = report.scores[(report.scores.attack == best.attack) & report.scores.member]
    assert exposed.score.tolist() == sorted(member_scores.score, reverse=True)[: len(exposed)]
    assert exposed.flagged.tolist() == sorted(exposed.flagged, reverse=True)


@end_to_end
def test_report_folder_never_reused(gray_audit, tmp_path):
    report, model_dir, members, nonmembers = gray_audit
    with pytest.raises(FileExistsError, match="is not empty and is kept"):
        audit.audit(model_dir, members, nonmembers, out=report.out_dir)


@end_to_end
def test_rgb_audit_from_cli(rgb_model, tmp_path):
    unet_dir, rgb = rgb_model
    members = save_pngs(tmp_path / "members", rgb[:6])
    nonmembers = save_pngs(tmp_path / "nonmembers", np.stack([synthetic_images(6, size=32, seed=8)] * 3, axis=-1))
    command = [sys.executable, "-m", "fcre_utils", "audit", "--model", str(unet_dir), "--members", str(members),
               "--nonmembers", str(nonmembers), "--calibration-fraction", "0.5", "--preset", "smoke",
               "--out", str(tmp_path / "report"), "--attacks", "sima,pian", "fcre_l2_x0",
               *[f"--set={key}={json.dumps(value)}" for key, value in FAST.items()]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {tmp_path / 'report' / 'report.md'}" in result.stdout
    table = pd.read_csv(tmp_path / "report" / "metrics.csv")
    assert table.attack.tolist() == ["pian", "sima", "fcre_l2_x0"]
    assert "(12 of 12 images)" in (tmp_path / "report" / "preprocessing.yaml").read_text()


# Summary wording

def summary_table(tpr, low, fpr, auc_low):
    return pd.DataFrame([{
        "attack": "fcre_l2_x0", "setting": "t=50", "nfe": 10, "auc": 0.9, "auc_low": auc_low, "auc_high": 0.95,
        "tpr_at_1pct_fpr": tpr, "tpr_at_1pct_fpr_low": low, "tpr_at_1pct_fpr_high": 0.9, "tpr_at_0_1pct_fpr": tpr,
        "fpr_at_1pct_threshold": fpr, "n_members": 96, "n_nonmembers": 1050,
    }])


def test_summary_leak_above_chance():
    text = audit_report.risk_summary(summary_table(0.6, 0.5, 0.005, 0.8), calibration_nonmembers=350)
    assert text.startswith("**The model leaks membership.**")
    assert "about 60 in 100 patients" in text
    assert "about 60 times better than guessing" in text
    assert "fewer than the 100" not in text


def test_summary_chance_is_realised_fpr():
    text = audit_report.risk_summary(summary_table(0.2, 0.06, 0.11, 0.45), calibration_nonmembers=6)
    assert text.startswith("**This audit found no membership leak.**")
    assert "Random guessing with as many false accusations would find 11.0%" in text
    assert "The calibration split has 6 non-members" in text


def test_summary_average_leak_only():
    text = audit_report.risk_summary(summary_table(0.02, 0.0, 0.01, 0.6), calibration_nonmembers=350)
    assert text.startswith("**The model leaks membership on average")


def test_compare_with_run_interval():
    table = summary_table(0.6, 0.5, 0.005, 0.8).assign(asr=0.8, asr_low=0.7, asr_high=0.9, tpr_at_0_1pct_fpr_low=0.4,
                                                       tpr_at_0_1pct_fpr_high=0.7, tpr_at_1pct_fpr_high=0.7)
    run = table.assign(auc=0.85, auc_low=0.8, auc_high=0.88)
    comparison = audit.compare_with_run(table, run).set_index("metric")
    assert not comparison.loc["auc", "within"]
    assert comparison.loc["tpr_at_1pct_fpr", "within"]


# Command line errors (exit status 2 before any scoring)

def run_main(capsys, *args):
    status = cli.main(["audit", *map(str, args)])
    return status, capsys.readouterr().err


def test_cli_missing_model(capsys, tmp_path):
    save_pngs(tmp_path / "m", synthetic_images(2))
    status, message = run_main(capsys, "--model", tmp_path / "nowhere", "--members", tmp_path / "m", "--nonmembers", tmp_path / "m")
    assert status == 2
    assert "error: model folder" in message
    assert "nowhere' not found" in message


def test_cli_derived_override_rejected(capsys, tiny_model, tmp_path):
    _, _, model_dir, _ = tiny_model
    status, message = run_main(capsys, "--model", model_dir, "--members", tmp_path, "--nonmembers", tmp_path, "--set", "image_size=64")
    assert status == 2
    assert "error: --set image_size cannot be overridden" in message


def test_cli_unknown_attack(capsys, tiny_model, tmp_path):
    _, _, model_dir, _ = tiny_model
    status, message = run_main(capsys, "--model", model_dir, "--members", tmp_path, "--nonmembers", tmp_path, "--attacks", "lira")
    assert status == 2
    assert "error: --attacks 'lira' matches no attack" in message


def test_cli_unreadable_member_named(capsys, tiny_model, tmp_path):
    _, _, model_dir, _ = tiny_model
    members = save_pngs(tmp_path / "m", synthetic_images(8))
    (members / "scan07.dcm").write_bytes(b"\0" * 200)
    nonmembers = save_pngs(tmp_path / "n", synthetic_images(8, seed=3))
    status, message = run_main(capsys, "--model", model_dir, "--members", members, "--nonmembers", nonmembers)
    assert status == 2
    assert "scan07.dcm" in message
    assert "--skip-unreadable" in message


def test_cli_nonempty_out_kept(capsys, tiny_model, tmp_path):
    _, _, model_dir, _ = tiny_model
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("earlier report")
    status, message = run_main(capsys, "--model", model_dir, "--members", tmp_path, "--nonmembers", tmp_path, "--out", tmp_path / "out")
    assert status == 2
    assert "is not empty and is kept as it is" in message
    assert (tmp_path / "out" / "report.md").read_text() == "earlier report"


def test_cli_small_set_rejected(capsys, tiny_model, tmp_path):
    _, _, model_dir, _ = tiny_model
    members = save_pngs(tmp_path / "m", synthetic_images(3))
    nonmembers = save_pngs(tmp_path / "n", synthetic_images(8, seed=3))
    status, message = run_main(capsys, "--model", model_dir, "--members", members, "--nonmembers", nonmembers)
    assert status == 2
    assert "the member set has 3 images" in message


def test_cli_timesteps_beyond_schedule(capsys, tiny_model, tmp_path):
    _, _, model_dir, _ = tiny_model
    DDPMScheduler(num_train_timesteps=30).save_config(tmp_path / "short")
    members = save_pngs(tmp_path / "m", synthetic_images(8))
    nonmembers = save_pngs(tmp_path / "n", synthetic_images(8, seed=3))
    status, message = run_main(capsys, "--model", model_dir, "--scheduler", tmp_path / "short", "--members", members,
                               "--nonmembers", nonmembers, "--preset", "smoke")
    assert status == 2
    assert "timestep 40 in timesteps must be a positive multiple of ddim_stride=20 below 30" in message
    assert "the model's schedule has 30 timesteps" in message


def test_derived_override_ignored(tmp_path, caplog):
    sets = {True: read_image_set(save_pngs(tmp_path / "m", synthetic_images(8))),
            False: read_image_set(save_pngs(tmp_path / "n", synthetic_images(8, seed=3)))}
    with caplog.at_level(logging.WARNING):
        params = audit.audit_params("smoke", {"image_size": 64, "seed": 5}, Preprocessing(1, 32, 32), DDPMScheduler(), sets, 0.5)
    assert params.image_size == 32
    assert params.seed == 5
    assert "ignored the overrides ['image_size']" in caplog.text
