"""SVF training under FSDP with 2 CPU processes (gloo) reaches the same z as 1 process on the same global batch.

What runs where (accelerate 1.16, torch 2.13):

* `accelerate launch --use_fsdp` on a machine without GPUs does **not** shard: `AcceleratorState` enables
  `DistributedType.FSDP` only for accelerator device types (MULTI_GPU, MULTI_XPU, ...), so a CPU run silently falls
  back to DDP over gloo. The Trainer path under FSDP is therefore only run where ≥ 2 CUDA devices exist
  (`test_accelerate_fsdp_matches_one_process`, skipped on CPU with that reason).
* torch's FSDP (FSDP2 `fully_shard`, and FSDP1 with PEFT's `fsdp_auto_wrap_policy` and `use_orig_params=True`) does
  run on CPU with gloo: `test_fsdp_cpu_matches_unsharded` shards the SVF model over 2 processes, trains z with SGD on
  half of the global batch each, and checks the gathered z against an unsharded replica trained on the whole batch in
  rank 0.

This file is also the worker script (`python -m accelerate.commands.launch ... test_distributed_fsdp.py MODE OUT ...`).
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


def _svf_model():
    sys.path.insert(0, str(HERE))
    from peft import get_peft_model
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral import SVFConfig

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    return get_peft_model(model, SVFConfig(target_modules=TARGETS, use_svd_cache=False))


def _train(model, batch: torch.Tensor) -> None:
    # Plain SGD: unlike Adam, its step scales with the gradient, so a wrong reduction (sum vs mean) would show.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2.0)
    for _ in range(STEPS):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _cpu_worker(out_dir: str, version: str) -> None:
    """Torch FSDP on CPU/gloo: shard, train on this rank's half of the batch, compare with an unsharded replica."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(3, 60, (GLOBAL_BATCH, 8), generator=torch.Generator().manual_seed(0))
    local = batch.chunk(world)[rank]

    model = _svf_model()
    if version == "2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True, device_id=torch.device("cpu")
        )
    _train(model, local)

    if version == "2":
        from torch.distributed.tensor import DTensor

        z = {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()
            if ".svf_z." in n
        }
    else:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            full = model.state_dict()
        z = {n: v.detach().clone() for n, v in full.items() if ".svf_z." in n}
    if rank == 0:
        reference = _svf_model()
        _train(reference, batch)
        ref = {n: p.detach().clone() for n, p in reference.named_parameters() if ".svf_z." in n}
        save_file({f"fsdp/{k}": v.contiguous() for k, v in z.items()}, os.path.join(out_dir, "fsdp.safetensors"))
        save_file({f"ref/{k}": v.contiguous() for k, v in ref.items()}, os.path.join(out_dir, "ref.safetensors"))
    dist.destroy_process_group()


def _strip(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").removeprefix("fsdp/").removeprefix("ref/")


@pytest.mark.parametrize("version", ["1", "2"])
def test_fsdp_cpu_matches_unsharded(tmp_path, version):
    from distributed_utils import accelerate_launch
    from safetensors.torch import load_file

    accelerate_launch(Path(__file__), ["cpu", str(tmp_path), version], 2)
    sharded = {_strip(k): v for k, v in load_file(str(tmp_path / "fsdp.safetensors")).items()}
    ref = {_strip(k): v for k, v in load_file(str(tmp_path / "ref.safetensors")).items()}
    assert len(ref) == 6 and set(sharded) == set(ref), (sorted(sharded), sorted(ref))
    assert all(v.ndim == 1 for v in ref.values())
    moved = max(float((v - 1).abs().max()) for v in ref.values())
    assert moved > 1e-3, "z did not move: the comparison would be vacuous"
    for name in ref:
        torch.testing.assert_close(sharded[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def _trainer_worker(out_dir: str, per_device_batch: int) -> None:
    """`train_svf` SFT under whatever `accelerate launch` configured; saves the full-state-dict z on the main rank."""
    sys.path.insert(0, str(HERE))
    from safetensors.torch import save_file
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral import SVFConfig
    from peft_spectral.tasks import Example, Task
    from peft_spectral.training import train_svf

    torch.set_num_threads(1)
    examples = [
        Example(prompt=f"Item {i:02d}: which word?", target=word, choices=(), label=None)
        for i, word in enumerate(["alpha", "bravo", "delta", "gamma", "kappa", "omega", "sigma", "theta"])
    ]
    task = Task(name="toy", kind="generation", train=examples, validation=[], test=[])
    tok = build_tiny_tokenizer()
    result = train_svf(
        build_tiny_llama(tok),
        tok,
        task,
        method="sft",
        output_dir=os.path.join(out_dir, "run"),
        max_steps=STEPS,
        svf_config=SVFConfig(target_modules=TARGETS, use_svd_cache=False),
        per_device_train_batch_size=per_device_batch,
        learning_rate=0.05,
        disable_tqdm=True,
    )
    accelerator = result.trainer.accelerator
    full = accelerator.get_state_dict(result.trainer.model)
    if accelerator.is_main_process:
        z = {k: v.detach().float().contiguous().clone() for k, v in full.items() if ".svf_z." in k}
        z["__fsdp__"] = torch.tensor([int(accelerator.distributed_type.name == "FSDP")])
        save_file(z, os.path.join(out_dir, "z.safetensors"))


ACCELERATE_FSDP_ARGS = [
    "--use_fsdp",
    "--fsdp_version",
    "2",
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap",
    "LlamaDecoderLayer",
    "--fsdp_state_dict_type",
    "FULL_STATE_DICT",
]


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="accelerate enables FSDP only on accelerator devices: on CPU `--use_fsdp` silently runs DDP over gloo",
)
def test_accelerate_fsdp_matches_one_process(tmp_path):
    from distributed_utils import accelerate_launch
    from safetensors.torch import load_file

    runs = {}
    for n, launch_args in ((1, None), (2, ACCELERATE_FSDP_ARGS)):
        out = tmp_path / f"np{n}"
        out.mkdir()
        accelerate_launch(Path(__file__), ["trainer", str(out), str(GLOBAL_BATCH // n)], n, launch_args=launch_args)
        z = load_file(str(out / "z.safetensors"))
        assert bool(int(z.pop("__fsdp__"))) == (n == 2)
        runs[n] = {_strip(k): v for k, v in z.items()}
    assert len(runs[1]) == 6 and set(runs[1]) == set(runs[2])
    for name in runs[1]:
        torch.testing.assert_close(runs[2][name].cpu(), runs[1][name].cpu(), atol=1e-5, rtol=1e-4, msg=name)


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    if sys.argv[1] == "cpu":
        _cpu_worker(sys.argv[2], sys.argv[3])
    else:
        _trainer_worker(sys.argv[2], int(sys.argv[3]))
        end_worker()
