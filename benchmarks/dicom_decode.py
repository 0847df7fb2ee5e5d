"""DICOM decoder choice: which transfer syntaxes each candidate decodes, and how fast, on the real films.

Candidates (pydicom 3 decoding plugins): ``pylibjpeg`` (+ ``pylibjpeg-libjpeg``, ``-openjpeg``,
``-rle``), ``gdcm`` (``python-gdcm``) and ``pillow``. The script measures whatever is installed in
the interpreter that runs it, so run it once per environment to compare (e.g. once in the project
venv and once in a venv with ``python-gdcm``); it only needs ``pydicom`` and ``numpy``.

For every real film in ``../shared/data/real_cxr/dicom`` and every installed plugin that supports the
film's transfer syntax: ``--repeats`` decodes of ``pixel_array`` (fresh dataset each time, file read
not timed); median and a 95% interval of the median (order statistics, distribution-free), and the
largest absolute difference of the stored values from the uncompressed RG1 film. Also the table of
which compressed syntaxes each plugin can decode here. Writes ``--out`` (Markdown) next to this
script.

    python benchmarks/dicom_decode.py [--repeats 21] [--out dicom_decode.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from math import comb
from pathlib import Path

import numpy as np

FILMS = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "JPEG-LL.dcm")
PLUGINS = ("pylibjpeg", "gdcm", "pillow")
SYNTAXES = (
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
)


def median_ci(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Median and the distribution-free order-statistic interval for it (binomial, p = 1/2)."""
    s = sorted(xs)
    n = len(s)
    best = (0, n - 1)
    for lo in range(n // 2 + 1):
        hi = n - 1 - lo
        cover = sum(comb(n, k) for k in range(lo + 1, hi + 1)) / 2**n
        if cover >= level:
            best = (lo, hi)
        else:
            break
    return float(np.median(s)), s[best[0]], s[best[1]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real_cxr" / "dicom"))
    ap.add_argument("--out", default="dicom_decode.md")
    args = ap.parse_args()
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    data = Path(args.data)
    installed = {plug: any(plug in get_decoder(uid).available_plugins for uid in SYNTAXES) for plug in PLUGINS}
    ref = pydicom.dcmread(data / "RG1_UNCR.dcm").pixel_array.astype(np.int64)
    rows = []
    for name in FILMS:
        ts = pydicom.dcmread(data / name, stop_before_pixels=True).file_meta.TransferSyntaxUID
        plugins = ["(native)"] if not ts.is_compressed else [p for p in get_decoder(ts).available_plugins]
        for plug in plugins:
            times = []
            for _ in range(args.repeats):
                ds = pydicom.dcmread(data / name)
                if plug != "(native)":
                    ds.pixel_array_options(decoding_plugin=plug)
                t = time.perf_counter()
                arr = ds.pixel_array
                times.append(time.perf_counter() - t)
            diff = int(np.abs(arr.astype(np.int64) - ref).max()) if name.startswith("RG1") else None
            rows.append((name, f"{ts} ({ts.name})", plug, arr.shape, *median_ci(times), diff))
            print(rows[-1])
    cover = {uid: sorted(get_decoder(uid).available_plugins) for uid in SYNTAXES}

    load = os.getloadavg()
    lines = [
        f"# DICOM decoding on the real films (`{Path(__file__).name}`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end; Python {platform.python_version()}, "
        f"pydicom {pydicom.__version__}. Plugins installed here: "
        + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in installed.items()) + ".",
        f"n = {args.repeats} decodes per row; median and its 95% order-statistic interval, milliseconds.",
        "",
        "| file | transfer syntax | plugin | shape | median ms | 95% CI ms | max abs diff vs RG1_UNCR |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ts, plug, shape, med, lo, hi, diff in rows:
        lines.append(f"| {name} | {ts} | {plug} | {shape[1]}x{shape[0]} | {med * 1e3:.1f} | "
                     f"{lo * 1e3:.1f}-{hi * 1e3:.1f} | {'' if diff is None else diff} |")
    lines += ["", "Compressed syntaxes and the plugins that decode them in this environment:", "",
              "| transfer syntax | plugins |", "|---|---|"]
    for uid, plugs in cover.items():
        lines.append(f"| {uid} ({UID(uid).name}) | {', '.join(plugs) or '**none**'} |")
    out = Path(__file__).with_name(args.out)
    from medfocus.io.atomic import atomic_write_text  # a killed run never leaves a cut file

    atomic_write_text(out, "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
