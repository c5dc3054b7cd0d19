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


def test_redact_text_masks_the_secrets_of_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "dapi0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pa55word-x@mlflow:5000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")  # an identifier, not a secret
    text = ("SignatureDoesNotMatch for wJalrXUtnFEMI-K7MDENG; token dapi0123456789 refused; "
            "login pa55word-x failed at http://alice:pa55word-x@mlflow:5000/api; key AKIAEXAMPLE")
    assert redact_text(text) == ("SignatureDoesNotMatch for ***; token *** refused; login *** failed at "
                                 "http://mlflow:5000/api; key AKIAEXAMPLE")


def test_log_records_are_redacted_by_every_handler(monkeypatch):
    """The filter sits on Ray's and MLflow's loggers' handlers: a record of a child logger
    (ray.tune.x) and its traceback are redacted before any handler writes them."""
    import io
    import logging

    from msprior.redact import RedactedError, install_log_redaction

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    ray_logger = logging.getLogger("ray")
    monkeypatch.setattr(ray_logger, "handlers", [handler])
    monkeypatch.setattr(ray_logger, "propagate", False)
    install_log_redaction()
    try:
        raise OSError("PUT http://u:pw1234567@s3:9000/b?X-Amz-Signature=abc failed (s3cr3t-value-xyz)")
    except OSError:
        logging.getLogger("ray.tune.trial").error("trial failed at %s", "http://u:pw1234567@mlflow:5000",
                                                  exc_info=True)
    text = stream.getvalue()
    assert "trial failed at http://mlflow:5000" in text and "Traceback" in text
    assert "pw1234567" not in text and "s3cr3t-value-xyz" not in text and "X-Amz-Signature" not in text, text
    err = RedactedError.of(ValueError("bad http://u:pw1234567@h:1"))
    assert str(err) == "ValueError: bad http://h:1"


def test_an_uncaught_exception_prints_redacted():
    """The last boundary: a crash's traceback on stderr (Python's own hook prints it raw)."""
    import subprocess
    import sys

    code = ("from msprior.redact import install_log_redaction\ninstall_log_redaction()\n"
            "raise ConnectionError('MLflow at http://bob:pw-987654@mlflow:5000 refused')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert "ConnectionError: MLflow at http://mlflow:5000 refused" in r.stderr and "pw-987654" not in r.stderr
