"""The module base class: PML's call signature, our options, one path through `run_loss`."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Expansion, Metrix
from ..driver import check_call_kind, record_call_norms, run_loss
from ..distances import as_distance, wants_norms
from ..spec import LossInputs, get_spec
from ..reducers import as_reducer, kept_reducer, reduce_loss_dict
from ..records import Records
from ..regularizers import check_regularizer, module_options, regularization
from ..validation import check_loss_inputs, pml_label_pair


def overrides_compute_loss(loss) -> bool:
    """A subclass with its own compute_loss: it runs PML's path (its loss dict), wherever the
    loss is called (the loss itself, CrossBatchMemory, DistributedLossWrapper)."""
    if not isinstance(loss, BaseMetricLoss):
        return False
    if torch.compiler.is_compiling():  # torch 2.4's dynamo cannot read a function's __module__
        return type(loss)._user_compute_loss
    return _defined_outside(type(loss).compute_loss)  # also a method assigned to the class later


def _defined_outside(method) -> bool:
    return not (getattr(method, "__module__", "") or "").startswith(__package__ + ".")


class BaseMetricLoss(Records, torch.nn.Module):
    """Subclasses set `loss_name` (the registry key, PML's class name) and `defaults`, the
    loss's own hyper-parameters in PML's positional order; they become attributes, as in
    PML, and are passed to the loss on every call (`loss_params()`)."""

    loss_name: str = ""
    defaults: dict = {}
    # the attributes PML's loss lists in `_record_these` (its hyper-parameters, in PML's
    # order), when not every one of `defaults`
    recorded: Optional[tuple] = None
    # whether the class's compute_loss is a user's (overrides_compute_loss), as the class is
    # made: what a compiled forward reads
    _user_compute_loss: bool = False
    _param_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._user_compute_loss = _defined_outside(cls.compute_loss)
        cls._param_names = tuple(cls.defaults)  # a tuple: torch 2.4's dynamo cannot walk a dict

    def __init__(self, *args, distance=None, reducer=None, backend: str = "auto",
                 metrix: Optional[Metrix] = None, expansion: Optional[Expansion] = None,
                 miner=None, embedding_regularizer=None, embedding_reg_weight=1,
                 collect_stats: bool = False, **hyper):
        super().__init__()
        # PML's flag, taken for drop-in construction (of our losses, PML records a statistic
        # for NPairs only, num_pairs, kept whatever the flag)
        self.collect_stats = collect_stats
        check_regularizer("embedding_regularizer", embedding_regularizer, embedding_reg_weight)
        names = list(self.defaults)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional "
                            f"arguments ({', '.join(names)})")
        unknown = sorted(set(hyper) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {unknown}; "
                            f"its hyper-parameters are {names}")
        params = dict(self.defaults)
        params.update(zip(names, args))
        params.update(hyper)
        for k, v in params.items():
            setattr(self, k, v)
        self.add_to_recordable_attributes(
            list_of_names=list(self.defaults if self.recorded is None else self.recorded))
        # PML's loss.distance and loss.reducer: the defaults as objects when not given
        self.distance = distance if distance is not None else self.get_default_distance()
        self.set_reducer(reducer)
        self.backend = backend
        self.metrix = metrix
        self.expansion = expansion
        # a miner module run on every call in place of an indices_tuple; the fused backends
        # run the rules they know inside the loss op (MultiSimilarityMiner with MS)
        self.miner = miner
        # PML's EmbeddingRegularizerMixin: weight · regularizer(embeddings) added to the loss
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        if embedding_regularizer is not None:
            self.add_to_recordable_attributes(name="embedding_reg_weight")

    def get_default_distance(self):
        return get_spec(self.loss_name).default_distance()

    def get_default_reducer(self):
        return get_spec(self.loss_name).default_reducer()

    def set_reducer(self, reducer):
        """PML's: the reducer this loss reduces with (the default when None)."""
        self.reducer = kept_reducer(reducer) if reducer is not None else self.get_default_reducer()

    def sub_loss_names(self) -> list:
        """PML's: the keys of the loss dict a DoNothingReducer returns, the loss's own then
        its regularizers' (the proxies' before the embeddings', PML's order)."""
        names = list(get_spec(self.loss_name).sub_losses)
        for reg in ("weight", "embedding"):
            if getattr(self, f"{reg}_regularizer", None) is not None:
                names.append(f"{reg}_reg_loss")
        return names

    @staticmethod
    def zero_loss() -> dict:
        return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}

    def zero_losses(self) -> dict:
        """PML's: a zero entry per sub-loss, what a loss dict holds for an empty batch."""
        return {name: self.zero_loss() for name in self.sub_loss_names()}

    def loss_params(self) -> dict:
        return {k: getattr(self, k) for k in self._param_names}

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> dict:
        """PML's: the call's loss dict ({sub-loss: {"losses", "indices", "reduction_type"}})
        before the reducer, from the reference (it materialises the B × M matrix); ref_emb
        None: the batch itself, as PML's forward sets it. forward() calls it only where a
        subclass overrides it, PML's way to write a loss on top of another; otherwise the
        fused ops compute the reduced loss without a loss dict."""
        spec = get_spec(self.loss_name)
        self.__dict__["_computed"] = True  # (PML's distance call is in here)
        labels, ref_labels = pml_label_pair(labels, ref_labels, embeddings, ref_emb)
        if ref_emb is None:
            ref_emb, ref_labels = embeddings, labels
        # the batch against itself as PML (and the driver) take it: the same label tensor
        inp = LossInputs(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                         ref_labels is labels, as_distance(self.distance, spec.default_distance))
        return spec.loss_dict(inp, **self.loss_params())

    def _forward_as_pml(self, embeddings, labels, indices_tuple, ref_emb, ref_labels,
                        options: dict):
        """PML's forward, for a subclass whose compute_loss is its own: the call checked as
        the library's own path checks it, the loss dict it returns reduced by the loss's
        reducer, plus the embedding regularizer (the proxies' is in the dict, as PML's). The
        options that need the library's own loss (Metrix, EE) are refused, not dropped."""
        name = type(self).__name__
        if self.metrix is not None or self.expansion is not None or any(
                v is not None for v in options.values()):
            raise NotImplementedError(
                f"{name} overrides compute_loss, so it runs PML's path (its loss dict, then the "
                "reducer): metrix=, expansion= and lam/mixed_embeddings/mixed need the "
                "library's own loss; move the change into a wrapper around the loss instead")
        spec = get_spec(self.loss_name)
        self.reset_stats()
        labels, ref_labels = pml_label_pair(labels, ref_labels, embeddings, ref_emb)
        # (the references stay as given: PML's compute_loss gets them)
        check_call_kind(self.loss_name, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        proxies = self.loss_params().get("proxies")
        check_loss_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                          labels_required=spec.labels_required,
                          proxies=proxies)
        miner_refs = (ref_emb, ref_labels)  # as given, for the miner
        if ref_emb is None:  # PML's set_ref_emb
            ref_emb, ref_labels = embeddings, labels
        if self.miner is not None:  # the option miner=: its tuple first, as PML's two calls
            if indices_tuple is not None:
                raise ValueError("give either indices_tuple or the loss's miner=, not both")
            indices_tuple = self.miner(embeddings, labels, *miner_refs)
        self.__dict__["_computed"] = False
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if wants_norms(self.distance) and self.__dict__["_computed"]:
            # the distance call PML's compute_loss makes (when the override calls it)
            inp = LossInputs(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                             ref_labels is labels, self.distance)
            record_call_norms(self.loss_name, self.loss_params(), embeddings, miner_refs[0],
                              inp, self.distance, None)
        loss = reduce_loss_dict(loss_dict, as_reducer(self.reducer, spec.default_reducer),
                                embeddings, labels, loss_name=self.loss_name)
        options = dict(module_options(self), weight_regularizer=None)  # (in the dict)
        return regularization(loss, embeddings, proxies, **options)

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None, *, lam=None, mixed_embeddings=None, mixed=None):
        if overrides_compute_loss(self):
            return self._forward_as_pml(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                                        dict(lam=lam, mixed_embeddings=mixed_embeddings,
                                             mixed=mixed))
        return run_loss(self.loss_name, self.loss_params(), embeddings, labels, indices_tuple,
                        ref_emb, ref_labels, distance=self.distance, reducer=self.reducer,
                        backend=self.backend, metrix=self.metrix, expansion=self.expansion,
                        lam=lam, mixed_embeddings=mixed_embeddings, mixed=mixed, miner=self.miner,
                        **module_options(self))

    def extra_repr(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.loss_params().items() if not torch.is_tensor(v)]
        parts += [f"backend={self.backend!r}"]
        if self.metrix is not None:
            parts.append(f"metrix={self.metrix!r}")
        if self.expansion is not None:
            parts.append(f"expansion={self.expansion!r}")
        for name, weight in (("embedding_regularizer", "embedding_reg_weight"),
                             ("weight_regularizer", "weight_reg_weight")):
            if getattr(self, name, None) is not None:  # the regularizer prints as a submodule
                parts.append(f"{weight}={getattr(self, weight)!r}")

        return ", ".join(parts)
