"""SVF under a real DeepSpeed ZeRO-3 engine, 2 CPU processes (gloo).

The model is created under ZeRO-3 (`HfDeepSpeedConfig` + `from_config`, so `deepspeed.zero.Init` partitions every
weight across the ranks; each rank holds an empty `weight`). Checked against an unpartitioned replica with the same
weights:

* the SVF factors (`S`, `Q`, `P = W Q`) are those of the full weight: `get_peft_model` reads the weights inside
  PEFT's `gather_params_ctx`; without it the SVD would see an empty tensor;
* the ZeRO-3 engine's loss at initialisation equals the replica's;
* after SGD steps on half of the global batch per rank, the gathered `z` equals the replica's trained on the whole
  batch in one process;
* merging the trained adapter writes the replica's merged weights into the shards (the merged engine gives the
  adapter's loss), and unmerging restores the original weights bit for bit;
* SpectralCompress (truncation factors) and CoreIsolation (a delta and a mask shaped like the weight, also for a
  second adapter added later) build the same adapter tensors as on the replica, and merge/unmerge as SVF does;
* the three tuners do the same on GPT-2's `Conv1D` layers (weight stored `(in, out)`; its shape read from `ds_shape`).

Run in fp32 and in bf16 (DeepSpeed's `bf16` mode, a bf16 base and replica), the latter with bf16 tolerances.

Skipped when DeepSpeed is not installed (`pip install --no-build-isolation deepspeed`; see docs/distributed.md).
This file is also the worker script (`python -m accelerate.commands.launch ... test_deepspeed_zero3.py OUT DTYPE`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


HERE = Path(__file__).resolve().parent
STEPS = 3
GLOBAL_BATCH = 4
TARGETS = ["gate_proj", "up_proj", "down_proj"]
#: Tolerances of the ZeRO-3 run against the replica: fp32 sums in another order; bf16 (DeepSpeed's `bf16` mode, the
#: base weights and factors in bf16, `z` kept in fp32) rounds every matmul to 8 bits of mantissa.
TOLERANCE = {"float32": {"atol": 1e-5, "rtol": 1e-4}, "bfloat16": {"atol": 2e-2, "rtol": 2e-2}}


def _zero3_model(config, reference: dict, rank: int):
    """A model built under `deepspeed.zero.Init` (an `HfDeepSpeedConfig` must be alive) holding `reference`'s weights."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        if rank == 0:
            for name, p in params.items():
                p.data.copy_(reference[name])
    return model


def _worker(out_dir: str, dtype_name: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(HERE))
    import deepspeed
    import torch.distributed as dist
    from peft import get_peft_model
    from safetensors.torch import save_file
    from testing_utils import build_tiny_llama, build_tiny_tokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from peft_spectral import SVFConfig
    from peft_spectral.tuners._linear import weight_matrix

    torch.set_num_threads(1)
    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(3, 60, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(0))
    local = batch.chunk(world)[rank]
    svf_config = SVFConfig(target_modules=TARGETS, use_svd_cache=False)

    tok = build_tiny_tokenizer()
    plain = build_tiny_llama(tok).to(dtype)  # built directly (not by from_config): not partitioned
    reference = {n: p.detach().clone() for n, p in plain.named_parameters()}

    ds_config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        # every weight partitioned, however small (by default DeepSpeed keeps small ones gathered on every rank)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    keep_alive = HfDeepSpeedConfig(ds_config)  # while it lives, from_config builds under deepspeed.zero.Init
    model = _zero3_model(plain.config, reference, rank)
    up = model.model.layers[0].mlp.up_proj.weight
    assert up.numel() == 0 and up.ds_numel == 64 * 32, "the weights are not partitioned: the test would be vacuous"

    model = get_peft_model(model, svf_config)
    replica = get_peft_model(plain, svf_config)
    layers = dict(replica.base_model.svf_layers())
    checked = 0
    for name, layer in model.base_model.svf_layers():
        w = weight_matrix(layers[name].get_base_layer()).float()  # the replica's full weight
        s, q = layer.svf_S, layer.svf_Q.float()
        torch.testing.assert_close(s, torch.linalg.svdvals(w), atol=1e-5, rtol=1e-4, msg=name)
        # Q holds the singular vectors of the full weight: W Q (or Qᵀ W) has orthogonal columns (rows) of norm σ
        p = w @ q if layer.svf_side == "right" else (q.T @ w).T
        scale = 1e-4 if dtype == torch.float32 else tol["rtol"] * float(s.max() ** 2)  # Q is stored in bf16 there
        torch.testing.assert_close(p.T @ p, torch.diag(s**2), atol=scale, rtol=1e-4, msg=name)
        if layer.svf_P is not None:
            expected = w @ q if layer.svf_side == "right" else q.T @ w
            torch.testing.assert_close(layer.svf_P.float(), expected, **tol, msg=name)
        checked += 1
    assert checked == 2 * len(TARGETS)

    if dtype == torch.float32:  # their tensors do not depend on the dtype beyond rounding
        _check_other_tuners(rank)

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(trainable, lr=2.0), config=ds_config)
    assert engine.module.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.numel() == 0
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=local, labels=local).loss
        losses.append(float(loss))
        engine.backward(loss)
        engine.step()
    z_params = {n: p for n, p in engine.module.named_parameters() if ".svf_z." in n}
    with deepspeed.zero.GatheredParameters(list(z_params.values())):
        z = {n: p.detach().clone() for n, p in z_params.items()}
    first_loss = torch.tensor([losses[0]])
    dist.all_reduce(first_loss)  # the mean over ranks of the local losses = the loss of the global batch
    merged = _merge_under_engine(engine, local, rtol=tol["rtol"])
    del keep_alive

    if rank == 0:
        with torch.no_grad():
            replica_first = float(replica(input_ids=batch, labels=batch).loss)
        opt = torch.optim.SGD([p for p in replica.parameters() if p.requires_grad], lr=2.0)
        for _ in range(STEPS):
            replica(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        ref_z = {n: p.detach().clone() for n, p in replica.named_parameters() if ".svf_z." in n}
        replica.merge_adapter()
        ref_merged = {
            n: weight_matrix(m.get_base_layer()).detach().clone() for n, m in replica.base_model.svf_layers()
        }
        save_file(
            {f"merged/{k}": v.contiguous() for k, v in merged.items()}, os.path.join(out_dir, "merged.safetensors")
        )
        save_file(
            {f"ref/{k}": v.contiguous() for k, v in ref_merged.items()},
            os.path.join(out_dir, "ref_merged.safetensors"),
        )
        save_file({f"zero3/{k}": v.contiguous() for k, v in z.items()}, os.path.join(out_dir, "zero3.safetensors"))
        save_file({f"ref/{k}": v.contiguous() for k, v in ref_z.items()}, os.path.join(out_dir, "ref.safetensors"))
        losses = torch.tensor([float(first_loss) / world, replica_first])
        save_file({"losses": losses}, os.path.join(out_dir, "losses.safetensors"))


def _gathered_weights(model) -> dict:
    """The full `(out, in)` base weight of every SVF layer (gathered from the ZeRO-3 shards)."""
    import deepspeed

    from peft_spectral.tuners._linear import weight_matrix

    layers = dict(model.base_model.svf_layers())
    weights = [m.get_base_layer().weight for m in layers.values()]
    with deepspeed.zero.GatheredParameters(weights):
        return {n: weight_matrix(m.get_base_layer()).detach().clone() for n, m in layers.items()}


def _merge_under_engine(engine, local: torch.Tensor, rtol: float) -> dict:
    """Merge, unmerge and merge again the trained SVF adapter of a ZeRO-3 engine; returns the merged weights.

    Checked here: the merged engine's loss equals the unmerged adapter's (the merge wrote `U diag(σ ⊙ s) Vᵀ` into
    the shards, and the forward no longer applies the adapter), and `unmerge` gives back the original weights bit for
    bit. The caller compares the merged weights with the replica's. `rtol`: how far the merged loss may be (a merge
    in bf16 rounds the new weight).
    """
    model = engine.module
    original = _gathered_weights(model)
    engine.eval()
    with torch.no_grad():
        adapted = float(engine(input_ids=local, labels=local).loss)
        model.merge_adapter()
        layers = dict(model.base_model.svf_layers())
        assert all(m.merged for m in layers.values())
        backup = next(iter(layers.values())).svf_weight_backup
        shard = next(iter(layers.values())).get_base_layer().weight.ds_tensor
        assert backup.shape == shard.shape, "the backup under ZeRO-3 should be this rank's shard, not the full weight"
        merged = _gathered_weights(model)
        merged_loss = float(engine(input_ids=local, labels=local).loss)
        assert abs(merged_loss - adapted) < rtol * max(1.0, abs(adapted)), (merged_loss, adapted)
        moved = max(float((merged[n] - original[n]).abs().max()) for n in merged)
        assert moved > 1e-4, "the merge did not change the weights"
        model.unmerge_adapter()
        restored = _gathered_weights(model)
        for name, w in original.items():
            assert torch.equal(restored[name], w), f"unmerge under ZeRO-3 did not restore {name} exactly"
        assert all(m.svf_weight_backup is None for m in layers.values())
        assert abs(float(engine(input_ids=local, labels=local).loss) - adapted) < 1e-6
    return merged


def _check_other_tuners(rank: int) -> None:
    """SpectralCompress and CoreIsolation on the Llama, all three tuners on GPT-2's Conv1D layers (weight `(in, out)`)."""
    from testing_utils import build_tiny_gpt2, build_tiny_llama

    from peft_spectral import CoreIsolationConfig, SpectralCompressConfig, SVFConfig

    llama = [
        lambda: SpectralCompressConfig(
            modules={"model.layers.0.mlp.up_proj": {"rho": 0.5, "clusters": 3}, "model.layers.1.mlp.down_proj": {}}
        ),
        lambda: CoreIsolationConfig(target_modules=TARGETS, init_weights=False),
    ]
    _check_tuners(build_tiny_llama, llama, rank)
    conv1d = ["c_attn", "c_fc", "mlp.c_proj"]
    gpt2 = [
        lambda: SVFConfig(target_modules=conv1d, use_svd_cache=False, init_weights=False),
        lambda: SpectralCompressConfig(modules={"transformer.h.0.mlp.c_fc": {"rho": 0.5, "clusters": 2}}),
        lambda: CoreIsolationConfig(target_modules=conv1d, init_weights=False),
    ]
    _check_tuners(build_tiny_gpt2, gpt2, rank)


#: Adapter tensors drawn at random (`init_weights=False`): compared by shape, then synchronised before merging.
RANDOM_INIT = (".core_isolation_delta.", ".svf_z.")


def _check_tuners(build, configs: list, rank: int) -> None:
    """Each config on a fresh ZeRO-3 copy of `build(tokenizer)`: the adapter tensors equal those on an unpartitioned
    replica, and merging/unmerging works on the shards (`_check_merge`)."""
    from peft import get_peft_model
    from testing_utils import build_tiny_tokenizer

    from peft_spectral import CoreIsolationConfig

    plain = build(build_tiny_tokenizer())
    reference = {n: p.detach().clone() for n, p in plain.named_parameters()}
    for make in configs:
        model = get_peft_model(_zero3_model(plain.config, reference, rank), make())
        replica = get_peft_model(build(build_tiny_tokenizer()), make())
        if isinstance(replica.peft_config["default"], CoreIsolationConfig):
            model.add_adapter("second", make())
            replica.add_adapter("second", make())
        tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if "base_layer" not in n}
        expected = {n: t for n, t in [*replica.named_parameters(), *replica.named_buffers()] if "base_layer" not in n}
        adapter = {n for n in expected if any(k in n for k in ("spectral_compress_", "core_isolation_", ".svf_"))}
        assert len(adapter) >= 4 and adapter <= set(tensors), sorted(adapter - set(tensors))
        for name in adapter:
            if any(k in name for k in RANDOM_INIT):  # a random init: compare its shape, not its draw
                assert tensors[name].shape == expected[name].shape, name
                continue
            torch.testing.assert_close(tensors[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
        _check_merge(model, replica)


def _check_merge(model, replica) -> None:
    """Merging the active adapter into ZeRO-3 shards writes the replica's merged weights; unmerging restores them."""
    import deepspeed
    import torch.distributed as dist

    from peft_spectral.tuners._merge import is_zero3_partitioned

    wrapped = {n: m for n, m in model.named_modules() if hasattr(m, "merged_adapters") and hasattr(m, "base_layer")}
    replicas = dict(replica.named_modules())
    weights = [m.get_base_layer().weight for m in wrapped.values()]
    assert wrapped and all(is_zero3_partitioned(w) and w.numel() == 0 for w in weights)
    with deepspeed.zero.GatheredParameters(weights):
        original = {n: m.get_base_layer().weight.detach().clone() for n, m in wrapped.items()}
    replica_params = dict(replica.named_parameters())
    with torch.no_grad():  # a random init differs between ranks and replica: rank 0's everywhere (as an engine syncs)
        for name, p in model.named_parameters():
            if any(k in name for k in RANDOM_INIT):
                dist.broadcast(p.data, src=0)
                replica_params[name].copy_(p)
    model.merge_adapter()
    replica.merge_adapter()
    with deepspeed.zero.GatheredParameters(weights):
        for name, module in wrapped.items():
            expected = replicas[name].get_base_layer().weight
            torch.testing.assert_close(module.get_base_layer().weight, expected, atol=1e-5, rtol=1e-4, msg=name)
        moved = max(float((m.get_base_layer().weight - original[n]).abs().max()) for n, m in wrapped.items())
    assert moved > 1e-4, "the merge did not change the weights"
    model.unmerge_adapter()
    with deepspeed.zero.GatheredParameters(weights):
        for name, module in wrapped.items():
            assert torch.equal(module.get_base_layer().weight, original[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_svf_under_deepspeed_zero3_matches_unpartitioned(tmp_path, dtype):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    from distributed_utils import accelerate_launch
    from safetensors.torch import load_file

    accelerate_launch(Path(__file__), [str(tmp_path), dtype], 2, timeout=600)
    tol = TOLERANCE[dtype]
    losses = load_file(str(tmp_path / "losses.safetensors"))["losses"]
    torch.testing.assert_close(losses[0], losses[1], **tol)
    strip = lambda k: k.removeprefix("zero3/").removeprefix("ref/")  # noqa: E731
    zero3 = {strip(k): v for k, v in load_file(str(tmp_path / "zero3.safetensors")).items()}
    ref = {strip(k): v for k, v in load_file(str(tmp_path / "ref.safetensors")).items()}
    assert len(ref) == 2 * len(TARGETS) and set(zero3) == set(ref), (sorted(zero3), sorted(ref))
    moved = max(float((v - 1).abs().max()) for v in ref.values())
    assert moved > 1e-3, "z did not move: the comparison would be vacuous"
    for name in ref:
        torch.testing.assert_close(zero3[name], ref[name], **tol, msg=name)
    merged = {k.removeprefix("merged/"): v for k, v in load_file(str(tmp_path / "merged.safetensors")).items()}
    ref_merged = {k.removeprefix("ref/"): v for k, v in load_file(str(tmp_path / "ref_merged.safetensors")).items()}
    assert len(merged) == 2 * len(TARGETS) and set(merged) == set(ref_merged)
    for name in merged:  # the weights merged into the ZeRO-3 shards = the replica's merged weights
        torch.testing.assert_close(merged[name].float(), ref_merged[name].float(), **tol, msg=name)


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    _worker(sys.argv[1], sys.argv[2])
    end_worker()
