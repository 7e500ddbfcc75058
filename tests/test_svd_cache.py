"""The SVD (one implementation) and its trusted on-disk cache: integrity, location, read-only disks, dtypes, devices.

| attack or bad input (before: what happened) | test |
|---|---|
| cache entry with a replaced Q column, a changed sigma or a NaN (used as is) | `test_edited_entry_is_rejected_with_a_warning_recomputed_and_rewritten` |
| forged entry with a recomputed digest | `test_self_consistent_but_wrong_entry_is_caught_by_the_probe` |
| Q with two columns swapped, digest recomputed (passed the one-vector probe in 78 of 496 swaps) | `test_every_column_swap_of_q_is_caught_by_the_probe` |
| `svd_cache_dir` in a downloaded `adapter_config.json` (honoured on load) | `test_cache_dir_is_never_saved_and_a_saved_one_is_ignored_on_load` |
| read-only / unwritable `PEFT_SPECTRAL_CACHE` (`OSError` from `get_peft_model`) | `test_unwritable_cache_degrades_to_memory_with_one_warning`, `test_read_only_directory_degrades_to_memory` |
| `use_svd_cache=False` still touching the disk | `test_disabled_cache_never_touches_the_disk` |
| NaN/inf weight (NaN factors, no error) | `test_non_finite_weight_is_refused_with_its_name`, `test_get_peft_model_names_the_non_finite_module` |
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral import SVFConfig, linalg, svd_cache
from peft_spectral.adapter_io import validate_adapter_dir
from peft_spectral.paths import svd_cache_dir
from peft_spectral.svd_cache import (
    CACHE_FORMAT_VERSION,
    SVDCache,
    SVDCacheWarning,
    compute_factors,
    factors_digest,
    svd_from_factors,
)


MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_SPECTRAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PEFT_SPECTRAL_SVD_CACHE", raising=False)
    monkeypatch.setattr(SVDCache, "_warned_dirs", set())


def _weight(out=12, inp=7, seed=0, dtype=torch.float32):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _entry(cache, factors):
    path = cache.path_for(factors.weight_hash)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


def _rewrite(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _svd_ref(w):
    """Plain float64 LAPACK SVD: the reference."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s, vh.T


# ----------------------------------------------------------------------------- integrity of entries


@pytest.mark.parametrize(
    "tamper",
    ["replace_q_column", "change_sigma", "nan_in_q"],
)
def test_edited_entry_is_rejected_with_a_warning_recomputed_and_rewritten(tmp_path, tamper):
    cache = SVDCache(tmp_path / "svd")
    w = _weight(12, 7)
    first = cache.get(w)
    path, tensors, meta = _entry(cache, first)
    s, q = tensors["S"].clone(), tensors["Q"].clone()
    if tamper == "replace_q_column":  # the checks of the first column and of S alone cannot see this
        q[:, 3] = q[:, 4]
    elif tamper == "change_sigma":
        s[2] *= 1.5
    else:
        q[1, 5] = float("nan")
    _rewrite(path, {"S": s, "Q": q}, meta)  # metadata (weight hash, digest) kept as written
    with pytest.warns(SVDCacheWarning, match=path.name):
        again = cache.get(w)
    assert cache.stale == 1 and cache.misses == 2 and cache.hits == 0
    assert torch.equal(again.S, first.S) and torch.equal(again.Q, first.Q)
    # rewritten: the next read is a clean hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = cache.get(w)
    assert cache.hits == 1 and torch.equal(third.Q, first.Q)
    _, rewritten, _ = _entry(cache, first)
    assert torch.equal(rewritten["Q"], first.Q)


def test_entry_metadata_holds_digest_of_its_tensors_and_of_its_weight(tmp_path):
    cache = SVDCache(tmp_path)
    w = _weight(9, 14)
    f = cache.get(w)
    _, tensors, meta = _entry(cache, f)
    assert meta["format"] == CACHE_FORMAT_VERSION and meta["weight_hash"] == svd_cache.weight_hash(w)
    assert meta["digest"] == factors_digest(tensors["S"], tensors["Q"], "left")
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize("forgery", ["scaled_sigma", "nan_in_q"])
def test_self_consistent_but_wrong_entry_is_caught_by_the_probe(tmp_path, forgery):
    """An entry with a recomputed digest (what someone with write access could produce) must still fit its weight."""
    cache = SVDCache(tmp_path)
    w = _weight(12, 7)
    f = cache.get(w)
    path, tensors, meta = _entry(cache, f)
    s, q = tensors["S"].clone(), tensors["Q"].clone()
    if forgery == "scaled_sigma":
        s *= 1.5
    else:
        q[4, 6] = float("nan")
    _rewrite(path, {"S": s, "Q": q}, {**meta, "digest": factors_digest(s, q, f.side)})
    with pytest.warns(SVDCacheWarning, match="does not match its weight"):
        again = cache.get(w)
    assert torch.equal(again.S, f.S) and cache.stale == 1


def test_every_column_swap_of_q_is_caught_by_the_probe(tmp_path, tiny_llama):
    """Issue #27 §2/§3: Q with two columns swapped and a recomputed digest passed the one-vector probe in 78 of the 496
    swaps of a tiny model's weight (logits moved by 4.43). The probe now catches a swap whenever the two σ² differ by
    more than 1e-6 of Σσ², which holds for every pair here."""
    import itertools

    model, _ = tiny_llama
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    cache = SVDCache(tmp_path)
    f = cache.get(w)
    assert SVDCache._probe_ok(w, f.S, f.Q, f.side)
    accepted = []
    for i, j in itertools.combinations(range(len(f.S)), 2):
        q = f.Q.clone()
        q[:, [i, j]] = q[:, [j, i]]
        if SVDCache._probe_ok(w, f.S, q, f.side):
            accepted.append((i, j))
    assert len(f.S) == 32 and accepted == []
    # end to end: the swapped entry is rejected, recomputed and rewritten
    path, tensors, meta = _entry(cache, f)
    q = tensors["Q"].clone()
    q[:, [3, 20]] = q[:, [20, 3]]
    _rewrite(path, {"S": tensors["S"], "Q": q}, {**meta, "digest": factors_digest(tensors["S"], q, f.side)})
    with pytest.warns(SVDCacheWarning, match="does not match its weight"):
        again = cache.get(w)
    assert torch.equal(again.Q, f.Q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probe_accepts_honest_entries(dtype):
    """No false alarm: honest factors of full-rank, rank-deficient and zero weights, in every dtype, pass."""
    low_rank = _weight(40, 5, seed=1) @ _weight(5, 30, seed=2)
    for w in (_weight(64, 48, dtype=dtype), low_rank.to(dtype), torch.zeros(6, 9, dtype=dtype)):
        f = svd_cache.compute_factors(w)
        assert SVDCache._probe_ok(w, f.S, f.Q, f.side), (tuple(w.shape), dtype)


def test_entry_of_older_format_is_recomputed_quietly(tmp_path):
    cache = SVDCache(tmp_path)
    w = _weight()
    f = cache.get(w)
    path, tensors, meta = _entry(cache, f)
    _rewrite(path, tensors, {k: v for k, v in meta.items() if k != "digest"} | {"format": "1"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get(w)
    assert cache.stale == 1 and cache.misses == 2
    assert _entry(cache, f)[2]["format"] == CACHE_FORMAT_VERSION


# ----------------------------------------------------------------------------- non-finite weights


def test_non_finite_weight_is_refused_with_its_name(tmp_path):
    w = _weight(10, 6)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj'.*NaN or inf"):
        compute_factors(w, name="model.layers.0.mlp.up_proj")
    w[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"'blk\.fc'"):
        SVDCache(tmp_path).get_many([("blk.fc", w)], progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        linalg.thin_svd(w)
    assert not any(tmp_path.iterdir())


def test_get_peft_model_names_the_non_finite_module():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj"):
        get_peft_model(model, SVFConfig(target_modules=MLP, use_svd_cache=False))


# ----------------------------------------------------------------------------- location: only the user decides


def test_cache_dir_is_never_saved_and_a_saved_one_is_ignored_on_load(tmp_path, monkeypatch):
    tok = build_tiny_tokenizer()
    runtime_dir, evil_dir = tmp_path / "runtime", tmp_path / "evil"
    config = SVFConfig(target_modules=MLP, svd_cache_dir=str(runtime_dir))
    assert "svd_cache_dir" not in config.to_dict()
    model = get_peft_model(build_tiny_llama(tok), config)
    assert len(list(runtime_dir.glob("*.safetensors"))) == 6  # the explicit runtime setting is honoured
    model.save_pretrained(tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(cfg_file.read_text())
    assert "svd_cache_dir" not in saved
    # an adapter (e.g. downloaded from the Hub) that names a cache directory must not decide where we read/write
    cfg_file.write_text(json.dumps({**saved, "svd_cache_dir": str(evil_dir)}))
    with pytest.warns(UserWarning, match="svd_cache_dir"):
        loaded = PeftModel.from_pretrained(build_tiny_llama(tok), tmp_path / "adapter")
    assert loaded.peft_config["default"].svd_cache_dir is None
    assert not evil_dir.exists()
    assert len(list(svd_cache_dir().glob("*.safetensors"))) == 6  # the user's cache ($PEFT_SPECTRAL_CACHE/svd)
    # every other way of reading the file drops it too
    with pytest.warns(UserWarning, match="svd_cache_dir"):
        assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).svd_cache_dir is None
    with pytest.warns(UserWarning, match="svd_cache_dir"):
        assert validate_adapter_dir(tmp_path / "adapter")[1].svd_cache_dir is None
    assert not evil_dir.exists()


def test_cache_dir_resolution_order(tmp_path, monkeypatch):
    assert svd_cache_dir() == tmp_path / "cache" / "svd"
    monkeypatch.setenv("PEFT_SPECTRAL_SVD_CACHE", str(tmp_path / "only-svd"))
    assert svd_cache_dir() == tmp_path / "only-svd"
    assert svd_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert SVDCache().cache_dir == tmp_path / "only-svd"
    assert not (tmp_path / "only-svd").exists()  # resolving a location creates nothing


# ----------------------------------------------------------------------------- unwritable caches


def _blocked_cache(tmp_path, monkeypatch):
    """A `$PEFT_SPECTRAL_CACHE` under a regular file: nothing can be created there (also when running as root)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("PEFT_SPECTRAL_CACHE", str(blocker / "cache"))
    return blocker


def test_unwritable_cache_degrades_to_memory_with_one_warning(tmp_path, monkeypatch):
    _blocked_cache(tmp_path, monkeypatch)
    tok = build_tiny_tokenizer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
        get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    ours = [w for w in caught if issubclass(w.category, SVDCacheWarning)]
    assert len(ours) == 1 and "cannot be written" in str(ours[0].message)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(layer.svf_S, compute_factors(layer.get_base_layer().weight).S)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_degrades_to_memory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cache = SVDCache(ro)
        with pytest.warns(SVDCacheWarning, match="cannot be written"):
            f = cache.get(_weight())
        assert f.S.shape == (7,) and not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_disabled_cache_never_touches_the_disk(tmp_path, monkeypatch):
    _blocked_cache(tmp_path, monkeypatch)

    def no_disk(*args, **kwargs):
        raise AssertionError("use_svd_cache=False must not read or write the disk")

    monkeypatch.setattr(svd_cache, "safe_open", no_disk)
    monkeypatch.setattr(svd_cache, "save_file", no_disk)
    monkeypatch.setattr(svd_cache.tempfile, "mkstemp", no_disk)
    tok = build_tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SVDCacheWarning)
        model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP, use_svd_cache=False))
    assert len(model.base_model.svf_layers()) == 6


# ----------------------------------------------------------------------------- one SVD, dtypes and devices


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (9, 9)])
def test_thin_svd_is_the_cached_factors_plus_the_other_side(shape):
    w = _weight(*shape, seed=3)
    u, s, v = linalg.thin_svd(w)
    f = compute_factors(w)
    u2, s2, v2 = svd_from_factors(w, f)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(v, v2)
    assert torch.equal(v if f.side == "right" else u, f.Q)
    u_ref, s_ref, _ = _svd_ref(w)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((u * s) @ v.T, w, atol=1e-5, rtol=1e-5)
    eye = torch.eye(len(s))
    torch.testing.assert_close(u.T @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, eye, atol=1e-5, rtol=0)
    # the singular subspaces agree with LAPACK's (up to sign): |<u_i, u_ref_i>| = 1
    torch.testing.assert_close(
        (u.double() * u_ref).sum(0).abs(), torch.ones(len(s), dtype=torch.float64), atol=1e-4, rtol=0
    )
    # a truncation keeps the leading triplets
    uk, sk, vk = linalg.thin_svd(w, 3)
    assert uk.shape == (shape[0], 3) and torch.equal(sk, s[:3]) and torch.equal(vk, v[:, :3])


def test_thin_svd_goes_through_compute_factors(monkeypatch):
    calls = []
    real = svd_cache.compute_factors
    monkeypatch.setattr(svd_cache, "compute_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    linalg.thin_svd(_weight())
    assert calls == [1]


def test_rank_deficient_weight_still_has_orthonormal_singular_vectors():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 3, generator=g) @ torch.randn(3, 18, generator=g)  # rank 3 of 18
    u, s, v = linalg.thin_svd(w)
    torch.testing.assert_close(u.T @ u, torch.eye(18), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(18), atol=1e-5, rtol=0)
    torch.testing.assert_close((u * s) @ v.T, w, atol=1e-5, rtol=1e-5)
    assert s[3:].max() < 1e-5 * s[0]
    zero_u, zero_s, _ = linalg.thin_svd(torch.zeros(6, 4))
    assert torch.equal(zero_s, torch.zeros(4))
    torch.testing.assert_close(zero_u.T @ zero_u, torch.eye(4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_get_float32_factors_of_their_exact_values(tmp_path, dtype):
    w = _weight(16, 10, seed=4, dtype=dtype)
    cache = SVDCache(tmp_path)
    f = cache.get(w)
    assert f.S.dtype == f.Q.dtype == torch.float32 and f.S.device == w.device
    _, s_ref, v_ref = _svd_ref(w.double())  # the values the weight really holds, not the float32 original
    torch.testing.assert_close(f.S.double(), s_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        (f.Q.double() * v_ref).sum(0).abs(), torch.ones(10, dtype=torch.float64), atol=1e-4, rtol=0
    )
    again = cache.get(w)
    assert cache.hits == 1 and torch.equal(again.Q, f.Q)
    assert cache.get(w.float()).weight_hash != f.weight_hash  # another dtype is another entry
    assert cache.misses == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_are_computed_and_returned_on_the_weights_device(tmp_path, dtype):
    w_cpu = _weight(64, 40, seed=5, dtype=dtype)
    w = w_cpu.cuda()
    cache = SVDCache(tmp_path)
    f = cache.get(w)
    assert f.S.device == w.device and f.Q.device == w.device
    _, tensors, _ = _entry(cache, f)  # stored device-independently, same key as the CPU copy of the weight
    assert tensors["Q"].device.type == "cpu" and f.weight_hash == svd_cache.weight_hash(w_cpu)
    cpu = SVDCache(tmp_path).get(w_cpu)
    assert cpu.Q.device.type == "cpu"
    torch.testing.assert_close(cpu.Q, f.Q.cpu())
    hit = SVDCache(tmp_path)
    assert hit.get(w).Q.device == w.device and hit.hits == 1
    u, s, v = linalg.thin_svd(w)
    assert u.device == w.device
    torch.testing.assert_close(
        ((u * s) @ v.T).cpu(), w_cpu.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-3
    )
