"""Import path of the seed API: ``from ma_convert.integrations.generic import patch_module, collect_aux_losses``."""

from ..core.generic import MetaMultiheadAttention, collect_aux_losses, patch_module

__all__ = ["MetaMultiheadAttention", "collect_aux_losses", "patch_module"]
