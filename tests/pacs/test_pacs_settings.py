"""PACS settings: secrets masked by `deepcovid config`, lists split, bad values refused by name."""

from __future__ import annotations

import pytest

from deepcovid.settings import Settings


def test_config_masks_the_pacs_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_DICOMWEB_USERNAME", "reader")
    monkeypatch.setenv("DEEPCOVID_DICOMWEB_PASSWORD", "pacs-password")
    monkeypatch.setenv("DEEPCOVID_DICOMWEB_TOKEN", "pacs-token")
    monkeypatch.setenv("DEEPCOVID_PUBLISH_TO", "dicomwebs://ai:publish-secret@pacs.example:443/dicom-web")
    monkeypatch.setenv("DEEPCOVID_DICOMWEB_ALLOW", "dicomweb://pacs:8042/dicom-web, dicomwebs://b:443/x")
    settings = Settings()
    shown = settings.masked()
    assert shown["dicomweb_password"] == "***" and shown["dicomweb_token"] == "***"
    assert "publish-secret" not in shown["publish_to"]
    assert shown["dicomweb_username"] == "reader"
    assert settings.dicomweb_allow == ["dicomweb://pacs:8042/dicom-web", "dicomwebs://b:443/x"]
    assert "pacs-password" not in str(settings.masked()) and "pacs-token" not in str(settings.masked())


def test_eligibility_lists_are_upper_case_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPCOVID_INELIGIBLE_VIEWS", " ll, rl ,lateral")
    assert Settings().ineligible_views == ["LL", "RL", "LATERAL"]
    assert "" in Settings().eligible_body_parts  # a missing BodyPartExamined is scored by default
