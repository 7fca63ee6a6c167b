"""EFCR: extended frequency contrastive regularisation (docs/architecture.md, "EFCR").

For a blurry input I, its ground truth G and the output O = net(I), the sharp
image is the positive and the blurry input the negative, compared in the Haar
wavelet domain (``fh``: the three detail bands, ``fl``: the approximation)::

    L+   = |fh(O) - fh(G)| + |fl(O) - fl(G)|
    L-   = |fh(O) - fh(I)|
    Lext = |fh(Bo) - fh(Bi)| / |fh(I) - fh(Bi)|    Bi = Gaussian_k(I), Bo = net(Bi)
    L_CR = mean_i L+_i / (L-_i + Lext_i)
    L    = L1(O, G) + beta * L_CR

``|.|`` is the mean absolute value per sample. Unlike the reference code, every
term here carries gradient to the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, FrozenConfig
from .wavelets import haar_dwt2

Network = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class EFCRConfig(FrozenConfig):
    """Settings of the EFCR regulariser."""

    config_name = "EFCR config"

    beta: float = 1e-5
    """Weight of L_CR in the total loss (the paper's 1e-5)."""

    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    """Gaussian re-blur kernel sizes; each sample draws one at random."""

    sigma: float | None = None
    """Gaussian sigma of the re-blur; None derives it from the kernel size as OpenCV
    does for ``sigma=0`` (0.8, 1.1 and 1.4 for k = 3, 5, 7)."""

    eps: float = 1e-8
    """Added to denominators so flat patches cannot divide by zero."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel_sizes", tuple(self.kernel_sizes))  # JSON lists and tuples compare equal
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ConfigError(f"kernel sizes must be odd and positive, got {self.kernel_sizes}")
        if self.sigma is not None and self.sigma <= 0:
            raise ConfigError(f"sigma must be positive, got {self.sigma}")


def default_sigma(kernel_size: int) -> float:
    """OpenCV's sigma for a Gaussian kernel of the given size."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(x: Tensor, kernel_size: int, sigma: float | None = None) -> Tensor:
    """Separable Gaussian blur of every channel of (B, C, H, W), reflect padding."""
    sigma = default_sigma(kernel_size) if sigma is None else sigma
    radius = kernel_size // 2
    taps = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - radius
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def random_reblur(
    x: Tensor, kernel_sizes: Sequence[int], sigma: float | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Blur each sample with a Gaussian of a randomly drawn kernel size."""
    choice = torch.randint(len(kernel_sizes), (x.shape[0],), generator=generator, device="cpu").to(x.device)
    out = torch.empty_like(x)
    for index, size in enumerate(kernel_sizes):
        selected = choice == index
        if selected.any():
            # under autocast the convolution comes back in half precision
            out[selected] = gaussian_blur(x[selected], size, sigma).to(out.dtype)
    return out


def _mean_abs(x: Tensor) -> Tensor:
    """Mean absolute value per sample: (B, ...) -> (B,)."""
    return x.abs().flatten(1).mean(dim=1)


def positive_term(output: Tensor, sharp: Tensor, include_low: bool = True) -> Tensor:
    """L+ per sample: distance of the output to the ground truth (detail + approximation bands)."""
    low_o, high_o = haar_dwt2(output)
    low_g, high_g = haar_dwt2(sharp)
    distance = _mean_abs(high_o - high_g)
    return distance + _mean_abs(low_o - low_g) if include_low else distance


def negative_term(output: Tensor, blurry: Tensor) -> Tensor:
    """L- per sample: distance of the output's details to the blurry input's."""
    return _mean_abs(haar_dwt2(output)[1] - haar_dwt2(blurry)[1])


def extension_term(reblurred_output: Tensor, reblurred: Tensor, blurry: Tensor, eps: float = 1e-8) -> Tensor:
    """Lext per sample: |fh(Bo) - fh(Bi)| / |fh(I) - fh(Bi)|."""
    high_bi = haar_dwt2(reblurred)[1]
    numerator = _mean_abs(haar_dwt2(reblurred_output)[1] - high_bi)
    return numerator / (_mean_abs(haar_dwt2(blurry)[1] - high_bi) + eps)


@dataclass
class LossTerms:
    """The total loss and its parts (scalars; ``total`` and ``contrastive`` carry gradient)."""

    total: Tensor
    l1: Tensor
    contrastive: Tensor
    positive: Tensor
    negative: Tensor
    extension: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in self.__dict__.items()}


class EFCRLoss(torch.nn.Module):
    """L1 + beta * L_CR, with the two EFCR_ex variants.

    Call it with the network so the re-blurred inputs can be passed through it::

        terms = EFCRLoss()(net, blurry, sharp)
        terms.total.backward()

    EFCR_ex variants:

    - extra labeled pairs (``extra_blurry``/``extra_sharp``): their ratios
      ``|fh(O')-fh(G')| / (|fh(O')-fh(I')| + Lext')`` join the labeled ones in the mean;
    - extra UNLABELED images (``unlabeled``, the user's own stacks): L+ and L- stay
      those of the labeled batch and Lext is taken from the unlabeled batch,
      sample ``i`` with sample ``i`` (equal batch sizes).
    """

    def __init__(self, config: EFCRConfig | None = None) -> None:
        super().__init__()
        self.config = config or EFCRConfig()

    def extension(self, network: Network, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """Lext of a batch: re-blur it, pass it through the network, compare details."""
        reblurred = random_reblur(images, self.config.kernel_sizes, self.config.sigma, generator)
        return extension_term(network(reblurred), reblurred, images, self.config.eps)

    def forward(
        self,
        network: Network,
        blurry: Tensor,
        sharp: Tensor,
        output: Tensor | None = None,
        *,
        extra_blurry: Tensor | None = None,
        extra_sharp: Tensor | None = None,
        unlabeled: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        eps = self.config.eps
        output = network(blurry) if output is None else output
        l1 = F.l1_loss(output, sharp)
        positive = positive_term(output, sharp)
        negative = negative_term(output, blurry)
        if unlabeled is not None:
            if unlabeled.shape[0] != blurry.shape[0]:
                raise ValueError(
                    f"EFCR_ex pairs labeled sample i with unlabeled sample i: got batches of "
                    f"{blurry.shape[0]} and {unlabeled.shape[0]}"
                )
            extension = self.extension(network, unlabeled, generator)
        else:
            extension = self.extension(network, blurry, generator)
        ratios = [positive / (negative + extension + eps)]
        if (extra_blurry is None) != (extra_sharp is None):
            raise ValueError("extra labeled data needs both extra_blurry and extra_sharp")
        if extra_blurry is not None:
            extra_output = network(extra_blurry)
            extra_extension = self.extension(network, extra_blurry, generator)
            extra_positive = positive_term(extra_output, extra_sharp, include_low=False)
            ratios.append(extra_positive / (negative_term(extra_output, extra_blurry) + extra_extension + eps))
        contrastive = torch.cat(ratios).mean()
        total = l1 + self.config.beta * contrastive if self.config.beta else l1
        return LossTerms(total, l1, contrastive, positive.mean(), negative.mean(), extension.mean())
