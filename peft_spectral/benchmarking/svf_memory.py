"""Memory cost of SVF: bytes of the factors, buffers and trainable state per targeted matrix, and for whole models.

The numbers follow what [`SVFLinear`] keeps for a weight of shape `(out, in)`, `m = min(out, in)`, `k` adapted values:

* `S` (`m` values, float32) and `Q` (`m × m`, in the factor dtype): the singular values and the smaller side's
  singular vectors. The SVD cache holds float32; `SVFConfig(factor_dtype="auto")` (the default) keeps `Q` in the base
  weight's dtype when that is bfloat16/float16, else float32;
* `P = U Σ` or `Σ Vᵀ` (`out × in` values: a copy of the weight's size, in the factor dtype) for the default fast
  factored form, kept only where it is used (`2k > m`);
* `z` (`k` values), its gradient and the two AdamW moments while training (float32 under PEFT's
  `autocast_adapter_dtype`).

The base weight itself and the activations are not counted: they are the same as for any adapter, except that the
factored forward keeps one `tokens × m` intermediate per targeted matrix for the backward.

Run `python -m peft_spectral.benchmarking.svf_memory` to print the table of `docs/svf_memory.md`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional


#: Bytes per value of the dtypes the tables use.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

#: Bytes per singular value: `S` stays float32 whatever the factor dtype.
S_BYTES = 4

#: Llama-2-7B: 32 blocks of q/k/v/o 4096×4096 and gate/up 11008×4096, down 4096×11008 (`(out, in)` shapes).
LLAMA2_7B_BLOCK: dict[str, tuple[int, int]] = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
LLAMA2_7B_LAYERS = 32
LLAMA2_7B_PARAMS = 6_738_415_616
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SVFMatrixMemory:
    """Bytes SVF keeps for one targeted matrix.

    Attributes:
        S (`int`): Singular values (float32).
        Q (`int`): Singular vectors of the smaller side (in the factor dtype).
        P (`int`): The fast factored form's `U Σ` / `Σ Vᵀ` (0 for the exact form, or when `2k <= m`).
        z (`int`): The trainable vector (the only saved tensor).
        z_training (`int`): `z`'s gradient and the optimizer's moments while training.
    """

    S: int
    Q: int
    P: int
    z: int
    z_training: int

    @property
    def buffers(self) -> int:
        """Bytes of the frozen buffers (`S`, `Q`, `P`), never saved."""
        return self.S + self.Q + self.P

    @property
    def total(self) -> int:
        """All bytes SVF adds for this matrix while training."""
        return self.buffers + self.z + self.z_training

    def __add__(self, other: SVFMatrixMemory) -> SVFMatrixMemory:
        return SVFMatrixMemory(*(getattr(self, f) + getattr(other, f) for f in ("S", "Q", "P", "z", "z_training")))

    def scaled(self, factor: int) -> SVFMatrixMemory:
        """This cost `factor` times (e.g. once per transformer block)."""
        return SVFMatrixMemory(
            self.S * factor, self.Q * factor, self.P * factor, self.z * factor, self.z_training * factor
        )


def _bytes_per_value(dtype: str, argument: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{argument} must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def svf_matrix_memory(
    out_features: int,
    in_features: int,
    *,
    rank: Optional[int] = None,
    fast_factored: bool = True,
    factor_dtype: str = "float32",
    z_dtype: str = "float32",
    optimizer_states: int = 2,
) -> SVFMatrixMemory:
    """Bytes SVF keeps for one targeted weight of shape `(out_features, in_features)`.

    Args:
        out_features (`int`), in_features (`int`): The weight's shape.
        rank (`int`, *optional*): `SVFConfig.rank`; `None` adapts all `min(out, in)` values.
        fast_factored (`bool`): `SVFConfig.fast_factored` (the default `True` keeps `P`).
        factor_dtype (`str`): Dtype of `Q` and `P` (`S` is float32 in any case): the one
            [`~peft_spectral.tuners.svf.factor_dtype.resolve_factor_dtype`] gives, i.e. by default the base weight's
            dtype for a bfloat16/float16 base and `"float32"` for a float32 one.
        z_dtype (`str`): Dtype of `z` and its optimizer state.
        optimizer_states (`int`): Tensors of `z`'s size the optimizer keeps (2 for AdamW's moments).

    Returns:
        [`SVFMatrixMemory`]: The bytes of each part.
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"out_features and in_features must be positive, got ({out_features}, {in_features})")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    if optimizer_states < 0:
        raise ValueError(f"optimizer_states must be >= 0, got {optimizer_states!r}")
    fb = _bytes_per_value(factor_dtype, "factor_dtype")
    zb = _bytes_per_value(z_dtype, "z_dtype")
    m = min(out_features, in_features)
    k = min(rank or m, m)
    keeps_p = fast_factored and 2 * k > m
    return SVFMatrixMemory(
        S=m * S_BYTES,
        Q=m * m * fb,
        P=out_features * in_features * fb if keeps_p else 0,
        z=k * zb,
        z_training=k * zb * (1 + optimizer_states),
    )


def lora_matrix_memory(out_features: int, in_features: int, r: int = 16, dtype: str = "float32") -> int:
    """Bytes of a LoRA adapter of rank `r` on one weight while training with AdamW (`A`, `B`, gradients, 2 moments)."""
    return r * (out_features + in_features) * _bytes_per_value(dtype, "dtype") * 4


def model_memory(shapes: dict[str, tuple[int, int]], targets: Iterable[str], layers: int, **kwargs) -> SVFMatrixMemory:
    """SVF's bytes for `layers` identical blocks whose matrices `shapes` (name → `(out, in)`) are targeted by name.

    Args:
        shapes (`dict[str, tuple[int, int]]`): The matrices of one block.
        targets (`Iterable[str]`): The names adapted.
        layers (`int`): Number of blocks.
        **kwargs: Passed to [`svf_matrix_memory`].
    """
    names = list(targets)
    unknown = sorted(set(names) - set(shapes))
    if unknown:
        raise ValueError(f"targets {unknown} are not among the block's matrices {sorted(shapes)}")
    total = SVFMatrixMemory(0, 0, 0, 0, 0)
    for name in names:
        total = total + svf_matrix_memory(*shapes[name], **kwargs)
    return total.scaled(layers)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _size(n: int) -> str:
    """Bytes in kB, MB or GB (powers of 1000), three significant figures."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _ratio(svf: int, lora: int, base: int) -> str:
    return f"{(base + svf) / (base + lora):.2f}x"


def memory_tables(examples: Sequence[tuple[str, int, int]] = ()) -> str:
    """The markdown tables of `docs/svf_memory.md`: per matrix, and for Llama-2-7B (MLP targets and all-linear)."""
    examples = list(examples) or [
        ("SmolLM2-135M gate/up", 1536, 576),
        ("SmolLM2-135M down", 576, 1536),
        ("SmolLM2-135M q/o", 576, 576),
        ("SmolLM2-135M k/v", 192, 576),
        ("Llama-2-7B q/k/v/o", 4096, 4096),
        ("Llama-2-7B gate/up", 11008, 4096),
        ("Llama-2-7B down", 4096, 11008),
    ]
    lines = [
        "| matrix `(out, in)` | `Q`, `P` dtype | `S` | `Q` | `P` (fast form) | `z` + grad + AdamW | SVF total | LoRA r=16 (fp32, AdamW) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, out_f, in_f in examples:
        for dtype in ("float32", "bfloat16"):
            mem = svf_matrix_memory(out_f, in_f, factor_dtype=dtype)
            lines.append(
                f"| {label} `({out_f}, {in_f})` | {dtype} | {_size(mem.S)} | {_size(mem.Q)} | {_size(mem.P)} | "
                f"{_size(mem.z + mem.z_training)} | {_size(mem.total)} | {_size(lora_matrix_memory(out_f, in_f))} |"
            )
    lines += [
        "",
        (
            "| Llama-2-7B (32 blocks) | `Q`, `P` dtype | `Q` + `S` | `P` | SVF total (fast, default) | "
            "SVF total (`fast_factored=False`) | LoRA r=16 | base weights (bf16 / fp32) | "
            "bf16 base: weights + SVF fast / exact vs weights + LoRA |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_bf16, base_fp32 = LLAMA2_7B_PARAMS * 2, LLAMA2_7B_PARAMS * 4
    dtypes = (
        ("bfloat16", "bfloat16 (default for a bf16 base)"),
        ("float32", 'float32 (`factor_dtype="float32"`; default for an fp32 base)'),
    )
    for label, targets in (("MLP targets", MLP_TARGETS), ("all linear", tuple(LLAMA2_7B_BLOCK))):
        lora = LLAMA2_7B_LAYERS * sum(lora_matrix_memory(*LLAMA2_7B_BLOCK[t]) for t in targets)
        for dtype, dtype_label in dtypes:
            fast = model_memory(LLAMA2_7B_BLOCK, targets, LLAMA2_7B_LAYERS, factor_dtype=dtype)
            exact = model_memory(LLAMA2_7B_BLOCK, targets, LLAMA2_7B_LAYERS, factor_dtype=dtype, fast_factored=False)
            lines.append(
                f"| {label} | {dtype_label} | {_gb(fast.Q + fast.S)} GB | {_gb(fast.P)} GB | {_gb(fast.total)} GB | "
                f"{_gb(exact.total)} GB | {_gb(lora)} GB | {_gb(base_bf16)} / {_gb(base_fp32)} GB | "
                f"{_ratio(fast.total, lora, base_bf16)} / {_ratio(exact.total, lora, base_bf16)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(memory_tables(), end="")
