"""Smoke test of the collectives benchmark: small, quick, and no timing thresholds."""

import json
import math

import pytest

from labkit.bench import collectives as bench


def test_sizes():
    assert bench.parse_bytes("4K") == 4096
    assert bench.parse_bytes("64M") == 64 * 2 ** 20
    assert bench.parse_bytes("1g") == 2 ** 30
    assert bench.parse_bytes("512") == 512
    assert bench.parse_bytes("4KB") == bench.parse_bytes("4KiB") == 4096
    with pytest.raises(ValueError):
        bench.parse_bytes("four")
    assert bench.message_sizes(4096, 64 * 2 ** 20) == [4 ** k * 4096 for k in range(8)]
    assert bench.message_sizes(4096, 10000, factor=2) == [4096, 8192]


def test_measure_two_ranks_two_sizes():
    sizes = [4096, 16384]
    records = bench.measure(2, sizes, iters=2, warmup=1, slow_max_bytes=4096)

    expected = {(m, a) for m in sizes for a in bench.MAIN} | {(4096, a) for a in bench.SLOW}
    assert {(r["nbytes"], r["algorithm"]) for r in records} == expected
    for r in records:
        assert r["world_size"] == 2
        assert r["numel"] == r["nbytes"] // 4  # float32
        assert len(r["times"]) == 2 and all(t > 0 for t in r["times"])
        assert r["seconds"] == pytest.approx(sorted(r["times"])[0] / 2 + sorted(r["times"])[1] / 2)

    table = bench.summarise(records)
    assert set(table) == {(2, m) for m in sizes}
    for (n, m), row in table.items():
        for name in bench.MAIN:
            cell = row[name]
            assert cell["us"] > 0 and cell["algbw"] > 0 and cell["busbw"] > 0
            assert cell["algbw"] == pytest.approx(m / (cell["us"] / 1e6) / 1e9)
            assert cell["busbw"] == pytest.approx(cell["algbw"] * 2 * (n - 1) / n)
        assert row["ring/torch"] == pytest.approx(row["ring"]["busbw"] / row["torch"]["busbw"])
    assert ("tree" in table[(2, 4096)]) and ("tree" not in table[(2, 16384)])

    fits = bench.fit(records)
    assert set(fits) == {"ring", "torch"}  # tree and naive have one point only: no fit
    for f in fits.values():
        assert f["alpha_us"] >= 0 and f["gbps"] > 0 and f["points"] == 2


def _record(n, nbytes, algorithm, seconds):
    return {"world_size": n, "nbytes": nbytes, "numel": nbytes // 4, "algorithm": algorithm,
            "times": [seconds] * 3, "seconds": seconds}


def test_table_on_hand_made_numbers():
    # N=4, 16 MiB: ring 0.1 s, torch 0.08 s -> algbw 0.168 / 0.210 GB/s, busbw x1.5, ratio 0.8.
    m = 16 * 2 ** 20
    records = [_record(4, m, "ring", 0.1), _record(4, m, "ring+check", 0.125), _record(4, m, "torch", 0.08),
               _record(4, 4096, "ring", 0.002), _record(4, 4096, "torch", 0.001), _record(4, 4096, "tree", 0.004)]
    table = bench.summarise(records)
    row = table[(4, m)]
    assert row["ring"]["algbw"] == pytest.approx(m / 0.1 / 1e9)
    assert row["ring"]["busbw"] == pytest.approx(m / 0.1 / 1e9 * 1.5)
    assert row["ring/torch"] == pytest.approx(0.8)
    assert table[(4, 4096)]["ring/torch"] == pytest.approx(0.5)

    lines = bench.format_results(table, 4).splitlines()
    assert lines[0].replace("-", " ").split() == ["ring", "ring+check", "torch"]  # over their columns
    assert lines[1].split() == ["size", "count", "calls"] + ["time", "algbw", "busbw"] * 3 + ["ring/torch"]
    assert len(lines) == 3 + 2
    small, large = lines[3].split(), lines[4].split()
    assert small[:3] == ["4096", "1024", "3"]
    assert small[3:6] == ["2000.0", "0.002", "0.003"]
    assert small[6:9] == ["-", "-", "-"]  # no ring+check at this size
    assert small[-1] == "0.50"
    assert large[:3] == [str(m), str(m // 4), "3"]
    assert large[3] == "100000.0" and large[-1] == "0.80"
    assert large[4] == f"{m / 0.1 / 1e9:.3f}" and large[5] == f"{m / 0.1 / 1e9 * 1.5:.3f}"

    slow = bench.format_results(table, 4, ("ring", *bench.SLOW)).splitlines()
    assert len(slow) == 3 + 2 and "ring/torch" not in slow[1]
    assert slow[3].split()[6:9] == ["4000.0", "0.001", "0.002"]  # tree
    assert slow[4].split()[6:] == ["-"] * 6  # no tree/naive at 16 MiB
    only = bench.format_results(table, 4, ("ring", *bench.SLOW), rows_with=bench.SLOW).splitlines()
    assert [line.split() for line in only[3:]] == [slow[3].split()]  # the row with tree in it only
    assert bench.format_results(table, 8).splitlines()[3:] == []  # no rows for another N


def test_fit_recovers_alpha_beta():
    alpha, beta = 50e-6, 1 / 2e9
    from labkit import cost_model
    records = [_record(n, m, "ring", cost_model.predict("ring", n, m, alpha, beta))
               for n in (2, 4, 8) for m in (4096, 2 ** 20, 2 ** 26)]
    f = bench.fit(records)["ring"]
    assert f["alpha_us"] == pytest.approx(50, rel=1e-6)
    assert f["gbps"] == pytest.approx(2, rel=1e-6)
    assert f["median_error"] == pytest.approx(0, abs=1e-9)
    assert set(bench.fit(records, min_bytes=2 ** 20)) == {"ring"}
    assert bench.fit(records, min_bytes=2 ** 20)["ring"]["points"] == 6
    text = bench.format_fits(bench.fit(records), "the fit")
    assert text.splitlines()[0] == "the fit" and text.splitlines()[2].split()[:4] == ["ring", "ring", "50.0", "2.000"]


def test_main_writes_table_and_json(tmp_path, capsys):
    out, js = tmp_path / "table.txt", tmp_path / "results.json"
    bench.main(["--world-sizes", "2", "--min-bytes", "4K", "--max-bytes", "4K", "--iters", "1",
                "--warmup", "1", "--slow-max-bytes", "0", "--output", str(out), "--json", str(js)])
    printed = capsys.readouterr().out
    assert out.read_text().strip() == printed.strip()
    assert "N = 2 ranks" in printed and "ring/torch" in printed and "slow algorithms" not in printed
    data = json.loads(js.read_text())
    assert {r["algorithm"] for r in data["records"]} == set(bench.MAIN)
    assert all(not math.isnan(r["seconds"]) for r in data["records"])
