"""Pretrained backbone weights: torchvision/timm ResNets (.safetensors) and MobileNetV2 (.tflite).

Both loaders take the backbone's own Flax variables (`{"params", "batch_stats"}`, e.g. from
`get_backbone(name).init(...)`) as the template and return a copy with every leaf replaced by
the file's value, so the result has exactly the model's tree, shapes and dtypes. `graft_backbone`
then puts them under the FDH model's `backbone` submodule.

- ResNets: torchvision state-dict names (`layer1.0.downsample.0.weight`, `bn1.running_var`, ...),
  which timm's `resnet*.tv_in1k` / `resnet*.a1_in1k` files share. Conv weights OIHW -> HWIO,
  linear [out, in] -> [in, out], BN weight/bias/running_mean/running_var -> scale/bias/mean/var.
  Read with `safetensors.numpy`: no PyTorch at run time. `hf://timm/<model>` downloads
  `model.safetensors` with `huggingface_hub` (cache first, then network with a short timeout).
- MobileNetV2: the TFLite flatbuffer of the released post-training-quantised model, parsed with
  the `tflite` package. Weights are int8 with per-output-channel scales, dequantised as
  `(q - zero_point) * scale`; biases int32 with scale `input_scale * weight_scale` (stored per
  channel in the file). BatchNorm was folded into the convs when the model was exported, so each
  Flax BatchNorm is set to the identity plus the folded bias: `scale = 1`, `mean = 0`,
  `var = 1 - eps` (chosen so that `var + eps == 1` exactly in float32), `bias = folded bias`.
  In eval mode (`train=False`) the network is then exactly the TFLite float graph. In train mode
  BatchNorm normalises with batch statistics that these identity statistics know nothing about;
  `calibrate_folded_batch_norm` replaces them with statistics measured on real images (same
  eval-mode function, and train mode starts close to it).
"""

import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import tflite
from flax.core import unfreeze
from safetensors.numpy import load_file

from fdh_jax.models import mobilenet

Variables = dict[str, Any]
HF_PREFIX = "hf://"
HF_TIMEOUT_SECONDS = 5.0


class PretrainedWeightsError(ValueError):
    """A weights file does not match the model (missing, unexpected or mis-shaped tensor)."""


def load_pretrained(name: str, path: str, variables: Mapping[str, Any]) -> Variables:
    """Returns `variables` with every leaf taken from the weights file at `path`.

    Args:
      name: backbone name (`fdh_jax.models.backbones.BACKBONES`): `resnet*` read `.safetensors`
        with torchvision key names (or `hf://timm/<model>`), `mobilenet_v2` a `.tflite` file.
      path: file path, or `hf://<repo>` for a Hugging Face Hub safetensors checkpoint.
      variables: the backbone's variables `{"params": ..., "batch_stats": ...}` (arrays or
        `jax.ShapeDtypeStruct`s); only their structure, shapes and dtypes are used.

    Returns:
      `{"params": ..., "batch_stats": ...}` with the same tree, shapes and dtypes, as NumPy arrays.

    Raises:
      FileNotFoundError: `path` does not exist (the message names it).
      PretrainedWeightsError: a tensor is missing, unexpected or has the wrong shape (the
        message names the first offending key and both shapes).
    """
    if name.startswith("resnet"):
        tensors = read_safetensors(resolve_weights_path(path))
        return resnet_variables_from_torchvision(tensors, variables)
    if name == "mobilenet_v2":
        return mobilenet_v2_variables_from_tflite(_require_file(path), variables)
    raise ValueError(f"no pretrained-weights loader for backbone {name!r}")


def graft_backbone(
    model_variables: Mapping[str, Any],
    backbone_variables: Mapping[str, Any],
    submodule: str = "backbone",
) -> Variables:
    """Returns `model_variables` with `[collection][submodule]` replaced by the backbone's.

    Every collection of `backbone_variables` (params, batch_stats) must already exist under
    `submodule` in the model with the same tree and shapes (the model was built with the same
    backbone); the first difference raises `PretrainedWeightsError`. Leaves are cast to the
    model's dtypes. Other submodules are returned unchanged (not copied).
    """
    grafted = {collection: dict(tree) for collection, tree in unfreeze(model_variables).items()}
    for collection, backbone_tree in unfreeze(backbone_variables).items():
        if submodule not in grafted.get(collection, {}):
            raise PretrainedWeightsError(
                f"model variables have no {collection}/{submodule}; "
                f"top-level modules: {sorted(grafted.get(collection, {}))}"
            )
        target = grafted[collection][submodule]
        target_leaves = dict(_flatten(target))
        source_leaves = dict(_flatten(backbone_tree))
        for key, leaf in target_leaves.items():
            where = f"{collection}/{submodule}/{'/'.join(key)}"
            if key not in source_leaves:
                raise PretrainedWeightsError(f"backbone variables lack {where}")
            if tuple(source_leaves[key].shape) != tuple(leaf.shape):
                raise PretrainedWeightsError(
                    f"{where}: model shape {tuple(leaf.shape)}, "
                    f"backbone shape {tuple(source_leaves[key].shape)}"
                )
        for key in source_leaves:
            if key not in target_leaves:
                raise PretrainedWeightsError(
                    f"backbone variable {collection}/{submodule}/{'/'.join(key)} has no place "
                    "in the model"
                )
        grafted[collection][submodule] = _unflatten(
            {key: np.asarray(source_leaves[key], leaf.dtype) for key, leaf in target_leaves.items()}
        )
    return grafted


# ----------------------------------------------------------------------------------------------
# Files


def _require_file(path: str | os.PathLike) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {file} (pass an existing file to "
            "--config.model.pretrained, or '' for random initialisation)"
        )
    return file


def resolve_weights_path(path: str) -> Path:
    """Local path of a weights file; `hf://<org>/<model>` is fetched from the Hugging Face Hub.

    A Hub checkpoint is taken from the local cache if present, else downloaded with
    `huggingface_hub` when it is importable and the Hub answers within a few seconds. Otherwise
    this fails at once with what to do instead (it never waits on an unreachable host).
    """
    if not path.startswith(HF_PREFIX):
        return _require_file(path)
    repo_id = path[len(HF_PREFIX) :].strip("/")
    how_to = (
        f"download https://huggingface.co/{repo_id}/resolve/main/model.safetensors where there "
        "is network and pass it as --config.model.pretrained=FILE (or "
        "--config.model.pretrained='' to start from random weights)"
    )
    try:
        import huggingface_hub
    except ImportError as error:
        raise FileNotFoundError(
            f"{path}: huggingface_hub is not installed (pip install 'fdh_jax[hf]'); {how_to}"
        ) from error
    try:
        return Path(
            huggingface_hub.hf_hub_download(repo_id, "model.safetensors", local_files_only=True)
        )
    except Exception:  # not cached (the exception type differs between hub versions)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(
            f"{path}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; {how_to}"
        )
    try:
        socket.create_connection(("huggingface.co", 443), timeout=HF_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise FileNotFoundError(
            f"{path}: not in the Hugging Face cache and huggingface.co is unreachable "
            f"({error}); {how_to}"
        ) from error
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(HF_TIMEOUT_SECONDS)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(HF_TIMEOUT_SECONDS)))
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, "model.safetensors"))
    except Exception as error:
        raise FileNotFoundError(f"{path}: download failed ({error}); {how_to}") from error


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file as NumPy arrays (no PyTorch needed)."""
    try:
        return load_file(str(path))
    except Exception as error:
        raise PretrainedWeightsError(f"cannot read {path} as safetensors: {error}") from error


# ----------------------------------------------------------------------------------------------
# ResNets: torchvision state-dict names


def torchvision_key(flax_path: tuple[str, ...]) -> str:
    """torchvision state-dict key of a Flax ResNet variable path.

    `("layer1_0", "downsample_bn", "var")` -> `"layer1.0.downsample.1.running_var"`.
    """
    *modules, leaf = flax_path
    names = []
    for module in modules:
        module = re.sub(r"^layer(\d+)_(\d+)$", r"layer\1.\2", module)
        module = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(
            module, module
        )
        names.append(module)
    leaf_name = {"kernel": "weight", "scale": "weight", "mean": "running_mean"}.get(leaf, leaf)
    leaf_name = {"var": "running_var"}.get(leaf_name, leaf_name)
    return ".".join([*names, leaf_name])


def _torch_to_flax(tensor: np.ndarray, leaf: str, flax_ndim: int) -> np.ndarray:
    """Converts a torch tensor to Flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if leaf == "kernel" and tensor.ndim == 4:
        return tensor.transpose(2, 3, 1, 0)
    if leaf == "kernel" and tensor.ndim == 2 and flax_ndim == 2:
        return tensor.T
    return tensor


# Keys a torchvision/timm file may hold that a Flax ResNet has no variable for.
_IGNORED_TORCH_KEY = re.compile(r"(^|\.)num_batches_tracked$")


def resnet_variables_from_torchvision(
    tensors: Mapping[str, np.ndarray], variables: Mapping[str, Any]
) -> Variables:
    """Fills a Flax ResNet's `variables` from a torchvision-named state dict.

    A classifier in the file (`fc.*`) is skipped when the model has none (`num_classes=0`);
    any other tensor the model does not use is an error, as is a missing or mis-shaped one.
    """
    loaded: Variables = {}
    used = set()
    for collection, tree in unfreeze(variables).items():
        if collection not in ("params", "batch_stats"):
            continue
        leaves = {}
        for path, template in _flatten(tree):
            key = torchvision_key(path)
            if key not in tensors:
                raise PretrainedWeightsError(
                    f"missing key {key!r} (for Flax {collection}/{'/'.join(path)}, shape "
                    f"{tuple(template.shape)}) in the weights file"
                )
            value = _torch_to_flax(np.asarray(tensors[key]), path[-1], len(template.shape))
            if tuple(value.shape) != tuple(template.shape):
                raise PretrainedWeightsError(
                    f"shape mismatch for key {key!r}: file {tuple(tensors[key].shape)} "
                    f"(Flax layout {tuple(value.shape)}), model {tuple(template.shape)} "
                    f"at {collection}/{'/'.join(path)}"
                )
            leaves[path] = value.astype(template.dtype)
            used.add(key)
        loaded[collection] = _unflatten(leaves)
    model_has_classifier = any(key.startswith("fc.") for key in used)
    for key in tensors:
        if key in used or _IGNORED_TORCH_KEY.search(key):
            continue
        if key.startswith("fc.") and not model_has_classifier:
            continue
        raise PretrainedWeightsError(
            f"unexpected key {key!r} (shape {tuple(tensors[key].shape)}) in the weights file: "
            "the model has no such variable (wrong backbone name?)"
        )
    return loaded


# ----------------------------------------------------------------------------------------------
# MobileNetV2: TFLite flatbuffer


def _builtin_operator_names() -> dict[int, str]:
    return {
        value: name
        for name, value in vars(tflite.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(value, int)
    }


def _dequantised_tensor(subgraph, buffers, index: int) -> np.ndarray:
    """Float value of a constant tensor: `(q - zero_point) * scale` along its quantised axis."""
    tensor = subgraph.Tensors(index)
    dtypes = {
        tflite.TensorType.FLOAT32: np.float32,
        tflite.TensorType.INT8: np.int8,
        tflite.TensorType.UINT8: np.uint8,
        tflite.TensorType.INT32: np.int32,
    }
    if tensor.Type() not in dtypes:
        raise PretrainedWeightsError(
            f"TFLite tensor {tensor.Name().decode()!r} has unsupported type {tensor.Type()}"
        )
    raw = buffers(tensor.Buffer()).DataAsNumpy()
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
    values = np.frombuffer(raw.tobytes(), dtype=dtypes[tensor.Type()]).reshape(shape)
    if tensor.Type() == tflite.TensorType.FLOAT32:
        return values.astype(np.float32)
    quantization = tensor.Quantization()
    if quantization is None or quantization.ScaleLength() == 0:
        raise PretrainedWeightsError(f"TFLite tensor {tensor.Name().decode()!r} has no scale")
    scale = quantization.ScaleAsNumpy().astype(np.float64)
    zero_point = quantization.ZeroPointAsNumpy().astype(np.float64)
    broadcast = [1] * len(shape)
    if scale.size > 1:
        broadcast[quantization.QuantizedDimension()] = scale.size
    centred = values.astype(np.float64) - zero_point.reshape(broadcast)
    return (centred * scale.reshape(broadcast)).astype(np.float32)


def read_tflite_convs(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Reads the conv-like ops of a TFLite graph in graph order, dequantised to float32.

    Returns:
      convs: one dict per CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op with `op`, `name`
        (the weight tensor's name), `kernel` (TFLite layout: conv [O, H, W, I], depthwise
        [1, H, W, C], fully connected [O, I]), `bias: [O]`, `stride`, `padding` ("SAME" or
        "VALID"), `activation` ("NONE", "RELU", "RELU6", ...).
      op_counts: number of ops of each type (ADD, MEAN, RESHAPE, SOFTMAX, ...).
    """
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    if model.SubgraphsLength() != 1:
        raise PretrainedWeightsError(
            f"{path}: expected 1 subgraph, found {model.SubgraphsLength()}"
        )
    subgraph = model.Subgraphs(0)
    operator_names = _builtin_operator_names()
    activations = {
        value: name
        for name, value in vars(tflite.ActivationFunctionType).items()
        if not name.startswith("_") and isinstance(value, int)
    }
    convs, op_counts = [], {}
    for op_index in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(op_index)
        code = model.OperatorCodes(op.OpcodeIndex())
        op_name = operator_names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        op_counts[op_name] = op_counts.get(op_name, 0) + 1
        if op_name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        conv = _tflite_conv(model, subgraph, op, op_name, activations)
        convs.append(conv)
    return convs, op_counts


def _tflite_conv(model, subgraph, op, op_name: str, activations: dict) -> dict[str, Any]:
    """One CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op as `read_tflite_convs` returns it."""
    options = {
        "CONV_2D": tflite.Conv2DOptions,
        "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions,
        "FULLY_CONNECTED": tflite.FullyConnectedOptions,
    }[op_name]()
    table = op.BuiltinOptions()
    options.Init(table.Bytes, table.Pos)
    inputs = op.InputsAsNumpy()
    kernel = _dequantised_tensor(subgraph, model.Buffers, int(inputs[1]))
    if len(inputs) > 2 and inputs[2] >= 0:
        bias = _dequantised_tensor(subgraph, model.Buffers, int(inputs[2]))
    else:
        bias = np.zeros(kernel.shape[0 if op_name != "DEPTHWISE_CONV_2D" else -1], np.float32)
    conv = {
        "op": op_name,
        "name": subgraph.Tensors(int(inputs[1])).Name().decode(),
        "kernel": kernel,
        "bias": bias,
        "activation": activations[options.FusedActivationFunction()],
        "stride": 1,
        "padding": "VALID",
    }
    if op_name != "FULLY_CONNECTED":
        if options.StrideH() != options.StrideW():
            raise PretrainedWeightsError(f"{conv['name']}: unequal strides")
        conv["stride"] = options.StrideH()
        conv["padding"] = {tflite.Padding.SAME: "SAME", tflite.Padding.VALID: "VALID"}[
            options.Padding()
        ]
    if op_name == "DEPTHWISE_CONV_2D" and options.DepthMultiplier() != 1:
        raise PretrainedWeightsError(f"{conv['name']}: depth multiplier must be 1")
    return conv


def identity_batch_norm(bias: np.ndarray, epsilon: float) -> dict[str, dict[str, np.ndarray]]:
    """BatchNorm variables that compute `x + bias` in eval mode (see module docstring).

    Returns `{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`, each `[C]` float32.
    """
    one = np.float32(1.0)
    variance = one - np.float32(epsilon)
    if variance + np.float32(epsilon) != one:  # pick the float32 neighbour that sums to 1
        variance = np.nextafter(variance, one if variance + np.float32(epsilon) < one else 0)
    channels = bias.shape[0]
    return {
        "params": {"scale": np.ones(channels, np.float32), "bias": bias.astype(np.float32)},
        "batch_stats": {
            "mean": np.zeros(channels, np.float32),
            "var": np.full(channels, variance, np.float32),
        },
    }


def mobilenet_v2_variables_from_tflite(path: Path, variables: Mapping[str, Any]) -> Variables:
    """Fills a Flax `MobileNetV2`'s `variables` from the released TFLite model at `path`.

    The TFLite convs are matched to `mobilenet.conv_layers()` in graph order; each is checked for
    kind (depthwise or not), stride, 'SAME' padding, fused ReLU6 and shape. The classifier (a 1x1
    CONV_2D or FULLY_CONNECTED with 1001 outputs) is skipped when the model has none.
    """
    convs, op_counts = read_tflite_convs(path)
    params = unfreeze(variables)["params"]
    num_classes = params["classifier"]["kernel"].shape[-1] if "classifier" in params else 0
    _check_mobilenet_graph(path, convs, op_counts)
    params_out: dict[tuple[str, ...], np.ndarray] = {}
    stats_out: dict[tuple[str, ...], np.ndarray] = {}
    for layer, conv in zip(mobilenet.conv_layers(num_classes=num_classes), convs, strict=False):
        kernel = _flax_kernel(layer, conv, _lookup(params, (*layer.path, "kernel")))
        params_out[(*layer.path, "kernel")] = kernel
        if layer.path == ("classifier",):
            params_out[("classifier", "bias")] = conv["bias"].astype(kernel.dtype)
            continue
        norm_path = (*layer.path[:-1], layer.path[-1] + "_bn")
        norm = identity_batch_norm(conv["bias"], mobilenet.BATCH_NORM_EPSILON)
        for name in ("scale", "bias"):
            params_out[(*norm_path, name)] = norm["params"][name]
        for name in ("mean", "var"):
            stats_out[(*norm_path, name)] = norm["batch_stats"][name]
    loaded = {"params": params_out, "batch_stats": stats_out}
    for collection, leaves in loaded.items():
        template_leaves = dict(_flatten(unfreeze(variables)[collection]))
        _check_filled(path, collection, leaves, template_leaves)
        loaded[collection] = _unflatten(
            {key: value.astype(template_leaves[key].dtype) for key, value in leaves.items()}
        )
    return loaded


def _check_mobilenet_graph(path: Path, convs: list, op_counts: dict) -> None:
    """The TFLite graph has MobileNetV2 1.0's conv ops and residual ADDs, in number."""
    expected_convs = len(mobilenet.conv_layers(num_classes=1))
    if len(convs) != expected_convs:
        raise PretrainedWeightsError(
            f"{path}: {len(convs)} conv ops, MobileNetV2 1.0 with a classifier has {expected_convs}"
        )
    expected_adds = sum(
        1
        for _, in_features, _, out_features, stride in mobilenet.block_specs()
        if stride == 1 and in_features == out_features
    )
    if op_counts.get("ADD", 0) != expected_adds:
        raise PretrainedWeightsError(
            f"{path}: {op_counts.get('ADD', 0)} ADD ops, MobileNetV2 has {expected_adds} residuals"
        )


def _flax_kernel(layer, conv: dict, template: np.ndarray) -> np.ndarray:
    """A TFLite conv's kernel in the Flax layout of `layer`, after checking that the op is the
    one the model expects there (kind, stride, SAME padding, fused activation, shape)."""
    where = f"{'/'.join(layer.path)} <- TFLite {conv['op']} {conv['name'].split(';')[0]!r}"
    is_depthwise = conv["op"] == "DEPTHWISE_CONV_2D"
    if is_depthwise != layer.depthwise or conv["stride"] != layer.stride:
        raise PretrainedWeightsError(
            f"{where}: graph order mismatch (depthwise {is_depthwise} vs {layer.depthwise}, "
            f"stride {conv['stride']} vs {layer.stride})"
        )
    if conv["op"] != "FULLY_CONNECTED" and conv["padding"] != "SAME":
        raise PretrainedWeightsError(f"{where}: padding {conv['padding']}, model uses SAME")
    if (conv["activation"] == "RELU6") != layer.relu6 or conv["activation"] not in (
        "RELU6",
        "NONE",
    ):
        raise PretrainedWeightsError(f"{where}: fused activation {conv['activation']}")
    kernel = conv["kernel"]
    if conv["op"] == "FULLY_CONNECTED":
        kernel = kernel.T[None, None]  # [O, I] -> [1, 1, I, O]
    elif is_depthwise:
        kernel = kernel.transpose(1, 2, 0, 3)  # [1, H, W, C] -> [H, W, 1, C]
    else:
        kernel = kernel.transpose(1, 2, 3, 0)  # [O, H, W, I] -> [H, W, I, O]
    if layer.path == ("classifier",):
        kernel = kernel.reshape(kernel.shape[-2:])  # 1x1 conv on pooled features = Dense
    if tuple(kernel.shape) != tuple(template.shape):
        raise PretrainedWeightsError(
            f"shape mismatch for {where}: file {tuple(kernel.shape)} (Flax layout), "
            f"model {tuple(template.shape)}"
        )
    return kernel.astype(template.dtype)


def _check_filled(path: Path, collection: str, leaves: dict, template_leaves: dict) -> None:
    """The file filled exactly the model's variables of `collection`, with their shapes."""
    if set(template_leaves) != set(leaves):
        missing = sorted(set(template_leaves) - set(leaves))
        raise PretrainedWeightsError(
            f"{path}: the model has {collection} the file does not fill: "
            f"{'/'.join(missing[0]) if missing else sorted(set(leaves) - set(template_leaves))}"
        )
    for key, value in leaves.items():
        if value.shape != tuple(template_leaves[key].shape):
            raise PretrainedWeightsError(
                f"shape mismatch for {collection}/{'/'.join(key)}: file {value.shape}, "
                f"model {tuple(template_leaves[key].shape)}"
            )


def calibrate_folded_batch_norm(
    module: nn.Module, variables: Mapping[str, Any], images: np.ndarray
) -> Variables:
    """Gives folded-BN MobileNetV2 variables real BatchNorm statistics; eval output unchanged.

    With `m, v` the per-channel mean and variance of a conv's output over `images`, the norm
    becomes `mean = m, var = v, scale = sqrt(v + eps), bias = folded_bias + m`: in eval mode it
    still computes `x + folded_bias`, and in train mode batch statistics close to `m, v` give
    nearly the same function, so fine-tuning starts from the pretrained network.

    Args:
      module: the `MobileNetV2` the variables belong to.
      variables: its variables with identity norms (from `load_pretrained`).
      images: `[N, H, W, 3]` in the module's input range; a few dozen real images suffice.
    """
    variables = unfreeze(variables)
    captured = _capture_conv_outputs(module, variables, images)
    params, stats = variables["params"], variables["batch_stats"]
    for conv_path, outputs in captured.items():
        norm_path = (*conv_path[:-1], conv_path[-1] + "_bn")
        if _lookup(stats, (*norm_path, "mean"), missing_ok=True) is None:
            continue
        outputs = np.asarray(outputs, np.float64).reshape(-1, outputs.shape[-1])
        mean, var = outputs.mean(0), outputs.var(0)
        folded_bias = np.asarray(_lookup(params, (*norm_path, "bias")), np.float64)
        _assign(stats, (*norm_path, "mean"), mean.astype(np.float32))
        _assign(stats, (*norm_path, "var"), var.astype(np.float32))
        _assign(
            params,
            (*norm_path, "scale"),
            np.sqrt(var + mobilenet.BATCH_NORM_EPSILON).astype(np.float32),
        )
        _assign(params, (*norm_path, "bias"), (folded_bias + mean).astype(np.float32))
    return variables


def _capture_conv_outputs(
    module: nn.Module, variables: Variables, images: np.ndarray
) -> dict[tuple[str, ...], np.ndarray]:
    """Outputs of every convolution of `module` (eval mode) keyed by module path.

    Convolutions are `nn.Conv` and MobileNetV2's `DepthwiseConv` (not an `nn.Conv` subclass:
    on CPU it runs as shifted multiply-adds), run layer by layer: MobileNetV2's folded eval form
    is switched off, as its convs are then not modules.
    """
    if isinstance(module, mobilenet.MobileNetV2):
        module = module.clone(fold_batch_norm=False)
    conv_types = (nn.Conv, mobilenet.DepthwiseConv)
    filter_convs: Callable[[nn.Module, str], bool] = lambda mdl, _: isinstance(mdl, conv_types)
    _, state = jax.jit(
        lambda v, x: module.apply(v, x, train=False, capture_intermediates=filter_convs)
    )(variables, images)
    return {
        path[:-1]: np.asarray(value[0])
        for path, value in _flatten(unfreeze(state["intermediates"]), leaf_types=(tuple,))
    }


# ----------------------------------------------------------------------------------------------
# Nested-dict helpers (variables are plain dicts of dicts)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = (), leaf_types=()):
    for key, value in tree.items():
        if isinstance(value, Mapping) and not isinstance(value, leaf_types):
            yield from _flatten(value, (*prefix, key), leaf_types)
        else:
            yield (*prefix, key), value


def _unflatten(leaves: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in leaves.items():
        _assign(tree, path, value)
    return tree


def _assign(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...], missing_ok: bool = False):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            if missing_ok:
                return None
            raise PretrainedWeightsError(f"model has no variable {'/'.join(path)}")
        tree = tree[key]
    return tree
