"""Architecture descriptions: frozen dataclasses, JSON round trip, shapes and costs."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from stages.presets import PRESETS

BYTES_PER_ELEMENT = {"float16": 2, "bfloat16": 2, "float32": 4}


class ArchitectureError(ValueError):
    """An architecture description that cannot be built."""


@dataclass(frozen=True)
class StageSpec:
    """One stage j: optional psi, 3x3 conv of width M_j, optional batch norm, ReLU.

    ``k`` is the number of hidden layers of the auxiliary problem (k - 1 convs of
    width ``head_width``, M~, in the head). ``epochs`` overrides the training epochs.
    """

    width: int
    downsample: bool = False
    batch_norm: bool = False
    k: int = 1
    head_width: int = 0
    epochs: int | None = None


@dataclass(frozen=True)
class TrainSpec:
    """SGD with momentum and a step schedule; drops at fractions of all training steps."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drops: tuple[float, ...] = (0.3, 0.6, 0.9)
    lr_factor: float = 0.2
    # The training augmentation, used when a run asks for it (views or fresh augmentation):
    # "none", "crop-flip" (pad ``crop_padding``, random crop, flip) or "resized-crop".
    augmentation: str = "none"
    crop_padding: int = 4


@dataclass(frozen=True)
class StageCost:
    j: int
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    stage_params: int
    head_params: int
    stage_macs: int
    head_macs: int
    cached_bytes: int


@dataclass(frozen=True)
class Architecture:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    stages: tuple[StageSpec, ...]
    training: TrainSpec
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        _validate(self)

    @property
    def depth(self) -> int:
        return len(self.stages)

    def epochs(self, j: int) -> int:
        return self.stages[j].epochs or self.training.epochs

    def stage_in_shape(self, j: int) -> tuple[int, int, int]:
        shape = self.input_shape
        for spec in self.stages[:j]:
            shape = _stage_out_shape(shape, spec)
        return shape

    def stage_out_shape(self, j: int) -> tuple[int, int, int]:
        return _stage_out_shape(self.stage_in_shape(j), self.stages[j])

    def costs(self, dtype: str = "float16") -> list[StageCost]:
        rows = []
        for j, spec in enumerate(self.stages):
            c_in, h_in, w_in = self.stage_in_shape(j)
            c_out, h, w = self.stage_out_shape(j)
            conv_in = c_in * 4 if spec.downsample else c_in
            stage_params = _conv_params(conv_in, c_out, spec.batch_norm)
            stage_macs = conv_in * c_out * 9 * h * w
            head_params, head_macs, channels = 0, 0, c_out
            for _ in range(spec.k - 1):
                head_params += _conv_params(channels, spec.head_width, spec.batch_norm)
                head_macs += channels * spec.head_width * 9 * h * w
                channels = spec.head_width
            head_params += channels * 4 * self.num_classes + self.num_classes
            head_macs += channels * 4 * self.num_classes
            rows.append(
                StageCost(
                    j=j,
                    in_shape=(c_in, h_in, w_in),
                    out_shape=(c_out, h, w),
                    stage_params=stage_params,
                    head_params=head_params,
                    stage_macs=stage_macs,
                    head_macs=head_macs,
                    cached_bytes=c_out * h * w * BYTES_PER_ELEMENT[dtype],
                )
            )
        return rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        _require(
            isinstance(data, dict),
            "an architecture description",
            type(data).__name__,
            "a JSON object",
        )
        data = dict(data)
        _check_keys("architecture", data, cls)
        _require(isinstance(data.get("stages"), list), "stages", data.get("stages"), "a list")
        _require(
            isinstance(data.get("training"), dict), "training", data.get("training"), "an object"
        )
        try:
            stages = []
            for j, s in enumerate(data.pop("stages")):
                _require(isinstance(s, dict), f"stages[{j}]", s, "an object")
                _check_keys(f"stages[{j}]", s, StageSpec)
                stages.append(StageSpec(**s))
            training = dict(data.pop("training"))
            _check_keys("training", training, TrainSpec)
            if "lr_drops" in training:
                _require(
                    isinstance(training["lr_drops"], list),
                    "training.lr_drops",
                    training["lr_drops"],
                    "a list",
                )
                training["lr_drops"] = tuple(training["lr_drops"])
            _require(
                isinstance(data.get("input_shape"), list),
                "input_shape",
                data.get("input_shape"),
                "a list [C, H, W]",
            )
            return cls(
                stages=tuple(stages),
                training=TrainSpec(**training),
                input_shape=tuple(data.pop("input_shape")),
                **data,
            )
        except TypeError as err:
            raise ArchitectureError(f"architecture description is incomplete: {err}") from err


def _stage_out_shape(shape: tuple[int, int, int], spec: StageSpec) -> tuple[int, int, int]:
    _, h, w = shape
    if spec.downsample:
        h, w = h // 2, w // 2
    return (spec.width, h, w)


def _conv_params(c_in: int, c_out: int, batch_norm: bool) -> int:
    return c_in * c_out * 9 + (2 * c_out if batch_norm else c_out)


def _check_keys(where: str, data: dict, cls) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ArchitectureError(
            f"unknown key(s) {unknown} in {where}; allowed keys are {sorted(allowed)}"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(ok: bool, field: str, value, want: str) -> None:
    if not ok:
        raise ArchitectureError(f"{field} must be {want}, got {value!r}")


def _validate(arch: Architecture) -> None:
    _require(isinstance(arch.name, str) and arch.name, "name", arch.name, "a non-empty string")
    shape = arch.input_shape
    _require(
        len(shape) == 3 and all(_is_int(s) and s >= 1 for s in shape),
        "input_shape",
        list(shape),
        "[C, H, W] of positive integers",
    )
    _require(
        _is_int(arch.num_classes) and arch.num_classes >= 2,
        "num_classes",
        arch.num_classes,
        "an integer of at least 2",
    )
    _require(len(arch.stages) >= 1, "stages", [], "a list of at least one stage")
    _require(
        arch.training.augmentation in ("none", "crop-flip", "resized-crop"),
        "training.augmentation",
        arch.training.augmentation,
        "'none', 'crop-flip' or 'resized-crop'",
    )
    _require(
        _is_int(arch.training.crop_padding) and arch.training.crop_padding >= 0,
        "training.crop_padding",
        arch.training.crop_padding,
        "a non-negative integer",
    )
    _, h, w = shape
    for j, spec in enumerate(arch.stages):
        where = f"stages[{j}]"
        _require(
            _is_int(spec.width) and spec.width >= 1,
            f"{where}.width",
            spec.width,
            "a positive integer",
        )
        _require(
            isinstance(spec.downsample, bool),
            f"{where}.downsample",
            spec.downsample,
            "true or false",
        )
        _require(
            isinstance(spec.batch_norm, bool),
            f"{where}.batch_norm",
            spec.batch_norm,
            "true or false",
        )
        _require(_is_int(spec.k) and spec.k in (1, 2, 3), f"{where}.k", spec.k, "1, 2 or 3")
        _require(
            _is_int(spec.head_width) and spec.head_width >= 0,
            f"{where}.head_width",
            spec.head_width,
            "a non-negative integer",
        )
        if spec.k > 1:
            _require(
                spec.head_width >= 1,
                f"{where}.head_width",
                spec.head_width,
                f"positive: k={spec.k} needs head_width (M~) > 0",
            )
        _require(
            spec.epochs is None or (_is_int(spec.epochs) and spec.epochs >= 1),
            f"{where}.epochs",
            spec.epochs,
            "a positive integer or null",
        )
        if spec.downsample:
            if h % 2 or w % 2:
                raise ArchitectureError(
                    f"stage {j} downsamples a {h}x{w} map; psi needs even sizes"
                )
            h, w = h // 2, w // 2
        if h < 2 or w < 2:
            raise ArchitectureError(
                f"stage {j} outputs {h}x{w}; the auxiliary head averages to 2x2 "
                "and needs at least that"
            )
    t = arch.training
    _require(_is_int(t.epochs) and t.epochs >= 1, "training.epochs", t.epochs, "a positive integer")
    _require(
        _is_int(t.batch_size) and t.batch_size >= 1,
        "training.batch_size",
        t.batch_size,
        "a positive integer",
    )
    _require(_is_number(t.lr) and t.lr > 0, "training.lr", t.lr, "a positive number")
    _require(
        _is_number(t.momentum) and 0 <= t.momentum < 1,
        "training.momentum",
        t.momentum,
        "a number in [0, 1)",
    )
    _require(
        _is_number(t.weight_decay) and t.weight_decay >= 0,
        "training.weight_decay",
        t.weight_decay,
        "a non-negative number",
    )
    _require(
        all(_is_number(f) and 0 < f < 1 for f in t.lr_drops),
        "training.lr_drops",
        list(t.lr_drops),
        "fractions of training in (0, 1)",
    )
    _require(
        _is_number(t.lr_factor) and 0 < t.lr_factor <= 1,
        "training.lr_factor",
        t.lr_factor,
        "a number in (0, 1]",
    )


def load_architecture(name_or_path: str) -> Architecture:
    """A preset by name, or a user's JSON file written in the same form as ``arch.json``."""
    if name_or_path in PRESETS:
        return Architecture.from_dict(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ArchitectureError(f"architecture file {path} {what}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArchitectureError(f"architecture file {path} is not valid JSON: {err}") from err
        try:
            return Architecture.from_dict(data)
        except ArchitectureError as err:
            raise ArchitectureError(f"architecture file {path}: {err}") from err
    raise ArchitectureError(
        f"unknown preset {name_or_path!r}; choose one of {sorted(PRESETS)} "
        "or give the path of an architecture JSON file"
    )
