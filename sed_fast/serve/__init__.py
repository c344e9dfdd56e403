"""``sed-fast serve``: a Gradio browser demo (see :mod:`sed_fast.serve.app`)."""
