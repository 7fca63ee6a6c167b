"""The engine on a real dask.distributed cluster of worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT, save_model
from napari_mpt_deblur.cli import main
from napari_mpt_deblur.inference import deblur_array, deblur_file, deblur_lazy, loaded_models

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # every test starts a cluster of worker processes (about 10 s on 2 cores)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, worker_dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def model() -> MPT:
    torch.manual_seed(0)
    return MPT(tiny_config()).eval()


def test_lazy_result_computes_on_the_cluster_with_one_model_per_worker(client, model):
    stack = (np.random.default_rng(0).random((6, 40, 48)) * 4000).astype(np.uint16)
    expected = deblur_array(model, stack)
    before = client.run(loaded_models)
    result = deblur_lazy(model, stack).compute()  # the active client runs it
    # workers run torch with one thread each: float sums may round one grey level differently
    np.testing.assert_allclose(result, expected, atol=1)
    after = client.run(loaded_models)
    # six planes, two worker processes: each built the model at most once for this job
    assert sum(after[w] - before[w] for w in after) <= 2


def test_files_stream_through_the_cluster(client, model, tmp_path):
    source = tmp_path / "stack.tif"
    stack = (np.random.default_rng(1).random((2, 3, 40, 48)) * 255).astype(np.uint8)
    tifffile.imwrite(source, stack, photometric="minisblack", metadata={"axes": "TZYX"})
    events = []
    deblur_file(model, source, tmp_path / "out.tif", client=client, progress=events.append)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.series[0].axes == "TZYX"
        np.testing.assert_allclose(tif.asarray(), deblur_array(model, stack), atol=1)
    assert events[-1].planes_done == events[-1].planes_total == 6


def test_cli_scheduler_address(cluster, model, tmp_path):
    model_file = save_model(model, tmp_path / "m.safetensors")
    source = tmp_path / "in.tif"
    stack = (np.random.default_rng(2).random((3, 40, 48)) * 255).astype(np.uint8)
    tifffile.imwrite(source, stack, photometric="minisblack")
    target = tmp_path / "out.ome.zarr"
    args = ["deblur", str(source), "-o", str(target), "--model", str(model_file), "--quiet"]
    assert main([*args, "--scheduler", cluster.scheduler_address]) == 0
    from napari_mpt_deblur.images import open_image

    np.testing.assert_allclose(open_image(target).data.compute(), deblur_array(model, stack), atol=1)
