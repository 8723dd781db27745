"""Deployment formats of a model file: ONNX (``onnxruntime``, TensorRT, OpenVINO...) and
TorchScript (``torch.jit.load`` in C++ or Python without biomtl).

What is exported is the recipe's *inference* graph (:class:`InferenceGraph`): preprocessed
images in (what the recipe's evaluation transform makes: ``uint8 [B, 3, S, S]`` for the face
recipes, normalised inside the graph), and out the embedding (verification recipes) plus the
task heads where the model has them (``model.predict(images)``: FaceCom's gender / identity
logits, THz posture and reconstruction). A recipe whose model reads named maps instead of one
image (the photometric recipes: albedo / normal / depth) says so with
``Recipe.deploy_inputs()`` (``{name: per-sample shape}``); its graph takes one input per map,
under the map's name, and calls ``model.predict({name: tensor})``. The batch dimension is dynamic. The input and output
names, the image size and dtype and the recipe are stored in the file's metadata
(``metadata_props`` for ONNX, ``extra/biomtl.json`` for TorchScript), which is also how
``biomtl export`` recognises a file it wrote and may replace (:func:`written_by_biomtl`).
"""
from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

FORMATS = ("pt", "onnx", "torchscript")
META_KEY = "biomtl"  # ONNX metadata_props key / TorchScript extra file stem
INPUT_NAME = "images"
ONNX_OPSET = 17

__all__ = ["FORMATS", "InferenceGraph", "example_images", "example_inputs", "write_onnx", "write_torchscript",
           "written_by_biomtl"]


class InferenceGraph(nn.Module):
    """``forward(*inputs) -> tuple`` of the named outputs (:attr:`output_names`, sorted), the
    inputs in the order of ``example``'s names (:attr:`input_names`): ``model.predict(images)``
    when the model has task heads, else its ``embed``; for named maps ``model.predict(maps)``.
    ``example``: one batch (the image input) or ``{name: batch}`` (:func:`example_inputs`)."""

    def __init__(self, model: nn.Module, example: torch.Tensor | dict[str, torch.Tensor]):
        super().__init__()
        self.model = model.eval()
        example = example if isinstance(example, dict) else {INPUT_NAME: example}
        self.input_names = list(example)
        self.named_maps = self.input_names != [INPUT_NAME]
        with torch.no_grad():
            self.output_names = sorted(self._outputs(*example.values()))

    def _outputs(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.named_maps:
            out = self.model.predict(dict(zip(self.input_names, inputs)))
        else:
            predict = getattr(self.model, "predict", None)
            out = predict(inputs[0]) if callable(predict) else {"embedding": self.model.embed(inputs[0])}
        return {k: v for k, v in out.items() if torch.is_tensor(v)}

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._outputs(*inputs)
        return tuple(out[k] for k in self.output_names)


def example_images(recipe: Any, batch: int = 2) -> torch.Tensor:
    """A batch as the recipe's evaluation transform makes it (its size and dtype), from a
    grey ramp picture: the traced graph takes what ``InferenceEngine.preprocess`` gives."""
    from PIL import Image

    ramp = Image.fromarray((torch.arange(64 * 48) % 256).to(torch.uint8).reshape(64, 48).numpy())
    rows = [recipe.transform({"png": ramp, "json": {}, "__key__": "export"}, train=False)["image"]
            for _ in range(batch)]
    return torch.stack(rows)


def example_inputs(recipe: Any, batch: int = 2) -> torch.Tensor | dict[str, torch.Tensor]:
    """What the graph is traced with: :func:`example_images`, or for a recipe with named map
    inputs (``deploy_inputs()``) a float32 batch of each map (seeded values: only the shapes
    and dtypes matter to the trace, the maps are normalised before the graph)."""
    maps = recipe.deploy_inputs()
    if not maps:
        return example_images(recipe, batch)
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn((batch, *shape), generator=gen) for name, shape in maps.items()}


def _examples(example: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return example if isinstance(example, dict) else {INPUT_NAME: example}


def _metadata(graph: InferenceGraph, example: torch.Tensor | dict[str, torch.Tensor],
              recipe_name: str) -> dict[str, Any]:
    inputs = {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": ["batch", *t.shape[1:]]}
              for name, t in _examples(example).items()}
    meta = {"format": 1, "recipe": recipe_name, "inputs": inputs, "outputs": graph.output_names}
    if not graph.named_maps:  # the one image input, as format 1 always named it
        meta.update(input=INPUT_NAME, input_dtype=inputs[INPUT_NAME]["dtype"], input_shape=inputs[INPUT_NAME]["shape"])
    return meta


def write_onnx(tmp: Path, graph: InferenceGraph, example: torch.Tensor | dict[str, torch.Tensor],
               recipe_name: str) -> None:
    """The ONNX file of ``graph`` at ``tmp`` (the caller publishes it atomically)."""
    import onnx

    axes = {name: {0: "batch"} for name in (*graph.input_names, *graph.output_names)}
    graph = copy.deepcopy(graph)  # the exporter leaves the module it traced changed (BatchNorm statistics)
    with torch.no_grad():  # the TorchScript-based exporter: no onnxscript needed, dynamic_axes supported
        torch.onnx.export(graph, tuple(_examples(example).values()), str(tmp), dynamo=False,
                          input_names=graph.input_names, output_names=graph.output_names, dynamic_axes=axes,
                          opset_version=ONNX_OPSET)
    proto = onnx.load(str(tmp))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(_metadata(graph, example, recipe_name))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))


def write_torchscript(tmp: Path, graph: InferenceGraph, example: torch.Tensor | dict[str, torch.Tensor],
                      recipe_name: str) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(graph, tuple(_examples(example).values()), check_trace=False)
    meta = json.dumps(_metadata(graph, example, recipe_name))
    torch.jit.save(traced, str(tmp), _extra_files={f"{META_KEY}.json": meta})


WRITERS: dict[str, Callable[[Path, InferenceGraph, Any, str], None]] = {
    "onnx": write_onnx, "torchscript": write_torchscript}


def written_by_biomtl(path: Path, fmt: str) -> bool:
    """Whether an existing ``path`` is a file ``biomtl export`` wrote in ``fmt`` (so it may
    be replaced). Read as data only: an ONNX protobuf, a zip listing, a weights-only load."""
    try:
        if fmt == "onnx":
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            return any(p.key == META_KEY for p in proto.metadata_props)
        if fmt == "torchscript":
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith(f"/extra/{META_KEY}.json") for n in zf.namelist())
        from recipes.model_file import load_weights_only, read_stored

        return read_stored(load_weights_only(path, "cpu", mmap=True)).client is None  # a model file, no checkpoint
    except Exception:  # noqa: BLE001 - anything unreadable as ours is not ours
        return False
