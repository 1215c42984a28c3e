"""`python -m fastdrop bench`: the CLI runs on tiny sizes and its table and JSON have the promised
shape. Never asserts a wall-clock time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastdrop import bench


def test_sizes_parse_with_binary_suffixes():
    assert bench.parse_size("1024") == 1024
    assert bench.parse_size("1K") == 1 << 10
    assert bench.parse_size("64M") == 1 << 26
    assert bench.label(1 << 20) == "1M"
    assert bench.label(1000) == "1000"


def test_table_and_json_cover_every_variant_and_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--sizes", "1K,4K", "--repeats", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for variant in bench.VARIANTS:
        assert f"\n{variant} (float32; floor: " in text
    assert "x floor" in text and "GB/s" in text
    result = json.loads(out.read_text())
    assert {"cpu", "cores", "simd_backend", "threads"} <= set(result["machine"])
    assert result["machine"]["threads"] == 1
    cells = {(r["variant"], r["size"], r["impl"]) for r in result["records"]}
    for variant in bench.VARIANTS:
        for size in {r["size"] for r in result["records"] if r["variant"] == variant}:
            assert (variant, size, "fastdrop") in cells
            assert (variant, size, "floor") in cells
    for r in result["records"]:
        assert r["seconds"] > 0 and r["gbps"] > 0 and r["bytes"] > 0
        assert r["dtype"] == "float32"
    fused = {r["impl"] for r in result["records"] if r["variant"] == "dropout_add"}
    assert "unfused" in fused


def test_dtype_and_variant_selection(capsys):
    assert (
        bench.main(
            [
                "--sizes",
                "512",
                "--repeats",
                "1",
                "--dtype",
                "float16,float64",
                "--variants",
                "dropout,drop_path",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "dropout (float16;" in text and "drop_path (float64;" in text
    assert "alpha_dropout" not in text


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "int8"])
    with pytest.raises(SystemExit):
        bench.main(["--variants", "dropblock"])


def test_plot_writes_a_png_or_says_why_not(tmp_path, capsys):
    png = tmp_path / "bench.png"
    code = bench.main(
        ["--sizes", "1K", "--repeats", "1", "--variants", "dropout", "--plot", str(png)]
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert code == 1
        assert "matplotlib" in capsys.readouterr().err
    else:
        assert code == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_runs():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdrop",
            "bench",
            "--sizes",
            "256",
            "--repeats",
            "1",
            "--variants",
            "dropout",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "dropout (float32; floor: np.copyto)" in proc.stdout
    assert "threads" in proc.stdout.splitlines()[0]
