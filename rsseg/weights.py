"""Initial (pre-trained) weights: which file each paper configuration starts from, and where
rsseg looks for it.

Every paper in rsseg trains from ImageNet weights, and their published numbers assume it. This
module is the one catalogue of those files (:data:`CATALOGUE`) and the one place that turns a
weights name into a local file (:func:`resolve_weights`). Training never downloads anything on
its own: a file is looked for, in order,

1. in the weights store: ``$RSSEG_WEIGHTS``, default ``~/.cache/rsseg/weights``, under any of the
   entry's accepted file names (rsseg's name, or the file name the authors publish);
2. in the Hugging Face cache (``huggingface_hub``'s, as timm fills it) for entries hosted there;
3. in torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``), where timm and
   torchvision put files fetched from the authors' own URLs.

``rsseg weights --download NAME`` fetches an entry that is hosted on the Hugging Face hub into
the cache when the machine is online. Absent weights stop a run before any work, with one line
saying which file, where to put it and where to get it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsseg.errors import DataError, UsageError, unknown_name

WEIGHTS_ENV = "RSSEG_WEIGHTS"


class WeightsMissingError(DataError):
    """A run needs an initial-weights file that is not on this machine."""


@dataclass(frozen=True)
class WeightsEntry:
    """One released weights file and the rsseg models that start from it."""

    name: str  # the name configs use (timm's name where timm knows the weights)
    description: str
    models: tuple[str, ...]  # rsseg models (with model options) that can start from it
    source: str  # where the authors publish it
    files: tuple[str, ...]  # accepted file names in the store; the first is rsseg's own
    hf_repo: str | None = None  # Hugging Face repository holding it, if any
    hf_file: str | None = None
    # Checksum the publisher gives: torch hub file names end in the first 8 hex digits of the
    # file's SHA-256 (torchvision, Facebook's releases). None: the source publishes none.
    sha256_prefix: str | None = None
    # Model options these weights imply (MAFMamba's Table 6 backbones).
    model_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def hf_url(self) -> str | None:
        if not self.hf_repo:
            return None
        return f"https://huggingface.co/{self.hf_repo}/blob/main/{self.hf_file}"


def _timm_entry(name: str, description: str, models: tuple[str, ...], original_url: str,
                sha256_prefix: str | None = None, **model_cfg: Any) -> WeightsEntry:
    """An entry timm hosts as ``timm/<name>`` (model.safetensors), first released at ``original_url``."""
    return WeightsEntry(
        name=name, description=description, models=models,
        source=f"https://huggingface.co/timm/{name} (first released at {original_url})",
        files=(f"{name}.safetensors", original_url.rsplit("/", 1)[-1]),
        hf_repo=f"timm/{name}", hf_file="model.safetensors",
        sha256_prefix=sha256_prefix, model_cfg=dict(model_cfg),
    )  # fmt: skip


_A2MAMBA_HF = "LMMM2025/A2Mamba"
_RMT_SOURCE = "RMT release (github.com/qhfan/RMT README, Baidu Netdisk links with their codes)"

CATALOGUE: dict[str, WeightsEntry] = {
    entry.name: entry
    for entry in (
        # MAFMamba section 2.1: an ImageNet-pre-trained ResNet-18 encoder. GeoSeg, whose protocol
        # the paper follows (3.1), builds every ResNet-18 model on timm's swsl_resnet18.
        _timm_entry(
            "resnet18.fb_swsl_ig1b_ft_in1k",
            "ResNet-18, semi-weakly supervised on IG-1B, fine-tuned on ImageNet-1k (GeoSeg's swsl_resnet18)",
            ("mafmamba", "mafmamba-tiny"),
            "https://dl.fbaipublicfiles.com/semiweaksupervision/model_files/semi_weakly_supervised_resnet18-118f1556.pth",
            "118f1556",
        ),
        _timm_entry(
            "resnet50.fb_swsl_ig1b_ft_in1k",
            "ResNet-50, IG-1B + ImageNet-1k (MAFMamba Table 6 backbone)",
            ("mafmamba backbone=resnet50",),
            "https://dl.fbaipublicfiles.com/semiweaksupervision/model_files/semi_weakly_supervised_resnet50-16a12f1b.pth",
            "16a12f1b",
            backbone="resnet50",
        ),
        _timm_entry(
            "swin_tiny_patch4_window7_224.ms_in1k",
            "Swin-T, ImageNet-1k (MAFMamba Table 6 backbone)",
            ("mafmamba backbone=swin_t",),
            "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth",
            backbone="swin_t",
        ),
        _timm_entry(
            "resnet18.tv_in1k",
            "ResNet-18, ImageNet-1k (torchvision; smp's 'imagenet' encoder)",
            ("unet-r18", "deeplabv3plus-r18", "fpn-r18", "mafmamba"),
            "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            "f37072fd",
        ),
        _timm_entry(
            "resnet50.tv_in1k",
            "ResNet-50, ImageNet-1k (torchvision V1; smp's 'imagenet' encoder)",
            ("unet-r50", "deeplabv3plus-r50", "fpn-r50"),
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "0676ba61",
        ),
        # Reload-Mamba section 4.1: ConvNeXt-Tiny initialised with ImageNet-1K weights.
        _timm_entry(
            "convnext_tiny.fb_in1k",
            "ConvNeXt-T, ImageNet-1k (Reload-Mamba section 4.1)",
            ("reload-mamba",),
            "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth",
        ),
        *(
            WeightsEntry(
                name=f"a2mamba-{size[0]}.in1k",
                description=f"A2Mamba-{size.capitalize()}, ImageNet-1k (the authors' release)",
                models=(f"segman-v2-{size[0]}",),
                source=f"https://huggingface.co/{_A2MAMBA_HF} (a2mamba_pretrained_weights/a2mamba_{size}.pth)",
                files=(f"a2mamba_{size}.pth",),
                hf_repo=_A2MAMBA_HF,
                hf_file=f"a2mamba_pretrained_weights/a2mamba_{size}.pth",
            )
            for size in ("nano", "tiny", "small", "base", "large")
        ),
        *(
            WeightsEntry(
                name=f"rmt-{size}.in1k",
                description=f"RMT-{size.upper()}, ImageNet-1k (the authors' release; RMT-B is their 'M2')",
                models=(f"segret-{size}",),
                source=_RMT_SOURCE,
                files=(f"rmt_{size}.pth", f"RMT-{size.upper()}.pth"),
            )
            for size in ("t", "s", "b", "l")
        ),
    )
}

# The weights each paper model's configs start from when they say ``pretrained: auto``.
# MAFMamba's Table 6 backbones pick theirs by the ``backbone`` model option.
_PAPER_DEFAULTS: dict[str, str] = {
    "mafmamba": "resnet18.fb_swsl_ig1b_ft_in1k",
    "mafmamba-tiny": "resnet18.fb_swsl_ig1b_ft_in1k",
    "reload-mamba": "convnext_tiny.fb_in1k",
    **{f"segman-v2-{s}": f"a2mamba-{s}.in1k" for s in "ntsbl"},
    **{f"segret-{s}": f"rmt-{s}.in1k" for s in "tsbl"},
}
_MAFMAMBA_BACKBONES = {
    "resnet18": "resnet18.fb_swsl_ig1b_ft_in1k",
    "resnet50": "resnet50.fb_swsl_ig1b_ft_in1k",
    "swin_t": "swin_tiny_patch4_window7_224.ms_in1k",
}
# The keyword each model family's builder takes a local weights file under.
_BASELINE_PREFIXES = ("unet-", "deeplabv3plus-", "fpn-")


def weights_dir() -> Path:
    """The weights store: ``$RSSEG_WEIGHTS``, default ``~/.cache/rsseg/weights``."""
    return Path(os.environ.get(WEIGHTS_ENV) or Path.home() / ".cache" / "rsseg" / "weights").expanduser()


def is_paper_model(model: str) -> bool:
    """Whether ``model`` is one of the paper models whose numbers assume pre-trained weights."""
    return model in _PAPER_DEFAULTS


def default_weights(model: str, model_cfg: dict[str, Any] | None = None) -> str | None:
    """The catalogue name a paper model starts from (None for models without a paper default)."""
    if model.startswith("mafmamba"):
        backbone = (model_cfg or {}).get("backbone", "resnet18")
        return _MAFMAMBA_BACKBONES.get(backbone)
    return _PAPER_DEFAULTS.get(model)


def weights_keyword(model: str) -> str:
    """The builder keyword that takes a local weights file for ``model``."""
    return "encoder_weights" if model.startswith(_BASELINE_PREFIXES) else "pretrained"


def get_entry(name: str) -> WeightsEntry:
    if name not in CATALOGUE:
        raise unknown_name("weights", name, list(CATALOGUE))
    return CATALOGUE[name]


def _torch_hub_dir() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch"
    return Path(torch_home) / "hub" / "checkpoints"


def _hf_cached(entry: WeightsEntry) -> Path | None:
    if not entry.hf_repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(entry.hf_repo, entry.hf_file)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def find_weights(entry: WeightsEntry) -> Path | None:
    """The local file holding ``entry``, or None (store, then Hugging Face cache, then torch hub)."""
    store = weights_dir()
    for name in entry.files:
        if (store / name).is_file():
            return store / name
    cached = _hf_cached(entry)
    if cached is not None:
        return cached
    hub = _torch_hub_dir()
    for name in entry.files[1:]:  # torch hub keeps the publisher's file name
        if (hub / name).is_file():
            return hub / name
    return None


def missing_message(entry: WeightsEntry, model: str | None = None) -> str:
    """One line: which file is missing, where to put it, where to get it, how to do without."""
    files = entry.files[0] + (f" (or {', '.join(entry.files[1:])})" if len(entry.files) > 1 else "")
    where = f" for {model}" if model else ""
    how = f"`rsseg weights --download {entry.name}` when online, or from {entry.source}" if entry.hf_repo \
        else f"from {entry.source}"
    return (
        f"initial weights {entry.name!r}{where} not found: put {files} into {weights_dir()} "
        f"(get it {how}), or train from scratch with --no-pretrained"
    )


def resolve_weights(name_or_path: str, model: str | None = None) -> tuple[Path, WeightsEntry | None]:
    """A local file for a catalogue name or a path; WeightsMissingError (one line) if absent."""
    if name_or_path in CATALOGUE:
        entry = CATALOGUE[name_or_path]
        found = find_weights(entry)
        if found is None:
            raise WeightsMissingError(missing_message(entry, model))
        return found, entry
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, None
    if path.suffix or os.sep in name_or_path:
        raise WeightsMissingError(f"initial weights file not found: {path}")
    raise unknown_name("weights", name_or_path, list(CATALOGUE))


def download(name: str) -> Path:
    """Fetch a Hugging Face-hosted entry into the Hugging Face cache (needs the network)."""
    entry = get_entry(name)
    if not entry.hf_repo:
        raise UsageError(f"{name} is not on the Hugging Face hub; get it {entry.source}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(entry.hf_repo, entry.hf_file))
    except Exception as exc:  # offline, hub errors: all the user can do is retry or fetch by hand
        raise WeightsMissingError(
            f"could not download {name} from {entry.hf_url} ({type(exc).__name__}); "
            f"{missing_message(entry)}"
        ) from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(entry: WeightsEntry, path: Path) -> str | None:
    """The file's SHA-256; a DataError if the publisher's checksum prefix does not match.

    Only files under the publisher's own name are checked (the prefix belongs to that file;
    timm's safetensors conversions are other bytes).
    """
    digest = sha256_of(path)
    if entry.sha256_prefix and path.name == entry.files[-1] and not digest.startswith(entry.sha256_prefix):
        raise DataError(
            f"{path} is not the published {entry.name}: its SHA-256 starts {digest[:8]}, the "
            f"publisher's file name says {entry.sha256_prefix}"
        )
    return digest
