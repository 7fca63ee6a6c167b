"""The GPU paths: the network, training under autocast and half-precision inference on CUDA.

Skipped where no CUDA device is present (CI is CPU-only); run them on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model
from napari_mpt_deblur.config import DeblurSettings
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.training.config import TrainConfig
from napari_mpt_deblur.training.engine import iter_train
from napari_mpt_deblur.training.patches import LabeledPairs, UnlabeledPlanes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_fp32():
    """No TF32 in convolutions or matrix products, so the GPU computes what the CPU does."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("pairing", ["aligned", "official"])
def test_the_network_on_cuda_matches_the_cpu(exact_fp32, pairing):
    model = MPT(tiny_config(pairing=pairing)).eval()
    x = torch.rand(2, 1, 45, 70)
    with torch.no_grad():
        on_cpu = model(x)
        on_gpu = model.to("cuda")(x.to("cuda")).cpu()
    assert on_gpu.shape == x.shape
    assert (on_gpu - on_cpu).abs().max() < 1e-4


def test_training_under_autocast_with_efcr_ex_and_reblur(tmp_path):
    """Every loss term in mixed precision: L1, EFCR with Lext from unlabeled planes, the re-blur term."""
    blurry, sharp = pattern_pairs(3, 64)
    config = TrainConfig(
        steps=4, batch_size=2, patch_size=48, scale_range=(1.0, 1.0), efcr_beta=1e-3, reblur_weight=1.0,
        device="cuda", amp=True, checkpoint_every=2,
    )  # fmt: skip
    out = tmp_path / "gpu.safetensors"
    events = list(
        iter_train(MPT(tiny_config()), LabeledPairs(blurry, sharp), out, config, unlabeled=UnlabeledPlanes(blurry))
    )
    assert [e.step for e in events] == [1, 2, 3, 4]
    for event in events:
        assert all(np.isfinite(value) for value in event.losses.values()), event.losses
    assert {"contrastive", "extension", "reblur"} <= set(events[-1].losses)
    trained = load_model(out)
    assert trained.card.provenance["step"] == 4


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_deblurring_agrees_with_fp32(precision):
    model = MPT(tiny_config())
    image = (pattern_pairs(1, 96)[0][0] * 4000).astype(np.uint16)
    reference = deblur_array(model, image, settings=DeblurSettings(device="cuda", precision="fp32"))
    half = deblur_array(model, image, settings=DeblurSettings(device="cuda", precision=precision))
    value_range = float(reference.max() - reference.min())
    mse = float(np.mean((half.astype(np.float64) - reference) ** 2))
    assert 10 * np.log10(value_range**2 / mse) > 40  # dB
