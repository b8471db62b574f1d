"""The feature store's commit protocol: crashes, resume, damage, the writer's lease, checks."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from conftest import TINY_ARCH

from pipeline.cache import (
    CACHE_FORMAT,
    FAULT_ENV,
    LEASE_DIR,
    MANIFEST_KEY,
    CacheSettings,
    InjectedFault,
    Lease,
    VerifySettings,
    _Store,
    cache_features,
    cache_state,
    lease_holder,
    open_features,
    verify_cache,
)
from pipeline.errors import CacheError
from pipeline.rundir import Run
from pipeline.train import TrainSettings, train_layer

CHUNK_MB = 0.1  # 33 samples of 8x14x14 float16: 16 chunks of train, 4 of test
REPO = Path(__file__).resolve().parents[1]


def store_bytes(url: str) -> dict[str, bytes]:
    """Every file of a store by key, the manifest without its timing and the writers'
    claims (a released claim names its writer) left out."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    files = {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}
    files = {k: v for k, v in files.items() if not k.startswith(LEASE_DIR)}
    manifest = json.loads(files.pop("zarr.json"))
    manifest["attributes"][MANIFEST_KEY].pop("seconds", None)
    files["zarr.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def settings(run: Run, **kw) -> CacheSettings:
    """float16 unless told: the overflow and rounding tests are float16's."""
    return CacheSettings(run=run.root, j=0, chunk_mb=CHUNK_MB, **{"dtype": "float16", **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A run with stage 0 trained, and the bytes of its store written without a break."""
    base = tmp_path_factory.mktemp("cache-base")
    arch = base / "tiny.json"
    arch.write_text(json.dumps(TINY_ARCH))
    run = Run.open(base / "run", str(arch), tiny_data, seed=5)
    train_layer(TrainSettings(run=run.root, j=0, max_steps=5), run)
    cache_features(settings(run))
    reference = store_bytes(str(run.features_path(0)))
    shutil.rmtree(run.features_path(0))
    return run.root, reference


@pytest.fixture
def run(trained, tmp_path) -> Run:
    shutil.copytree(trained[0], tmp_path / "run")
    return Run.open(tmp_path / "run")


@pytest.fixture
def reference(trained) -> dict[str, bytes]:
    return trained[1]


def test_store_records_every_chunk(run, reference):
    manifest = cache_features(settings(run))
    assert manifest["format"] == CACHE_FORMAT and manifest["complete"]
    records = [k for k in reference if k.startswith("_greedy/chunks/")]
    assert len(records) == 16 + 4
    assert manifest["chunk_samples"] == 33
    holder = lease_holder(_Store(str(run.features_path(0))))
    assert holder["released"] and holder["generation"] == 0


@pytest.mark.parametrize("fault", ["train:0:before", "train:5:mid", "train:15:after", "test:3:mid"])
def test_resume_after_a_crash_is_byte_identical(run, reference, fault, monkeypatch, caplog):
    monkeypatch.setenv(FAULT_ENV, fault)
    with pytest.raises(InjectedFault):
        cache_features(settings(run))
    assert cache_state(run, 0) == "incomplete"
    with pytest.raises(CacheError, match="is incomplete; run `greedy-cli cache-features"):
        open_features(run, 0, "train")

    monkeypatch.delenv(FAULT_ENV)
    caplog.set_level("INFO", logger="pipeline.cache")
    cache_features(settings(run))
    assert cache_state(run, 0) == "current"
    assert store_bytes(str(run.features_path(0))) == reference
    split, index, _ = fault.split(":")
    finished = int(index) + (16 if split == "test" else 0)
    if finished:
        assert f"{finished} of 20 chunks already finished" in caplog.text


def test_resume_after_a_kill_takes_over_the_dead_writers_lease(run, reference, caplog):
    env = {**os.environ, FAULT_ENV: "train:7:mid:exit", "PYTHONPATH": str(REPO)}
    args = ["cache-features", "--run", str(run.root), "--j", "0", "--chunk-mb", str(CHUNK_MB)]
    args += ["--dtype", "float16"]
    killed = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], env=env, capture_output=True, text=True
    )
    assert killed.returncode == 86, killed.stderr
    holder = lease_holder(_Store(str(run.features_path(0))))
    assert holder["host"] == socket.gethostname() and holder["pid"] != os.getpid()
    assert cache_state(run, 0) == "incomplete"

    caplog.set_level("INFO", logger="pipeline.cache")
    cache_features(settings(run))
    assert f"process {holder['pid']}: it is no longer renewed" in caplog.text
    assert "7 of 20 chunks already finished" in caplog.text
    assert store_bytes(str(run.features_path(0))) == reference


def _truncate_chunk(run: Run, key: str) -> Path:
    path = run.features_path(0) / key
    path.write_bytes(path.read_bytes()[:10])
    return path


def test_truncated_chunk_is_found_named_and_rewritten(run, reference, caplog):
    cache_features(settings(run))
    _truncate_chunk(run, "train/features/c/4/0/0/0")

    caplog.set_level("INFO", logger="pipeline.cache")
    cache_features(settings(run))
    assert "train chunk 4: train/features/c/4/0/0/0 does not match its checksum" in caplog.text
    assert "19 of 20 chunks already finished" in caplog.text
    assert store_bytes(str(run.features_path(0))) == reference


def test_verify_passes_and_is_recorded(run):
    cache_features(settings(run))
    verified = verify_cache(VerifySettings(run=run.root, j=0, rows=40, seed=1))
    assert verified["ok"] and verified["rows_checked"] == 80 and verified["chunks_checked"] == 20
    manifest = zarr.open_group(str(run.features_path(0)), mode="r").attrs[MANIFEST_KEY]
    assert manifest["verified"]["ok"] is True
    assert manifest["verified"]["rows_checked"] == 80
    assert cache_state(run, 0) == "current"


def test_verify_names_a_damaged_chunk_and_a_rerun_repairs_it(run, reference):
    cache_features(settings(run))
    _truncate_chunk(run, "test/labels/c/2")
    with pytest.raises(CacheError, match=r"1 damaged chunk\(s\): test chunk 2: test/labels/c/2"):
        verify_cache(VerifySettings(run=run.root, j=0, seed=1))
    manifest = zarr.open_group(str(run.features_path(0)), mode="r").attrs[MANIFEST_KEY]
    assert manifest["verified"]["ok"] is False
    assert cache_state(run, 0) == "incomplete"

    cache_features(settings(run))
    assert store_bytes(str(run.features_path(0)))["test/labels/c/2"] == reference["test/labels/c/2"]
    assert verify_cache(VerifySettings(run=run.root, j=0, seed=1))["ok"]


def test_verify_recomputes_rows_written_wrong(run):
    cache_features(settings(run))
    # Values altered through zarr with a record to match: only recomputing finds them.
    group = zarr.open_group(str(run.features_path(0)), mode="r+")
    group["test/features"][0:33] = group["test/features"][0:33] * np.float16(1.01) + 0.01
    from pipeline.cache import _sha

    record_path = run.features_path(0) / "_greedy/chunks/test/0.json"
    record = json.loads(record_path.read_text())
    record["features"] = _sha((run.features_path(0) / "test/features/c/0/0/0/0").read_bytes())
    record_path.write_text(json.dumps(record))

    with pytest.raises(CacheError, match="recomputed rows differ from the store beyond float16"):
        verify_cache(VerifySettings(run=run.root, j=0, rows=128, seed=0))


def test_second_writer_is_refused_with_the_holders_identity(run):
    url = str(run.features_path(0))
    with Lease(url, ttl=600):
        with pytest.raises(
            CacheError,
            match=f"is being written by host {socket.gethostname()} process {os.getpid()}",
        ):
            cache_features(settings(run))
    cache_features(settings(run))
    assert cache_state(run, 0) == "current"


def _claim(run, generation: int, **claim) -> Path:
    """Another writer's claim of ``generation`` on stage 0's store."""
    path = run.features_path(0) / LEASE_DIR / f"{generation:012d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "token": "x", **claim}))
    return path


def test_expired_lease_is_taken_over(run, caplog):
    path = _claim(run, 3, renewed=time.time() - 120, ttl=60)
    caplog.set_level("INFO", logger="pipeline.cache")
    cache_features(settings(run))
    assert "from host node-17 process 4242" in caplog.text
    assert cache_state(run, 0) == "current" and not path.exists()


def test_live_lease_of_another_host_is_refused(run):
    _claim(run, 0, renewed=time.time(), ttl=600)
    with pytest.raises(CacheError, match="being written by host node-17 process 4242"):
        cache_features(settings(run))


def test_the_highest_generation_holds_the_store(run):
    _claim(run, 4, renewed=time.time() - 120, ttl=60)
    _claim(run, 5, host="node-2", pid=9, token="y", renewed=time.time(), ttl=600)
    with pytest.raises(CacheError, match="being written by host node-2 process 9"):
        cache_features(settings(run))


@pytest.mark.parametrize("url", ["local", "memory://greedy-lease/s.zarr"])
def test_of_two_claims_on_one_generation_only_one_wins(run, url):
    """Two writers that both saw an expired claim 0 race to create claim 1."""
    url = str(run.features_path(0)) if url == "local" else url
    store = _Store(url)
    store.write(f"{LEASE_DIR}/{0:012d}.json", json.dumps({"renewed": 0, "ttl": 1}).encode())
    first, second = Lease(url, ttl=600), Lease(url, ttl=600)
    holder = first.holder()
    assert first.expired(holder) and second.expired(holder)
    assert first.store.create(f"{LEASE_DIR}/{1:012d}.json", first._claim())
    assert not second.store.create(f"{LEASE_DIR}/{1:012d}.json", second._claim())
    assert lease_holder(store)["token"] == first.token
    # Through acquire: the loser of a race is refused, naming the winner.
    third = Lease(url, ttl=600)
    third.holder = lambda: holder  # it read the store before claim 1 was made
    with pytest.raises(
        CacheError, match=f"claimed at the same moment by host {socket.gethostname()}"
    ):
        third.acquire()
    store.delete(LEASE_DIR, recursive=True)


def _rescale_stage0(run: Run, factor: float) -> None:
    """Stage 0 with every weight and bias multiplied by ``factor``, saved as trained."""
    stage, head = run.load_stage(0)
    with torch.no_grad():
        for name, p in stage.state_dict().items():
            if p.is_floating_point() and "running_var" not in name:
                p.mul_(factor)
    run.save_stage(0, stage, head, run.record(0))


def test_all_zero_chunks_are_complete_and_read_back_exactly(run):
    _rescale_stage0(run, 0.0)
    cache_features(settings(run))
    assert cache_state(run, 0) == "current"
    features, labels, _ = open_features(run, 0, "train")
    assert features.shape == (512, 8, 14, 14)
    assert np.array_equal(features[:], np.zeros(features.shape, np.float16))
    records = list((run.features_path(0) / "_greedy/chunks/train").iterdir())
    assert len(records) == 16
    assert verify_cache(VerifySettings(run=run.root, j=0, seed=0))["ok"]


def test_float16_overflow_stops_the_run(run):
    _rescale_stage0(run, 1e4)
    with pytest.raises(
        CacheError, match=r"stage 0 produced a non-finite value for train sample \d+ \(after the "
    ):
        cache_features(settings(run))
    assert cache_state(run, 0) == "incomplete"
    # The same outputs fit float32.
    cache_features(settings(run, dtype="float32"))
    assert cache_state(run, 0) == "current"


def test_bfloat16_store_holds_the_stage_within_its_rounding(run):
    """bfloat16 keeps float32's range: the outputs that overflow float16 are stored, and
    read back (in memory and streamed) within one bfloat16 step of the stage's outputs."""
    from pipeline.loaders import FeatureLoader, ImageLoader

    _rescale_stage0(run, 1e4)
    manifest = cache_features(settings(run, dtype="bfloat16"))
    assert manifest["dtype"] == "bfloat16" and cache_state(run, 0) == "current"
    features, labels, _ = open_features(run, 0, "test")
    assert features.dtype == np.uint16  # the bits of bfloat16 values
    stage, _ = run.load_stage(0)
    images = ImageLoader(run.data, "test", 64, run.arch.input_shape)
    with torch.no_grad():
        exact = torch.cat([stage(x) for x, _ in images.epoch(0)])
    assert exact.abs().max() > 65504  # beyond float16
    for budget in (1 << 30, 0):
        loader = FeatureLoader(features, labels, 64, memory_budget=budget)
        stored = torch.cat([x for x, _ in loader.epoch(0)])
        assert stored.dtype == torch.float32 and stored.shape == exact.shape
        step = torch.clamp(exact.abs() * 2.0**-7, min=2.0**-133)
        assert ((stored - exact).abs() <= step + 1e-5 * exact.abs().max()).all()
        assert not torch.equal(stored, exact)  # rounded, not float32 by mistake
    verified = verify_cache(VerifySettings(run=run.root, j=0, rows=32, seed=0))
    assert verified["ok"] and verified["dtype"] == "bfloat16"


def test_store_of_other_weights_is_refused(run):
    cache_features(settings(run))
    group = zarr.open_group(str(run.features_path(0)), mode="r+")
    group.attrs[MANIFEST_KEY] = {**group.attrs[MANIFEST_KEY], "lineage": ["other", "weights"]}
    assert cache_state(run, 0) == "stale"
    with pytest.raises(CacheError, match="does not match the stages now trained"):
        open_features(run, 0, "train")


def test_store_of_an_unknown_format_is_refused(run):
    cache_features(settings(run))
    group = zarr.open_group(str(run.features_path(0)), mode="r+")
    group.attrs[MANIFEST_KEY] = {**group.attrs[MANIFEST_KEY], "format": 99}
    assert cache_state(run, 0) == "unsupported"
    with pytest.raises(CacheError, match="has format 99; this greedy-cli reads format 2"):
        open_features(run, 0, "train")
    with pytest.raises(CacheError, match="cache of format 99, which this greedy-cli"):
        cache_features(settings(run))


def test_lack_of_space_is_refused_naming_both_sizes(run, monkeypatch):
    monkeypatch.setattr("pipeline.cache._free_bytes", lambda path: 1_000_000)
    with pytest.raises(CacheError, match=r"needs up to 2\.0 MB in .* has 1\.0 MB free"):
        cache_features(settings(run))


def test_malformed_fault_point_is_refused(run, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "train:x:mid")
    with pytest.raises(CacheError, match="GREEDY_CACHE_FAULT='train:x:mid' is malformed"):
        cache_features(settings(run))


def test_cli_verify_reports_and_records(run):
    from test_cli import ok, refused

    refused("cache-features", "--run", run.root, "--j", 0, "--verify", match="is missing, so there")
    ok("cache-features", "--run", run.root, "--j", 0, "--chunk-mb", CHUNK_MB)
    out = ok("cache-features", "--run", run.root, "--j", 0, "--verify", "--verify-rows", 5).output
    assert "20 chunks match their checksums, 10 recomputed rows match within bfloat16" in out
    manifest = zarr.open_group(str(run.features_path(0)), mode="r").attrs[MANIFEST_KEY]
    assert manifest["verified"]["ok"] is True and manifest["verified"]["rows_checked"] == 10


def test_cli_refuses_two_kinds_of_cluster(run):
    from test_cli import refused

    args = ("cache-features", "--run", run.root, "--j", 0)
    refused(*args, "--dask-workers", 2, "--scheduler", "tcp://127.0.0.1:1", match="not both")


def test_a_released_claim_keeps_its_generation(run):
    """Numbers are never reused: a writer that finds its old claim is not the newest stops."""
    url = str(run.features_path(0))
    first = Lease(url, ttl=600).acquire()
    first._stop.set()  # no renewals by the thread: this test renews by hand
    second = None
    try:
        # first stalls past its time; second takes over, writes and releases.
        first.store.write(f"{LEASE_DIR}/{0:012d}.json", first._claim(renewed=0.0, ttl=1))
        with Lease(url, ttl=600) as second:
            assert second.generation == 1
        assert lease_holder(first.store)["released"]
        first.renew()
        assert first.lost
        with Lease(url, ttl=600) as third:
            assert third.generation == 2
    finally:
        first.release()
    assert second is not None and lease_holder(first.store)["generation"] == 2


def test_a_takeover_between_the_look_and_the_renewal_is_noticed(run):
    url = str(run.features_path(0))
    lease = Lease(url, ttl=600).acquire()
    write = lease.store.write

    def taken_over_then_write(key, data):
        _claim(run, lease.generation + 1, token="other", renewed=time.time(), ttl=600)
        write(key, data)

    try:
        lease.store.write = taken_over_then_write
        lease.renew()
        assert lease.lost
    finally:
        lease.store.write = write
        lease.release()
    assert lease_holder(lease.store)["token"] == "other"


def test_a_writer_that_cannot_renew_stops(run):
    lease = Lease(str(run.features_path(0)), ttl=600).acquire()
    try:
        lease.check()
        lease.renewed = time.time() - 500
        with pytest.raises(CacheError, match="could not be renewed for 500 s"):
            lease.check()
    finally:
        lease.release()


def test_a_takeover_deletes_only_older_claims(run):
    _claim(run, 2, renewed=time.time() - 120, ttl=60)
    stray = run.features_path(0) / LEASE_DIR / "000000000003.json.1234.tmp"
    stray.write_text("being written by a writer that lost the race")
    with Lease(str(run.features_path(0)), ttl=600) as lease:
        assert lease.generation == 3
        assert not (run.features_path(0) / LEASE_DIR / f"{2:012d}.json").exists()
        assert stray.exists()


def test_the_claim_file_of_earlier_versions_is_respected(run):
    legacy = run.features_path(0) / "_greedy" / "lease.json"
    legacy.parent.mkdir(parents=True)
    claim = {"host": "node-8", "pid": 5, "token": "old", "renewed": time.time(), "ttl": 600}
    legacy.write_text(json.dumps(claim))
    with pytest.raises(CacheError, match="being written by host node-8 process 5"):
        cache_features(settings(run))
    legacy.write_text(json.dumps({**claim, "renewed": time.time() - 1200}))
    cache_features(settings(run))
    assert cache_state(run, 0) == "current" and not legacy.exists()


def test_writer_whose_lease_was_taken_over_stops(run):
    url = str(run.features_path(0))
    lease = Lease(url, ttl=600).acquire()
    try:
        lease.renew()
        assert not lease.lost
        _claim(run, lease.generation + 1, token="other", renewed=time.time(), ttl=60)
        lease.renew()
        with pytest.raises(CacheError, match="was taken over by another writer"):
            lease.check()
    finally:
        lease.release()
    # The new holder's claim is left in place.
    assert lease_holder(_Store(url))["token"] == "other"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_reader_refuses_a_missing_chunk_streamed_or_in_memory(run, budget, dtype):
    from pipeline.loaders import FeatureLoader

    cache_features(settings(run, dtype=dtype))
    (run.features_path(0) / "train/features/c/3/0/0/0").unlink()
    features, labels, _ = open_features(run, 0, "train")
    with pytest.raises(CacheError, match="row 99 holds non-finite values"):
        loader = FeatureLoader(features, labels, 32, shuffle=True, memory_budget=budget)
        for _ in loader.epoch(0):
            pass


def test_unfinished_store_is_kept_when_the_options_differ(run, reference, monkeypatch):
    """Rerunning with the default options an unfinished store started with others must not
    throw its chunks away; the refusal gives the options, and status the full command."""
    from pipeline.status import run_status

    monkeypatch.setenv(FAULT_ENV, "train:9:mid")
    with pytest.raises(InjectedFault):
        cache_features(settings(run))
    monkeypatch.delenv(FAULT_ENV)
    before = store_bytes(str(run.features_path(0)))
    with pytest.raises(CacheError, match=r"unfinished store .* other --chunk-mb .*--chunk-mb"):
        cache_features(CacheSettings(run=run.root, j=0, dtype="float16"))
    assert store_bytes(str(run.features_path(0))) == before

    command = run_status(run.root).next_command
    assert command.startswith(f"greedy-cli cache-features --run {run.root} --j 0 --dtype float16")
    chunk_mb = float(command.split("--chunk-mb ")[1].split()[0])
    cache_features(CacheSettings(run=run.root, j=0, chunk_mb=chunk_mb, dtype="float16"))
    assert store_bytes(str(run.features_path(0))) == reference


def test_store_missing_an_array_is_damaged_and_rewritten(run, reference):
    cache_features(settings(run))
    shutil.rmtree(run.features_path(0) / "train" / "labels")
    assert cache_state(run, 0) == "damaged"
    cache_features(settings(run))
    assert cache_state(run, 0) == "current"
    assert store_bytes(str(run.features_path(0))) == reference


@pytest.mark.parametrize(("codec", "level"), [("lz4", 12), ("zstd", 0), ("zstd", 23)])
def test_a_level_out_of_the_codecs_range_is_refused_before_the_store_is_touched(run, codec, level):
    cache_features(settings(run))
    before = store_bytes(str(run.features_path(0)))
    with pytest.raises(CacheError, match=f"--clevel {level} is out of range for --codec {codec}"):
        cache_features(settings(run, codec=codec, clevel=level))
    assert cache_state(run, 0) == "current"
    assert store_bytes(str(run.features_path(0))) == before


def test_no_compression_has_no_level(run):
    manifest = cache_features(settings(run, codec="none", clevel=5))
    assert manifest["codec"] == {"name": "none", "level": 0}
