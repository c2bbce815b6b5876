"""Each package of one-concept modules (losses/, functional/, miners/, reference/) imports
all its modules and re-exports their public names, so adding a loss is adding a file."""
from __future__ import annotations

import importlib
import pkgutil


def import_all(package_name: str, package_path, namespace: dict) -> list:
    exported = []
    for info in sorted(pkgutil.iter_modules(package_path), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package_name}.{info.name}")
        for attr in getattr(module, "__all__", None) or [
                a for a in vars(module) if not a.startswith("_")
                and getattr(vars(module)[a], "__module__", None) == module.__name__]:
            namespace[attr] = getattr(module, attr)
            exported.append(attr)
    return exported
