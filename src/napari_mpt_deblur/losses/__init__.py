"""Training losses: the Haar transform and EFCR."""

from .efcr import EFCRConfig, EFCRLoss, LossTerms, gaussian_blur, random_reblur
from .wavelets import haar_dwt2

__all__ = ["EFCRConfig", "EFCRLoss", "LossTerms", "gaussian_blur", "haar_dwt2", "random_reblur"]
