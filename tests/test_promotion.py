"""Promotion on the registered reference set: the paired bootstrap, `train reference` and its digest,
`train promote`'s refusals, `models list` and `models rollback`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lungnode.cli import main
from lungnode.models.registry import MODELS_DIR, REGISTRY_FILE
from lungnode.models.registry_file import (
    OperatingPointRecord, PromotionRecord, ReferenceRecord, Registry, RollbackRecord,
)
from lungnode.training.froc import Annotation, Candidate, PairedComparison, paired_cpm_difference
from lungnode.training.reference_set import source_sha256
from lungnode.training.synth import GENERATOR_VERSION

HELD_OUT = ["990001", "990002"]  # two phantoms: evaluation on CPU is slow
V1 = "lungnode-retina-cpu-v1"  # the smallest shipped model: one view, no second stage


# ---------------------------------------------------------------- the paired bootstrap, no network


def _scans(n: int) -> tuple[list[str], list[Annotation]]:
    uids = [f"scan-{i}" for i in range(n)]
    return uids, [Annotation(uid, (0.0, 0.0, 0.0), 10.0) for uid in uids]


def _hit(uid: str) -> Candidate:
    return Candidate(uid, (1.0, 0.0, 0.0), 0.9)


def _miss(uid: str) -> Candidate:
    return Candidate(uid, (60.0, 0.0, 0.0), 0.9)  # a false positive


def test_identical_models_are_never_accepted():
    uids, nodules = _scans(20)
    cands = [_hit(u) if i % 2 else _miss(u) for i, u in enumerate(uids)]
    c = paired_cpm_difference(cands, cands, nodules, [], uids, resamples=500)
    assert c.cpm_a == c.cpm_b and c.difference == 0.0
    assert c.difference_ci == (0.0, 0.0)
    assert not c.a_is_better


def test_a_model_better_on_every_scan_is_accepted():
    uids, nodules = _scans(10)
    c = paired_cpm_difference([_hit(u) for u in uids], [_miss(u) for u in uids], nodules, [], uids, resamples=500)
    assert c.cpm_a == 1.0 and c.cpm_b == 0.0
    assert c.difference_ci[0] > 0 and c.a_is_better
    reverse = paired_cpm_difference([_miss(u) for u in uids], [_hit(u) for u in uids], nodules, [], uids, resamples=500)
    assert reverse.difference_ci[1] < 0 and not reverse.a_is_better


def test_a_gain_on_one_scan_of_twenty_is_within_the_noise():
    """A higher CPM alone is no win: resamples that leave that scan out show no difference."""
    uids, nodules = _scans(20)
    a = [_hit(u) for u in uids]
    b = [_miss(uids[0])] + [_hit(u) for u in uids[1:]]
    c = paired_cpm_difference(a, b, nodules, [], uids, resamples=1000)
    assert c.cpm_a > c.cpm_b
    assert c.difference_ci[0] <= 0 < c.difference_ci[1]
    assert not c.a_is_better


def test_the_paired_bootstrap_is_deterministic_with_its_seed():
    uids, nodules = _scans(15)
    a = [_hit(u) if i % 3 else _miss(u) for i, u in enumerate(uids)]
    b = [_hit(u) if i % 2 else _miss(u) for i, u in enumerate(uids)]
    first = paired_cpm_difference(a, b, nodules, [], uids, resamples=300, seed=7)
    assert paired_cpm_difference(a, b, nodules, [], uids, resamples=300, seed=7) == first
    assert first.resamples == 300 and first.confidence == 0.95


def test_a_difference_of_rounding_is_no_win():
    assert not PairedComparison(0.613095238095238, 0.6130952380952381, (1e-16, 2e-16), 1000, 0.95).a_is_better


# ---------------------------------------------------------------- the reference set


SITE_DEFAULT = "lungnode-retina-cpu-v16"


def _registry_dir(tmp_path: Path, default: str | None = None) -> Path:
    """A site's registry folder before it registered a reference set: the shipped history up to v16's
    promotion (v16 over v15, v15 over v11, ...), v16 the default unless ``default`` is given."""
    folder = tmp_path / "registry"
    folder.mkdir()
    Registry(default=default or SITE_DEFAULT, history=site_history()).save(folder)
    return folder


def site_history() -> list:
    """The history a fresh `_registry_dir` starts with."""
    shipped = Registry.load(MODELS_DIR, "none").history
    return shipped[:max(i for i, e in enumerate(shipped)
                        if isinstance(e, PromotionRecord) and e.accepted and e.candidate == SITE_DEFAULT) + 1]


def _registry(folder: Path) -> Registry:
    return Registry.load(folder, "none")


def test_registering_a_phantom_reference_set_records_its_digest(tmp_path, capsys):
    folder = _registry_dir(tmp_path)
    shipped = _registry(folder)
    assert main(["train", "reference", "--phantoms", HELD_OUT[0], HELD_OUT[1], "--models-dir", str(folder)]) == 0
    assert "registered the reference set" in capsys.readouterr().out
    registry = _registry(folder)
    ref = registry.reference_set
    assert ref.generator_version == GENERATOR_VERSION and f"generator {GENERATOR_VERSION}" in ref.description
    assert ref.arguments == ["--phantoms", *HELD_OUT] and len(ref.digest) == 64
    assert [p.name for p in ref.parts] == [f"phantom generator {GENERATOR_VERSION}", "phantom seeds 990001-990002"]
    assert isinstance(registry.history[-1], ReferenceRecord) and registry.history[-1].digest == ref.digest
    assert registry.history[:-1] == shipped.history  # earlier entries as they were
    raw = json.loads((folder / REGISTRY_FILE).read_text())
    assert raw["history"][0]["candidate_cpm"] == json.loads((MODELS_DIR / REGISTRY_FILE).read_text())["history"][0]["candidate_cpm"]
    assert raw["history"][0]["reference_digest"] is None  # decided before any reference set

    # the same set again changes nothing; another needs --replace and a reason
    assert main(["train", "reference", "--phantoms", HELD_OUT[0], HELD_OUT[1], "--models-dir", str(folder)]) == 0
    assert "already registered" in capsys.readouterr().out
    other = ["train", "reference", "--phantoms", "990003", "990004", "--models-dir", str(folder)]
    assert main(other) == 2
    assert "--replace --reason" in capsys.readouterr().err
    assert main([*other, "--replace"]) == 2
    assert main([*other, "--replace", "--reason", "more phantoms"]) == 0
    registry = _registry(folder)
    last = registry.history[-1]
    assert last.reason == "more phantoms" and last.replaced_digest == ref.digest
    assert registry.reference_set.digest == last.digest != ref.digest


def test_promotion_refuses_without_a_reference_set(tmp_path, capsys):
    folder = _registry_dir(tmp_path)
    assert main(["train", "promote", str(MODELS_DIR / f"{V1}.json"), "--models-dir", str(folder)]) == 2
    assert "lungnode train reference" in capsys.readouterr().err
    assert _registry(folder).history == site_history()


@pytest.fixture()
def datalist(tmp_path) -> Path:
    """A datalist whose images are never read here: only their bytes are hashed."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.nii.gz").write_bytes(b"image a")
    (data / "b.mhd").write_text("NDims = 3\nElementDataFile = b.raw\n")
    (data / "b.raw").write_bytes(b"voxels of b")
    items = [{"image": name, "box": [[0, 0, 0, 8, 8, 8]]} for name in ("a.nii.gz", "b.mhd")]
    (data / "datalist.json").write_text(json.dumps({"validation": items}))
    return data / "datalist.json"


def test_promotion_refuses_when_the_reference_data_changed(tmp_path, datalist, capsys):
    folder = _registry_dir(tmp_path)
    assert main(["train", "reference", "--datalist", str(datalist), "--models-dir", str(folder)]) == 0
    assert [p.name.split()[0] for p in _registry(folder).reference_set.parts] == ["datalist", "datalist", "image", "image"]
    promote = ["train", "promote", str(MODELS_DIR / f"{V1}.json"), "--models-dir", str(folder)]

    (datalist.parent / "b.raw").write_bytes(b"other voxels")  # the .mhd's data file
    assert main(promote) == 2
    err = capsys.readouterr().err
    assert f"image {datalist.parent / 'b.mhd'}: changed" in err and "--replace --reason" in err

    (datalist.parent / "b.raw").write_bytes(b"voxels of b")
    datalist.write_text(datalist.read_text().replace("8, 8, 8", "9, 9, 9"))
    assert main(promote) == 2
    assert f"datalist {datalist}: changed" in capsys.readouterr().err
    assert len(_registry(folder).history) == len(site_history()) + 1  # the registration only


def test_a_series_folder_digest_follows_its_files(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"one")
    first = source_sha256(series)
    (series / ".hidden").write_bytes(b"not read by the loader")
    assert source_sha256(series) == first
    (series / "2.dcm").write_bytes(b"two")
    assert source_sha256(series) != first
    assert source_sha256(tmp_path / "gone") == "missing"


def test_promotion_refuses_a_model_equal_to_the_default(tmp_path, capsys):
    folder = _registry_dir(tmp_path, default=V1)
    history = len(_registry(folder).history)
    assert main(["train", "promote", str(MODELS_DIR / f"{V1}.json"), "--models-dir", str(folder)]) == 1
    assert "nothing to promote" in capsys.readouterr().err
    assert len(_registry(folder).history) == history and _registry(folder).default == V1


def _at_threshold(tmp_path: Path, threshold: float, tune_scans: list[str]) -> Path:
    """V1's networks at another score threshold, as `train retune --max-fp-per-scan` writes them."""
    out = tmp_path / "candidate"
    out.mkdir()
    card = json.loads((MODELS_DIR / f"{V1}.json").read_text())
    for key, suffix in (("onnx_file", ".onnx"), ("state_dict_file", ".pt")):
        shutil.copy(MODELS_DIR / card[key], out / f"v1-op{suffix}")
        card[key] = f"v1-op{suffix}"
    card["name"], card["inference"]["score_threshold"], card["data"]["tune_scans"] = "v1-op", threshold, tune_scans
    card["metrics"] = {"score_threshold": threshold, "false_positives_per_scan": 0.5, "sensitivity": 0.8}
    (out / "v1-op.json").write_text(json.dumps(card))
    return out / "v1-op.json"


def test_an_operating_point_chosen_on_real_scans_is_promoted_without_a_reference_set(tmp_path, capsys):
    """The same networks at another threshold rank alike (the same CPM): the reference set cannot judge it, the
    real scans it was chosen on are named and recorded, and rollback returns to the old threshold."""
    folder = _registry_dir(tmp_path, default=V1)
    assert main(["train", "promote", str(_at_threshold(tmp_path, 0.9, ["1.2.3.4"])), "--models-dir", str(folder)]) == 0
    assert "score threshold 0.9" in capsys.readouterr().out
    registry = _registry(folder)
    entry = registry.history[-1]
    assert registry.default == "v1-op" and isinstance(entry, OperatingPointRecord)
    assert (entry.threshold, entry.current, entry.tune_scans) == (0.9, V1, ["1.2.3.4"])
    assert (folder / "v1-op.json").is_file() and registry.previous_default() == V1
    assert main(["models", "rollback", "--reason", "too few marks", "--models-dir", str(folder)]) == 0
    assert _registry(folder).default == V1


def test_an_operating_point_chosen_on_phantoms_is_refused(tmp_path, capsys):
    folder = _registry_dir(tmp_path, default=V1)
    assert main(["train", "promote", str(_at_threshold(tmp_path, 0.9, [])), "--models-dir", str(folder)]) == 1
    assert "chosen on phantoms" in capsys.readouterr().err and _registry(folder).default == V1


# ---------------------------------------------------------------- models list and rollback


def test_models_list_marks_the_default_and_the_comparable_history(tmp_path, capsys):
    folder = _registry_dir(tmp_path)
    for name in ("lungnode-retina-cpu-v15", "lungnode-retina-cpu-v16"):
        shutil.copy(MODELS_DIR / f"{name}.json", folder)
    assert main(["train", "reference", "--phantoms", HELD_OUT[0], HELD_OUT[1], "--models-dir", str(folder)]) == 0
    registry = _registry(folder)
    registry.history.append(PromotionRecord(
        candidate="lungnode-retina-cpu-v16", current="lungnode-retina-cpu-v15", candidate_cpm=0.91, current_cpm=0.88,
        eval_set=registry.reference_set.description, accepted=True, at="2027-01-01T00:00:00+00:00",
        reference_digest=registry.reference_set.digest, difference_ci=(0.01, 0.05), resamples=1000))
    registry.save(folder)
    capsys.readouterr()

    assert main(["models", "list", "--models-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out.splitlines()
            if "lungnode-retina-cpu-v1" in line and "  " in line and not line.startswith("20")}
    assert rows["lungnode-retina-cpu-v16"].startswith("*") and not rows["lungnode-retina-cpu-v15"].startswith("*")
    assert "yes (16 views)" in rows["lungnode-retina-cpu-v16"] and "0.9100" in rows["lungnode-retina-cpu-v16"]
    assert "0.8800" in rows["lungnode-retina-cpu-v15"]
    history = [line for line in out.splitlines() if line.startswith("20")]
    assert sum("not comparable (other set)" in line for line in history) == len(site_history())
    assert "[reference set:" in history[-1] and "difference CI +0.0100 to +0.0500" in history[-1]
    assert "reference current set" in history[-2]


def test_rollback_restores_the_previous_default_and_records_why(tmp_path, capsys):
    folder = _registry_dir(tmp_path)  # shipped history: v16 over v15, v15 over v11
    assert main(["models", "rollback", "--reason", "too many false positives", "--models-dir", str(folder)]) == 0
    registry = _registry(folder)
    assert registry.default == "lungnode-retina-cpu-v15"
    last = registry.history[-1]
    assert isinstance(last, RollbackRecord) and last.previous == "lungnode-retina-cpu-v16"
    assert last.reason == "too many false positives"
    # a second rollback goes one more promotion back, not back to v16
    assert main(["models", "rollback", "--reason", "again", "--models-dir", str(folder)]) == 0
    assert _registry(folder).default == "lungnode-retina-cpu-v11"
    assert main(["models", "rollback", "--to", "lungnode-retina-cpu-v8", "--reason", "site test",
                 "--models-dir", str(folder)]) == 0
    assert _registry(folder).default == "lungnode-retina-cpu-v8"
    capsys.readouterr()
    assert main(["models", "rollback", "--to", "no-such-model", "--reason", "x", "--models-dir", str(folder)]) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "rollback", "--models-dir", str(folder)])  # --reason is required


def test_models_commands_do_not_load_pytorch(tmp_path):
    import subprocess
    import sys

    folder = _registry_dir(tmp_path)
    code = ("import sys; from lungnode.cli import main; "
            f"main(['models', 'list', '--models-dir', {str(folder)!r}]); "
            f"main(['models', 'rollback', '--reason', 'x', '--models-dir', {str(folder)!r}]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False"
