"""Data sets (read offline from torchvision's layout) and the device-resident, resumable loader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_fixtures import write_fake_cifar10, write_fake_cifar100, write_fake_svhn

from asbatch.config import DataConfig
from asbatch.data import DataNotFoundError, Dataset, DeviceLoader, load, load_for, loader_for, resolve_root, synthetic

# ------------------------------------------------------------------------------------------- data sets


def test_fake_cifar10_loads_exactly_the_written_pixels_and_labels(tmp_path: Path):
    written = write_fake_cifar10(tmp_path, n_train_per_batch=6, n_test=4)
    for split, n in (("train", 30), ("test", 4)):
        ds = load("cifar10", split, root=tmp_path)
        data, labels = written[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (n, 3, 32, 32)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert np.array_equal(ds.images.numpy(), data.reshape(n, 3, 32, 32))
        assert ds.num_classes == 10 and ds.name == "cifar10" and len(ds.mean) == len(ds.std) == 3
    # the channel layout, spelled out: pixel (c, h, w) of image i is data[i, c*1024 + h*32 + w]
    ds, (data, _) = load("cifar10", "train", root=tmp_path), written["train"]
    i = 13  # in data_batch_3: batches are concatenated in file order
    for c, h, w in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 0), (2, 31, 31)]:
        assert ds.images[i, c, h, w].item() == data[i, c * 1024 + h * 32 + w]


def test_fake_cifar100_loads_fine_labels(tmp_path: Path):
    written = write_fake_cifar100(tmp_path, n_train=10, n_test=5)
    for split in ("train", "test"):
        ds, (data, fine) = load("cifar100", split, root=tmp_path), written[split]
        assert np.array_equal(ds.images.numpy(), data.reshape(-1, 3, 32, 32))
        assert ds.labels.tolist() == fine.tolist() and ds.num_classes == 100
    ds = load("cifar100", "test", root=tmp_path)
    assert ds.images[2, 1, 3, 4].item() == written["test"][0][2, 1024 + 3 * 32 + 4]


def test_fake_svhn_transposes_to_nchw_and_maps_label_10_to_0(tmp_path: Path):
    written = write_fake_svhn(tmp_path, n_train=5, n_test=3)
    ds, (x, y) = load("svhn", "train", root=tmp_path), written["train"]
    assert ds.images.shape == (5, 3, 32, 32) and ds.num_classes == 10
    assert ds.images[3, 2, 10, 20].item() == x[10, 20, 2, 3]  # raw layout is H x W x C x N
    assert ds.labels.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]


@pytest.mark.parametrize("name,split,missing", [
    ("cifar10", "train", "cifar-10-batches-py/data_batch_1"),
    ("cifar10", "test", "cifar-10-batches-py/test_batch"),
    ("cifar100", "train", "cifar-100-python/train"),
    ("svhn", "test", "svhn/test_32x32.mat"),
])
def test_missing_files_raise_naming_the_path_and_the_download_command(tmp_path: Path, name, split, missing):
    with pytest.raises(DataNotFoundError) as info:
        load(name, split, root=tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / missing) in str(info.value)
    assert f"asbatch data download {name} --root {tmp_path}" in str(info.value)


def test_one_missing_cifar10_batch_is_named(tmp_path: Path):
    write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert load("cifar10", "test", root=tmp_path).images.shape[0] == 2
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        load("cifar10", "train", root=tmp_path)


def test_data_root_is_explicit_else_env_else_dot_data(tmp_path: Path, monkeypatch):
    write_fake_cifar10(tmp_path / "env", n_train_per_batch=2, n_test=3)
    monkeypatch.setenv("ASBATCH_DATA", str(tmp_path / "env"))
    assert len(load("cifar10", "test")) == 3
    assert resolve_root("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("ASBATCH_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_root() == Path("data")
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "data")):
        load("cifar10", "test")


def test_load_for_applies_the_subsets(tmp_path: Path):
    written = write_fake_cifar10(tmp_path, n_train_per_batch=4, n_test=6)
    config = DataConfig(name="cifar10", root=str(tmp_path), train_subset=7, test_subset=5)
    train, test = load_for(config, "train"), load_for(config, "test")
    assert len(train) == 7 and len(test) == 5
    assert np.array_equal(train.images.numpy(), written["train"][0][:7].reshape(7, 3, 32, 32))
    assert test.labels.tolist() == written["test"][1][:5].tolist()


def test_unknown_name_or_split_is_rejected():
    with pytest.raises(ValueError, match="unknown data set"):
        load("mnist", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load("digits", "val")


def test_digits_split_is_deterministic_disjoint_and_scaled_to_uint8():
    from sklearn.datasets import load_digits

    train, test = load("digits", "train"), load("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.num_classes == 10
    assert torch.equal(load("digits", "test").images, test.images)
    # train + test is exactly sklearn's set, each value v scaled to round(v * 255 / 16)
    raw = load_digits()
    scaled = np.vectorize(lambda v: round(v * 255 / 16))(raw.images).reshape(-1, 64)
    expected = sorted(map(tuple, np.column_stack([scaled, raw.target]).tolist()))
    ours = torch.cat([torch.cat([d.images.reshape(-1, 64).long(), d.labels[:, None]], 1) for d in (train, test)])
    assert sorted(map(tuple, ours.tolist())) == expected
    # normalisation stats come from the train split and are shared by the test split
    assert test.mean == train.mean and math.isclose(train.mean[0], train.images.double().mean().item() / 255)


def test_synthetic_is_deterministic_and_learnable():
    train, test = load("synthetic", "train"), load("synthetic", "test")
    assert train.images.shape == (1000, 3, 8, 8) and test.images.shape == (200, 3, 8, 8)
    assert torch.equal(load("synthetic", "train").images, train.images)
    assert not torch.equal(synthetic("test", seed=1).images, test.images)
    centroids = torch.stack([train.images[train.labels == c].float().mean(0) for c in range(10)])
    dists = torch.cdist(test.images.float().flatten(1), centroids.flatten(1))
    assert (dists.argmin(1) == test.labels).float().mean() > 0.95


# ------------------------------------------------------------------------------------------ the loader


def _random_dataset(n: int = 50, shape: tuple[int, int, int] = (3, 8, 8), seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return Dataset(images, torch.arange(n), n, (0.4, 0.5, 0.6)[:shape[0]], (0.2, 0.25, 0.3)[:shape[0]], "rand")


def _loader(ds: Dataset, batch: int = 8, **kw) -> DeviceLoader:
    kw = {"train": True, "augment": True, "seed": 3, "device": "cpu", **kw}
    return DeviceLoader(ds, batch, **kw)


def _batches(loader: DeviceLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start))


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_seed_and_epoch_give_identical_batches_and_epochs_differ():
    ds = _random_dataset()
    first = _batches(_loader(ds), 2)
    _assert_same(first, _batches(_loader(ds), 2))
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (8, 3, 8, 8)
    order = lambda bs: torch.cat([y for _, y in bs]).tolist()  # noqa: E731
    assert order(first) != order(_batches(_loader(ds), 3))
    assert order(first) != order(_batches(_loader(ds, seed=4), 2))


def test_resuming_mid_epoch_is_bit_identical_to_the_tail():
    loader = _loader(_random_dataset(shape=(3, 32, 32)))
    full = _batches(loader, 5)
    for k in (0, 1, 4, len(full)):
        _assert_same(_batches(loader, 5, k), full[k:])
    with pytest.raises(ValueError, match="start_step"):
        loader.epoch(5, len(full) + 1)


def test_without_augmentation_a_batch_is_the_normalised_images_in_permutation_order():
    ds = _random_dataset()
    loader = _loader(ds, augment=False)
    order = loader.plan(1).order
    assert sorted(order.tolist()) == list(range(50))
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    for step, (x, y) in enumerate(_batches(loader, 1)):
        idx = order[step * 8:(step + 1) * 8]
        assert torch.equal(y, ds.labels[idx])
        torch.testing.assert_close(x, (ds.images[idx].float() / 255 - mean) / std, rtol=0, atol=1e-6)


def _reference_crop_flip(image: torch.Tensor, top: int, left: int, flip: bool, pad: int) -> torch.Tensor:
    """Slow, obvious per-example crop of the zero-padded image, then flip."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    out = padded[:, top:top + h, left:left + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("shape,pad", [((3, 32, 32), 4), ((1, 8, 8), 1)])
def test_augmentation_is_a_crop_of_the_padded_image_then_a_flip(shape, pad):
    ds = _random_dataset(n=40, shape=shape)
    loader = _loader(ds, batch=10)
    assert loader.pad == pad
    plan = loader.plan(0)
    assert plan.flips.any() and not plan.flips.all() and (plan.offsets != pad).any()
    assert plan.offsets.min() >= 0 and plan.offsets.max() <= 2 * pad
    got = torch.cat([x for x, _ in _batches(loader, 0)])
    expected = torch.stack([_reference_crop_flip(ds.images[plan.order[j]], *plan.offsets[j].tolist(),
                                                 bool(plan.flips[j]), pad) for j in range(40)])
    torch.testing.assert_close(got, loader.normalize(expected), rtol=0, atol=0)


@pytest.mark.parametrize("train,drop_last", [(True, None), (True, False), (False, None)])
def test_rank_shards_concatenate_to_the_single_process_batch(train, drop_last):
    ds = _random_dataset(n=45)  # not a multiple of the batch: exercises the tail when it is kept
    kw = {"train": train, "drop_last": drop_last}
    single = _batches(_loader(ds, **kw), 7)
    ranks = [_batches(_loader(ds, rank=r, world_size=2, **kw), 7) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0][0][0].shape[0] == 4


def test_global_batch_must_divide_by_world_size():
    with pytest.raises(ValueError, match="divisible"):
        _loader(_random_dataset(), batch=10, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        _loader(_random_dataset(), batch=10, rank=2, world_size=2)


def test_training_drops_the_last_partial_batch_by_default():
    ds = _random_dataset(n=45)
    assert len(_loader(ds)) == 5 and len(_batches(_loader(ds), 0)) == 5
    assert len(_loader(ds, drop_last=False)) == 6
    assert _batches(_loader(ds, drop_last=False), 0)[-1][0].shape[0] == 5
    with pytest.raises(ValueError, match="no full global batch"):
        _loader(ds, batch=64)
    with pytest.raises(TypeError, match="epoch"):
        iter(_loader(ds))


def test_test_loader_is_reiterable_in_order_without_augmentation():
    ds = _random_dataset(n=45)
    loader = _loader(ds, batch=10, train=False, augment=True)
    assert len(loader) == 5
    first, second = list(loader), list(loader)
    _assert_same(first, second)
    assert [x.shape[0] for x, _ in first] == [10, 10, 10, 10, 5]
    assert torch.cat([y for _, y in first]).tolist() == list(range(45))
    torch.testing.assert_close(torch.cat([x for x, _ in first]), loader.normalize(ds.images), rtol=0, atol=0)


def test_loader_for_builds_train_and_test_loaders_from_the_config():
    config = DataConfig(name="synthetic", batch_size=64, test_batch_size=100, train_subset=300)
    train = loader_for(config, "train", seed=0, device="cpu", rank=1, world_size=2)
    test = loader_for(config, "test", seed=0, device="cpu")
    assert len(train) == 300 // 64 and not train.augment and train.local_batch_size == 32
    assert len(test) == 2 and not test.augment
    forced = loader_for(config.model_copy(update={"augment": True}), "train", seed=0, device="cpu")
    assert forced.augment
    # speed.channels_last: the same numbers, in NHWC memory order (made by normalize's cast, no extra op)
    nhwc = loader_for(config.model_copy(update={"augment": True}), "train", seed=0, device="cpu", channels_last=True)
    for (x, y), (x_nhwc, y_nhwc) in zip(forced.epoch(1), nhwc.epoch(1), strict=True):
        assert x.is_contiguous() and x_nhwc.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, x_nhwc) and torch.equal(y, y_nhwc)


def test_augmentation_defaults_on_for_cifar_only():
    from asbatch.data import default_augment

    assert [default_augment(DataConfig(name=n)) for n in ("cifar10", "cifar100", "svhn", "digits", "synthetic")] \
        == [True, True, False, False, False]
    assert default_augment(DataConfig(name="cifar10", augment=False)) is False


def test_fake_cifar_files_read_the_same_through_torchvision(tmp_path: Path, monkeypatch):
    """Cross-check the fixture format and our reader against torchvision's own CIFAR reader."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the fakes have other md5s
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    write_fake_cifar10(tmp_path, n_train_per_batch=3, n_test=4)
    write_fake_cifar100(tmp_path, n_train=5, n_test=4)
    for name, cls, n_classes in (("cifar10", tv_cifar.CIFAR10, 10), ("cifar100", tv_cifar.CIFAR100, 100)):
        for split in ("train", "test"):
            tv, ours = cls(str(tmp_path), train=split == "train", download=False), load(name, split, tmp_path)
            assert torch.equal(torch.from_numpy(tv.data).permute(0, 3, 1, 2), ours.images)  # tv keeps HWC
            assert tv.targets == ours.labels.tolist() and len(tv.classes) == n_classes
