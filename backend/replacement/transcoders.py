"""Transcoders in circuit-tracer's formats (per-layer and cross-layer): read, checked against a model, written.

The transcoder of layer l reads the MLP's input x and predicts what the MLP adds to the
residual stream:

    f = act(x W_encᵀ + b_enc),   ŷ = f W_dec + b_dec (+ x W_skipᵀ)

with act = relu; jumprelu (z · [z > θ], strict, as circuit-tracer); topk (the k largest
pre-activations of each token kept, signed, the rest 0: circuit-tracer's TopK module); or
relu_topk (the same, then ReLU: EleutherAI sparsify's TopK, what ``fit`` trains; on a token
with fewer than k positive pre-activations the two differ).

Read from a local folder (safetensors and npz only, never pickles):
- circuit-tracer's transcoder set: ``config.yaml`` (``model_kind: transcoder_set``,
  ``feature_input_hook``, ``feature_output_hook``, optional ``transcoders`` list of layer
  files, optional ``activation: relu|jumprelu|topk|relu_topk`` and ``k``) and ``layer_{i}.safetensors``
  (``W_enc`` [d_tc, d_model], ``W_dec`` [d_tc, d_model], ``b_enc``, ``b_dec``, optional
  ``activation_function.threshold`` and ``W_skip`` [d_model, d_model]);
- GemmaScope ``params.npz`` layer files (``W_enc`` [d_model, d_tc], ``W_dec``, ``b_enc``,
  ``b_dec``, ``threshold``) and GemmaScope-2 safetensors (``w_enc`` [d_model, d_tc],
  ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``, optional ``affine_skip_connection``),
  listed in ``transcoders``.
Hook names (TransformerLens', as circuit-tracer's configs use them) map onto the adapter's
sites: ``mlp.hook_in`` = the MLP's input after its norm, ``ln2.hook_normalized`` = the same
before the norm's gain for an RMSNorm (TransformerLens applies the weight after that hook,
and circuit-tracer reads RMSNorm's ``_norm`` output there; for LayerNorm the hook follows
weight and bias), ``hook_resid_mid`` = the residual stream before the norm, ``mlp.hook_out``
/ ``hook_mlp_out`` = the MLP's output.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from backend.errors import UserInputError
from backend.runtime import config
from backend.runtime.cache import cache_named
from backend.runtime.hooks import Hook, read_site
from backend.runtime.models import ModelHandle
from backend.runtime.norms import norm_parts
from backend.units.unitset import Record, UnitSet

ACTIVATIONS = ("relu", "jumprelu", "topk", "relu_topk")
INPUT_HOOKS = {"mlp.hook_in": "mlp_normed", "ln2.hook_normalized": "mlp_normed", "hook_resid_mid": "mlp_in"}
OUTPUT_HOOKS = {"mlp.hook_out": "mlp_out", "hook_mlp_out": "mlp_out"}


@dataclass
class LayerTranscoder:
    """One layer's weights, in circuit-tracer's orientation (features are rows)."""

    W_enc: torch.Tensor  # [d_tc, d_model]
    b_enc: torch.Tensor  # [d_tc]
    W_dec: torch.Tensor | None  # [d_tc, d_model]; None in a cross-layer set (CrossLayerDecoders)
    b_dec: torch.Tensor  # [d_model]
    threshold: torch.Tensor | None = None  # [d_tc], jumprelu
    W_skip: torch.Tensor | None = None  # [d_model, d_model]

    @property
    def width(self) -> int:
        return self.W_enc.shape[0]


class CrossLayerDecoders:
    """A cross-layer set's decoders, read lazily: layer i's file ``W_dec_{i}`` is
    [d_tc, n_layers - i, d_model] (slot j writes to layer i + j's MLP output); only the rows
    of the features asked for are read (a Gemma-2-2B set's decoders are tens of GB)."""

    def __init__(self, files: list[Path], shapes: list[tuple[int, ...]]) -> None:
        self.files, self.shapes = files, shapes
        self._rows: dict[tuple[int, int], torch.Tensor] = {}  # bounded by the features asked for

    def rows(self, layer: int, features: list[int]) -> torch.Tensor:
        """[n, n_layers - layer, d_model] for ``features`` of ``layer``."""
        missing = [f for f in dict.fromkeys(features) if (layer, f) not in self._rows]
        if missing:
            with safe_open(str(self.files[layer]), framework="pt", device="cpu") as f:
                tensor = f.get_slice(f"W_dec_{layer}")
                for feature in missing:
                    self._rows[layer, feature] = tensor[feature:feature + 1][0].float()
            if len(self._rows) > 200_000:
                self._rows.clear()
        return torch.stack([self._rows[layer, f] for f in features]) if features \
            else torch.zeros(0, *self.shapes[layer][1:])

    def summed(self, layer: int) -> torch.Tensor:
        """[d_tc, d_model]: each feature's writes summed over the layers it writes to."""
        with safe_open(str(self.files[layer]), framework="pt", device="cpu") as f:
            return f.get_tensor(f"W_dec_{layer}").float().sum(1)


@dataclass
class TranscoderSet:
    layers: list[LayerTranscoder]
    activation: str  # relu | jumprelu | topk | relu_topk
    k: int | None
    input_hook: str
    output_hook: str
    source: str  # the folder it was read from ("" when built in memory)
    cross_layer: CrossLayerDecoders | None = None  # a cross-layer set's decoders (its layers' W_dec are None)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def span(self, layer: int) -> int:
        """How many MLP outputs layer ``layer``'s features write to (from that layer on)."""
        return self.n_layers - layer if self.cross_layer is not None else 1

    def decoder_rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """[n, span(layer), d_model]: what each feature writes per unit of activation to each
        MLP output from ``layer`` on."""
        if self.cross_layer is not None:
            return self.cross_layer.rows(layer, features.tolist()).to(self.layers[layer].W_enc.device)
        W_dec = self.layers[layer].W_dec
        assert W_dec is not None
        return W_dec[features][:, None]

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        t = self.layers[layer]
        return None if t.W_skip is None else x.to(t.W_skip.dtype) @ t.W_skip.T

    def output_directions(self, layer: int) -> torch.Tensor:
        """[d_model, d_tc]: each feature's write (summed over the layers a cross-layer feature writes to)."""
        if self.cross_layer is not None:
            return self.cross_layer.summed(layer).T.to(self.layers[layer].W_enc.device)
        W_dec = self.layers[layer].W_dec
        assert W_dec is not None
        return W_dec.T

    @property
    def width(self) -> int:
        return self.layers[0].width

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_tc] of the MLP input ``x`` [..., d_model]."""
        t = self.layers[layer]
        pre = x.to(t.W_enc.dtype) @ t.W_enc.T + t.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return pre * (pre > t.threshold)
        top = pre.topk(self.k, dim=-1).indices
        kept = torch.zeros_like(pre).scatter(-1, top, pre.gather(-1, top))
        return torch.relu(kept) if self.activation == "relu_topk" else kept

    def decode(self, layer: int, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted MLP output; ``x`` (the MLP input) is needed when the set has a skip."""
        t = self.layers[layer]
        if t.W_dec is None:
            raise ValueError("a cross-layer set decodes across layers: use decoder_rows")
        out = features @ t.W_dec + t.b_dec
        if t.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: pass the MLP input")
            out = out + x.to(t.W_skip.dtype) @ t.W_skip.T
        return out

    def to(self, device: torch.device) -> TranscoderSet:
        """Move every layer to ``device`` (in place: a set is large; the cached set follows
        the model it serves)."""
        self.layers = [_moved(t, device) if t.W_enc.device != device else t for t in self.layers]
        return self

    def digest(self) -> str:
        """A hash of the weights (index keys: another set is another index)."""
        h = hashlib.sha256(f"{self.activation}:{self.k}:{self.input_hook}:{self.output_hook}".encode())
        for t in self.layers:
            for tensor in (t.W_enc, t.b_enc, t.b_dec) + ((t.W_dec,) if t.W_dec is not None else ()):
                h.update(tensor.flatten()[:4096].to(torch.float32).cpu().numpy().tobytes())
        return h.hexdigest()[:12]


# ---------------------------------------------------------------- reading


def _fail(path: Path, problem: str) -> None:
    raise UserInputError(f"Transcoders in {path}: {problem}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        _fail(path, f"cannot read this safetensors file ({exc}); it may be truncated.")
    raise AssertionError


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        _fail(path, f"cannot read this npz file ({exc}); it may be truncated.")
    raise AssertionError


def _layer_from_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> LayerTranscoder:
    """circuit-tracer's keys, or GemmaScope's (W_enc transposed, ``threshold``), or GemmaScope-2's."""
    if "w_enc" in tensors:  # GemmaScope-2
        skip = tensors.get("affine_skip_connection")
        tensors = {"W_enc": tensors["w_enc"].T, "W_dec": tensors["w_dec"], "b_enc": tensors["b_enc"],
                   "b_dec": tensors["b_dec"], "activation_function.threshold": tensors.get("threshold"),
                   "W_skip": None if skip is None else skip.T}
    elif "threshold" in tensors:  # GemmaScope params.npz
        tensors = {**tensors, "W_enc": tensors["W_enc"].T, "activation_function.threshold": tensors["threshold"]}
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if tensors.get(k) is None]
    if missing:
        _fail(path, f"missing {', '.join(missing)}.")
    w_enc, w_dec = tensors["W_enc"].float().contiguous(), tensors["W_dec"].float().contiguous()
    d_tc, d_model = w_enc.shape
    expected = {"W_dec": (d_tc, d_model), "b_enc": (d_tc,), "b_dec": (d_model,)}
    threshold, skip = tensors.get("activation_function.threshold"), tensors.get("W_skip")
    if threshold is not None:
        expected["activation_function.threshold"] = (d_tc,)
    if skip is not None:
        expected["W_skip"] = (d_model, d_model)
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            _fail(path, f"{key} has shape {tuple(tensors[key].shape)}, expected {shape} (W_enc is {(d_tc, d_model)}).")
    return LayerTranscoder(W_enc=w_enc, b_enc=tensors["b_enc"].float(), W_dec=w_dec, b_dec=tensors["b_dec"].float(),
                           threshold=None if threshold is None else threshold.float(),
                           W_skip=None if skip is None else skip.float().contiguous())


def _layer_file(folder: Path, entry: str) -> Path:
    if entry.startswith("hf://"):
        _fail(folder, f"{entry} is a hub reference; download it and list the local file instead.")
    path = Path(entry)
    if not path.is_absolute():
        path = folder / path
    if not path.exists() and (folder / path.name).exists():
        path = folder / path.name  # the folder moved since it was written
    return path


def load_transcoders(folder: str | Path, handle: ModelHandle | None = None) -> TranscoderSet:
    """Read a transcoder set from ``folder`` (see the module doc); with ``handle``, check that
    it fits that model (layers, width)."""
    folder = _allowed(Path(folder).expanduser())
    spec = _read_config(folder)
    cross = spec.get("model_kind") == "cross_layer_transcoder"
    if cross:  # circuit-tracer's load_clt defaults
        spec = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out", **spec}
    input_hook, output_hook = _hook_name(spec.get("feature_input_hook")), _hook_name(spec.get("feature_output_hook"))
    if input_hook not in INPUT_HOOKS:
        _fail(folder, f"feature_input_hook {spec.get('feature_input_hook')!r} is not one of {', '.join(INPUT_HOOKS)}.")
    if output_hook not in OUTPUT_HOOKS:
        _fail(folder, f"feature_output_hook {spec.get('feature_output_hook')!r} is not one of "
                      f"{', '.join(OUTPUT_HOOKS)}.")
    decoders = None
    if cross:
        layers, decoders = _read_cross_layer(folder)
    else:
        layers = [_read_layer(folder, i, str(entry)) for i, entry in enumerate(_layer_entries(folder, spec))]
    shapes = {t.W_enc.shape for t in layers}
    if len(shapes) > 1:
        _fail(folder, f"layers differ in shape: {sorted(shapes)}.")
    activation, k = _activation(folder, spec, layers)
    result = TranscoderSet(layers=layers, activation=activation, k=k, input_hook=input_hook, output_hook=output_hook,
                           source=str(folder), cross_layer=decoders)
    if handle is not None:
        check_fits(result, handle)
    return result


def _allowed(folder: Path) -> Path:
    """Model-folder restrictions (CIRCUITSCOPE_MODEL_DIRS) apply to transcoder folders too."""
    allowed = config.allowed_model_dirs()
    resolved = folder.resolve()
    if allowed and not any(resolved == d or d in resolved.parents for d in allowed):
        raise UserInputError(f"'{folder}' is outside the model folders this server allows.")
    return folder


def _read_config(folder: Path) -> dict:
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        _fail(folder, "no config.yaml (a set is complete only when its config.yaml is written).")
    try:
        spec = yaml.safe_load(config_path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        _fail(folder, f"config.yaml is not valid YAML ({exc}).")
    if not isinstance(spec, dict):
        _fail(folder, "config.yaml is not a mapping.")
    kind = spec.get("model_kind")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        _fail(folder, f"model_kind is {kind!r}; expected 'transcoder_set' or 'cross_layer_transcoder'.")
    return spec


def _read_cross_layer(folder: Path) -> tuple[list[LayerTranscoder], CrossLayerDecoders]:
    """circuit-tracer's cross-layer files: ``W_enc_{i}.safetensors`` (``W_enc_{i}`` [d_tc,
    d_model], ``b_enc_{i}``, ``b_dec_{i}``, optional ``threshold_{i}``) and
    ``W_dec_{i}.safetensors`` (``W_dec_{i}`` [d_tc, n_layers - i, d_model]), decoders lazily."""
    n_layers = len(list(folder.glob("W_enc_*.safetensors")))
    if n_layers == 0:
        _fail(folder, "no W_enc_{i}.safetensors files (a cross-layer set).")
    layers, files, shapes = [], [], []
    for i in range(n_layers):
        path = folder / f"W_enc_{i}.safetensors"
        if not path.is_file():
            _fail(folder, f"layer {i}: {path.name} is missing.")
        tensors = _read_safetensors(path)
        missing = [key for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}") if key not in tensors]
        if missing:
            _fail(path, f"missing {', '.join(missing)}.")
        w_enc = tensors[f"W_enc_{i}"].float().contiguous()
        d_tc, d_model = w_enc.shape
        threshold = tensors.get(f"threshold_{i}")
        for key, shape in ((f"b_enc_{i}", (d_tc,)), (f"b_dec_{i}", (d_model,)), (f"threshold_{i}", (d_tc,))):
            if key in tensors and tuple(tensors[key].shape) != shape:
                _fail(path, f"{key} has shape {tuple(tensors[key].shape)}, expected {shape}.")
        dec_path = folder / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            _fail(folder, f"layer {i}: {dec_path.name} is missing.")
        try:
            with safe_open(str(dec_path), framework="pt", device="cpu") as f:
                shape = tuple(f.get_slice(f"W_dec_{i}").get_shape())
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            _fail(dec_path, f"cannot read W_dec_{i} ({exc}); the file may be truncated.")
        if shape != (d_tc, n_layers - i, d_model):
            _fail(dec_path, f"W_dec_{i} has shape {shape}, expected {(d_tc, n_layers - i, d_model)}.")
        layers.append(LayerTranscoder(W_enc=w_enc, b_enc=tensors[f"b_enc_{i}"].float(), W_dec=None,
                                      b_dec=tensors[f"b_dec_{i}"].float(),
                                      threshold=None if threshold is None else threshold.float()))
        files.append(dec_path)
        shapes.append(shape)
    return layers, CrossLayerDecoders(files, shapes)


def _layer_entries(folder: Path, spec: dict) -> list:
    entries = spec.get("transcoders")
    if entries is None:
        entries = [f"layer_{i}.safetensors" for i in range(len(list(folder.glob("layer_*.safetensors"))))]
    if not entries:
        _fail(folder, "no layer files (layer_{i}.safetensors, or a 'transcoders' list).")
    return entries


def _read_layer(folder: Path, i: int, entry: str) -> LayerTranscoder:
    path = _layer_file(folder, entry)
    if not path.is_file():
        _fail(folder, f"layer {i}: {path.name} is missing.")
    if path.suffix not in (".safetensors", ".npz"):
        _fail(folder, f"layer {i}: {path.name} is neither .safetensors nor .npz (pickles are never loaded).")
    return _layer_from_tensors(path, _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path))


def _activation(folder: Path, spec: dict, layers: list[LayerTranscoder]) -> tuple[str, int | None]:
    """The activation named in config.yaml; without one, jumprelu when the files hold
    thresholds, else relu (as circuit-tracer decides)."""
    activation = spec.get("activation") or ("jumprelu" if layers[0].threshold is not None else "relu")
    if activation not in ACTIVATIONS:
        _fail(folder, f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}.")
    if activation == "jumprelu" and any(t.threshold is None for t in layers):
        _fail(folder, "activation jumprelu needs activation_function.threshold in every layer file.")
    if not activation.endswith("topk"):
        return activation, None
    k = spec.get("k")
    if not isinstance(k, int) or not 0 < k <= layers[0].width:
        _fail(folder, f"activation {activation} needs an integer k between 1 and {layers[0].width} (got {k!r}).")
    return activation, k


def _hook_name(name) -> str:
    """'blocks.3.mlp.hook_in' and 'mlp.hook_in' both name the layer's MLP input."""
    text = str(name or "")
    parts = text.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else text


def read_input(handle: ModelHandle, transcoders: TranscoderSet, layer: int, fn) -> Hook:
    """A hook calling ``fn(x)`` with layer ``layer``'s transcoder input x (in the autograd
    graph when there is one): the site its hook names, divided by the norm's gain for
    ``ln2.hook_normalized`` on an RMSNorm (see the module doc)."""
    site = handle.adapter.site(INPUT_HOOKS[transcoders.input_hook], layer)
    gain = _pre_gain(handle, transcoders, layer)
    if gain is None:
        return read_site(site, fn)
    return read_site(site, lambda x: fn(x / gain.to(x.device, x.dtype)))


def _pre_gain(handle: ModelHandle, transcoders: TranscoderSet, layer: int) -> torch.Tensor | None:
    if transcoders.input_hook != "ln2.hook_normalized":
        return None
    parts = norm_parts(handle.adapter.layers[layer].mlp_norm)
    return None if parts.centred else parts.weight


def check_fits(transcoders: TranscoderSet, handle: ModelHandle) -> None:
    adapter = handle.adapter
    d_model = transcoders.layers[0].W_enc.shape[1]
    if len(transcoders.layers) != adapter.n_layers:
        raise UserInputError(f"The transcoder set has {len(transcoders.layers)} layers; {handle.name} has "
                             f"{adapter.n_layers}.")
    if d_model != adapter.d_model:
        raise UserInputError(f"The transcoders read vectors of size {d_model}; {handle.name}'s residual stream "
                             f"has {adapter.d_model}.")
    for layer in range(adapter.n_layers):
        gain = _pre_gain(handle, transcoders, layer)
        if gain is not None and bool((gain == 0).any()):
            raise UserInputError(f"ln2.hook_normalized of layer {layer}: the norm has a zero gain, so its input "
                                 "before the gain cannot be read back; use a set on mlp.hook_in.")


_sets = cache_named("transcoder sets", 2)  # a set is large (SmolLM2, 4096 features: 0.6 GB)


def open_transcoders(folder: str | Path, handle: ModelHandle) -> TranscoderFeatures:
    """The features of the set in ``folder`` for ``handle`` (cached by folder and config date)."""
    folder = Path(folder).expanduser().resolve()
    stamp = (folder / "config.yaml").stat().st_mtime_ns if (folder / "config.yaml").is_file() else 0
    return _sets.get_or_compute((str(folder), stamp, handle.cache_key),
                                lambda: TranscoderFeatures(load_transcoders(folder, handle)))


# ---------------------------------------------------------------- writing


def save_layer(t: LayerTranscoder, path: Path) -> None:
    tensors = {"W_enc": t.W_enc, "W_dec": t.W_dec, "b_enc": t.b_enc, "b_dec": t.b_dec}
    if t.threshold is not None:
        tensors["activation_function.threshold"] = t.threshold
    if t.W_skip is not None:
        tensors["W_skip"] = t.W_skip
    partial = path.with_suffix(".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)


def save_cross_layer(folder: Path, layers: list[LayerTranscoder], decoders: list[torch.Tensor]) -> None:
    """circuit-tracer's cross-layer files (as ``_read_cross_layer`` reads them); decoders[i] is
    [d_tc, n_layers - i, d_model]."""
    for i, (t, decoder) in enumerate(zip(layers, decoders)):
        encoder = {f"W_enc_{i}": t.W_enc, f"b_enc_{i}": t.b_enc, f"b_dec_{i}": t.b_dec}
        if t.threshold is not None:
            encoder[f"threshold_{i}"] = t.threshold
        for name, tensors in ((f"W_enc_{i}", encoder), (f"W_dec_{i}", {f"W_dec_{i}": decoder})):
            partial = folder / f"{name}.partial"
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial))
            os.replace(partial, folder / f"{name}.safetensors")


def write_config(folder: Path, n_layers: int, activation: str, k: int | None, scan: str,
                 cross_layer: bool = False) -> None:
    """config.yaml, written last (atomically): a folder without it never loads."""
    spec: dict = {"model_kind": "cross_layer_transcoder" if cross_layer else "transcoder_set", "scan": scan,
                  "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out", "activation": activation}
    if not cross_layer:
        spec["transcoders"] = [str((folder / f"layer_{i}.safetensors").resolve()) for i in range(n_layers)]
    if k is not None:
        spec["k"] = int(k)
    partial = folder / "config.yaml.partial"
    partial.write_text(yaml.safe_dump(spec, sort_keys=False))
    os.replace(partial, folder / "config.yaml")


# ---------------------------------------------------------------- features as units


class TranscoderFeatures(UnitSet):
    """Transcoder features as units of the corpus index: read from the MLP input of each
    layer through the encoder; each writes its decoder row."""

    kind = "feature"

    def __init__(self, transcoders: TranscoderSet) -> None:
        self.transcoders = transcoders
        self.n_layers = len(transcoders.layers)
        self.width = transcoders.width

    def key(self) -> str:
        return f"transcoders-{self.n_layers}x{self.width}-{self.transcoders.digest()}"

    def hooks(self, handle: ModelHandle, record: Record) -> list[Hook]:
        self.transcoders.to(handle.device)

        def read(layer: int, x: torch.Tensor) -> None:
            record(layer, self.transcoders.encode(layer, x))

        return [read_input(handle, self.transcoders, layer, lambda x, layer=layer: read(layer, x))
                for layer in range(self.n_layers)]

    def output_directions(self, handle: ModelHandle, layer: int) -> torch.Tensor:
        return self.transcoders.output_directions(layer)

    def name(self, layer: int, index: int) -> str:
        return f"L{layer}/F{index}"


def _moved(t: LayerTranscoder, device: torch.device) -> LayerTranscoder:
    def move(x):
        return None if x is None else x.to(device)
    return LayerTranscoder(move(t.W_enc), move(t.b_enc), move(t.W_dec), move(t.b_dec), move(t.threshold),
                           move(t.W_skip))
