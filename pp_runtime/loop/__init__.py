"""The seed's diffusers-scheduler loop: a thin driver of the engine's mixin API."""
