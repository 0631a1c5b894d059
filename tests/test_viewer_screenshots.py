"""What a radiologist sees of lungnode's results in a real viewer: a real Orthanc with Debian's Web Viewer
plugin (orthanc-webviewer) routes a phantom CT study to a real node; once the results are back, chromium
(driven by playwright) opens Orthanc Explorer's study page, which must list the AI series beside the CT,
and the Web Viewer, which must show the first key image with its box and the original slice through N1.

The screenshots land in var/screenshots/orthanc_*.png; the README shows copies of them."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from lungnode.peers import NodeProcess, OrthancServer, free_port, wait_for
from tests.conftest import need_tool
from tests.test_end_to_end import GSPS_CLASS, phantom_study, wait_done
from tests.test_web import LONG, SCREENSHOTS, browser  # noqa: F401  (browser: the chromium fixture)

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips with the reason
    expect = None

WEBVIEWER = Path("/usr/share/orthanc/plugins/libOrthancWebViewer.so")  # where Debian's orthanc-webviewer puts it
VIEWPORT = {"width": 1280, "height": 800}
# The result series as reports/build.py describes them (version 1: a study processed once).
AI_SERIES = {"SR": "lungnode AI nodules v1", "OT": "lungnode AI key images v1", "PR": "lungnode AI nodule marks v1",
             "SEG": "lungnode AI nodule masks v1", "KO": "lungnode AI key objects v1"}


@pytest.fixture(scope="module")
def pacs_with_viewer(tmp_path_factory):
    """Orthanc with the Web Viewer plugin, and a node it routes to and that sends its results back."""
    need_tool("Orthanc")
    if not WEBVIEWER.exists():
        pytest.skip(f"the Orthanc Web Viewer plugin is not installed ({WEBVIEWER}): apt-get install -y orthanc-webviewer")
    work = tmp_path_factory.mktemp("viewer")
    pacs_port = free_port()
    node = NodeProcess(work / "node", stable_seconds=2, pacs=f"ORTHANC@127.0.0.1:{pacs_port}",
                       allowed_callers="ORTHANC")
    with OrthancServer(work / "orthanc", dicom_port=pacs_port, plugins=[str(WEBVIEWER)],
                       modalities={"lungnode": ("LUNGNODE", "127.0.0.1", node.dicom_port)}) as orthanc:
        node.start()
        try:
            yield orthanc, node
        finally:
            node.stop()


def open_in_viewer(page, orthanc: OrthancServer, series_id: str, index: int = 0) -> None:
    """Open a series in the Web Viewer and scroll to slice `index` with the mouse wheel, one slice at a
    time as a user does (each step waits for its image, so the last one shown is the one asked for)."""
    slices = requests.get(f"{orthanc.url}/web-viewer/series/{series_id}", timeout=60).json()["Slices"]
    page.goto(f"{orthanc.url}/web-viewer/app/viewer.html?series={series_id}")
    shown = "id => cornerstone.getImage(document.getElementById('dicomImage')).imageId === id"
    page.wait_for_function(shown, arg=slices[0], timeout=LONG)
    page.mouse.move(VIEWPORT["width"] / 2, VIEWPORT["height"] / 2)
    for i in range(1, index + 1):
        page.mouse.wheel(0, 100)
        page.wait_for_function(shown, arg=slices[i], timeout=LONG)


def viewer_pixels(page) -> np.ndarray:
    """The viewer's image canvas as RGB, without the text the page lays over it."""
    url = page.evaluate("() => document.querySelector('#dicomImage canvas').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=int)


def red_pixels(rgb: np.ndarray) -> int:
    """Pixels of the boxes' red (255, 40, 40 on the key images); a grey CT has none."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 150) & (r - g > 100) & (r - b > 100)).sum())


def n1_slice_index(orthanc: OrthancServer, series: dict[str, dict]) -> int:
    """Where in the Web Viewer's CT series the slice lies that the presentation state marks N1 on."""
    (gsps,) = (pydicom.dcmread(io.BytesIO(raw)) for raw in orthanc.instance_files(series["PR"]))
    assert gsps.SOPClassUID == GSPS_CLASS
    (n1,) = (a for a in gsps.GraphicAnnotationSequence if a.TextObjectSequence[0].UnformattedTextValue.startswith("N1 "))
    uid = n1.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    hits = requests.post(f"{orthanc.url}/tools/lookup", data=uid, timeout=10).json()
    (instance,) = (h["ID"] for h in hits if h["Type"] == "Instance")
    slices = requests.get(f"{orthanc.url}/web-viewer/series/{series['CT']['ID']}", timeout=60).json()["Slices"]
    return slices.index(f"{instance}_0")


def test_orthanc_lists_the_ai_series_and_its_web_viewer_shows_key_image_and_ct(pacs_with_viewer, browser,  # noqa: F811
                                                                                tmp_path):
    orthanc, node = pacs_with_viewer
    _, files = phantom_study(tmp_path, 90001, "VIEWER-1")
    (study_id,) = orthanc.upload(files)
    ct = pydicom.dcmread(files[0], stop_before_pixels=True)
    orthanc.send_to_modality("lungnode", study_id)  # the PACS routing rule
    assert wait_done(node, ct.StudyInstanceUID)["state"] == "done"
    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.series_of_study(ct.StudyInstanceUID)}
    assert set(series) == {"CT", *AI_SERIES}, "the CT and one series of each result kind, in one study"
    # Else the viewer shows its "still receiving images for this series" throbber on the key images.
    wait_for(lambda: all(requests.get(f"{orthanc.url}/series/{s['ID']}", timeout=10).json()["IsStable"]
                         for s in series.values()), 60, "Orthanc to see the series as complete")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport=VIEWPORT)

    page.goto(f"{orthanc.url}/app/explorer.html#study?uuid={study_id}")
    listed = page.locator("#list-series")
    for description in (ct.SeriesDescription, *AI_SERIES.values()):
        expect(listed).to_contain_text(description, timeout=30_000)
    page.screenshot(path=SCREENSHOTS / "orthanc_study.png")

    open_in_viewer(page, orthanc, series["OT"]["ID"])
    expect(page.locator("#topright")).to_contain_text(AI_SERIES["OT"])
    key_image = viewer_pixels(page)
    assert key_image.std() > 20, "the key image is drawn, not a blank canvas"
    assert red_pixels(key_image) > 100, "the key image shows its red box and label"
    page.screenshot(path=SCREENSHOTS / "orthanc_key_image.png")

    open_in_viewer(page, orthanc, series["CT"]["ID"], n1_slice_index(orthanc, series))
    expect(page.locator("#topright")).to_contain_text(ct.SeriesDescription)
    slice_n1 = viewer_pixels(page)
    assert slice_n1.std() > 20 and len(np.unique(slice_n1[..., 0])) > 50, "a CT slice with its grey levels"
    page.screenshot(path=SCREENSHOTS / "orthanc_ct.png")
    page.close()
