"""Hugging Face-facing pieces shared by every architecture: routed attention on HF caches and
masks, the model mixins, and the `meta_attention` block of the config."""
