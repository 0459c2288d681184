"""The torch part of image-model scoring as one graph, and that graph in ONNX Runtime.

`ScoringGraph` takes what `ImageModel` scores, a uint8 batch (B, 3, S, S), and returns the members' mean
probability (each network on the image and, with `tta`, its mirror) or, for a head model, the feature
vectors the head takes. `museum export` writes it as ONNX or TorchScript (`museum.image.export`);
`write_onnx` and `onnx_session` put it into ONNX Runtime (the `export` extra), which on a CPU ran
MobileNetV2 4.8-6.9 times as fast as torch eager at the same macro-F1 (scripts/bench_image_speed.py).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from museum.extras import require

# 17: every op of these graphs (Flip as a negative-step Slice, ScatterElements with add reduction for the
# colour histogram of stage features) and supported by every onnxruntime in the extra's range.
OPSET = 17


class ScoringGraph(nn.Module):
    """`ImageModel._proba_uint8`'s torch part as one module: uint8 (B, 3, S, S) → probabilities (members'
    mean of their softmax) or, with `features`, the feature vectors a head takes."""

    def __init__(self, nets: Sequence[nn.Module], mean, std, tta: bool, features: bool = False):
        """`mean`/`std`: one RGB triple for every network, or a triple per network (a mixed ensemble, whose
        members normalise as their own backbones were pretrained)."""
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.tta, self.features = bool(tta), bool(features)
        # (networks, 3): 2-D, so that `.to(memory_format=channels_last)` leaves them be
        per_net = lambda v: torch.tensor(v, dtype=torch.float32).reshape(-1, 3).expand(len(nets), 3).clone()  # noqa: E731
        self.register_buffer("mean", per_net(mean))
        self.register_buffer("std", per_net(std))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.float() / 255.0
        outputs = []
        for k, net in enumerate(self.nets):
            x = (pixels - self.mean[k].view(1, 3, 1, 1)) / self.std[k].view(1, 3, 1, 1)  # as `augment.normalize`
            y = net(x).float()
            if self.tta:  # the mirror view, as validation scored it
                y = (y + net(x.flip(3)).float()) / 2
            outputs.append(y)
        if self.features:  # heads have no members
            return outputs[0]
        return torch.stack([y.softmax(1) for y in outputs]).mean(0)


def contiguous_copy(graph: nn.Module) -> nn.Module:
    """A CPU copy of `graph` in the default memory format, as the exporters take it (ImageModel's own
    runs channels-last)."""
    return copy.deepcopy(graph).cpu().to(memory_format=torch.contiguous_format).eval()


def write_onnx(graph: nn.Module, path: Path, size: int, opset: int = OPSET) -> None:
    """`graph` as ONNX at `path`, batch size free (input `images` uint8, output `scores`)."""
    require("onnx", "export")
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    # The TorchScript-based exporter, in every torch of our range (2.4+; `dynamo` is asked for from 2.5 on,
    # where it exists): it exports these graphs in a few seconds where the torch.export-based one took
    # 16 s for one MobileNetV2, and gives the same numbers. torch 2.9+ warns that the other is its default.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["scores"],
                          dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, **legacy)


def onnx_session(path: str | Path, threads: int = 0, device: str = "cpu"):
    """An onnxruntime session for `path` with `threads` intra-op threads (0: torch's count)."""
    ort = require("onnxruntime", "export")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)
