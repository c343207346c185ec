"""The pipeline engine: topology, communication, the pass plan and its executor (no ComfyUI)."""
