"""The ComfyUI nodes.  Thin: inputs are checked and handed to ``pp_runtime``.

This is the only package that imports ComfyUI's server-side modules (folder_paths,
latent_preview, comfy.utils' progress bar).  Node ids and input names are public:
shared workflow JSON depends on them.
"""
from __future__ import annotations

import logging
import os

import comfy
import comfy.model_management
import comfy.samplers
import folder_paths
import latent_preview
import torch

from ..pp_runtime.comfy import carry
from ..pp_runtime.comfy import loading
from ..pp_runtime.comfy.job import (CfgChoice, GroupChoice, LayoutChoice, PatchChoice, SplitChoice, prepare_comfy_job,
                                    sampler_output)
from ..pp_runtime.workers.group import WorkerError, parse_devices
from ..pp_runtime.workers.registry import shared_group
from ..pp_runtime.engine.layout import CFG_MODES, EXCHANGES, JobError
from ..pp_runtime.engine.split import STRATEGIES, SplitError, parse_manual

CATEGORY = "sampling/pipeline_parallel"
COMFY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))


class PPWorkerGroup:
    DESCRIPTION = ("A persistent group of worker processes, one per device, that holds the stages of the model. "
                   "Shared by every PP node with the same devices and kept alive across prompts.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PP_GROUP",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "devices": ("STRING", {"default": "auto", "tooltip": "Devices, one worker each: 'auto' (every CUDA GPU), "
                                   "'cuda:0,cuda:1', or 'cpu,cpu' to try it without GPUs."}),
            "backend": (["local", "ray"], {"tooltip": "local: worker processes on this machine. "
                                           "ray: one actor per device on a Ray cluster (needs Ray)."}),
        }, "optional": {
            "ray_address": ("STRING", {"default": "", "tooltip": "Ray cluster address, for backend 'ray'."}),
            "residency": (["keep", "park", "release"], {"tooltip": "After each prompt: keep the model's stages "
                          "on the devices (fastest next prompt), park them (frees their GPU memory, keeps the stages; the "
                          "next prompt reads the weights again from the file, which the OS keeps in host RAM while "
                          "there is room), or release them (frees everything; the next prompt places them again)."}),
            "memory_cap_gb": ("STRING", {"default": "", "tooltip": "Memory each worker may use, in GB: one number "
                                         "for every device ('24'), or one per device ('32,24'); empty: all of its "
                                         "GPU. For GPUs shared with other work, or to try smaller cards. The "
                                         "by_memory split fills the devices in proportion; a stage that does not "
                                         "fit fails the prompt with what to change."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, devices, backend, ray_address="", residency="keep", memory_cap_gb=""):
        try:
            parse_caps(memory_cap_gb, None)
            if backend == "ray":
                from ..pp_runtime.workers.ray_backend import RAY_INSTALL_HINT, parse_ray_devices, ray_available
                if not ray_available():
                    return RAY_INSTALL_HINT
                parse_ray_devices(devices)  # counted here, placed by Ray when the group starts
            else:
                parse_devices(devices)
        except ValueError as e:
            return str(e)
        return True

    def make(self, devices, backend, ray_address="", residency="keep", memory_cap_gb=""):
        if backend == "local":  # the workers come up while ComfyUI loads the text encoders
            shared_group(devices, extra_paths=[COMFY_ROOT]).start_in_background()
        return (GroupChoice(devices=devices if backend == "ray" else parse_devices(devices), backend=backend,
                            ray_address=ray_address or "", residency=residency, memory_cap_gb=str(memory_cap_gb)),)


def parse_caps(text, world: int | None) -> list[int]:
    """'' / '24' / '32,24' (GB) -> bytes per device (0: no cap)."""
    text = str(text or "").strip()
    if text in ("", "0"):
        return [0] * (world or 1)
    try:
        gb = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"memory_cap_gb '{text}' must be a number of GB, or one per device, e.g. '32,24'") from None
    if any(g < 0 for g in gb):
        raise ValueError(f"memory_cap_gb '{text}' has a negative cap")
    if world is not None and len(gb) not in (1, world):
        raise ValueError(f"memory_cap_gb '{text}' gives {len(gb)} caps for {world} devices: give one, or one per device")
    caps = [int(g * 2**30) for g in gb]
    return caps * world if world is not None and len(caps) == 1 else caps


class PPStageSplit:
    DESCRIPTION = "How the model's blocks are divided among the pipeline stages (one stage per GPU)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PP_SPLIT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "strategy": (list(STRATEGIES), {"tooltip": "balanced: equal compute per stage; even: equal block counts; "
                                            "by_memory: equal weight bytes per GPU; manual: the counts below."}),
            "manual": ("STRING", {"default": "", "tooltip": "Blocks per stage for 'manual', e.g. '27,30' "
                                  "(must add up to the model's block count)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, strategy, manual):
        if strategy == "manual":
            try:
                counts = parse_manual(manual)
            except SplitError as e:
                return str(e)
            if min(counts) < 1:
                return f"manual split '{manual}' has an empty stage: every stage needs at least one block"
        return True

    def make(self, strategy, manual):
        return (SplitChoice(strategy=strategy, manual=manual),)


class PPCFGMode:
    DESCRIPTION = ("How the two classifier-free-guidance branches use the GPUs: sequential pipelines them as two "
                   "micro-batches; cfg_parallel gives each branch its own pipeline (needs an even GPU count); "
                   "batched runs them as one batch; off samples with one branch (cfg 1).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PP_CFG",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mode": (list(CFG_MODES), {"tooltip": "auto: cfg_parallel with 4+ GPUs (PP x 2), else sequential."}),
        }}

    def make(self, mode):
        return (CfgChoice(mode=mode),)


class PPPatchPipelining:
    DESCRIPTION = ("APPROXIMATE, opt-in: faster at CFG 1 (and with CFG) on a pipeline of 2+ GPUs, at the cost of "
                   "exactness. After the warm-up steps each step cuts the image (or video) tokens into patches that "
                   "flow through the GPUs one after another, so they work at the same time; a patch attends to "
                   "the other patches' keys/values from this step where they are already computed and from the "
                   "previous step otherwise (PipeFusion). The result differs slightly from the stock KSampler; "
                   "with warm-up steps >= steps it is exact. Flux, Wan 2.1/2.2, Qwen-Image, HunyuanVideo, Chroma.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PP_PATCHES",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "patches": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Patches per step (0: automatic, "
                               "about 1024 tokens a patch, at most twice the pipeline stages). More patches: more "
                               "overlap, smaller kernels."}),
            "warmup_steps": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": "Exact steps first (they "
                                    "also fill the keys/values the patches reuse). More: closer to exact."}),
        }}

    def make(self, patches, warmup_steps):
        return (PatchChoice(patches=int(patches), warmup_steps=int(warmup_steps)),)


class PPParallelLayout:
    DESCRIPTION = ("How the worker group's GPUs share each step, exactly (the stock KSampler's result). "
                   "sequence_parallel N cuts the image/video tokens of every step into N shards computed at the "
                   "same time on N GPUs, which exchange keys/values inside each attention: faster at CFG 1, where "
                   "pipeline stages only take turns; every GPU of a shard group holds its stage's weights. "
                   "auto (0): the fastest layout that fits the GPUs' memory (cost model), said in the log and the "
                   "panel. The CFG mode and the stage split apply within the layout.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PP_LAYOUT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sequence_parallel": ("INT", {"default": 0, "min": 0, "max": 8, "tooltip": "GPUs per sequence shard "
                                  "group (1: off, 2, 4, 8: must divide the group's GPUs). 0: auto, from the GPU "
                                  "count, their free memory, the model's size and the CFG."}),
        }, "optional": {
            "attention_exchange": (list(EXCHANGES), {"tooltip": "How the shards see each other inside attention "
                                   "(both exact): all_gather_kv (every GPU gathers all keys/values; any head "
                                   "count), ulysses (all-to-all heads <-> tokens: 2/N of the bytes on N GPUs; the "
                                   "heads must divide by N), auto: ulysses from 4 shards where the heads divide."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, sequence_parallel, attention_exchange="auto"):
        if int(sequence_parallel) < 0:
            return "sequence_parallel must be 0 (auto) or a shard count of 1 or more"
        return True

    def make(self, sequence_parallel, attention_exchange="auto"):
        return (LayoutChoice(sequence_parallel=int(sequence_parallel), attention_exchange=attention_exchange),)


class PPLoadDiffusionModel:
    DESCRIPTION = ("Load a diffusion model for PP KSampler without reading its weights here: each worker reads "
                   "only its own stage from the file.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "A file in models/diffusion_models."}),
            "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],
                             {"tooltip": "Weight dtype on the GPUs, as the stock Load Diffusion Model offers."}),
        }}

    @classmethod
    def IS_CHANGED(cls, unet_name, weight_dtype):
        """A file replaced under the same name is read again (ComfyUI caches the MODEL otherwise)."""
        path = folder_paths.get_full_path("diffusion_models", unet_name)
        if path is None:
            return ""
        stamp = loading.file_stamp(path)
        return f"{stamp['size']}:{stamp['mtime_ns']}"

    def load(self, unet_name, weight_dtype):
        dtype = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp8_e5m2": torch.float8_e5m2}.get(weight_dtype)
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        try:
            return (loading.load_on_disk(path, dtype),)
        except carry.CarryError as e:  # not safetensors, truncated, no model ComfyUI knows
            raise ValueError(str(e)) from None


class PPKSampler:
    DESCRIPTION = ("KSampler across several GPUs: the model is split into stages, one per device of the worker "
                   "group; ComfyUI's own sampler runs on the last stage. Same result as the stock KSampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From Load Diffusion Model or PP Load Diffusion Model (Wan, Flux)."}),
            "group": ("PP_GROUP", {"tooltip": "The worker group (PP Worker Group)."}),
            "positive": ("CONDITIONING", {"tooltip": "What to include in the image."}),
            "negative": ("CONDITIONING", {"tooltip": "What to exclude from the image."}),
            "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale (1.0 runs the cond branch only)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "Sampling algorithm."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "Noise schedule."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Amount of denoising; below 1 keeps part of the input latent."}),
        }, "optional": {
            "split": ("PP_SPLIT", {"tooltip": "Stage split (default: balanced)."}),
            "cfg_mode": ("PP_CFG", {"tooltip": "CFG layout (default: auto)."}),
            "layout": ("PP_LAYOUT", {"tooltip": "Parallel layout (PP Parallel Layout: sequence parallelism, or "
                       "auto). Not connected: pipeline stages and the CFG mode only."}),
            "patch_pipelining": ("PP_PATCHES", {"tooltip": "APPROXIMATE speed-up (PP Patch Pipelining): trades "
                                 "exactness for speed, also at CFG 1. Not connected: exact (the stock "
                                 "KSampler's result)."}),
            "free_host_weights": ("BOOLEAN", {"default": False, "tooltip": "For a MODEL from the stock loader: "
                                  "once its weights are handed to the workers, free them from ComfyUI's memory "
                                  "(the MODEL then works only with PP samplers)."}),
        }}

    def sample(self, model, group, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
               denoise, split=None, cfg_mode=None, free_host_weights=False, patch_pipelining=None, layout=None):
        return pp_sample(model, group, positive, negative, latent_image, seed=seed, steps=steps, cfg=cfg,
                         sampler_name=sampler_name, scheduler=scheduler, denoise=denoise, split=split,
                         cfg_mode=cfg_mode, free_host_copy=free_host_weights, patch_pipelining=patch_pipelining,
                         layout=layout)


class PPKSamplerAdvanced(PPKSampler):
    DESCRIPTION = ("KSampler (Advanced) across several GPUs: start/end step, noise on or off, leftover noise, "
                   "e.g. for Wan 2.2's high-noise then low-noise models on one worker group.")
    FUNCTION = "sample_advanced"

    @classmethod
    def INPUT_TYPES(cls):
        base = PPKSampler.INPUT_TYPES()
        req = base["required"]
        return {"required": {
            "model": req["model"], "group": req["group"],
            "add_noise": (["enable", "disable"], {"tooltip": "Add the seed's noise to the latent first."}),
            "noise_seed": req["seed"], "steps": req["steps"], "cfg": req["cfg"],
            "sampler_name": req["sampler_name"], "scheduler": req["scheduler"],
            "positive": req["positive"], "negative": req["negative"], "latent_image": req["latent_image"],
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "First step to run."}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000, "tooltip": "Step to stop at."}),
            "return_with_leftover_noise": (["disable", "enable"],
                                           {"tooltip": "Keep the remaining noise (for a following sampler)."}),
        }, "optional": base["optional"]}

    def sample_advanced(self, model, group, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive,
                        negative, latent_image, start_at_step, end_at_step, return_with_leftover_noise,
                        split=None, cfg_mode=None, free_host_weights=False, patch_pipelining=None, layout=None):
        return pp_sample(model, group, positive, negative, latent_image, seed=noise_seed, steps=steps, cfg=cfg,
                         sampler_name=sampler_name, scheduler=scheduler, denoise=1.0, split=split,
                         cfg_mode=cfg_mode, free_host_copy=free_host_weights, patch_pipelining=patch_pipelining,
                         layout=layout,
                         disable_noise=add_noise == "disable", start_step=start_at_step,
                         last_step=end_at_step, force_full_denoise=return_with_leftover_noise != "enable")


def previews_on() -> bool:
    """Whether ComfyUI shows live previews for this prompt (its --preview-method, which a
    prompt may override)."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args
        return args.preview_method != LatentPreviewMethod.NoPreviews
    except (ImportError, AttributeError):  # a ComfyUI that names it differently: send them
        return True


def pp_sample(model, group, positive, negative, latent_image, **kw):
    """What both PP samplers do: validate and describe the job, run it on the group with
    ComfyUI's progress bar, preview and interrupt, return the LATENT."""
    workers = shared_group(group["devices"], extra_paths=[COMFY_ROOT], backend=group.get("backend", "local"),
                           ray_address=group.get("ray_address", ""))
    try:
        caps = parse_caps(group.get("memory_cap_gb", ""), workers.world)
    except ValueError as e:
        raise ValueError(str(e)) from None
    device_memory = None
    if (kw.get("split") or {}).get("strategy") == "by_memory" or (kw.get("layout") or {}).get("sequence_parallel") == 0:
        # fit the devices (a by_memory split, the auto layout): their memory, or the caps
        device_memory = workers.device_memory(caps) if any(caps) else workers.start().device_memory()
    # A stock-loader MODEL is handed over as a file in ComfyUI's temp directory (ComfyUI empties
    # it at every start, so an export left by a crash goes with the next start), or PP_EXPORT_DIR.
    export_dir = os.environ.get("PP_EXPORT_DIR") or os.path.join(folder_paths.get_temp_directory(), "pp-exports")
    try:
        job, tensors, rank_tensors = prepare_comfy_job(
            workers.world, model, positive, negative, latent_image, export_dir=export_dir,
            device_memory=device_memory, devices=list(workers.devices), residency=group.get("residency", "keep"),
            memory_caps=caps, stream_x0=previews_on(), **kw)  # without a previewer the stock x0 goes nowhere
    except JobError as e:  # bad input: a plain error whose message says what to change
        raise ValueError(str(e)) from None
    logging.info("PP KSampler: layout %s", job["layout_reason"])  # auto: which layout the cost model took, and why
    preview = latent_preview.prepare_callback(model, kw["steps"])

    def on_step(i, n, x0):
        # The worker streams x0 to host memory; ComfyUI's previewers (TAESD on the GPU) take
        # it where the stock sampler's x0 is: on the MODEL's load device, nested as the stock
        # sampler hands it over (LTX-2, MiniMax-H3: video + audio).
        if isinstance(x0, list):
            from comfy.nested_tensor import NestedTensor
            x0 = NestedTensor([t.to(model.load_device) for t in x0])
        elif x0 is not None:
            x0 = x0.to(model.load_device)
        preview(i, x0, None, n)
    try:
        result = workers.run(job, tensors, rank_tensors=rank_tensors, on_step=on_step,
                             should_interrupt=comfy.model_management.processing_interrupted)
    except WorkerError as e:
        raise RuntimeError(f"PP KSampler: {e}") from None
    if result["interrupted"]:
        raise comfy.model_management.InterruptProcessingException()
    latents = result["latents"]
    if isinstance(latents, list):  # LTX-2: the video and audio latents, as the stock sampler returns them
        from comfy.nested_tensor import NestedTensor
        latents = NestedTensor(latents)
    return (sampler_output(latent_image, latents),)


NODE_CLASS_MAPPINGS = {
    "PPWorkerGroup": PPWorkerGroup,
    "PPStageSplit": PPStageSplit,
    "PPCFGMode": PPCFGMode,
    "PPPatchPipelining": PPPatchPipelining,
    "PPParallelLayout": PPParallelLayout,
    "PPLoadDiffusionModel": PPLoadDiffusionModel,
    "PPKSampler": PPKSampler,
    "PPKSamplerAdvanced": PPKSamplerAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PPWorkerGroup": "PP Worker Group",
    "PPStageSplit": "PP Stage Split",
    "PPCFGMode": "PP CFG Mode",
    "PPPatchPipelining": "PP Patch Pipelining (approximate)",
    "PPParallelLayout": "PP Parallel Layout",
    "PPLoadDiffusionModel": "PP Load Diffusion Model",
    "PPKSampler": "PP KSampler",
    "PPKSamplerAdvanced": "PP KSampler (Advanced)",
}
