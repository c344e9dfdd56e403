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
3. the prompts of one template share their first tokens (``a photo of a`` in ``a photo of a {}.``), and
   in a causal transformer a token's states depend only on the tokens before it: each shared prefix is
   run once, its per-layer keys and values are reused by every prompt of the template, and only the
   rest of each prompt (the name, the end of the template) runs per prompt; the same arithmetic as the
   whole prompt, to float32 rounding (~1e-7), and about 60% fewer token-layer passes for the 80
   templates (a prompt averages ~9 tokens, ~5 of them shared); towers of another block structure take
   the per-prompt path;
4. results are cached on disk per class name, keyed by (text-tower weights with their dtype, tokenizer,
   the name, the templates): a vocabulary that differs from a cached one by one name encodes that name.

The cache: one ``<key>.pt`` file per class name (its (P, D) float32 embeddings, the signature of its
tokens and its prompts cut at the context), with the sha256 of all of it, checked on every load (a file
that fails the check, or cannot be parsed, is reported as corrupt, recomputed and overwritten; one that
cannot be read at all, e.g. permission denied, is reported as unreadable and recomputed). Files are
written to a temporary file in the cache folder and renamed into place, so an interrupted write never
leaves a partial entry and concurrent processes each see whole entries. After a vocabulary's new entries
are written the least recently used entries (by modification time; a cache hit touches its file) are
deleted until the cache holds at most ``SED_FAST_TEXT_CACHE_MB`` megabytes; the entries of the
vocabulary just encoded are always kept. Per-vocabulary entries of earlier versions (format 3) sit in
the same folder, are never read, and leave by the same size cap. A name computed in another vocabulary
went through other batches: its embeddings equal a fresh computation to float32 rounding (~1e-7).

Before encoding, names the tokenizer makes identical (it lower-cases and cleans whitespace: ``"cat"``,
``"Cat"``, ``" cat"``; or two long names equal in their first ``context_length`` tokens) are refused as
duplicates (they would give identical output channels), and prompts cut at the context length are
reported with a warning.

Environment (see :mod:`sed_fast.base.envvars`): ``SED_FAST_CACHE_DIR`` (cache root; the text cache is its
``text/`` sub-folder, default ``~/.cache/sed_fast/text``), ``SED_FAST_TEXT_CACHE`` (``0/false/no/off``
disables the cache; default on), ``SED_FAST_TEXT_CACHE_MB`` (size cap in megabytes, a number, default
2048; 0 keeps only the entry just written).
"""
import contextlib
import copy
import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as _OPENAI_IMAGENET_TEMPLATES

from ..base.envvars import cache_root, env_value
from ..base.files import atomic_write

__all__ = ["PROMPT_TEMPLATES", "encode_vocabulary", "encode_tokens", "class_prompts", "text_cache_key",
           "class_cache_keys", "cache_files", "describe_cache_file", "stale_temporary",
           "default_cache_dir", "cache_enabled", "cache_limit_bytes", "check_tokenized_duplicates",
           "TruncatedPromptWarning"]

#: The 80 OpenAI ImageNet prompt templates as ``str.format`` strings (``"a bad photo of a {}."``), in the
#: order of ``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`` (identical to the official SED list;
#: the order matters: the decoder's first conv has one input channel per template).
PROMPT_TEMPLATES: Tuple[str, ...] = tuple(template("{}") for template in _OPENAI_IMAGENET_TEMPLATES)

Template = Union[str, Callable[[str], str]]

_FORMAT_VERSION = 4  # 2: entries carry the sha256 of the embeddings; 3: and the warnings of their making;
#                    4: one entry per class name, with the signature of its tokens and its prompts cut
_PROGRESS_SECONDS = 10.0  # interval of the progress lines written when no progress bar is shown
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


    def prefix_shareable(self) -> bool:
        """Whether :meth:`encode_with_prefixes` is exact here: the trimmed forward is, and the
        transformer is open_clip's stack of plain self-attention blocks."""
        if not self.trimmable:
            return False
        try:
            from open_clip.transformer import ResidualAttentionBlock
        except ImportError:  # pragma: no cover - open_clip is a dependency
            return False
        transformer = self._float32_parts()[2]
        blocks = getattr(transformer, "resblocks", None)
        return (isinstance(blocks, nn.ModuleList) and len(blocks) > 0
                and type(transformer).forward.__qualname__ == "Transformer.forward"
                and all(type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
                        and isinstance(block.attn, nn.MultiheadAttention) and block.attn._qkv_same_embed_dim
                        and block.attn.in_proj_bias is not None and block.attn.bias_k is None
                        and not block.attn.add_zero_attn for block in blocks))

    def prefix_states(self, prefixes: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the attention keys and values (G, p, D) of the ``prefixes`` (G, p) tokens."""
        token_embedding, positional_embedding, transformer, _, _, attn_mask = self._float32_parts()
        length = prefixes.shape[1]
        x = token_embedding(prefixes).to(torch.float32) + positional_embedding[:length].to(torch.float32)
        mask = attn_mask[:length, :length]
        states = []
        for block in transformer.resblocks:
            h = block.ln_1(x)
            query, key, value = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            states.append((key, value))
            x = x + block.ls_1(_attention(block.attn, query, key, value, mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return states

    def encode_with_prefixes(self, tokens: torch.Tensor, length: int, states, group: torch.Tensor) -> torch.Tensor:
        """``encode(tokens)`` for rows whose first ``length`` tokens are those of prefix
        ``group[i]`` (keys and values from :meth:`prefix_states`): only positions ``length..`` run,
        their attention reading the prefix's keys and values."""
        token_embedding, positional_embedding, transformer, ln_final, projection, attn_mask = \
            self._float32_parts()
        index = self.pool_index(tokens)
        end = int(index.max().item()) + 1
        x = token_embedding(tokens[:, length:end]).to(torch.float32)
        x = x + positional_embedding[length:end].to(torch.float32)
        mask = attn_mask[length:end, :end]  # the query at length + i sees keys 0 .. length + i
        for block, (prefix_key, prefix_value) in zip(transformer.resblocks, states):
            h = block.ln_1(x)
            query, key, value = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            key = torch.cat([prefix_key[group], key], dim=1)
            value = torch.cat([prefix_value[group], value], dim=1)
            x = x + block.ls_1(_attention(block.attn, query, key, value, mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), index - length]
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return x.float()


def _attention(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """``nn.MultiheadAttention``'s output for projected (N, L, D) query, key and value: per-head
    scaled dot-product attention with the additive ``mask``, then the output projection."""
    heads = attn.num_heads
    n, lq, d = query.shape

    def split(t):
        return t.reshape(n, t.shape[1], heads, d // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask.to(query.dtype))
    return attn.out_proj(out.transpose(1, 2).reshape(n, lq, d))


def _shared_prefixes(tokens: torch.Tensor, pool: torch.Tensor, groups: List[List[int]]):
    """For each group of rows: the length of the tokens all its rows share, capped so every row
    keeps its pooled token (and at least one token) after it."""
    lengths = []
    for rows in groups:
        block = tokens[torch.as_tensor(rows)]
        same = (block == block[:1]).all(dim=0)
        shared = int(same.long().cumprod(0).sum().item())
        lengths.append(max(0, min(shared, int(pool[torch.as_tensor(rows)].min().item()))))
    return lengths


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
    """The text-embedding cache folder: ``text/`` under :func:`sed_fast.base.envvars.cache_root`
    (``$SED_FAST_CACHE_DIR/text``, else ``~/.cache/sed_fast/text``)."""
    return cache_root() / "text"


def cache_enabled(cache: Optional[bool] = True) -> bool:
    """Whether the text cache is used: not when ``cache`` is False or ``SED_FAST_TEXT_CACHE`` is off
    (``0/false/no/off``; a value that is not a boolean word raises ``ValueError``)."""
    enabled = env_value("SED_FAST_TEXT_CACHE")
    return enabled and cache is not False


def cache_limit_bytes() -> int:
    """The text cache's size cap: ``SED_FAST_TEXT_CACHE_MB`` (a number, default 2048) megabytes, in bytes."""
    return int(env_value("SED_FAST_TEXT_CACHE_MB") * (1 << 20))


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


def _model_digest(clip_model: nn.Module, tokenizer) -> str:
    """What identifies the embeddings apart from the class and templates (sha256 hex): the format
    version, every text-tower parameter and buffer (by sorted name, with dtype, shape and raw bytes),
    the tower's structure and the tokenizer's identity."""
    tower = _TextTower(clip_model)
    digest = hashlib.sha256()
    digest.update(f"sed_fast.data.text.encode_vocabulary format {_FORMAT_VERSION}\n".encode())
    for name, tensor in tower.named_tensors():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        _hash_tensor(digest, tensor)
    meta = {"architecture": tower.architecture(), "tokenizer": _tokenizer_identity(tokenizer)}
    digest.update(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def _class_key(model_digest: str, name: str, templates: Sequence[Template]) -> str:
    meta = {"model": model_digest, "name": name, "templates": [_template_identity(t) for t in templates],
            "prompts": class_prompts(name, templates)[0]}
    return hashlib.sha256(json.dumps(meta, ensure_ascii=False).encode("utf-8")).hexdigest()


def class_cache_keys(clip_model: nn.Module, tokenizer, names: Sequence[str],
                     templates: Sequence[Template] = PROMPT_TEMPLATES) -> List[str]:
    """The cache key (sha256 hex) of each class name's (P, D) embeddings, in the order of ``names``.

    A key hashes the format version, every text-tower parameter and buffer (token embedding,
    positional embedding, transformer, final LayerNorm, projection, attention mask; by sorted name,
    with dtype, shape and raw bytes), the tower's structure (activations, norms, pooling), the
    tokenizer's identity (class, context length, vocabulary size, a probe tokenisation), the exact
    name, the exact templates and every filled prompt. Changing any weight, the name or a template
    changes the key; the other names of a vocabulary do not enter it.
    """
    model_digest = _model_digest(clip_model, tokenizer)
    templates = tuple(templates)
    return [_class_key(model_digest, name, templates) for name in names]


def text_cache_key(clip_model: nn.Module, tokenizer, names: Sequence[str],
                   templates: Sequence[Template] = PROMPT_TEMPLATES) -> str:
    """One key (sha256 hex) for a whole vocabulary's embeddings: the hash of its names' keys
    (:func:`class_cache_keys`) in order. Changing any weight, name, the names' order or a template
    changes it. The cache itself is kept per class name."""
    return hashlib.sha256("\n".join(class_cache_keys(clip_model, tokenizer, names, templates)).encode()).hexdigest()


def _payload_digest(embeddings: torch.Tensor, signature: str, truncated: Sequence[str]) -> str:
    digest = hashlib.sha256()
    digest.update(f"{embeddings.dtype}|{tuple(embeddings.shape)}\n".encode())
    _hash_tensor(digest, embeddings.contiguous())
    digest.update(json.dumps([signature, list(truncated)], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


class _ClassEntry:
    """One class name's embeddings (P, D) and what its tokens said: a signature of its tokens (two
    names with equal signatures tokenize identically) and its prompts cut at the context length."""

    __slots__ = ("embeddings", "signature", "truncated")

    def __init__(self, embeddings: Optional[torch.Tensor], signature: str, truncated: List[str]):
        self.embeddings, self.signature, self.truncated = embeddings, signature, truncated


def _load_cached(path: Path, key: str, name: str, num_templates: int) -> Optional[_ClassEntry]:
    """The entry of ``path`` when it is valid for ``key``, else None (with a warning for a corrupt or
    unreadable file; silently for a missing one or one of an older format)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as error:  # permission denied, I/O error: the file may be fine, we cannot tell
        warnings.warn(f"text-embedding cache file {path} is unreadable ({type(error).__name__}: "
                      f"{error.strerror or error}); recomputing the embeddings", RuntimeWarning, stacklevel=3)
        return None
    try:
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        if isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] < _FORMAT_VERSION:
            return None  # written by an older version: recomputed and replaced, silently
        embeddings = data["embeddings"]
        truncated = data.get("truncated")
        valid = (isinstance(truncated, list) and all(isinstance(prompt, str) for prompt in truncated)
                 and data.get("format") == _FORMAT_VERSION and data.get("key") == key
                 and data.get("name") == name and isinstance(data.get("signature"), str)
                 and isinstance(embeddings, torch.Tensor) and embeddings.dtype == torch.float32
                 and embeddings.ndim == 2 and embeddings.shape[0] == num_templates)
        if not valid:
            raise ValueError("contents do not match the key")
        if data.get("sha256") != _payload_digest(embeddings, data["signature"], truncated):
            raise ValueError("the embeddings' checksum does not match (the file was modified or damaged)")
    except Exception as error:  # noqa: BLE001 - any unparsable or failing file is recomputed
        warnings.warn(f"ignoring corrupt text-embedding cache file {path} ({type(error).__name__}: {error}); "
                      "recomputing it", RuntimeWarning, stacklevel=3)
        return None
    try:
        os.utime(path)  # a hit makes the entry recently used (eviction is by modification time)
    except OSError:
        pass
    return _ClassEntry(embeddings, data["signature"], list(truncated))


def _save_cached(path: Path, key: str, name: str, entry: _ClassEntry) -> bool:
    """Write one class's entry atomically; False (with a warning) when it cannot be written."""
    embeddings = entry.embeddings.detach().cpu().contiguous()
    data = {"format": _FORMAT_VERSION, "key": key, "name": name,
            "sha256": _payload_digest(embeddings, entry.signature, entry.truncated),
            "embeddings": embeddings, "signature": entry.signature, "truncated": list(entry.truncated)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(data, handle), fsync=True)
    except OSError as error:
        warnings.warn(f"could not write the text-embedding cache {path}: {error}", RuntimeWarning, stacklevel=3)
        return False
    return True


_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.pt")  # <key>.pt
_TEMPORARY_NAME = re.compile(r"\.[0-9a-f]{64}\.[A-Za-z0-9_]+\.tmp")  # atomic_write's ".<key>.<random>.tmp"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's file format
_STALE_TEMPORARY_SECONDS = 3600  # a younger temporary file may still be being written


def _is_torch_file(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == _ZIP_MAGIC
    except OSError:
        return False


def cache_files(folder: Union[str, os.PathLike, None] = None) -> Tuple[List[Path], List[Path]]:
    """The files of a text cache folder (default :func:`default_cache_dir`) that this module wrote:
    (entries, temporary files left by writers). An entry is a regular file named ``<64 hex digits>.pt``
    in torch's file format (entries of earlier formats included); a temporary file is named as
    :func:`sed_fast.base.files.atomic_write` names it for an entry. Anything else is not listed."""
    folder = Path(folder).expanduser() if folder is not None else default_cache_dir()
    entries: List[Path] = []
    temporaries: List[Path] = []
    try:
        scanned = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return entries, temporaries
    for entry in scanned:
        if not entry.is_file(follow_symlinks=False):
            continue
        if _ENTRY_NAME.fullmatch(entry.name) and _is_torch_file(Path(entry.path)):
            entries.append(Path(entry.path))
        elif _TEMPORARY_NAME.fullmatch(entry.name):
            temporaries.append(Path(entry.path))
    return entries, temporaries


def stale_temporary(path: Path) -> bool:
    """Whether a temporary file is old enough that no writer can still be writing it (an hour)."""
    try:
        return path.lstat().st_mtime < time.time() - _STALE_TEMPORARY_SECONDS
    except OSError:
        return False


def describe_cache_file(path: Union[str, os.PathLike]) -> str:
    """What a text cache entry holds, in words: the class name and shape, or that it is a vocabulary
    entry of an earlier version (no longer read), or why it cannot be read."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged entry is described, not raised
        return f"unreadable ({type(error).__name__}); recomputed when next needed"
    if not isinstance(data, dict):
        return "not a text-embedding entry"
    embeddings = data.get("embeddings")
    shape = "x".join(map(str, embeddings.shape)) if isinstance(embeddings, torch.Tensor) else "?"
    if data.get("format") == _FORMAT_VERSION:
        return f"{data.get('name')!r} ({shape}: templates x width)"
    names = data.get("names")
    count = len(names) if isinstance(names, list) else "?"
    return f"vocabulary of {count} names (format {data.get('format')}, no longer read)"


def _evict(folder: Path, keep: Sequence[str], limit: int) -> None:
    """Delete the least recently used entries of ``folder`` (see :func:`cache_files`; oldest
    modification time first) until the rest fit in ``limit`` bytes; the entries named in ``keep``
    (those of the vocabulary just encoded) stay. Temporary files over an hour old (left by a killed
    process) are deleted too."""
    keep = set(keep)
    found, temporaries = cache_files(folder)
    for path in temporaries:
        if stale_temporary(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    entries = []
    for path in found:
        with contextlib.suppress(OSError):
            stat = path.lstat()
            entries.append((stat.st_mtime, path.name, stat.st_size))
    total = sum(size for _, _, size in entries)
    for _, name, size in sorted(entries):
        if total <= limit:
            break
        if name in keep:
            continue
        try:
            os.unlink(folder / name)
            total -= size
        except FileNotFoundError:
            total -= size
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


class _ProgressLog:
    """Progress as plain lines on stderr (for logs and pipes, where no bar is shown): one line at
    the start of a long job, then one every ``_PROGRESS_SECONDS`` and one at the end if any was written."""

    def __init__(self, enabled: bool, total: int, classes: int, announce: bool):
        self.enabled, self.total, self.done = enabled, total, 0
        self.start = self.last = time.perf_counter()
        self.wrote = False
        if enabled and announce:
            self._write(f"text embeddings: encoding {total} prompts of {classes} classes")

    def _write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        self.wrote = True

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and now - self.last >= _PROGRESS_SECONDS and self.done < self.total:
            self.last = now
            self._write(f"text embeddings: {self.done}/{self.total} prompts, {now - self.start:.0f} s")

    def close(self) -> None:
        if self.enabled and self.wrote:
            self._write(f"text embeddings: {self.done}/{self.total} prompts, done in "
                        f"{time.perf_counter() - self.start:.0f} s")


def _tokenize(tokenizer, prompts: List[str], chunk: int = 8192) -> torch.Tensor:
    pieces = [torch.as_tensor(tokenizer(prompts[start:start + chunk])) for start in range(0, len(prompts), chunk)]
    return torch.cat(pieces).long()


class TruncatedPromptWarning(UserWarning):
    """A prompt is longer than the tokenizer's context: its end is cut off before embedding."""


def _class_rows(names: Sequence[str], templates: Sequence[Template]):
    """(per class: (indices into the distinct prompts, synonyms), the distinct prompts)."""
    per_class: List[Tuple[List[int], int]] = []
    unique: Dict[str, int] = {}
    for name in names:
        prompts, synonyms = class_prompts(name, templates)
        per_class.append(([unique.setdefault(prompt, len(unique)) for prompt in prompts], synonyms))
    return per_class, list(unique)


def _token_facts(tokenizer, per_class, prompts: List[str], tokens: torch.Tensor) -> List[_ClassEntry]:
    """Per class (rows into ``prompts``/``tokens``, synonyms): an entry without embeddings holding the
    signature of its tokens and its prompts cut at the context, in the class's prompt order."""
    cut: set = set()
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is not None:  # else not open_clip's tokenizer: no reliable way to see truncation
        # end-of-text in the last slot: cut, or just fits
        full = torch.nonzero(tokens[:, -1] == eot).reshape(-1).tolist()
        encode = getattr(tokenizer, "encode", None)
        if callable(encode):  # open_clip SimpleTokenizer: count the tokens without the context limit
            try:
                full = [row for row in full if len(encode(prompts[row])) + 2 > tokens.shape[1]]
            except Exception:  # noqa: BLE001 - keep the conservative list
                pass
        cut = set(full)
    facts = []
    for rows, synonyms in per_class:
        signature = hashlib.sha256(tokens[torch.as_tensor(rows)].numpy().tobytes()
                                   + synonyms.to_bytes(4, "little")).hexdigest()
        truncated = list(dict.fromkeys(prompts[row] for row in rows if row in cut))
        facts.append(_ClassEntry(None, signature, truncated))
    return facts


def _context_length(tokenizer) -> int:
    length = getattr(tokenizer, "context_length", None)
    return int(length) if isinstance(length, int) else int(_tokenize(tokenizer, [""]).shape[1])


def _check_tokens(names: Sequence[str], facts: Sequence[_ClassEntry], context: int) -> Optional[str]:
    """Refuse classes whose prompts all tokenize identically (equal signatures); return the warning
    about prompts cut at the ``context`` length (None when none is cut)."""
    groups: Dict[str, List[int]] = {}
    for index, fact in enumerate(facts):
        groups.setdefault(fact.signature, []).append(index)
    same = [indices for indices in groups.values() if len(indices) > 1]
    if same:
        detail = "; ".join(" = ".join(f"{names[i]!r} (index {i})" for i in indices) for indices in same[:5])
        more = f"; ... and {len(same) - 5} more groups" if len(same) > 5 else ""
        raise ValueError(
            f"class names that the tokenizer makes identical: {detail}{more}. The tokenizer lower-cases, "
            f"cleans whitespace and keeps only the first {context} tokens of a prompt, so these "
            "would give identical output channels: remove or reword the duplicates")
    classes = [index for index, fact in enumerate(facts) if fact.truncated]
    if not classes:
        return None
    cut = list(dict.fromkeys(prompt for index in classes for prompt in facts[index].truncated))
    shown = ", ".join(f"{names[i]!r} (index {i})" for i in classes[:5])
    more = f" ... and {len(classes) - 5} more" if len(classes) > 5 else ""
    return (f"{len(cut)} prompt(s) of {len(classes)} class(es) are longer than the tokenizer's "
            f"{context}-token context and are cut off (e.g. {cut[0]!r}): {shown}{more}. "
            "Shorten those class names")


def check_tokenized_duplicates(tokenizer, names: Sequence[str],
                               templates: Sequence[Template] = PROMPT_TEMPLATES) -> None:
    """Raise ``ValueError`` for class names whose prompts the tokenizer makes identical (``"cat"``,
    ``"Cat"``, ``" cat"``; names equal in their first context-length tokens), naming them and their
    indices; warn (:class:`TruncatedPromptWarning`) about prompts cut at the context length."""
    names = list(names)
    per_class, prompts = _class_rows(names, tuple(templates))
    tokens = _tokenize(tokenizer, prompts)
    message = _check_tokens(names, _token_facts(tokenizer, per_class, prompts, tokens), tokens.shape[1])
    if message:
        warnings.warn(message, TruncatedPromptWarning, stacklevel=2)


def _encode_batches(tower: "_TextTower", tokens: torch.Tensor, per_class, num_templates: int, batch_size: int,
                    trim_context: bool, device: torch.device):
    """Yield (rows, their (n, D) features) for every distinct prompt, ``batch_size`` at a time.
    Prompts are grouped by template and each template's shared prefix runs once (see the module
    docstring) where the tower allows it; else batches of similar lengths run whole."""
    pool = tower.pool_index(tokens)
    if not (trim_context and tower.prefix_shareable()):
        order = torch.argsort(pool, stable=True)  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            yield rows, tower.encode(tokens[rows].to(device), trim_context=trim_context)
        return
    template_of: Dict[int, int] = {}
    for rows, synonyms in per_class:
        for k, row in enumerate(rows):
            template_of.setdefault(row, k // synonyms)
    groups: List[List[int]] = [[] for _ in range(num_templates)]
    for row, template in sorted(template_of.items()):
        groups[template].append(row)
    groups = [rows for rows in groups if rows]
    lengths = _shared_prefixes(tokens, pool, groups)
    # One pass per prefix length: its prefixes' states once, then its rows by length, in batches.
    for length in sorted(set(lengths)):
        members = [g for g, n in enumerate(lengths) if n == length]
        if length == 0:  # nothing shared (not so for open_clip tokens: every prompt starts with <start>)
            rows = torch.as_tensor([row for g in members for row in groups[g]])
            for start in range(0, len(rows), batch_size):
                yield rows[start:start + batch_size], tower.encode(tokens[rows[start:start + batch_size]].to(device))
            continue
        prefixes = torch.stack([tokens[groups[g][0], :length] for g in members]).to(device)
        states = tower.prefix_states(prefixes)
        rows = torch.as_tensor([row for g in members for row in groups[g]])
        group = torch.as_tensor([i for i, g in enumerate(members) for _ in groups[g]])
        order = torch.argsort(pool[rows], stable=True)
        rows, group = rows[order], group[order]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield chunk, tower.encode_with_prefixes(tokens[chunk].to(device), length, states,
                                                    group[start:start + batch_size].to(device))


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
        names: the class names (validate them with :func:`sed_fast.data.vocabulary.load_vocabulary`).
        templates: ``str.format`` strings with one ``{}`` or callables; default the 80 ImageNet templates.
        batch_size: prompts per text-tower forward.
        trim_context: cut each batch's context to its longest prompt (exact; see :func:`encode_tokens`).
        cache: use the on-disk cache (also disabled by ``SED_FAST_TEXT_CACHE=0``); None means True.
        cache_dir: cache folder; default :func:`default_cache_dir`. Files are ``<key>.pt``,
            one per class name, ``key`` from :func:`class_cache_keys`; a corrupt file is recomputed and
            overwritten with a warning. Only the names without a valid entry are encoded.
        progress: None shows a tqdm bar on a terminal for more than 3 batches, and elsewhere (logs,
            pipes) writes a progress line to stderr every 10 s; True forces the bar; False silences both.

    Raises ``ValueError`` for names the tokenizer makes identical (see :func:`check_tokenized_duplicates`)
    and warns (:class:`TruncatedPromptWarning`) about prompts cut at the context length.
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

    entries: List[Optional[_ClassEntry]] = [None] * len(names)
    folder = keys = None
    if cache_enabled(cache):
        limit = cache_limit_bytes()  # read first: a bad value fails before the work, not after
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        keys = class_cache_keys(clip_model, tokenizer, names, templates)
        for index, (name, key) in enumerate(zip(names, keys)):
            entries[index] = _load_cached(folder / f"{key}.pt", key, name, len(templates))
        widths = {entry.embeddings.shape[1] for entry in entries if entry is not None}
        if len(widths) > 1:  # entries of one model disagree: none of them can be trusted
            warnings.warn(f"text-embedding cache entries in {folder} for one model have different widths "
                          f"{sorted(widths)}; recomputing them", RuntimeWarning, stacklevel=2)
            entries = [None] * len(names)
    missing = [index for index, entry in enumerate(entries) if entry is None]

    # Only the names without a cache entry are tokenized and encoded, each distinct prompt once.
    per_class = prompts = tokens = None
    context = None
    if missing:
        per_class, prompts = _class_rows([names[index] for index in missing], templates)
        tokens = _tokenize(tokenizer, prompts)
        context = tokens.shape[1]
        for index, fact in zip(missing, _token_facts(tokenizer, per_class, prompts, tokens)):
            entries[index] = fact
    message = _check_tokens(names, entries, context if context is not None else _context_length(tokenizer))
    if message:
        warnings.warn(message, TruncatedPromptWarning, stacklevel=2)
    if missing:
        computed = _encode_classes(tower, per_class, prompts, tokens, len(templates), batch_size, trim_context,
                                   device, progress)
        for position, index in enumerate(missing):
            entries[index].embeddings = computed[position]
        cached_widths = {entries[index].embeddings.shape[1] for index in range(len(names)) if index not in missing}
        if cached_widths and cached_widths != {computed.shape[2]}:  # entries that cannot be this model's
            warnings.warn(f"text-embedding cache entries in {folder} are {sorted(cached_widths)} wide where this "
                          f"model gives {computed.shape[2]}; recomputing them", RuntimeWarning, stacklevel=2)
            missing = list(range(len(names)))
            per_class, prompts = _class_rows(names, templates)
            tokens = _tokenize(tokenizer, prompts)
            entries = _token_facts(tokenizer, per_class, prompts, tokens)
            computed = _encode_classes(tower, per_class, prompts, tokens, len(templates), batch_size,
                                       trim_context, device, progress)
            for index in missing:
                entries[index].embeddings = computed[index]
        if folder is not None:
            written = [_save_cached(folder / f"{keys[index]}.pt", keys[index], names[index], entries[index])
                       for index in missing]
            if any(written):
                _evict(folder, keep=[f"{key}.pt" for key in keys], limit=limit)
    return torch.stack([entry.embeddings.to(device) for entry in entries])


def _encode_classes(tower: "_TextTower", per_class, prompts: List[str], tokens: torch.Tensor, num_templates: int,
                    batch_size: int, trim_context: bool, device: torch.device,
                    progress: Optional[bool]) -> torch.Tensor:
    """(C, P, D) float32 embeddings of the classes ``per_class`` (rows into the distinct ``prompts``)."""
    batches = (len(prompts) + batch_size - 1) // batch_size
    bar = _progress_bar(progress, batches, len(prompts))
    log = _ProgressLog(bar is None and progress is not False, len(prompts), len(per_class), announce=batches > 3)
    try:
        embeddings = None
        with torch.no_grad():
            for rows, out in _encode_batches(tower, tokens, per_class, num_templates, batch_size, trim_context,
                                             device):
                out = out / out.norm(dim=-1, keepdim=True)
                if embeddings is None:
                    embeddings = torch.empty(len(prompts), out.shape[-1], dtype=torch.float32, device=out.device)
                embeddings[rows.to(out.device)] = out
                if bar is not None:
                    bar.update(len(rows))
                log.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    log.close()

    with torch.no_grad():
        result = torch.empty(len(per_class), num_templates, embeddings.shape[-1], dtype=torch.float32,
                             device=embeddings.device)
        for index, (rows, synonyms) in enumerate(per_class):
            class_embeddings = embeddings[torch.as_tensor(rows, device=embeddings.device)]
            if synonyms > 1:
                class_embeddings = class_embeddings.reshape(num_templates, synonyms, -1).mean(dim=1)
                class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
            result[index] = class_embeddings
    return result
