"""The pass log page (`moecompile inspect report.json --html page.html`): built from a real ReLU rewrite of a small
Mixtral with its routing statistics, checked for content in the HTML and for layout in a real headless Chromium
(Debian's chromium package, which scripts/install.sh installs where apt-get can): the browser lays the page out,
its inline check records whether any element is wider than the page, and a screenshot is taken."""
import json
import os
import shutil
import struct
import subprocess
import zlib

import pytest

from moecompile import hf_zoo
from moecompile.cli import main
from moecompile.passes.log import Report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("MOECOMPILE_REQUIRE_CHROMIUM"),
    reason="no chromium on this machine (scripts/install.sh installs Debian's where apt-get can; CI requires it)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(report, html text, page path): stats with a ReLU rewrite on a saved small Mixtral, through the CLI."""
    tmp = tmp_path_factory.mktemp("page")
    hf_zoo.build("mixtral").save_pretrained(tmp / "ckpt")
    text = tmp / "corpus.txt"
    text.write_text(open(json.__file__).read() * 4)
    assert main(["stats", str(tmp / "ckpt"), "--routing", "relu", "--text", str(text), "--batches", "8",
                 "--report", str(tmp / "report.json")]) == 0
    assert main(["inspect", str(tmp / "report.json"), "--html", str(tmp / "page.html")]) == 0
    rep = Report.from_json((tmp / "report.json").read_text())
    return rep, (tmp / "page.html").read_text(), tmp / "page.html"


def test_the_page_holds_every_block_and_the_routing_figures(page):
    rep, html, _ = page
    assert len(rep.blocks) == 2 and len(rep.layer_stats) == 2
    for block in rep.blocks:
        assert f"<td>{block.path}</td>" in html and block.decision in html
        assert block.routing_summary.split(";")[0].replace(">", "&gt;") in html
    # one range row per layer in each active-experts figure, one heatmap row of E cells per layer
    assert html.count("<svg") == 4  # rewrite: active, threshold; statistics: active, load
    assert html.count("<circle") == 2 * len(rep.blocks)
    E = len(rep.layer_stats[0]["expert_load"])
    assert html.count("x uniform</title></rect>") == E * len(rep.layer_stats)
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained: nothing fetched


def test_inspect_html_refuses_a_folder_and_leaves_nothing(tmp_path, page, capsys):
    report_file = page[2].parent / "report.json"
    assert main(["inspect", str(report_file), "--html", str(tmp_path)]) == 2
    assert "pass a file path in an existing folder" in capsys.readouterr().err
    assert main(["inspect", str(report_file), "--html", str(tmp_path / "no" / "page.html")]) == 2
    assert list(tmp_path.iterdir()) == []


def _png_size_and_colours(data: bytes) -> tuple[tuple[int, int], int]:
    """(width, height) and the number of distinct pixel rows of an 8-bit RGB(A) PNG (no external decoder)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    idat = b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            idat += body
        else:
            chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(idat)
    stride = width * (4 if colour == 6 else 3) + 1
    rows = {raw[i * stride + 1:(i + 1) * stride] for i in range(0, height, max(1, height // 200))}
    return (width, height), len(rows)


@needs_chromium
def test_chromium_lays_the_page_out_within_its_width(page, tmp_path):
    _, _, path = page
    assert CHROMIUM, "MOECOMPILE_REQUIRE_CHROMIUM is set but no chromium is installed (apt-get install chromium)"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2400",
              "--virtual-time-budget=3000"]
    dom = subprocess.run(common + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-layout="ok"' in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    shot = tmp_path / "page.png"
    subprocess.run(common + [f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120, check=True)
    (width, height), distinct_rows = _png_size_and_colours(shot.read_bytes())
    assert (width, height) == (1280, 2400)
    assert distinct_rows > 20  # text, tables and figures drawn, not a blank page
