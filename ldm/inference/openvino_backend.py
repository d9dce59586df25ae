"""OpenVINO as an optional inference backend (the `openvino` extra): the U-Net and the VAE
decoder run by OpenVINO's CPU runtime, everything else (text encoder, VAE encoder, samplers,
guidance) stays PyTorch.

Each network is converted with `openvino.convert_model` from its fp32 PyTorch module when the
pipeline is set up (traced at the default size, so the modules take their plain-PyTorch form:
ldm._extension.exporting), then its PyTorch weights are let go, and it is compiled once per
input shapes with the precision as OpenVINO's inference-precision hint (f32, or bf16 where the
CPU has it: OpenVINO decides on CPUs without native bf16). For the SD 2.x U-Net on two cores a
conversion takes about 1.5 min and a compilation 30 s, so both are kept on disk: converted
models under <cache>/ldm/openvino/<digest of weights and inputs>/, compiled ones in OpenVINO's
model cache beside them (CACHE_DIR; read back in a few seconds). That is about 3.5 GB per
converted fp32 SD U-Net and as much per compiled shape and precision (docs/performance.md).

Inputs reach OpenVINO as fp32: the networks here take integer timesteps and class labels as
numbers they cast themselves, so one converted model serves both kinds of caller.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.errors import LdmError
from ldm.inference.autotune import cache_dir
from ldm.inference.options import default_image_size
from ldm.pipeline import Pipeline

HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}
# The inputs a network is converted for, by name, with example values (shapes stay dynamic).
Examples = dict[str, Tensor]


def available() -> bool:
    """Whether the openvino package is installed."""
    return importlib.util.find_spec("openvino") is not None


def require() -> None:
    """One clear error where OpenVINO is missing."""
    if not available():
        raise LdmError("the OpenVINO backend needs the openvino package: "
                       "pip install -e '.[openvino]'")


def hint(precision: torch.dtype) -> str:
    """OpenVINO's inference-precision hint for a torch dtype (fp32 or bf16)."""
    if precision not in HINTS:
        raise LdmError(f"the OpenVINO backend runs fp32 or bf16, not {precision}")
    return HINTS[precision]


def default_cache() -> Path:
    """<user cache>/ldm/openvino (beside the autotune decisions)."""
    return cache_dir() / "openvino"


def _notice(text: str) -> None:
    """One line on stderr that leaves a running progress bar intact."""
    from tqdm import tqdm
    tqdm.write(f"openvino: {text}", file=sys.stderr)


class _ByPosition(nn.Module):
    """`net` called with the named inputs by position (what tracing feeds)."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.names = net, names

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.net(**dict(zip(self.names, tensors)))


def digest(net: nn.Module, examples: Examples) -> str:
    """sha256 of the class, the state dict (names, shapes, dtypes, bytes), the inputs' names
    and ranks and OpenVINO's version: what a converted model depends on (about 2.5 s for the
    SD U-Net)."""
    import openvino as ov
    inputs = [(name, t.dim()) for name, t in examples.items()]
    h = hashlib.sha256(f"{type(net).__qualname__} {inputs} {ov.__version__}".encode())
    for key, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key} {tuple(t.shape)} {t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()[:32]


def convert(net: nn.Module, examples: Examples, cache: Path | None) -> object:
    """`net` (fp32) as an openvino.Model of the example inputs (fp32, dynamic shapes): read from
    `cache` when converted before, else converted now and kept there (None: not kept)."""
    import openvino as ov
    if any(p.dtype != torch.float32 for p in net.parameters()):
        raise LdmError("the OpenVINO backend converts fp32 networks; load the pipeline in fp32")
    folder = None if cache is None else cache / digest(net, examples)
    if folder is not None and folder.is_dir():
        try:
            return ov.Core().read_model(folder / "model.xml")
        except RuntimeError:  # damaged (a truncated file): convert again in its place
            shutil.rmtree(folder, ignore_errors=True)
    _notice(f"converting {type(net).__name__} (once per model; minutes at SD size"
            + (f", kept in {cache})" if cache is not None else ")"))
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace's deprecation, and its warnings about shapes read as Python numbers:
        # the graph is compiled per input shapes, and the tests run one traced at one shape at
        # others.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        inputs = tuple(t.detach().float().clone() for t in examples.values())  # normal tensors
        model = ov.convert_model(_ByPosition(net.eval(), tuple(examples)), example_input=inputs)
    if folder is not None and _save(model, folder):
        # As later loads will see it: OpenVINO's compiled-model cache keys a model read from
        # disk differently from the same model converted in memory.
        return ov.Core().read_model(folder / "model.xml")
    return model


def _save(model: object, folder: Path) -> bool:
    """Save into a fresh folder, then rename it into place (no half-written model is ever
    read); False where that failed: a read-only or full cache only costs a conversion next
    time."""
    import openvino as ov
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, partial / "model.xml", compress_to_fp16=False)
        partial.rename(folder)
    except (OSError, RuntimeError):  # OpenVINO reports a failed write as a RuntimeError
        shutil.rmtree(partial, ignore_errors=True)
        return folder.is_dir()  # another process may have put it there first
    return True


class OpenVINONet(nn.Module):
    """A converted network, called like the PyTorch one: its inputs by position or name
    (those it was converted without left None); returns its output in the dtype and device of
    the first input. Compiled for each new set of input shapes."""

    def __init__(self, model: object, names: tuple[str, ...], label: str,
                 precision: torch.dtype = torch.float32, threads: int | None = None,
                 cache: Path | None = None) -> None:
        super().__init__()
        self.model, self.names, self.label = model, names, label
        self.hint, self.cache = hint(precision), cache
        self.threads = threads or torch.get_num_threads()
        self._requests: dict[tuple[tuple[int, ...], ...], object] = {}

    def extra_repr(self) -> str:
        return f"{self.label}({', '.join(self.names)}), hint={self.hint}, " \
               f"threads={self.threads}"

    def forward(self, *args: Tensor | None, **kwargs: Tensor | None) -> Tensor:
        given = {**dict(zip(self.names, args)), **kwargs}
        unknown = [k for k, v in given.items() if k not in self.names and v is not None]
        missing = [name for name in self.names if given.get(name) is None]
        if unknown or missing or any(a is not None for a in args[len(self.names):]):
            raise LdmError(f"{self.label} was converted for inputs ({', '.join(self.names)}); "
                           f"missing {missing or 'none'}, not converted for {unknown or 'more'}")
        tensors = [given[name].detach().float() for name in self.names]
        key = tuple(tuple(t.shape) for t in tensors)
        if key not in self._requests:
            self._requests[key] = self._compile(tensors)
        out = self._requests[key].infer([t.cpu().numpy() for t in tensors])
        first = given[self.names[0]]
        return torch.from_numpy(next(iter(out.values())).copy()).to(first.device, first.dtype)

    def _compile(self, tensors: list[Tensor]) -> object:
        """An infer request for these inputs' shapes."""
        import openvino as ov
        model = self.model.clone()
        try:
            model.reshape({port: ov.PartialShape(list(t.shape))
                           for port, t in zip(model.inputs, tensors)})
        except RuntimeError as err:  # e.g. channels that do not match the weights
            raise LdmError(f"{self.label} through OpenVINO cannot take inputs of shapes "
                           f"{[list(t.shape) for t in tensors]}: "
                           f"{str(err).strip().splitlines()[0]}") from None
        start = time.perf_counter()
        request = compile_request(model, self.hint, self.threads, self.cache)
        seconds = time.perf_counter() - start
        if seconds > 2.0:
            _notice(f"compiled {self.label} for {[list(t.shape) for t in tensors]} in "
                    f"{seconds:.0f} s")
        return request


def compile_request(model: object, hint: str, threads: int, cache: Path | None) -> object:
    """An infer request for `model` (static shapes) on the CPU with the precision hint and a
    fixed thread count, tuned for latency; compiled models kept under cache/compiled/<hint>
    (None: not kept). The benchmarks' OpenVINO peer compiles through here as well."""
    import openvino as ov
    core = ov.Core()
    if cache is not None:
        # One folder per hint: in a shared one, OpenVINO 2026.4 served the model compiled with
        # the f32 hint to a bf16 compilation of the same model, whose outputs were then NaN
        # (seen on an Intel Xeon with AMX, where the bf16 hint takes effect).
        core.set_property({"CACHE_DIR": str(cache / "compiled" / hint)})
    return core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()


def openvino_net(net: nn.Module, examples: Examples, precision: torch.dtype,
                 cache: Path | None) -> OpenVINONet:
    """`net` converted (or read from `cache`) for the example inputs, ready to compile."""
    require()
    hint(precision)  # before minutes of conversion
    return OpenVINONet(convert(net, examples, cache), tuple(examples), type(net).__name__,
                       precision, cache=cache)


def pipeline_examples(pipe: Pipeline) -> tuple[Examples, Examples]:
    """Example inputs of the U-Net (a guided batch of 2 at the default size, with class labels
    where it has them) and of the decoder (one latent after post_quant_conv)."""
    side = default_image_size(pipe) // pipe.downsampling_factor
    unet, autoencoder = pipe.config.unet, pipe.config.autoencoder
    g = torch.Generator().manual_seed(0)
    unet_inputs = {"x": torch.randn(2, unet.in_channels, side, side, generator=g),
                   "timesteps": torch.tensor([999.0, 999.0]),
                   "context": torch.randn(2, 77, unet.context_dim, generator=g)}
    if unet.num_classes is not None:
        unet_inputs["y"] = torch.zeros(2)
    return unet_inputs, {"z": torch.randn(1, autoencoder.z_channels, side, side, generator=g)}


def use_openvino(pipe: Pipeline, precision: torch.dtype = torch.float32,
                 cache: Path | None = None) -> None:
    """Run `pipe`'s U-Net and VAE decoder through OpenVINO (in place; their PyTorch weights are
    let go, so the pipeline is for inference only). `pipe` must be an fp32 pipeline on the CPU;
    `precision` is OpenVINO's inference-precision hint; `cache` keeps converted and compiled
    models (default_cache() is the usual place; None: converted on every load)."""
    require()
    if pipe.device.type != "cpu":
        raise LdmError(f"the OpenVINO backend runs on the CPU, not {pipe.device}")
    unet_inputs, decoder_inputs = pipeline_examples(pipe)
    pipe.unet = openvino_net(pipe.unet, unet_inputs, precision, cache)
    pipe.autoencoder.decoder = openvino_net(pipe.autoencoder.decoder, decoder_inputs, precision,
                                            cache)
