"""Public CNN definitions (torchvision, timm) with seeded random weights, for benchmarks and tests.

    from _public_models import MODELS, torch_model, export_onnx
    module, inputs = torch_model("convnext_tiny")        # for graphopt.from_torch
    path = export_onnx("convnext_tiny")                    # cached ONNX file, opset 17

Needs the ``bench`` extra (``pip install -e .[bench]``; see README "Public models").
Every model is built from the library's own definition, with weights drawn from a seeded
generator (the libraries' own initialisation), BatchNorm running statistics randomized so
eval-mode BatchNorm is not an identity, and put in eval mode. No weights are downloaded.

torchvision on a CPU-only torch: the registry's torchvision wheel is a CUDA build whose C
extension (``torchvision/_C.so``: nms, roi_align, image decoding) needs torch's CUDA
libraries. torchvision is written to import without that extension (``extension._has_ops()``
is then False and those ops raise a clear error when called), except for two unguarded
``torch.library.register_fake("torchvision::nms" / "::qnms")`` calls in
``torchvision/_meta_registrations.py``, which need the operators' schemas the extension
would have defined. :func:`import_torchvision` first tries to load the extension exactly
as torchvision does; only when that fails does it declare those two schemas (no kernels:
calling nms still raises torchvision's own "Couldn't load custom C++ ops" error). A working
torchvision install is never touched. timm imports torchvision, so it goes through here too.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

__all__ = [
    "MODELS",
    "ISSUE13",
    "ISSUE14",
    "PublicModel",
    "build",
    "cache_dir",
    "export_onnx",
    "import_timm",
    "import_torchvision",
    "missing_extra",
    "torch_model",
]

OPSET = 17
# The schemas torchvision's C extension defines for the ops _meta_registrations.py fakes.
_NMS_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[torch.library.Library] = []  # kept alive: a Library unregisters when collected


def _extension_loads(folder: Path) -> bool:
    """Whether torchvision's ``_C`` extension loads, tried as ``torchvision.extension`` does."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        lib = folder / f"_C{suffix}"
        if lib.exists():
            try:
                torch.ops.load_library(str(lib))
                return True
            except (ImportError, OSError):
                return False
    return False


def import_torchvision() -> ModuleType:
    """``import torchvision``, also where its C extension cannot load (see the module doc)."""
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(missing_extra())
        if not _extension_loads(Path(spec.origin).parent) and not _declared:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _NMS_SCHEMAS:
                lib.define(schema)
            _declared.append(lib)
    import torchvision

    return torchvision


def import_timm() -> ModuleType:
    import_torchvision()
    import timm

    return timm


def missing_extra() -> str:
    """Why the public models cannot be built here, or ``""`` when they can."""
    missing = [m for m in ("torchvision", "timm") if importlib.util.find_spec(m) is None]
    if not missing:
        return ""
    what = " and ".join(missing)
    return f"{what} not installed: pip install -e '.[bench]' (README: Public models)"


# --- the table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicModel:
    """One public model: how to build it and the input shape it is benchmarked at."""

    name: str
    library: str  # "torchvision" or "timm"
    factory: str  # the library's name for it (torchvision.models.<x> or timm.create_model(x))
    shape: tuple[int, ...]
    kwargs: tuple[tuple[str, object], ...] = ()
    output: str | None = None  # segmentation nets return a dict: the key kept


def _tv(name, factory=None, shape=(1, 3, 224, 224), output=None, **kwargs) -> PublicModel:
    kw = tuple(sorted({"weights": None, **kwargs}.items()))
    return PublicModel(name, "torchvision", factory or name, shape, kw, output)


def _timm(name, shape=(1, 3, 224, 224)) -> PublicModel:
    return PublicModel(name, "timm", name, shape, (("pretrained", False),))


_SEG = dict(weights_backbone=None, output="out")
# Issue 13's benchmark set, then issue 14's five models with the ops graphopt refused.
ISSUE13 = (
    _tv("resnet18"),
    _tv("resnet50"),
    _tv("squeezenet1_1"),
    _tv("mobilenet_v3_small"),
    _tv("shufflenet_v2_x1_0"),
    _timm("rexnet_100"),
    _tv("regnet_y_400mf"),
    _tv("efficientnet_b0"),
    _tv("resnext50_32x4d"),
    _tv("densenet121"),
    _tv("googlenet", aux_logits=False, init_weights=True),
    _tv("vgg11_bn"),
    _tv("mobilenet_v3_large"),
    _timm("ghostnet_100"),
    _timm("repvgg_a0"),
    _timm("dla34"),
    _timm("lcnet_050"),
    _timm("mobilenetv4_conv_small"),
    _tv("mobilenet_v2"),
    _tv("resnet18_b8", "resnet18", shape=(8, 3, 224, 224)),
)
ISSUE14 = (
    _tv("convnext_tiny"),
    _tv("lraspp_mobilenet_v3_large", **_SEG),
    _tv("fcn_resnet50", aux_loss=False, **_SEG),
    _timm("hrnet_w18_small"),
    _tv("r3d_18", shape=(1, 3, 16, 112, 112)),
)
MODELS: dict[str, PublicModel] = {m.name: m for m in ISSUE13 + ISSUE14}


class _Output(nn.Module):
    """A dict-returning model (torchvision segmentation) reduced to one output tensor."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.key]


def _factory(spec: PublicModel) -> Callable[..., nn.Module]:
    if spec.library == "timm":
        timm = import_timm()
        return lambda **kw: timm.create_model(spec.factory, **kw)
    tv = import_torchvision()
    for namespace in (tv.models, tv.models.segmentation, tv.models.video):
        if hasattr(namespace, spec.factory):
            return getattr(namespace, spec.factory)
    raise KeyError(f"torchvision has no model {spec.factory!r}")


def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Running statistics that make eval-mode BatchNorm a real affine map, activations sane."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
                if m.running_mean is not None:
                    m.running_mean.copy_((torch.rand(m.num_features, generator=gen) - 0.5) * 0.2)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` with seeded random weights and BatchNorm statistics, in eval mode."""
    spec = MODELS[name]
    kwargs = dict(spec.kwargs)
    factory = _factory(spec)
    torch.manual_seed(seed)  # the libraries initialise their weights from the global generator
    model = factory(**kwargs)
    _randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    if spec.output is not None:
        model = _Output(model, spec.output)
    return model.eval()


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 2)
    return torch.randn(MODELS[name].shape, generator=gen)


def torch_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(module, example inputs)``, ready for ``graphopt.from_torch(module, inputs)``."""
    return build(name, seed), (example_input(name, seed),)


# --- the ONNX export cache -----------------------------------------------------------------
def cache_dir() -> Path:
    """``$GRAPHOPT_MODEL_CACHE``, else ``~/.cache/graphopt/public-models``."""
    default = Path.home() / ".cache" / "graphopt" / "public-models"
    return Path(os.environ.get("GRAPHOPT_MODEL_CACHE", default))


def _cache_key(spec: PublicModel, seed: int) -> str:
    """Everything the exported file depends on: a changed library version re-exports."""
    tv = import_torchvision()
    versions = [torch.__version__, tv.__version__]
    if spec.library == "timm":
        versions.append(import_timm().__version__)
    text = repr((spec, seed, OPSET, versions))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def export_onnx(name: str, seed: int = 0, folder: Path | None = None) -> Path:
    """The model as ONNX (opset 17, the TorchScript exporter), exported once and cached.

    The file is written under a temporary name and renamed into place, so a concurrent or
    interrupted export never leaves a partial file where a reader looks.
    """
    spec = MODELS[name]
    folder = Path(folder) if folder is not None else cache_dir()
    path = folder / f"{name}-{_cache_key(spec, seed)}.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    module, inputs = torch_model(name, seed)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        # The TorchScript exporter on purpose (as issue 13's models were made): torch warns.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                inputs,
                tmp,
                input_names=["input"],
                output_names=["output"],
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
