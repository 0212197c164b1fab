"""GPU fast paths for routed attention (torch + Triton; no transformers)."""
