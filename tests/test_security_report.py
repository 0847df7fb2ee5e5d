"""Security of the HTML report and its figure files (issue 13, items 1 and 3): every text field of a
run carries HTML/JS payloads and path-traversal strings; the report must contain no executable
content (checked by parsing it, and in headless Debian chromium that no script ran), and
``--save-figures`` must write only inside its folder."""

from __future__ import annotations

import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medfocus.io.paths import safe_filename
from medfocus.report import build_report
from medfocus.runner.store import ResultStore
from medfocus.types import CONCEPTS

# Each payload would run script if inserted unescaped as element content or as an attribute value.
PAYLOADS = [
    '<script>window.__xss="script"</script>',
    '<img src=x onerror="window.__xss=\'img\'">',
    '"><svg onload="window.__xss=\'svg\'">',
    "'><iframe src=javascript:window.__xss='iframe'>",
    "</title></style><script>window.__xss='breakout'</script>",
    "$\\frac{a}{$ {{7*7}} &amp; \x00",  # mathtext / template syntax / entity: must be shown literally
]
TRAVERSAL = "../../escaped"


def _payload(field: str, i: int = 0) -> str:
    return f"{TRAVERSAL}/{field}{PAYLOADS[i % len(PAYLOADS)]}{PAYLOADS[(i + 1) % len(PAYLOADS)]}"


def hostile_run(tmp_path: Path) -> Path:
    """A run folder whose every text field (model, dataset, mode, method, finding, question, answer,
    generated text, error, method parameters, image id, MedFocus concept/winner/tokens) carries payloads."""
    run = tmp_path / "deep" / "er" / "run"
    img = np.full((64, 64), 90, np.uint8)
    img[20:40, 20:40] = 200
    ipath = tmp_path / "img.png"
    Image.fromarray(img).save(ipath)
    with ResultStore(run / "predictions.jsonl") as st:
        for i, mode in enumerate(("direct", "cot", _payload("mode", 3))):
            for k, method in enumerate(("occlusion", _payload("method", 1), "medfocus")):
                key = (_payload("model", 0), _payload("dataset", 2), i, mode, method)
                heat = np.zeros((64, 64), np.float32)
                heat[20:40, 20 + 3 * k:40] = 1
                arrays = {"heatmap": heat}
                extras = {"params": {"grid": _payload("param", 4)}}
                if method == "medfocus":
                    extras = {"deltas": {_payload("concept", j): float(j) for j in range(3)} | {CONCEPTS[0]: 5.0},
                              "winner": _payload("winner", 1), "answer_tokens": [_payload("tok", 2), " Yes"],
                              "concepts": [_payload("concept", j) for j in range(3)] + [CONCEPTS[0]]}
                    arrays["extra_token_deltas"] = np.ones((4, 2))
                err = _payload("error", 5) if (k == 1 and i == 1) else None
                st.append({"model": key[0], "dataset": key[1], "index": i, "mode": mode, "method": method,
                           "attribute": _payload("finding", i), "question": _payload("question", 0),
                           "answer": _payload("answer", 3), "generated_text": _payload("generated", 4),
                           "image_id": _payload("image_id", 5), "params": {"grid": _payload("param", 2)},
                           "gt_boxes": [[20, 20, 40, 40]], "image_size": [64, 64], "image_path": str(ipath),
                           "extras": extras, "error": err,
                           "pred_boxes": None if err else [[20 + 3 * k, 20, 40, 40]],
                           "heatmap_path": None if err else st.save_arrays(key, **arrays)})
    return run


class _Audit(HTMLParser):
    """Collects everything in a parsed document that could execute or load something."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.bad: list[str] = []
        self.text: list[str] = []
        self.n_img = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "iframe", "object", "embed", "svg", "math", "frame", "base", "form", "link", "audio", "video"):
            self.bad.append(f"<{tag}>")
        for name, value in attrs:
            v = (value or "").strip().lower()
            if name.startswith("on"):
                self.bad.append(f"{tag}[{name}]")
            if name in ("src", "href", "action", "formaction", "srcset", "xlink:href") and not v.startswith("data:image/png;base64,"):
                self.bad.append(f"{tag}[{name}={value!r}]")
            if tag == "meta" and name == "http-equiv" and v == "refresh":
                self.bad.append("meta refresh")
        if tag == "img":
            self.n_img += 1

    def handle_data(self, data):
        self.text.append(data)


def audit(html: str) -> _Audit:
    a = _Audit()
    a.feed(html)
    a.close()
    return a


def test_report_of_hostile_run_has_no_executable_content(tmp_path):
    run = hostile_run(tmp_path)
    from medfocus.cli import main

    res = CliRunner().invoke(main, ["report", str(run), "--save-figures", "--title", _payload("title", 0)])
    assert res.exit_code == 0, res.output
    html = (run / "report.html").read_text(encoding="utf-8")
    a = audit(html)
    assert a.bad == []
    # the payloads were rendered, as text: the visible text holds them literally
    text = "".join(a.text)
    for field in ("model", "dataset", "finding", "answer", "error", "winner", "title"):
        assert f"{TRAVERSAL}/{field}" in text, field
    assert PAYLOADS[0] in text and PAYLOADS[1] in text
    # figures: present and all inside RUN/figures, nothing escaped the run folder
    figs = sorted((run / "figures").iterdir())
    assert len(figs) >= 6 and a.n_img == len(figs)
    assert all(f.parent == run / "figures" and f.suffix == ".png" for f in figs)
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(run in p.parents or p == tmp_path / "img.png" for p in written), sorted(written)
    assert not any("escaped" in p.name and run not in p.parents for p in written)


def test_safe_filename_is_one_component():
    for s in ("..", ".", "", "../../x", "/etc/passwd", "a/b\\c", "\x00", ".hidden", "ok_name-1.2", "é" * 400, "x" * 400):
        out = safe_filename(s)
        assert out not in (".", "..") and "/" not in out and "\\" not in out and "\x00" not in out
        assert not out.startswith(".") and 0 < len(out) <= 150 and Path(out).name == out
    assert safe_filename("ok_name-1.2") == "ok_name-1.2"
    assert safe_filename("x" * 400) != safe_filename("x" * 399 + "y")  # long names stay distinct


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="Debian chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)")
def test_no_script_runs_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    run = hostile_run(tmp_path)
    out = build_report(__import__("medfocus.runner.store", fromlist=["load_results"]).load_results(run / "predictions.jsonl"),
                       run / "report.html", title=_payload("title", 0))
    html = out.read_text(encoding="utf-8")
    # The report also carries a Content-Security-Policy that forbids scripts; strip it here so the
    # browser test checks the escaping itself, not the policy.
    csp = html[html.index('<meta http-equiv="Content-Security-Policy"'):]
    csp = csp[:csp.index(">") + 1]
    probe = out.with_name("probe.html")
    # A control script proves the page can run script and that the probe variable is readable.
    probe.write_text(html.replace(csp, "").replace("</body>", "<script>window.__control=1</script></body>"), encoding="utf-8")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(probe.resolve().as_uri())
        driver.execute_script("return 0")
        import time

        time.sleep(0.5)  # let onerror/onload handlers of any injected element fire
        assert driver.execute_script("return window.__control") == 1
        assert driver.execute_script("return window.__xss === undefined ? null : String(window.__xss)") is None
        assert driver.execute_script("return document.querySelectorAll('script').length") == 1  # the control only
        assert driver.execute_script("return document.querySelectorAll('svg,iframe,[onerror],[onload]').length") == 0
        assert f"{TRAVERSAL}/finding" in driver.find_element("tag name", "body").text
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
