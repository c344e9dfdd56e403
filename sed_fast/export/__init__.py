"""``sed-fast export``: SED as a self-contained AOTInductor package or ONNX model (see
:mod:`sed_fast.export.cli` for what the exported model takes and gives, :mod:`.core` for the code)."""
