"""loractl: LoRA fine-tuning on MLX that survives the night.

The top-level package holds what every side shares: the protocol, the job-config schema and
the paths. It never imports mlx, so the supervisor and the client stay small and fast.
"""

__version__ = "0.1.0"
