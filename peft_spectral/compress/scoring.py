"""C2I's scoring phase: singular-value gradients from one forward/backward pass, and the ranking they give.

For each candidate matrix `W = U diag(σ) Vᵀ` the singular-value gradients are `g_i = ∂L/∂σ_i = u_iᵀ (∂L/∂W) v_i`
(no reparametrisation needed). Truncating to rank `k` sets `σ_i → 0` for `i > k`, so to first order
`ΔL_k ≈ −Σ_{i>k} σ_i g_i` (`score="first_order"`, the default); the seed's rule, reduce the matrices whose dropped
singular values have large positive loss gradients, is `−Σ_{i>k} g_i` (`score="raw"`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..data import Example
from ..subspace import rank_for
from .candidates import LASER_RHOS, Intervention
from .distributed import launched_state, sum_across_processes
from .results import LossFn, ScoredCandidate
from .weights import compute_svds


__all__ = [
    "C2IScores",
    "GradientPass",
    "c2i_scores",
    "gradient_pass",
    "score_candidates",
    "singular_value_gradients",
    "target_nll",
]


def target_nll(model: nn.Module, tokenizer, examples: Sequence[Example]) -> torch.Tensor:
    """[`peft_spectral.evaluation.answer_nll`] with logits computed only where a target token is predicted.

    The mean NLL of the gold target tokens given the prompt, over all target tokens of all examples, differentiable.
    The model is asked for the logits of the target positions only (transformers' `logits_to_keep` with a boolean
    mask), so the vocabulary projection and its backward skip every prompt position; models without that argument
    get `answer_nll`.

    Args:
        model (`nn.Module`): A causal LM.
        tokenizer: Its tokenizer.
        examples (`Sequence[Example]`): One batch.

    Returns:
        `torch.Tensor`: A scalar on the model's device.
    """
    from ..evaluation import answer_nll
    from ..model_utils import model_device, pad_token_id
    from ..prompting import encode_answer, encode_prompt

    if not examples:
        raise ValueError("target_nll needs at least one example")
    pairs = [(encode_prompt(tokenizer, ex), encode_answer(tokenizer, ex.target)) for ex in examples]
    if any(not context for context, _ in pairs):
        return answer_nll(model, tokenizer, examples)  # its error names the problem
    width = max(len(c) + len(a) for c, a in pairs)
    input_ids = torch.full((len(pairs), width), pad_token_id(tokenizer, model), dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    keep = torch.zeros((len(pairs), width), dtype=torch.bool)
    targets: list[int] = []
    for row, (context, answer) in enumerate(pairs):
        ids = context + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        keep[row, len(context) - 1 : len(ids) - 1] = True  # position t predicts token t + 1
        targets.extend(answer)
    device = model_device(model)
    try:
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=keep.to(device)
        ).logits
    except TypeError:  # a forward without logits_to_keep
        return answer_nll(model, tokenizer, examples)
    if logits.dim() != 2 or logits.shape[0] != len(targets):  # logits_to_keep without boolean masks
        return answer_nll(model, tokenizer, examples)
    target_ids = torch.tensor(targets, device=logits.device)
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, target_ids[:, None]).mean()


def _default_loss(tokenizer) -> LossFn:
    def loss(model, batch):
        return target_nll(model, tokenizer, batch)

    return loss


@dataclass
class GradientPass:
    """The outcome of [`gradient_pass`].

    Args:
        grads (`dict[str, torch.Tensor]`): `g` per module (float32, length `min(out, in)`).
        loss (`float`): The value of `L`.
        timings (`dict[str, float]`): Seconds spent in `forward_s`, `backward_s` (autograd only) and
            `projection_s` (turning `∂L/∂W` into `g`), the number of `batches` and of `processes`, and with
            several processes `reduce_s` (summing `g` across them); per-process figures.
    """

    grads: dict
    loss: float
    timings: dict = field(default_factory=dict)


def _batches(examples: Sequence[Example], tokenizer, batch_size: int, by_length: bool) -> list[list[int]]:
    """Index batches; with `by_length`, examples of similar token length share a batch (less padding)."""
    order = list(range(len(examples)))
    if by_length:
        from ..prompting import encode_answer, encode_prompt

        lengths = [len(encode_prompt(tokenizer, ex)) + len(encode_answer(tokenizer, ex.target)) for ex in examples]
        order.sort(key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class _Projector:
    """Turns a weight's `∂L/∂W` into `g = diag(Uᵀ (∂L/∂W) V)` (float64 sums), timing itself."""

    def __init__(self, svds: dict[str, tuple], modules: Sequence[str], model: nn.Module):
        self.grads = {name: torch.zeros(len(svds[name][1]), dtype=torch.float64) for name in modules}
        self.svds, self.model, self.seconds = svds, model, 0.0
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, grad: torch.Tensor) -> None:
        t = time.perf_counter()
        if name not in self._factors:  # the factors move to the gradient's device once, not per batch
            u, _, v = self.svds[name]
            self._factors[name] = (u.to(grad.device), v.to(grad.device))
        u, v = self._factors[name]
        if type(self.model.get_submodule(name)).__name__ == "Conv1D":
            grad = grad.T
        grad = grad.detach().to(u.dtype)
        self.grads[name] += ((grad @ v) * u).sum(dim=0).double().cpu()
        self.seconds += time.perf_counter() - t


@contextlib.contextmanager
def _only_these_require_grad(model: nn.Module, params: dict, projector: Optional[_Projector]) -> Iterator[None]:
    """Eval mode, gradients for `params` only (projected by hooks when `projector` is given); all restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training, handles = model.training, []

    def make_hook(name: str):
        def hook(param: torch.Tensor) -> None:
            projector.add(name, param.grad)
            param.grad = None

        return hook

    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in params.items():
            p.requires_grad_(True)
            p.grad = None
            if projector is not None:
                handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def gradient_pass(
    model: nn.Module,
    examples: Sequence[Example],
    modules: Sequence[str],
    *,
    svds: dict[str, tuple],
    tokenizer=None,
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 8,
    project_each_batch: bool = False,
    progress: bool = False,
) -> GradientPass:
    """`g_i = u_iᵀ (∂L/∂W) v_i` for every named module, from one forward/backward pass over `examples`, timed.

    The loss `L` is the mean NLL of the gold targets over all target tokens of all examples (the default, via
    [`target_nll`]: `answer_nll` with logits only at the target positions; batches weighted by their target-token counts so that neither batching nor
    the batch order changes `L`; examples of similar length are batched together), or `loss_fn(model, batch)`
    averaged over batches weighted by batch size. Only the candidate weights require gradients, so autograd computes
    no `∂L/∂W` for any other parameter.

    Under `accelerate launch` with several processes (see [`~peft_spectral.compress.distributed`]) each process
    takes a contiguous share of `examples`, weighs its batches by their share of the *global* token (or example)
    count, and the per-process `g` and `L` are summed (float64), so every process gets the one-process result up
    to rounding.

    Args:
        model (`nn.Module`): The model (its parameters' `requires_grad` flags are restored afterwards; no step).
        examples (`Sequence[Example]`): Calibration examples.
        modules (`Sequence[str]`): Names of the modules to score.
        svds (`dict[str, tuple]`): `(U, S, V)` per module (see [`compute_svds`]).
        tokenizer: Needed for the default loss.
        loss_fn (`LossFn`, *optional*): `loss_fn(model, batch) -> scalar` (mean over the batch).
        batch_size (`int`, defaults to 8): Examples per forward/backward.
        project_each_batch (`bool`, defaults to `False`): `False` lets the gradients of the candidate weights add up
            over all batches and projects each once at the end (memory: one gradient per candidate weight). `True`
            projects and frees each weight's gradient after every batch (memory: the SVD factors plus one batch's
            autograd state, at the cost of one projection per batch). Both give the same `g` up to rounding.
        progress (`bool`, defaults to `False`): Show a progress bar.

    Returns:
        [`GradientPass`]
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no calibration examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    default_loss = loss_fn is None
    if default_loss:
        if tokenizer is None:
            raise ValueError("pass a tokenizer (for the default answer-NLL loss) or a loss_fn")
        loss_fn = _default_loss(tokenizer)
        counts = [len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples]
    else:
        counts = [1] * len(examples)
    total = float(sum(counts))  # over all examples: every process weighs its share by the global count
    state = launched_state()
    if state is not None:  # this process's share of the examples; the shares' g and L are summed below
        with state.split_between_processes(list(range(len(examples)))) as mine:
            examples, counts = [examples[i] for i in mine], [counts[i] for i in mine]
    projector = _Projector(svds, modules, model)
    params = {name: model.get_submodule(name).weight for name in modules}
    batches = _batches(examples, tokenizer, batch_size, by_length=default_loss)
    timings = {"forward_s": 0.0, "backward_s": 0.0, "projection_s": 0.0, "batches": len(batches)}
    timings["processes"] = 1 if state is None else state.num_processes
    loss_value = 0.0
    with _only_these_require_grad(model, params, projector if project_each_batch else None), torch.enable_grad():
        for idx in tqdm(batches, desc="gradients", disable=not progress):
            t = time.perf_counter()
            loss = loss_fn(model, [examples[i] for i in idx]) * (sum(counts[i] for i in idx) / total)
            t_fwd = time.perf_counter()
            hook_before = projector.seconds
            loss.backward()
            timings["forward_s"] += t_fwd - t
            timings["backward_s"] += time.perf_counter() - t_fwd - (projector.seconds - hook_before)
            loss_value += float(loss.detach())
        if not project_each_batch:
            for name, p in params.items():
                if p.grad is not None:
                    projector.add(name, p.grad)
                p.grad = None
    timings["projection_s"] = projector.seconds
    grads = projector.grads
    if state is not None:
        t = time.perf_counter()
        names = list(grads)
        flat = sum_across_processes(torch.cat([grads[n] for n in names] + [torch.tensor([loss_value])]), state)
        sizes = [len(grads[n]) for n in names]
        grads = dict(zip(names, flat[:-1].split(sizes)))
        loss_value = float(flat[-1])
        timings["reduce_s"] = time.perf_counter() - t
    return GradientPass({k: g.float() for k, g in grads.items()}, loss_value, timings)


def singular_value_gradients(
    model: nn.Module,
    examples: Sequence[Example],
    modules: Sequence[str],
    *,
    svds: dict[str, tuple],
    tokenizer=None,
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """[`gradient_pass`] returning only `(grads, loss)`: `g` per module and the value of `L`.

    Args:
        model (`nn.Module`): The model.
        examples (`Sequence[Example]`): Calibration examples.
        modules (`Sequence[str]`): Names of the modules to score.
        svds (`dict[str, tuple]`): `(U, S, V)` per module.
        tokenizer: Needed for the default loss.
        loss_fn (`LossFn`, *optional*): Overrides the default answer-NLL loss.
        batch_size (`int`, defaults to 8): Examples per forward/backward.
        progress (`bool`, defaults to `False`): Show a progress bar.
    """
    out = gradient_pass(
        model,
        examples,
        modules,
        svds=svds,
        tokenizer=tokenizer,
        loss_fn=loss_fn,
        batch_size=batch_size,
        progress=progress,
    )
    return out.grads, out.loss


def score_candidates(
    grads: dict[str, torch.Tensor],
    svds: dict[str, tuple],
    rhos: Sequence[float] = LASER_RHOS,
    *,
    score: str = "first_order",
    clusters: int = 1,
) -> list[ScoredCandidate]:
    """Rank every `(module, rho)` by its predicted loss change, most negative first.

    Args:
        grads (`dict[str, torch.Tensor]`): `g` per module.
        svds (`dict[str, tuple]`): `(U, S, V)` per module.
        rhos (`Sequence[float]`, defaults to `LASER_RHOS`): Rank fractions.
        score (`str`, defaults to `"first_order"`): `"first_order"`: `ΔL_k ≈ −Σ_{i>k} σ_i g_i`; `"raw"`:
            `−Σ_{i>k} g_i` (the seed's "large negative gradient of the task score" rule).
        clusters (`int`, defaults to 1): Cluster count recorded in the returned interventions.
    """
    if score not in ("first_order", "raw"):
        raise ValueError(f"score must be 'first_order' or 'raw', got {score!r}")
    out = []
    for name, g in grads.items():
        s = svds[name][1].to(g.dtype)
        for rho in rhos:
            k = rank_for(rho, len(s))
            dropped = g[k:] * s[k:] if score == "first_order" else g[k:]
            out.append(ScoredCandidate(Intervention(name, float(rho), clusters), float(-dropped.sum())))
    out.sort(key=lambda c: c.score)
    return out


@dataclass
class C2IScores:
    """The product of C2I's gradient pass, reusable by several searches (e.g. both paper modes).

    Args:
        grads (`dict[str, torch.Tensor]`): `g` per module.
        svds (`dict[str, tuple]`): `(U, S, V)` per module.
        loss (`float`): The calibration loss `L`.
        n_calibration (`int`): Number of calibration examples.
        timings (`dict`): `svd_s`, `gradient_s` (the whole pass) and its phases `forward_s`, `backward_s`,
            `projection_s`, `batches`.
    """

    grads: dict
    svds: dict
    loss: float
    n_calibration: int
    timings: dict

    @property
    def seconds(self) -> float:
        """SVD plus gradient-pass seconds."""
        return float(self.timings.get("svd_s", 0.0) + self.timings.get("gradient_s", 0.0))


def c2i_scores(
    model: nn.Module,
    calibration: Sequence[Example],
    modules: Sequence[str],
    *,
    tokenizer=None,
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 8,
    svds: Optional[dict[str, tuple]] = None,
    svd_cache=None,
    project_each_batch: bool = False,
    progress: bool = False,
) -> C2IScores:
    """C2I's scoring phase: SVDs of the candidate matrices and one gradient pass over `calibration`.

    Args:
        model (`nn.Module`): The model (left unchanged).
        calibration (`Sequence[Example]`): Examples of the gradient pass (the paper uses 100).
        modules (`Sequence[str]`): Candidate module names.
        tokenizer: Needed for the default loss.
        loss_fn (`LossFn`, *optional*): Overrides the default answer-NLL loss.
        batch_size (`int`, defaults to 8): Examples per forward/backward.
        svds (`dict[str, tuple]`, *optional*): Precomputed SVDs (the missing ones are computed).
        svd_cache ([`~peft_spectral.svd_cache.SVDCache`] or `bool`, *optional*): Passed to [`compute_svds`].
        project_each_batch (`bool`, defaults to `False`): See [`gradient_pass`].
        progress (`bool`, defaults to `False`): Show progress bars.
    """
    t = time.perf_counter()
    svds = dict(svds or {})
    missing = [m for m in modules if m not in svds]
    svds.update(compute_svds(model, missing, cache=svd_cache, progress=progress))
    t_svd = time.perf_counter() - t
    t = time.perf_counter()
    out = gradient_pass(
        model,
        calibration,
        modules,
        svds=svds,
        tokenizer=tokenizer,
        loss_fn=loss_fn,
        batch_size=batch_size,
        project_each_batch=project_each_batch,
        progress=progress,
    )
    timings = {"svd_s": t_svd, "gradient_s": time.perf_counter() - t, **out.timings}
    return C2IScores(out.grads, svds, out.loss, len(calibration), timings)
