"""Copy labelled images out of the hospital de-identified: DICOM PS3.15 Annex E, Basic Application
Level Confidentiality Profile.

Why our own table: dicognito and deid were checked (2025) and neither applies this profile (dicognito
swaps names/IDs/dates/UIDs for realistic fakes but keeps descriptions, comments, ages and private
tags; deid's default recipe drops every UID, which would break the series). The profile's actions,
applied recursively (sequences included):

* U: every UID except SOP class, transfer syntax and other standard (1.2.840.10008.*) UIDs is
  replaced by a keyed hash (HMAC-SHA256 -> "2.25.<128 bits>"): the same original UID always gives the
  same new one, so a series keeps one Frame of Reference and the boxes (world mm) stay valid, while
  nobody without the key can map UIDs back.
* Z: type 2 identifying attributes are kept empty; PatientID becomes a keyed pseudonym, so the scans of
  one patient still share an ID (patient-level train/validation/test splits).
* X: the profile's other identifying attributes are removed, and so are every other person name,
  date and time (dates are not kept: no "Retain Longitudinal" option), private attributes, overlays
  and curves.
* Geometry, pixel and acquisition attributes not in the profile (spacing, position, orientation,
  rescale, kVp, kernel, manufacturer) are kept, as are the pixel data.

Images flagged BurnedInAnnotation YES are refused: text in the pixels cannot be removed here. Volume
files (.mhd, .nii.gz) are rewritten without their metadata under a keyed-hash name.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from tqdm import tqdm

from lungnode.training.importers.datalist import LabeledScan
from lungnode.training.importers.image_index import ImageIndex, volume_stem

METHOD = "PS3.15 E.1 Basic Profile, keyed-hash UIDs (lungnode)"

# Z: present but empty (type 2 in the CT, SEG and SR IODs)
_EMPTY = frozenset({
    "AccessionNumber", "ContentCreatorName", "ContentDate", "ContentTime", "ContrastBolusAgent",
    "FillerOrderNumberImagingServiceRequest", "PatientBirthDate", "PatientName", "PatientSex",
    "PlacerOrderNumberImagingServiceRequest", "ReferringPhysicianName", "StudyDate", "StudyID", "StudyTime",
})
# X: removed (person names, dates and times not listed in _EMPTY are removed as well)
_REMOVE = frozenset({
    "AcquisitionComments", "AcquisitionContextSequence", "AcquisitionDeviceProcessingDescription",
    "AcquisitionProtocolDescription", "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID",
    "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription", "Allergies", "AuthorObserverSequence",
    "BranchOfService", "CassetteID", "CommentsOnThePerformedProcedureStep",
    "ConfidentialityConstraintOnPatientDataDescription", "ContentCreatorIdentificationCodeSequence",
    "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation", "CustodialOrganizationSequence",
    "DataSetTrailingPadding", "DerivationDescription", "DetectorID", "DeviceSerialNumber",
    "DigitalSignaturesSequence", "DischargeDiagnosisDescription", "DistributionAddress", "EthnicGroup",
    "FrameComments", "GantryID", "GeneratorID", "GraphicAnnotationSequence", "HumanPerformerOrganization",
    "IconImageSequence", "IdentifyingComments", "ImageComments", "ImagePresentationComments",
    "ImagingServiceRequestComments", "Impressions", "InstitutionAddress", "InstitutionCodeSequence",
    "InstitutionName", "InstitutionalDepartmentName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence",
    "InterpretationDiagnosisDescription", "InterpretationIDIssuer", "InterpretationText", "IssuerOfAdmissionID",
    "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "MACParametersSequence", "MedicalAlerts",
    "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence", "ModifiedImageDescription",
    "ModifyingDeviceID", "Occupation", "OperatorIdentificationSequence", "OrderCallbackPhoneNumber",
    "OrderEntererLocation", "OriginalAttributesSequence", "OtherPatientIDs", "OtherPatientIDsSequence",
    "ParticipantSequence", "PatientAddress", "PatientAge", "PatientComments", "PatientInstitutionResidence",
    "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence", "PatientReligiousPreference",
    "PatientSexNeutered", "PatientSize", "PatientState", "PatientTelecomInformation", "PatientTelephoneNumbers",
    "PatientTransportArrangements", "PatientWeight", "PerformedLocation", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence", "PerformingPhysicianIdentificationSequence",
    "PersonAddress", "PersonIdentificationCodeSequence", "PersonTelephoneNumbers",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence", "PlateID",
    "PreMedication", "PregnancyStatus", "ProtocolName", "ReasonForTheImagingServiceRequest",
    "ReasonForTheRequestedProcedure", "ReferencedPatientAliasSequence", "ReferencedPatientPhotoSequence",
    "ReferencedPatientSequence", "ReferencedPerformedProcedureStepSequence", "ReferencedStudySequence",
    "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence", "RequestAttributesSequence", "RequestedContrastAgent", "RequestedProcedureComments",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestedProcedureLocation", "RequestingService",
    "ResponsibleOrganization", "ResultsComments", "ResultsDistributionListSequence", "ResultsIDIssuer",
    "ScheduledHumanPerformersSequence", "ScheduledPatientInstitutionResidence",
    "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID", "ScheduledProcedureStepLocation", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName", "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "SeriesDescription", "ServiceEpisodeDescription",
    "ServiceEpisodeID", "SmokingStatus", "SourceApplicationEntityTitle", "SpecialNeeds", "StationName",
    "StudyComments", "StudyDescription", "StudyIDIssuer", "TextComments", "TextString", "TimezoneOffsetFromUTC",
    "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle", "VerifyingOrganization", "VisitComments",
})
_REMOVED_VRS = frozenset({"PN", "DA", "DT", "TM"})
_STANDARD_UID_ROOT = "1.2.840.10008."


class DeidentificationError(ValueError):
    """An image that cannot be de-identified safely (the message says why)."""


def load_key(path: Path) -> bytes:
    """The secret key of the keyed hashes; a new random one is written (mode 600) when missing.

    Keep it out of the shared data: with it, original UIDs can be checked against the new ones.
    The same key makes re-runs and later imports map UIDs and patients the same way."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


class Deidentifier:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """Keyed-hash replacement of a UID (standard UIDs are kept)."""
        uid = str(uid).strip()
        if not uid or uid.startswith(_STANDARD_UID_ROOT):
            return uid
        return "2.25." + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        return "ANON-" + self._digest("patient", patient_id).hex()[:16].upper()

    def _element(self, ds: Dataset, elem) -> None:
        group = elem.tag.group
        if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:  # curves, overlays
            del ds[elem.tag]
        elif elem.keyword in _EMPTY:
            elem.value = [] if elem.VR == "SQ" else ""
        elif elem.keyword in _REMOVE or elem.VR in _REMOVED_VRS:
            del ds[elem.tag]
        elif elem.VR == "UI" and elem.value and not elem.keyword.endswith("ClassUID") \
                and elem.keyword != "TransferSyntaxUID":
            elem.value = [self.uid(v) for v in elem.value] if elem.VM > 1 else self.uid(elem.value)

    def dataset(self, ds: Dataset) -> None:
        """De-identify one instance in place (see the module doc)."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentificationError("burned-in annotation in the pixels")
        patient_id = str(ds.get("PatientID", ""))
        ds.remove_private_tags()
        ds.walk(self._element)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = self.uid(meta.MediaStorageSOPInstanceUID)
        ds.PatientID = self.pseudonym(patient_id)
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "REMOVED"
        ds.DeidentificationMethod = METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = [code]

    def copy_scan(self, scan: LabeledScan, index: ImageIndex, out_dir: Path) -> LabeledScan:
        """Write the scan's image de-identified under out_dir; the returned scan points at the copy
        (new series UID and patient pseudonym, same boxes)."""
        new_uid = self.uid(scan.series_uid)
        if scan.image.is_file():
            return self._copy_volume(scan, out_dir, new_uid)
        series = index.series[scan.series_uid]
        folder = Path(out_dir) / new_uid
        folder.mkdir(parents=True, exist_ok=True)
        for inst in series.instances:
            ds = pydicom.dcmread(inst.path)
            self.dataset(ds)
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return LabeledScan(folder, new_uid, scan.source, scan.boxes, scan.ignore,
                           self.pseudonym(series.patient_id) if series.patient_id else None)

    def _copy_volume(self, scan: LabeledScan, out_dir: Path, new_uid: str) -> LabeledScan:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(scan.image))
        for key in image.GetMetaDataKeys():
            image.EraseMetaData(key)
        suffix = scan.image.name[len(volume_stem(scan.image)):]
        target = Path(out_dir) / f"{new_uid}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(target), useCompression=True)
        return LabeledScan(target, new_uid, scan.source, scan.boxes, scan.ignore, None)


def deidentify_scans(scans: list[LabeledScan], index: ImageIndex, out_dir: Path, key: bytes, *,
                     progress: bool = True) -> tuple[list[LabeledScan], list[tuple[str, str]]]:
    """(copied scans, [(series uid, reason)] for the scans that could not be de-identified)."""
    deid = Deidentifier(key)
    copied, refused = [], []
    for scan in tqdm(scans, desc="de-identifying", unit="scan", disable=not progress):
        try:
            copied.append(deid.copy_scan(scan, index, out_dir))
        except DeidentificationError as exc:
            refused.append((scan.series_uid, f"not de-identified: {exc}"))
    return copied, refused
