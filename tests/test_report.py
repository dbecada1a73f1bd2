"""The HTML report: self-contained, escaped, and rendered with its plots by headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from alignkit.eval.report import write_report

SUMMARY = {
    "model": "tuned", "reference": "base", "created": "2026-11-21",
    "capability": {"asdiv": {"n": 10, "model": 0.4, "reference": 0.2, "model_ci": [0.1, 0.7],
                             "reference_ci": [0.0, 0.5], "ci_diff": [0.0, 0.4]}},
    "win_rate": {"judge": "correctness", "n": 10, "win_rate": 0.65, "ci": [0.5, 0.8], "lc_win_rate": 0.6, "wins": 4,
                 "ties": 5, "losses": 1, "position_bias": 0.5, "length_slope": 0.1},
    "lengths": {"model": [5, 7, 9, 3], "reference": [8, 9, 12, 11]},
    "reward": {"model": [0.1, 0.5, 0.9], "reference": [0.2, 0.1, 0.3]},
    "safety": {"refusal_harmful": {"model": {"advbench": 0.5}, "reference": {"advbench": 0.3}},
               "over_refusal": {"model": 0.1, "reference": 0.0}, "detector": {"accuracy": 0.71, "n": 169}},
    "probes": {"distinct_2": {"model": 0.4, "reference": 0.5}, "kl_to_reference": {"mean": 1.5, "se": 0.2}},
}
SAMPLES = [{"set": "asdiv", "prompt": "2+2?", "model": "<script>alert(1)</script> 4", "reference": "5"}]


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained_and_escaped(tmp_path):
    page = write_report(tmp_path, SUMMARY, samples=SAMPLES).read_text()
    pngs = images(page)
    assert len(pngs) == 5 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "src=\"http" not in page and "<script>" not in page and "&lt;script&gt;" in page
    assert (tmp_path / "summary.json").exists() and (tmp_path / "win_rate.png").exists()
    minimal = write_report(tmp_path / "min", {"model": "m", "win_rate": SUMMARY["win_rate"]}).read_text()
    assert len(images(minimal)) == 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium: apt-get install -y chromium")
def test_chromium_renders_every_plot(tmp_path):
    page = write_report(tmp_path, SUMMARY, samples=SAMPLES).read_text()
    # a copy of the page with a probe that writes each image's rendered width into the DOM once loaded
    probe = ("<script>window.onload=()=>{document.body.setAttribute('data-widths',"
             "[...document.images].map(i=>i.complete?i.naturalWidth:0).join(','))}</script>")
    test_page = tmp_path / "probe.html"
    test_page.write_text(page.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", test_page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    widths = [int(w) for w in re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) == 5 and all(w > 300 for w in widths), widths
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1000,1400",
                    (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    pixels = Image.open(shot).convert("L").getextrema()
    assert pixels[1] - pixels[0] > 100  # not a blank page
