"""Serving's own limits and decoding: refusals from the header, a per-request budget, a capped
heatmap, accepted formats, a worker's decoding slots; corrupt JPEGs as errors everywhere."""

from __future__ import annotations

import base64
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.config import ConfigError, ServingParams, parse_section
from pipeline.core.errors import DataError, InputError
from pipeline.data import images
from pipeline.deployment import serving
from pipeline.deployment.predict import Predictor, load_file, predict_files
from pipeline.deployment.serving import ServingLimits, score_images

pytestmark = pytest.mark.usefixtures("one_thread")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces width x height 8-bit gray pixels but holds only a few rows: a small
    file that a decoder would expand to width x height bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def radiance_hdr(width: int, height: int) -> bytes:
    """The start of a Radiance HDR file: a header Pillow cannot read, announcing width x height."""
    return b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {height} +X {width}\n".encode() + b"\x02\x02\x00\x80" * 64


def corrupt_jpeg(image: np.ndarray, seed: int = 0) -> bytes:
    """``image`` as a JPEG whose scan data is garbled in its middle, every marker kept intact
    (no FF byte is written or overwritten, so no marker appears or disappears)."""
    data = bytearray(cv2.imencode(".jpg", image)[1].tobytes())
    scan = data.rfind(b"\xff\xda")
    start = scan + 2 + int.from_bytes(data[scan + 2 : scan + 4], "big")
    end = data.rfind(b"\xff\xd9")
    rng = np.random.default_rng(seed)
    middle = start + (end - start) // 3
    for k in range(middle, min(middle + 64, end - 1)):
        if data[k] != 0xFF and data[k - 1] != 0xFF:
            data[k] = int(rng.integers(0, 255))  # 0..254: never a marker's FF
    return bytes(data)


@pytest.fixture(scope="module")
def predictor(tiny) -> Predictor:
    paths, _ = tiny
    return Predictor(load_file(paths["baseline"]), 0.5)


@pytest.fixture(scope="module")
def picture(tiny) -> np.ndarray:
    """A 96 x 128 gray image, larger than the tiny models' 32 x 32 input."""
    _, tensors = tiny
    return np.kron(tensors[0].numpy(), np.ones((3, 4), np.uint8))


def limits(**values: object) -> ServingLimits:
    return ServingLimits(ServingParams.model_validate(values))


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(images.cv2, "imdecode", refuse)
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", refuse)


# --- limits from the header, before decoding ------------------------------------------------------


def test_too_large_images_and_unaccepted_formats_are_refused_from_the_header_naming_serving_params(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_decoding(monkeypatch)
    values = [png_header_only(7072, 7072), radiance_hdr(12000, 12000), png_header_only(200_000, 100_000)]
    errors = list(score_images(predictor, values)["error"])
    assert "7072x7072 = 50,013,184 pixels, more than the limit of 50,000,000 (serving.max_image_pixels)" in errors[0]
    assert "prepare." not in errors[0]
    assert "image 1 is not a readable image of an accepted format" in errors[1]
    assert "serving.formats accepts PNG, JPEG, BMP, TIFF" in errors[1]
    assert "200000x100000" in errors[2] and "serving.max_image_pixels" in errors[2]


def test_a_format_left_out_of_serving_formats_is_refused_naming_it(predictor: Predictor, picture: np.ndarray) -> None:
    jpeg = cv2.imencode(".jpg", picture)[1].tobytes()
    table = score_images(predictor, [jpeg, png(picture)], limits=limits(formats=["png"]))
    assert "(a JPEG file; serving.formats accepts PNG)" in table["error"][0]
    assert table["error"][1] == "" and table["score"][1] is not None


def test_request_budget_refuses_the_images_that_would_pass_it_and_scores_the_rest(
    predictor: Predictor, picture: np.ndarray
) -> None:
    small = png(picture[:32, :32])  # 1,024 pixels
    large = png(picture)  # 12,288 pixels
    budget = limits(max_image_pixels=12_288, max_request_pixels=14_000)
    table = score_images(predictor, [large, large, small, small, small], limits=budget)
    errors = list(table["error"])
    assert errors[0] == errors[2] == ""  # 12,288 + 1,024 = 13,312: 688 left
    assert "more than the 1,712 left of this request's 14,000 (serving.max_request_pixels)" in errors[1]
    assert "32x32 = 1,024 pixels, more than the 688 left" in errors[3] and "in another request" in errors[4]
    assert table["score"][1] is None and table["score"][4] is None
    # The next request has its own budget.
    assert (score_images(predictor, [large], limits=budget)["error"] == "").all()


def test_refused_images_do_not_spend_the_budget(predictor: Predictor, picture: np.ndarray) -> None:
    budget = limits(max_image_pixels=12_288, max_request_pixels=12_288)
    table = score_images(predictor, [b"", png_header_only(200, 200), png(picture)], limits=budget)
    assert "is empty" in table["error"][0] and "serving.max_image_pixels" in table["error"][1]
    assert table["error"][2] == ""


def test_scores_equal_predicts_after_the_early_reduction(
    predictor: Predictor, picture: np.ndarray, tmp_path: Path
) -> None:
    files = []
    for name, image in (("a.png", picture), ("b.jpg", 255 - picture), ("c.bmp", picture.T.copy())):
        files.append(tmp_path / name)
        cv2.imwrite(str(files[-1]), image)
    expected = predict_files(predictor, files, tmp_path / "out")
    answers = score_images(predictor, [path.read_bytes() for path in files])
    np.testing.assert_allclose(answers["score"].astype(float), expected["score"], rtol=0, atol=1e-6)


def test_heatmap_is_drawn_at_most_at_heatmap_max_side(predictor: Predictor, picture: np.ndarray) -> None:
    answers = score_images(predictor, [png(picture), png(picture[:40, :30])], True, limits=limits(heatmap_max_side=64))
    shapes = [
        cv2.imdecode(np.frombuffer(base64.b64decode(h), np.uint8), cv2.IMREAD_COLOR).shape for h in answers["heatmap"]
    ]
    assert shapes == [(48, 64, 3), (40, 30, 3)]  # 96 x 128 shrunk to a longer side of 64; a small one as it is


def test_a_worker_decodes_one_image_at_a_time_over_all_its_request_threads(
    predictor: Predictor, picture: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    active, most = 0, 0
    lock = threading.Lock()
    decode = images.decode_gray

    def watched(*args: object, **kwargs: object) -> np.ndarray:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.02)  # long enough for the other threads to arrive
        try:
            return decode(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(serving, "decode_gray", watched)
    shared = limits(concurrent_images=1)
    tables: list[pd.DataFrame] = []
    threads = [
        threading.Thread(target=lambda: tables.append(score_images(predictor, [png(picture)] * 3, limits=shared)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(tables) == 4 and all((table["error"] == "").all() for table in tables)
    assert most == 1


def test_header_reading_leaves_pillows_global_limit_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old header check switched Image.MAX_IMAGE_PIXELS off around each parse, which raced
    between request threads; now the format's parser is called directly, the global untouched."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    seen = []
    parser = images.HEADER_PARSERS["PNG"]

    def spy(*args: object) -> Image.Image:
        seen.append(Image.MAX_IMAGE_PIXELS)
        return parser(*args)

    monkeypatch.setitem(images.HEADER_PARSERS, "PNG", spy)
    header = images.read_header(png_header_only(200_000, 100_000))
    assert header == images.ImageHeader("PNG", 200_000, 100_000)  # beyond Pillow's limit, still read
    assert seen == [1_000] and Image.MAX_IMAGE_PIXELS == 1_000


# --- the params -----------------------------------------------------------------------------------


def test_serving_params_are_validated_naming_the_key() -> None:
    assert parse_section("serving", {}) == ServingParams()
    with pytest.raises(ConfigError, match="serving.formats.0: Input should be 'png', 'jpeg', 'bmp' or 'tiff'"):
        parse_section("serving", {"formats": ["hdr"]})
    with pytest.raises(ConfigError, match=r"serving.max_request_pixels \(10\) is below serving.max_image_pixels"):
        parse_section("serving", {"max_image_pixels": 100, "max_request_pixels": 10})
    with pytest.raises(ConfigError, match="unknown key 'serving.heatmap_size'"):
        parse_section("serving", {"heatmap_size": 10})


def test_params_yaml_documents_the_defaults() -> None:
    written = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["serving"]
    assert ServingParams.model_validate(written) == ServingParams()


def test_a_logged_model_without_serving_settings_takes_the_defaults() -> None:
    assert ServingLimits.of({"threshold": 0.5}).params == ServingParams()
    assert ServingLimits.of({"serving": {"heatmap_max_side": 256}}).params.heatmap_max_side == 256
    with pytest.raises(InputError, match="model_config 'serving' is not valid"):
        ServingLimits.of({"serving": {"formats": ["gif"]}})


# --- corrupt JPEGs --------------------------------------------------------------------------------


def test_a_jpeg_with_garbled_scan_data_is_an_error_not_a_score(picture: np.ndarray, predictor: Predictor) -> None:
    data = corrupt_jpeg(picture)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) is not None  # OpenCV takes it
    with pytest.raises(DataError, match=r"scan.jpg is a corrupt JPEG \(Corrupt JPEG data.*replace it with an intact"):
        images.decode_gray(data, "scan.jpg")
    table = score_images(predictor, [data, cv2.imencode(".jpg", picture)[1].tobytes()])
    assert "image 0 is a corrupt JPEG" in table["error"][0] and table["score"][0] is None
    assert table["error"][1] == "" and table["score"][1] is not None


def test_predict_gives_a_corrupt_jpeg_its_error_row(picture: np.ndarray, predictor: Predictor, tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(corrupt_jpeg(picture))
    cv2.imwrite(str(tmp_path / "good.jpg"), picture)
    table = predict_files(predictor, [tmp_path / "bad.jpg", tmp_path / "good.jpg"], tmp_path / "out")
    assert f"{tmp_path / 'bad.jpg'} is a corrupt JPEG" in table["error"][0] and np.isnan(table["score"][0])
    assert table["error"][1] == "" and table["decision"][1] in ("defect", "ok")


def test_prepare_stops_at_a_corrupt_jpeg_naming_the_file(workdir: Path, picture: np.ndarray) -> None:
    from stages import prepare

    for kind in ("good", "defect"):
        (workdir / "images" / kind).mkdir(parents=True)
        for k in range(4):
            cv2.imwrite(str(workdir / "images" / kind / f"{kind}{k}.jpg"), np.roll(picture, 7 * k, axis=1))
    (workdir / "images" / "defect" / "defect2.jpg").write_bytes(corrupt_jpeg(picture))
    prepare_params = {"dataset": "folder", "path": "images", "width": 16, "height": 16, "folds": 2}
    (workdir / "params.yaml").write_text(yaml.safe_dump({"prepare": prepare_params}))
    with pytest.raises(DataError, match=r"defect2.jpg is a corrupt JPEG"):
        prepare.main()
    assert not (workdir / "data/prepared").exists()


# --- a bounded load test on the loopback ----------------------------------------------------------

CEILING = 2 * 1024**3  # bytes: a worker's peak resident memory under any mix within the default limits
SIDE = 7000  # 49 megapixels: just under the default serving.max_image_pixels
PROGRESSIVE_444 = (
    cv2.IMWRITE_JPEG_PROGRESSIVE,
    1,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
    cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
)


def hostile_files() -> dict[str, bytes]:
    """Small files that decode to the most memory the default limits let through, and bombs."""
    rng = np.random.default_rng(0)
    colour = np.kron(rng.integers(0, 255, (110, 110, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8))
    colour = colour[:SIDE, :SIDE]
    return {
        "png": png(np.zeros((SIDE, SIDE), np.uint8)),  # about 58 kB
        # Progressive, without chroma subsampling: libjpeg holds every coefficient of the image
        # (2 bytes each, 3 a pixel): the most memory per pixel of the accepted formats.
        "jpeg": cv2.imencode(".jpg", colour, list(PROGRESSIVE_444))[1].tobytes(),
        "tiff": cv2.imencode(".tif", colour)[1].tobytes(),
        "png_bomb": png_header_only(12000, 12000),
        "hdr": radiance_hdr(12000, 12000),
    }


def load_requests(files: dict[str, bytes], good: list[bytes]) -> list[tuple[str, bytes]]:
    """(kind, body) of every request, shuffled with a fixed seed: 9 hostile, 6 good."""
    from pipeline.deployment.serving import request_body

    requests = [("attack", request_body([files["png"]] * 4, heatmap=True)) for _ in range(4)]
    requests.append(("over_budget", request_body([files["png"]] * 5)))  # 5 x 49 MP > 200 MP
    requests += [("bombs", request_body([files["png_bomb"], files["hdr"], png_header_only(200_000, 100_000)]))] * 2
    requests.append(("formats", request_body([files["jpeg"], files["tiff"]], heatmap=True)))
    requests.append(
        ("corrupt", request_body([good[1][: len(good[1]) // 2], corrupt_jpeg(np.full((64, 64), 9, np.uint8))]))
    )
    requests += [("good", request_body(good))] * 6
    order = np.random.default_rng(0).permutation(len(requests))
    return [requests[k] for k in order]


def peak_rss(pid: int) -> int:
    """The kernel's high-water mark of the process's resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def post(url: str, body: bytes) -> list[dict]:
    import json
    import urllib.request

    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=240) as answer:
        return json.loads(answer.read())["predictions"]


def check_load_answer(kind: str, answer: list[dict], expected: pd.DataFrame) -> None:
    errors = [row["error"] for row in answer]
    if kind == "good":
        assert errors == ["", ""]
        np.testing.assert_allclose([row["score"] for row in answer], expected["score"].astype(float), atol=1e-6)
    elif kind == "attack":
        assert errors == [""] * 4 and all(row["heatmap"] for row in answer)
    elif kind == "over_budget":
        assert errors[:4] == [""] * 4 and "serving.max_request_pixels" in errors[4]
    elif kind == "bombs":
        assert "serving.max_image_pixels" in errors[0] and "accepted format" in errors[1]
        assert "serving.max_image_pixels" in errors[2]
    elif kind == "formats":
        assert errors == ["", ""] and all(row["heatmap"] for row in answer)
    else:
        assert "truncated" in errors[0] and "corrupt JPEG" in errors[1]


@pytest.mark.slow  # logging the model, starting the server and decoding about 1.2 gigapixels: a few minutes
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the worker's peak memory from /proc")
def test_worker_memory_stays_under_its_ceiling_while_hostile_and_good_requests_mix(
    tiny, predictor: Predictor, picture: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    from pipeline.deployment.serving import log_scoring_model, served

    paths, _ = tiny
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "240")  # queued requests wait their turn
    log_scoring_model(paths["baseline"], 0.5, "load", "load-test", aliases=["champion"])
    good = [png(picture), cv2.imencode(".jpg", 255 - picture)[1].tobytes()]
    expected = score_images(predictor, good)
    requests = load_requests(hostile_files(), good)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with served("models:/load-test@champion", port) as url:
        post(url, serving.request_body(good))  # warm up: the model's first forward
        worker = max(psutil.Process().children(recursive=True), key=lambda p: p.memory_info().rss)
        idle = worker.memory_info().rss
        started = time.monotonic()
        with ThreadPoolExecutor(4) as clients:  # 4 requests in flight, as in the measurement
            answers = list(clients.map(lambda request: post(url, request[1]), requests, timeout=600))
        seconds = time.monotonic() - started
        peak = peak_rss(worker.pid)
    for (kind, _), answer in zip(requests, answers):
        check_load_answer(kind, answer, expected)
    print(
        f"\nload test: {len(requests)} requests (4 in flight) in {seconds:.0f} s; worker idle "
        f"{idle / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, ceiling {CEILING / 2**20:.0f} MiB"
    )
    assert peak < CEILING


@pytest.mark.slow  # logging a scoring model: about 15 s
def test_the_release_carries_its_serving_params_into_the_served_model(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    import mlflow

    from pipeline.deployment.release import register_release

    paths, _ = tiny
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = ServingParams(max_image_pixels=1_000, max_request_pixels=5_000, heatmap_max_side=64, formats=["png"])
    point = {"threshold": 0.4, "operating_point": "zero_misses"}
    run = SimpleNamespace(pipeline_id="test")
    try:
        version = register_release(run, {"baseline": paths["baseline"]}, "baseline", "limited", point, params)
    finally:
        mlflow.end_run()
    model = mlflow.pyfunc.load_model(f"models:/limited/{version}")
    assert model.unwrap_python_model().limits.params == params
    answers = model.predict(
        pd.DataFrame({"image": [png(np.zeros((40, 30), np.uint8)), png(np.zeros((40, 25), np.uint8))]})
    )
    assert "limit of 1,000 (serving.max_image_pixels)" in answers["error"][0] and answers["error"][1] == ""
