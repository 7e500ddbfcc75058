"""SpectralCompress on the embedded SmolLM2-135M and a real BigBench task (`pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch


pytestmark = pytest.mark.slow


def test_c2i_on_embedded_model_round_trips_as_adapter(tmp_path):
    from peft import PeftModel

    from peft_spectral import compress as C
    from peft_spectral.assets import load_default_model
    from peft_spectral.evaluation import evaluate
    from peft_spectral.tasks import load_task

    model, tok = load_default_model()
    task = load_task("sports_understanding")
    modules = C.find_target_modules(model, ["up_proj", "down_proj"], layers=[29])
    scores = C.c2i_scores(model, task.train[:8], modules, tokenizer=tok, batch_size=8)
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in scores.grads.values())
    config = C.C2ISearchConfig(rhos=[0.01], top_k=2, kind=task.kind, n_eval=6)
    result = C.c2i_search(model, task.train[:8], task.validation, modules, config, tokenizer=tok, scores=scores)
    assert result.evaluations == 3 and len(result.candidates) == 2
    # the best-ranked candidate as an adapter: factored forward == in-place truncation, save → load bit-exact
    iv = result.candidates[0].intervention
    with C.apply_interventions(model, [iv]):
        expected = evaluate(model, tok, task.validation[:6], kind=task.kind)
    adapted = C.apply_result(model, C.SearchResult("x", [iv], result.base, result.base, 0, 0, 0.0))
    got = evaluate(adapted, tok, task.validation[:6], kind=task.kind)
    assert got.correct == expected.correct and got.mean_loglik == pytest.approx(expected.mean_loglik, abs=1e-4)
    adapted.save_pretrained(tmp_path)
    base = adapted.unload()
    loaded = PeftModel.from_pretrained(base, tmp_path)
    again = evaluate(loaded, tok, task.validation[:6], kind=task.kind)
    assert again.mean_loglik == got.mean_loglik
    report = loaded.base_model.compression_report()
    (entry,) = report.values()
    assert entry["factor_bytes"] < entry["dense_bytes"] / 10
