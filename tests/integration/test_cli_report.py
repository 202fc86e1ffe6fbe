"""`mechunlearn run` on the real default model: the report folder, resuming, and the page in a
real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from mechunlearn.cli import main

pytestmark = pytest.mark.integration

N = 6  # examples per half: enough to exercise every stage


@pytest.fixture(scope="module")
def report(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("report")
    # An interrupted run: only the collect stage, then the full run resumes from it.
    assert main(["collect", "--n", str(N), "--out", str(out), "--quiet"]) == 0
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()}
    assert main(["run", "--n", str(N), "--out", str(out), "--quiet"]) == 0
    return out, saved


def test_rerun_resumes_from_saved_statistics(report):
    out, saved = report
    assert saved, "the collect stage saved nothing"
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stats").iterdir()}
    assert after == saved  # nothing was collected twice


def test_report_folder_has_tables_and_figures(report):
    out, _ = report
    for name in (
        "gaussian_summary",
        "separation_histograms",
        "separation_by_layer",
        "hypercube_inclusion",
        "hypercube_geometry",
        "convexity",
    ):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    table = pd.read_csv(out / "tables" / "evaluation.csv")
    assert set(table["method"]) == {"base", "NeuronAdjust", "KeySpaceDetection", "SelectivePruning"}
    assert len(table) == 3 * 4  # forget, retain, general x methods
    assert (table.loc[table.method == "base", "relative"].dropna() == 1.0).all()
    records = json.loads((out / "tables" / "evaluation.json").read_text())
    assert len(records) == len(table)
    html = (out / "index.html").read_text()
    for src in re.findall(r"<img src='([^']+)'", html):
        assert (out / src).exists(), src
    assert "Relative performance" in html and "Timings" in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_page_renders_in_a_real_browser(report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    out, _ = report
    # A copy of the page that writes, after load, each image's decoded width into the DOM.
    probe = out / "_probe.html"
    probe.write_text(
        (out / "index.html")
        .read_text()
        .replace(
            "</body>",
            "<script>window.addEventListener('load', () => { for (const img of "
            "document.images) img.setAttribute('data-width', img.naturalWidth); "
            "document.body.setAttribute('data-images', document.images.length); });"
            "</script></body>",
        )
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
    ]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    widths = [int(w) for w in re.findall(r'data-width="(\d+)"', dom)]
    n_images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert n_images == 6 and len(widths) == n_images
    assert all(w > 100 for w in widths), widths  # every image decoded
    shot = tmp_path / "page.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2000", probe.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 20000
    probe.unlink()
