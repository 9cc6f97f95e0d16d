"""Regenerate the sample images and data/images.csv deterministically: `uv run python data/images/make_images.py`."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def sunset() -> Image.Image:
    img = Image.new("RGB", (320, 200))
    draw = ImageDraw.Draw(img)
    for y in range(130):  # sky: deep blue at the top to orange at the horizon
        t = y / 129
        draw.line([(0, y), (319, y)], fill=(int(40 + 215 * t), int(40 + 100 * t), int(120 - 80 * t)))
    draw.ellipse([130, 85, 190, 145], fill=(255, 200, 40))
    draw.rectangle([0, 130, 319, 199], fill=(20, 50, 110))  # the sea hides the lower half of the sun
    for y in range(140, 200, 12):
        draw.line([(120, y), (200, y)], fill=(250, 170, 60), width=2)
    return img


def house() -> Image.Image:
    img = Image.new("RGB", (400, 300), (150, 200, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 230, 399, 299], fill=(70, 160, 60))
    draw.rectangle([120, 140, 280, 240], fill=(220, 190, 150))
    draw.polygon([(105, 140), (200, 70), (295, 140)], fill=(160, 40, 40))
    draw.rectangle([185, 185, 215, 240], fill=(100, 60, 30))
    draw.rectangle([135, 160, 170, 190], fill=(250, 250, 200))
    draw.rectangle([230, 160, 265, 190], fill=(250, 250, 200))
    draw.ellipse([320, 20, 370, 70], fill=(255, 230, 60))
    return img


def chart() -> Image.Image:
    img = Image.new("RGB", (360, 240), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(40, 20), (40, 210), (340, 210)], fill="black", width=2)
    for i, (value, colour) in enumerate(zip((60, 140, 100, 175), ("#e4572e", "#17bebb", "#ffc914", "#76b041"))):
        x = 60 + i * 70
        draw.rectangle([x, 210 - value, x + 45, 209], fill=colour)
        draw.text((x + 15, 215), "ABCD"[i], fill="black")
    draw.text((120, 4), "Sales by quarter", fill="black")
    return img


def checkerboard() -> Image.Image:
    img = Image.new("L", (256, 256), 255)
    draw = ImageDraw.Draw(img)
    for row in range(8):
        for col in range(8):
            if (row + col) % 2:
                draw.rectangle([col * 32, row * 32, col * 32 + 31, row * 32 + 31], fill=0)
    return img


def banner() -> Image.Image:
    """2000×400: wider than the default --max-side of 1536, so it is downscaled before sending."""
    img = Image.new("RGB", (2000, 400), (250, 245, 230))
    draw = ImageDraw.Draw(img)
    for i, colour in enumerate(((230, 60, 60), (240, 160, 40), (60, 170, 80), (50, 110, 200), (130, 70, 180))):
        draw.rectangle([i * 400, 300, i * 400 + 399, 399], fill=colour)
    draw.ellipse([900, 60, 1100, 260], fill=(240, 160, 40))
    return img


IMAGES = {
    "sunset.png": (sunset, {}),
    "house.jpg": (house, {"quality": 85}),
    "chart.png": (chart, {}),
    "checkerboard.png": (checkerboard, {}),
    "banner.png": (banner, {}),
}


def main() -> None:
    rows = []
    for i, (name, (draw, options)) in enumerate(IMAGES.items(), start=1):
        draw().save(HERE / name, optimize=name.endswith(".png"), **options)
        rows.append({"id": i, "image": f"images/{name}"})
    with open(HERE.parent / "images.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
