"""The parameter-server benchmark on tiny settings: its byte formulas equal what the servers count, its
summary arithmetic, the medians over repeats, its input checks and its command line. No timing thresholds
(only a lower bound that the emulated compute's sleeps guarantee)."""

import json
import math

import pytest

from labkit.bench import ps as bench

W, STEPS, COMPUTE_MS, SLOW = 2, 4, 6.0, 3.0
TINY = dict(steps=STEPS, batch=12, compute_ms=COMPUTE_MS, features=11, samples=64, validation=32, timeout=10.0,
            retries=0, target=10.0)


@pytest.fixture(scope="module")
def result():
    return bench.measure((W,), (1, 2), ("sync", "bounded:1"), (1.0, SLOW), **TINY)


def test_every_configuration_ran_to_the_end(result):
    assert [(r["mode"], r["servers"], r["slow"]) for r in result["runs"]] == \
        [(m, s, k) for s in (1, 2) for k in (1.0, SLOW) for m in ("sync", "bounded:1")]
    for run in result["runs"]:
        assert run["errors"] == [] and run["stopped"] == "" and run["steps_done"] == [STEPS] * W
        assert len(run["server_stats"]) == run["servers"]


def test_summary_arithmetic(result):
    rows = bench.summarise(result)
    for row, run in zip(rows, result["runs"]):
        sync = row["mode"] == "sync"
        assert not row["failed"] and row["processes"] == W + row["servers"]
        assert row["pushes"] == W * STEPS                           # every push logged once on server 0
        assert row["versions"] == (STEPS if sync else W * STEPS)    # sync: one update per step
        stale = [u[3] for u in run["updates"]]
        if sync:
            assert set(stale) == {0}
        else:                                                       # bounded staleness: τ ≤ (W−1)(2τ_clock+1)
            assert row["staleness_max"] == max(stale) <= (W - 1) * (2 * 1 + 1)
        assert row["staleness_mean"] == pytest.approx(sum(stale) / len(stale))
        assert row["updates_per_s"] > 0 and row["samples_per_s"] > 0
        # sync updates carry W pushes: samples/s = updates/s * W * local batch; one push per update otherwise
        local = TINY["batch"] / W
        assert row["samples_per_s"] == pytest.approx(row["updates_per_s"] * local * (W if sync else 1))
        # the straggler sleeps slow * compute_ms / W per step, so the run cannot be shorter than that
        assert row["run_s"] >= STEPS * row["slow"] * COMPUTE_MS / W / 1e3
        assert row["run_s"] == run["updates"][-1][0]
        assert row["time_to_target"] is not None                    # the target (10) is above the start
        assert 0 < row["final_loss"] < result["initial_loss"]


def test_sync_is_the_same_training_whatever_the_servers_and_the_straggler(result):
    losses = [r["final_loss"] for r in result["runs"] if r["mode"] == "sync"]
    assert len(losses) == 4
    assert max(losses) - min(losses) < 1e-6 * max(losses)
    assert losses[0] < result["initial_loss"]


def test_traffic_equals_the_formulas(result):
    rows = bench.traffic(result)
    assert [(r["workers"], r["servers"]) for r in rows] == [(W, 1), (W, 2)]
    numel = TINY["features"] + 1
    for r in rows:
        assert r["exact"] and r["runs"] == 4
        (fin, fout) = bench.server_bytes(W, r["servers"], numel, STEPS)[0]
        assert (r["server_in"], r["server_out"]) == (fin / STEPS, fout / STEPS)
        shard = math.ceil(numel / r["servers"]) * 4                 # server 0 holds the larger half
        assert fin == W * (STEPS * (2 * bench.HEADER_BYTES + shard) + bench.HEADER_BYTES)
        assert fout == W * STEPS * (bench.REPLY_BYTES + shard)
        assert r["ring_sent"] == bench.ring_bytes_per_rank(W, numel) == 2 * (W - 1) / W * numel * 4
    # two shards: each server moves half (up to one element) of what one server moves
    one, two = rows
    assert two["server_out"] == pytest.approx(one["server_out"] / 2, abs=bench.REPLY_BYTES * W + 4 * W)


def test_tables_print_every_configuration(result):
    table = bench.format_table(result).splitlines()
    assert len(table) == 1 + 8
    assert all(line.split()[:2] in (["sync", str(W)], ["bounded:1", str(W)]) for line in table[1:])
    assert len(bench.format_traffic(result).splitlines()) == 1 + 2


def test_server_bytes_and_ring_formulas():
    # 10 parameters over 3 servers: shards of 4, 3, 3 elements
    assert bench.server_bytes(2, 3, 10, 5) == [(2 * (5 * (64 + 16) + 32), 2 * 5 * (8 + 16)),
                                               (2 * (5 * (64 + 12) + 32), 2 * 5 * (8 + 12)),
                                               (2 * (5 * (64 + 12) + 32), 2 * 5 * (8 + 12))]
    assert bench.ring_bytes_per_rank(1, 100) == 0
    assert bench.ring_bytes_per_rank(4, 100) == 600.0


def test_combine_takes_medians_over_repeats():
    def row(repeat, rate, hit, failed=False):
        base = dict(mode="async", workers=2, servers=1, slow=1.0, processes=3, repeat=repeat, failed_launches=0,
                    failed=failed)
        if failed:
            return base
        return dict(base, steps_done=5, updates_per_s=rate, samples_per_s=10 * rate, run_s=1.0, step_ms=20.0,
                    overhead_ms=2.0, final_loss=0.1 * rate, staleness_mean=1.0, staleness_max=repeat,
                    time_to_target=hit, samples_to_target=None if hit is None else 100 * hit, stopped="")
    rows = [row(0, 3.0, None), row(1, 1.0, 0.5), row(2, 2.0, 0.7), row(3, 0, None, failed=True)]
    (out,) = bench.combine(rows)
    assert out["repeats"] == 3 and out["updates_per_s"] == 2.0 and out["updates_per_s_range"] == (1.0, 3.0)
    assert out["samples_per_s"] == 20.0 and out["final_loss"] == pytest.approx(0.2)
    assert out["reached"] == 2 and out["time_to_target"] == pytest.approx(0.6)
    assert out["staleness_max"] == 2
    (none,) = bench.combine([row(0, 0, None, failed=True)])
    assert none["failed"] and none["repeats"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(workers=(0,)), "workers must be positive"),
    (dict(servers=(13,)), "cannot cut 12 parameters into 13"),
    (dict(workers=(5,)), "not a multiple"),
    (dict(modes=("sync", "bounded")), "unknown mode 'bounded'"),
    (dict(modes=()), "no modes"),
    (dict(slow=(0.5,)), "straggler factors must be >= 1"),
    (dict(repeats=0), "repeats must be at least 1"),
    (dict(lr=0), "lr, target and timeout positive"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(workers=(2,), servers=(1,), modes=("sync",), slow=(1.0,), **TINY)
    args.update(kwargs)
    workers, servers, modes, slow = (args.pop(k) for k in ("workers", "servers", "modes", "slow"))
    with pytest.raises(ValueError, match=message):
        bench.measure(workers, servers, modes, slow, **args)


def test_parse_mode():
    assert bench.parse_mode("sync") == ("sync", 0)
    assert bench.parse_mode("bounded:3") == ("bounded", 3)
    for bad in ("bounded:-1", "bounded:", "hogwild"):
        with pytest.raises(ValueError, match="unknown mode"):
            bench.parse_mode(bad)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "ps.json"
    bench.main(["--workers", "2", "--servers", "1", "--modes", "async", "--slow", "1", "--steps", "3",
                "--batch", "4", "--features", "7", "--compute-ms", "2", "--repeats", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "labkit.bench.ps" in printed and "async" in printed and "yes" in printed   # bytes equal the formula
    saved = json.loads(out.read_text())
    assert saved["args"]["repeats"] == 1 and len(saved["summary"]) == 1 and saved["traffic"][0]["exact"]
