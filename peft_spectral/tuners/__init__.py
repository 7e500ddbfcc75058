"""The PEFT tuners of this package (SVF, SpectralCompress, CoreIsolation) and the `nn.Linear`/`Conv1D` weight helpers
they share."""

from ._linear import is_conv1d, linear_features, weight_matrix


__all__ = ["is_conv1d", "linear_features", "weight_matrix"]
