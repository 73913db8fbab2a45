"""`export`: an adapted model (the folder `adapt` writes) as a MONAI Bundle that runs without fewscan.

    python -m pipeline export ADAPTED --format bundle --out BUNDLE
    python -m monai.bundle run --config_file BUNDLE/configs/inference.json --meta_file BUNDLE/configs/metadata.json \
        --bundle_root BUNDLE --input_dir SCANS --output_dir OUT

A bundle: `configs/metadata.json`, `configs/inference.json` (the run's preprocessing as MONAI transforms, inference as
config expressions), `models/model.ts` (TorchScript of encoder plus adapted prototypes / head / fast weights) and
`docs/README.md`. For the NIfTI scans of `input_dir` it writes what `predict` does: classification
`predictions.csv` / `.json` (probabilities of the volume's central crop: `predict --whole-volume` for lesion-crop
runs), segmentation a `<scan>_seg.nii.gz` mask on each scan's own grid.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets.volume import FewscanError, InputError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pipeline.common.config import Config

FORMATS = ("bundle",)  # `--format` choices; a bare TorchScript or ONNX file would be more
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]  # as fewscan's presets: affines are RAS+, never DICOM's LPS
Parts = tuple[Any, Any, dict[str, Any], dict[str, Any]]  # (TorchScript module, example input, inference.json, meta)
RUN = ("python -m monai.bundle run --config_file {b}/configs/inference.json --meta_file {b}/configs/metadata.json "
       "--bundle_root {b} --input_dir SCANS --output_dir OUT")


def export_arguments(p: argparse.ArgumentParser) -> None:
    """The `export` verb's arguments."""
    p.add_argument("adapted", type=Path, help="folder written by `adapt`")
    p.add_argument("--format", choices=FORMATS, default="bundle", help="what to write (default: a MONAI Bundle)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create (absent or empty)")
    p.add_argument("--modality", choices=("CT", "MR"), default=None,
                   help="runs with transforms.preset auto: the modality of the scans the bundle will read "
                        "(default: none, as `predict` treats NIfTI inputs)")


def export_verb(args: argparse.Namespace) -> int:
    """`python -m pipeline export`: write the bundle, print where and how to run it."""
    out = export_bundle(args.adapted, args.out, args.modality)
    print(f"MONAI bundle -> {out}\nrun it: {RUN.format(b=out)}")
    return 0


def export_bundle(adapted: Path, out: Path, modality: str | None = None) -> Path:
    """Write the bundle of an ADAPTED folder to `out`, all or nothing (built in a hidden sibling, then renamed).

    Raises:
        InputError: `adapted` is not an adapted folder; `out` exists and is not an empty folder.
        FewscanError: what a bundle cannot hold: propagation, registration runs, 2D-image classifiers, N4.
    """
    import torch  # here, not at the top: `python -m pipeline --help` imports this module

    from pipeline.common.run import load_run_config

    adapted, out = Path(adapted), Path(out)
    if not (adapted / "adapted.json").is_file() or not (adapted / "config.yaml").is_file():
        raise InputError(adapted, "not an adapted folder (no adapted.json and config.yaml); run `adapt` first")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InputError(out, "exists and is not an empty folder; name a new --out")
    cfg = load_run_config(adapted)
    info = json.loads((adapted / "adapted.json").read_text())
    if cfg.transforms.n4 and _kind(cfg, modality) == "mr":
        raise FewscanError(f"{adapted}: transforms.n4 (SimpleITK N4 bias correction) has no MONAI transform")
    if cfg.task not in ("classification", "segmentation"):
        raise FewscanError(f"{adapted}: {cfg.task} runs cannot be exported (classification and segmentation can)")
    with warnings.catch_warnings():  # traced Python branches depend only on fixed sizes (crop, prototype count)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        build = _classification if cfg.task == "classification" else _segmentation
        module, example, inference, meta = build(adapted, cfg, info, modality)
    meta = {**_metadata_common(), **meta}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        module.save(str(tmp / "models" / "model.ts"))
        with torch.no_grad():  # the file, read back, must score as the module does
            expected, got = module(example), torch.jit.load(str(tmp / "models" / "model.ts"))(example)
        if not torch.allclose(expected, got, atol=1e-5):
            raise FewscanError("the saved TorchScript scores differently from the model")
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "docs" / "README.md").write_text(_readme(meta))
        os.chmod(tmp, 0o755)  # mkdtemp's folder is private; a bundle is for sharing
        os.replace(tmp, out)  # atomic, and allowed over an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _kind(cfg: Config, modality: str | None) -> str:
    """The intensity preset the bundle applies: `ct`, `mr` or `none` (`auto` resolved with `modality`)."""
    from transforms.presets import preset_kind

    return preset_kind(cfg.transforms, modality)


# --- the config files ----------------------------------------------------------------------------------------
def _step(target: str, **kwargs: Any) -> dict[str, Any]:
    """A config item of the MONAI dictionary transform `target` on the key "image"."""
    return {"_target_": target, "keys": "image", **kwargs}


def _preprocessing(cfg: Config, modality: str | None, float64: bool) -> list[dict[str, Any]]:
    """`transforms.presets.volume_preset` as config items, same transforms and arguments: load, channel first,
    RAS, spacing, intensity, `volume_size`; float32 out.

    Args:
        float64: compute in float64, as fewscan's segmentation cases do under the MR preset.
    """
    from transforms.presets import ct_window

    t, kind = cfg.transforms, _kind(cfg, modality)
    steps = [_step("LoadImaged", image_only=True, dtype="float32"), _step("EnsureChannelFirstd")]
    steps += [_step("CastToTyped", dtype="$torch.float64")] if float64 else []
    steps += [_step("Orientationd", axcodes="RAS", labels=RAS_LABELS)]
    if t.spacing is not None:
        steps.append(_step("Spacingd", pixdim=list(t.spacing), mode="bilinear", padding_mode="border"))
    if kind == "ct":
        low, high = ct_window(t)
        steps.append(_step("ScaleIntensityRanged", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
    elif kind == "mr" and t.mr_norm == "percentile":
        steps.append(_step("ScaleIntensityRangePercentilesd", lower=t.percentiles[0], upper=t.percentiles[1],
                           b_min=0.0, b_max=1.0, clip=True, channel_wise=True))
    elif kind == "mr":
        steps.append(_step("NormalizeIntensityd", nonzero=True, channel_wise=True))
    if t.volume_size is not None:
        steps.append(_step("ResizeWithPadOrCropd", spatial_size=list(t.volume_size)))
    return [*steps, _step("CastToTyped", dtype="$torch.float32")]


def _common_config(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """inference.json keys every bundle has: paths (overridable), device, the TorchScript network, the dataset."""
    return {
        "imports": ["$import csv", "$import glob", "$import json", "$import os"],
        "bundle_root": ".",
        "input_dir": "$os.path.join(@bundle_root, 'inputs')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "datalist": "$sorted(glob.glob(os.path.join(@input_dir, '*.nii')) + "
                    "glob.glob(os.path.join(@input_dir, '*.nii.gz')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location=@device)",
        "network": "$@network_def.eval()",
        "initialize": ["$torch.set_grad_enabled(False)"],
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
    }


def _data_format(cfg: Config, modality: str | None, channels: int, shape: list[Any], out: dict[str, Any]
                 ) -> dict[str, Any]:
    """metadata.json's `network_data_format`: the prepared input `(channels, *shape)` and the output `out`."""
    kind = _kind(cfg, modality)
    scaled = kind == "ct" or (kind == "mr" and cfg.transforms.mr_norm == "percentile")
    image = {"type": "image", "format": "magnitude", "modality": kind.upper() if kind != "none" else "any",
             "num_channels": channels, "spatial_shape": shape, "value_range": [0.0, 1.0] if scaled else [],
             "channel_def": {str(c): "image" for c in range(channels)}}
    return {k: {name: {"dtype": "float32", "is_patch_data": False, **v}} for k, name, v in
            (("inputs", "image", image), ("outputs", "pred", out))}


def _metadata_common() -> dict[str, Any]:
    """metadata.json keys every bundle has: versions (MONAI Bundle spec), provenance, intended use."""
    from importlib.metadata import version

    import monai
    import numpy
    import torch

    return {"schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                      "meta_schema_20220324.json", "version": "0.1.0", "changelog": {"0.1.0": "fewscan export"},
            "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__, "required_packages_version": {"nibabel": version("nibabel")},
            "optional_packages_version": {"fire": version("fire")}, "authors": "fewscan",
            "copyright": "the owners of the training and support scans",
            "intended_use": "research only, not for clinical use", "data_type": "nifti",
            "image_classes": "one 3D scan (NIfTI), any size and orientation"}


def _readme(meta: dict[str, Any]) -> str:
    """docs/README.md: what the bundle does, how to run it, what it writes."""
    f = meta["fewscan"]
    return (f"# {meta['name']}\n\n{meta['description']}.\n\nExported by fewscan (`python -m pipeline export`); it "
            f"needs only MONAI {meta['monai_version']}, PyTorch {meta['pytorch_version']}, nibabel and fire.\n\n"
            f"## Run\n\n```\n{RUN.format(b='BUNDLE')}\n```\n\n`SCANS`: a folder of `*.nii` / `*.nii.gz` scans (or "
            "`--datalist \"['a.nii.gz', ...]\"` instead of `--input_dir`). It runs on the GPU when there is one; "
            "`--device cpu` computes on the CPU, as fewscan's `predict` does (same numbers).\n\n"
            f"## Output (in OUT)\n\n{f['outputs']}\n")


# --- classification ----------------------------------------------------------------------------------------------
def _classification(adapted: Path, cfg: Config, info: dict[str, Any], modality: str | None) -> Parts:
    """The parts of an adapted classifier of 3D scans: it scores the volume's central `roi_size` crop."""
    import torch

    from pipeline.classification.adapt import lesion_crops
    from pipeline.classification.methods.maml import MAML
    from pipeline.classification.train import build_model
    from pipeline.common.run import load_weights, read_split, read_tensors

    shape, t = [int(s) for s in info["item_shape"]], cfg.transforms
    if len(shape) == 3 and t.slice_axis == "none":
        raise FewscanError(f"{adapted}: a classifier of 2D images (PNG / npz items); the bundle reads 3D scans")
    n_base = len(read_split(adapted)["base"])
    method = plain_layers(load_weights(build_model(cfg, n_base), adapted / "model.safetensors").eval())
    state = read_tensors(adapted / "state.safetensors")
    if isinstance(method, MAML):  # its `predict` is a functional call, which a trace refuses: load the fast weights
        _load(method.net, state)
        n_way = int(state["n_way"])
        score = lambda x: method.net(method.layout(x))[:, :n_way]  # noqa: E731 - MAML.logits
    else:
        score = lambda x: method.predict(state, x)  # noqa: E731
    crop = list(t.resize or t.roi_size)
    example = torch.rand(1, shape[0], *crop)
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}.get(t.slice_axis, -1)
    with torch.no_grad():
        module = torch.jit.trace(scorers()[0](method, score, axis), example)
    steps = _preprocessing(cfg, modality, float64=False)
    steps[-1:-1] = [_step("ResizeWithPadOrCropd", spatial_size=list(t.roi_size))]  # predict's `fit_size`
    if t.resize is not None:  # as a crop around a centre (transforms.presets.crop_around)
        steps[-1:-1] = [_step("Resized", spatial_size=list(t.resize), mode="trilinear")]
    classes = list(info["classes"])
    inference = {
        **_common_config(steps),
        "class_names": classes,
        "scores": "$[(d['image'].meta['filename_or_obj'], @network(d['image'].as_tensor()[None].to(@device))[0]"
                  ".cpu()) for d in @dataset]",
        "records": "$[{'input': p, 'prediction': @class_names[int(v.argmax())], "
                   "'probabilities': dict(zip(@class_names, v.tolist()))} for p, v in @scores]",
        "csv_file": "$open(os.path.join(@output_dir, 'predictions.csv'), 'w', newline='')",
        "run": ["$os.makedirs(@output_dir, exist_ok=True)",
                "$csv.writer(@csv_file).writerows([['input', 'prediction'] + ['p_' + c for c in @class_names]] + "
                "[[r['input'], r['prediction']] + ['%.6f' % p for p in r['probabilities'].values()] "
                "for r in @records])",
                "$@csv_file.close()",
                "$open(os.path.join(@output_dir, 'predictions.json'), 'w').write(json.dumps(@records, indent=2))"],
    }
    crops = "the central crop of the whole volume" + (" (as predict --whole-volume: the run was trained on crops "
                                                      "around lesion centres)" if lesion_crops(cfg) else "")
    out = {"type": "probabilities", "format": "classes", "num_channels": len(classes),
           "spatial_shape": [len(classes)], "value_range": [0, 1], "channel_def": dict(enumerate(classes))}
    meta = {"name": f"fewscan {info['method']} classifier of {', '.join(classes)}", "pred_classes": classes,
            "task": "few-shot classification of 3D scans", "network_data_format": _data_format(
                cfg, modality, shape[0], crop, out),
            "description": f"Classifies {crops} of each scan into {', '.join(classes)} ({info['method']}, adapted "
                           f"by fewscan from {sum(info['support_per_class'].values())} support scans)",
            "fewscan": {"task": "classification", "method": info["method"], "classes": classes, "input": crops,
                        "outputs": "predictions.csv and .json: per scan the predicted class and class probabilities"}}
    return module, example, inference, meta


def _load(net: nn.Module, weights: dict[str, Tensor]) -> None:
    """Copy adapted (fast) weights, by parameter name, into `net`'s own parameters."""
    import torch

    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(weights[name])


def plain_layers(module: nn.Module) -> nn.Module:
    """A copy of `module` with the stand-ins of `pipeline.nn.fast.speed_up` back to the PyTorch layers they stand
    for: the same function, in ops a TorchScript file can hold (the stand-ins run Python autograd Functions)."""
    import copy

    from torch import nn

    from pipeline.nn.layers import FastBatchNorm1d, FastBatchNorm2d, FastBatchNorm3d, FastMaxPool
    from pipeline.nn.stem import StemSequential

    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, StemSequential):
            m.__class__ = nn.Sequential  # its own layers, run one by one
            del m.plan, m.stems
        elif isinstance(m, FastBatchNorm1d | FastBatchNorm2d | FastBatchNorm3d):
            m.__class__ = type(m).__mro__[1]  # the nn.BatchNormNd it subclasses
        for name, child in list(m.named_children()):
            if isinstance(child, FastMaxPool):
                setattr(m, name, child.pool)
    return module


# --- segmentation ------------------------------------------------------------------------------------------------
def _segmentation(adapted: Path, cfg: Config, info: dict[str, Any], modality: str | None) -> Parts:
    """The parts of an adapted segmentation network (proto or maml): a mask per scan on the scan's grid."""
    import torch
    from torch import nn

    from pipeline.common.run import load_weights, read_tensors
    from pipeline.segmentation.proto import backbone_divisor
    from pipeline.segmentation.train import build_model

    scfg = cfg.segmentation
    if scfg.method == "propagate":
        raise FewscanError(f"{adapted}: segmentation.method propagate registers the stored support scans to each new "
                           "scan; a bundle holds one scoring network (proto and maml runs can be exported)")
    model = load_weights(build_model(cfg), adapted / "model.safetensors").eval()
    if scfg.method == "proto":
        state = read_tensors(adapted / "prototypes.safetensors")
        f = torch.rand(1, scfg.features, *[3] * (2 if scfg.mode == "2d" else 3))
        with torch.no_grad():  # `predict` scores prototypes without gradients (in chunks): trace that path
            decoder = torch.jit.trace(scorers()[1](state["bg"], state["fg"], model.scale), f)
        backbone, divisor = model.backbone, model.divisor
    else:  # maml: the U-Net with its adapted (fast) weights already outputs the two logits
        _load(model, read_tensors(adapted / "fast.safetensors"))
        backbone, decoder, divisor = model, nn.Identity(), backbone_divisor(scfg)
    module = torch.jit.script(scorers()[2](backbone, decoder, divisor, scfg.mode == "2d"))
    if scfg.mode == "2d":
        inferer: Any = {"_target_": "SimpleInferer"}
    else:  # as fewscan's `_dense`: the whole volume when it fits a window, else Gaussian-blended window features
        roi = list(scfg.crop)
        inferer = (f"$lambda x, net: net(x) if all(s <= r for s, r in zip(x.shape[2:], {roi})) else net.decode("
                   f"monai.inferers.sliding_window_inference(x, {roi}, 2, net.features, overlap=0.25, "
                   "mode='gaussian'))")
    # Back onto the scan's own grid, nearest neighbour in world coordinates as fewscan's `mask_to_source`: spline
    # order 0 runs scipy's map_coordinates, which rounds exact ties as nibabel does (Invertd's torch "nearest" rounds
    # them to even: boundary voxels moved wherever the spacings are in a ratio like 1.5).
    post = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "LoadImaged", "keys": "source", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "source"},
            {"_target_": "ResampleToMatchd", "keys": "pred", "key_dst": "source", "mode": 0, "padding_mode": "zeros"},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
             "print_log": False}]
    inference = {
        **_common_config(_preprocessing(cfg, modality, float64=_kind(cfg, modality) == "mr")),
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "run": ["$[@postprocessing({'source': d['image'].meta['filename_or_obj'], 'pred': monai.data.MetaTensor("
                "@inferer(d['image'].as_tensor()[None].to(@device), @network)[0].cpu(), meta=d['image'].meta)}) "
                "for d in @dataset]"],
    }
    structure, any_size = str(info["structure"]), ["*", "*", "*"]
    out = {"type": "image", "format": "segmentation", "num_channels": 2, "spatial_shape": any_size,
           "value_range": [], "channel_def": {"0": "background", "1": structure}}
    meta = {"name": f"fewscan {scfg.method} segmentation of {structure}",
            "task": f"few-shot segmentation of {structure}", "pred_classes": ["background", structure],
            "description": f"Segments {structure} in each scan ({scfg.method}, {scfg.mode}; adapted by fewscan from "
                           f"{info['shots']} support scans)",
            "network_data_format": _data_format(cfg, modality, 1, any_size, out),
            "fewscan": {"task": "segmentation", "method": scfg.method, "mode": scfg.mode, "structure": structure,
                        "sliding_window": None if scfg.mode == "2d" else list(scfg.crop),
                        "outputs": "<scan>_seg.nii.gz per scan: uint8 mask (1 = the structure) on the scan's own "
                                   "grid and affine"}}
    return module, torch.rand(1, 1, 9, 7, 5), inference, meta


@functools.cache
def scorers() -> tuple[type, type, type]:
    """`(ClassScorer, ProtoDecoder, SegScorer)`: the `nn.Module`s the bundle's TorchScript is made of, defined on
    first use so that importing this module (the command line does, for every verb) imports no torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pipeline.segmentation.proto import class_scores

    class ClassScorer(nn.Module):
        """Prepared crops `(B, C, *crop)` -> probabilities `(B, N)`: softmax of `score` (the adapted `method`'s
        logits; `method` is held so its weights are this module's). With `axis >= 0`, the crop's central slice
        along that spatial axis is scored (runs trained on 2D slices)."""

        def __init__(self, method: nn.Module, score: Callable[[Tensor], Tensor], axis: int) -> None:
            super().__init__()
            self.method, self.score, self.axis = method, score, axis

        def forward(self, x: Tensor) -> Tensor:
            if self.axis >= 0:
                x = x.select(self.axis + 2, x.shape[self.axis + 2] // 2)
            return torch.softmax(self.score(x).float(), -1)

    class ProtoDecoder(nn.Module):
        """Features `(B, F, *S)` -> logits `(B, 2, *S)` (background, structure) against the adapted prototypes."""

        def __init__(self, bg: Tensor, fg: Tensor, scale: float) -> None:
            super().__init__()
            self.register_buffer("bg", bg)
            self.register_buffer("fg", fg)
            self.scale = scale

        def forward(self, f: Tensor) -> Tensor:
            return torch.stack([class_scores(f, self.bg, self.scale), class_scores(f, self.fg, self.scale)], dim=1)

    class SegScorer(nn.Module):
        """A prepared volume `(1, 1, I, J, K)` -> logits `(1, 2, I, J, K)`; axial slice by slice in 2D mode.

        `features` (window `(B, 1, *S)` -> `(B, F, *S)`) and `decode` (`(B, F, *S)` -> `(B, 2, *S)`) are exported
        too: the bundle's sliding windows blend features, then decode them once, as fewscan's `_dense` does.
        """

        def __init__(self, backbone: nn.Module, decoder: nn.Module, divisor: int, slices: bool) -> None:
            super().__init__()
            self.backbone, self.decoder, self.divisor, self.slices = backbone, decoder, divisor, slices

        @torch.jit.export
        def features(self, x: Tensor) -> Tensor:
            """The backbone on `x` zero-padded to multiples of `divisor` (the odd voxel after), cropped back."""
            n = x.dim() - 2
            pad = [0] * (2 * n)
            for d in range(n):  # F.pad lists the last axis first
                total = (self.divisor - x.shape[d + 2] % self.divisor) % self.divisor
                pad[2 * (n - 1 - d)] = total // 2
                pad[2 * (n - 1 - d) + 1] = total - total // 2
            y = self.backbone(F.pad(x, pad))
            for d in range(n):
                y = y.narrow(d + 2, pad[2 * (n - 1 - d)], x.shape[d + 2])
            return y

        @torch.jit.export
        def decode(self, f: Tensor) -> Tensor:
            return self.decoder(f)

        def forward(self, x: Tensor) -> Tensor:
            if not self.slices:
                return self.decode(self.features(x))
            out = [self.decode(self.features(x[:, :, :, :, k])) for k in range(x.shape[4])]
            return torch.stack(out, dim=4)

    return ClassScorer, ProtoDecoder, SegScorer
