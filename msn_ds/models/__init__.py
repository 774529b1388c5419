from .head import MSNModel, ProjectionHead, Prototypes, init_prototypes
from .vit import (ARCHS, REFERENCE_NAMES, ArchSpec, MSNEncoder, build_vit, group_views,
                  resample_pos_embed, resolve_arch)

__all__ = ["ARCHS", "REFERENCE_NAMES", "ArchSpec", "MSNEncoder", "MSNModel", "ProjectionHead", "Prototypes",
           "build_vit", "group_views", "init_prototypes", "resample_pos_embed",
           "resolve_arch"]
