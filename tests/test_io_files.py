"""The one atomic writer (:mod:`medfocus.io.atomic`) and the one JSON-lines reader
(:mod:`medfocus.io.jsonl`): a killed writer leaves the old file or the new one; every consumer of a
result file (``evaluate``, ``report``, the store) sees the same records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfocus.cli import main
from medfocus.errors import DataError
from medfocus.evaluation import read_prediction_records
from medfocus.io.atomic import atomic_directory, atomic_save_npz, atomic_write, atomic_write_json, atomic_write_text
from medfocus.io.jsonl import append_jsonl, read_jsonl, read_latest, trim_partial_tail
from medfocus.runner.store import ResultStore, load_results

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A writer that announces each chunk it has written into the temporary file, slowly, so the test can
# kill it (SIGKILL: no cleanup, no flush) in the middle of the write.
_WRITER = r"""
import sys, time
from medfocus.io.atomic import atomic_write
target, chunks = sys.argv[1], int(sys.argv[2])
with atomic_write(target, "w") as fh:
    for i in range(chunks):
        fh.write("N" * 100_000)
        fh.flush()
        print(i, flush=True)
        time.sleep(0.05)
print("done", flush=True)
"""


def _run_writer(target: Path, chunks: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(chunks)], stdout=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.parametrize("kill_after", [0, 3])
def test_killed_writer_leaves_the_old_file(tmp_path, kill_after):
    target = tmp_path / "table.csv"
    old = "O" * 250_000
    target.write_text(old)
    proc = _run_writer(target, chunks=20)
    for line in proc.stdout:  # wait until `kill_after + 1` chunks are in the temporary file
        if line.strip() == str(kill_after):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == old  # not a prefix of the new content, not a mix
    # what the kill left is a uniquely named temporary file beside it, never the target itself
    debris = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(debris) == 1 and debris[0].startswith(".table.csv.") and debris[0].endswith(".tmp")


def test_finished_writer_leaves_the_new_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    proc = _run_writer(target, chunks=3)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip().endswith("done")
    assert target.read_text() == "N" * 300_000
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_reader_during_a_write_sees_old_or_new(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 0, "pad": "x" * 50_000})
    seen: set[int] = set()
    stop = threading.Event()

    def read_loop() -> None:
        while not stop.is_set():
            seen.add(json.loads(target.read_text())["v"])  # raises on a half-written file

    t = threading.Thread(target=read_loop)
    t.start()
    try:
        for v in range(1, 30):
            atomic_write_json(target, {"v": v, "pad": "x" * 50_000})
    finally:
        stop.set()
        t.join()
    assert seen <= set(range(30)) and json.loads(target.read_text())["v"] == 29


def test_concurrent_writers_use_unique_temporary_files(tmp_path):
    target = tmp_path / "shared.txt"
    texts = [str(i) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(target, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in texts  # one writer's whole content
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_failed_write_keeps_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass


def test_written_files_get_the_umask_mode_not_a_private_one(tmp_path):
    mask = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "r.html", "x")
        q = atomic_save_npz(tmp_path / "h.npz", heatmap=np.eye(2))
        with atomic_directory(tmp_path / "model") as d:
            (d / "w.bin").write_bytes(b"1")
    finally:
        os.umask(mask)
    assert (p.stat().st_mode & 0o777) == 0o644 and (q.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "model").stat().st_mode & 0o777) == 0o755


def test_atomic_directory_replaces_or_keeps(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as d:
        (d / "a").write_text("1")
    with atomic_directory(out) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as d:
            (d / "c").write_text("3")
            raise RuntimeError("killed while training")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with atomic_directory(out, overwrite=False) as d:  # a concurrent writer published first: keep it
        (d / "d").write_text("4")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---- JSON lines -------------------------------------------------------------------------------------


def test_jsonl_truncated_tail_is_ignored_and_trimmed(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, {"k": 1, "v": "a"})
    append_jsonl(p, {"k": 2, "v": "b"})
    whole = p.read_bytes()
    with open(p, "ab") as fh:
        fh.write(b'{"k": 1, "v": "c"')  # a kill in the middle of an append
    recs, valid = read_jsonl(p)
    assert recs == [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}] and valid == len(whole)
    trim_partial_tail(p)
    assert p.read_bytes() == whole
    append_jsonl(p, {"k": 1, "v": "c"})
    assert {k: r["v"] for k, r in read_latest(p, lambda r: r["k"]).items()} == {1: "c", 2: "b"}  # last per key
    assert read_jsonl(tmp_path / "absent.jsonl") == ([], 0)


@pytest.mark.parametrize("bad, line", [(b"not json\n", 2), (b"[1, 2]\n", 2), (b"\xff\xfe\n", 2)])
def test_jsonl_damaged_complete_line_raises_naming_it(tmp_path, bad, line):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"k": 1}\n' + bad + b'{"k": 3}\n')
    with pytest.raises(DataError, match=f"r.jsonl line {line}"):
        read_jsonl(p)
    p.write_bytes(b'{"k": 1}\n' + bad)  # a complete damaged *last* line is damage too, not a kill
    with pytest.raises(DataError, match=f"line {line}"):
        read_jsonl(p)
    p.write_bytes(b'{"k": 1}\n{"x": 2}\n')
    with pytest.raises(DataError, match="line 2: missing or malformed key field"):
        read_latest(p, lambda r: r["k"])


def _store_with_retry_and_kill(folder: Path) -> Path:
    """A store after: a run whose sample 1 failed, a `--retry-errors` rerun that fixed it, and a kill
    in the middle of the next append."""
    folder.mkdir(parents=True)
    base = {"model": "demo", "dataset": "synthetic", "mode": "direct", "method": "prompting",
            "gt_boxes": [[0, 0, 10, 10]], "image_size": [20, 20]}
    path = folder / "predictions.jsonl"
    with ResultStore(path) as st:
        st.append({**base, "index": 0, "pred_boxes": [[0, 0, 10, 10]], "error": None})
        st.append({**base, "index": 1, "pred_boxes": None, "error": "CUDA out of memory"})
    with ResultStore(path) as st:  # the --retry-errors rerun
        assert not st.is_done(("demo", "synthetic", 1, "direct", "prompting"), retry_errors=True)
        st.append({**base, "index": 1, "pred_boxes": [[0, 0, 5, 10]], "error": None})
    with open(path, "ab") as fh:
        fh.write(json.dumps({**base, "index": 2, "pred_boxes": [[0, 0, 1, 1]], "error": None}).encode()[:40])
    return path


def test_evaluate_and_report_agree_on_retried_errors_and_a_truncated_line(tmp_path):
    path = _store_with_retry_and_kill(tmp_path / "run")
    # every reader: one record per key, the retry replacing its error, the cut-off line ignored
    ev = read_prediction_records(path)
    rep = load_results(path)
    assert [(r["index"], r["error"]) for r in ev] == [(0, None), (1, None)]
    assert [(r["index"], r["error"]) for r in rep] == [(0, None), (1, None)]
    assert [r["pred_boxes"] for r in ev] == [r["pred_boxes"] for r in rep] == [[[0, 0, 10, 10]], [[0, 0, 5, 10]]]

    res = CliRunner().invoke(main, ["evaluate", str(path), "--out", str(tmp_path / "eval"), "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    per = pd.read_csv(tmp_path / "eval" / "records.csv")
    assert list(per["index"]) == [0, 1] and per["error"].isna().all()
    assert list(per["iou"]) == [1.0, 0.5]
    assert "2 records (0 with errors)" in res.output

    rr = CliRunner().invoke(main, ["report", str(tmp_path / "run"), "--title", "agree"])
    assert rr.exit_code == 0, rr.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert "CUDA out of memory" not in html  # the retried error is not counted by the report either

    # the store opened for another resume cuts the interrupted tail and keeps both records
    size = path.stat().st_size
    with ResultStore(path) as st:
        assert len(st) == 2
    assert path.stat().st_size < size and read_jsonl(path)[1] == path.stat().st_size


def test_no_hand_written_temp_then_rename_outside_io():
    """Every temp-then-rename write goes through medfocus.io.atomic (one set of guarantees)."""
    root = Path(SRC) / "medfocus"
    offenders = []
    for f in root.rglob("*.py"):
        if f.parent.name == "io" and f.name == "atomic.py":
            continue
        text = f.read_text()
        for needle in ("os.replace(", "tempfile.mkstemp(", ".tmp\"", ".tmp'", "tmp.rename(", "tmp.replace("):
            if needle in text:
                offenders.append(f"{f.relative_to(root)}: {needle}")
    assert offenders == []
