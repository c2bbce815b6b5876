"""PML's ModuleWithRecords API, which code written for PML calls on losses and miners (a
custom subclass registering a statistic, a training loop resetting them): named attributes
set to 0 when registered and, for statistics, by reset_stats. The names are kept in PML's
lists, `_record_these` and `_record_these_stats`, which record-keeping code (PML's logging
hooks) reads."""
from __future__ import annotations

import torch
from .host_read import host_list


class Records:
    def add_to_recordable_attributes(self, name=None, list_of_names=None, is_stat=False):
        # PML registers a statistic only when collect_stats is on (and its code still sets
        # it); ours are registered either way, so that reset_stats zeroes them
        names = ([name] if name is not None else []) + list(list_of_names or [])
        kept = "_record_these_stats" if is_stat else "_record_these"
        if kept not in self.__dict__:
            object.__setattr__(self, kept, [])
        for n in names:
            if n not in self.__dict__[kept]:
                self.__dict__[kept].append(n)
            if not hasattr(self, n):
                setattr(self, n, 0)

    def reset_stats(self):
        for n in self.__dict__.get("_record_these_stats", ()):
            setattr(self, n, 0)


def lazy_stat(store: str, i: int, size: int) -> property:
    """A settable attribute, entry i of `self.<store>`: a tuple of `size` values (0 until
    set), whose entries (or which, whole) may be device tensors that a call left there
    without reading them; they are read together (one host sync) when a training loop first
    reads one of the attributes. Setting one reads nothing (reset_stats after a call)."""
    def values(self) -> tuple:
        vals = self.__dict__.get(store, (0,) * size)
        if torch.is_tensor(vals):
            vals = tuple(vals.unbind()) if vals.dim() else (vals,)
        held = [v for v in vals if torch.is_tensor(v)]
        if held:  # one read for all (float64 holds counts up to 2^53 exactly)
            dev = held[0].device
            got = iter(host_list(torch.stack([v.reshape(()).to(dev, torch.float64)
                                               for v in held])))
            vals = tuple((int(next(got)) if not (v.is_floating_point() or v.is_complex())
                          else next(got)) if torch.is_tensor(v) else v for v in vals)
            self.__dict__[store] = vals
        return vals

    def write(self, value):
        vals = self.__dict__.get(store, (0,) * size)
        vals = list(vals.unbind() if torch.is_tensor(vals) else vals)
        vals[i] = value
        self.__dict__[store] = tuple(vals)

    return property(lambda self: values(self)[i], write)
