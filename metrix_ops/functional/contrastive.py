from ..driver import run_loss


def contrastive_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                     *, pos_margin=0.0, neg_margin=1.0, **options):
    """Functional ContrastiveLoss; `options`: distance, reducer, backend, metrix, expansion,
    lam, mixed_embeddings, mixed."""
    return run_loss("ContrastiveLoss", {"pos_margin": pos_margin, "neg_margin": neg_margin},
                    embeddings, labels, indices_tuple, ref_emb, ref_labels, **options)
