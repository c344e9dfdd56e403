"""A built-in sample scene: an input with nothing to download (the demo, doctor, export and serve use it)."""
from __future__ import annotations

SAMPLE_SIZE = (480, 640)  # (height, width) of the drawn scene


def draw_sample(height: int = SAMPLE_SIZE[0], width: int = SAMPLE_SIZE[1]):
    """A deterministic RGB scene as a PIL image (no randomness, no files)."""
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
