"""Writing a store on a dask cluster and on fsspec URLs gives the bytes of a single process."""

import uuid

import fsspec
import pytest
from test_cache import reference, run, settings, store_bytes, trained  # noqa: F401 - fixtures

from pipeline.cache import (
    LEASE_DIR,
    Lease,
    VerifySettings,
    cache_features,
    cache_state,
    lease_holder,
    open_features,
    verify_cache,
)
from pipeline.errors import CacheError

pytest.importorskip("distributed")


@pytest.mark.slow
def test_local_cluster_writes_the_same_bytes(run, reference):  # noqa: F811
    cache_features(settings(run, dask_workers=2, region_mb=0.5))
    assert cache_state(run, 0) == "current"
    assert store_bytes(str(run.features_path(0))) == reference


def test_memory_store_on_a_cluster_of_threads(run, reference):  # noqa: F811
    url = "memory://greedy-test/stage_0.zarr"
    try:
        cache_features(settings(run, store=url, dask_workers=2, region_mb=0.5))
        assert cache_state(run, 0) == "current"
        assert store_bytes(url) == reference
        # Readers find the store through the run's location file.
        features, labels, _ = open_features(run, 0, "test")
        assert features.shape == (128, 8, 14, 14) and len(labels) == 128
        assert verify_cache(VerifySettings(run=run.root, j=0, rows=8, seed=0))["ok"]
    finally:
        fsspec.filesystem("memory").rm("/greedy-test", recursive=True)


def test_memory_store_is_refused_for_a_remote_scheduler(run):  # noqa: F811
    with pytest.raises(CacheError, match="lives in this process's memory"):
        cache_features(settings(run, store="memory://x/s.zarr", scheduler="tcp://127.0.0.1:1"))


@pytest.fixture
def s3_server(monkeypatch):
    """An S3 server (moto) on 127.0.0.1 with one bucket; credentials are its dummies."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem.clear_instance_cache()  # instances hold an earlier server's address
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    # moto keeps its buckets for the life of the process: one of its own per test.
    bucket = f"greedy-cache-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    server.stop()


@pytest.mark.slow
def test_s3_store_on_a_local_cluster(run, reference, s3_server):  # noqa: F811
    url = f"{s3_server}/stage_0.zarr"
    cache_features(settings(run, store=url, dask_workers=2, region_mb=0.5))
    assert cache_state(run, 0) == "current"
    fsspec.filesystem("s3").invalidate_cache()
    assert store_bytes(url) == reference


@pytest.mark.slow
def test_s3_claims_are_create_only(s3_server):
    """On S3 a claim is a conditional write: a second claim of one generation fails."""
    url = f"{s3_server}/stage_0.zarr"
    first, second = Lease(url, ttl=600), Lease(url, ttl=600)
    key = f"{LEASE_DIR}/{0:012d}.json"
    assert first.store.create(key, first._claim())
    assert not second.store.create(key, second._claim())
    assert lease_holder(second.store)["token"] == first.token
    first.store.delete(key)
    with first:
        with pytest.raises(CacheError, match="is being written by host"):
            second.acquire()
