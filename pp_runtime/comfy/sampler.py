"""ComfyUI's own sampling on the last rank, over the pipeline.

The last rank of each pipeline runs ``comfy.sample.sample`` unchanged (the stock KSampler's
path: sigmas, noise from the seed, conditioning -> model inputs, CFG, every sampler) on a
ModelPatcher whose ``diffusion_model`` is a ``runner.PipelineProxy``.  With a CFG group of
2 both last ranks run the same sampler in lockstep.  When sampling ends (done or
cancelled) the last rank sends the final STOP on the pass channel.
"""
from __future__ import annotations


import torch

from . import carry
from . import model_patches
from ..engine.comm import PipelineStopped
from .runner import ComfyPipelineRunner, PipelineProxy
from .stage import ComfyStage


def empty_noise(latent_image):
    """The stock sampler's noise with add_noise off: ComfyUI's ``prepare_empty_noise`` (which
    knows nested latents), or zeros where this ComfyUI has no such function."""
    import comfy.sample
    if hasattr(comfy.sample, "prepare_empty_noise"):
        return comfy.sample.prepare_empty_noise(latent_image)
    return torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout)


def sample_on_last_rank(runner: ComfyPipelineRunner, stage: ComfyStage, job: dict, tensors: dict,
                        on_step, should_stop):
    """Run ComfyUI's KSampler path with the proxy; returns the samples (or raises PipelineStopped)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample

    device = runner.ctx.device
    base = stage.base
    real_dm = base.diffusion_model
    base.diffusion_model = PipelineProxy(runner, real_dm, stage.dtype)
    try:
        if stage.patcher is None:
            stage.patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
        patcher = stage.patcher.clone()
        carried = job["carry"]
        for k, v in carried["options"].items():
            patcher.model_options[k] = v
        patcher.model_options["transformer_options"].update(carried.get("transformer_options") or {})
        if carried["model_sampling"] is not None:
            patcher.add_object_patch("model_sampling", carry.unpack_model_sampling(carried["model_sampling"], tensors))
        patcher = model_patches.apply(patcher, carried.get("model_patches") or [])  # EasyCache, windows ...
        s = job["sampling"]
        cond = job["conditioning"]
        positive = carry.unpack_conditioning("positive", cond["positive"], tensors)
        negative = carry.unpack_conditioning("negative", cond["negative"], tensors)
        latent_image = carry.latent_from_parts("latent.samples", tensors)  # fixed by the host (job.fixed_latent)
        if s["disable_noise"]:
            noise = empty_noise(latent_image)
        else:
            noise = comfy.sample.prepare_noise(latent_image, s["seed"], job["latent"].get("batch_index"))

        def callback(step, x0, x, total_steps):
            runner.step = step + 1  # the next model call belongs to the next step
            if runner.stop_agreed(should_stop()):
                raise PipelineStopped("interrupted")
            on_step(step, total_steps, x0)

        return comfy.sample.sample(
            patcher, noise, s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], positive, negative,
            latent_image, denoise=s["denoise"], disable_noise=s["disable_noise"], start_step=s.get("start_step"),
            last_step=s.get("last_step"), force_full_denoise=s.get("force_full_denoise", False),
            noise_mask=carry.latent_from_parts("latent.noise_mask", tensors), callback=callback, disable_pbar=True,
            seed=s["seed"])
    finally:
        base.diffusion_model = real_dm
        runner.end()
