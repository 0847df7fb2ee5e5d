"""``prepare`` runs the processor once and gives exactly what the former three-call implementation gave.

The reference below is the former ``HFAdapter.prepare`` (processor on the prompt, on the full text, and on
the prompt + answer without the end of turn), kept here verbatim as the known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfocus.errors import ModelError

DIRECT_Q = "Is there evidence of cardiomegaly in the image? Answer directly with yes or no without any explanation."
COT_Q = "Is there evidence of cardiomegaly in the image? Think step by step and answer with yes or no."
CASES = [(DIRECT_Q, "Yes"), (DIRECT_Q, "No"), (COT_Q, "The cardiac silhouette is enlarged. Therefore, yes."),
         (COT_Q, "Lung markings extend to the chest wall on both sides. Therefore, no.")]


def _reference_prepare(adapter, image, question, answer, include_eot):
    """The former implementation: three processor calls. Returns (inputs, prompt_len, span, ids)."""
    canvas, _ = adapter.letterbox(image)
    prompt_text = adapter.render(question)
    prompt = adapter._process([prompt_text], [canvas])
    prompt_len = int(prompt["input_ids"].shape[1])
    if answer is None:
        return prompt, prompt_len, None, None
    full_text = adapter.render(question, answer)
    assert full_text.startswith(prompt_text)
    rest = full_text[len(prompt_text):]
    ans = answer.strip()
    k = rest.find(ans)
    assert k >= 0
    inputs = adapter._process([full_text], [canvas])
    full_ids = inputs["input_ids"][0]
    assert torch.equal(full_ids[:prompt_len], prompt["input_ids"][0])
    if include_eot:
        end = int(full_ids.shape[0])
    else:
        ans_only = adapter._process([prompt_text + rest[: k + len(ans)]], [canvas])["input_ids"][0]
        assert torch.equal(full_ids[: ans_only.shape[0]], ans_only)
        end = int(ans_only.shape[0])
    return inputs, prompt_len, (prompt_len, end), full_ids[prompt_len:end]


class _CountingProcessor:
    """Delegates to a processor and counts its ``__call__``s (image preprocessing + expansion)."""

    def __init__(self, proc):
        self._proc, self.calls = proc, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self._proc(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._proc, name)


def _image(h=200, w=170, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w)).astype(np.uint8)


def _check_same(adapter, image, question, answer, include_eot):
    ref_inputs, ref_plen, ref_span, ref_ids = _reference_prepare(adapter, image, question, answer, include_eot)
    counting = _CountingProcessor(adapter.processor)
    adapter.processor = counting
    try:
        chat = adapter.prepare(image, question, answer, include_eot=include_eot)
    finally:
        adapter.processor = counting._proc
    assert counting.calls == 1
    assert chat.prompt_len == ref_plen
    assert chat.answer_span == ref_span
    if ref_ids is None:
        assert chat.answer_token_ids is None
    else:
        assert torch.equal(chat.answer_token_ids.cpu(), ref_ids)
        assert chat.answer_tokens == [adapter.tokenizer.decode([int(t)]) for t in ref_ids]
    assert set(chat.inputs) == set(ref_inputs)
    for k, v in ref_inputs.items():
        got = chat.inputs[k].cpu()
        want = v.to(adapter.model.dtype) if k == "pixel_values" else v
        assert got.dtype == want.dtype and torch.equal(got, want), k
    return chat


@pytest.mark.parametrize("fam", ["qwen_vl", "gemma3", "llava"])
def test_prepare_one_processor_call_identical_on_tiny_families(tiny_adapters, fam):
    adapter = tiny_adapters[fam]
    img = _image()
    for q, a in CASES:
        for eot in (False, True):
            chat = _check_same(adapter, img, q, a, eot)
            assert chat.n_answer_tokens >= 1
    _check_same(adapter, img, DIRECT_Q, None, False)


def test_prepare_one_processor_call_identical_on_demo_model(demo_adapter):
    img = _image(256, 256, seed=3)
    for q, a in CASES:
        for eot in (False, True):
            _check_same(demo_adapter, img, q, a, eot)
    _check_same(demo_adapter, img, COT_Q, None, False)


def test_prepare_eot_span_is_longer_and_errors_kept(tiny_adapters):
    adapter = tiny_adapters["qwen_vl"]
    img = _image()
    a = adapter.prepare(img, DIRECT_Q, "Yes")
    b = adapter.prepare(img, DIRECT_Q, "Yes", include_eot=True)
    assert b.answer_span[0] == a.answer_span[0] and b.answer_span[1] > a.answer_span[1]
    # the span decodes to the answer itself
    assert adapter.tokenizer.decode(a.answer_token_ids).strip() == "Yes"
    with pytest.raises(ModelError, match="has no tokens"):
        adapter.prepare(img, DIRECT_Q, "   ")
