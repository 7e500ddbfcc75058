"""PEFT tuners of peft_spectral: one sub-package per method (config, layer, model)."""
