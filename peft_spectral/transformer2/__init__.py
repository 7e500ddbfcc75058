"""Transformer² inference: compose saved SVF experts by prompt dispatch, a classifier expert or few-shot CEM.

* [`ExpertLibrary`]: a base model plus K saved SVF adapters, loaded once onto one `PeftModel` (shared `U`/`σ`/`V`);
  [`find_experts`] lists the experts saved in a library directory (`<root>/<name>/expert.json`).
* Pass 1 ([`PromptDispatcher`], [`FixedDispatcher`]): choose an expert (or the base model) per prompt.
* Pass 2 ([`two_pass_generate`], [`two_pass_evaluate`]): answer, prompts grouped by chosen expert, timed.
* [`build_classifier_examples`] / [`train_classifier_expert`]: the classification expert.
* [`FewShotMixer`] / [`cross_entropy_method`]: few-shot mixing weights α by CEM, saved as an SVF adapter.
* [`calibrate_threshold`] / [`dispatch_report`]: the fitted "no expert fits" threshold of pass 1 and its accuracy.

Scoring answer options (log-likelihoods) lives in `peft_spectral.option_scoring`. See `docs/transformer2.md`.
"""

from .calibration import calibrate_threshold, dispatch_report, fit_threshold, labelled_prompts
from .cem import CEMConfig, CEMResult, cross_entropy_method, regularized_cross_entropy_method
from .classifier import base_model_copy, build_classifier_examples, train_classifier_expert
from .dispatch import (
    DispatchPrompt,
    FixedDispatcher,
    PromptDispatcher,
    category_confidence,
    decide_categories,
    parse_category,
)
from .library import (
    OTHERS,
    Expert,
    ExpertLibrary,
    ExpertLibraryError,
    SavedExpert,
    check_compatible,
    expert_name,
    find_experts,
)
from .mixer import FewShotMixer, push_mixture_to_hub
from .shots import load_shots
from .two_pass import TwoPassResult, group_by_choice, two_pass_evaluate, two_pass_generate


__all__ = [
    "OTHERS",
    "CEMConfig",
    "CEMResult",
    "DispatchPrompt",
    "Expert",
    "ExpertLibrary",
    "ExpertLibraryError",
    "FewShotMixer",
    "FixedDispatcher",
    "PromptDispatcher",
    "SavedExpert",
    "TwoPassResult",
    "base_model_copy",
    "build_classifier_examples",
    "calibrate_threshold",
    "category_confidence",
    "check_compatible",
    "cross_entropy_method",
    "decide_categories",
    "dispatch_report",
    "expert_name",
    "find_experts",
    "fit_threshold",
    "group_by_choice",
    "labelled_prompts",
    "load_shots",
    "parse_category",
    "push_mixture_to_hub",
    "regularized_cross_entropy_method",
    "train_classifier_expert",
    "two_pass_evaluate",
    "two_pass_generate",
]
