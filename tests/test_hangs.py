"""labkit.hangs: per-rank stack dumps of a hung job name the rank that is not in the collective, and where it is."""

import pytest

import labkit
from labkit import hangs

DUMP = """main thread 0x00007f0000000001
Timeout (0:00:01)!
Thread 0x00007f0000000002 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 324 in wait
Thread 0x00007f0000000001 (most recent call first):
  File "/x/torch/distributed/distributed_c10d.py", line 2800 in all_reduce
  File "/x/torch/distributed/c10d_logger.py", line 81 in wrapper
  File "/home/me/train.py", line 42 in step
  File "/home/me/train.py", line 60 in main
"""


def test_a_dump_is_read_from_the_main_thread(tmp_path):
    (tmp_path / "rank0.stacks").write_text(DUMP)
    (tmp_path / "rank2.stacks").write_text(DUMP.replace('/x/torch/distributed/distributed_c10d.py", line 2800 in '
                                                        'all_reduce\n  File "/x/torch/distributed/c10d_logger.py", '
                                                        'line 81 in wrapper\n', ""))
    states = hangs.diagnose(tmp_path, world_size=3)
    assert states[0] == hangs.RankState(0, stuck=True, waiting_in="all_reduce", where="train.py:42 in step")
    assert states[1] == hangs.RankState(1, stuck=False)
    assert states[2] == hangs.RankState(2, stuck=True, waiting_in=None, where="train.py:42 in step")
    text = hangs.explain(states)
    assert "rank 2 is busy at train.py:42" in text and "look at rank 2 first" in text


@pytest.mark.parametrize("kind, expected", [
    ("loop", "rank 1 is busy at hangs.py"),
    ("skip", "rank 1 is busy at hangs.py"),
    ("mismatch", "rank 1 in broadcast"),
])
def test_each_way_to_hang_is_named(tmp_path, kind, expected):
    with pytest.raises(labkit.WorkerError):
        labkit.launch(hangs.scenario, kind, tmp_path, seconds=0.5, world_size=3, timeout=2.5)
    states = hangs.diagnose(tmp_path, world_size=3)
    assert [s.waiting_in for s in states if s.rank != 1] == ["all_reduce", "all_reduce"]
    assert expected in hangs.explain(states)


def test_bad_scenario():
    with pytest.raises(ValueError, match="kind must be one of"):
        hangs.scenario("crash", "/nonexistent")


def test_monitored_barrier_names_the_late_rank():
    with pytest.raises(labkit.WorkerError, match="Ranks 1 failed to pass monitoredBarrier"):
        labkit.launch(hangs.late_at_barrier, 0.5, world_size=3, timeout=10)
