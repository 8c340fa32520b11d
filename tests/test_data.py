import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import synthetic_images
from fcre_utils import data


def test_edge_padding_keeps_pixels():
    images = synthetic_images(3)
    tensor = data.to_model_tensor(images, 32)
    assert tensor.shape == (3, 1, 32, 32)
    assert tensor.dtype == torch.float32
    restored = np.rint((tensor[:, 0, 2:30, 2:30].numpy() + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(restored, images)


def test_edge_padding_repeats_border():
    images = synthetic_images(2)
    tensor = data.to_model_tensor(images, 32)[:, 0]
    expected = np.pad(images, ((0, 0), (2, 2), (2, 2)), mode="edge") / 127.5 - 1
    np.testing.assert_allclose(tensor.numpy(), expected, atol=1e-6)


def test_value_range():
    images = np.array([[[0, 255], [128, 0]]], dtype=np.uint8)
    tensor = data.to_model_tensor(images, 2)
    assert tensor.min() == -1.0
    assert tensor.max() == 1.0


def test_larger_images_rejected():
    with pytest.raises(ValueError, match="exceed image_size=32"):
        data.to_model_tensor(np.zeros((1, 64, 64), np.uint8), 32)


def test_float_images_rejected():
    with pytest.raises(ValueError, match="expected uint8"):
        data.to_model_tensor(np.zeros((1, 28, 28), np.float32), 32)


def test_splits_disjoint_and_sized():
    hashes = data.content_hashes(synthetic_images(50))
    manifest = data.make_splits(hashes, 10, 30, 0.2, seed=3)
    members = manifest[manifest.member]
    nonmembers = manifest[~manifest.member]
    assert len(members) == 10
    assert len(nonmembers) == 30
    assert set(members.image_id).isdisjoint(nonmembers.image_id)
    assert (members.split == "calibration").sum() == 2
    assert (nonmembers.split == "calibration").sum() == 6


def test_splits_seeded():
    hashes = data.content_hashes(synthetic_images(50))
    first = data.make_splits(hashes, 10, 30, 0.2, seed=3)
    again = data.make_splits(hashes, 10, 30, 0.2, seed=3)
    other = data.make_splits(hashes, 10, 30, 0.2, seed=4)
    assert first.equals(again)
    assert not first.image_id.equals(other.image_id)


def test_split_larger_than_data_rejected():
    hashes = data.content_hashes(synthetic_images(20))
    with pytest.raises(ValueError, match="exceeds the 20 available images"):
        data.make_splits(hashes, 15, 10, 0.2, seed=0)


def test_empty_member_set_rejected():
    hashes = data.content_hashes(synthetic_images(20))
    with pytest.raises(ValueError, match="n_members=0"):
        data.make_splits(hashes, 0, 10, 0.2, seed=0)


def test_shared_content_rejected():
    hashes = data.content_hashes(synthetic_images(10))
    manifest = data.make_splits(hashes, 5, 5, 0.0, seed=0)
    manifest.loc[manifest.index[-1], "sha256"] = manifest.sha256.iloc[0]
    with pytest.raises(ValueError, match="both members and non-members"):
        data.check_manifest(manifest)


def test_duplicates_dropped():
    images = synthetic_images(5)
    doubled = np.concatenate([images, images[:2]])
    kept, labels = data.drop_duplicates(doubled, np.arange(7))
    assert len(kept) == 5
    np.testing.assert_array_equal(labels, np.arange(5))


def test_offline_union_file_read(tmp_path):
    np.savez(tmp_path / "pneumoniamnist_union_28.npz", images=synthetic_images(6), labels=np.arange(6))
    images, labels = data.load_medmnist("pneumoniamnist", 28, tmp_path)
    assert images.shape == (6, 28, 28)
    np.testing.assert_array_equal(labels, np.arange(6))


def test_official_file_concatenated(tmp_path):
    parts = {f"{s}_images": synthetic_images(3, seed=i) for i, s in enumerate(["train", "val", "test"])}
    labels = {f"{s}_labels": np.full((3, 1), i) for i, s in enumerate(["train", "val", "test"])}
    np.savez(tmp_path / "pneumoniamnist_64.npz", **{k: np.pad(v, ((0, 0), (18, 18), (18, 18))) for k, v in parts.items()}, **labels)
    images, read_labels = data.load_medmnist("pneumoniamnist", 64, tmp_path)
    assert images.shape == (9, 64, 64)
    np.testing.assert_array_equal(read_labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_data_dir_from_environment(tmp_path, monkeypatch):
    np.savez(tmp_path / "pneumoniamnist_union_28.npz", images=synthetic_images(4), labels=np.arange(4))
    monkeypatch.setenv(data.DATA_DIR_VARIABLE, str(tmp_path))
    images, _ = data.load_medmnist("pneumoniamnist", 28)
    assert len(images) == 4


def test_missing_data_dir_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="FCRE_DATA_DIR"):
        data.load_medmnist("pneumoniamnist", 28, tmp_path / "absent")


def test_offline_without_files_names_variable(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "medmnist", None)
    with pytest.raises(FileNotFoundError, match="FCRE_DATA_DIR"):
        data.load_medmnist("pneumoniamnist", 28, tmp_path)


def test_unsupported_size_rejected():
    with pytest.raises(ValueError, match="size 32 is not available"):
        data.load_medmnist("pneumoniamnist", 32)


def test_pickled_npz_rejected(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled objects are rejected"):
        data.load_npz_images(path)


def test_npz_without_images_key(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, pixels=synthetic_images(2))
    with pytest.raises(KeyError, match="has no array 'images'"):
        data.load_npz_images(path)


def test_image_folder_read(tmp_path):
    for i, image in enumerate(synthetic_images(3)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    images, names = data.load_image_folder(tmp_path)
    assert images.shape == (3, 28, 28)
    assert names == ["0.png", "1.png", "2.png"]


def test_truncated_image_named(tmp_path):
    Image.fromarray(synthetic_images(1)[0]).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image_folder(tmp_path)


def test_mixed_sizes_rejected(tmp_path):
    Image.fromarray(synthetic_images(1)[0]).save(tmp_path / "a.png")
    Image.fromarray(synthetic_images(1, size=32)[0]).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="mixed sizes"):
        data.load_image_folder(tmp_path)


@pytest.mark.skipif(not os.environ.get(data.DATA_DIR_VARIABLE), reason="FCRE_DATA_DIR not set")
def test_real_pneumoniamnist():
    images, labels = data.load_medmnist("pneumoniamnist", 28)
    assert images.shape == (5827, 28, 28)
    assert images.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}


def test_download_checks_md5(tmp_path):
    source = tmp_path / "source.npz"
    np.savez(source, images=synthetic_images(2))
    md5 = __import__("hashlib").md5(source.read_bytes()).hexdigest()
    target = data.download_file(source.as_uri(), tmp_path / "out" / "file.npz", md5)
    assert target.read_bytes() == source.read_bytes()


def test_download_bad_md5_discarded(tmp_path):
    source = tmp_path / "source.npz"
    np.savez(source, images=synthetic_images(2))
    with pytest.raises(ValueError, match="expected 0000"):
        data.download_file(source.as_uri(), tmp_path / "file.npz", "0000")
    assert list(tmp_path.iterdir()) == [source]


def test_download_failure_names_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match="FCRE_DATA_DIR"):
        data.download_file((tmp_path / "absent.npz").as_uri(), tmp_path / "file.npz", "0000")


def test_splits_ignore_file_order():
    hashes = data.content_hashes(synthetic_images(50))
    shuffled = hashes[np.random.default_rng(1).permutation(50)]
    first = data.make_splits(hashes, 10, 30, 0.2, seed=3)
    again = data.make_splits(shuffled, 10, 30, 0.2, seed=3)
    assert set(first.sha256[first.member]) == set(again.sha256[again.member])
    assert set(first.sha256[~first.member]) == set(again.sha256[~again.member])


def test_sixteen_bit_images_scaled(tmp_path):
    pixels = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    images, _ = data.load_image_folder(tmp_path)
    np.testing.assert_array_equal(images[0], np.rint(pixels / 257.0).astype(np.uint8))


def test_truncated_npz_named(tmp_path):
    path = tmp_path / "broken.npz"
    np.savez(path, images=synthetic_images(3))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="broken.npz.*truncated"):
        data.load_npz_images(path)


def test_control_disjoint_and_sized():
    hashes = np.array([f"{i:064x}" for i in range(30)])
    manifest = data.make_splits(hashes, 5, 10, 0.2, seed=1)
    control = data.draw_control(hashes, manifest, 5, seed=1)
    assert len(control) == 5
    assert not set(control.sha256) & set(manifest.sha256)
    assert list(control.sha256) == [hashes[i] for i in control.image_id]


def test_control_follows_seeded_ranking():
    hashes = np.array([f"{i:064x}" for i in range(30)])
    manifest = data.make_splits(hashes, 5, 10, 0.2, seed=1)
    control = data.draw_control(hashes, manifest, 5, seed=1)
    order = data.seeded_order(hashes, seed=1)
    assert list(control.image_id) == [int(i) for i in order[15:20]]


def test_control_larger_than_rest_rejected():
    hashes = np.array([f"{i:064x}" for i in range(20)])
    manifest = data.make_splits(hashes, 5, 10, 0.2, seed=1)
    with pytest.raises(ValueError, match="control set needs 6 images .* only 5 remain"):
        data.draw_control(hashes, manifest, 6, seed=1)
