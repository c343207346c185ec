"""Tier 3: every family through a real ComfyUI server, stock KSampler against PP KSampler.

For each case of ``family_zoo`` (ComfyUI's own classes, small sizes): the stock graph
(loader → KSampler → SaveLatent) and the same graph with PP KSampler on four layouts —
PP2 (sequential CFG), PP3 with an uneven manual split, CFG-parallel on 2 workers, and
PP2 × CFG2 on 4 — through ``POST /prompt``.  Each PP latent must equal the stock one to a
relative L2 of 1e-5 (fp32, CPU; measured about 5e-7).

The model comes from a file in models/diffusion_models where ComfyUI's detection maps a
small file back to the family (Wan, HunyuanVideo, LTX-Video/LTX-2, SD3: stock Load
Diffusion Model against PP Load Diffusion Model); for the families whose detection fixes
large sizes (Flux.1 3072 wide, Mochi 48 blocks, HiDream 17B, ...) the test node
``PPTestModel`` builds the MODEL in the server, which PP KSampler hands to the workers like
any MODEL from the stock loader.  Flux.1 and Qwen-Image at their detected widths are
tested from files in ``test_server_e2e.py``.
"""
from __future__ import annotations


import pytest
import torch

import family_zoo as zoo
from server_util import run_ok_or_fail

TOL = 1e-5  # relative L2 of the final latent
STEPS = 2


@pytest.fixture(scope="module")
def srv(comfy_server):
    comfy_server.require_nodes("PPTestModel", "PPTestFamilyConditioning", "PPTestFamilyLatent", "PPKSampler",
                               "PPLoadDiffusionModel", "KSampler", "SaveLatent", "LTXVSeparateAVLatent")
    return comfy_server


LAYOUTS = {  # name: (devices, cfg mode, manual split or None[, sequence_parallel: PP Parallel Layout])
    "pp2": ("cpu,cpu", "sequential", None),
    "pp3-uneven": ("cpu,cpu,cpu", "sequential", "uneven"),
    "cfgpar2": ("cpu,cpu", "cfg_parallel", None),
    "pp2xcfg2": ("cpu,cpu,cpu,cpu", "cfg_parallel", None),
}
SP_LAYOUTS = {
    "sp2": ("cpu,cpu", "sequential", None, 2),
    "pp2xsp2": ("cpu,cpu,cpu,cpu", "sequential", None, 2),
    "cfg2xsp2": ("cpu,cpu,cpu,cpu", "cfg_parallel", None, 2),
}
# The families whose tokens sequence parallelism cuts (the others are refused by name).
SP_FAMILIES = ["flux1_dev", "flux1_kontext", "flux2", "chroma", "wan21_t2v", "wan21_i2v", "wan21_fun_control",
               "wan22_ti2v_5b", "hunyuan_video", "qwen_image", "qwen_image_edit", "lumina2", "z_image", "ltxv",
               "minimax_h3"]


def _model_file(srv, case) -> str:
    name = f"pp_zoo_{case.name}.safetensors"
    path = srv.base / "models" / "diffusion_models" / name
    if not path.exists():
        zoo.write_file(case, path)
    return name


def graph(srv, case, tag: str, layout: str | None, blocks: int) -> dict:
    pp = layout is not None
    if case.detectable:
        model = {"class_type": "PPLoadDiffusionModel" if pp else "UNETLoader",
                 "inputs": {"unet_name": _model_file(srv, case), "weight_dtype": "default"}}
    else:
        model = {"class_type": "PPTestModel", "inputs": {"case": case.name, "seed": 0}}
    sampler = {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent_image": ["3", 0],
               "seed": 5, "steps": STEPS, "cfg": case.cfg, "sampler_name": "euler", "scheduler": "simple",
               "denoise": 1.0}
    g = {"1": model,
         "2": {"class_type": "PPTestFamilyConditioning", "inputs": {"case": case.name, "seed": 1}},
         "3": {"class_type": "PPTestFamilyLatent", "inputs": {"case": case.name, "batch_size": 1}},
         "4": {"class_type": "PPKSampler" if pp else "KSampler", "inputs": sampler}}
    if pp:
        devices, mode, manual, *sp = {**LAYOUTS, **SP_LAYOUTS}[layout]
        g["4"]["inputs"].update(group=["5", 0], cfg_mode=["6", 0], split=["7", 0])
        if sp:
            g["4"]["inputs"]["layout"] = ["11", 0]
            g["11"] = {"class_type": "PPParallelLayout", "inputs": {"sequence_parallel": sp[0]}}
        g["5"] = {"class_type": "PPWorkerGroup", "inputs": {"devices": devices, "backend": "local"}}
        g["6"] = {"class_type": "PPCFGMode", "inputs": {"mode": mode}}
        g["7"] = {"class_type": "PPStageSplit",
                  "inputs": {"strategy": "manual" if manual else "balanced",
                             "manual": f"{blocks - 2},1,1" if manual else ""}}
    prefix = f"latents/zoo_{case.name}_{tag}"
    if isinstance(case.latent[0], tuple):  # LTX-2: save the video and the audio latent
        g["8"] = {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": ["4", 0]}}
        g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": prefix + "_v"}}
        g["10"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 1], "filename_prefix": prefix + "_a"}}
    else:
        g["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}}
    return g


def latents(srv, res) -> torch.Tensor:
    """Every latent the run saved, flattened into one vector (video then audio for LTX-2)."""
    return torch.cat([srv.read_latent(res, node).flatten() for node in ("9", "10")
                      if srv.latent_files(res.prompt_id, node)])


def _stock_vs_pp(srv, name: str, layouts: dict, what: str) -> None:
    """The stock graph against PP KSampler in each of ``layouts``: relative L2 <= TOL each."""
    case = zoo.BY_NAME[name]
    blocks = zoo.num_blocks(case)
    stock = latents(srv, run_ok_or_fail(srv, graph(srv, case, "stock", None, blocks), 240))
    assert torch.isfinite(stock).all() and stock.abs().max() > 0.1
    report = []
    for layout in layouts:
        pp = latents(srv, run_ok_or_fail(srv, graph(srv, case, layout, layout, blocks), 240))
        rel = ((pp - stock).norm() / stock.norm()).item()
        report.append(f"{layout} {rel:.1e}")
        assert rel <= TOL, f"{name} {layout}: relative L2 {rel:.2e} against the stock KSampler"
    print(f"[{name}] {what}, {blocks} blocks: " + ", ".join(report))


@pytest.mark.parametrize("name", [c.name for c in zoo.CASES])
def test_family_stock_vs_pp(srv, name):
    _stock_vs_pp(srv, name, LAYOUTS, "file" if zoo.BY_NAME[name].detectable else "PPTestModel")


@pytest.mark.parametrize("name", [n for n in SP_FAMILIES if n in zoo.BY_NAME])
def test_family_stock_vs_sequence_parallel(srv, name):
    """PP KSampler with a PP Parallel Layout (sequence parallelism): exact as the stock KSampler."""
    _stock_vs_pp(srv, name, SP_LAYOUTS, "sequence parallel")
