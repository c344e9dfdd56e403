"""The text side of SED as its own export: the CLIP text tower plus SED's prompt ensembling, a pure
function of token ids, so that a deployment can make the image model's ``text_embeddings`` for new
class names without sed_fast.

Input ``tokens`` int64 (T, S, P, L): for each of T classes, S synonym slots, the P prompt templates
(:data:`sed_fast.data.text.PROMPT_TEMPLATES`, in order), L context tokens (open_clip's tokenizer);
and ``synonyms`` int64 (T,): how many of the S slots class t uses (a name ``"a, b"`` has two
synonyms; the slots after them are padding, ignored). Output (T, P, C) float32, the embeddings
:func:`sed_fast.data.text.encode_vocabulary` gives: each prompt's embedding L2-normalised, averaged
over the synonyms and normalised again where there are several. ``sed_exported.text_tokens`` (the
loader written beside the export) makes the two inputs from class names with open_clip alone.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..data.text import PROMPT_TEMPLATES

TOKENS_INPUT, SYNONYMS_INPUT, TEXT_OUTPUT = "tokens", "synonyms", "text_embeddings"
#: The largest class count and synonym count the text export accepts.
MAX_TEXT_CLASSES, MAX_SYNONYMS = 4096, 16


class ExportableText(nn.Module):
    """CLIP text tower + prompt ensembling: (tokens (T, S, P, L), synonyms (T,)) -> (T, P, C)."""

    def __init__(self, clip_model: nn.Module, tokenizer_name: str, context_length: int,
                 templates: Sequence[str] = PROMPT_TEMPLATES):
        super().__init__()
        if not all(isinstance(template, str) for template in templates):
            raise TypeError("the text export takes str.format templates only (they are stored in the file)")
        self.clip_model = clip_model
        self.templates = list(templates)
        self.tokenizer_name = tokenizer_name
        self.context_length = int(context_length)

    def forward(self, tokens: torch.Tensor, synonyms: torch.Tensor) -> torch.Tensor:
        classes, slots, templates, length = tokens.shape
        # open_clip's own full-context forward: exportable (no host-side mask inspection) and equal,
        # to float32 rounding, to the package's trimmed one.
        features = self.clip_model.encode_text(tokens.reshape(-1, length)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        features = features.reshape(classes, slots, templates, -1)
        used = (torch.arange(slots, device=tokens.device)[None, :] < synonyms[:, None]).to(features.dtype)
        mean = (features * used[:, :, None, None]).sum(dim=1) / synonyms.to(features.dtype)[:, None, None]
        several = (synonyms > 1)[:, None, None]
        return torch.where(several, mean / mean.norm(dim=-1, keepdim=True), mean)

    def example_inputs(self) -> Tuple[torch.Tensor, torch.Tensor]:
        names = ["cat", "dog, puppy"]
        return tokens_for(names, self.tokenizer(), self.templates)

    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.tokenizer_name)

    def dynamic_shapes(self):
        classes = torch.export.Dim("classes", min=1, max=MAX_TEXT_CLASSES)
        slots = torch.export.Dim("synonym_slots", min=1, max=MAX_SYNONYMS)
        return {"tokens": {0: classes, 1: slots}, "synonyms": {0: classes}}

    @property
    def input_names(self) -> List[str]:
        return [TOKENS_INPUT, SYNONYMS_INPUT]

    @property
    def output_names(self) -> List[str]:
        return [TEXT_OUTPUT]

    def contract(self) -> Dict[str, object]:
        """The input contract stored in the file (see :mod:`sed_fast.export.runtime`), with what
        ``text_tokens`` needs: the tokenizer's open_clip name and the templates."""
        hint = "Make the inputs with sed_exported.text_tokens(names, model) (needs open_clip)."
        templates = len(self.templates)
        return {"kind": "text",
                "inputs": [{"name": TOKENS_INPUT, "dtype": "int64",
                            "shape": [["T", 1, MAX_TEXT_CLASSES], ["S", 1, MAX_SYNONYMS], templates,
                                      self.context_length], "hint": hint},
                           {"name": SYNONYMS_INPUT, "dtype": "int64", "shape": [["T", 1, MAX_TEXT_CLASSES]],
                            "hint": hint}],
                "outputs": self.output_names, "tokenizer": self.tokenizer_name, "templates": self.templates}


def tokens_for(names: Sequence[str], tokenizer, templates: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens (T, S, P, L) int64, synonyms (T,) int64) for class names: the standalone loader's rule
    (``runtime.prompt_token_ids``, what ``sed_exported.text_tokens`` runs), as tensors."""
    from .runtime import prompt_token_ids

    tokens, synonyms = prompt_token_ids(names, tokenizer, templates)
    return torch.from_numpy(tokens), torch.from_numpy(synonyms)


def build_text_module(variant: str, checkpoint, device: str = "cpu"):
    """(the text export module of a float32 reference SED, the model itself)."""
    import warnings

    from ..api import RandomWeightsWarning, build_sed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_sed(variant, impl="reference", checkpoint=checkpoint, device=device, dtype=torch.float32,
                          clip_resolution=64, preprocess="none")
    import open_clip

    name = model.spec.clip_model
    module = ExportableText(model.clip_model, name, open_clip.get_tokenizer(name).context_length).eval()
    return module, model


def export_text(module: ExportableText, fmt: str, out):
    """torch.export of the text module, then AOTInductor (``pt2``) or ONNX, its contract stored inside."""
    import json
    from pathlib import Path

    from .core import export_onnx_program, export_pt2_program

    with torch.no_grad():
        inputs = module.example_inputs()
        contract = json.dumps(module.contract())
        if fmt == "pt2":
            program = torch.export.export(module, inputs, dynamic_shapes=module.dynamic_shapes())
            return export_pt2_program(program, Path(out), contract)
        return export_onnx_program(module, inputs, module.dynamic_shapes(), module.input_names, module.output_names,
                                   Path(out), contract)


#: The text export's check: the exported model's embeddings vs the package's, relative to their norm.
TEXT_TOLERANCE = 1e-5


def check_text(runner, model, module: ExportableText, names: Sequence[str]) -> Dict[str, object]:
    """The exported text model fed :func:`tokens_for` ``names`` against the package's embeddings
    (``set_vocabulary``): the largest difference relative to the embeddings' norm, per vector."""
    import time

    model.set_vocabulary(list(names), progress=False)
    expected = model.text_embeddings.float().cpu()
    tokens, synonyms = tokens_for(names, module.tokenizer(), module.templates)
    start = time.perf_counter()
    with torch.no_grad():
        out = runner(tokens, synonyms)
    out = torch.as_tensor(out[0] if isinstance(out, (tuple, list)) else out).float().cpu()
    relative = float(((out - expected).norm(dim=-1) / expected.norm(dim=-1)).max())
    return {"classes": len(names), "shape": list(out.shape), "max_relative_diff": relative,
            "seconds": round(time.perf_counter() - start, 3), "ok": relative <= TEXT_TOLERANCE}


def export_text_command(args, names: Sequence[str], info) -> Dict[str, object]:
    """``sed-fast export --part text``: export, load back, check on ``names``; the command's record."""
    import time
    from pathlib import Path

    from . import core

    start = time.perf_counter()
    module, model = build_text_module(args.variant, args.checkpoint)
    info(f"SED-{args.variant.upper()} text side ({module.tokenizer_name}, {len(module.templates)} templates), "
         f"{'random weights' if args.random_weights else args.checkpoint}: exporting ({args.format})")
    path = export_text(module, args.format, Path(args.out).expanduser())
    if args.format == "pt2":
        runner = torch._inductor.aoti_load_package(str(path))
    else:
        onnx = core.OnnxRunner(path)
        runner = lambda tokens, synonyms: onnx.session.run(  # noqa: E731 - the session called like the module
            None, {TOKENS_INPUT: tokens.numpy(), SYNONYMS_INPUT: synonyms.numpy()})[0]
    export_seconds = time.perf_counter() - start
    check = check_text(runner, model, module, names)
    loader = core.write_loader(Path(path).parent)
    return {"part": "text", "format": args.format, "path": str(path), "loader": str(loader),
            "inputs": module.input_names, "outputs": module.output_names, "tokenizer": module.tokenizer_name,
            "templates": len(module.templates), "export_seconds": round(export_seconds, 1), "checks": [check],
            "random_weights": bool(args.random_weights), "ok": check["ok"]}
