"""What to try when losses or gradients go non-finite: the settings that can cause it, with this run's values."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

# Keys of a schedule option that set the ends of its log-SNR range, where weights and targets are most extreme.
SCHEDULE_RANGE_KEYS = ("logsnr_min", "logsnr_max", "sigma_min", "sigma_max", "beta_start", "beta_end", "s")


def nonfinite_hint(cfg: DictConfig, reduced_precision: bool) -> str:
    """One sentence naming each candidate cause as `key=value`, only keys this config has.
    `reduced_precision`: the run trains under bf16/fp16 autocast (precision=auto resolves per device)."""
    candidates = [f"optimizer.optim.lr={OmegaConf.select(cfg, 'optimizer.optim.lr')} (try it lower)"]
    if not OmegaConf.select(cfg, "train.grad_clip"):
        candidates.append("train.grad_clip=0 (clipping is off; try 1.0)")
    if reduced_precision:
        candidates.append(f"precision={getattr(cfg.precision, 'value', cfg.precision)} (try precision=fp32)")
    weighting = OmegaConf.select(cfg, "weighting.name")
    if weighting != "uniform":
        candidates.append(f"weighting={weighting} (its weights at the ends of the log-SNR range)")
    ends = ", ".join(f"schedule.{k}={cfg.schedule[k]}" for k in SCHEDULE_RANGE_KEYS if k in cfg.schedule)
    schedule = f"schedule={OmegaConf.select(cfg, 'schedule.name')}"
    candidates.append(f"{schedule} ({ends}: the log-SNR range)" if ends else schedule)
    candidates.append(f"model.prediction={OmegaConf.select(cfg, 'model.prediction')} (a weight written for another "
                      f"target is converted to this one by a factor that grows at one end of the range)")
    return "Candidates: " + "; ".join(candidates) + "."
