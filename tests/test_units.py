"""Topology, split and plan: pure data, no processes."""
import pytest

from pp_runtime.plan import make_plan
from pp_runtime.split import SplitError, split_blocks
from pp_runtime.topology import Topology, TopologyError


def test_topology_pp2_cfg2():
    t = Topology.build(4, cfg=2, rank=3)
    assert (t.pp_size, t.cfg_size, t.pp_rank, t.cfg_rank) == (2, 2, 1, 1)
    assert t.all_groups("pp") == [[0, 1], [2, 3]] and t.all_groups("cfg") == [[0, 2], [1, 3]]
    assert t.pp_ranks == [2, 3] and t.cfg_ranks == [1, 3]
    assert t.is_last and not t.is_first and t.prev_rank == 2 and t.next_rank is None
    assert t.first_rank == 2 and t.last_rank == 3 and not t.is_output_rank
    assert Topology.build(4, cfg=2, rank=1).is_output_rank
    assert [Topology.build(3, rank=r).coords for r in range(3)] == [{"cfg": 0, "pp": p} for p in range(3)]


def test_topology_errors():
    with pytest.raises(TopologyError, match="multiple of 2"):
        Topology.build(3, cfg=2)
    with pytest.raises(TopologyError, match="pp 3 x cfg 1 = 3 processes, but the group has 4"):
        Topology.build(4, pp=3)


def test_splits():
    costs = [1, 1, 1, 1, 4, 3]
    assert split_blocks("even", 6, 2).counts == (3, 3)
    assert split_blocks("even", 7, 3).counts == (3, 2, 2)
    assert split_blocks("balanced", 6, 2, costs=costs).counts == (4, 2)  # 4 | 7 beats 3 | 9 and 8 | 3
    assert split_blocks("balanced", 6, 3, costs=costs).counts == (4, 1, 1)
    # a device twice as fast takes twice the work
    assert split_blocks("balanced", 6, 2, costs=[1] * 6, device_weights=[2, 1]).counts == (4, 2)
    # by_memory counts the embedders on the first stage and the head on the last
    assert split_blocks("by_memory", 6, 2, block_bytes=[10] * 6, first_bytes=20).counts == (2, 4)
    assert split_blocks("by_memory", 6, 2, block_bytes=[10] * 6, last_bytes=20).counts == (4, 2)
    sp = split_blocks("manual", 57, 2, manual="27,30")
    assert sp.counts == (27, 30) and sp.ranges == [(0, 27), (27, 57)]
    assert sp.describe() == "stage 0: blocks 0-26, stage 1: blocks 27-56"


@pytest.mark.parametrize("args,message", [
    (("manual", 57, 2), dict(manual="27,31"), ),
])
def test_split_manual_sum_message(args, message):
    with pytest.raises(SplitError, match=r"manual split '27,31' has 58 blocks, the model has 57"):
        split_blocks(*args, **message)


@pytest.mark.parametrize("kw,message", [
    (dict(strategy="even", num_blocks=2, stages=3), "3 stages but the model has only 2 blocks"),
    (dict(strategy="manual", num_blocks=4, stages=2, manual="4,0"), "empty stage"),
    (dict(strategy="manual", num_blocks=4, stages=2, manual="a,b"), "comma-separated block counts"),
    (dict(strategy="fastest", num_blocks=4, stages=2), "unknown"),
    (dict(strategy="by_memory", num_blocks=4, stages=2), "needs the parameter bytes"),
])
def test_split_errors(kw, message):
    with pytest.raises(SplitError, match=message):
        split_blocks(**kw)


def test_plan_as_data():
    plan = make_plan(2, batch=1, branches=("cond", "uncond"))
    assert [mb.label for mb in plan.micro_batches] == ["cond[0:1]", "uncond[0:1]"]
    assert plan.actions(0) == [("forward", 0), ("send", 0), ("forward", 1), ("send", 1)]
    assert plan.actions(1) == [("recv", 0), ("forward", 0), ("recv", 1), ("forward", 1)]
    assert plan.schedule() == [(0, 0, 0), (1, 1, 0), (1, 0, 1), (2, 1, 1)]
    assert "ideal speedup 1.33x" in str(plan)
    speedups = [round(make_plan(2, m).ideal_speedup, 2) for m in (1, 2, 4, 8)]
    assert speedups == [1.0, 1.33, 1.6, 1.78]  # DESIGN.md section 6
    batched = make_plan(3, batch=4, branches=("cond", "uncond"), micro_batch_size=2, batched_cfg=True)
    assert [mb.label for mb in batched.micro_batches] == ["cond+uncond[0:2]", "cond+uncond[2:4]"]
    b4 = make_plan(2, batch=4, branches=("cond", "uncond"))
    assert b4.num_micro_batches == 8 and round(b4.ideal_speedup, 2) == 1.78


def test_by_memory_fills_mixed_cards_in_proportion():
    """A 32 GB and a 24 GB card: the weights go 4:3 (after the activation reserve and the
    shared weights each holds); a model that cannot fit is refused with the numbers."""
    from pp_runtime.split import SplitError, split_blocks
    gib = 2**30
    sp = split_blocks("by_memory", 56, 2, block_bytes=[gib // 2] * 56, shared_bytes=gib // 2,
                      capacities=[32 * gib, 24 * gib], reserve=gib)
    print(sp.counts)
    assert sp.counts == (32, 24)
    with pytest.raises(SplitError, match=r"does not fit: rank 0 \(cuda:0\) would hold .* GiB.*Add a GPU"):
        split_blocks("by_memory", 56, 2, block_bytes=[gib] * 56, capacities=[24 * gib, 24 * gib], reserve=gib,
                     devices=["cuda:0", "cuda:1"])
