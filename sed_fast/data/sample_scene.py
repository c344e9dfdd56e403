"""The built-in sample scene (drawn, nothing to download) and the names of what is in it.

``sed-fast demo``, the web app's example, ``doctor`` and ``export`` use the scene; the demo segments
it with :data:`SAMPLE_SCENE_CLASSES`, the things drawn in it, so that a real checkpoint has the
right answer in its vocabulary (the 20 VOC classes, aeroplane, bottle..., name nothing in it).
"""
from __future__ import annotations

#: (height, width) of the drawn scene.
SAMPLE_SIZE = (480, 640)

#: What the scene shows, largest first: the demo's vocabulary.
SAMPLE_SCENE_CLASSES = ("sky", "grass", "mountain", "water", "road", "house", "tree", "sun")

#: The same as a ``--vocab`` argument.
SAMPLE_SCENE_VOCABULARY = ",".join(SAMPLE_SCENE_CLASSES)


def draw_sample_scene(height: int = SAMPLE_SIZE[0], width: int = SAMPLE_SIZE[1]):
    """A deterministic RGB landscape as a PIL image: sky, sun, mountains, grass, a lake, a road, a
    house and a tree (no randomness, no files)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.55)
    for y in range(horizon):  # sky: light blue at the horizon, deeper above
        t = y / max(1, horizon - 1)
        draw.line([(0, y), (width, y)], fill=(int(70 + 110 * t), int(130 + 90 * t), int(220 + 30 * t)))
    draw.ellipse([int(width * 0.78), int(height * 0.06), int(width * 0.9), int(height * 0.06) + int(width * 0.12)],
                 fill=(255, 226, 120))
    draw.polygon([(0, horizon), (int(width * 0.3), int(height * 0.38)), (int(width * 0.62), horizon)],
                 fill=(96, 120, 96))
    draw.polygon([(int(width * 0.4), horizon), (int(width * 0.75), int(height * 0.42)), (width, horizon)],
                 fill=(80, 104, 88))
    draw.rectangle([0, horizon, width, height], fill=(76, 150, 60))
    # a lake in the grass, right of the road: blue, lighter towards its far shore
    lake = (int(width * 0.68), int(height * 0.78), int(width * 0.98), int(height * 0.95))
    for i in range(lake[3] - lake[1]):
        t = i / max(1, lake[3] - lake[1] - 1)
        inset = int((lake[2] - lake[0]) * 0.5 * (1 - (1 - (2 * t - 1) ** 2) ** 0.5))
        draw.line([(lake[0] + inset, lake[1] + i), (lake[2] - inset, lake[1] + i)],
                  fill=(int(60 - 20 * t), int(120 - 30 * t), int(190 - 20 * t)))
    draw.polygon([(int(width * 0.42), height), (int(width * 0.49), horizon), (int(width * 0.53), horizon),
                  (int(width * 0.66), height)], fill=(110, 110, 115))
    house = (int(width * 0.08), int(height * 0.45), int(width * 0.3), int(height * 0.72))
    draw.rectangle(house, fill=(190, 150, 110))
    draw.polygon([(house[0] - 10, house[1]), ((house[0] + house[2]) // 2, house[1] - int(height * 0.12)),
                  (house[2] + 10, house[1])], fill=(150, 60, 50))
    draw.rectangle([house[0] + 20, house[1] + 30, house[0] + 50, house[1] + 60], fill=(200, 225, 240))
    draw.rectangle([house[2] - 50, house[3] - 60, house[2] - 25, house[3]], fill=(90, 60, 40))
    trunk_x = int(width * 0.82)
    draw.rectangle([trunk_x - 8, int(height * 0.5), trunk_x + 8, int(height * 0.75)], fill=(100, 70, 40))
    draw.ellipse([trunk_x - 55, int(height * 0.3), trunk_x + 55, int(height * 0.56)], fill=(40, 110, 45))
    return image
