"""GPU timing of teacher-forced answer scoring on full-size Qwen2.5-VL-3B and Gemma-3-4B architectures.

No weights are needed for timing: the models are built randomly initialised from the public
architecture numbers of ``Qwen/Qwen2.5-VL-3B-Instruct`` and ``google/gemma-3-4b-it`` (config.json
values written out below), in bfloat16 on CUDA, with the real processors' image settings (Qwen canvas
448 -> 256 image tokens; Gemma 896 -> 256 image tokens) and our locally trained tokenizers (token
ids are a subset of the real vocabulary; the LM head keeps the full vocabulary size).

For each model and batch size 1 / 16 / 64 it times ``medfocus.lvlm.scoring.score_chat`` on ``B``
masked variants of one chat (what occlusion / RISE / MedFocus do), and -- for contrast -- the naive
path that materialises ``(B, S, vocab)`` logits; it reports ms per call, ms per image and peak GPU
memory, and writes a markdown table naming the card.

    python benchmarks/gpu_scoring.py --out benchmarks/gpu_scoring.md     # on a GPU
    python benchmarks/gpu_scoring.py --tiny --out /tmp/dry.md             # CPU dry run, tiny sizes
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medfocus.lvlm.scoring import score_chat  # noqa: E402
from medfocus.types import SUFFIXES, question_stem  # noqa: E402

# Public config.json numbers (Qwen/Qwen2.5-VL-3B-Instruct).
QWEN_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    tie_word_embeddings=True)
QWEN_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                      tokens_per_second=2)
# Public config.json numbers (google/gemma-3-4b-it).
GEMMA3_4B_TEXT = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
                      max_position_embeddings=131072,
                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
GEMMA3_4B_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        image_size=896, patch_size=14, vision_use_head=False)
GEMMA3_4B_MM_TOKENS = 256


def _layer_types(n: int, pattern: int = 6) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def build_qwen(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medfocus.lvlm.families.qwen_vl import QwenVLAdapter, QwenVLImageProcessor
    from medfocus.lvlm.tiny.qwen_vl import QWEN_CHAT_TEMPLATE, _qwen_tokenizer, qwen_vl_config

    tok = _qwen_tokenizer()
    if tiny:
        cfg, canvas = qwen_vl_config(tok), 112
    else:
        text = dict(QWEN_3B_TEXT)
        cfg, canvas = qwen_vl_config(tok, text=text, vision=dict(QWEN_3B_VISION)), 448
        cfg.tie_word_embeddings = True
    cfg.text_config.vocab_size = max(cfg.text_config.vocab_size, len(tok))
    model = _instantiate(Qwen2_5_VLForConditionalGeneration, cfg, device, dtype)
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=12845056)
    proc = QwenVLImageProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return QwenVLAdapter(model, proc, "Qwen2.5-VL-3B (random init)" if not tiny else "tiny qwen_vl", (canvas, canvas))


def build_gemma(tiny: bool, device: torch.device, dtype: torch.dtype):
    import tempfile

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    from medfocus.lvlm.families.gemma3 import Gemma3Adapter
    from medfocus.lvlm.tiny.gemma3 import build_tiny_gemma3

    # Tokenizer + processor from the tiny builder (real Gemma3Processor, locally trained tokenizer).
    with tempfile.TemporaryDirectory() as d:
        build_tiny_gemma3(Path(d), 0, 112)
        proc = Gemma3Processor.from_pretrained(d)
        small = Gemma3Config.from_pretrained(d)
    if tiny:
        cfg = small
    else:
        text = dict(GEMMA3_4B_TEXT, layer_types=_layer_types(GEMMA3_4B_TEXT["num_hidden_layers"]),
                    pad_token_id=small.text_config.pad_token_id, bos_token_id=small.text_config.bos_token_id,
                    eos_token_id=small.text_config.eos_token_id)
        cfg = Gemma3Config(text_config=text, vision_config=dict(GEMMA3_4B_VISION), mm_tokens_per_image=GEMMA3_4B_MM_TOKENS,
                           boi_token_index=small.boi_token_index, eoi_token_index=small.eoi_token_index,
                           image_token_index=small.image_token_index, pad_token_id=small.pad_token_id)
        proc.image_processor.size = {"height": 896, "width": 896}
        proc.image_seq_length = GEMMA3_4B_MM_TOKENS
        side = "".join([proc.tokenizer.image_token] * GEMMA3_4B_MM_TOKENS)
        proc.full_image_sequence = f"\n\n{proc.tokenizer.boi_token}{side}{proc.tokenizer.eoi_token}\n\n"
    model = _instantiate(Gemma3ForConditionalGeneration, cfg, device, dtype)
    with torch.no_grad():  # the zero-initialised projection would make the image irrelevant
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.normal_(0.0, 1.0 / math.sqrt(w.shape[0]))
    return Gemma3Adapter(model, proc, "Gemma-3-4B (random init)" if not tiny else "tiny gemma3")


def _instantiate(cls, cfg, device: torch.device, dtype: torch.dtype):
    """Random-initialise directly on ``device`` in ``dtype`` (no 4-byte CPU copy of billions of weights)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    # No blanket ``.to(dtype)``: like ``from_pretrained(dtype=...)``, float32 buffers (rotary inv_freq) stay float32.
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _naive(adapter, chat, pv: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits for every position (what answer-only scoring avoids)."""
    with torch.inference_mode():
        logits = adapter.model(**adapter.batch_inputs(chat, pv), use_cache=False).logits
        s, e = chat.answer_span
        lp = torch.log_softmax(logits[:, s - 1 : e - 1].float(), -1)
        return lp.gather(-1, chat.answer_token_ids.to(lp.device)[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]


def time_family(adapter, batch_sizes: list[int], reps: int, device: torch.device) -> list[dict]:
    rng = np.random.RandomState(0)
    img = (rng.rand(512, 448) * 255).astype(np.uint8)
    q = question_stem("pleural effusion") + SUFFIXES["direct"]
    chat = adapter.prepare(img, q, "Yes")
    gh, gw = chat.grid_hw
    rows = []
    for B in batch_sizes:
        keep = torch.from_numpy((rng.rand(B, gh, gw) > 0.5).astype(np.float32))
        pv = adapter.masked_pixel_values(chat, keep)
        row = {"model": adapter.name, "B": B, "seq_len": int(chat.inputs["input_ids"].shape[1]),
               "image_tokens": gh * gw, "answer_tokens": chat.n_answer_tokens}
        for label, fn in (("ours", lambda: score_chat(adapter, chat, pv, batch_size=B)), ("naive", lambda: _naive(adapter, chat, pv))):
            try:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                out = fn()  # warm-up (kernels, allocator)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    out = fn()
                _sync(device)
                ms = (time.perf_counter() - t0) / reps * 1000
                row[f"{label}_ms"] = ms
                row[f"{label}_ms_per_image"] = ms / B
                row[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                row[f"{label}_out"] = out.float().cpu()
            except torch.OutOfMemoryError:
                row[f"{label}_ms"] = row[f"{label}_ms_per_image"] = row[f"{label}_peak_gib"] = float("nan")
                row[f"{label}_note"] = "OOM"
        try:
            row["vision_ms"] = _vision_ms(adapter, chat, pv, reps, device)
        except torch.OutOfMemoryError:
            row["vision_ms"] = float("nan")
        if "ours_out" in row and "naive_out" in row:
            row["max_abs_diff"] = float((row["ours_out"] - row["naive_out"]).abs().max())
        row.pop("ours_out", None)
        row.pop("naive_out", None)
        rows.append(row)
        print(f"  B={B:3d}  ours {row.get('ours_ms', float('nan')):9.1f} ms ({row.get('ours_peak_gib', float('nan')):.2f} GiB)   "
              f"naive {row.get('naive_ms', float('nan')):9.1f} ms ({row.get('naive_peak_gib', float('nan')):.2f} GiB)", flush=True)
    return rows


def _vision_ms(adapter, chat, pv: torch.Tensor, reps: int, device: torch.device) -> float:
    """Time of the vision tower + projector alone on the same ``B`` images (the part every pass repeats)."""
    inputs = adapter.batch_inputs(chat, pv)
    kw = {"pixel_values": inputs["pixel_values"]}
    if "image_grid_thw" in inputs:
        kw["image_grid_thw"] = inputs["image_grid_thw"]
    with torch.inference_mode():
        fn = lambda: adapter.base_model.get_image_features(**kw)  # noqa: E731
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
    return (time.perf_counter() - t0) / reps * 1000


def check_tiny_on_device(device: torch.device) -> list[str]:
    """Load the three tiny families with load_lvlm's defaults on ``device`` (bf16 on CUDA) and compare
    scoring and greedy generation with float32 CPU. Returns printable lines."""
    import tempfile

    from medfocus.lvlm.loading import load_lvlm
    from medfocus.lvlm.tiny import FAMILIES, build_tiny

    lines = []
    rng = np.random.RandomState(1)
    img = (rng.rand(120, 100) * 255).astype(np.uint8)
    q = question_stem("nodule") + SUFFIXES["direct"]
    with tempfile.TemporaryDirectory() as d:
        for fam in FAMILIES:
            p = build_tiny(fam, Path(d) / fam)
            ref, dev = load_lvlm(str(p), device="cpu"), load_lvlm(str(p), device=device)
            cr, cd = ref.prepare(img, q, "Yes"), dev.prepare(img, q, "Yes")
            keep = torch.from_numpy((rng.rand(8, *cr.grid_hw) > 0.5).astype(np.float32))
            lr = score_chat(ref, cr, ref.masked_pixel_values(cr, keep)).cpu()
            ld = score_chat(dev, cd, dev.masked_pixel_values(cd, keep.to(device))).cpu()
            single = torch.cat([score_chat(dev, cd, dev.masked_pixel_values(cd, keep[i:i + 1].to(device)), batch_size=1).cpu() for i in range(8)])
            gr = ref.generate([img, img[:80]], [q, q], max_new_tokens=4)
            gd = dev.generate([img, img[:80]], [q, q], max_new_tokens=4)
            lines.append(f"{fam}: {dev.model.dtype} on {dev.device}; |device - fp32 cpu| max {float((lr - ld).abs().max()):.3f}; "
                         f"batch-vs-single max {float((ld - single).abs().max()):.2e}; generate equal to cpu: {gd == gr} ({gd!r})")
            print(lines[-1], flush=True)
    return lines


def to_markdown(rows: list[dict], card: str, dtype: torch.dtype, reps: int, tiny: bool, checks: list[str] | None = None) -> str:
    def f(v, p=1):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{p}f}"

    lines = [
        "# Teacher-forced answer scoring on full-size architectures" if not tiny else "# Teacher-forced answer scoring (tiny dry run)",
        "",
        f"Card: **{card}**; dtype {str(dtype).replace('torch.', '')}; torch {torch.__version__}; "
        f"{reps} timed repetitions after one warm-up; random-initialised weights (timing only).",
        "Written by `python benchmarks/gpu_scoring.py" + (" --tiny" if tiny else "") + "`.",
        "",
        "`ours` = `medfocus.lvlm.scoring.score_chat` (LM head on the answer positions only); `naive` = full "
        "`(B, S, vocab)` logits then log-softmax. Each call scores `B` masked variants of one chat.",
        "",
        "`vision ms` = the vision tower + projector alone on the same `B` images.",
        "",
        "| model | B | seq len | image tokens | ours ms/call | ours ms/image | ours peak GiB | vision ms | naive ms/call | naive peak GiB | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['B']} | {r['seq_len']} | {r['image_tokens']} | {f(r.get('ours_ms'))} | "
                     f"{f(r.get('ours_ms_per_image'), 2)} | {f(r.get('ours_peak_gib'), 2)} | {f(r.get('vision_ms'))} | {f(r.get('naive_ms'))}"
                     f"{' (' + r['naive_note'] + ')' if r.get('naive_note') else ''} | {f(r.get('naive_peak_gib'), 2)} | "
                     f"{f(r.get('max_abs_diff'), 4)} |")
    if checks:
        lines += ["", "Tiny families loaded with `load_lvlm` defaults on this device vs float32 CPU:", ""]
        lines += [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/gpu_scoring.md", help="markdown table to write")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU (dry run of the whole script)")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="qwen,gemma", help="comma list of qwen,gemma")
    ap.add_argument("--no-check", action="store_true", help="skip the tiny-family bf16-vs-fp32 check")
    args = ap.parse_args(argv)

    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)
        card = f"CPU ({platform.processor() or platform.machine()}), tiny configs"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --tiny for a CPU dry run", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        card = torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    bs = [int(b) for b in args.batch_sizes.split(",")]
    checks = [] if args.no_check else check_tiny_on_device(device)
    rows: list[dict] = []
    builders = {"qwen": build_qwen, "gemma": build_gemma}
    for key in args.models.split(","):
        t0 = time.perf_counter()
        adapter = builders[key](args.tiny, device, dtype)
        n = sum(p.numel() for p in adapter.model.parameters())
        print(f"{adapter.name}: {n / 1e9:.2f} B parameters, built in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += time_family(adapter, bs, args.reps, device)
        del adapter
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = to_markdown(rows, card, dtype, args.reps, args.tiny, checks)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(args.out), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
