"""``sed-fast segment``: images (and, through :mod:`sed_fast.video`, videos) into label maps,
overlays and a run summary."""
