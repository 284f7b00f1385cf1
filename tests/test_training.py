"""Stages sft, distill and eval in-process on the tiny profile: what they train on, what they save,
what they report, and that they resume from checkpoints and stop cleanly on cancel."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest

from engine.config.load import load_config
from engine.config.schema import LoraConfig, PeftConfig
from engine.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from engine.runner.context import StageCancelled, StageError
from engine.stages import data, distill, sft, teacher
from engine.stages import eval as eval_stage
from engine.store.events import read_events

from .helpers import PROMPTS, TINY_CONFIG, make_context


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data → teacher → sft → distill → eval once, in-process, in a module-wide project folder."""
    root = tmp_path_factory.mktemp("pipeline")
    shutil.copy(PROMPTS, root / "prompt.yaml")
    cfg = load_config(TINY_CONFIG)
    for section, key in (
        (cfg.data, "output_path"),
        (cfg.teacher.base, "output_path"),
        (cfg.train.sft, "save_path"),
        (cfg.train.distillation, "output_dir"),
    ):
        setattr(section, key, str(root / getattr(section, key)))
    cfg.prompts.path = str(root / "prompt.yaml")
    cfg.data.limit = 48
    cfg.teacher.open.pipeline.max_new_tokens = 24
    cfg.eval.code.limit = 12  # tiny-python's first 12 held-out problems: the full benchmark is the e2e test's
    contexts = {}
    for stage, module in (
        ("data", data),
        ("teacher", teacher),
        ("sft", sft),
        ("distill", distill),
        ("eval", eval_stage),
    ):
        contexts[stage] = make_context(cfg, stage, root)
        module.run(contexts[stage])
    return cfg, contexts, root


class SigtermDuringTraining(threading.Event):
    """Reads as not-cancelled at the stage's first look, cancelled afterwards: SIGTERM once training runs."""

    def __init__(self):
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > 1


def metric_names(ctx) -> set[str]:
    return {e["name"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "metric"}


@pytest.mark.train
def test_sft_saves_an_adapter_and_reports(trained):
    cfg, contexts, _ = trained
    adapter = Path(cfg.train.sft.save_path)
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer_config.json").exists()
    assert {"loss", "lr", "eval_loss"} <= metric_names(contexts["sft"])
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["r"] == cfg.train.sft.peft.lora.r


@pytest.mark.train
def test_sft_trains_on_the_answer_only(trained):
    """TRL's completion mask covers exactly the assistant's answer, never the system prompt or question."""
    cfg, _, root = trained
    setup = sft.prepare(make_context(cfg, "sft", root))
    example = setup.trainer.train_dataset[0]
    ids = example["input_ids"]
    mask = [label != -100 for label in example["labels"]]
    tokenizer = setup.tokenizer
    answer = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    prompt = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert (
        "<|im_start|>system" in prompt and "<|im_start|>user" in prompt and prompt.endswith("<|im_start|>assistant\n")
    )
    assert "<|im_start|>" not in answer and answer.rstrip().endswith("<|im_end|>")
    assert 0 < sum(mask) < len(ids)


@pytest.mark.train
def test_sft_loads_the_assistant_in_4bit(trained):
    cfg, _, root = trained
    setup = sft.prepare(make_context(cfg, "sft", root))
    model = setup.trainer.model
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.train
def test_distill_trains_kd_student_and_ce_control(trained):
    cfg, contexts, _ = trained
    out = Path(cfg.train.distillation.output_dir)
    assert cfg.train.distillation.student_init == "pretrained" and cfg.student.base_model_name == "tiny:student"
    base = json.loads((Path(resolve_model_path("tiny:student")) / "config.json").read_text())
    for folder in (out, Path(f"{out}_ce")):
        assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        saved = json.loads((folder / "config.json").read_text())
        assert saved["hidden_size"] == base["hidden_size"] and saved["num_hidden_layers"] == base["num_hidden_layers"]
        assert saved["student_init"] == "pretrained" and saved["student_base_model"] == "tiny:student"
    events = read_events(contexts["distill"].stage_dir / "events.jsonl")
    names = metric_names(contexts["distill"])
    assert {"loss", "ce_loss", "kd_loss", "lr", "tokens_per_s"} <= names
    assert {"control/loss", "control/ce_loss", "control/kd_loss"} <= names
    assert all(e["value"] == 0 for e in events if e["kind"] == "metric" and e["name"] == "control/kd_loss")
    assert any(e["value"] > 0 for e in events if e["kind"] == "metric" and e["name"] == "kd_loss")
    assert any(e["kind"] == "memory" for e in events)


@pytest.mark.train
def test_eval_reports_every_model(trained):
    cfg, contexts, _ = trained
    report = json.loads((contexts["eval"].stage_dir / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "assistant_base", "assistant", "student_kd", "student_ce"]
    assert report["code"]["benchmark"] == "tiny-python" and report["code"]["problems"] == 12
    for name, numbers in report["models"].items():
        assert 0 <= numbers["pass@1"] <= 1
        assert len(Path(numbers["code_results"]).read_text().splitlines()) == 12
        if name == "teacher":  # its own tokenizer: only the code benchmark compares it
            continue
        assert math.isfinite(numbers["loss"]) and numbers["perplexity"] > 1 and numbers["tokens"] > 0
        assert math.isclose(numbers["perplexity"], math.exp(numbers["loss"]), rel_tol=1e-3)
    assert report["models"]["assistant"]["kl_to_assistant"] == 0
    assert report["models"]["assistant_base"]["kl_to_assistant"] > 0  # the adapter changed the assistant
    assert report["models"]["assistant_base"]["path"] == "tiny:assistant"
    assert report["models"]["student_kd"]["kl_to_assistant"] > 0
    assert report["examples"] >= 1


@pytest.mark.train
def test_distill_pretrained_student_with_padded_vocab_and_lora(trained, tmp_path):
    """A pretrained student whose embedding matrix has more (padding) rows than the assistant's, trained
    through LoRA: KD compares the tokenizer's columns, and the saved student is a plain, loadable model."""
    import torch

    cfg, _, root = trained
    tokenizer = load_tokenizer("tiny:student")
    padded = load_causal_lm("tiny:student", dtype=torch.float32)
    rows = len(tokenizer) + 128
    padded.resize_token_embeddings(rows, mean_resizing=False)
    padded.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")

    cfg = cfg.model_copy(deep=True)
    cfg.student.base_model_name = str(tmp_path / "padded")
    cfg.train.distillation.output_dir = str(tmp_path / "student")
    cfg.train.distillation.ce_only_control = False
    cfg.train.distillation.max_steps = 2
    cfg.train.distillation.logging_steps = 1
    cfg.train.distillation.peft = PeftConfig(lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    ctx = make_context(cfg, "distill", root)
    distill.run(ctx)

    logs = [e["msg"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "log"]
    assert any(f"KD over {len(tokenizer)} token columns" in m and "LoRA r=4" in m for m in logs), logs
    assert any(
        e["name"] == "kd_loss" and e["value"] > 0
        for e in read_events(ctx.stage_dir / "events.jsonl")
        if e["kind"] == "metric"
    )
    out = tmp_path / "student"
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    student = load_causal_lm(str(out), dtype=torch.float32)  # as eval loads it: LoRA merged in
    assert student.get_input_embeddings().num_embeddings == rows
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(student.state_dict()[name], padded.state_dict()[name])  # the LoRA update is in
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(student.state_dict()[name], padded.state_dict()[name])  # not targeted: unchanged


@pytest.mark.train
def test_bf16_distill_saves_a_bf16_student_that_eval_loads_in_bf16(trained, tmp_path, monkeypatch):
    """`train.distillation.bf16: true`: the student trains under bf16 autocast (fp32 master weights) and is
    saved in bf16, the precision it was trained for; the eval stage loads it in bf16 too."""
    import torch
    from safetensors import safe_open

    cfg, _, root = trained
    cfg = cfg.model_copy(deep=True)
    kd = cfg.train.distillation
    kd.bf16, kd.max_steps, kd.ce_only_control = True, 2, False
    kd.output_dir = str(tmp_path / "student")
    cfg.eval.code.benchmark = "none"
    distill.run(make_context(cfg, "distill", root))
    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"BF16"}

    loaded: dict[str, torch.dtype] = {}
    real = eval_stage.load_causal_lm

    def recording(name, *args, key=None, dtype=None, **kwargs):
        loaded[key] = dtype
        return real(name, *args, key=key, dtype=dtype, **kwargs)

    monkeypatch.setattr(eval_stage, "load_causal_lm", recording)
    eval_stage.run(make_context(cfg, "eval", root))
    assert loaded.get("student_kd") == torch.bfloat16, loaded


def test_pick_dtype_follows_the_config_and_the_device(monkeypatch):
    """bfloat16 where the device has it, float16 on a GPU without it (V100/T4, as TAS did), float32 when
    the config asks for full precision."""
    import torch

    from engine.models.device import pick_dtype

    assert pick_dtype(True, torch.device("cpu")) == torch.bfloat16
    assert pick_dtype(False, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_dtype(True, torch.device("cuda", 0)) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype(True, torch.device("cuda", 0)) == torch.bfloat16
    assert pick_dtype(False, torch.device("cuda", 0)) == torch.float32


def test_distill_logs_and_seeds_as_sft_unless_its_own_keys_say(tmp_path, monkeypatch):
    """train.distillation.{logging_steps,seed} left out: distill's trainer gets train.sft's (logging capped
    at 50); set: its own. Only the TrainingArguments are built, nothing trains."""
    import torch

    class Built(Exception):
        pass

    seen = []

    def training_arguments(**kwargs):
        seen.append((kwargs["logging_steps"], kwargs["seed"]))
        raise Built

    monkeypatch.setattr(distill, "TrainingArguments", training_arguments)
    cfg = load_config(TINY_CONFIG)
    cfg.train.sft.logging_steps, cfg.train.sft.dataset.seed = 70, 3
    for own in (False, True):
        if own:
            cfg.train.distillation.logging_steps, cfg.train.distillation.seed = 4, 11
        ctx = make_context(cfg, "distill", tmp_path)
        with pytest.raises(Built):
            distill.train_one(
                ctx, "KD student", None, None, None, [], [], tmp_path, 0.3, 8, 1.0, torch.device("cpu"), ""
            )
    assert seen == [(50, 3), (4, 11)]


@pytest.mark.train
def test_sft_resumes_from_its_newest_checkpoint(trained, tmp_path, monkeypatch):
    """A crash after checkpoint-2 (the process dies: no final save); the re-run continues from step 2."""
    from engine.train import callbacks as training

    cfg, _, root = trained
    cfg = cfg.model_copy(deep=True)
    cfg.train.sft.save_path = str(tmp_path / "adapter")
    cfg.train.sft.save_steps = 2
    cfg.train.sft.max_steps = 5

    class Crash(Exception):
        pass

    real_step_end = training.EventsCallback.on_step_end

    def crash_at_step_3(self, args, state, control, **kwargs):
        real_step_end(self, args, state, control, **kwargs)
        if state.global_step == 3:
            raise Crash("the machine went away")

    monkeypatch.setattr(training.EventsCallback, "on_step_end", crash_at_step_3)
    with pytest.raises(Crash):
        sft.run(make_context(cfg, "sft", root))
    assert (tmp_path / "adapter" / "checkpoints" / "checkpoint-2").exists()
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()
    monkeypatch.setattr(training.EventsCallback, "on_step_end", real_step_end)
    ctx = make_context(cfg, "sft", root)
    sft.run(ctx)
    events = read_events(ctx.stage_dir / "events.jsonl")
    steps = [e["done"] for e in events if e["kind"] == "progress"]
    assert steps[0] == 2 and steps[-1] == 5  # continues, does not restart
    assert any("resuming from" in e.get("msg", "") and "checkpoint-2" in e["msg"] for e in events if e["kind"] == "log")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.train
def test_cancel_saves_a_checkpoint_then_resume(trained, tmp_path):
    cfg, _, root = trained
    cfg = cfg.model_copy(deep=True)
    cfg.train.distillation.output_dir = str(tmp_path / "student")
    cfg.train.distillation.ce_only_control = False
    cfg.train.distillation.max_steps = 4
    ctx = make_context(cfg, "distill", root)
    ctx.cancel_event = SigtermDuringTraining()
    with pytest.raises(StageCancelled, match="checkpoint saved"):
        distill.run(ctx)
    assert (tmp_path / "student" / "checkpoints" / "checkpoint-1").exists()
    assert not (tmp_path / "student" / "model.safetensors").exists()
    ctx = make_context(cfg, "distill", root)
    distill.run(ctx)
    steps = [e["done"] for e in read_events(ctx.stage_dir / "events.jsonl") if e["kind"] == "progress"]
    assert steps[0] == 1 and steps[-1] == 4
    assert (tmp_path / "student" / "model.safetensors").exists()


@pytest.mark.train
def test_merged_adapter_matches_base_plus_adapter(trained, tmp_path):
    import torch
    from peft import PeftModel

    from engine.models.loading import load_causal_lm, load_tokenizer

    cfg, _, root = trained
    adapter = Path(cfg.train.sft.save_path)
    sft.merge_adapter(make_context(cfg, "sft", root), adapter, tmp_path / "merged")
    tokenizer = load_tokenizer(str(tmp_path / "merged"))
    batch = tokenizer(["def add(a, b):", "Reverse a list in place"], return_tensors="pt", padding=True)
    merged = load_causal_lm(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(
        load_causal_lm(cfg.assistant.model.name, dtype=torch.float32), adapter
    ).eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, with_adapter(**batch).logits, atol=1e-4)


@pytest.mark.train
def test_trust_remote_code_stays_off_unless_configured(trained, monkeypatch):
    from engine.teacher import open as teacher_open

    cfg, _, root = trained
    seen = []

    def fake_load(name, key="model", **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(teacher_open, "load_causal_lm", fake_load)
    for flag in (False, True):
        cfg = cfg.model_copy(deep=True)
        cfg.teacher.open.model.trust_remote_code = flag
        ctx = make_context(cfg, "teacher", root)
        with pytest.raises(RuntimeError, match="stop here"):
            teacher_open.load_teacher(ctx)
        warned = any("trust_remote_code is on" in e.get("msg", "") for e in read_events(ctx.stage_dir / "events.jsonl"))
        assert warned is flag
    assert seen == [False, True]


@pytest.mark.train
def test_a_finished_training_run_again_trains_anew(trained, tmp_path):
    cfg, _, root = trained
    cfg = cfg.model_copy(deep=True)
    cfg.train.sft.save_path = str(tmp_path / "adapter")
    cfg.train.sft.max_steps = 2
    sft.run(make_context(cfg, "sft", root))
    ctx = make_context(cfg, "sft", root)
    sft.run(ctx)
    events = read_events(ctx.stage_dir / "events.jsonl")
    assert [e["done"] for e in events if e["kind"] == "progress"][0] == 0  # from step 0, not resumed
    assert any("training again" in e.get("msg", "") for e in events if e["kind"] == "log")
    cfg.train.sft.overwrite_output_dir = False
    with pytest.raises(StageError, match=r"already trained to the end .* train\.sft\.overwrite_output_dir: true"):
        sft.run(make_context(cfg, "sft", root))


def test_pick_device_fixes_the_cpu_threads_when_the_config_says(monkeypatch):
    """`device.cpu_threads` (the tiny profile: 2) sets torch's threads, so a CPU run is repeatable anywhere;
    unset, torch keeps its own choice."""
    import torch

    from engine.models.device import pick_device

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cfg = load_config(TINY_CONFIG)
    assert cfg.device.cpu_threads == 2
    assert pick_device(cfg) == torch.device("cpu") and calls == [2]
    cfg.device.cpu_threads = None
    pick_device(cfg)
    assert calls == [2]


@pytest.mark.train
def test_a_cached_teacher_is_built_once_on_two_gloo_ranks_reused_on_resume_rebuilt_when_made_differently(
    trained, tmp_path, monkeypatch
):
    """teacher_cache.mode topk: rank 0 builds the cache while rank 1 waits and both train from it; the stage
    again (resume, 1 rank) reuses the file and never loads the assistant; a changed k rebuilds it, saying why,
    and distill trains without loading the assistant beyond the cache's one pass."""
    from engine.runner import launcher
    from engine.runner.context import StageContext
    from engine.store.events import EventWriter
    from engine.store.runs import RunStore
    from engine.train import teacher_cache

    from .helpers import wait_for

    cfg, _, root = trained
    cfg = cfg.model_copy(deep=True)
    kd = cfg.train.distillation
    kd.max_steps, kd.logging_steps, kd.ce_only_control = 2, 1, False
    kd.output_dir = str(tmp_path / "student")
    kd.knowledgedistillation.teacher_cache.mode = "topk"
    kd.knowledgedistillation.teacher_cache.k = 8
    cfg.launch.nproc_per_node, cfg.device.cpu_threads = 2, 1
    run = RunStore(root / "runs").create(cfg, "test.yaml", workdir=str(root))
    launcher.start(run, ["distill"])
    wait_for(lambda: not run.is_live(), timeout=600, interval=1, what="the 2-rank distill to end")
    events = read_events(run.stage_dir("distill") / "events.jsonl")
    status = [e for e in events if e["kind"] == "status"][-1]
    assert status["state"] == "done", (run.stage_dir("distill") / "worker.log").read_text()[-3000:]
    assert [e["world_size"] for e in events if e.get("state") == "running"] == [2]
    assert read_events(run.stage_dir("distill") / "events.rank1.jsonl")[-1]["state"] == "done"
    assert any(e["kind"] == "log" and "teacher cache (topk): building" in e["msg"] for e in events)
    mass = [e["value"] for e in events if e["kind"] == "metric" and e["name"] == "teacher_cache_mass"]
    assert len(mass) == 1 and 0 < mass[0] <= 1
    assert any(e["kind"] == "metric" and e["name"] == "kd_loss" and e["value"] > 0 for e in events)
    data_file = run.stage_dir("distill") / "teacher_cache" / teacher_cache.DATA_FILE
    built = data_file.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the assistant was loaded")

    real = teacher_cache.load_tuned_assistant
    monkeypatch.setattr(distill, "load_tuned_assistant", refuse)
    monkeypatch.setattr(teacher_cache, "load_tuned_assistant", refuse)
    cfg.launch.nproc_per_node = 1
    ctx = StageContext("distill", run, cfg, EventWriter(run.stage_dir("distill") / "events.jsonl"))
    distill.run(ctx)  # the stage again, as a resume runs it: the cache is reused
    assert data_file.stat().st_mtime_ns == built
    assert any(e["kind"] == "log" and "reused" in e["msg"] for e in read_events(ctx.stage_dir / "events.jsonl"))

    monkeypatch.setattr(teacher_cache, "load_tuned_assistant", real)  # the cache pass alone may load it
    kd.knowledgedistillation.teacher_cache.k = 4
    kd.max_steps = 1
    distill.run(ctx)
    assert data_file.stat().st_mtime_ns != built
    assert any(
        e["kind"] == "log" and "building" in e["msg"] and "k 8 -> 4" in e["msg"]
        for e in read_events(ctx.stage_dir / "events.jsonl")
    )
    assert (tmp_path / "student" / "model.safetensors").exists()
