"""`crosskd convert`: foreign detector weights (Ultralytics, MMDetection, torchvision) written once as a crosskd .pt."""

from __future__ import annotations

from pathlib import Path

from crosskd.config import Args
from crosskd.data import read_dataset_names
from crosskd.engine.deployment.checkpoint import make_checkpoint, save_checkpoint
from crosskd.engine.deployment.loader import Runtime, load_runtime
from crosskd.errors import ConfigError
from crosskd.models.foreign.torchvision_detection import TORCHVISION_PREFIX
from crosskd.paths import writable_file
from crosskd.utils import LOGGER, colorstr


def converted_path(source: str, save_dir: str | None, name: str | None) -> Path:
    """`<save_dir or the source's folder>/<name or the source's stem>.pt`; never the source file itself."""
    foreign = source.startswith(TORCHVISION_PREFIX)
    stem = name or (source[len(TORCHVISION_PREFIX):] if foreign else Path(source).stem)
    folder = Path(save_dir) if save_dir else Path.cwd() if foreign else Path(source).parent
    path = folder / f"{stem}.pt"
    return path.with_name(f"{stem}_crosskd.pt") if not foreign and path.resolve() == Path(source).resolve() else path


def class_names(runtime: Runtime, data: str | None) -> dict[int, str]:
    """The dataset's class names when data= is given (their count must match the model's), else the model's own."""
    if data is None:
        return runtime.names
    names = read_dataset_names(data)
    if len(names) != runtime.nc:
        raise ConfigError(
            f"data={data} names {len(names)} classes but '{runtime.source}' predicts {runtime.nc}; "
            "pass the dataset the checkpoint was trained on, or leave data= out to keep the checkpoint's names"
        )
    return names


def run(args: Args) -> Path:
    """Load `model=` (with `model_cfg=` when the checkpoint does not say its architecture) and save it as a crosskd .pt
    that val, predict, export, teacher= and pretrained= accept; returns the written path."""
    runtime = load_runtime(args.model, model_cfg=args.model_cfg)
    detector = runtime.detector("convert")
    if runtime.kind == "yaml":
        raise ConfigError(f"model={args.model} is a bare model YAML with no weights to convert; pass a checkpoint")
    data = args.data if args.typed("data") else None
    detector.names = class_names(runtime, data)
    path = converted_path(str(args.model), args.save_dir, args.name)
    writable_file(path, "pass save_dir= a folder you can write to (name= sets the file's stem)")
    train_args = {"model": str(args.model), "model_cfg": args.model_cfg, **({"data": data} if data else {})}
    ckpt = make_checkpoint(detector, epoch=-1, best_fitness=None, names=detector.names, train_args=train_args,
                           converted_from=runtime.source)
    save_checkpoint(ckpt, path)
    LOGGER.info(f"{colorstr('convert:')} {runtime.kind} {detector.head_type} with {detector.nc} classes from "
                f"{runtime.source}\nSaved {path.resolve()}")
    return path
