"""The ``greedy-cli`` command line: one thin verb per step of greedy training."""

import logging
import os
import sys
from pathlib import Path

import click

from pipeline.defaults import (
    CODEC_LEVEL_RANGES,
    CODEC_LEVELS,
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_DTYPE,
    STORAGE_DTYPES,
)
from pipeline.errors import GreedyError
from stages.arch import ArchitectureError

DTYPES = click.Choice(list(STORAGE_DTYPES))


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("pipeline", "stages"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("numba", "distributed", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Group(click.Group):
    """Report the pipeline's refusals as one-line errors, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (GreedyError, ArchitectureError) as err:
            raise click.ClickException(str(err)) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def main(verbose: bool) -> None:
    """Greedy layerwise training of CNNs (Belilovsky et al., ICML 2019), one stage at a
    time, each stage trained from the cached features of the one below."""
    _setup_logging(verbose)


workers_option = click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(1), help="Loader threads."
)
threads_option = click.option(
    "--threads", default=None, type=click.IntRange(1), help="Torch threads [default: all cores]."
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Training arithmetic: float32, or mixed precision with bfloat16 or float16 "
    "[default: fp32, or a resumed checkpoint's].",
)


def _parse_budget(ctx, param, value):
    from pipeline.plan import PlanError, parse_bytes

    try:
        return parse_bytes(value)
    except PlanError as err:
        raise click.BadParameter(str(err)) from None


memory_budget_option = click.option(
    "--memory-budget",
    default="8GiB",
    show_default=True,
    callback=_parse_budget,
    help="Hold a cache in memory when it fits this size (e.g. 2GB, 0 to always stream "
    "whole chunks from the store in a shuffled order).",
)
deterministic_option = click.option(
    "--deterministic",
    is_flag=True,
    help="Refuse non-deterministic kernels so that repeated runs are bitwise equal.",
)


@main.command()
@click.argument("preset")
@click.option(
    "--dtype",
    type=DTYPES,
    default=DEFAULT_DTYPE,
    show_default=True,
    help="Storage dtype for the cached-bytes column.",
)
@click.option(
    "--views",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Views per training sample, for the cached-bytes column.",
)
def describe(preset: str, dtype: str, views: int) -> None:
    """Shapes, parameters, multiply-adds and cached bytes of each stage of PRESET
    (a preset name or an architecture JSON file); with --views V, a training sample's
    cached bytes count its V views."""
    from stages import load_architecture

    arch = load_architecture(preset)
    rows = arch.costs(dtype)
    click.echo(
        f"{arch.name}: {arch.depth} stages, input {_shape(arch.input_shape)}, "
        f"{arch.num_classes} classes"
    )
    header = (
        "j",
        "in",
        "out",
        "psi",
        "BN",
        "k",
        "M~",
        "params",
        "head params",
        "MACs/sample",
        "head MACs",
        f"cached ({dtype})" if views == 1 else f"cached ({dtype}, {views} views)",
    )
    table = [
        (
            str(r.j),
            _shape(r.in_shape),
            _shape(r.out_shape),
            "yes" if arch.stages[r.j].downsample else "",
            "yes" if arch.stages[r.j].batch_norm else "",
            str(arch.stages[r.j].k),
            str(arch.stages[r.j].head_width or ""),
            f"{r.stage_params:,}",
            f"{r.head_params:,}",
            _si(r.stage_macs),
            _si(r.head_macs),
            _bytes(r.cached_bytes * views),
        )
        for r in rows
    ]
    click.echo(_table(header, table))
    total_params = sum(r.stage_params for r in rows) + rows[-1].head_params
    total_macs = sum(r.stage_macs for r in rows) + rows[-1].head_macs
    click.echo(
        f"final model (all stages + last head): {total_params:,} parameters, "
        f"{_si(total_macs)} MACs per sample"
    )


@main.command()
@click.argument(
    "dataset", type=click.Choice(["fashion-mnist", "cifar10", "cifar100", "imagenet", "folder"])
)
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write the FFCV datasets into.",
)
@click.option(
    "--holdout",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Keep N training samples apart as a 'holdout' split.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the holdout draw and the write order."
)
@click.option(
    "--max-resolution",
    default=500,
    show_default=True,
    type=click.IntRange(0),
    help="Longest side of stored images read from files; 0 keeps every size.",
)
@click.option(
    "--write-mode",
    type=click.Choice(["jpg", "raw"]),
    default="jpg",
    show_default=True,
    help="How images read from files are stored: JPEG, or lossless raw pixels.",
)
@click.option("--jpeg-quality", default=90, show_default=True, type=click.IntRange(1, 100))
@click.option("--strict", is_flag=True, help="Stop at any bad image file instead of skipping it.")
@click.option(
    "--devkit",
    type=click.Path(path_type=Path),
    help="ILSVRC2012 devkit (folder or .tar.gz) labelling a flat ImageNet val/ folder.",
)
@click.option("--overwrite", is_flag=True, help="Replace a dataset already prepared in --out.")
@click.option(
    "--workers",
    default=min(8, os.cpu_count() or 1),
    show_default=True,
    type=click.IntRange(1),
    help="Processes reading and writing images.",
)
def prepare(
    dataset,
    src,
    out,
    holdout,
    seed,
    max_resolution,
    write_mode,
    jpeg_quality,
    strict,
    devkit,
    overwrite,
    workers,
) -> None:
    """Write DATASET (read from SRC) as FFCV datasets, one per split, into --out.

    fashion-mnist reads the IDX files of the Debian package dataset-fashion-mnist by
    default; cifar10 and cifar100 read the python batches; imagenet and folder read
    SRC/train/<class>/ and SRC/val/ trees (ImageNet's flat val/ labelled by --devkit).
    Bad image files are skipped and listed unless --strict."""
    from pipeline.prepare import PrepareSettings, summary
    from pipeline.prepare import prepare as run_prepare

    info, report = run_prepare(
        PrepareSettings(
            dataset=dataset,
            src=src,
            out=out,
            holdout=holdout,
            seed=seed,
            max_resolution=max_resolution,
            write_mode=write_mode,
            jpeg_quality=jpeg_quality,
            workers=workers,
            strict=strict,
            devkit=devkit,
            overwrite=overwrite,
            progress=_bar,
        )
    )
    click.echo(
        f"prepared {info.name} in {out}: {info.num_classes} classes ({report.label_rule}), "
        f"images {_shape(info.input_shape)}"
    )
    for line in summary(report):
        click.echo(f"  {line}")


def _run_options(f):
    f = click.option(
        "--seed", default=None, type=int, help="Seed of a new run directory [default: 0]."
    )(f)
    f = click.option(
        "--data",
        type=click.Path(path_type=Path, file_okay=False),
        help="Prepared dataset (needed by the first command on a new run).",
    )(f)
    f = click.option("--preset", help="Preset or architecture JSON (first command on a new run).")(
        f
    )
    return f


def _check_source(ctx, param, value):
    from pipeline.cache import check_source

    if value is None:
        return value
    try:
        return check_source(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


@main.command("train-layer")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--j", "j", required=True, type=click.IntRange(0), help="Stage to train.")
@_run_options
@click.option(
    "--source",
    default=None,
    callback=_check_source,
    help="Stage j's input: 'cache' (stage j-1's features), 'nearest' (the nearest stage "
    "below with current features, else the images), 'cache:I' (stage I's features) or "
    "'recompute' (the images); the frozen stages in between run on every batch "
    "[default: cache, or a resumed checkpoint's].",
)
@click.option(
    "--augment",
    is_flag=True,
    help="Train on augmented inputs: images freshly augmented every batch, or one of a "
    "cache's views (cache-features --views) per chunk and epoch.",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=None,
    help="Override the architecture's epochs for this stage.",
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    default=None,
    help="Train exactly N steps instead of the epochs (schedule scaled to N).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest good checkpoint.")
@click.option("--restart", is_flag=True, help="Discard the stage's checkpoints and start over.")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="Steps between checkpoints (one is also written at every epoch end).",
)
@memory_budget_option
@precision_option
@deterministic_option
@workers_option
@threads_option
def train_layer_cmd(
    run_dir,
    j,
    preset,
    data,
    seed,
    source,
    augment,
    epochs,
    steps,
    resume,
    restart,
    checkpoint_every,
    memory_budget,
    precision,
    deterministic,
    workers,
    threads,
):
    """Train stage J and its auxiliary head, stages 0..J-1 frozen."""
    from pipeline.train import TrainSettings, train_layer

    if resume and restart:
        raise click.BadParameter("give --resume or --restart, not both", param_hint="--resume")
    _set_threads(threads)
    result = train_layer(
        TrainSettings(
            run=run_dir,
            j=j,
            preset=preset,
            data=data,
            seed=seed,
            source=source,
            augment=augment,
            epochs=epochs,
            max_steps=steps,
            resume=resume,
            restart=restart,
            checkpoint_every=checkpoint_every,
            memory_budget=memory_budget,
            precision=precision,
            deterministic=deterministic,
            workers=workers,
            progress=_bar,
        )
    )
    rec = result.record
    click.echo(
        f"stage {j} trained in {rec['seconds']:.1f} s: train loss "
        f"{rec['final_train_loss']:.4f}, train accuracy {rec['final_train_accuracy']:.2f}%"
    )


@main.command("cache-features")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--j", "j", required=True, type=click.IntRange(0), help="Stage whose outputs to cache."
)
@click.option("--dtype", type=DTYPES, default=DEFAULT_DTYPE, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Inference batch [default: the training batch size].",
)
@click.option(
    "--chunk-mb",
    type=click.FloatRange(0.01),
    default=4.0,
    show_default=True,
    help="Uncompressed size of one chunk of samples.",
)
@click.option("--codec", type=click.Choice(list(CODECS)), default=DEFAULT_CODEC, show_default=True)
@click.option(
    "--clevel",
    type=click.IntRange(0, 22),
    default=None,
    help="Codec level: "
    + ", ".join(
        f"{k} {CODEC_LEVEL_RANGES[k][0]}-{CODEC_LEVEL_RANGES[k][1]} (default {v})"
        for k, v in CODEC_LEVELS.items()
        if k != "none"
    )
    + ".",
)
@click.option(
    "--store",
    default=None,
    help="fsspec URL of the store (s3://..., memory://...) [default: RUN/features/stage_J.zarr].",
)
@click.option(
    "--dask-workers",
    type=click.IntRange(1),
    default=None,
    help="Write on a local dask cluster of N worker processes bound to 127.0.0.1.",
)
@click.option("--scheduler", default=None, help="Write on the dask cluster at ADDRESS.")
@click.option(
    "--source",
    default="cache",
    show_default=True,
    callback=_check_source,
    help="Stage J's input, as for train-layer.",
)
@click.option(
    "--views",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Views of each training sample: the sample itself, then V-1 copies augmented with "
    "the architecture's training augmentation, recorded in the store.",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Write nothing: check every chunk's checksum and recompute a random sample of rows.",
)
@click.option(
    "--verify-rows",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Rows per split that --verify recomputes.",
)
@workers_option
@threads_option
def cache_features_cmd(
    run_dir,
    j,
    dtype,
    batch_size,
    chunk_mb,
    codec,
    clevel,
    store,
    dask_workers,
    scheduler,
    source,
    views,
    verify,
    verify_rows,
    workers,
    threads,
):
    """Write stage J's outputs over every split to RUN/features/stage_J.zarr, or finish
    an interrupted store; with --verify, check it."""
    from pipeline.cache import CacheSettings, VerifySettings, cache_features, verify_cache

    _set_threads(threads)
    if verify:
        result = verify_cache(
            VerifySettings(
                run=run_dir, j=j, rows=verify_rows, batch_size=batch_size, workers=workers
            )
        )
        click.echo(
            f"stage {j} cache verified: {result['chunks_checked']} chunks match their "
            f"checksums, {result['rows_checked']} recomputed rows match within "
            f"{result['dtype']} rounding"
        )
        return
    manifest = cache_features(
        CacheSettings(
            run=run_dir,
            j=j,
            dtype=dtype,
            batch_size=batch_size,
            chunk_mb=chunk_mb,
            codec=codec,
            clevel=clevel,
            store=store,
            dask_workers=dask_workers,
            scheduler=scheduler,
            source=source,
            views=views,
            workers=workers,
            progress=_bar,
        )
    )
    splits = ", ".join(f"{k} {v:,}" for k, v in manifest["splits"].items())
    click.echo(f"stage {j} features ({dtype}, {splits}) written in {manifest['seconds']:.1f} s")


@main.command("eval")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--split", default=None, help="Split to measure [default: the dataset's test split].")
@workers_option
@threads_option
def eval_cmd(run_dir, split, workers, threads):
    """Top-1 and top-5 of every stage's head, the final model and the ensemble."""
    from pipeline.evaluate import EvalSettings, evaluate

    _set_threads(threads)
    report = evaluate(EvalSettings(run=run_dir, split=split, workers=workers, progress=_bar))
    click.echo(format_report(report))
    click.echo(f"written to {report['path']}")


@main.command("run")
@click.argument("preset")
@click.option("--data", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", default=None, type=int, help="Seed of a new run directory [default: 0].")
@click.option(
    "--source", type=click.Choice(["cache", "recompute"]), default="cache", show_default=True
)
@click.option(
    "--dtype",
    type=DTYPES,
    default=DEFAULT_DTYPE,
    show_default=True,
    help="Storage dtype of the feature caches.",
)
@click.option(
    "--plan",
    "make_plan",
    is_flag=True,
    help="Measure this machine and choose which stages to cache first (see `plan`); "
    "a RUN/plan.json made by `plan` is followed without it.",
)
@click.option("--budget", help="With --plan: storage the caches may take, e.g. 500GB.")
@click.option("--keep-caches", is_flag=True, help="With a plan: keep caches nothing needs.")
@click.option(
    "--views",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Cache V views of each training sample and train every stage augmented.",
)
@click.option(
    "--augment",
    is_flag=True,
    help="Train every stage augmented (with --source recompute: fresh augmentation at every "
    "step, as the paper's authors did).",
)
@memory_budget_option
@precision_option
@deterministic_option
@workers_option
@threads_option
def run_cmd(
    preset,
    data,
    run_dir,
    seed,
    source,
    dtype,
    make_plan,
    budget,
    keep_caches,
    views,
    augment,
    memory_budget,
    precision,
    deterministic,
    workers,
    threads,
):
    """Train, cache and evaluate every stage of PRESET, skipping what is current;
    a stage whose training was stopped resumes from its newest good checkpoint. With a
    plan, only the planned stages are cached and each cache is deleted once nothing
    needs it."""
    from pipeline.greedy import RunSettings, run_greedy
    from pipeline.plan import parse_bytes

    _set_threads(threads)
    report = run_greedy(
        RunSettings(
            preset=preset,
            data=data,
            run=run_dir,
            seed=seed,
            source=source,
            dtype=dtype,
            plan=make_plan,
            budget_bytes=None if budget is None else parse_bytes(budget),
            keep_caches=keep_caches,
            views=views,
            augment=augment,
            memory_budget=memory_budget,
            precision=precision,
            deterministic=deterministic,
            workers=workers,
            progress=_bar,
        )
    )
    click.echo(format_report(report))


@main.command()
@click.argument("preset")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False), help="Prepared dataset.")
@click.option("--samples", type=click.IntRange(1), help="Training samples [default: DATA's].")
@click.option("--eval-samples", type=click.IntRange(0), help="Eval samples [default: DATA's].")
@click.option("--budget", help="Storage for caches, e.g. 4TB or 500GiB [default: unlimited].")
@click.option("--views", default=1, show_default=True, type=click.IntRange(1))
@click.option("--dtype", type=DTYPES, default=DEFAULT_DTYPE, show_default=True)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the plan to DIR/plan.json.",
)
@click.option("--macs-per-s", type=float, help="Given compute rate (multiply-adds/s).")
@click.option("--images-per-s", type=float, help="Given image loading rate.")
@click.option("--read-mb-s", type=float, help="Given store read speed (MB/s).")
@click.option("--write-mb-s", type=float, help="Given store write speed (MB/s).")
@click.option(
    "--overlap",
    is_flag=True,
    help="With given figures: loading and writing run alongside compute (a GPU machine).",
)
@threads_option
def plan(
    preset,
    data,
    samples,
    eval_samples,
    budget,
    views,
    dtype,
    run_dir,
    macs_per_s,
    images_per_s,
    read_mb_s,
    write_mb_s,
    overlap,
    threads,
) -> None:
    """Which stages of PRESET to cache for the fastest greedy run within --budget.

    Rates are measured on this machine (stages on random inputs, image loading from
    DATA, a store probe) unless all four figures are given."""
    from pipeline.plan import PlanSettings, parse_bytes
    from pipeline.plan import plan as make

    _set_threads(threads)
    result = make(
        PlanSettings(
            preset=preset,
            data=data,
            train_samples=samples,
            eval_samples=eval_samples,
            budget_bytes=None if budget is None else parse_bytes(budget),
            views=views,
            dtype=dtype,
            run=run_dir,
            macs_per_s=macs_per_s,
            images_per_s=images_per_s,
            read_mb_s=read_mb_s,
            write_mb_s=write_mb_s,
            overlap=overlap,
        )
    )
    click.echo(format_plan(result))
    if run_dir is not None:
        click.echo(f"plan written to {run_dir / 'plan.json'}")


def format_plan(plan) -> str:
    """The plan as a table: per stage, its cache's size and what reading or recomputing
    its output costs per epoch, and the choice."""
    budget = "unlimited" if plan.budget_bytes is None else _size(plan.budget_bytes)
    lines = [
        f"{plan.preset}: {plan.train_samples:,} training samples x {plan.views} view(s) + "
        f"{plan.eval_samples:,} eval, {plan.dtype}, budget {budget}",
        f"rates: {plan.rates.source}",
        "",
    ]
    header = [
        "stage",
        "cache/view",
        "read/epoch",
        "recompute/epoch",
        "trains from",
        "cache",
        "train",
        "write cache",
    ]
    rows = [
        [
            str(s.j),
            _size(s.bytes_per_view),
            _duration(s.read_s_per_epoch),
            _duration(s.recompute_s_per_epoch),
            "images" if s.source < 0 else f"cache {s.source}",
            _size(s.cache_bytes) if s.cached else "-",
            _duration(s.train_s),
            _duration(s.cache_s) if s.cached else "-",
        ]
        for s in plan.stages
    ]
    lines.append(_table(header, rows))
    cached = ", ".join(map(str, plan.cached)) or "none"
    lines += [
        "",
        f"cache stages: {cached}; predicted run {_duration(plan.predicted_s)} "
        f"(evaluation not counted); peak storage {_size(plan.peak_bytes)}",
        f"against: recomputing every stage {_duration(plan.recompute_all_s)}; caching every "
        f"stage {_duration(plan.cache_all_s)} with {_size(plan.cache_all_peak_bytes)} at peak",
    ]
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


@main.command("status")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path, file_okay=False))
def status_cmd(run_dir):
    """Which stages are trained, cached, verified, current or stale; the next command."""
    from pipeline.status import run_status

    status = run_status(run_dir)
    header = ("stage", "trained", "cache", "checked", "checkpoint")
    last = len(status.stages) - 1
    rows = [
        (
            str(s.j),
            s.trained,
            "not needed" if s.j == last and s.cache == "missing" else s.cache,
            s.verified,
            s.checkpoint,
        )
        for s in status.stages
    ]
    click.echo(f"{status.arch} in {status.run}")
    click.echo(_table(header, rows))
    click.echo(f"evaluation: {status.evaluated}")
    click.echo(
        f"next: {status.next_command}" if status.next_command else "next: nothing, all current"
    )


def _bar(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count())


def format_report(report: dict) -> str:
    lines = [
        f"{report['arch']} on split {report['split']} ({report['final']['samples']:,} samples)"
    ]
    header = ("model", "input", "top-1 %", "top-5 %", "train s", "cache s")
    rows = [
        (
            f"stage {s['stage']} head",
            s["input"],
            f"{s['top1']:.2f}",
            f"{s['top5']:.2f}",
            _seconds(s.get("train_seconds")),
            _seconds(s.get("cache_seconds")),
        )
        for s in report["stages"]
    ]
    rows.append(
        (
            "final model",
            "images, float32",
            f"{report['final']['top1']:.2f}",
            f"{report['final']['top5']:.2f}",
            "",
            "",
        )
    )
    rows.append(
        (
            "ensemble",
            "images, float32",
            f"{report['ensemble']['top1']:.2f}",
            f"{report['ensemble']['top5']:.2f}",
            "",
            "",
        )
    )
    lines.append(_table(header, rows))
    for f in report.get("cache_fidelity", []):
        lines.append(
            f"stage {f['stage']} cache vs float32 trunk: max |diff| "
            f"{f['max_abs_diff']:.3g} ({f['max_rel_diff']:.2e} of the largest value)"
        )
    return "\n".join(lines)


def _table(header, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*row) for row in rows]
    return "\n".join(line.rstrip() for line in out)


def _shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _seconds(s) -> str:
    return "" if s is None else f"{s:.1f}"


if __name__ == "__main__":
    main()
