"""Shared test fixtures: tiny random models with an offline byte-level tokenizer, and a private package cache.

`tiny_llama` and `tiny_gpt2` each return a `(model, tokenizer)` pair built in memory, with no network access;
`package_cache` points `$PEFT_SPECTRAL_CACHE` at a temporary directory and `fake_bigbench` puts a small fake BigBench
archive in it. The builders behind them are in `tests/testing_utils.py`.
"""

from __future__ import annotations

import pytest
from testing_utils import build_tiny_gpt2, build_tiny_llama, build_tiny_tokenizer, make_fake_bigbench


@pytest.fixture
def tiny_tokenizer():
    """The offline byte-level tokenizer with a ChatML chat template."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    """`(model, tokenizer)`: a fresh random tiny `LlamaForCausalLM` (eval mode, float32) and its tokenizer."""
    tokenizer = build_tiny_tokenizer()
    return build_tiny_llama(tokenizer), tokenizer


@pytest.fixture
def tiny_gpt2():
    """`(model, tokenizer)`: a fresh random tiny `GPT2LMHeadModel` (eval mode, float32) and its tokenizer."""
    tokenizer = build_tiny_tokenizer()
    return build_tiny_gpt2(tokenizer), tokenizer


@pytest.fixture
def package_cache(tmp_path, monkeypatch):
    """A fresh, empty `$PEFT_SPECTRAL_CACHE` (the directory, not yet created)."""
    monkeypatch.setenv("PEFT_SPECTRAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_bigbench(package_cache, monkeypatch):
    """`$PEFT_SPECTRAL_BIGBENCH` pointing at a small fake BigBench archive (see `make_fake_bigbench`); the cache is a
    fresh `package_cache`."""
    from peft_spectral.data.sources.bigbench import BIGBENCH_ARCHIVE, BIGBENCH_ENV

    archive = make_fake_bigbench(package_cache.parent / "bigbench_copy" / BIGBENCH_ARCHIVE)
    monkeypatch.setenv(BIGBENCH_ENV, str(archive))
    return package_cache


@pytest.fixture(autouse=True, scope="session")
def _private_svd_cache(tmp_path_factory):
    """Keep the tests' SVD factors out of the user's cache: an adapter file no longer decides the cache location, so
    without this every test that builds an SVF adapter would write to `~/.cache/peft_spectral/svd`."""
    import os

    previous = os.environ.get("PEFT_SPECTRAL_SVD_CACHE")
    os.environ["PEFT_SPECTRAL_SVD_CACHE"] = str(tmp_path_factory.mktemp("svd_cache"))
    yield
    if previous is None:
        os.environ.pop("PEFT_SPECTRAL_SVD_CACHE", None)
    else:
        os.environ["PEFT_SPECTRAL_SVD_CACHE"] = previous
