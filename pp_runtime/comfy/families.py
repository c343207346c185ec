"""The staging table: one entry per model family ComfyUI ships (its v0.8 classes).

Each entry says which loops of blocks the forward has, how ``staging.StageForward``
intercepts them (ComfyUI's ``patches_replace["dit"]`` hook kind, or None to stand in for
the block modules), which entries of the hook's argument dict (or which parameters of the
block's forward) are the hidden state, and which modules only the first or the last stage
runs.  Everything else of the model is ComfyUI's own code, run unchanged on every rank.
Check an entry against the family's forward (the file named beside it): the hidden state
must be everything a block changes that the rest of the forward reads.

Models whose forward cannot be cut into a chain of stages (UNets: their skip connections
cross every stage) are refused by ``family_for`` with a message that names them.
"""
from __future__ import annotations

import importlib

from .token_patches import PatchSpec
from .staging import BlockList, Family

DUAL = ("img", "txt")
TXT_IMG = ("txt", "img")  # joint attention order: text tokens first

FAMILIES = (
    # comfy/ldm/flux/model.py (Flux.1 dev/schnell, Kontext, Flux.2, Ovis): txt/img concatenated
    # between the two loops; a boundary at single block 0 carries the concatenation.
    Family("Flux", ("comfy.ldm.flux.model:Flux",),
           (BlockList("double_blocks", "double_block", DUAL, cost=0.5, joint=TXT_IMG),
            BlockList("single_blocks", "single_block", ("img",), joint=("img",))),
           head=("final_layer",), modulation=("img_mod", "txt_mod", "modulation"),
           patches=PatchSpec(positional=(("pe", 2),), classes=("comfy.ldm.flux.model:Flux",),
                             unsupported_inputs=(("ref_latents_method", "index_timestep_zero",
                                                  "params.default_ref_method", "ref_latents",
                                                  "its reference tokens get their own timestep inside each "
                                                  "block"),))),
    # comfy/ldm/chroma/model.py, comfy/ldm/chroma_radiance/model.py (its NeRF head after the loops)
    Family("Chroma", ("comfy.ldm.chroma.model:Chroma",),
           (BlockList("double_blocks", "double_block", DUAL, cost=0.5, joint=TXT_IMG),
            BlockList("single_blocks", "single_block", ("img",), joint=("img",))),
           head=("final_layer", "nerf_image_embedder", "nerf_blocks", "nerf_final_layer", "nerf_final_layer_conv"),
           patches=PatchSpec(positional=(("pe", 2),), classes=("comfy.ldm.chroma.model:Chroma",))),
    # comfy/ldm/hunyuan_video/model.py (HunyuanVideo 1.0 t2v/i2v, 1.5, HunyuanImage 2.1)
    # (joint order: text first since ComfyUI 0.14; a block built with flipped_img_txt, image first)
    Family("HunyuanVideo", ("comfy.ldm.hunyuan_video.model:HunyuanVideo",),
           (BlockList("double_blocks", "double_block", DUAL, cost=0.5, joint=TXT_IMG),
            BlockList("single_blocks", "single_block", ("img",), joint=("img",))),
           head=("final_layer",), modulation=("img_mod", "txt_mod", "modulation"),
           patches=PatchSpec(positional=(("pe", 2),),
                             unsupported_args=("modulation_dims_img", "modulation_dims_txt", "modulation_dims"),
                             classes=("comfy.ldm.hunyuan_video.model:HunyuanVideo",))),
    # comfy/ldm/wan/model.py, model_animate.py: t2v, i2v, Fun Control, VACE (hint blocks computed by
    # every rank: they read only pre-loop values), Camera, S2V, HuMo, Animate
    Family("Wan", ("comfy.ldm.wan.model:WanModel",),
           (BlockList("blocks", "double_block", ("img",), joint=("img",)),),
           head=("head",),
           # Wan 2.2 ti2v with a noise mask: one timestep per frame, so "vec" has a row per frame, which
           # the blocks spread over the frame's tokens with repeat_e (cut with the patch / shard)
           patches=PatchSpec(positional=(("pe", 1),), classes=("comfy.ldm.wan.model:WanModel",),
                             per_token=(("vec", 1, "comfy.ldm.wan.model:repeat_e"),))),
    # comfy/ldm/qwen_image/model.py (text-to-image, Edit, 2511, Layered)
    Family("QwenImage", ("comfy.ldm.qwen_image.model:QwenImageTransformer2DModel",),
           (BlockList("transformer_blocks", "double_block", DUAL, cost=0.5, joint=TXT_IMG),),
           head=("norm_out", "proj_out"), modulation=("img_mod", "txt_mod"),
           patches=PatchSpec(positional=(("pe", 2),),
                             classes=("comfy.ldm.qwen_image.model:QwenImageTransformer2DModel",),
                             unsupported_inputs=(("ref_latents_method", "index_timestep_zero", "default_ref_method",
                                                  "ref_latents", "its reference tokens get their own timestep "
                                                  "inside each block"),))),
    # comfy/ldm/lightricks/model.py, av_model.py (LTX-2: "img" is the (video, audio) pair)
    # (token cut: LTXV only, not LTX-2's audio-video pair; "vec" has one row per token when frames are
    # conditioned (keyframes, guides), the guides' self-attention mask one row per query)
    Family("LTXV", ("comfy.ldm.lightricks.model:LTXVModel",),
           (BlockList("transformer_blocks", "double_block", ("img",), joint=("img",)),),
           head=("norm_out", "proj_out", "scale_shift_table", "audio_norm_out", "audio_proj_out",
                 "audio_scale_shift_table"),
           patches=PatchSpec(positional=(("pe", 1),), per_token=(("vec", 1, ""),),
                             classes=("comfy.ldm.lightricks.model:LTXVModel",))),
    # comfy/ldm/minimax/model.py (MiniMax-H3 video+audio, ComfyUI >= 0.33; absent from older ones, which
    # _cls skips): one packed stream [tokens, hidden] (text | keyframe/reference rows | audio | video),
    # no batch dim, batch 1: ComfyUI never batches cond and uncond (each cond's minimax_payload holds
    # its own PackedLayout, so CONDConstant.can_concat is False), so every pass carries one row.
    # "double_block" hook, args {img, t_emb, mod_segments, rope_freqs, transformer_options}.
    # entry "_forward": forward() rescales the audio outside the DIFFUSION_MODEL wrappers, which the
    # last rank's PipelineProxy runs once around the pass (ComfyUI 0.34+ also brackets the wrappers
    # with comfy.model_prefetch malloc_graph_begin/end there: calling _forward on the stages keeps
    # that graph from being begun on one rank's stage and ended across a stage boundary).  The
    # text refiner and condition_proj run only in MiniMaxH3.extra_conds on the last rank (stages
    # get the context already hidden-wide), so they ride with the head.  adaln_proj acts on a few
    # timestep rows.  Token cut (sequence parallelism only): the stream's dim 0, one contiguous
    # chunk per shard; rope_freqs [1, tokens, 1, ...] cut per block; mod_segments, (start, stop,
    # row) ranges over the whole stream (a per-token LongTensor row under a denoise mask), rebased
    # to the shard's tokens; one attention call per block, no mask; text is in the stream.
    Family("MiniMaxH3", ("comfy.ldm.minimax.model:MiniMaxH3Model",),
           (BlockList("blocks", "double_block", ("img",), joint=("img",)),),
           head=("final_layer", "token_refiner", "condition_proj"), modulation=("adaln_proj",),
           entry="_forward",
           patches=PatchSpec(positional=(("rope_freqs", 1),), token_dim=0, ranges=(("mod_segments", 0),),
                             pipelining=False, classes=("comfy.ldm.minimax.model:MiniMaxH3Model",))),
    # comfy/ldm/modules/diffusionmodules/mmdit.py (SD3, SD3.5)
    Family("MMDiT", ("comfy.ldm.modules.diffusionmodules.mmdit:MMDiT",),
           (BlockList("joint_blocks", "double_block", DUAL, cost=0.5),),
           head=("final_layer",), modulation=("adaLN_modulation",)),
    # comfy/ldm/aura/mmdit.py (AuraFlow)
    Family("AuraFlow", ("comfy.ldm.aura.mmdit:MMDiT",),
           (BlockList("double_layers", "double_block", DUAL, cost=0.5),
            BlockList("single_layers", "single_block", ("img",))),
           head=("modF", "final_linear"), modulation=("modC", "modX")),
    # comfy/ldm/genmo/joint_model/asymm_models_joint.py (Mochi)
    Family("Mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint:AsymmDiTJoint",),
           (BlockList("blocks", "double_block", DUAL),),
           head=("final_layer",), modulation=("mod_x", "mod_y")),
    # comfy/ldm/kandinsky5/model.py (the text blocks before the loop are run by every rank).  Its
    # hook's original_block calls the block with a keyword the block does not take, so the
    # hook cannot run a block: stand in for the modules instead.
    Family("Kandinsky5", ("comfy.ldm.kandinsky5.model:Kandinsky5",),
           (BlockList("visual_transformer_blocks", None, ("visual_embed",)),),
           head=("out_layer",)),
    # comfy/ldm/lumina/model.py (Lumina 2, Z-Image): no hook; the refiners feed only the hidden state
    # (sequence shards: the joint [caption | image] sequence cut in one segment; Z-Image omni's
    # timestep_zero_index, token ranges with their own modulation, is refused)
    Family("Lumina2", ("comfy.ldm.lumina.model:NextDiT",),
           (BlockList("layers", None, ("x",), joint=("x",)),),
           head=("final_layer",), first_only=("noise_refiner", "context_refiner"),
           patches=PatchSpec(positional=(("freqs_cis", 1),), unsupported_args=("timestep_zero_index",),
                             classes=("comfy.ldm.lumina.model:NextDiT",))),
    # comfy/ldm/hidream/model.py: no hook; a double block's text input is the running text
    # state joined with this block's llama layer (recomputed alike on every rank)
    Family("HiDream", ("comfy.ldm.hidream.model:HiDreamImageTransformer2DModel",),
           (BlockList("double_stream_blocks", None, ("image_tokens", "text_tokens"), cost=0.5),
            BlockList("single_stream_blocks", None, ("image_tokens",))),
           head=("final_layer",)),
    # comfy/ldm/cosmos/predict2.py (Cosmos Predict2, Anima): no hook
    Family("CosmosPredict2", ("comfy.ldm.cosmos.predict2:MiniTrainDIT",),
           (BlockList("blocks", None, ("x_B_T_H_W_D",)),),
           head=("final_layer",)),
    # comfy/ldm/cosmos/model.py (Cosmos 1.0): no hook; blocks in a ModuleDict
    Family("Cosmos", ("comfy.ldm.cosmos.model:GeneralDIT",),
           (BlockList("blocks", None, ("x",)),),
           head=("final_layer",)),
)

# Loaded model classes whose forward cannot be staged, with what to use instead.
REFUSED = {
    "UNetModel": "a UNet (SD1.5, SDXL, SD2 ...): its skip connections join every down block to an up block, "
                 "so it cannot be cut into a chain of stages. Use the stock KSampler (one GPU), or ComfyUI's "
                 "MultiGPU CFG Split for two",
    "HunYuanDiT": "Hunyuan-DiT: its long skip connections join the first half of the blocks to the second, "
                  "so it cannot be cut into a chain of stages. Use the stock KSampler",
}


def _cls(path: str):
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # a ComfyUI release without this family


def import_family_classes() -> None:
    """Import the model code of every family in the table (ComfyUI's ``comfy.ldm`` modules)."""
    for fam in FAMILIES:
        for path in fam.classes:
            _cls(path)


def family_for(diffusion_model) -> Family:
    """The family entry for a ComfyUI diffusion model; a clear refusal for one that cannot be staged."""
    for fam in FAMILIES:
        for path in fam.classes:
            cls = _cls(path)
            if cls is not None and isinstance(diffusion_model, cls):
                return fam
    name = type(diffusion_model).__name__
    if name in REFUSED:
        raise UnsupportedModel(f"pipeline-parallel sampling cannot run {REFUSED[name]}")
    raise UnsupportedModel(
        f"pipeline-parallel sampling has no entry for {name} ({type(diffusion_model).__module__}); supported: "
        + ", ".join(f.name for f in FAMILIES) + ". Use the stock KSampler for this model")


class UnsupportedModel(ValueError):
    pass
