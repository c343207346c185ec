"""ComfyUI-facing: ComfyUI's own model code and sampler, staged over the pipeline engine."""
