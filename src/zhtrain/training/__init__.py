"""The training stage around the HF Trainer: arguments, the one Trainer subclass, checkpoints and
resume, activation checkpointing, the run report, process setup.
"""
