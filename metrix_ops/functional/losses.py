"""The functional forms of the losses (same hyper-parameters and defaults as the modules)."""
from ._factory import loss_function

__all__ = ["contrastive_loss", "multi_similarity_loss", "lifted_structure_loss", "generalized_lifted_structure_loss",
           "circle_loss", "ntxent_loss", "supcon_loss"]

contrastive_loss = loss_function("contrastive_loss", "ContrastiveLoss", pos_margin=0.0,
                                 neg_margin=1.0)
multi_similarity_loss = loss_function("multi_similarity_loss", "MultiSimilarityLoss",
                                      alpha=2.0, beta=50.0, base=0.5)
lifted_structure_loss = loss_function("lifted_structure_loss", "LiftedStructureLoss",
                                      neg_margin=1.0, pos_margin=0.0)
generalized_lifted_structure_loss = loss_function(
    "generalized_lifted_structure_loss", "GeneralizedLiftedStructureLoss", neg_margin=1.0,
    pos_margin=0.0)
circle_loss = loss_function("circle_loss", "CircleLoss", m=0.4, gamma=80.0)
ntxent_loss = loss_function("ntxent_loss", "NTXentLoss", temperature=0.07)
supcon_loss = loss_function("supcon_loss", "SupConLoss", temperature=0.1)
# triplet_margin_loss, npairs_loss, proxy_anchor_loss, proxy_nca_loss: functional/<loss>.py
# hphn_triplet_loss: functional/hphn_triplet.py (it takes reduction=, not reducer=)
