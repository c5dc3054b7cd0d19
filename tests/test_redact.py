"""Credentials out of written and printed URIs (msprior.redact); the writers are checked on a real
pipeline run in tests/test_pipeline_stages.py."""

from __future__ import annotations

import pytest

from msprior.redact import redact_text, redact_uri, with_credentials


@pytest.mark.parametrize("uri, expected", [
    ("http://user:secret@127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://token@mlflow.example.org/path", "https://mlflow.example.org/path"),
    ("http://a@b:c@host:1/p", "http://host:1/p"),                    # user-info ends at the last '@'
    ("https://host/x?token=abc&experiment=1", "https://host/x?experiment=1"),
    ("https://host/x?access_token=a&X-Amz-Signature=b&sig=c&password=d#f", "https://host/x#f"),
    ("postgresql://u:p@db:5432/mlflow?sslmode=require", "postgresql://db:5432/mlflow?sslmode=require"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),       # untouched, byte for byte
    ("sqlite:///relative.db", "sqlite:///relative.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("s3://bucket/prefix/run", "s3://bucket/prefix/run"),
    ("databricks", "databricks"),
    ("/local/dir", "/local/dir"),
    (None, None),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected


def test_redact_text_and_credentials_from_the_environment(monkeypatch):
    assert redact_text("pull it: msprior pull m@champion --tracking_uri http://u:pw@h:1 (or https://h/?token=t)") == \
        "pull it: msprior pull m@champion --tracking_uri http://h:1 (or https://h/)"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@h:1")
    assert with_credentials("http://h:1") == "http://u:pw@h:1"  # the recorded server, credentials restored
    assert with_credentials("http://other:1") == "http://other:1"
    assert with_credentials(None) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert with_credentials("http://h:1") == "http://h:1"
