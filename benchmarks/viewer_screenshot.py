"""The README's screenshot of the interactive viewer (docs/explain_viewer.png).

Runs ``medfocus explain`` with the shipped demo model on the real computed-radiography film
``../shared/data/real_cxr/dicom/RG1_J2KI.dcm`` (NEMA DICOM compression test set as shipped in
pydicom-data, MIT) in step-by-step mode with every method, opens ``explain.html`` in headless Debian
chromium (selenium), clicks the first rationale token and saves the top of the page as an 8-bit palette
PNG (kept under 300 KB). The demo model knows only the synthetic world: the screenshot shows the viewer,
not a meaningful answer.

Usage: ``python benchmarks/viewer_screenshot.py [--out docs/explain_viewer.png]``
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILM = ROOT.parent / "shared" / "data" / "real_cxr" / "dicom" / "RG1_J2KI.dcm"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "explain_viewer.png"))
    ap.add_argument("--run", default=None, help="explain output folder (default: a temporary folder)")
    args = ap.parse_args()
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from medfocus.runner.explain import explain

    run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="viewer-shot-"))
    res = explain([FILM], out=run, finding="cardiomegaly", mode="cot", overwrite=True,
                  params={"prompting_medsam": {"detector": "anatomy"}})
    opts = webdriver.ChromeOptions()
    profile = tempfile.mkdtemp()
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1250", "--hide-scrollbars"):
        opts.add_argument(flag)
    opts.binary_location = shutil.which("chromium")
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        drv.get(res.html.resolve().as_uri())
        toks = [t for t in drv.find_elements(By.CSS_SELECTOR, ".token") if t.text.strip()]
        if len(toks) > 2:
            toks[2].click()
        png = drv.get_screenshot_as_png()
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im = im.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, optimize=True)
    size = out.stat().st_size
    print(f"{out}: {im.size[0]}x{im.size[1]} px, {size / 1024:.0f} KB")
    if size > 300 * 1024:
        raise SystemExit(f"{out} is {size / 1024:.0f} KB; the README screenshot must stay under 300 KB")


if __name__ == "__main__":
    main()
