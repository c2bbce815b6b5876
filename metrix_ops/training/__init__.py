"""The reference training run behind `python -m metrix_ops.train`: data (digits, image
folders), a class-balanced batch sampler, small models with a named mixing point, the
loop with Metrix at every level and EE, and the baseline/Metrix/EE comparison."""
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
