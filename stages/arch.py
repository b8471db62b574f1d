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
        data = dict(data)
        _check_keys("architecture", data, cls)
        try:
            stages = []
            for j, s in enumerate(data.pop("stages")):
                _check_keys(f"stages[{j}]", s, StageSpec)
                stages.append(StageSpec(**s))
            training = dict(data.pop("training"))
            _check_keys("training", training, TrainSpec)
            if "lr_drops" in training:
                training["lr_drops"] = tuple(training["lr_drops"])
            return cls(
                stages=tuple(stages),
                training=TrainSpec(**training),
                input_shape=tuple(data.pop("input_shape")),
                **data,
            )
        except (KeyError, TypeError) as err:
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


def _validate(arch: Architecture) -> None:
    if len(arch.input_shape) != 3 or min(arch.input_shape) < 1:
        raise ArchitectureError(f"input_shape must be (C, H, W), got {arch.input_shape}")
    if arch.num_classes < 2:
        raise ArchitectureError(f"num_classes must be at least 2, got {arch.num_classes}")
    if not arch.stages:
        raise ArchitectureError("an architecture needs at least one stage")
    _, h, w = arch.input_shape
    for j, spec in enumerate(arch.stages):
        if spec.width < 1:
            raise ArchitectureError(f"stage {j}: width must be positive, got {spec.width}")
        if spec.k not in (1, 2, 3):
            raise ArchitectureError(f"stage {j}: k must be 1, 2 or 3, got {spec.k}")
        if spec.k > 1 and spec.head_width < 1:
            raise ArchitectureError(
                f"stage {j}: k={spec.k} needs head_width (M~) > 0, got {spec.head_width}"
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
    if arch.training.epochs < 1 or arch.training.batch_size < 1:
        raise ArchitectureError("training.epochs and training.batch_size must be positive")
    if any(not 0 < f < 1 for f in arch.training.lr_drops):
        raise ArchitectureError(
            f"training.lr_drops are fractions of training in (0, 1), got {arch.training.lr_drops}"
        )


def load_architecture(name_or_path: str) -> Architecture:
    """A preset by name, or a user's JSON file written in the same form as ``arch.json``."""
    if name_or_path in PRESETS:
        return Architecture.from_dict(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ArchitectureError(f"architecture file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ArchitectureError(f"architecture file {path} is not valid JSON: {err}") from err
        return Architecture.from_dict(data)
    raise ArchitectureError(
        f"unknown preset {name_or_path!r}; choose one of {sorted(PRESETS)} "
        "or give the path of an architecture JSON file"
    )
