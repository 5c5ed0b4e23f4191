"""YOLOv8 / YOLO11 bodies (crosskd/models/yolo): sizes against Ultralytics 8.4, shapes, and the model YAMLs' scales."""

import pytest
import torch
import yaml

from crosskd.engine.tools.info import _part_children
from crosskd.errors import ConfigError
from crosskd.models.build import build_detector, load_model_yaml, resolve_model_file, scale_kwargs
from crosskd.models.yolo import YOLOBackbone, YOLONeck
from crosskd.models.yolo.blocks import Bottleneck, C3k
from crosskd.paths import CFG_DIR

MODELS_DIR = CFG_DIR / "models"

# Parameters of Ultralytics 8.4.190's DetectionModel('<name>.yaml', nc=80): layers 0..B-1 (backbone) and B..D-1
# (neck, D = Detect's index), counted with the peer install; Detect adds the rest of Ultralytics' totals.
ULTRALYTICS_BODY_PARAMS = {
    "yolov8n": (1_272_656, 986_880),
    "yolov8s": (5_079_712, 3_939_840),
    "yolov8m": (11_855_856, 10_224_768),
    "yolov8l": (19_808_576, 18_238_464),
    "yolov8x": (30_943_120, 28_491_520),
    "yolo11n": (1_365_472, 793_696),
    "yolo11s": (5_441_984, 3_166_400),
    "yolo11m": (10_352_192, 8_289_792),
    "yolo11l": (12_833_600, 11_065_856),
    "yolo11x": (28_847_328, 24_880_896),
}


def body_parts(name: str, device: str = "cpu") -> tuple[YOLOBackbone, YOLONeck]:
    """Backbone and neck of a shipped YOLO YAML name (yolo11n.yaml ...), built as build_detector builds them."""
    cfg, _ = load_model_yaml(f"{name}.yaml")
    scaling = scale_kwargs(cfg)
    sections = {part: {k: v for k, v in cfg[part].items() if k != "type"} for part in ("backbone", "neck")}
    with torch.device(device):
        backbone = YOLOBackbone(**sections["backbone"], **scaling)
        neck = YOLONeck(backbone.out_channels, **sections["neck"], **scaling)
    return backbone, neck


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ULTRALYTICS_BODY_PARAMS)
def test_body_parameters_equal_ultralytics(name):
    backbone, neck = body_parts(name, device="meta")  # sizes only: no memory, no forward
    assert (count(backbone), count(neck)) == ULTRALYTICS_BODY_PARAMS[name]
    assert len(backbone.layers) == (10 if name.startswith("yolov8") else 11) and len(neck.layers) == 12


def test_yolo11_c3k_override_at_scales_m_l_x():
    """Ultralytics gives every C3k2 C3k blocks at m/l/x, also those whose table row says c3k=False (layer 2)."""
    small, _ = body_parts("yolo11s", device="meta")
    medium, _ = body_parts("yolo11m", device="meta")
    assert isinstance(small.layers[2].m[0], Bottleneck) and isinstance(small.layers[6].m[0], C3k)
    assert isinstance(medium.layers[2].m[0], C3k)


@pytest.mark.parametrize(
    ("name", "p_channels", "n_channels"),
    [("yolov8n", [64, 128, 256], [64, 128, 256]), ("yolo11n", [128, 128, 256], [64, 128, 256])],
)
def test_body_output_shapes_and_strides(name, p_channels, n_channels):
    torch.manual_seed(0)
    backbone, neck = body_parts(name)
    backbone.eval(), neck.eval()
    assert backbone.out_channels == p_channels and neck.out_channels == n_channels
    assert backbone.strides == neck.strides == [8, 16, 32]
    with torch.no_grad():
        p_maps = backbone(torch.rand(2, 3, 64, 96))
        n_maps = neck(p_maps)
    sizes = [(8, 12), (4, 6), (2, 3)]  # 64x96 at strides 8, 16, 32
    assert [tuple(m.shape) for m in p_maps] == [(2, c, *hw) for c, hw in zip(p_channels, sizes)]
    assert [tuple(m.shape) for m in n_maps] == [(2, c, *hw) for c, hw in zip(n_channels, sizes)]
    assert all(torch.isfinite(m).all() for m in n_maps)


def test_state_dict_keys_follow_ultralytics_layer_indices():
    backbone, neck = body_parts("yolo11n", device="meta")
    keys = set(backbone.state_dict()) | {f"neck.{k}" for k in neck.state_dict()}
    assert "layers.10.m.0.attn.qkv.conv.weight" in keys  # model.10: C2PSA
    assert "layers.8.m.0.m.1.cv2.bn.running_var" in keys  # model.8: C3k2 with C3k blocks
    assert "neck.layers.11.m.0.cv1.conv.weight" in keys  # model.22 = neck layer 22 - 11
    assert not any(k.startswith(("neck.layers.0.", "neck.layers.1.")) for k in keys)  # Upsample, Concat: no params


def test_scaled_name_resolves_to_family_yaml_at_that_scale():
    assert resolve_model_file("yolo11s.yaml") == (MODELS_DIR / "yolo11.yaml", "s")
    assert resolve_model_file("yolov8x") == (MODELS_DIR / "yolov8.yaml", "x")
    assert resolve_model_file("gfl_r18s.yaml") == (MODELS_DIR / "gfl_r18s.yaml", None)  # an existing name wins
    cfg, source = load_model_yaml("yolo11m.yaml")
    assert (cfg["scale"], cfg["name"], source) == ("m", "yolo11m", "yolo11m.yaml")
    assert scale_kwargs(cfg) == {"depth": 0.5, "width": 1.0, "max_channels": 512, "c3k": True}
    plain, _ = load_model_yaml("yolo11.yaml")
    assert (plain["scale"], plain["name"]) == ("n", "yolo11n")  # the file's own scale:


def test_bad_scale_letter_is_one_config_error_naming_the_scales():
    with pytest.raises(ConfigError, match=r"yolo11q\.yaml: scale 'q' is not one of the scales n, s, m, l, x"):
        load_model_yaml("yolo11q.yaml")
    cfg = yaml.safe_load((MODELS_DIR / "yolov8.yaml").read_text())
    with pytest.raises(ConfigError, match="scale 'z' is not one of the scales n, s, m, l, x"):
        load_model_yaml({**cfg, "scale": "z"})
    with pytest.raises(ConfigError, match="neither a file nor a YAML"):  # gfl_r18.yaml has no scales: table
        load_model_yaml("gfl_r18q.yaml")


def test_scale_arguments_come_from_scale_only():
    resnet = yaml.safe_load((MODELS_DIR / "gfl_r18t.yaml").read_text())
    cfg = yaml.safe_load((MODELS_DIR / "yolo11.yaml").read_text())
    cfg["backbone"]["width"] = 0.5
    cfg["head"] = resnet["head"]  # the check comes before any part is built
    with pytest.raises(ConfigError, match=r"backbone\.width is set by scale: n; drop it"):
        build_detector(cfg, nc=3)
    with pytest.raises(ConfigError, match="scale: needs a backbone that takes depth, width, max_channels, c3k"):
        build_detector({**resnet, "scales": {"n": [0.5, 0.25, 1024]}, "scale": "n"}, nc=3)


def test_info_table_lists_every_body_layer_by_ultralytics_index():
    backbone, neck = body_parts("yolov8n", device="meta")
    rows = _part_children(neck)
    assert [name for name, _ in rows] == [f"layers.{i}" for i in range(12)]  # neck layer i is Ultralytics' 10 + i
    assert [type(layer).__name__ for _, layer in rows[:3]] == ["Upsample", "Concat", "C2f"]
    assert len(_part_children(backbone)) == 10


@pytest.mark.parametrize(("name", "params"), [("yolov8n", 3_157_200), ("yolov8s", 11_166_560), ("yolo11n", 2_624_080),
                                              ("yolo11s", 9_458_752), ("yolo11m", 20_114_688)])
def test_whole_model_has_ultralytics_parameter_count(name, params):
    with torch.device("meta"):
        detector = build_detector(f"{name}.yaml", 80)
    assert sum(p.numel() for p in detector.parameters()) == params
    assert detector.strides == [8, 16, 32] and detector.head_type == "yolo"


def test_whole_model_forward_at_64x96():
    torch.manual_seed(0)
    detector = build_detector("yolo11n.yaml", 3).eval()
    outputs = detector(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape) for m in outputs.cls_scores] == [(1, 3, 8, 12), (1, 3, 4, 6), (1, 3, 2, 3)]
    assert [m.shape[1] for m in outputs.bbox_preds] == [64, 64, 64]
