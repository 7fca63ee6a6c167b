"""Haar DWT and the EFCR losses."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT
from napari_mpt_deblur.losses import EFCRConfig, EFCRLoss, gaussian_blur, haar_dwt2, random_reblur


@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 1, 64, 64)])
def test_haar_matches_pywavelets_on_even_sizes(shape):
    x = torch.randn(shape, dtype=torch.float64)
    low, high = haar_dwt2(x)
    cA, (cH, cV, cD) = pywt.dwt2(x.numpy(), "haar")
    np.testing.assert_allclose(low.numpy(), cA, atol=1e-12)
    np.testing.assert_allclose(high[:, :, 0].numpy(), cH, atol=1e-12)
    np.testing.assert_allclose(high[:, :, 1].numpy(), cV, atol=1e-12)
    np.testing.assert_allclose(high[:, :, 2].numpy(), cD, atol=1e-12)


def test_haar_reflects_odd_sizes():
    x = torch.randn(1, 1, 15, 22, dtype=torch.float64)
    low, high = haar_dwt2(x)
    cA, (cH, _, cD) = pywt.dwt2(x.numpy(), "haar", mode="reflect")
    assert low.shape[-2:] == (8, 11)
    np.testing.assert_allclose(low.numpy(), cA, atol=1e-12)
    np.testing.assert_allclose(high[:, :, 2].numpy(), cD, atol=1e-12)


def test_haar_is_orthonormal():
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    low, high = haar_dwt2(x)
    energy = low.square().sum() + high.square().sum()
    assert torch.allclose(energy, x.square().sum())


def test_gaussian_blur_keeps_mean_and_reblur_is_reproducible():
    x = torch.rand(4, 1, 32, 32)
    assert torch.allclose(gaussian_blur(x, 5).mean(), x.mean(), atol=1e-3)
    a = random_reblur(x, (3, 5, 7), generator=torch.Generator().manual_seed(1))
    b = random_reblur(x, (3, 5, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


def test_reblur_under_autocast_keeps_the_input_dtype():
    """Mixed-precision training: the half-precision convolution must not break the float32 output."""
    x = torch.rand(4, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reblurred = random_reblur(x, (3, 5, 7), generator=torch.Generator().manual_seed(1))
    assert reblurred.dtype == torch.float32
    plain = random_reblur(x, (3, 5, 7), generator=torch.Generator().manual_seed(1))
    assert (reblurred - plain).abs().max() < 0.02  # bf16 rounding only


def _numpy_efcr(output, sharp, blurry, reblurred, reblurred_output):
    """EFCR written directly from the formulas, with pywt."""

    def bands(img):
        cA, details = pywt.dwt2(img, "haar")
        return cA, np.stack(details)

    def mean_abs(a):
        return np.abs(a).mean()

    lo_o, hi_o = bands(output)
    lo_g, hi_g = bands(sharp)
    _, hi_i = bands(blurry)
    _, hi_bi = bands(reblurred)
    _, hi_bo = bands(reblurred_output)
    positive = mean_abs(hi_o - hi_g) + mean_abs(lo_o - lo_g)
    negative = mean_abs(hi_o - hi_i)
    extension = mean_abs(hi_bo - hi_bi) / mean_abs(hi_i - hi_bi)
    return positive / (negative + extension)


def test_efcr_equals_the_formulas():
    torch.manual_seed(0)
    blurry = gaussian_blur(torch.rand(1, 1, 32, 32, dtype=torch.float64), 5)
    sharp = torch.rand(1, 1, 32, 32, dtype=torch.float64)

    def network(x):
        return 1.5 * x + 0.1 * torch.sin(3 * x)

    loss = EFCRLoss(EFCRConfig(kernel_sizes=(5,), eps=0.0))
    terms = loss(network, blurry, sharp)
    reblurred = gaussian_blur(blurry, 5)
    expected = _numpy_efcr(
        network(blurry)[0, 0].numpy(),
        sharp[0, 0].numpy(),
        blurry[0, 0].numpy(),
        reblurred[0, 0].numpy(),
        network(reblurred)[0, 0].numpy(),
    )
    assert float(terms.contrastive) == pytest.approx(expected, rel=1e-10)
    assert float(terms.total) == pytest.approx(float(terms.l1) + 1e-5 * expected, rel=1e-10)


def _model_and_batch():
    model = MPT(tiny_config())
    blurry = gaussian_blur(torch.rand(2, 1, 64, 64), 7)
    sharp = torch.rand(2, 1, 64, 64)
    return model, blurry, sharp


def _grad_norm(model) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    total = torch.sqrt(sum(g.square().sum() for g in grads))
    return float(total)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "extra_labeled", "extra_unlabeled"])
def test_efcr_term_alone_carries_gradient(variant):
    model, blurry, sharp = _model_and_batch()
    kwargs = {}
    if variant == "extra_labeled":
        kwargs = dict(extra_blurry=gaussian_blur(torch.rand(2, 1, 64, 64), 5), extra_sharp=torch.rand(2, 1, 64, 64))
    elif variant == "extra_unlabeled":
        kwargs = dict(unlabeled=gaussian_blur(torch.rand(2, 1, 64, 64), 3))
    terms = EFCRLoss()(model, blurry, sharp, generator=torch.Generator().manual_seed(0), **kwargs)
    terms.contrastive.backward()
    norm = _grad_norm(model)
    assert np.isfinite(norm) and norm > 0


def test_unlabeled_extension_replaces_the_labeled_one():
    model, blurry, sharp = _model_and_batch()
    loss = EFCRLoss()
    with torch.no_grad():
        output = model(blurry)
        plain = loss(model, blurry, sharp, output, generator=torch.Generator().manual_seed(0))
        unlabeled = torch.rand(2, 1, 64, 64)
        ex = loss(model, blurry, sharp, output, unlabeled=unlabeled, generator=torch.Generator().manual_seed(0))
        expected_ext = loss.extension(model, unlabeled, torch.Generator().manual_seed(0))
    assert float(ex.positive) == pytest.approx(float(plain.positive))
    assert float(ex.negative) == pytest.approx(float(plain.negative))
    assert float(ex.extension) == pytest.approx(float(expected_ext.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="batches of 2 and 3"):
        loss(model, blurry, sharp, output, unlabeled=torch.rand(3, 1, 64, 64))


def test_beta_weights_the_regulariser():
    model, blurry, sharp = _model_and_batch()
    with torch.no_grad():
        output = model(blurry)
        off = EFCRLoss(EFCRConfig(beta=0.0))(model, blurry, sharp, output)
        on = EFCRLoss(EFCRConfig(beta=0.5))(model, blurry, sharp, output, generator=torch.Generator().manual_seed(0))
    assert float(off.total) == pytest.approx(float(off.l1))
    assert float(on.total) == pytest.approx(float(on.l1) + 0.5 * float(on.contrastive), rel=1e-6)
    with pytest.raises(ValueError):
        EFCRConfig(kernel_sizes=(4,))


@pytest.mark.slow
def test_network_learns_with_the_efcr_loss():
    """L1 + EFCR trains the network: a few steps on blurred patterns raise the PSNR."""
    import math

    torch.manual_seed(0)
    config = tiny_config(num_blocks=(1, 1, 1, 1), scales=((1 / 4,), (1 / 2,), (1.0,), (1.0,)))
    net = MPT(config)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    patterns = [((torch.sin(xx / (2 + i)) * torch.cos(yy / (3 + i))) > 0.3).float() * 0.8 + 0.1 for i in range(2)]
    sharp = torch.stack(patterns)[:, None]
    blurry = gaussian_blur(sharp, 7, 2.0)
    loss = EFCRLoss(EFCRConfig(beta=1e-3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)

    def psnr() -> float:
        with torch.no_grad():
            return 10 * math.log10(1 / float((net(blurry) - sharp).square().mean()))

    before = psnr()
    first = None
    for _ in range(40):
        terms = loss(net, blurry, sharp, generator=generator)
        first = first if first is not None else float(terms.total.detach())
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
    assert float(terms.total.detach()) < 0.5 * first
    assert psnr() > before + 5
