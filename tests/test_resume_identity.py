"""A resume is the same request: the same audio root and the same listing (paths and sizes), not
only the same settings; two corpora never mix in one table."""

from __future__ import annotations

import shutil

import pytest

from msprior.codec import save_codec
from msprior.data.preprocess import PreprocessError, PreprocessRequest
from msprior.data.preprocess import preprocess as _preprocess
from msprior.data.synthetic import write_corpus

pytestmark = pytest.mark.timeout(600)
OPTS = dict(num_secs=2.0, min_frames=16, batch_size=8, condition_ratio=0, progress=False)


def run(audio, out, rave):
    return _preprocess(PreprocessRequest(str(audio), str(out), rave, **OPTS))


def test_resume_refuses_another_audio_root_or_listing(ray_session, tmp_path):
    write_corpus(str(tmp_path / "a"), n_files=2, seconds=3.0, seed=0)
    rave = save_codec(str(tmp_path / "codec.ts"), discrete=True)
    table = tmp_path / "table"
    assert run(tmp_path / "a", table, rave)["files_encoded"] == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same files under another root
    with pytest.raises(PreprocessError, match=r"made with audio\.root=.*/a, this run has .*/b") as e:
        run(tmp_path / "b", table, rave)
    assert "\n" not in str(e.value)
    write_corpus(str(tmp_path / "a" / "more"), n_files=1, seconds=3.0, seed=1)  # the corpus grew
    with pytest.raises(PreprocessError, match=r"audio\.listing_sha256"):
        run(tmp_path / "a", table, rave)
    shutil.rmtree(tmp_path / "a" / "more")
    again = run(tmp_path / "a", table, rave)  # the same request resumes (nothing left to do)
    assert again["files_encoded"] == 0 and again["files_already_done"] == 2


def test_intent_check_compares_root_and_listing(tmp_path):
    """The same check without Ray: an intent recorded for one request refuses another root or listing."""
    import json

    from msprior.data.intent import check_or_write, request_fields
    from msprior.data.request import RaveInfo

    rave = RaveInfo(data=b"", sha256="ab" * 32, facts={"resolution": None})
    corpus = (str(tmp_path / "a"), [("x.wav", str(tmp_path / "a" / "x.wav"), 10)], [])
    req = PreprocessRequest(str(tmp_path / "a"), str(tmp_path / "t"), "r.ts", **OPTS)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "intent.json").write_text(json.dumps({"audio": req.audio, "request": request_fields(req, rave, corpus)}))
    assert check_or_write(req, rave, corpus, "r", None)["audio"] == req.audio  # the same request resumes
    other = PreprocessRequest(str(tmp_path / "b"), str(tmp_path / "t"), "r.ts", **OPTS)
    with pytest.raises(PreprocessError, match="audio.root"):
        check_or_write(other, rave, (str(tmp_path / "b"), corpus[1], []), "r", None)
    grown = (corpus[0], corpus[1] + [("y.wav", str(tmp_path / "a" / "y.wav"), 10)], [])
    with pytest.raises(PreprocessError, match="audio.listing_sha256"):
        check_or_write(req, rave, grown, "r", None)
