"""Drop-in replacements for the peers' distillation losses, on kdengine's fused op.

    from kdengine.compat import LigerFusedLinearJSDLoss      # liger_kernel.chunked_loss's, same signature
    from kdengine.compat.trl import KDEngineGKDTrainer       # trl's GKDTrainer without full logits (extra: trl)

``kdengine.compat.trl`` imports trl; this package itself needs only torch.
"""

from kdengine.compat.liger import LigerFusedLinearJSDLoss, fused_linear_jsd, liger_divergence

__all__ = ["LigerFusedLinearJSDLoss", "fused_linear_jsd", "liger_divergence"]
