"""Config schema: the original TAS file loads unchanged; bad files fail with key path and line; saves are atomic."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import yaml

from engine.config.edit import save_config_text
from engine.config.errors import ConfigError
from engine.config.keys import flatten, get_key, set_key
from engine.config.load import load_config, parse_config
from engine.config.prompts import load_system_prompts
from engine.config.schema import DistillationConfig, ExperimentConfig, SftConfig, TASConfig
from engine.core import fsio as config_module

from .helpers import ROOT, SEED_CONFIG


def test_seed_config_loads_unchanged_with_correct_types(seed_config_path: Path):
    before = hashlib.sha256(seed_config_path.read_bytes()).hexdigest()
    cfg = load_config(seed_config_path)
    assert hashlib.sha256(seed_config_path.read_bytes()).hexdigest() == before

    # PyYAML reads 1e-4 / 5e-5 as strings; the schema makes them floats
    assert yaml.safe_load(seed_config_path.read_text())["train"]["sft"]["learning_rate"] == "1e-4"
    assert cfg.train.sft.learning_rate == pytest.approx(1e-4) and isinstance(cfg.train.sft.learning_rate, float)
    assert cfg.train.distillation.learning_rate == pytest.approx(5e-5)
    # the pre-2024 key name is accepted
    assert cfg.train.distillation.eval_strategy == "epoch"
    assert cfg.train.sft.eval_strategy == "no"
    # a sample of every section, with the types the code relies on
    assert cfg.device.type == "auto"
    assert cfg.cuda.allow_tf32 is True
    assert cfg.teacher.base.prompt_length == 17
    assert cfg.teacher.open.model.trust_remote_code is True  # the seed says so, and that is honoured
    assert cfg.teacher.open.pipeline.use_cache is False
    assert cfg.teacher.open.pipeline.batch_size == 256
    assert cfg.teacher.open.tokenizer.additional_special_tokens == ["<|im_end|>"]
    assert cfg.teacher.open.data.download.size == "64k"
    assert cfg.teacher.closed.model.name == "gpt-3.5-turbo"
    assert cfg.assistant.quantization.bnb_4bit_quant_type == "nf4"
    assert cfg.assistant.lora.lora_r == 8
    assert cfg.student.hidden_size == 1280 and cfg.student.num_attention_heads == 20
    assert cfg.train.sft.peft.lora.target_modules == "all-linear"
    assert cfg.train.sft.peft.lora.modules_to_save == ["lm_head", "embed_token"]
    assert cfg.train.sft.experiment.dataset_tags == {"version": "v1", "source": "prompts"}
    assert cfg.train.distillation.knowledgedistillation.weight == pytest.approx(0.3)
    assert cfg.train.distillation.knowledgedistillation.loss.reduction == "batchmean"
    assert [d.name for d in cfg.datasets] == [
        "nikhiljatiwal/Llama-3.2-Python-Alpaca-143k",
        "jtatman/python-code-dataset-500k",
    ]
    assert cfg.datasets[0].external_local_path is None
    # sections the panel added get defaults
    assert cfg.launch.nproc_per_node == 1
    assert cfg.panel.runs_dir == "runs"


@pytest.mark.parametrize("name", ["config.yaml", "configs/tiny.yaml"])
def test_shipped_user_editable_config_is_valid(name: str):
    """The only test that reads the checkout's own config files (users edit them in the panel): whatever
    values they hold, they must still load. Every other test uses the pristine copies in tests/data/."""
    assert isinstance(load_config(ROOT / name), TASConfig)


def test_shipped_user_editable_prompt_file_is_valid():
    assert isinstance(load_system_prompts(ROOT / "prompt.yaml"), dict)


def test_frozen_yaml_round_trips(seed_config_path: Path):
    cfg = load_config(seed_config_path)
    again = parse_config(cfg.to_yaml())
    assert again == cfg
    assert isinstance(again, TASConfig)


# ------------------------------------------------------------- TAS keys and OmegaConf-style references


def test_seed_config_gets_the_tas_defaults_of_the_added_keys(seed_config_path: Path):
    cfg = load_config(seed_config_path)
    assert cfg.train.sft.peft.lora.bias == "none"
    assert cfg.train.distillation.logging_steps is None  # unset: distill falls back to train.sft.logging_steps


def test_sft_and_distillation_keep_their_keys_and_defaults():
    """The two sections share their trainer keys through one base class: the YAML keys and defaults
    of each stay what they were (only `train.distillation.seed` is new)."""
    shared = {
        "num_train_epochs": 11,
        "max_steps": -1,
        "gradient_accumulation_steps": 2,
        "report_to": "none",
        "overwrite_output_dir": True,
        "save_steps": 10000,
    }
    sft, kd = SftConfig(), DistillationConfig()
    sft_scalars = {
        **shared,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-4,
        "eval_strategy": "no",
        "model_name": "Assistant",
        "save_path": ".model/assistant/Assistant",
        "bfloat16": False,
        "fp16": True,
        "logging_steps": 1000,
        "merge_adapter": False,
    }
    kd_scalars = {
        **shared,
        "per_device_train_batch_size": 12,
        "learning_rate": 5e-5,
        "eval_strategy": "epoch",
        "output_dir": ".model/student/Student",
        "bf16": True,
        "run_name": "KnowledgeDistillation",
        "student_init": "random",
        "peft": None,
        "logging_steps": None,
        "seed": None,
        "ce_only_control": False,
        "loss_chunk_size": 1024,
        "max_length": 1024,
        "fsdp": False,
        "gradient_checkpointing": False,
    }
    assert set(SftConfig.model_fields) == set(sft_scalars) | {"experiment", "dataset", "tokenizer", "peft"}
    assert set(DistillationConfig.model_fields) == set(kd_scalars) | {"experiment", "knowledgedistillation"}
    assert {k: getattr(sft, k) for k in sft_scalars} == sft_scalars
    assert {k: getattr(kd, k) for k in kd_scalars} == kd_scalars
    assert sft.experiment == kd.experiment == ExperimentConfig()
    # the old key name of eval_strategy, in both sections (TAS's file uses it in distillation)
    cfg = parse_config(_edit(SEED_CONFIG.read_text(), 'eval_strategy: "no"', 'evaluation_strategy: "steps"'))
    assert cfg.train.sft.eval_strategy == "steps" and cfg.train.distillation.eval_strategy == "epoch"


def test_kd_divergence_defaults_to_forward_kl_and_reads_its_parameter(seed_config_path: Path):
    """The seed file (no divergence key) keeps TAS's forward KL; a chosen divergence, its parameter given the
    way PyYAML reads `1e-4` (a string), becomes a float."""
    loss = load_config(seed_config_path).train.distillation.knowledgedistillation.loss
    assert (loss.divergence, loss.label) == ("forward_kl", "forward_kl")
    text = seed_config_path.read_text().replace(
        'reduction: "batchmean"', 'reduction: "batchmean"\n        divergence: jsd\n        beta: 1e-1'
    )
    assert yaml.safe_load(text)["train"]["distillation"]["knowledgedistillation"]["loss"]["beta"] == "1e-1"
    loss = parse_config(text).train.distillation.knowledgedistillation.loss
    assert loss.divergence == "jsd" and isinstance(loss.beta, float) and loss.label == "jsd(beta=0.1)"


def test_distillation_keys_left_out_follow_sft():
    """distill logs and seeds its trainer as train.sft says unless train.distillation says otherwise."""
    kd = load_config(SEED_CONFIG).train.distillation  # TAS's file: neither key
    assert (kd.effective_logging_steps, kd.effective_seed) == (50, 19)  # sft's 1000 capped at 50; sft's seed

    text = _edit(SEED_CONFIG.read_text(), "    logging_steps: 1000\n", "    logging_steps: 7\n")
    text = _edit(text, "      seed: 19\n", "      seed: 3\n")
    cfg = parse_config(text)
    assert (cfg.train.distillation.effective_logging_steps, cfg.train.distillation.effective_seed) == (7, 3)
    # frozen for a run, the keys stay unset: the run's own sft values decide there too
    assert parse_config(cfg.to_yaml()).train.distillation.logging_steps is None
    # an edit of train.sft after loading still counts, in a copy too
    copy = cfg.model_copy(deep=True)
    copy.train.sft.logging_steps, copy.train.sft.dataset.seed = 2, 5
    assert (copy.train.distillation.effective_logging_steps, copy.train.distillation.effective_seed) == (2, 5)
    assert (cfg.train.distillation.effective_logging_steps, cfg.train.distillation.effective_seed) == (7, 3)

    own = _edit(text, "  distillation:\n", "  distillation:\n    logging_steps: 4\n    seed: 11\n")
    kd = parse_config(own).train.distillation
    assert (kd.logging_steps, kd.seed, kd.effective_logging_steps, kd.effective_seed) == (4, 11, 4, 11)


def _tas_config_with_references() -> str:
    """The seed config as a TAS user could have written it: `${}` references and the two TAS keys the
    loader once refused (`train.distillation.logging_steps`, `train.sft.peft.lora.bias`)."""
    text = SEED_CONFIG.read_text()
    text = _edit(
        text, '  base_model_name: "Qwen/Qwen2.5-Coder-1.5B-Instruct"', "  base_model_name: ${assistant.model.name}"
    )
    text = _edit(text, 'output_dir: ".model/student/Student"', 'output_dir: "${student.save_path}/Student"')
    text = _edit(text, "learning_rate: 5e-5", "learning_rate: ${train.sft.learning_rate}")
    text = _edit(
        text,
        '    save_steps: 10000\n    report_to: "mlflow"\n    run_name',
        '    save_steps: 10000\n    logging_steps: ${train.sft.save_steps}\n    report_to: "mlflow"\n    run_name',
    )
    text = _edit(
        text,
        '        task_type: "CAUSAL_LM"\n  distillation:',
        '        task_type: "CAUSAL_LM"\n        bias: "lora_only"\n  distillation:',
    )
    text = _edit(text, '      run_name: "KD‑Student"', "      run_name: ${.name}-${..run_name}")
    text = _edit(
        text,
        "    max_new_tokens: 1024\n\nstudent:",
        "    max_new_tokens: ${teacher.open.pipeline.max_new_tokens}\n\nstudent:",
    )
    text = _edit(text, "      use_cache: False", "      use_cache: ${assistant.quantization.load_in_4bit}")
    text = _edit(
        text,
        '  - name: "jtatman/python-code-dataset-500k"\n    key: "instruction"',
        '  - name: "jtatman/python-code-dataset-500k"\n    key: ${datasets[0].key}',
    )
    return text


def test_tas_config_with_references_and_the_tas_keys_loads_resolved():
    text = _tas_config_with_references()
    cfg = parse_config(text, source="tas.yaml")
    assert cfg.student.base_model_name == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert cfg.train.distillation.output_dir == ".model/student/Student"  # interpolated inside a string
    # a whole-value reference keeps the type: an int, a bool, and "1e-4" (a string to PyYAML) becomes a float
    assert cfg.train.distillation.logging_steps == 10000
    assert cfg.assistant.inference.max_new_tokens == 1024
    assert cfg.teacher.open.pipeline.use_cache is True
    assert cfg.train.distillation.learning_rate == pytest.approx(1e-4)
    assert isinstance(cfg.train.distillation.learning_rate, float)
    # relative references: `.name` a sibling, `..run_name` a key of the parent section
    assert cfg.train.distillation.experiment.run_name == "StudentDistillation-KnowledgeDistillation"
    assert cfg.datasets[1].key == "instruction"
    assert cfg.train.sft.peft.lora.bias == "lora_only"
    # what a run freezes is resolved, and loads back to the same config
    frozen = cfg.to_yaml()
    assert "${" not in frozen
    assert parse_config(frozen) == cfg


def test_a_reference_to_a_section_copies_it():
    text = _edit(
        SEED_CONFIG.read_text(),
        '  closed:\n    model:\n      name: "gpt-3.5-turbo"\n    pipeline:\n      temperature: 0.7\n      top_p: 0.9\n      batch_size: 1024\n    data:\n      download:\n        size: 64k',
        '  closed:\n    model:\n      name: "gpt-3.5-turbo"\n    pipeline:\n      temperature: 0.7\n      top_p: 0.9\n      batch_size: 1024\n    data: ${teacher.open.data}',
    )
    text = _edit(text, "      download:\n        size: 64k\n  closed:", "      download:\n        size: 32k\n  closed:")
    cfg = parse_config(text)
    assert cfg.teacher.closed.data.download.size == "32k"


def test_escaped_reference_stays_literal_and_survives_freezing():
    text = _edit(SEED_CONFIG.read_text(), 'run_name: "KnowledgeDistillation"', r"run_name: 'kd-\${student.repo}'")
    cfg = parse_config(text)
    assert cfg.train.distillation.run_name == "kd-${student.repo}"
    assert parse_config(cfg.to_yaml()) == cfg


REFERENCE_ERRORS = [
    # (id, old, new, key path in the message, needle whose line the message names, a fragment of the message)
    (
        "missing key",
        'output_dir: ".model/student/Student"',
        'output_dir: "${student.save_pth}/Student"',
        "train.distillation.output_dir",
        "save_pth",
        "student.save_pth is not in the config",
    ),
    (
        "missing section",
        "learning_rate: 5e-5",
        "learning_rate: ${train.kd.learning_rate}",
        "train.distillation.learning_rate",
        "train.kd",
        "train.kd is not in the config",
    ),
    (
        "two-key cycle",
        'save_path: ".model/student"\n  hidden_size',
        "save_path: ${train.distillation.output_dir}\n  hidden_size",
        "train.distillation.output_dir",
        'output_dir: "${student',
        "reference cycle: student.save_path → train.distillation.output_dir → student.save_path",
    ),
    (
        "self reference",
        "top_k: 100",
        "top_k: ${teacher.open.pipeline.top_k}",
        "teacher.open.pipeline.top_k",
        "top_k: ${",
        "reference cycle",
    ),
    (
        "unclosed",
        "top_k: 100",
        "top_k: ${teacher.open.pipeline.top_p",
        "teacher.open.pipeline.top_k",
        "top_k: ${",
        "unclosed",
    ),
    ("resolver", "top_k: 100", "top_k: ${oc.env:TOP_K}", "teacher.open.pipeline.top_k", "top_k: ${", "resolvers"),
    (
        "section in text",
        "top_k: 100",
        "top_k: k${teacher.base}",
        "teacher.open.pipeline.top_k",
        "top_k: k",
        "is a section",
    ),
]


@pytest.mark.parametrize("case", REFERENCE_ERRORS, ids=[c[0] for c in REFERENCE_ERRORS])
def test_bad_reference_names_key_file_and_line(case):
    _, old, new, key, needle, fragment = case
    text = _edit(SEED_CONFIG.read_text(), old, new)
    if case[0] == "two-key cycle":  # the second half of the cycle; it is named where the cycle closes
        text = _edit(text, 'output_dir: ".model/student/Student"', 'output_dir: "${student.save_path}/Student"')
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="cfg.yaml")
    message = str(info.value)
    assert message.startswith("cfg.yaml: ")
    assert f"line {_line_of(text, needle)}: {key}: " in message
    assert fragment in message
    assert len(info.value.issues) == 1  # one cause, one issue (no echo from keys that use the broken one)


def test_reference_errors_are_reported_by_load_config_too(tmp_path: Path):
    path = tmp_path / "c.yaml"
    text = _edit(SEED_CONFIG.read_text(), "top_k: 100", "top_k: ${nowhere}")
    path.write_text(text)
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(path))}: line {_line_of(text, 'nowhere')}: "
        r"teacher\.open\.pipeline\.top_k: \$\{nowhere\}: nowhere is not in the config",
    ):
        load_config(path)


EMPTY_NAMES = [
    ("teacher.open.model.name", '"stabilityai/stable-code-instruct-3b"', '""'),
    ("teacher.closed.model.name", '"gpt-3.5-turbo"', '"  "'),
    ("assistant.model.name", 'name: "Qwen/Qwen2.5-Coder-1.5B-Instruct"\n    save_path', 'name: ""\n    save_path'),
    ("student.base_model_name", 'base_model_name: "Qwen/Qwen2.5-Coder-1.5B-Instruct"', 'base_model_name: ""'),
    ("datasets[1].name", '"jtatman/python-code-dataset-500k"', "''"),
]


@pytest.mark.parametrize("key, old, new", EMPTY_NAMES, ids=[c[0] for c in EMPTY_NAMES])
def test_empty_model_name_is_refused_at_load_naming_key_and_line(key: str, old: str, new: str):
    text = _edit(SEED_CONFIG.read_text(), old, new)
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="cfg.yaml")
    message = str(info.value)
    assert len(info.value.issues) == 1
    line = text[: text.index(new)].count("\n") + 1
    assert f"cfg.yaml: line {line}: {key}: is empty" in message


def test_a_reference_that_resolves_to_an_empty_name_is_refused_too():
    text = _edit(
        SEED_CONFIG.read_text(),
        '  closed:\n    model:\n      name: "gpt-3.5-turbo"',
        "  closed:\n    base_url: ''\n    model:\n      name: ${teacher.closed.base_url}",
    )
    with pytest.raises(ConfigError, match=r"teacher\.closed\.model\.name: is empty") as info:
        parse_config(text)
    assert len(info.value.issues) == 1


# ------------------------------------------------------------------------------------- bad configs


def _edit(seed_text: str, old: str, new: str) -> str:
    assert old in seed_text, old
    return seed_text.replace(old, new, 1)


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


BAD_CONFIGS = [
    # (id, old, new, key path expected in the message, needle whose line the message names)
    (
        "wrong type float",
        "learning_rate: 1e-4",
        "learning_rate: fast",
        "train.sft.learning_rate",
        "learning_rate: fast",
    ),
    ("wrong type int", "batch_size: 256", "batch_size: lots", "teacher.open.pipeline.batch_size", "batch_size: lots"),
    ("wrong type bool", "use_cache: False", "use_cache: maybe", "teacher.open.pipeline.use_cache", "use_cache: maybe"),
    ("unknown key", "top_k: 100", "top_k: 100\n      top_kk: 5", "teacher.open.pipeline.top_kk", "top_kk"),
    ("negative size", "hidden_size: 1280", "hidden_size: -1280", "student.hidden_size", "hidden_size: -1280"),
    (
        "bad enum",
        'padding_side: "left"\n    skip',
        'padding_side: "middle"\n    skip',
        "assistant.tokenizer.padding_side",
        '"middle"',
    ),
    (
        "bad quant type",
        'bnb_4bit_quant_type: "nf4"',
        'bnb_4bit_quant_type: "int3"',
        "assistant.quantization.bnb_4bit_quant_type",
        "int3",
    ),
    (
        "weight out of range",
        "weight: 0.3",
        "weight: 1.5",
        "train.distillation.knowledgedistillation.weight",
        "weight: 1.5",
    ),
    (
        "list expected",
        'modules_to_save: [ "lm_head", "embed_token" ]',
        "modules_to_save: 7",
        "train.sft.peft.lora.modules_to_save",
        "modules_to_save: 7",
    ),
    (
        "dataset entry",
        'key: "instruction"\n    subset: "default"\n    external_local_path: null\n  - name: "jtatman',
        'kye: "instruction"\n    subset: "default"\n    external_local_path: null\n  - name: "jtatman',
        "datasets[0].kye",
        "kye",
    ),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_value_names_key_and_line(seed_config_path: Path, case):
    _, old, new, key, needle = case
    text = _edit(seed_config_path.read_text(), old, new)
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="cfg.yaml")
    message = str(info.value)
    assert key in message
    assert f"line {_line_of(text, needle)}" in message
    assert message.startswith("cfg.yaml")


def test_missing_section_is_named(seed_config_path: Path):
    data = yaml.safe_load(seed_config_path.read_text())
    del data["student"]
    with pytest.raises(ConfigError, match=r"student: missing section"):
        parse_config(yaml.safe_dump(data))


def test_missing_required_key_is_named(seed_config_path: Path):
    text = _edit(
        seed_config_path.read_text(),
        '    name: "Qwen/Qwen2.5-Coder-1.5B-Instruct"\n    save_path: ".model/assistant/base"\n',
        '    save_path: ".model/assistant/base"\n',
    )
    with pytest.raises(ConfigError, match=r"assistant\.model\.name: missing"):
        parse_config(text)


def test_yaml_syntax_error_names_line(seed_config_path: Path):
    text = _edit(seed_config_path.read_text(), "top_p: 0.95", "top_p: [0.95")
    with pytest.raises(ConfigError, match=r"YAML syntax error") as info:
        parse_config(text)
    assert "line " in str(info.value)


def test_duplicate_key_is_an_error(seed_config_path: Path):
    text = _edit(seed_config_path.read_text(), "top_k: 100", "top_k: 100\n      top_k: 5")
    with pytest.raises(ConfigError, match=r"teacher\.open\.pipeline\.top_k: duplicate key") as info:
        parse_config(text)
    assert f"line {_line_of(text, 'top_k: 5')}" in str(info.value)


def test_non_utf8_bytes(tmp_path: Path, seed_config_path: Path):
    path = tmp_path / "c.yaml"
    path.write_bytes(seed_config_path.read_bytes().replace(b"gpt-3.5-turbo", b"gpt-\xff-turbo"))
    with pytest.raises(ConfigError, match=r"not UTF-8.*0xff") as info:
        load_config(path)
    expected = seed_config_path.read_bytes().split(b"gpt-3.5-turbo")[0].count(b"\n") + 1
    assert f"line {expected}" in str(info.value)


@pytest.mark.parametrize(
    "text, fragment",
    [("", "empty"), ("- a\n- b\n", "top level must be a mapping"), ("just a string", "top level must be a mapping")],
)
def test_degenerate_files(text: str, fragment: str):
    with pytest.raises(ConfigError, match=fragment):
        parse_config(text)


def test_huge_file_is_refused_before_parsing(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# x\n" * 400_000)
    with pytest.raises(ConfigError, match=r"wrong file"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/config.yaml")


# ------------------------------------------------------------------------------------------ saving


def test_save_is_atomic_and_keeps_a_backup(tmp_path: Path, seed_config_path: Path):
    path = tmp_path / "config.yaml"
    original = seed_config_path.read_text()
    path.write_text(original)
    edited = original.replace("top_k: 100", "top_k: 40")
    cfg = save_config_text(path, edited)
    assert cfg.teacher.open.pipeline.top_k == 40
    assert path.read_text() == edited
    assert (tmp_path / "config.yaml.bak").read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "config.yaml.bak"]


def test_invalid_edit_never_replaces_a_valid_file(tmp_path: Path, seed_config_path: Path):
    path = tmp_path / "config.yaml"
    original = seed_config_path.read_text()
    path.write_text(original)
    with pytest.raises(ConfigError, match="top_k"):
        save_config_text(path, original.replace("top_k: 100", "top_k: many"))
    assert path.read_text() == original
    assert not (tmp_path / "config.yaml.bak").exists()


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failure_mid_save_leaves_old_file_intact(tmp_path: Path, seed_config_path: Path, monkeypatch, failing: str):
    path = tmp_path / "config.yaml"
    original = seed_config_path.read_text()
    path.write_text(original)
    real_replace = os.replace

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if failing == "fsync":
        monkeypatch.setattr(config_module.os, "fsync", boom)
    else:
        # the backup rename succeeds, the rename of the new file fails
        def replace_second(src, dst):
            if str(dst).endswith("config.yaml"):
                boom()
            return real_replace(src, dst)

        monkeypatch.setattr(config_module.os, "replace", replace_second)
    with pytest.raises(OSError, match="No space left"):
        save_config_text(path, original.replace("top_k: 100", "top_k: 40"))
    assert path.read_text() == original
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# ------------------------------------------------------------------- a table of malformed configs


def _seed_text() -> str:
    return SEED_CONFIG.read_text()


def _replaced(section: str, value) -> str:
    data = yaml.safe_load(_seed_text())
    data[section] = value
    return yaml.safe_dump(data)


def _without(section: str) -> str:
    data = yaml.safe_load(_seed_text())
    del data[section]
    return yaml.safe_dump(data)


# One edit of the seed config a row (left unformatted, as a table): (id, a text of the seed config, what
# replaces it, a fragment the message must contain).
# fmt: off
SEED_EDITS = [
    ("lr not a number", "learning_rate: 1e-4", "learning_rate: fast", "train.sft.learning_rate"),
    ("lr negative", "learning_rate: 1e-4", "learning_rate: -1e-4", "train.sft.learning_rate"),
    ("epochs zero", "num_train_epochs: 11\n    per_device_train_batch_size: 8", "num_train_epochs: 0\n    per_device_train_batch_size: 8", "train.sft.num_train_epochs"),
    ("batch size text", "per_device_train_batch_size: 8", "per_device_train_batch_size: eight", "train.sft.per_device_train_batch_size"),
    ("batch size float", "batch_size: 256", "batch_size: 2.5", "teacher.open.pipeline.batch_size"),
    ("max_new_tokens negative", "max_new_tokens: 1024\n      temperature", "max_new_tokens: -1\n      temperature", "teacher.open.pipeline.max_new_tokens"),
    ("top_p above one", "top_p: 0.95", "top_p: 1.5", "teacher.open.pipeline.top_p"),
    ("temperature negative", "temperature: 0.5", "temperature: -0.5", "teacher.open.pipeline.temperature"),
    ("use_cache not bool", "use_cache: False", "use_cache: sometimes", "teacher.open.pipeline.use_cache"),
    ("device enum", 'type: "auto"', 'type: "tpu"', "device.type"),
    ("padding side enum", 'padding_side: "left"\n      add_generation_prompt', 'padding_side: "up"\n      add_generation_prompt', "teacher.open.tokenizer.padding_side"),
    ("quant type enum", 'bnb_4bit_quant_type: "nf4"', 'bnb_4bit_quant_type: "int4"', "assistant.quantization.bnb_4bit_quant_type"),
    ("lora bias enum", 'bias: "none"', 'bias: "some"', "assistant.lora.bias"),
    ("eval strategy enum", 'evaluation_strategy: "epoch"', 'evaluation_strategy: "sometimes"', "train.distillation.evaluation_strategy"),
    ("report_to enum", 'report_to: "mlflow"\n    overwrite_output_dir', 'report_to: "excel"\n    overwrite_output_dir', "train.sft.report_to"),
    ("reduction enum", 'reduction: "batchmean"', 'reduction: "median"', "train.distillation.knowledgedistillation.loss.reduction"),
    ("kd weight above one", "weight: 0.3", "weight: 2", "train.distillation.knowledgedistillation.weight"),
    ("temperature zero", "temperature: 0.5\n        reduction", "temperature: 0\n        reduction", "train.distillation.knowledgedistillation.loss.temperature"),
    ("divergence enum", 'reduction: "batchmean"', 'reduction: "batchmean"\n        divergence: "kl"', "train.distillation.knowledgedistillation.loss.divergence: Input should be 'forward_kl', 'reverse_kl', 'jsd', 'skew_kl' or 'tvd'"),
    ("jsd beta above one", 'reduction: "batchmean"', 'reduction: "batchmean"\n        beta: 1.5', "train.distillation.knowledgedistillation.loss.beta"),
    ("skew alpha negative", 'reduction: "batchmean"', 'reduction: "batchmean"\n        alpha: -0.1', "train.distillation.knowledgedistillation.loss.alpha"),
    ("hidden size negative", "hidden_size: 1280", "hidden_size: -1", "student.hidden_size"),
    ("layers zero", "num_hidden_layers: 24", "num_hidden_layers: 0", "student.num_hidden_layers"),
    ("test_size above one", "test_size: 0.1", "test_size: 1.5", "train.sft.dataset.test_size"),
    ("lora dropout one", "lora_dropout: 0.05\n        target_modules", "lora_dropout: 1.0\n        target_modules", "train.sft.peft.lora.lora_dropout"),
    ("special tokens not a list", 'additional_special_tokens: [ "<|im_end|>" ]', "additional_special_tokens: {a: 1}", "teacher.open.tokenizer.additional_special_tokens"),
    ("unknown nested key", "top_k: 100", "top_k: 100\n      beam_width: 3", "teacher.open.pipeline.beam_width"),
    ("typo in section name", "assistant:\n  model:", "asistant:\n  model:", "asistant"),
    ("yaml tab indentation", '  type: "auto"', '\ttype: "auto"', "YAML syntax error"),
    ("yaml unclosed bracket", '[ "<|im_end|>" ]', '[ "<|im_end|>"', "YAML syntax error"),
    ("yaml bad indentation", "    prompt_length: 17", "      prompt_length: 17\n    bad", "YAML syntax error"),
    ("duplicate key", "top_k: 100", "top_k: 100\n      top_k: 5", "duplicate key"),
    ("unresolved reference", "top_k: 100", "top_k: ${teacher.open.pipeline.top_kk}", "teacher.open.pipeline.top_kk is not in the config"),
    ("empty model name", '"stabilityai/stable-code-instruct-3b"', '""', "teacher.open.model.name: is empty"),
]
# fmt: on

MALFORMED = [
    # (id, text, a fragment the message must contain)
    *((name, _seed_text().replace(old, new), fragment) for name, old, new, fragment in SEED_EDITS),
    ("unknown top-level key", _seed_text() + "\nextras:\n  x: 1\n", "extras: unknown key"),
    ("missing section student", _without("student"), "student: missing section"),
    ("missing section teacher", _without("teacher"), "teacher: missing section"),
    ("missing section datasets", _without("datasets"), "datasets: missing section"),
    ("empty datasets list", _seed_text().split("datasets:")[0] + "datasets: []\n", "datasets"),
    ("dataset entry not a mapping", _seed_text().split("datasets:")[0] + "datasets:\n  - just-a-name\n", "datasets[0]"),
    ("section is a list", _replaced("cuda", ["expandable_segments:True"]), "cuda: Input should be a valid dictionary"),
    ("empty file", "", "empty"),
    ("only a comment", "# nothing here\n", "empty"),
    ("top level scalar", "hello\n", "top level must be a mapping"),
    ("top level list", "- a\n- b\n", "top level must be a mapping"),
    ("non-utf8 bytes", _seed_text().encode().replace(b"gpt-3.5-turbo", b"gpt-\xfe-turbo"), "not allowed in YAML"),
    ("huge file", "# padding\n" * 200_000, "larger than 1 MiB"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_config_gets_a_clear_message_and_disk_is_unchanged(tmp_path: Path, case):
    _, text, fragment = case
    path = tmp_path / "config.yaml"
    original = _seed_text()
    path.write_text(original)
    assert text != original
    with pytest.raises(ConfigError) as info:
        if isinstance(text, bytes):
            save_config_text(path, text.decode("utf-8", errors="surrogateescape"))
        else:
            save_config_text(path, text)
    assert fragment in str(info.value)
    assert path.read_text() == original and not (tmp_path / "config.yaml.bak").exists()
    if isinstance(text, bytes):  # the same bytes on disk: the loader names the line
        bad = tmp_path / "bad.yaml"
        bad.write_bytes(text)
        with pytest.raises(ConfigError, match="not UTF-8"):
            load_config(bad)


def test_saving_through_a_symlink_keeps_the_link(tmp_path: Path):
    real = tmp_path / "real.yaml"
    real.write_text(_seed_text())
    link = tmp_path / "config.yaml"
    link.symlink_to(real)
    save_config_text(link, _seed_text().replace("top_k: 100", "top_k: 7"))
    assert link.is_symlink()
    assert "top_k: 7" in real.read_text()
    assert (tmp_path / "real.yaml.bak").read_text() == _seed_text()


def test_dotted_keys_read_set_and_flatten():
    config = load_config(SEED_CONFIG)
    set_key(config, "train.sft.learning_rate", 0.5)
    assert get_key(config, "train.sft.learning_rate") == 0.5 == config.train.sft.learning_rate
    nested = {"data": {"seed": 1, "tags": ["a", "b"]}, "datasets": [{"name": "x"}, {"name": "y"}]}
    assert flatten(nested) == {
        "data.seed": 1,
        "data.tags": ["a", "b"],  # a list of plain values stays one value
        "datasets[0].name": "x",
        "datasets[1].name": "y",
    }
