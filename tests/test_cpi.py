"""CPI-FT building blocks: core masks, bitmasks, Jaccard, grouping, fusion (SLERP), the freeze callback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_spectral.cpi import (
    STAGE_ORDERS,
    CPIConfig,
    connected_groups,
    core_masks,
    fuse_deltas,
    jaccard_matrix,
    mixed_examples,
    order_groups,
    pack_mask,
    slerp_merge,
    unpack_mask,
)
from peft_spectral.tasks import Example
from peft_spectral.tuners.core_isolation import CoreIsolationConfig


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
        CPIConfig(adapter=CoreIsolationConfig(core_fraction=1.0))
    with pytest.raises(ValueError, match="similarity_threshold"):
        CPIConfig(adapter=CoreIsolationConfig(similarity_threshold=2.0))
    with pytest.raises(ValueError, match="train_params"):
        CPIConfig(train_params="lora")
    with pytest.raises(ValueError, match="fusion"):
        CPIConfig(fusion="mean")
    with pytest.raises(ValueError, match="stage_order"):
        CPIConfig(stage_order="alphabetical")
    with pytest.raises(TypeError, match="CoreIsolationConfig"):
        CPIConfig(adapter={"core_fraction": 0.1})
    with pytest.raises(ValueError, match="needs `stage_dependencies`"):
        CPIConfig(stage_order="dependency")
    with pytest.raises(ValueError, match="only used with stage_order='dependency'"):
        CPIConfig(stage_dependencies=[["a", "b"]])
    with pytest.raises(ValueError, match="pairs"):
        CPIConfig(stage_order="dependency", stage_dependencies=[["a", "b", "c"]])


def test_config_defaults_and_round_trip():
    cfg = CPIConfig()
    assert cfg.stage_order == "random" and cfg.fusion == "slerp_params"  # the paper's defaults
    cfg = CPIConfig(
        adapter=CoreIsolationConfig(target_modules=["up_proj", "down_proj"], core_fraction=0.05, slerp_t=0.3),
        stage_order="dependency",
        stage_dependencies=[("a", "b")],
    )
    data = cfg.to_dict()
    assert data["adapter"]["target_modules"] == ["down_proj", "up_proj"] and data["adapter"]["core_fraction"] == 0.05
    assert "peft_type" not in data["adapter"] and data["stage_dependencies"] == [["a", "b"]]
    back = CPIConfig.from_dict(data)
    assert back.to_dict() == data and isinstance(back.adapter, CoreIsolationConfig)
    # the adapter given is copied: PEFT mutating it later does not change the run's config
    adapter = CoreIsolationConfig(core_fraction=0.2)
    cfg = CPIConfig(adapter=adapter)
    adapter.core_fraction = 0.5
    assert cfg.adapter.core_fraction == 0.2


# ------------------------------------------------------------------------------------------------- stage order

TASKS = ["a", "b", "c", "d", "e"]
GROUPS = [["a", "c"], ["b"], ["d"], ["e"]]  # groups as the grouping step gives them (by first task)


def test_order_input_and_seeded_random():
    assert order_groups(GROUPS, "input", tasks=TASKS) == GROUPS
    import random

    expected = [list(g) for g in GROUPS]
    random.Random(7).shuffle(expected)
    assert order_groups(GROUPS, "random", tasks=TASKS, seed=7) == expected
    assert order_groups(GROUPS, "random", tasks=TASKS, seed=7) == order_groups(GROUPS, "random", tasks=TASKS, seed=7)
    orders = {tuple(map(tuple, order_groups(GROUPS, "random", tasks=TASKS, seed=s))) for s in range(10)}
    assert len(orders) > 1  # the seed matters


def test_order_difficulty_easiest_first():
    loss = {"a": 3.0, "c": 1.0, "b": 2.5, "d": 0.5, "e": 2.0}  # group means: ac 2.0, b 2.5, d 0.5, e 2.0
    assert order_groups(GROUPS, "difficulty", tasks=TASKS, difficulty=loss) == [["d"], ["a", "c"], ["e"], ["b"]]
    with pytest.raises(ValueError, match=r"no value for tasks \['e'\]"):
        order_groups(GROUPS, "difficulty", tasks=TASKS, difficulty={k: v for k, v in loss.items() if k != "e"})


def test_order_dependency_topological():
    deps = [["e", "a"], ["d", "b"], ["b", "c"], ["a", "c"]]  # (a, c) lies inside one group: ignored
    # {a,c} waits for e and b, b waits for d. Ready at the start: d, e -> d (earlier in input order); then b, e -> b
    order = order_groups(GROUPS, "dependency", tasks=TASKS, dependencies=deps)
    assert order == [["d"], ["b"], ["e"], ["a", "c"]]
    assert order_groups(GROUPS, "dependency", tasks=TASKS, dependencies=[]) == GROUPS
    with pytest.raises(ValueError, match="cycle"):
        order_groups(GROUPS, "dependency", tasks=TASKS, dependencies=[["a", "b"], ["b", "c"]])
    with pytest.raises(ValueError, match="unknown tasks"):
        order_groups(GROUPS, "dependency", tasks=TASKS, dependencies=[["a", "zz"]])


def test_order_core_overlap_least_first():
    jac = np.eye(5)
    for i, j, v in [(0, 1, 0.4), (2, 3, 0.3), (0, 4, 0.05), (1, 3, 0.1)]:
        jac[i, j] = jac[j, i] = v
    # mean J with the tasks outside: {a,c}: (a:b .4, a:d 0, a:e .05, c:b 0, c:d .3, c:e 0)/6 = .125;
    # b: (.4 + 0 + .1 + 0)/4 = .125; d: (0 + .1 + .3 + 0)/4 = .1; e: (.05 + 0 + 0 + 0)/4 = .0125
    order = order_groups(GROUPS, "core_overlap", tasks=TASKS, jaccard=jac.tolist())
    assert order == [["e"], ["d"], ["a", "c"], ["b"]]  # ties ({a,c} and b at .125) keep the input order
    assert order_groups([["a", "b"]], "core_overlap", tasks=["a", "b"], jaccard=[[1, 0], [0, 1]]) == [["a", "b"]]


def test_order_small_first_and_unknown():
    sizes = {"a": 5, "c": 5, "b": 3, "d": 30, "e": 3}
    assert order_groups(GROUPS, "small_first", tasks=TASKS, core_sizes=sizes) == [["b"], ["e"], ["a", "c"], ["d"]]
    with pytest.raises(ValueError, match="stage_order"):
        order_groups(GROUPS, "alphabetical", tasks=TASKS)
    assert set(STAGE_ORDERS) == {"random", "input", "difficulty", "dependency", "core_overlap", "small_first"}


# ----------------------------------------------------------------------------------------------------- fusion


def _ref_slerp(a, b, t, eps=1e-4):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.linalg.norm(a) == 0 or np.linalg.norm(b) == 0:
        return (1 - t) * a + t * b
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if 1 - abs(cos) < eps:
        return (1 - t) * a + t * b
    om = np.arccos(np.clip(cos, -1, 1))
    return np.sin((1 - t) * om) / np.sin(om) * a + np.sin(t * om) / np.sin(om) * b


def _ref_fuse(deltas, masks, base, fusion, t=None, eps=1e-4):
    """Plain reference: per tensor, a loop over the core entries, then the explicit SLERP formula on the flattened
    non-core entries of θ_t = θ0 + Δ_t ("slerp_params") or of Δ_t ("slerp_task_vectors")."""
    out = {}
    for name, shape in ((n, d.shape) for n, d in deltas[0].items()):
        ds = [d[name].double().numpy().ravel() for d in deltas]
        ms = [m[name].numpy().ravel() for m in masks]
        theta0 = base[name].double().numpy().ravel()
        fused = np.zeros(theta0.size)
        core = np.zeros(theta0.size, dtype=bool)
        for m in ms:
            core |= m
        for i in np.flatnonzero(core):
            owners = [k for k in range(len(ds)) if ms[k][i]]
            best = max(owners, key=lambda k: (abs(ds[k][i]), -k))  # largest |Δ|, ties to the earlier task
            fused[i] = ds[best][i]
        free = ~core
        vecs = [theta0[free] + d[free] for d in ds] if fusion == "slerp_params" else [d[free] for d in ds]
        merged = vecs[0]
        for k in range(1, len(vecs)):
            merged = _ref_slerp(merged, vecs[k], 1 / (k + 1) if t is None else t, eps)
        fused[free] = merged - theta0[free] if fusion == "slerp_params" else merged
        out[name] = fused.reshape(tuple(shape))
    return out


def _fusion_case(n_tasks=3, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "v": (17,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    deltas = [{k: torch.randn(s, generator=g) * delta_scale for k, s in shapes.items()} for _ in range(n_tasks)]
    masks = [{k: torch.rand(s, generator=g) < 0.15 for k, s in shapes.items()} for _ in range(n_tasks)]
    return base, deltas, masks


@pytest.mark.parametrize("fusion", ["slerp_params", "slerp_task_vectors"])
@pytest.mark.parametrize("slerp_t", [None, 0.3])
def test_fusion_matches_reference(fusion, slerp_t):
    base, deltas, masks = _fusion_case()
    got = fuse_deltas(deltas, masks, ["w", "v"], base=base, fusion=fusion, slerp_t=slerp_t)
    ref = _ref_fuse(deltas, masks, base, fusion, t=slerp_t)
    for name in ("w", "v"):
        np.testing.assert_allclose(got[name].double().numpy(), ref[name], rtol=1e-5, atol=1e-6)
    # lazy sources (callables) give the same result
    lazy = fuse_deltas(
        [d.__getitem__ for d in deltas], [m.__getitem__ for m in masks], ["w"], base=base.__getitem__, fusion=fusion
    )
    torch.testing.assert_close(lazy["w"], fuse_deltas(deltas, masks, ["w"], base=base, fusion=fusion)["w"])


def test_fusion_params_differs_from_task_vectors():
    """SLERP(θ0 + Δ_a, θ0 + Δ_b) − θ0 ≠ SLERP(Δ_a, Δ_b): the two forms are not the same merge."""
    base, deltas, masks = _fusion_case(n_tasks=2, seed=1)
    params = fuse_deltas(deltas, masks, ["w"], base=base, fusion="slerp_params")["w"]
    vectors = fuse_deltas(deltas, masks, ["w"], base=base, fusion="slerp_task_vectors")["w"]
    free = ~(masks[0]["w"] | masks[1]["w"])
    assert (params[free] - vectors[free]).abs().max() > 1e-2
    core = ~free
    assert torch.equal(params[core], vectors[core])  # the cores are transplanted alike
    with pytest.raises(ValueError, match="needs `base`"):
        fuse_deltas(deltas, masks, ["w"])
    with pytest.raises(ValueError, match="fusion"):
        fuse_deltas(deltas, masks, ["w"], base=base, fusion="mean")


def test_fusion_params_nearly_parallel_is_linear():
    """Small Δ on a large θ0: the θ_t are nearly parallel, SLERP falls back to (1-t)·θ_a + t·θ_b, i.e. the linear mix
    of the deltas."""
    base, deltas, masks = _fusion_case(n_tasks=2, seed=2, delta_scale=1e-3)
    none = [{k: torch.zeros_like(m) for k, m in mk.items()} for mk in masks]
    got = fuse_deltas(deltas, none, ["w", "v"], base=base, fusion="slerp_params", slerp_t=0.25)
    ref = _ref_fuse(deltas, none, base, "slerp_params", t=0.25)
    for name in ("w", "v"):
        linear = 0.75 * deltas[0][name] + 0.25 * deltas[1][name]
        torch.testing.assert_close(got[name], linear, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[name].double().numpy(), ref[name], rtol=0, atol=1e-6)


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
    fused = fuse_deltas([da, db], [ma, mb], ["w"], fusion="slerp_task_vectors")["w"]
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
    assert fuse_deltas([da, db], [ma, mb], ["w"], fusion="slerp_task_vectors")["w"][0, 2] == -7.0


def test_fusion_nearly_parallel_is_linear():
    a = torch.linspace(-1, 1, 40)
    b = 2.0 * a + 1e-6 * torch.sin(torch.arange(40.0))  # cos Ω ≈ 1
    none = {"w": torch.zeros(40, dtype=torch.bool)}
    fused = fuse_deltas([{"w": a}, {"w": b}], [none, none], ["w"], fusion="slerp_task_vectors", slerp_t=0.25)["w"]
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
