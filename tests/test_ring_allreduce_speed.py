"""Chapter 03, issue 21: the faster ring stays exact — pieces, tags and the header beside the first chunk."""

import pytest
import torch
import torch.distributed as dist

from course_lib import comm, launch


def sums_and_bytes_in_pieces(k):
    """Inside a rank: int64 sums with chunks cut into 5-element pieces, and what each op sent."""
    rank = dist.get_rank()
    comm.PIECE_BYTES = 5 * 8  # every chunk of more than 5 int64 goes as several messages
    x = torch.arange(k, dtype=torch.int64) * (rank + 1) + 7 * rank
    expected = x.clone()
    dist.all_reduce(expected)
    results = {}
    for name, fn in (("all-reduce", comm.ring_all_reduce), ("reduce-scatter", comm.ring_reduce_scatter)):
        y = x.clone()
        with comm.count_traffic() as traffic:
            returned = fn(y)
        results[name] = (
            returned.clone(),
            traffic.payload_sent,
            traffic.payload_received,
            traffic.count("isend"),
        )
    return expected, results


@pytest.mark.parametrize("n, k", [(2, 23), (3, 40)])
def test_pieces_keep_sums_and_bytes_exact(n, k):
    b, h = 8, comm.HEADER_BYTES
    sizes = [len(c) for c in torch.arange(k).tensor_split(n)]
    for rank, (expected, got) in enumerate(launch.run(sums_and_bytes_in_pieces, n, k)):
        mine, right, left = sizes[rank], sizes[(rank + 1) % n], sizes[(rank - 1) % n]
        y, sent, received, messages = got["all-reduce"]
        assert torch.equal(y, expected)
        assert (sent, received) == ((2 * k - mine - right) * b + h, (2 * k - left - mine) * b + h)
        assert messages > 2 * (n - 1) + 1  # chunks of more than 5 elements went as pieces
        chunk, sent, received, _ = got["reduce-scatter"]
        assert torch.equal(chunk, expected.tensor_split(n)[rank])
        assert (sent, received) == ((k - mine) * b + h, (k - left) * b + h)


def left_neighbour_sends_more():
    # Rank 0 holds 12 elements, the others 6: rank 1's left neighbour would send it a chunk
    # larger than the one it receives into (gloo aborts a rank on that); the tag keeps it out.
    x = torch.zeros(12 if dist.get_rank() == 0 else 6)
    comm.ring_all_reduce(x)


def test_a_larger_chunk_from_the_left_is_a_clear_error_not_an_abort(no_orphans):
    with pytest.raises(launch.RankError) as info:
        launch.run(left_neighbour_sends_more, 3, timeout=20)
    assert info.value.exc_type == "ValueError"
    assert "every rank must pass the same shape and dtype" in str(info.value)


def test_each_shape_and_dtype_gets_its_own_tag():
    a = comm._signature(torch.zeros(6))
    assert comm._signature(torch.ones(6)) is a  # made once, kept
    tags = {
        comm._signature(t)[1] for t in (torch.zeros(6), torch.zeros(2, 3), torch.zeros(6, dtype=torch.int32))
    }
    assert len(tags) == 3 and all(0 < t < 2**31 for t in tags)
