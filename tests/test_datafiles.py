"""The torch-free facts about each data set agree with what asbatch.data loads, and the presence check names
the first missing file in one line."""

from __future__ import annotations

import pytest
from cifar_fixtures import write_fake_cifar10, write_fake_cifar100, write_fake_svhn

from asbatch import data
from asbatch.datafiles import FACTS, DataMissingError, check_present, resolve_root
from asbatch.names import DATASETS


def test_every_data_set_has_its_facts():
    assert set(FACTS) == set(DATASETS)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_facts_of_the_built_in_sets_match_what_is_loaded(name):
    train = data.load(name, "train")
    assert (train.image_shape, train.num_classes, len(train)) == (
        FACTS[name].image_shape, FACTS[name].num_classes, FACTS[name].train_size)


@pytest.mark.parametrize(("name", "write"), [("cifar10", write_fake_cifar10), ("cifar100", write_fake_cifar100),
                                             ("svhn", write_fake_svhn)])
def test_facts_of_the_file_sets_match_their_files(name, write, tmp_path):
    with pytest.raises(DataMissingError) as missing:
        check_present([(name, "train", str(tmp_path))])
    first = tmp_path / FACTS[name].files["train"][0]
    assert str(missing.value).startswith(f"{name}: missing {first}") and "\n" not in str(missing.value)
    assert f"asbatch data download {name} --root {tmp_path}" in str(missing.value)
    write(tmp_path)
    check_present([(name, split, str(tmp_path)) for split in ("train", "test")])
    for split in ("train", "test"):
        loaded = data.load(name, split, tmp_path)
        assert (loaded.image_shape, loaded.num_classes) == (FACTS[name].image_shape, FACTS[name].num_classes)
    (tmp_path / FACTS[name].files["test"][-1]).unlink()
    with pytest.raises(DataMissingError, match=f"{name}: missing {tmp_path / FACTS[name].files['test'][-1]}"):
        check_present([(name, "test", str(tmp_path))])


def test_the_data_root_comes_from_the_config_then_the_environment_then_data(monkeypatch):
    assert resolve_root("/x", {"ASBATCH_DATA": "/y"}).as_posix() == "/x"
    assert resolve_root(None, {"ASBATCH_DATA": "/y"}).as_posix() == "/y"
    assert resolve_root(None, {"ASBATCH_DATA": ""}).as_posix() == "data"
    monkeypatch.setenv("ASBATCH_DATA", "/z")
    assert resolve_root(None).as_posix() == data.resolve_root(None).as_posix() == "/z"
