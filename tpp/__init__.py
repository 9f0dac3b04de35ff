"""tpp — Trainability Preserving Pruning (Wang & Fu, ICLR 2023) for PyTorch."""
from .schedule import GrowingSchedule
