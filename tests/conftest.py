"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests deterministic and light on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Caches (reference pools, concept transfers) go to a per-run temporary folder, never the user's ~/.cache.
if "MEDFOCUS_CACHE" not in os.environ:
    import tempfile

    os.environ["MEDFOCUS_CACHE"] = tempfile.mkdtemp(prefix="medfocus-test-cache-")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole suite: the test models are tiny, so extra OpenMP threads only
    add synchronisation cost, and on a loaded 2-core machine spinning threads made tiny ops 10-100x
    slower (measured by the attribution and concepts tests)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (read-only real files); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}; real-data tests need it")
    return SHARED_DATA


# ---- LVLM layer (owner: LVLM helper) -------------------------------------------------------------
TINY_FAMILIES = ("qwen_vl", "gemma3", "llava")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """``{family: Path}`` of tiny random-initialised genuine model folders (built once per session)."""
    from medfocus.lvlm.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny_lvlms")
    return {fam: build_tiny(fam, root / fam, seed=0) for fam in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dirs) -> dict:
    """``{family: LVLMAdapter}`` loaded from :func:`tiny_model_dirs` on CPU in float32."""
    import torch

    from medfocus.lvlm.loading import load_lvlm

    return {fam: load_lvlm(str(p), device="cpu", dtype=torch.float32) for fam, p in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def demo_adapter():
    """The shipped demo model (``load_lvlm("demo")``); skips while its weights are not in the package yet."""
    from medfocus.lvlm.registry import DEMO_DIR

    if not (DEMO_DIR / "config.json").is_file() or not any(DEMO_DIR.glob("*.safetensors")):
        pytest.skip(f"demo model weights not shipped yet at {DEMO_DIR} (run `medfocus train-demo`)")
    from medfocus.lvlm.loading import load_lvlm

    return load_lvlm("demo", device="cpu")


# ---- real browser (viewer / report tests) ----------------------------------------------------------
#: Chromium flags that work headless in CI containers (no sandbox, no GPU, no network chatter).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A headless Debian chromium driven by selenium (browser console log enabled); skips with the reason
    when chromium, chromium-driver or selenium is missing (`.ci/run` installs them)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if chromium is None or driver_bin is None:
        pytest.skip("Debian chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1800"):
        opts.add_argument(flag)
    opts.binary_location = chromium
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_bin), options=opts)
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()
