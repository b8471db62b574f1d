"""A run directory: its settings, trained stages, caches and their lineage.

Layout::

    RUN/run.json                 preset, data, seed, library versions, git commit
    RUN/arch.json                the resolved architecture
    RUN/metrics.jsonl            one JSON object per epoch, trained stage and evaluation
    RUN/stage_<j>/weights.pt     stage j and its auxiliary head
    RUN/stage_<j>/record.json    hashes, input lineage, settings, environment and results
    RUN/stage_<j>/checkpoints/   checkpoints of a training under way (see pipeline.checkpoints)
    RUN/features/stage_<j>.zarr  stage j's outputs over every split
    RUN/eval.json                accuracies

Validity is decided from hashes, never from a file's existence: stage j is current
when its recorded input lineage (the dataset id and the weight hashes of stages
0..j-1) equals the lineage of the stages now on disk.
"""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from pipeline.datasets import DatasetInfo
from pipeline.errors import RunStateError
from stages import Architecture, AuxHead, Stage, load_architecture
from stages.arch import ArchitectureError

RUN_FORMAT = 1


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_json(path: Path, remedy: str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object holding ``keys``, or a RunStateError naming the file and ``remedy``."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise RunStateError(f"{path} is missing; {remedy}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunStateError(f"{path} is not valid JSON ({err}); {remedy}") from err
    if not isinstance(data, dict):
        raise RunStateError(f"{path} holds a {type(data).__name__}, not an object; {remedy}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise RunStateError(f"{path} is damaged (no {', '.join(missing)}); {remedy}")
    return data


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def environment_record() -> dict:
    import dask
    import numpy
    import zarr

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in (numpy, zarr, dask):
        versions[mod.__name__] = mod.__version__
    try:
        versions["ffcv"] = metadata.version("ffcv")
    except metadata.PackageNotFoundError:
        versions["ffcv"] = "unknown"
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "versions": versions,
        "git_commit": commit,
        "git_uncommitted_changes": None if changes is None else bool(changes),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _git(*args: str) -> str | None:
    """Output of a git command in the code's own checkout, None outside one."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Run:
    root: Path
    arch: Architecture
    data: DatasetInfo
    seed: int

    # -- creation and loading -------------------------------------------------

    @classmethod
    def open(
        cls,
        root: Path,
        preset: str | None = None,
        data: Path | None = None,
        seed: int | None = None,
        stage: int | None = None,
    ) -> "Run":
        """Open a run directory; a new one needs ``preset`` and ``data`` and records them.

        ``stage``, when given, is checked against a new run's architecture before any
        file is written, so that a refused first command leaves nothing behind.
        """
        root = Path(root)
        meta_path = root / "run.json"
        if not meta_path.is_file():
            leftovers = _leftovers(root)
            if leftovers and (preset is None or data is None):
                raise RunStateError(
                    f"{meta_path} is missing but {root} holds {leftovers}: the run's record is "
                    "lost. Start a new --run directory"
                )
            if preset is None or data is None:
                raise RunStateError(
                    f"{root} is not a run directory yet; the first command on it needs "
                    "--preset and --data, e.g. "
                    f"`greedy-cli train-layer --run {root} --j 0 --preset PRESET --data DATA`"
                )
            return cls.create(root, preset, data, seed if seed is not None else 0, stage)

        fresh = "start a new run directory"
        meta = read_json(meta_path, fresh, ("format", "data", "dataset_id", "seed"))
        if not isinstance(meta["seed"], int) or not isinstance(meta["data"], str):
            raise RunStateError(f"{meta_path} is damaged (seed or data malformed); {fresh}")
        if meta.get("format") != RUN_FORMAT:
            raise RunStateError(
                f"{meta_path} has format {meta.get('format')!r}; this version reads {RUN_FORMAT}"
            )
        try:
            arch = Architecture.from_dict(read_json(root / "arch.json", fresh))
        except ArchitectureError as err:
            raise RunStateError(f"{root / 'arch.json'}: {err}; {fresh}") from err
        if preset is not None and (wanted := load_architecture(preset)) != arch:
            raise RunStateError(
                f"{root} was made with architecture {arch.name!r}; --preset {preset} differs "
                f"in {', '.join(_differences(arch.to_dict(), wanted.to_dict())[:5])}. "
                "Use a new --run directory for a different architecture"
            )
        info = DatasetInfo.load(Path(meta["data"]))
        if data is not None and Path(data).resolve() != info.root:
            raise RunStateError(
                f"{root} was made with data {info.root}; --data {data} differs. "
                "Use a new --run directory for other data"
            )
        if info.id != meta["dataset_id"]:
            raise RunStateError(
                f"the dataset in {info.root} was prepared again since {root} was made "
                f"(id {info.id[:8]}, run has {meta['dataset_id'][:8]}); start a new run directory"
            )
        if seed is not None and seed != meta["seed"]:
            raise RunStateError(
                f"{root} was made with --seed {meta['seed']}, not {seed}; leave --seed out to "
                "continue it, or use a new --run directory for another seed"
            )
        return cls(root=root, arch=arch, data=info, seed=meta["seed"])

    @classmethod
    def create(
        cls, root: Path, preset: str, data: Path, seed: int, stage: int | None = None
    ) -> "Run":
        arch = load_architecture(preset)
        info = DatasetInfo.load(Path(data))
        check_compatible(arch, info)
        if stage is not None:
            _check_stage(arch, stage)
        leftovers = _leftovers(root)
        if leftovers:
            raise RunStateError(
                f"{root} has no run.json but holds {leftovers} from an earlier run; "
                "remove them or choose a new --run directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / "arch.json").write_text(arch.to_json())
        write_json_atomic(
            root / "run.json",
            {
                "format": RUN_FORMAT,
                "preset": preset,
                "arch": arch.name,
                "data": str(info.root),
                "dataset_id": info.id,
                "seed": seed,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "environment": environment_record(),
            },
        )
        return cls(root=root, arch=arch, data=info, seed=seed)

    # -- paths -----------------------------------------------------------------

    def stage_dir(self, j: int) -> Path:
        return self.root / f"stage_{j}"

    def weights_path(self, j: int) -> Path:
        return self.stage_dir(j) / "weights.pt"

    def record_path(self, j: int) -> Path:
        return self.stage_dir(j) / "record.json"

    def features_path(self, j: int) -> Path:
        return self.root / "features" / f"stage_{j}.zarr"

    def check_stage_index(self, j: int) -> None:
        _check_stage(self.arch, j)

    # -- modules ---------------------------------------------------------------

    def build_stage(self, j: int) -> tuple[Stage, AuxHead]:
        in_channels = self.arch.stage_in_shape(j)[0]
        stage = Stage(self.arch.stages[j], in_channels)
        head = AuxHead(self.arch.stages[j], self.arch.num_classes)
        return stage, head

    def load_stage(self, j: int) -> tuple[Stage, AuxHead]:
        """Stage j and its head from disk, in eval mode, after checking their hash."""
        record = self.record(j)
        if record is None:
            raise RunStateError(
                f"stage {j} of {self.root} is not trained; "
                f"run `greedy-cli train-layer --run {self.root} --j {j}` first"
            )
        stage, head = self.build_stage(j)
        try:
            saved = torch.load(self.weights_path(j), map_location="cpu", weights_only=True)
            stage.load_state_dict(saved["stage"])
            head.load_state_dict(saved["head"])
        except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on bad bytes
            raise RunStateError(
                f"{self.weights_path(j)} is damaged or not a weights file ({type(err).__name__}); "
                "retrain with "
                f"`greedy-cli train-layer --run {self.root} --j {j}`"
            ) from err
        if state_hash(stage) != record["stage_hash"]:
            raise RunStateError(
                f"{self.weights_path(j)} does not match its record (hash differs); "
                f"retrain with `greedy-cli train-layer --run {self.root} --j {j}`"
            )
        return stage.eval(), head.eval()

    def save_stage(self, j: int, stage: Stage, head: AuxHead, record: dict) -> dict:
        self.stage_dir(j).mkdir(parents=True, exist_ok=True)
        # Without its record, a stage is untrained: never current over other weights.
        self.record_path(j).unlink(missing_ok=True)
        tmp = self.weights_path(j).with_suffix(".pt.tmp")
        torch.save({"stage": stage.state_dict(), "head": head.state_dict()}, tmp)
        os.replace(tmp, self.weights_path(j))
        record = {**record, "stage_hash": state_hash(stage), "head_hash": state_hash(head)}
        write_json_atomic(self.record_path(j), record)
        return record

    # -- state -----------------------------------------------------------------

    def record(self, j: int) -> dict | None:
        path = self.record_path(j)
        if not path.is_file() or not self.weights_path(j).is_file():
            return None
        return read_json(
            path,
            f"retrain with `greedy-cli train-layer --run {self.root} --j {j}`",
            ("lineage", "stage_hash"),
        )

    def lineage(self, j: int) -> list[str] | None:
        """Dataset id and stage hashes 0..j-1 as now on disk; None if one is missing."""
        chain = [self.data.id]
        for i in range(j):
            record = self.record(i)
            if record is None:
                return None
            chain.append(record["stage_hash"])
        return chain

    def stage_current(self, j: int) -> bool:
        record = self.record(j)
        return record is not None and record["lineage"] == self.lineage(j)

    def log_metrics(self, entry: dict) -> None:
        entry = {"time": round(time.time(), 3), **entry}
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _check_stage(arch: Architecture, j: int) -> None:
    if not 0 <= j < arch.depth:
        raise RunStateError(f"--j {j} is out of range: {arch.name} has stages 0..{arch.depth - 1}")


def _leftovers(root: Path) -> list[str]:
    """Stage folders and caches of an earlier run in ``root``."""
    names = sorted(p.name for p in root.glob("stage_*"))
    return names + (["features"] if (root / "features").exists() else [])


def check_compatible(arch: Architecture, info: DatasetInfo) -> None:
    """Refuse an architecture whose input or classes do not fit the dataset."""
    if arch.num_classes != info.num_classes:
        raise RunStateError(
            f"{arch.name} predicts {arch.num_classes} classes but {info.root} has "
            f"{info.num_classes}; choose a preset for this dataset or edit num_classes"
        )
    c, h, w = arch.input_shape
    dc, dh, dw = info.input_shape
    if c != dc:
        raise RunStateError(
            f"{arch.name} takes {c}-channel images but {info.root} holds {dc}-channel ones"
        )
    if info.kind == "array" and (h, w) != (dh, dw):
        raise RunStateError(
            f"{arch.name} takes {h}x{w} images but {info.root} holds {dh}x{dw} ones; "
            "choose a preset whose input_shape matches the data"
        )


def _differences(a, b, where: str = "") -> list[str]:
    """The dotted keys at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _differences(x, y, f"{where}[{i}]")
        return out
    return [] if a == b else [where or "the whole"]
