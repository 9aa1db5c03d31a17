"""Datasets load from their real on-disk formats; missing or mismatched data is a clear error."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blockdrop.data import load_dataset
from blockdrop.errors import UserError
from blockdrop.presets import get_preset

from conftest import run_module, write_cifar


@pytest.mark.parametrize("name, preset", [("cifar10", "R110_C10"), ("cifar100", "R32_C100")])
def test_cifar_reads_torchvision_layout(tmp_path, name, preset):
    test_labels = write_cifar(tmp_path, name)
    train = load_dataset(get_preset(preset), "train", name, tmp_path, download=False)
    val = load_dataset(get_preset(preset), "val", name, tmp_path, download=False)
    test = load_dataset(get_preset(preset), "test", name, tmp_path, download=False)
    # the validation split is carved from the training batches, never from the test batch
    assert len(train) + len(val) == (100 if name == "cifar10" else 20) and len(test) == 30 and len(val) > 0
    assert not set(train.indices) & set(val.indices)
    image, label = test[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == test_labels[4]
    # normalised with the original's constants: uniform bytes have mean ~ (127.5 - 125.3) / 63
    images = torch.stack([test[i][0] for i in range(len(test))])
    assert abs(images[:, 0].mean().item() - (127.5 - 125.3) / 63.0) < 0.05


def test_cifar_train_split_is_augmented_and_test_split_is_not(cifar10_dir):
    preset = get_preset("R32_C10")
    train = load_dataset(preset, "train", "cifar10", cifar10_dir, download=False)
    test = load_dataset(preset, "test", "cifar10", cifar10_dir, download=False)
    torch.manual_seed(0)
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(5))
    assert torch.equal(test[0][0], test[0][0])


def test_missing_cifar_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(UserError, match=f"cifar10 not found in {tmp_path}/cifar-10-batches-py.*--data-dir"):
        load_dataset(get_preset("R32_C10"), "test", "cifar10", tmp_path, download=False)


def test_cifar100_for_a_10_class_preset_is_rejected(tmp_path):
    with pytest.raises(UserError, match="cifar100 has 100 classes; preset R32_C10 has 10"):
        load_dataset(get_preset("R32_C10"), "test", "cifar100", tmp_path)


def write_images(folder, classes: int, per_class: int, size=(40, 30)) -> None:
    for c in range(classes):
        (folder / f"class_{c:04d}").mkdir(parents=True)
        for i in range(per_class):
            color = ((c * 37) % 256, (i * 53) % 256, 128)
            Image.new("RGB", size, color).save(folder / f"class_{c:04d}" / f"{i}.png")


def test_imagefolder_single_folder_is_resized_and_split_90_10(tmp_path):
    write_images(tmp_path, 10, 10)
    preset = get_preset("R32_C10")
    train = load_dataset(preset, "train", "imagefolder", tmp_path)
    val = load_dataset(preset, "val", "imagefolder", tmp_path)
    test = load_dataset(preset, "test", "imagefolder", tmp_path)
    assert len(train) == 80 and len(val) == 10 and len(test) == 10  # of 9 training images a class, one validates
    assert len({p for p, _ in train.samples + val.samples + test.samples}) == 100
    assert train[0][0].shape == (3, 32, 32)
    assert sorted(label for _, label in (test[i] for i in range(10))) == list(range(10))


def test_imagefolder_with_train_and_val_folders_and_grayscale_preset(tmp_path):
    write_images(tmp_path / "train", 10, 3)
    write_images(tmp_path / "val", 10, 2)
    preset = get_preset("R26_DIGITS")
    # train/ and val/ without test/: val/ is the test set (ImageNet's layout), validation comes from train/
    assert len(load_dataset(preset, "train", "imagefolder", tmp_path)) == 20
    assert len(load_dataset(preset, "val", "imagefolder", tmp_path)) == 10
    test = load_dataset(preset, "test", "imagefolder", tmp_path)
    assert len(test) == 20 and test[0][0].shape == (1, 8, 8)


def test_imagefolder_with_wrong_class_count_or_no_images_is_rejected(tmp_path):
    write_images(tmp_path / "a", 3, 2)
    with pytest.raises(UserError, match="has 3 class folders; preset R32_C10 has 10 classes"):
        load_dataset(get_preset("R32_C10"), "train", "imagefolder", tmp_path / "a")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        load_dataset(get_preset("R32_C10"), "train", "imagefolder", tmp_path / "empty")
    with pytest.raises(UserError, match="needs --data-dir"):
        load_dataset(get_preset("R32_C10"), "train", "imagefolder", None)


def test_imagenet_reads_train_and_val_class_folders(tmp_path):
    write_images(tmp_path / "train", 1000, 1, size=(8, 6))
    write_images(tmp_path / "val", 1000, 1, size=(8, 6))
    preset = get_preset("R101_ImgNet")
    train = load_dataset(preset, "train", "imagenet", tmp_path)
    val = load_dataset(preset, "test", "imagenet", tmp_path)
    # one image a class: none can be held out for validation without leaving its class untrained
    assert len(train) == len(val) == 1000 and len(load_dataset(preset, "val", "imagenet", tmp_path)) == 0
    assert val[999][0].shape == (3, 224, 224) and val[999][1] == 999


def test_imagenet_without_val_folder_is_a_clear_error(tmp_path):
    write_images(tmp_path / "train", 2, 1)
    with pytest.raises(UserError, match=f"expected class folders under {tmp_path}/train/ and {tmp_path}/val/"):
        load_dataset(get_preset("R101_ImgNet"), "test", "imagenet", tmp_path)


def test_digits_ship_with_scikit_learn_and_split_80_20():
    preset = get_preset("R26_DIGITS")
    train, val, test = load_dataset(preset, "train"), load_dataset(preset, "val"), load_dataset(preset, "test")
    assert len(train) == 1292 and len(val) == 145 and len(test) == 360  # 1437 training images, 10% validate
    assert not val.augment and sorted(set(val.labels.tolist())) == list(range(10))
    images = torch.cat([train.images, val.images, test.images])
    assert abs(images.mean().item()) < 0.01 and abs(images.std().item() - 1) < 0.01
    assert test[0][0].shape == (1, 8, 8)
    assert sorted(set(test.labels.tolist())) == list(range(10))


def test_digits_training_shifts_are_torchvisions_edge_padded_random_crop_with_the_same_draws():
    # the digits set shifts without importing torchvision; the same images as RandomCrop(8, padding=1,
    # padding_mode="edge") gave, draw for draw, so that seeds reproduce the recorded results
    from torchvision import transforms

    from blockdrop.data import random_shift

    crop = transforms.RandomCrop(8, padding=1, padding_mode="edge")
    image = torch.randn(1, 8, 8)
    moved = 0
    for seed in range(40):
        torch.manual_seed(seed)
        theirs, after_theirs = crop(image), torch.rand(1)
        torch.manual_seed(seed)
        ours, after_ours = random_shift(image), torch.rand(1)
        assert torch.equal(ours, theirs) and torch.equal(after_ours, after_theirs), seed
        moved += not torch.equal(ours, image)
    assert moved > 20  # 8 of the 9 offsets move the image
    train = load_dataset(get_preset("R26_DIGITS"), "train")
    assert train[0][0].shape == (1, 8, 8) and not load_dataset(get_preset("R26_DIGITS"), "test").augment


def test_the_validation_split_is_stratified_seeded_and_the_same_on_every_call():
    from blockdrop.data import validation_indices

    labels = [c for c in range(5) for _ in range(20)] + [5]  # a class of one image keeps it for training
    held = validation_indices(labels)
    assert held == validation_indices(labels) and len(held) == 10
    assert sorted(labels[i] for i in held) == [c for c in range(5) for _ in range(2)]
    assert held != validation_indices(labels, seed=1)
    assert len(validation_indices([0, 0, 1, 1])) == 2  # one of each class of two


def test_a_val_folder_beside_a_test_folder_is_the_validation_split(tmp_path):
    write_images(tmp_path / "train", 10, 3, size=(8, 8))
    write_images(tmp_path / "val", 10, 2, size=(8, 8))
    write_images(tmp_path / "test", 10, 1, size=(8, 8))
    preset = get_preset("R26_DIGITS")
    parts = {split: load_dataset(preset, split, "imagefolder", tmp_path) for split in ("train", "val", "test")}
    assert {split: len(ds) for split, ds in parts.items()} == {"train": 30, "val": 20, "test": 10}
    assert all(path.startswith(str(tmp_path / "val")) for path, _ in parts["val"].samples)
    (tmp_path / "val" / "class_0009").rename(tmp_path / "val" / "nine")  # its classes are the training's too
    with pytest.raises(UserError, match=r"only in val/: nine"):
        load_dataset(preset, "val", "imagefolder", tmp_path)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose one of: cifar10, cifar100"):
        load_dataset(get_preset("R32_C10"), "train", "mnist")


@pytest.fixture
def cifar_archive_server(tmp_path, monkeypatch):
    """Serve a small cifar-10-python.tar.gz over HTTP on loopback and point torchvision at it."""
    import functools
    import hashlib
    import http.server
    import tarfile
    import threading

    from blockdrop.data import cifar_class

    staging = tmp_path / "staging"
    write_cifar(staging)
    archive = tmp_path / "www" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cls = cifar_class("cifar10")
    monkeypatch.setattr(cls, "url", f"http://127.0.0.1:{server.server_port}/{archive.name}")
    monkeypatch.setattr(cls, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    yield cls
    server.shutdown()


@pytest.mark.slow
def test_missing_cifar_is_downloaded_and_extracted(tmp_path, cifar_archive_server):
    root = tmp_path / "fresh"
    test = load_dataset(get_preset("R32_C10"), "test", "cifar10", root)
    assert len(test) == 30 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()


@pytest.mark.slow
def test_failed_download_says_how_to_provide_the_data(tmp_path, cifar_archive_server, monkeypatch):
    monkeypatch.setattr(cifar_archive_server, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(UserError, match="could not be downloaded.*copy cifar-10-python.tar.gz"):
        load_dataset(get_preset("R32_C10"), "test", "cifar10", tmp_path / "fresh")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_sample_folders_are_written_as_train_and_test_class_folders(tmp_path, name):
    """The offline sample sets load as an image folder of 32x32 RGB images, 10 classes, 80/20, the
    validation split a tenth of the training folder's images."""
    proc = run_module("blockdrop.sample_data", name, str(tmp_path / name))
    assert proc.returncode == 0, proc.stderr
    preset = get_preset("R32_C10")
    train, val, test = (load_dataset(preset, split, "imagefolder", tmp_path / name) for split in ("train", "val", "test"))
    assert len(train.classes) == len(val.classes) == len(test.classes) == 10
    whole = len(train) + len(val) + len(test)
    assert abs(len(test) / whole - 0.2) < 0.01 and whole >= 1797
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.01
    with Image.open(test.samples[0][0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    again = run_module("blockdrop.sample_data", name, str(tmp_path / name))
    assert again.returncode == 2 and "is not empty" in again.stderr


@pytest.mark.slow
def test_mixed_set_degrades_half_of_each_class_and_says_which_in_the_file_names(tmp_path):
    from blockdrop.data import difficulties
    from blockdrop.sample_data import mixed_images

    images, labels, hard = mixed_images(32)
    for label in range(10):
        assert abs(hard[labels == label].mean() - 0.5) < 0.02
    # pixel noise: second differences along rows, near 0 on a clean (smooth, upscaled) digit
    noise = lambda ims: float(np.mean(np.abs(np.diff(ims[..., 0].astype(float), n=2, axis=2))))
    contrast = lambda ims: float(np.mean([np.percentile(i, 99) - np.percentile(i, 1) for i in ims[..., 0]]))
    assert noise(images[hard]) > 3 * noise(images[~hard]) and contrast(images[hard]) < contrast(images[~hard])
    proc = run_module("blockdrop.sample_data", "mixed", str(tmp_path / "mixed"))
    assert proc.returncode == 0, proc.stderr
    test = load_dataset(get_preset("R32_C10"), "test", "imagefolder", tmp_path / "mixed")
    flags = difficulties(test)
    assert len(flags) == len(test) and 0.45 < flags.mean() < 0.55
    assert [p.endswith("-hard.png") for p, _ in test.samples] == flags.tolist()
    # through a Subset (a --limit), the flags of the images it holds, in its order
    assert difficulties(torch.utils.data.Subset(test, [5, 0, 7])).tolist() == [flags[5], flags[0], flags[7]]


@pytest.mark.slow
def test_difficulties_are_none_where_file_names_do_not_say(tmp_path):
    from blockdrop.data import difficulties

    assert difficulties(torch.utils.data.TensorDataset(torch.zeros(3, 1))) is None
    proc = run_module("blockdrop.sample_data", "digits", str(tmp_path / "digits"))
    assert proc.returncode == 0, proc.stderr
    assert difficulties(load_dataset(get_preset("R32_C10"), "test", "imagefolder", tmp_path / "digits")) is None


def test_shapes_get_harder_with_difficulty():
    """Hard shapes are noisier than easy ones, and the pixels of an easy shape stand out far more from the
    background's (the top 5% of an easy image's brightness is far above its median)."""
    from blockdrop.sample_data import shapes_images

    easy, _, easy_flags = shapes_images(32, per_class=10, difficulty_power=8)  # difficulty near 0
    hard, _, hard_flags = shapes_images(32, per_class=10, difficulty_power=0.1)  # difficulty near 1
    assert easy_flags.mean() < 0.15 and hard_flags.all()  # hard: difficulty >= 0.5, u ** 8 >= 0.5 for u >= 0.917
    spread = lambda images: float(np.mean([np.percentile(i, 95) - np.median(i) for i in images.mean(3)]))
    noise = lambda images: float(np.mean(np.abs(np.diff(images.astype(float), axis=2))))
    assert spread(easy) > spread(hard) and noise(hard) > noise(easy)


def test_loader_defaults_feed_a_gpu_from_worker_processes_and_a_cpu_in_process():
    from blockdrop.data import MAX_LOADER_WORKERS, default_loader_workers

    assert default_loader_workers("imagenet", "cuda", 8) == 7  # every core but the training process's
    assert default_loader_workers("imagefolder", "cuda", 1) == 1
    assert default_loader_workers("imagenet", "cuda", 96) == MAX_LOADER_WORKERS
    assert default_loader_workers("cifar10", "cuda", 4) == 3
    assert default_loader_workers("imagenet", "cpu", 8) == 0
    assert default_loader_workers("digits", "cuda", 8) == 0


def test_loader_options_are_accepted_by_the_dataloader_with_and_without_workers():
    from torch.utils.data import DataLoader

    from blockdrop.data import loader_options

    assert loader_options("cuda", 4) == {"num_workers": 4, "pin_memory": True, "persistent_workers": True,
                                         "prefetch_factor": 2}
    assert loader_options("cuda", 0) == {"num_workers": 0, "pin_memory": True}
    assert loader_options("cpu", 2)["pin_memory"] is False
    data = torch.utils.data.TensorDataset(torch.arange(8.0), torch.arange(8))
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=4, **loader_options("cpu", workers))
        for _ in range(2):  # persistent workers serve a second epoch
            assert sorted(int(i) for batch, _ in loader for i in batch) == list(range(8))


def test_symlink_loops_in_an_image_folder_are_read_once_and_said(tmp_path, capsys):
    """A folder linking to itself and one linking to its parent: the scan ends, each image counted once."""
    import pickle

    write_images(tmp_path / "train", 10, 2, size=(8, 8))
    write_images(tmp_path / "test", 10, 1, size=(8, 8))
    (tmp_path / "train" / "class_0000" / "again").symlink_to(tmp_path / "train" / "class_0000")
    (tmp_path / "test" / "class_0003" / "up").symlink_to(tmp_path / "test")
    preset = get_preset("R26_DIGITS")
    train = load_dataset(preset, "train", "imagefolder", tmp_path)
    test = load_dataset(preset, "test", "imagefolder", tmp_path)
    assert len(train) == 10 and len(test) == 10  # test/class_0003/up/: the test set again, not read twice
    assert "reached again through symbolic links" in capsys.readouterr().err
    assert len(pickle.loads(pickle.dumps(train))) == 10  # what a spawned DataLoader worker receives


def test_test_class_folders_that_are_not_the_training_ones_are_refused(tmp_path):
    write_images(tmp_path / "train", 10, 1, size=(8, 8))
    write_images(tmp_path / "test", 10, 1, size=(8, 8))
    (tmp_path / "test" / "class_0009").rename(tmp_path / "test" / "nine")
    with pytest.raises(UserError, match=r"only in test/: nine; only in train/: class_0009"):
        load_dataset(get_preset("R26_DIGITS"), "test", "imagefolder", tmp_path)
