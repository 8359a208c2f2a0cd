"""The run's configuration schema (Hydra ConfigStore): every key, its type, its default, the numbers it allows
and whether it changes what is trained.

Types and enumerations are checked by OmegaConf when Hydra composes the config, so `train.steps=abc` or
`precision=fp8` fail before any work with the key and the allowed values. The ranges declared here
(`setting(default, allowed)`) are checked by diffrun/validation.py; the keys declared `trained=False` are left
out of the run fingerprint (diffrun/fingerprint.py), so a key that only changes how long, how visibly or where
a run trains is marked where it is declared. Group options (`dataset`, `model`, `optimizer`) declare the keys
diffrun reads of them in `DatasetNode`, `ModelNode` and `OptimizerNode`; the rest of a group option is the
constructor arguments of its `_target_`s, checked against their signatures (diffrun/building.py). A plugin marks
an argument that does not change what is trained with `Annotated[<type>, NOT_TRAINED]`.

One file over ~350 lines on purpose: the schema is read as one table, top to bottom, like a paper's.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from diffrun.checks import FINITE, FRACTION, NON_NEGATIVE, POSITIVE, SEED, Interval
from diffrun.errors import ConfigError

PROSE_KEYS = ("citation", "paper", "notes")        # prose of a group option: never built, never in the fingerprint
META_KEYS = ("name", *PROSE_KEYS)                   # what describes a group option rather than configures it


class NotTrained:
    """`Annotated[<type>, NOT_TRAINED]` on a plugin's argument: the argument changes how data is read or where
    outputs go, not what is trained (e.g. a dataset's folder), so the run fingerprint leaves it out."""

    def __repr__(self) -> str:
        return "NOT_TRAINED"


NOT_TRAINED = NotTrained()


def setting(default: Any = MISSING, allowed: Interval | None = None, trained: bool = True, *,
            factory: Any = MISSING) -> Any:
    """A schema field with the numbers it allows (checked by diffrun/validation.py) and whether it changes what is
    trained (`trained=False`: the run fingerprint leaves it out)."""
    return field(default=default, default_factory=factory, metadata={"allowed": allowed, "trained": trained})


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
    # optimizer steps (with `kimg`: ${diffrun.kimg_to_steps:${train.kimg},${train.batch_size}})
    steps: int = setting(600, POSITIVE, trained=False)
    # budget in thousands of training images (EDM's unit); set, it decides the length: steps = ⌈kimg·1000 /
    # batch_size⌉, and a train.steps that disagrees is refused
    kimg: Optional[float] = setting(None, Interval(0, low_open=True, note="or null: the budget is train.steps"),
                                    trained=False)
    batch_size: int = setting(64, POSITIVE)  # global batch (split across ranks under DDP)
    log_every: int = setting(50, POSITIVE, trained=False)  # host reads metrics / NaN counters only every N steps
    grad_clip: float = setting(1.0, Interval(0, note="0 disables clipping"))  # max global grad-norm; 0 disables
    compile: bool = setting(False, trained=False)  # torch.compile the denoiser
    # compile: the whole step (sampling … optimizer, EMA, bookkeeping) as one graph
    capture: Capture = setting(Capture.none, trained=False)
    channels_last: bool = setting(False, trained=False)  # memory format (helps convolutions on CUDA)
    nan_policy: NanPolicy = setting(NanPolicy.skip, trained=False)
    # halt anyway if more than this fraction of steps were non-finite
    max_skipped_fraction: float = setting(0.1, FRACTION, trained=False)
    progress: bool = setting(True, trained=False)  # tqdm progress bar
    # class-conditional models: P(label → null label), for classifier-free guidance; 0 unless the recipe trains for
    # guidance (DiT 0.1, Min-SNR 0.15; EDM 0)
    label_dropout: float = setting(0.0, FRACTION)
    tf32: Optional[bool] = None       # CUDA TF32: null keeps PyTorch's defaults (cuDNN convolutions on, matmuls off);
                                      # false turns both off (EDM training_loop.py), true both on


@dataclass
class EMAConfig:
    """Either a decay per step (`decay`, DDPM's 0.9999) or a half-life in images (`halflife_kimg`, EDM's 500 kimg)."""
    # EMA decay per step; null with halflife_kimg
    decay: Optional[float] = setting(0.999, Interval(0, 1, high_open=True, note="or null with ema.halflife_kimg"))
    warmup: bool = True               # decay_n = min(decay, (1+n)/(10+n)) (Tarvainen & Valpola 2017 style); per-step decay only
    # EDM: β = 0.5^(batch / half-life), the half-life in thousands of images
    halflife_kimg: Optional[float] = setting(None, Interval(0, low_open=True,
                                                            note="or null: a decay per step (ema.decay)"))
    # EDM: half-life ≤ ratio × images seen (0.05); null: no ramp-up
    rampup_ratio: Optional[float] = setting(None, Interval(0, low_open=True,
                                                           note="or null: no ramp-up of the half-life"))


MULTIPLIER = Interval(0, note="probability multiplier; 0: transform off")


@dataclass
class AugmentConfig:
    """EDM's non-leaking augmentation (diffrun/data/augment.py; NVlabs/edm train.py's CIFAR-10 values). Each
    transform is applied with probability p × its multiplier and its parameters are given to the network
    (`model.net.augment_dim` = 9 with every transform on)."""
    # overall probability (EDM CIFAR-10: 0.12); 0: no augmentation
    p: float = setting(0.0, Interval(0, 1, note="0: no augmentation; EDM CIFAR-10: 0.12"))
    # probability multipliers (EDM train.py: xflip 1e8, i.e. a flip in 50 % of images)
    xflip: float = setting(1e8, MULTIPLIER)
    yflip: float = setting(1.0, MULTIPLIER)
    scale: float = setting(1.0, MULTIPLIER)
    rotate_frac: float = setting(1.0, MULTIPLIER)
    aniso: float = setting(1.0, MULTIPLIER)
    translate_frac: float = setting(1.0, MULTIPLIER)
    scale_std: float = setting(0.2, NON_NEGATIVE)  # log2 std of isotropic scaling
    rotate_frac_max: float = setting(1.0, NON_NEGATIVE)  # rotation range, 1 = full circle
    aniso_std: float = setting(0.2, NON_NEGATIVE)  # log2 std of anisotropic scaling
    aniso_rotate_prob: float = setting(0.5, FRACTION)  # probability of scaling along a rotated frame
    translate_frac_std: float = setting(0.125, NON_NEGATIVE)  # std of translation, relative to the image size


@dataclass
class SamplerConfig:
    """The sampler keys shared by `sample.*` and `eval.*` (diffrun/sampling, docs/samplers.md)."""
    sampler: SamplerName = SamplerName.ddim
    steps: int = setting(50, POSITIVE)  # number of denoising steps (heun: NFE = 2·steps − 1)
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
    num_images: int = setting(64, Interval(0, note="0: no sample grid"))  # images in the sample grid
    every_steps: int = setting(0, Interval(0, note="0: only at the end"))  # also sample during training every N steps
    seed: int = setting(0, SEED)  # sample seed (grids comparable across runs)


@dataclass
class CheckpointConfig:
    every_steps: int = setting(500, Interval(0, note="0: only at the end"))
    keep: int = setting(3, POSITIVE)  # keep the last K checkpoints
    allow_unverified: bool = False    # load checkpoint files that carry no SHA-256 (other programs, old diffrun)
    allow_pickle: bool = False        # load checkpoints of pickled objects (diffrun's earlier format): they can run
    #                                   code, so only your own files; `diffrun-convert` rewrites them as data


@dataclass
class EvalConfig(SamplerConfig):
    enabled: bool = True
    every_steps: int = setting(0, Interval(0, note="0: only at the end"))  # FID during training every N steps
    num_samples: int = setting(200, POSITIVE)  # generated images per FID; 50,000 for paper numbers (FID-50k)
    # training images as reference; None: all of them, whatever num_samples
    num_reference: Optional[int] = setting(None, Interval(0, low_open=True, note="or null: the whole training set"))
    reference_stats: Optional[str] = None  # FID against this statistics file instead (.npz with mu, sigma: EDM,
    #                                   ADM, TTUR; torch-fidelity's *-stat-fid-2048.pt); no KID then
    # FIDs with different sample seeds; `fid` is their min (EDM), `fid_mean` the mean
    repeats: int = setting(1, Interval(1, note="FID evaluations with different sample seeds"))
    batch_size: int = setting(100, POSITIVE)
    # KID subset size (torch-fidelity's default); bounded by the sample and
    kid_subset_size: int = setting(1000, POSITIVE)
    #                                   reference counts, and the record says so
    seed: int = setting(12345, SEED)  # sample seed for FID (same images across runs and steps)
    inception_weights: Optional[str] = None  # path to torch-fidelity-format Inception weights
    cache_dir: Optional[str] = None   # reference statistics and converted weights (default ~/.cache/diffrun)
    on_unavailable: OnUnavailable = OnUnavailable.skip


class StatsRange(str, Enum):
    fixed = "fixed"        # bins span [stats.logsnr_min, stats.logsnr_max]
    schedule = "schedule"  # bins span the schedule's own λ range [λ(1), λ(0)]


@dataclass
class StatsConfig:
    bins: int = setting(64, POSITIVE)  # log-SNR bins for per-bin loss statistics (λ outside the range → edge bins)
    logsnr_min: float = setting(-20.0, FINITE)
    logsnr_max: float = setting(20.0, FINITE)
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
    plots_every: int = 5  # per-bin line plots and the variance heatmap every N flushes (and the last)
    init_timeout: float = 10.0  # seconds wandb.init may wait for the server before logging offline (docs/wandb.md)


@dataclass
class ReportConfig:
    baseline: str = "uniform"         # strategy the others are compared against
    # the "steps to reach FID ≤ target" column (convergence speed)
    target_fid: Optional[float] = setting(None, Interval(0, low_open=True, note="or null"))


@dataclass
class DistConfig:
    """Data-parallel training (torch DDP); see diffrun/distributed.py and docs/sweeps.md."""
    # ranks this process starts on its machine (1: no DDP); torchrun/srun set their own
    devices: int = setting(1, POSITIVE)
    backend: str = "auto"             # auto: nccl on CUDA, gloo on CPU
    # a collective waiting longer than this fails the run (a rank died or hangs)
    timeout_s: float = setting(1800.0, Interval(0, low_open=True, note="seconds"))
    # steps between the ranks' agreement on a pending signal (a host sync)
    interrupt_check_every: int = setting(10, POSITIVE)


@dataclass
class RunConfig:
    name: str = setting("run", trained=False)
    seed: int = setting(0, SEED)
    device: str = setting("auto", trained=False)  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    deterministic: bool = setting(False, trained=False)  # torch deterministic algorithms (bit-identical resume on CPU)
    # auto | never | force (continue a run whose config changed) | /path/to/ckpt.pt
    resume: str = setting("auto", trained=False)
    sweep_name: str = setting("sweep", trained=False)
    experiment: Optional[str] = setting(None, trained=False)  # name of the conf/experiment preset, if any
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    sample: SampleConfig = setting(factory=SampleConfig, trained=False)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, trained=False)
    eval: EvalConfig = setting(factory=EvalConfig, trained=False)
    stats: StatsConfig = setting(factory=StatsConfig, trained=False)
    wandb: WandbConfig = setting(factory=WandbConfig, trained=False)
    report: ReportConfig = setting(factory=ReportConfig, trained=False)
    dist: DistConfig = setting(factory=DistConfig, trained=False)
    dataset: Any = None
    schedule: Any = None
    weighting: Any = None
    model: Any = None
    optimizer: Any = None
    # conf/callbacks: what a run does besides training (diffrun/training/callbacks.py)
    callbacks: Any = setting(None, trained=False)


GROUPS = ("dataset", "schedule", "weighting", "model", "optimizer")


# The keys diffrun reads of a group option itself; a key without default is required. Everything else in an
# option is a constructor argument of one of its `_target_` nodes (schedule and weighting are one themselves),
# or a value such a node interpolates (image_folder's `root: ???`).
@dataclass
class DatasetNode:
    image_size: int = setting(allowed=POSITIVE)
    channels: int = setting()                   # the loader's check says which (1 or 3 for images, 4 for SD latents)
    loader: Any = setting()                     # the loader function's node (diffrun/data/loaders.py)
    name: str = ""
    num_classes: int = setting(0, Interval(0, note="0: unconditional"))
    placement: str = "auto"                     # diffrun/data/placement.py
    order: str = "auto"
    workers: int = setting(4, Interval(0, note="0: read in the training process"), trained=False)
    # the folder, for the options whose loader reads it (`root: ${..root}`); elsewhere nothing reads it
    root: Optional[str] = field(default=None, metadata={"trained": False, "only_if_interpolated": True})


@dataclass
class ModelNode:
    net: Any = setting()                        # the network's node
    prediction: str = setting()                 # diffrun/models/parameterization.py PREDICTIONS
    name: str = ""
    sigma_data: float = setting(0.5, POSITIVE)
    learn_sigma: bool = False                   # IDDPM's learned variance (diffrun/models/learned_variance.py)
    init_from: Optional[str] = None             # weights to start from (diffrun-export's .safetensors)


@dataclass
class OptimizerNode:
    optim: Any = setting()                      # torch.optim's node, `_partial_: true`
    name: str = ""
    warmup_steps: int = setting(0, Interval(0, note="linear warm-up steps; 0: none"))
    warmup_kimg: float = setting(0.0, Interval(0, note="learning-rate ramp in thousands of images (EDM: 10000); "
                                                        "0: none"))
    decay: str = "constant"                     # diffrun/training/optim.py
    min_lr_ratio: float = setting(0.0, FRACTION)
    no_decay_norms_biases_embeddings: bool = False


GROUP_NODES = {"dataset": DatasetNode, "model": ModelNode, "optimizer": OptimizerNode}


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


def option(value: Any) -> str:
    """A config option as the string a user typed: typed config nodes hand over enum members
    (`Precision.fp16`), plain ones the string itself."""
    return value.value if isinstance(value, Enum) else str(value)


def declared_ranges(schema: type = RunConfig, prefix: str = ""):
    """(dotted key, Interval, integer) of every field the schema and the group node declarations give a range."""
    for item in fields(schema):
        if item.metadata.get("allowed") is not None:
            yield prefix + item.name, item.metadata["allowed"], item.type in (int, "int")
        if is_dataclass(item.default_factory):
            yield from declared_ranges(item.default_factory, f"{prefix}{item.name}.")
    if schema is RunConfig:
        for group, node in GROUP_NODES.items():
            yield from declared_ranges(node, f"{group}.")


def check_budget(train: Any) -> None:
    """One budget: with train.kimg set, train.steps must be the steps it gives (presets write
    `steps: ${diffrun.kimg_to_steps:${train.kimg},${train.batch_size}}`)."""
    kimg = train.kimg
    steps = None if kimg is None else kimg_to_steps(kimg, train.batch_size)
    if steps is not None and train.steps != steps:
        raise ConfigError(f"train.steps={train.steps} disagrees with train.kimg={kimg} (at train.batch_size="
                          f"{train.batch_size} that is ⌈kimg·1000 / batch⌉ = {steps} steps): give one budget, "
                          f"train.kimg=null with train.steps=<N>, or train.kimg=<K> with train.steps following it "
                          f"(as the presets that count in images do; elsewhere add "
                          f"train.steps='${{diffrun.kimg_to_steps:${{train.kimg}},${{train.batch_size}}}}')")
