"""One `ConditioningSpec` (msprior/conditioning.py): written by preprocess into the manifest, read
back from manifests of every age, compared by a resume (feature names included) in one line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from msprior.conditioning import FEATURES, NONE, TABLE, TOKENS, ConditioningError, ConditioningSpec
from msprior.errors import UserError
from tests._train_data import write_synthetic_table

NAMES = ("loudness_db", "centroid_log2_hz", "flatness")
SPEC = ConditioningSpec(kind=TABLE, ratio=4, names=NAMES, mean=(1.0, 2.0, 3.0), std=(0.5, 0.5, 0.5),
                        vocab_size=8, scale=(1.0, 1.0, 2.0), centroids="centroids.npy", centroids_sha256="ab" * 32)


@pytest.mark.timeout(600)
def test_spec_round_trip_through_a_preprocessed_table(ray_session, tmp_path):
    """A real preprocess writes the spec into intent.json and manifest.json; it reads back equal."""
    from msprior.codec import save_codec
    from msprior.data import features as feat
    from msprior.data.preprocess import PreprocessRequest, preprocess
    from msprior.data.synthetic import write_corpus
    from msprior.data import load_manifest
    from msprior.model import DatasetFacts

    write_corpus(str(tmp_path / "a"), n_files=2, seconds=3.0, seed=0)
    rave = save_codec(str(tmp_path / "codec.ts"), discrete=True)
    table = tmp_path / "table"
    preprocess(PreprocessRequest(str(tmp_path / "a"), str(table), rave, num_secs=2.0, min_frames=16, batch_size=8,
                                 condition_ratio=4, condition_tokens=4, progress=False))
    manifest = load_manifest(str(table))
    spec = ConditioningSpec.from_manifest(manifest)
    names = tuple(feat.feature_names())
    assert (spec.kind, spec.ratio, spec.names, spec.vocab_size) == (TABLE, 4, names, 4)
    assert len(spec.mean) == len(spec.std) == len(spec.scale) == len(names) == spec.num_features
    assert spec.centroids_sha256 == hashlib.sha256((table / spec.centroids).read_bytes()).hexdigest()
    assert spec.to_manifest() == manifest["conditioning"]  # what preprocess wrote is the spec's section
    assert ConditioningSpec.from_dict(json.loads(json.dumps(spec.to_manifest()))) == spec
    intent = ConditioningSpec.from_manifest(json.loads((table / "intent.json").read_text()))
    assert intent == replace(spec, mean=(), std=())  # the manifest adds the table's statistics
    facts = DatasetFacts.from_manifest(manifest)  # the model is given plain numbers from the spec
    assert (facts.cond_ratio, facts.cond_vocab, facts.cond_features) == (4, 4, len(names))
    assert facts.feature_mean == list(spec.mean)


def test_manifests_written_before_the_spec_still_read(tmp_path):
    """No "kind", no centroid digest (earlier msprior), a null section, an intent's section without
    statistics, a section with a feature size and no names."""
    old = write_synthetic_table(tmp_path / "t", num_files=2, feature_names=list(NAMES))  # format 1
    spec = ConditioningSpec.from_manifest(old)
    assert (spec.kind, spec.ratio, spec.names, spec.vocab_size, spec.centroids_sha256) == (TABLE, 4, NAMES, 8, None)
    assert spec.has(TOKENS) and spec.has(FEATURES) and spec.mean == (0.0, 0.0, 0.0)
    assert ConditioningSpec.from_manifest({"conditioning": None}) == ConditioningSpec()
    assert ConditioningSpec.from_manifest({}).kind == NONE and ConditioningSpec().to_manifest() is None
    assert ConditioningSpec.from_dict({"ratio": 0, "features": {"names": ["x"]}}).kind == NONE
    with pytest.raises(ConditioningError, match="expected an object"):  # e.g. an export's "conditioning": "tokens"
        ConditioningSpec.from_manifest({"conditioning": "tokens"})
    sized = ConditioningSpec.from_dict({"ratio": 2, "features": {"size": 2}})
    assert sized.num_features == 2 and sized.vocab_size == 0
    # a digest missing on one side (an older manifest) is not compared; everything else is
    replace(spec, centroids_sha256="ab" * 32).check_compatible(spec, "x")
    with pytest.raises(ConditioningError, match="conditioning names differs"):
        spec.check_compatible(replace(spec, names=("a", "b", "c")), "x")


@pytest.mark.parametrize("field,value", [("kind", FEATURES), ("ratio", 2), ("names", ("a", "b", "c")),
                                         ("vocab_size", 16), ("scale", (1.0, 1.0, 1.0)),
                                         ("centroids_sha256", "cd" * 32)])
def test_check_compatible_names_the_differing_field(field, value):
    other = replace(SPEC, **{field: value})
    with pytest.raises(ConditioningError) as e:
        SPEC.check_compatible(other, "--resume r: the run's table vs /t", "resume with its table")
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert msg.startswith(f"--resume r: the run's table vs /t: conditioning {field} differs (")
    assert msg.endswith("; resume with its table")
    # the normalisation statistics grow with the table: not what makes two specs differ
    SPEC.check_compatible(replace(SPEC, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), "x")


def test_a_prior_reads_one_kind_and_the_nn_inlets_follow():
    tokens, features = SPEC.use(TOKENS, "t"), SPEC.use(FEATURES, "t")
    assert (tokens.kind, tokens.names, tokens.vocab_size, tokens.mean) == (TOKENS, NAMES, 8, ())
    assert (features.kind, features.vocab_size, features.centroids_sha256) == (FEATURES, 0, None)
    assert features.mean == SPEC.mean and features.std == SPEC.std
    assert (SPEC.use(NONE, "t").channels, tokens.channels, features.channels) == (0, 1, 3)
    assert tokens.labels() == ("(signal) conditioning token",)
    assert features.labels()[0] == "(signal) conditioning feature 1 (loudness_db)"
    assert ConditioningSpec.from_dict(features.to_manifest()) == features  # a prior's spec round-trips too
    with pytest.raises(ConditioningError, match="^/t: the prior reads conditioning tokens but the table has none;"):
        ConditioningSpec().use(TOKENS, "/t")
    with pytest.raises(ConditioningError, match="reads conditioning features but the table has tokens"):
        tokens.use(FEATURES, "/t")
    with pytest.raises(ConditioningError, match="'words' is not one of none, tokens, features"):
        SPEC.use("words", "/t")


def test_resume_refuses_a_table_with_other_feature_names(tmp_path):
    """The driver's resume check (train.run.check_resume, before Ray) on real tables: the same
    content with other feature names is another table, in one line naming the field."""
    from msprior.checkpoint import write_run_request
    from msprior.config import load_config
    from msprior.data.reader import open_table
    from msprior.train.plan import check_resume, request_record

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_synthetic_table(a, num_files=4)  # features f0, f1, f2
    write_synthetic_table(b, num_files=4, feature_names=list(NAMES))  # the same rows, other names
    cfg = load_config("encoder_decoder")
    run_dir = str(tmp_path / "runs" / "r")
    table_a, table_b = open_table(a, 0.25, 0, "tokens"), open_table(b, 0.25, 0, "tokens")
    assert table_a.identity() == table_b.identity()  # the indexed content alone cannot tell them apart
    write_run_request(run_dir, request_record(cfg, table_a))
    check_resume("r", run_dir, cfg, table_a)  # the same table resumes
    with pytest.raises(UserError) as e:
        check_resume("r", run_dir, cfg, table_b)
    assert str(e.value) == (f"--resume r: the run's table ({a}) vs {b}: conditioning names differs ([f0, f1, f2] vs "
                            f"[{', '.join(NAMES)}]); resume with its table or choose another --name")


@pytest.mark.parametrize("kind,column,per_frame", [(NONE, None, 1), (TOKENS, "tokens", 1), (FEATURES, "features", 3)])
def test_the_read_path_carries_the_tables_spec(tmp_path, kind, column, per_frame):
    """open_table sets the prior's spec from the manifest; ReadSpec, frames_from_arrow and the
    windows read column, step and shape from it (no loose kind / ratio / feature count)."""
    from msprior.data.reader import ReadSpec, frames_from_arrow, open_table, read_split
    from msprior.data.windows import WindowSampler

    write_synthetic_table(tmp_path / "t", num_files=2)  # ratio 4, 8 token classes, 3 features
    table = open_table(str(tmp_path / "t"), 0.0, 0, kind)
    spec = ReadSpec.of(table)
    assert spec.cond == table.cond and (spec.cond.kind, spec.cond.column, spec.cond.per_frame) == (kind, column, per_frame)
    assert spec.cond.step == (4 if column else 1) and (column in table.columns) == bool(column)
    frames = frames_from_arrow(read_split(table, val=False), 4, spec.cond)
    assert frames.rave.shape == (2 * 4 * 64, 4)
    assert (frames.cond is None) == (column is None)
    if column:
        assert frames.cond.shape[0] == 2 * 4 * spec.cond.frames(64) == 2 * 4 * 16
    batch = WindowSampler(frames, 16, spec.cond, seed=0).sample(4)
    assert (column in batch) == bool(column)
    if column:
        assert batch[column].shape[:2] == (4, 4)  # ceil(16 / 4) conditioning frames per window


def test_training_refuses_a_config_ratio_other_than_the_tables(tmp_path):
    """The read path steps by the table's ratio: a config whose model.cond_ratio differs is refused
    before any data is read, in one line naming the override."""
    from msprior.config import load_config
    from msprior.data import load_manifest
    from msprior.train.plan import TrainError, check_table_vs_config

    write_synthetic_table(tmp_path / "t", num_files=2)
    manifest = load_manifest(str(tmp_path / "t"))
    check_table_vs_config(load_config("encoder_decoder", ["model.cond_ratio=4"]), manifest, "t")
    with pytest.raises(TrainError, match=r"model.cond_ratio=4$"):
        check_table_vs_config(load_config("encoder_decoder", ["model.cond_ratio=2"]), manifest, "t")
