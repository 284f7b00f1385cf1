"""`tas export`: a run's model as a servable Hugging Face folder (LoRA merged in full precision), and --push.

The runs here are made by hand: a frozen tiny config, the model files where the stages write them and a
`done` status in the stage's events, so no stage has to train first.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from engine.config.keys import set_key
from engine.config.load import load_config
from engine.core.process import ProcessRecord, write_pid_file
from engine.export.merge import export_run
from engine.export.plan import CARD_MARKER, ExportRefused
from engine.store.events import EventWriter
from engine.store.runs import Run, RunIsLive, RunStore

from .helpers import wait_until

CONFIG_SECRETS = {
    "env": "env-var-secret-value-0042",  # teacher.vllm.env.HF_TOKEN (not key-shaped: found by its name)
    "flag": "flag-secret-value-0042",  # teacher.vllm.extra_args after --api-key
    "password": "pa55-w0rd-in-url",  # teacher.closed.base_url user:password@
}
PUSH_TOKEN = "hf_" + "PushTokenNeverPrinted" * 2
REPORT = {
    "examples": 16,
    "split": {"seed": 19, "test_size": 0.1},
    "models": {
        "teacher": {"pass@1": 0.5},
        "assistant": {"loss": 1.8125, "perplexity": 6.125, "kl_to_assistant": 0.0, "pass@1": 0.375},
        "student_kd": {"loss": 2.4375, "perplexity": 11.4427, "kl_to_assistant": 0.3125, "pass@1": 0.125},
        "student_ce": {"loss": 2.6875, "perplexity": 14.6952, "kl_to_assistant": 0.4375, "pass@1": 0.0625},
    },
    "code": {"benchmark": "humaneval", "problems": 4, "n_samples": 1},
}


def make_run(project: Path, **changes) -> Run:
    """A run of the tiny profile whose frozen config holds secrets (that an export must never show)."""
    config = load_config(project / "configs" / "tiny.yaml")
    config.teacher.vllm.env = {"HF_TOKEN": CONFIG_SECRETS["env"], "VLLM_CPU_KVCACHE_SPACE": "1"}
    config.teacher.vllm.extra_args = ["--api-key", CONFIG_SECRETS["flag"], "--seed", "3"]
    config.teacher.closed.base_url = f"https://me:{CONFIG_SECRETS['password']}@llm.example.com/v1"
    for key, value in changes.items():
        set_key(config, key.replace("__", "."), value)
    return RunStore(project / "runs").create(config, "configs/tiny.yaml", workdir=str(project))


def finish(run: Run, stage: str) -> None:
    writer = EventWriter(run.stage_dir(stage) / "events.jsonl")
    writer.status("running")
    writer.status("done")
    writer.close()


def add_students(run: Run, ce: bool = True) -> Path:
    """The KD (and CE-only) student where distill saves them: a tiny Qwen2 model + the shared tokenizer."""
    from engine.models import tiny

    out = Path(run.config().train.distillation.output_dir)
    shutil.copytree(tiny.resolve("tiny:student"), out)
    if ce:
        shutil.copytree(tiny.resolve("tiny:student"), Path(f"{out}_ce"))
    finish(run, "distill")
    return out


def add_report(run: Run) -> None:
    path = run.stage_dir("eval") / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(REPORT))
    finish(run, "eval")


def add_adapter(run: Run) -> Path:
    """A LoRA adapter trained (here: randomly initialised, so it changes the output) on the 4-bit assistant,
    saved the way the sft stage saves it (adapter + tokenizer in train.sft.save_path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    from engine.models.loading import load_causal_lm, load_tokenizer

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = load_causal_lm("tiny:assistant", quantization_config=quant, device_map={"": "cpu"})
    torch.manual_seed(7)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False),
    )
    out = Path(run.config().train.sft.save_path)
    model.save_pretrained(out)
    load_tokenizer("tiny:assistant").save_pretrained(out)
    finish(run, "sft")
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def prompt_ids(tokenizer) -> torch.Tensor:
    return tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]


def all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- engine


def test_kd_student_exports_reloads_and_generates(project: Path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(project)
    source = add_students(run)
    add_report(run)
    out = export_run(run, "kd")

    assert out == (run.path / "export" / "kd").resolve()
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = prompt_ids(tokenizer)
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    assert torch.equal(logits(model, ids), logits(original, ids))  # the trained weights, not a fresh model
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert len(list(weights.keys())) > 0

    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 64  # assistant.inference.max_new_tokens of the tiny profile
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (
        gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    )
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4
    assert isinstance(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]), str)


def test_model_card_holds_the_report_and_the_redacted_config(project: Path):
    run = make_run(project, student__repo="someone/tiny-student")
    add_students(run)
    add_report(run)
    out = export_run(run, "kd", repo="someone/tiny-student")
    card = (out / "README.md").read_text()

    assert card.startswith("---\n") and CARD_MARKER in card and "library_name: transformers" in card
    assert run.id in card and "KD student" in card and 'from_pretrained("someone/tiny-student")' in card
    row = next(line for line in card.splitlines() if "student_kd" in line)
    assert "(this model)" in row and "2.4375" in row and "11.443" in row and "0.3125" in row and "0.125" in row
    assert "| student_ce | 2.6875 |" in card and "pass@1" in card and "KL to assistant" in card
    assert "weight: 0.5" in card and "name: tiny:assistant" in card  # the config is there, as frozen...
    assert "output_dir: .model/tiny/student/Student" in card and str(project) not in card
    assert "VLLM_CPU_KVCACHE_SPACE: '1'" in card and "- --seed" in card
    assert "- --api-key\n" in card and "llm.example.com/v1" in card
    for secret in CONFIG_SECRETS.values():  # ...without its secrets, anywhere in the folder
        assert secret not in all_text(out), secret
    assert card.count("***") >= 3


def test_without_eval_report_the_card_says_how_to_get_one(project: Path):
    run = make_run(project)
    add_students(run)
    card = (export_run(run, "ce") / "README.md").read_text()
    assert "CE-only control student" in card and f"tas run eval --run {run.id}" in card


def test_assistant_export_merges_the_adapter_in_full_precision(project: Path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.models import tiny

    run = make_run(project)
    assert run.config().assistant.quantization.load_in_4bit  # trained on a 4-bit base (QLoRA)
    adapter = add_adapter(run)
    out = export_run(run, "assistant")

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = prompt_ids(tokenizer)
    base_path = tiny.resolve("tiny:assistant")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    base_logits = logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    expected = logits(with_adapter, ids)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters, so the comparison means something
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-4, rtol=1e-4)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert names and not [n for n in names if "lora" in n or "base_layer" in n or "absmax" in n]
        assert {weights.get_tensor(n).dtype for n in names} == {torch.float32}
    card = (out / "README.md").read_text()
    assert "merged into a full-precision copy" in card and "QLoRA" in card


def test_a_new_export_replaces_an_earlier_one_but_never_a_foreign_folder(project: Path):
    run = make_run(project)
    add_students(run)
    first = export_run(run, "kd")
    (first / "stale.txt").write_text("from the earlier export")
    again = export_run(run, "kd")
    assert again == first and not (again / "stale.txt").exists() and (again / "model.safetensors").is_file()

    foreign = project / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportRefused, match="other than an export"):
        export_run(run, "kd", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in project.iterdir() if p.name.startswith(".mine")]  # no temp folder left behind


def test_refusals_name_the_stage_to_run(project: Path):
    run = make_run(project)
    with pytest.raises(
        ExportRefused, match=rf"no KD student.*distill stage has not run.*tas run distill --run {run.id}"
    ):
        export_run(run, "kd")
    with pytest.raises(ExportRefused, match="sft stage"):
        export_run(run, "assistant")
    no_control = make_run(project, train__distillation__ce_only_control=False)
    add_students(no_control, ce=False)
    with pytest.raises(ExportRefused, match="ce_only_control was off"):
        export_run(no_control, "ce")
    assert not (run.path / "export").exists() and not (no_control.path / "export").exists()


def test_a_live_run_is_refused(project: Path):
    run = make_run(project)
    add_students(run)
    write_pid_file(run.path / "supervisor.json", ProcessRecord.of(os.getpid()), stages=["eval"])
    with pytest.raises(RunIsLive, match="running"):
        export_run(run, "kd")


# -------------------------------------------------------------------------------------------------- CLI


def cli(*argv: str) -> int:
    from engine.cli.main import main

    return main(list(argv))


def test_cli_refusals_exit_non_zero_with_what_to_do(project: Path, capsys):
    run = make_run(project)
    assert cli("export", run.id[:15]) == 2  # any unique part of the id
    assert f"tas run distill --run {run.id}" in capsys.readouterr().err
    assert cli("export", "no-such-run") == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    add_students(run)
    write_pid_file(run.path / "supervisor.json", ProcessRecord.of(os.getpid()), stages=["eval"])
    assert cli("export", run.id) == 2
    assert f"tas cancel {run.id}" in capsys.readouterr().err
    assert not (run.path / "export").exists()


def test_cli_push_needs_a_repo_and_a_token_before_exporting(project: Path, capsys, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, "x")  # recorded, so the .env test below cannot leak into later tests
        monkeypatch.delenv(name)
    run = make_run(project)
    add_students(run)
    assert cli("export", run.id, "--push") == 2
    assert "student.repo is not set" in capsys.readouterr().err
    with_repo = make_run(project, student__repo="someone/tiny-student")
    add_students(with_repo)
    assert cli("export", with_repo.id, "--push") == 2
    assert "set HF_TOKEN" in capsys.readouterr().err
    assert not (run.path / "export").exists() and not (with_repo.path / "export").exists()


def test_run_export_waits_for_the_export_process_and_says_why_it_failed(tmp_path: Path, monkeypatch, capfd):
    """One home for the export process, two ways to report: the CLI lets its stderr through to the terminal,
    the panel (no terminal) gets its last line."""
    from engine.export import plan

    def process(code: int):
        script = (
            "import sys; print('/the/folder'); print('loading', file=sys.stderr); "
            f"print('error: why', file=sys.stderr); sys.exit({code})"
        )
        monkeypatch.setattr(plan, "export_command", lambda run, target, out, repo=None: [sys.executable, "-c", script])

    process(3)
    assert plan.run_export(None, "kd", tmp_path, capture_errors=True) == (3, "error: why")
    assert capfd.readouterr().err == ""  # captured: the panel shows it
    assert plan.run_export(None, "kd", tmp_path) == (3, "exit code 3")  # its stderr went to ours:
    seen = capfd.readouterr()
    assert "error: why" in seen.err and "/the/folder" not in seen.out  # through to the terminal; the folder dropped
    process(0)
    assert plan.run_export(None, "kd", tmp_path, capture_errors=True) == (0, "")


@pytest.mark.e2e  # the export runs in its own process, as it does for a user
def test_cli_exports_and_pushes_without_showing_the_token(project: Path, capfd, monkeypatch):
    import huggingface_hub

    calls: list[tuple] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, self.token, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls.append(("upload_folder", repo_id, self.token, folder, sorted(p.name for p in folder.iterdir())))
        return None

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    (project / ".env").write_text(f"HF_TOKEN={PUSH_TOKEN}\n")  # the project's .env, not the environment
    run = make_run(project, student__repo="someone/tiny-student")
    add_students(run)
    add_report(run)

    assert cli("export", run.id, "--push", "--private") == 0
    out = capfd.readouterr()
    folder = (run.path / "export" / "kd").resolve()
    assert out.out.splitlines() == [str(folder), "https://huggingface.co/someone/tiny-student"]
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "someone/tiny-student" and calls[0][3]["private"] is True
    assert calls[1][1] == "someone/tiny-student" and calls[1][3] == folder
    assert calls[0][2] == calls[1][2] == PUSH_TOKEN  # the token reached the hub client...
    assert {"model.safetensors", "config.json", "generation_config.json", "README.md"} <= set(calls[1][4])
    assert PUSH_TOKEN not in out.out + out.err  # ...and nothing else
    assert PUSH_TOKEN not in all_text(folder)
    assert "2.4375" in (folder / "README.md").read_text()

    # the assistant goes to its own repository, so it never overwrites the student's
    calls.clear()
    assert cli("export", run.id, "--target", "ce", "--push") == 0
    assert calls[0][1] == calls[1][1] == "someone/tiny-student-ce"
    assert calls[1][3] == (run.path / "export" / "ce").resolve()


def test_cli_push_failure_is_reported_without_the_token(project: Path, capfd, monkeypatch):
    import huggingface_hub

    def create_repo(self, repo_id, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {self.token}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setenv("HF_TOKEN", PUSH_TOKEN)
    run = make_run(project, student__repo="someone/tiny-student")
    add_students(run)
    assert cli("export", run.id, "--push") == 1
    out = capfd.readouterr()
    assert "push to someone/tiny-student failed" in out.err and "401 Unauthorized" in out.err
    assert PUSH_TOKEN not in out.out + out.err


@pytest.mark.e2e  # the export runs in its own process, as it does from the CLI
async def test_panel_x_exports_the_kd_student_of_the_selected_run(project: Path, monkeypatch):
    """`x` on a finished run writes the export folder and says where; on a run without a student it says
    which stage to run, and writes nothing."""
    from textual.widgets import OptionList

    from tui.app import TASPanel
    from tui.tabs.stages import StagesTab

    monkeypatch.chdir(project)
    empty = make_run(project)
    done = make_run(project)
    add_students(done)
    app = TASPanel(config_path="configs/tiny.yaml", runs_dir=project / "runs", gpu_interval=3600)
    notes: list[str] = []
    monkeypatch.setattr(app, "notify", lambda message, **kw: notes.append(f"{kw.get('title', '')}: {message}"))
    async with app.run_test(size=(80, 24)) as pilot:
        tab = app.query_one(StagesTab)
        await wait_until(pilot, lambda: tab.ready)
        # through the run list, as a user does: a run_id set behind the list's back was undone by the list's
        # own highlight of the newest run when that message came later (seen under CI load)
        runs = app.query_one("#runs", OptionList)
        runs.highlighted = runs.get_option_index(empty.id)  # as a user picks a run
        await wait_until(pilot, lambda: tab.shown and tab.shown[0] == empty.id)
        await pilot.press("x")
        await wait_until(pilot, lambda: any("cannot export" in n for n in notes))
        assert any("distill" in n for n in notes if "cannot export" in n)
        assert not (empty.path / "export").exists()
        runs.highlighted = runs.get_option_index(done.id)  # as a user picks a run
        await wait_until(pilot, lambda: tab.shown and tab.shown[0] == done.id)
        notes.clear()
        await pilot.press("x")
        await wait_until(pilot, lambda: any(n.startswith(("exported", "export failed")) for n in notes), timeout=180)
    out = done.path / "export" / "kd"
    assert any(n.startswith("exported") and str(out) in n for n in notes), notes
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_the_card_says_which_assistant_the_scores_were_measured_on(project: Path):
    """eval scores the assistant as the pipeline used it (4-bit base + adapter); an assistant export is the
    adapter merged into the unquantized base: the card must not pass the one's scores off as the other's."""
    from engine.export.card import model_card
    from engine.export.plan import ExportSource

    run = make_run(project)
    assert run.config().assistant.quantization.load_in_4bit
    merged = ExportSource("assistant", "fine-tuned assistant", "tiny:assistant", "adapter", "tiny:assistant")
    card = model_card(run, merged, report=REPORT)
    evaluation = card.split("## Evaluation")[1].split("## Training configuration")[0]
    assert "loaded in 4-bit (bitsandbytes nf4) with its LoRA adapter" in evaluation
    assert "merged into the unquantized base, which the eval did not score" in evaluation
    student = ExportSource("kd", "KD student", "student", None, "student")
    evaluation = model_card(run, student, report=REPORT).split("## Evaluation")[1]
    assert "loaded in 4-bit" in evaluation and "did not score" not in evaluation

    unquantized = make_run(project, assistant__quantization__load_in_4bit=False)
    evaluation = model_card(unquantized, merged, report=REPORT).split("## Evaluation")[1]
    assert "4-bit" not in evaluation.split("## Training configuration")[0]
