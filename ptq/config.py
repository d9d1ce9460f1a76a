"""Structured configs: the schema every Hydra run is validated against.

The dataclasses are registered in Hydra's ConfigStore as ``ptq_schema`` (the
root) and as ``<group>_schema`` nodes, which every option of a group extends
(``- /<group>_schema@_here_``). They sit outside the groups, so a misspelt
choice's "Available options" list shows only real choices. ``conf/config.yaml`` extends the root
schema, so an unknown key or a wrong type fails while composing, before any
model or data is touched. Value ranges (``wbits=0``, ``momentum=2``...) are
checked by :func:`validate`, called first thing in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """A configuration value is impossible; the message is one line naming key and allowed values."""


@dataclass
class ModelConfig:
    """Which network is quantized. ``weights_path`` loads a local state dict instead of the default."""

    name: str = "tiny_digits"
    weights: str | None = None  # torchvision weights enum name (IMAGENET1K_V1) or a timm pretrained tag (fb_in1k)
    weights_path: str | None = None
    pretrained: bool = True  # False: random init (tests of the ImageNet path)


@dataclass
class DataConfig:
    """Evaluation and calibration data. ``eval_images=null`` evaluates the whole split."""

    name: str = "digits"
    root: str | None = None
    eval_images: int | None = None
    batch_size: int = 128
    num_workers: int = 0
    image_size: int = 24


@dataclass
class WQuantConfig:
    """Weight quantizer: ``none``, ``absmax`` (per-channel, nearest), ``adaround`` or ``gptq``."""

    name: str = "absmax"


@dataclass
class AQuantConfig:
    """Activation quantizer: ``none`` (A32), or per tensor with its step from ``movavg`` (moving-average
    absmax), ``mse`` (the clipping with least quantization error) or ``percentile`` (clip at a percentile)."""

    name: str = "movavg"
    momentum: float = 0.95
    calib_images: int = 2048
    calib_batch_size: int = 128
    quant_io: bool = True  # input-image and final-LayerNorm-output quantizers (seed left them out)
    percentile: float = 99.99  # aquant=percentile: clip |x| here (percent of calibration values)
    search_grid: int = 100  # aquant=mse: clipping candidates max|x| * k / grid, k = 1..grid
    ln_reparam: bool = False  # fold per-channel LN-output factors into LN affine + next linear (quant.reparam)
    ln_reparam_alpha: float = 1.0  # strength: factors (absmax_c / mean) ** alpha
    kernel_in_bits: int | None = None  # Softmax / GELU input width (null: abits); matmul operands stay abits
    image_bits: int | None = None  # the input image's width (null: abits); 8: PTQ4ViT's convention, the image is 8-bit data
    probs: str = "uniform"  # Softmax output codes: uniform, log2, logsqrt2, twin (docs/act-quantizers.md)
    gelu_out: str = "uniform"  # GELU output codes: uniform, twin
    scores: str = "uniform"  # Softmax input codes (the attention scores): uniform, twin


@dataclass
class SoftmaxConfig:
    n: int = 15
    out_bits: int = 8
    log2: bool = False  # ivit: probabilities as powers of two (4-bit codes) from a 16-bit Shiftmax


@dataclass
class GeluConfig:
    n: int = 23
    sig_bits: int = 8


@dataclass
class NonlinearConfig:
    """Backend of Softmax, GELU and LayerNorm: ``fp`` (float) or ``ivit`` (integer kernels)."""

    name: str = "fp"
    softmax: SoftmaxConfig = field(default_factory=SoftmaxConfig)
    gelu: GeluConfig = field(default_factory=GeluConfig)
    idadd_bits: int = 16
    audit: bool = False  # record largest |integer| per quantized tensor; fail on overflow


@dataclass
class GranularityConfig:
    """AdaRound reconstruction unit: ``layer``, ``block``, ``encoder`` or ``model``."""

    name: str = "layer"


@dataclass
class AdaRoundConfig:
    """AdaRound hyperparameters (defaults: the original experiments, see spec/adaround.md)."""

    lr: float = 1e-2
    iters: int = 10000
    batch_size: int = 32
    calib_images: int = 1024
    reg_weight: float = 1.0
    warmup: float = 0.05
    beta_start: float = 20.0
    beta_end: float = 2.0
    early_stop: float = 1e-5
    resume: bool = True  # continue after the last finished unit of an interrupted identical run
    compile: bool = True  # torch.compile the unit's loss (the ivit kernels are opaque ops inside it)
    qdrop_prob: float = 0.0  # QDrop: per iteration, each activation element keeps its float value with this probability
    loss: str = "mse"  # reconstruction loss: mse, or fisher (output error weighted by squared task-loss gradients)
    init: str = "float"  # V's start: float (h(V) = frac(W/s), the spec) or gptq (GPTQ's compensated weights; gptq.*)


@dataclass
class GPTQConfig:
    """GPTQ (Frantar et al., 2023) on the absmax grid, one linear at a time in forward order (docs/gptq.md)."""

    damp: float = 0.01  # damping added to the Hessian diagonal, relative to its mean
    block_size: int = 128  # columns per lazy-update block
    calib_images: int = 1024  # calibration images the Hessians X^T X are accumulated over
    act_order: bool = False  # quantize columns in decreasing order of diag(H)


@dataclass
class LSQConfig:
    enabled: bool = True
    lr: float = 4e-5


@dataclass
class SensitivityConfig:
    """``python -m ptq.sensitivity``: which quantizer groups cost the accuracy (float / 8-bit one at a time)."""

    eval_images: int = 512  # fixed eval subset every variant is measured on
    high_bits: int = 8  # the width a group is raised to
    plot: str | None = None  # also write the bar chart here (e.g. docs/sensitivity_w4a4_best.png)
    run: str | None = None  # a finished run dir: scan its reconstructed model (quant_state.pt), groups left float only


@dataclass
class TrackingConfig:
    """Weights & Biases settings; ``mode`` defaults to $WANDB_MODE or offline."""

    mode: str = "${oc.env:WANDB_MODE,offline}"
    project: str = "ptq"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    init_timeout: float = 30.0
    finish_timeout: float = 60.0


@dataclass
class Config:
    """Root config of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wquant: WQuantConfig = field(default_factory=WQuantConfig)
    aquant: AQuantConfig = field(default_factory=AQuantConfig)
    nonlinear: NonlinearConfig = field(default_factory=NonlinearConfig)
    granularity: GranularityConfig = field(default_factory=GranularityConfig)
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    lsq: LSQConfig = field(default_factory=LSQConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    wbits: int = 8
    abits: int = 8
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU intra-op threads; null: torch's default (one per core)
    cache_dir: str | None = "outputs/.cache"  # null: no stage cache
    sweep_name: str | None = None  # set by the named sweeps in sweeps/
    export: bool = False
    export_qdq: bool = False  # also write the run's model as a QDQ ONNX model and measure it (ptq.intexec.qdq)
    debug_name: str | None = None


#: timm checkpoints ``model=<name>`` loads (``timm.create_model``), ImageNet-1k classifiers.
TIMM_MODELS: tuple[str, ...] = (
    "vit_small_patch16_224", "vit_base_patch16_224",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
)

#: Every ``model.name``, with the data set it is evaluated on (the embedded models: the digits).
MODELS: dict[str, str] = {
    "tiny_digits": "digits", "tiny_deit_digits": "digits", "tiny_swin_digits": "digits", "vit_b_16": "imagenet",
    **dict.fromkeys(TIMM_MODELS, "imagenet"),
}

#: The activation roles whose codes are a choice (docs/act-quantizers.md): aquant.<role>.
CODED_ROLES = ("probs", "gelu_out", "scores")

CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": tuple(MODELS),
    "data.name": ("digits", "imagenet"),
    "wquant.name": ("none", "absmax", "adaround", "gptq"),
    "aquant.name": ("none", "movavg", "mse", "percentile"),
    "nonlinear.name": ("fp", "ivit"),
    "granularity.name": ("layer", "block", "encoder", "model"),
    "device": ("auto", "cpu", "cuda"),
    "tracking.mode": ("online", "offline", "disabled"),
    "adaround.loss": ("mse", "fisher"),
    "adaround.init": ("float", "gptq"),
    "aquant.probs": ("uniform", "log2", "logsqrt2", "twin"),
    "aquant.gelu_out": ("uniform", "twin"),
    "aquant.scores": ("uniform", "twin"),
}


def register_configs() -> None:
    """Register the schema nodes with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="ptq_schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("wquant", WQuantConfig),
        ("aquant", AQuantConfig),
        ("nonlinear", NonlinearConfig),
        ("granularity", GranularityConfig),
        ("tracking", TrackingConfig),
    ]:
        cs.store(name=f"{group}_schema", node=node)  # not in the group: never offered as a choice


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def unknown_keys(cfg: Any, schema: Any = None, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that the schema does not declare (Hydra lets ``+key=value`` add them)."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.structured(Config) if schema is None else schema
    out = []
    for key in cfg.keys():
        if key not in schema:
            out.append(f"{prefix}{key}")
        elif isinstance(schema[key], DictConfig) and isinstance(cfg[key], DictConfig):
            out += unknown_keys(cfg[key], schema[key], f"{prefix}{key}.")
    return out


def validate(cfg: Any) -> None:
    """Check value ranges and combinations; raise :class:`ConfigError` with one line on the first bad key."""
    extra = unknown_keys(cfg) if hasattr(cfg, "keys") else []
    if extra:
        raise ConfigError(f"unknown config key(s) {', '.join(extra)}; see `python -m ptq.main --help` for the allowed keys")
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name={cfg.model.name!r} is not a supported model; supported: {', '.join(MODELS)}. "
                          "Pick one with model=<name> (conf/model/), or load your own weights of one of them "
                          "with model.weights_path=FILE")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")

    def check(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not allowed; allowed: {allowed}")

    check("wbits", 2 <= cfg.wbits <= 8, "an integer from 2 to 8")
    check("abits", 2 <= cfg.abits <= 16, "an integer from 2 to 16")
    check("aquant.momentum", 0.0 <= cfg.aquant.momentum < 1.0, "a number in [0, 1)")
    check("aquant.calib_images", cfg.aquant.calib_images >= 1, "a positive number of images")
    check("aquant.calib_batch_size", cfg.aquant.calib_batch_size >= 1, "a positive batch size")
    check("data.batch_size", cfg.data.batch_size >= 1, "a positive batch size")
    check("data.num_workers", cfg.data.num_workers >= 0, "zero or more workers")
    check("data.eval_images", cfg.data.eval_images is None or cfg.data.eval_images >= 1,
          "null (the whole split) or a positive number of images")
    check("nonlinear.softmax.n", 1 <= cfg.nonlinear.softmax.n <= 30, "an integer from 1 to 30")
    check("nonlinear.softmax.out_bits", 2 <= cfg.nonlinear.softmax.out_bits <= 16, "an integer from 2 to 16")
    check("nonlinear.gelu.n", 1 <= cfg.nonlinear.gelu.n <= 30, "an integer from 1 to 30")
    check("nonlinear.gelu.sig_bits", 2 <= cfg.nonlinear.gelu.sig_bits <= 16, "an integer from 2 to 16")
    check("nonlinear.idadd_bits", 8 <= cfg.nonlinear.idadd_bits <= 24, "an integer from 8 to 24")
    ada = cfg.adaround
    check("adaround.lr", ada.lr > 0, "a positive learning rate")
    check("adaround.iters", ada.iters >= 1, "a positive number of iterations")
    check("adaround.batch_size", ada.batch_size >= 1, "a positive batch size")
    check("adaround.calib_images", ada.calib_images >= 1, "a positive number of images")
    check("adaround.reg_weight", ada.reg_weight >= 0, "a non-negative weight")
    check("adaround.warmup", 0.0 <= ada.warmup < 1.0, "a fraction in [0, 1)")
    check("adaround.beta_start", ada.beta_start >= ada.beta_end > 0, "beta_start >= beta_end > 0")
    check("adaround.early_stop", ada.early_stop >= 0, "a non-negative threshold")
    check("adaround.qdrop_prob", 0.0 <= ada.qdrop_prob < 1.0, "a probability in [0, 1)")
    check("gptq.damp", cfg.gptq.damp > 0, "a positive damping (fraction of the mean Hessian diagonal)")
    check("gptq.block_size", cfg.gptq.block_size >= 1, "a positive number of columns")
    check("gptq.calib_images", cfg.gptq.calib_images >= 1, "a positive number of images")
    check("lsq.lr", cfg.lsq.lr > 0, "a positive learning rate")
    check("sensitivity.eval_images", cfg.sensitivity.eval_images >= 1, "a positive number of images")
    check("sensitivity.high_bits", 2 <= cfg.sensitivity.high_bits <= 16, "an integer from 2 to 16")
    check("aquant.percentile", 50.0 < cfg.aquant.percentile <= 100.0, "a percentile in (50, 100]")
    check("aquant.search_grid", cfg.aquant.search_grid >= 2, "at least 2 clipping candidates")
    check("aquant.ln_reparam_alpha", 0.0 < cfg.aquant.ln_reparam_alpha <= 1.0, "a strength in (0, 1]")
    check("aquant.kernel_in_bits", cfg.aquant.kernel_in_bits is None or 2 <= cfg.aquant.kernel_in_bits <= 16,
          "null (= abits) or an integer from 2 to 16")
    check("aquant.image_bits", cfg.aquant.image_bits is None or 2 <= cfg.aquant.image_bits <= 16,
          "null (= abits) or an integer from 2 to 16")
    if cfg.aquant.ln_reparam and cfg.aquant.name == "none":
        raise ConfigError("aquant.ln_reparam=true reparameterises activation quantization: it needs aquant="
                          "movavg, mse or percentile (got aquant=none)")
    if cfg.nonlinear.softmax.log2 and cfg.nonlinear.name != "ivit":
        raise ConfigError("nonlinear.softmax.log2=true is an integer Softmax kernel: it needs nonlinear=ivit "
                          f"(got nonlinear={cfg.nonlinear.name})")
    if cfg.nonlinear.softmax.log2 and cfg.aquant.probs not in ("uniform", "log2"):
        raise ConfigError(f"aquant.probs={cfg.aquant.probs} conflicts with nonlinear.softmax.log2=true (log2 codes); "
                          "allowed with it: uniform, log2")
    coded = [f"aquant.{k}={cfg.aquant[k]}" for k in CODED_ROLES if cfg.aquant[k] != "uniform"]
    if coded and cfg.export_qdq:
        raise ConfigError(f"export_qdq=true has no QDQ ops for {', '.join(coded)}; allowed with export_qdq: "
                          + ", ".join(f"aquant.{k}=uniform" for k in CODED_ROLES))
    check("threads", cfg.threads is None or cfg.threads >= 1, "null (automatic) or a positive number of threads")
    if cfg.nonlinear.name == "ivit" and (cfg.aquant.name == "none" or cfg.wquant.name == "none"):
        raise ConfigError(
            "nonlinear=ivit needs integer tensors: use it with an activation quantizer and a weight quantizer "
            f"(got wquant={cfg.wquant.name}, aquant={cfg.aquant.name})"
        )
    if MODELS[cfg.model.name] != cfg.data.name:
        raise ConfigError(f"model={cfg.model.name} needs data={MODELS[cfg.model.name]} (got data={cfg.data.name})")



def uses_gptq_start(cfg: Any) -> bool:
    """AdaRound starting from GPTQ's compensated weights (``adaround.init=gptq``)."""
    return cfg.wquant.name == "adaround" and cfg.adaround.init == "gptq"


#: (key prefixes, when they do nothing, why) for :func:`no_effect`
_INERT: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (("granularity", "adaround.", "lsq."), lambda c: c.wquant.name != "adaround",
     "they apply only to wquant=adaround (got wquant={wquant})"),
    (("gptq.",), lambda c: c.wquant.name != "gptq" and not uses_gptq_start(c),
     "they apply only to wquant=gptq or adaround.init=gptq (got wquant={wquant})"),
    (("gptq.calib_images",), uses_gptq_start, "AdaRound's GPTQ start uses adaround.calib_images"),
    (("wbits",), lambda c: c.wquant.name == "none", "weights stay float with wquant=none"),
    (("abits", "aquant.", "lsq."), lambda c: c.aquant.name == "none",
     "activations stay float with aquant=none"),
    (("aquant.percentile",), lambda c: c.aquant.name != "percentile", "it applies only to aquant=percentile"),
    (("aquant.search_grid",), lambda c: c.aquant.name != "mse", "it applies only to aquant=mse"),
    (("aquant.ln_reparam_alpha",), lambda c: not c.aquant.ln_reparam, "it applies only with aquant.ln_reparam=true"),
    (("aquant.probs",), lambda c: c.nonlinear.softmax.log2 and c.aquant.probs == "log2",
     "nonlinear.softmax.log2=true gives log2 probabilities already"),
    (("aquant.kernel_in_bits",), lambda c: c.aquant.kernel_in_bits == c.abits,
     "the Softmax / GELU inputs are A{abits} already"),
    (("aquant.image_bits",), lambda c: c.aquant.image_bits == c.abits, "the input image is A{abits} already"),
    (("aquant.image_bits",), lambda c: not c.aquant.quant_io, "aquant.quant_io=false leaves the image float"),
    (("nonlinear.softmax.", "nonlinear.gelu.", "nonlinear.idadd_bits"), lambda c: c.nonlinear.name == "fp",
     "they set the integer kernels of nonlinear=ivit (got nonlinear=fp)"),
)


def override_key(override: str) -> str:
    """``+a.b=1`` / ``~a.b`` / ``a.b=1`` -> ``a.b``."""
    return override.lstrip("+~").split("=", 1)[0]


def no_effect(cfg: Any, overrides: list[str]) -> list[str]:
    """One warning line per reason for the given command-line overrides that change nothing in this config.

    E.g. ``granularity=block`` with ``wquant=absmax``: the run is the same as without it.
    """
    keys = [override_key(o) for o in overrides]
    lines = []
    for prefixes, inert, why in _INERT:
        if not inert(cfg):
            continue
        hit = [o for o, k in zip(overrides, keys, strict=True)
               if any(k == p.rstrip(".") or (p.endswith(".") and k.startswith(p)) for p in prefixes)]
        if hit:
            lines.append(f"{', '.join(hit)}: no effect, {why.format(wquant=cfg.wquant.name, abits=cfg.abits)}")
    return lines
