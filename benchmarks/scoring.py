"""CPU timing of teacher-forced answer scoring on the tiny families and the demo model.

For each model and batch size it times ``medfocus.lvlm.scoring.score_chat`` on ``B`` masked variants
of one chat against the naive path (full ``(B, S, vocab)`` logits), checks both give the same
log-probs, and writes a markdown table next to this script.

    python benchmarks/scoring.py [--out benchmarks/scoring.md] [--batch-sizes 1,16] [--reps 5]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medfocus.lvlm.loading import load_lvlm  # noqa: E402
from medfocus.lvlm.registry import DEMO_DIR  # noqa: E402
from medfocus.lvlm.scoring import score_chat  # noqa: E402
from medfocus.lvlm.tiny import FAMILIES, build_tiny  # noqa: E402
from medfocus.types import SUFFIXES, question_stem  # noqa: E402


def _naive(adapter, chat, pv):
    with torch.inference_mode():
        logits = adapter.model(**adapter.batch_inputs(chat, pv), use_cache=False).logits
        s, e = chat.answer_span
        lp = torch.log_softmax(logits[:, s - 1 : e - 1].float(), -1)
        return lp.gather(-1, chat.answer_token_ids[None, :, None].expand(lp.shape[0], -1, 1))[..., 0]


def _time(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t0) / reps * 1000, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.RandomState(0)
    img = (rng.rand(256, 224) * 255).astype(np.uint8)
    q = question_stem("pleural effusion") + SUFFIXES["direct"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        models = {f"tiny {fam}": build_tiny(fam, Path(d) / fam) for fam in FAMILIES}
        if (DEMO_DIR / "config.json").is_file():
            models["demo"] = "demo"
        for label, path in models.items():
            a = load_lvlm(str(path), device="cpu")
            chat = a.prepare(img, q, "Yes")
            gh, gw = chat.grid_hw
            for B in [int(b) for b in args.batch_sizes.split(",")]:
                pv = a.masked_pixel_values(chat, torch.from_numpy((rng.rand(B, gh, gw) > 0.5).astype(np.float32)))
                ours_ms, ours = _time(lambda: score_chat(a, chat, pv, batch_size=B), args.reps)
                naive_ms, naive = _time(lambda: _naive(a, chat, pv), args.reps)
                rows.append((label, B, int(chat.inputs["input_ids"].shape[1]), gh * gw, a.model.config.get_text_config().vocab_size,
                             ours_ms, ours_ms / B, naive_ms, float((ours - naive).abs().max())))
                print(rows[-1], flush=True)
    lines = [
        "# Teacher-forced answer scoring on CPU",
        "",
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, float32; "
        f"mean of {args.reps} calls after one warm-up. Written by `python benchmarks/scoring.py`.",
        "`ours` = `score_chat` (LM head on answer positions only); `naive` = full `(B, S, vocab)` logits.",
        "",
        "| model | B | seq len | image tokens | vocab | ours ms/call | ours ms/image | naive ms/call | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]:.2f} | {r[7]:.1f} | {r[8]:.1e} |")
    md = "\n".join(lines) + "\n"
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(Path(args.out), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
