"""Draw the chat page's favicon (llamaforge/server/static/favicon.ico): a white llama head on the page's blue.

    python scripts/make_favicon.py      # needs Pillow (matplotlib brings it)
"""

from pathlib import Path

from PIL import Image, ImageDraw

BLUE, WHITE = (47, 111, 237, 255), (255, 255, 255, 255)
OUT = Path(__file__).resolve().parents[1] / "llamaforge" / "server" / "static" / "favicon.ico"


def main() -> None:
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([2, 2, 61, 61], radius=14, fill=BLUE)
    d.rectangle([22, 10, 27, 22], fill=WHITE)  # ears
    d.rectangle([34, 10, 39, 22], fill=WHITE)
    d.rounded_rectangle([20, 18, 44, 34], radius=6, fill=WHITE)  # head
    d.rounded_rectangle([36, 24, 50, 34], radius=5, fill=WHITE)  # snout
    d.rectangle([22, 30, 34, 54], fill=WHITE)  # neck
    d.ellipse([37, 22, 41, 26], fill=BLUE)  # eye
    img.save(OUT, sizes=[(16, 16), (32, 32), (48, 48), (64, 64)])
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
