"""Pull label objects (SEG, SR) and the CT series they annotate from an Orthanc PACS over REST.

Only what labels need crosses the network: a study's SEG and SR series first, then the series those
objects reference. Files land as ``<out>/<SeriesInstanceUID>/<Orthanc instance id>.dcm``; files already
there are not fetched again, so an interrupted pull resumes. Credentials, if the server needs them,
go in the URL (``http://user:password@host:8042``), as ``requests`` reads them from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm import tqdm

from lungnode.training.importers.dicom_objects import referenced_series

LABEL_MODALITIES = ("SEG", "SR")


@dataclass
class PullReport:
    studies: int = 0  # studies holding a SEG or SR
    label_series: int = 0
    image_series: int = 0
    files: int = 0  # downloaded now (not already present)


class OrthancClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()

    def get(self, path: str):
        r = self.http.get(f"{self.url}{path}", timeout=self.timeout)
        r.raise_for_status()
        return r

    def study_ids(self, study_uids: list[str] | None) -> list[str]:
        """Orthanc ids of the given studies (by StudyInstanceUID), or of every study."""
        if not study_uids:
            return self.get("/studies").json()
        ids = []
        for uid in study_uids:
            r = self.http.post(f"{self.url}/tools/lookup", data=uid, timeout=self.timeout)
            r.raise_for_status()
            ids += [h["ID"] for h in r.json() if h["Type"] == "Study"]
        return ids

    def download_series(self, series: dict, out_dir: Path) -> tuple[list[Path], int]:
        """(all files of the series, how many were fetched now)."""
        folder = out_dir / series["MainDicomTags"]["SeriesInstanceUID"]
        folder.mkdir(parents=True, exist_ok=True)
        paths, fetched = [], 0
        for instance in series["Instances"]:
            path = folder / f"{instance}.dcm"
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(self.get(f"/instances/{instance}/file").content)
                tmp.replace(path)
                fetched += 1
            paths.append(path)
        return paths, fetched


def pull(url: str, out_dir: Path, *, study_uids: list[str] | None = None, progress: bool = True) -> PullReport:
    client = OrthancClient(url)
    out_dir = Path(out_dir)
    report = PullReport()
    for study in tqdm(client.study_ids(study_uids), desc="Orthanc studies", unit="study", disable=not progress):
        series = client.get(f"/studies/{study}/series").json()
        labels = [s for s in series if s["MainDicomTags"].get("Modality") in LABEL_MODALITIES]
        if not labels:
            continue
        report.studies += 1
        wanted: set[str] = set()
        for s in labels:
            paths, fetched = client.download_series(s, out_dir)
            report.label_series += 1
            report.files += fetched
            for p in paths:
                wanted.update(referenced_series(p))
        for s in series:
            if s not in labels and s["MainDicomTags"].get("SeriesInstanceUID") in wanted:
                report.files += client.download_series(s, out_dir)[1]
                report.image_series += 1
    return report
