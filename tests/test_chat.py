"""Chat templates: rendering as transformers does, assistant-only labels, conversational
instruction tuning end to end, lmforge-generate chat=true, and bad input in one line."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.data.chat import (
    ChatTemplate,
    ChatTemplateError,
    TokenizerSettings,
    read_tokenizer_settings,
)
from lmforge.data.instructions import Framing, InstructionDataConfig, encode_records
from lmforge.data.tokenizer import plain
from lmforge.errors import LMForgeError

from .conftest import ROOT, compose_train

transformers = pytest.importorskip("transformers")

TEMPLATES = ROOT / "tests" / "assets" / "chat_templates"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
EOS = {"qwen2_5": "<|im_end|>", "smollm2": "<|im_end|>", "mistral_v0_1": "</s>"}

SYSTEM_MULTI = [
    {"role": "system", "content": "You answer in one short line."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": 'Quote "café" <b>bold</b> & more?'},
    {"role": "assistant", "content": '"café" — <b>bold</b> & more.\n'},
]
TWO_TURNS = SYSTEM_MULTI[1:]  # user / assistant alternating: what Mistral's template accepts
ONE_QUESTION = SYSTEM_MULTI[1:2]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A byte-level BPE of 400 tokens trained on a few lines, with ChatML's and Mistral's
    special tokens (so every template's markers are single tokens)."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    lines = [m["content"] for m in SYSTEM_MULTI] + [template(n) for n in EOS] + ["a\n  b"] * 30
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(lines * 3, trainer)
    return t


def settings_for(name: str) -> TokenizerSettings:
    return TokenizerSettings(
        bos_token="<s>",
        eos_token=EOS[name],
        pad_token="<|endoftext|>",
        chat_template=template(name),
    )


def hf_tokenizer(tok: Tokenizer, name: str):
    s = settings_for(name)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=s.chat_template,
        bos_token=s.bos_token,
        eos_token=s.eos_token,
        pad_token=s.pad_token,
    )


CASES = [
    (name, conversation, generation)
    for name in EOS
    for conversation in ("system_multi", "two_turns", "one_question")
    for generation in (False, True)
]
CONVERSATIONS = {"system_multi": SYSTEM_MULTI, "two_turns": TWO_TURNS, "one_question": ONE_QUESTION}


@pytest.mark.parametrize(("name", "conversation", "generation"), CASES)
def test_rendering_matches_transformers_apply_chat_template(tok, name, conversation, generation):
    messages = CONVERSATIONS[conversation]
    ours = ChatTemplate(template(name), settings_for(name), name)
    hf = hf_tokenizer(tok, name)
    try:
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as e:  # Mistral's template refuses a system message: so must we
        with pytest.raises(ChatTemplateError) as ours_error:
            ours.render(messages, add_generation_prompt=generation)
        assert str(e) in str(ours_error.value) and "\n" not in str(ours_error.value)
        return
    assert ours.render(messages, add_generation_prompt=generation) == expected
    assert messages[-1]["content"].strip() in expected  # the test sees a real rendering


def test_environment_matches_transformers_filters_globals_and_extensions(tok):
    """tojson (no HTML escaping, its options), namespace, loop controls, a {% generation %}
    block, the special tokens as variables, keys whose value is None dropped."""
    text = (
        "{{ bos_token }}{%- set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m.content | tojson(indent=1) }}"
        "{% if m.name is defined %}NAME{% endif %}\n"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
        "{% endgeneration %}{% endif %}{% endfor %}{{ ns.n }}"
        "{% if add_generation_prompt %}<go>{% endif %}{{ dict(a=1) | tojson }}"
    )
    messages = [{**m, "name": None} for m in SYSTEM_MULTI]
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=text, bos_token="<s>", eos_token="</s>"
    )
    ours = ChatTemplate(text, TokenizerSettings(bos_token="<s>", eos_token="</s>"), "inline")
    for generation in (False, True):
        expected = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
        assert ours.render(messages, add_generation_prompt=generation) == expected
    assert "<b>" in expected and "NAME" not in expected


def test_tokenizer_config_is_read_as_transformers_reads_it(tok, tmp_path):
    """Dict-form special tokens, added_tokens_decoder, special_tokens_map.json for the tokens the
    config does not name, chat_template.jinja before the config's template."""
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": True} for t in SPECIALS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": template("smollm2"),
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    for older in (False, True):  # the map counts only without an added_tokens_decoder
        if older:
            del config["added_tokens_decoder"]
            (d / "tokenizer_config.json").write_text(json.dumps(config))
        hf = transformers.AutoTokenizer.from_pretrained(d)
        ours = read_tokenizer_settings(d)
        for key in ("bos_token", "eos_token", "pad_token"):
            assert getattr(ours, key) == getattr(hf, key), key
        assert (ours.bos_token == "<s>") == older
        assert ours.chat_template == hf.chat_template == template("smollm2")
    (d / "chat_template.jinja").write_text(template("qwen2_5"))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert read_tokenizer_settings(d).chat_template == hf.chat_template == template("qwen2_5")


def test_bos_is_added_where_the_tokenizer_json_adds_it(tok, tmp_path):
    """Llama-style tokenizer.json files put BOS first in their post-processor, which lmforge
    switches off: the BOS then comes from the settings, as transformers' encoding has it."""
    from tokenizers import processors

    with_bos = Tokenizer.from_str(tok.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    d = tmp_path / "tok"
    d.mkdir()
    with_bos.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    settings = read_tokenizer_settings(d)
    assert settings.add_bos_token and not read_tokenizer_settings(tmp_path).add_bos_token
    record = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}
    framing = Framing(plain(with_bos), InstructionDataConfig("", ""), settings)
    tokens, _, _ = framing.tokens(record, 1, "train")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    from lmforge.data.instructions import render_prompt

    prompt = render_prompt(record, framing.cfg)
    assert tokens == hf(prompt)["input_ids"] + hf(record["output"], add_special_tokens=False)[
        "input_ids"
    ] + [hf.eos_token_id]


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The label ids in runs of consecutive labelled positions."""
    runs, current = [], []
    for y in labels:
        if y == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(y)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("name", list(EOS))
def test_only_assistant_turns_and_their_end_of_turn_token_are_labelled(tok, name):
    conversation = TWO_TURNS if name == "mistral_v0_1" else SYSTEM_MULTI
    cfg = InstructionDataConfig("", "", chat_template="true")
    framing = Framing(tok, cfg, settings_for(name))
    alpaca = {"instruction": "Name a primary colour.", "input": "Just one.", "output": "Red."}
    records = [{"messages": conversation}, alpaca]
    examples, counts = encode_records(records, tok, cfg, "train", framing)
    assert not counts
    hf = hf_tokenizer(tok, name)
    as_chat = [
        conversation,
        [
            {"role": "user", "content": "Name a primary colour.\n\nJust one."},
            {"role": "assistant", "content": "Red."},
        ],
    ]
    for messages, (ids, labels) in zip(as_chat, examples, strict=True):
        # What is trained on is transformers' tokenization of the whole conversation...
        whole = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert ids == whole[:-1] and all(y in (-100, w) for y, w in zip(labels, whole[1:]))
        # ...and the targets are exactly each assistant turn's text and its end-of-turn token.
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        runs = [tok.decode(r, skip_special_tokens=False) for r in labelled_runs(ids, labels)]
        end = framing.template.end_of_turn(SPECIALS)
        assert end == EOS[name]
        trimmed = [r.strip() if name == "mistral_v0_1" else r for r in replies]
        assert runs == [r + end for r in replies] or runs == [r + end for r in trimmed]
        assert labels.count(-100) > 0 and len(runs) == len(replies)


def test_a_reply_whose_first_token_holds_template_text_is_counted_not_mislabelled(tok):
    """ "assistant\n" then a reply starting with a space: byte-level BPE makes "\n " one token,
    half template, half reply. It is not scored; the rest of the reply is; the example counted."""
    cfg = InstructionDataConfig("", "", chat_template="true")
    framing = Framing(tok, cfg, settings_for("smollm2"))
    spaced = [ONE_QUESTION[0], {"role": "assistant", "content": "  Red."}]
    (ids, labels), *_ = encode_records([{"messages": spaced}], tok, cfg, "t", framing)[0]
    counts = encode_records([{"messages": spaced}], tok, cfg, "t", framing)[1]
    assert tok.token_to_id("ĊĠ") is not None  # "\n " is one token of this vocabulary
    assert sum(counts.values()) == 1
    hf = hf_tokenizer(tok, "smollm2")
    assert ids == hf.apply_chat_template(spaced, tokenize=True, return_dict=False)[:-1]
    (run,) = labelled_runs(ids, labels)
    scored = tok.decode(run, skip_special_tokens=False)
    assert scored.endswith("Red.<|im_end|>") and scored != "  Red.<|im_end|>"


def test_without_a_template_existing_alpaca_examples_do_not_change():
    """GPT-2's tokenizer without settings, and with those of an HF GPT-2 directory's
    tokenizer_config.json (bos = eos = <|endoftext|>, no template), gives the examples of the
    Alpaca prompt followed by the response and <|endoftext|>, cut at max_len."""
    from lmforge.data.instructions import render_prompt
    from lmforge.data.tokenizer import gpt2_tokenizer

    gpt2 = plain(gpt2_tokenizer(ROOT / "data" / "gpt2_bpe"))
    records = json.loads((ROOT / "data" / "instructions" / "val.json").read_text())[:12]
    cfg = InstructionDataConfig("", "", max_len=64)
    eot = gpt2.token_to_id("<|endoftext|>")
    expected = []
    for r in records:
        prompt = gpt2.encode(render_prompt(r, cfg)).ids
        tokens = (prompt + gpt2.encode(r["output"]).ids + [eot])[: cfg.max_len + 1]
        if len(prompt) < cfg.max_len:
            expected.append((tokens[:-1], [-100] * (len(prompt) - 1) + tokens[len(prompt) :]))
    before, counts = encode_records(records, gpt2, cfg, "val")
    settings = TokenizerSettings.from_dict(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": False}
    )
    after, _ = encode_records(records, gpt2, cfg, "val", Framing(gpt2, cfg, settings))
    assert before == after == expected
    assert counts["response truncated"] >= 1 and any(y[-1] == eot for _, y in expected)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}],
            "message 2 has role 'robot': use one of system, user, assistant",
        ),
        ([{"role": "user", "content": "hi"}], "has no assistant message"),
        (
            [{"role": "system", "content": "x"}, *TWO_TURNS],
            "Conversation roles must alternate",  # Mistral's template raises
        ),
    ],
)
def test_bad_conversations_are_refused_in_one_line(tok, messages, needle):
    cfg = InstructionDataConfig("", "", chat_template="true")
    framing = Framing(tok, cfg, settings_for("mistral_v0_1"))
    records = [{"messages": TWO_TURNS}, {"messages": messages}]
    with pytest.raises(LMForgeError) as e:
        encode_records(records, tok, cfg, "chat.json", framing)
    assert str(e.value).startswith("chat.json record 2") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_a_conversation_without_a_template_or_format_mismatch_is_refused(tok):
    record = {"messages": TWO_TURNS}
    off = InstructionDataConfig("", "", chat_template="false")
    with pytest.raises(LMForgeError, match="record 1 is a conversation.*data.chat_template=false"):
        encode_records([record], tok, off, "chat.json", Framing(tok, off, settings_for("qwen2_5")))
    alpaca_only = InstructionDataConfig("", "", format="messages")
    with pytest.raises(LMForgeError, match="record 1 has no 'messages' list.*data.format=auto"):
        encode_records([{"instruction": "a", "output": "b"}], tok, alpaca_only, "a.json")


def tiny_chat_dir(tok: Tokenizer, root: Path, chat_template: str | None) -> Path:
    """A GPT-2 directory of a tiny random GPT with ``tok``, whose tokenizer_config.json names
    ChatML's end of turn as EOS and holds ``chat_template`` (none when None)."""
    from lmforge.interop.hf_gpt2 import export_hf_gpt2
    from lmforge.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tok.get_vocab_size(), block_size=256, n_layer=2, n_head=2, n_embd=64)
    )
    out = export_hf_gpt2(model, root, tok)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config |= {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_file.write_text(json.dumps(config))
    return out


def compose_generate(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmforge.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides))


def test_conversational_instruction_tuning_end_to_end_then_chat(tok, tmp_path, capsys):
    """Instruction tuning of a tiny GPT directory with SmolLM2's template on two conversations
    until it has learned them; its checkpoint keeps the template; ``lmforge-generate chat=true``
    wraps a training question in it and prints exactly the learned reply, stopping at
    <|im_end|>; the exported directory renders prompts in transformers as the run did."""
    from lmforge.checkpoint import load_checkpoint
    from lmforge.cli.generate import main as generate
    from lmforge.cli.train import train

    source = tiny_chat_dir(tok, tmp_path / "base", template("smollm2"))
    conversations = [
        {"messages": TWO_TURNS[:2]},
        {
            "messages": [
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "Hi!"},
            ]
        },
    ]
    data = tmp_path / "chat.json"
    data.write_text(json.dumps(conversations))
    cfg = compose_train(
        [
            "experiment=instruct_gpt",
            f"init_from={source}",
            f"data.train={data}",
            f"data.val={data}",
            "data.chat_template=true",
            "data.max_len=96",
            "data.batch_size=2",
            "data.sample_prompts=1",
            "task.max_new_tokens=8",
            "task.optim.lr=3e-3",
            "task.optim.min_lr=3e-3",
            "task.optim.warmup_steps=0",
            "trainer.max_epochs=50",
            "trainer.check_val_every_n_epoch=50",
            "trainer.enable_model_summary=false",
            "logger=csv",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["val/loss"] < 0.05  # learned: the replies are what is scored
    out = capsys.readouterr().out
    # The validation sample was rendered through the template and answered with the reply.
    assert f"at step 50 -----\n{TWO_TURNS[1]['content']}\n" in out
    ckpt_path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    carried = load_checkpoint(ckpt_path)["tokenizer_config"]
    assert carried["chat_template"] == template("smollm2") and carried["eos_token"] == "<|im_end|>"

    gen = compose_generate(
        f"ckpt_path={ckpt_path}",
        "chat=true",
        f"prompt='{TWO_TURNS[0]['content']}'",
        "temperature=0",
        "max_new_tokens=40",
    )
    replies = generate(gen)
    printed = capsys.readouterr().out
    assert replies == [TWO_TURNS[1]["content"]]  # stopped at <|im_end|>, nothing after it
    assert printed == TWO_TURNS[1]["content"] + "\n"  # the reply only, not the prompt
    unbounded = generate(
        compose_generate(
            f"ckpt_path={ckpt_path}",
            "prompt=Say",
            "temperature=0",
            "max_new_tokens=40",
            "stream=false",
        )
    )
    assert len(unbounded[0]) > 0  # chat=false still prints a continuation of the raw prompt

    from lmforge.cli.export import export

    exported = export(str(ckpt_path), str(tmp_path / "export"))
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = [{"role": "user", "content": "Say hi."}]
    ours = ChatTemplate(template("smollm2"), TokenizerSettings(), "x")
    assert hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == (
        ours.render(prompt, add_generation_prompt=True)
    )


def test_chat_template_asked_for_but_missing_is_one_line(tok, tmp_path, capsys):
    from lmforge.checkpoint import load_model
    from lmforge.cli.generate import main as generate
    from lmforge.data.datamodule import InstructionDataModule

    source = tiny_chat_dir(tok, tmp_path / "bare", chat_template=None)
    loaded = load_model(source)
    cfg = InstructionDataConfig("", "", chat_template="true")
    with pytest.raises(LMForgeError) as e:
        InstructionDataModule(cfg, loaded.tokenizer, settings=loaded.tokenizer_settings)
    message = str(e.value)
    assert str(source / "tokenizer_config.json") in message and "\n" not in message
    assert "data.chat_template=false" in message and "data.chat_template=<file.jinja>" in message
    # auto: no template, the Alpaca prompt (the tokenizer's EOS closing each response)
    auto = InstructionDataModule(
        InstructionDataConfig("", ""), loaded.tokenizer, settings=loaded.tokenizer_settings
    )
    assert auto.framing.template is None
    assert auto.framing.eos_id == tok.token_to_id("<|im_end|>")

    with pytest.raises(SystemExit) as exit_:
        generate(compose_generate(f"ckpt_path={source}", "chat=true", "prompt=hi"))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert (
        err.startswith("error: chat=true, but there is no chat template in")
        and "tokenizer_config.json" in err
    )
    # A template file given on the command line serves a directory without one.
    with pytest.raises(SystemExit) as exit_:
        generate(
            compose_generate(
                f"ckpt_path={source}",
                "chat=true",
                "prompt=hi",
                "system=sys",
                f"chat_template={TEMPLATES / 'mistral_v0_1.jinja'}",
            )
        )
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "Conversation roles must alternate" in err  # the template's own refusal, one line


def test_an_imported_qwen2_is_tuned_on_conversations_and_its_export_chats_in_transformers(
    tok, tmp_path, capsys
):
    """A tiny Qwen2 directory written by transformers, its tokenizer carrying Qwen2.5's chat
    template, is instruction-tuned on the bundled conversations; the export loads in
    transformers as a Qwen2ForCausalLM, and its greedy reply to a chat prompt is the reply
    ``lmforge-generate chat=true`` prints."""
    from lmforge.cli.export import export
    from lmforge.cli.generate import main as generate
    from lmforge.cli.train import train

    base = tmp_path / "qwen2"
    torch.manual_seed(0)
    qwen = transformers.Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    transformers.Qwen2ForCausalLM(qwen).save_pretrained(base)
    hf_tokenizer(tok, "qwen2_5").save_pretrained(base)
    cfg = compose_train(
        [
            "experiment=instruct_gpt",
            f"init_from={base}",
            f"data.train={ROOT / 'data' / 'instructions' / 'chat_train.json'}",
            f"data.val={ROOT / 'data' / 'instructions' / 'chat_val.json'}",
            "data.format=messages",
            "data.chat_template=true",
            "data.max_len=128",
            "data.batch_size=4",
            "data.sample_prompts=0",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=2",
            "trainer.enable_model_summary=false",
            "logger=csv",
            "callbacks.progress_bar=null",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    question = "Name a primary colour."
    capsys.readouterr()
    ours = generate(
        compose_generate(
            f"ckpt_path={ckpt}",
            "chat=true",
            f"prompt='{question}'",
            "temperature=0",
            "max_new_tokens=12",
            "stream=false",
        )
    )[0]

    out = export(str(ckpt), str(tmp_path / "export"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    hf = transformers.AutoTokenizer.from_pretrained(out)
    prompt = hf.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")  # Qwen2.5's template, system turn included
    ids = torch.tensor([hf(prompt, add_special_tokens=False)["input_ids"]])
    new = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.size(1) :].tolist()
    end = hf.convert_tokens_to_ids("<|im_end|>")
    reply = new[: new.index(end)] if end in new else new
    assert hf.decode(reply, clean_up_tokenization_spaces=False) == ours
