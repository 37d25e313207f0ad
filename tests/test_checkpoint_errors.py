"""Every broken checkpoint file ends in ONE CheckpointError line that names the file, says what is wrong and
what was expected; nothing from an unsafe file ever runs. The bad files are built in tmp_path from a tiny
model saved with save_checkpoint (the ``tiny_checkpoint`` fixture)."""

import os
import pickle
import struct
import zipfile

import pytest
import torch

import bagcert
from bagcert.checkpoint import CheckpointError, safe_torch_load


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        bagcert.load_checkpoint(path)
    text = str(info.value)
    assert "\n" not in text, f"message spans several lines: {text!r}"
    assert str(path) in text, f"message does not name the file: {text!r}"
    return text


def _rewrite(src, dst, edit):
    """Load ``src`` (weights only), let ``edit`` change the dict in place, save it plainly to ``dst``."""
    obj = torch.load(src, weights_only=True)
    edit(obj)
    torch.save(obj, dst)
    return dst


def test_random_bytes_are_not_a_torch_file(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    text = _error(path)
    assert "not a torch checkpoint file (not a zip archive" in text
    assert "pickled" not in text


def test_truncated_file_is_named_truncated(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 3):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        text = _error(path)
        assert "not a zip archive" in text and "truncated" in text


def test_flipped_byte_inside_the_archive_is_reported_as_corrupt(tiny_checkpoint, tmp_path):
    data = bytearray(tiny_checkpoint.read_bytes())
    info = next(i for i in zipfile.ZipFile(tiny_checkpoint).infolist() if i.filename.endswith("/data.pkl"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    text = _error(path)
    assert "corrupt" in text and "CRC-32" in text and "data.pkl" in text


class _Hostile:
    """Unpickling this runs ``touch <marker>``: a file holding it must be refused, never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_in_a_torch_archive_is_refused_and_never_run(tiny_checkpoint, tmp_path):
    marker = tmp_path / "hostile_code_ran"
    path = _rewrite(tiny_checkpoint, tmp_path / "hostile.pt", lambda o: o["metadata"].update(x=_Hostile(marker)))
    text = _error(path)
    assert "refusing to load" in text and "not a bagcert checkpoint" in text
    assert "refused this unsafe content" in text and "system" in text and "nothing from it was run" in text
    assert not marker.exists()


def test_hostile_bare_pickle_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "hostile_code_ran"
    path = tmp_path / "bare.pt"
    path.write_bytes(pickle.dumps({"format": "bagcert-checkpoint", "x": _Hostile(marker)}))
    text = _error(path)
    assert "not a torch checkpoint file (not a zip archive" in text
    assert not marker.exists()


def test_future_format_version_says_to_upgrade(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "v2.pt", lambda o: o.update(format_version=2))
    text = _error(path)
    assert "format version 2" in text and "reads version 1" in text and "newer bagcert" in text


def test_foreign_dict_names_what_it_found(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"format": "someone-else", "weights": torch.zeros(2)}, path)
    assert "format 'someone-else'; expected 'format': 'bagcert-checkpoint'" in _error(path)
    torch.save([torch.zeros(2)], path)
    assert "a list, not a dict" in _error(path)
    torch.save({"format": "bagcert-peer-classifier", "format_version": 1}, path)
    assert "it is a peer classifier: load it with bagcert.peers.load_peer_classifier" in _error(path)


def test_unknown_model_name_lists_the_known_ones(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "unknown.pt", lambda o: o["model"].update(name="resnet50"))
    text = _error(path)
    assert "unknown model 'resnet50'" in text
    assert all(name in text for name in bagcert.list_models())


@pytest.mark.parametrize("value", ["abc", 0, -32, 32.0, True, None])
def test_bad_input_size_is_named(tiny_checkpoint, tmp_path, value):
    path = _rewrite(tiny_checkpoint, tmp_path / "size.pt", lambda o: o["metadata"].update(input_size=value))
    text = _error(path)
    assert f"metadata 'input_size' is {value!r} ({type(value).__name__}); expected an int >= 1" in text


def test_resize_smaller_than_the_crop_is_refused(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "resize.pt", lambda o: o["metadata"].update(resize=16))
    assert "metadata 'resize' is 16 (int); expected None or an int >= 32" in _error(path)


def test_classes_that_do_not_fit_the_model(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "classes.pt", lambda o: o["metadata"].update(classes=["a", "b", "c"]))
    assert "'classes' names 3 classes but the model predicts 10" in _error(path)
    path = _rewrite(tiny_checkpoint, tmp_path / "classes2.pt", lambda o: o["metadata"].update(classes="airplane"))
    assert "metadata 'classes' is 'airplane' (str); expected a list of class names" in _error(path)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("metadata", "input_size=32", "'metadata' is 'input_size=32' (str); expected a dict"),
        ("model", "cifar_bagnet5", "'model' is 'cifar_bagnet5' (str); expected a dict {'name': <registry name>"),
        ("state_dict", [1, 2], "'state_dict' is [1, 2] (list); expected a dict of named tensors"),
    ],
)
def test_a_string_or_list_where_a_dict_is_expected(tiny_checkpoint, tmp_path, key, value, expected):
    path = _rewrite(tiny_checkpoint, tmp_path / "shape.pt", lambda o: o.update({key: value}))
    assert expected in _error(path)


def test_missing_top_level_entries_are_listed(tiny_checkpoint, tmp_path):
    def drop(o):
        del o["state_dict"], o["metadata"]

    path = _rewrite(tiny_checkpoint, tmp_path / "partial.pt", drop)
    assert "missing 'state_dict', 'metadata' (expected 'model', 'state_dict' and 'metadata')" in _error(path)


def test_missing_unexpected_and_misshapen_weights_in_one_line(tiny_checkpoint, tmp_path):
    def damage(o):
        sd = o["state_dict"]
        del sd["head.bias"]
        sd["extra.weight"] = torch.zeros(1)
        sd["head.weight"] = torch.zeros(3, 8, 1, 1)

    text = _error(_rewrite(tiny_checkpoint, tmp_path / "weights.pt", damage))
    assert "weights do not match the architecture 'cifar_bagnet5'" in text
    assert "1 missing (head.bias)" in text and "1 unexpected (extra.weight)" in text
    assert "head.weight [3, 8, 1, 1] (expected [10, 8, 1, 1])" in text


def test_non_tensor_weights(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "nt.pt", lambda o: o["state_dict"].update({"head.bias": [0.0] * 10}))
    assert "state_dict entries ['head.bias'] are not tensors" in _error(path)


def test_model_arguments_this_version_cannot_build(tiny_checkpoint, tmp_path):
    path = _rewrite(tiny_checkpoint, tmp_path / "kw.pt", lambda o: o["model"]["kwargs"].update(receptive_field="abc"))
    assert "cannot rebuild model 'cifar_bagnet5' from its recorded arguments" in _error(path)


def test_folder_and_missing_file(tmp_path):
    assert "is a folder; expected a .pt file" in _error(tmp_path)
    assert "checkpoint file not found" in _error(tmp_path / "nope.pt")


def test_other_loaders_name_their_kind_of_file(tmp_path):
    path = tmp_path / "cache.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"expected a dataset cache written by bagcert$"):
        safe_torch_load(path, "dataset cache")


def test_save_refuses_metadata_that_could_not_be_read_back(tmp_path):
    model = bagcert.create_model("cifar_bagnet5", num_classes=10, width=8)
    path = tmp_path / "m.pt"
    with pytest.raises(ValueError, match=r"metadata 'input_size' is 'abc' \(str\); expected an int >= 1"):
        bagcert.save_checkpoint(path, model, input_size="abc")
    with pytest.raises(ValueError, match="'classes' names 2 classes but the model predicts 10"):
        bagcert.save_checkpoint(path, model, classes=["a", "b"])
    assert not path.exists()


def test_check_metadata_accepts_what_training_writes(tiny_checkpoint):
    from bagcert.checkpoint import check_metadata

    _, meta = bagcert.load_checkpoint(tiny_checkpoint)
    assert check_metadata(meta, tiny_checkpoint, num_classes=10) is meta
    assert check_metadata({"input_size": 128, "resize": 146}, "x.pt") == {"input_size": 128, "resize": 146}
