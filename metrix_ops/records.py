"""PML's ModuleWithRecords API, which code written for PML calls on losses and miners (a
custom subclass registering a statistic, a training loop resetting them): named attributes
set to 0 when registered and, for statistics, by reset_stats."""
from __future__ import annotations


class Records:
    def add_to_recordable_attributes(self, name=None, list_of_names=None, is_stat=False):
        names = ([name] if name is not None else []) + list(list_of_names or [])
        for n in names:
            if not hasattr(self, n):
                setattr(self, n, 0)
        if is_stat:
            self._stat_names = getattr(self, "_stat_names", ()) + tuple(names)

    def reset_stats(self):
        for n in getattr(self, "_stat_names", ()):
            setattr(self, n, 0)
