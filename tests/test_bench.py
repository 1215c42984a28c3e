"""`python -m fastdrop bench`: the CLI runs on tiny sizes and its table and JSON have the promised
shape. Never asserts a wall-clock time."""

from __future__ import annotations

import collections
import copy
import json
import os
import subprocess
import sys
import time

import fastdrop
import numpy as np
import pytest
from fastdrop import bench, bench_train


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
    assert "dropout (float32; floor: torch copy_, " in proc.stdout
    assert "threads" in proc.stdout.splitlines()[0]


def test_the_floor_uses_fastdrops_thread_count(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--sizes", "1K", "--repeats", "1", "--variants", "dropout,dropout_add"]
    assert bench.main(args + ["--threads", "2", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    floors = {r["variant"]: r["floor"] for r in recs if r["impl"] == "floor"}
    assert floors == {
        "dropout": "torch copy_, 2 threads",
        "dropout_add": "torch.add(a, b, out=c), 2 threads",
    }
    # The single-threaded NumPy floor is still measured, beside it.
    assert {r["variant"] for r in recs if r["impl"] == "np_floor"} == {"dropout", "dropout_add"}


def test_incache_rows_cover_both_sizes_and_rates(tmp_path, capsys):
    out = tmp_path / "incache.json"
    assert bench.main(["--incache", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "threaded copy floor (torch copy_, 1 threads)" in text
    assert "64K  0.1" in text and "1M  0.5" in text
    recs = json.loads(out.read_text())["incache"]
    cells = {(r["size"], r["impl"], r["p"]) for r in recs}
    for n in (1 << 16, 1 << 20):
        assert (n, "floor", None) in cells and (n, "np_floor", None) in cells
        for p in (0.1, 0.5):
            for impl in ("fastdrop", "fastdrop_out", "fastdrop_torch"):
                assert (n, impl, p) in cells
    for r in recs:
        assert r["seconds"] > 0 and r["x_floor"] > 0
        assert r["floor"] == "torch copy_, 1 threads"
        assert (r["target"] is None) == (r["p"] is None)
    floor = {r["size"]: r["seconds"] for r in recs if r["impl"] == "floor"}
    for r in recs:
        assert r["x_floor"] == pytest.approx(r["seconds"] / floor[r["size"]])


def test_train_gives_a_row_per_model_and_setting(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = bench.main(
        [
            "--train",
            "--quick",
            "--models",
            "mlp,encoder",
            "--batch",
            "2",
            "--rounds",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "training step (forward, backward, SGD)" in text
    assert "speedup" in text and "mlp (2)" in text and "encoder (2)" in text
    result = json.loads(out.read_text())
    rows = {(r["model"], r["setting"]): r for r in result["train"]}
    assert set(rows) == {(m, s) for m in ("mlp", "encoder") for s in bench_train.SETTINGS}
    for (model, _), r in rows.items():
        assert r["batch"] == 2
        assert r["fastdrop_threads"] == 1 and r["torch_threads"] == 1
        assert r["torch_seconds"] > 0 and r["fastdrop_seconds"] > 0
        assert r["speedup"] == pytest.approx(r["torch_seconds"] / r["fastdrop_seconds"])
        assert r["speedup_interval"] is None  # one round cannot give one
        # The MLP's two dropouts, and the encoder's three per layer plus its attention (4
        # layers) are converted.
        assert r["replaced"] == {"mlp": 2, "encoder": 16}[model]
        # torch's dropout is a real part of the torch step; a converted model runs none, the
        # encoder's attention dropout (inside MultiheadAttention) included.
        assert 0 < r["dropout_share"] < 1
        assert r["dropout_share_after"] == 0
    # --train also gives the layer rows of its models (the MLP's tiny layers only on --layers).
    layers = result["layers"]
    assert {(r["layer"], tuple(r["shape"])) for r in layers} == {
        ("Dropout(0.1)", (2, 32, 256)),
        ("Dropout(0.1)", (2, 32, 1024)),
    }


def test_the_profilers_own_log_lines_are_held_back_and_others_passed_on(capfd):
    with bench_train.quiet_profiler_log():
        os.write(2, b"USDT:2026-12-03 11:41:47 6427:6427 SyncActivityProfilerHandler.cpp:39] x\n")
        os.write(2, b"ERROR:2026-12-03 11:41:49 6427:6427 DeviceProperties.cpp:56] ")
        os.write(2, b"gpuGetDeviceCount failed with code 35\n")
        os.write(2, b"ERROR: something else\n")
        print("to stdout")
    out, err = capfd.readouterr()
    assert err == "ERROR: something else\n"
    assert out == "to stdout\n"
    os.write(2, b"after\n")  # stderr is itself again
    assert capfd.readouterr().err == "after\n"


def test_the_dropout_share_prints_none_of_the_profilers_log(capfd):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    x = torch.randn(4, 8)
    share = bench_train.dropout_share(lambda: model(x).sum().backward(), model)
    assert 0 < share < 1
    err = capfd.readouterr().err
    assert "USDT" not in err and "gpuGetDeviceCount" not in err


def test_median_interval_takes_the_sign_test_order_statistics():
    # Coverage 1 - 2 P(Binomial(n, 1/2) < k): with 5 values even (min, max) covers only 93.75 %,
    # with 6 it covers 96.9 %; 9 values give the 2nd and 8th (96.1 %; the 3rd and 7th would
    # cover 82.0 %), 15 the 4th and 12th (96.5 %; the 5th and 11th 88.2 %).
    assert bench_train.median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None
    assert bench_train.median_interval([6.0, 1.0, 3.0, 2.0, 5.0, 4.0]) == (1.0, 6.0)
    assert bench_train.median_interval([float(v) for v in range(9, 0, -1)]) == (2.0, 8.0)
    assert bench_train.median_interval([float(v) for v in range(1, 16)]) == (4.0, 12.0)
    assert bench_train.median_interval([1.0] * 5, confidence=0.9) == (1.0, 1.0)
    assert bench_train.median_interval([]) is None
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="confidence"):
            bench_train.median_interval([1.0] * 9, confidence=bad)


def test_median_interval_covers_the_median_as_often_as_it_claims():
    # 4000 samples of 9 draws from an exponential distribution (median ln 2): the interval
    # (2nd, 8th smallest) covers the median with probability exactly 1 - 2 * 10 / 512 for any
    # continuous distribution. The count must lie within 5 standard deviations of its binomial
    # mean; an interval one order statistic narrower (82.0 %) or wider (99.6 %) lies far out.
    rng = np.random.default_rng(14)
    trials, covered = 4000, 0
    for sample in rng.exponential(size=(trials, 9)):
        lo, hi = bench_train.median_interval(sample.tolist())
        covered += lo <= np.log(2.0) <= hi
    p = 1.0 - 2.0 * 10 / 512
    sd = (trials * p * (1.0 - p)) ** 0.5
    assert abs(covered - trials * p) < 5.0 * sd, covered


def test_speedup_interval_pairs_the_rounds():
    baseline = [2.0, 4.0, 2.2, 8.0, 2.1, 6.0]
    candidate = [1.0, 2.0, 1.0, 4.0, 1.0, 3.0]  # per round: 2, 2, 2.2, 2, 2.1, 2
    ratios = bench_train.round_speedups(baseline, candidate)
    assert ratios == [2.0, 2.0, 2.2, 2.0, 2.1, 2.0]
    assert bench_train.median_interval(ratios) == (2.0, 2.2)
    assert bench_train.median_interval(ratios[:5]) is None
    with pytest.raises(ValueError, match="same rounds"):
        bench_train.round_speedups(baseline, candidate[:5])


def test_alternate_times_pairs_every_callable_by_round_and_alternate_takes_medians():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench_train.alternate_times(fns, 4)
    assert set(times) == {"a", "b"} and all(len(v) == 4 for v in times.values())
    assert all(t >= 0 for v in times.values() for t in v)
    # One warm-up call each, then the two orders by turns.
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert set(bench_train.alternate(fns, 3)) == {"a", "b"}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_balanced_orders_put_every_callable_after_every_other_equally_often(n):
    orders = bench_train.balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = {}
    for order in orders:
        for before, after in zip(order, order[1:]):
            follows[(before, after)] = follows.get((before, after), 0) + 1
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    assert sorted(follows) == sorted(pairs)
    assert len(set(follows.values())) <= 1  # each ordered pair as often as every other


def test_three_callables_follow_each_other_equally_often_in_alternate_times():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("torch", "fastdrop", "fastdrop_1")}
    bench_train.alternate_times(fns, 6)
    rounds = [calls[3 + 3 * r : 6 + 3 * r] for r in range(6)]
    after = {}
    for order in rounds:
        for before, this in zip(order, order[1:]):
            after.setdefault(this, []).append(before)
    # Rotation gave fastdrop_1 only fastdrop before it inside a round, and torch no torch.
    assert sorted(after["fastdrop_1"]) == ["fastdrop", "fastdrop", "torch", "torch"]
    assert sorted(after["fastdrop"]) == ["fastdrop_1", "fastdrop_1", "torch", "torch"]


def test_a_rows_speedup_is_the_median_of_its_rounds_ratios(monkeypatch):
    # torch / fastdrop per round: 1, 0.5, 2 (median 1), where the medians' ratio is 1 / 2: one
    # slow round of either side moves the speedup no more than any other round.
    def fake(fns, rounds):
        for f in fns.values():
            f()
        return {"torch": [1.0, 1.0, 10.0], "fastdrop": [1.0, 2.0, 5.0], "fastdrop_1": [1.0] * 3}

    monkeypatch.setattr(bench_train, "alternate_times", fake)
    records = bench_train.layers(["mlp"], rounds=3, threads=1, batch=3, log=lambda _: None)
    assert records and all(r["speedup"] == 1.0 for r in records)
    assert all(r["torch_seconds"] == 1.0 and r["fastdrop_seconds"] == 2.0 for r in records)


def test_the_tables_give_each_rows_interval_or_a_dash():
    row = {
        "model": "mlp",
        "batch": 32,
        "setting": "default",
        "fastdrop_threads": 2,
        "torch_threads": 2,
        "dropout_share": 0.3,
        "dropout_share_after": 0.0,
        "torch_seconds": 1e-3,
        "fastdrop_seconds": 5e-4,
        "speedup": 2.0,
    }
    table = bench_train.train_table(
        [dict(row, speedup_interval=(1.91, 2.07)), dict(row, speedup_interval=None)]
    )
    lines = table.splitlines()
    assert "95% interval" in lines[2]
    assert lines[3].endswith("1.91-2.07") and lines[4].endswith("-")
    assert "fewer than 6 rounds" in lines[-1]
    layer = {
        "model": "vit_tiny",
        "layer": "DropPath(0.1)",
        "shape": [16, 197, 192],
        "torch_seconds": 3e-4,
        "fastdrop_seconds": 2.5e-4,
        "fastdrop_1thread_seconds": 3e-4,
        "speedup": 1.2,
        "speedup_interval": (0.97, 1.31),
        "fastdrop_threads": 2,
        "torch_threads": 2,
    }
    assert " 0.97-1.31 " in bench_train.layers_table([layer])


def test_the_unconverted_row_times_a_copy_that_keeps_torchs_dropout(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "aa.json"
    args = ["--train", "--quick", "--models", "mlp", "--rounds", "1", "--threads", "1"]
    assert bench.main(args + ["--settings", "default,unconverted", "--json", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["train"]}
    assert set(rows) == {"default", "unconverted"}
    converted, same = rows["default"], rows["unconverted"]
    assert converted["replaced"] == 2 and converted["dropout_share_after"] == 0
    # The copy keeps torch's two Dropout modules: nothing replaced, torch's dropout still run.
    assert same["replaced"] == 0
    assert 0 < same["dropout_share_after"] < 1
    assert same["torch_seconds"] > 0 and same["fastdrop_seconds"] > 0


def test_the_converted_model_shares_the_torch_models_weights():
    # The two steps of the training table read and write the same weight memory, so where a
    # copy's weights sit cannot make one side faster; only the dropout modules differ.
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2)
    )
    converted = bench_train._sharing_weights(copy.deepcopy(model), model)
    fastdrop.nn.replace_dropout(converted)
    assert isinstance(converted[2], fastdrop.nn.Dropout)
    assert isinstance(model[2], torch.nn.Dropout)
    for (name, p), (_, q) in zip(model.named_parameters(), converted.named_parameters()):
        assert p is q, name
    for (name, b), (_, c) in zip(model.named_buffers(), converted.named_buffers()):
        assert b is c, name
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)  # a step of one moves the other's weights


def test_layers_rows_are_the_shapes_the_modules_really_see(capsys):
    records = bench_train.layers(["mlp"], rounds=1, threads=1, batch=3, log=lambda _: None)
    assert [(r["layer"], r["shape"]) for r in records] == [
        ("Dropout(0.2)", [3, 256]),
        ("Dropout(0.5)", [3, 256]),
    ]
    for r in records:
        assert r["replaces"] == "torch.nn.modules.dropout.Dropout"
        assert r["torch_seconds"] > 0 and r["fastdrop_seconds"] > 0
        assert r["fastdrop_1thread_seconds"] > 0
        assert r["speedup_interval"] is None
    table = bench_train.layers_table(records)
    assert "Dropout(0.2)" in table and "(3, 256)" in table


def test_layer_shapes_of_a_timm_resnet_include_dropblock_and_drop_path():
    pytest.importorskip("timm")
    rows = bench_train.layer_shapes(["resnet50"], batch=1, quick=True)
    kinds = {(layer, shape) for _, layer, shape, _ in rows}
    # timm's ResNet: DropBlock (block 5) in stage 3 and (block 3) in stage 4, drop path in every
    # block but the first; the highest stochastic-depth rate (0.1) at the last stage.
    assert ("DropBlock2d(0.1, 5)", (1, 256, 10, 10)) in kinds
    assert ("DropBlock2d(0.1, 3)", (1, 512, 5, 5)) in kinds
    assert ("DropPath(0.1)", (1, 2048, 5, 5)) in kinds


def test_dropout_share_counts_the_dropout_modules_and_their_backward():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
    x = torch.randn(4, 8)

    def step():
        model(x).sum().backward()

    share = bench_train.dropout_share(step, model)
    assert 0 < share < 1
    # Without dropout modules nothing is counted.
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert bench_train.dropout_share(lambda: plain(x).sum().backward(), plain) == 0


def test_new_modes_refuse_bad_arguments():
    for args in (
        ["--train", "--models", "alexnet"],
        ["--train", "--settings", "sometimes"],
        ["--train", "--batch", "0"],
        ["--layers", "--rounds", "0"],
    ):
        with pytest.raises(SystemExit):
            bench.main(args)


def test_attention_rows_give_both_shapes_times_and_saved_bytes(tmp_path, capsys, monkeypatch):
    import fastdrop
    import torch
    from fastdrop import bench_family

    # Tiny shapes keep the test fast; the CLI path, table and JSON are the real ones.
    monkeypatch.setattr(
        bench_family, "ATTENTION_SHAPES", [("tiny", (2, 2, 16, 8)), ("wide", (1, 3, 33, 16))]
    )
    before = (torch.get_num_threads(), fastdrop.get_num_threads())
    out = tmp_path / "attn.json"
    try:
        code = bench.main(
            ["--attention", "--quick", "--rounds", "1", "--threads", "1", "--json", str(out)]
        )
        threads_during = (torch.get_num_threads(), fastdrop.get_num_threads())
    finally:
        torch.set_num_threads(before[0])
        fastdrop.set_num_threads(before[1])
    assert code == 0
    assert threads_during == (1, 1)
    text = capsys.readouterr().out
    assert "dropout_p = 0.1" in text and "speedup" in text and "saved MiB" in text
    assert "tiny" in text and "1,3,33,16" in text
    result = json.loads(out.read_text())
    rows = result["attention"]
    assert [r["shape"] for r in rows] == ["tiny", "wide"]
    assert rows[1]["bhld"] == [1, 3, 33, 16]
    for r in rows:
        assert r["fastdrop_s"] > 0 and r["torch_s"] > 0
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["fastdrop_s"])
        assert r["dropout_p"] == 0.1 and r["rounds"] == 1 and r["threads"] == 1
        # Both keep at least the (B, H, L, L) attention weights in some form for backward.
        b, h, seq, _ = r["bhld"]
        assert r["fastdrop_saved_bytes"] > 0 and r["torch_saved_bytes"] >= 4 * b * h * seq * seq
    assert result["machine"]["threads"] == 1


def test_family_rows_name_their_baselines(tmp_path, capsys):
    from fastdrop import bench_family

    out = tmp_path / "family.json"
    assert bench.main(["--family", "--quick", "--rounds", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for name in bench_family.FAMILY:
        assert f"\n{name:>22} " in text
    rows = json.loads(out.read_text())["family"]
    assert [r["variant"] for r in rows] == list(bench_family.FAMILY)
    baselines = {r["variant"]: r["baseline"] for r in rows}
    assert baselines == {
        "gaussian_dropout": "torch x*(1+s*randn)",
        "drop_block_3d": "torchvision maths",
        "patch_dropout": "timm PatchDropout",
        "locked_dropout": "AWD-LSTM formula",
        "noise_shape": "torch dropout2d",
        "embedding_dropout": "fastai maths",
        "stochastic_depth_row": "torchvision maths",
        "stochastic_depth_batch": "torchvision maths",
        "weight_dropout": "fastai F.dropout",
        "mc_sample": "torch loop",
    }
    for r in rows:
        assert r["dtype"] == "float32" and r["rounds"] == 1
        assert r["baseline"] in text
        assert set(r["seconds"]) >= {"fastdrop", r["baseline"]}
        assert all(s > 0 for s in r["seconds"].values())
        assert r["speedup"] == pytest.approx(r["seconds"][r["baseline"]] / r["seconds"]["fastdrop"])
    assert [r["variant"] for r in rows if "floor" in r] == ["noise_shape"]
    floor = rows[bench_family.FAMILY.index("noise_shape")]
    assert floor["floor"] == "np.copyto floor" and "np.copyto floor" in text
    assert floor["x_floor"] == pytest.approx(
        floor["seconds"]["fastdrop"] / floor["seconds"]["np.copyto floor"]
    )


def test_drop_block3d_reference_drops_whole_blocks_and_rescales():
    import torch
    from fastdrop import bench_family

    torch.manual_seed(0)
    x = torch.ones(2, 3, 9, 10, 11)
    y = bench_family.drop_block3d_reference(x, 0.3, 3)
    kept = y != 0
    assert 0 < kept.sum() < kept.numel()
    # Kept elements share torchvision's one normalising scale: numel / number kept.
    assert torch.allclose(y[kept], torch.full_like(y[kept], kept.numel() / kept.sum().item()))
    # Every dropped element lies in a dropped 3x3x3 cube (block_size 3, seeds padded by 1).
    dropped = (~kept).double()
    cubes = torch.nn.functional.max_pool3d(
        -torch.nn.functional.max_pool3d(-dropped, 3, stride=1, padding=1), 3, stride=1, padding=1
    )
    assert torch.equal(cubes, dropped)
    assert torch.allclose(bench_family.drop_block3d_reference(x, 0.0, 3), x)


def test_stochastic_depth_reference_drops_rows_or_everything():
    import torch
    from fastdrop import bench_family

    torch.manual_seed(0)
    x = torch.ones(400, 3, 5)
    y = bench_family.stochastic_depth_reference(x, 0.25, "row")
    # Each sample is dropped whole or kept whole, scaled by 1 / (1 - p).
    per_sample = y.reshape(400, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 4 / 3).all(1))
    kept = int((per_sample[:, 0] != 0).sum())
    assert 0 < kept < 400
    seen = set()
    for _ in range(40):
        b = bench_family.stochastic_depth_reference(x, 0.5, "batch")
        assert torch.all(b == b.flatten()[0])  # one decision for the whole input
        seen.add(float(b.flatten()[0]))
    assert seen == {0.0, 2.0}


def test_fastai_weight_dropout_masks_the_raw_weight_each_forward():
    import torch
    from fastdrop import bench_family

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    w0 = lin.weight.detach().clone()
    wd = bench_family.fastai_weight_dropout(lin, 0.5).train()
    assert sorted(n for n, _ in wd.named_parameters()) == ["module.bias", "weight_raw"]
    x = torch.randn(8, 64)
    wd(x).sum().backward()
    w1 = lin.weight.detach().clone()
    # The module's weight is F.dropout(weight_raw): entries 0 or 2 * raw, about half each.
    assert torch.all((w1 == 0) | torch.isclose(w1, 2 * w0))
    assert 0.4 < float((w1 == 0).float().mean()) < 0.6
    # The gradient reaches the raw weight through the mask, and the next forward draws anew.
    assert wd.weight_raw.grad is not None
    assert torch.equal(wd.weight_raw.grad == 0, w1 == 0)
    wd(x)
    assert not torch.equal(lin.weight == 0, w1 == 0)
    wd.eval()
    assert torch.allclose(wd(x), torch.nn.functional.linear(x, w0, lin.bias))


def test_attention_and_family_refuse_bad_rounds():
    with pytest.raises(SystemExit):
        bench.main(["--family", "--rounds", "0"])


def test_busy_core_spinner_dies_with_its_parent(tmp_path):
    """A benchmark killed inside a "busy core" row must not leave its spinner burning a core
    (one once spun for 45 minutes after its bench was killed)."""
    pid_file = tmp_path / "spinner.pid"
    script = (
        "import os, time\n"
        "from fastdrop.bench_train import BusyCore\n"
        "with BusyCore() as busy:\n"
        f"    open({str(pid_file)!r}, 'w').write(str(busy.proc.pid))\n"
        "    time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the spinner never started"
            time.sleep(0.05)
        spinner = int(pid_file.read_text())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{spinner}") and _state(spinner) != "Z":
        assert time.monotonic() < deadline, "the spinner outlived its parent"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_the_own_threads_row_runs_on_fastdrops_helpers_and_then_shares_again(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.backends.openmp.is_available():
        pytest.skip("torch's intra-op pool is not OpenMP here")
    out = tmp_path / "own.json"
    seen = []
    real = bench_train.alternate_times

    def spy(steps, rounds):
        seen.append(fastdrop._core.shares_openmp())
        return real(steps, rounds)

    saved, bench_train.alternate_times = bench_train.alternate_times, spy
    try:
        args = ["--train", "--quick", "--models", "mlp", "--rounds", "1", "--threads", "2"]
        code = bench.main(args + ["--settings", "default,own threads", "--json", str(out)])
    finally:
        bench_train.alternate_times = saved
    assert code == 0
    assert seen == [True, False]
    assert fastdrop._core.shares_openmp()
    rows = json.loads(out.read_text())["train"]
    assert [r["setting"] for r in rows] == ["default", "own threads"]


def test_incache_rounds_put_every_candidate_after_every_other_equally_often(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_batched", lambda f, batch: lambda: calls.append(f))
    x = np.ones(bench.INCACHE_SIZES[0], dtype=np.float32)
    k = len(bench._incache_size(x, 1, 1))  # the candidates, floors included
    repeats = len(bench_train.balanced_orders(k))  # 5 * repeats rounds: whole cycles of orders
    calls.clear()
    bench._incache_size(x, repeats, 1)
    rounds = [calls[i : i + k] for i in range(k, len(calls), k)]  # after the warm-up calls
    assert len(rounds) == 5 * repeats and len(set(calls)) == k
    follows = collections.Counter((a, b) for r in rounds for a, b in zip(r, r[1:]))
    pairs = [(a, b) for a in set(calls) for b in set(calls) if a is not b]
    assert len({follows[pair] for pair in pairs}) == 1  # each after each other equally often
