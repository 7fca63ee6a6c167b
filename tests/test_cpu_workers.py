"""Planes and tiles deblurred side by side on the CPU, one torch thread each."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT
from napari_mpt_deblur.config import DeblurSettings
from napari_mpt_deblur.inference import Deblurrer, deblur_array, iter_deblur
from napari_mpt_deblur.runtime import MAX_CPU_WORKERS, cpu_workers, map_side_by_side, torch_threads


@pytest.fixture(scope="module")
def model() -> MPT:
    torch.manual_seed(0)
    return MPT(tiny_config()).eval()


@pytest.fixture
def stack() -> np.ndarray:
    return (np.random.default_rng(0).random((5, 64, 80)) * 4000).astype(np.uint16)


def side_by_side_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("deblur", "torch-side-by-side"))]


def test_worker_count_follows_threads_and_tasks() -> None:
    with torch_threads(2):
        assert cpu_workers(1) == 1
        assert cpu_workers(5) == 2
    with torch_threads(1):
        assert cpu_workers(5) == 1
    with torch_threads(64):
        assert cpu_workers(100) == MAX_CPU_WORKERS


def test_map_side_by_side_keeps_order_modes_and_thread_shares() -> None:
    def probe(item: int) -> tuple[int, int, bool, bool]:
        return item, torch.get_num_threads(), torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    with torch_threads(4), torch.inference_mode():
        results = list(map_side_by_side(probe, list(range(7)), workers=2))
        assert torch.get_num_threads() == 4  # the caller's setting is untouched
    assert [r[0] for r in results] == list(range(7))
    assert {r[1] for r in results} == {2}  # 4 threads shared by 2 workers
    assert all(r[2] and not r[3] for r in results)
    with torch.no_grad():
        assert not any(r[3] for r in map_side_by_side(probe, [0, 1], workers=2))


def test_closing_map_side_by_side_starts_no_more_calls() -> None:
    started = []

    def record(item: int) -> int:
        started.append(item)
        return item

    results = map_side_by_side(record, list(range(20)), workers=2)
    assert next(results) == 0
    results.close()
    assert len(started) <= 4
    assert not side_by_side_threads()


def test_planes_side_by_side_match_one_at_a_time(model: MPT, stack: np.ndarray) -> None:
    with torch_threads(1):  # one worker: planes one after another
        sequential = deblur_array(model, stack, "ZYX")
    with torch_threads(2):
        progress = []
        side_by_side = deblur_array(model, stack, "ZYX", progress=progress.append)
        assert torch.get_num_threads() == 2
    np.testing.assert_allclose(side_by_side.astype(int), sequential.astype(int), atol=1)
    tiles = [p.tiles_done for p in progress]
    assert tiles == sorted(tiles) and tiles[-1] == progress[-1].tiles_total == 5
    assert progress[-1].planes_done == 5
    assert not side_by_side_threads()


def test_tiles_of_one_plane_side_by_side_match(model: MPT) -> None:
    plane = np.random.default_rng(1).random((160, 150)).astype(np.float32)
    settings = DeblurSettings(tile=64, overlap=16)
    assert Deblurrer(model, settings).tiles_per_plane(160, 150) > 2
    with torch_threads(1):
        sequential = deblur_array(model, plane, "YX", settings)
    with torch_threads(2):
        side_by_side = deblur_array(model, plane, "YX", settings)
    np.testing.assert_allclose(side_by_side, sequential, atol=1e-5)


def test_a_plane_of_one_tile_is_cut_for_the_workers_unless_planes_run_side_by_side(
    model: MPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    plane = np.random.default_rng(2).random((550, 660)).astype(np.float32)
    deblurrer = Deblurrer(model, DeblurSettings())
    with torch_threads(1):
        assert deblurrer.tiles_per_plane(550, 660) == 1  # one thread, or inside a plane beside others
    calls = []
    forward = Deblurrer._network

    def record(self: Deblurrer, x: torch.Tensor, width: float | None = None) -> torch.Tensor:
        calls.append((threading.current_thread().name, torch.get_num_threads(), tuple(x.shape[-2:])))
        return forward(self, x, width)

    monkeypatch.setattr(Deblurrer, "_network", record)
    with torch_threads(2):
        assert deblurrer.tiles_per_plane(550, 660) == 2
        deblur_array(model, plane, "YX")
        assert torch.get_num_threads() == 2
    # two tiles of 550 x 384, side by side on one thread each, instead of one tile on both threads
    assert len(calls) == 2 and all(name.startswith("torch-side-by-side") and threads == 1 for name, threads, _ in calls)
    assert {shape for _, _, shape in calls} == {(550, 384)}
    calls.clear()
    with torch_threads(2):
        deblur_array(model, plane, "YX", DeblurSettings(tile=0))  # the whole plane was asked for
    assert len(calls) == 1 and calls[0][1:] == (2, (550, 660))


def test_closing_stops_every_worker(model: MPT, stack: np.ndarray) -> None:
    with torch_threads(2):
        steps = iter_deblur(model, stack, "ZYX")
        next(steps)
        steps.close()
        assert torch.get_num_threads() == 2
    assert not side_by_side_threads()


def test_a_failing_plane_fails_the_job_and_leaves_no_worker(
    model: MPT, stack: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    forward = Deblurrer._network

    def fail_on_third(self: Deblurrer, x: torch.Tensor, width: float | None = None) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("plane failed")
        return forward(self, x, width)

    monkeypatch.setattr(Deblurrer, "_network", fail_on_third)
    with torch_threads(2), pytest.raises(RuntimeError, match="plane failed"):
        deblur_array(model, stack, "ZYX")
    assert not side_by_side_threads()


@pytest.mark.parametrize("beta", [0.0, 1e-2])
def test_a_training_step_in_shards_has_the_whole_batch_gradient(beta: float) -> None:
    from napari_mpt_deblur.losses.efcr import EFCRConfig, EFCRLoss
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import backward_in_shards, objective

    torch.manual_seed(3)
    network = MPT(tiny_config()).train()
    loss_fn = EFCRLoss(EFCRConfig(beta=beta, kernel_sizes=(5,)))  # one kernel: the re-blur draws cannot differ
    config = TrainConfig(efcr_beta=beta, batch_size=4, patch_size=64)
    blurry, sharp, own = (torch.rand(4, 1, 64, 64) for _ in range(3))

    total, whole_losses = objective(network, loss_fn, config, blurry, sharp, own, torch.Generator().manual_seed(0))
    total.backward()
    whole = [p.grad.clone() for p in network.parameters()]
    network.zero_grad(set_to_none=True)
    with torch_threads(2):
        losses = backward_in_shards(network, loss_fn, config, blurry, sharp, own, torch.Generator().manual_seed(0), 2)
    assert losses.keys() == whole_losses.keys()
    for name, value in whole_losses.items():
        assert losses[name] == pytest.approx(value, rel=1e-5, abs=1e-8)
    for expected, parameter in zip(whole, network.parameters()):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-6)
    assert not side_by_side_threads()


def test_shards_run_under_the_steps_autocast_each_in_its_own_thread() -> None:
    """bf16 autocast is per thread: every shard turns it on itself, and the step's gradients follow it."""
    from napari_mpt_deblur.losses.efcr import EFCRLoss
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import compute_gradients, objective

    torch.manual_seed(3)
    network = MPT(tiny_config()).train()
    config = TrainConfig(efcr_beta=0.0, batch_size=4, patch_size=64)
    blurry, sharp = torch.rand(4, 1, 64, 64), torch.rand(4, 1, 64, 64)

    def gradients(dtype: torch.dtype | None, shards: int) -> list[torch.Tensor]:
        network.zero_grad(set_to_none=True)
        with torch_threads(2):
            compute_gradients(network, EFCRLoss(), config, blurry, sharp, None, torch.Generator(), shards, dtype)
        return [p.grad.clone() for p in network.parameters()]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = objective(network, EFCRLoss(), config, blurry, sharp, None, torch.Generator())
    total.backward()
    whole_bf16 = [p.grad.clone() for p in network.parameters()]
    fp32, sharded_bf16 = gradients(None, 2), gradients(torch.bfloat16, 2)
    flat = torch.cat([g.flatten() for g in fp32])
    bf16_error = torch.cat([(a - b).flatten() for a, b in zip(sharded_bf16, fp32)]).norm() / flat.norm()
    assert 1e-4 < bf16_error < 0.1  # bf16 moved the gradients a little: autocast was on in the shards
    whole_error = torch.cat([(a - b).flatten() for a, b in zip(sharded_bf16, whole_bf16)]).norm() / flat.norm()
    assert whole_error < 0.1


def test_training_uses_bf16_on_a_cpu_that_computes_it_in_hardware() -> None:
    from napari_mpt_deblur.runtime import cpu_has_native_bf16
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import training_autocast_dtype

    cpu = torch.device("cpu")
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert training_autocast_dtype(cpu, TrainConfig()) is expected
    assert training_autocast_dtype(cpu, TrainConfig(amp=False)) is None
    assert training_autocast_dtype(torch.device("meta"), TrainConfig()) is None


def test_a_bf16_step_in_shards_is_reproducible_when_the_network_runs_twice() -> None:
    """EFCR passes every shard through the network twice; the shards' threads must not share autocast's casts."""
    from napari_mpt_deblur.losses.efcr import EFCRConfig, EFCRLoss
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import compute_gradients

    torch.manual_seed(0)
    network = MPT(tiny_config()).train()
    config = TrainConfig(efcr_beta=1e-3)
    blurry, sharp = torch.rand(2, 1, 48, 48), torch.rand(2, 1, 48, 48)

    def gradients() -> torch.Tensor:
        network.zero_grad(set_to_none=True)
        with torch_threads(2):
            compute_gradients(
                network, EFCRLoss(EFCRConfig(beta=1e-3)), config, blurry, sharp, None,
                torch.Generator().manual_seed(1), 2, torch.bfloat16,
            )  # fmt: skip
        return torch.cat([p.grad.flatten() for p in network.parameters()])

    first = gradients()
    for _ in range(4):
        torch.testing.assert_close(gradients(), first, rtol=0, atol=0)
