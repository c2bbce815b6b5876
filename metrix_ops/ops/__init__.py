"""Custom ops of the compiled extension (torch.ops.metrix_ops.*) with their Python side:
fake (meta) kernels for torch.compile, autograd, and argument checks."""
from .ms_loss import ms_loss_rows, ms_loss_rows_self
from .proxy_anchor import proxy_anchor_terms
from .proxy_nca import proxy_nca_rows
from .row_stats import sim_row_stats

__all__ = ["sim_row_stats", "ms_loss_rows", "ms_loss_rows_self", "proxy_anchor_terms",
           "proxy_nca_rows"]
