"""prepare's images/s on real photographs, next to a plain torchvision ImageFolder pass.

The tree repeats the 20 ImageNet photographs foolbox ships (512x512 JPEGs) into 20
class folders. Both passes use the same number of worker processes; the ImageFolder
pass only decodes each file once to RGB (torchvision's default loader), while prepare
decodes it twice (the strict scan, then the write), resizes it to the default
--max-resolution and encodes it as JPEG.
"""

import importlib.util
import tempfile
import time
from pathlib import Path

WORKERS = 2


def photographs() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("bench prepare needs foolbox's sample photographs: scripts/setup.sh")
    return sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))


def build_tree(root: Path, n: int, side: int | None = None) -> int:
    """``n`` files under root/train/<class>/, copies of the photographs (re-encoded as
    ``side`` x ``side`` JPEGs of quality 90 when ``side`` is given); their bytes."""
    photos = [_resized(p, side) for p in photographs()]
    total = 0
    for i in range(n):
        folder = root / "train" / f"c{i % len(photos):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photos[(i // len(photos) + i) % len(photos)]
        (folder / f"{i:06d}.JPEG").write_bytes(data)
        total += len(data)
    return total


def _resized(path: Path, side: int | None) -> bytes:
    if side is None:
        return path.read_bytes()
    import io

    from PIL import Image

    out = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").resize((side, side), Image.Resampling.BILINEAR).save(
            out, format="JPEG", quality=90
        )
    return out.getvalue()


def image_folder_pass(root: Path) -> tuple[int, float]:
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=WORKERS)
    started = time.perf_counter()
    count = sum(1 for _ in loader)
    return count, time.perf_counter() - started


def run(small: bool = False) -> dict:
    from pipeline.prepare import PrepareSettings, prepare

    n = 200 if small else 4000
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        nbytes = build_tree(src, n)
        count, folder_seconds = image_folder_pass(src / "train")
        assert count == n, (count, n)
        info, report = prepare(PrepareSettings("folder", src, Path(tmp) / "out", workers=WORKERS))
        assert info.count("train") == n
    return {
        "files": n,
        "source_bytes": nbytes,
        "workers": WORKERS,
        "imagefolder": {"seconds": folder_seconds, "images_per_s": n / folder_seconds},
        "prepare": {
            "seconds": report.seconds,
            "scan_seconds": report.scan_seconds,
            "write_seconds": report.write_seconds,
            "images_per_s": report.images_per_s,
            "bytes_written": report.bytes_written,
            "max_resolution": 500,
            "write_mode": "jpg",
        },
        "prepare_over_imagefolder_time": report.seconds / folder_seconds,
    }


def show(result: dict) -> str:
    from bench.common import table

    folder, prep = result["imagefolder"], result["prepare"]
    rows = [
        ["torchvision ImageFolder (decode only)", folder["seconds"], folder["images_per_s"]],
        [
            "prepare: scan (strict decode)",
            prep["scan_seconds"],
            result["files"] / prep["scan_seconds"],
        ],
        [
            "prepare: write (decode, resize, JPEG)",
            prep["write_seconds"],
            result["files"] / prep["write_seconds"],
        ],
        ["prepare: whole", prep["seconds"], prep["images_per_s"]],
    ]
    head = f"{result['files']:,} photographs, {result['workers']} worker processes"
    return head + "\n" + table(["pass", "seconds", "images/s"], rows)
