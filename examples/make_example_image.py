"""Generate the bundled example image deterministically (a street scene with a stop sign).

Run from the repository root: writes ``edgeprune/assets/example.png`` (the default ``--image``) and
``examples/street.jpg`` (the same picture, the file the README's examples pass to ``--image``).
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont
W, H = 640, 480
img = Image.new("RGB", (W, H))
px = np.zeros((H, W, 3), np.uint8)
y = np.linspace(0, 1, H)[:, None]
px[..., 0] = (120 + 80 * y).astype(np.uint8); px[..., 1] = (170 + 50 * y).astype(np.uint8); px[..., 2] = 235
img = Image.fromarray(px)
d = ImageDraw.Draw(img)
d.rectangle([0, 330, W, H], fill=(90, 90, 95))                  # road
for x in range(20, W, 120): d.rectangle([x, 400, x + 60, 410], fill=(240, 240, 240))
d.rectangle([40, 140, 200, 330], fill=(170, 110, 80)); d.rectangle([220, 90, 360, 330], fill=(140, 140, 160))
for bx in range(55, 190, 45):
    for by in range(160, 300, 50): d.rectangle([bx, by, bx + 25, by + 30], fill=(250, 230, 140))
d.ellipse([520, 40, 590, 110], fill=(255, 220, 80))               # sun
d.rectangle([447, 260, 455, 380], fill=(80, 80, 80))              # sign post
cx, cy, r = 451, 215, 55
oct_pts = [(cx + r * np.cos(np.pi / 8 + k * np.pi / 4), cy + r * np.sin(np.pi / 8 + k * np.pi / 4)) for k in range(8)]
d.polygon(oct_pts, fill=(200, 20, 30), outline=(255, 255, 255))
try:
    font = ImageFont.load_default(size=26)
except TypeError:
    font = ImageFont.load_default()
d.text((cx, cy), "STOP", fill=(255, 255, 255), font=font, anchor="mm")
d.rectangle([380, 350, 560, 400], fill=(30, 90, 200)); d.ellipse([395, 385, 425, 415], fill=(20, 20, 20)); d.ellipse([515, 385, 545, 415], fill=(20, 20, 20))
img.save("edgeprune/assets/example.png", optimize=True)
img.save("examples/street.jpg", quality=90)
