"""Data for training: synthetic defocus, patch sampling."""
