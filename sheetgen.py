"""sheetssl synthetic construction sheets: a procedural generator of labeled drawing sheets.

Each sheet is drawn twice with the same primitives: the paper image (black ink on white) and a
label image of class ids, plus an ink mask. A sheet holds a border and title block and one kind
of drawing: a floor plan (walls, doors, windows, stairs, furniture, dimensions, grids, notes), a
building section or elevation, construction details, or schedules (tables with type elevations);
optional scan realism (tilt, faded toner, speckle, paper tone) is applied last.

`common.open_sheets("synthetic", ...)` and the probe (`synthetic_probe_set`) reach this module (they
import it lazily, so training on a folder of real sheets needs only common.py and a recipe). The
data contract lives in common: class ids are indices into `common.CLASSES` (label = footprint,
later drawing overwrites earlier, see the comment below), `sheet_type` indexes
`common.SHEET_TYPES`, ink is `image < common.INK_THRESHOLD` before scan noise, and sheets are the
same dicts that `common.FolderSheets` returns, with `label` and `ink` filled in.
"""
from __future__ import annotations

import math
import zlib
from collections import OrderedDict

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common import (ANNO, BG, DIM, DOOR, FIXTURE, INK_THRESHOLD, SHEET_TYPES, STAIR, TEXT, WALL, WINDOW, _region,
                    cut_region)


# Labels are FOOTPRINTS, not ink, so that the majority label of a 16 px patch means something:
#   wall       cut walls and columns incl. their poche/hatch; cut slabs and roofs in sections,
#              facade outlines in elevations; cut construction layers in details.
#   door       plan: wall opening + leaf + swing area; door elevations; door frames in details.
#   window     plan: the window's stretch of wall; window elevations; frame profiles in details.
#   stair      the whole flight: treads, outline, direction arrow, handrail in section.
#   fixture    bounding box of sanitary fixtures, kitchen counters and furniture.
#   dimension  the strip of a dimension string (line, ticks, numbers), its extension lines,
#              level marks.
#   text       box of every free text: room names, areas, notes, titles, title-block and table
#              entries.
#   annotation everything else that is drawn: grid lines and bubbles, section/detail callouts,
#              leaders, north arrow, hatches outside walls (terraces, earth), overhang and
#              break lines, the border, title-block and table rules.
# Later elements overwrite earlier labels, so draw order is label priority.

# 80-120 px/m is a 150 dpi sheet drawn at 1:50-1:75. With walls of 0.15-0.45 m every wall is
# >= 12 px thick and doors/windows (>= 0.6 m wide, wall-thick) span >= 12 x 48 px, so a 16 px
# patch of a 224 tile can be mostly one element (at 7-50 px/m most elements were thinner than
# a patch and the patch-level probe ceiling collapsed).
DEFAULT_PX_PER_M = (80.0, 120.0)
SHEET_LONG_SIDE = (1500, 2100)  # ~A3 at 150 dpi: cheap to render, ~45 disjoint 224 px tiles a sheet


# ----------------------------------------------------------------------------- drawing kit
FONT_CACHE = {}


def font(size):
    """Pillow's built-in scalable font at `size` px (at least 6), cached."""
    size = max(6, int(size))
    if size not in FONT_CACHE:  # load_default(size) parses the embedded TTF each call
        FONT_CACHE[size] = ImageFont.load_default(size=size)
    return FONT_CACHE[size]


def ordered_box(box):
    """(x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, whatever corners `box` names."""
    return (min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3]))


class Canvas:
    """A sheet being drawn: the paper `image` (ink 0 on paper 255, drawn with `draw`) and the `label`
    image of class ids (drawn with `label_draw`). Each primitive inks the paper and paints its
    footprint, a little wider than the ink, with its class into the labels."""

    def __init__(self, width, height):
        self.width, self.height = width, height
        self.image, self.label = Image.new("L", (width, height), 255), Image.new("L", (width, height), BG)
        self.draw, self.label_draw = ImageDraw.Draw(self.image), ImageDraw.Draw(self.label)

    def line(self, points, cls, width=1, pad=2):
        self.draw.line(points, fill=0, width=width)
        self.label_draw.line(points, fill=cls, width=width + pad)

    def rect(self, box, cls, width=1, fill=None, solid=True):
        box = ordered_box(box)
        self.draw.rectangle(box, fill=fill, outline=0, width=width)
        if solid:  # one pixel of slack: PIL rounds fills and outlines of float boxes differently
            self.label_draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=cls)
        else:
            self.label_draw.rectangle(box, outline=cls, width=width + 2)

    def circle(self, centre, radius, cls, width=1, fill=255):
        box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
        self.draw.ellipse(box, fill=fill, outline=0, width=width)
        self.label_draw.ellipse(box, fill=cls)

    def dashed(self, start, end, cls, width=1, pattern=(14, 5, 2, 5)):
        length = math.hypot(end[0] - start[0], end[1] - start[1])
        if length < 1:
            return
        ux, uy, t, k = (end[0] - start[0]) / length, (end[1] - start[1]) / length, 0.0, 0
        while t < length:
            e = min(t + pattern[k % len(pattern)], length)
            if k % 2 == 0:
                self.draw.line([(start[0] + ux * t, start[1] + uy * t), (start[0] + ux * e, start[1] + uy * e)],
                               fill=0, width=width)
            t, k = e, k + 1
        self.label_draw.line([start, end], fill=cls, width=width + 2)  # a dashed line's footprint is continuous

    def text(self, xy, string, size, cls=TEXT, anchor="mm", bold=False, vertical=False):
        face, stroke = font(size), int(bold)
        if vertical:  # reads bottom-to-top, centred on xy
            left, top, right, bottom = face.getbbox(string, stroke_width=stroke)
            glyphs = Image.new("L", (right - left + 1, bottom - top + 1), 0)
            ImageDraw.Draw(glyphs).text((-left, -top), string, font=face, fill=255, stroke_width=stroke,
                                        stroke_fill=255)
            glyphs = glyphs.transpose(Image.Transpose.ROTATE_90)
            x, y = int(xy[0] - glyphs.width / 2), int(xy[1] - glyphs.height / 2)
            self.image.paste(0, (x, y), glyphs)
            bbox = (x, y, x + glyphs.width, y + glyphs.height)
        else:
            bbox = self.draw.textbbox(xy, string, font=face, anchor=anchor, stroke_width=stroke)
            self.draw.text(xy, string, font=face, fill=0, anchor=anchor, stroke_width=stroke, stroke_fill=0)
        self.label_draw.rectangle((bbox[0] - 1, bbox[1] - 1, bbox[2] + 1, bbox[3] + 1), fill=cls)
        return bbox

    def is_free(self, box, allow_annotation=False):
        box = [int(round(v)) for v in ordered_box(box)]
        if box[0] < 0 or box[1] < 0 or box[2] > self.width or box[3] > self.height:
            return False
        labels = np.asarray(self.label.crop(box))
        return bool(((labels == BG) | (labels == ANNO)).all() if allow_annotation else not labels.any())


def arrow(canvas, tip, direction, size, cls):
    """Filled arrowhead with its tip at `tip`, pointing along `direction`."""
    norm = math.hypot(*direction) or 1.0
    dx, dy = direction[0] / norm, direction[1] / norm
    base_x, base_y, half_width = tip[0] - dx * size, tip[1] - dy * size, size * 0.32
    points = [tip, (base_x - dy * half_width, base_y + dx * half_width),
              (base_x + dy * half_width, base_y - dx * half_width)]
    canvas.draw.polygon(points, fill=0)
    canvas.label_draw.polygon(points, fill=cls)


def bubble(canvas, centre, radius, label_text, cls=ANNO):
    """Circle with a short label inside (grid bubble, callout, drawing number)."""
    canvas.circle(centre, radius, cls)
    canvas.text(centre, label_text, int(radius * 1.05), cls=cls)


def hatch(canvas, rng, box, spacing, kind):
    """Paper-only fill pattern (hatch lines, grid, dots, concrete, earth, insulation zigzag, wood
    cross) inside `box`, lines `spacing` px apart; the caller labels the footprint."""
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    line = canvas.draw.line
    if kind in ("/", "x", "earth"):  # lines x + y = k on a global lattice, so abutting boxes agree
        for k in np.arange(math.ceil((x0 + y0) / spacing) * spacing, x1 + y1, spacing):
            xa, xb = max(x0, k - y1), min(x1, k - y0)
            if xb > xa:
                line([(xa, k - xa), (xb, k - xb)], fill=0, width=1)
    if kind in ("\\", "x"):
        for k in np.arange(math.ceil((x0 - y1) / spacing) * spacing, x1 - y0, spacing):
            xa, xb = max(x0, y0 + k), min(x1, y1 + k)
            if xb > xa:
                line([(xa, xa - k), (xb, xb - k)], fill=0, width=1)
    if kind == "grid":
        for x in np.arange(x0 + spacing, x1, spacing):
            line([(x, y0), (x, y1)], fill=0)
        for y in np.arange(y0 + spacing, y1, spacing):
            line([(x0, y), (x1, y)], fill=0)
    if kind in ("dots", "concrete", "earth"):
        n = int((x1 - x0) * (y1 - y0) / (spacing * spacing) * 3)
        canvas.draw.point(list(zip(rng.uniform(x0, x1, n), rng.uniform(y0, y1, n))), fill=0)
    if kind == "concrete" and x1 - x0 >= 8 and y1 - y0 >= 8:  # aggregate triangles 4 px inside the box
        for x, y in zip(rng.uniform(x0 + 4, x1 - 4, n // 8), rng.uniform(y0 + 4, y1 - 4, n // 8)):
            a = rng.uniform(0, 2 * math.pi)
            canvas.draw.polygon([(x + 4 * math.cos(a + k * 2.1), y + 4 * math.sin(a + k * 2.1)) for k in range(3)],
                                outline=0)
    if kind == "zig":  # insulation batt: zigzag across the short side
        w, h = x1 - x0, y1 - y0
        if h >= w:
            pts = [(x0 if i % 2 else x1, y) for i, y in enumerate(np.arange(y0, y1, w * 0.5))]
        else:
            pts = [(x, y0 if i % 2 else y1) for i, x in enumerate(np.arange(x0, x1, h * 0.5))]
        if len(pts) > 1:
            line(pts, fill=0, width=1)
    if kind == "wood":
        line([(x0, y0), (x1, y1)], fill=0)
        line([(x0, y1), (x1, y0)], fill=0)


class SymbolFrame:
    """Local frame of a plan symbol: u runs `along` a wall, v along the `normal` away from it into
    the room, both in pixels from `origin`. Shapes are drawn as paper-filled outlines; the caller
    labels the symbol's footprint."""

    def __init__(self, canvas, origin, along, normal):
        self.canvas, self.origin, self.along, self.normal = canvas, origin, along, normal

    def point(self, u, v):
        return (self.origin[0] + u * self.along[0] + v * self.normal[0],
                self.origin[1] + u * self.along[1] + v * self.normal[1])

    def box(self, u0, v0, u1, v1):
        return ordered_box(self.point(u0, v0) + self.point(u1, v1))

    def rect(self, u0, v0, u1, v1, radius=0):
        box = self.box(u0, v0, u1, v1)
        if radius > 0 and min(box[2] - box[0], box[3] - box[1]) > 2 * radius:
            self.canvas.draw.rounded_rectangle(box, radius, fill=255, outline=0)
        else:
            self.canvas.draw.rectangle(box, fill=255, outline=0)

    def ellipse(self, u0, v0, u1, v1):
        self.canvas.draw.ellipse(self.box(u0, v0, u1, v1), fill=255, outline=0)

    def line(self, *points, width=1):
        self.canvas.draw.line([self.point(*uv) for uv in points], fill=0, width=width)


NOTE_WORDS = ("PROVIDE NEW GYPSUM BOARD CONCRETE SLAB SEE DETAIL ALL DIMENSIONS TO FACE OF STUD VERIFY "
              "IN FIELD FINISH WATERPROOF MEMBRANE EXISTING WALL REMOVE STEEL BEAM ABOVE TYP. FIRE RATED "
              "ASSEMBLY INSULATION CONTINUOUS SEALANT JOINT FLOOR DRAIN SLOPE MIN. CEILING HEIGHT DOOR "
              "FRAME ANCHOR BOLTS AT CENTRES PER STRUCTURAL DRAWINGS CONTRACTOR SHALL COORDINATE WITH "
              "MECHANICAL ELECTRICAL PLUMBING RISER SHAFT ACCESS PANEL FLASHING SILL LINTEL BRICK").split()
ROOM_NAMES = {
    "en": dict(bath="BATH", wc="WC", closet="CLOSET", kitchen="KITCHEN", living="LIVING ROOM", dining="DINING",
               bed="BEDROOM", hall="HALL", office="OFFICE", storage="STORAGE", laundry="LAUNDRY"),
    "fr": dict(bath="BAINS", wc="W.C.", closet="PLACARD", kitchen="CUISINE", living="SEJOUR", dining="REPAS",
               bed="CHAMBRE", hall="DEGT", office="BUREAU", storage="CELLIER", laundry="BUANDERIE"),
    "es": dict(bath="BANO", wc="ASEO", closet="ARMARIO", kitchen="COCINA", living="SALON", dining="COMEDOR",
               bed="DORMITORIO", hall="PASILLO", office="ESTUDIO", storage="TRASTERO", laundry="LAVADERO"),
}


def pick(rng, seq):
    """One element of seq, uniformly."""
    return seq[int(rng.integers(len(seq)))]


def sentence(rng, lo=3, hi=9):
    """lo to hi - 1 random note words."""
    return " ".join(pick(rng, NOTE_WORDS) for _ in range(int(rng.integers(lo, hi))))


def random_style(rng):
    """The drafting conventions of one sheet: wall fill of exterior and interior walls (solid,
    hatch, hollow or gray poche), poche gray level, wall outline width in px, dimension tick,
    length units, room-name language, text sizes in px, glass lines per window."""
    u = rng.uniform
    exterior = pick(rng, ("solid", "hatch", "hollow", "gray"))
    return dict(exterior=exterior, interior=exterior if u() < 0.5 else pick(rng, ("solid", "hollow")),
                poche_gray=int(u(110, 170)), wall_outline=int(rng.integers(1, 4)),
                dim_tick=pick(rng, ("slash", "arrow", "dot")),
                units=pick(rng, ("m", "mm", "cm", "ft")), language=pick(rng, tuple(ROOM_NAMES)),
                dim_text_size=int(u(12, 18)), room_text_size=int(u(15, 27)), note_text_size=int(u(11, 15)),
                window_lines=int(rng.integers(1, 4)))


def format_length(m, units):
    """A length of m metres as a dimension string in `units` (mm rounded to 5, feet-inches)."""
    if units == "mm":
        return str(int(round(m * 200)) * 5)
    if units == "cm":
        return str(int(round(m * 100)))
    if units == "ft":
        inch = int(round(m / 0.0254))
        return f"{inch // 12}'-{inch % 12}\""
    return f"{m:.2f}"


def dimension_chain(canvas, style, px_per_m, horizontal, positions, line_at, extension_from, outward):
    """Chain of dimensions between consecutive `positions` along x (horizontal) or y, with the
    dimension line at cross coordinate `line_at`; extension lines start at `extension_from`;
    `outward` (+1/-1) points away from the object, where the numbers go."""
    xy = (lambda a, b: (a, b)) if horizontal else (lambda a, b: (b, a))
    positions, text_size = sorted(positions), style["dim_text_size"]
    if len(positions) < 2:
        return
    overshoot = 8 if style["dim_tick"] == "slash" else 0
    strip = xy(positions[0] - overshoot - 4, line_at - outward * 9) + xy(positions[-1] + overshoot + 4,
                                                                         line_at + outward * (text_size * 1.3 + 8))
    canvas.label_draw.rectangle(ordered_box(strip), fill=DIM)
    canvas.line([xy(positions[0] - overshoot, line_at), xy(positions[-1] + overshoot, line_at)], DIM)
    for p in positions:
        canvas.line([xy(p, extension_from), xy(p, line_at + outward * 7)], DIM)
        if style["dim_tick"] == "slash":
            canvas.line([xy(p - 5, line_at + 5), xy(p + 5, line_at - 5)], DIM, width=2)
        elif style["dim_tick"] == "dot":
            canvas.circle(xy(p, line_at), 2.5, DIM, fill=0)
    for a, b in zip(positions[:-1], positions[1:]):
        if style["dim_tick"] == "arrow" and b - a > 20:
            arrow(canvas, xy(a, line_at), xy(-1, 0), 9, DIM)
            arrow(canvas, xy(b, line_at), xy(1, 0), 9, DIM)
        label_text = format_length((b - a) / px_per_m, style["units"])
        if font(text_size).getlength(label_text) + 6 < b - a:
            canvas.text(xy((a + b) / 2, line_at + outward * (text_size * 0.6 + 3)), label_text, text_size, cls=DIM,
                        vertical=not horizontal)


def place_symbol(canvas, rng, cell, length, depth, draw, cls, against_wall=True, tries=8):
    """Put a length x depth px symbol against a wall (or free-standing) inside the room rectangle
    `cell` where nothing but background or annotation lies yet; draw(frame, length, depth) draws
    it in its SymbolFrame. Returns the symbol's box, or None when `tries` positions failed."""
    x0, y0, x1, y1 = cell
    for _ in range(tries):
        side = int(rng.integers(4)) if against_wall else 0
        along, deep = (x1 - x0, y1 - y0) if side in (0, 2) else (y1 - y0, x1 - x0)
        if length > along or depth > deep:
            continue
        offset = rng.uniform(0, along - length)
        if not against_wall:
            origin, axis, normal = (x0 + offset, y0 + rng.uniform(0, deep - depth)), (1, 0), (0, 1)
        else:
            origin, axis, normal = [((x0 + offset, y0), (1, 0), (0, 1)), ((x1, y0 + offset), (0, 1), (-1, 0)),
                                    ((x0 + offset, y1), (1, 0), (0, -1)), ((x0, y0 + offset), (0, 1), (1, 0))][side]
        frame = SymbolFrame(canvas, origin, axis, normal)
        box = frame.box(0, 0, length, depth)
        if canvas.is_free(box, allow_annotation=True):
            canvas.label_draw.rectangle((box[0] - 1, box[1] - 1, box[2] + 1, box[3] + 1), fill=cls)
            draw(frame, length, depth)
            return box
    return None


# -------------------------------------------------------------------------- symbols (local frame)
def draw_wc(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth * 0.27)
    frame.ellipse(length * 0.1, depth * 0.22, length * 0.9, depth)


def draw_basin(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    frame.ellipse(length * 0.15, depth * 0.2, length * 0.85, depth * 0.85)


def draw_tub(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    frame.rect(length * 0.04, depth * 0.1, length * 0.96, depth * 0.9, radius=depth * 0.25)
    frame.ellipse(length * 0.84, depth * 0.45, length * 0.88, depth * 0.55)


def draw_shower(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    frame.line((0, 0), (length, depth))
    frame.line((length, 0), (0, depth))


def draw_counter(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    a = length * 0.15
    frame.rect(a, depth * 0.15, a + 0.4 * px_per_m, depth * 0.85, radius=3)
    frame.rect(a + 0.45 * px_per_m, depth * 0.15, a + 0.85 * px_per_m, depth * 0.85, radius=3)
    if length > 1.9 * px_per_m:
        b = length - 0.75 * px_per_m
        for du, dv in ((0.15, 0.18), (0.45, 0.18), (0.15, 0.42), (0.45, 0.42)):
            frame.ellipse(b + (du - 0.1) * px_per_m, (dv - 0.1) * px_per_m,
                          b + (du + 0.1) * px_per_m, (dv + 0.1) * px_per_m)


def draw_bed(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    n = 2 if length > 1.3 * px_per_m else 1
    for k in range(n):
        frame.rect(length * k / n + 0.08 * px_per_m, 0.08 * px_per_m,
                   length * (k + 1) / n - 0.08 * px_per_m, 0.4 * px_per_m, radius=6)
    frame.line((0, 0.55 * px_per_m), (length, 0.55 * px_per_m))
    frame.line((length * 0.6, 0.55 * px_per_m), (length, 0.85 * px_per_m))


def draw_wardrobe(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    frame.line((0, depth / 2), (length, depth / 2))
    for x in np.arange(0.15 * px_per_m, length - 0.1 * px_per_m, 0.25 * px_per_m):
        frame.line((x - 0.08 * px_per_m, depth * 0.2), (x + 0.08 * px_per_m, depth * 0.8))


def draw_sofa(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth, radius=5)
    frame.rect(0, 0, length, depth * 0.25)
    frame.rect(0, 0, length * 0.1, depth)
    frame.rect(length * 0.9, 0, length, depth)
    frame.line((length / 2, depth * 0.25), (length / 2, depth))


def draw_table(frame, length, depth, px_per_m):
    margin, chair_w = 0.45 * px_per_m, 0.42 * px_per_m
    n = max(1, int((length - 2 * margin) // (0.6 * px_per_m)))
    for k in range(n):
        uc = margin + (k + 0.5) * (length - 2 * margin) / n
        frame.rect(uc - chair_w / 2, 0.03 * px_per_m, uc + chair_w / 2, margin - 0.03 * px_per_m, radius=3)
        frame.rect(uc - chair_w / 2, depth - margin + 0.03 * px_per_m, uc + chair_w / 2, depth - 0.03 * px_per_m,
                   radius=3)
    if depth - 2 * margin > 0.7 * px_per_m:
        frame.rect(0.03 * px_per_m, depth / 2 - chair_w / 2, margin - 0.03 * px_per_m, depth / 2 + chair_w / 2,
                   radius=3)
        frame.rect(length - margin + 0.03 * px_per_m, depth / 2 - chair_w / 2,
                   length - 0.03 * px_per_m, depth / 2 + chair_w / 2, radius=3)
    (frame.ellipse if length < depth * 1.3 else frame.rect)(margin - 0.1 * px_per_m, margin - 0.1 * px_per_m,
                                                            length - margin + 0.1 * px_per_m,
                                                            depth - margin + 0.1 * px_per_m)


def draw_washer(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth)
    frame.ellipse(length * 0.15, depth * 0.15, length * 0.85, depth * 0.85)


def draw_desk(frame, length, depth, px_per_m):
    frame.rect(0, 0, length, depth * 0.6)
    frame.rect(length * 0.35, depth * 0.68, length * 0.65, depth, radius=3)


# name: (length range m (along the wall), depth range m, draw(frame, length, depth, px_per_m), against a wall)
SYMBOLS = {
    "wc": ((0.38, 0.45), (0.65, 0.75), draw_wc, True), "basin": ((0.5, 0.7), (0.42, 0.5), draw_basin, True),
    "tub": ((1.5, 1.8), (0.7, 0.8), draw_tub, True), "shower": ((0.8, 1.0), (0.8, 1.0), draw_shower, True),
    "counter": ((1.8, 3.6), (0.6, 0.65), draw_counter, True), "bed": ((0.9, 1.8), (1.95, 2.1), draw_bed, True),
    "wardrobe": ((1.0, 2.4), (0.55, 0.65), draw_wardrobe, True), "sofa": ((1.6, 2.4), (0.8, 0.95), draw_sofa, True),
    "table": ((1.9, 2.9), (1.7, 1.9), draw_table, False), "washer": ((0.6, 0.62), (0.6, 0.62), draw_washer, True),
    "desk": ((1.1, 1.6), (1.0, 1.1), draw_desk, True), "armchair": ((0.75, 0.9), (0.75, 0.9), draw_sofa, True),
}
FURNISHING = {"bath": ("tub", "shower", "basin", "wc"), "wc": ("wc", "basin"), "kitchen": ("counter", "table"),
              "dining": ("table",), "living": ("sofa", "armchair", "armchair"), "bed": ("bed", "wardrobe"),
              "office": ("desk", "wardrobe"), "laundry": ("washer", "washer", "counter"), "closet": ("wardrobe",)}


# -------------------------------------------------------------------------------- floor plan
def draw_plan(canvas, rng, style, area, px_per_m):
    """A floor plan in `area`: a grid of rooms (some merged, one corner maybe cut away) with
    exterior and interior walls, doors and windows, room names and areas, stairs, fixtures and
    furniture, dimension chains, grid lines, section marks, leader notes, north arrow, title."""
    u = rng.uniform
    bx0, by0, bx1, by1 = area
    chain_offset, chain_step, bubble_r = u(40, 56), u(34, 46), u(13, 19)
    n_chains = [int(rng.integers(1, 4)) if u() < 0.75 else 0 for _ in range(4)] if u() < 0.85 else [0] * 4
    grid = u() < 0.5
    for _ in range(2):  # drop dimensions and grid when the area is too small for them
        margin = [26 + (chain_offset + (k - 1) * chain_step + style["dim_text_size"] + 8 if k else 0)
                  + (2 * bubble_r + 24 if grid else 0)
                  for k in n_chains]
        avail_w, avail_h = ((bx1 - bx0 - margin[1] - margin[3]) / px_per_m,
                            (by1 - by0 - 80 - margin[0] - margin[2]) / px_per_m)
        if min(avail_w, avail_h) >= 4.0:
            break
        n_chains, grid = [0] * 4, False
    if min(avail_w, avail_h) < 3.0:
        return

    def cells(avail):
        w = u(1.6, 4.5, int(rng.integers(2, 7)))
        w = w[:max(2, int(np.searchsorted(np.cumsum(w), avail, side="right")))]
        return w * min(1.0, avail / w.sum())

    col_widths, row_heights = cells(avail_w * u(0.8, 1.0)), cells(avail_h * u(0.8, 1.0))
    n_rows, n_cols = len(row_heights), len(col_widths)
    x0 = bx0 + margin[3] + u(0, avail_w * px_per_m - col_widths.sum() * px_per_m)
    y0 = by0 + margin[0] + u(0, avail_h * px_per_m - row_heights.sum() * px_per_m)
    grid_x = x0 + np.concatenate([[0], np.cumsum(col_widths)]) * px_per_m
    grid_y = y0 + np.concatenate([[0], np.cumsum(row_heights)]) * px_per_m
    ext_thick, int_thick = u(0.25, 0.45) * px_per_m, u(0.15, 0.22) * px_per_m
    face = (grid_y[0] - ext_thick / 2, grid_x[-1] + ext_thick / 2,  # top, right, bottom, left
            grid_y[-1] + ext_thick / 2, grid_x[0] - ext_thick / 2)

    occupied = np.ones((n_rows, n_cols), bool)
    notch = None
    if n_rows * n_cols >= 4 and u() < 0.5:
        notch = (int(rng.choice([0, n_rows - 1])), int(rng.choice([0, n_cols - 1])))
        occupied[notch] = False
    room_of = np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    for r in range(n_rows):
        for q in range(n_cols):
            if q + 1 < n_cols and occupied[r, q] and occupied[r, q + 1] and u() < 0.3:
                room_of[room_of == room_of[r, q + 1]] = room_of[r, q]
            if r + 1 < n_rows and occupied[r, q] and occupied[r + 1, q] and u() < 0.15:
                room_of[room_of == room_of[r + 1, q]] = room_of[r, q]

    def inside(r, q):
        return 0 <= r < n_rows and 0 <= q < n_cols and occupied[r, q]

    # wall segments: o "v"/"h", c centreline coordinate, a..b extent along it, kind interior or
    # exterior, pair the rooms on either side, out +-1 towards the outside (0 inside), t thickness,
    # ops openings (start, end, "door" or "window")
    segments = []
    for o, n_lines, n_runs in (("v", n_cols + 1, n_rows), ("h", n_rows + 1, n_cols)):
        for i in range(n_lines):
            for j in range(n_runs):
                A, B = (inside(j, i - 1), inside(j, i)) if o == "v" else (inside(i - 1, j), inside(i, j))
                ra = room_of[(j, i - 1) if o == "v" else (i - 1, j)] if A else -1
                rb = room_of[(j, i) if o == "v" else (i, j)] if B else -1
                if A == B and (not A or ra == rb):
                    continue
                cc, a, b = (grid_x[i], grid_y[j], grid_y[j + 1]) if o == "v" else (grid_y[i], grid_x[j], grid_x[j + 1])
                kind, out = ("interior", 0) if A and B else ("exterior", 1 if A else -1)
                last = segments[-1] if segments else None
                if last and (last["o"], last["c"], last["pair"], last["b"]) == (o, cc, (ra, rb), a):
                    last["b"] = b
                else:
                    segments.append(dict(o=o, c=cc, a=a, b=b, kind=kind, pair=(ra, rb), out=out,
                                         t=ext_thick if kind == "exterior" else int_thick, ops=[]))

    def add_opening(seg, w, kind, near_end=False):
        lo, hi = seg["a"] + ext_thick / 2 + 0.12 * px_per_m, seg["b"] - ext_thick / 2 - 0.12 * px_per_m - w
        if hi <= lo:
            return False
        p = (lo if u() < 0.5 else hi) if near_end else u(lo, hi)
        if any(p < b + 0.2 * px_per_m and p + w > a - 0.2 * px_per_m for a, b, _ in seg["ops"]):
            return False
        seg["ops"].append((p, p + w, kind))
        return True

    parent = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for k in rng.permutation(len(segments)):
        seg = segments[k]
        if seg["kind"] == "interior":
            ra, rb = find(seg["pair"][0]), find(seg["pair"][1])
            if (ra != rb or u() < 0.2) and add_opening(seg, u(0.75, 0.95) * px_per_m, "door", u() < 0.6):
                parent[ra] = rb
    exts = [seg for seg in segments if seg["kind"] == "exterior"]
    for seg in rng.permutation(len(exts)):
        if add_opening(exts[seg], (u(1.4, 1.8) if u() < 0.3 else u(0.9, 1.0)) * px_per_m, "door"):
            break
    for seg in exts:
        n = int((seg["b"] - seg["a"]) / px_per_m / u(2.2, 4.0))
        for _ in range(n):
            add_opening(seg, u(0.6, min(2.2, max(0.7, (seg["b"] - seg["a"]) / px_per_m * 0.45))) * px_per_m, "window")

    # --- annotation layers below the walls
    if notch is not None and u() < 0.6:
        r, q = notch
        h = ext_thick / 2
        b = (grid_x[q] + h * (q > 0), grid_y[r] + h * (r > 0),
             grid_x[q + 1] - h * (q < n_cols - 1), grid_y[r + 1] - h * (r < n_rows - 1))
        canvas.rect(b, ANNO)
        hatch(canvas, rng, b, u(0.3, 0.6) * px_per_m, pick(rng, ("x", "grid", "/")))
    if u() < 0.25:
        d = u(0.4, 0.7) * px_per_m
        corners = [(face[3] - d, face[0] - d), (face[1] + d, face[0] - d),
                   (face[1] + d, face[2] + d), (face[3] - d, face[2] + d)]
        for p, q in zip(corners, corners[1:] + corners[:1]):
            canvas.dashed(p, q, ANNO, pattern=(10, 6))
    # grid bubbles sit beyond the outermost dimension chain of each side
    bubble_at = [face[k] + (-1, 1, 1, -1)[k] * ((chain_offset + (n_chains[k] - 1) * chain_step
                                                 + style["dim_text_size"] + 16 if n_chains[k] else 30) + bubble_r)
                 for k in range(4)]
    if grid:
        both = u() < 0.4
        letters = u() < 0.5
        for k, x in enumerate(grid_x):
            canvas.dashed((x, bubble_at[0] + bubble_r), (x, bubble_at[2] - bubble_r if both else face[2] + 20), ANNO)
            for y in (bubble_at[0], bubble_at[2]) if both else (bubble_at[0],):
                bubble(canvas, (x, y), bubble_r, chr(65 + k) if letters else str(k + 1))
        for k, y in enumerate(grid_y):
            canvas.dashed((bubble_at[3] + bubble_r, y), (bubble_at[1] - bubble_r if both else face[1] + 20, y), ANNO)
            for x in (bubble_at[3], bubble_at[1]) if both else (bubble_at[3],):
                bubble(canvas, (x, y), bubble_r, str(k + 1) if letters else chr(65 + k))

    # --- walls: ink everything, then fill interiors interior-walls-first so junctions merge
    pieces = []
    for seg in segments:
        cuts = sorted(seg["ops"])
        edges = [seg["a"]] + [v for a, b, _ in cuts for v in (a, b)] + [seg["b"]]
        for k in range(0, len(edges), 2):
            a = edges[k] - (seg["t"] / 2 if k == 0 else 0)
            b = edges[k + 1] + (seg["t"] / 2 if k + 2 == len(edges) else 0)
            c0, c1 = seg["c"] - seg["t"] / 2, seg["c"] + seg["t"] / 2
            r = (c0, a, c1, b) if seg["o"] == "v" else (a, c0, b, c1)
            pieces.append((seg["kind"], r))
    for _, r in pieces:
        canvas.draw.rectangle(r, fill=0)
        canvas.label_draw.rectangle(r, fill=WALL)
    outline, hatch_spacing = style["wall_outline"], u(5, 9)
    for kind in ("interior", "exterior"):
        fill = style[kind]
        for k, r in pieces:
            if k != kind or (fill == "solid" and kind == "interior"):
                continue
            ir = (r[0] + outline, r[1] + outline, r[2] - outline, r[3] - outline)
            if ir[2] > ir[0] and ir[3] > ir[1]:
                canvas.draw.rectangle(ir, fill={"solid": 0, "gray": style["poche_gray"]}.get(fill, 255))
                if fill == "hatch":
                    hatch(canvas, rng, ir, hatch_spacing, "/")

    # --- openings
    for seg in segments:
        P = (lambda al, ac: (ac, al)) if seg["o"] == "v" else (lambda al, ac: (al, ac))
        cc, t = seg["c"], seg["t"]
        for p0, p1, kind in seg["ops"]:
            gap = ordered_box(P(p0, cc - t / 2) + P(p1, cc + t / 2))
            if kind == "window":
                canvas.draw.rectangle(gap, fill=255, outline=0)
                canvas.label_draw.rectangle((gap[0] - 1, gap[1] - 1, gap[2] + 1, gap[3] + 1), fill=WINDOW)
                for k in range(style["window_lines"]):
                    ac = cc - t / 2 + t * (k + 1) / (style["window_lines"] + 1)
                    canvas.draw.line([P(p0, ac), P(p1, ac)], fill=0)
                continue
            canvas.label_draw.rectangle(gap, fill=DOOR)
            side = -seg["out"] if seg["kind"] == "exterior" else pick(rng, (-1, 1))
            fc = cc + side * t / 2
            if u() < 0.12:  # sliding door: two leaves in the wall thickness
                m = (p0 + p1) / 2
                canvas.draw.rectangle(ordered_box(P(p0, cc - t * 0.2) + P(m + 0.05 * px_per_m, cc - t * 0.05)),
                                      outline=0)
                canvas.draw.rectangle(ordered_box(P(m - 0.05 * px_per_m, cc + t * 0.05) + P(p1, cc + t * 0.2)),
                                      outline=0)
                continue
            leaves = [(p0, p1)] if p1 - p0 < 1.3 * px_per_m else [(p0, (p0 + p1) / 2), (p1, (p0 + p1) / 2)]
            if len(leaves) == 1 and u() < 0.5:
                leaves = [(p1, p0)]
            for hinge, other in leaves:
                r = abs(other - hinge)
                H, E, O = P(hinge, fc), P(hinge, fc + side * r), P(other, fc)
                a1 = round(math.degrees(math.atan2(E[1] - H[1], E[0] - H[0])) / 90) * 90 % 360
                a2 = round(math.degrees(math.atan2(O[1] - H[1], O[0] - H[0])) / 90) * 90 % 360
                a1, a2 = (a1, a2) if (a2 - a1) % 360 == 90 else (a2, a1)
                bb = (H[0] - r, H[1] - r, H[0] + r, H[1] + r)
                canvas.label_draw.pieslice(bb, a1, a2, fill=DOOR)
                canvas.draw.arc(bb, a1, a2, fill=0, width=1)
                canvas.line([H, E], DOOR, width=max(2, outline))

    # --- rooms: functions by size, stairs, names, furniture
    rooms = {}
    for r in range(n_rows):
        for q in range(n_cols):
            if occupied[r, q]:
                inner = (grid_x[q] + ext_thick / 2 + 3, grid_y[r] + ext_thick / 2 + 3,
                         grid_x[q + 1] - ext_thick / 2 - 3, grid_y[r + 1] - ext_thick / 2 - 3)
                rooms.setdefault(int(room_of[r, q]), []).append(inner)
    room_area = {k: sum((b[2] - b[0]) * (b[3] - b[1]) for b in v) for k, v in rooms.items()}
    order = sorted(rooms, key=lambda k: room_area[k])
    func = {}
    for i, k in enumerate(order):
        if i == len(order) - 1:
            func[k] = "living"
        elif i < max(1, len(order) // 3):
            func[k] = pick(rng, ("bath", "wc", "closet", "storage", "laundry", "bath"))
        elif i == len(order) - 2:
            func[k] = pick(rng, ("kitchen", "dining"))
        else:
            func[k] = pick(rng, ("bed", "bed", "office", "hall", "kitchen"))
    if u() < 0.85:
        big = [b for k in order[len(order) // 3:] for b in rooms[k]]
        for b in rng.permutation(len(big)):
            w = u(0.9, 1.2) * px_per_m
            if place_symbol(canvas, rng, big[b],
                            min(u(2.6, 4.0) * px_per_m, big[b][2] - big[b][0], big[b][3] - big[b][1]), w,
                            lambda frame, length, depth, tr=u(0.25, 0.3) * px_per_m:
                            draw_stair(canvas, frame, length, depth, tr), STAIR, tries=3):
                break
    names, nbed = ROOM_NAMES[style["language"]], 0
    for k in order:
        cell = max(rooms[k], key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        name = names[func[k]]
        if func[k] == "bed":
            nbed += 1
            name += f" {nbed}"
        cx, cy = (cell[0] + cell[2]) / 2 + u(-0.2, 0.2) * px_per_m, (cell[1] + cell[3]) / 2 + u(-0.3, 0.3) * px_per_m
        ts = style["room_text_size"]
        w = font(ts).getlength(name)
        if w < cell[2] - cell[0] - 8 and canvas.is_free((cx - w / 2, cy - ts, cx + w / 2, cy + ts * 1.6),
                                                        allow_annotation=True):
            canvas.text((cx, cy), name, ts)
            if u() < 0.6:
                m2 = room_area[k] / (px_per_m * px_per_m)
                m2 = f"{m2:.2f} m2" if style["units"] != "ft" else f"{m2 * 10.764:.0f} SF"
                canvas.text((cx, cy + ts * 1.2), m2, int(ts * 0.7))
        for sym in FURNISHING.get(func[k], ()):
            if sym in ("tub", "shower") and u() < 0.5:
                continue
            (ul, uh), (vl, vh), fn, wall = SYMBOLS[sym]
            for cb in rng.permutation(len(rooms[k])):
                draw = lambda frame, length, depth, fn=fn: fn(frame, length, depth, px_per_m)  # noqa: E731
                if place_symbol(canvas, rng, rooms[k][cb], u(ul, uh) * px_per_m, u(vl, vh) * px_per_m, draw,
                                FIXTURE, wall):
                    break

    # --- dimensions, callouts, notes, title
    for side in range(4):
        if not n_chains[side]:
            continue
        horiz, out = side in (0, 2), (-1, 1, 1, -1)[side]
        o = "h" if horiz else "v"
        facade = [seg for seg in segments if seg["kind"] == "exterior" and seg["o"] == o and seg["out"] == out]
        facade_points = sorted({v for seg in facade for v in (seg["a"], seg["b"])}
                               | {v for seg in facade for a, b, _ in seg["ops"] for v in (a, b)})
        g = list(grid_x if horiz else grid_y)
        lo, hi = (face[3], face[1]) if horiz else (face[0], face[2])
        chains = [[lo] + facade_points[1:-1] + [hi], [lo] + g[1:-1] + [hi], [lo, hi]]
        chains = {1: [chains[pick(rng, (0, 2))]], 2: [chains[0], chains[2]], 3: chains}[n_chains[side]]
        for i, pts in enumerate(chains):
            dimension_chain(canvas, style, px_per_m, horiz, pts, face[side] + out * (chain_offset + i * chain_step),
                            face[side] + out * 8, out)
    if u() < 0.35:
        q = int(rng.integers(n_cols))
        x, lab = (grid_x[q] + grid_x[q + 1]) / 2, pick(rng, "ABC12")
        dirn = pick(rng, (-1, 1))
        for y, yend in ((bubble_at[0] - bubble_r * 0.4, face[0] - 6), (bubble_at[2] + bubble_r * 0.4, face[2] + 6)):
            canvas.line([(x, y), (x, y + (yend - y) * 0.6)], ANNO, width=3)
            bubble(canvas, (x, y), bubble_r * 0.9, lab)
            arrow(canvas, (x + dirn * bubble_r * 2.2, y), (dirn, 0), bubble_r * 1.2, ANNO)
    for _ in range(int(rng.integers(0, 4))):
        seg = pick(rng, exts)
        al = u(seg["a"], seg["b"])
        tgt = ((seg["c"] + seg["out"] * seg["t"] / 2, al) if seg["o"] == "v"
               else (al, seg["c"] + seg["out"] * seg["t"] / 2))
        txt = sentence(rng, 2, 5)
        for _ in range(6):
            d, along = u(max(margin) + 10, max(margin) + 160), u(-120, 120)
            p = ((tgt[0] + seg["out"] * d, tgt[1] + along) if seg["o"] == "v"
                 else (tgt[0] + along, tgt[1] + seg["out"] * d))
            tw = font(style["note_text_size"]).getlength(txt)
            right = p[0] >= tgt[0]
            h = style["note_text_size"]
            b = (p[0] if right else p[0] - tw, p[1] - h, p[0] + tw if right else p[0], p[1] + h)
            if canvas.is_free((b[0] - 6, b[1] - 4, b[2] + 6, b[3] + 4)) and bx0 < b[0] and b[2] < bx1:
                canvas.text((p[0] + (4 if right else -4), p[1]), txt, style["note_text_size"],
                            anchor="lm" if right else "rm")
                canvas.line([p, (p[0] - (14 if right else -14), p[1]), tgt], ANNO)
                canvas.circle(tgt, 3, ANNO, fill=0)
                break
    if u() < 0.5:
        r = u(22, 36)
        for cx, cy in ((bx1 - r - 10, by0 + r + 10), (bx0 + r + 10, by0 + r + 10), (bx1 - r - 10, by1 - r - 90)):
            if canvas.is_free((cx - r - 4, cy - r - 4, cx + r + 4, cy + r + 4)):
                canvas.circle((cx, cy), r, ANNO)
                arrow(canvas, (cx, cy - r * 0.9), (0, -1), r * 1.6, ANNO)
                canvas.text((cx, cy - r - 10), "N", int(r * 0.6), cls=ANNO)
                break
    title = pick(rng, ("GROUND FLOOR PLAN", "FIRST FLOOR PLAN", "PLAN DU REZ DE CHAUSSEE", "PLANTA BAJA",
                       "LEVEL 2 PLAN", "UNIT PLAN"))
    drawing_title(canvas, rng, face[3], min(by1 - 30, face[2] + margin[2] + 18), title,
                  pick(rng, ("1:50", "1:75", "1/4\" = 1'-0\"")))


def draw_stair(canvas, frame, length, depth, tread):
    """A straight flight in plan: treads every `tread` px and the walking-line arrow."""
    frame.rect(0, 0, length, depth)
    n = int(length // tread)
    for k in range(1, n + 1):
        frame.line((k * tread, 0), (k * tread, depth))
    frame.line((tread * 0.5, depth / 2), (length - tread * 0.6, depth / 2))
    tip, base = frame.point(length - tread * 0.1, depth / 2), frame.point(length - tread * 0.9, depth / 2)
    arrow(canvas, tip, (tip[0] - base[0], tip[1] - base[1]), tread * 0.8, STAIR)


def drawing_title(canvas, rng, x, y, title, scale):
    """Drawing number bubble, underlined title and scale line, starting at (x, y)."""
    radius = rng.uniform(14, 20)
    bubble(canvas, (x + radius, y), radius, str(int(rng.integers(1, 9))))
    text_size = int(rng.uniform(18, 28))
    title_box = canvas.text((x + 2 * radius + 12, y - 2), title, text_size, anchor="ls", bold=rng.uniform() < 0.6)
    canvas.line([(title_box[0], title_box[3] + 4), (title_box[2], title_box[3] + 4)], TEXT, width=2)
    canvas.text((title_box[0], title_box[3] + 10), "SCALE " + scale, int(text_size * 0.55), anchor="la")


# ------------------------------------------------------------------------- section / elevation
def draw_section(canvas, rng, style, area, px_per_m):
    """A building section (cut slabs, walls, windows, stairs) or, one time in three, an elevation
    (facade outline, windows, doors), on earth hatch, with levels, grid, dimensions and title."""
    u = rng.uniform
    bx0, by0, bx1, by1 = area
    elevation = u() < 0.35
    bays = u(2.5, 5.0, int(rng.integers(2, 5)))
    avail = (bx1 - bx0 - 360) / px_per_m
    bays = bays[:max(1, int(np.searchsorted(np.cumsum(bays), avail, side="right")))]
    bays *= min(1.0, avail / bays.sum())
    floor_h, wall_t, slab_t = u(2.7, 3.3), u(0.25, 0.4) * px_per_m, u(0.2, 0.3) * px_per_m
    avail_h = (by1 - by0 - 220) / px_per_m - 0.9
    roof_h = min(u(1.5, 2.8), avail_h - 2.4)
    pitched = u() < 0.5 and roof_h > 1.2
    roof_h = roof_h if pitched else 0.9
    n_floors = int(max(1, min(rng.integers(1, 4), (avail_h - roof_h) // floor_h)))
    floor_h = min(floor_h, max(2.4, (avail_h - roof_h) / n_floors))
    x_left = bx0 + 200 + u(0, max(0.0, avail * px_per_m - bays.sum() * px_per_m))
    grid_x = x_left + np.concatenate([[0], np.cumsum(bays)]) * px_per_m
    x_right, ground = grid_x[-1], by1 - 110 - 0.9 * px_per_m
    # finished floor levels, top = roof
    levels = [ground - 0.15 * px_per_m - k * floor_h * px_per_m for k in range(n_floors + 1)]
    # ground, earth and grid lines lie under everything else
    earth = (x_left - 1.2 * px_per_m, ground, x_right + 1.2 * px_per_m, ground + 0.7 * px_per_m)
    canvas.rect(earth, ANNO, width=0)
    hatch(canvas, rng, earth, u(10, 16), "earth")
    canvas.line([(earth[0] - 0.5 * px_per_m, ground), (earth[2] + 0.5 * px_per_m, ground)], ANNO, width=3)
    top = levels[n_floors] - roof_h * px_per_m - 40
    if u() < 0.6:
        bubble_r = u(13, 18)
        for k, x in enumerate(grid_x):
            canvas.dashed((x, top + bubble_r), (x, ground + 0.5 * px_per_m), ANNO)
            bubble(canvas, (x, top), bubble_r, str(k + 1))
    if elevation and u() < 0.4:
        b = (x_left + 3, levels[min(n_floors, 1)] + 3, x_right - 3, ground - 3)
        hatch(canvas, rng, b, u(8, 14), pick(rng, ("/", "grid")))
        canvas.label_draw.rectangle(b, fill=WALL)
    # elements seen beyond the cut (or the facade itself)
    for k in range(n_floors):
        for q in range(len(bays)):
            a, b = grid_x[q] + wall_t, grid_x[q + 1] - wall_t
            fl = levels[k] if elevation else levels[k] - 0.0
            if u() < (0.85 if elevation else 0.45) and b - a > 0.8 * px_per_m:
                w = min(u(0.8, 2.4) * px_per_m, b - a - 0.3 * px_per_m)
                if k == 0 and u() < 0.35:
                    door_elevation(canvas, rng, ((a + b - w * 0.6) / 2, fl - u(2.1, 2.4) * px_per_m,
                                                 (a + b + w * 0.6) / 2, fl))
                else:
                    xm = u(a, b - w)
                    window_elevation(canvas, rng,
                                     (xm, fl - u(2.1, 2.4) * px_per_m, xm + w, fl - u(0.8, 1.0) * px_per_m))
    if not elevation and u() < 0.7:  # a flight up to the half landing on each storey
        q, nr = int(rng.integers(len(bays))), int(round(floor_h / 0.35))
        rise, go, a = floor_h * px_per_m / 2 / nr, 0.27 * px_per_m, grid_x[q] + wall_t / 2 + 0.1 * px_per_m
        if a + nr * go + 1.1 * px_per_m < grid_x[q + 1] - wall_t / 2:
            for k in range(n_floors):
                pts = [(a, levels[k])]
                for _ in range(nr):
                    pts += [(pts[-1][0], pts[-1][1] - rise), (pts[-1][0] + go, pts[-1][1] - rise)]
                xe, ye = pts[-1]
                canvas.label_draw.rectangle((a, ye - 0.95 * px_per_m, xe + 1.0 * px_per_m, levels[k]), fill=STAIR)
                canvas.draw.line(pts, fill=0, width=2)
                canvas.draw.line([(a, levels[k]), (xe, ye + 0.2 * px_per_m)], fill=0)
                canvas.draw.rectangle((xe, ye, xe + 1.0 * px_per_m, ye + 0.2 * px_per_m), outline=0, width=2)
                canvas.draw.line([(a, levels[k] - 0.9 * px_per_m), (xe, ye - 0.9 * px_per_m),
                                  (xe + 1.0 * px_per_m, ye - 0.9 * px_per_m)], fill=0)
    # cut structure (section) or outline (elevation)
    if elevation:
        for k in range(1, n_floors):
            canvas.dashed((x_left, levels[k]), (x_right, levels[k]), ANNO, pattern=(8, 6))
        outline = [(x_left, ground), (x_left, levels[n_floors]), (x_right, levels[n_floors]), (x_right, ground)]
        canvas.draw.line(outline, fill=0, width=3)
        canvas.label_draw.line(outline, fill=WALL, width=12)
    else:
        rects = [(x_left - wall_t / 2, levels[k], x_right + wall_t / 2, levels[k] + slab_t)
                 for k in range(n_floors + 1)]
        for x in [x_left, x_right] + [g for g in grid_x[1:-1] if u() < 0.5]:
            ext = x in (x_left, x_right)
            for k in range(n_floors):
                lo, hi = levels[k + 1] + slab_t, levels[k]
                if ext and u() < 0.7:
                    w0 = max(levels[k] - u(2.1, 2.4) * px_per_m, lo + 0.1 * px_per_m)
                    w1 = levels[k] - u(0.8, 1.0) * px_per_m
                    rects += [(x - wall_t / 2, lo, x + wall_t / 2, w0), (x - wall_t / 2, w1, x + wall_t / 2, hi)]
                    wb = (x - wall_t / 2, w0, x + wall_t / 2, w1)
                    canvas.rect(wb, WINDOW, fill=255)
                    canvas.draw.line([(x - wall_t * 0.1, w0), (x - wall_t * 0.1, w1)], fill=0)
                    canvas.draw.line([(x + wall_t * 0.1, w0), (x + wall_t * 0.1, w1)], fill=0)
                elif not ext and k == 0 and u() < 0.5:
                    dh = min(2.1 * px_per_m, hi - lo - 0.1 * px_per_m)
                    rects.append((x - wall_t / 2, lo, x + wall_t / 2, hi - dh))
                    canvas.label_draw.rectangle((x - wall_t / 2, hi - dh, x + wall_t / 2, hi), fill=DOOR)
                else:
                    rects.append((x - wall_t / 2, lo, x + wall_t / 2, hi))
            if ext:
                # foundation wall, footing
                rects += [(x - wall_t / 2, levels[0] + slab_t, x + wall_t / 2, ground + 0.45 * px_per_m),
                          (x - 0.45 * px_per_m, ground + 0.45 * px_per_m, x + 0.45 * px_per_m, ground + 0.7 * px_per_m)]
        if not pitched:
            rects += [(x - wall_t / 2, levels[n_floors] - 0.8 * px_per_m, x + wall_t / 2, levels[n_floors])
                      for x in (x_left, x_right)]
        fill = style["exterior"]
        for r in rects:
            canvas.draw.rectangle(r, fill=0)
            canvas.label_draw.rectangle(r, fill=WALL)
        if fill != "solid":
            for r in rects:
                ir = (r[0] + 1, r[1] + 1, r[2] - 1, r[3] - 1)
                canvas.draw.rectangle(ir, fill=style["poche_gray"] if fill == "gray" else 255)
                if fill == "hatch":
                    hatch(canvas, rng, ir, 7, "/")
    if pitched:
        e, mid, hh = 0.5 * px_per_m, (x_left + x_right) / 2, roof_h * px_per_m
        poly = [(x_left - e, levels[n_floors] + slab_t), (mid, levels[n_floors] - hh),
                (x_right + e, levels[n_floors] + slab_t),
                (x_right + e, levels[n_floors] + 2 * slab_t), (mid, levels[n_floors] - hh + slab_t * 1.2),
                (x_left - e, levels[n_floors] + 2 * slab_t)]
        canvas.draw.polygon(poly, fill=0 if style["exterior"] == "solid" and not elevation else 255, outline=0, width=2)
        canvas.label_draw.polygon(poly, fill=WALL)
    # levels, dimensions, names, title
    for k, y in enumerate(levels):
        x = x_left - 40 - wall_t
        canvas.label_draw.rectangle((x - 150, y - 34, x + 4, y + 2), fill=DIM)
        canvas.draw.line([(x - 140, y), (x, y)], fill=0)
        arrow(canvas, (x - 120, y), (0, 1), 12, DIM)
        h = (levels[0] - y) / px_per_m
        mark = pick(rng, (f"+{h:.2f}", f"LEVEL {k}", f"EL. {h * 1000:.0f}"))
        canvas.text((x - 104, y - 4), mark, style["dim_text_size"], cls=DIM, anchor="lb")
    dimension_chain(canvas, style, px_per_m, False, list(levels) + [ground], x_right + wall_t + 60,
                    x_right + wall_t / 2 + 10, 1)
    for k in range(n_floors):
        for q in range(len(bays)):
            if u() < 0.35 and not elevation:
                name = pick(rng, tuple(ROOM_NAMES[style["language"]].values()))
                canvas.text(((grid_x[q] + grid_x[q + 1]) / 2, levels[k] - floor_h * px_per_m * 0.75), name,
                            style["room_text_size"] - 2)
    title = pick(rng, ("NORTH ELEVATION", "SOUTH ELEVATION", "EAST ELEVATION") if elevation
                 else ("SECTION A-A", "BUILDING SECTION", "COUPE AA", "SECCION 1"))
    drawing_title(canvas, rng, x_left - 1.2 * px_per_m, by1 - 40, title, pick(rng, ("1:50", "1:75", "1:100")))


def window_elevation(canvas, rng, box):
    """A window seen in elevation inside `box`: frame, mullions, maybe transom and sash marks."""
    x0, y0, x1, y1 = box
    if x1 - x0 < 30 or y1 - y0 < 30:
        return
    canvas.rect(box, WINDOW, width=2, fill=255)
    canvas.draw.rectangle((x0 + 5, y0 + 5, x1 - 5, y1 - 5), outline=0)
    n = max(1, int((x1 - x0) // 70))
    for k in range(1, n):
        x = x0 + (x1 - x0) * k / n
        canvas.draw.line([(x, y0 + 5), (x, y1 - 5)], fill=0, width=2)
    if rng.uniform() < 0.4:
        y = y0 + (y1 - y0) * 0.3
        canvas.draw.line([(x0 + 5, y), (x1 - 5, y)], fill=0, width=2)
    if rng.uniform() < 0.3:  # opening sash marker
        canvas.dashed((x0 + 5, y1 - 5), ((x0 + x1) / 2, y0 + 5), WINDOW, pattern=(6, 4))
        canvas.dashed(((x0 + x1) / 2, y0 + 5), (x1 - 5, y1 - 5), WINDOW, pattern=(6, 4))


def door_elevation(canvas, rng, box):
    """A door seen in elevation inside `box`: frame, leaf, maybe a panel, handle."""
    x0, y0, x1, y1 = box
    if x1 - x0 < 40 or y1 - y0 < 60:
        return
    canvas.rect(box, DOOR, width=2, fill=255)
    canvas.draw.rectangle((x0 + 6, y0 + 6, x1 - 6, y1), outline=0)
    if rng.uniform() < 0.4:
        canvas.draw.rectangle((x0 + 16, y0 + 18, x1 - 16, (y0 + y1) / 2), outline=0)
    hx = x1 - 16 if rng.uniform() < 0.5 else x0 + 16
    canvas.draw.line([(hx, (y0 + y1) / 2 + 10), (hx, (y0 + y1) / 2 + 30)], fill=0, width=3)


# ------------------------------------------------------------------------------------ details
MATERIALS = {  # name: (hatch, thickness range m, note)
    "plaster": ("dots", (0.012, 0.02), "PLASTER FINISH"), "board": (None, (0.0125, 0.025), "GYPSUM BOARD"),
    "block": ("x", (0.1, 0.2), "CONCRETE BLOCK"), "brick": ("/", (0.1, 0.11), "BRICK VENEER"),
    "concrete": ("concrete", (0.15, 0.25), "REINFORCED CONCRETE"),
    "insulation": ("zig", (0.05, 0.15), "RIGID INSULATION"),
    "cavity": (None, (0.03, 0.05), "AIR CAVITY"), "timber": ("wood", (0.04, 0.1), "TIMBER BATTEN"),
}


def draw_detail(canvas, rng, style, area):
    """A wall construction detail at its own scale (1:5-1:10) in `area`: hatched layers, then a
    slab with an optional window/door frame, or a footing in earth; layer notes, dimensions, title."""
    u = rng.uniform
    x0, y0, x1, y1 = area
    W, H = x1 - x0, y1 - y0
    layers = [pick(rng, ("plaster", "board"))] + [pick(rng, ("block", "concrete")), "insulation"]
    layers += [pick(rng, ("cavity", "timber")), pick(rng, ("brick", "block"))] if u() < 0.6 else []
    thicknesses = [u(*MATERIALS[m][1]) for m in layers]
    total, wpx = sum(thicknesses), u(0.22, 0.36) * W
    px_per_m = wpx / total  # the detail's own scale (px per metre), typically 1:5-1:10
    wall_x, wall_top, wall_bottom = x0 + u(0.3, 0.42) * W, y0 + 50, y1 - 16  # interior (slab side) to the left
    foundation = u() < 0.35
    ground_y = wall_top + u(0.45, 0.65) * (wall_bottom - wall_top)
    if foundation:
        earth = (x0, ground_y, x1, wall_bottom)
        canvas.rect(earth, ANNO, width=0)
        hatch(canvas, rng, earth, u(10, 16), "earth")
        canvas.line([(x0, ground_y), (x1, ground_y)], ANNO, width=2)
    edges = wall_x + np.concatenate([[0], np.cumsum(thicknesses)]) * px_per_m
    for m, a, b in zip(layers, edges[:-1], edges[1:]):
        r = (a, wall_top, b, wall_bottom - (0.25 * px_per_m if foundation else 0))
        canvas.rect(r, WALL, width=1 + (m == "board"), fill=255)
        if MATERIALS[m][0]:
            hatch(canvas, rng, (r[0] + 1, r[1] + 1, r[2] - 1, r[3] - 1), u(6, 12), MATERIALS[m][0])
    if foundation:
        fb = (wall_x - 0.2 * px_per_m, wall_bottom - 0.25 * px_per_m, edges[-1] + 0.2 * px_per_m, wall_bottom)
        canvas.rect(fb, WALL, width=2, fill=255)
        hatch(canvas, rng, fb, 9, "concrete")
    else:
        slab_y, slab_t = wall_top + u(0.3, 0.5) * (wall_bottom - wall_top), min(u(0.18, 0.25) * px_per_m, 0.2 * H)
        slab = (x0 + 14, slab_y, edges[2], slab_y + slab_t)  # the slab bears on the structural leaf
        canvas.rect(slab, WALL, width=2, fill=255)
        hatch(canvas, rng, slab, 9, "concrete")
        canvas.rect((x0 + 14, slab_y - 0.05 * px_per_m, wall_x, slab_y), WALL, fill=255)
        canvas.label_draw.rectangle((x0 + 2, slab_y - 0.05 * px_per_m - 10, x0 + 18, slab_y + slab_t + 10), fill=ANNO)
        zig = [(10, -0.05 * px_per_m - 10), (10, slab_t * 0.4), (4, slab_t * 0.5), (16, slab_t * 0.6),
               (10, slab_t + 10)]
        canvas.draw.line([(x0 + dx, slab_y + dy) for dx, dy in zig], fill=0)
        if u() < 0.5:  # a window or door frame below the slab, through the wall
            cls = WINDOW if u() < 0.7 else DOOR
            fb = (edges[0], slab_y + slab_t + 4,
                  edges[-1], min(wall_bottom - 4, slab_y + slab_t + u(0.12, 0.2) * px_per_m + 60))
            canvas.rect(fb, cls, fill=255, width=2)
            fx0, fy0, fx1, fy1 = fb
            for k in range(3):
                cx = fx0 + (fx1 - fx0) * (k + 1) / 4
                canvas.draw.rectangle((cx - 6, fy0 + 6, cx + 6, fy0 + 20), outline=0)
            m = (fx0 + fx1) / 2
            canvas.draw.line([(m - 4, fy0 + 24), (m - 4, fy1)], fill=0)
            canvas.draw.line([(m + 4, fy0 + 24), (m + 4, fy1)], fill=0, width=1 + (cls == DOOR) * 4)
    for y in (wall_top,) if foundation else (wall_top, wall_bottom):
        canvas.label_draw.rectangle((wall_x - 4, y - 8, edges[-1] + 4, y + 8), fill=ANNO)
        xm = (wall_x + edges[-1]) / 2
        canvas.draw.line([(wall_x - 4, y), (xm - 6, y), (xm - 2, y - 8), (xm + 2, y + 8), (xm + 6, y),
                          (edges[-1] + 4, y)],
                         fill=0)
    dimension_chain(canvas, dict(style, units="mm"), px_per_m, True, list(edges), wall_top - 24, wall_top - 10, -1)
    nx, text_size = edges[-1] + u(60, 120), style["note_text_size"]
    ylo = wall_top + 20
    yhi = max(ylo + 1, slab_y - 12 if not foundation else wall_bottom - 0.25 * px_per_m - 10)
    js = rng.permutation(len(layers))[:5]
    for k, (j, ty) in enumerate(zip(js, np.sort(u(ylo, yhi, len(js))))):
        tx, txt = (edges[j] + edges[j + 1]) / 2, f"{thicknesses[j] * 1000:.0f} MM {MATERIALS[layers[j]][2]}"
        ny = y0 + 60 + k * (text_size * 2.6)
        note_w = font(text_size).getlength(txt)
        if nx + note_w < x1 and canvas.is_free((nx, ny - text_size, nx + note_w, ny + text_size)):
            canvas.text((nx + 4, ny), txt, text_size, anchor="lm")
            canvas.line([(nx, ny), (nx - 16, ny), (tx, ty)], ANNO)
            canvas.circle((tx, ty), 3, ANNO, fill=0)
    title = pick(rng, ("WALL SECTION", "TYP. SILL DETAIL", "FOUNDATION DETAIL", "DETAIL 3", "EAVE DETAIL"))
    drawing_title(canvas, rng, x0, y1 + 28, title, pick(rng, ("1:5", "1:10", "1:20")))


# ----------------------------------------------------------------------------------- schedules
SCHEDULE_COLUMNS = {
    "DOOR": ("MARK", "WIDTH", "HEIGHT", "TYPE", "MATERIAL", "FINISH", "FIRE RATING", "HARDWARE", "REMARKS"),
    "WINDOW": ("MARK", "WIDTH", "HEIGHT", "SILL", "TYPE", "FRAME", "GLAZING", "REMARKS"),
    "ROOM FINISH": ("NO.", "ROOM", "FLOOR", "BASE", "WALLS", "CEILING", "HEIGHT", "REMARKS"),
}
CELL_VALUES = {"WIDTH": ("800", "900", "1000", "1200", "1800"), "HEIGHT": ("2100", "2400", "1200", "1500", "2.70"),
               "SILL": ("900", "1000", "600"), "TYPE": tuple("ABCDEF"), "MATERIAL": ("WOOD", "HM", "ALUM", "GLASS"),
               "FINISH": ("PAINT", "STAIN", "PREFIN."), "FIRE RATING": ("-", "30 MIN", "60 MIN", "90 MIN"),
               "HARDWARE": ("SET 1", "SET 2", "SET 3"), "FRAME": ("ALUM", "PVC", "WOOD"),
               "GLAZING": ("DG", "TG", "LAM"), "FLOOR": ("TILE", "CARPET", "VINYL", "CONC"),
               "BASE": ("TILE", "WOOD", "VINYL", "-"),
               "WALLS": ("PAINT", "TILE", "GWB"), "CEILING": ("GWB", "ACT", "EXP")}


def cell_value(rng, style, kind, column, row):
    """The entry of one schedule cell."""
    if column in ("MARK", "NO."):
        return f"{kind[0]}{row + 1:02d}"
    if column == "ROOM":
        return pick(rng, tuple(ROOM_NAMES[style["language"]].values()))
    if column == "REMARKS":
        return sentence(rng, 1, 4) if rng.uniform() < 0.4 else ""
    return pick(rng, CELL_VALUES[column])


def draw_schedule(canvas, rng, style, area, px_per_m):
    """A door, window or room-finish schedule table in `area`, with type elevations underneath."""
    u = rng.uniform
    x0, y0, x1, y1 = area
    kind = pick(rng, tuple(SCHEDULE_COLUMNS))
    cols = SCHEDULE_COLUMNS[kind][: int(rng.integers(5, len(SCHEDULE_COLUMNS[kind]) + 1))]
    text_size = int(u(12, 16))
    row_h = text_size * u(1.7, 2.2)
    title_box = canvas.text((x0, y0), f"{kind} SCHEDULE", text_size + 8, anchor="la", bold=True)
    table_top = title_box[3] + 14
    nrows = int(min(rng.integers(8, 28), (y1 - table_top) // row_h - 1 - (5 if kind != "ROOM FINISH" else 0)))
    rows = [cols] + [[cell_value(rng, style, kind, name, i) for name in cols] for i in range(max(nrows, 2))]
    f = font(text_size)
    widths = [max(f.getlength(r[j]) for r in rows) + 16 for j in range(len(cols))]
    while sum(widths) > x1 - x0 and len(widths) > 3:
        widths.pop()
    xs = x0 + np.concatenate([[0], np.cumsum(widths)])
    for i, row in enumerate(rows):
        for j in range(len(widths)):
            if row[j]:
                canvas.text((xs[j] + 8, table_top + (i + 0.5) * row_h), row[j], text_size, anchor="lm", bold=i == 0)
    table_bottom = table_top + len(rows) * row_h
    column_rules = u() < 0.7
    for i in range(len(rows) + 1):
        canvas.line([(xs[0], table_top + i * row_h), (xs[-1], table_top + i * row_h)], ANNO,
                    width=2 if i in (0, 1, len(rows)) else 1)
    for j, x in enumerate(xs):
        if column_rules or j in (0, len(xs) - 1):
            canvas.line([(x, table_top), (x, table_bottom)], ANNO, width=2 if j in (0, len(xs) - 1) else 1)
    # type elevations under the table
    if kind != "ROOM FINISH" and u() < 0.8:
        x, base = x0 + 40, table_bottom + 90 + 2.4 * px_per_m
        while base < y1 - 30:
            w = u(0.8, 1.0) * px_per_m if kind == "DOOR" else u(0.6, 2.4) * px_per_m
            h = u(2.0, 2.4) * px_per_m if kind == "DOOR" else u(1.0, 1.6) * px_per_m
            if x + w > x1 - 20:
                break
            (door_elevation if kind == "DOOR" else window_elevation)(canvas, rng, (x, base - h, x + w, base))
            bubble(canvas, (x + w / 2, base - h - 34), 15, pick(rng, CELL_VALUES["TYPE"]))
            dimension_chain(canvas, style, px_per_m, True, [x, x + w], base + 30, base + 8, 1)
            x += w + u(0.6, 1.2) * px_per_m
            if u() < 0.1:
                break


# ------------------------------------------------------------------------------ sheet assembly
def draw_notes(canvas, rng, style, area):
    """A heading and numbered general notes, word-wrapped to `area`."""
    x0, y0, x1, y1 = area
    text_size, face = style["note_text_size"], font(style["note_text_size"])
    heading = pick(rng, ("GENERAL NOTES", "NOTES", "KEY NOTES", "REMARQUES"))
    y = canvas.text((x0, y0), heading, text_size + 4, anchor="la", bold=True)[3] + text_size
    for k in range(1, 14):
        words, line, lines = f"{k}. {sentence(rng, 4, 16)}".split(), "", []
        for w in words:
            if face.getlength(line + " " + w) > x1 - x0 - 10 and line:
                lines.append(line)
                line = "   " + w
            else:
                line = (line + " " + w).strip() if not line.startswith("   ") else line + " " + w
        for ln in lines + [line]:
            if y + text_size * 1.4 > y1:
                return
            canvas.text((x0, y), ln, text_size, anchor="la")
            y += text_size * 1.35
        y += text_size * 0.6


def draw_frame(canvas, rng, style):
    """Border and title block; returns the drawing area."""
    u, width, height = rng.uniform, canvas.width, canvas.height
    outer = int(u(0.012, 0.025) * min(width, height))
    inner = outer + int(u(8, 16))
    canvas.rect((outer, outer, width - outer, height - outer), ANNO, solid=False)
    canvas.rect((inner, inner, width - inner, height - inner), ANNO, width=int(rng.integers(2, 4)), solid=False)
    if u() < 0.4:
        for k in range(1, 6):
            x = inner + (width - 2 * inner) * (k - 0.5) / 5
            canvas.text((x, (outer + inner) / 2), str(k), int((inner - outer) * 0.8), cls=ANNO)
            x = inner + (width - 2 * inner) * k / 5
            canvas.line([(x, outer), (x, inner)], ANNO)
    if u() < 0.65:  # block in the bottom-right corner
        block = (width - inner - u(0.25, 0.38) * width, height - inner - u(0.1, 0.16) * height,
                 width - inner, height - inner)
        area = (inner + 20, inner + 20, width - inner - 20, block[1] - 20)
    else:  # strip along the right edge
        block = (width - inner - u(0.11, 0.15) * width, inner, width - inner, height - inner)
        area = (inner + 20, inner + 20, block[0] - 20, height - inner - 20)
    canvas.rect(block, ANNO, width=2, solid=False)
    words = ("RESIDENCE", "HOUSING", "MUNTANYA 96", "VILLA", "OFFICE BLOCK", "SCHOOL", "ANNEX", "TERRASSA")
    date = f"20{int(rng.integers(10, 26))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    fields = [("PROJECT", " ".join(pick(rng, words) for _ in range(2))),
              ("SHEET TITLE", pick(rng, ("PLANS", "SECTIONS", "DETAILS", "SCHEDULES", "ELEVATIONS"))),
              ("SCALE", pick(rng, ("1:50", "1:100", "AS SHOWN"))), ("DATE", date),
              ("DRAWN", pick(rng, ("JD", "AM", "MR", "LC"))),
              ("SHEET", f"{pick(rng, 'ASDE')}-{int(rng.integers(1, 6))}{int(rng.integers(0, 30)):02d}")]
    x0, y0, x1, y1 = block
    horiz = (x1 - x0) > (y1 - y0)
    n = len(fields)
    for k, (cap, val) in enumerate(fields):
        if horiz:  # cells in two rows
            cols = (n + 1) // 2
            fx, fy = (x1 - x0) / cols, (y1 - y0) / 2
            cell = (x0 + fx * (k % cols), y0 + fy * (k // cols), x0 + fx * (k % cols + 1), y0 + fy * (k // cols + 1))
        else:  # cells stacked at the bottom of the strip, a logo box above
            ch = min(90, (y1 - y0) / (n + 2))
            cell = (x0, y1 - ch * (n - k), x1, y1 - ch * (n - k - 1))
        canvas.line([(cell[0], cell[1]), (cell[2], cell[1])], ANNO)
        canvas.line([(cell[0], cell[1]), (cell[0], cell[3])], ANNO)
        canvas.text((cell[0] + 5, cell[1] + 4), cap, 10, anchor="la")
        size = min((cell[3] - cell[1]) * (0.42 if cap == "SHEET" else 0.28), 36)
        while size > 9 and font(size).getlength(val) > cell[2] - cell[0] - 10:
            size -= 2
        canvas.text(((cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2 + 6), val, size, bold=cap in ("SHEET", "PROJECT"))
    if not horiz:
        canvas.circle(((x0 + x1) / 2, y0 + 80), min(40, (x1 - x0) / 3), ANNO)
        canvas.text(((x0 + x1) / 2, y0 + 80), "".join(pick(rng, "ABCDMRST") for _ in range(2)), 24, bold=True, cls=ANNO)
    return area


def render_sheet(rng, sheet_type, *, px_per_m=DEFAULT_PX_PER_M, long_side=SHEET_LONG_SIDE, scan=0.5):
    """One synthetic sheet of `sheet_type` (one of SHEET_TYPES) drawn with generator `rng`:
    (image uint8, label uint8 class ids, ink bool). The drawing scale in px per metre is drawn
    from the range `px_per_m`, the sheet's long side in px from `long_side`; `scan` is the
    probability of scan realism (tilt, faded ink, speckle, paper tone)."""
    u = rng.uniform
    long_px = int(u(*long_side))
    width, height = (long_px, int(long_px / 1.414)) if u() < 0.75 else (int(long_px / 1.414), long_px)
    canvas, style, drawing_px_per_m = Canvas(width, height), random_style(rng), u(*px_per_m)
    x0, y0, x1, y1 = draw_frame(canvas, rng, style)
    if sheet_type == "plan":
        if u() < 0.45 and x1 - x0 > 1000:  # notes column
            notes_w = u(0.2, 0.28) * (x1 - x0)
            left = u() < 0.3
            draw_notes(canvas, rng, style, (x0, y0, x0 + notes_w, y1) if left else (x1 - notes_w + 20, y0, x1, y1))
            x0, x1 = (x0 + notes_w + 20, x1) if left else (x0, x1 - notes_w)
        draw_plan(canvas, rng, style, (x0, y0, x1, y1), drawing_px_per_m)
    elif sheet_type == "section":  # one drawing, or two stacked / side by side when there is room
        if y1 - y0 > 1250 or (x1 - x0 > 1500 and u() < 0.5):
            v = y1 - y0 > 1250
            m = (y0 + y1) / 2 if v else (x0 + x1) / 2
            draw_section(canvas, rng, style, (x0, y0, x1, m) if v else (x0, y0, m, y1), drawing_px_per_m)
            draw_section(canvas, rng, style, (x0, m, x1, y1) if v else (m, y0, x1, y1), drawing_px_per_m)
        else:
            draw_section(canvas, rng, style, (x0, y0, x1, y1), drawing_px_per_m)
    elif sheet_type == "detail":
        nx = int(rng.integers(1, 3 if x1 - x0 < 1300 else 4))
        ny = int(rng.integers(1, 3 if y1 - y0 > 900 else 2))
        cw, ch = (x1 - x0) / nx, (y1 - y0) / ny
        for i in range(nx):
            for j in range(ny):
                if u() < 0.85 or (i, j) == (0, 0):
                    cell = (x0 + i * cw + 10, y0 + j * ch + 10, x0 + (i + 1) * cw - 10, y0 + (j + 1) * ch - 60)
                    if u() < 0.5:
                        canvas.rect((cell[0] - 6, cell[1] - 6, cell[2] + 6, cell[3] + 54), ANNO, solid=False)
                    draw_detail(canvas, rng, style, cell)
    else:
        split = x0 + u(0.45, 0.7) * (x1 - x0) if x1 - x0 > 1100 else x1
        draw_schedule(canvas, rng, style, (x0, y0, split - 30, y1), drawing_px_per_m)
        if split < x1 and u() < 0.5:
            draw_schedule(canvas, rng, style, (split, y0, x1, y1), drawing_px_per_m)
        elif split < x1:
            draw_notes(canvas, rng, style, (split, y0, x1, y1))
    img, lab = canvas.image, canvas.label
    ink = np.asarray(img) < INK_THRESHOLD
    if u() < scan:
        img, lab, ink = scan_noise(rng, img, lab, ink)
    return np.array(img), np.array(lab), np.asarray(ink)


def scan_noise(rng, img, lab, ink):
    """Scan realism, each part with its own probability: slight tilt (labels and ink rotate along),
    uneven toner, speckle, paper tone and contrast."""
    u = rng.uniform
    if u() < 0.6:
        degrees = u(-0.6, 0.6)
        img = img.rotate(degrees, Image.BILINEAR, fillcolor=255)
        lab = lab.rotate(degrees, Image.NEAREST, fillcolor=BG)
        ink = np.asarray(Image.fromarray(ink).rotate(degrees, Image.NEAREST))
    if u() < 0.5:  # uneven toner: ink lightened by a smooth random field
        field = Image.fromarray((u(0.45, 1.0, (6, 8)) * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR)
        a = np.asarray(img, np.float32)
        img = Image.fromarray((255 - (255 - a) * np.asarray(field, np.float32) / 255).astype(np.uint8))
    if u() < 0.6:
        draw = ImageDraw.Draw(img)
        k = int(rng.integers(20, 200))
        for x, y, r, gray in zip(u(0, img.width, k), u(0, img.height, k), u(0.3, 1.3, k), u(40, 170, k)):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(gray))
    if u() < 0.6:
        lo, hi = u(0, 50), u(225, 252)
        img = img.point([int(lo + (hi - lo) * v / 255) for v in range(256)])
    return img, lab, ink


class SyntheticSheets:
    """Infinite stream of labeled synthetic sheets; sheet i is a pure function of
    (seed, split, i). Splits are separate seed namespaces ("train", "probe_train", "probe_val")."""

    def __init__(self, seed=0, split="train", *, px_per_m=DEFAULT_PX_PER_M, long_side=SHEET_LONG_SIDE,
                 scan=0.5, types=SHEET_TYPES, weights=None, cache_size=2):
        self.seed, self.split, self.px_per_m, self.long_side, self.scan = int(seed), split, px_per_m, long_side, scan
        self.types = tuple(types)
        # plans carry most element classes, so they get twice the share of each other type
        w = np.asarray(weights if weights is not None else [2.0 if t == "plan" else 1.0 for t in self.types], float)
        self.weights = w / w.sum()
        self._ns, self._cache, self.cache_size = zlib.crc32(split.encode()), OrderedDict(), cache_size

    def __getstate__(self):  # DataLoader workers start with an empty cache of their own
        return dict(self.__dict__, _cache=OrderedDict())

    def get_sheet(self, i):
        i = int(i)
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        rng = np.random.default_rng([self.seed, self._ns, i])
        t = self.types[int(rng.choice(len(self.types), p=self.weights))]
        img, lab, ink = render_sheet(rng, t, px_per_m=self.px_per_m, long_side=self.long_side, scan=self.scan)
        sheet = dict(image=img, label=lab, ink=ink, sheet_type=SHEET_TYPES.index(t),
                     name=f"synthetic/{self.split}/{self.seed}/{i}")
        self._cache[i] = sheet
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return sheet


def synthetic_probe_set(split, n, tile=224, seed=0, tiles_per_sheet=8):
    """Held-out labeled tiles for the frozen probe: list of (image uint8, mask uint8, sheet_type),
    ink-bearing tiles cut at the native drawing scale from the "probe_<split>" namespace, which
    never overlaps the "train" stream."""
    src = SyntheticSheets(seed=seed, split=split if split.startswith("probe_") else f"probe_{split}", cache_size=1)
    out, k = [], 0
    while len(out) < n:
        sh = src.get_sheet(k)
        rng = np.random.default_rng([seed, k])
        for _ in range(min(tiles_per_sheet, n - len(out))):
            x0, y0, side = cut_region(sh, rng, tile)
            img, lab = _region(sh["image"], x0, y0, side, 255), _region(sh["label"], x0, y0, side, BG)
            out.append((np.array(img), np.array(lab), sh["sheet_type"]))
        k += 1
    return out
