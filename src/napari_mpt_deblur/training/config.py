"""The training configuration: one validated, JSON-friendly object per run."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, FrozenConfig, IntensityNormalization

L1_WEIGHTINGS = ("uniform", "input_error")
"""The values :attr:`TrainConfig.l1_weighting` takes."""

PIXEL_LOSSES = ("l1", "mse", "psnr", "log_l1")
"""The values :attr:`TrainConfig.pixel_loss` takes."""

INPUT_ERROR_FLOOR = 0.02
"""Input error (normalised intensity) below which ``input_error`` weighting stops growing a sample's weight."""

WIDTH_QUANTILE = 0.7
"""The quantile of the true blur width, given the image, that a blur-width estimator is trained to give: above
the median, because a width told too wide costs the deblurring network little and one told too narrow leaves
blur in place (experiment 14 in docs/benchmarks.md)."""

OVERREAD_MAX = 8.0
"""The largest factor :attr:`TrainConfig.estimate_overread` widens an estimate by: the estimator has read a smooth
image in focus as ten times its width (experiment 16 in docs/benchmarks.md)."""


@dataclass(frozen=True)
class TrainConfig(FrozenConfig):
    """How to train (defaults: the paper's recipe, section 5)."""

    config_name = "train config"

    steps: int = 20000
    """Optimizer steps in the whole run (the learning-rate schedule spans them)."""

    batch_size: int = 8
    """Patches per step (the paper's 8)."""

    patch_size: int = 256
    """Side of the square training patches in pixels."""

    scale_range: tuple[float, float] = (0.75, 1.25)
    """Random rescaling of each patch (the paper's random scaling); (1, 1) turns it off."""

    lr: float = 1e-4
    """Initial learning rate of AdamW; it follows a cosine to ``lr_min``."""

    lr_min: float = 1e-6
    """Learning rate at the last step."""

    warmup_steps: int = 0
    """Steps over which the learning rate rises linearly to ``lr`` before its cosine. For training on from a
    trained model: AdamW's first updates move every weight by about the learning rate, whatever its gradient,
    since its running averages start empty."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's beta1, beta2."""

    weight_decay: float = 1e-4
    """AdamW's decoupled weight decay."""

    grad_clip: float | None = 1.0
    """Clip the gradient's global norm to this (None: no clipping)."""

    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights (0 turns it off). When on, validation,
    the best checkpoint and the model file hold the average, which is steadier and usually better than
    the last step's weights; the state file keeps the raw weights for resuming. The decay warms up as
    ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates, so a short run is not held at its start."""

    efcr_beta: float = 1e-5
    """Weight of the EFCR contrastive term (0 turns it off: plain L1). With unlabeled
    planes (fine-tuning), its Lext is taken from them: EFCR_ex."""

    supervised_weight: float = 1.0
    """Weight of the L1 term on labeled (or synthetic) pairs."""

    l1_weighting: str = "uniform"
    """How the L1 term weighs the samples of a batch: ``uniform`` (a plain mean), or ``input_error``:
    each sample's L1 times ``f / (f + e)``, with ``e`` the sample's own input error (the mean absolute
    difference of blurry and sharp) and ``f`` = :data:`INPUT_ERROR_FLOOR`. Strongly blurred samples,
    whose large errors otherwise dominate the mean, count less (about half as much as in-focus ones:
    noise alone gives an input error of 0.01-0.03). Plain L1 training only (``efcr_beta`` 0)."""

    orientation_weight: float = 0.0
    """Weight of the orientation-consistency term (0 turns it off). Each sample also passes through the
    network turned by one of the square's 7 other orientations (drawn per step); the L1 term becomes the
    mean of both outputs' L1 (turned back), and the L1 between the two outputs, times this weight, is
    added, so the network learns to answer the same in every orientation. Twice the compute per sample.
    Plain L1 training only (``efcr_beta`` 0)."""

    pixel_loss: str = "l1"
    """The supervised term's distance: ``l1`` (the paper's), ``mse`` (the mean squared error) or ``psnr``
    (the mean over samples of ``10 log10(MSE + 1e-5)``, each sample's error in decibels as the suite
    scores it, so a mildly blurred sample counts as much as a strong one). Where one blurry patch could
    come from two different sharp ones (a mildly blurred point, an in-focus soft blob), L1 learns the
    median of the two, which is one of them, and the squared errors their mean, which is what PSNR
    rewards. ``log_l1`` is the mean over samples of ``20 log10(L1 + 0.003)``: the samples weighed as
    ``psnr`` weighs them, with L1's distance within each. Plain training only (``efcr_beta`` 0,
    ``l1_weighting`` uniform, no orientation term)."""

    blur_width_dropout: float = 0.25
    """For a model that takes the blur's width (``MPTConfig.blur_conditioned``): the share of samples
    trained without it, so that the network still deblurs well when no width is given. The others are
    given their PSF's width (:func:`~napari_mpt_deblur.data.defocus.blur_sigma_px`). Plain training on
    synthetic pairs only: with EFCR or the orientation term, or on labeled pairs (whose blur is not
    known), every sample is trained without a width."""

    estimate_overread: float = 0.0
    """For a model that carries its own estimate of the width (``MPTConfig.blur_estimator``): the share of
    the samples told that estimate (those without their width) that are told it too wide instead, by a
    factor drawn log-uniformly from 1 to :data:`OVERREAD_MAX`. The estimator reads smooth content in focus
    as blurred (docs/benchmarks.md, experiment 16); a network that has met such over-reads learns to check
    a width against the image rather than sharpen whatever it is told. 0: the estimate as it is."""

    modulation_lr_scale: float = 5.0
    """The blur modulation's learning rate as a multiple of ``lr``: it starts from zero in a network
    grown from a trained one (``mpt-deblur grow --blur-width``), whose other weights need only small steps."""

    trainable: tuple[str, ...] = ()
    """Names of the parameters to train, as prefixes (``decoders.2.2`` is a block and all it holds);
    the others stay as they are. Empty: all of them. For a network grown from a trained one
    (:func:`~napari_mpt_deblur.models.grow.deepen`): train the new blocks alone, so that what the
    trained network does well cannot be lost while they learn."""

    reblur_weight: float = 0.0
    """Weight of the self-supervised re-blur term when fine-tuning on unlabeled planes:
    L1(net(reblur(U)), U), the unlabeled patch U as its own target (the reference code's)."""

    validate_every: int = 500
    """Steps between validations (PSNR/SSIM on held-out pairs), when there are any."""

    checkpoint_every: int = 500
    """Steps between checkpoints; a killed run loses at most this many steps."""

    seed: int = 0
    """Seed of everything random: patches, blur, noise, re-blur. Step ``s`` uses (seed, s), so
    a resumed run draws exactly the batches an uninterrupted one would."""

    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

    amp: bool = True
    """Mixed precision: bf16 (else fp16) autocast on CUDA, bf16 autocast on a CPU that computes bf16 in
    hardware (AVX-512 BF16, AMX: 1.3-1.6x faster steps, the same loss curve); fp32 elsewhere."""

    compile: bool = False
    """Run the network through ``torch.compile`` (needs a C++ compiler on the CPU). It pays a
    few minutes of compilation once for several times faster steps on long runs."""

    data_workers: int = 0
    """Processes that draw the coming steps' batches while the network trains on this one (0: the training loop
    draws each batch itself). The batches are the same either way, so a run's figures and its resume do not
    depend on it. On a GPU the synthetic defocus of a large batch takes longer than the step: give it most of
    the CPU cores. On a 2-core CPU the workers would take cores from the step: keep 0."""

    normalization: IntensityNormalization = IntensityNormalization()
    """Intensity normalisation of patches; recorded in the model file for inference."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        object.__setattr__(self, "betas", tuple(float(v) for v in self.betas))
        if isinstance(self.trainable, str) or not all(isinstance(name, str) and name for name in self.trainable):
            raise ConfigError(f"trainable must be a list of parameter-name prefixes, got {self.trainable!r}")
        object.__setattr__(self, "trainable", tuple(self.trainable))
        if isinstance(self.normalization, dict):
            object.__setattr__(self, "normalization", IntensityNormalization.from_dict(self.normalization))
        positive = {"steps": self.steps, "batch_size": self.batch_size, "validate_every": self.validate_every}
        positive["checkpoint_every"] = self.checkpoint_every
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "data_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be 0 or a positive integer, got {value!r}")
        if self.patch_size < 16:
            raise ConfigError(f"patch_size must be at least 16, got {self.patch_size}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if not 0 < self.lr_min <= self.lr:
            raise ConfigError(f"need 0 < lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be in [0, 1), got {self.betas}")
        weights = (self.weight_decay, self.efcr_beta, self.supervised_weight, self.reblur_weight)
        if min(weights) < 0 or self.orientation_weight < 0:
            raise ConfigError(
                "weight_decay, efcr_beta, supervised_weight, reblur_weight and orientation_weight must be >= 0"
            )
        if self.l1_weighting not in L1_WEIGHTINGS:
            raise ConfigError(f"l1_weighting must be one of {', '.join(L1_WEIGHTINGS)}, got {self.l1_weighting!r}")
        if self.l1_weighting != "uniform" and self.efcr_beta > 0:
            raise ConfigError("l1_weighting 'input_error' weighs plain L1 training only: set efcr_beta to 0")
        if self.orientation_weight > 0 and self.efcr_beta > 0:
            raise ConfigError("orientation_weight applies to plain L1 training only: set efcr_beta to 0")
        if self.pixel_loss not in PIXEL_LOSSES:
            raise ConfigError(f"pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {self.pixel_loss!r}")
        if self.pixel_loss != "l1" and (
            self.efcr_beta > 0 or self.l1_weighting != "uniform" or self.orientation_weight > 0
        ):
            raise ConfigError(
                f"pixel_loss {self.pixel_loss!r} applies to plain training only: efcr_beta 0, uniform weighting, "
                "no orientation term"
            )
        if not self.modulation_lr_scale > 0:
            raise ConfigError(f"modulation_lr_scale must be positive, got {self.modulation_lr_scale}")
        if not 0 <= self.blur_width_dropout <= 1:
            raise ConfigError(f"blur_width_dropout must be in [0, 1], got {self.blur_width_dropout}")
        if not 0 <= self.estimate_overread <= 1:
            raise ConfigError(f"estimate_overread must be in [0, 1], got {self.estimate_overread}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or None, got {self.grad_clip}")


@dataclass(frozen=True)
class EstimatorRecipe:
    """How ``mpt-deblur train-estimator`` trains a network's blur-width estimator (recorded in its model file)."""

    steps: int = 5000
    """Optimizer steps (Adam, cosine schedule from ``lr`` to ``lr / 50``)."""
    pool: int = 24000
    """Defocused patches drawn once; 1/24 of them is held out to report the error."""
    batch: int = 16
    patch: int = 192
    """Side of the pooled patches; each step crops all of its batch to one side drawn in ``patch/2 .. patch``."""
    scale_range: tuple[float, float] = (0.45, 1.8)
    """Zoom range of the crops, as in training the network."""
    lr: float = 1e-3
    quantile: float = WIDTH_QUANTILE
    """The quantile of the true width, given the image, the estimator learns to give."""
    seed: int = 0
    workers: int = 2
    """Processes drawing the pool."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.pool < 48 or self.batch < 1 or self.patch < 32 or self.workers < 1:
            raise ConfigError("steps, batch and workers must be at least 1, pool at least 48 and patch at least 32")
        if not 0 < self.quantile < 1:
            raise ConfigError(f"quantile must lie between 0 and 1, got {self.quantile:g}")
