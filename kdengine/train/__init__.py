"""Training engine: the LLaVA-KD stages (pt, sft, dpt, dft) on DeepSpeed, from one YAML config.

    from kdengine.train import load_config, train
    train(load_config("configs/tiny.yaml", ["run.output_dir=runs/x"]))

``kdengine.train.config`` (the schema and its checks) loads without models or DeepSpeed;
``train`` imports the heavy parts when called.
"""

from kdengine.train.config import ConfigError, StageConfig, TrainConfig, load_config

__all__ = ["ConfigError", "StageConfig", "TrainConfig", "load_config", "train"]


def train(cfg: TrainConfig, resume: bool = False, changes: list[dict] | None = None) -> list[dict]:
    """See `kdengine.train.run.train` (`kdengine.train.resume.check_resume` gives ``changes``)."""
    from kdengine.train.run import train as _train

    return _train(cfg, resume, changes)
