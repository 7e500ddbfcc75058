"""CPI-FT building blocks: core masks, bitmasks, Jaccard, grouping, fusion (SLERP), the freeze callback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_spectral.cpi import (
    CPIConfig,
    connected_groups,
    core_masks,
    fuse_deltas,
    jaccard_matrix,
    mixed_examples,
    pack_mask,
    slerp_merge,
    unpack_mask,
)
from peft_spectral.tasks import Example


def _deltas(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(7, 13, generator=g),
        "b.weight": torch.randn(31, generator=g) * 3,
        "c.weight": torch.randn(5, 4, generator=g) * 0.1,
    }


# ---------------------------------------------------------------------------------------------------- core masks


@pytest.mark.parametrize("p", [0.01, 0.1, 0.37])
def test_core_masks_global_true_top_p(p):
    deltas = _deltas()
    masks = core_masks(deltas, p, "global")
    flat = torch.cat([d.reshape(-1).abs() for d in deltas.values()])
    k = max(1, round(p * flat.numel()))
    expected = set(np.argsort(-flat.numpy(), kind="stable")[:k].tolist())
    got = torch.cat([masks[n].reshape(-1) for n in deltas]).nonzero().reshape(-1).tolist()
    assert set(got) == expected and len(got) == k
    assert all(masks[n].shape == deltas[n].shape and masks[n].dtype == torch.bool for n in deltas)


def test_core_masks_per_tensor_true_top_p():
    deltas = _deltas(1)
    masks = core_masks(deltas, 0.2, "per_tensor")
    for name, d in deltas.items():
        flat = d.reshape(-1).abs()
        k = max(1, round(0.2 * flat.numel()))
        m = masks[name].reshape(-1)
        assert int(m.sum()) == k
        assert flat[m].min() >= flat[~m].max()
    # global scope selects mostly from the large-magnitude tensor "b", per-tensor from each
    glob = core_masks(deltas, 0.2, "global")
    assert int(glob["c.weight"].sum()) == 0 and int(masks["c.weight"].sum()) == 4


@pytest.mark.parametrize("p", [0.0, 1.0, -1, 2])
def test_core_masks_bad_p(p):
    with pytest.raises(ValueError, match="core_fraction"):
        core_masks(_deltas(), p)


def test_pack_unpack_roundtrip():
    m = torch.rand(13, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(m.numel() / 8)
    assert torch.equal(unpack_mask(packed, m.shape), m)


# ------------------------------------------------------------------------------------------- jaccard / grouping


def _mask(n, idx):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(idx)] = True
    return m


def test_jaccard_known_values():
    a = {"x": _mask(200, range(10)), "y": _mask(50, range(5))}  # |A| = 15
    b = {"x": _mask(200, range(5, 15)), "y": _mask(50, range(5))}  # |B| = 15, |A∩B| = 5 + 5
    c = {"x": _mask(200, range(100, 110)), "y": _mask(50, range(40, 45))}
    j = jaccard_matrix([a, b, c])
    assert j[0, 1] == pytest.approx(10 / 20) and j[1, 0] == j[0, 1]
    assert j[0, 2] == 0 and j[1, 2] == 0 and np.all(np.diag(j) == 1)
    packed = jaccard_matrix([{k: pack_mask(v) for k, v in m.items()} for m in (a, b, c)])
    assert np.array_equal(packed, j)


def test_grouping_connected_components():
    # 0-1 similar, 1-3 similar, 0-3 not (transitive through 1); 2 alone; 4-5 similar
    sim = np.eye(6)
    for i, j, v in [(0, 1, 0.5), (1, 3, 0.2), (0, 3, 0.01), (4, 5, 0.15), (2, 4, 0.05)]:
        sim[i, j] = sim[j, i] = v
    assert connected_groups(sim, 0.1) == [[0, 1, 3], [2], [4, 5]]
    assert connected_groups(sim, 0.3) == [[0, 1], [2], [3], [4], [5]]
    assert connected_groups(sim, 0.0) == [[0, 1, 2, 3, 4, 5]]
    assert connected_groups(sim, 1.0) == [[0], [1], [2], [3], [4], [5]]
    assert connected_groups(sim, 0.15) == [[0, 1, 3], [2], [4, 5]]  # J >= tau joins


@pytest.mark.parametrize("tau", [-0.1, 1.1])
def test_grouping_bad_tau(tau):
    with pytest.raises(ValueError, match="similarity_threshold"):
        connected_groups(np.eye(2), tau)


def test_config_validation():
    with pytest.raises(ValueError, match="core_fraction"):
        CPIConfig(core_fraction=1.0)
    with pytest.raises(ValueError, match="similarity_threshold"):
        CPIConfig(similarity_threshold=2.0)
    with pytest.raises(ValueError, match="train_params"):
        CPIConfig(train_params="lora")


# ----------------------------------------------------------------------------------------------------- fusion


def _ref_slerp(a, b, t, eps=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if 1 - abs(cos) < eps:
        return (1 - t) * a + t * b
    om = np.arccos(np.clip(cos, -1, 1))
    return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


def test_fusion_core_transplant_and_slerp_reference():
    g = torch.Generator().manual_seed(0)
    da = {"w": torch.randn(6, 5, generator=g)}
    db = {"w": torch.randn(6, 5, generator=g)}
    ma = {"w": torch.zeros(6, 5, dtype=torch.bool)}
    mb = {"w": torch.zeros(6, 5, dtype=torch.bool)}
    ma["w"][0, :3] = True
    mb["w"][0, 2:4] = True  # (0, 2) is in both cores: the larger |Δ| wins
    mb["w"][5, 4] = True
    db["w"][0, 2] = 10.0
    fused = fuse_deltas([da, db], [ma, mb], ["w"])["w"]
    union = ma["w"] | mb["w"]
    ref = _ref_slerp(da["w"][~union].numpy(), db["w"][~union].numpy(), 0.5)
    np.testing.assert_allclose(fused[~union].numpy(), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(fused[0, :2], da["w"][0, :2])
    assert fused[0, 2] == 10.0
    assert fused[0, 3] == db["w"][0, 3] and fused[5, 4] == db["w"][5, 4]
    # the SLERP is not the linear mean for non-parallel vectors
    assert not np.allclose(fused[~union].numpy(), 0.5 * (da["w"][~union] + db["w"][~union]).numpy())
    # conflict resolved towards task a when its |Δ| is larger
    db["w"][0, 2] = 0.0
    da["w"][0, 2] = -7.0
    assert fuse_deltas([da, db], [ma, mb], ["w"])["w"][0, 2] == -7.0


def test_fusion_nearly_parallel_is_linear():
    a = torch.linspace(-1, 1, 40)
    b = 2.0 * a + 1e-6 * torch.sin(torch.arange(40.0))  # cos Ω ≈ 1
    none = {"w": torch.zeros(40, dtype=torch.bool)}
    fused = fuse_deltas([{"w": a}, {"w": b}], [none, none], ["w"], slerp_t=0.25)["w"]
    torch.testing.assert_close(fused, 0.75 * a + 0.25 * b, rtol=0, atol=1e-6)
    assert torch.isfinite(fused).all()


def test_slerp_merge_three_tasks_iterative():
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(20, generator=g) for _ in range(3)]
    ref = _ref_slerp(_ref_slerp(vs[0].numpy(), vs[1].numpy(), 1 / 2), vs[2].numpy(), 1 / 3)
    np.testing.assert_allclose(slerp_merge(vs).numpy(), ref, rtol=1e-5, atol=1e-6)
    # parallel vectors: equal weights give exactly the mean
    a = torch.arange(1.0, 6.0)
    torch.testing.assert_close(slerp_merge([a, 2 * a, 3 * a]), 2 * a)
    fixed = _ref_slerp(_ref_slerp(vs[0].numpy(), vs[1].numpy(), 0.3), vs[2].numpy(), 0.3)
    np.testing.assert_allclose(slerp_merge(vs, t=0.3).numpy(), fixed, rtol=1e-5, atol=1e-6)


def test_mixed_examples_balanced():
    a = [Example(prompt=f"a{i}", target="x") for i in range(2)]
    b = [Example(prompt=f"b{i}", target="y") for i in range(5)]
    mix = mixed_examples([a, b], seed=0)
    assert len(mix) == 10
    assert sum(e.prompt.startswith("a") for e in mix) == 5
    assert {e.prompt for e in mix} == {e.prompt for e in a + b}
    with pytest.raises(ValueError):
        mixed_examples([a, []])


def test_stage_step_budget():
    cfg = CPIConfig(probe_steps=7, total_stage_steps=10)
    assert [cfg.steps_for_stage(k, 3) for k in range(3)] == [4, 3, 3]
    assert CPIConfig(probe_steps=7).steps_for_stage(0, 3) == 7
    assert CPIConfig(probe_steps=7, stage_steps=2).steps_for_stage(1, 3) == 2
