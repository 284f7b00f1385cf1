"""The student: pretrained weights, a random Qwen2 from the config's sizes, or the assistant's own layers
(after SFT, 4-bit too); optional LoRA; the vocabulary check and padded embedding matrices."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config.load import load_config
from engine.models.loading import load_causal_lm, load_tokenizer
from engine.train.kd_loss import chunked_kd_loss, kd_loss_reference
from engine.train.student import (
    build_student,
    check_vocab_compatibility,
    embedding_rows,
    layer_subset,
    merged_student,
    student_config,
    token_columns,
    vocab_fingerprint,
    with_lora,
)

from .helpers import TINY_CONFIG, make_context


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY_CONFIG).student


@pytest.fixture(scope="module")
def assistant():
    return load_causal_lm("tiny:assistant").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny:assistant")


def same_sizes_as(cfg, assistant, **overrides):
    a = assistant.config
    sizes = dict(
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads,
        num_hidden_layers=a.num_hidden_layers,
    )
    return cfg.model_copy(update={**sizes, **overrides})


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_from_tiny_profile(cfg, assistant):
    config = student_config(cfg, assistant.config, assistant.config.vocab_size)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads) == (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
    )
    assert config.max_position_embeddings == cfg.max_position_embeddings
    a = assistant.config
    assert cfg.num_attention_heads % a.num_key_value_heads == 0  # so the student keeps the assistant's GQA
    assert config.num_key_value_heads == a.num_key_value_heads
    for key in ("vocab_size", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == getattr(a, key), key
    assert config.rope_parameters == a.rope_parameters
    # a head count the assistant's KV heads do not divide: plain multi-head attention
    heads = a.num_key_value_heads + 1
    odd = cfg.model_copy(update={"hidden_size": 16 * heads, "num_attention_heads": heads})
    assert student_config(odd, a, a.vocab_size).num_key_value_heads == heads


def test_head_mismatch_names_the_keys(cfg, assistant):
    bad = cfg.model_copy(update={"hidden_size": 66, "num_attention_heads": 4})
    with pytest.raises(ValueError, match=r"student\.hidden_size.*student\.num_attention_heads"):
        student_config(bad, assistant.config, assistant.config.vocab_size)


def test_random_student_is_smaller_works_and_is_reproducible(cfg, assistant, tokenizer):
    student = build_student(cfg, assistant, tokenizer, init="random", seed=7)
    assert n_params(student) < n_params(assistant)
    assert student.config.vocab_size == assistant.config.vocab_size
    batch = tokenizer(["def add(a, b):\n    return a + b", "print('hi')"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = student(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], assistant.config.vocab_size)
    assert torch.isfinite(out.logits).all()

    rng_before = torch.random.get_rng_state()
    again = build_student(cfg, assistant, tokenizer, init="random", seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    other = build_student(cfg, assistant, tokenizer, init="random", seed=8)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(student.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(student.state_dict()[w], other.state_dict()[w])


def test_save_reload_round_trip(cfg, assistant, tokenizer, tmp_path):
    student = build_student(cfg, assistant, tokenizer).eval()
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert reloaded.config.student_init == "random"
    ids = tokenizer("for i in range(3): print(i)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(student(ids).logits, reloaded(ids).logits)
    assert reloaded.generation_config.pad_token_id == tokenizer.pad_token_id


def test_layer_subset_rule():
    assert layer_subset(3, 2) == [0, 2]
    assert layer_subset(3, 3) == [0, 1, 2]
    assert layer_subset(5, 1) == [0]
    assert layer_subset(28, 8) == [0, 4, 8, 12, 15, 19, 23, 27]
    for la in range(1, 30):
        for ls in range(1, la + 1):
            keep = layer_subset(la, ls)
            assert len(keep) == ls and keep == sorted(set(keep)) and keep[0] == 0
            assert ls == 1 or keep[-1] == la - 1
    with pytest.raises(ValueError, match="student.num_hidden_layers"):
        layer_subset(3, 4)


def test_assistant_layers_init_copies_the_right_layers(cfg, assistant, tokenizer):
    two = same_sizes_as(cfg, assistant, num_hidden_layers=2)
    student = build_student(two, assistant, tokenizer, init="assistant_layers")
    last = assistant.config.num_hidden_layers - 1
    assert student.config.student_init_layers == [0, last]
    a_state, s_state = assistant.state_dict(), student.state_dict()
    for mine, theirs in enumerate([0, last]):
        for name, value in student.model.layers[mine].state_dict().items():
            assert torch.equal(value, a_state[f"model.layers.{theirs}.{name}"]), (mine, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[name], a_state[name]), name

    # every layer kept: the student is the assistant
    full = build_student(same_sizes_as(cfg, assistant), assistant, tokenizer, init="assistant_layers").eval()
    ids = tokenizer("x = [1, 2, 3]", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, assistant(ids).logits)


def test_assistant_layers_init_refuses_other_widths(cfg, assistant, tokenizer):
    with pytest.raises(ValueError) as err:
        build_student(cfg, assistant, tokenizer, init="assistant_layers")  # the tiny student is narrower
    message = str(err.value)
    assert "student.hidden_size" in message and "student.intermediate_size" in message
    assert f"hidden_size={cfg.hidden_size}, assistant has {assistant.config.hidden_size}" in message
    assert "student_init: assistant_layers" in message and "student_init: pretrained" in message
    assert "student.num_attention_heads: student has num_attention_heads" not in message  # only what differs
    deeper = same_sizes_as(cfg, assistant, num_hidden_layers=assistant.config.num_hidden_layers + 1)
    with pytest.raises(ValueError, match="student.num_hidden_layers"):
        build_student(deeper, assistant, tokenizer, init="assistant_layers")
    with pytest.raises(ValueError, match="init"):
        build_student(cfg, assistant, tokenizer, init="copy")


def test_vocab_compatibility(tokenizer, assistant):
    n = len(tokenizer)
    assert token_columns(tokenizer) == n == max(tokenizer.get_vocab().values()) + 1
    padded = assistant.config.vocab_size
    assert check_vocab_compatibility(tokenizer, tokenizer, padded, padded) == n
    # each model's own padding (Qwen2.5: 151,936 rows up to 3B, 152,064 from 7B): KD reads the tokenizer's columns
    assert check_vocab_compatibility(tokenizer, tokenizer, n + 64, n + 128) == n
    with pytest.raises(ValueError, match=rf"embeddings have only student\.base_model_name: {n - 1} rows"):
        check_vocab_compatibility(tokenizer, tokenizer, n + 64, n - 1)

    other = load_tokenizer("tiny:assistant")
    other.add_tokens(["<|student_only|>"])
    assert vocab_fingerprint(other) != vocab_fingerprint(tokenizer)
    with pytest.raises(ValueError, match=r"student\.base_model_name.*assistant\.model\.name"):
        check_vocab_compatibility(tokenizer, other, padded, padded + 64)


# ------------------------------------------------------------------------------------------ pretrained


def saved_copy(name: str, folder, rows: int | None = None):
    """A checkpoint folder of `name` (a tiny model), its embedding matrix resized to `rows` when given."""
    model = load_causal_lm(name, dtype=torch.float32)
    if rows is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(folder)
    load_tokenizer(name).save_pretrained(folder)
    return folder


def test_pretrained_init_loads_the_exact_weights(cfg, assistant, tokenizer):
    pretrained = cfg.model_copy(update={"base_model_name": "tiny:student", "hidden_size": 1280})  # sizes unused
    student = build_student(pretrained, assistant, tokenizer, init="pretrained")
    original = load_causal_lm("tiny:student", dtype=torch.float32)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(student.state_dict()[name], original.state_dict()[name]), name
    assert student.config.hidden_size == original.config.hidden_size != 1280
    assert student.config.student_init == "pretrained" and student.config.student_base_model == "tiny:student"
    assert student.dtype == torch.float32 and student.generation_config.pad_token_id == tokenizer.pad_token_id
    assert all(p.requires_grad for p in student.parameters())  # the whole model trains unless peft is set


def test_pretrained_init_refuses_a_checkpoint_missing_tokens(cfg, assistant, tokenizer, tmp_path):
    short = saved_copy("tiny:student", tmp_path / "short", rows=len(tokenizer) - 48)
    with pytest.raises(ValueError, match=r"student\.base_model_name .* has 2000 embedding rows .* 2048 token ids"):
        build_student(cfg.model_copy(update={"base_model_name": str(short)}), assistant, tokenizer, init="pretrained")


# ------------------------------------------------------------------- assistant layers after SFT, 4-bit


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """A LoRA adapter on tiny:assistant as `sft` saves one, with non-zero updates (B is not zero)."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("sft") / "adapter"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = get_peft_model(
            load_causal_lm("tiny:assistant", dtype=torch.float32),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        )
    model.save_pretrained(folder)
    return folder


def tuned_assistant(sft_adapter, tmp_path, load_in_4bit: bool):
    """The KD teacher exactly as the distill stage loads it (engine.train.assistant.load_tuned_assistant)."""
    from engine.train.assistant import load_tuned_assistant

    config = load_config(TINY_CONFIG)
    config.train.sft.save_path = str(sft_adapter)
    config.assistant.quantization.load_in_4bit = load_in_4bit
    model, _ = load_tuned_assistant(make_context(config, "distill", tmp_path), torch.device("cpu"))
    return model


@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["float", "4bit"])
def test_assistant_layers_after_sft(cfg, tokenizer, sft_adapter, tmp_path, load_in_4bit):
    """The assistant still carries its LoRA layers (and, 4-bit, quantized weights): the student gets the
    merged, dequantized weights the KD teacher computes with, and the teacher itself is left as it was."""
    from peft import PeftModel

    teacher = tuned_assistant(sft_adapter, tmp_path, load_in_4bit)
    assert getattr(teacher, "peft_config", None)  # what used to make student.py refuse
    assert any(type(p).__name__ == "Params4bit" for p in teacher.parameters()) is load_in_4bit
    before = {n: p.clone() for n, p in teacher.named_parameters()}

    full = build_student(same_sizes_as(cfg, teacher), teacher, tokenizer, init="assistant_layers").eval()
    assert all(p.dtype == torch.float32 for p in full.parameters())
    batch = tokenizer(["def add(a, b):\n    return a + b", "Reverse a list"], return_tensors="pt", padding=True)
    with torch.no_grad():  # every layer kept: the student computes what the (4-bit, LoRA) teacher computes
        torch.testing.assert_close(full(**batch).logits, teacher(**batch).logits, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())

    two = build_student(same_sizes_as(cfg, teacher, num_hidden_layers=2), teacher, tokenizer, init="assistant_layers")
    if not load_in_4bit:  # against peft's own merge of the same adapter
        merged = PeftModel.from_pretrained(load_causal_lm("tiny:assistant", dtype=torch.float32), sft_adapter)
        merged = merged.merge_and_unload().state_dict()
        last = teacher.config.num_hidden_layers - 1
        for name, value in two.model.layers[1].state_dict().items():
            torch.testing.assert_close(value, merged[f"model.layers.{last}.{name}"], atol=1e-6, rtol=1e-6)
        base = load_causal_lm("tiny:assistant", dtype=torch.float32).state_dict()
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(two.state_dict()[name], base[name])  # the fine-tuning is in there

    with pytest.raises(ValueError, match=r"student\.hidden_size: student has hidden_size=64, assistant has 128"):
        build_student(cfg, teacher, tokenizer, init="assistant_layers")


# ------------------------------------------------------------------------------------------------ LoRA


def test_student_lora_trains_and_the_saved_student_loads(cfg, assistant, tokenizer, tmp_path):
    from engine.chat.worker import load_model
    from engine.config.schema import LoraConfig

    pretrained = cfg.model_copy(update={"base_model_name": "tiny:student"})
    student = with_lora(
        build_student(pretrained, assistant, tokenizer, init="pretrained"),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=None),
    )
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}

    batch = tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = student(**batch, output_hidden_states=True)
        with torch.no_grad():
            teacher_out = assistant(**batch, output_hidden_states=True)
        loss = chunked_kd_loss(
            out.hidden_states[-1],
            student.get_output_embeddings().weight,
            teacher_out.hidden_states[-1],
            assistant.get_output_embeddings().weight,
            labels,
            weight=0.5,
            temperature=2.0,
            chunk_size=4,
            vocab_size=token_columns(tokenizer),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[n], p) for n, p in student.named_parameters() if not p.requires_grad)

    student.eval()
    with torch.no_grad():
        expected = student(**batch).logits
    merged_student(student).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    assert not (tmp_path / "student" / "adapter_config.json").exists()  # a plain model folder
    reloaded = load_causal_lm(str(tmp_path / "student"), dtype=torch.float32).eval()  # as eval loads it
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    loaded = load_model(str(tmp_path / "student"), None, "cpu")  # as the chat worker loads it
    assert loaded.template == "chat" and not hasattr(loaded.model, "peft_config")


def test_student_lora_names_bad_modules(cfg, assistant, tokenizer):
    from engine.config.schema import LoraConfig

    student = build_student(cfg, assistant, tokenizer)
    with pytest.raises(ValueError, match=r"train\.distillation\.peft\.lora\.modules_to_save.*'vision_tower'"):
        with_lora(student, LoraConfig(modules_to_save=["vision_tower"]))
    wrapped = with_lora(student, LoraConfig(modules_to_save=["embed_token"]))  # TAS's spelling of embed_tokens
    assert "embed_tokens" in wrapped.peft_config["default"].modules_to_save
    # the tiny student ties its lm head to the embeddings: the trained copy is the lm head too
    assert wrapped.get_output_embeddings().weight is wrapped.get_input_embeddings().weight


# ------------------------------------------------------------------------------------- padded vocab


def test_padded_vocab_kd_loss_ignores_the_padding(cfg, assistant, tokenizer, tmp_path):
    """A student with 64 more embedding rows than the assistant, as Qwen2.5 pads differently per size:
    KD compares the tokenizer's columns, each model keeps its own size, and the teacher's padding is
    ignored; training steps run."""
    n = token_columns(tokenizer)
    padded_folder = saved_copy("tiny:student", tmp_path / "padded", rows=n + 64)
    student = build_student(
        cfg.model_copy(update={"base_model_name": str(padded_folder)}), assistant, tokenizer, init="pretrained"
    )
    assert embedding_rows(student) == n + 64 and embedding_rows(assistant) == n
    vocab = check_vocab_compatibility(
        tokenizer, load_tokenizer(str(padded_folder)), embedding_rows(assistant), embedding_rows(student)
    )
    assert vocab == n

    # the teacher padded too, its padding rows different from a second copy's: the loss does not see them
    teacher = load_causal_lm(str(saved_copy("tiny:assistant", tmp_path / "teacher", rows=n + 128))).eval()
    teacher_head = teacher.get_output_embeddings().weight.detach()
    other_rows = teacher_head.clone()
    other_rows[n:] = torch.randn_like(other_rows[n:]) * 50

    batch = tokenizer(
        ["def add(a, b):\n    return a + b", "for i in range(3): print(i)"], return_tensors="pt", padding=True
    )
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    labels[:, :2] = -100
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for _ in range(2):
        out = student(**batch, output_hidden_states=True)
        with torch.no_grad():
            t_hidden = teacher(**batch, output_hidden_states=True).hidden_states[-1]
        args = dict(weight=0.5, temperature=2.0, chunk_size=5, vocab_size=vocab)
        loss = chunked_kd_loss(
            out.hidden_states[-1], student.get_output_embeddings().weight, t_hidden, teacher_head, labels, **args
        )
        with torch.no_grad():
            other = chunked_kd_loss(
                out.hidden_states[-1], student.get_output_embeddings().weight, t_hidden, other_rows, labels, **args
            )
            reference = kd_loss_reference(out.logits, t_hidden @ teacher_head.T, labels, 0.5, 2.0, vocab_size=n)
        assert out.logits.shape[-1] == n + 64
        torch.testing.assert_close(other.loss, loss.loss.detach())  # the teacher's padded logits are ignored
        torch.testing.assert_close(reference.loss, loss.loss.detach(), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(loss.loss) and loss.kd_loss > 0
        loss.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
    with pytest.raises(ValueError, match="vocab_size"):  # the padded sizes themselves are no shared vocab
        chunked_kd_loss(
            out.hidden_states[-1],
            student.get_output_embeddings().weight,
            t_hidden,
            teacher_head,
            labels,
            weight=0.5,
            temperature=2.0,
            vocab_size=None,
        )
