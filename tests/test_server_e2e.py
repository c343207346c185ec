"""Tier 3: a real ComfyUI server with this pack, API graphs through /prompt.

One server for the whole session (tests/server_util.py); the PP worker groups that the
pack keeps alive are reused across prompts.  Graphs: tests/workflows/*.json (API format),
edited per case.  Conditioning comes from the test-only node ``PPTestConditioning``
(tests/comfy_test_nodes): the tiny test models have no text encoders.

* parity: the ``.latent`` of the stock graph (UNETLoader → KSampler → SaveLatent) equals
  the PP graph's (… → PPKSampler → SaveLatent) within 1e-4 (fp32), for samplers
  (deterministic, multistep, ancestral), schedulers, cfg 1 / 3.5, CFG modes
  (sequential, batched, cfg_parallel on PP2 × CFG2), batch 2, denoise 0.6 on a non-empty
  latent, both loaders, on tiny Wan 2.1 and Flux.1 models.  Wan is cheap, so it gets one
  prompt pair per feature; Flux (~2 GB fp32 on CPU) gets three pairs that combine them.
* websocket: one ``progress`` per step and preview frames from the PP node.
* errors: bad inputs end as HTTP 400 or an ``execution_error`` naming the problem.
* interrupt: ``/interrupt`` ends a long PP run within about a step; the next prompt runs
  on the same worker processes (``GET /pp/status`` → ``{"ranks": [{"pid": …}, …]}``).
"""
from __future__ import annotations

import os
import re
import time

import pytest

from server_util import inputs, load_workflow, node_id

TOL = 1e-4
PP_NODES = ("PPWorkerGroup", "PPStageSplit", "PPCFGMode", "PPLoadDiffusionModel", "PPKSampler")

WAN_T = 120      # seconds per Wan prompt (tiny model; includes a worker-group start)
FLUX_T = 420     # seconds per Flux prompt (includes loading ~2 GB on 2 cores)


@pytest.fixture(scope="module")
def srv(comfy_server):
    comfy_server.require_nodes("PPTestConditioning", "PPTestNoisyLatent", "UNETLoader", "KSampler",
                               "SaveLatent", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage")
    return comfy_server


@pytest.fixture
def pp_srv(srv):
    srv.require_nodes(*PP_NODES)
    return srv


# ---------------------------------------------------------------------------------------
# graph building
# ---------------------------------------------------------------------------------------

MODELS = {"wan": ("stock_wan_t2v.json", "pp_wan_t2v.json", WAN_T),
          "flux": ("stock_flux.json", "pp_flux.json", FLUX_T)}
LOADERS = {"stock": "UNETLoader", "pp": "PPLoadDiffusionModel"}


def build(model: str, pp: bool, case: dict, tag: str) -> dict:
    """The stock or PP graph of a case. Keys of case (all optional): sampler, scheduler,
    cfg, steps, seed, batch, denoise (< 1 puts PPTestNoisyLatent in front), and for the
    PP graph: devices, mode, strategy, manual, loader ("stock" | "pp"),
    latent ("EmptyLatentImage" to feed a 4-channel latent)."""
    g = load_workflow(MODELS[model][1 if pp else 0])
    s = inputs(g, "PPKSampler" if pp else "KSampler")
    s.update(seed=case.get("seed", 42), steps=case.get("steps", 3), cfg=case.get("cfg", 3.5),
             sampler_name=case.get("sampler", "euler"), scheduler=case.get("scheduler", "simple"),
             denoise=case.get("denoise", 1.0))
    lat_id = node_id(g, "EmptyHunyuanLatentVideo" if model == "wan" else "EmptySD3LatentImage")
    g[lat_id]["inputs"]["batch_size"] = case.get("batch", 1)
    if case.get("latent") == "EmptyLatentImage":
        g[lat_id] = {"class_type": "EmptyLatentImage",
                     "inputs": {"width": 64, "height": 64, "batch_size": case.get("batch", 1)}}
    if case.get("denoise", 1.0) < 1.0:
        g["12"] = {"class_type": "PPTestNoisyLatent", "_meta": {"title": "non-empty latent"},
                   "inputs": {"samples": [lat_id, 0], "seed": 7, "scale": 1.0}}
        s["latent_image"] = ["12", 0]
    inputs(g, "SaveLatent")["filename_prefix"] = f"latents/{tag}_{'pp' if pp else 'stock'}"
    if pp:
        inputs(g, "PPWorkerGroup")["devices"] = case.get("devices", "cpu,cpu")
        inputs(g, "PPCFGMode").update(mode=case.get("mode", "auto"))
        inputs(g, "PPStageSplit").update(strategy=case.get("strategy", "balanced"),
                                         manual=case.get("manual", ""))
        if "loader" in case:
            g["1"]["class_type"] = LOADERS[case["loader"]]
    return g


def run_ok(srv, graph, timeout):
    res = srv.run(graph, timeout=timeout)
    assert res.status == "success", res.describe()
    return res


def parity(srv, model: str, case: dict, tag: str):
    import torch

    timeout = MODELS[model][2]
    t0 = time.monotonic()
    stock = run_ok(srv, build(model, False, case, tag), timeout)
    t1 = time.monotonic()
    pp = run_ok(srv, build(model, True, case, tag), timeout)
    t2 = time.monotonic()
    a, b = srv.read_latent(stock), srv.read_latent(pp)
    assert a.shape == b.shape, f"stock latent {tuple(a.shape)} vs PP latent {tuple(b.shape)}"
    assert a.dtype == b.dtype == torch.float32, (a.dtype, b.dtype)
    assert torch.isfinite(b).all(), "PP latent has non-finite values"
    diff = (a - b).abs().max().item()
    print(f"[{tag}] {model} {case}: stock {t1 - t0:.1f}s, PP {t2 - t1:.1f}s, "
          f"max|diff| = {diff:.3e}, |stock|max = {a.abs().max().item():.2f}, shape {tuple(a.shape)}")
    assert a.abs().max().item() > 0.1, "stock latent is ~0: the case tests nothing"
    assert diff <= TOL, (f"PP latent differs from stock KSampler: max|diff| = {diff:.3e} > {TOL} "
                         f"({model}, {case})")
    return stock, pp, diff


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------

def combo_options(spec) -> list:
    """The choices of a combo input in /object_info (V1: [[...], {...}]; V3: ["COMBO", {"options": [...]}])."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options", [])
    raise AssertionError(f"not a combo input: {spec}")


def test_server_up_with_pack(srv):
    """The server loaded the pack's nodes with the contract's inputs (DESIGN §4)."""
    missing = srv.has_nodes(*PP_NODES)
    assert not missing, (f"pack nodes missing from /object_info: {missing}\n"
                         f"{srv.log_tail(40)}")
    info = srv.object_info

    def names(cls, kind="required"):
        return set(info[cls]["input"].get(kind, {}))

    assert {"devices", "backend"} <= names("PPWorkerGroup")
    assert {"strategy", "manual"} <= names("PPStageSplit")
    assert names("PPCFGMode") == {"mode"}
    assert {"unet_name", "weight_dtype"} <= names("PPLoadDiffusionModel")
    assert {"model", "group", "positive", "negative", "latent_image", "seed", "steps", "cfg",
            "sampler_name", "scheduler", "denoise"} <= names("PPKSampler")
    assert {"split", "cfg_mode"} <= names("PPKSampler", "optional")
    # every stock sampler / scheduler is offered (DESIGN §3)
    for k in ("sampler_name", "scheduler"):
        stock = combo_options(info["KSampler"]["input"]["required"][k])
        ours = combo_options(info["PPKSampler"]["input"]["required"][k])
        assert set(stock) <= set(ours), f"PPKSampler lacks {k}s {set(stock) - set(ours)}"
    # the test models are visible to both loaders
    for cls in ("UNETLoader", "PPLoadDiffusionModel"):
        opts = combo_options(info[cls]["input"]["required"]["unet_name"])
        assert "pp_tiny_wan21_t2v.safetensors" in opts and "pp_tiny_flux1_dev.safetensors" in opts, opts


WAN_CASES = {
    "euler-simple-cfg1": dict(sampler="euler", scheduler="simple", cfg=1.0),
    "euler-simple-cfg3.5-sequential-manual1,1": dict(cfg=3.5, mode="sequential", strategy="manual",
                                                     manual="1,1"),
    "dpmpp_2m-karras-cfg3.5": dict(sampler="dpmpp_2m", scheduler="karras", cfg=3.5),
    "euler_ancestral-normal-cfg3.5": dict(sampler="euler_ancestral", scheduler="normal", cfg=3.5),
    "batched-cfg": dict(cfg=3.5, mode="batched"),
    "batch2": dict(cfg=3.5, batch=2, mode="sequential"),
    "denoise0.6-nonempty": dict(sampler="dpmpp_2m", scheduler="karras", cfg=3.5, denoise=0.6, steps=4),
    "pp-loader": dict(cfg=3.5, loader="pp"),
    # last: the only Wan case on 4 workers (the Flux cases that follow start with it too)
    "cfg_parallel-pp2xcfg2": dict(cfg=3.5, mode="cfg_parallel", devices="cpu,cpu,cpu,cpu"),
}


@pytest.mark.parametrize("name", list(WAN_CASES))
def test_parity_wan(pp_srv, name):
    parity(pp_srv, "wan", WAN_CASES[name], f"wan_{name}")


# Flux is ~2 GB fp32 on 2 cores: three pairs, each covering several features.
FLUX_CASES = {
    "euler_ancestral-normal-cfg_parallel-denoise0.6": dict(sampler="euler_ancestral", scheduler="normal",
                                                           cfg=3.5, steps=2, denoise=0.6,
                                                           mode="cfg_parallel",
                                                           devices="cpu,cpu,cpu,cpu"),
    "euler-simple-cfg1-stockloader": dict(sampler="euler", scheduler="simple", cfg=1.0, steps=3,
                                          loader="stock"),
    "dpmpp_2m-karras-cfg3.5-sequential-batch2": dict(sampler="dpmpp_2m", scheduler="karras", cfg=3.5,
                                                     steps=2, batch=2, mode="sequential"),
}


@pytest.mark.parametrize("name", list(FLUX_CASES))
def test_parity_flux(pp_srv, name):
    parity(pp_srv, "flux", FLUX_CASES[name], f"flux_{name}")


def test_websocket_progress_and_previews(pp_srv):
    """One progress message per step from the PP node, and live previews from it."""
    steps = 4
    g = build("wan", True, dict(cfg=3.5, steps=steps, seed=1234), "ws")
    sampler = node_id(g, "PPKSampler")
    res = run_ok(pp_srv, g, WAN_T)
    prog = res.progress(sampler)
    assert sampler in [str(n) for n in res.executing()], res.executing()
    assert len(prog) == steps, (f"expected {steps} progress messages from PPKSampler (one per step), "
                                f"got {len(prog)}: {prog}")
    assert [p["value"] for p in prog] == list(range(1, steps + 1)), prog
    assert all(p["max"] == steps for p in prog), prog
    previews = res.previews_of(sampler)
    print(f"[ws] progress {len(prog)}, previews {len(previews)} "
          f"(events {sorted({p.event for p in previews})}), all binary {len(res.previews)}")
    assert len(previews) >= steps - 1, (f"expected a preview per step from PPKSampler (node {sampler}), "
                                        f"got {len(previews)} (all binary frames: {res.previews})")


ERROR_CASES = {
    # name: (model, case, regex the error text must match: the message that says what to change)
    "manual-split-not-a-number": ("wan", dict(strategy="manual", manual="3,x"),
                                  r"manual split '3,x' must be comma-separated block counts"),
    "manual-split-does-not-add-up": ("wan", dict(strategy="manual", manual="1,5"),
                                     r"manual split '1,5' has 6 blocks, the model has 2"),
    "more-stages-than-blocks": ("wan", dict(devices="cpu,cpu,cpu"),
                                r"3 stages but the model has only 2 blocks: use at most 2 devices"),
    "cfg_parallel-odd-device-count": ("wan", dict(mode="cfg_parallel", devices="cpu,cpu,cpu"),
                                      r"cfg_parallel needs an even number of devices, the group has 3"),
    "unknown-device": ("wan", dict(devices="cuda:9"), r"device 'cuda:9' does not exist"),
    # non-empty: ComfyUI itself swaps an all-zero latent of the wrong channel count for a
    # right one (comfy.sample.fix_empty_latent_channels), so the 4-channel latent gets noise
    "latent-channels-mismatch": ("flux", dict(latent="EmptyLatentImage", loader="stock", cfg=1.0,
                                              denoise=0.6), r"the LATENT has 4 channels but this Flux model expects 16"),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_invalid_input_fails_cleanly(pp_srv, name):
    """HTTP 400 from /prompt, or an execution_error whose message names the problem; never
    a hang (the prompt must end within the timeout)."""
    model, case, pattern = ERROR_CASES[name]
    g = build(model, True, dict(case, seed=9000 + len(name)), f"err_{name}")
    devices = case.get("devices", "cpu,cpu").split(",")

    def group_of():
        body = pp_srv.pp_status()[1]
        return next((grp for grp in body.get("groups", []) if grp["devices"] == devices), None)
    before = group_of()
    res = pp_srv.run(g, timeout=120)
    assert res.status != "timeout", f"prompt did not end in 120 s (a hang?)\n{res.describe()}"
    assert res.status in ("rejected", "error"), f"expected a failure, got {res.status}\n{res.describe()}"
    text = res.error_text()
    print(f"[{name}] {res.status} (http {res.http_status}) in {res.wall:.1f}s: {text[:500]}")
    assert re.search(pattern, text, re.I), f"error does not name the problem ({pattern!r}): {text[:2000]}"
    if res.status == "error":
        assert "Traceback" not in (res.error or {}).get("exception_message", ""), \
            "the message carries a worker traceback instead of saying what to change"
    # Refused before any worker did anything: no job ran, no group restarted (the PP Worker
    # Group node starts its group in the background, to come up while ComfyUI runs the rest of
    # the graph, so a group may be starting or idle; it was given no job).
    after = group_of()

    def last_job(grp):
        return None if grp is None or grp["layout"] is None else \
            (grp["layout"], grp["split"], [r["seconds"] for r in grp["ranks"]])
    assert last_job(after) in (None, last_job(before)), (before, after)  # None: a new group (the old one stopped)
    if before is not None and before["state"] == "idle":
        assert after["state"] == "idle" and [r["pid"] for r in after["ranks"]] == [r["pid"] for r in before["ranks"]]


def _status_pids(srv):
    status, body = srv.pp_status()
    if status == 404:
        return None
    assert status == 200, (status, body)
    ranks = body.get("ranks") if isinstance(body, dict) else None
    if ranks is None and isinstance(body, dict):  # several groups: {"groups": [{"ranks": …}]}
        ranks = [r for grp in body.get("groups", []) for r in grp.get("ranks", [])]
    return sorted(int(r["pid"]) for r in ranks or [] if r.get("pid"))


def test_comfyui_flags_reach_the_workers(pp_srv):
    """The test server runs with --use-pytorch-cross-attention (not the CPU default, sub-quadratic
    attention): the workers run ComfyUI with it too, so a stage runs stock's kernels."""
    run_ok(pp_srv, build("wan", True, dict(cfg=3.5, steps=1, seed=31), "flags"), WAN_T)
    status, body = pp_srv.pp_status()
    ranks = [r for g in body["groups"] if g["devices"] == ["cpu", "cpu"] for r in g["ranks"]]
    assert ranks and all((r.get("comfy") or {}).get("attention") == "attention_pytorch" for r in ranks), ranks
    assert all(r["comfy"]["flags"]["use_pytorch_cross_attention"] is True for r in ranks)


def test_interrupt_then_next_prompt(pp_srv):
    """/interrupt ends a long PP run within about a step; the next prompt succeeds on the
    same worker processes."""
    srv = pp_srv
    long_steps = 300
    g = build("wan", True, dict(cfg=3.5, steps=long_steps, seed=777), "interrupt")
    sampler = node_id(g, "PPKSampler")
    state = {"n": 0, "t_int": None, "pids": None}

    def on_event(i, m):
        if m[0] == "json" and m[1] == "progress" and str(m[2].get("node")) == sampler:
            state["n"] += 1
            if state["n"] == 3:
                state["pids"] = _status_pids(srv)
                state["t_int"] = time.monotonic()
                assert srv.interrupt() == 200
                return True
        return False

    res = srv.run(g, timeout=180, on_event=on_event)
    assert state["t_int"] is not None, f"never saw 3 progress messages\n{res.describe()}"
    assert res.status == "interrupted", f"expected execution_interrupted\n{res.describe()}"
    t_end = res.event_time("execution_interrupted")
    ptimes = res.progress_times(sampler)
    step = (ptimes[2] - ptimes[0]) / 2 if len(ptimes) >= 3 else 1.0
    after = [t for t in ptimes if t > state["t_int"]]
    lag = t_end - state["t_int"]
    print(f"[interrupt] step {step * 1e3:.0f} ms, interrupt -> execution_interrupted {lag * 1e3:.0f} ms, "
          f"{len(after)} progress messages after the interrupt, {len(ptimes)}/{long_steps} steps ran")
    assert len(ptimes) < long_steps
    assert len(after) <= 2, f"{len(after)} more steps ran after /interrupt"
    assert lag <= 3 * step + 3.0, f"interrupt took {lag:.1f}s with {step:.2f}s steps"

    # the next prompt (different seed) succeeds, on the same workers
    g2 = build("wan", True, dict(cfg=3.5, steps=3, seed=778), "after_interrupt")
    res2 = run_ok(srv, g2, WAN_T)
    assert len(res2.progress(sampler)) == 3
    pids_after = _status_pids(srv)
    assert state["pids"], "GET /pp/status listed no worker pids during the run"
    assert pids_after == state["pids"], f"workers restarted after the interrupt: {state['pids']} -> {pids_after}"


def test_wan22_two_model_handoff_with_lora(pp_srv):
    """Wan 2.2's workflow shape through the server: a high-noise model for the first steps
    (leftover noise), then a low-noise model with a LoRA at 0.8 (LoraLoaderModelOnly) for
    the rest; stock KSamplerAdvanced x 2 against PPKSamplerAdvanced x 2 on one group."""
    import torch
    from make_models import make_wan21_t2v
    from safetensors.torch import save_file

    pp_srv.require_nodes("PPKSamplerAdvanced", "KSamplerAdvanced", "LoraLoaderModelOnly")
    low = pp_srv.base / "models" / "diffusion_models" / "pp_tiny_wan21_low.safetensors"
    if not low.exists():
        make_wan21_t2v(low, seed=11)
    loras = pp_srv.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    lora = {}
    for i in range(2):
        for proj, (o, n) in {"self_attn.q": (128, 128), "ffn.0": (256, 128)}.items():
            base = f"diffusion_model.blocks.{i}.{proj}"
            lora[f"{base}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.1
            lora[f"{base}.lora_down.weight"] = torch.randn(4, n, generator=g) * 0.1
            lora[f"{base}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(loras / "pp_tiny_wan_lora.safetensors"))

    def graph(pp: bool) -> dict:
        k = "PPKSamplerAdvanced" if pp else "KSamplerAdvanced"
        extra = {"group": ["20", 0]} if pp else {}
        common = {"noise_seed": 9, "steps": 4, "cfg": 3.5, "sampler_name": "euler", "scheduler": "simple",
                  "positive": ["2", 0], "negative": ["3", 0], **extra}
        g = load_workflow(MODELS["wan"][0])
        g["10"] = {"class_type": "UNETLoader",
                   "inputs": {"unet_name": "pp_tiny_wan21_low.safetensors", "weight_dtype": "default"}}
        g["11"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["10", 0], "lora_name": "pp_tiny_wan_lora.safetensors", "strength_model": 0.8}}
        g["5"] = {"class_type": k, "inputs": {**common, "model": ["1", 0], "add_noise": "enable",
                                              "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 2,
                                              "return_with_leftover_noise": "enable"}}
        g["13"] = {"class_type": k, "inputs": {**common, "model": ["11", 0], "add_noise": "disable",
                                               "latent_image": ["5", 0], "start_at_step": 2, "end_at_step": 10000,
                                               "return_with_leftover_noise": "disable"}}
        if pp:
            g["20"] = {"class_type": "PPWorkerGroup", "inputs": {"devices": "cpu,cpu", "backend": "local"}}
        inputs(g, "SaveLatent").update(samples=["13", 0], filename_prefix=f"latents/handoff_{'pp' if pp else 'stock'}")
        return g

    stock = run_ok(pp_srv, graph(False), WAN_T)
    pp = run_ok(pp_srv, graph(True), WAN_T)
    a, b = pp_srv.read_latent(stock), pp_srv.read_latent(pp)
    diff = (a - b).abs().max().item()
    print(f"Wan 2.2-style handoff + LoRA 0.8: max|diff| {diff:.2e}, |stock| max {a.abs().max().item():.2f}")
    assert a.abs().max().item() > 0.1 and diff <= TOL


# ---------------------------------------------------------------------------------------
# more model families and files through the server (stock graph vs PP graph)
# ---------------------------------------------------------------------------------------

def _graph(loader: str, unet: str, pp: bool, cond_dim: int, latent_len: int, tag: str, steps=2, cfg=3.0,
           pooled_dim=0, extra_cond=None, lora=None, devices="cpu,cpu") -> dict:
    """loader → (LoRA) → (PP) KSampler → SaveLatent, random conditioning of ``cond_dim``,
    a 64x64 video latent of ``latent_len`` frames; ``extra_cond(g)`` may rewire the conditioning."""
    g = {
        "1": {"class_type": loader, "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "PPTestConditioning", "inputs": {"seed": 1, "length": 8, "dim": cond_dim,
                                                             "pooled_dim": pooled_dim, "scale": 1.0}},
        "3": {"class_type": "PPTestConditioning", "inputs": {"seed": 2, "length": 8, "dim": cond_dim,
                                                             "pooled_dim": pooled_dim, "scale": 1.0}},
        "4": {"class_type": "EmptyHunyuanLatentVideo" if latent_len else "EmptySD3LatentImage",
              "inputs": ({"width": 64, "height": 64, "length": latent_len, "batch_size": 1} if latent_len
                         else {"width": 64, "height": 64, "batch_size": 1})},
        "5": {"class_type": "PPKSampler" if pp else "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         "seed": 3, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
                         "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0],
                                                     "filename_prefix": f"latents/{tag}_{'pp' if pp else 'stock'}"}},
    }
    if pp:
        g["7"] = {"class_type": "PPWorkerGroup", "inputs": {"devices": devices, "backend": "local"}}
        g["5"]["inputs"]["group"] = ["7", 0]
    if lora:
        g["8"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 0.8}}
        g["5"]["inputs"]["model"] = ["8", 0]
    if extra_cond:
        extra_cond(g)
    return g


def _pair(srv, tag, timeout, **kw):
    stock = run_ok(srv, _graph("UNETLoader", pp=False, tag=tag, **kw), timeout)
    pp = run_ok(srv, _graph("PPLoadDiffusionModel", pp=True, tag=tag, **kw), timeout)
    a, b = srv.read_latent(stock), srv.read_latent(pp)
    diff = (a - b).abs().max().item()
    print(f"[{tag}] max|diff| {diff:.2e}, |stock| max {a.abs().max().item():.2f}, shape {tuple(a.shape)}")
    assert a.shape == b.shape and a.abs().max().item() > 0.1 and diff <= TOL
    return diff


def _link_model(srv, name, path):
    link = srv.base / "models" / "diffusion_models" / name
    if not link.exists():
        os.symlink(path, link)
    return name


def test_flux_fp8_file_lora_08_pp_loader(pp_srv):
    """Flux (the test file stores fp8_e4m3fn weights) with a LoRA at strength 0.8:
    UNETLoader → LoraLoaderModelOnly → KSampler against PP Load Diffusion Model →
    LoraLoaderModelOnly → PP KSampler."""
    import torch
    from safetensors.torch import save_file

    pp_srv.require_nodes("LoraLoaderModelOnly")
    (pp_srv.base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    lora = {}
    for base, (o, i) in {"double_blocks.0.img_attn.qkv": (9216, 3072), "single_blocks.0.linear1": (21504, 3072)}.items():
        lora[f"diffusion_model.{base}.lora_up.weight"] = torch.randn(o, 4, generator=g) * 0.05
        lora[f"diffusion_model.{base}.lora_down.weight"] = torch.randn(4, i, generator=g) * 0.05
        lora[f"diffusion_model.{base}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(pp_srv.base / "models" / "loras" / "pp_tiny_flux_lora.safetensors"))
    _pair(pp_srv, "flux_lora", FLUX_T, unet="pp_tiny_flux1_dev.safetensors", cond_dim=4096, pooled_dim=768,
          latent_len=0, lora="pp_tiny_flux_lora.safetensors")


def test_wan21_image_to_video(pp_srv):
    """Wan 2.1 i2v: image latent, mask and CLIP vision features in the conditioning (what
    WanImageToVideo adds) reach the model on the workers."""
    from wan_files import wan_file
    pp_srv.require_nodes("PPTestImageToVideo")
    name = _link_model(pp_srv, "pp_tiny_wan21_i2v.safetensors", str(wan_file("i2v")))

    def i2v(g):
        g["9"] = {"class_type": "PPTestImageToVideo",
                  "inputs": {"positive": ["2", 0], "negative": ["3", 0], "latent": ["4", 0], "seed": 4}}
        g["5"]["inputs"].update(positive=["9", 0], negative=["9", 1])
    _pair(pp_srv, "wan_i2v", WAN_T, unet=name, cond_dim=4096, latent_len=5, extra_cond=i2v)


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit-reference-latent"])
def test_qwen_image(pp_srv, edit):
    """Qwen-Image text-to-image, and an edit with a reference latent (ReferenceLatent, as
    TextEncodeQwenImageEdit does): the reference tokens are dropped inside the model."""
    from make_models import cached_model_files
    pp_srv.require_nodes("ReferenceLatent")
    name = _link_model(pp_srv, "pp_tiny_qwen_image.safetensors", str(cached_model_files()["qwen_image"]))

    def reference(g):
        g["10"] = {"class_type": "PPTestNoisyLatent", "inputs": {"samples": ["4", 0], "seed": 8, "scale": 1.0}}
        g["11"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["10", 0]}}
        g["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["10", 0]}}
        g["5"]["inputs"].update(positive=["11", 0], negative=["12", 0])
    _pair(pp_srv, f"qwen_{'edit' if edit else 't2i'}", FLUX_T, unet=name, cond_dim=3584, latent_len=1, cfg=2.5,
          extra_cond=reference if edit else None)
