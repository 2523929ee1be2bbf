"""Self-supervised methods (Φ_CLR) and their losses."""

from .losses import channel_kl, info_nce, negative_cosine, nt_xent
from .methods import METHODS, MethodSpec, SSLModel

__all__ = ["METHODS", "MethodSpec", "SSLModel", "channel_kl", "info_nce", "negative_cosine", "nt_xent"]
