"""Tier 3: PP KSampler with the PP Patch Pipelining node, through the server's prompt queue.

The tiny Wan 2.1 workflow (a 3-frame video latent) with patch pipelining on: the prompt
runs, streams progress (one event per step) and a preview per step, its latent is near
the exact PP prompt's (and not equal to it: the mode is approximate), and the panel's
timeline shows the patches as micro-batches (the automatic count: 2 for these few tokens).  With warm-up >= steps it is the exact
prompt's latent bit for bit; a model without a patch entry is refused with the reason.
"""
from __future__ import annotations


import pytest

from server_util import inputs, load_workflow, node_id

STEPS = 4


@pytest.fixture(scope="module")
def srv(comfy_server):
    comfy_server.require_nodes("PPKSampler", "PPPatchPipelining")
    return comfy_server


def wan_graph(tag, patches=None, warmup=1, seed=5):
    g = load_workflow("pp_wan_t2v.json")
    inputs(g, "PPKSampler").update(seed=seed, steps=STEPS, cfg=3.5, sampler_name="euler", scheduler="simple")
    inputs(g, "PPCFGMode")["mode"] = "sequential"
    inputs(g, "EmptyHunyuanLatentVideo")["length"] = 9  # 3 latent frames
    inputs(g, "SaveLatent")["filename_prefix"] = f"latents/patches_{tag}"
    if patches is not None:
        g["60"] = {"class_type": "PPPatchPipelining", "inputs": {"patches": patches, "warmup_steps": warmup}}
        inputs(g, "PPKSampler")["patch_pipelining"] = ["60", 0]
    return g


def test_patch_pipelining_through_the_server(srv):
    exact = srv.read_latent(srv.run(wan_graph("exact"), timeout=240, extra_data={"preview_method": "latent2rgb"}))
    res = srv.run(wan_graph("on", patches=0), timeout=240, extra_data={"preview_method": "latent2rgb"})
    assert res.status == "success", res.describe()
    sampler = node_id(wan_graph("on", patches=0), "PPKSampler")
    assert len(res.progress(sampler)) >= STEPS and len(res.previews_of(sampler)) == STEPS
    approx = srv.read_latent(res)
    dev = ((approx - exact).norm() / exact.norm()).item()
    print(f"patch pipelining through the server: rel-L2 vs exact PP {dev:.3e}")
    assert 0 < dev < 0.15
    code, tl = srv.get("/pp/timeline")
    patches = {b.get("patch") for b in tl["bars"] if b["kind"] == "compute" and b["rank"] == 0}
    # patches 0: automatic; this tiny video has a few hundred tokens, so 2 patches per micro-batch
    assert code == 200 and {1, 2} <= patches and not patches - {None, 1, 2}, tl
    assert tl["summary"]["micro_batches"] >= 4
    code, body = srv.get("/pp/status")
    grp = [x for x in body["groups"] if x["key"] == "cpu,cpu"][0]
    assert all((r.get("patch_pipelining") or {}).get("patched_passes") for r in grp["ranks"]), grp["ranks"]
    full = srv.run(wan_graph("full", patches=0, warmup=STEPS), timeout=240)
    assert full.status == "success", full.describe()
    assert srv.read_latent(full).equal(exact)  # warm-up covering every step: exact


def test_model_without_patch_entry_is_refused(srv):
    from test_server_families import graph
    import family_zoo as zoo
    case = zoo.BY_NAME["sd3"]
    g = graph(srv, case, "patches_sd3", "pp2", zoo.num_blocks(case))
    g["60"] = {"class_type": "PPPatchPipelining", "inputs": {"patches": 0, "warmup_steps": 1}}
    g["4"]["inputs"]["patch_pipelining"] = ["60", 0]
    res = srv.run(g, timeout=120)
    assert res.status == "error" and "no entry for MMDiT" in res.error_text(), res.describe()
