"""Host side of a ComfyUI sampling job: validate everything, then describe the job as data.

Called by the PP KSampler node in the ComfyUI process.  Every check that can fail does so
here, before any worker does any work: the model family, what the MODEL carries, the
latent against the model, the CFG layout against the devices, the split against the
model's blocks.
"""
from __future__ import annotations

from typing import TypedDict

from . import carry
from . import export
from . import loading
from .families import family_for
from .token_patches import describe_support
from ..engine.layout import EXCHANGES, JobError, auto_layout, choose_layout
from ..engine.split import split_blocks


# -- the schema: what the nodes choose, and the job the workers read ---------------------------
class GroupChoice(TypedDict):  # PP_GROUP (PP Worker Group)
    devices: list | str
    backend: str  # "local" | "ray"
    ray_address: str
    residency: str  # "keep" | "park" | "release"
    memory_cap_gb: str


class SplitChoice(TypedDict):  # PP_SPLIT (PP Stage Split)
    strategy: str  # engine.split.STRATEGIES
    manual: str


class CfgChoice(TypedDict):  # PP_CFG (PP CFG Mode)
    mode: str  # engine.layout.CFG_MODES


class PatchChoice(TypedDict):  # PP_PATCHES (PP Patch Pipelining)
    patches: int  # 0: automatic
    warmup_steps: int


class LayoutChoice(TypedDict):  # PP_LAYOUT (PP Parallel Layout)
    sequence_parallel: int  # 0: auto (the cost model's pick), 1: off, 2, 4, 8 ...
    attention_exchange: str  # engine.layout.EXCHANGES: auto, all_gather_kv, ulysses


class ComfyJob(TypedDict):
    """A PP KSampler job, as the workers read it (JSON; its tensors travel beside it)."""
    kind: str  # "comfy_sample"
    model: dict  # weights_source: file, dtypes, stamp (and the config to build)
    split: list  # blocks per stage
    layout: dict  # {"cfg": c, "pp": p, "sp": s}: the topology's degrees
    layout_reason: str  # why this layout (auto: the cost model's pick), for the done message and the panel
    sequence_exchange: str  # sequence parallelism's attention exchange (engine.layout.EXCHANGES)
    split_inputs: dict  # strategy, capacities, reserve the split was computed from
    micro_batch_size: int
    batched_cfg: bool
    sampling: dict  # seed, steps, cfg, sampler_name, scheduler, denoise, ... (the stock KSampler's)
    carry: dict  # carry.model_carry: options, transformer options, model sampling, model patches
    conditioning: dict  # {"positive": ..., "negative": ...}: carry.pack_conditioning
    latent: dict  # batch_index
    family: str
    tensors_to: str  # which ranks get the job's tensors: "last" (the sampler's)
    reuse_prefixes: list  # tensors a worker keeps for the next job (unchanged conditioning)
    patch_pipelining: dict | None  # plan_patch_pipelining; None: exact
    patches: dict  # carry.pack_weight_patches (JSON; tensors per stage)
    patches_id: str
    residency: str
    memory_caps: list  # bytes per rank (0: none)
    stream_x0: bool  # send each step's x0 (previews)


def weights_source(model, free_host_copy: bool = False, export_dir: str | None = None) -> dict:
    """Where the workers read the weights, and in which dtypes (as the stock loader chose).

    A MODEL from PP Load Diffusion Model names its file; so does one from the stock loader
    when ComfyUI recorded how it was made (``cached_patcher_init``, ComfyUI >= 0.2x:
    ``comfy.sd.load_diffusion_model(path, options)``): the workers read that file with the
    stock loader's key handling, and only the MODEL's patches cross.  Any other MODEL
    (merged or changed in memory, or an older ComfyUI's) is exported once
    (``export.export_weights``).

    ``free_host_copy``: once a stock-loader MODEL has been handed over, drop its weights from
    the ComfyUI process (they go to the meta device; the MODEL then works only with PP
    samplers, which read the handed-over copy)."""
    base = model.model
    src = getattr(base, "pp_source", None)
    try:
        if src is not None:  # PP Load Diffusion Model, or a MODEL whose host copy was freed
            loading.check_stamp(src)
            return dict(src)
        path = export.loaded_from_file(model)
        if path is None:
            path = export.export_weights(base, export_dir)
    except carry.CarryError as e:
        raise JobError(str(e)) from e
    src = {"path": path, "dtype": loading.dtype_name(base.get_dtype()),
           "manual_cast": loading.dtype_name(base.manual_cast_dtype), "config": loading.pack_config(base.model_config),
           "stamp": loading.file_stamp(path)}
    if free_host_copy:
        export.unload_from_comfy(base)
        base.diffusion_model.to("meta")
        base.pp_source = src
    return src


# What an empty-latent node may add to a LATENT besides its samples: the downscale ratios it
# assumed (ComfyUI >= 0.11), for ComfyUI's own fix of an empty latent to this model.
LATENT_HINTS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def fixed_latent(model, latent: dict):
    """The LATENT's samples as the stock KSampler samples them: ComfyUI's
    ``fix_empty_latent_channels`` (an empty latent resized to this model's channels, scale
    and frames; the format's own fix, which may make it nested), given the downscale
    ratios the latent carries where this ComfyUI takes them."""
    import inspect

    import comfy.sample
    fix = comfy.sample.fix_empty_latent_channels
    takes = inspect.signature(fix).parameters
    return fix(model, latent["samples"], **{k: latent.get(k) for k in LATENT_HINTS if k in takes})


def sampler_output(latent: dict, samples) -> dict:
    """The LATENT a sampler returns: the input's entries with new samples, less the
    empty-latent hints (as the stock ``common_ksampler`` does)."""
    out = {k: v for k, v in latent.items() if k not in LATENT_HINTS}
    out["samples"] = samples
    return out


def check_latent(model, latent: dict):
    """The fixed samples (``fixed_latent``), refused with what to change if they do not fit
    the model."""
    samples = latent["samples"]
    fixed = fixed_latent(model, latent)
    if getattr(fixed, "is_nested", False):  # video + audio latents (LTX-2, MiniMax-H3): ComfyUI's own checks only
        return fixed
    fmt = model.get_model_object("latent_format")
    family = type(model.model).__name__
    if fixed.shape[1] != fmt.latent_channels:
        raise JobError(f"the LATENT has {samples.shape[1]} channels but this {family} model expects "
                       f"{fmt.latent_channels}: use a latent made for this model (its Empty Latent node, or "
                       f"VAE Encode with its VAE)")
    want = fmt.latent_dimensions + 2
    if fixed.dim() != want:
        raise JobError(f"the LATENT has {fixed.dim() - 2} spatial dimensions but this {family} model expects "
                       f"{fmt.latent_dimensions}: use a latent made for this model")
    return fixed


def plan_patch_pipelining(settings: dict | None, diffusion_model, pp: int) -> dict | None:
    """{'count': M, 'warmup': W} for the workers, or None (off); a clear refusal otherwise."""
    if not settings or not settings.get("enabled", True):
        return None
    family = family_for(diffusion_model)
    why = describe_support(family, diffusion_model)
    if why:
        raise JobError(why)
    if pp < 2:
        raise JobError("patch pipelining overlaps the stages of a pipeline: it needs at least 2 stages (this layout "
                       "has 1: CFG-parallel on 2 GPUs gives each branch its own 1-stage pipeline); use cfg_mode "
                       "sequential, more GPUs, or turn patches off")
    count = int(settings.get("patches") or 0)  # 0: from the token count, on the workers
    warmup = int(settings.get("warmup_steps", 1))
    if count == 1 or count < 0:
        raise JobError(f"patches {count}: use 2 or more (0: chosen from the token count, at most {2 * pp})")
    if warmup < 1:
        raise JobError("warmup_steps must be at least 1: the first step fills the keys/values the patches reuse")
    return {"count": count, "warmup": warmup}


def layout_of(world: int, model, profile: dict, cfg_mode: str, do_cfg: bool, choice: LayoutChoice | None,
              device_memory: list[int] | None, reserve: int, patch_pipelining) -> tuple:
    """(topology, why) of a job: today's (CFG mode only) without a PP Parallel Layout; its
    sequence-parallel degree; or for ``sequence_parallel`` 0 the cost model's pick
    (``engine.layout.auto_layout``) from the devices' memory and the model's size."""
    dm = model.model.diffusion_model
    sp = int((choice or {}).get("sequence_parallel", 1))
    refused = describe_support(family_for(dm), dm, "sequence parallelism", "use sequence_parallel 1")
    if patch_pipelining and patch_pipelining.get("enabled", True):
        refused = refused or "sequence parallelism and patch pipelining do not combine: disconnect one of them"
    if sp == 0:
        def stage_bytes(pp: int) -> int:  # the largest stage of the balanced split, with the activations
            if pp > profile["num_blocks"]:
                return 1 << 62  # more stages than blocks: no such layout
            blocks = profile["block_bytes"]
            ranges = split_blocks("balanced", profile["num_blocks"], pp, costs=profile["costs"],
                                  block_bytes=blocks).ranges
            return reserve + profile["shared_bytes"] + max(
                sum(blocks[a:b]) + (profile["first_bytes"] if s == 0 else 0)
                + (profile["last_bytes"] if s == pp - 1 else 0) for s, (a, b) in enumerate(ranges))
        capacity = min(device_memory) if device_memory else None
        return auto_layout(world, cfg_mode, do_cfg, stage_bytes, capacity, refused)
    if sp > 1 and refused:
        raise JobError(refused)
    topo = choose_layout(world, cfg_mode, do_cfg, sp)
    return topo, f"{topo.name}: as chosen" + (f" (sequence_parallel {sp})" if choice else " (CFG mode)")


def stage_capacities(topo, device_memory: list[int]) -> list[int]:
    """Bytes each pipeline stage may use: the smallest of its devices (one per CFG pipeline)."""
    return [min(device_memory[r] for r in range(topo.world_size) if topo.coords_of(r)["pp"] == s)
            for s in range(topo.pp_size)]


def prepare_comfy_job(world: int, model, positive, negative, latent: dict, *, seed: int, steps: int, cfg: float,
                      sampler_name: str, scheduler: str, denoise: float = 1.0, split: dict | None = None,
                      cfg_mode: dict | None = None, disable_noise: bool = False, start_step=None, last_step=None,
                      force_full_denoise: bool = False, micro_batch_size: int = 1,
                      free_host_copy: bool = False, export_dir: str | None = None,
                      device_memory: list[int] | None = None, devices: list[str] | None = None,
                      patch_pipelining: PatchChoice | None = None, residency: str = "keep",
                      memory_caps: list[int] | None = None, stream_x0: bool = True,
                      layout: LayoutChoice | None = None):
    """-> (``ComfyJob``, tensors for every rank, rank_tensors(rank): the tensors only that rank needs)."""
    split = split or {"strategy": "balanced", "manual": ""}
    cfg_mode = cfg_mode or {"mode": "auto"}
    mode = cfg_mode["mode"]
    try:
        profile = loading.model_profile(model.model.diffusion_model)
        carried, tensors = carry.model_carry(model)
        pos_meta, pos_t = carry.pack_conditioning("positive", positive)
        neg_meta, neg_t = carry.pack_conditioning("negative", negative)
    except carry.CarryError as e:
        raise JobError(str(e)) from e
    samples = check_latent(model, latent)
    if mode == "off":
        cfg = 1.0  # one branch: ComfyUI itself skips the uncond pass at cfg 1
    do_cfg = cfg != 1.0
    exchange = (layout or {}).get("attention_exchange", "auto")
    if exchange not in EXCHANGES:
        raise JobError(f"attention_exchange '{exchange}' is unknown; use one of {', '.join(EXCHANGES)}")
    rows = micro_batch_size if mode != "batched" else 2 * micro_batch_size
    activations = int(model.model.memory_required([rows] + list(samples.shape[1:])))  # ComfyUI's own estimate
    topo, reason = layout_of(world, model, profile, mode, do_cfg, layout, device_memory, activations,
                             patch_pipelining)
    layout = dict(topo.degrees)
    capacities = reserve = None
    if device_memory is not None and split["strategy"] == "by_memory":
        # per pipeline stage: the smallest of its devices (one per CFG pipeline)
        capacities, reserve = stage_capacities(topo, device_memory), activations
    try:
        sp = split_blocks(split["strategy"], profile["num_blocks"], layout["pp"], costs=profile["costs"],
                          block_bytes=profile["block_bytes"], first_bytes=profile["first_bytes"],
                          last_bytes=profile["last_bytes"], shared_bytes=profile["shared_bytes"],
                          capacities=capacities, reserve=reserve or 0, devices=devices, manual=split.get("manual"))
    except ValueError as e:
        raise JobError(f"{e} ({profile['family']} has {profile['num_blocks']} blocks)") from e
    prefixes = loading.stage_prefixes(model.model.diffusion_model, sp.ranges)
    try:
        patches, stage_tensors = carry.pack_weight_patches(model, prefixes)
    except carry.CarryError as e:
        raise JobError(str(e)) from e
    pipelining = plan_patch_pipelining(patch_pipelining, model.model.diffusion_model, layout["pp"])
    job = ComfyJob(**{
        "kind": "comfy_sample",
        "model": weights_source(model, free_host_copy, export_dir),
        "split": list(sp.counts), "layout": layout, "layout_reason": reason,
        "sequence_exchange": exchange,
        # what the split was computed from (the panel's preview shows the same split)
        "split_inputs": {"strategy": split["strategy"], "capacities": capacities, "reserve": reserve or 0},
        "micro_batch_size": int(micro_batch_size), "batched_cfg": mode == "batched",
        "sampling": {"seed": int(seed), "steps": int(steps), "cfg": float(cfg), "sampler_name": sampler_name,
                     "scheduler": scheduler, "denoise": float(denoise), "disable_noise": bool(disable_noise),
                     "start_step": start_step, "last_step": last_step, "force_full_denoise": bool(force_full_denoise)},
        "carry": carried,
        "conditioning": {"positive": pos_meta, "negative": neg_meta},
        "latent": {"batch_index": latent.get("batch_index")},
        "family": profile["family"],
        "tensors_to": "last",  # conditioning, latent, model sampling: the sampler runs on the last stage
        "reuse_prefixes": ["positive.", "negative."],  # unchanged conditioning is not sent again
        # Weight patches (LoRA): JSON for all, tensors per stage; the id tells a worker
        # whether the patches it applied last time are still the right ones.
        "patch_pipelining": pipelining,  # approximate, opt-in; None: exact
        "patches": patches, "patches_id": f"{getattr(model, 'patches_uuid', '')}" if patches else "",
        "residency": residency, "memory_caps": list(memory_caps or [0] * world), "stream_x0": bool(stream_x0),
    })
    tensors.update(pos_t)
    tensors.update(neg_t)
    tensors.update(carry.latent_parts("latent.samples", samples))
    if latent.get("noise_mask") is not None:
        tensors.update(carry.latent_parts("latent.noise_mask", latent["noise_mask"]))
    carry.json_roundtrip(job)
    return job, tensors, lambda rank: stage_tensors[topo.coords_of(rank)["pp"]]

