"""The run's configuration schema (Hydra ConfigStore) and how group nodes are built.

Types and enumerations are checked by OmegaConf when Hydra composes the config, so `train.steps=abc`
or `precision=fp8` fail before any work with the key and the allowed values. The group options
(`dataset`, `schedule`, `weighting`, `model`, `optimizer`) are validated by Hydra (unknown option →
list of available ones) and by the constructors they instantiate. `validate` runs every other check
(diffrun/validation.py): ranges, NaN/inf, unknown keys, devices, paths, the groups built once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffrun.errors import ConfigError, DiffrunError

META_KEYS = ("name", "citation", "paper", "notes")


class Precision(str, Enum):
    auto = "auto"    # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"    # autocast, fp32 master weights
    fp16 = "fp16"    # autocast + GradScaler


class SamplerName(str, Enum):
    ddim = "ddim"                        # Song et al. 2021, η = sample.eta
    ddpm = "ddpm"                        # ancestral (Ho et al. 2020) on the discrete T-step grid, sample.ddpm_variance
    ddpm_continuous = "ddpm_continuous"  # the same ancestral step on a uniform continuous-t grid
    heun = "heun"                        # EDM's 2nd-order sampler (Karras et al. 2022, Alg. 2); NFE = 2·steps − 1


class DDPMVariance(str, Enum):
    fixed_large = "fixed_large"  # σ_t² = β_t (Ho et al. 2020 CIFAR-10, tqch/ddpm-torch)
    fixed_small = "fixed_small"  # σ_t² = β̃_t, the posterior variance
    learned = "learned"          # IDDPM's learned range between β̃_t and β_t (needs model.learn_sigma)


class SamplingPrecision(str, Enum):
    fp32 = "fp32"    # no autocast (the default: sample quality is not traded for speed unless asked)
    bf16 = "bf16"    # autocast bf16
    fp16 = "fp16"    # autocast fp16
    train = "train"  # the autocast dtype the run trains with (`precision`)


class NanPolicy(str, Enum):
    skip = "skip"    # skip the update on the device and count it
    halt = "halt"    # stop at the next flush with a checkpoint of the last good state


class Capture(str, Enum):
    none = "none"        # the step runs eagerly, operator by operator
    compile = "compile"  # the whole step through torch.compile, CUDA graphs on a GPU (diffrun/training/capture.py)


class OnUnavailable(str, Enum):
    skip = "skip"    # train anyway, report that FID was skipped and why
    fail = "fail"


@dataclass
class TrainConfig:
    steps: int = 600                  # optimizer steps (with `kimg`: ${diffrun.kimg_to_steps:${train.kimg},${train.batch_size}})
    kimg: Optional[float] = None      # budget in thousands of training images (EDM's unit); set, it decides the length:
                                      # steps = ⌈kimg·1000 / batch_size⌉, and a train.steps that disagrees is refused
    batch_size: int = 64              # global batch (split across ranks under DDP)
    log_every: int = 50               # host reads metrics / NaN counters only every N steps
    grad_clip: float = 1.0            # max global grad-norm; 0 disables
    compile: bool = False             # torch.compile the denoiser
    capture: Capture = Capture.none   # compile: the whole step (sampling … optimizer, EMA, bookkeeping) as one graph
    channels_last: bool = False       # memory format (helps convolutions on CUDA)
    nan_policy: NanPolicy = NanPolicy.skip
    max_skipped_fraction: float = 0.1  # halt anyway if more than this fraction of steps were non-finite
    progress: bool = True             # tqdm progress bar
    label_dropout: float = 0.0        # class-conditional models: P(label → null label), for classifier-free guidance; 0
                                      # unless the recipe trains for guidance (DiT 0.1, Min-SNR 0.15; EDM 0)
    tf32: Optional[bool] = None       # CUDA TF32: null keeps PyTorch's defaults (cuDNN convolutions on, matmuls off);
                                      # false turns both off (EDM training_loop.py), true both on


@dataclass
class EMAConfig:
    """Either a decay per step (`decay`, DDPM's 0.9999) or a half-life in images (`halflife_kimg`, EDM's 500 kimg)."""
    decay: Optional[float] = 0.999    # EMA decay per step; null with halflife_kimg
    warmup: bool = True               # decay_n = min(decay, (1+n)/(10+n)) (Tarvainen & Valpola 2017 style); per-step decay only
    halflife_kimg: Optional[float] = None  # EDM: β = 0.5^(batch / half-life), the half-life in thousands of images
    rampup_ratio: Optional[float] = None   # EDM: half-life ≤ ratio × images seen (0.05); null: no ramp-up


@dataclass
class AugmentConfig:
    """EDM's non-leaking augmentation (diffrun/data/augment.py; NVlabs/edm train.py's CIFAR-10 values). Each
    transform is applied with probability p × its multiplier and its parameters are given to the network
    (`model.net.augment_dim` = 9 with every transform on)."""
    p: float = 0.0                    # overall probability (EDM CIFAR-10: 0.12); 0: no augmentation
    xflip: float = 1e8                # probability multipliers (EDM train.py: xflip 1e8, i.e. a flip in 50 % of images)
    yflip: float = 1.0
    scale: float = 1.0
    rotate_frac: float = 1.0
    aniso: float = 1.0
    translate_frac: float = 1.0
    scale_std: float = 0.2            # log2 std of isotropic scaling
    rotate_frac_max: float = 1.0      # rotation range, 1 = full circle
    aniso_std: float = 0.2            # log2 std of anisotropic scaling
    aniso_rotate_prob: float = 0.5    # probability of scaling along a rotated frame
    translate_frac_std: float = 0.125  # std of translation, relative to the image size


@dataclass
class SamplerConfig:
    """The sampler keys shared by `sample.*` and `eval.*` (diffrun/sampling, docs/samplers.md)."""
    sampler: SamplerName = SamplerName.ddim
    steps: int = 50                   # number of denoising steps (heun: NFE = 2·steps − 1)
    eta: float = 0.0                  # DDIM stochasticity (0 = deterministic)
    clip_x0: Optional[bool] = None    # clip predicted x0 to [−1, 1]; null: ddim/ddpm clip, heun does not (EDM)
    ddpm_variance: DDPMVariance = DDPMVariance.fixed_large
    rho: float = 7.0                  # heun: ρ of EDM's σ grid
    sigma_min: float = 0.002          # heun: σ range, clipped to the schedule's
    sigma_max: float = 80.0
    s_churn: float = 0.0              # heun: EDM's S_churn (0: deterministic), S_min, S_max, S_noise
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0
    cfg_scale: float = 1.0            # classifier-free guidance (1: conditional only, 0: unconditional only)
    guidance_sigma_min: Optional[float] = None  # guide only for σ in (min, max] (Kynkäänniemi et al. 2024)
    guidance_sigma_max: Optional[float] = None
    precision: SamplingPrecision = SamplingPrecision.fp32  # network autocast while sampling


@dataclass
class SampleConfig(SamplerConfig):
    num_images: int = 64              # images in the sample grid
    every_steps: int = 0              # also sample during training every N steps (0: only at the end)
    seed: int = 0                     # sample seed (grids comparable across runs)


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3                     # keep the last K checkpoints
    allow_unverified: bool = False    # load checkpoint files that carry no SHA-256 (other programs, old diffrun)
    allow_pickle: bool = False        # load checkpoints of pickled objects (diffrun's earlier format): they can run
    #                                   code, so only your own files; `diffrun-convert` rewrites them as data


@dataclass
class EvalConfig(SamplerConfig):
    enabled: bool = True
    every_steps: int = 0              # FID during training every N steps (0: only at the end)
    num_samples: int = 200            # generated images per FID; 50,000 for paper numbers (FID-50k)
    num_reference: Optional[int] = None  # training images as reference; None: all of them, whatever num_samples
    reference_stats: Optional[str] = None  # FID against this statistics file instead (.npz with mu, sigma: EDM,
    #                                   ADM, TTUR; torch-fidelity's *-stat-fid-2048.pt); no KID then
    repeats: int = 1                  # FIDs with different sample seeds; `fid` is their min (EDM), `fid_mean` the mean
    batch_size: int = 100
    kid_subset_size: int = 1000       # KID subset size (torch-fidelity's default); bounded by the sample and
    #                                   reference counts, and the record says so
    seed: int = 12345                 # sample seed for FID (same images across runs and steps)
    inception_weights: Optional[str] = None  # path to torch-fidelity-format Inception weights
    cache_dir: Optional[str] = None   # reference statistics and converted weights (default ~/.cache/diffrun)
    on_unavailable: OnUnavailable = OnUnavailable.skip


class StatsRange(str, Enum):
    fixed = "fixed"        # bins span [stats.logsnr_min, stats.logsnr_max]
    schedule = "schedule"  # bins span the schedule's own λ range [λ(1), λ(0)]


@dataclass
class StatsConfig:
    bins: int = 64                    # log-SNR bins for per-bin loss statistics (λ outside the range → edge bins)
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    range: StatsRange = StatsRange.fixed
    write: bool = True                # append the per-bin arrays to <run>/logsnr_stats.npz at every flush


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"    # files under <run>/wandb/offline-run-*; upload later with `wandb sync`
    disabled = "disabled"


@dataclass
class WandbConfig:
    mode: Optional[WandbMode] = None  # None: $WANDB_MODE if set, else online if WANDB_API_KEY is set, else disabled
    project: str = "diffrun"
    entity: Optional[str] = None
    group: Optional[str] = None       # W&B group is `<this>/<strategy>`; default `experiment`, or `sweep_name` in a multirun
    tags: list = field(default_factory=list)  # added to the automatic strategy/dataset/seed/schedule/model tags
    plots_every: int = 5              # per-bin line plots and the variance heatmap every N flushes (and the last)
    init_timeout: float = 10.0        # seconds wandb.init may wait for the server before logging offline (docs/wandb.md)


@dataclass
class ReportConfig:
    baseline: str = "uniform"         # strategy the others are compared against
    target_fid: Optional[float] = None  # "steps to reach FID ≤ target" column (convergence speed)


@dataclass
class DistConfig:
    """Data-parallel training (torch DDP); see diffrun/launching/distributed.py and docs/sweeps.md."""
    devices: int = 1                  # ranks this process starts on its machine (1: no DDP); torchrun/srun set their own
    backend: str = "auto"             # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 1800.0         # a collective waiting longer than this fails the run (a rank died or hangs)
    interrupt_check_every: int = 10   # steps between the ranks' agreement on a pending signal (a host sync)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    deterministic: bool = False       # torch deterministic algorithms (bit-identical resume on CPU)
    resume: str = "auto"              # auto | never | force (continue a run whose config changed) | /path/to/ckpt.pt
    sweep_name: str = "sweep"
    experiment: Optional[str] = None  # name of the conf/experiment preset, if any
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    dataset: Any = None
    schedule: Any = None
    weighting: Any = None
    model: Any = None
    optimizer: Any = None
    callbacks: Any = None             # conf/callbacks: what a run does besides training (diffrun/training/callbacks.py)


def hydra_output_subdir() -> str | None:
    """`hydra.output_subdir`: `.hydra` on rank 0, None (Hydra writes nothing) on the other torchrun/srun
    ranks, which would otherwise all write the same files into the same run directory at once."""
    from diffrun.launching.distributed import env_info

    return ".hydra" if env_info().rank == 0 else None


def run_name(base: str, *, _root_: DictConfig) -> str:
    """`name`'s default: `base`, plus `_<6 hex>` of the run fingerprint when the command line changed something
    `base` does not say (diffrun.training.run_state.name_suffix), so that different runs get different
    directories."""
    from diffrun.training.identity import name_suffix

    return base + name_suffix(_root_)


def kimg_to_steps(kimg: float | None, batch_size: int) -> int:
    """Optimizer steps of a budget of `kimg` thousand images at a global batch of `batch_size`: ⌈kimg·1000 / batch⌉
    (EDM's loop stops at the first step that reaches the budget). The resolver of `train.steps` in presets that
    count in images."""
    if kimg is None:
        raise ConfigError("train.kimg=null, but train.steps follows it here (${diffrun.kimg_to_steps:...}); to count "
                          "in steps give both train.kimg=null and train.steps=<N>")
    return -(-round(float(kimg) * 1000) // int(batch_size))


def seed_parity(seed: int) -> str:
    """"even" or "odd": the A/A calibration preset (conf/experiment/calibration.yaml) labels one configuration with
    it, so that a single sweep over seeds gives two arms with disjoint seeds."""
    return "even" if int(seed) % 2 == 0 else "odd"


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("diffrun.kimg_to_steps", kimg_to_steps, replace=True)
    OmegaConf.register_new_resolver("diffrun.hydra_output_subdir", hydra_output_subdir, replace=True)
    OmegaConf.register_new_resolver("diffrun.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("diffrun.seed_parity", seed_parity, replace=True)


# Python types a constructor argument may declare, and the config values that fit them. Group configs
# (weighting, schedule, ...) are free-form for the schema, so without this `dual_sampling=maybe` would
# reach `bool("maybe")` and train silently with True.
_SCALAR_TYPES: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def check_argument_types(spec: dict, where: str) -> None:
    """Each key of an instantiate spec against the scalar type its `_target_` declares for it (bool, int,
    float, str, optionally None); other annotations are left to the constructor. Nested specs too."""
    import types
    import typing

    from hydra.utils import get_object

    try:
        target = get_object(spec["_target_"])
        hints = typing.get_type_hints(target.__init__ if isinstance(target, type) else target)
    except Exception:  # no target, not importable, or annotations that do not resolve: nothing to check
        return
    for key, value in spec.items():
        if isinstance(value, dict) and "_target_" in value:
            check_argument_types(value, f"{where}.{key}")
            continue
        hint = hints.get(key)
        if hint is None or key.startswith("_"):
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        arms = typing.get_args(hint) if union else (hint,)
        kinds = [a for a in arms if a is not type(None)]
        if len(kinds) != 1 or kinds[0] not in _SCALAR_TYPES or (value is None and type(None) in arms):
            continue
        kind = kinds[0]
        if not isinstance(value, _SCALAR_TYPES[kind]) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key}={value!r}: expected {kind.__name__}"
                              f"{' (true or false)' if kind is bool else ''}{' or null' if type(None) in arms else ''}")


def option(value: Any) -> str:
    """A config option as the string a user typed: typed config nodes hand over enum members
    (`Precision.fp16`), plain ones the string itself."""
    return value.value if isinstance(value, Enum) else str(value)


def show(value: Any) -> str:
    """A config value as a user would type it after `key=` (strings quoted, so '' is visible)."""
    return repr(value) if isinstance(value, str) else str(value)


def spec_values(spec: dict, where: str) -> str:
    """`where.key=value, ...` for the arguments of an instantiate spec (what an error message should show)."""
    items = []
    for key, value in spec.items():
        if key.startswith("_") or key in META_KEYS:
            continue
        if isinstance(value, dict) and "_target_" in value:
            value = value["_target_"]
        items.append(f"{where}.{key}={show(value)}")
    return ", ".join(items)


def build_spec(spec: Any, where: str, **kwargs: Any) -> Any:
    """Hydra `instantiate` of a resolved spec whose config key is `where`, after checking the scalar argument
    types its target declares. Any error comes out as a DiffrunError naming `where` and the values given."""
    if isinstance(spec, dict):
        check_argument_types(spec, where)
    try:
        return instantiate(spec, **kwargs)
    except DiffrunError:
        raise
    except Exception as exc:  # Hydra wraps constructor errors; unwrap ours so the message stays clean
        cause, root, imports = exc.__cause__ or exc.__context__, exc, None
        while cause is not None:
            if isinstance(cause, DiffrunError):
                raise cause from None
            if isinstance(cause, ImportError) and imports is None:
                imports = cause
            root, cause = cause, cause.__cause__ or cause.__context__
        target = spec.get("_target_", where) if isinstance(spec, dict) else where
        if imports is not None:   # a user's plugin that Python cannot find, not a bad value
            module = getattr(imports, "name", None) or str(target).rpartition(".")[0]
            raise ConfigError(f"{where}._target_={target}: module {module} cannot be imported "
                              f"({type(imports).__name__}: {' '.join(str(imports).split())[:200]}); put the folder "
                              f"that holds it on PYTHONPATH (PYTHONPATH=. diffrun -cd <your config folder> ...) "
                              f"or install it") from exc
        values = spec_values(spec, where) if isinstance(spec, dict) else ""
        reason = " ".join(f"{type(root).__name__}: {root}".split())
        raise ConfigError(f"{where} cannot be built ({target} with {values or 'no arguments'}): {reason}; "
                          f"check the {where}.* values") from exc


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Hydra `instantiate` of a group node, without the descriptive keys (name, citation, ...), after
    checking the scalar argument types its target declares."""
    spec = OmegaConf.to_container(node, resolve=True)
    meta_ok = kwargs.pop("_keep_meta", ())
    for key in META_KEYS:
        if key not in meta_ok:
            spec.pop(key, None)
    where = node._get_full_key(None) or (str(spec.get("_target_", "config")) if isinstance(spec, dict) else "config")
    return build_spec(spec, where, **kwargs)


def validate(cfg: DictConfig, environment: bool = True) -> None:
    """Every check of a run's config before any work (diffrun/validation.py, then the constructors of the
    `callbacks` it names): raises a one-line ConfigError
    naming the key, the value and what is allowed. `environment=False` skips the checks of this machine
    (devices, backends, paths), for a sweep checked where it is submitted rather than where it runs."""
    from diffrun.training.callbacks import build_callbacks
    from diffrun.validation import validate_run

    validate_run(cfg, environment=environment)
    build_callbacks(cfg)   # each callback checks its own node's settings (`~callbacks.wandb`: no wandb.* check)
