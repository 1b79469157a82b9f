"""The event format and the reader: round trips and clear errors."""

import json
import os

import numpy as np
import pytest

from keras_vg import format as fmt
from keras_vg.event_writer import EventWriter
from keras_vg.reader import find_runs, read_run


def test_metadata_round_trip_and_version_check():
    content = fmt.encode_metadata("grad_norm", ["a", "b"])
    assert fmt.decode_metadata(content) == {
        "format_version": fmt.FORMAT_VERSION, "name": "grad_norm", "axis": "variable", "names": ["a", "b"]
    }
    newer = json.dumps({"format_version": "3.0", "name": "grad_norm"}).encode()
    with pytest.raises(fmt.FormatError, match="newer"):
        fmt.decode_metadata(newer)
    for older in ("2.7", "1.1"):  # another minor of ours, and the previous major
        content = json.dumps({"format_version": older, "name": "x"}).encode()
        assert fmt.decode_metadata(content)["format_version"] == older


def test_tag_names_are_checked():
    assert fmt.name_for(fmt.tag_for("update_ratio")) == "update_ratio"
    assert fmt.name_for("other/grad_norm") is None
    with pytest.raises(ValueError, match="Received: name='gradnorm'"):
        fmt.tag_for("gradnorm")


def test_writer_reader_round_trip(tmp_path):
    writer = EventWriter(tmp_path)
    names = ["model/dense/kernel", "model/dense/bias"]
    for step in range(5):
        writer.write_stat("grad_norm", step, [step, 2.0 * step], names)
        writer.write_stat("global_grad_norm", step, 3.0 * step)
    writer.write_json(fmt.EVENTS_NAME, 3, [{"kind": "alert", "step": 3, "message": "m"}])
    writer.write_json(fmt.MODEL_NAME, 0, {"name": "model"})
    writer.close()
    run = read_run(tmp_path)
    steps, got_names, values = run.stat("grad_norm")
    np.testing.assert_array_equal(steps, np.arange(5))
    assert got_names == names
    np.testing.assert_array_equal(values, np.stack([np.arange(5), 2.0 * np.arange(5)], axis=1))
    np.testing.assert_array_equal(run.stat("global_grad_norm")[2], 3.0 * np.arange(5))
    assert run.events() == [{"kind": "alert", "step": 3, "message": "m"}]
    assert run.model() == {"name": "model"}
    with pytest.raises(KeyError, match="Available"):
        run.stat("dead_fraction")


def test_metadata_written_once_per_tag(tmp_path):
    writer = EventWriter(tmp_path)
    for step in range(3):
        writer.write_stat("grad_norm", step, [1.0], ["a" * 1000])
    writer.close()
    size = sum(os.path.getsize(p) for p in tmp_path.iterdir())
    assert size < 2 * 1000 + 500  # the 1000-character name is stored once, not three times


def test_read_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fmt.FormatError, match="No keras-vg data"):
        read_run(tmp_path / "empty")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    writer = EventWriter(tmp_path / "runs" / "b")
    writer.write_stat("grad_norm", 0, [1.0], ["v"])
    writer.close()
    with pytest.raises(fmt.FormatError, match="Runs found below it: b"):
        read_run(tmp_path / "runs")
    assert find_runs(tmp_path / "runs") == ["b"]


def test_newer_major_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "FORMAT_VERSION", "3.0")
    writer = EventWriter(tmp_path)
    writer.write_stat("grad_norm", 0, [1.0], ["v"])
    writer.close()
    monkeypatch.setattr(fmt, "FORMAT_VERSION", "2.0")
    with pytest.raises(fmt.FormatError, match="newer than the format 2.0"):
        read_run(tmp_path)


def test_reader_aligns_names_across_files(tmp_path):
    first = EventWriter(tmp_path)
    first.write_stat("grad_norm", 0, [1.0, 2.0], ["a", "b"])
    first.close()
    second = EventWriter(tmp_path)
    second.write_stat("grad_norm", 1, [3.0, 4.0, 5.0], ["a", "b", "c"])
    second.close()
    steps, names, values = read_run(tmp_path).stat("grad_norm")
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(values[0, :2], [1.0, 2.0])
    assert np.isnan(values[0, 2])
    np.testing.assert_array_equal(values[1], [3.0, 4.0, 5.0])


def test_reader_keeps_variables_that_a_later_fit_no_longer_trains(tmp_path):
    # Frozen after the first fit: the second file names fewer variables. The run keeps them all.
    first = EventWriter(tmp_path)
    first.write_stat("grad_norm", 0, [1.0, 2.0, 3.0], ["a", "b", "c"])
    first.close()
    second = EventWriter(tmp_path)
    second.write_stat("grad_norm", 1, [4.0, 5.0], ["b", "c"])
    second.close()
    steps, names, values = read_run(tmp_path).stat("grad_norm")
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(values[0], [1.0, 2.0, 3.0])
    assert np.isnan(values[1, 0]) and list(values[1, 1:]) == [4.0, 5.0]


def test_latest_records_reads_the_last_step_and_model_summary(tmp_path):
    from keras_vg.reader import latest_records

    assert latest_records(tmp_path / "missing") == (None, None)
    first = EventWriter(tmp_path)
    first.write_json(fmt.MODEL_NAME, 0, {"name": "first"})
    first.write_stat("grad_norm", 7, [1.0], ["a"])
    first.close()
    second = EventWriter(tmp_path)
    second.write_json(fmt.MODEL_NAME, 8, {"name": "second"})
    second.write_stat("grad_norm", 12, [1.0], ["a"])
    second.write_stat("grad_norm", 10, [1.0], ["a"])
    second.close()
    assert latest_records(tmp_path) == (12, {"name": "second"})
