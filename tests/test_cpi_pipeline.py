"""CPI-FT with TRL: frozen cores stay bit-identical under AdamW + weight decay; the pipeline runs, resumes, checks."""

from __future__ import annotations

import functools
import json
import operator
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from testing_utils import build_tiny_llama, build_tiny_tokenizer
from transformers import TrainerCallback

from peft_spectral.cpi import (
    CPIConfig,
    CPIPipeline,
    FreezeMaskCallback,
    base_model_fingerprint,
    build_sft_dataset,
    fuse_deltas,
)
from peft_spectral.state import StateFileError, write_json_atomic
from peft_spectral.tasks import Example, Task
from peft_spectral.tuners.core_isolation import CoreIsolationConfig


MLP = ["gate_proj", "up_proj", "down_proj"]


def _task(name, fn, n=12):
    ex = [Example(prompt=f"{name}: {i}", target=fn(i)) for i in range(n)]
    return Task(name=name, kind="generation", train=ex, validation=[], test=ex[:3])


TASKS = [
    _task("inc", lambda i: str(i + 1)),
    _task("rev", lambda i: str(i)[::-1] + "!"),
    _task("abc", lambda i: "ab" * (i % 3 + 1)),
]


def _sft(model, tok, callbacks, tmp_path, steps=4, wd=0.1):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=wd,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_length=64,
        activation_checkpointing=False,
        bf16=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    ds = build_sft_dataset(tok, TASKS[0].train, max_length=64)
    SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=callbacks).train()


def _adapter_with_mask(seed=0):
    tok = build_tiny_tokenizer()
    model = get_peft_model(build_tiny_llama(tok), CoreIsolationConfig(target_modules=MLP))
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for key, layer in model.base_model.core_isolation_layers().items():
        d = layer.core_isolation_delta["default"]
        d.data.copy_(torch.randn(d.shape, generator=g) * 0.05)  # non-zero: weight decay would move them
        masks[key] = torch.rand(d.shape, generator=g) < 0.2
    model.base_model.set_core_masks(masks)
    return model, tok, masks


def test_frozen_bit_identical_after_trl_sft_adamw_weight_decay(tmp_path):
    model, tok, masks = _adapter_with_mask()
    layers = model.base_model.core_isolation_layers()
    before = {k: layers[k].core_isolation_delta["default"].detach().clone() for k in masks}
    cb = FreezeMaskCallback((layers[k].core_isolation_delta["default"], m) for k, m in masks.items())
    _sft(model, tok, [cb], tmp_path)
    for k, m in masks.items():
        after = layers[k].core_isolation_delta["default"].detach()
        assert torch.equal(after[m], before[k][m]), k  # frozen: bit-identical
        assert not torch.equal(after[~m], before[k][~m]), k  # control: the rest trained


def test_without_callback_weight_decay_moves_frozen_entries(tmp_path):
    """Control: blocking gradients alone is not enough under AdamW weight decay (the callback is needed)."""
    model, tok, masks = _adapter_with_mask()
    layers = model.base_model.core_isolation_layers()
    before = {k: layers[k].core_isolation_delta["default"].detach().clone() for k in masks}
    _sft(model, tok, [], tmp_path)
    changed = [
        k for k, m in masks.items() if not torch.equal(layers[k].core_isolation_delta["default"][m], before[k][m])
    ]
    assert changed


def test_frozen_full_params_bit_identical(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    g = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    masks = {k: torch.rand(p.shape, generator=g) < 0.1 for k, p in params.items()}
    hooks = [params[k].register_hook(lambda gr, m=m: gr.masked_fill(m, 0)) for k, m in masks.items()]
    before = {k: p.detach().clone() for k, p in params.items()}
    _sft(model, tok, [FreezeMaskCallback((params[k], m) for k, m in masks.items())], tmp_path)
    for h in hooks:
        h.remove()
    for k, m in masks.items():
        assert torch.equal(params[k].detach()[m], before[k][m]), k
    assert not torch.equal(params["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


def _config(core_fraction=0.05, similarity_threshold=0.1, **kw):
    adapter = CoreIsolationConfig(
        target_modules=MLP, core_fraction=core_fraction, similarity_threshold=similarity_threshold
    )
    base = {
        "probe_steps": 2,
        "stage_steps": 2,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "max_length": 48,
    }
    base.update(kw)
    return CPIConfig(adapter=adapter, **base)


def test_pipeline_end_to_end_resume_and_reload(tmp_path):
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    pipe = CPIPipeline(build_tiny_llama(tok), tok, TASKS, _config(), out, progress=False)
    rep = pipe.run(until="grouping")
    assert pipe.trainer_runs == ["probe:inc", "probe:rev", "probe:abc"]
    assert rep["completed"] == ["probe", "cores", "grouping"]
    assert len(rep["jaccard"]) == 3 and sorted(functools.reduce(operator.iadd, rep["groups"], [])) == sorted(
        t.name for t in TASKS
    )

    # a new process: fresh base model, same state dir -> only fusion and staged run
    tok2 = build_tiny_tokenizer()
    pipe2 = CPIPipeline(build_tiny_llama(tok2), tok2, TASKS, _config(), out, progress=False)
    rep2 = pipe2.run()
    assert pipe2.trainer_runs == [f"stage:{k}" for k in range(len(rep2["stage_order"]))]
    assert (out / "report.json").exists() and (out / "report.md").exists() and (out / "jaccard.png").exists()

    # the first group's core, trained in stage 0, is bit-identical after every later stage; the rest moved
    n_stages = len(rep2["stage_order"])
    assert n_stages >= 2
    stage0 = load_file(str(out / "stages" / "stage_0.safetensors"))
    core = {}
    for task_name in rep2["stage_order"][0]:
        for k, m in pipe2.load_core(task_name).items():
            core[k] = core[k] | m if k in core else m
    for later in range(1, n_stages):
        st = load_file(str(out / "stages" / f"stage_{later}.safetensors"))
        assert all(torch.equal(st[k][m], stage0[k][m]) for k, m in core.items())
        assert any(not torch.equal(st[k][~m], stage0[k][~m]) for k, m in core.items())

    # the final adapter reloads bit-exact, with the union of all cores as masks
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe2.model(ids).logits
    loaded = PeftModel.from_pretrained(build_tiny_llama(build_tiny_tokenizer()), out / "final")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    n_masked = sum(
        int(layer.core_isolation_mask["default"].sum()) for layer in loaded.base_model.core_isolation_layers().values()
    )
    assert n_masked >= max(rep2["core_sizes"].values())

    # running again does nothing
    pipe3 = CPIPipeline(
        build_tiny_llama(build_tiny_tokenizer()), build_tiny_tokenizer(), TASKS, _config(), out, progress=False
    )
    pipe3.run()
    assert pipe3.trainer_runs == []


def test_pipeline_resumes_inside_probe(tmp_path):
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    pipe = CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False)
    pipe.run(until="probe")
    state = json.loads((out / "state.json").read_text())  # simulate a crash after the first probe
    state["completed"], state["probes_done"] = [], ["inc"]
    write_json_atomic(out / "state.json", state, digest=True)  # as the pipeline writes it (a hand edit is refused)
    pipe2 = CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False)
    pipe2.run(until="cores")
    assert pipe2.trainer_runs == ["probe:rev"]


def test_full_param_mode(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    pipe = CPIPipeline(
        model, tok, TASKS[:2], _config(train_params="full", similarity_threshold=1.0), tmp_path / "f", progress=False
    )
    rep = pipe.run()
    assert rep["groups"] == [["inc"], ["rev"]]
    assert (tmp_path / "f" / "final" / "config.json").exists()
    stage0 = load_file(str(tmp_path / "f" / "stages" / "stage_0.safetensors"))
    last = load_file(str(tmp_path / "f" / "stages" / "stage_1.safetensors"))
    core = pipe.load_core("inc")
    assert sum(int(m.sum()) for m in core.values()) > 0
    for k, m in core.items():
        assert torch.equal(last[k][m], stage0[k][m])
    final = dict(pipe.model.named_parameters())
    for k, m in core.items():  # the trained model itself: θ0 + Δ with the frozen entries intact
        assert torch.equal(final[k].detach()[m], (pipe.tracked.theta0[k] + last[k])[m])


# ------------------------------------------------------------------------------------------------- bad input


def test_single_task_warns_and_runs_plain_sft(tmp_path):
    tok = build_tiny_tokenizer()
    with pytest.warns(UserWarning, match="plain SFT"):
        pipe = CPIPipeline(build_tiny_llama(tok), tok, TASKS[:1], _config(), tmp_path / "one", progress=False)
    pipe.run()
    assert pipe.trainer_runs == ["probe:inc"]
    assert (tmp_path / "one" / "final" / "adapter_model.safetensors").exists()


def test_empty_task_data(tmp_path):
    tok = build_tiny_tokenizer()
    empty = Task(name="empty", kind="generation", train=[], validation=[], test=[])
    with pytest.raises(ValueError, match="'empty' has no training examples"):
        CPIPipeline(build_tiny_llama(tok), tok, [TASKS[0], empty], _config(), tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="empty"):
        CPIPipeline(build_tiny_llama(tok), tok, [], _config(), tmp_path / "e2", progress=False)


def test_other_base_model_rejected(tmp_path):
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    CPIPipeline(build_tiny_llama(tok, seed=0), tok, TASKS[:2], _config(), out, progress=False).run(until="probe")
    with pytest.raises(StateFileError, match=rf"{out / 'state.json'} was made from another base model"):
        CPIPipeline(build_tiny_llama(tok, seed=1), tok, TASKS[:2], _config(), out, progress=False)
    # a probe checkpoint copied in from a run on another base model is refused as well
    other = tmp_path / "other"
    CPIPipeline(build_tiny_llama(tok, seed=1), tok, TASKS[:2], _config(), other, progress=False).run(until="probe")
    shutil.copy(other / "probe" / "rev.safetensors", out / "probe" / "rev.safetensors")
    pipe = CPIPipeline(build_tiny_llama(tok, seed=0), tok, TASKS[:2], _config(), out, progress=False)
    with pytest.raises(StateFileError, match=r"rev\.safetensors belongs to another run.*another base model"):
        pipe.run()


def _state_dir(tmp_path):
    """A state directory with a written state.json (no training: the pipeline writes it on construction)."""
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False)
    return out, tok


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "is empty"),
        ('{"version": 2, "fingerprint": "ab', "is not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"version": 1, "tasks": ["inc", "rev"]}', "is not a version-2 CPI-FT state"),
    ],
)
def test_unusable_state_file_one_line_error(tmp_path, content, message):
    out, tok = _state_dir(tmp_path)
    (out / "state.json").write_text(content)
    with pytest.raises(StateFileError, match=message) as err:
        CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False)
    text = str(err.value)
    assert "\n" not in text and str(out / "state.json") in text and "delete" in text


def test_mismatched_state_file_says_what_differs(tmp_path):
    out, tok = _state_dir(tmp_path)
    cases = [
        ({"config": _config(core_fraction=0.2)}, r"another config .*core_fraction"),
        ({"config": _config(fusion="slerp_task_vectors")}, r"another config .*fusion"),
        ({"tasks": [TASKS[1], TASKS[0]]}, r"is for tasks \['inc', 'rev'\], not \['rev', 'inc'\]"),
        ({"tasks": [TASKS[0], _task("rev", str)]}, "other training data"),
    ]
    for change, message in cases:
        kwargs = {"tasks": TASKS[:2], "config": _config(), **change}
        with pytest.raises(StateFileError, match=message) as err:
            CPIPipeline(build_tiny_llama(tok), tok, kwargs["tasks"], kwargs["config"], out, progress=False)
        assert str(out / "state.json") in str(err.value) and "\n" not in str(err.value)


def test_truncated_checkpoint_one_line_error(tmp_path):
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False).run(until="probe")
    path = out / "probe" / "rev.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    pipe = CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False)
    with pytest.raises(StateFileError, match=r"rev\.safetensors cannot be read"):
        pipe.run(until="cores")


class _DeltasAtTrainBegin(TrainerCallback):
    """Records the tracked deltas when each SFT run starts, before its first optimizer step."""

    def __init__(self):
        self.pipe, self.snapshots = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.snapshots.append(self.pipe.tracked.deltas())


def test_staged_sft_starts_from_the_fused_model(tmp_path):
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    cfg, tasks = _config(similarity_threshold=1.0), TASKS[:2]
    pipe = CPIPipeline(build_tiny_llama(tok), tok, tasks, cfg, out, progress=False)
    pipe.run(until="grouping")
    probes = [pipe.load_probe_delta(t.name) for t in tasks]
    cores = [pipe.load_core(t.name) for t in tasks]
    base = {k: pipe.tracked.base(k) for k in pipe.tracked.names}
    expected = fuse_deltas(probes, cores, pipe.tracked.names, base=base, fusion="slerp_params")

    recorder = _DeltasAtTrainBegin()
    pipe2 = CPIPipeline(build_tiny_llama(tok), tok, tasks, cfg, out, progress=False, callbacks=[recorder])
    recorder.pipe = pipe2
    pipe2.run()
    assert pipe2.trainer_runs[0] == "stage:0" and len(recorder.snapshots) == len(pipe2.state["stage_order"])
    first = recorder.snapshots[0]
    for name, value in expected.items():
        torch.testing.assert_close(first[name], value, rtol=0, atol=0)
    # neither zeros (θ0) nor any single probe would pass
    assert any(bool(v.any()) for v in first.values())
    for probe in probes:
        assert any(not torch.equal(first[k], probe[k]) for k in first)


def test_changed_config_rejected(tmp_path):
    out = tmp_path / "cpi"
    tok = build_tiny_tokenizer()
    CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(), out, progress=False)
    with pytest.raises(ValueError, match="another config"):
        CPIPipeline(build_tiny_llama(tok), tok, TASKS[:2], _config(core_fraction=0.2), out, progress=False)


def test_pipeline_stage_order_from_config(tmp_path):
    """The grouping step orders the groups with the configured strategy (here: dependency, reversing the input)."""
    tok = build_tiny_tokenizer()
    cfg = _config(
        similarity_threshold=1.0, stage_order="dependency", stage_dependencies=[["abc", "rev"], ["rev", "inc"]]
    )
    pipe = CPIPipeline(build_tiny_llama(tok), tok, TASKS, cfg, tmp_path / "d", progress=False)
    rep = pipe.run(until="grouping")
    assert rep["groups"] == [["inc"], ["rev"], ["abc"]] and rep["stage_order"] == [["abc"], ["rev"], ["inc"]]
    assert set(rep["probe_difficulty"]) == {"inc", "rev", "abc"}
    with pytest.raises(ValueError, match="unknown tasks"):
        CPIPipeline(
            build_tiny_llama(tok),
            tok,
            TASKS,
            _config(stage_order="dependency", stage_dependencies=[["abc", "nope"]]),
            tmp_path / "e",
            progress=False,
        )


def test_base_model_fingerprint_looks_through_the_adapter():
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    before = base_model_fingerprint(base)
    wrapped = get_peft_model(base, CoreIsolationConfig(target_modules=MLP))
    layer = next(iter(wrapped.base_model.core_isolation_layers().values()))
    layer.core_isolation_delta["default"].data.fill_(0.5)  # adapter tensors do not enter the hash
    assert base_model_fingerprint(wrapped) == before
    assert base_model_fingerprint(build_tiny_llama(tok, seed=1)) != before
