"""labkit.preflight: a healthy world has nothing to report; each kind of difference between ranks is named."""

import copy

import labkit
from labkit import preflight


def test_a_healthy_world_has_nothing_to_report():
    problems, reports = labkit.launch(preflight.run, world_size=2, timeout=60)[0]
    assert problems == [] and [r["rank"] for r in reports] == [0, 1]
    assert reports[0]["torch"] == reports[1]["torch"] and reports[0]["backend"] == "gloo"


def test_each_difference_is_named():
    good = {"rank": 0, "world_size": 2, "backend": "nccl", "host": "node1", "pid": 1, "device": "cuda:0 (H100)",
            "python": "3.11.7", "torch": "2.11.0", "cuda": "13.0", "nccl": "2.27.3",
            "env": {k: None for k in preflight.ENV} | {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}, "clock": 100.0}
    other = copy.deepcopy(good) | {"rank": 1, "host": "node2"}
    assert preflight.compare([good, other]) == []
    other.update(torch="2.10.0", clock=103.2)
    other["env"]["MASTER_ADDR"] = "10.0.0.7"
    problems = "\n".join(preflight.compare([good, other]))
    assert "torch differs: 2.11.0 on rank(s) [0], 2.10.0 on rank(s) [1]" in problems
    assert "MASTER_ADDR differs" in problems and "clocks differ by 3.2 s" in problems
    same_gpu = copy.deepcopy(good) | {"rank": 1}
    assert "2 ranks share cuda:0 (H100) on node1" in preflight.compare([good, same_gpu])[0]


def test_a_sampler_told_the_wrong_rank_is_found():
    right = labkit.launch(preflight.my_shard, 20, world_size=2, timeout=60)[0]
    wrong = labkit.launch(preflight.my_shard, 20, 0, world_size=2, timeout=60)[0]
    assert preflight.shard_overlap(right) == [] and sorted(right[0] + right[1]) == list(range(20))
    assert preflight.shard_overlap(wrong) == ["10 of 10 items are read by more than one rank in the same epoch "
                                              f"(item {min(wrong[0])}: ranks [0, 1]): give each rank's "
                                              "DistributedSampler its own rank"]
