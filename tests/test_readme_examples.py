"""Every command example in the README runs.

The README's ```bash blocks are parsed into commands (backslash continuations joined, comments
dropped; a shell loop is one example). Each command is either

* **run**, in README order, in one scratch folder (so `runs/...` paths chain from one example to the
  next) with the shipped demo model on small synthetic data — where an example's sizes would make the
  suite slow, :data:`SHRINK` lists the exact, documented argument replacements (sizes only, never
  what the command does); or
* **skipped** with a reason in :data:`SKIP` (credentialed datasets, real hub weights, the install
  itself).

The test fails when a README example is in neither list, and when a list names an example that is
no longer in the README, so a new example cannot go untested silently.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SHARED_DATA = README.parent.parent / "shared" / "data"  # as tests/conftest.py finds it

_REAL = "needs a credentialed dataset under /data and real hub weights (not available to tests)"
#: example -> why it is not run.
SKIP: dict[str, str] = {
    "make test": "is this test suite itself",
    "medfocus bench build --model demo --dataset nih_cxr8 --data-root /data --editor inpaint --out runs/bench_nih":
        "needs the NIH ChestX-ray8 films (a public ~45 GB download) under /data; the loader is tested on fixtures",
    "medfocus bench build --model qwen2_5_vl_3b --dataset vindr_cxr --data-root /data/vindr-cxr --mode direct "
    "--editor radedit --radedit-dir /weights/radedit --out runs/bench": _REAL + "; RadEdit weights",
    "medfocus attribute --config run.yaml --shard ${SLURM_ARRAY_TASK_ID}/8": "run.yaml (README) names VinDr-CXR and Qwen2.5-VL-7B; " + _REAL,
    "medfocus attribute --out runs/vindr_qwen7b --merge": "merges the shards of the Slurm example above (real data)",
    "medfocus evaluate runs/vindr_qwen7b/predictions.jsonl --out runs/vindr_qwen7b": "evaluates the Slurm example's run (real data)",
    "medfocus report runs/vindr_qwen7b --retention runs/bench/retention.csv": "reports the Slurm example's run (real data)",
    "medfocus bench build --model qwen2_5_vl_7b --dataset imagenome --data-root /data/mimic --mode direct --mode cot "
    "--editor radedit --out runs/bench": _REAL,
    "medfocus attribute --bench runs/bench/qwen2_5_vl_7b/imagenome/direct.json --bench runs/bench/qwen2_5_vl_7b/imagenome/cot.json "
    "--dataset imagenome --data-root /data/mimic --mode direct --mode cot --out runs/imagenome_qwen7b": _REAL,
    "medfocus bench build --model medgemma_4b --dataset vindr_cxr --data-root /data/vindr-cxr --mode direct --editor radedit "
    "--out runs/bench": _REAL,
    "medfocus attribute --bench runs/bench/medgemma_4b/vindr_cxr/direct.json --dataset vindr_cxr --data-root /data/vindr-cxr "
    "--mode direct --out runs/vindr_medgemma4b": _REAL,
    "medfocus bench build --model gemma3_12b --dataset padchest_gr --data-root /data/padchest-gr --mode cot --editor radedit "
    "--out runs/bench": _REAL,
    "medfocus attribute --bench runs/bench/gemma3_12b/padchest_gr/cot.json --dataset padchest_gr --data-root /data/padchest-gr "
    "--mode cot --method medfocus --method occlusion --method rise --out runs/padchest_gemma12b": _REAL,
    "medfocus evaluate runs/vindr_medgemma4b/predictions.jsonl --out runs/vindr_medgemma4b": "evaluates the MedGemma run above (real data)",
    "medfocus report runs/vindr_medgemma4b --retention runs/bench/retention.csv": "reports the MedGemma run above (real data)",
    "for m in qwen2_5_vl_3b qwen2_5_vl_7b gemma3_4b gemma3_12b medgemma_4b medgemma1_5_4b; do ... done": "the six paper models; " + _REAL,
    "medfocus attribute --config run.yaml --launcher local --devices cuda:0,cuda:1":
        "two GPUs and run.yaml's real data; the local launcher itself runs here on CPU workers (the example above "
        "and tests/test_launch.py)",
    "medfocus attribute --config run.yaml --launcher slurm --shards 32 --slurm-partition gpu --slurm-gpus-per-task 1 "
    "--slurm-time 12:00:00 --slurm-array-parallelism 8 --slurm-param mem=64G":
        "needs a Slurm cluster; its job function and sbatch options are tested in tests/test_launch.py",
    "medfocus bench build --model qwen2_5_vl_7b --dataset vindr_cxr --data-root /data --editor transplant "
    "--reference-dir runs/reference --out runs/bench --launcher local --devices cuda:0,cuda:1,cuda:2,cuda:3":
        "four GPUs, " + _REAL + "; bench build under the local launcher is tested on CPU in tests/test_launch.py",
    "medfocus evaluate runs/vindr_all/predictions.jsonl --out runs/vindr_all": "evaluates the six-model loop's run (real data)",
    "medfocus report runs/vindr_all --retention runs/bench/retention.csv": "reports the six-model loop's run (real data)",
}

#: The demo at test size (the README's `make demo` runs `medfocus demo` with its defaults: ~2 min idle).
SMALL_DEMO = "medfocus demo --n-samples 24 --per-mode 2 --mode direct --method occlusion --method medfocus --no-progress"
#: example -> [(old, new)] argument replacements that only shrink sizes.
SHRINK: dict[str, list[tuple[str, str]]] = {
    "make demo": [("make demo", SMALL_DEMO)],
    "medfocus synth --out runs/data --n 200": [("--n 200", "--n 24")],
    "medfocus bench build --model demo --dataset synthetic --data-root runs/data --mode direct --mode cot --editor oracle "
    "--out runs/bench": [("--mode cot", ""), ("--out runs/bench", "--limit 6 --out runs/bench --no-progress")],
}


def readme_examples(text: str) -> list[str]:
    """The commands of every ```bash block, in order: continuations joined, comments and blank lines
    dropped, a ``for ... done`` loop collapsed to ``"<first line> ... done"``."""
    out: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", block)
        loop: list[str] | None = None
        for raw in joined.splitlines():
            line = " ".join(shlex.split(raw, comments=True, posix=False)) if raw.strip() else ""
            if not line:
                continue
            if loop is not None:
                if line == "done":
                    out.append(f"{loop[0]} ... done")
                    loop = None
                continue
            if line.startswith(("for ", "while ")):
                loop = [line]
                continue
            out.append(line)
    return out


EXAMPLES = list(dict.fromkeys(readme_examples(README.read_text(encoding="utf-8"))))  # a repeated example runs once


def test_every_readme_example_is_run_or_skipped_with_a_reason():
    assert EXAMPLES, "no ```bash blocks found in the README"
    known = set(SKIP) | set(SHRINK)
    stale = sorted(k for k in known if k not in EXAMPLES)
    assert not stale, f"SKIP/SHRINK name examples that are not in the README any more: {stale}"
    for ex in EXAMPLES:
        assert ex.startswith(("medfocus ", ".venv/bin/medfocus ", "make ")) or ex in SKIP, \
            f"README example {ex!r} is not a medfocus command: run it here or add it to SKIP with a reason"
    assert all(reason.strip() for reason in SKIP.values())


def _argv(example: str) -> list[str]:
    cmd = example
    for old, new in SHRINK.get(example, []):
        assert old in cmd, (example, old)
        cmd = cmd.replace(old, new)
    # The README names the shared real films relative to the repository (../shared/data): resolve them.
    cmd = cmd.replace("../shared/data/", f"{SHARED_DATA}/")
    argv = shlex.split(cmd)
    if argv[0] == ".venv/bin/medfocus":  # the venv's entry point is the same command
        argv[0] = "medfocus"
    assert argv[0] == "medfocus", f"cannot run {example!r} (add it to SHRINK or SKIP)"
    return argv[1:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_adapter):
    """One scratch folder for every example (README paths such as runs/demo chain between them)."""
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e not in SKIP], ids=lambda e: e[:60])
def test_readme_example_runs(example, workspace, monkeypatch):
    from click.testing import CliRunner

    from medfocus.cli import main

    if "../shared/data/" in example and not SHARED_DATA.is_dir():
        pytest.skip(f"the example reads the shared real films, absent at {SHARED_DATA}")
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MEDFOCUS_DATA_ROOT", raising=False)
    res = CliRunner().invoke(main, _argv(example), catch_exceptions=False, env={"COLUMNS": "100"})
    assert res.exit_code == 0, f"README example failed (exit {res.exit_code}):\n$ {example}\n{res.output[-3000:]}"
    # Each example leaves what the README says it does.
    produced = {
        "make demo": ["runs/demo/report.html", "runs/demo/predictions.jsonl"],
        ".venv/bin/medfocus evaluate runs/demo/predictions.jsonl --out runs/demo/eval": ["runs/demo/eval/table.md"],
        "medfocus synth --out runs/data --n 200": ["runs/data/manifest.json"],
        "medfocus bench build --model demo --dataset synthetic --data-root runs/data --mode direct --mode cot --editor oracle "
        "--out runs/bench": ["runs/bench/retention.csv", "runs/bench/demo/synthetic/direct.log.jsonl"],
        "medfocus attribute --dataset synthetic --data-root runs/demo/data --model demo --limit 2 --method rise "
        "--param rise.n_masks=128 --method gradcam --param gradcam.layer=middle --out runs/attr": ["runs/attr/predictions.jsonl"],
        "medfocus report runs/attr --save-figures --format pdf --dpi 300": ["runs/attr/report.html", "runs/attr/figures/bars_iou_direct.pdf"],
    }.get(example, [])
    for rel in produced:
        assert (workspace / rel).exists(), f"{example!r} did not write {rel}"
    if "--no-progress" in _argv(example):
        assert "Loading weights" not in res.output and "it/s]" not in res.output, "--no-progress left a progress bar"
    assert os.getcwd() == str(workspace)
