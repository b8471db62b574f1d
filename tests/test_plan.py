"""The cache planner: its cost model by hand, its budget, its choice, its command."""

import itertools
import json

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.plan import (
    IMAGES,
    PlanError,
    make_plan,
    parse_bytes,
    predict,
    rates_from_figures,
)
from stages import load_architecture

FIGURES = dict(macs_per_s=1e14, images_per_s=3000, read_mb_s=2000, write_mb_s=1000)


def test_prediction_matches_the_model_by_hand():
    arch = load_architecture("fmnist")
    rates = rates_from_figures(arch, 1e9, 1000, 100, 50)
    costs = arch.costs()
    n, m = 6000, 1000
    plan = predict(arch, rates, (1,), n, m)

    fwd = [c.stage_macs / 1e9 for c in costs]
    step = [3 * (c.stage_macs + c.head_macs) / 1e9 for c in costs]
    byte1 = costs[1].cached_bytes
    # Stage 0 and 1 from the images (stage 1 recomputes stage 0), stage 2 from cache 1.
    train = [
        arch.epochs(0) * n * (1 / 1000 + step[0]),
        arch.epochs(1) * n * (1 / 1000 + fwd[0] + step[1]),
        arch.epochs(2) * n * (byte1 / 100e6 + step[2]),
    ]
    cache = (n + m) * (1 / 1000 + fwd[0] + fwd[1] + byte1 / 50e6)
    assert [s.source for s in plan.stages] == [IMAGES, IMAGES, 1]
    assert [s.train_s for s in plan.stages] == pytest.approx(train, rel=1e-12)
    assert plan.stages[1].cache_s == pytest.approx(cache, rel=1e-12)
    assert plan.predicted_s == pytest.approx(sum(train) + cache, rel=1e-12)
    assert plan.peak_bytes == (n + m) * byte1


@pytest.mark.parametrize("preset", ["fmnist", "cifar10-k3", "imagenet-k1", "imagenet-k3"])
@pytest.mark.parametrize("budget", [0, 10**9, 10**12, 4 * 10**12, 16 * 10**12, None])
def test_plan_is_the_fastest_that_fits_the_budget(preset, budget):
    arch = load_architecture(preset)
    rates = rates_from_figures(arch, **FIGURES)
    plan = make_plan(arch, rates, 1_281_167, 50_000, budget)
    if budget is not None:
        assert plan.peak_bytes <= budget
    stages = range(arch.depth - 1)
    feasible = [
        predict(arch, rates, cached, 1_281_167, 50_000)
        for r in range(arch.depth)
        for cached in itertools.combinations(stages, r)
    ]
    feasible = [p for p in feasible if budget is None or p.peak_bytes <= budget]
    assert plan.predicted_s == min(p.predicted_s for p in feasible)


def test_peak_counts_a_cache_and_the_next_one_written_from_it():
    arch = load_architecture("imagenet-k3")
    rates = rates_from_figures(arch, **FIGURES)
    plan = predict(arch, rates, (2, 4, 6), 1000, 0)
    sizes = {j: plan.stages[j].cache_bytes for j in (2, 4, 6)}
    assert plan.peak_bytes == max(sizes[2] + sizes[4], sizes[4] + sizes[6])
    # Cache 2 feeds stages 3 and 4 (and cache 4's write): free after stage 4.
    assert plan.deletable_after(4) == [2]
    assert plan.deletable_after(6) == [4] and plan.deletable_after(7) == [6]
    assert plan.deletable_after(3) == []


def test_no_budget_for_anything_caches_nothing_and_cheap_storage_caches_more():
    arch = load_architecture("cifar10-k3")
    rates = rates_from_figures(arch, **FIGURES)
    assert make_plan(arch, rates, 50_000, 10_000, budget_bytes=0).cached == ()
    fast = rates_from_figures(arch, 1e12, 100, 10**6, 10**6)
    assert make_plan(arch, fast, 50_000, 10_000).cached == tuple(range(arch.depth - 1))


def test_imagenet_first_stage_is_recomputed_not_read():
    """256x112x112 float16 per image: reading it costs more than recomputing it."""
    arch = load_architecture("imagenet-k1")
    plan = make_plan(arch, rates_from_figures(arch, **FIGURES), 1_281_167, 50_000)
    first = plan.stages[0]
    assert first.bytes_per_view == 1_281_167 * 256 * 112 * 112 * 2
    assert first.read_s_per_epoch > first.recompute_s_per_epoch
    assert 0 not in plan.cached


@pytest.mark.parametrize(
    "text, want",
    [("4TB", 4 * 10**12), ("500 GB", 5 * 10**11), ("1.5TiB", int(1.5 * 2**40)), ("1e9", 10**9)],
)
def test_sizes_parse(text, want):
    assert parse_bytes(text) == want


def test_bad_size_is_refused():
    with pytest.raises(PlanError, match="cannot read '4 lightyears' as a size; .* 4TB"):
        parse_bytes("4 lightyears")


def test_plan_command_prints_and_writes_the_plan(tmp_path):
    args = [
        "plan",
        "imagenet-k1",
        "--samples",
        "1281167",
        "--eval-samples",
        "50000",
        "--budget",
        "1TB",
        "--run",
        str(tmp_path / "run"),
    ]
    for key, value in FIGURES.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "budget 1.0 TB" in result.output and "trains from" in result.output
    assert "loading added to compute" in result.output
    saved = json.loads((tmp_path / "run/plan.json").read_text())
    assert saved["peak_bytes"] <= 10**12 and saved["budget_bytes"] == 10**12
    assert f"cache stages: {', '.join(map(str, saved['cached'])) or 'none'};" in result.output


def test_plan_command_overlap_reaches_the_rates(tmp_path):
    args = ["plan", "cifar10-k3", "--samples", "50000", "--overlap"]
    for key, value in FIGURES.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "loading overlapped with compute" in result.output


def test_plan_command_refuses_partial_figures():
    result = CliRunner().invoke(main, ["plan", "fmnist", "--samples", "100", "--macs-per-s", "1e9"])
    assert result.exit_code == 1
    assert "give all four of --macs-per-s, --images-per-s, --read-mb-s and --write-mb-s" in (
        result.output
    )


def test_overlapped_loading_costs_the_larger_of_load_and_compute():
    arch = load_architecture("cifar10-k3")
    rates = rates_from_figures(arch, 1e9, 500, 100, 50, overlap=True)
    costs = arch.costs()
    plan = predict(arch, rates, (), 1000, 0)
    for j in (0, 3):
        compute = sum(c.stage_macs for c in costs[:j]) / 1e9
        compute += 3 * (costs[j].stage_macs + costs[j].head_macs) / 1e9
        want = arch.epochs(j) * 1000 * max(1 / 500, compute)
        assert plan.stages[j].train_s == pytest.approx(want, rel=1e-12)
