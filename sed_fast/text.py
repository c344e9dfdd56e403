"""Text embeddings of a vocabulary, as the official ``SEDPredictor.class_embeddings``, fast and cached.

For T class names and P prompt templates, :func:`encode_vocabulary` returns the (T, P, D) float32 tensor
the SED decoder consumes:

* a name without ``", "``: each of the P prompts (template filled with the name) is embedded with the CLIP
  text tower (``encode_text``) and L2-normalised;
* a name with ``", "`` is a list of S synonyms: the P*S prompts, template-major (``[t(s) for t in
  templates for s in synonyms]``), are embedded and L2-normalised, reshaped to (P, S, D), averaged over
  the synonyms and L2-normalised again.

What makes it fast (the official loop runs one 77-token forward per class: ~10 s per class on a CPU):

1. prompts of all classes are encoded together, in batches of ``batch_size``, sorted by token length;
   identical prompts are encoded once;
2. the token context is trimmed to the longest prompt of the batch. CLIP's text transformer is causal,
   so the pooled end-of-text token never attends to the padding after it: embedding, positional
   embedding ``[:L]``, the transformer with ``attn_mask[:L, :L]``, ``ln_final``, pooling and projection on
   L tokens give ``encode_text`` of the padded 77-token input (to float32 rounding, ~1e-7);
3. results are cached on disk per (text-tower weights, names, templates, tokenizer) key.

Environment: ``SED_FAST_CACHE_DIR`` (cache root; the text cache is its ``text/`` sub-folder, default
``~/.cache/sed_fast/text``), ``SED_FAST_TEXT_CACHE=0`` (disable the cache).
"""
import copy
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as _OPENAI_IMAGENET_TEMPLATES

__all__ = ["PROMPT_TEMPLATES", "encode_vocabulary", "encode_tokens", "class_prompts", "text_cache_key",
           "default_cache_dir", "cache_enabled"]

#: The 80 OpenAI ImageNet prompt templates as ``str.format`` strings (``"a bad photo of a {}."``), in the
#: order of ``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`` (identical to the official SED list;
#: the order matters: the decoder's first conv has one input channel per template).
PROMPT_TEMPLATES: Tuple[str, ...] = tuple(template("{}") for template in _OPENAI_IMAGENET_TEMPLATES)

Template = Union[str, Callable[[str], str]]

_FORMAT_VERSION = 1
_CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                    "attn_mask")
_DEFAULT_BATCH_SIZE = 512
_HASH_CHUNK_BYTES = 1 << 26


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------
def _fill(template: Template, text: str) -> str:
    return template.format(text) if isinstance(template, str) else template(text)


def class_prompts(name: str, templates: Sequence[Template] = PROMPT_TEMPLATES) -> Tuple[List[str], int]:
    """The prompts of one class and its number of synonyms S, in the official order.

    A name containing ``", "`` is split into S synonyms and the prompts are template-major:
    ``[template.format(s) for template in templates for s in synonyms]`` (P*S prompts). Otherwise the P
    prompts ``template.format(name)`` and S = 1. A template is a ``str.format`` string with one ``{}`` or
    a callable mapping the name to the prompt.
    """
    synonyms = name.split(", ") if ", " in name else [name]
    return [_fill(template, synonym) for template in templates for synonym in synonyms], len(synonyms)


# ----------------------------------------------------------------------------------------------------------
# the text tower
# ----------------------------------------------------------------------------------------------------------
class _TextTower:
    """The pieces of an open_clip text tower: ``CLIP`` (attributes on the model) or ``CustomTextCLIP`` with a
    ``TextTransformer`` as ``model.text``. ``trimmable`` says whether the trimmed-context forward is exact
    (causal mask, pooling at a token position, no CLS token / padding mask); otherwise ``encode_text``
    is called on full-length tokens."""

    def __init__(self, model: nn.Module):
        self.model = model
        required = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if all(hasattr(model, attr) for attr in required):
            self.module, self.prefix = model, ""
            self.pool_type = getattr(model, "text_pool_type", "argmax")
            self.eos_id = getattr(model, "text_eos_id", None)
            self.parts_filter = lambda name: name.split(".", 1)[0] in _CLIP_TEXT_PARTS
        elif isinstance(getattr(model, "text", None), nn.Module):
            text = model.text
            self.module, self.prefix = text, "text."
            self.pool_type = getattr(text, "pool_type", None)
            self.eos_id = getattr(text, "eos_id", None)
            self.parts_filter = lambda name: True
        else:
            raise TypeError(f"{type(model).__name__} is not an open_clip model with a text tower "
                            "(expected CLIP or CustomTextCLIP)")
        module = self.module
        self.trimmable = (
            all(hasattr(module, attr) for attr in required + ("attn_mask", "text_projection"))
            and isinstance(module.token_embedding, nn.Embedding)
            and getattr(module, "cls_emb", None) is None
            and not getattr(module, "use_pad_mask", False)
            and self.pool_type in ("argmax", "eos", "first")
            and (self.pool_type != "eos" or self.eos_id is not None)
            and _is_causal_mask(module.attn_mask)
        )
        self._fp32 = None

    # -- identity -----------------------------------------------------------------------------------------
    def named_tensors(self) -> List[Tuple[str, torch.Tensor]]:
        """Parameters and buffers (persistent or not) of the text tower, sorted by name."""
        found: Dict[str, torch.Tensor] = {}
        for name, tensor in list(self.module.named_parameters()) + list(self.module.named_buffers()):
            if tensor is not None and self.parts_filter(name):
                found.setdefault(self.prefix + name, tensor)
        if self.prefix == "" and isinstance(getattr(self.module, "attn_mask", None), torch.Tensor):
            found.setdefault("attn_mask", self.module.attn_mask)
        return sorted(found.items())

    def architecture(self) -> str:
        """A description of the text tower's structure (module types, activations, norms, pooling)."""
        module = self.module
        if self.prefix:
            parts = repr(module)
        else:
            parts = "\n".join(f"{name}: {getattr(module, name)!r}" for name in ("token_embedding", "transformer",
                                                                               "ln_final", "text_projection")
                              if isinstance(getattr(module, name, None), nn.Module))
        return f"{type(self.model).__name__}\npool={self.pool_type} eos={self.eos_id}\n{parts}"

    @property
    def device(self) -> torch.device:
        return self.module.positional_embedding.device if hasattr(self.module, "positional_embedding") \
            else next(self.model.parameters()).device

    # -- forward ------------------------------------------------------------------------------------------
    def _float32_parts(self):
        """(token_embedding, positional_embedding, transformer, ln_final, text_projection, attn_mask) in
        float32; float32 copies only when the tower holds another dtype."""
        if self._fp32 is None:
            module = self.module
            parts = (module.token_embedding, module.positional_embedding, module.transformer, module.ln_final,
                     module.text_projection)
            tensors = [t for part in parts if part is not None
                       for t in ([part] if isinstance(part, torch.Tensor) else list(part.parameters()))]
            if all(t.dtype == torch.float32 for t in tensors):
                converted = parts
            else:
                converted = tuple(None if part is None else
                                  part.detach().float() if isinstance(part, torch.Tensor) else
                                  copy.deepcopy(part).float() for part in parts)
            self._fp32 = converted + (module.attn_mask.float(),)
        return self._fp32

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled token in each row, as ``text_global_pool`` picks it."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def encode(self, tokens: torch.Tensor, trim_context: bool = True) -> torch.Tensor:
        if not self.trimmable:
            return self.model.encode_text(tokens).float()
        token_embedding, positional_embedding, transformer, ln_final, projection, attn_mask = \
            self._float32_parts()
        index = self.pool_index(tokens)
        length = int(index.max().item()) + 1 if trim_context else tokens.shape[1]
        tokens = tokens[:, :length]
        x = token_embedding(tokens).to(torch.float32)
        x = x + positional_embedding[:length].to(torch.float32)
        mask = attn_mask[:length, :length]
        if hasattr(transformer, "batch_first"):
            x = transformer(x, attn_mask=mask)  # (N, L, D); transposes itself when not batch_first
        else:  # open_clip < 2.23: the transformer runs sequence-first
            x = transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), index]
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x.float()


def _is_causal_mask(mask) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    mask = mask.detach().float().cpu()
    upper = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def encode_tokens(clip_model: nn.Module, tokens: torch.Tensor, *, trim_context: bool = True) -> torch.Tensor:
    """``clip_model.encode_text(tokens)`` in float32 (N, D), not normalised, computed on the shortest context.

    With ``trim_context`` the context is cut to the longest prefix any row needs (up to its pooled
    end-of-text token): exact for open_clip's causal text transformer, to float32 rounding. Towers where
    trimming is not exact (no causal mask, CLS token, last-token pooling, Hugging Face towers) run
    ``encode_text`` on the full tokens. The caller handles ``torch.no_grad``.
    """
    tower = _TextTower(clip_model)
    return tower.encode(tokens.to(tower.device), trim_context=trim_context)


# ----------------------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """The text-embedding cache folder: ``$SED_FAST_CACHE_DIR/text``, else ``~/.cache/sed_fast/text``."""
    root = os.environ.get("SED_FAST_CACHE_DIR")
    return Path(root).expanduser() / "text" if root else Path.home() / ".cache" / "sed_fast" / "text"


def cache_enabled(cache: Optional[bool] = True) -> bool:
    """Whether the text cache is used: not when ``cache`` is False or ``SED_FAST_TEXT_CACHE`` is 0/false/no/off."""
    if cache is False:
        return False
    return os.environ.get("SED_FAST_TEXT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, _HASH_CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].cpu().contiguous()
        digest.update(chunk.view(torch.uint8).numpy().data)  # raw bytes; bf16 viewed as uint8 by torch


def _tokenizer_identity(tokenizer) -> Dict[str, object]:
    identity = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "context_length": getattr(tokenizer, "context_length", None),
        "vocab_size": len(getattr(tokenizer, "encoder", ()) or ()),
        "clean": getattr(getattr(tokenizer, "clean_fn", None), "__name__", None),
    }
    try:  # one probe string: captures BPE / special-token differences between same-class tokenizers
        identity["probe"] = tokenizer(["a photo of a Cat, dog-like 'thing'."]).reshape(-1).tolist()
    except Exception as error:  # noqa: BLE001 - identity stays without the probe
        identity["probe"] = f"unavailable: {type(error).__name__}"
    return identity


def _template_identity(template: Template) -> str:
    if isinstance(template, str):
        return template
    return f"<callable {getattr(template, '__qualname__', type(template).__name__)}>"


def text_cache_key(clip_model: nn.Module, tokenizer, names: Sequence[str],
                   templates: Sequence[Template] = PROMPT_TEMPLATES) -> str:
    """The cache key (sha256 hex) of a vocabulary's embeddings.

    It hashes the format version, every text-tower parameter and buffer (token embedding, positional
    embedding, transformer, final LayerNorm, projection, attention mask; by sorted name, with dtype, shape
    and raw bytes), the tower's structure (activations, norms, pooling), the tokenizer's identity (class,
    context length, vocabulary size, a probe tokenisation), the exact names, the exact templates and
    every filled prompt. Changing any weight, name or template changes the key.
    """
    tower = _TextTower(clip_model)
    digest = hashlib.sha256()
    digest.update(f"sed_fast.text.encode_vocabulary format {_FORMAT_VERSION}\n".encode())
    for name, tensor in tower.named_tensors():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        _hash_tensor(digest, tensor)
    prompts = [class_prompts(name, templates)[0] for name in names]
    meta = {"architecture": tower.architecture(), "tokenizer": _tokenizer_identity(tokenizer),
            "names": list(names), "templates": [_template_identity(t) for t in templates], "prompts": prompts}
    digest.update(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _load_cached(path: Path, key: str, names: Sequence[str], shape: Tuple[int, int]) -> Optional[torch.Tensor]:
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        embeddings = data["embeddings"]
        valid = (data.get("format") == _FORMAT_VERSION and data.get("key") == key
                 and list(data.get("names", ())) == list(names) and isinstance(embeddings, torch.Tensor)
                 and embeddings.dtype == torch.float32 and embeddings.ndim == 3
                 and tuple(embeddings.shape[:2]) == shape and bool(torch.isfinite(embeddings).all()))
        if not valid:
            raise ValueError("contents do not match the key")
        return embeddings
    except Exception as error:  # noqa: BLE001 - any unreadable cache file is recomputed
        warnings.warn(f"ignoring corrupt text-embedding cache file {path} ({type(error).__name__}: {error}); "
                      "recomputing it", RuntimeWarning, stacklevel=3)
        return None


def _save_cached(path: Path, key: str, names: Sequence[str], embeddings: torch.Tensor) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": _FORMAT_VERSION, "key": key, "names": list(names),
                        "embeddings": embeddings.detach().cpu().contiguous()}, handle)
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        warnings.warn(f"could not write the text-embedding cache {path}: {error}", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------------------
# the vocabulary
# ----------------------------------------------------------------------------------------------------------
def _progress_bar(progress: Optional[bool], batches: int, total: int):
    if progress is False or (progress is None and batches <= 3):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    if progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return None
    return tqdm(total=total, unit="prompt", desc="text embeddings", file=sys.stderr, leave=False)


def _tokenize(tokenizer, prompts: List[str], chunk: int = 8192) -> torch.Tensor:
    pieces = [torch.as_tensor(tokenizer(prompts[start:start + chunk])) for start in range(0, len(prompts), chunk)]
    return torch.cat(pieces).long()


def encode_vocabulary(clip_model: nn.Module, tokenizer, names: Sequence[str], *,
                      templates: Sequence[Template] = PROMPT_TEMPLATES, batch_size: int = _DEFAULT_BATCH_SIZE,
                      trim_context: bool = True, cache: Optional[bool] = True,
                      cache_dir: Union[str, os.PathLike, None] = None,
                      progress: Optional[bool] = None) -> torch.Tensor:
    """Text embeddings (T, P, D), float32 on the CLIP model's device, as the official ``class_embeddings``.

    For each name (T names, P = ``len(templates)``): without ``", "``, the P prompts are embedded with the
    CLIP text tower and each embedding is L2-normalised; with ``", "`` (S synonyms), the P*S prompts
    (template-major) are embedded and L2-normalised, reshaped to (P, S, D), averaged over the synonyms and
    L2-normalised again. Computed in float32 without gradients.

    Args:
        clip_model: an open_clip ``CLIP`` (or ``CustomTextCLIP``) model, any device and dtype.
        tokenizer: its open_clip tokenizer (``open_clip.get_tokenizer(name)``).
        names: the class names (validate them with :func:`sed_fast.vocabulary.load_vocabulary`).
        templates: ``str.format`` strings with one ``{}`` or callables; default the 80 ImageNet templates.
        batch_size: prompts per text-tower forward.
        trim_context: cut each batch's context to its longest prompt (exact; see :func:`encode_tokens`).
        cache: use the on-disk cache (also disabled by ``SED_FAST_TEXT_CACHE=0``); None means True.
        cache_dir: cache folder; default :func:`default_cache_dir`. Files are ``<key>.pt`` with
            ``key = text_cache_key(...)``; a corrupt file is recomputed and overwritten with a warning.
        progress: None shows a tqdm bar on a terminal for more than 3 batches; True/False force it.
    """
    names = list(names)
    templates = tuple(templates)
    if not names:
        raise ValueError("encode_vocabulary: no class names")
    if not templates:
        raise ValueError("encode_vocabulary: no templates")
    if batch_size < 1:
        raise ValueError(f"encode_vocabulary: batch_size must be >= 1, got {batch_size}")
    for index, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"encode_vocabulary: class name at index {index} is a {type(name).__name__}")
    tower = _TextTower(clip_model)
    device = tower.device

    path = key = None
    if cache_enabled(cache):
        key = text_cache_key(clip_model, tokenizer, names, templates)
        path = Path(cache_dir).expanduser() / f"{key}.pt" if cache_dir is not None else \
            default_cache_dir() / f"{key}.pt"
        cached = _load_cached(path, key, names, (len(names), len(templates)))
        if cached is not None:
            return cached.to(device)

    # All prompts, each distinct string encoded once.
    per_class: List[Tuple[List[int], int]] = []
    unique: Dict[str, int] = {}
    for name in names:
        prompts, synonyms = class_prompts(name, templates)
        per_class.append(([unique.setdefault(prompt, len(unique)) for prompt in prompts], synonyms))
    prompts = list(unique)
    batches = (len(prompts) + batch_size - 1) // batch_size
    bar = _progress_bar(progress, batches, len(prompts))
    try:
        tokens = _tokenize(tokenizer, prompts)
        order = torch.argsort(tower.pool_index(tokens), stable=True)  # similar lengths share a batch
        embeddings = None
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                rows = order[start:start + batch_size]
                out = tower.encode(tokens[rows].to(device), trim_context=trim_context)
                out = out / out.norm(dim=-1, keepdim=True)
                if embeddings is None:
                    embeddings = torch.empty(len(prompts), out.shape[-1], dtype=torch.float32, device=out.device)
                embeddings[rows.to(out.device)] = out
                if bar is not None:
                    bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()

    with torch.no_grad():
        result = torch.empty(len(names), len(templates), embeddings.shape[-1], dtype=torch.float32,
                             device=embeddings.device)
        for index, (rows, synonyms) in enumerate(per_class):
            class_embeddings = embeddings[torch.as_tensor(rows, device=embeddings.device)]
            if synonyms > 1:
                class_embeddings = class_embeddings.reshape(len(templates), synonyms, -1).mean(dim=1)
                class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
            result[index] = class_embeddings
    if path is not None:
        _save_cached(path, key, names, result)
    return result.to(device)
