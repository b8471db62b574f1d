"""Writing a store on a dask cluster and on fsspec URLs gives the bytes of a single process."""

import fsspec
import pytest
from test_cache import reference, run, settings, store_bytes, trained  # noqa: F401 - fixtures

from pipeline.cache import VerifySettings, cache_features, cache_state, open_features, verify_cache
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
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("greedy-cache")
    yield "s3://greedy-cache"
    server.stop()


@pytest.mark.slow
def test_s3_store_on_a_local_cluster(run, reference, s3_server):  # noqa: F811
    url = f"{s3_server}/stage_0.zarr"
    cache_features(settings(run, store=url, dask_workers=2, region_mb=0.5))
    assert cache_state(run, 0) == "current"
    fsspec.filesystem("s3").invalidate_cache()
    assert store_bytes(url) == reference
