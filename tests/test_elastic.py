"""Lab 10 under torchrun --max-restarts: a rank killed by SIGKILL, the job restarted, the run ends on the bits of an
uninterrupted one; and its timeline figure."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import labkit  # noqa: E402
from labkit import checkpoint  # noqa: E402
from labkit.labs import elastic  # noqa: E402
from labkit.resumable import train  # noqa: E402
from labkit.resumable_figures import restart_timeline_figure  # noqa: E402


def test_a_killed_rank_is_restarted_and_the_run_ends_on_the_uninterrupted_bits(tmp_path):
    run = elastic.run_elastic(tmp_path, world_size=2, steps=20, every=5, kill_rank=1, kill_at=13)
    assert run.returncode == 0, run.stderr[-3000:]
    events = elastic.read_events(tmp_path)
    killed = [e for e in events if e["kind"] == "killed"]
    assert [(e["rank"], e["attempt"], e["step"]) for e in killed] == [(1, 0, 13)]
    restarts = [e for e in events if e["kind"] == "start" and e["attempt"] == 1]
    assert sorted((e["rank"], e["step"]) for e in restarts) == [(0, 10), (1, 10)]    # the checkpoint before the kill
    assert {e["rank"] for e in events if e["kind"] == "done" and e["attempt"] == 1} == {0, 1}
    uninterrupted = labkit.launch(train, 20, world_size=2, timeout=60)[0]
    result = checkpoint.load(tmp_path / elastic.RESULT)
    assert result["start"] == 10 and torch.equal(result["params"], uninterrupted.params)
    fig = restart_timeline_figure(events)
    assert any(line.get_marker() == "X" for line in fig.axes[0].get_lines())     # the kill is drawn
    plt.close(fig)


def test_options_are_checked():
    with pytest.raises(SystemExit):
        elastic.parse_args(["--dir", "x", "--kill-rank", "1"])
    with pytest.raises(SystemExit):
        elastic.parse_args(["--dir", "x", "--every", "0"])
