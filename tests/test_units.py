"""Topology, split and plan: pure data, no processes."""
import json

import pytest

from pp_runtime.engine.plan import PassPlan, plan_pass
from pp_runtime.engine.split import SplitError, split_blocks
from pp_runtime.engine.topology import Topology, TopologyError


def test_topology_pp2_cfg2():
    t = Topology.build(4, cfg=2, rank=3)
    assert (t.pp_size, t.cfg_size, t.pp_rank, t.cfg_rank) == (2, 2, 1, 1)
    assert t.all_groups("pp") == [[0, 1], [2, 3]] and t.all_groups("cfg") == [[0, 2], [1, 3]]
    assert t.pp_ranks == [2, 3] and t.cfg_ranks == [1, 3]
    assert t.is_last and not t.is_first and t.prev_rank == 2 and t.next_rank is None
    assert t.first_rank == 2 and t.last_rank == 3 and not t.is_output_rank
    assert Topology.build(4, cfg=2, rank=1).is_output_rank
    assert [Topology.build(3, rank=r).coords for r in range(3)] == [{"cfg": 0, "pp": p, "sp": 0} for p in range(3)]


def test_sequence_parallel_topology():
    """cfg2 x pp2 x sp2: sp innermost, lanes hop stage to stage, shards meet on the driver."""
    t = Topology.build(8, pp=2, cfg=2, sp=2, rank=7)
    assert t.coords == {"cfg": 1, "pp": 1, "sp": 1} and t.sp_ranks == [6, 7] and t.pp_ranks == [5, 7]
    assert t.cfg_ranks == [3, 7] and t.prev_rank == 5 and t.driver_rank == 6 and not t.is_driver
    assert t.pipeline_ranks == [4, 5, 6, 7] and t.pass_ranks == [4, 5, 7] and t.name == "cfg2 x pp2 x sp2"
    assert [r for r in range(8) if Topology.build(8, pp=2, cfg=2, sp=2, rank=r).is_output_rank] == [2]
    assert Topology.of_layout(4, {"pp": 1, "cfg": 1, "sp": 4}, rank=0).sp_ranks == [0, 1, 2, 3]
    assert Topology.of_layout(2, {"pp": 2, "cfg": 1}).degrees == {"cfg": 1, "pp": 2, "sp": 1}  # an older job
    with pytest.raises(TopologyError, match="not a multiple of 4"):
        Topology.build(6, cfg=2, sp=2)
    from pp_runtime.engine.plan import PassPlan, plan_pass
    plan = plan_pass([0, 1], stages=2, shards=2)  # the shards: one field of every unit, carried as data
    assert all(u.shards == 2 for u in plan.units) and PassPlan.from_data(plan.to_data()) == plan
    with pytest.raises(ValueError, match="do not combine"):
        plan_pass([0], stages=2, shards=2, patches=4)


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
    # sequential CFG, batch 1: a cond and an uncond unit through 2 stages
    plan = plan_pass([0, 1], stages=2)
    assert [u.label for u in plan.units] == ["cond[0]", "uncond[1]"]
    assert plan.actions(0) == [("forward", 0), ("send", 0), ("forward", 1), ("send", 1)]
    assert plan.actions(1) == [("recv", 0), ("forward", 0), ("recv", 1), ("forward", 1)]
    assert plan.schedule() == [(0, 0, 0), (1, 1, 0), (1, 0, 1), (2, 1, 1)]
    assert "ideal speedup 1.33x" in str(plan)
    speedups = [round(plan_pass([0] * m, stages=2).ideal_speedup, 2) for m in (1, 2, 4, 8)]
    assert speedups == [1.0, 1.33, 1.6, 1.78]  # DESIGN.md section 6
    # batched CFG: a chunk's cond and uncond rows as one unit
    batched = plan_pass([0, 0, 1, 1], stages=3, micro_batch_size=4)
    assert [(u.rows, u.branch_name) for u in batched.units] == [((0, 1, 2, 3), "cond+uncond")]
    # CFG-parallel: a branch per pipeline, gathered on the last stage
    cfgpar = plan_pass([0, 1], stages=2, pipelines=2)
    assert [(u.pipeline, u.rows) for u in cfgpar.units] == [(0, (0,)), (1, (1,))]
    assert cfgpar.rows_of(1) == [1] and cfgpar.actions(1, 1) == [("recv", 0), ("forward", 0), ("gather", -1)]
    # patch pipelining: M units per micro-batch, sharing its rows
    patched = plan_pass([0, 1], stages=2, patches=3)
    assert [(u.micro_batch, u.patch, u.label) for u in patched.units][:3] == [
        (0, 0, "cond[0] p1/3"), (0, 1, "cond[0] p2/3"), (0, 2, "cond[0] p3/3")]
    assert [u.index for u in patched.units] == [0, 1, 2, 0, 1, 2][:3] + [3, 4, 5]
    # the plan travels as data
    for p in (plan, batched, cfgpar, patched):
        assert PassPlan.from_data(json.loads(json.dumps(p.to_data()))) == p
    with pytest.raises(ValueError, match="CFG group of 3"):
        plan_pass([0, 1, 2], stages=1, pipelines=3)


def test_mixin_plans_match_the_seed():
    """The seed's micro-batches: each branch's chunks in order (cond first); batched CFG a
    chunk's cond and uncond items together; CFG-parallel one branch per pipeline."""
    from pp_runtime.engine.mixin import PipelineParallelMixin
    from pp_runtime.engine.topology import Topology

    class M(PipelineParallelMixin):
        def __init__(self, pp, cfg, size=1, batched=False):
            self.pp = type("Ctx", (), {"topo": Topology.build(pp * cfg, pp=pp, cfg=cfg)})()
            self.micro_batch_size, self.batched_cfg = size, batched
    seq = M(2, 1).pass_plan(True, batch=2)
    assert [(u.rows, u.branch_name) for u in seq.units] == [((0,), "cond"), ((1,), "cond"), ((2,), "uncond"),
                                                            ((3,), "uncond")]
    bat = M(3, 1, size=2, batched=True).pass_plan(True, batch=4)
    assert [u.rows for u in bat.units] == [(0, 1, 4, 5), (2, 3, 6, 7)]
    par = M(2, 2).pass_plan(True, batch=1)
    assert [(u.pipeline, u.branch_name) for u in par.units] == [(0, "cond"), (1, "uncond")]
    assert M(2, 1).pass_plan(False, batch=4).rows == 4


def test_by_memory_fills_mixed_cards_in_proportion():
    """A 32 GB and a 24 GB card: the weights go 4:3 (after the activation reserve and the
    shared weights each holds); a model that cannot fit is refused with the numbers."""
    from pp_runtime.engine.split import SplitError, split_blocks
    gib = 2**30
    sp = split_blocks("by_memory", 56, 2, block_bytes=[gib // 2] * 56, shared_bytes=gib // 2,
                      capacities=[32 * gib, 24 * gib], reserve=gib)
    print(sp.counts)
    assert sp.counts == (32, 24)
    with pytest.raises(SplitError, match=r"does not fit: rank 0 \(cuda:0\) would hold .* GiB.*Add a GPU"):
        split_blocks("by_memory", 56, 2, block_bytes=[gib] * 56, capacities=[24 * gib, 24 * gib], reserve=gib,
                     devices=["cuda:0", "cuda:1"])
