"""Figure 1 on a GPU: the training step of each stage from a cache, recomputing the frozen
stages, and on inputs already on the GPU, with mixed precision.

Needs only torch and this repository's ``stages`` package, so it runs on a machine where
nothing else can be installed. The data are made for the purpose (a step's cost does not
depend on the pixel values): ``fmnist`` on 1x28x28 images and ``cifar10-k3`` on 3x32x32,
at the preset's batch size. Per stage j, after ``--warmup`` untimed steps, ``--steps``
timed steps of stage j and its head, forward and backward, in ``--precision``:

- cache: stage j-1's outputs stored as float16 in pinned host memory (what the feature
  reader hands over), copied to the GPU batch by batch with ``non_blocking``;
- recompute: images in pinned host memory copied to the GPU and passed through the
  frozen stages 0..j-1 (no gradient) on every step, as the paper's authors trained;
- memory: the same float16 features already on the GPU: the limit for the cached path.

The weights are random; a step costs the same trained or not. Writes
``bench/results/gpu.json`` (or ``--out``) and prints a table; on 2 presets it takes about
a minute on an H200. Run as ``python -m bench.gpu``.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from stages import AuxHead, Stage, load_architecture

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("fmnist", "cifar10-k3")
POOL = 16  # distinct batches cycled through, so that no batch is served from a cache twice


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _pinned(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.pin_memory() if device.type == "cuda" else x


def _stages(arch, device) -> list[tuple[Stage, AuxHead]]:
    built = []
    for j, spec in enumerate(arch.stages):
        stage = Stage(spec, arch.stage_in_shape(j)[0]).to(device, memory_format=torch.channels_last)
        head = AuxHead(spec, arch.num_classes).to(device, memory_format=torch.channels_last)
        built.append((stage, head))
    return built


def _time(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step(k)``, after ``warmup`` calls, the GPU synchronised."""
    for k in range(warmup):
        step(k)
    _sync(device)
    started = time.perf_counter()
    for k in range(steps):
        step(warmup + k)
    _sync(device)
    return (time.perf_counter() - started) / steps


def measure(preset: str, steps: int, warmup: int, precision: str, device) -> list[dict]:
    arch = load_architecture(preset)
    built = _stages(arch, device)
    for stage, _ in built:
        stage.eval()  # the frozen stages below run in eval mode, as in training
    torch.manual_seed(0)
    bs = arch.training.batch_size
    images = _pinned(torch.rand(POOL, bs, *arch.input_shape), device)
    labels = torch.randint(0, arch.num_classes, (POOL, bs), device=device)
    rows = []
    for j in range(arch.depth):
        timings = _measure_stage(arch, built, j, images, labels, steps, warmup, precision, device)
        rows.append(
            {
                "preset": preset,
                "stage": j,
                "batch_size": bs,
                "steps": steps,
                "precision": precision,
                **timings,
                "cache_over_memory": timings["cache_s"] / timings["memory_s"],
                "recompute_over_cache": timings["recompute_s"] / timings["cache_s"],
            }
        )
        print(
            f"{preset} stage {j}: memory {timings['memory_s'] * 1e3:.2f} ms, cache "
            f"{timings['cache_s'] * 1e3:.2f} ms, recompute {timings['recompute_s'] * 1e3:.2f} ms",
            flush=True,
        )
    return rows


def _measure_stage(arch, built, j, images, labels, steps, warmup, precision, device) -> dict:
    """Seconds per training step of stage j from each of the three inputs."""
    stage, head = built[j]
    trunk = [s for s, _ in built[:j]]
    channels_last = torch.channels_last

    def below(x):
        with torch.no_grad(), _autocast(precision, device):
            for s in trunk:
                x = s(x)
        return x

    # Stage j's inputs, computed once: what a cache of stage j-1 holds.
    on_gpu = [
        below(images[i].to(device).contiguous(memory_format=channels_last))
        .half()
        .contiguous(memory_format=channels_last)
        for i in range(POOL)
    ]
    on_host = [_pinned(x.cpu(), device) for x in on_gpu]
    spec = arch.training
    params = [*stage.parameters(), *head.parameters()]
    opt = torch.optim.SGD(
        params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    stage.train()

    def train(x, y):
        with _autocast(precision, device):
            loss = F.cross_entropy(head(stage(x.float() if precision == "fp32" else x)), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def from_cache(k):
        x = on_host[k % POOL].to(device, non_blocking=True)
        train(x.contiguous(memory_format=channels_last), labels[k % POOL])

    def recompute(k):
        x = images[k % POOL].to(device, non_blocking=True)
        train(below(x.contiguous(memory_format=channels_last)), labels[k % POOL])

    def from_memory(k):
        train(on_gpu[k % POOL], labels[k % POOL])

    memory = _time(from_memory, steps, warmup, device)
    cache = _time(from_cache, steps, warmup, device)
    # Stage 0 reads images either way.
    recomputed = _time(recompute, steps, warmup, device) if j else cache
    stage.eval()
    return {"memory_s": memory, "cache_s": cache, "recompute_s": recomputed}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench.gpu needs a CUDA GPU; none is visible to torch (--device cpu to check it)"
        )
    torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    rows = []
    for preset in args.presets:
        rows += measure(preset, args.steps, args.warmup, args.precision, device)
    result = {
        "benchmark": "gpu",
        "machine": {
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "note": "made-for-the-purpose data and random weights; see the module's docstring",
        "device": str(device),
        "stages": rows,
        "bench_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    header = "preset      stage  memory ms  cache ms  recompute ms  cache/memory  recompute/cache"
    print(header)
    for r in rows:
        print(
            f"{r['preset']:<11} {r['stage']:>5}  {r['memory_s'] * 1e3:9.2f}"
            f"  {r['cache_s'] * 1e3:8.2f}  {r['recompute_s'] * 1e3:12.2f}"
            f"  {r['cache_over_memory']:11.2f}x"
            f"  {r['recompute_over_cache']:14.2f}x"
        )
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
