"""The checkers of exercise 1 accept the reference and reject each known-wrong implementation with a
message that names the mistake. Most distributed cases run on 3 processes only (one launch each);
the default world sizes (1, 2, 3, 4) are exercised by the reference and by one wrong implementation."""

import random

import pytest
import torch
import torch.distributed as dist

from labkit.checks import CheckFailed, first_mismatch, fmt_pair
from labkit.checks.ex01 import check_average_gradients, check_shard_indices
from labkit.data_parallel import average_gradients as reference_average_gradients
from labkit.data_parallel import shard_indices as labkit_shard_indices

WS = (3,)  # one odd world size: every mistake below shows on it


# --------------------------------------------------------------------------------------------
# 1a. average_gradients
# --------------------------------------------------------------------------------------------

# The correct version is labkit's own (labkit.data_parallel.average_gradients); the wrong ones below are the
# mistakes students make, written as small changes to it.
average_gradients = reference_average_gradients


def sum_not_mean(model):
    for p in model.parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def only_local(model):
    for p in model.parameters():
        p.grad /= 1  # looks busy, talks to nobody


def reduce_to_rank0(model):
    for p in model.parameters():
        dist.reduce(p.grad, dst=0)
        p.grad /= dist.get_world_size()


def wrong_divisor(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size() - 1


def returns_new_tensors(model):
    averaged = []
    for p in model.parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        averaged.append(g / dist.get_world_size())
    return averaged


def replaces_grad(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad = p.grad / dist.get_world_size()


def skips_some(model):
    for name, p in model.named_parameters():
        if name in ("layer.weight", "table"):
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def ranks_disagree(model):
    average_gradients(model)
    if dist.get_rank() == 2:
        for p in model.parameters():
            p.grad += 0.5


def raises_on_rank_1(model):
    if dist.get_rank() == 1:
        raise ValueError("deliberate mistake on rank 1")
    average_gradients(model)


def skips_collective_on_rank_2(model):
    if dist.get_rank() != 2:
        average_gradients(model)


def in_float32(model):
    """A real student's version: averaged in float32 to save bandwidth, then cast back."""
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to(torch.float32)
            dist.all_reduce(g)
            p.grad.copy_(g / dist.get_world_size())


def in_bfloat16(model):
    """Summed in bfloat16 (half the bytes of float32), divided in the gradient's own dtype."""
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to(torch.bfloat16)
            dist.all_reduce(g)
            p.grad.copy_(g)
            p.grad /= dist.get_world_size()


def no_skip(model):
    """The solution without the rule for parameters that have no gradient."""
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def gives_unused_a_gradient(model):
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def stub(model):
    raise NotImplementedError("Exercise 1a: average every parameter's .grad; see the instructions above")


def test_reference_passes_on_the_default_world_sizes(capsys):
    check_average_gradients(reference_average_gradients)
    assert capsys.readouterr().out == "✓ average_gradients is correct on world sizes 1, 2, 3, 4\n"


@pytest.mark.parametrize("wrong,expected", [
    (sum_not_mean, ["sum_not_mean is wrong on 3 processes: got 3× the expected value on every rank and parameter",
                    "did not divide by the world size"]),
    (only_local, ["no communication: on every rank .grad is still that rank's own gradient",
                  "that is rank 0's own gradient", "dist.all_reduce"]),
    (reduce_to_rank0, ["only rank 0 ends with the average: ranks 1, 2 do not", "dist.reduce",
                       "Use dist.all_reduce"]),
    (wrong_divisor, ["divided by the wrong number: got 1.5× the expected mean",
                     "the sum divided by 2 instead of by the world size N = 3"]),
    (returns_new_tensors, ["returned a list of 4 items and left every p.grad unchanged",
                           "what you returned are the right averages", "in place"]),
    (replaces_grad, ["the values are right, but not in place: on rank 0 parameter 'layer.weight' has a new .grad tensor",
                     "p.grad /= world_size"]),
    (skips_some, ["parameter(s) 'layer.bias', 'gain' were skipped",
                  "'layer.weight', 'table' are averaged correctly"]),
    (ranks_disagree, ["the ranks disagree after your function: parameter 'layer.weight', element [0, 0]:",
                      "rank 2 has"]),
    (in_float32, ["in_float32 is wrong on 3 processes: the average lost precision",
                  "rank 0, parameter 'layer.weight', element [0, 0]: expected ", "float32 (about 7 digits)",
                  "the gradient is float64 again"]),
    (in_bfloat16, ["the average lost precision", "rank 0, parameter 'layer.weight', element [0, 0]"]),
    (no_skip, ["with parameter 'gain' unused by the loss (its p.grad is None", "your function raised ",
               "on rank 0", "skip it (if p.grad is None: continue)"]),
    (gives_unused_a_gradient, ["with parameter 'gain' unused by the loss (p.grad is None), your function gave it "
                               "a gradient on rank 0"]),
])
def test_wrong_average_gradients_is_named(wrong, expected):
    with pytest.raises(CheckFailed) as info:
        check_average_gradients(wrong, world_sizes=WS)
    message = str(info.value)
    for text in expected:
        assert text in message, message


def test_generic_message_gives_rank_parameter_element_expected_got():
    def off_by_a_bit_everywhere(model):
        average_gradients(model)
        for p in model.parameters():
            p.grad.add_(torch.arange(p.grad.numel(), dtype=p.grad.dtype).reshape(p.grad.shape) * 0.01)

    with pytest.raises(CheckFailed) as info:
        check_average_gradients(off_by_a_bit_everywhere, world_sizes=WS)
    assert "rank 0, parameter 'layer.weight', element [0, 1]: expected " in str(info.value)


def test_wrong_divisor_fails_already_on_one_process_with_the_default_world_sizes():
    with pytest.raises(CheckFailed, match=r"on 1 process: divided by the wrong number: .*the sum divided by 0 "
                                          r"instead of by the world size N = 1"):
        check_average_gradients(wrong_divisor)


def test_an_exception_is_reported_with_that_ranks_traceback():
    with pytest.raises(CheckFailed) as info:
        check_average_gradients(raises_on_rank_1, world_sizes=WS)
    message = str(info.value)
    assert "raises_on_rank_1 raised ValueError on rank 1 (world size 3): deliberate mistake on rank 1" in message
    assert "--- traceback of rank 1 ---" in message
    assert 'in raises_on_rank_1\n    raise ValueError("deliberate mistake on rank 1")' in message
    assert "labkit/launcher.py" not in message and "labkit/checks/ex01.py" not in message  # only the student's frames


def test_a_skipped_collective_is_reported_not_hung():
    with pytest.raises(CheckFailed) as info:
        check_average_gradients(skips_collective_on_rank_2, world_sizes=WS, timeout=3)
    message = str(info.value)
    assert "skips_collective_on_rank_2 did not finish on 3 processes" in message
    assert "rank(s) [2]" in message and "same collectives in the same order" in message


def test_the_unfinished_stub_is_reported_as_itself():
    with pytest.raises(NotImplementedError, match="^Exercise 1a: average every parameter's .grad"):
        check_average_gradients(stub, world_sizes=WS)


# --------------------------------------------------------------------------------------------
# 1b. shard_indices
# --------------------------------------------------------------------------------------------

def _perm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def shard_indices(num_samples, rank, world_size, epoch, seed=0):  # labkit's, without padding: the exercise's rule
    return labkit_shard_indices(num_samples, rank, world_size, epoch, seed, mode="uneven")


def contiguous_blocks(num_samples, rank, world_size, epoch, seed=0):  # another correct split
    q, r = divmod(num_samples, world_size)
    start = rank * q + min(rank, r)
    return _perm(num_samples, seed + epoch)[start:start + q + (rank < r)]


def returns_a_tensor(num_samples, rank, world_size, epoch, seed=0):
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=g)[rank::world_size]


def overlapping(num_samples, rank, world_size, epoch, seed=0):
    k = -(-num_samples // world_size)
    return _perm(num_samples, seed + epoch)[rank * k:(rank + 1) * k + 1]


def drops_the_remainder(num_samples, rank, world_size, epoch, seed=0):
    k = num_samples // world_size
    return _perm(num_samples, seed + epoch)[rank * k:(rank + 1) * k]


def unbalanced(num_samples, rank, world_size, epoch, seed=0):
    k = -(-num_samples // world_size)
    return _perm(num_samples, seed + epoch)[rank * k:(rank + 1) * k]


def padded(num_samples, rank, world_size, epoch, seed=0):
    return labkit_shard_indices(num_samples, rank, world_size, epoch, seed, mode="pad")


def forgets_the_epoch(num_samples, rank, world_size, epoch, seed=0):
    return _perm(num_samples, seed)[rank::world_size]


def seed_includes_rank(num_samples, rank, world_size, epoch, seed=0):
    return _perm(num_samples, seed + epoch + rank)[rank::world_size]


def not_shuffled(num_samples, rank, world_size, epoch, seed=0):
    return list(range(num_samples))[rank::world_size]


def global_random_state(num_samples, rank, world_size, epoch, seed=0):
    return torch.randperm(num_samples).tolist()[rank::world_size]


def same_samples_every_epoch(num_samples, rank, world_size, epoch, seed=0):
    mine = list(range(num_samples))[rank::world_size]
    random.Random(seed + epoch).shuffle(mine)
    return mine


def ignores_the_seed(num_samples, rank, world_size, epoch, seed=0):
    return _perm(num_samples, epoch)[rank::world_size]


def forgets_to_return(num_samples, rank, world_size, epoch, seed=0):
    _perm(num_samples, seed + epoch)[rank::world_size]


def float_indices(num_samples, rank, world_size, epoch, seed=0):
    return [float(i) for i in shard_indices(num_samples, rank, world_size, epoch, seed)]


def with_replacement(num_samples, rank, world_size, epoch, seed=0):
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randint(0, num_samples, (num_samples,), generator=g).tolist()[rank::world_size]


@pytest.mark.parametrize("good", [shard_indices, contiguous_blocks, returns_a_tensor])
def test_correct_shardings_pass(good, capsys):
    check_shard_indices(good)
    assert capsys.readouterr().out == (
        f"✓ {good.__name__} is correct: 162 cases (num_samples 1 to 100, world sizes 1 to 8, epochs 0 to 2) "
        f"give disjoint, complete, balanced shards, reshuffled every epoch\n")


@pytest.mark.parametrize("wrong,expected", [
    (overlapping, ["ranks 0 and 1 both got index", "shards must be disjoint",
                   "overlapping(10, rank, 2, 0) for rank in range(2):\n    rank 0: ["]),
    (drops_the_remainder, ["index 2 is in no rank's shard: together the shards must be exactly range(10)",
                           "Every rank got num_samples // world_size = 3 samples, so the remainder (1) was dropped"]),
    (unbalanced, ["shard sizes [4, 4, 2] differ by more than one", "every rank must get 3 or 4 samples"]),
    (padded, ["ranks 0 and 1 both got index", "padded (repeated) as DistributedSampler does by default"]),
    (forgets_the_epoch, ["epoch 0 and epoch 1 give the same order",
                         "did you forget to use the epoch, as DistributedSampler.set_epoch does?"]),
    (seed_includes_rank, ["ranks 0 and 1 both got index", "each rank shuffles differently",
                          "Does your seed depend on the rank?"]),
    (not_shuffled, ["the indices are not shuffled", "[0, 4, 8, 12,"]),
    (global_random_state, ["twice gave two different shards", "not from the global random state"]),
    (same_samples_every_epoch, ["every rank gets the same samples in epoch 0 and in epoch 1, only in another order"]),
    (ignores_the_seed, ["seed=1 gives the same shards as seed=0", "ignores its seed"]),
    (forgets_to_return, ["forgets_to_return(33, 1, 4, 0, seed=0) returned None: did you forget to return"]),
    (float_indices, ["returned a list whose item 0 is", "(float): indices must be ints"]),
    (with_replacement, ["rank 0's shard contains index", "a shard must not repeat a sample"]),
])
def test_wrong_shard_indices_is_named(wrong, expected):
    with pytest.raises(CheckFailed) as info:
        check_shard_indices(wrong)
    message = str(info.value)
    for text in expected:
        assert text in message, message


def test_shard_exceptions_keep_the_students_traceback_and_stubs_pass_through():
    def no_seed_parameter(num_samples, rank, world_size, epoch):
        return shard_indices(num_samples, rank, world_size, epoch)

    with pytest.raises(CheckFailed, match=r"no_seed_parameter\(33, 1, 4, 0, seed=0\) raised TypeError") as info:
        check_shard_indices(no_seed_parameter)
    assert isinstance(info.value.__cause__, TypeError)

    def stub_1b(num_samples, rank, world_size, epoch, seed=0):
        raise NotImplementedError("Exercise 1b: shard; see the instructions above")

    with pytest.raises(NotImplementedError, match="^Exercise 1b: shard"):
        check_shard_indices(stub_1b)


# --------------------------------------------------------------------------------------------
# The shared helpers
# --------------------------------------------------------------------------------------------

def test_check_failed_is_an_assertion_error_and_helpers_format_precisely():
    assert issubclass(CheckFailed, AssertionError)
    assert fmt_pair(1.25, 2.5) == ("1.25", "2.5")
    assert fmt_pair(3.0, 3.0000001) == ("3", "3.0000001")
    assert first_mismatch(torch.zeros(2, 3), torch.zeros(2, 3)) is None
    got = torch.zeros(2, 3)
    got[1, 2] = 7
    assert first_mismatch(torch.zeros(2, 3), got) == ((1, 2), 0.0, 7.0)
    assert first_mismatch(torch.tensor(1.0), torch.tensor(2.0)) == ((), 1.0, 2.0)


# --------------------------------------------------------------------------------------------
# 1c. average_gradients_uneven: a design task, checked against one process on the whole batch
# --------------------------------------------------------------------------------------------

from labkit.checks.ex01 import UNEVEN_MISTAKES, ZERO_RANK_MISTAKES, check_average_gradients_uneven  # noqa: E402
from labkit.checks.harness import literal_parts  # noqa: E402
from labkit.data_parallel import weighted_average_gradients  # noqa: E402

FIRST = ((5, 2, 0),)     # one launch: every mistake below shows on it


def average_gradients_uneven(model, local_count):
    """labkit's reference (the checker refuses the function itself: a student must write one)."""
    weighted_average_gradients(model, local_count)


def one_message(model, local_count):
    """Another correct design: b_r·g_r of every parameter and b_r in one buffer, one all-reduce."""
    grads = [p.grad for p in model.parameters()]
    buffer = torch.cat([g.reshape(-1) * local_count for g in grads] + [torch.tensor([float(local_count)],
                                                                                    dtype=torch.float64)])
    dist.all_reduce(buffer)
    offset = 0
    for g in grads:
        g.copy_(buffer[offset:offset + g.numel()].view_as(g) / buffer[-1])
        offset += g.numel()


def gathers_the_counts(model, local_count):
    """A third: all_gather the counts, each rank scales its gradient by N·b_r/B, then 1a's plain mean."""
    counts = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([float(local_count)], dtype=torch.float64))
    share = local_count * dist.get_world_size() / float(sum(counts))
    for p in model.parameters():
        p.grad *= share
    reference_average_gradients(model)


def from_row(row):
    """The wrong version a row of UNEVEN_MISTAKES describes, as a change of labkit's weighted_average_gradients:
    rank r all-reduces weight(b_r)·g_r and divides the sum by divisor(B, N, b_r)."""
    def wrong(model, local_count):
        total = torch.tensor([float(local_count)], dtype=torch.float64)
        dist.all_reduce(total)
        for p in model.parameters():
            p.grad *= row.variant.weight(local_count)
            dist.all_reduce(p.grad)
            p.grad /= row.variant.divisor(total.item(), dist.get_world_size(), local_count)
    wrong.__name__ = "wrong"
    return wrong


def zero_rank_skips(model, local_count):
    if local_count == 0:
        return                        # "nothing to add": but the others wait for it
    weighted_average_gradients(model, local_count)


def zero_rank_divides(model, local_count):
    total = torch.tensor([float(local_count)])
    dist.all_reduce(total)
    for p in model.parameters():
        p.grad /= total.item() / local_count      # the share b_r/B written as 1/(B/b_r): B/0 on an empty rank
        dist.all_reduce(p.grad)


def test_labkits_version_and_other_designs_pass(capsys):
    check_average_gradients_uneven(average_gradients_uneven)
    out = capsys.readouterr().out
    assert out.startswith("✓ average_gradients_uneven gives every rank the whole batch's gradient (3 processes with "
                          "(5, 2, 0), (0, 3, 1), (3, 3, 3); 2 processes with (7, 1), (2, 2)"), out
    assert "Collective calls per call: 3; one is enough" in out
    check_average_gradients_uneven(one_message, cases=FIRST)
    assert "Collective calls per call: one, the fewest" in capsys.readouterr().out
    check_average_gradients_uneven(gathers_the_counts, cases=FIRST)
    assert "✓ gathers_the_counts gives every rank" in capsys.readouterr().out


def test_labkits_own_function_is_refused():
    with pytest.raises(CheckFailed, match="this is labkit's own weighted_average_gradients"):
        check_average_gradients_uneven(weighted_average_gradients)


# What some messages say of this case's numbers, beyond the row's fixed text.
NUMBERS = {
    "the plain mean": ["(1/N) Σ g_r, as in 1a (rank 0, parameter w[0]: one process on the whole batch gives ",
                       "each sample of rank 0 counts 1/15 in your average and each sample of rank 1 1/6",
                       "every sample 1/B = 1/7"],
    "divided by N": ["B/N = 7/3 times one process's"],
    "divided by N·b_r": ["Rank 2, which holds no samples, divided by 0: its p.grad holds inf"],
    "divided by the local count": ["B = 7, which no rank knows alone", "Rank 2, which holds no samples, divided by 0"],
}


@pytest.mark.parametrize("row", UNEVEN_MISTAKES, ids=lambda m: m.name)
def test_every_known_weighting_is_named(row):
    with pytest.raises(CheckFailed) as info:
        check_average_gradients_uneven(from_row(row), cases=FIRST)
    message = str(info.value)
    assert message.startswith("wrong on 3 processes with local counts (5, 2, 0) (B = 7): "), message
    for part in literal_parts(row.says)[1:] + NUMBERS.get(row.name, []):
        assert part in message, message
    others = [m for m in UNEVEN_MISTAKES if m is not row]
    assert not any(max(literal_parts(m.says), key=len) in message for m in others), message


def test_the_plain_mean_passes_only_on_equal_counts(capsys):
    plain = from_row(UNEVEN_MISTAKES[0])
    check_average_gradients_uneven(plain, cases=((2, 2),))
    assert "✓ wrong gives every rank" in capsys.readouterr().out
    with pytest.raises(CheckFailed, match=r"local counts \(7, 1\).*the plain mean"):
        check_average_gradients_uneven(plain, cases=((2, 2), (7, 1)))


def test_a_rank_without_samples_that_skips_the_collectives_is_named_not_hung():
    with pytest.raises(CheckFailed) as info:
        check_average_gradients_uneven(zero_rank_skips, cases=FIRST, timeout=2)
    message = str(info.value)
    assert "the other side never came: the run is deadlocked" in message, message
    assert "rank 2: had finished its part" in message, message
    assert ZERO_RANK_MISTAKES[0].says.format(rank="rank 2") in message, message


def test_a_rank_without_samples_that_divides_by_its_count_is_named():
    with pytest.raises(CheckFailed) as info:
        check_average_gradients_uneven(zero_rank_divides, cases=FIRST)
    message = str(info.value)
    assert "zero_rank_divides on 3 processes with local counts (5, 2, 0) (B = 7): rank 2 holds no samples " \
           "(local_count = 0) and your function divided by its count: ZeroDivisionError (" in message, message
    for part in literal_parts(ZERO_RANK_MISTAKES[1].says)[3:]:
        assert part in message, message
    assert "p.grad /= total.item() / local_count" in message, message     # the student's line


def test_other_wrong_results_are_named_with_rank_parameter_element():
    def off_on_rank_1(model, local_count):
        weighted_average_gradients(model, local_count)
        if dist.get_rank() == 1:
            model.w.grad[2] += 0.5

    def half(model, local_count):
        weighted_average_gradients(model, local_count)
        for p in model.parameters():
            p.grad /= 2

    def grad_none(model, local_count):
        weighted_average_gradients(model, local_count)
        if local_count == 0:
            model.b.grad = None

    def steps_itself(model, local_count):
        weighted_average_gradients(model, local_count)
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad

    cases = [
        (off_on_rank_1, ["the ranks end with different gradients (parameter 'w', element [2]: rank 0 has",
                         "rank 1 has", "or the replicas drift apart"]),
        (half, ["rank 0, parameter w[0]: one process on the whole batch gives ",
                "On every rank your gradient is 0.5 times one process's"]),
        (grad_none, ["on rank 2 parameter 'b' has no gradient after your function (p.grad is None)"]),
        (steps_itself, ["on rank 0 your function changed the parameter(s) 'w', 'b' themselves"]),
    ]
    for fn, expected in cases:
        with pytest.raises(CheckFailed) as info:
            check_average_gradients_uneven(fn, cases=FIRST)
        for text in expected:
            assert text in str(info.value), str(info.value)


def test_the_stub_and_a_students_own_not_implemented():
    def stub_1c(model, local_count):
        raise NotImplementedError("Exercise 1c: derive what to send; see the instructions above")
    with pytest.raises(NotImplementedError, match="^Exercise 1c: derive what to send"):
        check_average_gradients_uneven(stub_1c, cases=FIRST)

    def todo(model, local_count):
        raise NotImplementedError
    with pytest.raises(NotImplementedError, match="^Exercise 1c: todo is not written yet"):
        check_average_gradients_uneven(todo, cases=FIRST)
