"""The one forward pass: logits that do not depend on batch mates or padding, read in float32, the same under gradient
checkpointing; a primer per row, steering vectors, hidden states, and a peft-wrapped model."""
import copy
import dataclasses
import types
import warnings

import pytest
import torch

from harness import adapters, frozen, hub, layouts, primers

BATCHES = ([0], [0, 5], [5, 2, 0, 9])  # review 0 alone and among longer and shorter batch mates


def outputs(task, layout, idx, **inputs) -> frozen.Output:
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor(idx))
    with torch.no_grad():
        return frozen.forward(task.model, ids, lengths, layout, **inputs)


def assert_row_independent(task, layout, make_inputs, layers=()):
    """Every output of review 0 is the same in each batch of BATCHES (make_inputs(idx) gives its inputs)."""
    alone = outputs(task, layout, [0], layers=layers, **make_inputs([0]))
    for idx in BATCHES[1:]:
        together = outputs(task, layout, idx, layers=layers, **make_inputs(idx))
        row = idx.index(0)
        torch.testing.assert_close(together.logits[row], alone.logits[0], atol=1e-5, rtol=1e-5)
        for l in layers:
            torch.testing.assert_close(together.last[l][row], alone.last[l][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together.mean[l][row], alone.mean[l][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", layouts.PRIMER_POSITIONS)
def test_a_primer_per_row_is_each_rows_own_primer(task, position):
    layout = layouts.make_layout(task, None, primer_length=3, position=position)
    per_review = torch.stack([primers.init_primer(task.model, 3, seed=i) for i in range(10)])
    assert_row_independent(task, layout, lambda idx: {"primer": per_review[idx]})
    for i in (0, 5):  # a row's output is that of its primer given to the whole batch
        shared = outputs(task, layout, [i, 2], primer=per_review[i])
        torch.testing.assert_close(outputs(task, layout, [i, 2], primer=per_review[[i, 2]]).logits[0], shared.logits[0],
                                   atol=1e-5, rtol=1e-5)


def test_hidden_states_are_the_models_own_at_the_last_and_over_the_review(task):
    layout = layouts.make_layout(task, "Classify.", "Review: {review}")
    assert_row_independent(task, layout, lambda idx: {}, layers=(0, 1, 2))
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([3]))
    out = outputs(task, layout, [3], layers=(0, 1))
    with torch.no_grad():
        states = task.model(input_ids=ids, output_hidden_states=True).hidden_states
    review = slice(len(layout.prefix), int(lengths[0]) - len(layout.suffix))
    for l in (0, 1):
        torch.testing.assert_close(out.last[l][0], states[l][0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mean[l][0], states[l][0, review].mean(0), atol=1e-5, rtol=1e-5)


def test_steering_adds_where_it_is_told_and_nowhere_else(task):
    layout = layouts.make_layout(task, None)
    vector = torch.randn(task.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for after_review in (False, True):
        steer = frozen.Steer(vector, layers=(1,), coefficient=4.0, after_review=after_review)
        assert_row_independent(task, layout, lambda idx: {"steer": steer}, layers=(1,))
    plain = outputs(task, layout, [0, 5], layers=(1, 2))
    late = outputs(task, layout, [0, 5], layers=(1, 2), steer=frozen.Steer(vector, (1,), 4.0, after_review=True))
    everywhere = outputs(task, layout, [0, 5], layers=(1, 2), steer=frozen.Steer(vector, (1,), 4.0))
    torch.testing.assert_close(late.mean[1], plain.mean[1])  # the review's positions are left alone
    torch.testing.assert_close(late.last[1], plain.last[1] + 4.0 * vector)  # the answer position is steered
    torch.testing.assert_close(everywhere.mean[1], plain.mean[1] + 4.0 * vector)
    assert not torch.allclose(late.logits, plain.logits)
    torch.testing.assert_close(outputs(task, layout, [0, 5], steer=frozen.Steer(vector, (1,), 0.0)).logits,
                               plain.logits)


def test_a_steered_forward_reuses_the_layers_below_and_gives_the_full_forwards_logits_and_gradients(task):
    """Without a primer a steered forward runs the layers above the steered one on the layout's kept outputs of
    that layer: the full forward's logits and gradient (which `layers` asks for), in any batch."""
    count = len(task.model.get_decoder().layers)
    vector = torch.randn(task.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    for layers, after_review in (((2,), False), ((1, count), True)):  # the kept layer 2, or 1 and one above
        layout = layouts.make_layout(task, None)
        steer = frozen.Steer(vector.clone().requires_grad_(), layers, 3.0, after_review)
        ids, lengths = layouts.assemble(layout, task.test, torch.tensor([5, 2, 0, 9]))
        full = frozen.forward(task.model, ids, lengths, layout, steer=steer, layers=(count,)).logits
        (want,) = torch.autograd.grad(full.logsumexp(-1).sum(), steer.vector)
        for _ in range(2):  # computing the kept outputs, then reusing them
            reused = frozen.forward(task.model, ids, lengths, layout, steer=steer).logits
            (got,) = torch.autograd.grad(reused.logsumexp(-1).sum(), steer.vector)
            torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        kept = layout.cache["kept", id(task.model.get_decoder())].states
        assert [kind for kind, _ in kept] == [f"layer {min(layers)}"] * 4
        assert_row_independent(task, layout, lambda idx: {"steer": steer})


def test_the_prefix_every_row_begins_with_runs_once_and_gives_the_full_forwards_logits_and_gradients(task):
    """A system-message primer and the text around it are the same in every row: forward runs them once for the
    batch, at batch size 1, and the rows' reviews on their key-value cache. Logits (at the last position and the last
    few) and the gradients of the primer, and of a LoRA on the decoder, are the full forward's (which `layers` asks
    for)."""
    from peft import LoraConfig, get_peft_model
    count = len(task.model.get_decoder().layers)
    layout = layouts.make_layout(task, None, primer_length=3)
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([5, 2, 0, 9]))
    with adapters.quiet_peft():
        wrapped = get_peft_model(copy.deepcopy(task.model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.5)
    rows = []  # the rows and columns decoder layer 0 runs
    hook = wrapped.get_decoder().layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True)
    try:
        for span in (1, 3):
            primer = primers.init_primer(task.model, 3, seed=2).requires_grad_()
            got = {}
            for name, layers in (("shared", ()), ("full", (count,))):
                rows.clear()
                logits = frozen.forward(wrapped, ids, lengths, layout, primer, layers=layers, span=span).logits
                got[name] = (logits, rows[:], *torch.autograd.grad(logits.logsumexp(-1).sum(), [primer, *lora]))
            assert got["shared"][1] == [(1, len(layout.prefix)), (4, ids.shape[1] - len(layout.prefix))]
            assert got["full"][1] == [(4, ids.shape[1])]
            torch.testing.assert_close(got["shared"][0], got["full"][0], atol=1e-4, rtol=1e-4)
            for shared, full in zip(got["shared"][2:], got["full"][2:]):
                torch.testing.assert_close(shared, full, atol=1e-4, rtol=1e-4)
    finally:
        hook.remove()


def test_the_forward_reaches_a_peft_wrapped_decoder(task):
    from peft import LoraConfig, get_peft_model
    layout = layouts.make_layout(task, None, primer_length=2)
    primer = primers.init_primer(task.model, 2, seed=0)
    with adapters.quiet_peft():
        wrapped = get_peft_model(copy.deepcopy(task.model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings(record=True) as caught:  # peft's two warnings about its own calls stay quiet
        warnings.simplefilter("always")
        for method in adapters.PEFT_METHODS:
            adapters.with_peft(types.SimpleNamespace(model=copy.deepcopy(task.model)),
                               adapters.peft_config(method, adapters.Lora(2, 2, ["q_proj"])), "--method")
    assert [str(w.message) for w in caught] == []
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([0, 5]))
    with torch.no_grad():
        base = frozen.forward(task.model, ids, lengths, layout, primer).logits
        # LoRA B starts at 0
        torch.testing.assert_close(frozen.forward(wrapped, ids, lengths, layout, primer).logits, base)
    lora = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.5)
    logits = frozen.forward(wrapped, ids, lengths, layout, primer).logits
    assert not torch.allclose(logits, base)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_mean_pooling_takes_the_reviews_own_tokens_not_the_prompt_text_joined_to_it(task):
    """A text prompt runs into the review ("Review: " + review + " Stars?"), tokenized together with it: extract's mean
    is over the review's own tokens (found here by the tokenizer's char_to_token on the unpadded text), in any batch."""
    from harness import activations
    layout = layouts.make_layout(task, "Classify.", "Review: {review} Stars?")
    assert all(layout.joins)
    idx = [3, 0, 5, 9]
    batched = lambda size: dataclasses.replace(task, cfg=types.SimpleNamespace(**{**vars(task.cfg),
                                                                                  "SCORE_BATCH_SIZE": size}))
    pooled = {size: activations.extract(batched(size), layout, task.test.subset(torch.tensor(idx)), (0, 1), ("mean",))
              for size in (1, 4)}
    torch.testing.assert_close(pooled[1]["mean"], pooled[4]["mean"], atol=1e-5, rtol=1e-5)
    head, tail = layout.joins
    for row, i in enumerate(idx):
        review = task.test.tokens[task.test.offsets[i]:task.test.offsets[i + 1]].tolist()
        text = task.tokenizer.decode(review, clean_up_tokenization_spaces=False)
        encoding = task.tokenizer(head + text + tail, add_special_tokens=False)
        first, last = encoding.char_to_token(len(head)), encoding.char_to_token(len(head) + len(text) - 1)
        assert encoding.char_to_token(0) < first and last < encoding.char_to_token(len(head + text + tail) - 1)
        ids = torch.cat([layout.prefix, torch.tensor(encoding["input_ids"]), layout.suffix])[None]
        with torch.no_grad():
            states = task.model(input_ids=ids, output_hidden_states=True).hidden_states
        own = slice(len(layout.prefix) + first, len(layout.prefix) + last + 1)
        for n, l in enumerate((0, 1)):  # (HF normalizes the last layer's hidden states)
            torch.testing.assert_close(pooled[4]["mean"][n, row], states[l][0, own].mean(0), atol=1e-5, rtol=1e-5)


def test_logits_do_not_depend_on_batch_mates_or_padding(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, seed=1)
    lengths = task.test.lengths
    short, long_ = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[long_] > lengths[short] + 10  # so the short review gets real padding below

    def logits(idx):
        ids, n = layouts.assemble(layout, task.test, torch.tensor(idx))
        return frozen.forward(task.model, ids, n, layout, primer).logits

    alone = logits([short])[0]
    for batch in ([short, long_], [long_, 7, short, 2], [short] * 3):
        together = logits(batch)[batch.index(short)]
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(task):
    """The same loss and primer gradient with and without checkpointing the layers."""
    layout = layouts.make_layout(task, None, primer_length=4)
    ids, lengths = layouts.assemble(layout, task.train, torch.arange(6))
    targets = task.label_ids[task.train.labels[:6]]

    def loss_and_grad():
        primer = primers.init_primer(task.model, 4, seed=0).requires_grad_(True)
        logits = frozen.forward(task.model, ids, lengths, layout, primer).logits
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        return loss.detach(), primer.grad

    plain = loss_and_grad()
    hub.freeze(task.model, checkpointing=True)
    try:
        checkpointed = loss_and_grad()
        calls = []
        hook = task.model.base_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        loss_and_grad()
        hook.remove()
    finally:
        task.model.activation_checkpointing_disable()
        task.model.eval()
    assert len(calls) == 2  # the first layer's MLP ran again in the backward pass: checkpointing really was on
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_answers_are_read_from_float32_logits_in_a_bfloat16_model(task):
    """Two label logits that tie in bfloat16 (its step is 0.25 at 50) but not in float32 pick the right label."""
    model = copy.deepcopy(task.model).to(torch.bfloat16)
    layout = layouts.make_layout(task, None, primer_length=0)
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([0]))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1]
        one, two = task.label_ids.tolist()
        head = model.get_output_embeddings().weight
        head[one] = (hidden.float() * 50 / hidden.float().square().sum()).to(torch.bfloat16)  # logit about 50
        head[two] = head[one]
        j = int(hidden.float().abs().argmax())
        head[two, j] = torch.nextafter(head[one, j], head[one, j] + hidden[j].sign())  # one bfloat16 step up the logit
        in_bf16 = model.get_output_embeddings()(hidden)[[one, two]]
        logits = frozen.forward(model, ids, lengths, layout, None).logits[0, [one, two]]
    assert in_bf16[0] == in_bf16[1], "the case no longer ties in bfloat16: pick another magnitude"
    assert logits.dtype == torch.float32 and logits[1] > logits[0]
