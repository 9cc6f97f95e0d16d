"""The shared image path, pinned by what the emulator saw: `gembatch caption` over real HTTP, the
Parquet read back, and each caption's description of the pixels the emulator received compared with
the picture the file shows.

Every picture is four coloured quadrants, so a rotation, a mirror, a clipped 16-bit range, an alpha
channel sent as black or a wrong animation frame all change the four samples the emulator reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from conftest import TEST_KEY_ENV, read_errors, read_output
from PIL import Image, ImageCms

from tasks.engine.dry_run import plan_job
from tasks.engine.run import RunOptions, run_job
from tasks.jobs.caption import DEFAULT_CAPTION_PROMPT, CaptionJob
from tasks.jobs.embed import estimate_text_tokens
from tasks.jobs.images_io import image_for_model, image_tokens, jpeg_scale, planned_size, probe
from tasks.jobs.media import base_dir_of
from tasks.provider.client import ProviderSettings

MODEL = "gemini-3.8-flash"
W, H = 120, 80
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
QUADRANTS = {"tl": RED, "tr": GREEN, "bl": BLUE, "br": YELLOW}
SEEN = re.compile(
    r"of a (?P<mime>image/\w+) image \((?:\d+x\d+, )?(?P<bytes>\d+) bytes; (?P<mode>\S+) (?P<w>\d+)x(?P<h>\d+)"
    r"(?: frames (?P<frames>\d+))? tl #(?P<tl>\w{6}) tr #(?P<tr>\w{6}) bl #(?P<bl>\w{6}) br #(?P<br>\w{6})"
)
# Pillow's ImageOps.exif_transpose for each orientation, and the transposition that undoes it: a file
# stored with orientation n holds the upright picture transposed by UNDO[n].
T = Image.Transpose
UNDO = {
    1: None,
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}


def quadrants(mode: str = "RGB", colours: dict[str, tuple] | None = None, size=(W, H)) -> Image.Image:
    colours = colours or QUADRANTS
    w, h = size
    img = Image.new(mode, size)
    for (x, y), name in zip(((0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)), ("tl", "tr", "bl", "br")):
        img.paste(Image.new(mode, (w // 2, h // 2), colours[name]), (x, y))  # paste(int) garbles I;16
    return img


def save(img: Image.Image, path: Path, fmt: str, **options) -> Path:
    img.save(path, format=fmt, **options)
    return path


def caption_files(emu, tmp_path: Path, files: dict[int, Path], *, max_side: int = 1536, out: str = "out"):
    listing = tmp_path / "list.csv"
    table = pa.table({"id": pa.array(list(files), pa.int64()), "image": [str(p) for p in files.values()]})
    pcsv.write_csv(table, listing)
    job = CaptionJob(model=MODEL, base_dir=base_dir_of(str(listing)), max_side=max_side)
    options = RunOptions(
        input=str(listing),
        output=str(tmp_path / out),
        provider=ProviderSettings(provider="local", base_url=emu.base_url, api_key_env=TEST_KEY_ENV, timeout_s=10),
    )
    doc = asyncio.run(run_job(job, options))
    rows = {row["id"]: row for row in read_output(tmp_path / out).iter_rows(named=True)}
    return doc, rows


def seen(caption: str) -> dict:
    match = SEEN.search(caption)
    assert match, f"the emulator could not decode what it got: {caption}"
    found = match.groupdict()
    for corner in QUADRANTS:
        found[corner] = tuple(bytes.fromhex(found[corner]))
    found["size"] = (int(found["w"]), int(found["h"]))
    return found


def assert_colours(found: dict, expected: dict[str, tuple], tolerance: int, what: str) -> None:
    for corner, colour in expected.items():
        got = found[corner]
        assert all(abs(a - b) <= tolerance for a, b in zip(got, colour)), f"{what}: {corner} is {got}, not {colour}"


def test_every_exif_orientation_reaches_the_model_upright(emulator, tmp_path):
    upright = quadrants()
    files = {}
    for n, undo in UNDO.items():
        stored = upright if undo is None else upright.transpose(undo)
        exif = Image.Exif()
        exif[0x0112] = n
        files[n] = save(stored, tmp_path / f"o{n}.jpg", "JPEG", quality=95, subsampling=0, exif=exif)
    big = upright.resize((W * 5, H * 5), Image.Resampling.NEAREST).transpose(T.ROTATE_90)  # 400x600 stored
    exif = Image.Exif()
    exif[0x0112] = 6
    files[9] = save(big, tmp_path / "big.jpg", "JPEG", quality=95, subsampling=0, exif=exif)

    doc, rows = caption_files(emulator, tmp_path, files, max_side=300)
    assert doc["counts"]["succeeded"] == 9 and doc["counts"]["failed"] == 0
    for n in UNDO:
        found = seen(rows[n]["caption"])
        assert found["size"] == (W, H), f"orientation {n}: the model got {found['size']}"
        assert_colours(found, QUADRANTS, 8, f"orientation {n}")
        assert (rows[n]["image_width"], rows[n]["image_height"]) == (W, H), "the size recorded is as displayed"
    # An upright file that fits is sent byte for byte; every other one was rotated and re-encoded.
    sha12 = hashlib.sha256(files[1].read_bytes()).hexdigest()[:12]
    assert f"#{sha12} of a image/jpeg" in rows[1]["caption"]
    assert f"#{hashlib.sha256(files[6].read_bytes()).hexdigest()[:12]}" not in rows[6]["caption"]
    # 400x600 stored with orientation 6: decoded at half scale, turned, downscaled to 300 wide.
    found = seen(rows[9]["caption"])
    assert found["size"] == (300, 200) and found["mime"] == "image/jpeg"
    assert_colours(found, QUADRANTS, 8, "orientation 6, downscaled")
    assert (rows[9]["image_width"], rows[9]["image_height"]) == (600, 400)


def test_cmyk_16_bit_palette_and_grey_arrive_as_8_bit_rgb_or_grey(emulator, tmp_path):
    cmyk = {"tl": (255, 0, 0, 0), "tr": (0, 255, 0, 0), "bl": (0, 0, 255, 0), "br": (0, 0, 0, 255)}
    files = {1: save(quadrants("CMYK", cmyk), tmp_path / "cmyk.jpg", "JPEG", quality=95)}
    levels = {"tl": 0, "tr": 20000, "bl": 40000, "br": 65535}
    sixteen = quadrants("I;16", {k: v for k, v in levels.items()})
    files[2] = save(sixteen, tmp_path / "grey16.png", "PNG")
    files[3] = save(quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4), tmp_path / "pal.png", "PNG")
    files[4] = save(quadrants("1", {"tl": 1, "tr": 0, "bl": 0, "br": 1}), tmp_path / "bilevel.png", "PNG")
    with Image.open(files[2]) as img:
        assert img.mode == "I;16", "the fixture really is 16-bit"

    doc, rows = caption_files(emulator, tmp_path, files)
    assert doc["counts"]["succeeded"] == 4

    found = seen(rows[1]["caption"])
    assert found["mode"] == "RGB" and found["mime"] == "image/jpeg", "CMYK is converted, not passed on"
    cyan, magenta, yellow, black = (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)
    assert_colours(found, {"tl": cyan, "tr": magenta, "bl": yellow, "br": black}, 12, "CMYK")

    found = seen(rows[2]["caption"])
    assert found["mode"] == "L" and found["mime"] == "image/png"
    # Scaled (v / 257), not clipped: clipping would make three of the four quadrants white.
    grey = {k: (round(v / 257),) * 3 for k, v in levels.items()}
    assert grey == {"tl": (0,) * 3, "tr": (78,) * 3, "bl": (156,) * 3, "br": (255,) * 3}
    assert_colours(found, grey, 0, "16-bit grey")

    found = seen(rows[3]["caption"])
    assert found["mode"] == "P", "a palette PNG that fits needs no change: sent as it is"
    assert f"#{hashlib.sha256(files[3].read_bytes()).hexdigest()[:12]}" in rows[3]["caption"]
    assert_colours(found, QUADRANTS, 0, "palette")

    found = seen(rows[4]["caption"])
    assert found["mode"] == "L"
    white, dark = (255,) * 3, (0,) * 3
    assert_colours(found, {"tl": white, "tr": dark, "bl": dark, "br": white}, 0, "1-bit")


def test_transparency_is_flattened_on_white(emulator, tmp_path):
    rgba = {"tl": (0, 0, 0, 0), "tr": (255, 0, 0, 255), "bl": (0, 0, 255, 128), "br": (0, 255, 0, 255)}
    # Over white: transparent → white; half-transparent blue → (127, 127, 255).
    expected = {"tl": (255, 255, 255), "tr": RED, "bl": (127, 127, 255), "br": GREEN}
    files = {1: save(quadrants("RGBA", rgba), tmp_path / "rgba.png", "PNG")}
    files[2] = save(quadrants("RGBA", rgba), tmp_path / "rgba.webp", "WEBP", lossless=True)
    la = {"tl": (0, 0), "tr": (0, 255), "bl": (200, 255), "br": (0, 128)}
    files[3] = save(quadrants("LA", la), tmp_path / "la.png", "PNG")
    palette = quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    index_tl = palette.getpixel((0, 0))
    files[4] = save(palette, tmp_path / "pa.png", "PNG", transparency=index_tl)
    with Image.open(files[3]) as img:
        assert img.mode == "LA"

    doc, rows = caption_files(emulator, tmp_path, files)
    assert doc["counts"]["succeeded"] == 4
    found = seen(rows[1]["caption"])
    assert (found["mode"], found["mime"]) == ("RGB", "image/png")
    assert_colours(found, expected, 1, "RGBA PNG")
    found = seen(rows[2]["caption"])
    assert (found["mode"], found["mime"]) == ("RGB", "image/webp")
    assert_colours(found, expected, 10, "RGBA WebP (re-encoded lossy)")
    found = seen(rows[3]["caption"])
    assert found["mode"] == "L"
    assert_colours(found, {"tl": (255,) * 3, "tr": (0,) * 3, "bl": (200,) * 3, "br": (127,) * 3}, 1, "LA")
    found = seen(rows[4]["caption"])
    assert found["mode"] == "RGB"
    assert_colours(found, {**QUADRANTS, "tl": (255, 255, 255)}, 0, "palette with a transparent index")


def test_an_animation_is_sent_as_its_first_frame(emulator, tmp_path):
    first, second = quadrants(), Image.new("RGB", (W, H), (0, 0, 0))
    files = {
        1: save(first, tmp_path / "anim.gif", "GIF", save_all=True, append_images=[second], duration=100, loop=0),
        2: save(first, tmp_path / "anim.png", "PNG", save_all=True, append_images=[second], duration=100),
        3: save(first, tmp_path / "anim.webp", "WEBP", save_all=True, append_images=[second], lossless=True),
    }
    for path in files.values():
        with Image.open(path) as img:
            assert img.n_frames == 2, f"{path.name} really is animated"

    doc, rows = caption_files(emulator, tmp_path, files)
    assert doc["counts"]["succeeded"] == 3
    for i, mime in ((1, "image/png"), (2, "image/png"), (3, "image/webp")):
        found = seen(rows[i]["caption"])
        assert found["mime"] == mime and found["frames"] is None, f"row {i}: one frame, as {mime}"
        assert found["size"] == (W, H)
        assert_colours(found, QUADRANTS, 10, f"first frame of {files[i].name}")


def test_heic_and_avif_are_decoded_and_sent_as_jpeg(emulator, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")  # a dependency: only a stripped install lacks it
    pillow_heif.register_heif_opener()
    big = quadrants(size=(400, 300))
    files = {1: save(big, tmp_path / "photo.heic", "HEIF", quality=95)}
    files[2] = save(big, tmp_path / "photo.avif", "AVIF", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # pillow-heif stores it as the HEIF rotation (irot), which libheif applies on reading
    files[3] = save(big.transpose(T.ROTATE_90), tmp_path / "turned.heic", "HEIF", quality=95, exif=exif.tobytes())
    assert probe(files[1].read_bytes(), "photo.heic").mime == "image/heic"
    assert probe(files[2].read_bytes(), "photo.avif").mime == "image/avif"

    doc, rows = caption_files(emulator, tmp_path, files, max_side=200)
    assert doc["counts"]["succeeded"] == 3
    for i in files:
        found = seen(rows[i]["caption"])
        assert (found["mime"], found["mode"], found["size"]) == ("image/jpeg", "RGB", (200, 150))
        assert_colours(found, QUADRANTS, 16, files[i].name)
        assert (rows[i]["image_width"], rows[i]["image_height"]) == (400, 300)


def test_dry_run_reads_headers_only_and_a_run_names_the_undecodable_file(emulator, tmp_path):
    photo = quadrants(size=(4000, 3000))
    whole = io.BytesIO()
    photo.save(whole, "JPEG", quality=80)
    data = whole.getvalue()
    # The header and the first 2 kB of the scan: Image.open reads it, decoding it fails.
    (tmp_path / "cut.jpg").write_bytes(data[: data.index(b"\xff\xda") + 2048])
    wide = tmp_path / "wide.png"
    Image.new("RGB", (2000, 400), (9, 9, 9)).save(wide)
    listing = tmp_path / "list.csv"
    pcsv.write_csv(pa.table({"id": pa.array([1, 2], pa.int64()), "image": ["cut.jpg", "wide.png"]}), listing)
    job = CaptionJob(model=MODEL, base_dir=base_dir_of(str(listing)))
    settings = ProviderSettings(provider="local", base_url=emulator.base_url, api_key_env=TEST_KEY_ENV, timeout_s=10)
    options = RunOptions(input=str(listing), output=str(tmp_path / "out"), provider=settings)

    plan = asyncio.run(plan_job(job, options))
    prompt = estimate_text_tokens(DEFAULT_CAPTION_PROMPT)
    # 4000x3000 → 1536x1152: 2 × 2 tiles; 2000x400 → 1536x307: 2 × 1 tiles.
    assert image_tokens(1536, 1152) == 4 * 258 and image_tokens(1536, 307) == 2 * 258
    assert plan["estimate"]["input_tokens"] == 4 * 258 + 2 * 258 + 2 * prompt
    assert plan["counts"]["would_send"] == 2 and emulator.stats["by_route"].get("chat/completions", 0) == 0

    doc = asyncio.run(run_job(job, options))
    assert doc["counts"]["succeeded"] == 1 and doc["counts"]["failed"] == 1
    (error,) = read_errors(tmp_path / "out").iter_rows(named=True)
    assert error["id"] == 1 and error["error_type"] == "invalid_input"
    assert str(tmp_path / "cut.jpg") in error["error_message"] and "truncated" in error["error_message"]


def test_the_image_path_directly_keeps_what_fits_and_bounds_the_size():
    jpeg = io.BytesIO()
    quadrants(size=(4000, 3000)).save(jpeg, "JPEG", quality=90)
    sent = image_for_model(jpeg.getvalue(), 1536, name="big.jpg")
    # Decoded at 3/8 scale: 1500 x 1125 is within 5% of 1536 (the same 2 x 2 tiles), so no resize.
    assert (sent.mime, sent.width, sent.height, sent.changed) == ("image/jpeg", 1500, 1125, True)
    with Image.open(io.BytesIO(sent.data)) as img:
        assert img.size == (1500, 1125) and img.getexif().get(0x0112) is None
    same = image_for_model(sent.data, 1536, name="small.jpg")
    assert same.data is sent.data and not same.changed


def test_jpeg_scales_fit_the_side_asked_for_or_resize_a_little():
    # The largest M/8 scale within --max-side when it reaches 95% of it, else the next one up.
    assert jpeg_scale(4000, 3000, 1536) == 3  # 1500: sent as decoded
    assert jpeg_scale(4032, 3024, 1536) == 3  # 1512
    assert jpeg_scale(4000, 3000, 1024) == 2  # 1000
    assert jpeg_scale(4000, 3000, 3000) == 6  # 3000 exactly: no full decode and resize
    assert jpeg_scale(5472, 3648, 1536) == 3  # 1368 is 89%: 2052, then resized to 1536
    assert jpeg_scale(8064, 6048, 1024) == 1  # 1008
    assert jpeg_scale(4000, 3000, 100) == 1  # nothing fits: the smallest scale, then resized
    assert jpeg_scale(4000, 3000, 3900) == 8  # 3500 is 90%: the full picture, then resized


def test_jpegs_are_decoded_at_the_dct_scale_that_fits_and_turned_upright(emulator, tmp_path):
    files = {1: save(quadrants(size=(1600, 1200)), tmp_path / "fits.jpg", "JPEG", quality=95, subsampling=0)}
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = quadrants(size=(1600, 1200)).transpose(UNDO[6])  # stored 1200 x 1600, shown 1600 x 1200
    files[2] = save(turned, tmp_path / "turned.jpg", "JPEG", quality=95, subsampling=0, exif=exif)
    files[3] = save(quadrants(size=(1700, 1275)), tmp_path / "resized.jpg", "JPEG", quality=95, subsampling=0)
    grey = {"tl": 30, "tr": 90, "bl": 160, "br": 220}
    files[4] = save(quadrants("L", grey, size=(1600, 1200)), tmp_path / "grey.jpg", "JPEG", quality=95)
    # A camera's JPEG with a second picture appended (Multi-Picture Format): Pillow calls it MPO.
    preview = Image.new("RGB", (400, 300), (0, 0, 0))
    files[5] = save(quadrants(size=(1600, 1200)), tmp_path / "camera.jpg", "MPO", save_all=True,
                    append_images=[preview], quality=95, subsampling=0)  # fmt: skip
    with Image.open(files[5]) as img:
        assert (img.format, img.n_frames) == ("MPO", 2)
    # Stray bytes before the end marker: libjpeg warns, simplejpeg refuses, Pillow decodes it.
    whole = io.BytesIO()
    quadrants(size=(1600, 1200)).save(whole, "JPEG", quality=95, subsampling=0)
    files[6] = tmp_path / "stray.jpg"
    files[6].write_bytes(whole.getvalue()[:-2] + b"\x12\x34" + whole.getvalue()[-2:])
    infos = {i: probe(path.read_bytes(), path.name) for i, path in files.items()}
    assert all(info.scalable for info in infos.values())

    doc, rows = caption_files(emulator, tmp_path, files, max_side=600)
    assert doc["counts"]["succeeded"] == 6
    # 1600 x 1200 at 3/8 is 600 x 450; 1700 x 1275 at 3/8 is 638 x 479, resized to 600 x 450 (2/8, 425
    # wide, is less than 95% of 600).
    for i, path in files.items():
        found = seen(rows[i]["caption"])
        assert found["size"] == (600, 450) == planned_size(infos[i], 600), path.name
        assert found["mime"] == "image/jpeg"
        assert (rows[i]["image_width"], rows[i]["image_height"]) == (infos[i].width, infos[i].height)
    for i in (1, 2, 3, 5, 6):
        assert seen(rows[i]["caption"])["mode"] == "RGB"
        assert seen(rows[i]["caption"])["frames"] is None
        assert_colours(seen(rows[i]["caption"]), QUADRANTS, 8, files[i].name)
    found = seen(rows[4]["caption"])
    assert found["mode"] == "L"
    assert_colours(found, {k: (v,) * 3 for k, v in grey.items()}, 3, "grey JPEG")


def test_a_scaled_jpeg_keeps_its_colour_profile_and_drops_its_exif():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 3
    exif[0x010F] = "a camera maker"
    data = io.BytesIO()
    quadrants(size=(1600, 1200)).transpose(UNDO[3]).save(data, "JPEG", quality=95, icc_profile=icc, exif=exif)
    sent = image_for_model(data.getvalue(), 600, name="profiled.jpg")
    with Image.open(io.BytesIO(sent.data)) as img:
        assert img.size == (600, 450) and img.info.get("icc_profile") == icc
        assert "exif" not in img.info
        rgb = img.convert("RGB")
        assert all(abs(a - b) <= 8 for a, b in zip(rgb.getpixel((100, 100)), RED)), "turned upright"
        assert all(abs(a - b) <= 8 for a, b in zip(rgb.getpixel((500, 350)), YELLOW))
