"""sed_exported: load a model written by ``sed-fast export`` and call it with its input checked.

This file needs torch (for ``.pt2``) or onnxruntime and numpy (for ``.onnx``), never sed_fast:
``sed-fast export`` writes a copy of it beside every exported model, so a deployment needs only
the model file and this one.

    import sed_exported
    model = sed_exported.load("sed.pt2")          # or "sed.onnx"
    labels = model(image)                          # vocabulary baked in
    labels = model(image, text_embeddings)         # exported with --vocab-input

    text_model = sed_exported.load("text.pt2")     # sed-fast export --part text
    text_embeddings = text_model(*sed_exported.text_tokens(["cat", "dog", "grass"], text_model))

The model's input contract travels inside the file (pt2 metadata, ONNX metadata_props, key
``sed_fast_contract``, JSON). Each call checks the input against it and raises ``ValueError``
naming what is wrong: the number of dimensions, each size (fixed or in its range), the dtype,
finite values, and for a float image RGB values in 0..255. A non-contiguous input (a slice, a
transposed view, a channels-last tensor) is copied to the contiguous layout the compiled code
reads: the labels are the same as for a contiguous copy. Outputs are what the export says
(``model.output_names``): torch tensors for pt2, numpy arrays for ONNX.
"""
import json
import os

CONTRACT_KEY = "sed_fast_contract"
#: The first line of this file: ``sed-fast export`` overwrites a file of this name only if it starts so.
MARKER = '"""sed_exported: load a model written by ``sed-fast export`` and call it with its input checked.'

__all__ = ["load", "text_tokens", "CheckedModel", "CONTRACT_KEY"]


def load(path, threads=None):
    """The exported model at ``path`` (``.pt2`` or ``.onnx``) as a :class:`CheckedModel`."""
    path = os.fspath(path)
    if path.endswith(".pt2"):
        import torch

        runner = torch._inductor.aoti_load_package(path)
        contract = runner.get_metadata().get(CONTRACT_KEY)
        backend = "pt2"
    elif path.endswith(".onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        runner = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        contract = runner.get_modelmeta().custom_metadata_map.get(CONTRACT_KEY)
        backend = "onnx"
    else:
        raise ValueError(f"{path}: expected a .pt2 or .onnx file written by sed-fast export")
    if contract is None:
        raise ValueError(f"{path} carries no input contract ({CONTRACT_KEY}): export it again with this "
                         "version of sed-fast export")
    return CheckedModel(runner, json.loads(contract), backend)


class CheckedModel:
    """An exported model whose calls check their input against the model's contract."""

    def __init__(self, runner, contract, backend):
        self.runner = runner
        self.contract = contract
        self.backend = backend
        self.input_names = [spec["name"] for spec in contract["inputs"]]
        self.output_names = list(contract["outputs"])
        self.class_names = contract.get("class_names")  # None when the vocabulary is an input

    def __call__(self, *inputs):
        specs = self.contract["inputs"]
        if len(inputs) != len(specs):
            names = ", ".join(self.input_names)
            raise ValueError(f"this model takes {len(specs)} input(s) ({names}), got {len(inputs)}")
        checked = [_checked(value, spec) for value, spec in zip(inputs, specs)]
        if self.backend == "pt2":
            import torch

            checked = [value if hasattr(value, "detach") else torch.from_numpy(value) for value in checked]
            with torch.no_grad():
                return self.runner(*checked)
        checked = [value.detach().cpu().numpy() if hasattr(value, "detach") else value for value in checked]
        outputs = self.runner.run(None, dict(zip(self.input_names, checked)))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def text_tokens(names, text_model):
    """The text model's inputs for class names: (tokens int64 (T, S, P, L), synonyms int64 (T,)),
    numpy arrays. Each name's prompts are the model's templates filled with the name, or with each
    of its synonyms for a name "a, b" (S: the most synonyms of any name; the slots a name does
    not use repeat its first synonym and are ignored), tokenized by open_clip's tokenizer for the
    model's CLIP (the only thing this needs besides numpy: pip install open_clip_torch)."""
    import open_clip

    contract = text_model.contract
    if contract.get("kind") != "text":
        raise ValueError("text_tokens makes the inputs of the text model (sed-fast export --part text), not of "
                         "an image model")
    names = [str(name) for name in names]
    if not names or not all(name.strip() for name in names):
        raise ValueError("text_tokens needs at least one class name, none of them empty")
    return prompt_token_ids(names, open_clip.get_tokenizer(contract["tokenizer"]), contract["templates"])


def prompt_token_ids(names, tokenizer, templates):
    """(tokens int64 (T, S, P, L), synonyms int64 (T,)) numpy arrays: each name's (or synonym's)
    prompts, the templates filled in, tokenized by ``tokenizer``; the one rule the export and this
    loader share."""
    import numpy

    split = [name.split(", ") if ", " in name else [name] for name in names]
    slots = max(len(synonyms) for synonyms in split)
    tokens = []
    for synonyms in split:
        padded = synonyms + [synonyms[0]] * (slots - len(synonyms))
        prompts = [template.format(synonym) for synonym in padded for template in templates]
        tokens.append(numpy.asarray(tokenizer(prompts), dtype=numpy.int64).reshape(slots, len(templates), -1))
    return numpy.stack(tokens), numpy.asarray([len(synonyms) for synonyms in split], dtype=numpy.int64)


def _describe(spec):
    sizes = []
    for size in spec["shape"]:
        sizes.append(str(size) if isinstance(size, int) else f"{size[0]} in [{size[1]}, {size[2]}]")
    return f"{spec['dtype']} ({', '.join(sizes)})"


def _checked(value, spec):
    """``value`` (torch tensor or numpy array) checked against ``spec``; contiguous, in the form
    the backend takes (a torch tensor on its own device for pt2, a numpy array for ONNX)."""
    name = spec["name"]
    is_torch = type(value).__module__.startswith("torch")
    if not is_torch and not hasattr(value, "__array_interface__"):
        raise ValueError(f"{name}: expected a torch tensor or a numpy array, got {type(value).__name__}")
    dtype = str(value.dtype).replace("torch.", "")
    shape = tuple(int(size) for size in value.shape)
    expected = f"expected {name} {_describe(spec)}"
    if len(shape) != len(spec["shape"]):
        raise ValueError(f"{expected}; got {len(shape)} dimensions {shape}. {spec['hint']}")
    for axis, (size, rule) in enumerate(zip(shape, spec["shape"])):
        low, high = (rule, rule) if isinstance(rule, int) else (rule[1], rule[2])
        if not low <= size <= high:
            raise ValueError(f"{expected}; got {dtype} {shape}: size {size} at dimension {axis} is outside "
                             f"[{low}, {high}]. {spec['hint']}")
    if dtype != spec["dtype"]:
        raise ValueError(f"{expected}; got {dtype} {shape}: convert it (e.g. .to(torch.{spec['dtype']}) or "
                         f".astype(numpy.{spec['dtype']})). {spec['hint']}")
    if spec["dtype"].startswith("float"):
        low, high = spec.get("range", (None, None))
        if is_torch:
            import torch

            finite = bool(torch.isfinite(value).all())
            lowest, highest = (float(value.min()), float(value.max())) if finite else (None, None)
        else:
            import numpy

            finite = bool(numpy.isfinite(value).all())
            lowest, highest = (float(value.min()), float(value.max())) if finite else (None, None)
        if not finite:
            raise ValueError(f"{name} holds NaN or infinite values")
        if low is not None and not (low <= lowest and highest <= high):
            raise ValueError(f"{name}: values must lie in [{low:g}, {high:g}], got [{lowest:g}, {highest:g}]. "
                             f"{spec['hint']}")
    if is_torch:
        return value.contiguous()  # the compiled code reads the contiguous layout; a no-op when it is
    import numpy

    return numpy.ascontiguousarray(value)
