"""The run settings as data: one `Setting` per key, from which default.yaml, docs/cli.md and validation derive.

`SECTIONS` is the only key list. `crosskd.config` validates values against it; `render_default_yaml()` and
`render_cli_reference()` write `cfg/default.yaml` and `docs/cli.md` (`python -m crosskd.settings` regenerates both;
tests fail when either file drifts from the spec). It imports no crosskd layer, only the plain-data tables its choices
come from, so the CLI reads it at start without loading engine, models or distill: the export format table, and the
`kd` choices from the torch-free `crosskd.distill.registry` when first used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from crosskd.engine.deployment.formats import export_formats
from crosskd.paths import DEFAULT_CFG_PATH

Kind = Literal["bool", "int", "float", "str", "int_list", "imgsz", "device", "source", "classes", "resume", "weights",
               "cache", "scales"]
KIND_NAMES: dict[str, str] = {  # how error messages and docs/cli.md describe each kind
    "bool": "a bool (true or false)",
    "int": "an int",
    "float": "a number",
    "str": "a string",
    "int_list": "a list of ints",
    "imgsz": "an int or an h,w pair of ints",
    "device": "cpu, a CUDA index or a list of indices",
    "source": "a path, glob or camera index",
    "classes": "a class id or a list of class ids",
    "resume": "true, false or a checkpoint path",
    "weights": "true/imagenet, false, a torchvision weights name or a .pth/.pt path",
    "cache": "false, ram (or true) or disk",
    "scales": "head or a list of long-side sizes",
}
MODES = ("train", "distill", "val", "predict", "export", "benchmark", "info", "convert", "analyze")


class RegisteredKDMethods(Sequence[str]):
    """The `kd` choices, read from the one method registry (`crosskd.distill.registry`) whenever they are used.

    The registry imports only crosskd.errors and is read on first use, so starting the CLI loads no distill module,
    and a method registered at run time is a valid `kd=` value at once.
    """

    def names(self) -> tuple[str, ...]:
        """The registry's kd= names now."""
        from crosskd.distill.registry import kd_names

        return kd_names()

    def __getitem__(self, index: Any) -> Any:
        return self.names()[index]

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"RegisteredKDMethods{self.names()}"


KD_METHOD_NAMES = RegisteredKDMethods()
RECIPE_NOTE = "; not given: the model's recipe (docs/training.md)"
EXPORT_FORMAT_NAMES = tuple(fmt.name for fmt in export_formats())  # the format table's rows (a plain-data module)
EXPORT_EXTRAS = "".join(f" ({fmt.name} needs pip install 'crosskd[{fmt.extra}]')"
                        for fmt in export_formats() if fmt.extra)
CLI_REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "cli.md"  # exists in a source checkout


@dataclass(frozen=True)
class Setting:
    """One run setting: a key of default.yaml with its kind, default, allowed values and help text.

    `low`/`high` bound numbers (and every item of a list); `choices` are matched case-insensitively; `aliases` are
    other spellings accepted on input; `example` is shown in error messages when the default is not a useful
    example; `raw` keeps the command-line text as typed (`name=123` stays the string '123').
    """

    name: str
    kind: Kind
    default: Any
    help: str
    choices: Sequence[str] = ()
    low: float | None = None
    high: float | None = None
    aliases: tuple[str, ...] = ()
    example: str | None = None
    raw: bool = False

    def range_text(self) -> str:
        """The allowed range in words: 'between 0 and 1', '>= 1', '<= 9' or '' (unbounded)."""
        if self.low is not None and self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        if self.low is not None or self.high is not None:
            return f">= {self.low:g}" if self.low is not None else f"<= {self.high:g}"
        return ""

    def example_value(self) -> str:
        """A typical value for messages, as typed on the command line: the spec's example, else the default."""
        return self.example or format_value(self.default)


SECTIONS: tuple[tuple[str, tuple[Setting, ...]], ...] = (
    ("Mode and inputs", (
        Setting("mode", "str", "train", "what to run", choices=MODES),
        Setting("model", "str", None, "model YAML (build from scratch) or crosskd .pt checkpoint; the student when "
                "distilling", example="gfl_r18.yaml"),
        Setting("student", "str", None, "student model YAML or .pt when distilling (same as model=)",
                example="gfl_r18.yaml"),
        Setting("data", "str", "digits.yaml", "dataset YAML: a path or a name shipped in cfg/datasets"),
        Setting("datasets_dir", "str", None, "where dataset YAML relative paths and generated demo data live; empty = "
                "the user setting (crosskd settings), ./datasets by default", example="datasets"),
        Setting("pretrained", "weights", None, "overrides the model YAML's backbone.pretrained: imagenet, a "
                "torchvision weights name, a backbone .pth, a crosskd .pt (all matching tensors) or false",
                example="imagenet"),
        Setting("model_cfg", "str", None, "model YAML that a foreign checkpoint given as model= or pretrained= maps "
                "onto (MMDetection .pth, torchvision state dict); empty = inferred from the checkpoint",
                example="gfl_r101.yaml"),
    )),
    ("Distillation", (
        Setting("teacher", "str", None, "teacher: crosskd .pt checkpoint, or model YAML together with "
                "teacher_weights=", aliases=("distill_model",), example="gfl_r50.pt"),
        Setting("teacher_weights", "str", None, "weights for a YAML teacher (.pt from crosskd)", example="gfl_r50.pt"),
        Setting("teacher_cfg", "str", None, "model YAML that a foreign teacher checkpoint maps onto (MMDetection "
                ".pth, torchvision state dict); empty = inferred from the checkpoint", example="gfl_r101.yaml"),
        Setting("kd", "str", "crosskd", "distillation method", choices=KD_METHOD_NAMES),
        Setting("kd_idx", "int", None, "CrossKD hold point (head conv index 0..stacked_convs); empty = detector "
                "default (3, FCOS 2)", low=0, example="2"),
        Setting("kd_align", "bool", True, "align student hold features to the teacher's per-channel mean/std"),
        Setting("kd_hold", "str", "post", "CrossKD hold features of student and teacher: post = after head conv "
                "kd_idx's activation (what the reference code computes), pre = before it", choices=("post", "pre")),
        Setting("kd_weight", "float", 1.0, "global multiplier of every distillation loss", low=0, aliases=("dis",)),
        Setting("kd_cls_weight", "float", None, "classification KD weight; empty = the teacher head type's default",
                low=0, example="1.0"),
        Setting("kd_reg_weight", "float", None, "regression KD weight; empty = the teacher head type's default",
                low=0, example="1.0"),
        Setting("kd_ctr_weight", "float", None, "centerness KD weight (ATSS); empty = default", low=0, example="1.0"),
        Setting("kd_feat_weight", "float", None, "PKD feature KD weight; empty = default per head type (CrossKD+PKD) "
                "or MMRazor's 10 (kd=pkd alone, first 4 FPN levels)", low=0, example="6.0"),
        Setting("kd_branch", "str", "both", "which branch's prediction-KD terms are kept (paper Table 3): cls = "
                "kd_cls only, reg = kd_reg and kd_ctr", choices=("both", "cls", "reg")),
        Setting("kd_cls_loss", "str", "qfl", "classification KD loss (paper Table 9): qfl = quality focal loss "
                "(beta 1), bce = plain soft-target BCE (beta 0)", choices=("qfl", "bce")),
        Setting("kd_region", "str", "all", "priors the prediction KD applies to (paper Table 9): all valid ones, "
                "the assigner's positives or its negatives", choices=("all", "pos", "neg")),
        Setting("pkd_on", "str", "neck", "where PKD imitates features (paper Table 2): the FPN outputs, or the "
                "head's cls / reg tower features at kd_idx", choices=("neck", "cls", "reg")),
        Setting("kd_strategy", "str", "a", "cross-head strategy (paper Table 12, Fig. 7): a = CrossKD, b = student "
                "predictions vs teacher features through the student head, c = student predictions vs the (a) "
                "cross-head, d = the (b) cross-head vs teacher predictions; see docs/distillation.md",
                choices=("a", "b", "c", "d")),
    )),
    ("Training", (
        Setting("epochs", "int", 12, "number of epochs (paper 1x schedule)", low=1),
        Setting("batch", "int", 16, "total batch size over all devices", low=1),
        Setting("imgsz", "imgsz", 640, "input size: long side of the resized image (train, val); int or h,w for "
                "predict/export"),
        Setting("device", "device", None, "cpu, 0, 0,1 or empty for auto", example="0"),
        Setting("workers", "int", 4, "dataloader worker processes per rank", low=0),
        Setting("project", "str", None, "project directory under runs/", example="coco", raw=True),
        Setting("name", "str", None, "run name; empty = the mode name", example="exp", raw=True),
        Setting("save_dir", "str", None, "convert: folder for the converted .pt; empty = next to the source",
                example="weights"),
        Setting("exist_ok", "bool", False, "reuse an existing run directory instead of incrementing its name"),
        Setting("optimizer", "str", "auto", "optimizer; auto = the paper's SGD for runs of 10000 iterations or more, "
                "else AdamW (cfg=coco_1x.yaml: the paper's COCO recipe); with nbs > 0 Ultralytics 8.4's rule: MuSGD "
                "(lr0 0.01) past 10000 optimiser steps, else AdamW with lr0 round(0.002 * 5 / (4 + nc), 6), beta1 0.9",
                choices=("auto", "SGD", "AdamW", "MuSGD")),
        Setting("lr0", "float", None, "initial learning rate: for batch 16 and scaled linearly with batch (nbs=0), "
                "or as it is (nbs > 0); empty = by optimizer: SGD 0.01, AdamW 0.004, MuSGD 0.01" + RECIPE_NOTE,
                low=0, high=1, example="0.01"),
        Setting("lrf", "float", 0.01, "final learning rate as a fraction of lr0 (cosine schedule; lr_schedule="
                "ultralytics: linear too)", low=0, high=1),
        Setting("momentum", "float", 0.9, "SGD and MuSGD momentum / AdamW beta1" + RECIPE_NOTE, low=0, high=1),
        Setting("nesterov", "bool", False, "Nesterov momentum for SGD and MuSGD" + RECIPE_NOTE),
        Setting("weight_decay", "float", 0.0001, "optimizer weight decay (nbs > 0: scaled by batch x accumulation / "
                "nbs)" + RECIPE_NOTE, low=0, high=1),
        Setting("norm_bias_decay", "bool", True, "weight decay on norm weights and biases too, one parameter group "
                "(the paper); false = Ultralytics' three groups: weights with decay, norm weights and biases without"
                + RECIPE_NOTE),
        Setting("nbs", "int", 0, "nominal batch size: gradients accumulate over round(nbs / batch) batches per "
                "optimiser step (from 1 during warm-up) and lr0 is not scaled with batch (Ultralytics); 0 = one step "
                "per batch" + RECIPE_NOTE, low=0),
        Setting("lr_schedule", "str", "mmdet", "mmdet = warm-up over warmup_iters from warmup_ratio, then x0.1 at "
                "lr_steps or a per-iteration cosine (cos_lr); ultralytics = warm-up over warmup_epochs (at most "
                "epochs - 1) from 0 (biases from warmup_bias_lr, SGD momentum from warmup_momentum), then linear "
                "(or cos_lr cosine) to lr0 x lrf, set once per epoch" + RECIPE_NOTE, choices=("mmdet", "ultralytics")),
        Setting("warmup_iters", "int", 500, "linear warm-up iterations; when not given, at most 10% of the run's "
                "iterations", low=0),
        Setting("warmup_epochs", "float", 0.0, "warm-up length in epochs; overrides warmup_iters when > 0"
                + RECIPE_NOTE, low=0),
        Setting("warmup_ratio", "float", 0.001, "learning-rate factor at the start of warm-up", low=0, high=1),
        Setting("warmup_bias_lr", "float", 0.0, "lr_schedule=ultralytics with norm_bias_decay=false: the biases' "
                "learning rate at the start of warm-up, falling to lr0" + RECIPE_NOTE, low=0, high=1),
        Setting("warmup_momentum", "float", None, "lr_schedule=ultralytics: SGD momentum at the start of warm-up, "
                "rising to momentum; empty = momentum throughout" + RECIPE_NOTE, low=0, high=1, example="0.8"),
        Setting("cos_lr", "bool", False, "cosine learning-rate schedule instead of step decay (lr_schedule="
                "ultralytics: instead of linear)"),
        Setting("lr_steps", "int_list", (8, 11), "step-decay epochs of a 12-epoch schedule, scaled to epochs", low=0),
        Setting("amp", "bool", True, "automatic mixed precision on CUDA"),
        Setting("compile", "bool", False, "torch.compile the model's backbone, neck and head (and the teacher's); "
                "falls back to eager with one warning where compilation fails"),
        Setting("valid_region", "str", "mmdet", "priors that count in the detection and KD losses: mmdet = each "
                "image padded up to a multiple of 32 (MMDetection's valid flags; every point for FCOS, as "
                "MMDetection's FCOS and the CrossKD reference), image = only the unpadded image (stricter)",
                choices=("mmdet", "image")),
        Setting("clip_grad", "float", 0.0, "gradient clipping max norm; 0 disables" + RECIPE_NOTE, low=0),
        Setting("nan_patience", "int", 10, "a step with a NaN/Inf loss is skipped; stop after this many in a row "
                "(0 never stops)", low=0),
        Setting("ema", "bool", False, "keep an exponential moving average of the weights" + RECIPE_NOTE),
        Setting("ema_decay", "float", 0.9998, "EMA decay" + RECIPE_NOTE, low=0, high=1),
        Setting("seed", "int", 0, "random seed"),
        Setting("deterministic", "bool", True, "deterministic algorithms where available"),
        Setting("resume", "resume", False, "resume from last.pt: true for the newest run or a path", example="true"),
        Setting("save_period", "int", -1, "save a checkpoint every N epochs; -1 disables", low=-1),
        Setting("save_period_iters", "int", 0, "also write a resumable mid-epoch last.pt every N iterations (for jobs "
                "killed without warning); 0 disables", low=0),
        Setting("val", "bool", True, "validate after every epoch"),
        Setting("plots", "bool", True, "save plots: results.png, labels.jpg, train and val batches, PR/F1/P/R curves, "
                "confusion matrices"),
        Setting("tensorboard", "bool", None, "log losses, metrics, lr and val images to TensorBoard in the run folder "
                "(pip install 'crosskd[tensorboard]'); empty = the user setting (crosskd settings), false by default",
                example="true"),
        Setting("sync_bn", "bool", False, "convert BatchNorm to SyncBatchNorm under DDP"),
        Setting("fraction", "float", 1.0, "fraction of the training set to use (analyze: of the split= images; export "
                "int8=True: of the train images to calibrate on, at most 300, and of the val images to check AP on)",
                low=0, high=1),
        Setting("verbose", "bool", True, "print detailed output"),
    )),
    ("Augmentation", (  # Ultralytics 8.4's keys and defaults; the model's recipe replaces the keys not given
        Setting("hsv_h", "float", 0.015, "image hue gain (fraction)" + RECIPE_NOTE, low=0, high=1),
        Setting("hsv_s", "float", 0.7, "image saturation gain (fraction)" + RECIPE_NOTE, low=0, high=1),
        Setting("hsv_v", "float", 0.4, "image value (brightness) gain (fraction)" + RECIPE_NOTE, low=0, high=1),
        Setting("degrees", "float", 0.0, "random rotation (+/- degrees)" + RECIPE_NOTE, low=0, high=180),
        Setting("translate", "float", 0.1, "random translation (+/- fraction of the image)" + RECIPE_NOTE, low=0,
                high=1),
        Setting("scale", "float", 0.5, "random scale gain (+/- fraction)" + RECIPE_NOTE, low=0, high=0.99),
        Setting("shear", "float", 0.0, "random shear (+/- degrees)" + RECIPE_NOTE, low=0, high=90),
        Setting("perspective", "float", 0.0, "random perspective (fraction, 0 to 0.001)" + RECIPE_NOTE, low=0,
                high=0.001),
        Setting("flipud", "float", 0.0, "vertical flip probability" + RECIPE_NOTE, low=0, high=1),
        Setting("fliplr", "float", 0.5, "horizontal flip probability (a dataset YAML may override it)" + RECIPE_NOTE,
                low=0, high=1),
        Setting("mosaic", "float", 1.0, "4-image mosaic probability" + RECIPE_NOTE, low=0, high=1),
        Setting("mixup", "float", 0.0, "mixup probability" + RECIPE_NOTE, low=0, high=1),
        Setting("cutmix", "float", 0.0, "cutmix probability" + RECIPE_NOTE, low=0, high=1),
        Setting("close_mosaic", "int", 10, "turn mosaic, mixup and cutmix off for the last N epochs" + RECIPE_NOTE,
                low=0),
        Setting("multi_scale", "float", 0.0, "random input size per batch: imgsz x (1 +/- this), a multiple of the "
                "stride" + RECIPE_NOTE, low=0, high=0.9),
        Setting("ms_scales", "scales", None, "random long side per image (MMDetection multi-scale training): head = "
                "the head's mstrain config (GFL/ATSS 480-800 range, RetinaNet 640-800 range, FCOS 640 or 800, "
                "scaled by imgsz/800), or a list of sizes; empty = imgsz", example="head"),
        Setting("ms_mode", "str", "range", "how ms_scales picks a size: range = uniform between the smallest and the "
                "largest (RandomResize), choice = one of them (RandomChoiceResize)", choices=("range", "choice")),
        Setting("cache", "cache", False, "keep decoded training images: ram, or disk (.npy beside each image)",
                example="ram"),
    )),
    ("Validation and prediction", (
        Setting("split", "str", "val", "dataset split for validation and analyze", choices=("train", "val", "test")),
        Setting("save_json", "bool", False, "write predictions in COCO results format"),
        Setting("conf", "float", None, "score threshold; empty = 0.05 for val, 0.25 for predict", low=0, high=1,
                example="0.25"),
        Setting("iou", "float", 0.6, "NMS IoU threshold", low=0, high=1),
        Setting("max_det", "int", 100, "maximum detections per image", low=1),
        Setting("nms_pre", "int", 1000, "top-k candidates per level before NMS", low=1),
        Setting("multi_label", "bool", None, "keep every class above conf for a box (true) or only its best class "
                "(false); empty = false for predict, true for val and export (COCO AP)", example="false"),
        Setting("source", "source", None, "predict source: image, directory, glob, video or .txt list",
                example="images/"),
        Setting("classes", "classes", None, "keep only these class ids, e.g. 0,2", low=0, example="0,2"),
        Setting("save", "bool", True, "save annotated images or videos (predict)"),
        Setting("save_txt", "bool", False, "save YOLO-format label files"),
        Setting("save_conf", "bool", False, "add the score to save_txt lines"),
        Setting("show", "bool", False, "display results in a window"),
        Setting("line_width", "int", None, "box line width; empty = auto", low=1, example="2"),
        Setting("vid_stride", "int", 1, "process every Nth video frame", low=1),
    )),
    ("Export", (
        Setting("format", "str", "onnx", f"export format{EXPORT_EXTRAS}", choices=EXPORT_FORMAT_NAMES),
        Setting("dynamic", "bool", False, "dynamic batch, height and width axes"),
        Setting("simplify", "bool", False, "simplify the ONNX graph with onnxslim"),
        Setting("opset", "int", None, "ONNX opset; empty = exporter default", low=7, example="17"),
        Setting("half", "bool", False, "FP16 export: ONNX and TorchScript on CUDA (device=0), OpenVINO on the CPU "
                "(FP16 weights)"),
        Setting("int8", "bool", False, "INT8 export (format=onnx: ONNX Runtime static quantization; format=openvino: "
                "NNCF), calibrated on the train images of data= (not given: the checkpoint's training data) and "
                "checked by AP on its val images; writes <stem>_int8"),
        Setting("calib_method", "str", "minmax", "how INT8 calibration sets each activation's range: minmax (the "
                "observed min and max), percentile (clips outliers) or entropy (minimises the KL divergence)",
                choices=("minmax", "percentile", "entropy")),
        Setting("nms", "bool", False, "embed NMS in the exported graph, output (B, max_det, 6)"),
    )),
    ("Other", (
        Setting("cfg", "str", None, "a YAML of overrides for this file", example="my.yaml"),
    )),
)
SETTINGS: dict[str, Setting] = {setting.name: setting for _, group in SECTIONS for setting in group}
MODE_SECTIONS: dict[str, tuple[str, ...]] = {  # the sections `crosskd MODE --help` lists, besides MODE_COMMON_KEYS
    "train": ("Mode and inputs", "Training", "Augmentation", "Other"),
    "distill": ("Mode and inputs", "Distillation", "Training", "Augmentation", "Other"),
    "val": ("Mode and inputs", "Validation and prediction", "Other"),
    "predict": ("Mode and inputs", "Validation and prediction", "Other"),
    "export": ("Mode and inputs", "Export", "Other"),
    "benchmark": ("Mode and inputs", "Validation and prediction", "Export", "Other"),
    "info": ("Mode and inputs", "Other"),
    "convert": ("Mode and inputs", "Other"),
    "analyze": ("Mode and inputs", "Distillation", "Validation and prediction", "Other"),
}
MODE_COMMON_KEYS = ("imgsz", "batch", "device", "workers", "project", "name", "exist_ok", "verbose")
ALIASES: dict[str, str] = {alias: setting.name for setting in SETTINGS.values() for alias in setting.aliases}


def format_value(value: Any) -> str:
    """How a value is written on the command line: `true`, `[8,11]`, empty for None."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(item) for item in value) + "]"
    return str(value)


def _yaml_value(value: Any) -> str:
    """A default as a YAML flow scalar or list: `true`, `0.0001`, `[8, 11]`, empty for None."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    return format_value(value)


def _comment(setting: Setting) -> str:
    """The default.yaml comment of a key: its help, choices and aliases."""
    text = setting.help + (f": {' | '.join(setting.choices)}" if setting.choices else "")
    return text + (f" (alias {', '.join(setting.aliases)})" if setting.aliases else "")


def render_mode_help(mode: str, values: dict[str, Any] | None = None) -> str:
    """`crosskd MODE --help`: the mode's keys as `key=value  # help`, grouped by section; `values` replaces the
    defaults shown (the values a run would use, e.g. the model's recipe after `crosskd train model=x.yaml --help`)."""
    values = values or {}
    lines = [f"crosskd {mode} key=value ...  (every key: crosskd cfg; reference: docs/cli.md)"]
    sections = MODE_SECTIONS.get(mode, tuple(title for title, _ in SECTIONS))
    for title, group in SECTIONS:
        shown = [s for s in group if s.name != "mode" and (title in sections or s.name in MODE_COMMON_KEYS)]
        if shown:
            lines += ["", f"{title}:"]
            lines += [f"  {s.name + '=' + format_value(values.get(s.name, s.default)):<22} # {_comment(s)}"
                      for s in shown]
    return "\n".join(lines)


def render_default_yaml() -> str:
    """The text of cfg/default.yaml: every setting's default with its comment, grouped in sections."""
    lines = [
        "# crosskd default settings. Every key a mode accepts lives here; `crosskd cfg` prints them.",
        "# Precedence (lowest → highest): this file ← cfg=my.yaml ← command-line key=value.",
        "# Generated from crosskd/settings.py by `python -m crosskd.settings`: edit the spec there, not this file.",
    ]
    for title, group in SECTIONS:
        lines += ["", f"# {title} ".ljust(79, "-")]
        for setting in group:
            value = _yaml_value(setting.default)
            lines.append(f"{setting.name}:{' ' + value if value else ''}  # {_comment(setting)}")
    return "\n".join(lines) + "\n"


def _allowed(setting: Setting) -> str:
    """The docs' 'allowed' cell: choices, a range or nothing."""
    if setting.choices:
        return ", ".join(f"`{choice}`" for choice in setting.choices)
    return setting.range_text()


def _reference_row(setting: Setting) -> str:
    default = f"`{format_value(setting.default)}`" if setting.default is not None else "empty"
    aliases = ", ".join(f"`{alias}`" for alias in setting.aliases)
    cells = (f"`{setting.name}`", default, KIND_NAMES[setting.kind], _allowed(setting), aliases, setting.help)
    return "| " + " | ".join(cells) + " |"


def render_cli_reference() -> str:
    """The text of docs/cli.md: usage and one table per section (key, default, kind, allowed values, aliases)."""
    lines = [
        "# Command-line reference",
        "",
        "<!-- Generated from crosskd/settings.py by `python -m crosskd.settings`; edit the spec there. -->",
        "",
        f"`crosskd MODE key=value ...` where MODE is one of {', '.join(f'`{mode}`' for mode in MODES)}. "
        "Settings merge, lowest to highest: `cfg/default.yaml` ← the `cfg=` YAML ← command-line `key=value` "
        "(or the overrides dict of a Python call). A bare bool key means `key=true`. `key=` (or `key=none`) is an "
        "empty value, valid where the default is empty (for `kd` it means `none`). Choices match case-insensitively; "
        "a range applies to every item of a list. "
        "`crosskd cfg` prints `cfg/default.yaml`; `crosskd help` lists the special commands.",
    ]
    for title, group in SECTIONS:
        lines += ["", f"## {title}", "", "| key | default | value | allowed | aliases | help |", "|---" * 6 + "|"]
        lines += [_reference_row(setting) for setting in group]
    return "\n".join(lines) + "\n"


def write_generated_files() -> list[Path]:
    """Regenerate cfg/default.yaml and, in a source checkout, docs/cli.md; return the files written."""
    written = [DEFAULT_CFG_PATH]
    DEFAULT_CFG_PATH.write_text(render_default_yaml())
    if CLI_REFERENCE_PATH.parent.is_dir():
        CLI_REFERENCE_PATH.write_text(render_cli_reference())
        written.append(CLI_REFERENCE_PATH)
    return written


if __name__ == "__main__":
    for path in write_generated_files():
        print(f"wrote {path}")
