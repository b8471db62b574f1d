"""The description of a prepared dataset: ``DATA/dataset.json``."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import DataError

DATASET_FORMAT = 1


@dataclass(frozen=True)
class SplitInfo:
    file: str
    count: int


@dataclass(frozen=True)
class DatasetInfo:
    format: int
    name: str
    id: str
    kind: str  # "array": fixed-size raw pixels; "image": JPEG-encoded, cropped on load
    input_shape: tuple[int, int, int]
    num_classes: int
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    eval_split: str | None  # the split eval measures by default: test, val, or none
    mean: tuple[float, ...]
    std: tuple[float, ...]
    holdout: int
    seed: int
    label_rule: str = ""  # how class names were ordered into labels
    root: Path | None = None

    def path(self, split: str) -> Path:
        if split not in self.splits:
            raise DataError(
                f"dataset {self.root} has no split {split!r}; it has {sorted(self.splits)}"
            )
        return self.root / self.splits[split].file

    def count(self, split: str) -> int:
        self.path(split)
        return self.splits[split].count

    def save(self, root: Path) -> None:
        data = asdict(self)
        data.pop("root")
        (root / "dataset.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, root: Path) -> "DatasetInfo":
        path = Path(root) / "dataset.json"
        if not path.is_file():
            raise DataError(
                f"no prepared dataset in {root} ({path.name} missing); run `greedy-cli prepare "
                f"DATASET [SRC] --out {root}` first (a run made from {root} needs it restored "
                "as it was: preparing again gives the data a new id)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path} is not valid JSON ({err}); prepare the dataset again") from err
        if data.get("format") != DATASET_FORMAT:
            raise DataError(
                f"{path} has format {data.get('format')!r}, this version reads {DATASET_FORMAT}; "
                "prepare the dataset again"
            )
        try:
            data["splits"] = {k: SplitInfo(**v) for k, v in data["splits"].items()}
            for key in ("input_shape", "classes", "mean", "std"):
                data[key] = tuple(data[key])
            info = cls(root=Path(root).resolve(), **data)
        except (KeyError, TypeError) as err:
            raise DataError(f"{path} is incomplete ({err}); prepare the dataset again") from err
        for split in info.splits:
            if not info.path(split).is_file():
                raise DataError(
                    f"dataset {root} lists split {split!r} but {info.path(split)} is missing; "
                    "prepare the dataset again"
                )
        return info
