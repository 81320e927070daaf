"""Pretrained-weight import: PyTorch ResNet parity, the TFLite MobileNetV2 on real bird photos,
and clear errors on bad files.

Independent references: a PyTorch ResNet written here (no torchvision), the TFLite interpreter
(`ai_edge_litert` or `tflite_runtime`, when installed) and the ImageNet label file.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED, TFLITE_PATH
from safetensors.numpy import save_file
from torch_resnet import STAGES, torch_resnet

from fdh_jax.models.backbones import get_backbone
from fdh_jax.models.pretrained import (
    PretrainedWeightsError,
    calibrate_folded_batch_norm,
    graft_backbone,
    load_pretrained,
)

LABELS_PATH = SHARED / "weights" / "imagenet_labels.txt"
CUB_ROOT = SHARED / "data" / "cub100"


# ----------------------------------------------------------------------------------------------
# PyTorch reference ResNet (torchvision layout and state-dict names, written out here)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize(("name", "depth"), [("resnet18", 18), ("resnet50", 50)])
def test_resnet_safetensors_matches_pytorch(tmp_path, name, depth):
    torch = pytest.importorskip("torch")
    num_classes = 10
    torch_model = torch_resnet(depth, num_classes)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.numpy() for k, v in torch_model.state_dict().items()}, str(path))

    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    expected = {
        k: v.numpy().transpose(0, 2, 3, 1) if v.ndim == 4 else v.numpy()
        for k, v in expected.items()
    }

    model = get_backbone(name, num_classes=num_classes)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    variables = load_pretrained(name, str(path), template)
    actual = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)

    for key in (*STAGES, "logits"):
        assert actual[key].shape == expected[key].shape, key
        error = _relative_error(np.asarray(actual[key]), expected[key])
        assert error < 1e-4, f"{name} {key}: relative error {error:.2e}"


def test_resnet_without_classifier_skips_fc_and_grafts_into_a_model(tmp_path):
    """A backbone with `num_classes=0` ignores the file's `fc.*`; grafting keeps its function."""
    torch = pytest.importorskip("torch")
    torch_model = torch_resnet(18, 5)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.numpy() for k, v in torch_model.state_dict().items()}, str(path))

    class Wrapper(nn.Module):  # stands in for the FDH model: the backbone under "backbone"
        def setup(self):
            self.backbone = get_backbone("resnet18")
            self.head = nn.Dense(3)

        def __call__(self, images):
            return self.head(self.backbone(images, train=False)["C5"].mean(axis=(1, 2)))

    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    backbone = get_backbone("resnet18")
    template = jax.eval_shape(lambda: backbone.init(jax.random.key(0), images))
    backbone_variables = load_pretrained("resnet18", str(path), template)
    wrapper_variables = jax.jit(Wrapper().init)(jax.random.key(1), images)
    grafted = graft_backbone(wrapper_variables, backbone_variables)

    with torch.no_grad():
        c5 = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2)))["C5"].numpy()
    pooled = c5.mean(axis=(2, 3))
    head = grafted["params"]["head"]
    expected = pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    actual = np.asarray(jax.jit(Wrapper().apply)(grafted, images))
    assert _relative_error(actual, expected) < 1e-4

    bad = {**backbone_variables, "params": dict(backbone_variables["params"])}
    bad["params"]["conv1"] = {"kernel": np.zeros((3, 3, 3, 64), np.float32)}
    with pytest.raises(
        PretrainedWeightsError, match=r"conv1/kernel.*\(7, 7, 3, 64\).*\(3, 3, 3, 64\)"
    ):
        graft_backbone(wrapper_variables, bad)


# ----------------------------------------------------------------------------------------------
# Bad files


@pytest.fixture(scope="module")
def narrow_template():
    model = get_backbone("resnet_narrow", width=8, num_classes=4)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def _torchvision_state_dict(template) -> dict[str, np.ndarray]:
    """A state dict with torchvision names and layouts for a Flax ResNet template."""
    from fdh_jax.models.pretrained import torchvision_key

    state = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(template[collection])[0]:
            names = tuple(p.key for p in path)
            shape = tuple(leaf.shape)
            if names[-1] == "kernel" and len(shape) == 4:
                shape = (shape[3], shape[2], shape[0], shape[1])
            elif names[-1] == "kernel":
                shape = shape[::-1]
            state[torchvision_key(names)] = np.ones(shape, np.float32)
    return state


def test_wrongly_shaped_tensor_names_key_and_both_shapes(tmp_path, narrow_template):
    state = _torchvision_state_dict(narrow_template)
    assert state["layer2.0.conv1.weight"].shape == (16, 8, 3, 3)
    state["layer2.0.conv1.weight"] = np.ones((16, 8, 5, 5), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(PretrainedWeightsError) as error:
        load_pretrained("resnet_narrow", str(path), narrow_template)
    message = str(error.value)
    assert "layer2.0.conv1.weight" in message
    assert "(16, 8, 5, 5)" in message and "(3, 3, 8, 16)" in message, message


def test_missing_and_unexpected_keys_are_named(tmp_path, narrow_template):
    state = _torchvision_state_dict(narrow_template)
    del state["layer3.0.downsample.1.running_var"]
    path = tmp_path / "missing.safetensors"
    save_file(state, str(path))
    with pytest.raises(PretrainedWeightsError, match=r"layer3\.0\.downsample\.1\.running_var"):
        load_pretrained("resnet_narrow", str(path), narrow_template)

    state = _torchvision_state_dict(narrow_template)
    state["layer1.0.conv3.weight"] = np.ones((8, 8, 1, 1), np.float32)  # a bottleneck's conv
    save_file(state, str(path))
    with pytest.raises(PretrainedWeightsError, match=r"unexpected key 'layer1\.0\.conv3\.weight'"):
        load_pretrained("resnet_narrow", str(path), narrow_template)


def test_missing_file_names_the_path(tmp_path, narrow_template):
    missing = tmp_path / "nowhere" / "resnet.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_pretrained("resnet_narrow", str(missing), narrow_template)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mobilenet.tflite")):
        load_pretrained("mobilenet_v2", str(tmp_path / "mobilenet.tflite"), narrow_template)


# ----------------------------------------------------------------------------------------------
# MobileNetV2 from the released TFLite model, on real CUB photos


def _require_shared(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            pytest.skip(f"shared data not found: {path} (set FDH_SHARED to the shared folder)")


def _bird_outputs(labels: list[str]) -> set[int]:
    """Outputs of the 1001-way model that are ImageNet bird classes.

    ImageNet-1k birds are classes 7..24, 80..100 and 127..146; the model's output 0 is
    "background", so ImageNet class i is output i + 1.
    """
    imagenet_birds = [*range(7, 25), *range(80, 101), *range(127, 147)]
    outputs = {i + 1 for i in imagenet_birds}
    assert labels[0] == "background" and len(labels) == 1001
    assert labels[8] == "cock" and labels[25].startswith("great grey owl"), "label file order"
    assert labels[81] == "black grouse" and labels[101].startswith("black swan"), "label order"
    assert labels[128].startswith("white stork") and labels[147].startswith("albatross")
    return outputs


def _sample_cub_images(per_class: int, seed: int) -> list[Path]:
    """`per_class` images of every CUB class folder, seeded."""
    rng = np.random.default_rng(seed)
    files = []
    for class_dir in sorted(p for p in (CUB_ROOT / "images").iterdir() if p.is_dir()):
        class_files = sorted(class_dir.glob("*.jpg"))
        files += [class_files[i] for i in rng.choice(len(class_files), per_class, replace=False)]
    return files


def _load_uint8(files: list[Path], size: int = 224) -> np.ndarray:
    """`[N, size, size, 3] uint8`, bilinear resize of each RGB image."""
    from PIL import Image

    return np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR))
            for f in files
        ]
    )


def _imagenet_normalised(pixels: np.ndarray) -> np.ndarray:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((pixels / 255.0 - mean) / std).astype(np.float32)


@pytest.fixture(scope="module")
def mobilenet_with_tflite_weights():
    _require_shared(TFLITE_PATH)
    model = get_backbone("mobilenet_v2", num_classes=1001)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    return model, load_pretrained("mobilenet_v2", str(TFLITE_PATH), template)


def test_tflite_mobilenet_classifies_cub_photos_as_birds(mobilenet_with_tflite_weights):
    _require_shared(LABELS_PATH, CUB_ROOT / "images")
    model, variables = mobilenet_with_tflite_weights
    labels = LABELS_PATH.read_text().splitlines()
    birds = _bird_outputs(labels)
    files = _sample_cub_images(per_class=2, seed=0)
    assert len(files) == 200
    images = _imagenet_normalised(_load_uint8(files))
    apply = jax.jit(lambda v, x: model.apply(v, x)["logits"])
    predictions = np.concatenate(
        [np.asarray(apply(variables, images[i : i + 50])).argmax(-1) for i in range(0, 200, 50)]
    )
    is_bird = np.array([p in birds for p in predictions])
    report = "\n".join(
        f"  {f.parent.name}/{f.name} -> {labels[p]} ({'bird' if p in birds else 'NOT A BIRD'})"
        for f, p in list(zip(files, predictions, strict=True))[::25]
    )
    non_birds = [labels[p] for p in predictions[~is_bird]]
    summary = f"bird top-1: {is_bird.mean():.1%} of {len(files)}; non-bird: {non_birds[:10]}"
    print(f"\n{summary}\n{report}")
    assert is_bird.mean() >= 0.9, f"{summary}\n{report}"


def _tflite_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            pytest.skip("no TFLite interpreter (pip install ai-edge-litert) to compare against")
    return Interpreter


@pytest.mark.filterwarnings("ignore:.*experimental_preserve_all_tensors")
def test_flax_mobilenet_matches_tflite_interpreter(mobilenet_with_tflite_weights):
    """The float Flax network against the int8 interpreter: equal up to quantisation noise."""
    _require_shared(CUB_ROOT / "images")
    interpreter_class = _tflite_interpreter_class()
    model, variables = mobilenet_with_tflite_weights
    interpreter = interpreter_class(
        model_path=str(TFLITE_PATH), experimental_preserve_all_tensors=True
    )
    interpreter.allocate_tensors()
    input_details = interpreter.get_input_details()[0]
    input_scale, input_zero_point = input_details["quantization"]
    # The pre-softmax logits: the tensor feeding the SOFTMAX op (the graph's last float logits).
    logits_details = next(
        d for d in interpreter.get_tensor_details() if d["name"].endswith("SpatialSqueeze/Reshape")
    )
    pixels = _load_uint8(_sample_cub_images(per_class=1, seed=1)[::10])  # 10 images
    # Feed the Flax model exactly the interpreter's dequantised input.
    minus_one_to_one = model.clone(input_range="minus_one_to_one")
    flax_inputs = (pixels.astype(np.float32) - input_zero_point) * input_scale
    flax_logits = np.asarray(jax.jit(minus_one_to_one.apply)(variables, flax_inputs)["logits"])
    errors, agreements = [], []
    for image, ours in zip(pixels, flax_logits, strict=True):
        interpreter.set_tensor(input_details["index"], image[None])
        interpreter.invoke()
        scale, zero_point = logits_details["quantization"]
        reference = (
            interpreter.get_tensor(logits_details["index"]).reshape(-1).astype(np.float32)
            - zero_point
        ) * scale
        errors.append(_relative_error(ours, reference))
        agreements.append(ours.argmax() == reference.argmax())
    print(f"\nFlax vs TFLite int8 logits: relative errors {np.round(errors, 3)}")
    assert np.median(errors) < 0.15, errors
    assert np.mean(agreements) >= 0.8, agreements


def test_calibrated_batch_norm_keeps_eval_output_and_matches_train_mode(
    mobilenet_with_tflite_weights,
):
    """Calibrated on a batch: eval output unchanged, train mode on that batch equals it."""
    _require_shared(CUB_ROOT / "images")
    model, variables = mobilenet_with_tflite_weights
    backbone = get_backbone("mobilenet_v2")
    backbone_variables = {
        "params": {k: v for k, v in variables["params"].items() if k != "classifier"},
        "batch_stats": variables["batch_stats"],
    }
    images = _imagenet_normalised(_load_uint8(_sample_cub_images(1, seed=2)[::25], size=96))
    calibrated = calibrate_folded_batch_norm(backbone, backbone_variables, images)
    before = jax.jit(backbone.apply)(backbone_variables, images)["C5"]
    after = jax.jit(backbone.apply)(calibrated, images)["C5"]
    assert _relative_error(np.asarray(after), np.asarray(before)) < 1e-4
    train_mode, _ = jax.jit(lambda v, x: backbone.apply(v, x, train=True, mutable=["batch_stats"]))(
        calibrated, images
    )
    assert _relative_error(np.asarray(train_mode["C5"]), np.asarray(before)) < 1e-3
    identity_train, _ = jax.jit(
        lambda v, x: backbone.apply(v, x, train=True, mutable=["batch_stats"])
    )(backbone_variables, images)
    assert _relative_error(np.asarray(identity_train["C5"]), np.asarray(before)) > 0.1


def test_hub_path_fails_fast_when_offline(monkeypatch, narrow_template):
    """`hf://` without cache or network fails at once with what to do, never hangs."""
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(
        FileNotFoundError, match=r"hf://timm/fdh-test-no-such-model.*model\.safetensors"
    ):
        load_pretrained("resnet_narrow", "hf://timm/fdh-test-no-such-model", narrow_template)
    assert time.monotonic() - start < 10
