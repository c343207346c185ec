"""Tier 3: the MODEL patches users put before the sampler, stock KSampler against PP KSampler.

* Model sampling (ModelSamplingSD3 / Flux / AuraFlow with a shift that changes the
  result, FluxGuidance): carried to the last rank; the latent differs from unpatched.
* EasyCache, LazyCache (a skipped model call is a skipped pipeline pass: the PP run makes
  fewer passes than without the cache) and Wan's context windows: equal to stock with the
  same node in the graph (relative L2 <= 1e-5, fp32 CPU).
* A patch PP cannot carry is refused with its name, never dropped.
"""
from __future__ import annotations


import pytest
import torch

from server_util import inputs, load_workflow, node_id, run_ok_or_fail

TOL = 1e-5


@pytest.fixture(scope="module")
def srv(comfy_server):
    comfy_server.require_nodes("PPKSampler", "EasyCache", "LazyCache", "WanContextWindowsManual", "ModelSamplingSD3",
                               "ModelSamplingFlux", "ModelSamplingAuraFlow", "FluxGuidance")
    return comfy_server


def wan_graphs(patch: dict | None, steps=6, length=9, tag="patch", cfg=3.5, sampler="euler", sp=None):
    """(stock, PP) graphs of the tiny Wan file with ``patch`` (a node: {class_type, inputs})
    between the loader and the sampler; ``sp``: PP KSampler with a PP Parallel Layout."""
    out = []
    for pp in (False, True):
        g = load_workflow("pp_wan_t2v.json" if pp else "stock_wan_t2v.json")
        s = inputs(g, "PPKSampler" if pp else "KSampler")
        s.update(seed=11, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple", denoise=1.0)
        inputs(g, "EmptyHunyuanLatentVideo")["length"] = length
        inputs(g, "SaveLatent")["filename_prefix"] = f"latents/{tag}_{'pp' if pp else 'stock'}"
        if pp:
            inputs(g, "PPWorkerGroup")["devices"] = "cpu,cpu"
            inputs(g, "PPCFGMode")["mode"] = "sequential"
            if sp:
                g["60"] = {"class_type": "PPParallelLayout", "inputs": {"sequence_parallel": sp}}
                s["layout"] = ["60", 0]
        if patch is not None:
            g["50"] = {"class_type": patch["class_type"], "inputs": {**patch["inputs"], "model": ["1", 0]}}
            s["model"] = ["50", 0]
        out.append(g)
    return out


def pair(srv, patch, **kw):
    stock, pp = wan_graphs(patch, **kw)
    a = srv.read_latent(run_ok_or_fail(srv, stock, 120))
    b = srv.read_latent(run_ok_or_fail(srv, pp, 120))
    rel = ((a - b).norm() / a.norm()).item()
    return a, b, rel


def _last_rank_passes(srv) -> int:
    status, body = srv.pp_status()
    ranks = [r for g in body["groups"] if g["devices"] == ["cpu", "cpu"] for r in g["ranks"]]
    return max(r.get("passes") or 0 for r in ranks)


@pytest.mark.parametrize("node", ["EasyCache", "LazyCache"])
def test_cache_nodes_skip_passes_and_match_stock(srv, node):
    patch = {"class_type": node, "inputs": {"reuse_threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0,
                                           "verbose": False}}
    a, b, rel = pair(srv, patch, steps=8, tag=node)
    passes = _last_rank_passes(srv)
    plain, _, _ = pair(srv, None, steps=8, tag=f"{node}_off")
    plain_passes = _last_rank_passes(srv)
    print(f"[{node}] relative L2 vs stock {rel:.1e}; pipeline passes {passes} with the cache, {plain_passes} without")
    assert rel <= TOL
    assert passes < plain_passes, "the cache skipped no pipeline pass"
    assert (a - plain).abs().max() > 1e-4, "the cache changed nothing: the test tests nothing"


def test_wan_context_windows_match_stock(srv):
    # The node's inputs as this ComfyUI has them (v0.33 counts the overlap in real frames, adds
    # retain_first_frame ...): a 9-frame window, 4 frames overlap, the first frame kept.
    patch = {"class_type": "WanContextWindowsManual",
             "inputs": srv.node_inputs("WanContextWindowsManual", context_length=9, context_overlap=4,
                                       context_schedule="standard_static", context_stride=1, closed_loop=False,
                                       fuse_method="pyramid", freenoise=False, retain_first_frame=True)}
    a, b, rel = pair(srv, patch, steps=3, length=21, tag="windows")
    plain, _, _ = pair(srv, None, steps=3, length=21, tag="windows_off")
    print(f"[context windows] relative L2 vs stock {rel:.1e}; windows changed the result by "
          f"{(a - plain).abs().max().item():.2e}")
    assert rel <= TOL and (a - plain).abs().max() > 1e-4


@pytest.mark.parametrize("node,inp", [("ModelSamplingSD3", {"shift": 2.0}),
                                      ("ModelSamplingAuraFlow", {"shift": 1.2})])
def test_model_sampling_shift_is_carried(srv, node, inp):
    """A shift other than the model's default (Wan: 8) changes the sigmas: PP must sample with it."""
    a, b, rel = pair(srv, {"class_type": node, "inputs": inp}, steps=3, tag=node)
    plain, _, _ = pair(srv, None, steps=3, tag=f"{node}_off")
    print(f"[{node}] relative L2 vs stock {rel:.1e}; the shift changed the result by {(a - plain).abs().max():.2e}")
    assert rel <= TOL and (a - plain).abs().max() > 1e-3


def test_flux_model_sampling_and_guidance(srv):
    """ModelSamplingFlux (max/base shift from the size) and FluxGuidance on the tiny Flux file."""
    from test_server_e2e import build
    graphs = []
    for pp in (False, True):
        g = build("flux", pp, dict(cfg=1.0, steps=2, seed=5), "fluxms")
        g["50"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 0.5, "base_shift": 0.3,
                                                                 "width": 64, "height": 64}}
        sampler = node_id(g, "PPKSampler" if pp else "KSampler")
        g[sampler]["inputs"]["model"] = ["50", 0]
        g["51"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": g[sampler]["inputs"]["positive"],
                                                            "guidance": 1.5}}
        g[sampler]["inputs"]["positive"] = ["51", 0]
        graphs.append(g)
    a = srv.read_latent(run_ok_or_fail(srv, graphs[0], 420))
    b = srv.read_latent(run_ok_or_fail(srv, graphs[1], 420))
    rel = ((a - b).norm() / a.norm()).item()
    print(f"[ModelSamplingFlux + FluxGuidance] relative L2 vs stock {rel:.1e}")
    assert rel <= TOL


# ------------------------------------------------------------------------------- previews
def _taesd_files(srv):
    """TAESD decoders built from ComfyUI's own classes with seeded random weights: SD3's image
    decoder and Wan 2.1's video one (lighttaew2_1), in models/vae_approx."""
    from safetensors.torch import save_file
    from comfy.taesd.taehv import TAEHV
    from comfy.taesd.taesd import Decoder
    folder = srv.base / "models" / "vae_approx"
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("taesd3_decoder", Decoder(latent_channels=16)),
                         ("lighttaew2_1", TAEHV(latent_channels=16, latent_format=None))):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            g = torch.Generator().manual_seed(1)
            save_file({k: (torch.randn(v.shape, generator=g) * 0.05).contiguous() for k, v in module.state_dict().items()},
                      str(path))


@pytest.mark.parametrize("family,layout", [("sd3", "pp2"), ("wan21_t2v", "pp2"), ("wan21_t2v", "sp2")])
def test_previews_with_every_preview_method(srv, family, layout):
    """PP KSampler's previews with each preview method ComfyUI offers (set per prompt, as the
    frontend does), for an image and a video family, on the same latents: none sends no
    preview; auto is latent2rgb; taesd decodes with the TAESD model (other pixels).  With
    sequence parallelism (PP Parallel Layout sp2) the steps stream from the pipeline's driver."""
    from test_server_families import graph
    import family_zoo as zoo
    _taesd_files(srv)
    case = zoo.BY_NAME[family]
    frames = {}
    for method in ("none", "auto", "latent2rgb", "taesd"):
        g = graph(srv, case, f"preview_{layout}_{method}", layout, zoo.num_blocks(case))
        g["4"]["inputs"]["steps"] = 3
        # No cached sampler output: every prompt samples.  ComfyUI acts on /free after the prompt
        # its worker takes next, so a cheap prompt goes first: the free happens before ours.
        srv.post("/free", {"free_memory": True})
        flush = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                 "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/flush"}}}
        flushed = srv.run(flush, timeout=60)
        assert flushed.status == "success", flushed.describe()
        res = srv.run(g, timeout=180, extra_data={"preview_method": method})
        assert res.status == "success", res.describe()
        frames[method] = [p.image for p in res.previews_of("4")]
        print(f"[{family} {layout} {method}] {len(frames[method])} previews")
    assert frames["none"] == []
    assert len(frames["latent2rgb"]) >= 2 and all(frames["latent2rgb"])
    assert frames["auto"] == frames["latent2rgb"]
    assert len(frames["taesd"]) == len(frames["latent2rgb"]) and frames["taesd"] != frames["latent2rgb"]


@pytest.mark.parametrize("patch,sampler", [
    ({"class_type": "EasyCache", "inputs": {"reuse_threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0,
                                             "verbose": False}}, "euler"),
    ({"class_type": "LazyCache", "inputs": {"reuse_threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0,
                                             "verbose": False}}, "euler"),
    ({"class_type": "ModelSamplingSD3", "inputs": {"shift": 2.0}}, "dpmpp_2m"),
    (None, "uni_pc"),
])
def test_patches_and_samplers_with_sequence_parallelism(srv, patch, sampler):
    """PP Parallel Layout sp2 with a cache node, a model-sampling shift, other samplers: as stock."""
    a, b, rel = pair(srv, patch, steps=6, tag=f"sp_{sampler}_{patch and patch['class_type']}", sampler=sampler, sp=2)
    print(f"[sp2 {patch and patch['class_type']} {sampler}] relative L2 vs stock {rel:.1e}")
    assert rel <= TOL
