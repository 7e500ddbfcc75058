"""SVF training through TRL (GRPO, RLOO, SFT) on a tiny random Llama: only z moves, KL, checkpoints, PEFT paths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from testing_utils import build_tiny_llama, build_tiny_tokenizer
from transformers import TrainerCallback

from peft_spectral import SVFConfig
from peft_spectral.tasks import Example, Task
from peft_spectral.training import (
    PAPER_BETA,
    VALIDATION_FILE,
    NonFiniteGuard,
    ValidationCallback,
    examples_to_dataset,
    fix_reference_adapter,
    paper_rl_preset,
    reward_for_task,
    sft_answer,
    sft_preset,
    svf_parameters,
    train_svf,
)


TARGETS = ["gate_proj", "up_proj", "down_proj"]
FAST_RL = {"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 6}


def mc_task(n: int = 8) -> Task:
    examples = []
    for i in range(n):
        choices = ("red", "blue", "green")
        label = i % 3
        prompt = f"Q{i}: pick a colour.\nA. red\nB. blue\nC. green\nAnswer with the letter."
        examples.append(Example(prompt=prompt, target=choices[label], choices=choices, label=label))
    return Task(name="toy_mc", kind="multiple_choice", train=examples, validation=examples[:2], test=examples[:2])


def varied_reward(completions, **kwargs):
    """A reward that differs between sampled completions of a random model (so that the policy gradient is not 0)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ord(ch) % 2 for ch in t) / max(len(t), 1) for t in texts]


def svf_config(**kw) -> SVFConfig:
    return SVFConfig(target_modules=TARGETS, use_svd_cache=False, **kw)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Base parameters by their original names (PEFT's `.base_layer` stripped)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    out = {}
    for name, p in model.named_parameters():
        if "svf_" in name or "lora_" in name:
            continue
        out[name.replace(".base_layer", "")] = p.detach().clone()
    return out


def assert_only_z_changed(result, before):
    after = base_weights(result.model)
    assert set(after) == set(before)
    for name, w in before.items():
        assert torch.equal(after[name], w), f"base parameter {name} changed"
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all(".svf_z." in n + "." for n in trainable)
    z = svf_parameters(result.model)
    assert len(z) == 6
    moved = max(float((v - 1).abs().max()) for v in z.values())
    assert moved > 1e-5, "z did not move"
    assert result.trainable_parameters == sum(v.numel() for v in z.values())


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_rl_trains_only_z(tmp_path, algorithm):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    before = base_weights(model)
    result = train_svf(
        model,
        tok,
        mc_task(),
        method="rl",
        algorithm=algorithm,
        output_dir=str(tmp_path),
        max_steps=2,
        svf_config=svf_config(),
        reward_funcs=[varied_reward],
        **FAST_RL,
    )
    assert_only_z_changed(result, before)
    assert len(result.step_times) == 2
    assert result.final("reward") is not None and math.isfinite(result.final("reward"))


@pytest.mark.parametrize("chat", [True, False])
def test_sft_trains_only_z(tmp_path, chat):
    tok = build_tiny_tokenizer(chat_template=chat)
    model = build_tiny_llama(tok)
    before = base_weights(model)
    result = train_svf(
        model,
        tok,
        mc_task(),
        method="sft",
        output_dir=str(tmp_path),
        max_steps=2,
        svf_config=svf_config(),
        per_device_train_batch_size=4,
    )
    assert_only_z_changed(result, before)
    losses = [r["loss"] for r in result.logs if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


def test_sft_dataset_uses_chat_template_and_answer_format():
    task = mc_task(3)
    ds = examples_to_dataset(task.train, task.kind, tokenizer=build_tiny_tokenizer(), with_completion=True)
    assert ds[0]["prompt"] == [{"role": "user", "content": task.train[0].prompt}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": "A. red"}]
    assert ds[1]["label"] == 1 and ds[1]["choices"] == ["red", "blue", "green"]
    plain = examples_to_dataset(
        task.train, task.kind, tokenizer=build_tiny_tokenizer(chat_template=False), with_completion=True
    )
    assert plain[0]["prompt"].endswith("\n") and plain[0]["completion"] == "A. red"
    assert sft_answer(Example("2+2?", "4"), "generation") == "4"
    # the SFT answer is scored as right by the task's own reward
    reward = reward_for_task(task, extraction="lenient")  # each completion scored by its example's scorer
    index = ds["example_index"][:3]
    assert reward([ds[i]["completion"] for i in range(3)], example_index=index) == [1.0, 1.0, 1.0]
    assert reward(["C", "A", "A"], example_index=index) == [-1.0, -1.0, -1.0]
    column = reward_for_task(task.kind)  # the column reward of the kind, for datasets built without the package
    assert (
        column([ds[i]["completion"] for i in range(3)], choices=ds["choices"][:3], label=ds["label"][:3]) == [1.0] * 3
    )
    with pytest.raises(ValueError, match="example_index"):
        reward(["A"], choices=ds["choices"][:1], label=ds["label"][:1])


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_kl_term_is_active(tmp_path, algorithm):
    """With beta > 0 the reference pass runs (adapter disabled): the logged KL is positive once z has moved, and the
    update differs from the beta = 0 run."""
    zs = {}
    for beta in (0.0, 0.5):
        tok = build_tiny_tokenizer()
        model = build_tiny_llama(tok)
        result = train_svf(
            model,
            tok,
            mc_task(),
            method="rl",
            algorithm=algorithm,
            output_dir=str(tmp_path / str(beta)),
            max_steps=3,
            beta=beta,
            svf_config=svf_config(),
            reward_funcs=[varied_reward],
            learning_rate=0.2,
            max_grad_norm=1.0,
            **FAST_RL,
        )
        zs[beta] = svf_parameters(result.model)
        if beta > 0:
            kls = [r["kl"] for r in result.logs if "kl" in r]
            assert len(kls) == 3
            assert abs(kls[0]) < 1e-6  # policy == reference at the first step
            # GRPO's k3 estimate is >= 0; RLOO's first-order log-ratio estimate can have either sign
            assert (kls[-1] > 1e-6) if algorithm == "grpo" else (abs(kls[-1]) > 1e-6)
    assert any(not torch.allclose(zs[0.0][k], zs[0.5][k]) for k in zs[0.0])


def test_reference_adapter_copies_existing_z(tmp_path):
    """Re-training an SVF PeftModel with beta > 0: TRL's 'ref' adapter must equal the starting z (TRL itself only
    copies `*.default.*` names, which SVF's `svf_z.default` is not)."""
    tok = build_tiny_tokenizer()
    model = get_peft_model(build_tiny_llama(tok), svf_config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "pretrained" adapter: z away from its initial value
        for name, p in model.named_parameters():
            if "svf_z" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    start = svf_parameters(model)
    result = train_svf(
        model,
        tok,
        mc_task(),
        method="rl",
        algorithm="grpo",
        output_dir=str(tmp_path),
        max_steps=1,
        beta=0.3,
        reward_funcs=[varied_reward],
        **FAST_RL,
    )
    ref = svf_parameters(result.model, "ref")
    assert set(ref) == set(start)
    for k in start:
        assert torch.equal(ref[k], start[k])
    kls = [r["kl"] for r in result.logs if "kl" in r]
    assert kls and abs(kls[0]) < 1e-6
    assert fix_reference_adapter(get_peft_model(build_tiny_llama(tok), svf_config())) == 0


def test_checkpoint_resume_reaches_same_z(tmp_path):
    def run(max_steps, out, resume=None, save_steps=None):
        tok = build_tiny_tokenizer()
        model = build_tiny_llama(tok)
        return train_svf(
            model,
            tok,
            mc_task(),
            method="rl",
            algorithm="grpo",
            output_dir=str(out),
            max_steps=max_steps,
            svf_config=svf_config(),
            reward_funcs=[varied_reward],
            beta=0.1,
            save_steps=save_steps,
            resume_from_checkpoint=resume,
            **FAST_RL,
        )

    full = svf_parameters(run(4, tmp_path / "full").model)
    run(2, tmp_path / "half", save_steps=2)
    ckpt = tmp_path / "half" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    resumed = svf_parameters(run(4, tmp_path / "half", resume=str(ckpt)).model)
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-7, rtol=0), k
    assert any(not torch.allclose(full[k], torch.ones_like(full[k])) for k in full)


def test_trained_adapter_saves_loads_and_merges(tmp_path):
    tok = build_tiny_tokenizer()
    config = svf_config()
    model = build_tiny_llama(tok)
    result = train_svf(
        model,
        tok,
        mc_task(),
        method="sft",
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        svf_config=config,
        per_device_train_batch_size=4,
        save_dir=tmp_path / "expert",
    )
    # save_dir: the adapter with its model card and expert.json
    card = (tmp_path / "expert" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "# SVF expert: toy_mc" in card and "| steps run | 2 |" in card
    meta = json.loads((tmp_path / "expert" / "expert.json").read_text())
    assert (
        meta["task"] == "toy_mc"
        and meta["recipe"]["batch_size"] == 4
        and meta["recipe"]["target_modules"] == sorted(TARGETS)
    )
    assert (tmp_path / "expert" / "adapter_model.safetensors").is_file()
    peft_model = result.model
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    # a config without task_type trains (and saves) as a causal LM adapter; the caller's object is not changed
    assert config.task_type is None
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    loaded = PeftModel.from_pretrained(build_tiny_llama(tok), tmp_path / "adapter")
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    z0, z1 = svf_parameters(peft_model), svf_parameters(loaded)
    assert all(torch.equal(z0[k], z1[k]) for k in z0)

    # the path vLLM weight sync takes: merge_adapter / unmerge_adapter restore the base exactly
    peft_model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        before = base_weights(peft_model)
        peft_model.merge_adapter()
        merged = peft_model(input_ids=ids).logits
        peft_model.unmerge_adapter()
    assert torch.allclose(merged, expected, atol=1e-5)
    after = base_weights(peft_model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_nan_reward_is_a_clear_error(tmp_path):
    tok = build_tiny_tokenizer()

    def bad_reward(completions, **kwargs):
        return [float("nan")] * len(completions)

    # the user's function is not wrapped by hand: train_svf checks every reward function itself
    with pytest.raises(ValueError, match="reward function 'bad_reward' returned nan"):
        train_svf(
            build_tiny_llama(tok),
            tok,
            mc_task(),
            output_dir=str(tmp_path),
            max_steps=1,
            svf_config=svf_config(),
            reward_funcs=[bad_reward],
            **FAST_RL,
        )
    guard = NonFiniteGuard()
    with pytest.raises(FloatingPointError, match="reward"):
        guard.on_log(None, type("S", (), {"global_step": 3})(), None, logs={"reward": float("nan")})


def test_all_none_rewards_are_a_clear_error(tmp_path):
    tok = build_tiny_tokenizer()

    def none_reward(completions, **kwargs):
        return [None] * len(completions)

    with pytest.raises(ValueError, match="reward function 'none_reward' returned None"):
        train_svf(
            build_tiny_llama(tok),
            tok,
            mc_task(),
            output_dir=str(tmp_path),
            max_steps=1,
            svf_config=svf_config(),
            reward_funcs=[none_reward],
            **FAST_RL,
        )


def test_rl_run_without_an_optimizer_step_is_an_error(tmp_path):
    """Fewer prompts than one RL step needs used to run 0 steps and return an untrained adapter as if trained (SFT
    takes a short last batch, so only RL's grouped sampler can starve)."""
    tok = build_tiny_tokenizer()
    batch = {"prompts_per_step": 4, "num_generations": 2, "max_completion_length": 4}
    with pytest.raises(ValueError, match=r"training ran 0 optimizer steps: the task has 1 training examples"):
        train_svf(
            build_tiny_llama(tok),
            tok,
            mc_task(1),
            output_dir=str(tmp_path),
            max_steps=2,
            svf_config=svf_config(),
            **batch,
        )


def long_prompt_task(n_long: int, n_short: int) -> Task:
    """A generation task whose first `n_long` prompts are about 600 tokens (past the tiny model's 512 positions)."""
    long = [Example(prompt="count " * 600 + f"q{i}", target="4") for i in range(n_long)]
    short = [Example(prompt=f"short q{i}", target="4") for i in range(n_short)]
    examples = long + short
    return Task(name="lengths", kind="generation", train=examples, validation=examples[:2], test=examples[:2])


def train_on_lengths(tmp_path, n_long: int, n_short: int, method: str, **kwargs):
    tok = build_tiny_tokenizer()
    options = {"max_length": 64} if method == "sft" else {"reward_funcs": [varied_reward], **FAST_RL}
    return train_svf(
        build_tiny_llama(tok),
        tok,
        long_prompt_task(n_long, n_short),
        method=method,
        output_dir=str(tmp_path),
        max_steps=1,
        svf_config=svf_config(),
        **options,
        **kwargs,
    )


def test_sft_on_prompts_past_max_length_is_a_clear_error(tmp_path):
    """Every answer past max_length left TRL with 0 examples and a bare `num_samples=0` from the sampler."""
    with pytest.raises(ValueError, match=r"every one of the 4 SFT examples is longer than max_length=64"):
        train_on_lengths(tmp_path, 4, 0, "sft")


def test_sft_dropping_some_examples_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"2 of 6 SFT examples dropped: their answer starts past max_length=64"):
        train_on_lengths(tmp_path, 2, 4, "sft", per_device_train_batch_size=2)


def test_rl_on_prompts_past_the_context_is_refused_or_reported(tmp_path):
    """RL sampled after prompts longer than the model's context without a word."""
    with pytest.raises(ValueError, match=r"every one of the 4 RL prompts is too long: .* context of 512 tokens"):
        train_on_lengths(tmp_path / "all", 4, 0, "rl")
    with pytest.warns(UserWarning, match=r"1 of 5 RL prompts are too long"):
        train_on_lengths(tmp_path / "some", 1, 4, "rl")


def test_bad_arguments_name_themselves(tmp_path):
    tok = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="method"):
        train_svf(build_tiny_llama(tok), tok, mc_task(), method="ppo")
    with pytest.raises(ValueError, match="algorithm"):
        paper_rl_preset(str(tmp_path), algorithm="ppo")
    with pytest.raises(ValueError, match="num_generations"):
        paper_rl_preset(str(tmp_path), num_generations=1)
    with pytest.raises(ValueError, match="kind"):
        train_svf(build_tiny_llama(tok), tok, mc_task().train)


def test_paper_preset_values(tmp_path):
    args = paper_rl_preset(str(tmp_path), algorithm="grpo", beta=0.2, prompts_per_step=3, num_generations=4)
    assert args.learning_rate == 2e-3 and args.max_grad_norm == 1e-3 and args.beta == 0.2
    assert args.per_device_train_batch_size == 12 and args.num_generations == 4
    assert args.optim.value.startswith("adamw") and args.lr_scheduler_type.value == "constant"
    rloo = paper_rl_preset(str(tmp_path), algorithm="rloo", beta=0.1)
    assert type(rloo).__name__ == "RLOOConfig" and rloo.beta == 0.1
    # the default KL weight is the paper's 0.1 (grid {0, 0.1, 0.2, 0.3}), not 0
    assert paper_rl_preset(str(tmp_path)).beta == PAPER_BETA == 0.1


def test_sft_preset_turns_trl_gradient_checkpointing_off(tmp_path):
    import dataclasses

    from trl import SFTConfig

    trl_default = next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "gradient_checkpointing")
    assert trl_default is True  # TRL's default, which the preset changes
    assert sft_preset(str(tmp_path), max_steps=1).gradient_checkpointing is False
    assert sft_preset(str(tmp_path), max_steps=1, gradient_checkpointing=True).gradient_checkpointing is True


def test_causal_lm_config_defaults():
    from peft import LoraConfig

    from peft_spectral.training import causal_lm_config

    assert causal_lm_config(None).task_type == "CAUSAL_LM" and isinstance(causal_lm_config(None), SVFConfig)
    given = LoraConfig(r=2, target_modules=["up_proj"])
    assert causal_lm_config(given).task_type == "CAUSAL_LM" and given.task_type is None
    seq = SVFConfig(task_type="SEQ_CLS")
    assert causal_lm_config(seq) is seq


def test_gguf_flag_is_dropped_so_trainer_accepts_the_model(tmp_path):
    from types import SimpleNamespace

    from transformers.trainer_utils import validate_quantization_for_training

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    gguf = SimpleNamespace(quant_method="gguf")
    model.hf_quantizer = SimpleNamespace(quantization_config=gguf, is_trainable=False, is_qat_trainable=False)
    model.config.quantization_config = gguf
    model.is_quantized = True  # what transformers' quantizer sets on a GGUF load
    with pytest.raises(ValueError, match="quantized"):
        validate_quantization_for_training(model)
    from peft_spectral.training import as_plain_fp32

    as_plain_fp32(model)
    assert model.hf_quantizer is None and not model.is_quantized and not hasattr(model.config, "quantization_config")
    validate_quantization_for_training(model)
    other = build_tiny_llama(tok)
    other.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="bitsandbytes"))
    assert as_plain_fp32(other).hf_quantizer is not None  # real quantization is left alone


def test_with_lettered_options():
    from peft_spectral.training import with_lettered_options

    ex = Example(prompt="Is the sky blue?", target="yes", choices=("yes", "no"), label=0)
    lettered = with_lettered_options(ex)
    assert "A. yes\nB. no" in lettered.prompt and lettered.label == 0 and lettered.choices == ex.choices
    assert with_lettered_options(lettered) is lettered
    reward = reward_for_task("multiple_choice")
    assert reward(["A", "B. no", "yes"], choices=[ex.choices] * 3, label=[0, 0, 0]) == [1.0, -1.0, 1.0]
    with pytest.raises(ValueError, match="choices"):
        with_lettered_options(Example(prompt="2+2", target="4"))


# ---------------------------------------------------------------------------------------------------------------
# Validation: checkpoint selection and early stopping
# ---------------------------------------------------------------------------------------------------------------


class ZRecorder(TrainerCallback):
    """Records the SVF z after every optimizer step (and before the first)."""

    def __init__(self):
        self.z = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.z.setdefault(state.global_step, svf_parameters(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.z[state.global_step] = svf_parameters(model)


def test_validation_restores_best_z_and_stops_early(tmp_path):
    """Validation scores we control rise to step 2 and fall after: training stops after `patience` worse
    evaluations (step 4 of 10) and the model ends with the z of step 2."""
    scores = iter([0.1, 0.5, 0.9, 0.3, 0.2, 0.95, 0.95])  # steps 0, 1, 2, 3, 4, (5, 6 never reached)
    validation = ValidationCallback(score_fn=lambda model: next(scores), eval_every=1, patience=2)
    recorder = ZRecorder()
    tok = build_tiny_tokenizer()
    result = train_svf(
        build_tiny_llama(tok),
        tok,
        mc_task(),
        method="sft",
        output_dir=str(tmp_path),
        max_steps=10,
        svf_config=svf_config(),
        per_device_train_batch_size=4,
        callbacks=[recorder, validation],
        resume=True,
        save_steps=1,
    )
    assert result.trainer.state.global_step == 4 and max(recorder.z) == 4
    summary = result.validation
    assert [row["step"] for row in summary["curve"]] == [0, 1, 2, 3, 4]
    assert summary["best_step"] == 2 and summary["stopped_early_at"] == 4 and summary["restored_best"]
    final = svf_parameters(result.model)
    assert any(not torch.equal(recorder.z[4][k], recorder.z[2][k]) for k in final)  # z moved after step 2
    assert all(torch.equal(final[k], recorder.z[2][k]) for k in final)
    saved = json.loads((tmp_path / VALIDATION_FILE).read_text())
    assert saved["best_step"] == 2 and len(saved["curve"]) == 5

    def never(model):
        raise AssertionError("a run that stopped early must not be trained or validated again")

    again = train_svf(  # the same command again (resume=True): restores the best z of the stopped run, no step
        build_tiny_llama(tok),
        tok,
        mc_task(),
        method="sft",
        output_dir=str(tmp_path),
        max_steps=10,
        svf_config=svf_config(),
        per_device_train_batch_size=4,
        callbacks=[ValidationCallback(score_fn=never, eval_every=1, patience=2)],
        resume=True,
        save_steps=1,
    )
    assert again.step_times == [] and again.validation["best_step"] == 2
    final = svf_parameters(again.model)
    assert all(torch.equal(final[k], recorder.z[2][k]) for k in final)


def test_validation_scores_the_task_validation_split(tmp_path):
    tok = build_tiny_tokenizer()
    task = mc_task()
    result = train_svf(
        build_tiny_llama(tok),
        tok,
        task,
        method="sft",
        output_dir=str(tmp_path),
        max_steps=3,
        svf_config=svf_config(),
        per_device_train_batch_size=4,
        eval_examples=2,
        eval_every=2,
        eval_max_new_tokens=2,
    )
    curve = result.validation["curve"]
    assert [row["step"] for row in curve] == [0, 2, 3]  # before training, every 2 steps, and the last step
    assert all(row["n"] == 2 and 0.0 <= row["accuracy"] <= 1.0 for row in curve)
    # a random model scores 0 throughout: the tie keeps step 0, and the initial z (all ones) is restored
    assert result.validation["best_step"] == 0
    assert all(torch.equal(v, torch.ones_like(v)) for v in svf_parameters(result.model).values())
    with pytest.raises(ValueError, match="eval_every"):
        ValidationCallback(score_fn=lambda m: 0.0, eval_every=0)
    with pytest.raises(ValueError, match="Task"):
        train_svf(build_tiny_llama(tok), tok, task.train, kind=task.kind, eval_examples=2, output_dir=str(tmp_path))


def test_resume_true_continues_from_last_checkpoint(tmp_path):
    """Interrupted after 2 steps and resumed to 4 with `resume=True` (the same call twice): the same z, validation
    curve and restored best z as 4 uninterrupted steps. GRPO samples, but TRL/Trainer checkpoints hold the RNG
    states and the data order is replayed, so the runs agree to float rounding."""

    def run(max_steps, out):
        tok = build_tiny_tokenizer()
        validation = ValidationCallback(
            score_fn=lambda model: float(sum(v.sum() for v in svf_parameters(model).values())), eval_every=1
        )
        recorder = ZRecorder()
        result = train_svf(
            build_tiny_llama(tok),
            tok,
            mc_task(),
            method="rl",
            algorithm="grpo",
            output_dir=str(out),
            max_steps=max_steps,
            svf_config=svf_config(),
            reward_funcs=[varied_reward],
            beta=0.1,
            learning_rate=0.05,
            max_grad_norm=1.0,
            resume=True,
            callbacks=[recorder, validation],
            **FAST_RL,
        )
        return result, recorder

    full, full_z = run(4, tmp_path / "full")
    assert full.resumed_from is None
    run(2, tmp_path / "half")
    assert (tmp_path / "half" / "checkpoint-2" / "validation_state.json").exists()
    resumed, resumed_z = run(4, tmp_path / "half")
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.trainer.state.global_step == 4
    assert sorted(resumed_z.z) == [2, 3, 4]  # steps 1-2 were not run again
    for k in full_z.z[4]:
        assert torch.allclose(full_z.z[4][k], resumed_z.z[4][k], atol=1e-6, rtol=0), k
    assert not torch.allclose(full_z.z[4][k], torch.ones_like(full_z.z[4][k]))
    curve_full = [(r["step"], r["score"]) for r in full.validation["curve"]]
    curve_resumed = [(r["step"], r["score"]) for r in resumed.validation["curve"]]
    assert [s for s, _ in curve_resumed] == [0, 1, 2, 3, 4]
    assert [s for s, _ in curve_full] == [s for s, _ in curve_resumed]
    assert all(math.isclose(a, b, rel_tol=0, abs_tol=1e-4) for (_, a), (_, b) in zip(curve_full, curve_resumed))
    assert full.validation["best_step"] == resumed.validation["best_step"]
    final_full, final_resumed = svf_parameters(full.model), svf_parameters(resumed.model)
    assert all(torch.allclose(final_full[k], final_resumed[k], atol=1e-6, rtol=0) for k in final_full)


class _Clock:
    """A fake `time` module for `peft_spectral.training.callbacks`: a step costs 1 s, a validation 100 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _StepCost(TrainerCallback):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.now += 1.0


def _budget_run(tmp_path, clock, budget, max_steps=50, **kw):
    def slow_score(model):
        clock.now += 100.0
        return 0.0

    tok = build_tiny_tokenizer()
    return train_svf(
        build_tiny_llama(tok),
        tok,
        mc_task(),
        method="sft",
        output_dir=str(tmp_path),
        max_steps=max_steps,
        svf_config=svf_config(),
        per_device_train_batch_size=4,
        callbacks=[_StepCost(clock), ValidationCallback(score_fn=slow_score, eval_every=3)],
        max_train_seconds=budget,
        **kw,
    )


def test_time_budget_stops_training_and_leaves_out_validation(tmp_path, monkeypatch):
    """Steps cost 1 s and validations 100 s on a fake clock: a 3.5 s budget ends training after step 4 (not after
    step 0's validation), the step at which it ends is validated although it is no multiple of eval_every, and the
    result records why training stopped."""
    from peft_spectral.training import callbacks

    clock = _Clock()
    monkeypatch.setattr(callbacks, "time", clock)
    result = _budget_run(tmp_path, clock, 3.5)
    assert result.trainer.state.global_step == 4 and len(result.step_times) == 4
    assert result.time_budget == {
        "max_train_seconds": 3.5,
        "train_seconds": 4.0,
        "validation_seconds": 300.0,
        "steps": 4,
        "stopped_at": 4,
        "exhausted": True,
    }
    assert [row["step"] for row in result.validation["curve"]] == [0, 3, 4]
    assert [row["train_seconds"] for row in result.validation["curve"]] == [0.0, 3.0, 4.0]  # validation left out
    # without a budget the same run goes to max_steps
    unbounded = _budget_run(tmp_path / "free", clock, None, max_steps=5)
    assert unbounded.trainer.state.global_step == 5 and unbounded.time_budget is None
    with pytest.raises(ValueError, match="max_train_seconds"):
        _budget_run(tmp_path / "bad", clock, 0.0)


def test_time_budget_continues_on_resume(tmp_path, monkeypatch):
    """The seconds spent go into each checkpoint: a run stopped by a 2.5 s budget at step 3 and resumed with 4.5 s
    does 2 more steps; resumed again with its budget used up, it restores the best z without training."""
    from peft_spectral.training import callbacks

    clock = _Clock()
    monkeypatch.setattr(callbacks, "time", clock)
    first = _budget_run(tmp_path, clock, 2.5, resume=True, save_steps=1)
    assert first.trainer.state.global_step == 3 and first.time_budget["train_seconds"] == 3.0
    second = _budget_run(tmp_path, clock, 4.5, resume=True, save_steps=1)
    assert second.resumed_from.endswith("checkpoint-3")
    assert second.trainer.state.global_step == 5 and len(second.step_times) == 2
    assert second.time_budget["train_seconds"] == 5.0 and second.time_budget["stopped_at"] == 5
    assert [row["train_seconds"] for row in second.validation["curve"]] == [0.0, 3.0, 5.0]
    third = _budget_run(tmp_path, clock, 4.5, resume=True, save_steps=1)
    assert third.step_times == [] and third.time_budget["exhausted"] and third.time_budget["steps"] == 0
