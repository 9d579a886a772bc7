"""The prompt around a review: the chat template's own tokens, the primer's slot, right padding, any chat model
(templates without a system role, no template, labels tokenized in context) and PRIMER_POSITION."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import experiment
import prompt_long
import prompt_short
from conftest import overrides, run_script
from harness import cli, data, errors, frozen, layouts, primers, runs

# Mistral-7B-Instruct-v0.2's template: user and assistant turns only, a system message raises
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}"
                    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
                    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
                    "{% endif %}{% endfor %}")
SHORT_RUN = ["--rate_by_epoch=[0.1]", "--train_limit=40", "--test_limit=20"]


def variant(tiny, root, name: str, edit) -> str:
    """A folder with the tiny model (same vocabulary, same weights) and its tokenizer changed by edit(tokenizer)."""
    from transformers import AutoTokenizer
    path = str(root / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    edit(tokenizer)
    tokenizer.save_pretrained(path)
    for file in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny.model_dir, file), path)
    return path


def set_template(template):
    return lambda tokenizer: setattr(tokenizer, "chat_template", template)


def prepend_space(tokenizer):
    """Llama 2's legacy SentencePiece habit: a space before every text piece, so "1" alone is " 1" but not after
    "\\n\\n"."""
    from tokenizers import normalizers
    tokenizer.backend_tokenizer.normalizer = normalizers.Prepend(" ")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {"mistral": variant(tiny, root, "mistral", set_template(MISTRAL_TEMPLATE)),
            "plain": variant(tiny, root, "plain", set_template(None)),
            "prepend": variant(tiny, root, "prepend", prepend_space)}


def task_for(tiny, tmp_path, model_dir: str) -> runs.Task:
    layouts.say_once.cache_clear()  # each test sees its own notes
    return runs.setup(cli.configure(overrides(tiny, tmp_path) + [f"--model_id={model_dir}"]), with_train=False)


def decode(task, ids: torch.Tensor) -> str:
    return task.tokenizer.decode(ids.tolist())


def review(split, i: int) -> torch.Tensor:
    return split.tokens[split.offsets[i]:split.offsets[i + 1]].long()


def unpadded_logits(task, layout, split, i: int, primer) -> torch.Tensor:
    """The model's own forward over one review's unpadded embeddings, full logits, the last position's row."""
    embeds = layouts.unpadded_embeds(task.model, layout, review(split, i), primer)
    return task.model(inputs_embeds=embeds[None]).logits[0, -1].float()


def test_prefix_and_suffix_put_the_primer_before_bos_and_after_the_review(task):
    prefix = layouts.make_layout(task, None, primer_length=4, position="prefix")
    assert prefix.slot == slice(0, 4) and not prefix.in_suffix
    assert decode(task, prefix.prefix[4:]) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
    suffix = layouts.make_layout(task, None, primer_length=4, position="suffix")
    assert suffix.slot == slice(0, 4) and suffix.in_suffix and suffix.prompt_tokens == 4
    assert decode(task, suffix.prefix) == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
    assert decode(task, suffix.suffix[4:]) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    with pytest.raises(errors.UserError, match="--primer_position='middle' is not one of system, prefix, suffix"):
        layouts.make_layout(task, None, primer_length=4, position="middle")
    with pytest.raises(errors.UserError, match="does not combine with --gradient_checkpointing=True"):
        layouts.check_primer_position("suffix", checkpointing=True)


@pytest.mark.parametrize("position", layouts.PRIMER_POSITIONS)
def test_logits_are_the_unpadded_forward_whatever_the_batch(task, position):
    """Every row's logits equal the plain forward of that review alone, in any batch, for every position."""
    layout = layouts.make_layout(task, None, primer_length=4, position=position)
    primer = primers.init_primer(task.model, 4, seed=1)
    lengths = task.test.lengths
    short, long_ = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[long_] > lengths[short] + 10  # real padding below
    for batch in ([short], [short, long_], [long_, 7, short, 2], [short] * 3):
        ids, n = layouts.assemble(layout, task.test, torch.tensor(batch))
        with torch.no_grad():
            logits = frozen.forward(task.model, ids, n, layout, primer).logits
            for row, i in enumerate(batch):
                torch.testing.assert_close(logits[row], unpadded_logits(task, layout, task.test, i, primer),
                                           atol=1e-5, rtol=1e-5)


def test_suffix_cache_gives_the_plain_loss_and_primer_gradient(task):
    layout = layouts.make_layout(task, None, primer_length=4, position="suffix")
    idx = task.train.lengths.argsort()[::16][:6]  # six reviews of spread lengths
    targets = task.label_ids[task.train.labels[idx]]

    def loss_and_grad(logits_of):
        primer = primers.init_primer(task.model, 4, seed=0).requires_grad_(True)
        loss = F.cross_entropy(logits_of(primer), targets)
        loss.backward()
        return loss.detach(), primer.grad

    ids, lengths = layouts.assemble(layout, task.train, idx)
    cached = loss_and_grad(lambda primer: frozen.forward(task.model, ids, lengths, layout, primer).logits)
    plain = loss_and_grad(lambda primer: torch.stack([unpadded_logits(task, layout, task.train, int(i), primer)
                                                      for i in idx]))
    assert cached[1].abs().sum() > 0
    torch.testing.assert_close(cached, plain, atol=1e-6, rtol=1e-5)


def test_template_without_system_role_takes_the_system_content_in_the_user_turn(tiny, models, tmp_path, capsys):
    task = task_for(tiny, tmp_path, models["mistral"])
    layout = layouts.make_layout(task, None, primer_length=4)
    assert decode(task, layout.prefix[:layout.slot.start]) == "<|begin_of_text|>[INST] "
    assert layout.joins == ("\n\n", " [/INST]") and len(layout.prefix) == layout.slot.stop and not len(layout.suffix)
    assert task.label_ids.tolist() == task.tokenizer.convert_tokens_to_ids(["1", "2"])  # right after "]"
    text = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER)
    ids, _ = layouts.assemble(text, task.test, torch.tensor([3]))
    user = prompt_short.SYSTEM + "\n\n" + prompt_short.USER.replace("{review}", decode(task, review(task.test, 3)))
    assert decode(task, ids[0]) == f"<|begin_of_text|>[INST] {user} [/INST]"
    assert capsys.readouterr().out.count("takes no system message: "
                                         "the system content or primer goes at the start of the user turn") == 1


def test_tokenizer_without_template_gets_a_plain_prompt(tiny, models, tmp_path, capsys):
    task = task_for(tiny, tmp_path, models["plain"])
    layout = layouts.make_layout(task, None, primer_length=4)
    assert layout.slot == slice(1, 5) and decode(task, layout.prefix[:1]) == "<|begin_of_text|>"
    assert layout.joins == ("\n\n", "\nAnswer:") and len(layout.prefix) == 5 and not len(layout.suffix)
    text = layouts.make_layout(task, "Rate it.", "Review: {review}")
    assert decode(task, text.prefix) == "<|begin_of_text|>" and text.joins == ("Rate it.\n\nReview: ", "\nAnswer:")
    assert task.label_ids.tolist() == task.tokenizer.convert_tokens_to_ids(["1", "2"])
    assert capsys.readouterr().out.count("has no chat template: the prompt is bos, the system content or primer, "
                                         "the review and '\\nAnswer:'") == 1


def test_labels_are_tokenized_where_the_answer_goes(tiny, models, tmp_path):
    task = task_for(tiny, tmp_path, models["prepend"])
    encode = lambda s: task.tokenizer(s, add_special_tokens=False)["input_ids"]
    assert len(encode("1")) == 2  # alone, "1" is " 1": two tokens, which the old check refused
    assert task.label_ids.tolist() == task.tokenizer.convert_tokens_to_ids(["1", "2"])
    with pytest.raises(errors.UserError, match="label 'great' merges with the prompt's last token 'Sentiment: '"):
        layouts.label_token_ids(task.tokenizer, ["great", "bad"], "Sentiment: ")  # " great" is one token


def test_positions_and_any_model_through_the_command_line(tiny, models, tmp_path, capsys):
    cases = {"prefix": [], "suffix": [f"--model_id={models['plain']}"], "system": [f"--model_id={models['mistral']}"]}
    for position, extra in cases.items():
        out = tmp_path / position
        args = [*overrides(tiny, out), *SHORT_RUN, f"--primer_position={position}", *extra]
        if position == "prefix":  # one through the command line, the others as it runs them
            stdout = run_script("experiment.py", *args).stdout
        else:
            layouts.say_once.cache_clear()
            experiment.run(cli.configure(args))
            stdout = capsys.readouterr().out
        assert "| Run | Method | Train reviews | Params | Tokens |" in stdout
        method = "primer" if position == "system" else f"primer ({position})"
        assert f"-experiment | {method} | 40 | 256 | 4 |" in stdout
        (run,) = [d for d in os.listdir(out / "results") if d.endswith("experiment")]
        assert json.loads((out / "results" / run / "config.json").read_text())["primer_position"] == position
        note = ("the system content or primer goes at the start of the user turn" if position == "system"
                else "has no chat template")
        assert (note in stdout) == (position != "prefix")
    wrong = cli.configure(overrides(tiny, tmp_path / "wrong") + ["--primer_position=middle"])
    with pytest.raises(errors.UserError, match="--primer_position='middle' is not one of system, prefix, suffix"):
        experiment.run(wrong)
    assert not os.path.exists(wrong.DATA_DIR)  # refused before preparing data or loading the model


SEAM_REVIEWS = ["Loved it!", "Fine food.", "Would I go back?", "So good!!", "meh"]  # BPE merges "!\n", ".\n", "?\n"


@pytest.fixture(scope="module")
def seam_task(tiny, tmp_path_factory):
    """A task whose tokenizer has Llama 3's split pattern and merges across the review's end, as a real one has."""
    from tiny import build_tokenizer
    endings = ["\n```\n\n# Classification", "\n```\n\n# Output", "\nAnswer:"]
    corpus = [r + e for r in SEAM_REVIEWS for e in endings] * 50 + [t for _, t in tiny.splits["train"]]
    tokenizer = build_tokenizer(corpus, str(tmp_path_factory.mktemp("seams")))
    # "!\n", ".\n" and "?\n" are single tokens
    assert all(len(tokenizer(r + "\n", add_special_tokens=False)["input_ids"])
               < len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1
               for r in SEAM_REVIEWS[:3])
    cfg = cli.configure(overrides(tiny, tmp_path_factory.mktemp("seam_cfg")))
    tokens, offsets, _ = data.tokenize(tokenizer, SEAM_REVIEWS, 100)
    split = data.Split(tokens, offsets, torch.zeros(len(SEAM_REVIEWS), dtype=torch.long), {})
    return runs.Task(cfg, tokenizer, None, torch.device("cpu"), torch.tensor([0, 1]), None, split)


@pytest.mark.parametrize("template", ["llama3", "mistral", "none"])
def test_every_layout_is_the_tokenizers_own_tokenization_of_its_text(seam_task, template):
    """Wherever the prompt is text, the ids equal tokenizer(whole prompt text); only the primer slot is spliced."""
    tok, primer = seam_task.tokenizer, "\x01"  # the primer's place in the expected text, tokenized on each side
    tok.chat_template = {"llama3": tok.chat_template, "mistral": MISTRAL_TEMPLATE, "none": None}[template]
    layouts.say_once.cache_clear()
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    cases = {("system", prompt_short.SYSTEM, prompt_short.USER), ("system", prompt_long.SYSTEM, prompt_long.USER),
               ("system", None, "{review}"), ("prefix", None, "{review}"), ("suffix", None, "{review}")}
    for position, system, user in cases:
        layout = layouts.make_layout(seam_task, system, user, primer_length=0 if system else 4, position=position)
        for i, review in enumerate(SEAM_REVIEWS):
            ids, _ = layouts.assemble(layout, seam_task.test, torch.tensor([i]))
            content = user.replace("{review}", review)
            if position == "prefix":
                text = primer + layouts.prompt_text(tok, None, content, seam_task.cfg.TEMPLATE_KWARGS)
            elif position == "suffix":
                text = layouts.prompt_text(tok, None, content + primer, seam_task.cfg.TEMPLATE_KWARGS)
            else:
                text = layouts.prompt_text(tok, system or primer, content, seam_task.cfg.TEMPLATE_KWARGS)
            if system:
                assert ids[0].tolist() == encode(text), (template, system, review)
                continue
            before, after = text.split(primer)
            start = len(encode(before))
            assert ids[0, :start].tolist() == encode(before) and ids[0, start + 4:].tolist() == encode(after), (
                template, position, review)


def test_text_layout_is_the_chat_template_tokenized(task):
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER)
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([3]))
    review = task.tokenizer.decode(task.test.tokens[task.test.offsets[3]:task.test.offsets[4]].tolist())
    messages = [{"role": "system", "content": prompt_short.SYSTEM},
                {"role": "user", "content": prompt_short.USER.replace("{review}", review)}]
    text = task.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              date_string="26 Jul 2024")
    assert ids[0].tolist() == task.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert lengths.tolist() == [ids.shape[1]]


def test_primer_slot_is_the_system_message(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    decode = lambda t: task.tokenizer.decode(t.tolist())
    assert decode(layout.prefix[:layout.slot.start]).endswith("system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n")
    assert decode(layout.prefix[layout.slot.stop:]) == "<|eot_id|><|start_header_id|>user<|end_header_id|>"
    assert layout.joins == ("\n\n", "")  # tokenized with the review: no special token between them
    assert decode(layout.suffix) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert layout.slot.stop - layout.slot.start == layout.prompt_tokens == 4


def test_assemble_right_pads_each_review_in_its_layout(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    idx = torch.tensor([5, 0, 9])
    ids, lengths = layouts.assemble(layout, task.test, idx)
    for row, i in enumerate(idx):
        text = task.tokenizer.decode(task.test.tokens[task.test.offsets[i]:task.test.offsets[i + 1]])
        review = task.tokenizer("\n\n" + text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        expected = torch.cat([layout.prefix, review, layout.suffix])
        assert lengths[row] == len(expected)
        assert torch.equal(ids[row, :len(expected)], expected) and (ids[row, len(expected):] == 0).all()
