"""Import path of the seed API: ``from ma_convert.experts import AttentionExpert``."""

from .core.experts import *  # noqa: F401,F403
from .core.experts import __all__  # noqa: F401
