"""One DICOM Structured Report per scored image, built with highdicom: a TID 1500 Measurement Report.

It holds the coded finding (COVID-19, SNOMED CT 840539006) as present or absent, the ensemble
probability with the threshold it was decided at, each network's probability, the algorithm that made
them (name, version = the bundle id, manufacturer; IHE AI Results style) and a reference to the source
instance. It joins the source's study as a new series per bundle, and its UIDs are derived from (image,
bundle), so sending it again replaces rather than duplicates.

The patient and study modules are copied from the source instance by highdicom: the one place this
system writes patient data, and only into the report, never into a log or the results database.
"""

from __future__ import annotations

import copy
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, TM

from deepcovid.networks import ARCHITECTURES

MANUFACTURER = "Deep-COVID Screen"
ALGORITHM = "Deep-COVID Screen ensemble"
SERIES_DESCRIPTION = "Deep-COVID Screen: AI result, not for diagnostic use alone"
SERIES_NUMBER = 9900
# A private coding scheme for what SNOMED CT and DICOM have no code for (see _CODING_SCHEME).
SCHEME = "99DEEPCOVID"
COVID19 = hd.sr.CodedConcept("840539006", "SCT", "COVID-19")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain X-ray of chest")
ENSEMBLE_PROBABILITY = hd.sr.CodedConcept("ENSEMBLE-P", SCHEME, "Ensemble probability of COVID-19")
THRESHOLD = hd.sr.CodedConcept("THRESHOLD", SCHEME, "Decision threshold of the ensemble probability")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
_NAMESPACE = uuid.UUID("6f1e0c55-3d5e-4bde-9a7c-54b1f0d1c0de")  # fixed forever: the UIDs depend on it


def derived_uid(*parts: str) -> str:
    """A UID under the ``2.25`` root (ISO/IEC 9834-8) derived from ``parts``: the same parts, the same UID."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '|'.join(parts)).int}"


def network_code(architecture: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        f"P-{architecture.upper()}"[:16], SCHEME, f"Probability of COVID-19 by {architecture}"
    )


def _software_version() -> str:
    try:
        return version("deepcovid-screen")
    except PackageNotFoundError:  # a source checkout that was not installed
        return "unknown"


@dataclass(frozen=True)
class Scores:
    """What one image's report says: the ensemble's answer and each network's probability."""

    bundle_id: str
    probability: float
    decision: bool
    threshold: float
    networks: Mapping[str, float | None]


def report_uids(source: Dataset, bundle_id: str) -> tuple[str, str]:
    """``(series UID, SOP instance UID)`` of the report on ``source`` by ``bundle_id``."""
    series = derived_uid("series", str(source.StudyInstanceUID), bundle_id)
    return series, derived_uid("sr", str(source.SOPInstanceUID), bundle_id)


# The longest value of each string VR (PS3.5 6.2): a source's longer values are not copied.
_MAX_LENGTH = {"AE": 16, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "UI": 64, "PN": 324}


def _copyable(source: Dataset) -> Dataset:
    """``source``'s header with the copied values that break their VR emptied (patient and study
    attributes are type 2 in the report): de-identification tools leave hashes in PatientBirthDate or
    AccessionNumber, for one."""
    header = copy.copy(source)
    for keyword, vr in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = header.get(keyword)
        if value:
            try:
                vr(str(value))
            except ValueError:
                setattr(header, keyword, "")
    if str(header.get("PatientSex", "") or "") not in ("", "M", "F", "O"):
        header.PatientSex = ""
    for element in header:
        limit = _MAX_LENGTH.get(element.VR)
        if limit and element.value and any(len(str(v)) > limit for v in _values(element.value)):
            element.value = ""
    return header


def _values(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def build_report(source: Dataset, scores: Scores) -> hd.sr.ComprehensiveSR:
    """The SR on ``source`` (its header is enough: patient, study and SOP attributes) for ``scores``."""
    # highdicom's warnings quote the values they doubt, a patient's name among them: never shown.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build(_copyable(source), scores)


def _build(source: Dataset, scores: Scores) -> hd.sr.ComprehensiveSR:
    series_uid, sop_uid = report_uids(source, scores.bundle_id)
    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM, version=scores.bundle_id, parameters=[f"threshold={scores.threshold:.6g}"]
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", scores.bundle_id),
        name=ALGORITHM,
        manufacturer_name=MANUFACTURER,
        model_name=scores.bundle_id[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    measurements = [
        hd.sr.Measurement(
            name=ENSEMBLE_PROBABILITY, value=scores.probability, unit=NO_UNITS, algorithm_id=algorithm
        ),
        hd.sr.Measurement(name=THRESHOLD, value=scores.threshold, unit=NO_UNITS, algorithm_id=algorithm),
    ]
    for architecture in ARCHITECTURES:
        probability = scores.networks.get(architecture)
        if probability is not None:
            network = hd.sr.AlgorithmIdentification(name=architecture, version=scores.bundle_id)
            measurements.append(
                hd.sr.Measurement(
                    name=network_code(architecture), value=probability, unit=NO_UNITS, algorithm_id=network
                )
            )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", str(source.SOPInstanceUID), scores.bundle_id),
            identifier="COVID-19 screening",
        ),
        finding_type=COVID19,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=COVID19, value=PRESENT if scores.decision else ABSENT)
        ],
    )
    content = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=CHEST_XRAY, imaging_measurements=[group]
    )
    report = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=content[0],
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SERIES_DESCRIPTION,
        software_versions=_software_version(),
        manufacturer_model_name=ALGORITHM,
    )
    _coding_schemes(report)
    return report


def _coding_schemes(report: Dataset) -> None:
    """Declare the private coding scheme, as PS3.3 C.12.1.1.2.1 asks of one outside the registry."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "Deep-COVID Screen result codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    report.CodingSchemeIdentificationSequence = [item]
