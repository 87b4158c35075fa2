"""The dataset loaders of kd/data/datasets.py, run on small files written in each dataset's real on-disk format."""
import gzip
import hashlib
import pickle
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

import kd.data.datasets
from kd.config import AugmentConfig, DataConfig
from kd.data.datasets import DATASETS, build_data, eval_loaders, train_loader
from kd.errors import ConfigError, KDError

CIFAR_NORM = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
FMNIST_NORM = T.Normalize((0.2860,), (0.3530,))
CPU = torch.device("cpu")


def data_config(root, dataset="cifar10", **overrides):
    return DataConfig(**{"dataset": dataset, "root": str(root), "download": False, "num_workers": 0, **overrides})


def labels(dataset):
    return [dataset[i][1] for i in range(len(dataset))]


def test_all_loaders_are_registered():
    assert DATASETS.names() == ["cifar10", "fake", "fashion_mnist", "folders", "imagenet"]


# --- CIFAR-10: cifar-10-batches-py/ with Python 2 pickles ------------------------------------------------------------

CIFAR_PER_BATCH = 8
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def py2(value):
    """Pickle opcodes for `value` as Python 2 wrote them: str is a byte string (SHORT_BINSTRING), which
    pickle.load(encoding="latin1") -- how torchvision reads CIFAR -- turns into str and encoding="bytes" into bytes."""
    if isinstance(value, str):
        raw = value.encode("latin1")
        return b"U" + bytes([len(raw)]) + raw
    if isinstance(value, dict):
        return b"}(" + b"".join(py2(k) + py2(v) for k, v in value.items()) + b"u"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return b"](" + b"".join(py2(v) for v in value) + b"e"
    return pickle.dumps(value, protocol=2)[2:-1]  # numbers, int lists, arrays: without PROTO and STOP


def write_py2_pickle(path, value):
    path.write_bytes(b"\x80\x02" + py2(value) + b".")


def write_cifar_batch(path, name, images, batch_labels):
    write_py2_pickle(path, {"batch_label": name, "labels": [int(y) for y in batch_labels],
                            "data": images.reshape(len(images), 3072),
                            "filenames": [f"img_{name}_{i}.png" for i in range(len(images))]})


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    """cifar-10-batches-py/ as in the real archive: five training batches, a test batch and batches.meta."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n_train = CIFAR_PER_BATCH * len(CIFAR_TRAIN_FILES)
    train_x = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)  # rows: 1024 red, 1024 green, 1024 blue
    train_y = rng.integers(0, 10, n_train)
    test_x = rng.integers(0, 256, (CIFAR_PER_BATCH, 3, 32, 32), dtype=np.uint8)
    test_y = rng.integers(0, 10, CIFAR_PER_BATCH)
    for i, name in enumerate(CIFAR_TRAIN_FILES):
        part = slice(i * CIFAR_PER_BATCH, (i + 1) * CIFAR_PER_BATCH)
        write_cifar_batch(folder / name, f"training batch {i + 1} of 5", train_x[part], train_y[part])
    write_cifar_batch(folder / "test_batch", "testing batch 1 of 1", test_x, test_y)
    write_py2_pickle(folder / "batches.meta", {
        "num_cases_per_batch": CIFAR_PER_BATCH, "num_vis": 3072,
        "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]})
    return SimpleNamespace(root=root, folder=folder, train_x=train_x, train_y=train_y.tolist(),
                           test_x=test_x, test_y=test_y.tolist())


@pytest.fixture
def cifar(cifar_files, monkeypatch):
    """The real torchvision CIFAR10 loader, told the md5s of the files written here (its own file names kept)."""
    md5 = lambda name: hashlib.md5((cifar_files.folder / name).read_bytes()).hexdigest()
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    return cifar_files


def cifar_plain(images, index):
    """What an unaugmented image must be: the stored CHW bytes scaled to [0, 1] and normalised."""
    return CIFAR_NORM(torch.from_numpy(images[index]).float() / 255)


def test_cifar_files_are_python2_pickles(cifar_files):
    raw = (cifar_files.folder / "data_batch_1").read_bytes()
    as_bytes = pickle.loads(raw, encoding="bytes")
    assert {b"batch_label", b"labels", b"data", b"filenames"} == set(as_bytes)
    assert as_bytes[b"data"].shape == (CIFAR_PER_BATCH, 3072) and as_bytes[b"data"].dtype == np.uint8
    assert set(pickle.loads(raw, encoding="latin1")) == {"batch_label", "labels", "data", "filenames"}


def test_cifar10_sizes_shapes_and_labels(cifar):
    data = build_data(data_config(cifar.root, val_size=8))
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 8)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    for split in (data.train, data.val, data.test):
        x, y = split[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0 <= y < 10
    assert labels(data.train) == [cifar.train_y[i] for i in data.train.indices]
    assert labels(data.val) == [cifar.train_y[i] for i in data.val.indices]
    assert labels(data.test) == cifar.test_y


def test_cifar10_val_is_held_out_of_train(cifar):
    data = build_data(data_config(cifar.root, val_size=8))
    train, val = set(data.train.indices), set(data.val.indices)
    assert not train & val
    assert train | val == set(range(40))
    assert data.train.dataset.train and data.val.dataset.train and not data.test.dataset.train


def test_cifar10_val_is_plain_and_train_is_augmented(cifar):
    data = build_data(data_config(cifar.root, val_size=8))
    for k, i in enumerate(data.val.indices):
        assert torch.allclose(data.val[k][0], cifar_plain(cifar.train_x, i), atol=1e-6)
    for k in range(len(data.test)):
        assert torch.allclose(data.test[k][0], cifar_plain(cifar.test_x, k), atol=1e-6)
    plain = cifar_plain(cifar.train_x, data.train.indices[0])
    draws = []
    for seed in range(4):
        torch.manual_seed(seed)
        draws.append(data.train[0][0])
    assert not all(torch.allclose(x, plain, atol=1e-6) for x in draws)
    assert not all(torch.equal(x, draws[0]) for x in draws)  # a new random crop/flip per read

    unaugmented = build_data(data_config(cifar.root, val_size=8, augment=AugmentConfig(crop_padding=0, hflip=False)))
    assert torch.allclose(unaugmented.train[0][0], plain, atol=1e-6)


def test_cifar10_missing_folder_says_what_to_put_where(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(KDError) as e:
        build_data(data_config(root))
    message = str(e.value)
    assert message.startswith("data.root: CIFAR-10 not found in ")
    assert str(root) in message and "cifar-10-batches-py/" in message and "data.download: true" in message
    assert not root.exists() or not any(root.iterdir())


# --- ImageNet-style folders: root/{train,val}/<class>/*.jpg -----------------------------------------------------------

CLASSES = ["cat", "dog", "fox"]


def write_image_folder(folder, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            colour = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)  # 50 wide, 40 high
            Image.fromarray(colour).save(folder / c / f"{c}_{i}.jpg")


@pytest.fixture
def imagenet_root(tmp_path):
    write_image_folder(tmp_path / "train", CLASSES, per_class=4)
    write_image_folder(tmp_path / "val", CLASSES, per_class=2, seed=1)
    return tmp_path


def test_imagenet_folders(imagenet_root):
    data = build_data(data_config(imagenet_root, "imagenet", image_size=32, val_size=3))
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)
    for split in (data.train, data.val, data.test):
        assert split[0][0].shape == (3, 32, 32)
    assert labels(data.test) == [0, 0, 1, 1, 2, 2]
    assert sorted(labels(data.train) + labels(data.val)) == [0] * 4 + [1] * 4 + [2] * 4


def test_imagenet_missing_root(tmp_path):
    with pytest.raises(KDError) as e:
        build_data(data_config(tmp_path / "nowhere", "imagenet", image_size=32, val_size=1))
    assert str(e.value).startswith("data.root: no ImageNet-style folders in ")
    assert "train/<class>/*.jpg" in str(e.value)


@pytest.mark.parametrize("val_classes", [["cat", "dog"], ["cat", "dog", "emu"]], ids=["missing", "extra"])
def test_imagenet_train_and_val_classes_must_match(tmp_path, val_classes):
    write_image_folder(tmp_path / "train", CLASSES, per_class=2)
    write_image_folder(tmp_path / "val", val_classes, per_class=1)
    with pytest.raises(KDError, match="have different class folders"):
        build_data(data_config(tmp_path, "imagenet", image_size=32, val_size=1))


# --- Fashion-MNIST: gzipped IDX files, staged from the Debian package's folder ----------------------------------------

FMNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte"]


@pytest.fixture
def debian_fmnist(tmp_path, monkeypatch, idx_bytes):
    """A stand-in for /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist): the four *-ubyte.gz files."""
    folder = tmp_path / "debian"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12)),
              "t10k": (rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6))}
    for split, (images, targets) in arrays.items():
        for kind, array in (("images-idx3", images), ("labels-idx1", targets)):
            (folder / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    assert idx_bytes(arrays["train"][0])[:4] == struct.pack(">I", 2051)
    assert idx_bytes(arrays["train"][1])[:4] == struct.pack(">I", 2049)
    monkeypatch.setattr(kd.data.datasets, "DEBIAN_FASHION_MNIST", folder)
    return SimpleNamespace(folder=folder, train_x=arrays["train"][0].astype(np.uint8),
                           train_y=arrays["train"][1].tolist(),
                           test_x=arrays["t10k"][0].astype(np.uint8), test_y=arrays["t10k"][1].tolist())


def test_fashion_mnist_staged_from_debian_package(debian_fmnist, tmp_path):
    root = tmp_path / "data"
    data = build_data(data_config(root, "fashion_mnist", val_size=4))

    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(FMNIST_FILES)  # no .part files left behind
    for name in FMNIST_FILES:
        assert (raw / name).read_bytes() == gzip.decompress((debian_fmnist.folder / f"{name}.gz").read_bytes())

    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 6)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    for split in (data.train, data.val, data.test):
        assert split[0][0].shape == (1, 28, 28)
    assert labels(data.test) == debian_fmnist.test_y
    assert labels(data.train) == [debian_fmnist.train_y[i] for i in data.train.indices]
    assert labels(data.val) == [debian_fmnist.train_y[i] for i in data.val.indices]
    expected = FMNIST_NORM(torch.from_numpy(debian_fmnist.train_x[data.val.indices[0]]).float()[None] / 255)
    assert torch.allclose(data.val[0][0], expected, atol=1e-6)


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(kd.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    root = tmp_path / "data"
    with pytest.raises(KDError) as e:
        build_data(data_config(root, "fashion_mnist", val_size=4))
    message = str(e.value)
    assert message.startswith(f"data.root: Fashion-MNIST not found in {root}")
    assert "FashionMNIST/raw/" in message and "apt-get install dataset-fashion-mnist" in message


# --- The validation holdout and subsets (build_data) ------------------------------------------------------------------

@pytest.mark.parametrize("val_size", [40, 41])
def test_val_size_must_leave_training_images(cifar, val_size):
    with pytest.raises(KDError) as e:
        build_data(data_config(cifar.root, val_size=val_size))
    assert str(e.value) == f"data.val_size: {val_size} leaves no training images (the training split has 40)"


def test_val_size_may_leave_one_training_image(cifar):
    data = build_data(data_config(cifar.root, val_size=39))
    assert (len(data.train), len(data.val)) == (1, 39)


def test_train_subset_keeps_the_val_split(cifar):
    full = build_data(data_config(cifar.root, val_size=8))
    sub = build_data(data_config(cifar.root, val_size=8, train_subset=5))
    assert sub.val.indices == full.val.indices
    assert sub.train.indices == full.train.indices[:5]
    # more than there are is refused, never silently all of them: the report would name a size never trained on
    with pytest.raises(ConfigError, match=f"data.train_subset: 1000 is more than the {len(full.train)} training "):
        build_data(data_config(cifar.root, val_size=8, train_subset=1000))
    with pytest.raises(ConfigError, match=f"data.test_subset: 1000 is more than the {len(full.test)} test images"):
        build_data(data_config(cifar.root, val_size=8, test_subset=1000))


def test_a_recipes_subset_is_a_prefix_of_the_training_images_in_both_pipelines(cifar):
    for pipeline in ("tensor", "loader"):
        data = build_data(data_config(cifar.root, val_size=8, pipeline=pipeline))
        part = data.first(5)
        assert part.train.indices == data.train.indices[:5] and part.val is data.val and part.test is data.test
        assert len(train_loader(part, data_config(cifar.root, batch_size=2), CPU, 0).loader.dataset
                   if not data.tensors else part.tensors["train"][1]) == 5
        if data.tensors:
            assert torch.equal(part.tensors["train"][0], data.tensors["train"][0][:5])
        assert data.first(None) is data and data.first(len(data.train)) is data


def test_test_subset_takes_the_first_test_images(cifar):
    assert labels(build_data(data_config(cifar.root, val_size=8, test_subset=3)).test) == cifar.test_y[:3]


def test_split_depends_on_split_seed_only(cifar):
    def split(global_seed, **overrides):
        torch.manual_seed(global_seed)
        data = build_data(data_config(cifar.root, val_size=8, **overrides))
        return data.train.indices, data.val.indices

    reference = split(0)
    assert split(123) == reference
    assert split(0, batch_size=7, augment=AugmentConfig(crop_padding=0, hflip=False)) == reference
    assert split(0, split_seed=1) != reference
    assert split(5, split_seed=1) == split(0, split_seed=1)


# --- loaders ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_setup():
    cfg = data_config("unused", "fake", image_size=16, val_size=16, train_subset=64, test_subset=16,
                      batch_size=8, eval_batch_size=8)
    return build_data(cfg), cfg


def first_train_batch(fake_setup, loader_seed):
    data, cfg = fake_setup
    torch.manual_seed(0)  # augmentation draws from the global RNG when num_workers is 0
    return next(iter(train_loader(data, cfg, CPU, loader_seed)))


def test_same_generator_seed_gives_same_first_batch(fake_setup):
    (x1, y1, i1, _), (x2, y2, i2, _) = first_train_batch(fake_setup, 7), first_train_batch(fake_setup, 7)
    assert x1.shape == (8, 3, 16, 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(i1, i2)
    x3, *_ = first_train_batch(fake_setup, 8)
    assert not torch.equal(x1, x3)


def test_loader_batches_carry_their_dataset_indices(fake_setup):
    data, _ = fake_setup
    _, y, idx, _ = first_train_batch(fake_setup, 7)
    assert [data.train[i][1] for i in idx.tolist()] == y.tolist()  # what CRD's memory bank is indexed by


def test_eval_loaders_keep_dataset_order(fake_setup):
    data, cfg = fake_setup
    val, test = eval_loaders(data, cfg, CPU)
    assert torch.cat([y for _, y in val]).tolist() == labels(data.val)
    assert torch.cat([y for _, y in test]).tolist() == labels(data.test)
