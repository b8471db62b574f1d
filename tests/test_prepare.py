"""prepare on real photographs and on files made to fail: what is written, skipped and refused."""

import importlib.util
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipeline.datasets import DatasetInfo
from pipeline.errors import DataError
from pipeline.images import BadImage, read_rgb, to_rgb
from pipeline.loaders import ImageLoader
from pipeline.prepare import PrepareSettings, prepare

JPEG_PSNR_DB = 30.0  # the least PSNR of a stored JPEG (quality 90) against its source pixels


@pytest.fixture(scope="session")
def photos() -> Path:
    """The sample images the foolbox package ships (installed without its dependencies)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        pytest.fail("foolbox is not installed; scripts/setup.sh installs it (--no-deps)")
    return Path(spec.submodule_search_locations[0]) / "data"


def stored_images(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every stored image of an FFCV dataset, decoded as written, and the labels."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    table = reader.alloc_table
    sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist(), strict=True))
    data = np.memmap(path, np.uint8, mode="r")
    images = []
    for meta in reader.metadata["f0"]:
        ptr, h, w = int(meta["data_ptr"]), int(meta["height"]), int(meta["width"])
        blob = np.asarray(data[ptr : ptr + sizes[ptr]])
        if meta["mode"] == 1:  # raw pixels
            images.append(blob[: h * w * 3].reshape(h, w, 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB")))
    return images, np.asarray(reader.metadata["f1"])


def sources(out: Path, split: str) -> list[str]:
    return (out / f"{split}.sources.txt").read_text().split()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def mixed_tree(root: Path, photos: Path) -> dict[str, str]:
    """20 photographs in two classes, odd modes under .JPEG names, and three bad files.

    Returns the bad files' names and what makes each bad."""
    jpegs = sorted(photos.glob("imagenet_*.jpg"))
    for i, path in enumerate(jpegs):
        folder = root / "train" / ("n01" if i < 10 else "n02")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{path.stem}.JPEG").write_bytes(path.read_bytes())
    photo = Image.open(jpegs[0])
    photo.convert("L").save(root / "train/n01/grey.JPEG", format="JPEG")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(root / "train/n01/rgba.JPEG", format="PNG")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "train/n02/palette.JPEG", format="PNG"
    )
    whole = jpegs[1].read_bytes()
    (root / "train/n02/cut.JPEG").write_bytes(whole[: len(whole) // 2])
    (root / "train/n02/empty.JPEG").write_bytes(b"")
    (root / "train/n01/text.JPEG").write_text("not a picture\n")
    return {"cut.JPEG": "truncated", "empty.JPEG": "empty", "text.JPEG": "not an image"}


@pytest.mark.parametrize("write_mode", ["raw", "jpg"])
def test_mixed_tree_writes_good_files_and_names_bad_ones(tmp_path, photos, write_mode):
    bad = mixed_tree(tmp_path / "src", photos)
    info, report = prepare(
        PrepareSettings(
            dataset="imagenet",
            src=tmp_path / "src",
            out=tmp_path / "out",
            max_resolution=0,
            write_mode=write_mode,
            workers=3,
        )
    )

    skipped = {Path(p).name: why for p, why in report.skipped}
    assert set(skipped) == set(bad)
    for name, why in bad.items():
        assert why in skipped[name], skipped
    assert info.count("train") == report.written["train"] == 23
    assert report.converted == {"L": 1, "P": 1, "RGBA": 1}
    assert sorted(Path(p).name for p, _ in report.misnamed) == ["palette.JPEG", "rgba.JPEG"]

    images, labels = stored_images(tmp_path / "out/train.beton")
    names = sources(tmp_path / "out", "train")
    assert len(images) == len(names) == 23
    assert sorted(names) == sorted(
        str(p.relative_to(tmp_path / "src"))
        for p in (tmp_path / "src/train").rglob("*.JPEG")
        if p.name not in bad
    )
    for image, label, name in zip(images, labels, names, strict=True):
        with Image.open(tmp_path / "src" / name) as img:
            reference = np.asarray(img.convert("RGB"))
        assert label == (0 if "/n01/" in name else 1)
        assert image.shape == reference.shape
        if write_mode == "raw":
            np.testing.assert_array_equal(image, reference, err_msg=name)
        else:
            assert psnr(image, reference) >= JPEG_PSNR_DB, name


def test_strict_refuses_any_bad_file_and_writes_nothing(tmp_path, photos):
    mixed_tree(tmp_path / "src", photos)
    settings = PrepareSettings("folder", tmp_path / "src", tmp_path / "out", strict=True)
    with pytest.raises(DataError, match=r"3 bad image files, and --strict is on: .*cut\.JPEG"):
        prepare(settings)
    assert not (tmp_path / "out").exists()


def test_image_larger_than_a_page_is_refused_before_writing(tmp_path):
    big = tmp_path / "src/train/a/big.png"
    big.parent.mkdir(parents=True)
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(big)
    result = CliRunner().invoke(
        main,
        [
            "prepare",
            "folder",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
            "--max-resolution",
            "0",
        ],
    )
    assert result.exit_code == 1, result.output
    assert f"{big} is 3000x2000 (18,000,000 bytes as RGB)" in result.output
    assert "pass --max-resolution 1672 or less" in result.output
    assert not (tmp_path / "out").exists()


def test_integer_class_names_sort_as_numbers_and_val_must_match(tmp_path):
    for split, classes in (("train", range(12)), ("val", [c for c in range(12) if c != 7])):
        for c in classes:
            folder = tmp_path / "src" / split / str(c)
            folder.mkdir(parents=True)
            Image.new("RGB", (12, 10), (c * 20, 0, 0)).save(folder / "a.png")
    result = CliRunner().invoke(
        main, ["prepare", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1, result.output
    assert "the classes of" in result.output and "missing ['7'] (1)" in result.output
    assert not (tmp_path / "out").exists()

    (tmp_path / "src/val/7").mkdir()
    Image.new("RGB", (12, 10), (140, 0, 0)).save(tmp_path / "src/val/7/a.png")
    result = CliRunner().invoke(
        main, ["prepare", "folder", str(tmp_path / "src"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "12 classes (sorted as numbers)" in result.output
    assert "0 -> 0, 1 -> 1, 2 -> 2, 3 -> 3, 4 -> 4, ..." in result.output
    label_map = json.loads((tmp_path / "out/labels.json").read_text())
    assert label_map == {str(c): c for c in range(12)}
    info = DatasetInfo.load(tmp_path / "out")
    assert info.classes[:3] == ("0", "1", "2") and info.label_rule == "sorted as numbers"
    for split in ("train", "val"):
        images, labels = stored_images(tmp_path / "out" / f"{split}.beton")
        for image, label in zip(images, labels, strict=True):
            assert image[0, 0, 0] == pytest.approx(label * 20, abs=3)


def test_text_names_sort_as_text(tmp_path):
    for name in ("n10", "n02", "n1", "b"):
        (tmp_path / "src/train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "src/train" / name / "x.png")
    info, report = prepare(PrepareSettings("folder", tmp_path / "src", tmp_path / "out"))
    assert info.classes == ("b", "n02", "n1", "n10")
    assert report.label_rule == "sorted as text"


SYNSETS = ["n01440764", "n01443537", "n01484850"]  # sorted as text: labels 0, 1, 2
DEVKIT_IDS = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # the devkit's own class ids


def write_devkit(root: Path) -> Path:
    """A devkit like ILSVRC2012's: meta.mat with a synsets table and the ground truth."""
    data = root / "ILSVRC2012_devkit_t12/data"
    data.mkdir(parents=True)
    table = np.zeros(
        len(SYNSETS) + 1,
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    rows = sorted(DEVKIT_IDS.items(), key=lambda kv: kv[1]) + [("n00001740", 4)]
    for i, (wnid, ident) in enumerate(rows):
        table[i] = (ident, wnid, wnid, 0 if ident < 4 else 3)
    scipy.io.savemat(data / "meta.mat", {"synsets": table})
    # Validation images 1..6 are of synsets 2, 0, 1, 0, 2, 1 (as labels).
    truth = [DEVKIT_IDS[SYNSETS[label]] for label in (2, 0, 1, 0, 2, 1)]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{t}\n" for t in truth))
    return data.parent


def flat_val_tree(root: Path) -> None:
    for label, wnid in enumerate(SYNSETS):
        (root / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (16, 16), (label * 100, 0, 0)).save(root / "train" / wnid / "a.JPEG")
    (root / "val").mkdir()
    for number, label in enumerate((2, 0, 1, 0, 2, 1), start=1):
        path = root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG"
        Image.new("RGB", (16, 16), (label * 100, 0, 0)).save(path, format="JPEG")


@pytest.mark.parametrize("packed", [False, True])
def test_flat_imagenet_val_is_labelled_from_the_devkit(tmp_path, packed):
    flat_val_tree(tmp_path / "src")
    devkit = write_devkit(tmp_path)
    if packed:
        archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(devkit, arcname=devkit.name)
        devkit = archive
    info, _ = prepare(
        PrepareSettings("imagenet", tmp_path / "src", tmp_path / "out", devkit=devkit)
    )

    assert info.classes == tuple(SYNSETS)
    images, labels = stored_images(tmp_path / "out/val.beton")
    names = sources(tmp_path / "out", "val")
    expected = {f"val/ILSVRC2012_val_{n:08d}.JPEG": c for n, c in enumerate((2, 0, 1, 0, 2, 1), 1)}
    assert {name: int(label) for name, label in zip(names, labels, strict=True)} == expected
    for image, label in zip(images, labels, strict=True):
        assert abs(int(image[8, 8, 0]) - 100 * int(label)) <= 3


def test_flat_val_without_ground_truth_is_refused(tmp_path):
    flat_val_tree(tmp_path / "src")
    with pytest.raises(DataError, match=r"holds 6 image files and no class folders.*--devkit"):
        prepare(PrepareSettings("imagenet", tmp_path / "src", tmp_path / "out"))
    devkit = write_devkit(tmp_path)
    (devkit / "data/ILSVRC2012_validation_ground_truth.txt").unlink()
    with pytest.raises(DataError, match="lacks data/ILSVRC2012_validation_ground_truth.txt"):
        prepare(PrepareSettings("imagenet", tmp_path / "src", tmp_path / "out", devkit=devkit))
    with pytest.raises(DataError, match="move them into <class>/ folders"):
        prepare(PrepareSettings("folder", tmp_path / "src", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "dataset, folder, meta, names_key, labels_key, batches",
    [
        (
            "cifar10",
            "cifar-10-batches-py",
            "batches.meta",
            b"label_names",
            b"labels",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        ),
        (
            "cifar100",
            "cifar-100-python",
            "meta",
            b"fine_label_names",
            b"fine_labels",
            ["train", "test"],
        ),
    ],
)
def test_cifar_batches_of_real_images(
    tmp_path, photos, dataset, folder, meta, names_key, labels_key, batches
):
    files = sorted(photos.glob(f"{dataset}_*.png"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    labels = [int(p.stem.split("_")[-1]) for p in files]
    classes = 10 if dataset == "cifar10" else 100
    src = tmp_path / folder
    src.mkdir()
    with open(src / meta, "wb") as f:
        pickle.dump({names_key: [f"class{c:03d}".encode() for c in range(classes)]}, f)
    for name in batches:
        data = images.transpose(0, 3, 1, 2).reshape(len(files), -1)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, labels_key: labels}, f)

    info, _ = prepare(PrepareSettings(dataset, src, tmp_path / "out"))
    assert info.num_classes == classes and info.classes[7] == "class007"
    assert info.count("train") == 20 * (len(batches) - 1) and info.count("test") == 20
    from ffcv.reader import Reader

    stored = Reader(str(tmp_path / "out/test.beton"))
    order = [int(s) for s in sources(tmp_path / "out", "test")]
    assert sorted(order) == list(range(20))
    np.testing.assert_array_equal(stored.metadata["f1"], np.asarray(labels)[order])


def test_thousand_and_one_images_read_back_in_stored_order(tmp_path):
    for i in range(1001):
        folder = tmp_path / "src/train" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i % 256, i // 256, 7)).save(folder / f"{i:04d}.png")
    info, _ = prepare(
        PrepareSettings("folder", tmp_path / "src", tmp_path / "out", write_mode="raw")
    )
    names = sources(tmp_path / "out", "train")
    assert names != sorted(names), "the write order is shuffled"
    colours = np.asarray([(i % 256, i // 256, 7) for i in range(1001)]) / 255
    np.testing.assert_allclose(info.mean, colours.mean(0), rtol=1e-9)
    np.testing.assert_allclose(info.std, colours.std(0), rtol=1e-6, atol=1e-6)

    loader = ImageLoader(info, "train", batch_size=100, image_shape=(3, 16, 16))
    mean = np.asarray(info.mean)[:, None, None]
    std = np.asarray(info.std)[:, None, None]
    seen, batches = [], []
    for x, y in loader.epoch(0):
        batches.append(len(y))
        pixels = np.rint((x.numpy() * std + mean) * 255).astype(int)
        # Normalised as (pixel / 255 - mean) / std, whoever does the arithmetic.
        np.testing.assert_allclose(x.numpy(), (pixels / 255 - mean) / std, rtol=1e-5, atol=1e-5)
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert (pixels[:, 2] == 7).all()
        seen += (pixels[:, 0, 0, 0] + 256 * pixels[:, 1, 0, 0]).tolist()
    assert batches == [100] * 10 + [1]
    assert seen == [int(Path(n).stem) for n in names]
    assert sorted(seen) == list(range(1001))


def test_write_order_follows_the_seed(tmp_path, photos):
    mixed_tree(tmp_path / "src", photos)
    orders = []
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(PrepareSettings("folder", tmp_path / "src", tmp_path / out, seed=seed))
        orders.append(sources(tmp_path / out, "train"))
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[2])


def test_existing_dataset_is_kept_unless_overwrite(tmp_path, fmnist_src):
    prepare(PrepareSettings("fashion-mnist", fmnist_src, tmp_path / "out"))
    first = DatasetInfo.load(tmp_path / "out").id
    with pytest.raises(DataError, match="already holds a prepared dataset.*--overwrite"):
        prepare(PrepareSettings("fashion-mnist", fmnist_src, tmp_path / "out"))
    assert DatasetInfo.load(tmp_path / "out").id == first
    info, _ = prepare(
        PrepareSettings("fashion-mnist", fmnist_src, tmp_path / "out", overwrite=True)
    )
    assert info.id != first


@pytest.mark.parametrize(
    "mode, make, expected",
    [
        ("I;16", lambda: np.array([[0, 257, 65535, 32896]], np.uint16), [0, 1, 255, 128]),
        ("L", lambda: np.array([[0, 9, 255]], np.uint8), [0, 9, 255]),
    ],
)
def test_grey_modes_become_equal_channels(tmp_path, mode, make, expected):
    path = tmp_path / "grey.png"
    Image.fromarray(make()).save(path)
    rgb, report = read_rgb(path)
    assert report.mode == mode
    np.testing.assert_array_equal(rgb[0], np.repeat(np.asarray(expected)[:, None], 3, axis=1))


def test_cmyk_uses_pillows_conversion():
    img = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    np.testing.assert_array_equal(to_rgb(img)[0, 0], [255, 0, 0])


def test_bad_files_say_why(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(BadImage, match="empty file"):
        read_rgb(tmp_path / "empty.jpg")
    with pytest.raises(BadImage, match="not an image"):
        read_rgb(tmp_path / "text.jpg")


def test_file_cut_after_the_scan_fails_the_write_and_keeps_nothing(tmp_path, photos, monkeypatch):
    import pipeline.prepare as module

    mixed_tree(tmp_path / "src", photos)
    victim = sorted((tmp_path / "src/train/n01").glob("imagenet_*.JPEG"))[0]
    scan = module._scan_files

    def scan_then_cut(splits, settings):
        scans = scan(splits, settings)
        victim.write_bytes(victim.read_bytes()[:1000])
        return scans

    monkeypatch.setattr(module, "_scan_files", scan_then_cut)
    with pytest.raises(DataError, match=f"failed while writing train.beton .*{victim}"):
        prepare(PrepareSettings("folder", tmp_path / "src", tmp_path / "out", workers=2))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["labels.json"]


def test_existing_dataset_is_refused_before_the_scan(tmp_path, photos, monkeypatch):
    import pipeline.prepare as module

    mixed_tree(tmp_path / "src", photos)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/dataset.json").write_text("{}")

    def no_scan(*args):
        raise AssertionError("scanned before refusing")

    monkeypatch.setattr(module, "_scan_files", no_scan)
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare(PrepareSettings("folder", tmp_path / "src", tmp_path / "out"))
